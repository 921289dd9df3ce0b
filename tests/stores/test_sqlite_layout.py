"""The narrow row of ``keyguard_records``: every record comes back exactly, whatever it holds.

The contract tests cover records as the manager writes them; these cover the shapes the
layout stores differently (digests that are not lowercase hex, prefixes a hint does not
show, metadata whose user_id is not the record's) and what is really in the file.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyguard import APIKeyManager, KeyInfo, SQLiteStore, StoreError
from keyguard.stores import _sqlite_layout as sqlite_layout
from keyguard.stores import sqlite as sqlite_store
from keyguard.stores._sqlite_layout import pack_metadata, unpack_metadata

T0 = datetime(2024, 5, 17, 8, 30, 15, 123456, tzinfo=timezone.utc)
SHA256 = hashlib.sha256(b"a key").hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    store = SQLiteStore(tmp_path / "keys.db")
    try:
        yield store
    finally:
        store.close()


def record(n: int = 0, **changes: Any) -> KeyInfo:
    info = KeyInfo(
        key_id=f"key_{n:016x}",
        prefix="sk_",
        hint="sk_…abcd",
        user_id="u1",
        metadata={"user_id": "u1", "permissions": ["read"]},
        created_at=T0 + timedelta(seconds=n),
        digest=hashlib.sha256(f"key {n}".encode()).hexdigest(),
    )
    return dataclasses.replace(info, **changes)


def stored_row(store: SQLiteStore, key_id: str) -> tuple[Any, ...]:
    with closing(sqlite3.connect(store.path)) as conn:
        row: tuple[Any, ...] = conn.execute(
            "SELECT digest, prefix, metadata FROM keyguard_records WHERE key_id = ?", (key_id,)
        ).fetchone()
    return row


# -- digests -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("digest", "kept_as"),
    [
        pytest.param(SHA256, bytes.fromhex(SHA256), id="sha256 hex: 32 bytes"),
        pytest.param(hashlib.sha512(b"k").hexdigest(), "bytes", id="sha512 hex: 64 bytes"),
        pytest.param("ab", bytes.fromhex("ab"), id="short hex"),
        pytest.param(SHA256.upper(), "text", id="capital hex"),
        pytest.param(SHA256[:10] + "A" + SHA256[11:], "text", id="one capital"),
        pytest.param("ab cd", "text", id="hex with a space"),
        pytest.param("abc", "text", id="odd length"),
        pytest.param("", b"", id="empty"),
        pytest.param("sha1$" + "0" * 40, "text", id="a tagged digest"),
        pytest.param("dïgest … 🔑", "text", id="not ASCII"),
    ],
)
def test_any_digest_round_trips_and_is_found_by_every_method(
    store: SQLiteStore, digest: str, kept_as: bytes | str
) -> None:
    info = record(digest=digest)
    assert store.add(info) is True

    assert store.get(digest) == info
    assert store.get_by_id(info.key_id) == info
    assert store.list_keys() == [info]
    kept = stored_row(store, info.key_id)[0]
    if kept_as == "text":
        assert kept == digest
    elif kept_as == "bytes":
        assert kept == bytes.fromhex(digest)
    else:
        assert kept == kept_as

    store.touch(digest, T0)
    changed = dataclasses.replace(info, metadata={"user_id": "u1", "x": 1})
    assert store.update(changed, info) is True
    assert store.set_expiry(digest, T0 + timedelta(days=1)) is True
    assert store.revoke(digest, T0) is True
    assert store.revoke(digest, T0) is False
    assert store.get(digest) == dataclasses.replace(
        changed, last_used_at=T0, expires_at=T0 + timedelta(days=1), revoked_at=T0
    )


def test_digests_that_differ_only_in_form_are_different_records(store: SQLiteStore) -> None:
    # bytes.fromhex reads all three as the same two bytes: none may stand in for another.
    forms = ["abcd", "ABCD", "ab cd", "AbCd"]
    infos = [record(n, digest=digest) for n, digest in enumerate(forms)]
    assert all(store.add(info) for info in infos)

    for info in infos:
        assert store.get(info.digest) == info
    assert store.get("Abcd") is None
    assert store.revoke("ABCD", T0) is True
    assert [store.get(d).revoked_at for d in forms] == [None, T0, None, None]  # type: ignore[union-attr]


def test_a_collision_of_digests_is_refused_as_before(store: SQLiteStore) -> None:
    first = record(0)
    assert store.add(first) is True
    assert store.add(record(1, digest=first.digest)) is False
    assert store.add(record(2, key_id=first.key_id)) is False
    assert store.list_keys() == [first]


def test_two_digests_with_one_row_id_are_never_mistaken_for_each_other(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A 2**-64 chance per pair of digests, forced here: the second is refused like a
    # collision of digests, and neither is ever answered for the other.
    monkeypatch.setattr(sqlite_store, "row_id", lambda digest: 7)
    monkeypatch.setattr(sqlite_layout, "row_id", lambda digest: 7)
    first, second = record(0), record(1)
    assert store.add(first) is True

    assert store.add(second) is False
    assert store.get(second.digest) is None
    assert store.revoke(second.digest, T0) is False
    assert store.get(first.digest) == first


# -- prefix, hint and metadata ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("prefix", "hint", "kept"),
    [
        pytest.param("sk_", "sk_…abcd", None, id="shown by the hint"),
        pytest.param("sk_live_", "sk_live_…abcd", None, id="a long prefix"),
        pytest.param("AbCd1234", "AbCd1234.…", "AbCd1234", id="imported: another mark"),
        pytest.param("pk_", "a hint of its own", "pk_", id="not in the hint"),
        pytest.param("sk_", "sk_", "sk_", id="hint without the mark"),
        pytest.param("p…", "p……abcd", "p…", id="the mark in the prefix"),
        pytest.param("", "…abcd", None, id="empty prefix"),
    ],
)
def test_prefix_is_kept_only_when_the_hint_does_not_show_it(
    store: SQLiteStore, prefix: str, hint: str, kept: str | None
) -> None:
    info = record(prefix=prefix, hint=hint)
    store.add(info)

    assert store.get(info.digest) == info
    assert stored_row(store, info.key_id)[1] == kept


@pytest.mark.parametrize(
    ("user_id", "metadata", "kept"),
    [
        pytest.param("u1", {"user_id": "u1", "a": 1}, '"a":1', id="the user_id first"),
        pytest.param("u1", {"user_id": "u1"}, "", id="only the user_id"),
        pytest.param("u1", {"a": 1, "user_id": "u1"}, '{"a":1,"user_id":"u1"}', id="not first"),
        pytest.param("u1", {"user_id": "u2"}, '{"user_id":"u2"}', id="another user"),
        pytest.param("u1", {}, "{}", id="no user_id"),
        pytest.param("u1", {"user_id": "u1", "o": {}}, '"o":{}', id="an object next"),
        pytest.param(
            'ü "q" \\', {"user_id": 'ü "q" \\', "n": "山"}, '"n":"山"', id="escapes and UTF-8"
        ),
    ],
)
def test_metadata_drops_a_leading_user_id_the_row_already_holds(
    store: SQLiteStore, user_id: str, metadata: dict[str, Any], kept: str
) -> None:
    info = record(user_id=user_id, metadata=metadata)
    store.add(info)

    back = store.get(info.digest)
    assert back == info
    assert back is not None and json.dumps(back.metadata) == json.dumps(metadata)
    assert stored_row(store, info.key_id)[2] == kept


def test_an_update_naming_another_user_keeps_the_metadata_whole(store: SQLiteStore) -> None:
    info = record()
    store.add(info)
    other = dataclasses.replace(info, user_id="u2", metadata={"user_id": "u2", "b": 2})

    assert store.update(other, info) is True

    # update changes metadata and expiry only: the record stays u1's
    assert store.get(info.digest) == dataclasses.replace(info, metadata=other.metadata)
    assert stored_row(store, info.key_id)[2] == '{"user_id":"u2","b":2}'


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(
    user_id=st.text(min_size=1),
    before=st.dictionaries(st.text(), JSON, max_size=3),
    after=st.dictionaries(st.text(), JSON, max_size=3),
    ensure_ascii=st.booleans(),
)
def test_packed_metadata_reads_back_as_the_same_json(
    user_id: str, before: dict[str, Any], after: dict[str, Any], ensure_ascii: bool
) -> None:
    for metadata in ({**before, "user_id": user_id, **after}, {"user_id": user_id, **after}):
        text = json.dumps(metadata, separators=(",", ":"), ensure_ascii=ensure_ascii)
        packed = pack_metadata(text, user_id, ensure_ascii=ensure_ascii)
        assert isinstance(packed, str)
        back = unpack_metadata(packed, user_id)
        assert json.loads(back) == json.loads(text)
        assert list(json.loads(back)) == list(json.loads(text))


@pytest.mark.parametrize("text", ['{"user_id":"u1",}', '{"user_id":"u1",{}', '{"user_id":"u1"'])
def test_damaged_metadata_is_kept_as_it_was(text: str) -> None:
    packed = pack_metadata(text, "u1")
    assert isinstance(packed, str)
    assert unpack_metadata(packed, "u1") == text


def test_metadata_that_is_not_an_object_is_kept_as_bytes_that_read_as_damaged() -> None:
    assert pack_metadata("not json", "u1") == b"not json"
    with pytest.raises(TypeError):
        unpack_metadata(b"not json", "u1")  # type: ignore[arg-type]


# -- times ---------------------------------------------------------------------------------

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
MICROSECOND = timedelta(microseconds=1)
#: How far from the epoch a float of seconds holds every microsecond (1697 to 2242).
EXACT = timedelta(seconds=2**33)


def micros(at: datetime) -> int:
    return (at - EPOCH) // MICROSECOND


def read_as_before(seconds: float) -> int:
    """The microseconds earlier versions read in a time column, through fromtimestamp."""
    return micros(datetime.fromtimestamp(seconds, timezone.utc))


@pytest.mark.parametrize(
    "at",
    [
        EPOCH,
        EPOCH - MICROSECOND,
        EPOCH + MICROSECOND,
        T0,
        datetime(1969, 12, 31, 23, 59, 59, 500000, tzinfo=timezone.utc),
        datetime(1900, 1, 1, 0, 0, 0, 999999, tzinfo=timezone.utc),
        datetime(2038, 1, 19, 3, 14, 8, 1, tzinfo=timezone.utc),
        # round(seconds * 10**6) reads both a microsecond off (see the next test)
        EPOCH + timedelta(seconds=2**32, microseconds=7),
        EPOCH - timedelta(seconds=2**32, microseconds=7),
        EPOCH + EXACT - MICROSECOND,
        EPOCH - EXACT + MICROSECOND,
        *(EPOCH + MICROSECOND * random.Random(n).randrange(-2**33 * 10**6, 2**33 * 10**6)
          for n in range(20)),
    ],
)  # fmt: skip
def test_a_stored_time_reads_back_to_the_microsecond(store: SQLiteStore, at: datetime) -> None:
    info = record(created_at=at, expires_at=at, revoked_at=at, last_used_at=at)
    assert store.add(info)

    assert sqlite_layout.time_us(at.timestamp()) == micros(at)
    back = store.get(info.digest)
    assert back == info
    assert back is not None and back.created_at == back.last_used_at == at
    assert back.last_used_ts == at.timestamp()
    assert store.get_by_id(info.key_id) == store.list_keys()[0] == info


def test_rounding_the_product_once_would_read_times_past_2106_wrong() -> None:
    # Why time_us splits off the whole seconds before rounding: timestamp() wrote this
    # time, and round(seconds * 10**6) reads it a microsecond early.
    at = datetime(2106, 2, 7, 6, 28, 16, 7, tzinfo=timezone.utc)
    assert round(at.timestamp() * 10**6) == micros(at) - 1
    assert sqlite_layout.time_us(at.timestamp()) == micros(at)


@pytest.mark.parametrize(
    "seconds",
    [
        "0.0000005",
        "-0.0000005",
        "0.0000025",
        "1.0000005",
        "1.0000015",
        "-1.0000005",
        "-1.0000015",
        "1700000000.0000005",
        "1700000001.0000015",
        "154112043.3834525",
        "-1778343078.4384855",
        "4294967296.0000075",
        "-4294967296.0000075",
        "9999999999.9999995",
        "-62135596799.9999995",
    ],
)
def test_a_hand_written_time_reads_as_it_always_has(store: SQLiteStore, seconds: str) -> None:
    # Half-microsecond fractions, which no float holds exactly: read as fromtimestamp did.
    info = record()
    assert store.add(info)
    with closing(sqlite3.connect(store.path, isolation_level=None)) as conn:
        conn.execute("UPDATE keyguard_records SET expires_at = ?", (float(seconds),))

    expected = datetime.fromtimestamp(float(seconds), timezone.utc)
    assert sqlite_layout.time_us(float(seconds)) == read_as_before(float(seconds))
    back = store.get(info.digest)
    assert back is not None and back.expires_at == expected
    assert back.valid_until == expected.timestamp()


@given(st.floats(min_value=-62135596800.0, max_value=253402300799.0))
def test_every_stored_time_reads_as_it_always_has(seconds: float) -> None:
    assert sqlite_layout.time_us(seconds) == read_as_before(seconds)


@pytest.mark.parametrize("column", ["created_at", "expires_at", "revoked_at", "last_used_at"])
@pytest.mark.parametrize(
    "value",
    [
        pytest.param(253402300800.0, id="year 10000"),
        pytest.param(-62135596801.0, id="year 0"),
        pytest.param(1e300, id="1e300"),
        pytest.param(-1e300, id="-1e300"),
        pytest.param(float("inf"), id="inf"),
        pytest.param(float("-inf"), id="-inf"),
        pytest.param("yesterday", id="text"),
        pytest.param(b"\x00\x01", id="bytes"),
    ],
)
def test_a_damaged_stored_time_is_a_store_error(
    store: SQLiteStore, column: str, value: object
) -> None:
    # Never an OverflowError or a ValueError, which a server would answer with a 500.
    info = record()
    assert store.add(info)
    with closing(sqlite3.connect(store.path, isolation_level=None)) as conn:
        conn.execute(f"UPDATE keyguard_records SET {column} = ?", (value,))

    for read in (
        lambda: store.get(info.digest),
        lambda: store.get_by_id(info.key_id),
        store.list_keys,
    ):
        with pytest.raises(StoreError, match=info.key_id):
            read()


# -- hash schemes --------------------------------------------------------------------------


def test_hash_schemes_are_shared_through_a_small_table(tmp_path: Path) -> None:
    path = tmp_path / "keys.db"
    plain, peppered = SQLiteStore(path), SQLiteStore(path)
    try:
        key = APIKeyManager(plain).generate_key(user_id="u1")
        pepper_key = APIKeyManager(peppered, pepper="p" * 32).generate_key(user_id="u1")
        # Each store learns the scheme the other added when it first meets it.
        assert APIKeyManager(peppered).validate_key(key)
        assert APIKeyManager(plain, pepper="p" * 32).validate_key(pepper_key)
        schemes = {info.hash_scheme for info in plain.list_keys()}
    finally:
        plain.close()
        peppered.close()

    assert schemes == {"sha256", APIKeyManager(pepper="p" * 32).hash_scheme}
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM keyguard_hash_schemes").fetchone() == (2,)
        assert conn.execute("SELECT DISTINCT typeof(scheme) FROM keyguard_records").fetchall() == [
            ("integer",)
        ]


def test_the_parts_bench_sqlite_times_are_the_read_path(store: SQLiteStore) -> None:
    """bench_sqlite.py times the row id, the ``_GET`` statement and the decode behind the
    cache alone: together they must be what ``get`` does."""
    info = record()
    assert store.add(info)
    row = store._conn().execute(sqlite_store._GET, (sqlite_layout.row_id(info.digest),))
    assert store._decode.__wrapped__(row.fetchone()) == store.get(info.digest) == info
