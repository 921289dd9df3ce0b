"""keyguard: issue API keys, store them hashed, and guard ASGI/WSGI apps with them."""

from __future__ import annotations

import logging
import typing as _typing

from .events import KeyEvent as KeyEvent
from .exceptions import InvalidKeyError as InvalidKeyError
from .exceptions import KeyguardError as KeyguardError
from .exceptions import StoreError as StoreError
from .keys import KeyFormat as KeyFormat
from .keys import digest_key as digest_key
from .keys import generate_key as generate_key
from .keys import is_well_formed as is_well_formed
from .keys import mask_key as mask_key
from .manager import APIKeyManager as APIKeyManager
from .records import KeyInfo as KeyInfo
from .redaction import RedactingFilter as RedactingFilter
from .stores import AsyncKeyStore as AsyncKeyStore
from .stores import CachedStore as CachedStore
from .stores import KeyStore as KeyStore
from .stores import MemoryStore as MemoryStore
from .stores import SQLiteStore as SQLiteStore
from .stores import store_from_url as store_from_url
from .verification import Reason as Reason
from .verification import Verification as Verification

if _typing.TYPE_CHECKING:
    from .stores.postgres import PostgresStore as PostgresStore
    from .stores.redis import RedisStore as RedisStore

_LAZY = {"PostgresStore": "postgres", "RedisStore": "redis"}


def __getattr__(name: str) -> _typing.Any:
    # These modules (and the drivers they import when a store is built) load on first use.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".stores.{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# keyguard never logs a key; this masks one that reaches its logger by any other road.
logging.getLogger("keyguard").addFilter(RedactingFilter())

__version__ = "0.1.0"

__all__ = [
    "APIKeyManager",
    "AsyncKeyStore",
    "CachedStore",
    "InvalidKeyError",
    "KeyEvent",
    "KeyFormat",
    "KeyInfo",
    "KeyStore",
    "KeyguardError",
    "MemoryStore",
    "PostgresStore",
    "Reason",
    "RedactingFilter",
    "RedisStore",
    "SQLiteStore",
    "StoreError",
    "Verification",
    "digest_key",
    "generate_key",
    "is_well_formed",
    "mask_key",
    "store_from_url",
]
