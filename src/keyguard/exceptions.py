"""Exceptions raised by keyguard; all share the root :class:`KeyguardError`.

Bad configuration and bad arguments raise plain :class:`ValueError` / :class:`TypeError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .records import KeyInfo
    from .verification import Reason

__all__ = ["InvalidKeyError", "KeyguardError", "StoreError"]


class KeyguardError(Exception):
    """Root of every keyguard-specific error."""


class StoreError(KeyguardError):
    """A key store cannot be opened or used (unreachable, corrupt, not a keyguard store)."""


class InvalidKeyError(KeyguardError):
    """A key that is not active: malformed, unknown, revoked or expired (see :attr:`reason`).

    Raised by :meth:`APIKeyManager.check <keyguard.APIKeyManager.check>` and by operations
    that need an active key. The message never holds the key.
    """

    def __init__(self, message: str, reason: Reason, info: KeyInfo | None = None) -> None:
        super().__init__(message)
        #: Why the key was unusable (a :class:`keyguard.Reason`, which is also a str).
        self.reason = reason
        #: The key's record when the store has it (revoked and expired keys), else None.
        self.info = info
