"""WebSocket upgrades: handshake upstream first (token attached, one retry), then pump frames."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import aiohttp
from aiohttp import WSMsgType, web

from tokenproxy.errors import UpstreamError
from tokenproxy.proxy.aiohttp_path.client import RedirectRefused
from tokenproxy.proxy.aiohttp_path.responses import RelayedResponse, relayed_headers
from tokenproxy.proxy.failures import upstream_error
from tokenproxy.proxy.rules.headers import Header
from tokenproxy.proxy.runtime import Outcome, Proxy, bounded

if TYPE_CHECKING:
    from tokenproxy.proxy.aiohttp_path.handler import AiohttpHandler
    from tokenproxy.proxy.rules.target import CompiledRoute

MAX_MESSAGE: Final = 4 * 1024 * 1024
# Handshake fields the client library sets itself for the upstream leg.
_HANDSHAKE: Final = frozenset({
    "sec-websocket-key", "sec-websocket-version", "sec-websocket-extensions",
    "sec-websocket-protocol",
})
# Close codes that must not be sent on the wire (RFC 6455 section 7.4.1).
_UNSENDABLE: Final = frozenset({1005, 1006, 1015})


def is_websocket_upgrade(request: web.BaseRequest) -> bool:
    if request.method != "GET":
        return False
    upgrade = request.headers.get("Upgrade", "")
    if "websocket" not in upgrade.lower():
        return False
    return "upgrade" in request.headers.get("Connection", "").lower()


def _close_code(code: Any) -> int:
    if not isinstance(code, int) or code in _UNSENDABLE or not 1000 <= code <= 4999:
        return 1011 if code in _UNSENDABLE else 1000
    return code


async def _pump(
    src: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
    dst: aiohttp.ClientWebSocketResponse | web.WebSocketResponse,
) -> None:
    while True:
        msg = await src.receive()
        if msg.type == WSMsgType.TEXT:
            await dst.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await dst.send_bytes(msg.data)
        elif msg.type == WSMsgType.PING:
            await dst.ping(msg.data)        # payload kept: some peers check it
        elif msg.type == WSMsgType.PONG:
            await dst.pong(msg.data)
        elif msg.type == WSMsgType.CLOSE:
            await dst.close(code=_close_code(msg.data), message=(msg.extra or "").encode()[:123])
            return
        else:   # CLOSING, CLOSED, ERROR
            return


async def proxy_websocket(
    handler: AiohttpHandler,
    proxy: Proxy,
    request: web.BaseRequest,
    compiled: CompiledRoute,
    path: str,
    query: str | None,
    outcome: Outcome,
) -> web.StreamResponse:
    route = compiled.route
    source = proxy.source_for(compiled)
    token = await bounded(source.current(), compiled, source.name)
    url = compiled.upstream_url(path, query)
    base, client_auth = handler.request_headers(proxy, request, compiled)
    for name in list(base.keys()):
        if name.lower() in _HANDSHAKE:
            del base[name]
    protocols = [
        p.strip()
        for value in request.headers.getall("Sec-WebSocket-Protocol", ())
        for p in value.split(",")
        if p.strip()
    ]
    upstream: aiohttp.ClientWebSocketResponse | None = None
    while True:
        headers = base.copy()
        if not client_auth:
            headers[route.header] = compiled.header_value(token.value)
        refusal: tuple[int, Sequence[Header]] | None = None
        try:
            async with asyncio.timeout(route.timeout):
                upstream = await handler.websocket_session.ws_connect(
                    url, headers=headers, protocols=protocols, autoping=False,
                    autoclose=False, max_msg_size=MAX_MESSAGE, ssl=proxy.ssl_for(compiled),
                    compress=0,
                )
        except aiohttp.WSServerHandshakeError as exc:
            refusal = exc.status, [(k.encode("utf-8", "surrogateescape"),
                                    v.encode("utf-8", "surrogateescape"))
                                   for k, v in (exc.headers or {}).items()]
        except RedirectRefused as exc:
            refusal = exc.status, exc.headers
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise upstream_error(exc) from None
        # The handshake has no body: a refused one can always be sent again.
        fresh = await proxy.token_for_retry(
            101 if refusal is None else refusal[0], compiled, source, token, outcome=outcome,
            target=(route.label, "GET", path), client_auth=client_auth, replayable=True,
            drop=lambda: None)
        if fresh is None:
            break
        token = fresh
    if refusal is not None:
        status, raw = refusal
        if not 300 <= status <= 599:
            raise UpstreamError("reset", "the upstream refused the WebSocket upgrade")
        # The upstream's refusal or redirect, passed back with its headers
        # (WWW-Authenticate, Location into the proxy) -- never followed with the token.
        # aiohttp does not keep the body of a refused handshake.
        kept = relayed_headers(proxy, compiled, raw, token.value.encode())
        kept.popall("Content-Encoding", None)
        kept["Content-Length"] = "0"
        return RelayedResponse(status=status, headers=kept)
    assert upstream is not None
    client = web.WebSocketResponse(
        protocols=(upstream.protocol,) if upstream.protocol else (),
        autoping=False, autoclose=False, max_msg_size=MAX_MESSAGE, compress=False,
    )
    try:
        await client.prepare(request)
        outcome.status = 101
        tasks = [asyncio.create_task(_pump(client, upstream)),
                 asyncio.create_task(_pump(upstream, client))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
    finally:
        with contextlib.suppress(Exception):
            await upstream.close()
        with contextlib.suppress(Exception):
            await client.close()
    return client
