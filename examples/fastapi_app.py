"""A tiny FastAPI API guarded by keyguard's ``require_api_key`` dependency.

Run it with ``python examples/fastapi_app.py`` (or ``uvicorn examples.fastapi_app:app``),
then try the "Authorize" button at http://127.0.0.1:8000/docs. Keys live in
``$KEYGUARD_STORE`` (default ``sqlite:///keyguard.db``), shared with the CLI.

``FastAPIOffline`` (package ``fastapi-offline``) serves Swagger UI and ReDoc from files it
installs rather than from a CDN, so ``/docs`` and ``/redoc`` work offline and behind a
firewall.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends
from fastapi_offline import FastAPIOffline

from keyguard import APIKeyManager, KeyInfo
from keyguard.fastapi import install, require_api_key

manager = APIKeyManager.from_url()
app = FastAPIOffline(title="keyguard FastAPI example")  # a FastAPI app; docs without a CDN
install(app, manager)  # problem+json refusals, documented in the OpenAPI document

AnyKey = Annotated[KeyInfo, Depends(require_api_key())]
WriteKey = Annotated[KeyInfo, Depends(require_api_key(scopes=["write"]))]


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/whoami")
async def whoami(key: AnyKey) -> dict[str, Any]:
    return {"user_id": key.user_id, "scopes": list(key.scopes)}


@app.post("/items", status_code=201)
async def create_item(key: WriteKey) -> dict[str, Any]:
    return {"created": True, "by": key.user_id}


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
