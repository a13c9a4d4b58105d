"""A raw upstream: it reads exactly what the proxy sends (request line, header lines, body
bytes) and answers with exactly the bytes a test scripts -- garbage, resets and floods
included; and the helpers that drive a daemon in front of it over raw sockets. The
``raw_upstream`` fixture (tests/conftest.py) starts them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers.config import MakeProxy, proxy_config, rotate_token
from tests.helpers.fakes import TOKEN, TOKEN_2
from tests.helpers.rawhttp import RawConnection, get
from tokenproxy.daemon import Daemon


@dataclass
class Req:
    """One request as the raw upstream read it off the wire."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes = b""

    def get(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[0] if values else None


@dataclass
class UpConn:
    """One connection the upstream accepted: the requests it read, every byte it read
    (``data``), whether a request body ended before its Content-Length (``aborted``), what a
    streaming script wrote (``sent``); ``ended`` is set once it is closed."""

    requests: list[Req] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)
    aborted: bool = False
    sent: int = 0
    ended: asyncio.Event = field(default_factory=asyncio.Event)


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, UpConn], Awaitable[None]]


class RawUpstream:
    """An upstream on 127.0.0.1 whose every connection runs *script*."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.conns: list[UpConn] = []
        self.server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()

    async def start(self, limit: int = 2**16) -> RawUpstream:
        """Listen; *limit* bounds a line (and a head read with readuntil) per StreamReader."""
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=limit)
        return self

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def requests(self) -> list[Req]:
        return [r for c in self.conns for r in c.requests]

    @property
    def targets(self) -> list[str]:
        return [r.target for r in self.requests]

    @property
    def received(self) -> bytes:
        """Every byte read, over all connections."""
        return b"".join(bytes(c.data) for c in self.conns)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = UpConn()
        self.conns.append(conn)
        self._open.add(writer)
        try:
            await self.script(reader, writer, conn)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._open.discard(writer)
            conn.ended.set()
            writer.close()

    async def stop(self) -> None:
        """Stop listening and cut the connections still open (scripts waiting on them end)."""
        for writer in list(self._open):
            writer.transport.abort()
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.server.wait_closed(), 2)


async def read_request(reader: asyncio.StreamReader, conn: UpConn, *,
                       body: bool = True) -> Req | None:
    """One request head (and its Content-Length or chunked body); None at a clean EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        conn.data += exc.partial
        if not exc.partial:
            return None
        raise
    conn.data += head
    lines = head.decode("latin-1").split("\r\n")
    try:
        method, target, version = lines[0].split(" ", 2)
    except ValueError:
        return None   # not a request line: hang up
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    req = Req(method, target, version, headers)
    conn.requests.append(req)
    if body:
        req.body = await read_body(reader, req, conn)
    return req


async def read_body(reader: asyncio.StreamReader, req: Req, conn: UpConn) -> bytes:
    """The body of *req* (Content-Length or chunked), kept in ``conn.data`` too; a body that
    ends early sets ``conn.aborted`` (and raises IncompleteReadError)."""
    try:
        if req.get("Content-Length") is not None:
            data = await reader.readexactly(int(req.get("Content-Length") or 0))
            conn.data += data
            return data
        if "chunked" not in (req.get("Transfer-Encoding") or "").lower():
            return b""
        body = bytearray()
        while True:
            line = await reader.readline()
            conn.data += line
            size = int(line.split(b";")[0], 16)
            if size == 0:
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    conn.data += line
                conn.data += line
                return bytes(body)
            chunk = await reader.readexactly(size + 2)
            conn.data += chunk
            body += chunk[:-2]
    except asyncio.IncompleteReadError as exc:
        conn.data += exc.partial
        conn.aborted = True
        raise


def response(body: bytes = b"ok", status: str = "200 OK", *extra: str) -> bytes:
    """A Content-Length response with *extra* header lines (no Date, no Server)."""
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


BEARERS = {f"Bearer {TOKEN}": "token-1", f"Bearer {TOKEN_2}": "token-2"}


def echo(req: Req) -> bytes:
    """A 200 whose JSON body describes the request as the upstream saw it (the token by
    name only: the tests check that no secret reaches a client)."""
    auth = req.get("Authorization")
    return response(json.dumps({
        "method": req.method, "target": req.target, "len": len(req.body),
        "sha256": hashlib.sha256(req.body).hexdigest(),
        "auth": None if auth is None else BEARERS.get(auth, "other"),
    }).encode(), "200 OK", "Content-Type: application/json")


def refusing_first_token(token_file: Path) -> Callable[[Req], bytes]:
    """An answer for serving(): a request carrying TOKEN gets 401, and *token_file* then
    holds TOKEN_2 (what the proxy finds when it renews); any other request is echoed."""
    def answer(req: Req) -> bytes:
        if req.get("Authorization") == f"Bearer {TOKEN}":
            rotate_token(token_file)
            return response(b"refused", "401 Unauthorized")
        return echo(req)

    return answer


def echo_target(req: Req) -> bytes:
    """A 200 whose body is the request target as the upstream saw it."""
    return response(req.target.encode())


def serving(answer: Callable[[Req], bytes] = echo) -> Script:
    """Answer each request with answer(request); keep alive unless the answer says close."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        while (req := await read_request(reader, conn)) is not None:
            data = answer(req)
            writer.write(data)
            await writer.drain()
            if b"\r\nconnection: close\r\n" in data.split(b"\r\n\r\n", 1)[0].lower() + b"\r\n":
                return

    return script


def answer_with(data: bytes) -> Script:
    """Read the request head, write *data* (garbage, half an answer, nothing), close."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        await read_request(reader, conn, body=False)
        writer.write(data)
        await writer.drain()

    return script


async def flood(writer: asyncio.StreamWriter, conn: UpConn, head: bytes, piece: bytes,
                total: int) -> None:
    """Write *head*, then *piece* over and over as fast as the proxy takes it, until *total*
    bytes have gone after the head (counted in ``conn.sent``)."""
    writer.write(head)
    while conn.sent < total:
        writer.write(piece)
        conn.sent += len(piece)
        await writer.drain()


def download_head(total: int) -> bytes:
    """The head of a 200 answer with a *total*-byte body (for flood)."""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


# The raw_upstream fixture: make(script, limit=...) starts a RawUpstream.
MakeRaw = Callable[..., Awaitable[RawUpstream]]


async def start_proxy(make_proxy: MakeProxy, up: RawUpstream, route: dict[str, Any] | None = None,
                      **top: Any) -> Daemon:
    """A daemon with one route / -> the raw upstream (static TOKEN unless *top* says else)."""
    r = {"prefix": "/", "upstream": up.url(), "provider": "api", **(route or {})}
    return await make_proxy(proxy_config(up.url(), TOKEN, routes=[r], **top))


def post(path: str, body: bytes, *extra: str) -> bytes:
    return get(path, "localhost", f"Content-Length: {len(body)}", *extra, method="POST") + body


@contextlib.asynccontextmanager
async def connected(port: int) -> AsyncIterator[RawConnection]:
    conn = await RawConnection.open(port)
    try:
        yield conn
    finally:
        await conn.close()
