"""The push-invalidation listener's heartbeat: a connection that stops answering is noticed.

A silent proxy between the listener and its server plays the half-open connection (a
firewall that drops it, a paused host): sockets open, no byte through either way.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from keyguard import CachedStore
from keyguard.stores import _listener
from keyguard.stores._listener import Heartbeat
from tests.helpers import Clock
from tests.stores.services import proxied_store
from tests.stores.test_cached import T0, push_pair, record, wait_for

# Short enough for a test; the bound it implies is asserted with a loaded host's slack.
INTERVAL = 0.5
TIMEOUT = 2.0
BOUND = INTERVAL + TIMEOUT + _listener.POLL_SECONDS
SLACK = 15.0


@pytest.fixture
def quick_heartbeat(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(_listener, "HEARTBEAT_SECONDS", INTERVAL)
    monkeypatch.setattr(_listener, "HEARTBEAT_TIMEOUT", TIMEOUT)
    yield


def test_the_subscription_counts_as_the_first_ping() -> None:
    clock = Clock(0.0)
    heartbeat = Heartbeat(clock)
    clock.now = _listener.HEARTBEAT_TIMEOUT
    assert heartbeat.ping_due() is False  # still waiting for the confirmation

    clock.now += 0.001
    with pytest.raises(TimeoutError, match="no answer from the server within 5 s"):
        heartbeat.ping_due()


def test_a_ping_is_due_an_interval_after_each_answer_and_only_one_at_a_time() -> None:
    clock = Clock(0.0)
    heartbeat = Heartbeat(clock)
    heartbeat.answered()
    clock.now = heartbeat.interval - 0.001
    assert heartbeat.ping_due() is False

    clock.now = heartbeat.interval
    assert heartbeat.ping_due() is True
    clock.now += heartbeat.timeout
    assert heartbeat.ping_due() is False  # sent, not yet late: no second ping

    heartbeat.answered()
    clock.now += heartbeat.interval
    assert heartbeat.ping_due() is True


def test_an_unanswered_ping_raises_after_the_timeout() -> None:
    clock = Clock(0.0)
    heartbeat = Heartbeat(clock)
    heartbeat.answered()
    clock.now = heartbeat.interval
    assert heartbeat.ping_due() is True

    clock.now += heartbeat.timeout + 0.001
    with pytest.raises(TimeoutError):
        heartbeat.ping_due()


@pytest.mark.usefixtures("quick_heartbeat")
@pytest.mark.parametrize("kind", ["redis", "postgres"])
def test_a_silent_connection_is_noticed_and_pushes_resume_once_it_answers(kind: str) -> None:
    with push_pair(kind) as (inner, other), proxied_store(inner) as (proxied, proxy):
        # A long ttl: only a push can make this cache see a change made elsewhere.
        cache = CachedStore(proxied, ttl=3600, ruled_out_lookups=0)
        try:
            assert cache.wait_until_filtering(30)
            revoked = record()
            other.add(revoked)
            assert wait_for(lambda: cache.get(revoked.digest) == revoked, 30) is not None

            proxy.silent = True  # no error, no FIN: the connection just stops answering
            noticed = wait_for(lambda: not cache.listening, timeout=BOUND + SLACK)

            assert noticed is not None, f"still 'listening' {BOUND + SLACK:g} s after silence"
            # Without pushes the filter is not believed (a key made elsewhere now would be
            # refused for good otherwise), and the cache is trusted for its ttl only.
            assert cache.filtering is False
            meanwhile = record()
            other.add(meanwhile)
            other.revoke(revoked.digest, T0)

            proxy.silent = False
            assert cache.wait_until_listening(30), "the listener never reconnected"
            assert cache.wait_until_filtering(30)
            assert cache.get(meanwhile.digest) == meanwhile
            assert cache.get(revoked.digest) == other.get(revoked.digest)
            later = record()
            other.add(later)  # found only once its push has taught the filter
            assert wait_for(lambda: cache.get(later.digest) == later, 30) is not None
        finally:
            cache.close()
