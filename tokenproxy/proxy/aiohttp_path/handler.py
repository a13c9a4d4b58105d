"""The aiohttp path: every request the fast path hands over (or all of them, with the fast path
off) -- chunked and 100-continue bodies, HTTP/1.0, WebSocket upgrades, and every request a
check refuses. Same rules as the fast path (proxy/rules), on aiohttp's server and client.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable
from typing import Any, Final

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from tokenproxy import log
from tokenproxy.errors import RequestRejected, TokenError, UpstreamError
from tokenproxy.proxy.aiohttp_path.body import ReplayableBody
from tokenproxy.proxy.aiohttp_path.client import UpstreamSessions
from tokenproxy.proxy.aiohttp_path.responses import (
    ProblemResponse,
    RelayedResponse,
    as_multidict,
    problem_response,
    relayed_headers,
)
from tokenproxy.proxy.aiohttp_path.websocket import is_websocket_upgrade, proxy_websocket
from tokenproxy.proxy.failures import upstream_error
from tokenproxy.proxy.rules.headers import NO_BODY_STATUSES, request_headers, safe_reason
from tokenproxy.proxy.rules.problem import Problem
from tokenproxy.proxy.rules.reuse import last_request
from tokenproxy.proxy.rules.target import CompiledRoute, split_target
from tokenproxy.proxy.runtime import Outcome, Proxy, Sending, bounded
from tokenproxy.tokens.source import Token

MALFORMED_BODY: Final = Problem(400, "bad_request", "the request body is malformed")


class AiohttpHandler:
    """aiohttp's request handler for the proxy listeners. The Proxy is looked up per request,
    so a reload applies to open connections too."""

    def __init__(self, proxy: Callable[[], Proxy], sessions: UpstreamSessions) -> None:
        self._proxy = proxy
        self._sessions = sessions
        self._log = log.get_logger()

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        proxy = self._proxy()
        started = time.perf_counter()   # uvloop's loop.time() ticks in whole milliseconds
        outcome = Outcome()
        proxy.metrics.inflight.inc()
        try:
            resp = await self._dispatch(proxy, request, outcome)
            outcome.status = resp.status
            if isinstance(resp, ProblemResponse) and request.method != "HEAD":
                outcome.bytes += resp.content_length or 0   # aiohttp sends no body for HEAD
            return resp
        finally:
            proxy.metrics.inflight.dec()
            proxy.record(request.method, request.raw_path, outcome,
                         time.perf_counter() - started)

    async def _dispatch(self, proxy: Proxy, request: web.BaseRequest, outcome: Outcome
                        ) -> web.StreamResponse:
        try:
            path, query = split_target(request.method, request.raw_path)
            proxy.policy.check(request.raw_headers,
                               len(request.method) + len(request.raw_path) + 12)
            compiled = proxy.table.match(path)
            if compiled is None:
                raise RequestRejected(404, "not_found", "no route matches this path")
            outcome.route = compiled.route.label
            if is_websocket_upgrade(request):
                return await proxy_websocket(self, proxy, request, compiled, path, query,
                                             outcome)
            return await self._forward(proxy, request, compiled, path, query, outcome)
        except HttpProcessingError:
            # Bad framing in the body (a bad chunk size) found while buffering it.
            proxy.metrics.rejected.labels("bad_request").inc()
            return problem_response(MALFORMED_BODY)
        except UpstreamError as exc:
            if isinstance(request.content.exception(), HttpProcessingError):
                # The body's framing broke while it streamed upstream: the client's fault.
                proxy.metrics.rejected.labels("bad_request").inc()
                return problem_response(MALFORMED_BODY)
            return problem_response(proxy.failed(exc, outcome))
        except (RequestRejected, TokenError) as exc:
            return problem_response(proxy.failed(exc, outcome))

    # -- plain HTTP --------------------------------------------------------------------------

    def request_headers(self, proxy: Proxy, request: web.BaseRequest,
                        compiled: CompiledRoute) -> tuple[CIMultiDict[str], bool]:
        """The client's fields for the upstream (rules/headers.py), and whether the client
        sent its own auth header. Content-Length is written from the length aiohttp read."""
        route = compiled.route
        out, client_auth, invalid = request_headers(
            request.raw_headers, drop=proxy.policy.local_headers,
            auth_header=compiled.auth_header_low,
            keep_client_auth=route.client_authorization == "keep",
            preserve_host=route.preserve_host,
        )
        proxy.count_invalid_names(invalid)
        headers = as_multidict(out, proxy.count_not_utf8)
        if request.content_length is not None:
            headers["Content-Length"] = str(request.content_length)   # "0" too, as it came
        return headers, client_auth

    @property
    def websocket_session(self) -> aiohttp.ClientSession:
        """The client for WebSocket handshakes (it refuses to follow redirects)."""
        return self._sessions.websocket

    async def _read_body(self, proxy: Proxy, request: web.BaseRequest,
                         compiled: CompiledRoute) -> ReplayableBody:
        if not request.body_exists:
            return ReplayableBody.empty()
        expect = request.headers.get("Expect")
        if expect is not None:
            if expect.strip().lower() != "100-continue":
                raise RequestRejected(417, "expectation_failed",
                                      "only Expect: 100-continue is supported")
            if request.version >= aiohttp.HttpVersion11:
                await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not compiled.route.retry_on:
            return ReplayableBody.streaming(request.content)
        return await ReplayableBody.read(request.content, request.content_length,
                                         proxy.max_replay, proxy.budget, compiled.route.label)

    async def _forward(self, proxy: Proxy, request: web.BaseRequest, compiled: CompiledRoute,
                       path: str, query: str | None, outcome: Outcome) -> web.StreamResponse:
        source = proxy.source_for(compiled)
        token = await bounded(source.current(), compiled, source.name)
        try:
            # A client that stops sending its body must not hold the connection forever.
            async with asyncio.timeout(compiled.route.timeout):
                body = await self._read_body(proxy, request, compiled)
        except TimeoutError:
            raise RequestRejected(408, "request_timeout",
                                  "the request body did not arrive in time") from None
        try:
            return await self._send_and_relay(proxy, request, compiled, path, query, outcome,
                                              token, body)
        finally:
            body.release()

    async def _send_and_relay(
        self, proxy: Proxy, request: web.BaseRequest, compiled: CompiledRoute, path: str,
        query: str | None, outcome: Outcome, token: Token, body: ReplayableBody,
    ) -> web.StreamResponse:
        route = compiled.route
        source = proxy.source_for(compiled)
        url = compiled.upstream_url(path, query)
        headers, client_auth = self.request_headers(proxy, request, compiled)
        # aiohttp's pool cannot keep a connection for one client (rules/reuse.py): one that
        # carried a client's body, or a HEAD, is closed after its answer, and the upstream
        # told so.
        closing = request.body_exists or last_request(request.method, False)
        if closing:
            headers["Connection"] = "close"
        sending = Sending(compiled, source, token, outcome, (route.label, request.method, path),
                          client_auth, replayable=body.replayable)
        while True:
            if not client_auth:
                headers[route.header] = compiled.header_value(sending.token.value)
            up = await self.send(proxy, compiled, request.method, url, headers, body.payload(),
                                 closing=closing)
            if not await proxy.send_again(sending, up.status, up.close):
                break
            # The refused answer is not relayed. Its body is not worth reading: an upstream
            # that stalls in it would hold this request past any deadline.
            up.close()
        return await self._relay(proxy, request, compiled, up, sending.token, outcome)

    async def send(self, proxy: Proxy, compiled: CompiledRoute, method: str, url: Any,
                   headers: CIMultiDict[str], data: Any, *, closing: bool = False,
                   ) -> aiohttp.ClientResponse:
        """Send upstream; the route timeout runs until the response head has arrived.
        *closing*: on a connection used for this request alone (rules/reuse.py)."""
        session = self._sessions.closing if closing else self._sessions.pooled
        try:
            async with asyncio.timeout(compiled.route.timeout):
                return await session.request(
                    method, url, headers=headers, data=data, allow_redirects=False,
                    ssl=proxy.ssl_for(compiled),
                )
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError) as exc:
            raise upstream_error(exc) from None

    async def _relay(self, proxy: Proxy, request: web.BaseRequest, compiled: CompiledRoute,
                     up: aiohttp.ClientResponse, token: Token, outcome: Outcome,
                     ) -> web.StreamResponse:
        token_bytes = token.value.encode()
        headers = relayed_headers(proxy, compiled, up.raw_headers, token_bytes)
        length = up.headers.get("Content-Length")
        if length is not None:
            headers["Content-Length"] = length   # aiohttp frames the body by it
        reason = safe_reason((up.reason or "").encode("utf-8", "surrogateescape"), token_bytes)
        try:
            shown = reason.decode("utf-8") or None
        except UnicodeDecodeError:
            shown = None   # the standard phrase: aiohttp would drop the bytes that are not
        out = RelayedResponse(status=up.status, headers=headers, reason=shown)
        complete = False
        try:
            outcome.status = up.status
            try:
                await out.prepare(request)
                if request.method == "HEAD" or up.status in NO_BODY_STATUSES:
                    complete = True
                    await out.write_eof()
                    return out
                async for chunk in up.content.iter_any():
                    outcome.bytes += len(chunk)
                    await out.write(chunk)
            except ConnectionResetError:
                return out   # the client left; closing `up` below aborts the upstream side
            except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError,
                    TimeoutError) as exc:
                # The upstream broke mid-body. Never finish the response: a truncated body
                # must look truncated to the client, so close its connection instead.
                proxy.body_failed(compiled.route.label, exc)
                if request.transport is not None:
                    request.transport.close()
                return out
            complete = True
            await out.write_eof()
            return out
        finally:
            if complete:
                up.release()
            else:
                up.close()
