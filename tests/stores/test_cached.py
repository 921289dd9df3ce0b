"""CachedStore: ttl, LRU bound, negative answers, invalidation (local and pushed), URLs."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from keyguard import (
    APIKeyManager,
    CachedStore,
    KeyInfo,
    KeyStore,
    MemoryStore,
    PostgresStore,
    Reason,
    RedisStore,
    SQLiteStore,
    StoreError,
    store_from_url,
)
from tests.helpers import Clock, CountingStore
from tests.stores.services import postgres_table, proxied_store, redis_namespace

T0 = datetime(2024, 5, 17, 8, 30, tzinfo=timezone.utc)
PUSH_BOUND = 1.0  # seconds: the promise for a revocation made by another process


def record(user_id: str = "u1", **changes: Any) -> KeyInfo:
    info = KeyInfo(
        key_id="key_" + secrets.token_hex(8),
        prefix="sk_",
        hint="sk_…" + secrets.token_hex(2),
        user_id=user_id,
        metadata={"user_id": user_id},
        created_at=T0,
        digest=secrets.token_hex(32),
    )
    return dataclasses.replace(info, **changes)


@pytest.fixture
def clock() -> Clock:
    return Clock(1000.0)


@pytest.fixture
def inner() -> CountingStore:
    return CountingStore()


@pytest.fixture
def cached(inner: CountingStore, clock: Clock) -> Iterator[CachedStore]:
    store = CachedStore(inner, ttl=5, max_entries=3, clock=clock)
    yield store
    store.close()


def wait_for(condition: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``condition()`` held (polled every millisecond), or None on timeout."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if condition():
            return time.monotonic() - start
        time.sleep(0.001)
    return None


# -- ttl and counting ----------------------------------------------------------------------


def test_a_hot_key_reaches_the_inner_store_once_per_ttl(
    cached: CachedStore, inner: CountingStore, clock: Clock
) -> None:
    info = record()
    inner.add(info)

    answers = [cached.get(info.digest) for _ in range(100)]
    clock.now += 4.999
    answers.append(cached.get(info.digest))

    assert answers == [info] * 101
    assert inner.calls["get"] == 1
    clock.now += 0.001  # ttl reached: the next check asks again
    assert cached.get(info.digest) == info
    assert inner.calls["get"] == 2


def test_an_unknown_key_reaches_the_inner_store_once_per_ttl(
    cached: CachedStore, inner: CountingStore, clock: Clock
) -> None:
    garbage = "f" * 64

    assert [cached.get(garbage) for _ in range(100)] == [None] * 100
    assert inner.calls["get"] == 1
    clock.now += 5
    assert cached.get(garbage) is None
    assert inner.calls["get"] == 2


def test_the_ttl_counts_from_the_start_of_the_read(clock: Clock) -> None:
    class SlowStore(CountingStore):
        def get(self, digest: str) -> KeyInfo | None:
            clock.now += 3  # the read itself takes 3 of the 5 seconds
            return super().get(digest)

    inner = SlowStore()
    info = record()
    inner.add(info)
    cached = CachedStore(inner, ttl=5, clock=clock)

    cached.get(info.digest)
    clock.now += 1.999
    cached.get(info.digest)
    clock.now += 0.001
    cached.get(info.digest)

    assert inner.calls["get"] == 2


def test_a_cache_hit_through_the_manager_makes_no_inner_call(
    inner: CountingStore, clock: Clock
) -> None:
    cached = CachedStore(inner, ttl=5, clock=clock)
    manager = APIKeyManager(cached, last_used_resolution=None)
    key = manager.generate_key(user_id="u1")
    unknown = "sk_" + "0" * 32

    results = [manager.validate_key(key) for _ in range(50)]
    refusals = [manager.verify(unknown).reason for _ in range(50)]

    assert results == [True] * 50
    assert refusals == [Reason.NOT_FOUND] * 50
    assert inner.calls["get"] == 2


def test_averify_answers_a_hit_without_the_inner_store(inner: CountingStore, clock: Clock) -> None:
    cached = CachedStore(inner, ttl=5, clock=clock)
    manager = APIKeyManager(cached, last_used_resolution=None)
    key = manager.generate_key(user_id="u1")

    async def check() -> list[bool]:
        return [(await manager.averify(key)).ok for _ in range(20)]

    assert asyncio.run(check()) == [True] * 20
    assert inner.calls["get"] == 1
    assert manager.revoke_key(key) is True
    assert asyncio.run(manager.averify(key)).reason is Reason.REVOKED


def test_touch_updates_the_cached_record_without_a_read(
    cached: CachedStore, inner: CountingStore
) -> None:
    info = record()
    inner.add(info)
    cached.get(info.digest)

    cached.touch(info.digest, T0 + timedelta(minutes=1))

    assert cached.get(info.digest) == dataclasses.replace(
        info, last_used_at=T0 + timedelta(minutes=1)
    )
    assert inner.calls == {"add": 1, "get": 1, "touch": 1}


# -- the LRU bound -------------------------------------------------------------------------


def test_the_least_recently_used_record_is_dropped_first(
    cached: CachedStore, inner: CountingStore
) -> None:
    a, b, c, d = (record() for _ in range(4))
    for info in (a, b, c, d):
        inner.add(info)
    for info in (a, b, c):
        cached.get(info.digest)
    cached.get(a.digest)  # a is now the most recently used; b the least

    cached.get(d.digest)  # a fourth record evicts b
    calls = inner.calls["get"]
    for info in (a, c, d):
        assert cached.get(info.digest) == info
    assert inner.calls["get"] == calls
    cached.get(b.digest)
    assert inner.calls["get"] == calls + 1
    assert len(cached) <= 3


def test_a_flood_of_unknown_keys_does_not_push_out_known_ones(
    cached: CachedStore, inner: CountingStore
) -> None:
    hot = record()
    inner.add(hot)
    cached.get(hot.digest)

    for _ in range(1000):
        assert cached.get(secrets.token_hex(32)) is None

    calls = inner.calls["get"]
    assert cached.get(hot.digest) == hot
    assert inner.calls["get"] == calls
    assert len(cached) == 1 + 3


@pytest.mark.parametrize(
    "asynchronous", [pytest.param(False, id="get"), pytest.param(True, id="aget")]
)
def test_a_failing_read_is_not_cached(clock: Clock, asynchronous: bool) -> None:
    class FlakyStore(CountingStore):
        down = True

        def get(self, digest: str) -> KeyInfo | None:
            if self.down:
                raise StoreError("connection refused")
            return super().get(digest)

    inner = FlakyStore()
    info = record()
    inner.add(info)
    cached = CachedStore(inner, ttl=60, clock=clock)

    def get() -> KeyInfo | None:
        return asyncio.run(cached.aget(info.digest)) if asynchronous else cached.get(info.digest)

    with pytest.raises(StoreError, match="connection refused"):
        get()
    inner.down = False

    assert get() == info
    assert len(cached) == 1


# -- invalidation through this process -----------------------------------------------------


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda s, d: s.revoke(d, T0), id="revoke"),
        pytest.param(lambda s, d: s.set_expiry(d, T0), id="set_expiry"),
        pytest.param(lambda s, d: asyncio.run(s.arevoke(d, T0)), id="arevoke"),
        pytest.param(lambda s, d: asyncio.run(s.aset_expiry(d, T0)), id="aset_expiry"),
    ],
)
def test_a_change_through_the_cache_is_seen_at_once(
    cached: CachedStore,
    inner: CountingStore,
    change: Callable[[CachedStore, str], object],
) -> None:
    info = record()
    inner.add(info)
    assert cached.get(info.digest) == info

    change(cached, info.digest)

    assert cached.get(info.digest) == inner.get(info.digest) != info


@pytest.mark.parametrize(
    "asynchronous", [pytest.param(False, id="add"), pytest.param(True, id="aadd")]
)
def test_adding_a_key_replaces_a_cached_not_found(cached: CachedStore, asynchronous: bool) -> None:
    info = record()
    assert cached.get(info.digest) is None

    assert (asyncio.run(cached.aadd(info)) if asynchronous else cached.add(info)) is True

    assert cached.get(info.digest) == info


def test_revoking_through_the_manager_refuses_the_key_at_once(clock: Clock) -> None:
    manager = APIKeyManager(CachedStore(MemoryStore(), ttl=3600, clock=clock))
    key = manager.generate_key(user_id="u1")
    assert manager.validate_key(key)

    assert manager.revoke_key(key) is True

    assert manager.verify(key).reason is Reason.REVOKED


def test_an_invalidation_during_a_read_keeps_its_answer_out(clock: Clock) -> None:
    started, release = threading.Event(), threading.Event()

    class BlockingStore(CountingStore):
        def get(self, digest: str) -> KeyInfo | None:
            answer = super().get(digest)  # read before the revocation lands
            started.set()
            release.wait(5)
            return answer

    inner = BlockingStore()
    info = record()
    inner.add(info)
    cached = CachedStore(inner, ttl=60, clock=clock)

    with ThreadPoolExecutor(1) as pool:
        stale_read = pool.submit(cached.get, info.digest)
        assert started.wait(5)
        assert cached.revoke(info.digest, T0) is True
        release.set()
        assert stale_read.result() == info  # that read began before the revocation

    assert cached.get(info.digest) == dataclasses.replace(info, revoked_at=T0)
    assert inner.calls["get"] == 2


def test_invalidate_everything(cached: CachedStore, inner: CountingStore) -> None:
    info = record()
    inner.add(info)
    cached.get(info.digest)
    cached.get("0" * 64)

    cached.invalidate()

    assert len(cached) == 0
    cached.get(info.digest)
    assert inner.calls["get"] == 3


def test_operator_paths_are_never_cached(cached: CachedStore, inner: CountingStore) -> None:
    info = record()
    cached.add(info)
    inner.revoke(info.digest, T0)  # behind the cache's back

    assert cached.get_by_id(info.key_id) == dataclasses.replace(info, revoked_at=T0)
    assert cached.list_keys("u1") == [dataclasses.replace(info, revoked_at=T0)]


# -- thread safety -------------------------------------------------------------------------


def test_sixteen_threads_reading_and_revoking_agree_with_the_store() -> None:
    inner = MemoryStore()
    cached = CachedStore(inner, ttl=60, max_entries=50)
    records = [record(f"u{i % 4}") for i in range(200)]
    for info in records:
        inner.add(info)
    barrier = threading.Barrier(16)

    def work(n: int) -> None:
        barrier.wait()
        for i, info in enumerate(records):
            got = cached.get(info.digest)
            assert got is not None and got.key_id == info.key_id
            if i % 16 == n:
                assert cached.revoke(info.digest, T0) is True
                assert cached.get(info.digest).revoked_at == T0  # type: ignore[union-attr]

    with ThreadPoolExecutor(16) as pool:
        for future in [pool.submit(work, n) for n in range(16)]:
            future.result()

    assert all(cached.get(info.digest) == inner.get(info.digest) for info in records)
    assert all(info.revoked_at == T0 for info in inner.list_keys())
    assert len(cached) <= 100


# -- configuration and URLs ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        pytest.param({"ttl": 0}, "ttl must be a positive", id="zero ttl"),
        pytest.param({"ttl": -1.5}, "ttl must be a positive", id="negative ttl"),
        pytest.param({"ttl": "5"}, "ttl must be a positive", id="string ttl"),
        pytest.param({"ttl": float("nan")}, "ttl must be a positive", id="nan ttl"),
        pytest.param({"max_entries": 0}, "max_entries must be a positive", id="no entries"),
        pytest.param({"max_entries": 1.5}, "max_entries must be a positive", id="float entries"),
    ],
)
def test_bad_settings_are_refused(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        CachedStore(MemoryStore(), **options)


def test_the_inner_store_must_follow_the_contract() -> None:
    with pytest.raises(TypeError, match="KeyStore contract"):
        CachedStore({})  # type: ignore[arg-type]


def test_cache_from_url_wraps_any_store(tmp_path: Path) -> None:
    memory = store_from_url("memory://?cache_ttl=2.5")
    sqlite = store_from_url(f"sqlite:///{tmp_path}/k.db?cache_ttl=1&cache_max_entries=50")
    try:
        assert isinstance(memory, CachedStore) and isinstance(memory.inner, MemoryStore)
        assert (memory.ttl, memory.max_entries) == (2.5, 10_000)
        assert isinstance(sqlite, CachedStore) and isinstance(sqlite.inner, SQLiteStore)
        assert (sqlite.ttl, sqlite.max_entries) == (1.0, 50)
        assert sqlite.inner.path == tmp_path / "k.db"
    finally:
        memory.close()
        sqlite.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param("memory://?cache_ttl=0", "cache_ttl must be a positive float", id="zero"),
        pytest.param("memory://?cache_ttl=soon", "cache_ttl must be a positive", id="word"),
        pytest.param("memory://?cache_ttl=inf", "cache_ttl must be a positive", id="inf"),
        pytest.param("memory://?cache_ttl=nan", "cache_ttl must be a positive", id="nan"),
        pytest.param(
            "memory://?cache_max_entries=9", "need cache_ttl=<seconds>", id="size without ttl"
        ),
        pytest.param(
            "memory://?cache_ttl=1&cache_max_entries=1.5",
            "cache_max_entries must be a positive int",
            id="fractional size",
        ),
        pytest.param("memory://?cache_ttl=1&cache_push=yes", "0 or 1", id="push word"),
        pytest.param("memory://?cache_ttl=1&cache=1", "unknown parameter", id="unknown"),
    ],
)
def test_bad_cache_parameters_are_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        store_from_url(url)


# -- push invalidation across processes ------------------------------------------------------


@contextmanager
def push_pair(kind: str) -> Iterator[tuple[RedisStore | PostgresStore, KeyStore]]:
    """Two stores on one namespace/table, as two processes would have them; closed on exit."""
    stores: list[RedisStore | PostgresStore] = []
    with ExitStack() as cleanup:
        if kind == "redis":
            url, namespace = cleanup.enter_context(redis_namespace())
            stores = [RedisStore(url, namespace=namespace) for _ in range(2)]
        else:
            dsn, table = cleanup.enter_context(postgres_table())
            stores = [PostgresStore(dsn, table=table, max_size=2) for _ in range(2)]
        try:
            yield stores[0], stores[1]
        finally:
            for store in stores:
                store.close()


@pytest.fixture(params=["redis", "postgres"])
def shared(request: pytest.FixtureRequest) -> Iterator[tuple[CachedStore, KeyStore]]:
    """A long-ttl cache in "this worker" and a plain store in "another process"."""
    with push_pair(request.param) as (inner, other):
        cache = CachedStore(inner, ttl=3600)
        try:
            assert cache.wait_until_listening(5), "push invalidation never became live"
            yield cache, other
        finally:
            cache.close()


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda s, d: s.revoke(d, T0), id="revoke"),
        pytest.param(lambda s, d: s.set_expiry(d, T0), id="set_expiry"),
        pytest.param(
            lambda s, d: s.update(
                dataclasses.replace(s.get(d), metadata={"user_id": "u2"}), s.get(d)
            ),
            id="update",
        ),
    ],
)
def test_a_change_in_another_process_reaches_the_cache_within_a_second(
    shared: tuple[CachedStore, KeyStore], change: Callable[[KeyStore, str], object]
) -> None:
    cache, other = shared
    info = record()
    other.add(info)
    assert cache.get(info.digest) == info

    change(other, info.digest)
    took = wait_for(lambda: cache.get(info.digest) != info, timeout=PUSH_BOUND)

    assert took is not None, f"still cached {PUSH_BOUND}s after the change"
    assert cache.get(info.digest) == other.get(info.digest)


def test_a_key_created_elsewhere_replaces_a_cached_not_found(
    shared: tuple[CachedStore, KeyStore],
) -> None:
    cache, other = shared
    info = record()
    assert cache.get(info.digest) is None

    other.add(info)

    assert wait_for(lambda: cache.get(info.digest) == info, timeout=PUSH_BOUND) is not None


def test_a_revocation_by_hand_in_sql_reaches_the_cache() -> None:
    import psycopg
    from psycopg import sql

    with postgres_table() as (dsn, table):
        cache = CachedStore(PostgresStore(dsn, table=table, max_size=1), ttl=3600)
        try:
            assert cache.wait_until_listening(5)
            info = record()
            cache.add(info)
            assert cache.get(info.digest) == info
            with psycopg.connect(dsn, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("UPDATE {} SET revoked_at = now() WHERE key_id = %s").format(
                        sql.Identifier(table)
                    ),
                    (info.key_id,),
                )

            took = wait_for(lambda: cache.get(info.digest) != info, timeout=PUSH_BOUND)

            assert took is not None
            assert cache.get(info.digest).revoked_at is not None  # type: ignore[union-attr]
        finally:
            cache.close()


def kill_listener(kind: str, cache: CachedStore) -> None:
    """Cut the listener's connection from the server side, as a failover would."""
    if kind == "redis":
        import redis

        with redis.Redis.from_url(cache.inner._url) as admin:  # type: ignore[attr-defined]
            assert admin.client_kill_filter(_type="pubsub") >= 1
    else:
        import psycopg

        with psycopg.connect(cache.inner._conninfo, autocommit=True) as admin:  # type: ignore[attr-defined]
            killed = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE query ILIKE 'LISTEN %%' AND pid <> pg_backend_pid()"
            ).fetchone()
            assert killed is not None and killed[0] >= 1


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_the_listener_reconnects_and_forgets_what_it_may_have_missed(kind: str) -> None:
    with push_pair(kind) as (inner, other):
        cache = CachedStore(inner, ttl=3600)
        try:
            assert cache.wait_until_listening(5)
            before, after = record(), record()
            other.add(before)
            other.add(after)
            assert cache.get(before.digest) == before

            kill_listener(kind, cache)
            # Whatever happened while it was cut off: all that is cached is dropped.
            assert wait_for(lambda: len(cache) == 0, timeout=5) is not None
            assert cache.wait_until_listening(5)
            assert cache.get(after.digest) == after
            other.revoke(after.digest, T0)

            assert wait_for(lambda: cache.get(after.digest) != after, PUSH_BOUND) is not None
        finally:
            cache.close()


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_close_stops_the_listener_thread(kind: str) -> None:
    with push_pair(kind) as (inner, _):
        cache = CachedStore(inner, ttl=60)
        assert cache.wait_until_listening(5)
        assert any(t.name.startswith("keyguard-listener-") for t in threading.enumerate())

        cache.close()

        assert not [t for t in threading.enumerate() if t.name.startswith("keyguard-listener-")]


def test_push_can_be_turned_off() -> None:
    with push_pair("redis") as (inner, _):
        cache = CachedStore(inner, ttl=60, push=False)

        assert cache.wait_until_listening(0.2) is False
        assert not [t for t in threading.enumerate() if t.name.startswith("keyguard-listener-")]
        cache.close()


# -- what a check costs on the wire --------------------------------------------------------


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_a_cache_hit_costs_no_round_trip(kind: str) -> None:
    with push_pair(kind) as (inner, _), proxied_store(inner) as (proxied, proxy):
        cache = CachedStore(proxied, ttl=60, push=False)
        manager = APIKeyManager(cache, last_used_resolution=None)
        key = manager.generate_key(user_id="u1")
        assert manager.validate_key(key)
        before = proxy.round_trips

        assert all(manager.validate_key(key) for _ in range(100))
        assert asyncio.run(manager.averify(key)).ok

        assert proxy.round_trips == before
        cache.close()


def test_the_listener_loads_the_idna_codec_with_its_module() -> None:
    # Loaded lazily, by a listener thread in a worker forked with gunicorn --preload, the
    # codec failed ("unknown encoding: idna") and the worker missed pushes for seconds.
    code = "import sys, keyguard.stores._listener; print('encodings.idna' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "True", done.stderr
