"""What the ASGI and WSGI middleware share around the pipeline, validated once.

:class:`Guard` holds a :class:`~keyguard.pipeline.Pipeline` plus the options that decide
what happens around it: which paths skip it, whether a request without a key may pass,
whether credentials are stripped, and how refusals are rendered. The middleware put their
guard in ``scope["keyguard.guard"]`` / ``environ["keyguard.guard"]`` so that per-route
helpers (``require_scopes``) refuse with the same realm, headers and renderer.

Exempt patterns never exempt an ambiguous path (:func:`is_ambiguous_path`): one that a
server, proxy or router behind the middleware may read as another route, such as
``/docs/..;/admin``, ``/docs//x`` (Werkzeug routes it to a catch-all rule) or
``/docs/%2e%2e/admin`` (``..`` for a server that decodes twice).
"""

from __future__ import annotations

import logging
import re
import traceback
import unicodedata
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Generic, TypeVar
from urllib.parse import unquote

from .keys import mask_key, redact_keys
from .pipeline import DEFAULT_AUTH_SCHEMES, DEFAULT_FAILURE_LIMIT, DEFAULT_HEADER_NAMES, Pipeline
from .problems import ErrorResponder, ErrorResponse, InvalidResponse, Problem, checked_response

if TYPE_CHECKING:
    from .manager import APIKeyManager

__all__ = ["Guard", "Middleware", "has_dot_segment", "is_ambiguous_path"]

_App = TypeVar("_App")

logger = logging.getLogger("keyguard")


def has_dot_segment(path: str) -> bool:
    """Whether ``path`` has a segment that a server or proxy behind this one may collapse.

    That is a ``.`` or ``..`` segment, also with a path parameter (``..;x``, which
    Tomcat-style servers read as ``..``), or any backslash (which some normalise to ``/``).
    An exempt pattern never exempts such a path: it may reach another route behind us.
    """
    if "\\" in path:
        return True
    if "/." not in path:
        return False
    return any(segment.partition(";")[0] in (".", "..") for segment in path.split("/"))


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Decodings tried beyond the server's one; a path still encoded after them is refused.
_MAX_DECODINGS = 3


def _collapses(path: str) -> bool:
    return "//" in path or has_dot_segment(path) or _CONTROL.search(path) is not None


def is_ambiguous_path(path: str) -> bool:
    """Whether a server, proxy or router behind this one may read ``path`` as another path.

    That is a path with a dot segment or backslash (:func:`has_dot_segment`), an empty
    segment (``//``: nginx and Werkzeug merge them, and Werkzeug routes ``/docs//x`` to a
    catch-all ``/<path:p>`` rather than to ``/docs/<path:p>``) or a control character (URL
    parsers drop tabs and newlines, so ``.\\t.`` becomes ``..``); also one that has any of
    these once percent-decoded again (``%2e%2e``, for a server that decodes twice) or in
    NFKC form (fullwidth full stops). An exempt pattern never exempts such a path.
    """
    for _ in range(_MAX_DECODINGS + 1):
        if _collapses(path):
            return True
        if not path.isascii() and _collapses(unicodedata.normalize("NFKC", path)):
            return True
        decoded = unquote(path) if "%" in path else path
        if decoded == path:
            return False
        path = decoded
    return True


def _check_exempt_path(path: object) -> str:
    if not isinstance(path, str):
        raise TypeError(f"exempt paths must be str, not {type(path).__name__}")
    if (
        not path.startswith("/")
        or "//" in path
        or has_dot_segment(path)
        or not path.isprintable()
        or any(c in path for c in " ?#")
    ):
        raise ValueError(
            f"exempt path {path!r} must be a normalised absolute path such as '/health'"
            " (no '//', '.' or '..' segments, backslash, query, fragment or spaces)"
        )
    return path


class Guard:
    """A pipeline and the middleware options around it.

    The options are described by :class:`keyguard.asgi.APIKeyMiddleware`; each has the
    middleware's default, so a framework helper names only what it uses.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        *,
        exempt_paths: Iterable[str] = (),
        exempt_patterns: Iterable[str | re.Pattern[str]] = (),
        optional: bool = False,
        strip_credentials: bool = False,
        error_responder: ErrorResponder | None = None,
        allow_cors_preflight: bool = False,
    ) -> None:
        self.pipeline = pipeline
        if isinstance(exempt_paths, str) or isinstance(exempt_patterns, (str, re.Pattern)):
            raise TypeError("exempt_paths and exempt_patterns take a list, not a single string")
        self.exempt_paths = frozenset(_check_exempt_path(p) for p in exempt_paths)
        self.exempt_patterns = tuple(
            p if isinstance(p, re.Pattern) else re.compile(p) for p in exempt_patterns
        )
        self.optional = bool(optional)
        if self.optional and pipeline.required_scopes:
            raise ValueError(
                "optional=True lets callers without a key through, so required_scopes would"
                " only bind callers who send one; require scopes per route instead"
            )
        self.strip_credentials = bool(strip_credentials)
        if error_responder is not None and not callable(error_responder):
            raise TypeError("error_responder must be callable")
        self.error_responder = error_responder
        self.allow_cors_preflight = bool(allow_cors_preflight)

    def is_exempt_by_pattern(self, path: str) -> bool:
        """Whether an exempt pattern fullmatches ``path``; ambiguous paths never do
        (:func:`is_ambiguous_path`)."""
        if is_ambiguous_path(path):
            return False
        return any(p.fullmatch(path) for p in self.exempt_patterns)

    def render(
        self, problem: Problem, request: Mapping[str, object], credentials: Iterable[str]
    ) -> ErrorResponse | None:
        """The user's rendering of ``problem``, or None to send the precomputed default.

        A responder that raises or returns something unusable is a bug in the app, but a
        refusal must stay a refusal: the error is logged (with every one of the request's
        ``credentials`` masked) and the default response is sent instead, never a 500.
        """
        if self.error_responder is None:
            return None
        try:
            response = self.error_responder(problem, request)
            if response is None:
                return None
            return checked_response(response)
        except InvalidResponse as e:
            logger.error(
                "error_responder returned an unusable response for %s (%s); sent the default",
                problem.code,
                e,
            )
        except Exception:
            logger.error(
                "error_responder raised on %s; sent the default response\n%s",
                problem.code,
                _redact(traceback.format_exc().rstrip(), credentials),
            )
        return None


def _redact(text: str, credentials: Iterable[str]) -> str:
    """``text`` with every part of every credential value masked (keys or not), and every
    key-shaped string."""
    parts = {p for value in credentials for p in re.split(r"[\s,]+", value)}
    # Longest first, so a key is masked whole before any part of it.
    for part in sorted(parts, key=len, reverse=True):
        if len(part) >= 6 and part.lower() != "bearer":
            text = text.replace(part, mask_key(part))
    # A key beside a character that repr() escapes (NUL, a quote, 'é') is not one of the
    # parts above as the traceback shows it: mask every key-shaped string as well.
    return redact_keys(text)


class Middleware(Generic[_App]):
    """What the ASGI and WSGI middleware share: their options, validated once at start-up.

    The options are documented on :class:`keyguard.asgi.APIKeyMiddleware`.
    """

    def __init__(
        self,
        app: _App,
        *,
        manager: APIKeyManager,
        exempt_paths: Iterable[str] = (),
        exempt_patterns: Iterable[str | re.Pattern[str]] = (),
        optional: bool = False,
        required_scopes: Iterable[str] = (),
        header_names: Iterable[str] = DEFAULT_HEADER_NAMES,
        auth_schemes: Iterable[str] = DEFAULT_AUTH_SCHEMES,
        query_param: str | None = None,
        strip_credentials: bool = False,
        realm: str = "api",
        error_responder: ErrorResponder | None = None,
        allow_cors_preflight: bool = False,
        rate_limits: Iterable[str] = (),
        failure_limit: str | None = DEFAULT_FAILURE_LIMIT,
        trusted_proxies: Iterable[str] = (),
        fail_open: bool = False,
    ) -> None:
        if not callable(getattr(manager, "check", None)):
            raise TypeError(f"manager must be an APIKeyManager, got {manager!r}")
        self.app = app
        self.manager = manager
        self.pipeline = Pipeline(
            header_names=header_names,
            auth_schemes=auth_schemes,
            query_param=query_param,
            realm=realm,
            required_scopes=required_scopes,
            rate_limits=rate_limits,
            failure_limit=failure_limit,
            trusted_proxies=trusted_proxies,
            fail_open=fail_open,
        )
        self.guard = Guard(
            self.pipeline,
            exempt_paths=exempt_paths,
            exempt_patterns=exempt_patterns,
            optional=optional,
            strip_credentials=strip_credentials,
            error_responder=error_responder,
            allow_cors_preflight=allow_cors_preflight,
        )
        self._checks_path = bool(self.guard.exempt_paths or self.guard.exempt_patterns)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(app={self.app!r}, manager={self.manager!r})"
