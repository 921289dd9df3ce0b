"""Read another application's table through the DB-API, for :mod:`keyguard.imports`.

A SQLite file is opened read-only (a mistyped path is an error, never a new empty file), a
``postgresql://`` URL with psycopg, and an open connection is used as it is. Rows come as
dicts of column name to value, a batch at a time. Every failure to read is a
``ValueError`` whose message masks passwords.
"""

from __future__ import annotations

import os
import re
import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol, runtime_checkable
from urllib.parse import quote, unquote, urlsplit

from .stores._redact import redact_url

__all__ = ["Connection", "quote_table", "read_rows"]

_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?")
_BATCH = 500


@runtime_checkable
class Connection(Protocol):
    """An open DB-API 2 connection (``sqlite3``, ``psycopg``): only ``cursor()`` is used."""

    def cursor(self) -> Any: ...


def quote_table(table: str) -> str:
    """``table`` (or ``schema.table``) quoted for SQL; only plain identifiers are accepted."""
    if not isinstance(table, str) or _TABLE.fullmatch(table) is None:
        raise ValueError(f"invalid table name {table!r}: use name or schema.name")
    return ".".join(f'"{part}"' for part in table.split("."))


@contextmanager
def read_rows(
    source: object, table: str, columns: Sequence[str], order: Sequence[str] = ()
) -> Iterator[Iterable[object]]:
    """The rows of ``table`` in ``source`` (a file or URL opened and closed here, or a
    connection), which must have ``columns``, sorted by the columns ``order`` names; or
    ``source`` itself if it is rows already."""
    quoted = quote_table(table)
    if isinstance(source, (str, os.PathLike)):
        connection, shown = _connect(os.fspath(source))
        try:
            yield _select(connection, quoted, f"table {quoted} of {shown}", columns, order)
        finally:
            connection.close()
    elif isinstance(source, Connection):
        yield _select(source, quoted, f"table {quoted}", columns, order)
    elif isinstance(source, Iterable) and not isinstance(source, (bytes, Mapping)):
        yield source
    else:
        raise TypeError(
            "source must be a SQLite path, a postgresql:// URL, a DB-API connection or rows,"
            f" not {type(source).__name__}"
        )


def _connect(text: str) -> tuple[Any, str]:
    """Open a SQLite file read-only (never creating one), or a PostgreSQL URL."""
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme in ("postgres", "postgresql"):
        shown = redact_url(text)
        try:
            import psycopg
        except ImportError:
            raise ValueError(
                "reading PostgreSQL needs psycopg: pip install 'keyguard[postgres]'"
            ) from None
        try:
            return psycopg.connect(text, autocommit=True), shown
        except psycopg.Error as e:
            raise ValueError(f"cannot connect to {shown}: {redact_url(str(e))}") from e
    path = unquote(parts.path[1:]) if scheme == "sqlite" else text
    if not os.path.isfile(path):
        raise ValueError(f"no SQLite database at {path!r}")
    uri = f"file:{quote(os.path.abspath(path))}?mode=ro"
    return sqlite3.connect(uri, uri=True), path


def _select(
    connection: Any, quoted: str, shown: str, columns: Sequence[str], order: Sequence[str]
) -> Iterator[dict[str, Any]]:
    """Every row of the table, read a batch at a time; a missing column fails at once.

    Only checked identifiers go into the statements, never a value.
    """
    cursor = connection.cursor()
    try:
        cursor.execute(f"SELECT * FROM {quoted} LIMIT 0")  # the columns, before any ORDER BY
        names = [str(column[0]) for column in cursor.description]
        missing = [name for name in columns if name not in names]
        if missing:
            raise ValueError(f"{shown} has no column {', '.join(missing)}")
        sort = ", ".join(quote_table(column) for column in order)
        cursor.execute(f"SELECT * FROM {quoted}" + (f" ORDER BY {sort}" if sort else ""))
    except ValueError:
        cursor.close()
        raise
    except Exception as e:  # each driver has its own Error class
        cursor.close()
        raise ValueError(f"cannot read {shown}: {redact_url(str(e))}") from e
    return _batches(cursor, names)


def _batches(cursor: Any, names: list[str]) -> Iterator[dict[str, Any]]:
    try:
        while batch := cursor.fetchmany(_BATCH):
            for values in batch:
                yield dict(zip(names, values, strict=True))
    finally:
        cursor.close()
