"""The ``scan`` command: find leaked keys in files and judge each against the store.

The scanner itself stays the public library module :mod:`keyguard.scan` (the README shows
``keyguard.scan.KeyScanner``); this module is only the command around it: which prefixes
to look for, what the store says of each key found, ``--revoke`` and ``--rule``.
"""

from __future__ import annotations

import os
import sys

from .. import _drf
from ..keys import DEFAULT_PREFIX, KeyFormat
from ..manager import APIKeyManager
from ..records import KeyInfo
from ..scan import Finding, KeyScanner
from ..stores import KeyStore
from ._output import print_error, print_json, print_revocations, print_scan_report, redact
from ._session import EXIT_INVALID, EXIT_OK, EXIT_USAGE, CLIError, Session

__all__ = ["cmd_scan"]


def _scan_store(session: Session) -> KeyStore | None:
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


def _survey(manager: APIKeyManager | None) -> tuple[set[str], set[str]]:
    """The key prefixes and hash schemes in use in the store (none without a store).

    The store is read a page at a time and only these two small sets are kept, so memory
    stays flat however many keys it holds. An imported drf-api-key record adds its scheme
    as keyguard applied it (the pepper is the servers' all the same) and no prefix: its
    prefix is its own, not a format the scanner could look for.
    """
    prefixes: set[str] = set()
    schemes: set[str] = set()
    if manager is not None:
        for info in manager.iter_keys(include_inactive=True):
            scheme = info.hash_scheme
            if scheme.startswith(_drf.SCHEME_TAG):
                schemes.add(scheme.removeprefix(_drf.SCHEME_TAG))
            else:
                prefixes.add(info.prefix)
                schemes.add(scheme)
    return prefixes, schemes


def _check_hash_scheme(manager: APIKeyManager, schemes: set[str]) -> None:
    """Refuse to call keys "unknown" when the store hashes keys differently.

    Schemes compare as whole strings: ``hmac-sha256:<pepper id>`` names the pepper too, so
    a mistyped ``KEYGUARD_PEPPER`` is caught, not only a missing one.
    """
    if schemes and manager.hash_scheme not in schemes:
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
        print(redact(answer.strip()), file=sys.stderr)
    return answer.strip().lower() in ("y", "yes")


def cmd_scan(session: Session) -> int:
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
    # Reading a large store takes seconds, so it happens only when it must: to learn the
    # prefixes in use (no --prefix), or to check the pepper when a key is not found.
    survey: tuple[set[str], set[str]] | None = None
    if args.prefix:
        prefixes = args.prefix
    else:
        survey = _survey(manager)
        prefixes = [DEFAULT_PREFIX, *sorted(survey[0])]
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
        if judged and not found:
            _check_hash_scheme(manager, (survey or _survey(manager))[1])
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
        print_error(f"cannot read {skipped.path!r}: {skipped.reason.partition(': ')[2]}")
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
            revoked = [kid for kid in live if manager.revoke_by_id(kid, actor=session.actor)]
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


def _print_rule(session: Session, scanner: KeyScanner) -> int:
    if session.args.json:
        print_json({"regex": scanner.pattern, "gitleaks": scanner.gitleaks_rule()})
        return EXIT_OK
    print("# Regex (POSIX ERE, RE2 and PCRE; group 2 is the key). A checksum is not checked.")
    print(scanner.pattern)
    print()
    print(scanner.gitleaks_rule(), end="")
    return EXIT_OK
