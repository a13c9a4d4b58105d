"""A small token issuer and a protected API, for ``tokenproxy demo`` and for the tests.

It behaves like real identity providers where it matters: short-lived access tokens, rotating
refresh tokens, and reuse detection — presenting a spent refresh token revokes its whole family
(RFC 9700 section 4.14.2), which logs out every holder. Both an OAuth2 token endpoint (with OIDC
discovery) and an app-style JSON login/refresh API are served.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from tokenproxy.clock import Clock, SystemClock

Fault = Callable[[web.Request, str], Awaitable[web.StreamResponse | None]]


@dataclass
class _Family:
    """Tokens descending from one login; revoked together on refresh-token reuse."""

    user: str
    revoked: bool = False
    live_refresh: str | None = None
    spent: set[str] = field(default_factory=set)


@dataclass
class IssuerStats:
    calls: int = 0                   # every token-endpoint call, successful or not
    grants: dict[str, int] = field(default_factory=dict)
    reuse_detected: int = 0
    api_calls: int = 0
    api_unauthorized: int = 0


class Issuer:
    """Issues tokens; ``fault`` (tests) may answer a call instead of the issuer."""

    def __init__(
        self,
        *,
        lifetime: float = 10.0,
        clock: Clock | None = None,
        client_id: str = "demo-client",
        client_secret: str = "demo-secret",  # noqa: S107 - the demo's published credential
        users: dict[str, str] | None = None,
        rotate: bool = True,
    ) -> None:
        self.lifetime = lifetime
        self.clock = clock or SystemClock()
        self.client_id = client_id
        self.client_secret = client_secret
        self.users = users if users is not None else {"demo": "demo-password"}
        self.rotate = rotate
        self.stats = IssuerStats()
        self.fault: Fault | None = None
        self._access: dict[str, tuple[_Family, float]] = {}
        self._refresh: dict[str, _Family] = {}
        self.base_url = ""

    # -- issuing -----------------------------------------------------------------------------

    def _issue(self, family: _Family, *, with_refresh: bool) -> dict[str, Any]:
        access = "at-" + secrets.token_urlsafe(18)
        self._access[access] = (family, self.clock.monotonic() + self.lifetime)
        doc: dict[str, Any] = {"access_token": access, "token_type": "Bearer",
                               "expires_in": self.lifetime}
        if with_refresh:
            refresh = "rt-" + secrets.token_urlsafe(18)
            family.live_refresh = refresh
            self._refresh[refresh] = family
            doc["refresh_token"] = refresh
        return doc

    def _use_refresh(self, refresh: str) -> tuple[_Family | None, str]:
        family = self._refresh.get(refresh)
        if family is None:
            return None, "unknown refresh token"
        if family.revoked:
            return None, "token family revoked"
        if refresh in family.spent or (self.rotate and refresh != family.live_refresh):
            family.revoked = True          # reuse: log every holder out
            self.stats.reuse_detected += 1
            return None, "refresh token reused; family revoked"
        if self.rotate:
            family.spent.add(refresh)
        return family, ""

    def valid(self, access: str) -> _Family | None:
        entry = self._access.get(access)
        if entry is None:
            return None
        family, expires = entry
        if family.revoked or self.clock.monotonic() >= expires:
            return None
        return family

    def revoke_all(self) -> None:
        """Revoke every token family: access and refresh tokens alike."""
        for family, _ in self._access.values():
            family.revoked = True

    def revoke_access(self) -> None:
        """Revoke every access token issued so far; refresh tokens stay good."""
        self._access.clear()

    def _count(self, grant: str) -> None:
        self.stats.calls += 1
        self.stats.grants[grant] = self.stats.grants.get(grant, 0) + 1

    # -- OAuth2 ------------------------------------------------------------------------------

    @staticmethod
    def _error(status: int, code: str) -> web.Response:
        return web.json_response({"error": code}, status=status,
                                 headers={"Cache-Control": "no-store"})

    def _client_ok(self, request: web.Request, form: dict[str, str]) -> bool:
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            try:
                cid, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
        else:
            cid, secret = form.get("client_id", ""), form.get("client_secret", "")
        return cid == self.client_id and secrets.compare_digest(secret, self.client_secret)

    async def token(self, request: web.Request) -> web.StreamResponse:
        form = {k: str(v) for k, v in (await request.post()).items()}
        grant = form.get("grant_type", "")
        self._count(grant)
        if self.fault is not None:
            override = await self.fault(request, grant)
            if override is not None:
                return override
        if not self._client_ok(request, form):
            return self._error(401, "invalid_client")
        if grant == "client_credentials":
            return web.json_response(self._issue(_Family(self.client_id), with_refresh=False))
        if grant == "password":
            user = form.get("username", "")
            if self.users.get(user) != form.get("password"):
                return self._error(400, "invalid_grant")
            return web.json_response(self._issue(_Family(user), with_refresh=True))
        if grant == "refresh_token":
            family, _ = self._use_refresh(form.get("refresh_token", ""))
            if family is None:
                return self._error(400, "invalid_grant")
            return web.json_response(self._issue(family, with_refresh=True))
        return self._error(400, "unsupported_grant_type")

    async def discovery(self, request: web.Request) -> web.Response:
        return web.json_response({"issuer": self.base_url,
                                  "token_endpoint": self.base_url + "/oauth/token"})

    # -- the app-style JSON API (the axios-interceptor article's flow) -----------------------

    async def json_login(self, request: web.Request) -> web.StreamResponse:
        self._count("json_login")
        if self.fault is not None:
            override = await self.fault(request, "json_login")
            if override is not None:
                return override
        body = await request.json()
        user = body.get("username", "") if isinstance(body, dict) else ""
        if not isinstance(body, dict) or self.users.get(user) != body.get("password"):
            return web.json_response({"message": "bad credentials"}, status=401)
        doc = self._issue(_Family(user), with_refresh=True)
        return web.json_response({"accessToken": doc["access_token"],
                                  "refreshToken": doc["refresh_token"],
                                  "expiresIn": doc["expires_in"]})

    async def json_refresh(self, request: web.Request) -> web.StreamResponse:
        self._count("json_refresh")
        if self.fault is not None:
            override = await self.fault(request, "json_refresh")
            if override is not None:
                return override
        body = await request.json()
        refresh = body.get("refreshToken", "") if isinstance(body, dict) else ""
        family, _ = self._use_refresh(str(refresh))
        if family is None:
            return web.json_response({"message": "refresh token invalid"}, status=401)
        doc = self._issue(family, with_refresh=True)
        return web.json_response({"data": {"accessToken": doc["access_token"],
                                           "refreshToken": doc["refresh_token"]}})

    # -- the protected API -------------------------------------------------------------------

    async def api(self, request: web.Request) -> web.Response:
        self.stats.api_calls += 1
        auth = request.headers.get("Authorization", "")
        family = self.valid(auth[7:]) if auth.startswith("Bearer ") else None
        if family is None:
            self.stats.api_unauthorized += 1
            return web.json_response({"error": "invalid_token"}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return web.json_response({"hello": family.user, "path": request.path})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/oauth/token", self.token)
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_post("/auth/login", self.json_login)
        app.router.add_post("/auth/refresh", self.json_refresh)
        app.router.add_route("*", "/api/{tail:.*}", self.api)
        return app
