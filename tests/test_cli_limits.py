"""The CLI's side of usage limits: ``create --rate-limit/--quota``, ``show``, ``credits``."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyguard.cli._parser import build_parser
from keyguard.cli._session import CLIError
from keyguard.limits import parse_quota, parse_rates
from tests.test_cli import CLI, error_line


@pytest.fixture
def cli(tmp_path: pytest.TempPathFactory) -> CLI:
    return CLI(tmp_path)  # type: ignore[arg-type]


def test_create_stores_rate_limits_and_a_quota(cli: CLI) -> None:
    key, record = cli.create(
        "--user",
        "u",
        "--rate-limit",
        "10/second",
        "--rate-limit",
        "1000/hours",
        "--quota",
        "10000/month",
    )
    assert record["rate_limits"] == ["10/second", "1000/hour"]
    assert record["quota"] == "10000/month"
    shown = cli("show", record["key_id"], "--json").json()
    assert shown["remaining"] == 10000
    assert shown["rate_limits"] == ["10/second", "1000/hour"]
    listed = cli("list", "--json").json()["keys"]
    assert [k["quota"] for k in listed] == ["10000/month"]
    text = cli("show", key, stdin="").out
    assert "limits     10/second, 1000/hour" in text
    assert "quota      10000/month (10000 left)" in text


def test_credits_tops_up_a_quota(cli: CLI) -> None:
    _, record = cli.create("--user", "u", "--quota", "5")
    result = cli("credits", record["key_id"], "+20")
    assert result.code == 0, result.err
    assert result.out == f"Added 20 credits to {record['key_id']}; 25 left.\n"
    assert cli("credits", record["key_id"], "3", "--json").json() == {
        "key_id": record["key_id"],
        "added": 3,
        "remaining": 28,
    }
    assert cli("show", record["key_id"], "--json").json()["remaining"] == 28


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("create", "--user", "u", "--rate-limit", "10/fortnight"), "invalid rate limit"),
        (("create", "--user", "u", "--rate-limit", "ten"), "invalid rate limit"),
        (("create", "--user", "u", "--quota", "5/week"), "invalid quota"),
        (("create", "--user", "u", "--quota", "0"), "count must be"),
        (("create", "--user", "u", "--meta", "quota=5"), "use --quota"),
    ],
)
def test_bad_limit_values_get_one_line_usage_errors(
    cli: CLI, args: tuple[str, ...], message: str
) -> None:
    result = cli(*args)
    assert result.code == 2
    assert message in error_line(result)
    assert not cli.db.exists() or cli("list", "--json").json()["keys"] == []


@pytest.mark.parametrize(
    "amount", ["+0", "-5", "five", "+1.5", "+\u0661\u0660", "+1000000000001", "+" + "9" * 5000]
)
def test_credits_must_be_a_whole_number_in_range(cli: CLI, amount: str) -> None:
    _, record = cli.create("--user", "u", "--quota", "5")
    result = cli("credits", record["key_id"], "--", amount)
    assert result.code == 2
    assert "a whole number from 1 to 1,000,000,000,000" in error_line(result)
    assert cli("show", record["key_id"], "--json").json()["remaining"] == 5


def test_credits_for_a_key_without_quota_or_an_unknown_key_exit_1(cli: CLI) -> None:
    _, record = cli.create("--user", "u")
    result = cli("credits", record["key_id"], "+5")
    assert result.code == 1
    assert "has no quota" in error_line(result)
    missing = cli("credits", "key_0000000000000000", "+5")
    assert missing.code == 1
    assert "no key with key_id" in error_line(missing)


def test_a_wide_list_table_shows_each_keys_limits(cli: CLI) -> None:
    cli.create("--user", "limited", "--rate-limit", "10/second", "--quota", "500")
    cli.create("--user", "plain")
    lines = cli("list", COLUMNS="120").out.splitlines()
    assert lines[0].split() == [
        "KEY_ID",
        "HINT",
        "USER",
        "SCOPES",
        "LIMITS",
        "CREATED",
        "EXPIRES",
        "LAST",
        "USED",
        "STATUS",
    ]
    limited = next(line for line in lines if "limited" in line)
    assert "10/second quota=500" in limited
    plain = next(line for line in lines if " plain " in line)
    assert plain.split()[4] == "-"
    assert all(len(line) <= 120 for line in lines)
    assert "LIMITS" not in cli("list").out, "at 80 columns the table has no room for it"


@given(st.text(max_size=30), st.sampled_from(["--rate-limit", "--quota"]))
def test_any_limit_value_parses_or_is_a_one_line_usage_error(text: str, option: str) -> None:
    try:
        args = build_parser().parse_args(["create", "--user", "u", f"{option}={text}"])
    except CLIError as e:
        assert e.code == 2
        assert "\n" not in str(e)
    else:
        value = args.rate_limit[0] if option == "--rate-limit" else args.quota
        assert parse_rates([value]) if option == "--rate-limit" else parse_quota(value)


@given(st.text(max_size=20))
def test_any_credits_value_parses_or_is_a_one_line_usage_error(text: str) -> None:
    try:
        args = build_parser().parse_args(["credits", "key_0000000000000000", "--", text])
    except CLIError as e:
        assert e.code == 2
        assert "\n" not in str(e)
    else:
        assert isinstance(args.credits, int) and args.credits > 0
