"""``MemoryStore``: the default, in-process store (a dict, gone when the process ends)."""

from __future__ import annotations

import bisect
import dataclasses
import threading
from datetime import datetime
from typing import Any

from ..records import KeyInfo
from .base import listing_order, unknown_cursor

__all__ = ["MemoryStore"]


class MemoryStore:
    """Records by digest and by key_id, with listings by user and of all; thread-safe.

    Reads are single dict lookups (atomic under the GIL); writes take a lock so that
    "add if absent" and "revoke if active" cannot race, and so that both maps always
    hold the same record. The listings are key_ids kept in listing order, so a page is
    found by bisection instead of sorting every record for each page.
    """

    def __init__(self) -> None:
        self._records: dict[str, KeyInfo] = {}
        self._by_id: dict[str, KeyInfo] = {}
        self._all: list[str] = []
        self._by_user: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MemoryStore(<{len(self._records)} keys>)"

    def __len__(self) -> int:
        return len(self._records)

    def add(self, info: KeyInfo) -> bool:
        with self._lock:
            if info.digest in self._records or info.key_id in self._by_id:
                return False
            self._records[info.digest] = self._by_id[info.key_id] = info
            ids = self._by_user.get(info.user_id)
            if ids is None:
                # Most users hold one key: a list made at size 1, not grown to 4 by append.
                self._by_user[info.user_id] = [info.key_id]
            else:
                bisect.insort(ids, info.key_id, key=self._order)
            bisect.insort(self._all, info.key_id, key=self._order)
            return True

    def _order(self, key_id: str) -> tuple[datetime, str]:
        return listing_order(self._by_id[key_id])

    def get(self, digest: str) -> KeyInfo | None:
        return self._records.get(digest)

    def get_by_id(self, key_id: str) -> KeyInfo | None:
        return self._by_id.get(key_id)

    def list_keys(
        self, user_id: str | None = None, *, limit: int | None = None, after: str | None = None
    ) -> list[KeyInfo]:
        with self._lock:
            ids = self._all if user_id is None else self._by_user.get(user_id, [])
            start = 0
            if after is not None:
                cursor = self._by_id.get(after)
                if cursor is None:
                    raise unknown_cursor(after)
                start = bisect.bisect_right(ids, listing_order(cursor), key=self._order)
            end = len(ids) if limit is None else start + limit
            return [self._by_id[key_id] for key_id in ids[start:end]]

    def revoke(self, digest: str, at: datetime) -> bool:
        with self._lock:
            info = self._records.get(digest)
            if info is None or info.revoked_at is not None:
                return False
            self._replace(info, revoked_at=at)
            return True

    def set_expiry(self, digest: str, expires_at: datetime | None) -> bool:
        with self._lock:
            info = self._records.get(digest)
            if info is None:
                return False
            self._replace(info, expires_at=expires_at)
            return True

    def touch(self, digest: str, at: datetime) -> None:
        with self._lock:
            info = self._records.get(digest)
            if info is not None:
                self._replace(info, last_used_at=at)

    def _replace(self, info: KeyInfo, **changes: Any) -> None:
        """Store ``info`` with ``changes`` under both its digest and its key_id; hold the lock."""
        new = dataclasses.replace(info, **changes)
        self._records[new.digest] = self._by_id[new.key_id] = new

    def close(self) -> None:
        """Nothing to release; kept for the contract."""
