"""Reaching the Redis and PostgreSQL test servers, and cleaning up after a test.

URLs come from ``KEYGUARD_TEST_REDIS_URL`` and ``KEYGUARD_TEST_POSTGRES_DSN``. A server that
does not answer makes the test skip (or fail in CI) through ``service_unavailable``.
Every test works in its own namespace or table and removes it afterwards.
"""

from __future__ import annotations

import functools
import os
import secrets

from tests.conftest import service_unavailable

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
    """Drop a test table with its meta table and trigger function (and the schema if ours)."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(POSTGRES_DSN, autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP TABLE IF EXISTS {}, {}").format(
                sql.Identifier(schema, table), sql.Identifier(schema, f"{table}_meta")
            )
        )
        conn.execute(
            sql.SQL("DROP FUNCTION IF EXISTS {}()").format(
                sql.Identifier(schema, f"{table}_notify")
            )
        )
        if schema != "public":
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {}").format(sql.Identifier(schema)))
