"""The request pipeline: read a request's one credential, check it, apply the per-key steps.

Every way into keyguard calls this: the ASGI and WSGI middleware, the Starlette backend,
the FastAPI dependency and the Flask extension. So they all refuse exactly the same
requests with exactly the same :class:`~keyguard.problems.Problem`. It knows no transport
and no framework: a transport hands it the credential header values (and query values) it
found, and gets back the admitted :class:`~keyguard.KeyInfo`, the problem to answer with,
or None when the request carries no credential at all (the caller decides whether that is
anonymous or ``missing_api_key``).

The steps, in order:

1. **read**: exactly one key among the credential headers and the query parameter;
2. **check** (:meth:`APIKeyManager.check <keyguard.APIKeyManager.check>`): form, digest,
   one store lookup, revoked or expired;
3. **per-key policy**, in order: the key's allowed networks, then the scopes the API
   requires;
4. **usage limits**: the request is charged to the key's rate limits and quota (only
   admitted requests are charged; over a limit is a 429).

A key that a rotation replaced, in its grace period, has ``Deprecation`` and ``Sunset``
fields (and the manager's ``deprecation_link``) added to every response it gets.

Before step 2, a client address that failed too many checks is refused (429
``too_many_failures``) without a store lookup. The synchronous and asynchronous variants
differ only in how they ask the manager and the counter store.

The module is longer than most because it is the whole request path in one place (the
credential reader, the client address behind proxies, the steps and their refusals),
each part a short function; spreading it out would hide the order the steps run in.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import os
import re
import sys
import warnings
from collections.abc import Callable, Iterable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote_plus

from ._counting import Bucket
from .exceptions import InvalidKeyError, KeyguardError, StoreError
from .limits import Rate, Usage, parse_rates
from .networks import Network, contains, parse_networks
from .problems import MAX_CREDENTIAL_LENGTH, Problem, Problems
from .records import KeyInfo
from .usage import OK
from .verification import Reason

if TYPE_CHECKING:
    from .manager import APIKeyManager

__all__ = [
    "DEFAULT_AUTH_SCHEMES",
    "DEFAULT_FAILURE_LIMIT",
    "DEFAULT_HEADER_NAMES",
    "Admission",
    "Pipeline",
    "Step",
    "check_scopes",
    "how_to_send",
]

logger = logging.getLogger("keyguard")

#: The headers read by default, spelled as messages show them.
DEFAULT_HEADER_NAMES = ("Authorization", "X-API-Key")

#: The ``Authorization`` schemes read by default.
DEFAULT_AUTH_SCHEMES = ("Bearer",)

#: Failed key checks allowed per client address (per process) before it gets 429s.
DEFAULT_FAILURE_LIMIT = "20/minute"


#: A per-key policy step: ``step(key, client_address)`` returns a refusal or None to go on.
Step = Callable[[KeyInfo, "str | None"], "Problem | None"]

# RFC 7230 token characters (header names) and RFC 6749 scope-token characters.
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_SCOPE_RE = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_QUOTABLE_RE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]*")
# Header names that a WSGI server does not pass as HTTP_*, or that cannot carry a key.
_UNUSABLE_HEADERS = frozenset({"content-type", "content-length", "cookie", "host"})
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def check_scopes(scopes: Iterable[object]) -> tuple[str, ...]:
    """``scopes`` without repeats, each checked to be an RFC 6749 scope token."""
    if isinstance(scopes, str):
        scopes = [scopes]
    checked = tuple(dict.fromkeys(scopes))
    for scope in checked:
        if not isinstance(scope, str) or not _SCOPE_RE.fullmatch(scope):
            raise ValueError(f"invalid scope {scope!r}: use visible ASCII without spaces")
    return cast(tuple[str, ...], checked)


def _scheme(name: object) -> str:
    if not isinstance(name, str) or not _TOKEN_RE.fullmatch(name):
        raise ValueError(f"invalid Authorization scheme {name!r}")
    return name.lower()


def how_to_send(header_names: Iterable[str], query_param: str | None = None) -> str:
    """The missing-key advice, naming the headers as the user spelled them."""
    ways = [
        f"'{name}: Bearer <key>'" if name.lower() == "authorization" else f"'{name}: <key>'"
        for name in header_names
    ]
    if query_param is not None:
        ways.append(f"the '{query_param}' query parameter")
    return "send it as " + " or ".join(ways)


def caller_outside_keyguard() -> int:
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


class Admission:
    """An admitted key with the headers its response must carry (the RateLimit fields).

    The pipeline returns the bare :class:`~keyguard.KeyInfo` when there are none, so a
    key without limits costs nothing more.
    """

    __slots__ = ("charged", "headers", "key", "rates")

    def __init__(
        self,
        key: KeyInfo,
        headers: tuple[tuple[str, str], ...],
        charged: tuple[Bucket, ...] = (),
        rates: tuple[Rate, ...] = (),
    ) -> None:
        self.key = key
        self.headers = headers
        #: The counters the request was charged to, given back if a route refuses it.
        self.charged = charged
        #: The default limits it was judged under, to read its RateLimit fields again then.
        self.rates = rates

    def __repr__(self) -> str:
        return f"Admission({self.key.key_id})"


def client_address(
    peer: str | None, forwarded: Sequence[str], networks: tuple[Network, ...]
) -> str | None:
    """The caller's address: ``peer``, or behind trusted proxies the right-most
    ``X-Forwarded-For`` hop that is not a trusted proxy.

    ``X-Forwarded-For`` is read only when ``peer`` itself is a trusted proxy, so a client
    that sends the header directly cannot choose its address. An unparseable hop ends
    the walk at the last trusted one.
    """
    if peer is None or not forwarded or not contains(networks, peer):
        return peer
    address = peer
    for value in reversed(forwarded):
        for hop in reversed(value.split(",")):
            hop = hop.strip()
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                return address
            address = hop
            if not contains(networks, hop):
                return hop
    return address


#: A request on its way to the check: its one key, the client's address, and the time.
_Attempt = tuple[str, "str | None", float]


class Pipeline:
    """Where a request's credential is read and judged, for every transport and framework.

    :param header_names: headers that carry the key, matched in any case and named in
        messages as given here; ``Authorization`` means ``Bearer <key>``, any other name
        carries the bare key.
    :param auth_schemes: the ``Authorization`` schemes that carry a key (default
        ``["Bearer"]``); add ``"Api-Key"`` to keep the callers of a djangorestframework-
        api-key deployment working unchanged. Other schemes are left to other readers.
    :param query_param: also read the key from this query parameter (off by default: URLs
        leak into logs); setting it warns once, naming the line that set it.
    :param realm: the realm in ``WWW-Authenticate`` challenges.
    :param required_scopes: scopes every key must hold (else 403 ``insufficient_scope``).
    :param rate_limits: limits (``["10/second", "1000/hour"]``) for keys without their own.
    :param failure_limit: failed checks allowed per client address in this process, as a
        rate (default ``"20/minute"``); beyond it the address gets 429
        ``too_many_failures`` without a store lookup. None turns it off.
    :param trusted_proxies: addresses or CIDRs of reverse proxies whose
        ``X-Forwarded-For`` is believed (the right-most hop that is not one of them is
        the client); nothing else reads that header.
    :param fail_open: when the counter store fails, admit the request with a logged
        warning instead of answering 503 ``store_unavailable``.
    """

    def __init__(
        self,
        *,
        header_names: Iterable[str] = DEFAULT_HEADER_NAMES,
        auth_schemes: Iterable[str] = DEFAULT_AUTH_SCHEMES,
        query_param: str | None = None,
        realm: str = "api",
        required_scopes: Iterable[str] = (),
        rate_limits: Iterable[str] = (),
        failure_limit: str | None = DEFAULT_FAILURE_LIMIT,
        trusted_proxies: Iterable[str] = (),
        fail_open: bool = False,
    ) -> None:
        if isinstance(header_names, str):
            raise TypeError("header_names takes a list of names, not a single string")
        #: Lower-cased header name -> whether it uses the ``Bearer`` scheme (Authorization).
        self.header_names: dict[str, bool] = {}
        #: Lower-cased header name -> the name as given, for messages and documentation.
        self.display_names: dict[str, str] = {}
        for name in header_names:
            if not isinstance(name, str) or not _TOKEN_RE.fullmatch(name):
                raise ValueError(f"invalid header name {name!r}")
            lower = name.lower()
            if lower in _UNUSABLE_HEADERS:
                raise ValueError(f"the {name!r} header cannot carry an API key")
            self.header_names[lower] = lower == "authorization"
            self.display_names.setdefault(lower, name)
        if isinstance(auth_schemes, str):
            raise TypeError(f"auth_schemes takes a list of schemes: [{auth_schemes!r}]")
        #: The Authorization schemes that carry a key, lower-cased.
        self.auth_schemes = frozenset(_scheme(s) for s in auth_schemes)
        if not self.auth_schemes:
            raise ValueError("auth_schemes needs at least one scheme (e.g. 'Bearer')")
        if query_param is not None and (
            not isinstance(query_param, str) or not _TOKEN_RE.fullmatch(query_param)
        ):
            raise ValueError(f"invalid query parameter name {query_param!r}")
        if not self.header_names and query_param is None:
            raise ValueError("give at least one header name or a query_param to read keys from")
        if query_param is not None:
            warnings.warn(
                f"keyguard reads API keys from the {query_param!r} query parameter: URLs end"
                " up in access logs, proxy logs and browser history, so keys sent this way"
                " leak; prefer the Authorization header",
                UserWarning,
                stacklevel=caller_outside_keyguard(),
            )
        self.query_param = query_param
        #: The header names as ASGI spells them (lower-case bytes) and as WSGI does
        #: (``HTTP_X_API_KEY``), each with whether it uses the Bearer scheme.
        self.raw_header_names = {n.encode("latin-1"): b for n, b in self.header_names.items()}
        self.environ_names = tuple(
            ("HTTP_" + n.upper().replace("-", "_"), b) for n, b in self.header_names.items()
        )
        if not isinstance(realm, str) or not realm or not _QUOTABLE_RE.fullmatch(realm):
            raise ValueError(f"invalid realm {realm!r}: use printable ASCII without '\"' or '\\'")
        self.realm = realm
        self.required_scopes = check_scopes(required_scopes)
        self.problems = Problems(
            realm, how_to_send(self.display_names.values(), query_param), self.required_scopes
        )
        self._refusals = {
            Reason.MALFORMED: self.problems.invalid,
            Reason.NOT_FOUND: self.problems.invalid,
            Reason.REVOKED: self.problems.revoked,
            Reason.EXPIRED: self.problems.expired,
        }
        steps: list[Step] = []
        if self.required_scopes:
            steps.append(self._check_scopes)
        #: The per-key policy steps, run in order on every admitted key.
        self.steps: tuple[Step, ...] = tuple(steps)
        self.rate_limits: tuple[Rate, ...] = parse_rates(rate_limits)
        #: Failed checks allowed per client address; the count is kept by the manager.
        self.failure_limit: Rate | None = None
        if failure_limit is not None:
            (self.failure_limit,) = parse_rates([failure_limit])
        self.trusted_proxies = parse_networks(trusted_proxies, "trusted proxy")
        self.fail_open = bool(fail_open)

    def __repr__(self) -> str:
        return f"Pipeline(header_names={list(self.display_names.values())!r})"

    # -- the whole path ----------------------------------------------------------------

    def authenticate(
        self,
        manager: APIKeyManager,
        values: Sequence[tuple[bool, str]],
        query_values: Sequence[str] = (),
        client: str | None = None,
        forwarded: Sequence[str] = (),
    ) -> KeyInfo | Admission | Problem | None:
        """Read, check and judge a request's credential with ``manager.check``.

        ``values`` pairs each credential header value (latin-1 text) with whether its
        header uses the Bearer scheme; ``client`` is the peer's address, if known, and
        ``forwarded`` the ``X-Forwarded-For`` values (read only from trusted proxies).
        Returns the key (an :class:`Admission` when its response needs headers), the
        problem to answer with, or None when the request carries no credential.
        """
        attempt = self._begin(manager, values, query_values, client, forwarded)
        if not isinstance(attempt, tuple):
            return attempt
        key, address, now = attempt
        try:
            info = manager.check(key)
            outcome: KeyInfo | Admission | Problem = self.admit(info, address)
        except KeyguardError as e:
            return self._failed(manager, e, address, now)
        if self._limits(info):
            try:
                if outcome is info:
                    outcome = self._charged(info, manager.charge(info, self.rate_limits))
                elif isinstance(outcome, Problem):
                    outcome = _with_headers(outcome, manager.limit_headers(info, self.rate_limits))
            except StoreError as e:
                outcome = self._counters_failed(info, e, outcome)
        return self._finish(manager, info, outcome, now)

    async def aauthenticate(
        self,
        manager: APIKeyManager,
        values: Sequence[tuple[bool, str]],
        query_values: Sequence[str] = (),
        client: str | None = None,
        forwarded: Sequence[str] = (),
    ) -> KeyInfo | Admission | Problem | None:
        """:meth:`authenticate` for event loops: the same steps, the store calls awaited."""
        attempt = self._begin(manager, values, query_values, client, forwarded)
        if not isinstance(attempt, tuple):
            return attempt
        key, address, now = attempt
        try:
            info = await manager.acheck(key)
            outcome: KeyInfo | Admission | Problem = self.admit(info, address)
        except KeyguardError as e:
            return self._failed(manager, e, address, now)
        if self._limits(info):
            rates = self.rate_limits
            try:
                if outcome is info:
                    outcome = self._charged(info, await manager.acharge(info, rates))
                elif isinstance(outcome, Problem):
                    outcome = _with_headers(outcome, await manager.alimit_headers(info, rates))
            except StoreError as e:
                outcome = self._counters_failed(info, e, outcome)
        return self._finish(manager, info, outcome, now)

    def _begin(
        self,
        manager: APIKeyManager,
        values: Sequence[tuple[bool, str]],
        query_values: Sequence[str],
        client: str | None,
        forwarded: Sequence[str],
    ) -> _Attempt | Problem | None:
        """The steps before the check: the client's address, the one credential, and the
        failed-check throttle; the attempt to check, or the request's answer already."""
        address = client_address(client, forwarded, self.trusted_proxies) if forwarded else client
        key = self.read(values, query_values)
        if not isinstance(key, str):
            return key
        now = manager.clock()
        rate = self.failure_limit
        if rate is not None and address is not None:
            wait = manager.failure_throttle(rate).retry_after(address, now)
            if wait:
                return self.problems.too_many_failures(wait)
        return key, address, now

    def _limits(self, info: KeyInfo) -> bool:
        """Whether usage limits apply to ``info``: its own, or the pipeline's default."""
        return bool(info.rate_limits or info.quota is not None or self.rate_limits)

    def _finish(
        self,
        manager: APIKeyManager,
        info: KeyInfo,
        outcome: KeyInfo | Admission | Problem,
        now: float,
    ) -> KeyInfo | Admission | Problem:
        """The steps after the check: a replaced key's deprecation fields, then the
        request counted in the key's usage."""
        if info.deprecation:
            outcome = _deprecated(outcome, (*info.deprecation, *manager.deprecation_link))
        recorder = manager.usage_recorder
        if recorder is not None:
            code = outcome.code if type(outcome) is Problem else OK
            recorder.record(info.key_id, code, now)
        return outcome

    def _failed(
        self, manager: APIKeyManager, error: KeyguardError, address: str | None, now: float
    ) -> Problem:
        """The refusal of a failed check, counted against the client's address (and, for a
        revoked or expired key, in the key's usage)."""
        problem = self.refused(error)
        if isinstance(error, InvalidKeyError):
            if self.failure_limit is not None and address:
                manager.failure_throttle(self.failure_limit).failed(address, now)
            if error.info is not None and manager.usage_recorder is not None:
                manager.usage_recorder.record(error.info.key_id, problem.code, now)
        return problem

    def _charged(self, info: KeyInfo, usage: Usage | None) -> KeyInfo | Admission | Problem:
        if usage is None:
            return info
        if usage.allowed:
            return Admission(info, usage.headers, usage.charged, self.rate_limits)
        return self.problems.limited(
            usage.code or "rate_limited", usage.retry_after, usage.headers
        )

    def _counters_failed(
        self, info: KeyInfo, error: StoreError, outcome: KeyInfo | Admission | Problem
    ) -> KeyInfo | Problem:
        """The answer when the counter store fails: a refusal stands (without its RateLimit
        fields); an admission is a 503, or goes through without limits with ``fail_open``."""
        if isinstance(outcome, Problem):
            return outcome
        if self.fail_open:
            logger.warning(
                "admitting %s without its usage limits, the counter store failed: %s",
                info.key_id,
                error,
            )
            return info
        logger.error("cannot apply usage limits, the counter store failed: %s", error)
        return self.problems.store_unavailable

    # -- the steps ---------------------------------------------------------------------

    def read(
        self, values: Sequence[tuple[bool, str]], query_values: Sequence[str] = ()
    ) -> str | Problem | None:
        """Find the one key in credential header values and query values, exactly.

        Returns the key, None if there is none, or the request's problem. Comma-joined
        values (repeated headers merged by a server or proxy) are split; in a header that
        carries a Bearer credential, a part without a scheme (``Bearer K1, K2``) is refused,
        since another reader could take ``K2`` for the credential.
        """
        problems = self.problems
        schemes = self.auth_schemes
        found: str | None = None
        conflict = False
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
                    if scheme.lower() not in schemes:
                        # Another scheme is for someone else to handle, unless it is a lone
                        # token: then the header names no scheme for it.
                        bare = bare or not token
                        continue
                    token = token.strip(" ")
                    if not token or " " in token:
                        return problems.bad_authorization
                    has_bearer = True
                elif " " in part:
                    return problems.bad_value
                else:
                    token = part
                conflict = conflict or (found is not None and token != found)
                found = token
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
            conflict = conflict or (found is not None and value != found)
            found = value
        return problems.conflicting if conflict else found

    def carries_key(self, bearer: bool, value: str) -> bool:
        """Whether a header value would be read as a credential (for ``strip_credentials``):
        any value of a bare-key header, an ``Authorization`` value of an accepted scheme."""
        return not bearer or value.lstrip(" \t").partition(" ")[0].lower() in self.auth_schemes

    def refusal(self, reason: Reason) -> Problem:
        """The problem for a key the manager refused for ``reason``."""
        return self._refusals.get(reason, self.problems.invalid)

    def admit(self, info: KeyInfo, client: str | None = None) -> KeyInfo | Problem:
        """Run the per-key steps on an active key, in order: the key if each lets it through.

        First the key's own ``allowed_ips`` (403 ``ip_not_allowed`` from any other address,
        or when the address is unknown), then the :attr:`steps` (the required scopes).
        """
        if info.allowed_ips and not contains(info.allowed_ips, client):
            return self.problems.ip_not_allowed
        for step in self.steps:
            problem = step(info, client)
            if problem is not None:
                return problem
        return info

    def refused(self, error: KeyguardError) -> Problem:
        """The problem for a check that failed: the key was refused, or the store failed.

        A store failure is logged (the key never is) and answered 503, never 500.
        """
        if isinstance(error, InvalidKeyError):
            return self.refusal(error.reason)
        logger.error("cannot check API key, the key store failed: %s", error)
        return self.problems.store_unavailable

    def _check_scopes(self, info: KeyInfo, client: str | None) -> Problem | None:
        scopes = info.scopes
        for scope in self.required_scopes:
            if scope not in scopes:
                return self.problems.insufficient_scope
        return None

    # -- reading a query string --------------------------------------------------------

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


def admitted(
    mapping: MutableMapping[str, Any], manager: APIKeyManager, outcome: KeyInfo | Admission
) -> KeyInfo:
    """Leave an admission in a scope or environ: the key, its manager, and with limits the
    RateLimit headers for the response, what was charged and under which default limits
    (for :func:`refund`)."""
    if isinstance(outcome, Admission):
        mapping["keyguard.headers"] = outcome.headers
        mapping["keyguard.charged"] = outcome.charged
        mapping["keyguard.rates"] = outcome.rates
        outcome = outcome.key
    mapping["keyguard.key"] = outcome
    mapping["keyguard.manager"] = manager
    return outcome


def refund(mapping: MutableMapping[str, Any], code: str) -> None:
    """Undo the admission left in a scope or environ, for a route that refuses it with
    ``code`` after the middleware let it in: its charge is given back, its RateLimit
    fields are read again (so the refusal says what is left), and it is counted as
    refused. A counter store that fails leaves the refusal without RateLimit fields."""
    manager, info, charged, rates = _admission_of(mapping)
    if manager is not None and info is not None:
        try:
            manager.refund(info, charged, code)
            _add_headers(mapping, manager.limit_headers(info, rates))
        except StoreError as e:
            logger.error("cannot give back a refused request's charge: %s", e)


async def arefund(mapping: MutableMapping[str, Any], code: str) -> None:
    """:func:`refund` for event loops."""
    manager, info, charged, rates = _admission_of(mapping)
    if manager is not None and info is not None:
        try:
            await manager.arefund(info, charged, code)
            headers = await manager.alimit_headers(info, rates)
            _add_headers(mapping, headers)
        except StoreError as e:
            logger.error("cannot give back a refused request's charge: %s", e)


def _add_headers(mapping: MutableMapping[str, Any], headers: tuple[tuple[str, str], ...]) -> None:
    if headers:
        mapping["keyguard.headers"] = (*mapping.get("keyguard.headers", ()), *headers)


def _admission_of(
    mapping: MutableMapping[str, Any],
) -> tuple[APIKeyManager | None, KeyInfo | None, tuple[Bucket, ...], tuple[Rate, ...]]:
    # The RateLimit fields described a charge that is given back; the deprecation fields
    # of a replaced key still hold.
    headers = mapping.pop("keyguard.headers", ())
    kept = tuple(h for h in headers if h[0].lower() not in _RATELIMIT)
    if kept:
        mapping["keyguard.headers"] = kept
    charged = mapping.pop("keyguard.charged", ())
    rates = mapping.pop("keyguard.rates", ())
    manager = mapping.pop("keyguard.manager", None)
    info = mapping.get("keyguard.key")
    return manager, info if isinstance(info, KeyInfo) else None, charged, rates


def _deprecated(
    outcome: KeyInfo | Admission | Problem, headers: tuple[tuple[str, str], ...]
) -> Admission | Problem:
    """``outcome`` also carrying the deprecation fields of a key a rotation replaced."""
    if isinstance(outcome, Problem):
        return _with_headers(outcome, headers)
    if isinstance(outcome, Admission):
        return Admission(outcome.key, (*outcome.headers, *headers), outcome.charged, outcome.rates)
    return Admission(outcome, headers)


_RATELIMIT = frozenset({"ratelimit", "ratelimit-policy"})


def _with_headers(problem: Problem, headers: tuple[tuple[str, str], ...]) -> Problem:
    """``problem`` also carrying ``headers`` (a limited key's RateLimit fields)."""
    if not headers:
        return problem
    return dataclasses.replace(problem, extra_headers=(*problem.extra_headers, *headers))
