"""The two request paths agree: the fast path (proxy/fast_path) against the aiohttp path
(proxy/aiohttp_path), on the same raw requests.

One fast-path daemon and one aiohttp-path daemon with the same routes run in front of ONE raw
recording upstream on 127.0.0.1 that keeps every request as it arrived (request line, header
lines, body). Hypothesis generates raw HTTP/1.x requests -- odd methods, %-encoded, dotted,
long and query-carrying targets, duplicated and case-varied headers, Connection lists naming
Content-Length, Host, the auth header and others, Proxy-*, Tokenproxy-Key, Expect, Upgrade,
chunked and Content-Length bodies (small, past max_replay_body, past the fast path's hold
limit), Host variants, HTTP/1.0, leading CRLFs, pipelined pairs, bytes cut into pieces -- and
sends the same bytes to both daemons over raw sockets. They must agree on what the client
sees (every answer's status; for an upstream's answer its header fields, less framing and Date,
and its body -- the default upstream answer carries Set-Cookie twice, Connection-listed,
Keep-Alive and Proxy-* fields and a Location to rewrite; for tokenproxy's own answers the cause
and detail; whether the connection ended) and on what the upstream received (request line,
header multiset, body bytes), up to the differences documented in canonical() and
swallowed(); and the token may appear in the route's auth header only.

The daemons differ only in their token and in a tag that starts their upstream paths
(/fast/..., /aiohttp/...), which is how the upstream tells their requests apart: both
exchanges of an example run at once. The examples are derandomized, so CI runs the same ones
every time. test_minimal_differences keeps, shrunk by hand, each difference this test found
that no rule of the proxy explains.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from tests.helpers.config import proxy_config
from tests.helpers.fakes import CLIENT_KEY, SECRETS, TOKEN, TOKEN_2, FakeClock, assert_no_secret
from tests.helpers.rawhttp import BufferingClient, RawResponse, read_response
from tests.helpers.rawupstream import MakeRaw, UpConn
from tokenproxy import log
from tokenproxy.config import build_config
from tokenproxy.daemon import Daemon
from tokenproxy.proxy.rules.reuse import last_request

# A deadline for every connect and read (all of an example's answers, both daemons at once):
# an answer that does not end by then fails the test.
TIMEOUT = 2.0
# Each daemon has its own token, and its own tag as the first segment of its upstream paths.
TOKENS = {"fast": TOKEN, "aiohttp": TOKEN_2}
# The auth header and value of each route (see _pair): the default one, and one that keeps a
# client's own auth header and the client's Host.
ROUTE_AUTH = {"default": ("Authorization", "Bearer {token}"),
              "keep": ("X-Api-Key", "Token {token}")}
PROBE = "/__probe"   # the request sent last to see whether the connection is still open
T_ = TypeVar("T_")

DIFF = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])


# -- the recording upstream -------------------------------------------------------------------


@dataclass
class Seen:
    """One request as the upstream read it off the wire."""

    conn: int
    line: str                          # the request line, as received
    headers: list[tuple[str, str]]     # (name as received, value without surrounding OWS)
    raw: bytes                         # the head and the body bytes, framing included
    body: bytes                        # the payload, de-chunked
    framing: str                       # "length", "chunked" or "none"

    def get(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


@dataclass
class RecordingUpstream:
    """The script of the raw upstream (tests/helpers/rawupstream.py): reads requests strictly
    (Content-Length or chunked bodies), keeps each as it arrived, answers as X-Answer asks;
    bytes it cannot parse -- ambiguous framing, a malformed field line -- go to ``broken``."""

    seen: list[Seen] = field(default_factory=list)
    broken: list[tuple[int, bytes]] = field(default_factory=list)   # unparsable bytes
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    async def script(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     up_conn: UpConn) -> None:
        conn = next(self._ids)
        with contextlib.suppress(asyncio.LimitOverrunError):
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError as exc:
                    if exc.partial:
                        self.broken.append((conn, exc.partial))
                    return
                seen = await self._read(conn, head, reader)
                if seen is None:
                    return
                self.seen.append(seen)
                answer, close = respond(seen)
                writer.write(answer)
                await writer.drain()
                if close:
                    return

    async def _read(self, conn: int, head: bytes,
                    reader: asyncio.StreamReader) -> Seen | None:
        lines = head[:-4].decode("latin-1").split("\r\n")
        headers: list[tuple[str, str]] = []
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or name != name.strip():
                self.broken.append((conn, head))
                return None
            headers.append((name, value.strip(" \t")))
        seen = Seen(conn, lines[0], headers, head, b"", "none")
        te = [v.lower() for v in seen.get("Transfer-Encoding")]
        lengths = seen.get("Content-Length")
        if (te and lengths) or len(lengths) > 1 or (te and te != ["chunked"]):
            self.broken.append((conn, head))   # ambiguous framing: a smuggling shape
            return None
        if te:
            seen.framing = "chunked"
            raw = bytearray()
            while True:
                size_line = await reader.readuntil(b"\r\n")
                raw += size_line
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                        raw += trailer
                    raw += b"\r\n"
                    break
                data = await reader.readexactly(size + 2)
                raw += data
                seen.body += data[:-2]
            seen.raw += bytes(raw)
        elif lengths:
            seen.framing = "length"
            seen.body = await reader.readexactly(int(lengths[0]))
            seen.raw += seen.body
        return seen


def respond(seen: Seen) -> tuple[bytes, bool]:
    """The scripted answer (X-Answer, when it got through) and whether to close after it."""
    head_request = seen.line.startswith("HEAD ")
    kind = (seen.get("X-Answer") or ["200"])[0]
    body = b"" if head_request else b"ok"
    if kind == "204":
        return b"HTTP/1.1 204 No Content\r\n\r\n", False
    if kind == "304":
        return b"HTTP/1.1 304 Not Modified\r\nETag: \"e\"\r\n\r\n", False
    if kind == "401":
        return b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 2\r\n\r\n" + body, False
    if kind == "chunked":
        chunks = b"" if head_request else b"2\r\nok\r\n0\r\n\r\n"
        return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks, False
    if kind == "close":
        return b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n" + body, True
    if kind == "eof":   # a body delimited by the upstream's close
        return b"HTTP/1.1 200 OK\r\nX-Framing: eof\r\n\r\n" + body, True
    # The default answer exercises the response rules: repeated Set-Cookie kept, hop-by-hop
    # and Connection-listed fields and Proxy-* dropped, a Location inside the route's own
    # upstream (under this daemon's tag) rewritten to the proxy path.
    tag, _, rest = seen.line.split(" ")[1].partition("?")[0].lstrip("/").partition("/")
    base = "/" + tag + next((b for b in ("/v1", "/keep") if ("/" + rest).startswith(b)), "")
    return (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-Up: 1\r\nSet-Cookie: a=1\r\n"
            b"Set-Cookie: b=2\r\nConnection: x-hop\r\nX-Hop: gone\r\nKeep-Alive: timeout=5\r\n"
            b"Proxy-Foo: p\r\nLocation: " + base.encode() + b"/moved?q=1\r\n\r\n" + body,
            False)


# -- what the client saw ----------------------------------------------------------------------


# Response fields each path frames or stamps on its own: not compared.
_OWN_FIELDS = frozenset({"date", "content-length", "transfer-encoding", "connection",
                         "keep-alive"})


def answer(resp: RawResponse) -> tuple[object, ...]:
    """Status; for an upstream's answer its header multiset (less framing and Date) and body;
    for tokenproxy's own problem answers the cause and the detail."""
    cause = resp.get("Tokenproxy-Error")
    if cause is None:
        fields = sorted((k.lower(), v) for k, v in resp.headers if k.lower() not in _OWN_FIELDS)
        return resp.status, tuple(fields), resp.body
    try:
        detail = json.loads(resp.body).get("detail")
    except ValueError:
        detail = resp.body
    return resp.status, cause, detail


@dataclass
class ClientView:
    """What the client saw: per request, its answers (interim ones too), then the close."""

    answers: list[tuple[object, ...]]
    closed: bool
    received: bytes


async def run_on(port: int, batch: list[Request], cuts: list[int]) -> ClientView:
    """Send the batch in one write, or in pieces cut at *cuts* per mille of its length."""
    loop = asyncio.get_running_loop()
    transport, client = await asyncio.wait_for(
        loop.create_connection(BufferingClient, "127.0.0.1", port), TIMEOUT)
    try:
        data = b"".join(r.raw for r in batch)
        start = 0
        for cut in sorted(len(data) * c // 1000 for c in cuts):
            transport.write(data[start:cut])
            start = cut
            await asyncio.sleep(0.002)   # a read of its own on the other side, most likely
        transport.write(data[start:])
        deadline = loop.time() + TIMEOUT
        answers: list[tuple[object, ...]] = []
        for req in batch:
            got: list[object] = []
            try:
                while True:
                    resp = await read_response(client, req.method == "HEAD", deadline)
                    if resp is None:
                        got.append("closed")
                        break
                    got.append(answer(resp))
                    if resp.status >= 200 or resp.status == 101:
                        break
            except TimeoutError:
                got.append("timeout")
            answers.append(tuple(got))
            if got[-1] in ("closed", "timeout"):
                break
        # Still open? A request sent now is answered, or the connection is found closed.
        closed = client.closed
        if not closed and answers[-1][-1] != "timeout":
            probe = (f"GET {PROBE} HTTP/1.1\r\nHost: localhost\r\n"
                     f"Tokenproxy-Key: {CLIENT_KEY}\r\n\r\n").encode()
            transport.write(probe)
            try:
                closed = await read_response(client, False, loop.time() + TIMEOUT) is None
            except TimeoutError:
                answers.append(("probe timeout",))
        return ClientView(answers, closed, bytes(client.received))
    finally:
        transport.abort()


# -- generated requests -----------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    method: str
    raw: bytes

    def __repr__(self) -> str:
        return f"Request({self.method!r}, {self.raw!r})"


def often(common: st.SearchStrategy[T_], rare: st.SearchStrategy[T_],
          odds: int = 5) -> st.SearchStrategy[T_]:
    """*common* about odds/(odds+1) of the time, else *rare*; shrinks towards *common*."""
    return chance(odds).flatmap(lambda hit: rare if hit else common)


def chance(odds: int) -> st.SearchStrategy[bool]:
    """True about once in odds+1 draws; shrinks to False."""
    return st.sampled_from([False] * odds + [True])


METHODS = often(
    st.sampled_from(["GET", "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]),
    st.sampled_from(["PROPFIND", "MKCOL", "REPORT", "PURGE", "M-SEARCH", "LINK", "QUERY",
                     "SEARCH", "FOO", "get", "CONNECT", "TRACE"]),
)
SEGMENT_PARTS = often(
    st.sampled_from(["a", "b", "Z", "0", "x.y", ".x", "x.", "-", "_", "~", "%41", "%7E",
                     "%20", "%2F", "%2f", "%25", "%C3%A9", ";a=b", "!", "$", "&", "'", "(",
                     ")", "*", "+", ",", "=", ":", "@", ";", "%zz", "%"]),
    st.sampled_from([".", "..", "%2e", "%2e%2e", "%00", "\u00e9", "%e9", "\\", "//"]),
    odds=25,
)
SEGMENTS = st.lists(SEGMENT_PARTS, min_size=1, max_size=3).map("".join)
QUERIES = often(
    st.sampled_from(["a=1", "a=%20&b", "a=/x?y", "q=%zz", "a=1&a=2", "", "?", ";", "a=%00"]),
    st.sampled_from(["x=\u00e9", "a#frag"]),
)


@st.composite
def targets(draw: st.DrawFn) -> str:
    route = draw(st.sampled_from([[], [], ["api"], ["keep"]]))
    segments = [*route, *draw(st.lists(SEGMENTS, max_size=4))]
    if draw(chance(12)):
        segments.append("L" * draw(st.sampled_from([100, 2000, 9000, 17000])))
    path = "".join("/" + s for s in segments)
    if not path or draw(st.booleans()):
        path += "/"
    if draw(chance(2)):
        path += "?" + draw(QUERIES)
    return path


CONNECTION_NAMES = st.sampled_from([
    "close", "keep-alive", "Keep-Alive", "content-length", "Content-Length", "host",
    "authorization", "Authorization", "x-foo", "X-Foo", "x-answer", "tokenproxy-key", "te",
    "upgrade", "proxy-foo", "content-type", "transfer-encoding", "expect", "cookie",
    "x-api-key",
])
HOSTS = often(
    st.sampled_from(["localhost", "127.0.0.1", "LOCALHOST", "localhost:8080", "[::1]",
                     "[::1]:80", "127.0.0.1:1", " localhost "]),
    st.sampled_from(["evil.example", "", "localhost.", "[::1].evil", "localhost:x"]),
)
BENIGN = st.sampled_from([
    ("X-Foo", "1"), ("x-foo", "2"), ("X-FOO", "3"), ("X-Foo", ""), ("X-Bar", "a  b"),
    ("Accept", "*/*"), ("User-Agent", "diff/1"), ("Content-Type", "application/json"),
    ("Cookie", "a=b"), ("Cookie", "c=d"), ("Keep-Alive", "timeout=5"), ("TE", "trailers"),
    ("Trailer", "X-T"), ("Proxy-Authorization", "Basic eHg="), ("Proxy-Foo", "1"),
    ("Proxy-Connection", "keep-alive"), ("Authorization", "Bearer client-own"),
    ("authorization", "Basic eHg6eQ=="), ("X-Api-Key", "client-own"), ("x-api-key", "k2"),
    ("Sec-Fetch-Site", "none"), ("X-Utf8", "caf\u00e9"),
    ("X-Latin", "caf\udce9"),   # a lone 0xE9 byte (obs-text): see requests()
    ("ETag", '"e"'), ("Max-Forwards", "3"),
    ("X-Answer", "204"), ("X-Answer", "304"), ("X-Answer", "401"), ("X-Answer", "chunked"),
    ("X-Answer", "close"), ("X-Answer", "eof"), ("Date", "x"), ("Server", "client"),
    ("HTTP2-Settings", "AAMAAABkAAQCAAAAAAIAAAAA"), ("Expect", "100-continue"),
    ("Upgrade", "h2c"), ("Upgrade", "foo"), ("X-Tokenproxy", "1"), ("Tokenproxy-Foo", "1"),
])
HOSTILE = st.sampled_from([
    ("Tokenproxy-Key", "wrong-key-0123456789"), ("Expect", "nonsense"),
    ("Upgrade", "websocket"), ("Sec-Fetch-Site", "cross-site"), ("Origin", "http://e.x"),
    ("Via", "1.1 other"), ("X-Forwarded-For", "10.0.0.1"), ("Forwarded", "for=1.2.3.4"),
    ("Content-Length", "0"), ("Transfer-Encoding", "identity"), ("X-Bar", "  padded  "),
    ("Bad Name", "1"), ("X-Ctl", "a\x01b"),
])
EXTRA_HEADERS = often(BENIGN, HOSTILE, odds=8)


@st.composite
def connection_header(draw: st.DrawFn) -> tuple[str, str]:
    names = draw(st.lists(CONNECTION_NAMES, min_size=1, max_size=4))
    name = draw(st.sampled_from(["Connection", "connection", "CONNECTION"]))
    return name, draw(st.sampled_from([", ", ",", " , "])).join(names)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[list[tuple[str, str]], bytes]:
    """(framing header lines, body bytes as sent)."""
    kind = draw(often(st.sampled_from(["none", "none", "length", "length", "chunked"]),
                      st.sampled_from(["zero", "padded", "both", "gzip"])))
    payload = draw(often(
        st.one_of(st.binary(min_size=1, max_size=40),
                  st.sampled_from([b"{}", b"GET / HTTP/1.1\r\n\r\n", b"x" * 3000])),
        # Past max_replay_body (streamed, not replayed), and past the fast path's HOLD_LIMIT.
        st.sampled_from([b"y" * 20_000, b"z" * 300_000])))
    if kind == "none":
        return [], b""
    if kind == "zero":
        return [("Content-Length", "0")], b""
    if kind == "length":
        return [(draw(st.sampled_from(["Content-Length", "content-length"])),
                 str(len(payload)))], payload
    if kind == "padded":
        return [("Content-Length", "00" + str(len(payload)))], payload
    cut = draw(st.integers(0, len(payload)))
    parts = [p for p in (payload[:cut], payload[cut:]) if p]
    chunked = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"
    te = {"gzip": "gzip, chunked"}.get(kind, draw(st.sampled_from(["chunked", "Chunked"])))
    lines = [("Transfer-Encoding", te)]
    if kind == "both":
        lines.append(("Content-Length", str(len(payload))))
    return lines, chunked


@st.composite
def requests(draw: st.DrawFn) -> Request:
    method = draw(METHODS)
    version = draw(often(st.just("HTTP/1.1"), st.just("HTTP/1.0"), odds=4))
    headers: list[tuple[str, str]] = []
    host_count = draw(often(st.just(1), st.sampled_from([0, 2]), odds=10))
    headers += [(draw(st.sampled_from(["Host", "Host", "host", "HOST"])), draw(HOSTS))
                for _ in range(host_count)]
    if not draw(chance(12)):
        headers.append(("Tokenproxy-Key", CLIENT_KEY))
    headers += draw(st.lists(EXTRA_HEADERS, max_size=4))
    if draw(st.booleans()):
        headers.append(draw(connection_header()))
    framing, body = draw(bodies())
    headers += framing
    headers = draw(st.permutations(headers))
    lines = [f"{method} {draw(targets())} {version}", *(f"{k}: {v}" for k, v in headers)]
    # surrogateescape: "\udce9" in a generated string is the single byte 0xE9 on the wire.
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
    crlf = b"\r\n" if draw(chance(15)) else b""   # RFC 9112 section 2.2: may be ignored
    return Request(method, crlf + head + body)


BATCHES = st.lists(requests(), min_size=1, max_size=2)
# Mostly one write; else the bytes in two or three pieces (partial heads and bodies).
CUTS = often(st.just([]), st.lists(st.integers(1, 999), min_size=1, max_size=2), odds=3)


# -- the daemons ------------------------------------------------------------------------------


class Pair:
    """The upstream and the two daemons (not a dataclass: Hypothesis would print it all)."""

    def __init__(self, upstream: RecordingUpstream, daemons: dict[str, Daemon]) -> None:
        self.upstream = upstream
        self.daemons = daemons

    def __repr__(self) -> str:
        return "Pair(fast, aiohttp)"


@pytest.fixture(name="pair")
async def _pair(raw_upstream: MakeRaw) -> AsyncIterator[Pair]:
    upstream = RecordingUpstream()
    base = (await raw_upstream(upstream.script, limit=1 << 20)).url("")
    daemons: dict[str, Daemon] = {}
    try:
        for name, token in TOKENS.items():
            up = f"{base}/{name}"
            auth, value = ROUTE_AUTH["keep"]
            raw = proxy_config(up + "/", token, security={"client_key": CLIENT_KEY},
                               limits={"max_replay_body": "16KiB"}, routes=[
                {"prefix": "/api", "upstream": up + "/v1/", "provider": "api"},
                {"prefix": "/keep", "upstream": up + "/keep", "provider": "api",
                 "client_authorization": "keep", "header": auth, "value": value,
                 "preserve_host": True},
                {"prefix": "/", "upstream": up + "/", "provider": "api"},
            ])
            daemon = Daemon(build_config(raw, {}), registry=CollectorRegistry(),
                            clock=FakeClock(), redactor=log.Redactor(),
                            fast_path=name == "fast")
            await daemon.start()
            daemons[name] = daemon
        yield Pair(upstream, daemons)
    finally:
        for daemon in daemons.values():
            await daemon.stop(grace=0)


# -- what must be equal -----------------------------------------------------------------------


def split_seen(seen: Seen) -> tuple[str, str, str]:
    """(daemon, route, target below the daemon's tag) of a request the upstream read."""
    target = seen.line.split(" ")[1]
    _, daemon, rest = target.split("/", 2)
    rest = "/" + rest
    keep = rest == "/keep" or rest.startswith(("/keep/", "/keep?"))
    return daemon, "keep" if keep else "default", rest


def canonical(seen: Seen) -> tuple[object, ...]:
    """The request up to the differences the two paths may legitimately have."""
    method, _, version = seen.line.split(" ", 2)
    daemon, route, target = split_seen(seen)
    # yarl (the aiohttp path's upstream URL) drops an empty query: "/x?" is sent as "/x".
    # RFC 3986 section 6.2.3 lets a normalizer do that, and the fast path sends the target raw.
    target = target.removesuffix("?")
    auth, fmt = ROUTE_AUTH[route]
    headers = []
    for name, value in seen.headers:
        low = name.lower()
        if low in ("content-length", "transfer-encoding"):
            # Framing is each path's own: the fast path writes the length it sends, aiohttp's
            # client forwards the client's Content-Length (also "002", or a "0" on a GET) or
            # adds "Content-Length: 0" to a POST without a body. The payload is compared.
            continue
        if (low == "connection" and value == "close" and seen.body
                and not last_request(method, True)):
            # Reuse after a body differs by design (proxy/rules/reuse.py): aiohttp's pool
            # cannot keep a connection for one client, so that path (and what the fast path
            # hands it) closes after every body; the fast path keeps it for the same client.
            # After a body on GET, HEAD, DELETE or OPTIONS both must close: that is compared.
            continue
        if low == auth.lower() and value == fmt.format(token=TOKENS[daemon]):
            value = "<token>"   # each daemon has its own
        # aiohttp's client cannot write a header byte that is not UTF-8 (its C writer skips
        # the surrogate-escaped ones), so the aiohttp path drops such a field whole; the fast
        # path forwards obs-text as received (RFC 9110 section 5.5). Such fields are not
        # compared (test_minimal_differences checks that nothing else differs).
        try:
            value.encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            continue
        # Header order and name case are free (RFC 9110 section 5.3, 5.1). Values are
        # compared as RFC 9112 section 5 parses them, without the surrounding whitespace:
        # llhttp leaves the trailing OWS on a value and the fast path forwards it, aiohttp
        # strips it (see Seen.headers).
        headers.append((low, value))
    return method, route, target, version, sorted(headers), seen.body


def check_token_placement(seen: Seen) -> None:
    """The daemon's token is in the route's auth header and nowhere else; no other secret.

    A ``keep`` route sends no token when the client's own auth header goes through.
    """
    daemon, route, _ = split_seen(seen)
    token = TOKENS[daemon]
    auth, fmt = ROUTE_AUTH[route]
    lines = [(k.lower(), v) for k, v in seen.headers if token in v]
    if route == "keep" and not lines:
        assert seen.get(auth), f"no token and no client {auth}: {seen}"
    else:
        assert [(auth.lower(), fmt.format(token=token))] == lines, seen
    head, _, _ = seen.raw.partition(b"\r\n\r\n")
    assert len(lines) == head.count(token.encode()), seen
    assert token.encode() not in seen.body, seen
    assert [] == [s for s in SECRETS if s != token and s.encode() in seen.raw], seen


# The answers of GuardedRequestHandler.handle_error (proxy/aiohttp_path/protocol.py) to what
# aiohttp's parser refuses.
PARSE_ERRORS = frozenset({
    (400, "bad_request", "the request is malformed"),
    (431, "header_too_large", "a request header line is too long"),
    (431, "header_too_large", "the request has too many headers"),
})


def swallowed(view: ClientView, batch: list[Request], forwarded: list[Seen]) -> bool:
    """Whether *view* is one parse-error answer for a whole pipelined pair.

    aiohttp's protocol parses all the requests of one read before it answers any; when a
    later one is malformed (to aiohttp's llhttp, data after a "Connection: close" request is
    malformed too), web_protocol.RequestHandler.data_received replaces them all with a single
    error answer and closes, so a good request before the bad one is never answered. Which
    requests share a read is up to TCP: the aiohttp path answers such a pair with 200 + 400
    or with one 400. The fast path parses one head at a time and answers 200 + 400 (or 200
    and a close, RFC 9112 section 9.6); after a handover it can show the single 400 as well.
    """
    return (len(view.answers) == 2 and view.answers[1] == ("closed",) and view.closed
            and not forwarded and len(view.answers[0]) == 1
            and parse_error(view.answers[0][0], batch[0]))


def parse_error(answer: object, request: Request) -> bool:
    """Whether *answer* is aiohttp's answer to a request its parser refused."""
    if request.method == "HEAD" and isinstance(answer, tuple):
        # The answer to a HEAD has no body, so no detail: take any of the causes.
        return any(answer == (*e[:2], b"") for e in PARSE_ERRORS)
    return answer in PARSE_ERRORS


async def differential(pair: Pair, batch: list[Request], cuts: list[int]) -> None:
    up = pair.upstream
    mark = len(up.seen)
    broken = len(up.broken)
    views = await asyncio.gather(*(run_on(d.port(), batch, cuts)
                                   for d in pair.daemons.values()))
    view = dict(zip(pair.daemons, views, strict=True))
    for v in views:
        assert_no_secret(v.received)
    assert [] == up.broken[broken:], "the upstream got bytes it could not parse"
    by_daemon: dict[str, list[Seen]] = {name: [] for name in pair.daemons}
    for seen in up.seen[mark:]:
        check_token_placement(seen)
        name, _, target = split_seen(seen)
        if target != PROBE:
            by_daemon[name].append(seen)
    fast, aio = view["fast"], view["aiohttp"]
    if len(batch) == 2 and fast.answers != aio.answers and any(
            swallowed(view[name], batch, by_daemon[name]) for name in view):
        # See swallowed(): the second request is refused as malformed or never read, and the
        # first one, sent alone, must be treated the same by both paths.
        for name, v in view.items():
            assert v.closed, view
            if not swallowed(v, batch, by_daemon[name]):
                last = v.answers[1][-1] if len(v.answers) > 1 else None
                assert last == "closed" or parse_error(last, batch[1]), view
        await differential(pair, batch[:1], [])
        return
    assert (fast.answers, fast.closed) == (aio.answers, aio.closed), (
        f"the client saw different answers\nfast:    {fast.received!r}\n"
        f"aiohttp: {aio.received!r}")
    assert ([canonical(s) for s in by_daemon["fast"]]
            == [canonical(s) for s in by_daemon["aiohttp"]]), (
        "the upstream saw different requests\n"
        + "\n".join(f"{name}: {[s.raw[:2000] for s in seen]!r}"
                    for name, seen in by_daemon.items()))
    # The same on both paths, but no answer at all: a hang is a failure too.
    assert not any("timeout" in a for a in fast.answers), (
        f"an answer did not end within {TIMEOUT} s: {fast.received!r}")


@pytest.mark.slow   # 300 examples through two daemons
@DIFF
@given(batch=BATCHES, cuts=CUTS)
async def test_fast_path_forwards_what_the_aiohttp_path_forwards(
    pair: Pair, batch: list[Request], cuts: list[int]
) -> None:
    """Same bytes in, same answers out, same request upstream (see canonical())."""
    await differential(pair, batch, cuts)


# -- what the test found ----------------------------------------------------------------------


def request(line: str, *headers: str) -> Request:
    """A request with an allowed Host and the client key, then *headers*."""
    head = "\r\n".join([line, "Host: localhost", f"Tokenproxy-Key: {CLIENT_KEY}", *headers])
    return Request(line.split(" ")[0], head.encode("utf-8", "surrogateescape") + b"\r\n\r\n")


# The smallest request for each difference the test above found, kept so none returns.
# Each was a failure until the fix named with it.
MINIMAL_DIFFERENCES = [
    # aiohttp's parser refuses a repeated singleton field (Content-Type, User-Agent, Server,
    # ETag, Max-Forwards, Content-Location, Content-Range; its SINGLETON_HEADERS) with 400;
    # the fast path forwarded both lines. Fix: the fast path hands such a request to aiohttp
    # (classify and _SINGLETONS, proxy/fast_path/head.py).
    pytest.param([request("GET / HTTP/1.1", "User-Agent: a", "User-Agent: b")],
                 id="repeated-singleton-header"),
    # A field repeated with a different name case: the aiohttp path forwarded only "x-foo: b"
    # (aiohttp's ClientSession._prepare_headers tracks added names in a case-sensitive set, so
    # "x-foo" replaced "X-Foo"). Fix: the aiohttp path forwards aiohttp's raw_headers through
    # the byte-pair rules (request_headers, proxy/rules/headers.py), each field as it came.
    pytest.param([request("GET / HTTP/1.1", "X-Foo: a", "x-foo: b")],
                 id="repeated-header-name-case"),
    # obs-text in a field value (RFC 9110 section 5.5), a lone 0xE9 byte: the fast path
    # forwards it, aiohttp's client cannot (its C header writer skips the surrogate-escaped
    # byte), so the aiohttp path drops the field. canonical() leaves such fields out, and
    # this case checks that nothing else differs.
    pytest.param([request("GET / HTTP/1.1", "X-Latin: caf\udce9")],
                 id="obs-text-header-value"),
    # A preserve_host route with "Connection: host": the aiohttp path dropped the client's
    # Host (Connection-listed) and aiohttp's client sent the upstream's. Fix: both paths look
    # at Host before the Connection-listed names.
    pytest.param([request("GET /keep HTTP/1.1", "Connection: host")],
                 id="preserve-host-connection-host"),
    # Not a difference, a hang on both paths (HTTP/1.0 is always aiohttp's): an HTTP/1.0
    # keep-alive request whose upstream answer has no Content-Length got "HTTP/1.0 200" with
    # no length and the connection stayed open, so the body never ended (aiohttp's
    # StreamResponse decides keep-alive off for an unframed HTTP/1.0 body only after it
    # stored it). Fix: RelayedResponse (proxy/aiohttp_path/handler.py) closes such a
    # connection before the head is rendered.
    pytest.param([request("GET / HTTP/1.0", "Connection: keep-alive", "X-Answer: eof")],
                 id="http10-keep-alive-unframed-answer-hangs"),
]


@pytest.mark.parametrize("batch", MINIMAL_DIFFERENCES)
async def test_minimal_differences(pair: Pair, batch: list[Request]) -> None:
    await differential(pair, batch, [])
