"""Connection-level limits: head size, header and keep-alive timeouts, the connection cap,
unix socket listeners, and the refusal of exposed listeners without protection."""

from __future__ import annotations

import asyncio
import contextlib
import grp
import os
import socket
import stat
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from tests.helpers.config import (
    MakeProxy,
    proxy_config,
    rotate_token,
    token_file_config,
    upstream_url,
)
from tests.helpers.fakes import CLIENT_KEY, TOKEN, FakeUpstream, assert_no_secret
from tests.helpers.metrics import count, metric
from tests.helpers.rawhttp import RawConnection, assert_problem, exchange, first_answer, get
from tests.helpers.rawupstream import (
    MakeRaw,
    UpConn,
    connected,
    echo,
    post,
    read_body,
    read_request,
    refusing_first_token,
    reset,
    response,
    serving,
    start_proxy,
)
from tests.helpers.wait import wait_for
from tokenproxy.config import build_config
from tokenproxy.daemon import Daemon
from tokenproxy.errors import ConfigError
from tokenproxy.listeners import ListenError


async def start(make_proxy: MakeProxy, upstream: TestServer, **overrides: Any) -> Daemon:
    """A daemon with the one-route config to *upstream*, top-level keys replaced."""
    return await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN, **overrides))


def headers(count: int, value_size: int) -> list[str]:
    return [f"X-H{i}: {'v' * value_size}" for i in range(count)]


SMALL_HEAD = {"max_header_size": "4KiB"}


class TestHeaderSize:
    @pytest.mark.parametrize(
        "request_bytes",
        [
            pytest.param(get("/status/200?" + "q" * 5000), id="request-line"),
            pytest.param(get("/status/200", "localhost", "X-Big: " + "b" * 5000),
                         id="header-line"),
            pytest.param(get("/status/200", "localhost", "X-" + "n" * 5000 + ": v"),
                         id="header-name"),
            pytest.param(get("/status/200", "localhost", *headers(10, 500)),
                         id="head-total"),
            pytest.param(get("/status/200", "localhost", *headers(60, 60)),
                         id="head-total-many-small"),
        ],
    )
    async def test_head_over_limit_431(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        request_bytes: bytes,
    ) -> None:
        """A line or the whole head over max_header_size gets 431 problem+json and a close."""
        daemon = await start(make_proxy, upstream, limits=SMALL_HEAD)
        resp, closed = await exchange(daemon.port(), request_bytes)
        assert_problem(resp, 431, "header_too_large")
        assert closed
        assert [] == fake_upstream.seen

    async def test_head_under_limit_passes(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """A head just under max_header_size, with one long line, is forwarded."""
        daemon = await start(make_proxy, upstream, limits=SMALL_HEAD)
        resp = await first_answer(daemon.port(),
                                 get("/status/200", "localhost", "X-Big: " + "b" * 3500))
        assert 200 == resp.status
        [seen] = fake_upstream.seen
        assert ["b" * 3500] == seen.header("X-Big")

    async def test_too_many_headers_refused(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """200 small header lines get 431 and a close, never an upstream request."""
        daemon = await start(make_proxy, upstream)
        resp, closed = await exchange(daemon.port(), get("/status/200", "localhost",
                                                         *headers(200, 1)))
        assert 431 == resp.status
        assert "header_too_large" == resp.get("Tokenproxy-Error")
        assert closed
        assert [] == fake_upstream.seen

    async def test_default_limit_is_16k_not_aiohttps_8k(
        self, make_proxy: MakeProxy, aiohttp_server: AiohttpServer, fake_upstream: FakeUpstream
    ) -> None:
        """By default a 9000-byte header passes (aiohttp alone stops at 8190); 17000 is 431."""
        # An upstream that itself takes long lines, so only the proxy's limit is tested.
        upstream = await aiohttp_server(fake_upstream.app(), max_line_size=32768,
                                        max_field_size=32768)
        daemon = await start(make_proxy, upstream)
        resp = await first_answer(daemon.port(),
                                 get("/status/200", "localhost", "X-Big: " + "b" * 9000))
        assert 200 == resp.status
        resp = await first_answer(daemon.port(),
                                 get("/status/200", "localhost", "X-Big: " + "b" * 17000))
        assert_problem(resp, 431, "header_too_large")
        assert 1 == len(fake_upstream.seen)


TIMEOUTS = {"header_timeout": "300ms", "keepalive_timeout": "5s"}


async def dribble(conn: RawConnection, first: bytes, every: float) -> None:
    """Send *first*, then one header line every *every* seconds, never ending the head."""
    with contextlib.suppress(ConnectionError):
        await conn.send(first)
        for i in range(100):
            await asyncio.sleep(every)
            await conn.send(f"X-Slow-{i}: v\r\n".encode())


class TestHeaderTimeout:
    @pytest.mark.slow
    async def test_slowloris_cut_at_header_timeout(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """A client sending a header line every 0.1 s is cut at header_timeout, not keep-alive."""
        daemon = await start(make_proxy, upstream, limits=TIMEOUTS)
        conn = await RawConnection.open(daemon.port())
        task = asyncio.create_task(dribble(conn, b"GET /status/200 HTTP/1.1\r\n", 0.1))
        try:
            closed_at = await conn.wait_closed(2.0)
        finally:
            task.cancel()
            await conn.close()
        assert closed_at is not None
        assert 0.25 <= closed_at < 0.9
        assert b"" == conn.trailing
        assert [] == fake_upstream.seen

    @pytest.mark.slow
    async def test_silent_connection_cut_at_header_timeout(
        self, make_proxy: MakeProxy, upstream: TestServer
    ) -> None:
        """A connection that never sends a byte is closed at header_timeout."""
        daemon = await start(make_proxy, upstream, limits=TIMEOUTS)
        async with connected(daemon.port()) as conn:
            closed_at = await conn.wait_closed(2.0)
        assert closed_at is not None
        assert 0.25 <= closed_at < 0.9

    @pytest.mark.slow
    async def test_slow_but_complete_head_succeeds(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """A head sent in pieces that completes within header_timeout is served."""
        daemon = await start(make_proxy, upstream, limits=TIMEOUTS)
        async with connected(daemon.port()) as conn:
            for piece in (b"GET /status/200 HTTP/1.1\r\n", b"Host: localhost\r\n",
                          b"X-A: 1\r\n", b"\r\n"):
                await conn.send(piece)
                await asyncio.sleep(0.05)
            resp = await conn.response()
            assert_no_secret(resp.raw)
        assert 200 == resp.status
        assert 1 == len(fake_upstream.seen)

    @pytest.mark.slow
    async def test_slowloris_on_second_request_cut(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """After a served request, a dribbled next head is cut at header_timeout too."""
        daemon = await start(make_proxy, upstream, limits=TIMEOUTS)
        conn = await RawConnection.open(daemon.port())
        task: asyncio.Task[None] | None = None
        try:
            await conn.send(get("/status/200"))
            assert 200 == (await conn.response()).status
            started = time.monotonic()
            task = asyncio.create_task(dribble(conn, b"GET /status/201 HTTP/1.1\r\n", 0.1))
            assert await conn.wait_closed(2.0) is not None
            elapsed = time.monotonic() - started
        finally:
            if task is not None:
                task.cancel()
            await conn.close()
        assert 0.25 <= elapsed < 0.9
        assert ["/status/200"] == [s.raw_path for s in fake_upstream.seen]

    @pytest.mark.slow
    async def test_idle_keepalive_closed_at_keepalive_timeout(
        self, make_proxy: MakeProxy, upstream: TestServer
    ) -> None:
        """An idle kept-alive connection outlives header_timeout; keepalive_timeout ends it."""
        daemon = await start(make_proxy, upstream,
                             limits={"header_timeout": "300ms", "keepalive_timeout": "1s"})
        async with connected(daemon.port()) as conn:
            await conn.send(get("/status/200"))
            assert 200 == (await conn.response()).status
            started = time.monotonic()
            assert await conn.wait_closed(0.6) is None     # past header_timeout: still open
            assert await conn.wait_closed(1.5) is not None
            elapsed = time.monotonic() - started
        assert 0.9 <= elapsed < 1.6
        assert b"" == conn.trailing

    @pytest.mark.slow
    async def test_request_in_progress_not_cut(
        self, make_proxy: MakeProxy, upstream: TestServer
    ) -> None:
        """A slow upstream answer is not a slow head: the request outlives header_timeout."""
        daemon = await start(make_proxy, upstream, limits=TIMEOUTS)
        async with connected(daemon.port()) as conn:
            await conn.send(get("/slow?delay=0.6"))
            resp = await conn.response()
        assert 200 == resp.status
        assert b"slow" == resp.body


class TestBodyTimeout:
    @pytest.mark.slow
    @pytest.mark.parametrize(
        ("retry_on", "content_length", "status", "cause", "upstream_saw"),
        [
            ([401], "100", 408, "request_timeout", []),
            ([], "100", 504, "upstream_timeout", ["/upload"]),
            ([401], "2147483648", 504, "upstream_timeout", ["/upload"]),
        ],
        ids=["buffered", "streamed", "over-replay-limit"],
    )
    async def test_stalled_body_cut_at_route_timeout(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        retry_on: list[int], content_length: str, status: int, cause: str,
        upstream_saw: list[str],
    ) -> None:
        """A client that stops sending its body is answered at the route timeout at the latest."""
        daemon = await start(make_proxy, upstream, routes=[
            {"prefix": "/", "upstream": upstream_url(upstream, "/"), "provider": "api",
             "retry_on": retry_on, "timeout": "500ms"}])
        async with connected(daemon.port()) as conn:
            await conn.send(get("/upload", "localhost", f"Content-Length: {content_length}",
                                method="POST") + b"abc")
            started = time.monotonic()
            resp = await conn.response()
            elapsed = time.monotonic() - started
            assert_no_secret(resp.raw)
        assert_problem(resp, status, cause)
        assert 0.4 <= elapsed < 1.5
        assert upstream_saw == [s.raw_path for s in fake_upstream.seen]


CONNECTIONS = "tokenproxy_client_connections"   # the gauge of open client connections


class TestConnectionCap:
    @pytest.mark.slow
    async def test_excess_connection_waits_in_backlog(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """Beyond max_connections a client waits, unrefused, until a slot frees up."""
        daemon = await start(make_proxy, upstream,
                             limits={"max_connections": 2, "keepalive_timeout": "5s"})
        first = await RawConnection.open(daemon.port())
        second = await RawConnection.open(daemon.port())
        third: RawConnection | None = None
        try:
            for conn in (first, second):
                await conn.send(get("/status/200"))
                assert 200 == (await conn.response()).status
            assert 2 == metric(daemon, CONNECTIONS)
            third = await RawConnection.open(daemon.port())
            await third.send(get("/status/201"))
            with pytest.raises(TimeoutError):
                await third.response(timeout=0.5)
            assert 2 == len(fake_upstream.seen)
            await first.close()
            resp = await third.response()
            assert 201 == resp.status
            assert 2 == metric(daemon, CONNECTIONS)
        finally:
            for conn in (first, second, third):
                if conn is not None:
                    await conn.close()
        assert ["/status/200", "/status/200", "/status/201"] == [
            s.raw_path for s in fake_upstream.seen]
        await wait_for(lambda: metric(daemon, CONNECTIONS) == 0, "no client connection", 2.0)

    async def test_gauge_counts_open_connections(
        self, make_proxy: MakeProxy, upstream: TestServer
    ) -> None:
        """tokenproxy_client_connections follows connections opening and closing."""
        daemon = await start(make_proxy, upstream, listen=["127.0.0.1:0", "localhost:0"])
        await asyncio.sleep(0.05)   # the accept loops wait with a slot each: not a connection
        assert 0 == metric(daemon, CONNECTIONS)
        conns = [await RawConnection.open(daemon.port()) for _ in range(3)]
        try:
            await wait_for(lambda: metric(daemon, CONNECTIONS) == 3, "three connections", 2.0)
            await conns[0].close()
            await wait_for(lambda: metric(daemon, CONNECTIONS) == 2, "two client connections", 2.0)
        finally:
            for conn in conns:
                await conn.close()
        await wait_for(lambda: metric(daemon, CONNECTIONS) == 0, "no client connection", 2.0)


def unix_config(upstream: TestServer, path: Path, **overrides: Any) -> dict[str, Any]:
    return proxy_config(upstream_url(upstream, "/"), TOKEN,
                        listen=["127.0.0.1:0", f"unix:{path}"], **overrides)


async def get_over_unix(path: Path, url_path: str = "/status/200") -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as s,
        s.get(f"http://localhost{url_path}") as resp,
    ):
        body = await resp.read()
        assert_no_secret(body + str(resp.headers).encode())
        return resp.status, body


class TestUnixSocket:
    async def test_socket_is_0600_and_serves(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        tmp_path: Path,
    ) -> None:
        """A unix listener is a socket of mode 0600 that proxies like the TCP one."""
        sock_path = tmp_path / "tp.sock"
        await make_proxy(unix_config(upstream, sock_path))
        mode = os.stat(sock_path).st_mode
        assert stat.S_ISSOCK(mode)
        assert 0o600 == stat.S_IMODE(mode)
        assert 200 == (await get_over_unix(sock_path))[0]
        assert ["/status/200"] == [s.raw_path for s in fake_upstream.seen]

    async def test_socket_group_makes_it_0660(
        self, make_proxy: MakeProxy, upstream: TestServer, tmp_path: Path
    ) -> None:
        """With socket_group the socket is 0660 and owned by that group."""
        group = grp.getgrgid(os.getgid()).gr_name
        sock_path = tmp_path / "tp.sock"
        await make_proxy(unix_config(upstream, sock_path, socket_group=group))
        st = os.stat(sock_path)
        assert 0o660 == stat.S_IMODE(st.st_mode)
        assert os.getgid() == st.st_gid

    async def test_unix_requests_still_checked(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        tmp_path: Path,
    ) -> None:
        """The security policy applies on the unix listener as well."""
        sock_path = tmp_path / "tp.sock"
        await make_proxy(unix_config(upstream, sock_path))
        conn = await RawConnection.open_unix(str(sock_path))
        try:
            await conn.send(get("/status/200", "evil.example"))
            resp = await conn.response()
        finally:
            await conn.close()
        assert_problem(resp, 403, "forbidden_host")
        assert [] == fake_upstream.seen

    async def test_stale_socket_replaced(
        self, make_proxy: MakeProxy, upstream: TestServer, tmp_path: Path
    ) -> None:
        """A socket file left by a crashed run, with nobody listening, is replaced."""
        sock_path = tmp_path / "tp.sock"
        stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stale.bind(str(sock_path))
        stale.close()
        assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
        await make_proxy(unix_config(upstream, sock_path))
        assert 0o600 == stat.S_IMODE(os.stat(sock_path).st_mode)
        assert 200 == (await get_over_unix(sock_path))[0]

    async def test_regular_file_refused(
        self, make_proxy: MakeProxy, upstream: TestServer, tmp_path: Path
    ) -> None:
        """A non-socket file at the path is neither removed nor listened on: ListenError."""
        sock_path = tmp_path / "tp.sock"
        sock_path.write_text("precious")
        with pytest.raises(ListenError, match="not a socket"):
            await make_proxy(unix_config(upstream, sock_path))
        assert "precious" == sock_path.read_text()

    async def test_live_socket_refused(
        self, make_proxy: MakeProxy, upstream: TestServer, tmp_path: Path
    ) -> None:
        """A socket another process still serves is left alone: ListenError."""
        sock_path = tmp_path / "tp.sock"
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            other.bind(str(sock_path))
            other.listen(1)
            with pytest.raises(ListenError, match="another process"):
                await make_proxy(unix_config(upstream, sock_path))
            assert sock_path.exists()
        finally:
            other.close()

    async def test_socket_removed_on_stop(
        self, make_proxy: MakeProxy, upstream: TestServer, tmp_path: Path
    ) -> None:
        """Stopping the daemon removes its socket file."""
        sock_path = tmp_path / "tp.sock"
        daemon = await make_proxy(unix_config(upstream, sock_path))
        await daemon.stop(grace=0)
        assert not sock_path.exists()


def base_config(listen: Any, **security: Any) -> dict[str, Any]:
    raw = proxy_config("http://127.0.0.1:1/", TOKEN, listen=listen, admin_listen=None)
    if security:
        raw["security"] = security
    return raw


class TestExposedListener:
    @pytest.mark.parametrize(
        "listen",
        ["0.0.0.0:0", "[::]:0", "192.0.2.1:8080", "example.com:8080",
         ["127.0.0.1:0", "0.0.0.0:0"]],
    )
    def test_refused_without_key_or_hosts(self, listen: Any) -> None:
        """A listener other hosts can reach needs client_key or explicit allowed_hosts."""
        with pytest.raises(ConfigError, match="listen"):
            build_config(base_config(listen), {})

    @pytest.mark.parametrize(
        "security",
        [{"client_key": CLIENT_KEY}, {"allowed_hosts": ["proxy.internal"]},
         {"allowed_hosts": ["localhost", "127.0.0.1"]}],
    )
    def test_accepted_with_key_or_hosts(self, security: dict[str, Any]) -> None:
        """Either protection makes an exposed listener acceptable."""
        cfg = build_config(base_config("0.0.0.0:0", **security), {})
        assert ["0.0.0.0:0"] == [str(li) for li in cfg.listen]

    @pytest.mark.parametrize(
        "listen", ["127.0.0.1:0", "127.0.0.2:0", "localhost:0", "[::1]:0", "unix:/run/tp.sock"],
    )
    def test_loopback_needs_nothing(self, listen: str) -> None:
        """Loopback addresses and unix sockets are accepted with the defaults."""
        cfg = build_config(base_config(listen), {})
        assert 1 == len(cfg.listen)

    def test_error_names_no_secret(self) -> None:
        """The refusal message names the listener and the fix, and no secret."""
        with pytest.raises(ConfigError) as info:
            build_config(base_config("0.0.0.0:0"), {})
        message = str(info.value)
        assert "0.0.0.0" in message
        assert "client_key" in message
        assert_no_secret(message)


@pytest.mark.both_paths
class TestReplayBudget:
    """limits.max_replay_total bounds the bodies held for replay across all requests."""

    @pytest.mark.parametrize("framing", ["content-length", "chunked"])
    async def test_past_the_budget_bodies_stream_and_their_401_is_passed_back(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw, framing: str
    ) -> None:
        release = asyncio.Event()
        held = 0

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         conn: UpConn) -> None:
            nonlocal held
            while (req := await read_request(reader, conn)) is not None:
                if req.target == "/hold":
                    held += 1
                    await release.wait()
                    writer.write(response(b"held"))
                else:
                    writer.write(response(b"no", "401 Unauthorized"))
                await writer.drain()

        up = await raw_upstream(script)
        daemon = await start_proxy(make_proxy, up, limits={
            "max_replay_body": "1KiB", "max_replay_total": "2KiB"})
        body = b"b" * 1000

        def refused() -> bytes:
            if framing == "chunked":
                return get("/refuse", "localhost", "Transfer-Encoding: chunked",
                           method="POST") + b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)
            return post("/refuse", body)

        holders = [await RawConnection.open(daemon.port()) for _ in range(2)]
        try:
            for conn in holders:
                await conn.send(post("/hold", body))
            await wait_for(lambda: held >= 2, "two requests held upstream", 5.0)
            assert 2000 == count(daemon, "tokenproxy_replay_buffered_bytes")
            async with connected(daemon.port()) as conn:
                await conn.send(refused())
                assert 401 == (await conn.response()).status
            assert 1 == count(daemon, "tokenproxy_replay_budget_exceeded_total", route="/")
            assert 1 == count(daemon, "tokenproxy_auth_retries_total", route="/", outcome="skipped")
            release.set()
            assert [b"held", b"held"] == [(await c.response()).body for c in holders]
        finally:
            for conn in holders:
                await conn.close()
        await wait_for(lambda: not count(daemon, "tokenproxy_replay_buffered_bytes"),
                       "the held bodies given back", 5.0)
        # Room again: the body is buffered, so a retry would be possible -- but a static token
        # has no newer one to retry with.
        async with connected(daemon.port()) as conn:
            await conn.send(refused())
            assert 401 == (await conn.response()).status
        assert 1 == count(daemon, "tokenproxy_auth_retries_total", route="/",
                          outcome="no_new_token")
        assert 1 == count(daemon, "tokenproxy_auth_retries_total", route="/", outcome="skipped")
        assert 1 == count(daemon, "tokenproxy_replay_budget_exceeded_total", route="/")

    def test_the_total_is_at_least_one_body(self) -> None:
        with pytest.raises(ConfigError, match=r"limits\.max_replay_total"):
            build_config(proxy_config("http://127.0.0.1:1/", TOKEN, limits={
                "max_replay_body": "2MiB", "max_replay_total": "1MiB"}), {})


# -- the replay budget given back, whatever ends a request -------------------------------------


def _budget_probe(daemon: Daemon) -> list[int]:
    """Record every value the budget's held count takes (instrumenting the instance only)."""
    budget = daemon.replay_budget
    seen: list[int] = []
    reserve, release = budget.reserve, budget.release

    def rec_reserve(size: int, route: str) -> bool:
        ok = reserve(size, route)
        seen.append(budget.held)
        return ok

    def rec_release(size: int) -> None:
        release(size)
        seen.append(budget.held)

    budget.reserve = rec_reserve    # type: ignore[method-assign]
    budget.release = rec_release    # type: ignore[method-assign]
    return seen


# The two that wait out a route timeout (0.4 s) are slow.
BUDGET_CASES = ["client-gone-mid-body", pytest.param("body-stalls-408", marks=pytest.mark.slow),
                "upstream-reset", pytest.param("upstream-silent", marks=pytest.mark.slow),
                "chunked-gone-mid-body", "refused-then-replayed", "expect-100-then-gone",
                "reload-mid-request"]


@pytest.mark.slow
@pytest.mark.both_paths
@pytest.mark.parametrize("case", BUDGET_CASES)
async def test_the_replay_budget_returns_to_zero_whatever_ends_a_request(
    make_proxy: MakeProxy, raw_upstream: MakeRaw, tmp_path: Path, case: str
) -> None:
    """Every reservation is given back, once, however the request ends: client gone
    mid-body, a 408, an upstream reset or silence (504), a chunked body cut off, a 401 and
    its replay, Expect: 100-continue with no body, a reload while a body is held."""
    hold = asyncio.Event()
    arrived = asyncio.Event()
    token = tmp_path / "token"

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        while (req := await read_request(reader, conn, body=False)) is not None:
            req.body = await read_body(reader, req, conn)
            arrived.set()
            if req.target == "/reset":
                reset(writer)
                return
            if req.target == "/silent":
                await asyncio.sleep(5)
            if req.target == "/hold":
                await hold.wait()
            if req.get("Authorization") == f"Bearer {TOKEN}" and req.target == "/refuse":
                rotate_token(token)
                writer.write(response(b"no", "401 Unauthorized"))
            else:
                writer.write(echo(req))
            await writer.drain()

    up = await raw_upstream(script)
    raw = token_file_config(up.url(), token, limits={"max_replay_total": "8KiB",
                                                      "max_replay_body": "4KiB"})
    raw["routes"][0]["timeout"] = "0.4s"
    daemon = await make_proxy(raw)
    seen = _budget_probe(daemon)
    body = b"b" * 3000
    head = get("/x", "localhost", f"Content-Length: {len(body)}", method="POST")
    async with connected(daemon.port()) as conn:
        if case == "client-gone-mid-body":
            await conn.send(head + body[:1000])
            await asyncio.sleep(0.1)
        elif case == "body-stalls-408":
            await conn.send(head + body[:1000])
            assert 408 == (await conn.response()).status
        elif case in ("upstream-reset", "upstream-silent"):
            path = case.removeprefix("upstream-")
            await conn.send(get(f"/{path}", "localhost", f"Content-Length: {len(body)}",
                                method="POST") + body)
            assert (await conn.response()).status in (502, 504)
        elif case == "chunked-gone-mid-body":
            await conn.send(get("/x", "localhost", "Transfer-Encoding: chunked",
                                method="POST") + b"bb8\r\n" + body[:500])
            await asyncio.sleep(0.1)
        elif case == "refused-then-replayed":
            await conn.send(get("/refuse", "localhost", f"Content-Length: {len(body)}",
                                method="POST") + body)
            resp = await conn.response()
            assert (200, "token-2") == (resp.status, resp.json()["auth"])
        elif case == "expect-100-then-gone":
            await conn.send(get("/x", "localhost", f"Content-Length: {len(body)}",
                                "Expect: 100-continue", method="POST"))
            await asyncio.sleep(0.1)
        elif case == "reload-mid-request":
            await conn.send(get("/hold", "localhost", f"Content-Length: {len(body)}",
                                method="POST") + body)
            await asyncio.wait_for(arrived.wait(), 2)
            assert 3000 == daemon.replay_budget.held
            raw2 = dict(raw, limits={"max_replay_total": "4KiB", "max_replay_body": "4KiB"})
            raw2["routes"] = [dict(raw["routes"][0], timeout="2s")]
            await daemon.reload(build_config(raw2, {}))
            hold.set()
            assert 200 == (await conn.response()).status
    await wait_for(lambda: 0 == daemon.replay_budget.held, "the replay budget given back", 3.0)
    if case == "expect-100-then-gone":
        assert [] == seen   # reserved as bytes arrive: a head alone holds nothing
    else:
        assert max(seen, default=0) > 0, "the case never reserved anything"
        assert min(seen) >= 0
    if case == "reload-mid-request":
        assert 4096 == daemon.replay_budget.total


@pytest.mark.both_paths
@pytest.mark.slow
async def test_heads_without_bodies_pin_no_replay_budget(
    make_proxy: MakeProxy, raw_upstream: MakeRaw, tmp_path: Path
) -> None:
    """The budget is reserved as body bytes arrive, not for a body's whole Content-Length
    when its head arrives: otherwise one client that opens max_replay_total /
    max_replay_body connections and sends only heads would hold the whole budget for the
    route timeout (60 s by default), again and again, for free, and every other client's
    body would stream and its 401 be passed back instead of retried."""
    token = tmp_path / "token"

    up = await raw_upstream(serving(refusing_first_token(token)))
    raw = token_file_config(up.url(), token, limits={"max_replay_body": "2KiB",
                                                      "max_replay_total": "4KiB"})
    raw["routes"][0]["timeout"] = "5s"
    daemon = await make_proxy(raw)
    pinning = [await RawConnection.open(daemon.port()) for _ in range(2)]
    try:
        for conn in pinning:
            await conn.send(get("/x", "localhost", "Content-Length: 2048", method="POST"))
        await asyncio.sleep(0.2)
        held = daemon.replay_budget.held
        async with connected(daemon.port()) as victim:
            await victim.send(get("/refuse", "localhost", "Content-Length: 10",
                                  method="POST") + b"0123456789")
            resp = await victim.response()
    finally:
        for conn in pinning:
            await conn.close()
    assert 200 == resp.status, (
        f"victim's 401 passed back: {held} bytes reserved by two clients that sent no body")
