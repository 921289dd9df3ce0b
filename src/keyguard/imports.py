"""Import another system's stored keys, so its callers' keys keep working under keyguard.

One source is known: djangorestframework-api-key (``drf-api-key``), whose ``APIKey`` rows
(and those of any ``AbstractAPIKey`` model) hold the unsalted SHA-512 of each key. Each
row becomes a record whose digest is keyguard's digest of that stored hash, with a
``hash_scheme`` of ``drf-sha512+<the manager's scheme>``; a manager built with
``accept_imported=("drf-api-key",)`` then finds a caller's ``<prefix>.<secret>`` key with
one digest and one store lookup, as it finds its own.

Rows hashed by an older drf-api-key with a salted password hasher (PBKDF2, Argon2, bcrypt)
are skipped and reported: they cannot be found by digest, and a slow password hash on the
request path is what drf-api-key 3 itself moved away from. drf-api-key 3 rehashes such a
key with SHA-512 the next time it is used, so a second import after that takes it.

Rows are read with the DB-API (``sqlite3``, or ``psycopg`` for a ``postgresql://`` URL);
Django is never imported. Nothing here prints, logs or returns a key or a hash.

The module is a little over the usual length because one import is one pass (read the
rows, judge each hash, write the records, report what was skipped and why) and its two
database readers are short; splitting them apart would not make either clearer.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Literal

from . import _drf
from ._tables import Connection, quote_table, read_rows
from ._validation import LATEST, check_metadata, utc
from .keys import redact_keys
from .records import KeyInfo

if TYPE_CHECKING:
    from .manager import APIKeyManager

__all__ = [
    "DRF_TABLE",
    "Connection",
    "ImportReport",
    "Result",
    "Row",
    "RowResult",
    "import_drf_api_keys",
]

logger = logging.getLogger("keyguard")

#: The table of drf-api-key's own ``APIKey`` model.
DRF_TABLE = "rest_framework_api_key_apikey"
#: A row as read from the table: column name -> value.
Row = Mapping[str, Any]
#: What became of a row: a new record, one already there, one revoked to match its row
#: (revoked in drf-api-key since an earlier import), or nothing.
Result = Literal["imported", "present", "revoked", "skipped"]

_COLUMNS = ("prefix", "hashed_key", "name", "revoked", "expiry_date", "created")
_ALGORITHM = re.compile(r"([a-z0-9_]{1,32})\$")
_LEGACY_ADVICE = (
    "keyguard finds drf keys by their SHA-512 only; drf-api-key 3 rehashes a key with"
    " SHA-512 the next time its caller uses it, so import again after that, or rotate it"
)


@dataclass(frozen=True, slots=True)
class RowResult:
    """What the import did with one row; it holds no key and no hash.

    ``prefix`` is the drf-api-key prefix (public: drf shows it in its admin), or ``"?"``
    when the row has none that is readable. ``status`` is the record's status
    (``active``, ``revoked``, ``expired``) when there is a record; ``reason`` says why a
    row was skipped.
    """

    prefix: str
    result: Result
    key_id: str | None = None
    status: str | None = None
    reason: str = ""


@dataclass
class ImportReport:
    """Every row read, with what became of it (see :class:`RowResult`)."""

    source: str
    table: str | None
    dry_run: bool
    rows: list[RowResult] = field(default_factory=list)

    def _having(self, result: Result) -> list[RowResult]:
        return [row for row in self.rows if row.result == result]

    @property
    def imported(self) -> list[RowResult]:
        """Rows stored as new records (with ``dry_run``: rows that would be)."""
        return self._having("imported")

    @property
    def present(self) -> list[RowResult]:
        """Rows whose record an earlier import stored, left as they were."""
        return self._having("present")

    @property
    def revoked(self) -> list[RowResult]:
        """Rows revoked in the source since an earlier import: their records are revoked."""
        return self._having("revoked")

    @property
    def skipped(self) -> list[RowResult]:
        """Rows that could not be imported; each says why."""
        return self._having("skipped")

    def summary(self) -> str:
        """One line: ``4 imported, 1 already present, 0 revoked now, 2 skipped``."""
        verb = "would be " if self.dry_run else ""
        return (
            f"{len(self.imported)} {verb}imported, {len(self.present)} already present,"
            f" {len(self.revoked)} {verb}revoked now, {len(self.skipped)} skipped"
        )


class _Skip(Exception):
    """A row that cannot be imported, and why (never quoting its hash)."""


def import_drf_api_keys(
    manager: APIKeyManager,
    source: str | os.PathLike[str] | Connection | Iterable[Row],
    *,
    user_id: str | Callable[[Row], str] | None = None,
    table: str = DRF_TABLE,
    dry_run: bool = False,
) -> ImportReport:
    """Import the keys of a djangorestframework-api-key table into ``manager``'s store.

    Idempotent: a row whose record is already stored is reported ``present`` (and, if the
    row has been revoked since, its record is revoked). Each row is stored in one atomic
    ``add`` or not at all; a row that cannot be imported is reported and skipped. A
    failing store raises :class:`~keyguard.StoreError`; rows stored before stay stored,
    and running the import again carries on.

    :param source: a SQLite file (a path or ``sqlite:///path``, opened read-only), a
        ``postgresql://`` URL (needs ``keyguard[postgres]``), an open DB-API connection
        (left open), or rows themselves: mappings with at least the columns ``prefix``,
        ``hashed_key``, ``name``, ``revoked``, ``expiry_date`` and ``created`` (such as
        Django's ``APIKey.objects.values()``).
    :param user_id: who owns the imported keys (drf-api-key's ``APIKey`` has no owner):
        one string for every key, or a function of the row (every column of the table is
        in it, e.g. ``lambda row: str(row["organization_id"])`` for an ``AbstractAPIKey``
        subclass); it may raise ``ValueError`` to skip a row. Default: the row's ``name``.
    :param table: the table to read, optionally ``schema.table``; not used for rows.
    :param dry_run: report what would be imported and write nothing.

    The record of a row keeps its ``name`` (metadata ``name``), ``created`` (as
    ``created_at``) and ``expiry_date`` (as ``expires_at``); a revoked row is stored
    revoked as of the import, since drf-api-key keeps no revocation time. The metadata
    ``imported_from`` names the source, the table and the drf prefix; the hint is
    ``<prefix>.…``. Naive times are read as UTC, as Django stores them with ``USE_TZ``.
    """
    if isinstance(user_id, str) and not user_id.strip():
        raise ValueError("user_id must be a non-empty string, a function of the row, or None")
    if user_id is not None and not isinstance(user_id, str) and not callable(user_id):
        raise TypeError(f"user_id must be a str or a function, not {type(user_id).__name__}")
    quote_table(table)  # a bad name is an error even when rows are given
    from_table = isinstance(source, (str, os.PathLike, Connection))
    report = ImportReport(_drf.SOURCE, table if from_table else None, bool(dry_run))
    seen: dict[str, KeyInfo] = {}  # what a dry run would have stored, by digest
    with read_rows(source, table, _COLUMNS, order=("created", "prefix")) as rows:
        for row in rows:
            report.rows.append(_import_row(manager, row, user_id, report, seen))
    logger.info("import from %s: %s", _drf.SOURCE, report.summary())
    return report


def _import_row(
    manager: APIKeyManager,
    row: object,
    user_id: str | Callable[[Row], str] | None,
    report: ImportReport,
    seen: dict[str, KeyInfo],
) -> RowResult:
    """Store one row's record (unless a dry run) and say what became of it.

    A row whose record is stored already is found by its hash alone, before the rest of
    it is read: a second import reports it ``present`` whatever its other columns say.
    """
    prefix = "?"
    now = manager.clock()
    store = manager.store
    try:
        if not isinstance(row, Mapping):
            raise _Skip(f"not a row: a mapping of columns to values, not {type(row).__name__}")
        prefix = _prefix(row)
        revoked = _revoked(row)
        # The stored hash stands in for the key: the manager digests it as it does a key.
        digest = manager.digest(_hashed_key(row))
        existing = store.get(digest) or seen.get(digest)
        if existing is not None:
            return _present(manager, existing, prefix, revoked, report.dry_run)
        info = _record(manager, row, prefix, digest, revoked, user_id, report.table)
    except _Skip as e:
        return RowResult(prefix, "skipped", reason=redact_keys(str(e)))
    if report.dry_run:
        if store.get_by_id(info.key_id) is None:
            seen[digest] = info
            return RowResult(prefix, "imported", info.key_id, info.status(now))
    elif store.add(info):
        logger.info("imported %s key %s as %s", _drf.SOURCE, info.hint, info.key_id)
        return RowResult(prefix, "imported", info.key_id, info.status(now))
    else:
        # add() refuses a digest or a key_id already stored: which one?
        again = store.get(digest)
        if again is not None:
            return RowResult(prefix, "present", again.key_id, again.status(now))
    return RowResult(
        prefix,
        "skipped",
        info.key_id,
        reason=f"{info.key_id} is already stored under another digest: was it imported"
        " with another KEYGUARD_PEPPER, or from another table with the same prefix?",
    )


def _present(
    manager: APIKeyManager, existing: KeyInfo, prefix: str, revoked: bool, dry_run: bool
) -> RowResult:
    """A row stored already: left as it is, unless the source has revoked it since.

    Revocation is the one change carried over: it is final in both systems, whereas an
    expiry may since have been changed in keyguard (a rotation's grace period).
    """
    now = manager.clock()
    status = existing.status(now)
    if not (revoked and status == "active"):
        return RowResult(prefix, "present", existing.key_id, status)
    if not dry_run:
        manager.store.revoke(existing.digest, utc(now))
    return RowResult(prefix, "revoked", existing.key_id, "revoked")


def _hashed_key(row: Row) -> str:
    hashed = _column(row, "hashed_key")
    if not isinstance(hashed, str) or _drf.STORED_HASH.fullmatch(hashed) is None:
        raise _Skip(_hash_problem(hashed))
    return hashed


def _record(
    manager: APIKeyManager,
    row: Row,
    prefix: str,
    digest: str,
    revoked: bool,
    user_id: str | Callable[[Row], str] | None,
    table: str | None,
) -> KeyInfo:
    """The record of a valid row, or a :class:`_Skip` saying what is wrong with it."""
    name = _column(row, "name")
    if name is not None and not isinstance(name, str):
        raise _Skip(f"name is a {type(name).__name__}, not text")
    created = _time(row, "created")
    if created is None:
        raise _Skip("created is empty")
    expires = _time(row, "expiry_date")
    if expires is not None and expires > LATEST:
        raise _Skip(f"expiry_date is after {LATEST:%Y-%m-%d}, which keyguard cannot store")
    origin = {"source": _drf.SOURCE, "prefix": prefix}
    if table is not None:
        origin["table"] = table
    metadata: dict[str, Any] = {"user_id": _owner(row, name, user_id), "imported_from": origin}
    if name:
        metadata["name"] = name
    try:
        clean = check_metadata(metadata)
    except (TypeError, ValueError) as e:
        raise _Skip(str(e)) from None
    return KeyInfo(
        # Derived from the prefix (unique in a drf table, and public), so that the same
        # row always gets the same key_id: a second import under another pepper is caught.
        key_id="key_" + hashlib.sha256(f"{_drf.SOURCE}:{prefix}".encode()).hexdigest()[:16],
        prefix=prefix,
        hint=f"{prefix}.…",
        user_id=clean["user_id"],
        metadata=clean,
        created_at=created,
        expires_at=expires,
        revoked_at=utc(manager.clock()) if revoked else None,
        digest=digest,
        hash_scheme=_drf.SCHEME_TAG + manager.hash_scheme,
    )


def _column(row: Row, name: str) -> Any:
    try:
        return row[name]
    except KeyError:
        raise _Skip(f"the row has no {name!r} column") from None


def _prefix(row: Row) -> str:
    prefix = _column(row, "prefix")
    if not isinstance(prefix, str) or _drf.PREFIX_FORM.fullmatch(prefix) is None:
        raise _Skip(
            "prefix is not 8 ASCII letters and digits (a custom KeyGenerator?): keyguard"
            " accepts keys of drf-api-key's default form only"
        )
    return prefix


def _revoked(row: Row) -> bool:
    value = _column(row, "revoked")
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):  # SQLite has no booleans
        return bool(value)
    raise _Skip("revoked is not a boolean")


def _hash_problem(hashed: object) -> str:
    """Why a ``hashed_key`` is not drf-api-key 3's: quoting at most its algorithm's name."""
    algorithm = _ALGORITHM.match(hashed) if isinstance(hashed, str) else None
    if algorithm is None:
        return "hashed_key is not a drf-api-key hash"
    if algorithm[1] == "sha512":
        return "hashed_key is a malformed sha512 hash"
    return f"hashed with Django's {algorithm[1]} hasher (drf-api-key before 3.0): {_LEGACY_ADVICE}"


def _time(row: Row, column: str) -> datetime | None:
    """A column's time as an aware UTC datetime; text is ISO 8601 (SQLite's), naive is UTC."""
    value = _column(row, column)
    if value is None:
        return None
    try:
        if isinstance(value, str):
            value = datetime.fromisoformat(value)
        if not isinstance(value, datetime):
            raise _Skip(f"{column} is a {type(value).__name__}, not a date and time")
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)
    except (ValueError, OverflowError):
        raise _Skip(f"{column} is not a valid date and time") from None


def _owner(row: Row, name: str | None, user_id: str | Callable[[Row], str] | None) -> str:
    """The user_id of a row's record (see ``import_drf_api_keys``)."""
    if isinstance(user_id, str):
        return user_id
    if user_id is None:
        if not name or not name.strip():
            raise _Skip("its name is empty, so it has no user_id: pass user_id")
        return name
    try:
        owner = user_id(row)
    except (LookupError, ValueError, TypeError, AttributeError) as e:
        raise _Skip(f"user_id: {type(e).__name__}: {e}") from None
    if not isinstance(owner, str):
        raise _Skip(f"user_id returned a {type(owner).__name__}, not a str")
    return owner
