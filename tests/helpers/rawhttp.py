"""A tiny raw HTTP/1.x client for requests no well-behaved client library would send, and for
checking what comes back byte for byte (and that no byte of it is a secret): a connection
that reads one response at a time, and a buffering one that keeps every byte, also those that
came before a reset, for a test that parses answers off the buffer itself."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass
from typing import Any

from tests.helpers.fakes import assert_no_secret

TIMEOUT = 2.0


@dataclass
class RawResponse:
    """One response as it came off the wire."""

    status: int
    version: str
    headers: list[tuple[str, str]]
    body: bytes
    raw: bytes

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]

    def get(self, name: str) -> str | None:
        values = self.header(name)
        return values[0] if values else None

    def json(self) -> Any:
        return json.loads(self.body)


def assert_problem(resp: RawResponse, status: int, cause: str) -> None:
    """*resp* is tokenproxy's own problem+json answer for *cause*."""
    assert status == resp.status
    assert [cause] == resp.header("Tokenproxy-Error")
    assert "application/problem+json" == (resp.get("Content-Type") or "").split(";")[0]
    doc = resp.json()
    assert status == doc["status"]
    assert "urn:tokenproxy:problem:" + cause == doc["type"]


class RawConnection:
    """A client connection that writes exact bytes and parses what comes back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.opened = time.monotonic()
        self.trailing = b""   # bytes that arrived after the last parsed response

    @classmethod
    async def open(cls, port: int, host: str = "127.0.0.1") -> RawConnection:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), TIMEOUT)
        return cls(reader, writer)

    @classmethod
    async def open_unix(cls, path: str) -> RawConnection:
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), TIMEOUT)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def request(self, head: str, body: bytes = b"", *, head_only: bool = False,
                      timeout: float = 5.0) -> RawResponse:
        """Send *head*, written with "\\n" line ends (sent as CRLF), and *body*; the answer."""
        await self.send(head.replace("\n", "\r\n").encode("latin-1") + body)
        return await self.response(timeout, head_only)

    async def response(self, timeout: float = TIMEOUT, head_only: bool = False) -> RawResponse:
        """Read one response; EOFError if the server closes before a status line."""
        return await asyncio.wait_for(self._read_response(head_only), timeout)

    async def _read_response(self, head_only: bool) -> RawResponse:
        raw = bytearray()
        status_line = await self.reader.readline()
        if not status_line:
            raise EOFError("connection closed before a response")
        raw += status_line
        version, status, *_ = status_line.decode("latin-1").split(" ", 2)
        headers: list[tuple[str, str]] = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise EOFError("connection closed inside a response head")
            raw += line
            if line in (b"\r\n", b"\n"):
                break
            name, _, value = line.decode("latin-1").partition(":")
            headers.append((name.strip(), value.strip()))
        resp = RawResponse(int(status), version, headers, b"", b"")
        code = int(status)
        if head_only or code < 200 or code in (204, 304):
            body = b""
        elif resp.get("Content-Length") is not None:
            body = await self.reader.readexactly(int(resp.get("Content-Length") or 0))
        elif "chunked" in (resp.get("Transfer-Encoding") or "").lower():
            body = await self._read_chunked(raw)
        else:
            body = await self.reader.read()   # delimited by the close
        raw += body
        resp.body = bytes(body)
        resp.raw = bytes(raw)
        return resp

    async def _read_chunked(self, raw: bytearray) -> bytes:
        body = bytearray()
        while True:
            size_line = await self.reader.readline()
            raw += size_line
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (line := await self.reader.readline()) not in (b"\r\n", b"\n", b""):
                    raw += line
                return bytes(body)
            body += await self.reader.readexactly(size)
            await self.reader.readexactly(2)

    async def wait_closed(self, timeout: float = TIMEOUT) -> float | None:
        """Seconds since the connection opened when the server closed it, None if still open.

        Bytes that arrive meanwhile are kept in ``trailing``.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            left = deadline - loop.time()
            if left <= 0:
                return None
            try:
                data = await asyncio.wait_for(self.reader.read(65536), left)
            except TimeoutError:
                return None
            except ConnectionError:
                return time.monotonic() - self.opened
            if not data:
                return time.monotonic() - self.opened
            self.trailing += data

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), TIMEOUT)


async def exchange(port: int, data: bytes, timeout: float = TIMEOUT) -> tuple[RawResponse, bool]:
    """Send *data* on a new connection; the first response and whether the server then closed
    (a keep-alive answer is watched 50 ms for a close: use first_answer() when that does not
    matter).

    Every byte of the answer is checked for secrets.
    """
    conn = await RawConnection.open(port)
    try:
        await conn.send(data)
        resp = await conn.response(timeout)
        wait = timeout if resp.get("Connection") == "close" else 0.05
        closed = await conn.wait_closed(wait) is not None
        assert_no_secret(resp.raw + conn.trailing)
        return resp, closed
    finally:
        await conn.close()


async def first_answer(port: int, data: bytes, timeout: float = TIMEOUT) -> RawResponse:
    """Send *data* on a new connection; the first response (checked for secrets)."""
    conn = await RawConnection.open(port)
    try:
        await conn.send(data)
        resp = await conn.response(timeout)
        assert_no_secret(resp.raw)
        return resp
    finally:
        await conn.close()


def get(path: str, host: str | None = "localhost", *extra: str, method: str = "GET",
        version: str = "HTTP/1.1") -> bytes:
    """A request head with *extra* header lines; no Host line when *host* is None."""
    lines = [f"{method} {path} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


class BufferingClient(asyncio.Protocol):
    """Keeps every byte received, also those that arrived before a reset (a StreamReader
    raises the reset at the next read and loses what it buffered); read_response() takes
    the answers off ``buf``."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.received = bytearray()   # everything, for the secret check
        self.closed = False
        self.transport: asyncio.Transport | None = None
        self._wake = asyncio.Event()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self.received += data
        self._wake.set()

    def eof_received(self) -> None:
        self.closed = True
        self._wake.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake.set()

    async def more(self, deadline: float) -> None:
        """Wait for bytes or the close; TimeoutError at *deadline* (loop time)."""
        self._wake.clear()
        left = deadline - asyncio.get_running_loop().time()
        await asyncio.wait_for(self._wake.wait(), max(left, 0))


def parse_response(buf: bytearray, head_request: bool, closed: bool,
                   ) -> tuple[RawResponse, int] | None:
    """The first response in *buf* and its size, or None while it is incomplete. A first
    line that is not a status line gives status -1 (the previous answer had more body than
    it said)."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = bytes(buf[:end]).decode("latin-1").split("\r\n")
    try:
        status = int(lines[0].split(" ")[1])
    except (IndexError, ValueError):
        status = -1
    headers = []
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers.append((name.strip(), value.strip()))
    resp = RawResponse(status, lines[0].split(" ")[0], headers, b"", b"")
    size = _response_size(resp, buf, end + 4, head_request, closed)
    if size is None:
        return None
    resp.raw = bytes(buf[:size])
    return resp, size


def _response_size(resp: RawResponse, buf: bytearray, pos: int, head_request: bool,
                   closed: bool) -> int | None:
    """Where the answer whose body starts at *pos* ends (its body set), or None while it is
    incomplete."""
    if head_request or resp.status < 200 or resp.status in (204, 304):
        return pos
    if "chunked" in (resp.get("Transfer-Encoding") or "").lower():
        body = bytearray()
        while True:
            eol = buf.find(b"\r\n", pos)
            if eol < 0:
                return None
            size = int(bytes(buf[pos:eol]).split(b";")[0], 16)
            pos = eol + 2
            if size == 0:
                end = buf.find(b"\r\n\r\n", pos - 2)
                if end < 0:
                    return None
                resp.body = bytes(body)
                return end + 4
            if len(buf) < pos + size + 2:
                return None
            body += buf[pos:pos + size]
            pos += size + 2
    length = resp.get("Content-Length")
    if length is not None:
        if len(buf) < pos + int(length):
            return None
        resp.body = bytes(buf[pos:pos + int(length)])
        return pos + int(length)
    if not closed:
        return None
    resp.body = bytes(buf[pos:])
    return len(buf)


async def read_response(client: BufferingClient, head_request: bool, deadline: float,
                        ) -> RawResponse | None:
    """One response off the client's buffer; None if the connection closed first;
    TimeoutError at *deadline* (loop time)."""
    while True:
        parsed = parse_response(client.buf, head_request, client.closed)
        if parsed is not None:
            resp, size = parsed
            del client.buf[:size]
            return resp
        if client.closed:
            return None
        await client.more(deadline)
