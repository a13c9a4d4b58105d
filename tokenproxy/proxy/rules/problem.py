"""RFC 9457 problem+json answers for the errors tokenproxy produces itself: the one renderer,
on bytes, for both request paths and the admin listener."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Final

from tokenproxy.errors import RequestRejected, TokenError, TokenUnavailable, UpstreamError
from tokenproxy.proxy.rules.headers import Header

# A URN the project controls (RFC 9457 allows any URI); docs/errors.md lists every name.
PROBLEM_BASE: Final = "urn:tokenproxy:problem:"
TITLES: Final = {
    "bad_request": "Bad request",
    "forbidden_host": "Host not allowed",
    "cross_site": "Cross-site request refused",
    "forwarded": "Relayed request refused",
    "client_key": "Missing or wrong Tokenproxy-Key",
    "require_header": "Required request header missing",
    "not_found": "No route for this path",
    "forward_refused": "Destination not served by this proxy",
    "proxy_auth": "Proxy authentication required",
    "header_too_large": "Request header fields too large",
    "request_timeout": "Request body not received in time",
    "expectation_failed": "Expectation not supported",
    "upstream_unreachable": "Upstream unreachable",
    "upstream_timeout": "Upstream timed out",
    "token_unavailable": "No access token available",
    "shared_state_unavailable": "Shared token state unavailable",
    "unauthenticated": "Credentials rejected by the token endpoint",
    "provider_misconfigured": "Token provider misconfigured",
    "login_required": "A person must log in (tokenproxy login)",
    "internal": "Internal error",
}
# Framing and size errors leave the connection in doubt: it is closed after the answer.
CLOSING_STATUSES: Final = frozenset({400, 408, 431})


@dataclass(frozen=True, slots=True)
class Problem:
    """One answer of ours: its status, the cause its ``Tokenproxy-Error`` names, what to do."""

    status: int
    cause: str
    detail: str
    retry_after: float | None = None

    @classmethod
    def of(cls, exc: RequestRejected | UpstreamError | TokenError) -> Problem:
        """The answer for an error raised while handling a request, on either path."""
        retry = exc.retry_after if isinstance(exc, TokenUnavailable) else None
        return cls(exc.status, exc.cause, exc.detail, retry)

    @property
    def closes(self) -> bool:
        return self.status in CLOSING_STATUSES

    def body(self) -> bytes:
        return json.dumps({
            "type": PROBLEM_BASE + self.cause,
            "title": TITLES.get(self.cause, self.cause),
            "status": self.status,
            "detail": self.detail,
        }).encode()

    def headers(self) -> list[Header]:
        """Its fields besides framing: the cause, no caching, the type, when to come back."""
        out: list[Header] = [
            (b"Tokenproxy-Error", self.cause.encode()),
            (b"Cache-Control", b"no-store"),
            (b"Content-Type", b"application/problem+json"),
        ]
        if self.retry_after is not None:
            out.append((b"Retry-After", b"%d" % max(1, math.ceil(self.retry_after))))
        return out
