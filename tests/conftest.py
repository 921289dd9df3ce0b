"""Shared test helpers: services that may be missing skip, unless CI requires them."""

from __future__ import annotations

import os

import pytest

#: Set by .ci/run: a test that needs PostgreSQL or Redis fails instead of skipping.
REQUIRE_SERVICES = os.environ.get("KEYGUARD_REQUIRE_SERVICES") == "1"


def service_unavailable(reason: str) -> None:
    """Skip the current test because a server is unreachable, or fail in CI."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (KEYGUARD_REQUIRE_SERVICES=1 forbids skipping)")
    pytest.skip(reason)
