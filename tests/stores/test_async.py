"""The async twin of the contract, on every store that offers it, under 200 concurrent tasks."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from keyguard import APIKeyManager, AsyncKeyStore, KeyInfo, KeyStore, Reason
from tests.stores.services import open_store

ASYNC_STORES = ["redis", "postgres", "cached-redis", "cached-postgres", "cached-sqlite"]
TASKS = 200
NOW = datetime.now(timezone.utc)


def new_key(manager: APIKeyManager, n: int) -> tuple[str, KeyInfo]:
    key = "sk_" + secrets.token_hex(16)
    user_id = f"user-{n % 10}"
    info = KeyInfo(
        key_id="key_" + secrets.token_hex(8),
        prefix="sk_",
        hint="sk_…" + key[-4:],
        user_id=user_id,
        metadata={"user_id": user_id, "n": n},
        created_at=NOW - timedelta(seconds=TASKS - n),
        digest=manager.digest(key),
    )
    return key, info


async def exercise(store: KeyStore) -> None:
    assert isinstance(store, AsyncKeyStore)
    manager = APIKeyManager(store)
    _, shared = new_key(manager, -1)

    async def work(n: int) -> tuple[bool, bool, Reason, Reason]:
        key, info = new_key(manager, n)
        added = await store.aadd(info)
        won = await store.aadd(shared)  # every task races for the same record
        first = (await manager.averify(key)).reason
        if n % 2:
            assert await store.arevoke(info.digest, NOW) is True
            assert await store.arevoke(info.digest, NOW) is False
        elif n % 4 == 0:
            assert await store.aset_expiry(info.digest, NOW - timedelta(seconds=1)) is True
        return added, won, first, (await manager.averify(key)).reason

    results = await asyncio.gather(*(work(n) for n in range(TASKS)))

    assert [added for added, _, _, _ in results] == [True] * TASKS
    assert [won for _, won, _, _ in results].count(True) == 1
    assert {first for _, _, first, _ in results} == {Reason.OK}
    expected = [
        Reason.REVOKED if n % 2 else Reason.EXPIRED if n % 4 == 0 else Reason.OK
        for n in range(TASKS)
    ]
    assert [after for _, _, _, after in results] == expected

    listing = await store.alist_keys()
    assert len(listing) == TASKS + 1
    assert len({r.digest for r in listing}) == len({r.key_id for r in listing}) == TASKS + 1
    assert [r.created_at for r in listing] == sorted(r.created_at for r in listing)
    assert Counter(r.user_id for r in listing) == {
        **{f"user-{i}": 20 for i in range(10)},
        "user-9": 21,
    }
    mine = await store.alist_keys("user-3")
    assert [r.metadata["n"] for r in mine] == list(range(3, TASKS, 10))
    assert await store.aget_by_id(shared.key_id) == shared
    assert await store.aget_by_id("key_missing") is None
    used = [r for r in listing if r.last_used_at is not None]
    assert len(used) == TASKS  # each key's first accepted check was recorded once


@pytest.mark.parametrize("name", ASYNC_STORES)
def test_two_hundred_tasks_lose_nothing_and_duplicate_nothing(name: str, tmp_path: Path) -> None:
    with open_store(name, tmp_path) as store:

        async def main() -> None:
            try:
                await exercise(store)
            finally:
                await store.aclose()  # type: ignore[attr-defined]

        asyncio.run(main())


@pytest.mark.parametrize("name", ["redis", "postgres", "cached-redis"])
def test_each_event_loop_gets_connections_of_its_own(name: str, tmp_path: Path) -> None:
    with open_store(name, tmp_path) as store:
        manager = APIKeyManager(store, last_used_resolution=None)
        key = manager.generate_key(user_id="u1")
        unknown = "sk_" + "0" * 32  # not cached, so every check goes to the server

        async def check() -> list[Reason]:
            return [(await manager.averify(k)).reason for k in (key, unknown)]

        loops = [asyncio.new_event_loop() for _ in range(2)]
        try:
            for loop in loops + loops:  # each loop again after the other has run
                assert loop.run_until_complete(check()) == [Reason.OK, Reason.NOT_FOUND]
            # From sync code, close() shuts each loop's connections on that loop: an unclosed
            # one would fail this test with a ResourceWarning.
            store.close()
        finally:
            for loop in loops:
                loop.close()


@pytest.mark.parametrize("name", ASYNC_STORES)
def test_async_pages_match_the_sync_listing(name: str, tmp_path: Path) -> None:
    with open_store(name, tmp_path) as store:
        assert isinstance(store, AsyncKeyStore)
        manager = APIKeyManager(store)
        for n in range(7):
            _, info = new_key(manager, n % 3)  # keys 0, 3, 6 share one creation time
            store.add(dataclasses.replace(info, user_id="u1"))

        async def walk(limit: int) -> list[KeyInfo]:
            seen: list[KeyInfo] = []
            after = None
            while page := await store.alist_keys("u1", limit=limit, after=after):
                seen += page
                after = page[-1].key_id
            return seen

        async def main() -> None:
            try:
                for limit in (1, 2, 5):
                    assert await walk(limit) == store.list_keys("u1")
                with pytest.raises(ValueError, match="key_missing"):
                    await store.alist_keys(after="key_missing")
            finally:
                await store.aclose()

        asyncio.run(main())
