"""A small token issuer and a protected API, for ``tokenproxy demo`` and for the tests.

It behaves like real identity providers where it matters: short-lived access tokens, rotating
refresh tokens, and reuse detection — presenting a spent refresh token revokes its whole family
(RFC 9700 section 4.14.2), which logs out every holder. Both an OAuth2 token endpoint (with OIDC
discovery) and an app-style JSON login/refresh API are served.

For interactive logins it also serves a public client (no secret) with the device authorization
grant (RFC 8628: ``/oauth/device``, a ``/device`` page where a person approves or denies, and
polling at the token endpoint with ``authorization_pending``, ``slow_down``, ``access_denied``
and ``expired_token``) and the authorization code grant with PKCE for native apps (RFC 6749
section 4.1, RFC 7636 S256 only, RFC 8252 loopback redirects on any port, RFC 9207 ``iss`` in
the redirect). Such logins get an ``id_token`` that is JWT-shaped but unsigned (``alg`` none:
display data only, the demo does no cryptography), ``/oauth/userinfo`` and token revocation
(RFC 7009 ``/oauth/revoke``, which revokes a refresh token's whole family).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import re
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlencode

from aiohttp import web

from tokenproxy.clock import Clock, SystemClock

Fault = Callable[[web.Request, str], Awaitable[web.StreamResponse | None]]

DEVICE_GRANT: Final = "urn:ietf:params:oauth:grant-type:device_code"
GRANT_TYPES: Final = ("client_credentials", "password", "refresh_token", "authorization_code",
                      DEVICE_GRANT)
DEFAULT_SCOPE: Final = "openid profile email"
# RFC 8628 section 6.1: a user code from 20 consonants (no vowels, so no words; no look-alikes).
USER_CODE_ALPHABET: Final = "BCDFGHJKLMNPQRSTVWXZ"
# RFC 8252 section 7.3: loopback IP literals (not "localhost"), an explicit port, any path.
_LOOPBACK_REDIRECT: Final = re.compile(r"http://(?:127\.0\.0\.1|\[::1\]):([0-9]{1,5})(/[^#\s]*)?")
# RFC 7636 section 4.1/4.2: verifier and challenge are 43-128 unreserved characters.
_PKCE_VALUE: Final = re.compile(r"[A-Za-z0-9\-._~]{43,128}")
SLOW_DOWN_STEP: Final = 5   # RFC 8628 section 3.5: every slow_down adds 5 s to the interval


@dataclass
class _Family:
    """Tokens descending from one login; revoked together on refresh-token reuse."""

    user: str
    revoked: bool = False
    live_refresh: str | None = None
    spent: set[str] = field(default_factory=set)
    client: str | None = None     # the public client it was issued to; None: the confidential
    scope: str | None = None      # the granted scope (interactive logins)


@dataclass
class _DeviceRequest:
    """One device authorization (RFC 8628 section 3.1) and its polling state."""

    device_code: str
    user_code: str                # normalized: 8 letters, no dash
    client: str
    scope: str
    expires: float                # on the monotonic clock
    interval: int
    user: str | None = None       # set when approved
    denied: bool = False
    spent: bool = False
    last_poll: float | None = None


@dataclass
class _AuthCode:
    """One authorization code (RFC 6749 section 4.1.2), bound to its client, redirect_uri and
    PKCE challenge."""

    client: str
    redirect_uri: str
    challenge: str
    user: str
    scope: str
    expires: float                # on the monotonic clock


@dataclass
class IssuerStats:
    calls: int = 0                   # every token-endpoint call, successful or not
    grants: dict[str, int] = field(default_factory=dict)
    reuse_detected: int = 0
    api_calls: int = 0
    api_unauthorized: int = 0
    device_authorizations: int = 0   # every POST /oauth/device
    authorizations: int = 0          # every GET /oauth/authorize
    code_reuse: int = 0              # authorization codes presented again
    revocations: int = 0             # /oauth/revoke calls answered 200 (RFC 7009)
    revoked: int = 0                 # ... of which revoked a token (a family or an access token)
    userinfo_calls: int = 0


def format_user_code(code: str) -> str:
    """ABCDEFGH as it is shown to a person: ABCD-EFGH."""
    return f"{code[:4]}-{code[4:]}"


def normalize_user_code(text: str) -> str:
    """What a person typed, as the stored code: upper case, dashes and spaces dropped."""
    return re.sub(r"[\s-]", "", text).upper()


def s256(verifier: str) -> str:
    """The PKCE S256 challenge of *verifier* (RFC 7636 section 4.2)."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).decode().rstrip("=")


def _b64url_json(doc: Any) -> str:
    return base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")


def _page(title: str, body: str, status: int = 200) -> web.Response:
    text = (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}"
            f"</title></head><body><h1>{html.escape(title)}</h1>{body}</body></html>")
    return web.Response(status=status, text=text, content_type="text/html",
                        headers={"Cache-Control": "no-store"})


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
        public_client_id: str = "demo-cli",
        profiles: dict[str, dict[str, str]] | None = None,
        auto_approve: bool = False,
        device_lifetime: int = 600,
        device_interval: int = 5,
        code_lifetime: float = 60.0,
        send_iss: bool = True,
    ) -> None:
        self.lifetime = lifetime
        self.clock = clock or SystemClock()
        self.client_id = client_id
        self.client_secret = client_secret
        self.users = users if users is not None else {"demo": "demo-password"}
        self.rotate = rotate
        self.public_client_id = public_client_id
        self.profiles = profiles if profiles is not None else {
            "demo": {"name": "Demo User", "email": "demo@example.com"}}
        self.auto_approve = auto_approve
        self.device_lifetime = device_lifetime
        self.device_interval = device_interval
        self.code_lifetime = code_lifetime
        self.send_iss = send_iss
        self.id_tokens = True   # tests: False leaves who logged in to userinfo
        # Test knobs: the next N device-code polls answer slow_down; the next authorization
        # request is approved for this user, or denied (deny_next wins).
        self.slow_down_next = 0
        self.approve_next: str | None = None
        self.deny_next = False
        self.stats = IssuerStats()
        self.fault: Fault | None = None
        self._access: dict[str, tuple[_Family, float]] = {}
        self._refresh: dict[str, _Family] = {}
        self._revoked_access: set[str] = set()
        self._devices: dict[str, _DeviceRequest] = {}        # by device_code
        self._user_codes: dict[str, _DeviceRequest] = {}     # by normalized user code
        self._codes: dict[str, _AuthCode] = {}
        self._spent_codes: dict[str, _Family | None] = {}    # the family a code gave, if any
        # The query of every /oauth/authorize request, in order (for tests).
        self.authorize_requests: list[dict[str, str]] = []
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
        if family.client is not None:      # an interactive login of the public client
            doc["scope"] = family.scope or DEFAULT_SCOPE
            if self.id_tokens:
                doc["id_token"] = self.id_token(family.user, family.client)
        return doc

    def id_token(self, user: str, audience: str) -> str:
        """A JWT-shaped id_token for *user*: alg none and an empty signature (display data)."""
        now = int(self.clock.time())
        claims: dict[str, Any] = {"iss": self.base_url, "sub": user, "aud": audience,
                                  **self._profile(user), "iat": now,
                                  "exp": now + int(self.lifetime)}
        return f"{_b64url_json({'alg': 'none', 'typ': 'JWT'})}.{_b64url_json(claims)}."

    def _profile(self, user: str) -> dict[str, str]:
        profile = self.profiles.get(user, {})
        doc = {"name": profile.get("name", user)}
        if "email" in profile:
            doc["email"] = profile["email"]
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
        if entry is None or access in self._revoked_access:
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

    def _owner(self, family: _Family) -> str:
        return family.client if family.client is not None else self.client_id

    # -- OAuth2 ------------------------------------------------------------------------------

    @staticmethod
    def _error(status: int, code: str, description: str | None = None) -> web.Response:
        doc = {"error": code}
        if description is not None:
            doc["error_description"] = description
        return web.json_response(doc, status=status, headers={"Cache-Control": "no-store"})

    def _client(self, request: web.Request, form: dict[str, str]) -> str | None:
        """The client this request authenticates as: the confidential client (its secret in
        Basic or in the form) or the public client (its id, no secret); None for neither."""
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("basic "):
            try:
                cid, _, secret = base64.b64decode(auth[6:]).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return None
        else:
            cid, secret = form.get("client_id", ""), form.get("client_secret", "")
        if cid == self.client_id and secrets.compare_digest(secret.encode(),
                                                            self.client_secret.encode()):
            return cid
        if self.public_client_id and cid == self.public_client_id and not secret:
            return cid
        return None

    def _client_ok(self, request: web.Request, form: dict[str, str]) -> bool:
        return self._client(request, form) == self.client_id

    async def _faulted(self, request: web.Request, label: str) -> web.StreamResponse | None:
        return None if self.fault is None else await self.fault(request, label)

    async def token(self, request: web.Request) -> web.StreamResponse:
        form = {k: str(v) for k, v in (await request.post()).items()}
        grant = form.get("grant_type", "")
        self._count(grant)
        override = await self._faulted(request, grant)
        if override is not None:
            return override
        client = self._client(request, form)
        if client is None:
            return self._error(401, "invalid_client")
        public = client != self.client_id
        if grant in ("client_credentials", "password") and public:
            return self._error(400, "unauthorized_client")
        if grant in ("authorization_code", DEVICE_GRANT) and not public:
            return self._error(400, "unauthorized_client")
        if grant == "client_credentials":
            return web.json_response(self._issue(_Family(self.client_id), with_refresh=False))
        if grant == "password":
            user = form.get("username", "")
            if self.users.get(user) != form.get("password"):
                return self._error(400, "invalid_grant")
            return web.json_response(self._issue(_Family(user), with_refresh=True))
        if grant == "refresh_token":
            refresh = form.get("refresh_token", "")
            bound = self._refresh.get(refresh)
            if bound is not None and self._owner(bound) != client:
                return self._error(400, "invalid_grant", "refresh token of another client")
            family, _ = self._use_refresh(refresh)
            if family is None:
                return self._error(400, "invalid_grant")
            return self._token_answer(self._issue(family, with_refresh=True))
        if grant == DEVICE_GRANT:
            return self._device_grant(client, form)
        if grant == "authorization_code":
            return self._code_grant(client, form)
        return self._error(400, "unsupported_grant_type")

    @staticmethod
    def _token_answer(doc: dict[str, Any]) -> web.Response:
        return web.json_response(doc, headers={"Cache-Control": "no-store"})

    async def discovery(self, request: web.Request) -> web.Response:
        base = self.base_url
        return web.json_response({
            "issuer": base,
            "token_endpoint": base + "/oauth/token",
            "device_authorization_endpoint": base + "/oauth/device",
            "authorization_endpoint": base + "/oauth/authorize",
            "revocation_endpoint": base + "/oauth/revoke",
            "userinfo_endpoint": base + "/oauth/userinfo",
            "response_types_supported": ["code"],
            "grant_types_supported": list(GRANT_TYPES),
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": [
                "client_secret_basic", "client_secret_post", "none"],
            "authorization_response_iss_parameter_supported": True,
            "scopes_supported": DEFAULT_SCOPE.split(),
            "id_token_signing_alg_values_supported": ["none"],
        })

    # -- the device authorization grant (RFC 8628) -------------------------------------------

    async def device_authorization(self, request: web.Request) -> web.StreamResponse:
        """POST /oauth/device: a device code and the user code a person enters at /device."""
        form = {k: str(v) for k, v in (await request.post()).items()}
        self.stats.device_authorizations += 1
        override = await self._faulted(request, "device_authorization")
        if override is not None:
            return override
        client = self._client(request, form)
        if client is None:
            return self._error(401, "invalid_client")
        if client == self.client_id:
            return self._error(400, "unauthorized_client")
        user_code = self._new_user_code()
        dev = _DeviceRequest(
            device_code="dc-" + secrets.token_urlsafe(24), user_code=user_code, client=client,
            scope=form.get("scope") or DEFAULT_SCOPE,
            expires=self.clock.monotonic() + self.device_lifetime,
            interval=self.device_interval,
            user="demo" if self.auto_approve else None)
        self._devices[dev.device_code] = dev
        self._user_codes[user_code] = dev
        shown = format_user_code(user_code)
        return self._token_answer({
            "device_code": dev.device_code,
            "user_code": shown,
            "verification_uri": self.base_url + "/device",
            "verification_uri_complete": self.base_url + "/device?"
            + urlencode({"user_code": shown}),
            "expires_in": self.device_lifetime,
            "interval": self.device_interval,
        })

    def _new_user_code(self) -> str:
        while True:
            code = "".join(secrets.choice(USER_CODE_ALPHABET) for _ in range(8))
            if code not in self._user_codes:
                return code

    def _device_for(self, user_code: str) -> _DeviceRequest:
        dev = self._user_codes.get(normalize_user_code(user_code))
        if dev is None or dev.spent or self.clock.monotonic() >= dev.expires:
            raise ValueError("unknown or expired user code")
        if dev.denied or dev.user is not None:
            raise ValueError("user code already answered")
        return dev

    def approve(self, user_code: str, user: str = "demo") -> None:
        """A person signed in as *user* approves *user_code* (ABCD-EFGH or ABCDEFGH).
        ValueError for an unknown, expired or already answered code, or an unknown user."""
        if user not in self.users and user not in self.profiles:
            raise ValueError(f"unknown user {user!r}")
        self._device_for(user_code).user = user

    def deny(self, user_code: str) -> None:
        """A person denies *user_code*; its polls answer access_denied. ValueError as approve."""
        self._device_for(user_code).denied = True

    @property
    def pending_user_codes(self) -> list[str]:
        """The user codes (ABCD-EFGH) nobody approved or denied yet, unexpired, oldest first."""
        now = self.clock.monotonic()
        return [format_user_code(d.user_code) for d in self._devices.values()
                if d.user is None and not d.denied and not d.spent and now < d.expires]

    def _device_grant(self, client: str, form: dict[str, str]) -> web.Response:
        dev = self._devices.get(form.get("device_code", ""))
        if dev is None or dev.client != client:
            return self._error(400, "invalid_grant", "unknown device_code")
        if dev.spent:
            return self._error(400, "invalid_grant", "device_code already used")
        now = self.clock.monotonic()
        if now >= dev.expires:
            return self._error(400, "expired_token")
        last, dev.last_poll = dev.last_poll, now
        if self.slow_down_next > 0 or (last is not None and now - last < dev.interval):
            self.slow_down_next = max(0, self.slow_down_next - 1)
            dev.interval += SLOW_DOWN_STEP
            return self._error(400, "slow_down")
        if dev.denied:
            return self._error(400, "access_denied")
        if dev.user is None:
            return self._error(400, "authorization_pending")
        dev.spent = True
        family = _Family(dev.user, client=client, scope=dev.scope)
        return self._token_answer(self._issue(family, with_refresh=True))

    async def device_page(self, request: web.Request) -> web.Response:
        """GET /device: where a person enters (or sees) the user code, and approves or denies."""
        code = html.escape(request.query.get("user_code", ""), quote=True)
        return _page("Sign in a device", (
            "<form method=post action=/device>"
            f"<label>Code <input name=user_code value=\"{code}\"></label> "
            "<label>User <input name=user value=demo></label> "
            "<button name=action value=approve>Approve</button> "
            "<button name=action value=deny>Deny</button></form>"))

    async def device_answer(self, request: web.Request) -> web.Response:
        """POST /device (form user_code, action approve|deny, user default demo)."""
        form = {k: str(v) for k, v in (await request.post()).items()}
        action, code = form.get("action", ""), form.get("user_code", "")
        try:
            if action == "approve":
                self.approve(code, form.get("user") or "demo")
            elif action == "deny":
                self.deny(code)
            else:
                return _page("Bad request", "<p>action must be approve or deny.</p>", 400)
        except ValueError as exc:
            return _page("Bad request", f"<p>{html.escape(str(exc))}</p>", 400)
        word = "approved" if action == "approve" else "denied"
        return _page(f"Device {word}", "<p>You may close this page.</p>")

    # -- the authorization code grant with PKCE (RFC 6749 4.1, RFC 7636, RFC 8252) -----------

    def loopback_redirect(self, uri: str) -> bool:
        """RFC 8252 section 7.3: http://127.0.0.1:<port><path> or http://[::1]:<port><path>."""
        match = _LOOPBACK_REDIRECT.fullmatch(uri)
        return match is not None and 0 < int(match.group(1)) < 65536

    async def authorize(self, request: web.Request) -> web.StreamResponse:
        """GET /oauth/authorize: refuses a bad request with a 400 page (never redirecting);
        with approval (auto_approve, approve_next) redirects with a code, with deny_next
        redirects with error=access_denied; otherwise a page saying a person must approve."""
        query = {k: str(v) for k, v in request.query.items()}
        self.stats.authorizations += 1
        self.authorize_requests.append(query)
        override = await self._faulted(request, "authorize")
        if override is not None:
            return override
        if query.get("client_id") != self.public_client_id or not self.public_client_id:
            return _page("Bad request", "<p>Unknown client.</p>", 400)
        redirect = query.get("redirect_uri", "")
        if not self.loopback_redirect(redirect):
            return _page("Bad request", "<p>redirect_uri must be http://127.0.0.1:PORT/... "
                                        "or http://[::1]:PORT/...</p>", 400)
        if query.get("response_type") != "code":
            return _page("Bad request", "<p>response_type must be code.</p>", 400)
        challenge = query.get("code_challenge", "")
        if query.get("code_challenge_method") != "S256" or not _PKCE_VALUE.fullmatch(challenge):
            return _page("Bad request", "<p>PKCE with S256 is required.</p>", 400)
        params: dict[str, str] = {}
        if self.deny_next:
            self.deny_next = False
            params["error"] = "access_denied"
        else:
            user = self.approve_next or ("demo" if self.auto_approve else None)
            if user is None:
                return _page("Approval needed", "<p>A person must approve this sign-in "
                                                "(the demo issuer has no login form).</p>")
            self.approve_next = None
            code = "ac-" + secrets.token_urlsafe(24)
            self._codes[code] = _AuthCode(
                client=self.public_client_id, redirect_uri=redirect, challenge=challenge,
                user=user, scope=query.get("scope") or DEFAULT_SCOPE,
                expires=self.clock.monotonic() + self.code_lifetime)
            params["code"] = code
        if "state" in query:
            params["state"] = query["state"]
        if self.send_iss:
            params["iss"] = self.base_url
        sep = "&" if "?" in redirect else "?"
        # Not HTTPFound: that normalizes the URL; the redirect goes out exactly as registered.
        return web.Response(status=302, headers={"Location": redirect + sep + urlencode(params),
                                                 "Cache-Control": "no-store"})

    def _code_grant(self, client: str, form: dict[str, str]) -> web.Response:
        presented = form.get("code", "")
        code = self._codes.pop(presented, None)
        if code is None:
            if presented in self._spent_codes:
                # RFC 6749 section 4.1.2: a code used twice revokes what it gave.
                self.stats.code_reuse += 1
                family = self._spent_codes[presented]
                if family is not None:
                    family.revoked = True
                return self._error(400, "invalid_grant", "authorization code already used")
            return self._error(400, "invalid_grant", "unknown authorization code")
        self._spent_codes[presented] = None     # single use, whether or not it succeeds
        verifier = form.get("code_verifier", "")
        if code.client != client:
            return self._error(400, "invalid_grant", "code of another client")
        if code.redirect_uri != form.get("redirect_uri"):
            return self._error(400, "invalid_grant", "redirect_uri does not match")
        if self.clock.monotonic() >= code.expires:
            return self._error(400, "invalid_grant", "authorization code expired")
        if not _PKCE_VALUE.fullmatch(verifier) or not secrets.compare_digest(
                s256(verifier), code.challenge):
            return self._error(400, "invalid_grant", "code_verifier does not match")
        family = _Family(code.user, client=client, scope=code.scope)
        self._spent_codes[presented] = family
        return self._token_answer(self._issue(family, with_refresh=True))

    # -- revocation (RFC 7009) and userinfo ----------------------------------------------------

    async def revoke(self, request: web.Request) -> web.StreamResponse:
        """POST /oauth/revoke: a refresh token revokes its family (and so its access tokens),
        an access token itself; 200 for any token of a known client, even unknown ones, and
        tokens of another client are left alone."""
        form = {k: str(v) for k, v in (await request.post()).items()}
        override = await self._faulted(request, "revoke")
        if override is not None:
            return override
        client = self._client(request, form)
        if client is None:
            return self._error(401, "invalid_client")
        token = form.get("token", "")
        if not token:
            return self._error(400, "invalid_request", "token is required")
        self.stats.revocations += 1
        family = self._refresh.get(token)
        access = self._access.get(token)
        if family is not None and self._owner(family) == client and not family.revoked:
            family.revoked = True
            self.stats.revoked += 1
        elif (access is not None and self._owner(access[0]) == client
              and token not in self._revoked_access):
            self._revoked_access.add(token)
            self.stats.revoked += 1
        return web.Response(status=200, headers={"Cache-Control": "no-store"})

    async def userinfo(self, request: web.Request) -> web.StreamResponse:
        """GET or POST /oauth/userinfo with a Bearer access token: {sub, name, email}."""
        self.stats.userinfo_calls += 1
        override = await self._faulted(request, "userinfo")
        if override is not None:
            return override
        auth = request.headers.get("Authorization", "")
        family = self.valid(auth[7:]) if auth.startswith("Bearer ") else None
        if family is None:
            return web.json_response({"error": "invalid_token"}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return web.json_response({"sub": family.user, **self._profile(family.user)})

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
        app.router.add_post("/oauth/device", self.device_authorization)
        app.router.add_get("/device", self.device_page)
        app.router.add_post("/device", self.device_answer)
        app.router.add_get("/oauth/authorize", self.authorize)
        app.router.add_post("/oauth/revoke", self.revoke)
        app.router.add_get("/oauth/userinfo", self.userinfo)
        app.router.add_post("/oauth/userinfo", self.userinfo)
        app.router.add_post("/auth/login", self.json_login)
        app.router.add_post("/auth/refresh", self.json_refresh)
        app.router.add_route("*", "/api/{tail:.*}", self.api)
        return app
