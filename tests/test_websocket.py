"""WebSocket upgrades: the handshake carries the token, frames flow both ways,
close propagates, refusals and redirects pass back (never followed); other upgrades (h2c) are
never honoured."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest
from aiohttp import WSMsgType, web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from tests.helpers.config import MakeProxy, proxy_config, upstream_url
from tests.helpers.fakes import CLIENT_KEY, TOKEN, TOKEN_2, FakeUpstream
from tests.helpers.logs import CapturedLogs
from tests.helpers.net import closed_port
from tests.helpers.rawhttp import first_answer, get
from tests.helpers.rawupstream import MakeRaw, Req, connected, response, serving, start_proxy
from tests.helpers.wait import wait_for
from tokenproxy.daemon import Daemon

WS_TIMEOUT = 5.0
# A WebSocket handshake's request fields, for clients that do not follow it through.
UPGRADE = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
           "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}


class WsUpstream:
    """WebSocket endpoints the fake upstream lacks: push first, close with a code, refuse."""

    def __init__(self) -> None:
        self.handshakes: list[list[tuple[str, str]]] = []
        self.received: list[tuple[WSMsgType, str | bytes]] = []
        self.close_codes: list[int | None] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/push", self.push)
        app.router.add_get("/closer", self.closer)
        app.router.add_get("/deny/{code}", self.deny)
        app.router.add_get("/pinger", self.pinger)
        app.router.add_get("/second-token", self.second_token)
        return app

    async def second_token(self, request: web.Request) -> web.StreamResponse:
        """Accepts the handshake only with TOKEN_2."""
        self.handshakes.append(list(request.headers.items()))
        if request.headers.get("Authorization") != f"Bearer {TOKEN_2}":
            return web.Response(status=401, text="no")
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.close()
        return ws

    async def pinger(self, request: web.Request) -> web.WebSocketResponse:
        """Answers each ping itself with a pong that names the ping's payload."""
        ws = web.WebSocketResponse(autoping=False)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.PING:
                self.received.append((msg.type, msg.data))
                await ws.pong(b"upstream-pong:" + msg.data)
        return ws

    async def push(self, request: web.Request) -> web.WebSocketResponse:
        """Sends a text and a binary frame unasked, records what comes in and the close code."""
        self.handshakes.append(list(request.headers.items()))
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_str("hello from upstream")
        await ws.send_bytes(b"\x00\xffbin")
        async for msg in ws:
            if msg.type in (WSMsgType.TEXT, WSMsgType.BINARY):
                self.received.append((msg.type, msg.data))
        self.close_codes.append(ws.close_code)
        return ws

    async def closer(self, request: web.Request) -> web.WebSocketResponse:
        """Closes with code 4001 and a reason when told to."""
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT and msg.data == "close-me":
                await ws.close(code=4001, message=b"bye")
        return ws

    async def deny(self, request: web.Request) -> web.Response:
        self.handshakes.append(list(request.headers.items()))
        return web.Response(status=int(request.match_info["code"]), text="no")


@pytest.fixture(name="ws_upstream")
async def _ws_upstream(aiohttp_server: AiohttpServer) -> tuple[WsUpstream, TestServer]:
    fake = WsUpstream()
    return fake, await aiohttp_server(fake.app())


def ws_url(daemon: Daemon, path: str) -> str:
    return f"http://127.0.0.1:{daemon.port()}{path}"


def values(headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in headers if k.lower() == name.lower()]


class TestWebSocket:
    async def test_handshake_carries_token(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """The upstream handshake carries exactly one proxy token, the client's own replaced."""
        daemon = await make_proxy(proxy_config(
            upstream_url(upstream), TOKEN, security={"client_key": CLIENT_KEY}))
        headers = {"Authorization": "Bearer client-own", "Tokenproxy-Key": CLIENT_KEY}
        async with aiohttp.ClientSession() as s, \
                s.ws_connect(ws_url(daemon, "/ws"), headers=headers) as ws:
            await ws.send_str("hi")
            msg = await ws.receive(timeout=WS_TIMEOUT)
            assert "echo:hi" == msg.data
        [handshake] = fake_upstream.ws_headers
        assert [f"Bearer {TOKEN}"] == values(handshake, "Authorization")
        assert [] == values(handshake, "Tokenproxy-Key")
        assert ["websocket"] == [v.lower() for v in values(handshake, "Upgrade")]

    async def test_text_and_binary_frames_both_ways(
        self, make_proxy: MakeProxy, ws_upstream: tuple[WsUpstream, TestServer]
    ) -> None:
        """Text and binary frames pass from upstream to client and from client to upstream."""
        fake, server = ws_upstream
        daemon = await make_proxy(proxy_config(upstream_url(server), TOKEN))
        async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(daemon, "/push")) as ws:
            first = await ws.receive(timeout=WS_TIMEOUT)
            second = await ws.receive(timeout=WS_TIMEOUT)
            await ws.send_str("text from client")
            await ws.send_bytes(b"\x01\x02\x00bytes")
            await wait_for(lambda: len(fake.received) == 2, "both frames upstream", 2.0)
        assert (WSMsgType.TEXT, "hello from upstream") == (first.type, first.data)
        assert (WSMsgType.BINARY, b"\x00\xffbin") == (second.type, second.data)
        assert [(WSMsgType.TEXT, "text from client"),
                (WSMsgType.BINARY, b"\x01\x02\x00bytes")] == fake.received
        assert [f"Bearer {TOKEN}"] == values(fake.handshakes[0], "Authorization")

    async def test_echo_round_trip(self, make_proxy: MakeProxy, upstream: TestServer) -> None:
        """Frames the client sends come back through the upstream's echo, text and binary."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream), TOKEN))
        async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(daemon, "/ws")) as ws:
            await ws.send_str("ping?")
            text = await ws.receive(timeout=WS_TIMEOUT)
            await ws.send_bytes(bytes(range(256)))
            binary = await ws.receive(timeout=WS_TIMEOUT)
        assert (WSMsgType.TEXT, "echo:ping?") == (text.type, text.data)
        assert (WSMsgType.BINARY, bytes(range(256))) == (binary.type, binary.data)

    async def test_subprotocol_negotiated(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """The client's offered subprotocols reach the upstream and its choice comes back."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream), TOKEN))
        async with aiohttp.ClientSession() as s, \
                s.ws_connect(ws_url(daemon, "/ws"), protocols=("x-other", "chat")) as ws:
            assert "chat" == ws.protocol
        offered = ",".join(values(fake_upstream.ws_headers[0], "Sec-WebSocket-Protocol"))
        assert ["x-other", "chat"] == [p.strip() for p in offered.split(",")]

    async def test_client_close_reaches_upstream(
        self, make_proxy: MakeProxy, ws_upstream: tuple[WsUpstream, TestServer]
    ) -> None:
        """A close from the client reaches the upstream with its code."""
        fake, server = ws_upstream
        daemon = await make_proxy(proxy_config(upstream_url(server), TOKEN))
        async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(daemon, "/push")) as ws:
            await ws.receive(timeout=WS_TIMEOUT)
            await ws.receive(timeout=WS_TIMEOUT)
            await ws.close(code=4000, message=b"done")
        await wait_for(lambda: bool(fake.close_codes), "the close upstream", 2.0)
        assert [4000] == fake.close_codes

    async def test_upstream_close_reaches_client(
        self, make_proxy: MakeProxy, ws_upstream: tuple[WsUpstream, TestServer]
    ) -> None:
        """A close from the upstream reaches the client with its code and reason."""
        _, server = ws_upstream
        daemon = await make_proxy(proxy_config(upstream_url(server), TOKEN))
        async with aiohttp.ClientSession() as s, s.ws_connect(ws_url(daemon, "/closer")) as ws:
            await ws.send_str("close-me")
            msg = await ws.receive(timeout=WS_TIMEOUT)
            assert WSMsgType.CLOSE == msg.type
            assert 4001 == msg.data
            assert "bye" == msg.extra
        assert 4001 == ws.close_code

    @pytest.mark.parametrize("status", [401, 403])
    async def test_upstream_refusal_passed_back(
        self, make_proxy: MakeProxy, ws_upstream: tuple[WsUpstream, TestServer], status: int
    ) -> None:
        """An upstream that refuses the upgrade with 401/403 gets that status to the client."""
        fake, server = ws_upstream
        daemon = await make_proxy(proxy_config(upstream_url(server), TOKEN))
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.WSServerHandshakeError) as caught:
                async with s.ws_connect(ws_url(daemon, f"/deny/{status}")):
                    pass
        assert status == caught.value.status
        assert fake.handshakes
        assert [f"Bearer {TOKEN}"] == values(fake.handshakes[0], "Authorization")

    async def test_refused_handshake_retried_once_with_a_newer_token(
        self, make_proxy: MakeProxy, ws_upstream: tuple[WsUpstream, TestServer],
        tmp_path: Path, logs: CapturedLogs,
    ) -> None:
        """A 401 to the handshake is retried with a newer token like any request: counted in
        tokenproxy_auth_retries_total and logged retried."""
        fake, server = ws_upstream
        token_file = tmp_path / "token"
        token_file.write_text(TOKEN)
        raw = proxy_config(upstream_url(server), TOKEN)
        raw["providers"] = {"api": {"type": "static", "token_file": str(token_file)}}
        daemon = await make_proxy(raw)
        token_file.write_text(TOKEN_2)   # seen when the 401 makes the provider look again
        async with aiohttp.ClientSession() as s, \
                s.ws_connect(ws_url(daemon, "/second-token")) as ws:
            await ws.receive(timeout=WS_TIMEOUT)
        assert [[f"Bearer {TOKEN}"], [f"Bearer {TOKEN_2}"]] == [
            values(h, "Authorization") for h in fake.handshakes]
        assert 1 == daemon.registry.get_sample_value(
            "tokenproxy_auth_retries_total", {"route": "/", "outcome": "success"})
        await wait_for(lambda: bool(logs.events("request")), "the request logged", 2.0)
        assert [(101, True)] == [(e["status"], e["retried"]) for e in logs.events("request")]

    async def test_h2c_upgrade_never_honoured(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """Upgrade: h2c gets a plain HTTP/1.1 answer, is not forwarded, and HTTP/1.1 continues."""
        daemon = await make_proxy(proxy_config(upstream_url(upstream), TOKEN))
        async with connected(daemon.port()) as conn:
            # A real h2c client waits for the answer before sending more (RFC 7540 3.2).
            first = await conn.request(
                "GET /echo/h2c HTTP/1.1\nHost: 127.0.0.1\n"
                "Connection: Upgrade, HTTP2-Settings\nUpgrade: h2c\n"
                "HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\n\n")
            after = await conn.request("GET /echo/after HTTP/1.1\nHost: 127.0.0.1\n\n")
        assert 200 == first.status
        assert "/echo/h2c" == json.loads(first.body)["raw_path"]
        assert 200 == after.status
        assert "/echo/after" == json.loads(after.body)["raw_path"]
        assert ["/echo/h2c", "/echo/after"] == [s.raw_path for s in fake_upstream.seen]
        upgraded = fake_upstream.seen[0]
        assert [] == upgraded.header("Upgrade")
        assert [] == upgraded.header("HTTP2-Settings")
        assert [] == [v for v in upgraded.header("Connection") if "upgrade" in v.lower()]

    async def test_ping_and_pong_forwarded_with_payload(
        self, make_proxy: MakeProxy, ws_upstream: tuple[WsUpstream, TestServer]
    ) -> None:
        """A client ping reaches the upstream with its payload; the upstream's pong comes back."""
        fake, server = ws_upstream
        daemon = await make_proxy(proxy_config(upstream_url(server), TOKEN))
        async with aiohttp.ClientSession() as s, \
                s.ws_connect(ws_url(daemon, "/pinger"), autoping=False) as ws:
            await ws.ping(b"are-you-there")
            msg = await ws.receive(timeout=WS_TIMEOUT)
        assert [(WSMsgType.PING, b"are-you-there")] == fake.received
        assert (WSMsgType.PONG, b"upstream-pong:are-you-there") == (msg.type, msg.data)

    async def test_websocket_refusal_keeps_www_authenticate(
        self, aiohttp_server: AiohttpServer, make_proxy: MakeProxy
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

    async def test_unreachable_upstream_is_502(self, make_proxy: MakeProxy) -> None:
        """An upgrade to an unreachable upstream gets a 502 problem, not a dead socket."""
        daemon = await make_proxy(proxy_config(f"http://127.0.0.1:{closed_port()}/", TOKEN))
        async with aiohttp.ClientSession() as s, s.get(ws_url(daemon, "/ws"),
                                                       headers=UPGRADE) as resp:
            assert 502 == resp.status
            assert "upstream_unreachable" == resp.headers["Tokenproxy-Error"]
            assert "application/problem+json" == resp.content_type
        assert 1.0 == daemon.registry.get_sample_value(
            "tokenproxy_upstream_errors_total", {"route": "/", "kind": "connect"})


# -- handshakes the upstream redirects or refuses, over a raw upstream ------------------------


@pytest.mark.slow
@pytest.mark.parametrize("header", ["X-Api-Key", "Authorization"])
async def test_a_websocket_handshake_redirect_is_passed_back_not_followed(
    make_proxy: MakeProxy, raw_upstream: MakeRaw, header: str,
) -> None:
    """The upstream answers a WebSocket handshake with ``302 Location:`` another origin.
    aiohttp's ws_connect would follow it with the route's token header (it drops only
    Authorization across origins): the handshake goes through a client that refuses
    redirects, and the 302 is passed back to the client, as on the HTTP path."""
    thief = await raw_upstream(serving(lambda r: response(b"stolen")))

    def redirect(req: Req) -> bytes:
        return response(b"", "302 Found", f"Location: {thief.url('/steal')}")

    up = await raw_upstream(serving(redirect))
    daemon = await start_proxy(make_proxy, up, {"header": header, "value": "Bearer {token}"})
    async with aiohttp.ClientSession() as s, s.get(
            ws_url(daemon, "/ws"), headers=UPGRADE, allow_redirects=False) as answer:
        # Passed back as the HTTP path passes a redirect back: the client decides.
        assert (302, thief.url("/steal")) == (answer.status, answer.headers.get("Location"))
        assert "Server" not in answer.headers
    await asyncio.sleep(0.1)
    assert [] == thief.targets, "the handshake followed the upstream's redirect"


async def test_a_refused_websocket_handshake_names_no_server_version(
    make_proxy: MakeProxy, raw_upstream: MakeRaw,
) -> None:
    """A refused handshake is passed back without aiohttp's ``Server: Python/...
    aiohttp/...`` (it names versions), as every other answer."""
    up = await raw_upstream(serving(lambda r: response(b"no", "403 Forbidden")))
    daemon = await start_proxy(make_proxy, up)
    resp = await first_answer(daemon.port(), get(
        "/ws", "localhost", *(f"{name}: {value}" for name, value in UPGRADE.items())))
    assert 403 == resp.status
    assert [] == resp.header("Server")
