"""PostgresStore's connections: prepared statements, the switch for PgBouncer, forks."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import Any

import pytest

from keyguard import APIKeyManager, KeyInfo, KeyStore, PostgresStore, store_from_url
from keyguard.stores.base import Bucket
from tests.stores.services import pgbouncer, postgres_table

T0 = datetime(2024, 5, 17, 8, 30, tzinfo=timezone.utc)
BUCKET = Bucket("kg:test", 0.01, 1.0, None)  # 100 a second
Opener = Callable[[str, str, bool], KeyStore]


@pytest.fixture
def table() -> Iterator[tuple[str, str]]:
    """``(dsn, table)`` for a table this test may create; dropped afterwards."""
    with postgres_table() as dsn_table:
        yield dsn_table


def record(n: int) -> KeyInfo:
    return KeyInfo(
        key_id=f"key_{n:016x}",
        prefix="sk_",
        hint="sk_…abcd",
        user_id="u1",
        metadata={"user_id": "u1"},
        created_at=T0,
        digest=f"{n:064x}",
    )


def prepared(store: PostgresStore) -> list[tuple[str, int]]:
    """The statements prepared on the store's connection (``max_size=1``: its only one),
    with how often each ran."""
    with store._connection() as conn:
        rows = conn.execute(
            "SELECT statement, generic_plans + custom_plans FROM pg_prepared_statements",
            prepare=False,
        ).fetchall()
    return [(statement, runs) for statement, runs in rows]


async def aprepared(store: PostgresStore) -> list[tuple[str, int]]:
    """:func:`prepared` on the running loop's async connection."""
    async with (await store._apool()).connection() as conn:
        cursor = await conn.execute(
            "SELECT statement, generic_plans + custom_plans FROM pg_prepared_statements",
            prepare=False,
        )
        rows = await cursor.fetchall()
    return [(statement, runs) for statement, runs in rows]


def url(dsn: str, name: str, prepare: bool) -> str:
    return f"{dsn}?table={name}&max_size=1&prepare={'on' if prepare else 'off'}"


OPENERS = [
    pytest.param(
        lambda dsn, name, prepare: PostgresStore(dsn, table=name, max_size=1, prepare=prepare),
        id="constructor",
    ),
    pytest.param(
        lambda dsn, name, prepare: store_from_url(url(dsn, name, prepare)), id="store URL"
    ),
]


def use_everything(store: PostgresStore, n: int) -> None:
    """Every sync call of the store, once; the record ``n`` is new."""
    info = record(n)
    store.add(info)
    store.get(info.digest)
    store.get_by_id(info.key_id)
    store.list_keys("u1", limit=10)
    store.list_keys(limit=10, after=info.key_id)
    store.touch(info.digest, T0)
    store.set_expiry(info.digest, None)
    store.update(info, info)
    store.consume([BUCKET], 1000.0)
    store.adjust(BUCKET, -1.0)
    store.peek([BUCKET.name])
    store.revoke(info.digest, T0)


async def ause_everything(store: PostgresStore, n: int) -> None:
    """Every async call of the store, once; the record ``n`` is new."""
    info = record(n)
    await store.aadd(info)
    await store.aget(info.digest)
    await store.aget_by_id(info.key_id)
    await store.alist_keys("u1", limit=10)
    await store.atouch(info.digest, T0)
    await store.aset_expiry(info.digest, None)
    await store.aconsume([BUCKET], 1000.0)
    await store.aadjust(BUCKET, -1.0)
    await store.apeek([BUCKET.name])
    await store.arevoke(info.digest, T0)


@pytest.mark.parametrize("open_store", OPENERS)
def test_with_prepare_off_nothing_is_prepared(table: tuple[str, str], open_store: Opener) -> None:
    dsn, name = table
    store = open_store(dsn, name, False)
    assert isinstance(store, PostgresStore)
    try:
        # More runs than psycopg's auto-prepare threshold (5) of every statement.
        for n in range(7):
            use_everything(store, n)

        async def run() -> list[tuple[str, int]]:
            try:
                for n in range(7, 14):
                    await ause_everything(store, n)
                return await aprepared(store)
            finally:
                await store.aclose()

        assert prepared(store) == []
        assert asyncio.run(run()) == []
    finally:
        store.close()


@pytest.mark.parametrize("open_store", OPENERS)
def test_with_prepare_on_the_check_reads_a_prepared_statement_from_the_first(
    table: tuple[str, str], open_store: Opener
) -> None:
    dsn, name = table
    store = open_store(dsn, name, True)
    assert isinstance(store, PostgresStore)
    manager = APIKeyManager(store, last_used_resolution=None)
    key = manager.generate_key(user_id="u1")
    try:
        assert prepared(store) == []
        for _ in range(3):
            assert manager.validate_key(key)

        async def run() -> list[tuple[str, int]]:
            try:
                for _ in range(2):
                    assert (await manager.averify(key)).ok
                return await aprepared(store)
            finally:
                await store.aclose()

        ((statement, runs),) = prepared(store)
        assert "WHERE digest = $1" in statement
        assert runs == 3
        ((astatement, aruns),) = asyncio.run(run())
        assert (astatement, aruns) == (statement, 2)
    finally:
        store.close()


def test_through_pgbouncer_in_transaction_mode_with_prepare_off(table: tuple[str, str]) -> None:
    _, name = table
    with pgbouncer(pool_mode="transaction", pool_size=1) as bouncer:
        # Two stores are two clients that PgBouncer runs on its one server connection by
        # turns, where a statement one of them prepared would clash with the other's.
        first = store_from_url(f"{bouncer}?table={name}&prepare=off")
        second = PostgresStore(bouncer, table=name, prepare=False, max_size=2)
        assert isinstance(first, PostgresStore)
        try:
            a, b = APIKeyManager(first), APIKeyManager(second)
            keys = [a.generate_key(user_id="u1") for _ in range(3)]
            for n in range(7):
                use_everything(second, n)
                for key in keys:
                    assert a.validate_key(key) and b.validate_key(key)
            assert b.revoke_key(keys[0]) and not a.validate_key(keys[0])

            def server(store: PostgresStore) -> Any:
                with store._connection() as conn:
                    query = "SELECT pg_backend_pid(), count(*) FROM pg_prepared_statements"
                    return conn.execute(query).fetchone()

            # One server session served both, and nothing was prepared on it.
            assert server(first) == server(second) == (server(first)[0], 0)

            async def averify() -> list[bool]:
                try:
                    await ause_everything(first, 100)
                    return [
                        (await m.averify(k)).ok for _ in range(7) for m in (a, b) for k in keys
                    ]
                finally:
                    await first.aclose()
                    await second.aclose()

            assert asyncio.run(averify()) == [False, True, True] * 14
        finally:
            first.close()
            second.close()


FORK = """
import os, sys
from keyguard import APIKeyManager, PostgresStore

store = PostgresStore(sys.argv[1], table=sys.argv[2], max_size=1)
manager = APIKeyManager(store, last_used_resolution=None)
key = manager.generate_key(user_id="u1")
assert manager.validate_key(key)  # the parent's connection prepares the read


def session():
    with store._connection() as conn:
        query = "SELECT pg_backend_pid(), count(*) FROM pg_prepared_statements"
        return tuple(conn.execute(query, prepare=False).fetchone())


before = session()
pid = os.fork()
if pid == 0:
    ok = manager.validate_key(key)
    mine = session()
    print("child", ok, mine[0] != before[0], mine[1], flush=True)
    store.close()
    os._exit(0)
os.waitpid(pid, 0)
ok = manager.validate_key(key)
print("parent", ok, session() == before, before[1], flush=True)
store.close()
"""


def test_a_prepared_store_forked_works_in_the_child_and_stays_whole_in_the_parent(
    table: tuple[str, str],
) -> None:
    # gunicorn --preload opens the store, then forks: the child opens connections of its
    # own and prepares there; the parent's connection and its statement are untouched.
    dsn, name = table
    done = subprocess.run(
        [sys.executable, "-W", "ignore::DeprecationWarning", "-c", FORK, dsn, name],
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert done.returncode == 0, done.stderr
    assert done.stdout == "child True True 1\nparent True True 1\n"
