"""BloomFilter: never a false negative, false positives at the rate it is sized for, keyed."""

from __future__ import annotations

import secrets

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyguard.stores._filter import BloomFilter


def digests(n: int) -> list[str]:
    return [secrets.token_hex(32) for _ in range(n)]


@given(st.lists(st.text(max_size=80), max_size=300), st.integers(1, 400))
def test_every_digest_added_is_held(added: list[str], capacity: int) -> None:
    bloom = BloomFilter(capacity)  # also past its capacity
    for digest in added:
        bloom.add(digest)

    assert all(digest in bloom for digest in added)
    assert bloom.count <= len(set(added))


def test_no_false_negative_among_many_real_digests() -> None:
    bloom = BloomFilter(20_000)
    held = digests(20_000)

    # Filling up, it wrongly holds ~0.25 % of the newcomers already: those are not counted.
    assert bloom.update(iter(held)) == bloom.count >= 19_800

    assert all(digest in bloom for digest in held)
    assert bloom.update(held[:100]) == 0  # all held already


@pytest.mark.parametrize(
    ("fill", "bound"),
    [
        # Expected 1.0 % and 0.025 %; the bounds leave room for chance, not for a bug.
        pytest.param(1.0, 0.015, id="full: 1 %"),
        pytest.param(0.5, 0.001, id="half full, as loaded: 0.025 %"),
    ],
)
def test_false_positives_at_the_sizing(fill: float, bound: float) -> None:
    bloom = BloomFilter(20_000)
    for digest in digests(int(20_000 * fill)):
        bloom.add(digest)

    probes = digests(40_000)
    rate = sum(digest in bloom for digest in probes) / len(probes)

    assert rate <= bound, f"{rate:.4%} false positives"


def test_two_filters_of_the_same_digests_let_through_different_strangers() -> None:
    held = digests(20_000)
    first, second = BloomFilter(20_000), BloomFilter(20_000)
    for digest in held:
        first.add(digest)
        second.add(digest)

    # The strangers one filter lets through (~1 %, about 400), tried on the other.
    passed = [digest for digest in digests(40_000) if digest in first]
    again = sum(digest in second for digest in passed)

    assert len(passed) >= 100
    assert again <= len(passed) // 10  # unkeyed, every one would pass again


def test_size_and_count() -> None:
    bloom = BloomFilter(1000)
    assert bloom.nbytes == 1199  # 9,586 bits: 9.6 bits a digest for 1 % at capacity
    assert (bloom.count, bloom.full) == (0, False)

    assert bloom.add("a" * 64) is True
    assert bloom.add("a" * 64) is False  # already held: not counted twice
    for digest in digests(1000):
        bloom.add(digest)

    assert 995 <= bloom.count <= 1001  # a digest that was a false positive is not counted
    assert bloom.full is (bloom.count > 1000)
    assert "1000 digests" in repr(bloom) and "a" * 64 not in repr(bloom)


def test_anything_but_a_string_is_never_held() -> None:
    bloom = BloomFilter(10)
    bloom.add("1")

    assert 1 not in bloom
    assert b"1" not in bloom


@pytest.mark.parametrize("capacity", [0, -1, 1.5, True, "10"])
def test_a_capacity_must_be_a_positive_int(capacity: object) -> None:
    with pytest.raises(ValueError, match="capacity must be a positive int"):
        BloomFilter(capacity)  # type: ignore[arg-type]
