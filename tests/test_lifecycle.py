"""The daemon as a process: signals and draining, listeners, stderr format, start-up failures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import stat
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.helpers.config import MakeProxy, proxy_config, upstream_url, write_config
from tests.helpers.daemon_proc import run_to_exit, running_daemon
from tests.helpers.fakes import (
    CLIENT_KEY,
    CLIENT_SECRET,
    PASSWORD,
    REFRESH_TOKEN,
    SECRETS,
    TOKEN,
    TOKEN_2,
    FakeUpstream,
)
from tests.helpers.net import busy_port, free_port, refused
from tests.helpers.wait import wait_for

pytestmark = pytest.mark.slow

UNREACHABLE = "http://127.0.0.1:9/"   # discard port: never contacted by these tests


async def get(session: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with session.get(url) as resp:
        return resp.status, await resp.read()


async def upstream_saw(fake: FakeUpstream, prefix: str, timeout: float = 5.0) -> None:
    await wait_for(lambda: any(s.raw_path.startswith(prefix) for s in fake.seen),
                   f"the upstream to receive {prefix}", timeout)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_signal_finishes_inflight_request_and_exits_0(
    sig: signal.Signals, upstream: TestServer, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A signal stops new connections at once, lets a 1 s request finish with 200, then exit 0."""
    raw = proxy_config(upstream_url(upstream), TOKEN, shutdown_grace="5s")
    async with running_daemon(raw, tmp_path) as daemon, aiohttp.ClientSession() as session:
        port, admin_port = daemon.port(), daemon.admin_port
        request = asyncio.create_task(get(session, daemon.url("/slow?delay=1")))
        await upstream_saw(fake_upstream, "/slow")
        signalled = time.monotonic()
        daemon.send_signal(sig)
        await daemon.wait_for_event("shutdown")
        await wait_for(lambda: refused(port), "the proxy port to refuse connections", 2.0)
        await wait_for(lambda: refused(admin_port), "the admin port to refuse connections", 2.0)
        assert not request.done(), "the drain must overlap the in-flight request"
        status, body = await asyncio.wait_for(request, 5.0)
        code = await daemon.wait(timeout=6.0)
        took = time.monotonic() - signalled
    assert (200, b"slow") == (status, body)
    assert 0 == code
    assert took < 3.0, f"exit took {took:.2f}s: the drain should end with the last request"
    assert sig.name == daemon.events("shutdown")[0]["signal"]
    assert "stopped" == daemon.events()[-1]["event"]


async def test_request_past_grace_is_cut_and_daemon_exits_0(
    upstream: TestServer, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A request still running when shutdown_grace (0.5 s) ends is cut; exit 0 right after."""
    raw = proxy_config(upstream_url(upstream), TOKEN, shutdown_grace="500ms")
    async with running_daemon(raw, tmp_path) as daemon, aiohttp.ClientSession() as session:
        request = asyncio.create_task(get(session, daemon.url("/slow?delay=5")))
        await upstream_saw(fake_upstream, "/slow")
        signalled = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        code = await daemon.wait(timeout=4.0)
        took = time.monotonic() - signalled
        outcome: tuple[int, bytes] | BaseException
        try:
            outcome = await asyncio.wait_for(request, 2.0)
        except aiohttp.ClientError as exc:
            outcome = exc
    assert 0 == code
    assert 0.4 <= took < 2.0, f"exit took {took:.2f}s with a 0.5 s grace"
    assert not (isinstance(outcome, tuple) and outcome[0] == 200), outcome


async def test_tcp_and_unix_listeners_serve_together(
    upstream: TestServer, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """TCP and unix listeners both proxy; the socket file is mode 0600 and is removed at exit."""
    sock_path = tmp_path / "tp.sock"
    assert len(str(sock_path)) < 100   # sun_path limit
    raw = proxy_config(upstream_url(upstream), TOKEN,
                       listen=["127.0.0.1:0", f"unix:{sock_path}"])
    async with running_daemon(raw, tmp_path) as daemon:
        assert f"unix:{sock_path}" == daemon.addresses()[1]
        st = os.stat(sock_path)
        assert stat.S_ISSOCK(st.st_mode)
        assert 0o600 == stat.S_IMODE(st.st_mode)
        async with aiohttp.ClientSession() as session:
            tcp = await get(session, daemon.url("/echo/tcp"))
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(str(sock_path))) as s:
            unix = await get(s, "http://localhost/echo/unix")
        daemon.send_signal(signal.SIGTERM)
        code = await daemon.wait(timeout=5.0)
    assert 200 == tcp[0]
    assert 200 == unix[0]
    assert "/echo/tcp" == json.loads(tcp[1])["raw_path"]
    assert "/echo/unix" == json.loads(unix[1])["raw_path"]
    assert [[f"Bearer {TOKEN}"]] * 2 == [s.header("Authorization") for s in fake_upstream.seen]
    assert 0 == code
    assert not sock_path.exists()


async def test_stderr_is_one_json_object_per_line(
    upstream: TestServer, tmp_path: Path
) -> None:
    """Every stderr line is a JSON object with an event key: listening, request, ..., stopped."""
    raw = proxy_config(upstream_url(upstream), TOKEN)
    async with running_daemon(raw, tmp_path) as daemon:
        async with aiohttp.ClientSession() as session:
            status, _ = await get(session, daemon.url("/echo/a?q=query-value"))
        await daemon.wait_for_event("request")
        daemon.send_signal(signal.SIGTERM)
        assert 0 == await daemon.wait(timeout=5.0)
        lines = daemon.stderr.splitlines()
    assert 200 == status
    docs = [json.loads(line) for line in lines]
    assert all(isinstance(d, dict) and "event" in d and "level" in d and "timestamp" in d
               for d in docs), lines
    events = [d["event"] for d in docs]
    assert "listening" == events[0]
    assert "stopped" == events[-1]
    assert events.index("request") < events.index("shutdown")
    [req] = [d for d in docs if d["event"] == "request"]
    assert "/echo/a" == req["path"]
    assert "query-value" not in daemon.stderr


async def test_console_format_gives_human_lines(upstream: TestServer, tmp_path: Path) -> None:
    """log.format console writes readable key=value lines, not JSON."""
    port = free_port()
    raw = proxy_config(upstream_url(upstream), TOKEN, listen=f"127.0.0.1:{port}",
                       log={"level": "info", "format": "console"})
    async with running_daemon(raw, tmp_path, wait_text="listening") as daemon:
        async with aiohttp.ClientSession() as session:
            status, _ = await get(session, f"http://127.0.0.1:{port}/echo/b")
        await daemon.wait_for_text("request")
        daemon.send_signal(signal.SIGTERM)
        assert 0 == await daemon.wait(timeout=5.0)
        lines = daemon.stderr.splitlines()
    assert 200 == status
    for line in lines:
        with pytest.raises(json.JSONDecodeError):
            json.loads(line)
    assert "listening" in lines[0]
    assert f"127.0.0.1:{port}" in lines[0]
    [request] = [line for line in lines if " request " in line]
    assert "path=/echo/b" in request
    assert "status=200" in request
    assert "stopped" in lines[-1]


async def test_stderr_never_shows_a_secret(
    upstream: TestServer, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """At debug level, with secrets in headers, queries and bad requests, stderr shows none."""
    raw = proxy_config(upstream_url(upstream), TOKEN, log={"level": "debug"},
                       security={"client_key": CLIENT_KEY})
    async with running_daemon(raw, tmp_path) as daemon:
        port = daemon.port()
        headers = {"Tokenproxy-Key": CLIENT_KEY, "Authorization": f"Bearer {TOKEN_2}",
                   "Cookie": f"sid={PASSWORD}"}
        async with aiohttp.ClientSession() as session:
            async with session.get(daemon.url(f"/echo/x?access_token={REFRESH_TOKEN}"),
                                   headers=headers) as resp:
                ok = resp.status
            async with session.get(daemon.url("/echo-token"), headers=headers) as resp:
                echoed = resp.status
            async with session.get(daemon.url("/echo/x"),
                                   headers={"Tokenproxy-Key": CLIENT_SECRET}) as resp:
                wrong_key = resp.status
            async with session.get(daemon.url(f"/status/401?password={PASSWORD}"),
                                   headers=headers) as resp:
                unauthorized = resp.status
        # A malformed request that quotes secrets: the 400 must not log the bytes.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"GET /x?token={TOKEN} HTTP/1.1\r\nHost: localhost\r\n"
                     f"Authorization: Bearer {TOKEN}\r\nBad\x00Header: {CLIENT_KEY}\r\n\r\n"
                     .encode())
        await writer.drain()
        bad = await asyncio.wait_for(reader.read(), 5.0)
        writer.close()
        await wait_for(lambda: len(daemon.events("request")) >= 4, "request events", 5.0)
        daemon.send_signal(signal.SIGTERM)
        assert 0 == await daemon.wait(timeout=5.0)
        text = daemon.stderr
    assert (200, 200, 403, 401) == (ok, echoed, wrong_key, unauthorized)
    assert re.match(rb"HTTP/1\.[01] 400 ", bad), bad[:40]
    assert [f"Bearer {TOKEN}"] == fake_upstream.seen[0].header("Authorization")
    assert [] == [s for s in SECRETS if s in text]
    assert "access_token=" not in text
    assert "password=" not in text


@pytest.mark.parametrize("which", ["listen", "admin_listen"])
def test_port_in_use_exits_1_with_one_line(which: str, tmp_path: Path) -> None:
    """A listen or admin port already taken: exit 1, one line naming it, no traceback."""
    with busy_port() as port:
        taken = f"127.0.0.1:{port}"
        raw = proxy_config(UNREACHABLE, TOKEN, **{which: taken})
        result = run_to_exit(["run", "-c", str(write_config(tmp_path, raw))], tmp_path,
                             timeout=20)
    lines = result.stderr.strip().splitlines()
    assert 1 == result.returncode, result.stderr
    assert 1 == len(lines), result.stderr
    assert "Traceback" not in result.stderr
    assert lines[0].startswith("tokenproxy: ")
    assert taken in lines[0]
    assert "in use" in lines[0]
    assert "" == result.stdout


async def test_second_signal_cuts_the_drain(
    upstream: TestServer, fake_upstream: FakeUpstream, tmp_path: Path
) -> None:
    """A second SIGTERM during a long drain ends it at once, still with exit 0."""
    raw = proxy_config(upstream_url(upstream), TOKEN, shutdown_grace="30s")
    async with running_daemon(raw, tmp_path) as daemon, aiohttp.ClientSession() as session:
        request = asyncio.create_task(get(session, daemon.url("/slow?delay=5")))
        await upstream_saw(fake_upstream, "/slow")
        daemon.send_signal(signal.SIGTERM)
        await daemon.wait_for_event("shutdown")
        await asyncio.sleep(0.2)
        assert daemon.proc.poll() is None, "the first signal must wait for the request"
        signalled = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        code = await daemon.wait(timeout=3.0)
        took = time.monotonic() - signalled
        request.cancel()
    assert 0 == code
    assert took < 1.5
    assert [30.0, 0] == [e["grace_s"] for e in daemon.events("shutdown")]


async def test_idle_keepalive_connections_do_not_delay_exit(
    upstream: TestServer, tmp_path: Path
) -> None:
    """Idle keep-alive client connections are closed at shutdown; exit does not wait the grace."""
    raw = proxy_config(upstream_url(upstream), TOKEN, shutdown_grace="10s")
    async with running_daemon(raw, tmp_path) as daemon, aiohttp.ClientSession() as session:
        for _ in range(3):
            assert 200 == (await get(session, daemon.url("/echo/k")))[0]
        signalled = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        code = await daemon.wait(timeout=5.0)
        took = time.monotonic() - signalled
    assert 0 == code
    assert took < 1.5


async def test_stop_with_zero_grace_cuts_at_once(
    make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
) -> None:
    """Daemon.stop(grace=0) cancels in-flight requests at once (aiohttp reads 0 as 'no limit')."""
    daemon = await make_proxy(proxy_config(upstream_url(upstream), TOKEN))
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(get(session, f"http://127.0.0.1:{daemon.port()}/slow"))
        await upstream_saw(fake_upstream, "/slow")
        started = time.monotonic()
        await asyncio.wait_for(daemon.stop(grace=0), 4.0)
        took = time.monotonic() - started
        with contextlib.suppress(aiohttp.ClientError):
            await asyncio.wait_for(request, 2.0)
    assert took < 1.0


async def test_daemon_process_helper_reports_exit_before_listening(tmp_path: Path) -> None:
    """A daemon that dies at start-up fails the wait at once with its stderr, not a timeout."""
    raw = proxy_config(UNREACHABLE, TOKEN, routes="not a list")
    started = time.monotonic()
    with pytest.raises(AssertionError, match="routes"):
        async with running_daemon(raw, tmp_path):
            pass
    assert time.monotonic() - started < 10
