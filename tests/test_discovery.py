"""OAuth 2.0 authorization server metadata (tokens/discovery.py): a provider with ``issuer``
instead of ``token_url`` finds its token endpoint at the OpenID location, RFC 8414's or the one
appended to the issuer's path; no usable document is a misconfiguration (looked at again once
a minute), a 5xx, a 429 or no answer an outage (backoff); and a hostile metadata server --
redirects to another host, oversized or compressed answers, trickling bytes -- neither gets
the client secret nor holds the provider beyond its timeout.

Everything runs on 127.0.0.1 with bounded waits; the daemons and the issuer share the fake
clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import time
import tracemalloc
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from tests.helpers.client import fetch, status_of
from tests.helpers.config import MakeProxy
from tests.helpers.fakes import CLIENT_SECRET, JumpClock
from tests.helpers.idp import MetadataServer, StartIdp, issuer_config, start_metadata
from tests.helpers.logs import CapturedLogs, failures
from tests.helpers.metrics import count, refreshes
from tests.helpers.wait import provider_state, readyz, request_event, settle, wait_for, wait_ready
from tokenproxy.config.values import parse_http_url
from tokenproxy.tokens.discovery import discovery_urls, parse_metadata


@pytest.fixture(name="metadata")
async def _metadata(aiohttp_server: AiohttpServer) -> MetadataServer:
    """An authorization server's metadata on 127.0.0.1 (tests/helpers/idp.py), publishing
    nothing until the test says what."""
    return await start_metadata(aiohttp_server)


# -- where the metadata is found --------------------------------------------------------------


async def test_issuer_discovery_instead_of_token_url(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """With issuer: the token endpoint is found through OIDC discovery."""
    idp = await start()
    daemon = await make_proxy(issuer_config(idp, idp.url, tmp_path))
    await wait_ready(daemon)
    assert 200 == (await fetch(http, daemon)).status
    assert ["client_credentials"] == idp.calls.grants()


LOCATIONS = {
    "openid": "/o/.well-known/openid-configuration",
    "rfc8414": "/.well-known/oauth-authorization-server/o",
    "appended": "/o/.well-known/oauth-authorization-server",
}


@pytest.mark.parametrize("where", LOCATIONS)
async def test_discovery_finds_the_metadata_where_the_server_publishes_it(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    metadata: MetadataServer, where: str,
) -> None:
    """OpenID location first, then RFC 8414's (inserted before the issuer's path), then the
    same document appended to the path (django-oauth-toolkit publishes it there)."""
    idp = await start()
    metadata.doc(LOCATIONS[where], {"issuer": metadata.issuer,
                                    "token_endpoint": idp.token_url})
    daemon = await make_proxy(issuer_config(idp, metadata.issuer, tmp_path))
    await wait_ready(daemon)
    assert 200 == (await fetch(http, daemon)).status
    assert ["client_credentials"] == idp.calls.grants()
    order = list(LOCATIONS.values())
    assert order[:order.index(LOCATIONS[where]) + 1] == metadata.seen


# -- no usable metadata: a misconfiguration; no answer: an outage -----------------------------


@pytest.mark.parametrize("problem", ["nothing", "another issuer", "no token_endpoint",
                                     "not json"])
async def test_discovery_without_usable_metadata_is_a_configuration_problem(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    metadata: MetadataServer, logs: CapturedLogs, clock: JumpClock, problem: str,
) -> None:
    """Every location answered, none with a document for this issuer: not an outage (no
    backoff loop, no 503) but a misconfiguration, named with every URL tried, in the log, in
    /readyz and in the 502 requests get; looked at again once a minute, not sooner."""
    idp = await start()
    doc: Any = {
        "nothing": None,
        "another issuer": {"issuer": "https://evil.example", "token_endpoint": idp.token_url},
        "no token_endpoint": {"issuer": metadata.issuer},
        "not json": "<html>",
    }[problem]
    if doc is not None:
        metadata.doc(LOCATIONS["openid"], doc)
    daemon = await make_proxy(issuer_config(idp, metadata.issuer, tmp_path))
    await wait_for(lambda: bool(logs.events("provider_misconfigured")), "misconfigured")
    [event] = logs.events("provider_misconfigured")
    for path in LOCATIONS.values():
        assert metadata.url + path in event["error"]
    resp = await fetch(http, daemon)
    assert (502, "provider_misconfigured") == (resp.status, resp.headers["Tokenproxy-Error"])
    assert metadata.url + LOCATIONS["appended"] in resp.json()["detail"]
    status, ready = await readyz(daemon)
    assert (503, "misconfigured") == (status, ready["providers"]["idp"]["state"])
    assert metadata.url + LOCATIONS["rfc8414"] in ready["providers"]["idp"]["error"]
    seen = len(metadata.seen)
    await clock.tick(59)
    await settle()
    assert (seen, []) == (len(metadata.seen), idp.calls.seen)   # no backoff loop
    await clock.tick(2)
    await wait_for(lambda: count(daemon, "tokenproxy_token_refresh_total", provider="idp",
                                 trigger="initial", grant="discovery", result="rejected") == 2,
                   "one more look a minute later")
    assert 2 * seen == len(metadata.seen)
    assert [] == idp.calls.seen
    status, ready = await readyz(daemon)
    assert (503, "misconfigured") == (status, ready["providers"]["idp"]["state"])


async def test_discovery_that_finds_metadata_later_heals_without_a_reload(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    metadata: MetadataServer, logs: CapturedLogs, clock: JumpClock,
) -> None:
    """An issuer whose metadata answered 404 (still starting behind its ingress) and is there
    a minute later: the provider gets its token and requests pass, with no reload."""
    idp = await start()
    daemon = await make_proxy(issuer_config(idp, metadata.issuer, tmp_path))
    await wait_for(lambda: bool(logs.events("provider_misconfigured")), "misconfigured")
    assert 502 == (await fetch(http, daemon)).status
    metadata.doc(LOCATIONS["openid"], {"issuer": metadata.issuer,
                                       "token_endpoint": idp.token_url})
    await clock.tick(61)
    await wait_ready(daemon)
    assert 200 == (await fetch(http, daemon)).status
    assert ["client_credentials"] == idp.calls.grants()


async def test_discovery_during_an_outage_backs_off_and_names_the_urls(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    metadata: MetadataServer, logs: CapturedLogs,
) -> None:
    """5xx answers are an outage: backoff, 503 with Retry-After, the URLs named."""
    idp = await start()
    metadata.status = 503
    daemon = await make_proxy(issuer_config(idp, metadata.issuer, tmp_path))
    await wait_for(lambda: refreshes(daemon, "initial", "error") == 1, "a failed call")
    [error] = failures(logs)
    assert f"{metadata.url}{LOCATIONS['openid']} (status 503)" in error
    resp = await fetch(http, daemon)
    assert (503, "token_unavailable") == (resp.status, resp.headers["Tokenproxy-Error"])
    assert "Retry-After" in resp.headers


@pytest.mark.parametrize("answers", [
    (404, 503, 404), (404, 429, 404), (404, 404, 502), ("wrong issuer", 503, 404),
])
async def test_discovery_with_any_5xx_or_429_is_an_outage(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path,
    metadata: MetadataServer, answers: tuple[Any, ...],
) -> None:
    """One location failing with 5xx or 429 among 404s (or a document for another
    issuer) keeps the provider in backoff, never in the stuck misconfigured state."""
    idp = await start()
    for path, answer in zip(LOCATIONS.values(), answers, strict=True):
        if answer == "wrong issuer":
            metadata.doc(path, {"issuer": "http://evil.example/o",
                                "token_endpoint": "http://evil.example/token"})
        elif answer != 404:
            async def fail(request: web.Request, status: int = answer) -> web.StreamResponse:
                return web.Response(status=status)
            metadata.routes[path] = fail
    daemon = await make_proxy(issuer_config(idp, metadata.issuer, tmp_path))
    assert "backoff" == await provider_state(daemon)


async def test_discovery_of_an_unresolvable_host_is_an_outage(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path,
) -> None:
    """A host name that does not resolve (or cannot be resolved here in time) is an
    outage with backoff, not a configuration problem."""
    idp = await start()
    daemon = await make_proxy(issuer_config(idp, "http://tokenproxy-test.invalid/o",
                                            tmp_path, timeout="1s"))
    assert "backoff" == await provider_state(daemon, within=8,
                                             states=("misconfigured", "backoff"))


async def test_an_oversized_metadata_answer_is_a_misconfiguration(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, clock: JumpClock,
    metadata: MetadataServer,
) -> None:
    """A web app's catch-all answering 200 with a page over the size limit at every
    metadata location is an answer, not an outage: the provider is misconfigured (502,
    /readyz says so), not retried every minute for ever."""
    idp = await start()
    page = b"<html>" + b"x" * 70_000 + b"</html>"

    async def spa(request: web.Request) -> web.StreamResponse:
        return web.Response(body=page, content_type="text/html")

    for path in LOCATIONS.values():
        metadata.routes[path] = spa
    daemon = await make_proxy(issuer_config(idp, metadata.issuer, tmp_path))
    assert "misconfigured" == await provider_state(daemon)


# -- hostile metadata servers -----------------------------------------------------------------


@pytest.mark.slow
async def test_a_compressed_metadata_bomb_is_refused_with_bounded_memory(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path,
    metadata: MetadataServer,
) -> None:
    """A gzip answer of 200 KB that inflates to 200 MB is cut off at the 64 KiB cap
    after at most a few MiB of Python allocations, and the provider does not get a token."""
    idp = await start()
    bomb = gzip.compress(b"{" + b" " * 200_000_000, compresslevel=9)

    async def gz(request: web.Request) -> web.StreamResponse:
        return web.Response(body=bomb, headers={"Content-Encoding": "gzip",
                                                "Content-Type": "application/json"})

    for path in LOCATIONS.values():
        metadata.routes[path] = gz
    tracemalloc.start()
    try:
        daemon = await make_proxy(issuer_config(idp, metadata.issuer, tmp_path))
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
    logs: CapturedLogs, metadata: MetadataServer,
) -> None:
    """Locations that send one byte every 100 ms for ever cost one provider timeout
    each (1 s here), then an outage with backoff whose log names every URL; a request
    meanwhile waits no longer than that and gets 503."""
    idp = await start()

    async def trickle(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(100):
                await resp.write(b" ")
                await asyncio.sleep(0.1)
        return resp

    for path in LOCATIONS.values():
        metadata.routes[path] = trickle
    started = time.monotonic()
    daemon = await make_proxy(issuer_config(idp, metadata.issuer, tmp_path, timeout="1s"))
    assert 503 == await status_of(http, daemon, "/ok")
    assert "backoff" == await provider_state(daemon, within=6)
    assert time.monotonic() - started < 6
    [failed] = [e for e in logs.events("token_refresh_failed") if e.get("grant") == "discovery"]
    for path in LOCATIONS.values():
        assert f"{metadata.url}{path} ({metadata.url.split('//')[0]}//" in failed["error"]
    assert "no answer within 1s" in failed["error"]


@pytest.mark.both_paths
async def test_misconfigured_answer_is_a_urn_problem_counted_in_the_log(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    logs: CapturedLogs, metadata: MetadataServer,
) -> None:
    """Provider_misconfigured is answered on both paths as problem+json with type
    urn:tokenproxy:problem:provider_misconfigured, and the access log's bytes is the length
    of that body."""
    idp = await start()
    daemon = await make_proxy(issuer_config(idp, metadata.issuer, tmp_path))
    assert "misconfigured" == await provider_state(daemon)
    async with http.get(f"http://127.0.0.1:{daemon.port()}/x?secret=1") as r:
        body = await r.read()
        assert (502, "provider_misconfigured") == (r.status, r.headers["Tokenproxy-Error"])
        assert r.headers["Content-Type"].startswith("application/problem+json")
    doc = json.loads(body)
    assert "urn:tokenproxy:problem:provider_misconfigured" == doc["type"]
    event = await request_event(logs)
    assert (502, len(body), "/x") == (event["status"], event["bytes"], event["path"])


async def test_discovery_never_follows_a_redirect_to_another_host(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path,
    aiohttp_server: AiohttpServer,
) -> None:
    """A metadata location redirecting to another host is not followed (the host
    never sees a request), and neither is a discovered token endpoint that redirects with
    307 (which would re-post the client secret): the secret reaches no other host."""
    idp = await start()
    meta, evil = await start_metadata(aiohttp_server), await start_metadata(aiohttp_server)

    async def to_evil(request: web.Request) -> web.StreamResponse:
        raise web.HTTPFound(evil.url + "/.well-known/openid-configuration")

    meta.routes[LOCATIONS["openid"]] = to_evil
    daemon = await make_proxy(issuer_config(idp, meta.issuer, tmp_path))
    assert "misconfigured" == await provider_state(daemon)
    assert [] == evil.seen

    meta2 = await start_metadata(aiohttp_server)
    meta2.doc(LOCATIONS["openid"], {"issuer": meta2.issuer, "token_endpoint": meta2.url + "/token"})

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
    metadata: MetadataServer,
) -> None:
    """An authorization_endpoint (or userinfo, revocation) with a query, as RFC 6749
    section 3.1 allows and Azure AD B2C publishes, is left out; the document is used for its
    token_endpoint, which alone is checked strictly."""
    idp = await start()
    metadata.doc(LOCATIONS["openid"], {
        "issuer": metadata.issuer, "token_endpoint": idp.token_url,
        "authorization_endpoint": metadata.url + "/authorize?p=b2c_1_signin"})
    daemon = await make_proxy(issuer_config(idp, metadata.issuer, tmp_path))
    assert "valid" == await provider_state(daemon)
    assert 200 == await status_of(http, daemon, "/ok")


# -- the metadata URLs and documents ----------------------------------------------------------


def test_discovery_locations() -> None:
    assert ["https://h/.well-known/openid-configuration",
            "https://h/.well-known/oauth-authorization-server"] == discovery_urls("https://h/")
    assert ["https://h/o/t/.well-known/openid-configuration",
            "https://h/.well-known/oauth-authorization-server/o/t",
            "https://h/o/t/.well-known/oauth-authorization-server"] == discovery_urls(
        "https://h/o/t/")


def test_discovery_urls_stay_on_the_issuers_origin() -> None:
    """Whatever the issuer's path holds (dots, encoded slashes, an '@', IPv6, ports,
    trailing slashes, upper case), every metadata URL has the issuer's scheme and netloc."""
    for issuer in ("https://h/o", "https://h/o/", "https://h", "https://h:8443/a/b//",
                   "https://[::1]:8443/o", "https://h/o@evil.example", "https://h/a%2F..%2Fb",
                   "https://h/../../evil.example/", "HTTPS://H/o", "https://h/o;x=@evil"):
        want = urlsplit(issuer)
        for url in discovery_urls(issuer):
            got = urlsplit(url)
            assert (want.scheme.lower(), want.netloc) == (got.scheme, got.netloc), (issuer, url)


def test_metadata_refuses_a_downgrade_userinfo_and_another_issuer() -> None:
    """Under an https issuer an http token_endpoint is refused, so are credentials in
    it, and a document for another issuer (case, port, path) is refused."""
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
