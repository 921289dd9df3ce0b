"""The ``store`` fixture: every contract test runs once per store backend.

Redis and PostgreSQL stores get their own namespace or table, removed afterwards; when a
server does not answer, their tests skip (or fail in CI, see ``tests.conftest``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from keyguard import KeyStore
from tests.stores.services import open_store

STORE_NAMES = ["memory", "sqlite", "redis", "postgres", "cached-sqlite", "cached-postgres"]


@pytest.fixture(params=STORE_NAMES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyStore]:
    with open_store(request.param, tmp_path) as s:
        yield s
