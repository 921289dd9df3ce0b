"""``keyguard usage``: a key's counts as a table and a sparkline, or as JSON."""

from __future__ import annotations

import re
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from keyguard import SQLiteStore
from keyguard.cli._usage import SPARKS, sparkline
from keyguard.usage import UsageRecorder
from tests.helpers import Clock
from tests.test_cli import CLI, error_line

MORNING = datetime(2024, 5, 17, 8, tzinfo=timezone.utc)
RANGE = ("--since", "2024-05-17T07:00", "--until", "2024-05-17T11:00Z")


@pytest.fixture
def cli(tmp_path: Path) -> CLI:
    return CLI(tmp_path)


def record(cli: CLI, key_id: str, when: datetime, count: int, code: str = "ok") -> None:
    """Write ``count`` uses of ``key_id`` at ``when`` into the CLI's store."""
    store = SQLiteStore(cli.db)
    recorder = UsageRecorder(store, clock=Clock(when.timestamp()))
    for _ in range(count):
        recorder.record(key_id, code)
    recorder.close()
    store.close()


@pytest.fixture
def used(cli: CLI) -> dict[str, Any]:
    """A key's record; the key was used 4 times at 08:xx (and refused twice), 8 at 10:xx."""
    _, info = cli.create("--user", "alice")
    key_id = info["key_id"]
    record(cli, key_id, MORNING + timedelta(minutes=5), 4)
    record(cli, key_id, MORNING + timedelta(minutes=59), 1, "rate_limited")
    record(cli, key_id, MORNING + timedelta(minutes=59, seconds=30), 1, "insufficient_scope")
    record(cli, key_id, MORNING + timedelta(hours=2, minutes=30), 8)
    return info


def test_usage_prints_a_summary_a_sparkline_and_a_table(cli: CLI, used: dict[str, Any]) -> None:
    result = cli("usage", used["key_id"], *RANGE)

    assert result.code == 0, result.err
    assert result.out.splitlines() == [
        f"{used['key_id']} ({used['hint']}): 12 admitted, 2 refused, per hour"
        " from 2024-05-17 07:00 to 2024-05-17 11:00 UTC",
        "▁▅▁█",
        "",
        "START             REQUESTS  REFUSED",
        "2024-05-17 07:00         0  -",
        "2024-05-17 08:00         4  insufficient_scope=1, rate_limited=1",
        "2024-05-17 09:00         0  -",
        "2024-05-17 10:00         8  -",
    ]


def test_usage_by_minute_and_by_day(cli: CLI, used: dict[str, Any]) -> None:
    key_id = used["key_id"]
    minutes = cli("usage", key_id, "--step", "minute", "--since", "2024-05-17T08:58",
                  "--until", "2024-05-17T09:00")  # fmt: skip
    days = cli("usage", key_id, "--step", "day", "--since", "2024-05-16", "--until", "2024-05-18")

    refusals = "insufficient_scope=1, rate_limited=1"
    assert minutes.out.splitlines()[1] == "▁▁"  # refusals only: no admitted request
    assert minutes.out.splitlines()[-1] == f"2024-05-17 08:59         0  {refusals}"
    assert days.out.splitlines()[1] == "▁█"
    assert days.out.splitlines()[-1] == f"2024-05-17        12  {refusals}"


def test_usage_json_lists_every_point(cli: CLI, used: dict[str, Any]) -> None:
    key_id = used["key_id"]
    result = cli("usage", key_id, *RANGE, "--json")

    assert result.code == 0, result.err
    data = result.json()
    assert data == {
        "key_id": key_id,
        "step": "hour",
        "since": "2024-05-17T07:00:00+00:00",
        "until": "2024-05-17T11:00:00+00:00",
        "points": [
            {"start": "2024-05-17T07:00:00+00:00", "requests": 0, "refused": {}},
            {
                "start": "2024-05-17T08:00:00+00:00",
                "requests": 4,
                "refused": {"rate_limited": 1, "insufficient_scope": 1},
            },
            {"start": "2024-05-17T09:00:00+00:00", "requests": 0, "refused": {}},
            {"start": "2024-05-17T10:00:00+00:00", "requests": 8, "refused": {}},
        ],
    }


def test_usage_of_an_unused_key_is_a_flat_line_of_zeros(cli: CLI) -> None:
    key, info = cli.create("--user", "bob")

    by_id = cli("usage", info["key_id"], "--since", "6h")
    by_key = cli("usage", "-", "--since", "6h", "--json", stdin=key + "\n")

    assert by_id.code == 0, by_id.err
    assert by_id.out.splitlines()[1] == SPARKS[0] * 6
    assert " 0 admitted, 0 refused, per hour from " in by_id.out.splitlines()[0]
    assert [p["requests"] for p in by_key.json()["points"]] == [0] * 6
    assert key not in by_id.out + by_key.out


def test_usage_defaults_to_the_last_24_hours(cli: CLI) -> None:
    _, info = cli.create("--user", "bob")

    result = cli("usage", info["key_id"], "--json")

    assert len(result.json()["points"]) == 24


def test_usage_until_a_duration_ago(cli: CLI) -> None:
    _, info = cli.create("--user", "bob")
    started = datetime.now(timezone.utc)

    points = cli("usage", info["key_id"], "--since", "2d", "--until", "1d", "--step", "day",
                 "--json").json()["points"]  # fmt: skip

    assert len(points) == 2
    yesterday = datetime.fromisoformat(points[-1]["start"])
    assert timedelta(0) < started - yesterday <= timedelta(days=2)


def test_usage_of_an_unknown_key_exits_1(cli: CLI) -> None:
    cli.create("--user", "bob")

    result = cli("usage", "key_0000000000000000")

    assert result.code == 1
    assert error_line(result) == "keyguard: error: no key with key_id 'key_0000000000000000'"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param(
            ["--step", "week"],
            "argument --step: invalid choice: 'week' (choose from 'minute', 'hour', 'day')",
            id="unknown step",
        ),
        pytest.param(
            ["--since", "yesterday"],
            "argument --since: invalid time 'yesterday': use a duration (7d, 24h, 30m) or a"
            " UTC date/time (2024-05-01, 2024-05-01T10:00)",
            id="unknown since",
        ),
        pytest.param(
            ["--since", "0d"], "argument --since: duration '0d' must be positive", id="zero since"
        ),
        pytest.param(["--since", "7y"], "argument --since: invalid duration '7y'", id="bad unit"),
        pytest.param(
            ["--until", "2024-13-01"], "argument --until: invalid time '2024-13-01'", id="bad date"
        ),
        pytest.param(
            ["--since", "30d", "--step", "minute"],
            "43200 minutes asked for; a query returns at most 10000 points",
            id="too many points",
        ),
        pytest.param(
            ["--since", "2024-05-02", "--until", "2024-05-01"],
            "since (2024-05-02 00:00:00+00:00) must be before until (2024-05-01 00:00:00+00:00)",
            id="reversed range",
        ),
    ],
)
def test_usage_bad_arguments_are_one_line_errors_with_exit_2(
    cli: CLI, args: list[str], message: str
) -> None:
    _, info = cli.create("--user", "bob")

    result = cli("usage", info["key_id"], *args)

    assert result.code == 2
    assert error_line(result).startswith(f"keyguard: error: {message}")
    assert result.out == ""


def test_help_lists_the_usage_command(cli: CLI) -> None:
    result = cli("--help")

    assert re.search(r"^\s+usage\s", result.out, re.MULTILINE)


@pytest.mark.parametrize(
    ("values", "line"),
    [
        pytest.param([], "", id="no points"),
        pytest.param([0, 0, 0], "▁▁▁", id="all zero: a flat line"),
        pytest.param([0, 1, 2, 3, 4, 5, 6, 7], "▁▂▃▄▅▆▇█", id="one level per count"),
        pytest.param([1, 1000], "▂█", id="any use shows above the floor"),
        pytest.param([5], "█", id="a single point is the peak"),
    ],
)
def test_sparkline_scales_to_the_largest_value(values: list[int], line: str) -> None:
    assert sparkline(values) == line
