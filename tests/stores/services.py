"""Reaching the Redis and PostgreSQL test servers, and cleaning up after a test.

URLs come from ``KEYGUARD_TEST_REDIS_URL`` and ``KEYGUARD_TEST_POSTGRES_DSN``. A server that
does not answer makes the test skip (or fail in CI) through ``service_unavailable``.
Every test works in its own namespace or table and removes it afterwards.
"""

from __future__ import annotations

import asyncio
import functools
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult, urlsplit

import pytest

from keyguard import (
    APIKeyManager,
    CachedStore,
    KeyStore,
    MemoryStore,
    PostgresStore,
    RedisStore,
    SQLiteStore,
    StoreError,
)
from tests.conftest import service_unavailable
from tests.stores.roundtrips import RoundTripProxy, round_trip_proxy

REDIS_URL = os.environ.get("KEYGUARD_TEST_REDIS_URL") or "redis://127.0.0.1:6379/0"
POSTGRES_DSN = (
    os.environ.get("KEYGUARD_TEST_POSTGRES_DSN") or "postgresql://postgres@127.0.0.1:5432/test"
)


def unique_name(prefix: str) -> str:
    """A name no other test run uses: ``prefix`` plus 12 random hex digits."""
    return f"{prefix}{secrets.token_hex(6)}"


@functools.cache
def _redis_problem() -> str | None:
    try:
        import redis
    except ImportError:
        return "redis-py is not installed (pip install 'keyguard[redis]')"
    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.RedisError as e:
        return f"Redis at {REDIS_URL} is unreachable: {e}"
    finally:
        client.close()
    return None


@functools.cache
def _postgres_problem() -> str | None:
    try:
        import psycopg
        import psycopg_pool  # noqa: F401
    except ImportError:
        return "psycopg 3 is not installed (pip install 'keyguard[postgres]')"
    try:
        psycopg.connect(POSTGRES_DSN, connect_timeout=2).close()
    except psycopg.Error as e:
        return f"PostgreSQL at {POSTGRES_DSN} is unreachable: {e}"
    return None


def require_redis() -> str:
    """The Redis URL, or skip (fail in CI) when the server does not answer."""
    problem = _redis_problem()
    if problem:
        service_unavailable(problem)
    return REDIS_URL


def require_postgres() -> str:
    """The PostgreSQL DSN, or skip (fail in CI) when the server does not answer."""
    problem = _postgres_problem()
    if problem:
        service_unavailable(problem)
    return POSTGRES_DSN


def drop_redis_namespace(namespace: str) -> None:
    """Delete every Redis key under ``namespace:``."""
    import redis

    with redis.Redis.from_url(REDIS_URL) as client:
        keys = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        for start in range(0, len(keys), 500):
            client.delete(*keys[start : start + 500])


def drop_postgres_table(table: str, schema: str = "public") -> None:
    """Drop a test table with its meta and counters tables and functions (and our schema)."""
    """Drop a test table, its meta and usage tables and trigger function (and our schema)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP TABLE IF EXISTS {}, {}, {}, {}, {}").format(
                sql.Identifier(schema, table),
                sql.Identifier(schema, f"{table}_meta"),
                sql.Identifier(schema, f"{table}_counters"),
                sql.Identifier(schema, f"{table}_usage"),
                sql.Identifier(schema, f"{table}_events"),
            )
        )
        conn.execute(
            sql.SQL("DROP FUNCTION IF EXISTS {}()").format(
                sql.Identifier(schema, f"{table}_notify")
            )
        )
        conn.execute(
            sql.SQL("DROP FUNCTION IF EXISTS {}").format(
                sql.Identifier(schema, f"{table}_consume")
            )
        )
        if schema != "public":
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {}").format(sql.Identifier(schema)))


@contextmanager
def redis_namespace() -> Iterator[tuple[str, str]]:
    """``(url, namespace)``: a Redis namespace no one else uses, emptied afterwards."""
    url = require_redis()
    namespace = unique_name("kgtest:")
    try:
        yield url, namespace
    finally:
        drop_redis_namespace(namespace)


@contextmanager
def postgres_table(schema: str = "public") -> Iterator[tuple[str, str]]:
    """``(dsn, table)``: a PostgreSQL table name no one else uses, dropped afterwards."""
    dsn = require_postgres()
    table = unique_name("kgtest_")
    try:
        yield dsn, table
    finally:
        drop_postgres_table(table, schema)


@contextmanager
def redis_store() -> Iterator[RedisStore]:
    """A RedisStore in a namespace of its own."""
    with redis_namespace() as (url, namespace):
        store = RedisStore(url, namespace=namespace)
        try:
            yield store
        finally:
            store.close()


@contextmanager
def postgres_store() -> Iterator[PostgresStore]:
    """A PostgresStore on a table of its own."""
    with postgres_table() as (dsn, table):
        store = PostgresStore(dsn, table=table, max_size=4)
        try:
            yield store
        finally:
            store.close()


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


@contextmanager
def proxied_store(
    store: RedisStore | PostgresStore, **options: Any
) -> Iterator[tuple[RedisStore | PostgresStore, RoundTripProxy]]:
    """A second store on ``store``'s namespace or table whose traffic a proxy counts."""
    if isinstance(store, RedisStore):
        parts = urlsplit(REDIS_URL)
        with round_trip_proxy(parts.hostname or "127.0.0.1", parts.port or 6379) as proxy:
            url = parts._replace(netloc=_netloc(parts, proxy.port)).geturl()
            redis = RedisStore(url, namespace=store.namespace, **options)
            try:
                yield redis, proxy
            finally:
                redis.close()
    else:
        parts = urlsplit(POSTGRES_DSN)
        with round_trip_proxy(parts.hostname or "127.0.0.1", parts.port or 5432) as proxy:
            dsn = parts._replace(netloc=_netloc(parts, proxy.port)).geturl()
            postgres = PostgresStore(
                dsn, table=store.table, schema=store.schema, **{"max_size": 1, **options}
            )
            try:
                yield postgres, proxy
            finally:
                postgres.close()


@contextmanager
def pgbouncer(pool_mode: str = "transaction", pool_size: int = 1) -> Iterator[str]:
    """A PgBouncer of its own in front of the test PostgreSQL; yields the DSN to reach it.

    Skips (fails in CI) without Debian's ``pgbouncer``. With ``pool_size=1`` every client
    runs on one server connection, by turns: the setting that breaks server-side prepared
    statements in transaction mode.
    """
    import psycopg

    executable = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
    if executable is None:
        service_unavailable("PgBouncer is not installed (apt-get install pgbouncer)")
    target = psycopg.conninfo.conninfo_to_dict(require_postgres())
    user, dbname = target.get("user", "postgres"), target.get("dbname", "test")
    server = " ".join(
        f"{name}={target[name]}"
        for name in ("host", "port", "dbname", "user", "password")
        if target.get(name)
    )
    with socket.socket() as probe:  # a free port, for PgBouncer to listen on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    settings = [
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\nunix_socket_dir =",
        f"auth_type = any\npool_mode = {pool_mode}\ndefault_pool_size = {pool_size}",
    ]
    if os.geteuid() == 0:
        settings.append("user = nobody")  # PgBouncer refuses to run as root
    with tempfile.TemporaryDirectory() as directory:
        config = Path(directory) / "pgbouncer.ini"
        config.write_text(
            f"[databases]\n{dbname} = {server}\n[pgbouncer]\n" + "\n".join(settings) + "\n"
        )
        log = Path(directory) / "pgbouncer.log"
        with log.open("wb") as output:
            bouncer = subprocess.Popen([executable, str(config)], stdout=output, stderr=output)
        dsn = f"postgresql://{user}@127.0.0.1:{port}/{dbname}"
        try:
            deadline = time.monotonic() + 10
            while True:
                try:
                    psycopg.connect(dsn, connect_timeout=2).close()
                    break
                except psycopg.OperationalError as e:
                    if bouncer.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"PgBouncer did not start: {log.read_text()}") from e
                    time.sleep(0.05)
            yield dsn
        finally:
            bouncer.terminate()
            bouncer.wait(timeout=10)


def _netloc(parts: SplitResult, port: int) -> str:
    """``parts``' netloc pointing at 127.0.0.1:``port`` instead, credentials kept."""
    credentials = parts.netloc.rpartition("@")[0]
    return f"{credentials}@127.0.0.1:{port}" if credentials else f"127.0.0.1:{port}"


def check_a_silent_server(store: RedisStore | PostgresStore, key: str, **options: Any) -> None:
    """Through a proxy that goes silent, a check is a StoreError within the store's 1 s
    timeout (sync and async), and checks succeed again once the server answers."""
    with proxied_store(store, **options) as (proxied, proxy):
        manager = APIKeyManager(proxied, last_used_resolution=None)
        assert manager.validate_key(key)

        proxy.silent = True  # connected, but the server never answers again
        started = time.monotonic()
        with pytest.raises(StoreError):
            manager.verify(key)
        with pytest.raises(StoreError):
            asyncio.run(manager.averify(key))
        assert time.monotonic() - started < 30  # bounded (1 s each), not forever

        proxy.silent = False
        # A pool replaces the closed connection, after its reconnect back-off.
        deadline = time.monotonic() + 60
        while True:
            try:
                assert manager.validate_key(key)
                return
            except StoreError:
                assert time.monotonic() < deadline, "the store never recovered"
                time.sleep(0.2)
