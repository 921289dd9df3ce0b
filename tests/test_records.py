"""``KeyInfo``: a stored record parses its metadata when first read, and is then the same
record as one built from the metadata."""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from keyguard import KeyInfo, StoreError
from keyguard.records import UNREAD

T0 = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
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


def built() -> KeyInfo:
    return KeyInfo(**fields(), metadata=METADATA)


@pytest.mark.parametrize("first", ["metadata", *DERIVED])
def test_a_stored_record_reads_as_the_record_built_from_its_metadata(first: str) -> None:
    info = stored(json.dumps(METADATA))

    getattr(info, first)

    expected = built()
    assert info == expected
    assert repr(info) == repr(expected)
    for name in DERIVED:
        assert getattr(info, name) == getattr(expected, name)
    assert info.scopes == ("read", "write")
    assert info.family_id == "key_family"
    assert dict(info.deprecation)["Deprecation"] == f"@{math.floor(T0.timestamp())}"


def test_a_stored_record_has_its_times_without_reading_the_metadata() -> None:
    # Damaged metadata shows that nothing parsed it: the times a check needs are there.
    info = stored("{not json", revoked_at=T0)

    assert info.valid_until == -math.inf
    assert info.last_used_ts == T0.timestamp()
    assert info.status(T0.timestamp()) == "revoked"


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
def test_damaged_stored_metadata_is_a_store_error_on_every_read(text: str, why: str) -> None:
    info = stored(text)

    for name in ("scopes", "metadata", "rate_limits"):  # nothing is left half filled
        with pytest.raises(StoreError, match=f"stored metadata of key 'key_1' is damaged.*{why}"):
            getattr(info, name)


def test_a_record_built_from_invalid_metadata_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="often"):
        KeyInfo(**fields(), metadata={"user_id": "u1", "rate_limits": ["often"]})


def test_stored_metadata_is_read_only_once_read() -> None:
    info = stored(json.dumps(METADATA))

    with pytest.raises(TypeError, match="read-only"):
        info.metadata["permissions"].append("admin")
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.scopes = ("admin",)  # type: ignore[misc]
    assert info.scopes == ("read", "write")


def test_a_stored_record_survives_replace_and_pickle() -> None:
    info = stored(json.dumps(METADATA))

    revoked = dataclasses.replace(info, revoked_at=T0)
    copied = pickle.loads(pickle.dumps(stored(json.dumps(METADATA))))

    assert revoked == dataclasses.replace(built(), revoked_at=T0)
    assert revoked.valid_until == -math.inf and revoked.scopes == ("read", "write")
    assert copied == built() and copied.quota == built().quota


def test_an_unknown_attribute_is_still_an_attribute_error() -> None:
    info = stored(json.dumps(METADATA))

    with pytest.raises(AttributeError, match="no attribute 'scope'"):
        info.scope  # type: ignore[attr-defined]  # noqa: B018
    assert not hasattr(info, "permissions")
