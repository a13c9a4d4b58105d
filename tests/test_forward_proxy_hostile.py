"""The forward-proxy listener beyond its first use (docs/forward-proxy.md): a route's behaviour
inside an intercepted TLS connection (a 401 refreshed and retried with its body, streaming both
ways, a WebSocket), Node's https through it, and hostile clients on the listener -- targets not
listed, on other ports, as IP literals or names that resolve to loopback; malformed CONNECT
lines; TLS handshakes that never finish, that name another host, or that are not TLS at all; the
client key; what the requests inside may not say -- and the CA key and the token kept out of the
logs and the answers.

Everything listens on 127.0.0.1; every wait is bounded. The upstreams are real TLS servers
reached as ``localhost``, their certificates signed by a CA of the test's own
(tests/helpers/tls.py); clients trust tokenproxy's generated CA.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import json
import os
import shutil
import socket
import ssl
import stat
import struct
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests
from aiohttp import WSMsgType
from cryptography import x509
from prometheus_client import CollectorRegistry
from pytest_aiohttp import AiohttpServer

from tests.helpers.config import MakeProxy
from tests.helpers.fakes import CLIENT_KEY, TOKEN, assert_no_secret
from tests.helpers.forward import (
    Upstream,
    ca_context,
    ca_file,
    fport,
    proxy_url,
)
from tests.helpers.forward import forward_config as shared_forward_config
from tests.helpers.idp import Idp, StartIdp, oauth2
from tests.helpers.logs import CapturedLogs
from tests.helpers.metrics import count
from tests.helpers.net import closed_port
from tests.helpers.rawhttp import RawConnection, RawResponse, assert_problem, exchange
from tests.helpers.tls import ServerCert, client_hello, upstream_tls
from tests.helpers.wait import wait_for, wait_ready
from tokenproxy.config import build_config
from tokenproxy.daemon import Daemon

TIMEOUT = 5.0            # the bound of every single wait
HEADER_TIMEOUT = 0.5     # limits.header_timeout of the daemons here
LIMITS = {"header_timeout": f"{HEADER_TIMEOUT}s"}


@pytest.fixture(name="up")
def _up(tls_upstream: Upstream) -> Upstream:
    """This file's short name for the conftest's tls_upstream."""
    return tls_upstream


def forward_config(tmp_path: Path, up: Upstream, *, limits: dict[str, Any] | None = None,
                   **kw: Any) -> dict[str, Any]:
    """The shared config with this file's short header_timeout."""
    return shared_forward_config(tmp_path, up, limits={**LIMITS, **(limits or {})}, **kw)


def connect_head(authority: str, *extra: str) -> bytes:
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def connect(daemon: Daemon, authority: str, *extra: str,
                  ) -> tuple[RawConnection, RawResponse]:
    """A CONNECT on a new connection to the forward listener, and its answer's head."""
    conn = await RawConnection.open(fport(daemon))
    await conn.send(connect_head(authority, *extra))
    return conn, await conn.response(TIMEOUT, head_only=True)


async def inside(daemon: Daemon, tmp_path: Path, authority: str, sni: str | None = "localhost",
                 ) -> RawConnection:
    """A connection through CONNECT *authority* whose TLS (SNI *sni*, trusting the local CA)
    is up: what is sent on it goes to the intercepted host's route."""
    conn, resp = await connect(daemon, authority)
    assert 200 == resp.status, resp.raw
    await asyncio.wait_for(
        conn.writer.start_tls(ca_context(tmp_path), server_hostname=sni), TIMEOUT)
    return conn


def request(path: str, host: str, *extra: str, method: str = "GET") -> str:
    return "\n".join([f"{method} {path} HTTP/1.1", f"Host: {host}", *extra]) + "\n\n"


async def refused_answer(daemon: Daemon, data: bytes) -> RawResponse:
    """The forward listener's answer to *data* on a new connection, which it then closed;
    no secret in any byte of it."""
    resp, closed = await exchange(fport(daemon), data, TIMEOUT)
    assert closed, resp.raw
    assert "close" == resp.get("Connection")
    return resp


def connects(daemon: Daemon, outcome: str) -> float:
    return count(daemon, "tokenproxy_forward_connects_total", outcome=outcome)


async def closed_within(conn: RawConnection, bound: float) -> float:
    """Seconds until the daemon closed *conn* (from now); fails past *bound*."""
    started = time.monotonic()
    took = await conn.wait_closed(bound)
    assert took is not None, f"still open after {bound}s"
    return time.monotonic() - started


# -- a route's behaviour inside an intercepted TLS connection -----------------------------------


class TlsIdp:
    """The demo Issuer: its token endpoint over plain HTTP (idp.url), and its protected API
    also over TLS on ``port``, reached as ``localhost``; the same issuer state behind both."""

    def __init__(self, idp: Idp, tls: ServerCert, port: int) -> None:
        self.idp, self.tls, self.port = idp, tls, port


@pytest.fixture(name="tls_idp")
async def _tls_idp(start: StartIdp, aiohttp_server: AiohttpServer, tmp_path: Path) -> TlsIdp:
    idp = await start()
    tls = upstream_tls(tmp_path / "idp-tls")
    app = idp.issuer.app()
    app.middlewares.append(idp.tap.middleware)
    server = await aiohttp_server(app, ssl=tls.server_context(), host="127.0.0.1")
    assert server.port is not None
    return TlsIdp(idp, tls, server.port)


def idp_config(tmp_path: Path, t: TlsIdp, **top: Any) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
        "state_path": str(tmp_path / "state" / "state.json"),
        "providers": {"idp": oauth2(t.idp)},
        "routes": [{"prefix": "/", "upstream": t.idp.url + "/api/", "provider": "idp"}],
        "limits": dict(LIMITS),
        "forward_proxy": {"listen": "127.0.0.1:0",
                          "intercept": [{"host": "localhost", "port": t.port,
                                         "provider": "idp", "ca_file": str(t.tls.ca)}]},
        **top,
    }


@pytest.mark.slow
@pytest.mark.both_paths
async def test_a_401_is_refreshed_and_retried_with_its_body_inside_intercepted_tls(
    make_proxy: MakeProxy, tls_idp: TlsIdp, tmp_path: Path,
) -> None:
    """The issuer's TLS API refuses the revoked token with 401: the request made through
    HTTPS_PROXY by requests is sent again with a new token and the same body bytes, the
    client gets the 200, and no token the issuer made reaches the client."""
    idp = tls_idp.idp
    daemon = await make_proxy(idp_config(tmp_path, tls_idp))
    await wait_ready(daemon)
    idp.issuer.revoke_access()
    body = bytes(range(256)) * 3
    answer = await asyncio.to_thread(
        requests.post, f"https://localhost:{tls_idp.port}/api/upload", data=body,
        headers={"Authorization": "Bearer placeholder"},
        proxies={"https": proxy_url(daemon)}, verify=str(ca_file(tmp_path)), timeout=10)
    assert 200 == answer.status_code, answer.text
    assert {"hello": "demo-client", "path": "/api/upload"} == answer.json()
    first, second = [s for s in idp.tap.seen if s.path == "/api/upload"]
    assert (body, body) == (first.body, second.body)
    assert first.bearer != second.bearer
    assert "placeholder" not in (first.bearer, second.bearer)
    assert idp.issuer.valid(second.bearer) is not None
    assert 1 == count(daemon, "tokenproxy_auth_retries_total", route="localhost",
                      outcome="success")
    received = answer.text + json.dumps(dict(answer.headers))
    assert [] == [t for t in [*idp.issuer._access, first.bearer] if t in received]


@pytest.mark.slow
async def test_a_401_the_retry_cannot_cure_is_passed_back_inside_intercepted_tls(
    make_proxy: MakeProxy, tls_idp: TlsIdp, tmp_path: Path,
) -> None:
    """A 401 whatever the token (the upstream's own refusal): retried once, then the
    upstream's answer reaches the client, with no token in it."""
    idp = tls_idp.idp
    idp.tap.deny.add("/api/deny")
    daemon = await make_proxy(idp_config(tmp_path, tls_idp))
    await wait_ready(daemon)
    conn = await inside(daemon, tmp_path, f"localhost:{tls_idp.port}")
    try:
        resp = await conn.request(request("/api/deny", f"localhost:{tls_idp.port}",
                                          "Content-Length: 5", method="POST") + "hello")
    finally:
        await conn.close()
    assert (401, b"denied-by-upstream") == (resp.status, resp.body)
    assert [b"hello", b"hello"] == [s.body for s in idp.tap.seen if s.path == "/api/deny"]
    assert [] == [t for t in idp.issuer._access if t.encode() in resp.raw]


@pytest.mark.slow
async def test_a_large_answer_streams_through_interception(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path,
) -> None:
    """64 MiB from the upstream arrive whole through the intercepted TLS, read in pieces
    (the proxy does not hold the answer to send it)."""
    daemon = await make_proxy(forward_config(tmp_path, up))
    n = 64 * 1024 * 1024
    got = 0
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as s, s.get(
            f"https://localhost:{up.port}/big?n={n}", proxy=proxy_url(daemon),
            ssl=ca_context(tmp_path)) as resp:
        assert 200 == resp.status
        async for chunk in resp.content.iter_any():
            got += len(chunk)
    assert n == got
    assert [f"Bearer {TOKEN}"] == up.fake.last.header("Authorization")


@pytest.mark.slow
async def test_server_sent_events_arrive_as_they_are_sent(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path,
) -> None:
    """The upstream's events 0.25 s apart reach the client 0.25 s apart: nothing buffered
    to the end of the stream."""
    daemon = await make_proxy(forward_config(tmp_path, up))
    arrivals: list[tuple[float, bytes]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s, s.get(
            f"https://localhost:{up.port}/sse?gap=0.25", proxy=proxy_url(daemon),
            ssl=ca_context(tmp_path)) as resp:
        assert "text/event-stream" == resp.headers["Content-Type"]
        async for line in resp.content:
            if line.startswith(b"data:"):
                arrivals.append((time.monotonic(), line.strip()))
    assert [b"data: event 0", b"data: event 1", b"data: event 2"] == [a[1] for a in arrivals]
    assert arrivals[2][0] - arrivals[0][0] > 0.35, arrivals


@pytest.mark.slow
async def test_an_upload_streams_to_the_upstream_before_it_ends(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path,
) -> None:
    """A body past max_replay_body reaches the upstream while the client still sends: the
    rest is sent only once the upstream holds the first 4 KiB (a proxy that buffered the
    body would deadlock here until the bound)."""
    daemon = await make_proxy(forward_config(tmp_path, up,
                                             limits={"max_replay_body": "1KiB"}))
    sent = hashlib.sha256()

    async def body() -> AsyncIterator[bytes]:
        first = b"0123456789abcdef" * 256
        sent.update(first)
        yield first
        async with asyncio.timeout(TIMEOUT):
            await up.fake.first_bytes.wait()
        rest = b"fedcba9876543210" * 4096
        sent.update(rest)
        yield rest

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s, s.post(
            f"https://localhost:{up.port}/upload", data=body(), proxy=proxy_url(daemon),
            ssl=ca_context(tmp_path)) as resp:
        assert 200 == resp.status
        doc = await resp.json()
    assert (4096 + 65536, sent.hexdigest()) == (doc["received"], doc["body_sha256"])
    assert [f"Bearer {TOKEN}"] == up.fake.last.header("Authorization")


@pytest.mark.slow
@pytest.mark.both_paths
async def test_a_websocket_through_the_intercepted_connection_carries_the_token(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path,
) -> None:
    """wss:// through HTTPS_PROXY: the handshake the upstream sees carries the token (not
    the client's placeholder), frames go both ways, and the close comes back."""
    daemon = await make_proxy(forward_config(tmp_path, up))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as s:
        async with s.ws_connect(f"wss://localhost:{up.port}/ws", proxy=proxy_url(daemon),
                                ssl=ca_context(tmp_path), protocols=("chat",),
                                headers={"Authorization": "Bearer placeholder"}) as ws:
            assert "chat" == ws.protocol
            await ws.send_str("hi")
            msg = await ws.receive(TIMEOUT)
            assert (WSMsgType.TEXT, "echo:hi") == (msg.type, msg.data)
            await ws.send_bytes(b"\x00\xffbin")
            msg = await ws.receive(TIMEOUT)
            assert (WSMsgType.BINARY, b"\x00\xffbin") == (msg.type, msg.data)
            await ws.close()
        assert ws.closed
    [handshake] = up.fake.ws_headers
    assert [f"Bearer {TOKEN}"] == [v for k, v in handshake if k.lower() == "authorization"]


# -- Node ---------------------------------------------------------------------------------------

# Node 20's https with a CONNECT tunnel of its own making (its built-in fetch ignores
# HTTPS_PROXY before Node 24's NODE_USE_ENV_PROXY): the local CA is trusted through
# NODE_EXTRA_CA_CERTS, as `tokenproxy exec` sets it; tls.connect verifies the name. (No
# ``agent: false`` here: with it Node ignores createConnection and dials the host directly.)
NODE_SCRIPT = r"""
const http = require('http'), https = require('https'), tls = require('tls');
const [proxyPort, host, port, path, body] = process.argv.slice(1);
setTimeout(() => { console.error('timeout'); process.exit(5); }, 8000).unref();
const req = http.request({host: '127.0.0.1', port: Number(proxyPort), method: 'CONNECT',
                          path: `${host}:${port}`, headers: {Host: `${host}:${port}`}});
req.on('connect', (res, socket) => {
  if (res.statusCode !== 200) {
    console.log(JSON.stringify({connect: res.statusCode})); process.exit(0);
  }
  const r = https.request({host, port: Number(port), path, method: 'POST',
                           headers: {Authorization: 'Bearer placeholder'},
                           createConnection: () => tls.connect({socket, servername: host})},
    (resp) => {
      let data = '';
      resp.setEncoding('utf8');
      resp.on('data', (c) => { data += c; });
      resp.on('end', () => { console.log(JSON.stringify({status: resp.statusCode, body: data}));
                             process.exit(0); });
    });
  r.on('error', (e) => { console.error(e.code + " " + e.message); process.exit(3); });
  r.end(body);
});
req.on('error', (e) => { console.error(e.message); process.exit(4); });
req.end();
"""


async def node(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    node_bin = shutil.which("node")
    assert node_bin is not None
    proc = await asyncio.create_subprocess_exec(
        node_bin, "-e", NODE_SCRIPT, *args, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 15)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
async def test_node_https_through_the_proxy(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path,
) -> None:
    """Node trusting the local CA by NODE_EXTRA_CA_CERTS: its POST reaches the upstream with
    the token and the body; without the CA Node refuses the certificate; a host not listed
    is refused at the CONNECT."""
    daemon = await make_proxy(forward_config(tmp_path, up))
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    trusting = {**env, "NODE_EXTRA_CA_CERTS": str(ca_file(tmp_path))}
    code, out, err = await node(trusting, str(fport(daemon)), "localhost", str(up.port),
                                "/echo?from=node", "node-body")
    assert 0 == code, err
    doc = json.loads(out)
    assert 200 == doc["status"]
    echoed = json.loads(doc["body"])
    assert ("POST", "/echo?from=node", 9) == (echoed["method"], echoed["raw_path"],
                                              echoed["body_len"])
    seen = up.fake.last
    assert ([f"Bearer {TOKEN}"], b"node-body") == (seen.header("Authorization"), seen.body)

    code, out, err = await node(env, str(fport(daemon)), "localhost", str(up.port), "/echo", "x")
    assert 3 == code
    assert "UNABLE_TO_VERIFY_LEAF_SIGNATURE" in err or "SELF_SIGNED" in err, err

    code, out, err = await node(trusting, str(fport(daemon)), "example.org", "443", "/", "x")
    assert (0, {"connect": 403}) == (code, json.loads(out)), err
    assert 1 == len(up.fake.seen)


# -- where a CONNECT may go ---------------------------------------------------------------------


async def test_unlisted_targets_are_refused_naming_them(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path,
) -> None:
    """Names not listed -- also ones that resolve to loopback, like the listed name does --
    IP literals of loopback in every spelling, and the listed name on another port: 403
    forward_refused naming the target as the proxy read it, and the connection closed."""
    daemon = await make_proxy(forward_config(tmp_path, up))
    p = up.port
    cases = {
        "example.org:443": "example.org:443",
        f"ip6-localhost:{p}": f"ip6-localhost:{p}",
        f"localhost.localdomain:{p}": f"localhost.localdomain:{p}",
        f"sub.localhost:{p}": f"sub.localhost:{p}",
        f"127.0.0.1:{p}": f"127.0.0.1:{p}",
        f"[::1]:{p}": f"[::1]:{p}",
        f"[0:0:0:0:0:0:0:1]:{p}": f"[::1]:{p}",
        f"[::ffff:127.0.0.1]:{p}": f"[::ffff:7f00:1]:{p}",
        f"2130706433:{p}": f"2130706433:{p}",
        f"0x7f000001:{p}": f"0x7f000001:{p}",
        f"127.1:{p}": f"127.1:{p}",
        "localhost:443": "localhost:443",
        f"localhost:{closed_port()}": None,
    }
    for authority, named in cases.items():
        resp = await refused_answer(daemon, connect_head(authority))
        assert_problem(resp, 403, "forward_refused")
        expected = named or authority
        assert f"{expected} is neither intercepted nor tunnelled" in resp.json()["detail"], \
            authority
    assert len(cases) == connects(daemon, "refused")
    assert [] == up.fake.seen


@pytest.mark.slow
@pytest.mark.parametrize("name", ["LOCALHOST", "localhost.", "LocalHost."])
async def test_case_and_trailing_dot_spellings_of_a_listed_name_are_that_name(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path, name: str,
) -> None:
    """A listed name in capitals or with the root's trailing dot is the listed name, for
    real clients from end to end: requests to https://NAME:port/ (CONNECT NAME:port, SNI
    and Host as the URL spells them) and to http://NAME:port/ (absolute form) are served
    with the token.

    Was a bug (trailing dot): the CONNECT target and the SNI are normalised (targets.host_of,
    service.same_name) but the Host check inside is not (rules/security.host_name keeps the
    dot), so both requests get 403 forbidden_host after the CONNECT was accepted."""
    daemon = await make_proxy(forward_config(tmp_path, up))
    proxies = {"https": proxy_url(daemon), "http": proxy_url(daemon)}
    for port in (up.port, up.plain_port):
        scheme = "https" if port == up.port else "http"
        answer = await asyncio.to_thread(
            requests.get, f"{scheme}://{name}:{port}/echo", proxies=proxies,
            verify=str(ca_file(tmp_path)), timeout=10)
        assert 200 == answer.status_code, (scheme, answer.text)
        assert [f"Bearer {TOKEN}"] == up.fake.last.header("Authorization")


@pytest.mark.parametrize(("line", "status"), [
    (b"CONNECT localhost HTTP/1.1", 400),              # no port
    (b"CONNECT localhost: HTTP/1.1", 400),             # an empty port
    (b"CONNECT localhost:0 HTTP/1.1", 400),
    (b"CONNECT localhost:99999 HTTP/1.1", 400),
    (b"CONNECT localhost:65536 HTTP/1.1", 400),
    (b"CONNECT localhost:000443 HTTP/1.1", 400),       # six digits
    (b"CONNECT localhost:+443 HTTP/1.1", 400),
    (b"CONNECT localhost:-1 HTTP/1.1", 400),
    (b"CONNECT :443 HTTP/1.1", 400),                   # no host
    (b"CONNECT [::1:443 HTTP/1.1", 400),               # an unclosed bracket
    (b"CONNECT [::1]x:443 HTTP/1.1", 400),
    (b"CONNECT ::1:443 HTTP/1.1", 400),                # IPv6 without brackets
    (b"CONNECT [127.0.0.1]:443 HTTP/1.1", 400),
    (b"CONNECT local_host:443 HTTP/1.1", 400),
    (b"CONNECT -localhost:443 HTTP/1.1", 400),
    (b"CONNECT user@localhost:443 HTTP/1.1", 400),
    (b"CONNECT localhost%00:443 HTTP/1.1", 400),
    (b"CONNECT http://localhost:443/ HTTP/1.1", 400),
    ("CONNECT lócalhost:443 HTTP/1.1".encode(), 400),  # not ASCII
    (b"CONNECT \xff\xfe:443 HTTP/1.1", 400),
    (b"CONNECT localhost:443 HTTP/1.2", 400),
    (b"CONNECT localhost:443 HTTP/2.0", 400),
    (b"CONNECT  localhost:443 HTTP/1.1", 400),         # two spaces
    (b"CONNECT localhost:443", 400),                   # no version
    (b"CONNECT", 400),
    (b"CON\x00NECT localhost:443 HTTP/1.1", 400),
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", 400),   # TLS record bytes, then CRLFs
    (b"PRI * HTTP/2.0\r\n\r\nSM", 400),                # the HTTP/2 preface
    (b"CONNECT localhost:443 HTTP/1.1\r\nno colon here", 400),
    (b"CONNECT localhost:443 HTTP/1.1\r\n folded: value", 400),
    (b"CONNECT localhost:443 HTTP/1.1\r\nBad Name: value", 400),
    (b"CONNECT localhost:443 HTTP/1.1\r\n: empty name", 400),
    (b"CONNECT localhost:443 HTTP/1.1\r\nX-Pad: " + b"a" * 17000, 431),
    # A CONNECT has no content: bytes sent as one would go into a tunnel unasked.
    (b"CONNECT localhost:443 HTTP/1.1\r\nContent-Length: 3", 400),
    (b"CONNECT localhost:443 HTTP/1.1\r\nTransfer-Encoding: chunked", 400),
    (b"CONNECT localhost:443 HTTP/1.1\r\nX-Nul: a\x00b", 400),
    (b"CONNECT localhost:443 HTTP/1.1\r\nX-Cr: a\rb", 400),
])
async def test_malformed_connect_heads_are_refused_and_the_connection_closed(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path, line: bytes, status: int,
) -> None:
    daemon = await make_proxy(forward_config(tmp_path, up))
    resp = await refused_answer(daemon, line + b"\r\n\r\n")
    assert_problem(resp, status, "bad_request" if status == 400 else "header_too_large")
    assert [] == up.fake.seen


async def test_a_wildcard_entry_takes_one_label_in_any_spelling(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path,
) -> None:
    """``*.example.test``: one label before it, in capitals or with the trailing dot, is
    intercepted with a leaf the local CA signed for that name (verified by Python's ssl);
    two labels, none, or another port is refused; a ClientHello naming a sibling is
    refused. Nothing resolves these names: no request is sent inside."""
    raw = forward_config(tmp_path, up)
    raw["forward_proxy"]["intercept"].append({"host": "*.example.test", "port": 443,
                                              "provider": "api"})
    daemon = await make_proxy(raw)
    for authority in ("x.example.test:443", "X.Example.TEST.:443"):
        conn, resp = await connect(daemon, authority)
        try:
            assert 200 == resp.status, authority
            await asyncio.wait_for(conn.writer.start_tls(
                ca_context(tmp_path), server_hostname="x.example.test"), TIMEOUT)
        finally:
            await conn.close()
    for authority in ("a.b.example.test:443", "example.test:443", "x.example.test:8443",
                      "x.example.test.evil:443", "xexample.test:443"):
        answer = await refused_answer(daemon, connect_head(authority))
        assert_problem(answer, 403, "forward_refused")
    conn, resp = await connect(daemon, "x.example.test:443")
    try:
        assert 200 == resp.status
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.wait_for(conn.writer.start_tls(
                ca_context(tmp_path), server_hostname="y.example.test"), TIMEOUT)
    finally:
        await conn.close()


@pytest.mark.parametrize(("target", "status", "cause"), [
    ("http://127.0.0.1:{q}/", 403, "forward_refused"),        # the upstream's IP, not listed
    ("http://[::1]:{q}/", 403, "forward_refused"),
    ("http://localhost/", 403, "forward_refused"),            # port 80, not listed
    ("http://localhost:{x}/", 403, "forward_refused"),
    ("http://ip6-localhost:{q}/", 403, "forward_refused"),
    ("http://user@localhost:{q}/", 400, "bad_request"),       # credentials in the URL
    ("http://localhost:{q}@example.org/", 400, "bad_request"),
    ("http://localhost:{q}:{q}/", 400, "bad_request"),
    ("https://localhost:{p}/", 400, "bad_request"),           # https:// goes by CONNECT
    ("ftp://localhost:{q}/", 400, "bad_request"),
    ("/echo", 400, "bad_request"),                            # origin form
    ("*", 400, "bad_request"),
    ("http:///echo", 400, "bad_request"),
])
async def test_absolute_form_requests_elsewhere_are_refused(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path, target: str, status: int, cause: str,
) -> None:
    daemon = await make_proxy(forward_config(tmp_path, up))
    url = target.format(p=up.port, q=up.plain_port, x=closed_port())
    resp = await refused_answer(daemon, f"GET {url} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    assert_problem(resp, status, cause)
    assert [] == up.fake.seen


async def test_port_0_in_an_absolute_form_url_is_refused_not_read_as_port_80(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path,
) -> None:
    """CONNECT localhost:0 is a 400; ``http://localhost:0/`` must be too.

    Was a bug: targets.absolute_target takes ``port or HTTP_PORT``, and urlsplit's port is 0, so
    the target becomes localhost:80 (here a 403 naming localhost:80; with port 80
    intercepted, the request would be served there)."""
    daemon = await make_proxy(forward_config(tmp_path, up))
    resp = await refused_answer(
        daemon, b"GET http://localhost:0/ HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert_problem(resp, 400, "bad_request")


async def test_an_absolute_form_request_is_one_request_per_connection(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path,
) -> None:
    """A second request pipelined behind an absolute-form one is not served (it could name
    another host): the first is answered with Connection: close and the connection
    closed."""
    daemon = await make_proxy(forward_config(tmp_path, up))
    q = up.plain_port
    conn = await RawConnection.open(fport(daemon))
    try:
        await conn.send((f"GET http://localhost:{q}/echo?1 HTTP/1.1\r\nHost: localhost:{q}\r\n\r\n"
                         f"GET /echo?2 HTTP/1.1\r\nHost: localhost:{q}\r\n\r\n").encode())
        resp = await conn.response(TIMEOUT)
        assert (200, "close") == (resp.status, resp.get("Connection"))
        await closed_within(conn, TIMEOUT)
    finally:
        await conn.close()
    assert not conn.trailing.startswith(b"HTTP/"), conn.trailing
    assert ["/echo?1"] == [s.raw_path for s in up.fake.seen]


@pytest.mark.slow
async def test_fields_the_connection_header_names_are_not_forwarded_in_absolute_form(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path,
) -> None:
    """``Connection: X-Hop`` makes X-Hop hop-by-hop (RFC 9110 section 7.6.1): a route drops
    it -- the main listener does, and so does the request inside an intercepted CONNECT --
    and an absolute-form request, "served the same way", must too.

    Was a bug: connection.py rewrites the absolute-form head dropping the Connection field itself
    (_DROPPED) before the route sees it, so the fields it named are no longer known to be
    hop-by-hop and reach the upstream."""
    daemon = await make_proxy(forward_config(tmp_path, up))
    hop = ("Connection: X-Hop, Keep-Alive", "X-Hop: hop-value", "Keep-Alive: timeout=5")
    conn = await inside(daemon, tmp_path, up.authority)
    try:
        resp = await conn.request(request("/echo", up.authority, *hop))
    finally:
        await conn.close()
    assert 200 == resp.status
    assert [] == up.fake.last.header("X-Hop")
    main = await RawConnection.open(daemon.port())
    try:
        resp = await main.request(request("/echo", f"127.0.0.1:{daemon.port()}", *hop))
    finally:
        await main.close()
    assert 200 == resp.status
    assert [] == up.fake.last.header("X-Hop")
    q = up.plain_port
    conn = await RawConnection.open(fport(daemon))
    try:
        resp = await conn.request(request(f"http://localhost:{q}/echo", f"localhost:{q}", *hop))
    finally:
        await conn.close()
    assert 200 == resp.status
    assert [] == up.fake.last.header("X-Hop")


async def test_a_head_past_max_header_size_without_its_end_is_refused_with_431(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path,
) -> None:
    """Bytes without CRLF CRLF past max_header_size: 431 at once, not a wait for the end."""
    daemon = await make_proxy(forward_config(tmp_path, up, limits={"max_header_size": "1KiB"}))
    conn = await RawConnection.open(fport(daemon))
    try:
        await conn.send(b"CONNECT localhost:443 HTTP/1.1\r\nX-Pad: " + b"a" * 2000)
        resp = await conn.response(TIMEOUT)
        assert_problem(resp, 431, "header_too_large")
        await closed_within(conn, 1.0)
    finally:
        await conn.close()


@pytest.mark.slow
@pytest.mark.parametrize("sent", [b"", b"CONNECT localhost:", client_hello()],
                         ids=["nothing", "half-a-line", "a-client-hello"])
async def test_a_head_that_never_ends_is_cut_at_header_timeout(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path, sent: bytes,
) -> None:
    """Nothing, half a CONNECT line, or a ClientHello (HTTPS_PROXY=https://...): the
    connection is closed once header_timeout has passed, not before, not much later."""
    daemon = await make_proxy(forward_config(tmp_path, up))
    conn = await RawConnection.open(fport(daemon))
    try:
        if sent:
            await conn.send(sent)
        took = await closed_within(conn, HEADER_TIMEOUT + 1.0)
    finally:
        await conn.close()
    assert HEADER_TIMEOUT - 0.1 <= took, took
    assert_no_secret(conn.trailing)


async def trickle(conn: RawConnection, data: bytes, every: float) -> None:
    """Send *data* a byte at a time, *every* seconds apart, until done or cut off."""
    with contextlib.suppress(ConnectionError):
        for i in range(len(data)):
            if conn.writer.is_closing():
                return
            await conn.send(data[i:i + 1])
            await asyncio.sleep(every)


@pytest.mark.slow
@pytest.mark.parametrize("how", ["nothing", "half-a-hello", "a-byte-each-0.1s"])
async def test_a_tls_handshake_that_never_finishes_is_cut_at_header_timeout(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path, how: str,
) -> None:
    """After the 200, no ClientHello, only part of one, or one trickled a byte at a time:
    the connection is closed once header_timeout has passed (the bound is the whole
    handshake's, not per byte), counted as failed, and nothing reaches the upstream."""
    daemon = await make_proxy(forward_config(tmp_path, up))
    conn, resp = await connect(daemon, up.authority)
    sender: asyncio.Task[None] | None = None
    try:
        assert 200 == resp.status
        if how == "half-a-hello":
            await conn.send(client_hello()[:40])
        elif how == "a-byte-each-0.1s":
            sender = asyncio.ensure_future(trickle(conn, client_hello(), 0.1))
        took = await closed_within(conn, HEADER_TIMEOUT + 1.0)
    finally:
        if sender is not None:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)
        await conn.close()
    assert HEADER_TIMEOUT - 0.1 <= took <= HEADER_TIMEOUT + 0.5, took
    await wait_for(lambda: connects(daemon, "failed") == 1, "the failed handshake counted")
    assert 0 == connects(daemon, "intercepted")
    assert [] == up.fake.seen


@pytest.mark.slow
@pytest.mark.parametrize("sni", ["example.org", "other.localhost", "ip6-localhost"])
async def test_a_client_hello_naming_another_host_is_refused(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path, sni: str,
) -> None:
    """SNI not the CONNECT's host: the handshake is refused before any certificate is sent
    (the client trusts the local CA and does not check names, so only the proxy's refusal
    stands in the way), nothing reaches the upstream, and the right name on a new connection
    still works. (The client sees the connection reset: asyncio drops the unrecognized_name
    alert OpenSSL made when it closes a failed handshake.)"""
    daemon = await make_proxy(forward_config(tmp_path, up))
    conn, resp = await connect(daemon, up.authority)
    try:
        assert 200 == resp.status
        ctx = ca_context(tmp_path)
        ctx.check_hostname = False   # what a client that does not check names would do
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.wait_for(conn.writer.start_tls(ctx, server_hostname=sni), TIMEOUT)
    finally:
        await conn.close()
    await wait_for(lambda: connects(daemon, "failed") == 1, "the refused handshake counted")
    good = await inside(daemon, tmp_path, up.authority)
    try:
        assert 200 == (await good.request(request("/ok", up.authority))).status
    finally:
        await good.close()
    assert ["/ok"] == [s.raw_path for s in up.fake.seen]


def reset(conn: RawConnection) -> None:
    """Close *conn* with a TCP reset (SO_LINGER 0), as a client that crashed."""
    sock = conn.writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.writer.transport.abort()


@pytest.mark.slow
@pytest.mark.parametrize("how", ["timed-out", "reset", "closed", "wrong-sni", "plain-http"])
async def test_a_handshake_that_fails_gives_its_connection_slot_back(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path, how: str,
) -> None:
    """Three CONNECTs whose TLS handshake never finishes -- cut at header_timeout, reset by
    the client, closed by it, refused for its SNI, or never begun as plain HTTP came --
    under limits.max_connections 4 (shared with the main listener, whose accept loop holds
    one): afterwards no connection counts as open, and a new CONNECT is answered.

    Was a bug (timed-out, reset): when the handshake times out or the client resets during it,
    asyncio's SSLProtocol is still in DO_HANDSHAKE and never calls the app protocol's
    connection_lost (sslproto.py connection_lost), so ForwardConnection.connection_lost --
    the only place the slot is given back (_release) -- never runs: every such connection
    leaks a slot of the daemon-wide ConnectionGate and, after max_connections of them, the
    daemon accepts nothing on any proxy listener."""
    daemon = await make_proxy(forward_config(tmp_path, up, limits={"max_connections": 4}))
    conns = [(await connect(daemon, up.authority)) for _ in range(3)]
    assert [200, 200, 200] == [resp.status for _, resp in conns]
    for conn, _ in conns:
        if how == "reset":
            reset(conn)
        elif how == "closed":
            await conn.close()
        elif how == "wrong-sni":
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await asyncio.wait_for(conn.writer.start_tls(
                    ca_context(tmp_path), server_hostname="example.org"), TIMEOUT)
        elif how == "plain-http":
            await conn.send(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            await closed_within(conn, TIMEOUT)
    if how == "timed-out":
        await asyncio.gather(*(closed_within(conn, HEADER_TIMEOUT + 1.0) for conn, _ in conns))
    for conn, _ in conns:
        await conn.close()
    await wait_for(lambda: connects(daemon, "failed") == 3, "three failed handshakes")
    with contextlib.suppress(AssertionError):   # the assertions below say what is wrong
        await wait_for(lambda: count(daemon, "tokenproxy_client_connections") == 0,
                       "every connection slot given back", timeout=1.0)
    still_open = count(daemon, "tokenproxy_client_connections")
    conn = await RawConnection.open(fport(daemon))
    try:
        await conn.send(connect_head(up.authority))
        try:
            status: int | str = (await conn.response(2.0, head_only=True)).status
        except TimeoutError:
            status = "no answer within 2 s"
    finally:
        await conn.close()
    assert (0, 200) == (still_open, status), "(connections counted open, a new CONNECT)"


@pytest.mark.slow
async def test_a_connection_idle_after_its_handshake_is_closed_at_header_timeout(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path,
) -> None:
    """TLS up, then no request: the route's own header timer closes it."""
    daemon = await make_proxy(forward_config(tmp_path, up))
    conn = await inside(daemon, tmp_path, up.authority)
    try:
        took = await closed_within(conn, HEADER_TIMEOUT + 1.0)
    finally:
        await conn.close()
    assert HEADER_TIMEOUT - 0.1 <= took, took
    assert_no_secret(conn.trailing)
    assert [] == up.fake.seen


async def openssl_client(daemon: Daemon, tmp_path: Path, target: str, servername: str,
                         ) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-proxy", f"127.0.0.1:{fport(daemon)}", "-connect", target,
        "-servername", servername, "-CAfile", str(ca_file(tmp_path)), "-verify_return_error",
        "-brief", stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(b""), 15)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode(errors="replace")


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")
async def test_openssl_s_client_with_another_servername_is_refused(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path,
) -> None:
    """openssl s_client -proxy (its own CONNECT) with -servername another host: no
    connection, no certificate; with the CONNECT's name: verified against the local CA."""
    daemon = await make_proxy(forward_config(tmp_path, up))
    code, out = await openssl_client(daemon, tmp_path, up.authority, "example.org")
    assert 0 != code, out
    assert "CONNECTION ESTABLISHED" not in out
    assert "Peer certificate" not in out
    code, out = await openssl_client(daemon, tmp_path, up.authority, "localhost")
    assert 0 == code, out
    assert "Verification: OK" in out, out


async def test_plain_http_after_connect_is_closed_and_reaches_nothing(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path,
) -> None:
    """A plain request where the ClientHello belongs: the connection is closed at once (not
    at the timeout), no request reaches the upstream, and the daemon serves on."""
    daemon = await make_proxy(forward_config(tmp_path, up))
    conn, resp = await connect(daemon, up.authority)
    try:
        assert 200 == resp.status
        await conn.send(request("/echo", up.authority).replace("\n", "\r\n").encode())
        took = await closed_within(conn, HEADER_TIMEOUT + 1.0)
    finally:
        await conn.close()
    assert took < HEADER_TIMEOUT / 2, took
    assert not conn.trailing.startswith(b"HTTP/"), conn.trailing
    assert_no_secret(conn.trailing)
    assert [] == up.fake.seen
    await wait_for(lambda: connects(daemon, "failed") == 1, "the failed handshake counted")
    good = await inside(daemon, tmp_path, up.authority)
    try:
        assert 200 == (await good.request(request("/ok", up.authority))).status
    finally:
        await good.close()


async def test_http2_inside_is_not_spoken(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path,
) -> None:
    """A client offering only h2 by ALPN gets no protocol agreed (the leaf's context speaks
    http/1.1 alone); the HTTP/2 preface it then sends is refused as a malformed request,
    and nothing reaches the upstream."""
    daemon = await make_proxy(forward_config(tmp_path, up))
    conn, resp = await connect(daemon, up.authority)
    try:
        assert 200 == resp.status
        ctx = ca_context(tmp_path)
        ctx.set_alpn_protocols(["h2"])
        await asyncio.wait_for(conn.writer.start_tls(ctx, server_hostname="localhost"),
                               TIMEOUT)
        assert conn.writer.get_extra_info("ssl_object").selected_alpn_protocol() is None
        await conn.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(9))
        answer = await conn.response(TIMEOUT)
        await closed_within(conn, TIMEOUT)
    finally:
        await conn.close()
    assert_problem(answer, 400, "bad_request")
    assert [] == up.fake.seen


async def test_bytes_pipelined_after_the_connect_head_are_refused(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path,
) -> None:
    """A ClientHello in the same write as the CONNECT, before its 200: 400, closed, and no
    TLS begun."""
    daemon = await make_proxy(forward_config(tmp_path, up))
    resp = await refused_answer(daemon, connect_head(up.authority) + client_hello())
    assert_problem(resp, 400, "bad_request")
    assert [] == up.fake.seen
    assert 0 == connects(daemon, "intercepted")


# -- the client key -----------------------------------------------------------------------------


def basic(credentials: bytes) -> str:
    return "Proxy-Authorization: Basic " + base64.b64encode(credentials).decode()


@pytest.mark.parametrize("extra", [
    (),
    (basic(b"tokenproxy:wrong-key-0123456789abcdef"),),
    (basic(CLIENT_KEY.encode()),),                       # no colon: no password
    (basic(CLIENT_KEY.encode() + b":"),),                # the key as the user name
    (basic(b"tokenproxy:" + CLIENT_KEY.encode()[:-1]),),
    (basic(b"tokenproxy:" + CLIENT_KEY.encode() + b"x"),),
    ("Proxy-Authorization: Bearer " + CLIENT_KEY,),
    ("Proxy-Authorization: Basic !!!" + CLIENT_KEY,),
    ("Tokenproxy-Key: " + CLIENT_KEY,),                  # the main listener's header
    (basic(b"a:" + CLIENT_KEY.encode()), basic(b"a:" + CLIENT_KEY.encode())),   # twice
], ids=["none", "wrong", "no-colon", "as-user", "short", "long", "bearer", "not-base64",
        "tokenproxy-key", "twice"])
async def test_without_the_client_key_a_connect_gets_407(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path, extra: tuple[str, ...],
) -> None:
    daemon = await make_proxy(forward_config(tmp_path, up, security={"client_key": CLIENT_KEY}))
    resp = await refused_answer(daemon, connect_head(up.authority, *extra))
    assert_problem(resp, 407, "proxy_auth")
    assert ['Basic realm="tokenproxy"'] == resp.header("Proxy-Authenticate")
    assert [] == up.fake.seen
    # A client guessing the key leaves a trace, as on the proxy listeners.
    assert 1 == count(daemon, "tokenproxy_rejected_requests_total", cause="proxy_auth")


async def test_with_the_client_key_a_connect_and_an_absolute_form_request_are_served(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path,
) -> None:
    """The key as the password of Proxy-Authorization: Basic, any user name (as requests
    sends http://user:key@proxy): CONNECT and absolute-form are served, and the upstream
    sees neither the key nor Proxy-Authorization."""
    daemon = await make_proxy(forward_config(tmp_path, up, security={"client_key": CLIENT_KEY}))
    conn, resp = await connect(daemon, up.authority, basic(b"any-name:" + CLIENT_KEY.encode()))
    await conn.close()
    assert 200 == resp.status
    proxies = {"https": proxy_url(daemon, CLIENT_KEY), "http": proxy_url(daemon, CLIENT_KEY)}
    for url in (f"https://localhost:{up.port}/echo", f"http://localhost:{up.plain_port}/echo"):
        answer = await asyncio.to_thread(requests.get, url, proxies=proxies,
                                         verify=str(ca_file(tmp_path)), timeout=10)
        assert 200 == answer.status_code, url
        seen = up.fake.last
        assert [f"Bearer {TOKEN}"] == seen.header("Authorization")
        assert [] == seen.header("Proxy-Authorization")
        assert CLIENT_KEY not in json.dumps(seen.headers)


# -- what the requests inside may say -----------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("host", "status", "cause"), [
    ("example.org", 403, "forbidden_host"),
    ("127.0.0.1", 403, "forbidden_host"),
    ("localhost.example.org", 403, "forbidden_host"),
    ("ip6-localhost", 403, "forbidden_host"),
    ("localhost@example.org", 403, "forbidden_host"),
    (None, 400, "bad_request"),      # HTTP/1.1 without Host
    ("twice", 400, "bad_request"),   # Host twice
])
async def test_a_request_inside_naming_another_host_is_refused(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path, host: str | None, status: int,
    cause: str,
) -> None:
    """Inside the TLS of CONNECT localhost:port, a Host header naming another host: 403
    forbidden_host; none or two: 400; nothing reaches the upstream."""
    daemon = await make_proxy(forward_config(tmp_path, up))
    conn = await inside(daemon, tmp_path, up.authority)
    if host is None:
        head = "GET /echo HTTP/1.1\n\n"
    elif host == "twice":
        head = request("/echo", up.authority, f"Host: {up.authority}")
    else:
        head = request("/echo", host)
    try:
        resp = await conn.request(head)
    finally:
        await conn.close()
    assert_problem(resp, status, cause)
    assert_no_secret(resp.raw)
    assert [] == up.fake.seen


@pytest.mark.slow
@pytest.mark.parametrize("extra", ["Origin: https://evil.example", "Origin: null",
                                   "Sec-Fetch-Site: cross-site", "Sec-Fetch-Site: same-site"])
async def test_a_browser_request_inside_is_refused_as_cross_site(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path, extra: str,
) -> None:
    daemon = await make_proxy(forward_config(tmp_path, up))
    conn = await inside(daemon, tmp_path, up.authority)
    try:
        resp = await conn.request(request("/echo", up.authority, extra))
    finally:
        await conn.close()
    assert_problem(resp, 403, "cross_site")
    assert_no_secret(resp.raw)
    assert [] == up.fake.seen


@pytest.mark.slow
async def test_an_absolute_form_request_inside_goes_nowhere_else(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path,
) -> None:
    """Inside the intercepted TLS, ``GET http://example.org/...``: refused as the main
    listener refuses absolute form, never sent to example.org nor with the token."""
    daemon = await make_proxy(forward_config(tmp_path, up))
    conn = await inside(daemon, tmp_path, up.authority)
    try:
        resp = await conn.request(request("http://example.org/echo", up.authority))
    finally:
        await conn.close()
    assert 400 <= resp.status < 500, resp.raw
    assert_no_secret(resp.raw)
    assert [] == up.fake.seen


@pytest.mark.slow
async def test_the_token_reaches_the_client_only_where_the_upstream_echoes_it(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path,
) -> None:
    """Over one intercepted connection: answers that do not echo the request hold no token
    (not in a header, not in an error); a response header echoing it is dropped, as on the
    main listener; a body echoing it (/echo) is the upstream's choice and passes."""
    daemon = await make_proxy(forward_config(tmp_path, up))
    conn = await inside(daemon, tmp_path, up.authority)
    try:
        quiet = [await conn.request(request(path, up.authority,
                                            "Authorization: Bearer placeholder"))
                 for path in ("/ok", "/status/401", "/status/500", "/hop", "/cookies")]
        header = await conn.request(request("/echo-token", up.authority))
        body = await conn.request(request("/echo", up.authority))
    finally:
        await conn.close()
    assert [200, 401, 500, 200, 200] == [r.status for r in quiet]
    assert_no_secret(*(r.raw for r in quiet))
    assert ([], ["kept"]) == (header.header("X-Echo"), header.header("X-Other"))
    assert_no_secret(header.raw)
    assert ["Authorization", f"Bearer {TOKEN}"] in body.json()["headers"]


# -- the CA key ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_the_ca_key_is_private_and_in_no_log_line_nor_answer(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path, logs: CapturedLogs,
) -> None:
    """The generated key is 0600 in a private directory; after interceptions, refusals and
    failed handshakes (each logged), no line of its PEM -- nor its DER as hex or base64 --
    is in any log line or any byte a client received."""
    daemon = await make_proxy(forward_config(tmp_path, up))
    key_path = tmp_path / "state" / "forward-ca-key.pem"
    assert 0o600 == stat.S_IMODE(key_path.stat().st_mode)
    assert 0 == stat.S_IMODE(key_path.parent.stat().st_mode) & 0o077
    received = bytearray()
    conn = await inside(daemon, tmp_path, up.authority)
    received += (await conn.request(request("/echo", up.authority))).raw
    await conn.close()
    received += (await refused_answer(daemon, connect_head("example.org:443"))).raw
    received += (await refused_answer(daemon, b"CONNECT x HTTP/1.1\r\n\r\n")).raw
    conn, _ = await connect(daemon, up.authority)
    await conn.send(b"GET / HTTP/1.1\r\n\r\n")
    await closed_within(conn, TIMEOUT)
    received += conn.trailing
    await conn.close()
    with contextlib.suppress(ssl.SSLError, ConnectionError):
        await inside(daemon, tmp_path, up.authority, sni="example.org")
    await wait_for(lambda: connects(daemon, "failed") == 2, "two failed handshakes")
    assert logs.events("forward_tls_failed")
    pem = key_path.read_text().splitlines()
    body = [line for line in pem if line and not line.startswith("-----")]
    der = base64.b64decode("".join(body))
    text = logs.text
    for line in body:
        assert line not in text
        assert line.encode() not in received
    assert der.hex() not in text
    assert base64.b64encode(der).decode() not in text


# -- bugs ---------------------------------------------------------------------------------------


@pytest.mark.slow
async def test_an_absolute_form_request_never_sends_the_token_in_clear_to_a_tls_port(
    make_proxy: MakeProxy, up: Upstream, tmp_path: Path,
) -> None:
    """An intercept entry whose upstream is TLS (CONNECT to it is ended and re-encrypted,
    verified with its ca_file) must not also be reachable as ``http://host:port/``: the
    proxy would send the request -- the token in it -- in clear text over the network to a
    port the operator configured for TLS. With the default ``port: 443`` any client of the
    listener can send ``GET http://api.example.com:443/`` and have the token cross the
    network unencrypted (the real server then answers 400, too late).

    Was a bug: absolute form was served for any entry whose port matched; now only for a
    ``scheme: http`` entry. The 'TLS upstream' here is a plain socket that records what
    arrives: it must receive nothing."""
    arrived = bytearray()
    got = asyncio.Event()

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(TIMEOUT):
                arrived.extend(await reader.readuntil(b"\r\n\r\n"))
        got.set()
        writer.close()

    server = await asyncio.start_server(record, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        raw = forward_config(tmp_path, up)
        raw["forward_proxy"]["intercept"] = [{"host": "localhost", "port": port,
                                              "provider": "api", "ca_file": str(up.tls.ca)}]
        daemon = await make_proxy(raw)
        conn = await RawConnection.open(fport(daemon))
        try:
            await conn.send(f"GET http://localhost:{port}/v1 HTTP/1.1\r\n"
                            f"Host: localhost:{port}\r\n\r\n".encode())
            with contextlib.suppress(TimeoutError, EOFError):
                await conn.response(2.0)
        finally:
            await conn.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(got.wait(), 0.5)
    finally:
        server.close()
        await server.wait_closed()
    assert TOKEN.encode() not in arrived, bytes(arrived)


class ShiftedClock:
    """The system's time moved forward by ``offset`` seconds (set by the test)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.offset

    def time(self) -> float:
        return time.time() + self.offset

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


async def served_leaf(daemon: Daemon, authority: str) -> x509.Certificate:
    """The certificate the forward listener presents for CONNECT *authority*."""
    conn, resp = await connect(daemon, authority)
    try:
        assert 200 == resp.status
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        await asyncio.wait_for(conn.writer.start_tls(ctx, server_hostname="localhost"), TIMEOUT)
        obj = conn.writer.get_extra_info("ssl_object")
        der = obj.getpeercert(binary_form=True)
    finally:
        await conn.close()
    return x509.load_der_x509_certificate(der)


@pytest.mark.slow
async def test_a_daemon_running_past_a_day_serves_a_leaf_that_is_still_valid(
    up: Upstream, tmp_path: Path,
) -> None:
    """Leaves live 24 hours and the CA renews them an hour before expiry; the listener must
    present the renewed one. The daemon's CA runs on the system clock, shifted here.

    Was a bug: Forward.tls_context caches the ssl.SSLContext per host for the life of the config
    and never asks LocalCA.server_context again, so the CA's renewal never takes effect:
    after 24 hours every intercepted handshake presents an expired certificate (clients
    fail with "certificate has expired") until a reload or restart."""
    clock = ShiftedClock()
    daemon = Daemon(build_config(forward_config(tmp_path, up), {}),
                    registry=CollectorRegistry(), certificate_clock=clock)
    await daemon.start()
    try:
        first = await served_leaf(daemon, up.authority)
        clock.offset = 25 * 3600.0
        now = dt.datetime.fromtimestamp(clock.time(), dt.UTC)
        later = await served_leaf(daemon, up.authority)
    finally:
        await daemon.stop(grace=1)
    assert first.not_valid_after_utc < now   # the first leaf has expired by now
    assert later.not_valid_before_utc <= now < later.not_valid_after_utc, \
        f"an expired leaf (valid until {later.not_valid_after_utc}) served at {now}"
