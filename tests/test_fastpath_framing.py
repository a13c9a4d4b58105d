"""The fast path's protocols on recording transports (tests/helpers/transport.py), no sockets:
FastConnection (proxy/fast_path/connection.py) takes a client's bytes, writes the upstream
request and relays the answer; UpstreamConn (proxy/fast_path/upstream.py) parses the
upstream's answers. Each test feeds exact bytes and checks the exact bytes written, as h11 and
uvicorn test their protocols; tests/test_fastpath.py does the same on real sockets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from prometheus_client import CollectorRegistry

from tests.helpers.config import proxy_config
from tests.helpers.fakes import TOKEN
from tests.helpers.proxy import proxy_for
from tests.helpers.transport import RecordingTransport
from tokenproxy.config import build_config
from tokenproxy.errors import UpstreamError
from tokenproxy.proxy.fast_path import wire
from tokenproxy.proxy.fast_path.connection import FastConnection, FastEnv
from tokenproxy.proxy.fast_path.pool import UpstreamPool
from tokenproxy.proxy.fast_path.upstream import (
    MAX_UPSTREAM_HEAD,
    PENDING_LIMIT,
    ResponseHead,
    UpstreamBroke,
    UpstreamConn,
)
from tokenproxy.proxy.rules.problem import Problem

UPSTREAM = "http://upstream.test/v1/"
RAW = proxy_config(UPSTREAM, TOKEN, routes=[
    {"prefix": "/api", "upstream": UPSTREAM, "provider": "api"}])
KEY = ("http", "upstream.test", 80, id(None))   # the pool's key for the route's origin
DATE = b"Sun, 06 Dec 2026 21:00:00 GMT"
AUTH = f"Authorization: Bearer {TOKEN}\r\n".encode()


class FixedDate(wire.DateHeader):
    def __call__(self) -> bytes:
        return DATE


class Handed(asyncio.Protocol):
    """Stands in for aiohttp's protocol in a handover: records what it is given."""

    def __init__(self) -> None:
        self.transport: asyncio.BaseTransport | None = None
        self.data = b""
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.data += data

    def pause_writing(self) -> None:
        self.paused = True


class Harness:
    """One client connection on the fast path, its env, and upstream connections in its pool."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.proxy = proxy_for(RAW, self.registry)
        limits = build_config(RAW, {}).limits
        self.handed: list[Handed] = []
        self.env = FastEnv(proxy=lambda: self.proxy, limits=lambda: limits, slow=self._slow,
                           pool=UpstreamPool(), date=FixedDate())
        self.client = RecordingTransport()
        self.conn = FastConnection(self.env, None)
        self.conn.connection_made(self.client)

    def _slow(self, on_close: Callable[[], None] | None) -> asyncio.Protocol:
        handed = Handed()
        self.handed.append(handed)
        return handed

    def upstream(self) -> tuple[UpstreamConn, RecordingTransport]:
        """An idle keep-alive connection to the route's upstream, in the pool."""
        transport = RecordingTransport()
        up = UpstreamConn(KEY)
        up.connection_made(transport)
        up.reusable = True
        self.env.pool.release(up)
        return up, transport

    def handovers(self, reason: str) -> float | None:
        return self.registry.get_sample_value("tokenproxy_fast_path_handovers_total",
                                              {"reason": reason})

    def close(self) -> None:
        if self.conn.transport is not None:
            self.conn.connection_lost(None)
        self.env.pool.close()


@pytest.fixture(name="h")
async def _harness() -> AsyncIterator[Harness]:
    harness = Harness()
    yield harness
    harness.close()


async def settle() -> None:
    """Let the exchange task run as far as it can without new bytes."""
    for _ in range(20):
        await asyncio.sleep(0)


def answer(body: bytes, *fields: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\n" + b"".join(f + b"\r\n" for f in fields) + (
        b"Content-Length: %d\r\n\r\n" % len(body)) + body


def relayed(body: bytes, *fields: bytes) -> bytes:
    """What the client gets for answer(body, *fields)."""
    return (b"HTTP/1.1 200 OK\r\n" + b"".join(f + b"\r\n" for f in fields) + b"Date: " + DATE
            + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


# -- FastConnection: a request up, its answer back ---------------------------------------------


async def test_a_get_goes_up_and_its_answer_comes_back_byte_for_byte(h: Harness) -> None:
    up, upstream = h.upstream()
    h.conn.data_received(b"GET /api/x?y=1 HTTP/1.1\r\nHost: localhost:8080\r\nAccept: */*\r\n"
                         b"Connection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\r\n")
    await settle()
    assert (b"GET /v1/x?y=1 HTTP/1.1\r\nHost: upstream.test\r\nAccept: */*\r\n" + AUTH
            + b"\r\n") == upstream.take()
    up.data_received(answer(b"ok", b"X-Up: 1", b"Connection: keep-alive"))
    await settle()
    assert relayed(b"ok", b"X-Up: 1") == h.client.take()
    assert up is h.env.pool.take(*KEY[:3], None)   # back in the pool, for any client
    assert not h.client.closed


async def test_a_body_goes_up_after_the_head_with_the_length_counted(h: Harness) -> None:
    """The client's Content-Length never passes: the fast path writes the one it counts. A
    connection a body went into serves this client only (proxy/rules/reuse.py)."""
    up, upstream = h.upstream()
    h.conn.data_received(b"POST /api/up HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n"
                         b"Connection: Content-Length\r\n\r\nhello")
    await settle()
    assert (b"POST /v1/up HTTP/1.1\r\nHost: upstream.test\r\nContent-Length: 5\r\n" + AUTH
            + b"\r\nhello") == upstream.take()
    up.data_received(answer(b"stored"))
    await settle()
    assert relayed(b"stored") == h.client.take()
    assert (True, None) == (up.tainted, h.env.pool.take(*KEY[:3], None))


async def test_a_chunked_answer_is_relayed_chunked(h: Harness) -> None:
    up, _ = h.upstream()
    h.conn.data_received(b"GET /api/c HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await settle()
    up.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    await settle()
    up.data_received(b"6\r\n world\r\n0\r\n\r\n")
    await settle()
    assert [b"HTTP/1.1 200 OK\r\nDate: " + DATE + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n", b"6\r\n world\r\n", b"0\r\n\r\n"] == h.client.writes


async def test_a_close_delimited_answer_is_rechunked_and_ended_by_a_clean_close(
    h: Harness
) -> None:
    up, _ = h.upstream()
    h.conn.data_received(b"GET /api/c HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await settle()
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial-")
    up.connection_lost(None)
    await settle()
    assert (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nDate: " + DATE
            + b"\r\nTransfer-Encoding: chunked\r\n\r\n8\r\npartial-\r\n0\r\n\r\n"
            ) == h.client.take()
    assert not h.client.closed


async def test_a_reset_inside_a_close_delimited_answer_cuts_the_client(h: Harness) -> None:
    """An RST is not the end of a close-delimited body: the client's connection is cut, so a
    truncated body does not look complete (no final chunk)."""
    up, _ = h.upstream()
    h.conn.data_received(b"GET /api/c HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await settle()
    up.data_received(b"HTTP/1.1 200 OK\r\n\r\npartial-")
    up.connection_lost(ConnectionResetError())
    await settle()
    assert h.client.data.endswith(b"\r\n\r\n8\r\npartial-\r\n")
    assert h.client.aborted


async def test_head_is_the_connections_last_request_and_its_answer_has_no_body(
    h: Harness
) -> None:
    up, upstream = h.upstream()
    h.conn.data_received(b"HEAD /api/h HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await settle()
    assert (b"HEAD /v1/h HTTP/1.1\r\nHost: upstream.test\r\nConnection: close\r\n" + AUTH
            + b"\r\n") == upstream.take()
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    await settle()
    assert b"HTTP/1.1 200 OK\r\nDate: " + DATE + b"\r\nContent-Length: 5\r\n\r\n" == (
        h.client.take())
    assert upstream.aborted   # never pooled: a body sent after a HEAD answer reaches no one


async def test_pipelined_requests_go_up_one_after_the_other(h: Harness) -> None:
    up, upstream = h.upstream()
    h.conn.data_received(b"GET /api/a HTTP/1.1\r\nHost: localhost\r\n\r\n"
                         b"GET /api/b HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await settle()
    assert upstream.take().startswith(b"GET /v1/a HTTP/1.1\r\n")   # b waits for a's answer
    up.data_received(answer(b"A"))
    await settle()
    assert upstream.take().startswith(b"GET /v1/b HTTP/1.1\r\n")
    up.data_received(answer(b"B"))
    await settle()
    assert relayed(b"A") + relayed(b"B") == h.client.data


async def test_the_next_request_waits_while_the_client_does_not_read(h: Harness) -> None:
    """While the client's transport is write-paused, a new request is not started (its route
    deadline would run while its answer cannot be written), and reading pauses."""
    up, upstream = h.upstream()
    h.conn.data_received(b"GET /api/a HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await settle()
    upstream.take()
    h.conn.pause_writing()
    up.data_received(answer(b"A"))
    await settle()
    h.conn.data_received(b"GET /api/b HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await settle()
    assert (b"", False) == (upstream.take(), h.client.reading)
    h.conn.resume_writing()
    await settle()
    assert upstream.take().startswith(b"GET /v1/b HTTP/1.1\r\n")
    assert h.client.reading


async def test_garbage_from_the_upstream_is_a_502_and_its_connection_dropped(
    h: Harness
) -> None:
    up, upstream = h.upstream()
    h.conn.data_received(b"GET /api/x HTTP/1.1\r\nHost: localhost\r\n\r\n")
    await settle()
    up.data_received(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")
    await settle()
    head, body = wire.problem(Problem.of(UpstreamError("reset")), DATE)
    assert head.startswith(b"HTTP/1.1 502 Bad Gateway\r\nTokenproxy-Error: upstream_unreachable")
    assert head + body == h.client.take()
    assert (True, None) == (upstream.aborted, h.env.pool.take(*KEY[:3], None))
    assert not h.client.closed   # the client's connection goes on


# -- FastConnection: handing a connection to aiohttp -------------------------------------------


async def test_a_request_aiohttp_serves_is_handed_over_with_every_byte(h: Harness) -> None:
    data = b"GET /api/x HTTP/1.0\r\nHost: localhost\r\n\r\nGET /api/y HTTP/1.0\r\n\r\n"
    h.conn.data_received(data)
    [handed] = h.handed
    assert (h.client, data, handed) == (handed.transport, handed.data, h.client.protocol)
    assert (1.0, None) == (h.handovers("protocol"), h.conn.transport)


async def test_a_handover_after_a_fast_request_passes_on_the_rest(h: Harness) -> None:
    up, _ = h.upstream()
    rest = (b"POST /api/u HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"0\r\n\r\n")
    h.conn.data_received(b"GET /api/a HTTP/1.1\r\nHost: localhost\r\n\r\n" + rest)
    await settle()
    assert [] == h.handed   # not before the fast request is answered
    up.data_received(answer(b"A"))
    await settle()
    [handed] = h.handed
    assert (relayed(b"A"), rest) == (h.client.data, handed.data)


async def test_a_head_ending_in_bare_line_feeds_is_handed_over_at_once(h: Harness) -> None:
    """aiohttp answers it 400; waiting for a CRLF CRLF that never comes would hold the
    connection until header_timeout."""
    h.conn.data_received(b"GET /api/x HTTP/1.1\nHost: localhost\n\n")
    [handed] = h.handed
    assert (b"GET /api/x HTTP/1.1\nHost: localhost\n\n", 1.0) == (
        handed.data, h.handovers("malformed"))


async def test_a_handover_waits_while_the_client_does_not_read(h: Harness) -> None:
    """Not even a request for aiohttp starts while the client takes none of its answers; once
    it reads again, the connection is handed over with every byte, and not paused."""
    h.conn.pause_writing()
    h.conn.data_received(b"GET /api/x HTTP/1.0\r\n\r\n")
    await settle()
    assert ([], False) == (h.handed, h.client.reading)
    h.conn.resume_writing()
    [handed] = h.handed
    assert (b"GET /api/x HTTP/1.0\r\n\r\n", False, True) == (
        handed.data, handed.paused, h.client.reading)


# -- UpstreamConn: the upstream's answers ------------------------------------------------------


async def upstream_conn() -> tuple[UpstreamConn, RecordingTransport]:
    transport = RecordingTransport()
    up = UpstreamConn(KEY)
    up.connection_made(transport)
    return up, transport


async def test_a_content_length_answer() -> None:
    up, _ = await upstream_conn()
    up.begin(False)
    head, done = up.head, up.done
    assert head is not None
    assert done is not None
    up.data_received(b"HTTP/1.1 200 Fine\r\nContent-Length: 2\r\nX-A: 1\r\n\r\nok")
    assert ResponseHead(200, b"Fine", [(b"Content-Length", b"2"), (b"X-A", b"1")], b"2",
                        False) == head.result()
    assert (True, True, b"ok") == (done.done(), up.reusable, up.attach(lambda _: None))


@pytest.mark.parametrize(("last", "field", "reusable"), [
    (False, b"Connection: keep-alive", True), (False, b"Connection: close", False),
    (True, b"Connection: keep-alive", False),
], ids=["keep-alive", "upstream-closes", "we-asked-to-close"])
async def test_reuse_after_a_complete_answer(last: bool, field: bytes, reusable: bool) -> None:
    up, _ = await upstream_conn()
    up.begin(False, last=last)
    up.data_received(b"HTTP/1.1 204 No Content\r\n" + field + b"\r\n\r\n")
    assert reusable is up.reusable


async def test_body_chunks_go_to_the_sink_once_attached() -> None:
    up, _ = await upstream_conn()
    up.begin(False)
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nab")
    got: list[bytes] = []
    assert b"ab" == up.attach(got.append)
    up.data_received(b"cd")
    up.data_received(b"ef")
    assert [b"cd", b"ef"] == got


async def test_body_bytes_before_the_sink_past_the_limit_pause_the_upstream() -> None:
    up, transport = await upstream_conn()
    up.begin(False)
    body = b"x" * (PENDING_LIMIT + 1)
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % (len(body) + 1) + body)
    assert (False, 1) == (transport.reading, transport.pauses)
    assert body == up.attach(lambda _: None)
    assert transport.reading


async def test_trailers_never_become_response_fields() -> None:
    up, _ = await upstream_conn()
    up.begin(False)
    head = up.head
    assert head is not None
    up.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-T\r\n\r\n"
                     b"2\r\nhi\r\n0\r\nX-T: 1\r\nSet-Cookie: s=1\r\n\r\n")
    assert [(b"Transfer-Encoding", b"chunked"), (b"Trailer", b"X-T")] == head.result().headers
    assert (True, b"hi") == (head.result().chunked, up.attach(lambda _: None))


async def test_interim_answers_are_skipped() -> None:
    up, _ = await upstream_conn()
    up.begin(False)
    head = up.head
    assert head is not None
    up.data_received(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n"
                     b"\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")
    assert (201, b"Created", [(b"Content-Length", b"0")]) == (
        head.result().status, head.result().reason, head.result().headers)


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
    b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nab",
    b"HTTP/1.1 200 OK\r\nX-Big: " + b"b" * (MAX_UPSTREAM_HEAD + 1),   # a line that never ends
], ids=["unasked-101", "garbage", "two-lengths", "endless-head"])
async def test_a_broken_answer_fails_the_exchange_and_drops_the_connection(data: bytes) -> None:
    up, transport = await upstream_conn()
    up.begin(False)
    head, done = up.head, up.done
    assert head is not None
    assert done is not None
    up.data_received(data)
    assert isinstance(head.exception(), UpstreamBroke)
    assert isinstance(done.exception(), UpstreamBroke)
    assert (True, True) == (up.closed, transport.aborted)


async def test_a_second_answer_to_one_request_drops_the_connection() -> None:
    """Bytes after a complete answer are a smuggled or desynchronised response: it must never
    reach the next client of this connection."""
    up, transport = await upstream_conn()
    up.begin(False)
    done = up.done
    assert done is not None
    up.data_received(answer(b"1") + answer(b"2"))
    assert done.result() is None
    assert (True, True) == (up.closed, transport.aborted)


async def test_bytes_on_an_idle_connection_condemn_it() -> None:
    up, transport = await upstream_conn()
    up.begin(False)
    up.data_received(answer(b"1"))
    up.idle()
    up.data_received(answer(b"stray"))
    assert (True, True) == (up.closed, transport.aborted)


async def test_a_head_answer_ends_at_its_head_and_the_next_answer_parses_anew() -> None:
    up, _ = await upstream_conn()
    up.begin(True)
    done = up.done
    assert done is not None
    up.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
    assert (True, True) == (done.done(), up.reusable)
    up.begin(False)
    head = up.head
    assert head is not None
    up.data_received(answer(b"after"))
    assert (200, b"after") == (head.result().status, up.attach(lambda _: None))


@pytest.mark.parametrize(("exc", "clean"), [(None, True), (ConnectionResetError(), False)],
                         ids=["fin", "rst"])
async def test_a_close_delimited_body_ends_only_with_a_clean_close(
    exc: Exception | None, clean: bool
) -> None:
    up, _ = await upstream_conn()
    up.begin(False)
    done = up.done
    assert done is not None
    up.data_received(b"HTTP/1.1 200 OK\r\n\r\nabc")
    up.connection_lost(exc)
    if clean:
        assert done.result() is None
    else:
        assert isinstance(done.exception(), UpstreamBroke)


async def test_a_close_before_the_answer_fails_the_exchange() -> None:
    up, _ = await upstream_conn()
    up.begin(False)
    head = up.head
    assert head is not None
    up.connection_lost(None)
    assert "the upstream closed the connection" == str(head.exception())


async def test_the_route_deadline_before_the_head_is_a_timeout() -> None:
    up, transport = await upstream_conn()
    up.begin(False)
    head = up.head
    assert head is not None
    up.time_out()
    assert isinstance(head.exception(), TimeoutError)
    assert transport.aborted
