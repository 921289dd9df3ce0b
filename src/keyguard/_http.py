"""HTTP details shared by the ASGI and WSGI middleware, validated and precomputed once.

:class:`Guard` holds the options common to both middlewares; it reads credentials from
header values (``Authorization: Bearer <key>`` or a raw key header) and an optional query
parameter, and owns the catalogue of :class:`Problem` responses (RFC 9457 bodies with
RFC 6750 ``WWW-Authenticate`` challenges). The middlewares keep only the per-request loop.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any, NamedTuple, cast
from urllib.parse import unquote_plus

from .keys import mask_key
from .manager import APIKeyManager, Reason, Verification

if TYPE_CHECKING:
    from collections.abc import Awaitable

    from .records import KeyInfo

__all__ = [
    "DEFAULT_HEADER_NAMES",
    "MAX_CREDENTIAL_LENGTH",
    "Checks",
    "ErrorResponder",
    "ErrorResponse",
    "Guard",
    "Problem",
    "Problems",
    "check_scopes",
    "how_to_send",
    "insufficient_scope",
    "manager_checks",
]

logger = logging.getLogger("keyguard")

#: The headers read by default, spelled as messages show them.
DEFAULT_HEADER_NAMES = ("Authorization", "X-API-Key")
#: Longest credential header value read, in bytes; longer ones are refused unparsed.
MAX_CREDENTIAL_LENGTH = 8192
PROBLEM_CONTENT_TYPE = "application/problem+json"
#: WebSocket close codes (RFC 6455): policy violation, and "try again later".
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013

# RFC 7230 token characters (header names) and RFC 6749 scope-token characters.
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SCOPE_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_QUOTABLE_RE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")
# A header value must encode to latin-1 and hold no CR, LF or NUL.
_BAD_HEADER_VALUE_RE = re.compile(r"[^\x00-\xff]|[\r\n\x00]")
# Header names that a WSGI server does not pass as HTTP_*, or that cannot carry a key.
_UNUSABLE_HEADERS = frozenset({"content-type", "content-length", "cookie", "host"})


class ErrorResponse(NamedTuple):
    """A complete HTTP error response, independent of any framework."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes


#: Renders a refusal: ``(problem, scope_or_environ) -> ErrorResponse``, or None for the default.
ErrorResponder = Callable[["Problem", Mapping[str, Any]], "ErrorResponse | None"]


@dataclass(frozen=True, eq=False)
class Problem:
    """One way a request can be refused, with its response precomputed.

    ``code`` is the stable machine-readable name (``missing_api_key``, ``invalid_api_key``,
    ...); ``www_authenticate`` is the RFC 6750 challenge sent with it, if any.
    """

    status: int
    code: str
    detail: str
    www_authenticate: str | None = None
    title: str = field(init=False)
    #: The RFC 9457 ``application/problem+json`` body.
    body: bytes = field(init=False, repr=False)
    headers: tuple[tuple[str, str], ...] = field(init=False, repr=False)
    status_line: str = field(init=False, repr=False)
    raw_headers: tuple[tuple[bytes, bytes], ...] = field(init=False, repr=False)
    close_code: int = field(init=False, repr=False)

    def __post_init__(self) -> None:
        phrase = HTTPStatus(self.status).phrase
        body = json.dumps(self.as_dict(phrase), separators=(",", ":")).encode()
        headers = [("content-type", PROBLEM_CONTENT_TYPE), ("content-length", str(len(body)))]
        if self.www_authenticate is not None:
            headers.append(("www-authenticate", self.www_authenticate))
        setattr_ = object.__setattr__
        setattr_(self, "title", phrase)
        setattr_(self, "body", body)
        setattr_(self, "headers", tuple(headers))
        setattr_(self, "status_line", f"{self.status} {phrase}")
        setattr_(self, "raw_headers", tuple((n.encode(), v.encode()) for n, v in headers))
        close = CLOSE_TRY_AGAIN_LATER if self.status >= 500 else CLOSE_POLICY_VIOLATION
        setattr_(self, "close_code", close)

    def as_dict(self, title: str | None = None) -> dict[str, Any]:
        """The RFC 9457 members: ``type``, ``title``, ``status``, ``detail`` and ``code``."""
        return {
            "type": "about:blank",
            "title": self.title if title is None else title,
            "status": self.status,
            "detail": self.detail,
            "code": self.code,
        }

    @property
    def response(self) -> ErrorResponse:
        """The default response (a fresh header list, so callers may extend it)."""
        return ErrorResponse(self.status, list(self.headers), self.body)


class Problems:
    """The catalogue of refusals for one middleware (its realm, headers and scopes)."""

    def __init__(self, realm: str, advice: str, required_scopes: Sequence[str]) -> None:
        challenge = f'Bearer realm="{realm}"'
        invalid_token = f'{challenge}, error="invalid_token"'
        invalid_request = f'{challenge}, error="invalid_request"'
        self.missing = Problem(
            401, "missing_api_key", f"This API needs an API key: {advice}.", challenge
        )
        self.invalid = Problem(401, "invalid_api_key", "The API key is not valid.", invalid_token)
        self.revoked = Problem(
            401, "revoked_api_key", "The API key has been revoked.", invalid_token
        )
        self.expired = Problem(401, "expired_api_key", "The API key has expired.", invalid_token)
        self.insufficient_scope = insufficient_scope(realm, tuple(required_scopes))

        def bad_request(detail: str) -> Problem:
            return Problem(400, "invalid_request", detail, invalid_request)

        self.conflicting = bad_request(
            "The request carries more than one different API key; send exactly one."
        )
        self.bad_authorization = bad_request(
            "The Authorization header must be 'Bearer <key>' with exactly one key."
        )
        self.bad_value = bad_request("An API key header or parameter must hold exactly one key.")
        self.empty = bad_request("An API key header or parameter is present but empty.")
        self.bad_characters = bad_request(
            "An API key header or parameter contains characters other than visible ASCII."
        )
        self.too_large = bad_request(
            f"An API key header or parameter is longer than {MAX_CREDENTIAL_LENGTH} bytes."
        )
        self.store_unavailable = Problem(
            503, "store_unavailable", "The API key store is unavailable; try again shortly."
        )
        self._by_reason = {
            Reason.MALFORMED: self.invalid,
            Reason.NOT_FOUND: self.invalid,
            Reason.REVOKED: self.revoked,
            Reason.EXPIRED: self.expired,
        }

    def __iter__(self) -> Iterator[Problem]:
        return (p for p in vars(self).values() if isinstance(p, Problem))

    def refusal(self, reason: Reason) -> Problem:
        """The problem for a key the manager refused for ``reason``."""
        return self._by_reason.get(reason, self.invalid)


@functools.lru_cache(maxsize=256)
def insufficient_scope(realm: str, scopes: tuple[str, ...]) -> Problem:
    """The 403 for a key lacking one of ``scopes``, naming them all in the challenge."""
    return Problem(
        403,
        "insufficient_scope",
        f"The API key lacks a scope this API requires ({', '.join(scopes)}).",
        f'Bearer realm="{realm}", error="insufficient_scope", scope="{" ".join(scopes)}"',
    )


def check_scopes(scopes: Iterable[object]) -> tuple[str, ...]:
    """``scopes`` without repeats, each checked to be an RFC 6749 scope token."""
    checked = tuple(dict.fromkeys(scopes))
    for scope in checked:
        if not isinstance(scope, str) or not _SCOPE_RE.fullmatch(scope):
            raise ValueError(f"invalid scope {scope!r}: use visible ASCII without spaces")
    return cast(tuple[str, ...], checked)


def how_to_send(header_names: Iterable[str], query_param: str | None = None) -> str:
    """The missing-key advice, naming the headers as the user spelled them."""
    ways = [
        f"'{name}: Bearer <key>'" if name.lower() == "authorization" else f"'{name}: <key>'"
        for name in header_names
    ]
    if query_param is not None:
        ways.append(f"the '{query_param}' query parameter")
    return "send it as " + " or ".join(ways)


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
            " (no '//', '.' or '..' segments, query, fragment or spaces)"
        )
    return path


def has_dot_segment(path: str) -> bool:
    """Whether ``path`` has a ``.`` or ``..`` segment (which some servers collapse later)."""
    if "/." not in path:
        return False
    return any(segment in (".", "..") for segment in path.split("/"))


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _caller_outside_keyguard() -> int:
    """The ``stacklevel`` that makes a warning name the first caller outside keyguard.

    Counted from the function calling this one, so the warning points at the user's line
    however deep keyguard's own wrappers are (``KeyGuard`` builds the WSGI middleware).
    A middleware that a framework builds lazily (Starlette) is attributed to the framework.
    """
    level = 1
    frame = sys._getframe(1)
    while frame.f_back is not None and frame.f_code.co_filename.startswith(_PACKAGE_DIR):
        frame = frame.f_back
        level += 1
    return level


class Checks(NamedTuple):
    """How a middleware checks keys: the manager's own checks when it is a plain manager."""

    #: ``check(key)``: a valid key's record, else the refusal (a Verification).
    check: Callable[[str], KeyInfo | Verification]
    #: The same check of a header value's raw bytes (an ASGI header), sparing a decode.
    check_raw: Callable[[bytes], KeyInfo | Verification]
    #: The same check of a whole ``Bearer <key>`` header value's raw bytes.
    check_bearer: Callable[[bytes], KeyInfo | Verification]
    #: ``await acheck(key)``: :attr:`check` through the store's async twin, if it has one.
    acheck: Callable[[str], Awaitable[KeyInfo | Verification]]


def manager_checks(manager: APIKeyManager) -> Checks:
    """The manager's private checks, which build no Verification for a valid key.

    A manager whose class overrides ``verify`` or ``averify`` is asked through those, so
    the override still decides.
    """
    cls = type(manager)
    if (
        isinstance(manager, APIKeyManager)
        and cls.verify is APIKeyManager.verify
        and cls.averify is APIKeyManager.averify
    ):
        return Checks(manager._check, manager._check_raw, manager._check_bearer, manager._acheck)

    def check(key: str) -> KeyInfo | Verification:
        return _record_or_refusal(manager.verify(key))

    def check_raw(raw: bytes) -> KeyInfo | Verification:
        return check(raw.decode("latin-1"))

    def check_bearer(value: bytes) -> KeyInfo | Verification:
        return check_raw(value[7:]) if value[:7] in RAW_BEARER_PREFIXES else MALFORMED_RESULT

    async def acheck(key: str) -> KeyInfo | Verification:
        return _record_or_refusal(await manager.averify(key))

    return Checks(check, check_raw, check_bearer, acheck)


#: The two spellings of the Bearer scheme the fast paths read as raw bytes; any other
#: spelling goes through the exact reader.
RAW_BEARER_PREFIXES = (b"Bearer ", b"bearer ")
#: The refusal of a malformed key, shared rather than built per request.
MALFORMED_RESULT = Verification(False, Reason.MALFORMED)


def _record_or_refusal(result: Verification) -> KeyInfo | Verification:
    return result.key if result.ok and result.key is not None else result


class Guard:
    """The options both middlewares take, validated, with everything derived from them.

    See :class:`keyguard.asgi.APIKeyMiddleware` for what each option means.
    """

    def __init__(
        self,
        manager: APIKeyManager,
        *,
        exempt_paths: Iterable[str],
        exempt_patterns: Iterable[str | re.Pattern[str]],
        optional: bool,
        required_scopes: Iterable[str],
        header_names: Iterable[str],
        query_param: str | None,
        strip_credentials: bool,
        realm: str,
        error_responder: ErrorResponder | None,
        allow_cors_preflight: bool,
    ) -> None:
        if not callable(getattr(manager, "verify", None)):
            raise TypeError(f"manager must be an APIKeyManager, got {manager!r}")
        self.manager = manager
        self.checks = manager_checks(manager)
        if isinstance(exempt_paths, str) or isinstance(exempt_patterns, (str, re.Pattern)):
            raise TypeError("exempt_paths and exempt_patterns take a list, not a single string")
        self.exempt_paths = frozenset(_check_exempt_path(p) for p in exempt_paths)
        self.exempt_patterns = tuple(
            p if isinstance(p, re.Pattern) else re.compile(p) for p in exempt_patterns
        )
        self.optional = bool(optional)
        if isinstance(required_scopes, str):
            required_scopes = [required_scopes]
        self.required_scopes = check_scopes(required_scopes)
        if self.optional and self.required_scopes:
            raise ValueError(
                "optional=True lets callers without a key through, so required_scopes would"
                " only bind callers who send one; require scopes per route instead"
            )
        if isinstance(header_names, str):
            raise TypeError("header_names takes a list of names, not a single string")
        names: dict[str, bool] = {}
        #: Lower-cased header name -> the name as given, for messages and documentation.
        self.display_names: dict[str, str] = {}
        for name in header_names:
            if not isinstance(name, str) or not _TOKEN_RE.fullmatch(name):
                raise ValueError(f"invalid header name {name!r}")
            lower = name.lower()
            if lower in _UNUSABLE_HEADERS:
                raise ValueError(f"the {name!r} header cannot carry an API key")
            names[lower] = lower == "authorization"
            self.display_names.setdefault(lower, name)
        if query_param is not None and (
            not isinstance(query_param, str) or not _TOKEN_RE.fullmatch(query_param)
        ):
            raise ValueError(f"invalid query parameter name {query_param!r}")
        if not names and query_param is None:
            raise ValueError("give at least one header name or a query_param to read keys from")
        #: Lower-cased header name -> whether it uses the ``Bearer`` scheme (Authorization).
        self.header_names = names
        self.raw_header_names = {n.encode("latin-1"): b for n, b in names.items()}
        self.environ_names = tuple(
            ("HTTP_" + n.upper().replace("-", "_"), b) for n, b in names.items()
        )
        self.query_param = query_param
        if query_param is not None:
            warnings.warn(
                f"keyguard reads API keys from the {query_param!r} query parameter: URLs end"
                " up in access logs, proxy logs and browser history, so keys sent this way"
                " leak; prefer the Authorization header",
                UserWarning,
                stacklevel=_caller_outside_keyguard(),
            )
        self.strip_credentials = bool(strip_credentials)
        if not isinstance(realm, str) or not realm or not _QUOTABLE_RE.fullmatch(realm):
            raise ValueError(f"invalid realm {realm!r}: use printable ASCII without '\"' or '\\'")
        self.realm = realm
        if error_responder is not None and not callable(error_responder):
            raise TypeError("error_responder must be callable")
        self.error_responder = error_responder
        self.allow_cors_preflight = bool(allow_cors_preflight)
        self.problems = Problems(
            realm, how_to_send(self.display_names.values(), query_param), self.required_scopes
        )

    def is_exempt_by_pattern(self, path: str) -> bool:
        """Whether an exempt pattern fullmatches ``path``; paths with dot segments never do."""
        if has_dot_segment(path):
            return False
        return any(p.fullmatch(path) for p in self.exempt_patterns)

    def missing_scope(self, info: KeyInfo) -> bool:
        """Whether the key lacks one of the app-wide required scopes."""
        scopes = info.scopes
        return any(s not in scopes for s in self.required_scopes)

    def refusal(self, result: Verification) -> Problem:
        return self.problems.refusal(result.reason)

    def split_query(self, query: str) -> tuple[list[str], str]:
        """Return the values of the key parameter and the query string without it."""
        name = self.query_param
        values: list[str] = []
        kept: list[str] = []
        for part in query.split("&"):
            raw_name, eq, raw_value = part.partition("=")
            if raw_name == name or (
                ("%" in raw_name or "+" in raw_name) and unquote_plus(raw_name) == name
            ):
                values.append(unquote_plus(raw_value) if eq else "")
            else:
                kept.append(part)
        return values, "&".join(kept)

    def extract(
        self, values: Iterable[tuple[bool, str]], query_values: Sequence[str] = ()
    ) -> str | Problem | None:
        """Find the one key in credential header values and query values, exactly.

        ``values`` pairs each header value (latin-1 text) with whether its header uses the
        Bearer scheme. Returns the key, None if there is none, or the request's problem.
        Comma-joined values (repeated headers merged by a server or proxy) are split; in a
        header that carries a Bearer credential, a part without a scheme (``Bearer K1, K2``)
        is refused, since another reader could take ``K2`` for the credential.
        """
        problems = self.problems
        found: set[str] = set()
        for bearer, value in values:
            if len(value) > MAX_CREDENTIAL_LENGTH:
                return problems.too_large
            value = value.strip(" \t")
            if not value:
                return problems.empty
            if not (value.isascii() and value.isprintable()):
                return problems.bad_characters
            has_bearer = bare = False
            for part in value.split(","):
                part = part.strip(" ")
                if not part:
                    continue
                if bearer:
                    scheme, _, token = part.partition(" ")
                    if scheme.lower() != "bearer":
                        # Another scheme is for someone else to handle, unless it is a lone
                        # token: then the header names no scheme for it.
                        bare = bare or not token
                        continue
                    token = token.strip(" ")
                    if not token or " " in token:
                        return problems.bad_authorization
                    has_bearer = True
                    found.add(token)
                elif " " in part:
                    return problems.bad_value
                else:
                    found.add(part)
            if has_bearer and bare:
                return problems.bad_authorization
        for value in query_values:
            if len(value) > MAX_CREDENTIAL_LENGTH:
                return problems.too_large
            if not value:
                return problems.empty
            if not (value.isascii() and value.isprintable()):
                return problems.bad_characters
            if " " in value or "," in value:
                return problems.bad_value
            found.add(value)
        if len(found) > 1:
            return problems.conflicting
        return found.pop() if found else None

    def render(self, problem: Problem, request: Mapping[str, Any]) -> ErrorResponse | None:
        """The user's rendering of ``problem``, or None to send the precomputed default.

        A responder that raises or returns something unusable is a bug in the app, but a
        refusal must stay a refusal: the error is logged (credentials masked) and the
        default response is sent instead, never a 500.
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
                self._redact(traceback.format_exc().rstrip(), request),
            )
        return None

    def _redact(self, text: str, request: Mapping[str, Any]) -> str:
        """``text`` with every credential the request carries masked (keys or not)."""
        if "headers" in request:  # an ASGI scope
            values = [
                bytes(v).decode("latin-1")
                for n, v in request["headers"]
                if bytes(n).lower() in self.raw_header_names
            ]
            query = request.get("query_string") or b""
            query = bytes(query).decode("latin-1")
        else:
            values = [request[n] for n, _ in self.environ_names if n in request]
            query = request.get("QUERY_STRING") or ""
        if self.query_param is not None and query:
            values.extend(self.split_query(query)[0])
        parts = {p for v in values for p in re.split(r"[\s,]+", str(v))}
        # Longest first, so a key is masked whole before any part of it.
        for part in sorted(parts, key=len, reverse=True):
            if len(part) >= 6 and part.lower() != "bearer":
                text = text.replace(part, mask_key(part))
        return text


class InvalidResponse(ValueError):
    """An ``error_responder`` result that cannot be sent."""


def checked_response(response: object) -> ErrorResponse:
    """``response`` as an :class:`ErrorResponse` that any server can send, or raise.

    ``status`` must be an int in 100-599, ``headers`` (name, value) str pairs (or a
    mapping) that encode to latin-1 without line breaks, and ``body`` bytes.
    """
    try:
        status, headers, body = cast("tuple[Any, Any, Any]", response)
    except (TypeError, ValueError):
        raise InvalidResponse(
            f"expected an ErrorResponse (status, headers, body), got {type(response).__name__}"
        ) from None
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise InvalidResponse(f"status must be an int from 100 to 599, got {status!r}")
    if isinstance(headers, Mapping):
        headers = headers.items()
    pairs: list[tuple[str, str]] = []
    try:
        for pair in headers:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise InvalidResponse("headers must be (name, value) pairs")
            name, value = pair
            if not isinstance(name, str) or not _TOKEN_RE.fullmatch(name):
                raise InvalidResponse(f"invalid header name {name!r}")
            if not isinstance(value, str) or _BAD_HEADER_VALUE_RE.search(value):
                raise InvalidResponse(
                    f"the value of header {name!r} must be latin-1 text without line breaks"
                )
            pairs.append((name, value))
    except TypeError:
        raise InvalidResponse("headers must be an iterable of (name, value) pairs") from None
    if not isinstance(body, bytes):
        raise InvalidResponse(f"body must be bytes, got {type(body).__name__}")
    return ErrorResponse(int(status), pairs, body)


def carries_key(bearer: bool, value: str) -> bool:
    """Whether a header value would be read as a credential (for ``strip_credentials``)."""
    return not bearer or value.lstrip(" \t")[:6].lower() == "bearer"
