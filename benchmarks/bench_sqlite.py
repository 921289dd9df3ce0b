"""SQLiteStore at 1,000,000 keys: file size per million keys, and a check against a raw SELECT.

The store is filled through ``SQLiteStore.add`` inside one transaction (the public path
commits each key; one transaction keeps a million of them to about a minute and a half),
in creation order, which is random digest order, as a store grows key by key. Keys belong
to 100,000 users. ``--metadata typical`` (the default, about 100 bytes of JSON) gives each
key:

    {"user_id": "user004217", "email": "user004217@example.com",
     "permissions": ["read", "write"], "name": "key 104217"}

``--metadata minimal`` gives ``{"user_id": "user004217", "permissions": ["read"]}``, the
records of ``bench_validate.py`` and ``bench_peers.py``.

**Size**: the file after a checkpoint, in MiB per million keys, with the share of each
table and index (SQLite's ``dbstat``) and, beside it, the bytes of the values stored in
it (cell payloads, with SQLite's record headers): what no page layout can shrink.
Target: 150 MiB with typical metadata.

**Check**: ``APIKeyManager.validate_key`` (last-use writes off: they are writes, once a
minute per key, not part of a lookup) against the floor the issue names: a raw
``SELECT * FROM <the keys table> WHERE <its primary key> = ?`` with the key's primary key
already known, on the store's own connection (same file, same pragmas). Each round times
the floor and then the check over the same keys; the ratio of each round is kept and
min / median / max over the rounds printed. **spread** checks 100,000 distinct keys once
per pass, so neither the store's decode cache (4,096 records) nor SQLite's page cache
(2 MiB) holds them; **hot** re-checks 10 keys. Target: spread at most 1.3 times the floor.
Times are this thread's CPU time (a page read from the OS cache is system time, so it
counts). **Parts** then times alone, over the spread keys, what a check adds to the floor:
SHA-256 of the key, the store's lookup by digest, and of that the row id and the decode of
a row into a ``KeyInfo`` (rows fetched beforehand, the decode cache bypassed).

The table and its key are read from the file, so the same script measures a store of any
schema version (run it with an older keyguard on ``PYTHONPATH`` for a before/after).
``--upgrade`` then also writes the same keys as schema version 1 laid them out and times
the upgrade of that file on open.

    python benchmarks/bench_sqlite.py                      # 1,000,000 keys, about 4 minutes
    python benchmarks/bench_sqlite.py --keys 100000 --rounds 3
    python benchmarks/bench_sqlite.py --upgrade            # and a version 1 file upgraded
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import random
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import closing
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from keyguard import APIKeyManager, KeyInfo, SQLiteStore, digest_key

SIZE_TARGET_MIB = 150.0
RATIO_TARGET = 1.3
MIB = 1024 * 1024
NOW = datetime.now(timezone.utc).timestamp()

# Schema version 1, as keyguard wrote it, for --upgrade.
V1_SCHEMA = """
PRAGMA journal_mode = WAL;
CREATE TABLE keyguard_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE keyguard_keys (
    digest TEXT PRIMARY KEY, key_id TEXT NOT NULL UNIQUE, hash_scheme TEXT NOT NULL,
    prefix TEXT NOT NULL, hint TEXT NOT NULL, user_id TEXT NOT NULL, metadata TEXT NOT NULL,
    created_at REAL NOT NULL, expires_at REAL, revoked_at REAL, last_used_at REAL
) WITHOUT ROWID;
CREATE INDEX keyguard_keys_user ON keyguard_keys (user_id, created_at);
CREATE TABLE keyguard_counters (name TEXT PRIMARY KEY, value REAL NOT NULL, expires_at REAL)
    WITHOUT ROWID;
CREATE INDEX keyguard_keys_created ON keyguard_keys (created_at, key_id);
INSERT INTO keyguard_meta (name, value) VALUES ('schema_version', '1');
"""


def make_records(n: int, metadata: str, seed: int) -> Iterator[tuple[str, KeyInfo]]:
    """``n`` keys and their records, oldest first, as the manager would issue them."""
    rng = random.Random(seed)
    for i in range(n):
        key = "sk_" + rng.randbytes(16).hex()
        user = f"user{i % 100_000:06d}"
        fields: dict[str, Any] = {"user_id": user}
        if metadata == "typical":
            fields.update(
                email=f"{user}@example.com", permissions=["read", "write"], name=f"key {i}"
            )
        else:
            fields.update(permissions=["read"])
        yield (
            key,
            KeyInfo(
                key_id="key_" + rng.randbytes(8).hex(),
                prefix="sk_",
                hint="sk_…" + key[-4:],
                user_id=user,
                metadata=fields,
                created_at=datetime.fromtimestamp(NOW - n + i + rng.random(), timezone.utc),
                digest=digest_key(key),
            ),
        )


def load(path: Path, records: Iterator[tuple[str, KeyInfo]], wanted: set[int]) -> dict[str, str]:
    """Fill a store at ``path``; return the key_id of each key whose number is wanted."""
    kept = {}
    store = SQLiteStore(path)
    conn = store._conn()
    conn.execute("BEGIN IMMEDIATE")
    for i, (key, info) in enumerate(records):
        if not store.add(info):
            raise RuntimeError("collision while loading")
        if i in wanted:
            kept[key] = info.key_id
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()
    return kept


def write_v1(path: Path, records: Iterator[tuple[str, KeyInfo]]) -> None:
    """The same records as schema version 1 stored them, in one transaction."""

    def row(info: KeyInfo) -> tuple[Any, ...]:
        metadata = json.dumps(info.metadata, separators=(",", ":"))
        return (info.digest, info.key_id, info.hash_scheme, info.prefix, info.hint,
                info.user_id, metadata, info.created_at.timestamp(), None, None, None)  # fmt: skip

    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.executescript(V1_SCHEMA)
        conn.execute("BEGIN")
        conn.executemany(
            "INSERT INTO keyguard_keys VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (row(info) for _, info in records),
        )
        conn.execute("COMMIT")


def keys_table(conn: sqlite3.Connection) -> tuple[str, str]:
    """The name of the table that holds the keys, and of its primary key column."""
    names = {name for (name,) in conn.execute("SELECT name FROM sqlite_master")}
    table = "keyguard_records" if "keyguard_records" in names else "keyguard_keys"
    pk = [row[1] for row in conn.execute(f"PRAGMA table_info({table})") if row[5] == 1]
    return table, pk[0]


def size_report(path: Path, keys: int, label: str = "file") -> None:
    total = os.path.getsize(path) / MIB * 1_000_000 / keys
    verdict = "MET" if total <= SIZE_TARGET_MIB else "MISSED"
    print(f"{label}: {total:.1f} MiB per million keys (target ≤ {SIZE_TARGET_MIB:.0f}: {verdict})")
    with closing(sqlite3.connect(path)) as conn:
        try:
            parts = conn.execute(
                "SELECT name, sum(pgsize), sum(payload) FROM dbstat GROUP BY name ORDER BY 2 DESC"
            ).fetchall()
        except sqlite3.OperationalError:
            return  # this SQLite was built without dbstat
    print(f"  {'':<36} {'pages':>7} {'of which the stored values':>28}")
    for name, size, payload in parts:
        share = size / MIB * 1_000_000 / keys
        if share >= 0.5:
            values = payload / MIB * 1_000_000 / keys
            print(f"  {name:<36} {share:7.1f} {values:28.1f}  MiB per million")


def timed(fn: Callable[[str], object], sample: list[str]) -> float:
    start = time.thread_time_ns()
    for key in sample:
        fn(key)
    return (time.thread_time_ns() - start) / len(sample) / 1000


def compare(
    name: str,
    floor: Callable[[str], object],
    check: Callable[[str], object],
    sample: list[str],
    rounds: int,
) -> None:
    """Time the floor and the check in turn over ``sample``; print the ratios."""
    ratios, floors, checks = [], [], []
    gc.disable()
    try:
        for _ in range(rounds):
            f = timed(floor, sample)
            c = timed(check, sample)
            floors.append(f)
            checks.append(c)
            ratios.append(c / f)
    finally:
        gc.enable()
    median = statistics.median(ratios)
    verdict = ""
    if name == "spread":
        met = "MET" if median <= RATIO_TARGET else "MISSED"
        verdict = f"  target ≤ {RATIO_TARGET}: {met}"
    print(
        f"  {name:<7} {len(set(sample)):>8,} {statistics.median(floors):>9.2f}"
        f" {statistics.median(checks):>9.2f} {min(ratios):>6.2f} {median:>7.2f}"
        f" {max(ratios):>6.2f}{verdict}"
    )


def measure_checks(path: Path, key_ids: dict[str, str], rounds: int, seed: int) -> None:
    store = SQLiteStore(path)
    conn = store._conn()
    table, pk = keys_table(conn)
    select = f"SELECT * FROM {table} WHERE {pk} = ?"
    find = f"SELECT {pk} FROM {table} WHERE key_id = ?"
    pks = {key: conn.execute(find, (key_id,)).fetchone()[0] for key, key_id in key_ids.items()}
    spread = sorted(key_ids)
    random.Random(seed).shuffle(spread)
    hot = spread[:10] * (len(spread) // 10)

    def raw_select(key: str) -> object:
        return conn.execute(select, (pks[key],)).fetchone()

    manager = APIKeyManager(store, last_used_resolution=None, record_usage=False)
    assert all(manager.validate_key(key) for key in spread[:1000])
    print(f"\nvalidate_key vs {select!r}, CPU µs per call, ratio = check / floor")
    print(
        f"  {'load':<7} {'keys':>8} {'floor µs':>9} {'check µs':>9}"
        f" {'min':>6} {'median':>7} {'max':>6}"
    )
    before = store._decode.cache_info()
    compare("spread", raw_select, manager.validate_key, spread, rounds)
    after = store._decode.cache_info()
    hits, misses = after.hits - before.hits, after.misses - before.misses
    compare("hot", raw_select, manager.validate_key, hot, rounds)
    print(f"  decode cache hits during spread: {hits / max(1, hits + misses):.1%}")
    sha = hashlib.sha256
    per_sha = timed(lambda key: sha(key.encode()).hexdigest(), spread)
    print(f"  (SHA-256 of a key alone, which the floor does not do: {per_sha:.2f} µs)")
    measure_parts(store, spread)
    store.close()


def measure_parts(store: SQLiteStore, spread: list[str]) -> None:
    """Time alone, over the spread keys, the parts of a check past the hash: the store's
    lookup, and of it the row id and the decode (the rows fetched beforehand, the decode
    cache bypassed). Skipped for a keyguard without the version 2 layout."""
    try:
        from keyguard.stores._sqlite_layout import row_id
        from keyguard.stores.sqlite import _GET
    except ImportError:
        return
    digests = [digest_key(key) for key in spread]
    conn = store._conn()
    rows = [conn.execute(_GET, (row_id(digest),)).fetchone() for digest in digests[:10_000]]
    decode = store._decode.__wrapped__
    gc.disable()
    try:
        parts = [
            ("store.get(digest)", timed(store.get, digests)),
            ("  row id of the digest", timed(row_id, digests)),
            ("  decode of a fetched row", timed(decode, rows)),
        ]
    finally:
        gc.enable()
    print("  parts of a spread check, each timed alone over the same keys, CPU µs:")
    for name, micros in parts:
        print(f"    {name:<27} {micros:6.2f}")


def measure_upgrade(path: Path, keys: int, metadata: str, seed: int) -> None:
    write_v1(path, make_records(keys, metadata, seed))
    print("\nthe same keys in a schema version 1 file, upgraded on open:")
    size_report(path, keys, "version 1 file")
    started = time.perf_counter()
    SQLiteStore(path).close()
    print(f"upgraded and compacted in {time.perf_counter() - started:.0f} s")
    size_report(path, keys, "upgraded file")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=1_000_000, help="keys in the store")
    parser.add_argument("--spread", type=int, default=100_000, help="distinct keys per pass")
    parser.add_argument("--rounds", type=int, default=7, help="rounds (floor + check each)")
    parser.add_argument("--metadata", choices=["typical", "minimal"], default="typical")
    parser.add_argument("--upgrade", action="store_true", help="also time a version 1 upgrade")
    args = parser.parse_args()
    seed = 12
    wanted = set(random.Random(seed).sample(range(args.keys), min(args.spread, args.keys)))

    print(f"{args.keys:,} keys, {args.metadata} metadata")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.db"
        started = time.perf_counter()
        key_ids = load(path, make_records(args.keys, args.metadata, seed), wanted)
        print(f"loaded in {time.perf_counter() - started:.0f} s")
        size_report(path, args.keys)
        measure_checks(path, key_ids, args.rounds, seed)
        if args.upgrade:
            measure_upgrade(Path(tmp) / "v1.db", args.keys, args.metadata, seed)


if __name__ == "__main__":
    main()
