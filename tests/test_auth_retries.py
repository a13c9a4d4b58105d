"""A request the upstream refuses with 401 (a ``retry_on`` status), sent again with a fresh
token: what is sent again (a small body replayed, a large one streamed once and its 401 passed
back), what the client gets when the second attempt fails upstream or the client leaves, and
how each case is counted -- tokenproxy_auth_retries_total by outcome, which must agree with the
requests the access log shows ``retried: true`` (docs/metrics.md), on both paths.

Everything runs on 127.0.0.1 with bounded waits; the daemons and the issuer share the fake
clock.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers.client import fetch, status_of
from tests.helpers.config import MakeProxy
from tests.helpers.idp import UNAVAILABLE, StartIdp, oauth2_config, respond_json
from tests.helpers.logs import CapturedLogs, failures, installed
from tests.helpers.metrics import count, refreshes, retry_counts
from tests.helpers.rawhttp import RawConnection, get
from tests.helpers.rawupstream import MakeRaw, Script, UpConn, connected, read_request, response
from tests.helpers.wait import request_event, settle, wait_for, wait_ready
from tokenproxy.daemon import Daemon

# -- what is sent again -------------------------------------------------------------------------


async def test_small_post_body_replayed_after_401(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A POST refused with 401 is retried with the new token and the same body bytes."""
    idp = await start()
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    idp.issuer.revoke_all()
    body = bytes(range(256)) * 3
    resp = await fetch(http, daemon, "/upload", method="POST", data=body)
    assert 200 == resp.status
    first, second = idp.tap.seen
    assert (body, body) == (first.body, second.body)
    assert first.bearer != second.bearer
    assert 1 == count(daemon, "tokenproxy_auth_retries_total", route="/", outcome="success")


async def _chunked(size: int) -> AsyncIterator[bytes]:
    for i in range(size // 512):
        yield bytes([i % 251]) * 512


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
async def test_body_over_max_replay_streamed_and_its_401_passed_back(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    framing: str, logs: CapturedLogs,
) -> None:
    """A body over max_replay_body is streamed once and its 401 passed back (skipped)."""
    idp = await start()
    daemon = await make_proxy(oauth2_config(idp, tmp_path,
                                            top={"limits": {"max_replay_body": "1KiB"}}))
    await wait_ready(daemon)
    idp.issuer.revoke_all()
    expected = b"".join([chunk async for chunk in _chunked(4096)])
    data: Any = expected if framing == "content-length" else _chunked(4096)
    resp = await fetch(http, daemon, "/upload", method="POST", data=data)
    assert 401 == resp.status
    assert {"error": "invalid_token"} == resp.json()
    assert 'Bearer error="invalid_token"' == resp.headers["WWW-Authenticate"]
    [seen] = idp.tap.seen
    assert expected == seen.body
    assert 1 == count(daemon, "tokenproxy_auth_retries_total", route="/", outcome="skipped")
    await wait_for(lambda: refreshes(daemon, "unauthorized") == 1, "the refresh")
    await wait_for(lambda: installed(logs, "unauthorized") == 1, "the new token in use")
    assert 200 == (await fetch(http, daemon, "/upload", method="POST", data=expected)).status
    assert 2 == len(idp.calls.seen)


@pytest.mark.slow
async def test_failed_background_refresh_after_a_skipped_retry_is_quiet(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    logs: CapturedLogs,
) -> None:
    """A failed background refresh after a skipped retry is logged once, not as a crash."""
    idp = await start()
    daemon = await make_proxy(oauth2_config(idp, tmp_path,
                                            top={"limits": {"max_replay_body": "1KiB"}}))
    await wait_ready(daemon)
    idp.calls.default = UNAVAILABLE
    idp.issuer.revoke_all()
    resp = await fetch(http, daemon, "/upload", method="POST", data=b"x" * 4096)
    assert 401 == resp.status
    await wait_for(lambda: refreshes(daemon, "unauthorized", "failure") == 1, "the failure")
    await settle()
    gc.collect()
    await settle()
    assert ["client_credentials grant: status 503 (temporarily_unavailable)"] == failures(logs)
    assert [] == [e for e in logs.events() if e["level"] == "error"]


async def test_second_401_passed_back_as_sent(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    logs: CapturedLogs,
) -> None:
    """A 401 with the fresh token is passed back as sent; the next one does not refresh."""
    idp = await start()
    idp.tap.deny.add("/api/deny")
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    resp = await fetch(http, daemon, "/deny")
    assert (401, b"denied-by-upstream") == (resp.status, resp.body)
    assert 'Bearer error="insufficient_scope"' == resp.headers["WWW-Authenticate"]
    old, new = idp.tap.bearers("/api/deny")
    assert old != new
    assert 2 == len(idp.calls.seen)
    assert 1 == count(daemon, "tokenproxy_auth_retries_total", route="/", outcome="failure")
    resp = await fetch(http, daemon, "/deny")
    assert 401 == resp.status
    assert 2 == len(idp.calls.seen)
    # Not sent again: counted as such, as the access log says (retried: false).
    assert 1 == count(daemon, "tokenproxy_auth_retries_total", route="/", outcome="failure")
    assert 1 == count(daemon, "tokenproxy_auth_retries_total", route="/",
                      outcome="no_new_token")
    assert 0 == count(daemon, "tokenproxy_auth_retries_total", route="/", outcome="success")
    assert [True, False] == [e["retried"] for e in logs.events("request")]


# -- a second attempt that fails upstream ------------------------------------------------------


REFUSED = response(b"no", "401 Unauthorized")

Then = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def refused_once(then: Then) -> Script:
    """A raw upstream script: the very first request (over every connection) gets a 401;
    each later one is left to then(reader, writer), and its connection ends after that."""
    refused = False

    async def script(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                     conn: UpConn) -> None:
        nonlocal refused
        while await read_request(reader, conn) is not None:
            if not refused:
                refused = True
                writer.write(REFUSED)
                await writer.drain()
                continue
            await then(reader, writer)
            return

    return script


async def handshake_refused(daemon: Daemon) -> int:
    """The status of a WebSocket handshake the client sees refused."""
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            async with s.ws_connect(f"ws://127.0.0.1:{daemon.port()}/ws"):
                pass
    return refused.value.status


async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """No answer: the connection is cut at once."""
    writer.transport.abort()


async def silent_then_cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """No answer until the proxy gives up and closes; then cut."""
    await reader.read()
    writer.transport.abort()


@pytest.mark.both_paths
async def test_a_401_whose_body_stalls_does_not_hold_the_request_past_the_route_timeout(
    start: StartIdp, make_proxy: MakeProxy, raw_upstream: MakeRaw, tmp_path: Path,
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
    async with connected(daemon.port()) as conn:
        await conn.send(get("/x"))
        try:
            status = (await conn.response(timeout=3)).status
        except TimeoutError:
            status = None
    assert 200 == status, "no answer within 3 s: the request hangs on the refused body"


@pytest.mark.slow
@pytest.mark.both_paths
@pytest.mark.parametrize("after_401", ["reset", "hang"])
async def test_a_retry_that_fails_upstream_is_counted_as_upstream_error(
    start: StartIdp, make_proxy: MakeProxy, raw_upstream: MakeRaw, tmp_path: Path,
    http: aiohttp.ClientSession, logs: CapturedLogs, after_401: str,
) -> None:
    """A request refused with 401, sent again with a fresh token, whose second attempt
    then fails upstream (reset: 502; no answer: 504) is logged ``retried: true`` and counted
    once, as ``upstream_error``: the outcomes of sent-again requests are exactly the requests
    the access log shows retried, on both paths."""
    up = await raw_upstream(refused_once(cut if after_401 == "reset" else silent_then_cut))
    raw = oauth2_config(idp := await start(), tmp_path, upstream=up.url())
    raw["routes"][0]["timeout"] = "1s"
    daemon = await make_proxy(raw)
    await wait_ready(daemon)
    status = await status_of(http, daemon, "/x")
    assert status == (502 if after_401 == "reset" else 504)
    assert 2 == len(idp.calls.seen)   # the first token and the 401's refresh
    event = await request_event(logs)
    assert event["retried"] is True
    counts = retry_counts(daemon)
    assert 1 == counts["upstream_error"] == sum(counts.values()), counts


async def test_a_websocket_retry_that_fails_upstream_is_counted_as_upstream_error(
    start: StartIdp, make_proxy: MakeProxy, raw_upstream: MakeRaw, tmp_path: Path,
    logs: CapturedLogs,
) -> None:
    """A WebSocket handshake refused with 401, sent again with a fresh token, whose second
    connection is cut: the client gets 502, the access log says ``retried: true``, and the
    retry is counted once, as ``upstream_error``."""
    up = await raw_upstream(refused_once(cut))
    daemon = await make_proxy(oauth2_config(idp := await start(), tmp_path, upstream=up.url()))
    await wait_ready(daemon)
    assert 502 == await handshake_refused(daemon)
    assert 2 == len(idp.calls.seen)
    event = await request_event(logs)
    assert event["retried"] is True
    counts = retry_counts(daemon)
    assert 1 == counts["upstream_error"] == sum(counts.values()), counts


async def test_a_websocket_retry_answered_without_an_upgrade_is_counted_once(
    start: StartIdp, make_proxy: MakeProxy, raw_upstream: MakeRaw, tmp_path: Path,
    logs: CapturedLogs,
) -> None:
    """A handshake refused with 401 and retried, whose retry the upstream answers with a
    plain 200 (no upgrade): the client gets 502, the log says retried, and the retry is
    counted once -- as success, since the upstream did not refuse the new token; the failed
    upgrade is an upstream error of its own."""
    async def plain_200(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(response(b"x", "200 OK"))
        await writer.drain()

    up = await raw_upstream(refused_once(plain_200))
    daemon = await make_proxy(oauth2_config(await start(), tmp_path, upstream=up.url()))
    await wait_ready(daemon)
    assert 502 == await handshake_refused(daemon)
    event = await request_event(logs)
    assert event["retried"] is True
    counts = retry_counts(daemon)
    assert {"success": 1} == {k: v for k, v in counts.items() if v}, counts


@pytest.mark.slow
@pytest.mark.both_paths
async def test_a_retried_request_whose_client_leaves_is_counted_as_abandoned(
    start: StartIdp, make_proxy: MakeProxy, raw_upstream: MakeRaw, tmp_path: Path,
    logs: CapturedLogs,
) -> None:
    """A request refused with 401 is sent again with a fresh token; the client hangs up
    while the second attempt waits for its answer. The access log says ``retried: true``
    (status 499), and the retry is counted once, as ``abandoned``, on both paths."""
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()   # no answer until the proxy closes

    up = await raw_upstream(refused_once(silent))
    raw = oauth2_config(await start(), tmp_path, upstream=up.url())
    raw["routes"][0]["timeout"] = "1s"
    daemon = await make_proxy(raw)
    await wait_ready(daemon)
    conn = await RawConnection.open(daemon.port())
    await conn.send(get("/x"))
    await wait_for(lambda: len(up.requests) == 2, "the second attempt upstream")
    await conn.close()
    event = await request_event(logs)
    assert (499, True) == (event["status"], event["retried"])
    await asyncio.sleep(1.2)   # the aiohttp path's second attempt times out meanwhile
    counts = retry_counts(daemon)
    assert {"abandoned": 1} == {k: v for k, v in counts.items() if v}, counts


# -- every outcome counted once, as the access log says ---------------------------------------


@pytest.mark.both_paths
@pytest.mark.parametrize("issuer_answer", [500, 400])
async def test_a_401_whose_refresh_fails_is_counted_as_no_new_token(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    issuer_answer: int,
) -> None:
    """A 401 whose refresh then fails -- the token endpoint down (503 token_unavailable)
    or rejecting the client (502 unauthenticated) -- is not sent again because no newer token
    could be had, and is counted so (``no_new_token``): the one situation where the 401s
    matter most is not invisible in the metric."""
    idp = await start()
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    idp.issuer.revoke_access()
    idp.calls.default = respond_json({"error": "server_error" if issuer_answer == 500
                                      else "invalid_client"}, issuer_answer)
    assert (503 if issuer_answer == 500 else 502) == await status_of(http, daemon, "/ok")
    assert 1 == sum(retry_counts(daemon).values()), retry_counts(daemon)


@pytest.mark.both_paths
async def test_retry_outcomes_agree_with_the_log_for_refused_skipped_and_no_new_token(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    logs: CapturedLogs,
) -> None:
    """A scope 401 (retried once: failure), the next one inside the window
    (no_new_token), a streamed body's 401 (skipped) and a revoked token (success) are each
    counted once, and success+failure equals the requests logged ``retried: true``."""
    idp = await start()
    idp.tap.deny.add("/api/deny")
    raw = oauth2_config(idp, tmp_path, top={"limits": {"max_replay_body": "1KiB"}})
    daemon = await make_proxy(raw)
    await wait_ready(daemon)
    assert 401 == await status_of(http, daemon, "/deny")
    assert 401 == await status_of(http, daemon, "/deny")
    async with http.post(f"http://127.0.0.1:{daemon.port()}/deny", data=b"x" * 4096) as r:
        await r.read()
        assert 401 == r.status
    assert 200 == await status_of(http, daemon, "/ok")
    idp.issuer.revoke_access()
    assert 200 == await status_of(http, daemon, "/ok")
    await wait_for(lambda: len(logs.events("request")) == 5, "five access log lines")
    counts = retry_counts(daemon)
    retried = sum(1 for e in logs.events("request") if e["retried"])
    assert counts["success"] + counts["failure"] + counts["upstream_error"] == retried
    assert {"success": 1, "failure": 1, "upstream_error": 0, "abandoned": 0, "skipped": 1,
            "no_new_token": 1} == counts
