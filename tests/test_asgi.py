"""The pure ASGI middleware: credentials, options, what it attaches, and how it refuses."""

from __future__ import annotations

import asyncio
import json
import re
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.authentication import requires
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocket

from keyguard import AsyncKeyStore, KeyInfo
from keyguard.asgi import APIKeyMiddleware, ErrorResponse, Message, Problem, Scope
from keyguard.identity import AnonymousUser, APIKeyUser
from tests.credential_cases import CASES, CLIENT_CASES, Answer, Case, Keyring
from tests.helpers import AsyncStore, BrokenStore, assert_answer


@pytest.fixture
def keys() -> Keyring:
    return Keyring.build()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Recorder:
    """The guarded app: remembers each request scope it is called with and answers 200."""

    def __init__(self) -> None:
        self.scopes: list[Scope] = []

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        self.scopes.append(scope)
        if scope["type"] == "http":
            user = scope.get("user")
            body = json.dumps({"user": getattr(user, "identity", None)}).encode()
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
        elif scope["type"] == "websocket":
            await send({"type": "websocket.accept"})


@dataclass
class Reply:
    """What the middleware sent back for one raw ASGI request."""

    messages: list[Message]
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    raw_headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""

    @classmethod
    def of(cls, messages: list[Message]) -> Reply:
        reply = cls(messages)
        for message in messages:
            if message["type"].endswith("response.start"):
                reply.status = message["status"]
                reply.raw_headers = [(bytes(n), bytes(v)) for n, v in message["headers"]]
                reply.headers = {n.decode(): v.decode() for n, v in reply.raw_headers}
            elif message["type"].endswith("response.body"):
                reply.body += message.get("body", b"")
        return reply

    def problem(self) -> dict[str, Any]:
        assert self.headers["content-type"] == "application/problem+json"
        data: dict[str, Any] = json.loads(self.body)
        return data


def make_scope(
    headers: list[tuple[bytes, bytes]] | None = None,
    *,
    path: str = "/items",
    method: str = "GET",
    scope_type: str = "http",
    root_path: str = "",
    query_string: bytes = b"",
    extensions: dict[str, Any] | None = None,
) -> Scope:
    scope: Scope = {
        "type": scope_type,
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "scheme": "http" if scope_type == "http" else "ws",
        "path": path,
        "raw_path": path.encode(),
        "root_path": root_path,
        "query_string": query_string,
        "headers": list(headers or []),
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    if scope_type == "http":
        scope["method"] = method
    if extensions is not None:
        scope["extensions"] = extensions
    return scope


def run(app: Any, scope: Scope) -> Reply:
    """Drive ``app`` with one raw ASGI scope and collect what it sends."""
    sent: list[Message] = []

    async def receive() -> Message:
        if scope["type"] == "websocket":
            return {"type": "websocket.connect"}
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return Reply.of(sent)


def guard(keys: Keyring, **options: Any) -> tuple[APIKeyMiddleware, Recorder]:
    inner = Recorder()
    return APIKeyMiddleware(inner, manager=keys.manager, **options), inner


def raw_headers(keys: Keyring, case: Case) -> list[tuple[bytes, bytes]]:
    return [(name.encode(), keys.fill(value)) for name, value in case.headers]


def assert_no_secret(keys: Keyring, reply: Reply) -> None:
    for secret in keys.secrets:
        assert secret not in reply.body
        assert all(secret not in v for _, v in reply.raw_headers)


# -- the credential table ------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_credential_cases_raw(keys: Keyring, case: Case) -> None:
    app, inner = guard(keys)
    reply = run(app, make_scope(raw_headers(keys, case)))
    answer = Answer.of(reply.status, reply.raw_headers, reply.body)
    assert_answer(keys, case, answer, reached=inner.scopes)


@pytest.mark.anyio
@pytest.mark.parametrize("case", CLIENT_CASES)
async def test_credential_cases_through_httpx(keys: Keyring, case: Case) -> None:
    app, inner = guard(keys)
    headers = [(name.encode(), keys.fill(value)) for name, value in case.headers]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/items", headers=headers)
    answer = Answer.of(response.status_code, response.headers.raw, response.content)
    assert_answer(keys, case, answer, reached=inner.scopes)


# -- what the app sees ---------------------------------------------------------------------


def test_success_attaches_user_auth_and_key(keys: Keyring) -> None:
    app, inner = guard(keys)
    run(app, make_scope([(b"authorization", b"Bearer " + keys.write.encode())]))
    [scope] = inner.scopes
    user = scope["user"]
    assert isinstance(user, APIKeyUser)
    assert user.is_authenticated is True
    assert (user.identity, user.display_name) == ("bob", "bob")
    assert scope["auth"].scopes == ("read", "write")
    info = scope["keyguard.key"]
    assert isinstance(info, KeyInfo)
    assert info.user_id == "bob"
    assert user.key is info
    assert scope["auth"].key is info
    assert keys.write not in repr(user)


def test_one_request_cannot_widen_the_scopes_of_the_next(keys: Keyring) -> None:
    app, inner = guard(keys)
    for _ in range(2):
        run(app, make_scope([(b"x-api-key", keys.read.encode())]))
    first, second = inner.scopes
    with pytest.raises(AttributeError):
        first["auth"].scopes.append("admin")
    with pytest.raises(TypeError):
        first["auth"].key.metadata["permissions"].append("admin")
    assert second["auth"].scopes == ("read",)


def test_headers_pass_through_unchanged_by_default(keys: Keyring) -> None:
    app, inner = guard(keys)
    headers = [(b"x-api-key", keys.read.encode()), (b"accept", b"*/*")]
    run(app, make_scope(headers))
    assert inner.scopes[0]["headers"] == headers


# -- optional mode, required scopes --------------------------------------------------------


def test_optional_mode_lets_keyless_requests_in_as_anonymous(keys: Keyring) -> None:
    app, inner = guard(keys, optional=True)
    reply = run(app, make_scope())
    assert reply.status == 200
    [scope] = inner.scopes
    assert isinstance(scope["user"], AnonymousUser)
    assert scope["user"].is_authenticated is False
    assert scope["user"].display_name == ""
    assert scope["auth"].scopes == ()
    assert scope["keyguard.key"] is None


@pytest.mark.parametrize(
    ("header", "status", "code"),
    [
        pytest.param(b"<unknown>", 401, "invalid_api_key", id="unknown key"),
        pytest.param(b"<revoked>", 401, "revoked_api_key", id="revoked key"),
        pytest.param(b"", 400, "invalid_request", id="empty header"),
    ],
)
def test_optional_mode_still_refuses_bad_keys(
    keys: Keyring, header: bytes, status: int, code: str
) -> None:
    app, inner = guard(keys, optional=True)
    reply = run(app, make_scope([(b"x-api-key", keys.fill(header))]))
    assert (reply.status, reply.problem()["code"]) == (status, code)
    assert inner.scopes == []


def test_optional_mode_authenticates_a_valid_key(keys: Keyring) -> None:
    app, inner = guard(keys, optional=True)
    run(app, make_scope([(b"x-api-key", keys.read.encode())]))
    assert inner.scopes[0]["user"].identity == "alice"


def test_optional_mode_keeps_a_user_set_by_an_outer_middleware(keys: Keyring) -> None:
    app, inner = guard(keys, optional=True)
    scope = make_scope()
    scope["user"] = session_user = object()
    run(app, scope)
    assert inner.scopes[0]["user"] is session_user
    assert inner.scopes[0]["auth"].scopes == ()
    assert inner.scopes[0]["keyguard.key"] is None


@pytest.mark.parametrize(
    ("key", "status"),
    [
        pytest.param("read", 403, id="key without the scope"),
        pytest.param("write", 200, id="key with the scope"),
    ],
)
def test_required_scopes(keys: Keyring, key: str, status: int) -> None:
    app, inner = guard(keys, required_scopes=["write"])
    reply = run(app, make_scope([(b"x-api-key", getattr(keys, key).encode())]))
    assert reply.status == status
    if status == 403:
        assert reply.problem()["code"] == "insufficient_scope"
        assert reply.headers["www-authenticate"] == (
            'Bearer realm="api", error="insufficient_scope", scope="write"'
        )
        assert inner.scopes == []


# -- exempt paths, patterns, preflight -----------------------------------------------------


@pytest.mark.parametrize(
    ("path", "root_path", "exempt"),
    [
        pytest.param("/health", "", True, id="exact"),
        pytest.param("/healthz-admin", "", False, id="longer name"),
        pytest.param("/health/", "", False, id="trailing slash"),
        pytest.param("/health/../admin", "", False, id="dot-dot after"),
        pytest.param("/Health", "", False, id="other case"),
        pytest.param("/health/..", "", False, id="decoded %2F.."),
        pytest.param("/health%2F..", "", False, id="still encoded %2F.."),
        pytest.param("/healt", "", False, id="prefix of it"),
        pytest.param("/x/health", "", False, id="as a suffix"),
        pytest.param("/api/health", "/api", True, id="under root_path, full path"),
        pytest.param("/health", "/api", True, id="under root_path, relative path"),
        pytest.param("/apix/health", "/api", False, id="root_path not on a segment"),
        pytest.param("/api/health/", "/api", False, id="under root_path, trailing slash"),
        pytest.param("/api", "/api", False, id="the mount point itself"),
    ],
)
def test_exempt_paths_match_exactly(
    keys: Keyring, path: str, root_path: str, exempt: bool
) -> None:
    app, inner = guard(keys, exempt_paths=["/health"])
    reply = run(app, make_scope(path=path, root_path=root_path))
    assert reply.status == (200 if exempt else 401)
    assert len(inner.scopes) == (1 if exempt else 0)


def test_exempt_path_lets_a_request_in_as_anonymous(keys: Keyring) -> None:
    app, inner = guard(keys, exempt_paths=["/health"])
    run(app, make_scope(path="/health"))
    [scope] = inner.scopes
    assert scope["user"].is_authenticated is False
    assert scope["auth"].scopes == ()
    assert scope["keyguard.key"] is None


@pytest.mark.parametrize(
    ("path", "exempt"),
    [
        pytest.param("/docs", True, id="the prefix itself"),
        pytest.param("/docs/openapi.json", True, id="below it"),
        pytest.param("/docsx", False, id="longer name"),
        pytest.param("/docs/../admin", False, id="dot-dot segment"),
        pytest.param("/docs/./x", False, id="dot segment"),
        pytest.param("/docs/..;/admin", False, id="dot-dot with a path parameter"),
        pytest.param("/docs/..;jsessionid=1/admin", False, id="dot-dot with a named parameter"),
        pytest.param("/docs/.;/x", False, id="dot with a path parameter"),
        pytest.param("/docs/..\\admin", False, id="backslash"),
        pytest.param("/docs/a;b", True, id="a path parameter elsewhere"),
        pytest.param("/docs/.well-known", True, id="dot-file is not a dot segment"),
        pytest.param("/admin/docs", False, id="fullmatch, not search"),
    ],
)
def test_exempt_patterns_fullmatch(keys: Keyring, path: str, exempt: bool) -> None:
    app, _ = guard(keys, exempt_patterns=[r"/docs(/.*)?"])
    assert run(app, make_scope(path=path)).status == (200 if exempt else 401)


def test_exempt_patterns_accept_compiled_regexes(keys: Keyring) -> None:
    app, _ = guard(keys, exempt_patterns=[re.compile(r"/static/[a-z]+\.css")])
    assert run(app, make_scope(path="/static/site.css")).status == 200
    assert run(app, make_scope(path="/static/site.js")).status == 401


PREFLIGHT = [(b"origin", b"https://a.example"), (b"access-control-request-method", b"POST")]


@pytest.mark.parametrize(
    ("method", "headers", "options", "status"),
    [
        pytest.param("OPTIONS", PREFLIGHT, {}, 401, id="preflight, pass-through off by default"),
        pytest.param(
            "OPTIONS",
            PREFLIGHT,
            {"allow_cors_preflight": False},
            401,
            id="preflight, pass-through off",
        ),
        pytest.param(
            "OPTIONS", PREFLIGHT, {"allow_cors_preflight": True}, 200, id="preflight, enabled"
        ),
        pytest.param(
            "OPTIONS",
            PREFLIGHT[:1],
            {"allow_cors_preflight": True},
            401,
            id="enabled, options without ACRM",
        ),
        pytest.param(
            "OPTIONS", PREFLIGHT[1:], {"allow_cors_preflight": True}, 401, id="enabled, no origin"
        ),
        pytest.param(
            "GET", PREFLIGHT, {"allow_cors_preflight": True}, 401, id="enabled, not options"
        ),
    ],
)
def test_cors_preflight(
    keys: Keyring,
    method: str,
    headers: list[tuple[bytes, bytes]],
    options: dict[str, Any],
    status: int,
) -> None:
    app, inner = guard(keys, **options)
    assert run(app, make_scope(headers, method=method)).status == status
    assert len(inner.scopes) == (1 if status == 200 else 0)


@pytest.mark.anyio
async def test_cors_middleware_outside_answers_preflights_and_labels_refusals(
    keys: Keyring,
) -> None:
    """The recommended setup: preflights never reach keyguard, refusals stay readable."""
    inner = Recorder()
    app = CORSMiddleware(
        APIKeyMiddleware(inner, manager=keys.manager),
        allow_origins=["https://a.example"],
        allow_methods=["*"],
        allow_headers=["authorization"],
    )
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as client:
        origin = {"Origin": "https://a.example"}
        preflight = await client.options(
            "/items",
            headers={**origin, "Access-Control-Request-Method": "GET"},
        )
        refused = await client.get("/items", headers=origin)
        admitted = await client.get("/items", headers={**origin, "X-API-Key": keys.read})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == "https://a.example"
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == "https://a.example"
    assert admitted.json() == {"user": "alice"}
    assert len(inner.scopes) == 1


# -- other scope types, websockets ---------------------------------------------------------


def test_lifespan_passes_through_untouched(keys: Keyring) -> None:
    seen: list[tuple[Scope, Any, Any]] = []

    async def inner(scope: Scope, receive: Any, send: Any) -> None:
        seen.append((scope, receive, send))

    app = APIKeyMiddleware(inner, manager=keys.manager)
    scope: Scope = {"type": "lifespan", "asgi": {"version": "3.0"}}

    async def receive() -> Message:
        return {"type": "lifespan.startup"}

    async def send(message: Message) -> None:
        raise AssertionError("the middleware must not answer lifespan events")

    asyncio.run(app(scope, receive, send))
    assert seen == [(scope, receive, send)]
    assert scope == {"type": "lifespan", "asgi": {"version": "3.0"}}


def test_rejected_websocket_is_closed_before_accept(keys: Keyring) -> None:
    app, inner = guard(keys)
    reply = run(app, make_scope(scope_type="websocket", path="/ws"))
    assert reply.messages == [
        {"type": "websocket.close", "code": 1008, "reason": "missing_api_key"}
    ]
    assert inner.scopes == []


def test_rejected_websocket_gets_an_http_denial_when_supported(keys: Keyring) -> None:
    app, inner = guard(keys)
    scope = make_scope(
        [(b"x-api-key", keys.revoked.encode())],
        scope_type="websocket",
        path="/ws",
        extensions={"websocket.http.response": {}},
    )
    reply = run(app, scope)
    assert [m["type"] for m in reply.messages] == [
        "websocket.http.response.start",
        "websocket.http.response.body",
    ]
    assert reply.status == 401
    assert reply.problem()["code"] == "revoked_api_key"
    assert inner.scopes == []


def test_accepted_websocket_reaches_the_app(keys: Keyring) -> None:
    app, inner = guard(keys)
    scope = make_scope([(b"x-api-key", keys.read.encode())], scope_type="websocket", path="/ws")
    reply = run(app, scope)
    assert reply.messages == [{"type": "websocket.accept"}]
    assert inner.scopes[0]["user"].identity == "alice"


# -- strip_credentials, query_param --------------------------------------------------------


def test_strip_credentials_removes_only_credential_headers(keys: Keyring) -> None:
    app, inner = guard(keys, strip_credentials=True)
    headers = [
        (b"accept", b"*/*"),
        (b"authorization", b"Bearer " + keys.read.encode()),
        (b"x-api-key", keys.read.encode()),
        (b"x-request-id", b"42"),
    ]
    run(app, make_scope(headers))
    assert inner.scopes[0]["headers"] == [(b"accept", b"*/*"), (b"x-request-id", b"42")]
    assert inner.scopes[0]["user"].identity == "alice"


def test_strip_credentials_with_a_single_header(keys: Keyring) -> None:
    app, inner = guard(keys, strip_credentials=True)
    run(app, make_scope([(b"authorization", b"Bearer " + keys.read.encode())]))
    assert inner.scopes[0]["headers"] == []


def test_strip_credentials_keeps_other_authorization_schemes(keys: Keyring) -> None:
    app, inner = guard(keys, strip_credentials=True, optional=True)
    run(app, make_scope([(b"authorization", b"Basic YTpi")]))
    assert inner.scopes[0]["headers"] == [(b"authorization", b"Basic YTpi")]


def test_strip_credentials_on_exempt_paths_too(keys: Keyring) -> None:
    app, inner = guard(keys, strip_credentials=True, exempt_paths=["/health"])
    run(app, make_scope([(b"x-api-key", keys.read.encode())], path="/health"))
    assert inner.scopes[0]["headers"] == []


def test_query_param_warns_once_at_construction(keys: Keyring) -> None:
    with pytest.warns(UserWarning, match="query parameter.*leak") as record:
        app, _ = guard(keys, query_param="api_key")
    assert len(record) == 1
    assert record[0].filename == __file__
    scope = make_scope(query_string=b"api_key=" + keys.read.encode())
    assert run(app, scope).status == 200
    assert run(app, scope).status == 200  # no warning per request (warnings are errors here)


@pytest.mark.parametrize(
    ("query", "headers", "status", "code"),
    [
        pytest.param(b"api_key=<read>", [], 200, None, id="key in query"),
        pytest.param(b"a=1&api_key=<read>&b=2", [], 200, None, id="among other parameters"),
        pytest.param(b"api%5Fkey=<read>", [], 200, None, id="percent-encoded name"),
        pytest.param(b"a=1", [], 401, "missing_api_key", id="absent"),
        pytest.param(b"api_key=", [], 400, "invalid_request", id="empty"),
        pytest.param(b"api_key=<read>&api_key=<write>", [], 400, "invalid_request", id="twice"),
        pytest.param(b"api_key=<read>&api_key=<read>", [], 200, None, id="same key twice"),
        pytest.param(
            b"api_key=<read>",
            [(b"x-api-key", b"<write>")],
            400,
            "invalid_request",
            id="query and header differ",
        ),
        pytest.param(
            b"api_key=<read>", [(b"x-api-key", b"<read>")], 200, None, id="query and header agree"
        ),
        pytest.param(b"api_key=%00<read>", [], 400, "invalid_request", id="encoded NUL"),
        pytest.param(b"api_key=<revoked>", [], 401, "revoked_api_key", id="revoked key"),
    ],
)
def test_query_param_cases(
    keys: Keyring,
    query: bytes,
    headers: list[tuple[bytes, bytes]],
    status: int,
    code: str | None,
) -> None:
    with pytest.warns(UserWarning):
        app, inner = guard(keys, query_param="api_key")
    filled = [(n, keys.fill(v)) for n, v in headers]
    reply = run(app, make_scope(filled, query_string=keys.fill(query)))
    assert reply.status == status
    assert_no_secret(keys, reply)
    if code is not None:
        assert reply.problem()["code"] == code
        assert inner.scopes == []


def test_query_param_is_not_read_by_default(keys: Keyring) -> None:
    app, _ = guard(keys)
    reply = run(app, make_scope(query_string=b"api_key=" + keys.read.encode()))
    assert reply.problem()["code"] == "missing_api_key"


def test_strip_credentials_removes_the_query_param(keys: Keyring) -> None:
    with pytest.warns(UserWarning):
        app, inner = guard(keys, query_param="api_key", strip_credentials=True)
    run(app, make_scope(query_string=b"a=1&api_key=" + keys.read.encode() + b"&b=%20"))
    assert inner.scopes[0]["query_string"] == b"a=1&b=%20"


# -- failures: store errors, custom responses, realm ---------------------------------------


def test_store_error_is_a_503_not_a_500(keys: Keyring, caplog: pytest.LogCaptureFixture) -> None:
    manager = type(keys.manager)(BrokenStore("database is unreachable"))
    inner = Recorder()
    app = APIKeyMiddleware(inner, manager=manager)
    reply = run(app, make_scope([(b"x-api-key", keys.read.encode())]))
    assert reply.status == 503
    assert reply.problem()["code"] == "store_unavailable"
    assert "www-authenticate" not in reply.headers
    assert inner.scopes == []
    assert "database is unreachable" in caplog.text
    assert keys.read not in caplog.text


def test_async_store_is_read_through_averify(keys: Keyring) -> None:
    store = AsyncStore()
    manager = type(keys.manager)(store)
    key = manager.generate_key(user_id="erin", permissions=["read"])
    assert isinstance(store, AsyncKeyStore)
    app = APIKeyMiddleware(Recorder(), manager=manager)
    assert run(app, make_scope([(b"x-api-key", key.encode())])).status == 200
    assert run(app, make_scope([(b"authorization", b"BEARER " + key.encode())])).status == 200
    assert store.async_reads == 2


def test_async_store_error_is_a_503(keys: Keyring) -> None:
    manager = type(keys.manager)(AsyncStore(fail=True))
    key = manager.format.generate()
    app = APIKeyMiddleware(Recorder(), manager=manager)
    for value in (key.encode(), b" " + key.encode()):  # the fast path and the exact one
        reply = run(app, make_scope([(b"x-api-key", value)]))
        assert (reply.status, reply.problem()["code"]) == (503, "store_unavailable")


def test_websocket_store_error_closes_with_try_again_later(keys: Keyring) -> None:
    manager = type(keys.manager)(BrokenStore())
    app = APIKeyMiddleware(Recorder(), manager=manager)
    scope = make_scope([(b"x-api-key", keys.read.encode())], scope_type="websocket")
    assert run(app, scope).messages[0]["code"] == 1013


def test_error_responder_renders_refusals(keys: Keyring) -> None:
    seen: list[tuple[Problem, Mapping[str, Any]]] = []

    def responder(problem: Problem, request: Mapping[str, Any]) -> ErrorResponse:
        seen.append((problem, request))
        headers = [*problem.response.headers, ("x-error", problem.code)]
        return ErrorResponse(418 if problem.status == 401 else problem.status, headers, b"no")

    app, inner = guard(keys, error_responder=responder)
    reply = run(app, make_scope([(b"x-api-key", keys.revoked.encode())], path="/secret"))
    assert (reply.status, reply.body) == (418, b"no")
    assert reply.headers["x-error"] == "revoked_api_key"
    assert reply.headers["www-authenticate"] == 'Bearer realm="api", error="invalid_token"'
    [(problem, request)] = seen
    assert problem.code == "revoked_api_key"
    assert request["path"] == "/secret"
    assert inner.scopes == []


def test_error_responder_returning_none_or_a_tuple(keys: Keyring) -> None:
    def responder(problem: Problem, request: Mapping[str, Any]) -> Any:
        if problem.code == "missing_api_key":
            return None
        return (400, [("content-type", "text/plain")], b"bad key")

    app, _ = guard(keys, error_responder=responder)
    assert run(app, make_scope()).problem()["code"] == "missing_api_key"
    reply = run(app, make_scope([(b"x-api-key", b"nope")]))
    assert (reply.status, reply.body) == (400, b"bad key")


def _raise_with_the_request(problem: Problem, request: Mapping[str, Any]) -> Any:
    raise RuntimeError(f"cannot render {problem.code} for {request['headers']!r}")


BROKEN_RESPONDERS = [
    pytest.param(lambda p, r: "oops", "got str", id="not a response"),
    pytest.param(lambda p, r: (401, []), "got tuple", id="two fields"),
    pytest.param(lambda p, r: (99, [], b""), "status", id="status below 100"),
    pytest.param(lambda p, r: (600, [], b""), "status", id="status above 599"),
    pytest.param(lambda p, r: ("401", [], b""), "status", id="status as str"),
    pytest.param(lambda p, r: (True, [], b""), "status", id="status as bool"),
    pytest.param(lambda p, r: (401, [("x-a", "b", "c")], b""), "pairs", id="header triple"),
    pytest.param(lambda p, r: (401, 5, b""), "iterable", id="headers not iterable"),
    pytest.param(lambda p, r: (401, [(b"x-a", "b")], b""), "name", id="bytes header name"),
    pytest.param(lambda p, r: (401, [("x a", "b")], b""), "name", id="space in header name"),
    pytest.param(lambda p, r: (401, [("x-a", "€")], b""), "latin-1", id="non-latin-1 value"),
    pytest.param(lambda p, r: (401, [("x-a", "b\r\nc: d")], b""), "latin-1", id="CRLF"),
    pytest.param(lambda p, r: (401, [("x-a", 1)], b""), "latin-1", id="int header value"),
    pytest.param(lambda p, r: (401, [], "no"), "bytes", id="str body"),
    pytest.param(_raise_with_the_request, "RuntimeError: cannot render", id="raises"),
]


@pytest.mark.parametrize(("responder", "logged"), BROKEN_RESPONDERS)
def test_broken_error_responder_sends_the_default_refusal(
    keys: Keyring, caplog: pytest.LogCaptureFixture, responder: Any, logged: str
) -> None:
    app, inner = guard(keys, error_responder=responder)
    for value, expected in (
        (b"Bearer " + keys.revoked.encode(), "revoked_api_key"),  # the fast path
        (b"", "invalid_request"),  # the exact reader
    ):
        caplog.clear()
        reply = run(app, make_scope([(b"authorization", value)]))
        assert reply.problem()["code"] == expected
        [record] = caplog.records
        assert (record.name, record.levelname) == ("keyguard", "ERROR")
        message = record.getMessage()
        assert logged in message
        assert expected in message
        assert keys.revoked not in message
        assert record.exc_info is None  # the traceback is in the (masked) message
    assert inner.scopes == []


def test_error_responder_headers_may_be_a_mapping(keys: Keyring) -> None:
    app, _ = guard(keys, error_responder=lambda p, r: (401, {"x-a": "b"}, b"no"))
    reply = run(app, make_scope())
    assert (reply.status, reply.headers, reply.body) == (401, {"x-a": "b"}, b"no")


def test_error_responder_error_log_masks_every_credential(
    keys: Keyring, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "not-a-keyguard-key-but-a-secret"
    with pytest.warns(UserWarning):
        app, _ = guard(keys, error_responder=_raise_with_the_request, query_param="k")
    headers = [(b"x-api-key", f"{keys.read}, {secret}".encode())]
    run(app, make_scope(headers, query_string=f"k={keys.write}".encode()))
    message = caplog.records[-1].getMessage()
    assert "cannot render invalid_request" in message
    for leaked in (keys.read, keys.write, secret):
        assert leaked not in message
    assert "sk_…" + keys.read[-4:] in message


@pytest.mark.parametrize(
    "shape",
    [
        pytest.param("{key}\x00", id="trailing NUL"),
        pytest.param('{key}"', id="trailing quote"),
        pytest.param("{key}é", id="trailing e-acute"),
        pytest.param("\x1b[2J{key}", id="leading escape sequence"),
    ],
)
def test_error_responder_error_log_masks_a_key_beside_escaped_characters(
    keys: Keyring, caplog: pytest.LogCaptureFixture, shape: str
) -> None:
    app, _ = guard(keys, error_responder=_raise_with_the_request)
    value = shape.format(key=keys.read).encode("utf-8")
    reply = run(app, make_scope([(b"x-api-key", value)]))
    assert reply.status in (400, 401)  # not visible ASCII, or not a key: refused either way
    message = caplog.records[-1].getMessage()
    assert "cannot render" in message
    assert keys.read not in message
    assert keys.read[3:-4] not in message
    assert "…" in message


def test_realm_appears_in_challenges(keys: Keyring) -> None:
    app, _ = guard(keys, realm="billing API")
    reply = run(app, make_scope())
    assert reply.headers["www-authenticate"] == 'Bearer realm="billing API"'


def test_problem_body_is_rfc9457(keys: Keyring) -> None:
    app, _ = guard(keys)
    reply = run(app, make_scope([(b"x-api-key", keys.expired.encode())]))
    assert reply.headers["content-length"] == str(len(reply.body))
    assert reply.problem() == {
        "type": "about:blank",
        "title": "Unauthorized",
        "status": 401,
        "detail": "The API key has expired.",
        "code": "expired_api_key",
    }


def test_refusal_headers_are_fresh_for_each_response(keys: Keyring) -> None:
    """An outer middleware may append to the header list; that must not leak into others."""
    app, _ = guard(keys)
    first = run(app, make_scope())
    first.messages[0]["headers"].append((b"x-leak", b"1"))
    assert b"x-leak" not in dict(run(app, make_scope()).raw_headers)


# -- configuration errors ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        pytest.param({"exempt_paths": "/health"}, TypeError, "list", id="exempt path as str"),
        pytest.param({"exempt_paths": ["health"]}, ValueError, "normalised", id="relative"),
        pytest.param({"exempt_paths": ["/a/../b"]}, ValueError, "normalised", id="dot-dot"),
        pytest.param({"exempt_paths": ["/a//b"]}, ValueError, "normalised", id="double slash"),
        pytest.param({"exempt_paths": ["/a?b=1"]}, ValueError, "normalised", id="with query"),
        pytest.param({"exempt_paths": [b"/a"]}, TypeError, "str", id="bytes path"),
        pytest.param({"exempt_patterns": "/a.*"}, TypeError, "list", id="pattern as str"),
        pytest.param({"header_names": "x-api-key"}, TypeError, "list", id="header as str"),
        pytest.param({"header_names": ["x api key"]}, ValueError, "header", id="bad header"),
        pytest.param({"header_names": ["Cookie"]}, ValueError, "cannot carry", id="cookie"),
        pytest.param({"header_names": []}, ValueError, "at least one", id="nowhere to read"),
        pytest.param({"realm": 'a"b'}, ValueError, "realm", id="quote in realm"),
        pytest.param({"realm": ""}, ValueError, "realm", id="empty realm"),
        pytest.param({"required_scopes": ["a b"]}, ValueError, "scope", id="scope with space"),
        pytest.param(
            {"optional": True, "required_scopes": ["read"]},
            ValueError,
            "optional",
            id="optional with required scopes",
        ),
        pytest.param({"error_responder": 3}, TypeError, "callable", id="responder not callable"),
        pytest.param({"query_param": "a b"}, ValueError, "query", id="bad query param"),
    ],
)
def test_bad_configuration_raises(
    keys: Keyring, options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        APIKeyMiddleware(Recorder(), manager=keys.manager, **options)


def test_repr_names_app_and_manager(keys: Keyring) -> None:
    app, _ = guard(keys)
    assert repr(app).startswith("APIKeyMiddleware(app=<tests.test_asgi.Recorder object")
    assert "manager=APIKeyManager(" in repr(app)


def test_manager_is_required_to_be_a_manager() -> None:
    with pytest.raises(TypeError, match="APIKeyManager"):
        APIKeyMiddleware(Recorder(), manager=object())  # type: ignore[arg-type]


def test_required_scopes_accepts_a_single_string(keys: Keyring) -> None:
    app, _ = guard(keys, required_scopes="write")
    assert run(app, make_scope([(b"x-api-key", keys.read.encode())])).status == 403


@pytest.mark.parametrize(
    ("options", "detail"),
    [
        pytest.param(
            {},
            "This API needs an API key: send it as 'Authorization: Bearer <key>'"
            " or 'X-API-Key: <key>'.",
            id="defaults",
        ),
        pytest.param(
            {"header_names": ["x-api-key", "X-Token", "X-TOKEN"]},
            "This API needs an API key: send it as 'x-api-key: <key>' or 'X-Token: <key>'.",
            id="as given, first spelling of a repeat",
        ),
        pytest.param(
            {"header_names": ["authorization"], "query_param": "api_key"},
            "This API needs an API key: send it as 'authorization: Bearer <key>'"
            " or the 'api_key' query parameter.",
            id="lower-case authorization and a query parameter",
        ),
    ],
)
def test_missing_key_detail_names_headers_as_configured(
    keys: Keyring, options: dict[str, Any], detail: str
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the query_param warning
        app, _ = guard(keys, **options)
    assert run(app, make_scope()).problem()["detail"] == detail


def test_custom_header_names(keys: Keyring) -> None:
    app, _ = guard(keys, header_names=["X-Token"])
    assert run(app, make_scope([(b"x-token", keys.read.encode())])).status == 200
    reply = run(app, make_scope([(b"authorization", b"Bearer " + keys.read.encode())]))
    assert reply.problem()["code"] == "missing_api_key"
    assert "X-Token: <key>" in reply.problem()["detail"]


# -- a real Starlette app ------------------------------------------------------------------


def starlette_app(keys: Keyring, **options: Any) -> Starlette:
    async def whoami(request: Request) -> JSONResponse:
        return JSONResponse(
            {
                "user": request.user.identity,
                "name": request.user.display_name,
                "authenticated": request.user.is_authenticated,
                "scopes": request.auth.scopes,
            }
        )

    @requires("write")
    async def write(request: Request) -> JSONResponse:
        return JSONResponse({"wrote": True})

    @requires("read")
    async def socket(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json({"user": websocket.user.identity})
        await websocket.close()

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True, "authenticated": request.user.is_authenticated})

    inner = Starlette(routes=[Route("/whoami", whoami)])
    return Starlette(
        routes=[
            Route("/health", health),
            Route("/whoami", whoami),
            Route("/write", write, methods=["POST"]),
            WebSocketRoute("/ws", socket),
            Mount("/v1", app=inner),
        ],
        middleware=[Middleware(APIKeyMiddleware, manager=keys.manager, **options)],
    )


@pytest.mark.anyio
async def test_starlette_request_user_and_auth(keys: Keyring) -> None:
    app = starlette_app(keys, exempt_paths=["/health"])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        response = await client.get("/whoami", headers={"Authorization": f"Bearer {keys.read}"})
        assert response.json() == {
            "user": "alice",
            "name": "alice",
            "authenticated": True,
            "scopes": ["read"],
        }
        health = await client.get("/health")
        assert health.json() == {"ok": True, "authenticated": False}
        refused = await client.get("/whoami")
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/problem+json"


@pytest.mark.parametrize(
    ("key", "status"),
    [
        pytest.param("write", 200, id="key with write"),
        pytest.param("read", 403, id="key without write"),
    ],
)
def test_starlette_requires_decorator(keys: Keyring, key: str, status: int) -> None:
    with TestClient(starlette_app(keys)) as client:
        response = client.post("/write", headers={"X-API-Key": getattr(keys, key)})
    assert response.status_code == status


def test_starlette_mount_sees_the_user(keys: Keyring) -> None:
    with TestClient(starlette_app(keys)) as client:
        response = client.get("/v1/whoami", headers={"X-API-Key": keys.write})
    assert response.json()["scopes"] == ["read", "write"]


def test_starlette_websocket_with_a_key(keys: Keyring) -> None:
    with (
        TestClient(starlette_app(keys)) as client,
        client.websocket_connect("/ws", headers={"X-API-Key": keys.read}) as ws,
    ):
        assert ws.receive_json() == {"user": "alice"}


def test_starlette_websocket_without_a_key_is_denied(keys: Keyring) -> None:
    with (
        TestClient(starlette_app(keys)) as client,
        pytest.raises(WebSocketDenialResponse) as exc_info,
        client.websocket_connect("/ws"),
    ):
        pass  # pragma: no cover - the handshake is refused
    denial = exc_info.value
    assert denial.status_code == 401
    assert denial.json()["code"] == "missing_api_key"
    assert denial.headers["www-authenticate"] == 'Bearer realm="api"'


def test_starlette_websocket_close_without_denial_extension(keys: Keyring) -> None:
    """Servers without the denial extension see a close before accept (they answer 403)."""
    app = APIKeyMiddleware(starlette_app(keys), manager=keys.manager)
    scope = make_scope([(b"x-api-key", keys.expired.encode())], scope_type="websocket", path="/ws")
    reply = run(app, scope)
    assert reply.messages == [
        {"type": "websocket.close", "code": 1008, "reason": "expired_api_key"}
    ]


@pytest.mark.parametrize("case", CLIENT_CASES)
def test_credential_cases_through_starlette_testclient(keys: Keyring, case: Case) -> None:
    app, inner = guard(keys)
    headers = [(name, keys.fill(value).decode("latin-1")) for name, value in case.headers]
    with TestClient(app) as client:
        response = client.get("/items", headers=headers)
    answer = Answer.of(response.status_code, response.headers.raw, response.content)
    assert_answer(keys, case, answer, reached=inner.scopes)
