"""Forwarding: what goes upstream, what comes back, and what never does."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpServer
from yarl import URL

from tests.helpers.config import MakeProxy, proxy_config, upstream_url
from tests.helpers.fakes import CLIENT_KEY, TOKEN, FakeUpstream, Seen, assert_no_secret
from tests.helpers.logs import CapturedLogs
from tests.helpers.metrics import count
from tests.helpers.net import closed_port
from tests.helpers.rawhttp import first_answer, get
from tests.helpers.rawupstream import (
    MakeRaw,
    UpConn,
    connected,
    echo_target,
    response,
    serving,
    start_proxy,
)
from tests.helpers.wait import request_event, wait_for
from tokenproxy.daemon import Daemon

# Every test here runs against both request paths (tests/conftest.py).
pytestmark = pytest.mark.both_paths

# A deterministic, non-repeating-looking payload.
PATTERN = bytes(range(256))

# -- helpers ---------------------------------------------------------------------------------


def base(daemon: Daemon) -> str:
    return f"http://127.0.0.1:{daemon.port()}"


def raw_url(daemon: Daemon, target: str) -> URL:
    """A proxy URL whose path and query are sent byte for byte."""
    return URL(base(daemon) + target, encoded=True)


def header_names(seen: Seen) -> set[str]:
    return {k.lower() for k, _ in seen.headers}


# A regression must fail fast, not hang until pytest's timeout.
QUICK = aiohttp.ClientTimeout(total=5)


def route(prefix: str, upstream: str, **extra: Any) -> dict[str, Any]:
    return {"prefix": prefix, "upstream": upstream, "provider": "api", **extra}


# -- request line: method, path, query, routing -------------------------------------------


class TestRequestTarget:
    @pytest.mark.parametrize("method", ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    async def test_method_forwarded(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream, method: str
    ) -> None:
        """The client's method reaches the upstream unchanged."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN))
        async with aiohttp.ClientSession() as s, s.request(method, base(daemon) + "/m") as resp:
            assert 200 == resp.status
        assert method == fake_upstream.last.method

    @pytest.mark.parametrize(
        ("prefix", "up_path", "target", "expected"),
        [
            ("/api", "/v1/", "/api/x/y", "/v1/x/y"),
            ("/api/", "/v1/", "/api/x/y", "/v1/x/y"),
            ("/api", "/v1", "/api/x/y", "/v1/x/y"),
            ("/api/", "/v1", "/api/x/y", "/v1/x/y"),
            ("/api", "/v1/", "/api", "/v1/"),
            ("/api", "/v1", "/api", "/v1"),
            ("/api", "/v1/", "/api/", "/v1/"),
            ("/api/", "/v1", "/api/", "/v1/"),
            ("/", "/v1/", "/x", "/v1/x"),
            ("/", "/v1", "/x", "/v1/x"),
            ("/", "/v1/", "/", "/v1/"),
            ("/", "/", "/x/y", "/x/y"),
        ],
    )
    async def test_prefix_replaced_by_upstream_path(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        prefix: str, up_path: str, target: str, expected: str,
    ) -> None:
        """The route prefix is replaced by the upstream path with exactly one junction slash."""
        daemon = await make_proxy(proxy_config(
            upstream_url(upstream, "/"), TOKEN,
            routes=[route(prefix, upstream_url(upstream, up_path))]))
        async with aiohttp.ClientSession() as s, s.get(raw_url(daemon, target)) as resp:
            assert 200 == resp.status
        assert expected == fake_upstream.last.raw_path

    async def test_raw_query_byte_for_byte(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """The query string reaches the upstream exactly as sent, invalid escapes included."""
        daemon = await make_proxy(proxy_config(
            upstream_url(upstream, "/"), TOKEN,
            routes=[route("/api", upstream_url(upstream, "/v1/"))]))
        query = "a=%ZZ&b=;&c=%2F&d=+&e=%7e&f=a%20b&&g"
        async with connected(daemon.port()) as conn:
            resp = await conn.request(
                f"GET /api/q?{query} HTTP/1.1\nHost: 127.0.0.1\n\n")
        assert 200 == resp.status
        assert f"/v1/q?{query}" == fake_upstream.last.raw_path

    async def test_encoded_slash_in_path_kept(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """A %2F in the path stays encoded upstream (never decoded into a separator)."""
        daemon = await make_proxy(proxy_config(
            upstream_url(upstream, "/"), TOKEN,
            routes=[route("/api", upstream_url(upstream, "/v1/"))]))
        async with aiohttp.ClientSession() as s, \
                s.get(raw_url(daemon, "/api/a%2Fb/c%20d?x=1")) as resp:
            assert 200 == resp.status
        assert "/v1/a%2Fb/c%20d?x=1" == fake_upstream.last.raw_path

    async def test_longest_prefix_wins(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """Of two matching routes the longer prefix wins, whatever the order in the config."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN, routes=[
            route("/", upstream_url(upstream, "/root/")),
            route("/api", upstream_url(upstream, "/short/")),
            route("/api/v2", upstream_url(upstream, "/long/")),
        ]))
        async with aiohttp.ClientSession() as s:
            for target in ("/api/v2/x", "/api/v1/x", "/api/v2", "/other"):
                async with s.get(base(daemon) + target) as resp:
                    assert 200 == resp.status
        assert ["/long/x", "/short/v1/x", "/long/", "/root/other"] == [
            seen.raw_path for seen in fake_upstream.seen]

    async def test_prefix_matches_whole_segments_only(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """Route /api does not match /apix: that falls to the root route."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN, routes=[
            route("/", upstream_url(upstream, "/root/")),
            route("/api", upstream_url(upstream, "/v1/")),
        ]))
        async with aiohttp.ClientSession() as s, s.get(base(daemon) + "/apix/y") as resp:
            assert 200 == resp.status
        assert "/root/apix/y" == fake_upstream.last.raw_path

    async def test_path_outside_every_route_is_404(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """With only route /api, /apix gets a 404 problem and nothing reaches the upstream."""
        daemon = await make_proxy(proxy_config(
            upstream_url(upstream, "/"), TOKEN,
            routes=[route("/api", upstream_url(upstream, "/v1/"))]))
        async with aiohttp.ClientSession() as s, s.get(base(daemon) + "/apix") as resp:
            assert 404 == resp.status
            assert "application/problem+json" == resp.content_type
            assert "not_found" == resp.headers["Tokenproxy-Error"]
        assert [] == fake_upstream.seen


# -- request bodies ----------------------------------------------------------------------------


async def _chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        await asyncio.sleep(0)
        yield data[i:i + size]


class TestRequestBody:
    async def test_small_post_body_intact(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """A small POST body reaches the upstream byte for byte."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream), TOKEN))
        body = PATTERN * 4
        async with aiohttp.ClientSession() as s, \
                s.post(base(daemon) + "/echo", data=body) as resp:
            doc = await resp.json()
        assert hashlib.sha256(body).hexdigest() == doc["body_sha256"]
        assert [str(len(body))] == fake_upstream.seen[-1].header("Content-Length")

    async def test_chunked_upload_intact(
        self, make_proxy: MakeProxy, upstream: TestServer
    ) -> None:
        """A chunked upload (no Content-Length) reaches the upstream intact."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream), TOKEN))
        body = PATTERN * 1200   # 300 KiB in 10 KiB chunks
        async with aiohttp.ClientSession() as s, \
                s.post(base(daemon) + "/echo", data=_chunks(body, 10_240)) as resp:
            doc = await resp.json()
        assert len(body) == doc["body_len"]
        assert hashlib.sha256(body).hexdigest() == doc["body_sha256"]

    @pytest.mark.parametrize(
        ("limits", "extra"),
        [({"max_replay_body": "1KiB"}, {}), ({}, {"retry_on": []})],
        ids=["past-max-replay-body", "no-retry-on"],
    )
    async def test_upload_streams_before_it_ends(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        limits: dict[str, Any], extra: dict[str, Any],
    ) -> None:
        """An upload that will not be replayed reaches the upstream while the client still sends."""
        up = upstream_url(upstream, "/")
        daemon = await make_proxy(proxy_config(up, TOKEN, limits=limits,
                                               routes=[route("/", up, **extra)]))
        sent = hashlib.sha256()

        async def body() -> AsyncIterator[bytes]:
            first = PATTERN * 16   # 4 KiB
            sent.update(first)
            yield first
            # The rest only once the upstream holds the start: a buffering proxy deadlocks here.
            async with asyncio.timeout(3):
                await fake_upstream.first_bytes.wait()
            rest = PATTERN * 64
            sent.update(rest)
            yield rest

        async with aiohttp.ClientSession(timeout=QUICK) as s, \
                s.post(base(daemon) + "/upload", data=body()) as resp:
            assert 200 == resp.status
            doc = await resp.json()
        assert sent.hexdigest() == doc["body_sha256"]

    @pytest.mark.parametrize("chunked", [False, True])
    async def test_body_larger_than_max_replay_body_intact(
        self, make_proxy: MakeProxy, upstream: TestServer, chunked: bool
    ) -> None:
        """A body past max_replay_body streams through whole, its buffered prefix included."""
        daemon = await make_proxy(proxy_config(
            upstream_url(upstream), TOKEN, limits={"max_replay_body": "1KiB"}))
        body = PATTERN * 256   # 64 KiB
        data: Any = _chunks(body, 700) if chunked else body
        async with aiohttp.ClientSession() as s, \
                s.post(base(daemon) + "/echo", data=data) as resp:
            assert 200 == resp.status
            doc = await resp.json()
        assert len(body) == doc["body_len"]
        assert hashlib.sha256(body).hexdigest() == doc["body_sha256"]

    async def test_gzip_request_body_not_decoded(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """A gzip request body passes through compressed, with its Content-Encoding."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream), TOKEN))
        body = gzip.compress(b"compress me " * 500)
        async with aiohttp.ClientSession() as s, s.post(
            base(daemon) + "/echo", data=body, headers={"Content-Encoding": "gzip"}
        ) as resp:
            doc = await resp.json()
        assert hashlib.sha256(body).hexdigest() == doc["body_sha256"]
        assert ["gzip"] == fake_upstream.seen[-1].header("Content-Encoding")

    async def test_expect_continue_answered_not_forwarded(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """Expect: 100-continue is answered by the proxy and not forwarded; the body arrives."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream), TOKEN))
        body = b"expected body"
        async with aiohttp.ClientSession() as s, \
                s.post(base(daemon) + "/echo", data=body, expect100=True) as resp:
            doc = await resp.json()
        assert hashlib.sha256(body).hexdigest() == doc["body_sha256"]
        assert [] == fake_upstream.seen[-1].header("Expect")


# -- request headers ---------------------------------------------------------------------------


class TestRequestHeaders:
    async def test_hop_by_hop_not_forwarded(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """Connection and the names it lists, Keep-Alive, TE, Trailer, Upgrade, Proxy-* stay."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN))
        async with connected(daemon.port()) as conn:
            resp = await conn.request(
                "GET /h HTTP/1.1\nHost: 127.0.0.1\n"
                "Connection: X-Foo\nConnection: X-Bar, keep-alive\n"
                "X-Foo: 1\nX-Bar: 2\nKeep-Alive: timeout=5\nTE: trailers\n"
                "Trailer: X-Checksum\nUpgrade: h2c\n"
                "Proxy-Authorization: Basic Zm9vOmJhcg==\nProxy-Connection: keep-alive\n"
                "X-Keep: yes\n\n")
        assert 200 == resp.status
        names = header_names(fake_upstream.last)
        dropped = {"x-foo", "x-bar", "keep-alive", "te", "trailer", "upgrade",
                   "proxy-authorization", "proxy-connection"}
        assert set() == names & dropped
        assert [] == [v for v in fake_upstream.last.header("Connection") if "x-" in v.lower()]
        assert ["yes"] == fake_upstream.last.header("X-Keep")

    async def test_names_with_an_underscore_not_forwarded(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """CGI and WSGI servers read Content_Length as Content-Length and X_Forwarded_For as
        X-Forwarded-For: names with anything but letters, digits and "-" are dropped, as nginx
        does, and counted."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN))
        async with connected(daemon.port()) as conn:
            resp = await conn.request(
                "GET /u HTTP/1.1\nHost: 127.0.0.1\nContent_Length: 5\n"
                "Transfer_Encoding: chunked\nX_Forwarded_For: 10.0.0.1\n"
                "Authorization_: Bearer x\nX-Keep: yes\n\n")
        assert 200 == resp.status
        assert set() == {n for n in header_names(fake_upstream.last) if "_" in n}
        assert ["yes"] == fake_upstream.last.header("X-Keep")
        assert [f"Bearer {TOKEN}"] == fake_upstream.last.header("Authorization")
        assert 4 == daemon.registry.get_sample_value(
            "tokenproxy_request_headers_dropped_total", {"reason": "invalid_name"})

    @pytest.mark.parametrize("name", ["X.Forwarded.For", "X+Forwarded+For", "X~Forwarded~For"])
    async def test_any_punctuation_in_a_header_name_is_dropped(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw, name: str
    ) -> None:
        """Dropping names with "_" (CGI/WSGI servers read X_Forwarded_For as X-Forwarded-For) is
        not enough: lighttpd's CGI/FastCGI/SCGI environment maps *every* non-alphanumeric
        character to "_" (http_cgi_encode_varname), so X.Forwarded.For becomes
        HTTP_X_FORWARDED_FOR, past both an underscore drop and reject_forwarded (which refuses
        X-Forwarded-For itself with 403). So any name with anything but letters, digits and "-"
        is dropped (nginx's default ignore_invalid_headers drops any outside [A-Za-z0-9-_])."""
        up = await raw_upstream(serving())
        daemon = await start_proxy(make_proxy, up)
        async with connected(daemon.port()) as conn:
            await conn.send(get("/x", "localhost", f"{name}: 203.0.113.9"))
            assert 200 == (await conn.response()).status
        [seen] = up.requests
        cgi = ["".join(c.upper() if c.isalnum() else "_" for c in k) for k, _ in seen.headers]
        assert "X_FORWARDED_FOR" not in cgi

    async def test_connection_cannot_strip_the_token(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """`Connection: close, Authorization, X-Foo` still gets the token; X-Foo is stripped."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN))
        async with connected(daemon.port()) as conn:
            resp = await conn.request(
                "GET /c HTTP/1.1\nHost: 127.0.0.1\nConnection: close, Authorization, X-Foo\n"
                "Authorization: Bearer client-own\nX-Foo: 1\n\n")
        assert 200 == resp.status
        assert [f"Bearer {TOKEN}"] == fake_upstream.last.header("Authorization")
        assert [] == fake_upstream.last.header("X-Foo")

    @pytest.mark.parametrize("with_key", [False, True])
    async def test_tokenproxy_key_never_forwarded(
        self, make_proxy: MakeProxy, upstream: TestServer,
        fake_upstream: FakeUpstream, with_key: bool
    ) -> None:
        """Tokenproxy-Key stays at the proxy, whether or not client_key is configured."""
        extra: dict[str, Any] = {"security": {"client_key": CLIENT_KEY}} if with_key else {}
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN, **extra))
        async with aiohttp.ClientSession() as s, \
                s.get(base(daemon) + "/k", headers={"Tokenproxy-Key": CLIENT_KEY}) as resp:
            assert 200 == resp.status
        assert [] == fake_upstream.last.header("Tokenproxy-Key")

    async def test_host_is_the_upstreams(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """By default the upstream sees its own host:port in Host, not the client's."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN))
        async with aiohttp.ClientSession() as s, \
                s.get(base(daemon) + "/h", headers={"Host": "localhost:4321"}) as resp:
            assert 200 == resp.status
        assert [f"127.0.0.1:{upstream.port}"] == fake_upstream.last.header("Host")

    async def test_preserve_host(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """With preserve_host: true the client's Host goes upstream."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN, routes=[
            route("/", upstream_url(upstream, "/"), preserve_host=True)]))
        async with aiohttp.ClientSession() as s, \
                s.get(base(daemon) + "/h", headers={"Host": "localhost:4321"}) as resp:
            assert 200 == resp.status
        assert ["localhost:4321"] == fake_upstream.last.header("Host")

    async def test_no_invented_headers(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """The proxy adds no Accept, Accept-Encoding, User-Agent or Content-Type of its own."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN))
        async with connected(daemon.port()) as conn:
            resp = await conn.request(
                "POST /n HTTP/1.1\nHost: 127.0.0.1\nContent-Length: 4\n\n", b"data")
        assert 200 == resp.status
        assert b"data" == fake_upstream.last.body
        assert set() == header_names(fake_upstream.last) & {
            "accept", "accept-encoding", "user-agent", "content-type"}

    async def test_client_headers_pass_through(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """End-to-end headers the client sends reach the upstream, repeated ones in order."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN))
        headers = CIMultiDict([("X-Multi", "1"), ("X-Multi", "2"),
                               ("Accept-Encoding", "br"), ("User-Agent", "client/1.0")])
        async with aiohttp.ClientSession() as s, \
                s.get(base(daemon) + "/p", headers=headers) as resp:
            assert 200 == resp.status
        assert ["1", "2"] == fake_upstream.last.header("X-Multi")
        assert ["br"] == fake_upstream.last.header("Accept-Encoding")
        assert ["client/1.0"] == fake_upstream.last.header("User-Agent")

    async def test_preserve_host_with_connection_listed_host_still_sends_a_host(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """preserve_host: true and ``Connection: Host``: the client's Host is Connection-listed,
        yet it is kept (request_headers looks at Host before the Connection-listed names,
        proxy/rules/headers.py); dropped, it would leave the upstream an HTTP/1.1 request
        without Host (RFC 9112 section 3.2: 400). aiohttp would add one of its own."""
        up = await raw_upstream(serving(echo_target))
        daemon = await start_proxy(make_proxy, up, {"preserve_host": True})
        async with connected(daemon.port()) as conn:
            await conn.send(get("/h", "localhost", "Connection: Host"))
            resp = await conn.response()
            assert_no_secret(resp.raw)
        assert 200 == resp.status
        assert [1] == [len([v for k, v in r.headers if k.lower() == "host"]) for r in up.requests]


class TestAuthorization:
    async def test_client_authorization_replaced_once(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """The client's two Authorization headers are replaced by exactly one proxy value."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN))
        headers = CIMultiDict([("Authorization", "Bearer mine-1"),
                               ("Authorization", "Basic bWluZToy")])
        async with aiohttp.ClientSession() as s, \
                s.get(base(daemon) + "/a", headers=headers) as resp:
            assert 200 == resp.status
        assert [f"Bearer {TOKEN}"] == fake_upstream.last.header("Authorization")

    async def test_keep_passes_client_header_untouched(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """client_authorization: keep passes the client's own header and adds no token."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN, routes=[
            route("/", upstream_url(upstream, "/"), client_authorization="keep")]))
        async with aiohttp.ClientSession() as s, s.get(
            base(daemon) + "/a", headers={"Authorization": "Basic bWluZToy"}
        ) as resp:
            assert 200 == resp.status
        assert ["Basic bWluZToy"] == fake_upstream.last.header("Authorization")

    async def test_keep_without_client_header_adds_token(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """client_authorization: keep still attaches the token when the client sent none."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN, routes=[
            route("/", upstream_url(upstream, "/"), client_authorization="keep")]))
        async with aiohttp.ClientSession() as s, s.get(base(daemon) + "/a") as resp:
            assert 200 == resp.status
        assert [f"Bearer {TOKEN}"] == fake_upstream.last.header("Authorization")

    async def test_custom_header_and_value(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """header: X-Api-Key with value "Key {token}" sends that header, replacing the client's."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN, routes=[
            route("/", upstream_url(upstream, "/"), header="X-Api-Key", value="Key {token}")]))
        async with aiohttp.ClientSession() as s, \
                s.get(base(daemon) + "/a", headers={"x-api-key": "client-key"}) as resp:
            assert 200 == resp.status
        assert [f"Key {TOKEN}"] == fake_upstream.last.header("X-Api-Key")
        assert [] == fake_upstream.last.header("Authorization")


# -- responses ---------------------------------------------------------------------------------


class TestResponse:
    async def test_status_and_body_come_back(
        self, make_proxy: MakeProxy, upstream: TestServer
    ) -> None:
        """The upstream's status and body come back as sent."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream), TOKEN))
        async with aiohttp.ClientSession() as s, s.get(base(daemon) + "/status/418") as resp:
            assert 418 == resp.status
            assert b"status 418\n" == await resp.read()

    async def test_repeated_set_cookie_survive(
        self, make_proxy: MakeProxy, upstream: TestServer
    ) -> None:
        """Two Set-Cookie headers from the upstream both reach the client."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream), TOKEN))
        async with aiohttp.ClientSession() as s, s.get(base(daemon) + "/cookies") as resp:
            assert ["a=1; Path=/", "b=2; Path=/"] == resp.headers.getall("Set-Cookie")

    async def test_response_hop_by_hop_not_relayed(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """Hop-by-hop response headers (and names the upstream's Connection lists) stay behind."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN))
        async with aiohttp.ClientSession() as s, s.get(base(daemon) + "/hop") as resp:
            assert 200 == resp.status
            names = {k.lower() for k in resp.headers}
            assert "yes" == resp.headers["X-Kept"]
        assert set() == names & {"x-up-hop", "keep-alive", "proxy-agent"}

    async def test_gzip_response_not_decoded(
        self, make_proxy: MakeProxy, upstream: TestServer
    ) -> None:
        """A gzip response passes through compressed, with its Content-Length and -Encoding."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream), TOKEN))
        async with aiohttp.ClientSession(auto_decompress=False) as s, \
                s.get(base(daemon) + "/gzip") as resp:
            body = await resp.read()
            assert "gzip" == resp.headers["Content-Encoding"]
            assert str(len(body)) == resp.headers["Content-Length"]
        assert b"hello gzip " * 100 == gzip.decompress(body)

    async def test_token_echo_header_dropped(
        self, make_proxy: MakeProxy, upstream: TestServer
    ) -> None:
        """A response header that echoes the token is dropped; the others come back."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream), TOKEN))
        async with aiohttp.ClientSession() as s, s.get(base(daemon) + "/echo-token") as resp:
            assert 200 == resp.status
            assert "X-Echo" not in resp.headers
            assert "kept" == resp.headers["X-Other"]
            assert TOKEN not in json.dumps(list(resp.headers.items()))

    async def test_short_static_token_keeps_response_headers(
        self, make_proxy: MakeProxy, upstream: TestServer
    ) -> None:
        """A short token ("1") does not make the proxy drop headers that merely contain it."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), "1"))
        async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{daemon.port()}/cookies"
        ) as resp:
            assert 2 == len(resp.headers.getall("Set-Cookie"))
            assert "Date" in resp.headers

    async def test_head_has_headers_no_body(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """HEAD keeps the upstream's Content-Length, sends no body; the connection is reused."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN))
        async with connected(daemon.port()) as conn:
            head = await conn.request("HEAD /h HTTP/1.1\nHost: 127.0.0.1\n\n", head_only=True)
            after = await conn.request("GET /next HTTP/1.1\nHost: 127.0.0.1\n\n")
        assert 200 == head.status
        assert "5" == head.get("Content-Length")
        assert "HEAD" == fake_upstream.seen[0].method
        assert 200 == after.status
        assert "/next" == json.loads(after.body)["raw_path"]

    @pytest.mark.parametrize("status", [204, 304])
    async def test_no_body_status_and_connection_reused(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream, status: int
    ) -> None:
        """204 and 304 carry no body, and the same client connection serves the next request."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN))
        async with connected(daemon.port()) as conn:
            first = await conn.request(f"GET /s?status={status} HTTP/1.1\nHost: 127.0.0.1\n\n")
            after = await conn.request("GET /next HTTP/1.1\nHost: 127.0.0.1\n\n")
        assert status == first.status
        assert [] == first.header("Transfer-Encoding")
        assert first.header("Content-Length")[:1] in ([], ["0"])
        assert 200 == after.status
        assert "/next" == json.loads(after.body)["raw_path"]

    async def test_upstream_trailers_never_become_response_headers(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """llhttp reports trailer fields through the same callback as header fields. Added to the
        response head's list, they would go out as response headers whenever the whole chunked
        response arrives in one read (any small one) -- here a Set-Cookie, which RFC 9110
        section 6.5.1 forbids in trailers and no client applies from one, and a second
        Content-Type. UpstreamConn.on_header (proxy/fast_path/upstream.py) drops fields that come
        after the head; aiohttp drops trailers too."""
        def answer(req: object) -> bytes:
            return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                    b"Transfer-Encoding: chunked\r\n"
                    b"Trailer: Set-Cookie, Content-Type, X-Trailer\r\n"
                    b"\r\n2\r\nhi\r\n0\r\nSet-Cookie: sid=planted\r\n"
                    b"Content-Type: text/html\r\nX-Trailer: 1\r\n\r\n")

        up = await raw_upstream(serving(answer))
        daemon = await start_proxy(make_proxy, up)
        async with connected(daemon.port()) as conn:
            await conn.send(get("/t"))
            resp = await conn.response()
        assert (200, b"hi") == (resp.status, resp.body)
        assert [] == resp.header("Set-Cookie") + resp.header("X-Trailer")
        assert ["text/plain"] == resp.header("Content-Type")


class TestStreaming:
    @pytest.mark.slow
    async def test_sse_events_flushed_as_sent(
        self, make_proxy: MakeProxy, upstream: TestServer
    ) -> None:
        """Server-sent events arrive as the upstream sends them, not all at the end."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream), TOKEN))
        arrivals: list[float] = []
        async with aiohttp.ClientSession(timeout=QUICK) as s:
            start = time.monotonic()
            async with s.get(base(daemon) + "/sse?gap=0.3") as resp:
                assert "text/event-stream" == resp.headers["Content-Type"]
                async for line in resp.content:
                    if line.startswith(b"data:"):
                        arrivals.append(time.monotonic() - start)
            end = time.monotonic() - start
        assert 3 == len(arrivals)
        assert arrivals[0] < 0.25
        assert arrivals[1] - arrivals[0] > 0.2
        assert arrivals[2] - arrivals[1] > 0.2
        assert end - arrivals[0] > 0.5

    async def test_large_download_intact(
        self, make_proxy: MakeProxy, upstream: TestServer
    ) -> None:
        """A 20 MiB download streams through whole, with its Content-Length."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream), TOKEN))
        n = 20 * 1024 * 1024
        digest = hashlib.sha256()
        size = 0
        async with aiohttp.ClientSession(timeout=QUICK) as s, \
                s.get(base(daemon) + f"/big?n={n}") as resp:
            assert str(n) == resp.headers["Content-Length"]
            async for chunk in resp.content.iter_any():
                digest.update(chunk)
                size += len(chunk)
        assert n == size
        assert hashlib.sha256(b"x" * n).hexdigest() == digest.hexdigest()


# -- header bytes that are not UTF-8 ----------------------------------------------------------


def split_token() -> str:
    """The token with a byte that is not UTF-8 in its middle (latin-1 text of the line)."""
    return TOKEN[:8] + "\xff" + TOKEN[8:]


class TestHeaderBytes:
    """Header bytes that are not UTF-8 (obs-text), on both paths: relayed as they are by the
    fast path, dropped whole by the aiohttp path (aiohttp writes header text as UTF-8 and
    would drop a stray byte alone); and the token hidden in them, or in a field name, never
    reaches the client."""

    async def test_a_token_split_by_a_non_utf8_byte_in_a_response_header_is_not_reassembled(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw,
    ) -> None:
        """An upstream that puts a byte that is not UTF-8 inside the token in a response field
        (so the echo check on bytes does not see the token): the fast path relays the bytes as
        they are (no token); the aiohttp path drops the field whole -- aiohttp would have dropped
        the stray byte alone and joined the token again."""
        up = await raw_upstream(serving(lambda r: response(
            b"ok", "200 OK", "X-Echo: " + split_token(), "X-Other: kept")))
        daemon = await start_proxy(make_proxy, up)
        resp = await first_answer(daemon.port(), get("/x"))
        assert 200 == resp.status
        assert ["kept"] == resp.header("X-Other")
        leaked = TOKEN.encode() in resp.raw
        assert not leaked, "the token reached the client"

    async def test_a_token_split_by_a_non_utf8_byte_in_the_reason_phrase_is_not_reassembled(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw,
    ) -> None:
        """The same in the reason phrase: the aiohttp path sends the standard phrase instead."""
        up = await raw_upstream(serving(lambda r: response(b"ok", "403 " + split_token())))
        daemon = await start_proxy(make_proxy, up)
        resp = await first_answer(daemon.port(), get("/x"))
        assert 403 == resp.status
        leaked = TOKEN.encode() in resp.raw
        assert not leaked, "the token reached the client"

    async def test_a_response_field_named_after_the_token_does_not_reach_the_client(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw,
    ) -> None:
        """The echo check looks at field names too: an upstream that names a field after the
        token does not get it to the client, on either path."""
        up = await raw_upstream(serving(lambda r: response(
            b"ok", "200 OK", f"X-Seen-{TOKEN}: 1", "X-Other: kept")))
        daemon = await start_proxy(make_proxy, up)
        resp = await first_answer(daemon.port(), get("/x"))
        assert ["kept"] == resp.header("X-Other")
        leaked = TOKEN.encode() in resp.raw
        assert not leaked, "the token reached the client"

    async def test_header_bytes_that_are_not_utf8_pass_unchanged_or_not_at_all(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw, serving_path: str,
    ) -> None:
        """RFC 9110 field values may hold obs-text (bytes 0x80-0xFF: latin-1 filenames in
        Content-Disposition, legacy cookies). The fast path relays them byte for byte. aiohttp
        writes header text as UTF-8 and silently drops what is not, so the aiohttp path drops
        such a field whole -- never altered -- and counts the request side
        (tokenproxy_request_headers_dropped_total{reason="not_utf8"})."""
        up = await raw_upstream(serving(lambda r: response(
            b"ok", "200 OK", "Content-Disposition: attachment; filename=\"caf\xe9.txt\"")))
        daemon = await start_proxy(make_proxy, up)
        resp = await first_answer(daemon.port(), get("/x", "localhost", "X-Name: caf\xe9"))
        sent = [r.get("X-Name") for r in up.requests]
        disposition = resp.header("Content-Disposition")
        if serving_path == "fast":
            assert ["caf\xe9"] == sent
            assert ['attachment; filename="caf\xe9.txt"'] == disposition
        else:
            assert [None] == sent
            assert [] == disposition
            assert 1.0 == count(daemon, "tokenproxy_request_headers_dropped_total",
                                reason="not_utf8")


# -- redirects ---------------------------------------------------------------------------------


class TestRedirects:
    async def test_redirect_elsewhere_passed_back_unchanged(
        self, make_proxy: MakeProxy, upstream: TestServer,
        fake_upstream: FakeUpstream, aiohttp_server: AiohttpServer
    ) -> None:
        """A 302 to another origin comes back unchanged and nothing is fetched there."""
        other = FakeUpstream()
        other.server = await aiohttp_server(other.app())
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN))
        target = other.url("/landing?x=1")
        async with aiohttp.ClientSession() as s, s.get(
            base(daemon) + "/redirect", params={"to": target}, allow_redirects=False
        ) as resp:
            assert 302 == resp.status
            assert target == resp.headers["Location"]
        assert [] == other.seen
        assert 1 == len(fake_upstream.seen)

    @pytest.mark.parametrize("absolute", [False, True])
    async def test_redirect_inside_upstream_rewritten(
        self, make_proxy: MakeProxy, upstream: TestServer,
        fake_upstream: FakeUpstream, absolute: bool
    ) -> None:
        """A Location inside the route's upstream becomes the proxy path (prefix + rest + query)."""
        daemon = await make_proxy(proxy_config(
            upstream_url(upstream, "/"), TOKEN,
            routes=[route("/api", upstream_url(upstream, "/v1/"))]))
        location = (upstream_url(upstream, "/v1/next?page=2") if absolute else "/v1/next?page=2")
        async with aiohttp.ClientSession() as s, s.get(
            base(daemon) + "/api/redirect", params={"to": location}, allow_redirects=False
        ) as resp:
            assert 302 == resp.status
            assert "/api/next?page=2" == resp.headers["Location"]
        assert ["/v1/redirect"] == [seen.raw_path.split("?")[0] for seen in fake_upstream.seen]

    async def test_location_rewritten_with_non_latin1_characters(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """A Location inside the route's upstream carrying UTF-8 is rewritten to the proxy path
        and goes out as UTF-8 (response_headers, proxy/rules/headers.py): encoded as latin-1 it
        would raise UnicodeEncodeError and the fast path answer 500 internal. aiohttp sends the
        302 (its headers are written as UTF-8), and so must the fast path."""
        location = "/a/x/日本".encode()
        up = await raw_upstream(serving(lambda req: (
            b"HTTP/1.1 302 Found\r\nContent-Length: 0\r\nLocation: http://127.0.0.1:%d%b\r\n\r\n"
            % (up.port, location))))
        routes = [{"prefix": "/", "upstream": up.url("/a"), "provider": "api"}]
        daemon = await make_proxy(proxy_config(up.url(), TOKEN, routes=routes))
        async with connected(daemon.port()) as conn:
            await conn.send(get("/go"))
            resp = await conn.response()
        assert 302 == resp.status, resp.body
        assert "/x/日本".encode() == (resp.get("Location") or "").encode("latin-1")


# -- upstream failures -------------------------------------------------------------------------


class TestUpstreamErrors:
    async def test_connection_refused_is_502(self, make_proxy: MakeProxy) -> None:
        """An unreachable upstream gives a 502 problem (upstream_unreachable), counted connect."""
        daemon = await make_proxy(proxy_config(f"http://127.0.0.1:{closed_port()}/", TOKEN))
        async with aiohttp.ClientSession() as s, s.get(base(daemon) + "/x") as resp:
            assert 502 == resp.status
            assert "application/problem+json" == resp.content_type
            assert "upstream_unreachable" == resp.headers["Tokenproxy-Error"]
            doc = await resp.json(content_type=None)
        assert doc["type"].endswith("upstream_unreachable")
        assert 502 == doc["status"]
        assert 1.0 == daemon.registry.get_sample_value(
            "tokenproxy_upstream_errors_total", {"route": "/", "kind": "connect"})

    @pytest.mark.slow
    async def test_slow_upstream_is_504(
        self, make_proxy: MakeProxy, upstream: TestServer
    ) -> None:
        """An upstream slower than the route timeout gives a 504 problem, counted timeout."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream), TOKEN, routes=[
            route("/", upstream_url(upstream), timeout=0.3)]))
        start = time.monotonic()
        async with aiohttp.ClientSession(timeout=QUICK) as s, \
                s.get(base(daemon) + "/slow?delay=2") as resp:
            assert 504 == resp.status
            assert "application/problem+json" == resp.content_type
            assert "upstream_timeout" == resp.headers["Tokenproxy-Error"]
            doc = await resp.json(content_type=None)
        assert time.monotonic() - start < 1.5
        assert doc["type"].endswith("upstream_timeout")
        assert 1.0 == daemon.registry.get_sample_value(
            "tokenproxy_upstream_errors_total", {"route": "/", "kind": "timeout"})

    async def test_truncated_upstream_body_looks_truncated(
        self, make_proxy: MakeProxy, upstream: TestServer
    ) -> None:
        """An upstream reset mid-body (Content-Length) reaches the client as a failed body."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream), TOKEN))
        async with aiohttp.ClientSession(timeout=QUICK) as s, \
                s.get(base(daemon) + "/truncate") as resp:
            assert 200 == resp.status
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
        await wait_for(lambda: daemon.registry.get_sample_value(
            "tokenproxy_upstream_errors_total", {"route": "/", "kind": "reset"}) == 1.0,
            "the reset counted", 2.0)

    async def test_truncated_chunked_body_looks_truncated(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """An upstream reset mid-way through a chunked body never looks like a complete body."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN))
        async with aiohttp.ClientSession(timeout=QUICK) as s, \
                s.get(base(daemon) + "/truncate-chunked") as resp:
            assert 200 == resp.status
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()

    async def test_environment_proxy_ignored(
        self, make_proxy: MakeProxy, upstream: TestServer,
        fake_upstream: FakeUpstream, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """HTTP_PROXY / HTTPS_PROXY in the environment do not reroute upstream requests."""
        for name in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY",
                     "all_proxy"):
            monkeypatch.setenv(name, "http://127.0.0.1:9")
        monkeypatch.delenv("NO_PROXY", raising=False)
        monkeypatch.delenv("no_proxy", raising=False)
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN))
        async with aiohttp.ClientSession() as s, s.get(base(daemon) + "/env") as resp:
            assert 200 == resp.status
        assert "/env" == fake_upstream.last.raw_path

    async def test_a_head_answered_by_tokenproxy_gets_no_body(self, make_proxy: MakeProxy) -> None:
        """A HEAD request that tokenproxy answers itself (here 502 upstream_unreachable; 503
        token_unavailable alike) gets the head alone, on a connection kept alive. A HEAD response
        has no body (RFC 9110 section 9.3.2): body bytes would be read as the start of the next
        response on that connection."""
        daemon = await make_proxy(proxy_config(f"http://127.0.0.1:{closed_port()}/", TOKEN))
        async with connected(daemon.port()) as conn:
            await conn.send(get("/x", "localhost", method="HEAD"))
            first = await conn.response(head_only=True)
            assert 502 == first.status
            keep = first.get("Connection") != "close"
            await conn.send(get("/y"))
            if keep:
                try:
                    second = await conn.response()
                except ValueError as exc:   # the status line was the HEAD answer's body
                    raise AssertionError(f"the next response is garbage: {exc}") from None
                assert 502 == second.status
            else:
                assert await conn.wait_closed(1.0) is not None
                assert b"" == conn.trailing, "HEAD answered with a body"


# -- observability and pooling -------------------------------------------------------------


class TestObservability:
    async def test_request_metrics(self, make_proxy: MakeProxy, upstream: TestServer) -> None:
        """Requests are counted by route, method and code, timed by route; inflight returns to 0."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream), TOKEN))
        async with aiohttp.ClientSession() as s:
            for _ in range(2):
                async with s.get(base(daemon) + "/echo") as resp:
                    await resp.read()
            async with s.post(base(daemon) + "/status/404", data=b"x") as resp:
                await resp.read()
        reg = daemon.registry

        def counted() -> bool:
            return 1.0 == reg.get_sample_value(
                "tokenproxy_requests_total", {"route": "/", "method": "POST", "code": "404"})

        await wait_for(counted, "the POST counted", 2.0)
        assert 2.0 == reg.get_sample_value(
            "tokenproxy_requests_total", {"route": "/", "method": "GET", "code": "200"})
        assert 3.0 == reg.get_sample_value(
            "tokenproxy_request_duration_seconds_count", {"route": "/"})
        assert 0.0 == reg.get_sample_value("tokenproxy_inflight_requests")

    async def test_request_log_event(
        self, make_proxy: MakeProxy, upstream: TestServer, logs: CapturedLogs
    ) -> None:
        """One `request` event: route, method, path without query, status, duration, bytes."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream), TOKEN))
        async with aiohttp.ClientSession() as s, \
                s.get(base(daemon) + "/status/201?secretquery=v") as resp:
            body = await resp.read()
        event = await request_event(logs, 2.0)
        assert {"route": "/", "method": "GET", "path": "/status/201", "status": 201,
                "bytes": len(body), "retried": False} == {
            k: event[k] for k in ("route", "method", "path", "status", "bytes", "retried")}
        assert isinstance(event["duration_ms"], int | float)
        assert event["duration_ms"] >= 0
        assert "secretquery" not in logs.text

    async def test_request_log_counts_tokenproxys_own_error_bodies(
        self, make_proxy: MakeProxy, upstream: TestServer, logs: CapturedLogs
    ) -> None:
        """An answer of tokenproxy's own (a 404 problem: no route) counts its body's bytes."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream), TOKEN, routes=[
            {"prefix": "/api", "upstream": upstream_url(upstream), "provider": "api"}]))
        async with aiohttp.ClientSession() as s, s.get(base(daemon) + "/nowhere") as resp:
            assert 404 == resp.status
            body = await resp.read()
        event = await request_event(logs, 2.0)
        assert (404, len(body)) == (event["status"], event["bytes"])
        assert len(body) > 0

    @pytest.mark.slow
    async def test_a_head_problem_answer_logs_no_body_bytes(
        self, make_proxy: MakeProxy, logs: CapturedLogs,
    ) -> None:
        """A HEAD answered by tokenproxy itself sends no body, and the access log's ``bytes``
        says so, on both paths."""
        daemon = await make_proxy(proxy_config(f"http://127.0.0.1:{closed_port()}/", TOKEN))
        async with connected(daemon.port()) as conn:
            await conn.send(get("/x", "localhost", method="HEAD"))
            assert 502 == (await conn.response(head_only=True)).status
            await conn.wait_closed(0.2)
            assert b"" == conn.trailing
        event = await request_event(logs)
        assert (502, 0) == (event["status"], event["bytes"])

    @pytest.mark.parametrize(
        ("method", "first"),
        [("GET", "/one"), ("GET", "/one?status=204"), ("GET", "/one?status=304")],
    )
    async def test_upstream_connection_pooled(
        self, make_proxy: MakeProxy, upstream: TestServer,
        fake_upstream: FakeUpstream, method: str, first: str
    ) -> None:
        """Two sequential requests reach the upstream over one pooled TCP connection."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN))
        async with aiohttp.ClientSession() as s:
            async with s.request(method, base(daemon) + first) as resp:
                await resp.read()
            async with s.get(base(daemon) + "/two") as resp:
                await resp.read()
        assert 2 == len(fake_upstream.ports)
        assert fake_upstream.ports[0] == fake_upstream.ports[1]

    async def test_a_head_request_closes_its_upstream_connection(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """HEAD goes with Connection: close and its connection carries nothing after it
        (servers answering HEAD with their GET handler may send a body anyway)."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN))
        async with aiohttp.ClientSession() as s:
            async with s.head(base(daemon) + "/one") as resp:
                await resp.read()
            async with s.get(base(daemon) + "/two") as resp:
                await resp.read()
        assert 2 == len(set(fake_upstream.ports))
        assert ["close"] == fake_upstream.seen[0].header("Connection")


async def test_no_content_type_is_invented(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """A body the upstream sent without Content-Type comes back without one; one it typed
    keeps its type."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if b"/typed" in head.split(b"\r\n", 1)[0]:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                             b"Content-Length: 5\r\n\r\nhello")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
            await writer.drain()

    up = await raw_upstream(answer)
    daemon = await make_proxy(proxy_config(up.url(), TOKEN))
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{daemon.port()}/bare") as resp:
            assert "hello" == await resp.text()
            assert "Content-Type" not in resp.headers
        async with s.get(f"http://127.0.0.1:{daemon.port()}/typed") as resp:
            assert "text/plain" == resp.headers["Content-Type"]


async def test_no_server_header_is_invented(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """An answer the upstream sent without Server comes back without one (aiohttp's would name
    its version), one it sent keeps it; tokenproxy's own problem answers carry none either.
    A chunked upload takes the aiohttp path on a fast-path daemon too."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            if b"chunked" in head.lower():
                while (await reader.readline()) not in (b"0\r\n", b""):
                    pass
                await reader.readline()
            server = b"Server: upstream/1\r\n" if b"/named" in head.split(b"\r\n", 1)[0] else b""
            writer.write(b"HTTP/1.1 200 OK\r\n" + server + b"Content-Length: 2\r\n\r\nok")
            await writer.drain()

    up = await raw_upstream(answer)
    daemon = await make_proxy(proxy_config(up.url(), TOKEN))
    base = f"http://127.0.0.1:{daemon.port()}"

    async def chunks() -> AsyncIterator[bytes]:
        yield b"data"

    async with aiohttp.ClientSession(skip_auto_headers=["User-Agent"]) as s:
        async with s.get(base + "/bare") as resp:
            assert "Server" not in resp.headers
        async with s.post(base + "/bare", data=chunks()) as resp:
            assert (200, None) == (resp.status, resp.headers.get("Server"))
        async with s.get(base + "/named") as resp:
            assert "upstream/1" == resp.headers["Server"]
        async with s.get(base + "//double") as resp:
            assert 400 == resp.status
            assert "Server" not in resp.headers


async def test_reason_phrase_echoing_the_token_is_replaced(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """An upstream that echoes the token in its reason phrase: the client gets the status with
    the standard phrase, and the token nowhere in the answer."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        token = next(line.split(b" ", 2)[2] for line in head.split(b"\r\n")
                     if line.lower().startswith(b"authorization: bearer "))
        writer.write(b"HTTP/1.1 403 Token " + token + b" refused\r\nContent-Length: 2\r\n\r\nno")
        await writer.drain()
        writer.close()

    up = await raw_upstream(answer)
    daemon = await make_proxy(proxy_config(up.url(), TOKEN))
    reader, writer = await asyncio.open_connection("127.0.0.1", daemon.port())
    writer.write(b"GET /x HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    raw = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert raw.startswith(b"HTTP/1.1 403 Forbidden\r\n"), raw[:80]
    assert TOKEN.encode() not in raw
