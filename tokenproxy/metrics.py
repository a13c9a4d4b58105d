"""Every tokenproxy collector, bound to one injected registry (docs/metrics.md)."""

from __future__ import annotations

from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_KNOWN_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"}
)
# Request latencies through a local proxy: sub-millisecond to long streams.
_REQUEST_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)


def method_label(method: str) -> str:
    """Label values stay bounded: unknown methods share one series."""
    return method if method in _KNOWN_METHODS else "OTHER"


class Metrics:
    """The collectors; one instance per daemon (and per test)."""

    def __init__(self, registry: CollectorRegistry, version: str) -> None:
        self.registry = registry
        self.requests = Counter(
            "tokenproxy_requests_total", "Requests answered, by route, method and status code.",
            ("route", "method", "code"), registry=registry)
        self.request_duration = Histogram(
            "tokenproxy_request_duration_seconds",
            "Time from the request head to the end of the response, by route.",
            ("route",), buckets=_REQUEST_BUCKETS, registry=registry)
        self.upstream_errors = Counter(
            "tokenproxy_upstream_errors_total",
            "Upstream failures, by route and kind (connect, timeout, reset, tls).",
            ("route", "kind"), registry=registry)
        self.auth_retries = Counter(
            "tokenproxy_auth_retries_total",
            "Answers with a retry_on status, by outcome: retried and then accepted (success), "
            "refused again (failure), not answered (upstream_error) or left by the client "
            "(abandoned); not retried because the "
            "body could not be sent again (skipped) or no newer token could be had "
            "(no_new_token).",
            ("route", "outcome"), registry=registry)
        self.token_refresh = Counter(
            "tokenproxy_token_refresh_total",
            "Token-endpoint calls, by trigger, grant and result: success; rejected (the issuer "
            "said no: invalid_grant, invalid_client, a 4xx but 408 and 429); error (network, 5xx, "
            "408, 429, timeout, a bad answer). grant=\"state_file\": tokens another process had "
            "already refreshed; grant=\"shared\": tokens another replica had refreshed "
            "(shared_state).",
            ("provider", "trigger", "grant", "result"), registry=registry)
        self.token_refresh_duration = Histogram(
            "tokenproxy_token_refresh_duration_seconds", "Duration of token-endpoint calls.",
            ("provider",), registry=registry)
        self.token_refresh_coalesced = Counter(
            "tokenproxy_token_refresh_coalesced_total",
            "Requests that waited on a refresh already in flight.",
            ("provider",), registry=registry)
        self.token_expiry = Gauge(
            "tokenproxy_token_expiry_timestamp_seconds",
            "Unix time at which the current token expires (0 when unknown or never).",
            ("provider",), registry=registry)
        self.provider_authenticated = Gauge(
            "tokenproxy_provider_authenticated",
            "1 while the provider holds or can get a token, 0 when credentials were rejected.",
            ("provider",), registry=registry)
        self.inflight = Gauge(
            "tokenproxy_inflight_requests", "Requests being proxied now.", registry=registry)
        self.connections = Gauge(
            "tokenproxy_client_connections", "Open client connections on proxy listeners.",
            registry=registry)
        self.rejected = Counter(
            "tokenproxy_rejected_requests_total",
            "Requests answered locally without contacting an upstream, by cause.",
            ("cause",), registry=registry)
        self.replay_buffered = Gauge(
            "tokenproxy_replay_buffered_bytes",
            "Request body bytes held so a request can be sent again after a refused token.",
            registry=registry)
        self.replay_budget_exceeded = Counter(
            "tokenproxy_replay_budget_exceeded_total",
            "Bodies streamed unbuffered because limits.max_replay_total was reached, by route "
            "(a 401 to them is passed back, not retried).",
            ("route",), registry=registry)
        self.dropped_headers = Counter(
            "tokenproxy_request_headers_dropped_total",
            "Request header fields not forwarded, by reason (invalid_name: a name with other "
            "than letters, digits and '-', which CGI-style servers read as another header; "
            "not_utf8: bytes the aiohttp path cannot send unchanged).",
            ("reason",), registry=registry)
        self.handovers = Counter(
            "tokenproxy_fast_path_handovers_total",
            "Connections the fast path handed to the aiohttp server, by reason (protocol, "
            "refused, malformed, shutdown).",
            ("reason",), registry=registry)
        self.forward_connects = Counter(
            "tokenproxy_forward_connects_total",
            "Requests to the forward-proxy listener by outcome: intercepted (TLS ended here, "
            "tokens attached), tunnelled (passed through), refused (not listed), failed (TLS "
            "handshake or tunnel connect failed).",
            ("outcome",), registry=registry)
        self._shared_state: SharedStateMetrics | None = None
        Gauge("tokenproxy_build_info", "tokenproxy version.", ("version",),
              registry=registry).labels(version).set(1)

    def shared_state(self) -> SharedStateMetrics:
        """The shared state's collectors, registered when a daemon has one: a daemon without
        Redis exports no ``tokenproxy_shared_state_up`` 0 for an alert to fire on."""
        if self._shared_state is None:
            self._shared_state = SharedStateMetrics(self.registry)
        return self._shared_state


class SharedStateMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge(
            "tokenproxy_shared_state_up",
            "1 while the shared state (Redis) answers, 0 while it does not (shared_state only).",
            registry=registry)
        self.errors = Counter(
            "tokenproxy_shared_state_errors_total",
            "Shared-state operations that failed, by operation (connect, read, lock, renew, "
            "unlock, mark, write, decrypt).",
            ("operation",), registry=registry)
        self.lock_wait = Histogram(
            "tokenproxy_shared_state_lock_wait_seconds",
            "Time a replica waited for a provider's refresh lock in the shared state.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
            registry=registry)
