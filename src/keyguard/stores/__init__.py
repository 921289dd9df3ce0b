"""Key stores: one contract (:class:`KeyStore`) and its backends."""

from __future__ import annotations

from ._url import DEFAULT_STORE_URL, STORE_URL_ENV, store_from_url
from .base import (
    AsyncCounterStore,
    AsyncKeyStore,
    CounterStore,
    DigestSource,
    EventStore,
    InvalidationSource,
    KeyStore,
    UsageStore,
)
from .cached import CachedStore
from .memory import MemoryStore
from .sqlite import SQLiteStore

__all__ = [
    "DEFAULT_STORE_URL",
    "STORE_URL_ENV",
    "AsyncCounterStore",
    "AsyncKeyStore",
    "CachedStore",
    "CounterStore",
    "DigestSource",
    "EventStore",
    "InvalidationSource",
    "KeyStore",
    "MemoryStore",
    "SQLiteStore",
    "UsageStore",
    "store_from_url",
]
