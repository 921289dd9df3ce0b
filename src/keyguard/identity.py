"""The object the middleware attaches to a request: who is calling, with which scopes.

It follows Starlette's conventions without importing Starlette: the middleware puts the
same object in ``scope["user"]`` (``is_authenticated``, ``display_name``, ``identity``) and
``scope["auth"]`` (``scopes``), so ``request.user``, ``request.auth.scopes`` and
``@requires("read")`` work unchanged. One object instead of two saves an allocation on
every request.
"""

from __future__ import annotations

from typing import Literal

from .records import KeyInfo

__all__ = ["APIKeyUser", "AnonymousUser"]


class APIKeyUser:
    """The caller behind a valid API key; ``identity`` is the key's ``user_id``."""

    __slots__ = ("key",)

    def __init__(self, key: KeyInfo) -> None:
        #: The record of the key that authenticated the request.
        self.key = key

    @property
    def scopes(self) -> tuple[str, ...]:
        """The key's scopes (its ``permissions``), read-only like the record itself."""
        return self.key.scopes

    @property
    def is_authenticated(self) -> Literal[True]:
        return True

    @property
    def identity(self) -> str:
        return self.key.user_id

    @property
    def display_name(self) -> str:
        return self.key.user_id

    def __repr__(self) -> str:
        return f"APIKeyUser(user_id={self.key.user_id!r}, key={self.key.hint!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, APIKeyUser):
            return NotImplemented
        return self.key.key_id == other.key.key_id

    def __hash__(self) -> int:
        return hash(self.key.key_id)


class AnonymousUser:
    """A caller without a key, let through by optional mode, an exempt path or a preflight."""

    __slots__ = ()

    #: A caller without a key has no scopes.
    scopes: tuple[str, ...] = ()

    @property
    def is_authenticated(self) -> Literal[False]:
        return False

    @property
    def identity(self) -> None:
        return None

    @property
    def display_name(self) -> str:
        return ""

    @property
    def key(self) -> None:
        return None

    def __repr__(self) -> str:
        return "AnonymousUser()"
