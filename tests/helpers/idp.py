"""The identity provider of the token tests: the real Issuer (tokenproxy/demo/issuer.py) with a
recording fault hook and a tap on its protected API, the faults it can be told to answer with,
an authorization server's metadata documents for discovery, and daemon configs whose provider
logs in at it."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from tests.helpers.fakes import CLIENT_SECRET, PASSWORD, FakeClock, JumpClock
from tests.helpers.wait import wait_for
from tokenproxy.demo.issuer import Issuer, _Family

Handler = Callable[[web.Request, str], Awaitable[web.StreamResponse | None]]
web_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# The password grant of the issuer's user, as provider keys.
PASSWORD_GRANT: dict[str, Any] = {"grant_type": "password", "username": "demo",
                                  "password": PASSWORD}


async def advance(clock: JumpClock, seconds: float, *, napping: int = 1) -> None:
    """Advance once the token loops sleep on the clock (so their deadline is registered
    before time moves), then let woken tasks run."""
    await wait_for(lambda: clock.napping() >= napping, f"{napping} sleeper(s) on the clock")
    await clock.tick(seconds)


def jwt(claims: Any) -> str:
    """A JWT-shaped token (header.payload.signature) carrying *claims*; not signed."""
    def part(doc: Any) -> str:
        raw = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}.c2ln"


# -- the issuer ------------------------------------------------------------------------------


@dataclass
class TokenCall:
    """One token-endpoint call as the issuer received it."""

    grant: str
    headers: dict[str, str]
    form: dict[str, str]
    json: Any


@dataclass
class Calls:
    """The issuer's fault hook: records every call, then lets a queued or default handler
    answer instead of the issuer (None lets the issuer answer)."""

    seen: list[TokenCall] = field(default_factory=list)
    queue: list[Handler] = field(default_factory=list)
    default: Handler | None = None
    entered: asyncio.Event = field(default_factory=asyncio.Event)

    async def __call__(self, request: web.Request, grant: str) -> web.StreamResponse | None:
        body = await request.read()
        form: dict[str, str] = {}
        doc: Any = None
        if grant.startswith("json_"):
            doc = json.loads(body) if body else None
        else:
            form = {k: str(v) for k, v in (await request.post()).items()}
        self.seen.append(TokenCall(grant, {k.lower(): v for k, v in request.headers.items()},
                                   form, doc))
        self.entered.set()
        handler = self.queue.pop(0) if self.queue else self.default
        if handler is None:
            return None
        return await handler(request, grant)

    def grants(self) -> list[str]:
        return [c.grant for c in self.seen]


def respond(status: int = 200, body: bytes | str = b"", *, content_type: str = "application/json",
            headers: dict[str, str] | None = None) -> Handler:
    """A fault answering with fixed bytes (raw text, so NaN or 1e999 go out as written)."""
    data = body.encode() if isinstance(body, str) else body

    async def handler(request: web.Request, grant: str) -> web.StreamResponse:
        return web.Response(status=status, body=data, content_type=content_type,
                            headers=headers)

    return handler


def respond_json(doc: Any, status: int = 200) -> Handler:
    return respond(status, json.dumps(doc))


# A token endpoint that is down for now (RFC 6749 temporarily_unavailable).
UNAVAILABLE = respond(503, '{"error": "temporarily_unavailable"}')


def gate(event: asyncio.Event, then: Handler | None = None) -> Handler:
    """A fault that holds the call until *event* is set, then lets *then* (or the issuer)
    answer."""
    async def handler(request: web.Request, grant: str) -> web.StreamResponse | None:
        await asyncio.wait_for(event.wait(), 10)
        return None if then is None else await then(request, grant)

    return handler


async def passthrough(request: web.Request, grant: str) -> None:
    """A queued fault that lets the issuer answer this call itself."""
    return None


def mint(issuer: Issuer, *, refresh: bool = False, user: str | None = None) -> dict[str, Any]:
    """A token document the issuer really issued (its API accepts the access token), for faults
    that alter an answer's other fields."""
    return issuer._issue(_Family(user or issuer.client_id), with_refresh=refresh)


def minted(issuer: Issuer, change: Callable[[dict[str, Any]], str]) -> Handler:
    """A fault that answers with a real token document rewritten by *change* into raw text."""
    async def handler(request: web.Request, grant: str) -> web.StreamResponse:
        return web.Response(body=change(mint(issuer)).encode(), content_type="application/json")

    return handler


@dataclass
class ApiSeen:
    method: str
    path: str
    bearer: str
    body: bytes


@dataclass
class ApiTap:
    """A middleware on the issuer's app watching its protected /api/: records each request,
    may hold one path until an event is set, may refuse a path with 401 whatever the token,
    and calls ``on_new_bearer`` the first time a token is presented."""

    seen: list[ApiSeen] = field(default_factory=list)
    hold: dict[str, asyncio.Event] = field(default_factory=dict)
    held: asyncio.Event = field(default_factory=asyncio.Event)
    deny: set[str] = field(default_factory=set)
    on_new_bearer: Callable[[str], None] | None = None
    _bearers: set[str] = field(default_factory=set)

    @web.middleware
    async def middleware(self, request: web.Request, handler: web_Handler) -> web.StreamResponse:
        if not request.path.startswith("/api/"):
            return await handler(request)
        body = await request.read()
        auth = request.headers.get("Authorization", "")
        bearer = auth[7:] if auth.startswith("Bearer ") else ""
        if bearer and bearer not in self._bearers:
            self._bearers.add(bearer)
            if self.on_new_bearer is not None:
                self.on_new_bearer(bearer)
        self.seen.append(ApiSeen(request.method, request.path, bearer, body))
        hold = self.hold.get(request.path)
        if hold is not None:
            self.held.set()
            await asyncio.wait_for(hold.wait(), 10)
        if request.path in self.deny:
            return web.Response(status=401, text="denied-by-upstream",
                                headers={"WWW-Authenticate": 'Bearer error="insufficient_scope"'})
        return await handler(request)

    def bearers(self, path: str | None = None) -> list[str]:
        return [s.bearer for s in self.seen if path is None or s.path == path]


@dataclass
class Idp:
    issuer: Issuer
    calls: Calls
    tap: ApiTap
    server: TestServer

    @property
    def url(self) -> str:
        return self.issuer.base_url

    @property
    def token_url(self) -> str:
        return self.url + "/oauth/token"


# The ``start`` fixture (tests/conftest.py): start_idp on the test's clock, with a leak check.
StartIdp = Callable[..., Awaitable[Idp]]


async def start_idp(aiohttp_server: AiohttpServer, clock: FakeClock, **kw: Any) -> Idp:
    """The real Issuer on 127.0.0.1 with the test clock, CLIENT_SECRET and the user
    demo/PASSWORD; every token call recorded."""
    kw.setdefault("client_secret", CLIENT_SECRET)
    kw.setdefault("users", {"demo": PASSWORD})
    issuer = Issuer(clock=clock, **kw)
    calls, tap = Calls(), ApiTap()
    issuer.fault = calls
    app = issuer.app()
    app.middlewares.append(tap.middleware)
    server = await aiohttp_server(app)
    issuer.base_url = f"http://127.0.0.1:{server.port}"
    return Idp(issuer, calls, tap, server)


async def password_grant(idp: Idp) -> dict[str, Any]:
    """Log in directly at the issuer (as a user would have before configuring tokenproxy)."""
    async with aiohttp.ClientSession() as s, s.post(idp.token_url, data={
        "grant_type": "password", "username": "demo", "password": PASSWORD,
        "client_id": idp.issuer.client_id, "client_secret": idp.issuer.client_secret,
    }) as r:
        assert 200 == r.status
        doc: dict[str, Any] = await r.json()
    return doc


# -- discovery metadata ----------------------------------------------------------------------


class MetadataServer:
    """An authorization server's metadata documents at chosen locations (a path issuer's
    server publishing only some of them), or any handler at a path; other paths answer
    *status*. Records every request (path and query) and the Authorization headers it saw."""

    def __init__(self) -> None:
        self.routes: dict[str, web_Handler] = {}
        self.status = 404
        self.seen: list[str] = []
        self.auth: list[str] = []
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request.path_qs)
        if "Authorization" in request.headers:
            self.auth.append(request.headers["Authorization"])
        await request.read()
        handler = self.routes.get(request.path)
        if handler is None:
            return web.Response(status=self.status)
        return await handler(request)

    @property
    def issuer(self) -> str:
        """An issuer with a path (/o) on this server."""
        return self.url + "/o"

    def doc(self, path: str, doc: Any) -> None:
        """Answer *path* with *doc* as JSON."""
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.json_response(doc)

        self.routes[path] = handler


async def start_metadata(aiohttp_server: AiohttpServer) -> MetadataServer:
    """A MetadataServer on 127.0.0.1, answering every method on every path."""
    meta = MetadataServer()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", meta.handle)
    server = await aiohttp_server(app)
    meta.url = f"http://127.0.0.1:{server.port}"
    return meta


# -- configs ---------------------------------------------------------------------------------


def config(provider: dict[str, Any], upstream: str, tmp_path: Path, **top: Any) -> dict[str, Any]:
    """One provider ``idp`` and a route / to *upstream*, on ephemeral loopback ports."""
    raw: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "state_path": str(tmp_path / "state.json"),
        "providers": {"idp": provider},
        "routes": [{"prefix": "/", "upstream": upstream, "provider": "idp"}],
    }
    raw.update(top)
    return raw


def oauth2(idp: Idp | Issuer, **kw: Any) -> dict[str, Any]:
    """An oauth2 provider (client_credentials unless *kw* says else) at the issuer."""
    issuer = idp.issuer if isinstance(idp, Idp) else idp
    prov: dict[str, Any] = {"type": "oauth2", "token_url": issuer.base_url + "/oauth/token",
                            "client_id": issuer.client_id, "client_secret": CLIENT_SECRET}
    prov.update(kw)
    return prov


def oauth2_config(idp: Idp | Issuer, tmp_path: Path, *, upstream: str | None = None,
                  top: Any = None, **provider: Any) -> dict[str, Any]:
    """A daemon whose provider ``idp`` logs in at the issuer and whose route / goes to the
    issuer's protected API (unless *upstream* says else)."""
    issuer = idp.issuer if isinstance(idp, Idp) else idp
    return config(oauth2(issuer, **provider), upstream or issuer.base_url + "/api/", tmp_path,
                  **(top or {}))


def issuer_config(idp: Idp, issuer: str, tmp_path: Path, **provider: Any) -> dict[str, Any]:
    """oauth2_config with *issuer* to discover the token endpoint from, and no token_url."""
    prov = oauth2(idp, **provider)
    del prov["token_url"]
    prov["issuer"] = issuer
    return config(prov, idp.url + "/api/", tmp_path)


def password_grant_config(issuer: Issuer, state: Path, margin: str) -> dict[str, Any]:
    """A daemon config whose oauth2 provider logs in with the password grant at *issuer* and
    refreshes *margin* before expiry, its state in *state*, on ephemeral ports."""
    raw = oauth2_config(issuer, state.parent, grant_type="password", username="demo",
                        password=PASSWORD, refresh_margin=margin)
    raw["state_path"] = str(state)
    return raw


def state_entry(path: Path) -> dict[str, Any]:
    """The single provider entry of a state file."""
    doc = json.loads(path.read_text())
    [value] = doc["providers"].values()
    assert isinstance(value, dict)
    return value
