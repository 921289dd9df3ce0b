"""``SQLiteStore``: the embedded, persistent store for deployments on one machine.

Several processes (server workers, the CLI) share one file: WAL mode lets readers in other
processes see each commit at once, and every statement runs in autocommit so a key created
or revoked elsewhere is seen on the next check.

Keys live in ``keyguard_records``, laid out narrow (see :mod:`._sqlite_layout`); a file of
schema version 1 is upgraded to it when a process that may write opens it (see
:mod:`._sqlite_upgrade`).

Usage counts live in a ``keyguard_usage`` table made on the first write of counts: the table
is additive (the schema version is unchanged), so a file of an earlier keyguard opens as
before, and a store without the table reads as having no counts.

The module also holds what decides whether a file is a keyguard store at all (header,
schema, foreign files refused untouched) and the counter and usage tables that share the
file, so it runs over the house size: one file's schema is put together in one place (the
keys table's own columns are described where its rows are made, in the layout module).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sqlite3
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .._counting import Bucket, apply
from .._frozen import loads
from ..events import KeyEvent
from ..exceptions import StoreError
from ..records import KeyInfo
from ._fork import reset_after_fork
from ._sqlite_layout import (
    COLUMNS,
    INDEXES,
    TABLES,
    encode_record,
    locate,
    metadata_text,
    pack_metadata,
    row_id,
    time_us,
    unpack_metadata,
)
from ._sqlite_upgrade import upgrade_from_v1
from .base import UsageRow, page_size_checked, unchanged, unknown_cursor, usage_cutoffs

__all__ = ["SCHEMA_VERSION", "SQLiteStore"]

logger = logging.getLogger("keyguard")

#: Version 2 keeps keys in ``keyguard_records``; version 1 files are upgraded on open.
SCHEMA_VERSION = 2
_SQLITE_HEADER = b"SQLite format 3\x00"
# Rate-limit and quota counters (see keyguard._counting); added to version 1 files in place.
_COUNTERS_TABLE = """CREATE TABLE IF NOT EXISTS keyguard_counters (
    name TEXT PRIMARY KEY,
    value REAL NOT NULL,
    expires_at REAL
) WITHOUT ROWID"""
# Audit events, all kept; AUTOINCREMENT ids never repeat, so they order events of the same
# time by when they were added, in every process. Added to older files in place.
_EVENTS_TABLE = """CREATE TABLE IF NOT EXISTS keyguard_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    key_id TEXT NOT NULL,
    action TEXT NOT NULL,
    actor TEXT NOT NULL,
    changes TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS keyguard_events_key ON keyguard_events (key_id, at);
CREATE INDEX IF NOT EXISTS keyguard_events_at ON keyguard_events (at)"""
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS keyguard_meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
{TABLES};
{INDEXES};
{_COUNTERS_TABLE};
{_EVENTS_TABLE};
INSERT OR IGNORE INTO keyguard_meta (name, value) VALUES ('schema_version', '{SCHEMA_VERSION}');
"""
_SELECT = f"SELECT {COLUMNS} FROM keyguard_records"
_GET = f"{_SELECT} WHERE id = ?"
_GET_BY_ID = f"{_SELECT} WHERE key_id = ?"
_CREATED_AT = "SELECT created_at FROM keyguard_records WHERE key_id = ?"
_DIGESTS = "SELECT id, digest FROM keyguard_records ORDER BY id LIMIT ?"
_DIGESTS_AFTER = "SELECT id, digest FROM keyguard_records WHERE id > ? ORDER BY id LIMIT ?"
_ADD_EVENT = (
    "INSERT INTO keyguard_events (at, key_id, action, actor, changes) VALUES (?, ?, ?, ?, ?)"
)
_ADD = (
    f"INSERT INTO keyguard_records (id, {COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)"
    " ON CONFLICT DO NOTHING"
)
# Another process holding the write lock of a version 1 file is most likely upgrading it:
# worth waiting for, since the alternative is a worker that fails to start. Seconds.
_UPGRADE_WAIT = 600.0
_DECODE_CACHE = 4096
# Forgotten counters are deleted once per this many charges by a process, not on every call.
_SWEEP_EVERY = 4096
_USAGE_SCHEMA = """
CREATE TABLE IF NOT EXISTS keyguard_usage (
    key_id TEXT NOT NULL,
    step TEXT NOT NULL,
    start INTEGER NOT NULL,
    code TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (key_id, step, start, code)
) WITHOUT ROWID
"""
_ADD_USAGE = (
    "INSERT INTO keyguard_usage (key_id, step, start, code, count) VALUES (?, ?, ?, ?, ?)"
    " ON CONFLICT (key_id, step, start, code) DO UPDATE SET count = count + excluded.count"
)
_READ_USAGE = (
    "SELECT key_id, step, start, code, count FROM keyguard_usage"
    " WHERE key_id = ? AND step = ? AND start >= ? AND start < ? ORDER BY start, code"
)


def _ts(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _expired(expires_at: float | None, now: float) -> bool:
    return expires_at is not None and expires_at <= now


def _row_to_event(row: tuple[Any, ...]) -> KeyEvent:
    at, key_id, action, actor, changes = row
    try:
        return KeyEvent(
            at=datetime.fromtimestamp(at, timezone.utc),
            key_id=key_id,
            action=action,
            actor=actor,
            changes=loads(changes),
        )
    except (ValueError, TypeError, OverflowError) as e:
        raise StoreError(f"a stored event of {key_id!r} is damaged: {e}") from e


def _row_to_info(row: tuple[Any, ...], schemes: dict[int, str]) -> KeyInfo:
    """The record of a row of :data:`COLUMNS`; ``schemes`` names the hash schemes by id.

    Built with :meth:`KeyInfo.from_store`, like the other stores' records: the metadata is
    parsed and the datetimes built only when first read.
    """
    digest, key_id, scheme, prefix, hint, user, packed, created, expires, revoked, used = row
    try:
        return KeyInfo.from_store(
            digest=digest.hex() if type(digest) is bytes else digest,
            key_id=key_id,
            hash_scheme=schemes[scheme],
            prefix=hint.partition("…")[0] if prefix is None else prefix,
            hint=hint,
            user_id=user,
            metadata_json=unpack_metadata(packed, user),
            created_us=time_us(created),
            expires_us=None if expires is None else time_us(expires),
            revoked_us=None if revoked is None else time_us(revoked),
            used_us=None if used is None else time_us(used),
        )
    except (ValueError, TypeError, OverflowError, AttributeError, KeyError) as e:
        raise StoreError(f"the stored record of {key_id!r} is damaged: {e!r}") from e


class _Closer:
    """Closes a thread's connection when the thread ends (its thread-local slot dies)."""

    __slots__ = ("__weakref__", "conn")

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn: sqlite3.Connection | None = conn

    def close(self) -> None:
        conn, self.conn = self.conn, None
        if conn is not None:
            conn.close()

    __del__ = close


class SQLiteStore:
    """A key store in one SQLite file, created with mode 0600 if it does not exist.

    Each thread gets its own connection (sqlite3 connections are not shared across
    threads) and a forked child opens fresh ones. A file that is not a keyguard database
    (anything in its schema, or an ``application_id`` / ``user_version`` of its own), or
    is corrupt, raises :class:`~keyguard.StoreError` and is left untouched.

    :param create_schema: make a store of a missing or empty file; with False, only an
        existing keyguard store opens, and a missing or empty file is an error (nothing is
        created): what read-only tools want.

    A file of an earlier schema version is upgraded when it is opened (either way), in
    one transaction; a process that may not write it gets a ``StoreError`` saying so.
    """

    def __init__(
        self, path: str | os.PathLike[str], *, timeout: float = 5.0, create_schema: bool = True
    ) -> None:
        path = os.fspath(path)
        if path == ":memory:" or path.startswith("file:"):
            raise ValueError(
                "SQLiteStore needs a file path; use MemoryStore for an in-memory store"
            )
        self.path = Path(path)
        self._timeout = timeout
        self._local = threading.local()
        self._closers: weakref.WeakSet[_Closer] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._closed = False
        # An unchanged row decodes to the same KeyInfo, so a check of a hot key builds no
        # record; a row the cache misses pays for hashing it and for the bookkeeping.
        # Measured with bench_sqlite.py once the decode took about 2.4 µs: without the
        # cache a hot check took a fifth longer, a spread one a tenth less.
        # Hash scheme names by id and ids by name: that table only ever gains rows, so these
        # only ever gain entries (a decode in another thread never sees one go missing).
        self._schemes: dict[int, str] = {}
        self._scheme_ids: dict[str, int] = {}
        self._decode = functools.lru_cache(maxsize=_DECODE_CACHE)(
            functools.partial(_row_to_info, schemes=self._schemes)
        )
        self._prepare_file(create_schema)
        self._charges = 0
        self._check_and_migrate(create_schema)
        reset_after_fork(self, type(self)._forget)

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    def _prepare_file(self, create: bool) -> None:
        if not create:
            try:
                empty = os.path.getsize(self.path) == 0
            except OSError as e:
                raise StoreError(f"no SQLite key store at {str(self.path)!r}: {e}") from e
            if empty:
                raise StoreError(f"{str(self.path)!r} is an empty file, not a key store")
            self._check_header()
            return
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
        except FileExistsError:
            self._check_header()
        except OSError as e:
            raise StoreError(f"cannot create SQLite key store {str(self.path)!r}: {e}") from e
        else:
            os.close(fd)

    def _check_header(self) -> None:
        try:
            with open(self.path, "rb") as f:
                header = f.read(len(_SQLITE_HEADER))
        except OSError as e:
            raise StoreError(f"cannot open SQLite key store {str(self.path)!r}: {e}") from e
        if header and header != _SQLITE_HEADER:
            raise StoreError(
                f"{str(self.path)!r} is not a SQLite database; refusing to use it as a key store"
            )

    def _check_and_migrate(self, create: bool) -> None:
        conn = self._conn()
        try:
            # One read of the schema: another process may be creating it right now.
            schema = conn.execute("SELECT type, name FROM sqlite_master").fetchall()
            tables = {name for kind, name in schema if kind == "table"}
            # Views, indexes or triggers alone, or an application id or user version (which
            # keyguard never sets), also make a file another program's database.
            claimed = (
                schema
                or conn.execute("PRAGMA application_id").fetchone()[0]
                or conn.execute("PRAGMA user_version").fetchone()[0]
            )
            if claimed and "keyguard_meta" not in tables:
                raise StoreError(
                    f"{str(self.path)!r} is a SQLite database but not a keyguard key store"
                    " (no keyguard_meta table); refusing to modify it"
                )
            version = None
            if "keyguard_meta" in tables:
                row = conn.execute(
                    "SELECT value FROM keyguard_meta WHERE name = 'schema_version'"
                ).fetchone()
                version = int(row[0]) if row and str(row[0]).isdigit() else None
                if version is None or not 1 <= version <= SCHEMA_VERSION:
                    raise StoreError(
                        f"{str(self.path)!r} has keyguard schema version {row and row[0]!r};"
                        f" this keyguard supports up to {SCHEMA_VERSION}"
                    )
            current = version == SCHEMA_VERSION
            if current and self._journal_mode(conn) == "wal":
                if "keyguard_counters" not in tables and create:
                    self._add_counters_table(conn)
                if "keyguard_events" not in tables:
                    self._add_events_table(conn)
                return  # nothing else to write: a read-only store file stays readable
            if version is not None and version < SCHEMA_VERSION:
                self._upgrade(conn, version)
                return
            # WAL lets readers in other processes see commits at once, without blocking writers.
            self._enable_wal(conn)
            conn.execute("BEGIN IMMEDIATE")
            try:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.OperationalError as e:
            self.close()
            need = ""
            if "readonly" in str(e):
                # WAL keeps -wal and -shm files beside the database, even for readers.
                need = "; SQLite needs write access to the file and to its directory"
            raise StoreError(f"cannot open SQLite key store {str(self.path)!r}: {e}{need}") from e
        except sqlite3.DatabaseError as e:
            self.close()
            raise StoreError(
                f"{str(self.path)!r} is corrupt or not a keyguard key store: {e}"
            ) from e
        except BaseException:
            self.close()
            raise

    def _add_counters_table(self, conn: sqlite3.Connection) -> None:
        """Give a store made before counters existed their table, if the file is writable.

        A read-only file still opens: its keys are checked, and counting on it is an error.
        """
        try:
            conn.execute(_COUNTERS_TABLE)
        except sqlite3.OperationalError as e:
            if "readonly" not in str(e):
                raise

    @staticmethod
    def _add_events_table(conn: sqlite3.Connection) -> None:
        """Give a store made before events their table, if the file is writable.

        Done on every open (``create_schema=False`` too), so the CLI's first ``revoke`` on
        an older file is recorded. A read-only file still opens: it reads as having no
        events, and recording one is an error.
        """
        try:
            for statement in _EVENTS_TABLE.split(";"):
                conn.execute(statement)
        except sqlite3.OperationalError as e:
            if "readonly" not in str(e):
                raise

    def _upgrade(self, conn: sqlite3.Connection, version: int) -> None:
        """Bring a file of an earlier schema version to this one, in one transaction.

        An interrupted upgrade (a crash, a kill, an error) leaves the file as it was, and the
        next process to open it starts again. A process that may not write the file gets a
        ``StoreError`` saying so: it cannot read keys it does not know the layout of.
        """
        self._enable_wal(conn)
        wait = max(self._timeout, _UPGRADE_WAIT)
        conn.execute(f"PRAGMA busy_timeout = {int(wait * 1000)}")
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError as e:
            raise self._upgrade_error(version, e) from e
        finally:
            conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
        try:
            row = conn.execute(
                "SELECT value FROM keyguard_meta WHERE name = 'schema_version'"
            ).fetchone()
            upgrading = row != (str(SCHEMA_VERSION),)  # else another process just did it
            if upgrading:
                started = time.monotonic()
                upgrade_from_v1(conn, repr(str(self.path)))
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(
                    "UPDATE keyguard_meta SET value = ? WHERE name = 'schema_version'",
                    (str(SCHEMA_VERSION),),
                )
                logger.info(
                    "upgraded SQLite key store %r from schema version %d to %d in %.1f s",
                    str(self.path),
                    version,
                    SCHEMA_VERSION,
                    time.monotonic() - started,
                )
        except BaseException as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.OperationalError):
                raise self._upgrade_error(version, e) from e
            raise
        conn.execute("COMMIT")
        if upgrading:
            self._compact(conn)

    def _compact(self, conn: sqlite3.Connection) -> None:
        """Give the pages of the old table back to the file system, if nothing is in the way.

        The upgraded file is whole either way: a VACUUM that cannot run now (another
        process is writing, the disk is short of the room it needs) only leaves the file
        larger until ``VACUUM`` is run on it, and the free pages are reused by new keys.
        """
        try:
            conn.execute("VACUUM")
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as e:
            logger.warning(
                "upgraded SQLite key store %r but could not compact it (%s); run VACUUM on it"
                " to return the old table's space",
                str(self.path),
                e,
            )

    def _upgrade_error(self, version: int, e: sqlite3.OperationalError) -> StoreError:
        need = ""
        if "readonly" in str(e):
            need = "; open it once with write access to the file and its directory to upgrade it"
        return StoreError(
            f"cannot upgrade SQLite key store {str(self.path)!r} from schema version {version}"
            f" to {SCHEMA_VERSION}: {e}{need}"
        )

    @staticmethod
    def _journal_mode(conn: sqlite3.Connection) -> str:
        return str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        """Switch to WAL, waiting out other processes doing the same to a new file.

        The busy timeout does not cover a journal-mode change, so several workers opening a
        fresh file at once would otherwise fail with "database is locked".
        """
        deadline = time.monotonic() + self._timeout
        delay = 0.005
        while True:
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() + delay > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        if self._closed:
            raise StoreError(f"{self!r} is closed")
        conn = None
        try:
            conn = sqlite3.connect(
                self.path, timeout=self._timeout, isolation_level=None, check_same_thread=False
            )
            conn.execute("PRAGMA synchronous=NORMAL")
        except sqlite3.Error as e:
            # A corrupt file fails on the first statement: close the connection, or it leaks.
            if conn is not None:
                conn.close()
            raise StoreError(f"cannot open SQLite key store {str(self.path)!r}: {e}") from e
        closer = _Closer(conn)
        self._local.conn = conn
        self._local.closer = closer
        with self._lock:
            self._closers.add(closer)
        return conn

    def _forget(self) -> None:
        """Drop the parent's connections in a forked child, unclosed; it opens its own."""
        for closer in list(self._closers):
            closer.conn = None
        self._local = threading.local()
        self._closers = weakref.WeakSet()
        self._lock = threading.Lock()

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        try:
            return self._conn().execute(sql, params)
        except sqlite3.Error as e:
            raise StoreError(f"SQLite key store {str(self.path)!r}: {e}") from e

    def _scheme_id(self, name: str) -> int:
        scheme = self._scheme_ids.get(name)
        if scheme is None:
            self._execute(
                "INSERT INTO keyguard_hash_schemes (name) VALUES (?) ON CONFLICT DO NOTHING",
                (name,),
            )
            self._load_schemes()
            scheme = self._scheme_ids[name]
        return scheme

    def _load_schemes(self) -> None:
        rows = self._execute("SELECT id, name FROM keyguard_hash_schemes").fetchall()
        self._schemes.update(rows)
        self._scheme_ids.update((name, scheme) for scheme, name in rows)

    def add(self, info: KeyInfo) -> bool:
        row = encode_record(info, self._scheme_id(info.hash_scheme))
        return self._execute(_ADD, row).rowcount == 1

    def get(self, digest: str) -> KeyInfo | None:
        row = self._execute(_GET, (row_id(digest),)).fetchone()
        if row is None:
            return None
        if row[2] not in self._schemes:  # a scheme added since this process last looked
            self._load_schemes()
        info = self._decode(row)
        # Compared here rather than in SQL, so that a check of a key whose record is in the
        # decode cache turns no hex into bytes: the row found has another digest only if
        # two digests share their 64-bit id, which add() never lets happen.
        return info if info.digest == digest else None

    def get_by_id(self, key_id: str) -> KeyInfo | None:
        row = self._execute(_GET_BY_ID, (key_id,)).fetchone()
        if row is None:
            return None
        if row[2] not in self._schemes:
            self._load_schemes()
        return self._decode(row)

    def list_keys(
        self, user_id: str | None = None, *, limit: int | None = None, after: str | None = None
    ) -> list[KeyInfo]:
        where: list[str] = []
        params: list[Any] = []
        if user_id is not None:
            where.append("user_id = ?")
            params.append(user_id)
        if after is not None:
            # The cursor's own stored time, so no float makes a round trip through Python.
            row = self._execute(_CREATED_AT, (after,)).fetchone()
            if row is None:
                raise unknown_cursor(after)
            where.append("(created_at, key_id) > (?, ?)")
            params += [row[0], after]
        sql = _SELECT
        if where:
            sql += " WHERE " + " AND ".join(where)
        params.append(-1 if limit is None else limit)  # LIMIT -1: no limit
        rows = self._execute(f"{sql} ORDER BY created_at, key_id LIMIT ?", tuple(params))
        found = rows.fetchall()
        if any(row[2] not in self._schemes for row in found):
            self._load_schemes()
        return [_row_to_info(row, self._schemes) for row in found]

    def revoke(self, digest: str, at: datetime) -> bool:
        cursor = self._execute(
            "UPDATE keyguard_records SET revoked_at = ?"
            " WHERE id = ? AND digest = ? AND revoked_at IS NULL",
            (at.timestamp(), *locate(digest)),
        )
        return cursor.rowcount == 1

    def set_expiry(self, digest: str, expires_at: datetime | None) -> bool:
        cursor = self._execute(
            "UPDATE keyguard_records SET expires_at = ? WHERE id = ? AND digest = ?",
            (_ts(expires_at), *locate(digest)),
        )
        return cursor.rowcount == 1

    def update(self, info: KeyInfo, expected: KeyInfo) -> bool:
        """Compare and set in one write transaction: ``BEGIN IMMEDIATE`` takes the file's
        write lock before the record is read, so no other process changes it between.

        Metadata is packed against the row's own user_id (which update never changes), so
        it is stored whole if ``info`` names another.
        """
        text = metadata_text(info.metadata)
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                changed = unchanged(self.get(info.digest), expected)
                if changed:
                    conn.execute(
                        "UPDATE keyguard_records"
                        " SET metadata = CASE WHEN user_id = ? THEN ? ELSE ? END,"
                        " expires_at = ? WHERE id = ? AND digest = ?",
                        (
                            info.user_id,
                            pack_metadata(text, info.user_id),
                            text,
                            _ts(info.expires_at),
                            *locate(info.digest),
                        ),
                    )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as e:
            raise StoreError(f"SQLite key store {str(self.path)!r}: {e}") from e
        return changed

    def count_keys(self) -> int:
        return int(self._execute("SELECT count(*) FROM keyguard_records").fetchone()[0])

    def iter_digests(self, page_size: int = 10_000) -> Iterator[str]:
        """Pages in rowid order, each after the last rowid of the one before (keyset)."""
        page_size_checked(page_size)
        rows = self._execute(_DIGESTS, (page_size,)).fetchall()
        while True:
            for _, digest in rows:
                yield digest.hex() if isinstance(digest, bytes) else digest
            if len(rows) < page_size:
                return
            rows = self._execute(_DIGESTS_AFTER, (rows[-1][0], page_size)).fetchall()

    def touch(self, digest: str, at: datetime) -> None:
        """Record a use, but never wait for another process's write lock.

        The write is best effort and an async server makes it on its event loop, where
        waiting ``timeout`` seconds for a busy database would stall every request; a busy
        database just skips this write (the manager tries again a resolution later).
        """
        conn = self._conn()
        try:
            conn.execute("PRAGMA busy_timeout = 0")
            try:
                conn.execute(
                    "UPDATE keyguard_records SET last_used_at = ? WHERE id = ? AND digest = ?",
                    (at.timestamp(), *locate(digest)),
                )
            finally:
                conn.execute(f"PRAGMA busy_timeout = {int(self._timeout * 1000)}")
        except sqlite3.OperationalError as e:
            if "locked" not in str(e):  # SQLITE_BUSY / SQLITE_LOCKED; 3.10 has no error codes
                raise StoreError(f"SQLite key store {str(self.path)!r}: {e}") from e
        except sqlite3.Error as e:
            raise StoreError(f"SQLite key store {str(self.path)!r}: {e}") from e

    # -- counters ----------------------------------------------------------------------

    def consume(self, buckets: Sequence[Bucket], now: float) -> tuple[bool, list[float]]:
        """Charge the buckets in one write transaction, exact across every process.

        ``BEGIN IMMEDIATE`` takes the file's write lock before reading, so no other
        process can read the same values and charge them too.
        """
        with self._counting() as conn:
            found = self._counters(conn, [b.name for b in buckets])
            values = [
                0.0 if name not in found or _expired(found[name][1], now) else found[name][0]
                for name in (b.name for b in buckets)
            ]
            charged = apply(buckets, values, now)
            if charged is None:
                return False, values
            conn.executemany(
                "INSERT INTO keyguard_counters (name, value, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET"
                " value = excluded.value, expires_at = excluded.expires_at",
                [(b.name, v, forget) for b, (v, forget) in zip(buckets, charged, strict=True)],
            )
            self._charges += 1
            if self._charges % _SWEEP_EVERY == 0:
                conn.execute("DELETE FROM keyguard_counters WHERE expires_at <= ?", (now,))
            return True, [value for value, _ in charged]

    def adjust(self, bucket: Bucket, delta: float) -> float:
        with self._counting() as conn:
            # An upsert then a read, not RETURNING: that needs SQLite 3.35.
            conn.execute(
                "INSERT INTO keyguard_counters (name, value, expires_at) VALUES (?, ?, ?)"
                " ON CONFLICT (name) DO UPDATE SET"
                " value = value + excluded.value, expires_at = excluded.expires_at",
                (bucket.name, delta, bucket.expires_at),
            )
            return float(self._counters(conn, [bucket.name])[bucket.name][0])

    def peek(self, names: Sequence[str]) -> list[float]:
        try:
            found = self._counters(self._conn(), names)
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return [0.0] * len(names)  # a read-only store from before counters
            raise self._counter_error(e) from e
        except sqlite3.Error as e:
            raise self._counter_error(e) from e
        return [found[n][0] if n in found else 0.0 for n in names]

    @staticmethod
    def _counters(
        conn: sqlite3.Connection, names: Sequence[str]
    ) -> dict[str, tuple[float, float | None]]:
        """The stored ``(value, expires_at)`` of each named counter that has a row."""
        rows = conn.execute(
            "SELECT name, value, expires_at FROM keyguard_counters"
            f" WHERE name IN ({','.join('?' * len(names))})",
            tuple(names),
        )
        return {name: (value, expires) for name, value, expires in rows}

    @contextmanager
    def _counting(self) -> Iterator[sqlite3.Connection]:
        """A write transaction on the counters, committed at the end of the block."""
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as e:
            raise self._counter_error(e) from e
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException as e:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if isinstance(e, sqlite3.Error):
                raise self._counter_error(e) from e
            raise

    def _counter_error(self, e: sqlite3.Error) -> StoreError:
        if "no such table" in str(e):
            return StoreError(
                f"SQLite key store {str(self.path)!r} has no counters table: it was made by an"
                " older keyguard and opened read-only or with create_schema=False; open it"
                " once with write access to add the table"
            )
        return StoreError(f"SQLite key store {str(self.path)!r}: {e}")

    # -- usage counts ------------------------------------------------------------------

    def add_usage(self, rows: Sequence[UsageRow]) -> None:
        """Add the counts in one transaction, and forget buckets past their retention.

        The forgetting scans the table, so it runs once per hour of bucket time for all the
        processes sharing the file: the hour last done is kept in ``keyguard_meta``.
        """
        if not rows:
            return
        newest = max(row[2] for row in rows)
        conn = self._conn()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(_USAGE_SCHEMA)
                conn.executemany(_ADD_USAGE, rows)
                self._prune_usage(conn, newest)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            raise StoreError(
                f"SQLite key store {str(self.path)!r} could not record usage: {e}"
            ) from e

    @staticmethod
    def _prune_usage(conn: sqlite3.Connection, newest: int) -> None:
        row = conn.execute(
            "SELECT value FROM keyguard_meta WHERE name = 'usage_pruned_hour'"
        ).fetchone()
        hour = newest // 3600
        if row is not None and str(row[0]).isdigit() and int(row[0]) >= hour:
            return
        for step, cutoff in usage_cutoffs(newest).items():
            conn.execute("DELETE FROM keyguard_usage WHERE step = ? AND start < ?", (step, cutoff))
        conn.execute(
            "INSERT INTO keyguard_meta (name, value) VALUES ('usage_pruned_hour', ?)"
            " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            (str(hour),),
        )

    def read_usage(self, key_id: str, step: str, start: int, end: int) -> list[UsageRow]:
        try:
            rows = self._conn().execute(_READ_USAGE, (key_id, step, start, end)).fetchall()
        except sqlite3.OperationalError as e:
            if "no such table: keyguard_usage" in str(e):
                return []  # no counts written yet, or a store of an earlier version
            raise StoreError(f"SQLite key store {str(self.path)!r}: {e}") from e
        except sqlite3.Error as e:
            raise StoreError(f"SQLite key store {str(self.path)!r}: {e}") from e
        return [(k, s, int(b), c, int(n)) for k, s, b, c, n in rows]

    # -- audit events ------------------------------------------------------------------

    def add_event(self, event: KeyEvent) -> None:
        params = (
            event.at.timestamp(),
            event.key_id,
            event.action,
            event.actor,
            json.dumps(event.changes, separators=(",", ":"), ensure_ascii=False),
        )
        try:
            self._conn().execute(_ADD_EVENT, params)
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                raise StoreError(
                    f"SQLite key store {str(self.path)!r} has no events table: it was made by an"
                    " older keyguard and opened read-only or with create_schema=False; open it"
                    " once with write access to add the table"
                ) from e
            raise StoreError(f"SQLite key store {str(self.path)!r}: {e}") from e
        except sqlite3.Error as e:
            raise StoreError(f"SQLite key store {str(self.path)!r}: {e}") from e

    def read_events(
        self, key_id: str | None, since: datetime | None, limit: int
    ) -> list[KeyEvent]:
        where: list[str] = []
        params: list[Any] = []
        if key_id is not None:
            where.append("key_id = ?")
            params.append(key_id)
        if since is not None:
            where.append("at >= ?")
            params.append(since.timestamp())
        sql = "SELECT at, key_id, action, actor, changes FROM keyguard_events"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY at DESC, id DESC LIMIT ?"
        params.append(limit)
        try:
            rows = self._conn().execute(sql, tuple(params)).fetchall()
        except sqlite3.OperationalError as e:
            if "no such table: keyguard_events" in str(e):
                return []  # a read-only store of an earlier version
            raise StoreError(f"SQLite key store {str(self.path)!r}: {e}") from e
        except sqlite3.Error as e:
            raise StoreError(f"SQLite key store {str(self.path)!r}: {e}") from e
        return [_row_to_event(row) for row in rows]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            closers, self._closers = list(self._closers), weakref.WeakSet()
        for closer in closers:
            closer.close()
        self._local = threading.local()
        self._decode.cache_clear()
