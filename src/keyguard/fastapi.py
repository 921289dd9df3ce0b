"""FastAPI integration: a dependency that requires an API key and documents it in OpenAPI.

::

    manager = APIKeyManager.from_url()
    app = FastAPI()
    install(app, manager)  # problem+json refusals, and the app-wide manager

    @app.post("/items")
    async def create(key: Annotated[KeyInfo, Depends(require_api_key(scopes=["write"]))]): ...

Behind :class:`keyguard.asgi.APIKeyMiddleware` (or :class:`keyguard.starlette.APIKeyBackend`)
the dependency reuses the key the middleware checked; without one it checks the key itself.
Either way the route lists the key's headers as security schemes, so Swagger UI's
"Authorize" button works.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.requests import HTTPConnection, Request
from fastapi.responses import Response
from fastapi.security import APIKeyHeader, HTTPBearer

from .asgi import (
    ASGIApp,
    Receive,
    Scope,
    Send,
    forwarded_for,
    read_credentials,
    with_response_headers,
)
from .manager import APIKeyManager
from .pipeline import DEFAULT_FAILURE_LIMIT, DEFAULT_HEADER_NAMES, Admission, Pipeline
from .problems import Problem
from .records import KeyInfo

__all__ = [
    "MANAGER_STATE",
    "APIKeyHTTPException",
    "install",
    "problem_exception_handler",
    "require_api_key",
]

logger = logging.getLogger("keyguard")

#: The ``app.state`` attribute holding the app-wide manager (set by :func:`install`).
MANAGER_STATE = "keyguard_manager"


class APIKeyHTTPException(HTTPException):
    """A refused request; ``problem`` holds its RFC 9457 body and challenge.

    Its ``detail`` is the problem as a dict, so even FastAPI's default handler shows the
    ``code``; :func:`problem_exception_handler` sends it as ``application/problem+json``.
    """

    def __init__(self, problem: Problem) -> None:
        challenge = problem.www_authenticate
        super().__init__(
            problem.status,
            detail=problem.as_dict(),
            headers=None if challenge is None else {"WWW-Authenticate": challenge},
        )
        self.problem = problem


async def problem_exception_handler(request: Request, exc: Exception) -> Response:
    """Send an :class:`APIKeyHTTPException` as the middleware would: ``problem+json``."""
    if not isinstance(exc, APIKeyHTTPException):
        raise exc
    problem = exc.problem
    return Response(problem.body, problem.status, headers=dict(problem.headers))


def install(app: FastAPI, manager: APIKeyManager | None = None) -> None:
    """Send keyguard refusals as ``application/problem+json`` and set the app-wide manager.

    ``manager`` is the one :func:`require_api_key` uses when it is given none; it is kept
    in ``app.state`` under :data:`MANAGER_STATE`. It also adds a small middleware that
    puts the RateLimit headers of keys the dependency admitted on their responses.
    """
    app.add_exception_handler(APIKeyHTTPException, problem_exception_handler)
    app.add_middleware(_ResponseHeaders)
    if manager is not None:
        setattr(app.state, MANAGER_STATE, manager)


class _ResponseHeaders:
    """Adds the headers a dependency left in ``scope["keyguard.headers"]`` to the response."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            send = with_response_headers(scope, send)
        await self.app(scope, receive, send)


def _security_schemes(pipeline: Pipeline) -> list[APIKeyHeader | HTTPBearer]:
    """One OpenAPI security scheme per credential header, for Swagger's Authorize button."""
    schemes: list[APIKeyHeader | HTTPBearer] = []
    for lower, bearer in pipeline.header_names.items():
        name = pipeline.display_names[lower]
        if bearer:
            schemes.append(
                HTTPBearer(
                    scheme_name="APIKeyBearer",
                    description="An API key sent as 'Authorization: Bearer <key>'.",
                    auto_error=False,
                )
            )
        else:
            schemes.append(
                APIKeyHeader(
                    name=name,
                    scheme_name=(
                        "APIKeyHeader" if lower == "x-api-key" else f"APIKeyHeader-{lower}"
                    ),
                    description=f"An API key sent in the '{name}' header.",
                    auto_error=False,
                )
            )
    return schemes


def require_api_key(
    scopes: Iterable[str] = (),
    manager: APIKeyManager | None = None,
    *,
    header_names: Iterable[str] = DEFAULT_HEADER_NAMES,
    realm: str = "api",
    rate_limits: Iterable[str] = (),
    failure_limit: str | None = DEFAULT_FAILURE_LIMIT,
    trusted_proxies: Iterable[str] = (),
    fail_open: bool = False,
) -> Callable[..., Awaitable[KeyInfo]]:
    """Return a dependency that yields the caller's :class:`~keyguard.KeyInfo` or refuses.

    Use it as ``Depends(require_api_key())`` (or ``Security(...)``, or in a route's or
    router's ``dependencies=``). It takes the key the middleware attached to the request
    (``scope["keyguard.key"]``); if there is none, it reads the credential headers and
    checks the key with ``manager``, else with the app-wide one (see :func:`install`).
    Refusals raise :class:`APIKeyHTTPException`: 401 without a valid key, 400 for an
    ambiguous one, 403 ``insufficient_scope`` when the key lacks one of ``scopes``.

    :param header_names: headers that carry the key, matched in any case and named in
        messages and the OpenAPI document as given here; ``Authorization`` means
        ``Bearer <key>``. Each becomes a security scheme in the OpenAPI document.
    :param realm: the realm in ``WWW-Authenticate`` challenges.
    :param rate_limits: ``failure_limit``, ``trusted_proxies``, ``fail_open``: as for
        :class:`keyguard.asgi.APIKeyMiddleware`, for keys this dependency checks itself (a
        key the middleware admitted was charged there). A key over a limit is refused with
        429; the RateLimit headers reach the response through :func:`install`.
    """
    pipeline = Pipeline(
        header_names=header_names,
        realm=realm,
        required_scopes=scopes,
        rate_limits=rate_limits,
        failure_limit=failure_limit,
        trusted_proxies=trusted_proxies,
        fail_open=fail_open,
    )

    def find_manager(conn: HTTPConnection) -> APIKeyManager:
        if manager is not None:
            return manager
        found = getattr(conn.app.state, MANAGER_STATE, None)
        if found is None:
            raise RuntimeError(
                "require_api_key() has no manager: pass manager=..., or call"
                " keyguard.fastapi.install(app, manager)"
            )
        return found  # type: ignore[no-any-return]

    async def api_key(conn: HTTPConnection, **_schemes: object) -> KeyInfo:
        scope = conn.scope
        client = scope.get("client")
        address = client[0] if client else None
        info = scope.get("keyguard.key")
        outcome: KeyInfo | Admission | Problem | None
        if isinstance(info, KeyInfo):
            outcome = pipeline.admit(info, address)
        else:
            values, _ = read_credentials(pipeline, scope)
            forwarded = forwarded_for(scope) if pipeline.trusted_proxies else ()
            outcome = await pipeline.aauthenticate(
                find_manager(conn), values, (), address, forwarded
            )
            if isinstance(outcome, Admission):
                scope["keyguard.headers"] = outcome.headers
                outcome = outcome.key
            if isinstance(outcome, KeyInfo):
                # Later dependencies in the same request reuse the check.
                scope["keyguard.key"] = outcome
        if outcome is None:
            raise APIKeyHTTPException(pipeline.problems.missing)
        if isinstance(outcome, Problem):
            raise APIKeyHTTPException(outcome)
        return outcome

    # FastAPI reads dependencies from the signature: the schemes document the credential
    # in OpenAPI; their values are ignored, since ``authenticate`` reads the headers exactly.
    parameters = [
        inspect.Parameter(
            "conn", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=HTTPConnection
        ),
        *(
            inspect.Parameter(
                f"_scheme{i}", inspect.Parameter.KEYWORD_ONLY, default=Depends(s), annotation=Any
            )
            for i, s in enumerate(_security_schemes(pipeline))
        ),
    ]
    api_key.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        parameters, return_annotation=KeyInfo
    )
    return api_key
