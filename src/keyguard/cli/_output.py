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
from collections.abc import Iterable, Iterator, Sequence
from datetime import datetime
from typing import Any, TypeVar

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
    "print_json_list",
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
_NON_ASCII = re.compile(r"[^\x00-\x7f]")
# Made once: json.dumps builds an encoder per call, a cost paid per key in a listing.
_JSON = json.JSONEncoder(indent=2, ensure_ascii=False)


def printable(text: str) -> str:
    """Neutralise control characters so stored data cannot rewrite the operator's terminal."""
    if text.isprintable():  # nearly always, and checked in C
        return text
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
    print(_JSON.encode(value))


def print_json_list(name: str, items: Iterable[Any]) -> None:
    """Print ``{name: [*items]}`` as :func:`print_json` would, one item at a time.

    The output is the same text, but only one item is held at once, so a listing of a
    million keys needs no more memory than a listing of ten.
    """
    print("{\n  " + json.dumps(name) + ": [", end="")
    separator = "\n"
    for item in items:
        print(separator + "    " + _JSON.encode(item).replace("\n", "\n    "), end="")
        separator = ",\n"
    print("\n  ]\n}" if separator == ",\n" else "]\n}")


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
    # Every ASCII character left after printable() takes one column: only the rest (the
    # "…" of each hint, mostly) is looked up, which keeps a million-row table quick.
    if text.isascii():
        return len(text)
    others = _NON_ASCII.findall(text)
    return len(text) - len(others) + sum(_char_width(c) for c in others)


def _cut(text: str, width: int) -> str:
    """The longest start of ``text`` that fits in ``width`` columns."""
    used = 0
    for i, char in enumerate(text):
        used += _char_width(char)
        if used > width:
            return text[:i]
    return text


class _Columns:
    """Column widths fitted to ``width`` terminal columns, and the rows laid out in them.

    Gaps narrow from two spaces to one; then each ``(columns, floor)`` stage of ``shrink``
    in turn cuts its widest column by one, down to ``floor``, until the rows fit. A column
    is never narrower than its ``minimum``. Cut text ends in ``…``, or keeps its last 4
    characters for ``keep_tail`` columns (hints).
    """

    def __init__(
        self,
        headers: Sequence[str],
        rows: Sequence[Sequence[str]],
        width: int,
        *,
        shrink: Sequence[tuple[Sequence[int], int]],
        minimum: Sequence[int],
        keep_tail: Sequence[int] = (),
    ) -> None:
        widths = [
            max(_display_width(h), least, *(_display_width(r[i]) for r in rows))
            for i, (h, least) in enumerate(zip(headers, minimum, strict=True))
        ]
        gap = 2 if sum(widths) + 2 * (len(widths) - 1) <= width else 1
        for columns, floor in shrink:
            while sum(widths) + gap * (len(widths) - 1) > width:
                wide = [i for i in columns if widths[i] > max(floor, _display_width(headers[i]))]
                if not wide:
                    break
                widths[max(wide, key=lambda i: widths[i])] -= 1
        self.widths = widths
        self.gap = " " * gap
        self.keep_tail = keep_tail

    def _cell(self, i: int, text: str) -> str:
        size = self.widths[i]
        used = _display_width(text)
        if used > size:
            tail = text[-4:] if i in self.keep_tail else ""
            if _display_width(tail) >= size:
                tail = ""
            text = _cut(text, size - 1 - _display_width(tail)) + "…" + tail
            used = _display_width(text)
        # Pad by columns, not characters, so wide characters do not push the next column.
        return text + " " * (size - used)

    def line(self, row: Sequence[str]) -> str:
        return self.gap.join(self._cell(i, text) for i, text in enumerate(row)).rstrip()


_T = TypeVar("_T")
_KEY_HEADERS = ("KEY_ID", "HINT", "USER", "SCOPES", "CREATED", "EXPIRES", "LAST USED", "STATUS")
#: The LIMITS column (after SCOPES) is shown from this width on; narrower, ``show`` has it.
LIMITS_WIDTH = 100
# Times and status never need cutting: "in 6975y", "729d ago" and "revoked" always fit.
_KEY_MINIMUM = (0, 0, 0, 0, 0, 8, 9, 7)


def limits_cell(info: KeyInfo) -> str:
    """A key's rate limits and quota in one cell: ``10/second,1000/hour quota=500``."""
    parts = [",".join(r.text for r in info.rate_limits)] if info.rate_limits else []
    if info.quota is not None:
        parts.append(f"quota={info.quota}")
    return " ".join(parts) or "-"


def _with_limits(row: tuple[_T, ...], cell: _T) -> tuple[_T, ...]:
    """``row`` with the LIMITS cell after SCOPES."""
    return (*row[:4], cell, *row[4:])


def _key_row(k: KeyInfo, now: float) -> tuple[str, ...]:
    return (
        k.key_id,
        printable(k.hint),
        printable(k.user_id),
        printable(",".join(k.scopes)) or "-",
        k.created_at.strftime("%Y-%m-%d"),
        relative_time(k.expires_at, now),
        relative_time(k.last_used_at, now),
        k.status(now),
    )


def key_table(pages: Iterable[Sequence[KeyInfo]], now: float, width: int) -> Iterator[str]:
    """The lines of the ``list`` table: one row per key, cut to fit ``width`` columns.

    The columns are sized by the first page, so the table streams: later pages keep those
    widths and cut what is longer. Users and scopes shrink first, then hints, which keep
    their last 4 characters. From :data:`LIMITS_WIDTH` columns on, a LIMITS column shows
    each key's rate limits and quota.
    """
    limits = width >= LIMITS_WIDTH
    headers = _with_limits(_KEY_HEADERS, "LIMITS") if limits else _KEY_HEADERS
    minimum = _with_limits(_KEY_MINIMUM, 0) if limits else _KEY_MINIMUM
    shrink = [((2, 3, 4) if limits else (2, 3), 6), ((1,), 8)]
    columns: _Columns | None = None
    for page in pages:
        rows = [
            _with_limits(_key_row(k, now), limits_cell(k)) if limits else _key_row(k, now)
            for k in page
        ]
        if columns is None:
            columns = _Columns(
                headers, rows, width, shrink=shrink, minimum=minimum, keep_tail=(1,)
            )
            yield columns.line(headers)
        for row in rows:
            yield columns.line(row)


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
