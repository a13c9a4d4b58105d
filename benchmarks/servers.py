"""Helper processes for the benchmark: a token server, a fallback upstream, an upload sink.

    python benchmarks/servers.py token PORT LIFETIME DELAY_MS   # GET /bench/stats: its calls
    python benchmarks/servers.py upstream PORT BIG_BYTES [CERT KEY]   # over TLS with CERT
    python benchmarks/servers.py sink PORT

The sink reads every byte of a Content-Length upload before it answers. nginx's `return 200`
answers at once and discards the body itself, and a proxy in front of it may then drop the
rest of the upload without relaying it -- which measures discarding, not relaying.
"""

from __future__ import annotations

import asyncio
import re
import ssl
import sys
from typing import Any

from aiohttp import web

from tokenproxy.demo.issuer import Issuer

SMALL = b'{"ok":true,"n":12345}'


def token_server(port: int, lifetime: float, delay_ms: float) -> None:
    issuer = Issuer(lifetime=lifetime, client_secret="bench-secret")  # noqa: S106

    async def slow(request: web.Request, grant: str) -> None:
        await asyncio.sleep(delay_ms / 1000)
        return None

    async def stats(request: web.Request) -> web.Response:
        # Token-endpoint calls so far (every grant, answered or not): the replica storm counts
        # the calls one expiry costs as the difference around it.
        return web.json_response({"calls": issuer.stats.calls, "grants": issuer.stats.grants})

    if delay_ms > 0:
        issuer.fault = slow
    app = issuer.app()
    app.router.add_get("/bench/stats", stats)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def upstream(port: int, big: int, tls: list[str] | None = None) -> None:
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

    @web.middleware
    async def token_required(request: web.Request, handler: Any) -> web.StreamResponse:
        if not request.headers.get("Authorization", "").startswith("Bearer "):
            return web.Response(status=401)
        response: web.StreamResponse = await handler(request)
        return response

    app = web.Application(client_max_size=2**40, middlewares=[token_required])
    app.router.add_get("/small", small)
    app.router.add_get("/big", download)
    app.router.add_post("/upload", upload)
    context = None
    if tls:   # the intercepted-HTTPS measurement's upstream when nginx is not installed
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls[0], tls[1])
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None,
                ssl_context=context)


class Sink(asyncio.Protocol):
    """HTTP/1.1 uploads with Content-Length: read them whole, then answer (keep-alive)."""

    def __init__(self) -> None:
        self.transport: Any = None
        self.head = b""
        self.left = -1
        self.authorized = False

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        while data:
            if self.left < 0:
                self.head += data
                end = self.head.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = self.head[:end]
                m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                self.left = int(m[1]) if m else 0
                self.authorized = re.search(rb"(?i)\r\nauthorization: bearer .", head) is not None
                data, self.head = self.head[end + 4:], b""
            take = min(self.left, len(data))
            self.left -= take
            data = data[take:]
            if self.left == 0:
                self.left = -1
                # Without a token: 401 (curl --fail counts it), after the body was read.
                status = b"200 OK" if self.authorized else b"401 Unauthorized"
                self.transport.write(b"HTTP/1.1 %b\r\nContent-Type: application/json\r\n"
                                     b"Content-Length: %d\r\n\r\n%b" % (status, len(SMALL),
                                                                        SMALL))


async def sink(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Sink, "127.0.0.1", port, backlog=1024)
    await server.serve_forever()


if __name__ == "__main__":
    kind, *args = sys.argv[1:]
    if kind == "token":
        token_server(int(args[0]), float(args[1]), float(args[2]))
    elif kind == "sink":
        import uvloop

        uvloop.run(sink(int(args[0])))
    else:
        upstream(int(args[0]), int(args[1]), args[2:4])
