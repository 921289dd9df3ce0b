"""The ``keyguard`` command: manage keys from a terminal or a script, and scan for leaks.

Exit codes: 0 success, 1 "not found / invalid / live key found", 2 usage or store errors.
Errors are one line on stderr. A key is printed in full only by ``create`` and ``rotate``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any, NoReturn, TypeVar
from urllib.parse import unquote, urlsplit

from .. import __version__
from ..exceptions import InvalidKeyError, KeyguardError
from ..keys import DEFAULT_PREFIX, KEY_BODY_LENGTH, KeyFormat, mask_key, validate_prefix
from ..manager import APIKeyManager
from ..records import KeyInfo
from ..scan import DEFAULT_MAX_FILE_SIZE, Finding, KeyScanner
from ..stores import DEFAULT_STORE_URL, STORE_URL_ENV, KeyStore, store_from_url
from ._durations import parse_duration as parse_duration
from ._output import (
    format_time,
    key_info_json,
    key_table,
    print_json,
    print_new_key,
    print_revocations,
    print_scan_report,
    printable,
    terminal_width,
)

__all__ = ["main", "parse_duration"]

_T = TypeVar("_T")

EXIT_OK, EXIT_INVALID, EXIT_USAGE = 0, 1, 2
_KEY_ID = re.compile(r"key_[0-9a-f]{16}")
# Any word holding 32 lowercase hex may be a key typed in the wrong place (a key's shape,
# prefix[A-Za-z0-9_-]{1,20} + 32 hex, is one such word); stderr shows it masked.
_WORD = re.compile(r"[A-Za-z0-9_-]+")
_KEY_BODY = re.compile(r"[0-9a-f]{32}")
CHECKSUM_ENV = "KEYGUARD_CHECKSUM"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}
_RESERVED_META = {
    "user_id": "--user",
    "email": "--email",
    "permissions": "--scope",
    "name": "--name",
}


class CLIError(Exception):
    """A failure reported as one line on stderr with exit ``code``."""

    def __init__(self, message: str, code: int = EXIT_INVALID) -> None:
        super().__init__(message)
        self.code = code


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see '{self.prog} --help')", EXIT_USAGE)


# -- parsing helpers ----------------------------------------------------------------------


def _argument_type(parse: Callable[[str], _T]) -> Callable[[str], _T]:
    """Wrap ``parse`` so its ValueError becomes argparse's one-line "argument --x: ..." error."""

    def convert(text: str) -> _T:
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    return convert


def _duration_arg(allow_zero: bool) -> Callable[[str], timedelta]:
    return _argument_type(lambda text: parse_duration(text, allow_zero=allow_zero))


_prefix_arg = _argument_type(validate_prefix)


def _meta_arg(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected k=v, got {text!r}")
    return name.strip(), value


# -- the session: store and manager for one command ----------------------------------------


def _env_flag(name: str) -> bool:
    """Read a yes/no environment variable; anything unclear is a usage error, not a guess."""
    value = os.environ.get(name, "").strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise CLIError(f"{name} must be 1 or 0, got {value!r}", EXIT_USAGE)


class _Session:
    """The store and manager for one command run, opened on first use and closed after."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.url: str = args.store or os.environ.get(STORE_URL_ENV) or DEFAULT_STORE_URL
        self._store: KeyStore | None = None
        self.now = time.time()
        #: The deployment's keys carry a checksum: ``--checksum`` or ``$KEYGUARD_CHECKSUM=1``.
        self.checksum = bool(getattr(args, "checksum", False)) or _env_flag(CHECKSUM_ENV)

    def missing_sqlite_file(self) -> str | None:
        """The SQLite path of the store URL if that file does not exist yet, else None."""
        parts = urlsplit(self.url.strip())
        if parts.scheme.lower() != "sqlite" or parts.netloc:
            return None
        path = unquote(parts.path[1:])
        return path if path and not os.path.exists(path) else None

    def store(self, *, create: bool = False) -> KeyStore:
        """Open the store; unless ``create``, a missing SQLite file is an error, not a new one."""
        if self._store is None:
            missing = None if create else self.missing_sqlite_file()
            if missing is not None:
                raise CLIError(
                    f"no key store at {missing!r}: create a key first, or pass --store URL"
                    f" or set {STORE_URL_ENV}",
                    EXIT_USAGE,
                )
            try:
                self._store = store_from_url(self.url)
            except (ValueError, TypeError, ImportError) as e:
                raise CLIError(str(e), EXIT_USAGE) from None
        return self._store

    def manager(
        self, prefix: str = DEFAULT_PREFIX, *, create: bool = False, checksum: bool | None = None
    ) -> APIKeyManager:
        """A manager over the store that never records "last used": a look is not a use.

        Its keys have a checksum if ``checksum`` says so, else if the session's does.
        """
        checksum = self.checksum if checksum is None else checksum
        store = self.store(create=create)
        try:
            return APIKeyManager(
                store, prefix=prefix, checksum=checksum, last_used_resolution=None
            )
        except ValueError as e:
            raise CLIError(f"{e} (check KEYGUARD_PEPPER)", EXIT_USAGE) from None

    def close(self) -> None:
        if self._store is not None:
            self._store.close()


def _read_key(ref: str) -> str:
    """``-`` reads the key from stdin, so it stays out of shell history and ``ps``."""
    if ref != "-":
        return ref
    key = sys.stdin.readline().strip()
    if not key:
        raise CLIError("no key on stdin: '-' reads the key from the first line", EXIT_USAGE)
    return key


def _key_format(key: str, checksum: bool) -> KeyFormat | None:
    """The format ``key`` claims (its prefix is everything before the 32 hex), if valid."""
    if len(key) <= KEY_BODY_LENGTH:
        return None
    try:
        fmt = KeyFormat(key[:-KEY_BODY_LENGTH], checksum=checksum)
    except ValueError:
        return None
    return fmt if fmt.matches(key) else None


def _resolve(session: _Session, ref: str) -> tuple[APIKeyManager, KeyInfo]:
    """Find the record named by a key_id or a key; a missing one is a CLIError (exit 1).

    The manager returned issues keys of the record's format, so a rotation keeps it: the
    record's prefix, and a checksum if the session asks for one or the given key has one.
    A record does not say whether its key had a checksum, so by key_id only the session
    (``--checksum``, ``$KEYGUARD_CHECKSUM``) can tell.
    """
    if _KEY_ID.fullmatch(ref):
        info = session.manager().get_key_info(ref)
        if info is None:
            raise CLIError(f"no key with key_id {ref!r}")
        return session.manager(info.prefix), info
    key = _read_key(ref)
    fmt = _key_format(key, checksum=False)  # the record, not the checksum, decides
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


# -- commands -------------------------------------------------------------------------------


def _cmd_create(session: _Session) -> int:
    args = session.args
    metadata: dict[str, Any] = {"user_id": args.user}
    for name, value in args.meta or ():
        if name in _RESERVED_META:
            raise CLIError(f"use {_RESERVED_META[name]} to set {name!r}, not --meta", EXIT_USAGE)
        metadata[name] = value
    if args.email is not None:
        metadata["email"] = args.email
    if args.name is not None:
        metadata["name"] = args.name
    if args.scope:
        metadata["permissions"] = list(dict.fromkeys(args.scope))
    manager = session.manager(args.prefix or DEFAULT_PREFIX, create=True)
    try:
        key, info = manager.create_key(metadata, expires_in=args.expires)
    except (ValueError, TypeError) as e:
        raise CLIError(str(e), EXIT_USAGE) from None
    if args.json:
        print_json({"key": key, **key_info_json(info, session.now)})
        return EXIT_OK
    expiry = (
        "never expires" if info.expires_at is None else f"expires {format_time(info.expires_at)}"
    )
    print(f"Created {info.key_id} for user {printable(info.user_id)!r} ({expiry}).")
    print_new_key(key)
    return EXIT_OK


def _cmd_list(session: _Session) -> int:
    args = session.args
    keys = session.manager().list_keys(args.user, include_inactive=args.all)
    if args.json:
        print_json({"keys": [key_info_json(k, session.now) for k in keys]})
        return EXIT_OK
    if not keys:
        print("No keys." if args.all else "No active keys (--all shows revoked and expired).")
        return EXIT_OK
    for line in key_table(keys, session.now, terminal_width()):
        print(line)
    return EXIT_OK


def _cmd_show(session: _Session) -> int:
    _, info = _resolve(session, session.args.ref)
    now = session.now
    if session.args.json:
        print_json(key_info_json(info, now))
        return EXIT_OK
    extra = {k: v for k, v in info.metadata.items() if k not in _RESERVED_META}
    fields = [
        ("key_id", info.key_id),
        ("hint", info.hint),
        ("user", info.user_id),
        ("email", info.metadata.get("email") or "-"),
        ("name", info.metadata.get("name") or "-"),
        ("scopes", ", ".join(info.scopes) or "-"),
        ("metadata", json.dumps(extra, ensure_ascii=False) if extra else "-"),
        ("created", format_time(info.created_at)),
        ("expires", format_time(info.expires_at)),
        ("revoked", format_time(info.revoked_at, "-")),
        ("last used", format_time(info.last_used_at)),
        ("status", info.status(now)),
        ("hashed as", info.hash_scheme),
    ]
    for label, value in fields:
        print(f"{label:<10} {printable(str(value))}")
    return EXIT_OK


def _cmd_revoke(session: _Session) -> int:
    manager, info = _resolve(session, session.args.ref)
    status = info.status(session.now)
    revoked = status == "active" and manager.revoke_by_id(info.key_id)
    if not revoked:
        if status == "active":
            status = "revoked"  # lost a race with another revoker
        raise CLIError(f"{info.key_id} ({info.hint}) is already {status}; nothing to revoke")
    if session.args.json:
        print_json({"revoked": True, "key_id": info.key_id, "hint": info.hint})
    else:
        print(f"Revoked {info.key_id} ({info.hint}) of user {printable(info.user_id)!r}.")
    return EXIT_OK


def _cmd_rotate(session: _Session) -> int:
    args = session.args
    manager, old = _resolve(session, args.ref)
    try:
        key = manager.rotate_by_id(old.key_id, grace=args.grace, expires_in=args.expires)
    except InvalidKeyError as e:
        raise CLIError(f"cannot rotate {old.key_id} ({old.hint}): it is {e.reason}") from None
    new = manager.store.get(manager.digest(key))
    after = manager.get_key_info(old.key_id)
    if new is None or after is None:
        raise CLIError("the store lost a key during rotation", EXIT_USAGE)
    if args.json:
        print_json(
            {
                "key": key,
                **key_info_json(new, session.now),
                "old": key_info_json(after, session.now),
            }
        )
        return EXIT_OK
    print(f"Rotated {old.key_id} into {new.key_id} for user {printable(new.user_id)!r}.")
    if after.revoked_at is not None:
        print(f"The old key {old.hint} is revoked.")
    else:
        print(f"The old key {old.hint} keeps working until {format_time(after.expires_at)}.")
    print_new_key(key)
    return EXIT_OK


def _cmd_verify(session: _Session) -> int:
    args = session.args
    key = _read_key(args.key)
    fmt = _key_format(key, checksum=False)
    manager = session.manager(fmt.prefix if fmt else DEFAULT_PREFIX)
    result = manager.verify(key)
    if args.json:
        info = None if result.key is None else key_info_json(result.key, session.now)
        print_json({"ok": result.ok, "reason": result.reason.value, "key": info})
    elif result.key is None:
        print(result.reason.value)
    else:
        user = printable(result.key.user_id)
        print(f"{result.reason.value}: {result.key.key_id} ({result.key.hint}) of user {user!r}")
    return EXIT_OK if result.ok else EXIT_INVALID


def _scan_store(session: _Session) -> KeyStore | None:
    """The store to judge findings against, or None to scan offline.

    A missing SQLite file means "no store here" (scan must not create one); any other
    store that cannot be opened is an error, because a silent offline scan would hide it.
    """
    if session.args.offline:
        return None
    missing = session.missing_sqlite_file()
    if missing is not None:
        return None
    return session.store()


def _check_hash_scheme(manager: APIKeyManager, records: list[KeyInfo]) -> None:
    """Refuse to call keys "unknown" when the store hashes keys differently.

    Schemes compare as whole strings: ``hmac-sha256:<pepper id>`` names the pepper too, so
    a mistyped ``KEYGUARD_PEPPER`` is caught, not only a missing one.
    """
    schemes = {r.hash_scheme for r in records}
    if records and manager.hash_scheme not in schemes:
        peppered = any(":" in scheme for scheme in (manager.hash_scheme, *schemes))
        ids = " (after ':' is a pepper id)" if peppered else ""
        raise CLIError(
            f"the store's keys are hashed with {'/'.join(sorted(schemes))} but this process"
            f" uses {manager.hash_scheme}{ids}: set KEYGUARD_PEPPER as the servers do",
            EXIT_USAGE,
        )


def _confirm(question: str) -> bool:
    sys.stdout.flush()  # the findings the question is about come first
    print(f"{question} [y/N] ", end="", file=sys.stderr, flush=True)
    answer = sys.stdin.readline()
    if not sys.stdin.isatty():
        # Echo a piped answer so the log reads well (masked: it could be a pasted key).
        print(_redact(answer.strip()), file=sys.stderr)
    return answer.strip().lower() in ("y", "yes")


def _cmd_scan(session: _Session) -> int:
    args = session.args
    if not args.paths and not args.rule:
        raise CLIError("scan needs at least one PATH (or --rule)", EXIT_USAGE)
    if args.max_bytes < 0:
        raise CLIError(f"--max-bytes must be >= 0, got {args.max_bytes}", EXIT_USAGE)
    for path in args.paths:
        if not os.path.lexists(path):
            raise CLIError(f"cannot read {path!r}: no such file or directory", EXIT_USAGE)
    store = _scan_store(session)
    if args.revoke and store is None:
        raise CLIError("--revoke needs a key store (drop --offline or pass --store)", EXIT_USAGE)
    manager = None if store is None else session.manager(checksum=False)
    # Listing a large store takes seconds, so it happens only when it must: to learn the
    # prefixes in use (no --prefix), or to check the pepper when a key is not found.
    records: list[KeyInfo] | None = None
    if args.prefix:
        prefixes = args.prefix
    else:
        records = [] if store is None else store.list_keys()
        prefixes = [DEFAULT_PREFIX, *sorted({r.prefix for r in records})]
    # With a store, a checksum-invalid string is looked up all the same, so that a live key
    # issued without a checksum is never hidden; offline, the checksum alone decides.
    offline_checksum = session.checksum and manager is None
    formats = [KeyFormat(p, checksum=offline_checksum) for p in dict.fromkeys(prefixes)]
    scanner = KeyScanner(formats, max_file_size=args.max_bytes)
    if args.rule:
        return _print_rule(session, scanner)

    report = scanner.scan(args.paths)
    # One lookup per distinct key, never a "last used" write: finding a key is not using it.
    judged: dict[str, KeyInfo | None] = {}
    if manager is not None:
        for finding in report.findings:
            if finding.key not in judged:
                judged[finding.key] = manager.store.get(manager.digest(finding.key))
        # A key found by its digest proves the pepper; only misses leave it in doubt.
        found = [info for info in judged.values() if info is not None]
        if len(found) < len(judged) and not found:
            _check_hash_scheme(manager, manager.store.list_keys() if records is None else records)
        if session.checksum:
            kept = [f for f in report.findings if judged[f.key] is not None or _has_crc(f)]
            report.rejected += len(report.findings) - len(kept)
            report.findings = kept

    def status(key: str) -> str:
        if manager is None:
            return "unchecked"
        info = judged[key]
        if info is None:
            return "unknown"
        state = info.status(session.now)
        return "live" if state == "active" else state

    live = {
        info.key_id: info
        for key, info in judged.items()
        if info is not None and status(key) == "live"
    }
    for skipped in report.unreadable:
        _error(f"cannot read {skipped.path!r}: {skipped.reason.partition(': ')[2]}")
    rows = []
    for f in report.findings:
        info = judged.get(f.key)
        rows.append(
            {
                "path": f.path,
                "line": f.line,
                "column": f.column,
                "prefix": f.format.prefix,
                "hint": f.masked,
                "status": status(f.key),
                "key_id": None if info is None else info.key_id,
            }
        )
    if not args.json:
        print_scan_report(report, rows, store_used=manager is not None)
    revoked: list[str] = []
    if args.revoke and live and manager is not None:
        names = ", ".join(f"{i.key_id} ({i.hint})" for i in live.values())
        if args.yes or _confirm(f"Revoke {len(live)} live key(s): {names}?"):
            revoked = [kid for kid in live if manager.revoke_by_id(kid)]
    if args.json:
        print_json(
            {
                "findings": rows,
                "files_scanned": report.files_scanned,
                "skipped": [{"path": s.path, "reason": s.reason} for s in report.skipped],
                "rejected": report.rejected,
                "checked_against_store": manager is not None,
                "revoked": revoked,
            }
        )
    else:
        print_revocations(revoked, live)
    if report.unreadable:
        return EXIT_USAGE
    failing = {"live", "unchecked"}
    return EXIT_INVALID if any(r["status"] in failing for r in rows) else EXIT_OK


def _has_crc(finding: Finding) -> bool:
    return KeyFormat(finding.format.prefix, checksum=True).matches(finding.key)


def _print_rule(session: _Session, scanner: KeyScanner) -> int:
    if session.args.json:
        print_json({"regex": scanner.pattern, "gitleaks": scanner.gitleaks_rule()})
        return EXIT_OK
    print("# Regex (POSIX ERE, RE2 and PCRE; group 2 is the key). A checksum is not checked.")
    print(scanner.pattern)
    print()
    print(scanner.gitleaks_rule(), end="")
    return EXIT_OK


# -- the parser -----------------------------------------------------------------------------


def _common_options(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    default: Any = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--store",
        metavar="URL",
        default=default,
        help=f"key store URL (default ${STORE_URL_ENV}, else {DEFAULT_STORE_URL})",
    )
    parser.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print machine-readable JSON",
    )


def build_parser() -> argparse.ArgumentParser:
    """Build the ``keyguard`` argument parser (one subparser per command)."""
    parser = _Parser(
        prog="keyguard",
        description="Issue, inspect, revoke and rotate API keys; scan files for leaked keys.",
        epilog=(
            "The key pepper, if any, comes from $KEYGUARD_PEPPER. If your servers use"
            f" checksum=True, set {CHECKSUM_ENV}=1: it acts as --checksum for every command."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    _common_options(parser, suppress=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(
        name: str, handler: Callable[[_Session], int], help: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        _common_options(sub, suppress=True)
        sub.set_defaults(handler=handler)
        return sub

    checksum_help = "keys carry a CRC32 in their last 8 hex (see the README's trade-off)"
    create = command("create", _cmd_create, "issue a key and print it once")
    create.add_argument("--user", required=True, help="the key's owner (user_id)")
    create.add_argument("--email")
    create.add_argument("--name", help="a label stored in the metadata")
    create.add_argument(
        "--scope", action="append", metavar="SCOPE", help="a permission; repeat for more"
    )
    create.add_argument(
        "--meta", action="append", type=_meta_arg, metavar="K=V", help="extra metadata; repeat"
    )
    create.add_argument(
        "--expires", type=_duration_arg(False), metavar="DURATION", help="e.g. 90d, 24h, 2w"
    )
    create.add_argument(
        "--prefix", type=_prefix_arg, help=f"key prefix (default {DEFAULT_PREFIX})"
    )
    create.add_argument("--checksum", action="store_true", help=checksum_help)

    listing = command("list", _cmd_list, "list keys in an aligned table")
    listing.add_argument("--user", help="only this user's keys")
    listing.add_argument("--all", action="store_true", help="include revoked and expired keys")

    show = command("show", _cmd_show, "show one key's record")
    show.add_argument("ref", metavar="KEY_ID", help="a key_id, or a key ('-' reads stdin)")

    revoke = command("revoke", _cmd_revoke, "revoke a key at once")
    revoke.add_argument("ref", metavar="KEY_ID|KEY", help="'-' reads the key from stdin")

    rotate = command("rotate", _cmd_rotate, "issue a replacement and retire the old key")
    rotate.add_argument("ref", metavar="KEY_ID|KEY", help="'-' reads the key from stdin")
    rotate.add_argument(
        "--grace",
        type=_duration_arg(True),
        default=timedelta(hours=24),
        metavar="DURATION",
        help="how long the old key keeps working (default 24h; 0s revokes it now)",
    )
    rotate.add_argument(
        "--expires",
        type=_duration_arg(False),
        metavar="DURATION",
        help="lifetime of the new key (default: the old key's lifetime)",
    )
    rotate.add_argument(
        "--checksum",
        action="store_true",
        help="the new key has a checksum; a KEY given in full keeps its own, but a KEY_ID"
        f" cannot tell, so pass this (or set {CHECKSUM_ENV}=1) if your servers use checksum=True",
    )

    verify = command("verify", _cmd_verify, "check a key; exit 0 if valid, 1 if not")
    verify.add_argument("key", metavar="KEY", help="the key ('-' reads it from stdin)")
    verify.add_argument("--checksum", action="store_true", help="require a valid checksum")

    scan = command("scan", _cmd_scan, "find leaked keys in files; exit 1 if a live one is found")
    scan.add_argument("paths", nargs="*", metavar="PATH", help="files and directories")
    scan.add_argument(
        "--prefix",
        action="append",
        type=_prefix_arg,
        metavar="P",
        help=f"look for this key prefix; repeat (default: {DEFAULT_PREFIX} and every prefix in"
        f" the store, which means listing it; offline, only {DEFAULT_PREFIX})",
    )
    scan.add_argument(
        "--checksum",
        action="store_true",
        help="ignore strings whose checksum is wrong, unless the store knows them (offline:"
        " always, so use it offline only once every key in use has a checksum)",
    )
    scan.add_argument("--revoke", action="store_true", help="revoke the live keys found")
    scan.add_argument("--yes", "-y", action="store_true", help="revoke without asking")
    scan.add_argument("--offline", action="store_true", help="do not consult the store")
    scan.add_argument(
        "--max-bytes",
        type=int,
        default=DEFAULT_MAX_FILE_SIZE,
        metavar="N",
        help=f"skip files larger than N bytes (default {DEFAULT_MAX_FILE_SIZE})",
    )
    scan.add_argument(
        "--rule", action="store_true", help="print a regex and a gitleaks rule, then exit"
    )
    return parser


def _redact(text: str) -> str:
    """Mask every word of ``text`` that holds 32 lowercase hex, as a key would."""
    return _WORD.sub(lambda m: mask_key(m[0]) if _KEY_BODY.search(m[0]) else m[0], text)


def _error(message: str) -> None:
    # Argparse and library messages quote the offending argument, which may be a key.
    print(f"keyguard: error: {_redact(' '.join(message.split()))}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``keyguard`` command line and return its exit code."""
    session: _Session | None = None
    try:
        args = build_parser().parse_args(argv)
        session = _Session(args)
        code: int = args.handler(session)
        sys.stdout.flush()
        return code
    except CLIError as e:
        _error(str(e))
        return e.code
    except KeyguardError as e:  # StoreError and friends: the store cannot be used
        _error(str(e))
        return EXIT_USAGE
    except SystemExit as e:  # --help
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away; point stdout at devnull so exit is quiet.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_INVALID
    except Exception:  # a bug: keep the traceback for the report, but never a key in it
        sys.stderr.write(_redact(traceback.format_exc()))
        return EXIT_INVALID
    finally:
        if session is not None:
            session.close()
