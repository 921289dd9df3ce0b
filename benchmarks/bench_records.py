"""Cost of a :class:`~keyguard.KeyInfo`: decoding a stored row, and holding one in memory.

Decode: each store's own row-to-record function (the work behind a store read that misses
its decode cache) on a realistic row as its driver returns it: a used key without expiry,
metadata ``{"user_id": …, "email": …, "permissions": ["read", "write"]}``. Two rows per
store: ``read``, the decode alone, which is what a check (``validate_key``) pays, as the
metadata is parsed only when first read; ``read + scopes``, the decode and a read of
``scopes``, which parses the metadata as the middleware's policy steps do. Medians in µs
per row over interleaved passes. Two floors are timed in the same passes: ``json``, a bare
``json.loads`` of the metadata text, which no store's row can skip once the metadata is
read; ``frozen``, a bare frozen slotted dataclass of KeyInfo's eleven constructor fields,
which any immutable record costs. ``read`` is compared with ``frozen``, ``read + scopes``
with ``json`` + ``frozen``. Target: 1.5 µs per row.

Memory: the growth of this process's resident set (RSS, ``ru_maxrss``) while
``APIKeyManager.create_key`` issues ``--keys`` keys into a ``MemoryStore``, one user per
key, divided by ``--keys``: what the store's records, indexes and their strings cost,
allocator overhead included. Target: 500 bytes per key at 1,000,000 keys. Then where they
go, from ``sys.getsizeof`` of each object of a store of 10,000 keys made the same way: the
key's own strings, its metadata, the record, its ``created`` audit event, the indexes.

    python benchmarks/bench_records.py                    # 100,000 keys, about 15 s
    python benchmarks/bench_records.py --keys 1000000     # the full figure, about 1 minute
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import resource
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from keyguard import APIKeyManager, KeyInfo, MemoryStore
from keyguard.stores import _redis_record, postgres, sqlite
from keyguard.stores._sqlite_layout import pack_metadata

DECODE_TARGET_US = 1.5
MEMORY_TARGET_BYTES = 500
METADATA = {"user_id": "u123", "email": "u123@example.com", "permissions": ["read", "write"]}
TEXT = json.dumps(METADATA, separators=(",", ":"))
CREATED = datetime(2024, 5, 17, 8, 30, 15, 123456, tzinfo=timezone.utc)
USED = datetime(2024, 6, 1, 12, 0, 0, 654321, tzinfo=timezone.utc)
DIGEST = "9f2c" * 16
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def us(value: datetime) -> bytes:
    """``value`` as Redis holds it: integer microseconds since the epoch."""
    return str((value - EPOCH) // timedelta(microseconds=1)).encode()


#: The columns every SQL row starts with: digest, key_id, hash_scheme, prefix, hint, user_id.
HEAD = (DIGEST, "key_3f9a1c0b7d2e4f60", "sha256", "sk_", "sk_…7d2e", "u123")
#: A row of keyguard_records: digest bytes, the id of its hash scheme, no prefix (the hint
#: shows it), the metadata after its leading user_id.
SQLITE_ROW = (
    bytes.fromhex(DIGEST),
    "key_3f9a1c0b7d2e4f60",
    1,
    None,
    "sk_…7d2e",
    "u123",
    pack_metadata(TEXT, "u123"),
    CREATED.timestamp(),
    None,
    None,
    USED.timestamp(),
)
SQLITE_SCHEMES = {1: "sha256"}
#: A Redis record as GET returns it: one string, format tag first, metadata last.
REDIS_VALUE = b"\t".join(
    (b"v2", us(CREATED), b"", b"", us(USED), *(f.encode() for f in HEAD[1:]), TEXT.encode())
)


def postgres_row() -> tuple[Any, ...]:
    # The store reads the metadata as text (psycopg would build a dict the store must
    # freeze) and the times as integer microseconds; psycopg builds new ints for each row.
    return (*HEAD, TEXT, int(us(CREATED)), None, None, int(us(USED)))


def time_per_call(fn: Callable[[], object], number: int) -> float:
    """Mean µs per call of ``fn`` over ``number`` calls."""
    start = time.perf_counter_ns()
    for _ in range(number):
        fn()
    return (time.perf_counter_ns() - start) / number / 1000


@dataclass(frozen=True, slots=True)
class BareRecord:
    """KeyInfo's constructor fields and nothing else: the cost of any immutable record."""

    key_id: str
    prefix: str
    hint: str
    user_id: str
    metadata: Any
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    digest: str
    hash_scheme: str


def bare_record() -> BareRecord:
    digest, key_id, scheme, prefix, hint, user_id = HEAD
    return BareRecord(
        key_id, prefix, hint, user_id, METADATA, CREATED, None, None, USED, digest, scheme
    )


STORES = ("sqlite", "redis", "postgres")


def decode_figures(passes: int, number: int) -> dict[str, float]:
    """Median µs per call of each decode and of each floor, timed in interleaved passes."""
    pg_rows: list[tuple[Any, ...]] = []

    def sqlite_read() -> KeyInfo:
        return sqlite._row_to_info(SQLITE_ROW, SQLITE_SCHEMES)

    def redis_read() -> KeyInfo:
        return _redis_record._decode.__wrapped__(DIGEST, REDIS_VALUE)

    def postgres_read() -> KeyInfo:
        return postgres._row_to_info(pg_rows.pop())

    reads = {"sqlite": sqlite_read, "redis": redis_read, "postgres": postgres_read}
    candidates: dict[str, Callable[[], object]] = {
        "json": lambda: json.loads(TEXT),
        "frozen": bare_record,
    }
    for name, read in reads.items():
        candidates[name] = read
        candidates[f"{name} + scopes"] = lambda read=read: read().scopes  # type: ignore[misc]
    runs: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(passes):
        pg_rows[:] = [postgres_row() for _ in range(2 * number)]
        for name, fn in candidates.items():
            runs[name].append(time_per_call(fn, number))
    return {name: statistics.median(values) for name, values in runs.items()}


def rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # KiB on Linux


def memory_per_key(keys: int) -> float:
    """RSS growth per key while ``create_key`` fills a ``MemoryStore``, in bytes."""
    manager = APIKeyManager(MemoryStore(), last_used_resolution=None)
    gc.collect()
    before = rss_bytes()
    for i in range(keys):
        user = f"u{i}"
        manager.create_key(
            user_id=user, email=f"{user}@example.com", permissions=["read", "write"]
        )
    gc.collect()
    return (rss_bytes() - before) / keys


def _block(obj: object) -> int:
    """The bytes ``obj`` takes, rounded up to the 16-byte blocks Python's allocator hands out."""
    return (sys.getsizeof(obj) + 15) // 16 * 16


def memory_parts(keys: int) -> dict[str, float]:
    """Where a ``MemoryStore``'s bytes per key go (``sys.getsizeof`` of each object, each
    counted once, objects shared between keys counted where first met), for ``keys`` keys
    made as :func:`memory_per_key` makes them."""
    manager = APIKeyManager(MemoryStore(), last_used_resolution=None)
    for i in range(keys):
        user = f"u{i}"
        manager.create_key(
            user_id=user, email=f"{user}@example.com", permissions=["read", "write"]
        )
    store: Any = manager.store
    seen: set[int] = set()
    parts = dict.fromkeys(("the key's strings", "metadata", "record", "event", "indexes"), 0)

    def count(part: str, *objects: object) -> None:
        for obj in objects:
            if id(obj) not in seen:
                seen.add(id(obj))
                parts[part] += _block(obj)
                if isinstance(obj, dict):
                    count(part, *obj.keys(), *obj.values())
                elif isinstance(obj, list | tuple):
                    count(part, *obj)

    for info in store._records.values():
        count("the key's strings", info.digest, info.key_id, info.user_id, info.hint)
        count("the key's strings", info.metadata.get("email"))
        count("metadata", info.metadata)
        count("record", info, *(getattr(info, f.name) for f in dataclasses.fields(info)))
    count("event", store._events, *store._events)
    count("indexes", store._records, store._by_id, store._by_user, store._all)
    count("indexes", *store._by_user.values())
    return {part: size / keys for part, size in parts.items()}


def verdict(met: bool) -> str:
    return "MET   " if met else "MISSED"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=100_000, help="keys in the memory store")
    parser.add_argument("--passes", type=int, default=15, help="decode passes (median taken)")
    parser.add_argument("--number", type=int, default=20_000, help="decodes per pass")
    args = parser.parse_args()

    started = time.perf_counter()
    per_key = memory_per_key(args.keys)
    loaded = time.perf_counter() - started
    figures = decode_figures(args.passes, args.number)

    print(f"decode one stored row into a KeyInfo (median of {args.passes} passes)")
    print(f"  {'json':<17} {figures['json']:6.2f} µs   floor: json.loads of the metadata")
    print(f"  {'frozen':<17} {figures['frozen']:6.2f} µs   floor: a bare frozen slotted record")
    floors = {"": figures["frozen"], " + scopes": figures["json"] + figures["frozen"]}
    for name in STORES:
        for suffix, floor in floors.items():
            value = figures[name + suffix]
            met = verdict(value <= DECODE_TARGET_US)
            what = "frozen" if not suffix else "json+frozen"
            print(
                f"  {name + suffix:<17} {value:6.2f} µs   x{value / floor:.1f} {what} floor"
                f"   {met} target {DECODE_TARGET_US} µs"
            )
    print(f"MemoryStore: {args.keys:,} keys via create_key in {loaded:.0f} s, RSS growth")
    met = verdict(per_key <= MEMORY_TARGET_BYTES)
    print(f"  {per_key:6.0f} bytes per key   {met} target {MEMORY_TARGET_BYTES} bytes")
    parts = memory_parts(min(args.keys, 10_000))
    print(f"  where they go ({min(args.keys, 10_000):,} keys, sys.getsizeof, bytes per key):")
    for part, size in parts.items():
        print(f"    {part:<20} {size:6.0f}")


if __name__ == "__main__":
    main()
