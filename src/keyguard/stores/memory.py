"""``MemoryStore``: the default, in-process store (a dict, gone when the process ends).

It keeps the rate-limit and quota counters, the usage counts and the audit events too,
shared by the threads of one process.
"""

from __future__ import annotations

import bisect
import dataclasses
import json
import threading
from collections.abc import Iterator, Sequence
from datetime import datetime
from operator import itemgetter
from typing import Any

from .._counting import Bucket, apply
from .._frozen import loads
from ..events import KeyEvent
from ..records import KeyInfo
from .base import (
    UsageRow,
    listing_order,
    page_size_checked,
    unchanged,
    unknown_cursor,
    usage_cutoffs,
)

__all__ = ["MemoryStore"]

# Forgotten buckets are swept when the map has grown to twice its size after the last
# sweep (and to at least this): it stays within twice the live buckets, and a charge pays
# a constant share of the sweeps.
_SWEEP_SIZE = 4096
#: The entry of a counter the store does not hold: nothing used, never forgotten.
_ABSENT: tuple[float, float | None] = (0.0, None)

#: A kept audit event: at, key_id, action, actor, and its changes as JSON text.
_Event = tuple[datetime, str, str, str, str]
_event_time = itemgetter(0)


class MemoryStore:
    """Records by digest and by key_id, with listings by user and of all; thread-safe.

    Reads are single dict lookups (atomic under the GIL); writes take a lock so that
    "add if absent" and "revoke if active" cannot race, and so that both maps always
    hold the same record. The listings are key_ids kept in listing order, so a page is
    found by bisection instead of sorting every record for each page.
    """

    def __init__(self) -> None:
        self._records: dict[str, KeyInfo] = {}
        self._by_id: dict[str, KeyInfo] = {}
        self._all: list[str] = []
        #: A user's key_ids: the one key_id itself while the user holds one (most do; a
        #: list of one costs 64 bytes more), then a list in listing order.
        self._by_user: dict[str, str | list[str]] = {}
        self._lock = threading.Lock()
        #: Usage counts: (key_id, step) -> bucket start -> code -> count.
        self._usage: dict[tuple[str, str], dict[int, dict[str, int]]] = {}
        self._usage_lock = threading.Lock()
        self._usage_newest = 0
        #: Counter name -> (value, POSIX time after which it may be forgotten, or None).
        self._counters: dict[str, tuple[float, float | None]] = {}
        self._counter_lock = threading.Lock()
        self._sweep_size = _SWEEP_SIZE
        #: Audit events, oldest first (ties in the order they were added); all kept. Each
        #: holds its changes as JSON text, as the other stores do, which takes about a
        #: third of the memory of the read-only dicts it was given; reads rebuild them.
        self._events: list[_Event] = []
        self._event_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryStore(<{len(self._records)} keys>)"

    def __len__(self) -> int:
        return len(self._records)

    def add(self, info: KeyInfo) -> bool:
        with self._lock:
            if info.digest in self._records or info.key_id in self._by_id:
                return False
            self._records[info.digest] = self._by_id[info.key_id] = info
            ids = self._by_user.get(info.user_id)
            if ids is None:
                self._by_user[info.user_id] = info.key_id
            elif isinstance(ids, str):
                self._by_user[info.user_id] = sorted((ids, info.key_id), key=self._order)
            else:
                bisect.insort(ids, info.key_id, key=self._order)
            bisect.insort(self._all, info.key_id, key=self._order)
            return True

    def _order(self, key_id: str) -> tuple[datetime, str]:
        return listing_order(self._by_id[key_id])

    def get(self, digest: str) -> KeyInfo | None:
        return self._records.get(digest)

    def count_keys(self) -> int:
        return len(self._records)

    def iter_digests(self, page_size: int = 10_000) -> Iterator[str]:
        """Every digest held when the walk starts (a copy, so adds cannot upset it)."""
        page_size_checked(page_size)
        with self._lock:
            digests = list(self._records)
        yield from digests

    def get_by_id(self, key_id: str) -> KeyInfo | None:
        return self._by_id.get(key_id)

    def list_keys(
        self, user_id: str | None = None, *, limit: int | None = None, after: str | None = None
    ) -> list[KeyInfo]:
        with self._lock:
            ids = self._all if user_id is None else self._by_user.get(user_id, [])
            if isinstance(ids, str):
                ids = [ids]
            start = 0
            if after is not None:
                cursor = self._by_id.get(after)
                if cursor is None:
                    raise unknown_cursor(after)
                start = bisect.bisect_right(ids, listing_order(cursor), key=self._order)
            end = len(ids) if limit is None else start + limit
            return [self._by_id[key_id] for key_id in ids[start:end]]

    def revoke(self, digest: str, at: datetime) -> bool:
        with self._lock:
            info = self._records.get(digest)
            if info is None or info.revoked_at is not None:
                return False
            self._replace(info, revoked_at=at)
            return True

    def set_expiry(self, digest: str, expires_at: datetime | None) -> bool:
        with self._lock:
            info = self._records.get(digest)
            if info is None:
                return False
            self._replace(info, expires_at=expires_at)
            return True

    def update(self, info: KeyInfo, expected: KeyInfo) -> bool:
        with self._lock:
            old = self._records.get(info.digest)
            if old is None or not unchanged(old, expected):
                return False
            self._replace(old, metadata=info.metadata, expires_at=info.expires_at)
            return True

    def touch(self, digest: str, at: datetime) -> None:
        with self._lock:
            info = self._records.get(digest)
            if info is not None:
                self._replace(info, last_used_at=at)

    def _replace(self, info: KeyInfo, **changes: Any) -> None:
        """Store ``info`` with ``changes`` under both its digest and its key_id; hold the lock."""
        new = dataclasses.replace(info, **changes)
        self._records[new.digest] = self._by_id[new.key_id] = new

    # -- counters ----------------------------------------------------------------------

    def consume(self, buckets: Sequence[Bucket], now: float) -> tuple[bool, list[float]]:
        with self._counter_lock:
            counters = self._counters
            values = []
            for bucket in buckets:
                value, forget = counters.get(bucket.name, _ABSENT)
                values.append(value if forget is None or forget > now else 0.0)
            charged = apply(buckets, values, now)
            if charged is None:
                return False, values
            for i, bucket in enumerate(buckets):
                entry = counters[bucket.name] = charged[i]
                values[i] = entry[0]
            if len(counters) >= self._sweep_size:
                self._sweep(now)
            return True, values

    def adjust(self, bucket: Bucket, delta: float) -> float:
        with self._counter_lock:
            # A count bucket's expiry is its period's end; absent means nothing used.
            entry = self._counters.get(bucket.name)
            value = (0.0 if entry is None else entry[0]) + delta
            self._counters[bucket.name] = (value, bucket.expires_at)
            return value

    def peek(self, names: Sequence[str]) -> list[float]:
        with self._counter_lock:
            return [self._counters.get(n, (0.0, None))[0] for n in names]

    def _sweep(self, now: float) -> None:
        self._counters = {
            name: entry
            for name, entry in self._counters.items()
            if entry[1] is None or entry[1] > now
        }
        self._sweep_size = max(2 * len(self._counters), _SWEEP_SIZE)

    # -- usage counts ------------------------------------------------------------------

    def add_usage(self, rows: Sequence[UsageRow]) -> None:
        with self._usage_lock:
            usage = self._usage
            newest = self._usage_newest
            for key_id, step, start, code, count in rows:
                codes = usage.setdefault((key_id, step), {}).setdefault(start, {})
                codes[code] = codes.get(code, 0) + count
                newest = max(newest, start)
            # Sweep once per hour of bucket time: a pass over every series is not cheap.
            if newest // 3600 > self._usage_newest // 3600:
                self._sweep_usage(newest)
            self._usage_newest = newest

    def _sweep_usage(self, newest: int) -> None:
        """Drop the buckets past their retention; hold the usage lock."""
        cutoffs = usage_cutoffs(newest)
        for (key_id, step), buckets in list(self._usage.items()):
            kept = {start: codes for start, codes in buckets.items() if start >= cutoffs[step]}
            if kept:
                self._usage[key_id, step] = kept
            else:
                del self._usage[key_id, step]

    def read_usage(self, key_id: str, step: str, start: int, end: int) -> list[UsageRow]:
        with self._usage_lock:
            buckets = self._usage.get((key_id, step), {})
            return [
                (key_id, step, at, code, count)
                for at, codes in sorted(buckets.items())
                if start <= at < end
                for code, count in codes.items()
            ]

    # -- audit events ------------------------------------------------------------------

    def add_event(self, event: KeyEvent) -> None:
        changes = json.dumps(event.changes, separators=(",", ":"), ensure_ascii=False)
        kept = (event.at, event.key_id, event.action, event.actor, changes)
        with self._event_lock:
            # insort_right keeps events of the same time in the order they were added.
            bisect.insort_right(self._events, kept, key=_event_time)

    def read_events(
        self, key_id: str | None, since: datetime | None, limit: int
    ) -> list[KeyEvent]:
        found: list[_Event] = []
        with self._event_lock:
            for kept in reversed(self._events):
                if len(found) >= limit or (since is not None and kept[0] < since):
                    break
                if key_id is None or kept[1] == key_id:
                    found.append(kept)
        return [
            KeyEvent(at, event_key_id, action, actor, loads(changes))
            for at, event_key_id, action, actor, changes in found
        ]

    def close(self) -> None:
        """Nothing to release; kept for the contract."""
