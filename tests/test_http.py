"""The shared HTTP layer: the refusal catalogue, credential reading, query and path helpers."""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

import pytest

from keyguard import APIKeyManager
from keyguard._http import Guard, Problem, has_dot_segment
from keyguard.identity import AnonymousUser, APIKeyUser


def make_guard(**options: Any) -> Guard:
    settings: dict[str, Any] = {
        "exempt_paths": (),
        "exempt_patterns": (),
        "optional": False,
        "required_scopes": ("read", "write"),
        "header_names": ("authorization", "x-api-key"),
        "query_param": None,
        "strip_credentials": False,
        "realm": "api",
        "error_responder": None,
        "allow_cors_preflight": False,
    }
    settings.update(options)
    return Guard(APIKeyManager(), **settings)


PROBLEMS = list(make_guard().problems)


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
        "invalid_request",
        "store_unavailable",
    }


def test_insufficient_scope_names_the_scopes() -> None:
    problem = make_guard().problems.insufficient_scope
    assert problem.www_authenticate == (
        'Bearer realm="api", error="insufficient_scope", scope="read write"'
    )
    assert "read, write" in problem.detail


def test_problem_response_is_a_fresh_copy() -> None:
    problem = make_guard().problems.missing
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
def test_extract(values: list[tuple[bool, str]], query: list[str], expected: str | None) -> None:
    guard = make_guard()
    result = guard.extract(values, query)
    if isinstance(result, Problem):
        assert result is getattr(guard.problems, expected or "")
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
        guard = make_guard(query_param="api_key")
    assert guard.split_query(query) == (values, rest)


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        pytest.param("/a/b", False, id="plain"),
        pytest.param("/.well-known/x", False, id="dot-file"),
        pytest.param("/a/..", True, id="trailing dot-dot"),
        pytest.param("/a/./b", True, id="dot"),
        pytest.param("/../a", True, id="leading dot-dot"),
        pytest.param("/a/...", False, id="three dots"),
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
