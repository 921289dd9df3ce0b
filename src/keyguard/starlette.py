"""Starlette integration: per-route scopes, and an ``AuthenticationBackend``.

:func:`require_scopes` guards one endpoint behind :class:`keyguard.asgi.APIKeyMiddleware`
(or the backend below) and refuses with the middleware's own problem responses::

    @require_scopes("write")
    async def create_item(request: Request) -> Response: ...

:class:`APIKeyBackend` is for apps that already use Starlette's authentication middleware
(perhaps with other backends in mind); otherwise the pure middleware is simpler and faster::

    app = Starlette(middleware=[
        Middleware(APIKeyAuthenticationMiddleware, backend=APIKeyBackend(manager)),
    ])

A request without a key is anonymous (guard routes with :func:`require_scopes`); a bad
key is refused with the same ``application/problem+json`` answers as the middleware.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any, TypeVar, cast

from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    BaseUser,
    UnauthenticatedUser,
)
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection
from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send
from starlette.websockets import WebSocket

from . import identity
from ._middleware import Guard
from .asgi import authenticate, render, send_refusal, with_response_headers
from .manager import APIKeyManager
from .pipeline import (
    DEFAULT_AUTH_SCHEMES,
    DEFAULT_FAILURE_LIMIT,
    DEFAULT_HEADER_NAMES,
    Pipeline,
    admitted,
    arefund,
    check_scopes,
    refund,
)
from .problems import CLOSE_POLICY_VIOLATION, ErrorResponse, Problem, insufficient_scope
from .records import KeyInfo

__all__ = [
    "APIKeyAuthenticationError",
    "APIKeyAuthenticationMiddleware",
    "APIKeyBackend",
    "APIKeyUser",
    "on_auth_error",
    "require_scopes",
]

_Endpoint = TypeVar("_Endpoint", bound=Callable[..., Any])
#: What :func:`require_scopes` refuses with where no keyguard middleware ran.
_DEFAULT_GUARD = Guard(Pipeline())


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
    """Authenticate requests by API key for :class:`APIKeyAuthenticationMiddleware`.

    Returns ``AuthCredentials`` with the key's scopes and an :class:`APIKeyUser`, and puts
    the :class:`~keyguard.KeyInfo` in ``scope["keyguard.key"]`` (where
    :mod:`keyguard.fastapi` looks for it). No key gives None (anonymous); a bad or
    ambiguous key raises :class:`APIKeyAuthenticationError`, which :func:`on_auth_error`
    renders as a 401 or 400. Under Starlette's own ``AuthenticationMiddleware`` it works
    too, but refused WebSocket handshakes are then closed with code 1000 (normal closure).

    :param header_names: headers that carry the key, matched in any case and named in
        messages as given here; ``Authorization`` means ``Bearer <key>``, any other name
        carries the bare key.
    :param auth_schemes: the ``Authorization`` schemes that carry a key (default ``Bearer``).
    :param realm: the realm in ``WWW-Authenticate`` challenges.
    :param rate_limits: ``failure_limit``, ``trusted_proxies``, ``fail_open``: as for
        :class:`keyguard.asgi.APIKeyMiddleware`. The RateLimit response headers are added
        by :class:`APIKeyAuthenticationMiddleware` (not by Starlette's own middleware).
    """

    def __init__(
        self,
        manager: APIKeyManager,
        *,
        header_names: Iterable[str] = DEFAULT_HEADER_NAMES,
        auth_schemes: Iterable[str] = DEFAULT_AUTH_SCHEMES,
        realm: str = "api",
        rate_limits: Iterable[str] = (),
        failure_limit: str | None = DEFAULT_FAILURE_LIMIT,
        trusted_proxies: Iterable[str] = (),
        fail_open: bool = False,
    ) -> None:
        self.manager = manager
        pipeline = Pipeline(
            header_names=header_names,
            auth_schemes=auth_schemes,
            realm=realm,
            rate_limits=rate_limits,
            failure_limit=failure_limit,
            trusted_proxies=trusted_proxies,
            fail_open=fail_open,
        )
        self.guard = Guard(pipeline, optional=True)

    async def authenticate(self, conn: HTTPConnection) -> tuple[AuthCredentials, BaseUser] | None:
        scope = conn.scope
        scope["keyguard.guard"] = self.guard
        outcome = await authenticate(self.guard.pipeline, self.manager, scope)
        if outcome is None:
            return None
        if isinstance(outcome, Problem):
            raise APIKeyAuthenticationError(outcome)
        info = admitted(scope, self.manager, outcome)
        return AuthCredentials(list(info.scopes)), APIKeyUser(info)


def on_auth_error(conn: HTTPConnection, exc: AuthenticationError) -> Response:
    """``on_error`` for ``AuthenticationMiddleware``: send a refused key's problem response.

    Errors raised by other backends get Starlette's default (a plain-text 400).
    """
    if not isinstance(exc, APIKeyAuthenticationError):
        return AuthenticationMiddleware.default_on_error(conn, exc)
    problem = exc.problem
    return Response(problem.body, problem.status, headers=dict(problem.headers))


class APIKeyAuthenticationMiddleware(AuthenticationMiddleware):
    """Starlette's ``AuthenticationMiddleware``, refusing WebSocket handshakes as keyguard does.

    Starlette closes a refused handshake with code 1000, a normal closure; this sends the
    problem response instead where the server supports ``websocket.http.response``, else
    closes with 1008 (policy violation, 1013 if the store failed) and the problem code as
    the reason. HTTP requests are handled as by Starlette; ``on_error`` defaults to
    :func:`on_auth_error`.
    """

    def __init__(
        self,
        app: ASGIApp,
        backend: AuthenticationBackend,
        on_error: Callable[[HTTPConnection, AuthenticationError], Response] | None = None,
    ) -> None:
        super().__init__(app, backend, on_auth_error if on_error is None else on_error)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "websocket":
            await super().__call__(scope, receive, with_response_headers(scope, send))
            return
        send = with_response_headers(scope, send)
        try:
            result = await self.backend.authenticate(HTTPConnection(scope))
        except APIKeyAuthenticationError as exc:
            await send_refusal(scope, send, exc.problem)
            return
        except AuthenticationError:
            await send({"type": "websocket.close", "code": CLOSE_POLICY_VIOLATION})
            return
        if result is None:
            result = AuthCredentials(), UnauthenticatedUser()
        scope["auth"], scope["user"] = result
        await self.app(scope, receive, send)


def _refusal(
    conn: HTTPConnection, wanted: tuple[str, ...]
) -> tuple[Problem, ErrorResponse | None] | None:
    """None if the request's key holds every scope in ``wanted``, else what to refuse with."""
    info = conn.scope.get("keyguard.key")
    if isinstance(info, KeyInfo) and all(scope in info.scopes for scope in wanted):
        return None
    guard = conn.scope.get("keyguard.guard")
    if not isinstance(guard, Guard):
        guard = _DEFAULT_GUARD
    if not isinstance(info, KeyInfo):
        problem = guard.pipeline.problems.missing
    else:
        problem = insufficient_scope(guard.pipeline.realm, wanted)
    return problem, render(guard, conn.scope, problem)


def _response(problem: Problem, custom: ErrorResponse | None) -> Response:
    if custom is None:
        return Response(problem.body, problem.status, headers=dict(problem.headers))
    response = Response(custom.body, custom.status)  # sets content-length only
    response.raw_headers.extend(
        (name.lower().encode("latin-1"), value.encode("latin-1"))
        for name, value in custom.headers
        if name.lower() != "content-length"
    )
    return response


def _is_async(endpoint: Callable[..., Any]) -> bool:
    while isinstance(endpoint, functools.partial):
        endpoint = endpoint.func
    # An instance whose class defines ``async def __call__`` is async too.
    return inspect.iscoroutinefunction(endpoint) or inspect.iscoroutinefunction(
        type(endpoint).__call__
    )


def _connection(endpoint: Callable[..., Any], args: Any, kwargs: Any) -> HTTPConnection:
    for value in (*args, *kwargs.values()):
        if isinstance(value, HTTPConnection):
            return value
    raise TypeError(f"@require_scopes: {endpoint.__qualname__} got no Request or WebSocket")


def require_scopes(*scopes: str) -> Callable[[_Endpoint], _Endpoint]:
    """Decorate a Starlette endpoint so it runs only for a key holding every one of ``scopes``.

    Refusals are the keyguard middleware's own: 401 ``missing_api_key`` when no key is
    attached to the request (anonymous in optional mode or under :class:`APIKeyBackend`; on
    an exempt path, where the middleware checks no key, always), 403 ``insufficient_scope``
    naming ``scopes`` when the key lacks one, rendered by the middleware's
    ``error_responder`` if it has one.
    ``@require_scopes()`` just requires a key. It works on sync and async endpoints,
    ``HTTPEndpoint`` methods and WebSocket endpoints (refused before accept).

    The realm, header names and ``error_responder`` are those of the keyguard middleware
    (:class:`keyguard.asgi.APIKeyMiddleware`, or ``AuthenticationMiddleware`` with
    :class:`APIKeyBackend`) that saw the request, read from ``scope["keyguard.guard"]``;
    where none did, the defaults are used: realm ``api``, ``Authorization`` and
    ``X-API-Key``.
    """
    wanted = check_scopes(scopes)

    def decorator(endpoint: _Endpoint) -> _Endpoint:
        if _is_async(endpoint):

            @functools.wraps(endpoint)
            async def guarded(*args: Any, **kwargs: Any) -> Any:
                conn = _connection(endpoint, args, kwargs)
                refusal = _refusal(conn, wanted)
                if refusal is None:
                    return await endpoint(*args, **kwargs)
                await arefund(conn.scope, refusal[0].code)
                if isinstance(conn, WebSocket):
                    await send_refusal(conn.scope, conn.send, *refusal)
                    return None
                return _response(*refusal)

            return cast(_Endpoint, guarded)

        @functools.wraps(endpoint)
        def guarded_sync(*args: Any, **kwargs: Any) -> Any:
            conn = _connection(endpoint, args, kwargs)
            refusal = _refusal(conn, wanted)
            if refusal is None:
                return endpoint(*args, **kwargs)
            refund(conn.scope, refusal[0].code)
            return _response(*refusal)

        return cast(_Endpoint, guarded_sync)

    return decorator
