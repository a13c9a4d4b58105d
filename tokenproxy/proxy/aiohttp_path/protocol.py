"""aiohttp's server protocol, guarded: a deadline for each request head (aiohttp has none:
its keep-alive timer alone lets a slowloris client hold a connection), a send deadline, a
connection slot released on close, and problem+json for what aiohttp refuses itself."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong

from tokenproxy import log
from tokenproxy.proxy.aiohttp_path.responses import problem_response
from tokenproxy.proxy.rules.problem import Problem


class GuardedRequestHandler(web_protocol.RequestHandler):
    """aiohttp's protocol plus a head deadline, a connection slot, and problem+json errors."""

    def __init__(
        self,
        manager: web.Server,
        *,
        loop: asyncio.AbstractEventLoop,
        header_timeout: float,
        send_timeout: float,
        on_close: Callable[[], None] | None,
        **kwargs: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kwargs)
        self._tp_header_timeout = header_timeout
        self._tp_send_timeout = send_timeout
        self._tp_send_timer: asyncio.TimerHandle | None = None
        self._tp_paused_since = 0.0
        self._tp_timer: asyncio.TimerHandle | None = None
        self._tp_on_close = on_close
        self._tp_idle_since = loop.time()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._tp_arm()

    def data_received(self, data: bytes) -> None:
        # Waiting for a head: the first byte starts the clock (an idle keep-alive connection
        # is the keep-alive timer's business, not this one's).
        if self._tp_timer is None and not self._request_in_progress and not self._messages:
            self._tp_arm()
        super().data_received(data)
        if self._messages and self._tp_timer is not None:
            self._tp_timer.cancel()
            self._tp_timer = None
        if self._messages and self._current_request is not None:
            self._tp_fail_body(self._messages[-1][0], self._current_request)

    @staticmethod
    def _tp_fail_body(message: object, request: web.BaseRequest) -> None:
        """A framing error in the body of the request being handled reaches its reader.

        aiohttp's C parser queues the error as a next message but never tells the body stream
        (bad chunk size after the head was dispatched), so the handler would wait on the body
        forever with the connection held open.
        """
        if isinstance(message, web_protocol._ErrInfo) and not request.content.is_eof():
            request.content.set_exception(message.exc)
            request.content.feed_eof()   # nothing more will come: no lingering read after

    def pause_writing(self) -> None:
        super().pause_writing()
        # A client that takes none of its answer for send_timeout is cut off (nginx's
        # send_timeout): it would hold its slot, and with it the answer, for ever.
        self._tp_paused_since = self._loop.time()
        self._tp_send_timer = self._loop.call_later(self._tp_send_timeout, self._tp_send_expired)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._tp_send_timer is not None:
            self._tp_send_timer.cancel()
            self._tp_send_timer = None

    def _tp_send_expired(self) -> None:
        self._tp_send_timer = None
        log.get_logger().info("send_timeout", timeout_s=self._tp_send_timeout)
        if self.transport is not None:
            self.transport.abort()

    def idle_since(self) -> float | None:
        """Since when this connection has been waiting for a request head (idle after a
        response, or with no complete head yet), or for a client that takes none of its
        answer; None while it has a request to handle."""
        if self.writing_paused and self.transport is not None:
            return self._tp_paused_since   # a client that does not read is as good as idle
        # aiohttp's own test for "idle" (_process_keepalive): its loop awaits the next message.
        waiter = self._waiter
        if waiter is None or waiter.done() or self.transport is None:
            return None
        return self._tp_idle_since

    def close_idle(self) -> None:
        """Close this idle connection at once, to give its slot to a waiting client."""
        if self.transport is not None:
            # Not close(): unsent bytes for a client that does not read would keep the slot.
            self.transport.abort()
        self.force_close()

    def _tp_arm(self) -> None:
        self._tp_timer = self._loop.call_later(self._tp_header_timeout, self._tp_expire)

    def _tp_expire(self) -> None:
        self._tp_timer = None
        if self._request_in_progress or self._messages:
            return
        log.get_logger().info("header_timeout", timeout_s=self._tp_header_timeout)
        self.force_close()

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """Wait until the client has taken this answer before its next request is handled.

        aiohttp drains its write buffer only past 64 KiB per answer, so a client that
        pipelines requests for smaller answers and never reads would make the daemon fetch
        and hold every one of them. Waiting here stops that: pipelined heads queue up to
        aiohttp's bound, then reading pauses.
        """
        result = await super().finish_response(request, resp, start_time)
        await request.writer.drain()
        self._tp_idle_since = self._loop.time()   # the wait for the next head starts
        return result

    def connection_lost(self, exc: BaseException | None) -> None:
        for timer in (self._tp_timer, self._tp_send_timer):
            if timer is not None:
                timer.cancel()
        self._tp_timer = self._tp_send_timer = None
        try:
            super().connection_lost(exc)
        finally:
            callback, self._tp_on_close = self._tp_on_close, None
            if callback is not None:
                callback()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Malformed requests and handler crashes: problem+json, connection closed.

        aiohttp's default logs the exception with its message, which can quote request bytes;
        only the exception type is logged here.
        """
        if request.writer.output_size > 0:
            raise ConnectionError("response already started")
        if isinstance(exc, LineTooLong) or (
            isinstance(exc, BadHttpMessage) and "too long" in str(exc).lower()
        ):
            status, cause, detail = 431, "header_too_large", "a request header line is too long"
        elif isinstance(exc, BadHttpMessage) and "too many headers" in str(exc).lower():
            # RFC 6585: 431 covers too many fields as well as too large ones.
            status, cause, detail = 431, "header_too_large", "the request has too many headers"
        elif isinstance(exc, HttpProcessingError):
            # Malformed framing found while the handler read the body (see _tp_fail_body).
            status, cause, detail = 400, "bad_request", "the request is malformed"
        elif status == 500:
            cause, detail = "internal", "tokenproxy failed to handle the request"
            log.get_logger().error("internal_error", error=type(exc).__name__)
        elif status == 504:
            cause, detail = "upstream_timeout", "the request timed out"
        else:
            cause, detail = "bad_request", "the request is malformed"
        if status != 500:
            log.get_logger().info("bad_request", status=status,
                                  error=type(exc).__name__ if exc else None)
        return problem_response(Problem(status, cause, detail), close=True)


def guarded_connections(server: web.Server) -> Callable[[], list[GuardedRequestHandler]]:
    """The open connections of *server*, each able to say whether it is idle (for a gate)."""
    return lambda: [h for h in server.connections if isinstance(h, GuardedRequestHandler)]
