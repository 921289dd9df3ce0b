"""A manager subclass that overrides verify or validate_key is obeyed by every fast path."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from typing import Any

import httpx
import pytest
from werkzeug.test import Client

from keyguard import APIKeyManager, CachedStore, KeyStore, MemoryStore, Reason, Verification
from keyguard.asgi import APIKeyMiddleware as ASGIMiddleware
from keyguard.asgi import Receive, Scope, Send
from keyguard.wsgi import APIKeyMiddleware as WSGIMiddleware


class RevokingManager(APIKeyManager):
    """A subclass whose verify/averify refuse every key: the override must still decide."""

    def verify(self, key: object) -> Verification:
        result = super().verify(key)
        return Verification(False, Reason.REVOKED, result.key) if result.ok else result

    async def averify(self, key: object) -> Verification:
        return self.verify(key)


class CountingManager(APIKeyManager):
    """A subclass overriding validate_key: the override is what validate_key calls."""

    calls = 0

    def validate_key(self, key: object) -> bool:
        type(self).calls += 1
        return super().validate_key(key)


async def ok_app(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def ok_wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [])
    return [b"ok"]


def asgi_get(manager: APIKeyManager, headers: dict[str, str]) -> httpx.Response:
    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=ASGIMiddleware(ok_app, manager=manager))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/", headers=headers)

    return asyncio.run(get())


def cached_memory() -> KeyStore:
    return CachedStore(MemoryStore())


@pytest.mark.parametrize(
    "store",
    [pytest.param(MemoryStore, id="sync store"), pytest.param(cached_memory, id="async twin")],
)
@pytest.mark.parametrize(
    ("header", "scheme"),
    [
        pytest.param("X-API-Key", "", id="raw header"),
        pytest.param("Authorization", "Bearer ", id="bearer"),
    ],
)
def test_asgi_asks_an_overridden_verify(
    store: Callable[[], KeyStore], header: str, scheme: str
) -> None:
    manager = RevokingManager(store())
    key = manager.generate_key(user_id="u1")

    response = asgi_get(manager, {header: scheme + key})

    assert response.status_code == 401
    assert response.json()["code"] == "revoked_api_key"


def test_wsgi_asks_an_overridden_verify() -> None:
    manager = RevokingManager()
    key = manager.generate_key(user_id="u1")

    response = Client(WSGIMiddleware(ok_wsgi, manager=manager)).get(
        "/", headers={"X-API-Key": key}
    )

    assert response.status_code == 401
    assert json.loads(response.data)["code"] == "revoked_api_key"


def test_validate_key_asks_an_overridden_verify() -> None:
    manager = RevokingManager()
    key = manager.generate_key(user_id="u1")

    assert manager.validate_key(key) is False


def test_an_overridden_validate_key_is_called() -> None:
    manager = CountingManager()
    key = manager.generate_key(user_id="u1")

    assert manager.validate_key(key) is True
    assert manager.validate_key(key.upper()) is False
    assert CountingManager.calls == 2


def test_checksum_keys_take_the_asgi_fast_path() -> None:
    manager = APIKeyManager(checksum=True)
    key = manager.generate_key(user_id="u1")
    mistyped = key[:-1] + ("0" if key[-1] != "0" else "1")

    assert asgi_get(manager, {"X-API-Key": key}).status_code == 200
    assert asgi_get(manager, {"X-API-Key": mistyped}).status_code == 401


@pytest.mark.parametrize(
    "store",
    [pytest.param(MemoryStore, id="sync store"), pytest.param(cached_memory, id="async twin")],
)
@pytest.mark.parametrize("checksum", [False, True], ids=["plain keys", "checksum keys"])
@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "BeArEr"])
def test_every_spelling_of_bearer_is_judged_alike(
    store: Callable[[], KeyStore], checksum: bool, scheme: str
) -> None:
    # "Bearer"/"bearer" take the fast path, other spellings the exact reader: same answers.
    manager = APIKeyManager(store(), checksum=checksum)
    key = manager.generate_key(user_id="u1")
    revoked = manager.generate_key(user_id="u1")
    manager.revoke_key(revoked)
    mistyped = key[:-1] + ("0" if key[-1] != "0" else "1")

    assert asgi_get(manager, {"Authorization": f"{scheme} {key}"}).status_code == 200
    refused = asgi_get(manager, {"Authorization": f"{scheme} {revoked}"})
    assert (refused.status_code, refused.json()["code"]) == (401, "revoked_api_key")
    wrong = asgi_get(manager, {"Authorization": f"{scheme} {mistyped}"})
    assert (wrong.status_code, wrong.json()["code"]) == (401, "invalid_api_key")
    other = asgi_get(manager, {"Authorization": f"Basic {key}"})
    assert (other.status_code, other.json()["code"]) == (401, "missing_api_key")
