"""The Starlette example, unchanged, with each response naming the worker that served it.

``tests/test_multiworker.py`` runs this under gunicorn with several workers and needs to
know which process answered; the example itself stays free of test hooks.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
example_app: Any = importlib.import_module("starlette_app").app


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Serve the example app, adding an ``x-worker-pid`` response header."""
    if scope["type"] != "http":
        await example_app(scope, receive, send)
        return

    pid = str(os.getpid()).encode()  # per request: right even if the app was preloaded

    async def send_with_pid(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            headers = [*message.get("headers", []), (b"x-worker-pid", pid)]
            message = {**message, "headers": headers}
        await send(message)

    await example_app(scope, receive, send_with_pid)
