"""The fast path: tokenproxy's own HTTP/1.1 protocol for the common request.

aiohttp's high-level server and client cost about 85 % of a proxied request (measured). This
protocol answers the plain cases itself -- an HTTP/1.1 request with no body or a Content-Length
body, no Upgrade, no Expect, no Transfer-Encoding, that passes every check of SecurityPolicy
and matches a route -- with llhttp (httptools) parsing the heads and bodies piped as bytes to a
pooled upstream connection (pool.py).

Everything else is handed over: the connection, with every byte of the request not yet
answered, moves to aiohttp's protocol (server.GuardedRequestHandler) and stays there. So a
rejected, malformed, oversized, chunked, 100-continue, HTTP/1.0 or WebSocket request gets
exactly the answer the aiohttp path gives, with its metrics and log line. The fast path only
ever parses a head it can see whole (up to its blank line, never further), so the bytes
handed over are always the untouched rest of the stream: nothing is parsed twice differently.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from tokenproxy import log
from tokenproxy.config import LimitsConfig
from tokenproxy.errors import RequestRejected, TokenError, TokenUnavailable, UpstreamError
from tokenproxy.proxy import wire
from tokenproxy.proxy.body import ReplayBudget
from tokenproxy.proxy.deadline import bounded
from tokenproxy.proxy.forward import CLIENT_GONE, Outcome
from tokenproxy.proxy.pool import (
    ResponseHead,
    UpstreamBroke,
    UpstreamConn,
    UpstreamPool,
    connect_error,
)
from tokenproxy.proxy.reuse import last_request
from tokenproxy.proxy.target import REFUSED_METHODS, CompiledRoute, split_target
from tokenproxy.tokens.model import Token

if TYPE_CHECKING:
    from tokenproxy.proxy.forward import Proxy

# Bytes of pipelined requests held while one is answered; past this, reading pauses.
PIPELINE_LIMIT: Final = 64 * 1024
# More header lines than this go to aiohttp, whose limit (128) answers 431.
MAX_FAST_HEADERS: Final = 100
# An unread request body up to this size is read and dropped after an early answer, keeping
# the connection; a larger one closes it.
DISCARD_LIMIT: Final = 256 * 1024
# Body bytes held before the upstream connection is up; past this, reading pauses.
HOLD_LIMIT: Final = 256 * 1024
_NOT_FAST: Final = frozenset({b"transfer-encoding", b"upgrade", b"expect"})
_NO_BODY: Final = frozenset({204, 304})
# Headers aiohttp's parser refuses to see twice (its SINGLETON_HEADERS).
_SINGLETONS: Final = frozenset({
    b"content-length", b"content-location", b"content-range", b"content-type", b"etag",
    b"host", b"max-forwards", b"server", b"transfer-encoding", b"user-agent",
})
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


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
        self.pool.close()


class _HeadParse:
    """llhttp callbacks for one request head."""

    __slots__ = ("complete", "headers", "url")

    def __init__(self) -> None:
        self.url = b""
        self.headers: list[wire.Header] = []
        self.complete = 0

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        self.complete += 1


@dataclass(slots=True)
class _Body:
    """A Content-Length request body as it arrives: held, piped to the upstream, or dropped."""

    remaining: int
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    target: UpstreamConn | None = None
    drop: bool = False
    # Done when every byte is in, or when a body meant to be read whole must stream instead.
    complete: asyncio.Future[None] | None = None
    whole: bool = False   # read entirely before sending, so a 401 can be retried with it
    reserved: int = 0     # bytes of the replay budget it holds (as they arrive)
    budget: ReplayBudget | None = None
    route: str = "-"

    def take(self) -> bytes:
        data = b"".join(self.chunks)
        self.chunks, self.size = [], 0
        return data


@dataclass(slots=True)
class _Request:
    method: bytes
    method_str: str
    target: str
    path: str
    query: str | None
    headers: list[wire.Header]
    length: int | None
    keep_alive: bool
    compiled: CompiledRoute
    proxy: Proxy
    body: _Body | None


class FastConnection(asyncio.Protocol):
    """One client connection on the fast path; see the module docstring."""

    def __init__(self, env: FastEnv, on_close: Callable[[], None] | None) -> None:
        self._env = env
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._busy = False
        self._close_after = False
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self._drain_timer: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._next_waits = False   # the next request waits until the client reads again
        self._task: asyncio.Task[None] | None = None
        self._body: _Body | None = None
        self._upstream: UpstreamConn | None = None
        # An upstream connection that carried this client's body bytes: reused only for this
        # client's later requests (proxy/reuse.py), closed when the client leaves.
        self._private: UpstreamConn | None = None
        self._write_paused = False
        self._read_pauses: set[str] = set()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, though they implement it.
        self._transport = cast(asyncio.Transport, transport)
        self._env.conns.add(self)
        # A new connection owes a head within header_timeout (slowloris), not keepalive.
        self._head_timer = self._loop.call_later(self._env.limits().header_timeout,
                                                 self._head_expired)

    def data_received(self, data: bytes) -> None:
        body = self._body
        if body is not None and body.remaining > 0:
            data = self._feed_body(body, data)
            if not data:
                return
        self._buf += data
        if self._busy:
            if len(self._buf) > PIPELINE_LIMIT:
                self._pause_reading("pipeline")
            return
        self._next_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._cancel_timers()
        self._env.forget(self)
        # Cut every reference the exchange could close a cycle through: the client's
        # transport, the task (its traceback holds our frames), the upstream connection.
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.abort()
        self._drop_private()
        self._body = None
        callback, self._on_close = self._on_close, None
        if callback is not None:
            callback()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._upstream is not None:
            self._upstream.pause_reading()
        # A client that takes none of its answer for send_timeout is cut off (nginx's
        # send_timeout): it would hold its slot and its upstream connection for ever.
        self._send_timer = self._loop.call_later(self._env.limits().send_timeout,
                                                 self._send_expired)

    def _send_expired(self) -> None:
        self._send_timer = None
        log.get_logger().info("send_timeout", timeout_s=self._env.limits().send_timeout)
        self.abort()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None
        if self._upstream is not None:
            self._upstream.resume_reading()
        if self._next_waits and not self._busy:
            self._next_waits = False
            self._resume_reading("pipeline")
            if self._body is None:
                self._next_head()

    # -- connection management ---------------------------------------------------------------

    def close_when_idle(self) -> None:
        self._close_after = True
        if not self._busy and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def _pause_reading(self, why: str) -> None:
        if not self._read_pauses and self._transport is not None:
            self._transport.pause_reading()
        self._read_pauses.add(why)

    def _resume_reading(self, why: str) -> None:
        if why in self._read_pauses:
            self._read_pauses.discard(why)
            if not self._read_pauses and self._transport is not None:
                self._transport.resume_reading()

    def _cancel_timers(self) -> None:
        for timer in (self._head_timer, self._idle_timer, self._drain_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._idle_timer = self._drain_timer = self._send_timer = None

    def _arm_idle(self) -> None:
        # One timer per idle spell would be one call_later per request; instead the timer
        # stays armed and, when it fires early, re-arms for the rest of the idle time.
        self._idle_since = self._loop.time()
        if self._idle_timer is None:
            self._idle_timer = self._loop.call_later(self._env.limits().keepalive_timeout,
                                                     self._idle_expired)

    def _idle_expired(self) -> None:
        self._idle_timer = None
        if (self._busy or self._buf or self._transport is None or self._body is not None
                or self._next_waits):
            return   # not idle: _arm_idle runs again when it is
        left = self._idle_since + self._env.limits().keepalive_timeout - self._loop.time()
        if left > 0.001:
            self._idle_timer = self._loop.call_later(left, self._idle_expired)
            return
        self._transport.close()

    def _head_expired(self) -> None:
        self._head_timer = None
        if not self._busy and self._transport is not None:
            log.get_logger().info("header_timeout", timeout_s=self._env.limits().header_timeout)
            self._transport.abort()

    def _handover(self, reason: str) -> None:
        """Give the connection, and every byte not yet answered, to aiohttp's protocol."""
        transport = self._transport
        if transport is None:
            return
        self._env.proxy().metrics.handovers.labels(reason).inc()
        self._cancel_timers()
        self._drop_private()
        self._env.forget(self)
        self._transport = None
        callback, self._on_close = self._on_close, None
        handler = self._env.slow(callback)
        data = bytes(self._buf)
        self._buf.clear()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._write_paused:
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
        if self._write_paused:
            # The client is not reading our answers: the next request is not started, or its
            # deadline would run while its answer cannot be written (resume_writing goes on).
            self._next_waits = True
            self._pause_reading("pipeline")
            return
        if self._head_timer is None:
            self._head_timer = self._loop.call_later(self._env.limits().header_timeout,
                                                     self._head_expired)
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if (len(buf) > self._env.limits().max_header_size + 4 or buf.startswith(b"\r\n")
                    or b"\n\n" in buf or b"\n\r\n" in buf):
                # Too large, or a head ended with bare LFs: aiohttp answers 431 or 400 as it
                # always has.
                self._handover("malformed")
            return
        if self._env.closing:
            self._handover("shutdown")   # aiohttp answers 503 while shutting down
            return
        request = self._parse(bytes(buf[:end + 4]))
        if isinstance(request, str):
            self._handover(request)
            return
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        del buf[:end + 4]
        self._busy = True
        if request.body is not None:
            self._body = request.body
            rest = bytes(buf)
            buf.clear()
            rest = self._feed_body(request.body, rest)
            buf += rest
        self._task = self._loop.create_task(self._exchange(request))
        body = request.body
        if body is not None and body.whole:
            # On the task, not in _exchange: a task cancelled before it ran never enters it.
            self._task.add_done_callback(lambda _: _release_reserved(body))

    def _parse(self, head: bytes) -> _Request | str:
        """The request if the fast path takes it, else why not (it is handed over):
        "malformed" (aiohttp answers 400 or 431), "protocol" (HTTP/1.0, chunked, Expect,
        Upgrade, CONNECT; aiohttp serves it), "refused" (a check or no route: aiohttp answers
        the 4xx)."""
        cb = _HeadParse()
        parser = httptools.HttpRequestParser(cb)
        try:
            parser.feed_data(head)
        except httptools.HttpParserUpgrade:
            return "protocol"   # CONNECT and Upgrade
        except httptools.HttpParserError:
            return "malformed"
        if cb.complete != 1:
            return "malformed"
        if parser.get_http_version() != "1.1":
            return "protocol"
        headers = cb.headers
        if len(headers) > MAX_FAST_HEADERS:
            return "malformed"
        length: int | None = None
        keep_alive = True
        singletons: set[bytes] = set()
        for name, value in headers:
            low = name.lower()
            if low in _NOT_FAST:
                return "protocol"
            if low in _SINGLETONS:
                if low in singletons:
                    return "malformed"   # aiohttp refuses a repeated one with 400
                singletons.add(low)
            if low == b"content-length":
                length = int(value)   # llhttp allows one, all digits
            elif low == b"connection" and b"close" in (
                    p.strip().lower() for p in value.split(b",")):
                keep_alive = False
        method = parser.get_method()
        method_str = method.decode("ascii")
        if method_str in REFUSED_METHODS:
            return "refused"
        target = cb.url.decode("utf-8", "surrogateescape")
        proxy = self._env.proxy()
        try:
            path, query = split_target(method_str, target)
            str_headers = CIMultiDictProxy(CIMultiDict(
                (n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in headers
            ))
            proxy.policy.check(str_headers, tuple(headers), len(method) + len(cb.url) + 12)
        except RequestRejected:
            return "refused"
        compiled = proxy.table.match(path)
        if compiled is None:
            return "refused"
        body = None
        if length:   # None or 0: no body
            whole = bool(compiled.route.retry_on) and length <= proxy.max_replay
            body = _Body(length, complete=self._loop.create_future(), whole=whole,
                         budget=proxy.budget, route=compiled.route.label)
        return _Request(method, method_str, target, path, query, headers, length, keep_alive,
                        compiled, proxy, body)

    # -- request bodies ----------------------------------------------------------------------

    def _feed_body(self, body: _Body, data: bytes) -> bytes:
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
                self._reserve(body, len(part))
            body.chunks.append(part)
            body.size += len(part)
            # A body read whole for replay is bounded by max_replay_body; one to be streamed
            # waits here only until the upstream connection is up.
            if not body.whole and body.size > HOLD_LIMIT and body.remaining:
                self._pause_reading("hold")
        if body.remaining == 0:
            assert body.complete is not None
            if not body.complete.done():
                body.complete.set_result(None)
            if body.drop:
                self._body = None
                if self._drain_timer is not None:
                    self._drain_timer.cancel()
                    self._drain_timer = None
                if self._close_after and not self._busy and self._transport is not None:
                    self._transport.close()   # a lingering close is complete
                elif not self._busy:
                    self._next_head()
        return rest

    def _reserve(self, body: _Body, size: int) -> None:
        """Hold *size* more bytes of the replay budget for *body*, as they arrive (a head
        alone pins nothing); past the budget the body streams instead, unreplayable."""
        if body.budget is None:
            return   # the exchange is over: these bytes are only being dropped
        if body.budget.reserve(size, body.route):
            body.reserved += size
            return
        body.whole = False
        assert body.complete is not None
        if not body.complete.done():
            body.complete.set_result(None)   # _whole_body: stop waiting, stream what is held

    def _upload_writable(self, writable: bool) -> None:
        if writable:
            self._resume_reading("upstream")
        else:
            self._pause_reading("upstream")

    # -- the exchange ------------------------------------------------------------------------

    async def _exchange(self, req: _Request) -> None:
        proxy = req.proxy
        outcome = Outcome(route=req.compiled.route.label)
        started = time.perf_counter()
        proxy.metrics.inflight.inc()
        keep = req.keep_alive
        linger = True
        try:
            keep = await self._forward(req, outcome) and keep
        except asyncio.CancelledError:
            keep = False
            raise
        except RequestRejected as exc:
            proxy.metrics.rejected.labels(exc.cause).inc()
            keep = linger = False   # a stalled body is not waited for twice
            self._answer(outcome, exc.status, exc.cause, exc.detail, close=True)
        except UpstreamError as exc:
            proxy.metrics.upstream_errors.labels(outcome.route, exc.kind).inc()
            keep = keep and self._body_done()
            self._answer(outcome, exc.status, exc.cause, exc.detail, close=not keep)
        except TokenUnavailable as exc:
            keep = keep and self._body_done(drop=True)
            self._answer(outcome, exc.status, exc.cause, exc.detail, close=not keep,
                         retry_after=exc.retry_after)
        except TokenError as exc:
            keep = keep and self._body_done(drop=True)
            self._answer(outcome, exc.status, exc.cause, exc.detail, close=not keep)
        except Exception as exc:
            keep = False
            log.get_logger().error("internal_error", error=type(exc).__name__)
            if outcome.status == CLIENT_GONE:
                self._answer(outcome, 500, "internal",
                             "tokenproxy failed to handle the request", close=True)
        finally:
            proxy.metrics.inflight.dec()
            try:
                proxy.record(req.method_str, req.target, outcome,
                             time.perf_counter() - started)
            except Exception as exc:   # a failed log write must not leave the connection busy
                log.get_logger().error("internal_error", error=type(exc).__name__)
        self._finish(keep, linger=linger)

    def _answer(self, outcome: Outcome, status: int, cause: str, detail: str, *, close: bool,
                retry_after: float | None = None) -> None:
        """An error of ours, as problem+json; its body counts in the access log's bytes."""
        head, body = wire.problem(status, cause, detail, self._env.date(),
                                  retry_after=retry_after, close=close)
        outcome.status = status
        outcome.bytes += len(body)
        if self._transport is not None:
            self._transport.write(head + body)

    def _body_done(self, *, drop: bool = False) -> bool:
        """Whether the connection can carry another request after this answer."""
        body = self._body
        if body is None or body.remaining == 0:
            return True
        if drop and body.target is None and body.remaining <= DISCARD_LIMIT:
            self._drop_rest(body)
            return True
        return False

    def _drop_rest(self, body: _Body) -> None:
        """Read and drop what is left of the body; it must come within header_timeout (10 s
        by default, like aiohttp's lingering_time), or a client that stops sending would hold
        the connection and its slot forever."""
        body.drop = True
        body.target = None
        body.take()
        self._resume_reading("hold")
        if self._drain_timer is None:
            self._drain_timer = self._loop.call_later(self._env.limits().header_timeout,
                                                      self._drain_expired)

    def _linger(self, transport: asyncio.Transport, body: _Body) -> None:
        """Close while the client is still sending its body, without losing the answer.

        Closing a socket with unread bytes makes the kernel send an RST, which can destroy an
        answer the client has not read yet. So: FIN after the answer, read and drop the rest
        of the body, and close when it is in or after header_timeout (aiohttp's lingering
        close, bounded the same way).
        """
        self._close_after = True
        self._drop_rest(body)
        self._resume_reading("upstream")
        self._resume_reading("pipeline")
        if transport.can_write_eof():
            transport.write_eof()

    def _drain_expired(self) -> None:
        self._drain_timer = None
        if self._transport is not None:
            self._transport.close()

    def _finish(self, keep: bool, *, linger: bool = True) -> None:
        self._task = None
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.abort()   # not released: the exchange failed somewhere in between
        self._busy = False
        transport = self._transport
        if transport is None:
            return
        body = self._body
        if body is not None and body.remaining > 0 and not body.drop:
            keep = keep and self._body_done(drop=True)
        elif body is not None and body.remaining == 0:
            self._body = None
        if not keep or self._close_after:
            if linger and self._body is not None and self._body.remaining > 0:
                self._linger(transport, self._body)
            else:
                transport.close()
            return
        self._resume_reading("upstream")
        self._resume_reading("pipeline")
        if self._body is None:
            self._next_head()

    async def _forward(self, req: _Request, outcome: Outcome) -> bool:
        """Send upstream (once more after a refused token), relay; True if keep-alive holds."""
        proxy = req.proxy
        compiled = req.compiled
        route = compiled.route
        source = proxy.source_for(compiled)
        token = source.valid_now()
        if token is None:
            token = await bounded(source.current(), compiled, source.name)
        body: bytes | None = b""
        if req.body is not None:
            # None: streamed, sent once and never replayed (from the start, or once the
            # replay budget ran out while it arrived).
            body = await self._whole_body(req.body, route.timeout) if req.body.whole else None
        last = last_request(req.method_str, req.body is not None)
        head, client_auth = proxy.fast_request_head(req.method, req.path, req.query,
                                                    req.headers, req.length, compiled,
                                                    close=last)
        retried = False
        while True:
            auth = b"" if client_auth else proxy.fast_auth_line(compiled, token)
            conn, resp, done = await self._send(req, head + auth + wire.CRLF, body, last)
            fresh = await proxy.token_for_retry(resp.status, compiled, source, token,
                                                client_auth, retried, body is not None,
                                                conn.abort)
            if fresh is None:
                break
            conn.abort()   # the refused answer is not relayed; its body is not worth reading
            token, retried = fresh, True
            outcome.retried = True
        return await self._relay(req, conn, resp, done, token, outcome)

    async def _whole_body(self, body: _Body, wait: float) -> bytes | None:
        """The whole body, or None when it must stream after all (the budget ran out)."""
        assert body.complete is not None
        if not body.complete.done():
            try:
                async with asyncio.timeout(wait):
                    await body.complete
            except TimeoutError:
                raise RequestRejected(408, "request_timeout",
                                      "the request body did not arrive in time") from None
        return body.take() if body.whole else None

    async def _send(self, req: _Request, head: bytes, body: bytes | None, last: bool,
                    ) -> tuple[UpstreamConn, ResponseHead, asyncio.Future[None]]:
        """One request upstream; the route timeout runs until the response head arrives.

        A pooled connection the upstream closed while idle fails before answering anything;
        a replayable request is then sent once more on a new connection.
        """
        compiled = req.compiled
        proxy = req.proxy
        scheme, host, port, tls = proxy.fast_origin(compiled)
        conn: UpstreamConn | None = None
        pool = self._env.pool
        # One deadline for connect, send and the response head; a timer, not an
        # asyncio.timeout() per request (that cost 8 % of a small request).
        deadline = self._loop.time() + compiled.route.timeout
        try:
            for _ in range(2):
                conn = self._take_private(scheme, host, port, tls) or pool.take(
                    scheme, host, port, tls)
                if conn is None:
                    async with asyncio.timeout_at(deadline):
                        conn = await pool.connect(scheme, host, port, tls)
                self._upstream = conn
                conn.begin(req.method == b"HEAD", body=req.body is not None, last=last)
                # Held here: the connection drops its own references when it is aborted.
                head_answer, done = conn.head, conn.done
                assert head_answer is not None
                assert done is not None
                if self._write_paused:
                    conn.pause_reading()
                if body is None:
                    self._stream_body(conn, head)
                else:
                    conn.write(head + body if body else head)
                timer = self._loop.call_at(deadline, conn.time_out)
                try:
                    return conn, await head_answer, done
                except UpstreamBroke as exc:
                    # RFC 9112 section 9.3.1: an idempotent request whose connection
                    # closed before any answer may be sent again (as aiohttp does).
                    if conn.got_bytes or body is None or req.method_str not in IDEMPOTENT:
                        raise
                    _forget_frames(exc)
                finally:
                    timer.cancel()
            raise UpstreamBroke("unreachable")
        except TimeoutError as exc:
            _forget_frames(exc)
            if conn is not None:
                conn.abort()
            raise connect_error(TimeoutError()) from None
        except (OSError, ssl.SSLError, UpstreamBroke) as exc:
            _forget_frames(exc)
            if conn is not None:
                conn.abort()
            raise connect_error(exc) from None

    def _stream_body(self, conn: UpstreamConn, head: bytes) -> None:
        """Send the head, what the client sent so far, and pipe the rest as it comes."""
        body = self._body
        assert body is not None
        held = body.take()
        conn.write(head + held)
        body.target = conn
        conn.on_writable = self._upload_writable
        self._resume_reading("hold")

    async def _relay(self, req: _Request, conn: UpstreamConn, resp: ResponseHead,
                     done: asyncio.Future[None], token: Token, outcome: Outcome) -> bool:
        proxy = req.proxy
        compiled = req.compiled
        status = resp.status
        token_bytes = token.value.encode()
        headers = wire.response_headers(
            resp.headers, token=token_bytes,
            rewrite_location=lambda loc: proxy.table.rewrite_location(loc, compiled),
        )
        body = self._body
        # More unread body than we would drop: this connection closes after the answer.
        keep = req.keep_alive and not self._close_after and (
            body is None or body.remaining <= DISCARD_LIMIT)
        no_body = req.method == b"HEAD" or status in _NO_BODY
        framing, chunked = wire.response_framing(status, resp.length, no_body)
        out = wire.render_response(status, wire.safe_reason(resp.reason, token_bytes),
                                   headers, framing, self._env.date(), not keep)
        transport = self._transport
        if transport is None:
            raise asyncio.CancelledError
        outcome.status = status
        if no_body:
            transport.write(out)
            self._release(conn)
            return keep

        def sink(data: bytes) -> None:
            outcome.bytes += len(data)
            transport.write(wire.chunk(data) if chunked else data)

        held = conn.attach(sink)
        if held:
            outcome.bytes += len(held)
            out += wire.chunk(held) if chunked else held
        transport.write(out)
        try:
            await done
        except UpstreamBroke as exc:
            _forget_frames(exc)
            # The upstream broke mid-body: a truncated body must look truncated to the
            # client, so its connection is cut instead of the response being finished.
            proxy.metrics.upstream_errors.labels(outcome.route, "reset").inc()
            log.get_logger().warning("upstream_body_failed", route=outcome.route,
                                     error="UpstreamBroke")
            transport.abort()
            return False
        if chunked:
            transport.write(wire.CHUNKED_END)
        self._release(conn)
        return keep

    def _release(self, conn: UpstreamConn) -> None:
        body = self._body
        if body is not None and body.target is conn:
            body.target = None
            if body.remaining:
                conn.reusable = False   # the upstream answered before the body ended
        conn.on_writable = None
        if self._upstream is conn:
            self._upstream = None
        self._resume_reading("upstream")
        if conn.tainted:
            self._keep_private(conn)
        else:
            self._env.pool.release(conn)

    def _keep_private(self, conn: UpstreamConn) -> None:
        old, self._private = self._private, None
        if old is not None and old is not conn:
            old.abort()
        if conn.closed or not conn.reusable or self._transport is None:
            conn.abort()
            return
        conn.idle()
        self._private = conn

    def _take_private(self, scheme: str, host: str, port: int, tls: ssl.SSLContext | None
                      ) -> UpstreamConn | None:
        conn, self._private = self._private, None
        if conn is None:
            return None
        if conn.key == (scheme, host, port, id(tls)) and conn.fresh(self._env.pool.keepalive):
            return conn
        conn.abort()
        return None

    def _drop_private(self) -> None:
        conn, self._private = self._private, None
        if conn is not None:
            conn.abort()


def _release_reserved(body: _Body) -> None:
    if body.budget is not None:
        body.budget.release(body.reserved)
        body.reserved = 0
        body.budget = None


def _forget_frames(exc: BaseException) -> None:
    """Drop the traceback of an exception a future handed us.

    The future still holds the exception, and its traceback holds the frame that awaited the
    future, whose locals hold the future: a reference cycle that would keep the connection and
    its buffers alive until a full garbage collection (tests/test_fastpath_cycles.py).
    """
    exc.__traceback__ = None
