"""How soon another process's pushed cache refuses a revoked key (Redis and PostgreSQL).

A *checker* process holds an ``APIKeyManager`` over ``CachedStore(store, ttl=60)`` with
push invalidation (Redis pub/sub, PostgreSQL LISTEN/NOTIFY). For each of ``--revocations``
keys, this process creates the key, the checker caches it (checks until it is accepted,
as its flood filter learns new keys from the same pushes, then every check is a cache
hit), then this process revokes it through a plain store and the checker checks
it every 50 µs or so until it is refused. The delay is from the moment ``revoke_key`` is
called here to the first refusal there, read on the machine's monotonic clock, which
both processes share; the ttl is 60 s, so only a push can explain a delay below it.

``idle``: nothing else runs. ``busy``: the checker also runs a pure-Python CPU loop on a
second thread (a worker busy serving requests holds the GIL the listener thread needs),
and a CPU-burning process per core loads the machine.

    python benchmarks/bench_propagation.py                  # 200 revocations each, ~1 minute
    python benchmarks/bench_propagation.py --revocations 50 --stores redis

A server that does not answer is reported as skipped.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import secrets
import statistics
import threading
import time
from multiprocessing.connection import Connection

from keyguard import APIKeyManager, CachedStore, KeyStore, PostgresStore, RedisStore, StoreError

REDIS_URL = os.environ.get("KEYGUARD_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0"
POSTGRES_DSN = (
    os.environ.get("KEYGUARD_TEST_POSTGRES_DSN") or "postgresql://postgres@127.0.0.1:5432/test"
)
POLL_SECONDS = 50e-6
#: Longest wait for one refusal: far below the 60 s ttl, so a lost push fails loudly.
PUSH_TIMEOUT = 10.0


def now() -> float:
    """Monotonic seconds on the clock every process of the machine shares."""
    return time.clock_gettime(time.CLOCK_MONOTONIC)


def open_store(kind: str, name: str) -> KeyStore:
    if kind == "redis":
        return RedisStore(REDIS_URL, namespace=name)
    return PostgresStore(POSTGRES_DSN, table=name, max_size=2)


def drop(kind: str, name: str) -> None:
    """Remove the benchmark's namespace or table."""
    if kind == "redis":
        import redis

        with redis.Redis.from_url(REDIS_URL) as client:
            keys = list(client.scan_iter(match=f"{name}:*"))
            if keys:
                client.delete(*keys)
    else:
        import psycopg
        from psycopg import sql

        tables = (name, f"{name}_meta", f"{name}_counters", f"{name}_usage")
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP TABLE IF EXISTS {}").format(
                    sql.SQL(", ").join(sql.Identifier(t) for t in tables)
                )
            )
            notify = sql.Identifier(f"{name}_notify")
            conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}()").format(notify))
            consume = sql.Identifier(f"{name}_consume")
            conn.execute(sql.SQL("DROP FUNCTION IF EXISTS {}").format(consume))


def burn(stop: threading.Event | None = None) -> None:
    """Keep one CPU (and, on a thread, the GIL) busy until ``stop`` is set (or forever)."""
    n = 0
    while stop is None or not stop.is_set():
        for _ in range(10_000):
            n += 1


def checker(kind: str, name: str, busy: bool, conn: Connection) -> None:
    """The other process: cache each key it is sent, then report when it is refused."""
    store = CachedStore(open_store(kind, name), ttl=60)
    manager = APIKeyManager(store, last_used_resolution=None, record_usage=False)
    if not store.wait_until_listening(30):
        raise SystemExit("push invalidation never became live")
    stop = threading.Event()
    if busy:
        threading.Thread(target=burn, args=(stop,), daemon=True).start()
    conn.send("ready")
    while (key := conn.recv()) is not None:
        # The flood filter may rule a key out until the push of its creation arrives (or a
        # spare lookup is left): the bound for that is the same as for a revocation.
        deadline = now() + PUSH_TIMEOUT
        while not manager.validate_key(key):
            if now() > deadline:
                raise SystemExit(f"a new key still refused after {PUSH_TIMEOUT} s")
            time.sleep(POLL_SECONDS)
        conn.send("cached")
        deadline = now() + PUSH_TIMEOUT
        while manager.validate_key(key):
            if now() > deadline:
                raise SystemExit(f"no refusal within {PUSH_TIMEOUT} s: a push was lost")
            time.sleep(POLL_SECONDS)
        conn.send(now())
    stop.set()
    manager.close()


def measure(kind: str, revocations: int, busy: bool) -> list[float]:
    """Delays in ms from ``revoke_key`` called here to the checker's first refusal."""
    name = f"kgbench_{secrets.token_hex(6)}"
    store = open_store(kind, name)
    manager = APIKeyManager(store, last_used_resolution=None, record_usage=False)
    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    process = context.Process(target=checker, args=(kind, name, busy, theirs))
    burners = [context.Process(target=burn) for _ in range(os.cpu_count() or 1)] if busy else []
    delays: list[float] = []
    try:
        process.start()
        for burner in burners:
            burner.start()
        assert ours.poll(60) and ours.recv() == "ready", "the checker did not start"
        for _ in range(revocations):
            key = manager.generate_key(user_id="bench")
            ours.send(key)
            assert ours.poll(60) and ours.recv() == "cached"
            started = now()
            manager.revoke_key(key)
            assert ours.poll(PUSH_TIMEOUT + 5), "the checker stopped answering"
            delays.append((ours.recv() - started) * 1000)
        ours.send(None)
        process.join(30)
    finally:
        for burner in burners:
            burner.terminate()
            burner.join()
        if process.is_alive():
            process.terminate()
        process.join()
        manager.close()
        drop(kind, name)
    return delays


def reachable(kind: str) -> str | None:
    """None if the server answers, else why it is skipped."""
    try:
        store = open_store(kind, f"kgbench_{secrets.token_hex(6)}")
    except (StoreError, ImportError) as e:
        return str(e)
    try:
        store.get("0" * 64)
    except StoreError as e:
        return str(e)
    finally:
        store.close()
    return None


def report(label: str, delays: list[float]) -> None:
    ordered = sorted(delays)
    p50 = statistics.median(ordered)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * len(ordered)) - 1)]
    print(f"{label:<16} {len(ordered):>5} {p50:>9.2f} {p95:>9.2f} {ordered[-1]:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--revocations", type=int, default=200)
    parser.add_argument("--stores", default="redis,postgres")
    args = parser.parse_args()
    print(f"{'store, load':<16} {'n':>5} {'p50 ms':>9} {'p95 ms':>9} {'max ms':>9}")
    for kind in args.stores.split(","):
        problem = reachable(kind)
        if problem is not None:
            print(f"{kind:<16} skipped: {problem.splitlines()[0]}")
            continue
        for busy in (False, True):
            report(f"{kind}, {'busy' if busy else 'idle'}", measure(kind, args.revocations, busy))


if __name__ == "__main__":
    main()
