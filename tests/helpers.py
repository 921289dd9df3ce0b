"""Test doubles shared by the suites (a settable clock, a counting store, broken stores, a
store that keeps keys only, a store with an async twin) and ``assert_answer``, the one
check of a guarded request's answer that every transport's credential cases use."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence, Sized
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from keyguard import KeyEvent, KeyInfo, MemoryStore, StoreError
from keyguard.stores.base import UsageRow

if TYPE_CHECKING:
    from tests.credential_cases import Answer, Case, Keyring

START = 1_700_000_000.0


class Clock:
    """A settable clock for ``clock=`` parameters, so tests never sleep.

    It serves wall-clock seconds (the manager's) and monotonic ones (the cache's) alike.
    """

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, delta: timedelta) -> None:
        self.now += delta.total_seconds()


class CountingStore(MemoryStore):
    """A MemoryStore that counts calls by method name, to prove what reached the store."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()

    def add(self, info: KeyInfo) -> bool:
        self.calls["add"] += 1
        return super().add(info)

    def get(self, digest: str) -> KeyInfo | None:
        self.calls["get"] += 1
        return super().get(digest)

    def get_by_id(self, key_id: str) -> KeyInfo | None:
        self.calls["get_by_id"] += 1
        return super().get_by_id(key_id)

    def list_keys(
        self, user_id: str | None = None, *, limit: int | None = None, after: str | None = None
    ) -> list[KeyInfo]:
        self.calls["list_keys"] += 1
        return super().list_keys(user_id, limit=limit, after=after)

    def revoke(self, digest: str, at: datetime) -> bool:
        self.calls["revoke"] += 1
        return super().revoke(digest, at)

    def set_expiry(self, digest: str, expires_at: datetime | None) -> bool:
        self.calls["set_expiry"] += 1
        return super().set_expiry(digest, expires_at)

    def update(self, info: KeyInfo, expected: KeyInfo) -> bool:
        self.calls["update"] += 1
        return super().update(info, expected)

    def touch(self, digest: str, at: datetime) -> None:
        self.calls["touch"] += 1
        super().touch(digest, at)

    def add_usage(self, rows: Sequence[UsageRow]) -> None:
        self.calls["add_usage"] += 1
        super().add_usage(rows)

    def read_usage(self, key_id: str, step: str, start: int, end: int) -> list[UsageRow]:
        self.calls["read_usage"] += 1
        return super().read_usage(key_id, step, start, end)


class BrokenStore(MemoryStore):
    """A MemoryStore whose key lookups raise :class:`StoreError`, as an unreachable database's.

    :param message: the error's message, for tests that look for it in the log.
    """

    def __init__(self, message: str = "database is unreachable") -> None:
        super().__init__()
        self.message = message

    def get(self, digest: str) -> KeyInfo | None:
        raise StoreError(self.message)


class BrokenEventStore(MemoryStore):
    """A MemoryStore whose audit-event writes raise :class:`StoreError` (keys work)."""

    def add_event(self, event: KeyEvent) -> None:
        raise StoreError("the events table is unreachable")


class KeysOnlyStore:
    """A KeyStore and nothing more: no counters, usage counts or audit events."""

    def __init__(self) -> None:
        self._inner = MemoryStore()

    def __repr__(self) -> str:
        return "KeysOnlyStore()"

    def add(self, info: KeyInfo) -> bool:
        return self._inner.add(info)

    def get(self, digest: str) -> KeyInfo | None:
        return self._inner.get(digest)

    def get_by_id(self, key_id: str) -> KeyInfo | None:
        return self._inner.get_by_id(key_id)

    def list_keys(
        self, user_id: str | None = None, *, limit: int | None = None, after: str | None = None
    ) -> list[KeyInfo]:
        return self._inner.list_keys(user_id, limit=limit, after=after)

    def revoke(self, digest: str, at: datetime) -> bool:
        return self._inner.revoke(digest, at)

    def set_expiry(self, digest: str, expires_at: datetime | None) -> bool:
        return self._inner.set_expiry(digest, expires_at)

    def update(self, info: KeyInfo, expected: KeyInfo) -> bool:
        return self._inner.update(info, expected)

    def touch(self, digest: str, at: datetime) -> None:
        self._inner.touch(digest, at)

    def close(self) -> None:
        self._inner.close()


class AsyncStore(MemoryStore):
    """A memory store with an async twin, standing in for a network store."""

    def __init__(self, fail: bool = False) -> None:
        super().__init__()
        self.fail = fail
        self.async_reads = 0

    async def aget(self, digest: str) -> KeyInfo | None:
        self.async_reads += 1
        if self.fail:
            raise StoreError("connection refused")
        return self.get(digest)

    async def atouch(self, digest: str, at: datetime) -> None:
        self.touch(digest, at)

    async def aadd(self, info: KeyInfo) -> bool:
        return self.add(info)

    async def aget_by_id(self, key_id: str) -> KeyInfo | None:
        return self.get_by_id(key_id)

    async def alist_keys(
        self, user_id: str | None = None, *, limit: int | None = None, after: str | None = None
    ) -> list[KeyInfo]:
        return self.list_keys(user_id, limit=limit, after=after)

    async def arevoke(self, digest: str, at: datetime) -> bool:
        return self.revoke(digest, at)

    async def aset_expiry(self, digest: str, expires_at: datetime | None) -> bool:
        return self.set_expiry(digest, expires_at)

    async def aclose(self) -> None:
        self.close()


def assert_answer(
    keys: Keyring, case: Case, answer: Answer, *, reached: Sized | None = None
) -> None:
    """Assert ``answer`` is the case's: the user's ``{"user": ...}``, or its problem response.

    :param reached: the requests the guarded app received, where the test can see them:
        one when the key is admitted, none when it is refused.
    """
    assert answer.status == case.status, answer.body
    for secret in keys.secrets:
        assert secret not in answer.body
        assert all(secret.decode() not in v for _, v in answer.header_list)
    if reached is not None:
        assert len(reached) == (1 if case.status == 200 else 0)
    if case.status == 200:
        assert json.loads(answer.body) == {"user": case.user}
        return
    assert answer.headers["content-type"] == "application/problem+json"
    problem = json.loads(answer.body)
    assert (problem["status"], problem["code"]) == (case.status, case.code)
    challenge = answer.headers["www-authenticate"]
    if case.code == "missing_api_key":
        assert challenge == 'Bearer realm="api"'
    elif case.status == 401:
        assert challenge == 'Bearer realm="api", error="invalid_token"'
    else:
        assert challenge == 'Bearer realm="api", error="invalid_request"'
