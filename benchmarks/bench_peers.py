"""keyguard beside its peers, like for like: the same backend, keys, workload and floor.

Two levels, each printed as a table with the machine and the date above it:

1. **One valid key checked** on a SQLite file and on a PostgreSQL database, 10,000 keys
   stored by every library: keyguard ``APIKeyManager.validate_key``, without and with a
   ``last_used_at`` write (its default writes one on a key's first check in a minute);
   djangorestframework-api-key ``APIKey.objects.is_valid``; fastapi-keygate
   ``KeyGate._lookup`` (what its ``require`` dependency calls) and the same on
   ``AsyncKeyGate``; keyshield ``ApiKeyService.verify_key`` on its SQLAlchemy repository,
   one session and transaction per check as its FastAPI example opens, with its default
   hasher (Argon2), bcrypt at the lowest cost it allows, Argon2 at the lowest parameters
   argon2-cffi takes, and its ``MockApiKeyHasher`` (no hashing; labelled as such).
2. **One request through FastAPI** on the same SQLite file: the same tiny route guarded by
   keyguard's ``require_api_key``, keygate's ``Depends(gate.require)`` (and its async
   twin's) and keyshield's ``create_depends_api_key``, driven in process by
   ``httpx.AsyncClient`` over ``httpx.ASGITransport``.

Every row is timed in passes of distinct keys, each pass right after a pass of its floor
in the same loop; rows take turns within a repeat. The floor of level 1 is SHA-256 of the
key plus one raw driver ``SELECT`` by primary key on a copy of keyguard's table (same
columns, same rows) in the same file or database: on SQLite the rowid is the digest's first
8 bytes, so the floor runs no keyguard code; the floor of level 2 is an unguarded
route on the same app. Times are wall-clock µs per call (aiosqlite and the thread pool
work on other threads); ratios are medians of the per-repeat ratios.

Run it in the benchmark-only environment (the peers never enter keyguard's own venv)::

    make bench-peers
    .venv-bench/bin/python benchmarks/bench_peers.py --keys 3000 --sample 100 --backends sqlite
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import os
import platform
import secrets
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from keyguard import APIKeyManager, KeyInfo, PostgresStore, SQLiteStore, digest_key

POSTGRES_DSN = (
    os.environ.get("KEYGUARD_TEST_POSTGRES_DSN") or "postgresql://postgres@127.0.0.1:5432/test"
)
PACKAGES = [
    "keyguard",
    "djangorestframework-api-key",
    "django",
    "djangorestframework",
    "fastapi-keygate",
    "limits",
    "keyshield",
    "argon2-cffi",
    "bcrypt",
    "sqlalchemy",
    "aiosqlite",
    "asyncpg",
    "psycopg",
    "fastapi",
    "starlette",
    "httpx",
]
#: keyguard's row is the one every other row is compared with.
KEYGUARD = "keyguard"
WRITING = "keyguard + last_used_at write"
#: What ``Row.run`` does with a slice of keys: check each, raise if one is refused.
Run = Callable[[Sequence[str]], None]


#: What each row does, printed under the tables.
LEVEL_ONE_NOTES = """\
What one check is, per row (each library with its own table in the same file or database):
  keyguard   APIKeyManager.validate_key: SHA-256, one SELECT by digest, expiry and
             revocation, no write (last_used_resolution=None).
  keyguard + last_used_at write  the same with an UPDATE and a commit of last_used_at on
             every check (last_used_resolution of 1 µs). keyguard's default writes it on a
             key's first check in a minute: a key checked more often costs the first row,
             a key checked less often the second. x kg+w compares with this row.
  drf-api-key  APIKey.objects.is_valid: one Django ORM SELECT by prefix, SHA-512, expiry.
  keygate    KeyGate._lookup (what Depends(gate.require) calls): an ORM session, one SELECT
             by prefix, SHA-256, expiry; AsyncKeyGate the same awaited. No writes.
  keyshield  ApiKeyService.verify_key in a session and transaction of its own: SELECT by
             key_id, the hasher's verify, then last_used_at written on every check (SELECT
             by id, UPDATE, COMMIT), which it cannot turn off; its random 0.1-0.3 s delay
             per check is set to 0 (min_delay=max_delay=0).
  keyshield hashers: argon2 (default) = Argon2ApiKeyHasher() with argon2-cffi's defaults;
             bcrypt rounds=4 = the lowest cost it accepts (its default is 12); argon2
             t=1 m=8KiB = the lowest parameters argon2-cffi accepts, passed as
             password_hasher; MockHasher = its test hasher, which compares the peppered key
             in clear: no hashing at all, shown only to isolate its database cost."""
LEVEL_TWO_NOTES = """\
Every route has the same handler and gets the key as Authorization: Bearer <key>.
  keyguard   Depends(require_api_key(manager=...)) with level 1's two managers on
             SQLiteStore and the dependency's defaults: usage counted in memory and written
             by a background thread at most once a second, the failed-check throttle on.
             No keyguard.fastapi.install(app), whose middleware would wrap the floor too.
  keygate    Depends(KeyGate.require), a plain def that FastAPI runs in its thread pool;
             AsyncKeyGate.require on aiosqlite. Keys stored without limits (its default is
             60 a minute, which would answer 429). KeyGate(app) not given: its usage
             middleware, which writes a row per request, would wrap the floor route too.
  keyshield  create_depends_api_key over a session dependency (with a transaction) and a
             service dependency, as its README wires them, without the README's
             ensure_table() on every request; delay 0 as in level 1."""


# -- timing --------------------------------------------------------------------------------


@dataclass
class Row:
    """One thing timed: ``calls`` keys per pass, from a workload of distinct keys."""

    name: str
    run: Run
    calls: int
    workload: list[str] = field(default_factory=list)
    #: The keys the warm-up checks, in order; the workload if empty.
    warm: list[str] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # µs per call, one per repeat
    floors: list[float] = field(default_factory=list)  # the floor's, in the same repeat

    def slice(self, repeat: int) -> list[str]:
        return self.workload[repeat * self.calls : (repeat + 1) * self.calls]


def timed(row: Row, keys: Sequence[str]) -> float:
    start = time.perf_counter_ns()
    row.run(keys)
    return (time.perf_counter_ns() - start) / len(keys) / 1000


def compare(rows: list[Row], floor: Row, repeats: int) -> None:
    """Warm every row up, then time ``repeats`` rounds in which each row takes its turn
    right after a pass of the floor.

    Each repeat uses keys the previous ones did not, so every timed check is of a
    distinct key, and the warm-up has checked it once, so every page is in the
    database's cache. keyguard's row warms up on all its keys in the order it then uses
    them: its SQLite store keeps the last 4,096 decoded rows, and with 10,000 keys no
    timed check finds its key among them.
    """
    for row in [floor, *rows]:
        row.run(row.warm or row.workload)
    gc.collect()
    for repeat in range(repeats):
        for turn in range(len(rows)):
            row = rows[(turn + repeat) % len(rows)]  # no row always goes first
            row.floors.append(timed(floor, floor.slice(repeat)))
            row.times.append(timed(row, row.slice(repeat)))


def ratios(top: list[float], bottom: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(top, bottom, strict=True))


def number(value: float, width: int) -> str:
    text = f"{value:.1f}" if abs(value) < 1000 else f"{value:,.0f}"
    return f"{text:>{width}}"


def factor(value: float, width: int) -> str:
    text = f"{value:.2f}" if abs(value) < 100 else f"{value:,.0f}"
    return f"{text:>{width}}"


def print_table(title: str, floor_name: str, rows: list[Row], request_level: bool) -> None:
    """One line per row: µs per call (min, median, max over the repeats), the median of
    its floor passes, and the medians of its per-repeat ratios to its floor, to keyguard
    and to keyguard writing ``last_used_at``; for requests also the time added over the
    floor, and that as a multiple of keyguard's."""
    named = {row.name: row for row in rows}
    bases = [named.get(KEYGUARD), named.get(WRITING)]
    print(f"\n{title}")
    print(f"floor: {floor_name}")
    header = (
        f"  {'row':<30} {'calls':>5} {'min µs':>9} {'median':>9} {'max':>9}"
        f" {'floor':>7} {'x floor':>7} {'x kg':>7} {'x kg+w':>7}"
    )
    if request_level:
        header += f" {'added µs':>9} {'added x kg':>10}"
    print(header)
    for row in rows:
        line = (
            f"  {row.name:<30} {row.calls:>5} {number(min(row.times), 9)}"
            f" {number(statistics.median(row.times), 9)} {number(max(row.times), 9)}"
            f" {number(statistics.median(row.floors), 7)}"
            f" {factor(ratios(row.times, row.floors), 7)}"
        )
        for base in bases:
            line += f" {factor(ratios(row.times, base.times), 7)}" if base else f" {'-':>7}"
        if request_level:
            added = [t - f for t, f in zip(row.times, row.floors, strict=True)]
            line += f" {number(statistics.median(added), 9)}"
            if bases[0]:
                base = bases[0]
                base_added = [t - f for t, f in zip(base.times, base.floors, strict=True)]
                line += f" {factor(ratios(added, base_added), 10)}"
        print(line, flush=True)
    print(f"  {load()}")


def load() -> str:
    """The machine's load: on a shared machine, what the figures were measured under."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average unknown"
    return f"load average {one:.1f}, {five:.1f}, {fifteen:.1f} (1, 5, 15 min)"


# -- the environment -----------------------------------------------------------------------


def machine() -> str:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = []
    for name in PACKAGES:
        try:
            versions.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{name} (not installed)")
    lines = [
        f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"machine: {platform.platform()}; {cpu}; {os.cpu_count()} cores; {load()}",
        f"python: {platform.python_implementation()} {platform.python_version()};"
        f" SQLite {sqlite3.sqlite_version}",
        "packages: " + ", ".join(versions),
    ]
    return "\n".join(lines)


@dataclass
class Backend:
    """Where every library keeps its keys for one level-1 table."""

    name: str  # "sqlite" or "postgres"
    path: Path | None = None  # the SQLite file
    dsn: str = ""  # the scratch PostgreSQL database

    @property
    def sqlalchemy_url(self) -> str:
        if self.path is not None:
            return f"sqlite:///{self.path}"
        return "postgresql+psycopg://" + self.dsn.split("://", 1)[1]

    @property
    def async_url(self) -> str:
        if self.path is not None:
            return f"sqlite+aiosqlite:///{self.path}"
        return "postgresql+asyncpg://" + self.dsn.split("://", 1)[1]


def scratch_database(stack: ExitStack) -> str:
    """A new PostgreSQL database for this run (dropped at exit), or raise why not."""
    import psycopg

    name = "kgbench_peers_" + secrets.token_hex(4)
    with psycopg.connect(POSTGRES_DSN, autocommit=True, connect_timeout=3) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
        version = conn.execute("SHOW server_version").fetchone()

    def drop() -> None:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    stack.callback(drop)
    params = psycopg.conninfo.conninfo_to_dict(POSTGRES_DSN)
    host, port = params.get("host") or "127.0.0.1", params.get("port") or 5432
    print(f"PostgreSQL {version[0] if version else '?'} on {host}:{port}, scratch database {name}")
    user, password = params.get("user") or "postgres", params.get("password")
    auth = f"{user}:{password}" if password else f"{user}"
    return f"postgresql://{auth}@{host}:{port}/{name}"


class Loop:
    """One event loop for the whole run: async engines and pools belong to it."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()

    def sync(self, check: Callable[[str], Awaitable[object]]) -> Run:
        async def many(keys: Sequence[str]) -> None:
            for key in keys:
                await check(key)

        def run(keys: Sequence[str]) -> None:
            self.loop.run_until_complete(many(keys))

        return run

    def wait(self, awaitable: Awaitable[Any]) -> Any:
        async def one() -> Any:
            return await awaitable

        return self.loop.run_until_complete(one())


def checking(check: Callable[[str], object]) -> Run:
    def run(keys: Sequence[str]) -> None:
        for key in keys:
            if not check(key):
                raise SystemExit(f"a valid key was refused by {check!r}")

    return run


# -- keyguard and the floor ----------------------------------------------------------------


def make_keys(n: int) -> list[str]:
    return ["sk_" + secrets.token_hex(16) for _ in range(n)]


def records(keys: list[str]) -> Iterator[KeyInfo]:
    """keyguard's record of each key, with the small metadata every library gets."""
    now = datetime.now(timezone.utc)
    for i, key in enumerate(keys):
        user_id = f"user{i % 10_000}"
        yield KeyInfo(
            key_id=f"key_{i:016x}",
            prefix="sk_",
            hint="sk_…" + key[-4:],
            user_id=user_id,
            metadata={"user_id": user_id, "permissions": ["read"]},
            created_at=now,
            digest=digest_key(key),
        )


def keyguard_managers(store: SQLiteStore | PostgresStore) -> tuple[APIKeyManager, APIKeyManager]:
    """keyguard without, then with, a ``last_used_at`` write on every check.

    By default keyguard writes ``last_used_at`` on a key's first check in a minute: a key
    checked more often than that costs the first manager's check, a key checked less
    often the second's. drf-api-key and keygate never write on a check, keyshield always.
    """
    reading = APIKeyManager(store, last_used_resolution=None)
    writing = APIKeyManager(store, last_used_resolution=timedelta(microseconds=1))
    return reading, writing


def keyguard_sqlite(path: Path, keys: list[str]) -> SQLiteStore:
    store = SQLiteStore(path)
    conn = store._conn()  # one transaction; the public path commits each key
    conn.execute("BEGIN IMMEDIATE")
    for info in records(keys):
        if not store.add(info):
            raise RuntimeError("collision while loading")
    # The floor's table: keyguard's columns and rows, each under a rowid that SQL alone
    # finds from the SHA-256 (its first 8 bytes), so the floor needs no keyguard code.
    schema = conn.execute(
        "SELECT sql FROM sqlite_master WHERE name = 'keyguard_records'"
    ).fetchone()[0]
    conn.execute(schema.replace("keyguard_records", "floor_keys", 1))
    rows = conn.execute("SELECT * FROM keyguard_records").fetchall()
    conn.executemany(
        f"INSERT INTO floor_keys VALUES ({','.join('?' * len(rows[0]))})",
        [(floor_rowid(row[1]), *row[1:]) for row in rows],
    )
    conn.execute("COMMIT")
    return store


def floor_rowid(digest: bytes) -> int:
    """The floor table's rowid of a record: the first 8 bytes of its SHA-256."""
    return int.from_bytes(digest[:8], "big", signed=True)


def keyguard_postgres(dsn: str, keys: list[str]) -> PostgresStore:
    from psycopg.types.json import Jsonb

    store = PostgresStore(dsn)
    columns = "digest, key_id, hash_scheme, prefix, hint, user_id, metadata, created_at"
    with (
        store._connection() as conn,
        conn.transaction(),
        conn.cursor() as cur,
        cur.copy(f"COPY keyguard_keys ({columns}) FROM STDIN") as out,
    ):
        for info in records(keys):
            out.write_row(
                (
                    info.digest,
                    info.key_id,
                    info.hash_scheme,
                    info.prefix,
                    info.hint,
                    info.user_id,
                    Jsonb(info.metadata),
                    info.created_at,
                )
            )
    with store._connection() as conn:
        conn.execute("CREATE TABLE floor_keys AS SELECT * FROM keyguard_keys")
        conn.execute("ALTER TABLE floor_keys ADD PRIMARY KEY (digest)")
        conn.execute("ANALYZE keyguard_keys")
        conn.execute("ANALYZE floor_keys")
    return store


def floor_row(backend: Backend, stack: ExitStack, keys: list[str], calls: int) -> Row:
    """SHA-256 of the key and one raw ``SELECT`` by primary key of keyguard's columns."""
    if backend.path is not None:
        conn = sqlite3.connect(backend.path, isolation_level=None)
        stack.callback(conn.close)
        execute = conn.execute

        def select(key: str) -> object:
            rowid = floor_rowid(hashlib.sha256(key.encode()).digest())
            return execute("SELECT * FROM floor_keys WHERE id = ?", (rowid,)).fetchone()

    else:
        import psycopg

        pg = psycopg.connect(backend.dsn, autocommit=True)
        stack.callback(pg.close)
        query = "SELECT * FROM floor_keys WHERE digest = %s"

        def select(key: str) -> object:
            digest = hashlib.sha256(key.encode()).hexdigest()
            return pg.execute(query, (digest,), prepare=True).fetchone()

    return Row("floor", checking(select), calls, keys)


# -- the peers -----------------------------------------------------------------------------


def configure_django(sqlite: Path | None, dsn: str | None) -> None:
    """Django's settings for both backends (it can be configured once per process)."""
    import django
    from django.conf import settings

    databases: dict[str, dict[str, Any]] = {}
    if sqlite is not None:
        databases["default"] = {"ENGINE": "django.db.backends.sqlite3", "NAME": str(sqlite)}
    if dsn is not None:
        import psycopg

        params = psycopg.conninfo.conninfo_to_dict(dsn)
        databases["default" if sqlite is None else "postgres"] = {
            "ENGINE": "django.db.backends.postgresql",
            "NAME": params["dbname"],
            "USER": params.get("user", ""),
            "PASSWORD": params.get("password", ""),
            "HOST": params.get("host", ""),
            "PORT": params.get("port", ""),
        }
    settings.configure(
        DATABASES=databases,
        INSTALLED_APPS=["rest_framework", "rest_framework_api_key"],
        USE_TZ=True,
        DEBUG=False,  # True would keep every query in memory
    )
    django.setup()


def drf_api_key(backend: Backend, count: int) -> tuple[Callable[[str], bool], list[str]]:
    """``APIKey.objects.is_valid`` on ``count`` keys (SHA-512, its default hasher)."""
    from django.conf import settings
    from django.core.management import call_command
    from rest_framework_api_key.crypto import concatenate
    from rest_framework_api_key.models import APIKey

    alias = "default"
    if backend.name == "postgres" and "postgres" in settings.DATABASES:
        alias = "postgres"
    call_command("migrate", "rest_framework_api_key", database=alias, verbosity=0)
    generator = APIKey.objects.key_generator
    keys: list[str] = []
    objects, prefixes = [], set()
    while len(keys) < count:
        prefix = generator.get_prefix()
        if prefix in prefixes:
            continue
        prefixes.add(prefix)
        key = concatenate(prefix, generator.get_secret_key())
        hashed = generator.hash(key)
        keys.append(key)
        objects.append(
            APIKey(id=concatenate(prefix, hashed), prefix=prefix, hashed_key=hashed, name="b")
        )
    APIKey.objects.using(alias).bulk_create(objects, batch_size=2000)
    manager = APIKey.objects.db_manager(alias)
    return manager.is_valid, keys


def keygate_rows(url: str, count: int) -> list[str]:
    """``count`` keygate keys without limits (its default is 60 a minute), in one insert."""
    from keygate.keys import generate_key
    from keygate.models import ApiKeyRow, Base, utcnow
    from sqlalchemy import create_engine

    engine = create_engine(url)
    Base.metadata.create_all(engine)
    keys: list[str] = []
    rows: list[dict[str, Any]] = []
    prefixes: set[str] = set()
    now = utcnow()
    while len(keys) < count:
        key, prefix, key_hash = generate_key()
        if prefix in prefixes:  # 32-bit prefixes: a few collide among 10,000
            continue
        prefixes.add(prefix)
        keys.append(key)
        rows.append(
            {
                "prefix": prefix,
                "key_hash": key_hash,
                "owner_id": f"user{len(keys)}",
                "name": None,
                "per_minute": None,
                "per_hour": None,
                "created_at": now,
                "scopes": "read",
            }
        )
    table: Any = ApiKeyRow.__table__
    with engine.begin() as conn:
        conn.execute(table.insert(), rows)
    engine.dispose()
    return keys


@dataclass
class Hasher:
    """One keyshield hasher: its label, how to make it, and its share of ``--sample``."""

    label: str
    make: Callable[[str], Any]
    divisor: int  # calls per pass = sample // divisor


def keyshield_hashers() -> list[Hasher]:
    from argon2 import PasswordHasher
    from keyshield.hasher.argon2 import Argon2ApiKeyHasher
    from keyshield.hasher.base import MockApiKeyHasher
    from keyshield.hasher.bcrypt import BcryptApiKeyHasher

    return [
        Hasher("argon2 (default)", Argon2ApiKeyHasher, 250),
        Hasher(
            "bcrypt rounds=4",
            lambda pepper: BcryptApiKeyHasher(pepper=pepper, rounds=4),
            25,
        ),
        Hasher(
            "argon2 t=1 m=8KiB",
            lambda pepper: Argon2ApiKeyHasher(
                pepper=pepper,
                password_hasher=PasswordHasher(time_cost=1, memory_cost=8, parallelism=1),
            ),
            10,
        ),
        Hasher("MockHasher (NO hash)", MockApiKeyHasher, 10),
    ]


@dataclass
class KeyshieldKeys:
    """keyshield's table, made once and loaded into each backend: each hasher's keys
    hashed by it, and filler rows (never looked up) up to the same number of keys."""

    hashers: list[tuple[Hasher, Any, list[str]]]
    rows: list[dict[str, Any]]


def keyshield_keys(count: int, sample: int, repeats: int) -> KeyshieldKeys:
    from keyshield.utils import key_id_factory, key_secret_factory

    pepper = "bench-" + secrets.token_hex(16)
    now = datetime.now(timezone.utc)
    hashers, rows = [], []

    def row(key_id: str, key_hash: str, secret: str) -> dict[str, Any]:
        return {
            "id": uuid.uuid4().hex,
            "name": "bench",
            "is_active": True,
            "created_at": now,
            "key_id": key_id,
            "key_hash": key_hash,
            "key_secret_first": secret[:4],
            "key_secret_last": secret[-4:],
            "scopes": ["read"],
        }

    for spec in keyshield_hashers():
        hasher = spec.make(pepper)
        keys = []
        for _ in range(max(1, sample // spec.divisor) * repeats):
            key_id, secret = key_id_factory(), key_secret_factory()
            rows.append(row(key_id, hasher.hash(secret), secret))
            keys.append(f"ak_v1-{key_id}-{secret}")
        hashers.append((spec, hasher, keys))
    if len(rows) > count:
        raise SystemExit(f"--keys {count} is less than keyshield's {len(rows)} hashed keys")
    while len(rows) < count:
        secret = secrets.token_hex(8)
        rows.append(row(key_id_factory(), "filler$" + secrets.token_hex(32), secret))
    return KeyshieldKeys(hashers, rows)


def keyshield_engine(url: str, data: KeyshieldKeys, loop: Loop) -> Any:
    from keyshield.repositories.sql import ApiKeyModel, Base
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(url)
    table: Any = ApiKeyModel.__table__

    async def load() -> None:
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)  # its ensure_table(), once
            await conn.execute(table.insert(), data.rows)

    loop.wait(load())
    return engine


def keyshield_verify(engine: Any, hasher: Any) -> Callable[[str], Awaitable[object]]:
    """``verify_key`` as its FastAPI example calls it: a session and a transaction per
    check, the service without its random 0.1-0.3 s delay."""
    from keyshield.repositories.sql import SqlAlchemyApiKeyRepository
    from keyshield.services.base import ApiKeyService
    from sqlalchemy.ext.asyncio import async_sessionmaker

    sessions = async_sessionmaker(engine, expire_on_commit=False)

    async def verify(key: str) -> object:
        async with sessions() as session, session.begin():
            repo = SqlAlchemyApiKeyRepository(session)
            service = ApiKeyService(repo=repo, hasher=hasher, min_delay=0, max_delay=0)
            return await service.verify_key(key)

    return verify


# -- level 1 -------------------------------------------------------------------------------


def level_one(
    backend: Backend,
    args: argparse.Namespace,
    stack: ExitStack,
    loop: Loop,
    shield: KeyshieldKeys | str,
) -> dict[str, Any]:
    """Load every library's keys into ``backend``, time level 1, and return what level 2
    reuses (the SQLite managers and keys)."""
    sample, repeats = args.sample, args.repeats
    needed = sample * repeats
    keys = make_keys(args.keys)
    if backend.path is not None:
        store: SQLiteStore | PostgresStore = keyguard_sqlite(backend.path, keys)
    else:
        store = keyguard_postgres(backend.dsn, keys)
    managers = keyguard_managers(store)
    for manager in managers:
        stack.callback(manager.close)  # writes its usage counts, then closes the store
    floor = floor_row(backend, stack, keys[-needed:], sample)
    rows = [
        Row(KEYGUARD, checking(managers[0].validate_key), sample, keys[:needed], warm=keys),
        Row(WRITING, checking(managers[1].validate_key), sample, keys[needed : 2 * needed]),
    ]
    skipped: list[str] = []
    reused: dict[str, Any] = {"keyguard": (managers, keys, needed)}

    try:
        is_valid, drf_keys = drf_api_key(backend, args.keys)
    except ImportError as e:
        skipped.append(f"djangorestframework-api-key: not installed ({e.name})")
    else:
        rows.append(Row("drf-api-key is_valid", checking(is_valid), sample, drf_keys[:needed]))

    try:
        gate_keys = keygate_rows(backend.sqlalchemy_url, args.keys)[:needed]
        from keygate import AsyncKeyGate, KeyGate
    except ImportError as e:
        skipped.append(f"fastapi-keygate: not installed ({e.name})")
    else:
        gate = KeyGate(db_url=backend.sqlalchemy_url, default_per_minute=None)
        stack.callback(gate._engine.dispose)
        agate = AsyncKeyGate(db_url=backend.async_url, default_per_minute=None)
        stack.callback(lambda: loop.wait(agate._engine.dispose()))
        rows.append(Row("keygate KeyGate._lookup", checking(gate._lookup), sample, gate_keys))

        async def alookup(key: str) -> object:
            if await agate._lookup(key) is None:
                raise SystemExit("AsyncKeyGate refused a valid key")
            return True

        rows.append(Row("keygate AsyncKeyGate._lookup", loop.sync(alookup), sample, gate_keys))
        reused["keygate"] = (gate, agate, gate_keys)

    if isinstance(shield, str):
        skipped.append(f"keyshield: {shield}")
    else:
        engine = keyshield_engine(backend.async_url, shield, loop)
        stack.callback(lambda: loop.wait(engine.dispose()))
        for spec, hasher, shield_keys in shield.hashers:
            calls = max(1, sample // spec.divisor)
            verify = keyshield_verify(engine, hasher)
            rows.append(Row(f"keyshield {spec.label}", loop.sync(verify), calls, shield_keys))
        reused["keyshield"] = engine

    compare(rows, floor, repeats)
    what = "SQLite file (WAL), one file for all" if backend.path else "PostgreSQL, one database"
    print_table(
        f"Level 1: check one valid key, {what}, {args.keys:,} keys per library, {repeats} repeats",
        "SHA-256 + raw "
        + (
            "sqlite3 SELECT by rowid (the digest's first 8 bytes)"
            if backend.path
            else "psycopg (prepared, autocommit) SELECT by primary key (the digest)"
        )
        + " on a copy of keyguard's table",
        rows,
        request_level=False,
    )
    for reason in skipped:
        print(f"  not measured: {reason}")
    return reused


# -- level 2 -------------------------------------------------------------------------------


def level_two(
    reused: dict[str, Any], shield: KeyshieldKeys | str, args: argparse.Namespace, loop: Loop
) -> None:
    import httpx
    from fastapi import Depends, FastAPI

    from keyguard.fastapi import require_api_key

    sample, repeats = args.sample, args.repeats
    app = FastAPI()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench")
    rows: list[Row] = []

    async def ok() -> dict[str, bool]:
        return {"ok": True}

    def route(name: str, path: str, keys: list[str], calls: int, *guards: Any) -> Row:
        app.add_api_route(path, ok, methods=["GET"], dependencies=list(guards))

        async def get(key: str) -> object:
            response = await client.get(path, headers={"Authorization": f"Bearer {key}"})
            if response.status_code != 200:
                raise SystemExit(f"{name}: {response.status_code} {response.text[:200]}")
            return response

        return Row(name, loop.sync(get), calls, keys)

    (reading, writing), keys, needed = reused["keyguard"]
    # The floor sends the same header to the same app; nothing reads it.
    floor = route("floor", "/floor", keys[-needed:], sample)
    # No keyguard.fastapi.install(app): its middleware would wrap the floor route too.
    guard = Depends(require_api_key(manager=reading))
    rows.append(route(KEYGUARD, "/keyguard", keys[:needed], sample, guard))
    rows[-1].warm = keys
    guard = Depends(require_api_key(manager=writing))
    rows.append(route(WRITING, "/keyguard-writing", keys[needed : 2 * needed], sample, guard))
    skipped = ["djangorestframework-api-key: a Django REST framework permission, not FastAPI"]
    if "keygate" in reused:
        gate, agate, gate_keys = reused["keygate"]
        rows.append(
            route(
                "keygate KeyGate.require",
                "/gate",
                gate_keys,
                sample,
                Depends(gate.require),
            )
        )
        rows.append(
            route(
                "keygate AsyncKeyGate.require",
                "/agate",
                gate_keys,
                sample,
                Depends(agate.require),
            )
        )
    else:
        skipped.append("fastapi-keygate: not installed")
    if isinstance(shield, str):
        skipped.append(f"keyshield: {shield}")
    else:
        for n, (spec, hasher, shield_keys) in enumerate(shield.hashers):
            guard = keyshield_guard(reused["keyshield"], hasher)
            calls = max(1, sample // spec.divisor)
            name = f"keyshield {spec.label}"
            rows.append(route(name, f"/shield{n}", shield_keys, calls, Depends(guard)))

    compare(rows, floor, repeats)
    print_table(
        f"Level 2: one GET through FastAPI in process (httpx.ASGITransport), SQLite,"
        f" {repeats} repeats",
        "the same route without a guard, on the same app (µs per request)",
        rows,
        request_level=True,
    )
    for reason in skipped:
        print(f"  not measured: {reason}")
    loop.wait(client.aclose())


def keyshield_guard(engine: Any, hasher: Any) -> Any:
    """keyshield's FastAPI integration as its README wires it: a session dependency, a
    service dependency on it, and ``create_depends_api_key`` (a Bearer token)."""
    from fastapi import Depends
    from keyshield.api import create_depends_api_key
    from keyshield.repositories.sql import SqlAlchemyApiKeyRepository
    from keyshield.services.base import ApiKeyService
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

    sessions = async_sessionmaker(engine, class_=AsyncSession, expire_on_commit=False)

    async def session() -> AsyncIterator[Any]:
        async with sessions() as s, s.begin():
            yield s

    in_session = Depends(session)

    async def service(s: Any = in_session) -> Any:
        # Its README's dependency also runs ensure_table() on every request; not here.
        repo = SqlAlchemyApiKeyRepository(s)
        return ApiKeyService(repo=repo, hasher=hasher, min_delay=0, max_delay=0)

    return create_depends_api_key(service)


# -- the run -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keys", type=int, default=10_000, help="keys stored per library")
    parser.add_argument(
        "--sample",
        type=int,
        default=400,
        help="checks per pass (keyshield's slow hashers do fewer)",
    )
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--no-requests", action="store_true", help="skip level 2")
    args = parser.parse_args()
    if args.repeats < 1 or args.sample < 1 or 3 * args.sample * args.repeats > args.keys:
        parser.error("keyguard's two rows and the floor need 3 * --sample * --repeats keys")
    backends = args.backends.split(",")
    warnings.simplefilter("ignore")  # keyshield warns about the default pepper of its Mock

    print(machine(), flush=True)
    loop = Loop()
    with tempfile.TemporaryDirectory() as tmp, ExitStack() as stack:
        stack.callback(loop.loop.close)
        found: dict[str, Backend] = {}
        if "sqlite" in backends:
            found["sqlite"] = Backend("sqlite", path=Path(tmp) / "peers.db")
        if "postgres" in backends:
            try:
                found["postgres"] = Backend("postgres", dsn=scratch_database(stack))
            except Exception as e:  # any failure to reach the server: say so, go on
                print(f"PostgreSQL not measured: {type(e).__name__}: {e}")
        try:
            configure_django(
                found["sqlite"].path if "sqlite" in found else None,
                found["postgres"].dsn if "postgres" in found else None,
            )
        except ImportError as e:
            print(f"Django not configured: {e}")
        try:
            shield: KeyshieldKeys | str = keyshield_keys(args.keys, args.sample, args.repeats)
        except ImportError as e:
            shield = f"not installed ({e.name})"
        reused: dict[str, Any] = {}
        for name, backend in found.items():
            started = time.monotonic()
            got = level_one(backend, args, stack, loop, shield)
            print(f"  ({time.monotonic() - started:.0f} s)")
            if name == "sqlite":
                reused = got
        if found:
            print("\n" + LEVEL_ONE_NOTES)
        if reused and not args.no_requests:
            level_two(reused, shield, args, loop)
            print("\n" + LEVEL_TWO_NOTES)
        if "django" in sys.modules:
            from django.db import connections

            connections.close_all()


if __name__ == "__main__":
    main()
