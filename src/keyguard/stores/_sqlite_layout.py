"""How a key record is laid out in ``keyguard_records``, the SQLite store's table of keys.

The table is narrow because every index repeats the row's key: a million keys with about
100 bytes of metadata each took 587 MiB in the first layout (a 64-character text digest as
the key of a ``WITHOUT ROWID`` table and of all three of its indexes) and take 329 MiB in
this one (``benchmarks/bench_sqlite.py``). Per row:

- ``id``, the rowid: 64 bits of BLAKE2b of the digest, so a check is one search of the
  table by rowid (then the row's digest is compared) and an index entry carries 8 bytes.
  It is a hash rather than the digest's first bytes so that digests made up by hand
  (``f"{n:064x}"`` in a test) spread too; two digests with one ``id`` (a 2⁻⁶⁴ chance per
  pair) cannot both be stored, and ``add`` answers False, as for a collision of digests.
- ``digest``: the 32 bytes of a lowercase hex digest (what every hash scheme writes), or
  the text itself for any other digest, so an unusual one still round-trips exactly.
- ``scheme``: an id in ``keyguard_hash_schemes``; nearly every row shares one.
- ``prefix``: NULL when ``hint`` starts with it and ``…`` (what the manager writes).
- ``metadata``: the JSON object, or when its first member is the record's ``user_id`` (as
  the manager writes it) only the members after that one, which the ``user_id`` column
  already holds; read back, both parse to the same object.
- times are REAL POSIX seconds, as ``datetime.timestamp()`` gives them, and a read turns
  each into integer microseconds (:func:`time_us`, exact from 1697 to 2242), which is what
  ``KeyInfo.from_store`` takes. An INTEGER of microseconds would take the same 8 bytes and
  save that step (about 0.2 µs a time), but changing the column means upgrading every file.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import Any

from ..records import KeyInfo

__all__ = [
    "COLUMNS",
    "INDEXES",
    "TABLES",
    "encode_record",
    "locate",
    "metadata_text",
    "pack_metadata",
    "prefix_text",
    "row_id",
    "stored_digest",
    "time_us",
    "unpack_metadata",
]

TABLES = """
CREATE TABLE IF NOT EXISTS keyguard_hash_schemes (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE
);
CREATE TABLE IF NOT EXISTS keyguard_records (
    id INTEGER PRIMARY KEY,
    digest BLOB NOT NULL,
    key_id TEXT NOT NULL UNIQUE,
    scheme INTEGER NOT NULL,
    prefix TEXT,
    hint TEXT NOT NULL,
    user_id TEXT NOT NULL,
    metadata TEXT NOT NULL,
    created_at REAL NOT NULL,
    expires_at REAL,
    revoked_at REAL,
    last_used_at REAL
)"""
# Pages of one user's keys (keys created at the same instant sorted by key_id), and pages
# of every user's keys in key order. Made after the rows when a file is upgraded: an index
# built from sorted rows is packed tighter than one grown key by key.
INDEXES = """
CREATE INDEX IF NOT EXISTS keyguard_records_user ON keyguard_records (user_id, created_at);
CREATE INDEX IF NOT EXISTS keyguard_records_created ON keyguard_records (created_at, key_id)"""
COLUMNS = (
    "digest, key_id, scheme, prefix, hint, user_id, metadata,"
    " created_at, expires_at, revoked_at, last_used_at"
)
_HINT_MARK = "…"


def row_id(digest: str) -> int:
    """The rowid of the record stored under ``digest``."""
    hashed = hashlib.blake2b(digest.encode(), digest_size=8).digest()
    return int.from_bytes(hashed, "big", signed=True)


def stored_digest(digest: str) -> bytes | str:
    """What the ``digest`` column holds: the bytes of lowercase hex, else the text."""
    try:
        raw = bytes.fromhex(digest)
    except ValueError:
        return digest
    # fromhex also takes capitals and spaces, which would not come back as they were.
    return raw if raw.hex() == digest else digest


def locate(digest: str) -> tuple[int, bytes | str]:
    """The rowid and the ``digest`` column of the record stored under ``digest``."""
    return row_id(digest), stored_digest(digest)


def prefix_text(prefix: str, hint: str) -> str | None:
    """The ``prefix`` column: NULL when the hint shows the prefix, as the manager writes it."""
    if _HINT_MARK not in prefix and hint.startswith(prefix + _HINT_MARK):
        return None
    return prefix


def metadata_text(metadata: Any) -> str:
    """Metadata as compact JSON, UTF-8 where the text can hold it (a lone surrogate cannot)."""
    text = json.dumps(metadata, separators=(",", ":"), ensure_ascii=False)
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return json.dumps(metadata, separators=(",", ":"))
    return text


def pack_metadata(text: str, user_id: str, *, ensure_ascii: bool = False) -> str | bytes:
    """The ``metadata`` column for JSON ``text``: without a leading ``user_id`` member equal
    to the record's, else the text unchanged.

    ``ensure_ascii`` says how ``text`` was written (the first layout escaped non-ASCII).
    Only text that :func:`unpack_metadata` turns back into the same JSON is shortened: the
    rest never starts with ``{``, which marks a whole object, damaged or not. Text that is
    not even the start of an object (only a damaged file holds it) is kept as a BLOB of
    its bytes, which reads back as damaged, as it did.
    """
    if not text.startswith("{"):
        return text.encode("utf-8", "surrogatepass")
    head = '{"user_id":' + json.dumps(user_id, ensure_ascii=ensure_ascii)
    if text == head + "}":
        return ""
    if text.startswith(head + ",") and text.endswith("}"):
        rest = text[len(head) + 1 : -1]
        if rest and not rest.startswith("{"):
            return rest
    return text


# Any JSON string syntax for the user_id parses back to the same value.
_quote = json.encoder.encode_basestring


def unpack_metadata(stored: str, user_id: str) -> str:
    """The JSON text of a ``metadata`` column (see :func:`pack_metadata`); bytes kept from
    a damaged file raise ``TypeError``, which the store reports as a damaged record."""
    if stored.startswith("{"):
        return stored
    if stored:
        return f'{{"user_id":{_quote(user_id)},{stored}}}'
    return f'{{"user_id":{_quote(user_id)}}}'


def _ts(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def time_us(seconds: float) -> int:
    """The microseconds since the epoch of a stored time: what ``datetime.fromtimestamp``
    reads in it, computed as it does (the whole seconds, then the fraction rounded half to
    even), so every stored value, a hand-written one too, reads back as it always has.

    For every time from 1697 to 2242 (2**33 seconds either side of the epoch) that is the
    microsecond ``datetime.timestamp()`` wrote; beyond, a float of seconds no longer holds
    each microsecond. ``round(seconds * 10**6)`` is cheaper but rounds the product of the
    whole time: it is exact only from 1833 to 2106 (2**32 seconds), and reads some
    hand-written values a microsecond off.
    NaN raises ``ValueError``, an infinity ``OverflowError``, and text or bytes (a damaged
    file) ``ValueError`` or ``TypeError``.
    """
    whole = int(seconds)
    return whole * 1_000_000 + round((seconds - whole) * 1_000_000)


def encode_record(info: KeyInfo, scheme: int) -> tuple[Any, ...]:
    """The row of ``info``: ``id`` then :data:`COLUMNS`, with its hash scheme's id."""
    return (
        *locate(info.digest),
        info.key_id,
        scheme,
        prefix_text(info.prefix, info.hint),
        info.hint,
        info.user_id,
        pack_metadata(metadata_text(info.metadata), info.user_id),
        info.created_at.timestamp(),
        _ts(info.expires_at),
        _ts(info.revoked_at),
        _ts(info.last_used_at),
    )
