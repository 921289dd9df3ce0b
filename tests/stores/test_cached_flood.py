"""CachedStore's flood filter: invented keys are refused without a round trip, real ones never.

The first half drives a fake pushing store whose pushes and connection the test controls;
the second half runs on Redis and PostgreSQL, counting round trips on the wire.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import datetime
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
    store_from_url,
)
from keyguard.stores import _filter
from tests.helpers import Clock
from tests.stores.services import postgres_table, proxied_store, redis_namespace
from tests.stores.test_cached import PUSH_BOUND, kill_listener, record, wait_for

T0 = datetime(2024, 5, 17, 8, 30).astimezone()


class FakeSubscription:
    """A subscription whose connection the test makes and drops."""

    def __init__(self, callback: Callable[[str | None], None]) -> None:
        self.callback = callback
        self.ready = threading.Event()
        self.closed = False
        self.connecting = False

    def connect(self) -> None:
        """(Re)connect as a listener thread would: subscribed, ``callback(None)``, then live.

        As with Redis and PostgreSQL, the subscription receives from before
        ``callback(None)``: a push made while that call runs is delivered, not lost.
        """
        self.connecting = True
        try:
            self.callback(None)
        finally:
            self.ready.set()
            self.connecting = False

    @property
    def receiving(self) -> bool:
        return self.connecting or self.ready.is_set()

    def close(self) -> None:
        self.closed = True
        self.ready.clear()


class PushingStore(MemoryStore):
    """A MemoryStore that pushes like Redis: every add, revocation and expiry change is
    told to its subscribers. It counts ``get`` calls, and ``loads`` can be held up."""

    def __init__(self) -> None:
        super().__init__()
        self.subscriptions: list[FakeSubscription] = []
        self.gets = 0
        self.walks = 0
        self.loads_may_finish = threading.Event()
        self.loads_may_finish.set()
        self.failures_left = 0

    def subscribe_invalidations(self, callback: Callable[[str | None], None]) -> FakeSubscription:
        subscription = FakeSubscription(callback)
        self.subscriptions.append(subscription)
        # From another thread, as a listener does (the cache may hold its lock meanwhile).
        threading.Thread(target=subscription.connect, daemon=True).start()
        return subscription

    def push(self, digest: str) -> None:
        for subscription in self.subscriptions:
            if subscription.receiving:
                subscription.callback(digest)

    def add_unpushed(self, info: KeyInfo) -> bool:
        """Add as if the push were lost on the way."""
        return super().add(info)

    def add(self, info: KeyInfo) -> bool:
        added = super().add(info)
        if added:
            self.push(info.digest)
        return added

    def revoke(self, digest: str, at: datetime) -> bool:
        done = super().revoke(digest, at)
        self.push(digest)
        return done

    def get(self, digest: str) -> KeyInfo | None:
        self.gets += 1
        return super().get(digest)

    def count_keys(self) -> int:
        if self.failures_left:
            self.failures_left -= 1
            raise OSError("connection refused")
        return super().count_keys()

    def iter_digests(self, page_size: int = 10_000) -> Iterator[str]:
        self.walks += 1
        for digest in super().iter_digests(page_size):
            assert self.loads_may_finish.wait(10)
            yield digest


@pytest.fixture
def inner() -> PushingStore:
    store = PushingStore()
    for _ in range(20):
        store.add(record())
    return store


@pytest.fixture
def cache(inner: PushingStore) -> Iterator[CachedStore]:
    cache = CachedStore(inner, ttl=60, ruled_out_lookups=0)
    assert cache.wait_until_filtering(5)
    yield cache
    cache.close()


def strangers(n: int) -> list[str]:
    return [secrets.token_hex(32) for _ in range(n)]


# -- when it is on -------------------------------------------------------------------------


def test_it_is_on_by_default_only_where_pushes_keep_it_right() -> None:
    assert CachedStore(PushingStore()).flood_filter is True
    assert CachedStore(PushingStore(), push=False).flood_filter is False
    assert CachedStore(PushingStore(), flood_filter=False).flood_filter is False
    assert CachedStore(MemoryStore()).flood_filter is False  # nothing would tell it of keys
    assert CachedStore(MemoryStore()).wait_until_filtering(0.1) is False


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(lambda: CachedStore(MemoryStore(), flood_filter=True), id="no push"),
        pytest.param(
            lambda: CachedStore(PushingStore(), push=False, flood_filter=True), id="push off"
        ),
    ],
)
def test_asking_for_it_where_it_cannot_be_kept_right_is_refused(
    build: Callable[[], CachedStore],
) -> None:
    with pytest.raises(ValueError, match="flood_filter needs push invalidation"):
        build()


@pytest.mark.parametrize("rate", [-1, float("nan"), float("inf"), "10", True])
def test_ruled_out_lookups_must_be_a_rate(rate: Any) -> None:
    with pytest.raises(ValueError, match="ruled_out_lookups must be a number"):
        CachedStore(PushingStore(), ruled_out_lookups=rate)


def test_store_urls_turn_it_off(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cache_flood_filter must be 0 or 1"):
        store_from_url("memory://?cache_ttl=1&cache_flood_filter=yes")
    with pytest.raises(ValueError, match="flood_filter needs push invalidation"):
        store_from_url("memory://?cache_ttl=1&cache_flood_filter=1")
    cache = store_from_url(f"sqlite:///{tmp_path}/k.db?cache_ttl=1&cache_flood_filter=0")
    assert isinstance(cache, CachedStore) and cache.flood_filter is False
    cache.close()


# -- what it answers -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "asynchronous", [pytest.param(False, id="get"), pytest.param(True, id="aget")]
)
def test_strangers_never_reach_the_store_and_real_keys_always_do(
    cache: CachedStore, inner: PushingStore, asynchronous: bool
) -> None:
    def get(digest: str) -> KeyInfo | None:
        return asyncio.run(cache.aget(digest)) if asynchronous else cache.get(digest)

    real = [info.digest for info in inner.list_keys()]
    assert all(get(digest) is not None for digest in real)
    gets = inner.gets

    # The filter holds 20 digests in 1,024 digests' room: a stranger passes 1 in 10**9.
    assert [get(digest) for digest in strangers(2000)] == [None] * 2000

    assert inner.gets == gets
    assert len(cache) == len(real)  # no "not found" kept: the filter answers them


def test_keys_added_through_the_cache_and_pushed_ones_pass_at_once(
    cache: CachedStore, inner: PushingStore
) -> None:
    ours, theirs = record(), record()

    cache.add(ours)
    inner.add(theirs)  # another process: pushed

    assert cache.get(ours.digest) == ours
    assert cache.get(theirs.digest) == theirs


def test_a_key_whose_push_is_late_is_found_through_a_spare_lookup(inner: PushingStore) -> None:
    clock = Clock(1000.0)
    cache = CachedStore(inner, ttl=60, ruled_out_lookups=2, clock=clock)
    assert cache.wait_until_filtering(5)
    late, later = record(), record()
    inner.add_unpushed(late)

    assert cache.get(late.digest) == late  # a spare lookup: there is no flood
    cache.invalidate()
    inner.gets = 0
    assert cache.get(late.digest) == late  # the filter has it now: no spare lookup spent
    clock.now += 10  # the bucket refills to 2, never more
    assert [cache.get(d) for d in strangers(100)] == [None] * 100
    assert inner.gets == 1 + 2

    inner.add_unpushed(later)
    assert cache.get(later.digest) is None  # in a flood, a late push waits for the push
    clock.now += 0.5  # one spare lookup again
    assert cache.get(later.digest) == later
    cache.close()


def test_while_the_listener_is_down_every_lookup_asks_the_store(
    cache: CachedStore, inner: PushingStore
) -> None:
    subscription = inner.subscriptions[-1]
    subscription.ready.clear()  # the connection dropped: pushes may be lost from now on
    lost = record()
    inner.add_unpushed(lost)

    assert cache.filtering is False
    assert cache.get(lost.digest) == lost
    assert cache.get(strangers(1)[0]) is None
    assert inner.gets == 2


def test_a_reconnection_reloads_and_finds_what_was_added_meanwhile(
    cache: CachedStore, inner: PushingStore
) -> None:
    subscription = inner.subscriptions[-1]
    subscription.ready.clear()
    missed = [record() for _ in range(5)]
    for info in missed:
        inner.add_unpushed(info)
    inner.loads_may_finish.clear()

    threading.Thread(target=subscription.connect, daemon=True).start()
    assert wait_for(lambda: inner.walks == 2, timeout=5) is not None
    # Loading: the old filter is not trusted (it never heard of the missed keys).
    assert cache.filtering is False
    gets = inner.gets
    assert cache.get(strangers(1)[0]) is None
    assert inner.gets == gets + 1

    inner.loads_may_finish.set()
    assert cache.wait_until_filtering(5)
    assert all(cache.get(info.digest) == info for info in missed)
    gets = inner.gets
    assert [cache.get(d) for d in strangers(100)] == [None] * 100
    assert inner.gets == gets


def test_keys_pushed_during_a_load_are_kept(inner: PushingStore) -> None:
    inner.loads_may_finish.clear()
    cache = CachedStore(inner, ttl=60, ruled_out_lookups=0)
    assert wait_for(lambda: inner.walks == 1, timeout=5) is not None
    during = record()
    inner.add(during)  # pushed while the walk is held up (it may or may not see it)

    inner.loads_may_finish.set()
    assert cache.wait_until_filtering(5)

    assert cache.get(during.digest) == during
    cache.close()


def test_a_full_filter_is_replaced_by_a_bigger_one_and_answers_meanwhile(
    inner: PushingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_filter, "MIN_CAPACITY", 32)
    cache = CachedStore(inner, ttl=60, ruled_out_lookups=0)
    assert cache.wait_until_filtering(5)
    flood = cache._filter
    assert flood is not None and flood.bloom is not None and flood.bloom.capacity == 40
    full = flood.bloom
    inner.loads_may_finish.clear()

    added = [record() for _ in range(25)]  # 45 keys: over the 40 it was sized for
    for info in added:
        cache.add(info)
    assert wait_for(lambda: inner.walks == 2, timeout=5) is not None
    assert cache.filtering is True  # the full filter still answers, rightly, while loading
    late = record()
    inner.add(late)

    inner.loads_may_finish.set()
    assert wait_for(lambda: flood.bloom is not full, timeout=5) is not None
    assert flood.bloom is not None and flood.bloom.capacity >= 80  # twice the keys it found
    assert all(cache.get(info.digest) == info for info in [*added, late])
    gets = inner.gets
    assert [cache.get(d) for d in strangers(200)] == [None] * 200
    assert inner.gets <= gets + 2  # 1 % at most of them are false positives
    cache.close()


def test_a_failing_load_is_retried(inner: PushingStore, caplog: pytest.LogCaptureFixture) -> None:
    inner.failures_left = 2

    cache = CachedStore(inner, ttl=60)

    assert cache.wait_until_filtering(5)
    assert "could not load its flood filter (OSError: connection refused)" in caplog.text
    cache.close()


def test_close_stops_a_load_waiting_to_retry(inner: PushingStore) -> None:
    inner.failures_left = 10**6  # the store stays down
    cache = CachedStore(inner, ttl=60)
    assert wait_for(lambda: inner.failures_left < 10**6 - 3, timeout=5) is not None

    started = time.monotonic()
    cache.close()

    assert time.monotonic() - started < 5  # not after the back-off, let alone ten retries
    assert not [t for t in threading.enumerate() if t.name == "keyguard-filter-load"]
    assert repr(cache).endswith("push=True, flood_filter=True)")


def test_close_stops_a_load_in_progress(inner: PushingStore) -> None:
    inner.loads_may_finish.clear()
    cache = CachedStore(inner, ttl=60)
    assert wait_for(lambda: inner.walks == 1, timeout=5) is not None

    releaser = threading.Timer(0.2, inner.loads_may_finish.set)
    releaser.start()
    cache.close()

    assert not [t for t in threading.enumerate() if t.name == "keyguard-filter-load"]
    assert cache.filtering is False
    releaser.join()


def test_a_forked_child_loads_its_own_filter(cache: CachedStore, inner: PushingStore) -> None:
    flood = cache._filter
    assert flood is not None and flood.bloom is not None
    before = flood.bloom

    cache._reset_after_fork()  # what os.register_at_fork runs in the child
    assert cache.filtering is False
    lost = record()
    inner.add_unpushed(lost)  # between the fork and the new subscription

    assert cache.get(lost.digest) == lost  # not filtered: it asks, and resubscribes
    assert cache.wait_until_filtering(5)
    assert flood.bloom is not before
    assert cache.get(lost.digest) == lost


def test_revocations_still_reach_the_cache(cache: CachedStore, inner: PushingStore) -> None:
    info = record()
    cache.add(info)
    assert cache.get(info.digest) == info

    inner.revoke(info.digest, T0)

    assert cache.get(info.digest) == inner.get(info.digest) != info


# -- on Redis and PostgreSQL ----------------------------------------------------------------


def push_pair(kind: str, cleanup: ExitStack) -> tuple[RedisStore | PostgresStore, KeyStore]:
    """A store for "this worker" and one for "another process", on one namespace/table."""
    if kind == "redis":
        url, namespace = cleanup.enter_context(redis_namespace())
        ours: RedisStore | PostgresStore = RedisStore(url, namespace=namespace)
        theirs: KeyStore = RedisStore(url, namespace=namespace)
    else:
        dsn, table = cleanup.enter_context(postgres_table())
        ours = PostgresStore(dsn, table=table, max_size=2)
        # Commits that do not wait for the disk: thousands of keys in a second, not ten.
        fast = f"{dsn}{'&' if '?' in dsn else '?'}options=-c%20synchronous_commit%3Doff"
        theirs = PostgresStore(fast, table=table, max_size=2)
    cleanup.callback(ours.close)
    cleanup.callback(theirs.close)
    return ours, theirs


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_a_flood_of_invented_keys_makes_under_one_round_trip_in_a_hundred(kind: str) -> None:
    """3,000 keys stored; 5,000 random well-formed keys make at most 50 round trips."""
    with ExitStack() as cleanup:
        ours, theirs = push_pair(kind, cleanup)
        issuer = APIKeyManager(theirs, last_used_resolution=None, record_usage=False)
        keys = [issuer.generate_key(user_id=f"u{i % 50}") for i in range(3000)]
        proxied, proxy = cleanup.enter_context(proxied_store(ours))
        # The defaults (ruled_out_lookups=10), on a clock that stands still: the spare lookups
        # are a burst of 10, not 10 for every second a loaded machine happens to take.
        cache = CachedStore(proxied, ttl=60, clock=Clock(1000.0))
        cleanup.callback(cache.close)
        manager = APIKeyManager(cache, last_used_resolution=None, record_usage=False)
        assert cache.wait_until_filtering(30)
        invented = ["sk_" + secrets.token_hex(16) for _ in range(5000)]

        async def averify_then_close(keys: list[str]) -> set[Reason | None]:
            try:
                return {(await manager.averify(key)).reason for key in keys}
            finally:
                await cache.aclose()  # the async connections belong to this loop

        before = proxy.round_trips
        reasons: set[Reason | None] = {manager.verify(key).reason for key in invented[:4000]}
        trips = proxy.round_trips - before
        assert all(manager.validate_key(key) for key in keys)  # not counted: real keys
        before = proxy.round_trips
        # The async path, its connections opened and closed included.
        reasons |= asyncio.run(averify_then_close(invented[4000:]))
        trips += proxy.round_trips - before

        assert reasons == {Reason.NOT_FOUND}
        assert trips <= 50, f"{trips} round trips for 5,000 invented keys"


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_a_key_created_in_another_process_passes_within_a_second(kind: str) -> None:
    with ExitStack() as cleanup:
        ours, theirs = push_pair(kind, cleanup)
        # No spare lookups: only the push can let the new key through the filter.
        cache = CachedStore(ours, ttl=60, ruled_out_lookups=0)
        cleanup.callback(cache.close)
        manager = APIKeyManager(cache, last_used_resolution=None, record_usage=False)
        assert cache.wait_until_filtering(30)
        issuer = APIKeyManager(theirs, last_used_resolution=None, record_usage=False)

        for _ in range(3):
            key = issuer.generate_key(user_id="elsewhere")
            took = wait_for(lambda: manager.validate_key(key), timeout=PUSH_BOUND)  # noqa: B023
            assert took is not None, f"a key created elsewhere was refused {PUSH_BOUND}s on"


class DeafCache(CachedStore):
    """A cache that loses the pushes naming digests while ``deaf`` (a flaky network)."""

    deaf = False

    def _changed(self, digest: str | None) -> None:
        if digest is None or not self.deaf:
            super()._changed(digest)


@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_after_a_reconnection_keys_whose_pushes_were_lost_pass(kind: str) -> None:
    with ExitStack() as cleanup:
        ours, theirs = push_pair(kind, cleanup)
        cache = DeafCache(ours, ttl=60, ruled_out_lookups=0)
        cleanup.callback(cache.close)
        manager = APIKeyManager(cache, last_used_resolution=None, record_usage=False)
        assert cache.wait_until_filtering(30)
        issuer = APIKeyManager(theirs, last_used_resolution=None, record_usage=False)

        cache.deaf = True
        lost = [issuer.generate_key(user_id="lost") for _ in range(3)]
        time.sleep(0.2)  # time for the pushes to arrive, and be dropped
        assert not any(manager.validate_key(key) for key in lost)  # the filter never heard

        cache.deaf = False
        flood = cache._filter
        assert flood is not None
        deaf = flood.bloom
        kill_listener(kind, cache)  # the reconnection says pushes may have been missed
        assert wait_for(lambda: flood.bloom not in (None, deaf), timeout=30) is not None
        assert cache.wait_until_filtering(30)

        assert all(manager.validate_key(key) for key in lost)
