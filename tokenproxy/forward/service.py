"""The forward proxy of one config: its CA, its lists, and for each intercepted host the
Proxy and HTTP protocol that serve what the client sends inside the tunnel.

An intercepted host is served exactly as a route is: one Route (prefix ``/``, the host's
origin as upstream, the entry's token settings, named by the host in metrics and logs) in a
Proxy of its own, on the same request paths. Its security settings are the main listener's
with the Host allowlist narrowed to the host. The client key is checked once, on the CONNECT
(Proxy-Authorization); ``require_header`` does not apply, since tools behind HTTPS_PROXY cannot
add headers of their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from typing import Final

from tokenproxy.clock import Clock
from tokenproxy.config.model import Config, ForwardProxyConfig, InterceptHost, Route
from tokenproxy.config.values import parse_http_url
from tokenproxy.errors import ConfigError
from tokenproxy.forward.ca import CAError, CAFiles, LocalCA
from tokenproxy.forward.targets import Decision, Target, decide
from tokenproxy.listeners import ProtocolFactory
from tokenproxy.metrics import Metrics
from tokenproxy.proxy.rules.budget import ReplayBudget
from tokenproxy.proxy.runtime import Proxy
from tokenproxy.tls import ClientContexts
from tokenproxy.tokens.source import TokenSource

# Wildcard entries make a Proxy per name a client asks for: bounded, the oldest dropped.
MAX_HOSTS: Final = 256

# The daemon's way to serve HTTP on a decrypted stream for a Proxy: the protocol factory, how
# to drain what it serves at shutdown, and whether it has connections open now.
Inner = tuple[ProtocolFactory, Callable[[float], Awaitable[None]], Callable[[], bool]]
MakeInner = Callable[[Callable[[], Proxy]], Inner]


HostKey = tuple[str, int, bool]   # (host, port, TLS ended here)


@dataclass(slots=True)
class HostService:
    """One intercepted host's HTTP server. Its connections read ``proxy`` per request, and a
    reload swaps it, as the main listener's connections see a reload."""

    proxy: Proxy
    factory: ProtocolFactory
    drain: Callable[[float], Awaitable[None]]
    busy: Callable[[], bool]
    # Clients in their TLS handshake, about to be served: in use as much as open connections.
    pending: int = 0

    @property
    def in_use(self) -> bool:
        return self.pending > 0 or self.busy()


class Hosts:
    """The intercepted hosts' services, kept across reloads (their open connections with
    them). Past MAX_HOSTS the least recently asked for without open connections is dropped;
    hosts with connections are never cut for room (there are at most max_connections)."""

    def __init__(self, make_inner: MakeInner, grace: Callable[[], float]) -> None:
        self.make_inner = make_inner
        self._grace = grace
        # Least recently used first: a host in use is not the one pushed out.
        self.services: OrderedDict[HostKey, HostService] = OrderedDict()
        self._draining: set[asyncio.Task[None]] = set()
        # Open tunnels (client, upstream): cut at shutdown once the grace is over.
        self.tunnels: set[tuple[asyncio.Transport, asyncio.Transport]] = set()
        self._tunnel_ended = asyncio.Event()
        self.closing = False   # shutdown began: nothing new is served

    def add(self, key: HostKey, proxy: Proxy) -> HostService:
        if len(self.services) >= MAX_HOSTS:
            idle = next((k for k, s in self.services.items() if not s.in_use), None)
            if idle is not None:
                self._drain_later(self.services.pop(idle))
        made: list[HostService] = []
        factory, drain, busy = self.make_inner(lambda: made[0].proxy)
        made.append(HostService(proxy, factory, drain, busy))
        self.services[key] = made[0]
        return made[0]

    def get(self, key: HostKey) -> HostService | None:
        found = self.services.get(key)
        if found is not None:
            self.services.move_to_end(key)
        return found

    def _drain_later(self, service: HostService) -> None:
        task = asyncio.ensure_future(service.drain(self._grace()))
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    def retire(self, proxy: Proxy) -> None:
        """The forward proxy is gone from the config: open connections are served by *proxy*
        (one without routes: 404) until they close, as a host no longer listed is."""
        for service in self.services.values():
            service.proxy = proxy
            self._drain_later(service)
        self.services.clear()

    async def drain(self, grace: float) -> None:
        self.closing = True
        await asyncio.gather(*(s.drain(grace) for s in self.services.values()),
                             *self._draining, self._end_tunnels(grace))

    def tunnel_ended(self, pair: tuple[asyncio.Transport, asyncio.Transport]) -> None:
        self.tunnels.discard(pair)
        self._tunnel_ended.set()

    async def _end_tunnels(self, grace: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                while self.tunnels:
                    self._tunnel_ended.clear()
                    await self._tunnel_ended.wait()
        for client, upstream in list(self.tunnels):
            client.abort()
            upstream.abort()
        self.tunnels.clear()


class Forward:
    """Built per config (start and reload); connections look it up when they begin."""

    def __init__(self, cfg: Config, ca: LocalCA, *, sources: Mapping[str, TokenSource],
                 metrics: Metrics, budget: ReplayBudget, hosts: Hosts) -> None:
        assert cfg.forward_proxy is not None
        self.config = cfg
        self.settings = cfg.forward_proxy
        self.ca = ca
        self.metrics = metrics
        key = cfg.security.client_key
        self.client_key = None if key is None else key.value.encode()
        self._sources = sources
        self._budget = budget
        self._contexts = ClientContexts()
        self.hosts = hosts
        self._connects = {outcome: metrics.forward_connects.labels(outcome)
                          for outcome in ("intercepted", "tunnelled", "refused", "failed")}
        for key_, service in hosts.services.items():
            service.proxy = self._proxy_now(key_)

    def count(self, outcome: str) -> None:
        self._connects[outcome].inc()

    def decide(self, target: Target, *, connect: bool) -> Decision:
        return decide(self.settings, target, connect=connect)

    def service(self, entry: InterceptHost, target: Target, *, tls: bool) -> HostService:
        key = (target.host, target.port, tls)
        found = self.hosts.get(key)
        if found is not None:
            return found
        return self.hosts.add(key, self._proxy(entry, target, tls=tls))

    def _proxy_now(self, key: HostKey) -> Proxy:
        """What an open connection to *key* is served by under this config: the entry's
        route, or none when the host is no longer intercepted (404 not_found)."""
        host, port, tls = key
        target = Target(host, port)
        entry = self.decide(target, connect=tls)
        if isinstance(entry, InterceptHost) and entry.scheme == ("https" if tls else "http"):
            return self._proxy(entry, target, tls=tls)
        return Proxy(replace(self.config, routes=()), sources=self._sources,
                     metrics=self.metrics, budget=self._budget)

    def _proxy(self, entry: InterceptHost, target: Target, *, tls: bool) -> Proxy:
        return Proxy(self._host_config(entry, target, tls=tls), sources=self._sources,
                     metrics=self.metrics, budget=self._budget, contexts=self._contexts)

    def _host_config(self, entry: InterceptHost, target: Target, *, tls: bool) -> Config:
        scheme = "https" if tls else "http"
        host = f"[{target.host}]" if ":" in target.host else target.host
        # Named by the entry (``*.example.com``), not by the name the client asked for: the
        # metrics' route label stays bounded by the config.
        route = Route(prefix="/", match="", name=entry.host,
                      upstream=parse_http_url(f"{scheme}://{host}:{target.port}/", "upstream"),
                      provider=entry.provider, header=entry.header, value=entry.value,
                      retry_on=entry.retry_on, client_authorization=entry.client_authorization,
                      timeout=entry.timeout, ca_file=entry.ca_file,
                      tls_client_cert_file=entry.tls_client_cert_file,
                      tls_client_key_file=entry.tls_client_key_file)
        # A client may name the host with its root dot (``api.example.com.``).
        security = replace(self.config.security,
                           allowed_hosts=frozenset({target.host, target.host + "."}),
                           allowed_hosts_explicit=True, client_key=None, require_header=None)
        return replace(self.config, routes=(route,), security=security)

    def tls_context(self, host: str) -> ssl.SSLContext:
        """The server side of the client's TLS for *host*: a leaf the local CA signed, and a
        ClientHello naming another host (SNI) refused."""
        # Asked of the CA each time: it caches its leaves and renews them before they expire.
        ctx = self.ca.server_context(host)
        if ctx.sni_callback is None:

            def same_name(_: object, name: str | None, __: ssl.SSLContext) -> int | None:
                if name is not None and name.lower().rstrip(".") != host:
                    return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
                return None

            ctx.sni_callback = same_name
        return ctx



async def open_ca(cfg: ForwardProxyConfig, clock: Clock) -> LocalCA:
    """The local CA for the intercepted hosts, loaded or made in a thread (file I/O, key
    generation); a CA that cannot be used is a configuration error (exit 2)."""
    assert cfg.ca.cert_file is not None
    assert cfg.ca.key_file is not None
    files = CAFiles(cert=cfg.ca.cert_file, key=cfg.ca.key_file)
    try:
        return await asyncio.to_thread(
            # Only the names whose TLS is ended here: an http entry needs no certificate.
            LocalCA.load_or_create, files,
            [e.host for e in cfg.intercept if e.scheme == "https"], clock=clock,
            generated=cfg.ca.generated)
    except CAError as exc:
        raise ConfigError(f"forward_proxy.ca: {exc}") from None
