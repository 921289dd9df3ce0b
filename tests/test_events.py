"""Audit events: every change the manager makes to a key is recorded, once, with its actor."""

from __future__ import annotations

import itertools
import json
import logging
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from keyguard import APIKeyManager, CachedStore, KeyEvent, MemoryStore, SQLiteStore, mask_key
from keyguard.events import jsonable
from tests.helpers import START, BrokenEventStore, Clock, KeysOnlyStore


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def seen() -> list[KeyEvent]:
    """The events passed to ``on_event``."""
    return []


@pytest.fixture
def manager(clock: Clock, seen: list[KeyEvent]) -> APIKeyManager:
    return APIKeyManager(MemoryStore(), clock=clock, on_event=seen.append)


def at(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, timezone.utc)


def iso(ts: float) -> str:
    return at(ts).isoformat()


# -- one event per change -----------------------------------------------------------------------


def test_creating_a_key_records_who_for_whom_and_until_when(
    manager: APIKeyManager, seen: list[KeyEvent]
) -> None:
    _, info = manager.create_key(
        user_id="alice", permissions=["read"], expires_in=timedelta(days=1), actor="ops@cli"
    )

    assert (
        manager.events()
        == seen
        == [
            KeyEvent(
                at(START),
                info.key_id,
                "created",
                "ops@cli",
                {
                    "user_id": "alice",
                    "metadata": {"permissions": ["read"]},
                    "expires_at": iso(START + 86400),
                },
            )
        ]
    )


def test_a_created_event_is_stamped_with_the_records_created_at() -> None:
    ticks = itertools.count(START)  # a second later at every read
    manager = APIKeyManager(MemoryStore(), clock=lambda: next(ticks))

    _, info = manager.create_key(user_id="alice")

    assert manager.events()[0].at == info.created_at


def test_generate_key_records_too_and_the_actor_defaults_to_empty(
    manager: APIKeyManager,
) -> None:
    manager.generate_key(user_id="bob")

    [event] = manager.events()
    assert event.action == "created" and event.actor == ""
    assert event.changes == {"user_id": "bob", "metadata": {}, "expires_at": None}


def test_actor_is_reserved_but_a_metadata_field_named_actor_can_come_in_the_dict(
    manager: APIKeyManager,
) -> None:
    _, info = manager.create_key({"user_id": "u", "actor": "robot"}, actor="ops")

    assert info.metadata == {"user_id": "u", "actor": "robot"}
    [event] = manager.events()
    assert event.actor == "ops" and event.changes["metadata"] == {"actor": "robot"}


@pytest.mark.parametrize(
    "actor, error",
    [
        pytest.param(42, TypeError, id="not a str"),
        pytest.param("a\x00b", ValueError, id="NUL"),
        pytest.param("\udc80", ValueError, id="lone surrogate"),
    ],
)
def test_a_bad_actor_is_refused_before_anything_changes(
    manager: APIKeyManager, actor: Any, error: type[Exception]
) -> None:
    key, info = manager.create_key(user_id="u")

    with pytest.raises(error, match="actor"):
        manager.create_key(user_id="v", actor=actor)
    with pytest.raises(error, match="actor"):
        manager.revoke_key(key, actor=actor)
    with pytest.raises(error, match="actor"):
        manager.revoke_by_id(info.key_id, actor=actor)
    with pytest.raises(error, match="actor"):
        manager.rotate_key(key, actor=actor)
    with pytest.raises(error, match="actor"):
        manager.rotate_by_id(info.key_id, actor=actor)

    assert len(manager.list_keys()) == 1 and manager.validate_key(key)
    assert len(manager.events()) == 1


def test_revoking_records_when_and_only_if_something_was_revoked(
    manager: APIKeyManager, clock: Clock
) -> None:
    key, info = manager.create_key(user_id="u")
    other = manager.create_key(user_id="u")[1]
    clock.advance(timedelta(minutes=5))

    assert manager.revoke_key(key, actor="alice") is True
    assert manager.revoke_key(key, actor="alice") is False  # already revoked
    assert manager.revoke_by_id(info.key_id, actor="alice") is False
    assert manager.revoke_key("sk_" + "0" * 32, actor="alice") is False  # unknown
    assert manager.revoke_key("not a key", actor="alice") is False
    assert manager.revoke_by_id(other.key_id, actor="bob") is True

    revoked = [e for e in manager.events() if e.action == "revoked"]
    assert revoked == [
        KeyEvent(
            at(START + 300), other.key_id, "revoked", "bob", {"revoked_at": iso(START + 300)}
        ),
        KeyEvent(
            at(START + 300), info.key_id, "revoked", "alice", {"revoked_at": iso(START + 300)}
        ),
    ]


def test_an_expired_key_is_not_revoked_and_records_nothing(
    manager: APIKeyManager, clock: Clock
) -> None:
    key = manager.generate_key(user_id="u", expires_in=timedelta(hours=1))
    clock.advance(timedelta(hours=2))

    assert manager.revoke_key(key) is False
    assert [e.action for e in manager.events()] == ["created"]


def test_rotating_records_the_new_key_then_the_old_one(
    manager: APIKeyManager, clock: Clock, seen: list[KeyEvent]
) -> None:
    key, old = manager.create_key(user_id="u", expires_in=timedelta(days=30))
    clock.advance(timedelta(days=1))

    new_key = manager.rotate_key(key, grace=timedelta(hours=2), actor="ops@cli")

    new = manager.verify(new_key).key
    assert new is not None
    rotated, created = manager.events(limit=2)
    assert rotated == KeyEvent(
        at(START + 86400),
        old.key_id,
        "rotated",
        "ops@cli",
        {"into": new.key_id, "expires_at": iso(START + 86400 + 7200)},
    )
    assert created.key_id == new.key_id and created.action == "created"
    assert created.actor == "ops@cli"
    assert created.changes["rotated_from"] == old.key_id
    assert created.changes["metadata"] == {"family_id": old.key_id, "rotated_from": old.key_id}
    assert created.changes["expires_at"] == iso(START + 86400 + 30 * 86400)
    assert seen[-2:] == [created, rotated]  # on_event sees them in the order they happened


def test_rotating_with_no_grace_records_no_deadline_and_no_separate_revocation(
    manager: APIKeyManager,
) -> None:
    _, old = manager.create_key(user_id="u")
    new_key = manager.rotate_by_id(old.key_id, grace=timedelta(0), actor="ops")

    new = manager.verify(new_key).key
    assert new is not None
    rotated = manager.events(old.key_id)[0]
    assert rotated.action == "rotated"
    assert rotated.changes == {"into": new.key_id, "expires_at": None}
    assert [e.action for e in manager.events()] == ["rotated", "created", "created"]


def test_rotating_keeps_an_earlier_expiry_and_records_it(
    manager: APIKeyManager, clock: Clock
) -> None:
    key, old = manager.create_key(user_id="u", expires_in=timedelta(hours=1))

    manager.rotate_key(key, grace=timedelta(hours=24))

    assert manager.events(old.key_id)[0].changes["expires_at"] == iso(START + 3600)


def test_a_refused_rotation_records_nothing(manager: APIKeyManager) -> None:
    key = manager.generate_key(user_id="u")
    manager.revoke_key(key)

    with pytest.raises(Exception, match="cannot rotate"):
        manager.rotate_key(key, actor="ops")
    assert [e.action for e in manager.events()] == ["revoked", "created"]


def test_adding_credits_records_how_many_and_what_is_left(manager: APIKeyManager) -> None:
    _, info = manager.create_key(user_id="u", quota=10)

    assert manager.add_credits(info.key_id, 5, actor="billing") == 15

    [credited, _] = manager.events(info.key_id)
    assert credited == KeyEvent(
        at(START), info.key_id, "credited", "billing", {"credits": 5, "remaining": 15}
    )


def test_checks_and_refusals_are_not_events(manager: APIKeyManager) -> None:
    key = manager.generate_key(user_id="u")
    manager.revoke_key(key)

    manager.verify(key)
    manager.verify("sk_" + "0" * 32)
    manager.validate_key("nonsense")

    assert [e.action for e in manager.events()] == ["revoked", "created"]


# -- on_event and a failing store ---------------------------------------------------------------


def test_a_raising_on_event_is_logged_and_the_change_stands(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(event: KeyEvent) -> None:
        raise RuntimeError("webhook down")

    manager = APIKeyManager(clock=clock, on_event=explode)
    key = manager.generate_key(user_id="u")
    assert manager.revoke_key(key) is True

    assert not manager.validate_key(key)
    assert [e.action for e in manager.events()] == ["revoked", "created"]
    failures = [r for r in caplog.records if "on_event failed" in r.getMessage()]
    assert len(failures) == 2
    assert failures[0].levelno == logging.ERROR and failures[0].exc_info is not None


def test_a_store_that_cannot_record_events_is_logged_and_the_change_stands(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[KeyEvent] = []
    manager = APIKeyManager(BrokenEventStore(), clock=clock, on_event=seen.append)

    key, info = manager.create_key(user_id="u", actor="ops")
    assert manager.revoke_key(key, actor="ops") is True

    assert not manager.validate_key(key)
    assert [e.action for e in seen] == ["created", "revoked"]  # on_event still hears
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == [
        f"could not record the created event of {info.key_id}: the events table is unreachable",
        f"could not record the revoked event of {info.key_id}: the events table is unreachable",
    ]


def test_on_event_must_be_callable() -> None:
    with pytest.raises(TypeError, match="on_event"):
        APIKeyManager(on_event="print")  # type: ignore[arg-type]


def test_a_store_that_keeps_no_events_still_changes_keys_and_says_so_when_asked(
    clock: Clock,
) -> None:
    seen: list[KeyEvent] = []
    for store in (KeysOnlyStore(), CachedStore(KeysOnlyStore())):
        manager = APIKeyManager(store, clock=clock, on_event=seen.append)
        key = manager.generate_key(user_id="u")
        assert manager.revoke_key(key) is True
        with pytest.raises(TypeError, match=r"KeysOnlyStore\(\).* keeps no audit events"):
            manager.events()
    assert [e.action for e in seen] == ["created", "revoked"] * 2


def test_events_go_through_a_cache_to_its_store(tmp_path: Path, clock: Clock) -> None:
    store = CachedStore(SQLiteStore(tmp_path / "keys.db"))
    manager = APIKeyManager(store, clock=clock)
    key = manager.generate_key(user_id="u", actor="ops")
    manager.revoke_key(key, actor="ops")
    manager.close()

    reopened = APIKeyManager(SQLiteStore(tmp_path / "keys.db"), clock=clock)
    assert [(e.action, e.actor) for e in reopened.events()] == [
        ("revoked", "ops"),
        ("created", "ops"),
    ]
    reopened.close()


# -- reading events -----------------------------------------------------------------------------


def test_events_filter_by_key_since_and_limit(manager: APIKeyManager, clock: Clock) -> None:
    _, a = manager.create_key(user_id="u")
    clock.advance(timedelta(hours=1))
    _, b = manager.create_key(user_id="u")
    clock.advance(timedelta(hours=1))
    manager.revoke_by_id(a.key_id)

    assert [(e.key_id, e.action) for e in manager.events()] == [
        (a.key_id, "revoked"),
        (b.key_id, "created"),
        (a.key_id, "created"),
    ]
    assert [e.action for e in manager.events(a.key_id)] == ["revoked", "created"]
    assert len(manager.events(since=timedelta(minutes=90))) == 2  # from START + 30m
    assert len(manager.events(since=timedelta(hours=1))) == 2  # its own instant included
    assert len(manager.events(since=timedelta(0))) == 1
    assert len(manager.events(since=at(START + 3600))) == 2
    assert len(manager.events(since=timedelta(days=10**6))) == 3  # before datetime.min: all
    assert manager.events(limit=1)[0].action == "revoked"
    assert manager.events("key_0000000000000000") == []


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        pytest.param({"limit": 0}, ValueError, "limit must be at least 1", id="limit 0"),
        pytest.param({"limit": "5"}, TypeError, "limit must be an int", id="limit str"),
        pytest.param({"limit": True}, TypeError, "limit must be an int", id="limit bool"),
        pytest.param({"since": 5}, TypeError, "since must be a datetime", id="since int"),
        pytest.param(
            {"since": datetime(2024, 1, 1)}, ValueError, "timezone-aware", id="naive since"
        ),
        pytest.param(
            {"since": timedelta(seconds=-1)}, ValueError, "negative", id="negative since"
        ),
        pytest.param({"key_id": 5}, TypeError, "key_id must be a str", id="key_id int"),
    ],
)
def test_events_arguments_are_checked(
    manager: APIKeyManager, kwargs: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        manager.events(**kwargs)


def test_a_key_event_is_utc_read_only_and_hashable() -> None:
    plus_two = timezone(timedelta(hours=2))
    event = KeyEvent(datetime(2024, 5, 17, 10, tzinfo=plus_two), "key_x", "revoked")

    assert event.at == datetime(2024, 5, 17, 8, tzinfo=timezone.utc)
    assert event.at.tzinfo is timezone.utc
    assert event.actor == "" and event.changes == {}
    assert hash(event) == hash(KeyEvent(event.at, "key_x", "revoked"))
    with pytest.raises(TypeError, match="read-only"):
        event.changes["x"] = 1  # type: ignore[index]
    assert event.to_dict() == {
        "at": "2024-05-17T08:00:00+00:00",
        "key_id": "key_x",
        "action": "revoked",
        "actor": "",
        "changes": {},
    }
    with pytest.raises(TypeError, match="timezone-aware"):
        KeyEvent(datetime(2024, 5, 17), "key_x", "revoked")


# -- never a secret -----------------------------------------------------------------------------


def test_no_event_holds_a_key(manager: APIKeyManager, seen: list[KeyEvent]) -> None:
    first, info = manager.create_key(user_id="u", name="first", quota=10)
    # A key pasted into metadata by mistake is kept masked in the event.
    pasted, pasted_info = manager.create_key(
        {"user_id": "u", "note": f"replaces {first}"}, actor="ops"
    )
    rotated = manager.rotate_key(first, grace=timedelta(hours=1), actor="ops")
    last = manager.rotate_key(rotated, grace=timedelta(0), actor="ops")
    manager.revoke_key(pasted, actor="ops")
    manager.add_credits(info.key_id, 3, actor="ops")

    events = manager.events()
    assert len(events) == len(seen) == 8
    texts = [repr(e) for e in events] + [json.dumps(e.to_dict()) for e in events]
    for key in (first, pasted, rotated, last):
        assert not any(key[-32:] in text for text in texts), mask_key(key)
    [created] = [e for e in manager.events(pasted_info.key_id) if e.action == "created"]
    assert created.changes["metadata"]["note"] == f"replaces sk_…{first[-4:]}"


def test_a_store_failing_otherwise_is_logged_with_its_traceback_and_the_change_stands(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    class Buggy(MemoryStore):
        def add_event(self, event: KeyEvent) -> None:
            raise RuntimeError("a bug in a store")

    manager = APIKeyManager(Buggy(), clock=clock)
    key = manager.generate_key(user_id="u")

    assert manager.validate_key(key)
    [record] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert record.getMessage().startswith("could not record the created event of key_")
    assert record.exc_info is not None


def test_what_an_event_cannot_record_is_a_bug_said_at_once(manager: APIKeyManager) -> None:
    _, info = manager.create_key(user_id="u")

    assert jsonable({"at": at(START), "pair": (1, "x")}) == {
        "at": iso(START),
        "pair": [1, "x"],
    }
    with pytest.raises(TypeError, match="an event cannot record a set"):
        jsonable({"tags": {"a"}})
    with pytest.raises(ValueError, match="unknown event action 'deleted'"):
        manager._emit("deleted", info, {}, "")
