"""A tiny raw HTTP/1.x client for requests no well-behaved client library would send, and for
checking what comes back byte for byte (and that no byte of it is a secret)."""

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
    """Send *data* on a new connection; the first response and whether the server then closed.

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


def get(path: str, host: str | None = "localhost", *extra: str, method: str = "GET",
        version: str = "HTTP/1.1") -> bytes:
    """A request head with *extra* header lines; no Host line when *host* is None."""
    lines = [f"{method} {path} {version}"]
    if host is not None:
        lines.append(f"Host: {host}")
    lines.extend(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
