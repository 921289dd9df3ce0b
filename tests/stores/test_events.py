"""The audit-event contract (``add_event`` / ``read_events``), run against every store.

What only one store does (its table on an older file, its errors) is tested at the end.
"""

from __future__ import annotations

import sqlite3
import threading
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from keyguard import (
    CachedStore,
    KeyEvent,
    KeyStore,
    MemoryStore,
    RedisStore,
    SQLiteStore,
    StoreError,
)
from keyguard.stores import EventStore
from keyguard.stores.sqlite import SCHEMA_VERSION
from tests.helpers import KeysOnlyStore
from tests.stores.services import postgres_table, redis_store, require_redis

#: A time with microseconds, which every store must keep.
T = datetime(2024, 5, 17, 8, 0, 0, 123456, tzinfo=timezone.utc)
KEY = "key_0123456789abcdef"
OTHER = "key_fedcba9876543210"


def event_store(store: KeyStore) -> EventStore:
    assert isinstance(store, EventStore)
    return store


def event(seconds: float, key_id: str = KEY, action: str = "revoked", **changes: Any) -> KeyEvent:
    return KeyEvent(T + timedelta(seconds=seconds), key_id, action, "ops@cli", changes)


def everything(store: EventStore) -> list[KeyEvent]:
    return store.read_events(None, None, 1000)


def test_a_store_without_events_reads_as_empty(store: KeyStore) -> None:
    s = event_store(store)
    assert s.read_events(None, None, 100) == []
    assert s.read_events(KEY, T, 100) == []


def test_events_read_back_newest_first(store: KeyStore) -> None:
    s = event_store(store)
    first, second, third = event(0), event(1, OTHER), event(2.5)
    for e in (second, first, third):  # added out of time order: read in time order
        s.add_event(e)

    assert everything(s) == [third, second, first]
    assert everything(s)[0].at == T + timedelta(seconds=2.5)  # microseconds kept
    assert everything(s)[0].at.tzinfo is timezone.utc


def test_events_of_the_same_time_read_last_added_first(store: KeyStore) -> None:
    s = event_store(store)
    added = [KeyEvent(T, KEY, "credited", f"actor {n}", {"credits": n}) for n in range(12)]
    for e in added:
        s.add_event(e)
    s.add_event(event(-1))

    assert everything(s) == [*reversed(added), event(-1)]
    assert s.read_events(KEY, None, 3) == added[:-4:-1]


def test_since_includes_its_own_instant(store: KeyStore) -> None:
    s = event_store(store)
    for n in range(4):
        s.add_event(event(n))

    assert s.read_events(None, T + timedelta(seconds=2), 100) == [event(3), event(2)]
    assert s.read_events(None, T + timedelta(seconds=2, microseconds=1), 100) == [event(3)]
    assert s.read_events(None, T + timedelta(days=1), 100) == []
    # A since far in the past (the manager's timedelta clamps to datetime.min) reads all.
    assert len(s.read_events(None, datetime.min.replace(tzinfo=timezone.utc), 100)) == 4


def test_limit_keeps_the_newest(store: KeyStore) -> None:
    s = event_store(store)
    for n in range(10):
        s.add_event(event(n))

    assert s.read_events(None, None, 3) == [event(9), event(8), event(7)]
    assert s.read_events(None, None, 1) == [event(9)]
    assert len(s.read_events(None, None, 100)) == 10


def test_key_id_filter_with_since_and_limit(store: KeyStore) -> None:
    s = event_store(store)
    for n in range(6):
        s.add_event(event(n, KEY if n % 2 else OTHER))

    assert s.read_events(KEY, None, 100) == [event(5), event(3), event(1)]
    assert s.read_events(OTHER, None, 100) == [event(4, OTHER), event(2, OTHER), event(0, OTHER)]
    assert s.read_events(KEY, T + timedelta(seconds=2), 100) == [event(5), event(3)]
    assert s.read_events(KEY, T + timedelta(seconds=2), 1) == [event(5)]
    assert s.read_events("key_0000000000000000", None, 100) == []


def test_changes_round_trip_as_json(store: KeyStore) -> None:
    s = event_store(store)
    changes: dict[str, Any] = {
        "user_id": "zoë 🦊",
        "metadata": {"name": "日本語", "tags": ["a", "b"], "nested": {"n": 1, "x": [None, True]}},
        "expires_at": None,
        "float": 0.1,
        "big": 1e300,  # jsonb would read it back as an integer
        "nul": "a\x00b",  # jsonb refuses it
        "empty": {},
        "quote": "'\"; DROP TABLE x; --",
    }
    original = KeyEvent(T, KEY, "created", "Zoë <zoe@example.com> 🦊", changes)
    s.add_event(original)
    s.add_event(KeyEvent(T, OTHER, "updated", "", {}))

    [updated, found] = everything(s)
    assert found == original
    assert found.changes == changes
    assert found.actor == "Zoë <zoe@example.com> 🦊"
    assert isinstance(found.changes["big"], float)
    assert updated.actor == "" and updated.changes == {}
    with pytest.raises(TypeError, match="read-only"):
        found.changes["metadata"]["tags"].append("c")


def test_concurrent_events_are_all_kept(store: KeyStore) -> None:
    s = event_store(store)
    workers, each = 4, 15

    def add(worker: int) -> None:
        for n in range(each):
            s.add_event(KeyEvent(T, KEY, "credited", f"w{worker}", {"n": n}))

    threads = [threading.Thread(target=add, args=(w,)) for w in range(workers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    found = everything(s)
    assert len(found) == workers * each
    assert len({(e.actor, e.changes["n"]) for e in found}) == workers * each
    for worker in range(workers):  # each thread's events, newest first
        mine = [e.changes["n"] for e in found if e.actor == f"w{worker}"]
        assert mine == list(reversed(range(each)))


# -- what only one store does ------------------------------------------------------------------


def test_sqlite_events_persist_across_reopening(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    store = SQLiteStore(path)
    store.add_event(event(0))
    store.add_event(event(0, action="rotated", into=OTHER))
    store.close()

    reopened = SQLiteStore(path, create_schema=False)
    assert everything(reopened) == [event(0, action="rotated", into=OTHER), event(0)]
    reopened.close()


def test_sqlite_file_made_before_events_gains_the_table_on_open(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    SQLiteStore(path).close()
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("DROP TABLE keyguard_events")  # as the previous version made it

    store = SQLiteStore(path, create_schema=False)  # as the CLI opens it
    store.add_event(event(0))
    assert everything(store) == [event(0)]
    store.close()
    with closing(sqlite3.connect(path)) as conn:
        version = conn.execute(
            "SELECT value FROM keyguard_meta WHERE name = 'schema_version'"
        ).fetchone()
    # An additive table: the schema version stays, so files stay readable by the last version.
    assert version == (str(SCHEMA_VERSION),)


def test_a_read_only_sqlite_file_made_before_events_reads_as_empty(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "old.db"
    SQLiteStore(path).close()
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("DROP TABLE keyguard_events")
    before = path.read_bytes()
    connect = sqlite3.connect

    def read_only(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        # What a file this process may not write answers, even to root (who ignores modes).
        conn: sqlite3.Connection = connect(*args, **kwargs)
        conn.execute("PRAGMA query_only = 1")
        return conn

    monkeypatch.setattr(sqlite3, "connect", read_only)

    store = SQLiteStore(path, create_schema=False)
    try:
        assert everything(store) == []
        with pytest.raises(StoreError, match="no events table"):
            store.add_event(event(0))
    finally:
        store.close()
    assert path.read_bytes() == before


def test_a_closed_sqlite_store_is_a_store_error(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "keys.db")
    store.close()
    with pytest.raises(StoreError):
        store.add_event(event(0))
    with pytest.raises(StoreError):
        store.read_events(None, None, 10)


def test_an_unreachable_redis_is_a_store_error() -> None:
    require_redis()  # for redis-py; the server itself is not used
    store = RedisStore("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    with pytest.raises(StoreError, match="could not record an event"):
        store.add_event(event(0))
    with pytest.raises(StoreError, match="could not read events"):
        store.read_events(None, None, 10)
    store.close()


def test_postgres_tables_made_before_events() -> None:
    import psycopg

    from keyguard import PostgresStore

    with postgres_table() as (dsn, table):
        PostgresStore(dsn, table=table).close()
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(f"DROP TABLE {table}_events")  # as the previous version made them

        reader = PostgresStore(dsn, table=table, create_schema=False)
        try:
            assert everything(reader) == []
            with pytest.raises(StoreError, match="no events table"):
                reader.add_event(event(0))
        finally:
            reader.close()
        upgraded = PostgresStore(dsn, table=table)  # create_schema=True adds the table
        try:
            upgraded.add_event(event(0))
            assert everything(upgraded) == [event(0)]
        finally:
            upgraded.close()


def test_a_cache_over_a_store_without_events_says_so() -> None:
    inner = KeysOnlyStore()
    assert isinstance(inner, KeyStore) and not isinstance(inner, EventStore)
    cached = CachedStore(inner)
    assert cached.keeps_events is False
    with pytest.raises(TypeError, match="does not keep audit events"):
        cached.add_event(event(0))
    with pytest.raises(TypeError, match="does not keep audit events"):
        cached.read_events(None, None, 10)
    assert CachedStore(MemoryStore()).keeps_events is True


def test_a_damaged_sqlite_event_is_a_store_error(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "keys.db")
    store.add_event(event(0))
    with closing(sqlite3.connect(tmp_path / "keys.db", isolation_level=None)) as conn:
        conn.execute("UPDATE keyguard_events SET changes = '{not json'")
    with pytest.raises(StoreError, match=f"a stored event of '{KEY}' is damaged"):
        everything(store)
    store.close()


def test_a_corrupt_redis_event_is_a_store_error() -> None:
    with redis_store() as store:
        store._client.zadd(store.events_key(), {"00000000000000000001{not json": 1})
        with pytest.raises(StoreError, match="a Redis event is corrupt"):
            everything(store)
