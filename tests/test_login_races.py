"""Logging in as yourself, where it can go wrong (each test was written against a fault an
adversarial pass found, and failed until it was fixed; a docstring's account of the fault
describes the code as it was then): a logout against the daemon's refresh, logins elsewhere,
the shared state, a refresh token rejected, an issuer unreachable or odd, the loopback port
taken."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import io
import json
import os
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.helpers.client import fetch
from tests.helpers.config import MakeProxy, write_config
from tests.helpers.fakes import PASSWORD, JumpClock
from tests.helpers.idp import Idp, StartIdp, mint, respond
from tests.helpers.login import (
    INTERVAL,
    LOGIN_POLL,
    device_login,
    login,
    login_config,
    picked_up,
)
from tests.helpers.logs import CapturedLogs
from tests.helpers.redis_server import RedisServer
from tests.helpers.wait import settle, wait_for
from tokenproxy.clock import Clock
from tokenproxy.config import build_config
from tokenproxy.log import Redactor
from tokenproxy.login import LoginFailed
from tokenproxy.login.flows import MAX_INTERVAL, DeviceStart, _openable
from tokenproxy.login.run import run_login_command

pytestmark = pytest.mark.slow


def revocation_fails() -> Any:
    async def handler(request: web.Request, grant: str) -> web.StreamResponse | None:
        if grant == "revoke":
            return web.json_response({"error": "temporarily_unavailable"}, status=503)
        return None
    return handler


async def ticks(clock: JumpClock, n: int = 3, step: float = LOGIN_POLL) -> None:
    for _ in range(n):
        await clock.tick(step)
        await settle()


async def until_state(clock: JumpClock, state: str, *daemons: Any) -> None:
    """One login poll of the clock goes by, then every daemon's provider 'me' must be in
    *state* (waited for in real time: a busy machine is slow to run it). A second poll is
    allowed for a daemon that was between two naps when the clock moved."""
    def there() -> bool:
        return all(d.source("me").describe()["state"] == state for d in daemons)

    for _ in range(2):
        await clock.tick(LOGIN_POLL)
        with contextlib.suppress(AssertionError):
            await wait_for(there, state, timeout=2)
            return
    raise AssertionError(f"not {state}: {[d.source('me').describe() for d in daemons]}")


def stored(tmp_path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((tmp_path / "state" / "state.json").read_text())
    [entry] = doc["providers"].values()
    return dict(entry)


# -- a logout is not undone ------------------------------------------------------------------


async def test_a_renewal_right_after_a_logout_does_not_undo_it(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """A 401 within the second after a logout (whose revocation failed) made the daemon
    spend the refresh token it held in memory and write fresh tokens over the logout."""
    idp = await start(lifetime=600.0)
    raw = login_config(idp, tmp_path)
    daemon = await make_proxy(raw)
    assert 0 == await device_login(idp, raw, clock)
    await picked_up(clock, http, daemon)
    idp.calls.default = revocation_fails()
    out = io.StringIO()
    assert 0 == await login(raw, clock, "me", command="logout", out=out)
    assert "not revoked" in out.getvalue() or "answered 503" in out.getvalue()
    idp.tap.deny.add("/api/hello")      # the upstream refuses the token once
    await fetch(http, daemon, "/hello")
    idp.tap.deny.clear()
    await until_state(clock, "login_required", daemon)
    assert 503 == (await fetch(http, daemon, "/hello")).status
    assert not stored(tmp_path).get("refresh_token")


async def test_a_logout_is_noticed_while_the_token_waits_for_a_request(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """refresh_margin 0: with its token expired the daemon napped until a request, never
    looking at the store, and the next request undid the logout."""
    idp = await start(lifetime=60.0)
    raw = login_config(idp, tmp_path, refresh_margin="0s")
    daemon = await make_proxy(raw)
    assert 0 == await device_login(idp, raw, clock)
    await picked_up(clock, http, daemon)
    await ticks(clock, 1, 61)
    idp.calls.default = revocation_fails()
    assert 0 == await login(raw, clock, "me", command="logout")
    await until_state(clock, "login_required", daemon)
    assert 503 == (await fetch(http, daemon, "/hello")).status


async def test_a_logout_while_the_issuer_is_unreachable_still_deletes(
    start: StartIdp, clock: JumpClock, tmp_path: Path,
) -> None:
    """The issuer offline: logout raised a traceback before deleting anything, and the
    tokens stayed stored (and served)."""
    idp = await start()
    raw = login_config(idp, tmp_path)
    assert 0 == await device_login(idp, raw, clock)
    await idp.server.close()
    out = io.StringIO()
    assert 0 == await login(raw, clock, "me", command="logout", out=out)
    assert "not revoked at the issuer" in out.getvalue()
    entry = stored(tmp_path)
    assert not entry.get("refresh_token")
    assert not entry.get("access_token")


# -- logins elsewhere, and the shared state ---------------------------------------------------


async def approve_login_as(idp: Idp, raw: dict[str, Any], clock: Clock, user: str) -> int:
    task = asyncio.ensure_future(run_login_command(
        build_config(raw, {}), "login", ["me"], out=io.StringIO(), redactor=Redactor(),
        no_browser=True, clock=clock))
    await wait_for(lambda: bool(idp.issuer.pending_user_codes) or task.done(), "the code")
    idp.issuer.approve(idp.issuer.pending_user_codes[0], user=user)
    assert isinstance(clock, JumpClock)
    for _ in range(20):
        if task.done():
            break
        await clock.tick(INTERVAL)
        await settle()
    return await asyncio.wait_for(task, 5)


async def test_a_login_as_someone_else_is_taken_within_a_second(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """The command said the running daemon takes a new login within a second; a daemon
    already logged in kept serving the previous person until its own refresh."""
    idp = await start(lifetime=3600.0, users={"demo": PASSWORD, "alice": "pw"})
    raw = login_config(idp, tmp_path)
    daemon = await make_proxy(raw)
    assert 0 == await approve_login_as(idp, raw, clock, "demo")
    assert "demo" == (await picked_up(clock, http, daemon))["hello"]
    assert 0 == await approve_login_as(idp, raw, clock, "alice")
    await ticks(clock, 2)
    assert b'"alice"' in (await fetch(http, daemon, "/hello")).body


def redis_config(idp: Idp, tmp_path: Path, redis: RedisServer) -> dict[str, Any]:
    raw = login_config(idp, tmp_path)
    del raw["state_path"]
    raw["shared_state"] = {"redis_url": redis.url, "timeout": "0.5s", "lock_ttl": "3s"}
    return raw


class Behind:
    """Another machine's clock, two minutes behind the daemon's."""

    def __init__(self, clock: JumpClock) -> None:
        self._clock = clock

    def time(self) -> float:
        return self._clock.time() - 120

    def monotonic(self) -> float:
        return self._clock.monotonic()

    async def sleep(self, seconds: float) -> None:
        await self._clock.sleep(seconds)


async def test_through_redis_two_replicas_take_a_login_and_a_logout_from_a_clock_behind(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession, redis_server: RedisServer,
) -> None:
    """With shared_state the login lands in Redis, both replicas serve it, and a logout run
    on a machine whose clock is behind is noticed by both (it was judged by wall time)."""
    idp = await start(lifetime=600.0)
    raw = redis_config(idp, tmp_path, redis_server)
    a, b = await make_proxy(raw), await make_proxy(raw)
    assert 0 == await device_login(idp, raw, clock)
    assert "demo" == (await picked_up(clock, http, a))["hello"]
    assert "demo" == (await picked_up(clock, http, b))["hello"]
    idp.calls.default = revocation_fails()
    assert 0 == await run_login_command(build_config(raw, {}), "logout", ["me"],
                                        out=io.StringIO(), redactor=Redactor(),
                                        no_browser=True, clock=Behind(clock))
    await until_state(clock, "login_required", a, b)


# -- a rejected refresh token -----------------------------------------------------------------


async def test_after_a_rejected_refresh_status_and_login_agree_with_the_daemon(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession, logs: CapturedLogs,
) -> None:
    """The rejected refresh token stayed stored: status said 'logged in' (exit 0), login
    without a name found nothing to do, and each reload presented the token again."""
    idp = await start(lifetime=60.0)
    raw = login_config(idp, tmp_path)
    daemon = await make_proxy(raw)
    assert 0 == await device_login(idp, raw, clock)
    await picked_up(clock, http, daemon)
    idp.issuer.revoke_all()
    await ticks(clock, 4, 30)
    assert "login_required" == daemon.source("me").describe()["state"]
    out = io.StringIO()
    assert 1 == await login(raw, clock, command="status", out=out)
    assert "me: login required: run tokenproxy login me" in out.getvalue()
    refreshes = idp.calls.grants().count("refresh_token")
    lines = len(logs.events("login_required"))
    for n in range(3):   # unrelated reloads
        raw = dict(raw, routes=[*raw["routes"], {"prefix": f"/r{n}", "provider": "me",
                                                 "upstream": idp.url + "/api/"}])
        await daemon.reload(build_config(raw, {}))
        await ticks(clock)
    assert refreshes == idp.calls.grants().count("refresh_token")
    assert lines == len(logs.events("login_required"))
    task = asyncio.ensure_future(login(raw, clock))   # no name: this provider needs one
    await wait_for(lambda: bool(idp.issuer.pending_user_codes), "a login started")
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# -- odd issuers, a taken port -----------------------------------------------------------------


def test_a_device_interval_is_bounded() -> None:
    """interval 5000 (meant in milliseconds?) left the person 83 minutes without a poll;
    1e308 forever."""
    for interval in (5000, 1e308):
        start = DeviceStart.parse({"device_code": "d", "user_code": "U", "expires_in": 600,
                                   "verification_uri": "https://x/device",
                                   "interval": interval})
        assert MAX_INTERVAL == start.interval


@pytest.mark.parametrize(("url", "issuer", "opened"), [
    ("https://login.example.com/device?c=1", "https://login.example.com/device", True),
    ("http://127.0.0.1:9/device", "http://127.0.0.1:9/oauth/device", True),
    ("http://evil.example/device", "https://login.example.com/device", False),
    ("file:///etc/passwd", "https://login.example.com/device", False),
    ("javascript:alert(1)", "https://login.example.com/device", False),
    ("x-scheme-handler://run", "https://login.example.com/device", False),
])
def test_only_web_pages_are_handed_to_the_browser(url: str, issuer: str, opened: bool) -> None:
    assert opened == _openable(url, issuer)


async def test_a_taken_redirect_port_is_a_plain_failure(
    start: StartIdp, clock: JumpClock, tmp_path: Path,
) -> None:
    idp = await start()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        raw = login_config(idp, tmp_path, grant="authorization_code",
                           redirect_port=taken.getsockname()[1])
        with pytest.raises(LoginFailed, match="set redirect_port"):
            await login(raw, clock, "me")


async def test_status_exits_1_when_the_shared_state_does_not_answer(
    start: StartIdp, clock: JumpClock, tmp_path: Path, redis_server: RedisServer,
) -> None:
    idp = await start()
    raw = redis_config(idp, tmp_path, redis_server)
    redis_server.stop()
    out = io.StringIO()
    assert 1 == await login(raw, clock, command="status", out=out)
    assert "does not answer" in out.getvalue()
    config = write_config(tmp_path / "cfg", raw)
    assert config.exists()


# -- a second adversarial pass -----------------------------------------------------------------


async def test_a_logout_that_waited_for_the_lock_behind_a_refresh_is_not_lost(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """The state file has no version: a logout that read the clock, then waited for the
    lock while the daemon's refresh took it, was no newer than the daemon's entry by time,
    and the daemon took it for old news. Tried until the daemon gets the lock first (flock
    does not queue fairly), at most 8 times; every outcome must be a logout."""
    idp = await start(lifetime=600.0)
    raw = login_config(idp, tmp_path)
    daemon = await make_proxy(raw)
    source: Any = daemon.source("me")
    states = []
    for _ in range(8):
        idp.calls.default = None
        assert 0 == await device_login(idp, raw, clock)
        await picked_up(clock, http, daemon)
        idp.calls.default = revocation_fails()
        lock = source._store.state._lock_path(source.key)
        fd = os.open(lock, os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)      # someone (a status, another command) holds it
        logout = asyncio.ensure_future(login(raw, clock, "me", command="logout"))
        await asyncio.sleep(0.1)            # the logout waits for the lock
        refreshes = idp.calls.grants().count("refresh_token")
        renewal = asyncio.ensure_future(source._refresh("expiry", waiter=False))
        await asyncio.sleep(0.1)
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
        assert 0 == await logout
        with contextlib.suppress(Exception):
            await renewal
        await ticks(clock)
        states.append(source.describe()["state"])
        assert not stored(tmp_path).get("refresh_token")
        if idp.calls.grants().count("refresh_token") > refreshes:
            break   # the daemon did refresh while the logout waited: the case in question
    assert ["login_required"] * len(states) == states


async def test_an_error_field_in_a_json_login_answer_is_not_an_oauth_error(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """An app's login API (Go, `Error string` without omitempty) answers 200 with the token
    and "error": "": that is a success, not an OAuth error (those are the token endpoint's)."""
    idp = await start()

    async def app_login(request: web.Request, grant: str) -> web.StreamResponse | None:
        if grant != "json_login":
            return None
        token = mint(idp.issuer)["access_token"]
        return web.json_response({"token": token, "expiresIn": 600, "error": ""})

    idp.calls.default = app_login
    provider = {"type": "json", "login": {"url": idp.url + "/auth/login", "json": {},
                                          "access_token": "/token", "expires_in": "/expiresIn"}}
    daemon = await make_proxy(login_config(idp, tmp_path) | {
        "providers": {"me": provider}})
    assert 200 == (await fetch(http, daemon, "/hello")).status


async def test_an_outage_answered_with_200_is_retried_not_a_logout(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """200 {"error": "temporarily_unavailable"} to a refresh logged the person out for good
    and cleared the store; the same at 503 was retried. Both are retried now."""
    idp = await start(lifetime=60.0)
    raw = login_config(idp, tmp_path)
    daemon = await make_proxy(raw)
    assert 0 == await device_login(idp, raw, clock)
    await picked_up(clock, http, daemon)
    idp.calls.default = respond(200, '{"error": "temporarily_unavailable"}')
    await ticks(clock, 8, 10)
    assert "login_required" != daemon.source("me").describe()["state"]
    idp.calls.default = None
    await ticks(clock, 40, 2)
    assert 200 == (await fetch(http, daemon, "/hello")).status


@pytest.mark.parametrize(("status", "body", "kind"), [
    (403, "<html><h1>Access denied</h1> Ray ID: 1234</html>", "text/html"),
    (401, "Unauthorized", "text/plain"),
])
async def test_a_refusal_without_an_oauth_error_is_not_a_logout(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession, status: int, body: str, kind: str,
) -> None:
    """A WAF's 403 page or a proxy's bare 401 to one refresh: not the issuer ending the login
    (it names an OAuth error when it does), so retried, and the stored login kept."""
    idp = await start(lifetime=60.0)
    raw = login_config(idp, tmp_path)
    daemon = await make_proxy(raw)
    assert 0 == await device_login(idp, raw, clock)
    await picked_up(clock, http, daemon)
    idp.calls.queue.append(respond(status, body, content_type=kind))
    await ticks(clock, 6, 10)
    assert "login_required" != daemon.source("me").describe()["state"]
    assert stored(tmp_path).get("refresh_token")


async def test_a_readable_state_file_is_said_once_not_every_second(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession, logs: CapturedLogs,
) -> None:
    """The store is read every second for a person's tokens; a file problem was logged at
    every read (110 lines in 10 s with 11 such providers)."""
    idp = await start(lifetime=3600.0)
    raw = login_config(idp, tmp_path)
    for n in range(5):
        raw["providers"][f"me{n}"] = dict(raw["providers"]["me"])
    daemon = await make_proxy(raw)
    assert 0 == await device_login(idp, raw, clock)
    await picked_up(clock, http, daemon)
    os.chmod(tmp_path / "state" / "state.json", 0o644)
    before = len(logs.events("state_file_permissions"))
    await ticks(clock, 10)
    assert len(logs.events("state_file_permissions")) - before <= 1
