"""Cost of one ``APIKeyManager.validate_key`` on each store at 100,000 keys, and with a cache.

For every store: a known key, an unknown (well-formed) key, and ``averify`` of a known key
where the store has an async twin. ``cached(…)`` rows are ``CachedStore`` hits (the
same keys checked again within the ttl). Baselines measured in the same run:

- ``floor``: one bare ``hashlib.sha256`` of the key plus one lookup in a dict of all keys;
- ``redis RTT`` / ``postgres RTT``: the bare driver call a check needs (``GET`` of
  one record; ``SELECT`` of one row by primary key on a pooled connection), i.e. what the
  network and the server cost before keyguard does anything;
- ``drf-api-key``: djangorestframework-api-key's ``APIKey.objects.is_valid`` (one Django
  ORM query + SHA-512) on the same PostgreSQL with as many keys, when it is installed.

Stores are bulk loaded (SQLite ``add`` in one transaction, Redis pipelined runs of the store's own
Lua insert, PostgreSQL ``COPY``). Times are medians over ``--repeats`` passes of
``--sample`` checks each, in µs per check: this thread's CPU time for checks answered in
this process (floor, memory, SQLite, cache hits), wall time for checks that wait on Redis
or PostgreSQL (and their RTT baselines, measured in alternating passes).

    python benchmarks/bench_stores.py                       # 100,000 keys, about 1 minute
    python benchmarks/bench_stores.py --keys 10000 --repeats 5 --stores memory,redis
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import importlib
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from datetime import datetime, timezone
from pathlib import Path

from keyguard import (
    APIKeyManager,
    CachedStore,
    KeyInfo,
    KeyStore,
    MemoryStore,
    PostgresStore,
    RedisStore,
    SQLiteStore,
    digest_key,
)

REDIS_URL = os.environ.get("KEYGUARD_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0"
POSTGRES_DSN = (
    os.environ.get("KEYGUARD_TEST_POSTGRES_DSN") or "postgresql://postgres@127.0.0.1:5432/test"
)
NOW = datetime.now(timezone.utc)


def make_keys(n: int) -> list[str]:
    return ["sk_" + secrets.token_hex(16) for _ in range(n)]


def records(keys: list[str]) -> Iterator[KeyInfo]:
    for i, key in enumerate(keys):
        user_id = f"user{i % 10_000}"
        yield KeyInfo(
            key_id=f"key_{i:016x}",
            prefix="sk_",
            hint="sk_…" + key[-4:],
            user_id=user_id,
            metadata={"user_id": user_id, "permissions": ["read"]},
            created_at=NOW,
            digest=digest_key(key),
        )


# -- bulk loading --------------------------------------------------------------------------


def load_memory(keys: list[str]) -> MemoryStore:
    store = MemoryStore()
    for info in records(keys):
        store.add(info)
    return store


def load_sqlite(keys: list[str], directory: Path) -> SQLiteStore:
    store = SQLiteStore(directory / "bench.db")
    conn = store._conn()  # one transaction; the public path commits each key
    conn.execute("BEGIN")
    for info in records(keys):
        store.add(info)
    conn.execute("COMMIT")
    return store


def load_redis(keys: list[str], namespace: str) -> RedisStore:
    store = RedisStore(REDIS_URL, namespace=namespace)
    pipe = store._client.pipeline(transaction=False)
    for i, info in enumerate(records(keys), 1):
        call_keys, args = store._add_call(info)
        store._add(keys=call_keys, args=args, client=pipe)  # the store's own atomic insert
        if i % 5000 == 0:
            pipe.execute()
    pipe.execute()
    return store


def load_postgres(keys: list[str], table: str) -> PostgresStore:
    from psycopg import sql
    from psycopg.types.json import Jsonb

    store = PostgresStore(POSTGRES_DSN, table=table)
    columns = ["digest", "key_id", "hash_scheme", "prefix", "hint", "user_id", "metadata"]
    columns.append("created_at")
    copy = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    with (
        store._connection() as conn,
        conn.transaction(),
        conn.cursor() as cur,
        cur.copy(copy) as out,
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
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(table)))
    return store


@contextmanager
def scratch_redis_namespace() -> Iterator[str]:
    import redis

    namespace = "kgbench:" + secrets.token_hex(4)
    try:
        yield namespace
    finally:
        with redis.Redis.from_url(REDIS_URL) as client:
            names = list(client.scan_iter(match=f"{namespace}:*", count=5000))
            for start in range(0, len(names), 5000):
                client.delete(*names[start : start + 5000])


@contextmanager
def scratch_postgres_table() -> Iterator[str]:
    import psycopg
    from psycopg import sql

    table = "kgbench_" + secrets.token_hex(4)
    try:
        yield table
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP TABLE IF EXISTS {}, {}").format(
                    sql.Identifier(table), sql.Identifier(f"{table}_meta")
                )
            )
            conn.execute(
                sql.SQL("DROP FUNCTION IF EXISTS {}()").format(sql.Identifier(f"{table}_notify"))
            )


# -- timing --------------------------------------------------------------------------------


#: Work done in this process is timed in this thread's CPU time, which other load on a
#: shared machine disturbs far less than wall time; a check that waits on a server is timed
#: in wall time, since the wait is its cost.
CPU, WALL = time.thread_time_ns, time.perf_counter_ns


def per_call(
    fn: Callable[[str], object], sample: list[str], repeats: int, clock: Callable[[], int] = CPU
) -> float:
    """Median over ``repeats`` passes of the mean time of one call, in µs."""
    return interleaved([(fn, sample)], repeats, clock)[0]


def interleaved(
    runs: list[tuple[Callable[[str], object], list[str]]],
    repeats: int,
    clock: Callable[[], int],
) -> list[float]:
    """:func:`per_call` for several functions, one pass of each in turn, so that a busy
    moment on a shared machine weighs on all of them alike."""
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for (fn, sample), found in zip(runs, times, strict=True):
            start = clock()
            for key in sample:
                fn(key)
            found.append((clock() - start) / len(sample) / 1000)
    return [statistics.median(found) for found in times]


def per_await(
    fn: Callable[[str], Awaitable[object]],
    sample: list[str],
    repeats: int,
    loop: asyncio.AbstractEventLoop,
    clock: Callable[[], int],
) -> float:
    """:func:`per_call` for a coroutine function, awaited one at a time on ``loop``."""

    async def run() -> float:
        runs = []
        for _ in range(repeats):
            start = clock()
            for key in sample:
                await fn(key)
            runs.append((clock() - start) / len(sample) / 1000)
        return statistics.median(runs)

    # One loop for the whole run: a store's async connections belong to it, and the
    # store's close() shuts them on it.
    return loop.run_until_complete(run())


class Table:
    """Prints one row per measurement, with ratios to the floor."""

    def __init__(self, floor_us: float) -> None:
        self.floor = floor_us
        print(
            f"{'store':<20} {'valid µs':>9} {'x floor':>8} {'unknown µs':>11}"
            f" {'averify µs':>11}   notes"
        )

    def row(
        self,
        name: str,
        valid: float,
        unknown: float | None = None,
        averify: float | None = None,
        note: str = "",
    ) -> None:
        def cell(value: float | None, width: int) -> str:
            return f"{value:>{width}.2f}" if value is not None else f"{'-':>{width}}"

        print(
            f"{name:<20} {valid:>9.2f} {valid / self.floor:>8.1f} {cell(unknown, 11)}"
            f" {cell(averify, 11)}   {note}",
            flush=True,
        )


def measure(
    table: Table,
    name: str,
    store: KeyStore,
    sample: list[str],
    unknown: list[str],
    repeats: int,
    loop: asyncio.AbstractEventLoop | None = None,
) -> None:
    manager = APIKeyManager(store)
    assert all(manager.validate_key(k) for k in sample)  # warms caches, records last use
    assert not any(manager.validate_key(k) for k in unknown)
    gc.collect()
    runs: list[tuple[Callable[[str], object], list[str]]] = [
        (manager.validate_key, sample),
        (manager.validate_key, unknown),
    ]
    floor = round_trip_floor(store)
    if floor is not None:
        runs.append((floor[0], sample))
    clock = WALL if floor is not None else CPU
    valid, missing, *rtt = interleaved(runs, repeats, clock)
    if floor is not None:
        table.row(f"{name} RTT", rtt[0], note=floor[1])
    averify = None if loop is None else per_await(manager.averify, sample, repeats, loop, clock)
    note = f"{valid - rtt[0]:+.1f} µs over the bare round trip" if rtt else ""
    table.row(name, valid, missing, averify, note=note)


def round_trip_floor(store: KeyStore) -> tuple[Callable[[str], object], str] | None:
    """For a networked store, the bare driver call one check needs, and what it is."""
    if isinstance(store, RedisStore):
        get, record_key = store._client.get, store.record_key

        def fetch(key: str) -> object:
            return get(record_key(digest_key(key)))

        return fetch, "bare GET of one record (+ sha256)"
    if isinstance(store, PostgresStore):
        query, pool = store._q_get, store._sync_pool()

        def select(key: str) -> object:
            with pool.connection() as conn:
                return conn.execute(query, (digest_key(key),)).fetchone()

        return select, "bare SELECT by digest on a pooled connection (+ sha256)"
    return None


def drf_api_key(count: int, sample_size: int, repeats: int) -> tuple[float, float] | str:
    """djangorestframework-api-key's ``APIKey.objects.is_valid`` on PostgreSQL with ``count``
    keys: (valid µs, unknown µs), or why it was not measured."""
    # Imported by name: Django ships no type information, and it is optional here.
    try:
        django = importlib.import_module("django")
        settings = importlib.import_module("django.conf").settings
        call_command = importlib.import_module("django.core.management").call_command
        importlib.import_module("rest_framework_api_key")
    except ImportError:
        return "not installed: pip install djangorestframework-api-key"
    import psycopg
    from psycopg import sql

    schema = "kgbench_drf_" + secrets.token_hex(4)
    dsn = psycopg.conninfo.conninfo_to_dict(POSTGRES_DSN)
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(schema)))
    try:
        settings.configure(
            DATABASES={
                "default": {
                    "ENGINE": "django.db.backends.postgresql",
                    "NAME": dsn.get("dbname", "test"),
                    "USER": dsn.get("user", ""),
                    "PASSWORD": dsn.get("password", ""),
                    "HOST": dsn.get("host", ""),
                    "PORT": dsn.get("port", ""),
                    "OPTIONS": {"options": f"-c search_path={schema}"},
                }
            },
            INSTALLED_APPS=["rest_framework", "rest_framework_api_key"],
            USE_TZ=True,
        )
        django.setup()
        concatenate = importlib.import_module("rest_framework_api_key.crypto").concatenate
        APIKey = importlib.import_module("rest_framework_api_key.models").APIKey

        call_command("migrate", "rest_framework_api_key", verbosity=0)
        generator = APIKey.objects.key_generator
        keys, objects = [], []
        for _ in range(count):
            prefix = generator.get_prefix()
            key = concatenate(prefix, secrets.token_urlsafe(24))
            hashed = generator.hash(key)
            keys.append(key)
            objects.append(
                APIKey(id=concatenate(prefix, hashed), prefix=prefix, hashed_key=hashed, name="b")
            )
        APIKey.objects.bulk_create(objects, batch_size=5000)
        sample = keys[:: max(1, count // sample_size)][:sample_size]
        unknown = [concatenate(generator.get_prefix(), "x" * 32) for _ in sample]
        assert all(APIKey.objects.is_valid(k) for k in sample)
        assert not any(APIKey.objects.is_valid(k) for k in unknown)
        valid = per_call(APIKey.objects.is_valid, sample, repeats, WALL)
        missing = per_call(APIKey.objects.is_valid, unknown, repeats, WALL)
        importlib.import_module("django.db").connection.close()
        return valid, missing
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP SCHEMA {} CASCADE").format(sql.Identifier(schema)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=100_000, help="keys in each store")
    parser.add_argument("--sample", type=int, default=1000, help="checks per pass")
    parser.add_argument("--repeats", type=int, default=11, help="passes (median taken)")
    parser.add_argument(
        "--stores",
        default="memory,sqlite,redis,postgres",
        help="comma-separated: memory, sqlite, redis, postgres",
    )
    args = parser.parse_args()
    names = args.stores.split(",")

    keys = make_keys(args.keys)
    step = max(1, args.keys // args.sample)
    sample = keys[::step][: args.sample]
    unknown = make_keys(len(sample))
    all_digests = {digest_key(k): k for k in keys}

    def floor(key: str, table: dict[str, str] = all_digests) -> object:
        return table.get(hashlib.sha256(key.encode()).hexdigest())

    print(f"{args.keys:,} keys per store; {len(sample)} checks per pass, {args.repeats} passes")
    table = Table(per_call(floor, sample, args.repeats))
    table.row("floor", table.floor, note="sha256 + dict lookup")

    loop = asyncio.new_event_loop()
    cleanup = ExitStack()
    cleanup.callback(loop.close)
    with tempfile.TemporaryDirectory() as tmp, cleanup:
        for name in names:
            started = time.perf_counter()
            if name == "memory":
                store: KeyStore = load_memory(keys)
            elif name == "sqlite":
                store = load_sqlite(keys, Path(tmp))
            elif name == "redis":
                store = load_redis(keys, cleanup.enter_context(scratch_redis_namespace()))
            elif name == "postgres":
                store = load_postgres(keys, cleanup.enter_context(scratch_postgres_table()))
            else:
                parser.error(f"unknown store {name!r}")
            loaded = time.perf_counter() - started
            networked = isinstance(store, (RedisStore, PostgresStore))
            measure(table, name, store, sample, unknown, args.repeats, loop if networked else None)
            print(f"{'':<20} (loaded {args.keys:,} keys in {loaded:.1f} s)")
            cached = CachedStore(store, ttl=3600, max_entries=max(10_000, 2 * len(sample)))
            if cached.flood_filter:  # measure once its load no longer competes for the CPU
                cached.wait_until_filtering(300)
            measure(table, f"cached({name})", cached, sample, unknown, args.repeats, loop)
            cached.close()  # also closes the inner store
            del store, cached
            gc.collect()
        if "postgres" in names:
            drf = drf_api_key(args.keys, len(sample), args.repeats)
            if isinstance(drf, str):
                print(f"{'drf-api-key':<20} {drf}")
            else:
                table.row(
                    "drf-api-key", drf[0], drf[1], note="APIKey.objects.is_valid, PostgreSQL"
                )


if __name__ == "__main__":
    main()
