"""Failure modes found in review: split token answers, lock contention between providers and
processes, bad CA files, stuck providers after reload, query strings in check-config, the
redactor's working set, short static tokens, WebSocket refusals."""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from tests.conftest import MakeProxy, proxy_config, upstream_url
from tests.fakes import CLIENT_SECRET, TOKEN, FakeClock
from tests.test_lifecycle_core import oauth2_config, start_issuer, wait_ready
from tokenproxy import log
from tokenproxy.cli import summary
from tokenproxy.config import build_config
from tokenproxy.errors import ConfigError
from tokenproxy.tokens.manager import TokenManager
from tokenproxy.tokens.state import StateStore, identity_key


async def test_token_answer_split_over_several_reads(
    aiohttp_server: AiohttpServer, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    """A token answer that arrives in pieces (a 6 KB JSON in three writes) is read whole."""
    async def token(request: web.Request) -> web.StreamResponse:
        body = ('{"access_token": "split-answer-token-1234", "expires_in": 300, "pad": "'
                + "x" * 6000 + '"}').encode()
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for part in (body[:10], body[10:3000], body[3000:]):
            await resp.write(part)
            await asyncio.sleep(0.05)
        await resp.write_eof()
        return resp

    async def api(request: web.Request) -> web.Response:
        return web.Response(text=request.headers.get("Authorization", ""))

    app = web.Application()
    app.router.add_post("/token", token)
    app.router.add_get("/api/x", api)
    server = await aiohttp_server(app)
    base = f"http://127.0.0.1:{server.port}"
    raw = proxy_config(base + "/api/", TOKEN, state_path=str(tmp_path / "s.json"))
    raw["providers"] = {"api": {"type": "oauth2", "token_url": base + "/token",
                                "client_id": "c", "client_secret": CLIENT_SECRET}}
    daemon = await make_proxy(raw)
    async with aiohttp.ClientSession() as s, s.get(
        f"http://127.0.0.1:{daemon.port()}/x"
    ) as resp:
        assert 200 == resp.status
        assert "Bearer split-answer-token-1234" == await resp.text()


def _command_provider(script: str, **extra: Any) -> dict[str, Any]:
    return {"type": "command", "command": [sys.executable, "-c", script], **extra}


async def test_a_slow_provider_does_not_hold_up_another(
    make_proxy: MakeProxy, upstream: TestServer, tmp_path: Path
) -> None:
    """Providers refresh under their own locks: a command taking 2 s does not delay another
    provider's first token (they share the state file)."""
    raw = proxy_config(upstream_url(upstream, "/"), TOKEN, state_path=str(tmp_path / "s.json"))
    raw["providers"] = {
        "slow": _command_provider("import time; time.sleep(2); print('slow-token-aaaaaaaa')"),
        "fast": _command_provider("print('fast-token-bbbbbbbb')"),
    }
    raw["routes"] = [{"prefix": "/", "upstream": upstream_url(upstream, "/"),
                      "provider": "fast"}]
    started = time.monotonic()
    daemon = await make_proxy(raw)
    async with aiohttp.ClientSession() as s, s.get(
        f"http://127.0.0.1:{daemon.port()}/echo/x"
    ) as resp:
        assert 200 == resp.status
    assert time.monotonic() - started < 1.5


async def test_lock_held_elsewhere_gives_503_not_a_hang(
    make_proxy: MakeProxy, upstream: TestServer, tmp_path: Path, clock: FakeClock
) -> None:
    """While another process holds this provider's state lock, a request waits at most the
    route timeout and gets 503 + Retry-After; the refresh fails into backoff."""
    state = tmp_path / "s.json"
    provider = _command_provider("print('locked-token-cccccccc')", timeout="0.3s")
    raw = proxy_config(upstream_url(upstream, "/"), TOKEN, state_path=str(state))
    raw["providers"] = {"api": provider}
    raw["routes"][0]["timeout"] = "0.5s"
    cfg = build_config(raw, {})
    other = StateStore(state)   # a second process's store, holding the lock
    key = identity_key("api", cfg.providers["api"].identity())
    async with other.locked(key, 5):
        started = time.monotonic()
        daemon = await make_proxy(raw)
        async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{daemon.port()}/echo/x"
        ) as resp:
            assert 503 == resp.status
            assert "Retry-After" in resp.headers
        assert time.monotonic() - started < 2.0
        for _ in range(300):
            if daemon.registry.get_sample_value("tokenproxy_token_refresh_total", {
                    "provider": "api", "trigger": "initial", "grant": "state_file",
                    "result": "error"}):
                break
            await asyncio.sleep(0.01)
        assert 1.0 == daemon.registry.get_sample_value("tokenproxy_token_refresh_total", {
            "provider": "api", "trigger": "initial", "grant": "state_file", "result": "error"})
    # Once the lock is free the daemon recovers by itself (backoff, then a new attempt).
    await clock.tick(1.3)
    for _ in range(400):
        async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{daemon.port()}/echo/x"
        ) as resp:
            if resp.status == 200:
                break
        await asyncio.sleep(0.02)
    assert 200 == resp.status


def test_bad_ca_file_is_a_config_error(tmp_path: Path) -> None:
    """A ca_file that is not a PEM bundle is refused at load, naming the key."""
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    raw = proxy_config("https://h.example/", TOKEN)
    raw["routes"][0]["ca_file"] = str(bad)
    with pytest.raises(ConfigError, match=r"routes\[0\]\.ca_file: .* no usable PEM"):
        build_config(raw, {})


def test_check_config_hides_query_strings(tmp_path: Path) -> None:
    """A json provider's login URL with a query prints without the query."""
    raw = proxy_config("https://h.example/", TOKEN, state_path=str(tmp_path / "state.json"))
    raw["providers"] = {"legacy": {"type": "json", "login": {
        "url": "https://h.example/login?api_key=QUERYSECRET123", "json": {"u": "me"}}}}
    raw["routes"][0]["provider"] = "legacy"
    text = "\n".join(summary(build_config(raw, {})))
    assert "QUERYSECRET123" not in text
    assert "https://h.example/login" in text


async def test_unauthenticated_provider_recovers_on_reload(
    aiohttp_server: AiohttpServer, make_proxy: MakeProxy, clock: FakeClock, tmp_path: Path
) -> None:
    """A provider logged out by invalid_client tries again on reload, even when the file did
    not change (the fix was made at the identity provider)."""
    issuer, _ = await start_issuer(aiohttp_server, clock)
    issuer.client_secret = "rotated-at-the-idp"
    raw = oauth2_config(issuer, tmp_path)
    daemon = await make_proxy(raw)
    for _ in range(300):
        if daemon.registry.get_sample_value("tokenproxy_provider_authenticated",
                                            {"provider": "idp"}) == 0:
            break
        await asyncio.sleep(0.01)
    source = daemon.source("idp")
    assert isinstance(source, TokenManager)
    assert source.unauthenticated
    issuer.client_secret = CLIENT_SECRET          # the IdP side is fixed
    await daemon.reload(build_config(raw, {}))    # same file
    await wait_ready(daemon.admin_port)
    async with aiohttp.ClientSession() as s, s.get(
        f"http://127.0.0.1:{daemon.port()}/x"
    ) as resp:
        assert 200 == resp.status


def test_redactor_keeps_only_live_tokens() -> None:
    """Tracked tokens: the current and previous one per owner are masked, older ones dropped,
    so the working set stays small however many refreshes happen."""
    r = log.Redactor(["config-secret-value"])
    for n in range(100):
        r.track("idp", f"token-number-{n:04d}")
    text = r.scrub(
        "a token-number-0099 b token-number-0098 c token-number-0001 config-secret-value")
    assert "a *** b *** c token-number-0001 ***" == text


async def test_short_static_token_keeps_response_headers(
    make_proxy: MakeProxy, upstream: TestServer
) -> None:
    """A short token ("1") does not make the proxy drop headers that merely contain it."""
    daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), "1"))
    async with aiohttp.ClientSession() as s, s.get(
        f"http://127.0.0.1:{daemon.port()}/cookies"
    ) as resp:
        assert 2 == len(resp.headers.getall("Set-Cookie"))
        assert "Date" in resp.headers


async def test_websocket_refusal_keeps_www_authenticate(
    aiohttp_server: AiohttpServer, make_proxy: MakeProxy
) -> None:
    """An upstream refusing the WebSocket upgrade with 401 passes WWW-Authenticate back."""
    async def deny(request: web.Request) -> web.Response:
        return web.Response(status=401, headers={"WWW-Authenticate": 'Bearer realm="x"'})

    app = web.Application()
    app.router.add_get("/ws", deny)
    server = await aiohttp_server(app)
    daemon = await make_proxy(proxy_config(f"http://127.0.0.1:{server.port}/", TOKEN))
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await s.ws_connect(f"http://127.0.0.1:{daemon.port()}/ws")
    assert 401 == info.value.status
    assert 'Bearer realm="x"' == (info.value.headers or {}).get("WWW-Authenticate")


async def test_shutdown_lets_a_token_call_finish_and_persist(
    aiohttp_server: AiohttpServer, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    """Stopping while a token call is in flight waits for it and writes its result."""
    async def token(request: web.Request) -> web.Response:
        await asyncio.sleep(0.4)
        return web.json_response({"access_token": "slow-call-token-5678", "expires_in": 300,
                                  "refresh_token": "slow-call-refresh-9012"})

    app = web.Application()
    app.router.add_post("/token", token)
    server = await aiohttp_server(app)
    state = tmp_path / "s.json"
    raw = proxy_config("http://127.0.0.1:9/", TOKEN, state_path=str(state))
    raw["providers"] = {"api": {"type": "oauth2",
                                "token_url": f"http://127.0.0.1:{server.port}/token",
                                "client_id": "c", "client_secret": CLIENT_SECRET}}
    daemon = await make_proxy(raw)
    await asyncio.sleep(0.1)                 # the initial call is in flight
    await daemon.stop(grace=1)
    assert "slow-call-refresh-9012" in state.read_text()


async def test_reload_of_token_providers_under_load_fails_no_request(
    aiohttp_server: AiohttpServer, make_proxy: MakeProxy, clock: FakeClock, tmp_path: Path
) -> None:
    """An oauth2 provider's settings change (same identity, then a new client) under
    concurrent traffic: no request fails, and the identity change logs in anew."""
    issuer, _ = await start_issuer(aiohttp_server, clock)
    issuer.lifetime = 3600
    daemon = await make_proxy(oauth2_config(issuer, tmp_path, refresh_margin="2s"))
    await wait_ready(daemon.admin_port)
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
