"""What one ``keyguard`` command runs with: its store and manager, and the key it names.

The store is opened from the store URL on first use (never created by a look), and a
command's failure is a :class:`CLIError` that ``main`` prints as one line.
"""

from __future__ import annotations

import argparse
import getpass
import os
import re
import sys
import time
from urllib.parse import quote, unquote, urlsplit

from .. import _drf
from ..keys import DEFAULT_PREFIX, KEY_BODY_LENGTH, KeyFormat, mask_key
from ..manager import COUNTERS_ENV, APIKeyManager
from ..records import KeyInfo
from ..stores import DEFAULT_STORE_URL, STORE_URL_ENV, KeyStore, store_from_url
from ..stores._redact import redact_url
from ..stores.base import CounterStore

__all__ = [
    "CHECKSUM_ENV",
    "EXIT_INVALID",
    "EXIT_OK",
    "EXIT_USAGE",
    "CLIError",
    "Session",
    "cli_actor",
    "key_format",
    "read_key",
    "resolve",
]

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
CHECKSUM_ENV = "KEYGUARD_CHECKSUM"
_KEY_ID = re.compile(r"key_[0-9a-f]{16}")
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


class CLIError(Exception):
    """A failure reported as one line on stderr with exit ``code``."""

    def __init__(self, message: str, code: int = EXIT_INVALID) -> None:
        super().__init__(message)
        self.code = code


def _env_flag(name: str) -> bool:
    """Read a yes/no environment variable; anything unclear is a usage error, not a guess."""
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise CLIError(f"{name} must be 1 or 0, got {value!r}", EXIT_USAGE)


def cli_actor() -> str:
    """Who the audit events of this command name: the OS user, ``alice@cli`` (else ``cli``)."""
    try:
        user = getpass.getuser()
    except Exception:  # no USER/LOGNAME and no passwd entry (a bare container)
        return "cli"
    return f"{user}@cli" if user else "cli"


class Session:
    """The store and manager for one command run, opened on first use and closed after."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.url: str = args.store or os.environ.get(STORE_URL_ENV) or DEFAULT_STORE_URL
        self._store: KeyStore | None = None
        self._counters: CounterStore | None = None
        self.now = time.time()
        #: The deployment's keys carry a checksum: ``--checksum`` or ``$KEYGUARD_CHECKSUM=1``.
        self.checksum = bool(getattr(args, "checksum", False)) or _env_flag(CHECKSUM_ENV)
        #: The actor of every change this command makes (see :mod:`keyguard.events`).
        self.actor = cli_actor()

    def missing_sqlite_file(self) -> str | None:
        """The SQLite path of the store URL if that file does not exist yet, else None."""
        parts = urlsplit(self.url.strip())
        if parts.scheme.lower() != "sqlite" or parts.netloc:
            return None
        path = unquote(parts.path[1:])
        return path if path and not os.path.exists(path) else None

    def display_url(self) -> str:
        """The store URL as the operator should read it: a SQLite path made absolute.

        A relative ``sqlite:///keyguard.db`` means a different file in every folder, so the
        line names the one this command opened; passwords in other URLs are masked.
        """
        url = self.url.strip()
        parts = urlsplit(url)
        if parts.scheme.lower() != "sqlite" or parts.netloc or not parts.path[1:]:
            return redact_url(url)
        path = os.path.abspath(unquote(parts.path[1:]))
        query = f"?{parts.query}" if parts.query else ""
        return f"sqlite:///{quote(path, safe='/')}{query}"

    def store(self, *, create: bool = False) -> KeyStore:
        """Open the store; unless ``create``, a missing SQLite file is an error, not a new one.

        The store it opened is named on stderr (stdout stays clean for ``--json``), and a
        new SQLite file is called new: a key made in the wrong folder must not go unnoticed.
        """
        if self._store is None:
            missing = self.missing_sqlite_file()
            if missing is not None and not create:
                raise CLIError(
                    f"no key store at {missing!r}: create a key first, or pass --store URL"
                    f" or set {STORE_URL_ENV}",
                    EXIT_USAGE,
                )
            try:
                # Only `create` may make a store; every other command opens an existing one.
                self._store = store_from_url(self.url, create_schema=create)
            except (ValueError, TypeError, ImportError) as e:
                raise CLIError(str(e), EXIT_USAGE) from None
            created = " (a new store file, created now)" if missing is not None else ""
            print(f"store: {self.display_url()}{created}", file=sys.stderr)
        return self._store

    def counters(self) -> CounterStore | None:
        """The separate counter store named by ``$KEYGUARD_COUNTERS``, or None (the key store
        keeps the counters), so ``show`` and ``credits`` read what the servers count."""
        url = os.environ.get(COUNTERS_ENV)
        if url and self._counters is None:
            try:
                counters = store_from_url(url)
            except (ValueError, TypeError, ImportError) as e:
                raise CLIError(f"{COUNTERS_ENV}: {e}", EXIT_USAGE) from None
            if not isinstance(counters, CounterStore):
                counters.close()
                raise CLIError(f"{COUNTERS_ENV}: that store cannot keep counters", EXIT_USAGE)
            self._counters = counters
        return self._counters

    def manager(
        self, prefix: str = DEFAULT_PREFIX, *, create: bool = False, checksum: bool | None = None
    ) -> APIKeyManager:
        """A manager over the store that never records "last used": a look is not a use.

        Its keys have a checksum if ``checksum`` says so, else if the session's does. It
        accepts imported drf-api-key keys too, so that they can be verified and named.
        """
        checksum = self.checksum if checksum is None else checksum
        store = self.store(create=create)
        try:
            return APIKeyManager(
                store,
                prefix=prefix,
                accept_imported=(_drf.SOURCE,),
                checksum=checksum,
                last_used_resolution=None,
                counters=self.counters(),
            )
        except ValueError as e:
            raise CLIError(f"{e} (check KEYGUARD_PEPPER)", EXIT_USAGE) from None

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
        if isinstance(self._counters, KeyStore):
            self._counters.close()


def read_key(ref: str) -> str:
    """``-`` reads the key from stdin, so it stays out of shell history and ``ps``."""
    if ref != "-":
        return ref
    key = sys.stdin.readline().strip()
    if not key:
        raise CLIError("no key on stdin: '-' reads the key from the first line", EXIT_USAGE)
    return key


def key_format(key: str) -> KeyFormat | None:
    """The format ``key`` claims (its prefix is everything before the 32 hex), if valid.

    Only the shape is checked, never a checksum: callers want the prefix and judge the key.
    """
    if len(key) <= KEY_BODY_LENGTH:
        return None
    try:
        fmt = KeyFormat(key[:-KEY_BODY_LENGTH])
    except ValueError:
        return None
    return fmt if fmt.matches(key) else None


def resolve(session: Session, ref: str) -> tuple[APIKeyManager, KeyInfo]:
    """Find the record named by a key_id or a key; a missing one is a CLIError (exit 1).

    The manager returned issues keys of the record's format, so a rotation keeps it: the
    record's prefix, and a checksum if the session asks for one or the given key has one.
    A record does not say whether its key had a checksum, so by key_id only the session
    (``--checksum``, ``$KEYGUARD_CHECKSUM``) can tell. An imported key is named by its
    record, and rotates into a key of the default format.
    """
    if _KEY_ID.fullmatch(ref):
        info = session.manager().get_key_info(ref)
        if info is None:
            raise CLIError(f"no key with key_id {ref!r}")
        return session.manager(info.prefix), info
    key = read_key(ref)
    fmt = key_format(key)
    if fmt is None and _drf.KEY_FORM.fullmatch(key):
        # An imported drf-api-key key: found by its digest; a rotation issues a native key.
        manager = session.manager()
        imported = manager.store.get(manager.digest(key))
        if imported is None:
            raise CLIError(f"no such key {key[:8]}.…")
        return manager, imported
    if fmt is None:
        raise CLIError(
            f"{mask_key(key)!r} is neither a key_id (key_ and 16 hex) nor a well-formed key"
        )
    has_checksum = KeyFormat(fmt.prefix, checksum=True).matches(key)
    manager = session.manager(fmt.prefix, checksum=session.checksum or has_checksum)
    found = manager.store.get(manager.digest(key))
    if found is None:
        raise CLIError(f"no such key {mask_key(key, fmt.prefix)}")
    return manager, found
