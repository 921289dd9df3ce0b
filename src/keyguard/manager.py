"""``APIKeyManager``: issue, check, list, revoke and rotate keys over any store.

This is where policy lives (what makes a key valid, what metadata is allowed); the key
format is in :mod:`keyguard.keys`, input checks in ``_validation``, the check's outcome in
:mod:`keyguard.verification` and persistence behind :class:`~keyguard.stores.KeyStore`. It
is longer than most modules because it is one class, the library's whole key API, whose
methods are mostly docstrings.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import datetime, timedelta
from typing import Any, TypeGuard

from . import _drf
from ._frozen import thaw
from ._lifecycle import (
    LINEAGE_FIELDS,
    UNSET,
    Unset,
    Update,
    deprecated_metadata,
    rotation_metadata,
)
from ._validation import check_metadata, deadline_after, expiry_at, positive, utc
from .events import (
    ACTIONS,
    KeyEvent,
    check_actor,
    created_changes,
    events_since,
    jsonable,
)
from .exceptions import InvalidKeyError, KeyguardError, StoreError
from .keys import (
    DEFAULT_PREFIX,
    KeyFormat,
    digest_key,
    has_valid_checksum,
    hash_scheme,
    mask_key,
    validate_prefix,
)
from .limits import FailureThrottle, Limiter, Rate, Usage
from .records import KeyInfo
from .stores.base import (
    AsyncCounterStore,
    AsyncKeyStore,
    Bucket,
    CounterStore,
    EventStore,
    KeyStore,
    UsageStore,
)
from .stores.memory import MemoryStore
from .usage import UsagePoint, UsageRecorder, sum_points, usage
from .verification import Reason, Verification

__all__ = ["COUNTERS_ENV", "PEPPER_ENV", "APIKeyManager"]

logger = logging.getLogger("keyguard")

PEPPER_ENV = "KEYGUARD_PEPPER"
#: The environment variable naming a separate store for rate-limit and quota counters.
COUNTERS_ENV = "KEYGUARD_COUNTERS"
_MAX_ATTEMPTS = 8
_KEY_ID = re.compile(r"key_[0-9a-f]{16}")
# The characters of an RFC 3986 URI: never a space, quote or angle bracket in a Link field.
_LINK_URL = re.compile(r"https?://[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]+")
_TOUCH_CACHE_LIMIT = 100_000
DEFAULT_PAGE_SIZE = 1000


def _refusal(info: KeyInfo | None) -> InvalidKeyError:
    """The refusal of a key whose digest found ``info`` (None: not found), not active."""
    if info is None:
        return InvalidKeyError("the API key is not known", Reason.NOT_FOUND)
    if info.revoked_at is not None:
        return InvalidKeyError(f"API key {info.key_id} is revoked", Reason.REVOKED, info)
    return InvalidKeyError(f"API key {info.key_id} has expired", Reason.EXPIRED, info)


def _touch_failed(info: KeyInfo, error: StoreError) -> None:
    """Log a failed ``last_used_at`` write: it is best effort and never fails a check."""
    logger.warning("could not record last use of %s: %s", info.key_id, error)


def _check_listing(user_id: object, after: object = None) -> None:
    if user_id is not None and not isinstance(user_id, str):
        raise TypeError(f"user_id must be a str, not {type(user_id).__name__}")
    if after is not None and not isinstance(after, str):
        raise TypeError(f"after must be a key_id (str), not {type(after).__name__}")


def _page_size(name: str, value: object) -> int:
    """``value`` if it is a positive int: stores read -1 or 0 as "no limit" or "nothing"."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")
    return value


class APIKeyManager:
    """Issue API keys and check them against a store.

    :param store: where records live; default a fresh :class:`MemoryStore`.
    :param prefix: prefix of the keys this manager issues (``sk_``, ``pk_``, ``sk_live_``).
    :param accept_prefixes: further prefixes accepted by checks (e.g. during a migration).
    :param accept_imported: foreign key forms accepted by checks, for keys imported from
        another system: ``("drf-api-key",)`` accepts djangorestframework-api-key's
        ``<prefix>.<secret>`` keys (see :mod:`keyguard.imports`). Off by default, so a
        manager accepts only its own form; a native key's check costs the same either way.
    :param checksum: issue and require keys whose last 8 hex are a CRC32 of the rest.
    :param pepper: server-side secret; keys are then stored as HMAC-SHA-256 instead of
        SHA-256. Default: ``$KEYGUARD_PEPPER`` if set. Changing it invalidates every key.
    :param last_used_resolution: how often a key's ``last_used_at`` is written, at most
        (one store write per key per interval, not per request); None disables it.
    :param counters: where rate-limit and quota counters live; default the key store
        itself (every store keeps counters). Give another store to keep keys in one place
        and counters in another (keys in PostgreSQL, counters in Redis).
    :param record_usage: count every request per key (admitted, or refused by code) in
        the store's usage buckets, batched: at most one store write per second per process,
        from a background thread. See :mod:`keyguard.usage`.
    :param deprecation_link: a documentation URL sent as ``Link: <url>; rel="deprecation"``
        (RFC 9745) with every response to a key that a rotation replaced, during its grace
        period, beside its ``Deprecation`` and ``Sunset`` fields.
    :param on_event: called with each :class:`~keyguard.KeyEvent` (a key created, updated,
        rotated, revoked or credited) once the store has been given it (whether or not it
        could write it); an exception it raises is logged and never undoes or fails the
        change.
    :param clock: returns the current POSIX time; for tests.
    """

    def __init__(
        self,
        store: KeyStore | None = None,
        *,
        prefix: str = DEFAULT_PREFIX,
        accept_prefixes: Iterable[str] = (),
        accept_imported: Iterable[str] = (),
        checksum: bool = False,
        pepper: str | bytes | None = None,
        last_used_resolution: timedelta | None = timedelta(minutes=1),
        counters: CounterStore | None = None,
        record_usage: bool = True,
        deprecation_link: str | None = None,
        on_event: Callable[[KeyEvent], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store: KeyStore = MemoryStore() if store is None else store
        if not isinstance(self.store, KeyStore):
            raise TypeError(f"store must follow the KeyStore contract, got {self.store!r}")
        if on_event is not None and not callable(on_event):
            raise TypeError(f"on_event must be a callable or None, got {on_event!r}")
        self._on_event = on_event
        # A wrapper (CachedStore) has the methods whether or not its inner store keeps events.
        self._event_store = (
            self.store
            if isinstance(self.store, EventStore) and getattr(self.store, "keeps_events", True)
            else None
        )
        self.format = KeyFormat(prefix, checksum=checksum)
        if isinstance(accept_prefixes, str):
            # A str is an iterable of one-char prefixes, which would accept far too much.
            raise TypeError(f"accept_prefixes must be a list of prefixes: [{accept_prefixes!r}]")
        extra = [KeyFormat(p, checksum=checksum) for p in accept_prefixes if p != prefix]
        self.formats: tuple[KeyFormat, ...] = (self.format, *extra)
        # Every accepted prefix in one regex, compiled once: the form check is one fullmatch.
        self._form = re.compile("|".join(f"(?:{f.pattern})" for f in self.formats))
        self._checksum = self.format.checksum
        if isinstance(accept_imported, str):
            raise TypeError(f"accept_imported must be a list of sources: [{accept_imported!r}]")
        imported = tuple(dict.fromkeys(accept_imported))
        for source in imported:
            if source != _drf.SOURCE:
                raise ValueError(
                    f"unknown imported key form {source!r}: the one known is {_drf.SOURCE!r}"
                )
        #: The foreign key forms accepted by checks (``accept_imported``).
        self.accept_imported: tuple[str, ...] = imported
        # None unless drf-api-key keys are accepted: the one foreign form there is.
        self._drf_form = _drf.KEY_FORM if imported else None
        if pepper is None:
            pepper = os.environ.get(PEPPER_ENV) or None
        if isinstance(pepper, str):
            pepper = pepper.encode("utf-8")
        if pepper is not None and len(pepper) < 16:
            raise ValueError("pepper must be at least 16 bytes; use secrets.token_hex(32)")
        #: Recorded with every key; with a pepper it also names which pepper.
        self.hash_scheme = hash_scheme(pepper)
        self._pepper = pepper
        self._touch_every: float = (
            math.inf
            if last_used_resolution is None
            else positive("last_used_resolution", last_used_resolution).total_seconds()
        )
        self._touched: dict[str, float] = {}
        self._clock = clock
        #: The manager's clock (POSIX time), shared with the request pipeline.
        self.clock = clock
        # A wrapper (CachedStore) has the methods whether or not its inner store counts.
        if (
            counters is None
            and isinstance(self.store, CounterStore)
            and getattr(self.store, "keeps_counters", True)
        ):
            counters = self.store
        if counters is not None and not isinstance(counters, CounterStore):
            raise TypeError(f"counters must follow the CounterStore contract, got {counters!r}")
        #: Charges requests to rate limits and quotas; None if there is no counter store.
        self.limiter = None if counters is None else Limiter(counters)
        self._async_counters = counters if isinstance(counters, AsyncCounterStore) else None
        self._own_counters: KeyStore | None = None
        self._throttles: dict[str, FailureThrottle] = {}
        #: Counts requests per key for :meth:`usage`; None if off or the store keeps no counts.
        self.usage_recorder = (
            UsageRecorder(self.store, clock=clock)
            if record_usage and isinstance(self.store, UsageStore)
            else None
        )
        #: The ``Link`` field sent with the deprecation fields of a replaced key, if any.
        self.deprecation_link: tuple[tuple[str, str], ...] = ()
        if deprecation_link is not None:
            if not isinstance(deprecation_link, str) or not _LINK_URL.fullmatch(deprecation_link):
                raise ValueError(
                    f"deprecation_link must be an http(s) URL, got {deprecation_link!r}"
                )
            self.deprecation_link = (("Link", f'<{deprecation_link}>; rel="deprecation"'),)
        # Asked once: a Protocol isinstance check costs more than a whole key check. A
        # subclass that overrides check alone must decide async checks too, so acheck then
        # calls it inline.
        self._async_store = (
            self.store
            if isinstance(self.store, AsyncKeyStore) and not _overrides_check_alone(type(self))
            else None
        )

    def __repr__(self) -> str:
        return f"APIKeyManager(store={self.store!r}, prefix={self.format.prefix!r})"

    @classmethod
    def from_url(
        cls, url: str | None = None, *, counters: str | None = None, **options: Any
    ) -> APIKeyManager:
        """Build a manager over ``store_from_url(url)`` (default ``$KEYGUARD_STORE``).

        ``counters`` is the URL of a separate counter store (default
        ``$KEYGUARD_COUNTERS``; unset: the key store keeps the counters).
        """
        from .stores import store_from_url

        counters = counters or os.environ.get(COUNTERS_ENV) or None
        counter_store = None if counters is None else store_from_url(counters)
        if counter_store is not None and not isinstance(counter_store, CounterStore):
            raise ValueError(f"the store at {COUNTERS_ENV} cannot keep counters")
        manager = cls(store_from_url(url), counters=counter_store, **options)
        manager._own_counters = counter_store
        return manager

    def close(self) -> None:
        """Write the usage counts still buffered, then close the store.

        A counter store the manager opened itself (``from_url(counters=...)``) is closed
        too; one passed in is the caller's to close.
        """
        if self.usage_recorder is not None:
            self.usage_recorder.close()
        self.store.close()
        if self._own_counters is not None:
            self._own_counters.close()

    def digest(self, key: str) -> str:
        """Return the digest the store keeps for ``key`` under this manager's scheme.

        A key of an accepted imported form is first hashed as its source stored it (see
        ``accept_imported``), since that stored hash is all an import had to digest.
        """
        if self._drf_form is not None and self._drf_form.fullmatch(key) is not None:
            return digest_key(_drf.stored_hash(key), self._pepper)
        return digest_key(key, self._pepper)

    # -- issuing -----------------------------------------------------------------------

    def create_key(
        self,
        metadata: Mapping[str, Any] | None = None,
        /,
        *,
        expires_in: timedelta | None = None,
        expires_at: datetime | None = None,
        prefix: str | None = None,
        actor: str | None = None,
        **fields: Any,
    ) -> tuple[str, KeyInfo]:
        """Issue a key and return it with its record; the key is never stored or shown again.

        Metadata comes as a dict, as keyword fields, or both (a field given twice is an
        error). It must hold a non-empty string ``user_id``; ``permissions`` (a list of
        strings) become the key's scopes. ``prefix`` picks one of the accepted prefixes
        (default: the manager's own). Nothing is stored if anything is invalid.

        ``actor`` names who made the key in its ``created`` event (see :meth:`events`); it
        is never metadata, so a metadata field named ``actor`` must come in the dict.
        """
        if metadata is not None and not isinstance(metadata, Mapping):
            raise TypeError(f"metadata must be a dict, not {type(metadata).__name__}")
        merged = dict(metadata or {})
        for name in fields.keys() & merged.keys():
            raise TypeError(f"metadata field {name!r} given both in the dict and as a keyword")
        for name in LINEAGE_FIELDS & (fields.keys() | merged.keys()):
            raise TypeError(f"metadata field {name!r} is kept by keyguard for rotations")
        return self._create(
            {**merged, **fields}, expires_in, expires_at, prefix, check_actor(actor)
        )

    def _create(
        self,
        metadata: dict[str, Any],
        expires_in: timedelta | None,
        expires_at: datetime | None,
        prefix: str | None,
        actor: str,
    ) -> tuple[str, KeyInfo]:
        clean = check_metadata(metadata)
        if expires_in is not None and expires_at is not None:
            raise TypeError("give expires_in or expires_at, not both")
        now = self._clock()
        expiry: datetime | None = None
        if expires_in is not None:
            expiry = deadline_after("expires_in", now, positive("expires_in", expires_in))
        elif expires_at is not None:
            expiry = expiry_at(expires_at, now)
        fmt = self.format if prefix is None else self._format_for(prefix)
        created = utc(now)
        for _ in range(_MAX_ATTEMPTS):
            key = fmt.generate()
            info = KeyInfo(
                key_id="key_" + secrets.token_hex(8),
                prefix=fmt.prefix,
                hint=mask_key(key, fmt.prefix),
                user_id=clean["user_id"],
                metadata=clean,
                created_at=created,
                expires_at=expiry,
                digest=self.digest(key),
                hash_scheme=self.hash_scheme,
            )
            if self.store.add(info):
                logger.info(
                    "created key %s (%s) for user %r", info.key_id, info.hint, info.user_id
                )
                # Stamped with the record's own created_at: the same time, one datetime.
                self._emit("created", info, created_changes(info), actor, at=created)
                return key, info
            logger.warning("key collision on %s; drawing another key", info.hint)
        raise KeyguardError(f"could not draw a unique key in {_MAX_ATTEMPTS} attempts")

    def _format_for(self, prefix: str) -> KeyFormat:
        """The accepted format with ``prefix``: issuing a key its own checks refuse is a bug."""
        for fmt in self.formats:
            if fmt.prefix == prefix:
                return fmt
        validate_prefix(prefix)
        raise ValueError(
            f"this manager does not accept keys with prefix {prefix!r}; add it to accept_prefixes"
        )

    def generate_key(
        self,
        metadata: Mapping[str, Any] | None = None,
        /,
        *,
        expires_in: timedelta | None = None,
        expires_at: datetime | None = None,
        prefix: str | None = None,
        actor: str | None = None,
        **fields: Any,
    ) -> str:
        """Issue a key for ``metadata`` and return it (see :meth:`create_key`; ``actor`` is
        reserved there too)."""
        key, _ = self.create_key(
            metadata,
            expires_in=expires_in,
            expires_at=expires_at,
            prefix=prefix,
            actor=actor,
            **fields,
        )
        return key

    # -- checking ----------------------------------------------------------------------

    def is_well_formed(self, key: object) -> TypeGuard[str]:
        """Whether ``key`` has the form of a key this manager accepts; pure, never raises.

        Its own forms, and the imported forms of ``accept_imported``.
        """
        if self._is_native(key):
            return True
        form = self._drf_form
        return form is not None and type(key) is str and form.fullmatch(key) is not None

    def _is_native(self, key: object) -> TypeGuard[str]:
        """Whether ``key`` has one of this manager's own forms (prefix, body, checksum)."""
        if type(key) is not str or self._form.fullmatch(key) is None:
            return False
        return not self._checksum or has_valid_checksum(key)

    def _digest_of(self, key: object) -> str:
        """The digest to look ``key`` up by; ``malformed`` if it has no accepted form.

        The form check of :meth:`check`: a string of no accepted form never reaches the
        store. A native key is tested first, so it never pays for the imported forms.
        """
        if self._is_native(key):
            return digest_key(key, self._pepper)
        form = self._drf_form
        if form is None or type(key) is not str or form.fullmatch(key) is None:
            raise InvalidKeyError("the API key is malformed", Reason.MALFORMED)
        return digest_key(_drf.stored_hash(key), self._pepper)

    def check(self, key: object) -> KeyInfo:
        """Return the record of an active ``key``, or raise :class:`~keyguard.InvalidKeyError`.

        The one place a key is judged: :meth:`verify`, :meth:`validate_key` and every
        middleware call it, so a subclass that overrides it changes them all. The steps, in
        order: the form check (a string that is not of this manager's form is ``malformed``
        without touching the store), the digest, one store lookup, then revocation and
        expiry. A failing store raises :class:`~keyguard.StoreError`. A key of an imported
        form (``accept_imported``) takes the same steps, its digest computed as
        :meth:`digest` says.
        """
        info = self.store.get(self._digest_of(key))
        now = self._clock()
        if info is None or now >= info.valid_until:
            raise _refusal(info)
        # Only a record whose last recorded use is stale costs more than this compare.
        if now - info.last_used_ts >= self._touch_every and self._due_for_touch(info, now):
            try:
                self.store.touch(info.digest, utc(now))
            except StoreError as e:
                _touch_failed(info, e)
        return info

    async def acheck(self, key: object) -> KeyInfo:
        """:meth:`check` for event loops: awaits the store's async twin when it has one.

        A store without one (memory, SQLite) answers without blocking, so :meth:`check`
        runs inline. The steps are :meth:`check`'s, with the two store calls awaited. A
        subclass that overrides :meth:`check` but not this method has its ``check`` run
        here too, inline, so its decision holds on every path; over a network store that
        blocks the event loop for the round trip, so override ``acheck`` as well there.
        """
        store = self._async_store
        if store is None:
            return self.check(key)
        info = await store.aget(self._digest_of(key))
        now = self._clock()
        if info is None or now >= info.valid_until:
            raise _refusal(info)
        if now - info.last_used_ts >= self._touch_every and self._due_for_touch(info, now):
            try:
                await store.atouch(info.digest, utc(now))
            except StoreError as e:
                _touch_failed(info, e)
        return info

    def verify(self, key: object) -> Verification:
        """Check ``key`` and say why it is or is not valid; never raises for bad input.

        A failing store raises :class:`~keyguard.StoreError`.
        """
        try:
            return Verification(True, Reason.OK, self.check(key))
        except InvalidKeyError as e:
            return Verification(False, e.reason, e.info)

    async def averify(self, key: object) -> Verification:
        """:meth:`verify` for event loops (through :meth:`acheck`)."""
        try:
            return Verification(True, Reason.OK, await self.acheck(key))
        except InvalidKeyError as e:
            return Verification(False, e.reason, e.info)

    def _due_for_touch(self, info: KeyInfo, now: float) -> bool:
        """Whether to write ``last_used_at`` now, for a record whose last use is stale.

        The record says when the key was last recorded as used (by any process);
        ``_touched`` remembers this process's recent attempts, so that a write that failed
        or was skipped (a busy SQLite file) is retried once per interval, not per request.
        """
        every = self._touch_every
        if every == math.inf:
            return False
        touched = self._touched
        last = touched.get(info.digest)
        if last is not None and now - last < every:
            return False
        if len(touched) >= _TOUCH_CACHE_LIMIT:
            touched.clear()
        touched[info.digest] = now
        return True

    def validate_key(self, key: object) -> bool:
        """Return True if ``key`` was issued and is neither revoked nor expired.

        Like :meth:`verify`, it never raises for bad input; a failing store raises
        :class:`~keyguard.StoreError`.
        """
        try:
            self.check(key)
        except InvalidKeyError:
            return False
        return True

    def get_metadata(self, key: object) -> dict[str, Any] | None:
        """Return a copy of a valid key's metadata, or None for any invalid key."""
        result = self.verify(key)
        return thaw(result.key.metadata) if result.ok and result.key else None

    def get_key_info(self, key_id: str) -> KeyInfo | None:
        """Return the record with this ``key_id`` (any status), for operators."""
        if not isinstance(key_id, str):
            return None
        return self.store.get_by_id(key_id)

    def list_keys(
        self,
        user_id: str | None = None,
        *,
        include_inactive: bool = False,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[KeyInfo]:
        """Return a user's active keys (or every user's, with ``user_id=None``), oldest first.

        Keys are ordered by ``(created_at, key_id)``. ``include_inactive=True`` adds revoked
        and expired keys, whose records are kept.

        :param limit: return at most this many keys (a page); None returns every one, which
            for a large store holds them all in memory: prefer :meth:`iter_keys` then.
        :param after: a page's cursor, the ``key_id`` of the last key of the previous page;
            a walk that passes it on never skips or repeats a key, even while keys are
            added or revoked. A ``key_id`` the store does not hold raises ``ValueError``.
        """
        _check_listing(user_id, after)
        if limit is None:
            page = self.store.list_keys(user_id, after=after)
            return page if include_inactive else self._active(page)
        # A page of the store may hold few active keys: read on until the page is full.
        limit = _page_size("limit", limit)
        found: list[KeyInfo] = []
        while len(found) < limit:
            page = self.store.list_keys(user_id, limit=limit, after=after)
            found += page if include_inactive else self._active(page)
            if len(page) < limit:
                break
            after = page[-1].key_id
        return found[:limit]

    def iter_keys(
        self,
        user_id: str | None = None,
        *,
        include_inactive: bool = False,
        page_size: int = DEFAULT_PAGE_SIZE,
    ) -> Iterator[KeyInfo]:
        """Yield the keys :meth:`list_keys` returns, reading the store a page at a time.

        Memory stays bounded by ``page_size`` however many keys there are, and each key is
        yielded once even while keys are added or revoked meanwhile (a key added during
        the walk is yielded if it sorts after the page being read).
        """
        _check_listing(user_id)
        return self._walk(user_id, include_inactive, _page_size("page_size", page_size))

    def expiring(self, within: timedelta, user_id: str | None = None) -> Iterator[KeyInfo]:
        """Yield the active keys (of one user, or of all) that expire within ``within``, in
        listing order (oldest first), reading the store a page at a time.

        For warnings before keys stop working (``keyguard list --expiring 14d``). A key
        that never expires is never yielded.
        """
        deadline = self._clock() + positive("within", within).total_seconds()
        return (
            info
            for info in self.iter_keys(user_id)
            if info.expires_at is not None and info.expires_at.timestamp() <= deadline
        )

    def _walk(
        self, user_id: str | None, include_inactive: bool, page_size: int
    ) -> Iterator[KeyInfo]:
        after: str | None = None
        while True:
            page = self.store.list_keys(user_id, limit=page_size, after=after)
            yield from page if include_inactive else self._active(page)
            if len(page) < page_size:
                return
            after = page[-1].key_id

    def _active(self, records: list[KeyInfo]) -> list[KeyInfo]:
        now = self._clock()
        return [r for r in records if r.status(now) == "active"]

    # -- revoking and rotating ---------------------------------------------------------

    def _revoke(self, info: KeyInfo | None, actor: str) -> bool:
        if info is None or info.revoked_at is not None or info.is_expired(self._clock()):
            return False
        at = utc(self._clock())
        revoked = self.store.revoke(info.digest, at)
        if revoked:
            logger.info("revoked key %s (%s)", info.key_id, info.hint)
            self._emit("revoked", info, {"revoked_at": at}, actor)
        return revoked

    def revoke_key(self, key: object, *, actor: str | None = None) -> bool:
        """Revoke ``key``; True if it was active and is now revoked, else False.

        ``actor`` names who revoked it in its ``revoked`` event; no event is recorded
        when nothing was revoked.
        """
        actor = check_actor(actor)
        if not self.is_well_formed(key):
            return False
        return self._revoke(self.store.get(self.digest(key)), actor)

    def revoke_by_id(self, key_id: str, *, actor: str | None = None) -> bool:
        """Revoke the key with this ``key_id`` (shown in listings); True if it was active."""
        actor = check_actor(actor)
        return self._revoke(self.get_key_info(key_id), actor)

    def rotate_key(
        self,
        key: object,
        *,
        grace: timedelta = timedelta(hours=24),
        expires_in: timedelta | None = None,
        actor: str | None = None,
    ) -> str:
        """Issue a replacement for an active ``key``; the old key stops working after ``grace``.

        The new key has the same metadata and family (so it draws on the old key's rate
        limits and quota). Its lifetime is ``expires_in`` if given, else the
        old key's original lifetime (none if it had none). ``grace=timedelta(0)`` revokes the
        old key at once. An invalid ``key`` raises :class:`~keyguard.InvalidKeyError`.

        Two events name ``actor``: ``created`` for the new key (with ``rotated_from``), then
        ``rotated`` for the old one (``into``, and its new ``expires_at``: None if revoked).
        """
        actor = check_actor(actor)
        result = self.verify(key)
        if not result.ok or result.key is None:
            raise InvalidKeyError(f"cannot rotate {mask_key(key)}: {result.reason}", result.reason)
        return self._rotate(result.key, grace, expires_in, actor)

    def rotate_by_id(
        self,
        key_id: str,
        *,
        grace: timedelta = timedelta(hours=24),
        expires_in: timedelta | None = None,
        actor: str | None = None,
    ) -> str:
        """:meth:`rotate_key` for the key with this ``key_id``."""
        actor = check_actor(actor)
        return self._rotate(self._active_record(key_id, "rotate"), grace, expires_in, actor)

    def _rotate(
        self, old: KeyInfo, grace: timedelta, expires_in: timedelta | None, actor: str
    ) -> str:
        if not isinstance(grace, timedelta) or grace < timedelta(0):
            shown = grace if isinstance(grace, timedelta) else type(grace).__name__
            raise ValueError(f"grace must be a non-negative timedelta, got {shown}")
        for _ in range(_MAX_ATTEMPTS):
            # Read afresh (never from a cache): the record written back must be the current one.
            current = self._active_record(old.key_id, "rotate")
            now = self._clock()
            self._refuse_second_rotation(current, now)
            lifetime = expires_in
            if lifetime is None and current.expires_at is not None:
                lifetime = current.expires_at - current.created_at
            # Checked before anything is issued, so a bad grace leaves no orphan behind.
            deadline = None if grace == timedelta(0) else deadline_after("grace", now, grace)
            if deadline is None or (current.expires_at and current.expires_at <= deadline):
                deadline = current.expires_at
            accepted = any(f.prefix == current.prefix for f in self.formats)
            prefix = current.prefix if accepted else None
            # The family carries the key's rate-limit and quota budget across rotations.
            new_key, new = self._create(rotation_metadata(current), lifetime, None, prefix, actor)
            # One compare-and-set marks the old key replaced and sets its deadline: a
            # revocation or update racing the rotation is never undone.
            marked = dataclasses.replace(
                current,
                metadata=deprecated_metadata(current, new.key_id, now),
                expires_at=deadline,
            )
            if self.store.update(marked, current):
                ends = deadline
                if grace == timedelta(0):
                    self.store.revoke(current.digest, utc(now))
                    ends = None
                logger.info("rotated key %s into %s", current.key_id, new.key_id)
                self._emit("rotated", current, {"into": new.key_id, "expires_at": ends}, actor)
                return new_key
            # The old key changed meanwhile: withdraw the replacement nobody has seen yet,
            # and decide again from the record as it now is.
            self._revoke(new, actor)
        raise KeyguardError(f"{old.key_id} kept changing during the rotation; try again")

    def _active_record(self, key_id: str, doing: str) -> KeyInfo:
        """The current record of an active key, or the InvalidKeyError saying why not."""
        info = self.get_key_info(key_id)
        status = "not_found" if info is None else info.status(self._clock())
        if info is None or status != "active":
            shown = key_id if _KEY_ID.fullmatch(str(key_id)) else mask_key(key_id)
            raise InvalidKeyError(f"cannot {doing} {shown!r}: {status}", Reason(status), info)
        return info

    def _refuse_second_rotation(self, info: KeyInfo, now: float) -> None:
        """A key already rotated into a live successor is not rotated again: one family
        has one line of generations, and the successor is the key to rotate."""
        successor = None if info.replaced_by is None else self.get_key_info(info.replaced_by)
        if successor is not None and successor.status(now) == "active":
            raise KeyguardError(
                f"{info.key_id} was already rotated into {successor.key_id}:"
                " rotate that key (or revoke it first)"
            )

    def lineage(self, key_id: str) -> list[KeyInfo]:
        """Every generation of the key with this ``key_id``: the keys of its family
        (rotated from one another), oldest first, revoked and expired ones included.

        Generations are ordered by how many rotations separate them from the first key,
        not by creation time, which two quick rotations can share.
        """
        info = self._record(key_id)
        family = {
            k.key_id: k
            for k in self.iter_keys(info.user_id, include_inactive=True)
            if k.family_id == info.family_id
        }

        def depth(key: KeyInfo) -> int:
            steps = 0
            while key.rotated_from in family and steps < len(family):
                key = family[key.rotated_from]
                steps += 1
            return steps

        return sorted(family.values(), key=lambda k: (depth(k), k.created_at, k.key_id))

    # -- updating ----------------------------------------------------------------------

    def update_key(
        self,
        key_id: str,
        *,
        scopes: Iterable[str] | Unset | None = UNSET,
        metadata: Mapping[str, Any] | None = None,
        expires_at: datetime | Unset | None = UNSET,
        expires_in: timedelta | None = None,
        name: str | Unset | None = UNSET,
        rate_limits: Iterable[str] | Unset | None = UNSET,
        quota: int | str | Unset | None = UNSET,
        allowed_ips: Iterable[str] | Unset | None = UNSET,
        allow_widen: bool = False,
        actor: str | None = None,
    ) -> KeyInfo:
        """Change the fields given of the key with ``key_id``, keeping its secret and id;
        return its new record.

        A field given as None is removed (``scopes=None``: no scopes; ``expires_at=None``:
        never expires; ``quota=None``: no quota). ``metadata`` sets each of its fields, or
        removes it when the value is None; ``user_id`` cannot change. Adding scopes,
        allowing more networks or bringing an expired key back raises ``PermissionError``
        unless ``allow_widen=True``: the secret stays the same, so whoever holds it gains
        what the update grants (see :mod:`keyguard._lifecycle`).

        The write is a compare-and-set against the record the change was decided on: an
        update racing a revocation cannot bring the key back, and one racing another
        update is decided again on the record as the other left it (so neither undoes the
        other, nor slips a widening past the check). Every worker sees the change as it
        sees a revocation: at once on local stores, within a second through
        ``CachedStore`` with push invalidation (its ``ttl`` otherwise). A missing or
        revoked key raises
        :class:`~keyguard.InvalidKeyError`; nothing is written on any error. An
        ``updated`` event names ``actor`` and each changed field as ``[old, new]``.
        """
        actor = check_actor(actor)
        update = Update.given(
            scopes=scopes,
            metadata=metadata,
            expires_at=expires_at,
            expires_in=expires_in,
            name=name,
            rate_limits=rate_limits,
            quota=quota,
            allowed_ips=allowed_ips,
        )
        for _ in range(_MAX_ATTEMPTS):
            # Read afresh (never from a cache): the compare-and-set compares with it.
            old = self.get_key_info(key_id)
            if old is None or old.revoked_at is not None:
                status = "not_found" if old is None else "revoked"
                shown = key_id if _KEY_ID.fullmatch(str(key_id)) else mask_key(key_id)
                raise InvalidKeyError(f"cannot update {shown!r}: {status}", Reason(status), old)
            clean, expiry, changes = update.plan(old, self._clock(), allow_widen)
            if not changes:
                return old
            new = dataclasses.replace(old, metadata=clean, expires_at=expiry)
            if self.store.update(new, old):
                logger.info("updated key %s (%s): %s", new.key_id, new.hint, ", ".join(changes))
                self._emit("updated", new, changes, actor)
                return new
        raise KeyguardError(f"{key_id} kept changing during the update; try again")

    # -- usage limits ------------------------------------------------------------------

    def charge(self, info: KeyInfo, default_rates: tuple[Rate, ...] = ()) -> Usage | None:
        """Charge one admitted request to the key's rate limits and quota.

        Returns None when no limit applies (the key has none and ``default_rates`` is
        empty), else the :class:`~keyguard.limits.Usage` saying whether the request is
        within its limits. A failing counter store, or none at all, raises
        :class:`~keyguard.StoreError`.
        """
        if not (info.rate_limits or default_rates or info.quota):
            return None
        limiter = self.limiter
        if limiter is None:
            raise self._no_counters()
        return limiter.take(info, self._clock(), default_rates)

    async def acharge(self, info: KeyInfo, default_rates: tuple[Rate, ...] = ()) -> Usage | None:
        """:meth:`charge` for event loops: awaits the counter store's async twin if it has one."""
        counters = self._async_counters
        if counters is None:
            return self.charge(info, default_rates)
        if not (info.rate_limits or default_rates or info.quota):
            return None
        return await self._limiter().atake(info, self._clock(), counters, default_rates)

    def failure_throttle(self, rate: Rate) -> FailureThrottle:
        """The failed-check throttle for ``rate``, one per manager and process, so every
        middleware and route using this manager counts an address's failures together."""
        throttle = self._throttles.get(rate.text)
        if throttle is None:
            throttle = self._throttles.setdefault(rate.text, FailureThrottle(rate))
        return throttle

    def refund(self, info: KeyInfo, charged: tuple[Bucket, ...], code: str) -> None:
        """Undo an admission that a route then refused with ``code`` (a missing scope):
        give back what the request was ``charged`` and count it as refused, not admitted."""
        self._recount(info, code)  # first, so a failing counter store cannot skip it
        if charged:
            self._limiter().refund(charged, self._clock())

    async def arefund(self, info: KeyInfo, charged: tuple[Bucket, ...], code: str) -> None:
        """:meth:`refund` for event loops."""
        self._recount(info, code)
        counters = self._async_counters
        if charged and counters is not None:
            await self._limiter().arefund(charged, self._clock(), counters)
        elif charged:
            self._limiter().refund(charged, self._clock())

    def _recount(self, info: KeyInfo, code: str) -> None:
        recorder = self.usage_recorder
        if recorder is not None:
            now = self._clock()
            recorder.record(info.key_id, "ok", now, -1)
            recorder.record(info.key_id, code, now)

    def limit_headers(
        self, info: KeyInfo, default_rates: tuple[Rate, ...] = ()
    ) -> tuple[tuple[str, str], ...]:
        """The RateLimit fields of a key that is refused for another reason (a missing
        scope), read without charging; empty when no limit applies."""
        limiter = self.limiter
        if limiter is None or not (info.rate_limits or default_rates or info.quota):
            return ()
        return limiter.headers(info, self._clock(), default_rates)

    async def alimit_headers(
        self, info: KeyInfo, default_rates: tuple[Rate, ...] = ()
    ) -> tuple[tuple[str, str], ...]:
        """:meth:`limit_headers` for event loops."""
        limiter = self.limiter
        counters = self._async_counters
        if counters is None or limiter is None:
            return self.limit_headers(info, default_rates)
        if not (info.rate_limits or default_rates or info.quota):
            return ()
        return await limiter.aheaders(info, self._clock(), counters, default_rates)

    def _record(self, key_or_id: object) -> KeyInfo:
        """The record named by a key or a key_id (any status), or a KeyError."""
        info: KeyInfo | None
        if isinstance(key_or_id, str) and _KEY_ID.fullmatch(key_or_id):
            info = self.get_key_info(key_or_id)
        else:
            info = None
            if self.is_well_formed(key_or_id):
                info = self.store.get(self.digest(key_or_id))
        if info is None:
            shown = key_or_id if _KEY_ID.fullmatch(str(key_or_id)) else mask_key(key_or_id)
            raise KeyError(f"no key {shown!r}")
        return info

    def _limiter(self) -> Limiter:
        """The limiter, or a StoreError (answered 503) when no store keeps counters: a key
        with limits is never let through unlimited by accident."""
        if self.limiter is None:
            raise self._no_counters()
        return self.limiter

    def _no_counters(self) -> StoreError:
        return StoreError(
            f"no counter store: {self.store!r} keeps no counters, so rate limits and"
            " quotas cannot be applied; pass counters= or set KEYGUARD_COUNTERS"
        )

    def remaining(self, key: object) -> int | None:
        """The credits left in the quota of a key (the key itself or its ``key_id``).

        None if the key has no quota. The count is shared by every key of the family
        (rotated keys) and every worker using the counter store.
        """
        info = self._record(key)
        if info.quota is None:
            return None
        return self._limiter().remaining(info, self._clock())

    def add_credits(self, key_id: str, credits: int, *, actor: str | None = None) -> int:
        """Top up the quota of the key with ``key_id`` by ``credits``; return the credits left.

        For a quota refilled each period, the credits last until the next refill. The
        ``credited`` event names ``actor``.
        """
        actor = check_actor(actor)
        if not isinstance(credits, int) or isinstance(credits, bool) or credits <= 0:
            raise ValueError(f"credits must be a positive whole number, got {credits!r}")
        info = self._record(key_id)
        left = self._limiter().add_credits(info, credits, self._clock())
        logger.info("added %d credits to %s; %d left", credits, info.key_id, left)
        self._emit("credited", info, {"credits": credits, "remaining": left}, actor)
        return left

    # -- usage counts ------------------------------------------------------------------

    def usage(
        self,
        key_id: str,
        *,
        since: datetime | timedelta | None = None,
        until: datetime | None = None,
        step: str = "hour",
        family: bool = True,
    ) -> list[UsagePoint]:
        """The usage of the key with this ``key_id``: one point per ``step``, zeros included.

        Counts are recorded per key. With ``family=True`` (the default) they are summed
        over every generation of a rotated key, so usage follows the key across rotations
        whichever generation is named; ``family=False`` gives this key's own counts (is
        the old key still in use during its grace period?).

        See :func:`keyguard.usage.usage` for ``since``, ``until`` and ``step``. An unknown
        ``key_id`` raises :class:`ValueError`; a store that keeps no counts, ``TypeError``.
        Counts recorded by other processes appear within a second (their next flush).
        """
        if not isinstance(self.store, UsageStore):
            raise TypeError(f"{self.store!r} keeps no usage counts")
        info = self.get_key_info(key_id)
        if info is None:
            shown = key_id if _KEY_ID.fullmatch(str(key_id)) else mask_key(key_id)
            raise ValueError(f"no key with id {shown!r}")
        if self.usage_recorder is not None:
            self.usage_recorder.flush()  # this process's latest counts are included
        members = [info.key_id]
        if family and (info.rotated_from or info.replaced_by):
            members = [k.key_id for k in self.lineage(info.key_id)]
            until = until or utc(self._clock())  # one set of buckets for every generation
        series = [
            usage(self.store, k, since=since, until=until, step=step, clock=self._clock)
            for k in members
        ]
        return (
            series[0] if len(series) == 1 else [sum_points(p) for p in zip(*series, strict=True)]
        )

    # -- audit events ------------------------------------------------------------------

    def events(
        self,
        key_id: str | None = None,
        *,
        since: datetime | timedelta | None = None,
        limit: int = 100,
    ) -> list[KeyEvent]:
        """The audit events of the key ``key_id`` (None: of every key), newest first.

        :param since: only events at or after this time: a timezone-aware datetime, or a
            timedelta meaning that long ago.
        :param limit: at most this many events (the newest).

        A store that keeps no events raises ``TypeError``; a failing one,
        :class:`~keyguard.StoreError`.
        """
        if key_id is not None and not isinstance(key_id, str):
            raise TypeError(f"key_id must be a str, not {type(key_id).__name__}")
        start = events_since(since, self._clock())
        limit = _page_size("limit", limit)
        if self._event_store is None:
            raise TypeError(f"{self.store!r} keeps no audit events")
        return self._event_store.read_events(key_id, start, limit)

    def _emit(
        self,
        action: str,
        info: KeyInfo,
        changes: Mapping[str, Any],
        actor: str,
        at: datetime | None = None,
    ) -> None:
        """Record that ``info``'s key was changed (``action``, ``changes``) by ``actor``, at
        ``at`` (default: now).

        Called right after the change, which the store has made: the event is written
        after it, not in its transaction. A store that fails to write it is logged at
        ERROR and the change stands; then ``on_event`` is called, and what it raises is
        logged too. ``changes`` hold JSON values and datetimes (written in ISO 8601);
        for ``"updated"`` they map each field to ``[old, new]`` (see
        :func:`keyguard._lifecycle.plan_update`).
        """
        if action not in ACTIONS:
            raise ValueError(f"unknown event action {action!r}")
        if at is None:
            at = utc(self._clock())
        event = KeyEvent(at, info.key_id, action, actor, jsonable(changes))
        if self._event_store is not None:
            try:
                self._event_store.add_event(event)
            except StoreError as e:
                logger.error("could not record the %s event of %s: %s", action, info.key_id, e)
            except Exception:
                logger.exception("could not record the %s event of %s", action, info.key_id)
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                logger.exception("on_event failed for the %s event of %s", action, info.key_id)


def _overrides_check_alone(cls: type[APIKeyManager]) -> bool:
    """Whether ``cls`` finds ``check`` earlier in its MRO than ``acheck`` (a subclass or a
    mixin that overrides ``check`` but not ``acheck``)."""
    mro = cls.__mro__
    check_owner = next(c for c in mro if "check" in vars(c))
    acheck_owner = next(c for c in mro if "acheck" in vars(c))
    return mro.index(check_owner) < mro.index(acheck_owner)
