"""Path exemption under attack: no request without a key reaches a route that is not exempt.

Each case is one unauthenticated request to a real app (Starlette for ASGI, Flask for WSGI)
guarded with ``exempt_paths=["/health", "/api/v1/status"]`` and
``exempt_patterns=[r"/docs(/.*)?", r"/static/[\\w-]+\\.css"]``. Every route of those apps
answers its own name; the app's catch-all route (and ``/admin``) is protected, so a path
the guard wrongly lets through shows up as ``catch-all`` or ``admin`` instead of 401.
The expected answer is either ``401`` or the name of the exempt route the app runs
(``health``, ``docs``, …), or what a mount answers outside the guarded app (``404``,
a ``307``/``308`` redirect).

ASGI requests are raw scopes, so ``path``, ``raw_path`` and ``root_path`` can disagree as
a server or proxy may make them, plus URLs sent through ``httpx.ASGITransport``. WSGI
requests are raw environs (``PATH_INFO`` in its PEP 3333 form, ``SCRIPT_NAME``,
``REQUEST_URI``, ``RAW_URI``), plus URLs through Werkzeug's test client, a blueprint and
``DispatcherMiddleware`` mounts.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import flask
import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import BaseRoute, Mount, Route
from werkzeug.middleware.dispatcher import DispatcherMiddleware
from werkzeug.test import Client
from werkzeug.wrappers import Response

from keyguard import APIKeyManager
from keyguard import asgi as kg_asgi
from keyguard import wsgi as kg_wsgi

EXEMPT: dict[str, Any] = {
    "exempt_paths": ["/health", "/api/v1/status"],
    "exempt_patterns": [r"/docs(/.*)?", r"/static/[\w-]+\.css"],
}
#: What a guarded route answers: reaching one without a key is a bypass.
PROTECTED = {"admin", "catch-all", "home"}
REFUSED = "401"

LONG = 50_000


@dataclass(frozen=True)
class Req:
    """One request as the server hands it over: the decoded path and what comes with it.

    ``raw`` is the ASGI ``raw_path`` (None: left out of the scope) or, for WSGI, the
    ``REQUEST_URI`` and ``RAW_URI`` a server such as gunicorn or uWSGI sets; ``root`` is
    ``root_path`` / ``SCRIPT_NAME``; ``headers`` are sent too. A WSGI ``path`` is given
    decoded and turned into its PEP 3333 form (UTF-8 bytes as latin-1) unless ``pep3333``
    is False.
    """

    path: str
    raw: bytes | None = b""
    root: str = ""
    query: str = ""
    pep3333: bool = True
    headers: dict[str, str] = field(default_factory=dict)


def case(request: Req | str, expected: str, id: str) -> Any:
    return pytest.param(Req(request) if isinstance(request, str) else request, expected, id=id)


def check(answer: str, expected: str) -> None:
    assert answer not in PROTECTED, f"an unauthenticated request reached {answer!r}"
    assert answer == expected


def answer_of(status: int, body: bytes) -> str:
    """A route's name for its 200, else the status (401 is the guard's refusal)."""
    return body.decode() if status == 200 else str(status)


# -- ASGI ----------------------------------------------------------------------------------


def named(name: str) -> Callable[[Request], Any]:
    async def endpoint(request: Request) -> PlainTextResponse:
        return PlainTextResponse(name)

    return endpoint


def starlette_routes() -> list[BaseRoute]:
    return [
        Route("/health", named("health")),
        Route("/api/v1/status", named("status")),
        Route("/docs", named("docs")),
        Route("/docs/{rest:path}", named("docs")),
        Route("/static/{name}", named("static")),
        Route("/admin", named("admin")),
        Route("/{rest:path}", named("catch-all")),
    ]


def guarded_starlette(manager: APIKeyManager, **options: Any) -> Starlette:
    middleware = [Middleware(kg_asgi.APIKeyMiddleware, manager=manager, **(options or EXEMPT))]
    return Starlette(routes=starlette_routes(), middleware=middleware)


def mounted_starlette(manager: APIKeyManager) -> Starlette:
    """The guarded app mounted at ``/api`` of an app with no other route."""
    return Starlette(routes=[Mount("/api", app=guarded_starlette(manager))])


def guard_around_mount(manager: APIKeyManager) -> Starlette:
    """A guard on the outer app, naming the mounted app's paths in full."""
    inner = Starlette(routes=starlette_routes())
    options: dict[str, Any] = {
        "exempt_paths": ["/api/health"],
        "exempt_patterns": [r"/api/docs(/.*)?"],
    }
    middleware = [Middleware(kg_asgi.APIKeyMiddleware, manager=manager, **options)]
    return Starlette(routes=[Mount("/api", app=inner)], middleware=middleware)


def ask_asgi(app: Any, request: Req) -> str:
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": request.path,
        "root_path": request.root,
        "query_string": request.query.encode("latin-1"),
        "headers": [(b"host", b"testserver")]
        + [(n.lower().encode(), v.encode()) for n, v in request.headers.items()],
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
    }
    if request.raw is not None:
        scope["raw_path"] = request.raw or request.path.encode("utf-8")
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    [start] = [m for m in sent if m["type"] == "http.response.start"]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return answer_of(start["status"], body)


@pytest.fixture
def manager() -> APIKeyManager:
    return APIKeyManager()


ASGI_CASES = [
    # The baseline: what is exempt, and that the app's other routes are guarded.
    case("/health", "health", id="exempt path"),
    case("/api/v1/status", "status", id="exempt path with several segments"),
    case("/docs", "docs", id="pattern: the prefix itself"),
    case("/docs/guide", "docs", id="pattern: below it"),
    case("/static/site.css", "static", id="pattern: a stylesheet"),
    case("/admin", REFUSED, id="protected route"),
    case("/", REFUSED, id="the root"),
    case("/static/site.js", REFUSED, id="pattern: not a stylesheet"),
    case("/static/../admin.css", REFUSED, id="pattern: dot-dot in the name"),
    # raw_path and path disagree: the guard and the router both read the decoded path.
    case(Req("/health", raw=b"/admin"), "health", id="raw_path /admin, path /health"),
    case(Req("/admin", raw=b"/health"), REFUSED, id="raw_path /health, path /admin"),
    case(Req("/admin", raw=b"/docs/x"), REFUSED, id="raw_path under the pattern, path /admin"),
    case(Req("/docs/../admin", raw=b"/docs/%2e%2e/admin"), REFUSED, id="raw_path encodes .."),
    case(Req("/admin", raw=None), REFUSED, id="no raw_path"),
    case(Req("/health", raw=None), "health", id="no raw_path, exempt path"),
    # Percent-encoding, as the server decodes it once.
    case("/docs/../admin", REFUSED, id="%2e%2e decoded to dot-dot"),
    case("/docs/..\\admin", REFUSED, id="%5c decoded to a backslash"),
    case("/docs\\..\\admin", REFUSED, id="%5c..%5c decoded"),
    case("/health/", REFUSED, id="%2f decoded to a trailing slash"),
    case(Req("/health", raw=b"/%68ealth"), "health", id="an encoded letter of the exempt path"),
    # ... and double encoding, which a server or proxy that decodes twice turns into `..`.
    case("/docs/%2e%2e/admin", REFUSED, id="double-encoded %252e%252e"),
    case("/docs/%2E%2e/admin", REFUSED, id="double-encoded, mixed case"),
    case("/docs/..%2fadmin", REFUSED, id="double-encoded slash after dot-dot"),
    case("/docs/%2e%2e%2fadmin", REFUSED, id="double-encoded dot-dot-slash"),
    case("/docs/..%5cadmin", REFUSED, id="double-encoded backslash"),
    case("/docs/%252e%252e/admin", REFUSED, id="triple-encoded dot-dot"),
    case("/%68ealth", REFUSED, id="double-encoded letter of the exempt path"),
    case("/health%00", REFUSED, id="double-encoded NUL"),
    case("/docs/a%2fb", "docs", id="double-encoded slash in a name stays exempt"),
    case("/docs/100%25", "docs", id="a literal percent stays exempt"),
    case("/docs/%25252525", REFUSED, id="still encoded after three more decodings"),
    # Dot segments, Tomcat path parameters and backslashes.
    case("/docs/./admin", REFUSED, id="dot segment"),
    case("/docs/..", REFUSED, id="trailing dot-dot"),
    case("/docs/x/../../admin", REFUSED, id="two levels up"),
    case("/docs/..;/admin", REFUSED, id="dot-dot with an empty parameter"),
    case("/docs/..;jsessionid=1/admin", REFUSED, id="dot-dot with a named parameter"),
    case("/docs/.;x/admin", REFUSED, id="dot with a parameter"),
    case("/health/../admin", REFUSED, id="exempt path then dot-dot"),
    case("/admin/../health", REFUSED, id="dot-dot back to the exempt path"),
    case("/docs/.../admin", "docs", id="three dots are a name"),
    case("/docs/.well-known", "docs", id="a dot-file is a name"),
    # Slashes and case.
    case("/Health", REFUSED, id="other case"),
    case("/HEALTH", REFUSED, id="upper case"),
    case("/DOCS/x", REFUSED, id="pattern in upper case"),
    case("//health", REFUSED, id="leading double slash"),
    case("/health//", REFUSED, id="trailing double slash"),
    case("/api//v1/status", REFUSED, id="double slash inside"),
    case("//docs/x", REFUSED, id="double slash before the pattern"),
    case("/docs//x", REFUSED, id="double slash inside the pattern"),
    case("/health;", REFUSED, id="empty path parameter"),
    case("/health;x=1", REFUSED, id="path parameter"),
    case("/health.", REFUSED, id="trailing dot"),
    case("/health ", REFUSED, id="trailing space"),
    # Control characters: Starlette's `^/health$` matches "/health\n".
    case("/health\x00", REFUSED, id="trailing NUL"),
    case("/health\n", REFUSED, id="trailing LF"),
    case("/health\r", REFUSED, id="trailing CR"),
    case("/health\t", REFUSED, id="trailing tab"),
    case("/docs/x\n", REFUSED, id="LF under the pattern"),
    case("/docs/.\t./admin", REFUSED, id="tab inside dot-dot (WHATWG parsers drop it)"),
    case("/docs/..\x00/admin", REFUSED, id="NUL after dot-dot"),
    case("/docs/\x7f", REFUSED, id="DEL under the pattern"),
    # Unicode look-alikes and compatibility forms.
    case("/\u04bbealth", REFUSED, id="Cyrillic shha for h"),
    case("/h\u0435alth", REFUSED, id="Cyrillic ie for e"),
    case("/\uff48\uff45\uff41\uff4c\uff54\uff48", REFUSED, id="fullwidth letters"),
    case("/health\u200b", REFUSED, id="zero-width space"),
    case("/docs\u2215..\u2215admin", REFUSED, id="division slashes"),
    case("/docs/\uff0e\uff0e/admin", REFUSED, id="fullwidth full stops"),
    case("/docs/\u2024\u2024/admin", REFUSED, id="one-dot leaders"),
    case("/docs/..\uff3cadmin", REFUSED, id="fullwidth backslash"),
    case("/docs/caf\u00e9", "docs", id="non-ASCII name stays exempt"),
    # Query and fragment tricks: only the path decides.
    case(Req("/health", query="x=/admin"), "health", id="query names a protected path"),
    case(Req("/admin", query="/health"), REFUSED, id="query names the exempt path"),
    case(Req("/admin", query="next=/docs/x"), REFUSED, id="query names the pattern"),
    case("/health?x=/admin", REFUSED, id="encoded ? in the path"),
    case("/health#", REFUSED, id="encoded # in the path"),
    case("/admin#/health", REFUSED, id="encoded # then the exempt path"),
    case("/docs/x#/../../admin", REFUSED, id="encoded # then dot-dots"),
    # root_path: removed from path only on a segment boundary, as Starlette's router does.
    case(Req("/api/health", root="/api"), "health", id="root_path in path"),
    case(Req("/health", root="/api"), "health", id="root_path not in path"),
    case(Req("/apihealth", root="/api"), REFUSED, id="root_path not on a segment boundary"),
    case(Req("/api/health", root="/ap"), REFUSED, id="root_path a prefix of a segment"),
    case(Req("/api/health", root="/api/"), REFUSED, id="root_path with a trailing slash"),
    case(Req("/api/health", root="/API"), REFUSED, id="root_path in another case"),
    case(Req("/api", root="/api"), REFUSED, id="the mount point itself"),
    case(Req("/api/health/", root="/api"), REFUSED, id="root_path, trailing slash"),
    case(Req("/api//health", root="/api"), REFUSED, id="root_path then a double slash"),
    case(Req("/api/docs/../admin", root="/api"), REFUSED, id="root_path then dot-dot"),
    case(Req("/health", root="/health"), REFUSED, id="root_path is the exempt path"),
    case(Req("/health/admin", root="/health"), REFUSED, id="root_path is the exempt path, below"),
    case(Req("/docs/admin", root="/docs"), REFUSED, id="root_path matches the pattern"),
    case(Req("/api/v1/status", root="/api/v1"), REFUSED, id="root_path inside the exempt path"),
    case(Req("//health", root="/"), "health", id="root_path / then /health"),
    # Very long paths: answered, and quickly.
    case("/docs/" + "a/" * LONG + "../admin", REFUSED, id="long path with dot-dot"),
    case("/docs/" + "x" * LONG, "docs", id="long name under the pattern"),
    case("/health" + "/" * LONG, REFUSED, id="exempt path then many slashes"),
    case("/" + "a" * LONG, REFUSED, id="long protected path"),
    case("/docs/" + "%2e" * LONG, "docs", id="long run of encoded dots"),
    case("/docs/%" + "25" * LONG, REFUSED, id="long run of encoded percents"),
]


@pytest.mark.parametrize(("request_", "expected"), ASGI_CASES)
def test_asgi_raw_scope(manager: APIKeyManager, request_: Req, expected: str) -> None:
    check(ask_asgi(guarded_starlette(manager), request_), expected)


MOUNT_CASES = [
    case("/api/health", "health", id="mounted: exempt path"),
    case("/api/docs/x", "docs", id="mounted: pattern"),
    case("/api/admin", REFUSED, id="mounted: protected route"),
    case("/api/", REFUSED, id="mounted: its root"),
    case("/api/docs/../admin", REFUSED, id="mounted: dot-dot"),
    case("/api/docs/..;/admin", REFUSED, id="mounted: dot-dot with a parameter"),
    case("/api//health", REFUSED, id="mounted: double slash"),
    case("/api/Health", REFUSED, id="mounted: other case"),
    case("/api/health\n", REFUSED, id="mounted: trailing LF"),
    case("/api/api/v1/status", "status", id="mounted: exempt path below the mount"),
    case("/api/v1/status", REFUSED, id="mounted: the exempt path as a full path"),
    case("/health", "404", id="outside the mount"),
    case("/apihealth", "404", id="outside the mount, no boundary"),
    case("/api", "307", id="the mount point redirects to its slash"),
]


@pytest.mark.parametrize(("request_", "expected"), MOUNT_CASES)
def test_asgi_under_a_starlette_mount(
    manager: APIKeyManager, request_: Req, expected: str
) -> None:
    check(ask_asgi(mounted_starlette(manager), request_), expected)


OUTER_GUARD_CASES = [
    case("/api/health", "health", id="outer guard: exempt path"),
    case("/api/docs/x", "docs", id="outer guard: pattern"),
    case("/api/admin", REFUSED, id="outer guard: protected route"),
    case("/api//health", REFUSED, id="outer guard: double slash the mount passes on"),
    case("/api/./health", REFUSED, id="outer guard: dot segment"),
    case("/health", REFUSED, id="outer guard: the inner path alone"),
]


@pytest.mark.parametrize(("request_", "expected"), OUTER_GUARD_CASES)
def test_asgi_guard_around_a_mount(manager: APIKeyManager, request_: Req, expected: str) -> None:
    check(ask_asgi(guard_around_mount(manager), request_), expected)


HTTP_CASES = [
    pytest.param("/health", "health", id="url: exempt path"),
    pytest.param("/%68ealth", "health", id="url: an encoded letter"),
    pytest.param("/docs/%2e%2e/admin", REFUSED, id="url: %2e%2e"),
    pytest.param("/docs/..%2fadmin", REFUSED, id="url: ..%2f"),
    pytest.param("/docs/..%5cadmin", REFUSED, id="url: ..%5c"),
    pytest.param("/docs/%252e%252e/admin", REFUSED, id="url: %252e%252e"),
    pytest.param("/docs/..%3b/admin", REFUSED, id="url: ..%3b"),
    pytest.param("/health%2f", REFUSED, id="url: %2f at the end"),
    pytest.param("/health%00", REFUSED, id="url: %00"),
    pytest.param("/health%0a", REFUSED, id="url: %0a"),
    pytest.param("/health?x=/admin", "health", id="url: query names a protected path"),
    pytest.param("/admin?x=/health", REFUSED, id="url: query names the exempt path"),
    pytest.param("/health#/admin", "health", id="url: fragment is not sent"),
    pytest.param("/admin#/health", REFUSED, id="url: fragment names the exempt path"),
]


@pytest.mark.parametrize(("url", "expected"), HTTP_CASES)
def test_asgi_through_httpx(manager: APIKeyManager, url: str, expected: str) -> None:
    async def get() -> httpx.Response:
        transport = httpx.ASGITransport(app=guarded_starlette(manager))
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
            return await c.get(url)

    response = asyncio.run(get())
    check(answer_of(response.status_code, response.content), expected)


def test_asgi_apps_answer_their_protected_routes_with_a_key(manager: APIKeyManager) -> None:
    # The 401s above come from the guard, not from apps that cannot reach their routes.
    key = manager.generate_key(user_id="u1")
    for app, path in [
        (guarded_starlette(manager), "/admin"),
        (mounted_starlette(manager), "/api/admin"),
        (guard_around_mount(manager), "/api/admin"),
    ]:
        assert ask_asgi(app, Req(path, headers={"X-API-Key": key})) == "admin"


# -- WSGI ----------------------------------------------------------------------------------


def flask_app(url_prefix: str = "") -> flask.Flask:
    """The same routes as the Starlette app, in a blueprint at ``url_prefix``."""
    app = flask.Flask(__name__, static_folder=None)  # no built-in public /static route
    bp = flask.Blueprint("routes", __name__, url_prefix=url_prefix or None)
    for rule, name in [
        ("/health", "health"),
        ("/api/v1/status", "status"),
        ("/docs", "docs"),
        ("/docs/<path:rest>", "docs"),
        ("/static/<file>", "static"),
        ("/admin", "admin"),
        ("/", "home"),
        ("/<path:rest>", "catch-all"),
    ]:
        bp.add_url_rule(rule, f"{name}{rule}", lambda name=name, **_: name)
    app.register_blueprint(bp)
    return app


def guarded_flask(manager: APIKeyManager, url_prefix: str = "", **options: Any) -> flask.Flask:
    app = flask_app(url_prefix)
    app.wsgi_app = kg_wsgi.APIKeyMiddleware(  # type: ignore[method-assign]
        app.wsgi_app, manager=manager, **(options or EXEMPT)
    )
    return app


def not_found(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    return Response("", status=404)(environ, start_response)


def ask_wsgi(app: Any, request: Req) -> str:
    path = request.path.encode("utf-8").decode("latin-1") if request.pep3333 else request.path
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "SCRIPT_NAME": request.root,
        "PATH_INFO": path,
        "QUERY_STRING": request.query,
        "SERVER_NAME": "testserver",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "REMOTE_ADDR": "127.0.0.1",
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": None,
        "wsgi.errors": None,
        "wsgi.multithread": False,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in request.headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    if request.raw:
        environ["REQUEST_URI"] = environ["RAW_URI"] = request.raw.decode("latin-1")
    started: list[str] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started.append(status)
        return lambda data: None

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        getattr(result, "close", lambda: None)()
    return answer_of(int(started[-1].split()[0]), body)


WSGI_CASES = [
    case("/health", "health", id="exempt path"),
    case("/docs/guide", "docs", id="pattern"),
    case("/static/site.css", "static", id="pattern: a stylesheet"),
    case("/admin", REFUSED, id="protected route"),
    case("/", REFUSED, id="the root"),
    case("", REFUSED, id="empty PATH_INFO"),
    # REQUEST_URI / RAW_URI disagree with PATH_INFO: the guard and the router read PATH_INFO.
    case(Req("/health", raw=b"/admin"), "health", id="REQUEST_URI /admin, PATH_INFO /health"),
    case(Req("/admin", raw=b"/health"), REFUSED, id="REQUEST_URI /health, PATH_INFO /admin"),
    case(Req("/admin", raw=b"/docs/x"), REFUSED, id="REQUEST_URI under the pattern"),
    case(Req("/docs/../admin", raw=b"/docs/%2e%2e/admin"), REFUSED, id="REQUEST_URI %2e%2e"),
    case(Req("/health", raw=b"/%68ealth"), "health", id="REQUEST_URI with an encoded letter"),
    # Decoded and double-encoded forms.
    case("/docs/../admin", REFUSED, id="dot-dot"),
    case("/docs/..;/admin", REFUSED, id="dot-dot with a parameter"),
    case("/docs/.;x/admin", REFUSED, id="dot with a parameter"),
    case("/docs/..\\admin", REFUSED, id="backslash"),
    case("/docs/%2e%2e/admin", REFUSED, id="double-encoded dot-dot"),
    case("/docs/..%2fadmin", REFUSED, id="double-encoded slash"),
    case("/docs/..%5cadmin", REFUSED, id="double-encoded backslash"),
    case("/docs/a%2fb", "docs", id="double-encoded slash in a name stays exempt"),
    case("/health/../admin", REFUSED, id="exempt path then dot-dot"),
    # Slashes and case: Werkzeug strips leading slashes and merges doubles when routing.
    case("health", REFUSED, id="no leading slash"),
    case("//health", REFUSED, id="leading double slash"),
    case("/health/", REFUSED, id="trailing slash"),
    case("/Health", REFUSED, id="other case"),
    case("/api//v1/status", REFUSED, id="double slash inside"),
    case("/docs//x", REFUSED, id="double slash under the pattern (Werkzeug: catch-all)"),
    # Control characters and Unicode.
    case("/health\x00", REFUSED, id="trailing NUL"),
    case("/health\n", REFUSED, id="trailing LF"),
    case("/docs/.\t./admin", REFUSED, id="tab inside dot-dot"),
    case("/h\u0435alth", REFUSED, id="Cyrillic ie, PEP 3333 form"),
    case(Req("/h\u0435alth", pep3333=False), REFUSED, id="Cyrillic ie, not transcoded"),
    case("/docs/\uff0e\uff0e/admin", REFUSED, id="fullwidth full stops"),
    case(Req("/docs/\xff", pep3333=False), REFUSED, id="not UTF-8"),
    case("/docs/caf\u00e9", "docs", id="non-ASCII name stays exempt"),
    # Query and fragment.
    case(Req("/health", query="x=/admin"), "health", id="query names a protected path"),
    case(Req("/admin", query="/health"), REFUSED, id="query names the exempt path"),
    case("/health?x", REFUSED, id="encoded ? in PATH_INFO"),
    case("/health#", REFUSED, id="encoded # in PATH_INFO"),
    # SCRIPT_NAME: PATH_INFO is already relative to the mount point.
    case(Req("/health", root="/api"), "health", id="SCRIPT_NAME /api"),
    case(Req("/admin", root="/health"), REFUSED, id="SCRIPT_NAME is the exempt path"),
    case(Req("", root="/health"), REFUSED, id="SCRIPT_NAME is the exempt path, no PATH_INFO"),
    case(Req("/admin", root="/docs"), REFUSED, id="SCRIPT_NAME matches the pattern"),
    case(Req("/status", root="/api/v1"), REFUSED, id="SCRIPT_NAME inside the exempt path"),
    case(Req("/api/health", root=""), REFUSED, id="full path, no SCRIPT_NAME"),
    case(Req("health", root="/api/"), REFUSED, id="SCRIPT_NAME with the slash"),
    case(Req("/health", root="/docs/.."), "health", id="SCRIPT_NAME with dot-dot"),
    case(Req("/admin", headers={"X-Original-URL": "/health"}), REFUSED, id="X-Original-URL"),
    case(Req("/admin", headers={"X-Rewrite-URL": "/health"}), REFUSED, id="X-Rewrite-URL"),
    # Very long paths.
    case("/docs/" + "a/" * LONG + "../admin", REFUSED, id="long path with dot-dot"),
    case("/docs/" + "x" * LONG, "docs", id="long name under the pattern"),
    case("/" + "a" * LONG, REFUSED, id="long protected path"),
]


@pytest.mark.parametrize(("request_", "expected"), WSGI_CASES)
def test_wsgi_raw_environ(manager: APIKeyManager, request_: Req, expected: str) -> None:
    check(ask_wsgi(guarded_flask(manager), request_), expected)


def dispatcher(manager: APIKeyManager) -> DispatcherMiddleware:
    """The guarded Flask app mounted at ``/api`` by Werkzeug's dispatcher."""
    return DispatcherMiddleware(not_found, {"/api": guarded_flask(manager).wsgi_app})


def guard_around_dispatcher(manager: APIKeyManager) -> kg_wsgi.APIKeyMiddleware:
    options: dict[str, Any] = {
        "exempt_paths": ["/api/health"],
        "exempt_patterns": [r"/api/docs(/.*)?"],
    }
    mounted = DispatcherMiddleware(not_found, {"/api": flask_app().wsgi_app})
    return kg_wsgi.APIKeyMiddleware(mounted, manager=manager, **options)


MOUNTED_WSGI_CASES = [
    pytest.param(dispatcher, "/api/health", "health", id="dispatcher: exempt path"),
    pytest.param(dispatcher, "/api/docs/x", "docs", id="dispatcher: pattern"),
    pytest.param(dispatcher, "/api/admin", REFUSED, id="dispatcher: protected route"),
    pytest.param(dispatcher, "/api/docs/../admin", REFUSED, id="dispatcher: dot-dot"),
    pytest.param(dispatcher, "/api/../health", REFUSED, id="dispatcher: dot-dot after mount"),
    pytest.param(dispatcher, "/api//health", REFUSED, id="dispatcher: double slash"),
    pytest.param(dispatcher, "/api/Health", REFUSED, id="dispatcher: other case"),
    pytest.param(dispatcher, "/health", "404", id="dispatcher: outside the mount"),
    pytest.param(dispatcher, "/apihealth", "404", id="dispatcher: no boundary"),
    pytest.param(guard_around_dispatcher, "/api/health", "health", id="outer guard: exempt"),
    pytest.param(guard_around_dispatcher, "/api/docs/x", "docs", id="outer guard: pattern"),
    pytest.param(guard_around_dispatcher, "/api/admin", REFUSED, id="outer guard: protected"),
    pytest.param(guard_around_dispatcher, "/api//health", REFUSED, id="outer guard: //"),
    pytest.param(guard_around_dispatcher, "/api/./health", REFUSED, id="outer guard: dot"),
]


@pytest.mark.parametrize(("build", "path", "expected"), MOUNTED_WSGI_CASES)
def test_wsgi_under_a_dispatcher(
    manager: APIKeyManager, build: Callable[[APIKeyManager], Any], path: str, expected: str
) -> None:
    check(ask_wsgi(build(manager), Req(path)), expected)


CLIENT_URLS = [
    pytest.param("/health", "health", id="url: exempt path"),
    pytest.param("/%68ealth", "health", id="url: an encoded letter"),
    pytest.param("/docs/%2e%2e/admin", REFUSED, id="url: %2e%2e"),
    pytest.param("/docs/..%2fadmin", REFUSED, id="url: ..%2f"),
    pytest.param("/docs/..%5cadmin", REFUSED, id="url: ..%5c"),
    pytest.param("/docs/%252e%252e/admin", REFUSED, id="url: %252e%252e"),
    pytest.param("/health%00", REFUSED, id="url: %00"),
    pytest.param("/health?x=/admin", "health", id="url: query names a protected path"),
    pytest.param("/admin?x=/health", REFUSED, id="url: query names the exempt path"),
    pytest.param("/admin#/health", REFUSED, id="url: fragment names the exempt path"),
    pytest.param("/v2/health", "health", id="blueprint: exempt path"),
    pytest.param("/v2/admin", REFUSED, id="blueprint: protected route"),
    pytest.param("/V2/health", REFUSED, id="blueprint: other case"),
    pytest.param("/v2/docs/%2e%2e/admin", REFUSED, id="blueprint: %2e%2e"),
]


@pytest.mark.parametrize(("url", "expected"), CLIENT_URLS)
def test_wsgi_through_werkzeug_client(manager: APIKeyManager, url: str, expected: str) -> None:
    prefixed = url.startswith(("/v2/", "/V2/"))
    options = (
        {"exempt_paths": ["/v2/health"], "exempt_patterns": [r"/v2/docs(/.*)?"]}
        if prefixed
        else EXEMPT
    )
    app = guarded_flask(manager, "/v2" if prefixed else "", **options)
    response = Client(app).get(url)
    check(answer_of(response.status_code, response.data), expected)


def test_wsgi_apps_answer_their_protected_routes_with_a_key(manager: APIKeyManager) -> None:
    key = manager.generate_key(user_id="u1")
    for app, path in [
        (guarded_flask(manager), "/admin"),
        (dispatcher(manager), "/api/admin"),
        (guard_around_dispatcher(manager), "/api/admin"),
    ]:
        assert ask_wsgi(app, Req(path, headers={"X-API-Key": key})) == "admin"


def test_long_paths_are_answered_quickly(manager: APIKeyManager) -> None:
    # Linear work per request: a bound a loaded machine meets many times over.
    path = "/docs/" + "%2e%2e%2e/" * 100_000 + "x"
    started = time.monotonic()
    assert ask_asgi(guarded_starlette(manager), Req(path)) == "docs"
    assert ask_wsgi(guarded_flask(manager), Req(path)) == "docs"
    assert time.monotonic() - started < 10


def test_the_security_page_publishes_this_many_cases() -> None:
    asgi = [ASGI_CASES, MOUNT_CASES, OUTER_GUARD_CASES, HTTP_CASES]
    wsgi = [WSGI_CASES, MOUNTED_WSGI_CASES, CLIENT_URLS]
    counts = [sum(len(table) for table in tables) for tables in (asgi, wsgi)]
    page = (Path(__file__).parents[1] / "docs" / "security.md").read_text()
    assert (
        f"{sum(counts)} path-bypass cases, each with its id ({counts[0]} ASGI, {counts[1]} WSGI)"
        in page
    )
