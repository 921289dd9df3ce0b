"""Pure WSGI middleware: every request needs a valid API key before the app sees it.

Mount it in Flask as ``app.wsgi_app = APIKeyMiddleware(app.wsgi_app, manager=m)``, or
around any WSGI callable. It takes the same options as :mod:`keyguard.asgi`; on success it
sets ``environ["keyguard.key"]`` (the :class:`~keyguard.KeyInfo`) and ``REMOTE_USER``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING

from ._middleware import Guard
from .pipeline import DEFAULT_HEADER_NAMES, Pipeline, carries_key
from .problems import ErrorResponder, ErrorResponse, Problem
from .records import KeyInfo

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from .manager import APIKeyManager

# ErrorResponder, ErrorResponse and Problem live in keyguard.problems; re-exported here.
__all__ = ["APIKeyMiddleware", "ErrorResponder", "ErrorResponse", "Problem"]


def _wsgi_text(path: str) -> str:
    """PEP 3333 str (latin-1 code points) for the UTF-8 text ``path``."""
    return path.encode("utf-8").decode("latin-1")


class APIKeyMiddleware:
    """Require a valid API key before the wrapped WSGI app sees a request.

    Options are those of :class:`keyguard.asgi.APIKeyMiddleware`; exempt paths are matched
    against ``PATH_INFO``, which is already relative to the mount point (``SCRIPT_NAME``).
    ``error_responder`` receives the WSGI ``environ`` instead of the ASGI scope.
    ``allow_cors_preflight`` is off by default for the same reason: with it on, anyone can
    reach the app's ``OPTIONS`` handling without a key, so the app must answer preflights
    itself without leaking data. Prefer a CORS middleware outside this one; with Flask-CORS,
    which runs inside, turning it on is safe as long as no view declares ``OPTIONS`` (Flask
    then answers ``OPTIONS`` itself, without calling a view).
    """

    def __init__(
        self,
        app: WSGIApplication,
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
        if not callable(getattr(manager, "check", None)):
            raise TypeError(f"manager must be an APIKeyManager, got {manager!r}")
        self.app = app
        self.manager = manager
        self.guard = Guard(
            header_names=header_names,
            query_param=query_param,
            realm=realm,
            required_scopes=required_scopes,
            exempt_paths=exempt_paths,
            exempt_patterns=exempt_patterns,
            optional=optional,
            strip_credentials=strip_credentials,
            error_responder=error_responder,
            allow_cors_preflight=allow_cors_preflight,
        )
        self.pipeline = self.guard.pipeline
        self._exempt = frozenset(_wsgi_text(p) for p in self.guard.exempt_paths)

    def __repr__(self) -> str:
        return f"APIKeyMiddleware(app={self.app!r}, manager={self.manager!r})"

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        guard = self.guard
        path: str = environ.get("PATH_INFO", "")
        if (
            path in self._exempt
            or (guard.exempt_patterns and self._exempt_by_pattern(path))
            or (
                guard.allow_cors_preflight
                and environ.get("REQUEST_METHOD") == "OPTIONS"
                and "HTTP_ORIGIN" in environ
                and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ
            )
        ):
            return self._let_through(environ, start_response)
        values, query_values = read_credentials(self.pipeline, environ)
        outcome = self.pipeline.authenticate(
            self.manager, values, query_values, environ.get("REMOTE_ADDR")
        )
        if isinstance(outcome, KeyInfo):
            environ["keyguard.key"] = outcome
            environ["keyguard.guard"] = guard
            environ["REMOTE_USER"] = outcome.user_id
            if guard.strip_credentials:
                self._strip_credentials(environ)
            return self.app(environ, start_response)
        if outcome is None and guard.optional:
            return self._let_through(environ, start_response)
        problem = guard.problems.missing if outcome is None else outcome
        return refuse(guard, environ, start_response, problem)

    def _exempt_by_pattern(self, path: str) -> bool:
        if not path.isascii():
            try:
                path = path.encode("latin-1").decode("utf-8")
            except UnicodeError:
                return False
        return self.guard.is_exempt_by_pattern(path)

    def _let_through(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        environ["keyguard.key"] = None
        environ["keyguard.guard"] = self.guard
        if self.guard.strip_credentials:
            self._strip_credentials(environ)
        return self.app(environ, start_response)

    def _strip_credentials(self, environ: WSGIEnvironment) -> None:
        for name, bearer in self.pipeline.environ_names:
            value = environ.get(name)
            if value is not None and carries_key(bearer, value):
                del environ[name]
        query = environ.get("QUERY_STRING")
        if self.pipeline.query_param is not None and query:
            _, rest = self.pipeline.split_query(query)
            environ["QUERY_STRING"] = rest
            # Servers also expose the raw request target, query included.
            for name in ("REQUEST_URI", "RAW_URI"):
                target = environ.get(name)
                if isinstance(target, str) and "?" in target:
                    base = target.partition("?")[0]
                    environ[name] = f"{base}?{rest}" if rest else base


def read_credentials(
    pipeline: Pipeline, environ: WSGIEnvironment
) -> tuple[list[tuple[bool, str]], list[str]]:
    """The credential header values (with their Bearer flag) and query values of a request."""
    values = []
    for name, bearer in pipeline.environ_names:
        if name in environ:
            values.append((bearer, environ[name]))
    query_values: list[str] = []
    if pipeline.query_param is not None and environ.get("QUERY_STRING"):
        query_values, _ = pipeline.split_query(environ["QUERY_STRING"])
    return values, query_values


def refuse(
    guard: Guard, environ: WSGIEnvironment, start_response: StartResponse, problem: Problem
) -> Iterable[bytes]:
    """Send ``problem`` (or the guard's ``error_responder`` rendering of it)."""
    values, query_values = read_credentials(guard.pipeline, environ)
    credentials = [v for _, v in values] + query_values
    custom = guard.render(problem, environ, credentials)
    if custom is None:
        start_response(problem.status_line, list(problem.headers))
        return [problem.body]
    try:
        phrase = HTTPStatus(custom.status).phrase
    except ValueError:
        phrase = "Error"
    start_response(f"{custom.status} {phrase}", list(custom.headers))
    return [custom.body]
