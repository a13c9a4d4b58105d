"""A fake OAuth2 token endpoint that checks what tokenproxy sends without shared secrets, with
an implementation that is not tokenproxy's: joserfc verifies every JWT here (tokenproxy signs
with PyJWT). It knows the client authentication methods of RFC 6749 2.3.1, RFC 7523 section 3
(client_secret_jwt, private_key_jwt, and a JWT made elsewhere as client_assertion) and RFC
8705 (tls_client_auth), and the grants client_credentials, RFC 7523 section 2.1 (jwt-bearer)
and RFC 8693 (token exchange).

What it checks, on its own clock (the test's JumpClock, which the daemon shares):
- a client assertion: the signature with the client's registered key (by kid when the header
  has one) or HS256 with its secret; iss == sub == client_id (== the form's client_id);
  aud equal to its audience (a string; the token endpoint URL unless told); exp in the
  future; iat not in the future and exp - iat <= 300 s; a jti never seen before (a replay
  is 400 invalid_client);
- tls_client_auth: the certificate the peer presented over TLS (the listener requires one)
  has the client's registered CN; a client bound to a certificate presents it whatever its
  method;
- jwt-bearer: the assertion, signed by an issuer it trusts, aud, exp, and (for assertions
  made by the client) lifetime and jti as above (a replay is 400 invalid_grant);
- token exchange: the subject token is a token it issued, a value it was told, or a JWT from
  an issuer it trusts; subject_token_type fits it; an actor token likewise.
- only one client authentication method per request (RFC 6749 2.3).

It records every call (form, headers, the verified assertion header and claims, the peer
certificate's CN, the outcome) and issues distinct access tokens with expires_in; an
upstream asks it whether a bearer token is one it issued and still valid."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import secrets
import ssl
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from joserfc import jwt
from joserfc.errors import JoseError, SecurityWarning
from joserfc.jwk import OctKey
from pytest_aiohttp import AiohttpServer

from tests.helpers.client import fetch
from tests.helpers.fakes import FakeClock, FakeUpstream, JumpClock, Seen
from tests.helpers.keys import JoseKey, write_file
from tests.helpers.logs import CapturedLogs, failures
from tests.helpers.tls import peer_cn
from tests.helpers.wait import wait_for, wait_ready
from tokenproxy.daemon import Daemon

CLIENT_ASSERTION_TYPE: Final = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_EXCHANGE: Final = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER: Final = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TT_JWT: Final = "urn:ietf:params:oauth:token-type:jwt"
TT_ACCESS: Final = "urn:ietf:params:oauth:token-type:access_token"
TT_ID: Final = "urn:ietf:params:oauth:token-type:id_token"
MAX_ASSERTION_LIFETIME: Final = 300
ASYMMETRIC_ALGS: Final = frozenset({"RS256", "PS256", "ES256", "ES384", "EdDSA", "Ed25519"})


class Refused(Exception):
    """An RFC 6749 5.2 error answer."""

    def __init__(self, error: str, description: str, status: int | None = None) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status or (401 if error == "invalid_client" else 400)


@dataclass
class Client:
    """A registered client. *method* is its token_endpoint_auth_method (RFC 7591):
    client_secret_basic, client_secret_post, client_secret_jwt, private_key_jwt,
    client_assertion (a JWT of a trusted issuer whose (iss, sub) is *federated*: workload
    identity federation), tls_client_auth or none."""

    client_id: str
    method: str
    secret: str | None = None
    keys: dict[str | None, JoseKey] = field(default_factory=dict)   # by kid (None: no kid)
    cert_cn: str | None = None     # the certificate it must present (any method)
    federated: tuple[str, str] | None = None
    expires_in: int | None = None  # its tokens' lifetime, if not the endpoint's


@dataclass
class Trusted:
    """An issuer of JWTs this endpoint accepts as jwt-bearer assertions, subject or actor
    tokens, or federated client assertions; *audience* is the aud they must carry (None:
    this endpoint's own audience). Assertions made by a client itself are held to the
    short lifetime and the jti rule (*own*)."""

    keys: dict[str | None, JoseKey]
    audience: str | None = None
    own: bool = False


@dataclass
class Call:
    """One token-endpoint call and what the endpoint made of it."""

    form: dict[str, str]
    headers: dict[str, str]
    peer_cn: str | None
    grant: str = ""
    method: str | None = None              # the client authentication method it saw
    client_id: str | None = None
    assertion_header: dict[str, Any] | None = None   # the client assertion, verified
    assertion_claims: dict[str, Any] | None = None
    grant_header: dict[str, Any] | None = None       # the jwt-bearer assertion, verified
    grant_claims: dict[str, Any] | None = None
    subject: str | None = None             # token exchange: "issued:<token>", "known:<label>"
                                           #   or "jwt:<sub>"
    actor: str | None = None
    status: int = 0
    error: str | None = None
    description: str | None = None
    token: str | None = None               # the access token issued


@dataclass
class Issued:
    token: str
    client_id: str | None
    grant: str
    expires_at: float
    call: Call


Fault = tuple[int, dict[str, Any]]


def _b64json(part: str) -> Any:
    return json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))


def jose_header(token: str) -> dict[str, Any]:
    """The (unverified) JOSE header of a compact JWT, to choose the key by."""
    try:
        head = _b64json(token.split(".")[0])
    except (ValueError, binascii.Error, IndexError):
        raise Refused("invalid_request", "not a JWT") from None
    if not isinstance(head, dict):
        raise Refused("invalid_request", "not a JWT")
    return head


def unverified_claims(token: str) -> dict[str, Any]:
    """The claims of a compact JWT, unverified (to find its issuer)."""
    try:
        doc = _b64json(token.split(".")[1])
    except (ValueError, binascii.Error, IndexError):
        raise Refused("invalid_grant", "not a JWT") from None
    if not isinstance(doc, dict):
        raise Refused("invalid_grant", "not a JWT")
    return doc


class AssertionIssuer:
    """The fake token endpoint at ``/token``, on the test's clock."""

    def __init__(self, clock: FakeClock, *, expires_in: int = 300,
                 audience: str | None = None, refresh_tokens: bool = False) -> None:
        self.clock = clock
        self.expires_in = expires_in
        self._audience = audience
        self.refresh_tokens = refresh_tokens     # put one in every answer (never to be used)
        self.clients: dict[str, Client] = {}
        self.trusted: dict[str, Trusted] = {}
        self.known_subjects: dict[str, tuple[str, str]] = {}   # value -> (label, token type)
        self.anonymous = True        # token exchange and jwt-bearer without a client
        self.calls: list[Call] = []
        self.issued: dict[str, Issued] = {}
        self.faults: list[Fault] = []
        self.hold: dict[str, asyncio.Event] = {}   # by grant_type: calls wait for the event
        self.refresh_issued: list[str] = []
        self.seen_jti: set[tuple[str, str]] = set()
        self.server: TestServer | None = None

    # -- setup --------------------------------------------------------------------------

    def register(self, client: Client) -> Client:
        self.clients[client.client_id] = client
        return client

    def trust(self, iss: str, key: JoseKey, *, kid: str | None = None,
              audience: str | None = None, own: bool = False) -> None:
        entry = self.trusted.setdefault(iss, Trusted({}, audience, own))
        entry.keys[kid] = key

    @property
    def url(self) -> str:
        assert self.server is not None, "not started"
        return f"{self.server.scheme}://127.0.0.1:{self.server.port}"

    @property
    def token_url(self) -> str:
        return self.url + "/token"

    @property
    def audience(self) -> str:
        """The aud a client assertion or jwt-bearer assertion must carry."""
        return self._audience or self.token_url

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/token", self.handle)
        return app

    # -- what the tests read ------------------------------------------------------------

    def ok_calls(self) -> list[Call]:
        return [c for c in self.calls if c.token is not None]

    def tokens(self) -> list[str]:
        return list(self.issued)

    def check_bearer(self, authorization: str) -> Issued:
        """The issued token an Authorization field carries; fails unless this endpoint
        issued it and it has not expired (by the clock)."""
        assert authorization.startswith("Bearer "), authorization
        issued = self.issued.get(authorization[7:])
        assert issued is not None, "a bearer token this endpoint never issued"
        assert issued.expires_at > self.clock.time(), "an expired token was presented"
        return issued

    # -- the endpoint -------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.Response:
        ctype = request.headers.get("Content-Type", "")
        form = {k: str(v) for k, v in (await request.post()).items()}
        assert request.transport is not None
        call = Call(form, {k.lower(): v for k, v in request.headers.items()},
                    peer_cn(request.transport.get_extra_info("peercert")),
                    grant=form.get("grant_type", ""))
        self.calls.append(call)
        held = self.hold.get(call.grant)
        if held is not None:
            await asyncio.wait_for(held.wait(), 10)
        if self.faults:
            call.status, doc = self.faults.pop(0)
            call.error = str(doc.get("error"))
            return web.json_response(doc, status=call.status)
        try:
            if not ctype.startswith("application/x-www-form-urlencoded"):
                raise Refused("invalid_request", f"content type {ctype!r}")
            client = self._authenticate(request, call)
            doc = self._grant(client, call)
        except Refused as exc:
            call.status, call.error, call.description = exc.status, exc.error, exc.description
            return web.json_response({"error": exc.error, "error_description": exc.description},
                                     status=exc.status, headers={"Cache-Control": "no-store"})
        call.status = 200
        return web.json_response(doc, headers={"Cache-Control": "no-store"})

    def _now(self) -> float:
        return self.clock.time()

    # -- client authentication ----------------------------------------------------------

    def _authenticate(self, request: web.Request, call: Call) -> Client | None:
        form = call.form
        auth = request.headers.get("Authorization", "")
        used = [name for name, present in (
            ("client_secret_basic", auth.startswith("Basic ")),
            ("client_secret_post", "client_secret" in form),
            ("jwt", "client_assertion" in form or "client_assertion_type" in form),
        ) if present]
        if len(used) > 1:
            raise Refused("invalid_request", f"more than one client authentication: {used}")
        form_id = form.get("client_id")
        if not used:
            if form_id is None:
                if call.grant in (TOKEN_EXCHANGE, JWT_BEARER) and self.anonymous:
                    call.method = "anonymous"
                    return None
                raise Refused("invalid_client", "no client authentication")
            client = self._client(form_id)
            call.client_id = form_id
            if client.method == "tls_client_auth":
                if call.peer_cn is None or call.peer_cn != client.cert_cn:
                    raise Refused("invalid_client",
                                  f"tls_client_auth: certificate CN {call.peer_cn!r}")
                call.method = "tls_client_auth"
            elif client.method == "none":
                call.method = "none"
            else:
                raise Refused("invalid_client", f"{client.method} client sent no credentials")
        elif used == ["client_secret_basic"]:
            try:
                raw = base64.b64decode(auth[6:], validate=True).decode()
            except (ValueError, binascii.Error):
                raise Refused("invalid_client", "malformed Basic credentials") from None
            cid, _, secret = raw.partition(":")
            client = self._client(unquote(cid))
            self._secret_method(client, "client_secret_basic", unquote(secret), call)
            if form_id is not None and form_id != client.client_id:
                raise Refused("invalid_request", "client_id differs from the Basic one")
        elif used == ["client_secret_post"]:
            client = self._client(form_id or "")
            self._secret_method(client, "client_secret_post", form["client_secret"], call)
        else:
            client = self._client_assertion(call)
        call.client_id = client.client_id
        if client.cert_cn is not None and call.peer_cn != client.cert_cn:
            raise Refused("invalid_client", f"certificate-bound client; CN {call.peer_cn!r}")
        return client

    def _client(self, client_id: str) -> Client:
        client = self.clients.get(client_id)
        if client is None:
            raise Refused("invalid_client", f"unknown client {client_id!r}")
        return client

    @staticmethod
    def _secret_method(client: Client, method: str, secret: str, call: Call) -> None:
        if client.method != method:
            raise Refused("invalid_client", f"{client.method} client used {method}")
        if client.secret is None or not secrets.compare_digest(secret, client.secret):
            raise Refused("invalid_client", "wrong client secret")
        call.method = method

    def _client_assertion(self, call: Call) -> Client:
        form = call.form
        if form.get("client_assertion_type") != CLIENT_ASSERTION_TYPE:
            raise Refused("invalid_request", "client_assertion_type")
        assertion = form.get("client_assertion", "")
        if not assertion:
            raise Refused("invalid_request", "client_assertion missing")
        client = self._client(form.get("client_id", ""))
        header = jose_header(assertion)
        alg = header.get("alg")
        if client.method == "client_secret_jwt":
            if alg != "HS256" or client.secret is None:
                raise Refused("invalid_client", f"client_secret_jwt with alg {alg!r}")
            claims = self._verify(assertion, {None: OctKey.import_key(client.secret)}, header,
                                  "invalid_client")
            self._own_assertion(claims, client.client_id, "invalid_client")
        elif client.method == "private_key_jwt":
            if alg not in ASYMMETRIC_ALGS:
                raise Refused("invalid_client", f"private_key_jwt with alg {alg!r}")
            claims = self._verify(assertion, client.keys, header, "invalid_client")
            self._own_assertion(claims, client.client_id, "invalid_client")
        elif client.method == "client_assertion":
            assert client.federated is not None
            iss, sub = client.federated
            claims = self._trusted_jwt(assertion, header, "invalid_client")
            if (claims.get("iss"), claims.get("sub")) != (iss, sub):
                raise Refused("invalid_client", "not the federated identity")
        else:
            raise Refused("invalid_client", f"{client.method} client sent a client assertion")
        call.method = client.method
        call.assertion_header, call.assertion_claims = header, claims
        return client

    def _verify(self, token: str, keys: Mapping[str | None, JoseKey | OctKey],
                header: dict[str, Any],
                error: str) -> dict[str, Any]:
        """The claims of *token*, its signature verified by joserfc with the key its kid
        names (or, without a kid, any of *keys*)."""
        alg = header.get("alg")
        if not isinstance(alg, str) or alg == "none":
            raise Refused(error, f"alg {alg!r}")
        kid = header.get("kid")
        if kid is not None:
            if kid not in keys:
                raise Refused(error, f"unknown kid {kid!r}")
            candidates = [keys[kid]]
        else:
            candidates = list(keys.values())
        for key in candidates:
            try:
                with warnings.catch_warnings():   # EdDSA: "deprecated via RFC 9864"
                    warnings.simplefilter("ignore", SecurityWarning)
                    claims = jwt.decode(token, key, algorithms=[alg]).claims
            except (JoseError, ValueError):
                continue
            return dict(claims)
        raise Refused(error, "signature not verified")

    def _times(self, claims: dict[str, Any], error: str, *, capped: bool) -> None:
        now = self._now()
        exp, iat = claims.get("exp"), claims.get("iat")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise Refused(error, "no exp")
        if exp <= now:
            raise Refused(error, "expired")
        nbf = claims.get("nbf")
        if isinstance(nbf, int | float) and nbf > now:
            raise Refused(error, "not yet valid")
        if capped:
            if not isinstance(iat, int | float) or isinstance(iat, bool):
                raise Refused(error, "no iat")
            if iat > now + 1:
                raise Refused(error, "iat in the future")
            if exp - iat > MAX_ASSERTION_LIFETIME:
                raise Refused(error, f"lifetime {exp - iat} s over {MAX_ASSERTION_LIFETIME}")

    def _own_assertion(self, claims: dict[str, Any], client_id: str, error: str) -> None:
        """RFC 7523 section 3 for a client's own assertion."""
        if claims.get("iss") != client_id or claims.get("sub") != client_id:
            raise Refused(error, "iss and sub must be the client_id")
        if claims.get("aud") != self.audience:
            raise Refused(error, f"aud {claims.get('aud')!r}")
        self._times(claims, error, capped=True)
        self._once(claims, error)

    def _once(self, claims: dict[str, Any], error: str) -> None:
        jti = claims.get("jti")
        if not isinstance(jti, str) or not jti:
            raise Refused(error, "no jti")
        key = (str(claims.get("iss")), jti)
        if key in self.seen_jti:
            raise Refused(error, "jti replayed")
        self.seen_jti.add(key)

    def _trusted_jwt(self, token: str, header: dict[str, Any], error: str
                     ) -> dict[str, Any]:
        """A JWT from an issuer this endpoint trusts: signature, aud, times (and, for a
        client's own assertion, lifetime and jti)."""
        iss = unverified_claims(token).get("iss")
        trusted = self.trusted.get(iss) if isinstance(iss, str) else None
        if trusted is None:
            raise Refused(error, f"untrusted issuer {iss!r}")
        claims = self._verify(token, trusted.keys, header, error)
        aud = claims.get("aud")
        want = trusted.audience or self.audience
        if not (aud == want or (isinstance(aud, list) and want in aud)):
            raise Refused(error, f"aud {aud!r}")
        self._times(claims, error, capped=trusted.own)
        if trusted.own:
            self._once(claims, error)
        return claims

    # -- grants -------------------------------------------------------------------------

    def _grant(self, client: Client | None, call: Call) -> dict[str, Any]:
        grant = call.grant
        if grant == "client_credentials":
            if client is None:
                raise Refused("invalid_client", "client_credentials needs a client")
        elif grant == JWT_BEARER:
            assertion = call.form.get("assertion", "")
            if not assertion:
                raise Refused("invalid_request", "assertion missing")
            header = jose_header(assertion)
            call.grant_header = header
            call.grant_claims = self._trusted_jwt(assertion, header, "invalid_grant")
        elif grant == TOKEN_EXCHANGE:
            call.subject = self._exchange_token(call.form, "subject", required=True)
            call.actor = self._exchange_token(call.form, "actor", required=False)
        elif grant == "refresh_token":
            raise Refused("invalid_grant", "this endpoint issues no refresh tokens to use")
        else:
            raise Refused("unsupported_grant_type", grant)
        return self._issue(client, call)

    def _exchange_token(self, form: dict[str, str], role: str, *, required: bool
                        ) -> str | None:
        value, kind = form.get(f"{role}_token"), form.get(f"{role}_token_type")
        if value is None:
            if kind is not None:
                raise Refused("invalid_request", f"{role}_token_type without {role}_token")
            if required:
                raise Refused("invalid_request", f"{role}_token missing")
            return None
        if not value or not kind:
            raise Refused("invalid_request", f"{role}_token and {role}_token_type needed")
        issued = self.issued.get(value)
        if issued is not None:
            if kind != TT_ACCESS:
                raise Refused("invalid_request", f"an access token as {kind}")
            if issued.expires_at <= self._now():
                raise Refused("invalid_grant", f"{role} token expired")
            return "issued:" + value
        if value in self.known_subjects:
            label, want = self.known_subjects[value]
            if kind != want:
                raise Refused("invalid_request", f"{label} as {kind}")
            return "known:" + label
        if kind not in (TT_JWT, TT_ID):
            raise Refused("invalid_request", f"unknown {role} token as {kind}")
        claims = self._trusted_jwt(value, jose_header(value), "invalid_grant")
        return f"jwt:{claims.get('sub')}"

    def _issue(self, client: Client | None, call: Call) -> dict[str, Any]:
        token = f"at-{len(self.issued) + 1:03d}-{secrets.token_hex(8)}"
        call.token = token
        cid = client.client_id if client is not None else None
        life = self.expires_in
        if client is not None and client.expires_in is not None:
            life = client.expires_in
        self.issued[token] = Issued(token, cid, call.grant, self._now() + life, call)
        doc: dict[str, Any] = {"access_token": token, "token_type": "Bearer",
                               "expires_in": life}
        if call.grant == TOKEN_EXCHANGE:
            doc["issued_token_type"] = TT_ACCESS
        if self.refresh_tokens:
            doc["refresh_token"] = "rt-" + secrets.token_hex(8)
            self.refresh_issued.append(doc["refresh_token"])
        return doc


StartIssuer = Callable[..., Awaitable[AssertionIssuer]]


async def start_issuer(aiohttp_server: AiohttpServer, clock: FakeClock, *,
                       tls: ssl.SSLContext | None = None, **kw: Any) -> AssertionIssuer:
    """An AssertionIssuer on 127.0.0.1 (over TLS with *tls*, a server context)."""
    issuer = AssertionIssuer(clock, **kw)
    issuer.server = await aiohttp_server(issuer.app(), ssl=tls)
    return issuer


@contextlib.asynccontextmanager
async def issuers(aiohttp_server: AiohttpServer, clock: FakeClock, logs: CapturedLogs
                  ) -> AsyncIterator[StartIssuer]:
    """What a test module's ``issuers`` fixture yields: start_issuer on the test's clock;
    afterwards no token any of them issued, nor any refresh token, may be in a log line."""
    started: list[AssertionIssuer] = []

    async def start(**kw: Any) -> AssertionIssuer:
        issuer = await start_issuer(aiohttp_server, clock, **kw)
        started.append(issuer)
        return issuer

    yield start
    text = logs.text
    leaked = [t for i in started for t in [*i.issued, *i.refresh_issued] if t in text]
    assert [] == leaked, "issued tokens leaked into logs"
    assertions = [v for i in started for c in i.calls
                  for k, v in c.form.items()
                  if k in ("client_assertion", "assertion", "subject_token", "actor_token")
                  and v in text]
    assert [] == assertions, "assertions or subject tokens leaked into logs"


# -- daemons that log in at it ------------------------------------------------------------


def provider_at(issuer: AssertionIssuer, ca: Path | None = None, /, **kw: Any
                ) -> dict[str, Any]:
    """An oauth2 provider whose token endpoint is *issuer*'s (trusting *ca* over TLS);
    refresh_margin 0, so that a token is renewed when it expires."""
    prov: dict[str, Any] = {"type": "oauth2", "token_url": issuer.token_url,
                            "refresh_margin": 0}
    if ca is not None:
        prov["ca_file"] = str(ca)
    prov.update(kw)
    return prov


def refreshed(logs: CapturedLogs, provider: str = "idp") -> int:
    """How many tokens *provider* has installed (token_refreshed events)."""
    return sum(1 for ev in logs.events("token_refreshed") if ev.get("provider") == provider)


def expire(clock: JumpClock, seconds: float = 301) -> None:
    """Move the clock *seconds* on, past the lifetime of the tokens the endpoint issued
    (300 s unless told): with refresh_margin 0 (provider_at) the next request through the
    route renews its provider's token."""
    clock.advance(seconds)


def bearer(seen: Seen) -> str:
    """The one Authorization field an upstream request carried."""
    [value] = seen.header("Authorization")
    return value


async def through(http: aiohttp.ClientSession, daemon: Daemon, upstream: FakeUpstream,
                  issuer: AssertionIssuer, path: str = "/x") -> Issued:
    """A request through the daemon: 200 from the upstream, which got a token *issuer*
    issued and that is still valid; that token's record."""
    resp = await fetch(http, daemon, path)
    assert 200 == resp.status, resp.text
    return issuer.check_bearer(bearer(upstream.last))


# -- files that break and mend ------------------------------------------------------------

# How a file read at each token request can become unusable: gone, empty, unreadable (a
# directory where the file was: the suite may run as root, who reads any mode), or a JWT
# whose own exp has passed by the daemon's clock.
BREAKAGES: Final = ("missing", "empty", "unreadable", "expired")


def break_file(path: Path, how: str, expired: str) -> None:
    """Make *path* unusable in the way *how* names (*expired*: an expired JWT)."""
    if how == "missing":
        path.unlink()
    elif how == "empty":
        write_file(path, "")
    elif how == "unreadable":
        path.unlink()
        path.mkdir()
    elif how == "expired":
        write_file(path, expired + "\n")
    else:
        raise ValueError(how)


def mend_file(path: Path, text: str) -> None:
    if path.is_dir():
        path.rmdir()
    write_file(path, text + "\n")


async def file_fails_then_heals(
    *, daemon: Daemon, http: aiohttp.ClientSession, clock: JumpClock, logs: CapturedLogs,
    issuer: AssertionIssuer, upstream: FakeUpstream, path: Path, how: str,
    fresh: Callable[[], str], expired: Callable[[float], str], key: str,
    provider: str = "idp", lifetime: float = 300,
) -> None:
    """The life of a file read at each token request (form field *key* carries it): the
    daemon is serving; the file breaks (*how*, one of BREAKAGES) and the token expires
    (*lifetime*); the renewal a request starts fails without a call at the endpoint --
    token_refresh_failed naming the path (and assertion_expired for an expired JWT) -- and
    the route answers 503 with Retry-After; the file is mended with *fresh*(); the next
    attempt, after the backoff, presents the new content and the route serves again.
    *expired*(now) makes a JWT that expires between now and the token's expiry."""
    await wait_ready(daemon)
    await through(http, daemon, upstream, issuer)
    calls = len(issuer.calls)
    break_file(path, how, expired(clock.time()))
    expire(clock, lifetime + 1)
    resp = await fetch(http, daemon)
    assert 503 == resp.status
    assert resp.headers.get("Retry-After", "").isdigit()
    await wait_for(lambda: bool(failures(logs)), "token_refresh_failed")
    error = failures(logs)[0]
    assert str(path) in error, error
    if how == "expired":
        [event] = logs.events("assertion_expired")[:1]
        assert (provider, str(path), "warning") == (event.get("provider"), event.get("path"),
                                                    event.get("level"))
    assert calls == len(issuer.calls), "the unusable file's content was presented"
    good = fresh()
    mend_file(path, good)
    clock.advance(float(daemon.source(provider).describe()["retry_in"]) + 0.06)
    issued = await through(http, daemon, upstream, issuer)
    assert good == issued.call.form[key]
