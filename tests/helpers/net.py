"""Sockets the tests need besides the raw client of rawhttp.py: a free port, a closed one, a
taken one, and clients that read slowly or never (small kernel buffers, so answers back up
into the proxy's own)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

from tokenproxy.daemon import Daemon


def free_port() -> int:
    """A loopback port that was free a moment ago (bind port 0, read it, close)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_port() -> int:
    """A loopback port nothing listens on: a connection to it is refused."""
    return free_port()


@contextlib.contextmanager
def busy_port() -> Iterator[int]:
    """A loopback port another socket listens on while the block runs (binding it fails)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield int(busy.getsockname()[1])


async def refused(port: int) -> bool:
    """True when a TCP connection to 127.0.0.1:*port* is refused."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except ConnectionRefusedError:
        return True
    writer.close()
    return False


def slow_client(daemon: Daemon) -> socket.socket:
    """A client socket, and proxy-side sockets, with small kernel buffers (accepted sockets
    inherit SO_SNDBUF from the listener): a 100 KiB answer then fills the proxy's transport
    buffer past its high-water mark, as a slow client on a real network would."""
    for ls in daemon.listeners:
        ls.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


async def recv_until(sock: socket.socket, end: bytes | tuple[bytes, ...],
                     timeout: float) -> bytes:
    """Read from a non-blocking *sock* until what came ends with *end* (or one of them), the
    peer closes, or nothing arrives for *timeout* seconds; what came."""
    loop = asyncio.get_running_loop()
    got = bytearray()
    with contextlib.suppress(TimeoutError):
        while not got.endswith(end):
            data = await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), timeout)
            if not data:
                break
            got += data
    return bytes(got)


def stalled_socket(port: int) -> socket.socket:
    """A client that will never read: the smallest receive buffer and segment size, so the
    daemon's answers back up into its own buffers after a few kilobytes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, 536)
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def stall(port: int, request: bytes, count: int) -> socket.socket:
    """A stalled_socket that sent *request* *count* times (as much of it as the daemon took
    within a second)."""
    sock = stalled_socket(port)
    loop = asyncio.get_running_loop()
    with contextlib.suppress(TimeoutError):   # the daemon stopped reading us: the point
        await asyncio.wait_for(loop.sock_sendall(sock, request * count), 1.0)
    return sock
