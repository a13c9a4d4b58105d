"""Hostile peers on every side: a faulty upstream speaking raw TCP (tests/helpers/rawupstream.py),
clients that hang up or bend HTTP/1.x, confused-deputy inputs against a second "evil" origin,
and a slow token endpoint under a queue of requests."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.helpers.config import MakeProxy, proxy_config, upstream_url
from tests.helpers.fakes import SECRETS, TOKEN, FakeUpstream, JumpClock, assert_no_secret
from tests.helpers.idp import Idp, StartIdp, oauth2_config
from tests.helpers.metrics import count, refreshes
from tests.helpers.rawhttp import RawConnection, assert_problem, first_answer, get
from tests.helpers.rawupstream import (
    MakeRaw,
    UpConn,
    answer_with,
    connected,
    download_head,
    flood,
    read_request,
    reset,
    response,
    serving,
    start_proxy,
)
from tests.helpers.wait import wait_for, wait_ready
from tokenproxy.daemon import Daemon
from tokenproxy.tokens.guard import UNAUTHORIZED_REFRESH_GAP

# Every test here runs against both request paths (tests/conftest.py).
pytestmark = pytest.mark.both_paths

# The upstream of most tests here: reads whole requests (Content-Length bodies; one that ends
# early marks its connection ``aborted``) and answers each 200 "ok"; keeps alive.
well_behaved = serving(lambda req: response(b"ok"))


async def proxy_to(make_proxy: MakeProxy, url: str, **route: Any) -> Daemon:
    return await make_proxy(proxy_config(url, TOKEN, routes=[
        {"prefix": "/", "upstream": url, "provider": "api", **route}]))


# -- faulty upstream --------------------------------------------------------------------------


class TestFaultyUpstream:
    @pytest.mark.parametrize(("method", "attempts"), [("GET", 2), ("POST", 1)])
    async def test_reset_before_headers_is_502_reset(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw, method: str, attempts: int
    ) -> None:
        """An upstream resetting (RST) before any header gives a 502, kind reset; only an
        idempotent request is tried a second time (aiohttp's RFC 9112 9.3.1 retry)."""
        async def rst(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      conn: UpConn) -> None:
            await read_request(reader, conn, body=False)
            reset(writer)

        up = await raw_upstream(rst)
        daemon = await proxy_to(make_proxy, up.url())
        resp = await first_answer(daemon.port(), get("/x", method=method))
        assert_problem(resp, 502, "upstream_unreachable")
        assert 1.0 == count(daemon, "tokenproxy_upstream_errors_total", route="/", kind="reset")
        assert attempts == len(up.requests)
        auth = [line for line in up.received.decode().split("\r\n")
                if line.lower().startswith("authorization:")]
        assert [f"Bearer {TOKEN}"] * attempts == [line.split(":", 1)[1].strip() for line in auth]

    @pytest.mark.parametrize("answer", [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 OK\r\n\r\n",
        b"\x00\x01\x02\x03garbage\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\nab",
        b"HTTP/1.1 200 OK\r\nBad Header Line\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 O\rK\r\nContent-Length: 0\r\n\r\n",
        b"",
    ], ids=["ssh-banner", "status-2000", "no-status-code", "binary", "duplicate-cl",
            "cl-and-te", "no-colon", "bare-cr", "nul", "cr-in-reason", "closed-silently"])
    async def test_garbage_answer_is_502(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw, answer: bytes
    ) -> None:
        """An upstream answering with garbage or smuggling framing gives a 502, then the proxy
        keeps serving."""
        up = await raw_upstream(answer_with(answer))
        daemon = await proxy_to(make_proxy, up.url())
        resp = await first_answer(daemon.port(), get("/x"))
        assert_problem(resp, 502, "upstream_unreachable")
        up.script = well_behaved
        resp = await first_answer(daemon.port(), get("/y"))
        assert (200, b"ok") == (resp.status, resp.body)

    @pytest.mark.parametrize("head", [
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 200_000 + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%05d: %s\r\n" % (i, b"b" * 40)
                                          for i in range(4000)) + b"Content-Length: 0\r\n\r\n",
    ], ids=["one-200k-line", "4000-headers"])
    async def test_gigantic_header_block_is_502(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw, head: bytes
    ) -> None:
        """A ~200 KB response head (one line or 4000 fields) gives a 502, never a relay."""
        up = await raw_upstream(answer_with(head))
        daemon = await proxy_to(make_proxy, up.url())
        resp = await first_answer(daemon.port(), get("/x"))
        assert_problem(resp, 502, "upstream_unreachable")
        assert [] == resp.header("X-Big") + resp.header("X-H00000")

    async def test_endless_header_block_read_is_bounded(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """A head that never ends: the proxy answers 502 and hangs up after a bounded read."""
        async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          conn: UpConn) -> None:
            await read_request(reader, conn, body=False)
            line = b"X-Flood: " + b"f" * 100 + b"\r\n"
            await flood(writer, conn, b"HTTP/1.1 200 OK\r\n", line * 100, 64 * 1024 * 1024)

        up = await raw_upstream(endless)
        daemon = await proxy_to(make_proxy, up.url())
        resp = await first_answer(daemon.port(), get("/x"), timeout=5)
        assert_problem(resp, 502, "upstream_unreachable")
        await asyncio.wait_for(up.conns[0].ended.wait(), 3)
        # what the proxy took in is bounded by its parser limit plus socket buffers
        assert up.conns[0].sent < 16 * 1024 * 1024

    async def test_endless_upstream_header_line_read_is_bounded(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """One response header line that never ends: llhttp accumulates the partial value itself
        (quadratically) and hands it over only at its end, so a limit checked per header line
        never fires; the bytes of an unfinished head are counted as they arrive instead
        (MAX_UPSTREAM_HEAD, proxy/fast_path/upstream.py), or the proxy would read and keep
        everything until the route timeout (60 s by default). The same holds for the status
        reason."""
        async def endless_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                               conn: UpConn) -> None:
            await read_request(reader, conn)
            await flood(writer, conn, b"HTTP/1.1 200 OK\r\nX-Flood: ", b"f" * 65536,
                        256 * 1024 * 1024)

        up = await raw_upstream(endless_line)
        daemon = await start_proxy(make_proxy, up, {"timeout": "3s"})
        started = time.monotonic()
        async with connected(daemon.port()) as conn:
            await conn.send(get("/x"))
            with contextlib.suppress(EOFError, TimeoutError, ConnectionError):
                await conn.response(timeout=5)
        await asyncio.wait_for(up.conns[0].ended.wait(), 5)
        took, sent = time.monotonic() - started, up.conns[0].sent
        assert sent < 16 * 1024 * 1024, f"read {sent >> 20} MiB in {took:.1f} s"
        assert took < 2

    @pytest.mark.slow
    async def test_slow_body_after_headers_is_relayed_whole(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """A body dribbled out past the route timeout arrives whole: no 504 once the head came."""
        async def dribble(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          conn: UpConn) -> None:
            await read_request(reader, conn, body=False)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
            for i in range(5):
                await writer.drain()
                await asyncio.sleep(0.2)
                writer.write(str(i).encode() * 10)
            await writer.drain()

        up = await raw_upstream(dribble)
        daemon = await proxy_to(make_proxy, up.url(), timeout=0.4)
        started = time.monotonic()
        resp = await first_answer(daemon.port(), get("/x"), timeout=5)
        assert (200, b"".join(str(i).encode() * 10 for i in range(5))) == (resp.status, resp.body)
        assert time.monotonic() - started > 0.8   # really longer than the route timeout
        assert 0.0 == count(daemon, "tokenproxy_upstream_errors_total", route="/", kind="timeout")


# -- the 401 storm ----------------------------------------------------------------------------


@pytest.fixture(name="idp")
async def _idp(start: StartIdp) -> Idp:
    """An issuer whose tokens live an hour (the clock moves only by the storm-guard gap)."""
    return await start(lifetime=3600.0)


async def fetch(http: aiohttp.ClientSession, daemon: Daemon, path: str = "/x",
                timeout: float = 5.0) -> tuple[int, bytes, float]:
    """Status, head and body bytes (checked for secrets), and seconds taken."""
    started = time.monotonic()
    async with http.get(f"http://127.0.0.1:{daemon.port()}{path}",
                        timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        body = await r.read()
        head = "".join(f"{k}: {v}\r\n" for k, v in r.headers.items()).encode("latin-1")
    assert_no_secret(head + body)
    return r.status, body, time.monotonic() - started


@pytest.mark.slow
async def test_401_storm_bounded_by_the_refresh_gap(
    idp: Idp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """An upstream refusing every token: each request retried at most once, one 401-triggered
    token call per UNAUTHORIZED_REFRESH_GAP, and every 401 passed back."""
    idp.tap.deny = {"/api/x"}
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    assert 1 == len(idp.calls.seen)
    answers = []
    for window in range(3):
        answers += [await fetch(http, daemon) for _ in range(10)]
        assert 1 + 1 + window == len(idp.calls.seen)          # initial + one per window
        assert (10 + 1) * (window + 1) == len(idp.tap.bearers("/api/x"))   # one retry each
        await clock.tick(UNAUTHORIZED_REFRESH_GAP + 0.1)
    # a concurrent burst: one more token call, no request sent more than twice
    burst = await asyncio.gather(*(fetch(http, daemon) for _ in range(50)))
    assert 5 == len(idp.calls.seen)
    assert 33 + 50 <= len(idp.tap.bearers("/api/x")) <= 33 + 100
    assert [401] * 80 == [a[0] for a in answers + burst]
    assert all(b"denied-by-upstream" == a[1] for a in answers + burst)
    assert 4 == refreshes(daemon, "unauthorized")
    assert 4 <= count(daemon, "tokenproxy_auth_retries_total", route="/", outcome="failure") + \
        count(daemon, "tokenproxy_auth_retries_total", route="/", outcome="success")


# -- faulty token endpoint: very slow while requests queue ------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("delay", "route_timeout", "expected"), [
    # The token comes long after the route timeout, so that every waiter is sent before it
    # comes, even on a busy machine: every waiter gets 503.
    (1.5, 0.4, 503),
    (0.3, 2.0, 200),   # the token comes within it: every waiter gets 200
])
async def test_slow_token_endpoint_with_200_queued_requests(
    idp: Idp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    delay: float, route_timeout: float, expected: int,
) -> None:
    """200 requests waiting on a slow token call all answer (200 or 503 + Retry-After) within
    the route timeout, with exactly one token call in flight."""
    in_flight = peak = 0

    async def slow(request: web.Request, grant: str) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(delay)
        in_flight -= 1

    idp.calls.default = slow
    daemon = await make_proxy(oauth2_config(idp, tmp_path, timeout="5s",
                                            top={"routes": [{"prefix": "/", "provider": "idp",
                                                             "upstream": idp.url + "/api/",
                                                             "timeout": route_timeout}]}))
    await asyncio.wait_for(idp.calls.entered.wait(), 2)
    answers = await asyncio.gather(*(fetch(http, daemon, f"/q{i}") for i in range(200)))
    assert [expected] * 200 == [a[0] for a in answers]
    assert max(a[2] for a in answers) < route_timeout + 1.0
    assert (1, 1) == (len(idp.calls.seen), peak)
    assert (200 if expected == 200 else 0) == len(idp.tap.bearers())
    await wait_ready(daemon)
    assert 200 == (await fetch(http, daemon))[0]
    assert 1 == len(idp.calls.seen)


# -- hostile clients --------------------------------------------------------------------------


class TestHostileClients:
    async def test_client_gone_mid_upload_aborts_the_upstream_request(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """A client hanging up mid-body: the upstream sees a cut body and a close, never a
        complete-looking request; the daemon keeps serving."""
        up = await raw_upstream(well_behaved)
        daemon = await proxy_to(make_proxy, up.url())
        length = 3 * 1024 * 1024
        conn = await RawConnection.open(daemon.port())
        await conn.send(b"POST /up HTTP/1.1\r\nHost: localhost\r\n"
                        b"Content-Length: %d\r\n\r\n" % length)
        await conn.send(b"u" * (1536 * 1024))
        await wait_for(lambda: bool(up.conns) and len(up.conns[0].requests) == 1,
                       "upstream head", 3.0)
        conn.writer.transport.abort()
        await asyncio.wait_for(up.conns[0].ended.wait(), 3)
        first = up.conns[0]
        assert (True, 1) == (first.aborted, len(first.requests))
        assert len(first.data) < length
        await wait_for(lambda: count(daemon, "tokenproxy_inflight_requests") == 0, "idle", 3.0)
        resp = await first_answer(daemon.port(), get("/after"))
        assert (200, b"ok") == (resp.status, resp.body)

    async def test_client_gone_mid_download_closes_upstream(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """A client hanging up mid-download: the upstream connection is closed, the transfer
        stops early and the inflight gauge returns to 0."""
        total = 200 * 1024 * 1024

        async def firehose(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                           conn: UpConn) -> None:
            await read_request(reader, conn, body=False)
            await flood(writer, conn, download_head(total), b"d" * 65536, total)

        up = await raw_upstream(firehose)
        daemon = await proxy_to(make_proxy, up.url())
        conn = await RawConnection.open(daemon.port())
        await conn.send(get("/dl"))
        resp = await conn.response(head_only=True)
        assert 200 == resp.status
        await conn.reader.readexactly(65536)
        conn.writer.transport.abort()
        await asyncio.wait_for(up.conns[0].ended.wait(), 3)
        assert up.conns[0].sent < total // 4
        await wait_for(lambda: count(daemon, "tokenproxy_inflight_requests") == 0, "idle", 3.0)
        up.script = well_behaved
        resp = await first_answer(daemon.port(), get("/x"))
        assert (200, b"ok") == (resp.status, resp.body)

    async def test_http10_without_keepalive_is_answered_and_closed(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """HTTP/1.0 with Host and no keep-alive: one answer, then the proxy closes."""
        daemon = await proxy_to(make_proxy, upstream_url(upstream))
        conn = await RawConnection.open(daemon.port())
        await conn.send(get("/status/200", "localhost", version="HTTP/1.0"))
        resp = await conn.response()
        assert (200, b"status 200\n") == (resp.status, resp.body)
        assert await conn.wait_closed(2) is not None
        assert_no_secret(resp.raw + conn.trailing)
        await conn.close()
        assert [("GET", "/status/200", [TOKEN])] == [
            (s.method, s.raw_path, [v.split(" ", 1)[1] for v in s.header("Authorization")])
            for s in fake_upstream.seen]

    async def test_http10_keepalive_serves_a_second_request(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """HTTP/1.0 with Connection: keep-alive: two requests on one connection, both framed."""
        daemon = await proxy_to(make_proxy, upstream_url(upstream))
        async with connected(daemon.port()) as conn:
            for path in ("/status/200", "/status/201"):
                await conn.send(get(path, "localhost", "Connection: keep-alive",
                                    version="HTTP/1.0"))
                resp = await conn.response()
                assert path.endswith(str(resp.status))
                assert resp.get("Content-Length") is not None
                assert_no_secret(resp.raw)
        assert ["/status/200", "/status/201"] == [s.raw_path for s in fake_upstream.seen]

    async def test_connection_close_honoured(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """Connection: close on HTTP/1.1: one answer saying close, then the socket closes."""
        daemon = await proxy_to(make_proxy, upstream_url(upstream))
        conn = await RawConnection.open(daemon.port())
        await conn.send(get("/status/200", "localhost", "Connection: close"))
        resp = await conn.response()
        assert (200, "close") == (resp.status, (resp.get("Connection") or "").lower())
        assert await conn.wait_closed(2) is not None
        assert_no_secret(resp.raw + conn.trailing)
        await conn.close()
        assert ["/status/200"] == [s.raw_path for s in fake_upstream.seen]

    async def test_request_pipelined_after_connection_close_never_forwarded(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """A request pipelined behind Connection: close is never forwarded (aiohttp 3.14 refuses
        the packet with 400), the socket closes, and the daemon keeps serving."""
        daemon = await proxy_to(make_proxy, upstream_url(upstream))
        conn = await RawConnection.open(daemon.port())
        await conn.send(get("/status/200", "localhost", "Connection: close")
                        + get("/status/202"))
        resp = await conn.response()
        assert resp.status in (200, 400)
        assert await conn.wait_closed(2) is not None
        assert_no_secret(resp.raw + conn.trailing)
        await conn.close()
        assert b"HTTP/1.1 202" not in conn.trailing
        assert [] == [s.raw_path for s in fake_upstream.seen if s.raw_path != "/status/200"]
        resp = await first_answer(daemon.port(), get("/status/204"))
        assert 204 == resp.status


# -- confused deputy --------------------------------------------------------------------------


class TestConfusedDeputy:
    @pytest.mark.parametrize("host", [
        "0.0.0.0", "127.0.0.2", "127.1", "0x7f000001", "0x7f.0.0.1", "017700000001",
        "[::ffff:127.0.0.1]", "[0:0:0:0:0:0:0:1]", "localhost.", "localhost..",
        "localhost%2eevil.example", "evil.example#@localhost", "localhost\\@evil.example",
        "localhost/evil.example", "localhost evil.example", "evil.example\tlocalhost",
        "xn--localhost-evil.example", "lócalhost", "localhost:8080@evil.example:80",
        "[::1", "::1]",
    ])
    async def test_rebinding_host_refused(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream, host: str
    ) -> None:
        """A Host only resembling an allowed name (other loopback spellings, IDN, separators)
        is refused with 403 or 400 and never forwarded."""
        daemon = await proxy_to(make_proxy, upstream_url(upstream))
        resp = await first_answer(daemon.port(), get("/status/200", host))
        assert resp.status in (400, 403)
        assert [] == fake_upstream.seen

    @pytest.mark.parametrize("host", ["LOCALHOST", "LocalHost:1", "127.0.0.1:65535", "[::1]:80"])
    async def test_allowed_host_spellings_pass(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream, host: str
    ) -> None:
        """Case and port do not matter for an allowed host."""
        daemon = await proxy_to(make_proxy, upstream_url(upstream))
        resp = await first_answer(daemon.port(), get("/status/200", host))
        assert 200 == resp.status
        assert 1 == len(fake_upstream.seen)

    @pytest.mark.parametrize("headers", [
        ["Sec-Fetch-Site: none", "Sec-Fetch-Mode: navigate", "Sec-Fetch-Dest: document",
         "Sec-Fetch-User: ?1"],
        ["Sec-Fetch-Mode: navigate", "Sec-Fetch-Dest: document"],
        ["Sec-Fetch-Site: none", "Sec-Fetch-Mode: no-cors", "Sec-Fetch-Dest: empty"],
    ], ids=["address-bar-navigation", "mode-only", "site-none-no-cors"])
    async def test_sec_fetch_navigation_passes(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        headers: list[str],
    ) -> None:
        """A user's own navigation (Sec-Fetch-Site none, or no Site at all) passes."""
        daemon = await proxy_to(make_proxy, upstream_url(upstream))
        resp = await first_answer(daemon.port(), get("/status/200", "localhost", *headers))
        assert 200 == resp.status
        assert 1 == len(fake_upstream.seen)

    @pytest.mark.parametrize(("method", "headers"), [
        ("GET", ["Sec-Fetch-Site: cross-site", "Sec-Fetch-Mode: no-cors",
                 "Sec-Fetch-Dest: image"]),
        ("GET", ["Sec-Fetch-Site: cross-site", "Sec-Fetch-Mode: navigate",
                 "Sec-Fetch-Dest: document", "Sec-Fetch-User: ?1"]),
        ("POST", ["Sec-Fetch-Site: cross-site", "Sec-Fetch-Mode: navigate",
                  "Origin: null", "Content-Type: text/plain", "Content-Length: 3"]),
        ("POST", ["Sec-Fetch-Site: cross-site", "Sec-Fetch-Mode: cors",
                  "Origin: https://evil.example", "Content-Type: application/json",
                  "Content-Length: 3"]),
        ("GET", ["Sec-Fetch-Site: none", "Sec-Fetch-Site: cross-site"]),
        ("GET", ["Sec-Fetch-Site: cross-site", "Sec-Fetch-Site: none"]),
        ("GET", ["Sec-Fetch-Site: none, cross-site"]),
        ("GET", ["Sec-Fetch-Site: "]),
        ("GET", ["Sec-Fetch-Site: NONE-ish"]),
        ("GET", ["sec-fetch-site: same-origin", "Sec-Fetch-Mode: cors"]),
        ("GET", ["Origin: https://evil.example", "Sec-Fetch-Site: none"]),
        ("PUT", ["Origin: http://localhost", "Sec-Fetch-Mode: cors", "Content-Length: 3"]),
    ], ids=["img-no-cors", "cross-site-navigation", "form-post-null-origin",
            "fetch-after-preflight", "dup-none-first", "dup-cross-first", "list-value",
            "empty", "odd-value", "lowercase-name", "origin-and-none", "put-same-host-origin"])
    async def test_sec_fetch_cross_site_refused(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        method: str, headers: list[str],
    ) -> None:
        """Cross-site browser requests in any Sec-Fetch-* combination get 403, never forwarded."""
        daemon = await proxy_to(make_proxy, upstream_url(upstream))
        body = b"a=1" if method != "GET" else b""
        resp = await first_answer(daemon.port(),
                                 get("/status/200", "localhost", *headers, method=method) + body)
        assert_problem(resp, 403, "cross_site")
        assert [] == fake_upstream.seen

    @pytest.mark.slow
    async def test_token_only_ever_reaches_the_upstream_origin(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        raw_upstream: MakeRaw,
    ) -> None:
        """Across a table of client inputs and upstream redirects, a second "evil" origin on
        127.0.0.1 never receives the token, and the upstream sees only its own Host."""
        evil = await raw_upstream(well_behaved)
        e = f"127.0.0.1:{evil.port}"
        good = f"127.0.0.1:{upstream.port}"
        daemon = await proxy_to(make_proxy, upstream_url(upstream))
        targets = [
            f"http://{e}/steal", f"https://{e}/steal", f"//{e}/steal", f"///{e}/steal",
            f"/%2f{e}/steal", f"/%2F%2F{e}/steal", f"/\\\\{e}/steal", f"/%5c%5c{e}/steal",
            f"/@{e}/steal", f"/..%2f..%2f{e}", f"/%2e%2e/{e}", f"/%252e%252e%252f{e}",
            f"/%c0%ae%c0%ae/{e}", f"/.;/{e}", f"/;@{e}/x", f"http://{good}@{e}/x",
            f"http://{e}#@{good}/x", f"{e}/x", "*", f"/status/200?url=http://{e}/",
        ]
        requests = [get(t, "localhost") for t in targets]
        requests += [get(f"{e}", "localhost", method="CONNECT"),
                     get(f"http://{e}/x", e), get("/status/200", e),
                     get("/status/200", "localhost", f"Forwarded: host={e}"),
                     get("/status/200", "localhost", f"X-Forwarded-Host: {e}"),
                     get("/status/200", "localhost", f"X-Forwarded-For: {e}"),
                     get("/status/200", "localhost", f"X-Original-URL: http://{e}/"),
                     get("/status/200", "localhost", f"X-Rewrite-URL: //{e}/"),
                     get("/status/200", "localhost", "X-Forwarded-Proto: https",
                         f"X-Forwarded-Port: {evil.port}"),
                     get("/status/200", "localhost", f"Via: 1.1 {e}"),
                     get("/status/200", "localhost", "Upgrade: h2c", "Connection: Upgrade")]
        statuses = []
        for data in requests:
            resp = await first_answer(daemon.port(), data)
            statuses.append(resp.status)
        # upstream redirects, followed by a real client (aiohttp follows to evil directly)
        redirects = [f"http://{e}/next", f"//{e}/next", f"HTTP://{e}/Next",
                     f"http://{good}/redirect?to=http://{e}/chained",
                     f"/redirect?to=//{e}/chained2"]
        async with aiohttp.ClientSession() as s:
            for to in redirects:
                async with s.get(f"http://127.0.0.1:{daemon.port()}/redirect",
                                 params={"to": to}, allow_redirects=True) as r:
                    body = await r.read()
                    assert_no_secret(body + str(r.headers).encode())
                    statuses.append(r.status)
        assert len(requests) + len(redirects) == len(statuses)
        leaked = [s for s in SECRETS if s.encode() in evil.received]
        assert [] == leaked
        # the plain follows of the foreign redirects did reach evil, without any token
        assert 4 <= len(evil.requests)
        assert all(f"127.0.0.1:{upstream.port}" == s.header("Host")[0]
                   for s in fake_upstream.seen)
        assert all(s.header("Authorization") == [f"Bearer {TOKEN}"] for s in fake_upstream.seen)
