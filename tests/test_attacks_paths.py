"""Attacks on the aiohttp path on byte pairs, the one failure classifier, the storm guard by
request target, the token-endpoint calls, reloads and the config loader.

Each test pins a property a hostile client, upstream or token endpoint tried to break.
Everything runs on 127.0.0.1 with bounded waits; the daemons share the fake clock.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from tests.helpers.config import MakeProxy, proxy_config
from tests.helpers.fakes import PASSWORD, TOKEN, TOKEN_2, JumpClock
from tests.helpers.idp import Idp, gate, oauth2_config, respond_json, start_idp
from tests.helpers.logs import CapturedLogs
from tests.helpers.metrics import count
from tests.helpers.rawhttp import RawConnection, RawResponse, get
from tests.helpers.rawupstream import Req, UpConn, read_request, reset, response, start_proxy
from tests.helpers.wait import wait_for, wait_ready
from tokenproxy.config import build_config
from tokenproxy.daemon import Daemon
from tokenproxy.listeners import ListenError

StartIdp = Callable[..., Awaitable[Idp]]
PASSWORD_GRANT: dict[str, Any] = {"grant_type": "password", "username": "demo",
                                  "password": PASSWORD}


@pytest.fixture(name="clock")
def _clock() -> JumpClock:
    return JumpClock()


@pytest.fixture(name="start")
async def _start(aiohttp_server: AiohttpServer, clock: JumpClock, logs: CapturedLogs
                 ) -> AsyncIterator[StartIdp]:
    idps: list[Idp] = []

    async def start(**kw: Any) -> Idp:
        idp = await start_idp(aiohttp_server, clock, **kw)
        idps.append(idp)
        return idp

    yield start
    for idp in idps:
        issued = [*idp.issuer._access, *idp.issuer._refresh]
        assert [] == [t for t in issued if t in logs.text], "issued tokens leaked into logs"


@pytest.fixture(name="http")
async def _http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


async def status_of(http: aiohttp.ClientSession, daemon: Daemon, path: str,
                    method: str = "GET") -> int:
    async with http.request(method, f"http://127.0.0.1:{daemon.port()}{path}",
                            timeout=aiohttp.ClientTimeout(total=5)) as r:
        await r.read()
        return r.status


def serving_raw(answer: Callable[[Req], bytes]) -> Callable[..., Awaitable[None]]:
    """A raw upstream script: answer(request) for each request, keep-alive."""
    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        while (req := await read_request(reader, conn)) is not None:
            writer.write(answer(req))
            await writer.drain()

    return script


async def passthrough(request: web.Request, grant: str) -> None:
    """A queued fault that lets the issuer answer this call itself."""
    return None


# -- tokens/calls.py: a dead refresh token ---------------------------------------------------


async def test_a_rejected_refresh_token_is_not_spent_again_after_a_failed_login(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    clock: JumpClock,
) -> None:
    """After a refresh token is rejected and the login that follows fails once, the next
    attempt logs in again: the dead refresh token is not presented again, though the state
    file (written before the rejection) still holds it."""
    idp = await start(lifetime=3600)
    daemon = await make_proxy(oauth2_config(idp, tmp_path, **PASSWORD_GRANT))
    await wait_ready(daemon)
    assert 200 == await status_of(http, daemon, "/ok")
    idp.issuer.revoke_all()
    idp.calls.queue = [passthrough, respond_json({"error": "temporarily_unavailable"}, 503)]
    assert 503 == await status_of(http, daemon, "/ok")   # refresh rejected, login failed
    assert ["password", "refresh_token", "password"] == idp.calls.grants()
    await clock.tick(6)   # past the backoff and the storm guard's window
    assert 200 == await status_of(http, daemon, "/ok")
    assert ["password", "refresh_token", "password", "password"] == idp.calls.grants(), (
        "the rejected refresh token was presented again")


# -- auth_retries_total against the access log's `retried` ------------------------------------


def retry_counts(daemon: Daemon) -> dict[str, float]:
    return {o: count(daemon, "tokenproxy_auth_retries_total", route="/", outcome=o)
            for o in ("success", "failure", "upstream_error", "abandoned", "skipped",
                      "no_new_token")}


def first_401_then(answer: bytes) -> Callable[..., Awaitable[None]]:
    """A raw upstream: the first request gets 401, every later one *answer* (then close)."""
    state = {"n": 0}

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        while await read_request(reader, conn) is not None:
            state["n"] += 1
            writer.write(response(b"no", "401 Unauthorized") if state["n"] == 1 else answer)
            await writer.drain()
            if state["n"] > 1:
                return

    return script


async def test_a_websocket_retry_answered_without_an_upgrade_is_counted_once(
    start: StartIdp, make_proxy: MakeProxy, raw_upstream: Any, tmp_path: Path,
    logs: CapturedLogs,
) -> None:
    """A handshake refused with 401 and retried, whose retry the upstream answers with a
    plain 200 (no upgrade): the client gets 502, the log says retried, and the retry is
    counted once -- as success, since the upstream did not refuse the new token; the failed
    upgrade is an upstream error of its own."""
    up = await raw_upstream(first_401_then(response(b"x", "200 OK")))
    daemon = await make_proxy(oauth2_config(await start(), tmp_path, upstream=up.url()))
    await wait_ready(daemon)
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with s.ws_connect(f"ws://127.0.0.1:{daemon.port()}/ws"):
                pass
    assert 502 == refused.value.status
    await wait_for(lambda: bool(logs.events("request")), "the access log line")
    [event] = logs.events("request")
    assert event["retried"] is True
    counts = retry_counts(daemon)
    assert {"success": 1} == {k: v for k, v in counts.items() if v}, counts


# -- WebSocket handshakes and redirects ------------------------------------------------------


@pytest.mark.parametrize("header", ["X-Api-Key", "Authorization"])
async def test_a_websocket_handshake_redirect_is_passed_back_not_followed(
    make_proxy: MakeProxy, raw_upstream: Any, header: str,
) -> None:
    """The upstream answers a WebSocket handshake with ``302 Location:`` another origin.
    aiohttp's ws_connect would follow it with the route's token header (it drops only
    Authorization across origins): the handshake goes through a client that refuses
    redirects, and the 302 is passed back to the client, as on the HTTP path."""
    thief = await raw_upstream(serving_raw(lambda r: response(b"stolen")))

    def redirect(req: Req) -> bytes:
        return response(b"", "302 Found", f"Location: {thief.url('/steal')}")

    up = await raw_upstream(serving_raw(redirect))
    daemon = await start_proxy(make_proxy, up, {"header": header, "value": "Bearer {token}"})
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{daemon.port()}/ws", headers=upgrade,
            allow_redirects=False) as answer:
        # Passed back as the HTTP path passes a redirect back: the client decides.
        assert (302, thief.url("/steal")) == (answer.status, answer.headers.get("Location"))
        assert "Server" not in answer.headers
    await asyncio.sleep(0.1)
    assert [] == thief.targets, "the handshake followed the upstream's redirect"


@pytest.mark.slow
@pytest.mark.both_paths
async def test_a_retried_request_whose_client_leaves_is_counted_as_abandoned(
    start: StartIdp, make_proxy: MakeProxy, raw_upstream: Any, tmp_path: Path,
    logs: CapturedLogs,
) -> None:
    """A request refused with 401 is sent again with a fresh token; the client hangs up
    while the second attempt waits for its answer. The access log says ``retried: true``
    (status 499), and the retry is counted once, as ``abandoned``, on both paths."""
    state = {"n": 0}

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        while await read_request(reader, conn) is not None:
            state["n"] += 1
            if state["n"] == 1:
                writer.write(response(b"no", "401 Unauthorized"))
                await writer.drain()
                continue
            await reader.read()   # no answer until the proxy closes

    up = await raw_upstream(script)
    raw = oauth2_config(await start(), tmp_path, upstream=up.url())
    raw["routes"][0]["timeout"] = "1s"
    daemon = await make_proxy(raw)
    await wait_ready(daemon)
    conn = await RawConnection.open(daemon.port())
    await conn.send(get("/x"))
    await wait_for(lambda: state["n"] == 2, "the second attempt upstream")
    await conn.close()
    await wait_for(lambda: bool(logs.events("request")), "the access log line")
    [event] = logs.events("request")
    assert (499, True) == (event["status"], event["retried"])
    await asyncio.sleep(1.2)   # the aiohttp path's second attempt times out meanwhile
    counts = retry_counts(daemon)
    assert {"abandoned": 1} == {k: v for k, v in counts.items() if v}, counts


# -- the storm guard by request target (tokens/guard.py, Proxy.token_for_retry) -------------


def unauthorized_refreshes(daemon: Daemon) -> float:
    return sum(
        s.value for family in daemon.registry.collect()
        if family.name == "tokenproxy_token_refresh"
        for s in family.samples
        if s.name.endswith("_total") and s.labels["trigger"] == "unauthorized")


@pytest.mark.both_paths
async def test_a_burst_of_401s_from_new_targets_before_any_retry_makes_at_most_two_refreshes(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    """Held: 60 concurrent requests on 60 distinct refused targets (paths, queries, HEAD and
    GET alike), all 401 while the first refresh is held at the token endpoint, then again
    after it: the burst coalesces on one refresh, and the once-per-window heal adds at most
    one more; every client gets the upstream's 401."""
    idp = await start(lifetime=3600)
    targets = [(("HEAD", "GET")[i % 2], f"/deny/{i}?q={i}") for i in range(60)]
    idp.tap.deny.update(f"/api/deny/{i}" for i in range(60))
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    release = asyncio.Event()
    idp.calls.queue = [gate(release)]
    burst = [asyncio.ensure_future(status_of(http, daemon, path, method))
             for method, path in targets]
    await wait_for(lambda: len(idp.tap.seen) >= 60, "every first attempt refused")
    release.set()
    assert [401] * 60 == await asyncio.gather(*burst)
    second = await asyncio.gather(*[status_of(http, daemon, p + "&again", m) for m, p in targets])
    assert [401] * 60 == second
    assert 1 <= unauthorized_refreshes(daemon) <= 2


async def test_the_storm_guard_allows_two_refreshes_in_any_five_seconds(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    clock: JumpClock,
) -> None:
    """A client walking new refused paths gets the window's refresh and the heal at t;
    at exactly t + 5 s nothing more (a closed 5 s interval holds at most two 401-triggered
    token calls)."""
    idp = await start(lifetime=3600)
    idp.tap.deny.update(f"/api/deny/{i}" for i in range(8))
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    base = unauthorized_refreshes(daemon)
    for i in (0, 1):
        assert 401 == await status_of(http, daemon, f"/deny/{i}")
    await clock.tick(5.0)
    for i in (2, 3):
        assert 401 == await status_of(http, daemon, f"/deny/{i}")
    assert unauthorized_refreshes(daemon) - base <= 2, (
        "more than two 401-triggered token calls within 5 s")


@pytest.mark.both_paths
async def test_a_known_refuser_asked_with_another_query_refreshes_nothing_in_the_window(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    """Held: the target is (route, method, path without the query) on both paths, so a
    refused path asked again with ever new queries stays a known refuser: no token call,
    and the heal is still there for a real revocation on another path."""
    idp = await start(lifetime=3600)
    idp.tap.deny.add("/api/deny")
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    assert 401 == await status_of(http, daemon, "/deny?a=1")   # refresh, refused again
    calls = len(idp.calls.seen)
    for i in range(20):
        assert 401 == await status_of(http, daemon, f"/deny?a={i}&b=%2F{i}")
    assert calls == len(idp.calls.seen)
    idp.issuer.revoke_access()
    assert 200 == await status_of(http, daemon, "/ok?x=1")     # the heal, at once
    assert calls + 1 == len(idp.calls.seen)


# -- the aiohttp path's headers: byte pairs through aiohttp's str multidicts -----------------


def split_token() -> str:
    """The token with a byte that is not UTF-8 in its middle (latin-1 text of the line)."""
    return TOKEN[:8] + "\xff" + TOKEN[8:]


async def fetch_raw(daemon: Daemon, request: bytes) -> RawResponse:
    conn = await RawConnection.open(daemon.port())
    try:
        await conn.send(request)
        return await conn.response()
    finally:
        await conn.close()


@pytest.mark.both_paths
async def test_a_token_split_by_a_non_utf8_byte_in_a_response_header_is_not_reassembled(
    make_proxy: MakeProxy, raw_upstream: Any,
) -> None:
    """An upstream that puts a byte that is not UTF-8 inside the token in a response field
    (so the echo check on bytes does not see the token): the fast path relays the bytes as
    they are (no token); the aiohttp path drops the field whole -- aiohttp would have dropped
    the stray byte alone and joined the token again."""
    up = await raw_upstream(serving_raw(lambda r: response(
        b"ok", "200 OK", "X-Echo: " + split_token(), "X-Other: kept")))
    daemon = await start_proxy(make_proxy, up)
    resp = await fetch_raw(daemon, get("/x"))
    assert 200 == resp.status
    assert ["kept"] == resp.header("X-Other")
    leaked = TOKEN.encode() in resp.raw
    assert not leaked, "the token reached the client"


@pytest.mark.both_paths
async def test_a_token_split_by_a_non_utf8_byte_in_the_reason_phrase_is_not_reassembled(
    make_proxy: MakeProxy, raw_upstream: Any,
) -> None:
    """The same in the reason phrase: the aiohttp path sends the standard phrase instead."""
    up = await raw_upstream(serving_raw(lambda r: response(b"ok", "403 " + split_token())))
    daemon = await start_proxy(make_proxy, up)
    resp = await fetch_raw(daemon, get("/x"))
    assert 403 == resp.status
    leaked = TOKEN.encode() in resp.raw
    assert not leaked, "the token reached the client"


@pytest.mark.both_paths
async def test_header_bytes_that_are_not_utf8_pass_unchanged_or_not_at_all(
    make_proxy: MakeProxy, raw_upstream: Any, serving_path: str,
) -> None:
    """RFC 9110 field values may hold obs-text (bytes 0x80-0xFF: latin-1 filenames in
    Content-Disposition, legacy cookies). The fast path relays them byte for byte. aiohttp
    writes header text as UTF-8 and silently drops what is not, so the aiohttp path drops
    such a field whole -- never altered -- and counts the request side
    (tokenproxy_request_headers_dropped_total{reason="not_utf8"})."""
    up = await raw_upstream(serving_raw(lambda r: response(
        b"ok", "200 OK", "Content-Disposition: attachment; filename=\"caf\xe9.txt\"")))
    daemon = await start_proxy(make_proxy, up)
    resp = await fetch_raw(daemon, get("/x", "localhost", "X-Name: caf\xe9"))
    sent = [r.get("X-Name") for r in up.requests]
    disposition = resp.header("Content-Disposition")
    if serving_path == "fast":
        assert ["caf\xe9"] == sent
        assert ['attachment; filename="caf\xe9.txt"'] == disposition
    else:
        assert [None] == sent
        assert [] == disposition
        assert 1.0 == count(daemon, "tokenproxy_request_headers_dropped_total",
                            reason="not_utf8")


# -- proxy/failures.py: one classifier for both clients --------------------------------------


async def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port: int = sock.getsockname()[1]
    sock.close()
    return port


def _upstream_fault(kind: str) -> Callable[..., Awaitable[None]]:
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
    make_proxy: MakeProxy, raw_upstream: Any, fault: str, status: int, kind: str,
) -> None:
    """Held: each upstream failure gets the same answer and metric kind on both paths
    (refused connect, reset, a malformed head, EOF before a head, no answer within the
    route timeout, TLS to a plain server)."""
    if fault == "refused":
        url = f"http://127.0.0.1:{await _closed_port()}/"
    else:
        up = await raw_upstream(_upstream_fault(fault))
        url = up.url().replace("http://", "https://") if fault == "tls" else up.url()
    route = {"prefix": "/", "upstream": url, "provider": "api", "timeout": "1s"}
    daemon = await make_proxy(proxy_config(url, TOKEN, routes=[route]))
    resp = await fetch_raw(daemon, get("/x"))
    assert status == resp.status
    assert 1 == count(daemon, "tokenproxy_upstream_errors_total", route="/", kind=kind)


# -- reload.py: a failed reload changes nothing -----------------------------------------------


def _self_signed(tmp_path: Path) -> Path:
    key, crt = tmp_path / "key.pem", tmp_path / "ca.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(crt), "-days", "1", "-subj", "/CN=127.0.0.1"],
        check=True, capture_output=True, timeout=30)
    return crt


async def _serves_with(daemon: Daemon, up: Any, token: str) -> None:
    """A request on the daemon's first listener reaches the upstream with *token*."""
    before = len(up.requests)
    resp = await fetch_raw(daemon, get("/x"))
    assert 200 == resp.status
    assert f"Bearer {token}" == up.requests[before].get("Authorization")


async def _admin_answers(daemon: Daemon) -> bool:
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{daemon.admin_port}/healthz") as r:
        return r.status == 200


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["admin_bind", "provider_build", "route_tls"])
async def test_a_failed_reload_leaves_listeners_providers_and_routes_as_they_were(
    make_proxy: MakeProxy, raw_upstream: Any, tmp_path: Path, failing: str,
) -> None:
    """Held: a reload that adds a proxy listener and changes the provider fails late --
    the admin address is taken, the provider's CA bundle went bad after the file was read,
    or the route's did -- and nothing moves: the new listener is closed again (its socket
    file gone), the old listeners and admin listener serve, the old token is sent."""
    up = await raw_upstream(serving_raw(lambda r: response(b"ok")))
    daemon = await make_proxy(proxy_config(up.url(), TOKEN))
    old_config, old_source = daemon.config, daemon.source("api")
    ca = _self_signed(tmp_path)
    sock_path = tmp_path / "new.sock"
    raw = proxy_config(up.url(), TOKEN_2, listen=["127.0.0.1:0", f"unix:{sock_path}"],
                       state_path=str(tmp_path / "state.json"))
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    if failing == "admin_bind":
        raw["admin_listen"] = f"127.0.0.1:{busy.getsockname()[1]}"
    elif failing == "provider_build":
        raw["providers"] = {"api": {"type": "oauth2", "token_url": "https://127.0.0.1:1/t",
                                    "client_id": "c", "client_secret": "s",
                                    "ca_file": str(ca)}}
    else:
        raw["routes"][0]["ca_file"] = str(ca)
    new = build_config(raw, {})
    ca.write_text("not a certificate\n")   # after the file was read: the build step fails
    try:
        with pytest.raises((ListenError, ssl.SSLError)) as failed:
            await daemon.reload(new)
    finally:
        busy.close()
    assert isinstance(failed.value, ssl.SSLError) == (failing != "admin_bind")
    assert not sock_path.exists(), "the listener the failed reload bound is still there"
    assert daemon.config is old_config
    assert daemon.source("api") is old_source
    assert 1 == len(daemon.listeners)
    await _serves_with(daemon, up, TOKEN)
    assert await _admin_answers(daemon)


async def test_a_refused_websocket_handshake_names_no_server_version(
    make_proxy: MakeProxy, raw_upstream: Any,
) -> None:
    """A refused handshake is passed back without aiohttp's ``Server: Python/...
    aiohttp/...`` (it names versions), as every other answer."""
    up = await raw_upstream(serving_raw(lambda r: response(b"no", "403 Forbidden")))
    daemon = await start_proxy(make_proxy, up)
    resp = await fetch_raw(daemon, get("/ws", "localhost", "Upgrade: websocket",
                                       "Connection: Upgrade", "Sec-WebSocket-Version: 13",
                                       "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="))
    assert 403 == resp.status
    assert [] == resp.header("Server")


@pytest.mark.both_paths
async def test_a_response_field_named_after_the_token_does_not_reach_the_client(
    make_proxy: MakeProxy, raw_upstream: Any,
) -> None:
    """The echo check looks at field names too: an upstream that names a field after the
    token does not get it to the client, on either path."""
    up = await raw_upstream(serving_raw(lambda r: response(
        b"ok", "200 OK", f"X-Seen-{TOKEN}: 1", "X-Other: kept")))
    daemon = await start_proxy(make_proxy, up)
    resp = await fetch_raw(daemon, get("/x"))
    assert ["kept"] == resp.header("X-Other")
    leaked = TOKEN.encode() in resp.raw
    assert not leaked, "the token reached the client"


@pytest.mark.both_paths
async def test_a_401_whose_body_stalls_does_not_hold_the_request_past_the_route_timeout(
    start: StartIdp, make_proxy: MakeProxy, raw_upstream: Any, tmp_path: Path,
) -> None:
    """A 401 with ``Content-Length: 1000`` whose body stalls after 3 bytes: the refused
    answer is not read (as on the fast path), its connection is closed, and the request is
    sent again at once."""
    state = {"n": 0}

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        while await read_request(reader, conn) is not None:
            state["n"] += 1
            if state["n"] == 1:
                writer.write(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 1000\r\n\r\nabc")
                await writer.drain()
                await reader.read()   # stall until the proxy closes
                return
            writer.write(response(b"ok"))
            await writer.drain()

    up = await raw_upstream(script)
    raw = oauth2_config(await start(), tmp_path, upstream=up.url())
    raw["routes"][0]["timeout"] = "1s"
    daemon = await make_proxy(raw)
    await wait_ready(daemon)
    conn = await RawConnection.open(daemon.port())
    try:
        await conn.send(get("/x"))
        try:
            status = (await conn.response(timeout=3)).status
        except TimeoutError:
            status = None
    finally:
        await conn.close()
    assert 200 == status, "no answer within 3 s: the request hangs on the refused body"
