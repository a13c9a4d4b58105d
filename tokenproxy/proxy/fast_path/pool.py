"""The fast path's idle upstream connections, per origin, kept alive between exchanges."""

from __future__ import annotations

import asyncio
import ssl
import time
from typing import Final

from tokenproxy.proxy.fast_path.connect import Resolver, open_connection
from tokenproxy.proxy.fast_path.upstream import UpstreamConn
from tokenproxy.proxy.rules.upstream import KEEPALIVE

MAX_IDLE_PER_ORIGIN: Final = 256


class UpstreamPool:
    """Idle keep-alive connections per origin; newest first, expired ones closed."""

    def __init__(self, keepalive: float = KEEPALIVE) -> None:
        self.keepalive = keepalive
        self._idle: dict[tuple[object, ...], list[UpstreamConn]] = {}
        self._resolver = Resolver()
        self._sweeper: asyncio.TimerHandle | None = None

    def take(self, scheme: str, host: str, port: int,
             tls: ssl.SSLContext | None) -> UpstreamConn | None:
        """An idle connection to this origin that is still open and fresh, else None."""
        idle = self._idle.get((scheme, host, port, id(tls)))
        while idle:
            conn = idle.pop()
            if conn.fresh(self.keepalive):
                return conn
            conn.abort()
        return None

    async def connect(self, scheme: str, host: str, port: int,
                      tls: ssl.SSLContext | None) -> UpstreamConn:
        """A new connection (connect.py); raises OSError, ssl errors or TimeoutError."""
        key = (scheme, host, port, id(tls))
        return await open_connection(await self._resolver.addresses(host, port), host, tls,
                                     lambda: UpstreamConn(key))

    def release(self, conn: UpstreamConn) -> None:
        """Keep a connection whose exchange completed cleanly; close any other.

        A tainted connection is the caller's to keep for its own client (see
        UpstreamConn.tainted): it never comes here.
        """
        assert not conn.tainted
        if conn.closed or not conn.reusable:
            conn.abort()
            return
        conn.idle()
        idle = self._idle.setdefault(conn.key, [])
        if len(idle) >= MAX_IDLE_PER_ORIGIN:
            idle.pop(0).abort()
        # Expired connections sit at the front (oldest first): drop them on the way.
        while idle and conn.idle_since - idle[0].idle_since >= self.keepalive:
            idle.pop(0).abort()
        idle.append(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(self.keepalive, self._sweep)

    def _sweep(self) -> None:
        """Close idle connections past the keep-alive time, for origins no request visits."""
        self._sweeper = None
        now = time.monotonic()
        for idle in self._idle.values():
            while idle and now - idle[0].idle_since >= self.keepalive:
                idle.pop(0).abort()
        if any(self._idle.values()):
            self._sweeper = asyncio.get_running_loop().call_later(self.keepalive / 2,
                                                                  self._sweep)

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()
