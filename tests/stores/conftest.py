"""The ``store`` fixture: every contract test runs once per store backend."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from keyguard import KeyStore, MemoryStore, SQLiteStore

STORE_NAMES = ["memory", "sqlite"]


def make_store(name: str, tmp_path: Path) -> KeyStore:
    """Build a fresh, empty store of the named kind."""
    if name == "memory":
        return MemoryStore()
    if name == "sqlite":
        return SQLiteStore(tmp_path / "keys.db")
    raise AssertionError(f"unknown store {name!r}")


@pytest.fixture(params=STORE_NAMES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyStore]:
    s = make_store(request.param, tmp_path)
    yield s
    s.close()
