"""Shared test helpers: services that may be missing skip, unless CI requires them."""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from typing import NoReturn

import pytest
from hypothesis import settings

from keyguard.keys import redact_keys

# Fuzzed properties: a modest run by default, many examples under `make fuzz`; no deadline,
# since a loaded CI machine is slow.
settings.register_profile("default", max_examples=100, deadline=None)
settings.register_profile("fuzz", max_examples=20_000, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

#: Set by .ci/run: a test that needs PostgreSQL or Redis fails instead of skipping.
REQUIRE_SERVICES = os.environ.get("KEYGUARD_REQUIRE_SERVICES") == "1"


def service_unavailable(reason: str) -> NoReturn:
    """Skip the current test because a server is unreachable, or fail in CI."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (KEYGUARD_REQUIRE_SERVICES=1 forbids skipping)")
    pytest.skip(reason)


# A key's body: exactly 32 lowercase hex (a 64-hex digest is not one).
_KEY_BODY = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")


class _RecordKeeper(logging.Handler):
    """Keeps every record logged during a test, rendered as a handler would write it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.texts: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.texts.append(logging.Formatter().format(record))


@pytest.fixture(autouse=True)
def no_key_is_ever_logged() -> Iterator[None]:
    """Fail any test during which a log record, traceback included, holds a whole key."""
    keeper = _RecordKeeper()
    root = logging.getLogger()
    root.addHandler(keeper)
    try:
        yield
    finally:
        root.removeHandler(keeper)
    leaked = [text for text in keeper.texts if _KEY_BODY.search(text)]
    assert leaked == [], f"a log record holds a whole key (masked here): {redact_keys(leaked[0])}"
