"""Find keyguard keys leaked into files, and describe the key format to other scanners.

The scanner is pure: it reads files and reports where strings of the given key formats
occur. Whether a found key is live is the caller's business (the CLI asks the store), so
the same scanner serves a pre-commit hook, a CI step and library code.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from .keys import KEY_BODY_LENGTH, KeyFormat, mask_key

__all__ = [
    "DEFAULT_MAX_FILE_SIZE",
    "SKIPPED_DIRS",
    "Finding",
    "KeyScanner",
    "ScanReport",
    "Skipped",
]

#: Files larger than this are skipped: keys leak into source and config, not into dumps.
DEFAULT_MAX_FILE_SIZE = 1024 * 1024
#: Directory names never descended into.
SKIPPED_DIRS = frozenset({".git"})
_BINARY_SNIFF = 8192
_NOT_REGULAR = "not a regular file"
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_BINARY", 0)
    | getattr(os, "O_CLOEXEC", 0)
)
# A key must stand as its own token: "task_<32 hex>" or a 40-hex digest is not a key.
# The exported pattern has no lookarounds so it runs in grep -E, RE2 (gitleaks) and PCRE;
# the scanner itself uses lookarounds so that "key1,key2" yields both keys.
_BEFORE = "(^|[^A-Za-z0-9])"
_AFTER = "([^A-Za-z0-9]|$)"


@dataclass(frozen=True)
class Finding:
    """A string of a key format found at ``path:line:column`` (1-based).

    ``key`` is the full candidate, so the caller can look it up or revoke it; it is left
    out of the repr, and :attr:`masked` is the form to show.
    """

    path: str
    line: int
    column: int
    format: KeyFormat
    key: str = field(repr=False)

    @property
    def masked(self) -> str:
        """The key as it may be displayed, e.g. ``sk_…9f2a``."""
        return mask_key(self.key, self.format.prefix)


@dataclass(frozen=True)
class Skipped:
    """A path the scanner did not read, and why.

    ``reason`` is ``binary``, ``too large``, ``not a regular file`` or ``unreadable: …``.
    """

    path: str
    reason: str


@dataclass
class ScanReport:
    """Everything one scan saw: findings in file order, skipped files, rejected candidates.

    ``rejected`` counts strings of key form whose checksum is wrong (only for formats
    with ``checksum=True``): typos and invented keys, dropped without any lookup.
    """

    findings: list[Finding] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    files_scanned: int = 0
    rejected: int = 0

    @property
    def unreadable(self) -> list[Skipped]:
        """Files that could not be read, so the scan is incomplete."""
        return [s for s in self.skipped if s.reason.startswith("unreadable")]


class KeyScanner:
    """Scan bytes, files and directory trees for keys of the given formats.

    :param formats: key formats (or bare prefixes) to look for; a format with
        ``checksum=True`` drops candidates whose CRC32 does not match.
    :param max_file_size: files larger than this many bytes are skipped.
    """

    def __init__(
        self,
        formats: Iterable[KeyFormat | str],
        *,
        max_file_size: int = DEFAULT_MAX_FILE_SIZE,
    ) -> None:
        found = [f if isinstance(f, KeyFormat) else KeyFormat(f) for f in formats]
        if not found:
            raise ValueError("KeyScanner needs at least one key format")
        # Longest prefix first, so "sk_live_" wins over "sk_" wherever both could match.
        self.formats: tuple[KeyFormat, ...] = tuple(
            sorted(dict.fromkeys(found), key=lambda f: (-len(f.prefix), f.prefix))
        )
        if max_file_size < 0:
            raise ValueError(f"max_file_size must be >= 0, got {max_file_size}")
        self.max_file_size = max_file_size
        self._by_prefix = {f.prefix: f for f in self.formats}
        prefixes = "|".join(f.prefix for f in self.formats)
        self._regex = re.compile(
            f"(?<![A-Za-z0-9])(({prefixes})[0-9a-f]{{{KEY_BODY_LENGTH}}})(?![A-Za-z0-9])".encode()
        )

    def __repr__(self) -> str:
        return f"KeyScanner(formats={list(self.formats)!r})"

    @property
    def pattern(self) -> str:
        """A portable regex for these formats; group 2 is the key, group 3 its prefix.

        It uses only what POSIX ERE, RE2 and Python share, so ``grep -E`` and gitleaks
        accept it unchanged. A checksum cannot be expressed in a regex, so it is not checked.
        """
        # Prefixes are [A-Za-z0-9_-] only (see keys.validate_prefix): nothing to escape.
        prefixes = "|".join(f.prefix for f in self.formats)
        return f"{_BEFORE}(({prefixes})[0-9a-f]{{{KEY_BODY_LENGTH}}}){_AFTER}"

    def gitleaks_rule(self, rule_id: str = "keyguard-api-key") -> str:
        """Return a gitleaks (v8) TOML config that adds a rule for these formats."""
        keywords = ", ".join(f'"{f.prefix}"' for f in self.formats)
        return (
            "# Add to .gitleaks.toml; [extend] keeps gitleaks' default rules.\n"
            "[extend]\n"
            "useDefault = true\n"
            "\n"
            "[[rules]]\n"
            f'id = "{rule_id}"\n'
            'description = "keyguard API key"\n'
            f"regex = '''{self.pattern}'''\n"
            "secretGroup = 2\n"
            f"keywords = [{keywords}]\n"
        )

    def scan_bytes(self, data: bytes, path: str = "<bytes>") -> tuple[list[Finding], int]:
        """Return the findings in ``data`` (attributed to ``path``) and the rejected count."""
        findings: list[Finding] = []
        rejected = 0
        line, line_start, counted_to = 1, 0, 0
        for match in self._regex.finditer(data):
            start = match.start(1)
            newlines = data.count(b"\n", counted_to, start)
            if newlines:
                line += newlines
                line_start = data.rindex(b"\n", counted_to, start) + 1
            counted_to = start
            key = match.group(1).decode("ascii")
            fmt = self._by_prefix[match.group(2).decode("ascii")]
            if fmt.checksum and not fmt.matches(key):
                rejected += 1
                continue
            findings.append(Finding(path, line, start - line_start + 1, fmt, key))
        return findings, rejected

    def scan_file(self, path: str, report: ScanReport) -> None:
        """Scan one file into ``report``, or record why it was skipped.

        Only regular files are opened: opening a FIFO blocks until something writes to it,
        and a device may never end or may act on being opened. Such paths are skipped as
        ``not a regular file``.
        """
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                report.skipped.append(Skipped(path, _NOT_REGULAR))
                return
            # Non-blocking, in case the path was swapped for a FIFO since the stat above.
            with open(os.open(path, _OPEN_FLAGS), "rb") as f:
                info = os.fstat(f.fileno())
                if not stat.S_ISREG(info.st_mode):
                    report.skipped.append(Skipped(path, _NOT_REGULAR))
                    return
                if info.st_size > self.max_file_size:
                    report.skipped.append(Skipped(path, "too large"))
                    return
                data = f.read(self.max_file_size + 1)
        except OSError as e:
            report.skipped.append(Skipped(path, f"unreadable: {e.strerror or e}"))
            return
        if len(data) > self.max_file_size:
            report.skipped.append(Skipped(path, "too large"))
            return
        if b"\0" in data[:_BINARY_SNIFF]:
            report.skipped.append(Skipped(path, "binary"))
            return
        findings, rejected = self.scan_bytes(data, path)
        report.findings.extend(findings)
        report.rejected += rejected
        report.files_scanned += 1

    def scan(self, paths: Iterable[str | os.PathLike[str]]) -> ScanReport:
        """Scan files and directory trees (skipping ``.git`` and symlinks inside trees).

        A path that does not exist or cannot be listed is recorded as unreadable.
        """
        report = ScanReport()
        for root in paths:
            for path in self._files(os.fspath(root), report):
                self.scan_file(path, report)
        return report

    def _files(self, root: str, report: ScanReport) -> Iterator[str]:
        if not os.path.isdir(root):
            yield root
            return

        def unreadable(error: OSError) -> None:
            name = error.filename if isinstance(error.filename, str) else root
            report.skipped.append(Skipped(name, f"unreadable: {error.strerror or error}"))

        # Symlinks are not followed: they lead out of the tree or loop back into it.
        for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
            dirnames[:] = sorted(
                d
                for d in dirnames
                if d not in SKIPPED_DIRS and not os.path.islink(os.path.join(dirpath, d))
            )
            for name in sorted(filenames):
                path = os.path.join(dirpath, name)
                if not os.path.islink(path):
                    yield path
