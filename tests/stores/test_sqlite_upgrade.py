"""Upgrading a SQLite store file of schema version 1 (keyguard up to 0.x: ``keyguard_keys``).

The version 1 files here are written as that version wrote them: its DDL and its encoding
of a record, copied below, with every kind of record it could hold. Each test then opens
the file with today's store and compares what it reads with what version 1 read.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from contextlib import closing, contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from keyguard import APIKeyManager, KeyInfo, SQLiteStore, StoreError
from keyguard._frozen import loads
from keyguard.stores import _sqlite_upgrade
from keyguard.stores import sqlite as sqlite_module
from keyguard.stores._sqlite_layout import pack_metadata
from keyguard.stores.sqlite import SCHEMA_VERSION

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2024, 5, 17, 8, 30, 15, 123456, tzinfo=timezone.utc)

# Version 1's schema, as keyguard wrote it (the list index and counters came later within
# version 1, so files without them exist too).
V1_SCHEMA = """
CREATE TABLE keyguard_meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE keyguard_keys (
    digest TEXT PRIMARY KEY,
    key_id TEXT NOT NULL UNIQUE,
    hash_scheme TEXT NOT NULL,
    prefix TEXT NOT NULL,
    hint TEXT NOT NULL,
    user_id TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    revoked_at REAL,
    last_used_at REAL
) WITHOUT ROWID;
CREATE INDEX keyguard_keys_user ON keyguard_keys (user_id, created_at);
INSERT INTO keyguard_meta (name, value) VALUES ('schema_version', '1');
"""
V1_COUNTERS = """CREATE TABLE keyguard_counters (
    name TEXT PRIMARY KEY,
    value REAL NOT NULL,
    expires_at REAL
) WITHOUT ROWID"""
V1_LIST_INDEX = "CREATE INDEX keyguard_keys_created ON keyguard_keys (created_at, key_id)"
V1_USAGE = """CREATE TABLE keyguard_usage (
    key_id TEXT NOT NULL,
    step TEXT NOT NULL,
    start INTEGER NOT NULL,
    code TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (key_id, step, start, code)
) WITHOUT ROWID"""
V1_COLUMNS = (
    "digest, key_id, hash_scheme, prefix, hint, user_id, metadata,"
    " created_at, expires_at, revoked_at, last_used_at"
)


def v1_row(info: KeyInfo) -> tuple[Any, ...]:
    """A record as version 1's ``add`` wrote it."""

    def ts(value: datetime | None) -> float | None:
        return None if value is None else value.timestamp()

    return (
        info.digest,
        info.key_id,
        info.hash_scheme,
        info.prefix,
        info.hint,
        info.user_id,
        json.dumps(info.metadata, separators=(",", ":")),
        info.created_at.timestamp(),
        ts(info.expires_at),
        ts(info.revoked_at),
        ts(info.last_used_at),
    )


def v1_read(row: tuple[Any, ...]) -> KeyInfo:
    """A record as version 1 read it back."""

    def dt(value: float | None) -> datetime | None:
        return None if value is None else datetime.fromtimestamp(value, timezone.utc)

    digest, key_id, scheme, prefix, hint, user_id, metadata, created, expires, revoked, used = row
    return KeyInfo(
        key_id=key_id,
        prefix=prefix,
        hint=hint,
        user_id=user_id,
        metadata=loads(metadata),
        created_at=datetime.fromtimestamp(created, timezone.utc),
        expires_at=dt(expires),
        revoked_at=dt(revoked),
        last_used_at=dt(used),
        digest=digest,
        hash_scheme=scheme,
    )


def record(n: int, **fields: Any) -> KeyInfo:
    """The n-th record of a version 1 store: a key the manager issued, unless changed."""
    key = f"sk_{n:032x}"
    user_id = fields.pop("user_id", f"user-{n % 3}")
    values: dict[str, Any] = {
        "key_id": f"key_{n:016x}",
        "prefix": "sk_",
        "hint": f"sk_…{key[-4:]}",
        "user_id": user_id,
        "metadata": {"user_id": user_id, "permissions": ["read"], "name": f"key {n}"},
        "created_at": T0 + timedelta(seconds=n),
        "digest": hashlib.sha256(key.encode()).hexdigest(),
    }
    values.update(fields)
    return KeyInfo(**values)


def every_kind_of_record() -> list[KeyInfo]:
    """Records of every shape version 1 could hold."""
    pepper = b"p" * 32
    unicode_user = 'ünï-ũser "quoted" \\ 山田'
    return [
        *(record(n) for n in range(20)),
        record(100, revoked_at=T0 + timedelta(days=1, microseconds=7)),
        record(101, expires_at=T0 - timedelta(days=1)),
        record(102, expires_at=T0 + timedelta(days=90, microseconds=1)),
        record(103, last_used_at=datetime(2038, 1, 19, 3, 14, 8, 1, tzinfo=timezone.utc)),
        record(
            104,
            revoked_at=T0 + timedelta(hours=2),
            expires_at=T0 + timedelta(hours=1),
            last_used_at=T0 + timedelta(minutes=30),
        ),
        record(105, expires_at=datetime(8999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc)),
        record(
            106,
            user_id=unicode_user,
            metadata={
                "user_id": unicode_user,
                "name": "Zoë 山田太郎 שלום 🔑🛡️",
                "quote": 'it\'s "quoted" \\ back\\slash\n\ttab',
                "nul": "a\x00b",
                "nested": {"teams": [{"roles": ["x", "y"]}, {}], "n": 2**53 + 1, "f": 0.1},
                "nothing": None,
                "empty": [],
            },
        ),
        # user_id not the first field, another user_id, none at all, only the user_id
        record(107, metadata={"permissions": ["write"], "user_id": "user-1"}, user_id="user-1"),
        record(108, metadata={"user_id": "someone-else", "x": 1}, user_id="user-2"),
        record(109, metadata={}, user_id="user-0"),
        record(110, metadata={"user_id": "user-1"}, user_id="user-1"),
        record(111, metadata={"user_id": "user-2", "x": {"a": 1}}, user_id="user-2"),
        # other hash schemes, prefixes and hints
        record(
            112,
            digest=hmac.new(pepper, b"sk_key112", "sha256").hexdigest(),
            hash_scheme="hmac-sha256:0a1b2c3d",
        ),
        record(113, prefix="AbCd1234", hint="AbCd1234.…", hash_scheme="drf-sha512+sha256"),
        record(114, prefix="sk_live_", hint="sk_live_…9f2a"),
        record(115, prefix="pk_", hint="a hint of its own"),
        record(116, prefix="p…x", hint="p…x…abcd"),
        # digests no scheme writes: capitals, not hex, odd length, longer, empty
        record(117, digest="ABCDEF" + "0" * 58),
        record(118, digest="not a hex digest: ünïcode …"),
        record(119, digest="abc"),
        record(120, digest=hashlib.sha512(b"long").hexdigest()),
        record(121, digest=""),
        # keys created at one instant, ordered by key_id
        *(record(200 + n, created_at=T0, key_id=f"key_tie{n}") for n in range(3)),
    ]


def write_v1(
    path: Path,
    infos: list[KeyInfo],
    *,
    counters: bool = True,
    list_index: bool = True,
    usage: bool = True,
) -> None:
    """A closed version 1 store file holding ``infos`` (and counters and usage counts)."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(V1_SCHEMA)
        if counters:
            conn.execute(V1_COUNTERS)
            conn.executemany(
                "INSERT INTO keyguard_counters VALUES (?, ?, ?)",
                [("rate:key_1:60", 3.5, 1.7e9), ("quota:key_2", 41.0, None)],
            )
        if list_index:
            conn.execute(V1_LIST_INDEX)
        if usage:
            conn.execute(V1_USAGE)
            conn.executemany(
                "INSERT INTO keyguard_usage VALUES (?, ?, ?, ?, ?)",
                [
                    ("key_1", "hour", 1_700_002_800, "ok", 12),
                    ("key_2", "day", 1_699_920_000, "x", 1),
                ],
            )
            conn.execute("INSERT INTO keyguard_meta VALUES ('usage_pruned_hour', '472222')")
        conn.executemany(
            f"INSERT INTO keyguard_keys ({V1_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            [v1_row(info) for info in infos],
        )


def raw(path: Path, sql: str) -> list[tuple[Any, ...]]:
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


def v1_contents(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of a version 1 file, table by table, to tell that nothing changed."""
    tables = [name for (name,) in raw(path, "SELECT name FROM sqlite_master WHERE type='table'")]
    return {name: sorted(raw(path, f"SELECT * FROM {name}"), key=repr) for name in tables}


@contextmanager
def opened(path: Path, **options: Any) -> Iterator[SQLiteStore]:
    store = SQLiteStore(path, **options)
    try:
        yield store
    finally:
        store.close()


def walk_pages(store: SQLiteStore, user_id: str | None = None, *, limit: int) -> list[KeyInfo]:
    seen: list[KeyInfo] = []
    after = None
    while page := store.list_keys(user_id, limit=limit, after=after):
        seen += page
        after = page[-1].key_id
    return seen


def assert_holds_what_v1_held(path: Path, v1_rows: list[tuple[Any, ...]]) -> None:
    """The store at ``path`` reads every record exactly as version 1 read it."""
    expected = [v1_read(row) for row in v1_rows]
    in_order = sorted(expected, key=lambda info: (info.created_at.timestamp(), info.key_id))
    with opened(path) as store:
        for info in expected:
            for found in (store.get(info.digest), store.get_by_id(info.key_id)):
                assert found == info
                assert found is not None and found.digest == info.digest
                # the metadata's JSON text too: field order, escapes, numbers
                assert json.dumps(found.metadata) == json.dumps(info.metadata)
        assert store.list_keys() == in_order
        assert walk_pages(store, limit=4) == in_order
        for user in {info.user_id for info in expected}:
            mine = [info for info in in_order if info.user_id == user]
            assert store.list_keys(user) == mine
            assert walk_pages(store, user, limit=2) == mine


# -- the upgrade ---------------------------------------------------------------------------


def test_every_record_reads_back_as_version_1_read_it(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    infos = every_kind_of_record()
    write_v1(path, infos)
    v1_rows = [v1_row(info) for info in infos]
    before = v1_contents(path)

    assert_holds_what_v1_held(path, v1_rows)

    # What version 1 read is what was written, except times far from now that a float of
    # seconds cannot hold to the microsecond (the far expiry): read back as version 1 did.
    assert [v1_read(row) for row in v1_rows if row[1] != "key_0000000000000069"] == [
        info for info in infos if info.key_id != "key_0000000000000069"
    ]
    after = {
        name: sorted(raw(path, f"SELECT * FROM {name}"), key=repr)
        for name in ("keyguard_counters", "keyguard_usage")
    }
    assert after == {name: before[name] for name in after}
    assert raw(path, "SELECT name, value FROM keyguard_meta ORDER BY name") == [
        ("schema_version", str(SCHEMA_VERSION)),
        ("usage_pruned_hour", "472222"),
    ]
    tables = raw(path, "SELECT type, name FROM sqlite_master ORDER BY type, name")
    assert ("table", "keyguard_keys") not in tables
    assert ("index", "keyguard_records_created") in tables
    assert raw(path, "PRAGMA integrity_check") == [("ok",)]


def test_the_upgraded_file_works_like_a_new_one(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    infos = every_kind_of_record()
    write_v1(path, infos)
    plain, revoked, unusual = infos[0], infos[20], infos[-5]

    with opened(path) as store:
        manager = APIKeyManager(store, last_used_resolution=None)
        key, new = manager.create_key(user_id="user-1")
        assert manager.validate_key(key)
        assert store.revoke(plain.digest, T0) is True
        assert store.revoke(plain.digest, T0) is False
        assert store.revoke(revoked.digest, T0) is False
        assert store.update(
            KeyInfo(**{**_fields(unusual), "metadata": {"user_id": "user-0", "y": 2}}),
            unusual,
        )
        store.touch(unusual.digest, T0)
        assert store.set_expiry(unusual.digest, T0 + timedelta(days=1))
        changed = store.get(unusual.digest)
        assert changed is not None
        assert changed.metadata == {"user_id": "user-0", "y": 2}
        assert (changed.last_used_at, changed.expires_at) == (T0, T0 + timedelta(days=1))
        assert store.list_keys("user-1")[-1] == new


def _fields(info: KeyInfo) -> dict[str, Any]:
    names = ("key_id", "prefix", "hint", "user_id", "metadata", "created_at", "expires_at")
    return {name: getattr(info, name) for name in (*names, "digest", "hash_scheme")}


def test_a_second_open_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    write_v1(path, every_kind_of_record())
    with opened(path):
        pass
    before = path.read_bytes()

    with opened(path) as store:
        assert len(store.list_keys()) == len(every_kind_of_record())

    assert path.read_bytes() == before


@pytest.mark.parametrize(
    ("counters", "list_index", "usage"),
    [
        pytest.param(False, False, False, id="before counters, paging and usage"),
        pytest.param(True, False, False, id="before paging"),
    ],
)
def test_an_earlier_version_1_file_gains_every_table(
    tmp_path: Path, counters: bool, list_index: bool, usage: bool
) -> None:
    path = tmp_path / "keys.db"
    infos = every_kind_of_record()
    write_v1(path, infos, counters=counters, list_index=list_index, usage=usage)

    assert_holds_what_v1_held(path, [v1_row(info) for info in infos])

    with opened(path) as store:
        manager = APIKeyManager(store)
        key = manager.generate_key(user_id="u", rate_limits=["2/minute"])
        assert [manager.verify(key).ok for _ in range(3)] == [True, True, True]
        assert store.peek(["no such counter"]) == [0.0]


def test_processes_opening_a_version_1_file_at_once_all_succeed(tmp_path: Path) -> None:
    # gunicorn -w N restarted on the new version: one worker upgrades, the others wait.
    path = tmp_path / "keys.db"
    infos = every_kind_of_record()
    write_v1(path, infos)
    ctx = multiprocessing.get_context("fork")
    workers = 4
    barrier = ctx.Manager().Barrier(workers)
    with ctx.Pool(workers) as pool:
        results = pool.starmap(_open_and_count, [(str(path), barrier)] * workers)

    assert results == [len(infos)] * workers
    assert_holds_what_v1_held(path, [v1_row(info) for info in infos])


def _open_and_count(path: str, barrier: Any) -> int:
    barrier.wait()
    with opened(Path(path)) as store:
        return len(store.list_keys())


def test_damaged_records_are_copied_as_they_were_and_still_read_as_damaged(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys.db"
    infos = every_kind_of_record()
    write_v1(path, infos)
    damage = {
        infos[0].key_id: "metadata = '{not json'",
        infos[1].key_id: "metadata = 'not json'",
        infos[2].key_id: "created_at = 'yesterday'",
    }
    with closing(sqlite3.connect(path)) as conn, conn:
        for key_id, change in damage.items():
            conn.execute(f"UPDATE keyguard_keys SET {change} WHERE key_id = ?", (key_id,))
    stored = dict(raw(path, "SELECT key_id, metadata FROM keyguard_keys"))

    with opened(path) as store:
        for key_id in damage:
            # Metadata is parsed where first read, which for "{not json" is after the read.
            with pytest.raises(StoreError, match=f"{key_id}.* is damaged"):
                store.get_by_id(key_id).metadata  # type: ignore[union-attr]  # noqa: B018
        for info in infos[3:]:
            assert store.get(info.digest) == v1_read(v1_row(info))

    kept = dict(raw(path, "SELECT key_id, metadata FROM keyguard_records"))
    assert kept[infos[0].key_id] == stored[infos[0].key_id] == "{not json"
    assert kept[infos[1].key_id] == b"not json"
    assert raw(
        path, f"SELECT created_at FROM keyguard_records WHERE key_id = '{infos[2].key_id}'"
    ) == [("yesterday",)]


# -- an upgrade that cannot finish leaves the file as it was -------------------------------


def test_an_error_midway_leaves_the_version_1_file_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys.db"
    infos = every_kind_of_record()
    write_v1(path, infos)
    before = v1_contents(path)
    calls = 0

    def failing(text: str, user_id: str, *, ensure_ascii: bool = False) -> str | bytes:
        nonlocal calls
        calls += 1
        if calls == 10:
            raise RuntimeError("injected")
        return pack_metadata(text, user_id, ensure_ascii=ensure_ascii)

    monkeypatch.setattr(_sqlite_upgrade, "pack_metadata", failing)
    with pytest.raises(StoreError, match=r"cannot upgrade .* from schema version 1 to"):
        SQLiteStore(path)

    assert v1_contents(path) == before
    assert raw(path, "PRAGMA integrity_check") == [("ok",)]
    monkeypatch.setattr(_sqlite_upgrade, "pack_metadata", pack_metadata)
    assert_holds_what_v1_held(path, [v1_row(info) for info in infos])


def test_two_digests_with_one_row_id_stop_the_upgrade_and_leave_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys.db"
    write_v1(path, every_kind_of_record())
    before = v1_contents(path)
    monkeypatch.setattr(_sqlite_upgrade, "row_id", lambda digest: 7)

    with pytest.raises(StoreError, match="share a row id") as exc_info:
        SQLiteStore(path)

    assert str(path) in str(exc_info.value)
    assert v1_contents(path) == before


def test_a_process_that_may_not_write_gets_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "keys.db"
    write_v1(path, every_kind_of_record())
    before = path.read_bytes()
    connect = sqlite3.connect

    def read_only(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        # What a file this process may not write answers, even to root (who ignores modes).
        conn: sqlite3.Connection = connect(*args, **kwargs)
        conn.execute("PRAGMA query_only = 1")
        return conn

    monkeypatch.setattr(sqlite3, "connect", read_only)

    for create_schema in (True, False):
        with pytest.raises(StoreError, match="open it once with write access") as exc_info:
            SQLiteStore(path, create_schema=create_schema)
        assert "from schema version 1 to" in str(exc_info.value)
    assert path.read_bytes() == before


def test_an_upgrade_that_cannot_compact_leaves_a_whole_file_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "keys.db"
    infos = every_kind_of_record()
    write_v1(path, infos)
    other = sqlite3.connect(path, isolation_level=None)
    upgrade = _sqlite_upgrade.upgrade_from_v1

    def upgrade_then_hold_the_lock(conn: sqlite3.Connection, where: str) -> None:
        # Another process takes the write lock just as the store starts its VACUUM.
        def trace(sql: str) -> None:
            if sql.startswith("VACUUM"):
                other.execute("BEGIN IMMEDIATE")

        conn.set_trace_callback(trace)
        upgrade(conn, where)

    monkeypatch.setattr(sqlite_module, "upgrade_from_v1", upgrade_then_hold_the_lock)
    try:
        SQLiteStore(path, timeout=0.1).close()
        other.execute("ROLLBACK")
    finally:
        other.close()

    assert "could not compact it" in caplog.text
    assert raw(path, "PRAGMA freelist_count")[0][0] > 0
    assert_holds_what_v1_held(path, [v1_row(info) for info in infos])


# A child that upgrades a version 1 file and stops in one statement (as it starts, or after
# a number of SQLite's progress callbacks within it), says so, and waits to be killed there.
CHILD = """
import sys, time
from keyguard.stores import _sqlite_upgrade, sqlite

path, target, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])
upgrade = _sqlite_upgrade.upgrade_from_v1
running = [""]

def stop():
    print("stopped", flush=True)
    time.sleep(600)

def trace(sql):
    running[:] = [sql.split()[0]]
    if running[0] == target and calls == 0:
        stop()

def progress():
    if running[0] == target:
        running.append(target)
        if len(running) > calls:
            stop()
    return 0

def stopping_upgrade(conn, where):
    conn.set_trace_callback(trace)
    conn.set_progress_handler(progress, 100)
    return upgrade(conn, where)

sqlite.upgrade_from_v1 = stopping_upgrade
sqlite.SQLiteStore(path).close()
print("done", flush=True)
"""


@pytest.mark.parametrize(
    ("statement", "calls", "version"),
    [
        pytest.param("INSERT", 50, "1", id="copying rows"),
        pytest.param("UPDATE", 0, "1", id="old table dropped, not committed"),
        pytest.param("VACUUM", 20, str(SCHEMA_VERSION), id="compacting"),
    ],
)
def test_a_kill_during_the_upgrade_loses_nothing(
    tmp_path: Path, statement: str, calls: int, version: str
) -> None:
    path = tmp_path / "keys.db"
    infos = every_kind_of_record() + [record(1000 + n) for n in range(300)]
    write_v1(path, infos)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(path), statement, str(calls)],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    assert child.stdout is not None
    try:
        assert child.stdout.readline() == "stopped\n", f"{statement} never got that far"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)
        child.stdout.close()

    assert raw(path, "PRAGMA integrity_check") == [("ok",)]
    assert raw(path, "SELECT value FROM keyguard_meta WHERE name = 'schema_version'") == [
        (version,)
    ]
    assert_holds_what_v1_held(path, [v1_row(info) for info in infos])
