"""What the ``keyguard`` command prints: key records as text or JSON, tables, scan reports, errors.

Kept apart from the command logic so every command renders records, times and stored
(untrusted) text the same way.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import unicodedata
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from ..keys import mask_key
from ..records import KeyInfo
from ..scan import ScanReport
from ._durations import relative_time

__all__ = [
    "format_time",
    "key_info_json",
    "key_table",
    "print_error",
    "print_json",
    "print_new_key",
    "print_revocations",
    "print_scan_report",
    "printable",
    "redact",
    "terminal_width",
]

_SHOWN_ONCE = "This is the only time the key is shown: copy it now. keyguard keeps only its hash."
# Any word holding 32 lowercase hex may be a key typed in the wrong place (a key's shape,
# prefix[A-Za-z0-9_-]{1,20} + 32 hex, is one such word); stderr shows it masked.
_WORD = re.compile(r"[A-Za-z0-9_-]+")
_KEY_BODY = re.compile(r"[0-9a-f]{32}")


def printable(text: str) -> str:
    """Neutralise control characters so stored data cannot rewrite the operator's terminal."""
    return "".join(c if c.isprintable() else "?" for c in text)


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def format_time(value: datetime | None, empty: str = "never") -> str:
    """A UTC timestamp to the second, or ``empty`` when there is none."""
    return empty if value is None else value.strftime("%Y-%m-%d %H:%M:%S UTC")


def key_info_json(info: KeyInfo, now: float) -> dict[str, Any]:
    """The JSON form of a record: everything but the digest, with its status at ``now``."""
    return {
        "key_id": info.key_id,
        "hint": info.hint,
        "prefix": info.prefix,
        "user_id": info.user_id,
        "scopes": list(info.scopes),
        "rate_limits": [str(r) for r in info.rate_limits],
        "quota": None if info.quota is None else str(info.quota),
        "metadata": info.metadata,
        "created_at": _iso(info.created_at),
        "expires_at": _iso(info.expires_at),
        "revoked_at": _iso(info.revoked_at),
        "last_used_at": _iso(info.last_used_at),
        "status": info.status(now),
        "hash_scheme": info.hash_scheme,
    }


def print_json(value: Any) -> None:
    """Print ``value`` as indented JSON, keeping non-ASCII text readable."""
    print(json.dumps(value, indent=2, ensure_ascii=False))


def print_new_key(key: str) -> None:
    """Print a freshly issued key, set apart, with the warning that it is shown only once."""
    print(f"\n    {key}\n")
    print(_SHOWN_ONCE)


def terminal_width() -> int:
    """The terminal's width, never under 80 columns (pipes and narrow windows get 80)."""
    return max(80, shutil.get_terminal_size((80, 24)).columns)


def _char_width(char: str) -> int:
    """Terminal columns of one character: 2 for East Asian wide/full-width, 0 for combining."""
    if unicodedata.combining(char) or unicodedata.category(char) in ("Mn", "Me"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def _display_width(text: str) -> int:
    """The number of terminal columns ``text`` takes (CJK and emoji count 2, accents 0)."""
    return sum(_char_width(c) for c in text)


def _cut(text: str, width: int) -> str:
    """The longest start of ``text`` that fits in ``width`` columns."""
    used = 0
    for i, char in enumerate(text):
        used += _char_width(char)
        if used > width:
            return text[:i]
    return text


def _fit_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    width: int,
    shrink: Sequence[tuple[Sequence[int], int]],
    keep_tail: Sequence[int] = (),
) -> list[str]:
    """Align ``rows`` under ``headers`` within ``width`` columns.

    Gaps narrow from two spaces to one; then each ``(columns, floor)`` stage of ``shrink``
    in turn cuts its widest column by one, down to ``floor``, until the table fits. Cut
    text ends in ``…``, or keeps its last 4 characters for ``keep_tail`` columns (hints).
    """
    widths = [
        max(_display_width(h), *(_display_width(r[i]) for r in rows))
        for i, h in enumerate(headers)
    ]
    gap = 2 if sum(widths) + 2 * (len(widths) - 1) <= width else 1
    for columns, floor in shrink:
        while sum(widths) + gap * (len(widths) - 1) > width:
            wide = [i for i in columns if widths[i] > max(floor, _display_width(headers[i]))]
            if not wide:
                break
            widths[max(wide, key=lambda i: widths[i])] -= 1

    def cell(i: int, text: str) -> str:
        size = widths[i]
        if _display_width(text) > size:
            tail = text[-4:] if i in keep_tail else ""
            if _display_width(tail) >= size:
                tail = ""
            text = _cut(text, size - 1 - _display_width(tail)) + "…" + tail
        # Pad by columns, not characters, so wide characters do not push the next column.
        return text + " " * (size - _display_width(text))

    return [
        (" " * gap).join(cell(i, text) for i, text in enumerate(row)).rstrip()
        for row in (headers, *rows)
    ]


def key_table(keys: Sequence[KeyInfo], now: float, width: int) -> list[str]:
    """The lines of the ``list`` table: one row per key, cut to fit ``width`` columns.

    Users and scopes shrink first, then hints, which keep their last 4 characters.
    """
    headers = ("KEY_ID", "HINT", "USER", "SCOPES", "CREATED", "EXPIRES", "LAST USED", "STATUS")
    rows = [
        (
            k.key_id,
            printable(k.hint),
            printable(k.user_id),
            printable(",".join(k.scopes)) or "-",
            k.created_at.strftime("%Y-%m-%d"),
            relative_time(k.expires_at, now),
            relative_time(k.last_used_at, now),
            k.status(now),
        )
        for k in keys
    ]
    return _fit_table(headers, rows, width, shrink=[((2, 3), 6), ((1,), 8)], keep_tail=(1,))


def print_scan_report(report: ScanReport, rows: list[dict[str, Any]], *, store_used: bool) -> None:
    """Print one line per finding and a summary."""
    for row in rows:
        known = f" ({row['key_id']})" if row["key_id"] else ""
        print(f"{printable(row['path'])}:{row['line']}: {row['hint']} {row['status']}{known}")
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    skipped: dict[str, int] = {}
    for s in report.skipped:
        reason = s.reason.partition(":")[0]
        skipped[reason] = skipped.get(reason, 0) + 1
    summary = f"Scanned {report.files_scanned} file(s)"
    if skipped:
        summary += " (skipped " + ", ".join(f"{n} {r}" for r, n in sorted(skipped.items())) + ")"
    if rows:
        summary += f": {len(rows)} finding(s): " + ", ".join(
            f"{n} {s}" for s, n in sorted(counts.items())
        )
    else:
        summary += ": no keys found"
    if report.rejected:
        unknown = " unknown to the store" if store_used else ""
        summary += f"; {report.rejected} checksum-invalid string(s){unknown} ignored"
    print(summary + ".")
    if "unchecked" in counts and not store_used:
        print("No key store was consulted, so every key found counts as possibly live.")


def print_revocations(revoked: list[str], live: dict[str, KeyInfo]) -> None:
    """Print what a scan revoked, and which of the live keys it found are still live."""
    for key_id in revoked:
        print(f"Revoked {key_id} ({live[key_id].hint}).")
    left = [k for k in live if k not in revoked]
    if left:
        print(f"Still live: {', '.join(left)}. Revoke with 'keyguard revoke KEY_ID'.")


def redact(text: str) -> str:
    """Mask every word of ``text`` that holds 32 lowercase hex, as a key would."""
    return _WORD.sub(lambda m: mask_key(m[0]) if _KEY_BODY.search(m[0]) else m[0], text)


def print_error(message: str) -> None:
    """Print ``message`` as the one ``keyguard: error:`` line on stderr, keys masked."""
    # Argparse and library messages quote the offending argument, which may be a key.
    print(f"keyguard: error: {redact(' '.join(message.split()))}", file=sys.stderr)
