"""The key format: generate, check the form of, digest and mask API keys.

Everything here is pure: no storage, no HTTP, no clock. A key is ``prefix`` followed by
32 lowercase hex characters drawn from :mod:`secrets` (128 random bits). With
``checksum=True`` the last 8 of those hex characters are the CRC32 of everything before
them, so a mistyped or invented key can be rejected without a lookup (96 random bits).
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import zlib

__all__ = [
    "DEFAULT_PREFIX",
    "HASH_SCHEME_HMAC_SHA256",
    "HASH_SCHEME_SHA256",
    "KEY_BODY_LENGTH",
    "KeyFormat",
    "digest_key",
    "generate_key",
    "has_valid_checksum",
    "hash_scheme",
    "is_well_formed",
    "mask_key",
    "redact_keys",
    "validate_prefix",
]

DEFAULT_PREFIX = "sk_"
KEY_BODY_LENGTH = 32
_CHECKSUM_LENGTH = 8
_PREFIX_RE = re.compile(r"[A-Za-z0-9_-]{1,20}")
_HEX_RE = re.compile(f"[0-9a-f]{{{KEY_BODY_LENGTH}}}")
_HEX_RUN_RE = re.compile(f"[0-9a-f]{{{KEY_BODY_LENGTH},}}")
HASH_SCHEME_SHA256 = "sha256"
HASH_SCHEME_HMAC_SHA256 = "hmac-sha256"


def validate_prefix(prefix: object) -> str:
    """Return ``prefix`` if it is 1-20 ASCII letters, digits, ``_`` or ``-``; else raise."""
    if not isinstance(prefix, str):
        raise TypeError(f"key prefix must be a str, not {type(prefix).__name__}")
    if not prefix.isascii() or _PREFIX_RE.fullmatch(prefix) is None:
        # A long "prefix" may be a whole key given by mistake: never echo one.
        shown = repr(prefix) if len(prefix) <= 20 else f"{mask_key(prefix)!r} (masked)"
        raise ValueError(
            f"invalid key prefix {shown}: use 1-20 ASCII letters, digits, '_' or '-'"
            " (for example 'sk_', 'pk_' or 'sk_live_')"
        )
    return prefix


def _crc(text: str) -> str:
    return format(zlib.crc32(text.encode("ascii")), "08x")


class KeyFormat:
    """One key format (a prefix, with or without a checksum), compiled once.

    ``matches`` is the pure form check run on every request: one precompiled
    ``fullmatch`` (plus the CRC32 when the format has a checksum).
    """

    __slots__ = ("_regex", "checksum", "prefix")

    def __init__(self, prefix: str = DEFAULT_PREFIX, *, checksum: bool = False) -> None:
        self.prefix = validate_prefix(prefix)
        self.checksum = bool(checksum)
        self._regex = re.compile(re.escape(prefix) + f"[0-9a-f]{{{KEY_BODY_LENGTH}}}")

    def __repr__(self) -> str:
        return f"KeyFormat(prefix={self.prefix!r}, checksum={self.checksum})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, KeyFormat):
            return NotImplemented
        return (self.prefix, self.checksum) == (other.prefix, other.checksum)

    def __hash__(self) -> int:
        return hash((self.prefix, self.checksum))

    @property
    def length(self) -> int:
        """The exact length of every key of this format."""
        return len(self.prefix) + KEY_BODY_LENGTH

    @property
    def pattern(self) -> str:
        """A regex (without anchors) that finds keys of this format inside text."""
        return re.escape(self.prefix) + f"[0-9a-f]{{{KEY_BODY_LENGTH}}}"

    def generate(self) -> str:
        """Return a new random key of this format."""
        if not self.checksum:
            return self.prefix + secrets.token_hex(KEY_BODY_LENGTH // 2)
        head = self.prefix + secrets.token_hex((KEY_BODY_LENGTH - _CHECKSUM_LENGTH) // 2)
        return head + _crc(head)

    def matches(self, key: object) -> bool:
        """Tell whether ``key`` has this format's exact form; never raises."""
        if type(key) is not str or self._regex.fullmatch(key) is None:
            return False
        return not self.checksum or has_valid_checksum(key)


def has_valid_checksum(key: str) -> bool:
    """Whether the last 8 characters of ``key`` are the CRC32 of the rest.

    A checksum catches typos offline; it is public, so it proves nothing about who made
    the key.
    """
    return _crc(key[:-_CHECKSUM_LENGTH]) == key[-_CHECKSUM_LENGTH:]


def generate_key(prefix: str = DEFAULT_PREFIX, *, checksum: bool = False) -> str:
    """Return a new key: ``prefix`` + 32 lowercase hex characters from :mod:`secrets`."""
    return KeyFormat(prefix, checksum=checksum).generate()


def is_well_formed(key: object, prefix: str = DEFAULT_PREFIX, *, checksum: bool = False) -> bool:
    """Tell whether ``key`` has the form of a key with ``prefix``; pure, never raises."""
    return KeyFormat(prefix, checksum=checksum).matches(key)


def digest_key(key: str, pepper: bytes | None = None) -> str:
    """Return the hex digest under which a key is stored.

    SHA-256 of the whole key, or HMAC-SHA-256 keyed with ``pepper`` when one is set. A fast
    hash is right here: the key carries 128 random bits, so there is nothing to brute-force,
    and the check runs on every request.
    """
    data = key.encode("utf-8")
    if pepper is None:
        return hashlib.sha256(data).hexdigest()
    return hmac.digest(pepper, data, "sha256").hex()


def hash_scheme(pepper: bytes | None = None) -> str:
    """Name how keys are digested: ``sha256``, or ``hmac-sha256:<pepper id>`` with a pepper.

    The pepper id is a short HMAC of a fixed label: it reveals nothing about the pepper but
    lets tools tell a store hashed under another pepper from one that lacks a key.
    """
    if pepper is None:
        return HASH_SCHEME_SHA256
    pepper_id = hmac.new(pepper, b"keyguard pepper id", "sha256").hexdigest()[:8]
    return f"{HASH_SCHEME_HMAC_SHA256}:{pepper_id}"


def mask_key(key: object, prefix: str | None = None) -> str:
    """Return a display form that never reveals a secret, e.g. ``sk_…9f2a``.

    The last 4 characters are shown, after the prefix when ``key`` starts with ``prefix``
    or, without one, when it has a key's shape (a valid prefix and then 32 lowercase hex).
    Anything else shows no prefix (it may be a secret in the wrong place): ``…e_xx``.
    """
    if type(key) is not str or not key.isascii() or len(key) < 12 or not key.isprintable():
        return "…"
    if prefix is None or not key.startswith(prefix):
        head, body = key[:-KEY_BODY_LENGTH], key[-KEY_BODY_LENGTH:]
        shaped = _PREFIX_RE.fullmatch(head) is not None and _HEX_RE.fullmatch(body) is not None
        prefix = head if shaped else ""
    return f"{prefix}…{key[-4:]}"


def redact_keys(text: str) -> str:
    """``text`` with the secret part of every key in it masked, wherever it stands.

    Each run of 32 or more lowercase hex characters (a key's body, whatever its prefix and
    whatever surrounds it: quotes, NULs, escape sequences, other letters) keeps only its
    last 4, after ``…``: ``sk_<32 hex>`` reads ``sk_…9f2a``, as :func:`mask_key` shows it.
    Digests and other long hex runs are masked too: it errs on the side of hiding.
    """
    return _HEX_RUN_RE.sub(lambda m: "…" + m[0][-4:], text)
