"""The pure WSGI middleware: the same credential rules and refusals as the ASGI one."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import flask
import pytest
from werkzeug.test import Client

from keyguard import KeyInfo
from keyguard.wsgi import APIKeyMiddleware, ErrorResponse, Problem
from tests.credential_cases import CASES, CLIENT_CASES, Answer, Case, Keyring
from tests.helpers import BrokenStore, assert_answer


@pytest.fixture
def keys() -> Keyring:
    return Keyring.build()


class Recorder:
    """The guarded app: remembers each environ it is called with and answers 200."""

    def __init__(self) -> None:
        self.environs: list[dict[str, Any]] = []

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        self.environs.append(environ)
        start_response("200 OK", [("content-type", "application/json")])
        return [json.dumps({"user": environ.get("REMOTE_USER")}).encode()]


class Reply:
    """What the middleware answered to one raw WSGI request."""

    def __init__(self, status_line: str, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status_line = status_line
        self.status = int(status_line.split()[0])
        self.header_list = headers
        self.headers = {n.lower(): v for n, v in headers}
        self.body = body

    def problem(self) -> dict[str, Any]:
        assert self.headers["content-type"] == "application/problem+json"
        data: dict[str, Any] = json.loads(self.body)
        return data


def make_environ(
    headers: Iterable[tuple[str, bytes]] = (),
    *,
    path: str = "/items",
    method: str = "GET",
    query: str = "",
    script_name: str = "",
) -> dict[str, Any]:
    """A WSGI environ; repeated headers are joined with commas, as gunicorn does."""
    environ: dict[str, Any] = {
        "REQUEST_METHOD": method,
        "SCRIPT_NAME": script_name,
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SERVER_NAME": "127.0.0.1",
        "SERVER_PORT": "8000",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
    }
    for name, value in headers:
        env_name = "HTTP_" + name.upper().replace("-", "_")
        text = value.decode("latin-1")
        environ[env_name] = f"{environ[env_name]},{text}" if env_name in environ else text
    return environ


def run(app: Any, environ: dict[str, Any]) -> Reply:
    started: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started.append((status, headers))
        return lambda data: None

    body = b"".join(app(environ, start_response))
    [(status, headers)] = started
    return Reply(status, headers, body)


def guard(keys: Keyring, **options: Any) -> tuple[APIKeyMiddleware, Recorder]:
    inner = Recorder()
    return APIKeyMiddleware(inner, manager=keys.manager, **options), inner


# -- the credential table ------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_credential_cases_raw(keys: Keyring, case: Case) -> None:
    app, inner = guard(keys)
    headers = [(name, keys.fill(value)) for name, value in case.headers]
    reply = run(app, make_environ(headers))
    answer = Answer.of(reply.status, reply.header_list, reply.body)
    assert_answer(keys, case, answer, reached=inner.environs)


@pytest.mark.parametrize("case", CLIENT_CASES)
def test_credential_cases_through_werkzeug(keys: Keyring, case: Case) -> None:
    app, inner = guard(keys)
    headers = [(name, keys.fill(value).decode("latin-1")) for name, value in case.headers]
    response = Client(app).get("/items", headers=headers)
    answer = Answer.of(response.status_code, response.headers.items(), response.get_data())
    assert_answer(keys, case, answer, reached=inner.environs)


# -- what the app sees ---------------------------------------------------------------------


def test_success_sets_keyguard_key_and_remote_user(keys: Keyring) -> None:
    app, inner = guard(keys)
    run(app, make_environ([("authorization", b"Bearer " + keys.write.encode())]))
    [environ] = inner.environs
    info = environ["keyguard.key"]
    assert isinstance(info, KeyInfo)
    assert info.scopes == ("read", "write")
    assert environ["REMOTE_USER"] == "bob"
    assert environ["HTTP_AUTHORIZATION"] == "Bearer " + keys.write


def test_repr_names_app_and_manager(keys: Keyring) -> None:
    app, _ = guard(keys)
    assert repr(app).startswith("APIKeyMiddleware(app=<tests.test_wsgi.Recorder object")


def test_optional_mode_lets_keyless_requests_in(keys: Keyring) -> None:
    app, inner = guard(keys, optional=True)
    assert run(app, make_environ()).status == 200
    [environ] = inner.environs
    assert environ["keyguard.key"] is None
    assert "REMOTE_USER" not in environ
    reply = run(app, make_environ([("x-api-key", keys.unknown.encode())]))
    assert reply.problem()["code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("key", "status"),
    [pytest.param("read", 403, id="without the scope"), pytest.param("write", 200, id="with it")],
)
def test_required_scopes(keys: Keyring, key: str, status: int) -> None:
    app, inner = guard(keys, required_scopes=["write"])
    reply = run(app, make_environ([("x-api-key", getattr(keys, key).encode())]))
    assert reply.status == status
    if status == 403:
        assert reply.status_line == "403 Forbidden"
        assert reply.problem()["code"] == "insufficient_scope"
        assert 'scope="write"' in reply.headers["www-authenticate"]
        assert inner.environs == []


# -- exempt paths, patterns, preflight -----------------------------------------------------


@pytest.mark.parametrize(
    ("path", "script_name", "exempt"),
    [
        pytest.param("/health", "", True, id="exact"),
        pytest.param("/healthz-admin", "", False, id="longer name"),
        pytest.param("/health/", "", False, id="trailing slash"),
        pytest.param("/health/../admin", "", False, id="dot-dot after"),
        pytest.param("/Health", "", False, id="other case"),
        pytest.param("/health/..", "", False, id="decoded %2F.."),
        pytest.param("/health", "/api", True, id="mounted: PATH_INFO is relative"),
        pytest.param("/api/health", "", False, id="not mounted: full path differs"),
        pytest.param("/sant\xc3\xa9", "", True, id="non-ASCII path, PEP 3333 form"),
        pytest.param("/santé", "", False, id="non-ASCII path, not transcoded"),
    ],
)
def test_exempt_paths_match_exactly(
    keys: Keyring, path: str, script_name: str, exempt: bool
) -> None:
    app, inner = guard(keys, exempt_paths=["/health", "/santé"])
    reply = run(app, make_environ(path=path, script_name=script_name))
    assert reply.status == (200 if exempt else 401)
    assert len(inner.environs) == (1 if exempt else 0)
    if exempt:
        assert inner.environs[0]["keyguard.key"] is None


@pytest.mark.parametrize(
    ("path", "exempt"),
    [
        pytest.param("/docs", True, id="the prefix itself"),
        pytest.param("/docs/openapi.json", True, id="below it"),
        pytest.param("/docsx", False, id="longer name"),
        pytest.param("/docs/../admin", False, id="dot-dot segment"),
        pytest.param("/docs/caf\xc3\xa9", True, id="non-ASCII below it"),
        pytest.param("/docs/\xff", False, id="not UTF-8"),
    ],
)
def test_exempt_patterns_fullmatch(keys: Keyring, path: str, exempt: bool) -> None:
    app, _ = guard(keys, exempt_patterns=[r"/docs(/\w+(\.json)?)?"])
    assert run(app, make_environ(path=path)).status == (200 if exempt else 401)


@pytest.mark.parametrize(
    "path",
    [
        pytest.param("/docs/../admin", id="dot-dot"),
        pytest.param("/docs/..;/admin", id="dot-dot with a path parameter"),
        pytest.param("/docs/..\\admin", id="backslash"),
    ],
)
def test_exempt_patterns_never_exempt_a_path_a_proxy_may_collapse(
    keys: Keyring, path: str
) -> None:
    app, _ = guard(keys, exempt_patterns=[r"/docs/.*"])
    assert run(app, make_environ(path="/docs/index.html")).status == 200
    assert run(app, make_environ(path=path)).status == 401


PREFLIGHT = [("origin", b"https://a.example"), ("access-control-request-method", b"PUT")]


@pytest.mark.parametrize(
    ("method", "headers", "options", "status"),
    [
        pytest.param("OPTIONS", PREFLIGHT, {}, 401, id="preflight, pass-through off by default"),
        pytest.param(
            "OPTIONS", PREFLIGHT, {"allow_cors_preflight": True}, 200, id="preflight, enabled"
        ),
        pytest.param(
            "OPTIONS", PREFLIGHT[:1], {"allow_cors_preflight": True}, 401, id="without ACRM"
        ),
        pytest.param(
            "DELETE", PREFLIGHT, {"allow_cors_preflight": True}, 401, id="enabled, not options"
        ),
    ],
)
def test_cors_preflight(
    keys: Keyring,
    method: str,
    headers: list[tuple[str, bytes]],
    options: dict[str, Any],
    status: int,
) -> None:
    app, inner = guard(keys, **options)
    assert run(app, make_environ(headers, method=method)).status == status
    assert len(inner.environs) == (1 if status == 200 else 0)


# -- strip_credentials, query_param --------------------------------------------------------


def test_strip_credentials(keys: Keyring) -> None:
    app, inner = guard(keys, strip_credentials=True)
    headers = [("x-api-key", keys.read.encode()), ("accept", b"*/*")]
    run(app, make_environ(headers))
    [environ] = inner.environs
    assert "HTTP_X_API_KEY" not in environ
    assert environ["HTTP_ACCEPT"] == "*/*"
    assert environ["REMOTE_USER"] == "alice"


def test_strip_credentials_keeps_other_authorization_schemes(keys: Keyring) -> None:
    app, inner = guard(keys, strip_credentials=True, optional=True)
    run(app, make_environ([("authorization", b"Basic YTpi")]))
    assert inner.environs[0]["HTTP_AUTHORIZATION"] == "Basic YTpi"


def test_query_param_reads_warns_and_strips(keys: Keyring) -> None:
    with pytest.warns(UserWarning, match="query parameter") as record:
        app, inner = guard(keys, query_param="key", strip_credentials=True)
    assert record[0].filename == __file__
    query = f"a=1&key={keys.read}"
    environ = make_environ(query=query)
    environ["REQUEST_URI"] = environ["RAW_URI"] = f"/items?{query}"
    assert run(app, environ).status == 200
    [seen] = inner.environs
    assert seen["QUERY_STRING"] == "a=1"
    assert seen["REQUEST_URI"] == seen["RAW_URI"] == "/items?a=1"
    assert all(keys.read not in str(v) for v in seen.values())


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        pytest.param("key=<read>", 200, None, id="key in query"),
        pytest.param("", 401, "missing_api_key", id="absent"),
        pytest.param("key=<read>&key=<write>", 400, "invalid_request", id="two keys"),
        pytest.param("key=<expired>", 401, "expired_api_key", id="expired key"),
    ],
)
def test_query_param_cases(keys: Keyring, query: str, status: int, code: str | None) -> None:
    with pytest.warns(UserWarning):
        app, _ = guard(keys, query_param="key")
    reply = run(app, make_environ(query=keys.fill(query.encode()).decode()))
    assert reply.status == status
    if code is not None:
        assert reply.problem()["code"] == code
        assert all(s not in reply.body for s in keys.secrets)


# -- failures ------------------------------------------------------------------------------


def test_store_error_is_a_503(keys: Keyring) -> None:
    inner = Recorder()
    app = APIKeyMiddleware(inner, manager=type(keys.manager)(BrokenStore()))
    for value in (keys.read, f" {keys.read}"):  # the fast path and the exact one
        reply = run(app, make_environ([("x-api-key", value.encode())]))
        assert reply.status_line == "503 Service Unavailable"
        assert reply.problem()["code"] == "store_unavailable"
    assert inner.environs == []


def test_error_responder_gets_the_environ(keys: Keyring) -> None:
    seen: list[tuple[Problem, Mapping[str, Any]]] = []

    def responder(problem: Problem, request: Mapping[str, Any]) -> ErrorResponse | None:
        seen.append((problem, request))
        if problem.status == 400:
            return None
        return ErrorResponse(499, [("content-type", "text/plain")], problem.code.encode())

    app, inner = guard(keys, error_responder=responder)
    reply = run(app, make_environ(path="/secret"))
    assert (reply.status_line, reply.body) == ("499 Error", b"missing_api_key")
    assert seen[0][1]["PATH_INFO"] == "/secret"
    reply = run(app, make_environ([("x-api-key", b"")]))
    assert (reply.status_line, reply.problem()["code"]) == ("400 Bad Request", "invalid_request")
    custom = run(app, make_environ([("x-api-key", keys.revoked.encode())]))
    assert (custom.status_line, custom.body) == ("499 Error", b"revoked_api_key")
    assert inner.environs == []


def _raise_with_the_request(problem: Problem, request: Mapping[str, Any]) -> Any:
    raise RuntimeError(f"cannot render {problem.code} for {request['HTTP_AUTHORIZATION']!r}")


@pytest.mark.parametrize(
    ("responder", "logged"),
    [
        pytest.param(lambda p, r: (99, [], b""), "status", id="status below 100"),
        pytest.param(lambda p, r: (401, [("x-a", "€")], b""), "latin-1", id="non-latin-1"),
        pytest.param(lambda p, r: (401, [], "no"), "bytes", id="str body"),
        pytest.param(_raise_with_the_request, "RuntimeError: cannot render", id="raises"),
    ],
)
def test_broken_error_responder_sends_the_default_refusal(
    keys: Keyring, caplog: pytest.LogCaptureFixture, responder: Any, logged: str
) -> None:
    app, inner = guard(keys, error_responder=responder)
    value = f"Bearer {keys.expired}"
    reply = run(app, make_environ([("authorization", value.encode())]))
    assert (reply.status_line, reply.problem()["code"]) == ("401 Unauthorized", "expired_api_key")
    [record] = caplog.records
    assert record.levelname == "ERROR"
    assert logged in record.getMessage()
    assert keys.expired not in record.getMessage()
    assert inner.environs == []


# -- a real Flask app ----------------------------------------------------------------------


def flask_app(keys: Keyring) -> flask.Flask:
    app = flask.Flask(__name__)

    @app.get("/whoami")
    def whoami() -> dict[str, Any]:
        info = flask.request.environ["keyguard.key"]
        return {"user": flask.request.remote_user, "scopes": list(info.scopes)}

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"ok": True}

    app.wsgi_app = APIKeyMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, manager=keys.manager, exempt_paths=["/health"]
    )
    return app


def test_flask_wsgi_app_mount(keys: Keyring) -> None:
    client = flask_app(keys).test_client()
    assert client.get("/whoami", headers={"X-API-Key": keys.write}).get_json() == {
        "user": "bob",
        "scopes": ["read", "write"],
    }
    assert client.get("/health").status_code == 200
    refused = client.get("/whoami", headers={"Authorization": f"Bearer {keys.revoked}"})
    assert refused.status_code == 401
    assert refused.get_json()["code"] == "revoked_api_key"
    assert refused.headers["WWW-Authenticate"] == 'Bearer realm="api", error="invalid_token"'
