"""Updating a key in place, and rotation lineage with its deprecation fields."""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import pytest

from keyguard import (
    APIKeyManager,
    InvalidKeyError,
    KeyguardError,
    KeyInfo,
    MemoryStore,
    StoreError,
)
from keyguard.verification import Reason
from tests.helpers import Clock, CountingStore
from tests.test_cli import CLI, error_line
from tests.test_limits import Client, problem

TRANSPORTS = pytest.mark.parametrize("kind", ["asgi", "wsgi"])


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store() -> CountingStore:
    return CountingStore()


@pytest.fixture
def manager(store: CountingStore, clock: Clock) -> APIKeyManager:
    return APIKeyManager(store, clock=clock)


# -- update_key ---------------------------------------------------------------------------------


def test_narrowing_scopes_keeps_the_secret_and_the_id(manager: APIKeyManager) -> None:
    key, info = manager.create_key(user_id="u", permissions=["read", "write"], team="core")

    new = manager.update_key(info.key_id, scopes=["read"])

    assert new.key_id == info.key_id and new.digest == info.digest
    assert new.scopes == ("read",)
    assert new.metadata == {"user_id": "u", "permissions": ["read"], "team": "core"}
    checked = manager.check(key)
    assert checked.scopes == ("read",) and checked == new


def test_widening_scopes_needs_allow_widen_and_writes_nothing_without(
    manager: APIKeyManager, store: CountingStore
) -> None:
    key, info = manager.create_key(user_id="u", permissions=["read"])

    with pytest.raises(PermissionError, match=r"adding scopes \['admin'\].*allow_widen=True"):
        manager.update_key(info.key_id, scopes=["read", "admin"])
    assert store.calls["update"] == 0
    assert manager.check(key).scopes == ("read",)

    wider = manager.update_key(info.key_id, scopes=["read", "admin"], allow_widen=True)
    assert manager.check(key).scopes == ("read", "admin") == wider.scopes
    assert manager.update_key(info.key_id, scopes=None).scopes == ()


def test_metadata_fields_are_set_or_removed_and_owner_and_lineage_are_not_theirs(
    manager: APIKeyManager,
) -> None:
    _, info = manager.create_key(user_id="u", team="core", tier="free")

    new = manager.update_key(info.key_id, metadata={"tier": "pro", "team": None}, name="ci")
    assert new.metadata == {"user_id": "u", "tier": "pro", "name": "ci"}

    for field, message in [
        ("user_id", "cannot change"),
        ("permissions", "scopes="),
        ("family_id", "kept by keyguard"),
        ("replaced_by", "kept by keyguard"),
    ]:
        with pytest.raises(TypeError, match=message):
            manager.update_key(info.key_id, metadata={field: "x"})
    assert manager.get_key_info(info.key_id) == new


def test_limits_quota_and_networks_can_change_or_go(manager: APIKeyManager) -> None:
    _, info = manager.create_key(user_id="u", allowed_ips=["10.0.0.0/8"])

    new = manager.update_key(
        info.key_id,
        rate_limits=["5/second"],
        quota="100/day",
        allowed_ips=["10.1.0.0/16"],  # inside the old network: narrowing
    )
    assert [str(r) for r in new.rate_limits] == ["5/second"]
    assert str(new.quota) == "100/day"
    assert [str(n) for n in new.allowed_ips] == ["10.1.0.0/16"]

    gone = manager.update_key(info.key_id, rate_limits=None, quota=None)
    assert gone.rate_limits == () and gone.quota is None

    for wider in (["192.0.2.0/24"], ["10.0.0.0/8"], None):
        with pytest.raises(PermissionError, match="more addresses"):
            manager.update_key(info.key_id, allowed_ips=wider)
    anywhere = manager.update_key(info.key_id, allowed_ips=None, allow_widen=True)
    assert anywhere.allowed_ips == ()


def test_expiry_moves_or_goes_and_bad_values_are_refused(
    manager: APIKeyManager, clock: Clock
) -> None:
    key, info = manager.create_key(user_id="u", expires_in=timedelta(days=1))

    later = manager.update_key(info.key_id, expires_in=timedelta(days=30))
    assert later.expires_at is not None
    assert later.expires_at.timestamp() == pytest.approx(clock.now + 30 * 86400)
    assert manager.update_key(info.key_id, expires_at=None).expires_at is None
    deadline = datetime(2030, 1, 1, tzinfo=timezone.utc)
    assert manager.update_key(info.key_id, expires_at=deadline).expires_at == deadline

    with pytest.raises(TypeError, match="not both"):
        manager.update_key(info.key_id, expires_at=deadline, expires_in=timedelta(days=1))
    with pytest.raises(ValueError, match="in the past"):
        manager.update_key(info.key_id, expires_at=datetime(2000, 1, 1, tzinfo=timezone.utc))
    with pytest.raises(TypeError, match="timezone-aware"):
        manager.update_key(info.key_id, expires_at=datetime(2030, 1, 1))
    assert manager.check(key).expires_at == deadline


def test_an_expired_key_comes_back_only_with_allow_widen(
    manager: APIKeyManager, clock: Clock
) -> None:
    key, info = manager.create_key(user_id="u", expires_in=timedelta(hours=1))
    clock.advance(timedelta(hours=2))
    assert not manager.validate_key(key)

    with pytest.raises(PermissionError, match="has expired"):
        manager.update_key(info.key_id, expires_in=timedelta(days=1))
    manager.update_key(info.key_id, scopes=None)  # a change that does not revive it is fine
    assert not manager.validate_key(key)
    manager.update_key(info.key_id, expires_in=timedelta(days=1), allow_widen=True)
    assert manager.validate_key(key)


def test_bad_values_name_the_field_and_write_nothing(
    manager: APIKeyManager, store: CountingStore
) -> None:
    _, info = manager.create_key(user_id="u", permissions=["read"])
    cases: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({}, ValueError, "nothing to update"),
        ({"rate_limits": ["10/fortnight"]}, ValueError, "10/fortnight"),
        ({"quota": -1}, ValueError, "invalid limit .-1."),
        ({"allowed_ips": ["10.0.0.0/33"]}, ValueError, "10.0.0.0/33"),
        ({"scopes": "read"}, TypeError, "takes a list"),
        ({"metadata": ["x"]}, TypeError, "metadata must be a dict"),
        ({"metadata": {"x": object()}}, TypeError, "not JSON-serialisable"),
        ({"expires_in": timedelta(0)}, ValueError, "positive"),
    ]
    for changes, error, message in cases:
        with pytest.raises(error, match=message):
            manager.update_key(info.key_id, **changes)
    assert store.calls["update"] == 0
    assert manager.get_key_info(info.key_id) == info


def test_a_missing_or_revoked_key_is_refused(manager: APIKeyManager) -> None:
    key, info = manager.create_key(user_id="u")
    with pytest.raises(InvalidKeyError, match="not_found") as missing:
        manager.update_key("key_0000000000000000", name="x")
    assert missing.value.reason is Reason.NOT_FOUND
    manager.revoke_key(key)
    with pytest.raises(InvalidKeyError, match="revoked"):
        manager.update_key(info.key_id, name="x")
    assert "name" not in manager.get_key_info(info.key_id).metadata  # type: ignore[union-attr]


def test_an_update_that_changes_nothing_writes_nothing(
    manager: APIKeyManager, store: CountingStore
) -> None:
    _, info = manager.create_key(user_id="u", permissions=["read"], name="ci")
    assert manager.update_key(info.key_id, scopes=["read"], name="ci") is info
    assert store.calls["update"] == 0


def test_an_update_racing_a_revocation_never_brings_the_key_back(clock: Clock) -> None:
    class RevokedMeanwhile(MemoryStore):
        """Revokes the key between the manager's read and its write, as another worker."""

        def update(self, info: KeyInfo, expected: KeyInfo) -> bool:
            self.revoke(info.digest, datetime.now(timezone.utc))
            return super().update(info, expected)

    manager = APIKeyManager(RevokedMeanwhile(), clock=clock)
    key, info = manager.create_key(user_id="u", permissions=["read"])

    with pytest.raises(InvalidKeyError, match="revoked"):
        manager.update_key(info.key_id, scopes=[])
    assert manager.verify(key).reason is Reason.REVOKED
    assert manager.get_key_info(info.key_id).scopes == ("read",)  # type: ignore[union-attr]


class OnceBefore(MemoryStore):
    """Runs ``meanwhile`` once, just before the first compare-and-set, as another worker."""

    def __init__(self) -> None:
        super().__init__()
        self.meanwhile: Any = None

    def update(self, info: KeyInfo, expected: KeyInfo) -> bool:
        if self.meanwhile is not None:
            action, self.meanwhile = self.meanwhile, None
            action()
        return super().update(info, expected)


def test_an_update_racing_another_is_decided_again_and_undoes_nothing(clock: Clock) -> None:
    store = OnceBefore()
    manager = APIKeyManager(store, clock=clock)
    key, info = manager.create_key(user_id="u", permissions=["read", "admin"])

    # Another operator narrows the key while this one renames it.
    store.meanwhile = lambda: manager.update_key(info.key_id, scopes=["read"])
    renamed = manager.update_key(info.key_id, name="ci")

    assert renamed.scopes == ("read",) and renamed.metadata["name"] == "ci"
    assert manager.check(key) == renamed


def test_a_widening_cannot_slip_in_on_a_racing_update(clock: Clock) -> None:
    store = OnceBefore()
    manager = APIKeyManager(store, clock=clock)
    _, info = manager.create_key(user_id="u", permissions=["read", "admin"])

    # Decided against ["read", "admin"], but another operator narrowed it to ["read"] first.
    store.meanwhile = lambda: manager.update_key(info.key_id, scopes=["read"])
    with pytest.raises(PermissionError, match="admin"):
        manager.update_key(info.key_id, scopes=["admin"])
    assert manager.get_key_info(info.key_id).scopes == ("read",)  # type: ignore[union-attr]


def test_scopes_given_as_an_iterator_are_read_once(manager: APIKeyManager) -> None:
    _, info = manager.create_key(user_id="u", permissions=["read", "write"])
    assert manager.update_key(info.key_id, scopes=iter(["read"])).scopes == ("read",)


def test_a_replaced_key_keeps_its_grace_period_unless_widened(
    manager: APIKeyManager, clock: Clock
) -> None:
    old = manager.generate_key(user_id="u")
    manager.rotate_key(old, grace=timedelta(hours=1))
    old_id = manager.check(old).key_id
    for extend in ({"expires_at": None}, {"expires_in": timedelta(days=1)}):
        with pytest.raises(PermissionError, match="grace period"):
            manager.update_key(old_id, **extend)
    manager.update_key(old_id, expires_in=timedelta(minutes=5))  # shortening is fine
    clock.advance(timedelta(minutes=6))
    assert not manager.validate_key(old)


def test_name_must_be_text(manager: APIKeyManager) -> None:
    _, info = manager.create_key(user_id="u")
    with pytest.raises(TypeError, match="name must be a str"):
        manager.update_key(info.key_id, name=123)  # type: ignore[arg-type]


@TRANSPORTS
def test_the_middleware_sees_an_update_at_once(kind: str, manager: APIKeyManager) -> None:
    key, info = manager.create_key(user_id="u")
    client = Client(kind, manager)
    assert client.get(key).status_code == 200

    manager.update_key(info.key_id, allowed_ips=["192.0.2.0/24"], allow_widen=True)
    refused = client.get(key)
    assert refused.status_code == 403 and problem(refused)["code"] == "ip_not_allowed"

    manager.update_key(info.key_id, allowed_ips=None, quota=1, allow_widen=True)
    assert client.get(key).status_code == 200
    assert problem(client.get(key))["code"] == "quota_exceeded"


# -- rotation lineage ---------------------------------------------------------------------------


def test_a_rotation_records_where_each_key_came_from(manager: APIKeyManager, clock: Clock) -> None:
    first, info = manager.create_key(user_id="u", permissions=["read"])
    clock.advance(timedelta(minutes=1))
    second = manager.rotate_key(first)
    clock.advance(timedelta(minutes=1))
    third = manager.rotate_key(second)
    two, three = manager.check(second), manager.check(third)

    assert info.rotated_from is None
    assert two.rotated_from == info.key_id and three.rotated_from == two.key_id
    assert {two.family_id, three.family_id} == {info.key_id}
    assert manager.get_key_info(info.key_id).replaced_by == two.key_id  # type: ignore[union-attr]
    assert two.replaced_by == three.key_id and three.replaced_by is None
    assert three.scopes == ("read",)
    # A key's own deprecation marks are not copied to its replacement.
    assert "deprecated_at" not in three.metadata
    lineage = manager.lineage(three.key_id)
    assert [k.key_id for k in lineage] == [info.key_id, two.key_id, three.key_id]
    assert manager.lineage(info.key_id) == lineage


def test_lineage_follows_the_rotations_even_within_one_instant(manager: APIKeyManager) -> None:
    keys = [manager.generate_key(user_id="u")]
    for _ in range(4):  # the fake clock stands still: every key has one created_at
        keys.append(manager.rotate_key(keys[-1], grace=timedelta(hours=1)))
    ids = [manager.check(k).key_id for k in keys]
    assert [k.key_id for k in manager.lineage(ids[2])] == ids


def test_a_key_already_rotated_into_a_live_successor_is_not_rotated_again(
    manager: APIKeyManager,
) -> None:
    old = manager.generate_key(user_id="u")
    new = manager.rotate_key(old)
    with pytest.raises(KeyguardError, match="already rotated into"):
        manager.rotate_key(old)
    # Once the successor is revoked (its secret was lost, say), the old key may be rotated.
    manager.revoke_key(new)
    newer = manager.rotate_key(old)
    assert manager.check(old).replaced_by == manager.check(newer).key_id


def test_a_rotation_racing_a_revocation_issues_no_working_key(clock: Clock) -> None:
    store = OnceBefore()
    manager = APIKeyManager(store, clock=clock)
    old, info = manager.create_key(user_id="u", permissions=["admin"])
    before = len(manager.list_keys(include_inactive=True))

    store.meanwhile = lambda: manager.revoke_by_id(info.key_id)
    with pytest.raises(InvalidKeyError, match="revoked"):
        manager.rotate_key(old)
    assert manager.list_keys() == [], "the withdrawn successor does not work"
    assert len(manager.list_keys(include_inactive=True)) == before + 1


def test_a_rotation_racing_a_narrowing_gives_the_successor_the_narrow_scopes(
    clock: Clock,
) -> None:
    store = OnceBefore()
    manager = APIKeyManager(store, clock=clock)
    old, info = manager.create_key(user_id="u", permissions=["read", "admin"])

    store.meanwhile = lambda: manager.update_key(info.key_id, scopes=["read"])
    new = manager.rotate_key(old)

    assert manager.check(new).scopes == ("read",)
    assert manager.check(old).scopes == ("read",)
    assert [k.scopes for k in manager.list_keys()] == [("read",), ("read",)]


def test_rotating_with_no_grace_keeps_the_old_expiry_if_the_revocation_fails(
    clock: Clock,
) -> None:
    class RevokeFails(MemoryStore):
        def revoke(self, digest: str, at: datetime) -> bool:
            raise StoreError("database is unreachable")

    manager = APIKeyManager(RevokeFails(), clock=clock)
    old, info = manager.create_key(user_id="u", expires_in=timedelta(days=1))
    with pytest.raises(StoreError):
        manager.rotate_key(old, grace=timedelta(0))
    assert manager.check(old).expires_at == info.expires_at


def test_usage_counts_follow_the_key_across_rotations(kind_free_manager: APIKeyManager) -> None:
    manager = kind_free_manager
    old, info = manager.create_key(user_id="u")
    client = Client("asgi", manager)
    client.get(old)
    new = manager.rotate_key(old)
    client.get(new)
    client.get(new)
    client.get(old)  # still in its grace period
    new_id = manager.check(new).key_id

    for key_id in (info.key_id, new_id):
        (point,) = manager.usage(key_id, step="day", since=timedelta(days=1))
        assert point.requests == 4
    (own,) = manager.usage(info.key_id, step="day", since=timedelta(days=1), family=False)
    assert own.requests == 2, "the old key's own use, to see whether it is still in use"
    (own,) = manager.usage(new_id, step="day", since=timedelta(days=1), family=False)
    assert own.requests == 2


@pytest.fixture
def kind_free_manager(clock: Clock) -> APIKeyManager:
    return APIKeyManager(clock=clock)


def test_rotating_with_no_grace_revokes_the_old_key_and_marks_it(manager: APIKeyManager) -> None:
    old, info = manager.create_key(user_id="u")
    new = manager.rotate_key(old, grace=timedelta(0))
    after = manager.get_key_info(info.key_id)
    assert after is not None and after.revoked_at is not None
    assert after.replaced_by == manager.check(new).key_id


@TRANSPORTS
def test_a_replaced_key_carries_deprecation_and_sunset_during_its_grace(
    kind: str, clock: Clock
) -> None:
    manager = APIKeyManager(clock=clock, deprecation_link="https://example.com/docs/keys")
    old = manager.generate_key(user_id="u")
    rotated_at = clock.now
    new = manager.rotate_key(old, grace=timedelta(hours=24))
    client = Client(kind, manager)

    response = client.get(old)
    assert response.status_code == 200
    assert response.headers["deprecation"] == f"@{int(rotated_at)}"
    sunset = parsedate_to_datetime(response.headers["sunset"])
    assert sunset.timestamp() == int(rotated_at) + 86400
    assert response.headers["link"] == ('<https://example.com/docs/keys>; rel="deprecation"')
    fresh = client.get(new)
    assert fresh.status_code == 200
    assert not {"deprecation", "sunset", "link"} & set(fresh.headers)

    clock.advance(timedelta(hours=24, seconds=1))
    assert client.get(old).status_code == 401


@TRANSPORTS
def test_deprecation_fields_ride_along_with_rate_limit_fields_and_refusals(
    kind: str, manager: APIKeyManager
) -> None:
    old = manager.generate_key(user_id="u", rate_limits=["1/minute"])
    manager.rotate_key(old)
    client = Client(kind, manager)

    admitted = client.get(old)
    assert admitted.status_code == 200
    assert {"ratelimit", "ratelimit-policy", "deprecation", "sunset"} <= set(admitted.headers)
    limited = client.get(old)
    assert limited.status_code == 429
    assert {"deprecation", "sunset", "retry-after"} <= set(limited.headers)


def test_the_deprecation_link_must_be_a_plain_url() -> None:
    for bad in [
        "ftp://x",
        "https://example.com/a b",
        'https://x/"',
        "https://x/>",
        "https://x/{",
        42,
    ]:
        with pytest.raises(ValueError, match="deprecation_link"):
            APIKeyManager(deprecation_link=bad)  # type: ignore[arg-type]


def test_a_record_with_broken_deprecation_marks_has_no_fields() -> None:
    base = APIKeyManager().create_key(user_id="u")[1]
    broken = dataclasses.replace(
        base, metadata={**base.metadata, "replaced_by": "key_x", "deprecated_at": "yesterday"}
    )
    assert broken.deprecation == ()


# -- the CLI ------------------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path: Path) -> CLI:
    return CLI(tmp_path)


def test_cli_update_changes_fields_and_shows_the_lineage(cli: CLI) -> None:
    key, record = cli.create("--user", "a", "--scope", "read", "--scope", "write", "--name", "x")
    key_id = record["key_id"]

    done = cli(
        "update", key_id, "--scope", "read", "--name", "ci", "--expires", "30d",
        "--rate-limit", "5/second", "--meta", "team=core",
    )  # fmt: skip
    assert done.code == 0, done.err
    assert done.out == f"Updated {key_id} ({record['hint']}); the key itself is unchanged.\n"
    shown = cli("show", key_id, "--json").json()
    assert shown["scopes"] == ["read"] and shown["rate_limits"] == ["5/second"]
    assert shown["metadata"]["name"] == "ci" and shown["metadata"]["team"] == "core"
    assert shown["expires_at"] is not None
    assert cli("verify", key).code == 0

    same = cli("update", key_id, "--scope", "read")
    assert same.out.startswith("Nothing changed")

    cleared = cli("update", key_id, "--no-expiry", "--no-rate-limits", "--unset-meta", "team")
    assert cleared.code == 0
    shown = cli("show", key_id, "--json").json()
    assert shown["expires_at"] is None and shown["rate_limits"] == []
    assert "team" not in shown["metadata"]

    rotated = cli("rotate", key_id, "--json").json()
    family = cli("list", "--family", rotated["key_id"], "--json").json()["keys"]
    assert [k["key_id"] for k in family] == [key_id, rotated["key_id"]]
    both = cli("list", "--family", key_id, "--user", "a")
    assert both.code == 2 and "--family" in error_line(both)
    lines = cli("show", rotated["key_id"]).out.splitlines()
    assert f"previous   {key_id}" in lines
    assert f"successor  {rotated['key_id']}" in cli("show", key_id).out.splitlines()


def test_cli_update_refuses_widening_bad_values_and_missing_keys(cli: CLI) -> None:
    key, record = cli.create("--user", "a", "--scope", "read")
    key_id = record["key_id"]

    wider = cli("update", key_id, "--scope", "admin")
    assert wider.code == 1 and "--allow-widen" in error_line(wider)
    assert cli("show", key_id, "--json").json()["scopes"] == ["read"]
    assert cli("update", key_id, "--scope", "admin", "--allow-widen").code == 0

    nothing = cli("update", key_id)
    assert nothing.code == 2 and "nothing to update" in error_line(nothing)
    bad = cli("update", key_id, "--rate-limit", "3/fortnight")
    assert bad.code == 2 and "3/fortnight" in error_line(bad)
    both = cli("update", key_id, "--scope", "a", "--no-scopes")
    assert both.code == 2
    owner = cli("update", key_id, "--meta", "user_id=b")
    assert owner.code == 2 and "--user" in error_line(owner)

    assert cli("update", key_id, "--email", "b@example.com").code == 0
    assert cli("show", key_id, "--json").json()["metadata"]["email"] == "b@example.com"
    assert cli("update", key_id, "--email", "").code == 0
    assert "email" not in cli("show", key_id, "--json").json()["metadata"]

    missing = cli("update", "key_0000000000000000", "--name", "x")
    assert missing.code == 1 and "no key with key_id" in error_line(missing)
    cli("revoke", key_id)
    revoked = cli("update", key_id, "--name", "x")
    assert revoked.code == 1 and "it is revoked" in error_line(revoked)
    assert key not in revoked.out + revoked.err


def test_an_update_records_an_event_with_each_change_and_the_actor(
    manager: APIKeyManager,
) -> None:
    _, info = manager.create_key(user_id="u", permissions=["read", "write"], name="ci")
    manager.update_key(info.key_id, scopes=["read"], name=None, actor="ops@cli")
    manager.update_key(info.key_id, scopes=["read"])  # nothing changes: no event

    updated = [e for e in manager.events(info.key_id) if e.action == "updated"]
    assert len(updated) == 1
    assert updated[0].actor == "ops@cli"
    assert updated[0].changes == {
        "name": ["ci", None],
        "permissions": [["read", "write"], ["read"]],
    }


def test_an_updated_quota_keeps_what_the_period_has_used(manager: APIKeyManager) -> None:
    key, info = manager.create_key(user_id="u", quota="3/day")
    for _ in range(3):
        assert manager.charge(manager.check(key)).allowed  # type: ignore[union-attr]

    manager.update_key(info.key_id, quota="2/day")
    assert manager.remaining(key) == 0
    assert not manager.charge(manager.check(key)).allowed  # type: ignore[union-attr]
    manager.update_key(info.key_id, quota="5/day")
    assert manager.remaining(key) == 2


def test_lineage_fields_are_not_the_callers_to_set(manager: APIKeyManager) -> None:
    for field in ("family_id", "rotated_from", "replaced_by", "deprecated_at"):
        forged: dict[str, Any] = {field: "key_0000000000000000"}
        with pytest.raises(TypeError, match="kept by keyguard for rotations"):
            manager.create_key(user_id="u", **forged)
        with pytest.raises(TypeError, match="kept by keyguard for rotations"):
            manager.create_key({"user_id": "u", field: "x"})
    assert manager.list_keys() == []
