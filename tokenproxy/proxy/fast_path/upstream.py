"""One upstream HTTP/1.1 connection of the fast path, its answers parsed by llhttp.

One UpstreamConn carries one exchange at a time. Its response head arrives as a future; the
body is pushed chunk by chunk into a sink the relay attaches (chunks that come before the sink
wait in a short list), so a streamed body costs one callback per read and no task. Bytes never
pass through a queue the size of the body: a slow client pauses the upstream socket.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, cast

import httptools

from tokenproxy.proxy.failures import UpstreamBroke
from tokenproxy.proxy.rules.headers import MAX_UPSTREAM_FIELD, NO_BODY_STATUSES, Header

MAX_UPSTREAM_HEAD: Final = 2 * MAX_UPSTREAM_FIELD
# Body bytes held before the relay attaches its sink; past this the upstream socket pauses.
PENDING_LIMIT: Final = 256 * 1024


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: bytes
    headers: list[Header]
    length: bytes | None        # the Content-Length value, if any
    chunked: bool


class UpstreamConn(asyncio.Protocol):
    """One connection to an upstream origin; see the module docstring."""

    def __init__(self, key: tuple[object, ...]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.reusable = False
        # Carried bytes of a client's request body. The upstream may not have read them all
        # (many servers answer without reading a body), and what it did not read it will
        # parse as requests of its own: such a connection never serves another client.
        self.tainted = False
        self._last_use = False       # we sent Connection: close
        self.idle_since = 0.0
        # The parser holds this protocol's callbacks: a reference cycle, cut at connection_lost
        # so a closed connection (and the body bytes it held) is freed at once, not at the
        # next full garbage collection.
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self._fresh_parser = False
        self._answered = False
        self._head_bytes = 0
        self._loop = asyncio.get_running_loop()
        self.head: asyncio.Future[ResponseHead] | None = None
        self.done: asyncio.Future[None] | None = None
        self.got_bytes = False
        self._headers: list[Header] = []
        self._reason = b""
        self._head_size = 0
        self._head_request = False
        self._framed = False           # the response has a length or chunked framing
        self._sink: Callable[[bytes], None] | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._read_paused = False
        self._keep_alive = False       # the answer in progress allows another on this connection
        self._spliced = False          # its body is being spliced: reading stays paused
        self.on_writable: Callable[[bool], None] | None = None   # upload back-pressure

    # -- the exchange ------------------------------------------------------------------------

    def begin(self, head_request: bool, *, body: bool = False, last: bool = False) -> None:
        """Get ready for one request/response on this connection: *body* if the request
        carries a client's body, *last* if it asks the upstream to close after answering."""
        self.head = self._loop.create_future()
        self.done = self._loop.create_future()
        self.got_bytes = False
        self.reusable = False
        self.tainted = self.tainted or body
        self._last_use = last
        self._answered = False
        self._head_bytes = 0
        self._head_request = head_request
        self._sink = None
        self._pending = []
        self._pending_size = 0
        self._spliced = False

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def attach(self, sink: Callable[[bytes], None]) -> bytes:
        """Send further body chunks to *sink*; returns what arrived before it (to send first)."""
        self._sink = sink
        held = b"".join(self._pending)
        self._pending = []
        self._pending_size = 0
        if self._read_paused:
            self.resume_reading()
        return held

    @property
    def pending_size(self) -> int:
        """Body bytes parsed and held until the relay attaches."""
        return self._pending_size

    def take_for_splice(self) -> bytes:
        """Pause reading for good and hand over the body bytes parsed so far: the rest of the
        body is read from the socket by a splice relay (splice.py), never by this protocol."""
        self.pause_reading()
        self._spliced = True
        held = b"".join(self._pending)
        self._pending = []
        self._pending_size = 0
        return held

    def no_reuse(self) -> None:
        """The request went out incomplete: this connection carries no other."""
        self._last_use = True
        self.reusable = False

    def spliced(self, trailing: bool) -> None:
        """The relay read the rest of the body: the answer is complete. The parser still
        waits for those bytes, so a new one takes the next answer. *trailing*: the upstream
        sent more than the answer said (or ended); the connection is never used again, as
        the copy path's parser would refuse the extra bytes."""
        self._spliced = False
        self._answered = True
        if trailing:
            self._last_use = True
        self.reusable = self._keep_alive and not self._last_use
        if self._parser is not None:
            self._parser = httptools.HttpResponseParser(self)
        if self.done is not None and not self.done.done():
            self.done.set_result(None)

    def detach(self) -> None:
        """Forget the relay's sink (it holds the client's transport) while idle in the pool."""
        self._sink = None
        self._pending = []
        self._pending_size = 0

    def pause_reading(self) -> None:
        if not self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = True
            self.transport.pause_reading()

    def resume_reading(self) -> None:
        if (self._read_paused and not self._spliced and self.transport is not None
                and not self.closed):
            self._read_paused = False
            self.transport.resume_reading()

    def idle(self) -> None:
        """Between exchanges: any byte that arrives now condemns the connection (data_received
        sees no exchange), so a stray answer is never taken for the next request's."""
        self.on_writable = None
        self.detach()
        self.head = self.done = None
        self.resume_reading()   # a slow client may have paused it; idle, it must see a close
        self.idle_since = time.monotonic()

    def fresh(self, keepalive: float) -> bool:
        """Still open and idle for less than *keepalive* seconds."""
        return not self.closed and time.monotonic() - self.idle_since < keepalive

    def abort(self) -> None:
        """Close at once, and drop everything the exchange left here (see _parser)."""
        self.closed = True
        if self.transport is not None:
            self.transport.abort()
        # The relay keeps its own references to the futures it awaits; these would tie a
        # failed exchange's traceback, frames and buffers to this object.
        self.head = self.done = None
        self.on_writable = None
        self._spliced = False
        self._sink = None   # body bytes already held stay: a complete answer is still relayed

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, though they implement it.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        parser = self._parser
        if self.head is None or parser is None:
            self.abort()   # bytes nobody asked for: the connection is out of step
            return
        waiting = not self.head.done()
        if waiting:
            # llhttp hands over a header line only when it ends: count the bytes instead.
            self._head_bytes += len(data)
        try:
            parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail("the upstream switched protocols unasked")
        except httptools.HttpParserError:
            self._fail("the upstream sent a malformed response")
        if self._fresh_parser and self._parser is not None:
            self._fresh_parser = False
            self._parser = httptools.HttpResponseParser(self)
        if (waiting and self.head is not None and not self.head.done()
                and self._head_bytes > MAX_UPSTREAM_HEAD):
            self._fail("the upstream's response head is too large")

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.done is not None and not self.done.done():
            if (exc is None and self.head is not None and self.head.done()
                    and not self._framed):
                self.done.set_result(None)   # a close-delimited body ends with a clean close
            else:
                self._fail("the upstream closed the connection")
        self._parser = None
        self.transport = None
        self.on_writable = None
        self._sink = None

    def pause_writing(self) -> None:
        if self.on_writable is not None:
            self.on_writable(False)

    def resume_writing(self) -> None:
        if self.on_writable is not None:
            self.on_writable(True)

    # -- llhttp callbacks --------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self._answered:
            # A second answer to one request (a smuggled or desynchronised response): it
            # must never reach the next client of this connection.
            raise UpstreamBroke("bytes after the complete response")
        self._headers = []
        self._reason = b""
        self._head_size = 0

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head is not None and self.head.done():
            return   # a trailer field (llhttp reports them here): never a response header
        self._head_size += len(name) + len(value) + 4
        if self._head_size > MAX_UPSTREAM_HEAD:
            raise UpstreamBroke("response head too large")
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None   # callbacks run inside feed_data
        status = parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                raise UpstreamBroke("unasked 101")
            return   # interim answer (100, 103): the real one follows
        length: bytes | None = None
        chunked = False
        for name, value in self._headers:
            low = name.lower()
            if low == b"content-length":
                length = value.strip()
            elif low == b"transfer-encoding":
                chunked = value.strip().lower().endswith(b"chunked")
        self._framed = (chunked or length is not None or status in NO_BODY_STATUSES
                        or self._head_request)
        self._keep_alive = parser.should_keep_alive()
        head = ResponseHead(status, self._reason.strip(), self._headers, length, chunked)
        assert self.head is not None
        assert self.done is not None
        if not self.head.done():
            self.head.set_result(head)
        if self._head_request:
            # llhttp cannot be told that a HEAD answer has no body: the answer ends here, and
            # a new parser takes the next one (nothing more may arrive before our next request).
            self.reusable = parser.should_keep_alive() and not self._last_use
            self._fresh_parser = True
            if not self.done.done():
                self.done.set_result(None)

    def on_body(self, body: bytes) -> None:
        if self._head_request:
            return
        if self._sink is not None:
            self._sink(body)
            return
        self._pending.append(body)
        self._pending_size += len(body)
        if self._pending_size > PENDING_LIMIT:
            self.pause_reading()

    def on_message_complete(self) -> None:
        parser = self._parser
        assert parser is not None
        if 100 <= parser.get_status_code() < 200 or self._head_request:
            return
        assert self.done is not None
        self._answered = True
        self.reusable = parser.should_keep_alive() and not self._last_use
        if not self.done.done():
            self.done.set_result(None)

    def time_out(self) -> None:
        """The route's deadline passed before the response head."""
        if self.head is not None and not self.head.done():
            self._fail(TimeoutError())

    def _fail(self, why: str | BaseException) -> None:
        exc = why if isinstance(why, BaseException) else UpstreamBroke(why)
        for fut in (self.head, self.done):
            if fut is not None and not fut.done():
                fut.set_exception(exc)
                fut.exception()   # retrieved: the relay may be waiting on only one of them
        self.abort()
