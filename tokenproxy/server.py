"""Listening sockets, the connection cap, and the HTTP protocol with a request-head deadline.

aiohttp has neither a header timeout (its keep-alive timer alone lets a slowloris client hold a
connection for keepalive_timeout) nor a connection cap (sites only take a backlog). Both live
here: each listener runs its own accept loop that takes a slot before accepting, so excess
clients wait in the kernel's listen backlog; and the protocol arms a deadline whenever it is
waiting for a request head. A gate may also make room for a waiting client by closing the
connection idle longest, so that idle clients cannot starve health probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import grp
import math
import os
import socket
import stat
from collections.abc import Callable, Iterable
from typing import Any, Final, Protocol

from aiohttp import web, web_protocol
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong

from tokenproxy import log
from tokenproxy.config import Listener
from tokenproxy.errors import TokenProxyError
from tokenproxy.proxy.problem import problem_response

BACKLOG: Final = 1024
# How often a full gate with a client waiting looks again for an idle connection to close
# when every one is busy (busy connections do not say when they turn idle).
REUSE_RECHECK: Final = 0.1
# At most one reuse warning per this many seconds, as nginx does for the same event.
REUSE_WARN_INTERVAL: Final = 1.0


class ListenError(TokenProxyError):
    """A listener could not be opened (address in use, permission, bad path)."""

    cause = "listen"


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
        return problem_response(status, cause, detail, close=True)


class Reusable(Protocol):
    """An open connection that can tell whether it is idle, and be closed to make room."""

    def idle_since(self) -> float | None: ...

    def close_idle(self) -> None: ...


class ConnectionGate:
    """At most *limit* open connections across the listeners that share this gate.

    Each accept loop takes a slot before accepting, so clients beyond the limit wait in the
    kernel's listen backlog. The limit can change on reload.

    With *reusable* (the open connections), a full gate makes room for a client waiting in a
    backlog by closing the connection that has been idle longest, as nginx reuses idle
    keep-alive connections when its worker_connections run out: whatever idle clients hold, a
    health probe gets in. Connections with a request to handle are never closed for this.
    """

    def __init__(
        self,
        limit: int,
        on_change: Callable[[int], None] | None = None,
        *,
        reusable: Callable[[], Iterable[Reusable]] | None = None,
    ) -> None:
        self._limit = limit
        self._taken = 0          # slots held: open connections plus loops waiting to accept
        self._open = 0
        self._freed = asyncio.Event()
        self._on_change = on_change
        self._reusable = reusable
        self._warned_at = -math.inf

    async def acquire(self, backlog: socket.socket | None = None) -> None:
        """Take a slot before accepting; it counts as open only once a connection comes.

        *backlog* is the listening socket the slot is for: a client waiting there is what
        makes a gate with *reusable* connections close an idle one.
        """
        while self._taken >= self._limit:
            self._freed.clear()
            if self._reusable is None or backlog is None:
                await self._freed.wait()
            else:
                await self._make_room(backlog)
        self._taken += 1

    async def _make_room(self, backlog: socket.socket) -> None:
        """Return once a slot was freed, or after closing an idle connection for a client
        waiting in *backlog* (its slot comes back a loop turn later), or after a short wait
        when every connection is busy."""
        freed = asyncio.ensure_future(self._freed.wait())
        try:
            if not await _client_waits(backlog, freed):
                return
            victim = self._longest_idle()
            if victim is not None:
                self._warn_reuse()
                victim.close_idle()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(freed, REUSE_RECHECK)
        finally:
            freed.cancel()

    def _longest_idle(self) -> Reusable | None:
        assert self._reusable is not None
        idle = [(since, conn) for conn in self._reusable()
                if (since := conn.idle_since()) is not None]
        return min(idle, key=lambda pair: pair[0])[1] if idle else None

    def _warn_reuse(self) -> None:
        now = asyncio.get_running_loop().time()
        if now - self._warned_at >= REUSE_WARN_INTERVAL:
            self._warned_at = now
            log.get_logger().warning("idle_connection_closed", limit=self._limit,
                                     reason="limit reached with a client waiting")

    def release(self) -> None:
        """Give back a slot that got no connection (the accept failed)."""
        self._taken -= 1
        self._freed.set()

    def opened(self) -> None:
        self._open += 1
        if self._on_change:
            self._on_change(self._open)

    def closed(self) -> None:
        self._open -= 1
        self.release()
        if self._on_change:
            self._on_change(self._open)

    def resize(self, limit: int) -> None:
        self._limit = limit
        self._freed.set()


async def _client_waits(listening: socket.socket, freed: asyncio.Future[Any]) -> bool:
    """True once a client waits in *listening*'s backlog (it turns readable); False if
    *freed* completes first."""
    loop = asyncio.get_running_loop()
    waiting: asyncio.Future[None] = loop.create_future()
    fd = listening.fileno()
    loop.add_reader(fd, _resolve, waiting)
    try:
        await asyncio.wait((freed, waiting), return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Here, not in a task of its own: the reader must be gone before the socket closes.
        loop.remove_reader(fd)
        waiting.cancel()
    return not freed.done()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def guarded_connections(server: web.Server) -> Callable[[], list[GuardedRequestHandler]]:
    """The open connections of *server*, each able to say whether it is idle (for a gate)."""
    return lambda: [h for h in server.connections if isinstance(h, GuardedRequestHandler)]


def _bind_tcp(listener: Listener) -> list[socket.socket]:
    try:
        infos = socket.getaddrinfo(listener.host, listener.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ListenError(f"listen {listener}: cannot resolve host ({exc.strerror})") from None
    socks: list[socket.socket] = []
    seen: set[Any] = set()
    port = listener.port
    try:
        for family, kind, proto, _, addr in infos:
            if (family, addr[0]) in seen:
                continue
            seen.add((family, addr[0]))
            sock = socket.socket(family, kind, proto)
            socks.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            # "localhost:0" on two families: the second must take the port the first got.
            sock.bind((addr[0], port, *addr[2:]))
            port = sock.getsockname()[1]
            sock.listen(BACKLOG)
            sock.setblocking(False)
    except OSError as exc:
        for s in socks:
            s.close()
        raise ListenError(f"listen {listener}: {exc.strerror or exc}") from None
    return socks


def _remove_stale_unix_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ListenError(f"listen unix:{path}: exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)   # nobody answers: left over from a crash
        return
    finally:
        probe.close()
    raise ListenError(f"listen unix:{path}: another process is serving this socket")


def _bind_unix(listener: Listener, group: str | None) -> socket.socket:
    path = listener.path
    gid = -1
    if group is not None:
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ListenError(f"socket_group: no group named {group!r}") from None
    _remove_stale_unix_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)   # the socket is never world-accessible, not even for an instant
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise ListenError(f"listen unix:{path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old)
    try:
        if gid != -1:
            os.chown(path, -1, gid)
            os.chmod(path, 0o660)
        else:
            os.chmod(path, 0o600)
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise ListenError(f"listen unix:{path}: {exc.strerror or exc}") from None
    return sock


def bind(listener: Listener, socket_group: str | None = None) -> list[socket.socket]:
    """Open the listening sockets for one configured address."""
    if listener.kind == "unix":
        return [_bind_unix(listener, socket_group)]
    return _bind_tcp(listener)


class _Slot:
    """One connection's place under the cap, released exactly once."""

    __slots__ = ("_gate", "_held")

    def __init__(self, gate: ConnectionGate) -> None:
        self._gate = gate
        self._held = True
        gate.opened()

    def release(self) -> None:
        if self._held:
            self._held = False
            self._gate.closed()


ProtocolFactory = Callable[[Callable[[], None]], asyncio.Protocol]


class ListeningSocket:
    """One bound socket and its accept loop."""

    def __init__(self, sock: socket.socket, listener: Listener) -> None:
        self.sock = sock
        self.listener = listener
        self._task: asyncio.Task[None] | None = None

    @property
    def address(self) -> str:
        if self.listener.kind == "unix":
            return f"unix:{self.listener.path}"
        host, port = self.sock.getsockname()[:2]
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    @property
    def port(self) -> int:
        return int(self.sock.getsockname()[1]) if self.listener.kind == "tcp" else 0

    def start(self, factory: ProtocolFactory, gate: ConnectionGate) -> None:
        self._task = asyncio.create_task(self._accept(factory, gate))

    async def _accept(self, factory: ProtocolFactory, gate: ConnectionGate) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await gate.acquire(self.sock)
            try:
                conn, _ = await loop.sock_accept(self.sock)
            except OSError as exc:
                gate.release()
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.get_logger().warning("accept_failed", error=errno.errorcode[exc.errno])
                    await asyncio.sleep(0.1)   # out of descriptors: back off, do not spin
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue
                raise
            except BaseException:
                gate.release()
                raise
            slot = _Slot(gate)
            try:
                conn.setblocking(False)
                await loop.connect_accepted_socket(functools.partial(factory, slot.release), conn)
            except OSError:
                conn.close()
                slot.release()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.sock.close()
        if self.listener.kind == "unix":
            with contextlib.suppress(OSError):
                os.unlink(self.listener.path)
