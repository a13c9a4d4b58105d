"""tokenproxy's own answers (proxy/rules/problem.py): RFC 9457 problem+json, one renderer for
both request paths and the admin listener; docs/errors.md lists every cause."""

from __future__ import annotations

import json

import pytest

from tokenproxy.errors import (
    RequestRejected,
    SharedStateDown,
    TokenUnavailable,
    Unauthenticated,
    UpstreamError,
)
from tokenproxy.proxy.rules.problem import TITLES, Problem


def test_the_body_is_problem_json() -> None:
    problem = Problem(403, "forbidden_host", "the Host header names no allowed host")
    assert {"type": "urn:tokenproxy:problem:forbidden_host", "title": "Host not allowed",
            "status": 403, "detail": "the Host header names no allowed host"} == json.loads(
        problem.body())


def test_an_unknown_cause_is_its_own_title() -> None:
    assert "some_cause" == json.loads(Problem(500, "some_cause", "x").body())["title"]


def test_the_fields_besides_framing() -> None:
    assert [(b"Tokenproxy-Error", b"client_key"), (b"Cache-Control", b"no-store"),
            (b"Content-Type", b"application/problem+json")] == Problem(
        403, "client_key", "x").headers()


@pytest.mark.parametrize(("retry_after", "value"), [
    (0.0, b"1"), (0.2, b"1"), (1.0, b"1"), (1.5, b"2"), (30.0, b"30"),
])
def test_retry_after_is_whole_seconds_rounded_up_and_at_least_one(retry_after: float,
                                                                  value: bytes) -> None:
    headers = Problem(503, "token_unavailable", "x", retry_after).headers()
    assert (b"Retry-After", value) == headers[-1]
    assert 4 == len(headers)


@pytest.mark.parametrize(("status", "closes"), [
    (400, True), (408, True), (431, True), (403, False), (404, False), (412, False),
    (502, False), (503, False), (504, False),
])
def test_framing_and_size_errors_close_the_connection(status: int, closes: bool) -> None:
    assert closes is Problem(status, "x", "x").closes


def test_problems_of_the_errors_raised_while_handling_a_request() -> None:
    assert Problem(400, "bad_request", "no") == Problem.of(
        RequestRejected(400, "bad_request", "no"))
    assert Problem(504, "upstream_timeout", "the upstream did not answer in time") == (
        Problem.of(UpstreamError("timeout")))
    assert Problem(502, "upstream_unreachable", "down") == Problem.of(
        UpstreamError("connect", "down"))
    assert Problem(503, "token_unavailable", "wait", 2.5) == Problem.of(
        TokenUnavailable("api", "wait", 2.5))
    assert Problem(503, "shared_state_unavailable", "redis down", 1.0) == Problem.of(
        SharedStateDown("api", "redis down", 1.0))
    assert Problem(502, "unauthenticated", "rejected", None) == Problem.of(
        Unauthenticated("api", "rejected"))


def test_every_cause_has_a_title() -> None:
    """The causes tokenproxy answers with, each with a title (docs/errors.md documents them;
    tests/test_docs.py checks that)."""
    assert {"bad_request", "forbidden_host", "cross_site", "forwarded", "client_key",
            "require_header", "not_found", "forward_refused", "proxy_auth",
            "header_too_large", "request_timeout",
            "expectation_failed", "upstream_unreachable", "upstream_timeout",
            "token_unavailable", "shared_state_unavailable", "unauthenticated",
            "provider_misconfigured", "login_required", "internal"} == set(TITLES)
    assert all(title and title[0].isupper() for title in TITLES.values())
