"""Flask integration: the ``KeyGuard`` extension, ``current_key()`` and ``@require_scopes``.

::

    keyguard = KeyGuard(app, APIKeyManager.from_url(), exempt_paths=["/health"])

    @app.post("/items")
    @require_scopes("write")
    def create_item(): ...

``KeyGuard`` mounts :class:`keyguard.wsgi.APIKeyMiddleware` on ``app.wsgi_app``, so every
request is checked before Flask routes it; the decorator then checks per-view scopes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar, cast

from flask import Flask, current_app, request
from flask.wrappers import Response

from .manager import APIKeyManager
from .pipeline import admitted, check_scopes, refund
from .problems import Problem, insufficient_scope
from .records import KeyInfo
from .wsgi import APIKeyMiddleware, authenticate

__all__ = ["EXTENSION_NAME", "KeyGuard", "current_key", "require_scopes"]

#: Where :class:`KeyGuard` registers itself in ``app.extensions``.
EXTENSION_NAME = "keyguard"

logger = logging.getLogger("keyguard")

_View = TypeVar("_View", bound=Callable[..., Any])


class KeyGuard:
    """Require an API key on every request of a Flask app (the app factory pattern works).

    :param manager: checks the keys; default ``APIKeyManager.from_url()`` over the app's
        ``KEYGUARD_STORE`` config value (else ``$KEYGUARD_STORE``, else SQLite).
    :param middleware_options: options of :class:`keyguard.wsgi.APIKeyMiddleware`, such as
        ``exempt_paths=["/health"]``, ``optional=True`` or ``realm="shop"``.
    """

    def __init__(
        self,
        app: Flask | None = None,
        manager: APIKeyManager | None = None,
        **middleware_options: Any,
    ) -> None:
        self.manager = manager
        self.middleware_options = middleware_options
        #: The middleware of the last app initialised (every app gets the same options).
        self.middleware: APIKeyMiddleware | None = None
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        """Mount the middleware on ``app.wsgi_app`` and register in ``app.extensions``."""
        if EXTENSION_NAME in app.extensions:
            raise RuntimeError("KeyGuard is already installed on this app")
        if self.manager is None:
            self.manager = APIKeyManager.from_url(app.config.get("KEYGUARD_STORE"))
        self.middleware = APIKeyMiddleware(
            app.wsgi_app, manager=self.manager, **self.middleware_options
        )
        app.wsgi_app = self.middleware  # type: ignore[method-assign]
        app.extensions[EXTENSION_NAME] = self

    def problem_response(self, problem: Problem) -> Response:
        """``problem`` as a Flask response (``application/problem+json``)."""
        return current_app.response_class(
            problem.body, status=problem.status, headers=list(problem.headers)
        )

    def authenticate(self, environ: dict[str, Any]) -> KeyInfo | Problem:
        """Check the request's key where the middleware did not (exempt paths, preflights).

        Returns the key's record (also stored as ``environ["keyguard.key"]``) or the problem
        to answer with, exactly as the middleware would; a key with usage limits is charged
        and its RateLimit headers are added to the response.
        """
        if self.middleware is None or self.manager is None:
            raise RuntimeError("KeyGuard.init_app(app) has not been called")
        pipeline = self.middleware.pipeline
        outcome = authenticate(pipeline, self.manager, environ)
        if outcome is None:
            return pipeline.problems.missing
        if isinstance(outcome, Problem):
            return outcome
        info = admitted(environ, self.manager, outcome)
        environ["REMOTE_USER"] = info.user_id
        return info

    def insufficient_scope(self, scopes: tuple[str, ...]) -> Problem:
        """The 403 sent when the key lacks one of ``scopes``, naming them in the challenge."""
        if self.middleware is None:
            raise RuntimeError("KeyGuard.init_app(app) has not been called")
        return insufficient_scope(self.middleware.pipeline.realm, scopes)


def current_key() -> KeyInfo | None:
    """The :class:`~keyguard.KeyInfo` of the current request's key, or None if it had none.

    None happens on exempt paths, on CORS preflights (with ``allow_cors_preflight=True``)
    and, with ``optional=True``, on anonymous requests; elsewhere the middleware has already
    refused requests without a valid key.
    """
    key = request.environ.get("keyguard.key")
    return key if isinstance(key, KeyInfo) else None


def _extension() -> KeyGuard:
    guard = current_app.extensions.get(EXTENSION_NAME)
    if not isinstance(guard, KeyGuard):
        raise RuntimeError("@require_scopes needs KeyGuard(app) or KeyGuard().init_app(app)")
    return guard


def require_scopes(*scopes: str) -> Callable[[_View], _View]:
    """Decorate a view so it runs only for a key holding every one of ``scopes``.

    Without a valid key the view answers 401 (on exempt paths and in optional mode the
    decorator checks the key itself); with a key lacking a scope, 403
    ``insufficient_scope``. ``@require_scopes()`` just requires a key. Put it below
    ``@app.route``.
    """
    wanted = check_scopes(scopes)

    def decorator(view: _View) -> _View:
        @functools.wraps(view)
        def guarded(*args: Any, **kwargs: Any) -> Any:
            guard = _extension()
            key = current_key() or guard.authenticate(request.environ)
            if isinstance(key, Problem):
                return guard.problem_response(key)
            if any(scope not in key.scopes for scope in wanted):
                problem = guard.insufficient_scope(wanted)
                refund(request.environ, problem.code)  # admitted, then refused here
                return guard.problem_response(problem)
            return current_app.ensure_sync(view)(*args, **kwargs)

        return cast(_View, guarded)

    return decorator
