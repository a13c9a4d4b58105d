"""Both bodies stream: a gigabyte through the proxy leaves its resident memory flat.

The proxy runs in its own process so that VmHWM (peak resident set size) measures the proxy
alone; the upstream and the client are in the test process.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from tests.helpers.config import proxy_config, upstream_url
from tests.helpers.daemon_proc import running_daemon
from tests.helpers.fakes import TOKEN

pytestmark = pytest.mark.slow

GIB = 1 << 30
CHUNK = 64 * 1024
PEAK_RSS_LIMIT = 150 * 1000 * 1000   # bytes
TRANSFER_TIMEOUT = 30.0
PAUSE = 1.0   # seconds the reading side waits before it starts


def report(what: str, nbytes: int, seconds: float, peak: int, baseline: int) -> None:
    """One line on stderr with the figures (shown by pytest -s or on failure)."""
    print(f"{what}: {nbytes / GIB:.2f} GiB in {seconds:.2f}s = {nbytes / seconds / 1e6:.0f} MB/s;"
          f" proxy VmHWM {baseline / 1e6:.1f} MB at start, {peak / 1e6:.1f} MB after",
          file=sys.stderr)


def late_reader_app() -> web.Application:
    """An upstream that waits before reading an upload, so the proxy must hold back the client."""

    async def upload(request: web.Request) -> web.Response:
        await asyncio.sleep(PAUSE)
        total = 0
        async for part in request.content.iter_any():
            total += len(part)
        return web.json_response({"received": total, "te": request.headers.get("Transfer-Encoding"),
                                  "length": request.headers.get("Content-Length")})

    app = web.Application(client_max_size=2**40)
    app.router.add_post("/upload", upload)
    return app


async def test_1gib_download_streams_in_flat_memory(upstream: TestServer, tmp_path: Path) -> None:
    """A 1 GiB download to a client that starts reading late arrives whole; proxy RSS < 150 MB."""
    raw = proxy_config(upstream_url(upstream), TOKEN)
    async with running_daemon(raw, tmp_path) as daemon:
        baseline = daemon.peak_rss_bytes()
        received = 0
        foreign = 0
        started = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=TRANSFER_TIMEOUT)
        async with (
            aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session,
            session.get(daemon.url(f"/big?n={GIB}")) as resp,
        ):
            status = resp.status
            length = resp.headers.get("Content-Length")
            # The upstream keeps sending meanwhile: only backpressure keeps the proxy small.
            await asyncio.sleep(PAUSE)
            async for chunk in resp.content.iter_any():
                received += len(chunk)
                foreign += len(chunk) - chunk.count(b"x")
        took = time.monotonic() - started
        peak = daemon.peak_rss_bytes()
    report("download", received, took, peak, baseline)
    assert 200 == status
    assert str(GIB) == length
    assert GIB == received
    assert 0 == foreign
    assert peak < PEAK_RSS_LIMIT, f"proxy peak RSS {peak / 1e6:.1f} MB"


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_1gib_upload_streams_in_flat_memory(
    framing: str, aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    """A 1 GiB upload to an upstream that reads late arrives whole; proxy RSS < 150 MB."""
    chunk = b"u" * CHUNK   # preallocated: the generator hands out the same object each time

    async def body() -> AsyncIterator[bytes]:
        for _ in range(GIB // CHUNK):
            yield chunk

    headers = {"Content-Length": str(GIB)} if framing == "content-length" else {}
    server = await aiohttp_server(late_reader_app())
    raw = proxy_config(upstream_url(server), TOKEN)
    async with running_daemon(raw, tmp_path) as daemon:
        baseline = daemon.peak_rss_bytes()
        started = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=TRANSFER_TIMEOUT)
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(daemon.url("/upload"), data=body(), headers=headers) as resp,
        ):
            status = resp.status
            answer = json.loads(await resp.read())
        took = time.monotonic() - started
        peak = daemon.peak_rss_bytes()
    report(f"upload ({framing})", answer.get("received", 0), took, peak, baseline)
    assert 200 == status
    assert GIB == answer["received"]
    if framing == "content-length":
        assert (None, str(GIB)) == (answer["te"], answer["length"])
    else:
        assert ("chunked", None) == (answer["te"], answer["length"])
    assert peak < PEAK_RSS_LIMIT, f"proxy peak RSS {peak / 1e6:.1f} MB"
