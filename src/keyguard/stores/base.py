"""The contract every key store follows, so the manager never knows which one it has.

A store is a map from a key's digest to its :class:`~keyguard.KeyInfo`, plus an index by
``key_id`` and by user. It knows nothing of HTTP or policy: expiry and revocation are
judged by the manager, and every record is kept (revoked and expired ones too) for audit.
"""

from __future__ import annotations

from datetime import datetime
from typing import Protocol, runtime_checkable

from ..records import KeyInfo

__all__ = ["AsyncKeyStore", "KeyStore"]


@runtime_checkable
class KeyStore(Protocol):
    """The synchronous store contract."""

    def add(self, info: KeyInfo) -> bool:
        """Insert ``info`` unless a record with its digest or key_id exists; atomic.

        Returns False (and changes nothing) on such a collision, so the caller draws a new key.
        """
        ...

    def get(self, digest: str) -> KeyInfo | None:
        """Return the record stored under ``digest``, whatever its status."""
        ...

    def get_by_id(self, key_id: str) -> KeyInfo | None:
        """Return the record with this ``key_id``, whatever its status."""
        ...

    def list_keys(self, user_id: str | None = None) -> list[KeyInfo]:
        """Return every record (of one user, or of all users), oldest first."""
        ...

    def revoke(self, digest: str, at: datetime) -> bool:
        """Set ``revoked_at`` if it is unset; return whether this call set it."""
        ...

    def set_expiry(self, digest: str, expires_at: datetime | None) -> bool:
        """Replace ``expires_at``; return whether a record was changed."""
        ...

    def touch(self, digest: str, at: datetime) -> None:
        """Record that the key was used at ``at`` (best effort)."""
        ...

    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
        ...


@runtime_checkable
class AsyncKeyStore(Protocol):
    """The async twin a networked store offers, so an event loop never blocks on it.

    The manager uses it in ``averify`` when the store has it; local stores (memory,
    SQLite) do not need it and are answered inline.
    """

    async def aget(self, digest: str) -> KeyInfo | None:
        """Async :meth:`KeyStore.get`."""
        ...

    async def atouch(self, digest: str, at: datetime) -> None:
        """Async :meth:`KeyStore.touch`."""
        ...
