"""The usage-count contract (``add_usage`` / ``read_usage``), run against every store.

What only one store does (its table, its expiry, its pruning) is tested at the end.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing
from pathlib import Path

import pytest

from keyguard import KeyStore, MemoryStore, RedisStore, SQLiteStore, StoreError
from keyguard.stores.base import USAGE_RETENTION, UsageRow, UsageStore
from keyguard.stores.sqlite import SCHEMA_VERSION
from keyguard.usage import UsageRecorder, usage
from tests.helpers import Clock
from tests.stores.services import postgres_store, redis_store, require_redis

DAY = 86400
#: A UTC midnight, so every step's buckets line up with it.
T = 1_700_000_000 // DAY * DAY
KEY = "key_0123456789abcdef"
OTHER = "key_fedcba9876543210"


def usage_store(store: KeyStore) -> UsageStore:
    assert isinstance(store, UsageStore)
    return store


def read(store: UsageStore, key_id: str, step: str, start: int, end: int) -> list[UsageRow]:
    """``read_usage`` in a fixed order (a store may return a bucket's codes in any order)."""
    return sorted(store.read_usage(key_id, step, start, end))


def test_counts_read_back_by_key_step_and_bucket(store: KeyStore) -> None:
    s = usage_store(store)
    s.add_usage(
        [
            (KEY, "minute", T, "ok", 3),
            (KEY, "minute", T, "rate_limited", 2),
            (KEY, "minute", T + 60, "ok", 1),
            (KEY, "hour", T, "ok", 4),
            (OTHER, "minute", T, "ok", 7),
        ]
    )

    assert read(s, KEY, "minute", T, T + 120) == [
        (KEY, "minute", T, "ok", 3),
        (KEY, "minute", T, "rate_limited", 2),
        (KEY, "minute", T + 60, "ok", 1),
    ]
    assert read(s, KEY, "hour", T, T + 3600) == [(KEY, "hour", T, "ok", 4)]
    assert read(s, OTHER, "minute", T, T + 120) == [(OTHER, "minute", T, "ok", 7)]
    assert read(s, KEY, "day", T, T + DAY) == []


def test_counts_add_up_across_writes_and_within_one(store: KeyStore) -> None:
    s = usage_store(store)
    s.add_usage([(KEY, "minute", T, "ok", 1), (KEY, "minute", T, "ok", 2)])
    s.add_usage([(KEY, "minute", T, "ok", 10)])

    assert read(s, KEY, "minute", T, T + 60) == [(KEY, "minute", T, "ok", 13)]


def test_the_range_includes_its_start_and_excludes_its_end(store: KeyStore) -> None:
    s = usage_store(store)
    s.add_usage([(KEY, "hour", T + h * 3600, "ok", h + 1) for h in range(4)])

    assert [r[2] for r in read(s, KEY, "hour", T + 3600, T + 3 * 3600)] == [
        T + 3600,
        T + 2 * 3600,
    ]
    assert read(s, KEY, "hour", T + 3600, T + 3600) == []


def test_a_store_without_counts_reads_as_empty(store: KeyStore) -> None:
    s = usage_store(store)
    s.add_usage([])  # nothing to write is no write (and no error)

    assert s.read_usage(KEY, "hour", T, T + DAY) == []


def test_a_recorder_and_a_query_over_the_store(store: KeyStore) -> None:
    clock = Clock(T + 10 * 3600 + 30)
    recorder = UsageRecorder(usage_store(store), clock=clock, flush_every=60)
    for _ in range(3):
        recorder.record(KEY)
    recorder.record(KEY, "insufficient_scope")
    recorder.close()

    points = usage(usage_store(store), KEY, step="hour", clock=clock)

    assert len(points) == 24
    assert [(p.requests, p.refused) for p in points[-1:]] == [(3, {"insufficient_scope": 1})]
    assert all(p.total == 0 for p in points[:-1])


def test_concurrent_writes_of_the_same_buckets_are_all_counted(store: KeyStore) -> None:
    s = usage_store(store)
    # The same buckets in opposite orders: a store must neither lose counts nor deadlock.
    rows = [(k, "minute", T, code, 1) for k in (KEY, OTHER) for code in ("ok", "rate_limited")]
    batches = [rows, rows[::-1]] * 4

    def write(batch: list[UsageRow]) -> None:
        for _ in range(10):
            s.add_usage(batch)

    threads = [threading.Thread(target=write, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert read(s, KEY, "minute", T, T + 60) == [
        (KEY, "minute", T, "ok", 80),
        (KEY, "minute", T, "rate_limited", 80),
    ]


# -- one store at a time -------------------------------------------------------------------


def test_memory_forgets_buckets_past_their_retention() -> None:
    store = MemoryStore()
    store.add_usage([(KEY, step, T, "ok", 1) for step in ("minute", "hour", "day")])

    # 48 hours and one minute later: the old minute goes, its hour and day stay.
    later = T + USAGE_RETENTION["minute"] + 60
    store.add_usage([(KEY, "minute", later, "ok", 1)])
    assert store.read_usage(KEY, "minute", T, T + 60) == []
    assert store.read_usage(KEY, "hour", T, T + 3600) == [(KEY, "hour", T, "ok", 1)]

    much_later = T + USAGE_RETENTION["hour"] + 3600
    store.add_usage([(KEY, "hour", much_later, "ok", 1)])
    assert store.read_usage(KEY, "hour", T, T + 3600) == []
    assert store.read_usage(KEY, "day", T, T + DAY) == [(KEY, "day", T, "ok", 1)]


def test_sqlite_file_of_the_previous_version_opens_reads_empty_then_counts(
    tmp_path: Path,
) -> None:
    path = tmp_path / "old.db"
    SQLiteStore(path).close()  # a store as the previous version made it: no usage table
    with closing(sqlite3.connect(path)) as conn:
        tables = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    assert "keyguard_usage" not in tables

    reader = SQLiteStore(path, create_schema=False)
    assert reader.read_usage(KEY, "hour", T, T + DAY) == []
    reader.close()

    store = SQLiteStore(path)
    store.add_usage([(KEY, "hour", T, "ok", 2)])
    assert store.read_usage(KEY, "hour", T, T + DAY) == [(KEY, "hour", T, "ok", 2)]
    store.close()
    with closing(sqlite3.connect(path)) as conn:
        version = conn.execute(
            "SELECT value FROM keyguard_meta WHERE name = 'schema_version'"
        ).fetchone()
    assert version == (str(SCHEMA_VERSION),)  # an additive table: the version is unchanged


def test_sqlite_forgets_expired_buckets_once_per_hour(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "keys.db")
    store.add_usage([(KEY, "minute", T, "ok", 1), (KEY, "hour", T, "ok", 1)])
    later = T + USAGE_RETENTION["minute"] + 3600
    store.add_usage([(KEY, "minute", later, "ok", 1)])

    assert store.read_usage(KEY, "minute", T, T + 60) == []
    assert store.read_usage(KEY, "hour", T, T + 3600) == [(KEY, "hour", T, "ok", 1)]
    store.close()


def test_redis_buckets_expire_after_their_retention() -> None:
    with redis_store() as store:
        store.add_usage([(KEY, "minute", T, "ok", 1), (KEY, "day", T, "ok", 1)])

        client = store._client
        minute_ttl = client.ttl(store.usage_key(KEY, "minute", T))
        day_ttl = client.ttl(store.usage_key(KEY, "day", T))
        assert USAGE_RETENTION["minute"] < minute_ttl <= USAGE_RETENTION["minute"] + 60
        assert USAGE_RETENTION["day"] < day_ttl <= USAGE_RETENTION["day"] + DAY


def test_postgres_forgets_expired_buckets_and_reads_a_missing_table_as_empty() -> None:
    with postgres_store() as store:
        assert store.read_usage(KEY, "minute", T, T + 60) == []  # no table yet
        store.add_usage([(KEY, "minute", T, "ok", 1), (KEY, "hour", T, "ok", 1)])
        later = T + USAGE_RETENTION["minute"] + 3600
        store.add_usage([(KEY, "minute", later, "ok", 1)])

        assert store.read_usage(KEY, "minute", T, T + 60) == []
        assert store.read_usage(KEY, "hour", T, T + 3600) == [(KEY, "hour", T, "ok", 1)]


def test_an_unreachable_redis_is_a_store_error() -> None:
    require_redis()  # for redis-py; the server itself is not used
    store = RedisStore("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    with pytest.raises(StoreError, match="could not record usage"):
        store.add_usage([(KEY, "minute", T, "ok", 1)])
    with pytest.raises(StoreError, match="could not read usage"):
        store.read_usage(KEY, "minute", T, T + 60)
    store.close()
