"""The contract every key store follows, so the manager never knows which one it has.

A store is a map from a key's digest to its :class:`~keyguard.KeyInfo`, plus an index by
``key_id`` and by user. It knows nothing of HTTP or policy: expiry and revocation are
judged by the manager, and every record is kept (revoked and expired ones too) for audit.

Listings are ordered by ``(created_at, key_id)`` and read in pages (keyset paging): a page
is the ``limit`` records that follow the record named by ``after``, a ``key_id``. Neither
field of a record ever changes, so a walk that passes each page's last ``key_id`` on sees
every record that exists throughout it exactly once, whatever is added or revoked
meanwhile. The cursor is a key_id rather than a ``(created_at, key_id)`` pair because the
store compares its own stored time (SQLite keeps a float, Redis microseconds), never a
value that made a round trip through Python, and because callers already hold it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Protocol, runtime_checkable

from .._counting import Bucket
from ..events import KeyEvent
from ..records import KeyInfo

__all__ = [
    "USAGE_RETENTION",
    "USAGE_STEPS",
    "AsyncCounterStore",
    "AsyncKeyStore",
    "Bucket",
    "CounterStore",
    "DigestSource",
    "EventStore",
    "InvalidationSource",
    "KeyStore",
    "Subscription",
    "UsageRow",
    "UsageStore",
    "usage_cutoffs",
]


@runtime_checkable
class KeyStore(Protocol):
    """The synchronous store contract."""

    def add(self, info: KeyInfo) -> bool:
        """Insert ``info`` unless a record with its digest or key_id exists; atomic.

        Returns False (and changes nothing) on such a collision, so the caller draws a new key.
        """
        ...

    def get(self, digest: str) -> KeyInfo | None:
        """Return the record stored under ``digest``, whatever its status."""
        ...

    def get_by_id(self, key_id: str) -> KeyInfo | None:
        """Return the record with this ``key_id``, whatever its status."""
        ...

    def list_keys(
        self, user_id: str | None = None, *, limit: int | None = None, after: str | None = None
    ) -> list[KeyInfo]:
        """Return records (of one user, or of all users) ordered by ``(created_at, key_id)``.

        :param limit: at most this many records (a positive int); None returns them all.
        :param after: the ``key_id`` of the last record of the previous page: only records
            ordered after it are returned. A ``key_id`` the store does not hold raises
            ``ValueError``, since a silently empty page would end a walk early.
        """
        ...

    def revoke(self, digest: str, at: datetime) -> bool:
        """Set ``revoked_at`` if it is unset; return whether this call set it."""
        ...

    def set_expiry(self, digest: str, expires_at: datetime | None) -> bool:
        """Replace ``expires_at``; return whether a record was changed."""
        ...

    def update(self, info: KeyInfo, expected: KeyInfo) -> bool:
        """Give the record with ``info.digest`` the ``metadata`` and ``expires_at`` of
        ``info``, if it is unrevoked and its own still equal ``expected``'s; atomic.

        A compare-and-set: an update racing a revocation never brings the key back, and
        one racing another update never undoes it (the loser gets False, re-reads and
        decides again). Returns whether the record was changed. Stores that push
        invalidations announce the change like a revocation.
        """
        ...

    def touch(self, digest: str, at: datetime) -> None:
        """Record that the key was used at ``at`` (best effort)."""
        ...

    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
        ...


@runtime_checkable
class AsyncKeyStore(Protocol):
    """The async twin a networked store offers, so an event loop never blocks on it.

    Each method does what its :class:`KeyStore` namesake does. The manager uses the twin
    in ``averify`` when the store has it; local stores (memory, SQLite) do not need it and
    are answered inline.
    """

    async def aadd(self, info: KeyInfo) -> bool:
        """Async :meth:`KeyStore.add`."""
        ...

    async def aget(self, digest: str) -> KeyInfo | None:
        """Async :meth:`KeyStore.get`."""
        ...

    async def aget_by_id(self, key_id: str) -> KeyInfo | None:
        """Async :meth:`KeyStore.get_by_id`."""
        ...

    async def alist_keys(
        self, user_id: str | None = None, *, limit: int | None = None, after: str | None = None
    ) -> list[KeyInfo]:
        """Async :meth:`KeyStore.list_keys`."""
        ...

    async def arevoke(self, digest: str, at: datetime) -> bool:
        """Async :meth:`KeyStore.revoke`."""
        ...

    async def aset_expiry(self, digest: str, expires_at: datetime | None) -> bool:
        """Async :meth:`KeyStore.set_expiry`."""
        ...

    async def atouch(self, digest: str, at: datetime) -> None:
        """Async :meth:`KeyStore.touch`."""
        ...

    async def aclose(self) -> None:
        """Async :meth:`KeyStore.close`: also releases connections bound to the event loop."""
        ...


@runtime_checkable
class CounterStore(Protocol):
    """Counters shared by every worker that uses the store: rate limits and quotas.

    The store knows buckets, not keys or policies: :class:`~keyguard.limits.Limiter` names
    the buckets and reads the values back. Values of absent (or forgotten) buckets are 0.0.
    """

    def consume(self, buckets: Sequence[Bucket], now: float) -> tuple[bool, list[float]]:
        """Take one unit from every bucket at POSIX time ``now``, or from none; atomic.

        Returns whether the unit was taken, with the buckets' values: after the charge if
        it was taken, as they stand if not. Every worker sharing the store sees one count.
        """
        ...

    def adjust(self, bucket: Bucket, delta: float) -> float:
        """Add ``delta`` to a count bucket's value atomically and return the new value."""
        ...

    def peek(self, names: Sequence[str]) -> list[float]:
        """The current values of the named buckets, without changing them."""
        ...


@runtime_checkable
class AsyncCounterStore(Protocol):
    """The async twin of :class:`CounterStore` that a networked store offers."""

    async def aconsume(self, buckets: Sequence[Bucket], now: float) -> tuple[bool, list[float]]:
        """Async :meth:`CounterStore.consume`."""
        ...

    async def aadjust(self, bucket: Bucket, delta: float) -> float:
        """Async :meth:`CounterStore.adjust`."""
        ...

    async def apeek(self, names: Sequence[str]) -> list[float]:
        """Async :meth:`CounterStore.peek`."""
        ...


#: Seconds in each step of the usage counts.
USAGE_STEPS = {"minute": 60, "hour": 3600, "day": 86400}
#: How long a store keeps each step's buckets, in seconds: minutes for 48 hours, hours for
#: 90 days, days for two years (see :mod:`keyguard.usage`).
USAGE_RETENTION = {"minute": 48 * 3600, "hour": 90 * 86400, "day": 731 * 86400}

#: One usage count: ``(key_id, step, bucket start as POSIX seconds, code, count)``.
UsageRow = tuple[str, str, int, str, int]


def usage_cutoffs(newest: int) -> dict[str, int]:
    """Per step, the bucket start before which counts are past their retention.

    ``newest`` is the newest bucket start a store has been given: stores measure retention
    against the recorder's clock, never their own, so that tests with a fake clock agree.
    """
    return {step: newest - keep for step, keep in USAGE_RETENTION.items()}


@runtime_checkable
class UsageStore(Protocol):
    """Per-key usage counts in time buckets (see :mod:`keyguard.usage`).

    Synchronous only: counts are written by the recorder's background thread and read by
    operators (``manager.usage``, the CLI), never on a request's path. A bucket's start is
    a multiple of its step's seconds (:data:`USAGE_STEPS`), and a store may forget buckets
    older than :data:`USAGE_RETENTION`.
    """

    def add_usage(self, rows: Sequence[UsageRow]) -> None:
        """Add each row's count to its bucket (created at 0), all rows in one write."""
        ...

    def read_usage(self, key_id: str, step: str, start: int, end: int) -> list[UsageRow]:
        """The non-zero counts of ``key_id`` for ``step`` buckets starting in [start, end)."""
        ...


@runtime_checkable
class EventStore(Protocol):
    """The audit events of every key (see :mod:`keyguard.events`), all kept, never forgotten.

    Synchronous only: events are written by operator calls (creating, revoking, rotating a
    key), never on a request's path. Events read newest first; two events at the same
    time come in the reverse of the order they were added, so the later one comes first.
    """

    def add_event(self, event: KeyEvent) -> None:
        """Keep ``event``."""
        ...

    def read_events(
        self, key_id: str | None, since: datetime | None, limit: int
    ) -> list[KeyEvent]:
        """At most ``limit`` (a positive int) events, newest first: of the key ``key_id``
        (None: of every key), at or after ``since`` (None: of all time)."""
        ...


class Subscription(Protocol):
    """A running subscription; ``close`` stops it and waits for its thread."""

    def close(self) -> None: ...


@runtime_checkable
class InvalidationSource(Protocol):
    """A shared store that tells other processes when a record changes (push invalidation).

    :class:`~keyguard.CachedStore` subscribes so that a revocation made anywhere reaches
    its cache within a second instead of after its ``ttl``.
    """

    def subscribe_invalidations(self, callback: Callable[[str | None], None]) -> Subscription:
        """Call ``callback(digest)`` from a daemon thread whenever a record changes.

        ``callback(None)`` means "changes may have been missed, forget everything": it is
        sent each time the subscription is (re-)established.
        """
        ...


def unchanged(current: KeyInfo | None, expected: KeyInfo) -> bool:
    """Whether ``current`` is unrevoked with ``expected``'s metadata and expiry: the
    condition of :meth:`KeyStore.update`."""
    return (
        current is not None
        and current.revoked_at is None
        and current.expires_at == expected.expires_at
        and current.metadata == expected.metadata
    )


@runtime_checkable
class DigestSource(Protocol):
    """A store that can name every digest it holds without reading the records.

    :class:`~keyguard.CachedStore` loads its flood filter from it: at 1,000,000 keys,
    decoding every record through :meth:`KeyStore.list_keys` would cost several seconds
    more than reading one column.
    """

    def count_keys(self) -> int:
        """How many records the store holds (of every status)."""
        ...

    def iter_digests(self, page_size: int = 10_000) -> Iterator[str]:
        """Yield the digest of every record, reading ``page_size`` of them per round trip.

        A record that exists throughout the walk is yielded at least once (Redis may yield
        one twice); one added or removed meanwhile may or may not be. No connection is held
        between pages, so a slow consumer holds up no one.
        """
        ...


def listing_order(info: KeyInfo) -> tuple[datetime, str]:
    """The sort key of every listing: oldest first, ties broken by ``key_id``."""
    return info.created_at, info.key_id


def page_size_checked(page_size: object) -> int:
    """``page_size`` if it is a positive int; a page of 0 would never end a walk."""
    if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 1:
        raise ValueError(f"page_size must be a positive int, got {page_size!r}")
    return page_size


def unknown_cursor(after: str) -> ValueError:
    """The error for an ``after`` cursor that names no record."""
    return ValueError(f"cannot list after {after!r}: no record has that key_id")
