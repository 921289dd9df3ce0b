"""The suite-wide no-key check (``tests/leaks.py``) finds what it promises to find.

Each test here makes keyguard-shaped output hold a key on purpose, sees the detector
record it, then clears the record so that the test itself passes.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

import pytest

from keyguard import KeyInfo, StoreError, digest_key, generate_key, limits
from keyguard.limits import parse_quota
from keyguard.problems import Problem
from tests.conftest import LEAKS
from tests.leaks import raised_by_keyguard


def test_only_an_issued_key_counts_wherever_it_stands() -> None:
    key = generate_key()
    body = key[-32:]

    assert LEAKS.holds_key(f"\x1b[2J{key}\x00")
    assert LEAKS.holds_key(f'"{key}é"')
    assert LEAKS.holds_key(f"abc{body}def0")  # glued to other hex
    assert not LEAKS.holds_key(digest_key(key))  # 64 hex that hide no key
    assert not LEAKS.holds_key(uuid.uuid4().hex)  # 32 hex, but never issued
    assert not LEAKS.holds_key(key[:-1])


def test_a_refusal_body_with_a_key_is_found() -> None:
    key = generate_key()

    Problem(400, "invalid_request", f"bad credential {key}")

    found = LEAKS.reset()
    assert [where.split(":")[0] for where in found] == ["invalid_request response body"]
    assert key not in found[0]  # shown masked


def test_a_keyguard_error_message_with_a_key_is_found() -> None:
    key = generate_key()

    StoreError(f"could not store {key}")

    assert [where.split(":")[0] for where in LEAKS.reset()] == ["StoreError message"]


def test_a_repr_with_a_key_is_found() -> None:
    key = generate_key()
    info = KeyInfo("key_0", "sk_", "sk_…", key, {"user_id": key}, datetime.now(timezone.utc))

    repr(info)

    assert [where.split(":")[0] for where in LEAKS.reset()] == ["repr of a KeyInfo"]


def test_an_exception_keyguard_raises_is_checked_but_not_a_tests_own() -> None:
    key = generate_key()

    with pytest.raises(ValueError) as exc_info:
        parse_quota(key)  # keyguard masks a key pasted into the wrong field
    assert raised_by_keyguard(exc_info.tb)
    assert LEAKS.reset() == []

    # A keyguard function that did echo its input (compiled as if it were keyguard's code).
    namespace: dict[str, Any] = {}
    exec(
        compile("def echo(text):\n    raise ValueError(text)\n", limits.__file__, "exec"),
        namespace,
    )
    with pytest.raises(ValueError) as exc_info:
        namespace["echo"](key)
    assert raised_by_keyguard(exc_info.tb)
    assert [where.split(":")[0] for where in LEAKS.reset()] == ["ValueError raised by keyguard"]

    with pytest.raises(ValueError) as exc_info:
        raise ValueError(key)
    assert not raised_by_keyguard(exc_info.tb)
    assert LEAKS.reset() == []
