"""What changes when a key is updated in place or rotated: pure functions over records.

The manager reads the record, asks :func:`plan_update` for the new metadata and expiry,
and writes them with one conditional store call. Keeping the rules here keeps them
testable without a store and keeps the manager about storage and logging.

**Why widening needs ``allow_widen=True``.** An update keeps the secret: whoever holds the
key (including whoever may have copied it from a log or a laptop) gains what the update
grants, without anything new being handed out. Narrowing only takes power away, so it
is always allowed; adding a scope, allowing more networks (or any network), bringing an
expired key back, or extending the grace period of a key a rotation replaced must be asked
for explicitly. Issuing a new key is the safer way to grant
more. Rate limits, quotas and a later expiry of an active key are budgets, not powers,
and are not gated.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from ._frozen import thaw
from ._validation import check_metadata, deadline_after, expiry_at, positive, utc
from .networks import Network, parse_networks
from .records import KeyInfo

__all__ = [
    "LINEAGE_FIELDS",
    "UNSET",
    "Unset",
    "Update",
    "deprecated_metadata",
    "rotation_metadata",
]


class Unset(enum.Enum):
    """The type of :data:`UNSET`: "leave this field as it is"."""

    UNSET = "UNSET"

    def __repr__(self) -> str:
        return "UNSET"


#: The default of :meth:`~keyguard.APIKeyManager.update_key`'s fields: not changed.
UNSET: Final = Unset.UNSET

#: Metadata fields the manager keeps for rotations; never given by callers.
LINEAGE_FIELDS = frozenset({"family_id", "rotated_from", "replaced_by", "deprecated_at"})
# Fields an update names by argument, because changing them has rules of its own.
_BY_ARGUMENT = {
    "user_id": "a key's user_id cannot change; issue a new key for another user",
    "permissions": "change scopes with scopes=",
    "rate_limits": "change rate limits with rate_limits=",
    "quota": "change the quota with quota=",
    "allowed_ips": "change allowed networks with allowed_ips=",
    "name": "change the name with name=",
}


def _field_error(name: str) -> TypeError | None:
    if name in LINEAGE_FIELDS:
        return TypeError(f"metadata field {name!r} is kept by keyguard for rotations")
    reason = _BY_ARGUMENT.get(name)
    return None if reason is None else TypeError(f"metadata field {name!r}: {reason}")


@dataclass(frozen=True)
class Update:
    """The fields an update was given, checked for form once (before any store read).

    ``fields`` maps metadata field names (``permissions`` for scopes) to their new value,
    None meaning "remove"; ``metadata`` the caller's own fields the same way.
    """

    fields: dict[str, Any]
    metadata: dict[str, Any]
    expires_at: datetime | Unset | None
    expires_in: timedelta | None

    @classmethod
    def given(
        cls,
        *,
        scopes: Iterable[str] | Unset | None,
        metadata: Mapping[str, Any] | None,
        expires_at: datetime | Unset | None,
        expires_in: timedelta | None,
        name: str | Unset | None,
        rate_limits: Iterable[str] | Unset | None,
        quota: int | str | Unset | None,
        allowed_ips: Iterable[str] | Unset | None,
    ) -> Update:
        """The update of the arguments given; ``TypeError``/``ValueError`` for bad forms."""
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict, not {type(metadata).__name__}")
        if expires_at is not UNSET and expires_in is not None:
            raise TypeError("give expires_at or expires_in, not both")
        if name is not UNSET and name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        fields: dict[str, Any] = {}
        for field, value in (
            ("permissions", scopes),
            ("name", name),
            ("rate_limits", rate_limits),
            ("quota", quota),
            ("allowed_ips", allowed_ips),
        ):
            if value is UNSET:
                continue
            if field in ("permissions", "rate_limits", "allowed_ips") and value is not None:
                if isinstance(value, str) or not isinstance(value, Iterable):
                    raise TypeError(f"{_argument(field)} takes a list, not {value!r}")
                value = list(value) or None  # an iterator is read once, here
            fields[field] = value
        for field in metadata or {}:
            error = _field_error(field) if isinstance(field, str) else None
            if error is not None:
                raise error
        if not fields and not metadata and expires_at is UNSET and expires_in is None:
            raise ValueError("nothing to update: give at least one field to change")
        return cls(fields, dict(metadata or {}), expires_at, expires_in)

    def plan(
        self, old: KeyInfo, now: float, allow_widen: bool
    ) -> tuple[dict[str, Any], datetime | None, dict[str, list[Any]]]:
        """The new metadata and expiry of ``old``, and the changes as ``field: [old, new]``.

        Raises ``TypeError``/``ValueError`` naming the field for invalid values, and
        ``PermissionError`` for a widening without ``allow_widen``.
        """
        merged = thaw(old.metadata)
        for field, value in (*self.metadata.items(), *self.fields.items()):
            if value is None:
                merged.pop(field, None)
            else:
                merged[field] = value
        clean = check_metadata(merged)
        expiry = _new_expiry(old, now, self.expires_at, self.expires_in)
        changes = _changes(old, clean, expiry)
        if not allow_widen:
            _refuse_widening(old, clean, expiry, now)
        return clean, expiry, changes


def _argument(field: str) -> str:
    return "scopes" if field == "permissions" else field


def _new_expiry(
    old: KeyInfo, now: float, expires_at: datetime | Unset | None, expires_in: timedelta | None
) -> datetime | None:
    if expires_in is not None:
        return deadline_after("expires_in", now, positive("expires_in", expires_in))
    if expires_at is UNSET:
        return old.expires_at
    return None if expires_at is None else expiry_at(expires_at, now)


def _changes(
    old: KeyInfo, metadata: dict[str, Any], expiry: datetime | None
) -> dict[str, list[Any]]:
    before = thaw(old.metadata)
    changes: dict[str, list[Any]] = {
        field: [before.get(field), metadata.get(field)]
        for field in sorted(before.keys() | metadata.keys())
        if before.get(field) != metadata.get(field)
    }
    if expiry != old.expires_at:
        changes["expires_at"] = [_iso(old.expires_at), _iso(expiry)]
    return changes


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _refuse_widening(
    old: KeyInfo, metadata: dict[str, Any], expiry: datetime | None, now: float
) -> None:
    added = [s for s in metadata.get("permissions") or () if s not in old.scopes]
    if added:
        raise PermissionError(
            f"adding scopes {added} to {old.key_id} gives its existing secret more power;"
            " pass allow_widen=True to do it anyway, or issue a new key"
        )
    new_networks = parse_networks(metadata.get("allowed_ips") or ())
    if old.allowed_ips and not _within(new_networks, old.allowed_ips):
        raise PermissionError(
            f"allowing {old.key_id} from more addresses widens it;"
            " pass allow_widen=True to do it anyway"
        )
    if old.is_expired(now) and (expiry is None or expiry.timestamp() > now):
        raise PermissionError(f"{old.key_id} has expired; bringing it back needs allow_widen=True")
    if old.replaced_by and (expiry is None or (old.expires_at and expiry > old.expires_at)):
        raise PermissionError(
            f"{old.key_id} was replaced by {old.replaced_by}; extending its grace period"
            " needs allow_widen=True"
        )


def _within(networks: tuple[Network, ...], allowed: tuple[Network, ...]) -> bool:
    """Whether every network of ``networks`` lies inside one of ``allowed`` (an empty
    ``networks`` means "anywhere", which lies inside nothing)."""
    if not networks:
        return False
    return all(
        any(n.version == a.version and n.subnet_of(a) for a in allowed)  # type: ignore[arg-type]
        for n in networks
    )


def rotation_metadata(old: KeyInfo) -> dict[str, Any]:
    """The metadata of the key that replaces ``old``: the same, in the same family, with
    ``rotated_from`` naming ``old`` (and none of ``old``'s own deprecation marks)."""
    metadata = {
        k: v for k, v in thaw(old.metadata).items() if k not in ("replaced_by", "deprecated_at")
    }
    metadata["family_id"] = old.family_id
    metadata["rotated_from"] = old.key_id
    return metadata


def deprecated_metadata(old: KeyInfo, new_key_id: str, now: float) -> dict[str, Any]:
    """The metadata of ``old`` once rotated into ``new_key_id`` at POSIX time ``now``."""
    return {**thaw(old.metadata), "replaced_by": new_key_id, "deprecated_at": utc(now).isoformat()}
