"""The outcome of checking a key: a :class:`Verification` with its :class:`Reason`."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .records import KeyInfo

__all__ = ["Reason", "Verification"]


class Reason(str, enum.Enum):
    """Why a key was accepted or refused; the value is a stable lowercase string."""

    OK = "ok"
    MALFORMED = "malformed"
    NOT_FOUND = "not_found"
    REVOKED = "revoked"
    EXPIRED = "expired"

    def __str__(self) -> str:
        return self.value


class Verification:
    """The outcome of :meth:`APIKeyManager.verify`: ``ok``, a ``reason`` and the record.

    ``key`` is the :class:`KeyInfo` when the store has the key (also for revoked and
    expired keys, for audit), else None. A Verification is truthy exactly when ``ok``, and
    unpacks as ``ok, reason, key``. Every request builds one, so it is a slotted class.
    """

    __slots__ = ("key", "ok", "reason")

    def __init__(self, ok: bool, reason: Reason, key: KeyInfo | None = None) -> None:
        self.ok = ok
        self.reason = reason
        self.key = key

    def __bool__(self) -> bool:
        return self.ok

    def __iter__(self) -> Iterator[Any]:
        return iter((self.ok, self.reason, self.key))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Verification):
            return NotImplemented
        return (self.ok, self.reason, self.key) == (other.ok, other.reason, other.key)

    def __hash__(self) -> int:
        return hash((self.ok, self.reason, self.key and self.key.key_id))

    def __repr__(self) -> str:
        return f"Verification(ok={self.ok!r}, reason={self.reason!r}, key={self.key!r})"
