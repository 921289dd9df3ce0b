"""``APIKeyManager.validate_key`` on the memory store, as a ratio to a floor timed beside it.

The floor is the least any key check can do: SHA-256 of the key, one lookup in a dict of
the same size, and ``hmac.compare_digest`` of the digest found. Each round times the floor
and ``validate_key`` over the same keys, one after the other, so machine drift hits both
alike; the ratio of each round is kept and min / median / max over the rounds printed.

Workloads at each size: **hot** re-checks 10 keys; **spread** checks 100,000 distinct keys
drawn at random from the whole store (every key when it holds fewer), so at 100,000 and
1,000,000 keys most lookups miss the CPU caches; **cache hit** re-checks the hot keys
through a ``CachedStore`` over the same store, every check a hit (the target is for the
first two). The manager writes a key's last use at most once an hour, and an untimed pass
writes each one first, so no timed check writes.

    python benchmarks/bench_validate.py               # 1,000, 100,000 and 1,000,000 keys: ~4 min
    python benchmarks/bench_validate.py --sizes 1000  # quick run
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import hmac
import random
import secrets
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from keyguard import APIKeyManager, CachedStore, KeyInfo, MemoryStore, digest_key

TARGET = 2.0
ROUNDS = 9
SPREAD = 100_000
HOUR = timedelta(hours=1)


def make_keys(n: int) -> list[str]:
    return ["sk_" + secrets.token_hex(16) for _ in range(n)]


def load_memory(keys: list[str]) -> MemoryStore:
    """A memory store holding ``keys`` with typical metadata, bulk loaded."""
    store = MemoryStore()
    now = datetime.now(timezone.utc)
    for i, key in enumerate(keys):
        user = f"user{i % 10_000}"
        store.add(
            KeyInfo(
                key_id=f"key_{i:016x}",
                prefix="sk_",
                hint="sk_…" + key[-4:],
                user_id=user,
                metadata={"user_id": user, "permissions": ["read"]},
                created_at=now,
                digest=digest_key(key),
            )
        )
    return store


def floor_check(table: dict[str, str]) -> Callable[[str], bool]:
    def check(key: str) -> bool:
        found = table.get(hashlib.sha256(key.encode()).hexdigest())
        return found is not None and hmac.compare_digest(found, found)

    return check


def timed(fn: Callable[[str], object], sample: list[str], passes: int) -> float:
    start = time.process_time()
    for _ in range(passes):
        for key in sample:
            fn(key)
    return time.process_time() - start


def ratios(
    floor: Callable[[str], object],
    check: Callable[[str], object],
    sample: list[str],
    rounds: int,
) -> tuple[list[float], float]:
    """Per-round ratios check/floor, and the median floor in µs per call."""
    passes = max(1, 50_000 // len(sample))
    found, floors = [], []
    gc.disable()
    try:
        for _ in range(rounds):
            f = timed(floor, sample, passes)
            c = timed(check, sample, passes)
            found.append(c / f)
            floors.append(f / (passes * len(sample)) * 1e6)
    finally:
        gc.enable()
    return found, statistics.median(floors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--sizes", default="1000,100000,1000000", help="comma-separated key counts"
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds (min/median/max)")
    args = parser.parse_args()
    print(f"validate_key on MemoryStore, x floor (sha256 + dict + compare_digest), ≤ {TARGET}x")
    print(f"  {'keys':>9} {'workload':<9} {'floor µs':>9} {'min':>6} {'median':>7} {'max':>6}")
    missed = 0
    for size in (int(s) for s in args.sizes.split(",")):
        keys = make_keys(size)
        store = load_memory(keys)
        manager = APIKeyManager(store, last_used_resolution=HOUR)
        # Hits only: the cache outlives the run and holds every key it is asked for.
        cache = CachedStore(store, ttl=3600, max_entries=100)
        cached = APIKeyManager(cache, last_used_resolution=HOUR)
        table = {digest_key(k): digest_key(k) for k in keys}
        hot = random.sample(keys, 10)
        workloads = [
            ("hot", manager, hot),
            ("spread", manager, random.sample(keys, min(SPREAD, size))),
            ("cache hit", cached, hot),
        ]
        for name, checker, sample in workloads:
            assert all(checker.validate_key(k) for k in sample)  # records last use once
            found, floor_us = ratios(floor_check(table), checker.validate_key, sample, args.rounds)
            median = statistics.median(found)
            verdict = "" if name == "cache hit" else "met" if median <= TARGET else "MISSED"
            missed += verdict == "MISSED"
            print(
                f"  {size:>9,} {name:<9} {floor_us:>9.2f} {min(found):>6.2f}"
                f" {median:>7.2f} {max(found):>6.2f}  {verdict}".rstrip()
            )
        cache.close()  # and the store under it
        del keys, store, manager, cache, cached, table
        gc.collect()
    print("all targets met" if not missed else f"{missed} target(s) missed")


if __name__ == "__main__":
    main()
