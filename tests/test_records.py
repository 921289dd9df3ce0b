"""``KeyInfo``: a stored record parses its metadata when first read, and is then the same
record as one built from the metadata."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import random
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from keyguard import KeyInfo, StoreError, records
from keyguard.records import UNREAD

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
METADATA = {
    "user_id": "u1",
    "email": "u1@example.com",
    "permissions": ["read", "write"],
    "rate_limits": ["10/second"],
    "quota": "1000/month",
    "allowed_ips": ["10.0.0.0/8"],
    "family_id": "key_family",
    "replaced_by": "key_next",
    "deprecated_at": T0.isoformat(),
}
DERIVED = ("scopes", "rate_limits", "quota", "family_id", "allowed_ips", "deprecation")


def fields(**changes: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "key_id": "key_1",
        "prefix": "sk_",
        "hint": "sk_…a1b2",
        "user_id": "u1",
        "created_at": T0,
        "expires_at": T0 + timedelta(days=1),
        "last_used_at": T0,
        "digest": "ab" * 32,
    }
    values.update(changes)
    return values


def stored(text: str, **changes: Any) -> KeyInfo:
    return KeyInfo(**fields(**changes), metadata=UNREAD, metadata_json=text)


def us(value: datetime | None) -> int | None:
    return None if value is None else (value - EPOCH) // timedelta(microseconds=1)


def from_store(text: str, **changes: Any) -> KeyInfo:
    values = fields(**changes)
    return KeyInfo.from_store(
        digest=values["digest"],
        key_id=values["key_id"],
        hash_scheme="sha256",
        prefix=values["prefix"],
        hint=values["hint"],
        user_id=values["user_id"],
        metadata_json=text,
        created_us=(values["created_at"] - EPOCH) // timedelta(microseconds=1),
        expires_us=us(values.get("expires_at")),
        revoked_us=us(values.get("revoked_at")),
        used_us=us(values.get("last_used_at")),
    )


#: The two ways a store builds a record: ``metadata_json`` (the metadata read on first use)
#: and ``from_store`` (the times too).
STORED = [pytest.param(stored, id="metadata_json"), pytest.param(from_store, id="from_store")]


def built() -> KeyInfo:
    return KeyInfo(**fields(), metadata=METADATA)


@pytest.mark.parametrize("make", STORED)
@pytest.mark.parametrize("first", ["metadata", "created_at", *DERIVED])
def test_a_stored_record_reads_as_the_record_built_from_its_metadata(
    make: Callable[..., KeyInfo], first: str
) -> None:
    info = make(json.dumps(METADATA))

    getattr(info, first)

    expected = built()
    assert info == expected
    assert repr(info) == repr(expected)
    for name in DERIVED:
        assert getattr(info, name) == getattr(expected, name)
    assert info.scopes == ("read", "write")
    assert info.family_id == "key_family"
    assert dict(info.deprecation)["Deprecation"] == f"@{math.floor(T0.timestamp())}"


@pytest.mark.parametrize("make", STORED)
def test_a_stored_record_has_its_times_without_reading_the_metadata(
    make: Callable[..., KeyInfo],
) -> None:
    # Damaged metadata shows that nothing parsed it: the times a check needs are there.
    info = make("{not json", revoked_at=T0)

    assert info.valid_until == -math.inf
    assert info.last_used_ts == T0.timestamp()
    assert info.status(T0.timestamp()) == "revoked"


@pytest.mark.parametrize("make", STORED)
@pytest.mark.parametrize(
    ("text", "why"),
    [
        ('{"user_id": "u1", ', "Expecting"),
        ('["read"]', "not a JSON object"),
        ('{"user_id": "u1", "rate_limits": ["often"]}', "often"),
        ('{"user_id": "u1", "allowed_ips": ["10.0.0.300"]}', "10.0.0.300"),
        ('{"user_id": "u1", "permissions": 7}', "int"),
    ],
    ids=["bad JSON", "an array", "a bad rate", "a bad network", "scopes not a list"],
)
def test_damaged_stored_metadata_is_a_store_error_on_every_read(
    make: Callable[..., KeyInfo], text: str, why: str
) -> None:
    info = make(text)

    for name in ("scopes", "metadata", "rate_limits"):  # nothing is left half filled
        with pytest.raises(StoreError, match=f"stored metadata of key 'key_1' is damaged.*{why}"):
            getattr(info, name)


@pytest.mark.parametrize(
    "at",
    [
        EPOCH,
        T0,
        EPOCH - timedelta(microseconds=1),
        datetime(1, 1, 1, tzinfo=timezone.utc),
        datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc),
        *(EPOCH + timedelta(microseconds=random.Random(n).randrange(2**52)) for n in range(20)),
    ],
)
def test_a_record_from_store_has_the_times_of_its_microseconds(at: datetime) -> None:
    info = from_store("{}", expires_at=at, last_used_at=at)

    # The floats a check compares, made without a datetime, are the datetime's own.
    assert info.valid_until == at.timestamp()
    assert info.last_used_ts == at.timestamp()
    assert info.expires_at == at
    assert info.expires_at.tzinfo is timezone.utc
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.expires_at = None  # type: ignore[misc]


@pytest.mark.parametrize("field", ["created_us", "expires_us", "revoked_us", "used_us"])
@pytest.mark.parametrize("value", [253402300800000000, -62135596800000001, 10**400])
def test_a_stored_time_beyond_the_datetime_range_is_a_store_error(field: str, value: int) -> None:
    # Refused where the record is read: a datetime built later would raise OverflowError
    # in the middle of a request (a 500) instead of a store error (a 503).
    values: dict[str, Any] = dict(created_us=0, expires_us=None, revoked_us=None, used_us=None)
    values[field] = value
    with pytest.raises(StoreError, match="'key_1' has a time out of range"):
        KeyInfo.from_store(
            digest="d", key_id="key_1", hash_scheme="sha256", prefix="sk_", hint="sk_…0000",
            user_id="u1", metadata_json="{}", **values,
        )  # fmt: skip


def test_a_record_built_from_invalid_metadata_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="often"):
        KeyInfo(**fields(), metadata={"user_id": "u1", "rate_limits": ["often"]})


@pytest.mark.parametrize("make", STORED)
def test_stored_metadata_is_read_only_once_read(make: Callable[..., KeyInfo]) -> None:
    info = make(json.dumps(METADATA))

    with pytest.raises(TypeError, match="read-only"):
        info.metadata["permissions"].append("admin")
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.scopes = ("admin",)  # type: ignore[misc]
    assert info.scopes == ("read", "write")


@pytest.mark.parametrize("make", STORED)
def test_a_stored_record_survives_replace_and_pickle(make: Callable[..., KeyInfo]) -> None:
    info = make(json.dumps(METADATA))

    revoked = dataclasses.replace(info, revoked_at=T0)
    copied = pickle.loads(pickle.dumps(make(json.dumps(METADATA))))

    assert revoked == dataclasses.replace(built(), revoked_at=T0)
    assert revoked.valid_until == -math.inf and revoked.scopes == ("read", "write")
    assert copied == built() and copied.quota == built().quota


@pytest.mark.parametrize("make", STORED)
def test_an_unknown_attribute_is_still_an_attribute_error(make: Callable[..., KeyInfo]) -> None:
    info = make(json.dumps(METADATA))

    with pytest.raises(AttributeError, match="no attribute 'scope'"):
        info.scope  # type: ignore[attr-defined]  # noqa: B018
    assert not hasattr(info, "permissions")


def test_records_with_the_same_permissions_share_them_read_only() -> None:
    first = KeyInfo(**fields(), metadata={"user_id": "u1", "permissions": ["read", "write"]})
    second = KeyInfo(**fields(key_id="key_2"), metadata=json.loads(json.dumps(first.metadata)))
    revoked = dataclasses.replace(second, revoked_at=T0)

    assert second.metadata["permissions"] is first.metadata["permissions"]
    assert second.scopes is first.scopes is revoked.scopes
    assert second.scopes == ("read", "write") and second.metadata == first.metadata
    with pytest.raises(TypeError, match="read-only"):
        second.metadata["permissions"].append("admin")
    assert first.scopes == ("read", "write")


@pytest.mark.parametrize("permissions", [[], ["a", ["b"]], "read", None])
def test_permissions_that_are_not_a_list_of_strings_read_as_before(permissions: Any) -> None:
    info = KeyInfo(**fields(), metadata={"user_id": "u1", "permissions": permissions})

    assert info.scopes == tuple(permissions or ())
    assert info.metadata["permissions"] == permissions


def test_permission_sets_past_the_bound_are_kept_by_their_records(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(records, "_MAX_PERMISSION_SETS", len(records._PERMISSION_SETS))
    first = KeyInfo(**fields(), metadata={"user_id": "u1", "permissions": ["never seen"]})
    second = KeyInfo(**fields(), metadata={"user_id": "u1", "permissions": ["never seen"]})

    assert first.scopes == second.scopes == ("never seen",)
    assert first.metadata["permissions"] is not second.metadata["permissions"]
    assert ("never seen",) not in records._PERMISSION_SETS


@pytest.mark.parametrize(
    "permissions", [[f"p{i}" for i in range(17)], ["x" * 65], ["read", "y" * 1000]]
)
def test_large_permission_sets_are_not_shared(permissions: list[str]) -> None:
    first = KeyInfo(**fields(), metadata={"user_id": "u1", "permissions": permissions})
    second = KeyInfo(**fields(), metadata={"user_id": "u1", "permissions": permissions})

    assert first.scopes == second.scopes == tuple(permissions)
    assert first.metadata["permissions"] is not second.metadata["permissions"]
    assert tuple(permissions) not in records._PERMISSION_SETS
