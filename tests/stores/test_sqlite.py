"""SQLiteStore specifics: the file on disk, sharing it between processes, refusing bad files."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import pytest

from keyguard import APIKeyManager, Reason, SQLiteStore, StoreError
from keyguard.stores.sqlite import SCHEMA_VERSION


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "keys.db"


@contextmanager
def open_store(path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(path)
    try:
        yield store
    finally:
        store.close()


def raw_query(path: Path, sql: str) -> list[tuple[object, ...]]:
    """Read the file with plain sqlite3, to see what the store really wrote."""
    with closing(sqlite3.connect(path)) as conn:
        return conn.execute(sql).fetchall()


def populated(path: Path, keys: int = 200) -> Path:
    """A closed keyguard database with ``keys`` keys, spread over several pages."""
    with open_store(path) as store:
        manager = APIKeyManager(store)
        for n in range(keys):
            manager.generate_key(user_id=f"user-{n}", note="x" * 50)
    return path


# -- the file ------------------------------------------------------------------------------


def test_file_is_created_with_mode_0600(db_path: Path) -> None:
    old_umask = os.umask(0)
    try:
        with open_store(db_path) as store:
            APIKeyManager(store).generate_key(user_id="u1")
            files = sorted(db_path.parent.iterdir())
            modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in files}
    finally:
        os.umask(old_umask)

    # The WAL and shared-memory files hold key digests too; SQLite copies the file's mode.
    assert modes == {"keys.db": 0o600, "keys.db-shm": 0o600, "keys.db-wal": 0o600}


def test_database_is_in_wal_mode_with_a_schema_version(db_path: Path) -> None:
    with open_store(db_path):
        pass

    assert raw_query(db_path, "PRAGMA journal_mode") == [("wal",)]
    assert raw_query(db_path, "SELECT name, value FROM keyguard_meta") == [
        ("schema_version", str(SCHEMA_VERSION))
    ]
    indexes = raw_query(db_path, "SELECT name FROM sqlite_master WHERE type = 'index'")
    assert {("keyguard_records_user",), ("keyguard_records_created",)} <= set(indexes)


def test_keys_are_stored_hashed(db_path: Path) -> None:
    with open_store(db_path) as store:
        key = APIKeyManager(store).generate_key(user_id="u1", email="a@x.io")

    content = db_path.read_bytes()
    assert key.encode() not in content
    assert key[3:].encode() not in content
    assert [row[0] for row in raw_query(db_path, "SELECT digest FROM keyguard_records")] == [
        bytes.fromhex(APIKeyManager().digest(key))
    ]


def test_reopening_keeps_keys_and_their_state(db_path: Path) -> None:
    with open_store(db_path) as store:
        manager = APIKeyManager(store)
        kept = manager.generate_key(user_id="u1", permissions=["read"])
        revoked = manager.generate_key(user_id="u1")
        manager.revoke_key(revoked)

    with open_store(db_path) as store:
        manager = APIKeyManager(store)
        assert manager.get_metadata(kept) == {"user_id": "u1", "permissions": ["read"]}
        assert manager.verify(revoked).reason is Reason.REVOKED
        assert len(manager.list_keys(include_inactive=True)) == 2

    assert raw_query(db_path, "SELECT value FROM keyguard_meta") == [(str(SCHEMA_VERSION),)]


def test_an_empty_file_becomes_a_store(db_path: Path) -> None:
    db_path.touch()

    with open_store(db_path) as store:
        key = APIKeyManager(store).generate_key(user_id="u1")
        assert APIKeyManager(store).validate_key(key)


# -- sharing the file ----------------------------------------------------------------------

# A second process that creates, checks and revokes keys on request, one command per line.
# It prints keys it created back to the test through a pipe; nothing is logged.
CHILD = """
import sys
import threading
import time
from keyguard import APIKeyManager, SQLiteStore

store = SQLiteStore(sys.argv[1])
manager = APIKeyManager(store)
for line in sys.stdin:
    command, _, key = line.strip().partition(" ")
    if command == "create":
        answer = manager.generate_key(user_id="child")
    elif command == "check":
        answer = manager.verify(key).reason.value
    else:
        answer = str(manager.revoke_key(key))
    print(answer, flush=True)
store.close()
"""


def test_two_processes_share_one_file(db_path: Path) -> None:
    with open_store(db_path) as store:
        manager = APIKeyManager(store)
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(db_path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert child.stdin is not None and child.stdout is not None

        def ask(command: str) -> str:
            assert child.stdin is not None and child.stdout is not None
            child.stdin.write(command + "\n")
            child.stdin.flush()
            return child.stdout.readline().strip()

        try:
            from_child = ask("create")
            assert manager.validate_key(from_child) is True
            assert manager.revoke_key(from_child) is True
            assert ask(f"check {from_child}") == "revoked"

            from_parent = manager.generate_key(user_id="parent")
            assert ask(f"check {from_parent}") == "ok"
            assert ask(f"revoke {from_parent}") == "True"
            assert manager.verify(from_parent).reason is Reason.REVOKED
        finally:
            child.stdin.close()
            returncode = child.wait(timeout=30)
            child.stdout.close()

    assert returncode == 0


def check_in_forked_child(store: SQLiteStore, key: str, queue: multiprocessing.Queue[str]) -> None:
    manager = APIKeyManager(store)
    queue.put(manager.verify(key).reason.value)
    queue.put(manager.generate_key(user_id="forked"))


def test_a_store_opened_before_fork_works_in_the_child(db_path: Path) -> None:
    # Servers such as gunicorn load the app (and open the store) before forking workers.
    context = multiprocessing.get_context("fork")
    with open_store(db_path) as store:
        manager = APIKeyManager(store)
        key = manager.generate_key(user_id="parent")
        queue: multiprocessing.Queue[str] = context.Queue()
        child = context.Process(target=check_in_forked_child, args=(store, key, queue))
        child.start()
        try:
            reason, child_key = queue.get(timeout=30), queue.get(timeout=30)
        finally:
            child.join(timeout=30)
            queue.close()
            queue.join_thread()

        assert child.exitcode == 0
        assert reason == "ok"
        assert manager.validate_key(child_key) is True
        assert manager.validate_key(key) is True


def test_threads_share_one_store(db_path: Path) -> None:
    with open_store(db_path) as store:
        manager = APIKeyManager(store)

        def work(n: int) -> list[str]:
            keys = [manager.generate_key(user_id=f"user-{n}") for _ in range(10)]
            assert all(manager.validate_key(key) for key in keys)
            return keys

        with ThreadPoolExecutor(8) as pool:
            issued = [key for keys in pool.map(work, range(8)) for key in keys]

        assert all(manager.validate_key(key) for key in issued)
        assert len(manager.list_keys()) == 80

    with pytest.raises(StoreError, match="closed"):
        manager.validate_key(issued[0])


# -- refusing files that are not keyguard stores -------------------------------------------


def write(content: bytes) -> Callable[[Path], None]:
    def make(path: Path) -> None:
        path.write_bytes(content)

    return make


def other_app_database(journal_mode: str) -> Callable[[Path], None]:
    def build(path: Path) -> None:
        with closing(sqlite3.connect(path)) as conn:
            conn.execute(f"PRAGMA journal_mode={journal_mode}")
            conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT)")
            conn.execute("INSERT INTO users (name) VALUES ('alice'), ('bob')")
            conn.commit()

    return build


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts fds in /proc")
def test_connections_of_finished_threads_are_closed(db_path: Path) -> None:
    # Thread-per-request servers would otherwise run out of file descriptors.
    with open_store(db_path) as store:
        manager = APIKeyManager(store, last_used_resolution=None)
        key = manager.generate_key(user_id="u1")
        before = len(os.listdir("/proc/self/fd"))
        for _ in range(200):
            thread = threading.Thread(target=manager.verify, args=(key,))
            thread.start()
            thread.join()
        assert len(os.listdir("/proc/self/fd")) - before < 10
        assert manager.validate_key(key)


def _open_and_add(path: str, barrier: Any, index: int) -> str:
    barrier.wait()
    try:
        with open_store(Path(path)) as store:
            APIKeyManager(store).generate_key(user_id=f"worker{index}")
    except StoreError as e:
        return str(e)
    return "ok"


def test_workers_opening_a_new_file_at_once_all_succeed(tmp_path: Path) -> None:
    # gunicorn -w N on a fresh machine: every worker creates the schema at the same moment.
    ctx = multiprocessing.get_context("fork")
    workers = 6
    for attempt in range(20):
        path = tmp_path / f"fresh{attempt}.db"
        barrier = ctx.Manager().Barrier(workers)
        with ctx.Pool(workers) as pool:
            results = pool.starmap(
                _open_and_add, [(str(path), barrier, i) for i in range(workers)]
            )
        assert results == ["ok"] * workers
        with open_store(path) as store:
            assert len(store.list_keys()) == workers


def test_reopening_a_current_store_writes_nothing(db_path: Path) -> None:
    # A store file on a read-only mount (or a copy kept for audit) must stay readable.
    with open_store(db_path) as store:
        key = APIKeyManager(store).generate_key(user_id="u1")
    before = db_path.read_bytes()
    with open_store(db_path) as store:
        assert APIKeyManager(store, last_used_resolution=None).validate_key(key)
    assert db_path.read_bytes() == before


def test_a_damaged_record_is_a_store_error_naming_the_key(db_path: Path) -> None:
    with open_store(db_path) as store:
        manager = APIKeyManager(store)
        key, info = manager.create_key(user_id="u1")
        with closing(sqlite3.connect(db_path, isolation_level=None)) as conn:
            conn.execute("UPDATE keyguard_records SET metadata = '{not json'")
        # A check reads only the key's times; its metadata is parsed where first read.
        checked = manager.verify(key).key
        assert checked is not None and checked.key_id == info.key_id
        with pytest.raises(StoreError, match=f"{info.key_id}.* is damaged"):
            checked.scopes  # noqa: B018
        with pytest.raises(StoreError, match="damaged"):
            manager.list_keys()[0].metadata  # noqa: B018
        with pytest.raises(StoreError, match="damaged"):
            manager.get_metadata(key)


def test_a_busy_database_skips_the_last_use_write_instead_of_waiting(db_path: Path) -> None:
    # An async server records last use on its event loop: waiting out the store's 10 s lock
    # timeout there would stall every request, so the write is skipped.
    with open_store(db_path) as setup:
        key = APIKeyManager(setup).generate_key(user_id="u1")
    store = SQLiteStore(db_path, timeout=10.0)
    manager = APIKeyManager(store)
    other = sqlite3.connect(db_path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        started = time.monotonic()
        assert manager.verify(key).reason is Reason.OK
        assert time.monotonic() - started < 5.0
        other.execute("ROLLBACK")
        assert raw_query(db_path, "SELECT last_used_at FROM keyguard_records") == [(None,)]
        # The lock timeout is back for writes that must not be lost.
        assert store._conn().execute("PRAGMA busy_timeout").fetchone() == (10_000,)
        assert manager.revoke_key(key)
    finally:
        other.close()
        store.close()


@pytest.mark.parametrize(
    ("make_file", "message"),
    [
        pytest.param(write(os.urandom(8192)), "not a SQLite database", id="random bytes"),
        pytest.param(write(b"just some notes\n" * 100), "not a SQLite database", id="text"),
        pytest.param(write(b"{}"), "not a SQLite database", id="tiny file"),
        pytest.param(write(b"SQLite format 2\x00" + bytes(100)), "not a SQLite", id="old header"),
        pytest.param(other_app_database("delete"), "not a keyguard key store", id="other app"),
        pytest.param(other_app_database("wal"), "not a keyguard key store", id="other app WAL"),
    ],
)
def test_a_file_that_is_not_a_keyguard_store_is_refused_and_left_alone(
    db_path: Path, make_file: Callable[[Path], None], message: str
) -> None:
    make_file(db_path)
    before = db_path.read_bytes()

    with pytest.raises(StoreError, match=message) as exc_info:
        SQLiteStore(db_path)

    assert str(db_path) in str(exc_info.value)
    assert db_path.read_bytes() == before
    assert [p.name for p in db_path.parent.iterdir()] == ["keys.db"]


def overwrite(offset: int, size: int) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        with path.open("r+b") as f:
            f.seek(offset)
            f.write(bytes(range(256)) * (size // 256))

    return damage


def truncate(size: int) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        with path.open("r+b") as f:
            f.truncate(size if size >= 0 else path.stat().st_size + size)

    return damage


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(truncate(100), id="truncated to the header"),
        pytest.param(truncate(4096), id="truncated to one page"),
        pytest.param(truncate(-40_960), id="last pages cut off"),
        pytest.param(overwrite(100, 2048), id="schema page overwritten"),
        pytest.param(overwrite(4096, 4096), id="second page overwritten"),
        pytest.param(overwrite(8192, 4096), id="third page overwritten"),
    ],
)
def test_a_corrupt_store_is_refused_and_left_alone(
    db_path: Path, damage: Callable[[Path], None]
) -> None:
    damage(populated(db_path))
    before = db_path.read_bytes()

    with pytest.raises(StoreError, match="malformed") as exc_info:
        SQLiteStore(db_path)

    assert str(db_path) in str(exc_info.value)
    assert db_path.read_bytes() == before
    assert [p.name for p in db_path.parent.iterdir()] == ["keys.db"]


@pytest.mark.parametrize(
    ("version", "shown"),
    [
        pytest.param(str(SCHEMA_VERSION + 1), repr(str(SCHEMA_VERSION + 1)), id="newer"),
        pytest.param("one", "'one'", id="not a number"),
        pytest.param("0", "'0'", id="before version 1"),
    ],
)
def test_an_unknown_schema_version_is_refused_and_left_alone(
    db_path: Path, version: str, shown: str
) -> None:
    populated(db_path, keys=3)
    with closing(sqlite3.connect(db_path)) as conn:
        conn.execute(
            "UPDATE keyguard_meta SET value = ? WHERE name = 'schema_version'", (version,)
        )
        conn.commit()
    before = db_path.read_bytes()

    with pytest.raises(StoreError, match="schema version") as exc_info:
        SQLiteStore(db_path)

    assert shown in str(exc_info.value)
    assert f"supports up to {SCHEMA_VERSION}" in str(exc_info.value)
    assert db_path.read_bytes() == before


def test_a_keyguard_table_without_a_version_is_refused(db_path: Path) -> None:
    populated(db_path, keys=1)
    with closing(sqlite3.connect(db_path)) as conn:
        conn.execute("DELETE FROM keyguard_meta")
        conn.commit()

    with pytest.raises(StoreError, match="schema version None"):
        SQLiteStore(db_path)


# -- paths that cannot be a store ----------------------------------------------------------


def path_under_a_file(tmp_path: Path) -> Path:
    (tmp_path / "file.txt").write_text("x")
    return tmp_path / "file.txt" / "keys.db"


@pytest.mark.parametrize(
    ("make_path", "message"),
    [
        pytest.param(lambda tmp: tmp / "missing" / "keys.db", "No such file", id="no parent"),
        pytest.param(lambda tmp: tmp, "Is a directory", id="a directory"),
        pytest.param(path_under_a_file, "Not a directory", id="parent is a file"),
    ],
)
def test_an_unusable_path_is_a_store_error(
    tmp_path: Path, make_path: Callable[[Path], Path], message: str
) -> None:
    path = make_path(tmp_path)

    with pytest.raises(StoreError, match=message) as exc_info:
        SQLiteStore(path)

    assert str(path) in str(exc_info.value)


@pytest.mark.skipif(
    hasattr(os, "geteuid") and os.geteuid() == 0, reason="root can read any file whatever its mode"
)
def test_an_unreadable_file_is_a_store_error(db_path: Path) -> None:
    populated(db_path, keys=1)
    db_path.chmod(0)

    with pytest.raises(StoreError, match="Permission denied"):
        SQLiteStore(db_path)


@pytest.mark.parametrize("path", [":memory:", "file:keys.db?mode=memory", "file::memory:"])
def test_in_memory_databases_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="MemoryStore"):
        SQLiteStore(path)


def _views_only(path: Path) -> None:
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("CREATE VIEW answers AS SELECT 42 AS answer")


def _application_id_only(path: Path) -> None:
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA application_id = 1234")
        conn.execute("PRAGMA user_version = 7")


@pytest.mark.parametrize("make", [_views_only, _application_id_only], ids=["views", "app id"])
@pytest.mark.parametrize("create_schema", [True, False], ids=["create", "open only"])
def test_a_foreign_database_without_tables_is_refused_untouched(
    tmp_path: Path, make: Callable[[Path], None], create_schema: bool
) -> None:
    path = tmp_path / "other.db"
    make(path)
    before = path.read_bytes()

    with pytest.raises(StoreError, match="not a keyguard key store"):
        SQLiteStore(path, create_schema=create_schema)

    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.db"]


def test_open_only_refuses_a_missing_or_empty_file_and_creates_nothing(tmp_path: Path) -> None:
    missing, empty = tmp_path / "missing.db", tmp_path / "empty.db"
    empty.touch()

    with pytest.raises(StoreError, match="no SQLite key store"):
        SQLiteStore(missing, create_schema=False)
    with pytest.raises(StoreError, match="empty file"):
        SQLiteStore(empty, create_schema=False)

    assert not missing.exists()
    assert empty.read_bytes() == b""
    with open_store(empty) as store:  # creating a store may take an empty file
        assert store.list_keys() == []


# -- listing in pages ----------------------------------------------------------------------


def test_a_page_reads_an_index_in_order_instead_of_sorting_the_table(db_path: Path) -> None:
    with open_store(db_path) as store:
        manager = APIKeyManager(store)
        first = manager.create_key(user_id="u1")[1]
        manager.create_key(user_id="u1")
        statements: list[str] = []
        store._conn().set_trace_callback(statements.append)
        store.list_keys(limit=10)
        store.list_keys(limit=10, after=first.key_id)
        store.list_keys("u1", limit=10)
        store.list_keys("u1", limit=10, after=first.key_id)
        store._conn().set_trace_callback(None)

    pages = [s for s in statements if " LIMIT " in s]
    assert len(pages) == 4
    for statement in pages:
        rows = raw_query(db_path, "EXPLAIN QUERY PLAN " + statement)
        plan = " / ".join(str(row[3]) for row in rows)
        assert "USING INDEX" in plan, plan
        # A user's keys come in creation order from keyguard_records_user; only keys created
        # at the same instant are sorted (the "right part"), never the whole table.
        assert "TEMP B-TREE FOR ORDER BY" not in plan, plan


def test_a_read_only_current_file_lists_and_checks_keys(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with open_store(db_path) as store:
        manager = APIKeyManager(store)
        key, info = manager.create_key(user_id="u1")
        peppered = APIKeyManager(store, pepper="p" * 32).create_key(user_id="u1")[1]
    before = db_path.read_bytes()
    connect = sqlite3.connect

    def read_only(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        # What a file this process may not write answers, even to root (who ignores modes).
        conn: sqlite3.Connection = connect(*args, **kwargs)
        conn.execute("PRAGMA query_only = 1")
        return conn

    monkeypatch.setattr(sqlite3, "connect", read_only)

    with open_store(db_path) as store:
        assert APIKeyManager(store, last_used_resolution=None).validate_key(key)
        assert store.list_keys("u1", limit=10) == [info, peppered]
    assert db_path.read_bytes() == before
