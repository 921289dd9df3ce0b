"""One Redis string per record: its encoding, its decoder, and the Lua that edits it.

A record (schema version 2) is eleven fields joined by tabs::

    v2  created_at  expires_at  revoked_at  last_used_at
        key_id  hash_scheme  prefix  hint  user_id  metadata

``v2`` names the format, so a later one can be told apart. Times are integer microseconds
since the epoch, empty when unset. The five text fields have their backslashes and tabs
escaped (``\\\\`` and ``\\t``), which real keys never need. The metadata comes last as
``json.dumps`` writes it, so it holds no raw tab. A read is one ``GET`` and a split; a
script changes a time by cutting at the first five tabs and never parses the metadata
(Redis' cjson would rewrite its numbers and escapes).

Schema version 1 kept each record as a hash of the same fields. :data:`UPGRADE` rewrites
such a hash as the string above, in one atomic step per record, copying every field
verbatim.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime, timedelta, timezone
from typing import Any

from ..exceptions import StoreError
from ..records import KeyInfo

__all__ = [
    "FORMAT",
    "RECORD_LUA",
    "UPGRADE",
    "created_of",
    "decode",
    "encode",
    "from_us",
    "metadata_json",
    "us",
]

FORMAT = "v2"
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MICROSECOND = timedelta(microseconds=1)
_ESCAPED = re.compile(r"\\(.)")
_UNESCAPE = {"t": "\t", "\\": "\\"}

# Helpers shared by every script that reads or edits a record; ``KEYS`` are record keys.
RECORD_LUA = r"""
local HASH_FIELDS = {'created_at', 'expires_at', 'revoked_at', 'last_used_at', 'key_id',
  'hash_scheme', 'prefix', 'hint', 'user_id', 'metadata'}

-- A record of schema version 1 (a hash) rewritten as one string, which is returned; a hash that
-- lacks a required field is left as it is and false returned.
local function upgrade(key)
  local values = redis.call('HMGET', key, unpack(HASH_FIELDS))
  local fields = {'v2'}
  for i = 1, 10 do
    local value = values[i]
    if not value then
      if i < 2 or i > 4 then return false end
      value = ''
    elseif i >= 5 and i <= 9 then
      value = string.gsub(value, '[\\\t]', {['\\'] = '\\\\', ['\t'] = '\\t'})
    end
    fields[i + 1] = value
  end
  local record = table.concat(fields, '\t')
  redis.call('DEL', key)
  redis.call('SET', key, record)
  return record
end

-- The record's first n fields and the rest (n + 1 strings), or nil if there is none.
local function fields(key, n)
  local record = redis.pcall('GET', key)
  if type(record) == 'table' then
    record = upgrade(key)
    if not record then error({err = 'keyguard: record ' .. key .. ' is corrupt'}) end
  end
  if not record then return nil end
  local parts, start = {}, 1
  for i = 1, n do
    local tab = string.find(record, '\t', start, true)
    if not tab then error({err = 'keyguard: record ' .. key .. ' is corrupt'}) end
    parts[i] = string.sub(record, start, tab - 1)
    start = tab + 1
  end
  if parts[1] ~= 'v2' then
    error({err = 'keyguard: record ' .. key .. ' has format ' .. parts[1] .. ', not v2'})
  end
  parts[n + 1] = string.sub(record, start)
  return parts
end
"""

# KEYS: records.  ARGV: 'values' to reply with each record as it now is (false if there is
# none, its fields and values if it is a hash that cannot be upgraded), else the count
# upgraded.  Records already strings are left alone, so running it twice is harmless.
UPGRADE = (
    RECORD_LUA
    + """
local replies, upgraded = {}, 0
for i, key in ipairs(KEYS) do
  local kind = redis.call('TYPE', key).ok
  local record = false
  if kind == 'hash' then
    record = upgrade(key)
    if record then
      upgraded = upgraded + 1
    else
      record = redis.call('HGETALL', key)
    end
  elseif kind == 'string' then
    record = redis.call('GET', key)
  end
  replies[i] = record
end
if ARGV[1] == 'values' then return replies end
return upgraded
"""
)


def us(value: datetime) -> str:
    """``value`` as integer microseconds since the epoch, the way records hold times."""
    return str((value - _EPOCH) // _MICROSECOND)


def _time(value: datetime | None) -> str:
    return "" if value is None else us(value)


def _escape(text: str) -> str:
    if "\t" in text or "\\" in text:
        return text.replace("\\", "\\\\").replace("\t", "\\t")
    return text


def _unescape(text: str) -> str:
    return _ESCAPED.sub(lambda m: _UNESCAPE.get(m[1], m[0]), text)


def metadata_json(info: KeyInfo) -> str:
    """The metadata as records hold it: compact JSON, ASCII only, so it holds no tab."""
    return json.dumps(info.metadata, separators=(",", ":"))


def encode(info: KeyInfo) -> str:
    """The record of ``info`` as one string (its digest is the Redis key, not a field)."""
    return "\t".join(
        (
            FORMAT,
            us(info.created_at),
            _time(info.expires_at),
            _time(info.revoked_at),
            _time(info.last_used_at),
            _escape(info.key_id),
            _escape(info.hash_scheme),
            _escape(info.prefix),
            _escape(info.hint),
            _escape(info.user_id),
            metadata_json(info),
        )
    )


def decode(digest: str, value: Any) -> KeyInfo | None:
    """The record from a ``GET`` (None: there is none) or an upgrade's reply.

    An upgrade replies with a hash's fields and values (a list) for a record of schema
    version 1 that it could not convert: a damaged record, as it would have been before.
    """
    if value is None:
        return None
    if isinstance(value, list):
        fields = {_text(k): _text(v) for k, v in zip(value[::2], value[1::2], strict=True)}
        raise StoreError(
            f"Redis record for key {fields.get('key_id')!r} is corrupt: a schema version 1 hash"
            f" with only {', '.join(sorted(fields)) or 'no fields'}"
        )
    return _decode(digest, value)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def from_us(value: str) -> datetime:
    return _EPOCH + _MICROSECOND * int(value)


# An unchanged record decodes to the same KeyInfo; JSON parsing and datetime building would
# otherwise cost as much as a tenth of the round trip on every check of a hot key.
@functools.lru_cache(maxsize=4096)
def _decode(digest: str, value: str | bytes) -> KeyInfo:
    text = value.decode() if isinstance(value, bytes) else value
    fields = text.split("\t", 10)
    if len(fields) != 11 or fields[0] != FORMAT:
        raise StoreError(
            f"Redis record {digest[:8]}… is not a keyguard record of format {FORMAT}"
            f" (it starts {text[:8]!r})"
        )
    _, created, expires, revoked, used, key_id, scheme, prefix, hint, user_id, metadata = fields
    if text.find("\\", 0, len(text) - len(metadata)) >= 0:
        key_id, scheme, prefix, hint, user_id = map(
            _unescape, (key_id, scheme, prefix, hint, user_id)
        )
    try:
        return KeyInfo.from_store(
            digest=digest,
            key_id=key_id,
            hash_scheme=scheme,
            prefix=prefix,
            hint=hint,
            user_id=user_id,
            metadata_json=metadata,
            created_us=int(created),
            expires_us=int(expires) if expires else None,
            revoked_us=int(revoked) if revoked else None,
            used_us=int(used) if used else None,
        )
    except ValueError as e:
        raise StoreError(f"Redis record for key {key_id!r} is corrupt: {e}") from e


def created_of(value: Any) -> str | None:
    """The ``created_at`` field (microseconds) of a record as :func:`decode` takes it."""
    if value is None:
        return None
    if isinstance(value, list):
        decode("", value)  # raises: a damaged hash
    return _text(value).split("\t", 2)[1]
