"""The upgrade of a SQLite store file from schema version 1 to the current layout.

Version 1 kept keys in ``keyguard_keys``: a ``WITHOUT ROWID`` table keyed by the 64-character
hex digest, which each of its three indexes repeated. The upgrade copies every row into
``keyguard_records`` (see :mod:`._sqlite_layout`) inside the caller's transaction, so an
interrupted upgrade leaves the version 1 file as it was. Nothing is parsed on the way:
times and every text column are copied as stored, so even a damaged record arrives as it
was (and is still reported as damaged when read).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

from ..exceptions import StoreError
from ._sqlite_layout import INDEXES, TABLES, pack_metadata, prefix_text, row_id, stored_digest

__all__ = ["upgrade_from_v1"]

# Sorted by the new rowid, rows are appended to the table rather than spread over it, which
# packs its pages full.
_COPY = """
INSERT INTO keyguard_records (id, digest, key_id, scheme, prefix, hint, user_id, metadata,
                              created_at, expires_at, revoked_at, last_used_at)
SELECT keyguard_row_id(k.digest), keyguard_stored_digest(k.digest), k.key_id, s.id,
       keyguard_prefix(k.prefix, k.hint), k.hint, k.user_id,
       keyguard_metadata(k.metadata, k.user_id),
       k.created_at, k.expires_at, k.revoked_at, k.last_used_at
FROM keyguard_keys AS k JOIN keyguard_hash_schemes AS s ON s.name = k.hash_scheme
ORDER BY 1
"""


def _metadata_v1(text: str, user_id: str) -> str | bytes:
    # Version 1 wrote metadata with json.dumps' defaults: non-ASCII escaped.
    return pack_metadata(text, user_id, ensure_ascii=True)


def upgrade_from_v1(conn: sqlite3.Connection, where: str) -> None:
    """Move the keys of a version 1 file into ``keyguard_records`` and drop the old table.

    Runs in the caller's write transaction, which also sets the new schema version.
    ``where`` names the file in errors.
    """
    for statement in TABLES.split(";"):
        conn.execute(statement)
    conn.execute(
        "INSERT OR IGNORE INTO keyguard_hash_schemes (name)"
        " SELECT DISTINCT hash_scheme FROM keyguard_keys ORDER BY hash_scheme"
    )
    functions: dict[str, tuple[int, Callable[..., Any]]] = {
        "keyguard_row_id": (1, row_id),
        "keyguard_stored_digest": (1, stored_digest),
        "keyguard_prefix": (2, prefix_text),
        "keyguard_metadata": (2, _metadata_v1),
    }
    for name, (arity, function) in functions.items():
        conn.create_function(name, arity, function, deterministic=True)
    try:
        conn.execute(_COPY)
    except sqlite3.IntegrityError as e:
        raise StoreError(
            f"cannot upgrade SQLite key store {where}: two of its digests share a row id"
            f" ({e}); the file is unchanged and still readable by the previous keyguard"
        ) from e
    finally:
        for name, (arity, _) in functions.items():
            conn.create_function(name, arity, None)
    conn.execute("DROP TABLE keyguard_keys")
    for statement in INDEXES.split(";"):
        conn.execute(statement)
