"""The request pipeline every transport shares, and the refusal catalogue it answers with."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timezone
from http import HTTPStatus
from typing import Any

import pytest

from keyguard import APIKeyManager, InvalidKeyError, KeyInfo, Reason, mask_key
from keyguard._middleware import has_dot_segment
from keyguard.identity import AnonymousUser, APIKeyUser
from keyguard.pipeline import Pipeline
from keyguard.problems import Problem
from keyguard.records import UNREAD
from tests.helpers import AsyncStore, BrokenStore


def make_pipeline(**options: Any) -> Pipeline:
    settings: dict[str, Any] = {
        "required_scopes": ("read", "write"),
        "header_names": ("authorization", "x-api-key"),
    }
    settings.update(options)
    return Pipeline(**settings)


PROBLEMS = list(make_pipeline().problems)


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: f"{p.status} {p.detail[:30]}")
def test_every_problem_is_rfc9457_with_a_matching_challenge(problem: Problem) -> None:
    body = json.loads(problem.body)
    assert body == {
        "type": "about:blank",
        "title": HTTPStatus(problem.status).phrase,
        "status": problem.status,
        "detail": problem.detail,
        "code": problem.code,
    }
    headers = dict(problem.headers)
    assert headers["content-type"] == "application/problem+json"
    assert headers["content-length"] == str(len(problem.body))
    assert dict(problem.raw_headers) == {n.encode(): v.encode() for n, v in headers.items()}
    assert problem.status_line == f"{problem.status} {HTTPStatus(problem.status).phrase}"
    error = {400: "invalid_request", 401: "invalid_token", 403: "insufficient_scope"}
    if problem.status == 503:
        assert "www-authenticate" not in headers
        assert problem.close_code == 1013
    elif problem.code == "ip_not_allowed":
        assert "www-authenticate" not in headers  # RFC 6750 has no error for an address
        assert problem.close_code == 1008
    elif problem.code == "missing_api_key":
        assert headers["www-authenticate"] == 'Bearer realm="api"'
    else:
        assert headers["www-authenticate"].startswith(
            f'Bearer realm="api", error="{error[problem.status]}"'
        )
        assert problem.close_code == 1008


def test_catalogue_codes_are_the_documented_ones() -> None:
    assert {p.code for p in PROBLEMS} == {
        "missing_api_key",
        "invalid_api_key",
        "revoked_api_key",
        "expired_api_key",
        "insufficient_scope",
        "ip_not_allowed",
        "invalid_request",
        "store_unavailable",
    }


def test_insufficient_scope_names_the_scopes() -> None:
    problem = make_pipeline().problems.insufficient_scope
    assert problem.www_authenticate == (
        'Bearer realm="api", error="insufficient_scope", scope="read write"'
    )
    assert "read, write" in problem.detail


def test_problem_response_is_a_fresh_copy() -> None:
    problem = make_pipeline().problems.missing
    problem.response.headers.append(("x", "y"))
    assert ("x", "y") not in problem.response.headers


@pytest.mark.parametrize(
    ("values", "query", "expected"),
    [
        pytest.param([(True, "Bearer abc")], [], "abc", id="bearer"),
        pytest.param([(True, " bearer  abc \t")], [], "abc", id="padding"),
        pytest.param([(False, "abc")], [], "abc", id="raw"),
        pytest.param([], [], None, id="nothing"),
        pytest.param([(True, "Digest x=1")], [], None, id="other scheme"),
        pytest.param([(True, "Bearer abc"), (False, "abc")], ["abc"], "abc", id="same thrice"),
        pytest.param([(False, "abc,, abc")], [], "abc", id="empty list members"),
        pytest.param([], ["abc"], "abc", id="query only"),
        pytest.param([(False, "abc")], ["abd"], "conflicting", id="query differs"),
        pytest.param([], ["a,b"], "bad_value", id="comma in query value"),
        pytest.param([], ["a b"], "bad_value", id="space in query value"),
        pytest.param([], ["é"], "bad_characters", id="non-ASCII query value"),
        pytest.param([], ["k" * 8193], "too_large", id="huge query value"),
        pytest.param([(False, "k" * 8192)], [], "k" * 8192, id="largest header"),
        pytest.param([(False, "k" * 8193)], [], "too_large", id="header one byte too large"),
        pytest.param([(True, "Bearer ,")], [], "bad_authorization", id="bearer comma"),
        pytest.param([(True, "Bearer abc,")], [], "abc", id="bearer, trailing comma"),
        pytest.param([(True, "Bearer abc, abd")], [], "bad_authorization", id="bare second"),
        pytest.param(
            [(True, "Digest a=1, b=2, Bearer abc")],
            [],
            "bad_authorization",
            id="bearer beside another scheme's parameters (ambiguous, refused)",
        ),
        pytest.param([(True, "Basic YTpi, abc")], [], None, id="no bearer, bare part ignored"),
        pytest.param([(False, " \t ")], [], "empty", id="blank"),
    ],
)
def test_read(values: list[tuple[bool, str]], query: list[str], expected: str | None) -> None:
    pipeline = make_pipeline()
    result = pipeline.read(values, query)
    if isinstance(result, Problem):
        assert result is getattr(pipeline.problems, expected or "")
    else:
        assert result == expected


@pytest.mark.parametrize(
    ("query", "values", "rest"),
    [
        pytest.param("api_key=k", ["k"], "", id="alone"),
        pytest.param("a=1&api_key=k&b=2", ["k"], "a=1&b=2", id="in the middle"),
        pytest.param("api_key", [""], "", id="no equals sign"),
        pytest.param("api%5fkey=k%2B", ["k+"], "", id="percent-encoded"),
        pytest.param("api+key=k", [], "api+key=k", id="other name"),
        pytest.param("x=api_key%3Dk", [], "x=api_key%3Dk", id="inside a value"),
        pytest.param("api_key=a&api_key=b", ["a", "b"], "", id="repeated"),
    ],
)
def test_split_query(query: str, values: list[str], rest: str) -> None:
    with pytest.warns(UserWarning):
        pipeline = make_pipeline(query_param="api_key")
    assert pipeline.split_query(query) == (values, rest)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("/a/b", False, id="plain"),
        pytest.param("/.well-known/x", False, id="dot-file"),
        pytest.param("/a/..", True, id="trailing dot-dot"),
        pytest.param("/a/./b", True, id="dot"),
        pytest.param("/../a", True, id="leading dot-dot"),
        pytest.param("/a/...", False, id="three dots"),
        pytest.param("/a/..;/b", True, id="dot-dot with a path parameter"),
        pytest.param("/a/.;x/b", True, id="dot with a path parameter"),
        pytest.param("/a/b;..", False, id="a parameter that looks like dots"),
        pytest.param("/a\\b", True, id="backslash"),
    ],
)
def test_has_dot_segment(path: str, expected: bool) -> None:
    assert has_dot_segment(path) is expected


def test_identity_reprs_never_show_the_key() -> None:
    manager = APIKeyManager()
    key, info = manager.create_key(user_id="alice", permissions=["read"])
    user = APIKeyUser(info)
    assert key not in repr(user)
    assert repr(user) == f"APIKeyUser(user_id='alice', key='{info.hint}')"
    assert user == APIKeyUser(info)
    assert len({user, APIKeyUser(info)}) == 1
    anonymous = AnonymousUser()
    assert (anonymous.identity, anonymous.key, anonymous.scopes) == (None, None, ())
    assert repr(anonymous) == "AnonymousUser()"


class RevokingManager(APIKeyManager):
    """A subclass whose check refuses every key: everything must ask it, not go around it."""

    def check(self, key: object) -> KeyInfo:
        info = super().check(key)
        raise InvalidKeyError("revoked by the subclass", Reason.REVOKED, info)


def test_authenticate_admits_a_valid_key_with_every_required_scope() -> None:
    manager = APIKeyManager()
    key, info = manager.create_key(user_id="u", permissions=["read", "write"])

    assert make_pipeline().authenticate(manager, [(False, key)]) == info


@pytest.mark.parametrize(
    ("header", "code"),
    [
        pytest.param("<read>", "insufficient_scope", id="scope step refuses"),
        pytest.param("<revoked>", "revoked_api_key", id="revoked before the scope step"),
        pytest.param("sk_" + "0" * 32, "invalid_api_key", id="unknown key"),
        pytest.param("SK_<read>", "invalid_api_key", id="malformed key"),
        pytest.param("<read> <read>", "invalid_request", id="unreadable credential"),
    ],
)
def test_authenticate_refuses_in_pipeline_order(header: str, code: str) -> None:
    manager = APIKeyManager()
    read = manager.generate_key(user_id="u", permissions=["read"])
    revoked = manager.generate_key(user_id="u", permissions=["read"])
    manager.revoke_key(revoked)
    value = header.replace("<read>", read).replace("<revoked>", revoked)

    problem = make_pipeline().authenticate(manager, [(False, value)])

    assert isinstance(problem, Problem)
    assert problem.code == code


def test_authenticate_without_a_credential_is_none() -> None:
    assert make_pipeline().authenticate(APIKeyManager(), []) is None


def test_an_overridden_check_decides() -> None:
    manager = RevokingManager()
    key = manager.generate_key(user_id="u", permissions=["read", "write"])

    pipeline = make_pipeline()
    problem = pipeline.authenticate(manager, [(True, f"Bearer {key}")])
    aproblem = asyncio.run(pipeline.aauthenticate(manager, [(False, key)]))

    assert isinstance(problem, Problem) and problem.code == "revoked_api_key"
    assert aproblem is problem
    assert manager.validate_key(key) is False
    assert manager.verify(key).reason is Reason.REVOKED


def test_an_overridden_check_decides_over_a_store_with_an_async_twin() -> None:
    # acheck would await the store's aget; a subclass's check must still decide.
    manager = RevokingManager(AsyncStore())
    key = manager.generate_key(user_id="u", permissions=["read"])

    problem = asyncio.run(make_pipeline().aauthenticate(manager, [(False, key)]))

    assert isinstance(problem, Problem) and problem.code == "revoked_api_key"
    assert asyncio.run(manager.averify(key)).reason is Reason.REVOKED


class Refusing:
    """A mixin, not a manager: its check comes before APIKeyManager's in the MRO."""

    def check(self, key: object) -> KeyInfo:
        raise InvalidKeyError("refused by the mixin", Reason.REVOKED)


class RefusingManager(Refusing, APIKeyManager):
    pass


def test_a_mixin_overriding_check_decides_async_checks_too() -> None:
    manager = RefusingManager(AsyncStore())
    key = manager.generate_key(user_id="u")

    problem = asyncio.run(make_pipeline().aauthenticate(manager, [(False, key)]))

    assert isinstance(problem, Problem) and problem.code == "revoked_api_key"


class RevokingBothWays(RevokingManager):
    """A subclass that also overrides acheck: the async path is its own again."""

    async def acheck(self, key: object) -> KeyInfo:
        return await APIKeyManager.acheck(self, key)


def test_a_subclass_overriding_acheck_too_keeps_the_async_store() -> None:
    store = AsyncStore()
    manager = RevokingBothWays(store)
    key = manager.generate_key(user_id="u")

    assert asyncio.run(manager.averify(key)).ok
    assert store.async_reads == 1


def test_a_failing_store_is_a_503(caplog: pytest.LogCaptureFixture) -> None:
    manager = APIKeyManager(BrokenStore("the store is down"))
    key = manager.format.generate()

    problem = make_pipeline().authenticate(manager, [(False, key)])

    assert isinstance(problem, Problem)
    assert (problem.status, problem.code) == (503, "store_unavailable")
    assert "the store is down" in caplog.text
    assert key not in caplog.text


def test_damaged_stored_metadata_is_a_503(caplog: pytest.LogCaptureFixture) -> None:
    # A store parses a record's metadata when it is first read, which is in the pipeline.
    manager = APIKeyManager()
    key = manager.format.generate()
    manager.store.add(
        KeyInfo(
            key_id="key_damaged",
            prefix="sk_",
            hint=mask_key(key),
            user_id="u",
            metadata=UNREAD,
            metadata_json='{"user_id": "u", "permissions": [',
            created_at=datetime.now(timezone.utc),
            digest=manager.digest(key),
        )
    )
    pipeline = make_pipeline(required_scopes=())

    problem = pipeline.authenticate(manager, [(False, key)])
    aproblem = asyncio.run(pipeline.aauthenticate(manager, [(False, key)]))

    for outcome in (problem, aproblem):
        assert isinstance(outcome, Problem)
        assert (outcome.status, outcome.code) == (503, "store_unavailable")
    assert "the stored metadata of key 'key_damaged' is damaged" in caplog.text
    assert key not in caplog.text


def test_admit_runs_only_the_per_key_steps() -> None:
    manager = APIKeyManager()
    _, reader = manager.create_key(user_id="u", permissions=["read"])
    _, writer = manager.create_key(user_id="u", permissions=["read", "write"])
    pipeline = make_pipeline()

    assert pipeline.admit(writer) is writer
    assert pipeline.admit(reader) is pipeline.problems.insufficient_scope
    assert Pipeline().steps == ()


TRICKY_VALUES = [
    "abc",
    " \tabc \t",
    "Bearer abc",
    "bearer   abc ",
    "BEARER abc",
    "Bearer\tabc",
    "Bearer  ",
    "Bearer a b",
    "Basic abc",
    "Bearerabc",
    "a,b",
    "abc,",
    "Bearer abc,",
    "a b",
    "é",
    "a\x00b",
    "",
    " ",
    '"quoted"',
    "k" * 8192,
    "k" * 8193,
    " " + "k" * 8192,
    "Bearer " + "k" * 8185,
    "Bearer " + "k" * 8186,
    "Bearer ,abc",
    "Bearer abc,def",
    "Bearer  abc",
    "Bearer abc ",
    " Bearer abc",
    "Bearer Bearer abc",
    "Bearer é",
]


@pytest.mark.parametrize("bearer", [True, False], ids=["bearer header", "raw header"])
@pytest.mark.parametrize("value", TRICKY_VALUES, ids=repr)
def test_a_repeated_value_reads_as_the_value_alone(bearer: bool, value: str) -> None:
    # A server or proxy may repeat a credential header: the same key twice is one key.
    pipeline = make_pipeline()
    assert pipeline.read([(bearer, value)]) == pipeline.read([(bearer, value), (bearer, value)])


def test_auth_schemes_choose_which_authorization_values_carry_a_key() -> None:
    from keyguard.pipeline import Pipeline

    default = Pipeline()
    both = Pipeline(auth_schemes=["Bearer", "Api-Key"])
    assert default.read([(True, "Api-Key sk_x")]) is None  # another scheme: not ours
    assert both.read([(True, "Api-Key sk_x")]) == "sk_x"
    assert both.read([(True, "bearer sk_x")]) == "sk_x"
    assert both.carries_key(True, "API-KEY sk_x") and not default.carries_key(True, "Api-Key x")
    for bad, error in [("Bearer", TypeError), ([], ValueError), (["Api Key"], ValueError)]:
        with pytest.raises(error):
            Pipeline(auth_schemes=bad)
