"""Exceptions raised by keyguard; all share the root :class:`KeyguardError`.

Bad configuration and bad arguments raise plain :class:`ValueError` / :class:`TypeError`.
"""

from __future__ import annotations

__all__ = ["InvalidKeyError", "KeyguardError", "StoreError"]


class KeyguardError(Exception):
    """Root of every keyguard-specific error."""


class StoreError(KeyguardError):
    """A key store cannot be opened or used (unreachable, corrupt, not a keyguard store)."""


class InvalidKeyError(KeyguardError):
    """An operation needs an active key and got one that is not (see :attr:`reason`)."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        #: The :class:`keyguard.Reason` value that made the key unusable.
        self.reason = reason
