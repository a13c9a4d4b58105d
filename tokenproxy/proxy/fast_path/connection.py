"""The fast path: tokenproxy's own HTTP/1.1 protocol for the common request.

aiohttp's high-level server and client cost about 85 % of a proxied request (measured). This
protocol answers the plain cases itself (head.py says which) with llhttp (httptools) parsing
the heads and bodies piped as bytes to a pooled upstream connection (pool.py); one request at a
time is an Exchange (exchange.py).

Everything else is handed over: the connection, with every byte of the request not yet
answered, moves to aiohttp's protocol (aiohttp_path/protocol.py) and stays there. So a
rejected, malformed, oversized, chunked, 100-continue, HTTP/1.0 or WebSocket request gets
exactly the answer the aiohttp path gives, with its metrics and log line. The fast path only
ever parses a head it can see whole (up to its blank line, never further), so the bytes
handed over are always the untouched rest of the stream: nothing is parsed twice differently.

Over 400 lines because FastConnection is one protocol object per client connection (see its
docstring); head classification, the exchange, the body and the upstream side are apart.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, cast

from tokenproxy import log
from tokenproxy.config import LimitsConfig
from tokenproxy.proxy.fast_path import wire
from tokenproxy.proxy.fast_path.body import DISCARD_LIMIT, RequestBody
from tokenproxy.proxy.fast_path.exchange import Exchange
from tokenproxy.proxy.fast_path.head import Request, classify
from tokenproxy.proxy.fast_path.pool import UpstreamPool
from tokenproxy.proxy.fast_path.splice import Relay, SourceClosed
from tokenproxy.proxy.fast_path.upstream import UpstreamConn

if TYPE_CHECKING:
    from tokenproxy.proxy.runtime import Proxy

# Bytes of pipelined requests held while one is answered; past this, reading pauses.
PIPELINE_LIMIT: Final = 64 * 1024
# Body bytes held before the upstream connection is up; past this, reading pauses.
HOLD_LIMIT: Final = 256 * 1024


@dataclass(slots=True)
class FastEnv:
    """What every fast connection shares; the Proxy is looked up per request (reloads)."""

    proxy: Callable[[], Proxy]
    limits: Callable[[], LimitsConfig]
    slow: Callable[[Callable[[], None] | None], asyncio.Protocol]
    pool: UpstreamPool
    conns: set[FastConnection] = field(default_factory=set)
    date: wire.DateHeader = field(default_factory=wire.DateHeader)
    closing: bool = False
    # The pool is the daemon's, shared with other environments (each intercepted host of
    # the forward proxy has one): such an environment ends its connections, not the pool.
    owns_pool: bool = True
    # Large bodies by splice(2) between the sockets (splice.py), where the system has it.
    splice: bool = True
    _gone: asyncio.Event = field(default_factory=asyncio.Event)

    def forget(self, conn: FastConnection) -> None:
        self.conns.discard(conn)
        self._gone.set()

    async def shutdown(self, grace: float) -> None:
        """Close idle connections now, busy ones after their answer, any left after *grace*."""
        self.closing = True
        for conn in list(self.conns):
            conn.close_when_idle()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while self.conns:
                    self._gone.clear()
                    await self._gone.wait()
        for conn in list(self.conns):
            conn.abort()
        if self.owns_pool:
            self.pool.close()


class FastConnection(asyncio.Protocol):
    """One client connection on the fast path; see the module docstring.

    Longer than most classes here because it is one protocol object per client connection:
    its state (the buffer, the body in progress, read pauses by reason, four timers, the
    upstream connection in use and the private one) is the connection's, and the Exchange of
    the request in progress works on it through the methods below the protocol callbacks.
    """

    def __init__(self, env: FastEnv, on_close: Callable[[], None] | None) -> None:
        self.env = env
        self._on_close = on_close
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._busy = False
        self.close_after = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self._drain_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._next_waits = False   # the next request waits until the client reads again
        self._task: asyncio.Task[None] | None = None
        self.body: RequestBody | None = None
        self.upstream: UpstreamConn | None = None
        # An upstream connection that carried this client's body bytes: reused only for this
        # client's later requests (rules/reuse.py), closed when the client leaves.
        self._private: UpstreamConn | None = None
        self.write_paused = False
        self._read_pauses: set[str] = set()
        self.upload: Relay | None = None   # the body being spliced to the upstream, if any

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, though they implement it.
        self.transport = cast(asyncio.Transport, transport)
        self.env.conns.add(self)
        # A new connection owes a head within header_timeout (slowloris), not keepalive.
        self._head_timer = self.loop.call_later(self.env.limits().header_timeout,
                                                 self._head_expired)

    def data_received(self, data: bytes) -> None:
        body = self.body
        if body is not None and body.remaining > 0:
            data = self._feed_body(body, data)
            if not data:
                return
        self._buf += data
        if self._busy:
            if len(self._buf) > PIPELINE_LIMIT:
                self.pause_reading("pipeline")
            return
        self._next_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._cancel_timers()
        self.env.forget(self)
        # Cut every reference the exchange could close a cycle through: the client's
        # transport, the task (its traceback holds our frames), the upstream connection.
        self.end_upload()
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abort()
        self._drop_private()
        self.body = None
        callback, self._on_close = self._on_close, None
        if callback is not None:
            callback()

    def pause_writing(self) -> None:
        self.write_paused = True
        if self.upstream is not None:
            self.upstream.pause_reading()
        # A client that takes none of its answer for send_timeout is cut off (nginx's
        # send_timeout): it would hold its slot and its upstream connection for ever.
        self._send_timer = self.loop.call_later(self.env.limits().send_timeout,
                                                 self._send_expired)

    def _send_expired(self) -> None:
        self._send_timer = None
        log.get_logger().info("send_timeout", timeout_s=self.env.limits().send_timeout)
        self.abort()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if self.upstream is not None:
            self.upstream.resume_reading()
        if self._next_waits and not self._busy:
            self._next_waits = False
            self.resume_reading("pipeline")
            if self.body is None:
                self._next_head()

    # -- connection management ---------------------------------------------------------------

    def close_when_idle(self) -> None:
        self.close_after = True
        if not self._busy and self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def pause_reading(self, why: str) -> None:
        if not self._read_pauses and self.transport is not None:
            self.transport.pause_reading()
        self._read_pauses.add(why)

    def resume_reading(self, why: str) -> None:
        if why in self._read_pauses:
            self._read_pauses.discard(why)
            if not self._read_pauses and self.transport is not None:
                self.transport.resume_reading()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._idle_timer, self._drain_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._idle_timer = self._drain_timer = self._send_timer = None

    def _arm_idle(self) -> None:
        # One timer per idle spell would be one call_later per request; instead the timer
        # stays armed and, when it fires early, re-arms for the rest of the idle time.
        self._idle_since = self.loop.time()
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_later(self.env.limits().keepalive_timeout,
                                                     self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if (self._busy or self._buf or self.transport is None or self.body is not None
                or self._next_waits):
            return   # not idle: _arm_idle runs again when it is
        left = self._idle_since + self.env.limits().keepalive_timeout - self.loop.time()
        if left > 0.001:
            self._idle_timer = self.loop.call_later(left, self._idle_expired)
            return
        self.transport.close()

    def _head_expired(self) -> None:
        self._head_timer = None
        if not self._busy and self.transport is not None:
            log.get_logger().info("header_timeout", timeout_s=self.env.limits().header_timeout)
            self.transport.abort()

    def _handover(self, reason: str) -> None:
        """Give the connection, and every byte not yet answered, to aiohttp's protocol."""
        transport = self.transport
        if transport is None:
            return
        self.env.proxy().metrics.handovers.labels(reason).inc()
        self._cancel_timers()
        self._drop_private()
        self.env.forget(self)
        self.transport = None
        callback, self._on_close = self._on_close, None
        handler = self.env.slow(callback)
        data = bytes(self._buf)
        self._buf.clear()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self.write_paused:
            # The transport will not say it again: the new protocol must know it is paused.
            handler.pause_writing()
        if self._read_pauses:
            self._read_pauses.clear()
            transport.resume_reading()
        if data:
            handler.data_received(data)

    # -- request heads -----------------------------------------------------------------------

    def _next_head(self) -> None:
        buf = self._buf
        if not buf:
            self._arm_idle()
            return
        if self.write_paused:
            # The client is not reading our answers: the next request is not started, or its
            # deadline would run while its answer cannot be written (resume_writing goes on).
            self._next_waits = True
            self.pause_reading("pipeline")
            return
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.env.limits().header_timeout,
                                                     self._head_expired)
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if (len(buf) > self.env.limits().max_header_size + 4 or buf.startswith(b"\r\n")
                    or b"\n\n" in buf or b"\n\r\n" in buf):
                # Too large, or a head ended with bare LFs: aiohttp answers 431 or 400 as it
                # always has.
                self._handover("malformed")
            return
        if self.env.closing:
            self._handover("shutdown")   # aiohttp answers 503 while shutting down
            return
        request = classify(bytes(buf[:end + 4]), self.env.proxy())
        if isinstance(request, str):
            self._handover(request)
            return
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        del buf[:end + 4]
        self._busy = True
        body = self._body_for(request)
        if body is not None:
            self.body = body
            rest = bytes(buf)
            buf.clear()
            buf += self._feed_body(body, rest)
        self._task = self.loop.create_task(Exchange(self, request, body).run())
        if body is not None:
            # On the task, not in the exchange: a task cancelled before it ran never enters it.
            self._task.add_done_callback(lambda _: body.release())

    def _body_for(self, request: Request) -> RequestBody | None:
        if not request.length:   # None or 0: no body
            return None
        proxy = request.proxy
        route = request.compiled.route
        return RequestBody(request.length, complete=self.loop.create_future(),
                           whole=bool(route.retry_on) and request.length <= proxy.max_replay,
                           budget=proxy.budget, route=route.label)

    # -- request bodies ----------------------------------------------------------------------

    def _feed_body(self, body: RequestBody, data: bytes) -> bytes:
        """Take this body's bytes from *data*; returns what belongs to the next request."""
        n = body.remaining
        if len(data) > n:
            part, rest = data[:n], data[n:]
        else:
            part, rest = data, b""
        if not part:
            return rest
        body.remaining -= len(part)
        if body.target is not None:
            body.target.write(part)
        elif not body.drop:
            if body.whole:
                body.reserve(len(part))
            body.chunks.append(part)
            body.size += len(part)
            # A body read whole for replay is bounded by max_replay_body; one to be streamed
            # waits here only until the upstream connection is up.
            if not body.whole and body.size > HOLD_LIMIT and body.remaining:
                self.pause_reading("hold")
        if body.remaining == 0:
            if not body.complete.done():
                body.complete.set_result(None)
            if body.drop:
                self.body = None
                if self._drain_timer is not None:
                    self._drain_timer.cancel()
                    self._drain_timer = None
                if self.close_after and not self._busy and self.transport is not None:
                    self.transport.close()   # a lingering close is complete
                elif not self._busy:
                    self._next_head()
        return rest

    def upload_ended(self, done: asyncio.Future[None]) -> None:
        """The splice relay of an upload ended by itself (all sent, or a side broke)."""
        if self.upload is not None and self.upload.done is done:
            self.end_upload()

    def end_upload(self) -> None:
        """End a spliced upload (at once if still running): the body's count catches up, and
        the client's bytes are read by the transport again."""
        relay, self.upload = self.upload, None
        if relay is None:
            return
        relay.stop()
        done = relay.done
        failed = done.cancelled() or done.exception() is not None
        body = self.body
        if body is not None:
            body.remaining = relay.left
            if failed and body.target is not None:
                body.target.no_reuse()   # the upstream may lack bytes the pipe held
            if body.remaining == 0 and not body.complete.done():
                body.complete.set_result(None)
        if not done.cancelled() and isinstance(done.exception(), SourceClosed):
            self.abort()   # the client closed or broke in the middle of its body
            return
        self.resume_reading("splice")

    def upload_writable(self, writable: bool) -> None:
        if writable:
            self.resume_reading("upstream")
        else:
            self.pause_reading("upstream")

    # -- the exchange ------------------------------------------------------------------------

    def body_done(self, *, drop: bool = False) -> bool:
        """Whether the connection can carry another request after this answer."""
        body = self.body
        if body is None or body.remaining == 0:
            return True
        if drop and body.target is None and body.remaining <= DISCARD_LIMIT:
            self._drop_rest(body)
            return True
        return False

    def _drop_rest(self, body: RequestBody) -> None:
        """Read and drop what is left of the body; it must come within header_timeout (10 s
        by default, like aiohttp's lingering_time), or a client that stops sending would hold
        the connection and its slot forever."""
        body.drop = True
        body.target = None
        body.take()
        self.resume_reading("hold")
        if self._drain_timer is None:
            self._drain_timer = self.loop.call_later(self.env.limits().header_timeout,
                                                      self._drain_expired)

    def _linger(self, transport: asyncio.Transport, body: RequestBody) -> None:
        """Close while the client is still sending its body, without losing the answer.

        Closing a socket with unread bytes makes the kernel send an RST, which can destroy an
        answer the client has not read yet. So: FIN after the answer, read and drop the rest
        of the body, and close when it is in or after header_timeout (aiohttp's lingering
        close, bounded the same way).
        """
        self.close_after = True
        self._drop_rest(body)
        self.resume_reading("upstream")
        self.resume_reading("pipeline")
        if transport.can_write_eof():
            transport.write_eof()

    def _drain_expired(self) -> None:
        self._drain_timer = None
        if self.transport is not None:
            self.transport.close()

    def finish(self, keep: bool, *, linger: bool = True) -> None:
        self._task = None
        self.end_upload()
        upstream, self.upstream = self.upstream, None
        if upstream is not None:
            upstream.abort()   # not released: the exchange failed somewhere in between
        self._busy = False
        transport = self.transport
        if transport is None:
            return
        body = self.body
        if body is not None and body.remaining > 0 and not body.drop:
            keep = keep and self.body_done(drop=True)
        elif body is not None and body.remaining == 0:
            self.body = None
        if not keep or self.close_after:
            if linger and self.body is not None and self.body.remaining > 0:
                self._linger(transport, self.body)
            else:
                transport.close()
            return
        self.resume_reading("upstream")
        self.resume_reading("pipeline")
        if self.body is None:
            self._next_head()

    def keep_private(self, conn: UpstreamConn) -> None:
        old, self._private = self._private, None
        if old is not None and old is not conn:
            old.abort()
        if conn.closed or not conn.reusable or self.transport is None:
            conn.abort()
            return
        conn.idle()
        self._private = conn

    def take_private(self, scheme: str, host: str, port: int, tls: ssl.SSLContext | None
                      ) -> UpstreamConn | None:
        conn, self._private = self._private, None
        if conn is None:
            return None
        if conn.key == (scheme, host, port, id(tls)) and conn.fresh(self.env.pool.keepalive):
            return conn
        conn.abort()
        return None

    def _drop_private(self) -> None:
        conn, self._private = self._private, None
        if conn is not None:
            conn.abort()
