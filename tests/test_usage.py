"""Usage counts: the recorder's batching, failures and bounds, and the zero-filled query.

Times come from a fake clock; the only waits are short, bounded polls for the background
thread, and most tests flush explicitly.
"""

from __future__ import annotations

import gc
import logging
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import pytest

from keyguard import APIKeyManager, KeyStore, MemoryStore, SQLiteStore, StoreError
from keyguard.stores.base import UsageRow
from keyguard.usage import MAX_POINTS, UsagePoint, UsageRecorder, usage
from tests.helpers import Clock, CountingStore

UTC = timezone.utc
MIDNIGHT = datetime(2024, 5, 17, tzinfo=UTC)
T = MIDNIGHT.timestamp()
KEY = "key_0123456789abcdef"


def at(hours: float) -> datetime:
    return MIDNIGHT + timedelta(hours=hours)


def series(points: Sequence[UsagePoint]) -> list[tuple[str, int, dict[str, int]]]:
    return [(f"{p.start:%d %H:%M}", p.requests, p.refused) for p in points]


class FlakyStore(MemoryStore):
    """A MemoryStore whose usage writes fail while ``error`` is set.

    ``during_write`` runs inside each write, as requests served meanwhile would.
    """

    def __init__(self) -> None:
        super().__init__()
        self.error: Exception | None = StoreError("usage table is locked")
        self.during_write: Callable[[], None] = lambda: None

    def add_usage(self, rows: Sequence[UsageRow]) -> None:
        self.during_write()
        if self.error is not None:
            raise self.error
        super().add_usage(rows)


@pytest.fixture
def clock() -> Clock:
    return Clock(T + 10 * 3600)  # 10:00 UTC


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


def recorder_for(store: MemoryStore, clock: Clock, **options: Any) -> UsageRecorder:
    # A long interval: the background thread never flushes unless a test wants it to.
    return UsageRecorder(store, clock=clock, **{"flush_every": 3600, **options})


# -- buckets and the query -----------------------------------------------------------------


def test_requests_either_side_of_an_hour_fall_in_their_own_buckets(
    store: CountingStore, clock: Clock
) -> None:
    recorder = recorder_for(store, clock)
    clock.now = at(10 + 59 / 60 + 59.9 / 3600).timestamp()  # 10:59:59.9
    recorder.record(KEY)
    clock.now = at(11).timestamp()  # 11:00:00
    recorder.record(KEY)
    recorder.record(KEY, "rate_limited")
    recorder.close()

    minutes = usage(store, KEY, since=at(10 + 59 / 60), until=at(11 + 1 / 60), step="minute")
    hours = usage(store, KEY, since=at(10), until=at(12), step="hour")
    days = usage(store, KEY, since=MIDNIGHT, until=at(24), step="day")

    assert series(minutes) == [("17 10:59", 1, {}), ("17 11:00", 1, {"rate_limited": 1})]
    assert series(hours) == [("17 10:00", 1, {}), ("17 11:00", 1, {"rate_limited": 1})]
    assert series(days) == [("17 00:00", 2, {"rate_limited": 1})]


def test_steps_without_requests_are_there_with_zeros(store: CountingStore, clock: Clock) -> None:
    recorder = recorder_for(store, clock)
    recorder.record(KEY)
    clock.advance(timedelta(hours=3))
    recorder.record(KEY, "revoked_api_key")
    recorder.close()

    points = usage(store, KEY, since=at(0), until=at(24), clock=clock)

    assert len(points) == 24
    assert [p.start for p in points] == [at(h) for h in range(24)]
    assert {h: (p.requests, p.refused) for h, p in enumerate(points) if p.total} == {
        10: (1, {}),
        13: (0, {"revoked_api_key": 1}),
    }
    assert points[0] == UsagePoint(at(0), 0, {})


@pytest.mark.parametrize(
    ("step", "points", "first"),
    [
        pytest.param("minute", 60, at(9 + 31 / 60), id="minute: the last hour"),
        pytest.param("hour", 24, at(-13), id="hour: the last day"),
        pytest.param("day", 30, at(-29 * 24), id="day: the last 30 days"),
    ],
)
def test_default_ranges_end_with_the_current_step(
    store: CountingStore, clock: Clock, step: str, points: int, first: datetime
) -> None:
    clock.now = at(10.5).timestamp()  # 10:30:00

    result = usage(store, KEY, step=step, clock=clock)

    assert len(result) == points
    assert result[0].start == first
    assert result[-1].start <= at(10.5) < result[-1].start + (result[1].start - first)


def test_since_as_a_timedelta_counts_steps_back_from_until(
    store: CountingStore, clock: Clock
) -> None:
    week = usage(store, KEY, since=timedelta(days=7), step="day", clock=clock)
    ninety_minutes = usage(store, KEY, since=timedelta(minutes=90), until=at(12), clock=clock)

    assert [p.start for p in week] == [MIDNIGHT - timedelta(days=d) for d in range(6, -1, -1)]
    assert [p.start for p in ninety_minutes] == [at(10), at(11)]


def test_datetimes_widen_to_whole_steps_in_any_timezone(store: CountingStore) -> None:
    paris = timezone(timedelta(hours=2))
    since = datetime(2024, 5, 17, 12, 30, tzinfo=paris)  # 10:30 UTC
    until = datetime(2024, 5, 17, 12, 15, tzinfo=UTC)

    points = usage(store, KEY, since=since, until=until)

    assert [p.start for p in points] == [at(10), at(11), at(12)]
    assert all(p.start.tzinfo is UTC for p in points)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        pytest.param({"step": "week"}, ValueError, "step must be", id="unknown step"),
        pytest.param({"step": "Hour"}, ValueError, "step must be", id="step is case-sensitive"),
        pytest.param({"step": None}, ValueError, "step must be", id="step is not a str"),
        pytest.param(
            {"since": at(12), "until": at(11)}, ValueError, "must be before", id="reversed"
        ),
        pytest.param(
            {"since": at(11), "until": at(11)}, ValueError, "must be before", id="empty range"
        ),
        pytest.param(
            {"since": datetime(2024, 5, 17)}, ValueError, "timezone-aware", id="naive since"
        ),
        pytest.param(
            {"until": datetime(2024, 5, 17)}, ValueError, "timezone-aware", id="naive until"
        ),
        pytest.param(
            {"since": timedelta(hours=-1)}, ValueError, "positive", id="negative timedelta"
        ),
        pytest.param(
            {"since": timedelta(days=7 * 1000), "step": "minute"},
            ValueError,
            f"at most {MAX_POINTS} points",
            id="too many points",
        ),
        pytest.param({"since": "7d"}, TypeError, "must be a datetime", id="since as text"),
        pytest.param({"key_id": 7}, TypeError, "key_id must be a str", id="key_id not a str"),
    ],
)
def test_bad_queries_raise_clear_errors(
    store: CountingStore, clock: Clock, options: dict[str, Any], error: type, message: str
) -> None:
    options = {"key_id": KEY, **options}
    with pytest.raises(error, match=message):
        usage(store, clock=clock, **options)


def test_the_most_points_allowed_are_returned(store: CountingStore, clock: Clock) -> None:
    points = usage(store, KEY, since=timedelta(minutes=MAX_POINTS), step="minute", clock=clock)

    assert len(points) == MAX_POINTS


# -- batching --------------------------------------------------------------------------------


def test_writes_are_batched_into_one_call_per_flush(store: CountingStore, clock: Clock) -> None:
    recorder = recorder_for(store, clock)
    keys = [f"key_{i:016x}" for i in range(50)]
    codes = ["ok", "ok", "ok", "ok", "rate_limited"]

    def serve(worker: int) -> None:
        for i in range(1250):  # 8 threads x 1,250 = 10,000 requests within one interval
            recorder.record(keys[(worker + i) % 50], codes[i % 5])

    threads = [threading.Thread(target=serve, args=(w,)) for w in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.calls["add_usage"] == 0  # nothing is written on the request path

    assert recorder.flush() is True
    assert store.calls["add_usage"] == 1
    recorder.close()
    assert store.calls["add_usage"] == 1  # nothing left to write

    totals = [usage(store, k, since=at(10), until=at(11))[0] for k in keys]
    assert [p.total for p in totals] == [200] * 50
    assert sum(p.requests for p in totals) == 8000
    assert sum(p.refused["rate_limited"] for p in totals) == 2000


def test_the_background_thread_writes_at_most_once_per_interval(
    store: CountingStore, clock: Clock
) -> None:
    every = 0.05
    recorder = recorder_for(store, clock, flush_every=every)
    recorded = [0] * 4
    started = time.monotonic()
    deadline = started + 0.4

    def serve(worker: int) -> None:
        while time.monotonic() < deadline:
            recorder.record(f"key_{worker:016x}")
            recorded[worker] += 1

    threads = [threading.Thread(target=serve, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    recorder.close()
    elapsed = time.monotonic() - started

    # One write per interval at most, plus the last one made by close().
    assert 1 <= store.calls["add_usage"] <= elapsed / every + 1
    for worker, count in enumerate(recorded):
        assert usage(store, f"key_{worker:016x}", since=at(10), until=at(11))[0].requests == count


def test_the_thread_starts_on_the_first_record_and_flushes_unasked(
    store: CountingStore, clock: Clock
) -> None:
    recorder = recorder_for(store, clock, flush_every=0.01)
    assert recorder._thread is None  # no thread before the first record
    recorder.record(KEY)

    deadline = time.monotonic() + 5
    while store.calls["add_usage"] == 0:
        assert time.monotonic() < deadline, "the background thread never flushed"
        time.sleep(0.01)
    recorder.close()

    assert usage(store, KEY, since=at(10), until=at(11))[0].requests == 1


# -- failures and bounds -------------------------------------------------------------------


def test_a_failed_write_keeps_the_counts_for_the_next_flush(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    store = FlakyStore()
    recorder = recorder_for(store, clock)
    recorder.record(KEY)
    recorder.record(KEY)

    with caplog.at_level(logging.WARNING, logger="keyguard"):
        assert recorder.flush() is False
    assert "could not write usage counts, kept for the next flush" in caplog.text
    assert "usage table is locked" in caplog.text

    recorder.record(KEY, "ip_not_allowed")
    store.error = None
    assert recorder.flush() is True
    recorder.close()

    point = usage(store, KEY, since=at(10), until=at(11))[0]
    assert (point.requests, point.refused) == (2, {"ip_not_allowed": 1})


def test_counts_recorded_during_a_failed_write_are_merged_with_the_kept_ones(
    clock: Clock,
) -> None:
    store = FlakyStore()
    recorder = recorder_for(store, clock)
    recorder.record(KEY)
    store.during_write = lambda: recorder.record(KEY)

    assert recorder.flush() is False

    store.error = None
    store.during_write = lambda: None
    recorder.close()
    assert usage(store, KEY, since=at(10), until=at(11))[0].requests == 2


def test_a_store_bug_is_logged_with_its_traceback_and_the_counts_kept(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    store = FlakyStore()
    store.error = RuntimeError("bug in a custom store")
    recorder = recorder_for(store, clock)
    recorder.record(KEY)

    with caplog.at_level(logging.WARNING, logger="keyguard"):
        assert recorder.flush() is False
    assert caplog.records[-1].exc_info is not None

    store.error = None
    recorder.close()
    assert usage(store, KEY, since=at(10), until=at(11))[0].requests == 1


def test_the_buffer_is_bounded_while_the_store_is_down(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    store = FlakyStore()
    recorder = recorder_for(store, clock, max_pending=3)
    for i in range(5):
        recorder.record(f"key_{i:016x}")  # 3 buckets fit; 2 are dropped
    recorder.record("key_0000000000000000")  # a bucket already held still counts
    assert recorder.dropped == 0, "requests are summed into buckets at the flush"

    with caplog.at_level(logging.WARNING, logger="keyguard"):
        recorder.flush()  # fails: the store is down, the 3 buckets are kept
        assert recorder.dropped == 2
        recorder.flush()
    assert "dropped 2 usage count(s)" in caplog.text

    clock.advance(timedelta(minutes=1))  # a new minute is a new bucket: no room for it
    recorder.record("key_0000000000000000")
    recorder.flush()
    assert recorder.dropped == 3

    store.error = None
    recorder.close()
    held = [usage(store, f"key_{i:016x}", since=at(10), until=at(11))[0] for i in range(5)]
    assert [p.requests for p in held] == [2, 1, 1, 0, 0]


# -- lifecycle -------------------------------------------------------------------------------


def test_close_stops_the_thread_and_writes_the_rest(store: CountingStore, clock: Clock) -> None:
    recorder = recorder_for(store, clock)
    recorder.record(KEY)
    thread = recorder._thread
    assert thread is not None and thread.is_alive() and thread.daemon

    recorder.close()
    recorder.close()

    assert not thread.is_alive()
    assert store.calls["add_usage"] == 1
    recorder.record(KEY)  # after close: buffered, written only when asked
    assert recorder._thread is None
    assert store.calls["add_usage"] == 1
    recorder.flush()
    assert usage(store, KEY, since=at(10), until=at(11))[0].requests == 2


def test_a_recorder_dropped_without_close_ends_its_thread(clock: Clock) -> None:
    recorder = recorder_for(MemoryStore(), clock, flush_every=0.01)
    recorder.record(KEY)
    thread = recorder._thread
    assert thread is not None
    ref = weakref.ref(recorder)

    del recorder
    gc.collect()
    thread.join(timeout=5)

    assert ref() is None
    assert not thread.is_alive()


def test_a_forked_child_writes_only_its_own_counts(tmp_path: Path) -> None:
    script = f"""
import os
from keyguard import SQLiteStore
from keyguard.usage import UsageRecorder, usage

recorder = UsageRecorder(SQLiteStore({str(tmp_path / "keys.db")!r}), flush_every=3600)
for _ in range(5):
    recorder.record({KEY!r})
pid = os.fork()
if pid == 0:
    recorder.record({KEY!r}, "rate_limited")
    recorder.close()
    os._exit(0)
os.waitpid(pid, 0)
recorder.close()
point = usage(recorder.store, {KEY!r}, step="day")[-1]
print(point.requests, point.refused)
"""
    done = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", script],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )

    assert done.stdout == "5 {'rate_limited': 1}\n"


def test_a_clean_exit_writes_what_is_left(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    script = (
        "from keyguard import SQLiteStore\n"
        "from keyguard.usage import UsageRecorder\n"
        f"recorder = UsageRecorder(SQLiteStore({str(path)!r}), flush_every=3600)\n"
        f"for _ in range(3): recorder.record({KEY!r})\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)

    store = SQLiteStore(path)
    assert sum(point.requests for point in usage(store, KEY, step="day")) == 3
    store.close()


@pytest.mark.parametrize(
    ("options", "error"),
    [
        pytest.param({"flush_every": 0}, ValueError, id="zero interval"),
        pytest.param({"flush_every": -1}, ValueError, id="negative interval"),
        pytest.param({"flush_every": float("inf")}, ValueError, id="infinite interval"),
        pytest.param({"flush_every": float("nan")}, ValueError, id="nan interval"),
        pytest.param({"flush_every": True}, ValueError, id="bool interval"),
        pytest.param({"flush_every": "1"}, ValueError, id="text interval"),
        pytest.param({"max_pending": 0}, ValueError, id="no room"),
        pytest.param({"max_pending": 1.5}, ValueError, id="fractional room"),
    ],
)
def test_bad_recorder_options_are_refused(options: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        UsageRecorder(MemoryStore(), **options)


def test_a_store_without_usage_counts_is_refused() -> None:
    with pytest.raises(TypeError, match="must keep usage counts"):
        UsageRecorder(cast(Any, object()))


# -- the manager -----------------------------------------------------------------------------


class KeysOnly:
    """A key store that keeps no usage counts (a third-party store of the old contract):
    the memory store's key methods and nothing else."""

    def __init__(self) -> None:
        self._inner = MemoryStore()


def _delegated(name: str) -> property:
    def method(self: KeysOnly) -> Any:
        return getattr(self._inner, name)

    return property(method)


# Each method is on the class: from Python 3.12 an isinstance check against a protocol
# looks methods up on the class, so one answered by __getattr__ would not count.
_KEY_METHODS = ("add", "get", "get_by_id", "list_keys", "revoke", "set_expiry", "update")
for _name in (*_KEY_METHODS, "touch", "close"):
    setattr(KeysOnly, _name, _delegated(_name))


def test_manager_usage_returns_a_keys_points(clock: Clock) -> None:
    manager = APIKeyManager(clock=clock)
    _, info = manager.create_key({"user_id": "alice"})
    recorder = UsageRecorder(cast(MemoryStore, manager.store), clock=clock)
    recorder.record(info.key_id)
    recorder.close()

    points = manager.usage(info.key_id, since=timedelta(hours=2))

    assert series(points) == [("17 09:00", 0, {}), ("17 10:00", 1, {})]


def test_manager_usage_of_an_unknown_key_is_a_value_error_without_the_key(clock: Clock) -> None:
    manager = APIKeyManager(clock=clock)
    key = manager.generate_key(user_id="alice")

    with pytest.raises(ValueError, match="no key with id 'key_0000000000000000'"):
        manager.usage("key_0000000000000000")
    with pytest.raises(ValueError, match="no key with id") as exc_info:
        manager.usage(key)  # a key where its id belongs: never echoed
    assert key not in str(exc_info.value)


def test_manager_usage_over_a_store_without_counts_is_a_type_error() -> None:
    manager = APIKeyManager(cast(KeyStore, KeysOnly()))

    with pytest.raises(TypeError, match="keeps no usage counts"):
        manager.usage("key_0000000000000000")
