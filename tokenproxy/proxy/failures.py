"""The one classifier of upstream failures, for both clients (aiohttp's and the fast path's):
what kind a failed connect, send or read was, for its answer (502 or 504, errors.py) and for
``tokenproxy_upstream_errors_total{kind}``."""

from __future__ import annotations

import ssl

import aiohttp

from tokenproxy.errors import UpstreamError, UpstreamErrorKind


class UpstreamBroke(Exception):
    """The fast path's upstream connection failed mid-exchange: reset, malformed, or
    truncated (aiohttp's client raises its own ClientError for the same)."""


def failure_kind(exc: BaseException) -> UpstreamErrorKind:
    """TLS first (aiohttp's TLS errors are connector errors too), then timeouts; a connector
    error or the fast path's own failed connect (an OSError) is "connect"; a connection that
    broke after it was made is "reset"."""
    if isinstance(exc, ssl.SSLError | ssl.CertificateError | aiohttp.ClientSSLError):
        return "tls"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return "connect"
    if isinstance(exc, aiohttp.ClientError | UpstreamBroke):
        return "reset"
    if isinstance(exc, OSError):
        return "connect"
    return "reset"


def upstream_error(exc: BaseException) -> UpstreamError:
    return UpstreamError(failure_kind(exc))
