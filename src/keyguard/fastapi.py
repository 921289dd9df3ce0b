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

from ._http import DEFAULT_HEADER_NAMES, Guard, Problem
from .exceptions import StoreError
from .manager import APIKeyManager
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
    in ``app.state`` under :data:`MANAGER_STATE`.
    """
    app.add_exception_handler(APIKeyHTTPException, problem_exception_handler)
    if manager is not None:
        setattr(app.state, MANAGER_STATE, manager)


class _ManagerFromApp:
    """Stands in for a manager that each request finds in ``app.state``."""

    def verify(self, key: object) -> None:
        raise RuntimeError("the manager is looked up per request")  # pragma: no cover


def _security_schemes(guard: Guard) -> list[APIKeyHeader | HTTPBearer]:
    """One OpenAPI security scheme per credential header, for Swagger's Authorize button."""
    schemes: list[APIKeyHeader | HTTPBearer] = []
    for lower, bearer in guard.header_names.items():
        name = guard.display_names[lower]
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
    """
    guard = Guard(
        manager if manager is not None else _ManagerFromApp(),  # type: ignore[arg-type]
        exempt_paths=(),
        exempt_patterns=(),
        optional=False,
        required_scopes=scopes,
        header_names=header_names,
        query_param=None,
        strip_credentials=False,
        realm=realm,
        error_responder=None,
        allow_cors_preflight=False,
    )
    names = guard.raw_header_names
    problems = guard.problems

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

    async def authenticate(conn: HTTPConnection) -> KeyInfo:
        values = [
            (names[name], value.decode("latin-1"))
            for name, value in conn.scope["headers"]
            if name in names
        ]
        key = guard.extract(values) if values else None
        if key is None:
            raise APIKeyHTTPException(problems.missing)
        if isinstance(key, Problem):
            raise APIKeyHTTPException(key)
        try:
            result = await find_manager(conn).averify(key)
        except StoreError as e:
            logger.error("cannot check API key, the key store failed: %s", e)
            raise APIKeyHTTPException(problems.store_unavailable) from e
        if not result.ok or result.key is None:
            raise APIKeyHTTPException(guard.refusal(result))
        # Later dependencies in the same request reuse the check.
        conn.scope["keyguard.key"] = result.key
        return result.key

    async def api_key(conn: HTTPConnection, **_schemes: object) -> KeyInfo:
        info = conn.scope.get("keyguard.key")
        if not isinstance(info, KeyInfo):
            info = await authenticate(conn)
        if guard.missing_scope(info):
            raise APIKeyHTTPException(problems.insufficient_scope)
        return info

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
            for i, s in enumerate(_security_schemes(guard))
        ),
    ]
    api_key.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        parameters, return_annotation=KeyInfo
    )
    return api_key
