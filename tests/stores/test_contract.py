"""The KeyStore contract, written once and run against every store in the ``store`` fixture.

Only the protocol's methods are used here, so a new backend passes by being added to the
fixture in ``tests/stores/conftest.py``.
"""

from __future__ import annotations

import dataclasses
import secrets
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from keyguard import APIKeyManager, KeyInfo, KeyStore

T0 = datetime(2024, 5, 17, 8, 30, 15, 123456, tzinfo=timezone.utc)


def record(user_id: str = "u1", *, minutes: float = 0, **changes: Any) -> KeyInfo:
    """A record with a fresh digest and key_id, created ``minutes`` after ``T0``."""
    info = KeyInfo(
        key_id="key_" + secrets.token_hex(8),
        prefix="sk_",
        hint="sk_…" + secrets.token_hex(2),
        user_id=user_id,
        metadata={"user_id": user_id, "permissions": ["read"]},
        created_at=T0 + timedelta(minutes=minutes),
        digest=secrets.token_hex(32),
    )
    return dataclasses.replace(info, **changes)


def stored(store: KeyStore, info: KeyInfo) -> KeyInfo:
    """The record the store now holds under ``info``'s digest (it must hold one)."""
    found = store.get(info.digest)
    assert found is not None, "record is missing"
    return found


# -- add and get ---------------------------------------------------------------------------


def test_add_then_get(store: KeyStore) -> None:
    info = record(hash_scheme="hmac-sha256")

    assert store.add(info) is True

    assert store.get(info.digest) == info
    assert store.get_by_id(info.key_id) == info
    assert stored(store, info).scopes == ("read",)


def test_unknown_digest_and_id_give_none(store: KeyStore) -> None:
    store.add(record())

    assert store.get("0" * 64) is None
    assert store.get("") is None
    assert store.get_by_id("key_missing") is None
    assert store.list_keys("nobody") == []


def test_add_refuses_a_known_digest_and_keeps_the_first_record(store: KeyStore) -> None:
    first = record("u1")
    same_digest = record("u2", digest=first.digest, metadata={"user_id": "u2"})
    store.add(first)

    assert store.add(same_digest) is False

    assert store.get(first.digest) == first
    assert store.get_by_id(same_digest.key_id) is None
    assert store.list_keys() == [first]
    assert store.list_keys("u2") == []


def test_add_refuses_a_known_key_id_and_keeps_the_first_record(store: KeyStore) -> None:
    first = record("u1")
    same_id = record("u2", key_id=first.key_id)
    store.add(first)

    assert store.add(same_id) is False

    assert store.get_by_id(first.key_id) == first
    assert store.get(same_id.digest) is None
    assert store.list_keys() == [first]


def test_add_of_the_same_record_twice(store: KeyStore) -> None:
    info = record()

    assert [store.add(info), store.add(info)] == [True, False]
    assert store.list_keys() == [info]


def test_add_is_atomic_under_a_race(store: KeyStore) -> None:
    contenders = 16
    info = record()
    barrier = threading.Barrier(contenders)

    def add() -> bool:
        barrier.wait()
        return store.add(info)

    with ThreadPoolExecutor(contenders) as pool:
        results = [f.result() for f in [pool.submit(add) for _ in range(contenders)]]

    assert results.count(True) == 1
    assert store.list_keys() == [info]


# -- listing -------------------------------------------------------------------------------


def test_list_keys_by_user_and_all_oldest_first(store: KeyStore) -> None:
    # Added out of age order, so an insertion-ordered listing would fail.
    plan = [("u1", 30), ("u2", 10), ("u1", 40), ("u1", 20), ("u2", 0), ("u1", 5)]
    records = [record(user, minutes=minutes) for user, minutes in plan]
    for info in records:
        assert store.add(info)
    by_age = sorted(records, key=lambda info: info.created_at)

    assert store.list_keys() == by_age
    assert store.list_keys(None) == by_age
    assert store.list_keys("u1") == [r for r in by_age if r.user_id == "u1"]
    assert store.list_keys("u2") == [r for r in by_age if r.user_id == "u2"]
    assert store.list_keys("u3") == []


def test_list_keys_keeps_revoked_and_expired_records(store: KeyStore) -> None:
    revoked, expired = record(minutes=0), record(minutes=1, expires_at=T0)
    store.add(revoked)
    store.add(expired)
    store.revoke(revoked.digest, T0)

    assert [r.key_id for r in store.list_keys("u1")] == [revoked.key_id, expired.key_id]


def walk(store: KeyStore, user_id: str | None = None, *, limit: int) -> list[KeyInfo]:
    """Every record, read ``limit`` at a time, each page after the last one's key_id."""
    seen: list[KeyInfo] = []
    after = None
    while True:
        page = store.list_keys(user_id, limit=limit, after=after)
        assert len(page) <= limit
        seen += page
        if len(page) < limit:
            return seen
        after = page[-1].key_id


def in_listing_order(records: list[KeyInfo]) -> list[KeyInfo]:
    return sorted(records, key=lambda info: (info.created_at, info.key_id))


def test_pages_list_every_record_once_in_created_then_key_id_order(store: KeyStore) -> None:
    # Five keys made in the same microsecond must still have one order: by key_id, compared
    # as code points in every store ("key_B" before "key_a", whatever a locale says).
    same_time = [record("u1", key_id=f"key_{c}") for c in "bABa0"]
    plan = [("u2", 3), ("u1", 2), ("u1", -1), ("u2", 0), ("u1", 1)]
    records = same_time + [record(user, minutes=minutes) for user, minutes in plan]
    for info in records:
        assert store.add(info)

    for limit in (1, 2, 3, 4, 100):
        assert walk(store, limit=limit) == in_listing_order(records), limit
        assert walk(store, "u1", limit=limit) == in_listing_order(
            [r for r in records if r.user_id == "u1"]
        ), limit
    assert store.list_keys() == in_listing_order(records)
    assert walk(store, "nobody", limit=2) == []


def test_a_page_after_a_cursor_holds_what_follows_it(store: KeyStore) -> None:
    first, second, third = (record("u1", minutes=n) for n in range(3))
    other = record("u2", minutes=1.5)
    for info in (third, other, first, second):
        store.add(info)

    assert store.list_keys("u1", after=first.key_id) == [second, third]
    assert store.list_keys("u1", limit=1, after=first.key_id) == [second]
    assert store.list_keys(limit=2, after=second.key_id) == [other, third]
    assert store.list_keys(after=third.key_id) == []
    # The cursor is a place in the order, so another user's key_id is one too.
    assert store.list_keys("u1", after=other.key_id) == [third]


def test_a_cursor_that_names_no_record_is_refused(store: KeyStore) -> None:
    store.add(record())

    with pytest.raises(ValueError, match="key_missing"):
        store.list_keys(after="key_missing")
    with pytest.raises(ValueError, match="key_missing"):
        store.list_keys("u1", limit=1, after="key_missing")


def test_a_walk_neither_skips_nor_repeats_while_keys_are_added_and_revoked(
    store: KeyStore,
) -> None:
    existing = [record("u1", minutes=n // 2) for n in range(12)]  # pairs share a time
    for info in existing:
        store.add(info)
    seen: list[KeyInfo] = []
    added_later: list[KeyInfo] = []
    after = None
    while True:
        page = store.list_keys("u1", limit=3, after=after)
        seen += page
        if len(page) < 3:
            break
        after = page[-1].key_id
        # Meanwhile: a key older than the cursor, one in the future, and a revocation.
        store.add(record("u1", minutes=-1))
        added_later.append(record("u1", minutes=60 + len(added_later)))
        store.add(added_later[-1])
        store.revoke(existing[len(seen) % len(existing)].digest, T0)

    ids = [info.key_id for info in seen]
    assert len(ids) == len(set(ids))
    assert {info.key_id for info in existing} <= set(ids)
    assert {info.key_id for info in added_later} <= set(ids)
    assert seen == in_listing_order(seen)


# -- changing records ----------------------------------------------------------------------


def test_revoke_once(store: KeyStore) -> None:
    info, bystander = record(), record()
    store.add(info)
    store.add(bystander)
    first_time, second_time = T0 + timedelta(hours=1), T0 + timedelta(hours=2)

    assert store.revoke(info.digest, first_time) is True
    assert store.revoke(info.digest, second_time) is False
    assert store.revoke("0" * 64, first_time) is False

    assert stored(store, info) == dataclasses.replace(info, revoked_at=first_time)
    assert store.get_by_id(info.key_id) == stored(store, info)
    assert stored(store, bystander) == bystander


def test_set_expiry(store: KeyStore) -> None:
    info = record()
    store.add(info)
    deadline = T0 + timedelta(days=30, microseconds=7)

    assert store.set_expiry(info.digest, deadline) is True
    assert stored(store, info).expires_at == deadline
    assert store.get_by_id(info.key_id) == stored(store, info)
    assert store.set_expiry(info.digest, None) is True
    assert stored(store, info) == info
    assert store.set_expiry("0" * 64, deadline) is False
    assert store.list_keys() == [info]


def test_update_replaces_metadata_and_expiry_only(store: KeyStore) -> None:
    info, bystander = record(), record(minutes=1)
    store.add(info)
    store.add(bystander)
    metadata = {"user_id": "u1", "permissions": ["read"], "name": "ci \u00e9\u00f1", "n": [1.5]}
    deadline = T0 + timedelta(days=3, microseconds=11)
    wanted = dataclasses.replace(info, metadata=metadata, expires_at=deadline)

    assert store.update(wanted, stored(store, info)) is True
    assert stored(store, info) == wanted
    assert store.get_by_id(info.key_id) == wanted
    assert stored(store, bystander) == bystander
    # Back to never expiring, with the user's fields as they were.
    assert store.update(info, stored(store, info)) is True
    assert stored(store, info) == info
    assert store.list_keys() == [info, bystander]


def test_update_never_touches_a_revoked_or_unknown_record(store: KeyStore) -> None:
    info = record()
    store.add(info)
    store.revoke(info.digest, T0)
    revoked = stored(store, info)

    changed = dataclasses.replace(info, metadata={"user_id": "u1", "permissions": ["admin"]})
    assert store.update(changed, info) is False
    assert store.update(changed, revoked) is False
    assert stored(store, info) == revoked
    unknown = record()
    assert store.update(unknown, unknown) is False
    assert len(store.list_keys()) == 1


@pytest.mark.parametrize(
    "meanwhile",
    [
        pytest.param({"metadata": {"user_id": "u1", "permissions": []}}, id="metadata"),
        pytest.param({"expires_at": T0 + timedelta(days=1)}, id="expiry"),
    ],
)
def test_update_is_a_compare_and_set(store: KeyStore, meanwhile: dict[str, Any]) -> None:
    info = record()
    store.add(info)
    other = dataclasses.replace(info, **meanwhile)
    assert store.update(other, info) is True  # another writer got there first

    mine = dataclasses.replace(info, metadata={"user_id": "u1", "permissions": ["read", "admin"]})
    assert store.update(mine, info) is False
    assert stored(store, info) == other
    assert store.update(mine, other) is True
    assert stored(store, info) == mine


def test_touch_records_the_last_use(store: KeyStore) -> None:
    info = record()
    store.add(info)
    first, later = T0 + timedelta(seconds=1), T0 + timedelta(minutes=5, microseconds=1)

    store.touch(info.digest, first)
    assert stored(store, info).last_used_at == first
    store.touch(info.digest, later)
    assert stored(store, info) == dataclasses.replace(info, last_used_at=later)


def test_touch_of_an_unknown_digest_creates_nothing(store: KeyStore) -> None:
    store.touch("0" * 64, T0)

    assert store.get("0" * 64) is None
    assert store.list_keys() == []


# -- round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param({}, id="user_id only"),
        pytest.param({"email": "zoë@exämple.org", "name": "Zoë Ünïcode"}, id="accents"),
        pytest.param({"name": "山田太郎", "note": "שלום", "emoji": "🔑🛡️"}, id="CJK RTL emoji"),
        pytest.param({"quote": 'it\'s "quoted" \\ back\\slash\n\ttab'}, id="escapes"),
        pytest.param({"nul": "a\x00b"}, id="NUL char"),
        pytest.param(
            {"org": {"id": 7, "teams": [{"name": "a", "roles": ["x", "y"]}, {}]}}, id="nested"
        ),
        pytest.param(
            {"int": 2**53 + 1, "neg": -3, "float": 0.1, "big": 1e300, "t": True, "f": False},
            id="numbers and booleans",
        ),
        pytest.param({"nothing": None, "empty": [], "obj": {}}, id="empty values"),
        pytest.param({"permissions": ["read", "write:all"]}, id="permissions"),
    ],
)
def test_metadata_round_trips(store: KeyStore, extra: dict[str, Any]) -> None:
    metadata = {"user_id": "ünï-ũser", **extra}
    info = record("ünï-ũser", metadata=metadata)
    store.add(info)

    assert stored(store, info).metadata == metadata
    assert store.list_keys("ünï-ũser")[0].metadata == metadata
    assert stored(store, info).scopes == tuple(metadata.get("permissions", ()))


def test_timestamps_round_trip_as_aware_utc(store: KeyStore) -> None:
    info = record(
        created_at=T0,
        expires_at=T0 + timedelta(days=90, microseconds=1),
        revoked_at=T0 + timedelta(days=1, microseconds=999_999),
        last_used_at=datetime(2038, 1, 19, 3, 14, 8, 1, tzinfo=timezone.utc),
    )
    store.add(info)

    back = stored(store, info)

    assert back == info
    for name in ("created_at", "expires_at", "revoked_at", "last_used_at"):
        value = getattr(back, name)
        assert value.utcoffset() == timedelta(0), name
    assert back.expires_ts == info.expires_ts


def test_a_read_record_has_the_check_times_of_the_written_one(store: KeyStore) -> None:
    # Read before any datetime: Redis and PostgreSQL records compute them from microseconds.
    info = record(
        expires_at=T0 + timedelta(days=90, microseconds=1),
        last_used_at=datetime(2038, 1, 19, 3, 14, 8, 1, tzinfo=timezone.utc),
    )
    store.add(info)

    back = stored(store, info)

    assert back.valid_until == info.valid_until
    assert back.last_used_ts == info.last_used_ts
    assert back.expires_at == info.expires_at


def test_timestamps_in_other_zones_keep_their_instant(store: KeyStore) -> None:
    india = timezone(timedelta(hours=5, minutes=30))
    info = record(created_at=T0.astimezone(india), expires_at=datetime(2030, 1, 1, tzinfo=india))
    store.add(info)

    back = stored(store, info)

    assert back.created_at == T0
    assert back.expires_at == datetime(2030, 1, 1, tzinfo=india)
    assert back.created_at.tzinfo is not None and back.expires_at is not None


# -- concurrency through the manager -------------------------------------------------------


def test_sixteen_threads_lose_nothing_and_duplicate_nothing(store: KeyStore) -> None:
    manager = APIKeyManager(store)
    threads, per_thread = 16, 20
    barrier = threading.Barrier(threads)

    def work(n: int) -> list[str]:
        barrier.wait()
        keys = [manager.generate_key(user_id=f"user-{n}", n=i) for i in range(per_thread)]
        assert all(manager.validate_key(key) for key in keys)
        assert all(manager.revoke_key(key) for key in keys[::2])
        assert not any(manager.validate_key(key) for key in keys[::2])
        return keys

    with ThreadPoolExecutor(threads) as pool:
        issued = [f.result() for f in [pool.submit(work, n) for n in range(threads)]]

    records = manager.list_keys(include_inactive=True)
    assert len(records) == threads * per_thread
    assert len({r.key_id for r in records}) == len({r.digest for r in records}) == len(records)
    assert len({key for keys in issued for key in keys}) == threads * per_thread
    for n, keys in enumerate(issued):
        assert [manager.validate_key(key) for key in keys] == [False, True] * (per_thread // 2)
        metadata = [manager.get_metadata(key) for key in keys[1::2]]
        assert metadata == [{"user_id": f"user-{n}", "n": i} for i in range(1, per_thread, 2)]
        assert len(manager.list_keys(f"user-{n}")) == per_thread // 2


def test_racing_revocations_succeed_once_per_key(store: KeyStore) -> None:
    manager = APIKeyManager(store)
    keys = [manager.generate_key(user_id="u1") for _ in range(16)]
    barrier = threading.Barrier(len(keys))

    def revoke_all(offset: int) -> list[str]:
        barrier.wait()
        order = keys[offset:] + keys[:offset]
        return [key for key in order if manager.revoke_key(key)]

    with ThreadPoolExecutor(len(keys)) as pool:
        wins = [f.result() for f in [pool.submit(revoke_all, n) for n in range(len(keys))]]

    assert Counter(key for won in wins for key in won) == Counter(keys)
    assert manager.list_keys("u1") == []


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda m: m["permissions"].append("admin"), id="append a scope"),
        pytest.param(lambda m: m.__setitem__("role", "root"), id="add a field"),
        pytest.param(lambda m: m.update(user_id="attacker"), id="update"),
        pytest.param(lambda m: m["profile"].__setitem__("tier", "pro"), id="nested dict"),
        pytest.param(lambda m: m.pop("user_id"), id="pop"),
        pytest.param(lambda m: m["permissions"].extend(["x"]), id="extend"),
        pytest.param(lambda m: m["permissions"].__iadd__(["x"]), id="+="),
        pytest.param(lambda m: m["grid"][0].append(2), id="list in a list"),
        pytest.param(lambda m: m["teams"][0].__setitem__("role", "admin"), id="dict in a list"),
    ],
)
def test_a_shared_record_cannot_be_changed_through_its_metadata(
    store: KeyStore, mutate: Callable[[dict[str, Any]], object]
) -> None:
    # The memory store and the SQLite decode cache give every request the same KeyInfo:
    # a handler that could change it would grant permissions to later requests.
    manager = APIKeyManager(store)
    key, info = manager.create_key(
        user_id="u1",
        permissions=["read"],
        profile={"tier": "free"},
        grid=[[1]],
        teams=[{"role": "member"}],
    )

    for record in (info, manager.verify(key).key):
        assert record is not None
        with pytest.raises(TypeError, match="read-only"):
            mutate(record.metadata)

    after = manager.verify(key).key
    assert after is not None
    assert after.scopes == ("read",)
    assert manager.get_metadata(key) == {
        "user_id": "u1",
        "permissions": ["read"],
        "profile": {"tier": "free"},
        "grid": [[1]],
        "teams": [{"role": "member"}],
    }


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        pytest.param({"\ud800": 1}, "not UTF-8", id="lone surrogate in a field name"),
        pytest.param({"user_id": "a\x00b"}, "NUL", id="NUL in the user_id"),
        pytest.param({"note": "\ud800"}, "'note'", id="lone surrogate in a value"),
    ],
)
def test_every_store_gets_the_same_metadata_refused_before_it_is_written(
    store: KeyStore, fields: dict[str, Any], message: str
) -> None:
    manager = APIKeyManager(store)
    with pytest.raises((TypeError, ValueError), match=message):
        manager.create_key({"user_id": "u1", **fields})
    assert store.list_keys() == []
