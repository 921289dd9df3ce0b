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
from starlette.middleware import Middleware
from starlette.middleware.authentication import AuthenticationMiddleware
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from keyguard import APIKeyManager, KeyInfo, MemoryStore, StoreError
from keyguard.identity import APIKeyUser as PlainAPIKeyUser
from keyguard.starlette import APIKeyBackend, APIKeyUser, on_auth_error

pytestmark = pytest.mark.anyio

UNKNOWN_KEY = "sk_" + "0" * 32


class Clock:
    """A settable clock, so expiry is tested without sleeping."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


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


async def websocket_handshake(app: Starlette, headers: dict[str, str]) -> list[dict[str, Any]]:
    """Open a WebSocket to ``/ws`` in-process and return every message the app sent."""
    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "path": "/ws",
        "raw_path": b"/ws",
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
    class BrokenStore(MemoryStore):
        def get(self, digest: str) -> KeyInfo | None:
            raise StoreError("disk on fire")

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
    assert [m["type"] for m in refused] == ["websocket.close"]


async def test_errors_of_other_backends_keep_starlette_default() -> None:
    class Refusing(AuthenticationBackend):
        async def authenticate(
            self, conn: HTTPConnection
        ) -> tuple[AuthCredentials, BaseUser] | None:
            raise AuthenticationError("nope")

    async with make_client(make_app(Refusing())) as client:
        response = await client.get("/whoami")
    assert (response.status_code, response.text) == (400, "nope")
