"""A tiny Flask API guarded by keyguard's ``KeyGuard`` extension (WSGI middleware).

Run it with ``python examples/flask_app.py`` (or ``gunicorn examples.flask_app:app``).
Keys live in ``$KEYGUARD_STORE`` (default ``sqlite:///keyguard.db``), shared with the CLI.
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask

from keyguard import APIKeyManager
from keyguard.flask import KeyGuard, current_key, require_scopes

manager = APIKeyManager.from_url()
app = Flask(__name__)
KeyGuard(app, manager, exempt_paths=["/health"])


@app.get("/health")
def health() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/whoami")
def whoami() -> dict[str, Any]:
    key = current_key()
    assert key is not None  # the middleware refused requests without a valid key
    return {"user_id": key.user_id, "scopes": list(key.scopes)}


@app.post("/items")
@require_scopes("write")
def create_item() -> tuple[dict[str, Any], int]:
    key = current_key()
    assert key is not None
    return {"created": True, "by": key.user_id}, 201


def print_demo_key(base_url: str) -> None:
    """Create and print a demo key if the store has no active key; it is shown only here."""
    if manager.list_keys(limit=1):
        print("The store has keys; create another with: keyguard create --user you --scope read")
        return
    key = manager.generate_key(user_id="demo", permissions=["read", "write"])
    print(f"Created a demo key with scopes read and write: {key}")
    print(f'Try: curl -H "Authorization: Bearer {key}" {base_url}/whoami', flush=True)


if __name__ == "__main__":
    port = int(os.environ.get("PORT", "8000"))
    print_demo_key(f"http://127.0.0.1:{port}")
    app.run(host="127.0.0.1", port=port)
