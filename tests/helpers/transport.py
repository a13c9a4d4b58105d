"""A double of asyncio's transport for protocol unit tests: it records what the protocol
writes and asks for (pause, close, abort, handover) and never touches a socket.

A real transport calls connection_lost after close() or abort(), on a later loop turn; this
one does not, so a test says when the connection is lost.
"""

from __future__ import annotations

import asyncio
from typing import Any


class RecordingTransport(asyncio.Transport):
    def __init__(self, extra: dict[str, Any] | None = None) -> None:
        super().__init__(extra)
        self.writes: list[bytes] = []
        self.reading = True
        self.pauses = 0            # pause_reading calls
        self.closed = False
        self.aborted = False
        self.eof_written = False
        self.protocol: asyncio.BaseProtocol | None = None

    @property
    def data(self) -> bytes:
        """Every byte written so far."""
        return b"".join(self.writes)

    def take(self) -> bytes:
        """The bytes written since the last take."""
        data = self.data
        self.writes.clear()
        return data

    def write(self, data: bytes | bytearray | memoryview) -> None:
        assert not self.closed, "write after close"
        self.writes.append(bytes(data))

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def get_write_buffer_size(self) -> int:
        return 0

    def pause_reading(self) -> None:
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = self.aborted = True

    def is_closing(self) -> bool:
        return self.closed

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self.protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self.protocol is not None
        return self.protocol
