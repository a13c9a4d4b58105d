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
from tokenproxy.config import Config, Provider, StaticProvider
from tokenproxy.errors import ConfigError
from tokenproxy.log import Redactor
from tokenproxy.metrics import Metrics
from tokenproxy.proxy.forward import Proxy
from tokenproxy.proxy.upstream import make_upstream_session
from tokenproxy.server import ConnectionGate, GuardedRequestHandler, ListeningSocket, bind
from tokenproxy.tokens.model import TokenSource
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


def build_source(
    cfg: Provider, *, clock: Clock, metrics: Metrics, redactor: Redactor
) -> TokenSource:
    if isinstance(cfg, StaticProvider):
        return StaticSource(cfg, clock=clock, metrics=metrics, redactor=redactor)
    raise ConfigError(
        f"providers.{cfg.name}.type: {cfg.type_name()} providers are not available yet "
        "in this version; use type static"
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
            for name, provider in cfg.providers.items():
                self.sources[name] = build_source(provider, clock=self.clock,
                                                  metrics=self.metrics, redactor=self.redactor)
            self._session = make_upstream_session(cfg.limits.max_connections)
            proxy = Proxy(cfg, sources=self.sources, session=self._session, metrics=self.metrics)
            # handler_cancellation: a client that hangs up cancels its upstream request.
            self._server = web.Server(proxy.handle, handler_cancellation=True)
            gate = ConnectionGate(cfg.limits.max_connections,
                                  on_change=self.metrics.connections.set)
            factory = self._factory(self._server)
            for listener in cfg.listen:
                for sock in bind(listener, cfg.socket_group):
                    ls = ListeningSocket(sock, listener)
                    self.listeners.append(ls)
                    ls.start(factory, gate)
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
        if self._session is not None:
            await self._session.close()
            self._session = None

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
