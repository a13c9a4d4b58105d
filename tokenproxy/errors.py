"""The exception tree. Each answered error carries the ``cause`` used for its problem type.

TokenProxyError
├── ConfigError            bad file, missing env var, unreadable secret -> exit 2
├── RequestRejected        answered locally: 400, 403, 404, 408, 412, 431
├── UpstreamError(kind)    connect | tls | reset -> 502, timeout -> 504
└── TokenError
    ├── TokenUnavailable   endpoint unreachable, failing, bad answer, or in backoff -> 503
    │   └── SharedStateDown    a refresh token must not be spent without the shared lock -> 503
    ├── Unauthenticated    credentials rejected -> 502, type ending /unauthenticated
    ├── LoginRequired      a provider a person logs in to has no login -> 503
    └── ProviderMisconfigured  the issuer publishes no usable metadata -> 502

Messages never include token-endpoint bodies, header values or query strings.
"""

from __future__ import annotations

from typing import Final, Literal

UpstreamErrorKind = Literal["connect", "timeout", "reset", "tls"]


class TokenProxyError(Exception):
    """Base of every error tokenproxy raises on purpose."""

    status: int = 500
    cause: str = "internal"


class ConfigError(TokenProxyError):
    """The configuration cannot be used; the message names the key path."""

    cause = "config"


class RequestRejected(TokenProxyError):
    """A request answered by tokenproxy itself without contacting the upstream."""

    def __init__(self, status: int, cause: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.cause = cause
        self.detail = detail


# What a client is told for each kind of upstream failure, on either request path.
UPSTREAM_DETAILS: Final[dict[UpstreamErrorKind, str]] = {
    "tls": "the upstream's TLS certificate could not be verified",
    "timeout": "the upstream did not answer in time",
    "connect": "the upstream could not be reached",
    "reset": "the upstream closed the connection or sent a malformed response",
}


class UpstreamError(TokenProxyError):
    """The upstream could not be reached or did not answer in time."""

    def __init__(self, kind: UpstreamErrorKind, detail: str | None = None) -> None:
        detail = UPSTREAM_DETAILS[kind] if detail is None else detail
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.status = 504 if kind == "timeout" else 502
        self.cause = "upstream_timeout" if kind == "timeout" else "upstream_unreachable"


class TokenError(TokenProxyError):
    """No usable token for a provider."""

    def __init__(self, provider: str, detail: str) -> None:
        super().__init__(detail)
        self.provider = provider
        self.detail = detail


class TokenUnavailable(TokenError):
    """No token right now; the caller may retry after ``retry_after`` seconds."""

    status = 503
    cause = "token_unavailable"

    def __init__(self, provider: str, detail: str, retry_after: float) -> None:
        super().__init__(provider, detail)
        self.retry_after = retry_after


class SharedStateDown(TokenUnavailable):
    """The provider needs a new token and holds a refresh token, which it spends only under
    the shared state's lock (a second spender would get the whole family revoked); the shared
    state (Redis) is not answering."""

    cause = "shared_state_unavailable"


class Unauthenticated(TokenError):
    """The token endpoint rejected our credentials; only new credentials help."""

    status = 502
    cause = "unauthenticated"


class LoginRequired(TokenError):
    """A provider a person logs in to (device code, browser login) has no usable refresh
    token: only `tokenproxy login` helps, and the daemon picks its result up by itself."""

    status = 503
    cause = "login_required"


class ProviderMisconfigured(TokenError):
    """The provider's configuration does not lead to a token endpoint (discovery found no
    usable metadata at the issuer); only a corrected config helps."""

    status = 502
    cause = "provider_misconfigured"
