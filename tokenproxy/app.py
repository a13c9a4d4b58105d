"""The daemon: wires config, token sources, the proxy, listeners and the admin endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from tokenproxy import __version__, log
from tokenproxy.admin import AdminHandler
from tokenproxy.clock import Clock, SystemClock
from tokenproxy.config import Config, JsonProvider, OAuth2Provider, Provider, StaticProvider
from tokenproxy.log import Redactor
from tokenproxy.metrics import Metrics
from tokenproxy.proxy.forward import Proxy
from tokenproxy.proxy.upstream import make_upstream_session, ssl_contexts
from tokenproxy.server import ConnectionGate, GuardedRequestHandler, ListeningSocket, bind
from tokenproxy.tokens.command import CommandGrantor
from tokenproxy.tokens.http import make_token_session
from tokenproxy.tokens.json_login import JsonGrantor
from tokenproxy.tokens.manager import Grantor, TokenManager
from tokenproxy.tokens.model import TokenSource
from tokenproxy.tokens.oauth2 import OAuth2Grantor
from tokenproxy.tokens.state import StateStore
from tokenproxy.tokens.static import StaticSource

# The admin listener serves a few scrapers and probes, not traffic.
ADMIN_MAX_CONNECTIONS = 64


def config_secrets(cfg: Config) -> list[str]:
    """Every secret in the config, so the log redactor masks them wherever they appear."""
    out: list[str] = []
    if cfg.security.client_key:
        out.append(cfg.security.client_key.value)
    for p in cfg.providers.values():
        for name in ("token", "client_secret", "password", "refresh_token"):
            secret = getattr(p, name, None)
            if secret is not None:
                out.append(secret.value)
    return out


class SourceFactory:
    """Builds one token source per provider, sharing the token client and the state file."""

    def __init__(
        self, *, clock: Clock, metrics: Metrics, redactor: Redactor,
        session: aiohttp.ClientSession, store: StateStore | None,
    ) -> None:
        self._clock = clock
        self._metrics = metrics
        self._redactor = redactor
        self._session = session
        self._store = store
        self._ssl = ssl_contexts([])

    def _ssl_for(self, ca_file: Any) -> Any:
        if ca_file is None:
            return True
        if ca_file not in self._ssl:
            self._ssl.update(ssl_contexts([ca_file]))
        return self._ssl[ca_file]

    def build(self, cfg: Provider) -> TokenSource:
        common: dict[str, Any] = {"clock": self._clock, "metrics": self._metrics,
                                  "redactor": self._redactor}
        if isinstance(cfg, StaticProvider):
            return StaticSource(cfg, **common)
        grantor: Grantor
        lifetime: float | None = None
        if isinstance(cfg, OAuth2Provider):
            grantor = OAuth2Grantor(cfg, self._session, self._ssl_for(cfg.ca_file))
        elif isinstance(cfg, JsonProvider):
            grantor = JsonGrantor(cfg, self._session, self._ssl_for(cfg.ca_file))
        else:
            grantor = CommandGrantor(cfg, self._redactor)
            lifetime = cfg.cache_for
        return TokenManager(
            cfg.name, cfg.type_name(), grantor, identity=cfg.identity(),
            refresh_margin=cfg.refresh_margin, store=self._store, default_lifetime=lifetime,
            **common,
        )


class Daemon:
    """One running tokenproxy: start() opens every listener, stop() drains and closes."""

    def __init__(
        self,
        cfg: Config,
        *,
        registry: CollectorRegistry | None = None,
        clock: Clock | None = None,
        redactor: Redactor | None = None,
    ) -> None:
        self.config = cfg
        self.registry = registry if registry is not None else CollectorRegistry()
        self.clock = clock if clock is not None else SystemClock()
        self.redactor = redactor if redactor is not None else Redactor()
        self.metrics = Metrics(self.registry, __version__)
        self.sources: dict[str, TokenSource] = {}
        self.listeners: list[ListeningSocket] = []
        self.admin_listeners: list[ListeningSocket] = []
        self._session: aiohttp.ClientSession | None = None
        self._token_session: aiohttp.ClientSession | None = None
        self._server: web.Server | None = None
        self._admin_server: web.Server | None = None
        self._log = log.get_logger()
        for secret in config_secrets(cfg):
            self.redactor.add(secret)

    # -- start -------------------------------------------------------------------------------

    def _handler_kwargs(self) -> dict[str, Any]:
        limits = self.config.limits
        return {
            "keepalive_timeout": limits.keepalive_timeout,
            "access_log": None,                 # the proxy emits its own `request` event
            "max_line_size": limits.max_header_size,
            "max_field_size": limits.max_header_size,
            "auto_decompress": False,           # a gzip upload passes through as sent
        }

    def _factory(self, server: web.Server) -> Any:
        loop = asyncio.get_running_loop()
        kwargs = self._handler_kwargs()
        header_timeout = self.config.limits.header_timeout

        def make(on_close: Any) -> GuardedRequestHandler:
            return GuardedRequestHandler(server, loop=loop, header_timeout=header_timeout,
                                         on_close=on_close, **kwargs)

        return make

    async def start(self) -> None:
        cfg = self.config
        try:
            self._token_session = make_token_session()
            factory = SourceFactory(
                clock=self.clock, metrics=self.metrics, redactor=self.redactor,
                session=self._token_session,
                store=StateStore(cfg.state_path) if cfg.state_path is not None else None,
            )
            for name, provider in cfg.providers.items():
                self.sources[name] = factory.build(provider)
            self._session = make_upstream_session(cfg.limits.max_connections)
            proxy = Proxy(cfg, sources=self.sources, session=self._session, metrics=self.metrics)
            # handler_cancellation: a client that hangs up cancels its upstream request.
            self._server = web.Server(proxy.handle, handler_cancellation=True)
            gate = ConnectionGate(cfg.limits.max_connections,
                                  on_change=self.metrics.connections.set)
            protocol = self._factory(self._server)
            for listener in cfg.listen:
                for sock in bind(listener, cfg.socket_group):
                    ls = ListeningSocket(sock, listener)
                    self.listeners.append(ls)
                    ls.start(protocol, gate)
            if cfg.admin_listen is not None:
                admin = AdminHandler(self.registry, lambda: self.sources)
                self._admin_server = web.Server(admin.handle, handler_cancellation=True)
                admin_gate = ConnectionGate(ADMIN_MAX_CONNECTIONS)
                admin_factory = self._factory(self._admin_server)
                for sock in bind(cfg.admin_listen, cfg.socket_group):
                    ls = ListeningSocket(sock, cfg.admin_listen)
                    self.admin_listeners.append(ls)
                    ls.start(admin_factory, admin_gate)
            for source in self.sources.values():
                await source.start()
        except BaseException:
            await self.stop(grace=0)
            raise
        self._log.info(
            log.LISTENING,
            listen=[ls.address for ls in self.listeners],
            admin=[ls.address for ls in self.admin_listeners],
            version=__version__,
        )

    # -- stop --------------------------------------------------------------------------------

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish within *grace*, then close."""
        grace = self.config.shutdown_grace if grace is None else grace
        # aiohttp reads a shutdown timeout of 0 as "no timeout" (helpers.ceil_timeout), which
        # would wait for every in-flight request: cut at once with a tiny positive one instead.
        grace = max(grace, 0.001)
        for ls in self.listeners + self.admin_listeners:
            await ls.close()
        self.listeners.clear()
        self.admin_listeners.clear()
        for server in (self._server, self._admin_server):
            if server is not None:
                server.pre_shutdown()
        await asyncio.gather(*(
            server.shutdown(grace) for server in (self._server, self._admin_server)
            if server is not None
        ))
        self._server = self._admin_server = None
        for source in self.sources.values():
            with contextlib.suppress(Exception):
                await source.close()
        for session in (self._session, self._token_session):
            if session is not None:
                await session.close()
        self._session = self._token_session = None

    # -- for tests and the CLI ---------------------------------------------------------------

    def port(self, index: int = 0) -> int:
        return self.listeners[index].port

    @property
    def admin_port(self) -> int:
        return self.admin_listeners[0].port

    def source(self, name: str) -> TokenSource:
        return self.sources[name]

    @property
    def all_sources(self) -> Mapping[str, TokenSource]:
        return self.sources


async def serve(cfg: Config, *, redactor: Redactor) -> int:
    """Run until SIGTERM or SIGINT, then drain within shutdown_grace. A second signal cuts
    the drain short."""
    loop = asyncio.get_running_loop()
    daemon = Daemon(cfg, redactor=redactor)
    await daemon.start()
    stop = asyncio.Event()
    signals = 0

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        log.get_logger().info("shutdown", signal=signal.Signals(signum).name,
                              grace_s=cfg.shutdown_grace if signals == 1 else 0)
        stop.set()
        if signals > 1 and drain is not None:
            drain.cancel()

    drain: asyncio.Task[None] | None = None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        await stop.wait()
        drain = asyncio.create_task(daemon.stop())
        try:
            await drain
        except asyncio.CancelledError:
            await daemon.stop(grace=0)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    log.get_logger().info("stopped")
    return 0


async def obtain_token(cfg: Config, name: str, *, redactor: Redactor) -> str:
    """The current token of one provider for ``tokenproxy token``: a valid one from the state
    file (the daemon's, when one runs) if there is one, else a new one, persisted."""
    metrics = Metrics(CollectorRegistry(), __version__)
    async with make_token_session() as session:
        factory = SourceFactory(
            clock=SystemClock(), metrics=metrics, redactor=redactor, session=session,
            store=StateStore(cfg.state_path) if cfg.state_path is not None else None,
        )
        source = factory.build(cfg.providers[name])
        if isinstance(source, TokenManager):
            source.load()
        try:
            return (await source.current()).value
        finally:
            await source.close()
