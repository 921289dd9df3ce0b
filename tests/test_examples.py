"""The examples in examples/, imported in-process on a fresh SQLite store."""

from __future__ import annotations

import importlib.util
import re
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from flask import Flask
from starlette.testclient import TestClient, WebSocketDenialResponse

from keyguard import APIKeyManager

pytestmark = pytest.mark.anyio

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = ["starlette_app", "fastapi_app", "flask_app"]
KEY_RE = re.compile(r"sk_[0-9a-f]{32}")


@pytest.fixture
def store_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    url = f"sqlite:///{tmp_path / 'keyguard.db'}"
    monkeypatch.setenv("KEYGUARD_STORE", url)
    return url


def load_example(filename: str) -> Iterator[ModuleType]:
    """Import an example afresh (so it opens the test's store); close its store afterwards."""
    name = f"keyguard_example_{filename}"
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{filename}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves the module's annotations by name
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[name]
        if isinstance(getattr(module, "manager", None), APIKeyManager):
            module.manager.close()


@pytest.fixture(params=NAMES)
def example(request: pytest.FixtureRequest, store_url: str) -> Iterator[ModuleType]:
    yield from load_example(request.param)


@pytest.fixture
def fastapi_example(store_url: str) -> Iterator[ModuleType]:
    yield from load_example("fastapi_app")


@pytest.fixture
def issuer(store_url: str) -> Iterator[APIKeyManager]:
    """Another manager on the same file, as the CLI would be."""
    manager = APIKeyManager.from_url(store_url)
    yield manager
    manager.close()


async def call(
    example: ModuleType, method: str, path: str, key: str | None = None
) -> httpx.Response:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    if isinstance(example.app, Flask):
        transport = httpx.WSGITransport(app=example.app)
        with httpx.Client(transport=transport, base_url="http://test") as client:
            return client.request(method, path, headers=headers)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=example.app), base_url="http://test"
    ) as client:
        return await client.request(method, path, headers=headers)


async def test_health_is_public(example: ModuleType) -> None:
    response = await call(example, "GET", "/health")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})


async def test_whoami_needs_a_key_and_echoes_its_owner(
    example: ModuleType, issuer: APIKeyManager
) -> None:
    refused = await call(example, "GET", "/whoami")
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"] == 'Bearer realm="api"'
    key = issuer.generate_key(user_id="alice", permissions=["read"])
    response = await call(example, "GET", "/whoami", key)
    assert (response.status_code, response.json()) == (
        200,
        {"user_id": "alice", "scopes": ["read"]},
    )


async def test_creating_items_needs_the_write_scope(
    example: ModuleType, issuer: APIKeyManager
) -> None:
    reader = issuer.generate_key(user_id="reader", permissions=["read"])
    writer = issuer.generate_key(user_id="writer", permissions=["read", "write"])
    assert (await call(example, "POST", "/items")).status_code == 401
    refused = await call(example, "POST", "/items", reader)
    assert refused.status_code == 403
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["code"] == "insufficient_scope"
    assert refused.headers["www-authenticate"] == (
        'Bearer realm="api", error="insufficient_scope", scope="write"'
    )
    created = await call(example, "POST", "/items", writer)
    assert (created.status_code, created.json()) == (201, {"created": True, "by": "writer"})


async def test_revoked_key_is_refused_on_the_next_request(
    example: ModuleType, issuer: APIKeyManager
) -> None:
    key = issuer.generate_key(user_id="alice")
    assert (await call(example, "GET", "/whoami", key)).status_code == 200
    assert issuer.revoke_key(key)
    refused = await call(example, "GET", "/whoami", key)
    assert (refused.status_code, refused.json()["code"]) == (401, "revoked_api_key")


async def test_every_demo_run_prints_a_fresh_working_key_and_the_cli_command(
    example: ModuleType, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = []
    for _ in range(2):  # the second run finds keys in the store and still prints a key
        example.print_demo_key("http://127.0.0.1:8000")
        out = capsys.readouterr().out
        [key] = set(KEY_RE.findall(out))
        curl = next(line for line in out.splitlines() if line.startswith("Try: curl"))
        assert f'-H "Authorization: Bearer {key}" http://127.0.0.1:8000/whoami' in curl
        cli = next(line for line in out.splitlines() if line.startswith("Manage keys"))
        assert cli.endswith("keyguard list")
        keys.append(key)

    assert keys[0] != keys[1]
    for key in keys:
        response = await call(example, "GET", "/whoami", key)
        assert response.json() == {"user_id": "demo", "scopes": ["read", "write"]}
    [info, _] = example.manager.list_keys("demo")
    assert info.expires_at - info.created_at == timedelta(days=1)


async def test_fastapi_example_documents_the_key_for_swagger(fastapi_example: ModuleType) -> None:
    document = (await call(fastapi_example, "GET", "/openapi.json")).json()
    assert set(document["components"]["securitySchemes"]) == {"APIKeyBearer", "APIKeyHeader"}
    either: list[dict[str, list[str]]] = [{"APIKeyBearer": []}, {"APIKeyHeader": []}]
    assert document["paths"]["/whoami"]["get"]["security"] == either
    assert document["paths"]["/items"]["post"]["security"] == either
    assert "security" not in document["paths"]["/health"]["get"]
    assert set(document["paths"]["/items"]["post"]["responses"]) >= {"401", "403"}
    docs = await call(fastapi_example, "GET", "/docs")
    assert (docs.status_code, "swagger-ui" in docs.text) == (200, True)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
async def test_fastapi_example_serves_its_docs_pages_without_a_cdn(
    fastapi_example: ModuleType, page: str
) -> None:
    page = (await call(fastapi_example, "GET", page)).text
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert assets, page
    for asset in assets:
        assert asset.startswith("/"), f"{asset} is not served by the app"
        response = await call(fastapi_example, "GET", asset)
        assert response.status_code == 200, asset


@pytest.fixture
def starlette_example(store_url: str) -> Iterator[ModuleType]:
    yield from load_example("starlette_app")


def test_starlette_example_websocket_needs_a_key(
    starlette_example: ModuleType, issuer: APIKeyManager
) -> None:
    key = issuer.generate_key(user_id="alice")
    with TestClient(starlette_example.app) as client:
        with pytest.raises(WebSocketDenialResponse) as exc_info, client.websocket_connect("/ws"):
            pass  # pragma: no cover - the handshake is refused
        with client.websocket_connect("/ws", headers={"X-API-Key": key}) as websocket:
            assert websocket.receive_json() == {"user_id": "alice"}
            websocket.send_text("hello")
            assert websocket.receive_text() == "hello"
    assert exc_info.value.status_code == 401
