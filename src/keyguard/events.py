"""``KeyEvent``: the audit record of one change to a key, and how the manager builds one.

Every change the manager makes to a key (created, updated, rotated, revoked, credited) is
recorded as an event: when, which key, what changed and who (the ``actor`` string the
caller passes). Stores that follow :class:`~keyguard.stores.base.EventStore` keep them
all; :meth:`keyguard.APIKeyManager.events` and ``keyguard events`` read them back. A
refused request is not an event: requests are counted by :mod:`keyguard.usage`.

An event never holds a key: the manager records fields of the record, and every string
in them passes through :func:`~keyguard.keys.redact_keys`, so even a key pasted into a
metadata field by mistake is kept masked (as is any other run of 32 or more hex digits).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from ._frozen import freeze, thaw
from .keys import redact_keys
from .records import KeyInfo

__all__ = ["ACTIONS", "KeyEvent"]

#: The actions an event records.
ACTIONS = ("created", "updated", "rotated", "revoked", "credited")


@dataclass(frozen=True, slots=True)
class KeyEvent:
    """One change to the key ``key_id``: what was done (``action``), when and by whom.

    ``at`` is a timezone-aware UTC datetime; ``actor`` is the string the caller passed
    (``"ops@cli"``), ``""`` when none was given. ``changes`` holds the fields changed, as
    JSON values (times as ISO 8601 strings); like :attr:`KeyInfo.metadata` it is
    read-only. For ``"updated"`` it maps each field to ``[old, new]``.
    """

    at: datetime
    key_id: str
    action: str
    actor: str = ""
    # Left out of the hash, which a dict cannot have; still compared.
    changes: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        if not isinstance(self.at, datetime) or self.at.utcoffset() is None:
            raise TypeError(f"KeyEvent.at must be a timezone-aware datetime, got {self.at!r}")
        object.__setattr__(self, "at", self.at.astimezone(timezone.utc))
        object.__setattr__(self, "changes", freeze(dict(self.changes)))

    def to_dict(self) -> dict[str, Any]:
        """The event as plain JSON values (``at`` in ISO 8601), for logs and webhooks."""
        return {
            "at": self.at.isoformat(),
            "key_id": self.key_id,
            "action": self.action,
            "actor": self.actor,
            "changes": thaw(self.changes),
        }


def jsonable(value: Any) -> Any:
    """``value`` as JSON values with every key-like string masked.

    Datetimes become ISO 8601 strings and tuples lists; anything else that JSON cannot
    hold is a TypeError (a bug in the code that describes the change).
    """
    if isinstance(value, str):
        return redact_keys(value)
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).isoformat()
    if isinstance(value, Mapping):
        return {redact_keys(str(k)): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    raise TypeError(f"an event cannot record a {type(value).__name__}: {value!r}")


def check_actor(actor: object) -> str:
    """The actor to record: ``actor`` if it is a str (``""`` for None)."""
    if actor is None:
        return ""
    if not isinstance(actor, str):
        raise TypeError(f"actor must be a str, not {type(actor).__name__}")
    # Every store must be able to keep it: PostgreSQL text holds no NUL, and no store
    # holds a lone surrogate.
    if "\x00" in actor:
        raise ValueError("actor must not contain NUL characters")
    try:
        actor.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"actor {actor!r} is not UTF-8 text (a lone surrogate)") from None
    return actor


def created_changes(info: KeyInfo) -> dict[str, Any]:
    """What a ``created`` event records: the owner, the other metadata and the expiry."""
    changes: dict[str, Any] = {
        "user_id": info.user_id,
        "metadata": {k: v for k, v in info.metadata.items() if k != "user_id"},
        "expires_at": info.expires_at,
    }
    if info.rotated_from is not None:
        changes["rotated_from"] = info.rotated_from
    return changes


def events_since(since: object, now: float) -> datetime | None:
    """``since`` as a UTC datetime: a datetime as it is, a timedelta that long before ``now``."""
    if since is None:
        return None
    if isinstance(since, timedelta):
        if since < timedelta(0):
            raise ValueError(f"since must not be a negative timedelta, got {since}")
        try:
            return datetime.fromtimestamp(now, timezone.utc) - since
        except OverflowError:
            return datetime.min.replace(tzinfo=timezone.utc)  # since the beginning
    if not isinstance(since, datetime):
        raise TypeError(f"since must be a datetime or a timedelta, not {type(since).__name__}")
    if since.utcoffset() is None:
        raise ValueError("since must be timezone-aware (e.g. datetime.now(timezone.utc))")
    return since.astimezone(timezone.utc)
