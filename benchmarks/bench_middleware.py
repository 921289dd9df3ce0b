"""Per-request overhead of keyguard's ASGI and WSGI middleware over the bare app, in-process.

The ASGI callables are driven directly (a prebuilt scope, no-op ``receive``/``send``, the
coroutine stepped by hand, no event loop); WSGI ones get a prebuilt environ and a no-op
``start_response``. Each variant runs ``--number`` requests per repeat, the variants
interleaved within each repeat. A minimal hand-written middleware (header -> SHA-256 ->
dict lookup -> scope) is the baseline: each keyguard variant's overhead over the bare app
is divided by the baseline's overhead in the same repeat, and min / median / max of those
ratios are printed against the target (≤ 2x). Times are this process's CPU time, so other
load on a shared machine disturbs them less than wall time.

The keyguard rows run the middleware with its defaults, which do more than the baseline:
exactly one credential among the credential headers (``Authorization: Bearer`` and
``X-API-Key``, malformed values refused), the key's form checked before the digest, its
revocation, expiry and last use compared, the failed-check throttle asked about the
client's address, the request counted in the key's usage (``record_usage=True``; its
background flush runs in this process, so its CPU time is included), and ``user``,
``auth`` and ``keyguard.*`` set in the scope. Extra rows, marked as not the default, show
the same request with usage counting off (``APIKeyManager(record_usage=False)``), the
throttle off (``failure_limit=None``) and both; their ratios are printed for comparison
and are not held to the target.

With ``--server`` it also measures throughput under uvicorn (one worker, 127.0.0.1) with
``wrk`` as the load generator, for the bare app, the baseline and keyguard, alternating
rounds; the script starts and stops each server itself.

    python benchmarks/bench_middleware.py                  # in-process, about 15 s
    python benchmarks/bench_middleware.py --number 20000 --repeats 5   # quick
    python benchmarks/bench_middleware.py --server         # plus uvicorn + wrk, about 2 min
"""

from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from keyguard import APIKeyManager, KeyInfo
from keyguard.asgi import APIKeyMiddleware as ASGIMiddleware
from keyguard.asgi import ASGIApp, Message, Receive, Scope, Send
from keyguard.pipeline import DEFAULT_FAILURE_LIMIT
from keyguard.wsgi import APIKeyMiddleware as WSGIMiddleware

KEYS = 1_000
TARGET_RATIO = 2.0
BROWSER_HEADERS = [
    (b"host", b"api.example.com"),
    (b"user-agent", b"python-httpx/0.28.1"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip, deflate"),
    (b"connection", b"keep-alive"),
]
_START: Message = {
    "type": "http.response.start",
    "status": 200,
    "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")],
}
_BODY: Message = {"type": "http.response.body", "body": b"ok"}


async def bare_asgi(scope: Scope, receive: Receive, send: Send) -> None:
    await send(_START)
    await send(_BODY)


async def noop_receive() -> Message:
    return {"type": "http.request", "body": b"", "more_body": False}


async def noop_send(message: Message) -> None:
    return None


class MinimalASGI:
    """The baseline: find the header, SHA-256 it, look the digest up in a dict."""

    def __init__(self, app: ASGIApp, table: dict[str, str]) -> None:
        self.app = app
        self.table = table

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"x-api-key":
                    user = self.table.get(hashlib.sha256(value).hexdigest())
                    if user is not None:
                        scope["user"] = user
                        await self.app(scope, receive, send)
                        return
                    break
            await send({"type": "http.response.start", "status": 401, "headers": []})
            await send({"type": "http.response.body", "body": b""})
            return
        await self.app(scope, receive, send)


def bare_wsgi(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [])
    return [b"ok"]


def noop_start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return None


class MinimalWSGI:
    """The WSGI baseline: header -> SHA-256 -> dict lookup."""

    def __init__(self, app: Callable[..., Iterable[bytes]], table: dict[str, str]) -> None:
        self.app = app
        self.table = table

    def __call__(
        self, environ: dict[str, Any], start_response: Callable[..., Any]
    ) -> Iterable[bytes]:
        key = environ.get("HTTP_X_API_KEY")
        user = None if key is None else self.table.get(hashlib.sha256(key.encode()).hexdigest())
        if user is None:
            start_response("401 Unauthorized", [])
            return [b""]
        environ["REMOTE_USER"] = user
        return self.app(environ, start_response)


def time_asgi(app: ASGIApp, scope: Scope, number: int) -> float:
    """Seconds per request over ``number`` requests, stepping each coroutine by hand."""
    receive, send = noop_receive, noop_send
    start = time.process_time()
    for _ in range(number):
        coro = app(scope, receive, send)
        try:
            coro.send(None)  # type: ignore[attr-defined]
        except StopIteration:
            pass
        else:  # pragma: no cover - the apps here never suspend
            raise RuntimeError("the app suspended; this benchmark needs apps that do not")
    return (time.process_time() - start) / number


def time_wsgi(app: Callable[..., Iterable[bytes]], environ: dict[str, Any], number: int) -> float:
    start_response = noop_start_response
    start = time.process_time()
    for _ in range(number):
        app(environ, start_response)
    return (time.process_time() - start) / number


def sample(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """µs per request of each run in each repeat, interleaving runs so drift hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    gc.disable()
    try:
        for _ in range(repeats):
            for name, run in runs.items():
                samples[name].append(run() * 1e6)
    finally:
        gc.enable()
    return samples


#: Marks the rows that switch a default off; they are shown for comparison, not judged.
NOT_DEFAULT = "(not default)"


def report(title: str, samples: dict[str, list[float]], bare: str, baseline: str) -> int:
    """Print each variant's overhead as a ratio to the baseline's, per repeat; count misses
    among the rows that run keyguard's defaults."""
    print(f"\n{title}: overhead over the bare app, x the hand-written baseline's")
    print(f"  {'variant':<60} {'median µs':>9} {'min':>6} {'median':>7} {'max':>6}")
    missed = 0
    for name, values in samples.items():
        if name in (bare, baseline):
            print(f"  {name:<60} {statistics.median(values):>9.2f}")
            continue
        ratios = [
            (v - b) / (m - b)
            for v, b, m in zip(values, samples[bare], samples[baseline], strict=True)
        ]
        median = statistics.median(ratios)
        if name.endswith(NOT_DEFAULT):
            verdict = "for comparison"
        else:
            verdict = "met" if median <= TARGET_RATIO else "MISSED"
            verdict += f" (target ≤ {TARGET_RATIO}x)"
            missed += median > TARGET_RATIO
        print(
            f"  {name:<60} {statistics.median(values):>9.2f} {min(ratios):>6.2f}"
            f" {median:>7.2f} {max(ratios):>6.2f}  {verdict}"
        )
    return missed


# -- throughput under uvicorn --------------------------------------------------------------

VARIANT_ENV = "KEYGUARD_BENCH_VARIANT"
KEY_ENV = "KEYGUARD_BENCH_KEY"
VARIANTS = ("bare app", "baseline middleware", "keyguard middleware")


def server_app() -> ASGIApp:
    """The app a benchmark server runs (uvicorn ``--factory``), chosen by the environment."""
    variant, key = os.environ[VARIANT_ENV], os.environ[KEY_ENV]
    if variant == "bare app":
        return bare_asgi
    if variant == "baseline middleware":
        return MinimalASGI(bare_asgi, {hashlib.sha256(key.encode()).hexdigest(): "bench"})
    manager = APIKeyManager()
    manager.store.add(
        KeyInfo(
            key_id="key_bench",
            prefix="sk_",
            hint="sk_…" + key[-4:],
            user_id="bench",
            metadata={"user_id": "bench", "permissions": ["read"]},
            created_at=datetime.now(timezone.utc),
            digest=manager.digest(key),
            hash_scheme=manager.hash_scheme,
        )
    )
    return ASGIMiddleware(bare_asgi, manager=manager)


#: The baseline's row name, in both transports' tables.
BASELINE = "baseline: header -> sha256 -> dict (X-API-Key)"


def transport_runs(
    transport: str,
    bare: Any,
    minimal: Any,
    guard: Callable[[APIKeyManager, str | None], Any],
    timer: Callable[[Any, Any, int], float],
    requests: dict[str, Mapping[str, Any]],
    admitted: str,
    variants: dict[str, tuple[APIKeyManager, str | None]],
    number: int,
) -> dict[str, Callable[[], float]]:
    """The rows of one transport: the bare app, the baseline, then each variant's guarded
    app on each request (the defaults on every credential header, the other variants on
    ``X-API-Key`` only). The baseline and every guarded app are first checked to admit the
    benchmark's key (``admitted`` set in the scope or environ)."""
    raw = requests["X-API-Key"]
    runs: dict[str, Callable[[], float]] = {
        f"bare {transport} app": functools.partial(timer, bare, raw, number),
    }
    apps = [(BASELINE, minimal, "X-API-Key")]
    for suffix, (manager, failure_limit) in variants.items():
        app = guard(manager, failure_limit)
        apps += [
            (f"keyguard {transport}, {header}{suffix}", app, header)
            for header in requests
            if not suffix or header == "X-API-Key"
        ]
    for name, app, header in apps:
        request = dict(requests[header])
        timer(app, request, 1)
        if admitted not in request:
            raise SystemExit(f"{name} refused the benchmark's key")
        runs[name] = functools.partial(timer, app, request, number)
    return runs


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def start_server(variant: str, key: str) -> tuple[subprocess.Popen[bytes], int]:
    """Start uvicorn (one worker) on a free port and wait, at most 20 s, until it accepts."""
    port = free_port()
    command = [
        sys.executable, "-m", "uvicorn", "--factory", "bench_middleware:server_app",
        "--app-dir", str(Path(__file__).parent), "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--no-access-log", "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, VARIANT_ENV: variant, KEY_ENV: key}
    process = subprocess.Popen(command, env=env, start_new_session=True)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the {variant} server exited with {process.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process, port
        except OSError:
            time.sleep(0.1)
    stop_server(process)
    raise SystemExit(f"the {variant} server did not start within 20 s")


def stop_server(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


def run_wrk(port: int, key: str, seconds: int, connections: int) -> float:
    """Requests per second from one wrk run; every response must be a 200."""
    result = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "-H", f"X-API-Key: {key}",
         f"http://127.0.0.1:{port}/items"],
        capture_output=True, text=True, timeout=seconds + 60, check=True,
    )  # fmt: skip
    if "Non-2xx" in result.stdout or "Socket errors" in result.stdout:
        raise SystemExit("wrk saw errors or refusals:\n" + result.stdout.replace(key, "<key>"))
    match = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    if match is None:
        raise SystemExit("cannot read wrk's output")
    return float(match.group(1))


def throughput(rounds: int, seconds: int, connections: int) -> None:
    if shutil.which("wrk") is None:
        raise SystemExit("--server needs wrk on PATH (apt-get install -y wrk)")
    key = "sk_" + os.urandom(16).hex()
    servers: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    try:
        for variant in VARIANTS:
            servers[variant] = start_server(variant, key)
        for _, port in servers.values():
            run_wrk(port, key, 1, connections)  # warm-up
        samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for _ in range(rounds):
            for variant, (_, port) in servers.items():
                samples[variant].append(run_wrk(port, key, seconds, connections))
    finally:
        for process, _ in servers.values():
            stop_server(process)
    rps = {v: statistics.median(s) for v, s in samples.items()}
    print(
        f"\nuvicorn, 1 worker, 127.0.0.1; wrk -t1 -c{connections}, {seconds} s per run,"
        f" median of {rounds} alternating rounds"
    )
    print(f"  {'variant':<24} {'requests/s':>11} {'of bare':>8}")
    for variant, value in rps.items():
        print(f"  {variant:<24} {value:>11.0f} {value / rps['bare app']:>8.1%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--number", type=int, default=20_000, help="requests per repeat")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--server", action="store_true", help="also measure under uvicorn")
    parser.add_argument("--rounds", type=int, default=5, help="wrk rounds per variant")
    parser.add_argument("--seconds", type=int, default=5, help="length of one wrk run")
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    number, repeats = args.number, args.repeats

    manager = APIKeyManager()
    keys = [manager.generate_key(user_id=f"user{i}", permissions=["read"]) for i in range(KEYS)]
    key = keys[KEYS // 2]
    table = {manager.digest(k): f"user{i}" for i, k in enumerate(keys)}
    manager.verify(key)  # the first check records last_used_at; later ones only compare
    # The same keys, for the rows that switch usage counting off.
    uncounted = APIKeyManager(manager.store, record_usage=False)
    # Each guarded app with keyguard's defaults, then the rows not held to the target.
    variants: dict[str, tuple[APIKeyManager, str | None]] = {
        "": (manager, DEFAULT_FAILURE_LIMIT),
        f", usage counting off {NOT_DEFAULT}": (uncounted, DEFAULT_FAILURE_LIMIT),
        f", failure throttle off {NOT_DEFAULT}": (manager, None),
        f", both off {NOT_DEFAULT}": (uncounted, None),
    }

    def scope_with(*headers: tuple[bytes, bytes]) -> Scope:
        return {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/items",
            "raw_path": b"/items",
            "root_path": "",
            "query_string": b"",
            "headers": [*BROWSER_HEADERS, *headers],
            "server": ("127.0.0.1", 8000),
            "client": ("127.0.0.1", 50000),
        }

    asgi_runs = transport_runs(
        "ASGI",
        bare_asgi,
        MinimalASGI(bare_asgi, table),
        lambda m, limit: ASGIMiddleware(bare_asgi, manager=m, failure_limit=limit),
        time_asgi,
        {
            "X-API-Key": scope_with((b"x-api-key", key.encode())),
            "Authorization: Bearer": scope_with((b"authorization", b"Bearer " + key.encode())),
        },
        "user",
        variants,
        number,
    )

    print(f"keyguard middleware, memory store with {KEYS} keys: {number} requests per repeat,")
    print(f"{repeats} repeats; min / median / max of the per-repeat ratios")
    print("keyguard rows: its defaults (one credential read and checked, form, digest, lookup,")
    print("revoked/expired/last use compared, failed-check throttle asked, usage counted,")
    print("user/auth/keyguard.* set); the baseline does header -> sha256 -> dict -> scope only")
    asgi = sample(asgi_runs, repeats)
    missed = report("ASGI (in-process)", asgi, "bare ASGI app", BASELINE)

    def environ_with(**headers: str) -> dict[str, Any]:
        return {
            "REQUEST_METHOD": "GET",
            "SCRIPT_NAME": "",
            "PATH_INFO": "/items",
            "QUERY_STRING": "",
            "SERVER_NAME": "127.0.0.1",
            "SERVER_PORT": "8000",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "REMOTE_ADDR": "127.0.0.1",
            "REMOTE_PORT": "50000",
            "HTTP_HOST": "api.example.com",
            "HTTP_USER_AGENT": "python-httpx/0.28.1",
            "HTTP_ACCEPT": "*/*",
            "wsgi.url_scheme": "http",
            **headers,
        }

    wsgi_runs = transport_runs(
        "WSGI",
        bare_wsgi,
        MinimalWSGI(bare_wsgi, table),
        lambda m, limit: WSGIMiddleware(bare_wsgi, manager=m, failure_limit=limit),
        time_wsgi,
        {
            "X-API-Key": environ_with(HTTP_X_API_KEY=key),
            "Authorization: Bearer": environ_with(HTTP_AUTHORIZATION="Bearer " + key),
        },
        "REMOTE_USER",
        variants,
        number,
    )
    wsgi = sample(wsgi_runs, repeats)
    missed += report("WSGI (in-process)", wsgi, "bare WSGI app", BASELINE)
    print("all targets met" if not missed else f"{missed} target(s) missed")
    if args.server:
        throughput(args.rounds, args.seconds, args.connections)


if __name__ == "__main__":
    main()
