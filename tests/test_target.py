"""Request-target rules as pure functions: which paths are refused, how a Location is rewritten."""

from __future__ import annotations

import pytest

from tokenproxy.config import build_config
from tokenproxy.proxy.rules.target import CompiledRoute, RouteTable


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
