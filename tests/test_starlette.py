"""keyguard.starlette: the AuthenticationBackend under Starlette's AuthenticationMiddleware."""

from __future__ import annotations

from collections.abc import AsyncIterator, MutableMapping
from datetime import timedelta
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.authentication import (
    AuthCredentials,
    AuthenticationBackend,
    AuthenticationError,
    BaseUser,
    requires,
)
from starlette.endpoints import HTTPEndpoint
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocket

from keyguard import APIKeyManager, KeyInfo, MemoryStore
from keyguard.asgi import APIKeyMiddleware, ErrorResponse, Problem
from keyguard.identity import APIKeyUser as PlainAPIKeyUser
from keyguard.starlette import (
    APIKeyAuthenticationMiddleware,
    APIKeyBackend,
    APIKeyUser,
    on_auth_error,
    require_scopes,
)
from tests.credential_cases import CASES, Case, Keyring, request_asgi
from tests.helpers import BrokenStore, Clock, assert_answer

pytestmark = pytest.mark.anyio

UNKNOWN_KEY = "sk_" + "0" * 32


async def whoami(request: Request) -> JSONResponse:
    key = request.scope.get("keyguard.key")
    return JSONResponse(
        {
            "authenticated": request.user.is_authenticated,
            "user": request.user.display_name,
            "scopes": request.auth.scopes,
            "key_id": key.key_id if isinstance(key, KeyInfo) else None,
            "starlette_user": isinstance(request.user, BaseUser),
        }
    )


@requires("write")
async def write(request: Request) -> JSONResponse:
    return JSONResponse({"written_by": request.user.identity}, status_code=201)


async def echo_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_json({"user": websocket.user.display_name})
    await websocket.close()


def make_app(backend: AuthenticationBackend) -> Starlette:
    return Starlette(
        routes=[
            Route("/whoami", whoami),
            Route("/items", write, methods=["POST"]),
            WebSocketRoute("/ws", echo_socket),
        ],
        middleware=[Middleware(AuthenticationMiddleware, backend=backend, on_error=on_auth_error)],
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def manager(clock: Clock) -> APIKeyManager:
    return APIKeyManager(MemoryStore(), clock=clock)


def make_client(app: Starlette) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
async def client(manager: APIKeyManager) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(make_app(APIKeyBackend(manager))) as client:
        yield client


async def websocket_handshake(
    app: Starlette, headers: dict[str, str], path: str = "/ws"
) -> list[dict[str, Any]]:
    """Open a WebSocket to ``path`` in-process, without the denial-response extension."""
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "scheme": "ws",
        "query_string": b"",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
        "client": ("127.0.0.1", 1234),
        "server": ("test", 80),
        "subprotocols": [],
    }
    incoming = [{"type": "websocket.connect"}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0) if incoming else {"type": "websocket.disconnect", "code": 1000}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    await app(scope, receive, send)
    return sent


@pytest.mark.parametrize(
    "header_name, template",
    [
        pytest.param("Authorization", "Bearer {}", id="bearer token"),
        pytest.param("Authorization", "bearer {}", id="lowercase bearer scheme"),
        pytest.param("X-API-Key", "{}", id="x-api-key header"),
    ],
)
async def test_valid_key_sets_user_scopes_and_key_info(
    manager: APIKeyManager, client: httpx.AsyncClient, header_name: str, template: str
) -> None:
    key, info = manager.create_key(user_id="alice", permissions=["read", "write"])
    response = await client.get("/whoami", headers={header_name: template.format(key)})
    assert response.status_code == 200
    assert response.json() == {
        "authenticated": True,
        "user": "alice",
        "scopes": ["read", "write"],
        "key_id": info.key_id,
        "starlette_user": True,
    }


async def test_user_is_both_a_starlette_and_a_keyguard_user(manager: APIKeyManager) -> None:
    _, info = manager.create_key(user_id="alice")
    user = APIKeyUser(info)
    assert isinstance(user, BaseUser)
    assert isinstance(user, PlainAPIKeyUser)
    assert (user.is_authenticated, user.identity, user.key) == (True, "alice", info)


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no credential"),
        pytest.param({"Authorization": "Basic dXNlcjpwYXNz"}, id="another auth scheme"),
    ],
)
async def test_request_without_key_is_anonymous(
    client: httpx.AsyncClient, headers: dict[str, str]
) -> None:
    response = await client.get("/whoami", headers=headers)
    assert response.status_code == 200
    assert response.json()["authenticated"] is False
    assert response.json()["scopes"] == []


async def test_requires_refuses_anonymous_and_under_scoped_keys(
    manager: APIKeyManager, client: httpx.AsyncClient
) -> None:
    reader = manager.generate_key(user_id="reader", permissions=["read"])
    writer = manager.generate_key(user_id="writer", permissions=["write"])
    assert (await client.post("/items")).status_code == 403
    assert (await client.post("/items", headers={"X-API-Key": reader})).status_code == 403
    response = await client.post("/items", headers={"X-API-Key": writer})
    assert (response.status_code, response.json()) == (201, {"written_by": "writer"})


@pytest.mark.parametrize(
    "case, status, code, challenge",
    [
        pytest.param("unknown", 401, "invalid_api_key", 'error="invalid_token"', id="unknown"),
        pytest.param("malformed", 401, "invalid_api_key", 'error="invalid_token"', id="malformed"),
        pytest.param("revoked", 401, "revoked_api_key", 'error="invalid_token"', id="revoked"),
        pytest.param("expired", 401, "expired_api_key", 'error="invalid_token"', id="expired"),
        pytest.param("two keys", 400, "invalid_request", 'error="invalid_request"', id="two keys"),
    ],
)
async def test_refused_key_gets_problem_json(
    manager: APIKeyManager,
    client: httpx.AsyncClient,
    clock: Clock,
    case: str,
    status: int,
    code: str,
    challenge: str,
) -> None:
    key = manager.generate_key(user_id="alice", expires_in=timedelta(hours=1))
    headers = {"Authorization": f"Bearer {key}"}
    if case == "unknown":
        headers = {"Authorization": f"Bearer {UNKNOWN_KEY}"}
    elif case == "malformed":
        headers = {"X-API-Key": "not-a-key"}
    elif case == "revoked":
        assert manager.revoke_key(key)
    elif case == "expired":
        clock.now += 7200
    elif case == "two keys":
        headers["X-API-Key"] = manager.generate_key(user_id="bob")
    response = await client.get("/whoami", headers=headers)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == f'Bearer realm="api", {challenge}'
    assert response.json()["code"] == code
    assert key not in response.text


async def test_store_failure_is_503_not_500() -> None:
    async with make_client(make_app(APIKeyBackend(APIKeyManager(BrokenStore())))) as client:
        response = await client.get("/whoami", headers={"X-API-Key": UNKNOWN_KEY})
    assert response.status_code == 503
    assert response.json()["code"] == "store_unavailable"


async def test_custom_header_and_realm(manager: APIKeyManager) -> None:
    key = manager.generate_key(user_id="alice")
    backend = APIKeyBackend(manager, header_names=["x-token"], realm="shop")
    async with make_client(make_app(backend)) as client:
        accepted = await client.get("/whoami", headers={"X-Token": key})
        ignored = await client.get("/whoami", headers={"X-API-Key": key})
        refused = await client.get("/whoami", headers={"X-Token": UNKNOWN_KEY})
    assert accepted.json()["user"] == "alice"
    assert ignored.json()["authenticated"] is False
    assert refused.headers["www-authenticate"].startswith('Bearer realm="shop"')


async def test_websocket_handshake_is_authenticated(manager: APIKeyManager) -> None:
    app = make_app(APIKeyBackend(manager))
    key = manager.generate_key(user_id="alice")
    accepted = await websocket_handshake(app, {"X-API-Key": key})
    assert [m["type"] for m in accepted] == [
        "websocket.accept",
        "websocket.send",
        "websocket.close",
    ]
    assert accepted[1]["text"] == '{"user":"alice"}'
    refused = await websocket_handshake(app, {"X-API-Key": UNKNOWN_KEY})
    # Starlette's own middleware closes a refused handshake as a normal closure.
    assert refused == [{"type": "websocket.close", "code": 1000}]


async def test_errors_of_other_backends_keep_starlette_default() -> None:
    class Refusing(AuthenticationBackend):
        async def authenticate(
            self, conn: HTTPConnection
        ) -> tuple[AuthCredentials, BaseUser] | None:
            raise AuthenticationError("nope")

    async with make_client(make_app(Refusing())) as client:
        response = await client.get("/whoami")
    assert (response.status_code, response.text) == (400, "nope")


# -- APIKeyAuthenticationMiddleware: WebSocket refusals ------------------------------------


def keyguard_auth_app(backend: AuthenticationBackend) -> Starlette:
    return Starlette(
        routes=[Route("/whoami", whoami), WebSocketRoute("/ws", echo_socket)],
        middleware=[Middleware(APIKeyAuthenticationMiddleware, backend=backend)],
    )


@pytest.mark.parametrize(
    ("headers", "code", "reason"),
    [
        pytest.param({"X-API-Key": UNKNOWN_KEY}, 1008, "invalid_api_key", id="unknown key"),
        pytest.param({"X-API-Key": "a b"}, 1008, "invalid_request", id="two tokens"),
    ],
)
async def test_keyguard_auth_middleware_closes_refused_handshakes_with_1008(
    manager: APIKeyManager, headers: dict[str, str], code: int, reason: str
) -> None:
    refused = await websocket_handshake(keyguard_auth_app(APIKeyBackend(manager)), headers)
    assert refused == [{"type": "websocket.close", "code": code, "reason": reason}]


async def test_keyguard_auth_middleware_closes_with_1013_when_the_store_fails() -> None:
    app = keyguard_auth_app(APIKeyBackend(APIKeyManager(BrokenStore())))
    refused = await websocket_handshake(app, {"X-API-Key": UNKNOWN_KEY})
    assert refused == [{"type": "websocket.close", "code": 1013, "reason": "store_unavailable"}]


def test_keyguard_auth_middleware_sends_the_problem_where_the_server_can(
    manager: APIKeyManager,
) -> None:
    key = manager.generate_key(user_id="alice")
    assert manager.revoke_key(key)
    with (
        TestClient(keyguard_auth_app(APIKeyBackend(manager))) as client,
        pytest.raises(WebSocketDenialResponse) as exc_info,
        client.websocket_connect("/ws", headers={"Authorization": f"Bearer {key}"}),
    ):
        pass  # pragma: no cover - the handshake is refused
    denial = exc_info.value
    assert (denial.status_code, denial.json()["code"]) == (401, "revoked_api_key")
    assert denial.headers["www-authenticate"] == 'Bearer realm="api", error="invalid_token"'
    assert key not in denial.text


async def test_keyguard_auth_middleware_admits_keys_and_anonymous_handshakes(
    manager: APIKeyManager,
) -> None:
    app = keyguard_auth_app(APIKeyBackend(manager))
    key = manager.generate_key(user_id="alice")
    accepted = await websocket_handshake(app, {"X-API-Key": key})
    assert accepted[1]["text"] == '{"user":"alice"}'
    anonymous = await websocket_handshake(app, {})
    assert anonymous[1]["text"] == '{"user":""}'
    async with make_client(app) as client:
        refused = await client.get("/whoami", headers={"X-API-Key": UNKNOWN_KEY})
    assert refused.json()["code"] == "invalid_api_key"  # on_error defaults to on_auth_error


async def test_keyguard_auth_middleware_closes_on_other_backends_errors() -> None:
    class Refusing(AuthenticationBackend):
        async def authenticate(
            self, conn: HTTPConnection
        ) -> tuple[AuthCredentials, BaseUser] | None:
            raise AuthenticationError("nope")

    refused = await websocket_handshake(keyguard_auth_app(Refusing()), {})
    assert refused == [{"type": "websocket.close", "code": 1008}]


# -- the credential table, through the backend and @require_scopes() ----------------------


@pytest.mark.parametrize("case", CASES)
async def test_credential_cases(case: Case) -> None:
    keys = Keyring.build()

    @require_scopes()
    async def items(request: Request) -> JSONResponse:
        return JSONResponse({"user": request.user.identity})

    app = Starlette(
        routes=[Route("/items", items)],
        middleware=[
            Middleware(APIKeyAuthenticationMiddleware, backend=APIKeyBackend(keys.manager))
        ],
    )
    headers = [(name.encode(), keys.fill(value)) for name, value in case.headers]
    assert_answer(keys, case, await request_asgi(app, headers))


# -- require_scopes ------------------------------------------------------------------------


@require_scopes("write")
async def create_item(request: Request) -> JSONResponse:
    return JSONResponse({"by": request.user.identity}, status_code=201)


@require_scopes("write")
def create_item_sync(request: Request) -> JSONResponse:
    return JSONResponse({"by": request.user.identity}, status_code=201)


class ItemEndpoint(HTTPEndpoint):
    @require_scopes("write")
    async def post(self, request: Request) -> JSONResponse:
        return JSONResponse({"by": request.user.identity}, status_code=201)


@require_scopes()
async def any_key(request: Request) -> JSONResponse:
    return JSONResponse({"by": request.user.identity})


@require_scopes("write")
async def write_socket(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_json({"user": websocket.user.identity})
    await websocket.close()


def guarded_app(manager: APIKeyManager, **options: Any) -> Starlette:
    return Starlette(
        routes=[
            Route("/items", create_item, methods=["POST"]),
            Route("/items-sync", create_item_sync, methods=["POST"]),
            Route("/items-endpoint", ItemEndpoint),
            Route("/open", any_key),
            Route("/any", any_key),
            WebSocketRoute("/ws", write_socket),
        ],
        middleware=[
            Middleware(APIKeyMiddleware, manager=manager, exempt_paths=["/open"], **options)
        ],
    )


@pytest.mark.parametrize("path", ["/items", "/items-sync", "/items-endpoint"])
async def test_require_scopes_refuses_a_key_without_the_scope(
    manager: APIKeyManager, path: str
) -> None:
    reader = manager.generate_key(user_id="reader", permissions=["read"])
    writer = manager.generate_key(user_id="writer", permissions=["read", "write"])
    async with make_client(guarded_app(manager, realm="shop")) as client:
        refused = await client.post(path, headers={"X-API-Key": reader})
        created = await client.post(path, headers={"Authorization": f"Bearer {writer}"})
    assert refused.status_code == 403
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["www-authenticate"] == (
        'Bearer realm="shop", error="insufficient_scope", scope="write"'
    )
    assert refused.json()["code"] == "insufficient_scope"
    assert reader not in refused.text
    assert (created.status_code, created.json()) == (201, {"by": "writer"})


async def test_require_scopes_without_a_key_is_the_middlewares_401(
    manager: APIKeyManager,
) -> None:
    app = guarded_app(manager, optional=True, realm="shop", header_names=["X-Token"])
    key = manager.generate_key(user_id="alice")
    async with make_client(app) as client:
        anonymous = await client.get("/any")
        admitted = await client.get("/any", headers={"X-Token": key})
        # On an exempt path the middleware checks no key, so none is attached.
        exempt = await client.get("/open", headers={"X-Token": key})
    for refused in (anonymous, exempt):
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == 'Bearer realm="shop"'
        assert refused.json()["code"] == "missing_api_key"
        assert "'X-Token: <key>'" in refused.json()["detail"]
    assert admitted.json() == {"by": "alice"}


async def test_require_scopes_uses_the_middlewares_error_responder(
    manager: APIKeyManager,
) -> None:
    def responder(problem: Problem, request: Any) -> ErrorResponse:
        headers = [("content-type", "text/plain"), ("x-code", problem.code), ("x-code", "2")]
        return ErrorResponse(problem.status, headers, problem.code.encode())

    reader = manager.generate_key(user_id="reader", permissions=["read"])
    async with make_client(guarded_app(manager, error_responder=responder)) as client:
        refused = await client.post("/items", headers={"X-API-Key": reader})
    assert (refused.status_code, refused.text) == (403, "insufficient_scope")
    assert refused.headers.get_list("x-code") == ["insufficient_scope", "2"]
    assert refused.headers["content-length"] == str(len("insufficient_scope"))


def test_require_scopes_refuses_websocket_handshakes(manager: APIKeyManager) -> None:
    reader = manager.generate_key(user_id="reader", permissions=["read"])
    writer = manager.generate_key(user_id="writer", permissions=["write"])
    with TestClient(guarded_app(manager)) as client:
        with (
            pytest.raises(WebSocketDenialResponse) as exc_info,
            client.websocket_connect("/ws", headers={"X-API-Key": reader}),
        ):
            pass  # pragma: no cover - the handshake is refused
        with client.websocket_connect("/ws", headers={"X-API-Key": writer}) as websocket:
            assert websocket.receive_json() == {"user": "writer"}
    denial = exc_info.value
    assert (denial.status_code, denial.json()["code"]) == (403, "insufficient_scope")


async def test_require_scopes_closes_websockets_with_1008_without_the_extension(
    manager: APIKeyManager,
) -> None:
    reader = manager.generate_key(user_id="reader", permissions=["read"])
    refused = await websocket_handshake(guarded_app(manager), {"X-API-Key": reader})
    assert refused == [{"type": "websocket.close", "code": 1008, "reason": "insufficient_scope"}]


async def test_require_scopes_behind_the_backend_finds_its_realm(manager: APIKeyManager) -> None:
    app = Starlette(
        routes=[Route("/items", create_item, methods=["POST"])],
        middleware=[
            Middleware(AuthenticationMiddleware, backend=APIKeyBackend(manager, realm="shop"))
        ],
    )
    reader = manager.generate_key(user_id="reader", permissions=["read"])
    async with make_client(app) as client:
        anonymous = await client.post("/items")
        refused = await client.post("/items", headers={"X-API-Key": reader})
    assert anonymous.headers["www-authenticate"] == 'Bearer realm="shop"'
    assert (refused.status_code, refused.json()["code"]) == (403, "insufficient_scope")


async def test_require_scopes_without_keyguard_in_the_stack_uses_the_defaults() -> None:
    app = Starlette(routes=[Route("/items", create_item, methods=["POST"])])
    async with make_client(app) as client:
        refused = await client.post("/items")
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == 'Bearer realm="api"'
    assert refused.json()["detail"] == (
        "This API needs an API key: send it as 'Authorization: Bearer <key>'"
        " or 'X-API-Key: <key>'."
    )


@pytest.mark.parametrize("where", ["mounted sub-app", "middleware outside the app"])
async def test_require_scopes_finds_the_middleware_that_saw_the_request(
    manager: APIKeyManager, where: str
) -> None:
    # The middleware hands its guard on in the scope, so where it sits does not matter.
    inner = Starlette(routes=[Route("/items", create_item, methods=["POST"])])
    if where == "mounted sub-app":
        app: Any = Starlette(
            routes=[Mount("/v1", app=inner)],
            middleware=[Middleware(APIKeyMiddleware, manager=manager, realm="shop")],
        )
        path = "/v1/items"
    else:
        app, path = APIKeyMiddleware(inner, manager=manager, realm="shop"), "/items"
    reader = manager.generate_key(user_id="reader", permissions=["read"])
    async with make_client(app) as client:
        refused = await client.post(path, headers={"X-API-Key": reader})
    assert (refused.status_code, refused.json()["code"]) == (403, "insufficient_scope")
    assert refused.headers["www-authenticate"].startswith('Bearer realm="shop"')


async def test_require_scopes_needs_a_request_argument() -> None:
    @require_scopes()
    async def no_request() -> Response:
        raise AssertionError("not reached")  # pragma: no cover

    with pytest.raises(TypeError, match="no_request got no Request"):
        await no_request()


@pytest.mark.parametrize("scope", ["has space", "", 3])
def test_require_scopes_checks_its_scopes(scope: Any) -> None:
    with pytest.raises(ValueError, match="invalid scope"):
        require_scopes(scope)
