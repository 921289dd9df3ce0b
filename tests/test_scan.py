"""The leak scanner: ``KeyScanner`` on bytes and trees, and ``keyguard scan`` end to end."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from keyguard import APIKeyManager, KeyFormat, KeyInfo, SQLiteStore
from keyguard.cli import main
from keyguard.scan import KeyScanner, ScanReport, Skipped
from tests.test_cli import CLI, Result, error_line

BODY = "0123456789abcdef" * 2
KEY = "sk_" + BODY
OTHER = "sk_" + "fedcba9876543210" * 2


def keys_found(data: str, *formats: KeyFormat | str) -> list[str]:
    findings, _ = KeyScanner(formats or ["sk_"]).scan_bytes(data.encode())
    return [f.key for f in findings]


# -- KeyScanner on bytes ----------------------------------------------------------------------


def test_findings_carry_line_and_column() -> None:
    data = f"first\r\nsecret = '{KEY}'\n\nKEY={OTHER} # again {KEY}\n".encode()

    findings, rejected = KeyScanner(["sk_"]).scan_bytes(data, "conf.py")

    assert [(f.path, f.line, f.column, f.key) for f in findings] == [
        ("conf.py", 2, 11, KEY),
        ("conf.py", 4, 5, OTHER),
        ("conf.py", 4, 49, KEY),
    ]
    assert rejected == 0


@pytest.mark.parametrize(
    ("text", "found"),
    [
        pytest.param(KEY, [KEY], id="whole input"),
        pytest.param(f'token = "{KEY}"', [KEY], id="quoted"),
        pytest.param(f"https://api.example.com/?key={KEY}&x=1", [KEY], id="in a URL"),
        pytest.param(f"{KEY},{OTHER}", [KEY, OTHER], id="two keys, one separator"),
        pytest.param(f"MY_{KEY}", [KEY], id="after an underscore"),
        pytest.param(f"task_{BODY}", [], id="inside a longer word"),
        pytest.param(f"{KEY}0", [], id="33 hex digits"),
        pytest.param(f"{KEY}g", [], id="followed by a letter"),
        pytest.param("sk_" + BODY.upper(), [], id="upper-case hex"),
        pytest.param(KEY[:-1], [], id="31 hex digits"),
    ],
)
def test_a_key_must_stand_as_its_own_token(text: str, found: list[str]) -> None:
    assert keys_found(text) == found


def test_the_longest_matching_prefix_names_the_format() -> None:
    findings, _ = KeyScanner(["sk_", "sk_live_"]).scan_bytes(f"{KEY} sk_live_{BODY}".encode())

    assert [(f.format.prefix, f.key) for f in findings] == [
        ("sk_", KEY),
        ("sk_live_", f"sk_live_{BODY}"),
    ]


def test_checksum_formats_reject_invalid_candidates() -> None:
    fmt = KeyFormat("sk_", checksum=True)
    good = fmt.generate()
    typo = good[:-1] + ("0" if good[-1] != "0" else "1")

    findings, rejected = KeyScanner([fmt]).scan_bytes(f"{good}\n{typo}\n".encode())

    assert [f.key for f in findings] == [good]
    assert rejected == 1
    assert keys_found(typo) == [typo]  # without the checksum it is a candidate


def test_finding_repr_and_masked_form_hide_the_key() -> None:
    findings, _ = KeyScanner(["sk_"]).scan_bytes(KEY.encode(), "a.py")

    assert KEY not in repr(findings[0])
    assert findings[0].masked == "sk_…cdef"


@pytest.mark.parametrize(
    ("formats", "max_file_size", "message"),
    [
        pytest.param([], 10, "KeyScanner needs at least one key format", id="no formats"),
        pytest.param(["sk_"], -1, "max_file_size must be >= 0, got -1", id="negative size"),
        pytest.param(["s k"], 10, "invalid key prefix 's k'", id="bad prefix"),
    ],
)
def test_bad_configuration_raises(formats: list[str], max_file_size: int, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        KeyScanner(formats, max_file_size=max_file_size)


# -- KeyScanner on trees ------------------------------------------------------------------------


def test_scan_walks_a_tree_skipping_git_binary_large_and_symlinks(tmp_path: Path) -> None:
    (tmp_path / "src" / "pkg").mkdir(parents=True)
    (tmp_path / "src" / "pkg" / "b.py").write_text(f"B = '{KEY}'\n")
    (tmp_path / "src" / "a.env").write_text(f"A={OTHER}\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text(KEY)
    (tmp_path / "src" / "vendor" / ".git").mkdir(parents=True)
    (tmp_path / "src" / "vendor" / ".git" / "HEAD").write_text(KEY)
    (tmp_path / "blob.bin").write_bytes(b"\x89PNG\0\0" + KEY.encode())
    (tmp_path / "big.log").write_text(KEY + "x" * 100)
    (tmp_path / "exact.txt").write_text(KEY.ljust(100, " "))
    (tmp_path / "link.py").symlink_to(tmp_path / "src" / "a.env")
    (tmp_path / "linkdir").symlink_to(tmp_path / "src")

    report = KeyScanner(["sk_"], max_file_size=100).scan([tmp_path])

    assert [(os.path.relpath(f.path, tmp_path), f.key) for f in report.findings] == [
        ("exact.txt", KEY),
        (os.path.join("src", "a.env"), OTHER),
        (os.path.join("src", "pkg", "b.py"), KEY),
    ]
    assert report.files_scanned == 3
    assert sorted((os.path.basename(s.path), s.reason) for s in report.skipped) == [
        ("big.log", "too large"),
        ("blob.bin", "binary"),
    ]
    assert report.unreadable == []


def test_scan_records_paths_it_cannot_read(tmp_path: Path) -> None:
    named = tmp_path / "a.txt"
    named.write_text(KEY)
    missing = tmp_path / "missing.txt"

    report = KeyScanner(["sk_"]).scan([named, missing])

    assert [f.key for f in report.findings] == [KEY]
    assert report.unreadable == [Skipped(str(missing), "unreadable: No such file or directory")]


def test_scan_skips_what_is_not_a_regular_file_without_blocking(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text(KEY)
    (tmp_path / "sub").mkdir()
    fifo = tmp_path / "sub" / "fifo"
    os.mkfifo(fifo)
    found: list[ScanReport] = []
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "sock"))
        scan = threading.Thread(
            target=lambda: found.append(KeyScanner(["sk_"]).scan([tmp_path, os.devnull])),
            daemon=True,
        )
        scan.start()
        scan.join(10)
    if scan.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))  # let the blocked open() return
        scan.join(10)
        pytest.fail("the scan blocked opening a FIFO")

    (report,) = found
    assert [f.key for f in report.findings] == [KEY]
    assert report.files_scanned == 1
    assert sorted(report.skipped, key=lambda s: s.path) == [
        Skipped(os.devnull, "not a regular file"),
        Skipped(str(tmp_path / "sock"), "not a regular file"),
        Skipped(str(fifo), "not a regular file"),
    ]
    assert report.unreadable == []


# -- rules for other scanners ---------------------------------------------------------------------


def test_the_pattern_finds_the_same_keys_with_grep(tmp_path: Path) -> None:
    grep = shutil.which("grep")
    if grep is None:
        pytest.skip("grep is not installed, so the POSIX ERE form cannot be checked")
    scanner = KeyScanner(["sk_", "pk_live_"])
    lines = [f"a = '{KEY}'", f"task_{BODY}", f"pk_live_{BODY}", f"{KEY}0", "nothing", OTHER]
    sample = tmp_path / "sample.txt"
    sample.write_text("\n".join(lines) + "\n")

    done = subprocess.run(
        [grep, "-En", scanner.pattern, str(sample)], capture_output=True, text=True, check=True
    )

    matched = [int(line.split(":", 1)[0]) for line in done.stdout.splitlines()]
    report = scanner.scan([sample])
    assert matched == [f.line for f in report.findings] == [1, 3, 6]
    groups = [re.search(scanner.pattern, line) for line in lines]
    assert [m.group(2) for m in groups if m] == [KEY, f"pk_live_{BODY}", OTHER]


def test_gitleaks_rule_is_valid_toml_with_the_pattern() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the stdlib from Python 3.11")
    scanner = KeyScanner(["sk_", "pk_"])

    config = tomllib.loads(scanner.gitleaks_rule())

    assert config["extend"] == {"useDefault": True}
    (rule,) = config["rules"]
    assert rule["id"] == "keyguard-api-key"
    assert rule["regex"] == scanner.pattern
    assert rule["secretGroup"] == 2
    assert sorted(rule["keywords"]) == ["pk_", "sk_"]


# -- keyguard scan ------------------------------------------------------------------------------


class Leaks:
    """A repository tree with live, revoked, fake and checksum-invalid keys."""

    def __init__(self, cli: CLI) -> None:
        self.live, self.live_record = cli.create("--user", "alice", "--checksum")
        self.revoked, self.revoked_record = cli.create("--user", "bob", "--checksum")
        assert cli("revoke", self.revoked_record["key_id"]).code == 0
        self.fake = KeyFormat("sk_", checksum=True).generate()  # well formed, never issued
        last = self.fake[-1]
        self.typo = self.fake[:-1] + ("0" if last != "0" else "1")  # checksum no longer matches
        self.secrets = (self.live, self.revoked, self.fake, self.typo)
        root = cli.cwd / "repo"
        (root / "src").mkdir(parents=True)
        (root / "src" / "settings.py").write_text(f"DEBUG = True\n\nAPI_KEY = '{self.live}'\n")
        (root / "docs").mkdir()
        (root / "docs" / "old.md").write_text(f"Old key: `{self.revoked}`\n")
        (root / "tests").mkdir()
        (root / "tests" / "fake.txt").write_text(f"{self.fake}\n{self.typo}\n")
        (root / ".git").mkdir()
        (root / ".git" / "COMMIT_EDITMSG").write_text(f"oops {self.live}\n")
        (root / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0" + self.live.encode())

    def hint(self, key: str) -> str:
        return f"sk_…{key[-4:]}"

    def assert_masked(self, result: Result) -> None:
        for key in self.secrets:
            assert key not in result.out and key not in result.err


@pytest.fixture
def leaks(tmp_path: Path) -> tuple[CLI, Leaks]:
    cli = CLI(tmp_path)
    return cli, Leaks(cli)


def test_scan_reports_each_key_masked_with_its_status(leaks: tuple[CLI, Leaks]) -> None:
    cli, tree = leaks

    result = cli("scan", "repo")

    assert result.code == 1
    assert result.err == ""
    live_id, revoked_id = tree.live_record["key_id"], tree.revoked_record["key_id"]
    assert result.out.splitlines() == [
        f"repo/docs/old.md:1: {tree.hint(tree.revoked)} revoked ({revoked_id})",
        f"repo/src/settings.py:3: {tree.hint(tree.live)} live ({live_id})",
        f"repo/tests/fake.txt:1: {tree.hint(tree.fake)} unknown",
        f"repo/tests/fake.txt:2: {tree.hint(tree.typo)} unknown",
        "Scanned 3 file(s) (skipped 1 binary): 4 finding(s): 1 live, 1 revoked, 2 unknown.",
        f"Still live: {live_id}. Revoke with 'keyguard revoke KEY_ID'.",
    ]
    tree.assert_masked(result)


def test_scan_checksum_drops_invalid_candidates(leaks: tuple[CLI, Leaks]) -> None:
    cli, tree = leaks

    result = cli("scan", "repo", "--checksum", "--json")

    assert result.code == 1
    body = result.json()
    assert [(f["path"], f["line"], f["status"]) for f in body["findings"]] == [
        ("repo/docs/old.md", 1, "revoked"),
        ("repo/src/settings.py", 3, "live"),
        ("repo/tests/fake.txt", 1, "unknown"),
    ]
    assert body["findings"][1]["key_id"] == tree.live_record["key_id"]
    assert body["findings"][1]["hint"] == tree.hint(tree.live)
    assert body["findings"][1]["column"] == 12
    assert body["rejected"] == 1
    assert body["files_scanned"] == 3
    assert body["skipped"] == [{"path": "repo/logo.png", "reason": "binary"}]
    assert body["checked_against_store"] is True
    assert body["revoked"] == []
    tree.assert_masked(result)
    human = cli("scan", "repo", "--checksum")
    assert human.out.splitlines()[3] == (
        "Scanned 3 file(s) (skipped 1 binary): 3 finding(s): 1 live, 1 revoked, 1 unknown;"
        " 1 checksum-invalid string(s) unknown to the store ignored."
    )


def test_scan_checksum_never_hides_a_live_key_without_one(leaks: tuple[CLI, Leaks]) -> None:
    cli, tree = leaks
    plain, record = cli.create("--user", "dave")  # issued before the switch to checksums
    (cli.cwd / "repo" / "src" / "old.env").write_text(f"KEY={plain}\n")

    online = cli("scan", "repo/src", "--checksum")
    offline = cli("scan", "repo/src", "--checksum", "--offline", "--json")

    assert online.code == 1
    assert online.out.splitlines()[:2] == [
        f"repo/src/old.env:1: sk_…{plain[-4:]} live ({record['key_id']})",
        f"repo/src/settings.py:3: {tree.hint(tree.live)} live ({tree.live_record['key_id']})",
    ]
    # Offline nothing can vouch for it: --checksum then means "every key has a checksum".
    assert [f["path"] for f in offline.json()["findings"]] == ["repo/src/settings.py"]
    assert offline.json()["rejected"] == 1


def test_scan_exits_0_when_no_key_found_is_live(leaks: tuple[CLI, Leaks]) -> None:
    cli, _ = leaks

    only_dead = cli("scan", "repo/docs", "repo/tests")
    clean = cli("scan", "repo/.git/../docs/../src/settings.py", "--prefix", "pk_")

    assert only_dead.code == 0
    assert only_dead.out.splitlines()[-1] == (
        "Scanned 2 file(s): 3 finding(s): 1 revoked, 2 unknown."
    )
    assert clean.code == 0
    assert clean.out == "Scanned 1 file(s): no keys found.\n"


def test_scan_revoke_yes_revokes_the_live_keys(leaks: tuple[CLI, Leaks]) -> None:
    cli, tree = leaks
    live_id = tree.live_record["key_id"]

    result = cli("scan", "repo", "--revoke", "--yes")

    assert result.code == 1  # the leak was found; revoking it does not unmake the commit
    assert f"Revoked {live_id} ({tree.hint(tree.live)})." in result.out.splitlines()
    assert cli("verify", tree.live).out.startswith("revoked: ")
    again = cli("scan", "repo", "--json")
    assert again.code == 0
    assert {f["status"] for f in again.json()["findings"]} == {"revoked", "unknown"}


def test_scan_revoke_asks_after_showing_the_findings(leaks: tuple[CLI, Leaks]) -> None:
    cli, tree = leaks

    done = subprocess.run(
        [sys.executable, "-m", "keyguard", "scan", "repo/src", "--revoke"],
        input="n\n",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,  # one stream, so the order is what a terminal shows
        text=True,
        encoding="utf-8",
        env=cli.env,
        cwd=cli.cwd,
        timeout=60,
    )

    live_id = tree.live_record["key_id"]
    assert done.stdout.splitlines() == [
        f"store: sqlite:///{cli.db}",
        f"repo/src/settings.py:3: {tree.hint(tree.live)} live ({live_id})",
        "Scanned 1 file(s): 1 finding(s): 1 live.",
        f"Revoke 1 live key(s): {live_id} ({tree.hint(tree.live)})? [y/N] n",
        f"Still live: {live_id}. Revoke with 'keyguard revoke KEY_ID'.",
    ]


def test_scan_revoke_asks_first_and_no_keeps_the_key(leaks: tuple[CLI, Leaks]) -> None:
    cli, tree = leaks
    live_id = tree.live_record["key_id"]

    result = cli("scan", "repo", "--revoke", stdin="n\n")

    assert result.code == 1
    assert result.err == f"Revoke 1 live key(s): {live_id} ({tree.hint(tree.live)})? [y/N] n\n"
    assert f"Still live: {live_id}. Revoke with 'keyguard revoke KEY_ID'." in result.out
    assert cli("verify", tree.live).code == 0
    yes = cli("scan", "repo", "--revoke", "--json", stdin="y\n")
    assert yes.json()["revoked"] == [live_id]
    assert cli("verify", tree.live).code == 1


def test_scan_without_a_store_counts_every_key_as_possibly_live(
    leaks: tuple[CLI, Leaks],
) -> None:
    cli, tree = leaks
    absent = cli.cwd / "absent.db"

    result = cli("scan", "repo/docs", KEYGUARD_STORE=f"sqlite:///{absent}")
    offline = cli("scan", "repo/docs", "--offline", "--json")

    assert result.code == 1
    assert result.out.splitlines() == [
        f"repo/docs/old.md:1: {tree.hint(tree.revoked)} unchecked",
        "Scanned 1 file(s): 1 finding(s): 1 unchecked.",
        "No key store was consulted, so every key found counts as possibly live.",
    ]
    assert not absent.exists()
    assert offline.code == 1
    assert offline.json()["checked_against_store"] is False
    assert offline.json()["findings"][0]["key_id"] is None


def test_scan_looks_for_the_prefixes_in_the_store(leaks: tuple[CLI, Leaks]) -> None:
    cli, _ = leaks
    pk_key, record = cli.create("--user", "carol", "--prefix", "pk_")
    (cli.cwd / "repo" / "src" / "client.js").write_text(f"const k = '{pk_key}';\n")

    found = cli("scan", "repo/src/client.js")
    only_sk = cli("scan", "repo/src/client.js", "--prefix", "sk_")
    rule = cli("scan", "--rule", "--json")

    assert found.code == 1
    assert found.out.splitlines()[0] == (
        f"repo/src/client.js:1: pk_…{pk_key[-4:]} live ({record['key_id']})"
    )
    assert only_sk.code == 0
    assert "((pk_|sk_)[0-9a-f]{32})" in rule.json()["regex"]


def test_scan_passes_over_a_fifo_in_the_tree(leaks: tuple[CLI, Leaks]) -> None:
    cli, _ = leaks
    os.mkfifo(cli.cwd / "repo" / "docs" / "pipe")

    result = cli("scan", "repo/docs")

    assert result.code == 0
    assert result.out.splitlines()[-1] == (
        "Scanned 1 file(s) (skipped 1 not a regular file): 1 finding(s): 1 revoked."
    )


def test_scan_rule_prints_a_regex_and_a_gitleaks_rule(leaks: tuple[CLI, Leaks]) -> None:
    cli, _ = leaks

    result = cli("scan", "--rule", "--prefix", "sk_live_", "--offline")

    assert result.code == 0
    lines = result.out.splitlines()
    pattern = "(^|[^A-Za-z0-9])((sk_live_)[0-9a-f]{32})([^A-Za-z0-9]|$)"
    assert lines[:2] == [
        "# Regex (POSIX ERE, RE2 and PCRE; group 2 is the key). A checksum is not checked.",
        pattern,
    ]
    assert "[[rules]]" in lines
    assert f"regex = '''{pattern}'''" in lines


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["missing"], "cannot read 'missing': no such file or directory", id="missing path"
        ),
        pytest.param([], "scan needs at least one PATH (or --rule)", id="no path"),
        pytest.param(
            ["repo", "--revoke", "--offline"],
            "--revoke needs a key store (drop --offline or pass --store)",
            id="revoke offline",
        ),
        pytest.param(
            ["repo", "--max-bytes", "-1"], "--max-bytes must be >= 0, got -1", id="bad size"
        ),
        pytest.param(
            ["repo", "--prefix", "bad prefix"],
            "argument --prefix: invalid key prefix 'bad prefix': use 1-20 ASCII letters,"
            " digits, '_' or '-' (for example 'sk_', 'pk_' or 'sk_live_')"
            " (see 'keyguard scan --help')",
            id="bad prefix",
        ),
    ],
)
def test_scan_usage_errors_exit_2(leaks: tuple[CLI, Leaks], args: list[str], message: str) -> None:
    cli, _ = leaks

    result = cli("scan", *args)

    assert result.code == 2
    assert error_line(result) == f"keyguard: error: {message}"
    assert result.out == ""


def test_scan_an_unreadable_file_exits_2_after_reporting_the_rest(
    leaks: tuple[CLI, Leaks],
) -> None:
    cli, tree = leaks
    (cli.cwd / "repo" / "dangling").symlink_to(cli.cwd / "nowhere")

    result = cli("scan", "repo/dangling", "repo/src")

    assert result.code == 2
    assert error_line(result) == (
        "keyguard: error: cannot read 'repo/dangling': No such file or directory"
    )
    assert result.out.splitlines()[0].endswith(f"live ({tree.live_record['key_id']})")


def test_scan_refuses_a_store_hashed_with_another_pepper_scheme(
    leaks: tuple[CLI, Leaks],
) -> None:
    cli, _ = leaks

    result = cli("scan", "repo", KEYGUARD_PEPPER="p" * 32)

    assert result.code == 2
    assert error_line(result) == (
        "keyguard: error: the store's keys are hashed with sha256 but this process uses"
        f" {APIKeyManager(pepper='p' * 32).hash_scheme} (after ':' is a pepper id):"
        " set KEYGUARD_PEPPER as the servers do"
    )


def scan_in_process(monkeypatch: pytest.MonkeyPatch, cli: CLI, *args: str) -> tuple[int, int]:
    """Run ``keyguard scan`` in this process; return its exit code and the store listings."""
    listings = []
    list_keys = SQLiteStore.list_keys

    def counting(
        self: SQLiteStore,
        user_id: str | None = None,
        *,
        limit: int | None = None,
        after: str | None = None,
    ) -> list[KeyInfo]:
        if after is None:  # the first page of a walk through the store
            listings.append(user_id)
        return list_keys(self, user_id, limit=limit, after=after)

    monkeypatch.setattr(SQLiteStore, "list_keys", counting)
    monkeypatch.chdir(cli.cwd)
    for name in ("KEYGUARD_PEPPER", "KEYGUARD_CHECKSUM"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KEYGUARD_STORE", cli.env["KEYGUARD_STORE"])
    return main(["scan", *args]), len(listings)


@pytest.mark.parametrize(
    ("args", "code", "listings"),
    [
        pytest.param(["--prefix", "sk_", "repo/src"], 1, 0, id="prefix, live key found"),
        pytest.param(["--prefix", "pk_", "repo"], 0, 0, id="prefix, nothing found"),
        pytest.param(["--prefix", "sk_", "repo/tests"], 0, 1, id="prefix, unknown keys"),
        pytest.param(["repo/src"], 1, 1, id="no prefix: the store's prefixes"),
    ],
)
def test_scan_lists_the_store_only_when_it_must(
    leaks: tuple[CLI, Leaks],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    code: int,
    listings: int,
) -> None:
    cli, _ = leaks

    assert scan_in_process(monkeypatch, cli, *args) == (code, listings)
    assert capsys.readouterr().err == f"store: sqlite:///{cli.db}\n"


@pytest.mark.parametrize("prefix", [[], ["--prefix", "sk_"]], ids=["store prefixes", "prefix"])
def test_scan_refuses_a_store_hashed_with_another_pepper(
    tmp_path: Path, prefix: list[str]
) -> None:
    cli = CLI(tmp_path)
    servers, mistyped = "s" * 32, "w" * 32
    key = cli("create", "--user", "p", "--json", KEYGUARD_PEPPER=servers).json()["key"]
    (tmp_path / "f.txt").write_text(f"{key}\n")

    right = cli("scan", "f.txt", *prefix, KEYGUARD_PEPPER=servers)
    wrong = cli("scan", "f.txt", *prefix, KEYGUARD_PEPPER=mistyped)

    assert right.code == 1
    assert right.out.startswith(f"f.txt:1: sk_…{key[-4:]} live (key_")
    assert wrong.code == 2
    assert wrong.out == ""
    assert error_line(wrong) == (
        "keyguard: error: the store's keys are hashed with"
        f" {APIKeyManager(pepper=servers).hash_scheme} but this process uses"
        f" {APIKeyManager(pepper=mistyped).hash_scheme} (after ':' is a pepper id):"
        " set KEYGUARD_PEPPER as the servers do"
    )


def test_scan_checks_the_pepper_only_when_a_key_is_not_found(
    leaks: tuple[CLI, Leaks],
) -> None:
    cli, tree = leaks
    (cli.cwd / "clean.txt").write_text("nothing here\n")

    clean = cli("scan", "clean.txt", KEYGUARD_PEPPER="p" * 32)
    leaked = cli("scan", "repo/src", "--prefix", "sk_", KEYGUARD_PEPPER="p" * 32)

    assert clean.code == 0
    assert leaked.code == 2
    assert "but this process uses hmac-sha256" in error_line(leaked)
    tree.assert_masked(leaked)


def test_scan_with_a_corrupt_store_is_a_usage_error(leaks: tuple[CLI, Leaks]) -> None:
    cli, _ = leaks
    corrupt = cli.cwd / "corrupt.db"
    corrupt.write_bytes(b"garbage" * 100)

    result = cli("scan", "repo", "--store", f"sqlite:///{corrupt}")

    assert result.code == 2
    assert error_line(result) == (
        f"keyguard: error: '{corrupt}' is not a SQLite database; refusing to use it as a key store"
    )


def test_scan_never_writes_last_used(leaks: tuple[CLI, Leaks]) -> None:
    cli, tree = leaks

    cli("scan", "repo")

    store = SQLiteStore(cli.db)
    try:
        info = store.get_by_id(tree.live_record["key_id"])
    finally:
        store.close()
    assert info is not None
    assert info.last_used_at is None
