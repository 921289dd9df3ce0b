"""Many writers at once: 16 threads on every store, and 4 processes on one SQLite file.

Every key whose creation was acknowledged is found afterwards, once, with the status its
acknowledged revocations give it; a revocation succeeds once however many race for it,
and is seen by the next check; paged listings taken while others write never repeat a key
or miss one that existed before they began.
"""

from __future__ import annotations

import json
import random
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing
from datetime import timedelta
from pathlib import Path

import pytest

from keyguard import APIKeyManager, InvalidKeyError, KeyStore, SQLiteStore
from tests.stores.conftest import STORE_NAMES
from tests.stores.services import open_store

THREADS, KEYS_PER_THREAD, USERS = 16, 32, 4


@pytest.fixture(params=[*STORE_NAMES, "cached-redis"])
def any_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyStore]:
    with open_store(request.param, tmp_path) as store:
        yield store


def test_sixteen_threads_create_check_revoke_and_list(any_store: KeyStore) -> None:
    manager = APIKeyManager(any_store)
    barrier = threading.Barrier(THREADS)
    lock = threading.Lock()
    issued: dict[str, str] = {}  # key_id -> key, once create_key has returned
    users: dict[str, str] = {}  # key_id -> user_id
    published: list[str] = []  # keys any thread may try to revoke
    wins: Counter[str] = Counter()

    def walk(user: str) -> None:
        with lock:
            before = {key_id for key_id, owner in users.items() if owner == user}
        seen = list(manager.iter_keys(user, include_inactive=True, page_size=5))
        ids = [info.key_id for info in seen]
        assert len(ids) == len(set(ids)), "a paged walk repeated a key"
        assert before <= set(ids), "a paged walk missed a key that existed before it began"
        order = [(info.created_at, info.key_id) for info in seen]
        assert order == sorted(order)

    def work(thread: int) -> None:
        user = f"user-{thread % USERS}"
        pick = random.Random(thread)
        barrier.wait()
        for i in range(KEYS_PER_THREAD):
            key, info = manager.create_key(user_id=user, thread=thread, i=i)
            with lock:
                issued[info.key_id] = key
                users[info.key_id] = user
            assert manager.validate_key(key)  # before another thread may revoke it
            with lock:
                published.append(key)
                target = pick.choice(published)
            if manager.revoke_key(target):
                with lock:
                    wins[target] += 1
            # Revoked by this thread or another one before: refused from now on.
            assert not manager.validate_key(target)
            if i % 8 == 0:
                walk(user)

    with ThreadPoolExecutor(THREADS) as pool:
        for future in [pool.submit(work, n) for n in range(THREADS)]:
            future.result()

    revoked = set(wins)
    assert set(wins.values()) == {1}, "a revocation succeeded twice"
    records = manager.list_keys(include_inactive=True)
    assert len(records) == len(issued) == THREADS * KEYS_PER_THREAD
    assert {r.key_id for r in records} == set(issued)
    assert len({r.digest for r in records}) == len(records)
    assert list(manager.iter_keys(include_inactive=True, page_size=7)) == records
    for info in records:
        key = issued[info.key_id]
        assert info.digest == manager.digest(key)
        assert (info.revoked_at is not None) is (key in revoked)
        assert manager.validate_key(key) is (key not in revoked)
        if key not in revoked:
            assert manager.get_metadata(key) == {
                "user_id": info.user_id,
                "thread": info.metadata["thread"],
                "i": info.metadata["i"],
            }
    for n in range(USERS):
        user = f"user-{n}"
        active = [r for r in records if r.user_id == user and issued[r.key_id] not in revoked]
        assert manager.list_keys(user) == active
        pages: list[str] = []
        after = None
        while page := manager.list_keys(user, limit=6, after=after):
            pages += [info.key_id for info in page]
            after = page[-1].key_id
        assert pages == [info.key_id for info in active]


# -- processes on one SQLite file ----------------------------------------------------------

PROCESSES, KEYS_PER_PROCESS, RACED, QUOTA = 4, 100, 20, 10_000

# One writer process: it waits for the go file, then creates and checks keys, revokes every
# other one of its own, charges a shared key's quota, counts usage for it and races the
# other processes to revoke the same keys. It prints what the store acknowledged.
WRITER = """
import json, os, sys, time
from pathlib import Path
from keyguard import APIKeyManager, SQLiteStore

plan = json.loads(Path(sys.argv[1]).read_text())
n = int(sys.argv[2])
Path(plan["ready"] + str(n)).touch()
while not os.path.exists(plan["go"]):
    time.sleep(0.01)
manager = APIKeyManager(SQLiteStore(plan["db"]))
shared = manager.check(plan["quota_key"])
recorder = manager.usage_recorder
acks = []
for i in range(plan["keys"]):
    key, info = manager.create_key(user_id=f"proc-{n}", i=i)
    acks.append(["created", info.key_id, key])
    assert manager.validate_key(key)
    if i % 2 and manager.revoke_key(key):
        acks.append(["revoked", info.key_id, key])
    usage = manager.charge(shared)
    acks.append(["charged", usage is not None and usage.allowed])
    recorder.record(shared.key_id)
    target = plan["raced"][(i + 5 * n) % len(plan["raced"])]
    if manager.revoke_key(target):
        acks.append(["revoked", None, target])
    assert not manager.validate_key(target)
manager.close()
print(json.dumps(acks))
"""


def test_four_processes_write_one_sqlite_file(tmp_path: Path) -> None:
    db = tmp_path / "keys.db"
    manager = APIKeyManager(SQLiteStore(db))
    quota_key, quota_info = manager.create_key(user_id="shared", quota=QUOTA)
    raced = [manager.generate_key(user_id="raced", i=i) for i in range(RACED)]
    manager.close()
    plan = {
        "db": str(db),
        "keys": KEYS_PER_PROCESS,
        "quota_key": quota_key,
        "raced": raced,
        "ready": str(tmp_path / "ready-"),
        "go": str(tmp_path / "go"),
    }
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(tmp_path / "plan.json"), str(n)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(PROCESSES)
    ]
    try:
        # Start them together, once all have imported keyguard.
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready-{n}").exists() for n in range(PROCESSES)):
            assert all(w.poll() is None for w in writers), "a writer died before starting"
            assert time.monotonic() < deadline, "the writers did not start"
            time.sleep(0.02)
        (tmp_path / "go").touch()
        outputs = [w.communicate(timeout=120) for w in writers]
    finally:
        for w in writers:
            if w.poll() is None:
                w.kill()
                w.communicate()
    for writer, (_, err) in zip(writers, outputs, strict=True):
        assert writer.returncode == 0, err
    acks = [ack for out, _ in outputs for ack in json.loads(out)]

    with closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    manager = APIKeyManager(SQLiteStore(db), last_used_resolution=None)
    try:
        created = {ack[1]: ack[2] for ack in acks if ack[0] == "created"}
        revocations = Counter(ack[2] for ack in acks if ack[0] == "revoked")
        assert len(created) == PROCESSES * KEYS_PER_PROCESS
        assert set(revocations.values()) == {1}, "a key was revoked twice"
        assert set(raced) <= set(revocations), "a raced key was never revoked"
        for key_id, key in created.items():
            info = manager.get_key_info(key_id)
            assert info is not None, "an acknowledged key is missing"
            assert info.digest == manager.digest(key)
            assert (info.revoked_at is not None) is (key in revocations)
            assert manager.validate_key(key) is (key not in revocations)
        assert not any(manager.validate_key(key) for key in raced)
        records = manager.list_keys(include_inactive=True)
        assert len(records) == len(created) + RACED + 1
        assert len({r.digest for r in records}) == len(records)

        charges = [ack[1] for ack in acks if ack[0] == "charged"]
        assert charges == [True] * PROCESSES * KEYS_PER_PROCESS
        assert manager.remaining(quota_key) == QUOTA - len(charges)
        points = manager.usage(quota_info.key_id, since=timedelta(days=1), step="day")
        assert sum(point.requests for point in points) == len(charges)
    finally:
        manager.close()


def test_updates_racing_revocations_never_bring_a_key_back(any_store: KeyStore) -> None:
    """Each key is renamed over and over by one thread while another revokes it, both
    released at once: once an update is refused as revoked, every later one is too, and
    the key stays revoked, with the store and the manager agreeing."""
    manager = APIKeyManager(any_store)
    keys = [manager.create_key(user_id="u", permissions=["read"]) for _ in range(6)]
    start = threading.Barrier(2 * len(keys))

    def rename(key_id: str) -> int:
        start.wait()
        done = 0
        while True:
            try:
                manager.update_key(key_id, name=f"n{done}")
            except InvalidKeyError:
                break
            done += 1
        for n in range(5):
            with pytest.raises(InvalidKeyError, match="revoked"):
                manager.update_key(key_id, name=f"after{n}")
        return done

    def revoke(key_id: str) -> bool:
        start.wait()
        time.sleep(random.random() / 50)
        return manager.revoke_by_id(key_id)

    with ThreadPoolExecutor(max_workers=2 * len(keys)) as pool:
        renames = [pool.submit(rename, info.key_id) for _, info in keys]
        revokes = [pool.submit(revoke, info.key_id) for _, info in keys]
        assert all(f.result(timeout=120) for f in revokes)
        renamed = [f.result(timeout=120) for f in renames]
    assert sum(renamed) > 0, "no update ran before its revocation: nothing raced"
    for key, info in keys:
        stored = manager.get_key_info(info.key_id)
        assert stored is not None and stored.revoked_at is not None
        assert not manager.validate_key(key)
