"""One classifier of upstream failures for both clients (proxy/failures.py): the kind decides
the answer (502 or 504) and the ``kind`` label of tokenproxy_upstream_errors_total."""

from __future__ import annotations

import ssl

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from tokenproxy.errors import UpstreamErrorKind
from tokenproxy.proxy.failures import UpstreamBroke, failure_kind, upstream_error

KEY = ConnectionKey("upstream.test", 443, True, True, None, None, None)


@pytest.mark.parametrize(("exc", "kind"), [
    # aiohttp's client (the aiohttp path, WebSocket)
    (aiohttp.ClientConnectorCertificateError(KEY, ssl.SSLCertVerificationError()), "tls"),
    (aiohttp.ClientConnectorSSLError(KEY, OSError(1, "handshake")), "tls"),
    (aiohttp.ClientConnectorError(KEY, ConnectionRefusedError(111, "refused")), "connect"),
    (aiohttp.ServerTimeoutError("read"), "timeout"),
    (aiohttp.ServerDisconnectedError(), "reset"),
    (aiohttp.ClientPayloadError("truncated"), "reset"),
    (aiohttp.ClientOSError(104, "reset by peer"), "reset"),
    # the fast path's own client
    (ssl.SSLCertVerificationError("bad certificate"), "tls"),
    (TimeoutError(), "timeout"),
    (ConnectionRefusedError(111, "refused"), "connect"),
    (OSError(113, "no route to host"), "connect"),
    (UpstreamBroke("closed before answering"), "reset"),
])
def test_each_failure_has_one_kind(exc: BaseException, kind: UpstreamErrorKind) -> None:
    assert kind == failure_kind(exc)


def test_the_kind_decides_the_answer() -> None:
    assert (504, "upstream_timeout") == (upstream_error(TimeoutError()).status,
                                         upstream_error(TimeoutError()).cause)
    refused = upstream_error(ConnectionRefusedError(111, "refused"))
    assert (502, "upstream_unreachable", "the upstream could not be reached") == (
        refused.status, refused.cause, refused.detail)
