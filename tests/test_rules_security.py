"""Who may use the proxy (proxy/rules/security.py), as pure functions on header byte pairs:
the Host allowlist, relayed and cross-site requests, the client key, a required header, and
the head size. The same checks on a live daemon are in tests/test_security.py."""

from __future__ import annotations

from typing import Any

import pytest

from tests.helpers.config import proxy_config
from tests.helpers.fakes import CLIENT_KEY, TOKEN
from tokenproxy.config import build_config
from tokenproxy.errors import RequestRejected
from tokenproxy.proxy.rules.headers import Header
from tokenproxy.proxy.rules.security import SecurityPolicy, check_host, host_name, values

HOST: list[Header] = [(b"Host", b"localhost:8080")]
LOOPBACK = frozenset({"localhost", "127.0.0.1", "::1"})


def policy(**security: Any) -> SecurityPolicy:
    raw = proxy_config("http://upstream.test/", TOKEN, limits={"max_header_size": "1KiB"})
    if security:
        raw["security"] = security
    cfg = build_config(raw, {})
    return SecurityPolicy(cfg.security, cfg.limits)


def refusal(check: SecurityPolicy, headers: list[Header], line: int = 20) -> tuple[int, str]:
    """(status, cause) of the refusal; the test fails if the request passes."""
    with pytest.raises(RequestRejected) as info:
        check.check(headers, line)
    return info.value.status, info.value.cause


@pytest.mark.parametrize(("value", "name"), [
    ("localhost", "localhost"), (" LocalHost:8080 ", "localhost"), ("127.0.0.1:1", "127.0.0.1"),
    ("[::1]:80", "::1"), ("[::1]", "::1"), ("::1", "::1"),
    ("[::1].evil.example", "[::1].evil.example"),   # only ":port" may follow the brackets
    ("[::1]:x", "[::1]:x"), ("example.com:abc", "example.com:abc"),
])
def test_host_name_is_the_host_part_lower_cased(value: str, name: str) -> None:
    assert name == host_name(value)


def test_values_of_a_field_by_lower_cased_name() -> None:
    assert [b"1", b"3"] == values([(b"X-A", b"1"), (b"X-B", b"2"), (b"x-a", b"3")], b"x-a")


@pytest.mark.parametrize("headers", [
    [(b"Host", b"localhost")], [(b"host", b"127.0.0.1:9")], [(b"Host", b"[::1]:80")],
])
def test_check_host_passes_exactly_one_allowed_host(headers: list[Header]) -> None:
    check_host(headers, LOOPBACK)


@pytest.mark.parametrize("headers", [
    [], [(b"Host", b"evil.example")], [(b"Host", b"localhost"), (b"Host", b"localhost")],
    [(b"Host", b"localhost.")], [(b"Host", b"")],
], ids=["none", "foreign", "two", "trailing-dot", "empty"])
def test_check_host_refuses_anything_else_with_403(headers: list[Header]) -> None:
    with pytest.raises(RequestRejected) as info:
        check_host(headers, LOOPBACK)
    assert (403, "forbidden_host") == (info.value.status, info.value.cause)


def test_no_allowlist_allows_any_host() -> None:
    check_host([(b"Host", b"evil.example"), (b"Host", b"other.example")], None)


def test_a_plain_request_passes_the_default_policy() -> None:
    policy().check([*HOST, (b"Accept", b"*/*"), (b"Sec-Fetch-Site", b"none")], 20)


@pytest.mark.parametrize(("name", "shown"), [
    (b"Forwarded", "Forwarded"), (b"X-Forwarded-For", "X-Forwarded-For"), (b"via", "Via"),
])
def test_relayed_requests_are_refused(name: bytes, shown: str) -> None:
    with pytest.raises(RequestRejected) as info:
        policy().check([*HOST, (name, b"1.2.3.4")], 20)
    assert (403, "forwarded") == (info.value.status, info.value.cause)
    assert f"requests relayed with {shown} are refused" == info.value.detail


def test_relayed_requests_pass_when_allowed() -> None:
    policy(reject_forwarded=False).check([*HOST, (b"X-Forwarded-For", b"1.2.3.4")], 20)


@pytest.mark.parametrize("extra", [
    [(b"Origin", b"null")],
    [(b"Sec-Fetch-Site", b"cross-site")],
    [(b"Sec-Fetch-Site", b"none"), (b"Sec-Fetch-Site", b"same-site")],
    [(b"Sec-Fetch-Site", b"same-origin"), (b"Sec-Fetch-Site", b"none")],
    [(b"Sec-Fetch-Site", b"")],
], ids=["origin", "cross-site", "second-value", "first-value", "empty"])
def test_cross_site_browser_requests_are_refused(extra: list[Header]) -> None:
    assert (403, "cross_site") == refusal(policy(), [*HOST, *extra])


def test_cross_site_requests_pass_when_allowed() -> None:
    policy(reject_cross_site=False).check([*HOST, (b"Origin", b"https://evil.example")], 20)


def test_the_client_key_must_be_sent_exactly_once() -> None:
    check = policy(client_key=CLIENT_KEY)
    key = (b"Tokenproxy-Key", CLIENT_KEY.encode())
    check.check([*HOST, key], 20)
    assert (403, "client_key") == refusal(check, HOST)
    assert (403, "client_key") == refusal(check, [*HOST, key, key])
    assert (403, "client_key") == refusal(check, [*HOST, (b"Tokenproxy-Key", b"wrong" * 8)])


def test_a_required_header_must_carry_its_value() -> None:
    check = policy(require_header="Tokenproxy-Request: 1")
    check.check([*HOST, (b"tokenproxy-request", b" 1 ")], 20)
    assert (412, "require_header") == refusal(check, HOST)
    assert (412, "require_header") == refusal(check, [*HOST, (b"Tokenproxy-Request", b"2")])
    with pytest.raises(RequestRejected, match=r"^the header Tokenproxy-Request is required$"):
        check.check([*HOST, (b"Tokenproxy-Request", b"1"), (b"Tokenproxy-Request", b"1")], 20)


def test_fields_meant_for_the_proxy_alone() -> None:
    assert frozenset({b"tokenproxy-key"}) == policy().local_headers
    assert frozenset({b"tokenproxy-key", b"tokenproxy-request"}) == policy(
        require_header="Tokenproxy-Request: 1").local_headers


def test_the_head_size_counts_the_request_line_and_every_field() -> None:
    """max_header_size (1 KiB here) bounds the request line plus each field's name, value,
    ": " and CRLF: exactly at the limit passes, one byte more is 431."""
    check = policy()
    used = 20 + sum(len(name) + len(value) + 4 for name, value in HOST) + len(b"X-Pad") + 4
    field = (b"X-Pad", b"p" * (1024 - used))
    check.check([*HOST, field], 20)
    assert (431, "header_too_large") == refusal(check, [*HOST, field], 21)


def test_the_first_broken_rule_answers() -> None:
    """Head size before Host, Host before relayed, relayed before cross-site, cross-site
    before the key, the key before a required header."""
    check = policy(client_key=CLIENT_KEY, require_header="X-Req: 1")
    big = (b"X-Pad", b"p" * 2000)
    fwd = (b"Via", b"1.1 relay")
    origin = (b"Origin", b"null")
    key = (b"Tokenproxy-Key", b"wrong" * 8)
    foreign = [(b"Host", b"evil.example")]
    assert (431, "header_too_large") == refusal(check, [*foreign, fwd, origin, key, big])
    assert (403, "forbidden_host") == refusal(check, [*foreign, fwd, origin, key])
    assert (403, "forwarded") == refusal(check, [*HOST, fwd, origin, key])
    assert (403, "cross_site") == refusal(check, [*HOST, origin, key])
    assert (403, "client_key") == refusal(check, [*HOST, key])
    assert (412, "require_header") == refusal(
        check, [*HOST, (b"Tokenproxy-Key", CLIENT_KEY.encode())])
