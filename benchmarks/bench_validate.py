"""Cost of ``APIKeyManager.validate_key`` on the memory and SQLite stores, 1k to 1M keys.

Prints medians per check and ratios against a floor measured in the same run: one bare
``hashlib.sha256`` of the key plus one lookup in a dict of the same size. ``inline`` is
the same checks as ``validate_key`` hand-inlined into one function over the memory store
(form regex, digest, lookup, revoked, expiry, last-use throttle): what CPython can do.
Stores are bulk loaded (bypassing metadata checks) so that a million keys load in seconds.

    python benchmarks/bench_validate.py                 # 1,000 and 1,000,000 keys
    python benchmarks/bench_validate.py --sizes 1000    # quick run
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import re
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from keyguard import APIKeyManager, KeyInfo, KeyStore, MemoryStore, SQLiteStore, digest_key

SAMPLE = 1_000
REPEATS = 15


def make_keys(n: int) -> list[str]:
    return ["sk_" + secrets.token_hex(16) for _ in range(n)]


def record(key: str, index: int, metadata: dict[str, Any], now: datetime) -> KeyInfo:
    return KeyInfo(
        key_id=f"key_{index:016x}",
        prefix="sk_",
        hint="sk_…" + key[-4:],
        user_id=f"user{index % 10_000}",
        metadata=metadata,
        created_at=now,
        digest=digest_key(key),
    )


def load_memory(keys: list[str]) -> KeyStore:
    store = MemoryStore()
    now = datetime.now(timezone.utc)
    for i, key in enumerate(keys):
        meta: dict[str, object] = {"user_id": f"user{i % 10_000}", "permissions": ["read"]}
        store.add(record(key, i, meta, now))
    return store


def load_sqlite(keys: list[str], directory: Path) -> KeyStore:
    store = SQLiteStore(directory / f"bench-{len(keys)}.db")
    now = time.time()
    rows = (
        (
            digest_key(key),
            f"key_{i:016x}",
            "sha256",
            "sk_",
            "sk_…" + key[-4:],
            f"user{i % 10_000}",
            json.dumps({"user_id": f"user{i % 10_000}", "permissions": ["read"]}),
            now,
        )
        for i, key in enumerate(keys)
    )
    conn = store._conn()  # bulk load in one transaction; the public path checks each key
    conn.execute("BEGIN")
    conn.executemany(
        "INSERT INTO keyguard_keys (digest, key_id, hash_scheme, prefix, hint, user_id,"
        " metadata, created_at) VALUES (?,?,?,?,?,?,?,?)",
        rows,
    )
    conn.execute("COMMIT")
    return store


def inline_reference(store: KeyStore) -> Callable[[str], bool]:
    fullmatch = re.compile("sk_[0-9a-f]{32}").fullmatch
    get, clock, sha256 = store.get, time.time, hashlib.sha256
    touched: dict[str, float] = {}

    def validate(key: str) -> bool:
        if type(key) is not str or fullmatch(key) is None:
            return False
        info = get(sha256(key.encode()).hexdigest())
        if info is None or info.revoked_at is not None:
            return False
        now = clock()
        if info.expires_ts is not None and info.expires_ts <= now:
            return False
        if now - touched.get(info.digest, -1e18) >= 60:
            touched[info.digest] = now
        return True

    return validate


def per_call(fn: Callable[[str], object], sample: list[str]) -> float:
    """Median over REPEATS runs of the mean cost of one call, in microseconds."""
    runs = []
    for _ in range(REPEATS):
        start = time.perf_counter_ns()
        for key in sample:
            fn(key)
        runs.append((time.perf_counter_ns() - start) / len(sample) / 1000)
    return statistics.median(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="1000,1000000", help="comma-separated key counts")
    parser.add_argument("--stores", default="memory,sqlite", help="memory, sqlite or both")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    stores = args.stores.split(",")

    print(
        f"{'store':<8} {'keys':>9} {'floor µs':>9} {'valid µs':>9} {'x floor':>8} "
        f"{'unknown µs':>11} {'malformed µs':>13}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for size in sizes:
            keys = make_keys(size)
            sample = [keys[i] for i in range(0, size, max(1, size // SAMPLE))][:SAMPLE]
            unknown = make_keys(len(sample))
            malformed = [k.upper() for k in sample]
            table = {digest_key(k): k for k in keys}

            def floor(key: str, table: dict[str, str] = table) -> object:
                return table.get(hashlib.sha256(key.encode()).hexdigest())

            floor_us = per_call(floor, sample)
            inline_us = per_call(inline_reference(load_memory(keys)), sample)
            print(f"{'floor':<8} {size:>9,} {floor_us:>9.2f}   (sha256 + dict lookup)")
            print(
                f"{'inline':<8} {size:>9,} {floor_us:>9.2f} {inline_us:>9.2f} "
                f"{inline_us / floor_us:>8.1f}   (hand-inlined validate_key)"
            )
            for name in stores:
                store = load_memory(keys) if name == "memory" else load_sqlite(keys, Path(tmp))
                manager = APIKeyManager(store)
                assert all(manager.validate_key(k) for k in sample)  # also records last use
                assert not any(manager.validate_key(k) for k in unknown)
                gc.collect()
                valid_us = per_call(manager.validate_key, sample)
                unknown_us = per_call(manager.validate_key, unknown)
                malformed_us = per_call(manager.validate_key, malformed)
                print(
                    f"{name:<8} {size:>9,} {floor_us:>9.2f} {valid_us:>9.2f} "
                    f"{valid_us / floor_us:>8.1f} {unknown_us:>11.2f} {malformed_us:>13.2f}"
                )
                store.close()
                del store, manager
                gc.collect()
            del keys, table


if __name__ == "__main__":
    main()
