"""The ``keyguard`` command, driven as a user drives it: a subprocess over a SQLite store."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import time
import unicodedata
from contextlib import closing
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

import keyguard
from keyguard import APIKeyManager, KeyFormat, SQLiteStore
from keyguard import cli as keyguard_cli
from keyguard.cli import _commands
from keyguard.cli._durations import relative_time

PEPPER = "p" * 32


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str  # stderr without the "store: …" line, which test_cli_names_the_store checks
    store_lines: tuple[str, ...] = ()

    def json(self) -> Any:
        return json.loads(self.out)


class CLI:
    """Runs ``python -m keyguard`` against one store file and remembers every output."""

    def __init__(self, tmp_path: Path) -> None:
        self.cwd = tmp_path
        self.db = tmp_path / "keys.db"
        self.outputs: list[tuple[tuple[str, ...], Result]] = []
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGUARD_")}
        self.env.update(
            KEYGUARD_STORE=f"sqlite:///{self.db}", COLUMNS="80", PYTHONIOENCODING="utf-8"
        )

    def __call__(self, *args: str, stdin: str = "", **env: str) -> Result:
        done = subprocess.run(
            [sys.executable, "-m", "keyguard", *args],
            input=stdin,
            capture_output=True,
            text=True,
            encoding="utf-8",
            env={**self.env, **env},
            cwd=self.cwd,
            timeout=60,
        )
        lines = done.stderr.splitlines(keepends=True)
        store = tuple(line.rstrip("\n") for line in lines if line.startswith("store: "))
        err = "".join(line for line in lines if not line.startswith("store: "))
        result = Result(done.returncode, done.stdout, err, store)
        self.outputs.append((args, result))
        return result

    def create(self, *args: str) -> tuple[str, dict[str, Any]]:
        """Create a key through the CLI; return the key and the JSON record."""
        result = self("create", "--json", *args)
        assert result.code == 0, result.err
        record = result.json()
        return record.pop("key"), record


@pytest.fixture
def cli(tmp_path: Path) -> CLI:
    return CLI(tmp_path)


def expired_key(cli: CLI) -> str:
    """Store a key that expired an hour ago (the CLI cannot issue one in the past)."""
    store = SQLiteStore(cli.db)
    past = APIKeyManager(store, clock=lambda: time.time() - 7200)
    key = past.generate_key(user_id="old", expires_in=timedelta(hours=1))
    store.close()
    return key


def stored_keys(cli: CLI) -> list[dict[str, Any]]:
    if not cli.db.exists():
        return []
    keys: list[dict[str, Any]] = cli("list", "--all", "--json").json()["keys"]
    return keys


def close_to(a: timedelta, b: timedelta) -> bool:
    """Equal up to float rounding of timestamps (the store keeps POSIX seconds as REAL)."""
    return abs(a - b) < timedelta(milliseconds=1)


def error_line(result: Result) -> str:
    assert result.err.endswith("\n") and result.err.count("\n") == 1, result.err
    return result.err.rstrip("\n")


# -- create ---------------------------------------------------------------------------------


def test_create_prints_the_key_once_marked_as_shown_only_now(cli: CLI) -> None:
    result = cli("create", "--user", "alice", "--scope", "read", "--expires", "90d")

    assert result.code == 0
    assert result.err == ""
    keys = re.findall(r"sk_[0-9a-f]{32}", result.out)
    assert len(keys) == 1
    assert KeyFormat("sk_").matches(keys[0])
    assert "only time the key is shown" in result.out
    key_id = re.search(r"Created (key_[0-9a-f]{16}) for user 'alice' \(expires ", result.out)
    assert key_id is not None
    assert cli("verify", keys[0]).code == 0


@pytest.mark.parametrize(
    "schema",
    [
        pytest.param("CREATE VIEW answers AS SELECT 42 AS answer", id="views only"),
        pytest.param("PRAGMA application_id = 1234", id="an application id, no tables"),
    ],
)
@pytest.mark.parametrize(
    "command",
    [["list"], ["show", "key_0000000000000000"], ["verify", "-"], ["scan", "."], ["create"]],
    ids=lambda c: c[0],
)
def test_a_foreign_sqlite_file_is_refused_untouched(
    cli: CLI, schema: str, command: list[str]
) -> None:
    with closing(sqlite3.connect(cli.db)) as conn:
        conn.execute(schema)
    before = cli.db.read_bytes()

    result = cli(*command, *(["--user", "alice"] if command == ["create"] else []), stdin="x\n")

    assert result.code == 2, result.err
    assert "not a keyguard key store" in result.err
    assert cli.db.read_bytes() == before
    assert sorted(p.name for p in cli.cwd.iterdir()) == ["keys.db"]


def test_an_empty_file_is_not_a_store_until_create_makes_one(cli: CLI) -> None:
    cli.db.touch()

    listed = cli("list")

    assert (listed.code, listed.out) == (2, "")
    assert "empty file" in listed.err
    assert cli.db.read_bytes() == b""
    cli.create("--user", "alice")
    assert cli("list").code == 0


def test_an_unreachable_postgresql_store_is_one_line_and_exit_2(cli: CLI) -> None:
    result = cli("--store", "postgresql://nobody@127.0.0.1:1/test", "list")

    assert result.code == 2
    assert result.out == ""
    [line] = result.err.splitlines()
    assert line.startswith("keyguard: error: cannot prepare PostgreSQL key store")
    assert "Connection refused" in line


def test_create_refuses_a_field_name_that_is_not_utf8_and_stores_nothing(cli: CLI) -> None:
    # A non-UTF-8 byte in argv arrives as a lone surrogate (surrogateescape).
    result = cli("create", "--user", "alice", "--meta", "\udcff=v")

    assert result.code == 2
    assert result.err.startswith("keyguard: error: metadata field name")
    assert "not UTF-8" in result.err
    assert cli("list", "--all", "--json").json()["keys"] == []


def test_create_stores_user_email_name_scopes_and_metadata(cli: CLI) -> None:
    key, record = cli.create(
        "--user", "alice", "--email", "a@example.com", "--name", "ci deploy",
        "--scope", "read", "--scope", "write", "--scope", "read",
        "--meta", "team=core", "--meta", "ticket=OPS-1=2",
    )  # fmt: skip

    assert record["user_id"] == "alice"
    assert record["scopes"] == ["read", "write"]
    assert record["metadata"] == {
        "user_id": "alice",
        "email": "a@example.com",
        "name": "ci deploy",
        "permissions": ["read", "write"],
        "team": "core",
        "ticket": "OPS-1=2",
    }
    assert record["status"] == "active"
    assert record["expires_at"] is None
    assert record["hint"] == f"sk_…{key[-4:]}"
    assert cli("show", record["key_id"], "--json").json() == {**record, "remaining": None}


@pytest.mark.parametrize(
    ("text", "delta"),
    [
        pytest.param("90d", timedelta(days=90), id="days"),
        pytest.param("24h", timedelta(hours=24), id="hours"),
        pytest.param("30m", timedelta(minutes=30), id="minutes"),
        pytest.param("3600s", timedelta(seconds=3600), id="seconds"),
        pytest.param("2w", timedelta(weeks=2), id="weeks"),
    ],
)
def test_create_expires_accepts_each_unit(cli: CLI, text: str, delta: timedelta) -> None:
    _, record = cli.create("--user", "u", "--expires", text)

    created = datetime.fromisoformat(record["created_at"])
    assert close_to(datetime.fromisoformat(record["expires_at"]) - created, delta)


def test_create_with_prefix_and_checksum_issues_a_checksummed_key(cli: CLI) -> None:
    key, record = cli.create("--user", "u", "--prefix", "pk_live_", "--checksum")

    assert KeyFormat("pk_live_", checksum=True).matches(key)
    assert record["prefix"] == "pk_live_"
    assert cli("verify", "--checksum", key).code == 0


def test_a_duration_with_leading_zeros_is_read_as_its_number(cli: CLI) -> None:
    _, record = cli.create("--user", "u", "--expires", "0000000000090d")

    created = datetime.fromisoformat(record["created_at"])
    assert datetime.fromisoformat(record["expires_at"]) - created == timedelta(days=90)


def test_json_flag_works_before_the_command_too(cli: CLI) -> None:
    result = cli("--json", "create", "--user", "u")

    assert result.code == 0
    assert KeyFormat("sk_").matches(result.json()["key"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["--expires", "9x"],
            "argument --expires: invalid duration '9x': use a whole number and a unit"
            " s, m, h, d or w (e.g. 90d, 24h, 30m, 3600s, 2w) (see 'keyguard create --help')",
            id="bad duration unit",
        ),
        pytest.param(
            ["--expires", "1.5d"],
            "argument --expires: invalid duration '1.5d': use a whole number and a unit"
            " s, m, h, d or w (e.g. 90d, 24h, 30m, 3600s, 2w) (see 'keyguard create --help')",
            id="fractional duration",
        ),
        pytest.param(
            ["--expires", "0d"],
            "argument --expires: duration '0d' must be positive (see 'keyguard create --help')",
            id="zero duration",
        ),
        pytest.param(
            ["--expires", "99999w"],
            "argument --expires: duration '99999w' is longer than 100 years"
            " (see 'keyguard create --help')",
            id="absurd duration",
        ),
        pytest.param(
            ["--expires", "99999999999d"],
            "argument --expires: duration '99999999999d' is longer than 100 years"
            " (see 'keyguard create --help')",
            id="duration beyond timedelta",
        ),
        pytest.param(
            ["--expires", "99999999999999999999d"],
            "argument --expires: duration '99999999999999999999d' is longer than 100 years"
            " (see 'keyguard create --help')",
            id="duration of twenty digits",
        ),
        pytest.param(
            ["--expires", "\u0665d"],
            "argument --expires: invalid duration '\u0665d': use a whole number and a unit"
            " s, m, h, d or w (e.g. 90d, 24h, 30m, 3600s, 2w) (see 'keyguard create --help')",
            id="non-ASCII digit",
        ),
        pytest.param(
            ["--prefix", "no spaces"],
            "argument --prefix: invalid key prefix 'no spaces': use 1-20 ASCII letters, digits,"
            " '_' or '-' (for example 'sk_', 'pk_' or 'sk_live_') (see 'keyguard create --help')",
            id="bad prefix",
        ),
        pytest.param(
            ["--meta", "novalue"],
            "argument --meta: expected k=v, got 'novalue' (see 'keyguard create --help')",
            id="meta without =",
        ),
        pytest.param(
            ["--meta", "user_id=mallory"],
            "use --user to set 'user_id', not --meta",
            id="meta overriding user",
        ),
        pytest.param(
            ["--meta", "permissions=admin"],
            "use --scope to set 'permissions', not --meta",
            id="meta overriding scopes",
        ),
        pytest.param(
            ["--user", " "],
            "metadata field 'user_id' is required and must be a non-empty string",
            id="blank user",
        ),
        pytest.param(
            ["--frobnicate"],
            "unrecognized arguments: --frobnicate (see 'keyguard --help')",
            id="unknown flag",
        ),
    ],
)
def test_create_usage_errors_exit_2_with_one_line(cli: CLI, args: list[str], message: str) -> None:
    user = [] if "--user" in args else ["--user", "alice"]
    result = cli("create", *user, *args)

    assert result.code == 2
    assert error_line(result) == f"keyguard: error: {message}"
    assert result.out == ""
    assert stored_keys(cli) == []


def test_create_without_user_is_a_usage_error(cli: CLI) -> None:
    result = cli("create")

    assert result.code == 2
    assert error_line(result) == (
        "keyguard: error: the following arguments are required: --user"
        " (see 'keyguard create --help')"
    )
    assert not cli.db.exists()


# -- list ------------------------------------------------------------------------------------


def test_list_shows_an_aligned_table_within_80_columns(cli: CLI) -> None:
    _, short = cli.create("--user", "alice", "--scope", "read", "--expires", "90d")
    long_user = "someone-with-a-very-long-name@example.com"
    scopes = [f"--scope=billing:{n}:write" for n in range(6)]
    _, long = cli.create("--user", long_user, "--prefix", "sk_live_eu_west_", *scopes)

    result = cli("list")

    assert result.code == 0
    lines = result.out.splitlines()
    assert len(lines) == 3
    assert max(len(line) for line in lines) <= 80
    assert lines[0].split() == [
        "KEY_ID", "HINT", "USER", "SCOPES", "CREATED", "EXPIRES", "LAST", "USED", "STATUS"
    ]  # fmt: skip
    assert lines[1].startswith(short["key_id"] + " ")
    assert lines[2].startswith(long["key_id"] + " ")
    # Aligned: every column starts where its header does.
    for header in ("HINT", "CREATED", "STATUS"):
        column = lines[0].index(header)
        assert all(line[column - 1] == " " and line[column] != " " for line in lines[1:])
    assert lines[1].split()[1:3] == [short["hint"], "alice"]
    assert lines[1].split()[5:7] == ["in", "90d"]
    assert lines[2].split()[1].endswith(long["hint"][-5:])  # the hint keeps its last 4 hex
    assert all(line.rstrip().endswith("active") for line in lines[1:])


def display_width(text: str) -> int:
    """Terminal columns: East Asian wide and full-width characters take 2, combining ones 0."""
    return sum(
        0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1
        for c in text
    )


def test_list_fits_80_columns_with_wide_and_combining_characters(cli: CLI) -> None:
    users = ["山田太郎" * 5, "🙂" * 12 + "x", "e\u0301" * 20]
    for user in users:
        cli.create("--user", user, "--scope", "読み取り:すべて", "--scope", "write")

    lines = cli("list").out.splitlines()

    assert len(lines) == 4
    assert max(display_width(line) for line in lines) == 80
    for header in ("USER", "SCOPES", "CREATED", "STATUS"):
        column = display_width(lines[0][: lines[0].index(header)])
        for line in lines[1:]:
            start = next(i for i in range(len(line)) if display_width(line[:i]) == column)
            assert line[start - 1] == " " and line[start] != " ", (header, line)
    assert [line.split()[2][-1] for line in lines[1:]] == ["…", "…", "…"]
    assert all(line.endswith("active") for line in lines[1:])


def test_list_hides_inactive_keys_unless_all_and_filters_by_user(cli: CLI) -> None:
    _, alive = cli.create("--user", "alice")
    _, revoked = cli.create("--user", "alice")
    cli("revoke", revoked["key_id"])
    expired_key(cli)
    _, bob = cli.create("--user", "bob")

    def ids(*args: str) -> list[str]:
        return [k["key_id"] for k in cli("list", "--json", *args).json()["keys"]]

    assert ids() == [alive["key_id"], bob["key_id"]]
    assert ids("--user", "alice") == [alive["key_id"]]
    assert ids("--user", "alice", "--all") == [alive["key_id"], revoked["key_id"]]
    everything = cli("list", "--all", "--json").json()["keys"]
    assert [k["status"] for k in everything] == ["expired", "active", "revoked", "active"]
    table = cli("list", "--all").out.splitlines()
    assert [line.split()[-1] for line in table[1:]] == ["expired", "active", "revoked", "active"]


@pytest.mark.parametrize(
    ("expires", "shown"),
    [
        # Whole units far from a rounding edge: the seconds between `create` and `list` on
        # a loaded machine cannot change them (the exact rounding is tested below).
        pytest.param("2h", "in 2h", id="hours under 2d"),
        pytest.param("2w", "in 14d", id="days"),
        pytest.param("1095d", "in 3y", id="years from 730d"),
    ],
)
def test_list_shows_expiry_as_a_rounded_distance(cli: CLI, expires: str, shown: str) -> None:
    cli.create("--user", "alice", "--expires", expires)

    row = cli("list").out.splitlines()[1]

    assert f" {shown} " in row


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("offset", "shown"),
    [
        pytest.param(None, "never", id="no time"),
        pytest.param(0.4, "now", id="under half a second"),
        pytest.param(45, "in 45s", id="seconds"),
        pytest.param(-45, "45s ago", id="seconds ago"),
        pytest.param(59.4, "in 59s", id="just under a minute"),
        pytest.param(60, "in 1m", id="one minute"),
        pytest.param(45 * 60, "in 45m", id="minutes"),
        pytest.param(36 * 3600, "in 36h", id="hours under 2d"),
        pytest.param(48 * 3600, "in 2d", id="days from 2d"),
        pytest.param(14 * 86400, "in 14d", id="days"),
        pytest.param(1095 * 86400, "in 3y", id="years from 730d"),
        pytest.param(-1095 * 86400, "3y ago", id="years ago"),
    ],
)
def test_relative_time_rounds_to_one_short_unit(offset: float | None, shown: str) -> None:
    value = None if offset is None else datetime.fromtimestamp(NOW + offset, timezone.utc)

    assert relative_time(value, NOW) == shown


def test_list_says_when_there_are_no_keys(cli: CLI) -> None:
    _, record = cli.create("--user", "alice")
    cli("revoke", record["key_id"])

    assert cli("list").out == "No active keys (--all shows revoked and expired).\n"
    assert cli("list", "--user", "nobody", "--all").out == "No keys.\n"


def test_list_neutralises_control_characters_in_stored_data(cli: CLI) -> None:
    cli.create("--user", "evil\x1b[2J\nuser")

    narrow = cli("list").out
    wide = cli("list", COLUMNS="200").out

    for out in (narrow, wide):
        assert "\x1b" not in out
        assert len(out.splitlines()) == 2
    assert " evil?[2J?user " in wide


# -- show -------------------------------------------------------------------------------------


def test_show_prints_every_field(cli: CLI) -> None:
    key, record = cli.create(
        "--user", "alice", "--email", "a@example.com", "--scope", "read", "--meta", "team=core"
    )

    result = cli("show", record["key_id"])

    assert result.code == 0
    fields = {line[:10].rstrip(): line[11:] for line in result.out.splitlines()}
    assert fields["key_id"] == record["key_id"]
    assert fields["hint"] == record["hint"]
    assert fields["user"] == "alice"
    assert fields["email"] == "a@example.com"
    assert fields["scopes"] == "read"
    assert fields["metadata"] == '{"team": "core"}'
    assert fields["expires"] == "never"
    assert fields["last used"] == "never"
    assert fields["revoked"] == "-"
    assert fields["status"] == "active"
    assert fields["hashed as"] == "sha256"
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC", fields["created"])
    assert key not in result.out


def test_show_finds_a_key_given_on_stdin(cli: CLI) -> None:
    key, record = cli.create("--user", "alice")

    result = cli("show", "-", "--json", stdin=key + "\n")

    assert result.code == 0
    assert result.json()["key_id"] == record["key_id"]


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        pytest.param("key_0000000000000000", "no key with key_id 'key_0000000000000000'", id="id"),
        pytest.param("sk_" + "0" * 32, "no such key sk_…0000", id="unknown key"),
        pytest.param(
            "sk_" + "z" * 32,
            "'…zzzz' is neither a key_id (key_ and 16 hex) nor a well-formed key",
            id="malformed key",
        ),
        pytest.param(
            "nope", "'…' is neither a key_id (key_ and 16 hex) nor a well-formed key", id="junk"
        ),
    ],
)
@pytest.mark.parametrize("command", ["show", "revoke", "rotate"])
def test_unknown_or_malformed_refs_exit_1(cli: CLI, command: str, ref: str, message: str) -> None:
    cli.create("--user", "alice")

    result = cli(command, ref)

    assert result.code == 1
    assert error_line(result) == f"keyguard: error: {message}"
    assert result.out == ""


# -- revoke --------------------------------------------------------------------------------------


def test_revoke_by_key_id_and_then_again(cli: CLI) -> None:
    key, record = cli.create("--user", "alice")

    first = cli("revoke", record["key_id"])
    second = cli("revoke", record["key_id"])

    assert first.code == 0
    assert first.out == f"Revoked {record['key_id']} ({record['hint']}) of user 'alice'.\n"
    assert cli("verify", key).code == 1
    assert second.code == 1
    assert error_line(second) == (
        f"keyguard: error: {record['key_id']} ({record['hint']}) is already revoked;"
        " nothing to revoke"
    )


def test_revoke_by_key_and_from_stdin_with_json(cli: CLI) -> None:
    key, record = cli.create("--user", "alice")
    other, other_record = cli.create("--user", "bob")

    by_key = cli("revoke", key, "--json")
    by_stdin = cli("revoke", "-", "--json", stdin=other + "\n")

    assert by_key.code == 0
    assert by_key.json() == {"revoked": True, "key_id": record["key_id"], "hint": record["hint"]}
    assert by_stdin.code == 0
    assert by_stdin.json()["key_id"] == other_record["key_id"]
    assert cli("list", "--json").json() == {"keys": []}


def test_revoke_an_expired_key_exits_1(cli: CLI) -> None:
    key = expired_key(cli)

    result = cli("revoke", key)

    assert result.code == 1
    assert "is already expired; nothing to revoke" in error_line(result)


# -- rotate -----------------------------------------------------------------------------------


def test_rotate_prints_the_new_key_and_keeps_the_old_one_for_the_grace(cli: CLI) -> None:
    old_key, old = cli.create("--user", "alice", "--scope", "read", "--expires", "90d")

    result = cli("rotate", old["key_id"], "--grace", "1h")

    assert result.code == 0
    new_keys = [k for k in re.findall(r"sk_[0-9a-f]{32}", result.out) if k != old_key]
    assert len(new_keys) == 1
    assert old_key not in result.out
    assert "only time the key is shown" in result.out
    assert f"The old key {old['hint']} keeps working until " in result.out
    new = cli("verify", new_keys[0], "--json").json()["key"]
    assert new["scopes"] == ["read"]
    lifetime = datetime.fromisoformat(new["expires_at"]) - datetime.fromisoformat(
        new["created_at"]
    )
    assert close_to(lifetime, timedelta(days=90))
    still = cli("show", old["key_id"], "--json").json()
    assert still["status"] == "active"
    remaining = datetime.fromisoformat(still["expires_at"]).timestamp() - time.time()
    assert 3500 < remaining <= 3600


def test_rotate_by_key_with_zero_grace_revokes_at_once(cli: CLI) -> None:
    old_key, old = cli.create("--user", "alice")

    result = cli("rotate", old_key, "--grace", "0s", "--expires", "2w", "--json")

    assert result.code == 0
    body = result.json()
    assert body["old"]["key_id"] == old["key_id"]
    assert body["old"]["status"] == "revoked"
    assert body["key_id"] != old["key_id"]
    assert cli("verify", body["key"]).code == 0
    assert cli("verify", old_key).out.startswith("revoked: ")
    human = cli("rotate", body["key_id"], "--grace", "0s")
    assert human.out.splitlines()[:2] == [
        f"Rotated {body['key_id']} into {human.out.split()[3]} for user 'alice'.",
        f"The old key {body['hint']} is revoked.",
    ]


def test_rotate_checksum_gives_the_new_key_a_checksum(cli: CLI) -> None:
    old_key, _ = cli.create("--user", "alice", "--prefix", "pk_")

    new_key = cli("rotate", old_key, "--checksum", "--json").json()["key"]

    assert KeyFormat("pk_", checksum=True).matches(new_key)
    assert cli("verify", new_key, "--checksum").code == 0


@pytest.mark.parametrize(
    ("create", "rotate", "env", "checksum"),
    [
        pytest.param([], [], {}, False, id="by key_id, plain"),
        pytest.param(["--checksum"], ["--checksum"], {}, True, id="by key_id, --checksum"),
        pytest.param(["--checksum"], [], {"KEYGUARD_CHECKSUM": "1"}, True, id="by key_id, env"),
    ],
)
def test_rotate_by_key_id_keeps_the_prefix(
    cli: CLI, create: list[str], rotate: list[str], env: dict[str, str], checksum: bool
) -> None:
    _, old = cli.create("--user", "bob", "--prefix", "sk_live_", *create)

    result = cli("rotate", old["key_id"], "--json", *rotate, **env)

    assert result.code == 0, result.err
    new_key = result.json()["key"]
    assert result.json()["prefix"] == "sk_live_"
    assert KeyFormat("sk_live_", checksum=checksum).matches(new_key)
    server = APIKeyManager(SQLiteStore(cli.db), prefix="sk_live_", checksum=checksum)
    try:
        assert server.verify(new_key).ok
    finally:
        server.store.close()


@pytest.mark.parametrize(
    ("prefix", "checksum"),
    [
        pytest.param("sk_", True, id="checksummed sk_"),
        pytest.param("pk_live_", True, id="checksummed pk_live_"),
        pytest.param("pk_live_", False, id="plain pk_live_"),
    ],
)
def test_rotate_by_key_keeps_its_prefix_and_checksum(
    cli: CLI, prefix: str, checksum: bool
) -> None:
    old_key, _ = cli.create("--user", "carol", "--prefix", prefix, *["--checksum"] * checksum)

    new_key = cli("rotate", "-", "--json", stdin=old_key + "\n").json()["key"]

    assert KeyFormat(prefix, checksum=True).matches(new_key) is checksum
    assert KeyFormat(prefix).matches(new_key)


def test_rotate_a_revoked_key_exits_1(cli: CLI) -> None:
    _, old = cli.create("--user", "alice")
    cli("revoke", old["key_id"])

    result = cli("rotate", old["key_id"])

    assert result.code == 1
    assert error_line(result) == (
        f"keyguard: error: cannot rotate {old['key_id']} ({old['hint']}): it is revoked"
    )


@pytest.mark.parametrize(
    ("grace", "message"),
    [
        pytest.param("1 day", "invalid duration '1 day': use a whole number", id="bad"),
        pytest.param(
            "99999999999d", "duration '99999999999d' is longer than 100 years", id="overflow"
        ),
    ],
)
def test_rotate_with_a_bad_grace_is_a_usage_error(cli: CLI, grace: str, message: str) -> None:
    _, old = cli.create("--user", "alice")

    result = cli("rotate", old["key_id"], "--grace", grace)

    assert result.code == 2
    assert error_line(result).startswith(f"keyguard: error: argument --grace: {message}")
    assert len(stored_keys(cli)) == 1


# -- verify -----------------------------------------------------------------------------------


def test_verify_reports_each_reason_with_its_exit_code(cli: CLI) -> None:
    live, record = cli.create("--user", "alice")
    revoked, revoked_record = cli.create("--user", "bob")
    cli("revoke", revoked)
    expired = expired_key(cli)

    cases = {
        live: (0, f"ok: {record['key_id']} ({record['hint']}) of user 'alice'\n"),
        revoked: (1, f"revoked: {revoked_record['key_id']} ({revoked_record['hint']})"),
        expired: (1, "expired: key_"),
        "sk_" + "0" * 32: (1, "not_found\n"),
        "sk_tooshort": (1, "malformed\n"),
        "": (1, "malformed\n"),
    }
    for key, (code, start) in cases.items():
        result = cli("verify", key)
        assert (result.code, result.out[: len(start)]) == (code, start), key
        assert result.err == ""


def test_verify_json_and_stdin(cli: CLI) -> None:
    key, record = cli.create("--user", "alice")

    ok = cli("verify", "-", "--json", stdin=key + "\n")
    bad = cli("verify", "sk_" + "0" * 32, "--json")

    assert ok.code == 0
    assert ok.json()["ok"] is True
    assert ok.json()["reason"] == "ok"
    assert ok.json()["key"]["key_id"] == record["key_id"]
    assert bad.code == 1
    assert bad.json() == {"ok": False, "reason": "not_found", "key": None}


def test_verify_checksum_rejects_a_plain_key_without_a_lookup(cli: CLI) -> None:
    key, _ = cli.create("--user", "alice")  # no checksum: the CRC matches 1 time in 2**32

    assert cli("verify", key).code == 0
    assert cli("verify", key, "--checksum").out == "malformed\n"


def test_keyguard_checksum_env_acts_as_the_checksum_flag(cli: CLI) -> None:
    issued = cli("create", "--user", "u", "--json", KEYGUARD_CHECKSUM="1").json()["key"]
    plain, _ = cli.create("--user", "v")

    unclear = cli("list", KEYGUARD_CHECKSUM="maybe")

    assert KeyFormat("sk_", checksum=True).matches(issued)
    assert cli("verify", plain, KEYGUARD_CHECKSUM="yes").out == "malformed\n"
    assert cli("verify", plain, KEYGUARD_CHECKSUM="0").code == 0
    assert unclear.code == 2
    assert error_line(unclear) == "keyguard: error: KEYGUARD_CHECKSUM must be 1 or 0, got 'maybe'"


def test_verify_does_not_record_last_use(cli: CLI) -> None:
    key, record = cli.create("--user", "alice")

    cli("verify", key)

    assert cli("show", record["key_id"], "--json").json()["last_used_at"] is None


# -- which store ----------------------------------------------------------------------------


def test_every_command_names_its_store_and_create_says_when_it_is_new(cli: CLI) -> None:
    relative = {"KEYGUARD_STORE": "sqlite:///keyguard.db"}  # the default: this folder's file
    where = f"store: sqlite:///{cli.cwd / 'keyguard.db'}"

    first = cli("create", "--user", "alice", "--json", **relative)
    second = cli("create", "--user", "bob", **relative)
    listed = cli("list", "--json", **relative)
    verified = cli("verify", "-", stdin=first.json()["key"] + "\n", **relative)

    assert first.store_lines == (f"{where} (a new store file, created now)",)
    assert first.json()["user_id"] == "alice"  # stdout stays clean JSON
    for result in (second, listed, verified):
        assert (result.code, result.store_lines) == (0, (where,)), result.err
    assert len(listed.json()["keys"]) == 2


def test_the_store_line_masks_a_password_and_a_missing_store_names_none(cli: CLI) -> None:
    missing = cli("list")
    refused = cli("list", "--store", "redis://:hunter2@127.0.0.1:1/0?socket_connect_timeout=1")

    assert (missing.code, missing.store_lines) == (2, ())
    assert refused.code == 2
    assert "hunter2" not in refused.err + "".join(refused.store_lines)


# -- store errors --------------------------------------------------------------------------------


def test_corrupt_store_file_is_a_usage_error(cli: CLI) -> None:
    cli.db.write_bytes(b"this is not a database\n" * 10)

    for args in (["list"], ["create", "--user", "u"], ["verify", "sk_" + "0" * 32]):
        result = cli(*args)
        assert result.code == 2, args
        assert error_line(result) == (
            f"keyguard: error: '{cli.db}' is not a SQLite database;"
            " refusing to use it as a key store"
        )
    assert cli.db.read_bytes() == b"this is not a database\n" * 10


def test_unknown_store_scheme_is_a_usage_error(cli: CLI) -> None:
    result = cli("list", "--store", "mysql://db/keys")

    assert result.code == 2
    assert error_line(result).startswith(
        "keyguard: error: unknown store URL scheme in 'mysql://db/keys'; use one of "
    )


def test_commands_other_than_create_do_not_create_a_store(cli: CLI) -> None:
    result = cli("list")

    assert result.code == 2
    assert error_line(result) == (
        f"keyguard: error: no key store at '{cli.db}': create a key first,"
        " or pass --store URL or set KEYGUARD_STORE"
    )
    assert not cli.db.exists()


def test_store_flag_overrides_the_environment(cli: CLI, tmp_path: Path) -> None:
    other = tmp_path / "other.db"

    cli("create", "--user", "alice", "--store", f"sqlite:///{other}")

    assert other.exists()
    assert not cli.db.exists()
    assert len(cli("list", "--json", "--store", f"sqlite:///{other}").json()["keys"]) == 1


def test_default_store_is_keyguard_db_in_the_working_directory(cli: CLI) -> None:
    del cli.env["KEYGUARD_STORE"]

    result = cli("create", "--user", "alice")

    assert result.code == 0
    assert (cli.cwd / "keyguard.db").exists()


def test_a_short_pepper_is_a_usage_error(cli: CLI) -> None:
    result = cli("create", "--user", "alice", KEYGUARD_PEPPER="short")

    assert result.code == 2
    assert error_line(result) == (
        "keyguard: error: pepper must be at least 16 bytes; use secrets.token_hex(32)"
        " (check KEYGUARD_PEPPER)"
    )


def test_pepper_from_the_environment_is_used(cli: CLI) -> None:
    key, record = cli.create("--user", "alice")  # created without a pepper
    peppered = cli("create", "--user", "bob", "--json", KEYGUARD_PEPPER=PEPPER).json()

    assert peppered["hash_scheme"] == APIKeyManager(pepper=PEPPER).hash_scheme != "sha256"
    assert cli("verify", peppered["key"], KEYGUARD_PEPPER=PEPPER).code == 0
    assert cli("verify", peppered["key"]).out == "not_found\n"
    assert record["hash_scheme"] == "sha256"
    assert cli("verify", key).code == 0


# -- the command line as a whole ------------------------------------------------------------


def test_no_command_is_a_usage_error(cli: CLI) -> None:
    result = cli()

    assert result.code == 2
    assert error_line(result) == (
        "keyguard: error: the following arguments are required: COMMAND (see 'keyguard --help')"
    )


def test_version_prints_the_package_version(cli: CLI) -> None:
    result = cli("--version")

    assert result.code == 0
    assert result.out == f"keyguard {keyguard.__version__}\n"


@pytest.mark.parametrize("command", ["show", "revoke", "rotate", "verify"])
@pytest.mark.parametrize("stdin", ["", "\n", "  \r\n"], ids=["nothing", "newline", "blank"])
def test_an_empty_stdin_says_there_is_no_key(cli: CLI, command: str, stdin: str) -> None:
    cli.create("--user", "alice")

    result = cli(command, "-", stdin=stdin)

    assert result.code == 2
    assert error_line(result) == (
        "keyguard: error: no key on stdin: '-' reads the key from the first line"
    )
    assert result.out == ""


def test_help_lists_every_command(cli: CLI) -> None:
    result = cli("--help")

    assert result.code == 0
    for command in ("create", "list", "show", "revoke", "rotate", "verify", "scan"):
        assert re.search(rf"^\s+{command}\s", result.out, re.MULTILINE), command


def test_no_full_key_is_printed_except_by_create_and_rotate(cli: CLI) -> None:
    key, record = cli.create("--user", "alice", "--scope", "read")
    other, _ = cli.create("--user", "bob")
    (cli.cwd / "leak.py").write_text(f"KEY = '{key}'\nOTHER = '{other}'\n")
    rotated = cli("rotate", other, "--json").json()["key"]
    keys = {key, other, rotated}
    session = [
        ["list"], ["list", "--all", "--json"], ["show", record["key_id"]],
        ["show", record["key_id"], "--json"], ["verify", key], ["verify", key, "--json"],
        ["verify", key[:-1] + "x"], ["scan", "leak.py"], ["scan", "leak.py", "--json"],
        ["revoke", key], ["revoke", key], ["rotate", key], ["verify", rotated, "--json"],
        ["show", key[:-1] + "x"],
    ]  # fmt: skip
    for args in session:
        result = cli(*args)
        for secret in keys:
            assert secret not in result.out and secret not in result.err, args
    printed_by = {args[0] for args, r in cli.outputs if any(k in r.out for k in keys)}
    assert printed_by == {"create", "rotate"}


def test_console_script_is_installed_next_to_the_interpreter() -> None:
    script = Path(sys.executable).with_name("keyguard")
    if not script.exists():
        pytest.skip(f"no console script at {script}: keyguard is not pip-installed here")

    result = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)

    assert result.returncode == 0
    assert result.stdout.startswith("usage: keyguard ")


LEAKED = "sk_live_" + "5e" * 16  # a key pasted where something else was expected
OTHER_LEAKED = "sk_" + "a7" * 16


@pytest.mark.parametrize(
    ("args", "shown"),
    [
        pytest.param(
            ["verify", LEAKED, OTHER_LEAKED], "unrecognized arguments: sk_…a7a7", id="two keys"
        ),
        pytest.param(["revoke", LEAKED, OTHER_LEAKED], "sk_…a7a7", id="revoke two keys"),
        pytest.param([LEAKED], "invalid choice: 'sk_live_…5e5e'", id="key as command"),
        pytest.param(
            ["rotate", "key_0000000000000000", "--grace", LEAKED],
            "argument --grace: invalid duration 'sk_live_…5e5e'",
            id="key as grace",
        ),
        pytest.param(
            ["create", "--user", "u", "--expires", LEAKED],
            "argument --expires: invalid duration 'sk_live_…5e5e'",
            id="key as expiry",
        ),
        pytest.param(
            ["create", "--user", "u", "--meta", LEAKED],
            "argument --meta: expected k=v, got 'sk_live_…5e5e'",
            id="key as metadata",
        ),
        pytest.param(
            ["create", "--user", "u", "--prefix", LEAKED],
            "argument --prefix: invalid key prefix 'sk_live_…5e5e'",
            id="key as prefix",
        ),
        pytest.param(
            ["scan", "--prefix", LEAKED, "."],
            "argument --prefix: invalid key prefix 'sk_live_…5e5e'",
            id="key as scan prefix",
        ),
        pytest.param(
            ["--store", LEAKED, "list"],
            "unknown store URL scheme in 'sk_live_…5e5e'",
            id="key as store URL",
        ),
        pytest.param(
            ["verify", "--store", f"sqlite:///{LEAKED}.db", LEAKED],
            "no key store at 'sk_live_…5e5e.db'",
            id="key in a store path",
        ),
        pytest.param(
            ["show", f"{LEAKED}x"], "'…e5ex' is neither a key_id", id="key glued to text"
        ),
    ],
)
def test_errors_never_print_a_full_key(cli: CLI, args: list[str], shown: str) -> None:
    cli.create("--user", "alice")

    result = cli(*args)

    assert result.code in (1, 2)
    line = error_line(result)
    assert shown in line
    assert "5e" * 16 not in line and "a7" * 16 not in line


def test_an_unexpected_error_keeps_its_traceback_but_masks_keys(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(session: object) -> int:
        raise RuntimeError(f"bug while handling {LEAKED}")

    monkeypatch.setattr(_commands, "cmd_verify", broken)

    code = keyguard_cli.main(["verify", LEAKED])

    err = capsys.readouterr().err
    assert code == 1
    assert err.startswith("Traceback (most recent call last):")
    assert err.endswith("RuntimeError: bug while handling sk_live_…5e5e\n")
    assert LEAKED not in err
