"""What usage limits cost per request: the rate-limited path against the plain one.

In-process WSGI middleware over a no-op app (prebuilt environ, no-op ``start_response``),
the same keys with and without limits, interleaved in every repeat; the ratio
limited / plain is printed as min / median / max against the target (≤ 1.5x on memory).
Workloads: *hot* (one key, every request) and *spread* (1,000 keys, round robin).

With Redis reachable (``$KEYGUARD_REDIS_URL``, default ``redis://127.0.0.1:6379/0``) it
also times one counter charge on ``RedisStore`` against a raw ``EVALSHA`` of a one-line
script on the same client, and against one of the store's own charge script (arguments
built once, on a client pooled like the store's); it counts the Redis commands a
rate-limited request sends through ``CachedStore(RedisStore)`` (target: one, the charge;
the key lookup is cached).

    python benchmarks/bench_limits.py                 # about 20 s
    python benchmarks/bench_limits.py --number 5000   # quick
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

from keyguard import APIKeyManager
from keyguard.wsgi import APIKeyMiddleware

TARGET_RATIO = 1.5
# High enough never to refuse during the run: the benchmark times the charge, not a 429.
RATE = "86400000/day"


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [])
    return [b"ok"]


def no_op_start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return None


def environ(key: str) -> dict[str, Any]:
    return {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/data",
        "REMOTE_ADDR": "10.0.0.1",
        "HTTP_AUTHORIZATION": f"Bearer {key}",
    }


def run(middleware: APIKeyMiddleware, environs: list[dict[str, Any]], number: int) -> float:
    """CPU seconds per request for ``number`` requests cycling over ``environs``."""
    count = len(environs)
    start = time.process_time()
    for i in range(number):
        middleware(dict(environs[i % count]), no_op_start)
    return (time.process_time() - start) / number


def compare(number: int, repeats: int, keys: int, label: str) -> None:
    manager = APIKeyManager(last_used_resolution=None)
    plain = [environ(manager.generate_key(user_id=f"p{i}")) for i in range(keys)]
    limited = [
        environ(manager.generate_key(user_id=f"l{i}", rate_limits=[RATE])) for i in range(keys)
    ]
    middleware = APIKeyMiddleware(app, manager=manager, failure_limit=None)
    run(middleware, plain, number // 10)
    run(middleware, limited, number // 10)
    ratios = []
    gc.disable()
    try:
        for _ in range(repeats):
            base = run(middleware, plain, number)
            ratios.append(run(middleware, limited, number) / base)
    finally:
        gc.enable()
    verdict = "ok" if statistics.median(ratios) <= TARGET_RATIO else "OVER TARGET"
    print(
        f"{label:<26} limited/plain  min {min(ratios):.2f}x  median"
        f" {statistics.median(ratios):.2f}x  max {max(ratios):.2f}x"
        f"  (target ≤ {TARGET_RATIO}x: {verdict})"
    )


def redis_part(number: int, repeats: int) -> None:
    try:
        import redis
    except ImportError:
        print("redis: the redis package is not installed; skipped")
        return
    from keyguard.limits import Limiter
    from keyguard.stores.cached import CachedStore
    from keyguard.stores.redis import _CONSUME, RedisStore

    url = os.environ.get("KEYGUARD_REDIS_URL", "redis://127.0.0.1:6379/0")
    raw = redis.Redis.from_url(url)
    try:
        raw.ping()
    except redis.RedisError as e:
        print(f"redis: unreachable at {url} ({e}); skipped")
        return
    namespace = f"bench-{uuid.uuid4().hex[:8]}"
    store = RedisStore(url, namespace=namespace)
    cached = CachedStore(store)
    try:
        manager = APIKeyManager(cached, last_used_resolution=None)
        key, info = manager.create_key(user_id="bench", rate_limits=[RATE])
        limiter = Limiter(store)
        sha = raw.script_load("return redis.call('GET', KEYS[1])")
        name = f"{namespace}:bench-raw"
        # The store's own charge script on a client pooled like the store's, its arguments
        # built once: what a charge costs Redis and redis-py, keyguard's Python aside.
        pooled = redis.Redis.from_pool(redis.BlockingConnectionPool.from_url(url))
        consume_sha = pooled.script_load(_CONSUME)
        bucket = store.counter_key("bench-same")

        def charge() -> None:
            limiter.take(info, time.time())

        def evalsha() -> None:
            raw.evalsha(sha, 1, name)

        def same_script() -> None:
            pooled.evalsha(consume_sha, 1, bucket, repr(time.time()), "0.001", "86400.0", "")

        ratios, same = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(number):
                evalsha()
            t1 = time.perf_counter()
            for _ in range(number):
                charge()
            t2 = time.perf_counter()
            for _ in range(number):
                same_script()
            t3 = time.perf_counter()
            ratios.append((t2 - t1) / (t1 - t0))
            same.append((t2 - t1) / (t3 - t2))
        pooled.close()
        for label, values in (("EVALSHA", ratios), ("the same script", same)):
            print(
                f"{'redis charge vs ' + label:<31} min {min(values):.2f}x  median"
                f" {statistics.median(values):.2f}x  max {max(values):.2f}x  (wall time)"
            )
        middleware = APIKeyMiddleware(app, manager=manager, failure_limit=None)
        middleware(environ(key), no_op_start)  # warm the key cache
        before = _commands(raw)
        requests = 200
        for _ in range(requests):
            middleware(environ(key), no_op_start)
        after = _commands(raw)
        sent = {c: after.get(c, 0) - before.get(c, 0) for c in after}
        # commandstats also counts the GET/SET a script runs inside Redis; the round trips
        # a client makes are the scripts it calls and the records it reads.
        scripts = (sent.get("evalsha", 0) + sent.get("eval", 0)) / requests
        reads = sum(sent.get(c, 0) for c in ("hmget", "hgetall", "hget")) / requests
        print(
            f"{'redis round trips/request':<26} {scripts + reads:.2f}"
            f" (scripts {scripts:.2f}, record reads {reads:.2f}; target 1: the charge)"
        )
    finally:
        for leftover in raw.scan_iter(f"{namespace}*"):
            raw.delete(leftover)
        cached.close()


def _commands(client: Any) -> dict[str, int]:
    stats = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=20_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    compare(args.number, args.repeats, 1, "memory, hot (1 key)")
    compare(args.number, args.repeats, 1_000, "memory, spread (1,000 keys)")
    redis_part(max(args.number // 10, 500), args.repeats)


if __name__ == "__main__":
    main()
