"""The token stays confined, behind buggy upstreams and hostile local clients.

No client can make an upstream reflect a token it did not send; an answer reaches only the
client whose request produced it; a redirect never points a client at another route's
upstream; a client that pipelines and never reads cannot make the daemon buffer without bound.
Each runs on both request paths, and handed-over requests (HTTP/1.0) on the default path.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

from tests.conftest import MakeProxy, proxy_config
from tests.fakes import TOKEN
from tests.rawhttp import RawConnection, RawResponse, assert_no_secret, get
from tests.rawupstream import (
    MakeRaw,
    Req,
    UpConn,
    connected,
    post,
    read_request,
    response,
    serving,
    start_proxy,
)
from tests.stdlib_upstream import StdlibUpstream

pytestmark = pytest.mark.both_paths

# A request left unfinished: an upstream that parses it swallows the next request head -- the
# token line tokenproxy added included -- as header lines, and /echo-headers reflects them.
SWALLOW = b"GET /echo-headers HTTP/1.1\r\nX-Swallow: "
# A whole request whose answer comes 50 ms late, after the connection went back to a pool.
LATE = b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.fixture(name="stdlib")
def _stdlib() -> Iterator[StdlibUpstream]:
    with StdlibUpstream(late=0.05) as up:
        yield up


def _http10(method: str, path: str, body: bytes) -> bytes:
    head = get(path, "localhost", "Connection: keep-alive", f"Content-Length: {len(body)}",
               method=method, version="HTTP/1.0")
    return head + body


# -- a body the upstream does not read ---------------------------------------------------------


@pytest.mark.parametrize("method", ["GET", "HEAD", "DELETE", "OPTIONS"])
async def test_a_body_on_a_bodiless_method_smuggles_no_request(
    make_proxy: MakeProxy, stdlib: StdlibUpstream, method: str
) -> None:
    """http.server answers a GET without reading its body; tokenproxy must not send another
    request on that connection, or the body's unfinished request swallows its head, token
    line included, and the upstream echoes it back."""
    daemon = await make_proxy(proxy_config(stdlib.url(), TOKEN))
    async with connected(daemon.port()) as conn:
        await conn.send(get("/status", "localhost", f"Content-Length: {len(SWALLOW)}",
                            method=method) + SWALLOW)
        first = await conn.response(head_only=method == "HEAD")
        await conn.send(get("/status"))
        second = await conn.response()
    assert_no_secret(first.raw + second.raw)
    assert (200, 200, b"ok") == (first.status, second.status, second.body)
    assert f"{method} /status HTTP/1.1" == stdlib.requests[0]


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_a_body_on_a_get_still_reaches_the_upstream_whole(
    make_proxy: MakeProxy, raw_upstream: MakeRaw, framing: str
) -> None:
    """Elasticsearch-style APIs send bodies on GET: the upstream gets every byte, with
    Connection: close, and the client's connection goes on."""
    up = await raw_upstream(serving())
    daemon = await start_proxy(make_proxy, up)
    body = b'{"query": {"match_all": {}}}'
    if framing == "chunked":
        request = get("/_search", "localhost", "Transfer-Encoding: chunked") + (
            b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body))
    else:
        request = get("/_search", "localhost", f"Content-Length: {len(body)}") + body
    async with connected(daemon.port()) as conn:
        await conn.send(request)
        first = await conn.response()
        await conn.send(get("/next"))
        second = await conn.response()
    assert (len(body), 200, 200) == (first.json()["len"], first.status, second.status)
    [seen] = [r for r in up.requests if r.target == "/_search"]
    assert (body, "close") == (seen.body, seen.get("Connection"))


async def test_a_handed_over_body_on_a_get_smuggles_no_request(
    make_proxy: MakeProxy, stdlib: StdlibUpstream
) -> None:
    """The same through aiohttp's path: HTTP/1.0 keep-alive requests are handed over."""
    daemon = await make_proxy(proxy_config(stdlib.url(), TOKEN))
    async with connected(daemon.port()) as conn:
        await conn.send(_http10("GET", "/status", SWALLOW))
        first = await conn.response()
        await conn.send(_http10("GET", "/status", b""))
        second = await conn.response()
    assert_no_secret(first.raw + second.raw)
    assert (200, b"ok") == (second.status, second.body)


async def test_a_connection_that_carried_a_body_is_not_handed_to_another_client(
    make_proxy: MakeProxy, stdlib: StdlibUpstream
) -> None:
    """An endpoint that ignores POST bodies leaves the attacker's bytes in the connection: it
    must never carry another client's request (whose head, token line included, the unread
    request would swallow and reflect to that client)."""
    daemon = await make_proxy(proxy_config(stdlib.url(), TOKEN))
    async with connected(daemon.port()) as attacker:
        await attacker.send(post("/ignore", SWALLOW))
        assert b"ignored" == (await attacker.response()).body
        async with connected(daemon.port()) as victim:
            await victim.send(get("/status"))
            answer = await victim.response()
    assert_no_secret(answer.raw)
    assert (200, b"ok") == (answer.status, answer.body)


async def test_a_late_answer_to_a_smuggled_request_reaches_no_other_client(
    make_proxy: MakeProxy, stdlib: StdlibUpstream
) -> None:
    """The smuggled request's answer arrives 50 ms after the attacker's: clients on other
    connections meanwhile each get their own answer."""
    daemon = await make_proxy(proxy_config(stdlib.url(), TOKEN))

    async def victim() -> RawResponse:
        async with connected(daemon.port()) as conn:
            await conn.send(get("/status"))
            return await conn.response()

    async with connected(daemon.port()) as attacker:
        await attacker.send(post("/ignore", LATE))
        assert b"ignored" == (await attacker.response()).body
        answers = await asyncio.gather(*(victim() for _ in range(20)))
    assert [b"ok"] * 20 == [a.body for a in answers]


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
async def test_an_answer_arriving_on_an_idle_connection_reaches_nobody(
    make_proxy: MakeProxy, raw_upstream: MakeRaw, version: str
) -> None:
    """An upstream that sends an extra answer 150 ms after a complete one: the connection is
    condemned, and every later client gets its own answer -- HTTP/1.0 keep-alive clients too,
    whom the fast path hands to aiohttp's path and its pool."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        while (req := await read_request(reader, conn)) is not None:
            writer.write(response(req.target.encode()))
            await writer.drain()
            if req.target == "/first":
                await asyncio.sleep(0.15)
                writer.write(response(b"POISON"))

    up = await raw_upstream(script)
    daemon = await start_proxy(make_proxy, up)
    bodies = []
    for path in ("/first", "/second", "/third", "/fourth"):
        async with connected(daemon.port()) as conn:
            await conn.send(_http10("GET", path, b"") if version == "HTTP/1.0" else get(path))
            bodies.append((await conn.response()).body)
        if path == "/first":
            await asyncio.sleep(0.3)   # the stray answer arrives while the connection idles
    assert [b"/first", b"/second", b"/third", b"/fourth"] == bodies


# -- redirects ----------------------------------------------------------------------------------


async def test_a_location_into_another_routes_upstream_is_not_rewritten(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """Upstream A must not be able to point a redirect-following client, through the proxy, at
    route B's upstream (where the client's next request would carry B's token)."""
    b = await raw_upstream(serving())
    target = f"http://127.0.0.1:{b.port}/admin/delete-all"
    a = await raw_upstream(serving(lambda req: response(b"", "307 Temporary Redirect",
                                                        f"Location: {target}")))
    routes = [{"prefix": "/", "upstream": a.url(), "provider": "api"},
              {"prefix": "/internal", "upstream": b.url(), "provider": "api"}]
    daemon = await make_proxy(proxy_config(a.url(), TOKEN, routes=routes))
    async with connected(daemon.port()) as conn:
        await conn.send(get("/go"))
        resp = await conn.response()
    assert (307, target) == (resp.status, resp.get("Location"))
    assert [] == b.requests


# -- a client that does not read ----------------------------------------------------------------


def _bounded_reader_socket(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)   # no autotuning either
    sock.connect(("127.0.0.1", port))
    sock.setblocking(False)
    return sock


async def _settled(count: list[int], quiet: float = 0.3, limit: float = 5.0) -> int:
    """The upstream's request count once it has not moved for *quiet* seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + limit
    last = -1
    while loop.time() < deadline and count[0] != last:
        last = count[0]
        await asyncio.sleep(quiet)
    return count[0]


@pytest.mark.parametrize("kind", ["http/1.0 keep-alive", "chunked", "http/1.1"])
async def test_a_pipelining_client_that_never_reads_is_not_buffered_without_bound(
    make_proxy: MakeProxy, raw_upstream: MakeRaw, kind: str
) -> None:
    """A client pipelines 1,000 requests for 60 KB answers and reads none: tokenproxy stops
    taking its requests while its answers wait (before, every answer was read from the
    upstream and held: the daemon grew past a gigabyte)."""
    seen = [0]

    def answer(req: Req) -> bytes:
        seen[0] += 1
        return response(b"x" * 60_000)

    up = await raw_upstream(serving(answer))
    daemon = await start_proxy(make_proxy, up)
    one = {
        "http/1.0 keep-alive": _http10("GET", "/big", b""),
        "chunked": get("/big", "localhost", "Transfer-Encoding: chunked", method="POST")
        + b"3\r\nabc\r\n0\r\n\r\n",
        "http/1.1": get("/big"),
    }[kind]
    sock = _bounded_reader_socket(daemon.port())
    try:
        await asyncio.get_running_loop().sock_sendall(sock, one * 1000)
        settled = await _settled(seen)
    finally:
        sock.close()
    assert settled < 300, f"{settled} of 1000 answers fetched for a client that reads none"


async def test_a_client_that_reads_late_still_gets_every_answer(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """Flow control, not loss: once the client reads, every pipelined answer arrives."""
    up = await raw_upstream(serving(lambda req: response(b"y" * 60_000)))
    daemon = await start_proxy(make_proxy, up)
    conn = await RawConnection.open(daemon.port())
    try:
        await conn.send(_http10("GET", "/big", b"") * 100)
        await asyncio.sleep(0.2)
        bodies = [len((await conn.response(timeout=10)).body) for _ in range(100)]
    finally:
        await conn.close()
    assert [60_000] * 100 == bodies
