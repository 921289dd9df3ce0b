"""The CounterStore contract (rate limits and quotas), run on every store in ``store``.

Times are explicit POSIX floats: nothing sleeps and nothing reads the clock. Each store is
then checked for exactness across processes (the count every worker shares), for what a
down server does, and for stores made by a keyguard from before counters.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from keyguard import (
    CachedStore,
    KeyInfo,
    KeyStore,
    MemoryStore,
    PostgresStore,
    RedisStore,
    SQLiteStore,
    StoreError,
)
from keyguard.stores.base import AsyncCounterStore, Bucket, CounterStore
from tests.stores.services import (
    REDIS_URL,
    open_store,
    postgres_table,
    proxied_store,
    redis_namespace,
    redis_store,
)

T = 1764780000.123456  # 2025-12-03 16:40:00.123456 UTC: a TAT with all its digits


def counters(store: KeyStore) -> CounterStore:
    assert isinstance(store, CounterStore)
    return store


def rate(name: str = "rate", count: int = 5, period: float = 10.0) -> Bucket:
    """A GCRA bucket of ``count`` units per ``period`` seconds."""
    return Bucket(name, period / count, period, None)


def quota(name: str = "quota", count: int = 3, forget: float | None = None) -> Bucket:
    return Bucket(name, 0.0, count, forget)


def takes(store: CounterStore, buckets: Sequence[Bucket], now: float, times: int) -> list[bool]:
    return [store.consume(buckets, now)[0] for _ in range(times)]


# -- rate buckets (GCRA) -------------------------------------------------------------------


def test_a_rate_bucket_admits_a_burst_of_its_count_then_refuses(store: KeyStore) -> None:
    c = counters(store)
    bucket = rate(count=5, period=10.0)

    assert takes(c, [bucket], T, 6) == [True] * 5 + [False]

    assert c.consume([bucket], T) == (False, [T + 10.0])
    assert c.peek([bucket.name]) == [T + 10.0]


def test_a_full_rate_bucket_admits_again_exactly_one_interval_later(store: KeyStore) -> None:
    c = counters(store)
    bucket = rate(count=5, period=10.0)  # one unit every 2 s
    takes(c, [bucket], T, 5)

    assert c.consume([bucket], T + 2.0 - 1e-3) == (False, [T + 10.0])
    assert c.consume([bucket], T + 2.0) == (True, [T + 12.0])
    assert c.consume([bucket], T + 2.0) == (False, [T + 12.0])


def test_a_rate_bucket_whose_arrival_time_passed_is_full_again(store: KeyStore) -> None:
    c = counters(store)
    bucket = rate(count=5, period=10.0)
    takes(c, [bucket], T, 5)

    later = T + 60.0
    assert c.consume([bucket], later) == (True, [later + 2.0])
    assert takes(c, [bucket], later, 5) == [True] * 4 + [False]


def test_a_tat_keeps_every_digit(store: KeyStore) -> None:
    c = counters(store)
    bucket = Bucket("precise", 0.1, 1.0, None)

    taken, (value,) = c.consume([bucket], T)

    assert taken is True
    assert value == T + 0.1  # the same float, not one rounded to 15 digits or to an int
    assert c.peek(["precise"]) == [T + 0.1]
    assert c.consume([bucket], T + 0.1) == (True, [T + 0.1 + 0.1])


# -- count buckets (quotas) ----------------------------------------------------------------


def test_a_count_bucket_admits_up_to_its_capacity(store: KeyStore) -> None:
    c = counters(store)
    bucket = quota(count=3)

    assert [c.consume([bucket], T + n) for n in range(4)] == [
        (True, [1.0]),
        (True, [2.0]),
        (True, [3.0]),
        (False, [3.0]),
    ]
    assert c.peek(["quota"]) == [3.0]


def test_adjust_adds_credits_to_a_count_bucket(store: KeyStore) -> None:
    c = counters(store)
    bucket = quota(count=3)
    takes(c, [bucket], T, 3)

    assert c.adjust(bucket, -2.0) == 1.0

    assert takes(c, [bucket], T, 3) == [True, True, False]
    assert c.adjust(quota("fresh"), -5.0) == -5.0  # an absent bucket starts from 0
    assert c.adjust(quota("fresh"), 0.5) == -4.5
    assert c.peek(["fresh", "quota"]) == [-4.5, 3.0]


def test_an_expired_count_bucket_is_forgotten(store: KeyStore) -> None:
    c = counters(store)
    bucket = quota(count=2, forget=T + 60.0)

    assert takes(c, [bucket], T, 3) == [True, True, False]
    assert c.consume([bucket], T + 60.0 - 1e-3) == (False, [2.0])
    assert c.consume([bucket], T + 60.0) == (True, [1.0])


def test_peek_of_absent_buckets_is_zero(store: KeyStore) -> None:
    c = counters(store)

    assert c.peek(["never", "charged"]) == [0.0, 0.0]
    assert c.peek([]) == []


@pytest.mark.parametrize("name", ["sqlite", "postgres"])
def test_forgotten_buckets_are_swept(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(f"keyguard.stores.{name}._SWEEP_EVERY", 1)  # sweep on every charge
    with open_store(name, tmp_path) as store:
        c = counters(store)
        c.consume([quota("old", forget=T + 1.0), rate("tat")], T)
        assert c.peek(["old", "tat"]) == [1.0, T + 2.0]

        c.consume([quota("new", forget=T + 10.0)], T + 1.5)
        assert c.peek(["old", "tat", "new"]) == [0.0, T + 2.0, 1.0]

        c.consume([quota("new", forget=T + 10.0)], T + 2.0)
        assert c.peek(["old", "tat", "new"]) == [0.0, 0.0, 2.0]


def test_the_memory_store_sweeps_when_its_map_has_doubled(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("keyguard.stores.memory._SWEEP_SIZE", 2)
    c = MemoryStore()
    c.consume([quota("old", forget=T + 1.0), rate("tat")], T)  # 2 held: swept, none gone
    c.consume([quota("new", forget=T + 10.0)], T + 1.5)  # 3 held, next sweep at 4
    assert c.peek(["old", "tat", "new"]) == [1.0, T + 2.0, 1.0]

    c.consume([quota("newer", forget=T + 10.0)], T + 2.0)  # 4 held: swept
    assert c.peek(["old", "tat", "new", "newer"]) == [0.0, 0.0, 1.0, 1.0]
    assert len(c._counters) == 2


# -- all or nothing ------------------------------------------------------------------------


@pytest.mark.parametrize("full", ["rate", "quota"])
def test_a_refused_request_charges_no_bucket(store: KeyStore, full: str) -> None:
    c = counters(store)
    buckets = [rate("a", count=2), rate("b", count=10), quota("q", count=2)]
    if full == "rate":
        takes(c, buckets[:1], T, 2)
    else:
        takes(c, buckets[2:], T, 2)
    before = c.peek(["a", "b", "q"])

    taken, values = c.consume(buckets, T)

    assert taken is False
    assert values == before
    assert c.peek(["a", "b", "q"]) == before


def test_an_admitted_request_charges_every_bucket(store: KeyStore) -> None:
    c = counters(store)
    buckets = [rate("a", count=2), rate("b", count=10), quota("q", count=2)]

    assert c.consume(buckets, T) == (True, [T + 5.0, T + 1.0, 1.0])
    assert c.consume(buckets, T) == (True, [T + 10.0, T + 2.0, 2.0])
    assert c.consume(buckets, T) == (False, [T + 10.0, T + 2.0, 2.0])
    assert c.peek(["a", "b", "q"]) == [T + 10.0, T + 2.0, 2.0]


# -- the async twin ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["redis", "postgres", "cached-redis", "cached-sqlite"])
def test_concurrent_tasks_take_exactly_the_capacity(name: str, tmp_path: Path) -> None:
    with open_store(name, tmp_path) as store:
        assert isinstance(store, AsyncCounterStore)
        # Redis forgets a rate bucket once it is full again, by a TTL counted from the
        # charge's time: with fake times, a long interval keeps it well past the test.
        buckets = [rate(count=100, period=10000.0), quota(count=20)]

        async def main() -> None:
            try:
                results = await asyncio.gather(*(store.aconsume(buckets, T) for _ in range(50)))
                assert [taken for taken, _ in results].count(True) == 20
                assert await store.apeek(["quota"]) == [20.0]
                assert await store.aadjust(buckets[1], -1.0) == 19.0
                tat = T
                for _ in range(21):
                    tat += 100.0
                assert await store.aconsume(buckets, T) == (True, [tat, 20.0])
            finally:
                await store.aclose()  # type: ignore[attr-defined]

        asyncio.run(main())


# -- one count shared by every worker ------------------------------------------------------

PROCESSES = 4
THREADS = 50
CAPACITY = 100


def _open_counters(kind: str, where: str) -> CounterStore:
    if kind == "sqlite":
        return SQLiteStore(where, timeout=30.0)
    if kind == "redis":
        url, namespace = where.split(" ")
        return RedisStore(url, namespace=namespace)
    return PostgresStore(where.split(" ")[0], table=where.split(" ")[1], max_size=5)


def _charge_from_threads(kind: str, where: str, barrier: Any, results: Any) -> None:
    """A worker process: THREADS threads each try to take one unit at the same moment."""
    store = _open_counters(kind, where)
    bucket = quota(count=CAPACITY)
    taken: list[bool] = []
    start = threading.Barrier(THREADS)

    def charge() -> None:
        start.wait()
        taken.append(store.consume([bucket], T)[0])

    threads = [threading.Thread(target=charge) for _ in range(THREADS)]
    barrier.wait()  # every process is ready: they all charge at once
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    store.close()  # type: ignore[attr-defined]
    results.put(taken.count(True))


@contextmanager
def shared_location(kind: str, tmp_path: Path) -> Iterator[str]:
    """Where the worker processes find one store of ``kind``, created here first."""
    if kind == "sqlite":
        path = tmp_path / "keys.db"
        SQLiteStore(path).close()
        yield str(path)
    elif kind == "redis":
        with redis_namespace() as (url, namespace):
            yield f"{url} {namespace}"
    else:
        with postgres_table() as (dsn, table):
            PostgresStore(dsn, table=table).close()
            yield f"{dsn} {table}"


@pytest.mark.parametrize("kind", ["sqlite", "redis", "postgres"])
def test_four_processes_of_fifty_threads_take_exactly_the_capacity(
    kind: str, tmp_path: Path
) -> None:
    ctx = multiprocessing.get_context("spawn")
    with shared_location(kind, tmp_path) as where:
        barrier = ctx.Barrier(PROCESSES)
        results = ctx.Queue()
        workers = [
            ctx.Process(target=_charge_from_threads, args=(kind, where, barrier, results))
            for _ in range(PROCESSES)
        ]
        for worker in workers:
            worker.start()
        try:
            taken = [results.get(timeout=60) for _ in workers]
        finally:
            for worker in workers:
                worker.join(timeout=30)
            results.close()
            results.join_thread()

        assert [w.exitcode for w in workers] == [0] * PROCESSES
        assert sum(taken) == CAPACITY
        store = _open_counters(kind, where)
        try:
            assert store.peek(["quota"]) == [float(CAPACITY)]
        finally:
            store.close()  # type: ignore[attr-defined]


def test_threads_of_one_process_take_exactly_the_capacity() -> None:
    store = MemoryStore()
    bucket = quota(count=CAPACITY)
    start = threading.Barrier(THREADS * 2)
    taken: list[bool] = []

    def charge() -> None:
        start.wait()
        taken.append(store.consume([bucket], T)[0])

    threads = [threading.Thread(target=charge) for _ in range(THREADS * 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert taken.count(True) == CAPACITY


# -- network stores: one round trip, and a server that fails -------------------------------


@pytest.mark.parametrize("name", ["redis", "postgres"])
def test_a_charge_is_one_round_trip(name: str, tmp_path: Path) -> None:
    with open_store(name, tmp_path) as store:
        assert isinstance(store, (RedisStore, PostgresStore))
        with proxied_store(store) as (proxied, proxy):
            buckets = [rate(), rate("hourly", count=1000, period=3600.0), quota()]
            proxied.consume(buckets, T)  # connects, and Redis loads the script
            before = proxy.round_trips
            proxied.consume(buckets, T)
            assert proxy.round_trips - before == 1

            async def second_charge() -> int:
                try:
                    await proxied.aconsume(buckets, T)  # this loop's connection
                    before = proxy.round_trips
                    await proxied.aconsume(buckets, T)
                    return proxy.round_trips - before
                finally:
                    await proxied.aclose()

            assert asyncio.run(second_charge()) == 1


@pytest.mark.parametrize("name", ["redis", "postgres"])
def test_a_silent_server_makes_a_charge_a_store_error_within_the_timeout(
    name: str, tmp_path: Path
) -> None:
    option = {"socket_timeout": 1.0} if name == "redis" else {"timeout": 1.0}
    with open_store(name, tmp_path) as store:
        assert isinstance(store, (RedisStore, PostgresStore))
        with proxied_store(store, **option) as (proxied, proxy):
            assert proxied.consume([quota()], T) == (True, [1.0])

            proxy.silent = True
            started = time.monotonic()
            with pytest.raises(StoreError):
                proxied.consume([quota()], T)
            with pytest.raises(StoreError):
                asyncio.run(proxied.aconsume([quota()], T))
            with pytest.raises(StoreError):
                proxied.peek(["quota"])
            assert time.monotonic() - started < 15  # about 1 s each, not forever


def test_a_down_redis_makes_every_counter_call_a_store_error() -> None:
    store = RedisStore("redis://127.0.0.1:1/0", socket_connect_timeout=1.0)
    try:
        with pytest.raises(StoreError, match="could not charge counters"):
            store.consume([quota()], T)
        with pytest.raises(StoreError, match="could not adjust a counter"):
            store.adjust(quota(), -1.0)
        with pytest.raises(StoreError, match="could not read counters"):
            store.peek(["quota"])
        with pytest.raises(StoreError, match="could not charge counters"):
            asyncio.run(store.aconsume([quota()], T))
    finally:
        store.close()


def test_redis_counters_live_under_the_namespace() -> None:
    with redis_store() as store:
        # One unit of 5 per 600 s: the bucket is full again after 120 s, long before the
        # period, with room for a slow machine between the charge and the PTTL below.
        store.consume([rate("r", period=600.0), quota("q", forget=T + 3600)], T)
        store.adjust(quota("credits"), -1.0)

        import redis

        with redis.Redis.from_url(REDIS_URL) as client:
            names = sorted(k.decode() for k in client.scan_iter(match=f"{store.namespace}:*"))
            assert names == [store.counter_key(n) for n in ("credits", "q", "r")]
            # Expiry runs from the caller's clock: a rate bucket lasts until it is full.
            assert 60_000 < client.pttl(store.counter_key("r")) <= 120_000
            assert 3590_000 < client.pttl(store.counter_key("q")) <= 3600_000
            assert client.pttl(store.counter_key("credits")) == -1


# -- stores made before counters -----------------------------------------------------------


def _drop_sqlite_counters(path: Path) -> None:
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("DROP TABLE keyguard_counters")
        conn.commit()


def test_a_sqlite_store_from_before_counters_gets_their_table(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    SQLiteStore(path).close()
    _drop_sqlite_counters(path)

    store = SQLiteStore(path)
    try:
        assert store.consume([quota()], T) == (True, [1.0])
    finally:
        store.close()


def test_a_sqlite_store_from_before_counters_opens_without_creating_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    SQLiteStore(path).close()
    _drop_sqlite_counters(path)

    store = SQLiteStore(path, create_schema=False)
    try:
        assert store.list_keys() == []
        assert store.peek(["quota"]) == [0.0]
        with pytest.raises(StoreError, match="no counters table"):
            store.consume([quota()], T)
        with pytest.raises(StoreError, match="no counters table"):
            store.adjust(quota(), -1.0)
    finally:
        store.close()


def test_a_postgres_store_from_before_counters_gets_them(tmp_path: Path) -> None:
    with postgres_table() as (dsn, table):
        PostgresStore(dsn, table=table).close()
        _drop_postgres_counters(dsn, table)

        store = PostgresStore(dsn, table=table, create_schema=False)
        try:
            assert store.list_keys() == []
            with pytest.raises(StoreError, match="has no counters"):
                store.consume([quota()], T)
            with pytest.raises(StoreError, match="has no counters"):
                store.peek(["quota"])
        finally:
            store.close()

        store = PostgresStore(dsn, table=table)
        try:
            assert store.consume([quota()], T) == (True, [1.0])
        finally:
            store.close()


def _drop_postgres_counters(dsn: str, table: str) -> None:
    import psycopg

    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP TABLE {table}_counters")
        conn.execute(f"DROP FUNCTION {table}_consume")


# -- CachedStore ---------------------------------------------------------------------------


class KeysOnly:
    """A KeyStore without counters, as a third-party store written before them is."""

    def __init__(self) -> None:
        self.keys = MemoryStore()

    def add(self, info: KeyInfo) -> bool:
        return self.keys.add(info)

    def get(self, digest: str) -> KeyInfo | None:
        return self.keys.get(digest)

    def get_by_id(self, key_id: str) -> KeyInfo | None:
        return self.keys.get_by_id(key_id)

    def list_keys(
        self, user_id: str | None = None, *, limit: int | None = None, after: str | None = None
    ) -> list[KeyInfo]:
        return self.keys.list_keys(user_id, limit=limit, after=after)

    def revoke(self, digest: str, at: datetime) -> bool:
        return self.keys.revoke(digest, at)

    def set_expiry(self, digest: str, expires_at: datetime | None) -> bool:
        return self.keys.set_expiry(digest, expires_at)

    def update(self, info: KeyInfo, expected: KeyInfo) -> bool:
        return self.keys.update(info, expected)

    def touch(self, digest: str, at: datetime) -> None:
        self.keys.touch(digest, at)

    def close(self) -> None:
        self.keys.close()


def test_a_cached_store_over_a_store_without_counters_says_so() -> None:
    cached = CachedStore(KeysOnly())

    with pytest.raises(TypeError, match="keeps no counters"):
        cached.consume([quota()], T)
    with pytest.raises(TypeError, match="keeps no counters"):
        cached.adjust(quota(), -1.0)
    with pytest.raises(TypeError, match="keeps no counters"):
        asyncio.run(cached.apeek(["quota"]))


def test_a_cached_store_never_caches_counters(tmp_path: Path) -> None:
    with open_store("cached-sqlite", tmp_path) as store:
        assert isinstance(store, CachedStore)
        other = SQLiteStore(tmp_path / "keys.db")  # another worker on the same file
        try:
            assert store.consume([quota()], T) == (True, [1.0])
            assert other.consume([quota()], T) == (True, [2.0])
            assert store.peek(["quota"]) == [2.0]
        finally:
            other.close()
