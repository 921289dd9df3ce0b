"""Refusals: every way keyguard can turn a request away, as RFC 9457 problem responses.

A :class:`Problem` is one refusal with its response precomputed (``application/problem+json``
body, RFC 6750 ``WWW-Authenticate`` challenge); :class:`Problems` is the catalogue of them
for one realm. An app that wants its own error format passes an :data:`ErrorResponder`,
which turns a problem into an :class:`ErrorResponse`. Nothing here knows ASGI, WSGI or a
framework.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, NamedTuple, cast

__all__ = [
    "CLOSE_POLICY_VIOLATION",
    "CLOSE_TRY_AGAIN_LATER",
    "MAX_CREDENTIAL_LENGTH",
    "PROBLEM_CONTENT_TYPE",
    "ErrorResponder",
    "ErrorResponse",
    "InvalidResponse",
    "Problem",
    "Problems",
    "checked_response",
    "insufficient_scope",
]

PROBLEM_CONTENT_TYPE = "application/problem+json"
#: Longest credential header value read, in bytes; longer ones are refused unparsed.
MAX_CREDENTIAL_LENGTH = 8192
#: WebSocket close codes (RFC 6455): policy violation, and "try again later".
CLOSE_POLICY_VIOLATION = 1008
CLOSE_TRY_AGAIN_LATER = 1013

# RFC 7230 token characters, for header names in a custom response.
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A header value must encode to latin-1 and hold no CR, LF or NUL.
_BAD_HEADER_VALUE_RE = re.compile(r"[^\x00-\xff]|[\r\n\x00]")


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
    ...); ``www_authenticate`` is the RFC 6750 challenge sent with it, if any, and
    ``extra_headers`` further headers (``Retry-After`` and the RateLimit fields of a 429).
    """

    status: int
    code: str
    detail: str
    www_authenticate: str | None = None
    extra_headers: tuple[tuple[str, str], ...] = ()
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
        headers.extend(self.extra_headers)
        setattr_ = object.__setattr__
        setattr_(self, "title", phrase)
        setattr_(self, "body", body)
        setattr_(self, "headers", tuple(headers))
        setattr_(self, "status_line", f"{self.status} {phrase}")
        setattr_(self, "raw_headers", tuple((n.encode(), v.encode()) for n, v in headers))
        later = self.status >= 500 or self.status == 429
        close = CLOSE_TRY_AGAIN_LATER if later else CLOSE_POLICY_VIOLATION
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
    """The catalogue of refusals for one realm.

    :param realm: the realm named in every ``WWW-Authenticate`` challenge.
    :param advice: how to send a key, for the ``missing_api_key`` detail.
    :param required_scopes: the scopes named by :attr:`insufficient_scope`.
    """

    def __init__(self, realm: str, advice: str, required_scopes: Sequence[str] = ()) -> None:
        self.realm = realm
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
        self.ip_not_allowed = Problem(
            403, "ip_not_allowed", "The API key may not be used from this address."
        )

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

    def __iter__(self) -> Iterator[Problem]:
        return (p for p in vars(self).values() if isinstance(p, Problem))

    def too_many_failures(self, retry_after: int) -> Problem:
        """The 429 for a client address that failed too many key checks."""
        return Problem(
            429,
            "too_many_failures",
            f"Too many failed API key checks from this address; retry in {retry_after} s.",
            extra_headers=(("retry-after", str(retry_after)),),
        )

    @staticmethod
    def limited(
        code: str, retry_after: int | None, headers: tuple[tuple[str, str], ...]
    ) -> Problem:
        """The 429 for a key over a rate limit (``rate_limited``) or out of quota
        (``quota_exceeded``); ``headers`` are its RateLimit fields."""
        if code == "quota_exceeded":
            detail = "The API key's quota is used up"
            detail += "." if retry_after is None else f"; it is refilled in {retry_after} s."
        else:
            detail = f"The API key's rate limit is exceeded; retry in {retry_after} s."
        if retry_after is not None:
            headers = (("retry-after", str(retry_after)), *headers)
        return Problem(429, code, detail, extra_headers=headers)


@functools.lru_cache(maxsize=256)
def insufficient_scope(realm: str, scopes: tuple[str, ...]) -> Problem:
    """The 403 for a key lacking one of ``scopes``, naming them all in the challenge."""
    return Problem(
        403,
        "insufficient_scope",
        f"The API key lacks a scope this API requires ({', '.join(scopes)}).",
        f'Bearer realm="{realm}", error="insufficient_scope", scope="{" ".join(scopes)}"',
    )


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
