"""``keyguard events``: the audit trail as a table or JSON; every changing command names its
actor (the OS user, ``alice@cli``)."""

from __future__ import annotations

import getpass
import re
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from keyguard import KeyEvent, SQLiteStore
from keyguard.cli._session import cli_actor
from tests.test_cli import CLI, error_line

#: The OS user every command of these tests runs as: getpass reads $LOGNAME first.
USER = "tester"


@pytest.fixture
def cli(tmp_path: Path) -> CLI:
    cli = CLI(tmp_path)
    cli.env["LOGNAME"] = USER
    return cli


def test_every_changing_command_records_its_event_with_the_os_user(cli: CLI) -> None:
    key, first = cli.create("--user", "alice", "--scope", "read", "--quota", "10")
    assert cli("credits", first["key_id"], "+5").code == 0
    rotated = cli("rotate", first["key_id"], "--grace", "1h", "--json").json()
    assert cli("revoke", rotated["key_id"]).code == 0
    (cli.cwd / "leak.py").write_text(f"KEY = '{key}'\n")
    assert cli("scan", "leak.py", "--revoke", "--yes").code == 1  # a live key was found

    result = cli("events", "--json")

    assert result.code == 0, result.err
    events = result.json()["events"]
    assert [(e["key_id"], e["action"]) for e in events] == [
        (first["key_id"], "revoked"),  # by scan --revoke
        (rotated["key_id"], "revoked"),
        (first["key_id"], "rotated"),
        (rotated["key_id"], "created"),
        (first["key_id"], "credited"),
        (first["key_id"], "created"),
    ]
    assert {e["actor"] for e in events} == {f"{USER}@cli"}
    assert events[2]["changes"] == {
        "into": rotated["key_id"],
        "expires_at": rotated["old"]["expires_at"],  # the old key's new deadline
    }
    assert events[4]["changes"] == {"credits": 5, "remaining": 15}
    assert events[5]["changes"] == {
        "user_id": "alice",
        "metadata": {"permissions": ["read"], "quota": 10},
        "expires_at": None,
    }
    assert not re.search("[0-9a-f]{32}", result.out)  # no key, not even a digest


def test_events_prints_a_table_newest_first(cli: CLI) -> None:
    _, info = cli.create("--user", "alice")
    cli("revoke", info["key_id"])

    result = cli("events")

    assert result.code == 0, result.err
    header, revoked, created = result.out.splitlines()
    assert header.split() == ["TIME", "(UTC)", "KEY_ID", "ACTION", "ACTOR", "CHANGES"]
    assert re.fullmatch(
        rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d  {info['key_id']}  revoked  {USER}@cli"
        r'  \{"revoked_at":"[^"]+"\}',
        revoked,
    )
    assert created.split()[2:5] == [info["key_id"], "created", f"{USER}@cli"]
    assert created.endswith('{"user_id":"alice","metadata":{},"expires_at":null}')
    assert header.index("KEY_ID") == revoked.index("key_")  # columns line up


def test_events_of_one_key_since_a_time_and_at_most_n(cli: CLI) -> None:
    key, a = cli.create("--user", "alice")
    _, b = cli.create("--user", "bob")
    store = SQLiteStore(cli.db)  # an event from long ago, written as a server would
    long_ago = datetime.now(timezone.utc) - timedelta(days=30)
    store.add_event(KeyEvent(long_ago, a["key_id"], "credited", "billing", {"credits": 1}))
    store.close()

    def actions(*args: str) -> list[tuple[str, str]]:
        result = cli("events", *args, "--json")
        assert result.code == 0, result.err
        return [(e["key_id"], e["action"]) for e in result.json()["events"]]

    assert actions(a["key_id"]) == [(a["key_id"], "created"), (a["key_id"], "credited")]
    assert actions("--since", "7d") == [(b["key_id"], "created"), (a["key_id"], "created")]
    assert actions(a["key_id"], "--since", "7d") == [(a["key_id"], "created")]
    assert actions("--limit", "1") == [(b["key_id"], "created")]
    by_key = cli("events", "-", "--json", stdin=key + "\n")
    assert len(by_key.json()["events"]) == 2


def test_no_events_is_said_plainly(cli: CLI) -> None:
    cli.create("--user", "alice")

    assert cli("events", "--since", "2099-01-01").out == "No events in that time.\n"
    assert cli("events", "--json", "--since", "2099-01-01").json() == {"events": []}


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        pytest.param(["key_0000000000000000"], 1, "no key with key_id", id="unknown key"),
        pytest.param(["--limit", "0"], 2, "argument --limit: expected a whole", id="limit 0"),
        pytest.param(["--limit", "x"], 2, "argument --limit: expected a whole", id="limit x"),
        pytest.param(["--since", "soon"], 2, "argument --since: invalid time", id="bad since"),
    ],
)
def test_bad_arguments_are_one_line_errors(
    cli: CLI, args: list[str], code: int, message: str
) -> None:
    cli.create("--user", "alice")

    result = cli("events", *args)

    assert result.code == code
    assert error_line(result).startswith(f"keyguard: error: {message}")
    assert result.out == ""


def test_events_never_creates_a_store(cli: CLI) -> None:
    result = cli("events")

    assert result.code == 2
    assert "no key store at" in error_line(result)
    assert not cli.db.exists()


def test_help_lists_the_events_command(cli: CLI) -> None:
    assert re.search(r"^\s+events\s", cli("--help").out, re.MULTILINE)


def test_the_actor_falls_back_to_cli_without_an_os_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(getpass, "getuser", lambda: "ops")
    assert cli_actor() == "ops@cli"

    def no_user() -> str:
        raise OSError("No username set in the environment")

    monkeypatch.setattr(getpass, "getuser", no_user)
    assert cli_actor() == "cli"
