"""A tiny FastAPI API guarded by keyguard's ``require_api_key`` dependency.

Run it with ``python examples/fastapi_app.py`` (or ``uvicorn examples.fastapi_app:app``),
then try the "Authorize" button at http://127.0.0.1:8000/docs. Keys live in
``$KEYGUARD_STORE`` (default ``sqlite:///keyguard.db``), shared with the CLI.
"""

from __future__ import annotations

import os
from typing import Annotated, Any

from fastapi import Depends, FastAPI

from keyguard import APIKeyManager, KeyInfo
from keyguard.fastapi import install, require_api_key

manager = APIKeyManager.from_url()
app = FastAPI(title="keyguard FastAPI example")
install(app, manager)

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
    """Create and print a demo key if the store has no active key; it is shown only here."""
    if manager.list_keys(limit=1):
        print("The store has keys; create another with: keyguard create --user you --scope read")
        return
    key = manager.generate_key(user_id="demo", permissions=["read", "write"])
    print(f"Created a demo key with scopes read and write: {key}")
    print(f'Try: curl -H "Authorization: Bearer {key}" {base_url}/whoami', flush=True)


if __name__ == "__main__":
    import uvicorn

    port = int(os.environ.get("PORT", "8000"))
    print_demo_key(f"http://127.0.0.1:{port}")
    uvicorn.run(app, host="127.0.0.1", port=port)
