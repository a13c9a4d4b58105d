"""Which requests the fast path takes (proxy/fast_path/head.py ``classify``), on request heads
as bytes and a Proxy built from a config: no sockets. A request it does not take is handed to
aiohttp with the reason ``classify`` gives (tokenproxy_fast_path_handovers_total{reason})."""

from __future__ import annotations

import pytest

from tests.helpers.config import proxy_config
from tests.helpers.fakes import TOKEN
from tests.helpers.proxy import proxy_for
from tokenproxy.proxy.fast_path.head import MAX_FAST_HEADERS, Request, classify
from tokenproxy.proxy.runtime import Proxy

UPSTREAM = "http://upstream.test/v1/"


@pytest.fixture(name="proxy", scope="module")
def _proxy() -> Proxy:
    return proxy_for(proxy_config(UPSTREAM, TOKEN, routes=[
        {"prefix": "/api", "upstream": UPSTREAM, "provider": "api"}]))


def head(line: str, *fields: str) -> bytes:
    return ("\r\n".join([line, *fields]) + "\r\n\r\n").encode("latin-1")


def taken(data: bytes, proxy: Proxy) -> Request:
    request = classify(data, proxy)
    assert isinstance(request, Request), request
    return request


def test_a_plain_get_is_taken_with_everything_the_exchange_needs(proxy: Proxy) -> None:
    request = taken(head("GET /api/x?y=1 HTTP/1.1", "Host: localhost:8080", "Accept: */*"),
                    proxy)
    assert (b"GET", "GET", "/api/x?y=1", "/api/x", "y=1") == (
        request.method, request.method_str, request.target, request.path, request.query)
    assert [(b"Host", b"localhost:8080"), (b"Accept", b"*/*")] == request.headers
    assert (None, True) == (request.length, request.keep_alive)
    assert ("/api", UPSTREAM) == (request.compiled.route.prefix,
                                  request.compiled.route.upstream.url)
    assert proxy is request.proxy


def test_a_content_length_body_is_taken(proxy: Proxy) -> None:
    request = taken(head("POST /api/up HTTP/1.1", "Host: localhost", "Content-Length: 5"),
                    proxy)
    assert (b"POST", 5) == (request.method, request.length)


@pytest.mark.parametrize(("connection", "keep_alive"), [
    ("keep-alive", True), ("close", False), ("Keep-Alive, CLOSE", False), ("closed", True),
])
def test_connection_close_ends_keep_alive(proxy: Proxy, connection: str,
                                          keep_alive: bool) -> None:
    request = taken(head("GET /api HTTP/1.1", "Host: localhost", f"Connection: {connection}"),
                    proxy)
    assert keep_alive is request.keep_alive


def test_webdav_methods_are_taken(proxy: Proxy) -> None:
    assert b"PROPFIND" == taken(head("PROPFIND /api/d HTTP/1.1", "Host: localhost"),
                                proxy).method


@pytest.mark.parametrize("data", [
    head("GET /api HTTP/1.0", "Host: localhost"),
    head("GET /api HTTP/1.1", "Host: localhost", "Transfer-Encoding: chunked"),
    head("PUT /api HTTP/1.1", "Host: localhost", "Content-Length: 3", "Expect: 100-continue"),
    head("GET /api HTTP/1.1", "Host: localhost", "Connection: Upgrade", "Upgrade: websocket"),
    head("GET /api HTTP/1.1", "Host: localhost", "Upgrade: h2c"),
    head("CONNECT upstream.test:443 HTTP/1.1", "Host: upstream.test:443"),
], ids=["http/1.0", "chunked", "expect", "websocket", "h2c-without-connection", "connect"])
def test_what_aiohttp_serves_is_protocol(proxy: Proxy, data: bytes) -> None:
    assert "protocol" == classify(data, proxy)


@pytest.mark.parametrize("data", [
    b"NOT HTTP AT ALL\r\n\r\n",
    head("GET /api HTTP/1.1", "Host: localhost", "Host: localhost"),
    head("GET /api HTTP/1.1", "Host: localhost", "Content-Length: 1", "Content-Length: 1"),
    head("GET /api HTTP/1.1", "Host: localhost", "Content-Type: a", "content-type: b"),
    head("GET /api HTTP/1.1", "Host: localhost", "Content-Length: -1"),
    head("GET /api HTTP/1.1", "Host: localhost", "X-A : b"),
    head("GET /api HTTP/1.1", "Host: localhost") + head("GET /api HTTP/1.1", "Host: localhost"),
    head("GET /api HTTP/1.1", "Host: localhost")[:-2],
], ids=["garbage", "two-hosts", "two-lengths", "two-content-types", "negative-length",
        "space-before-colon", "two-heads", "unfinished"])
def test_what_aiohttp_refuses_as_malformed_is_malformed(proxy: Proxy, data: bytes) -> None:
    assert "malformed" == classify(data, proxy)


def test_more_fields_than_the_fast_path_takes_is_malformed(proxy: Proxy) -> None:
    """aiohttp answers more than its 128 fields with 431; the fast path takes at most
    MAX_FAST_HEADERS and leaves the rest to it."""
    fields = [f"X-F{i}: v" for i in range(MAX_FAST_HEADERS - 1)]
    assert isinstance(classify(head("GET /api HTTP/1.1", "Host: localhost", *fields), proxy),
                      Request)
    assert "malformed" == classify(
        head("GET /api HTTP/1.1", "Host: localhost", *fields, "X-One-More: v"), proxy)


@pytest.mark.parametrize("data", [
    head("TRACE /api HTTP/1.1", "Host: localhost"),
    head("GET http://upstream.test/v1/x HTTP/1.1", "Host: localhost"),
    head("GET /api/../admin HTTP/1.1", "Host: localhost"),
    head("GET /api/%2e%2e/admin HTTP/1.1", "Host: localhost"),
    head("GET /elsewhere HTTP/1.1", "Host: localhost"),
    head("GET /api HTTP/1.1", "Host: evil.example"),
    head("GET /api HTTP/1.1"),
    head("GET /api HTTP/1.1", "Host: localhost", "Origin: https://evil.example"),
    head("GET /api HTTP/1.1", "Host: localhost", "X-Forwarded-For: 10.0.0.1"),
    head("GET /api HTTP/1.1", "Host: localhost", "X-Big: " + "b" * 17000),
], ids=["trace", "absolute-form", "dot-segment", "encoded-dot-segment", "no-route",
        "foreign-host", "no-host", "cross-site", "relayed", "head-too-large"])
def test_what_a_check_refuses_is_refused(proxy: Proxy, data: bytes) -> None:
    """aiohttp's path gives these their 4xx (and counts them), so the answer is the same
    whichever path saw the request first."""
    assert "refused" == classify(data, proxy)
