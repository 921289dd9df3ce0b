"""The ``store`` fixture: every contract test runs once per store backend.

Redis and PostgreSQL stores get their own namespace or table, removed afterwards; when a
server does not answer, their tests skip (or fail in CI, see ``tests.conftest``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from keyguard import CachedStore, KeyStore, MemoryStore, PostgresStore, RedisStore, SQLiteStore
from tests.stores.services import (
    drop_postgres_table,
    drop_redis_namespace,
    require_postgres,
    require_redis,
    unique_name,
)

STORE_NAMES = ["memory", "sqlite", "redis", "postgres", "cached-sqlite", "cached-postgres"]


@contextmanager
def redis_store() -> Iterator[RedisStore]:
    """A RedisStore in a namespace of its own, emptied afterwards."""
    url = require_redis()
    namespace = unique_name("kgtest:")
    store = RedisStore(url, namespace=namespace)
    try:
        yield store
    finally:
        store.close()
        drop_redis_namespace(namespace)


@contextmanager
def postgres_store() -> Iterator[PostgresStore]:
    """A PostgresStore on a table of its own, dropped afterwards."""
    dsn = require_postgres()
    table = unique_name("kgtest_")
    try:
        store = PostgresStore(dsn, table=table, max_size=4)
        try:
            yield store
        finally:
            store.close()
    finally:
        drop_postgres_table(table)


@contextmanager
def open_store(name: str, tmp_path: Path) -> Iterator[KeyStore]:
    """A fresh, empty store of the named kind, cleaned up on exit."""
    if name.startswith("cached-"):
        with open_store(name.removeprefix("cached-"), tmp_path) as inner:
            cached = CachedStore(inner, ttl=60)
            try:
                yield cached
            finally:
                cached.close()
    elif name == "memory":
        yield MemoryStore()
    elif name == "sqlite":
        store: KeyStore = SQLiteStore(tmp_path / "keys.db")
        try:
            yield store
        finally:
            store.close()
    elif name == "redis":
        with redis_store() as redis:
            yield redis
    elif name == "postgres":
        with postgres_store() as postgres:
            yield postgres
    else:
        raise AssertionError(f"unknown store {name!r}")


@pytest.fixture(params=STORE_NAMES)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[KeyStore]:
    with open_store(request.param, tmp_path) as s:
        yield s
