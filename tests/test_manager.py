"""APIKeyManager: issuing, checking, listing, revoking and rotating keys over a store."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import math
import secrets
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from keyguard import (
    APIKeyManager,
    InvalidKeyError,
    KeyguardError,
    KeyStore,
    MemoryStore,
    Reason,
    StoreError,
    Verification,
    mask_key,
)
from keyguard.identity import APIKeyUser
from tests.helpers import START, Clock, CountingStore

UNKNOWN_KEY = "sk_" + "0" * 32


@pytest.fixture(autouse=True)
def no_pepper_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KEYGUARD_PEPPER", raising=False)


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> Iterator[CountingStore]:
    s = CountingStore()
    yield s
    s.close()


@pytest.fixture
def manager(store: CountingStore, clock: Clock) -> APIKeyManager:
    return APIKeyManager(store, clock=clock)


def at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


# -- issuing -----------------------------------------------------------------------------


def test_dict_and_keyword_forms_give_the_same_record(manager: APIKeyManager) -> None:
    metadata = {"user_id": "u1", "email": "a@x.io", "permissions": ["read"]}
    ninety_days = timedelta(days=90)

    from_dict = manager.generate_key(metadata, expires_in=ninety_days)
    from_keywords = manager.generate_key(
        user_id="u1", email="a@x.io", permissions=["read"], expires_in=ninety_days
    )
    from_both = manager.generate_key({"user_id": "u1"}, email="a@x.io", permissions=["read"])

    records = [manager.verify(key).key for key in (from_dict, from_keywords, from_both)]
    assert from_dict != from_keywords
    for key, record in zip((from_dict, from_keywords, from_both), records, strict=True):
        assert record is not None
        assert len(key) == 35
        assert manager.is_well_formed(key)
        assert record.user_id == "u1"
        assert record.metadata == metadata
        assert record.scopes == ("read",)
        assert record.prefix == "sk_"
        assert record.hint == mask_key(key, "sk_") == "sk_…" + key[-4:]
        assert record.created_at == at(START)
        assert record.revoked_at is None
        assert manager.get_metadata(key) == metadata
    assert records[0] is not None and records[1] is not None and records[2] is not None
    assert records[0].expires_at == records[1].expires_at == at(START) + ninety_days
    assert records[2].expires_at is None
    assert len({r.key_id for r in records if r is not None}) == 3


def test_create_key_returns_the_stored_record(manager: APIKeyManager) -> None:
    key, info = manager.create_key(user_id="u1", permissions=["read", "write"])

    assert manager.get_key_info(info.key_id) == info
    assert info.scopes == ("read", "write")
    assert info.digest == hashlib.sha256(key.encode()).hexdigest()
    assert info.hash_scheme == "sha256"


def test_expires_at_sets_the_expiry(manager: APIKeyManager) -> None:
    deadline = datetime(2030, 1, 1, 12, tzinfo=timezone(timedelta(hours=2)))

    _, info = manager.create_key(user_id="u1", expires_at=deadline)

    assert info.expires_at == deadline
    assert info.expires_at is not None and info.expires_at.utcoffset() == timedelta(0)


def test_caller_dict_is_copied(manager: APIKeyManager) -> None:
    metadata: dict[str, Any] = {"user_id": "u1", "permissions": ["read"]}
    key = manager.generate_key(metadata)

    metadata["permissions"].append("admin")
    metadata["user_id"] = "someone else"

    assert manager.get_metadata(key) == {"user_id": "u1", "permissions": ["read"]}


U1 = {"user_id": "u1"}
PAST = datetime(2000, 1, 1, tzinfo=timezone.utc)
FUTURE = datetime(2030, 1, 1, tzinfo=timezone.utc)

BAD_METADATA = [
    pytest.param(None, {}, ValueError, "'user_id'", id="no metadata"),
    pytest.param({}, {}, ValueError, "'user_id'", id="empty dict"),
    pytest.param({"email": "a@x.io"}, {}, ValueError, "'user_id'", id="missing user_id"),
    pytest.param({"user_id": ""}, {}, ValueError, "'user_id'", id="empty user_id"),
    pytest.param({"user_id": "  "}, {}, ValueError, "'user_id'", id="blank user_id"),
    pytest.param({"user_id": None}, {}, ValueError, "'user_id'", id="None user_id"),
    pytest.param({"user_id": 42}, {}, ValueError, "'user_id'", id="int user_id"),
    pytest.param({"user_id": ["u1"]}, {}, ValueError, "'user_id'", id="list user_id"),
    pytest.param(None, {"user_id": 42}, ValueError, "'user_id'", id="int user_id keyword"),
    pytest.param(["user_id", "u1"], {}, TypeError, "must be a dict", id="list"),
    pytest.param("u1", {}, TypeError, "must be a dict", id="str"),
    pytest.param({1: "x", "user_id": "u1"}, {}, TypeError, "1", id="int field name"),
    pytest.param({**U1, "tags": {"a"}}, {}, TypeError, "'tags'", id="set value"),
    pytest.param({**U1, "since": datetime(2024, 1, 1)}, {}, TypeError, "'since'", id="datetime"),
    pytest.param({**U1, "score": math.nan}, {}, TypeError, "'score'", id="NaN"),
    pytest.param({**U1, "limits": {"rate": [math.inf]}}, {}, TypeError, "'limits'", id="inf"),
    pytest.param(U1, {"obj": object()}, TypeError, "'obj'", id="object keyword"),
    pytest.param({**U1, "permissions": "read"}, {}, TypeError, "'permissions'", id="str perms"),
    pytest.param({**U1, "permissions": ["a", 1]}, {}, TypeError, "'permissions'", id="int perm"),
    pytest.param({**U1, "permissions": [""]}, {}, TypeError, "'permissions'", id="empty perm"),
    pytest.param({**U1, "permissions": {"a": 1}}, {}, TypeError, "'permissions'", id="dict perms"),
    pytest.param({**U1, "email": 5}, {}, TypeError, "'email'", id="int email"),
    pytest.param(U1, {"user_id": "u2"}, TypeError, "'user_id'", id="field given twice"),
    pytest.param({**U1, "blob": "x" * 70_000}, {}, ValueError, "metadata", id="too large"),
    pytest.param(U1, {"expires_in": 90}, TypeError, "expires_in", id="int expires_in"),
    pytest.param(U1, {"expires_in": timedelta(0)}, ValueError, "expires_in", id="zero lifetime"),
    pytest.param(U1, {"expires_in": timedelta(-1)}, ValueError, "expires_in", id="negative"),
    pytest.param(
        U1, {"expires_at": FUTURE.replace(tzinfo=None)}, TypeError, "expires_at", id="naive"
    ),
    pytest.param(U1, {"expires_at": PAST}, ValueError, "expires_at", id="past expires_at"),
    pytest.param(
        U1, {"expires_in": timedelta(1), "expires_at": FUTURE}, TypeError, "expires_at", id="both"
    ),
    pytest.param(U1, {"prefix": "s k"}, ValueError, "prefix", id="bad prefix"),
    pytest.param(U1, {"prefix": "pk_"}, ValueError, "'pk_'", id="prefix not accepted"),
]


@pytest.mark.parametrize(("metadata", "kwargs", "error", "named"), BAD_METADATA)
def test_bad_metadata_is_refused_and_nothing_is_stored(
    manager: APIKeyManager,
    store: CountingStore,
    metadata: Any,
    kwargs: dict[str, Any],
    error: type[Exception],
    named: str,
) -> None:
    with pytest.raises(error) as exc_info:
        manager.generate_key(metadata, **kwargs)

    assert named in str(exc_info.value)
    assert store.calls["add"] == 0
    assert store.list_keys() == []


# -- checking garbage --------------------------------------------------------------------


GARBAGE = [
    pytest.param(None, id="None"),
    pytest.param(UNKNOWN_KEY.encode(), id="bytes"),
    pytest.param(35, id="int"),
    pytest.param([UNKNOWN_KEY], id="list"),
    pytest.param("", id="empty"),
    pytest.param("pk_" + "0" * 32, id="wrong prefix"),
    pytest.param("sk_" + "0" * 31, id="31 hex"),
    pytest.param("sk_" + "0" * 33, id="33 hex"),
    pytest.param("sk_" + "A" * 32, id="upper-case hex"),
    pytest.param(" " + UNKNOWN_KEY, id="leading space"),
    pytest.param(UNKNOWN_KEY + "\n", id="trailing newline"),
    pytest.param("Bearer " + UNKNOWN_KEY, id="scheme in front"),
    pytest.param("sk_" + "a" * 10_000, id="10 kB"),
    pytest.param("sk_" + "é" * 32, id="non-ASCII"),
    pytest.param("sk_" + "\x00" * 32, id="NUL bytes"),
]


@pytest.mark.parametrize("key", GARBAGE)
def test_garbage_is_refused_without_touching_the_store(
    manager: APIKeyManager, store: CountingStore, key: object
) -> None:
    manager.generate_key(user_id="u1")
    store.calls.clear()

    assert manager.validate_key(key) is False
    assert manager.get_metadata(key) is None
    assert manager.verify(key) == Verification(False, Reason.MALFORMED, None)
    assert asyncio.run(manager.averify(key)).reason is Reason.MALFORMED
    assert manager.revoke_key(key) is False
    with pytest.raises(InvalidKeyError) as exc_info:
        manager.rotate_key(key)
    assert exc_info.value.reason == Reason.MALFORMED
    assert store.calls == Counter()


# -- verify and its reasons ----------------------------------------------------------------


def test_verify_reasons(manager: APIKeyManager, clock: Clock) -> None:
    active = manager.generate_key(user_id="u1")
    revoked = manager.generate_key(user_id="u1")
    expiring = manager.generate_key(user_id="u1", expires_in=timedelta(hours=1))
    manager.revoke_key(revoked)

    clock.advance(timedelta(minutes=59))
    assert manager.verify(expiring).reason is Reason.OK
    clock.advance(timedelta(minutes=1))

    results = {
        "active": manager.verify(active),
        "unknown": manager.verify(UNKNOWN_KEY),
        "revoked": manager.verify(revoked),
        "expired": manager.verify(expiring),
        "malformed": manager.verify("nope"),
    }
    assert {name: r.reason for name, r in results.items()} == {
        "active": Reason.OK,
        "unknown": Reason.NOT_FOUND,
        "revoked": Reason.REVOKED,
        "expired": Reason.EXPIRED,
        "malformed": Reason.MALFORMED,
    }
    assert [name for name, r in results.items() if r] == ["active"]
    assert [name for name, r in results.items() if r.ok] == ["active"]
    # Stored records come back for audit even when refused; unknown input has none.
    assert [name for name, r in results.items() if r.key is None] == ["unknown", "malformed"]


def test_reason_values_are_stable_strings() -> None:
    assert [str(r) for r in Reason] == ["ok", "malformed", "not_found", "revoked", "expired"]
    assert Reason("expired") is Reason.EXPIRED
    assert json.dumps({"reason": Reason.NOT_FOUND}) == '{"reason": "not_found"}'
    assert f"{Reason.REVOKED}" == "revoked"


@pytest.mark.parametrize("inactive", ["revoked", "expired"])
def test_inactive_keys_are_refused_hidden_and_kept(
    manager: APIKeyManager, clock: Clock, inactive: str
) -> None:
    key, info = manager.create_key(user_id="u1", expires_in=timedelta(days=1))
    clock.advance(timedelta(seconds=1))  # keys made at one instant are listed by key_id
    other, other_info = manager.create_key(user_id="u1")
    if inactive == "revoked":
        assert manager.revoke_key(key) is True
    else:
        clock.advance(timedelta(days=1, seconds=1))

    assert manager.validate_key(key) is False
    assert manager.get_metadata(key) is None
    assert manager.verify(key).reason == inactive
    assert [k.key_id for k in manager.list_keys("u1")] == [other_info.key_id]
    assert [k.key_id for k in manager.list_keys()] == [other_info.key_id]
    everything = manager.list_keys("u1", include_inactive=True)
    assert everything[0].key_id == info.key_id
    assert everything[0].status(clock()) == inactive
    kept = manager.get_key_info(info.key_id)
    assert kept is not None and kept.status(clock()) == inactive
    assert manager.validate_key(other) is True


def test_list_keys_is_per_user_and_oldest_first(manager: APIKeyManager, clock: Clock) -> None:
    keys = []
    for user in ["u1", "u2", "u1", "u3", "u1"]:
        keys.append(manager.create_key(user_id=user)[1].key_id)
        clock.advance(timedelta(seconds=1))

    assert [k.key_id for k in manager.list_keys("u1")] == [keys[0], keys[2], keys[4]]
    assert [k.key_id for k in manager.list_keys()] == keys
    assert manager.list_keys("nobody") == []
    with pytest.raises(TypeError, match="user_id must be a str"):
        manager.list_keys(5)  # type: ignore[arg-type]


def created_in_turn(manager: APIKeyManager, clock: Clock, users: list[str]) -> list[str]:
    """The key_ids of keys created a second apart, one for each of ``users``."""
    key_ids = []
    for user in users:
        key_ids.append(manager.create_key(user_id=user)[1].key_id)
        clock.advance(timedelta(seconds=1))
    return key_ids


def test_a_page_of_active_keys_reads_past_inactive_ones(
    manager: APIKeyManager, clock: Clock
) -> None:
    keys = created_in_turn(manager, clock, ["u1"] * 7)
    for key_id in keys[1:5]:
        manager.revoke_by_id(key_id)

    page = manager.list_keys("u1", limit=2)
    rest = manager.list_keys("u1", limit=2, after=page[-1].key_id)

    assert [k.key_id for k in page] == [keys[0], keys[5]]
    assert [k.key_id for k in rest] == [keys[6]]
    assert [k.key_id for k in manager.list_keys("u1", limit=3, include_inactive=True)] == keys[:3]
    assert manager.list_keys("u1", after=keys[4]) == manager.list_keys("u1", limit=9)[1:]


def test_iter_keys_reads_the_store_a_page_at_a_time(
    manager: APIKeyManager, store: CountingStore, clock: Clock
) -> None:
    keys = created_in_turn(manager, clock, ["u0", "u1"] * 5)
    manager.revoke_by_id(keys[0])
    store.calls.clear()

    walked = manager.iter_keys(page_size=3)

    assert store.calls["list_keys"] == 0  # nothing is read before the first key is asked for
    assert [k.key_id for k in walked] == keys[1:]
    assert store.calls["list_keys"] == 4  # pages of 3, 3, 3 and 1
    assert [k.key_id for k in manager.iter_keys("u0", include_inactive=True)] == keys[::2]


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        pytest.param({"limit": 0}, ValueError, "limit must be at least 1", id="zero limit"),
        pytest.param({"limit": -1}, ValueError, "at least 1", id="negative limit"),
        pytest.param({"limit": True}, TypeError, "limit must be an int", id="bool limit"),
        pytest.param({"limit": 2.0}, TypeError, "limit must be an int", id="float limit"),
        pytest.param({"after": 5}, TypeError, "after must be a key_id", id="int cursor"),
        pytest.param({"after": "key_missing"}, ValueError, "key_missing", id="unknown cursor"),
    ],
)
def test_bad_listing_arguments_are_refused(
    manager: APIKeyManager, options: dict[str, Any], error: type[Exception], message: str
) -> None:
    manager.create_key(user_id="u1")

    with pytest.raises(error, match=message):
        manager.list_keys(**options)


@pytest.mark.parametrize("page_size", [0, None, "10"])
def test_a_bad_page_size_is_refused_at_once(manager: APIKeyManager, page_size: Any) -> None:
    with pytest.raises((TypeError, ValueError), match="page_size"):
        manager.iter_keys(page_size=page_size)


def test_get_metadata_returns_a_copy(manager: APIKeyManager) -> None:
    key = manager.generate_key(user_id="u1", permissions=["read"], profile={"tier": "free"})

    first = manager.get_metadata(key)
    assert first is not None
    first["permissions"].append("admin")
    first["profile"]["tier"] = "enterprise"
    first["user_id"] = "attacker"

    assert manager.get_metadata(key) == {
        "user_id": "u1",
        "permissions": ["read"],
        "profile": {"tier": "free"},
    }
    assert manager.verify(key).key == manager.list_keys()[0]
    assert manager.list_keys()[0].scopes == ("read",)


def test_averify_on_the_memory_store(manager: APIKeyManager) -> None:
    key = manager.generate_key(user_id="u1")
    gone = manager.generate_key(user_id="u1")
    manager.revoke_key(gone)

    async def check_all() -> list[Reason]:
        results = [await manager.averify(k) for k in (key, gone, UNKNOWN_KEY, "x")]
        return [r.reason for r in results]

    assert asyncio.run(check_all()) == [
        Reason.OK,
        Reason.REVOKED,
        Reason.NOT_FOUND,
        Reason.MALFORMED,
    ]


# -- revoking ----------------------------------------------------------------------------


def test_revoke_key_once(manager: APIKeyManager, clock: Clock) -> None:
    key = manager.generate_key(user_id="u1")
    clock.advance(timedelta(seconds=5))

    assert manager.revoke_key(key) is True
    assert manager.revoke_key(key) is False
    assert manager.revoke_key(UNKNOWN_KEY) is False
    record = manager.verify(key).key
    assert record is not None and record.revoked_at == at(START + 5)


def test_revoke_by_id_from_a_listing(manager: APIKeyManager) -> None:
    key = manager.generate_key(user_id="u1")
    keep = manager.generate_key(user_id="u1")
    # Made at one instant, the two keys are listed in key_id order: find the first one.
    [listed] = [k for k in manager.list_keys("u1") if k.digest == manager.digest(key)]

    assert manager.revoke_by_id(listed.key_id) is True
    assert manager.revoke_by_id(listed.key_id) is False
    assert manager.revoke_by_id("key_does_not_exist") is False
    assert manager.revoke_by_id(None) is False  # type: ignore[arg-type]
    assert manager.validate_key(key) is False
    assert manager.validate_key(keep) is True


def test_revoking_an_expired_key_changes_nothing(manager: APIKeyManager, clock: Clock) -> None:
    key, info = manager.create_key(user_id="u1", expires_in=timedelta(minutes=1))
    clock.advance(timedelta(minutes=2))

    assert manager.revoke_key(key) is False
    assert manager.revoke_by_id(info.key_id) is False
    assert manager.verify(key).reason is Reason.EXPIRED


# -- uniqueness ----------------------------------------------------------------------------


def force_key_bodies(monkeypatch: pytest.MonkeyPatch, bodies: list[str]) -> None:
    """Make key bodies (16-byte draws) come from ``bodies``; other draws stay random."""
    real_token_hex = secrets.token_hex
    queue = list(bodies)

    def token_hex(nbytes: int | None = None) -> str:
        if nbytes == 16:
            return queue.pop(0) if len(queue) > 1 else queue[0]
        return real_token_hex(nbytes)

    monkeypatch.setattr("keyguard.keys.secrets.token_hex", token_hex)


def test_a_collision_draws_a_new_key_and_keeps_the_first_record(
    manager: APIKeyManager,
    store: CountingStore,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    same, new = "a" * 32, "b" * 32
    force_key_bodies(monkeypatch, [same, same, new])

    first = manager.generate_key(user_id="first", permissions=["admin"])
    with caplog.at_level(logging.WARNING, logger="keyguard"):
        second = manager.generate_key(user_id="second")

    assert first == "sk_" + same
    assert second == "sk_" + new
    assert store.calls["add"] == 3
    assert manager.get_metadata(first) == {"user_id": "first", "permissions": ["admin"]}
    assert manager.get_metadata(second) == {"user_id": "second"}
    assert len(manager.list_keys(include_inactive=True)) == 2
    assert "collision" in caplog.text
    assert first not in caplog.text


def test_endless_collisions_give_up_with_an_error(
    manager: APIKeyManager, store: CountingStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    force_key_bodies(monkeypatch, ["c" * 32])
    manager.generate_key(user_id="first")

    with pytest.raises(KeyguardError, match="unique key"):
        manager.generate_key(user_id="second")

    assert [k.user_id for k in manager.list_keys(include_inactive=True)] == ["first"]


# -- rotation ------------------------------------------------------------------------------


def test_rotate_key_keeps_the_old_key_during_grace(manager: APIKeyManager, clock: Clock) -> None:
    old = manager.generate_key(user_id="u1", permissions=["read"])
    clock.advance(timedelta(days=10))

    new = manager.rotate_key(old, grace=timedelta(hours=24))

    assert new != old
    old_info = manager.verify(old).key
    new_info = manager.verify(new).key
    assert old_info is not None and new_info is not None
    # The old key names its successor and when it was replaced, in reserved fields.
    assert manager.get_metadata(old) == {
        "user_id": "u1",
        "permissions": ["read"],
        "replaced_by": new_info.key_id,
        "deprecated_at": "2023-11-24T22:13:20+00:00",
    }
    # The new key joins the old key's family, which carries its usage budget.
    assert manager.get_metadata(new) == {
        "user_id": "u1",
        "permissions": ["read"],
        "family_id": old_info.key_id,
        "rotated_from": old_info.key_id,
    }
    clock.advance(timedelta(hours=23, minutes=59))
    assert manager.validate_key(old) is True
    clock.advance(timedelta(minutes=1))
    assert manager.verify(old).reason is Reason.EXPIRED
    assert manager.validate_key(new) is True
    new_info = manager.verify(new).key
    assert new_info is not None and new_info.expires_at is None


def test_rotate_key_with_zero_grace_revokes_at_once(manager: APIKeyManager) -> None:
    old = manager.generate_key(user_id="u1")

    new = manager.rotate_key(old, grace=timedelta(0))

    assert manager.verify(old).reason is Reason.REVOKED
    assert manager.validate_key(new) is True


def test_rotated_key_keeps_the_old_lifetime_unless_told(
    manager: APIKeyManager, clock: Clock
) -> None:
    old = manager.generate_key(user_id="u1", expires_in=timedelta(days=30))
    clock.advance(timedelta(days=5))

    same_lifetime = manager.rotate_key(old)
    same_info = manager.verify(same_lifetime).key
    other = manager.generate_key(user_id="u1", expires_in=timedelta(days=30))
    own_lifetime = manager.rotate_key(other, expires_in=timedelta(days=1))
    own_info = manager.verify(own_lifetime).key

    assert same_info is not None and same_info.expires_at == at(clock()) + timedelta(days=30)
    assert own_info is not None and own_info.expires_at == at(clock()) + timedelta(days=1)


def test_rotation_never_extends_the_old_key(manager: APIKeyManager, clock: Clock) -> None:
    old = manager.generate_key(user_id="u1", expires_in=timedelta(hours=1))

    manager.rotate_key(old, grace=timedelta(days=7))

    clock.advance(timedelta(hours=1))
    assert manager.verify(old).reason is Reason.EXPIRED


@pytest.mark.parametrize(
    "state", [Reason.MALFORMED, Reason.NOT_FOUND, Reason.REVOKED, Reason.EXPIRED]
)
def test_rotating_an_invalid_key_raises(
    manager: APIKeyManager, clock: Clock, state: Reason
) -> None:
    key = {Reason.MALFORMED: "sk_" + "Z" * 32, Reason.NOT_FOUND: UNKNOWN_KEY}.get(state)
    if key is None:
        key = manager.generate_key(user_id="u1", expires_in=timedelta(minutes=1))
        if state is Reason.REVOKED:
            manager.revoke_key(key)
        else:
            clock.advance(timedelta(minutes=1))
    before = manager.list_keys(include_inactive=True)

    with pytest.raises(InvalidKeyError) as exc_info:
        manager.rotate_key(key)

    assert exc_info.value.reason == state
    assert str(state) in str(exc_info.value)
    assert key not in str(exc_info.value)
    assert manager.list_keys(include_inactive=True) == before


def test_rotate_by_id(manager: APIKeyManager) -> None:
    old, info = manager.create_key(user_id="u1")

    new = manager.rotate_by_id(info.key_id, grace=timedelta(0))

    assert manager.validate_key(new) is True
    assert manager.verify(old).reason is Reason.REVOKED
    with pytest.raises(InvalidKeyError) as exc_info:
        manager.rotate_by_id(info.key_id)
    assert exc_info.value.reason == Reason.REVOKED
    with pytest.raises(InvalidKeyError) as exc_info:
        manager.rotate_by_id("key_missing")
    assert exc_info.value.reason == Reason.NOT_FOUND


@pytest.mark.parametrize(
    "grace",
    [pytest.param(timedelta(seconds=-1), id="negative"), pytest.param(60, id="int seconds")],
)
def test_bad_grace_is_refused_before_anything_changes(manager: APIKeyManager, grace: Any) -> None:
    old = manager.generate_key(user_id="u1")

    with pytest.raises(ValueError, match="grace"):
        manager.rotate_key(old, grace=grace)

    assert len(manager.list_keys(include_inactive=True)) == 1
    assert manager.validate_key(old) is True


# -- secrets stay secret -------------------------------------------------------------------


def test_reprs_never_contain_the_key(manager: APIKeyManager) -> None:
    key, info = manager.create_key(user_id="u1", permissions=["read"])
    body = key[len("sk_") :]
    shown = [
        repr(info),
        str(info),
        repr(manager.verify(key)),
        str(manager.verify(key)),
        repr(manager.list_keys()),
        repr(manager),
    ]

    for text in shown:
        assert body[:8] not in text and body[-12:-4] not in text
        assert info.digest not in text
    assert info.hint in repr(info)


# -- pepper ------------------------------------------------------------------------------


def test_explicit_pepper_stores_hmac_digests(clock: Clock) -> None:
    store = MemoryStore()
    pepper = "a server-side secret of 32 chars"
    manager = APIKeyManager(store, pepper=pepper, clock=clock)

    key, info = manager.create_key(user_id="u1")

    assert info.hash_scheme.startswith("hmac-sha256:")
    assert info.digest == hmac.new(pepper.encode(), key.encode(), hashlib.sha256).hexdigest()
    assert store.get(info.digest) == info
    assert store.get(hashlib.sha256(key.encode()).hexdigest()) is None
    assert manager.validate_key(key) is True
    assert APIKeyManager(store, pepper=pepper.encode()).validate_key(key) is True
    assert (
        APIKeyManager(store, pepper="another secret of 32 characters").validate_key(key) is False
    )
    assert APIKeyManager(store).verify(key).reason is Reason.NOT_FOUND


def test_pepper_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    store = MemoryStore()
    monkeypatch.setenv("KEYGUARD_PEPPER", "p" * 32)
    key, info = APIKeyManager(store).create_key(user_id="u1")

    assert info.hash_scheme.startswith("hmac-sha256:")
    assert info.digest == hmac.new(b"p" * 32, key.encode(), hashlib.sha256).hexdigest()
    assert APIKeyManager(store).validate_key(key) is True
    monkeypatch.setenv("KEYGUARD_PEPPER", "q" * 32)
    assert APIKeyManager(store).validate_key(key) is False
    monkeypatch.delenv("KEYGUARD_PEPPER")
    assert APIKeyManager(store).validate_key(key) is False
    assert APIKeyManager(store, pepper="p" * 32).validate_key(key) is True


def test_short_pepper_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        APIKeyManager(pepper="short")


# -- last use --------------------------------------------------------------------------------


def test_last_used_at_is_written_at_most_once_per_resolution(
    manager: APIKeyManager, store: CountingStore, clock: Clock
) -> None:
    key, info = manager.create_key(user_id="u1")
    assert info.last_used_at is None

    def last_used() -> datetime | None:
        record = store.get(info.digest)
        assert record is not None
        return record.last_used_at

    manager.validate_key(key)
    assert last_used() == at(START)
    clock.advance(timedelta(seconds=59))
    manager.validate_key(key)
    assert last_used() == at(START)
    assert store.calls["touch"] == 1
    clock.advance(timedelta(seconds=1))
    manager.validate_key(key)
    assert last_used() == at(START + 60)
    assert store.calls["touch"] == 2


def test_a_use_recorded_by_another_process_is_not_written_again(
    store: CountingStore, clock: Clock
) -> None:
    # Each server worker has its own manager; the record tells them all when the key was
    # last recorded as used, so the store gets one write per resolution, not one per worker.
    workers = [APIKeyManager(store, clock=clock) for _ in range(4)]
    key = workers[0].generate_key(user_id="u1")

    for worker in workers:
        assert worker.validate_key(key)
    assert store.calls["touch"] == 1

    clock.advance(timedelta(minutes=1))
    for worker in reversed(workers):
        assert worker.validate_key(key)
    assert store.calls["touch"] == 2


class TouchWritesNothingStore(CountingStore):
    """A store whose last-use writes fail before writing anything (a busy database)."""

    def touch(self, digest: str, at: datetime) -> None:
        self.calls["touch"] += 1
        raise StoreError("database is locked")


def test_a_failed_last_use_write_is_retried_once_per_resolution(clock: Clock) -> None:
    store = TouchWritesNothingStore()
    manager = APIKeyManager(store, clock=clock)
    key = manager.generate_key(user_id="u1")

    for _ in range(5):
        assert manager.validate_key(key)
    assert store.calls["touch"] == 1
    clock.advance(timedelta(minutes=1))
    assert manager.validate_key(key)
    assert store.calls["touch"] == 2


def test_last_use_is_not_recorded_for_refused_keys(
    manager: APIKeyManager, store: CountingStore
) -> None:
    key = manager.generate_key(user_id="u1")
    manager.revoke_key(key)

    manager.validate_key(key)
    manager.validate_key(UNKNOWN_KEY)

    assert store.calls["touch"] == 0


class TouchFailsStore(CountingStore):
    """A store whose last-use writes fail, as a read-only replica's would."""

    def touch(self, digest: str, at: datetime) -> None:
        super().touch(digest, at)
        raise StoreError("store is read-only")


def test_a_failed_last_use_write_does_not_refuse_the_key(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    store = TouchFailsStore()
    manager = APIKeyManager(store, clock=clock)
    key, info = manager.create_key(user_id="u1")

    with caplog.at_level(logging.WARNING, logger="keyguard"):
        result = manager.verify(key)

    assert result.ok is True
    assert store.calls["touch"] == 1
    assert info.key_id in caplog.text
    assert "read-only" in caplog.text
    assert key[3:] not in caplog.text


def test_last_used_resolution_none_disables_writes(store: CountingStore) -> None:
    manager = APIKeyManager(store, last_used_resolution=None)
    key = manager.generate_key(user_id="u1")

    for _ in range(3):
        assert manager.validate_key(key)

    assert store.calls["touch"] == 0
    assert manager.list_keys()[0].last_used_at is None


@pytest.mark.parametrize(
    ("resolution", "error"),
    [(timedelta(0), ValueError), (timedelta(seconds=-1), ValueError), (60, TypeError)],
)
def test_bad_last_used_resolution(resolution: Any, error: type[Exception]) -> None:
    with pytest.raises(error, match="last_used_resolution"):
        APIKeyManager(last_used_resolution=resolution)


# -- configuration ---------------------------------------------------------------------------


def test_accept_prefixes_checks_old_keys_and_issues_new_ones(clock: Clock) -> None:
    store = MemoryStore()
    old_key = APIKeyManager(store, prefix="sk_test_").generate_key(user_id="u1")
    manager = APIKeyManager(store, prefix="sk_live_", accept_prefixes=["sk_test_"])

    new_key = manager.generate_key(user_id="u1")

    assert new_key.startswith("sk_live_")
    assert [f.prefix for f in manager.formats] == ["sk_live_", "sk_test_"]
    assert manager.validate_key(old_key) is True
    assert manager.validate_key(new_key) is True
    assert manager.verify("pk_" + "0" * 32).reason is Reason.MALFORMED
    assert APIKeyManager(store, prefix="sk_live_").verify(old_key).reason is Reason.MALFORMED
    rotated = manager.rotate_key(old_key)
    assert rotated.startswith("sk_test_")


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        pytest.param({"prefix": "sk live"}, ValueError, "1-20 ASCII", id="bad prefix"),
        pytest.param({"prefix": None}, TypeError, "must be a str", id="None prefix"),
        pytest.param({"accept_prefixes": ["ok_", "b/d"]}, ValueError, "'b/d'", id="bad extra"),
        pytest.param({"accept_prefixes": "pk_"}, TypeError, "accept_prefixes", id="a str"),
        pytest.param({"store": {}}, TypeError, "KeyStore", id="not a store"),
    ],
)
def test_bad_configuration_is_refused(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        APIKeyManager(**options)


def test_issuing_with_a_prefix_the_manager_does_not_accept_is_refused(
    manager: APIKeyManager, store: CountingStore
) -> None:
    with pytest.raises(ValueError, match="'pk_'"):
        manager.generate_key(user_id="u1", prefix="pk_")

    assert store.calls["add"] == 0
    both = APIKeyManager(accept_prefixes=["pk_"])
    assert both.validate_key(both.generate_key(user_id="u1", prefix="pk_")) is True


def test_checksum_manager_refuses_typos_without_a_lookup(store: CountingStore) -> None:
    manager = APIKeyManager(store, checksum=True)
    key = manager.generate_key(user_id="u1")
    typo = key[:10] + ("1" if key[10] == "0" else "0") + key[11:]
    store.calls.clear()

    assert manager.verify(typo).reason is Reason.MALFORMED
    assert store.calls == Counter()
    assert manager.validate_key(key) is True


def test_from_url_builds_a_manager_over_the_named_store() -> None:
    manager = APIKeyManager.from_url("memory://", prefix="pk_")

    assert isinstance(manager.store, MemoryStore)
    assert isinstance(manager.store, KeyStore)
    assert manager.generate_key(user_id="u1").startswith("pk_")


def test_rotating_a_key_of_a_retired_prefix_issues_the_current_prefix() -> None:
    store = MemoryStore()
    _, old = APIKeyManager(store, prefix="sk_test_").create_key(user_id="u1")
    manager = APIKeyManager(store, prefix="sk_live_")

    new = manager.rotate_by_id(old.key_id)

    assert new.startswith("sk_live_")
    assert manager.validate_key(new) is True


# -- limits that every store must be able to read back --------------------------------


@pytest.mark.parametrize(
    "when",
    [
        pytest.param({"expires_in": timedelta(days=3_000_000)}, id="expires_in past year 9999"),
        pytest.param({"expires_in": timedelta.max}, id="expires_in timedelta.max"),
        pytest.param(
            {"expires_at": datetime.max.replace(tzinfo=timezone.utc)}, id="expires_at datetime.max"
        ),
    ],
)
def test_an_expiry_no_store_could_read_back_is_refused(
    manager: APIKeyManager, store: CountingStore, when: dict[str, Any]
) -> None:
    with pytest.raises(ValueError, match=r"ends after|must be before"):
        manager.generate_key(user_id="u1", **when)
    assert store.list_keys() == []


def test_a_rotation_with_an_impossible_grace_issues_nothing(
    manager: APIKeyManager, store: CountingStore
) -> None:
    key = manager.generate_key(user_id="u1")

    with pytest.raises(ValueError, match="grace"):
        manager.rotate_key(key, grace=timedelta.max)

    assert len(store.list_keys()) == 1
    assert manager.validate_key(key)


def test_rotate_by_id_never_echoes_a_key_given_by_mistake(manager: APIKeyManager) -> None:
    key = manager.generate_key(user_id="u1")

    with pytest.raises(InvalidKeyError) as exc_info:
        manager.rotate_by_id(key)

    assert key not in str(exc_info.value)
    assert mask_key(key) in str(exc_info.value)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        pytest.param(None, ValueError, id="nested too deeply"),
        pytest.param("\ud800", TypeError, id="lone surrogate"),
    ],
)
def test_metadata_that_no_store_can_hold_is_refused_naming_the_field(
    manager: APIKeyManager, store: CountingStore, value: object, error: type[Exception]
) -> None:
    if value is None:
        nested: list[object] = []
        for _ in range(100_000):
            nested = [nested]
        value = nested
    with pytest.raises(error, match="'note'"):
        manager.generate_key(user_id="u1", note=value)
    assert store.list_keys() == []


def test_the_hash_scheme_names_the_pepper_without_revealing_it() -> None:
    first = APIKeyManager(pepper="a" * 32).hash_scheme
    second = APIKeyManager(pepper="b" * 32).hash_scheme

    assert first.startswith("hmac-sha256:") and second.startswith("hmac-sha256:")
    assert first != second
    assert first == APIKeyManager(pepper="a" * 32).hash_scheme
    assert "a" * 16 not in first
    assert APIKeyManager().hash_scheme == "sha256"


def test_no_record_result_or_error_shows_the_key(manager: APIKeyManager) -> None:
    key, info = manager.create_key(user_id="u1", permissions=["read"])
    revoked = manager.generate_key(user_id="u1")
    manager.revoke_key(revoked)
    shown: list[str] = [repr(info), str(info), repr(APIKeyUser(info)), repr(manager)]
    for candidate in (key, revoked, key.upper(), "sk_" + "0" * 32):
        shown.append(repr(manager.verify(candidate)))
        try:
            manager.check(candidate)
        except InvalidKeyError as e:
            shown += [str(e), repr(e)]
    with pytest.raises(InvalidKeyError) as by_id:
        manager.rotate_by_id(key)  # a key given where a key_id belongs
    with pytest.raises(InvalidKeyError) as by_key:
        manager.rotate_key(revoked)
    shown += [str(by_id.value), repr(by_id.value), str(by_key.value), repr(by_key.value)]

    for secret in (key, revoked):
        assert not [text for text in shown if secret[3:] in text]
    assert any(info.hint in text for text in shown)
