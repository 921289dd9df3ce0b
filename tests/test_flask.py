"""keyguard.flask: the KeyGuard extension, current_key() and @require_scopes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from flask import Flask, jsonify, request
from flask.testing import FlaskClient

from keyguard import APIKeyManager, KeyInfo, MemoryStore
from keyguard.flask import KeyGuard, current_key, require_scopes
from tests.helpers import BrokenStore

UNKNOWN_KEY = "sk_" + "0" * 32


def make_app(guard: KeyGuard | None) -> Flask:
    """A Flask app with a public route, one for any key and one that needs ``write``."""
    app = Flask(__name__)

    @app.get("/health")
    def health() -> Any:
        return {"status": "ok", "key": current_key() is not None}

    @app.get("/whoami")
    def whoami() -> Any:
        key = current_key()
        assert key is not None
        return {
            "user_id": key.user_id,
            "scopes": list(key.scopes),
            "remote_user": request.environ.get("REMOTE_USER"),
        }

    @app.post("/items")
    @require_scopes("write")
    def create_item() -> Any:
        key = current_key()
        assert key is not None
        return jsonify(by=key.user_id), 201

    @app.get("/health/detail")
    @require_scopes()
    def health_detail() -> Any:
        return {"detail": "for key holders"}

    if guard is not None:
        guard.init_app(app)
    return app


@pytest.fixture
def manager() -> APIKeyManager:
    return APIKeyManager(MemoryStore())


@pytest.fixture
def client(manager: APIKeyManager) -> FlaskClient:
    guard = KeyGuard(manager=manager, exempt_paths=["/health", "/health/detail"])
    return make_app(guard).test_client()


@pytest.mark.parametrize(
    "header_name, template",
    [
        pytest.param("Authorization", "Bearer {}", id="bearer token"),
        pytest.param("X-API-Key", "{}", id="x-api-key header"),
    ],
)
def test_valid_key_reaches_the_view(
    manager: APIKeyManager, client: FlaskClient, header_name: str, template: str
) -> None:
    key = manager.generate_key(user_id="alice", permissions=["read", "write"])
    headers = {header_name: template.format(key)}
    response = client.get("/whoami", headers=headers)
    assert response.json == {
        "user_id": "alice",
        "scopes": ["read", "write"],
        "remote_user": "alice",
    }
    created = client.post("/items", headers=headers)
    assert (created.status_code, created.json) == (201, {"by": "alice"})


def test_exempt_path_is_public_and_has_no_current_key(client: FlaskClient) -> None:
    response = client.get("/health")
    assert (response.status_code, response.json) == (200, {"status": "ok", "key": False})


def test_middleware_refuses_before_flask_routes(client: FlaskClient) -> None:
    response = client.get("/no-such-route")
    assert response.status_code == 401
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.json is not None and response.json["code"] == "missing_api_key"


@pytest.mark.parametrize(
    "scopes, status, code, challenge",
    [
        pytest.param(
            ["read"],
            403,
            "insufficient_scope",
            'Bearer realm="api", error="insufficient_scope", scope="write"',
            id="key without write scope",
        ),
        pytest.param(
            None, 401, "missing_api_key", 'Bearer realm="api"', id="no key on an exempt path"
        ),
    ],
)
def test_require_scopes_refusals(
    manager: APIKeyManager,
    client: FlaskClient,
    scopes: list[str] | None,
    status: int,
    code: str,
    challenge: str,
) -> None:
    if scopes is None:
        response = client.get("/health/detail")
    else:
        key = manager.generate_key(user_id="alice", permissions=scopes)
        response = client.post("/items", headers={"X-API-Key": key})
    assert response.status_code == status
    assert response.headers["Content-Type"] == "application/problem+json"
    assert response.headers["WWW-Authenticate"] == challenge
    assert response.json is not None
    assert (response.json["status"], response.json["code"]) == (status, code)


def test_require_scopes_without_arguments_needs_only_a_key(
    manager: APIKeyManager, client: FlaskClient
) -> None:
    key = manager.generate_key(user_id="alice")
    response = client.get("/health/detail", headers={"X-API-Key": key})
    assert response.json == {"detail": "for key holders"}


def test_optional_mode_lets_anonymous_in_but_views_can_still_demand_a_key(
    manager: APIKeyManager,
) -> None:
    client = make_app(KeyGuard(manager=manager, optional=True, realm="shop")).test_client()
    assert client.get("/health").json == {"status": "ok", "key": False}
    anonymous = client.post("/items")
    assert anonymous.status_code == 401
    assert anonymous.headers["WWW-Authenticate"] == 'Bearer realm="shop"'
    bad = client.post("/items", headers={"X-API-Key": UNKNOWN_KEY})
    assert bad.json is not None and bad.json["code"] == "invalid_api_key"


def test_extension_is_registered_once(manager: APIKeyManager) -> None:
    guard = KeyGuard(manager=manager)
    app = make_app(guard)
    assert app.extensions["keyguard"] is guard
    with pytest.raises(RuntimeError, match="already installed"):
        guard.init_app(app)


def test_app_factory_takes_the_store_from_config(tmp_path: Path) -> None:
    guard = KeyGuard()
    app = Flask(__name__)
    app.config["KEYGUARD_STORE"] = f"sqlite:///{tmp_path / 'keys.db'}"

    @app.get("/whoami")
    def whoami() -> Any:
        key = current_key()
        return {"user_id": key.user_id if isinstance(key, KeyInfo) else None}

    guard.init_app(app)
    writer = APIKeyManager.from_url(app.config["KEYGUARD_STORE"])
    key = writer.generate_key(user_id="alice")
    response = app.test_client().get("/whoami", headers={"X-API-Key": key})
    assert response.json == {"user_id": "alice"}
    assert guard.manager is not None
    guard.manager.store.close()
    writer.store.close()


def test_require_scopes_without_the_extension_is_a_clear_error(manager: APIKeyManager) -> None:
    app = make_app(None)
    app.testing = True
    with pytest.raises(RuntimeError, match="KeyGuard"):
        app.test_client().post("/items")


@pytest.mark.parametrize(
    "scope",
    [
        pytest.param("two words", id="space"),
        pytest.param("", id="empty"),
        pytest.param('quo"te', id="quote"),
    ],
)
def test_require_scopes_rejects_bad_scope_names(scope: str) -> None:
    with pytest.raises(ValueError, match="invalid scope"):
        require_scopes(scope)


@pytest.mark.parametrize(
    "headers, status, code",
    [
        pytest.param({"X-API-Key": UNKNOWN_KEY}, 401, "invalid_api_key", id="unknown key"),
        pytest.param({"Authorization": "Bearer"}, 400, "invalid_request", id="bearer without key"),
        pytest.param({"Authorization": "Basic dXNlcjpwYXNz"}, 401, "missing_api_key", id="basic"),
    ],
)
def test_require_scopes_checks_the_key_itself_on_exempt_paths(
    client: FlaskClient, headers: dict[str, str], status: int, code: str
) -> None:
    response = client.get("/health/detail", headers=headers)
    assert response.status_code == status
    assert response.json is not None and response.json["code"] == code


def test_store_failure_in_the_decorator_is_503() -> None:
    guard = KeyGuard(manager=APIKeyManager(BrokenStore()), exempt_paths=["/health/detail"])
    response = (
        make_app(guard).test_client().get("/health/detail", headers={"X-API-Key": UNKNOWN_KEY})
    )
    assert response.status_code == 503
    assert response.json is not None and response.json["code"] == "store_unavailable"


def test_query_param_warning_names_the_users_line(manager: APIKeyManager) -> None:
    with pytest.warns(UserWarning, match="query parameter") as direct:
        KeyGuard(Flask(__name__), manager, query_param="api_key")
    guard = KeyGuard(manager=manager, query_param="api_key")
    with pytest.warns(UserWarning, match="query parameter") as factory:
        guard.init_app(Flask(__name__))
    assert [w.filename for w in (*direct, *factory)] == [__file__, __file__]


def test_a_route_refusal_of_a_replaced_key_keeps_its_deprecation_fields(
    manager: APIKeyManager, client: FlaskClient
) -> None:
    old = manager.generate_key(user_id="u", permissions=["read"], rate_limits=["100/minute"])
    manager.rotate_key(old)

    refused = client.post("/items", headers={"Authorization": f"Bearer {old}"})

    assert refused.status_code == 403
    assert {"Deprecation", "Sunset"} <= set(refused.headers.keys())
    # Read again once the charge is given back: the whole budget is left.
    assert refused.headers["RateLimit"] == '"100/minute";r=100;t=0'
