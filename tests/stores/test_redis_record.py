"""RedisStore's record layout: one string per record, and the upgrade from hashes."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import math
import secrets
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import redis

from keyguard import KeyInfo, RedisStore, StoreError
from keyguard.stores import _redis_record
from keyguard.stores._redis_record import decode, encode
from tests.stores.services import redis_namespace, redis_store, require_redis

T0 = datetime(2024, 5, 17, 8, 30, 15, 123456, tzinfo=timezone.utc)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


@pytest.fixture
def store() -> Iterator[RedisStore]:
    with redis_store() as s:
        yield s


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    with redis.Redis.from_url(require_redis()) as c:
        yield c


def record(user_id: str = "u1", **changes: Any) -> KeyInfo:
    info = KeyInfo(
        key_id="key_" + secrets.token_hex(8),
        prefix="sk_",
        hint="sk_…abcd",
        user_id=user_id,
        metadata={"user_id": user_id, "permissions": ["read"]},
        created_at=T0,
        digest=secrets.token_hex(32),
    )
    return dataclasses.replace(info, **changes)


def us(value: datetime) -> str:
    return str((value - EPOCH) // timedelta(microseconds=1))


ODD = [
    pytest.param({}, id="plain"),
    pytest.param(
        {"user_id": "Zoë 用户 🙂", "metadata": {"user_id": "Zoë 用户 🙂", "name": "café ☕"}},
        id="unicode user_id and metadata",
    ),
    pytest.param(
        {
            "user_id": "a\tb\nc\\t\\",
            "metadata": {"user_id": "a\tb\nc\\t\\", "note": "tab\there\nnewline\r\\"},
        },
        id="tabs, newlines and backslashes in user_id and metadata",
    ),
    pytest.param(
        {"key_id": "key\t1\\", "prefix": "p\\t_", "hint": "h\t…\n", "hash_scheme": "s\\"},
        id="tabs and backslashes in every text field",
    ),
    pytest.param(
        {"metadata": {"user_id": "u1", "blob": "é\t" * 32_000, "n": 2**70, "f": 0.1}},
        id="metadata near 64 kB with big numbers",
    ),
    pytest.param(
        {
            "created_at": datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc),
            "expires_at": datetime(2099, 1, 1, 0, 0, 0, 1, tzinfo=timezone.utc),
            "revoked_at": T0 + timedelta(microseconds=1),
            "last_used_at": T0 + timedelta(days=1, microseconds=999_999),
        },
        id="every time set, to the microsecond",
    ),
    pytest.param(
        {"created_at": datetime(1960, 1, 1, 0, 0, 0, 7, tzinfo=timezone.utc)},
        id="a time before the epoch",
    ),
    pytest.param({"metadata": {"user_id": "u1", "deep": [[{"a": [None, True]}]]}}, id="nested"),
]


# -- the encoding --------------------------------------------------------------------------


@pytest.mark.parametrize("changes", ODD)
def test_odd_records_encode_and_decode_to_themselves(changes: dict[str, Any]) -> None:
    info = record(**changes)

    text = encode(info)

    assert text.startswith("v2\t")
    assert text.count("\t") == 10  # the metadata and the text fields hold no raw tab
    assert decode(info.digest, text) == info
    assert decode(info.digest, text.encode()) == info  # decode_responses=False


@pytest.mark.parametrize("changes", ODD)
def test_odd_records_survive_redis_and_every_script(
    store: RedisStore, changes: dict[str, Any]
) -> None:
    info = record(**changes)
    assert store.add(info)
    assert store.get(info.digest) == info
    metadata = json.dumps(info.metadata, separators=(",", ":"))

    used = T0 + timedelta(hours=1, microseconds=17)
    store.touch(info.digest, used)
    store.set_expiry(info.digest, T0 + timedelta(days=30, microseconds=3))
    store.revoke(info.digest, T0 + timedelta(days=2, microseconds=5))
    stored = store._client.get(store.record_key(info.digest))

    assert isinstance(stored, bytes)
    assert stored.decode().endswith("\t" + metadata)  # byte for byte: no cjson round trip
    assert store.get(info.digest) == dataclasses.replace(
        info,
        last_used_at=used,
        expires_at=T0 + timedelta(days=30, microseconds=3),
        revoked_at=info.revoked_at or T0 + timedelta(days=2, microseconds=5),
    )


def test_an_update_replaces_the_metadata_verbatim(store: RedisStore) -> None:
    info = record()
    store.add(info)
    changed = dataclasses.replace(
        info, metadata={"user_id": "u1", "n": 2**70, "f": 0.1, "s": "é\t\n"}, expires_at=T0
    )

    assert store.update(changed, info)
    stored = store._client.get(store.record_key(info.digest))

    assert isinstance(stored, bytes)
    assert stored.endswith(
        b'\tu1\t{"user_id":"u1","n":1180591620717411303424,"f":0.1,"s":"\\u00e9\\t\\n"}'
    )
    assert store.get(info.digest) == changed
    assert store.update(dataclasses.replace(changed, expires_at=None), changed)
    assert store.get(info.digest) == dataclasses.replace(changed, expires_at=None)


def test_a_record_is_one_string_field_by_field(store: RedisStore, client: redis.Redis) -> None:
    info = record(expires_at=T0 + timedelta(days=1))
    store.add(info)

    assert (
        client.get(store.record_key(info.digest))
        == (
            f"v2\t{us(T0)}\t{us(T0 + timedelta(days=1))}\t\t\t{info.key_id}\tsha256\tsk_"
            '\tsk_…abcd\tu1\t{"user_id":"u1","permissions":["read"]}'
        ).encode()
    )


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("v3\t1\t\t\t\tk\ts\tp\th\tu\t{}", id="a newer format"),
        pytest.param("v2\t1\t\t\t\tk\ts\tp\th", id="fields missing"),
        pytest.param("v2\tsoon\t\t\t\tk\ts\tp\th\tu\t{}", id="a bad time"),
    ],
)
def test_a_record_the_store_cannot_read_is_a_store_error(
    store: RedisStore, client: redis.Redis, value: str
) -> None:
    digest = secrets.token_hex(32)
    client.set(store.record_key(digest), value)

    with pytest.raises(StoreError, match="record"):
        store.get(digest)


@pytest.mark.parametrize("metadata", ['{"user_id":', "[]"], ids=["bad JSON", "not an object"])
def test_damaged_metadata_is_a_store_error_where_it_is_first_read(
    store: RedisStore, client: redis.Redis, metadata: str
) -> None:
    # The metadata is parsed when first read, so a check that needs only the times passes.
    digest = secrets.token_hex(32)
    client.set(store.record_key(digest), f"v2\t1\t\t\t\tk\ts\tp\th\tu\t{metadata}")
    info = store.get(digest)
    assert info is not None and info.key_id == "k" and info.valid_until == math.inf

    with pytest.raises(StoreError, match="stored metadata of key 'k' is damaged"):
        info.metadata  # noqa: B018
    with pytest.raises(StoreError, match="stored metadata of key 'k' is damaged"):
        info.scopes  # noqa: B018


def test_scripts_refuse_to_change_a_record_of_another_format(
    store: RedisStore, client: redis.Redis
) -> None:
    digest = secrets.token_hex(32)
    newer = "v3\t1\t\t\t\tk\ts\tp\th\tu\t{}"
    client.set(store.record_key(digest), newer)

    with pytest.raises(StoreError, match="format v3"):
        store.revoke(digest, T0)
    with pytest.raises(StoreError, match="format v3"):
        store.touch(digest, T0)

    assert client.get(store.record_key(digest)) == newer.encode()


def test_a_listing_reads_its_page_with_one_mget(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    added = [record(created_at=T0 + timedelta(seconds=n)) for n in range(5)]
    for info in added:
        store.add(info)
    commands: list[str] = []
    execute = store._client.execute_command

    def spy(*args: Any, **options: Any) -> Any:
        commands.append(str(args[0]))
        return execute(*args, **options)  # type: ignore[no-untyped-call, unused-ignore]

    monkeypatch.setattr(store._client, "execute_command", spy)

    assert store.list_keys("u1", limit=3) == added[:3]
    assert commands == ["ZRANGEBYSCORE", "ZRANGEBYSCORE", "MGET"]


# -- schema version 1: hashes --------------------------------------------------------------


def write_layout_1(client: redis.Redis, namespace: str, info: KeyInfo) -> None:
    """Store ``info`` as keyguard with schema version 1 did (its _ADD script, by hand)."""
    fields = {
        "key_id": info.key_id,
        "hash_scheme": info.hash_scheme,
        "prefix": info.prefix,
        "hint": info.hint,
        "user_id": info.user_id,
        "metadata": json.dumps(info.metadata, separators=(",", ":")),
        "created_at": us(info.created_at),
    }
    for name in ("expires_at", "revoked_at", "last_used_at"):
        value = getattr(info, name)
        if value is not None:
            fields[name] = us(value)
    score = us(info.created_at)
    client.hset(f"{namespace}:key:{info.digest}", items=[*itertools.chain(*fields.items())])
    client.hset(f"{namespace}:ids", info.key_id, info.digest)
    client.zadd(f"{namespace}:user:{info.user_id}", {info.digest: score})
    client.zadd(f"{namespace}:all", {info.digest: score})
    client.hsetnx(f"{namespace}:meta", "schema_version", "1")


def layout_1_records() -> list[KeyInfo]:
    """Records of every kind: active, revoked, expired, used, unicode and odd text."""
    made = [
        record(created_at=T0 + timedelta(seconds=n, microseconds=n))
        for n in range(7)  # more than one migration batch in the tests that shrink it
    ]
    made += [
        record(created_at=T0 - timedelta(days=1), revoked_at=T0 + timedelta(microseconds=9)),
        record(created_at=T0 - timedelta(days=2), expires_at=T0 - timedelta(microseconds=1)),
        record(created_at=T0 - timedelta(days=3), last_used_at=T0 + timedelta(seconds=1.5)),
        record(
            "Zoë\t用户",
            created_at=T0 - timedelta(days=4),
            metadata={"user_id": "Zoë\t用户", "name": "café ☕", "n": 2**70, "f": 0.1},
            hint="sk_…\\x\t",
        ),
        record(created_at=T0),  # created in the same microsecond as the first
    ]
    return made


def kinds(client: redis.Redis, store: RedisStore, infos: list[KeyInfo]) -> set[bytes]:
    return {client.type(store.record_key(info.digest)) for info in infos}  # type: ignore[misc]


@pytest.fixture
def old_namespace(client: redis.Redis) -> Iterator[tuple[str, str, list[KeyInfo]]]:
    """``(url, namespace, records)``: a namespace written by schema version 1."""
    with redis_namespace() as (url, namespace):
        infos = layout_1_records()
        for info in infos:
            write_layout_1(client, namespace, info)
        yield url, namespace, infos


def test_a_namespace_of_version_1_is_migrated_by_the_first_read(
    old_namespace: tuple[str, str, list[KeyInfo]],
    client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, namespace, infos = old_namespace
    monkeypatch.setattr("keyguard.stores.redis._MIGRATION_BATCH", 3)
    store = RedisStore(url, namespace=namespace)
    try:
        assert kinds(client, store, infos) == {b"hash"}

        assert store.get(infos[0].digest) == infos[0]

        assert kinds(client, store, infos) == {b"string"}
        assert client.hget(f"{namespace}:meta", "schema_version") == b"2"
        assert [store.get(info.digest) for info in infos] == infos
        assert [store.get_by_id(info.key_id) for info in infos] == infos
        ordered = sorted(infos, key=lambda info: (info.created_at, info.key_id))
        walked: list[KeyInfo] = []
        after = None
        while page := store.list_keys(limit=2, after=after):
            walked += page
            after = page[-1].key_id
        assert walked == ordered
        assert store.list_keys("Zoë\t用户") == [infos[-2]]
    finally:
        store.close()


def test_a_second_open_of_a_migrated_namespace_changes_nothing(
    old_namespace: tuple[str, str, list[KeyInfo]],
    client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, namespace, infos = old_namespace
    first = RedisStore(url, namespace=namespace)
    try:
        assert first.list_keys() != []
    finally:
        first.close()
    before = {info.digest: client.get(f"{namespace}:key:{info.digest}") for info in infos}
    upgrades: list[list[str]] = []
    second = RedisStore(url, namespace=namespace)
    upgrade = second._upgrade

    def spy(*, keys: list[str], args: list[str]) -> Any:
        upgrades.append(keys)
        return upgrade(keys=keys, args=args)

    monkeypatch.setattr(second, "_upgrade", spy)
    try:
        assert sorted(second.list_keys(), key=lambda i: i.key_id) == sorted(
            infos, key=lambda i: i.key_id
        )
        assert [second.get(info.digest) for info in infos] == infos
    finally:
        second.close()

    assert upgrades == []
    assert {info.digest: client.get(f"{namespace}:key:{info.digest}") for info in infos} == before
    assert client.hget(f"{namespace}:meta", "schema_version") == b"2"


def test_an_async_first_read_migrates_too(
    old_namespace: tuple[str, str, list[KeyInfo]], client: redis.Redis
) -> None:
    url, namespace, infos = old_namespace
    store = RedisStore(url, namespace=namespace)

    async def main() -> list[KeyInfo | None]:
        try:
            first = [await store.aget(infos[0].digest)]
            return first + [await store.aget(info.digest) for info in infos]
        finally:
            await store.aclose()

    assert asyncio.run(main()) == [infos[0], *infos]
    assert kinds(client, store, infos) == {b"string"}
    assert client.hget(f"{namespace}:meta", "schema_version") == b"2"


def test_an_async_listing_migrates_too(
    old_namespace: tuple[str, str, list[KeyInfo]], client: redis.Redis
) -> None:
    url, namespace, infos = old_namespace
    store = RedisStore(url, namespace=namespace)

    async def main() -> list[KeyInfo]:
        try:
            walked: list[KeyInfo] = []
            after = None
            while page := await store.alist_keys(limit=4, after=after):
                walked += page
                after = page[-1].key_id
            return walked
        finally:
            await store.aclose()

    assert asyncio.run(main()) == sorted(infos, key=lambda i: (i.created_at, i.key_id))
    assert kinds(client, store, infos) == {b"string"}


def test_workers_opening_together_while_others_write_lose_nothing(
    old_namespace: tuple[str, str, list[KeyInfo]], client: redis.Redis
) -> None:
    url, namespace, infos = old_namespace
    stores = [RedisStore(url, namespace=namespace) for _ in range(6)]
    barrier = threading.Barrier(len(stores))
    revoked_at = T0 + timedelta(hours=5)

    def work(n: int) -> None:
        store = stores[n]
        barrier.wait()
        if n % 2:  # readers, each the first in its "process"
            store.get(infos[n].digest)
            store.list_keys()
        else:  # writers, meeting hashes or strings depending on the race
            for info in infos[n::2]:
                store.revoke(info.digest, revoked_at)
                store.touch(info.digest, revoked_at)

    try:
        with ThreadPoolExecutor(len(stores)) as pool:
            list(pool.map(work, range(len(stores))))
        expected = {}
        for n in range(0, len(stores), 2):
            for info in infos[n::2]:
                expected[info.digest] = dataclasses.replace(
                    info, revoked_at=info.revoked_at or revoked_at, last_used_at=revoked_at
                )
        final = [stores[0].get(info.digest) for info in infos]
    finally:
        for store in stores:
            store.close()

    assert final == [expected.get(info.digest, info) for info in infos]
    assert kinds(client, stores[0], infos) == {b"string"}


def test_a_hash_met_after_the_migration_is_upgraded_where_it_is_met(
    store: RedisStore, client: redis.Redis
) -> None:
    """An old worker still running writes a hash after the upgrade (a mixed deployment)."""
    store.add(record())
    assert store.list_keys() != []  # nothing to migrate; version 2 from the first add
    late = [record(created_at=T0 + timedelta(seconds=n)) for n in range(4)]
    for info in late:
        write_layout_1(client, store.namespace, info)

    assert store.get(late[0].digest) == late[0]
    assert [i for i in store.list_keys() if i.key_id in {x.key_id for x in late}] == late
    assert store.revoke(late[3].digest, T0)  # a script upgrades it before changing it
    assert kinds(client, store, late) == {b"string"}
    assert store.get(late[3].digest) == dataclasses.replace(late[3], revoked_at=T0)
    assert client.hget(f"{store.namespace}:meta", "schema_version") == b"2"


@pytest.mark.parametrize(
    "script",
    [
        pytest.param(
            "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end\n"
            "if redis.call('HSETNX', KEYS[1], 'revoked_at', ARGV[1]) == 0 then return 0 end\n"
            "return 1",
            id="revoke",
        ),
        pytest.param(
            "if redis.call('EXISTS', KEYS[1]) == 1 then\n"
            "  redis.call('HSET', KEYS[1], 'last_used_at', ARGV[1])\n"
            "end\nreturn 0",
            id="touch",
        ),
    ],
)
def test_an_old_worker_writing_after_the_upgrade_fails_without_damage(
    store: RedisStore, client: redis.Redis, script: str
) -> None:
    """Version 1's scripts (abridged) on an upgraded record: an error, the record intact."""
    info = record()
    store.add(info)
    before = client.get(store.record_key(info.digest))

    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        client.eval(script, 1, store.record_key(info.digest), "1")

    assert client.get(store.record_key(info.digest)) == before
    assert store.get(info.digest) == info


def test_a_damaged_hash_is_left_alone_and_reads_as_a_store_error(
    store: RedisStore, client: redis.Redis
) -> None:
    digest = secrets.token_hex(32)
    client.hset(store.record_key(digest), mapping={"key_id": "key_x", "prefix": "sk_"})

    with pytest.raises(StoreError, match="corrupt") as exc_info:
        store.get(digest)
    with pytest.raises(StoreError, match="corrupt"):
        store.revoke(digest, T0)

    assert "key_x" in str(exc_info.value)
    assert client.type(store.record_key(digest)) == b"hash"


def test_the_decoder_is_the_one_the_store_uses() -> None:
    """bench_records.py times ``_redis_record._decode``: it must be the read path's."""
    info = record()
    assert _redis_record._decode.__wrapped__(info.digest, encode(info).encode()) == info
