"""The DigestSource contract (``count_keys``, ``iter_digests``) on every store that has it."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyguard import KeyStore, RedisStore
from keyguard.stores.base import DigestSource
from tests.stores.services import open_store, redis_store
from tests.stores.test_contract import T0, record


@pytest.fixture(params=["memory", "sqlite", "redis", "postgres"])
def source(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyStore]:
    with open_store(request.param, tmp_path) as store:
        assert isinstance(store, DigestSource)
        yield store


def walk(store: KeyStore, page_size: int = 10_000) -> list[str]:
    assert isinstance(store, DigestSource)
    return list(store.iter_digests(page_size))


def test_an_empty_store_has_no_digests(source: KeyStore) -> None:
    assert isinstance(source, DigestSource)
    assert source.count_keys() == 0
    assert walk(source) == []


@pytest.mark.parametrize("page_size", [1, 7, 25, 10_000])
def test_every_digest_once_whatever_the_page_size(source: KeyStore, page_size: int) -> None:
    records = [record(f"u{i % 3}") for i in range(25)]
    for info in records:
        source.add(info)
    source.revoke(records[0].digest, T0)  # revoked and expired records are still records
    source.set_expiry(records[1].digest, T0)

    listed = walk(source, page_size)

    assert isinstance(source, DigestSource)
    assert source.count_keys() == 25
    assert sorted(set(listed)) == sorted(info.digest for info in records)
    if not isinstance(source, RedisStore):  # HSCAN may repeat one; the SQL stores never do
        assert len(listed) == 25


def test_a_walk_yields_every_record_that_exists_throughout_it(source: KeyStore) -> None:
    before = [record() for _ in range(30)]
    for info in before:
        source.add(info)
    assert isinstance(source, DigestSource)

    seen: list[str] = []
    for n, digest in enumerate(source.iter_digests(page_size=4)):
        seen.append(digest)
        if n % 3 == 0:  # keys added mid-walk may or may not be yielded
            source.add(record())

    assert {info.digest for info in before} <= set(seen)


@pytest.mark.parametrize("page_size", [0, -3, 2.5, True, "10"])
def test_a_page_size_must_be_a_positive_int(source: KeyStore, page_size: object) -> None:
    assert isinstance(source, DigestSource)
    with pytest.raises(ValueError, match="page_size must be a positive int"):
        next(source.iter_digests(page_size))  # type: ignore[arg-type]


def test_redis_lists_only_its_own_namespace() -> None:
    with redis_store() as ours, redis_store() as theirs:
        mine = record()
        ours.add(mine)
        theirs.add(dataclasses.replace(record(), user_id="other"))

        assert list(ours.iter_digests()) == [mine.digest]
        assert ours.count_keys() == 1
