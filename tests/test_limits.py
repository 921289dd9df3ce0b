"""Per-key rate limits, quotas and the failed-check throttle, through the real middleware.

Time is a fake clock throughout: every window edge is an exact instant, never a sleep.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, MutableMapping
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from keyguard import APIKeyManager, StoreError
from keyguard.asgi import APIKeyMiddleware as ASGIMiddleware
from keyguard.limits import FailureThrottle, Limiter, Quota, Rate, parse_quota, parse_rates
from keyguard.pipeline import Admission, Pipeline, admitted, client_address, refund
from keyguard.problems import Problem
from keyguard.stores.memory import MemoryStore
from keyguard.wsgi import APIKeyMiddleware as WSGIMiddleware
from tests.helpers import START, Clock, CountingStore

# -- writing limits --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("10/second", Rate(10, "second")),
        ("1000/hour", Rate(1000, "hour")),
        (" 5 / minutes ", Rate(5, "minute")),
        ("1/Day", Rate(1, "day")),
    ],
)
def test_rate_limits_are_written_n_per_unit(text: str, rate: Rate) -> None:
    assert parse_rates([text]) == (rate,)
    assert str(rate) == f"{rate.count}/{rate.unit}"


def test_several_rates_are_kept_in_order_without_repeats() -> None:
    assert parse_rates(["10/second", "1000/hour", "10/seconds"]) == (
        Rate(10, "second"),
        Rate(1000, "hour"),
    )
    assert parse_rates("3/minute") == (Rate(3, "minute"),)


@pytest.mark.parametrize(
    "text", ["10", "10/week", "0/second", "-1/second", "ten/second", "10/", "/second", ""]
)
def test_a_bad_rate_limit_is_a_one_line_value_error(text: str) -> None:
    with pytest.raises(ValueError, match=r"rate limit|count") as caught:
        parse_rates([text])
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("value", "quota"),
    [
        (500, Quota(500)),
        ("500", Quota(500)),
        ("10000/month", Quota(10000, "month")),
        ("20/days", Quota(20, "day")),
    ],
)
def test_quotas_are_a_number_or_n_per_calendar_period(value: object, quota: Quota) -> None:
    assert parse_quota(value) == quota


@pytest.mark.parametrize("value", [0, -5, "10/second", "many", True, 1.5, [3], "\u0665"])
def test_a_bad_quota_is_refused(value: object) -> None:
    with pytest.raises((ValueError, TypeError)) as caught:
        parse_quota(value)
    assert "\n" not in str(caught.value)


def test_limit_numbers_are_ascii_digits() -> None:
    # int() would read other scripts' digits ("\u0661\u0660" is 10); a limit is written in ASCII.
    with pytest.raises(ValueError, match="invalid rate limit"):
        parse_rates(["\u0661\u0660/second"])


@given(st.text(max_size=40))
def test_any_limit_string_parses_or_fails_with_one_line(text: str) -> None:
    for parse in (lambda t: parse_rates([t]), parse_quota):
        try:
            parse(text)
        except ValueError as e:
            assert "\n" not in str(e)


def test_month_windows_follow_the_calendar_in_utc() -> None:
    quota = Quota(100, "month")
    december = datetime(2026, 12, 31, 23, 59, 59, tzinfo=timezone.utc).timestamp()
    label, start, end = quota.window(december)
    assert label == "2026-12"
    assert start == datetime(2026, 12, 1, tzinfo=timezone.utc).timestamp()
    assert end == datetime(2027, 1, 1, tzinfo=timezone.utc).timestamp()
    assert quota.window(end)[0] == "2027-01"
    assert Quota(5).window(december) == ("total", None, None)


# -- creating keys with limits --------------------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def manager(clock: Clock) -> APIKeyManager:
    return APIKeyManager(clock=clock)


def test_limits_are_stored_with_the_key_and_shown_by_its_record(manager: APIKeyManager) -> None:
    _, info = manager.create_key(
        user_id="u", rate_limits=["10/second", "1000/hour"], quota="10000/month"
    )
    assert info.rate_limits == (Rate(10, "second"), Rate(1000, "hour"))
    assert info.quota == Quota(10000, "month")
    (listed,) = manager.list_keys("u")
    assert listed.rate_limits == info.rate_limits and listed.quota == info.quota
    assert manager.get_key_info(info.key_id) == info


def test_a_bad_limit_at_creation_stores_nothing(manager: APIKeyManager) -> None:
    with pytest.raises(ValueError, match="invalid rate limit '10/fortnight'"):
        manager.create_key(user_id="u", rate_limits=["10/fortnight"])
    with pytest.raises(ValueError, match="invalid quota"):
        manager.create_key(user_id="u", quota="5/week")
    assert manager.list_keys(include_inactive=True) == []


# -- an app behind the middleware ------------------------------------------------------------

calls: list[str] = []


async def asgi_app(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    calls.append(scope["path"])
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    calls.append(environ["PATH_INFO"])
    start_response("200 OK", [("content-type", "text/plain")])
    return [b"ok"]


class Client:
    """One request interface over the ASGI and the WSGI middleware."""

    def __init__(self, kind: str, manager: APIKeyManager, **options: Any) -> None:
        self._client: Any
        if kind == "asgi":
            from starlette.testclient import TestClient

            app: Any = ASGIMiddleware(asgi_app, manager=manager, **options)
            self._client = TestClient(app, base_url="http://t", client=("10.0.0.1", 5000))
        else:
            app = WSGIMiddleware(wsgi_app, manager=manager, **options)
            self._client = httpx.Client(
                transport=httpx.WSGITransport(app=app, remote_addr="10.0.0.1"),
                base_url="http://t",
            )

    def get(self, key: str | None = None, **headers: str) -> Any:
        headers = {name.replace("_", "-"): value for name, value in headers.items()}
        if key is not None:
            headers["authorization"] = f"Bearer {key}"
        return self._client.get("/data", headers=headers)


@pytest.fixture(params=["asgi", "wsgi"])
def kind(request: pytest.FixtureRequest) -> Iterator[str]:
    calls.clear()
    yield str(request.param)


def problem(response: Any) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/problem+json"
    body: dict[str, Any] = json.loads(response.content)
    return body


def test_a_burst_up_to_the_limit_passes_then_429_with_retry_after(
    kind: str, manager: APIKeyManager, clock: Clock
) -> None:
    key = manager.generate_key(user_id="u", rate_limits=["3/second"])
    client = Client(kind, manager)
    answers = [client.get(key) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert [a.headers["ratelimit"] for a in answers] == [
        '"3/second";r=2;t=1',
        '"3/second";r=1;t=1',
        '"3/second";r=0;t=1',
    ]
    assert answers[0].headers["ratelimit-policy"] == '"3/second";q=3;w=1'

    refused = client.get(key)
    assert refused.status_code == 429
    assert problem(refused)["code"] == "rate_limited"
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["ratelimit"] == '"3/second";r=0;t=1'
    assert refused.headers["ratelimit-policy"] == '"3/second";q=3;w=1'
    assert len(calls) == 3, "the app is not called for a refused request"


def test_gcra_admits_again_exactly_one_interval_later(
    kind: str, manager: APIKeyManager, clock: Clock
) -> None:
    key = manager.generate_key(user_id="u", rate_limits=["2/second"])
    client = Client(kind, manager)
    assert [client.get(key).status_code for _ in range(3)] == [200, 200, 429]
    clock.advance(timedelta(milliseconds=499))
    assert client.get(key).status_code == 429
    clock.advance(timedelta(milliseconds=1))
    assert client.get(key).status_code == 200
    assert client.get(key).status_code == 429
    # A client keeping to the steady rate is never refused, window edge or not.
    for _ in range(20):
        clock.advance(timedelta(milliseconds=500))
        assert client.get(key).status_code == 200


def test_no_window_edge_lets_twice_the_limit_through(
    kind: str, manager: APIKeyManager, clock: Clock
) -> None:
    key = manager.generate_key(user_id="u", rate_limits=["10/minute"])
    client = Client(kind, manager)
    clock.advance(timedelta(seconds=59.9))
    first = [client.get(key).status_code for _ in range(10)]
    clock.advance(timedelta(seconds=0.2))  # a fixed window would reset here
    second = [client.get(key).status_code for _ in range(10)]
    assert first == [200] * 10
    assert second == [429] * 10
    assert client.get(key).headers["retry-after"] == "6"


def test_every_limit_is_enforced_and_the_tighter_one_refuses(
    kind: str, manager: APIKeyManager, clock: Clock
) -> None:
    key = manager.generate_key(user_id="u", rate_limits=["5/second", "7/hour"])
    client = Client(kind, manager)
    statuses = []
    for _ in range(10):
        statuses.append(client.get(key).status_code)
        clock.advance(timedelta(seconds=1))
    assert statuses == [200] * 7 + [429] * 3
    refused = client.get(key)
    # The hourly limit refills one request every 514.3 s.
    assert int(refused.headers["retry-after"]) == pytest.approx(3600 / 7 - 10, abs=1)


def test_only_admitted_requests_use_the_budget(
    kind: str, manager: APIKeyManager, clock: Clock
) -> None:
    key = manager.generate_key(user_id="u", rate_limits=["2/minute"], permissions=["read"])
    client = Client(kind, manager, required_scopes=["write"], failure_limit=None)
    for _ in range(5):
        assert client.get(key).status_code == 403  # insufficient_scope: not charged
    for _ in range(5):
        assert client.get("sk_" + "0" * 32).status_code == 401
    other = Client(kind, manager, failure_limit=None)
    assert [other.get(key).status_code for _ in range(3)] == [200, 200, 429]


def test_middleware_rate_limits_apply_to_keys_without_their_own(
    kind: str, manager: APIKeyManager
) -> None:
    plain = manager.generate_key(user_id="plain")
    own = manager.generate_key(user_id="own", rate_limits=["3/second"])
    client = Client(kind, manager, rate_limits=["1/second"])
    assert [client.get(plain).status_code for _ in range(2)] == [200, 429]
    assert [client.get(own).status_code for _ in range(4)] == [200, 200, 200, 429]


def test_a_key_without_limits_gets_no_ratelimit_headers(kind: str, manager: APIKeyManager) -> None:
    key = manager.generate_key(user_id="u")
    response = Client(kind, manager).get(key)
    assert response.status_code == 200
    assert "ratelimit" not in response.headers and "ratelimit-policy" not in response.headers


def test_rotation_keeps_the_budget(kind: str, manager: APIKeyManager) -> None:
    old = manager.generate_key(user_id="u", rate_limits=["3/hour"], quota=5)
    client = Client(kind, manager)
    assert [client.get(old).status_code for _ in range(2)] == [200, 200]
    new = manager.rotate_key(old)
    assert [client.get(new).status_code for _ in range(2)] == [200, 429]
    assert client.get(old).status_code == 429, "the old key shares the family's budget"
    assert manager.remaining(new) == manager.remaining(old) == 2


# -- quotas ------------------------------------------------------------------------------------


def test_a_fixed_quota_is_used_up_and_never_refilled(
    kind: str, manager: APIKeyManager, clock: Clock
) -> None:
    key = manager.generate_key(user_id="u", quota=3)
    client = Client(kind, manager)
    answers = [client.get(key) for _ in range(3)]
    assert [a.headers["ratelimit"] for a in answers] == [
        '"quota";r=2',
        '"quota";r=1',
        '"quota";r=0',
    ]
    refused = client.get(key)
    assert refused.status_code == 429
    assert problem(refused)["code"] == "quota_exceeded"
    assert "retry-after" not in refused.headers
    clock.advance(timedelta(days=400))
    assert client.get(key).status_code == 429
    assert manager.remaining(key) == 0


def test_a_monthly_quota_is_refilled_at_the_start_of_the_month(
    kind: str, manager: APIKeyManager, clock: Clock
) -> None:
    clock.now = datetime(2026, 11, 30, 23, 0, tzinfo=timezone.utc).timestamp()
    key = manager.generate_key(user_id="u", quota="2/month")
    client = Client(kind, manager)
    assert [client.get(key).status_code for _ in range(3)] == [200, 200, 429]
    refused = client.get(key)
    assert refused.headers["retry-after"] == "3600"
    assert refused.headers["ratelimit-policy"] == f'"quota";q=2;w={30 * 86400}'
    clock.advance(timedelta(minutes=59, seconds=59))
    assert client.get(key).status_code == 429
    clock.advance(timedelta(seconds=1))
    assert [client.get(key).status_code for _ in range(3)] == [200, 200, 429]


def test_remaining_and_added_credits(manager: APIKeyManager, clock: Clock) -> None:
    key, info = manager.create_key(user_id="u", quota="3/day")
    assert manager.remaining(key) == manager.remaining(info.key_id) == 3
    client = Client("wsgi", manager)
    client.get(key)
    assert manager.remaining(key) == 2
    assert manager.add_credits(info.key_id, 10) == 12
    assert [client.get(key).status_code for _ in range(13)] == [200] * 12 + [429]
    clock.advance(timedelta(days=1))
    assert manager.remaining(key) == 3, "credits last until the refill"


def test_remaining_and_credits_refuse_bad_input(manager: APIKeyManager) -> None:
    key, info = manager.create_key(user_id="u")
    assert manager.remaining(key) is None
    with pytest.raises(ValueError, match="no quota"):
        manager.add_credits(info.key_id, 5)
    with pytest.raises(ValueError, match="positive"):
        manager.add_credits(info.key_id, 0)
    with pytest.raises(KeyError, match="key_0000000000000000"):
        manager.remaining("key_0000000000000000")
    with pytest.raises(KeyError) as caught:
        manager.remaining("sk_" + "ab" * 16)
    assert "ab" * 16 not in str(caught.value)


def test_a_websocket_handshake_over_its_quota_is_refused_with_429(manager: APIKeyManager) -> None:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.routing import WebSocketRoute
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocket, WebSocketDisconnect

    async def echo(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    key = manager.generate_key(user_id="u", quota=1)
    app = Starlette(
        routes=[WebSocketRoute("/ws", echo)],
        middleware=[Middleware(ASGIMiddleware, manager=manager)],
    )
    with TestClient(app) as client:
        with client.websocket_connect("/ws", headers={"authorization": f"Bearer {key}"}) as ws:
            assert ws.receive_text() == "hi"
        with (
            pytest.raises(WebSocketDisconnect) as caught,
            client.websocket_connect("/ws", headers={"authorization": f"Bearer {key}"}),
        ):
            pass
    denial = caught.value
    # The test server supports websocket.http.response: the refusal is an HTTP response.
    assert getattr(denial, "status_code", None) == 429
    assert json.loads(getattr(denial, "content", b"{}"))["code"] == "quota_exceeded"


# -- counter stores that fail --------------------------------------------------------------------


class BrokenCounters(MemoryStore):
    def consume(self, buckets: Any, now: float) -> tuple[bool, list[float]]:
        from keyguard import StoreError

        raise StoreError("counter store is unreachable")


def test_a_failing_counter_store_is_503_or_admits_with_fail_open(
    kind: str, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    manager = APIKeyManager(clock=clock, counters=BrokenCounters())
    key = manager.generate_key(user_id="u", rate_limits=["1/second"])
    refused = Client(kind, manager).get(key)
    assert refused.status_code == 503
    assert problem(refused)["code"] == "store_unavailable"
    with caplog.at_level(logging.WARNING, logger="keyguard"):
        admitted = Client(kind, manager, fail_open=True).get(key)
    assert admitted.status_code == 200
    assert "counter store failed" in caplog.text
    assert key not in caplog.text


def test_counters_can_live_in_another_store(clock: Clock) -> None:
    counters = MemoryStore()
    manager = APIKeyManager(MemoryStore(), counters=counters, clock=clock)
    key = manager.generate_key(user_id="u", quota=1)
    client = Client("wsgi", manager)
    assert [client.get(key).status_code for _ in range(2)] == [200, 429]
    assert any(name.startswith("quota:") for name in counters._counters)
    assert manager.store._counters == {}  # type: ignore[attr-defined]


def test_from_url_reads_the_counters_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("KEYGUARD_COUNTERS", "memory://")
    manager = APIKeyManager.from_url(f"sqlite:///{tmp_path / 'k.db'}")
    assert manager.limiter is not None
    assert isinstance(manager.limiter.counters, MemoryStore)
    manager.store.close()


# -- failed-attempt throttling ------------------------------------------------------------------


def test_too_many_failures_from_one_address_are_429_without_a_store_lookup(
    kind: str, clock: Clock
) -> None:
    store = CountingStore()
    manager = APIKeyManager(store, clock=clock)
    good = manager.generate_key(user_id="u")
    client = Client(kind, manager)
    unknown = "sk_" + "0" * 32
    assert {client.get(unknown).status_code for _ in range(20)} == {401}
    lookups = store.calls["get"]
    refused = client.get(unknown)
    assert refused.status_code == 429
    assert problem(refused)["code"] == "too_many_failures"
    assert refused.headers["retry-after"] == "3"
    assert client.get(good).status_code == 429, "the address is throttled, not the key"
    assert store.calls["get"] == lookups, "a throttled address costs no store lookup"
    # Another address is unaffected.
    elsewhere = ASGIMiddleware(asgi_app, manager=manager)
    transport = httpx.ASGITransport(app=elsewhere, client=("10.9.9.9", 1))

    async def from_elsewhere() -> int:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            r = await c.get("/data", headers={"authorization": f"Bearer {good}"})
            return r.status_code

    import asyncio

    assert asyncio.run(from_elsewhere()) == 200
    clock.advance(timedelta(seconds=3))
    assert client.get(good).status_code == 200, "one more failure is allowed every 3 s"


def test_the_throttle_can_be_turned_off_or_tuned(kind: str, clock: Clock) -> None:
    manager = APIKeyManager(clock=clock)
    unknown = "sk_" + "0" * 32
    off = Client(kind, manager, failure_limit=None)
    assert {off.get(unknown).status_code for _ in range(50)} == {401}
    tight = Client(kind, manager, failure_limit="2/minute")
    assert [tight.get(unknown).status_code for _ in range(3)] == [401, 401, 429]


def test_missing_keys_and_scope_refusals_are_not_failed_checks(
    kind: str, manager: APIKeyManager
) -> None:
    key = manager.generate_key(user_id="u")
    client = Client(kind, manager, required_scopes=["admin"], failure_limit="2/minute")
    assert {client.get().status_code for _ in range(5)} == {401}
    assert {client.get(key).status_code for _ in range(5)} == {403}


def test_the_throttle_forgets_addresses_when_full() -> None:
    throttle = FailureThrottle(Rate(1, "minute"), max_addresses=3)
    for i in range(3):
        throttle.failed(f"10.0.0.{i}", START)
    assert throttle.retry_after("10.0.0.0", START) == 60
    throttle.failed("10.0.0.9", START + 61)  # the three earlier budgets are whole again
    assert throttle.retry_after("10.0.0.0", START + 61) == 0
    assert throttle.retry_after("10.0.0.9", START + 61) == 60
    assert len(throttle._tats) == 1


# -- the client address behind proxies -----------------------------------------------------------

PROXIES = Pipeline(trusted_proxies=["10.0.0.0/8", "2001:db8::/32"]).trusted_proxies


@pytest.mark.parametrize(
    ("peer", "forwarded", "address"),
    [
        ("203.0.113.5", ["198.51.100.1"], "203.0.113.5"),  # untrusted peer: header ignored
        ("10.0.0.1", ["198.51.100.1"], "198.51.100.1"),
        ("10.0.0.1", ["6.6.6.6, 198.51.100.1, 10.0.0.2"], "198.51.100.1"),
        ("10.0.0.1", ["6.6.6.6", "198.51.100.1"], "198.51.100.1"),
        ("10.0.0.1", ["10.0.0.3, 10.0.0.2"], "10.0.0.3"),
        ("10.0.0.1", ["garbage, 10.0.0.2"], "10.0.0.2"),
        ("2001:db8::1", ["2001:db8::2, 2a00::1"], "2a00::1"),
        ("10.0.0.1", [], "10.0.0.1"),
        (None, ["198.51.100.1"], None),
    ],
)
def test_client_address_is_the_rightmost_untrusted_hop(
    peer: str | None, forwarded: list[str], address: str | None
) -> None:
    assert client_address(peer, forwarded, PROXIES) == address


def test_a_bad_trusted_proxy_is_a_value_error() -> None:
    with pytest.raises(ValueError, match=r"invalid trusted proxy 'proxy\.local'"):
        Pipeline(trusted_proxies=["proxy.local"])
    with pytest.raises(TypeError, match=r"^give a list of trusted proxy addresses or CIDRs, not"):
        Pipeline(trusted_proxies="10.0.0.1")


def test_a_spoofed_forwarded_for_cannot_escape_the_throttle(kind: str, clock: Clock) -> None:
    manager = APIKeyManager(clock=clock)
    unknown = "sk_" + "0" * 32
    direct = Client(kind, manager, failure_limit="2/minute")  # no trusted proxies
    answers = [
        direct.get(unknown, x_forwarded_for=f"198.51.100.{i}").status_code for i in range(3)
    ]
    assert answers == [401, 401, 429]
    proxied = Client(kind, manager, failure_limit="2/minute", trusted_proxies=["10.0.0.0/8"])
    answers = [
        proxied.get(unknown, **{"x-forwarded-for": f"198.51.100.{i}"}).status_code
        for i in range(3)
    ]
    assert answers == [401, 401, 401], "behind a trusted proxy each client has its own budget"


# -- the pipeline's result --------------------------------------------------------------------


def test_a_limited_key_is_admitted_with_its_headers(manager: APIKeyManager) -> None:
    key = manager.generate_key(user_id="u", rate_limits=["5/minute"])
    outcome = Pipeline().authenticate(manager, [(True, f"Bearer {key}")])
    assert isinstance(outcome, Admission)
    assert dict(outcome.headers)["ratelimit"] == '"5/minute";r=4;t=12'
    assert repr(outcome) == f"Admission({outcome.key.key_id})"


def test_the_limiter_charges_all_buckets_or_none(clock: Clock) -> None:
    manager = APIKeyManager(clock=clock)
    _, info = manager.create_key(user_id="u", rate_limits=["100/second"], quota=2)
    assert isinstance(manager.limiter, Limiter)
    outcomes = [manager.charge(info) for _ in range(3)]
    assert [o.allowed for o in outcomes if o] == [True, True, False]
    # The refused request charged no rate bucket: 98 of 100 left, not 97.
    third = outcomes[2]
    assert third is not None and '"100/second";r=98' in dict(third.headers)["ratelimit"]


# -- the framework helpers ------------------------------------------------------------------------


def test_starlette_backend_limits_keys_and_adds_their_headers(manager: APIKeyManager) -> None:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from keyguard.starlette import APIKeyAuthenticationMiddleware, APIKeyBackend

    async def whoami(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.user.display_name)

    backend = APIKeyBackend(manager, rate_limits=["2/minute"])
    app = Starlette(
        routes=[Route("/whoami", whoami)],
        middleware=[Middleware(APIKeyAuthenticationMiddleware, backend=backend)],
    )
    key = manager.generate_key(user_id="alice")
    with TestClient(app) as client:
        answers = [
            client.get("/whoami", headers={"authorization": f"Bearer {key}"}) for _ in range(3)
        ]
    assert [a.status_code for a in answers] == [200, 200, 429]
    assert answers[0].text == "alice"
    assert answers[0].headers["ratelimit"] == '"2/minute";r=1;t=30'
    assert answers[2].json()["code"] == "rate_limited"
    assert answers[2].headers["retry-after"] == "30"


def test_fastapi_dependency_limits_keys_and_install_adds_their_headers(
    manager: APIKeyManager,
) -> None:
    from fastapi import Depends, FastAPI
    from starlette.testclient import TestClient

    from keyguard.fastapi import install, require_api_key

    app = FastAPI()
    install(app, manager)

    @app.get("/items", dependencies=[Depends(require_api_key(rate_limits=["1/minute"]))])
    async def items() -> dict[str, str]:
        return {"ok": "yes"}

    key = manager.generate_key(user_id="bob", quota=5)
    with TestClient(app) as client:
        first = client.get("/items", headers={"x-api-key": key})
        second = client.get("/items", headers={"x-api-key": key})
    assert first.status_code == 200
    assert first.headers["ratelimit"] == '"1/minute";r=0;t=60, "quota";r=4'
    assert second.status_code == 429
    assert second.json()["code"] == "rate_limited"
    assert second.headers["retry-after"] == "60"
    assert manager.remaining(key) == 4


def test_flask_extension_passes_limits_to_its_middleware(manager: APIKeyManager) -> None:
    from flask import Flask

    from keyguard.flask import KeyGuard, current_key, require_scopes

    app = Flask(__name__)
    KeyGuard(app, manager=manager, rate_limits=["2/hour"], exempt_paths=["/open"])

    @app.get("/me")
    def me() -> str:
        info = current_key()
        return info.user_id if info else "-"

    @app.get("/open")
    @require_scopes()
    def open_route() -> str:
        info = current_key()
        return info.user_id if info else "-"

    key = manager.generate_key(user_id="carol")
    client = app.test_client()
    auth = {"authorization": f"Bearer {key}"}
    first = client.get("/me", headers=auth)
    assert first.status_code == 200 and first.text == "carol"
    assert first.headers["ratelimit"] == '"2/hour";r=1;t=1800'
    # On an exempt path the decorator checks (and charges) the key itself.
    second = client.get("/open", headers=auth)
    assert second.status_code == 200
    assert second.headers["ratelimit"] == '"2/hour";r=0;t=3600'
    third = client.get("/me", headers=auth)
    assert third.status_code == 429
    assert third.json is not None and third.json["code"] == "rate_limited"


# -- usage counts ------------------------------------------------------------------------------


def test_every_request_of_a_known_key_is_counted_by_outcome(
    kind: str, manager: APIKeyManager, clock: Clock
) -> None:
    key, info = manager.create_key(user_id="u", quota=2, permissions=["read"])
    Client(kind, manager, required_scopes=["write"]).get(key)  # insufficient_scope
    client = Client(kind, manager)
    assert [client.get(key).status_code for _ in range(3)] == [200, 200, 429]
    manager.revoke_key(key)
    assert client.get(key).status_code == 401
    assert client.get("sk_" + "0" * 32).status_code == 401  # unknown: no key to count for
    points = manager.usage(info.key_id, step="minute", since=timedelta(minutes=1))
    assert sum(p.requests for p in points) == 2
    refused: dict[str, int] = {}
    for point in points:
        for code, count in point.refused.items():
            refused[code] = refused.get(code, 0) + count
    assert refused == {"insufficient_scope": 1, "quota_exceeded": 1, "revoked_api_key": 1}


def test_usage_recording_can_be_turned_off(clock: Clock) -> None:
    manager = APIKeyManager(clock=clock, record_usage=False)
    key, info = manager.create_key(user_id="u")
    assert manager.usage_recorder is None
    assert Client("wsgi", manager).get(key).status_code == 200
    assert sum(p.requests for p in manager.usage(info.key_id)) == 0


def test_a_limited_key_refused_for_a_scope_gets_its_ratelimit_fields_uncharged(
    kind: str, manager: APIKeyManager
) -> None:
    key = manager.generate_key(user_id="u", rate_limits=["5/minute"], quota=9)
    Client(kind, manager).get(key)
    refused = Client(kind, manager, required_scopes=["admin"]).get(key)
    assert refused.status_code == 403
    assert problem(refused)["code"] == "insufficient_scope"
    assert refused.headers["ratelimit"] == '"5/minute";r=4;t=12, "quota";r=8'
    assert refused.headers["ratelimit-policy"] == '"5/minute";q=5;w=60, "quota";q=9'
    assert manager.remaining(key) == 8, "the refusal used nothing"


def test_a_scope_refusal_stands_when_the_counter_store_fails(kind: str, clock: Clock) -> None:
    class Unreadable(BrokenCounters):
        def peek(self, names: Any) -> list[float]:
            from keyguard import StoreError

            raise StoreError("counter store is unreachable")

    manager = APIKeyManager(clock=clock, counters=Unreadable())
    key = manager.generate_key(user_id="u", rate_limits=["5/minute"])
    refused = Client(kind, manager, required_scopes=["admin"]).get(key)
    assert refused.status_code == 403
    assert "ratelimit" not in refused.headers


# -- review findings: each a regression test -----------------------------------------------------


def test_a_route_refusing_a_middleware_admitted_key_gives_its_charge_back(
    manager: APIKeyManager,
) -> None:
    from flask import Flask

    from keyguard.flask import KeyGuard, require_scopes

    app = Flask(__name__)
    KeyGuard(app, manager=manager)

    @app.get("/admin")
    @require_scopes("admin")
    def admin() -> str:
        return "ok"

    key, info = manager.create_key(user_id="u", quota=3, permissions=["read"])
    client = app.test_client()
    answers = [client.get("/admin", headers={"x-api-key": key}) for _ in range(4)]
    assert [a.status_code for a in answers] == [403] * 4
    # Each refusal carries the key's RateLimit fields, read after its charge came back.
    assert {a.headers["ratelimit"] for a in answers} == {'"quota";r=3'}
    assert {a.headers["ratelimit-policy"] for a in answers} == {'"quota";q=3'}
    assert manager.remaining(key) == 3
    (point,) = manager.usage(info.key_id, step="day", since=timedelta(days=1))
    assert (point.requests, point.refused) == (0, {"insufficient_scope": 4})


def test_fastapi_and_starlette_routes_behind_the_middleware_refund_too(
    manager: APIKeyManager,
) -> None:
    from fastapi import Depends, FastAPI
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from keyguard.fastapi import install, require_api_key
    from keyguard.starlette import require_scopes

    key = manager.generate_key(user_id="u", quota=2, permissions=["read"])
    api = FastAPI(middleware=[Middleware(ASGIMiddleware, manager=manager)])
    install(api, manager)

    @api.get("/admin", dependencies=[Depends(require_api_key(scopes=["admin"]))])
    async def admin() -> str:
        return "ok"

    @require_scopes("admin")
    async def admin_page(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    @require_scopes("admin")
    def admin_sync(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    site = Starlette(
        routes=[Route("/admin", admin_page), Route("/admin-sync", admin_sync)],
        middleware=[Middleware(ASGIMiddleware, manager=manager)],
    )
    headers = {"authorization": f"Bearer {key}"}
    with TestClient(api) as a, TestClient(site) as b:
        answers = [a.get("/admin", headers=headers) for _ in range(3)]
        answers += [b.get("/admin", headers=headers) for _ in range(3)]
        answers += [b.get("/admin-sync", headers=headers) for _ in range(3)]
    assert [a.status_code for a in answers] == [403] * 9
    assert {a.headers.get("ratelimit") for a in answers} == {'"quota";r=2'}
    assert manager.remaining(key) == 2


def test_a_refund_the_counter_store_fails_still_counts_the_request_as_refused(
    clock: Clock,
) -> None:
    store = MemoryStore()
    manager = APIKeyManager(store, clock=clock)
    key, info = manager.create_key(user_id="u", rate_limits=["10/minute"])
    environ: dict[str, Any] = {}
    outcome = Pipeline().authenticate(manager, [(False, key)])
    assert not isinstance(outcome, Problem) and outcome is not None
    admitted(environ, manager, outcome)

    def down(*args: object) -> float:
        raise StoreError("the counter store is down")

    store.adjust = down  # type: ignore[method-assign, assignment]
    refund(environ, "insufficient_scope")

    assert manager.usage_recorder is not None and manager.usage_recorder.flush()
    (point,) = manager.usage(info.key_id, step="day", since=timedelta(days=1))
    assert (point.requests, point.refused) == (0, {"insufficient_scope": 1})


def test_fastapi_dependency_limits_are_reread_when_a_later_dependency_refuses(
    manager: APIKeyManager,
) -> None:
    from fastapi import Depends, FastAPI
    from fastapi.testclient import TestClient

    from keyguard.fastapi import install, require_api_key

    app = FastAPI()
    install(app, manager)
    limited = require_api_key(rate_limits=["5/minute"])

    @app.get("/admin", dependencies=[Depends(limited), Depends(require_api_key(["admin"]))])
    def admin() -> str:
        return "ok"

    key = manager.generate_key(user_id="u", permissions=["read"])
    refused = TestClient(app).get("/admin", headers={"x-api-key": key})
    assert refused.status_code == 403
    # The default limit the first dependency charged under, read again after the refund.
    assert refused.headers["ratelimit-policy"] == '"5/minute";q=5;w=60'
    assert refused.headers["ratelimit"].startswith('"5/minute";r=5;')


def test_a_route_refusal_takes_the_middlewares_default_limits_and_survives_a_failing_store(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    from flask import Flask

    from keyguard.flask import KeyGuard, require_scopes

    manager = APIKeyManager(clock=clock)
    app = Flask(__name__)
    KeyGuard(app, manager=manager, rate_limits=["5/minute"])

    @app.get("/admin")
    @require_scopes("admin")
    def admin() -> str:
        return "ok"

    key = manager.generate_key(user_id="u", permissions=["read"])
    client = app.test_client()
    refused = client.get("/admin", headers={"x-api-key": key})
    assert refused.status_code == 403
    assert refused.headers["ratelimit"] == '"5/minute";r=5;t=0'

    def fail(*args: object) -> None:
        raise StoreError("the counter store is down")

    manager.refund = fail  # type: ignore[method-assign, assignment]
    refused = client.get("/admin", headers={"x-api-key": key})
    assert refused.status_code == 403, "a refund that fails leaves the refusal standing"
    assert "ratelimit" not in refused.headers
    assert "the counter store is down" in caplog.text


@pytest.mark.parametrize("text", ["1001/second", "60001/minute", "86400001/day"])
def test_rates_finer_than_a_millisecond_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="at most 1000 requests per second"):
        parse_rates([text])
    assert parse_rates(["1000/second", "86400000/day"])[1].interval == pytest.approx(0.001)


def test_a_fast_rate_is_enforced_exactly_despite_float_time(manager: APIKeyManager) -> None:
    _, info = manager.create_key(user_id="u", rate_limits=["1000/second"])
    limiter = manager.limiter
    assert limiter is not None
    now = 1_764_780_000.123456
    admitted = sum(limiter.take(info, now).allowed for _ in range(1500))
    assert admitted == 1000


def test_ipv6_addresses_share_their_64s_failure_budget() -> None:
    throttle = FailureThrottle(Rate(2, "minute"))
    throttle.failed("2001:db8:1:2::1", START)
    throttle.failed("2001:db8:1:2:ffff::9", START)
    assert throttle.retry_after("2001:db8:1:2::abcd", START) == 30
    assert throttle.retry_after("2001:db8:1:3::1", START) == 0
    throttle.failed("::ffff:203.0.113.7", START)
    throttle.failed("203.0.113.7", START)
    assert throttle.retry_after("203.0.113.7", START) == 30


def test_a_flood_of_new_addresses_never_frees_a_throttled_one() -> None:
    throttle = FailureThrottle(Rate(1, "minute"), max_addresses=100)
    throttle.failed("203.0.113.7", START)
    for i in range(1000):
        throttle.failed(f"198.51.{i // 256}.{i % 256}", START + 1)
    assert throttle.retry_after("203.0.113.7", START + 1) == 59
    assert len(throttle._tats) <= 100


def test_every_route_of_a_manager_shares_one_failure_budget(manager: APIKeyManager) -> None:
    from fastapi import Depends, FastAPI
    from starlette.testclient import TestClient

    from keyguard.fastapi import install, require_api_key

    app = FastAPI()
    install(app, manager)

    @app.get("/a", dependencies=[Depends(require_api_key(failure_limit="3/minute"))])
    async def a() -> str:
        return "a"

    @app.get("/b", dependencies=[Depends(require_api_key(failure_limit="3/minute"))])
    async def b() -> str:
        return "b"

    bad = {"x-api-key": "sk_" + "0" * 32}
    with TestClient(app) as client:
        statuses = [client.get(path, headers=bad).status_code for path in ["/a", "/b"] * 3]
    assert statuses == [401, 401, 401, 429, 429, 429]


class KeysOnly:
    """A third-party KeyStore that keeps no counters."""

    def __init__(self) -> None:
        self.keys = MemoryStore()

    def __getattr__(self, name: str) -> Any:
        if name in {"add", "get", "get_by_id", "list_keys", "revoke", "set_expiry", "touch"}:
            return getattr(self.keys, name)
        if name == "close":
            return self.keys.close
        raise AttributeError(name)


@pytest.mark.parametrize("cached", [False, True], ids=["bare", "cached"])
def test_a_limited_key_on_a_store_without_counters_is_503_not_500_or_unlimited(
    cached: bool, clock: Clock
) -> None:
    from keyguard import CachedStore, KeyStore

    class Plain(KeysOnly, KeyStore):
        def add(self, info: Any) -> bool:
            return self.keys.add(info)

        def get(self, digest: str) -> Any:
            return self.keys.get(digest)

        def get_by_id(self, key_id: str) -> Any:
            return self.keys.get_by_id(key_id)

        def list_keys(self, user_id: Any = None, *, limit: Any = None, after: Any = None) -> Any:
            return self.keys.list_keys(user_id, limit=limit, after=after)

        def revoke(self, digest: str, at: Any) -> bool:
            return self.keys.revoke(digest, at)

        def set_expiry(self, digest: str, expires_at: Any) -> bool:
            return self.keys.set_expiry(digest, expires_at)

        def update(self, info: Any, expected: Any) -> bool:
            return self.keys.update(info, expected)

        def touch(self, digest: str, at: Any) -> None:
            self.keys.touch(digest, at)

        def close(self) -> None:
            self.keys.close()

    store: Any = CachedStore(Plain()) if cached else Plain()
    manager = APIKeyManager(store, clock=clock, record_usage=False)
    assert manager.limiter is None
    plain = manager.generate_key(user_id="plain")
    limited = manager.generate_key(user_id="limited", quota=5)
    client = Client("wsgi", manager)
    assert client.get(plain).status_code == 200
    refused = client.get(limited)
    assert refused.status_code == 503
    assert problem(refused)["code"] == "store_unavailable"


def test_the_usage_queue_stays_bounded_while_a_flush_is_stuck(clock: Clock) -> None:
    import threading

    from keyguard.usage import UsageRecorder

    release = threading.Event()

    class Stuck(MemoryStore):
        def add_usage(self, rows: Any) -> None:
            release.wait(10)
            super().add_usage(rows)

    recorder = UsageRecorder(Stuck(), clock=clock, max_pending=10)
    recorder.record("key_0000000000000000")
    flushing = threading.Thread(target=recorder.flush)
    flushing.start()
    for i in range(50_000):
        recorder.record(f"key_{i % 5:016x}")
    assert len(recorder._queue) < 10_000
    release.set()
    flushing.join()
    recorder.close()
    assert recorder.dropped == 0
