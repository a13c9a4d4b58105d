"""Second adversarial review of the fast path (proxy/fastpath.py, pool.py, wire.py, forward.py).

Each test shows one defect found by a second review of the fast path. Tests marked
``both_paths`` also run against the aiohttp path, which passes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from tests.conftest import MakeProxy, proxy_config
from tests.fakes import TOKEN
from tests.rawhttp import get
from tests.rawupstream import (
    MakeRaw,
    UpConn,
    connected,
    post,
    read_request,
    response,
    start_proxy,
)
from tests.test_fastpath_review import serving, slow_client
from tokenproxy.proxy.fast_path import exchange

# -- 1. a pipelined request that arrives after the unread answer ------------------------------


async def _recv_until(sock: socket.socket, end: bytes, timeout: float) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    with contextlib.suppress(TimeoutError):
        while not got.endswith(end):
            data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), timeout)
            if not data:
                break
            got += data
    return bytes(got)


@pytest.mark.both_paths
async def test_pipelined_request_sent_later_behind_an_unread_answer_is_not_a_504(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """An earlier fix made _finish hold the next request while the client is not reading
    (_next_waits, fastpath.py:513-517) -- but only for bytes already buffered. A request that
    arrives *after* A's answer was written goes through data_received -> _next_head
    (fastpath.py:180-191), which ignores _write_paused: B is sent upstream at once, _send
    pauses the upstream read (:608-609) while B's route deadline runs, and B -- executed
    upstream -- is answered 504."""
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
    try:
        await loop.sock_sendall(sock, get("/a"))
        await asyncio.sleep(0.3)   # A answered into a full client socket: write-paused
        await loop.sock_sendall(sock, post("/b", b"123"))
        await asyncio.sleep(0.8)   # not reading, for longer than the route timeout
        got = await _recv_until(sock, b"done", 2)
    finally:
        sock.close()
    assert [("/a", ""), ("/b", "123")] == [(r.target, r.body.decode()) for r in up.requests]
    assert got.endswith(b"done"), got[-300:]


@pytest.mark.both_paths
async def test_request_after_a_drained_body_waits_for_an_unread_answer(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """The same hole from the other side: the upstream answers A (a large body, unread) before
    A's upload is complete; the rest of the upload and B then arrive together. _feed_body ends
    the drain and calls _next_head (fastpath.py:411-417) whatever _write_paused says, so B
    starts while its answer cannot be written: 504 after B was executed upstream."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        while (req := await read_request(reader, conn, body=False)) is not None:
            if req.target == "/a":
                writer.write(response(b"a" * (100 * 1024)))
                await writer.drain()
                req.body = await reader.readexactly(int(req.get("Content-Length") or 0))
            else:
                req.body = await reader.readexactly(int(req.get("Content-Length") or 0))
                writer.write(response(b"done"))
                await writer.drain()

    up = await raw_upstream(script)
    daemon = await start_proxy(make_proxy, up, {"timeout": "0.5s", "retry_on": []})
    sock = slow_client(daemon)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", daemon.port()))
    upload = b"u" * 2000
    try:
        await loop.sock_sendall(sock, post("/a", upload)[:-1000])
        await asyncio.sleep(0.3)   # A answered early into a full client socket
        await loop.sock_sendall(sock, upload[-1000:] + post("/b", b"123"))
        await asyncio.sleep(0.8)
        got = await _recv_until(sock, b"done", 2)
    finally:
        sock.close()
    assert "/b" in [r.target for r in up.requests]
    assert got.endswith(b"done"), got[-300:]


# -- 2. an early answer to a large upload, then a close with unread bytes ---------------------


@pytest.mark.both_paths
async def test_early_answer_to_a_large_upload_reaches_a_client_still_sending(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """The upstream refuses a large streamed upload at once (a 401 or 413 -- the common case
    of an expired token) while the client is still sending. With more than DISCARD_LIMIT to
    come, _finish closes the transport (fastpath.py:504-511) and stops reading; once the
    answer is flushed to the kernel the socket is closed with unread bytes in its receive
    queue, so the kernel sends an RST and drops what it had not yet transmitted: the client
    gets a reset instead of the answer. (No lingering close; aiohttp reads and drops the
    rest for up to lingering_time, then closes with a FIN.) The answer is also rendered
    without Connection: close although the connection is about to be cut."""
    answer = b"r" * (200 * 1024)
    finished = asyncio.Event()

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        while await read_request(reader, conn, body=False) is not None:
            writer.write(response(answer, "413 Content Too Large"))
            await writer.drain()
            with contextlib.suppress(TimeoutError):   # reads none of the body
                await asyncio.wait_for(finished.wait(), 5)
            return

    up = await raw_upstream(script)
    daemon = await start_proxy(make_proxy, up, {"retry_on": []})
    sock = slow_client(daemon)
    sock.setblocking(False)
    loop = asyncio.get_running_loop()
    await loop.sock_connect(sock, ("127.0.0.1", daemon.port()))
    body = b"u" * (8 * 1024 * 1024)
    sending = asyncio.ensure_future(loop.sock_sendall(sock, post("/up", body)))
    got = bytearray()
    try:
        await asyncio.sleep(0.5)   # the answer waits in the proxy; the upload is still going
        with contextlib.suppress(TimeoutError, ConnectionError):
            while len(got.partition(b"\r\n\r\n")[2]) < len(answer):
                await asyncio.sleep(0.002)   # a slow reader: the proxy's send queue stays full
                data = await asyncio.wait_for(loop.sock_recv(sock, 4096), 3)
                if not data:
                    break
                got += data
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sending
        sock.close()
        finished.set()
        await asyncio.sleep(0.05)
    head, _, rest = bytes(got).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert len(answer) == len(rest), f"{len(rest)} of {len(answer)} body bytes arrived"


# -- 3. an exception after the upstream answered ----------------------------------------------


@pytest.mark.both_paths
async def test_location_rewritten_with_non_latin1_characters(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """A Location inside the route's upstream carrying UTF-8 is rewritten to the proxy path.
    wire.response_headers once encoded the rewritten value as latin-1: UnicodeEncodeError,
    and the fast path answered 500 internal. aiohttp sends the 302 (its headers are written
    as UTF-8), and so must the fast path."""
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


async def test_upstream_connection_closed_when_the_relay_fails_internally(
    make_proxy: MakeProxy, raw_upstream: MakeRaw, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any exception between _send and _release (here: the response-head rendering, as with
    the Location above) ends in _exchange's `except Exception`; _finish then sets
    self._upstream = None (fastpath.py:499) without aborting it, so the upstream connection
    is neither pooled nor closed: its socket stays open (and its body unread) until the
    upstream gives up. The aiohttp path closes it (up.close() in _relay's finally)."""
    def boom(*args: object, **kwargs: object) -> list[tuple[bytes, bytes]]:
        raise RuntimeError("injected")

    up = await raw_upstream(serving())
    daemon = await start_proxy(make_proxy, up)
    monkeypatch.setattr(exchange, "response_headers", boom)
    async with connected(daemon.port()) as conn:
        await conn.send(get("/x"))
        resp = await conn.response()
    assert 500 == resp.status
    [upconn] = up.conns
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(upconn.ended.wait(), 1)
    assert upconn.ended.is_set(), "the upstream connection was left open, owned by no one"


# -- 4. idle upstream connections ----------------------------------------------------------------


async def test_idle_pooled_connection_is_closed_after_the_pool_keepalive(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """UpstreamPool drops an expired idle connection only when take() or release() is called
    for the same origin (pool.py:284-366); nothing sweeps the pool. After a burst, up to
    MAX_IDLE_PER_ORIGIN sockets per origin stay open for as long as the upstream keeps them
    (for ever with an upstream that has no idle timeout), and those of an origin that a
    reload removed -- or of an in-flight request released into the pool after reload's
    pool.close() under an old TLS context's key -- are never taken again. aiohttp's
    connector closes idle connections after its keepalive_timeout (15 s) with a timer.
    (The pool's keepalive is shortened here to keep the test fast.)"""
    up = await raw_upstream(serving())
    daemon = await start_proxy(make_proxy, up)
    assert daemon._fast is not None
    daemon._fast.pool.keepalive = 0.2
    async with connected(daemon.port()) as conn:
        await conn.send(get("/x"))
        assert 200 == (await conn.response()).status
    [upconn] = up.conns
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(upconn.ended.wait(), 1.5)
    assert upconn.ended.is_set(), "an expired idle upstream connection is still open"


# -- 5. trailers ------------------------------------------------------------------------------


@pytest.mark.both_paths
async def test_upstream_trailers_never_become_response_headers(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """httptools reports trailer fields through on_header, and UpstreamConn.on_header appends
    them to self._headers (pool.py:201-205) -- the very list the resolved ResponseHead holds.
    When the whole chunked response arrives in one read (any small one), the trailers are
    in that list before _relay renders the head: they go out as response headers (here a
    Set-Cookie, which RFC 9110 section 6.5.1 forbids in trailers and no client applies from
    one, and a second Content-Type). aiohttp drops trailers."""
    def answer(req: object) -> bytes:
        return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                b"Transfer-Encoding: chunked\r\nTrailer: Set-Cookie, Content-Type, X-Trailer\r\n"
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
