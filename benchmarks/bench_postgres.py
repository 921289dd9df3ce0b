"""``validate_key`` on ``PostgresStore`` against the bare SELECT it sends, as a ratio.

Every row pairs a check with the raw query it costs: ``SELECT`` of the same columns by
digest (plus the same SHA-256 of the key), on a connection checked out of the store's own
pool the same way the store does (``with pool.connection()``), with the same
statement-preparation setting: **prepared** (the store's default, ``prepare=True``) or
**unprepared** (``prepare=False``, for PgBouncer in transaction mode). Async rows compare
``averify`` with the same query on the store's async pool.

Workloads: **hot** re-checks 10 keys (the store's decode cache hits); **spread** checks
distinct keys drawn in turn from all ``--keys`` (no key is checked twice until all are
used, so every record is decoded afresh). Rows are COPY-loaded with ``last_used_at`` set
to now and the manager records a use once an hour, so no check is due to write it (that
write is once per key per interval, not part of a check).

All 16 timed functions run in ONE loop: each repeat runs a pass of ``--sample`` calls of
each, in an order rotated every repeat, so drift on a shared machine and the order of
the passes weigh on all of them alike. Wall time, as the round trip is the cost. Per row:
min / median / max µs per call of both sides, and the ratio: the median over repeats of
(check pass ÷ raw pass of the same repeat), against the target of 1.15x. The cpu ratio is
the same in this thread's CPU time: what keyguard adds in the process, which other load
on the machine disturbs less than the wall time.

    python benchmarks/bench_postgres.py                       # 100,000 keys, about 2 minutes
    python benchmarks/bench_postgres.py --keys 1000000        # COPY-loads 1M keys first
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import random
import secrets
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from keyguard import APIKeyManager, PostgresStore, digest_key

POSTGRES_DSN = (
    os.environ.get("KEYGUARD_TEST_POSTGRES_DSN") or "postgresql://postgres@127.0.0.1:5432/test"
)
TARGET = 1.15
HOT_KEYS = 10


def make_keys(n: int) -> list[str]:
    return ["sk_" + secrets.token_hex(16) for _ in range(n)]


def copy_keys(store: PostgresStore, keys: list[str]) -> None:
    """Bulk load ``keys`` into the store's table with one COPY."""
    from psycopg import sql
    from psycopg.types.json import Jsonb

    now = datetime.now(timezone.utc)
    columns = ["digest", "key_id", "hash_scheme", "prefix", "hint", "user_id", "metadata"]
    columns += ["created_at", "last_used_at"]
    copy = sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.Identifier(store.schema, store.table), sql.SQL(", ").join(map(sql.Identifier, columns))
    )
    with (
        store._connection() as conn,
        conn.transaction(),
        conn.cursor() as cur,
        cur.copy(copy) as out,
    ):
        for i, key in enumerate(keys):
            user_id = f"user{i % 10_000}"
            metadata = {"user_id": user_id, "permissions": ["read"]}
            out.write_row(
                (
                    digest_key(key),
                    f"key_{i:016x}",
                    "sha256",
                    "sk_",
                    "sk_…" + key[-4:],
                    user_id,
                    Jsonb(metadata),
                    now,
                    now,
                )
            )
    with store._connection() as conn:
        conn.execute(sql.SQL("ANALYZE {}").format(sql.Identifier(store.schema, store.table)))


@contextmanager
def scratch_table() -> Iterator[str]:
    """A table name no one uses; the store's tables and functions are dropped afterwards."""
    import psycopg
    from psycopg import sql

    table = "kgbench_" + secrets.token_hex(4)
    try:
        yield table
    finally:
        with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
            names = [table, f"{table}_meta", f"{table}_counters", f"{table}_usage"]
            conn.execute(
                sql.SQL("DROP TABLE IF EXISTS {}").format(
                    sql.SQL(", ").join(map(sql.Identifier, names))
                )
            )
            for function in (f"{table}_notify", f"{table}_consume"):
                conn.execute(
                    sql.SQL("DROP FUNCTION IF EXISTS {}").format(sql.Identifier(function))
                )


def raw_select(store: PostgresStore, prepare: bool) -> Callable[[str], object]:
    """The bare query one check sends, on the store's pool, prepared like the store's."""
    pool, query = store._sync_pool(), store._q_get

    def select(key: str) -> object:
        with pool.connection() as conn:
            return conn.execute(query, (digest_key(key),), prepare=prepare).fetchone()

    return select


def araw_select(store: PostgresStore, prepare: bool) -> Callable[[str], Awaitable[object]]:
    """:func:`raw_select` on the store's async pool (the running loop's)."""
    query = store._q_get

    async def select(key: str) -> object:
        async with (await store._apool()).connection() as conn:
            cursor = await conn.execute(query, (digest_key(key),), prepare=prepare)
            return await cursor.fetchone()

    return select


@dataclass
class Timed:
    """One timed function: sync (``call``) or async (``acall``), and per pass the wall time
    and this thread's CPU time of one call, in µs."""

    name: str
    call: Callable[[str], object] | None = None
    acall: Callable[[str], Awaitable[object]] | None = None
    passes: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def run(self, keys: list[str], loop: asyncio.AbstractEventLoop) -> None:
        start, cpu = time.perf_counter_ns(), time.thread_time_ns()
        if self.call is not None:
            call = self.call
            for key in keys:
                call(key)
        else:
            loop.run_until_complete(self._arun(keys))
        self.cpu.append((time.thread_time_ns() - cpu) / len(keys) / 1000)
        self.passes.append((time.perf_counter_ns() - start) / len(keys) / 1000)

    async def _arun(self, keys: list[str]) -> None:
        assert self.acall is not None
        acall = self.acall
        for key in keys:
            await acall(key)


@dataclass
class Row:
    """A check and the raw query it is compared with, on one workload."""

    label: str
    check: Timed
    raw: Timed
    spread: bool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keys", type=int, default=100_000, help="keys in the table")
    parser.add_argument("--sample", type=int, default=500, help="calls per pass")
    parser.add_argument("--repeats", type=int, default=25, help="passes of each function")
    args = parser.parse_args()

    import psycopg

    try:
        psycopg.connect(POSTGRES_DSN, connect_timeout=2).close()
    except psycopg.Error as e:
        print(f"skipped: PostgreSQL at {POSTGRES_DSN} is unreachable: {e}".strip())
        return

    keys = make_keys(args.keys)
    loop = asyncio.new_event_loop()
    with scratch_table() as table:
        started = time.perf_counter()
        stores = {
            True: PostgresStore(POSTGRES_DSN, table=table, prepare=True),
            False: PostgresStore(POSTGRES_DSN, table=table, prepare=False),
        }
        copy_keys(stores[True], keys)
        print(
            f"{args.keys:,} keys COPY-loaded in {time.perf_counter() - started:.1f} s;"
            f" {args.sample} calls per pass, {args.repeats} repeats, one interleaved loop",
            flush=True,
        )
        try:
            rows = measure(stores, keys, args.sample, args.repeats, loop)
        finally:
            for store in stores.values():
                loop.run_until_complete(store.aclose())
            loop.close()
    report(rows)


def measure(
    stores: dict[bool, PostgresStore],
    keys: list[str],
    sample: int,
    repeats: int,
    loop: asyncio.AbstractEventLoop,
) -> list[Row]:
    rows: list[Row] = []
    for prepare, store in stores.items():
        # Checks at most once an hour record a use; the rows say they were just used.
        manager = APIKeyManager(store, last_used_resolution=timedelta(hours=1), record_usage=False)
        setting = "prepared" if prepare else "unprepared"
        for spread in (False, True):
            workload = "spread" if spread else "hot"
            rows.append(
                Row(
                    f"sync  {setting:<10} {workload}",
                    Timed("validate_key", call=manager.validate_key),
                    Timed("raw SELECT", call=raw_select(store, prepare)),
                    spread,
                )
            )
            rows.append(
                Row(
                    f"async {setting:<10} {workload}",
                    Timed("averify", acall=manager.averify),
                    Timed("raw async SELECT", acall=araw_select(store, prepare)),
                    spread,
                )
            )
    hot = (keys[:HOT_KEYS] * (sample // HOT_KEYS + 1))[:sample]
    distinct = keys[HOT_KEYS:]
    random.shuffle(distinct)
    timed = [t for row in rows for t in (row.check, row.raw)]
    is_spread = {id(t): row.spread for row in rows for t in (row.check, row.raw)}
    # Open every pool and prepare every statement before the clock starts.
    for t in timed:
        t.run(hot, loop)
        t.passes.clear()
        t.cpu.clear()
    drawn = 0
    for repeat in range(repeats):
        order = timed[repeat % len(timed) :] + timed[: repeat % len(timed)]
        for t in order:
            if is_spread[id(t)]:
                batch = [distinct[(drawn + i) % len(distinct)] for i in range(sample)]
                drawn += sample
                t.run(batch, loop)
            else:
                t.run(hot, loop)
        gc.collect()
        print(f"  repeat {repeat + 1}/{repeats}", end="\r", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    print(f"spread: {min(drawn, len(distinct)):,} distinct keys checked")
    return rows


def report(rows: list[Row]) -> None:
    def spread_of(values: list[float]) -> str:
        return f"{min(values):7.1f} {statistics.median(values):7.1f} {max(values):7.1f}"

    def paired(checks: list[float], raws: list[float]) -> float:
        return statistics.median(c / r for c, r in zip(checks, raws, strict=True))

    print(
        f"{'':<28} {'check µs min   med     max':>25}   {'raw µs min     med     max':>25}"
        f"   ratio   target ≤ {TARGET}x   cpu ratio"
    )
    for row in rows:
        ratio = paired(row.check.passes, row.raw.passes)
        verdict = "MET   " if ratio <= TARGET else "MISSED"
        print(
            f"{row.label:<28} {spread_of(row.check.passes)}   {spread_of(row.raw.passes)}"
            f"   {ratio:5.3f}x  {verdict}"
            f"             {paired(row.check.cpu, row.raw.cpu):5.3f}x"
        )
    print(
        "check: validate_key (sync) or averify (async); raw: SELECT of the same columns by"
        " digest on the same pool, prepared the same way; ratio: median over repeats of"
        " (check pass / raw pass), wall time; cpu ratio: the same in this thread's CPU time"
    )


if __name__ == "__main__":
    main()
