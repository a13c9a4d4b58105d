"""`tokenproxy login`, `logout` and `status`: a person's login stored where the daemon keeps
its tokens (the state file, or the shared state), which a running daemon picks up within a
second; a logout that revokes at the issuer and clears what is stored; and one line per
provider saying who is logged in and for how long."""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Sequence
from typing import Any, Final

import aiohttp
from prometheus_client import CollectorRegistry

from tokenproxy import __version__
from tokenproxy.clock import Clock
from tokenproxy.config import Config, OAuth2Provider, StaticProvider
from tokenproxy.log import Redactor
from tokenproxy.login import LoginFailed
from tokenproxy.login.flows import Terminal, browser_login, device_login
from tokenproxy.metrics import Metrics
from tokenproxy.terminal import visible
from tokenproxy.tokens.factory import SourceFactory, open_token_store
from tokenproxy.tokens.grant import Grant, GrantFailed, GrantRejected
from tokenproxy.tokens.http import make_token_session
from tokenproxy.tokens.manager import TokenManager
from tokenproxy.tokens.oauth2 import OAuth2Grantor
from tokenproxy.tokens.state import StoredTokens
from tokenproxy.tokens.store import SharedStateUnavailable, TokenStore

# Claims naming the person, in the order they are preferred for display.
ACCOUNT_CLAIMS: Final = ("email", "preferred_username", "name", "sub")


def interactive(cfg: Config, names: Sequence[str]) -> list[OAuth2Provider]:
    """The providers *names* asks for (all interactive ones when it names none); a name that
    is not an interactive provider is a LoginFailed naming it."""
    found: list[OAuth2Provider] = []
    for name in names:
        p = cfg.providers.get(name)
        if not isinstance(p, OAuth2Provider) or not p.interactive:
            raise LoginFailed(f"{name!r} is not a provider a person logs in to "
                              "(grant_type device_code or authorization_code)")
        found.append(p)
    if not names:
        found = [p for p in cfg.providers.values()
                 if isinstance(p, OAuth2Provider) and p.interactive]
    return found


class Session:
    """What the commands share: the token store, the token client, a factory of sources."""

    def __init__(self, cfg: Config, redactor: Redactor, clock: Clock) -> None:
        self.cfg = cfg
        self._redactor = redactor
        self._clock = clock
        self.metrics = Metrics(CollectorRegistry(), __version__)
        self.store: TokenStore | None = None
        self._http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Session:
        self.store = await open_token_store(self.cfg, self.metrics)
        self._http = make_token_session()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._http is not None:
            await self._http.close()
        if self.store is not None:
            await self.store.close()

    def _factory(self) -> SourceFactory:
        assert self._http is not None
        return SourceFactory(clock=self._clock, metrics=self.metrics, redactor=self._redactor,
                             session=self._http, store=self.store)

    def grantor(self, p: OAuth2Provider) -> OAuth2Grantor:
        grantor = self._factory().grantor(p, {})
        assert isinstance(grantor, OAuth2Grantor)
        return grantor

    def manager(self, p: OAuth2Provider) -> TokenManager:
        source = self._factory().build(p, {})
        assert isinstance(source, TokenManager)
        return source

    def manager_key(self, p: Any) -> str:
        assert self.store is not None
        return self.store.key_for(p.name, p.identity())

    async def stored(self, p: OAuth2Provider) -> StoredTokens | None:
        if self.store is None:
            return None
        return await self.store.read(self.manager_key(p))


async def log_in(session: Session, p: OAuth2Provider, term: Terminal) -> str:
    """One provider's login, stored; returns who logged in (or "?" when nothing says)."""
    await session.stored(p)   # the store answers, before a person spends time on a login
    grantor = session.grantor(p)
    try:
        if p.grant_type == "device_code":
            grant = await device_login(grantor, p, term)
        else:
            grant = await browser_login(grantor, p, term)
    except (GrantRejected, GrantFailed) as exc:
        raise LoginFailed(exc.reason) from None
    if not grant.refresh_token:
        term.say(f"note: the issuer gave {p.name} no refresh token: the login lasts as long as "
                 "its access token (ask for the offline_access scope)")
    account = await _account(grantor, grant)
    await session.manager(p).store_login(grant, account)
    return account or "?"


async def _account(grantor: OAuth2Grantor, grant: Grant) -> str | None:
    """Who logged in: from the ID token's claims (read, not verified: it came from the token
    endpoint itself, and serves only for display), else from userinfo when published."""
    claims: object = _claims(grant.id_token) if grant.id_token else None
    if claims is None:
        url = await grantor.login_endpoint("userinfo")
        if url is not None:
            claims = await grantor.userinfo(url, grant.access_token)
    if not isinstance(claims, dict):
        return None
    for claim in ACCOUNT_CLAIMS:
        value = claims.get(claim)
        if isinstance(value, str) and value:
            return visible(value)[:200]
    return None


def _claims(id_token: str) -> dict[str, Any] | None:
    parts = id_token.split(".")
    if len(parts) != 3:
        return None
    try:
        doc = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError, RecursionError):
        return None
    return doc if isinstance(doc, dict) else None


async def log_out(session: Session, p: OAuth2Provider) -> str:
    """Clear what is stored (a running daemon drops the provider's tokens within a second),
    then revoke the refresh token that was there where the issuer says how (RFC 7009). The
    deletion comes first: an issuer that cannot be reached must not keep the login alive."""
    stored = await session.manager(p).store_logout()
    if stored is None or not stored.refresh_token:
        return "nothing was stored"
    grantor = session.grantor(p)
    try:
        url = await grantor.login_endpoint("revocation")
        if url is None:
            return ("the issuer publishes no revocation endpoint: the refresh token was "
                    "deleted here, not revoked")
        answer = await grantor.post(url, {"token": stored.refresh_token,
                                          "token_type_hint": "refresh_token"}, "revocation")
    except (GrantFailed, GrantRejected) as exc:
        return f"deleted here, not revoked at the issuer ({visible(exc.reason)})"
    if answer.status == 200:
        return "revoked at the issuer"
    return f"deleted here; the issuer answered {answer.status} to the revocation"


def describe(p: Any, stored: StoredTokens | None, now: float) -> str:
    """status's line for one provider."""
    if isinstance(p, StaticProvider):
        return f"{p.name}: static token"
    login = isinstance(p, OAuth2Provider) and p.interactive
    if stored is None or (not stored.access_token and not stored.refresh_token):
        return (f"{p.name}: login required: run tokenproxy login {p.name}" if login
                else f"{p.name}: no token stored yet (the daemon gets one when it starts)")
    who = f" as {stored.account}" if stored.account else ""
    if login and not stored.refresh_token:
        expiry = _expiry(stored, now)
        return (f"{p.name}: logged in{who}, without a refresh token ({expiry}); then "
                f"run tokenproxy login {p.name}")
    head = f"{p.name}: logged in{who}" if login else f"{p.name}: {p.type_name()}"
    return f"{head}, {_expiry(stored, now)}"


def _expiry(stored: StoredTokens, now: float) -> str:
    if stored.expires_at is None:
        return "token without a known expiry"
    left = stored.expires_at - now
    if left <= 0:
        return "token expired (renewed at the next request)"
    return f"token expires in {math.floor(left)} s"


async def status_lines(session: Session, now: float) -> tuple[list[str], bool]:
    """One line per provider, and whether one of them needs a login."""
    lines: list[str] = []
    needed = False
    for p in session.cfg.providers.values():
        stored = None
        if not isinstance(p, StaticProvider) and session.store is not None:
            try:
                stored = await session.store.read(session.manager_key(p))
            except SharedStateUnavailable as exc:
                lines.append(f"{p.name}: the shared state does not answer ({exc})")
                needed = True   # cannot tell: not a success
                continue
        line = describe(p, stored, now)
        needed = needed or "login required" in line or "then run tokenproxy login" in line
        lines.append(line)
    return lines, needed
