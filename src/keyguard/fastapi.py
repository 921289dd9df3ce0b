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
"Authorize" button works, and after :func:`install` its refusals (400, 401, 403 where
scopes are required, 503) as ``application/problem+json`` responses.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator
from http import HTTPStatus
from typing import Any

from fastapi import Depends, FastAPI, HTTPException
from fastapi.dependencies.models import Dependant
from fastapi.requests import HTTPConnection, Request
from fastapi.responses import Response
from fastapi.routing import APIRoute
from fastapi.security import APIKeyHeader, HTTPBearer

from .asgi import ASGIApp, Receive, Scope, Send, authenticate, caller, with_response_headers
from .manager import APIKeyManager
from .pipeline import (
    DEFAULT_AUTH_SCHEMES,
    DEFAULT_FAILURE_LIMIT,
    DEFAULT_HEADER_NAMES,
    Admission,
    Pipeline,
    admitted,
    arefund,
)
from .problems import PROBLEM_CONTENT_TYPE, Problem, Problems
from .records import KeyInfo

__all__ = [
    "MANAGER_STATE",
    "PROBLEM_SCHEMA",
    "APIKeyHTTPException",
    "document_refusals",
    "install",
    "problem_exception_handler",
    "refusal_responses",
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

    It also documents those refusals in the OpenAPI document: every operation that
    depends on :func:`require_api_key` lists its 400, 401, 403 (``ip_not_allowed``, and
    ``insufficient_scope`` when it requires scopes), 429 and 503 responses with the
    ``Problem`` schema, unless the route declares that status itself. It adds a small
    middleware that puts the RateLimit headers of keys the dependency admitted on their
    responses. ``manager`` is the one :func:`require_api_key` uses when it is given none;
    it is kept in ``app.state`` under :data:`MANAGER_STATE`.
    """
    app.add_exception_handler(APIKeyHTTPException, problem_exception_handler)
    app.add_middleware(_ResponseHeaders)
    if manager is not None:
        setattr(app.state, MANAGER_STATE, manager)
    if getattr(app.openapi, "keyguard_documents_refusals", False):
        return
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document_refusals(app, build())
        return app.openapi_schema  # type: ignore[return-value]

    openapi.keyguard_documents_refusals = True  # type: ignore[attr-defined]
    app.openapi = openapi  # type: ignore[method-assign]


#: The OpenAPI schema of a refusal's body (RFC 9457), as ``components/schemas/Problem``.
PROBLEM_SCHEMA: dict[str, Any] = {
    "title": "Problem",
    "description": "Why keyguard refused the request (RFC 9457 problem details).",
    "type": "object",
    "required": ["type", "title", "status", "detail", "code"],
    "properties": {
        "type": {"type": "string", "example": "about:blank"},
        "title": {"type": "string", "description": "The status phrase."},
        "status": {"type": "integer"},
        "detail": {"type": "string", "description": "A sentence for people."},
        "code": {"type": "string", "description": "A stable name for programs."},
    },
}


_LIMIT_HEADERS: dict[str, Any] = {
    "Retry-After": {
        "description": "Whole seconds until the request can succeed (absent when a quota"
        " is never refilled).",
        "schema": {"type": "integer"},
    },
    "RateLimit-Policy": {
        "description": "The key's limits (draft-ietf-httpapi-ratelimit-headers-11).",
        "schema": {"type": "string"},
    },
    "RateLimit": {
        "description": "What is left of each limit, and when it resets.",
        "schema": {"type": "string"},
    },
}


def _pipelines(dependant: Dependant) -> Iterator[Pipeline]:
    """The pipelines of every :func:`require_api_key` dependency under ``dependant``."""
    for sub in dependant.dependencies:
        pipeline = getattr(sub.call, "keyguard_pipeline", None)
        if isinstance(pipeline, Pipeline):
            yield pipeline
        yield from _pipelines(sub)


def refusal_responses(pipelines: Iterable[Pipeline]) -> dict[str, dict[str, Any]]:
    """OpenAPI ``responses`` for the refusals of ``pipelines``, keyed by status code."""
    found: dict[int, dict[str, Problem]] = {}
    for pipeline in pipelines:
        candidates = list(pipeline.problems)
        # Any key may carry its own limits; the failed-check throttle is on unless turned off.
        candidates.append(Problems.limited("rate_limited", 1, ()))
        candidates.append(Problems.limited("quota_exceeded", None, ()))
        if pipeline.failure_limit is not None:
            candidates.append(pipeline.problems.too_many_failures(1))
        for problem in candidates:
            if problem.code == "insufficient_scope" and not pipeline.required_scopes:
                continue  # only a dependency that requires scopes refuses for a scope
            found.setdefault(problem.status, {}).setdefault(problem.code, problem)
    responses: dict[str, dict[str, Any]] = {}
    for status, problems in sorted(found.items()):
        codes = ", ".join(f"`{code}`" for code in sorted(problems))
        example = next(iter(problems.values()))
        response: dict[str, Any] = {
            "description": f"{HTTPStatus(status).phrase}: {codes}.",
            "content": {
                PROBLEM_CONTENT_TYPE: {
                    "schema": {"$ref": "#/components/schemas/Problem"},
                    "example": example.as_dict(),
                }
            },
        }
        if any(p.www_authenticate for p in problems.values()):
            response["headers"] = {
                "WWW-Authenticate": {
                    "description": "The RFC 6750 Bearer challenge.",
                    "schema": {"type": "string"},
                }
            }
        if status == 429:
            response["headers"] = _LIMIT_HEADERS
        responses[str(status)] = response
    return responses


def document_refusals(app: FastAPI, document: dict[str, Any]) -> None:
    """Add the refusals of every keyguard-guarded operation to the OpenAPI ``document``."""
    used = False
    for route in app.routes:
        if not isinstance(route, APIRoute) or not route.include_in_schema:
            continue
        responses = refusal_responses(_pipelines(route.dependant))
        path = document.get("paths", {}).get(route.path_format)
        if not responses or path is None:
            continue
        for method in route.methods or ():
            operation = path.get(method.lower())
            if operation is None:
                continue
            declared = operation.setdefault("responses", {})
            for status, response in responses.items():
                declared.setdefault(status, response)
            used = True
    if used:
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas.setdefault("Problem", PROBLEM_SCHEMA)


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
                    # A code span, or Swagger UI's Markdown would swallow <key> as a tag.
                    description="An API key, sent as `Authorization: Bearer <key>`.",
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
                    description=f"An API key, sent in the `{name}` header.",
                    auto_error=False,
                )
            )
    return schemes


def require_api_key(
    scopes: Iterable[str] = (),
    manager: APIKeyManager | None = None,
    *,
    header_names: Iterable[str] = DEFAULT_HEADER_NAMES,
    auth_schemes: Iterable[str] = DEFAULT_AUTH_SCHEMES,
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
    :param auth_schemes: the ``Authorization`` schemes that carry a key (default ``Bearer``).
    :param realm: the realm in ``WWW-Authenticate`` challenges.
    :param rate_limits: ``failure_limit``, ``trusted_proxies``, ``fail_open``: as for
        :class:`keyguard.asgi.APIKeyMiddleware`, for keys this dependency checks itself (a
        key the middleware admitted was charged there). A key over a limit is refused with
        429; the RateLimit headers reach the response through :func:`install`.
    """
    pipeline = Pipeline(
        header_names=header_names,
        auth_schemes=auth_schemes,
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
        info = scope.get("keyguard.key")
        outcome: KeyInfo | Admission | Problem | None
        if isinstance(info, KeyInfo):
            outcome = pipeline.admit(info, caller(pipeline, scope))
            if isinstance(outcome, Problem):
                # The middleware admitted (and charged) the key; this route refuses it.
                await arefund(scope, outcome.code)
        else:
            manager = find_manager(conn)
            outcome = await authenticate(pipeline, manager, scope)
            if isinstance(outcome, (KeyInfo, Admission)):
                # Later dependencies in the same request reuse the check.
                outcome = admitted(scope, manager, outcome)
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
    api_key.keyguard_pipeline = pipeline  # type: ignore[attr-defined]  # for the OpenAPI refusals
    return api_key
