"""A flood of invented keys against 1,000,000 stored ones: how many reach the store?

For each store (Redis, PostgreSQL) this bulk-loads ``--keys`` records (Redis: the store's
own add script, 10,000 to a round trip; PostgreSQL: COPY), builds
``CachedStore(store)`` with its defaults (the flood filter on) and prints:

- the filter's start-up: seconds from ``CachedStore(...)`` until it answers, of which
  reading the digests alone takes the second figure (a separate walk), and its memory;
- two passes of ``--unknown`` random well-formed keys, each from one of ``--addresses``
  client addresses, through the WSGI middleware with its default failed-attempt throttle
  (20 a minute per address: spread this thin it never throttles): how many store lookups
  they made (one round trip each; target ≤ 1 %), and the answers;
- the filter's false-positive rate on those keys (the rest of the lookups are the
  ``ruled_out_lookups`` a second, 10 by default);
- that a sample of real keys validates, and how soon a key created through another store
  object (another process, as far as the cache knows) is in the filter;
- for comparison, ``--baseline`` invented keys through ``CachedStore(store,
  flood_filter=False)``: every one is a lookup.

    python benchmarks/bench_flood.py                          # 1,000,000 keys: minutes
    python benchmarks/bench_flood.py --keys 100000 --stores redis

A server that does not answer is reported as skipped. The keys are removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import time
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

from keyguard import APIKeyManager, CachedStore, KeyInfo, PostgresStore, RedisStore, StoreError
from keyguard.wsgi import APIKeyMiddleware

REDIS_URL = os.environ.get("KEYGUARD_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0"
POSTGRES_DSN = (
    os.environ.get("KEYGUARD_TEST_POSTGRES_DSN") or "postgresql://postgres@127.0.0.1:5432/test"
)
TARGET = 0.01
BATCH = 10_000
SAMPLE = 1_000  # real keys whose validation is checked


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
    start_response("200 OK", [])
    return [b"ok"]


def records(n: int, manager: APIKeyManager) -> Iterator[tuple[str, KeyInfo]]:
    """``n`` fresh keys with the records ``create_key`` would store for them."""
    created = datetime.now(timezone.utc)
    for i in range(n):
        key = manager.format.generate()
        user = f"user{i % 50_000}"
        yield (
            key,
            KeyInfo(
                key_id="key_" + secrets.token_hex(8),
                prefix=manager.format.prefix,
                hint=f"{manager.format.prefix}…{key[-4:]}",
                user_id=user,
                metadata={"user_id": user},
                created_at=created,
                digest=manager.digest(key),
                hash_scheme=manager.hash_scheme,
            ),
        )


def load_redis(store: RedisStore, n: int, manager: APIKeyManager) -> list[str]:
    """Store ``n`` records with the store's own add script, pipelined; return a sample."""
    sample: list[str] = []
    pipe = store._client.pipeline(transaction=False)
    # The private script and arguments on purpose: exactly what add() writes, batched.
    for i, (key, info) in enumerate(records(n, manager), 1):
        keys, args = store._add_call(info)
        store._add(keys=keys, args=args, client=pipe)
        if len(sample) < SAMPLE:
            sample.append(key)
        if i % BATCH == 0:
            pipe.execute()
    pipe.execute()
    return sample


def load_postgres(store: PostgresStore, n: int, manager: APIKeyManager) -> list[str]:
    """Store ``n`` records with one COPY; return a sample of their keys."""
    import psycopg
    from psycopg import sql

    sample: list[str] = []
    columns = ("digest", "key_id", "hash_scheme", "prefix", "hint", "user_id", "metadata")
    query = sql.SQL("COPY {} ({}, created_at) FROM STDIN").format(
        sql.Identifier(store.schema, store.table),
        sql.SQL(", ").join(sql.Identifier(c) for c in columns),
    )
    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        with conn.cursor() as cursor, cursor.copy(query) as copy:
            for key, info in records(n, manager):
                values = [getattr(info, c) for c in columns[:-1]]
                copy.write_row((*values, json.dumps(info.metadata), info.created_at))
                if len(sample) < SAMPLE:
                    sample.append(key)
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(store.schema, store.table)))
    return sample


def _hiredis() -> bool:
    """Whether redis-py parses with hiredis (it does when the package is installed)."""
    from redis.utils import HIREDIS_AVAILABLE

    return bool(HIREDIS_AVAILABLE)


def open_store(kind: str, name: str) -> RedisStore | PostgresStore:
    if kind == "redis":
        return RedisStore(REDIS_URL, namespace=name)
    return PostgresStore(POSTGRES_DSN, table=name, max_size=2)


def drop(kind: str, name: str) -> None:
    """Remove the benchmark's namespace or table."""
    if kind == "redis":
        import redis

        with redis.Redis.from_url(REDIS_URL) as client:
            batch: list[Any] = []
            for key in client.scan_iter(match=f"{name}:*", count=BATCH):
                batch.append(key)
                if len(batch) == BATCH:
                    client.unlink(*batch)
                    batch = []
            if batch:
                client.unlink(*batch)
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
            for function in (f"{name}_notify()", f"{name}_consume"):
                conn.execute(f"DROP FUNCTION IF EXISTS {function}")


def reachable(kind: str) -> str | None:
    """None if the server answers, else why it is skipped."""
    name = f"kgbench_{secrets.token_hex(6)}"
    try:
        store = open_store(kind, name)
    except (StoreError, ImportError) as e:
        return str(e)
    try:
        store.get("0" * 64)
    except StoreError as e:
        return str(e)
    finally:
        store.close()
        drop(kind, name)
    return None


class Lookups:
    """Counts the store's ``get`` calls: each is one round trip on Redis and PostgreSQL."""

    def __init__(self, store: RedisStore | PostgresStore) -> None:
        self.count = 0
        self._get = store.get
        store.get = self  # type: ignore[method-assign]

    def __call__(self, digest: str) -> KeyInfo | None:
        self.count += 1
        return self._get(digest)


def flood(
    middleware: APIKeyMiddleware, keys: list[str], addresses: int
) -> tuple[Counter[str], float]:
    """Send each key from one of ``addresses`` client addresses; the answers and seconds."""
    answers: Counter[str] = Counter()

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        answers[status.split()[0]] += 1

    started = time.perf_counter()
    for i, key in enumerate(keys):
        n = i % addresses
        environ = {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": "/data",
            "REMOTE_ADDR": f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}",
            "HTTP_AUTHORIZATION": f"Bearer {key}",
        }
        middleware(environ, start_response)
    return answers, time.perf_counter() - started


def measure(kind: str, args: argparse.Namespace) -> None:
    name = f"kgbench_{secrets.token_hex(6)}"
    store = open_store(kind, name)
    manager = APIKeyManager(store, last_used_resolution=None, record_usage=False)
    try:
        started = time.perf_counter()
        if isinstance(store, RedisStore):
            sample = load_redis(store, args.keys, manager)
        else:
            sample = load_postgres(store, args.keys, manager)
        print(
            f"{kind}: {store.count_keys():,} keys stored in {time.perf_counter() - started:.1f} s"
        )
        if isinstance(store, RedisStore):
            parser = "hiredis" if _hiredis() else "pure Python (with hiredis installed: faster)"
            print(f"{kind}: redis-py parses replies in {parser}")

        started = time.perf_counter()
        walked = sum(1 for _ in store.iter_digests())
        walk = time.perf_counter() - started

        started = time.perf_counter()
        cache = CachedStore(open_store(kind, name))
        if not cache.wait_until_filtering(600):
            raise SystemExit("the flood filter did not load in 10 minutes")
        load = time.perf_counter() - started
        flood_filter = cache._filter  # private: the benchmark reports its size
        assert flood_filter is not None and flood_filter.bloom is not None
        bloom = flood_filter.bloom
        print(
            f"{kind}: filter answering {load:.1f} s after CachedStore() at {walked:,} keys"
            f" (reading the digests alone: {walk:.1f} s); {bloom.nbytes / 2**20:.2f} MiB,"
            f" sized for {bloom.capacity:,}"
        )

        checker = APIKeyManager(cache, last_used_resolution=None, record_usage=False)
        middleware = APIKeyMiddleware(app, manager=checker)
        lookups = Lookups(cache.inner)  # type: ignore[arg-type]
        invented = ["sk_" + secrets.token_hex(16) for _ in range(args.unknown)]
        for run in (1, 2):
            before = lookups.count
            answers, seconds = flood(middleware, invented, args.addresses)
            made = lookups.count - before
            share = made / len(invented)
            verdict = "MET" if share <= TARGET else "MISSED"
            print(
                f"{kind}: pass {run}: {len(invented):,} invented keys from {args.addresses:,}"
                f" addresses made {made:,} store lookups ({share:.3%}; target ≤ {TARGET:.0%}:"
                f" {verdict}); answers {dict(answers)}; {seconds:.1f} s"
                f" ({len(invented) / seconds:,.0f} a second)"
            )
        false = sum(checker.digest(key) in bloom for key in invented)
        print(
            f"{kind}: false positives: {false:,} of {len(invented):,}"
            f" ({false / len(invented):.3%})"
        )

        valid = sum(checker.validate_key(key) for key in sample)
        sent = time.perf_counter()
        elsewhere = manager.generate_key(user_id="elsewhere")
        digest = checker.digest(elsewhere)
        while digest not in (flood_filter.bloom or ()):
            if time.perf_counter() - sent > 5:
                raise SystemExit("a key created elsewhere never reached the filter")
            time.sleep(0.0005)
        pushed = time.perf_counter() - sent
        verdict = "valid" if checker.validate_key(elsewhere) else "REFUSED"
        print(
            f"{kind}: real keys: {valid:,} of {len(sample):,} valid; a key created through"
            f" another store object was in the filter {pushed * 1000:.1f} ms after"
            f" generate_key() began, and {verdict}"
        )
        cache.close()

        plain = CachedStore(open_store(kind, name), flood_filter=False)
        baseline = Lookups(plain.inner)  # type: ignore[arg-type]
        unfiltered = APIKeyMiddleware(
            app, manager=APIKeyManager(plain, last_used_resolution=None, record_usage=False)
        )
        answers, seconds = flood(unfiltered, invented[: args.baseline], args.addresses)
        print(
            f"{kind}: without the filter: {args.baseline:,} invented keys made"
            f" {baseline.count:,} store lookups; {seconds:.1f} s"
            f" ({args.baseline / seconds:,.0f} a second)"
        )
        plain.close()
    finally:
        manager.close()
        drop(kind, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--unknown", type=int, default=100_000)
    parser.add_argument("--addresses", type=int, default=10_000)
    parser.add_argument("--baseline", type=int, default=10_000)
    parser.add_argument("--stores", default="redis,postgres")
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"machine: {os.cpu_count()} cores, load average {load:.1f} (other work slows the load)")
    for kind in args.stores.split(","):
        problem = reachable(kind)
        if problem is not None:
            print(f"{kind}: skipped: {problem.splitlines()[0]}")
            continue
        measure(kind, args)


if __name__ == "__main__":
    main()
