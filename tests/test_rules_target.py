"""Request-target rules as pure functions: which paths are refused, how a Location is rewritten."""

from __future__ import annotations

import contextlib
import time

import pytest

from tokenproxy.config import build_config
from tokenproxy.errors import RequestRejected
from tokenproxy.proxy.rules.target import CompiledRoute, RouteTable, check_path, split_target


def _table(*routes: tuple[str, str]) -> RouteTable:
    raw = {"providers": {"api": {"type": "static", "token": "t" * 16}},
           "routes": [{"prefix": p, "upstream": u, "provider": "api"} for p, u in routes]}
    return RouteTable(build_config(raw, {}).routes)


def _route(table: RouteTable, prefix: str) -> CompiledRoute:
    return next(c for c in table.routes if c.route.prefix == prefix)


TABLE = _table(("/api", "http://upstream.example/v1/"), ("/ext", "http://other.example/"),
               ("/", "https://root.example/"))


@pytest.mark.parametrize(("location", "rewritten"), [
    ("http://upstream.example/v1/next?page=2", "/api/next?page=2"),
    ("http://upstream.example:80/v1/next?page=2", "/api/next?page=2"),   # default port
    ("/v1/next", "/api/next"),
    ("/v1", "/api"),
    ("/v1/", "/api"),
    ("http://upstream.example/v2/next", "http://upstream.example/v2/next"),   # outside
    ("/v2/next?x=1", "http://upstream.example/v2/next?x=1"),   # relative outside: made absolute
    ("http://upstream.example:8080/v1/x", "http://upstream.example:8080/v1/x"),
    ("https://upstream.example/v1/x", "https://upstream.example/v1/x"),       # other scheme
    ("//upstream.example/v1/x", "//upstream.example/v1/x"),
])
def test_a_location_inside_the_routes_upstream_is_rewritten(location: str, rewritten: str
                                                           ) -> None:
    assert rewritten == TABLE.rewrite_location(location, _route(TABLE, "/api"))


@pytest.mark.parametrize(("prefix", "location"), [
    ("/api", "http://other.example/admin/delete-all"),
    ("/api", "https://root.example/x"),
    ("/ext", "http://upstream.example/v1/next"),
    ("/", "http://upstream.example/v1/next"),
])
def test_a_location_into_another_routes_upstream_passes_unchanged(prefix: str, location: str
                                                                 ) -> None:
    """Upstream A cannot send a redirect-following client through the proxy to route B."""
    assert location == TABLE.rewrite_location(location, _route(TABLE, prefix))


SHARED = _table(("/", "http://a.example/"), ("/internal", "http://b.example/"))


@pytest.mark.parametrize(("location", "rewritten"), [
    ("http://a.example/internal/x", "http://a.example/internal/x"),
    ("/internal/x", "http://a.example/internal/x"),
    ("/internal", "http://a.example/internal"),
    ("/public/x", "/public/x"),
    ("http://a.example/public/x?q=1", "/public/x?q=1"),
])
def test_a_location_that_would_reach_another_route_through_the_proxy_stays_upstream(
    location: str, rewritten: str
) -> None:
    """Route / is upstream A; route /internal is upstream B. A Location on A's own
    /internal/x must not become the proxy path /internal/x, which B would serve with B's
    token: it points at A itself instead."""
    assert rewritten == SHARED.rewrite_location(location, _route(SHARED, "/"))


# -- check_path: dot segments in any encoding --------------------------------------------------


@pytest.mark.parametrize("path", [
    "/api/%f0%80%80%ae%f0%80%80%ae/admin",   # 4-byte overlong "."
    "/api/..%f0%80%80%afadmin",              # 4-byte overlong "/"
    "/api/..%c1%9cadmin",                    # 2-byte overlong "\\" (IIS, CVE-2000-0884)
    "/api/..%e0%81%9cadmin",                 # 3-byte overlong "\\"
    "/api/%25c1%259c..%25c1%259cadmin",      # the same, percent-encoded once more
], ids=["4byte-dot", "4byte-slash", "2byte-backslash", "3byte-backslash", "double-encoded"])
def test_every_overlong_utf8_form_is_refused(path: str) -> None:
    """Every overlong UTF-8 form is refused, not only the 2- and 3-byte forms of "." and
    "/": the 4-byte ones too, and any overlong backslash -- the very spelling of the IIS
    Unicode traversal ("..%c1%9c"). A lenient decoder that accepts the 2-byte form (as
    _OVERLONG assumes upstreams may) decodes these too."""
    with pytest.raises(RequestRejected):
        check_path(path)


@pytest.mark.parametrize("path", [
    "/" + "%25" * 5000 + "2e",
    "/" + "%u0025" * 2500,
    "/" + "\ufdfa" * 5000,            # NFKC expands each to 18 characters
    "/" + "%EF%B7%BA" * 1700,
    "/" + "%25252525252525" * 1000,
    "/" + "a." * 8000,
], ids=["pct25", "pctu", "nfkc-expanding", "nfkc-encoded", "nested", "dots"])
def test_check_path_stays_cheap_on_hostile_paths(path: str) -> None:
    """16 KiB paths built to make the decoder work (deep %25 nesting, %u escapes,
    characters NFKC expands 18-fold) cost milliseconds, not seconds (about 5 ms here for
    the worst, NFKC over 5000 U+FDFA: some 100 times a plain request, bounded by the head
    size)."""
    started = time.perf_counter()
    with contextlib.suppress(RequestRejected):   # either way: only the time counts
        check_path(path)
    assert time.perf_counter() - started < 0.25


@pytest.mark.parametrize("path", [
    "/files/50%25off", "/files/100%", "/a/%2E%2Ehidden", "/a/..b", "/a/b..", "/a/.well-known/x",
    "/search/%user", "/a/%e2%80%a6", "/a/%ef%bc%8e%ef%bc%8ex", "/v1/%uzzzz",
])
def test_check_path_passes_legitimate_paths(path: str) -> None:
    """Percent signs, dots inside names, an ellipsis, an invalid %u: all pass."""
    check_path(path)


# -- the request target, route matching and the upstream URL ------------------------------------


@pytest.mark.parametrize(("method", "target", "split"), [
    ("GET", "/api/x", ("/api/x", None)),
    ("GET", "/api/x?", ("/api/x", "")),                 # an empty query keeps its "?"
    ("POST", "/api/x?a=%ZZ&b=;", ("/api/x", "a=%ZZ&b=;")),
    ("GET", "/", ("/", None)),
])
def test_split_target_keeps_the_raw_path_and_query(method: str, target: str,
                                                   split: tuple[str, str | None]) -> None:
    assert split == split_target(method, target)


@pytest.mark.parametrize(("method", "target", "detail"), [
    ("CONNECT", "/x", "the CONNECT method is not proxied"),
    ("TRACE", "/x", "the TRACE method is not proxied"),
    ("TRACK", "/x", "the TRACK method is not proxied"),
    ("GET", "http://evil.example/x", "only origin-form request targets (/path?query) are proxied"),
    ("GET", "*", "only origin-form request targets (/path?query) are proxied"),
    ("GET", "//evil.example/x", "a request path may not start with //"),
    ("GET", "/x#frag", "a request target may not carry a fragment"),
    ("GET", "/api/../admin", "the request path contains a dot segment"),
    ("GET", "/api/%00", "the request path contains an encoded NUL"),
])
def test_split_target_refuses_what_could_leave_the_route(method: str, target: str,
                                                         detail: str) -> None:
    with pytest.raises(RequestRejected) as info:
        split_target(method, target)
    assert (400, "bad_request", detail) == (info.value.status, info.value.cause,
                                            info.value.detail)


@pytest.mark.parametrize(("path", "prefix"), [
    ("/api", "/api"), ("/api/", "/api"), ("/api/x/y", "/api"), ("/apix", "/"),
    ("/ext/a", "/ext"), ("/", "/"), ("/other", "/"),
])
def test_the_longest_prefix_on_whole_segments_wins(path: str, prefix: str) -> None:
    compiled = TABLE.match(path)
    assert compiled is not None
    assert prefix == compiled.route.prefix


def test_no_route_matches_outside_every_prefix() -> None:
    table = _table(("/api", "http://upstream.example/v1/"))
    assert (None, None) == (table.match("/apix"), table.match("/"))


@pytest.mark.parametrize(("path", "query", "target"), [
    ("/api/x/y", None, "/v1/x/y"),
    ("/api", None, "/v1/"),
    ("/api/", None, "/v1/"),
    ("/api/a%2Fb", "q=1&r", "/v1/a%2Fb?q=1&r"),
    ("/api/x", "", "/v1/x?"),
])
def test_the_upstream_target_is_the_upstream_path_plus_the_rest(
    path: str, query: str | None, target: str
) -> None:
    assert target == _route(TABLE, "/api").upstream_target(path, query)


@pytest.mark.parametrize(("path", "query", "url"), [
    ("/api/x/y", None, "http://upstream.example/v1/x/y"),
    ("/api", None, "http://upstream.example/v1/"),
    ("/api/a%2Fb", "q=1&r", "http://upstream.example/v1/a%2Fb?q=1&r"),
    ("/ext/%7e", "a=%ZZ", "http://other.example/%7e?a=%ZZ"),
])
def test_the_upstream_url_is_the_routes_origin_plus_the_raw_target(
    path: str, query: str | None, url: str
) -> None:
    compiled = TABLE.match(path)
    assert compiled is not None
    assert url == str(compiled.upstream_url(path, query))


@pytest.mark.parametrize(("upstream", "host"), [
    ("http://upstream.example/", b"upstream.example"),
    ("http://upstream.example:80/", b"upstream.example"),
    ("https://upstream.example:8443/", b"upstream.example:8443"),
    ("http://[::1]:8080/", b"[::1]:8080"),
    ("http://127.0.0.1:9/", b"127.0.0.1:9"),
])
def test_the_host_the_upstream_expects(upstream: str, host: bytes) -> None:
    [compiled] = _table(("/", upstream)).routes
    assert host == compiled.host_header


def test_the_token_header_from_the_route() -> None:
    raw = {"providers": {"api": {"type": "static", "token": "t" * 16}},
           "routes": [{"prefix": "/", "upstream": "http://u.example/", "provider": "api",
                       "header": "PRIVATE-TOKEN", "value": "token {token} v1"}]}
    [compiled] = RouteTable(build_config(raw, {}).routes).routes
    assert (b"private-token", "token abc v1") == (compiled.auth_header_low,
                                                 compiled.header_value("abc"))
