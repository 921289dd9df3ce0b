"""Pure ASGI middleware: every HTTP request and WebSocket handshake needs a valid API key.

It imports no framework, never reads the request body, and passes lifespan (and any other
scope type) through untouched. Works as ``Starlette(middleware=[Middleware(APIKeyMiddleware,
manager=m)])``, ``app.add_middleware(APIKeyMiddleware, manager=m)`` in FastAPI, or around
any ASGI callable.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from typing import TYPE_CHECKING, Any

from ._http import (
    DEFAULT_HEADER_NAMES,
    MALFORMED_RESULT,
    RAW_BEARER_PREFIXES,
    ErrorResponder,
    ErrorResponse,
    Guard,
    Problem,
    carries_key,
)
from .exceptions import StoreError
from .identity import AnonymousUser, APIKeyUser
from .manager import Reason
from .records import KeyInfo
from .stores.base import AsyncKeyStore

if TYPE_CHECKING:
    from .manager import APIKeyManager

__all__ = ["APIKeyMiddleware", "ErrorResponder", "ErrorResponse", "Problem"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("keyguard")

_MALFORMED = Reason.MALFORMED
_GUARDED_SCOPES = frozenset({"http", "websocket"})


def route_path(scope: Scope) -> str:
    """The path relative to the app's mount point, as Starlette's router computes it.

    ``root_path`` is removed when ``path`` starts with it on a segment boundary, so exempt
    paths name the route that will run, whether or not the server includes ``root_path``.
    """
    path: str = scope["path"]
    root: str = scope.get("root_path") or ""
    if root and path.startswith(root):
        if path == root:
            return ""
        if path[len(root)] == "/":
            return path[len(root) :]
    return path


def _is_cors_preflight(headers: Iterable[tuple[bytes, bytes]]) -> bool:
    origin = requested_method = False
    for name, _ in headers:
        if name == b"origin":
            origin = True
        elif name == b"access-control-request-method":
            requested_method = True
    return origin and requested_method


class APIKeyMiddleware:
    """Require a valid API key before the wrapped ASGI app sees a request.

    :param app: the ASGI app to guard.
    :param manager: the :class:`~keyguard.APIKeyManager` that checks keys (``averify``).
    :param exempt_paths: paths let through without a key, matched exactly against the path
        relative to the mount point (``root_path`` removed): ``/health`` does not exempt
        ``/health/``, ``/healthz`` or ``/Health``.
    :param exempt_patterns: regexes (str or compiled) that exempt every path they
        ``fullmatch``; a path with a ``.`` or ``..`` segment is never exempted by a pattern.
    :param optional: let requests without any key through as anonymous; a bad key is
        still refused.
    :param required_scopes: scopes every key must have (else 403 ``insufficient_scope``).
    :param header_names: headers that carry the key, matched in any case and named in
        messages as given here; ``Authorization`` means ``Bearer <key>``, any other name
        carries the bare key.
    :param query_param: also read the key from this query parameter (off by default: URLs
        leak into logs). Setting it warns once, when the middleware is built: the warning
        names the line that builds it, except under ``Middleware(...)``, where Starlette
        builds it on the app's first call and the warning names Starlette's code.
    :param strip_credentials: remove the credential headers (and query parameter) before
        the app sees the request.
    :param realm: the realm in ``WWW-Authenticate`` challenges.
    :param error_responder: ``(problem, scope) -> ErrorResponse | None`` to render refusals
        yourself; None (or returning None) sends the default ``application/problem+json``.
    :param allow_cors_preflight: let CORS preflight requests (``OPTIONS`` with ``Origin``
        and ``Access-Control-Request-Method``) through without a key, since browsers never
        send credentials on them. Off by default: anyone can send those two headers, so with
        it on, every ``OPTIONS`` handler of the app (a mounted sub-app, a proxy, an endpoint
        that answers any method) runs unauthenticated and must answer preflights itself
        without leaking data. The recommended setup instead puts a CORS middleware *outside*
        this one (listed before it): it answers preflights before keyguard sees them and
        adds CORS headers to keyguard's refusals, so browsers can read them.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        manager: APIKeyManager,
        exempt_paths: Iterable[str] = (),
        exempt_patterns: Iterable[str | re.Pattern[str]] = (),
        optional: bool = False,
        required_scopes: Iterable[str] = (),
        header_names: Iterable[str] = DEFAULT_HEADER_NAMES,
        query_param: str | None = None,
        strip_credentials: bool = False,
        realm: str = "api",
        error_responder: ErrorResponder | None = None,
        allow_cors_preflight: bool = False,
    ) -> None:
        self.app = app
        self.manager = manager
        self.guard = Guard(
            manager,
            exempt_paths=exempt_paths,
            exempt_patterns=exempt_patterns,
            optional=optional,
            required_scopes=required_scopes,
            header_names=header_names,
            query_param=query_param,
            strip_credentials=strip_credentials,
            realm=realm,
            error_responder=error_responder,
            allow_cors_preflight=allow_cors_preflight,
        )
        # Hot-path copies of the guard's precomputed state, read once per request.
        self._names = self.guard.raw_header_names
        self._exempt = self.guard.exempt_paths
        self._has_patterns = bool(self.guard.exempt_patterns)
        self._checks_path = bool(self._exempt) or self._has_patterns
        self._preflight = self.guard.allow_cors_preflight
        self._may_let_through = self._checks_path or self._preflight
        self._simple = query_param is None
        self._strip = self.guard.strip_credentials
        self._required = bool(self.guard.required_scopes)
        # A valid key with nothing more to check or strip: the common case, one flag.
        self._admit_at_once = not self._required and not self._strip
        self._problems = self.guard.problems
        # A store without an async twin is answered inline by the async check; calling the
        # sync one directly gives the same result without a coroutine per request.
        checks = self.guard.checks
        sync = not isinstance(getattr(manager, "store", None), AsyncKeyStore)
        self._check = checks.check if sync else None
        self._check_raw = checks.check_raw if sync else None
        self._check_bearer = checks.check_bearer
        self._acheck = checks.acheck

    def __repr__(self) -> str:
        return f"APIKeyMiddleware(app={self.app!r}, manager={self.manager!r})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in _GUARDED_SCOPES:
            await self.app(scope, receive, send)
            return
        if self._may_let_through and self._lets_through(scope):
            await self._let_through(scope, receive, send)
            return

        # Fast path: one credential header in its usual form, its bytes checked as they are
        # (no parsing, no decoding); any other shape (or a refusal as malformed) goes
        # through the exact reader below.
        names = self._names
        found = None
        count = 0
        for header in scope["headers"]:
            if header[0] in names:
                found = header
                count += 1
        raw: bytes | None = None
        if count == 1 and self._simple:
            # No length check here: an oversized value fails the form check at once and
            # the exact reader below refuses it as too large.
            name, raw = found  # type: ignore[misc]
            bearer = names[name]

        if raw is not None:
            try:
                if self._check_raw is not None:
                    result = self._check_bearer(raw) if bearer else self._check_raw(raw)
                elif bearer and raw[:7] not in RAW_BEARER_PREFIXES:
                    result = MALFORMED_RESULT
                else:
                    result = await self._acheck((raw[7:] if bearer else raw).decode("latin-1"))
            except StoreError as e:
                await self._refuse(scope, send, self._store_failed(e))
                return
            if isinstance(result, KeyInfo):
                if self._admit_at_once:
                    scope["user"] = scope["auth"] = APIKeyUser(result)
                    scope["keyguard.key"] = result
                    await self.app(scope, receive, send)
                    return
                outcome: KeyInfo | Problem | None = result
            elif result.reason is _MALFORMED:
                outcome = await self._authenticate(scope)
            else:
                outcome = self.guard.refusal(result)
        else:
            outcome = await self._authenticate(scope)
        await self._conclude(scope, receive, send, outcome)

    def _lets_through(self, scope: Scope) -> bool:
        """Whether the request needs no key: an exempt path or an allowed CORS preflight."""
        return (self._checks_path and self._is_exempt(scope)) or (
            self._preflight
            and scope.get("method") == "OPTIONS"
            and _is_cors_preflight(scope["headers"])
        )

    async def _conclude(
        self, scope: Scope, receive: Receive, send: Send, outcome: KeyInfo | Problem | None
    ) -> None:
        """Admit, let through or refuse the request, once its credential is judged."""
        if outcome is None:
            if self.guard.optional:
                await self._let_through(scope, receive, send)
            else:
                await self._refuse(scope, send, self._problems.missing)
        elif isinstance(outcome, Problem):
            await self._refuse(scope, send, outcome)
        elif self._required and self.guard.missing_scope(outcome):
            await self._refuse(scope, send, self._problems.insufficient_scope)
        else:
            scope["user"] = scope["auth"] = APIKeyUser(outcome)
            scope["keyguard.key"] = outcome
            if self._strip:
                self._strip_credentials(scope)
            await self.app(scope, receive, send)

    def _is_exempt(self, scope: Scope) -> bool:
        path = route_path(scope)
        return path in self._exempt or (
            self._has_patterns and self.guard.is_exempt_by_pattern(path)
        )

    async def _authenticate(self, scope: Scope) -> KeyInfo | Problem | None:
        """The exact path: read every credential, then verify the one key found."""
        guard = self.guard
        names = self._names
        values = [
            (names[name], value.decode("latin-1"))
            for name, value in scope["headers"]
            if name in names
        ]
        query_values: list[str] = []
        if guard.query_param is not None:
            query = scope.get("query_string", b"").decode("latin-1")
            if query:
                query_values, _ = guard.split_query(query)
        key = guard.extract(values, query_values)
        if key is None or isinstance(key, Problem):
            return key
        try:
            check = self._check
            result = check(key) if check is not None else await self._acheck(key)
        except StoreError as e:
            return self._store_failed(e)
        return result if isinstance(result, KeyInfo) else guard.refusal(result)

    def _store_failed(self, error: StoreError) -> Problem:
        logger.error("cannot check API key, the key store failed: %s", error)
        return self._problems.store_unavailable

    async def _let_through(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Call the app for a request without a key: an anonymous user, no scopes."""
        # Keep what an outer middleware (a session, say) may have set.
        anonymous = AnonymousUser()
        scope.setdefault("user", anonymous)
        scope.setdefault("auth", anonymous)
        scope["keyguard.key"] = None
        if self._strip:
            self._strip_credentials(scope)
        await self.app(scope, receive, send)

    def _strip_credentials(self, scope: Scope) -> None:
        names = self._names
        scope["headers"] = [
            (name, value)
            for name, value in scope["headers"]
            if name not in names or not carries_key(names[name], value.decode("latin-1"))
        ]
        if self.guard.query_param is not None and scope.get("query_string"):
            _, rest = self.guard.split_query(scope["query_string"].decode("latin-1"))
            scope["query_string"] = rest.encode("latin-1")

    async def _refuse(self, scope: Scope, send: Send, problem: Problem) -> None:
        """Send ``problem`` (or the user's rendering of it) without calling the app."""
        await send_refusal(scope, send, problem, self.guard.render(problem, scope))


async def send_refusal(
    scope: Scope, send: Send, problem: Problem, custom: ErrorResponse | None = None
) -> None:
    """Answer an HTTP request, or refuse a WebSocket handshake, with ``problem``.

    ``custom`` is a checked rendering of it to send instead. A WebSocket handshake gets the
    response through the ``websocket.http.response`` extension where the server has it;
    elsewhere it is closed before accept with ``problem.close_code`` and the code as reason.
    """
    if custom is None:
        status, headers, body = problem.status, list(problem.raw_headers), problem.body
    else:
        status = custom.status
        headers = [(n.encode("latin-1"), v.encode("latin-1")) for n, v in custom.headers]
        body = custom.body
    if scope["type"] == "websocket":
        if "websocket.http.response" not in (scope.get("extensions") or {}):
            # Closing before accept makes the server refuse the handshake (HTTP 403).
            await send(
                {"type": "websocket.close", "code": problem.close_code, "reason": problem.code}
            )
            return
        start_type, body_type = "websocket.http.response.start", "websocket.http.response.body"
    else:
        start_type, body_type = "http.response.start", "http.response.body"
    await send({"type": start_type, "status": status, "headers": headers})
    await send({"type": body_type, "body": body, "more_body": False})
