"""A check on ``RedisStore`` as a ratio to the floor: one raw ``GET`` of one value.

The floor is ``client.get(name)`` of the key's record on a redis-py client built the way
the store builds its own (a ``BlockingConnectionPool`` from the same URL and options, bytes
replies, TCP): the round trip, the pool and the driver, before keyguard does anything. In
each repeat, one loop alternates, 50 calls at a time and on the same keys:

- sync: ``client.get`` of each record and ``manager.validate_key`` of each key;
- async: ``await aclient.get`` of each record and ``await manager.averify`` of each key;

over two workloads: **hot** re-checks 5 keys (the store's decode cache hits), **spread**
checks ``--keys`` distinct keys once each per pass (every record is decoded anew). Wall
time, as a check waits on the server. A repeat's ratio is the median over its blocks;
min / median / max over the repeats are printed against the target.

Last-use writes are left out of the timed passes: the manager records a key's use at most
once an hour (``last_used_resolution``; by default once a minute), and every key's use is
recorded by an untimed pass first; what a check that writes it costs is printed apart.
Run it with and without hiredis:

    python benchmarks/bench_redis.py                  # 100,000 keys, about 5 minutes
    python benchmarks/bench_redis.py --no-hiredis     # redis-py's own parser
    python benchmarks/bench_redis.py --keys 10000 --repeats 5
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta, timezone

TARGET = 1.15
HOT_KEYS = 5
#: Calls timed together: the floor and the check alternate block by block, so that a busy
#: moment on a shared machine weighs on both alike.
BLOCK = 50
#: Longer than a run, so that no timed check writes a key's last use.
RESOLUTION = timedelta(hours=1)
REDIS_URL = os.environ.get("KEYGUARD_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0"


def make_keys(n: int) -> list[str]:
    return ["sk_" + secrets.token_hex(16) for _ in range(n)]


def verdict(ratios: list[float]) -> str:
    met = "MET" if statistics.median(ratios) <= TARGET else "MISSED"
    return (
        f"min {min(ratios):.3f}x  median {statistics.median(ratios):.3f}x"
        f"  max {max(ratios):.3f}x   target ≤ {TARGET}x: {met}"
    )


class Bench:
    """A store of ``keys``, a manager over it and raw clients built like the store's."""

    def __init__(self, keys: list[str]) -> None:
        import redis
        import redis.asyncio

        from keyguard import APIKeyManager, KeyInfo, RedisStore, digest_key

        self.namespace = "kgbench:" + secrets.token_hex(4)
        self.store = RedisStore(REDIS_URL, namespace=self.namespace)
        self.manager = APIKeyManager(self.store, last_used_resolution=RESOLUTION)
        self.keys = keys
        self.names = [self.store.record_key(digest_key(k)) for k in keys]
        options = self.store._pool_options()
        pool = redis.BlockingConnectionPool.from_url(REDIS_URL, **options)
        self.client = redis.Redis.from_pool(pool)
        self.aoptions = options
        self.aclient: redis.asyncio.Redis | None = None
        now = datetime.now(timezone.utc)
        pipe = self.store._client.pipeline(transaction=False)
        for i, key in enumerate(keys, 1):
            user = f"user{i % 10_000}"
            info = KeyInfo(
                key_id=f"key_{i:016x}",
                prefix="sk_",
                hint="sk_…" + key[-4:],
                user_id=user,
                metadata={"user_id": user, "permissions": ["read"]},
                created_at=now,
                digest=digest_key(key),
            )
            call_keys, args = self.store._add_call(info)
            self.store._add(keys=call_keys, args=args, client=pipe)  # the store's own insert
            if i % 5000 == 0:
                pipe.execute()
        pipe.execute()
        self.layout = self.client.type(self.names[0]).decode()  # type: ignore[union-attr]
        if self.layout == "hash":  # keyguard before schema version 2: GET a copy instead
            for start in range(0, len(keys), 5000):
                chunk = self.names[start : start + 5000]
                for name in chunk:
                    pipe.hvals(name)
                copies = {
                    f"{name}:copy": b"\t".join(values)
                    for name, values in zip(chunk, pipe.execute(), strict=True)
                }
                self.client.mset(copies)
            self.names = [f"{name}:copy" for name in self.names]

    async def open_async(self) -> None:
        import redis.asyncio

        pool = redis.asyncio.BlockingConnectionPool.from_url(REDIS_URL, **self.aoptions)
        self.aclient = redis.asyncio.Redis.from_pool(pool)

    def record_uses(self) -> float:
        """Check every key once, which records its use: µs per check."""
        start = time.perf_counter_ns()
        for key in self.keys:
            self.manager.validate_key(key)
        return (time.perf_counter_ns() - start) / len(self.keys) / 1000

    def close(self, loop: asyncio.AbstractEventLoop) -> None:
        async def aclose() -> None:
            if self.aclient is not None:
                await self.aclient.aclose(close_connection_pool=True)
            await self.store.aclose()

        loop.run_until_complete(aclose())
        self.client.close()
        import redis

        with redis.Redis.from_url(REDIS_URL) as client:
            names = list(client.scan_iter(match=f"{self.namespace}:*", count=5000))
            for start in range(0, len(names), 5000):
                client.delete(*names[start : start + 5000])


def blocks(items: list[int]) -> list[list[int]]:
    return [items[start : start + BLOCK] for start in range(0, len(items), BLOCK)]


def paired(
    floor: Callable[[int], object], check: Callable[[int], object], items: list[int], flip: int
) -> tuple[float, float]:
    """Time ``floor`` and ``check`` over ``items`` in alternating blocks; the median over the
    blocks of check / floor, and of the µs per call that check adds."""
    ratios, extra = [], []
    clock = time.perf_counter_ns
    for n, block in enumerate(blocks(items)):
        order = (floor, check) if (n + flip) % 2 else (check, floor)
        took = {}
        for fn in order:
            start = clock()
            for i in block:
                fn(i)
            took[fn] = clock() - start
        ratios.append(took[check] / took[floor])
        extra.append((took[check] - took[floor]) / len(block) / 1000)
    return statistics.median(ratios), statistics.median(extra)


async def apaired(
    floor: Callable[[int], Awaitable[object]],
    check: Callable[[int], Awaitable[object]],
    items: list[int],
    flip: int,
) -> tuple[float, float]:
    """:func:`paired` for coroutine functions, awaited one at a time."""
    ratios, extra = [], []
    clock = time.perf_counter_ns
    for n, block in enumerate(blocks(items)):
        order = (floor, check) if (n + flip) % 2 else (check, floor)
        took = {}
        for fn in order:
            start = clock()
            for i in block:
                await fn(i)
            took[fn] = clock() - start
        ratios.append(took[check] / took[floor])
        extra.append((took[check] - took[floor]) / len(block) / 1000)
    return statistics.median(ratios), statistics.median(extra)


def run(bench: Bench, loop: asyncio.AbstractEventLoop, args: argparse.Namespace) -> None:
    assert bench.aclient is not None
    aclient, manager = bench.aclient, bench.manager
    hot = [i % HOT_KEYS for i in range(args.hot_checks)]
    spread = list(range(len(bench.keys)))
    keys, names = bench.keys, bench.names
    assert all(manager.validate_key(keys[i]) for i in range(HOT_KEYS))

    def raw(i: int) -> object:
        return bench.client.get(names[i])

    def check(i: int) -> object:
        return manager.validate_key(keys[i])

    async def araw(i: int) -> object:
        return await aclient.get(names[i])

    async def acheck(i: int) -> object:
        return await manager.averify(keys[i])

    workloads = {"hot": hot, "spread": spread}
    ratios: dict[str, list[float]] = {}
    micros: dict[str, list[float]] = {}
    written = bench.record_uses()
    for repeat in range(args.repeats):
        gc.collect()
        started = time.monotonic()
        for name, items in workloads.items():
            found = {
                f"sync {name}": paired(raw, check, items, repeat),
                f"async {name}": loop.run_until_complete(apaired(araw, acheck, items, repeat)),
            }
            for label, (ratio, extra) in found.items():
                ratios.setdefault(label, []).append(ratio)
                micros.setdefault(label, []).append(extra)
        repeat_took = time.monotonic() - started
        print(f"  repeat {repeat + 1}/{args.repeats} took {repeat_took:.0f} s", file=sys.stderr)

    if bench.layout == "hash":
        print("records are hashes (schema version 1): the raw GET reads a string copy")
    print(f"{'check / raw GET':<14} {'µs over GET':>12}   ratio over {args.repeats} repeats")
    for label, values in ratios.items():
        over = statistics.median(micros[label])
        print(f"{label:<14} {over:>+12.1f}   {verdict(values)}")
    print(
        f"a check that also records the key's use (by default at most once a minute per"
        f" key; untimed above): {written:.1f} µs, two round trips"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=100_000, help="keys (spread workload)")
    parser.add_argument("--hot-checks", type=int, default=5000, help="checks per hot pass")
    parser.add_argument("--repeats", type=int, default=7, help="repeats (ratios per repeat)")
    parser.add_argument(
        "--no-hiredis", action="store_true", help="use redis-py's own reply parser"
    )
    args = parser.parse_args()
    if args.no_hiredis:
        sys.modules["hiredis"] = None  # type: ignore[assignment]
    import redis
    from redis.utils import HIREDIS_AVAILABLE

    with redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2) as probe:
        try:
            probe.ping()
        except redis.RedisError as e:
            print(f"redis: unreachable at {REDIS_URL} ({e}); skipped")
            return
    parser_name = "hiredis" if HIREDIS_AVAILABLE else "redis-py's own (no hiredis)"
    print(
        f"redis-py {redis.__version__}, parser {parser_name}; {args.keys:,} keys,"
        f" {args.repeats} repeats; Python {sys.version.split()[0]}"
    )
    loop = asyncio.new_event_loop()
    started = time.perf_counter()
    bench = Bench(make_keys(args.keys))
    print(f"loaded in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    try:
        loop.run_until_complete(bench.open_async())
        run(bench, loop, args)
    finally:
        bench.close(loop)
        loop.close()


if __name__ == "__main__":
    main()
