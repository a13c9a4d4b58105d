"""One request on a fast-path connection: a token, the upstream request (once more after a
refused token), and the answer relayed chunk by chunk."""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import TYPE_CHECKING, Final

from tokenproxy import log
from tokenproxy.errors import RequestRejected, TokenError, UpstreamError
from tokenproxy.proxy.failures import UpstreamBroke, upstream_error
from tokenproxy.proxy.fast_path import splice, wire
from tokenproxy.proxy.fast_path.body import DISCARD_LIMIT, RequestBody
from tokenproxy.proxy.fast_path.head import Request
from tokenproxy.proxy.fast_path.upstream import ResponseHead, UpstreamConn
from tokenproxy.proxy.rules.headers import (
    NO_BODY_STATUSES,
    request_headers,
    response_headers,
    safe_reason,
)
from tokenproxy.proxy.rules.problem import Problem
from tokenproxy.proxy.rules.reuse import last_request
from tokenproxy.proxy.runtime import CLIENT_GONE, Outcome, Sending, bounded
from tokenproxy.tokens.source import Token

if TYPE_CHECKING:
    from tokenproxy.proxy.fast_path.connection import FastConnection

IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})


class Exchange:
    """One request on *conn* (its client connection), start to finish; see the module doc."""

    def __init__(self, conn: FastConnection, req: Request, body: RequestBody | None) -> None:
        self._conn = conn
        self._req = req
        self._body = body
        self._outcome = Outcome(route=req.compiled.route.label)

    async def run(self) -> None:
        """The whole exchange; the connection goes on (or closes) afterwards."""
        req, outcome, conn = self._req, self._outcome, self._conn
        proxy = req.proxy
        started = time.perf_counter()
        proxy.metrics.inflight.inc()
        keep = req.keep_alive
        linger = True
        try:
            keep = await self._forward() and keep
        except asyncio.CancelledError:
            keep = False
            raise
        except (RequestRejected, UpstreamError, TokenError) as exc:
            problem = proxy.failed(exc, outcome)
            if isinstance(exc, RequestRejected):
                keep = linger = False   # a stalled body is not waited for twice
            else:
                # Only a token problem leaves the body unsent, to be read and dropped.
                keep = keep and conn.body_done(drop=not isinstance(exc, UpstreamError))
            self._answer(problem, close=not keep)
        except Exception as exc:
            keep = False
            log.get_logger().error("internal_error", error=type(exc).__name__)
            if outcome.status == CLIENT_GONE:
                self._answer(Problem(500, "internal", "tokenproxy failed to handle the request"),
                             close=True)
        finally:
            proxy.metrics.inflight.dec()
            try:
                proxy.record(req.method_str, req.target, outcome, time.perf_counter() - started)
            except Exception as exc:   # a failed log write must not leave the connection busy
                log.get_logger().error("internal_error", error=type(exc).__name__)
        conn.finish(keep, linger=linger)

    def _answer(self, problem: Problem, *, close: bool) -> None:
        """An error of ours; its body counts in the access log's bytes."""
        head, body = wire.problem(problem, self._conn.env.date(), close=close)
        if self._req.method == b"HEAD":
            # The head says the length a GET would get; a body would be read as the start of
            # the next answer on this connection.
            body = b""
        self._outcome.status = problem.status
        self._outcome.bytes += len(body)
        if self._conn.transport is not None:
            self._conn.transport.write(head + body)

    async def _forward(self) -> bool:
        """Send upstream (once more after a refused token), relay; True if keep-alive holds."""
        req, outcome = self._req, self._outcome
        proxy = req.proxy
        compiled = req.compiled
        source = proxy.source_for(compiled)
        token = source.valid_now()
        if token is None:
            token = await bounded(source.current(), compiled, source.name)
        body: bytes | None = b""
        if self._body is not None:
            # None: streamed, sent once and never replayed (from the start, or once the
            # replay budget ran out while it arrived).
            body = await self._whole_body(self._body) if self._body.whole else None
        last = last_request(req.method_str, self._body is not None)
        head, client_auth = self._render_head(last)
        sending = Sending(compiled, source, token, outcome,
                          (outcome.route, req.method_str, req.path), client_auth,
                          replayable=body is not None)
        while True:
            auth = b"" if client_auth else proxy.token_line(compiled, sending.token)
            conn, resp, done = await self._send(head + auth + wire.CRLF, body, last)
            if not await proxy.send_again(sending, resp.status, conn.abort):
                break
            conn.abort()   # the refused answer is not relayed; its body is not worth reading
        return await self._relay(conn, resp, done, sending.token)

    def _render_head(self, last: bool) -> tuple[bytes, bool]:
        """The upstream request head without the token line: (head, client_sent_auth)."""
        req = self._req
        compiled = req.compiled
        route = compiled.route
        out, client_auth, invalid = request_headers(
            req.headers, drop=req.proxy.policy.local_headers,
            auth_header=compiled.auth_header_low,
            keep_client_auth=route.client_authorization == "keep",
            preserve_host=route.preserve_host,
        )
        req.proxy.count_invalid_names(invalid)
        target = compiled.upstream_target(req.path, req.query).encode("utf-8", "surrogateescape")
        host = None if route.preserve_host else compiled.host_header
        return wire.render_request(req.method, target, host, out, req.length,
                                   close=last), client_auth

    async def _whole_body(self, body: RequestBody) -> bytes | None:
        """The whole body, or None when it must stream after all (the budget ran out)."""
        if not body.complete.done():
            try:
                async with asyncio.timeout(self._req.compiled.route.timeout):
                    await body.complete
            except TimeoutError:
                raise RequestRejected(408, "request_timeout",
                                      "the request body did not arrive in time") from None
        return body.take() if body.whole else None

    async def _send(self, head: bytes, body: bytes | None, last: bool,
                    ) -> tuple[UpstreamConn, ResponseHead, asyncio.Future[None]]:
        """One request upstream; the route timeout runs until the response head arrives.

        A pooled connection the upstream closed while idle fails before answering anything;
        a replayable request is then sent once more on a new connection.
        """
        req, client = self._req, self._conn
        scheme, host, port, tls = req.proxy.upstream_origin(req.compiled)
        conn: UpstreamConn | None = None
        pool = client.env.pool
        # One deadline for connect, send and the response head; a timer, not an
        # asyncio.timeout() per request (that cost 8 % of a small request).
        deadline = client.loop.time() + req.compiled.route.timeout
        try:
            for _ in range(2):
                conn = client.take_private(scheme, host, port, tls) or pool.take(
                    scheme, host, port, tls)
                if conn is None:
                    async with asyncio.timeout_at(deadline):
                        conn = await pool.connect(scheme, host, port, tls)
                client.upstream = conn
                conn.begin(req.method == b"HEAD", body=self._body is not None, last=last)
                # Held here: the connection drops its own references when it is aborted.
                head_answer, done = conn.head, conn.done
                assert head_answer is not None
                assert done is not None
                if client.write_paused:
                    conn.pause_reading()
                if body is None:
                    self._stream_body(conn, head)
                else:
                    conn.write(head + body if body else head)
                timer = client.loop.call_at(deadline, conn.time_out)
                try:
                    return conn, await head_answer, done
                except UpstreamBroke as exc:
                    # RFC 9112 section 9.3.1: an idempotent request whose connection
                    # closed before any answer may be sent again (as aiohttp does).
                    if conn.got_bytes or body is None or req.method_str not in IDEMPOTENT:
                        raise
                    forget_frames(exc)
                finally:
                    timer.cancel()
            raise UpstreamBroke("unreachable")
        except (TimeoutError, OSError, ssl.SSLError, UpstreamBroke) as exc:
            forget_frames(exc)
            if conn is not None:
                conn.abort()
            raise upstream_error(exc) from None

    def _stream_body(self, conn: UpstreamConn, head: bytes) -> None:
        """Send the head, what the client sent so far, and pipe the rest as it comes."""
        body = self._body
        assert body is not None
        if self._splice_up(conn, head, body):
            return
        conn.write(head + body.take())
        body.target = conn
        conn.on_writable = self._conn.upload_writable
        self._conn.resume_reading("hold")

    def _splice_up(self, conn: UpstreamConn, head: bytes, body: RequestBody) -> bool:
        """Send the rest of a streamed upload by splice(2) when it can (splice.between: plain
        sockets both sides), with nothing of ours still waiting in the upstream's write buffer:
        the client's transport pauses until the relay ends (FastConnection.end_upload)."""
        client = self._conn
        if not client.env.splice or body.remaining < splice.SPLICE_MIN or conn.transport is None:
            return False
        if conn.transport.get_write_buffer_size() or client.upload is not None:
            return False
        relay = splice.between(client.loop, client.transport, conn.transport, body.remaining)
        if relay is None:
            return False
        client.pause_reading("splice")
        body.target = conn
        client.upload = relay
        relay.done.add_done_callback(client.upload_ended)
        relay.start(head + body.take())
        client.resume_reading("hold")   # "splice" holds it while the relay reads
        return True

    async def _relay(self, conn: UpstreamConn, resp: ResponseHead, done: asyncio.Future[None],
                     token: Token) -> bool:
        req, outcome, client = self._req, self._outcome, self._conn
        if client.upload is not None and self._body is not None:
            self._body.remaining = client.upload.left   # an answer before the upload ended
        proxy = req.proxy
        compiled = req.compiled
        status = resp.status
        token_bytes = token.value.encode()
        headers = response_headers(
            resp.headers, token=token_bytes,
            rewrite_location=lambda loc: proxy.table.rewrite_location(loc, compiled),
        )
        body = self._body
        # More unread body than we would drop: this connection closes after the answer.
        keep = req.keep_alive and not client.close_after and (
            body is None or body.remaining <= DISCARD_LIMIT)
        no_body = req.method == b"HEAD" or status in NO_BODY_STATUSES
        framing, chunked = wire.response_framing(status, resp.length, no_body)
        out = wire.render_response(status, safe_reason(resp.reason, token_bytes), headers,
                                   framing, client.env.date(), not keep)
        transport = client.transport
        if transport is None:
            raise asyncio.CancelledError
        outcome.status = status
        if no_body:
            transport.write(out)
            self._release(conn)
            return keep
        relay = None if chunked or resp.chunked else self._splice_relay(conn, resp.length)
        if relay is not None:
            return await self._splice_down(conn, out, relay, keep)

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
            forget_frames(exc)
            # The upstream broke mid-body: a truncated body must look truncated to the
            # client, so its connection is cut instead of the response being finished.
            proxy.body_failed(outcome.route, exc)
            transport.abort()
            return False
        if chunked:
            transport.write(wire.CHUNKED_END)
        self._release(conn)
        return keep

    def _splice_relay(self, conn: UpstreamConn, length: bytes | None) -> splice.Relay | None:
        """A relay for the rest of this body, when it can be spliced: a Content-Length body
        with at least SPLICE_MIN bytes to come, plain sockets both sides (no TLS), and nothing
        of ours still waiting in the client's write buffer."""
        if length is None or not length.isdigit():
            return None
        left = int(length) - conn.pending_size
        client = self._conn
        transport = client.transport
        if (not client.env.splice or left < splice.SPLICE_MIN or client.write_paused
                or transport is None or transport.get_write_buffer_size()):
            return None
        return splice.between(client.loop, conn.transport, transport, left,
                              client.env.limits().send_timeout, check_trailing=True)

    async def _splice_down(self, conn: UpstreamConn, out: bytes, relay: splice.Relay,
                           keep: bool) -> bool:
        """The rest of a download by splice(2) (splice.py): the head and the body bytes parsed
        so far go first, written by the relay itself, then the socket's bytes straight across."""
        outcome, client = self._outcome, self._conn
        left = relay.left
        held = conn.take_for_splice()
        outcome.bytes += len(held)
        try:
            relay.start(out + held)
            await relay.done
        except splice.SourceClosed as exc:
            forget_frames(exc)
            outcome.bytes += relay.written
            # As on the copy path: a truncated body must look truncated to the client.
            self._req.proxy.body_failed(outcome.route, exc)
            client.abort()
            conn.abort()
            return False
        except (splice.SinkClosed, splice.SinkStalled) as exc:
            forget_frames(exc)
            outcome.bytes += relay.written
            if isinstance(exc, splice.SinkStalled):
                log.get_logger().info("send_timeout", timeout_s=client.env.limits().send_timeout)
            client.abort()   # the client left, or took nothing for send_timeout
            conn.abort()     # its answer is unfinished: never back to the pool
            return False
        finally:
            relay.stop()   # a cancelled exchange closes the duplicates and the pipe at once
        outcome.bytes += left
        conn.spliced(relay.trailing)
        self._release(conn)
        return keep

    def _release(self, conn: UpstreamConn) -> None:
        client = self._conn
        client.end_upload()
        body = self._body
        if body is not None and body.target is conn:
            body.target = None
            if body.remaining:
                conn.reusable = False   # the upstream answered before the body ended
        conn.on_writable = None
        if client.upstream is conn:
            client.upstream = None
        client.resume_reading("upstream")
        if conn.tainted:
            client.keep_private(conn)
        else:
            client.env.pool.release(conn)


def forget_frames(exc: BaseException) -> None:
    """Drop the traceback of an exception a future handed us.

    The future still holds the exception, and its traceback holds the frame that awaited the
    future, whose locals hold the future: a reference cycle that would keep the connection and
    its buffers alive until a full garbage collection (tests/test_fastpath_cycles.py).
    """
    exc.__traceback__ = None
