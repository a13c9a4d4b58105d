"""Request-line and header attacks over a raw socket: targets, dot segments, smuggling.

Each refused request is answered 400 without the upstream hearing of it, and framing errors
close the connection so that nothing after them is ever read as a second request.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.helpers.config import MakeProxy, proxy_config, upstream_url
from tests.helpers.fakes import TOKEN, FakeUpstream, assert_no_secret
from tests.helpers.rawhttp import RawConnection, assert_problem, exchange, first_answer, get
from tests.helpers.rawupstream import connected
from tokenproxy.daemon import Daemon

# Every test here runs against both request paths (tests/conftest.py).
pytestmark = pytest.mark.both_paths

# Appended after every malformed request: it must never reach the upstream.
SMUGGLED = b"GET /status/299 HTTP/1.1\r\nHost: localhost\r\n\r\n"


async def start(make_proxy: MakeProxy, upstream: TestServer, **overrides: object) -> Daemon:
    """Routes /api -> <upstream>/up/ and / -> <upstream>/root/."""
    routes = [
        {"prefix": "/api", "upstream": upstream_url(upstream, "/up/"), "provider": "api"},
        {"prefix": "/", "upstream": upstream_url(upstream, "/root/"), "provider": "api"},
    ]
    raw = proxy_config(upstream_url(upstream, "/"), TOKEN, routes=routes)
    raw.update(overrides)
    return await make_proxy(raw)


async def assert_refused(port: int, request: bytes, fake_upstream: FakeUpstream) -> None:
    """400 problem+json, the connection closed after it, and the upstream never contacted."""
    resp, closed = await exchange(port, request)
    assert_problem(resp, 400, "bad_request")
    assert closed
    assert [] == fake_upstream.seen


class TestTargets:
    @pytest.mark.parametrize(
        "request_line",
        [
            "GET http://evil.example/steal HTTP/1.1",
            "GET https://evil.example/steal HTTP/1.1",
            "GET http://localhost/api/x HTTP/1.1",
            "CONNECT evil.example:443 HTTP/1.1",
            "CONNECT localhost:443 HTTP/1.1",
            "OPTIONS * HTTP/1.1",
            "TRACE /api/x HTTP/1.1",
            "TRACK /api/x HTTP/1.1",
            "GET //evil.example/x HTTP/1.1",
            "GET ///evil.example/x HTTP/1.1",
            "GET evil.example/x HTTP/1.1",
        ],
    )
    async def test_non_origin_form_and_refused_methods(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        request_line: str,
    ) -> None:
        """Absolute-form, authority-form, asterisk-form, //host, CONNECT, TRACE, TRACK: 400."""
        daemon = await start(make_proxy, upstream)
        await assert_refused(
            daemon.port(), f"{request_line}\r\nHost: localhost\r\n\r\n".encode(), fake_upstream)

    async def test_absolute_form_naming_the_real_upstream(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """An absolute-form target naming the route's own upstream is refused as well."""
        daemon = await start(make_proxy, upstream)
        target = upstream_url(upstream, "/up/x")
        await assert_refused(daemon.port(), get(target, "localhost"), fake_upstream)

    @pytest.mark.parametrize(
        "path",
        [
            "/api/../admin",
            "/api/%2e%2e/admin",
            "/api/%2E%2e%2Fadmin",
            "/api/..%2fadmin",
            "/api/.%2e/x",
            "/api/%2e./x",
            "/api/./x",
            "/api/x/..",
            "/api/..",
            "/api/x/%2e",
            "/api/..\\admin",
            "/api/..%5cadmin",
            "/api/%5c..%5cadmin",
            "/api/%2e%2e%5cadmin",
            "/api/%252e%252e%252fadmin",
            "/api/%25252e%25252e/x",
            "/api/%2525252e%2525252e/admin",            # four-fold percent-encoding
            "/api/%" + "25" * 9 + "2e/x",                # deeper than any decoder goes: refused
            "/api/%u002e%u002e/admin",                  # IIS-style %u
            "/api/%U002E%u002E/admin",
            "/api/%25u002e%25u002e/admin",
            "/api/..%u002fadmin",
            "/api/%ef%bc%8e%ef%bc%8e/admin",            # full-width dots (U+FF0E)
            "/api/..%ef%bc%8fadmin",                    # full-width solidus
            "/api/%e2%80%a5/admin",                     # two-dot leader (NFKC: "..")
            "/api/%ef%b9%92%ef%b9%92/admin",            # small full stops (U+FE52)
            "/api/%25ef%25bc%258e%25ef%25bc%258e/admin",
            "/api/%c0%ae%c0%ae/admin",
            "/api/%C0%AE%C0%AE%C0%AFadmin",
            "/api/%e0%80%ae%e0%80%ae/x",
            "/api/..;/admin",
            "/api/.;x/admin",
            "/api/%2e%2e;jsessionid=1/admin",
            "/api/a%00b",
            "/api/a%2500b",
            "/api/x#frag",
            "/api/x?q=1#frag",
            "/../x",
            "/%2e%2e/x",
            "/..",
            "/x/../../api/y",
        ],
    )
    async def test_dot_segments_in_any_encoding(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        path: str,
    ) -> None:
        """A . or .. segment in any encoding, an encoded NUL or a fragment: 400."""
        daemon = await start(make_proxy, upstream)
        await assert_refused(daemon.port(), get(path), fake_upstream)

    @pytest.mark.parametrize(
        "char", [b"\x00", b"\x01", b"\x08", b"\t", b"\x0b", b"\x0c", b"\x1b", b"\x7f", b" "],
    )
    async def test_raw_control_character_in_target(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        char: bytes,
    ) -> None:
        """A raw NUL, other control character or stray space inside the target: 400."""
        daemon = await start(make_proxy, upstream)
        request = b"GET /api/a" + char + b"b HTTP/1.1\r\nHost: localhost\r\n\r\n"
        await assert_refused(daemon.port(), request, fake_upstream)

    @pytest.mark.parametrize(
        ("path", "upstream_path"),
        [
            ("/api/a.b/c.json", "/up/a.b/c.json"),
            ("/api/%2Fencoded", "/up/%2Fencoded"),
            ("/api/a%2Fb%2fc", "/up/a%2Fb%2fc"),
            ("/api/.well-known/x", "/up/.well-known/x"),
            ("/api/...", "/up/..."),
            ("/api/..x/y", "/up/..x/y"),
            ("/api/x?next=../../admin", "/up/x?next=../../admin"),
            ("/api/x?a=%ZZ&b=;", "/up/x?a=%ZZ&b=;"),
            ("/api", "/up/"),
            ("/other/x", "/root/other/x"),
        ],
    )
    async def test_harmless_dots_and_encoded_slash_pass(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        path: str, upstream_path: str,
    ) -> None:
        """Dots inside names, %2F and dots in the query are forwarded byte for byte."""
        daemon = await start(make_proxy, upstream)
        resp = await first_answer(daemon.port(), get(path))
        assert resp.get("Tokenproxy-Error") is None
        assert [upstream_path] == [s.raw_path for s in fake_upstream.seen]


class TestFraming:
    @pytest.mark.parametrize(
        "request_bytes",
        [
            pytest.param(b"POST /api/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", id="cl-te"),
            pytest.param(b"POST /api/x HTTP/1.1\r\nHost: localhost\r\n"
                         b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
                         id="te-cl"),
            pytest.param(b"POST /api/x HTTP/1.1\r\nHost: localhost\r\n"
                         b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n", id="te-xchunked"),
            pytest.param(b"POST /api/x HTTP/1.1\r\nHost: localhost\r\n"
                         b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
                         id="te-chunked-identity"),
            pytest.param(b"POST /api/x HTTP/1.1\r\nHost: localhost\r\n"
                         b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n"
                         b"0\r\n\r\n", id="te-twice"),
            pytest.param(b"POST /api/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n"
                         b"Content-Length: 3\r\n\r\nabc", id="cl-twice-different"),
            pytest.param(b"POST /api/x HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n"
                         b"Content-Length: 2\r\n\r\nab", id="cl-twice-same"),
            pytest.param(b"POST /api/x HTTP/1.1\r\nHost: localhost\r\n"
                         b"Content-Length: 1, 1\r\n\r\na", id="cl-list"),
            pytest.param(b"POST /api/x HTTP/1.1\r\nHost: localhost\r\n"
                         b"Content-Length: +2\r\n\r\nab", id="cl-plus"),
            pytest.param(b"POST /api/x HTTP/1.1\r\nHost: localhost\r\n"
                         b"Content-Length: -2\r\n\r\nab", id="cl-minus"),
            pytest.param(b"POST /api/x HTTP/1.1\r\nHost: localhost\r\n"
                         b"Content-Length: 0x2\r\n\r\nab", id="cl-hex"),
            pytest.param(b"GET /api/x HTTP/1.1\r\nHost: localhost\r\nX-A: a\rb\r\n\r\n",
                         id="bare-cr"),
            pytest.param(b"GET /api/x HTTP/1.1\r\nHost: localhost\nX-A: b\r\n\r\n",
                         id="bare-lf-header"),
            pytest.param(b"GET /api/x HTTP/1.1\nHost: localhost\r\n\r\n",
                         id="bare-lf-request-line"),
            pytest.param(b"GET /api/x HTTP/1.1\r\nHost: localhost\r\nX-A: a\r\n b\r\n\r\n",
                         id="obs-fold"),
            pytest.param(b"GET /api/x HTTP/1.1\r\nHost: localhost\r\nX-A: a\r\n\tb\r\n\r\n",
                         id="obs-fold-tab"),
            pytest.param(b"GET /api/x HTTP/1.1\r\nHost: localhost\r\nX-A: a\x00b\r\n\r\n",
                         id="nul-in-value"),
            pytest.param(b"GET /api/x HTTP/1.1\r\nHost: localhost\r\nX-A : b\r\n\r\n",
                         id="space-before-colon"),
            pytest.param(b"POST /api/x HTTP/1.1\r\nHost: localhost\r\n"
                         b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
                         id="space-before-colon-te"),
            pytest.param(b"GET /api/x HTTP/1.1\r\nHost: localhost\r\nX A: b\r\n\r\n",
                         id="space-in-name"),
            pytest.param(b"POST /api/x HTTP/1.1\r\nHost: localhost\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
                         id="chunk-size-not-hex"),
            pytest.param(b"POST /api/x HTTP/1.1\r\nHost: localhost\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n-5\r\nhello\r\n0\r\n\r\n",
                         id="chunk-size-negative"),
            pytest.param(b"POST /api/x HTTP/1.1\r\nHost: localhost\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n0x5\r\nhello\r\n0\r\n\r\n",
                         id="chunk-size-0x"),
            pytest.param(b"POST /api/x HTTP/1.1\r\nHost: localhost\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
                         id="chunk-size-bare-lf"),
            pytest.param(b"POST /api/x HTTP/1.1\r\nHost: localhost\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
                         id="chunk-data-too-long"),
            pytest.param(b"get /api/x HTTP/1.1\r\nHost: localhost\r\n\r\n", id="lowercase-get"),
            pytest.param(b"GET /api/x HTTP/1.1 x\r\nHost: localhost\r\n\r\n",
                         id="junk-after-version"),
            pytest.param(b"GET /api/x HTTP/9.9\r\nHost: localhost\r\n\r\n", id="bad-version"),
        ],
    )
    async def test_malformed_request_is_400_and_closes(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        request_bytes: bytes,
    ) -> None:
        """Malformed framing gets 400, the connection closes, no request reaches the upstream."""
        daemon = await start(make_proxy, upstream)
        async with connected(daemon.port()) as conn:
            await conn.send(request_bytes + SMUGGLED)
            resp = await conn.response()
            assert_problem(resp, 400, "bad_request")
            assert_no_secret(resp.raw)
            assert await conn.wait_closed() is not None
            assert b"" == conn.trailing   # no answer to the smuggled request
        assert [] == fake_upstream.seen

    @pytest.mark.slow
    @pytest.mark.parametrize(
        ("retry_on", "upstream_saw"), [([401], []), ([], ["/upload"])],
        ids=["buffered", "streamed"],
    )
    @pytest.mark.parametrize(
        "bad_chunk", [b"zz\r\nhello\r\n0\r\n\r\n", b"5\r\nhelloXX0\r\n\r\n"],
        ids=["chunk-size-not-hex", "chunk-data-too-long"],
    )
    async def test_bad_chunk_after_head_was_read(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        bad_chunk: bytes, retry_on: list[int], upstream_saw: list[str],
    ) -> None:
        """A bad chunk arriving after the head was dispatched still gets 400 and a close."""
        # A buffered body fails before the upstream is contacted; a streamed one has sent its
        # head already and is cut off there. The smuggled request never goes anywhere.
        daemon = await start(make_proxy, upstream, routes=[
            {"prefix": "/", "upstream": upstream_url(upstream, "/"), "provider": "api",
             "retry_on": retry_on}])
        async with connected(daemon.port()) as conn:
            await conn.send(b"POST /upload HTTP/1.1\r\nHost: localhost\r\n"
                            b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            await asyncio.sleep(0.1)
            await conn.send(bad_chunk + SMUGGLED)
            resp = await conn.response()
            assert_problem(resp, 400, "bad_request")
            assert await conn.wait_closed() is not None
            assert b"" == conn.trailing   # one answer, nothing for the smuggled request
        assert upstream_saw == [s.raw_path for s in fake_upstream.seen]

    async def test_pipelined_requests_answered_in_order(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """Two valid pipelined requests are both forwarded and answered in order."""
        daemon = await start(make_proxy, upstream, routes=[
            {"prefix": "/", "upstream": upstream_url(upstream, "/"), "provider": "api"}])
        async with connected(daemon.port()) as conn:
            await conn.send(get("/status/201") + get("/status/202"))
            first = await conn.response()
            second = await conn.response()
            assert_no_secret(first.raw + second.raw)
        assert (201, 202) == (first.status, second.status)
        assert ["/status/201", "/status/202"] == [s.raw_path for s in fake_upstream.seen]

    async def test_bad_request_after_a_good_one_on_the_same_connection(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """A kept-alive connection: a good request is answered, a malformed next one 400s."""
        daemon = await start(make_proxy, upstream, routes=[
            {"prefix": "/", "upstream": upstream_url(upstream, "/"), "provider": "api"}])
        async with connected(daemon.port()) as conn:
            await conn.send(get("/status/201"))
            first = await conn.response()
            await conn.send(b"GET /status/202 HTTP/1.1\r\nHost: localhost\r\nX-A : b\r\n\r\n"
                            + SMUGGLED)
            second = await conn.response()
            assert await conn.wait_closed() is not None
            assert b"" == conn.trailing
            assert_no_secret(first.raw + second.raw)
        assert 201 == first.status
        assert_problem(second, 400, "bad_request")
        assert ["/status/201"] == [s.raw_path for s in fake_upstream.seen]

    async def test_pipelined_bad_request_never_reaches_upstream(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """A good and a malformed request in one packet: a 400, a close, nothing after it."""
        # aiohttp's C parser drops the good request parsed in the same read as the error, so
        # only the 400 comes back; what matters is that nothing from the malformed request on
        # reaches the upstream.
        daemon = await start(make_proxy, upstream, routes=[
            {"prefix": "/", "upstream": upstream_url(upstream, "/"), "provider": "api"}])
        conn = await RawConnection.open(daemon.port())
        responses = []
        try:
            await conn.send(get("/status/201")
                            + b"GET /status/202 HTTP/1.1\r\nHost: localhost\r\nX-A : b\r\n\r\n"
                            + SMUGGLED)
            while True:
                try:
                    responses.append(await conn.response())
                except EOFError:
                    break
        finally:
            await conn.close()
        assert 400 == responses[-1].status
        assert {201} >= {r.status for r in responses[:-1]}
        assert {"/status/201"} >= {s.raw_path for s in fake_upstream.seen}


# -- several kinds of request on one connection -----------------------------------------------


async def test_drain_wait_does_not_block_100_continue_or_a_websocket_after_a_request(
    make_proxy: MakeProxy, upstream: TestServer
) -> None:
    """On one connection: an answer, then an Expect: 100-continue upload (its interim
    answer comes before the body is sent), then a WebSocket upgrade; all go through."""
    daemon = await make_proxy(proxy_config(upstream_url(upstream), TOKEN))
    async with connected(daemon.port()) as conn:
        await conn.send(get("/echo/a", "localhost", "Connection: keep-alive",
                            version="HTTP/1.0"))
        assert 200 == (await conn.response()).status
        await conn.send(get("/upload", "localhost", "Content-Length: 5",
                            "Expect: 100-continue", method="POST"))
        assert 100 == (await conn.response()).status
        await conn.send(b"hello")
        assert 200 == (await conn.response()).status
        await conn.send(get("/echo/b"))
        assert 200 == (await conn.response()).status
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.get(f"http://127.0.0.1:{daemon.port()}/echo/c") as resp:
            assert 200 == resp.status
            await resp.read()
        async with session.ws_connect(f"http://127.0.0.1:{daemon.port()}/ws") as ws:
            await ws.send_str("hi")
            msg = await asyncio.wait_for(ws.receive(), 2)
            assert "echo:hi" == msg.data
