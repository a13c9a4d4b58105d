"""Bodies of 1 MiB or more moved by splice(2) between the sockets (fast_path/splice.py):
what the copy path guarantees holds for them too -- the bytes arrive whole and the connections
go on, a truncated body looks truncated, a client that leaves or stops reading costs the
upstream connection, an early answer ends the upload."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json

import pytest

from tests.helpers.config import SHORT_TIMERS, MakeProxy
from tests.helpers.net import stalled_socket
from tests.helpers.rawhttp import get
from tests.helpers.rawupstream import (
    MakeRaw,
    UpConn,
    connected,
    download_head,
    echo,
    post,
    read_request,
    reset,
    response,
    serving,
    start_proxy,
)
from tokenproxy.proxy.fast_path import splice

pytestmark = pytest.mark.skipif(not splice.AVAILABLE, reason="no os.splice here")

BIG = 4 * 1024 * 1024
BODY = bytes(range(256)) * (BIG // 256)


async def test_downloads_arrive_whole_and_the_connections_go_on(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    up = await raw_upstream(serving(lambda req: response(BODY) if req.target == "/big"
                                    else response(b"small")))
    daemon = await start_proxy(make_proxy, up)
    async with connected(daemon.port()) as conn:
        for path in ("/big", "/small", "/big", "/small"):
            await conn.send(get(path))
            resp = await conn.response(timeout=10)
            assert 200 == resp.status
            assert (BODY if path == "/big" else b"small") == resp.body
    assert 1 == len(up.conns), "the upstream connection went back to the pool after each"


async def test_uploads_arrive_whole_and_the_connections_go_on(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    up = await raw_upstream(serving(echo))
    daemon = await start_proxy(make_proxy, up, {"retry_on": []})   # streamed, not held
    async with connected(daemon.port()) as conn:
        for _ in range(2):
            await conn.send(post("/up", BODY))
            resp = await conn.response(timeout=10)
            assert 200 == resp.status
            seen = json.loads(resp.body)
            assert (BIG, hashlib.sha256(BODY).hexdigest()) == (seen["len"], seen["sha256"])
            await conn.send(get("/after"))
            assert 200 == (await conn.response(timeout=10)).status


async def test_a_truncated_download_looks_truncated(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        await read_request(reader, conn)
        writer.write(download_head(BIG) + BODY[:BIG // 2])
        await writer.drain()
        reset(writer)

    up = await raw_upstream(script)
    daemon = await start_proxy(make_proxy, up)
    async with connected(daemon.port()) as conn:
        await conn.send(get("/big"))
        resp = await conn.response(timeout=10, head_only=True)
        assert 200 == resp.status
        got = await asyncio.wait_for(conn.reader.read(), 10)   # until the proxy closes
        assert len(got) < BIG


async def test_a_client_that_leaves_mid_download_costs_the_upstream_connection(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        await read_request(reader, conn)
        writer.write(download_head(64 * BIG))
        for _ in range(64):
            writer.write(BODY)
            await writer.drain()   # raises once the proxy closed: the script ends

    up = await raw_upstream(script)
    daemon = await start_proxy(make_proxy, up)
    async with connected(daemon.port()) as conn:
        await conn.send(get("/big"))
        await conn.response(timeout=10, head_only=True)
        await conn.reader.readexactly(BIG)
    await asyncio.wait_for(up.conns[0].ended.wait(), 5)


async def test_a_client_that_stops_reading_a_download_is_cut_off_at_send_timeout(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    up = await raw_upstream(serving(lambda req: response(BODY)))
    daemon = await start_proxy(make_proxy, up, limits=SHORT_TIMERS)
    sock = stalled_socket(daemon.port())
    try:
        sock.sendall(get("/big"))
        await asyncio.sleep(1.5)   # send_timeout 0.3 s, many times over
        await asyncio.wait_for(up.conns[0].ended.wait(), 5)
        loop = asyncio.get_running_loop()
        got = 0
        with contextlib.suppress(ConnectionError):
            while data := await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 5):
                got += len(data)
        assert got < BIG, "the client's connection was cut"
    finally:
        sock.close()


async def test_an_early_answer_ends_a_spliced_upload(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        await read_request(reader, conn, body=False)
        writer.write(response(b"too big", "413 Content Too Large"))
        await writer.drain()
        while await reader.read(65536):   # slowly, until the proxy closes
            await asyncio.sleep(0.05)

    up = await raw_upstream(script)
    daemon = await start_proxy(make_proxy, up, {"retry_on": []}, limits=SHORT_TIMERS)
    async with connected(daemon.port()) as conn:
        conn.writer.write(post("/up", BODY))   # more than the sockets hold: never drained
        resp = await conn.response(timeout=10)
        assert (413, b"too big") == (resp.status, resp.body)
        with contextlib.suppress(ConnectionError):
            assert b"" == await asyncio.wait_for(conn.reader.read(), 10), "then it closes"
    await asyncio.wait_for(up.conns[0].ended.wait(), 5)
