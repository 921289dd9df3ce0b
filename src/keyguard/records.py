"""``KeyInfo``: the non-secret record kept for every issued key."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from typing import TYPE_CHECKING, Any

from ._frozen import FrozenDict, FrozenList, freeze, loads
from .exceptions import StoreError
from .limits import Quota, Rate, parse_quota, parse_rates
from .networks import Network, parse_networks

__all__ = ["UNREAD", "KeyInfo"]

#: The ``metadata`` a store passes with ``metadata_json``: a placeholder, never read.
UNREAD: dict[str, Any] = FrozenDict()

# One shared float for "never" (revoked, or never used), instead of one per record.
_NEVER = -math.inf
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
# The microseconds a datetime can hold (years 1 to 9999), so a stored time beyond them is
# refused where the record is read, not where a datetime is first built from it.
_US_MIN = (datetime.min.replace(tzinfo=timezone.utc) - _EPOCH) // _MICROSECOND
_US_MAX = (datetime.max.replace(tzinfo=timezone.utc) - _EPOCH) // _MICROSECOND
# How a frozen record's slots are filled; looked up once here, not on every field set.
_set = object.__setattr__


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """Everything known about a key except the key itself.

    ``digest`` (the hash the store indexes by) and ``hash_scheme`` say how the key is
    stored; the repr leaves the digest out. ``scopes`` are the key's ``permissions``,
    ``rate_limits`` and ``quota`` its usage limits, ``allowed_ips`` the networks it may be
    used from, and ``family_id`` names the key and every key rotated from it (they share
    one budget); all come from the metadata fields of those names (``family_id`` defaults
    to the ``key_id``).
    Times are timezone-aware UTC datetimes. A record is shared between requests, so it
    is immutable and its ``metadata`` is read-only (changing it raises ``TypeError``);
    ``get_metadata`` copies.

    A store builds a record from a row with :meth:`from_store`, which takes the metadata
    as JSON text and the times as integer microseconds since the epoch: the text is parsed
    when the metadata, or a field derived from it (``scopes`` … ``deprecation``), is first
    read, and the datetimes are built when one of them is first read, so a check, which
    needs only ``valid_until`` and ``last_used_ts``, does neither. Those fields are slots
    left empty until then: ``__getattr__``, which Python calls only for an attribute not
    found, fills a group of them at once, and later reads are plain slot reads. Stored
    metadata that is not a JSON object, or holds an invalid limit or network, raises
    :class:`~keyguard.StoreError` where it is first read. (``metadata_json`` with
    ``metadata=UNREAD`` defers the metadata alone.) A record built from ``metadata`` is
    complete at once, and invalid fields raise ``ValueError`` there.
    """

    key_id: str
    prefix: str
    hint: str
    user_id: str
    metadata: dict[str, Any]
    created_at: datetime
    expires_at: datetime | None = None
    revoked_at: datetime | None = None
    last_used_at: datetime | None = None
    digest: str = field(default="", repr=False)
    hash_scheme: str = "sha256"
    #: The metadata as JSON text, parsed on first read; only with ``metadata=UNREAD``.
    metadata_json: InitVar[str | None] = field(default=None, kw_only=True)
    scopes: tuple[str, ...] = field(init=False, compare=False)
    rate_limits: tuple[Rate, ...] = field(init=False, compare=False)
    quota: Quota | None = field(init=False, compare=False)
    family_id: str = field(init=False, compare=False)
    #: The networks the key may be used from (metadata ``allowed_ips``); empty: anywhere.
    allowed_ips: tuple[Network, ...] = field(init=False, compare=False, repr=False)
    #: The response fields of a key that a rotation replaced, during its grace period:
    #: ``Deprecation`` (RFC 9745, when it was replaced) and ``Sunset`` (RFC 8594, when it
    #: stops working); empty for every other key.
    deprecation: tuple[tuple[str, str], ...] = field(init=False, compare=False, repr=False)
    #: The POSIX time until which the key is accepted: ``-inf`` once revoked, ``inf`` if it
    #: never expires. Precomputed so the per-request check of both is one float compare.
    valid_until: float = field(init=False, repr=False, compare=False)
    #: ``last_used_at`` as a POSIX timestamp (``-inf`` if never used), so deciding whether
    #: a use is worth recording is one float compare.
    last_used_ts: float = field(init=False, repr=False, compare=False)
    #: The JSON text of a stored record's metadata (see the class docstring), else None.
    _metadata_json: str | None = field(init=False, repr=False, compare=False)
    #: A record from :meth:`from_store`: its times in microseconds (created, expires,
    #: revoked, last used), from which the datetimes are built on first read; else None.
    _times_us: tuple[int, int | None, int | None, int | None] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self, metadata_json: str | None) -> None:
        _set(self, "_metadata_json", metadata_json)
        if metadata_json is None:
            metadata = self.metadata
            shared = None
            if isinstance(metadata, dict):
                shared = _shared_permissions(metadata.get("permissions"))
            if shared is not None and type(metadata) is dict:  # not yet frozen: share the list
                metadata = {**metadata, "permissions": shared[1]}
            metadata = freeze(metadata)
            _set(self, "metadata", metadata)
            self._derive(metadata, None if shared is None else shared[0])
        else:
            object.__delattr__(self, "metadata")
        if self.revoked_at is not None:
            valid_until = _NEVER
        else:
            valid_until = math.inf if self.expires_at is None else self.expires_at.timestamp()
        _set(self, "valid_until", valid_until)
        used = _NEVER if self.last_used_at is None else self.last_used_at.timestamp()
        _set(self, "last_used_ts", used)

    @classmethod
    def from_store(
        cls,
        *,
        digest: str,
        key_id: str,
        hash_scheme: str,
        prefix: str,
        hint: str,
        user_id: str,
        metadata_json: str,
        created_us: int,
        expires_us: int | None,
        revoked_us: int | None,
        used_us: int | None,
    ) -> KeyInfo:
        """The record of a stored row: ``metadata_json`` is the metadata's JSON text, and
        the times are integer microseconds since the epoch (None where unset).

        Nothing is parsed or built beyond what a check reads (see the class docstring); the
        record then reads, compares, pickles and replaces as one built with ``metadata``.
        A time outside years 1 to 9999 raises :class:`~keyguard.StoreError`.
        """
        if not (
            _US_MIN <= created_us <= _US_MAX
            and (expires_us is None or _US_MIN <= expires_us <= _US_MAX)
            and (revoked_us is None or _US_MIN <= revoked_us <= _US_MAX)
            and (used_us is None or _US_MIN <= used_us <= _US_MAX)
        ):
            raise StoreError(f"the stored record of key {key_id!r} has a time out of range")
        info = object.__new__(cls)
        _set(info, "key_id", key_id)
        _set(info, "prefix", prefix)
        _set(info, "hint", hint)
        _set(info, "user_id", user_id)
        _set(info, "digest", digest)
        _set(info, "hash_scheme", hash_scheme)
        _set(info, "_metadata_json", metadata_json)
        _set(info, "_times_us", (created_us, expires_us, revoked_us, used_us))
        # Microseconds / 10**6 is the float datetime.timestamp() gives for the same time.
        if revoked_us is not None:
            valid_until = _NEVER
        else:
            valid_until = math.inf if expires_us is None else expires_us / 1_000_000
        _set(info, "valid_until", valid_until)
        used = _NEVER if used_us is None else used_us / 1_000_000
        _set(info, "last_used_ts", used)
        return info

    if not TYPE_CHECKING:  # for mypy, every field is simply there

        def __getattr__(self, name: str) -> Any:
            # Only reached for a slot still empty: a stored record's times or metadata not
            # yet read.
            if name in _TIMES:
                self._read_times()
            elif name == "metadata" or name in _DERIVED:
                self._read_metadata()
            else:
                raise AttributeError(f"'KeyInfo' object has no attribute {name!r}")
            return object.__getattribute__(self, name)

    def _read_times(self) -> None:
        """Build the datetimes of a record from :meth:`from_store`."""
        created, expires, revoked, used = self._times_us  # type: ignore[misc]
        _set(self, "created_at", _utc(created))
        _set(self, "expires_at", _utc(expires))
        _set(self, "revoked_at", _utc(revoked))
        _set(self, "last_used_at", _utc(used))

    def _read_metadata(self) -> None:
        """Parse ``metadata_json`` and fill the metadata and the fields derived from it."""
        try:
            metadata = loads(self._metadata_json)  # type: ignore[arg-type]
            if type(metadata) is not FrozenDict:
                raise ValueError("not a JSON object")
            self._derive(metadata)
        except (ValueError, TypeError) as e:
            raise StoreError(f"the stored metadata of key {self.key_id!r} is damaged: {e}") from e
        _set(self, "metadata", metadata)

    def _derive(self, metadata: dict[str, Any], scopes: tuple[str, ...] | None = None) -> None:
        """Set the fields derived from ``metadata`` (``scopes``: the shared tuple of its
        permissions, if known); ``ValueError`` (and none set) if one is invalid, so every
        value is computed before the first is set."""
        get = metadata.get
        rate_text, quota_text, networks = get("rate_limits"), get("quota"), get("allowed_ips")
        if scopes is None:
            scopes = tuple(get("permissions") or ())
        rates = parse_rates(rate_text) if rate_text else ()
        quota = None if quota_text is None else parse_quota(quota_text)
        allowed = parse_networks(networks) if networks else ()
        deprecation = _deprecation(metadata, self.expires_at)
        _set(self, "scopes", scopes)
        _set(self, "rate_limits", rates)
        _set(self, "quota", quota)
        _set(self, "family_id", get("family_id") or self.key_id)
        _set(self, "allowed_ips", allowed)
        _set(self, "deprecation", deprecation)

    @property
    def rotated_from(self) -> str | None:
        """The ``key_id`` of the key this one replaced in a rotation, if any."""
        return self.metadata.get("rotated_from")

    @property
    def replaced_by(self) -> str | None:
        """The ``key_id`` of the key that replaced this one in a rotation, if any."""
        return self.metadata.get("replaced_by")

    @property
    def expires_ts(self) -> float | None:
        """``expires_at`` as a POSIX timestamp, or None if the key never expires."""
        return None if self.expires_at is None else self.expires_at.timestamp()

    def is_expired(self, now: float) -> bool:
        """Whether the key has expired at POSIX time ``now``."""
        return self.expires_at is not None and self.expires_at.timestamp() <= now

    def status(self, now: float) -> str:
        """``"active"``, ``"revoked"`` or ``"expired"`` at POSIX time ``now``."""
        if self.revoked_at is not None:
            return "revoked"
        if self.is_expired(now):
            return "expired"
        return "active"


#: The fields computed from the metadata on first read.
_DERIVED = frozenset({"scopes", "rate_limits", "quota", "family_id", "allowed_ips", "deprecation"})
#: The fields a record from ``KeyInfo.from_store`` builds from its microseconds on first read.
_TIMES = frozenset({"created_at", "expires_at", "revoked_at", "last_used_at"})


#: The permissions of records, each set kept once as a tuple (their ``scopes``) and a
#: read-only list (their ``metadata["permissions"]``), so that records with the same
#: permissions share them and their strings: most keys hold one of a few sets. Bounded,
#: as sets are callers' data: only small sets are shared (at most 16 permissions of at
#: most 64 characters, so the table never holds more than about 1 MiB), and past 1,024
#: sets a new one is kept by its records alone. The list is read-only like all metadata;
#: a write forced through ``list``'s own methods would reach every record sharing it.
_PERMISSION_SETS: dict[tuple[str, ...], tuple[tuple[str, ...], FrozenList]] = {}
_MAX_PERMISSION_SETS = 1024
_MAX_SHARED_PERMISSIONS = 16
_MAX_SHARED_LENGTH = 64


def _shared_permissions(permissions: object) -> tuple[tuple[str, ...], FrozenList] | None:
    """The shared tuple and list of ``permissions``, or None if they are not a small list
    of short strings or no more sets are kept."""
    if type(permissions) is not list and type(permissions) is not FrozenList:
        return None
    key = tuple(permissions)
    if len(key) > _MAX_SHARED_PERMISSIONS or any(
        type(p) is not str or len(p) > _MAX_SHARED_LENGTH for p in key
    ):
        return None
    shared = _PERMISSION_SETS.get(key)
    if shared is None and len(_PERMISSION_SETS) < _MAX_PERMISSION_SETS:
        shared = _PERMISSION_SETS.setdefault(key, (key, FrozenList(key)))
    return shared


def _utc(us: int | None) -> datetime | None:
    return None if us is None else _EPOCH + _MICROSECOND * us


def _deprecation(
    metadata: Mapping[str, Any], expires_at: datetime | None
) -> tuple[tuple[str, str], ...]:
    deprecated = metadata.get("deprecated_at")
    if not deprecated or not metadata.get("replaced_by"):
        return ()
    try:
        since = datetime.fromisoformat(deprecated)
    except (TypeError, ValueError):
        return ()
    fields = [("Deprecation", f"@{math.floor(since.timestamp())}")]
    if expires_at is not None:
        fields.append(
            ("Sunset", format_datetime(expires_at.astimezone(timezone.utc), usegmt=True))
        )
    return tuple(fields)
