"""Per-key usage counts: admitted requests and refusals by code, in time buckets.

The request path only calls :meth:`UsageRecorder.record`, which adds one to a counter in
memory. A daemon thread writes what has accumulated to the store once per ``flush_every``
seconds, in one call, so a key costs the store at most one write per second per process
however many requests it serves, and a slow store never slows a request.

**Retention.** Each flush adds its counts to three granularities of UTC buckets at once:

========  ===============  ============================  ==========================
step      kept for         answers                       default range of a query
========  ===============  ============================  ==========================
minute    48 hours         what is happening now         the last hour (60 points)
hour      90 days          trends over a quarter         the last day (24 points)
day       2 years (731 d)  year-over-year, billing       the last 30 days
========  ===============  ============================  ==========================

A key used every minute holds at most 2,880 + 2,160 + 731 buckets per code. Older buckets
are forgotten: the memory and SQL stores delete them once per hour of bucket time, Redis
lets each bucket's hash expire. A query reaching further back than its step's retention
gets zeros there.

**Accuracy.** Counts are exact but not immediate: one reaches the store within
``flush_every`` seconds (a query does not see the counts still in a recorder's buffer;
:meth:`UsageRecorder.flush` writes them). A clean exit writes them too; a process killed
hard loses at most its last ``flush_every`` seconds. When the store is down, counts are
kept and written by a later flush, up to ``max_pending`` distinct (key, minute, code)
buckets; past that, new buckets are dropped (when the queue of the last interval's
requests is summed, at the flush), counted in :attr:`UsageRecorder.dropped`, and logged.

The recorder (the request side, the flush thread and its bounds) and the query side
(:func:`usage`, which sums a family's buckets into points) share the bucket layout, so
they stay in one module, a little over the usual length.
"""

from __future__ import annotations

import atexit
import collections
import logging
import math
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from .exceptions import StoreError
from .stores._fork import reset_after_fork
from .stores.base import USAGE_RETENTION, USAGE_STEPS, UsageRow, UsageStore

__all__ = [
    "DEFAULT_POINTS",
    "MAX_POINTS",
    "OK",
    "USAGE_RETENTION",
    "USAGE_STEPS",
    "UsagePoint",
    "UsageRecorder",
    "sum_points",
    "usage",
]

logger = logging.getLogger("keyguard")

#: The code of an admitted request; every other code is a refusal's problem code.
OK = "ok"
#: The most points one query may return.
MAX_POINTS = 10_000
#: Points a query returns when ``since`` is not given, per step.
DEFAULT_POINTS = {"minute": 60, "hour": 24, "day": 30}

_Pending = dict[tuple[str, int, str], int]
#: Requests queued before ``record`` sums them into buckets itself.
_QUEUE_LIMIT = 10_000  # (key_id, minute start, code) -> count


@dataclass(frozen=True, slots=True)
class UsagePoint:
    """One step of a key's usage: admitted requests, and refusals by problem code."""

    #: The step's first instant (UTC).
    start: datetime
    #: Requests admitted.
    requests: int = 0
    #: Requests refused, by code (``revoked_api_key``, ``rate_limited``, …); no zeros.
    refused: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        """Every request counted in the step, admitted or refused."""
        return self.requests + sum(self.refused.values())


def sum_points(points: Iterable[UsagePoint]) -> UsagePoint:
    """One point adding up ``points`` of the same step (the generations of a key)."""
    points = list(points)
    refused: collections.Counter[str] = collections.Counter()
    for point in points:
        refused.update(point.refused)
    return UsagePoint(points[0].start, sum(p.requests for p in points), dict(refused))


class UsageRecorder:
    """Count requests per key in memory and write the counts to ``store`` in batches.

    :param store: where the counts go (every keyguard store is a
        :class:`~keyguard.stores.base.UsageStore`).
    :param clock: returns the current POSIX time, which places a request in its bucket.
    :param flush_every: seconds between two writes to the store, at least.
    :param max_pending: distinct (key, minute, code) buckets kept in memory while the store
        cannot be written; past that, new ones are dropped (see :attr:`dropped`).

    The background thread starts on the first :meth:`record`, and a forked child starts
    its own (the parent's unwritten counts stay the parent's to write).
    """

    def __init__(
        self,
        store: UsageStore,
        *,
        clock: Callable[[], float] = time.time,
        flush_every: float = 1.0,
        max_pending: int = 100_000,
    ) -> None:
        if not isinstance(store, UsageStore):
            raise TypeError(f"store must keep usage counts (add_usage, read_usage): {store!r}")
        if (
            isinstance(flush_every, bool)
            or not isinstance(flush_every, (int, float))
            or not 0 < flush_every < math.inf
        ):
            raise ValueError(f"flush_every must be a positive number of seconds: {flush_every!r}")
        if isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1:
            raise ValueError(f"max_pending must be a positive int, got {max_pending!r}")
        self.store = store
        self.flush_every = float(flush_every)
        self.max_pending = max_pending
        self._clock = clock
        #: Counts dropped since the recorder was made because its buffer was full.
        self.dropped = 0
        self._unlogged_drops = 0
        self._pending: _Pending = {}
        self._queue: collections.deque[tuple[str, str, float, int]] = collections.deque()
        self._lock = threading.Lock()
        # One flush at a time, so the thread and an explicit flush() never race.
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        _LIVE.add(self)
        reset_after_fork(self, type(self)._reset_after_fork)

    def __repr__(self) -> str:
        return f"UsageRecorder({self.store!r}, flush_every={self.flush_every:g})"

    def record(self, key_id: str, code: str = OK, at: float | None = None, count: int = 1) -> None:
        """Count ``count`` requests of ``key_id`` at POSIX time ``at`` (default: now):
        admitted (``"ok"``) or refused with ``code``. A negative count takes back a count
        made earlier (an admission that a route then refused).

        One append to a thread-safe queue: no lock, no I/O, whatever the store. The queue is
        summed into buckets when it is flushed, at most ``flush_every`` seconds later.
        """
        queue = self._queue
        queue.append((key_id, code, self._clock() if at is None else at, count))
        if len(queue) >= _QUEUE_LIMIT:
            # The thread is behind (a slow store write): sum the queue into the bounded
            # buckets here, so memory stays bounded whatever the store does.
            self._drain()
        if self._thread is None and not self._closed:
            self._start()

    def _start(self) -> None:
        """Start the background thread, once."""
        with self._lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(
                    target=_flush_periodically,
                    args=(weakref.ref(self), self._stop, self.flush_every),
                    name="keyguard-usage",
                    daemon=True,
                )
                self._thread.start()

    def _drain(self) -> None:
        """Sum the queued requests into the pending buckets, within ``max_pending``."""
        queue = self._queue
        with self._lock:
            pending = self._pending
            # Only what is queued now: requests keep arriving while this runs.
            for _ in range(len(queue)):
                key_id, code, at, n = queue.popleft()
                bucket = (key_id, int(at // 60) * 60, code)
                count = pending.get(bucket)
                if count is not None:
                    pending[bucket] = count + n
                elif len(pending) < self.max_pending:
                    pending[bucket] = n
                else:
                    self.dropped += n
                    self._unlogged_drops += n

    def flush(self) -> bool:
        """Write every buffered count to the store now, in one ``add_usage`` call.

        Returns False if the store failed: the error is logged and the counts are kept for
        the next flush.
        """
        with self._flush_lock:
            self._drain()
            with self._lock:
                pending, self._pending = self._pending, {}
                drops, self._unlogged_drops = self._unlogged_drops, 0
            if drops:
                logger.warning(
                    "dropped %d usage count(s): the store could not be written for too long"
                    " (max_pending=%d)",
                    drops,
                    self.max_pending,
                )
            if not pending:
                return True
            try:
                self.store.add_usage(_rows(pending))
            except StoreError as e:
                self._keep(pending)
                logger.warning("could not write usage counts, kept for the next flush: %s", e)
                return False
            except Exception:
                # A store's bug must not end the thread or lose the counts either.
                self._keep(pending)
                logger.exception("could not write usage counts, kept for the next flush")
                return False
            return True

    def _keep(self, pending: _Pending) -> None:
        """Put counts that could not be written back into the buffer, within its bound."""
        with self._lock:
            current = self._pending
            for bucket, count in pending.items():
                if bucket in current:
                    current[bucket] += count
                elif len(current) < self.max_pending:
                    current[bucket] = count
                else:
                    self.dropped += count
                    self._unlogged_drops += count

    def close(self) -> None:
        """Stop the background thread and write the buffered counts; safe to call twice.

        Counts recorded afterwards stay in the buffer until an explicit :meth:`flush`.
        """
        with self._lock:
            self._closed = True
            thread, self._thread = self._thread, None
        self._stop.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        self.flush()
        _LIVE.discard(self)

    def _reset_after_fork(self) -> None:
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._stop = threading.Event()
        self._pending = {}
        self._queue = collections.deque()
        self._unlogged_drops = 0
        self._thread = None


def _flush_periodically(
    ref: weakref.ref[UsageRecorder], stop: threading.Event, every: float
) -> None:
    """The background thread: flush every ``every`` seconds until stopped.

    It holds the recorder only while flushing, so a recorder dropped without ``close()``
    is collected and its thread ends.
    """
    while not stop.wait(every):
        recorder = ref()
        if recorder is None:
            return
        recorder.flush()
        del recorder


def _rows(pending: _Pending) -> list[UsageRow]:
    """The rows that add minute counts to their minute, hour and day buckets."""
    totals: dict[tuple[str, str, int, str], int] = {}
    for (key_id, minute, code), count in pending.items():
        for step, size in USAGE_STEPS.items():
            bucket = (key_id, step, minute - minute % size, code)
            totals[bucket] = totals.get(bucket, 0) + count
    return [(key_id, step, start, code, n) for (key_id, step, start, code), n in totals.items()]


_LIVE: weakref.WeakSet[UsageRecorder] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    """A clean exit writes what every open recorder still holds."""
    for recorder in list(_LIVE):
        recorder.flush()


def _posix(name: str, value: datetime) -> float:
    if not isinstance(value, datetime):
        raise TypeError(f"{name} must be a datetime, not {type(value).__name__}")
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError(f"{name} must be timezone-aware (e.g. datetime.now(timezone.utc))")
    return value.timestamp()


def usage(
    store: UsageStore,
    key_id: str,
    *,
    since: datetime | timedelta | None = None,
    until: datetime | None = None,
    step: str = "hour",
    clock: Callable[[], float] = time.time,
) -> list[UsagePoint]:
    """``key_id``'s usage, one :class:`UsagePoint` per ``step`` in [since, until), oldest first.

    Steps without requests are there too, with zeros, so a chart has no gaps.

    :param since: the first step: a datetime (its step is included), or a timedelta that
        many steps back from ``until``; default :data:`DEFAULT_POINTS` steps.
    :param until: the end (excluded, rounded up to a step); default: after the current step.
    :param step: ``"minute"``, ``"hour"`` or ``"day"`` (UTC).
    :raises ValueError: for an unknown step, an empty or reversed range, a naive datetime,
        or a range of more than :data:`MAX_POINTS` steps.
    """
    size = USAGE_STEPS.get(step) if isinstance(step, str) else None
    if size is None:
        raise ValueError(f"step must be 'minute', 'hour' or 'day', got {step!r}")
    if not isinstance(key_id, str):
        raise TypeError(f"key_id must be a str, not {type(key_id).__name__}")
    if until is None:
        end = (int(clock()) // size + 1) * size
    else:
        end = math.ceil(_posix("until", until) / size) * size
    if since is None:
        start = end - DEFAULT_POINTS[step] * size
    elif isinstance(since, timedelta):
        if since <= timedelta(0):
            raise ValueError(f"since must be a positive timedelta, got {since}")
        start = end - math.ceil(since.total_seconds() / size) * size
    else:
        start = math.floor(_posix("since", since) / size) * size
    if start >= end:
        raise ValueError(f"since ({_utc(start)}) must be before until ({_utc(end)})")
    points = (end - start) // size
    if points > MAX_POINTS:
        raise ValueError(
            f"{points} {step}s asked for; a query returns at most {MAX_POINTS} points:"
            " use a shorter range or a longer step"
        )
    counts: dict[int, tuple[int, dict[str, int]]] = {}
    for _, _, at, code, count in store.read_usage(key_id, step, start, end):
        requests, refused = counts.setdefault(at, (0, {}))
        if code == OK:
            counts[at] = (requests + count, refused)
        elif count:
            refused[code] = refused.get(code, 0) + count
    return [UsagePoint(_utc(at), *counts.get(at, (0, {}))) for at in range(start, end, size)]


def _utc(posix: int) -> datetime:
    return datetime.fromtimestamp(posix, timezone.utc)
