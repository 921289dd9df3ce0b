"""PostgresStore beyond the shared contract: schema, safety, pools, URLs, round trips."""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

import psycopg
import psycopg_pool
import pytest
from psycopg import sql

from keyguard import APIKeyManager, KeyInfo, PostgresStore, StoreError, store_from_url
from tests.stores.services import (
    check_a_silent_server,
    postgres_table,
    proxied_store,
    unique_name,
)

T0 = datetime(2024, 5, 17, 8, 30, tzinfo=timezone.utc)


@pytest.fixture
def table() -> Iterator[tuple[str, str]]:
    """``(dsn, table)`` for a table this test may create; dropped afterwards."""
    with postgres_table() as dsn_table:
        yield dsn_table


def query(dsn: str, statement: Any, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(dsn, autocommit=True) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def record(user_id: str = "u1", **metadata: Any) -> KeyInfo:
    return KeyInfo(
        key_id="key_" + secrets.token_hex(8),
        prefix="sk_",
        hint="sk_…abcd",
        user_id=user_id,
        metadata={"user_id": user_id, **metadata},
        created_at=T0,
        digest=secrets.token_hex(32),
    )


# -- schema --------------------------------------------------------------------------------


def test_the_schema_is_typed_indexed_and_versioned(table: tuple[str, str]) -> None:
    dsn, name = table
    PostgresStore(dsn, table=name).close()

    columns = dict(
        query(
            dsn,
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = 'public' AND table_name = %s",
            (name,),
        )
    )
    indexes = query(dsn, "SELECT indexdef FROM pg_indexes WHERE tablename = %s", (name,))
    version = query(dsn, sql.SQL("SELECT value FROM {}").format(sql.Identifier(f"{name}_meta")))

    assert columns["metadata"] == "jsonb"
    assert columns["created_at"] == columns["revoked_at"] == "timestamp with time zone"
    defs = " | ".join(i[0] for i in indexes)
    assert f"UNIQUE INDEX {name}_pkey ON public.{name} USING btree (digest)" in defs
    assert f"UNIQUE INDEX {name}_key_id_key ON public.{name} USING btree (key_id)" in defs
    assert f"INDEX {name}_user_idx ON public.{name} USING btree (user_id, created_at)" in defs
    assert (
        f'INDEX {name}_created_idx ON public.{name} USING btree (created_at, key_id COLLATE "C")'
        in defs
    )
    assert version == [("1",)]


def test_metadata_is_queryable_jsonb(table: tuple[str, str]) -> None:
    dsn, name = table
    store = PostgresStore(dsn, table=name)
    store.add(record(email="a@x.io", permissions=["read"]))
    store.close()

    found = query(
        dsn,
        sql.SQL(
            "SELECT metadata->>'email', metadata_json FROM {} WHERE metadata ? 'email'"
        ).format(sql.Identifier(name)),
    )

    assert found == [("a@x.io", None)]


def test_opening_again_changes_nothing(table: tuple[str, str]) -> None:
    dsn, name = table
    first = PostgresStore(dsn, table=name)
    info = record()
    first.add(info)
    first.close()

    second = PostgresStore(dsn, table=name, create_schema=False)

    assert second.get(info.digest) == info
    second.close()


def test_workers_starting_together_all_get_the_schema(table: tuple[str, str]) -> None:
    dsn, name = table

    def start(_: int) -> bool:
        store = PostgresStore(dsn, table=name, max_size=1)
        store.close()
        return True

    with ThreadPoolExecutor(6) as pool:
        assert list(pool.map(start, range(6))) == [True] * 6
    triggers = query(dsn, "SELECT tgname FROM pg_trigger WHERE tgname = %s", (f"{name}_notify",))
    assert triggers == [(f"{name}_notify",)]


def test_a_schema_of_its_own_is_created() -> None:
    schema = unique_name("kgtest_s_")
    with postgres_table(schema) as (dsn, name):
        store = PostgresStore(dsn, table=name, schema=schema)
        info = record()
        store.add(info)
        store.close()

        rows = query(dsn, sql.SQL("SELECT key_id FROM {}").format(sql.Identifier(schema, name)))
        assert rows == [(info.key_id,)]


# -- nothing destructive -------------------------------------------------------------------


def test_a_foreign_table_of_that_name_is_left_untouched(table: tuple[str, str]) -> None:
    dsn, name = table
    query(dsn, sql.SQL("CREATE TABLE {} (id int)").format(sql.Identifier(name)))
    query(dsn, sql.SQL("INSERT INTO {} VALUES (42)").format(sql.Identifier(name)))

    with pytest.raises(StoreError, match="not a keyguard key store"):
        PostgresStore(dsn, table=name)

    assert query(dsn, sql.SQL("SELECT * FROM {}").format(sql.Identifier(name))) == [(42,)]
    assert query(dsn, "SELECT to_regclass(%s)", (f"{name}_meta",)) == [(None,)]


def test_a_newer_schema_version_is_refused(table: tuple[str, str]) -> None:
    dsn, name = table
    PostgresStore(dsn, table=name).close()
    meta = sql.Identifier(f"{name}_meta")
    query(dsn, sql.SQL("UPDATE {} SET value = '2'").format(meta))

    with pytest.raises(StoreError, match="schema version '2'"):
        PostgresStore(dsn, table=name)

    assert query(dsn, sql.SQL("SELECT value FROM {}").format(meta)) == [("2",)]


def test_without_create_schema_nothing_is_created(table: tuple[str, str]) -> None:
    dsn, name = table

    with pytest.raises(StoreError, match="missing or incomplete"):
        PostgresStore(dsn, table=name, create_schema=False)

    assert query(dsn, "SELECT to_regclass(%s)", (name,)) == [(None,)]


# -- listing in pages ----------------------------------------------------------------------


def test_a_page_reads_an_index_in_order_instead_of_sorting_the_table(
    table: tuple[str, str],
) -> None:
    dsn, name = table
    store = PostgresStore(dsn, table=name)
    try:
        first = record()
        store.add(first)
        query(
            dsn,
            sql.SQL(
                "INSERT INTO {} (digest, key_id, hash_scheme, prefix, hint, user_id, metadata,"
                " created_at) SELECT md5(n::text), 'key_' || n, 'sha256', 'sk_', 'h',"
                " 'u' || (n %% 50), '{{}}', now() - n * interval '1 second'"
                " FROM generate_series(1, 20000) AS n"
            ).format(sql.Identifier(name)),
        )
        query(dsn, sql.SQL("ANALYZE {}").format(sql.Identifier(name)))
        for user_id, after in [
            (None, None),
            (None, first.key_id),
            ("u7", None),
            ("u7", first.key_id),
        ]:
            statement, params = store._list_query(user_id, 100, after, T0)
            plan = "\n".join(row[0] for row in query(dsn, b"EXPLAIN " + statement, params))
            assert "Seq Scan" not in plan, plan
            # A user's keys come in creation order from the user index; only keys created
            # at the same instant are sorted (Incremental Sort), never the whole table.
            assert "Sort Key" not in plan or "Incremental Sort" in plan, plan
    finally:
        store.close()


def test_a_table_from_before_paging_lists_the_same_and_gains_its_index(
    table: tuple[str, str],
) -> None:
    dsn, name = table
    store = PostgresStore(dsn, table=name)
    expected = [record(f"u{n % 2}") for n in range(5)]  # all created at T0: key_id decides
    for info in expected:
        store.add(info)
    store.close()
    expected.sort(key=lambda info: info.key_id)
    index = f"{name}_created_idx"
    query(dsn, sql.SQL("DROP INDEX {}").format(sql.Identifier(index)))

    read_only = PostgresStore(dsn, table=name, create_schema=False)
    assert read_only.list_keys(limit=3) + read_only.list_keys(after=expected[2].key_id) == expected
    read_only.close()
    assert query(dsn, "SELECT to_regclass(%s)", (index,)) == [(None,)]
    PostgresStore(dsn, table=name).close()
    assert query(dsn, "SELECT to_regclass(%s)::text", (index,)) == [(index,)]


# -- construction, pools and URLs ----------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        pytest.param({}, TypeError, "either a dsn or a pool", id="neither"),
        pytest.param(
            {"dsn": "postgresql://x", "pool": object()}, TypeError, "either a dsn", id="both"
        ),
        pytest.param(
            {"dsn": "postgresql://x", "table": "Keys"}, ValueError, "lower-case", id="upper"
        ),
        pytest.param(
            {"dsn": "postgresql://x", "table": 'k"; DROP TABLE x; --'},
            ValueError,
            "table name",
            id="injection",
        ),
        pytest.param(
            {"dsn": "postgresql://x", "table": "t" * 49}, ValueError, "1-48", id="long table"
        ),
        pytest.param(
            {"dsn": "postgresql://x", "schema": "1abc"}, ValueError, "schema name", id="digit"
        ),
        pytest.param(
            {"dsn": "postgresql://x", "min_size": 3, "max_size": 2},
            ValueError,
            "min_size",
            id="sizes",
        ),
        pytest.param(
            {"dsn": "postgresql://x", "prepare": "off"}, TypeError, "True or False", id="prepare"
        ),
        pytest.param(
            {"pool": object(), "prepare": False},
            TypeError,
            "prepare_threshold': None",
            id="prepare=False with a pool of the app's",
        ),
    ],
)
def test_bad_construction_is_refused(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        PostgresStore(**options)


def test_an_existing_pool_is_used_and_left_open(table: tuple[str, str]) -> None:
    dsn, name = table
    with psycopg_pool.ConnectionPool(
        dsn, kwargs={"autocommit": True}, min_size=1, max_size=2, open=True
    ) as pool:
        store = PostgresStore(pool=pool, table=name)
        manager = APIKeyManager(store)
        key = manager.generate_key(user_id="u1")

        async def check() -> bool:
            try:
                return (await manager.averify(key)).ok
            finally:
                await store.aclose()

        assert manager.validate_key(key)
        assert asyncio.run(check()) is True
        with pool.connection() as conn:  # close() left the app's pool alone
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_an_existing_async_pool_is_used_and_left_open(table: tuple[str, str]) -> None:
    dsn, name = table

    async def main() -> tuple[bool, Any]:
        async with psycopg_pool.AsyncConnectionPool(
            dsn, kwargs={"autocommit": True}, min_size=1, max_size=2, open=False
        ) as apool:
            store = PostgresStore(dsn, async_pool=apool, table=name)
            added = await store.aadd(record())
            await store.aclose()
            async with apool.connection() as conn:
                row = await (await conn.execute("SELECT 1")).fetchone()
            return added, row

    assert asyncio.run(main()) == (True, (1,))


def test_store_from_url_reads_table_schema_and_pool_sizes(table: tuple[str, str]) -> None:
    dsn, name = table
    for scheme in ("postgresql", "postgres"):
        url = dsn.replace("postgresql", scheme, 1)
        store = store_from_url(
            f"{url}?table={name}&schema=public&min_size=1&max_size=3&application_name=kg"
        )
        try:
            assert isinstance(store, PostgresStore)
            assert (store.table, store.schema, store._sizes) == (name, "public", (1, 3))
            assert store.get("0" * 64) is None
        finally:
            store.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param(
            "postgresql://kg:s3cret@127.0.0.1/test?tabel=x", "invalid PostgreSQL DSN", id="typo"
        ),
        pytest.param(
            "postgresql://kg:s3cret@127.0.0.1/test?namespace=x",
            "invalid PostgreSQL DSN",
            id="redis param",
        ),
        pytest.param(
            "postgresql://kg:s3cret@127.0.0.1/test?table=Bad", "lower-case", id="bad table"
        ),
        pytest.param(
            "postgresql://kg:s3cret@127.0.0.1/test?max_size=0", "positive int", id="bad size"
        ),
        pytest.param(
            "postgresql://kg:s3cret@127.0.0.1/test?prepare=no", "on or off", id="bad prepare"
        ),
    ],
)
def test_bad_urls_are_refused_without_the_password(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as exc_info:
        store_from_url(url)

    assert "s3cret" not in str(exc_info.value)


def test_a_dsn_libpq_cannot_parse_is_refused_without_the_password() -> None:
    # libpq quotes the whole DSN in this message.
    with pytest.raises(ValueError, match="IPv6 host address") as exc_info:
        PostgresStore("postgresql://kg:s3cret@[::1/test")

    assert "s3cret" not in str(exc_info.value)
    assert "kg:***@" in str(exc_info.value)


@pytest.mark.parametrize(
    "dsn",
    [
        pytest.param("host=127.0.0.1 password=s3cret dbname=test oops", id="key=value DSN"),
        pytest.param("host=127.0.0.1 password='s 3cret' dbname=test oops", id="quoted"),
        pytest.param("postgresql://kg@127.0.0.1/test?password=s3cret&tabel=x", id="query"),
    ],
)
def test_a_password_outside_the_userinfo_is_not_echoed(dsn: str) -> None:
    with pytest.raises(ValueError, match="invalid PostgreSQL DSN") as exc_info:
        PostgresStore(dsn)

    assert "3cret" not in str(exc_info.value)
    assert "password=***" in str(exc_info.value)


def test_a_refused_connection_fails_at_once_not_after_the_pool_timeout() -> None:
    # The pool would retry until its timeout (60 s here), logging each try.
    started = time.monotonic()
    with pytest.raises(StoreError, match="Connection refused"):
        PostgresStore("postgresql://nobody@127.0.0.1:1/test", timeout=60)

    assert time.monotonic() - started < 30


def test_an_unreachable_server_is_a_store_error_without_the_password() -> None:
    with pytest.raises(StoreError, match="cannot prepare") as exc_info:
        PostgresStore("postgresql://kg:s3cret@127.0.0.1:1/test?connect_timeout=1", timeout=0.5)

    assert "s3cret" not in str(exc_info.value)


def test_without_psycopg_building_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)

    with pytest.raises(ImportError, match=r"pip install 'keyguard\[postgres\]'"):
        PostgresStore("postgresql://127.0.0.1/test")


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("prepare", "first"),
    [
        # Preparing is one more round trip, once per connection: the first check's.
        pytest.param(True, 2, id="prepared"),
        pytest.param(False, 1, id="unprepared"),
    ],
)
def test_a_check_costs_one_round_trip(table: tuple[str, str], prepare: bool, first: int) -> None:
    dsn, name = table
    store = PostgresStore(dsn, table=name)
    key = APIKeyManager(store).generate_key(user_id="u1")
    with proxied_store(store, prepare=prepare) as (proxied, proxy):
        manager = APIKeyManager(proxied, last_used_resolution=None)
        costs = []
        # Enough checks on one connection to pass psycopg's auto-prepare threshold (5).
        for candidate in [key, "sk_" + "1" * 32] * 5:
            before = proxy.round_trips
            manager.verify(candidate)
            costs.append(proxy.round_trips - before)

        async def async_costs() -> list[int]:
            try:
                await manager.averify("sk_" + "3" * 32)  # opens the async pool
                found = []
                for candidate in [key, "sk_" + "4" * 32] * 5:
                    before = proxy.round_trips
                    await manager.averify(candidate)
                    found.append(proxy.round_trips - before)
                return found
            finally:
                await proxied.aclose()

        assert costs == [first] + [1] * 9
        assert asyncio.run(async_costs()) == [1] * 10
    store.close()


CALLS = [
    pytest.param(lambda s, i: s.add(i), id="add"),
    pytest.param(lambda s, i: s.get(i.digest), id="get"),
    pytest.param(lambda s, i: s.get_by_id(i.key_id), id="get_by_id"),
    pytest.param(lambda s, i: s.list_keys(), id="list_keys"),
    pytest.param(lambda s, i: s.revoke(i.digest, T0), id="revoke"),
    pytest.param(lambda s, i: s.set_expiry(i.digest, T0), id="set_expiry"),
    pytest.param(lambda s, i: s.touch(i.digest, T0), id="touch"),
    pytest.param(lambda s, i: s.aadd(i), id="aadd"),
    pytest.param(lambda s, i: s.aget(i.digest), id="aget"),
    pytest.param(lambda s, i: s.aget_by_id(i.key_id), id="aget_by_id"),
    pytest.param(lambda s, i: s.alist_keys("u1"), id="alist_keys"),
    pytest.param(lambda s, i: s.arevoke(i.digest, T0), id="arevoke"),
    pytest.param(lambda s, i: s.aset_expiry(i.digest, None), id="aset_expiry"),
    pytest.param(lambda s, i: s.atouch(i.digest, T0), id="atouch"),
]


@pytest.mark.parametrize("call", CALLS)
def test_every_call_fails_as_a_store_error(
    table: tuple[str, str], call: Callable[[PostgresStore, KeyInfo], Any]
) -> None:
    dsn, name = table
    store = PostgresStore(dsn, table=name)
    query(dsn, sql.SQL("DROP TABLE {}").format(sql.Identifier(name)))  # pulled from under it

    async def until_done(outcome: Any) -> None:
        try:
            await outcome
        finally:
            await store.aclose()  # this loop's pool, before the loop ends

    with pytest.raises(StoreError, match="could not") as exc_info:
        outcome = call(store, record())
        if asyncio.iscoroutine(outcome):
            asyncio.run(until_done(outcome))
    assert name in str(exc_info.value)
    store.close()


SHUTDOWN_SCRIPT = """
import asyncio, sys
from keyguard import APIKeyManager, PostgresStore

store = PostgresStore(sys.argv[1], table=sys.argv[2])
manager = APIKeyManager(store)
key = manager.generate_key(user_id="u1")

async def checks():
    # 20 concurrent first checks make the loop's pool grow while the loop ends.
    results = await asyncio.gather(*(manager.averify(key) for _ in range(20)))
    assert all(results)

for _ in range(20):
    asyncio.run(checks())  # a new loop each time, so a new pool each time
print("all loops ended")
"""


def test_event_loops_end_while_their_async_pool_grows(table: tuple[str, str]) -> None:
    # The shutdown used to hang in 2 runs of 6 (psycopg_pool swallowed the cancellation).
    dsn, name = table
    done = subprocess.run(
        [sys.executable, "-c", SHUTDOWN_SCRIPT, dsn, name],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "all loops ended"


def test_a_silent_server_is_a_store_error_within_the_timeout_and_the_store_recovers(
    table: tuple[str, str],
) -> None:
    dsn, name = table
    store = PostgresStore(dsn, table=name)
    check_a_silent_server(store, APIKeyManager(store).generate_key(user_id="u1"), timeout=1.0)
    store.close()
