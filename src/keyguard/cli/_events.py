"""The ``events`` command: the audit trail of one key, or of every key, newest first.

The events come from :meth:`keyguard.APIKeyManager.events`; this module only prints them,
as a table (times in UTC, the changes as compact JSON) or as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from ..events import KeyEvent
from ._output import _display_width, print_json_list, printable
from ._session import EXIT_OK, Session, resolve

__all__ = ["cmd_events", "event_table", "parse_limit"]

DEFAULT_LIMIT = 100
_MAX_LIMIT = 1_000_000
_HEADERS = ("TIME (UTC)", "KEY_ID", "ACTION", "ACTOR", "CHANGES")


def parse_limit(text: str) -> int:
    """``--limit``: a whole number of events, at least 1."""
    if not text.isdigit() or not 0 < int(text) <= _MAX_LIMIT:
        raise ValueError(f"expected a whole number from 1 to {_MAX_LIMIT}, got {text!r}")
    return int(text)


def _changes(event: KeyEvent) -> str:
    return json.dumps(event.changes, ensure_ascii=False, separators=(",", ":"))


def event_table(events: Sequence[KeyEvent]) -> list[str]:
    """The lines of the table: one row per event, the changes in full as the last column."""
    rows = [
        (
            e.at.strftime("%Y-%m-%d %H:%M:%S"),
            printable(e.key_id),
            printable(e.action),
            printable(e.actor) or "-",
            printable(_changes(e)),
        )
        for e in events
    ]
    widths = [
        max(_display_width(h), *(_display_width(r[i]) for r in rows))
        for i, h in enumerate(_HEADERS[:-1])
    ]
    return [
        "  ".join(
            [*(_pad(cell, w) for cell, w in zip(row, widths, strict=False)), row[-1]]
        ).rstrip()
        for row in (_HEADERS, *rows)
    ]


def _pad(text: str, width: int) -> str:
    # By columns, not characters, so a wide character does not push the next column.
    return text + " " * (width - _display_width(text))


def cmd_events(session: Session) -> int:
    args = session.args
    if args.ref is None:
        manager, key_id = session.manager(), None
    else:
        manager, info = resolve(session, args.ref)
        key_id = info.key_id
    # The parser checked --since and --limit, and every store a URL names keeps events.
    events = manager.events(key_id, since=args.since, limit=args.limit)
    if args.json:
        print_json_list("events", (e.to_dict() for e in events))
        return EXIT_OK
    if not events:
        print("No events." if args.since is None else "No events in that time.")
        return EXIT_OK
    for line in event_table(events):
        print(line)
    return EXIT_OK
