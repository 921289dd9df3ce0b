"""Pure WSGI middleware: every request needs a valid API key before the app sees it.

Mount it in Flask as ``app.wsgi_app = APIKeyMiddleware(app.wsgi_app, manager=m)``, or
around any WSGI callable. It takes the same options as :mod:`keyguard.asgi`; on success it
sets ``environ["keyguard.key"]`` (the :class:`~keyguard.KeyInfo`) and ``REMOTE_USER``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING

from ._http import (
    DEFAULT_HEADER_NAMES,
    MAX_CREDENTIAL_LENGTH,
    ErrorResponder,
    ErrorResponse,
    Guard,
    Problem,
    carries_key,
)
from .exceptions import StoreError
from .manager import Reason
from .records import KeyInfo

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

    from .manager import APIKeyManager

__all__ = ["APIKeyMiddleware", "ErrorResponder", "ErrorResponse", "Problem"]

logger = logging.getLogger("keyguard")

_BEARER_PREFIXES = ("Bearer ", "bearer ")
_MALFORMED = Reason.MALFORMED


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
        self._environ_names = self.guard.environ_names
        self._exempt = frozenset(_wsgi_text(p) for p in self.guard.exempt_paths)
        self._has_patterns = bool(self.guard.exempt_patterns)
        self._preflight = self.guard.allow_cors_preflight
        self._simple = query_param is None
        self._strip = self.guard.strip_credentials
        self._required = bool(self.guard.required_scopes)
        self._problems = self.guard.problems
        self._check = self.guard.checks.check

    def __repr__(self) -> str:
        return f"APIKeyMiddleware(app={self.app!r}, manager={self.manager!r})"

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        path: str = environ.get("PATH_INFO", "")
        if (
            path in self._exempt
            or (self._has_patterns and self._exempt_by_pattern(path))
            or (
                self._preflight
                and environ.get("REQUEST_METHOD") == "OPTIONS"
                and "HTTP_ORIGIN" in environ
                and "HTTP_ACCESS_CONTROL_REQUEST_METHOD" in environ
            )
        ):
            return self._let_through(environ, start_response)

        # Fast path: one credential header in its usual form, checked without parsing; any
        # other shape (or a refusal as malformed) goes through the exact reader below.
        key: str | None = None
        found = 0
        bearer = False
        for env_name, is_bearer in self._environ_names:
            value = environ.get(env_name)
            if value is not None:
                found += 1
                bearer = is_bearer
                key = value
        if found == 1 and self._simple and key is not None and len(key) <= MAX_CREDENTIAL_LENGTH:
            if bearer:
                key = key[7:] if key[:7] in _BEARER_PREFIXES else None
        else:
            key = None

        outcome: KeyInfo | Problem | None
        if key is None:
            outcome = self._authenticate(environ)
        else:
            try:
                result = self._check(key)
            except StoreError as e:
                outcome = self._store_failed(e)
            else:
                if isinstance(result, KeyInfo):
                    outcome = result
                elif result.reason is _MALFORMED:
                    outcome = self._authenticate(environ)
                else:
                    outcome = self.guard.refusal(result)

        if outcome is None:
            if self.guard.optional:
                return self._let_through(environ, start_response)
            return self._refuse(environ, start_response, self._problems.missing)
        if isinstance(outcome, Problem):
            return self._refuse(environ, start_response, outcome)
        if self._required and self.guard.missing_scope(outcome):
            return self._refuse(environ, start_response, self._problems.insufficient_scope)
        environ["keyguard.key"] = outcome
        environ["REMOTE_USER"] = outcome.user_id
        if self._strip:
            self._strip_credentials(environ)
        return self.app(environ, start_response)

    def _exempt_by_pattern(self, path: str) -> bool:
        if not path.isascii():
            try:
                path = path.encode("latin-1").decode("utf-8")
            except UnicodeError:
                return False
        return self.guard.is_exempt_by_pattern(path)

    def _authenticate(self, environ: WSGIEnvironment) -> KeyInfo | Problem | None:
        """The exact path: read every credential, then verify the one key found."""
        guard = self.guard
        values = [
            (bearer, environ[name]) for name, bearer in self._environ_names if name in environ
        ]
        query_values: list[str] = []
        if guard.query_param is not None and environ.get("QUERY_STRING"):
            query_values, _ = guard.split_query(environ["QUERY_STRING"])
        key = guard.extract(values, query_values)
        if key is None or isinstance(key, Problem):
            return key
        try:
            result = self._check(key)
        except StoreError as e:
            return self._store_failed(e)
        return result if isinstance(result, KeyInfo) else guard.refusal(result)

    def _store_failed(self, error: StoreError) -> Problem:
        logger.error("cannot check API key, the key store failed: %s", error)
        return self._problems.store_unavailable

    def _let_through(
        self, environ: WSGIEnvironment, start_response: StartResponse
    ) -> Iterable[bytes]:
        environ["keyguard.key"] = None
        if self._strip:
            self._strip_credentials(environ)
        return self.app(environ, start_response)

    def _strip_credentials(self, environ: WSGIEnvironment) -> None:
        for name, bearer in self._environ_names:
            value = environ.get(name)
            if value is not None and carries_key(bearer, value):
                del environ[name]
        query = environ.get("QUERY_STRING")
        if self.guard.query_param is not None and query:
            _, rest = self.guard.split_query(query)
            environ["QUERY_STRING"] = rest
            # Servers also expose the raw request target, query included.
            for name in ("REQUEST_URI", "RAW_URI"):
                target = environ.get(name)
                if isinstance(target, str) and "?" in target:
                    base = target.partition("?")[0]
                    environ[name] = f"{base}?{rest}" if rest else base

    def _refuse(
        self, environ: WSGIEnvironment, start_response: StartResponse, problem: Problem
    ) -> Iterable[bytes]:
        """Send ``problem`` (or the user's rendering of it) without calling the app."""
        custom = self.guard.render(problem, environ)
        if custom is None:
            start_response(problem.status_line, list(problem.headers))
            return [problem.body]
        try:
            phrase = HTTPStatus(custom.status).phrase
        except ValueError:
            phrase = "Error"
        start_response(f"{custom.status} {phrase}", list(custom.headers))
        return [custom.body]
