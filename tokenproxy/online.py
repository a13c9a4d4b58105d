"""``check-config --online``: contact each provider once, as the daemon would, before deploying.

Each provider is asked for one token the way the daemon first would (discovery included); the
token itself is never printed, only how long it lives. Nothing is written to the state file
or the shared state, and no refresh token is ever spent: a provider whose only grant is a
refresh token is checked against the stored tokens instead, since exchanging the token would
rotate it away from the daemon. With shared_state, Redis is asked first (a line of its own).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from tokenproxy import __version__
from tokenproxy.clock import SystemClock
from tokenproxy.config import Config, OAuth2Provider, Provider, StaticProvider
from tokenproxy.config.providers import subject_chain
from tokenproxy.log import Redactor
from tokenproxy.metrics import Metrics
from tokenproxy.tokens.factory import SourceFactory, open_state_store
from tokenproxy.tokens.grant import GrantFailed, GrantRejected
from tokenproxy.tokens.http import make_token_session
from tokenproxy.tokens.oauth2 import OAuth2Grantor
from tokenproxy.tokens.source import TokenSource
from tokenproxy.tokens.state import StateStore, StoredTokens, identity_key
from tokenproxy.tokens.store import SharedStateUnavailable


@dataclass(frozen=True, slots=True)
class ProviderCheck:
    name: str
    ok: bool
    text: str   # "ok (expires in 3600 s)", or what is wrong
    endpoint: str | None = None   # the token endpoint discovery found


def _lifetime(expires_in: float | None) -> str:
    return "ok (expiry not given)" if expires_in is None else (
        f"ok (expires in {math.floor(expires_in)} s)")


async def check_providers(cfg: Config, redactor: Redactor) -> list[ProviderCheck]:
    """One ProviderCheck per provider, in config order (after the shared state's, if any)."""
    metrics = Metrics(CollectorRegistry(), __version__)
    checks: list[ProviderCheck] = []
    if cfg.shared_state is not None:
        check, entries = await _shared_entries(cfg, metrics)
        checks.append(check)
    else:
        entries = await _file_entries(cfg, await open_state_store(cfg))
    async with make_token_session() as session:
        factory = SourceFactory(clock=SystemClock(), redactor=redactor, session=session,
                                metrics=metrics, store=None)
        stored = _left(entries)
        # Where a token exchange finds its subject provider (its token got as the daemon
        # would, by a call of its own).
        sources: dict[str, TokenSource] = {}
        for name, p in cfg.providers.items():
            sources[name] = factory.build(p, sources)
        try:
            return checks + [await _check(p, factory, stored, sources,
                                      _spender(cfg.providers, p.name))
                         for p in cfg.providers.values()]
        finally:
            for source in sources.values():
                await source.close()


async def _file_entries(cfg: Config, store: StateStore | None) -> dict[str, StoredTokens]:
    if store is None:
        return {}
    entries = await asyncio.to_thread(lambda: store.read_all(look_only=True))
    return {name: e for name, p in cfg.providers.items()
            if (e := entries.get(identity_key(name, p.identity()))) is not None}


async def _shared_entries(cfg: Config, metrics: Metrics
                          ) -> tuple[ProviderCheck, dict[str, StoredTokens]]:
    """Each token provider's entry in Redis, read only; and whether Redis answers and every
    entry opens (with this config's encryption key)."""
    assert cfg.shared_state is not None
    from tokenproxy.tokens.shared.redis_store import RedisStore  # only with shared_state

    store = RedisStore(cfg.shared_state, metrics)
    entries: dict[str, StoredTokens] = {}
    try:
        for name, p in cfg.providers.items():
            if not isinstance(p, StaticProvider):
                entry = await store.read(store.key_for(name, p.identity()))
                if entry is not None:
                    entries[name] = entry
    except SharedStateUnavailable as exc:
        return ProviderCheck("shared_state", False, f"failed: {exc}"), {}
    finally:
        await store.close()
    text = f"ok ({store.where} answers; {len(entries)} of the providers' entries stored)"
    return ProviderCheck("shared_state", True, text), entries


def _left(entries: dict[str, StoredTokens]) -> dict[str, float | None]:
    """Seconds left of each provider's stored access token (None when it has no expiry)."""
    now = time.time()
    return {name: (None if e.expires_at is None else e.expires_at - now)
            for name, e in entries.items() if e.access_token}


def _spender(providers: Mapping[str, Provider], name: str) -> str | None:
    """The provider *name* is exchanged from (directly or not) that holds a refresh token,
    which its source spends first: asking it would rotate the one the daemon holds."""
    for member in subject_chain(providers, name)[1:]:
        p = providers[member]
        if isinstance(p, OAuth2Provider) and (p.grant_type == "refresh_token"
                                              or p.refresh_token is not None):
            return member
    return None


async def _check(p: Provider, factory: SourceFactory, stored: dict[str, float | None],
                 sources: Mapping[str, TokenSource], spender: str | None) -> ProviderCheck:
    if isinstance(p, StaticProvider):
        return ProviderCheck(p.name, True, "ok (static token)")
    if spender is not None:
        return ProviderCheck(p.name, True, f"not exchanged (its subject {spender!r} would "
                             "rotate the refresh token the daemon holds)")
    grantor = factory.grantor(p, sources)
    endpoint: str | None = None
    try:
        if isinstance(grantor, OAuth2Grantor) and isinstance(p, OAuth2Provider) and p.issuer:
            endpoint = await grantor.endpoint()
        if not grantor.can_login:
            return _refresh_only(p.name, stored, endpoint)
        grant = await grantor.login()
    except (GrantFailed, GrantRejected) as exc:
        return ProviderCheck(p.name, False, f"failed: {exc.reason}", endpoint)
    except Exception as exc:   # a provider's own bug: reported, as the daemon logs it
        return ProviderCheck(p.name, False, f"failed: {type(exc).__name__}", endpoint)
    return ProviderCheck(p.name, True, _lifetime(grant.expires_in), endpoint)


def _refresh_only(name: str, stored: dict[str, float | None], endpoint: str | None
                  ) -> ProviderCheck:
    if name in stored and (stored[name] is None or (stored[name] or 0) > 0):
        left = stored[name]
        text = "ok (stored token" + ("" if left is None else f", expires in {math.floor(left)} s")
        return ProviderCheck(name, True, text + "; refresh token not exchanged)", endpoint)
    return ProviderCheck(name, True, "not exchanged (it would rotate the refresh token the "
                         "daemon holds); `tokenproxy token` uses it", endpoint)
