"""A tiny Starlette API guarded by keyguard's ASGI middleware.

Run it with ``python examples/starlette_app.py`` (or ``uvicorn examples.starlette_app:app``).
Keys live in ``$KEYGUARD_STORE`` (default ``sqlite:///keyguard.db``), shared with the CLI.
The WebSocket at ``/ws`` is guarded too: its handshake needs a key like any request.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket

from keyguard import APIKeyManager
from keyguard.asgi import APIKeyMiddleware
from keyguard.starlette import require_scopes

manager = APIKeyManager.from_url()


async def health(request: Request) -> JSONResponse:
    return JSONResponse({"status": "ok"})


async def whoami(request: Request) -> JSONResponse:
    return JSONResponse({"user_id": request.user.identity, "scopes": request.auth.scopes})


@require_scopes("write")
async def create_item(request: Request) -> JSONResponse:
    return JSONResponse({"created": True, "by": request.user.identity}, status_code=201)


async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_json({"user_id": websocket.user.identity})
    async for message in websocket.iter_text():
        await websocket.send_text(message)


app = Starlette(
    routes=[
        Route("/health", health),
        Route("/whoami", whoami),
        Route("/items", create_item, methods=["POST"]),
        WebSocketRoute("/ws", echo),
    ],
    middleware=[Middleware(APIKeyMiddleware, manager=manager, exempt_paths=["/health"])],
)


def print_demo_key(base_url: str) -> None:
    """Create a demo key valid for a day and print it once, with a curl line and the CLI.

    Every run makes a fresh key, so the curl line works on a store that has keys already;
    the day's expiry keeps old demo keys from piling up as live credentials.
    """
    key = manager.generate_key(
        user_id="demo", permissions=["read", "write"], expires_in=timedelta(days=1)
    )
    cli = Path(sys.executable).parent / "keyguard"  # the venv's: `make install` puts none on PATH
    command = f"{sys.executable} -m keyguard" if not cli.exists() else os.path.relpath(cli)
    if command.startswith(".."):
        command = str(cli)
    print(f"Created a demo key (scopes read and write, expires in 24 hours): {key}")
    print(f'Try: curl -H "Authorization: Bearer {key}" {base_url}/whoami')
    # The CLI finds the same store when run from this folder: it reads the same default.
    print(f"Manage keys from this folder with: {command} list", flush=True)


if __name__ == "__main__":
    import uvicorn

    port = int(os.environ.get("PORT", "8000"))
    print_demo_key(f"http://127.0.0.1:{port}")
    uvicorn.run(app, host="127.0.0.1", port=port)
