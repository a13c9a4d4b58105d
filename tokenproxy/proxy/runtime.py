"""What both request paths share for one config: routes, checks, token sources, upstream TLS,
the retry-once decision, error accounting and the access log.

A Proxy is built once per config (start and every reload) and handed to the fast path
(fast_path/) and the aiohttp path (aiohttp_path/) alike; neither holds rules of its own.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from yarl import URL

from tokenproxy import log
from tokenproxy.config import Config
from tokenproxy.errors import RequestRejected, TokenError, TokenUnavailable, UpstreamError
from tokenproxy.metrics import Metrics, method_label
from tokenproxy.proxy.failures import failure_kind
from tokenproxy.proxy.rules.budget import ReplayBudget
from tokenproxy.proxy.rules.problem import Problem
from tokenproxy.proxy.rules.retry import RetryAction, retry_action
from tokenproxy.proxy.rules.security import SecurityPolicy
from tokenproxy.proxy.rules.target import CompiledRoute, RouteTable
from tokenproxy.tls import ClientContexts
from tokenproxy.tokens.source import Target, Token, TokenSource

CLIENT_GONE: Final = 499   # nginx's code for "the client closed the connection first"

T = TypeVar("T")
Origin = tuple[str, str, int, ssl.SSLContext | None]   # scheme, host, port, TLS context


@dataclass(slots=True)
class Outcome:
    """What the access log and metrics report about one request."""

    route: str = "-"
    status: int = CLIENT_GONE
    bytes: int = 0
    retried: bool = False    # sent again with a newer token after a retry_on answer
    retry: str | None = None  # the retry's outcome, once counted


async def bounded(waiting: Awaitable[T], compiled: CompiledRoute, provider: str) -> T:
    """Wait for a token no longer than the route's timeout: the refresh itself goes on (it is
    shielded), but this request answers 503 instead of hanging."""
    try:
        async with asyncio.timeout(compiled.route.timeout):
            return await waiting
    except TimeoutError:
        raise TokenUnavailable(provider, f"provider {provider!r}: no token within the route "
                               "timeout", 1.0) from None


@dataclass(slots=True)
class Sending:
    """One request on its way upstream (every path): the token it carries, and what decides
    whether it is sent once more after a refusal."""

    compiled: CompiledRoute
    source: TokenSource
    token: Token
    outcome: Outcome
    target: Target            # where it goes, for the source's storm guard (tokens/guard.py)
    client_auth: bool         # the client's own auth header passes: no token, no retry
    replayable: bool          # its body can be sent again


class Proxy:
    """Everything the request paths need, built once per config (start or reload)."""

    def __init__(
        self,
        cfg: Config,
        *,
        sources: Mapping[str, TokenSource],
        metrics: Metrics,
        budget: ReplayBudget,
        contexts: ClientContexts | None = None,
    ) -> None:
        """*contexts*: the TLS client contexts to take from (shared by the Proxies of one
        config, as the forward proxy's hosts are)."""
        self.table = RouteTable(cfg.routes)
        self.policy = SecurityPolicy(cfg.security, cfg.limits)
        self._sources = sources
        self.metrics = metrics
        self._dropped_invalid = metrics.dropped_headers.labels("invalid_name")
        self.max_replay = cfg.limits.max_replay_body
        self.budget = budget   # the daemon's, shared across reloads
        self._background: set[asyncio.Task[Any]] = set()
        self._log = log.get_logger()
        self._count_cache: dict[tuple[str, str, int], Any] = {}
        self._duration_cache: dict[str, Any] = {}
        self._token_lines: dict[str, tuple[Token | None, bytes]] = {}
        # Per route: the TLS context aiohttp is given (True: the system roots), and the
        # origin the fast path connects to.
        self._ssl: dict[str, ssl.SSLContext | bool] = {}
        self._origin: dict[str, Origin] = {}
        contexts = ClientContexts() if contexts is None else contexts
        for r in cfg.routes:
            own = None if r.client_tls.default else contexts.context(r.client_tls)
            self._ssl[r.prefix] = True if own is None else own
            url = URL(r.upstream.origin)
            tls: ssl.SSLContext | None = None
            if url.scheme == "https":
                tls = contexts.context(r.client_tls)
            assert url.raw_host is not None
            assert url.port is not None
            self._origin[r.prefix] = (url.scheme, url.raw_host, url.port, tls)

    # -- per route ---------------------------------------------------------------------------

    def source_for(self, compiled: CompiledRoute) -> TokenSource:
        return self._sources[compiled.route.provider]

    def ssl_for(self, compiled: CompiledRoute) -> ssl.SSLContext | bool:
        """The TLS setting for aiohttp's client: a context, or True for the system roots."""
        return self._ssl[compiled.route.prefix]

    def upstream_origin(self, compiled: CompiledRoute) -> Origin:
        """(scheme, host, port, TLS context or None) to connect to for this route."""
        return self._origin[compiled.route.prefix]

    def token_line(self, compiled: CompiledRoute, token: Token) -> bytes:
        """``Authorization: Bearer <token>\\r\\n``, rendered once per token and route."""
        cached = self._token_lines.get(compiled.route.prefix)
        if cached is not None and cached[0] is token:
            return cached[1]
        line = (compiled.route.header + ": " + compiled.header_value(token.value)
                + "\r\n").encode("latin-1")
        self._token_lines[compiled.route.prefix] = (token, line)
        return line

    # -- accounting --------------------------------------------------------------------------

    def count_invalid_names(self, n: int) -> None:
        """Request fields dropped for a name outside letters, digits and "-"."""
        if n:
            self._dropped_invalid.inc(n)

    def count_not_utf8(self, n: int) -> None:
        """Request fields the aiohttp path dropped for bytes that are not UTF-8."""
        self.metrics.dropped_headers.labels("not_utf8").inc(n)

    def failed(self, exc: RequestRejected | UpstreamError | TokenError, outcome: Outcome
               ) -> Problem:
        """The answer for an error raised while handling a request, counted. A request sent
        again after a 401 whose second send failed counts as the retry's upstream_error."""
        if isinstance(exc, RequestRejected):
            self.metrics.rejected.labels(exc.cause).inc()
        elif isinstance(exc, UpstreamError):
            self.metrics.upstream_errors.labels(outcome.route, exc.kind).inc()
            if outcome.retried and outcome.retry is None:
                self._retry_outcome(outcome, "upstream_error")
        return Problem.of(exc)

    def body_failed(self, route: str, exc: BaseException) -> None:
        """The upstream broke while its answer's body was relayed (both paths): counted by
        kind and logged; the caller cuts the client's connection, so the truncation shows."""
        self.metrics.upstream_errors.labels(route, failure_kind(exc)).inc()
        self._log.warning("upstream_body_failed", route=route, error=type(exc).__name__)

    def record(self, method: str, raw_path: str, outcome: Outcome, duration: float) -> None:
        """Count, time and log one answered request (both paths)."""
        method = method_label(method)
        key = (outcome.route, method, outcome.status)
        counter = self._count_cache.get(key)
        if counter is None:
            counter = self.metrics.requests.labels(outcome.route, method, str(outcome.status))
            self._count_cache[key] = counter
        counter.inc()
        if outcome.retried and outcome.retry is None:
            # Every request the log line below shows retried has one outcome: this one, when
            # the client left before the second answer.
            self._retry_outcome(outcome, "abandoned")
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

    # -- the 401 retry -----------------------------------------------------------------------

    async def send_again(self, sending: Sending, status: int, drop: Callable[[], None]
                         ) -> bool:
        """After an upstream answer with *status* (every path): True to send the request
        once more, with ``sending.token`` renewed, or False to relay this answer. Counts the
        retry's outcome, once per request (``failed`` and ``record`` count the ones decided
        later: the second send failed, or the client left); *drop* frees the refused answer's
        connection when the wait for a new token fails."""
        outcome, source, target = sending.outcome, sending.source, sending.target
        retried = outcome.retried
        action = retry_action(status, sending.compiled.route.retry_on, sending.client_auth,
                              retried, sending.replayable)
        if action is RetryAction.RELAY:
            if retried:
                self._retry_outcome(outcome, "success")
            if status < 400 and not sending.client_auth:
                source.accepted(target)
            return False
        if action is RetryAction.FAILED:
            self._retry_outcome(outcome, "failure")
            source.refused(target)   # a fresh token refused: scope, not expiry
            return False
        if action is RetryAction.SKIP:
            # The body is gone upstream: pass the 401 back, and let a refresh run so the
            # client's own retry finds a fresh token.
            self._retry_outcome(outcome, "skipped")
            self._spawn(source.renew(sending.token, "unauthorized", target))
            return False
        try:
            fresh = await bounded(source.renew(sending.token, "unauthorized", target),
                                  sending.compiled, source.name)
        except BaseException as exc:
            if not isinstance(exc, asyncio.CancelledError):   # not when the client left
                self._retry_outcome(outcome, "no_new_token")
            drop()   # the refused answer will not be relayed: free its connection now
            raise
        if fresh is None:
            self._retry_outcome(outcome, "no_new_token")
            return False
        outcome.retried = True
        sending.token = fresh
        return True

    def _retry_outcome(self, outcome: Outcome, name: str) -> None:
        outcome.retry = name
        self.metrics.auth_retries.labels(outcome.route, name).inc()

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        # A failed refresh is logged by its provider; retrieve the exception so asyncio does
        # not log "Task exception was never retrieved" as an error besides.
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
