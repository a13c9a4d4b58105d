"""Listening sockets and the connection cap.

aiohttp has no connection cap (its sites only take a backlog). Here each listener runs its own
accept loop that takes a slot before accepting, so excess clients wait in the kernel's listen
backlog. A gate may also make room for a waiting client by closing the connection idle
longest, so that idle clients cannot starve health probes. The protocols on the accepted
connections (fast_path/, aiohttp_path/protocol.py) give the slot back when they close.
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

from tokenproxy import log
from tokenproxy.config import Listener
from tokenproxy.errors import TokenProxyError

BACKLOG: Final = 1024
# How often a full gate with a client waiting looks again for an idle connection to close
# when every one is busy (busy connections do not say when they turn idle).
REUSE_RECHECK: Final = 0.1
# At most one reuse warning per this many seconds, as nginx does for the same event.
REUSE_WARN_INTERVAL: Final = 1.0


class ListenError(TokenProxyError):
    """A listener could not be opened (address in use, permission, bad path)."""

    cause = "listen"


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


# A connection's protocol, given what to call when it closes (None: nothing; a protocol taking
# over a connection from another may have no slot of its own to give back).
ProtocolFactory = Callable[[Callable[[], None] | None], asyncio.Protocol]


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
