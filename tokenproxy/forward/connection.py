"""One client connection to the forward-proxy listener: its first request head decides what
the connection becomes.

- ``CONNECT host:port`` to an intercepted host: ``200``, then TLS ended here with a leaf the
  local CA signed for that host, and the decrypted stream served as the host's route is
  (service.py), token attached.
- ``CONNECT`` to a tunnel host: ``200``, then bytes relayed both ways (tunnel.py).
- An absolute-form ``http://host/...`` request to an intercepted host: rewritten to origin
  form and served the same way, one request per connection (``Connection: close``).
- Anything else: a problem answer (403 naming the host, 400, 407, 431), and the connection
  closed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import re
import socket
import ssl
from collections.abc import Callable
from typing import Final, cast

from tokenproxy import log
from tokenproxy.config.model import InterceptHost, LimitsConfig
from tokenproxy.errors import RequestRejected
from tokenproxy.forward.service import Forward
from tokenproxy.forward.targets import (
    TUNNEL,
    Target,
    absolute_target,
    connect_target,
    local_address,
    names_local,
)
from tokenproxy.forward.tunnel import Idle, Pipe
from tokenproxy.proxy.fast_path import wire
from tokenproxy.proxy.fast_path.connect import AddrInfo, open_connection
from tokenproxy.proxy.rules.headers import connection_listed
from tokenproxy.proxy.rules.problem import Problem
from tokenproxy.proxy.rules.security import FORWARDING_HEADERS
from tokenproxy.proxy.rules.upstream import CONNECT_TIMEOUT

ESTABLISHED: Final = b"HTTP/1.1 200 Connection Established\r\n\r\n"
_TOKEN: Final = frozenset(b"!#$%&'*+-.^_`|~0123456789"
                          b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_DROPPED: Final = (b"proxy-authorization", b"proxy-connection", b"connection", b"keep-alive")


# Bytes no field value may hold (RFC 9110 section 5.5): controls but HTAB, and DEL.
_CONTROL: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


def parse_head(head: bytes) -> tuple[bytes, str, bytes, list[tuple[bytes, bytes]]]:
    """(method, target, version, fields) of a request head without its final CRLF CRLF.

    Only the first head of a forward-proxy connection is read here (a CONNECT, or one
    absolute-form request); what follows is llhttp's, on the request paths."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0") or not parts[0] \
            or not set(parts[0]) <= _TOKEN or not parts[1]:
        raise RequestRejected(400, "bad_request", "a malformed request line")
    fields: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or not set(name) <= _TOKEN or _CONTROL.search(value):
            raise RequestRejected(400, "bad_request", "a malformed header field")
        fields.append((name, value.strip(b" \t")))
    try:
        target = parts[1].decode("ascii")
    except UnicodeDecodeError:
        raise RequestRejected(400, "bad_request", "a request target that is not ASCII") from None
    return parts[0], target, parts[2], fields


def proxy_key(fields: list[tuple[bytes, bytes]]) -> bytes | None:
    """The password of ``Proxy-Authorization: Basic`` (any user name): how proxy clients
    (curl, requests, every HTTPS_PROXY=http://user:key@host) send a credential."""
    values = [v for n, v in fields if n.lower() == b"proxy-authorization"]
    if len(values) != 1:
        return None
    scheme, _, encoded = values[0].partition(b" ")
    if scheme.lower() != b"basic":
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return decoded.partition(b":")[2]


class ForwardConnection(asyncio.Protocol):
    def __init__(self, current: Callable[[], Forward | None], limits: Callable[[], LimitsConfig],
                 on_close: Callable[[], None] | None) -> None:
        self._current = current
        self._limits = limits()
        self._on_close = on_close
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._deciding = True    # reading the first head; after it, the connection is handed on
        self._early = bytearray()   # decrypted bytes that came before the inner protocol
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._log = log.get_logger()

    # -- the connection's life -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: typing only.
        self._transport = cast(asyncio.Transport, transport)
        self._timer = asyncio.get_running_loop().call_later(
            self._limits.header_timeout, self._too_slow)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._release()

    def _release(self) -> None:
        callback, self._on_close = self._on_close, None
        if callback is not None:
            callback()

    def _too_slow(self) -> None:
        self._timer = None
        if self._transport is not None:
            self._transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- the first head ------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if not self._deciding:
            self._early += data   # TLS application data before the inner protocol took over
            return
        self._buf += data
        end = self._buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buf) > self._limits.max_header_size:
                self._refuse(Problem(431, "header_too_large", "the request head is too large"))
            return
        if end > self._limits.max_header_size:
            self._refuse(Problem(431, "header_too_large", "the request head is too large"))
            return
        head, rest = bytes(self._buf[:end]), bytes(self._buf[end + 4:])
        self._buf.clear()
        self._deciding = False
        self._cancel_timer()
        forward = self._current()
        if forward is None:   # a listener bound by a reload that is not through yet
            # A listener bound by a reload not through yet, or a daemon shutting down.
            self._refuse(Problem(503, "internal", "the forward proxy is not serving now", 1.0))
            return
        try:
            self._dispatch(forward, head, rest)
        except RequestRejected as exc:
            if exc.cause == "forward_refused":
                forward.count("refused")
            self._refuse(Problem.of(exc), proxy_auth=exc.status == 407)

    def _dispatch(self, forward: Forward, head: bytes, rest: bytes) -> None:
        method, target, version, fields = parse_head(head)
        if forward.config.security.reject_forwarded:
            relayed = [FORWARDING_HEADERS[n.lower()] for n, _ in fields
                       if n.lower() in FORWARDING_HEADERS]
            if relayed:
                raise RequestRejected(403, "forwarded",
                                      f"requests relayed with {relayed[0]} are refused")
        if forward.client_key is not None:
            key = proxy_key(fields)
            if key is None or not hmac.compare_digest(key, forward.client_key):
                raise RequestRejected(407, "proxy_auth", "send the client key as the password "
                                      "of Proxy-Authorization: Basic")
        if method == b"CONNECT":
            framing = [(n.lower(), v) for n, v in fields
                       if n.lower() in (b"content-length", b"transfer-encoding")]
            if any(n == b"transfer-encoding" or v.strip() != b"0" for n, v in framing):
                # RFC 9110 section 9.3.6: a CONNECT has no content; bytes sent as one would
                # go into the tunnel as if the client had sent them through it.
                raise RequestRejected(400, "bad_request", "a CONNECT request with content")
            where = connect_target(target)
            decision = forward.decide(where, connect=True)
            if decision is TUNNEL:
                self._task = asyncio.ensure_future(self._tunnel(forward, where, rest))
                return
            if not isinstance(decision, InterceptHost) or decision.scheme != "https":
                raise _refused(where)
            if rest:
                raise RequestRejected(400, "bad_request", "bytes sent after CONNECT before "
                                      "its answer")
            self._task = asyncio.ensure_future(self._intercept(forward, decision, where))
            return
        where, path = absolute_target(target)
        decision = forward.decide(where, connect=False)
        # Only an entry for plain HTTP: a token must never go in clear to a TLS port.
        if not isinstance(decision, InterceptHost) or decision.scheme != "http":
            raise _refused(where)
        forward.count("intercepted")
        # The fields Connection names are hop-by-hop too (rules/headers.py), like Connection
        # itself, which is replaced below.
        dropped = {*_DROPPED, *connection_listed(fields)}
        lines = [method + b" " + path.encode("ascii") + b" " + version]
        lines += [n + b": " + v for n, v in fields if n.lower() not in dropped]
        lines.append(b"Connection: close")   # one request: the next may name another host
        self._hand_to(forward.service(decision, where, tls=False).factory,
                      b"\r\n".join(lines) + b"\r\n\r\n" + rest, self._transport)

    def _refuse(self, problem: Problem, *, proxy_auth: bool = False) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._deciding = False
        self._cancel_timer()
        forward = self._current()
        if forward is not None:
            # As on the proxy listeners: a guessed client key (407) leaves a trace.
            forward.metrics.rejected.labels(problem.cause).inc()
        head, body = wire.problem(problem, wire.DateHeader()(), close=True)
        if proxy_auth:
            head = head[:-2] + b'Proxy-Authenticate: Basic realm="tokenproxy"\r\n\r\n'
        transport.write(head + body)
        transport.close()

    # -- what the connection becomes -----------------------------------------------------

    def _hand_to(self, factory: Callable[[Callable[[], None] | None], asyncio.Protocol],
                 data: bytes, transport: asyncio.Transport | None) -> None:
        if transport is None or transport.is_closing():
            return
        callback, self._on_close = self._on_close, None
        inner = factory(callback)
        transport.set_protocol(inner)
        inner.connection_made(transport)
        if data:
            inner.data_received(data)

    async def _intercept(self, forward: Forward, entry: InterceptHost, where: Target) -> None:
        transport = self._transport
        assert transport is not None
        loop = asyncio.get_running_loop()
        try:
            service = forward.service(entry, where, tls=True)
            service_key = (where.host, where.port, True)
            context = forward.tls_context(where.host)
        except Exception as exc:   # the CA could not sign: a 502 of ours, not a crash
            self._log.error("forward_tls_failed", target=where.authority,
                            error=type(exc).__name__)
            forward.count("failed")
            # Ours, not the upstream's: the local CA could not sign for the host.
            self._refuse(Problem(500, "internal",
                                 f"no certificate for {where.host} could be made"))
            return
        transport.write(ESTABLISHED)
        service.pending += 1   # not evicted for room while the client's handshake runs
        try:
            tls = await loop.start_tls(transport, self, context, server_side=True,
                                       ssl_handshake_timeout=self._limits.header_timeout)
        except (OSError, ssl.SSLError, TimeoutError, ConnectionError) as exc:
            forward.count("failed")
            self._log.info("forward_tls_failed", target=where.authority,
                           error=type(exc).__name__)
            transport.abort()
            # asyncio does not call connection_lost for a handshake that failed midway: the
            # connection's slot is given back here, or it would leak with every such client.
            self._release()
            return
        finally:
            service.pending -= 1
        now = self._current()
        if (tls is None or forward.hosts.closing or now is None
                or now.hosts.services.get(service_key) is not service):
            # Stopped, or the service was retired by a reload during the handshake: the
            # stream would reach nothing a reload or shutdown sees again.
            if tls is not None:
                tls.abort()
            self._release()
            return
        forward.count("intercepted")
        early, self._early = bytes(self._early), bytearray()
        self._hand_to(service.factory, early, tls)

    async def _tunnel(self, forward: Forward, where: Target, rest: bytes) -> None:
        transport = self._transport
        assert transport is not None
        transport.pause_reading()   # nothing goes anywhere before the upstream is there
        loop = asyncio.get_running_loop()
        started = loop.time()
        client = Pipe(self._release)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                infos = await loop.getaddrinfo(where.host, where.port, type=socket.SOCK_STREAM)
            # A listed name (a wildcard's, say) that resolves to this machine would open a
            # tunnel to its loopback services: only a host that names a local address itself
            # is taken there.
            usable: list[AddrInfo] = [
                i for i in infos if names_local(where.host) or not local_address(str(i[4][0]))]
            if not usable:
                transport.resume_reading()
                forward.count("refused")
                self._refuse(Problem(403, "forward_refused",
                                     f"{where.host} resolves to a local address"))
                return
            far = await open_connection(usable, where.host, None, lambda: Pipe(lambda: None))
            assert far.transport is not None
            upstream = far.transport
        except (OSError, TimeoutError):
            forward.count("failed")
            transport.resume_reading()
            self._refuse(Problem(502, "upstream_unreachable",
                                 f"{where.authority} could not be reached"))
            return
        if forward.hosts.closing:   # the daemon began to stop while we connected
            upstream.abort()
            transport.resume_reading()
            self._refuse(Problem(503, "internal", "the forward proxy is not serving now", 1.0))
            return
        forward.count("tunnelled")
        pair = (transport, upstream)

        def cut() -> None:
            # abort, not close: a client that stopped reading never lets a close flush.
            transport.abort()
            upstream.abort()

        idle = Idle(self._limits.keepalive_timeout, cut)
        client.idle = far.idle = idle
        client.partner, far.partner = far, client
        forward.hosts.tunnels.add(pair)

        def ended() -> None:
            # Until both ends are gone the pair stays listed: shutdown must still cut an end
            # whose close never flushes (a peer that stopped reading).
            if client.lost and far.lost:
                forward.hosts.tunnel_ended(pair)

        def client_lost() -> None:
            self._release()
            ended()

        client.on_lost = client_lost
        far.on_lost = ended
        transport.set_protocol(client)
        client.connection_made(transport)
        client.join(upstream)
        far.join(transport)
        transport.write(ESTABLISHED)
        if rest:
            upstream.write(rest)
        transport.resume_reading()
        self._log.info("forward_tunnel", target=where.authority,
                       connect_ms=round((loop.time() - started) * 1000, 1))


def _refused(where: Target) -> RequestRejected:
    return RequestRejected(403, "forward_refused",
                           f"{where.authority} is neither intercepted nor tunnelled here")
