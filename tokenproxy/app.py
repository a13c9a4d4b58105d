"""The daemon: wires config, token sources, the proxy, listeners and the admin endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping
from typing import Any, Final

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry

from tokenproxy import __version__, log, systemd
from tokenproxy.admin import AdminHandler
from tokenproxy.clock import Clock, SystemClock
from tokenproxy.config import (
    CommandProvider,
    Config,
    JsonProvider,
    OAuth2Provider,
    Provider,
    StaticProvider,
    load_config,
)
from tokenproxy.config.secrets import config_secrets, exposed_mode
from tokenproxy.errors import ConfigError, TokenProxyError
from tokenproxy.log import Redactor
from tokenproxy.metrics import Metrics
from tokenproxy.proxy.body import ReplayBudget
from tokenproxy.proxy.fastpath import FastConnection, FastEnv
from tokenproxy.proxy.forward import Proxy
from tokenproxy.proxy.pool import UpstreamPool
from tokenproxy.proxy.upstream import UpstreamSessions, ssl_contexts
from tokenproxy.server import (
    ConnectionGate,
    GuardedRequestHandler,
    ListeningSocket,
    bind,
    guarded_connections,
)
from tokenproxy.tokens.command import CommandGrantor
from tokenproxy.tokens.http import make_token_session
from tokenproxy.tokens.json_login import JsonGrantor
from tokenproxy.tokens.manager import Grantor, TokenManager
from tokenproxy.tokens.model import TokenSource
from tokenproxy.tokens.oauth2 import OAuth2Grantor
from tokenproxy.tokens.state import StateStore, UnsafeStateFile
from tokenproxy.tokens.static import StaticSource

FAST_PATH_ENV = "TOKENPROXY_FAST_PATH"
_ON: Final = frozenset({"1", "true", "yes", "on"})
_OFF: Final = frozenset({"0", "false", "no", "off"})


def fast_path_setting(environ: Mapping[str, str]) -> bool:
    """TOKENPROXY_FAST_PATH: on unless 0/false/no/off; anything else is refused (exit 2), so a
    typo cannot leave an operator believing the fast path is off."""
    raw = environ.get(FAST_PATH_ENV)
    if raw is None or raw.strip().lower() in _ON:
        return True
    if raw.strip().lower() in _OFF:
        return False
    raise ConfigError(f"{FAST_PATH_ENV}: expected 1/0, true/false, yes/no or on/off, "
                      f"not {raw!r}")
# The admin listener serves a few scrapers and probes, not traffic.
ADMIN_MAX_CONNECTIONS = 64


async def open_state_store(cfg: Config) -> StateStore | None:
    """The config's state file, refused (exit 2) when someone else could have written it:
    its tokens would be theirs. Checked in a thread, like every state-file access."""
    if cfg.state_path is None:
        return None
    store = StateStore(cfg.state_path)
    if cfg.persists_tokens:
        try:
            await asyncio.to_thread(store.check)
        except UnsafeStateFile as exc:
            raise ConfigError(f"state_path: {exc}") from None
    return store


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
        self.store = store
        self._ssl = ssl_contexts([])

    def with_store(self, store: StateStore | None) -> SourceFactory:
        if store is self.store:
            return self
        return SourceFactory(clock=self._clock, metrics=self._metrics, redactor=self._redactor,
                             session=self._session, store=store)

    def _ssl_for(self, ca_file: Any) -> Any:
        if ca_file is None:
            return True
        if ca_file not in self._ssl:
            self._ssl.update(ssl_contexts([ca_file]))
        return self._ssl[ca_file]

    def grantor(self, cfg: OAuth2Provider | JsonProvider | CommandProvider) -> Grantor:
        """What talks to the provider's token endpoint (or runs its command)."""
        if isinstance(cfg, OAuth2Provider):
            return OAuth2Grantor(cfg, self._session, self._ssl_for(cfg.ca_file))
        if isinstance(cfg, JsonProvider):
            return JsonGrantor(cfg, self._session, self._ssl_for(cfg.ca_file))
        return CommandGrantor(cfg, self._redactor)

    def build(self, cfg: Provider) -> TokenSource:
        common: dict[str, Any] = {"clock": self._clock, "metrics": self._metrics,
                                  "redactor": self._redactor}
        if isinstance(cfg, StaticProvider):
            return StaticSource(cfg, **common)
        lifetime = cfg.cache_for if isinstance(cfg, CommandProvider) else None
        # Another holder of the state lock may take up to its whole call timeout.
        lock_wait = cfg.timeout + 1.0
        return TokenManager(
            cfg.name, cfg.type_name(), self.grantor(cfg), identity=cfg.identity(),
            refresh_margin=cfg.refresh_margin, store=self.store, default_lifetime=lifetime,
            lock_timeout=lock_wait, **common,
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
        fast_path: bool | None = None,
    ) -> None:
        self.config = cfg
        # TOKENPROXY_FAST_PATH=0 serves every request through aiohttp (for comparison, or as
        # an escape hatch); the answers are the same, only slower.
        self.fast_path = fast_path_setting(os.environ) if fast_path is None else fast_path
        self.registry = registry if registry is not None else CollectorRegistry()
        self.clock = clock if clock is not None else SystemClock()
        self.redactor = redactor if redactor is not None else Redactor()
        self.metrics = Metrics(self.registry, __version__)
        self.replay_budget = ReplayBudget(cfg.limits.max_replay_total, self.metrics)
        self.sources: dict[str, TokenSource] = {}
        self.listeners: list[ListeningSocket] = []
        self.admin_listeners: list[ListeningSocket] = []
        self._sessions: UpstreamSessions | None = None
        self._token_session: aiohttp.ClientSession | None = None
        self._server: web.Server | None = None
        self._admin_server: web.Server | None = None
        self._proxy: Proxy | None = None
        self._factory_sources: SourceFactory | None = None
        self._gate: ConnectionGate | None = None
        self._fast: FastEnv | None = None
        self._admin_gate: ConnectionGate | None = None
        self._reload_lock = asyncio.Lock()
        self._log = log.get_logger()
        for secret in config_secrets(cfg):
            self.redactor.add(secret)

    # -- start -------------------------------------------------------------------------------

    def _factory(self, server: web.Server, *, lingering_time: float = 10.0) -> Any:
        """Protocol factory; reads the limits at each connection, so a reload applies them."""
        loop = asyncio.get_running_loop()

        def make(on_close: Any) -> GuardedRequestHandler:
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

    def _admin_factory(self) -> Any:
        # A request whose body never comes is not read for 10 s after its answer: the
        # connection closes at once, so that probes do not wait behind it.
        assert self._admin_server is not None
        return self._factory(self._admin_server, lingering_time=0)

    def _fast_factory(self, env: FastEnv) -> Any:
        if not self.fast_path:
            return env.slow

        def make(on_close: Any) -> FastConnection:
            return FastConnection(env, on_close)

        return make

    def _current_proxy(self) -> Proxy:
        assert self._proxy is not None
        return self._proxy

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # A fixed entry point whose Proxy a reload swaps: open connections see the new config.
        assert self._proxy is not None
        return await self._proxy.handle(request)

    def _bind_all(self, listeners: Any, group: str | None, factory: Any,
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

    async def start(self) -> None:
        cfg = self.config
        try:
            store = await open_state_store(cfg)
            mode = await asyncio.to_thread(exposed_mode, cfg)
            if mode is not None:
                self._log.warning("config_file_permissions", path=str(cfg.source),
                                  mode=oct(mode))
            self._token_session = make_token_session()
            self._factory_sources = SourceFactory(
                clock=self.clock, metrics=self.metrics, redactor=self.redactor,
                session=self._token_session, store=store,
            )
            for name, provider in cfg.providers.items():
                self.sources[name] = self._factory_sources.build(provider)
            self._sessions = UpstreamSessions.make(cfg.limits.max_connections)
            self._proxy = Proxy(cfg, sources=self.sources, sessions=self._sessions,
                                budget=self.replay_budget,
                                metrics=self.metrics)
            # handler_cancellation: a client that hangs up cancels its upstream request.
            self._server = web.Server(self._handle, handler_cancellation=True)
            self._gate = ConnectionGate(cfg.limits.max_connections,
                                        on_change=self.metrics.connections.set)
            self._fast = FastEnv(proxy=self._current_proxy, limits=lambda: self.config.limits,
                                 slow=self._factory(self._server), pool=UpstreamPool())
            self.listeners = self._bind_all(cfg.listen, cfg.socket_group,
                                            self._fast_factory(self._fast), self._gate)
            # Both read at each request, so a reload applies to open connections too.
            admin = AdminHandler(self.registry, lambda: self.sources,
                                 lambda: self.config.security.admin_hosts)
            self._admin_server = web.Server(admin.handle, handler_cancellation=True)
            # Idle clients must not starve probes: a waiting one takes the longest-idle slot.
            self._admin_gate = ConnectionGate(
                ADMIN_MAX_CONNECTIONS, reusable=guarded_connections(self._admin_server))
            if cfg.admin_listen is not None:
                self.admin_listeners = self._bind_all(
                    [cfg.admin_listen], cfg.socket_group, self._admin_factory(),
                    self._admin_gate)
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
            fast_path=self.fast_path,
        )

    # -- reload ------------------------------------------------------------------------------

    async def reload(self, new: Config) -> dict[str, list[str]]:
        """Apply *new* without dropping a connection. Listeners that did not change keep their
        sockets; providers whose identity did not change keep their tokens. Either the whole
        config applies or (on a bind error) nothing does. Returns what changed."""
        async with self._reload_lock:
            return await self._reload(new)

    async def _reload(self, new: Config) -> dict[str, list[str]]:
        old = self.config
        assert self._server is not None
        assert self._admin_server is not None
        assert self._gate is not None
        assert self._admin_gate is not None
        assert self._factory_sources is not None
        assert self._sessions is not None
        # Listeners first: the only step that can fail, and it must fail before anything moves.
        keep = [ls for ls in self.listeners if ls.listener in new.listen]
        kept = {ls.listener for ls in keep}
        assert self._fast is not None
        added = self._bind_all([li for li in new.listen if li not in kept], new.socket_group,
                               self._fast_factory(self._fast), self._gate)
        drop = [ls for ls in self.listeners if ls.listener not in new.listen]
        admin_keep = [ls for ls in self.admin_listeners if ls.listener == new.admin_listen]
        admin_added: list[ListeningSocket] = []
        if new.admin_listen is not None and not admin_keep:
            try:
                admin_added = self._bind_all([new.admin_listen], new.socket_group,
                                             self._admin_factory(),
                                             self._admin_gate)
            except BaseException:
                for ls in added:
                    await ls.close()
                raise
        admin_drop = [ls for ls in self.admin_listeners if ls not in admin_keep]

        # Build everything before anything running changes: a failure here leaves the old
        # config serving untouched (only the listeners bound above are closed again).
        try:
            store = self._factory_sources.store
            if new.state_path != old.state_path or not old.persists_tokens:
                store = await open_state_store(new)   # not yet checked for token providers
            factory = self._factory_sources.with_store(store)
            sources: dict[str, TokenSource] = {}
            plan: list[tuple[TokenSource, TokenSource | None, bool]] = []
            for name, provider in new.providers.items():
                before, current = old.providers.get(name), self.sources.get(name)
                stuck = isinstance(current, TokenManager) and current.unauthenticated
                if (current is not None and before == provider
                        and new.state_path == old.state_path and not stuck):
                    sources[name] = current
                    continue
                fresh = factory.build(provider)
                inherit = (isinstance(fresh, TokenManager) and isinstance(current, TokenManager)
                           and before is not None and before.identity() == provider.identity()
                           and not stuck)
                plan.append((fresh, current, inherit))
                sources[name] = fresh
            proxy = Proxy(new, sources=sources, sessions=self._sessions, metrics=self.metrics,
                          budget=self.replay_budget)
        except BaseException:
            for ls in added + admin_added:
                await ls.close()
            raise

        for secret in config_secrets(new):
            self.redactor.add(secret)
        self._factory_sources = factory
        retired: list[TokenSource] = []
        for fresh, current, inherit in plan:
            if inherit:
                assert isinstance(fresh, TokenManager)
                assert isinstance(current, TokenManager)
                await current.close()   # lets a refresh in flight finish and persist first
                fresh.inherit(current)
            elif current is not None:
                retired.append(current)
            await fresh.start()
        retired += [src for name, src in self.sources.items() if name not in new.providers]
        changed = [name for name, src in sources.items() if src is not self.sources.get(name)]

        self.config = new
        self.sources = sources
        self._proxy = proxy
        # Idle upstream connections may belong to routes (or TLS settings) that just went.
        self._fast.pool.close()
        self._gate.resize(new.limits.max_connections)
        self.replay_budget.total = new.limits.max_replay_total
        for ls in drop + admin_drop:
            await ls.close()
        self.listeners = keep + added
        self.admin_listeners = admin_keep + admin_added
        for src in retired:
            with contextlib.suppress(Exception):
                await src.close()
        return {
            "listen_added": [ls.address for ls in added + admin_added],
            "listen_removed": [str(ls.listener) for ls in drop + admin_drop],
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
        for ls in self.listeners + self.admin_listeners:
            await ls.close()
        self.listeners.clear()
        self.admin_listeners.clear()
        for server in (self._server, self._admin_server):
            if server is not None:
                server.pre_shutdown()
        await asyncio.gather(
            *(server.shutdown(grace) for server in (self._server, self._admin_server)
              if server is not None),
            *([self._fast.shutdown(grace)] if self._fast is not None else []),
        )
        self._fast = None
        self._server = self._admin_server = None
        for source in self.sources.values():
            with contextlib.suppress(Exception):
                await source.close()
        if self._sessions is not None:
            await self._sessions.close()
        if self._token_session is not None:
            await self._token_session.close()
        self._sessions = None
        self._token_session = None

    # -- for tests and the CLI ---------------------------------------------------------------

    def port(self, index: int = 0) -> int:
        return self.listeners[index].port

    @property
    def admin_port(self) -> int:
        return self.admin_listeners[0].port

    def source(self, name: str) -> TokenSource:
        return self.sources[name]


async def _reload(daemon: Daemon, redactor: Redactor) -> None:
    """SIGHUP: re-read the file; a bad one is logged and the running config kept."""
    logger = log.get_logger()
    systemd.reloading()
    try:
        source = daemon.config.source
        if source is None:
            raise ConfigError("config: this daemon was not started from a file")
        new = load_config(source)
        old_log = daemon.config.log
        changes = await daemon.reload(new)
        if new.log != old_log:
            log.configure(new.log.level, new.log.format, redactor=redactor)
        logger.info(log.CONFIG_RELOADED, path=str(source), **changes)
    except TokenProxyError as exc:
        logger.error(log.CONFIG_RELOAD_FAILED, error=str(exc))
    except Exception as exc:   # whatever went wrong, the running config keeps serving
        logger.error(log.CONFIG_RELOAD_FAILED, error=type(exc).__name__)
    finally:
        systemd.ready()


async def serve(
    cfg: Config, *, redactor: Redactor, on_started: Callable[[Daemon], None] | None = None
) -> int:
    """Run until SIGTERM or SIGINT, then drain within shutdown_grace; a second signal cuts the
    drain short. SIGHUP reloads the config file. systemd is told READY, RELOADING, STOPPING."""
    loop = asyncio.get_running_loop()
    daemon = Daemon(cfg, redactor=redactor)
    await daemon.start()
    if on_started is not None:
        on_started(daemon)
    systemd.ready()
    stop = asyncio.Event()
    signals = 0
    reloads: set[asyncio.Task[None]] = set()

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            systemd.stopping()
        log.get_logger().info("shutdown", signal=signal.Signals(signum).name,
                              grace_s=daemon.config.shutdown_grace if signals == 1 else 0)
        stop.set()
        if signals > 1 and drain is not None:
            drain.cancel()

    def on_hup() -> None:
        if stop.is_set():
            return
        task = asyncio.create_task(_reload(daemon, redactor))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    drain: asyncio.Task[None] | None = None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await stop.wait()
        for task in list(reloads):
            with contextlib.suppress(Exception):
                await task
        drain = asyncio.create_task(daemon.stop())
        try:
            await drain
        except asyncio.CancelledError:
            await daemon.stop(grace=0)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.get_logger().info("stopped")
    return 0


async def obtain_token(cfg: Config, name: str, *, redactor: Redactor) -> str:
    """The current token of one provider for ``tokenproxy token``: a valid one from the state
    file (the daemon's, when one runs) if there is one, else a new one, persisted."""
    metrics = Metrics(CollectorRegistry(), __version__)
    store = await open_state_store(cfg)
    async with make_token_session() as session:
        factory = SourceFactory(
            clock=SystemClock(), metrics=metrics, redactor=redactor, session=session,
            store=store,
        )
        source = factory.build(cfg.providers[name])
        if isinstance(source, TokenManager):
            await source.load()
        try:
            return (await source.current()).value
        finally:
            await source.close()
