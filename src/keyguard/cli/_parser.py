"""The ``keyguard`` argument parser: the common options, then one subcommand per command.

Its errors are one line and exit code 2, like every other usage error of the command.
It is long because it is a table: one short block of arguments and help per command, the
whole command line readable in one place.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NoReturn, TypeVar

from .. import __version__
from ..imports import DRF_TABLE
from ..keys import DEFAULT_PREFIX, validate_prefix
from ..limits import parse_quota, parse_rates
from ..scan import DEFAULT_MAX_FILE_SIZE
from ..stores import DEFAULT_STORE_URL, STORE_URL_ENV
from . import _commands, _events, _import, _scan, _usage
from ._durations import parse_duration
from ._session import CHECKSUM_ENV, EXIT_USAGE, CLIError, Session

__all__ = ["build_parser"]

_T = TypeVar("_T")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        raise CLIError(f"{message} (see '{self.prog} --help')", EXIT_USAGE)


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
_rate_arg = _argument_type(lambda text: str(parse_rates([text])[0]))
_quota_arg = _argument_type(lambda text: str(parse_quota(text)))


#: The most credits one ``keyguard credits`` call adds.
_MAX_CREDITS = 10**12


def _credits_arg(text: str) -> int:
    digits = text[1:] if text.startswith("+") else text
    # The length first: int() refuses strings of thousands of digits with its own message.
    valid = digits.isascii() and digits.isdigit() and len(digits.lstrip("0")) <= 13
    if not valid or not 0 < int(digits) <= _MAX_CREDITS:
        raise argparse.ArgumentTypeError(
            f"expected +N, a whole number from 1 to {_MAX_CREDITS:,}, got {text!r}"
        )
    return int(digits)


def _meta_arg(text: str) -> tuple[str, str]:
    name, sep, value = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected k=v, got {text!r}")
    return name.strip(), value


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
        name: str, handler: Callable[[Session], int], help: str
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        _common_options(sub, suppress=True)
        sub.set_defaults(handler=handler)
        return sub

    # Handlers are read off their modules each time main() builds the parser, so a test can
    # replace one with monkeypatch.
    checksum_help = "keys carry a CRC32 in their last 8 hex (see the README's trade-off)"
    create = command("create", _commands.cmd_create, "issue a key and print it once")
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
    create.add_argument(
        "--rate-limit",
        action="append",
        type=_rate_arg,
        metavar="N/UNIT",
        help="e.g. 10/second, 1000/hour (unit: second, minute, hour, day); repeat for more",
    )
    create.add_argument(
        "--allowed-ip",
        action="append",
        metavar="CIDR",
        help="only requests from this address or network (203.0.113.0/24); repeat for more",
    )
    create.add_argument(
        "--quota",
        type=_quota_arg,
        metavar="N[/PERIOD]",
        help="uses allowed: N/hour, N/day or N/month (refilled each period, UTC), or N in all",
    )

    listing = command("list", _commands.cmd_list, "list keys in an aligned table")
    listing.add_argument("--user", help="only this user's keys")
    listing.add_argument("--all", action="store_true", help="include revoked and expired keys")
    listing.add_argument(
        "--family",
        metavar="KEY_ID",
        help="every generation of this key (rotated from one another), oldest first",
    )
    listing.add_argument(
        "--expiring",
        type=_duration_arg(False),
        metavar="DURATION",
        help="only active keys that expire within DURATION (e.g. 14d)",
    )

    show = command("show", _commands.cmd_show, "show one key's record")
    show.add_argument("ref", metavar="KEY_ID", help="a key_id, or a key ('-' reads stdin)")

    revoke = command("revoke", _commands.cmd_revoke, "revoke a key at once")
    revoke.add_argument("ref", metavar="KEY_ID|KEY", help="'-' reads the key from stdin")

    rotate = command("rotate", _commands.cmd_rotate, "issue a replacement and retire the old key")
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

    credits = command("credits", _commands.cmd_credits, "add credits to a key's quota")
    credits.add_argument("ref", metavar="KEY_ID", help="a key_id, or a key ('-' reads stdin)")
    credits.add_argument("credits", type=_credits_arg, metavar="+N", help="credits to add")

    update = command(
        "update", _commands.cmd_update, "change a key's scopes, limits or expiry; same secret"
    )
    update.add_argument("ref", metavar="KEY_ID|KEY", help="'-' reads the key from stdin")
    scopes = update.add_mutually_exclusive_group()
    scopes.add_argument(
        "--scope", action="append", metavar="SCOPE", help="the key's scopes from now on; repeat"
    )
    scopes.add_argument("--no-scopes", action="store_true", help="remove every scope")
    update.add_argument("--name", help="a new label")
    update.add_argument("--email", help="a new email ('' removes it)")
    update.add_argument(
        "--meta", action="append", type=_meta_arg, metavar="K=V", help="set metadata; repeat"
    )
    update.add_argument(
        "--unset-meta", action="append", metavar="K", help="remove a metadata field; repeat"
    )
    expiry = update.add_mutually_exclusive_group()
    expiry.add_argument(
        "--expires", type=_duration_arg(False), metavar="DURATION", help="expire in, e.g. 30d"
    )
    expiry.add_argument("--no-expiry", action="store_true", help="never expire")
    rates = update.add_mutually_exclusive_group()
    rates.add_argument(
        "--rate-limit",
        action="append",
        type=_rate_arg,
        metavar="N/UNIT",
        help="the key's rate limits from now on; repeat",
    )
    rates.add_argument("--no-rate-limits", action="store_true", help="remove the rate limits")
    quota = update.add_mutually_exclusive_group()
    quota.add_argument("--quota", type=_quota_arg, metavar="N[/PERIOD]", help="a new quota")
    quota.add_argument("--no-quota", action="store_true", help="remove the quota")
    networks = update.add_mutually_exclusive_group()
    networks.add_argument(
        "--allowed-ip",
        action="append",
        metavar="CIDR",
        help="the networks the key may be used from from now on; repeat",
    )
    networks.add_argument(
        "--any-ip", action="store_true", help="allow every address (widens the key)"
    )
    update.add_argument(
        "--allow-widen",
        action="store_true",
        help="allow adding scopes or networks, or reviving an expired key",
    )

    verify = command("verify", _commands.cmd_verify, "check a key; exit 0 if valid, 1 if not")
    verify.add_argument("key", metavar="KEY", help="the key ('-' reads it from stdin)")
    verify.add_argument("--checksum", action="store_true", help="require a valid checksum")

    usage = command("usage", _usage.cmd_usage, "show a key's requests and refusals over time")
    usage.add_argument("ref", metavar="KEY_ID|KEY", help="'-' reads the key from stdin")
    usage.add_argument(
        "--key-only",
        action="store_true",
        help="this key's own counts (default: summed over every generation of a rotated key)",
    )
    usage.add_argument(
        "--since",
        type=_argument_type(_usage.parse_since),
        metavar="WHEN",
        help="how far back from --until (e.g. 7d), or a UTC date/time"
        " (default: 60 minutes, 24 hours or 30 days)",
    )
    usage.add_argument(
        "--until",
        type=_argument_type(_usage.parse_until),
        metavar="WHEN",
        help="how long ago (e.g. 1d), or a UTC date/time (default: now)",
    )
    usage.add_argument(
        "--step", choices=("minute", "hour", "day"), default="hour", help="default: hour"
    )

    events = command(
        "events", _events.cmd_events, "show the audit trail of changes to keys, newest first"
    )
    events.add_argument(
        "ref",
        nargs="?",
        metavar="KEY_ID",
        help="only this key's events (a key_id, or a key: '-' reads stdin); default: all keys",
    )
    events.add_argument(
        "--since",
        type=_argument_type(_usage.parse_since),
        metavar="WHEN",
        help="only events since then: how long ago (e.g. 7d), or a UTC date/time",
    )
    events.add_argument(
        "--limit",
        type=_argument_type(_events.parse_limit),
        default=_events.DEFAULT_LIMIT,
        metavar="N",
        help=f"at most the N newest events (default {_events.DEFAULT_LIMIT})",
    )

    importing = command(
        "import",
        _import.cmd_import,
        "import another system's stored keys so its callers' keys keep working",
    )
    importing.add_argument(
        "--from",
        dest="source",
        required=True,
        choices=("drf-api-key",),
        help="the system the keys come from (djangorestframework-api-key)",
    )
    importing.add_argument(
        "--database",
        required=True,
        metavar="DB",
        help="its database: a SQLite file (read-only) or a postgresql:// URL",
    )
    importing.add_argument(
        "--table", default=DRF_TABLE, help=f"the table, or schema.table (default {DRF_TABLE})"
    )
    owner = importing.add_mutually_exclusive_group()
    owner.add_argument(
        "--user-id",
        metavar="USER",
        help="the owner (user_id) of every imported key (default: each key's drf name)",
    )
    owner.add_argument(
        "--user-column",
        metavar="COLUMN",
        help="take each key's owner from this column (e.g. organization_id)",
    )
    importing.add_argument(
        "--dry-run", action="store_true", help="report what would be imported; write nothing"
    )

    scan = command(
        "scan", _scan.cmd_scan, "find leaked keys in files; exit 1 if a live one is found"
    )
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
