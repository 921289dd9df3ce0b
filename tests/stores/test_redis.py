"""RedisStore beyond the shared contract: layout, namespaces, clients, URLs, round trips."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis
import redis.asyncio

from keyguard import APIKeyManager, KeyInfo, Reason, RedisStore, StoreError, store_from_url
from keyguard.stores.base import Bucket
from tests.stores.services import (
    check_a_silent_server,
    proxied_store,
    redis_namespace,
    redis_store,
    require_redis,
)

T0 = datetime(2024, 5, 17, 8, 30, tzinfo=timezone.utc)


@pytest.fixture
def store() -> Iterator[RedisStore]:
    with redis_store() as s:
        yield s


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    with redis.Redis.from_url(require_redis()) as c:
        yield c


def record(user_id: str = "u1") -> KeyInfo:
    return KeyInfo(
        key_id="key_" + secrets.token_hex(8),
        prefix="sk_",
        hint="sk_…abcd",
        user_id=user_id,
        metadata={"user_id": user_id, "permissions": ["read"]},
        created_at=T0,
        digest=secrets.token_hex(32),
    )


# -- layout --------------------------------------------------------------------------------


def test_a_record_is_one_string_indexed_by_user_and_key_id(
    store: RedisStore, client: redis.Redis
) -> None:
    info = record()
    store.add(info)
    ns = store.namespace

    assert (
        client.get(f"{ns}:key:{info.digest}")
        == (
            f"v2\t{int(T0.timestamp()) * 1_000_000}\t\t\t\t{info.key_id}\tsha256\tsk_\tsk_…abcd"
            '\tu1\t{"user_id":"u1","permissions":["read"]}'
        ).encode()
    )
    assert client.hget(f"{ns}:ids", info.key_id) == info.digest.encode()
    assert client.zrange(f"{ns}:user:u1", 0, -1) == [info.digest.encode()]
    assert client.zrange(f"{ns}:all", 0, -1) == [info.digest.encode()]
    assert client.hget(f"{ns}:meta", "schema_version") == b"2"


def test_no_record_ever_gets_a_redis_ttl(store: RedisStore, client: redis.Redis) -> None:
    manager = APIKeyManager(store, clock=lambda: T0.timestamp())
    key = manager.generate_key(user_id="u1", expires_in=timedelta(seconds=1))
    manager.revoke_key(manager.generate_key(user_id="u1"))

    keys = list(client.scan_iter(match=f"{store.namespace}:*"))

    # Two records, ids, user set, all set, meta; and the audit events: of all, of each key
    # and their sequence.
    assert len(keys) == 10
    assert [client.ttl(k) for k in keys] == [-1] * len(keys)
    later = APIKeyManager(store, clock=lambda: T0.timestamp() + 3600)
    assert later.verify(key).reason is Reason.EXPIRED


def test_two_namespaces_on_one_server_do_not_see_each_other() -> None:
    with redis_store() as a, redis_store() as b:
        info = record()
        a.add(info)

        assert b.get(info.digest) is None
        assert b.get_by_id(info.key_id) is None
        assert b.list_keys() == []
        assert b.add(info) is True  # the same record may live in both


def test_add_if_absent_is_decided_by_the_server_across_clients() -> None:
    with redis_namespace() as (url, namespace):
        stores = [RedisStore(url, namespace=namespace) for _ in range(8)]
        info = record()
        barrier = threading.Barrier(len(stores))

        def add(store: RedisStore) -> bool:
            barrier.wait()
            return store.add(info)

        try:
            with ThreadPoolExecutor(len(stores)) as pool:
                results = list(pool.map(add, stores))
        finally:
            for s in stores:
                s.close()

    assert sorted(results) == [False] * 7 + [True]


def test_a_corrupt_record_is_a_store_error(store: RedisStore, client: redis.Redis) -> None:
    client.hset(store.record_key("ab" * 32), mapping={"key_id": "key_x", "prefix": "sk_"})

    with pytest.raises(StoreError, match="corrupt") as exc_info:
        store.get("ab" * 32)
    assert "key_x" in str(exc_info.value)


# -- clients and construction --------------------------------------------------------------


@pytest.mark.parametrize("decode", [pytest.param(False, id="bytes"), pytest.param(True, id="str")])
def test_an_existing_client_is_used_and_left_open(decode: bool) -> None:
    with redis_namespace() as (url, namespace):
        client = redis.Redis.from_url(url, decode_responses=decode)
        store = RedisStore(client=client, namespace=namespace)
        manager = APIKeyManager(store)
        key = manager.generate_key(user_id="u1")

        async def check() -> Reason:
            try:
                return (await manager.averify(key)).reason
            finally:
                await store.aclose()

        assert manager.verify(key).ok
        assert manager.list_keys("u1")[0].user_id == "u1"
        assert asyncio.run(check()) is Reason.OK
        assert client.ping() is True  # close() left the app's client alone
        client.close()


def test_an_existing_async_client_is_used_and_left_open() -> None:
    with redis_namespace() as (url, namespace):

        async def main() -> tuple[bool, bool]:
            aclient = redis.asyncio.Redis.from_url(url)
            store = RedisStore(url, async_client=aclient, namespace=namespace)
            info = record()
            try:
                added = await store.aadd(info)
                await store.aclose()
                return added, await aclient.ping()
            finally:
                await aclient.aclose()

        assert asyncio.run(main()) == (True, True)


@pytest.mark.parametrize(
    ("args", "options", "error", "message"),
    [
        pytest.param((), {}, TypeError, "either a url or a client", id="neither"),
        pytest.param(("redis://x",), {"client": object()}, TypeError, "either a url", id="both"),
        pytest.param(
            ("redis://x",), {"namespace": ""}, ValueError, "namespace must be", id="empty ns"
        ),
        pytest.param(
            ("redis://x",), {"namespace": "a b"}, ValueError, "namespace must be", id="space"
        ),
        pytest.param(
            ("redis://x",), {"namespace": "x" * 65}, ValueError, "namespace must", id="long"
        ),
    ],
)
def test_bad_construction_is_refused(
    args: tuple[Any, ...], options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        RedisStore(*args, **options)


def test_an_unreachable_server_is_a_store_error_without_the_password() -> None:
    store = RedisStore("redis://:hunter2@127.0.0.1:1/0", socket_connect_timeout=0.5)

    with pytest.raises(StoreError) as exc_info:
        store.get("0" * 64)

    assert "hunter2" not in str(exc_info.value)
    assert "***" in str(exc_info.value)
    assert "hunter2" not in repr(store)
    store.close()


def test_without_redis_py_import_works_and_building_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "redis", None)

    with pytest.raises(ImportError, match=r"pip install 'keyguard\[redis\]'"):
        RedisStore("redis://127.0.0.1:6379/0")


def test_import_keyguard_loads_no_driver() -> None:
    code = (
        "import sys\n"
        "for name in ('redis', 'psycopg', 'psycopg_pool'): sys.modules[name] = None\n"
        "import keyguard\n"
        "from keyguard import CachedStore, PostgresStore, RedisStore, store_from_url\n"
        "store_from_url('memory://?cache_ttl=1').close()\n"
        "try:\n"
        "    store_from_url('redis://127.0.0.1:6379/0')\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )

    assert result.stdout.strip() == (
        "RedisStore needs the redis package: pip install 'keyguard[redis]'"
    )


# -- URLs ----------------------------------------------------------------------------------


def test_store_from_url_reads_the_namespace_and_client_options() -> None:
    store = store_from_url(
        "redis://127.0.0.1:6379/3?namespace=myapp&socket_timeout=2.5&max_connections=7"
    )
    try:
        assert isinstance(store, RedisStore)
        assert store.namespace == "myapp"
        kwargs = store._client.connection_pool.connection_kwargs
        assert (kwargs["db"], kwargs["socket_timeout"]) == (3, 2.5)
        assert store._client.connection_pool.max_connections == 7
    finally:
        store.close()


def test_rediss_means_tls() -> None:
    store = store_from_url("rediss://cache.example:6380/0")
    try:
        assert isinstance(store, RedisStore)
        pool = store._client.connection_pool
        assert pool.connection_class is redis.SSLConnection
        assert pool.connection_kwargs["host"] == "cache.example"
    finally:
        store.close()


@pytest.mark.parametrize(
    ("url", "message"),
    [
        pytest.param(
            "redis://:s3cret@127.0.0.1:6379/0?nmespace=x", "unknown parameter", id="typo"
        ),
        pytest.param(
            "redis://:s3cret@127.0.0.1:6379/0?table=x", "unknown parameter", id="postgres param"
        ),
        pytest.param(
            "redis://:s3cret@127.0.0.1:6379/0?namespace=a%20b", "namespace must", id="bad ns"
        ),
    ],
)
def test_bad_urls_are_refused_without_the_password(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as exc_info:
        store_from_url(url)

    assert "s3cret" not in str(exc_info.value)


@pytest.mark.parametrize(
    "password", [pytest.param("p@ss", id="an '@'"), pytest.param("pa ss", id="a space")]
)
def test_the_repr_masks_a_password_holding_an_at_sign_or_a_space(password: str) -> None:
    store = RedisStore(f"redis://kg:{password}@127.0.0.1:1/0")
    try:
        shown = repr(store)
    finally:
        store.close()

    assert "ss" not in shown.replace("127.0.0.1", "")
    assert "kg:***@127.0.0.1:1/0" in shown


def test_a_cached_redis_store_from_url_listens_for_changes() -> None:
    with redis_namespace() as (url, namespace):
        store = store_from_url(f"{url}?namespace={namespace}&cache_ttl=30")
        try:
            assert type(store).__name__ == "CachedStore"
            assert store.wait_until_listening(5)  # type: ignore[attr-defined]
        finally:
            store.close()


# -- round trips ---------------------------------------------------------------------------


def test_a_check_costs_exactly_one_round_trip(store: RedisStore) -> None:
    key = APIKeyManager(store).generate_key(user_id="u1")
    with proxied_store(store) as (proxied, proxy):
        manager = APIKeyManager(proxied, last_used_resolution=None)
        manager.verify("sk_" + "0" * 32)  # connects (HELLO and friends)
        costs = []
        for candidate in [key, "sk_" + "1" * 32, key, "sk_" + "2" * 32]:
            before = proxy.round_trips
            manager.verify(candidate)
            costs.append(proxy.round_trips - before)

        async def async_costs() -> list[int]:
            try:
                await manager.averify("sk_" + "3" * 32)  # connects
                found = []
                for candidate in [key, "sk_" + "4" * 32]:
                    before = proxy.round_trips
                    await manager.averify(candidate)
                    found.append(proxy.round_trips - before)
                return found
            finally:
                await proxied.aclose()

        assert costs == [1, 1, 1, 1]
        assert asyncio.run(async_costs()) == [1, 1]


RATE_BUCKET = Bucket("rate", 1.0, 10.0, None)

CALLS = [
    pytest.param(lambda s, i: s.add(i), id="add"),
    pytest.param(lambda s, i: s.get(i.digest), id="get"),
    pytest.param(lambda s, i: s.get_by_id(i.key_id), id="get_by_id"),
    pytest.param(lambda s, i: s.list_keys(), id="list_keys"),
    pytest.param(lambda s, i: s.revoke(i.digest, T0), id="revoke"),
    pytest.param(lambda s, i: s.set_expiry(i.digest, T0), id="set_expiry"),
    pytest.param(lambda s, i: s.touch(i.digest, T0), id="touch"),
    pytest.param(lambda s, i: asyncio.run(s.aadd(i)), id="aadd"),
    pytest.param(lambda s, i: asyncio.run(s.aget(i.digest)), id="aget"),
    pytest.param(lambda s, i: asyncio.run(s.aget_by_id(i.key_id)), id="aget_by_id"),
    pytest.param(lambda s, i: asyncio.run(s.alist_keys("u1")), id="alist_keys"),
    pytest.param(lambda s, i: asyncio.run(s.arevoke(i.digest, T0)), id="arevoke"),
    pytest.param(lambda s, i: asyncio.run(s.aset_expiry(i.digest, None)), id="aset_expiry"),
    pytest.param(lambda s, i: asyncio.run(s.atouch(i.digest, T0)), id="atouch"),
    pytest.param(lambda s, i: s.consume([RATE_BUCKET], 1.0), id="consume"),
    pytest.param(lambda s, i: asyncio.run(s.aconsume([RATE_BUCKET], 1.0)), id="aconsume"),
]


@pytest.mark.parametrize("call", CALLS)
def test_every_call_fails_as_a_store_error(call: Callable[[RedisStore, KeyInfo], object]) -> None:
    store = RedisStore("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)

    with pytest.raises(StoreError, match="could not"):
        call(store, record())
    store.close()


def test_a_charge_loads_its_script_again_when_the_server_has_lost_it(store: RedisStore) -> None:
    # What a restart or SCRIPT FLUSH does, without flushing a server other tests share.
    store._consume.sha = "0" * 40
    assert store.consume([RATE_BUCKET], 100.0) == (True, [101.0])
    assert store._consume.sha != "0" * 40

    async def charge() -> tuple[bool, list[float]]:
        try:
            store._aclient().scripts["consume"].sha = "0" * 40
            return await store.aconsume([RATE_BUCKET], 100.0)
        finally:
            await store.aclose()

    assert asyncio.run(charge()) == (True, [102.0])


def test_a_silent_server_is_a_store_error_within_the_timeout_and_the_store_recovers(
    store: RedisStore,
) -> None:
    key = APIKeyManager(store).generate_key(user_id="u1")
    check_a_silent_server(store, key, socket_timeout=1.0)


def test_a_page_reads_only_its_own_records(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    added = [
        dataclasses.replace(record(), created_at=T0 + timedelta(seconds=n)) for n in range(95)
    ]
    added += [record() for _ in range(5)]  # five created at T0 itself: one group of six
    for info in added:
        store.add(info)
    read: list[int] = []
    records = store._records

    def counting(digests: Any) -> list[KeyInfo]:
        read.append(len(digests))
        return records(digests)

    monkeypatch.setattr(store, "_records", counting)
    seen: list[KeyInfo] = []
    after = None
    while page := store.list_keys("u1", limit=10, after=after):
        seen += page
        after = page[-1].key_id

    assert seen == sorted(added, key=lambda info: (info.created_at, info.key_id))
    # The six keys of T0 are read whole by the pages that meet them; nothing else is.
    assert max(read) <= 10 + 5
    assert sum(read) <= len(added) + 2 * 6
