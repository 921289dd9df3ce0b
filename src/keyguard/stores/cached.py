"""``CachedStore``: an in-process LRU in front of any store, with bounded staleness.

A hot key costs no call to the inner store within ``ttl`` and a repeated unknown key
reaches it once per ``ttl``. Changes made through this process drop the entry at once;
changes made elsewhere are seen within ``ttl`` at most, and within milliseconds when the
inner store pushes invalidations (Redis pub/sub, PostgreSQL LISTEN/NOTIFY).

Over such a store it also keeps a flood filter (:mod:`keyguard.stores._filter`): a Bloom
filter of every digest in the store, loaded on a background thread and kept current by the
same pushes, so a key nobody issued is refused without a round trip. Such keys reach the
store only as the filter's false positives and through ``ruled_out_lookups``: a few
lookups a second granted anyway, so that a key created elsewhere an instant before its push
arrives is found while no flood takes them. It is on by default wherever it can be kept
right (push on, a store that lists its digests), because a flood is a risk for every such
deployment and the filter costs 2.4 bytes a key and one background load per process.

Counters, usage counts and audit events pass through to the inner store, never cached;
with their async twins and the filter's wiring they take the module over the house size.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from datetime import datetime

from ..events import KeyEvent
from ..records import KeyInfo
from ._filter import FloodFilter
from ._fork import reset_after_fork
from .base import (
    AsyncCounterStore,
    AsyncKeyStore,
    Bucket,
    CounterStore,
    DigestSource,
    EventStore,
    InvalidationSource,
    KeyStore,
    Subscription,
    UsageRow,
    UsageStore,
)

__all__ = ["CachedStore"]

_MISS = object()
# Free-threaded builds (3.13t) do not make each OrderedDict call atomic: hits take the lock.
_LOCK_FREE_HITS: bool = getattr(sys, "_is_gil_enabled", lambda: True)()


class CachedStore:
    """Cache ``inner``'s answers to :meth:`get` (found and not found) for ``ttl`` seconds.

    :param inner: the store that holds the keys; closed by :meth:`close`.
    :param ttl: seconds an answer may be reused; the staleness bound for a change made
        by another process when push invalidation is off or its connection is down.
    :param max_entries: records kept at most, least recently used dropped first; up to as
        many "not found" answers are kept apart, so a flood of unknown keys cannot push
        hot keys out.
    :param push: subscribe to the inner store's invalidations when it offers them, so that
        every process sees a revocation within about a second.
    :param flood_filter: answer "not found" without asking the store for a digest it does
        not hold, judged by a filter of every digest it holds (see the module docstring).
        None (the default) turns it on when push invalidation is on and the store can list
        its digests (Redis, PostgreSQL). True where it cannot be is a ValueError: without
        pushes the filter would refuse a key created in another process for good.
    :param ruled_out_lookups: store lookups a second still made for digests the filter
        rules out (0 for none), so that a key created elsewhere an instant before its push
        arrives is found while no flood spends them.
    :param clock: monotonic seconds; for tests.

    Listing and lookups by ``key_id`` are operator paths and always go to the inner store.
    Counters (rate limits and quotas) are never cached: every call goes to ``inner``, so
    workers share one count. A ``CachedStore`` has the :class:`CounterStore` methods whatever
    its inner store; they raise TypeError if ``inner`` keeps no counters.

    While the filter loads (at start, in a forked child, and each time the listener
    reconnects, since pushes may have been missed) and while the listener is disconnected,
    every lookup goes to the store as it would without a filter. A listener connection
    that dies without an error is found out by its heartbeat within about 10 s
    (:mod:`keyguard.stores._listener`); until then pushes are lost unnoticed.
    """

    def __init__(
        self,
        inner: KeyStore,
        *,
        ttl: float = 5.0,
        max_entries: int = 10_000,
        push: bool = True,
        flood_filter: bool | None = None,
        ruled_out_lookups: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(inner, KeyStore):
            raise TypeError(f"inner must follow the KeyStore contract, got {inner!r}")
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not 0 < ttl < 1e9:
            raise ValueError(f"ttl must be a positive number of seconds, got {ttl!r}")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be a positive int, got {max_entries!r}")
        if (
            isinstance(ruled_out_lookups, bool)
            or not isinstance(ruled_out_lookups, (int, float))
            or not 0 <= ruled_out_lookups < math.inf
        ):
            raise ValueError(
                f"ruled_out_lookups must be a number of lookups a second >= 0,"
                f" got {ruled_out_lookups!r}"
            )
        self.inner = inner
        self.ttl = float(ttl)
        self.max_entries = max_entries
        self._clock = clock
        self._ainner = inner if isinstance(inner, AsyncKeyStore) else None
        self._counters = inner if isinstance(inner, CounterStore) else None
        self._acounters = inner if isinstance(inner, AsyncCounterStore) else None
        self._found: OrderedDict[str, tuple[float, KeyInfo]] = OrderedDict()
        self._missing: OrderedDict[str, float] = OrderedDict()
        # Bound once for the lock-free hit path (these dicts are cleared, never replaced).
        self._found_get = self._found.get
        self._found_to_end = self._found.move_to_end
        # Reads in flight, and those an invalidation overtook: their answer is not kept.
        self._inflight: dict[str, int] = {}
        self._stale: set[str] = set()
        self._lock = threading.Lock()
        self._push = push and isinstance(inner, InvalidationSource)
        self._subscription: Subscription | None = None
        #: The subscription's ``ready``: set while it is live.
        self._live = threading.Event()
        self._closed = False
        self._filter: FloodFilter | None = None
        if flood_filter is not False and self._push and isinstance(inner, DigestSource):
            self._filter = FloodFilter(inner, float(ruled_out_lookups), clock())
        elif flood_filter:
            raise ValueError(
                "flood_filter needs push invalidation and a store that lists its digests"
                f" (Redis, PostgreSQL); {inner!r} with push={push} has not both"
            )
        if self._push:
            self._subscribe()
        reset_after_fork(self, type(self)._reset_after_fork)

    def __repr__(self) -> str:
        return (
            f"CachedStore({self.inner!r}, ttl={self.ttl:g}, max_entries={self.max_entries},"
            f" push={self._push}, flood_filter={self.flood_filter})"
        )

    # -- the cache ---------------------------------------------------------------------

    def get(self, digest: str) -> KeyInfo | None:
        if _LOCK_FREE_HITS:
            # Under the GIL each OrderedDict call is atomic, so a hit needs no lock: an
            # entry evicted between these two calls only makes move_to_end raise KeyError.
            # (try/except, not contextlib.suppress: this path costs ~0.1 µs in all.)
            entry = self._found_get(digest)
            if entry is not None and entry[0] > self._clock():
                try:  # noqa: SIM105
                    self._found_to_end(digest)
                except KeyError:
                    pass
                return entry[1]
        now = self._clock()
        ruled_out = self._ruled_out(digest)
        cached = self._probe(digest, now, ruled_out)
        if cached is not _MISS:
            return cached  # type: ignore[return-value]
        try:
            info = self.inner.get(digest)
        except BaseException:
            self._settle(digest, None, now, keep=False)
            raise
        if ruled_out and info is not None:
            self._learn(digest)  # created elsewhere an instant ago: its push is on the way
        self._settle(digest, info, now)
        return info

    async def aget(self, digest: str) -> KeyInfo | None:
        if _LOCK_FREE_HITS:
            entry = self._found_get(digest)
            if entry is not None and entry[0] > self._clock():
                try:  # noqa: SIM105
                    self._found_to_end(digest)
                except KeyError:
                    pass
                return entry[1]
        now = self._clock()
        ruled_out = self._ruled_out(digest)
        cached = self._probe(digest, now, ruled_out)
        if cached is not _MISS:
            return cached  # type: ignore[return-value]
        try:
            if self._ainner is not None:
                info = await self._ainner.aget(digest)
            else:
                info = self.inner.get(digest)  # a local store answers inline
        except BaseException:
            self._settle(digest, None, now, keep=False)
            raise
        if ruled_out and info is not None:
            self._learn(digest)  # created elsewhere an instant ago: its push is on the way
        self._settle(digest, info, now)
        return info

    def _probe(self, digest: str, now: float, ruled_out: bool) -> KeyInfo | object | None:
        """The cached answer, or ``_MISS`` after registering a read in flight.

        A digest the flood filter ruled out is not found, unless a spare lookup is left.
        """
        with self._lock:
            entry = self._found.get(digest)
            if entry is not None:
                if entry[0] > now:
                    self._found.move_to_end(digest)
                    return entry[1]
                del self._found[digest]
            deadline = self._missing.get(digest)
            if deadline is not None:
                if deadline > now:
                    self._missing.move_to_end(digest)
                    return None
                del self._missing[digest]
            flood = self._filter
            if ruled_out and flood is not None and not flood.spare_lookup(now):
                return None
            self._inflight[digest] = self._inflight.get(digest, 0) + 1
            if self._subscription is None and self._push and not self._closed:
                self._subscribe()
            return _MISS

    def _settle(
        self, digest: str, info: KeyInfo | None, read_at: float, keep: bool = True
    ) -> None:
        """Keep the answer of a finished read unless an invalidation overtook it."""
        with self._lock:
            left = self._inflight.pop(digest, 1) - 1
            stale = digest in self._stale
            if left:
                self._inflight[digest] = left
            else:
                self._stale.discard(digest)
            if not keep or stale or self._closed:
                return
            # The answer is as old as the read's start: ttl counts from there.
            deadline = read_at + self.ttl
            if info is None:
                self._missing[digest] = deadline
                if len(self._missing) > self.max_entries:
                    self._missing.popitem(last=False)
            else:
                self._found[digest] = (deadline, info)
                if len(self._found) > self.max_entries:
                    self._found.popitem(last=False)

    def invalidate(self, digest: str | None = None) -> None:
        """Forget the answer for ``digest``, or every answer with ``None``; thread-safe."""
        with self._lock:
            if digest is None:
                self._found.clear()
                self._missing.clear()
                self._stale.update(self._inflight)
            else:
                self._found.pop(digest, None)
                self._missing.pop(digest, None)
                if digest in self._inflight:
                    self._stale.add(digest)

    def __len__(self) -> int:
        """Answers held now (found and not found), expired ones included until reused."""
        return len(self._found) + len(self._missing)

    # -- the flood filter --------------------------------------------------------------

    @property
    def flood_filter(self) -> bool:
        """Whether this cache keeps a flood filter (it answers once loaded and listening)."""
        return self._filter is not None

    def _ruled_out(self, digest: str) -> bool:
        """Whether the filter says the store holds no ``digest``, and may be believed now."""
        flood = self._filter
        return flood is not None and self._live.is_set() and flood.rules_out(digest)

    def _learn(self, digest: str) -> None:
        if self._filter is not None:
            self._filter.learn(digest)

    @property
    def filtering(self) -> bool:
        """Whether the flood filter answers now: loaded, and push invalidation live."""
        return self._filter is not None and self._filter.loaded.is_set() and self._live.is_set()

    def wait_until_filtering(self, timeout: float = 30.0) -> bool:
        """Block until the flood filter answers; False on timeout or if there is none."""
        deadline = time.monotonic() + timeout
        if self._filter is None or not self.wait_until_listening(timeout):
            return False
        return self._filter.loaded.wait(max(0.0, deadline - time.monotonic())) and self.filtering

    # -- push invalidation -------------------------------------------------------------

    def _subscribe(self) -> None:
        assert isinstance(self.inner, InvalidationSource)
        self._subscription = self.inner.subscribe_invalidations(self._changed)
        ready = getattr(self._subscription, "ready", None)
        # A subscription that cannot say it is live never lets the filter answer.
        self._live = ready if isinstance(ready, threading.Event) else threading.Event()

    def _changed(self, digest: str | None) -> None:
        """The listener's callback: a record changed, or changes may have been missed."""
        if digest is not None:
            self._learn(digest)  # before its entry goes, so no lookup misses both
        elif self._filter is not None:
            self._filter.reload()
        self.invalidate(digest)

    @property
    def listening(self) -> bool:
        """Whether push invalidation is live (a revocation elsewhere is seen at once)."""
        return self._subscription is not None and self._live.is_set()

    def wait_until_listening(self, timeout: float = 5.0) -> bool:
        """Block until push invalidation is live; False on timeout or if there is none."""
        with self._lock:
            if self._subscription is None and self._push and not self._closed:
                self._subscribe()
        return self._subscription is not None and self._live.wait(timeout)

    def _reset_after_fork(self) -> None:
        """A forked child has no listener thread: forget all, resubscribe on first use (and
        load the filter again once listening: a salt of its own, no push missed)."""
        self._lock = threading.Lock()
        self._found.clear()
        self._missing.clear()
        self._inflight.clear()
        self._stale.clear()
        self._subscription = None
        self._live = threading.Event()
        if self._filter is not None:
            self._filter.reset_after_fork()

    # -- writes go through, then drop the entry ----------------------------------------

    def add(self, info: KeyInfo) -> bool:
        self._learn(info.digest)  # before the store has it: the filter may hold one too many
        try:
            return self.inner.add(info)
        finally:
            self.invalidate(info.digest)

    def get_by_id(self, key_id: str) -> KeyInfo | None:
        return self.inner.get_by_id(key_id)

    def list_keys(
        self, user_id: str | None = None, *, limit: int | None = None, after: str | None = None
    ) -> list[KeyInfo]:
        return self.inner.list_keys(user_id, limit=limit, after=after)

    def revoke(self, digest: str, at: datetime) -> bool:
        try:
            return self.inner.revoke(digest, at)
        finally:
            self.invalidate(digest)

    def set_expiry(self, digest: str, expires_at: datetime | None) -> bool:
        try:
            return self.inner.set_expiry(digest, expires_at)
        finally:
            self.invalidate(digest)

    def update(self, info: KeyInfo, expected: KeyInfo) -> bool:
        try:
            return self.inner.update(info, expected)
        finally:
            self.invalidate(info.digest)

    def touch(self, digest: str, at: datetime) -> None:
        self.inner.touch(digest, at)
        self._touched(digest, at)

    def _touched(self, digest: str, at: datetime) -> None:
        """Show the new ``last_used_at`` in a cached record without refetching it."""
        with self._lock:
            entry = self._found.get(digest)
            if entry is not None:
                self._found[digest] = (entry[0], dataclasses.replace(entry[1], last_used_at=at))

    # -- counters go through, never cached ---------------------------------------------

    def consume(self, buckets: Sequence[Bucket], now: float) -> tuple[bool, list[float]]:
        return self._counter_store().consume(buckets, now)

    def adjust(self, bucket: Bucket, delta: float) -> float:
        return self._counter_store().adjust(bucket, delta)

    def peek(self, names: Sequence[str]) -> list[float]:
        return self._counter_store().peek(names)

    @property
    def keeps_counters(self) -> bool:
        """Whether the inner store keeps counters (this class always has the methods)."""
        return self._counters is not None

    def _counter_store(self) -> CounterStore:
        if self._counters is None:
            raise TypeError(
                f"{self.inner!r} keeps no counters (it does not follow CounterStore),"
                " so rate limits and quotas cannot be kept in it"
            )
        return self._counters

    # -- usage counts are not cached: they go to the inner store -------------------------

    def _usage_store(self) -> UsageStore:
        inner = self.inner
        if not isinstance(inner, UsageStore):
            raise TypeError(f"{inner!r} does not keep usage counts")
        return inner

    def add_usage(self, rows: Sequence[UsageRow]) -> None:
        self._usage_store().add_usage(rows)

    def read_usage(self, key_id: str, step: str, start: int, end: int) -> list[UsageRow]:
        return self._usage_store().read_usage(key_id, step, start, end)

    # -- audit events are not cached: they go to the inner store ------------------------

    @property
    def keeps_events(self) -> bool:
        """Whether the inner store keeps audit events (this class always has the methods)."""
        return isinstance(self.inner, EventStore)

    def _event_store(self) -> EventStore:
        inner = self.inner
        if not isinstance(inner, EventStore):
            raise TypeError(f"{inner!r} does not keep audit events")
        return inner

    def add_event(self, event: KeyEvent) -> None:
        self._event_store().add_event(event)

    def read_events(
        self, key_id: str | None, since: datetime | None, limit: int
    ) -> list[KeyEvent]:
        return self._event_store().read_events(key_id, since, limit)

    def _stop_listening(self) -> None:
        """Stop the listener and the filter's loading, waiting for both; drop the cache."""
        with self._lock:
            self._closed = True
            subscription, self._subscription = self._subscription, None
            self._found.clear()
            self._missing.clear()
        if subscription is not None:
            subscription.close()
        if self._filter is not None:
            self._filter.close()

    def close(self) -> None:
        """Stop push invalidation and the filter, drop the cache, close the inner store."""
        self._stop_listening()
        self.inner.close()

    # -- the async twin ----------------------------------------------------------------

    async def aadd(self, info: KeyInfo) -> bool:
        self._learn(info.digest)
        try:
            if self._ainner is not None:
                return await self._ainner.aadd(info)
            return self.inner.add(info)
        finally:
            self.invalidate(info.digest)

    async def aget_by_id(self, key_id: str) -> KeyInfo | None:
        if self._ainner is not None:
            return await self._ainner.aget_by_id(key_id)
        return self.inner.get_by_id(key_id)

    async def alist_keys(
        self, user_id: str | None = None, *, limit: int | None = None, after: str | None = None
    ) -> list[KeyInfo]:
        if self._ainner is not None:
            return await self._ainner.alist_keys(user_id, limit=limit, after=after)
        return self.inner.list_keys(user_id, limit=limit, after=after)

    async def arevoke(self, digest: str, at: datetime) -> bool:
        try:
            if self._ainner is not None:
                return await self._ainner.arevoke(digest, at)
            return self.inner.revoke(digest, at)
        finally:
            self.invalidate(digest)

    async def aset_expiry(self, digest: str, expires_at: datetime | None) -> bool:
        try:
            if self._ainner is not None:
                return await self._ainner.aset_expiry(digest, expires_at)
            return self.inner.set_expiry(digest, expires_at)
        finally:
            self.invalidate(digest)

    async def atouch(self, digest: str, at: datetime) -> None:
        if self._ainner is not None:
            await self._ainner.atouch(digest, at)
        else:
            self.inner.touch(digest, at)
        self._touched(digest, at)

    async def aconsume(self, buckets: Sequence[Bucket], now: float) -> tuple[bool, list[float]]:
        if self._acounters is not None:
            return await self._acounters.aconsume(buckets, now)
        return self._counter_store().consume(buckets, now)  # a local store answers inline

    async def aadjust(self, bucket: Bucket, delta: float) -> float:
        if self._acounters is not None:
            return await self._acounters.aadjust(bucket, delta)
        return self._counter_store().adjust(bucket, delta)

    async def apeek(self, names: Sequence[str]) -> list[float]:
        if self._acounters is not None:
            return await self._acounters.apeek(names)
        return self._counter_store().peek(names)

    async def aclose(self) -> None:
        """:meth:`close` for event loops: the listener thread is joined off the loop."""
        await asyncio.to_thread(self._stop_listening)
        if self._ainner is not None:
            await self._ainner.aclose()
        else:
            self.inner.close()
