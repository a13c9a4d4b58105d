"""The proxy handler: check, route, attach the token, send, retry once on 401, relay the stream."""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

import aiohttp
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from yarl import URL

from tokenproxy import log
from tokenproxy.config import Config
from tokenproxy.errors import RequestRejected, TokenError, TokenUnavailable, UpstreamError
from tokenproxy.metrics import Metrics, method_label
from tokenproxy.proxy import wire
from tokenproxy.proxy.body import ReplayableBody, ReplayBudget
from tokenproxy.proxy.deadline import bounded
from tokenproxy.proxy.headers import (
    MIN_ECHO_TOKEN,
    forward_request_headers,
    forward_response_headers,
)
from tokenproxy.proxy.problem import ProblemResponse, problem_response
from tokenproxy.proxy.retry import RetryAction, retry_action
from tokenproxy.proxy.reuse import last_request
from tokenproxy.proxy.security import SecurityPolicy
from tokenproxy.proxy.target import CompiledRoute, RouteTable, split_target
from tokenproxy.proxy.upstream import (
    UpstreamSessions,
    error_kind,
    ssl_contexts,
    upstream_error,
)
from tokenproxy.proxy.websocket import is_websocket_upgrade, proxy_websocket
from tokenproxy.proxy.wire import Header
from tokenproxy.tokens.model import Token, TokenSource

NO_BODY_STATUSES: Final = frozenset({204, 304})
# A 401 body read before retrying, so the pooled connection can be reused; larger ones close it.
DISCARD_LIMIT: Final = 64 * 1024
CLIENT_GONE: Final = 499   # nginx's code for "the client closed the connection first"
MALFORMED_BODY: Final = "the request body is malformed"


class RelayedResponse(web.StreamResponse):
    """A StreamResponse that sends the upstream's headers as they were.

    aiohttp invents ``Content-Type: application/octet-stream`` for a body without one; a
    proxy must not add what the upstream did not say (browsers would stop sniffing, and a
    client could not tell). Nor its ``Server`` (which names versions); its Date stays, as on
    the fast path.
    """

    async def _prepare_headers(self) -> None:
        had_type = "Content-Type" in self.headers
        had_server = "Server" in self.headers
        request = self._req
        if (request is not None and request.version < aiohttp.HttpVersion11
                and "Content-Length" not in self.headers):
            # An HTTP/1.0 client can only see the end of an unframed body as the close:
            # decided before aiohttp renders the head, or it keeps the connection open.
            self.force_close()
        await super()._prepare_headers()
        if not had_type:
            self.headers.popall("Content-Type", None)
        if not had_server:
            self.headers.popall("Server", None)   # aiohttp's, naming its version


@dataclass(slots=True)
class Outcome:
    """What the access log and metrics report about one request."""

    route: str = "-"
    status: int = CLIENT_GONE
    bytes: int = 0
    retried: bool = False


class Proxy:
    """Everything the request path needs, built once per config (start or reload)."""

    def __init__(
        self,
        cfg: Config,
        *,
        sources: Mapping[str, TokenSource],
        sessions: UpstreamSessions,
        metrics: Metrics,
        budget: ReplayBudget,
    ) -> None:
        self.table = RouteTable(cfg.routes)
        self.policy = SecurityPolicy(cfg.security, cfg.limits)
        self._local_headers = self.policy.local_headers
        self._sources = sources
        self._sessions = sessions
        self.metrics = metrics
        self._dropped_invalid = metrics.dropped_headers.labels("invalid_name")
        self.max_replay = cfg.limits.max_replay_body
        self.budget = budget   # the daemon's, shared across reloads
        self._ssl: dict[str, ssl.SSLContext | bool] = {}
        contexts = ssl_contexts(r.ca_file for r in cfg.routes)
        for r in cfg.routes:
            self._ssl[r.prefix] = contexts[r.ca_file] if r.ca_file else True
        self._log = log.get_logger()
        self._background: set[asyncio.Task[Any]] = set()
        self._count_cache: dict[tuple[str, str, int], Any] = {}
        self._duration_cache: dict[str, Any] = {}
        # The fast path's per-route constants (fastpath.py): rendered once per config.
        self._fast_drop = frozenset(n.encode() for n in self._local_headers)
        self._fast_origin: dict[str, tuple[str, str, int, ssl.SSLContext | None]] = {}
        default_tls: ssl.SSLContext | None = None
        for r in cfg.routes:
            url = URL(r.upstream.origin)
            tls: ssl.SSLContext | None = None
            if url.scheme == "https":
                ctx = self._ssl[r.prefix]
                if not isinstance(ctx, ssl.SSLContext):
                    if default_tls is None:
                        default_tls = ssl.create_default_context()
                    ctx = default_tls
                tls = ctx
            assert url.raw_host is not None
            assert url.port is not None
            self._fast_origin[r.prefix] = (url.scheme, url.raw_host, url.port, tls)
        self._fast_auth: dict[str, tuple[Token | None, bytes]] = {}

    # -- entry point -------------------------------------------------------------------------

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        started = time.perf_counter()   # uvloop's loop.time() ticks in whole milliseconds
        outcome = Outcome()
        self.metrics.inflight.inc()
        try:
            resp = await self._dispatch(request, outcome)
            outcome.status = resp.status
            if isinstance(resp, ProblemResponse):
                outcome.bytes += resp.content_length or 0
            return resp
        finally:
            self.metrics.inflight.dec()
            self._record(request, outcome, time.perf_counter() - started)

    def _record(self, request: web.BaseRequest, outcome: Outcome, duration: float) -> None:
        self.record(request.method, request.raw_path, outcome, duration)

    def record(self, method: str, raw_path: str, outcome: Outcome, duration: float) -> None:
        """Count, time and log one answered request (both paths)."""
        method = method_label(method)
        key = (outcome.route, method, outcome.status)
        counter = self._count_cache.get(key)
        if counter is None:
            counter = self.metrics.requests.labels(outcome.route, method, str(outcome.status))
            self._count_cache[key] = counter
        counter.inc()
        if outcome.route != "-":
            hist = self._duration_cache.get(outcome.route)
            if hist is None:
                hist = self.metrics.request_duration.labels(outcome.route)
                self._duration_cache[outcome.route] = hist
            hist.observe(duration)
        log.access().request(
            route=outcome.route,
            method=method,
            path=raw_path,
            status=outcome.status,
            duration_ms=round(duration * 1000, 3),
            bytes=outcome.bytes,
            retried=outcome.retried,
        )

    async def _dispatch(self, request: web.BaseRequest, outcome: Outcome) -> web.StreamResponse:
        try:
            path, query = split_target(request.method, request.raw_path)
            self.policy.check(
                request.headers, request.raw_headers,
                len(request.method) + len(request.raw_path) + 12,
            )
            compiled = self.table.match(path)
            if compiled is None:
                raise RequestRejected(404, "not_found", "no route matches this path")
            outcome.route = compiled.route.label
            if is_websocket_upgrade(request):
                return await proxy_websocket(self, request, compiled, path, query, outcome)
            return await self._forward(request, compiled, path, query, outcome)
        except RequestRejected as exc:
            self.metrics.rejected.labels(exc.cause).inc()
            # Framing and size errors leave the connection in doubt: close it.
            return problem_response(exc.status, exc.cause, exc.detail,
                                    close=exc.status in (400, 408, 431))
        except HttpProcessingError:
            # Bad framing in the body (a bad chunk size) found while buffering it.
            self.metrics.rejected.labels("bad_request").inc()
            return problem_response(400, "bad_request", MALFORMED_BODY, close=True)
        except UpstreamError as exc:
            if isinstance(request.content.exception(), HttpProcessingError):
                # The body's framing broke while it streamed upstream: the client's fault.
                self.metrics.rejected.labels("bad_request").inc()
                return problem_response(400, "bad_request", MALFORMED_BODY, close=True)
            self.metrics.upstream_errors.labels(outcome.route, exc.kind).inc()
            return problem_response(exc.status, exc.cause, exc.detail)
        except TokenUnavailable as exc:
            return problem_response(exc.status, exc.cause, exc.detail,
                                    retry_after=exc.retry_after)
        except TokenError as exc:
            return problem_response(exc.status, exc.cause, exc.detail)

    # -- plain HTTP --------------------------------------------------------------------------

    def request_headers(
        self, request: web.BaseRequest, compiled: CompiledRoute
    ) -> tuple[Any, bool]:
        route = compiled.route
        out, client_auth, invalid = forward_request_headers(
            request.headers,
            drop=self._local_headers,
            auth_header=route.header,
            keep_client_auth=route.client_authorization == "keep",
            preserve_host=route.preserve_host,
        )
        if invalid:
            self._dropped_invalid.inc(invalid)
        return out, client_auth

    def ssl_for(self, compiled: CompiledRoute) -> ssl.SSLContext | bool:
        return self._ssl[compiled.route.prefix]

    def source_for(self, compiled: CompiledRoute) -> TokenSource:
        return self._sources[compiled.route.provider]

    @property
    def session(self) -> aiohttp.ClientSession:
        """The pooled client, for requests that carry no body of a client's."""
        return self._sessions.pooled

    async def _read_body(
        self, request: web.BaseRequest, compiled: CompiledRoute
    ) -> ReplayableBody:
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
                                         self.max_replay, self.budget, compiled.route.label)

    async def _forward(
        self,
        request: web.BaseRequest,
        compiled: CompiledRoute,
        path: str,
        query: str | None,
        outcome: Outcome,
    ) -> web.StreamResponse:
        route = compiled.route
        source = self.source_for(compiled)
        token = await bounded(source.current(), compiled, source.name)
        try:
            # A client that stops sending its body must not hold the connection forever.
            async with asyncio.timeout(route.timeout):
                body = await self._read_body(request, compiled)
        except TimeoutError:
            raise RequestRejected(408, "request_timeout",
                                  "the request body did not arrive in time") from None
        try:
            return await self._send_and_relay(request, compiled, path, query, outcome, token,
                                              body)
        finally:
            body.release()

    async def _send_and_relay(
        self, request: web.BaseRequest, compiled: CompiledRoute, path: str, query: str | None,
        outcome: Outcome, token: Token, body: ReplayableBody,
    ) -> web.StreamResponse:
        route = compiled.route
        source = self.source_for(compiled)
        url = compiled.upstream_url(path, query)
        headers, client_auth = self.request_headers(request, compiled)
        # aiohttp's pool cannot keep a connection for one client (proxy/reuse.py): one that
        # carried a client's body, or a HEAD, is closed after its answer, and the upstream
        # told so.
        closing = request.body_exists or last_request(request.method, False)
        if closing:
            headers["Connection"] = "close"
        retried = False
        while True:
            if not client_auth:
                headers[route.header] = compiled.header_value(token.value)
            up = await self.send(compiled, request.method, url, headers, body.payload(),
                                 closing=closing)
            fresh = await self.token_for_retry(up.status, compiled, source, token, client_auth,
                                               retried, body.replayable, up.close)
            if fresh is None:
                break
            await _discard(up)
            token, retried = fresh, True
            outcome.retried = True
        return await self._relay(request, compiled, up, token, outcome)

    def _retry_outcome(self, compiled: CompiledRoute, outcome: str) -> None:
        self.metrics.auth_retries.labels(compiled.route.label, outcome).inc()

    async def token_for_retry(
        self, status: int, compiled: CompiledRoute, source: TokenSource, token: Token,
        client_auth: bool, retried: bool, replayable: bool, drop: Callable[[], None],
    ) -> Token | None:
        """After an upstream answer (both paths): the token to send the request once more
        with, or None to relay this answer. Counts the retry's outcome -- success and failure
        only for requests sent again, so the metric agrees with the access log's ``retried``;
        *drop* frees the refused answer's connection when the wait for a new token fails."""
        action = retry_action(status, compiled.route.retry_on, client_auth, retried, replayable)
        if action is RetryAction.RELAY:
            if retried:
                self._retry_outcome(compiled, "success")
            if status < 400 and not client_auth:
                source.accepted(token)   # proof the token is good (TokenManager.renew)
            return None
        if action is RetryAction.FAILED:
            self._retry_outcome(compiled, "failure")
            return None
        if action is RetryAction.SKIP:
            # The body is gone upstream: pass the 401 back, and let a refresh run so the
            # client's own retry finds a fresh token.
            self._retry_outcome(compiled, "skipped")
            self._spawn(source.renew(token, "unauthorized"))
            return None
        try:
            fresh = await bounded(source.renew(token, "unauthorized"), compiled, source.name)
        except BaseException:
            drop()   # the refused answer will not be relayed: free its connection now
            raise
        if fresh is None:
            self._retry_outcome(compiled, "no_new_token")
        return fresh

    # -- the fast path's pieces (fastpath.py) ------------------------------------------------

    def fast_origin(self, compiled: CompiledRoute) -> tuple[str, str, int, ssl.SSLContext | None]:
        """(scheme, host, port, TLS context or None) to connect to for this route."""
        return self._fast_origin[compiled.route.prefix]

    def fast_request_head(
        self, method: bytes, path: str, query: str | None, headers: list[Header],
        length: int | None, compiled: CompiledRoute, *, close: bool = False,
    ) -> tuple[bytes, bool]:
        """The upstream request head without the token line: (head, client_sent_auth)."""
        route = compiled.route
        out, client_auth, invalid = wire.request_headers(
            headers, drop=self._fast_drop, auth_header=compiled.auth_header_low,
            keep_client_auth=route.client_authorization == "keep",
            preserve_host=route.preserve_host,
        )
        if invalid:
            self._dropped_invalid.inc(invalid)
        target = compiled.upstream_target(path, query).encode("utf-8", "surrogateescape")
        host = None if route.preserve_host else compiled.host_header
        return wire.render_request(method, target, host, out, length, close=close), client_auth

    def fast_auth_line(self, compiled: CompiledRoute, token: Token) -> bytes:
        """``Authorization: Bearer <token>\r\n``, rendered once per token and route."""
        cached = self._fast_auth.get(compiled.route.prefix)
        if cached is not None and cached[0] is token:
            return cached[1]
        line = (compiled.route.header + ": " + compiled.header_value(token.value)
                + "\r\n").encode("latin-1")
        self._fast_auth[compiled.route.prefix] = (token, line)
        return line

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        # A failed refresh is logged by its provider; retrieve the exception so asyncio does
        # not log "Task exception was never retrieved" as an error besides.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def send(
        self,
        compiled: CompiledRoute,
        method: str,
        url: Any,
        headers: Any,
        data: Any,
        *,
        closing: bool = False,
    ) -> aiohttp.ClientResponse:
        """Send upstream; the route timeout runs until the response head has arrived.
        *closing*: on a connection used for this request alone (proxy/reuse.py)."""
        session = self._sessions.closing if closing else self._sessions.pooled
        try:
            async with asyncio.timeout(compiled.route.timeout):
                return await session.request(
                    method, url, headers=headers, data=data, allow_redirects=False,
                    ssl=self.ssl_for(compiled),
                )
        except (aiohttp.ClientError, TimeoutError, ssl.SSLError) as exc:
            raise upstream_error(exc) from None

    async def _relay(
        self,
        request: web.BaseRequest,
        compiled: CompiledRoute,
        up: aiohttp.ClientResponse,
        token: Token,
        outcome: Outcome,
    ) -> web.StreamResponse:
        headers = forward_response_headers(
            up.headers,
            token=token.value,
            rewrite_location=lambda loc: self.table.rewrite_location(loc, compiled),
        )
        reason = up.reason
        if reason and len(token.value) >= MIN_ECHO_TOKEN and token.value in reason:
            reason = None   # the standard phrase instead of one that echoes the token
        out = RelayedResponse(status=up.status, reason=reason, headers=headers)
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
                self.metrics.upstream_errors.labels(compiled.route.label,
                                                     error_kind(exc)).inc()
                self._log.warning("upstream_body_failed", route=compiled.route.label,
                                  error=type(exc).__name__)
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


async def _discard(up: aiohttp.ClientResponse) -> None:
    """Finish a response we will not relay: read a small body so the connection is reused."""
    try:
        length = up.content_length
        if length is not None and length <= DISCARD_LIMIT:
            await up.read()
            up.release()
        else:
            up.close()
    except (aiohttp.ClientError, TimeoutError):
        up.close()

