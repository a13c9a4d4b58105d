"""The fast path (tokenproxy/proxy/fast_path) on the wire.

Real daemons on 127.0.0.1 in front of a raw asyncio upstream that reads exactly what the proxy
sends (request line, header lines, body bytes) and answers with exactly the bytes a test
scripts. Covered here: pipelining, the handover of a live connection to aiohttp's protocol,
streamed and replayed uploads, early answers, response framing, the raw target, keep-alive and
header deadlines, the upstream pool, client disconnects, shutdown, and the Date/Server headers.

Which side answered is told by tokenproxy_fast_path_handovers_total: a handover moves the
connection to aiohttp's protocol for good. Neither side invents a ``Server`` header.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import time
from email.utils import parsedate_to_datetime
from pathlib import Path

import pytest

from tests.helpers.config import MakeProxy, proxy_config, rotate_token, token_file_config
from tests.helpers.fakes import TOKEN, TOKEN_2, assert_no_secret
from tests.helpers.metrics import count
from tests.helpers.rawhttp import (
    RawConnection,
    RawResponse,
    assert_problem,
    exchange,
    first_answer,
    get,
)
from tests.helpers.rawupstream import (
    MakeRaw,
    Req,
    Script,
    UpConn,
    connected,
    echo,
    echo_target,
    post,
    read_body,
    read_request,
    refusing_first_token,
    reset,
    response,
    serving,
    start_proxy,
)
from tests.helpers.wait import wait_for
from tokenproxy.daemon import Daemon
from tokenproxy.proxy.fast_path import exchange as fast_exchange
from tokenproxy.proxy.fast_path.connect import AddrInfo, open_connection

# -- helpers ----------------------------------------------------------------------------------


def chunked_post(path: str, parts: list[bytes]) -> bytes:
    body = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    return get(path, "localhost", "Transfer-Encoding: chunked", method="POST") + body


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def blob(n: int, seed: int = 7) -> bytes:
    """*n* deterministic bytes that look random (every byte value, no repeating pattern)."""
    return hashlib.shake_256(b"%d" % seed).digest(n)


def handovers(daemon: Daemon) -> float:
    """Connections the fast path has handed to aiohttp's protocol so far."""
    return sum(count(daemon, "tokenproxy_fast_path_handovers_total", reason=reason)
               for reason in ("protocol", "refused", "malformed", "shutdown"))


def fast(resp: RawResponse, daemon: Daemon | None = None) -> bool:
    """The fast path answered: no Server added, and (given the daemon) no handover yet."""
    return resp.get("Server") is None and (daemon is None or handovers(daemon) == 0)


async def final_response(conn: RawConnection) -> RawResponse:
    """The next response that is not an interim (1xx) one."""
    while True:
        resp = await conn.response()
        if resp.status >= 200:
            return resp


# -- 1. pipelining ----------------------------------------------------------------------------


class TestPipelining:
    @pytest.mark.slow
    async def test_pipelined_requests_answered_in_order_once_each(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """Three requests in one packet: three answers in order, each forwarded once, over
        one pooled upstream connection."""
        up = await raw_upstream(serving())
        daemon = await start_proxy(make_proxy, up)
        async with connected(daemon.port()) as conn:
            await conn.send(get("/a") + get("/b?x=1") + get("/c"))
            answers = [await conn.response() for _ in range(3)]
            assert await conn.wait_closed(0.1) is None
        assert [200] * 3 == [r.status for r in answers]
        assert ["/a", "/b?x=1", "/c"] == [r.json()["target"] for r in answers]
        assert all(fast(r, daemon) for r in answers)
        assert ["/a", "/b?x=1", "/c"] == up.targets
        assert 1 == len(up.conns)
        assert [f"Bearer {TOKEN}"] * 3 == [r.get("Authorization") for r in up.requests]

    @pytest.mark.parametrize("retry_on", [[401], []], ids=["replayable", "streamed"])
    @pytest.mark.parametrize("split", [False, True], ids=["one-packet", "body-split"])
    async def test_post_with_body_pipelined_behind_a_get(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw, retry_on: list[int], split: bool
    ) -> None:
        """GET, POST with a Content-Length body, GET pipelined: the body reaches the upstream
        intact and the request after it is read from the right byte, whether the body is
        buffered for a replay or streamed, and whether it comes in one packet or two (the
        second carrying the body's end and the next request)."""
        up = await raw_upstream(serving())
        daemon = await start_proxy(make_proxy, up, {"retry_on": retry_on})
        body = blob(20_000)
        data = get("/a") + post("/b", body) + get("/c")
        async with connected(daemon.port()) as conn:
            if split:
                cut = len(get("/a")) + len(post("/b", body)) - len(body) + 5000
                await conn.send(data[:cut])
                first = await conn.response()
                await conn.send(data[cut:])
                answers = [first, await conn.response(), await conn.response()]
            else:
                await conn.send(data)
                answers = [await conn.response() for _ in range(3)]
        assert [200] * 3 == [r.status for r in answers]
        docs = [r.json() for r in answers]
        assert ["/a", "/b", "/c"] == [d["target"] for d in docs]
        assert (len(body), sha(body)) == (docs[1]["len"], docs[1]["sha256"])
        assert [b"", body, b""] == [r.body for r in up.requests]
        assert ["GET", "POST", "GET"] == [r.method for r in up.requests]

    async def test_many_pipelined_requests_beyond_the_read_ahead_limit(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """More pipelined bytes than the fast path holds while answering (reading pauses and
        resumes): every request is answered, in order."""
        up = await raw_upstream(serving())
        daemon = await start_proxy(make_proxy, up)
        n = 300
        pad = "X-Pad: " + "p" * 300
        async with connected(daemon.port()) as conn:
            await conn.send(b"".join(get(f"/r{i}", "localhost", pad) for i in range(n)))
            answers = [await conn.response(timeout=5) for _ in range(n)]
        assert [f"/r{i}" for i in range(n)] == [r.json()["target"] for r in answers]
        assert [f"/r{i}" for i in range(n)] == up.targets


# -- 2. handover to aiohttp mid-connection ------------------------------------------------------


class TestHandover:
    async def _two_fast(self, conn: RawConnection, daemon: Daemon) -> None:
        for path in ("/f1", "/f2"):
            await conn.send(get(path))
            resp = await conn.response()
            assert (200, path) == (resp.status, resp.json()["target"])
            assert fast(resp, daemon)

    @pytest.mark.parametrize("kind", ["chunked", "http10"])
    async def test_request_handed_over_after_fast_requests_keeps_its_body(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw, kind: str
    ) -> None:
        """After two fast-path requests on a keep-alive connection, a chunked or HTTP/1.0
        request on the same connection goes to aiohttp, is answered, and its body reaches the
        upstream intact."""
        up = await raw_upstream(serving())
        daemon = await start_proxy(make_proxy, up)
        parts = [blob(3000, 1), blob(70_000, 2), b"tail"]
        body = b"".join(parts)
        if kind == "chunked":
            request = chunked_post("/h", parts)
        else:
            request = (f"POST /h HTTP/1.0\r\nHost: localhost\r\nContent-Length: {len(body)}"
                       "\r\n\r\n").encode() + body
        async with connected(daemon.port()) as conn:
            await self._two_fast(conn, daemon)
            await conn.send(request)
            resp = await conn.response()
            assert 200 == resp.status
            assert 1 == count(daemon, "tokenproxy_fast_path_handovers_total",
                               reason="protocol")
            doc = resp.json()
            assert ("/h", len(body), sha(body)) == (doc["target"], doc["len"], doc["sha256"])
            if kind == "chunked":   # the connection goes on, on aiohttp's side now
                await conn.send(get("/after"))
                after = await conn.response()
                assert (200, "/after") == (after.status, after.json()["target"])
        assert ["/f1", "/f2", "/h"] == up.targets[:3]
        assert body == up.requests[2].body
        assert f"Bearer {TOKEN}" == up.requests[2].get("Authorization")

    async def test_handover_in_the_same_packet_as_fast_requests(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """A fast GET, a chunked POST and a GET in one packet: the bytes handed to aiohttp are
        exactly the unanswered rest, so all three are answered in order."""
        up = await raw_upstream(serving())
        daemon = await start_proxy(make_proxy, up)
        parts = [b"hello ", b"chunked ", b"world"]
        async with connected(daemon.port()) as conn:
            await conn.send(get("/a") + chunked_post("/b", parts) + get("/c"))
            answers = [await conn.response() for _ in range(3)]
        assert ["/a", "/b", "/c"] == [r.json()["target"] for r in answers]
        assert fast(answers[0])
        # /a was the fast path's: a handover keeps the connection, so it happened once, at /b
        assert 1 == count(daemon, "tokenproxy_fast_path_handovers_total", reason="protocol")
        assert b"hello chunked world" == up.requests[1].body
        assert ["/a", "/b", "/c"] == up.targets

    async def test_expect_100_continue_after_fast_requests(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """Expect: 100-continue on a connection the fast path served: 100 Continue comes,
        then the body is sent and reaches the upstream."""
        up = await raw_upstream(serving())
        daemon = await start_proxy(make_proxy, up)
        body = blob(5000)
        async with connected(daemon.port()) as conn:
            await self._two_fast(conn, daemon)
            await conn.send(get("/e", "localhost", f"Content-Length: {len(body)}",
                                "Expect: 100-continue", method="PUT"))
            interim = await conn.response()
            assert 100 == interim.status
            await conn.send(body)
            resp = await conn.response()
        assert (200, len(body), sha(body)) == (resp.status, resp.json()["len"],
                                               resp.json()["sha256"])
        assert body == up.requests[-1].body

    @pytest.mark.parametrize(("bad", "status", "cause"), [
        (get("/x", "evil.example"), 403, "forbidden_host"),
        (get("/a/../b"), 400, "bad_request"),
        (get("/x", "localhost", "X-Forwarded-For: 10.0.0.1"), 403, "forwarded"),
    ], ids=["bad-host", "dot-segment", "forwarded"])
    async def test_rejected_request_after_fast_requests(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw, bad: bytes, status: int, cause: str
    ) -> None:
        """A request the security checks refuse, after fast-path requests on the same
        connection, gets its problem+json answer and never reaches the upstream."""
        up = await raw_upstream(serving())
        daemon = await start_proxy(make_proxy, up)
        async with connected(daemon.port()) as conn:
            await self._two_fast(conn, daemon)
            await conn.send(bad)
            resp = await conn.response()
            assert_problem(resp, status, cause)
            assert_no_secret(resp.raw)
            if status == 403:   # not a framing problem: the connection goes on
                await conn.send(get("/after"))
                assert 200 == (await conn.response()).status
        assert ["/f1", "/f2"] == up.targets[:2]
        assert not any(t in ("/x", "/a/../b", "/b") for t in up.targets)
        assert 1.0 == count(daemon, "tokenproxy_rejected_requests_total", cause=cause)

    async def test_bare_lf_request_is_answered_400(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """A head whose lines end in a bare LF is answered 400 at once (as the aiohttp path
        did), not left waiting for a CRLF CRLF that never comes until header_timeout."""
        up = await raw_upstream(serving())
        daemon = await start_proxy(make_proxy, up)
        resp, closed = await exchange(daemon.port(), b"GET /x HTTP/1.1\nHost: localhost\n\n",
                                      timeout=1)
        assert_problem(resp, 400, "bad_request")
        assert closed
        assert [] == up.requests


# -- 3. uploads: streamed once, or replayed after a 401 -----------------------------------------


class TestUploads:
    async def test_body_over_max_replay_streams_and_its_401_is_skipped(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw, tmp_path: Path
    ) -> None:
        """A 1 MiB body over max_replay_body (64 KiB) is streamed: the upstream gets the head
        before the client has sent the whole body, the body arrives intact, and the 401 is
        passed back without a retry (auth_retries outcome "skipped") although a newer token
        is there to be had."""
        head_seen = asyncio.Event()
        token_path = tmp_path / "token"

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         conn: UpConn) -> None:
            while (req := await read_request(reader, conn, body=False)) is not None:
                head_seen.set()
                req.body = await read_body(reader, req, conn)
                if req.get("Authorization") == f"Bearer {TOKEN}":
                    rotate_token(token_path)
                    writer.write(response(b"refused", "401 Unauthorized",
                                          'WWW-Authenticate: Bearer error="invalid_token"'))
                else:
                    writer.write(echo(req))
                await writer.drain()

        up = await raw_upstream(script)
        daemon = await make_proxy(token_file_config(
            up.url(), token_path, limits={"max_replay_body": "64KiB"}))
        body = blob(1024 * 1024)
        request = post("/up", body)[:-len(body)]   # the head alone
        async with connected(daemon.port()) as conn:
            await conn.send(request + body[:100_000])
            await asyncio.wait_for(head_seen.wait(), 2)   # streamed, not buffered first
            await conn.send(body[100_000:])
            resp = await conn.response()
        assert (401, b"refused") == (resp.status, resp.body)
        assert fast(resp, daemon)
        [seen] = up.requests
        assert sha(body) == sha(seen.body)
        assert 1.0 == count(daemon, "tokenproxy_auth_retries_total", route="/",
                             outcome="skipped")
        assert 0.0 == count(daemon, "tokenproxy_auth_retries_total", route="/",
                             outcome="success")

    @pytest.mark.parametrize("size", [600 * 1024, 1024 * 1024], ids=["600KiB", "1MiB"])
    async def test_buffered_body_up_to_max_replay_is_forwarded(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw, size: int
    ) -> None:
        """A plain POST whose body is under the default max_replay_body (1 MiB) but larger
        than two socket reads: the proxy buffers it whole (for a possible replay) and
        forwards it at once, not after the route timeout as a 408."""
        up = await raw_upstream(serving())
        daemon = await start_proxy(make_proxy, up, {"timeout": "1s"})
        body = blob(size)
        async with connected(daemon.port()) as conn:
            await conn.send(post("/up", body))
            resp = await conn.response(timeout=5)
        assert 200 == resp.status, resp.body
        assert (size, sha(body)) == (resp.json()["len"], resp.json()["sha256"])
        assert [body] == [r.body for r in up.requests]

    @pytest.mark.parametrize(("size", "limit"), [(48 * 1024, "64KiB"), (600 * 1024, "1MiB")],
                             ids=["48KiB", "600KiB"])
    async def test_body_under_max_replay_is_replayed_after_a_401(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw, tmp_path: Path, size: int,
        limit: str
    ) -> None:
        """A body under max_replay_body (small, or larger than one socket read): the upstream
        refuses the first token, the proxy renews it and sends the same bytes once more; the
        client sees only the 200, and its connection carries the next request."""
        token_path = tmp_path / "token"

        up = await raw_upstream(serving(refusing_first_token(token_path)))
        raw = token_file_config(up.url(), token_path, limits={"max_replay_body": limit})
        raw["routes"][0]["timeout"] = "1s"
        daemon = await make_proxy(raw)
        body = blob(size)
        async with connected(daemon.port()) as conn:
            await conn.send(post("/up", body)[:1000])
            await conn.send(post("/up", body)[1000:])
            resp = await conn.response(timeout=5)
            assert 200 == resp.status, resp.body
            doc = resp.json()
            await conn.send(get("/next"))
            nxt = await conn.response()
        assert (len(body), sha(body), "token-2") == (doc["len"], doc["sha256"], doc["auth"])
        assert [f"Bearer {TOKEN}", f"Bearer {TOKEN_2}", f"Bearer {TOKEN_2}"] == [
            r.get("Authorization") for r in up.requests]
        assert [body, body] == [r.body for r in up.requests[:2]]
        assert (200, "/next") == (nxt.status, nxt.json()["target"])
        assert 1.0 == count(daemon, "tokenproxy_auth_retries_total", route="/",
                             outcome="success")


# -- 4. an upstream answering before it read the body -----------------------------------------


def early(answer: bytes) -> Script:
    """Answer right after the head, then read (and drop) the body; keep alive."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        while (req := await read_request(reader, conn, body=False)) is not None:
            writer.write(answer)
            await writer.drain()
            req.body = await read_body(reader, req, conn)

    return script


class TestEarlyAnswer:
    async def test_early_answer_with_a_small_rest_keeps_the_connection(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """The upstream answers 200 before reading a streamed body: the client gets it, the
        rest of its body (small) is read and dropped, and the next request on the same
        connection is answered."""
        up = await raw_upstream(early(response(b"early")))
        daemon = await start_proxy(make_proxy, up, {"retry_on": []})
        body = blob(200_000)
        async with connected(daemon.port()) as conn:
            await conn.send(post("/up", body)[:-100_000])
            resp = await conn.response()
            assert (200, b"early") == (resp.status, resp.body)
            await conn.send(body[-100_000:] + get("/next"))
            nxt = await conn.response()
            assert (200, b"early") == (nxt.status, nxt.body)
        assert ["/up", "/next"] == up.targets

    async def test_early_answer_with_a_large_rest_closes_and_serving_goes_on(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """With more than the proxy will drop still to come, the client gets the 200 and the
        connection is closed after it; a new connection is served. Nothing hangs."""
        up = await raw_upstream(early(response(b"early")))
        daemon = await start_proxy(make_proxy, up, {"retry_on": []})
        body = blob(4 * 1024 * 1024)
        async with connected(daemon.port()) as conn:
            await conn.send(post("/up", body)[:50_000])
            resp = await conn.response()
            assert (200, b"early") == (resp.status, resp.body)
            assert await conn.wait_closed(2) is not None
        resp = await first_answer(daemon.port(), get("/next"))
        assert (200, b"early") == (resp.status, resp.body)
        assert ["/up", "/next"] == up.targets

    async def test_upstream_refusing_an_upload_and_closing_at_once(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """The upstream answers 413 with Connection: close right after the head and hangs up
        without reading the body: the client gets the 413 as sent, and serving goes on."""
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         conn: UpConn) -> None:
            req = await read_request(reader, conn, body=False)
            assert req is not None
            if req.method == "POST":
                writer.write(response(b"too big", "413 Payload Too Large", "Connection: close"))
            else:
                writer.write(echo(req))
            await writer.drain()

        up = await raw_upstream(script)
        daemon = await start_proxy(make_proxy, up, {"retry_on": []})
        body = blob(4 * 1024 * 1024)
        async with connected(daemon.port()) as conn:
            await conn.send(post("/up", body)[:300_000])
            resp = await conn.response()
        assert (413, b"too big") == (resp.status, resp.body)
        resp = await first_answer(daemon.port(), get("/next"))
        assert (200, "/next") == (resp.status, resp.json()["target"])

    @pytest.mark.slow
    async def test_unfinished_body_after_an_early_answer_does_not_hold_the_connection(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """The upstream answers before the body is complete; the client then sends nothing more.
        The connection is kept to read and drop the rest of the body (FastConnection.body_done,
        proxy/fast_path/connection.py), and that drain has a deadline of its own (header_timeout)
        because no other timer runs while it lasts -- neither header_timeout for a next head nor
        keepalive_timeout: without it the connection and its max_connections slot would be held
        for ever. (aiohttp's protocol bounds the same drain by lingering_time, 10 s.)"""
        async def early(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        conn: UpConn) -> None:
            while await read_request(reader, conn, body=False) is not None:
                writer.write(response(b"early"))
                await writer.drain()

        up = await raw_upstream(early)
        daemon = await start_proxy(make_proxy, up, {"retry_on": []},
                                   limits={"header_timeout": "1s", "keepalive_timeout": "1s"})
        async with connected(daemon.port()) as conn:
            await conn.send(get("/up", "localhost", "Content-Length: 100000", method="POST")
                            + b"x" * 1000)
            resp = await conn.response()
            assert (200, b"early") == (resp.status, resp.body)
            closed = await conn.wait_closed(5)
        assert closed is not None, "connection still open 5 s after the answer (timeouts: 1 s)"


# -- 5. response framing ----------------------------------------------------------------------


class TestResponseFraming:
    async def test_chunked_response_is_relayed_whole(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """A chunked upstream body (with an extension and a trailer) reaches the client
        complete, and the connections on both sides are reused."""
        chunked = (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                   b"5;ext=1\r\nhello\r\n1\r\n \r\n6\r\nworld!\r\n0\r\nX-Trailer: t\r\n\r\n")
        up = await raw_upstream(serving(lambda r: chunked))
        daemon = await start_proxy(make_proxy, up)
        async with connected(daemon.port()) as conn:
            answers = []
            for _ in range(2):
                await conn.send(get("/c"))
                answers.append(await conn.response())
        assert [(200, b"hello world!")] * 2 == [(r.status, r.body) for r in answers]
        assert ["chunked"] * 2 == [r.get("Transfer-Encoding") for r in answers]
        assert 1 == len(up.conns)

    async def test_close_delimited_response_reaches_the_client_chunked(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """HTTP/1.1 200 without Content-Length, ended by the close: the client gets the whole
        body, chunked, on a connection that stays usable."""
        body = blob(300_000)

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         conn: UpConn) -> None:
            req = await read_request(reader, conn)
            assert req is not None
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n")
            for i in range(0, len(body), 50_000):
                writer.write(body[i:i + 50_000])
                await writer.drain()

        up = await raw_upstream(script)
        daemon = await start_proxy(make_proxy, up)
        async with connected(daemon.port()) as conn:
            await conn.send(get("/close"))
            resp = await conn.response()
            assert (200, "chunked") == (resp.status, resp.get("Transfer-Encoding"))
            assert sha(body) == sha(resp.body)
            await conn.send(get("/again"))
            again = await conn.response()
            assert sha(body) == sha(again.body)
        assert 2 == len(up.conns)

    @pytest.mark.parametrize("interim", [
        b"HTTP/1.1 100 Continue\r\n\r\n",
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a.js>\r\n\r\n",
    ], ids=["100", "103", "100-and-103"])
    async def test_interim_answers_before_the_real_one(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw, interim: bytes
    ) -> None:
        """100 Continue or 103 Early Hints before the 200: the client gets the 200 with its
        body and its own headers (none of the interim answer's)."""
        up = await raw_upstream(serving(lambda r: interim + response(b"final", "200 OK",
                                                                     "X-Final: yes")))
        daemon = await start_proxy(make_proxy, up)
        async with connected(daemon.port()) as conn:
            await conn.send(get("/i"))
            resp = await final_response(conn)
            assert (200, b"final", "yes") == (resp.status, resp.body, resp.get("X-Final"))
            assert resp.get("Link") is None
            await conn.send(get("/i"))
            assert (200, b"final") == ((again := await final_response(conn)).status,
                                       again.body)

    async def test_truncated_content_length_body_cuts_the_client(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """Content-Length 1000, 100 bytes, then the upstream closes: the client's connection
        is cut, so the response cannot pass for a complete one."""
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         conn: UpConn) -> None:
            await read_request(reader, conn)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"y" * 100)
            await writer.drain()

        up = await raw_upstream(script)
        daemon = await start_proxy(make_proxy, up)
        async with connected(daemon.port()) as conn:
            await conn.send(get("/t"))
            with pytest.raises(asyncio.IncompleteReadError) as info:
                await conn.response()
            assert b"y" * 100 == info.value.partial
        await wait_for(lambda: count(daemon, "tokenproxy_upstream_errors_total", route="/",
                                      kind="reset") == 1, "the reset counted")

    async def test_truncated_chunked_body_cuts_the_client(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """A chunked body the upstream breaks off: no last chunk is invented for the client,
        whose connection is cut."""
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         conn: UpConn) -> None:
            await read_request(reader, conn)
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"a\r\n0123456789\r\n")
            await writer.drain()

        up = await raw_upstream(script)
        daemon = await start_proxy(make_proxy, up)
        async with connected(daemon.port()) as conn:
            await conn.send(get("/t"))
            head = await conn.response(head_only=True)
            assert 200 == head.status
            rest = await asyncio.wait_for(conn.reader.read(), 2)   # until the cut
        assert b"0123456789" in rest
        assert not rest.endswith(b"0\r\n\r\n")

    async def test_head_answer_has_no_body_and_the_connections_go_on(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """HEAD: the upstream's Content-Length comes back with no body, and the client
        connection carries the next request; the upstream connection does not
        (proxy/rules/reuse.py: a body sent after a HEAD answer anyway would be the next
        request's answer)."""
        def answer(req: Req) -> bytes:
            if req.method == "HEAD":
                return b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"
            return echo(req)

        up = await raw_upstream(serving(answer))
        daemon = await start_proxy(make_proxy, up)
        async with connected(daemon.port()) as conn:
            await conn.send(get("/h", method="HEAD"))
            head = await conn.response(head_only=True)
            await conn.send(get("/g"))
            nxt = await conn.response()
        assert (200, "1234") == (head.status, head.get("Content-Length"))
        assert (200, "/g") == (nxt.status, nxt.json()["target"])
        assert 2 == len(up.conns)
        assert "close" == up.conns[0].requests[0].get("Connection")

    async def test_bytes_past_the_content_length_never_reach_the_client(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """An upstream that sends a second, unasked response right behind the first (in the
        same packet) must not get its bytes onto the client connection: the client's next
        request gets its own answer, not the smuggled one."""
        smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nPWND"

        def answer(req: Req) -> bytes:
            if req.target == "/first":
                return response(b"ok") + response(smuggled)
            return echo(req)

        up = await raw_upstream(serving(answer))
        daemon = await start_proxy(make_proxy, up)
        async with connected(daemon.port()) as conn:
            await conn.send(get("/first"))
            first = await conn.response()
            await conn.send(get("/second"))
            second = await conn.response()
        assert (200, b"ok") == (first.status, first.body)
        assert b"PWND" != second.body
        assert (200, "/second") == (second.status, second.json()["target"])

    async def test_reset_in_a_close_delimited_body_is_visible_to_the_client(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """A response without Content-Length or chunked ends with the connection -- cleanly. An
        RST is not an end: the fast path must not finish the re-chunked body with 0\\r\\n\\r\\n,
        or the client takes a truncated body as complete. Fast path only: aiohttp's client reports
        a close-delimited body as complete whether the connection ended with FIN or RST (its
        connection_lost feeds EOF either way), a known gap of the aiohttp path (README)."""
        release = asyncio.Event()

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         conn: UpConn) -> None:
            await read_request(reader, conn)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\npartial-")
            await writer.drain()
            await release.wait()
            reset(writer)

        up = await raw_upstream(script)
        daemon = await start_proxy(make_proxy, up)
        async with connected(daemon.port()) as conn:
            await conn.send(get("/x"))
            head = await conn.response(head_only=True)
            assert 200 == head.status
            got = b""
            while b"partial-" not in got:
                got += await asyncio.wait_for(conn.reader.read(1024), 2)
            release.set()
            await conn.wait_closed(0.5)
            got += conn.trailing
        framing = (head.get("Transfer-Encoding") or "").lower()
        assert not (framing == "chunked" and got.endswith(b"0\r\n\r\n")), \
            "a reset upstream body was relayed as complete"


# -- 6. the raw target ------------------------------------------------------------------------


class TestTarget:
    @pytest.mark.parametrize(("sent", "upstream_path", "expected"), [
        ("/x?", "/", "/x?"),
        ("/x?a=%2F&b=&&c", "/", "/x?a=%2F&b=&&c"),
        ("/api/x?", "/v1/", "/v1/x?"),
        ("/api?", "/v1/", "/v1/?"),
    ])
    async def test_raw_target_and_empty_query_preserved(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw, sent: str, upstream_path: str,
        expected: str
    ) -> None:
        """The request line the upstream reads carries the raw query, an empty "?" included."""
        up = await raw_upstream(serving())
        prefix = "/api" if sent.startswith("/api") else "/"
        daemon = await make_proxy(proxy_config(up.url(), TOKEN, routes=[
            {"prefix": prefix, "upstream": up.url(upstream_path), "provider": "api"}]))
        resp = await first_answer(daemon.port(), get(sent))
        assert fast(resp, daemon)
        assert [expected] == up.targets
        assert "HTTP/1.1" == up.requests[0].version


# -- 7. keep-alive and head deadlines ---------------------------------------------------------


class TestKeepAlive:
    @pytest.mark.slow
    async def test_idle_connection_closed_after_keepalive_timeout(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """An idle fast-path connection is closed keepalive_timeout after its last answer."""
        up = await raw_upstream(serving())
        daemon = await start_proxy(make_proxy, up,
                                   limits={"keepalive_timeout": "300ms", "header_timeout": "5s"})
        async with connected(daemon.port()) as conn:
            await conn.send(get("/a"))
            assert 200 == (await conn.response()).status
            answered = time.monotonic()
            assert await conn.wait_closed(0.1) is None
            assert await conn.wait_closed(3) is not None
            idle = time.monotonic() - answered
        assert 0.25 <= idle < 2.0
        assert b"" == conn.trailing

    @pytest.mark.slow
    async def test_a_slow_answer_is_not_cut_by_the_idle_or_head_timers(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """A request whose answer takes longer than keepalive_timeout and header_timeout is
        answered: neither timer runs while a request is being handled."""
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         conn: UpConn) -> None:
            while (req := await read_request(reader, conn)) is not None:
                await asyncio.sleep(0.6)
                writer.write(echo(req))
                await writer.drain()

        up = await raw_upstream(script)
        daemon = await start_proxy(make_proxy, up,
                                   limits={"keepalive_timeout": "200ms", "header_timeout": "200ms"})
        async with connected(daemon.port()) as conn:
            await conn.send(get("/slow"))
            resp = await conn.response()
        assert (200, "/slow") == (resp.status, resp.json()["target"])

    @pytest.mark.slow
    async def test_partial_head_on_a_kept_alive_connection_meets_header_timeout(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """After an answer, the first bytes of a next head start header_timeout (short),
        not keepalive_timeout (long): a head that never ends is cut."""
        up = await raw_upstream(serving())
        daemon = await start_proxy(make_proxy, up,
                                   limits={"keepalive_timeout": "30s", "header_timeout": "300ms"})
        async with connected(daemon.port()) as conn:
            await conn.send(get("/a"))
            assert 200 == (await conn.response()).status
            started = time.monotonic()
            await conn.send(b"GET /b HTTP/1.1\r\nHost: local")
            assert await conn.wait_closed(3) is not None
            took = time.monotonic() - started
        assert 0.25 <= took < 2.0
        assert ["/a"] == up.targets

    async def test_connection_close_from_the_client(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """Connection: close: the answer says Connection: close, the socket closes, and a
        request pipelined behind it is never forwarded."""
        up = await raw_upstream(serving())
        daemon = await start_proxy(make_proxy, up)
        async with connected(daemon.port()) as conn:
            await conn.send(get("/a", "localhost", "Connection: close") + get("/b"))
            resp = await conn.response()
            assert (200, "close") == (resp.status, resp.get("Connection"))
            assert fast(resp, daemon)
            assert await conn.wait_closed(2) is not None
        assert b"" == conn.trailing
        assert ["/a"] == up.targets


# -- 8. the upstream pool ---------------------------------------------------------------------


class TestPool:
    async def test_upstream_connection_close_is_not_pooled(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """An upstream answering Connection: close and closing each time: every request on
        the client's connection gets a fresh upstream connection and is answered."""
        up = await raw_upstream(serving(lambda r: response(r.target.encode(), "200 OK",
                                                           "Connection: close")))
        daemon = await start_proxy(make_proxy, up)
        async with connected(daemon.port()) as conn:
            bodies = []
            for path in ("/1", "/2", "/3"):
                await conn.send(get(path))
                resp = await conn.response()
                assert resp.get("Connection") is None   # the upstream's close is hop-by-hop
                bodies.append(resp.body)
        assert [b"/1", b"/2", b"/3"] == bodies
        assert [1, 1, 1] == [len(c.requests) for c in up.conns]

    @pytest.mark.parametrize("method", ["GET", "POST"])
    async def test_pooled_connection_closed_while_idle_is_not_used(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw, method: str
    ) -> None:
        """The upstream closes a keep-alive connection after its answer (an idle timeout):
        the next request, even a POST that may not be sent twice, goes on a new one."""
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         conn: UpConn) -> None:
            req = await read_request(reader, conn)
            assert req is not None
            writer.write(echo(req))
            await writer.drain()

        up = await raw_upstream(script)
        daemon = await start_proxy(make_proxy, up)
        async with connected(daemon.port()) as conn:
            await conn.send(get("/1"))
            assert 200 == (await conn.response()).status
            await asyncio.wait_for(up.conns[0].ended.wait(), 2)
            await asyncio.sleep(0.05)   # the FIN reaches the proxy's side of the pool
            await conn.send(post("/2", b"data") if method == "POST" else get("/2"))
            resp = await conn.response()
        assert (200, "/2") == (resp.status, resp.json()["target"])
        assert ["/1", "/2"] == up.targets
        assert 2 == len(up.conns)

    @pytest.mark.parametrize(("method", "partial", "status", "sent"), [
        ("GET", False, 200, 2),
        ("POST", False, 502, 1),
        ("GET", True, 502, 1),
    ], ids=["get-retried", "post-not-retried", "get-after-bytes-not-retried"])
    async def test_pooled_connection_reset_before_the_answer(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw, method: str, partial: bool,
        status: int, sent: int
    ) -> None:
        """A pooled connection reset after reading the request, before any answer: a GET is
        sent once more on a new connection; a POST is not (502), nor is a GET once part of
        an answer came."""
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         conn: UpConn) -> None:
            first_conn = len(up.conns) == 1
            while (req := await read_request(reader, conn)) is not None:
                if first_conn and len(conn.requests) == 2:
                    if partial:
                        writer.write(b"HTTP/1.1 200 OK\r\nContent-Le")
                        await writer.drain()
                        await asyncio.sleep(0.05)   # read by the proxy before the reset
                    reset(writer)
                    return
                writer.write(echo(req))
                await writer.drain()

        up = await raw_upstream(script)
        daemon = await start_proxy(make_proxy, up)
        second = post("/2", b"body") if method == "POST" else get("/2")
        async with connected(daemon.port()) as conn:
            await conn.send(get("/1"))
            assert 200 == (await conn.response()).status
            await conn.send(second)
            resp = await conn.response()
        assert status == resp.status
        if status == 502:
            assert_problem(resp, 502, "upstream_unreachable")
        assert ["/1"] + ["/2"] * sent == up.targets

    async def test_pooled_connection_left_paused_by_a_slow_client(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw, tmp_path: Path
    ) -> None:
        """A response relayed to a client that is not reading: the client's socket fills,
        the proxy stops reading from the upstream, and the response completes in that same
        read. The upstream connection goes back to the pool; the next request on it must
        still be read (not wait for the route timeout and get 504).

        A unix listener makes the client side's socket buffer small and fixed (no TCP
        autotuning), and the client reads nothing until the proxy is done."""
        size = 320 * 1024
        written = asyncio.Event()

        def answer(req: Req) -> bytes:
            if req.target == "/big":
                written.set()
                return response(b"b" * size)
            return echo(req)

        up = await raw_upstream(serving(answer))
        path = tmp_path / "fp.sock"
        assert len(str(path)) < 100
        await start_proxy(make_proxy, up, {"timeout": "1s"}, listen=f"unix:{path}")
        loop = asyncio.get_running_loop()
        client = socket.socket(socket.AF_UNIX)
        client.setblocking(False)
        try:
            await loop.sock_connect(client, str(path))
            await loop.sock_sendall(client, get("/big"))
            await asyncio.wait_for(written.wait(), 2)
            await asyncio.sleep(0.05)   # the proxy relays into the client's full socket
            got = b""
            while not got.endswith(b"b" * 64) or len(got) < size:
                data = await asyncio.wait_for(loop.sock_recv(client, 65536), 2)
                assert data
                got += data
        finally:
            client.close()
        assert got.startswith(b"HTTP/1.1 200 OK\r\n")
        conn = await RawConnection.open_unix(str(path))
        try:
            await conn.send(get("/next"))
            resp = await conn.response(timeout=4)
        finally:
            await conn.close()
        assert (200, "/next") == (resp.status, resp.json().get("target"))

    async def test_upstream_connection_closed_when_the_relay_fails_internally(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Any exception between sending the request and releasing its upstream connection (here:
        the response-head rendering fails) ends in the exchange's 500; the connection it held is
        then neither pooled nor left open, but aborted (FastConnection.finish,
        proxy/fast_path/connection.py): forgotten, its socket would stay open, its body unread,
        until the upstream gave up. The aiohttp path closes it too."""
        def boom(*args: object, **kwargs: object) -> list[tuple[bytes, bytes]]:
            raise RuntimeError("injected")

        up = await raw_upstream(serving(echo_target))
        daemon = await start_proxy(make_proxy, up)
        monkeypatch.setattr(fast_exchange, "response_headers", boom)
        async with connected(daemon.port()) as conn:
            await conn.send(get("/x"))
            resp = await conn.response()
        assert 500 == resp.status
        [upconn] = up.conns
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(upconn.ended.wait(), 1)
        assert upconn.ended.is_set(), "the upstream connection was left open, owned by no one"

    @pytest.mark.slow
    async def test_idle_pooled_connection_is_closed_after_the_pool_keepalive(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """An idle pooled connection is closed once the pool's keep-alive time passes, by a timer
        (UpstreamPool's sweep, proxy/fast_path/pool.py), not only when take() or release() next
        visits its origin: else, after a burst, up to MAX_IDLE_PER_ORIGIN sockets per origin
        would stay open for as long as the upstream keeps them (for ever with an upstream that
        has no idle timeout), and those of an origin that a reload removed -- or released into
        the pool after a reload under an old TLS context's key -- would never be taken again.
        aiohttp's connector closes idle connections after its keepalive_timeout (15 s) with a
        timer too. (The pool's keepalive is shortened here to keep the test fast.)"""
        up = await raw_upstream(serving(echo_target))
        daemon = await start_proxy(make_proxy, up)
        assert daemon._serving is not None
        daemon._serving.fast.pool.keepalive = 0.2
        async with connected(daemon.port()) as conn:
            await conn.send(get("/x"))
            assert 200 == (await conn.response()).status
        [upconn] = up.conns
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(upconn.ended.wait(), 1.5)
        assert upconn.ended.is_set(), "an expired idle upstream connection is still open"


# -- 9. client disconnects --------------------------------------------------------------------


class TestClientGone:
    async def test_client_leaving_mid_stream_closes_the_upstream_and_is_counted(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """A client that hangs up during a long streamed body: the upstream connection is
        closed (the upstream's writes fail), and the request is counted once, as a 200."""
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         conn: UpConn) -> None:
            await read_request(reader, conn)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000000000\r\n\r\n")
            for _ in range(2000):   # about 10 s of a slow stream, unless the proxy lets go
                writer.write(b"z" * 16384)
                await writer.drain()
                await asyncio.sleep(0.005)

        up = await raw_upstream(script)
        daemon = await start_proxy(make_proxy, up)
        conn = await RawConnection.open(daemon.port())
        await conn.send(get("/stream"))
        head = await conn.response(head_only=True)
        assert 200 == head.status
        await conn.reader.readexactly(50_000)
        await conn.close()
        await asyncio.wait_for(up.conns[0].ended.wait(), 2)
        await wait_for(lambda: count(daemon, "tokenproxy_requests_total", route="/",
                                      method="GET", code="200") == 1, "the request counted")
        assert 0.0 == count(daemon, "tokenproxy_inflight_requests")

    @pytest.mark.parametrize("when", ["before-the-head", "mid-body"])
    async def test_client_leaving_while_the_upstream_is_silent_closes_the_upstream(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw, when: str
    ) -> None:
        """A client that closes its connection (a plain FIN, nothing unread) while the
        upstream is silent -- thinking before its answer, or between two events of a
        stream: the upstream connection is closed then, and the request counted, as the
        aiohttp path does; not left open for as long as the upstream stays silent."""
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         conn: UpConn) -> None:
            await read_request(reader, conn)
            if when == "mid-body":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                             b"Transfer-Encoding: chunked\r\n\r\n"
                             b"f\r\ndata: event 0\n\n\r\n")
                await writer.drain()
            while await reader.read(65536):   # silent until the proxy lets go
                pass

        up = await raw_upstream(script)
        daemon = await start_proxy(make_proxy, up)
        conn = await RawConnection.open(daemon.port())
        await conn.send(get("/events"))
        if when == "mid-body":
            head = await conn.response(head_only=True)
            assert 200 == head.status
            assert b"f\r\ndata: event 0\n\n\r\n" == await conn.reader.readexactly(20)
        else:
            await wait_for(lambda: len(up.requests) == 1, "the request upstream")
        await conn.close()
        await asyncio.wait_for(up.conns[0].ended.wait(), 1)
        code = "200" if when == "mid-body" else "499"
        await wait_for(lambda: count(daemon, "tokenproxy_requests_total", route="/",
                                      method="GET", code=code) == 1, "the request counted")


# -- 10. shutdown -----------------------------------------------------------------------------


class TestShutdown:
    async def test_stop_lets_the_request_in_flight_finish_and_closes_idle_ones(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """Daemon.stop(grace): an idle keep-alive connection is closed at once; a request in
        flight is answered in full (Connection: close) and then its connection closes; stop
        returns as soon as that is done, well within the grace."""
        release = asyncio.Event()

        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         conn: UpConn) -> None:
            while (req := await read_request(reader, conn)) is not None:
                if req.target == "/slow":
                    await release.wait()
                    writer.write(response(b"s" * 100_000))
                else:
                    writer.write(echo(req))
                await writer.drain()

        up = await raw_upstream(script)
        daemon = await start_proxy(make_proxy, up)
        idle = await RawConnection.open(daemon.port())
        busy = await RawConnection.open(daemon.port())
        try:
            await idle.send(get("/idle"))
            assert 200 == (await idle.response()).status
            await busy.send(get("/slow"))
            await wait_for(lambda: "/slow" in up.targets, "the slow request upstream")
            started = time.monotonic()
            stopping = asyncio.create_task(daemon.stop(grace=5))
            assert await idle.wait_closed(1) is not None
            assert not stopping.done()
            release.set()
            resp = await busy.response()
            assert (200, 100_000, "close") == (resp.status, len(resp.body),
                                              resp.get("Connection"))
            assert await busy.wait_closed(1) is not None
            await asyncio.wait_for(stopping, 2)
            assert time.monotonic() - started < 2
        finally:
            await idle.close()
            await busy.close()

    @pytest.mark.slow
    async def test_stop_cuts_a_request_that_outlives_the_grace(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """A request still waiting when the grace runs out is cut; stop does not wait for it."""
        async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                         conn: UpConn) -> None:
            await read_request(reader, conn)
            while await reader.read(65536):
                pass

        up = await raw_upstream(script)
        daemon = await start_proxy(make_proxy, up)
        async with connected(daemon.port()) as conn:
            await conn.send(get("/never"))
            await wait_for(lambda: len(up.requests) == 1, "the request upstream")
            started = time.monotonic()
            await asyncio.wait_for(daemon.stop(grace=0.3), 3)
            took = time.monotonic() - started
            assert 0.25 <= took < 2
            assert await conn.wait_closed(1) is not None
            await asyncio.wait_for(up.conns[0].ended.wait(), 2)


# -- 11. Date and Server ----------------------------------------------------------------------


class TestDateAndServer:
    async def test_date_added_and_no_server_invented(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """An upstream answer without Date or Server gets one Date (now, RFC 9110 format)
        and still no Server."""
        up = await raw_upstream(serving())
        daemon = await start_proxy(make_proxy, up)
        resp = await first_answer(daemon.port(), get("/d"))
        assert 200 == resp.status
        [date] = resp.header("Date")
        assert date.endswith(" GMT")
        assert abs(parsedate_to_datetime(date).timestamp() - time.time()) < 60
        assert [] == resp.header("Server")

    async def test_upstream_date_and_server_pass_unchanged(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """The upstream's own Date and Server come through as sent, Date not doubled."""
        sent_date = "Mon, 01 Jan 2001 00:00:00 GMT"
        up = await raw_upstream(serving(lambda r: response(b"x", "200 OK", f"Date: {sent_date}",
                                                           "Server: upstream/1.0")))
        daemon = await start_proxy(make_proxy, up)
        resp = await first_answer(daemon.port(), get("/d"))
        assert [sent_date] == resp.header("Date")
        assert ["upstream/1.0"] == resp.header("Server")

    async def test_fast_path_problem_answer_has_a_date(
        self, make_proxy: MakeProxy, raw_upstream: MakeRaw
    ) -> None:
        """The fast path's own 502 (upstream gone) carries a Date and no Server."""
        up = await raw_upstream(serving())
        daemon = await start_proxy(make_proxy, up)
        await up.stop()
        resp = await first_answer(daemon.port(), get("/gone"))
        assert_problem(resp, 502, "upstream_unreachable")
        assert 1 == len(resp.header("Date"))
        assert [] == resp.header("Server")


class _Peer(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport


async def test_a_name_with_several_addresses_falls_through_to_one_that_answers(
    raw_upstream: MakeRaw
) -> None:
    """Happy eyeballs (RFC 8305) on the fast path's connects: a name whose first address
    refuses (nothing listens on ::1 here) connects over the next one, at once."""
    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        await reader.read()   # until the connection closes

    port = (await raw_upstream(accept)).port
    # What a resolver gives for a name with an IPv6 and an IPv4 address, in that order.
    addresses: list[AddrInfo] = [
        (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("::1", port, 0, 0)),
        (socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("127.0.0.1", port)),
    ]
    started = time.monotonic()
    peer = await asyncio.wait_for(open_connection(addresses, "upstream.test", None, _Peer), 5)
    assert time.monotonic() - started < 2
    assert "127.0.0.1" == peer.transport.get_extra_info("peername")[0]
    peer.transport.close()
