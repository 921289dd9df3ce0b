"""``PostgresStore``: keys in a PostgreSQL table shared by every worker (psycopg 3 + pool).

The schema is created idempotently (``CREATE … IF NOT EXISTS`` under an advisory lock, so
workers starting together do not race) and never altered or dropped automatically:

- ``<schema>.<table>``: one row per key, ``digest`` primary key, ``key_id`` unique,
  metadata ``jsonb``, times ``timestamptz``, indexes on ``(user_id, created_at)`` and, for
  paging through every user's keys, ``(created_at, key_id)`` (added to older tables);
  ``metadata_json`` keeps the exact JSON text only for the rare metadata jsonb would alter
  (a NUL character, a float like ``1e300``);
- ``<schema>.<table>_meta``: a ``schema_version`` row;
- ``<schema>.<table>_counters``: rate-limit and quota counters (name, value, expires_at),
  charged by the function ``<table>_consume`` in one statement per request;
- ``<schema>.<table>_usage``: usage counts, primary key ``(key_id, step, start, code)``,
  made on the first write of counts (an additive table: the schema version is unchanged,
  so the tables of an earlier keyguard work as before);
- ``<schema>.<table>_events``: the audit events, all kept: an identity ``id`` (which orders
  events of the same time by when they were added), ``at`` timestamptz, ``key_id``,
  ``action``, ``actor`` and ``changes`` jsonb (``changes_json`` keeps the exact text, as
  ``metadata_json`` does), indexed on ``(key_id, at, id)`` and ``(at, id)``; additive too,
  and added on open to the tables of an earlier keyguard when ``create_schema`` allows;
- a trigger that sends ``NOTIFY`` with the digest whenever a row is added, deleted, revoked
  or given a new expiry, by keyguard or by hand, so caches elsewhere can drop it at once.

The module holds the sync store, its async twin and the SQL both run, for the keys, the
counters, the usage counts, the audit events and the digest listing, so it is longer than
most: splitting the twins or the tables apart would split one schema across files.

psycopg is imported only when a store is built (``pip install 'keyguard[postgres]'``).
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import math
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from .._counting import Bucket
from ..events import KeyEvent
from ..exceptions import StoreError
from ..records import KeyInfo
from ._aio import PerLoop
from ._fork import reset_after_fork
from ._listener import POLL_SECONDS, Heartbeat, Listener
from ._pgwait import bounded_classes
from ._redact import redact_url
from .base import UsageRow, page_size_checked, unchanged, unknown_cursor, usage_cutoffs

if TYPE_CHECKING:
    import psycopg_pool

__all__ = ["DEFAULT_SCHEMA", "DEFAULT_TABLE", "SCHEMA_VERSION", "PostgresStore"]

SCHEMA_VERSION = 1
DEFAULT_TABLE = "keyguard_keys"
DEFAULT_SCHEMA = "public"
# Lower case only: a quoted mixed-case name would need quoting in every hand-written query.
_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")
_MAX_TABLE = 48  # leaves room for the _meta, _counters_pkey, _created_idx, … suffixes in 63
_COLUMNS = (
    "digest",
    "key_id",
    "hash_scheme",
    "prefix",
    "hint",
    "user_id",
    "metadata",
    "created_at",
    "expires_at",
    "revoked_at",
    "last_used_at",
    "metadata_json",
)
# What a read of a record selects: its metadata as its exact JSON text, not as jsonb, which
# psycopg would parse into a dict on every read, and a dict cannot key the decode cache; its
# times as integer microseconds since the epoch, which KeyInfo.from_store takes (a check
# reads two floats from them and never the datetimes). extract() gives an exact numeric
# from PostgreSQL 14 on; before, a double, which still rounds to the right microsecond for
# every time up to 2106 (2**32 seconds).
_READ_COLUMNS = (
    '"digest", "key_id", "hash_scheme", "prefix", "hint", "user_id",'
    ' coalesce("metadata_json", "metadata"::text),'
    + ",".join(
        f' (extract(epoch FROM "{column}") * 1000000)::int8'
        for column in ("created_at", "expires_at", "revoked_at", "last_used_at")
    )
)
# Records decoded recently, keyed by their row: an unchanged record is one lookup.
_DECODE_CACHE = 4096
# keyguard._counting.apply and expiry, mirrored in one function call per request. Missing
# rows are inserted as placeholders (value 0, already expired), then every row is locked in
# name order, so two requests sharing buckets wait for each other and never deadlock. A
# sweep (once per 4096 calls of a store) deletes forgotten rows no one holds; a row it took
# between another call's insert and lock is inserted and locked again.
_CONSUME = """CREATE OR REPLACE FUNCTION {function}(
    names text[], intervals float8[], capacities float8[], forgets float8[], at float8,
    sweep boolean, OUT taken boolean, OUT vals float8[]
) LANGUAGE plpgsql AS $$
DECLARE
  wanted int := cardinality(ARRAY(SELECT DISTINCT unnest(names)));
  locked int;
  v float8;
  x float8;
  charged float8[] := ARRAY[]::float8[];
BEGIN
  LOOP
    INSERT INTO {counters} (name, value, expires_at)
      SELECT DISTINCT u, 0, at FROM unnest(names) u ORDER BY 1
      ON CONFLICT (name) DO NOTHING;
    PERFORM 1 FROM {counters} WHERE name = ANY(names) ORDER BY name FOR UPDATE;
    GET DIAGNOSTICS locked = ROW_COUNT;
    EXIT WHEN locked = wanted;
  END LOOP;
  taken := true;
  vals := ARRAY[]::float8[];
  FOR i IN 1 .. cardinality(names) LOOP
    SELECT c.value, c.expires_at INTO v, x FROM {counters} c WHERE c.name = names[i];
    IF x IS NOT NULL AND x <= at THEN
      v := 0;
    END IF;
    vals[i] := v;
    IF intervals[i] > 0 THEN
      charged[i] := greatest(v, at) + intervals[i];
      IF charged[i] - at > capacities[i] + 1e-6::float8 THEN
        taken := false;
      END IF;
    ELSE
      charged[i] := v + 1;
      IF charged[i] > capacities[i] THEN
        taken := false;
      END IF;
    END IF;
  END LOOP;
  IF taken THEN
    FOR i IN 1 .. cardinality(names) LOOP
      UPDATE {counters} SET value = charged[i],
        expires_at = CASE WHEN intervals[i] > 0 THEN charged[i] ELSE forgets[i] END
        WHERE name = names[i];
    END LOOP;
    vals := charged;
  END IF;
  IF sweep THEN
    DELETE FROM {counters} WHERE name IN (
      SELECT name FROM {counters} WHERE expires_at <= at AND name <> ALL(names)
      LIMIT 1000 FOR UPDATE SKIP LOCKED);
  END IF;
END $$"""
_CONSUME_ARGUMENTS = "(text[], float8[], float8[], float8[], float8, boolean)"
# Forgotten counters are deleted once per this many charges by a store, not on every call.
_SWEEP_EVERY = 4096
# Our own pools run in autocommit, so a read is one round trip. psycopg prepares a statement
# after prepare_threshold runs on a connection (its default, 5); the reads of one record,
# which every check is, ask to be prepared at their first run (see PostgresStore._one).
# prepare=False sets the threshold to None: nothing is prepared.
_CONNECTION_KWARGS: dict[str, Any] = {"autocommit": True}
_LISTEN_KWARGS: dict[str, Any] = {
    "autocommit": True,
    "keepalives": 1,
    "keepalives_idle": 10,
    "keepalives_interval": 5,
    "keepalives_count": 3,
}


def _import_psycopg() -> tuple[Any, Any]:
    try:
        import psycopg
        import psycopg.sql
        import psycopg.types.json
        import psycopg_pool
    except ImportError as e:
        raise ImportError(
            "PostgresStore needs psycopg 3 and psycopg_pool: pip install 'keyguard[postgres]'"
        ) from e
    return psycopg, psycopg_pool


def _identifier(kind: str, value: object, limit: int) -> str:
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value) or len(value) > limit:
        raise ValueError(
            f"PostgreSQL {kind} name must be 1-{limit} characters of lower-case letters,"
            f" digits and _, not starting with a digit; got {value!r}"
        )
    return value


def _jsonb_exact(value: Any) -> bool:
    """Whether jsonb gives ``value`` back unchanged.

    jsonb refuses NUL characters and reads a float written with an exponent (``1e300``)
    back as an integer.
    """
    if isinstance(value, str):
        return "\x00" not in value
    if isinstance(value, float):
        return "e" not in repr(value)
    if isinstance(value, dict):
        return all(_jsonb_exact(k) and _jsonb_exact(v) for k, v in value.items())
    if isinstance(value, list):
        return all(_jsonb_exact(v) for v in value)
    return True


def _without_nul(value: Any) -> Any:
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_without_nul(k): _without_nul(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_without_nul(v) for v in value]
    return value


def _row_to_info(row: tuple[Any, ...]) -> KeyInfo:
    """The record in a row of ``_READ_COLUMNS``."""
    digest, key_id, scheme, prefix, hint, user_id, metadata, created, expires, revoked, used = row
    return KeyInfo.from_store(
        digest=digest,
        key_id=key_id,
        hash_scheme=scheme,
        prefix=prefix,
        hint=hint,
        user_id=user_id,
        metadata_json=metadata,
        created_us=created,
        expires_us=expires,
        revoked_us=revoked,
        used_us=used,
    )


def _row_to_event(row: tuple[Any, ...]) -> KeyEvent:
    at, key_id, action, actor, changes, exact = row
    return KeyEvent(
        at=at,
        key_id=key_id,
        action=action,
        actor=actor,
        changes=changes if exact is None else json.loads(exact),
    )


class _UsageSQL(NamedTuple):
    create: bytes
    add: bytes
    read: bytes
    claim_prune: bytes
    prune: bytes


@dataclass
class _AsyncPool:
    pool: psycopg_pool.AsyncConnectionPool[Any]
    opening: asyncio.Task[None] | None
    #: Closes the pool when its loop shuts down (see :func:`_close_at_shutdown`).
    closer: asyncio.Task[None] | None = None


async def _close_at_shutdown(pool: psycopg_pool.AsyncConnectionPool[Any]) -> None:
    """Wait until cancelled, then close ``pool``.

    ``asyncio.run`` (and uvicorn) end by cancelling every task. psycopg_pool's workers catch
    that cancellation when it lands in a connection attempt (20 concurrent first checks
    make the pool grow), retry, and never end, so the shutdown hung. This task is cancelled
    with them and closes the pool, which stops its workers for good.
    """
    try:
        await asyncio.get_running_loop().create_future()
    finally:
        await pool.close()


class PostgresStore:
    """A key store in one PostgreSQL table, built from a DSN or from a pool the app has.

    :param dsn: ``postgresql://user[:password]@host:5432/db[?sslmode=…]``.
    :param pool: an existing ``psycopg_pool.ConnectionPool`` (not closed by :meth:`close`);
        give its connections ``autocommit=True`` for one round trip per check.
    :param async_pool: an existing ``AsyncConnectionPool`` for the async methods; by
        default one is made from ``dsn`` (or ``pool``'s settings) per event loop.
    :param table: table name (lower-case identifier); ``<table>_meta`` sits beside it.
    :param schema: PostgreSQL schema holding the tables, created if missing.
    :param min_size: connections each pool keeps open.
    :param max_size: connections each pool opens at most.
    :param timeout: seconds any store call may wait: to connect, for a free connection, and
        for each answer from the server; past it the call raises :class:`StoreError` (a 503
        for the middleware) and a connection that ran out is closed, not reused.
    :param create_schema: create missing tables, index and trigger; with False a missing
        table is a :class:`StoreError` (for roles without DDL rights).
    :param prepare: use server-side prepared statements: a read of one record (a check's)
        is prepared on each connection at its first run, other statements after psycopg's
        ``prepare_threshold`` (5) runs. Set False for PgBouncer in transaction or statement
        mode before 1.21, or with its ``max_prepared_statements`` at 0 (the default before
        1.24). A pool passed in keeps its own ``prepare_threshold`` (None prepares nothing):
        set that instead of ``prepare=False``.
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        pool: psycopg_pool.ConnectionPool[Any] | None = None,
        async_pool: psycopg_pool.AsyncConnectionPool[Any] | None = None,
        table: str = DEFAULT_TABLE,
        schema: str = DEFAULT_SCHEMA,
        min_size: int = 1,
        max_size: int = 10,
        timeout: float = 5.0,
        create_schema: bool = True,
        prepare: bool = True,
    ) -> None:
        if (dsn is None) == (pool is None):
            raise TypeError("give PostgresStore either a dsn or a pool, not both or neither")
        if not isinstance(prepare, bool):
            raise TypeError(f"prepare must be True or False, not {prepare!r}")
        if not prepare and (pool is not None or async_pool is not None):
            raise TypeError(
                "prepare=False applies to the pools the store opens; give your pool"
                " kwargs={'prepare_threshold': None} instead"
            )
        self.table = _identifier("table", table, _MAX_TABLE)
        self.schema = _identifier("schema", schema, 63)
        if not 1 <= min_size <= max_size:
            raise ValueError(f"need 1 <= min_size <= max_size, got {min_size}, {max_size}")
        self._psycopg, self._pool_module = _import_psycopg()
        psycopg = self._psycopg
        if dsn is not None:
            try:
                psycopg.conninfo.conninfo_to_dict(dsn)
            except psycopg.Error as e:
                # libpq may quote the whole DSN, password included, in its message.
                reason = redact_url(str(e).strip())
                raise ValueError(f"invalid PostgreSQL DSN {redact_url(dsn)!r}: {reason}") from None
            self._conninfo: str = dsn
            self._kwargs: dict[str, Any] = dict(_CONNECTION_KWARGS)
            if not prepare:
                self._kwargs["prepare_threshold"] = None
        else:
            assert pool is not None
            # A pool may compute its settings per connection; take them as they are now.
            conninfo, kwargs = pool.conninfo, pool.kwargs
            self._conninfo = conninfo() if callable(conninfo) else conninfo
            self._kwargs = dict((kwargs() if callable(kwargs) else kwargs) or {})
        self._sizes = (min_size, max_size)
        self._timeout = timeout
        self._prepare = prepare
        self._decode = functools.lru_cache(maxsize=_DECODE_CACHE)(_row_to_info)
        self._owns_pool = pool is None
        self._pool: psycopg_pool.ConnectionPool[Any] | None = pool
        self._orphans: list[object] = []
        self._given_async = async_pool
        self._async = PerLoop(self._new_async_pool, self._close_async_pool)
        self._lock = threading.Lock()
        self._closed = False
        self._charges = 0
        #: the NOTIFY channel this table's trigger signals on (an identifier, at most 63 bytes).
        self.channel = (
            "keyguard_" + hashlib.sha256(f"{self.schema}.{self.table}".encode()).hexdigest()[:20]
        )
        self._prepare_statements()
        try:
            self._setup(create_schema)
            if self._owns_pool:
                self._warm_pool()
        except BaseException:
            self.close()
            raise
        reset_after_fork(self, type(self)._forget)

    def __repr__(self) -> str:
        try:
            info = self._psycopg.conninfo.conninfo_to_dict(self._conninfo)
        except Exception:
            info = {}
        where = f"{info.get('host', '')}:{info.get('port', '')}/{info.get('dbname', '')}"
        return f"PostgresStore({where!r}, table='{self.schema}.{self.table}')"

    # -- statements and schema ---------------------------------------------------------

    def _prepare_statements(self) -> None:
        sql = self._psycopg.sql
        table = sql.Identifier(self.schema, self.table)
        columns = sql.SQL(", ").join(sql.Identifier(c) for c in _COLUMNS)
        select = sql.SQL("SELECT {} FROM {}").format(sql.SQL(_READ_COLUMNS), table)

        def render(query: Any) -> bytes:
            return bytes(query.as_bytes(None))

        self._q_get = render(sql.SQL("{} WHERE digest = %s").format(select))
        self._q_get_for_update = render(sql.SQL("{} WHERE digest = %s FOR UPDATE").format(select))
        self._q_get_by_id = render(sql.SQL("{} WHERE key_id = %s").format(select))
        # Keyset pages in (created_at, key_id) order; key_ids compare as bytes ("C"), as
        # they do in every other store. LIMIT NULL is no limit.
        page = sql.SQL('ORDER BY created_at, key_id COLLATE "C" LIMIT %s')
        after = sql.SQL('(created_at, key_id COLLATE "C") > (%s, %s)')
        self._q_list = {
            (False, False): render(sql.SQL("{} {}").format(select, page)),
            (False, True): render(sql.SQL("{} WHERE {} {}").format(select, after, page)),
            (True, False): render(sql.SQL("{} WHERE user_id = %s {}").format(select, page)),
            (True, True): render(
                sql.SQL("{} WHERE user_id = %s AND {} {}").format(select, after, page)
            ),
        }
        # The primary key's own collation, so each page is a range of its index.
        self._q_digests = render(
            sql.SQL("SELECT digest FROM {} ORDER BY digest LIMIT %s").format(table)
        )
        self._q_digests_after = render(
            sql.SQL("SELECT digest FROM {} WHERE digest > %s ORDER BY digest LIMIT %s").format(
                table
            )
        )
        self._q_count = render(sql.SQL("SELECT count(*) FROM {}").format(table))
        self._q_created_at = render(
            sql.SQL("SELECT created_at FROM {} WHERE key_id = %s").format(table)
        )
        self._q_add = render(
            sql.SQL("INSERT INTO {} ({}) VALUES ({}) ON CONFLICT DO NOTHING").format(
                table, columns, sql.SQL(", ").join(sql.Placeholder() for _ in _COLUMNS)
            )
        )
        self._q_revoke = render(
            sql.SQL(
                "UPDATE {} SET revoked_at = %s WHERE digest = %s AND revoked_at IS NULL"
            ).format(table)
        )
        # The trigger announces changes of revoked_at, expires_at and digest only (tables of
        # earlier versions have it so); an update announces itself, in the same statement.
        self._q_update = render(
            sql.SQL(
                "WITH changed AS (UPDATE {} SET metadata = %s, metadata_json = %s,"
                " expires_at = %s WHERE digest = %s RETURNING digest)"
                " SELECT pg_notify(%s, digest) FROM changed"
            ).format(table)
        )
        self._q_set_expiry = render(
            sql.SQL("UPDATE {} SET expires_at = %s WHERE digest = %s").format(table)
        )
        # GREATEST ignores NULL; it keeps a slow worker from moving last_used_at backwards.
        self._q_touch = render(
            sql.SQL(
                "UPDATE {} SET last_used_at = GREATEST(last_used_at, %s) WHERE digest = %s"
            ).format(table)
        )

        counters = sql.Identifier(self.schema, f"{self.table}_counters")
        self._q_consume = render(
            sql.SQL(
                "SELECT taken, vals FROM {}(%s::text[], %s::float8[], %s::float8[],"
                " %s::float8[], %s::float8, %s)"
            ).format(sql.Identifier(self.schema, f"{self.table}_consume"))
        )
        self._q_adjust = render(
            sql.SQL(
                "INSERT INTO {} AS c (name, value, expires_at) VALUES (%s, %s, %s)"
                " ON CONFLICT (name) DO UPDATE"
                " SET value = c.value + excluded.value, expires_at = excluded.expires_at"
                " RETURNING value"
            ).format(counters)
        )
        self._q_peek = render(
            sql.SQL("SELECT name, value FROM {} WHERE name = ANY(%s::text[])").format(counters)
        )

    def _setup(self, create_schema: bool) -> None:
        sql = self._psycopg.sql
        name = f"{self.schema}.{self.table}"
        meta = sql.Identifier(self.schema, f"{self.table}_meta")
        table = sql.Identifier(self.schema, self.table)
        function = sql.Identifier(self.schema, f"{self.table}_notify")
        try:
            with self._setup_connection() as conn, conn.transaction():
                # Workers starting together would otherwise race on CREATE TABLE IF NOT EXISTS.
                conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"keyguard:{name}",))
                state = conn.execute(
                    "SELECT to_regnamespace(%(s)s) IS NOT NULL,"
                    " to_regclass(%(t)s) IS NOT NULL, to_regclass(%(m)s) IS NOT NULL,"
                    " EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = %(g)s"
                    "   AND tgrelid = to_regclass(%(t)s)),"
                    " to_regclass(%(c)s) IS NOT NULL AND to_regprocedure(%(f)s) IS NOT NULL,"
                    " to_regclass(%(i)s) IS NOT NULL, to_regclass(%(e)s) IS NOT NULL",
                    {
                        "s": f'"{self.schema}"',
                        "t": f'"{self.schema}"."{self.table}"',
                        "m": f'"{self.schema}"."{self.table}_meta"',
                        "g": f"{self.table}_notify",
                        "c": f'"{self.schema}"."{self.table}_counters"',
                        "f": f'"{self.schema}"."{self.table}_consume"{_CONSUME_ARGUMENTS}',
                        "i": f'"{self.schema}"."{self.table}_created_idx"',
                        "e": f'"{self.schema}"."{self.table}_events"',
                    },
                ).fetchone()
                has_schema, has_table, has_meta, has_trigger, has_counters = state[:5]
                has_list_index, has_events = state[5:]
                version = None
                if has_meta:
                    row = conn.execute(
                        sql.SQL("SELECT value FROM {} WHERE name = 'schema_version'").format(meta)
                    ).fetchone()
                    version = row[0] if row else None
                elif has_table:
                    raise StoreError(
                        f"table {name!r} exists but is not a keyguard key store"
                        f" (no {self.table}_meta table); refusing to modify it"
                    )
                if version is not None and version != str(SCHEMA_VERSION):
                    raise StoreError(
                        f"{name!r} has keyguard schema version {version!r};"
                        f" this keyguard supports {SCHEMA_VERSION}"
                    )
                # A store made before counters opens for a role without DDL rights too: its
                # keys work, and counting raises a StoreError that says why.
                complete = has_table and version is not None and has_trigger
                if complete and (has_counters or not create_schema):
                    # A table made before keyset paging lists correctly without the index,
                    # only each page of every user's keys then sorts the whole table.
                    if not has_list_index and create_schema:
                        self._create_list_index(conn, table)
                    if not has_events and create_schema:
                        self._create_events(conn)
                    return
                if not create_schema:
                    raise StoreError(
                        f"keyguard tables in {self.schema!r} are missing or incomplete"
                        f" ({name!r}); create them with PostgresStore(..., create_schema=True)"
                    )
                if not has_schema:
                    conn.execute(
                        sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(
                            sql.Identifier(self.schema)
                        )
                    )
                self._create(conn, table, meta, function, has_trigger)
                self._create_counters(conn)
                self._create_events(conn)
        except self._psycopg.Error as e:
            raise StoreError(f"cannot prepare PostgreSQL key store {self!r}: {e}") from e

    def _create(self, conn: Any, table: Any, meta: Any, function: Any, has_trigger: bool) -> None:
        sql = self._psycopg.sql
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (name text PRIMARY KEY, value text NOT NULL)"
            ).format(meta)
        )
        conn.execute(
            sql.SQL(
                """CREATE TABLE IF NOT EXISTS {} (
                    digest text PRIMARY KEY,
                    key_id text NOT NULL UNIQUE,
                    hash_scheme text NOT NULL,
                    prefix text NOT NULL,
                    hint text NOT NULL,
                    user_id text NOT NULL,
                    metadata jsonb NOT NULL,
                    created_at timestamptz NOT NULL,
                    expires_at timestamptz,
                    revoked_at timestamptz,
                    last_used_at timestamptz,
                    metadata_json text,
                    seq bigint GENERATED ALWAYS AS IDENTITY
                )"""
            ).format(table)
        )
        conn.execute(
            sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} (user_id, created_at)").format(
                sql.Identifier(f"{self.table}_user_idx"), table
            )
        )
        self._create_list_index(conn, table)
        if not has_trigger:
            # CREATE OR REPLACE only our own function, and only while its trigger is absent.
            conn.execute(
                sql.SQL(
                    """CREATE OR REPLACE FUNCTION {}() RETURNS trigger LANGUAGE plpgsql AS $$
                    BEGIN
                      IF TG_OP = 'UPDATE'
                         AND NEW.revoked_at IS NOT DISTINCT FROM OLD.revoked_at
                         AND NEW.expires_at IS NOT DISTINCT FROM OLD.expires_at
                         AND NEW.digest = OLD.digest THEN
                        RETURN NULL;
                      END IF;
                      IF TG_OP = 'DELETE' THEN
                        PERFORM pg_notify({}, OLD.digest);
                      ELSE
                        PERFORM pg_notify({}, NEW.digest);
                      END IF;
                      RETURN NULL;
                    END $$"""
                ).format(function, sql.Literal(self.channel), sql.Literal(self.channel))
            )
            conn.execute(
                sql.SQL(
                    "CREATE TRIGGER {} AFTER INSERT OR DELETE OR UPDATE OF revoked_at,"
                    " expires_at, digest ON {} FOR EACH ROW EXECUTE FUNCTION {}()"
                ).format(sql.Identifier(f"{self.table}_notify"), table, function)
            )
        conn.execute(
            sql.SQL(
                "INSERT INTO {} (name, value) VALUES ('schema_version', %s)"
                " ON CONFLICT (name) DO NOTHING"
            ).format(meta),
            (str(SCHEMA_VERSION),),
        )

    def _create_counters(self, conn: Any) -> None:
        sql = self._psycopg.sql
        counters = sql.Identifier(self.schema, f"{self.table}_counters")
        conn.execute(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (name text PRIMARY KEY, value float8 NOT NULL,"
                " expires_at float8)"
            ).format(counters)
        )
        conn.execute(
            sql.SQL(_CONSUME).format(
                function=sql.Identifier(self.schema, f"{self.table}_consume"), counters=counters
            )
        )

    def _create_events(self, conn: Any) -> None:
        sql = self._psycopg.sql
        events = sql.Identifier(self.schema, f"{self.table}_events")
        conn.execute(
            sql.SQL(
                """CREATE TABLE IF NOT EXISTS {} (
                    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                    at timestamptz NOT NULL,
                    key_id text NOT NULL,
                    action text NOT NULL,
                    actor text NOT NULL,
                    changes jsonb NOT NULL,
                    changes_json text
                )"""
            ).format(events)
        )
        for suffix, columns in (("key", "key_id, at, id"), ("at", "at, id")):
            conn.execute(
                sql.SQL("CREATE INDEX IF NOT EXISTS {} ON {} ({})").format(
                    sql.Identifier(f"{self.table}_events_{suffix}_idx"), events, sql.SQL(columns)
                )
            )

    def _create_list_index(self, conn: Any, table: Any) -> None:
        sql = self._psycopg.sql
        conn.execute(
            sql.SQL('CREATE INDEX IF NOT EXISTS {} ON {} (created_at, key_id COLLATE "C")').format(
                sql.Identifier(f"{self.table}_created_idx"), table
            )
        )

    # -- connections -------------------------------------------------------------------

    def _sync_pool(self) -> psycopg_pool.ConnectionPool[Any]:
        pool = self._pool
        if pool is not None:
            return pool
        with self._lock:
            if self._closed:
                raise StoreError(f"{self!r} is closed")
            if self._pool is None:
                min_size, max_size = self._sizes
                self._pool = self._pool_module.ConnectionPool(
                    self._conninfo,
                    kwargs=self._connect_kwargs(),
                    min_size=min_size,
                    max_size=max_size,
                    timeout=self._timeout,
                    open=True,
                    name=f"keyguard-{self.table}",
                    connection_class=bounded_classes()[0],
                    configure=self._bound,
                )
            return self._pool

    def _connection(self) -> Any:
        return self._sync_pool().connection()

    def _warm_pool(self) -> None:
        """Open our pool now, so the first request does not pay for its connections."""
        try:
            self._sync_pool().wait(self._timeout)
        except self._pool_module.PoolTimeout as e:
            raise StoreError(f"cannot open PostgreSQL key store {self!r}: {e}") from e

    def _setup_connection(self) -> Any:
        """The connection that checks the schema: the given pool's, else one of its own.

        Our own pool would retry a refused connection until ``timeout`` (logging each try);
        a single connection fails at once, or within libpq's ``connect_timeout`` (default
        ``timeout``) against a server that does not answer.
        """
        if not self._owns_pool:
            return self._connection()
        conn = bounded_classes()[0].connect(self._conninfo, **self._connect_kwargs())
        self._bound(conn)
        return conn

    def _connect_kwargs(self) -> dict[str, Any]:
        """Connection settings, with libpq's ``connect_timeout`` (default ``timeout``)."""
        kwargs = dict(self._kwargs)
        if "connect_timeout" not in self._psycopg.conninfo.conninfo_to_dict(self._conninfo):
            kwargs.setdefault("connect_timeout", max(2, math.ceil(self._timeout)))
        return kwargs

    def _bound(self, conn: Any) -> None:
        """Give a new connection the store's deadline for every wait on the server."""
        conn.wait_timeout = self._timeout

    async def _abound(self, conn: Any) -> None:
        conn.wait_timeout = self._timeout

    def _forget(self) -> None:
        """In a forked child, leave the parent's pool alone (its sockets are the parent's)."""
        self._lock = threading.Lock()
        if self._owns_pool and self._pool is not None:
            self._orphans.append(self._pool)
            self._pool = None
        if self._given_async is None:
            self._async = PerLoop(self._new_async_pool, self._close_async_pool)

    def _fail(self, action: str, e: Exception) -> StoreError:
        return StoreError(f"PostgreSQL key store {self!r} could not {action}: {e}")

    def _metadata(self, metadata: Any) -> tuple[Any, str | None]:
        """The ``metadata`` and ``metadata_json`` column values of ``metadata``."""
        if _jsonb_exact(metadata):
            return self._psycopg.types.json.Jsonb(metadata), None
        # Keep the exact JSON beside a queryable approximation that jsonb accepts.
        return self._psycopg.types.json.Jsonb(_without_nul(metadata)), json.dumps(metadata)

    def _add_params(self, info: KeyInfo) -> tuple[Any, ...]:
        metadata, exact = self._metadata(info.metadata)
        return (
            info.digest,
            info.key_id,
            info.hash_scheme,
            info.prefix,
            info.hint,
            info.user_id,
            metadata,
            info.created_at,
            info.expires_at,
            info.revoked_at,
            info.last_used_at,
            exact,
        )

    # -- the sync contract -------------------------------------------------------------

    def _one(self, query: bytes, params: tuple[Any, ...], action: str) -> KeyInfo | None:
        """The record a read by digest or key_id finds. Unless ``prepare=False`` the read is
        prepared at its first run on each connection (one more round trip, once)."""
        try:
            with self._connection() as conn:
                row = conn.execute(query, params, prepare=self._prepare).fetchone()
        except self._psycopg.Error as e:
            raise self._fail(action, e) from e
        return None if row is None else self._decode(row)

    def _write(self, query: bytes, params: tuple[Any, ...], action: str) -> bool:
        try:
            with self._connection() as conn:
                return bool(conn.execute(query, params).rowcount == 1)
        except self._psycopg.Error as e:
            raise self._fail(action, e) from e

    def add(self, info: KeyInfo) -> bool:
        return self._write(self._q_add, self._add_params(info), "add a key")

    def get(self, digest: str) -> KeyInfo | None:
        return self._one(self._q_get, (digest,), "read a key")

    def get_by_id(self, key_id: str) -> KeyInfo | None:
        return self._one(self._q_get_by_id, (key_id,), "read a key")

    def count_keys(self) -> int:
        try:
            with self._connection() as conn:
                row = conn.execute(self._q_count).fetchone()
        except self._psycopg.Error as e:
            raise self._fail("count keys", e) from e
        return int(row[0])

    def iter_digests(self, page_size: int = 10_000) -> Iterator[str]:
        """Pages in digest order, each after the last digest of the one before (keyset)."""
        page_size_checked(page_size)
        query: bytes = self._q_digests
        params: tuple[Any, ...] = (page_size,)
        while True:
            try:
                with self._connection() as conn:
                    rows = conn.execute(query, params).fetchall()
            except self._psycopg.Error as e:
                raise self._fail("list digests", e) from e
            yield from (digest for (digest,) in rows)
            if len(rows) < page_size:
                return
            query, params = self._q_digests_after, (rows[-1][0], page_size)

    def _list_query(
        self, user_id: str | None, limit: int | None, after: str | None, created: Any
    ) -> tuple[bytes, tuple[Any, ...]]:
        """The page query and its parameters, given the cursor's ``created`` time."""
        params: tuple[Any, ...] = () if user_id is None else (user_id,)
        if after is not None:
            params += (created, after)
        return self._q_list[user_id is not None, after is not None], (*params, limit)

    def list_keys(
        self, user_id: str | None = None, *, limit: int | None = None, after: str | None = None
    ) -> list[KeyInfo]:
        try:
            with self._connection() as conn:
                created = None
                if after is not None:
                    row = conn.execute(self._q_created_at, (after,)).fetchone()
                    if row is None:
                        raise unknown_cursor(after)
                    created = row[0]
                query, params = self._list_query(user_id, limit, after, created)
                rows = conn.execute(query, params).fetchall()
        except self._psycopg.Error as e:
            raise self._fail("list keys", e) from e
        return [_row_to_info(row) for row in rows]

    def revoke(self, digest: str, at: datetime) -> bool:
        return self._write(self._q_revoke, (at, digest), "revoke a key")

    def set_expiry(self, digest: str, expires_at: datetime | None) -> bool:
        return self._write(self._q_set_expiry, (expires_at, digest), "change an expiry")

    def update(self, info: KeyInfo, expected: KeyInfo) -> bool:
        """Compare and set in one transaction: the row is read ``FOR UPDATE``, so no other
        writer changes it before the update (which announces itself) commits."""
        params = (*self._metadata(info.metadata), info.expires_at, info.digest, self.channel)
        try:
            with self._connection() as conn, conn.transaction():
                row = conn.execute(self._q_get_for_update, (info.digest,)).fetchone()
                if not unchanged(None if row is None else _row_to_info(row), expected):
                    return False
                conn.execute(self._q_update, params)
                return True
        except self._psycopg.Error as e:
            raise self._fail("update a key", e) from e

    def touch(self, digest: str, at: datetime) -> None:
        self._write(self._q_touch, (at, digest), "record a key's use")

    # -- counters ----------------------------------------------------------------------

    def consume(self, buckets: Sequence[Bucket], now: float) -> tuple[bool, list[float]]:
        try:
            with self._connection() as conn:
                row = conn.execute(self._q_consume, self._consume_params(buckets, now)).fetchone()
        except self._psycopg.Error as e:
            raise self._counter_fail("charge counters", e) from e
        return bool(row[0]), list(row[1])

    def adjust(self, bucket: Bucket, delta: float) -> float:
        params = (bucket.name, float(delta), bucket.expires_at)
        try:
            with self._connection() as conn:
                row = conn.execute(self._q_adjust, params).fetchone()
        except self._psycopg.Error as e:
            raise self._counter_fail("adjust a counter", e) from e
        return float(row[0])

    def peek(self, names: Sequence[str]) -> list[float]:
        try:
            with self._connection() as conn:
                found = dict(conn.execute(self._q_peek, (list(names),)).fetchall())
        except self._psycopg.Error as e:
            raise self._counter_fail("read counters", e) from e
        return [float(found.get(n, 0.0)) for n in names]

    def _consume_params(self, buckets: Sequence[Bucket], now: float) -> tuple[Any, ...]:
        self._charges += 1
        return (
            [b.name for b in buckets],
            [float(b.interval) for b in buckets],
            [float(b.capacity) for b in buckets],
            [None if b.expires_at is None else float(b.expires_at) for b in buckets],
            float(now),
            self._charges % _SWEEP_EVERY == 0,
        )

    def _counter_fail(self, action: str, e: Exception) -> StoreError:
        errors = self._psycopg.errors
        if isinstance(e, (errors.UndefinedTable, errors.UndefinedFunction)):
            return StoreError(
                f"PostgreSQL key store {self!r} has no counters: its tables were made by an"
                " older keyguard; open it once with create_schema=True (and DDL rights)"
                " to add them"
            )
        return self._fail(action, e)

    # -- usage counts ------------------------------------------------------------------

    #: The newest hour of buckets this process has forgotten the expired counts for.
    _usage_pruned_hour = -1

    @functools.cached_property
    def _usage_sql(self) -> _UsageSQL:
        sql = self._psycopg.sql
        usage = sql.Identifier(self.schema, f"{self.table}_usage")
        meta = sql.Identifier(self.schema, f"{self.table}_meta")

        def render(text: str, *args: Any) -> bytes:
            return bytes(sql.SQL(text).format(*args).as_bytes(None))

        return _UsageSQL(
            create=render(
                """CREATE TABLE IF NOT EXISTS {} (
                    key_id text NOT NULL,
                    step text NOT NULL,
                    start bigint NOT NULL,
                    code text NOT NULL,
                    count bigint NOT NULL,
                    PRIMARY KEY (key_id, step, start, code)
                )""",
                usage,
            ),
            add=render(
                "INSERT INTO {} AS u (key_id, step, start, code, count)"
                " SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::text[],"
                " %s::bigint[]) ON CONFLICT (key_id, step, start, code)"
                " DO UPDATE SET count = u.count + excluded.count",
                usage,
            ),
            read=render(
                "SELECT key_id, step, start, code, count FROM {}"
                " WHERE key_id = %s AND step = %s AND start >= %s AND start < %s"
                " ORDER BY start, code",
                usage,
            ),
            # One process per hour wins the claim and forgets the expired buckets.
            claim_prune=render(
                "INSERT INTO {} AS m (name, value) VALUES ('usage_pruned_hour', %s)"
                " ON CONFLICT (name) DO UPDATE SET value = excluded.value"
                " WHERE m.value::bigint < excluded.value::bigint RETURNING 1",
                meta,
            ),
            prune=render(
                "DELETE FROM {} WHERE (step = 'minute' AND start < %s)"
                " OR (step = 'hour' AND start < %s) OR (step = 'day' AND start < %s)",
                usage,
            ),
        )

    def add_usage(self, rows: Sequence[UsageRow]) -> None:
        """Add the counts with one statement; the table is made on the first write.

        Rows go in primary-key order, so workers adding to the same buckets at once take
        their row locks in the same order and cannot deadlock.
        """
        if not rows:
            return
        totals: dict[tuple[str, str, int, str], int] = {}
        for key_id, step, start, code, count in rows:
            bucket = (key_id, step, start, code)
            totals[bucket] = totals.get(bucket, 0) + count
        ordered = sorted(totals.items())
        params = (
            [b[0] for b, _ in ordered],
            [b[1] for b, _ in ordered],
            [b[2] for b, _ in ordered],
            [b[3] for b, _ in ordered],
            [n for _, n in ordered],
        )
        statements = self._usage_sql
        try:
            with self._connection() as conn:
                try:
                    conn.execute(statements.add, params)
                except self._psycopg.errors.UndefinedTable:
                    conn.rollback()  # a pool without autocommit is in a failed transaction
                    self._create_usage_table(conn)
                    conn.execute(statements.add, params)
                self._prune_usage(conn, max(b[2] for b in totals))
        except self._psycopg.Error as e:
            raise self._fail("record usage", e) from e

    def _create_usage_table(self, conn: Any) -> None:
        name = f"keyguard:{self.schema}.{self.table}"
        with conn.transaction():
            # Workers flushing their first counts together would race on CREATE TABLE.
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (name,))
            conn.execute(self._usage_sql.create)

    def _prune_usage(self, conn: Any, newest: int) -> None:
        hour = newest // 3600
        if hour <= self._usage_pruned_hour:
            return
        self._usage_pruned_hour = hour
        if conn.execute(self._usage_sql.claim_prune, (str(hour),)).fetchone() is None:
            return  # another process has done this hour
        cutoffs = usage_cutoffs(newest)
        conn.execute(self._usage_sql.prune, (cutoffs["minute"], cutoffs["hour"], cutoffs["day"]))

    def read_usage(self, key_id: str, step: str, start: int, end: int) -> list[UsageRow]:
        try:
            with self._connection() as conn:
                rows = conn.execute(self._usage_sql.read, (key_id, step, start, end)).fetchall()
        except self._psycopg.errors.UndefinedTable:
            return []  # no counts written yet, or tables of an earlier version
        except self._psycopg.Error as e:
            raise self._fail("read usage", e) from e
        return [(k, s, int(b), c, int(n)) for k, s, b, c, n in rows]

    # -- audit events ------------------------------------------------------------------

    @functools.cached_property
    def _events_sql(self) -> tuple[bytes, dict[tuple[bool, bool], bytes]]:
        """The insert, and the reads by (of one key, since a time)."""
        sql = self._psycopg.sql
        events = sql.Identifier(self.schema, f"{self.table}_events")
        columns = "at, key_id, action, actor, changes, changes_json"
        add = sql.SQL(f"INSERT INTO {{}} ({columns}) VALUES (%s, %s, %s, %s, %s, %s)")
        select = sql.SQL(f"SELECT {columns} FROM {{}}").format(events)
        filters = {
            (False, False): "",
            (True, False): " WHERE key_id = %s",
            (False, True): " WHERE at >= %s",
            (True, True): " WHERE key_id = %s AND at >= %s",
        }
        reads = {
            shape: bytes(
                sql.SQL("{}{} ORDER BY at DESC, id DESC LIMIT %s")
                .format(select, sql.SQL(where))
                .as_bytes(None)
            )
            for shape, where in filters.items()
        }
        return bytes(add.format(events).as_bytes(None)), reads

    def add_event(self, event: KeyEvent) -> None:
        changes, exact = event.changes, None
        if not _jsonb_exact(changes):
            changes, exact = _without_nul(changes), json.dumps(changes)
        params = (
            event.at,
            event.key_id,
            event.action,
            event.actor,
            self._psycopg.types.json.Jsonb(changes),
            exact,
        )
        try:
            with self._connection() as conn:
                conn.execute(self._events_sql[0], params)
        except self._psycopg.errors.UndefinedTable as e:
            raise StoreError(
                f"PostgreSQL key store {self!r} has no events table: its tables were made by"
                " an older keyguard; open it once with create_schema=True (and DDL rights)"
                " to add it"
            ) from e
        except self._psycopg.Error as e:
            raise self._fail("record an event", e) from e

    def read_events(
        self, key_id: str | None, since: datetime | None, limit: int
    ) -> list[KeyEvent]:
        query = self._events_sql[1][key_id is not None, since is not None]
        params = (*(p for p in (key_id, since) if p is not None), limit)
        try:
            with self._connection() as conn:
                rows = conn.execute(query, params).fetchall()
        except self._psycopg.errors.UndefinedTable:
            return []  # tables of an earlier version, opened without create_schema
        except self._psycopg.Error as e:
            raise self._fail("read events", e) from e
        return [_row_to_event(row) for row in rows]

    def close(self) -> None:
        """Close the pools this store opened (a pool passed in stays open)."""
        self._async.close()
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None and self._owns_pool:
            pool.close()
        self._decode.cache_clear()

    # -- push invalidation -------------------------------------------------------------

    def subscribe_invalidations(self, callback: Callable[[str | None], None]) -> Listener:
        """LISTEN on this table's channel on a daemon thread (see ``InvalidationSource``)."""
        return Listener(f"keyguard-listener-postgres-{self.table}", self._listen, callback)

    def _listen(self, stop: threading.Event, emit: Callable[[str | None], None]) -> None:
        """One LISTEN session, until ``stop``: a ``SELECT 1`` now and then proves it alive.

        TCP keepalives (``_LISTEN_KWARGS``) notice a vanished peer within about 25 s, but
        only the nearest one: a proxy or pooler in between, or a hung server, keeps them
        answered while no notification ever comes. So the session also runs ``SELECT 1``
        every ``HEARTBEAT_SECONDS``, and any wait longer than ``HEARTBEAT_TIMEOUT`` raises
        (see :class:`Heartbeat`): one round trip per interval, and the same bound as Redis.
        """
        psycopg = self._psycopg
        kwargs = {**self._kwargs, **_LISTEN_KWARGS, "connect_timeout": 5}
        heartbeat = Heartbeat()
        with bounded_classes()[0].connect(self._conninfo, **kwargs) as conn:
            conn.wait_timeout = heartbeat.timeout
            conn.execute(psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(self.channel)))
            heartbeat.answered()
            # Listening from here on: anything cached before may be stale.
            emit(None)
            while not stop.is_set():
                for notice in conn.notifies(timeout=POLL_SECONDS):
                    heartbeat.answered()
                    emit(notice.payload)
                if heartbeat.ping_due():
                    conn.execute("SELECT 1")
                    heartbeat.answered()

    # -- the async twin ----------------------------------------------------------------

    async def _apool(self) -> psycopg_pool.AsyncConnectionPool[Any]:
        """The async pool of the running loop (async connections belong to one loop)."""
        entry = self._async.get()
        if entry.opening is not None:
            await entry.opening
            entry.opening = None
        return entry.pool

    def _new_async_pool(self) -> _AsyncPool:
        if self._given_async is not None:
            return _AsyncPool(self._given_async, None)
        if self._closed:
            raise StoreError(f"{self!r} is closed")
        min_size, max_size = self._sizes
        pool = self._pool_module.AsyncConnectionPool(
            self._conninfo,
            kwargs=self._connect_kwargs(),
            min_size=min_size,
            max_size=max_size,
            timeout=self._timeout,
            open=False,
            name=f"keyguard-{self.table}-async",
            connection_class=bounded_classes()[1],
            configure=self._abound,
        )
        # Opened in a task shared by every caller, so concurrent first checks wait for it.
        loop = asyncio.get_running_loop()
        return _AsyncPool(
            pool, loop.create_task(pool.open()), loop.create_task(_close_at_shutdown(pool))
        )

    async def _close_async_pool(self, entry: _AsyncPool) -> None:
        if entry.pool is not self._given_async:
            await entry.pool.close()
        if entry.closer is not None:
            entry.closer.cancel()

    async def _aone(self, query: bytes, params: tuple[Any, ...], action: str) -> KeyInfo | None:
        try:
            async with (await self._apool()).connection() as conn:
                cursor = await conn.execute(query, params, prepare=self._prepare)
                row = await cursor.fetchone()
        except self._psycopg.Error as e:
            raise self._fail(action, e) from e
        return None if row is None else self._decode(row)

    async def _awrite(self, query: bytes, params: tuple[Any, ...], action: str) -> bool:
        try:
            async with (await self._apool()).connection() as conn:
                cursor = await conn.execute(query, params)
                return bool(cursor.rowcount == 1)
        except self._psycopg.Error as e:
            raise self._fail(action, e) from e

    async def aadd(self, info: KeyInfo) -> bool:
        return await self._awrite(self._q_add, self._add_params(info), "add a key")

    async def aget(self, digest: str) -> KeyInfo | None:
        return await self._aone(self._q_get, (digest,), "read a key")

    async def aget_by_id(self, key_id: str) -> KeyInfo | None:
        return await self._aone(self._q_get_by_id, (key_id,), "read a key")

    async def alist_keys(
        self, user_id: str | None = None, *, limit: int | None = None, after: str | None = None
    ) -> list[KeyInfo]:
        try:
            async with (await self._apool()).connection() as conn:
                created = None
                if after is not None:
                    cursor = await conn.execute(self._q_created_at, (after,))
                    row = await cursor.fetchone()
                    if row is None:
                        raise unknown_cursor(after)
                    created = row[0]
                query, params = self._list_query(user_id, limit, after, created)
                cursor = await conn.execute(query, params)
                rows = await cursor.fetchall()
        except self._psycopg.Error as e:
            raise self._fail("list keys", e) from e
        return [_row_to_info(row) for row in rows]

    async def arevoke(self, digest: str, at: datetime) -> bool:
        return await self._awrite(self._q_revoke, (at, digest), "revoke a key")

    async def aset_expiry(self, digest: str, expires_at: datetime | None) -> bool:
        return await self._awrite(self._q_set_expiry, (expires_at, digest), "change an expiry")

    async def atouch(self, digest: str, at: datetime) -> None:
        await self._awrite(self._q_touch, (at, digest), "record a key's use")

    async def aconsume(self, buckets: Sequence[Bucket], now: float) -> tuple[bool, list[float]]:
        try:
            async with (await self._apool()).connection() as conn:
                cursor = await conn.execute(self._q_consume, self._consume_params(buckets, now))
                row = await cursor.fetchone()
        except self._psycopg.Error as e:
            raise self._counter_fail("charge counters", e) from e
        return bool(row[0]), list(row[1])

    async def aadjust(self, bucket: Bucket, delta: float) -> float:
        params = (bucket.name, float(delta), bucket.expires_at)
        try:
            async with (await self._apool()).connection() as conn:
                cursor = await conn.execute(self._q_adjust, params)
                row = await cursor.fetchone()
        except self._psycopg.Error as e:
            raise self._counter_fail("adjust a counter", e) from e
        return float(row[0])

    async def apeek(self, names: Sequence[str]) -> list[float]:
        try:
            async with (await self._apool()).connection() as conn:
                cursor = await conn.execute(self._q_peek, (list(names),))
                found = dict(await cursor.fetchall())
        except self._psycopg.Error as e:
            raise self._counter_fail("read counters", e) from e
        return [float(found.get(n, 0.0)) for n in names]

    async def aclose(self) -> None:
        """Close this loop's async pool, then the rest (see :meth:`close`)."""
        await self._async.aclose()
        self.close()
