"""Exceptions raised by keyguard; all share the root :class:`KeyguardError`.

Bad configuration and bad arguments raise plain :class:`ValueError` / :class:`TypeError`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .manager import Reason

__all__ = ["InvalidKeyError", "KeyguardError", "StoreError"]


class KeyguardError(Exception):
    """Root of every keyguard-specific error."""


class StoreError(KeyguardError):
    """A key store cannot be opened or used (unreachable, corrupt, not a keyguard store)."""


class InvalidKeyError(KeyguardError):
    """An operation needs an active key and got one that is not (see :attr:`reason`)."""

    def __init__(self, message: str, reason: Reason) -> None:
        super().__init__(message)
        #: Why the key was unusable (a :class:`keyguard.Reason`, which is also a str).
        self.reason = reason
