"""Key lifecycle features beyond create/revoke/rotate: IP allowlists and expiry warnings."""

from __future__ import annotations

from datetime import timedelta

import pytest

from keyguard import APIKeyManager
from keyguard.networks import contains, parse_networks
from tests.helpers import Clock
from tests.test_cli import CLI, error_line
from tests.test_limits import Client, problem

TRANSPORTS = pytest.mark.parametrize("kind", ["asgi", "wsgi"])


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def manager(clock: Clock) -> APIKeyManager:
    return APIKeyManager(clock=clock)


# -- allowed networks ---------------------------------------------------------------------------


def test_allowed_ips_are_checked_at_creation_and_kept_normalised(manager: APIKeyManager) -> None:
    _, info = manager.create_key(
        user_id="u", allowed_ips=["203.0.113.7/24", "2001:db8::/32", "198.51.100.1"]
    )
    assert [str(n) for n in info.allowed_ips] == [
        "203.0.113.0/24",
        "2001:db8::/32",
        "198.51.100.1/32",
    ]
    assert info.metadata["allowed_ips"] == ["203.0.113.0/24", "2001:db8::/32", "198.51.100.1/32"]
    with pytest.raises(ValueError, match=r"invalid allowed IP '10\.0\.0\.0/33'"):
        manager.create_key(user_id="u", allowed_ips=["10.0.0.0/8", "10.0.0.0/33"])
    with pytest.raises(TypeError, match="list"):
        manager.create_key(user_id="u", allowed_ips="10.0.0.0/8")
    assert len(manager.list_keys()) == 1, "nothing stored for a bad list"


@pytest.mark.parametrize(
    ("address", "inside"),
    [
        ("203.0.113.9", True),
        ("203.0.114.1", False),
        ("::ffff:203.0.113.9", True),  # IPv4-mapped IPv6 is the IPv4 address
        ("2001:db8::1", True),
        ("2001:db9::1", False),
        ("fe80::1%eth0", False),
        ("not an address", False),
        (None, False),
    ],
)
def test_contains(address: str | None, inside: bool) -> None:
    networks = parse_networks(["203.0.113.0/24", "2001:db8::/32"])
    assert contains(networks, address) is inside


@TRANSPORTS
def test_a_key_is_refused_outside_its_networks_before_its_quota_is_used(
    kind: str, manager: APIKeyManager
) -> None:
    key = manager.generate_key(user_id="u", allowed_ips=["10.0.0.0/24"], quota=2)
    assert Client(kind, manager).get(key).status_code == 200  # the client is 10.0.0.1
    elsewhere = manager.generate_key(user_id="v", allowed_ips=["192.0.2.0/24"], quota=2)
    for _ in range(3):
        refused = Client(kind, manager).get(elsewhere)
        assert refused.status_code == 403
        assert problem(refused)["code"] == "ip_not_allowed"
    assert manager.remaining(elsewhere) == 2, "a refused address uses no quota"
    assert manager.remaining(key) == 1
    refused_info = manager.verify(elsewhere).key
    assert refused_info is not None
    (point,) = manager.usage(refused_info.key_id, step="day", since=timedelta(days=1))
    assert point.refused == {"ip_not_allowed": 3}


@TRANSPORTS
def test_a_spoofed_forwarded_for_does_not_pass_an_allowlist(
    kind: str, manager: APIKeyManager
) -> None:
    key = manager.generate_key(user_id="u", allowed_ips=["198.51.100.0/24"])
    spoof = {"x_forwarded_for": "198.51.100.7"}
    assert Client(kind, manager).get(key, **spoof).status_code == 403
    behind = Client(kind, manager, trusted_proxies=["10.0.0.0/8"])
    assert behind.get(key, **spoof).status_code == 200
    assert behind.get(key, x_forwarded_for="203.0.113.1").status_code == 403


# -- expiry warnings ----------------------------------------------------------------------------


def test_expiring_lists_active_keys_that_end_within_the_window(
    manager: APIKeyManager, clock: Clock
) -> None:
    soon = manager.create_key(user_id="a", expires_in=timedelta(days=3))[1]
    manager.create_key(user_id="a", expires_in=timedelta(days=30))
    manager.create_key(user_id="b")  # never expires
    other = manager.create_key(user_id="b", expires_in=timedelta(days=10))[1]
    gone = manager.create_key(user_id="a", expires_in=timedelta(days=1))
    manager.revoke_key(gone[0])
    assert {k.key_id for k in manager.expiring(timedelta(days=14))} == {
        soon.key_id,
        other.key_id,
    }
    assert [k.key_id for k in manager.expiring(timedelta(days=14), "a")] == [soon.key_id]
    clock.advance(timedelta(days=4))
    assert [k.key_id for k in manager.expiring(timedelta(days=14))] == [other.key_id]
    with pytest.raises(ValueError, match="positive"):
        list(manager.expiring(timedelta(0)))


@pytest.fixture
def cli(tmp_path: pytest.TempPathFactory) -> CLI:
    return CLI(tmp_path)  # type: ignore[arg-type]


def test_cli_lists_keys_expiring_soon_and_creates_allowlisted_keys(cli: CLI) -> None:
    _, soon = cli.create("--user", "a", "--expires", "3d", "--allowed-ip", "10.0.0.0/8")
    cli.create("--user", "a", "--expires", "90d")
    listed = cli("list", "--expiring", "14d", "--json").json()["keys"]
    assert [k["key_id"] for k in listed] == [soon["key_id"]]
    assert listed[0]["metadata"]["allowed_ips"] == ["10.0.0.0/8"]
    assert "networks   10.0.0.0/8" in cli("show", soon["key_id"]).out
    assert cli("list", "--expiring", "1d").out == "No active key expires within that time.\n"
    bad = cli("create", "--user", "a", "--allowed-ip", "10.0.0.300")
    assert bad.code == 2 and "invalid allowed IP '10.0.0.300'" in error_line(bad)
    both = cli("list", "--expiring", "14d", "--all")
    assert both.code == 2 and "--expiring lists active keys only" in error_line(both)
