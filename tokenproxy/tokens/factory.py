"""Token sources from provider config: the grantor for each provider type, the shared token
client and token store (the state file, or Redis with shared_state), and the one-shot
``tokenproxy token``."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Mapping
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from tokenproxy import __version__
from tokenproxy.clock import Clock, SystemClock
from tokenproxy.config import (
    CommandProvider,
    Config,
    JsonProvider,
    OAuth2Provider,
    Provider,
    StaticProvider,
)
from tokenproxy.config.providers import subject_chain
from tokenproxy.config.values import ClientTls
from tokenproxy.errors import ConfigError
from tokenproxy.log import Redactor
from tokenproxy.metrics import Metrics
from tokenproxy.tls import client_context
from tokenproxy.tokens.calls import Grantor
from tokenproxy.tokens.command import CommandGrantor
from tokenproxy.tokens.http import make_token_session
from tokenproxy.tokens.json_login import JsonGrantor
from tokenproxy.tokens.manager import TokenManager
from tokenproxy.tokens.oauth2 import OAuth2Grantor
from tokenproxy.tokens.source import TokenSource
from tokenproxy.tokens.state import StateStore, UnsafeStateFile
from tokenproxy.tokens.static import StaticSource
from tokenproxy.tokens.store import FileStore, TokenStore
from tokenproxy.tokens.subject import Subject


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


async def open_token_store(cfg: Config, metrics: Metrics) -> TokenStore | None:
    """Where the providers keep their tokens: Redis with shared_state (asked once now, so
    health shows at once; it being away does not stop a start), else the state file."""
    if cfg.shared_state is not None:
        if not cfg.persists_tokens:
            return None
        # Here, not at the top: redis-py (and the sealing's cryptography) are megabytes that
        # a daemon without shared_state does not need.
        from tokenproxy.tokens.shared.redis_store import RedisStore

        shared = RedisStore(cfg.shared_state, metrics)
        await shared.open()
        return shared
    state = await open_state_store(cfg)
    return None if state is None else FileStore(state)


class SourceFactory:
    """Builds one token source per provider, sharing the token client and the state file."""

    def __init__(
        self, *, clock: Clock, metrics: Metrics, redactor: Redactor,
        session: aiohttp.ClientSession, store: TokenStore | None,
    ) -> None:
        self._clock = clock
        self.metrics = metrics
        self._redactor = redactor
        self._session = session
        self.store = store
        self._ssl: dict[ClientTls, ssl.SSLContext] = {}

    def renewed(self, store: TokenStore | None) -> SourceFactory:
        """The factory for a reloaded config: the same clients and *store*, and TLS contexts
        built anew, so a CA file or client certificate rotated in place is read again."""
        return SourceFactory(clock=self._clock, metrics=self.metrics, redactor=self._redactor,
                             session=self._session, store=store)

    def _ssl_for(self, tls: ClientTls) -> ssl.SSLContext | bool:
        if tls.default:
            return True
        if tls not in self._ssl:
            self._ssl[tls] = client_context(tls)
        return self._ssl[tls]

    def grantor(self, cfg: OAuth2Provider | JsonProvider | CommandProvider,
                sources: Mapping[str, TokenSource]) -> Grantor:
        """What talks to the provider's token endpoint (or runs its command). *sources*: the
        providers' sources, where a token exchange finds its subject provider."""
        if isinstance(cfg, OAuth2Provider):
            tls = ClientTls(cfg.ca_file, cfg.tls_client_cert_file, cfg.tls_client_key_file)
            subject = (None if cfg.subject_token_provider is None
                       else Subject(cfg.subject_token_provider, sources))
            return OAuth2Grantor(cfg, self._session, self._ssl_for(tls), clock=self._clock,
                                 redactor=self._redactor, subject=subject)
        if isinstance(cfg, JsonProvider):
            return JsonGrantor(cfg, self._session, self._ssl_for(ClientTls(cfg.ca_file)))
        return CommandGrantor(cfg, self._redactor)

    def build(self, cfg: Provider, sources: Mapping[str, TokenSource]) -> TokenSource:
        """*sources*: the mapping the daemon serves from, which holds every provider by the
        time a token is asked for (a chained provider looks its subject up there)."""
        common: dict[str, Any] = {"clock": self._clock, "metrics": self.metrics,
                                  "redactor": self._redactor}
        if isinstance(cfg, StaticProvider):
            return StaticSource(cfg, **common)
        lifetime = cfg.cache_for if isinstance(cfg, CommandProvider) else None
        # Another holder of the state lock may take up to its whole call timeout.
        lock_wait = cfg.timeout + 1.0
        grantor = self.grantor(cfg, sources)
        return TokenManager(
            cfg.name, cfg.type_name(), grantor, identity=cfg.identity(),
            refresh_margin=cfg.refresh_margin, store=self.store, default_lifetime=lifetime,
            lock_timeout=lock_wait,
            subject=grantor.subject if isinstance(grantor, OAuth2Grantor) else None, **common,
        )


async def obtain_token(cfg: Config, name: str, *, redactor: Redactor) -> str:
    """The current token of one provider for ``tokenproxy token``: a valid one from the store
    (the daemons', when they run) if there is one, else a new one, stored."""
    metrics = Metrics(CollectorRegistry(), __version__)
    store = await open_token_store(cfg, metrics)
    try:
        async with make_token_session() as session:
            factory = SourceFactory(
                clock=SystemClock(), metrics=metrics, redactor=redactor, session=session,
                store=store,
            )
            # The provider and those whose tokens it is exchanged from (subject_chain).
            sources: dict[str, TokenSource] = {}
            for needed in subject_chain(cfg.providers, name):
                sources[needed] = factory.build(cfg.providers[needed], sources)
            try:
                for source in sources.values():
                    if isinstance(source, TokenManager):
                        await source.load()
                return (await sources[name].current()).value
            finally:
                for source in sources.values():
                    await source.close()
    finally:
        if store is not None:
            await store.close()
