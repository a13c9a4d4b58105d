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

from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from tests.helpers.fakes import TOKEN
from tokenproxy.proxy.rules.headers import (
    request_headers,
    response_headers,
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
