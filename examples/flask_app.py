"""A tiny Flask API guarded by keyguard's ``KeyGuard`` extension (WSGI middleware).

Run it with ``python examples/flask_app.py`` (or ``gunicorn examples.flask_app:app``).
Keys live in ``$KEYGUARD_STORE`` (default ``sqlite:///keyguard.db``), shared with the CLI.
"""

from __future__ import annotations

import os
import sys
from datetime import timedelta
from pathlib import Path
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
    port = int(os.environ.get("PORT", "8000"))
    print_demo_key(f"http://127.0.0.1:{port}")
    app.run(host="127.0.0.1", port=port)
