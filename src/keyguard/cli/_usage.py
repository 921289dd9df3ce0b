"""The ``usage`` command: one key's requests and refusals over time, as a table and a sparkline.

The counts come from :func:`keyguard.usage.usage` through the manager; this module only
reads the command's times and prints the points.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

from ..usage import USAGE_STEPS, UsagePoint
from ._durations import parse_duration
from ._output import print_json, printable
from ._session import EXIT_OK, EXIT_USAGE, CLIError, Session, resolve

__all__ = ["cmd_usage", "parse_since", "parse_until", "sparkline"]

SPARKS = "▁▂▃▄▅▆▇█"
_HEADERS = ("START", "REQUESTS", "REFUSED")
_DURATION_LIKE = re.compile(r"\s*[0-9]+\s*[a-zA-Z]\s*")
_TIME_HELP = "a duration (7d, 24h, 30m) or a UTC date/time (2024-05-01, 2024-05-01T10:00)"


def _parse_time(text: str) -> datetime | timedelta:
    """A duration (``7d``) or an ISO 8601 date/time; one without an offset is UTC."""
    if _DURATION_LIKE.fullmatch(text):
        return parse_duration(text)
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"invalid time {text!r}: use {_TIME_HELP}") from None
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else value


def parse_since(text: str) -> datetime | timedelta:
    """``--since``: how far back from ``--until`` (a duration), or a date/time."""
    return _parse_time(text)


def parse_until(text: str) -> datetime:
    """``--until``: how long ago (a duration), or a date/time."""
    value = _parse_time(text)
    if isinstance(value, timedelta):
        return datetime.now(timezone.utc) - value
    return value


def sparkline(values: Sequence[int]) -> str:
    """One bar per value, scaled to the largest; any count above zero shows above the floor."""
    peak = max(values, default=0)
    if peak <= 0:
        return SPARKS[0] * len(values)
    top = len(SPARKS) - 1
    return "".join(SPARKS[0 if v <= 0 else max(1, round(v / peak * top))] for v in values)


def _label(start: datetime, step: str) -> str:
    return start.strftime("%Y-%m-%d" if step == "day" else "%Y-%m-%d %H:%M")


def _refused(point: UsagePoint) -> str:
    parts = [f"{printable(code)}={n}" for code, n in sorted(point.refused.items())]
    return ", ".join(parts) or "-"


def cmd_usage(session: Session) -> int:
    args = session.args
    manager, info = resolve(session, args.ref)
    try:
        points = manager.usage(
            info.key_id,
            since=args.since,
            until=args.until,
            step=args.step,
            family=not args.key_only,
        )
    except (ValueError, TypeError) as e:
        raise CLIError(str(e), EXIT_USAGE) from None
    # The manager checked the range: there is at least one point.
    since, until = points[0].start, points[-1].start + timedelta(seconds=USAGE_STEPS[args.step])
    if args.json:
        print_json(
            {
                "key_id": info.key_id,
                "step": args.step,
                "since": since.isoformat(),
                "until": until.isoformat(),
                "points": [
                    {"start": p.start.isoformat(), "requests": p.requests, "refused": p.refused}
                    for p in points
                ],
            }
        )
        return EXIT_OK
    requests = sum(p.requests for p in points)
    refused = sum(p.total for p in points) - requests
    print(
        f"{info.key_id} ({printable(info.hint)}): {requests} admitted, {refused} refused,"
        f" per {args.step} from {_label(since, args.step)} to {_label(until, args.step)} UTC"
    )
    print(sparkline([p.requests for p in points]))
    print()
    rows = [(_label(p.start, args.step), str(p.requests), _refused(p)) for p in points]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(_HEADERS[:2])]
    for start, count, codes in (_HEADERS, *rows):
        print(f"{start:<{widths[0]}}  {count:>{widths[1]}}  {codes}")
    return EXIT_OK
