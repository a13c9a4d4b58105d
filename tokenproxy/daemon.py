"""The daemon: wires config, token sources, the proxy, listeners and the admin endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Final

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from tokenproxy import __version__, log
from tokenproxy.admin import AdminHandler
from tokenproxy.clock import Clock, SystemClock
from tokenproxy.config import Config, Listener
from tokenproxy.config.secrets import config_secrets, exposed_mode, readable_keys
from tokenproxy.errors import ConfigError
from tokenproxy.listeners import ConnectionGate, ListeningSocket, ProtocolFactory, bind
from tokenproxy.log import Redactor
from tokenproxy.metrics import Metrics
from tokenproxy.proxy.aiohttp_path.client import UpstreamSessions
from tokenproxy.proxy.aiohttp_path.handler import AiohttpHandler
from tokenproxy.proxy.aiohttp_path.protocol import GuardedRequestHandler, guarded_connections
from tokenproxy.proxy.fast_path.connection import FastConnection, FastEnv
from tokenproxy.proxy.fast_path.pool import UpstreamPool
from tokenproxy.proxy.rules.budget import ReplayBudget
from tokenproxy.proxy.runtime import Proxy
from tokenproxy.reload import ListenerChange, ProviderPlan, close_quietly
from tokenproxy.tokens.factory import SourceFactory, open_token_store
from tokenproxy.tokens.http import make_token_session
from tokenproxy.tokens.source import TokenSource
from tokenproxy.tokens.store import TokenStore

if TYPE_CHECKING:
    # Imported where a config has a forward_proxy: its CA code loads the cryptography
    # package, megabytes a daemon without one does not need (docs/architecture.md).
    from tokenproxy.forward.connection import ForwardConnection
    from tokenproxy.forward.service import Forward, Hosts, Inner, MakeInner

FAST_PATH_ENV = "TOKENPROXY_FAST_PATH"
SPLICE_ENV = "TOKENPROXY_SPLICE"
_ON: Final = frozenset({"1", "true", "yes", "on"})
_OFF: Final = frozenset({"0", "false", "no", "off"})


def switch_setting(environ: Mapping[str, str], name: str) -> bool:
    """A switch in the environment (TOKENPROXY_FAST_PATH, TOKENPROXY_SPLICE): on unless
    0/false/no/off; anything else is refused (exit 2), so a typo cannot leave an operator
    believing it is off."""
    raw = environ.get(name)
    if raw is None or raw.strip().lower() in _ON:
        return True
    if raw.strip().lower() in _OFF:
        return False
    raise ConfigError(f"{name}: expected 1/0, true/false, yes/no or on/off, not {raw!r}")
# The admin listener serves a few scrapers and probes, not traffic.
ADMIN_MAX_CONNECTIONS = 64


@dataclass(slots=True)
class Serving:
    """What a started daemon runs on, built by start() and taken apart by stop(); a reload
    swaps its Proxy and source factory."""

    proxy: Proxy
    sources: SourceFactory
    token_session: aiohttp.ClientSession
    sessions: UpstreamSessions
    server: web.Server          # aiohttp's, for every request the fast path hands over
    admin_server: web.Server
    gate: ConnectionGate
    admin_gate: ConnectionGate
    fast: FastEnv
    forward: Forward | None = None   # with forward_proxy: rebuilt by a reload
    forward_hosts: Hosts | None = None   # its intercepted hosts' servers, kept across reloads


class Daemon:
    """One running tokenproxy: start() opens every listener, stop() drains and closes.

    The wiring of every part, so about 250 lines; what a reload does is in reload.py."""

    def __init__(
        self,
        cfg: Config,
        *,
        registry: CollectorRegistry | None = None,
        clock: Clock | None = None,
        redactor: Redactor | None = None,
        fast_path: bool | None = None,
        splice: bool | None = None,
        allocator_tuned: bool = False,
        certificate_clock: Clock | None = None,
    ) -> None:
        self.config = cfg
        self.allocator_tuned = allocator_tuned   # said in the listening event (memory.py)
        # TOKENPROXY_FAST_PATH=0 serves every request through aiohttp (for comparison, or as
        # an escape hatch); the answers are the same, only slower.
        self.fast_path = (switch_setting(os.environ, FAST_PATH_ENV) if fast_path is None
                          else fast_path)
        # TOKENPROXY_SPLICE=0: large bodies copied through Python too (a measurement lever).
        self.splice = switch_setting(os.environ, SPLICE_ENV) if splice is None else splice
        self.registry = registry if registry is not None else CollectorRegistry()
        self.clock = clock if clock is not None else SystemClock()
        # The forward proxy's certificates are checked by clients against their clocks: the
        # system's, whatever clock the tokens run on.
        self.certificate_clock = (certificate_clock if certificate_clock is not None
                                  else SystemClock())
        self.redactor = redactor if redactor is not None else Redactor()
        self.metrics = Metrics(self.registry, __version__)
        self.replay_budget = ReplayBudget(cfg.limits.max_replay_total, self.metrics)
        self.sources: dict[str, TokenSource] = {}
        self.listeners: list[ListeningSocket] = []
        self.admin_listeners: list[ListeningSocket] = []
        self.forward_listeners: list[ListeningSocket] = []
        self._serving: Serving | None = None   # from start() until stop()
        self._reload_lock = asyncio.Lock()
        self._log = log.get_logger()
        for secret in config_secrets(cfg):
            self.redactor.add(secret)

    # -- start -------------------------------------------------------------------------------

    def _factory(self, server: web.Server, *, lingering_time: float = 10.0
                 ) -> ProtocolFactory:
        """Protocol factory; reads the limits at each connection, so a reload applies them."""
        loop = asyncio.get_running_loop()

        def make(on_close: Callable[[], None] | None) -> GuardedRequestHandler:
            limits = self.config.limits
            return GuardedRequestHandler(
                server, loop=loop, header_timeout=limits.header_timeout, on_close=on_close,
                send_timeout=limits.send_timeout, lingering_time=lingering_time,
                keepalive_timeout=limits.keepalive_timeout,
                access_log=None,                  # the proxy emits its own `request` event
                max_line_size=limits.max_header_size,
                max_field_size=limits.max_header_size,
                auto_decompress=False,            # a gzip upload passes through as sent
            )

        return make

    def _admin_factory(self, admin_server: web.Server) -> ProtocolFactory:
        # A request whose body never comes is not read for 10 s after its answer: the
        # connection closes at once, so that probes do not wait behind it.
        return self._factory(admin_server, lingering_time=0)

    def _fast_factory(self, env: FastEnv) -> ProtocolFactory:
        if not self.fast_path:
            return env.slow

        def make(on_close: Callable[[], None] | None) -> FastConnection:
            return FastConnection(env, on_close)

        return make

    def _bind_all(self, listeners: Sequence[Listener], group: str | None,
                  factory: ProtocolFactory,
                  gate: ConnectionGate) -> list[ListeningSocket]:
        """Bind every address or none: a failure closes what this call opened."""
        opened: list[ListeningSocket] = []
        try:
            for listener in listeners:
                for sock in bind(listener, group):
                    opened.append(ListeningSocket(sock, listener))
        except BaseException:
            for ls in opened:
                ls.sock.close()
                if ls.listener.kind == "unix":
                    with contextlib.suppress(OSError):
                        os.unlink(ls.listener.path)
            raise
        for ls in opened:
            ls.start(factory, gate)
        return opened

    async def _warn_readable_keys(self, cfg: Config) -> None:
        for where, path, mode in await asyncio.to_thread(readable_keys, cfg):
            self._log.warning(log.KEY_FILE_READABLE, key=where, path=str(path), mode=oct(mode))

    async def start(self) -> None:
        cfg = self.config
        store = await open_token_store(cfg, self.metrics)
        mode = await asyncio.to_thread(exposed_mode, cfg)
        if mode is not None:
            self._log.warning("config_file_permissions", path=str(cfg.source), mode=oct(mode))
        await self._warn_readable_keys(cfg)
        try:
            serving = self._serving = await self._serving_parts(store)
        except BaseException:
            if store is not None:
                await store.close()
            raise
        try:
            self.listeners = self._bind_all(cfg.listen, cfg.socket_group,
                                            self._fast_factory(serving.fast), serving.gate)
            if cfg.admin_listen is not None:
                self.admin_listeners = self._bind_all(
                    [cfg.admin_listen], cfg.socket_group,
                    self._admin_factory(serving.admin_server), serving.admin_gate)
            serving.forward = await self._forward_for(cfg, self.sources, serving)
            if cfg.forward_proxy is not None:
                self.forward_listeners = self._bind_all(
                    [cfg.forward_proxy.listen], cfg.socket_group,
                    self._forward_factory(serving), serving.gate)
            for source in self.sources.values():
                await source.start()
        except BaseException:
            await self.stop(grace=0)
            raise
        self._log.info(
            log.LISTENING,
            listen=[ls.address for ls in self.listeners],
            admin=[ls.address for ls in self.admin_listeners],
            forward_proxy=[ls.address for ls in self.forward_listeners],
            version=__version__,
            fast_path=self.fast_path,
            allocator_tuned=self.allocator_tuned,
        )

    # -- the forward proxy -------------------------------------------------------------------

    async def _forward_for(self, cfg: Config, sources: Mapping[str, TokenSource],
                           serving: Serving) -> Forward | None:
        if cfg.forward_proxy is None:
            return None
        from tokenproxy.forward.service import Forward, Hosts, open_ca

        ca = await open_ca(cfg.forward_proxy, self.certificate_clock)
        if ca.created is not None:
            self._log.warning("forward_ca_created", path=str(ca.path), reason=ca.created)
        if serving.forward_hosts is None:
            serving.forward_hosts = Hosts(self._inner(serving),
                                          lambda: self.config.shutdown_grace)
        return Forward(cfg, ca, sources=sources, metrics=self.metrics,
                       budget=self.replay_budget, hosts=serving.forward_hosts)

    def _inner(self, serving: Serving) -> MakeInner:
        """How an intercepted host's requests are served: the request paths of a route."""
        def make(proxy: Callable[[], Proxy]) -> Inner:
            server = web.Server(AiohttpHandler(proxy, serving.sessions).handle,
                                handler_cancellation=True)
            slow = self._factory(server)
            env = FastEnv(proxy=proxy, limits=lambda: self.config.limits, slow=slow,
                          pool=serving.fast.pool, owns_pool=False, splice=self.splice)

            async def drain(grace: float) -> None:
                server.pre_shutdown()
                await asyncio.gather(server.shutdown(grace), env.shutdown(grace))

            def busy() -> bool:
                return bool(env.conns) or bool(server.connections)

            return self._fast_factory(env), drain, busy

        return make

    def _forward_factory(self, serving: Serving) -> ProtocolFactory:
        from tokenproxy.forward.connection import ForwardConnection

        def make(on_close: Callable[[], None] | None) -> ForwardConnection:
            # Looked up when the first head is complete, not at accept: a reload in between
            # must decide what the request gets (and with which token).
            return ForwardConnection(lambda: serving.forward, lambda: self.config.limits,
                                     on_close)

        return make

    async def _serving_parts(self, store: TokenStore | None) -> Serving:
        """Everything start() builds before it binds; a failure closes the clients again."""
        token_session = make_token_session()
        sessions = UpstreamSessions.make(self.config.limits.max_connections)
        try:
            return self._assemble(store, token_session, sessions)
        except BaseException:
            await sessions.close()
            await token_session.close()
            raise

    def _assemble(self, store: TokenStore | None, token_session: aiohttp.ClientSession,
                  sessions: UpstreamSessions) -> Serving:
        cfg = self.config
        factory = SourceFactory(clock=self.clock, metrics=self.metrics, redactor=self.redactor,
                                session=token_session, store=store)
        for name, provider in cfg.providers.items():
            self.sources[name] = factory.build(provider, self.sources)
        proxy = Proxy(cfg, sources=self.sources, budget=self.replay_budget,
                      metrics=self.metrics)

        def current() -> Proxy:
            # Looked up per request: a reload swaps the Proxy under open connections.
            return serving.proxy

        # handler_cancellation: a client that hangs up cancels its upstream request.
        server = web.Server(AiohttpHandler(current, sessions).handle,
                            handler_cancellation=True)
        # Both read at each request, so a reload applies to open connections too.
        admin = AdminHandler(self.registry, lambda: self.sources,
                             lambda: self.config.security.admin_hosts)
        admin_server = web.Server(admin.handle, handler_cancellation=True)
        serving = Serving(
            proxy=proxy, sources=factory, token_session=token_session, sessions=sessions,
            server=server, admin_server=admin_server,
            gate=ConnectionGate(cfg.limits.max_connections,
                                on_change=self.metrics.connections.set),
            # Idle clients must not starve probes: a waiting one takes the longest-idle slot.
            admin_gate=ConnectionGate(ADMIN_MAX_CONNECTIONS,
                                      reusable=guarded_connections(admin_server)),
            fast=FastEnv(proxy=current, limits=lambda: self.config.limits,
                         slow=self._factory(server), pool=UpstreamPool(), splice=self.splice),
        )
        return serving

    # -- reload ------------------------------------------------------------------------------

    async def reload(self, new: Config) -> dict[str, list[str]]:
        """Apply *new* without dropping a connection. Listeners that did not change keep their
        sockets; providers whose identity did not change keep their tokens. Either the whole
        config applies or (on a bind error) nothing does. Returns what changed."""
        async with self._reload_lock:
            return await self._reload(new)

    async def _reload(self, new: Config) -> dict[str, list[str]]:
        old = self.config
        serving = self._serving
        assert serving is not None, "reload() before start()"
        fast, gate, admin_gate = serving.fast, serving.gate, serving.admin_gate
        listeners = ListenerChange.bind(
            self.listeners, new.listen,
            lambda add: self._bind_all(add, new.socket_group, self._fast_factory(fast), gate))
        try:
            admin = ListenerChange.bind(
                self.admin_listeners, [] if new.admin_listen is None else [new.admin_listen],
                lambda add: self._bind_all(add, new.socket_group,
                                           self._admin_factory(serving.admin_server),
                                           admin_gate))
        except BaseException:
            await listeners.undo()
            raise
        try:
            forward_listeners = ListenerChange.bind(
                self.forward_listeners,
                [] if new.forward_proxy is None else [new.forward_proxy.listen],
                lambda add: self._bind_all(add, new.socket_group,
                                           self._forward_factory(serving), gate))
        except BaseException:
            await listeners.undo()
            await admin.undo()
            raise
        # Build everything before anything running changes: a failure here leaves the old
        # config serving untouched (only the listeners bound above are closed again).
        plan: ProviderPlan | None = None
        try:
            plan = await ProviderPlan.build(old, new, self.sources, serving.sources)
            proxy = Proxy(new, sources=plan.sources, metrics=self.metrics,
                          budget=self.replay_budget)
            forward = await self._forward_for(new, plan.sources, serving)
        except BaseException:
            await listeners.undo()
            await admin.undo()
            await forward_listeners.undo()
            if plan is not None:
                await plan.discard(serving.sources)
            raise
        old_store = serving.sources.store

        for secret in config_secrets(new):
            self.redactor.add(secret)
        serving.sources = plan.factory
        retired = await plan.commit(self.sources)
        changed = plan.changed(self.sources)
        self.config = new
        self.sources = plan.sources
        serving.proxy = proxy
        serving.forward = forward
        if forward is None and serving.forward_hosts is not None:
            # The section is gone: what is open is served as a host no longer listed is.
            serving.forward_hosts.retire(Proxy(replace(new, routes=()), sources=self.sources,
                                               metrics=self.metrics, budget=self.replay_budget))
        # Idle upstream connections may belong to routes (or TLS settings) that just went.
        fast.pool.close()
        gate.resize(new.limits.max_connections)
        self.replay_budget.total = new.limits.max_replay_total
        await listeners.commit()
        await admin.commit()
        await forward_listeners.commit()
        self.listeners = listeners.listening
        self.admin_listeners = admin.listening
        self.forward_listeners = forward_listeners.listening
        await close_quietly(retired)
        await self._warn_readable_keys(new)
        if old_store is not None and old_store is not plan.factory.store:
            await old_store.close()   # after the sources that used it
        return {
            "listen_added": [ls.address for ls in
                             listeners.added + admin.added + forward_listeners.added],
            "listen_removed": [str(ls.listener) for ls in
                               listeners.drop + admin.drop + forward_listeners.drop],
            "providers_changed": changed,
            "providers_removed": [n for n in old.providers if n not in new.providers],
        }

    # -- stop --------------------------------------------------------------------------------

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let in-flight requests finish within *grace*, then close."""
        grace = self.config.shutdown_grace if grace is None else grace
        # aiohttp reads a shutdown timeout of 0 as "no timeout" (helpers.ceil_timeout), which
        # would wait for every in-flight request: cut at once with a tiny positive one instead.
        grace = max(grace, 0.001)
        for ls in self.listeners + self.admin_listeners + self.forward_listeners:
            await ls.close()
        self.listeners.clear()
        self.admin_listeners.clear()
        self.forward_listeners.clear()
        serving, self._serving = self._serving, None
        if serving is not None:
            # A forward connection accepted before now and still reading its first head
            # gets 503, not a tunnel that outlives the daemon.
            serving.forward = None
            for server in (serving.server, serving.admin_server):
                server.pre_shutdown()
            await asyncio.gather(serving.server.shutdown(grace),
                                 serving.admin_server.shutdown(grace),
                                 serving.fast.shutdown(grace),
                                 *([] if serving.forward_hosts is None
                                   else [serving.forward_hosts.drain(grace)]))
        for source in self.sources.values():
            with contextlib.suppress(Exception):
                await source.close()
        if serving is not None:
            await serving.sessions.close()
            await serving.token_session.close()
            if serving.sources.store is not None:
                await serving.sources.store.close()

    # -- for tests and the CLI ---------------------------------------------------------------

    def port(self, index: int = 0) -> int:
        return self.listeners[index].port

    @property
    def admin_port(self) -> int:
        return self.admin_listeners[0].port

    def source(self, name: str) -> TokenSource:
        return self.sources[name]
