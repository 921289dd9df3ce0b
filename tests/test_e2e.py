"""End to end: the examples under real servers on 127.0.0.1, keys managed by other processes.

The Starlette example runs under uvicorn and the Flask one under gunicorn (two workers);
keys are created and revoked by separate Python processes sharing the SQLite file, as the
CLI would, and each server must see the change on its next request. WebSocket handshakes
go to the Starlette example through uvicorn's default WebSocket implementation.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 30.0
CURL_RE = re.compile(r'curl -H "Authorization: Bearer (sk_[0-9a-f]{32})" (http://\S+)')

# Run in a separate interpreter: issue a key (printing it) or revoke one (printing True/False).
KEY_SCRIPT = """
import sys
from keyguard import APIKeyManager
manager = APIKeyManager.from_url()
if sys.argv[1] == "create":
    print(manager.generate_key(user_id=sys.argv[2], permissions=sys.argv[3:]))
else:
    print(manager.revoke_key(sys.stdin.read().strip()))
"""


@dataclass
class Server:
    """A server process started by a test, with its base URL and combined output."""

    name: str
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log: IO[bytes]

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """Stop the server and everything it forked (its own process group); always waits."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=15)
        self.log.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def server_env(store_url: str, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGUARD_")}
    return {**env, "KEYGUARD_STORE": store_url, "PYTHONUNBUFFERED": "1", **extra}


def wait_until(ready: Callable[[], bool], server: Server, what: str) -> None:
    """Poll ``ready`` until it holds, failing with the server's output if it dies or stalls."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not ready():
        if server.process.poll() is not None:
            pytest.fail(f"{server.name} exited before {what}:\n{server.output()}")
        if time.monotonic() > deadline:
            pytest.fail(f"{server.name}: no {what} in {STARTUP_TIMEOUT}s:\n{server.output()}")
        time.sleep(0.1)


def answers_health(base_url: str) -> bool:
    try:
        return httpx.get(f"{base_url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def start(name: str, argv: list[str], env: dict[str, str], log_path: Path, port: int) -> Server:
    """Start ``argv`` in its own process group and wait until ``/health`` answers."""
    log = log_path.open("wb")
    process = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    server = Server(name, f"http://127.0.0.1:{port}", process, log_path, log)
    try:
        wait_until(lambda: answers_health(server.base_url), server, "answer on /health")
    except BaseException:
        server.stop()
        raise
    return server


def run_key_script(store_url: str, *args: str, stdin: str = "") -> str:
    done = subprocess.run(
        [sys.executable, "-c", KEY_SCRIPT, *args],
        input=stdin,
        env=server_env(store_url),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return done.stdout.strip()


def server_command(name: str, port: int) -> list[str]:
    if name == "starlette under uvicorn":
        return [
            *(sys.executable, "-m", "uvicorn", "examples.starlette_app:app"),
            *("--host", "127.0.0.1", "--port", str(port)),
        ]
    return [
        *(sys.executable, "-m", "gunicorn", "examples.flask_app:app"),
        *("--bind", f"127.0.0.1:{port}", "--workers", "2"),
    ]


def run_example(
    name: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, str]]:
    directory = tmp_path_factory.mktemp("e2e")
    store_url = f"sqlite:///{directory / 'keyguard.db'}"
    port = free_port()
    running = start(
        name, server_command(name, port), server_env(store_url), directory / "server.log", port
    )
    yield running, store_url
    running.stop()


@pytest.fixture(scope="module")
def starlette_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    """The Starlette example under uvicorn (its default ``--ws auto``) and its store URL."""
    yield from run_example("starlette under uvicorn", tmp_path_factory)


@pytest.fixture(
    scope="module", params=["starlette under uvicorn", "flask under gunicorn"], ids=str
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Server, str]]:
    """A running example server and the URL of its SQLite store."""
    if request.param == "starlette under uvicorn":
        yield request.getfixturevalue("starlette_server")
        return
    yield from run_example(request.param, tmp_path_factory)


def test_health_is_public_and_other_routes_need_a_key(server: tuple[Server, str]) -> None:
    running, _ = server
    assert httpx.get(f"{running.base_url}/health").json() == {"status": "ok"}
    refused = httpx.get(f"{running.base_url}/whoami")
    assert refused.status_code == 401
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["www-authenticate"] == 'Bearer realm="api"'
    assert refused.json()["code"] == "missing_api_key"


def test_keys_created_and_revoked_by_another_process(server: tuple[Server, str]) -> None:
    running, store_url = server
    reader = run_key_script(store_url, "create", "alice", "read")
    writer = run_key_script(store_url, "create", "bob", "read", "write")
    with httpx.Client(base_url=running.base_url) as client:
        as_reader = {"Authorization": f"Bearer {reader}"}
        whoami = client.get("/whoami", headers=as_reader)
        assert (whoami.status_code, whoami.json()) == (
            200,
            {"user_id": "alice", "scopes": ["read"]},
        )
        assert client.post("/items", headers=as_reader).status_code == 403
        created = client.post("/items", headers={"X-API-Key": writer})
        assert (created.status_code, created.json()) == (201, {"created": True, "by": "bob"})

        assert run_key_script(store_url, "revoke", stdin=reader) == "True"
        # Several requests, so every gunicorn worker answers at least once (most likely).
        for _ in range(6):
            refused = client.get("/whoami", headers=as_reader)
            assert (refused.status_code, refused.json()["code"]) == (401, "revoked_api_key")
            assert reader not in refused.text
        assert client.get("/whoami", headers={"X-API-Key": writer}).status_code == 200


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        pytest.param({}, "missing_api_key", id="no key"),
        pytest.param({"X-API-Key": "sk_" + "0" * 32}, "invalid_api_key", id="unknown key"),
        pytest.param({"Authorization": "Bearer a, b"}, "invalid_request", id="two tokens"),
    ],
)
def test_websocket_handshake_without_a_valid_key_is_refused(
    starlette_server: tuple[Server, str], headers: dict[str, str], code: str
) -> None:
    running, _ = starlette_server
    url = running.base_url.replace("http://", "ws://") + "/ws"
    with pytest.raises(InvalidStatus) as exc_info, connect(url, additional_headers=headers):
        pass  # pragma: no cover - the handshake is refused
    response = exc_info.value.response
    assert response.status_code == (400 if code == "invalid_request" else 401)
    assert response.headers["content-type"] == "application/problem+json"
    assert response.headers["www-authenticate"].startswith('Bearer realm="api"')
    assert json.loads(bytes(response.body or b""))["code"] == code


def test_websocket_handshake_with_a_key_is_accepted(starlette_server: tuple[Server, str]) -> None:
    running, store_url = starlette_server
    key = run_key_script(store_url, "create", "wendy", "read")
    url = running.base_url.replace("http://", "ws://") + "/ws"
    with connect(url, additional_headers={"Authorization": f"Bearer {key}"}) as websocket:
        assert json.loads(websocket.recv(timeout=10)) == {"user_id": "wendy"}
        websocket.send("ping")
        assert websocket.recv(timeout=10) == "ping"
    assert run_key_script(store_url, "revoke", stdin=key) == "True"
    with (
        pytest.raises(InvalidStatus) as exc_info,
        connect(url, additional_headers={"X-API-Key": key}),
    ):
        pass  # pragma: no cover - the handshake is refused
    assert exc_info.value.response.status_code == 401
    assert key not in running.output()


def test_running_the_starlette_example_prints_a_working_curl_line(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "demo.log"
    log = log_path.open("wb")
    process = subprocess.Popen(
        [sys.executable, "examples/starlette_app.py"],
        cwd=ROOT,
        env=server_env(f"sqlite:///{tmp_path / 'keyguard.db'}", PORT=str(port)),
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    demo = Server("python examples/starlette_app.py", "", process, log_path, log)
    try:
        wait_until(lambda: CURL_RE.search(demo.output()) is not None, demo, "curl line")
        match = CURL_RE.search(demo.output())
        assert match is not None
        key, url = match.groups()
        assert url == f"http://127.0.0.1:{port}/whoami"
        wait_until(lambda: answers_health(f"http://127.0.0.1:{port}"), demo, "answer")
        response = httpx.get(url, headers={"Authorization": f"Bearer {key}"})
        assert (response.status_code, response.json()) == (
            200,
            {"user_id": "demo", "scopes": ["read", "write"]},
        )
    finally:
        demo.stop()
    # The key is printed once, by the example; the server's own log never repeats it.
    assert demo.output().count(key) == 2
