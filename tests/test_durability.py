"""Nothing acknowledged is lost when a writer is killed: SIGKILL rounds on one store.

Each round starts ``tests/durability_child.py`` on the same store, lets it create keys,
revoke some and charge a quota for a random moment, then SIGKILLs it. After every kill the
store must open (a SQLite file must also pass ``PRAGMA integrity_check``), every key the
child acknowledged must be found under its digest, every acknowledged revocation must
hold, the store may hold at most one unacknowledged key per round (the call in flight),
and the quota must have counted each acknowledged charge exactly once, plus at most the
one charge in flight.

A normal run makes a few rounds per store; ``make durability`` (or
``KEYGUARD_DURABILITY_ROUNDS=30``) runs the long battery whose figures docs/security.md
publishes, printed by the test's last line.
"""

from __future__ import annotations

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlencode

import pytest

from keyguard import APIKeyManager
from tests.stores.services import postgres_table, redis_namespace

ROOT = Path(__file__).resolve().parents[1]
ROUNDS = int(os.environ.get("KEYGUARD_DURABILITY_ROUNDS") or "5")
#: The kill lands up to this many seconds after the child is ready.
MAX_RUN = 0.5
QUOTA = 10**9


@dataclass
class Acknowledged:
    """What the children acknowledged, summed over the rounds so far."""

    created: dict[str, str] = field(default_factory=dict)  # key_id -> digest
    revoked: set[str] = field(default_factory=set)
    charges: int = 0
    #: Charges announced but not acknowledged: each may or may not have counted.
    charges_in_doubt: int = 0
    rounds: int = 0

    def read(self, journal: Path) -> None:
        """Add one round's journal; a last line without its newline was never written."""
        lines = journal.read_text().split("\n")[:-1]
        for line in lines:
            action, *rest = line.split()
            if action == "created":
                key_id, digest = rest
                self.created[key_id] = digest
            elif action == "revoked":
                self.revoked.add(rest[0])
            elif action == "charged":
                self.charges += 1
        if lines and lines[-1] == "charging":
            self.charges_in_doubt += 1
        self.rounds += 1


def _with_params(url: str, **params: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}{urlencode(params)}"


@contextmanager
def store_url(name: str, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty store of the named kind, removed afterwards."""
    if name == "sqlite":
        yield f"sqlite:///{tmp_path / 'keys.db'}"
    elif name == "redis":
        with redis_namespace() as (url, namespace):
            yield _with_params(url, namespace=namespace)
    else:
        with postgres_table() as (dsn, table):
            yield _with_params(dsn, table=table)


def kill_a_writer(url: str, journal: Path, quota_key_id: str, rng: random.Random) -> None:
    """Run the child until a random moment after it is ready, then SIGKILL it."""
    errors = journal.with_suffix(".stderr")
    with errors.open("w") as stderr:
        child = subprocess.Popen(
            [
                *(sys.executable, "-m", "tests.durability_child"),
                *(url, str(journal), quota_key_id, str(rng.randrange(2**32))),
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        deadline = time.monotonic() + 60  # a loaded machine starts Python slowly
        while not (journal.exists() and journal.read_text().startswith("ready\n")):
            assert child.poll() is None, f"the child exited: {errors.read_text()}"
            assert time.monotonic() < deadline, "the child never opened the store"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, MAX_RUN))
        assert child.poll() is None, f"the child exited: {errors.read_text()}"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=60)


def check_sqlite_file(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        conn.close()


def check_store(url: str, acknowledged: Acknowledged, quota_key_id: str) -> None:
    """The store opens and holds everything acknowledged, and nothing counted twice."""
    manager = APIKeyManager.from_url(url, last_used_resolution=None, record_usage=False)
    try:
        for key_id, digest in acknowledged.created.items():
            info = manager.store.get(digest)
            assert info is not None, f"acknowledged key {key_id} is lost"
            assert info.key_id == key_id
            if key_id in acknowledged.revoked:
                assert info.revoked_at is not None, f"acknowledged revocation of {key_id} is lost"
        stored = manager.list_keys("durability", include_inactive=True)
        unacknowledged = {info.key_id for info in stored} - acknowledged.created.keys()
        assert len(unacknowledged) <= acknowledged.rounds, "more keys than calls in flight"

        remaining = manager.remaining(quota_key_id)
        assert remaining is not None
        used = QUOTA - remaining
        assert used >= acknowledged.charges, "an acknowledged charge is lost"
        assert used <= acknowledged.charges + acknowledged.charges_in_doubt, (
            "a charge counted twice"
        )
    finally:
        manager.close()


@pytest.mark.parametrize("name", ["sqlite", "redis", "postgres"])
def test_sigkill_loses_nothing_acknowledged(name: str, tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    print(f"seed {seed}")  # shown if the test fails, to replay its kill moments
    rng = random.Random(seed)
    with store_url(name, tmp_path) as url:
        manager = APIKeyManager.from_url(url, record_usage=False)
        try:
            quota_key_id = manager.create_key(user_id="quota", quota=QUOTA)[1].key_id
        finally:
            manager.close()
        acknowledged = Acknowledged()
        for n in range(ROUNDS):
            journal = tmp_path / f"round-{n}.journal"
            kill_a_writer(url, journal, quota_key_id, rng)
            acknowledged.read(journal)
            if name == "sqlite":
                check_sqlite_file(tmp_path / "keys.db")
            check_store(url, acknowledged, quota_key_id)

    assert acknowledged.created, "no round acknowledged anything: the test proved nothing"
    print(
        f"{name}: {ROUNDS} SIGKILL rounds, {len(acknowledged.created)} keys,"
        f" {len(acknowledged.revoked)} revocations and {acknowledged.charges} charges"
        " acknowledged, 0 lost"
    )
