"""Fuzzed credentials against both middlewares and the pipeline: never a 5xx, never an
escaped exception, never a key echoed, and only the one valid key admitted.

The normal run tries a modest number of examples; ``make fuzz`` runs the same properties
with many more (``HYPOTHESIS_PROFILE=fuzz``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from keyguard import APIKeyManager, KeyInfo
from keyguard.asgi import APIKeyMiddleware as ASGIMiddleware
from keyguard.asgi import Message, Scope
from keyguard.pipeline import Pipeline
from keyguard.problems import Problem
from keyguard.wsgi import APIKeyMiddleware as WSGIMiddleware

MANAGER = APIKeyManager()
VALID = MANAGER.generate_key(user_id="alice", permissions=["read"])
REVOKED = MANAGER.generate_key(user_id="bob", permissions=["read"])
MANAGER.revoke_key(REVOKED)
SECRETS = (VALID.encode(), REVOKED.encode())

# Pieces that credential parsers trip over, glued in any order.
PIECES = st.sampled_from(
    [
        b"Bearer ",
        b"bearer ",
        b"BEARER",
        b"Basic ",
        b" ",
        b"  ",
        b",",
        b", ",
        b"\t",
        b"\x00",
        b"\r",
        b"\n",
        b"\xc3\xa9",
        b"\xff",
        b'"',
        b"\x1b[2J",
        b"sk_",
        b"0" * 32,
        VALID.encode(),
        REVOKED.encode(),
        VALID.upper().encode(),
        VALID[:-1].encode(),
    ]
)
VALUES = st.lists(st.one_of(PIECES, st.binary(max_size=8)), max_size=6).map(b"".join)
NAMES = st.sampled_from([b"authorization", b"x-api-key", b"x-other", b"cookie"])
HEADERS = st.lists(st.tuples(NAMES, VALUES), max_size=4)


def _asgi(headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes, list[Any]]:
    seen: list[Any] = []

    async def app(scope: Scope, receive: Any, send: Any) -> None:
        seen.append(scope.get("keyguard.key"))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sent: list[dict[str, Any]] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        sent.append(dict(message))

    scope = {"type": "http", "method": "GET", "path": "/x", "headers": headers, "client": None}
    asyncio.run(ASGIMiddleware(app, manager=MANAGER)(scope, receive, send))
    start = sent[0]
    raw = b"".join(v for _, v in start["headers"]) + b"".join(m.get("body", b"") for m in sent)
    return start["status"], raw, seen


def _wsgi(headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes, list[Any]]:
    seen: list[Any] = []

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        seen.append(environ.get("keyguard.key"))
        start_response("200 OK", [])
        return [b"ok"]

    environ: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/x"}
    for name, value in headers:
        env = "HTTP_" + name.decode().upper().replace("-", "_")
        text = value.decode("latin-1")
        environ[env] = f"{environ[env]},{text}" if env in environ else text
    started: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started.append((status, headers))
        return lambda data: None

    body = b"".join(WSGIMiddleware(app, manager=MANAGER)(environ, start_response))
    status, response_headers = started[0]
    raw = "".join(v for _, v in response_headers).encode("latin-1") + body
    return int(status.split()[0]), raw, seen


def _check(status: int, raw: bytes, seen: list[Any], headers: list[tuple[bytes, bytes]]) -> None:
    assert status in (200, 400, 401), status
    for secret in SECRETS:
        assert secret not in raw
    if status == 200:
        [key] = seen
        assert isinstance(key, KeyInfo) and key.user_id == "alice"
        assert any(VALID.encode() in value for _, value in headers)
    else:
        assert seen == []
        assert json.loads(raw[raw.index(b"{") :])["status"] == status


@given(HEADERS)
def test_asgi_answers_any_credential_headers_cleanly(headers: list[tuple[bytes, bytes]]) -> None:
    _check(*_asgi(headers), headers)


@given(HEADERS)
def test_wsgi_answers_any_credential_headers_cleanly(headers: list[tuple[bytes, bytes]]) -> None:
    _check(*_wsgi(headers), headers)


@given(HEADERS)
def test_asgi_and_wsgi_answer_alike(headers: list[tuple[bytes, bytes]]) -> None:
    # WSGI servers join repeated headers with commas; give ASGI the same joined values.
    joined: dict[bytes, bytes] = {}
    for name, value in headers:
        joined[name] = joined[name] + b"," + value if name in joined else value
    assert _asgi(list(joined.items()))[0] == _wsgi(headers)[0]


@given(st.lists(st.tuples(st.booleans(), st.text(max_size=60)), max_size=4))
def test_read_returns_a_token_from_the_input_or_a_problem(values: list[tuple[bool, str]]) -> None:
    found = Pipeline().read(values)
    assert found is None or isinstance(found, (str, Problem))
    if isinstance(found, str):
        assert found and any(found in value for _, value in values)
