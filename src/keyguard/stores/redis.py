"""``RedisStore``: keys in a Redis server shared by every worker and machine (redis-py).

Layout under a namespace ``ns`` (so two apps can share one Redis):

- ``ns:key:<digest>``: one string per record, tab-separated fields behind a format tag
  (times as integer microseconds since the epoch, metadata as JSON; see
  :mod:`keyguard.stores._redis_record`); never given a TTL, so an expired key still
  answers ``expired``;
- ``ns:ids``: a hash ``key_id -> digest``;
- ``ns:user:<user_id>`` and ``ns:all``: sorted sets of digests scored by creation time
  (microseconds), which a listing reads a page at a time;
- ``ns:counter:<name>``: a rate-limit or quota counter, a decimal string given a TTL
  when it may be forgotten (see :mod:`keyguard._counting`);
- ``ns:usage:<step>:<start>:<key_id>``: one hash of usage counts per bucket, ``code ->
  count``, expiring its step's retention (and one step) after its last write;
- ``ns:events`` and ``ns:events:key:<key_id>``: the audit events, of every key and of one,
  sorted sets scored by the event's time (microseconds) whose members are the event as
  JSON after a 20-digit sequence number from ``ns:events:seq``, which makes each member
  unique and orders events of the same microsecond by when they were added; never given
  a TTL (audit keeps everything);
- ``ns:meta``: ``schema_version``; and the pub/sub channel ``ns:changes``, which carries
  the digest of every record that is added, revoked or given a new expiry.

Every write is one Lua script, so "add if absent" and "revoke if active" are decided by
the server atomically, and a read (one ``GET``) is one round trip. redis-py is imported
only when a store is built (``pip install 'keyguard[redis]'``).

Schema version 1 kept each record as a hash. A record still in that form is upgraded where
it is met: a script that writes it upgrades it first, and a read that meets one (``GET``
answers ``WRONGTYPE``, ``MGET`` nil) upgrades it, then, once per process, upgrades the
whole namespace (:meth:`RedisStore._migrate`).

The module holds the sync store, its async twin and the Lua scripts both run, for the
keys, the counters, the usage counts, the audit events and the digest listing, so it is
longer than most: splitting the twins or the key families apart would split one layout
across files (the record's encoding alone lives in ``_redis_record``).
"""

from __future__ import annotations

import functools
import json
import math
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple, cast

from .._counting import Bucket
from .._frozen import loads
from ..events import KeyEvent
from ..exceptions import StoreError
from ..records import KeyInfo
from ._aio import PerLoop
from ._listener import POLL_SECONDS, Heartbeat, Listener
from ._redact import redact_url
from ._redis_record import (
    RECORD_LUA,
    UPGRADE,
    created_of,
    decode,
    encode,
    from_us,
    metadata_json,
    us,
)
from .base import (
    USAGE_RETENTION,
    USAGE_STEPS,
    UsageRow,
    listing_order,
    page_size_checked,
    unknown_cursor,
)

if TYPE_CHECKING:
    import redis
    import redis.asyncio

__all__ = ["DEFAULT_NAMESPACE", "SCHEMA_VERSION", "RedisStore"]

SCHEMA_VERSION = 2
DEFAULT_NAMESPACE = "keyguard"
_NAMESPACE = re.compile(r"[A-Za-z0-9_.:{}\-]{1,64}")
#: Records upgraded per script call when a namespace of schema version 1 is migrated.
_MIGRATION_BATCH = 500
#: The listener's PING payload, which tells its heartbeat from other pings in MONITOR.
_HEARTBEAT_MESSAGE = "keyguard-heartbeat"

# KEYS: record, ids, user set, all set, meta.  ARGV: digest, key_id, score, channel, record.
_ADD = f"""
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then
  return 0
end
redis.call('SET', KEYS[1], ARGV[5])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[1])
redis.call('HSETNX', KEYS[5], 'schema_version', '{SCHEMA_VERSION}')
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 1
"""
# The record scripts below read a record with ``fields`` (RECORD_LUA), which upgrades one
# still a hash (schema version 1), and write it back whole with the changed fields:
# 2 created_at, 3 expires_at, 4 revoked_at, 5 last_used_at, 11 metadata.
# KEYS: record.  ARGV: revoked_at, channel, digest.
_REVOKE = f"""{RECORD_LUA}
local record = fields(KEYS[1], 5)
if not record or record[4] ~= '' then return 0 end
record[4] = ARGV[1]
redis.call('SET', KEYS[1], table.concat(record, '\t'))
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""
# KEYS: record.  ARGV: expires_at ('' for none), channel, digest.
_SET_EXPIRY = f"""{RECORD_LUA}
local record = fields(KEYS[1], 5)
if not record then return 0 end
record[3] = ARGV[1]
redis.call('SET', KEYS[1], table.concat(record, '\t'))
redis.call('PUBLISH', ARGV[2], ARGV[3])
return 1
"""
# KEYS: record.  ARGV: metadata, expires_at ('' for none), channel, digest, and the
# metadata and expires_at the record must still have (compare and set).
_UPDATE = f"""{RECORD_LUA}
local record = fields(KEYS[1], 10)
if not record or record[4] ~= '' then return 0 end
if record[11] ~= ARGV[5] or record[3] ~= ARGV[6] then return 0 end
record[3] = ARGV[2]
record[11] = ARGV[1]
redis.call('SET', KEYS[1], table.concat(record, '\t'))
redis.call('PUBLISH', ARGV[3], ARGV[4])
return 1
"""
# KEYS: record.  ARGV: last_used_at.  Never creates a record.
_TOUCH = f"""{RECORD_LUA}
local record = fields(KEYS[1], 5)
if record then
  record[5] = ARGV[1]
  redis.call('SET', KEYS[1], table.concat(record, '\t'))
end
return 0
"""

# keyguard._counting.apply and expiry, mirrored: take one unit from every bucket or none.
# Values are written and returned as strings of 17 digits: Lua would truncate a returned
# number to an integer. Expiry is relative to the caller's clock (PX), as ``now`` is.
# KEYS: the buckets.  ARGV: now, then interval, capacity, expires_at ('' for none) of each.
_CONSUME = """
local now = tonumber(ARGV[1])
local values, charged, taken = {}, {}, 1
for i = 1, #KEYS do
  local interval, capacity = tonumber(ARGV[3 * i - 1]), tonumber(ARGV[3 * i])
  local forget = tonumber(ARGV[3 * i + 1])
  local v = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  local new
  if interval > 0 then
    if v <= now then v = 0 end
    new = math.max(v, now) + interval
    if new - now > capacity + 1e-6 then taken = 0 end
  else
    if forget ~= nil and forget <= now then v = 0 end
    new = v + 1
    if new > capacity then taken = 0 end
  end
  values[i], charged[i] = v, new
end
if taken == 1 then values = charged end
local reply = {taken}
for i = 1, #KEYS do
  local text = string.format('%.17g', values[i])
  if taken == 1 then
    local forget = tonumber(ARGV[3 * i + 1])
    if tonumber(ARGV[3 * i - 1]) > 0 then forget = values[i] end
    if forget == nil then
      redis.call('SET', KEYS[i], text)
    elseif forget > now then
      local ms = string.format('%d', math.ceil((forget - now) * 1000))
      redis.call('SET', KEYS[i], text, 'PX', ms)
    else
      redis.call('DEL', KEYS[i])
    end
  end
  reply[i + 1] = text
end
return reply
"""
# KEYS: the bucket.  ARGV: delta, expires_at in milliseconds ('' for none).
_ADJUST = """
local value = redis.call('INCRBYFLOAT', KEYS[1], ARGV[1])
if ARGV[2] == '' then
  redis.call('PERSIST', KEYS[1])
else
  redis.call('PEXPIREAT', KEYS[1], ARGV[2])
end
return value
"""
# KEYS: all events, the key's events, the sequence.  ARGV: score, the event as JSON.
_ADD_EVENT = """
local member = string.format('%020d', redis.call('INCR', KEYS[3])) .. ARGV[2]
redis.call('ZADD', KEYS[1], ARGV[1], member)
redis.call('ZADD', KEYS[2], ARGV[1], member)
return 1
"""
#: Characters of the sequence number before an event's JSON.
_SEQUENCE_DIGITS = 20

_SCRIPTS = (
    ("add", _ADD),
    ("revoke", _REVOKE),
    ("set_expiry", _SET_EXPIRY),
    ("update", _UPDATE),
    ("touch", _TOUCH),
    ("upgrade", UPGRADE),
    ("consume", _CONSUME),
    ("adjust", _ADJUST),
)

#: Query parameters redis-py understands in a URL; any other one is refused, not ignored.
CLIENT_URL_PARAMETERS = frozenset(
    {
        "db",
        "socket_timeout",
        "socket_connect_timeout",
        "socket_keepalive",
        "retry_on_timeout",
        "max_connections",
        "timeout",
        "health_check_interval",
        "client_name",
        "protocol",
        "ssl_cert_reqs",
        "ssl_ca_certs",
        "ssl_certfile",
        "ssl_keyfile",
        "ssl_check_hostname",
        "ssl_min_version",
    }
)


def _import_redis() -> Any:
    try:
        import redis
        import redis.asyncio
    except ImportError as e:
        raise ImportError(
            "RedisStore needs the redis package: pip install 'keyguard[redis]'"
        ) from e
    return redis


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _expiry_text(info: KeyInfo) -> str:
    return "" if info.expires_at is None else us(info.expires_at)


def _wrong_type(error: Exception) -> bool:
    """Whether ``error`` is Redis refusing a string command on a record still a hash."""
    return str(error).startswith("WRONGTYPE")


def _decode_event(member: str | bytes) -> KeyEvent:
    """The event of a member of an events set: its JSON after the sequence number."""
    text = _text(member)[_SEQUENCE_DIGITS:]
    try:
        body = loads(text)
        return KeyEvent(
            at=from_us(str(body["at"])),
            key_id=body["key_id"],
            action=body["action"],
            actor=body["actor"],
            changes=body["changes"],
        )
    except (ValueError, TypeError, KeyError, OverflowError) as e:
        raise StoreError(f"a Redis event is corrupt: {e}: {text[:80]!r}") from e


@functools.lru_cache(maxsize=4096)
def _bucket_args(bucket: Bucket) -> tuple[str, str, str]:
    """A bucket's interval, capacity and expires_at ('' for none) as the consume script
    reads them; a plan reuses its buckets, so they are written once, not per charge."""
    forget = "" if bucket.expires_at is None else repr(float(bucket.expires_at))
    return repr(float(bucket.interval)), repr(float(bucket.capacity)), forget


def _charged(reply: Any) -> tuple[bool, list[float]]:
    """The consume script's reply: ``[taken, value, …]``, the values as strings."""
    return bool(reply[0]), [float(v) for v in reply[1:]]


def _decode_all(digests: Sequence[Any], values: Sequence[Any]) -> list[KeyInfo]:
    """The records of one MGET; a digest whose record is gone is left out."""
    records = [decode(_text(d), v) for d, v in zip(digests, values, strict=True)]
    return [r for r in records if r is not None]


def _unread(values: Sequence[Any]) -> list[int]:
    """Positions of an MGET's nils: records gone, or still hashes (MGET skips those)."""
    return [i for i, value in enumerate(values) if value is None]


def _after(records: list[KeyInfo], after: str) -> list[KeyInfo]:
    """Of the records created with the cursor's time, those listed after it, in order."""
    return sorted((r for r in records if r.key_id > after), key=listing_order)


def _window(want: int | None) -> tuple[int | None, int | None]:
    """ZRANGEBYSCORE's LIMIT (offset, count) for at most ``want`` members (None: all)."""
    return (None, None) if want is None else (0, want)


def _cut_at_last_score(
    scored: Sequence[tuple[Any, float]], want: int | None
) -> tuple[list[Any], float | None]:
    """Split a full page of ``(digest, score)`` before its last score, which to read whole.

    The members sharing the last score may go on past the page and sort differently by
    key_id, so the caller reads that group in full. A page shorter than ``want`` reached
    the end of the set: it is complete and nothing is cut (the score is None).
    """
    if want is None or len(scored) < want:
        return [digest for digest, _ in scored], None
    last = scored[-1][1]
    return [digest for digest, score in scored if score < last], last


class _AsyncClient(NamedTuple):
    client: redis.asyncio.Redis
    scripts: dict[str, Any]


class RedisStore:
    """A key store in Redis, built from a URL or from a client the app already has.

    :param url: ``redis://[:password@]host:6379/0`` or ``rediss://…`` (TLS).
    :param client: an existing ``redis.Redis`` (not closed by :meth:`close`).
    :param async_client: an existing ``redis.asyncio.Redis`` for the async methods; by
        default one is made from ``url`` (or ``client``'s settings) per event loop.
    :param namespace: prefix of every Redis key, so several apps can share one server.
    :param options: further ``redis.Redis.from_url`` options: ``max_connections`` (per
        pool, default 50), ``timeout`` (seconds to wait for a free connection, default 5),
        ``socket_timeout`` and ``socket_connect_timeout`` (seconds any answer or connect may
        take before the call raises :class:`StoreError`, default 5 each).
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        client: redis.Redis | None = None,
        async_client: redis.asyncio.Redis | None = None,
        namespace: str = DEFAULT_NAMESPACE,
        **options: Any,
    ) -> None:
        if (url is None) == (client is None):
            raise TypeError("give RedisStore either a url or a client, not both or neither")
        if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
            raise ValueError(
                f"Redis namespace must be 1-64 characters of letters, digits and _.:{{}}-,"
                f" got {namespace!r}"
            )
        self._redis = _import_redis()
        self.namespace = namespace
        self._url = url
        self._options = options
        self._owns_client = client is None
        if client is None:
            pool = self._redis.BlockingConnectionPool.from_url(url, **self._pool_options())
            client = cast("redis.Redis", self._redis.Redis.from_pool(pool))
        self._client: redis.Redis = client
        self._given_async = async_client
        self._async = PerLoop(self._new_async_client, self._close_async_client)
        self._lock = threading.Lock()
        self._ids = f"{namespace}:ids"
        self._all = f"{namespace}:all"
        self._meta = f"{namespace}:meta"
        self.channel = f"{namespace}:changes"
        self._add = client.register_script(_ADD)
        self._revoke = client.register_script(_REVOKE)
        self._set_expiry = client.register_script(_SET_EXPIRY)
        self._update = client.register_script(_UPDATE)
        self._touch = client.register_script(_TOUCH)
        self._consume = client.register_script(_CONSUME)
        self._adjust = client.register_script(_ADJUST)
        self._add_event = client.register_script(_ADD_EVENT)
        self._upgrade = client.register_script(UPGRADE)
        self._get = client.get
        #: Whether this process has made sure no record of schema version 1 is left.
        self._migrated = False

    def _pool_options(self) -> dict[str, Any]:
        # A bounded pool that waits for a free connection: under a burst of requests a
        # pool that refuses ("Too many connections") would turn load into errors.
        # Socket timeouts bound every call, so a server that stops answering is a StoreError
        # (a 503) after seconds, not a request that hangs for good.
        defaults = {"socket_timeout": 5.0, "socket_connect_timeout": 5.0}
        return {"max_connections": 50, "timeout": 5.0, **defaults, **self._options}

    def __repr__(self) -> str:
        where = redact_url(self._url) if self._url else repr(self._client)
        return f"RedisStore({where!r}, namespace={self.namespace!r})"

    # -- keys and arguments ------------------------------------------------------------

    def record_key(self, digest: str) -> str:
        """The Redis key of the string holding the record for ``digest``."""
        return f"{self.namespace}:key:{digest}"

    def user_key(self, user_id: str) -> str:
        """The Redis key of the sorted set of ``user_id``'s digests."""
        return f"{self.namespace}:user:{user_id}"

    def counter_key(self, name: str) -> str:
        """The Redis key of the string holding the counter (bucket) ``name``."""
        return f"{self.namespace}:counter:{name}"

    def _consume_call(self, buckets: Sequence[Bucket], now: float) -> tuple[list[str], list[str]]:
        keys = []
        args = [repr(float(now))]
        for bucket in buckets:
            keys.append(self.counter_key(bucket.name))
            args += _bucket_args(bucket)
        return keys, args

    def _adjust_call(self, bucket: Bucket, delta: float) -> tuple[list[str], list[str]]:
        forget = "" if bucket.expires_at is None else str(math.ceil(bucket.expires_at * 1000))
        return [self.counter_key(bucket.name)], [repr(float(delta)), forget]

    def _add_call(self, info: KeyInfo) -> tuple[list[str], list[str]]:
        keys = [
            self.record_key(info.digest),
            self._ids,
            self.user_key(info.user_id),
            self._all,
            self._meta,
        ]
        score = us(info.created_at)
        return keys, [info.digest, info.key_id, score, self.channel, encode(info)]

    @contextmanager
    def _failing(self, action: str) -> Iterator[None]:
        """Turn a ``RedisError`` in the block into a :class:`StoreError` naming ``action``."""
        try:
            yield
        except self._redis.RedisError as e:
            raise self._error(action, e) from e

    def _error(self, action: str, error: Exception) -> StoreError:
        return StoreError(f"Redis key store {self!r} could not {action}: {error}")

    # -- the sync contract -------------------------------------------------------------

    def add(self, info: KeyInfo) -> bool:
        keys, args = self._add_call(info)
        with self._failing("add a key"):
            return bool(self._add(keys=keys, args=args))

    def get(self, digest: str) -> KeyInfo | None:
        # The path of every check: one GET, with no context manager or helper around it.
        name = self.record_key(digest)
        try:
            value = self._get(name)
        except self._redis.RedisError as e:
            if not _wrong_type(e):
                raise self._error("read a key", e) from e
            with self._failing("read a key"):
                value = self._upgraded([name])[0]
        return decode(digest, value)

    def get_by_id(self, key_id: str) -> KeyInfo | None:
        with self._failing("read a key"):
            digest = self._client.hget(self._ids, key_id)
        return None if digest is None else self.get(_text(digest))

    def count_keys(self) -> int:
        with self._failing("count keys"):
            return int(self._client.hlen(self._ids))

    def iter_digests(self, page_size: int = 10_000) -> Iterator[str]:
        """HSCAN over ``ns:ids``, whose values are the digests: this namespace's only.

        SCAN over the record keys would walk every key in the database (counters, usage,
        other namespaces) to find them; HSCAN may yield a digest twice, never skip one.
        """
        page_size_checked(page_size)
        cursor = 0
        while True:
            with self._failing("list digests"):
                cursor, page = cast(
                    "tuple[int, dict[Any, Any]]",
                    self._client.hscan(self._ids, cursor, count=page_size),
                )
            yield from (_text(digest) for digest in page.values())
            if not cursor:
                return

    def list_keys(
        self, user_id: str | None = None, *, limit: int | None = None, after: str | None = None
    ) -> list[KeyInfo]:
        """A page in (created_at, key_id) order from a sorted set ordered by (score, digest).

        Only keys created in the same microsecond can be out of order, so the keys that
        share the cursor's score, and the whole group that shares the page's last score,
        are read in full and sorted by key_id; every other member is read a page at a time.
        """
        index = self._all if user_id is None else self.user_key(user_id)
        client = self._client
        page: list[KeyInfo] = []
        low = "-inf"
        with self._failing("list keys"):
            if after is not None:
                score = self._cursor_score(after)
                page = _after(self._records(client.zrangebyscore(index, score, score)), after)
                low = f"({score}"
            want = None if limit is None else limit - len(page)
            if want is None or want > 0:
                scored = cast(
                    "list[tuple[Any, float]]",
                    client.zrangebyscore(index, low, "+inf", *_window(want), withscores=True),
                )
                digests, last = _cut_at_last_score(scored, want)
                if last is not None:
                    digests += client.zrangebyscore(index, last, last)
                page += sorted(self._records(digests), key=listing_order)
        return page[:limit]

    def _cursor_score(self, after: str) -> str:
        """The score (creation time in microseconds) of the record with key_id ``after``."""
        digest = self._client.hget(self._ids, after)
        created = None
        if digest is not None:
            created = created_of(self._read(self.record_key(_text(digest))))
        if created is None:
            raise unknown_cursor(after)
        return created

    def _records(self, digests: Sequence[Any]) -> list[KeyInfo]:
        """The records of ``digests``, in one MGET; a digest without one is left out."""
        if not digests:
            return []
        names = [self.record_key(_text(d)) for d in digests]
        values = cast("list[Any]", self._client.mget(names))
        old = _unread(values)
        if old:
            upgraded = self._upgraded([names[i] for i in old])
            for i, value in zip(old, upgraded, strict=True):
                values[i] = value
        return _decode_all(digests, values)

    # -- records of schema version 1 ---------------------------------------------------

    def _read(self, name: str) -> Any:
        """GET the record ``name``, upgrading it first if it is still a hash."""
        try:
            return self._get(name)
        except self._redis.ResponseError as e:
            if not _wrong_type(e):
                raise
            return self._upgraded([name])[0]

    def _upgraded(self, names: list[str]) -> list[Any]:
        """Upgrade the records ``names`` still in hash form and return their values (see
        ``UPGRADE``); the first time in this process, migrate the whole namespace too."""
        values = cast("list[Any]", self._upgrade(keys=names, args=["values"]))
        if not self._migrated:
            self._migrate()
        return values

    def _migrate(self) -> None:
        """Upgrade every record of the namespace still in hash form, then record version 2.

        A namespace written by schema version 1 holds only hashes, so the first read of a
        process meets one and calls this: the conversion is done once, up front, rather
        than one record per first read for as long as the namespace lives. Several
        processes may run it at once, beside writers: each record is upgraded by one
        atomic script that leaves an upgraded record alone.
        """
        client = self._client
        version = client.hget(self._meta, "schema_version")
        if version is None or int(version) < SCHEMA_VERSION:
            start = 0
            while digests := cast(
                "list[Any]", client.zrange(self._all, start, start + _MIGRATION_BATCH - 1)
            ):
                self._upgrade(keys=[self.record_key(_text(d)) for d in digests], args=["count"])
                start += len(digests)
            client.hset(self._meta, "schema_version", str(SCHEMA_VERSION))
        self._migrated = True

    def revoke(self, digest: str, at: datetime) -> bool:
        with self._failing("revoke a key"):
            return bool(
                self._revoke(keys=[self.record_key(digest)], args=[us(at), self.channel, digest])
            )

    def set_expiry(self, digest: str, expires_at: datetime | None) -> bool:
        value = "" if expires_at is None else us(expires_at)
        with self._failing("change an expiry"):
            return bool(
                self._set_expiry(
                    keys=[self.record_key(digest)], args=[value, self.channel, digest]
                )
            )

    def update(self, info: KeyInfo, expected: KeyInfo) -> bool:
        """Compare and set in one script, against the fields as this store writes them."""
        args = [
            metadata_json(info),
            _expiry_text(info),
            self.channel,
            info.digest,
            metadata_json(expected),
            _expiry_text(expected),
        ]
        with self._failing("update a key"):
            return bool(self._update(keys=[self.record_key(info.digest)], args=args))

    def touch(self, digest: str, at: datetime) -> None:
        with self._failing("record a key's use"):
            self._touch(keys=[self.record_key(digest)], args=[us(at)])

    # -- counters ----------------------------------------------------------------------

    def consume(self, buckets: Sequence[Bucket], now: float) -> tuple[bool, list[float]]:
        keys, args = self._consume_call(buckets, now)
        script = self._consume
        client = self._client
        # EVALSHA itself, not script(keys=, args=): redis-py's Script checks isinstance
        # against two typing Protocols on every call, which costs more client time than
        # the rest of a charge. The reload on NOSCRIPT (a restart, SCRIPT FLUSH) is its own.
        try:
            try:
                reply = client.evalsha(script.sha, len(keys), *keys, *args)
            except self._redis.exceptions.NoScriptError:
                script.sha = client.script_load(script.script)
                reply = client.evalsha(script.sha, len(keys), *keys, *args)
        except self._redis.RedisError as e:
            raise self._error("charge counters", e) from e
        return _charged(reply)

    def adjust(self, bucket: Bucket, delta: float) -> float:
        keys, args = self._adjust_call(bucket, delta)
        with self._failing("adjust a counter"):
            return float(self._adjust(keys=keys, args=args))

    def peek(self, names: Sequence[str]) -> list[float]:
        if not names:
            return []
        with self._failing("read counters"):
            values = self._client.mget([self.counter_key(n) for n in names])
        return [0.0 if v is None else float(v) for v in cast("list[Any]", values)]

    # -- usage counts ------------------------------------------------------------------

    def usage_key(self, key_id: str, step: str, start: int) -> str:
        """The Redis key of the hash of ``key_id``'s counts in one bucket."""
        return f"{self.namespace}:usage:{step}:{start}:{key_id}"

    def add_usage(self, rows: Sequence[UsageRow]) -> None:
        """Add the counts with one pipeline (one round trip, not a transaction)."""
        if not rows:
            return
        pipe = self._client.pipeline(transaction=False)
        buckets: dict[str, int] = {}
        for key_id, step, start, code, count in rows:
            name = self.usage_key(key_id, step, start)
            pipe.hincrby(name, code, count)
            buckets[name] = USAGE_RETENTION[step] + USAGE_STEPS[step]
        for name, ttl in buckets.items():
            pipe.expire(name, ttl)
        with self._failing("record usage"):
            pipe.execute()

    def read_usage(self, key_id: str, step: str, start: int, end: int) -> list[UsageRow]:
        size = USAGE_STEPS.get(step)
        if size is None:
            return []
        starts = range(start + -start % size, end, size)
        pipe = self._client.pipeline(transaction=False)
        for at in starts:
            pipe.hgetall(self.usage_key(key_id, step, at))
        with self._failing("read usage"):
            hashes = pipe.execute() if starts else []
        return [
            (key_id, step, at, _text(code), int(count))
            for at, counts in zip(starts, hashes, strict=True)
            for code, count in sorted(counts.items())
        ]

    # -- audit events ------------------------------------------------------------------

    def events_key(self, key_id: str | None = None) -> str:
        """The Redis key of the sorted set of ``key_id``'s events (None: of every key's)."""
        if key_id is None:
            return f"{self.namespace}:events"
        return f"{self.namespace}:events:key:{key_id}"

    def add_event(self, event: KeyEvent) -> None:
        """Add the event to both sorted sets in one Lua script."""
        at = int(us(event.at))
        body = {
            "at": at,
            "key_id": event.key_id,
            "action": event.action,
            "actor": event.actor,
            "changes": event.changes,
        }
        keys = [self.events_key(), self.events_key(event.key_id), f"{self.namespace}:events:seq"]
        args = [str(at), json.dumps(body, separators=(",", ":"), ensure_ascii=False)]
        with self._failing("record an event"):
            self._add_event(keys=keys, args=args)

    def read_events(
        self, key_id: str | None, since: datetime | None, limit: int
    ) -> list[KeyEvent]:
        low = "-inf" if since is None else us(since)
        with self._failing("read events"):
            members = self._client.zrevrangebyscore(
                self.events_key(key_id), "+inf", low, start=0, num=limit
            )
        return [_decode_event(m) for m in cast("list[Any]", members)]

    def close(self) -> None:
        """Close the connections this store opened (a client passed in stays open)."""
        self._async.close()
        if self._owns_client:
            self._client.close()

    # -- push invalidation -------------------------------------------------------------

    def subscribe_invalidations(self, callback: Callable[[str | None], None]) -> Listener:
        """Follow ``ns:changes`` on a daemon thread (see :class:`InvalidationSource`)."""
        return Listener(f"keyguard-listener-redis-{self.namespace}", self._listen, callback)

    def _listen(self, stop: threading.Event, emit: Callable[[str | None], None]) -> None:
        """One subscription, until ``stop``: pings the server on the subscribed connection.

        Waiting for a message never times out, and nothing else tells a dead connection from
        a quiet channel (redis-py's ``health_check_interval`` sends a PING but never asks
        for its reply), so an unanswered ``PING`` raises (see :class:`Heartbeat`).
        """
        # redis-py before 6 left pubsub() untyped.
        pubsub = self._client.pubsub()  # type: ignore[no-untyped-call,unused-ignore]
        try:
            pubsub.subscribe(self.channel)
            heartbeat = Heartbeat()
            while not stop.is_set():
                message = pubsub.get_message(timeout=POLL_SECONDS)
                if message is not None:
                    heartbeat.answered()  # a confirmation, a push or a pong
                    kind = _text(message["type"])
                    # A (re-)subscription confirmed: anything cached before it may be stale.
                    if kind == "subscribe":
                        emit(None)
                    elif kind == "message":
                        emit(_text(message["data"]))
                # Asked after reading, so an answer that came while this thread waited for
                # the GIL counts, and a busy channel needs no ping.
                if heartbeat.ping_due():
                    # Subscribed, the server answers with a "pong" message in turn.
                    pubsub.ping(_HEARTBEAT_MESSAGE)
        finally:
            pubsub.close()

    # -- the async twin ----------------------------------------------------------------

    def _aclient(self) -> _AsyncClient:
        """The async client of the running loop (async connections belong to one loop)."""
        return self._async.get()

    def _new_async_client(self) -> _AsyncClient:
        aio = self._redis.asyncio
        client: redis.asyncio.Redis
        if self._given_async is not None:
            client = self._given_async
        elif self._url is not None:
            pool = aio.BlockingConnectionPool.from_url(self._url, **self._pool_options())
            client = aio.Redis.from_pool(pool)
        else:
            pool = self._client.connection_pool
            kwargs = dict(pool.connection_kwargs)
            name = getattr(pool, "connection_class", object).__name__
            kwargs["connection_class"] = getattr(aio.connection, name, aio.connection.Connection)
            try:
                client = aio.Redis(connection_pool=aio.ConnectionPool(**kwargs))
            except TypeError as e:
                raise StoreError(
                    f"cannot derive an async client from {self._client!r}; pass async_client="
                ) from e
        return _AsyncClient(client, {name: client.register_script(lua) for name, lua in _SCRIPTS})

    async def _close_async_client(self, item: _AsyncClient) -> None:
        if item.client is not self._given_async:
            await item.client.aclose(close_connection_pool=True)

    async def aadd(self, info: KeyInfo) -> bool:
        scripts = self._aclient().scripts
        keys, args = self._add_call(info)
        with self._failing("add a key"):
            return bool(await scripts["add"](keys=keys, args=args))

    async def aget(self, digest: str) -> KeyInfo | None:
        name = self.record_key(digest)
        try:
            value = await self._aclient().client.get(name)
        except self._redis.RedisError as e:
            if not _wrong_type(e):
                raise self._error("read a key", e) from e
            with self._failing("read a key"):
                value = (await self._aupgraded([name]))[0]
        return decode(digest, value)

    async def aget_by_id(self, key_id: str) -> KeyInfo | None:
        client = self._aclient().client
        with self._failing("read a key"):
            digest = await client.hget(self._ids, key_id)
        return None if digest is None else await self.aget(_text(digest))

    async def alist_keys(
        self, user_id: str | None = None, *, limit: int | None = None, after: str | None = None
    ) -> list[KeyInfo]:
        """Async :meth:`list_keys`, the same steps awaited."""
        index = self._all if user_id is None else self.user_key(user_id)
        client = self._aclient().client
        page: list[KeyInfo] = []
        low = "-inf"
        with self._failing("list keys"):
            if after is not None:
                score = await self._acursor_score(after)
                ties = await self._arecords(await client.zrangebyscore(index, score, score))
                page = _after(ties, after)
                low = f"({score}"
            want = None if limit is None else limit - len(page)
            if want is None or want > 0:
                scored = cast(
                    "list[tuple[Any, float]]",
                    await client.zrangebyscore(
                        index, low, "+inf", *_window(want), withscores=True
                    ),
                )
                digests, last = _cut_at_last_score(scored, want)
                if last is not None:
                    digests += await client.zrangebyscore(index, last, last)
                page += sorted(await self._arecords(digests), key=listing_order)
        return page[:limit]

    async def _acursor_score(self, after: str) -> str:
        client = self._aclient().client
        digest = await client.hget(self._ids, after)
        created = None
        if digest is not None:
            created = created_of(await self._aread(self.record_key(_text(digest))))
        if created is None:
            raise unknown_cursor(after)
        return created

    async def _arecords(self, digests: Sequence[Any]) -> list[KeyInfo]:
        if not digests:
            return []
        names = [self.record_key(_text(d)) for d in digests]
        values = await self._aclient().client.mget(names)
        old = _unread(values)
        if old:
            upgraded = await self._aupgraded([names[i] for i in old])
            for i, value in zip(old, upgraded, strict=True):
                values[i] = value
        return _decode_all(digests, values)

    async def _aread(self, name: str) -> Any:
        """Async :meth:`_read`."""
        try:
            return await self._aclient().client.get(name)
        except self._redis.ResponseError as e:
            if not _wrong_type(e):
                raise
            return (await self._aupgraded([name]))[0]

    async def _aupgraded(self, names: list[str]) -> list[Any]:
        """Async :meth:`_upgraded`."""
        values = await self._aclient().scripts["upgrade"](keys=names, args=["values"])
        if not self._migrated:
            await self._amigrate()
        return cast("list[Any]", values)

    async def _amigrate(self) -> None:
        """Async :meth:`_migrate`."""
        client, scripts = self._aclient()
        version = await client.hget(self._meta, "schema_version")
        if version is None or int(version) < SCHEMA_VERSION:
            start = 0
            while digests := cast(
                "list[Any]", await client.zrange(self._all, start, start + _MIGRATION_BATCH - 1)
            ):
                names = [self.record_key(_text(d)) for d in digests]
                await scripts["upgrade"](keys=names, args=["count"])
                start += len(digests)
            await client.hset(self._meta, "schema_version", str(SCHEMA_VERSION))
        self._migrated = True

    async def arevoke(self, digest: str, at: datetime) -> bool:
        scripts = self._aclient().scripts
        with self._failing("revoke a key"):
            return bool(
                await scripts["revoke"](
                    keys=[self.record_key(digest)], args=[us(at), self.channel, digest]
                )
            )

    async def aset_expiry(self, digest: str, expires_at: datetime | None) -> bool:
        scripts = self._aclient().scripts
        value = "" if expires_at is None else us(expires_at)
        with self._failing("change an expiry"):
            return bool(
                await scripts["set_expiry"](
                    keys=[self.record_key(digest)], args=[value, self.channel, digest]
                )
            )

    async def atouch(self, digest: str, at: datetime) -> None:
        scripts = self._aclient().scripts
        with self._failing("record a key's use"):
            await scripts["touch"](keys=[self.record_key(digest)], args=[us(at)])

    async def aconsume(self, buckets: Sequence[Bucket], now: float) -> tuple[bool, list[float]]:
        client, scripts = self._aclient()
        script = scripts["consume"]
        keys, args = self._consume_call(buckets, now)
        # EVALSHA itself, as in consume.
        try:
            try:
                reply = await client.evalsha(script.sha, len(keys), *keys, *args)
            except self._redis.exceptions.NoScriptError:
                script.sha = await client.script_load(script.script)
                reply = await client.evalsha(script.sha, len(keys), *keys, *args)
        except self._redis.RedisError as e:
            raise self._error("charge counters", e) from e
        return _charged(reply)

    async def aadjust(self, bucket: Bucket, delta: float) -> float:
        scripts = self._aclient().scripts
        keys, args = self._adjust_call(bucket, delta)
        with self._failing("adjust a counter"):
            return float(await scripts["adjust"](keys=keys, args=args))

    async def apeek(self, names: Sequence[str]) -> list[float]:
        if not names:
            return []
        client = self._aclient().client
        with self._failing("read counters"):
            values = await client.mget([self.counter_key(n) for n in names])
        return [0.0 if v is None else float(v) for v in values]

    async def aclose(self) -> None:
        """Close this loop's async connections, then the rest (see :meth:`close`)."""
        await self._async.aclose()
        self.close()
