"""``check-config --online``: contact each provider once, as the daemon would, before deploying.

Each provider is asked for one token the way the daemon first would (discovery included); the
token itself is never printed, only how long it lives. Nothing is written to the state file,
and no refresh token is ever spent: a provider whose only grant is a refresh token is checked
against the state file instead, since exchanging the token would rotate it away from the daemon.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from tokenproxy import __version__
from tokenproxy.clock import SystemClock
from tokenproxy.config import Config, OAuth2Provider, Provider, StaticProvider
from tokenproxy.log import Redactor
from tokenproxy.metrics import Metrics
from tokenproxy.tokens.factory import SourceFactory, open_state_store
from tokenproxy.tokens.grant import GrantFailed, GrantRejected
from tokenproxy.tokens.http import make_token_session
from tokenproxy.tokens.oauth2 import OAuth2Grantor
from tokenproxy.tokens.state import StateStore, identity_key


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
    """One ProviderCheck per provider, in config order."""
    store = await open_state_store(cfg)
    async with make_token_session() as session:
        factory = SourceFactory(clock=SystemClock(), redactor=redactor, session=session,
                                metrics=Metrics(CollectorRegistry(), __version__), store=None)
        stored = await _stored(cfg, store)
        return [await _check(p, factory, stored) for p in cfg.providers.values()]


async def _stored(cfg: Config, store: StateStore | None) -> dict[str, float | None]:
    """Seconds left of each provider's stored access token (None when it has no expiry)."""
    if store is None:
        return {}
    entries = await asyncio.to_thread(lambda: store.read_all(look_only=True))
    now = time.time()
    return {name: (None if e.expires_at is None else e.expires_at - now)
            for name, p in cfg.providers.items()
            if (e := entries.get(identity_key(name, p.identity()))) is not None
            and e.access_token}


async def _check(p: Provider, factory: SourceFactory, stored: dict[str, float | None]
                 ) -> ProviderCheck:
    if isinstance(p, StaticProvider):
        return ProviderCheck(p.name, True, "ok (static token)")
    grantor = factory.grantor(p)
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
