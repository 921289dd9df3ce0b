"""The ``import`` command: bring another system's stored keys into the key store.

``keyguard import --from drf-api-key --database DB`` runs
:func:`keyguard.imports.import_drf_api_keys` and prints what became of each row: its drf
prefix, result, key_id and status, or why it was skipped. It never prints a key or a hash
(it has no key, and hashes stay in the stores). Exit 1 if a row was skipped, so a script
notices; 2 if the database or table cannot be read.
"""

from __future__ import annotations

from collections.abc import Callable

from ..imports import ImportReport, Row, import_drf_api_keys
from ..manager import APIKeyManager
from ..stores.memory import MemoryStore
from ._output import print_json, printable
from ._session import EXIT_INVALID, EXIT_OK, EXIT_USAGE, CLIError, Session

__all__ = ["cmd_import"]

_HEADERS = ("PREFIX", "RESULT", "KEY_ID", "STATUS", "REASON")


def _owner_column(column: str) -> Callable[[Row], str]:
    """A ``user_id`` function reading ``column`` of each row (an organization's id, say)."""

    def owner(row: Row) -> str:
        if column not in row:
            raise LookupError(f"the table has no column {column!r}")
        value = row[column]
        if value is None or value == "":
            raise ValueError(f"its {column} is empty")
        return str(value)

    return owner


def cmd_import(session: Session) -> int:
    args = session.args
    user_id: str | Callable[[Row], str] | None = args.user_id
    if args.user_column is not None:
        user_id = _owner_column(args.user_column)
    if args.dry_run and session.missing_sqlite_file() is not None:
        # A dry run writes nothing, not even a new store file: it imports into nothing.
        manager = APIKeyManager(MemoryStore(), last_used_resolution=None, record_usage=False)
    else:
        manager = session.manager(create=not args.dry_run)
    try:
        report = import_drf_api_keys(
            manager, args.database, user_id=user_id, table=args.table, dry_run=args.dry_run
        )
    except (ValueError, TypeError) as e:
        raise CLIError(str(e), EXIT_USAGE) from None
    if args.json:
        print_json(_report_json(report))
    else:
        for line in _report_lines(report):
            print(line)
    return EXIT_INVALID if report.skipped else EXIT_OK


def _report_json(report: ImportReport) -> dict[str, object]:
    return {
        "source": report.source,
        "table": report.table,
        "dry_run": report.dry_run,
        "imported": len(report.imported),
        "present": len(report.present),
        "revoked": len(report.revoked),
        "skipped": len(report.skipped),
        "rows": [
            {
                "prefix": row.prefix,
                "result": row.result,
                "key_id": row.key_id,
                "status": row.status,
                "reason": row.reason or None,
            }
            for row in report.rows
        ],
    }


def _report_lines(report: ImportReport) -> list[str]:
    """A header, a table of rows (the reason last, never cut) and a summary line."""
    where = f"table {report.table}" if report.table else "rows"
    head = "Dry run, nothing written: " if report.dry_run else ""
    lines = [f"{head}{report.source} {where}: {len(report.rows)} rows."]
    table = [
        (row.prefix, row.result, row.key_id or "-", row.status or "-", printable(row.reason))
        for row in report.rows
    ]
    if table:
        widths = [max(len(cells[i]) for cells in [_HEADERS, *table]) for i in range(4)]
        for cells in [_HEADERS, *table]:
            padded = (cell.ljust(width) for cell, width in zip(cells[:4], widths, strict=True))
            fixed = "  ".join(padded)
            lines.append(f"{fixed}  {cells[4]}".rstrip())
    lines.append(report.summary() + ".")
    return lines
