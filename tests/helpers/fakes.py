"""Real in-process fakes: the suite's secrets, clocks the tests move by hand, and an upstream
that records what it receives."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer

# Secrets used across the suite; the log sweep in tests/conftest.py fails any test whose logs
# show one, and the raw-socket helpers fail any answer that carries one.
TOKEN = "tp-test-token-7f3a9c41e8"
TOKEN_2 = "tp-test-token-2b6d0f93aa"
CLIENT_KEY = "tp-client-key-0123456789abcdef"
CLIENT_SECRET = "tp-client-secret-55aa77bb"
PASSWORD = "tp-password-c0ffee"
REFRESH_TOKEN = "tp-refresh-token-91d2"
SECRETS = (TOKEN, TOKEN_2, CLIENT_KEY, CLIENT_SECRET, PASSWORD, REFRESH_TOKEN)


def assert_no_secret(*data: bytes | str, extra: Iterable[str] = ()) -> None:
    """Fail if any of the secrets above, or of *extra* (a test's own: keys, assertions,
    issued tokens), appears in any of *data* (answers, output, files)."""
    texts = [d if isinstance(d, str) else d.decode("latin-1") for d in data]
    leaked = [s for s in (*SECRETS, *extra) if s and any(s in text for text in texts)]
    assert [] == leaked


class FakeClock:
    """A clock tests move by hand: monotonic and wall time advance together, and sleepers on
    it wake only when the test advances it past their deadline."""

    def __init__(self, start: float = 1000.0) -> None:
        self._mono = start
        self._wall = 1_800_000_000.0
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def monotonic(self) -> float:
        return self._mono

    def time(self) -> float:
        return self._wall

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sleepers.append((self._mono + seconds, fut))
        await fut

    def advance(self, seconds: float) -> None:
        self._mono += seconds
        self._wall += seconds
        due = [(t, f) for t, f in self._sleepers if t <= self._mono]
        self._sleepers = [(t, f) for t, f in self._sleepers if t > self._mono]
        for _, fut in due:
            if not fut.done():
                fut.set_result(None)

    async def tick(self, seconds: float, settle: int = 20) -> None:
        """Advance, then let woken tasks run (bounded number of loop turns)."""
        self.advance(seconds)
        for _ in range(settle):
            await asyncio.sleep(0)


class JumpClock(FakeClock):
    """The FakeClock plus what the token tests need: counting live sleepers, moving wall time
    alone (a clock jump), and starting at a chosen wall time."""

    def napping(self) -> int:
        return sum(1 for _, fut in self._sleepers if not fut.done())

    def jump_wall(self, seconds: float) -> None:
        self._wall += seconds

    def set_wall(self, wall: float) -> None:
        self._wall = wall


@dataclass
class Seen:
    """One request as the upstream received it."""

    method: str
    raw_path: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class FakeUpstream:
    """Records every request (and the TCP peer port it came from); endpoints script the
    behaviours the proxy must relay. Any other path (any method) is answered by ``any``:
    JSON naming the method, the raw path and the body's SHA-256, or as its query says --
    ``status=N`` answers N, a path ending ``/redirect`` answers 302 to ``to``; a HEAD gets
    the headers of a 5-byte body. The ``upstream`` fixture (tests/conftest.py) starts it and
    sets ``server``."""

    seen: list[Seen] = field(default_factory=list)
    ports: list[int] = field(default_factory=list)
    ws_headers: list[list[tuple[str, str]]] = field(default_factory=list)
    first_bytes: asyncio.Event = field(default_factory=asyncio.Event)   # /upload's first part
    server: TestServer | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._record], client_max_size=2**40)
        r = app.router
        r.add_route("*", "/echo{tail:.*}", self.echo)
        r.add_route("*", "/status/{code}", self.status)
        r.add_get("/big", self.big)
        r.add_route("*", "/upload", self.upload)
        r.add_get("/sse", self.sse)
        r.add_get("/gzip", self.gzip)
        r.add_get("/cookies", self.cookies)
        r.add_get("/slow", self.slow)
        r.add_get("/truncate", self.truncate)
        r.add_get("/truncate-chunked", self.truncate_chunked)
        r.add_get("/hop", self.hop)
        r.add_get("/echo-token", self.echo_token)
        r.add_get("/ws", self.ws)
        r.add_route("*", "/{tail:.*}", self.any)
        return app

    def url(self, path: str = "/") -> str:
        assert self.server is not None, "not started: ask for the upstream fixture too"
        return f"http://127.0.0.1:{self.server.port}{path}"

    @property
    def last(self) -> Seen:
        return self.seen[-1]

    @web.middleware
    async def _record(self, request: web.Request, handler: Any) -> web.StreamResponse:
        body = b""
        if request.path not in ("/upload",) and request.can_read_body:
            body = await request.read()
        self.seen.append(Seen(request.method, request.raw_path, list(request.headers.items()),
                              body))
        assert request.transport is not None
        self.ports.append(request.transport.get_extra_info("peername")[1])
        return await handler(request)

    async def any(self, request: web.Request) -> web.StreamResponse:
        if request.path.endswith("/redirect"):
            return web.Response(status=302, headers={"Location": request.query["to"]})
        status = int(request.query.get("status", "200"))
        if status in (204, 304):
            return web.Response(status=status)
        if request.method == "HEAD":
            return web.Response(body=b"hello")
        body = await request.read()
        return web.json_response({"raw_path": request.raw_path, "method": request.method,
                                  "body_sha256": hashlib.sha256(body).hexdigest()},
                                 status=status)

    async def echo(self, request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body_len": len(body),
            "body_sha256": hashlib.sha256(body).hexdigest(),
        })

    async def status(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        if code in (204, 304):
            return web.Response(status=code)
        return web.Response(status=code, text=f"status {code}\n")

    async def big(self, request: web.Request) -> web.StreamResponse:
        n = int(request.query.get("n", "1048576"))
        chunk = b"x" * 65536
        resp = web.StreamResponse(headers={"Content-Length": str(n)})
        await resp.prepare(request)
        left = n
        while left > 0:
            part = chunk if left >= len(chunk) else chunk[:left]
            await resp.write(part)
            left -= len(part)
        await resp.write_eof()
        return resp

    async def upload(self, request: web.Request) -> web.Response:
        """The body read as it arrives (``first_bytes`` is set once its first part is in)."""
        total = 0
        digest = hashlib.sha256()
        async for chunk in request.content.iter_any():
            self.first_bytes.set()
            total += len(chunk)
            digest.update(chunk)
        return web.json_response({"received": total, "body_sha256": digest.hexdigest()})

    async def sse(self, request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(3):
            await resp.write(f"data: event {i}\n\n".encode())
            await asyncio.sleep(float(request.query.get("gap", "0.3")))
        await resp.write_eof()
        return resp

    async def gzip(self, request: web.Request) -> web.Response:
        data = gzip.compress(b"hello gzip " * 100)
        return web.Response(body=data, headers={"Content-Encoding": "gzip",
                                                "Content-Type": "text/plain"})

    async def cookies(self, request: web.Request) -> web.Response:
        resp = web.Response(text="cookies")
        resp.headers.add("Set-Cookie", "a=1; Path=/")
        resp.headers.add("Set-Cookie", "b=2; Path=/")
        return resp

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("delay", "5")))
        return web.Response(text="slow")

    async def truncate(self, request: web.Request) -> web.StreamResponse:
        """100 bytes of a 1000-byte body, then the connection closed."""
        resp = web.StreamResponse(headers={"Content-Length": "1000"})
        return await self._cut(request, resp, b"y")

    async def truncate_chunked(self, request: web.Request) -> web.StreamResponse:
        """100 bytes of a chunked body, then the connection closed."""
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        return await self._cut(request, resp, b"z")

    @staticmethod
    async def _cut(request: web.Request, resp: web.StreamResponse,
                   fill: bytes) -> web.StreamResponse:
        await resp.prepare(request)
        await resp.write(fill * 100)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.close()
        return resp

    async def hop(self, request: web.Request) -> web.Response:
        """An answer with hop-by-hop fields, and a name its Connection lists."""
        resp = web.Response(text="hop")
        resp.headers.add("Connection", "X-Up-Hop")
        resp.headers.add("X-Up-Hop", "1")
        resp.headers.add("Keep-Alive", "timeout=5")
        resp.headers.add("Proxy-Agent", "up")
        resp.headers.add("X-Kept", "yes")
        return resp

    async def echo_token(self, request: web.Request) -> web.Response:
        return web.Response(text="ok", headers={
            "X-Echo": request.headers.get("Authorization", ""), "X-Other": "kept"})

    async def ws(self, request: web.Request) -> web.WebSocketResponse:
        self.ws_headers.append(list(request.headers.items()))
        ws = web.WebSocketResponse(protocols=("chat",))
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                await ws.send_str("echo:" + msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
        return ws
