"""WebSocket upgrades: handshake upstream first (token attached, one retry), then pump frames."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

import aiohttp
from aiohttp import WSMsgType, web
from multidict import CIMultiDict

from tokenproxy.errors import UpstreamError
from tokenproxy.proxy.aiohttp_path.client import RedirectRefused
from tokenproxy.proxy.aiohttp_path.responses import RelayedResponse, relayed_headers
from tokenproxy.proxy.failures import upstream_error
from tokenproxy.proxy.rules.headers import Header
from tokenproxy.proxy.runtime import Outcome, Proxy, Sending, bounded

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


@dataclass(frozen=True, slots=True)
class _Refusal:
    """The upstream's answer to a handshake when it was not an upgrade."""

    status: int
    headers: Sequence[Header]


async def proxy_websocket(
    handler: AiohttpHandler, proxy: Proxy, request: web.BaseRequest, compiled: CompiledRoute,
    path: str, query: str | None, outcome: Outcome,
) -> web.StreamResponse:
    """Handshake upstream first (token attached, once more after a refusal), then relay
    frames both ways; a refusal or redirect is passed back, never followed."""
    source = proxy.source_for(compiled)
    headers, client_auth = handler.request_headers(proxy, request, compiled)
    for name in list(headers.keys()):
        if name.lower() in _HANDSHAKE:
            del headers[name]   # the client library sets its own for the upstream leg
    token = await bounded(source.current(), compiled, source.name)
    # The handshake has no body: a refused one can always be sent again.
    sending = Sending(compiled, source, token, outcome, (compiled.route.label, "GET", path),
                      client_auth, replayable=True)
    answer = await _handshake(handler, proxy, sending, compiled.upstream_url(path, query),
                              headers, _protocols(request))
    if isinstance(answer, _Refusal):
        return _pass_back(proxy, sending, answer)
    return await _relay_frames(request, answer, outcome)


def _protocols(request: web.BaseRequest) -> list[str]:
    return [p.strip() for value in request.headers.getall("Sec-WebSocket-Protocol", ())
            for p in value.split(",") if p.strip()]


async def _handshake(
    handler: AiohttpHandler, proxy: Proxy, sending: Sending, url: Any,
    base: CIMultiDict[str], protocols: list[str],
) -> aiohttp.ClientWebSocketResponse | _Refusal:
    compiled = sending.compiled
    route = compiled.route
    while True:
        headers = base.copy()
        if not sending.client_auth:
            headers[route.header] = compiled.header_value(sending.token.value)
        answer: aiohttp.ClientWebSocketResponse | _Refusal
        try:
            async with asyncio.timeout(route.timeout):
                answer = await handler.websocket_session.ws_connect(
                    url, headers=headers, protocols=protocols, autoping=False,
                    autoclose=False, max_msg_size=MAX_MESSAGE, ssl=proxy.ssl_for(compiled),
                    compress=0,
                )
        except aiohttp.WSServerHandshakeError as exc:
            answer = _Refusal(exc.status, [(k.encode("utf-8", "surrogateescape"),
                                            v.encode("utf-8", "surrogateescape"))
                                           for k, v in (exc.headers or {}).items()])
        except RedirectRefused as exc:
            answer = _Refusal(exc.status, exc.headers)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise upstream_error(exc) from None
        status = answer.status if isinstance(answer, _Refusal) else 101
        if not await proxy.send_again(sending, status, lambda: None):
            return answer


def _pass_back(proxy: Proxy, sending: Sending, refusal: _Refusal) -> web.StreamResponse:
    """The upstream's refusal or redirect, with its headers (WWW-Authenticate, a Location
    into the proxy); aiohttp keeps no body of a refused handshake."""
    if not 300 <= refusal.status <= 599:
        raise UpstreamError("reset", "the upstream refused the WebSocket upgrade")
    kept = relayed_headers(proxy, sending.compiled, refusal.headers,
                           sending.token.value.encode())
    kept.popall("Content-Encoding", None)
    kept["Content-Length"] = "0"
    return RelayedResponse(status=refusal.status, headers=kept)


async def _relay_frames(request: web.BaseRequest, upstream: aiohttp.ClientWebSocketResponse,
                        outcome: Outcome) -> web.StreamResponse:
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
