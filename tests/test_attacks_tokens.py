"""Attacks on the token handling (docs/tokens.md, docs/metrics.md): the storm guard and the
revocation heal, per-call token metrics, discovery, ``check-config --online``, config
suggestions and secret files, problem answers and the allocator tuning -- by hostile local
clients, issuers and upstreams.

Everything runs on 127.0.0.1 with bounded waits; the daemons share the fake clock, so the 5 s
storm-guard window never passes unless a test moves the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import re
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from tests.helpers.config import MakeProxy
from tests.helpers.fakes import CLIENT_SECRET, PASSWORD, SECRETS, JumpClock
from tests.helpers.idp import Idp, config, oauth2, oauth2_config, start_idp
from tests.helpers.logs import CapturedLogs
from tests.helpers.metrics import count, refreshes
from tests.helpers.rawhttp import RawConnection, get
from tests.helpers.rawupstream import UpConn, read_request, response
from tests.helpers.wait import readyz, wait_for, wait_ready
from tokenproxy.daemon import Daemon

StartIdp = Callable[..., Awaitable[Idp]]


@pytest.fixture(name="clock")
def _clock() -> JumpClock:
    """The daemons and the issuer share this clock (make_proxy takes it by name)."""
    return JumpClock()


@pytest.fixture(name="start")
async def _start(
    aiohttp_server: AiohttpServer, clock: JumpClock, logs: CapturedLogs
) -> AsyncIterator[StartIdp]:
    """Start issuers; afterwards no token any of them issued may appear in a log line."""
    idps: list[Idp] = []

    async def start(**kw: Any) -> Idp:
        idp = await start_idp(aiohttp_server, clock, **kw)
        idps.append(idp)
        return idp

    yield start
    for idp in idps:
        issued = [*idp.issuer._access, *idp.issuer._refresh]
        leaked = [t for t in issued if t in logs.text]
        assert [] == leaked, "issued tokens leaked into logs"


@pytest.fixture(name="http")
async def _http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


async def status_of(http: aiohttp.ClientSession, daemon: Daemon, path: str) -> int:
    async with http.get(f"http://127.0.0.1:{daemon.port()}{path}",
                        timeout=aiohttp.ClientTimeout(total=5)) as r:
        await r.read()
        return r.status


PASSWORD_GRANT: dict[str, Any] = {"grant_type": "password", "username": "demo",
                                  "password": PASSWORD}


# -- 1. the revocation heal ------------------------------------------------------------------


async def test_a_revocation_right_after_a_scope_401_heals_on_another_path(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    """The issue's sequence: a path answering 401 for scope, then a revocation at the
    issuer, then a request on another path: 200 at once. The fresh token of the scope 401's
    refresh was revoked before any request carried it successfully, so "has the token been
    accepted since" cannot tell revocation from scope; where the 401 came from can (/deny
    refused a fresh token, /ok did not: tokens/guard.py)."""
    idp = await start()
    idp.tap.deny.add("/api/deny")
    daemon = await make_proxy(oauth2_config(idp, tmp_path, **PASSWORD_GRANT))
    await wait_ready(daemon)
    assert 200 == await status_of(http, daemon, "/ok")     # the deployment has been serving
    assert 401 == await status_of(http, daemon, "/deny")   # scope: refreshed once, refused
    assert ["password", "refresh_token"] == idp.calls.grants()
    idp.issuer.revoke_access()
    assert 200 == await status_of(http, daemon, "/ok"), (
        "401 passed back: the revoked token is not healed for 5 s")


async def test_a_polled_scope_path_does_not_spend_the_heal(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    """A client polling a path it lacks the scope for, among successful requests, does
    not spend the once-per-window heal on that path's 401s (it is a known refuser): a real
    revocation afterwards still heals on /ok at once, with one token call."""
    idp = await start()
    idp.tap.deny.add("/api/deny")
    daemon = await make_proxy(oauth2_config(idp, tmp_path, **PASSWORD_GRANT))
    await wait_ready(daemon)
    assert 200 == await status_of(http, daemon, "/ok")
    assert 401 == await status_of(http, daemon, "/deny")   # refresh (the storm guard's one)
    assert 200 == await status_of(http, daemon, "/ok")     # the fresh token is accepted
    assert 401 == await status_of(http, daemon, "/deny")   # spends the "revocation" refresh
    assert 200 == await status_of(http, daemon, "/ok")     # ...and /ok accepts that one too
    calls = len(idp.calls.seen)
    idp.issuer.revoke_access()
    assert 200 == await status_of(http, daemon, "/ok"), (
        "a token /ok accepted a moment ago is refused on /ok, and the 401 is passed back")
    assert calls + 1 == len(idp.calls.seen)


async def test_interleaved_scope_401s_under_concurrency_stay_bounded(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    """Held: 8 rounds of 30 concurrent requests, two thirds on two scope-refused paths and
    one third accepted, make at most the first token, the 401's refresh and one "revocation"
    refresh inside the window: the heal is no refresh storm."""
    idp = await start()
    idp.tap.deny.update({"/api/deny", "/api/deny2"})
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    for _ in range(8):
        statuses = await asyncio.gather(
            *[status_of(http, daemon, "/deny" if i % 3 == 0 else "/deny2" if i % 3 == 1
                        else "/ok") for i in range(30)])
        assert {200, 401} >= set(statuses)
    assert len(idp.calls.seen) <= 3, idp.calls.grants()
    assert 0 == idp.issuer.stats.reuse_detected


async def test_heal_after_family_revocation_spends_no_refresh_token_twice(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    """Held: 20 concurrent requests at a revoked token family (rotating refresh tokens with
    reuse detection) make one refresh (rejected) and one login, all answered 200; the
    rejection is counted as such and the login as a success."""
    idp = await start()
    daemon = await make_proxy(oauth2_config(idp, tmp_path, **PASSWORD_GRANT))
    await wait_ready(daemon)
    assert 200 == await status_of(http, daemon, "/ok")
    idp.issuer.revoke_all()
    statuses = await asyncio.gather(*[status_of(http, daemon, f"/ok{i}") for i in range(20)])
    assert [200] * 20 == statuses
    assert ["password", "refresh_token", "password"] == idp.calls.grants()
    assert 0 == idp.issuer.stats.reuse_detected
    assert 1 == refreshes(daemon, "unauthorized", "rejected", grant="refresh_token")
    assert 1 == refreshes(daemon, "unauthorized", "success", grant="password")


# -- 3. auth_retries_total against the access log's retried --------------------------------


def retried_upstream(after_401: str) -> Callable[..., Awaitable[None]]:
    """A raw upstream: the very first request gets 401; every later one is answered as
    *after_401* says -- "reset": the connection is cut without an answer; "hang": no answer."""
    state = {"n": 0}

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        while (req := await read_request(reader, conn)) is not None:
            del req
            state["n"] += 1
            if state["n"] == 1:
                writer.write(response(b"no", "401 Unauthorized"))
                await writer.drain()
                continue
            if after_401 == "hang":
                await reader.read()   # until the proxy gives up and closes
            writer.transport.abort()
            return

    return script


def retry_counts(daemon: Daemon) -> dict[str, float]:
    return {o: count(daemon, "tokenproxy_auth_retries_total", route="/", outcome=o)
            for o in ("success", "failure", "upstream_error", "skipped", "no_new_token")}


@pytest.mark.slow
@pytest.mark.both_paths
@pytest.mark.parametrize("after_401", ["reset", "hang"])
async def test_a_retry_that_fails_upstream_is_counted_as_upstream_error(
    start: StartIdp, make_proxy: MakeProxy, raw_upstream: Any, tmp_path: Path,
    http: aiohttp.ClientSession, logs: CapturedLogs, after_401: str,
) -> None:
    """A request refused with 401, sent again with a fresh token, whose second attempt
    then fails upstream (reset: 502; no answer: 504) is logged ``retried: true`` and counted
    once, as ``upstream_error``: the outcomes of sent-again requests are exactly the requests
    the access log shows retried, on both paths."""
    up = await raw_upstream(retried_upstream(after_401))
    raw = oauth2_config(idp := await start(), tmp_path, upstream=up.url())
    raw["routes"][0]["timeout"] = "1s"
    daemon = await make_proxy(raw)
    await wait_ready(daemon)
    status = await status_of(http, daemon, "/x")
    assert status == (502 if after_401 == "reset" else 504)
    assert 2 == len(idp.calls.seen)   # the first token and the 401's refresh
    await wait_for(lambda: bool(logs.events("request")), "the access log line")
    [event] = logs.events("request")
    assert event["retried"] is True
    counts = retry_counts(daemon)
    assert 1 == counts["upstream_error"] == sum(counts.values()), counts


@pytest.mark.both_paths
@pytest.mark.parametrize("issuer_answer", [500, 400])
async def test_a_401_whose_refresh_fails_is_counted_as_no_new_token(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    issuer_answer: int,
) -> None:
    """A 401 whose refresh then fails -- the token endpoint down (503 token_unavailable)
    or rejecting the client (502 unauthenticated) -- is not sent again because no newer token
    could be had, and is counted so (``no_new_token``): the one situation where the 401s
    matter most is not invisible in the metric."""
    from tests.helpers.idp import respond_json

    idp = await start()
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    idp.issuer.revoke_access()
    idp.calls.default = respond_json({"error": "server_error" if issuer_answer == 500
                                      else "invalid_client"}, issuer_answer)
    assert (503 if issuer_answer == 500 else 502) == await status_of(http, daemon, "/ok")
    assert 1 == sum(retry_counts(daemon).values()), retry_counts(daemon)


@pytest.mark.both_paths
async def test_retry_outcomes_agree_with_the_log_for_refused_skipped_and_no_new_token(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    logs: CapturedLogs,
) -> None:
    """Held: a scope 401 (retried once: failure), the next one inside the window
    (no_new_token), a streamed body's 401 (skipped) and a revoked token (success) are each
    counted once, and success+failure equals the requests logged ``retried: true``."""
    idp = await start()
    idp.tap.deny.add("/api/deny")
    raw = oauth2_config(idp, tmp_path, top={"limits": {"max_replay_body": "1KiB"}})
    daemon = await make_proxy(raw)
    await wait_ready(daemon)
    assert 401 == await status_of(http, daemon, "/deny")
    assert 401 == await status_of(http, daemon, "/deny")
    async with http.post(f"http://127.0.0.1:{daemon.port()}/deny", data=b"x" * 4096) as r:
        await r.read()
        assert 401 == r.status
    assert 200 == await status_of(http, daemon, "/ok")
    idp.issuer.revoke_access()
    assert 200 == await status_of(http, daemon, "/ok")
    await wait_for(lambda: len(logs.events("request")) == 5, "five access log lines")
    counts = retry_counts(daemon)
    retried = sum(1 for e in logs.events("request") if e["retried"])
    assert counts["success"] + counts["failure"] + counts["upstream_error"] == retried
    assert {"success": 1, "failure": 1, "upstream_error": 0, "skipped": 1,
            "no_new_token": 1} == counts


# -- problem answers: bytes and HEAD --------------------------------------------------------


async def test_a_head_answered_by_tokenproxy_gets_no_body(
    start: StartIdp, make_proxy: MakeProxy, raw_upstream: Any, tmp_path: Path,
) -> None:
    """A HEAD request that tokenproxy answers itself (here 502 upstream_unreachable; 503
    token_unavailable alike) gets the head alone, on a connection kept alive. A HEAD response
    has no body (RFC 9110 section 9.3.2): body bytes would be read as the start of the next
    response on that connection."""
    from tests.helpers.config import proxy_config
    from tests.helpers.fakes import TOKEN

    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()   # nothing listens there: connection refused
    daemon = await make_proxy(proxy_config(f"http://127.0.0.1:{port}/", TOKEN))
    conn = await RawConnection.open(daemon.port())
    try:
        await conn.send(get("/x", "localhost", method="HEAD"))
        first = await conn.response(head_only=True)
        assert 502 == first.status
        keep = first.get("Connection") != "close"
        await conn.send(get("/y"))
        if keep:
            try:
                second = await conn.response()
            except ValueError as exc:   # the status line was the HEAD answer's body
                raise AssertionError(f"the next response is garbage: {exc}") from None
            assert 502 == second.status
        else:
            assert await conn.wait_closed(1.0) is not None
            assert b"" == conn.trailing, "HEAD answered with a body"
    finally:
        await conn.close()


# -- 2. discovery ------------------------------------------------------------------------------

OPENID = "/o/.well-known/openid-configuration"
RFC8414 = "/.well-known/oauth-authorization-server/o"
APPENDED = "/o/.well-known/oauth-authorization-server"
Handle = Callable[[web.Request], Awaitable[web.StreamResponse]]


class MetaServer:
    """A server on 127.0.0.1 answering chosen paths with chosen handlers (others: *status*),
    recording every request it gets and the Authorization headers it saw."""

    def __init__(self) -> None:
        self.routes: dict[str, Handle] = {}
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
        return self.url + "/o"

    def doc(self, path: str, doc: Any) -> None:
        async def handler(request: web.Request) -> web.StreamResponse:
            return web.json_response(doc)

        self.routes[path] = handler


@pytest.fixture(name="servers")
async def _servers(aiohttp_server: AiohttpServer) -> Callable[[], Awaitable[MetaServer]]:
    async def make() -> MetaServer:
        meta = MetaServer()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", meta.handle)
        server = await aiohttp_server(app)
        meta.url = f"http://127.0.0.1:{server.port}"
        return meta

    return make


def issuer_config(idp: Idp, issuer: str, tmp_path: Path, **provider: Any) -> dict[str, Any]:
    prov = oauth2(idp, **provider)
    del prov["token_url"]
    prov["issuer"] = issuer
    return config(prov, idp.url + "/api/", tmp_path)


async def provider_state(daemon: Daemon, within: float = 5.0,
                         states: tuple[str, ...] = ("misconfigured", "backoff", "valid")) -> str:
    """The provider's /readyz state once it is one of *states* (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        _, doc = await readyz(daemon)
        state = str(doc["providers"]["idp"]["state"])
        if state in states or loop.time() > deadline:
            return state
        await asyncio.sleep(0.02)


async def test_discovery_never_follows_a_redirect_to_another_host(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path,
    servers: Callable[[], Awaitable[MetaServer]],
) -> None:
    """Held: a metadata location redirecting to another host is not followed (the host
    never sees a request), and neither is a discovered token endpoint that redirects with
    307 (which would re-post the client secret): the secret reaches no other host."""
    idp = await start()
    meta, evil = await servers(), await servers()

    async def to_evil(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(evil.url + "/.well-known/openid-configuration")

    meta.routes[OPENID] = to_evil
    daemon = await make_proxy(issuer_config(idp, meta.issuer, tmp_path))
    assert "misconfigured" == await provider_state(daemon)
    assert [] == evil.seen

    meta2 = await servers()
    meta2.doc(OPENID, {"issuer": meta2.issuer, "token_endpoint": meta2.url + "/token"})

    async def token_to_evil(request: web.Request) -> web.StreamResponse:
        raise web.HTTPTemporaryRedirect(evil.url + "/token")

    meta2.routes["/token"] = token_to_evil
    other = await make_proxy(issuer_config(idp, meta2.issuer, tmp_path / "2"))
    assert "backoff" == await provider_state(other)
    assert [] == evil.seen
    assert meta2.auth
    assert all(CLIENT_SECRET not in a for a in meta2.auth)


async def test_an_unused_endpoint_with_a_query_does_not_fail_discovery(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    servers: Callable[[], Awaitable[MetaServer]],
) -> None:
    """An authorization_endpoint (or userinfo, revocation) with a query, as RFC 6749
    section 3.1 allows and Azure AD B2C publishes, is left out; the document is used for its
    token_endpoint, which alone is checked strictly."""
    idp = await start()
    meta = await servers()
    meta.doc(OPENID, {"issuer": meta.issuer, "token_endpoint": idp.token_url,
                      "authorization_endpoint": meta.url + "/authorize?p=b2c_1_signin"})
    daemon = await make_proxy(issuer_config(idp, meta.issuer, tmp_path))
    assert "valid" == await provider_state(daemon)
    assert 200 == await status_of(http, daemon, "/ok")


async def test_an_oversized_metadata_answer_is_a_misconfiguration(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, clock: JumpClock,
    servers: Callable[[], Awaitable[MetaServer]],
) -> None:
    """A web app's catch-all answering 200 with a page over the size limit at every
    metadata location is an answer, not an outage: the provider is misconfigured (502,
    /readyz says so), not retried every minute for ever."""
    idp = await start()
    meta = await servers()
    page = b"<html>" + b"x" * 70_000 + b"</html>"

    async def spa(request: web.Request) -> web.StreamResponse:
        return web.Response(body=page, content_type="text/html")

    for path in (OPENID, RFC8414, APPENDED):
        meta.routes[path] = spa
    daemon = await make_proxy(issuer_config(idp, meta.issuer, tmp_path))
    assert "misconfigured" == await provider_state(daemon)


@pytest.mark.slow
async def test_a_compressed_metadata_bomb_is_refused_with_bounded_memory(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path,
    servers: Callable[[], Awaitable[MetaServer]],
) -> None:
    """Held: a gzip answer of 200 KB that inflates to 200 MB is cut off at the 64 KiB cap
    after at most a few MiB of Python allocations, and the provider does not get a token."""
    import tracemalloc

    idp = await start()
    meta = await servers()
    bomb = gzip.compress(b"{" + b" " * 200_000_000, compresslevel=9)

    async def gz(request: web.Request) -> web.StreamResponse:
        return web.Response(body=bomb, headers={"Content-Encoding": "gzip",
                                                "Content-Type": "application/json"})

    for path in (OPENID, RFC8414, APPENDED):
        meta.routes[path] = gz
    tracemalloc.start()
    try:
        daemon = await make_proxy(issuer_config(idp, meta.issuer, tmp_path))
        state = await provider_state(daemon)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert state in ("misconfigured", "backoff")
    assert peak < 40 * 1024 * 1024, peak
    assert [] == idp.calls.seen


@pytest.mark.slow
async def test_a_trickling_metadata_server_is_bounded_by_the_provider_timeout(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    logs: CapturedLogs, servers: Callable[[], Awaitable[MetaServer]],
) -> None:
    """Held: locations that send one byte every 100 ms for ever cost one provider timeout
    each (1 s here), then an outage with backoff whose log names every URL; a request
    meanwhile waits no longer than that and gets 503."""
    idp = await start()
    meta = await servers()

    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(100):
                await resp.write(b" ")
                await asyncio.sleep(0.1)
        return resp

    for path in (OPENID, RFC8414, APPENDED):
        meta.routes[path] = trickle
    started = time.monotonic()
    daemon = await make_proxy(issuer_config(idp, meta.issuer, tmp_path, timeout="1s"))
    assert 503 == await status_of(http, daemon, "/ok")
    assert "backoff" == await provider_state(daemon, within=6)
    assert time.monotonic() - started < 6
    [failed] = [e for e in logs.events("token_refresh_failed") if e.get("grant") == "discovery"]
    for path in (OPENID, RFC8414, APPENDED):
        assert f"{meta.url}{path} ({meta.url.split('//')[0]}//" in failed["error"]
    assert "no answer within 1s" in failed["error"]


@pytest.mark.parametrize("answers", [
    (404, 503, 404), (404, 429, 404), (404, 404, 502), ("wrong issuer", 503, 404),
])
async def test_discovery_with_any_5xx_or_429_is_an_outage(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path,
    servers: Callable[[], Awaitable[MetaServer]], answers: tuple[Any, ...],
) -> None:
    """Held: one location failing with 5xx or 429 among 404s (or a document for another
    issuer) keeps the provider in backoff, never in the stuck misconfigured state."""
    idp = await start()
    meta = await servers()
    for path, answer in zip((OPENID, RFC8414, APPENDED), answers, strict=True):
        if answer == "wrong issuer":
            meta.doc(path, {"issuer": "http://evil.example/o",
                            "token_endpoint": "http://evil.example/token"})
        elif answer != 404:
            async def fail(request: web.Request, status: int = answer) -> web.StreamResponse:
                return web.Response(status=status)
            meta.routes[path] = fail
    daemon = await make_proxy(issuer_config(idp, meta.issuer, tmp_path))
    assert "backoff" == await provider_state(daemon)


async def test_discovery_of_an_unresolvable_host_is_an_outage(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path,
) -> None:
    """Held: a host name that does not resolve (or cannot be resolved here in time) is an
    outage with backoff, not a configuration problem."""
    idp = await start()
    daemon = await make_proxy(issuer_config(idp, "http://tokenproxy-review.invalid/o",
                                            tmp_path, timeout="1s"))
    assert "backoff" == await provider_state(daemon, within=8,
                                             states=("misconfigured", "backoff"))


def test_discovery_urls_stay_on_the_issuers_origin() -> None:
    """Held: whatever the issuer's path holds (dots, encoded slashes, an '@', IPv6, ports,
    trailing slashes, upper case), every metadata URL has the issuer's scheme and netloc."""
    from urllib.parse import urlsplit

    from tokenproxy.tokens.discovery import discovery_urls

    for issuer in ("https://h/o", "https://h/o/", "https://h", "https://h:8443/a/b//",
                   "https://[::1]:8443/o", "https://h/o@evil.example", "https://h/a%2F..%2Fb",
                   "https://h/../../evil.example/", "HTTPS://H/o", "https://h/o;x=@evil"):
        want = urlsplit(issuer)
        for url in discovery_urls(issuer):
            got = urlsplit(url)
            assert (want.scheme.lower(), want.netloc) == (got.scheme, got.netloc), (issuer, url)


def test_metadata_refuses_a_downgrade_userinfo_and_another_issuer() -> None:
    """Held: under an https issuer an http token_endpoint is refused, so are credentials in
    it, and a document for another issuer (case, port, path) is refused."""
    from tokenproxy.config.values import parse_http_url
    from tokenproxy.tokens.discovery import parse_metadata

    issuer = parse_http_url("https://idp.example/o", "issuer")
    for bad in ({"issuer": "https://idp.example/o", "token_endpoint": "http://idp.example/t"},
                {"issuer": "https://idp.example/o", "token_endpoint": "HTTP://idp.example/t"},
                {"issuer": "https://idp.example/o",
                 "token_endpoint": "https://u:p@idp.example/t"},
                {"issuer": "https://IDP.example/o", "token_endpoint": "https://idp.example/t"},
                {"issuer": "https://idp.example:443/o",
                 "token_endpoint": "https://idp.example/t"},
                {"issuer": "https://idp.example/o/x", "token_endpoint": "https://idp.example/t"},
                {"issuer": ["https://idp.example/o"], "token_endpoint": "https://idp.example/t"},
                {"issuer": "https://idp.example/o", "token_endpoint": 7}):
        with pytest.raises(ValueError, match=r"issuer|token_endpoint"):
            parse_metadata(bad, issuer)


# -- check-config --online ---------------------------------------------------------------------


async def run_cli(directory: Path, *args: str, timeout: float = 20.0) -> tuple[int, str, float]:
    """``python -m tokenproxy ARGS`` in a child process (so this loop keeps serving the
    issuer): exit code, stdout+stderr, seconds taken."""
    from tests.helpers.daemon_proc import child_env

    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenproxy", *args, cwd=directory, env=child_env(directory),
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"tokenproxy {' '.join(args)} hung for {timeout}s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace"), time.monotonic() - started


def write_private(directory: Path, raw: dict[str, Any]) -> Path:
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / "tokenproxy.yaml"
    path.write_text(json.dumps(raw), encoding="utf-8")
    path.chmod(0o600)
    return path


@pytest.mark.slow
async def test_online_check_prints_no_secret_spends_no_refresh_token_writes_nothing(
    start: StartIdp, tmp_path: Path,
) -> None:
    """Held: --online with a discovered password-grant provider and a refresh-token-only
    provider prints neither the issued tokens nor any credential, does not exchange the
    refresh token (the issuer's family keeps it live and unspent), creates no state file
    and exits 0."""
    from tests.helpers.idp import password_grant

    idp = await start()
    login = await password_grant(idp)
    family = idp.issuer._refresh[login["refresh_token"]]
    directory = tmp_path / "cfg"
    prov = oauth2(idp, **PASSWORD_GRANT)
    del prov["token_url"]
    prov["issuer"] = idp.url
    raw = config(prov, idp.url + "/api/", directory)
    raw["providers"]["rt"] = oauth2(idp, grant_type="refresh_token",
                                    refresh_token=login["refresh_token"])
    path = write_private(directory, raw)
    before = len(idp.calls.seen)
    code, out, _ = await run_cli(directory, "check-config", "--online", "-c", str(path))
    assert 0 == code, out
    assert "idp: ok (expires in" in out
    assert f"token endpoint {idp.token_url} (discovered)" in out
    issued = [*idp.issuer._access, *idp.issuer._refresh]
    assert [] == [s for s in (*SECRETS, *issued) if s in out]
    assert ["password"] == idp.calls.grants()[before:]
    assert (False, login["refresh_token"], set()) == (
        family.revoked, family.live_refresh, family.spent)
    assert not (directory / "state.json").exists()


@pytest.mark.slow
async def test_online_check_of_a_hanging_token_endpoint_ends_and_fails(
    start: StartIdp, tmp_path: Path,
) -> None:
    """Held: a token endpoint that never answers costs the provider's timeout, then exit 1
    naming the host and the wait."""
    from tests.helpers.idp import gate

    idp = await start()
    idp.calls.default = gate(asyncio.Event())   # held until the test ends
    directory = tmp_path / "cfg"
    path = write_private(directory, oauth2_config(idp, directory, timeout="1s"))
    code, out, took = await run_cli(directory, "check-config", "--online", "-c", str(path))
    assert 1 == code, out
    assert f"failed: {idp.url}: no answer within 1s" in out
    assert took < 8


@pytest.mark.slow
async def test_online_check_leaves_a_state_file_it_cannot_read_in_place(
    start: StartIdp, tmp_path: Path,
) -> None:
    """``check-config --online`` writes nothing to the state file: one it cannot read (an
    unknown schema version, as a newer tokenproxy may write) stays where it is, and the
    running daemon keeps its tokens."""
    idp = await start()
    directory = tmp_path / "cfg"
    path = write_private(directory, oauth2_config(idp, directory))
    state = directory / "state.json"
    newer = json.dumps({"version": 2, "providers": {}, "future": True})
    state.write_text(newer, encoding="utf-8")
    state.chmod(0o600)
    code, out, _ = await run_cli(directory, "check-config", "--online", "-c", str(path))
    assert 0 == code, out
    assert state.exists(), f"moved aside: {sorted(p.name for p in directory.iterdir())}"
    assert newer == state.read_text(encoding="utf-8")


@pytest.mark.slow
async def test_online_check_escapes_control_characters_from_the_metadata(
    start: StartIdp, tmp_path: Path, servers: Callable[[], Awaitable[MetaServer]],
) -> None:
    """The discovered token endpoint is printed with control characters escaped: an
    issuer's document must not clear or retitle the terminal of the operator checking it."""
    idp = await start()
    meta = await servers()
    meta.doc("/.well-known/openid-configuration",
             {"issuer": meta.url, "token_endpoint": meta.url + "/t\x1b[2J\x1b]0;ok\x07"})
    directory = tmp_path / "cfg"
    prov = oauth2(idp)
    del prov["token_url"]
    prov["issuer"] = meta.url
    path = write_private(directory, config(prov, idp.url + "/api/", directory))
    code, out, _ = await run_cli(directory, "check-config", "--online", "-c", str(path))
    assert 1 == code, out
    assert "\x1b" not in out, repr(out)
    assert "\x07" not in out, repr(out)


async def test_a_websocket_retry_that_fails_upstream_is_counted_as_upstream_error(
    start: StartIdp, make_proxy: MakeProxy, raw_upstream: Any, tmp_path: Path,
    logs: CapturedLogs,
) -> None:
    """A WebSocket handshake refused with 401, sent again with a fresh token, whose second
    connection is cut: the client gets 502, the access log says ``retried: true``, and the
    retry is counted once, as ``upstream_error``."""
    up = await raw_upstream(retried_upstream("reset"))
    daemon = await make_proxy(oauth2_config(idp := await start(), tmp_path, upstream=up.url()))
    await wait_ready(daemon)
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with s.ws_connect(f"ws://127.0.0.1:{daemon.port()}/ws"):
                pass
    assert 502 == refused.value.status
    assert 2 == len(idp.calls.seen)
    await wait_for(lambda: bool(logs.events("request")), "the access log line")
    [event] = logs.events("request")
    assert event["retried"] is True
    counts = retry_counts(daemon)
    assert 1 == counts["upstream_error"] == sum(counts.values()), counts


async def test_a_hostile_client_forces_at_most_one_refresh_per_window_from_one_path(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    clock: JumpClock,
) -> None:
    """A local client that alternates a request the upstream accepts and one it refuses with
    401 (any header the upstream reads as a bad credential does), once per second for 60 s,
    makes one 401-triggered token call per 5 s window: the refused path is a known refuser,
    so it never spends the heal: one refresh, then none until strictly more than 5 s later
    (at the next whole second here), so 10 in the minute, as with the storm guard alone."""
    idp = await start(lifetime=3600)
    idp.tap.deny.add("/api/deny")
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    for _ in range(60):
        assert 200 == await status_of(http, daemon, "/ok")
        assert 401 == await status_of(http, daemon, "/deny")
        await clock.tick(1)
    assert 60 / 6 == refreshes(daemon, "unauthorized")


async def test_a_client_walking_refused_paths_forces_at_most_two_refreshes_per_window(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    clock: JumpClock,
) -> None:
    """A client that asks a new refused path every time (/deny/1, /deny/2, ...) is not known
    to refuse anywhere; its 401s may be a revocation, and each window allows one such heal
    besides the storm guard's refresh: at most two 401-triggered token calls per 5 s."""
    idp = await start(lifetime=3600)
    for i in range(60):
        idp.tap.deny.add(f"/api/deny/{i}")
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    for i in range(60):
        assert 401 == await status_of(http, daemon, f"/deny/{i}")
        await clock.tick(1)
    forced = refreshes(daemon, "unauthorized")
    assert 60 / 6 < forced <= 2 * 60 / 5, forced


# -- problem answers -------------------------------------------------------------------------


@pytest.mark.both_paths
async def test_misconfigured_answer_is_a_urn_problem_counted_in_the_log(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    logs: CapturedLogs, servers: Callable[[], Awaitable[MetaServer]],
) -> None:
    """Held: provider_misconfigured is answered on both paths as problem+json with type
    urn:tokenproxy:problem:provider_misconfigured, and the access log's bytes is the length
    of that body."""
    idp = await start()
    meta = await servers()
    daemon = await make_proxy(issuer_config(idp, meta.issuer, tmp_path))
    assert "misconfigured" == await provider_state(daemon)
    async with http.get(f"http://127.0.0.1:{daemon.port()}/x?secret=1") as r:
        body = await r.read()
        assert (502, "provider_misconfigured") == (r.status, r.headers["Tokenproxy-Error"])
        assert r.headers["Content-Type"].startswith("application/problem+json")
    doc = json.loads(body)
    assert "urn:tokenproxy:problem:provider_misconfigured" == doc["type"]
    await wait_for(lambda: bool(logs.events("request")), "the access log line")
    [event] = logs.events("request")
    assert (502, len(body), "/x") == (event["status"], event["bytes"], event["path"])


# -- config: suggestions and secret files ------------------------------------------------------


def test_did_you_mean_names_keys_never_values(tmp_path: Path) -> None:
    """Held: a misspelt key holding a secret gets a suggestion naming the key only, in every
    section that now has one; an empty or blank secret file is refused naming the path, not
    its neighbour's contents; a secret followed by CRLF is kept without it."""
    from tokenproxy.config import build_config
    from tokenproxy.errors import ConfigError

    def prov(**kw: Any) -> dict[str, Any]:
        return {"listen": "127.0.0.1:0", "state_path": str(tmp_path / "s.json"),
                "providers": {"p": {"type": "oauth2", "token_url": "http://h/t",
                                    "client_id": "c", **kw}},
                "routes": [{"prefix": "/", "upstream": "http://h/", "provider": "p"}]}

    attempts: list[tuple[dict[str, Any], str]] = [
        (prov(client_secrt=CLIENT_SECRET), "'client_secret'"),
        (prov(client_secret="x", pasword=PASSWORD, grant_type="password", username="u"),
         "'password'"),
        ({**prov(client_secret="x"), "security": {"client_kye": CLIENT_SECRET}},
         "'client_key'"),
        ({**prov(client_secret="x"), "limits": {"send_timout": CLIENT_SECRET}},
         "'send_timeout'"),
        ({**prov(client_secret="x"), "log": {"levl": CLIENT_SECRET}}, "'level'"),
    ]
    for raw, suggestion in attempts:
        with pytest.raises(ConfigError) as caught:
            build_config(raw, {})
        text = str(caught.value)
        assert suggestion in text
        assert [] == [s for s in SECRETS if s in text], text
    for content in ("", "\n", "\r\n", "   \n"):
        secret = tmp_path / "secret"
        secret.write_text(content)
        with pytest.raises(ConfigError, match="is empty"):
            build_config(prov(client_secret_file=str(secret)), {})
    secret.write_text(CLIENT_SECRET + "\r\n")
    cfg = build_config(prov(client_secret_file=str(secret)), {})
    provider = cfg.providers["p"]
    assert CLIENT_SECRET == provider.client_secret.value  # type: ignore[attr-defined]


# -- 4. the allocator tuning -------------------------------------------------------------------


def test_tune_allocator_is_harmless_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    """Held: a C library without mallopt (macOS, or CDLL failing) or with a stub that does
    nothing (musl's returns 0) makes tune_allocator return False, never raise."""
    import ctypes

    from tokenproxy import memory

    calls: list[tuple[int, int]] = []

    def mallopt(param: int, value: int) -> int:   # musl's: accepts and ignores
        calls.append((param, value))
        return 0

    class Library:
        pass

    stub = Library()
    stub.mallopt = mallopt  # type: ignore[attr-defined]

    def failing(name: Any) -> Any:
        raise OSError("no C library")

    for fake in (lambda name: Library(), lambda name: stub, failing):
        monkeypatch.setattr(memory.ctypes, "CDLL", fake)
        assert memory.tune_allocator() is False
    monkeypatch.setattr(memory.ctypes, "CDLL", ctypes.CDLL)
    assert [(memory.M_MMAP_THRESHOLD, memory.MMAP_THRESHOLD)] == calls


DOWNLOAD = 1 << 20


def big_upstream_app() -> web.Application:
    chunk = bytes(DOWNLOAD)

    async def big(request: web.Request) -> web.StreamResponse:
        n = int(request.query["n"])
        resp = web.StreamResponse(headers={"Content-Length": str(n)})
        await resp.prepare(request)
        while n:
            part = chunk[:min(n, DOWNLOAD)]
            await resp.write(part)
            n -= len(part)
        return resp

    app = web.Application()
    app.router.add_get("/big", big)
    return app


async def concurrent_download_rss(directory: Path, upstream: str, tuned: bool) -> tuple[int, int]:
    """(VmHWM, VmRSS after the load) in MiB of a child daemon, tuned or not, through which
    96 clients download 4 MiB each, twice."""
    from tests.helpers.config import write_config
    from tests.helpers.daemon_proc import DaemonProcess, child_env

    directory.mkdir()
    raw = {"listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
           "providers": {"api": {"type": "static", "token": "review-token-0123456789"}},
           "routes": [{"prefix": "/", "upstream": upstream, "provider": "api"}]}
    path = write_config(directory, raw)
    code = ("import sys, tokenproxy.cli as c\n"
            + ("" if tuned else "c.tune_allocator = lambda: False\n")
            + "sys.exit(c.main(['run', '-c', sys.argv[1]]))")
    err = directory / "stderr"
    with err.open("wb") as out:
        proc = __import__("subprocess").Popen(
            [sys.executable, "-c", code, str(path)], stdin=-3, stdout=out, stderr=out,
            env=child_env(directory), cwd=directory)
    daemon = DaemonProcess(proc, err)
    try:
        await daemon.wait_for_event("listening", 15)
        size = 4 * DOWNLOAD

        async def download(s: aiohttp.ClientSession) -> None:
            got = 0
            async with s.get(daemon.url(f"/big?n={size}")) as r:
                async for part in r.content.iter_chunked(1 << 16):
                    got += len(part)
            assert size == got

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0),
                                         timeout=aiohttp.ClientTimeout(total=20)) as s:
            for _ in range(2):
                await asyncio.gather(*[download(s) for _ in range(96)])
        await asyncio.sleep(0.3)
        status = Path(f"/proc/{proc.pid}/status").read_text(encoding="ascii")
        values = {line.split()[0]: int(line.split()[1]) // 1024 for line in status.splitlines()
                  if line.startswith(("VmHWM:", "VmRSS:"))}
        return values["VmHWM:"], values["VmRSS:"]
    finally:
        daemon.kill()


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc")
async def test_allocator_tuning_does_not_raise_peak_rss_under_concurrent_downloads(
    aiohttp_server: AiohttpServer, tmp_path: Path,
) -> None:
    """Held (measured): 96 concurrent 4 MiB downloads, twice, through a child daemon: the
    tuned allocator's peak RSS is within noise of glibc's defaults (here both 105-135 MiB;
    runs vary by +-20 %), and what stays resident afterwards is not larger either."""
    server = await aiohttp_server(big_upstream_app())
    upstream = f"http://127.0.0.1:{server.port}/"
    plain = await concurrent_download_rss(tmp_path / "plain", upstream, tuned=False)
    tuned = await concurrent_download_rss(tmp_path / "tuned", upstream, tuned=True)
    assert tuned[0] < plain[0] * 1.3 + 16, (plain, tuned)
    assert tuned[1] < plain[1] * 1.5 + 16, (plain, tuned)


@pytest.mark.parametrize("serving_path", ["aiohttp"], indirect=True)
async def test_a_head_problem_answer_logs_no_body_bytes(
    make_proxy: MakeProxy, logs: CapturedLogs,
) -> None:
    """A HEAD answered by tokenproxy itself sends no body, and the access log's ``bytes``
    says so, on both paths."""
    from tests.helpers.config import proxy_config
    from tests.helpers.fakes import TOKEN

    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    daemon = await make_proxy(proxy_config(f"http://127.0.0.1:{port}/", TOKEN))
    conn = await RawConnection.open(daemon.port())
    try:
        await conn.send(get("/x", "localhost", method="HEAD"))
        assert 502 == (await conn.response(head_only=True)).status
        await conn.wait_closed(0.2)
        assert b"" == conn.trailing
    finally:
        await conn.close()
    await wait_for(lambda: bool(logs.events("request")), "the access log line")
    [event] = logs.events("request")
    assert (502, 0) == (event["status"], event["bytes"])



# -- token-endpoint failures: naming and counting ----------------------------------------------


def closed_port() -> int:
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = int(dead.getsockname()[1])
    dead.close()   # nothing listens there: connection refused
    return port


async def test_a_refused_connection_to_the_token_endpoint_is_named_so(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, logs: CapturedLogs,
) -> None:
    """A token-endpoint failure names the host and the reason in the OS's words
    ("connection refused"), not asyncio's sentence."""
    idp = await start()
    port = closed_port()
    daemon = await make_proxy(oauth2_config(idp, tmp_path,
                                            token_url=f"http://127.0.0.1:{port}/token"))
    await wait_for(lambda: bool(logs.events("token_refresh_failed")), "a failed call")
    [failed] = logs.events("token_refresh_failed")
    assert f"http://127.0.0.1:{port}" in failed["error"]
    _, ready = await readyz(daemon)
    assert "connection refused" in failed["error"], failed["error"]
    assert "connection refused" in ready["providers"]["idp"]["error"]


async def test_token_metric_labels_stay_bounded_whatever_the_issuer_answers(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    clock: JumpClock,
) -> None:
    """Held: an issuer answering with invented error codes, 4xx and 5xx statuses, garbage and
    finally a token puts nothing of its answers into the token_refresh labels: grant, trigger
    and result keep to the documented values."""
    from tests.helpers.idp import respond, respond_json

    idp = await start()
    idp.calls.queue.extend([
        respond_json({"error": "x_evil_label_" + "a" * 40}, 400),
        respond_json({"error": "grant=evil,result=owned"}, 418),
        respond(500, "<html>"), respond(200, '{"access_token": 7}'),
    ])
    daemon = await make_proxy(oauth2_config(idp, tmp_path, **PASSWORD_GRANT))
    await wait_for(lambda: bool(idp.calls.seen), "the first call")
    await daemon.reload(daemon.config)   # the rejection made it unauthenticated: try again
    for _ in range(4):
        await clock.tick(120)
        await asyncio.sleep(0.05)
    samples = [s.labels for family in daemon.registry.collect()
               if family.name == "tokenproxy_token_refresh" for s in family.samples
               if s.name.endswith("_total")]
    assert samples
    assert 5 == len(idp.calls.seen)   # rejected, then (after the reload) 3 errors, a success
    for labels in samples:
        assert labels["grant"] in {"client_credentials", "password", "refresh_token",
                                   "json_login", "json_refresh", "command", "token_file",
                                   "discovery", "state_file"}, labels
        assert labels["trigger"] in {"initial", "expiry", "unauthorized", "manual"}, labels
        assert labels["result"] in {"success", "rejected", "error"}, labels


@pytest.mark.parametrize("status", [404, 405])
async def test_a_4xx_from_the_token_endpoint_is_counted_rejected(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, status: int,
) -> None:
    """A token endpoint answering 404 or 405 (a wrong token_url path, a GET-only route)
    is the endpoint saying no: counted ``rejected``, so the alert docs/metrics.md recommends
    fires; it is still retried with backoff (the route may come back)."""
    from tests.helpers.idp import respond

    idp = await start()
    idp.calls.default = respond(status, "")
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_for(lambda: bool(idp.calls.seen), "the token call")
    await wait_for(lambda: refreshes(daemon, "initial", "failure") == 1, "it is counted")
    assert 1 == refreshes(daemon, "initial", "rejected"), "counted as error"


@pytest.mark.slow
async def test_online_check_of_a_header_that_would_split_is_a_config_error(
    tmp_path: Path, servers: Callable[[], Awaitable[MetaServer]],
) -> None:
    """A json provider whose login header value holds a line break (it would inject a
    header into every login call) is refused when the config loads: check-config --online
    exits 2 naming the key, before contacting anything, with no traceback."""
    meta = await servers()
    directory = tmp_path / "cfg"
    raw = {"state_path": str(directory / "state.json"),
           "providers": {"j": {"type": "json", "login": {
               "url": meta.url + "/login", "headers": {"X-Key": "abc\nX-Injected: 1"}}},
                         "s": {"type": "static", "token": "review-token-0123456789"}},
           "routes": [{"prefix": "/", "upstream": meta.url + "/", "provider": "j"}]}
    path = write_private(directory, raw)
    code, out, _ = await run_cli(directory, "check-config", "--online", "-c", str(path))
    assert 2 == code, out
    assert "Traceback" not in out
    assert "providers.j.login.headers.X-Key: not a valid header value" in out
    assert [] == meta.seen


# -- documentation -------------------------------------------------------------------------------


def test_readme_points_to_the_reference_instead_of_copying_it() -> None:
    """The README's error and observability sections name the common cases and point to
    docs/errors.md, docs/metrics.md and docs/logging.md, which tests/test_docs.py keeps in
    step with the code; a copied table of every cause or metric would drift (it did: the
    README's lacked provider_misconfigured and the discovery grant)."""
    from tokenproxy.proxy.rules.problem import TITLES

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    errors = readme.split("## Errors", 1)[1].split("\n## ", 1)[0]
    observability = readme.split("## Observability", 1)[1].split("\n## ", 1)[0]
    assert "docs/errors.md" in errors
    assert "docs/metrics.md" in observability
    assert "docs/logging.md" in observability
    assert "| `tokenproxy_" not in readme, "a metric table copied into the README"
    assert "| `Tokenproxy-Error` |" not in readme, "an error table copied into the README"
    named = set(re.findall(r"`([a-z_]+)` \(\d{3}", errors))
    assert named, errors
    assert named <= set(TITLES), named - set(TITLES)
