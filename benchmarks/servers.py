"""Helper processes for the benchmark: a token server and a fallback upstream.

    python benchmarks/servers.py token PORT LIFETIME DELAY_MS
    python benchmarks/servers.py upstream PORT BIG_BYTES
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

from tokenproxy.issuer import Issuer

SMALL = b'{"ok":true,"n":12345}'


def token_server(port: int, lifetime: float, delay_ms: float) -> None:
    issuer = Issuer(lifetime=lifetime, client_secret="bench-secret")  # noqa: S106

    async def slow(request: web.Request, grant: str) -> None:
        await asyncio.sleep(delay_ms / 1000)
        return None

    if delay_ms > 0:
        issuer.fault = slow
    web.run_app(issuer.app(), host="127.0.0.1", port=port, print=None, access_log=None)


def upstream(port: int, big: int) -> None:
    chunk = b"x" * 65536

    async def small(request: web.Request) -> web.Response:
        return web.Response(body=SMALL, content_type="application/json")

    async def download(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Length": str(big)})
        await resp.prepare(request)
        left = big
        while left > 0:
            part = chunk if left >= len(chunk) else chunk[:left]
            await resp.write(part)
            left -= len(part)
        return resp

    async def upload(request: web.Request) -> web.Response:
        async for _ in request.content.iter_any():
            pass
        return web.Response(body=SMALL, content_type="application/json")

    app = web.Application(client_max_size=2**40)
    app.router.add_get("/small", small)
    app.router.add_get("/big", download)
    app.router.add_post("/upload", upload)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


if __name__ == "__main__":
    kind, *args = sys.argv[1:]
    if kind == "token":
        token_server(int(args[0]), float(args[1]), float(args[2]))
    else:
        upstream(int(args[0]), int(args[1]))
