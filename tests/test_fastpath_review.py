"""Adversarial review of the fast path (proxy/fastpath.py, pool.py, wire.py).

Each test shows one defect found in review; each failed on the fast path when it was found and
passes since the fixes that followed. Tests marked ``both_paths`` also run against the
aiohttp path, which always passed them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable

import pytest

from tests.conftest import MakeProxy
from tests.fakes import TOKEN
from tests.rawhttp import assert_no_secret, get
from tests.rawupstream import (
    MakeRaw,
    Req,
    Script,
    UpConn,
    connected,
    post,
    read_request,
    response,
    start_proxy,
)
from tests.rawupstream import reset as rst
from tokenproxy.daemon import Daemon

# -- the raw upstream (tests/rawupstream.py) answers each request with its target by default


def serving(answer: Callable[[Req], bytes] | None = None) -> Script:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        while (req := await read_request(reader, conn)) is not None:
            writer.write(answer(req) if answer else response(req.target.encode()))
            await writer.drain()

    return script


# -- 1. request smuggling: Connection-listed Content-Length -----------------------------------


@pytest.mark.both_paths
async def test_connection_listed_content_length_keeps_the_body_framed(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """``Connection: Content-Length`` strips the client's Content-Length from the upstream
    head (wire.py:51, Connection-listed names), yet the fast path still writes the body
    bytes after it (fastpath.py:576 replayed, :603 streamed): the upstream reads the body as
    a second request that no check of the proxy ever saw. aiohttp frames the body itself."""
    up = await raw_upstream(serving())
    daemon = await start_proxy(make_proxy, up)
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    async with connected(daemon.port()) as conn:
        await conn.send(post("/upload", smuggled, "Connection: Content-Length"))
        resp = await conn.response()
        assert 200 == resp.status
        await asyncio.sleep(0.2)
    assert [("POST", "/upload", smuggled)] == [(r.method, r.target, r.body)
                                              for r in up.requests]


async def test_smuggled_request_captures_the_next_requests_token(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """Exploit of the above: the smuggled request is a POST whose body swallows the next
    request sent on the pooled upstream connection -- another client's request, proxy token
    included -- and stores it where the attacker can read it back; the victim gets the
    trap's answer (response queue desync)."""
    stored: list[bytes] = []

    def answer(req: Req) -> bytes:
        if req.target == "/comments":
            stored.append(req.body)
        return response(req.target.encode())

    up = await raw_upstream(serving(answer))
    daemon = await start_proxy(make_proxy, up)
    trap = b"POST /comments HTTP/1.1\r\nHost: x\r\nContent-Length: 150\r\n\r\n"
    async with connected(daemon.port()) as attacker:
        await attacker.send(post("/harmless", trap, "Connection: content-length"))
        assert 200 == (await attacker.response()).status
    answered = b""
    async with connected(daemon.port()) as victim:
        await victim.send(post("/victim", b"v" * 200))
        with contextlib.suppress(EOFError, TimeoutError):
            answered = (await victim.response(timeout=1)).body
    leaked = [b for b in stored if TOKEN.encode() in b]
    assert [] == leaked, "another client's token was stored by the smuggled request"
    assert b"/victim" == answered
    assert ["/harmless", "/victim"] == [r.target for r in up.requests]


# -- 2. an unfinished body after an early answer ----------------------------------------------


async def test_unfinished_body_after_an_early_answer_does_not_hold_the_connection(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """The upstream answers before the body is complete; the client then sends nothing more.
    _finish keeps the connection to drain the rest (_body_done(drop=True), fastpath.py:462)
    and returns without _next_head (fastpath.py:486), so no timer is armed -- neither
    header_timeout nor keepalive_timeout: the connection and its max_connections slot are
    held for ever. (aiohttp's protocol bounds the same drain by lingering_time, 10 s.)"""
    async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    conn: UpConn) -> None:
        while await read_request(reader, conn, body=False) is not None:
            writer.write(response(b"early"))
            await writer.drain()

    up = await raw_upstream(early)
    daemon = await start_proxy(make_proxy, up, {"retry_on": []},
                               limits={"header_timeout": "1s", "keepalive_timeout": "1s"})
    async with connected(daemon.port()) as conn:
        await conn.send(get("/up", "localhost", "Content-Length: 100000", method="POST")
                        + b"x" * 1000)
        resp = await conn.response()
        assert (200, b"early") == (resp.status, resp.body)
        closed = await conn.wait_closed(5)
    assert closed is not None, "connection still open 5 s after the answer (timeouts: 1 s)"


def slow_client(daemon: Daemon) -> socket.socket:
    """A client socket, and proxy-side sockets, with small kernel buffers (accepted sockets
    inherit SO_SNDBUF from the listener): a 100 KiB answer then fills the proxy's transport
    buffer past its high-water mark, as a slow client on a real network would."""
    for ls in daemon.listeners:
        ls.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


# -- 3. handover while the client transport is write-paused ------------------------------------


@pytest.mark.both_paths
async def test_handover_keeps_write_backpressure(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """A fast response leaves the client transport write-paused (the client is not reading);
    the next, pipelined request is handed over to aiohttp (here: a chunked upload).
    _handover (fastpath.py:265) never calls pause_writing on aiohttp's protocol, and the
    transport will not call it again while it stays paused, so aiohttp relays the download
    with no back-pressure: the proxy buffers all of it in memory (64 MiB here, unbounded)."""
    total = 64 * 1024 * 1024

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        while (req := await read_request(reader, conn, body=False)) is not None:
            if req.get("Transfer-Encoding"):
                while (await reader.readline()) not in (b"0\r\n", b""):
                    pass
                await reader.readline()
            if req.target == "/small":
                writer.write(response(b"s" * (100 * 1024)))
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
            chunk = b"d" * 65536
            while conn.sent < total:
                writer.write(chunk)
                conn.sent += len(chunk)
                await writer.drain()

    up = await raw_upstream(script)
    daemon = await start_proxy(make_proxy, up)
    sock = slow_client(daemon)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", daemon.port()))
    try:
        await loop.sock_sendall(sock, get("/small") + get(
            "/big", "localhost", "Transfer-Encoding: chunked", method="POST") + b"0\r\n\r\n")
        # never read: a well-behaved proxy stops reading the upstream within a few MB; one
        # without back-pressure takes in the 16 MiB limit in well under a second on loopback
        await asyncio.sleep(1)
        sent = sum(c.sent for c in up.conns)
    finally:
        sock.close()
    assert sent < 16 * 1024 * 1024, f"the proxy took in {sent >> 20} MiB for a stalled client"


# -- 4. truncation of a close-delimited body --------------------------------------------------


async def test_reset_in_a_close_delimited_body_is_visible_to_the_client(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """A response without Content-Length or chunked ends with the connection -- cleanly. An
    RST is not an end: the fast path must not finish the re-chunked body with 0\\r\\n\\r\\n,
    or the client takes a truncated body as complete. Fast path only: aiohttp's client reports
    a close-delimited body as complete whether the connection ended with FIN or RST (its
    connection_lost feeds EOF either way), a known gap of the aiohttp path (README)."""
    release = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        await read_request(reader, conn)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial-")
        await writer.drain()
        await release.wait()
        rst(writer)

    up = await raw_upstream(script)
    daemon = await start_proxy(make_proxy, up)
    async with connected(daemon.port()) as conn:
        await conn.send(get("/x"))
        head = await conn.response(head_only=True)
        assert 200 == head.status
        got = b""
        while b"partial-" not in got:
            got += await asyncio.wait_for(conn.reader.read(1024), 2)
        release.set()
        await conn.wait_closed(0.5)
        got += conn.trailing
    framing = (head.get("Transfer-Encoding") or "").lower()
    assert not (framing == "chunked" and got.endswith(b"0\r\n\r\n")), \
        "a reset upstream body was relayed as complete"


# -- 5. an upstream header line that never ends -----------------------------------------------


@pytest.mark.both_paths
async def test_endless_upstream_header_line_read_is_bounded(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """One response header line that never ends: httptools accumulates the partial value
    itself (quadratically) and calls on_header only at its end, so MAX_UPSTREAM_HEAD
    (pool.py:170) is never checked; the proxy reads and keeps everything until the route
    timeout (60 s by default). The same holds for the status reason (pool.py:166)."""
    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    conn: UpConn) -> None:
        await read_request(reader, conn)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Flood: ")
        chunk = b"f" * 65536
        while conn.sent < 256 * 1024 * 1024:
            writer.write(chunk)
            conn.sent += len(chunk)
            await writer.drain()

    up = await raw_upstream(flood)
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


# -- 6. preserve_host with Connection: Host ---------------------------------------------------


@pytest.mark.both_paths
async def test_preserve_host_with_connection_listed_host_still_sends_a_host(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """preserve_host: true and ``Connection: Host``: wire.request_headers drops the Host (it is
    Connection-listed, wire.py:51) and fast_request_head renders none (forward.py:313), so
    the upstream gets an HTTP/1.1 request without Host (RFC 9112 3.2: 400). aiohttp adds one."""
    up = await raw_upstream(serving())
    daemon = await start_proxy(make_proxy, up, {"preserve_host": True})
    async with connected(daemon.port()) as conn:
        await conn.send(get("/h", "localhost", "Connection: Host"))
        resp = await conn.response()
        assert_no_secret(resp.raw)
    assert 200 == resp.status
    assert [1] == [len([v for k, v in r.headers if k.lower() == "host"]) for r in up.requests]


# -- 7. a pipelined request behind an unread answer -------------------------------------------


@pytest.mark.both_paths
async def test_pipelined_request_behind_an_unread_answer_is_not_a_504(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """Request A's answer is still unread (client transport write-paused) when the pipelined
    POST B is sent upstream; _send pauses the upstream read (fastpath.py:571-572) while the
    route deadline runs (:578), so B -- executed upstream at once -- is answered 504 once the
    client reads on. aiohttp starts B only after A's answer has drained."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        while (req := await read_request(reader, conn)) is not None:
            body = b"a" * (100 * 1024) if req.target == "/a" else b"done"
            writer.write(response(body))
            await writer.drain()

    up = await raw_upstream(script)
    daemon = await start_proxy(make_proxy, up, {"timeout": "0.5s"})
    sock = slow_client(daemon)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", daemon.port()))
    got = bytearray()
    try:
        await loop.sock_sendall(sock, get("/a") + post("/b", b"123"))
        await asyncio.sleep(1.2)   # not reading, for longer than the route timeout
        with contextlib.suppress(TimeoutError):
            while not got.endswith((b"done", b"}")):
                data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 3)
                if not data:
                    break
                got += data
    finally:
        sock.close()
    assert [("/a", ""), ("/b", "123")] == [(r.target, r.body.decode()) for r in up.requests]
    assert got.endswith(b"done"), bytes(got[-300:])

