"""Starlette integration: an ``AuthenticationBackend`` for ``AuthenticationMiddleware``.

For apps that already use Starlette's ``AuthenticationMiddleware`` (perhaps with other
backends in mind); otherwise :class:`keyguard.asgi.APIKeyMiddleware` is simpler and faster::

    backend = APIKeyBackend(manager)
    app = Starlette(middleware=[
        Middleware(AuthenticationMiddleware, backend=backend, on_error=on_auth_error),
    ])

A request without a key is anonymous (guard routes with ``@requires``); a bad key is
refused with the same ``application/problem+json`` answers as the middleware.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    BaseUser,
)
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.responses import Response

from . import identity
from ._http import DEFAULT_HEADER_NAMES, Guard, Problem
from .exceptions import StoreError
from .manager import APIKeyManager

__all__ = ["APIKeyAuthenticationError", "APIKeyBackend", "APIKeyUser", "on_auth_error"]

logger = logging.getLogger("keyguard")


class APIKeyUser(identity.APIKeyUser, BaseUser):
    """The caller behind a valid key, as a Starlette ``BaseUser`` (``identity`` is the user_id)."""

    __slots__ = ()


class APIKeyAuthenticationError(AuthenticationError):
    """A request whose credential was refused; ``problem`` is the response to send."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.detail)
        #: The refusal, with its status, machine ``code``, body and headers.
        self.problem = problem


class APIKeyBackend(AuthenticationBackend):
    """Authenticate requests by API key for Starlette's ``AuthenticationMiddleware``.

    Returns ``AuthCredentials`` with the key's scopes and an :class:`APIKeyUser`, and puts
    the :class:`~keyguard.KeyInfo` in ``scope["keyguard.key"]`` (where
    :mod:`keyguard.fastapi` looks for it). No key gives None (anonymous); a bad or
    ambiguous key raises :class:`APIKeyAuthenticationError`, which :func:`on_auth_error`
    renders as a 401 or 400.

    :param header_names: headers that carry the key, matched in any case and named in
        messages as given here; ``Authorization`` means ``Bearer <key>``, any other name
        carries the bare key.
    :param realm: the realm in ``WWW-Authenticate`` challenges.
    """

    def __init__(
        self,
        manager: APIKeyManager,
        *,
        header_names: Iterable[str] = DEFAULT_HEADER_NAMES,
        realm: str = "api",
    ) -> None:
        self.manager = manager
        self.guard = Guard(
            manager,
            exempt_paths=(),
            exempt_patterns=(),
            optional=True,
            required_scopes=(),
            header_names=header_names,
            query_param=None,
            strip_credentials=False,
            realm=realm,
            error_responder=None,
            allow_cors_preflight=False,
            stacklevel=2,
        )
        self._names = self.guard.raw_header_names

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        names = self._names
        values = [
            (names[name], value.decode("latin-1"))
            for name, value in conn.scope["headers"]
            if name in names
        ]
        if not values:
            return None
        key = self.guard.extract(values)
        if key is None:
            return None
        if isinstance(key, Problem):
            raise APIKeyAuthenticationError(key)
        try:
            result = await self.manager.averify(key)
        except StoreError as e:
            logger.error("cannot check API key, the key store failed: %s", e)
            raise APIKeyAuthenticationError(self.guard.problems.store_unavailable) from e
        if not result.ok or result.key is None:
            raise APIKeyAuthenticationError(self.guard.refusal(result))
        conn.scope["keyguard.key"] = result.key
        return AuthCredentials(list(result.key.scopes)), APIKeyUser(result.key)


def on_auth_error(conn: HTTPConnection, exc: AuthenticationError) -> Response:
    """``on_error`` for ``AuthenticationMiddleware``: send a refused key's problem response.

    Errors raised by other backends get Starlette's default (a plain-text 400).
    """
    if not isinstance(exc, APIKeyAuthenticationError):
        return AuthenticationMiddleware.default_on_error(conn, exc)
    problem = exc.problem
    return Response(problem.body, problem.status, headers=dict(problem.headers))
