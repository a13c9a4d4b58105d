"""Request-target rules as pure functions: which paths are refused, how a Location is rewritten."""

from __future__ import annotations

import pytest

from tokenproxy.config import build_config
from tokenproxy.proxy.target import CompiledRoute, RouteTable


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
    ("http://upstream.example:8080/v1/x", "http://upstream.example:8080/v1/x"),
    ("https://upstream.example/v1/x", "https://upstream.example/v1/x"),       # other scheme
    ("//upstream.example/v1/x", "//upstream.example/v1/x"),
])
def test_a_location_inside_the_routes_upstream_is_rewritten(location: str, rewritten: str
                                                           ) -> None:
    assert rewritten == _route(TABLE, "/api").rewrite_location(location)


@pytest.mark.parametrize(("prefix", "location"), [
    ("/api", "http://other.example/admin/delete-all"),
    ("/api", "https://root.example/x"),
    ("/ext", "http://upstream.example/v1/next"),
    ("/", "http://upstream.example/v1/next"),
])
def test_a_location_into_another_routes_upstream_passes_unchanged(prefix: str, location: str
                                                                 ) -> None:
    """Upstream A cannot send a redirect-following client through the proxy to route B."""
    assert location == _route(TABLE, prefix).rewrite_location(location)
