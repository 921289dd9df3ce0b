"""``store_from_url``: pick and configure a store from one URL (``KEYGUARD_STORE``)."""

from __future__ import annotations

import os
from collections.abc import Callable
from urllib.parse import SplitResult, parse_qsl, unquote, urlsplit

from .base import KeyStore
from .memory import MemoryStore
from .sqlite import SQLiteStore

__all__ = ["DEFAULT_STORE_URL", "STORE_URL_ENV", "store_from_url"]

STORE_URL_ENV = "KEYGUARD_STORE"
DEFAULT_STORE_URL = "sqlite:///keyguard.db"

_Factory = Callable[[SplitResult, dict[str, str]], KeyStore]


def _memory(url: SplitResult, params: dict[str, str]) -> KeyStore:
    _no_params(url, params)
    if url.netloc or url.path not in ("", "/"):
        # The URL is not echoed: its host part may carry a password.
        raise ValueError("memory store URL takes no host or path: use memory://")
    return MemoryStore()


def _sqlite(url: SplitResult, params: dict[str, str]) -> KeyStore:
    _no_params(url, params)
    if url.netloc:
        # Only the host name is echoed: the rest of the host part may carry a password.
        host = f" {url.hostname!r}" if url.hostname else ""
        raise ValueError(
            f"SQLite URL names a host{host}: use sqlite:///relative.db"
            " or sqlite:////absolute/path.db"
        )
    path = unquote(url.path[1:])
    if not path:
        raise ValueError("SQLite URL needs a file path: sqlite:///keyguard.db")
    return SQLiteStore(path)


def _no_params(url: SplitResult, params: dict[str, str]) -> None:
    if params:
        names = ", ".join(sorted(params))
        raise ValueError(f"unknown parameter(s) {names} for a {url.scheme}:// store URL")


_FACTORIES: dict[str, _Factory] = {"memory": _memory, "sqlite": _sqlite}


def register_scheme(scheme: str, factory: _Factory) -> None:
    """Let ``store_from_url`` build stores for another URL scheme."""
    _FACTORIES[scheme] = factory


def store_from_url(url: str | None = None) -> KeyStore:
    """Return the store named by ``url`` (default: ``$KEYGUARD_STORE``, else SQLite).

    Schemes: ``memory://``, ``sqlite:///relative.db``, ``sqlite:////absolute/path.db``.
    An unknown scheme or parameter raises :class:`ValueError`.
    """
    if url is None:
        url = os.environ.get(STORE_URL_ENV) or DEFAULT_STORE_URL
    if not isinstance(url, str):
        raise TypeError(f"store URL must be a str, not {type(url).__name__}")
    parts = urlsplit(url.strip())
    factory = _FACTORIES.get(parts.scheme.lower())
    if factory is None:
        known = ", ".join(f"{s}://" for s in sorted(_FACTORIES))
        raise ValueError(f"unknown store URL scheme in {_redact(url)!r}; use one of {known}")
    try:
        params = dict(
            parse_qsl(parts.query, keep_blank_values=True, strict_parsing=bool(parts.query))
        )
    except ValueError as e:
        raise ValueError(f"malformed query string in store URL {_redact(url)!r}") from e
    return factory(parts, params)


def _redact(url: str) -> str:
    """Hide a password in a URL before it goes into a message."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()
