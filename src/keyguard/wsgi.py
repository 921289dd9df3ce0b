"""Pure WSGI middleware: every request needs a valid API key before the app sees it.

Mount it in Flask as ``app.wsgi_app = APIKeyMiddleware(app.wsgi_app, manager=m)``, or
around any WSGI callable. It takes the same options as :mod:`keyguard.asgi`; on success it
sets ``environ["keyguard.key"]`` (the :class:`~keyguard.KeyInfo`) and ``REMOTE_USER``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from ._middleware import Guard, Middleware
from .pipeline import Admission, Pipeline, admitted
from .problems import ErrorResponder, ErrorResponse, Problem
from .records import KeyInfo

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIEnvironment

    from .manager import APIKeyManager

# ErrorResponder, ErrorResponse and Problem live in keyguard.problems; re-exported here.
__all__ = ["APIKeyMiddleware", "ErrorResponder", "ErrorResponse", "Problem", "WSGIApp"]

#: A PEP 3333 application: ``app(environ, start_response) -> iterable of bytes``.
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class APIKeyMiddleware(Middleware[WSGIApp]):
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

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        guard = self.guard
        if (self._checks_path and self._is_exempt(environ.get("PATH_INFO", ""))) or (
            guard.allow_cors_preflight
            and environ.get("REQUEST_METHOD") == "OPTIONS"
            and "HTTP_ORIGIN" in environ
            and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ
        ):
            return self._let_through(environ, start_response)
        outcome = authenticate(self.pipeline, self.manager, environ)
        if isinstance(outcome, Admission):
            start_response = with_response_headers(environ, start_response)
        if isinstance(outcome, (KeyInfo, Admission)):
            info = admitted(environ, self.manager, outcome)
            environ["keyguard.guard"] = guard
            environ["REMOTE_USER"] = info.user_id
            if guard.strip_credentials:
                self._strip_credentials(environ)
            return self.app(environ, start_response)
        if outcome is None and guard.optional:
            return self._let_through(environ, start_response)
        problem = guard.pipeline.problems.missing if outcome is None else outcome
        return refuse(guard, environ, start_response, problem)

    def _is_exempt(self, path: str) -> bool:
        """Whether ``PATH_INFO`` (PEP 3333: UTF-8 bytes as latin-1 text) is exempt."""
        if not path.isascii():
            try:
                path = path.encode("latin-1").decode("utf-8")
            except UnicodeError:
                return False
        guard = self.guard
        return path in guard.exempt_paths or (
            bool(guard.exempt_patterns) and guard.is_exempt_by_pattern(path)
        )

    def _let_through(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        environ["keyguard.key"] = None
        environ["keyguard.guard"] = self.guard
        if self.guard.strip_credentials:
            self._strip_credentials(environ)
        # A framework helper may still admit a key here and leave headers for the response.
        return self.app(environ, with_response_headers(environ, start_response))

    def _strip_credentials(self, environ: WSGIEnvironment) -> None:
        for name, bearer in self.pipeline.environ_names:
            value = environ.get(name)
            if value is not None and self.pipeline.carries_key(bearer, value):
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


def authenticate(
    pipeline: Pipeline, manager: APIKeyManager, environ: WSGIEnvironment
) -> KeyInfo | Admission | Problem | None:
    """Run ``pipeline`` on a request: its credentials, ``REMOTE_ADDR`` and, behind trusted
    proxies, ``X-Forwarded-For``. Shared by the middleware and the Flask extension."""
    values, query_values = read_credentials(pipeline, environ)
    forwarded = environ.get("HTTP_X_FORWARDED_FOR") if pipeline.trusted_proxies else None
    return pipeline.authenticate(
        manager,
        values,
        query_values,
        environ.get("REMOTE_ADDR"),
        (forwarded,) if forwarded else (),
    )


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


def with_response_headers(
    environ: WSGIEnvironment, start_response: StartResponse
) -> StartResponse:
    """``start_response``, adding ``environ["keyguard.headers"]`` (RateLimit fields) if set.

    They are added at every call, so an error response started after a failed one keeps
    them too.
    """

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        extra = environ.get("keyguard.headers")
        if extra:
            headers = [*headers, *extra]
        return start_response(status, headers, exc_info)

    return start


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
