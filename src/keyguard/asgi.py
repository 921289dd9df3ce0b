"""Pure ASGI middleware: every HTTP request and WebSocket handshake needs a valid API key.

It imports no framework, never reads the request body, and passes lifespan (and any other
scope type) through untouched. Works as ``Starlette(middleware=[Middleware(APIKeyMiddleware,
manager=m)])``, ``app.add_middleware(APIKeyMiddleware, manager=m)`` in FastAPI, or around
any ASGI callable.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from ._middleware import Guard, Middleware
from .identity import AnonymousUser, APIKeyUser
from .pipeline import Admission, Pipeline, admitted, client_address
from .problems import ErrorResponder, ErrorResponse, Problem
from .records import KeyInfo

if TYPE_CHECKING:
    from .manager import APIKeyManager

# ErrorResponder, ErrorResponse and Problem live in keyguard.problems; re-exported here.
__all__ = ["APIKeyMiddleware", "ErrorResponder", "ErrorResponse", "Problem"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_GUARDED_SCOPES = frozenset({"http", "websocket"})
_STARTS = frozenset({"http.response.start", "websocket.accept"})


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


def _is_cors_preflight(scope: Scope) -> bool:
    if scope.get("method") != "OPTIONS":
        return False
    origin = requested_method = False
    for name, _ in scope["headers"]:
        if name == b"origin":
            origin = True
        elif name == b"access-control-request-method":
            requested_method = True
    return origin and requested_method


class APIKeyMiddleware(Middleware[ASGIApp]):
    """Require a valid API key before the wrapped ASGI app sees a request.

    :param app: the ASGI app to guard.
    :param manager: the :class:`~keyguard.APIKeyManager` that checks keys (``averify``).
    :param exempt_paths: paths let through without a key, matched exactly against the path
        relative to the mount point (``root_path`` removed): ``/health`` does not exempt
        ``/health/``, ``/healthz`` or ``/Health``.
    :param exempt_patterns: regexes (str or compiled) that exempt every path they
        ``fullmatch``. A pattern never exempts a path that a server or router behind may
        read as another one: a ``.`` or ``..`` segment (also ``..;x``), a backslash, ``//``,
        a control character, or any of these once percent-decoded again (``%2e%2e``) or in
        NFKC form.
    :param optional: let requests without any key through as anonymous; a bad key is
        still refused.
    :param required_scopes: scopes every key must have (else 403 ``insufficient_scope``).
    :param header_names: headers that carry the key, matched in any case and named in
        messages as given here; ``Authorization`` means ``Bearer <key>``, any other name
        carries the bare key.
    :param auth_schemes: the ``Authorization`` schemes that carry a key (default
        ``["Bearer"]``); ``["Bearer", "Api-Key"]`` also reads djangorestframework-api-key's
        ``Authorization: Api-Key <key>``.
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
    :param rate_limits: usage limits (``["10/second", "1000/hour"]``) for keys that have
        none of their own. A key over a limit or out of quota gets 429 (``rate_limited``,
        ``quota_exceeded``) with ``Retry-After``; every response for a limited key carries
        ``RateLimit-Policy`` and ``RateLimit``. Only admitted requests are charged.
    :param failure_limit: failed key checks allowed per client address, per process
        (default ``"20/minute"``); then 429 ``too_many_failures`` without a store lookup.
        None turns it off.
    :param trusted_proxies: addresses or CIDRs of your reverse proxies: behind them the
        client address is the right-most ``X-Forwarded-For`` hop that is not one of them.
        Without it the header is ignored (anyone can send it).
    :param fail_open: admit requests (with a logged warning) when the counter store fails,
        instead of 503 ``store_unavailable``.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in _GUARDED_SCOPES:
            await self.app(scope, receive, send)
            return
        guard = self.guard
        if (self._checks_path and self._is_exempt(scope)) or (
            guard.allow_cors_preflight and _is_cors_preflight(scope)
        ):
            await self._let_through(scope, receive, send)
            return
        outcome = await authenticate(self.pipeline, self.manager, scope)
        if isinstance(outcome, Admission):
            send = with_response_headers(scope, send)
        if isinstance(outcome, (KeyInfo, Admission)):
            info = admitted(scope, self.manager, outcome)
            scope["user"] = scope["auth"] = APIKeyUser(info)
            scope["keyguard.guard"] = guard
            if guard.strip_credentials:
                self._strip_credentials(scope)
            await self.app(scope, receive, send)
        elif outcome is None and guard.optional:
            await self._let_through(scope, receive, send)
        else:
            problem = guard.pipeline.problems.missing if outcome is None else outcome
            await refuse(guard, scope, send, problem)

    def _is_exempt(self, scope: Scope) -> bool:
        path = route_path(scope)
        guard = self.guard
        return path in guard.exempt_paths or (
            bool(guard.exempt_patterns) and guard.is_exempt_by_pattern(path)
        )

    async def _let_through(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Call the app for a request without a key: an anonymous user, no scopes."""
        # Keep what an outer middleware (a session, say) may have set.
        anonymous = AnonymousUser()
        scope.setdefault("user", anonymous)
        scope.setdefault("auth", anonymous)
        scope["keyguard.key"] = None
        scope["keyguard.guard"] = self.guard
        if self.guard.strip_credentials:
            self._strip_credentials(scope)
        # A framework helper may still admit a key here and leave headers for the response.
        await self.app(scope, receive, with_response_headers(scope, send))

    def _strip_credentials(self, scope: Scope) -> None:
        names = self.pipeline.raw_header_names
        carries = self.pipeline.carries_key
        scope["headers"] = [
            (name, value)
            for name, value in scope["headers"]
            if name not in names or not carries(names[name], value.decode("latin-1"))
        ]
        pipeline = self.pipeline
        if pipeline.query_param is not None and scope.get("query_string"):
            _, rest = pipeline.split_query(scope["query_string"].decode("latin-1"))
            scope["query_string"] = rest.encode("latin-1")


def read_credentials(pipeline: Pipeline, scope: Scope) -> tuple[list[tuple[bool, str]], list[str]]:
    """The credential header values (with their Bearer flag) and query values of a scope."""
    names = pipeline.raw_header_names
    values = []
    for name, value in scope["headers"]:
        if name in names:
            values.append((names[name], value.decode("latin-1")))
    query_values: list[str] = []
    if pipeline.query_param is not None:
        query = scope.get("query_string", b"").decode("latin-1")
        if query:
            query_values, _ = pipeline.split_query(query)
    return values, query_values


async def authenticate(
    pipeline: Pipeline, manager: APIKeyManager, scope: Scope
) -> KeyInfo | Admission | Problem | None:
    """Run ``pipeline`` on a scope: its credentials, its client and, behind trusted
    proxies, its ``X-Forwarded-For``. Shared by the middleware and the framework helpers."""
    values, query_values = read_credentials(pipeline, scope)
    client = scope.get("client")
    return await pipeline.aauthenticate(
        manager,
        values,
        query_values,
        client[0] if client else None,
        forwarded_for(scope) if pipeline.trusted_proxies else (),
    )


def caller(pipeline: Pipeline, scope: Scope) -> str | None:
    """The caller's address: the ASGI ``client``, or the ``X-Forwarded-For`` hop that
    :func:`~keyguard.pipeline.client_address` picks behind trusted proxies."""
    client = scope.get("client")
    forwarded = forwarded_for(scope) if pipeline.trusted_proxies else ()
    return client_address(client[0] if client else None, forwarded, pipeline.trusted_proxies)


def forwarded_for(scope: Scope) -> list[str]:
    """The ``X-Forwarded-For`` values of a scope (read only behind trusted proxies)."""
    return [v.decode("latin-1") for n, v in scope["headers"] if n == b"x-forwarded-for"]


def with_response_headers(scope: Scope, send: Send) -> Send:
    """``send``, adding ``scope["keyguard.headers"]`` to the response when it starts.

    Whoever admits a key with limits leaves its RateLimit fields there; the first wrapper
    to see the response start takes them, so nested wrappers never add them twice. A
    WebSocket handshake gets them on its accept.
    """

    async def send_with_headers(message: Message) -> None:
        if message["type"] in _STARTS:
            extra = scope.pop("keyguard.headers", None)
            if extra:
                headers = list(message.get("headers") or ())
                headers.extend((n.encode("latin-1"), v.encode("latin-1")) for n, v in extra)
                message = {**message, "headers": headers}
        await send(message)

    return send_with_headers


def render(guard: Guard, scope: Scope, problem: Problem) -> ErrorResponse | None:
    """The guard's ``error_responder`` rendering of ``problem``, or None for the default."""
    if guard.error_responder is None:
        return None
    values, query_values = read_credentials(guard.pipeline, scope)
    return guard.render(problem, scope, [v for _, v in values] + query_values)


async def refuse(guard: Guard, scope: Scope, send: Send, problem: Problem) -> None:
    """Send ``problem``, or the guard's ``error_responder`` rendering of it."""
    await send_refusal(scope, send, problem, render(guard, scope, problem))


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
