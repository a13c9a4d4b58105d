"""One classifier of upstream failures for both clients (proxy/failures.py): the kind decides
the answer (502 or 504) and the ``kind`` label of tokenproxy_upstream_errors_total -- as a rule
on exceptions, then end to end, alike on both paths."""

from __future__ import annotations

import asyncio
import ssl

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from tests.helpers.config import MakeProxy, proxy_config
from tests.helpers.fakes import TOKEN
from tests.helpers.metrics import count
from tests.helpers.net import closed_port
from tests.helpers.rawhttp import first_answer, get
from tests.helpers.rawupstream import MakeRaw, Script, UpConn, read_request, reset
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


# -- end to end ------------------------------------------------------------------------------


def _upstream_fault(kind: str) -> Script:
    """A raw upstream script that fails as *kind* says."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        if kind == "tls":             # a plain-HTTP server behind an https route
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
            await writer.drain()
            return
        if await read_request(reader, conn) is None:
            return
        if kind == "reset":
            reset(writer)
        elif kind == "malformed":
            writer.write(b"HTTP/1.1 2OO OK\r\n\r\n")
            await writer.drain()
        elif kind == "eof":
            return
        elif kind == "hang":
            await reader.read()

    return script


@pytest.mark.both_paths
@pytest.mark.parametrize(("fault", "status", "kind"), [
    ("refused", 502, "connect"), ("reset", 502, "reset"), ("malformed", 502, "reset"),
    ("eof", 502, "reset"), pytest.param("hang", 504, "timeout", marks=pytest.mark.slow),
    ("tls", 502, "tls"),
])
async def test_upstream_failures_are_classified_alike_on_both_paths(
    make_proxy: MakeProxy, raw_upstream: MakeRaw, fault: str, status: int, kind: str,
) -> None:
    """Each upstream failure gets the same answer and metric kind on both paths
    (refused connect, reset, a malformed head, EOF before a head, no answer within the
    route timeout, TLS to a plain server)."""
    if fault == "refused":
        url = f"http://127.0.0.1:{closed_port()}/"
    else:
        up = await raw_upstream(_upstream_fault(fault))
        url = up.url().replace("http://", "https://") if fault == "tls" else up.url()
    route = {"prefix": "/", "upstream": url, "provider": "api", "timeout": "1s"}
    daemon = await make_proxy(proxy_config(url, TOKEN, routes=[route]))
    resp = await first_answer(daemon.port(), get("/x"))
    assert status == resp.status
    assert 1 == count(daemon, "tokenproxy_upstream_errors_total", route="/", kind=kind)
