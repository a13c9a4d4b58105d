"""Core token-lifecycle behaviours against the built-in issuer, driven by the fake clock."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from tests.conftest import MakeProxy
from tests.fakes import CLIENT_SECRET, FakeClock
from tokenproxy.demo.issuer import Issuer


async def start_issuer(aiohttp_server: AiohttpServer, clock: FakeClock, **kw: Any) -> tuple[
        Issuer, TestServer]:
    issuer = Issuer(clock=clock, client_secret=CLIENT_SECRET, **kw)
    server = await aiohttp_server(issuer.app())
    issuer.base_url = f"http://127.0.0.1:{server.port}"
    return issuer, server


def oauth2_config(issuer: Issuer, tmp_path: Any, **provider: Any) -> dict[str, Any]:
    prov = {
        "type": "oauth2",
        "token_url": issuer.base_url + "/oauth/token",
        "client_id": "demo-client",
        "client_secret": CLIENT_SECRET,
    }
    prov.update(provider)
    return {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "state_path": str(tmp_path / "state.json"),
        "providers": {"idp": prov},
        "routes": [{"prefix": "/", "upstream": issuer.base_url + "/api/", "provider": "idp"}],
    }


async def wait_ready(port: int) -> None:
    async with aiohttp.ClientSession() as s:
        for _ in range(200):
            async with s.get(f"http://127.0.0.1:{port}/readyz") as r:
                if r.status == 200:
                    return
            await asyncio.sleep(0.01)
    raise AssertionError("never ready")


async def test_concurrent_requests_after_expiry_make_one_token_call(
    aiohttp_server: AiohttpServer, make_proxy: MakeProxy, clock: FakeClock, tmp_path: Any
) -> None:
    """500 requests arriving after expiry share one token-endpoint call and all succeed."""
    issuer, _ = await start_issuer(aiohttp_server, clock)
    daemon = await make_proxy(oauth2_config(issuer, tmp_path, refresh_margin=0))
    await wait_ready(daemon.admin_port)
    assert 1 == issuer.stats.calls
    clock.advance(11)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn) as s:
        async def one() -> int:
            async with s.get(f"http://127.0.0.1:{daemon.port()}/x") as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(one() for _ in range(500)))
    assert [200] * 500 == statuses
    assert 2 == issuer.stats.calls
    coalesced = daemon.registry.get_sample_value(
        "tokenproxy_token_refresh_coalesced_total", {"provider": "idp"})
    assert coalesced is not None
    assert coalesced >= 1


async def test_proactive_refresh_before_expiry(
    aiohttp_server: AiohttpServer, make_proxy: MakeProxy, clock: FakeClock, tmp_path: Any
) -> None:
    """Inside refresh_margin the token is refreshed in the background (trigger expiry)."""
    issuer, _ = await start_issuer(aiohttp_server, clock)
    daemon = await make_proxy(oauth2_config(issuer, tmp_path, refresh_margin="4s"))
    await wait_ready(daemon.admin_port)
    await clock.tick(6.5)
    labels = {"provider": "idp", "trigger": "expiry", "grant": "client_credentials",
              "result": "success"}
    for _ in range(300):   # the metric counts once the answer is in, not when the call starts
        if daemon.registry.get_sample_value("tokenproxy_token_refresh_total", labels):
            break
        await asyncio.sleep(0.01)
    assert 1.0 == daemon.registry.get_sample_value("tokenproxy_token_refresh_total", labels)
    assert 2 == issuer.stats.calls
