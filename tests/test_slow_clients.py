"""Clients that read slowly, late or never: flow control instead of buffering, and no request
started while its answer could not be written.

A client that takes none of its answers must not make the daemon read the upstream on its
behalf (memory), keep its connection slot for ever (send_timeout), or see a request it
pipelined answered 504 after the upstream ran it (the route timeout must not run while the
answer cannot be written). On the fast path this is FastConnection's write-paused state
(proxy/fast_path/connection.py): the next request waits while the client is not reading, and
a connection handed over to aiohttp's protocol is handed over paused. Every test runs on both
request paths, with small kernel buffers (tests/helpers/net.py) so that a 100 KiB answer
fills them as a slow network would.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket

import pytest

from tests.helpers.config import SHORT_TIMERS, MakeProxy
from tests.helpers.net import recv_until, slow_client, stall
from tests.helpers.rawhttp import first_answer, get
from tests.helpers.rawupstream import (
    MakeRaw,
    Req,
    Script,
    UpConn,
    connected,
    download_head,
    flood,
    post,
    read_request,
    response,
    serving,
    start_proxy,
)
from tests.helpers.wait import settled

pytestmark = pytest.mark.both_paths


async def _connect(sock: socket.socket, port: int) -> None:
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))


# -- the answer cannot be written: the next request waits ---------------------------------------


def _a_then_done() -> Script:
    """An upstream answering /a with 100 KiB (more than the small buffers hold) and anything
    else with "done"."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        while (req := await read_request(reader, conn)) is not None:
            body = b"a" * (100 * 1024) if req.target == "/a" else b"done"
            writer.write(response(body))
            await writer.drain()

    return script


@pytest.mark.slow
async def test_pipelined_request_behind_an_unread_answer_is_not_a_504(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """Request A's answer is still unread (the client's transport is write-paused) when the
    pipelined POST B would be sent upstream. Sent then, B runs upstream at once, but its answer
    cannot be written and the route deadline runs meanwhile: B would be answered 504 once the
    client reads on, though the upstream executed it. So B waits until A's answer has drained
    (aiohttp's protocol starts the next request only then, too)."""
    up = await raw_upstream(_a_then_done())
    daemon = await start_proxy(make_proxy, up, {"timeout": "0.5s"})
    sock = slow_client(daemon)
    await _connect(sock, daemon.port())
    try:
        await asyncio.get_running_loop().sock_sendall(sock, get("/a") + post("/b", b"123"))
        await asyncio.sleep(1.2)   # not reading, for longer than the route timeout
        got = await recv_until(sock, (b"done", b"}"), 3)   # "}": a problem+json answer
    finally:
        sock.close()
    assert [("/a", ""), ("/b", "123")] == [(r.target, r.body.decode()) for r in up.requests]
    assert got.endswith(b"done"), got[-300:]


@pytest.mark.slow
async def test_pipelined_request_sent_later_behind_an_unread_answer_is_not_a_504(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """The same when B arrives only after A's answer was written into the full socket: a new
    head that arrives while the client is not reading waits too, not only one already
    buffered when A finished."""
    up = await raw_upstream(_a_then_done())
    daemon = await start_proxy(make_proxy, up, {"timeout": "0.5s"})
    sock = slow_client(daemon)
    await _connect(sock, daemon.port())
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, get("/a"))
        await asyncio.sleep(0.3)   # A answered into a full client socket: write-paused
        await loop.sock_sendall(sock, post("/b", b"123"))
        await asyncio.sleep(0.8)   # not reading, for longer than the route timeout
        got = await recv_until(sock, b"done", 2)
    finally:
        sock.close()
    assert [("/a", ""), ("/b", "123")] == [(r.target, r.body.decode()) for r in up.requests]
    assert got.endswith(b"done"), got[-300:]


@pytest.mark.slow
async def test_request_after_a_drained_body_waits_for_an_unread_answer(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """The same from the other side: the upstream answers A (a large body, unread) before A's
    upload is complete; the rest of the upload and B then arrive together. The end of the
    dropped rest of A's body is where the next head is looked for, and there too B must wait
    while A's answer cannot be written, or B runs upstream and is answered 504."""
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
    await _connect(sock, daemon.port())
    loop = asyncio.get_running_loop()
    upload = b"u" * 2000
    try:
        await loop.sock_sendall(sock, post("/a", upload)[:-1000])
        await asyncio.sleep(0.3)   # A answered early into a full client socket
        await loop.sock_sendall(sock, upload[-1000:] + post("/b", b"123"))
        await asyncio.sleep(0.8)
        got = await recv_until(sock, b"done", 2)
    finally:
        sock.close()
    assert "/b" in [r.target for r in up.requests]
    assert got.endswith(b"done"), got[-300:]


# -- back-pressure across the handover to aiohttp -----------------------------------------------


@pytest.mark.slow
async def test_handover_keeps_write_backpressure(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """A fast-path answer leaves the client transport write-paused (the client is not
    reading); the next, pipelined request is handed over to aiohttp (here: a chunked upload).
    The transport will not call pause_writing again while it stays paused, so the handover
    tells aiohttp's protocol itself; otherwise aiohttp relays the download with no
    back-pressure and the proxy buffers all of it in memory (64 MiB here, unbounded)."""
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
            await flood(writer, conn, download_head(total), b"d" * 65536, total)

    up = await raw_upstream(script)
    daemon = await start_proxy(make_proxy, up)
    sock = slow_client(daemon)
    await _connect(sock, daemon.port())
    try:
        await asyncio.get_running_loop().sock_sendall(sock, get("/small") + get(
            "/big", "localhost", "Transfer-Encoding: chunked", method="POST") + b"0\r\n\r\n")
        # never read: a well-behaved proxy stops reading the upstream within a few MB; one
        # without back-pressure takes in the 16 MiB limit in well under a second on loopback
        await asyncio.sleep(1)
        sent = sum(c.sent for c in up.conns)
    finally:
        sock.close()
    assert sent < 16 * 1024 * 1024, f"the proxy took in {sent >> 20} MiB for a stalled client"


# -- an early answer to a client still sending --------------------------------------------------


@pytest.mark.slow
async def test_early_answer_to_a_large_upload_reaches_a_client_still_sending(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """The upstream refuses a large streamed upload at once (a 401 or 413 -- the common case
    of an expired token) while the client is still sending. With more than the fast path
    drops (DISCARD_LIMIT) still to come, the connection closes after the answer -- but a
    socket closed with unread bytes in its receive queue makes the kernel send an RST and drop
    what it had not yet transmitted: the client would get a reset instead of the answer. So
    the close lingers: FIN after the answer, the rest of the body read and dropped, then the
    close (aiohttp reads and drops the rest for up to its lingering_time, then closes with a
    FIN). The whole answer must arrive."""
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
    await _connect(sock, daemon.port())
    loop = asyncio.get_running_loop()
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


# -- clients that never read ---------------------------------------------------------------------


@pytest.mark.slow
async def test_clients_that_never_read_are_cut_off_at_send_timeout(
    make_proxy: MakeProxy, raw_upstream: MakeRaw, closing: list[socket.socket]
) -> None:
    """Clients that pipeline requests and never read would keep their connection slots past
    every other timer (header_timeout, keepalive_timeout, the route timeout): with
    max_connections of them, nobody else would be served again. limits.send_timeout (as
    nginx's) cuts off a client that takes none of its answer for that long -- on the aiohttp
    path while its handler waits for the answer to drain, on the fast path while the next
    request waits for the client to read."""
    up = await raw_upstream(serving(lambda req: response(b"z" * 20_000)))
    daemon = await start_proxy(make_proxy, up, {"timeout": "0.5s"},
                               limits={**SHORT_TIMERS, "max_connections": 2})
    for _ in range(2):
        closing.append(await stall(daemon.port(), get("/big"), 200))
    await asyncio.sleep(1.5)   # every timer has fired at least twice
    try:
        resp = await first_answer(daemon.port(), get("/x"), timeout=2.0)
        status: int | None = resp.status
    except TimeoutError:
        status = None
    assert 200 == status, "a new client waits forever behind two clients that do not read"


def _bounded_reader_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)   # no autotuning either
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


# An HTTP/1.0 keep-alive GET: the aiohttp path serves it on either path (a handover).
HTTP10_GET = get("/big", "localhost", "Connection: keep-alive", "Content-Length: 0",
                 version="HTTP/1.0")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["http/1.0 keep-alive", "chunked", "http/1.1"])
async def test_a_pipelining_client_that_never_reads_is_not_buffered_without_bound(
    make_proxy: MakeProxy, raw_upstream: MakeRaw, kind: str
) -> None:
    """A client pipelines 1,000 requests for 60 KB answers and reads none: tokenproxy stops
    taking its requests while its answers wait. Reading every answer from the upstream and
    holding it grew the daemon past a gigabyte in 20 s."""
    seen = [0]

    def answer(req: Req) -> bytes:
        seen[0] += 1
        return response(b"x" * 60_000)

    up = await raw_upstream(serving(answer))
    daemon = await start_proxy(make_proxy, up)
    one = {
        "http/1.0 keep-alive": HTTP10_GET,
        "chunked": get("/big", "localhost", "Transfer-Encoding: chunked", method="POST")
        + b"3\r\nabc\r\n0\r\n\r\n",
        "http/1.1": get("/big"),
    }[kind]
    sock = _bounded_reader_socket(daemon.port())
    try:
        await asyncio.get_running_loop().sock_sendall(sock, one * 1000)
        fetched = await settled(lambda: seen[0])   # the upstream's count, once it stops
    finally:
        sock.close()
    assert fetched < 300, f"{fetched} of 1000 answers fetched for a client that reads none"


@pytest.mark.slow
async def test_a_client_that_reads_late_still_gets_every_answer(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """Flow control, not loss: once the client reads, every pipelined answer arrives."""
    up = await raw_upstream(serving(lambda req: response(b"y" * 60_000)))
    daemon = await start_proxy(make_proxy, up)
    async with connected(daemon.port()) as conn:
        await conn.send(HTTP10_GET * 100)
        await asyncio.sleep(0.2)
        bodies = [len((await conn.response(timeout=10)).body) for _ in range(100)]
    assert [60_000] * 100 == bodies
