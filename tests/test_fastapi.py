"""keyguard.fastapi: the require_api_key dependency, alone and behind the middleware."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Annotated, Any

import httpx
import pytest
from fastapi import APIRouter, Depends, FastAPI, Security
from starlette.middleware.authentication import AuthenticationMiddleware

from keyguard import APIKeyManager, KeyInfo, MemoryStore
from keyguard.asgi import APIKeyMiddleware
from keyguard.fastapi import MANAGER_STATE, install, require_api_key
from keyguard.starlette import APIKeyBackend, on_auth_error
from tests.credential_cases import CASES, Case, Keyring, request_asgi
from tests.helpers import BrokenStore, Clock, CountingStore, assert_answer

pytestmark = pytest.mark.anyio

UNKNOWN_KEY = "sk_" + "0" * 32

# Module-level aliases, the idiomatic form; these use the app-wide manager.
WriterKey = Annotated[KeyInfo, Depends(require_api_key(scopes=["write"]))]
TokenKey = Annotated[KeyInfo, Depends(require_api_key(header_names=["X-Token"]))]


def make_app(manager: APIKeyManager | None = None, *, handler: bool = True) -> FastAPI:
    """An API with a public route, a route for any key and one that needs ``write``."""
    app = FastAPI()
    if handler:
        install(app)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    # Dependencies as defaults: string annotations cannot see the local ``manager``.
    any_key = Depends(require_api_key(manager=manager))
    writer_key = Security(require_api_key(scopes=["write"], manager=manager))

    @app.get("/whoami")
    async def whoami(key: KeyInfo = any_key) -> dict[str, Any]:
        return {"user_id": key.user_id, "scopes": list(key.scopes)}

    @app.post("/items", status_code=201)
    async def create_item(key: KeyInfo = writer_key) -> dict[str, str]:
        return {"by": key.user_id}

    return app


def make_client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def manager(clock: Clock) -> APIKeyManager:
    return APIKeyManager(MemoryStore(), clock=clock)


@pytest.fixture
async def client(manager: APIKeyManager) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(make_app(manager)) as client:
        yield client


@pytest.mark.parametrize(
    "header_name, template",
    [
        pytest.param("Authorization", "Bearer {}", id="bearer token"),
        pytest.param("Authorization", "BEARER {}", id="uppercase bearer scheme"),
        pytest.param("X-API-Key", "{}", id="x-api-key header"),
    ],
)
async def test_valid_key_reaches_the_route(
    manager: APIKeyManager, client: httpx.AsyncClient, header_name: str, template: str
) -> None:
    key = manager.generate_key(user_id="alice", permissions=["read", "write"])
    headers = {header_name: template.format(key)}
    response = await client.get("/whoami", headers=headers)
    assert response.json() == {"user_id": "alice", "scopes": ["read", "write"]}
    created = await client.post("/items", headers=headers)
    assert (created.status_code, created.json()) == (201, {"by": "alice"})


async def test_public_route_needs_no_key(client: httpx.AsyncClient) -> None:
    response = await client.get("/health")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


async def test_missing_key_is_401_with_bare_challenge(client: httpx.AsyncClient) -> None:
    response = await client.get("/whoami", headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"] == 'Bearer realm="api"'
    assert response.json()["code"] == "missing_api_key"


@pytest.mark.parametrize(
    "case, status, code",
    [
        pytest.param("unknown", 401, "invalid_api_key", id="unknown key"),
        pytest.param("malformed", 401, "invalid_api_key", id="malformed key"),
        pytest.param("revoked", 401, "revoked_api_key", id="revoked key"),
        pytest.param("expired", 401, "expired_api_key", id="expired key"),
        pytest.param("two keys", 400, "invalid_request", id="two different keys"),
        pytest.param("bearer without key", 400, "invalid_request", id="bearer without key"),
        pytest.param("read only", 403, "insufficient_scope", id="key without write scope"),
    ],
)
async def test_refusals_are_problem_json(
    manager: APIKeyManager,
    client: httpx.AsyncClient,
    clock: Clock,
    case: str,
    status: int,
    code: str,
) -> None:
    key = manager.generate_key(user_id="alice", permissions=["read"], expires_in=timedelta(1))
    headers = {"Authorization": f"Bearer {key}"}
    if case == "unknown":
        headers = {"X-API-Key": UNKNOWN_KEY}
    elif case == "malformed":
        headers = {"X-API-Key": "sk_nope"}
    elif case == "revoked":
        assert manager.revoke_key(key)
    elif case == "expired":
        clock.now += 2 * 86400
    elif case == "two keys":
        headers["X-API-Key"] = manager.generate_key(user_id="bob")
    elif case == "bearer without key":
        headers = {"Authorization": "Bearer "}
    response = await client.post("/items", headers=headers)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert (body["status"], body["code"]) == (status, code)
    assert key not in response.text
    challenge = response.headers["www-authenticate"]
    assert challenge.startswith('Bearer realm="api", error=')
    if status == 403:
        assert challenge == 'Bearer realm="api", error="insufficient_scope", scope="write"'


@pytest.mark.parametrize("case", CASES)
async def test_credential_cases(case: Case) -> None:
    """The dependency reads credentials exactly as the middleware does, headers as sent."""
    keys = Keyring.build()
    app = FastAPI()
    install(app, keys.manager)

    @app.get("/items")
    async def items(key: Annotated[KeyInfo, Depends(require_api_key())]) -> dict[str, str]:
        return {"user": key.user_id}

    headers = [(name.encode(), keys.fill(value)) for name, value in case.headers]
    assert_answer(keys, case, await request_asgi(app, headers))


async def test_without_install_default_handler_still_shows_code_and_challenge(
    manager: APIKeyManager,
) -> None:
    async with make_client(make_app(manager, handler=False)) as client:
        response = await client.get("/whoami")
    assert response.status_code == 401
    assert response.json()["detail"]["code"] == "missing_api_key"
    assert response.headers["www-authenticate"] == 'Bearer realm="api"'


async def test_app_wide_manager_from_install(manager: APIKeyManager) -> None:
    app = make_app()
    install(app, manager)
    assert getattr(app.state, MANAGER_STATE) is manager
    key = manager.generate_key(user_id="alice")
    async with make_client(app) as client:
        response = await client.get("/whoami", headers={"X-API-Key": key})
    assert response.json()["user_id"] == "alice"


async def test_no_manager_anywhere_is_a_clear_configuration_error() -> None:
    async with make_client(make_app()) as client:
        with pytest.raises(RuntimeError, match=r"install\(app, manager\)"):
            await client.get("/whoami", headers={"X-API-Key": UNKNOWN_KEY})


async def test_store_failure_is_503() -> None:
    async with make_client(make_app(APIKeyManager(BrokenStore()))) as client:
        response = await client.get("/whoami", headers={"X-API-Key": UNKNOWN_KEY})
    assert (response.status_code, response.json()["code"]) == (503, "store_unavailable")


async def test_behind_middleware_the_dependency_reuses_the_checked_key() -> None:
    store = CountingStore()
    manager = APIKeyManager(store)
    app = make_app()  # the dependencies have no manager: they must not need one
    app.add_middleware(APIKeyMiddleware, manager=manager, exempt_paths=["/health"])
    reader = manager.generate_key(user_id="reader", permissions=["read"])
    writer = manager.generate_key(user_id="writer", permissions=["write"])
    async with make_client(app) as client:
        assert (await client.get("/health")).status_code == 200
        whoami = await client.get("/whoami", headers={"X-API-Key": reader})
        refused = await client.post("/items", headers={"X-API-Key": reader})
        created = await client.post("/items", headers={"X-API-Key": writer})
    assert whoami.json()["user_id"] == "reader"
    assert (refused.status_code, refused.json()["code"]) == (403, "insufficient_scope")
    assert created.status_code == 201
    assert store.calls["get"] == 3


async def test_behind_starlette_authentication_backend(manager: APIKeyManager) -> None:
    app = make_app()
    app.add_middleware(
        AuthenticationMiddleware, backend=APIKeyBackend(manager), on_error=on_auth_error
    )
    key = manager.generate_key(user_id="alice")
    async with make_client(app) as client:
        response = await client.get("/whoami", headers={"Authorization": f"Bearer {key}"})
    assert response.json()["user_id"] == "alice"


async def test_key_is_checked_once_per_request_across_dependencies() -> None:
    store = CountingStore()
    manager = APIKeyManager(store)
    app = FastAPI()
    install(app, manager)
    router = APIRouter(dependencies=[Depends(require_api_key())])

    @router.post("/items")
    async def create_item(key: WriterKey) -> str:
        return key.user_id

    app.include_router(router)
    key = manager.generate_key(user_id="alice", permissions=["write"])
    async with make_client(app) as client:
        response = await client.post("/items", headers={"X-API-Key": key})
    assert response.json() == "alice"
    assert store.calls["get"] == 1


async def test_openapi_lists_the_schemes_and_the_operations_use_them(
    client: httpx.AsyncClient,
) -> None:
    document = (await client.get("/openapi.json")).json()
    assert document["components"]["securitySchemes"] == {
        "APIKeyBearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "An API key, sent as `Authorization: Bearer <key>`.",
        },
        "APIKeyHeader": {
            "type": "apiKey",
            "in": "header",
            "name": "X-API-Key",
            "description": "An API key, sent in the `X-API-Key` header.",
        },
    }
    either: list[dict[str, list[str]]] = [{"APIKeyBearer": []}, {"APIKeyHeader": []}]
    assert document["paths"]["/whoami"]["get"]["security"] == either
    assert document["paths"]["/items"]["post"]["security"] == either
    assert "security" not in document["paths"]["/health"]["get"]
    # The dependency's own parameters are not request parameters.
    assert "parameters" not in document["paths"]["/whoami"]["get"]


async def test_openapi_documents_the_refusals_as_problem_json(
    client: httpx.AsyncClient,
) -> None:
    document = (await client.get("/openapi.json")).json()
    whoami = document["paths"]["/whoami"]["get"]["responses"]
    items = document["paths"]["/items"]["post"]["responses"]

    assert set(whoami) == {"200", "400", "401", "403", "429", "503"}
    assert set(items) == {"201", "400", "401", "403", "429", "503"}
    # No scopes required: the 403 is only a key used outside its allowed networks.
    assert whoami["403"]["description"] == "Forbidden: `ip_not_allowed`."
    assert "401" not in document["paths"]["/health"]["get"]["responses"]
    unauthorized = whoami["401"]
    assert unauthorized["description"] == (
        "Unauthorized: `expired_api_key`, `invalid_api_key`, `missing_api_key`, `revoked_api_key`."
    )
    content = unauthorized["content"]["application/problem+json"]
    assert content["schema"] == {"$ref": "#/components/schemas/Problem"}
    assert content["example"]["code"] == "missing_api_key"
    assert "WWW-Authenticate" in unauthorized["headers"]
    assert "headers" not in whoami["503"]
    limited = whoami["429"]
    assert limited["description"] == (
        "Too Many Requests: `quota_exceeded`, `rate_limited`, `too_many_failures`."
    )
    assert set(limited["headers"]) == {"Retry-After", "RateLimit-Policy", "RateLimit"}
    assert items["403"]["content"]["application/problem+json"]["example"]["code"] == (
        "insufficient_scope"
    )
    problem = document["components"]["schemas"]["Problem"]
    assert problem["required"] == ["type", "title", "status", "detail", "code"]


async def test_a_route_keeps_the_responses_it_declares(manager: APIKeyManager) -> None:
    app = FastAPI()
    install(app, manager)
    install(app, manager)  # twice is harmless

    mine = {"description": "Our own words", "content": {"application/json": {}}}

    @app.get("/whoami", responses={401: mine})
    async def whoami(key: Annotated[KeyInfo, Depends(require_api_key())]) -> str:
        return key.user_id

    async with make_client(app) as client:
        document = (await client.get("/openapi.json")).json()
        again = (await client.get("/openapi.json")).json()
    responses = document["paths"]["/whoami"]["get"]["responses"]
    assert responses["401"] == mine
    assert set(responses) == {"200", "400", "401", "403", "429", "503"}
    assert again == document


async def test_custom_header_names_become_the_schemes(manager: APIKeyManager) -> None:
    app = FastAPI()
    install(app, manager)

    @app.get("/whoami")
    async def whoami(key: TokenKey) -> str:
        return key.user_id

    key = manager.generate_key(user_id="alice")
    async with make_client(app) as client:
        document = (await client.get("/openapi.json")).json()
        accepted = await client.get("/whoami", headers={"X-Token": key})
        ignored = await client.get("/whoami", headers={"Authorization": f"Bearer {key}"})
    assert document["paths"]["/whoami"]["get"]["security"] == [{"APIKeyHeader-x-token": []}]
    assert accepted.json() == "alice"
    assert ignored.json()["code"] == "missing_api_key"


@pytest.mark.parametrize(
    "options, message",
    [
        pytest.param({"scopes": ["has space"]}, "invalid scope", id="bad scope"),
        pytest.param({"header_names": ["bad header"]}, "invalid header", id="bad header name"),
        pytest.param({"realm": 'a"b'}, "invalid realm", id="bad realm"),
    ],
)
def test_bad_configuration_fails_when_the_dependency_is_made(
    options: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        require_api_key(**options)
