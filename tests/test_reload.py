"""Reload: a new config applies without dropping connections or tokens."""

from __future__ import annotations

import asyncio
import os
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.helpers.client import status_of
from tests.helpers.config import MakeProxy, proxy_config, upstream_url
from tests.helpers.fakes import CLIENT_SECRET, TOKEN, TOKEN_2, FakeUpstream
from tests.helpers.idp import StartIdp, oauth2_config
from tests.helpers.metrics import metric
from tests.helpers.net import busy_port
from tests.helpers.rawhttp import first_answer, get
from tests.helpers.rawupstream import MakeRaw, RawUpstream, response, serving
from tests.helpers.wait import wait_for, wait_ready
from tokenproxy.config import build_config
from tokenproxy.daemon import Daemon
from tokenproxy.errors import TokenProxyError
from tokenproxy.listeners import ListenError
from tokenproxy.tokens.manager import TokenManager


async def _traffic(url: str, stop: asyncio.Event, results: list[int], workers: int = 8) -> None:
    """Keep *workers* clients busy on *url* until *stop*; record every status (bounded)."""
    deadline = time.monotonic() + 20

    async def worker(session: aiohttp.ClientSession) -> None:
        while not stop.is_set() and time.monotonic() < deadline and len(results) < 20000:
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    results.append(resp.status)
            except aiohttp.ClientError:
                results.append(-1)

    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(worker(session) for _ in range(workers)))


def _two_routes(upstream: str, token: str, **extra: Any) -> dict[str, Any]:
    raw = proxy_config(upstream, token, **extra)
    raw["routes"] = [
        {"prefix": "/a", "upstream": upstream + "echo/a", "provider": "api"},
        {"prefix": "/b", "upstream": upstream + "echo/b", "provider": "api"},
    ]
    return raw


@pytest.mark.slow
async def test_reload_under_load_fails_no_request(
    make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
) -> None:
    """Routes and the provider's token change under concurrent traffic; every request succeeds
    and new requests see the new config at once."""
    base = upstream_url(upstream, "/")
    daemon = await make_proxy(_two_routes(base, TOKEN))
    stop, results = asyncio.Event(), []
    load = asyncio.create_task(_traffic(f"http://127.0.0.1:{daemon.port()}/a/x", stop, results))
    await asyncio.sleep(0.2)
    for i in range(6):
        token = TOKEN_2 if i % 2 == 0 else TOKEN
        raw = _two_routes(base, token)
        if i % 2 == 0:
            raw["routes"].append({"prefix": "/c", "upstream": base + "echo/c", "provider": "api"})
        await daemon.reload(build_config(raw, {}))
        await asyncio.sleep(0.1)
    await daemon.reload(build_config(_two_routes(base, TOKEN_2), {}))
    stop.set()
    await load
    assert len(results) > 50
    assert [] == [s for s in results if s != 200]
    async with aiohttp.ClientSession() as s:
        async with s.get(f"http://127.0.0.1:{daemon.port()}/a/y") as resp:
            assert 200 == resp.status
        async with s.get(f"http://127.0.0.1:{daemon.port()}/c/y") as resp:
            assert 404 == resp.status   # the last config has no /c
    assert [f"Bearer {TOKEN_2}"] == fake_upstream.seen[-1].header("Authorization")


async def test_reload_keeps_unchanged_listener_and_swaps_others(
    make_proxy: MakeProxy, upstream: TestServer, tmp_path: Path
) -> None:
    """An unchanged listener keeps its socket (open keep-alive connections keep working); a
    new unix listener opens, a removed one closes and its file goes."""
    base = upstream_url(upstream, "/")
    daemon = await make_proxy(proxy_config(base, TOKEN))
    port = daemon.port()
    sock = str(tmp_path / "tp.sock")
    async with aiohttp.ClientSession() as kept:
        async with kept.get(f"http://127.0.0.1:{port}/echo/1") as resp:
            assert 200 == resp.status
        await daemon.reload(build_config(
            proxy_config(base, TOKEN, listen=["127.0.0.1:0", f"unix:{sock}"]), {}))
        assert port == daemon.port()
        assert os.path.exists(sock)
        async with kept.get(f"http://127.0.0.1:{port}/echo/2") as resp:   # same connection
            assert 200 == resp.status
        unix = aiohttp.UnixConnector(path=sock)
        async with aiohttp.ClientSession(connector=unix) as s, s.get(
            "http://localhost/echo/3"
        ) as resp:
            assert 200 == resp.status
        await daemon.reload(build_config(proxy_config(base, TOKEN), {}))
        assert not os.path.exists(sock)
        assert port == daemon.port()


async def test_reload_with_a_busy_address_changes_nothing(
    make_proxy: MakeProxy, upstream: TestServer, tmp_path: Path
) -> None:
    """A new listener that cannot bind fails the whole reload; the old config keeps serving."""
    base = upstream_url(upstream, "/")
    daemon = await make_proxy(proxy_config(base, TOKEN))
    busy = tmp_path / "not-a-socket"
    busy.write_text("x")
    raw = proxy_config(base, TOKEN_2, listen=["127.0.0.1:0", f"unix:{busy}"])
    try:
        await daemon.reload(build_config(raw, {}))
        raise AssertionError("reload should have failed")
    except TokenProxyError:
        pass
    assert "x" == busy.read_text()
    assert 1 == len(daemon.listeners)
    async with aiohttp.ClientSession() as s, s.get(
        f"http://127.0.0.1:{daemon.port()}/echo/x"
    ) as resp:
        assert 200 == resp.status
        doc = await resp.json()
    assert ["Authorization", f"Bearer {TOKEN}"] in doc["headers"]


async def test_provider_with_same_identity_keeps_its_token(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """Changing a provider's refresh_margin keeps its token (no token call); changing its
    client (identity) logs in anew."""
    issuer = (await start()).issuer
    raw = oauth2_config(issuer, tmp_path, refresh_margin="2s")
    daemon = await make_proxy(raw)
    await wait_ready(daemon, timeout=2.0)
    assert 1 == issuer.stats.calls
    raw2 = oauth2_config(issuer, tmp_path, refresh_margin="3s")
    await daemon.reload(build_config(raw2, {}))
    assert 200 == await status_of(http, daemon, "/x")
    assert 1 == issuer.stats.calls
    issuer.client_id = "other-client"
    raw3 = oauth2_config(issuer, tmp_path, refresh_margin="3s", client_id="other-client")
    await daemon.reload(build_config(raw3, {}))
    assert 200 == await status_of(http, daemon, "/x")
    assert 2 == issuer.stats.calls
    assert CLIENT_SECRET not in str(daemon.config)


async def test_unauthenticated_provider_recovers_on_reload(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A provider logged out by invalid_client tries again on reload, even when the file did
    not change (the fix was made at the identity provider)."""
    issuer = (await start()).issuer
    issuer.client_secret = "rotated-at-the-idp"
    raw = oauth2_config(issuer, tmp_path)
    daemon = await make_proxy(raw)
    await wait_for(lambda: metric(daemon, "tokenproxy_provider_authenticated",
                                  provider="idp") == 0, "the provider logged out", 3.0)
    source = daemon.source("idp")
    assert isinstance(source, TokenManager)
    assert source.unauthenticated
    issuer.client_secret = CLIENT_SECRET          # the IdP side is fixed
    await daemon.reload(build_config(raw, {}))    # same file
    await wait_ready(daemon, timeout=2.0)
    assert 200 == await status_of(http, daemon, "/x")


@pytest.mark.slow
async def test_reload_of_token_providers_under_load_fails_no_request(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    """An oauth2 provider's settings change (same identity, then a new client) under
    concurrent traffic: no request fails, and the identity change logs in anew."""
    issuer = (await start()).issuer
    issuer.lifetime = 3600
    daemon = await make_proxy(oauth2_config(issuer, tmp_path, refresh_margin="2s"))
    await wait_ready(daemon, timeout=2.0)
    stop, results = asyncio.Event(), []

    async def traffic() -> None:
        async with aiohttp.ClientSession() as s:
            async def worker() -> None:
                end = time.monotonic() + 10
                while not stop.is_set() and time.monotonic() < end:
                    async with s.get(f"http://127.0.0.1:{daemon.port()}/x") as resp:
                        await resp.read()
                        results.append(resp.status)
            await asyncio.gather(*(worker() for _ in range(6)))

    load = asyncio.create_task(traffic())
    for margin in ("3s", "4s", "5s"):
        await asyncio.sleep(0.1)
        await daemon.reload(build_config(
            oauth2_config(issuer, tmp_path, refresh_margin=margin), {}))
    calls_same_identity = issuer.stats.calls
    issuer.client_id = "second-client"
    await daemon.reload(build_config(
        oauth2_config(issuer, tmp_path, refresh_margin="5s", client_id="second-client"), {}))
    await asyncio.sleep(0.2)
    stop.set()
    await load
    assert 1 == calls_same_identity
    assert 2 == issuer.stats.calls
    assert len(results) > 20
    assert [] == [s for s in results if s != 200]


# -- a reload that fails late changes nothing ---------------------------------------------------


async def _serves_with(daemon: Daemon, up: RawUpstream, token: str) -> None:
    """A request on the daemon's first listener reaches the upstream with *token*."""
    before = len(up.requests)
    resp = await first_answer(daemon.port(), get("/x"))
    assert 200 == resp.status
    assert f"Bearer {token}" == up.requests[before].get("Authorization")


async def _admin_answers(daemon: Daemon) -> bool:
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{daemon.admin_port}/healthz") as r:
        return r.status == 200


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["admin_bind", "provider_build", "route_tls"])
async def test_a_failed_reload_leaves_listeners_providers_and_routes_as_they_were(
    make_proxy: MakeProxy, raw_upstream: MakeRaw, tmp_path: Path, cert: tuple[Path, Path],
    failing: str,
) -> None:
    """A reload that adds a proxy listener and changes the provider fails late --
    the admin address is taken, the provider's CA bundle went bad after the file was read,
    or the route's did -- and nothing moves: the new listener is closed again (its socket
    file gone), the old listeners and admin listener serve, the old token is sent."""
    up = await raw_upstream(serving(lambda r: response(b"ok")))
    daemon = await make_proxy(proxy_config(up.url(), TOKEN))
    old_config, old_source = daemon.config, daemon.source("api")
    ca = tmp_path / "ca.pem"   # a copy: the session's certificate is shared, and this goes bad
    ca.write_bytes(cert[1].read_bytes())
    sock_path = tmp_path / "new.sock"
    raw = proxy_config(up.url(), TOKEN_2, listen=["127.0.0.1:0", f"unix:{sock_path}"],
                       state_path=str(tmp_path / "state.json"))
    with busy_port() as busy:
        if failing == "admin_bind":
            raw["admin_listen"] = f"127.0.0.1:{busy}"
        elif failing == "provider_build":
            raw["providers"] = {"api": {"type": "oauth2", "token_url": "https://127.0.0.1:1/t",
                                        "client_id": "c", "client_secret": "s",
                                        "ca_file": str(ca)}}
        else:
            raw["routes"][0]["ca_file"] = str(ca)
        new = build_config(raw, {})
        ca.write_text("not a certificate\n")   # after the file was read: the build step fails
        with pytest.raises((ListenError, ssl.SSLError)) as failed:
            await daemon.reload(new)
    assert isinstance(failed.value, ssl.SSLError) == (failing != "admin_bind")
    assert not sock_path.exists(), "the listener the failed reload bound is still there"
    assert daemon.config is old_config
    assert daemon.source("api") is old_source
    assert 1 == len(daemon.listeners)
    await _serves_with(daemon, up, TOKEN)
    assert await _admin_answers(daemon)
