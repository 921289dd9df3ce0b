"""The flood filter: which digests a store holds, known in-process, so invented keys stay out.

A flood of random well-formed keys spread over many addresses gets past failed-attempt
throttling, and a checksum stops typos, not an attacker (anyone computes a valid CRC32).
Every invented key is unknown, so what stops them is knowing the digests that exist:
:class:`~keyguard.CachedStore` keeps a :class:`FloodFilter`, loaded from the store and kept
current by push invalidation, and answers "not found" for a digest it rules out without a
round trip.

Why a Bloom filter: a Python set of 1,000,000 digests takes over 100 MB; this filter takes
2.4 bytes a key (2.3 MiB at 1,000,000) and never rules out a digest it was given, so a real
key is never refused by it. It lets through some strangers (false positives): sized for
``capacity`` at 1 % and loaded with half that, it starts near 0.025 %, and is replaced by
one twice as large once it holds ``capacity`` digests, so it never passes 1 %.

Why keyed positions: the bit positions come from BLAKE2b keyed with a salt drawn for each
filter, not from the digest's own bits. Unkeyed, every process holding the same keys would
hold the same filter, so whoever timed replies to find the invented keys that get through
could replay them against every worker for good; keyed, those keys are one filter's, and
another worker, or this one after its next load, lets through others. The keyed hash costs
about 0.5 µs a lookup, against a round trip of 100 µs or more.

Why a filter rather than a signed key format (a MAC in each key, checked offline): a MAC
needs no memory and no loading, but changes the key format, so every key already issued
would have to be replaced, and every issuer and server would share one more secret. The
filter works with the keys that exist; its price is the load (every digest read once per
process, on a thread, while lookups go to the store as before) and its memory.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import math
import secrets
import threading
from collections.abc import Iterable

from .base import DigestSource

__all__ = ["MIN_CAPACITY", "BloomFilter", "FloodFilter"]

logger = logging.getLogger("keyguard")

#: False-positive rate at ``capacity``; 9.6 bits and 7 positions a key.
ERROR_RATE = 0.01
_HALF = (1 << 64) - 1
#: A filter is sized for twice the digests it is loaded with, and never fewer than this.
MIN_CAPACITY = 1024
_PAGE = 10_000  # digests read per round trip, and added between checks for a newer load
_MIN_BACKOFF = 0.05
_MAX_BACKOFF = 2.0


class BloomFilter:
    """A set of digests that never forgets one and wrongly holds about ``ERROR_RATE`` of others.

    Not thread-safe for writers: two threads adding at once may lose a bit (a false
    negative), so the owner adds under a lock; lookups need none.

    :param capacity: digests it is sized for; past them the false-positive rate climbs.
    """

    __slots__ = ("_bits", "_hasher", "_hashes", "_size", "capacity", "count")

    def __init__(self, capacity: int) -> None:
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"capacity must be a positive int, got {capacity!r}")
        self.capacity = capacity
        #: Digests added that were not already held (a false positive is not counted).
        self.count = 0
        self._size = math.ceil(-capacity * math.log(ERROR_RATE) / math.log(2) ** 2)
        self._hashes = max(1, round(self._size / capacity * math.log(2)))
        self._bits = bytearray((self._size + 7) // 8)
        self._hasher = hashlib.blake2b(key=secrets.token_bytes(16), digest_size=16)

    def __repr__(self) -> str:
        return f"BloomFilter(<{self.count} of {self.capacity} digests, {self.nbytes} bytes>)"

    @property
    def nbytes(self) -> int:
        """Bytes of the bit array: the filter's memory, give or take 100 bytes."""
        return len(self._bits)

    @property
    def full(self) -> bool:
        """Whether it holds more than ``capacity`` digests, so its error rate is over 1 %."""
        return self.count > self.capacity

    def _hash(self, digest: str) -> tuple[int, int]:
        """Two 64-bit halves of the keyed hash: the first position, and the step to the next.

        Positions ``a, a + b, a + 2b, …`` (modulo the size) are as good as k independent
        hashes (Kirsch and Mitzenmacher, 2006) and cost one addition each.
        """
        hasher = self._hasher.copy()
        hasher.update(digest.encode())
        h = int.from_bytes(hasher.digest(), "little")
        return h & _HALF, (h >> 64) | 1

    def add(self, digest: str) -> bool:
        """Hold ``digest`` from now on; return whether it was new (not already held)."""
        return self.update((digest,)) == 1

    def update(self, digests: Iterable[str]) -> int:
        """Hold every one of ``digests``; return how many were new.

        The loop of :meth:`add` with the lookups hoisted: a load adds a million digests.
        """
        bits, size, hashes, positions = self._bits, self._size, self._hashes, self._hash
        new = 0
        for digest in digests:
            position, step = positions(digest)
            added = False
            for _ in range(hashes):
                position %= size
                mask = 1 << (position & 7)
                if not bits[position >> 3] & mask:
                    bits[position >> 3] |= mask
                    added = True
                position += step
            new += added
        self.count += new
        return new

    def __contains__(self, digest: object) -> bool:
        """Whether ``digest`` may have been added: False is certain, True is 99 % or more."""
        if not isinstance(digest, str):
            return False
        bits, size = self._bits, self._size
        position, step = self._hash(digest)
        for _ in range(self._hashes):
            position %= size
            if not bits[position >> 3] & (1 << (position & 7)):
                return False
            position += step
        return True


class FloodFilter:
    """A :class:`BloomFilter` of every digest in ``source``, loaded and reloaded on a thread.

    The owner (a :class:`~keyguard.CachedStore`) calls :meth:`learn` for every digest a push
    names or it adds itself, and :meth:`reload` whenever pushes may have been missed; until
    a load is done :meth:`rules_out` is always False, so every lookup asks the store.

    :param source: the store whose digests it holds.
    :param spare_per_second: lookups a second :meth:`spare_lookup` grants for digests the
        filter rules out anyway (a token bucket of one second's worth).
    :param now: the owner's clock now, from which spare lookups accrue.
    """

    def __init__(self, source: DigestSource, spare_per_second: float, now: float) -> None:
        self.source = source
        self.spare_per_second = spare_per_second
        self.bloom: BloomFilter | None = None  # None: not loaded, rule nothing out
        self.loaded = threading.Event()
        self._lock = threading.Lock()
        #: Digests named since the running load began, added to its filter when it is done.
        self._pending: list[str] | None = None
        self._generation = 0  # a load whose generation has passed gives up
        self._loader: threading.Thread | None = None
        self._stopping = threading.Event()
        self._burst = max(1.0, spare_per_second) if spare_per_second else 0.0
        self._spare = self._burst
        self._spare_at = now

    def rules_out(self, digest: str) -> bool:
        """Whether the store surely holds no ``digest``; False while not loaded."""
        bloom = self.bloom
        return bloom is not None and digest not in bloom

    def spare_lookup(self, now: float) -> bool:
        """Whether a digest ruled out may be looked up anyway (spends one spare lookup)."""
        with self._lock:
            spare = min(self._burst, self._spare + (now - self._spare_at) * self.spare_per_second)
            self._spare_at = now
            if spare < 1:
                self._spare = spare
                return False
            self._spare = spare - 1
            return True

    def learn(self, digest: str) -> None:
        """Let ``digest`` through from now on, and through the filter being loaded."""
        with self._lock:
            if self._pending is not None:
                self._pending.append(digest)
            bloom = self.bloom
            if bloom is not None:
                bloom.add(digest)
                if bloom.full and self._pending is None:
                    self._start_load(keep=True)

    def reload(self) -> None:
        """Forget the filter (pushes may have been missed) and load a new one."""
        with self._lock:
            self._start_load(keep=False)

    def _start_load(self, keep: bool) -> None:
        """Load a new filter on a thread; hold the lock.

        ``keep`` the current one meanwhile when it is merely full (it is still right); after
        pushes may have been missed every lookup asks the store until the new one is in.
        """
        if self._stopping.is_set():
            return
        self._generation += 1
        if not keep:
            self.bloom = None
            self.loaded.clear()
        self._pending = []
        self._loader = threading.Thread(
            target=self._load, args=(self._generation,), name="keyguard-filter-load", daemon=True
        )
        self._loader.start()

    def _load(self, generation: int) -> None:
        """Fill a filter with every digest in the store, then put it in unless overtaken.

        The owner reloads once its subscription is live, so a key added after the walk has
        passed its place is named by a push and kept in ``_pending``. A failing store is
        retried with a back-off.
        """
        backoff = _MIN_BACKOFF
        while True:
            try:
                # Never smaller than the full one it replaces, should the count fall short.
                held = self.bloom.count if self.bloom is not None else 0
                bloom = BloomFilter(max(MIN_CAPACITY, 2 * self.source.count_keys(), 2 * held))
                digests = self.source.iter_digests(_PAGE)
                while page := list(itertools.islice(digests, _PAGE)):
                    if self._generation != generation:
                        return
                    bloom.update(page)
                break
            except Exception as e:
                if self._generation != generation:
                    return
                logger.warning(
                    "keyguard could not load its flood filter (%s: %s); retrying in %.2fs",
                    type(e).__name__,
                    e,
                    backoff,
                )
                if self._stopping.wait(backoff):
                    return
                backoff = min(backoff * 2, _MAX_BACKOFF)
        with self._lock:
            if self._generation != generation or self._pending is None:
                return
            bloom.update(self._pending)
            self._pending = None
            self.bloom = bloom
            self.loaded.set()
            if bloom.full:
                self._start_load(keep=True)

    def close(self) -> None:
        """Stop answering and loading; wait for a load in progress to give up."""
        with self._lock:
            self._stopping.set()
            self._generation += 1
            self.bloom = None
            self._pending = None
            loader, self._loader = self._loader, None
        if loader is not None and loader is not threading.current_thread():
            # A load gives up at its next page, or once the round trip in flight is over.
            loader.join(timeout=10)

    def reset_after_fork(self) -> None:
        """In a forked child, where no loader runs: answer nothing until reloaded."""
        self._lock = threading.Lock()
        self._generation += 1
        self.bloom = None
        self.loaded = threading.Event()
        self._pending = None
        self._loader = None
        stopped, self._stopping = self._stopping.is_set(), threading.Event()
        if stopped:
            self._stopping.set()
