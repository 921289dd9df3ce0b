"""``store_from_url``: pick and configure a store from one URL (``KEYGUARD_STORE``).

The Redis and PostgreSQL stores are imported only when their URL is used, so their
drivers stay optional. Any URL may add ``cache_ttl=<seconds>`` (and optionally
``cache_max_entries=<n>``, ``cache_push=0``, ``cache_flood_filter=0``) to wrap the store
in a :class:`CachedStore`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any
from urllib.parse import SplitResult, parse_qsl, unquote, urlencode, urlsplit

from ._redact import redact_url
from .base import KeyStore
from .memory import MemoryStore
from .sqlite import SQLiteStore

__all__ = ["DEFAULT_STORE_URL", "STORE_URL_ENV", "store_from_url"]

STORE_URL_ENV = "KEYGUARD_STORE"
DEFAULT_STORE_URL = "sqlite:///keyguard.db"

_Factory = Callable[[SplitResult, dict[str, str], bool], KeyStore]


def _memory(url: SplitResult, params: dict[str, str], create_schema: bool) -> KeyStore:
    _no_params(url, params)
    if url.netloc or url.path not in ("", "/"):
        # The URL is not echoed: its host part may carry a password.
        raise ValueError("memory store URL takes no host or path: use memory://")
    return MemoryStore()


def _sqlite(url: SplitResult, params: dict[str, str], create_schema: bool) -> KeyStore:
    _no_params(url, params)
    if url.netloc:
        # Only the host name is echoed: the rest of the host part may carry a password.
        host = f" {url.hostname!r}" if url.hostname else ""
        raise ValueError(
            f"SQLite URL names a host{host}: use sqlite:///relative.db"
            " or sqlite:////absolute/path.db"
        )
    if url.path and not url.path.startswith("/"):
        raise ValueError(
            "SQLite URL needs three slashes: sqlite:///relative.db or sqlite:////absolute/path.db"
        )
    path = unquote(url.path[1:])
    if not path:
        raise ValueError("SQLite URL needs a file path: sqlite:///keyguard.db")
    return SQLiteStore(path, create_schema=create_schema)


def _no_params(url: SplitResult, params: dict[str, str]) -> None:
    if params:
        names = ", ".join(sorted(params))
        raise ValueError(f"unknown parameter(s) {names} for a {url.scheme}:// store URL")


def _redis(url: SplitResult, params: dict[str, str], create_schema: bool) -> KeyStore:
    from .redis import CLIENT_URL_PARAMETERS, DEFAULT_NAMESPACE, RedisStore

    namespace = params.pop("namespace", DEFAULT_NAMESPACE)
    _only(url, params, CLIENT_URL_PARAMETERS, ours=("namespace",))
    client_url = url._replace(query=urlencode(params)).geturl()
    return RedisStore(client_url, namespace=namespace)


def _postgres(url: SplitResult, params: dict[str, str], create_schema: bool) -> KeyStore:
    from .postgres import DEFAULT_SCHEMA, DEFAULT_TABLE, PostgresStore

    options: dict[str, Any] = {
        "table": params.pop("table", DEFAULT_TABLE),
        "schema": params.pop("schema", DEFAULT_SCHEMA),
    }
    for name in ("min_size", "max_size"):
        if name in params:
            options[name] = _number(name, params.pop(name), int)
    if "prepare" in params:
        options["prepare"] = _switch("prepare", params.pop("prepare"))
    # The rest is for libpq, which knows its own parameters (sslmode, connect_timeout…).
    dsn = url._replace(query=urlencode(params)).geturl()
    return PostgresStore(dsn, create_schema=create_schema, **options)


def _only(
    url: SplitResult, params: dict[str, str], allowed: frozenset[str], ours: tuple[str, ...]
) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        known = ", ".join(sorted({*allowed, *ours, *_CACHE_PARAMETERS}))
        raise ValueError(
            f"unknown parameter(s) {', '.join(unknown)} for a {url.scheme}:// store URL;"
            f" known: {known}"
        )


def _number(name: str, value: str, kind: type[Any]) -> Any:
    try:
        number = kind(value)
    except ValueError:
        number = None
    if number is None or not number > 0 or number != number or number == float("inf"):
        raise ValueError(
            f"store URL parameter {name} must be a positive {kind.__name__}, got {value!r}"
        )
    return number


def _switch(name: str, value: str) -> bool:
    if value not in _SWITCH:
        raise ValueError(f"store URL parameter {name} must be on or off, got {value!r}")
    return _SWITCH[value]


_SWITCH = {"on": True, "off": False, "1": True, "0": False}
_CACHE_PARAMETERS = ("cache_ttl", "cache_max_entries", "cache_push", "cache_flood_filter")
#: The cache's on/off switches: URL parameter -> CachedStore option.
_CACHE_SWITCHES = {"cache_push": "push", "cache_flood_filter": "flood_filter"}


def _cache_options(url: SplitResult, params: dict[str, str]) -> dict[str, Any] | None:
    """Take the ``cache_*`` parameters out of ``params``; None if no cache is asked for."""
    found = {name: params.pop(name) for name in _CACHE_PARAMETERS if name in params}
    if not found:
        return None
    if "cache_ttl" not in found:
        raise ValueError(f"{', '.join(sorted(found))} need cache_ttl=<seconds> in the store URL")
    options: dict[str, Any] = {"ttl": _number("cache_ttl", found["cache_ttl"], float)}
    if "cache_max_entries" in found:
        options["max_entries"] = _number("cache_max_entries", found["cache_max_entries"], int)
    for name, option in _CACHE_SWITCHES.items():
        if name in found:
            if found[name] not in ("0", "1"):
                raise ValueError(f"store URL parameter {name} must be 0 or 1, got {found[name]!r}")
            options[option] = found[name] == "1"
    return options


_FACTORIES: dict[str, _Factory] = {
    "memory": _memory,
    "sqlite": _sqlite,
    "redis": _redis,
    "rediss": _redis,
    "postgresql": _postgres,
    "postgres": _postgres,
}


def store_from_url(url: str | None = None, *, create_schema: bool = True) -> KeyStore:
    """Return the store named by ``url`` (default: ``$KEYGUARD_STORE``, else SQLite).

    Schemes: ``memory://``, ``sqlite:///relative.db``, ``sqlite:////absolute/path.db``,
    ``redis://host:6379/0?namespace=myapp`` (``rediss://`` for TLS) and
    ``postgresql://user@host:5432/db?table=keyguard_keys&schema=public`` (or
    ``postgres://``; ``prepare=off`` for PgBouncer in transaction mode).
    ``cache_ttl=<seconds>`` on any of them wraps the store in a
    :class:`~keyguard.CachedStore`. An unknown scheme or parameter raises
    :class:`ValueError`; a password in the URL never appears in a message.
    ``create_schema=False`` opens only an existing keyguard store (SQLite, PostgreSQL) and
    writes nothing to anything else: what read-only tools want.
    """
    if url is None:
        url = os.environ.get(STORE_URL_ENV) or DEFAULT_STORE_URL
    if not isinstance(url, str):
        raise TypeError(f"store URL must be a str, not {type(url).__name__}")
    parts = urlsplit(url.strip())
    factory = _FACTORIES.get(parts.scheme.lower())
    if factory is None:
        known = ", ".join(f"{s}://" for s in sorted(_FACTORIES))
        raise ValueError(f"unknown store URL scheme in {redact_url(url)!r}; use one of {known}")
    if parts.fragment:
        raise ValueError(
            f"store URL {redact_url(url)!r} has a #fragment; write '#' in a path as %23"
        )
    try:
        params = dict(
            parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        )
    except ValueError as e:
        raise ValueError(f"malformed query string in store URL {redact_url(url)!r}") from e
    cache = _cache_options(parts, params)
    store = factory(parts, params, create_schema)
    if cache is None:
        return store
    from .cached import CachedStore

    return CachedStore(store, **cache)
