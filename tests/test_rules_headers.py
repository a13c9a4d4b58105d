"""The header rules (proxy/rules/headers.py): what travels each way, case by case, and against
the str implementation they replaced.

Both request paths filter headers with the byte-pair rules (the fast path on llhttp's pairs,
the aiohttp path on aiohttp's raw_headers). The aiohttp path used to filter a str multidict
with its own copy of the rules; that copy is kept here, frozen, as the oracle (it was checked
against the live str code, to the letter of its answers, until the str code was deleted).
Differences by design: the byte rules never forward the client's Content-Length (each path
writes the length it sends), and keep each field's own name spelling.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from tests.helpers.fakes import TOKEN
from tokenproxy.proxy.rules.headers import (
    connection_listed,
    request_headers,
    response_headers,
    safe_reason,
    valid_name,
)

HOP_BY_HOP = frozenset({"connection", "keep-alive", "te", "trailer", "transfer-encoding",
                        "upgrade"})
REQUEST_ONLY_LOCAL = frozenset({"host", "expect", "http2-settings"})
MIN_ECHO_TOKEN = 12


def _oracle_request(headers: CIMultiDictProxy[str], *, drop: frozenset[str], auth_header: str,
                    keep_client_auth: bool, preserve_host: bool
                    ) -> tuple[CIMultiDict[str], bool]:
    """The str implementation as it was (forward_request_headers), frozen."""
    values = headers.getall("Connection", ())
    listed = frozenset(n.strip().lower() for v in values for n in v.split(",") if n.strip())
    auth_low = auth_header.lower()
    out: CIMultiDict[str] = CIMultiDict()
    client_auth = False
    for name, value in headers.items():
        low = name.lower()
        if not (low.isascii() and low.replace("-", "").isalnum()):
            continue
        if low == "host":
            if preserve_host:
                out.add(name, value)
            continue
        if low in HOP_BY_HOP or low in drop or low.startswith("proxy-") or low in listed:
            continue
        if low in REQUEST_ONLY_LOCAL:
            continue
        if low == auth_low:
            if not keep_client_auth:
                continue
            client_auth = True
        out.add(name, value)
    return out, client_auth


def _oracle_response(headers: CIMultiDictProxy[str], *, token: str,
                     rewrite_location: Callable[[str], str]) -> CIMultiDict[str]:
    """The str implementation as it was (forward_response_headers), frozen."""
    values = headers.getall("Connection", ())
    listed = frozenset(n.strip().lower() for v in values for n in v.split(",") if n.strip())
    echoes = len(token) >= MIN_ECHO_TOKEN
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        low = name.lower()
        if low in HOP_BY_HOP or low in listed or low.startswith("proxy-"):
            continue
        if echoes and token in value:
            continue
        if low == "location":
            value = rewrite_location(value)
        out.add(name, value)
    return out


NAMES = st.sampled_from([
    "Host", "host", "Connection", "connection", "Keep-Alive", "TE", "Trailer",
    "Transfer-Encoding", "Upgrade", "Proxy-Authorization", "Proxy-Foo", "Authorization",
    "authorization", "X-Api-Key", "Expect", "HTTP2-Settings", "Tokenproxy-Key", "X-Foo", "x-foo",
    "X_Forwarded_For", "X.Dot", "Content-Type", "Location", "Set-Cookie", "Accept", "Date",
])
VALUES = st.one_of(
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=30),
    st.sampled_from(["close, X-Foo", "x-foo, Authorization", "keep-alive", f"Bearer {TOKEN}",
                     f"/a?t={TOKEN}", "Host", "upgrade"]),
)
PAIRS = st.lists(st.tuples(NAMES, VALUES), max_size=12)


def _normal(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Names lower-cased (spelling differs by design), Content-Length left out."""
    return [(n.lower(), v) for n, v in pairs if n.lower() != "content-length"]


@pytest.mark.slow
@settings(max_examples=400, derandomize=True, deadline=None)
@given(PAIRS, st.sampled_from(["Authorization", "X-Api-Key"]), st.booleans(), st.booleans())
def test_request_rules_on_byte_pairs_agree_with_the_str_ones(
    pairs: list[tuple[str, str]], auth: str, keep: bool, preserve_host: bool
) -> None:
    drop = frozenset({"tokenproxy-key"})
    expected, expected_auth = _oracle_request(
        CIMultiDictProxy(CIMultiDict(pairs)), drop=drop, auth_header=auth,
        keep_client_auth=keep, preserve_host=preserve_host)
    got, got_auth, _ = request_headers(
        [(n.encode("latin-1"), v.encode("latin-1")) for n, v in pairs],
        drop=frozenset(n.encode() for n in drop), auth_header=auth.lower().encode(),
        keep_client_auth=keep, preserve_host=preserve_host)
    assert _normal(list(expected.items())) == _normal(
        [(n.decode("latin-1"), v.decode("latin-1")) for n, v in got])
    assert expected_auth == got_auth


@pytest.mark.slow
@settings(max_examples=400, derandomize=True, deadline=None)
@given(PAIRS)
def test_response_rules_on_byte_pairs_agree_with_the_str_ones(
    pairs: list[tuple[str, str]]
) -> None:
    def rewrite(location: str) -> str:
        return "/rewritten" + location

    expected = _oracle_response(CIMultiDictProxy(CIMultiDict(pairs)), token=TOKEN,
                                rewrite_location=rewrite)
    got = response_headers([(n.encode("latin-1"), v.encode("latin-1")) for n, v in pairs],
                           token=TOKEN.encode(), rewrite_location=rewrite)
    assert _normal(list(expected.items())) == _normal(
        [(n.decode("latin-1"), v.decode("latin-1")) for n, v in got])


# -- case by case -----------------------------------------------------------------------------

TOKEN_B = TOKEN.encode()
KEY_DROP = frozenset({b"tokenproxy-key"})


def _request(headers: list[tuple[bytes, bytes]], *, keep: bool = False,
             preserve_host: bool = False) -> tuple[list[tuple[bytes, bytes]], bool, int]:
    return request_headers(headers, drop=KEY_DROP, auth_header=b"authorization",
                           keep_client_auth=keep, preserve_host=preserve_host)


def test_connection_lists_names_lower_cased_across_repeated_fields() -> None:
    assert frozenset({b"close", b"x-foo", b"keep-alive"}) == connection_listed(
        [(b"Connection", b"close, X-Foo"), (b"Accept", b"x-bar"),
         (b"connection", b" Keep-Alive ,, ")])


@pytest.mark.parametrize(("name", "valid"), [
    (b"x-forwarded-for", True), (b"abc123", True), (b"content_length", False),
    (b"x.forwarded.for", False), (b"x~a", False), (b"x a", False), (b"", False),
])
def test_valid_names_are_letters_digits_and_dashes(name: bytes, valid: bool) -> None:
    assert valid is valid_name(name)


def test_request_fields_for_the_upstream() -> None:
    """Host, hop-by-hop and Connection-listed fields, the client's Content-Length, Proxy-*,
    Expect, the proxy's own key and the client's Authorization stay; invalid names are
    dropped and counted; the rest passes in order, each with its own spelling."""
    out, client_auth, invalid = _request([
        (b"Host", b"localhost:8080"), (b"Connection", b"keep-alive, X-Hop"), (b"X-Hop", b"1"),
        (b"Keep-Alive", b"timeout=5"), (b"TE", b"trailers"), (b"Content-Length", b"4"),
        (b"Authorization", b"Basic abc"), (b"Proxy-Authorization", b"Basic x"),
        (b"Expect", b"100-continue"), (b"Tokenproxy-Key", b"k"), (b"X_Forwarded_For", b"1"),
        (b"Accept", b"*/*"), (b"X-Multi", b"1"), (b"x-multi", b"2"),
    ])
    assert [(b"Accept", b"*/*"), (b"X-Multi", b"1"), (b"x-multi", b"2")] == out
    assert (False, 1) == (client_auth, invalid)


def test_keep_passes_the_clients_authorization_and_says_so() -> None:
    out, client_auth, invalid = _request([(b"Authorization", b"Basic abc"), (b"X-A", b"1")],
                                         keep=True)
    assert ([(b"Authorization", b"Basic abc"), (b"X-A", b"1")], True, 0) == (
        out, client_auth, invalid)


def test_connection_cannot_turn_a_kept_authorization_into_no_token() -> None:
    """``Connection: Authorization`` drops the client's header before it is looked at: the
    request then counts as sent without one, so the proxy's token is attached."""
    assert ([], False, 0) == _request(
        [(b"Connection", b"Authorization"), (b"Authorization", b"Basic abc")], keep=True)


@pytest.mark.parametrize("connection", [[], [(b"Connection", b"Host")]], ids=["plain", "listed"])
def test_preserve_host_keeps_the_clients_host_even_when_listed(
    connection: list[tuple[bytes, bytes]]
) -> None:
    out, _, _ = _request([*connection, (b"Host", b"api.local:8080")], preserve_host=True)
    assert [(b"Host", b"api.local:8080")] == out


def test_response_fields_for_the_client() -> None:
    """Hop-by-hop, Connection-listed, Proxy-* and framing fields go, a field echoing the token
    goes, repeated Set-Cookie stay in order, and the Location is rewritten."""
    out = response_headers([
        (b"Connection", b"X-Up"), (b"X-Up", b"1"), (b"Transfer-Encoding", b"chunked"),
        (b"Content-Length", b"5"), (b"Proxy-Agent", b"p"), (b"Set-Cookie", b"a=1"),
        (b"X-Echo", b"Bearer " + TOKEN_B), (b"Set-Cookie", b"b=2"), (b"Location", b"/v1/x"),
    ], token=TOKEN_B, rewrite_location=lambda loc: "/api" + loc.removeprefix("/v1"))
    assert [(b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2"), (b"Location", b"/api/x")] == out


def test_a_short_token_is_not_looked_for_in_response_fields() -> None:
    """A token shorter than MIN_ECHO_TOKEN could occur by chance (in a Date, an ETag)."""
    out = response_headers([(b"ETag", b'"v1"')], token=b"1", rewrite_location=str)
    assert [(b"ETag", b'"v1"')] == out


@pytest.mark.parametrize("location", ["/x/日本".encode(), b"/x/\xff\xfe"], ids=["utf8", "not-utf8"])
def test_a_location_keeps_its_bytes_through_the_rewrite(location: bytes) -> None:
    out = response_headers([(b"Location", location)], token=TOKEN_B,
                           rewrite_location=lambda loc: loc)
    assert [(b"Location", location)] == out


@pytest.mark.parametrize(("reason", "token", "safe"), [
    (b"OK", TOKEN_B, b"OK"),
    (b"Denied for " + TOKEN_B, TOKEN_B, b""),   # the standard phrase goes out instead
    (b"Not 1", b"1", b"Not 1"),                 # a short token is not looked for
], ids=["plain", "echo", "short-token"])
def test_a_reason_phrase_echoing_the_token_is_dropped(reason: bytes, token: bytes,
                                                       safe: bytes) -> None:
    assert safe == safe_reason(reason, token)
