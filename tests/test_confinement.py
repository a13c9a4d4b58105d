"""The token stays confined, behind buggy upstreams and hostile local clients.

No client can make an upstream reflect a token it did not send; an answer reaches only the
client whose request produced it; a redirect never points a client at another route's
upstream. Which upstream connection may carry which request is the rule of
proxy/rules/reuse.py (docs/reliability.md, "Upstream connection reuse"): a client's body may
stay unread in its connection, and the upstream would parse it as a request of its own, so a
connection a body went into never serves another client, and bytes on an idle connection
condemn it. Tests marked ``both_paths`` run on both request paths (handed-over requests --
HTTP/1.0, chunked, 100-continue -- included); the others name the path they are about: the
fast path's private connections, the aiohttp path's pool.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.config import (
    SHORT_TIMERS,
    MakeProxy,
    proxy_config,
    rotate_token,
    token_file_config,
)
from tests.helpers.fakes import TOKEN, assert_no_secret
from tests.helpers.rawhttp import RawConnection, RawResponse, get
from tests.helpers.rawupstream import (
    MakeRaw,
    Req,
    Script,
    UpConn,
    connected,
    echo_target,
    post,
    read_request,
    response,
    serving,
    start_proxy,
)
from tests.helpers.stdlib_upstream import StdlibUpstream

# A request left unfinished: an upstream that parses it swallows the next request head -- the
# token line tokenproxy added included -- as header lines, and /echo-headers reflects them.
SWALLOW = b"GET /echo-headers HTTP/1.1\r\nX-Swallow: "
# A whole request whose answer comes 50 ms late, after the connection went back to a pool.
LATE = b"GET /late HTTP/1.1\r\nHost: x\r\n\r\n"

FAST = pytest.mark.parametrize("serving_path", ["fast"], indirect=True)
AIOHTTP = pytest.mark.parametrize("serving_path", ["aiohttp"], indirect=True)


@pytest.fixture(name="stdlib")
def _stdlib() -> Iterator[StdlibUpstream]:
    with StdlibUpstream(late=0.05) as up:
        yield up


def _http10(method: str, path: str, body: bytes) -> bytes:
    head = get(path, "localhost", "Connection: keep-alive", f"Content-Length: {len(body)}",
               method=method, version="HTTP/1.0")
    return head + body


def _ignoring(refuse_first_token: Path | None = None) -> Any:
    """An upstream that never reads a request body (whatever the method) and keeps every
    connection alive, so body bytes are parsed as requests of its own; /echo-headers answers
    with the head it read. With *refuse_first_token*, a request bearing TOKEN is answered 401
    (its body unread) after the token file was rotated to TOKEN_2."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        while (req := await read_request(reader, conn, body=False)) is not None:
            if refuse_first_token is not None and req.get("Authorization") == f"Bearer {TOKEN}":
                rotate_token(refuse_first_token)
                writer.write(response(b"refused", "401 Unauthorized"))
            elif req.target == "/echo-headers":
                lines = "\r\n".join(f"{k}: {v}" for k, v in req.headers)
                writer.write(response(lines.encode("latin-1")))
            else:
                writer.write(response(b"ok"))
            await writer.drain()

    return script


async def _victims(port: int, n: int = 6) -> list[bytes]:
    async def one() -> bytes:
        async with connected(port) as conn:
            await conn.send(get("/status"))
            return (await conn.response()).raw

    return list(await asyncio.gather(*(one() for _ in range(n))))


def _with_body(method: str, body: bytes, version: str = "HTTP/1.1") -> bytes:
    extra = ["Connection: keep-alive"] if version == "HTTP/1.0" else []
    return get("/ignore", "localhost", f"Content-Length: {len(body)}", *extra, method=method,
               version=version) + body


async def _smuggle_then_victims(make_proxy: MakeProxy, raw_upstream: MakeRaw,
                                method: str) -> list[bytes]:
    """An attacker sends *method* with the start of a request (SWALLOW) as its body to an
    upstream that ignores bodies; then what the next clients (_victims) get."""
    up = await raw_upstream(_ignoring())
    daemon = await start_proxy(make_proxy, up)
    async with connected(daemon.port()) as attacker:
        await attacker.send(_with_body(method, SWALLOW))
        assert b"ok" == (await attacker.response()).body
        return await _victims(daemon.port())


# -- a body the upstream does not read ---------------------------------------------------------


@pytest.mark.both_paths
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


@pytest.mark.both_paths
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


@pytest.mark.both_paths
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


@pytest.mark.both_paths
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


@pytest.mark.both_paths
@pytest.mark.slow
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


@AIOHTTP
@pytest.mark.parametrize("method", ["GET", "DELETE", "PUT", "POST"])
async def test_aiohttp_path_never_reuses_a_connection_that_carried_a_body(
    make_proxy: MakeProxy, raw_upstream: MakeRaw, method: str
) -> None:
    """Closing an upstream connection that carried a client's body is not enough on the
    aiohttp path: aiohttp's ClientResponse gives the connection back to its pool when the
    body reaches EOF, before the handler could close it, and aiohttp's client does not act
    on a ``Connection: close`` *request* header. Against an upstream that does not close by
    itself (it ignores the body and the header), the next client's request would go onto
    the tainted connection: the smuggled prefix swallows its head, token line included, and
    the upstream reflects it. Such requests go through a client whose connector never pools
    (UpstreamSessions in proxy/aiohttp_path/client.py)."""
    answers = await _smuggle_then_victims(make_proxy, raw_upstream, method)
    leaked = [raw for raw in answers if TOKEN.encode() in raw]
    assert [] == leaked, f"{len(leaked)} of {len(answers)} other clients saw the token"


HANDED_OVER = {
    "http10-get-body": _with_body("GET", SWALLOW, "HTTP/1.0"),
    "chunked-get": get("/ignore", "localhost", "Transfer-Encoding: chunked")
    + b"%x\r\n%b\r\n0\r\n\r\n" % (len(SWALLOW), SWALLOW),
    "expect-100-put": get("/ignore", "localhost", f"Content-Length: {len(SWALLOW)}",
                          "Expect: 100-continue", method="PUT") + SWALLOW,
}


@FAST
@pytest.mark.parametrize("kind", list(HANDED_OVER))
async def test_a_handed_over_body_never_taints_aiohttps_pool(
    make_proxy: MakeProxy, raw_upstream: MakeRaw, kind: str
) -> None:
    """The same through requests the fast path hands over to aiohttp: an HTTP/1.0 GET with a
    body, a chunked GET, a PUT with Expect: 100-continue; then another client's request that
    aiohttp serves too (HTTP/1.0 here; chunked uploads and WebSocket handshakes share that
    pool as well)."""
    up = await raw_upstream(_ignoring())
    daemon = await start_proxy(make_proxy, up)
    async with connected(daemon.port()) as attacker:
        await attacker.send(HANDED_OVER[kind])
        resp = await attacker.response()
        if resp.status == 100:
            resp = await attacker.response()
        assert b"ok" == resp.body
        async with connected(daemon.port()) as victim:
            await victim.send(get("/status", "localhost", version="HTTP/1.0"))
            answer = await victim.response()
    assert TOKEN.encode() not in answer.raw, "another client saw the token"


@pytest.mark.slow
@FAST
@pytest.mark.parametrize("retry_on", [[401], []], ids=["buffered", "streamed"])
async def test_a_body_that_ends_early_reaches_no_other_client_on_the_fast_path(
    make_proxy: MakeProxy, raw_upstream: MakeRaw, retry_on: list[int]
) -> None:
    """A client declares 1000 bytes, sends the smuggling prefix and
    leaves: nothing of it is left on a connection another client gets."""
    up = await raw_upstream(_ignoring())
    daemon = await start_proxy(make_proxy, up, {"retry_on": retry_on})
    async with connected(daemon.port()) as attacker:
        await attacker.send(get("/ignore", "localhost", "Content-Length: 1000",
                                method="POST") + SWALLOW)
        await asyncio.sleep(0.1)
    answers = await _victims(daemon.port())
    for raw in answers:
        assert_no_secret(raw)


@FAST
@pytest.mark.parametrize("method", ["GET", "DELETE", "POST", "PUT", "PATCH", "PROPFIND",
                                    "SEARCH", "LOCK"])
async def test_a_body_on_any_method_reaches_no_other_client_on_the_fast_path(
    make_proxy: MakeProxy, raw_upstream: MakeRaw, method: str
) -> None:
    """Whatever the method (WebDAV ones included, which llhttp lets onto
    the fast path), a connection that carried a body never serves another client, even
    when the upstream ignores both the body and Connection: close."""
    answers = await _smuggle_then_victims(make_proxy, raw_upstream, method)
    for raw in answers:
        assert_no_secret(raw)


@FAST
async def test_a_body_refused_with_401_and_replayed_reaches_no_other_client(
    make_proxy: MakeProxy, raw_upstream: MakeRaw, tmp_path: Path
) -> None:
    """The upstream answers 401 without reading the body; the body is
    replayed with the new token on another connection: neither serves another client."""
    token = tmp_path / "token"
    up = await raw_upstream(_ignoring(refuse_first_token=token))
    daemon = await make_proxy(token_file_config(up.url(), token))
    async with connected(daemon.port()) as attacker:
        await attacker.send(_with_body("POST", SWALLOW))
        first = await attacker.response()
        answers = await _victims(daemon.port())
    assert (200, b"ok") == (first.status, first.body)
    for raw in answers:
        assert_no_secret(raw)


@pytest.mark.slow
@pytest.mark.both_paths
async def test_uploads_through_aiohttp_never_race_the_upstreams_close(
    make_proxy: MakeProxy,
) -> None:
    """Every request with a body on the aiohttp path -- all of them with
    TOKENPROXY_FAST_PATH=0, chunked uploads, Expect: 100-continue and HTTP/1.0 bodies on the
    default path -- goes out with Connection: close. A compliant upstream (here http.server)
    closes after answering; were the connection back in a pool at the answer's EOF, a
    concurrent request would be written onto a connection the upstream is closing and fail:
    502 upstream_unreachable for a few percent of uploads (2-9 of 180). The connector that
    never pools (test_aiohttp_path_never_reuses_a_connection_that_carried_a_body) keeps that
    from happening."""
    with StdlibUpstream() as up:
        daemon = await make_proxy(proxy_config(up.url(), TOKEN))
        statuses: list[int] = []

        async def client() -> None:
            async with connected(daemon.port()) as conn:
                for _ in range(40):
                    await conn.send(get("/echo", "localhost", "Transfer-Encoding: chunked",
                                        method="POST") + b"2\r\nhi\r\n0\r\n\r\n")
                    statuses.append((await conn.response()).status)

        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(8))), 8)
    assert [] == [s for s in statuses if s != 200], f"of {len(statuses)} uploads"


# -- a body smuggled through the framing -------------------------------------------------------


@pytest.mark.both_paths
@pytest.mark.slow
async def test_connection_listed_content_length_keeps_the_body_framed(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """``Connection: Content-Length`` lists the client's Content-Length as hop-by-hop, so the
    header rules drop it; the body still follows. Each path therefore writes the length it
    sends itself (proxy/fast_path/wire.py render_request; aiohttp frames the body): were the
    header dropped and the body sent after the head, the upstream would read the body as a
    second request that no check of the proxy ever saw."""
    up = await raw_upstream(serving(echo_target))
    daemon = await start_proxy(make_proxy, up)
    smuggled = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
    async with connected(daemon.port()) as conn:
        await conn.send(post("/upload", smuggled, "Connection: Content-Length"))
        resp = await conn.response()
        assert 200 == resp.status
        await asyncio.sleep(0.2)
    assert [("POST", "/upload", smuggled)] == [(r.method, r.target, r.body)
                                              for r in up.requests]


async def test_smuggled_request_captures_the_next_requests_token(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """What the above would allow: the smuggled request is a POST whose body swallows the next
    request sent on the pooled upstream connection -- another client's request, proxy token
    included -- and stores it where the attacker can read it back; the victim would get the
    trap's answer (response queue desync)."""
    stored: list[bytes] = []

    def answer(req: Req) -> bytes:
        if req.target == "/comments":
            stored.append(req.body)
        return response(req.target.encode())

    up = await raw_upstream(serving(answer))
    daemon = await start_proxy(make_proxy, up)
    trap = b"POST /comments HTTP/1.1\r\nHost: x\r\nContent-Length: 150\r\n\r\n"
    async with connected(daemon.port()) as attacker:
        await attacker.send(post("/harmless", trap, "Connection: content-length"))
        assert 200 == (await attacker.response()).status
    answered = b""
    async with connected(daemon.port()) as victim:
        await victim.send(post("/victim", b"v" * 200))
        with contextlib.suppress(EOFError, TimeoutError):
            answered = (await victim.response(timeout=1)).body
    leaked = [b for b in stored if TOKEN.encode() in b]
    assert [] == leaked, "another client's token was stored by the smuggled request"
    assert b"/victim" == answered
    assert ["/harmless", "/victim"] == [r.target for r in up.requests]


# -- answers nobody asked for ------------------------------------------------------------------


def stray_after(picked: Callable[[Req], bool], delay: float, stray: bytes) -> Script:
    """A raw upstream script: each request is answered with its target; after a request
    *picked* says, an answer nobody asked for (*stray*) follows *delay* seconds later."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        while (req := await read_request(reader, conn)) is not None:
            writer.write(response(req.target.encode()))
            await writer.drain()
            if picked(req):
                await asyncio.sleep(delay)
                writer.write(stray)

    return script


@pytest.mark.slow
@pytest.mark.both_paths
@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
async def test_an_answer_arriving_on_an_idle_connection_reaches_nobody(
    make_proxy: MakeProxy, raw_upstream: MakeRaw, version: str
) -> None:
    """An upstream that sends an extra answer 150 ms after a complete one: the connection is
    condemned, and every later client gets its own answer -- HTTP/1.0 keep-alive clients too,
    whom the fast path hands to aiohttp's path and its pool."""

    up = await raw_upstream(stray_after(lambda req: req.target == "/first", 0.15,
                                        response(b"POISON")))
    daemon = await start_proxy(make_proxy, up)
    bodies = []
    for path in ("/first", "/second", "/third", "/fourth"):
        async with connected(daemon.port()) as conn:
            await conn.send(_http10("GET", path, b"") if version == "HTTP/1.0" else get(path))
            bodies.append((await conn.response()).body)
        if path == "/first":
            await asyncio.sleep(0.3)   # the stray answer arrives while the connection idles
    assert [b"/first", b"/second", b"/third", b"/fourth"] == bodies


FORGED = response(b"FORGED", "200 OK", "Set-Cookie: session=attacker")


@pytest.mark.both_paths
async def test_a_body_sent_after_a_head_answer_reaches_no_client(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """Servers that answer HEAD like GET (http.server with ``do_HEAD = do_GET``, a common
    idiom) send the body anyway, often in a write of its own. Were the connection back in the
    pool once the HEAD answer's head is in, a body arriving after another client's request
    took the connection would be parsed as *that* client's answer; when the body is
    attacker-chosen (an endpoint that echoes the query, an uploaded file), the attacker
    forges another client's response (here with a Set-Cookie). "Bytes on an idle connection
    condemn it" does not cover bytes that arrive once the connection is busy again, so HEAD
    is sent with Connection: close and its connection never reused. Not only with this 50 ms
    lag: with the body written 2 ms after the head, 4 clients sending HEADs and 8 keep-alive
    clients sending GETs, about 70 of 400 GETs got the forged answer on each path when HEAD
    connections were pooled."""

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        while (req := await read_request(reader, conn, body=False)) is not None:
            body = FORGED if req.target == "/echo-forged" else req.target.encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            await writer.drain()
            if req.method == "HEAD":
                await asyncio.sleep(0.05)   # the body's own write, a moment later
            writer.write(body)              # ... sent on HEAD too
            await writer.drain()

    up = await raw_upstream(script)
    daemon = await start_proxy(make_proxy, up)
    async with connected(daemon.port()) as attacker:
        await attacker.send(get("/echo-forged", method="HEAD"))
        assert 200 == (await attacker.response(head_only=True)).status
        await asyncio.sleep(0.01)
        async with connected(daemon.port()) as victim:
            await victim.send(get("/mine"))
            answer = await victim.response()
    assert (b"/mine", None) == (answer.body, answer.get("Set-Cookie"))


# -- the fast path's private connections -------------------------------------------------------


@FAST
async def test_a_tainted_connection_is_dropped_at_handover_and_when_the_client_leaves(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """The upstream connection kept for one client is closed when that client's
    next request is handed over to aiohttp (HTTP/1.0), and one kept by a client that
    leaves is closed too: the upstream sees both end."""
    up = await raw_upstream(_ignoring())
    daemon = await start_proxy(make_proxy, up)
    async with connected(daemon.port()) as attacker:
        await attacker.send(_with_body("PUT", SWALLOW)
                            + get("/ignore", "localhost", "Connection: keep-alive",
                                  version="HTTP/1.0"))
        await attacker.response()
        await attacker.response()
        await asyncio.wait_for(up.conns[0].ended.wait(), 2)
    async with connected(daemon.port()) as leaver:
        await leaver.send(_with_body("PATCH", SWALLOW))
        await leaver.response()
        kept = up.conns[-1]
    await asyncio.wait_for(kept.ended.wait(), 2)


@FAST
@pytest.mark.parametrize("ending", ["fin", "rst", pytest.param("keepalive-timeout",
                                                                marks=pytest.mark.slow),
                                    "handover"])
async def test_every_private_connection_is_closed_when_its_client_goes(
    make_proxy: MakeProxy, raw_upstream: MakeRaw, ending: str
) -> None:
    """Ten clients each leave a tainted upstream connection behind and go,
    however they go: every one of those upstream connections is closed."""
    up = await raw_upstream(_ignoring())
    daemon = await start_proxy(make_proxy, up, limits=SHORT_TIMERS)
    conns = []
    for _ in range(10):
        conn = await RawConnection.open(daemon.port())
        await conn.send(_with_body("POST", b"x" * 10))
        assert 200 == (await conn.response()).status
        conns.append(conn)
    tainted = [c for c in up.conns if any(r.method == "POST" for r in c.requests)]
    assert 10 == len(tainted)
    for conn in conns:
        if ending == "rst":
            conn.writer.transport.abort()
        elif ending == "fin":
            await conn.close()
        elif ending == "handover":
            await conn.send(get("/x", "localhost", version="HTTP/1.0"))
            await conn.response()
    await asyncio.wait_for(asyncio.gather(*(c.ended.wait() for c in tainted)), 3)
    for conn in conns:
        await conn.close()


@pytest.mark.slow
@FAST
async def test_a_condemned_private_connection_is_not_used_again(
    make_proxy: MakeProxy, raw_upstream: MakeRaw
) -> None:
    """A stray answer arriving on the idle private connection condemns it;
    the client's next request gets its own answer on a new connection."""

    up = await raw_upstream(stray_after(lambda req: req.method == "POST", 0.1,
                                        response(b"STRAY")))
    daemon = await start_proxy(make_proxy, up)
    async with connected(daemon.port()) as conn:
        await conn.send(_with_body("POST", b"abc"))
        assert b"/ignore" == (await conn.response()).body
        await asyncio.sleep(0.3)
        await conn.send(get("/next"))
        assert b"/next" == (await conn.response()).body
    assert 2 == len(up.conns)


# -- redirects ---------------------------------------------------------------------------------


@pytest.mark.both_paths
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


@pytest.mark.both_paths
@pytest.mark.parametrize("form", ["absolute-own-origin", "absolute-path"])
async def test_a_location_on_the_own_upstream_never_lands_in_another_route(
    make_proxy: MakeProxy, raw_upstream: MakeRaw, form: str
) -> None:
    """The same with a Location on A's own server: upstream A (route "/") answering
    ``Location: http://A/internal/delete-all`` or ``Location: /internal/delete-all`` must not
    reach the client as the proxy path /internal/delete-all, which the route table sends to
    route "/internal", upstream B, with B's token. Checking the origin is not enough: the
    rewritten path is matched again (RouteTable.rewrite_location, proxy/rules/target.py),
    and if another route takes it the Location stays absolute to A (or passes unchanged
    when absolute)."""
    b = await raw_upstream(serving())
    a_port: list[int] = []

    def redirect(req: Any) -> bytes:
        where = (f"http://127.0.0.1:{a_port[0]}/internal/delete-all"
                 if form == "absolute-own-origin" else "/internal/delete-all")
        return response(b"", "307 Temporary Redirect", f"Location: {where}")

    a = await raw_upstream(serving(redirect))
    a_port.append(a.port)
    routes = [{"prefix": "/", "upstream": a.url(), "provider": "api"},
              {"prefix": "/internal", "upstream": b.url(), "provider": "api"}]
    daemon = await make_proxy(proxy_config(a.url(), TOKEN, routes=routes))
    async with connected(daemon.port()) as conn:
        await conn.send(get("/go"))
        location = (await conn.response()).get("Location") or ""
        if location.startswith("/"):   # a client follows it, on the proxy
            await conn.send(get(location))
            await conn.response()
    assert [] == b.targets, f"Location {location!r} led the client into route /internal"
