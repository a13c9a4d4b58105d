"""CONNECT to a ``tunnel`` host: bytes relayed both ways, never decrypted, no token.

Each side's protocol writes what it receives to the other side's transport; when one side's
write buffer fills, the other side stops reading (backpressure), and an EOF is passed on as
a half-close, so protocols that finish sending before they finish reading work through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import cast


class Idle:
    """Closes a tunnel that carried nothing either way for *timeout* seconds (the listener's
    keepalive_timeout): an idle tunnel would hold a connection slot for ever."""

    def __init__(self, timeout: float, close: Callable[[], None]) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._close = close
        self._last = self._loop.time()
        self._handle: asyncio.TimerHandle | None = self._loop.call_later(timeout, self._check)

    def touch(self) -> None:
        self._last = self._loop.time()

    def _check(self) -> None:
        idle = self._loop.time() - self._last
        if idle >= self._timeout:
            self._handle = None
            self._close()
        else:
            self._handle = self._loop.call_later(self._timeout - idle, self._check)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None


class Pipe(asyncio.Protocol):
    """One end of a tunnel; ``peer`` is the other end's transport."""

    def __init__(self, on_lost: Callable[[], None], idle: Idle | None = None) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None
        self.received = 0
        self.idle = idle
        self.partner: Pipe | None = None   # the other end's protocol
        self.eof = False
        self.lost = False
        self.on_lost = on_lost
        self._pending = bytearray()   # what arrived before the peer was connected

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: typing only.
        self.transport = cast(asyncio.Transport, transport)

    def join(self, peer: asyncio.Transport) -> None:
        self.peer = peer
        if self._pending:
            peer.write(bytes(self._pending))
            self._pending.clear()

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.idle is not None:
            self.idle.touch()
        if self.peer is None:
            self._pending += data
        elif not self.peer.is_closing():
            self.peer.write(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.partner is not None and self.partner.eof:
            # Both directions are done: nothing will come either way, so close both now
            # rather than hold the connection until the idle timeout.
            if self.peer is not None:
                self.peer.close()
            return False
        if self.peer is not None and self.peer.can_write_eof() and not self.peer.is_closing():
            self.peer.write_eof()
            return True   # keep our side open for the other direction
        return False

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.idle is not None:
            self.idle.touch()   # the peer took bytes: the tunnel is not idle
        if self.peer is not None and not self.peer.is_closing():
            self.peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        # The idle timer outlives one end: it is what aborts the other when that one's
        # close never flushes (its peer stopped reading).
        if self.idle is not None and (self.partner is None or self.partner.lost):
            self.idle.cancel()
        if self.peer is not None:
            self.peer.close()
        self.on_lost()
