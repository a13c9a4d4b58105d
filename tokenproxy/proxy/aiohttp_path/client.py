"""The aiohttp path's outgoing clients for upstreams (its failures are classified in
proxy/failures.py)."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from typing import Any, Final, cast

import aiohttp
from aiohttp.client_proto import ResponseHandler

from tokenproxy.proxy.rules.headers import MAX_UPSTREAM_FIELD
from tokenproxy.proxy.rules.upstream import CONNECT_TIMEOUT, DNS_TTL, KEEPALIVE

# The proxy sends what the client sent: no invented Accept, Accept-Encoding, User-Agent or
# Content-Type (an invented Accept-Encoding would get compressed bodies the client never asked for).
SKIP_AUTO_HEADERS: Final = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")


class _IdleGuard(ResponseHandler):
    """aiohttp's client protocol, except that bytes arriving while the pool holds it idle
    close it. aiohttp would parse them and hand the stray answer to the next request on
    the connection, from any client, and every answer after it would be one behind."""

    def __init__(self, loop: asyncio.AbstractEventLoop, pool: IdleGuardConnector) -> None:
        super().__init__(loop)
        self._pool = pool

    def data_received(self, data: bytes) -> None:
        if data and not self._pool.in_use(self):
            self.close()
            return
        super().data_received(data)


class IdleGuardConnector(aiohttp.TCPConnector):
    """aiohttp's pool of upstream connections, with _IdleGuard's protocol."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._factory = cast("functools.partial[ResponseHandler]",
                             functools.partial(_IdleGuard, loop=self._loop, pool=self))

    def in_use(self, protocol: ResponseHandler) -> bool:
        # aiohttp keeps the protocols of handed-out connections in _acquired, from connect
        # until release (tests/test_confinement.py fails if that changes).
        return protocol in self._acquired


@dataclass(frozen=True, slots=True)
class UpstreamSessions:
    """The aiohttp path's clients: a pool for requests without a body, and one that closes
    every connection for requests with one (rules/reuse.py). aiohttp's client returns a
    connection to its pool as soon as the answer's body ends, before the caller could close
    it, and ignores a request's own ``Connection: close``: only a connector that never pools
    keeps a connection a client's body went into from serving another client."""

    pooled: aiohttp.ClientSession
    closing: aiohttp.ClientSession
    # WebSocket handshakes: aiohttp's ws_connect follows redirects (with a custom token
    # header, to any host), and takes no allow_redirects; this client refuses them.
    websocket: aiohttp.ClientSession

    @classmethod
    def make(cls, max_connections: int) -> UpstreamSessions:
        return cls(_session(max_connections, force_close=False),
                   _session(max_connections, force_close=True),
                   _session(max_connections, force_close=True, follow_redirects=False))

    async def close(self) -> None:
        await self.pooled.close()
        await self.closing.close()
        await self.websocket.close()


class RedirectRefused(Exception):
    """A redirect the client was about to follow; its answer, for the caller to pass back."""

    def __init__(self, status: int, headers: tuple[tuple[bytes, bytes], ...]) -> None:
        super().__init__(status)
        self.status = status
        self.headers = headers


async def _refuse_redirect(session: aiohttp.ClientSession, context: object,
                           params: aiohttp.TraceRequestRedirectParams) -> None:
    params.response.close()
    raise RedirectRefused(params.response.status, params.response.raw_headers)


def _session(max_connections: int, *, force_close: bool, follow_redirects: bool = True
             ) -> aiohttp.ClientSession:
    """A client for all upstreams; never per request."""
    connector = IdleGuardConnector(
        limit=max_connections,
        limit_per_host=0,
        force_close=force_close,
        keepalive_timeout=None if force_close else KEEPALIVE,
        ttl_dns_cache=int(DNS_TTL),
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,                 # Content-Encoding passes through untouched
        cookie_jar=aiohttp.DummyCookieJar(),   # one client's cookies must not reach another
        skip_auto_headers=SKIP_AUTO_HEADERS,
        trust_env=False,                       # HTTPS_PROXY must not reroute a token
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT),
        max_line_size=MAX_UPSTREAM_FIELD,
        max_field_size=MAX_UPSTREAM_FIELD,
        raise_for_status=False,
        trace_configs=[] if follow_redirects else [_redirect_refusal()],
    )


def _redirect_refusal() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()
    trace.on_request_redirect.append(_refuse_redirect)
    return trace
