"""The credential header cases both middlewares must answer alike, and the keys they use.

Header values are bytes with placeholders (``<read>``, ``<write>``, ``<unknown>``,
``<revoked>``, ``<expired>``) that :meth:`Keyring.fill` replaces with real keys, so one
table drives the ASGI and WSGI suites, raw and through an HTTP client, and the framework
integrations (Starlette's backend, FastAPI's dependency) through :func:`request_asgi`;
:func:`tests.helpers.assert_answer` judges every one of their answers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, cast

import pytest

from keyguard import APIKeyManager

START = 1_700_000_000.0


@dataclass
class Keyring:
    """A memory-store manager on a settable clock, with one key in each state."""

    manager: APIKeyManager
    now: list[float]
    read: str
    write: str
    unknown: str
    revoked: str
    expired: str

    @classmethod
    def build(cls) -> Keyring:
        now = [START]
        manager = APIKeyManager(clock=lambda: now[0])
        read = manager.generate_key(user_id="alice", permissions=["read"])
        write = manager.generate_key(user_id="bob", permissions=["read", "write"])
        revoked = manager.generate_key(user_id="carol", permissions=["read"])
        manager.revoke_key(revoked)
        expired = manager.generate_key(
            user_id="dave", permissions=["read"], expires_in=timedelta(minutes=5)
        )
        now[0] += 3600
        unknown = manager.format.generate()
        return cls(manager, now, read, write, unknown, revoked, expired)

    @property
    def secrets(self) -> list[bytes]:
        """Every key, as bytes, to check that no response ever echoes one."""
        keys = (self.read, self.write, self.unknown, self.revoked, self.expired)
        return [k.encode() for k in keys]

    def fill(self, value: bytes) -> bytes:
        for name in ("read", "write", "unknown", "revoked", "expired"):
            value = value.replace(f"<{name}>".encode(), getattr(self, name).encode())
        return value


@dataclass(frozen=True)
class Case:
    """Request headers and the answer: a status, the problem ``code``, the user let in.

    ``via_client`` is False for inputs an HTTP client would refuse or normalise (repeated
    headers, bytes that are not visible ASCII, padding); those run at the raw ASGI/WSGI level.
    """

    headers: tuple[tuple[str, bytes], ...]
    status: int
    code: str | None = None
    user: str | None = None
    via_client: bool = True


def ok(*headers: tuple[str, bytes], user: str = "alice", via_client: bool = True) -> Case:
    return Case(headers, 200, None, user, via_client)


def refused(status: int, code: str, *headers: tuple[str, bytes], via_client: bool = True) -> Case:
    return Case(headers, status, code, None, via_client)


AUTH = "authorization"
XKEY = "x-api-key"

CASES = [
    pytest.param(refused(401, "missing_api_key"), id="no credential"),
    pytest.param(ok((AUTH, b"Bearer <read>")), id="bearer"),
    pytest.param(ok((AUTH, b"bearer <read>")), id="bearer lower-case scheme"),
    pytest.param(ok((AUTH, b"BEARER <read>")), id="bearer upper-case scheme"),
    pytest.param(ok((AUTH, b"BeArEr <read>")), id="bearer mixed-case scheme"),
    pytest.param(ok((AUTH, b"Bearer   <read>")), id="bearer with several spaces"),
    pytest.param(ok((XKEY, b"<read>")), id="x-api-key"),
    pytest.param(ok((XKEY, b"<write>"), user="bob"), id="x-api-key of another user"),
    pytest.param(ok((XKEY, b"  <read> "), via_client=False), id="x-api-key with padding"),
    pytest.param(refused(401, "missing_api_key", (AUTH, b"Basic YTpi")), id="basic scheme"),
    pytest.param(refused(401, "missing_api_key", (AUTH, b"<read>")), id="key without scheme"),
    pytest.param(refused(400, "invalid_request", (AUTH, b"Bearer")), id="bearer without key"),
    pytest.param(
        refused(400, "invalid_request", (AUTH, b"Bearer <read> <read>")), id="bearer two tokens"
    ),
    pytest.param(
        refused(400, "invalid_request", (AUTH, b"Bearer <read> x")), id="bearer trailing token"
    ),
    pytest.param(refused(400, "invalid_request", (XKEY, b"")), id="empty x-api-key"),
    pytest.param(refused(400, "invalid_request", (XKEY, b"<read> x")), id="x-api-key two tokens"),
    pytest.param(refused(401, "invalid_api_key", (XKEY, b"<unknown>")), id="unknown key"),
    pytest.param(
        refused(401, "invalid_api_key", (AUTH, b"Bearer <unknown>")), id="unknown bearer"
    ),
    pytest.param(refused(401, "invalid_api_key", (XKEY, b"not-a-key")), id="malformed key"),
    pytest.param(refused(401, "invalid_api_key", (XKEY, b"<read>0")), id="key with extra char"),
    pytest.param(refused(401, "invalid_api_key", (XKEY, b"pk_" + b"0" * 32)), id="wrong prefix"),
    pytest.param(refused(401, "revoked_api_key", (XKEY, b"<revoked>")), id="revoked key"),
    pytest.param(refused(401, "expired_api_key", (AUTH, b"Bearer <expired>")), id="expired key"),
    pytest.param(
        refused(400, "invalid_request", (AUTH, b"Bearer <read>"), (XKEY, b"<write>")),
        id="two headers, different keys",
    ),
    pytest.param(ok((AUTH, b"Bearer <read>"), (XKEY, b"<read>")), id="two headers, same key"),
    pytest.param(
        refused(400, "invalid_request", (XKEY, b"<read>"), (XKEY, b"<write>"), via_client=False),
        id="repeated x-api-key, different keys",
    ),
    pytest.param(
        ok((XKEY, b"<read>"), (XKEY, b"<read>"), via_client=False),
        id="repeated x-api-key, same key",
    ),
    pytest.param(
        refused(
            400,
            "invalid_request",
            (AUTH, b"Bearer <write>"),
            (AUTH, b"Bearer <read>"),
            via_client=False,
        ),
        id="repeated authorization, different keys",
    ),
    pytest.param(
        refused(400, "invalid_request", (XKEY, b"<read>, <write>")),
        id="comma-joined different keys",
    ),
    pytest.param(ok((XKEY, b"<read>,<read>")), id="comma-joined same key"),
    pytest.param(
        refused(400, "invalid_request", (AUTH, b"Bearer <read>, Bearer <write>")),
        id="comma-joined bearers, different keys",
    ),
    pytest.param(
        refused(400, "invalid_request", (AUTH, b"Bearer <read>, <write>")),
        id="bearer then a bare key",
    ),
    pytest.param(
        refused(400, "invalid_request", (AUTH, b"Bearer <read>,<write>")),
        id="bearer then a bare key, no space",
    ),
    pytest.param(
        refused(400, "invalid_request", (AUTH, b"Bearer <read>,junk")),
        id="bearer then a bare word",
    ),
    pytest.param(
        refused(400, "invalid_request", (AUTH, b"<write>, Bearer <read>")),
        id="a bare key then bearer",
    ),
    pytest.param(ok((AUTH, b"Bearer <read>, Bearer <read>")), id="comma-joined bearers, same key"),
    pytest.param(ok((AUTH, b"Basic YTpi, Bearer <read>")), id="basic and bearer joined"),
    pytest.param(
        refused(401, "missing_api_key", (AUTH, b"Basic YTpi, <read>")),
        id="basic and a bare key joined",
    ),
    pytest.param(
        refused(401, "revoked_api_key", (AUTH, b"Bearer <revoked>"), (XKEY, b"<revoked>")),
        id="same revoked key twice",
    ),
    pytest.param(refused(400, "invalid_request", (XKEY, b"k" * 9000)), id="huge x-api-key"),
    pytest.param(
        refused(400, "invalid_request", (AUTH, b"Bearer " + b"k" * 9000)), id="huge bearer"
    ),
    pytest.param(
        refused(400, "invalid_request", (XKEY, b"<read>\xff"), via_client=False),
        id="latin-1 byte",
    ),
    pytest.param(
        refused(400, "invalid_request", (XKEY, "sk_é".encode() + b"0" * 31), via_client=False),
        id="utf-8 bytes",
    ),
    pytest.param(
        refused(400, "invalid_request", (XKEY, b"<read>\x00"), via_client=False), id="NUL byte"
    ),
    pytest.param(
        refused(400, "invalid_request", (AUTH, b"Bearer <read>\x01"), via_client=False),
        id="control character",
    ),
    pytest.param(
        refused(400, "invalid_request", (AUTH, b"Bearer\t<read>"), via_client=False),
        id="tab after scheme",
    ),
    pytest.param(
        refused(400, "invalid_request", (XKEY, b"<read>\r\nX-Admin: 1"), via_client=False),
        id="CRLF injection",
    ),
    pytest.param(
        refused(400, "invalid_request", (XKEY, b"<read>\x7f"), via_client=False), id="DEL byte"
    ),
]

#: The cases an HTTP client can send unchanged.
CLIENT_CASES = [p for p in CASES if cast(Case, p.values[0]).via_client]


@dataclass
class Answer:
    """A response as the client sees it: status, headers in order and body.

    Header names are lower-cased; repeated headers stay, so a secret in any of them is seen.
    """

    status: int
    header_list: list[tuple[str, str]]
    body: bytes

    @classmethod
    def of(
        cls, status: int, headers: Iterable[tuple[bytes | str, bytes | str]], body: bytes
    ) -> Answer:
        """An answer from any transport's parts: ASGI bytes headers or WSGI str ones."""
        header_list = [(_text(name).lower(), _text(value)) for name, value in headers]
        return cls(status, header_list, body)

    @property
    def headers(self) -> dict[str, str]:
        return dict(self.header_list)


def _text(value: bytes | str) -> str:
    return value if isinstance(value, str) else bytes(value).decode("latin-1")


ASGIApp = Callable[
    [
        MutableMapping[str, Any],
        Callable[[], Awaitable[MutableMapping[str, Any]]],
        Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ],
    Awaitable[None],
]


async def request_asgi(
    app: ASGIApp, headers: list[tuple[bytes, bytes]], *, path: str = "/items"
) -> Answer:
    """Send one raw ``GET`` to ``app``: headers reach it exactly as given, repeats included."""
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"host", b"test"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("test", 80),
    }
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return Answer.of(start["status"], start["headers"], body)
