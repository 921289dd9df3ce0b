"""What the manager accepts into a record: metadata, and times every store can keep.

The rules are checked here, once, so every store accepts and refuses the same records.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from .limits import parse_quota, parse_rates
from .networks import parse_networks

__all__ = [
    "LATEST",
    "MAX_METADATA_BYTES",
    "check_metadata",
    "deadline_after",
    "expiry_at",
    "positive",
    "utc",
]

MAX_METADATA_BYTES = 64 * 1024


def utc(ts: float) -> datetime:
    """POSIX time ``ts`` as a timezone-aware UTC datetime."""
    return datetime.fromtimestamp(ts, timezone.utc)


def check_metadata(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """Return a JSON-clean copy of ``metadata`` or raise naming the offending field."""
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a dict, not {type(metadata).__name__}")
    clean: dict[str, Any] = {}
    for name, value in metadata.items():
        if not isinstance(name, str):
            raise TypeError(f"metadata field names must be str, got {name!r}")
        if not _is_utf8_text(name):
            raise ValueError(f"metadata field name {name!r} is not UTF-8 text (a lone surrogate)")
        try:
            text = json.dumps(value, allow_nan=False, ensure_ascii=False)
            text.encode("utf-8")  # a lone surrogate cannot be stored anywhere
            clean[name] = json.loads(text)
        except (TypeError, ValueError) as e:  # UnicodeEncodeError is a ValueError
            raise TypeError(f"metadata field {name!r} is not JSON-serialisable: {e}") from None
        except RecursionError:
            raise ValueError(f"metadata field {name!r} is nested too deeply") from None
    user_id = clean.get("user_id")
    if not isinstance(user_id, str) or not user_id.strip():
        raise ValueError("metadata field 'user_id' is required and must be a non-empty string")
    if "\x00" in user_id:
        # Every store indexes user_id as text, and PostgreSQL text cannot hold NUL.
        raise ValueError("metadata field 'user_id' must not contain NUL characters")
    email = clean.get("email")
    if email is not None and not isinstance(email, str):
        raise TypeError("metadata field 'email' must be a string")
    permissions = clean.get("permissions")
    if permissions is not None and (
        not isinstance(permissions, list) or not all(isinstance(p, str) and p for p in permissions)
    ):
        raise TypeError("metadata field 'permissions' must be a list of non-empty strings")
    if "rate_limits" in clean:
        rates = parse_rates(clean["rate_limits"])
        if rates:
            clean["rate_limits"] = [str(r) for r in rates]
        else:
            del clean["rate_limits"]
    if clean.get("quota") is not None:
        quota = parse_quota(clean["quota"])
        clean["quota"] = quota.count if quota.period is None else str(quota)
    if clean.get("allowed_ips") is not None:
        clean["allowed_ips"] = [str(n) for n in parse_networks(clean["allowed_ips"])]
    family = clean.get("family_id")
    if family is not None and (not isinstance(family, str) or not family):
        raise TypeError("metadata field 'family_id' must be a non-empty string")
    if len(json.dumps(clean)) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is larger than {MAX_METADATA_BYTES} bytes as JSON")
    return clean


# Every store must be able to read an expiry back (datetime ends at year 9999).
LATEST = datetime(9000, 1, 1, tzinfo=timezone.utc)


def deadline_after(name: str, now: float, delta: timedelta) -> datetime:
    """``now + delta`` as a UTC datetime, or a ValueError naming ``name`` if out of range."""
    try:
        deadline = utc(now + delta.total_seconds())
    except (OverflowError, ValueError, OSError):
        deadline = None
    if deadline is None or deadline > LATEST:
        raise ValueError(f"{name} {delta} ends after {LATEST:%Y-%m-%d}")
    return deadline


def expiry_at(expires_at: object, now: float) -> datetime:
    """``expires_at`` as a UTC datetime if it is an aware datetime after ``now`` that every
    store can keep, else the ``TypeError``/``ValueError`` saying why not."""
    if not isinstance(expires_at, datetime) or expires_at.tzinfo is None:
        raise TypeError("expires_at must be a timezone-aware datetime")
    if expires_at.timestamp() <= now:
        raise ValueError("expires_at is in the past")
    if expires_at > LATEST:
        raise ValueError(f"expires_at must be before {LATEST:%Y-%m-%d}")
    return expires_at.astimezone(timezone.utc)


def positive(name: str, value: timedelta) -> timedelta:
    """``value`` if it is a positive timedelta, else an error naming ``name``."""
    if not isinstance(value, timedelta):
        raise TypeError(f"{name} must be a datetime.timedelta, not {type(value).__name__}")
    if value <= timedelta(0):
        raise ValueError(f"{name} must be positive, got {value}")
    return value


def _is_utf8_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
