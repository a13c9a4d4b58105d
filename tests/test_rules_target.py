"""Request-target rules as pure functions: which paths are refused, how a Location is rewritten."""

from __future__ import annotations

import contextlib
import time

import pytest

from tokenproxy.config import build_config
from tokenproxy.errors import RequestRejected
from tokenproxy.proxy.rules.target import CompiledRoute, RouteTable, check_path


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
