"""Logging in as yourself (docs/login.md), end to end: `tokenproxy login` driven as a person
would (the test approves the device code at the issuer, or plays the browser: it opens the
authorization URL the command printed and follows the redirect to the loopback listener),
then the running daemon picks the login up and serves as that person, refreshes, goes back
to login_required when the refresh token is revoked, and `logout` revokes. The issuer is the
built-in demo one (tokenproxy/demo/issuer.py) on the test's clock; its API checks the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import re
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers.client import fetch
from tests.helpers.config import MakeProxy, write_config
from tests.helpers.daemon_proc import child_env
from tests.helpers.fakes import JumpClock
from tests.helpers.idp import StartIdp, respond_json
from tests.helpers.login import (
    INTERVAL,
    LOGIN_POLL,
    browser_started,
    device_login,
    follow,
    login,
    login_config,
    picked_up,
    printed_url,
)
from tests.helpers.logs import CapturedLogs
from tests.helpers.wait import readyz, settle, wait_for
from tokenproxy.config import build_config
from tokenproxy.demo.issuer import DEVICE_GRANT
from tokenproxy.log import Redactor
from tokenproxy.login import LoginFailed
from tokenproxy.login.run import run_login_command


def problem(body: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(body)
    return doc


# -- device code -----------------------------------------------------------------------------


@pytest.mark.slow
async def test_device_login_then_the_running_daemon_serves_refreshes_and_needs_a_login_again(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession, logs: CapturedLogs,
) -> None:
    idp = await start(lifetime=60.0)
    raw = login_config(idp, tmp_path)
    daemon = await make_proxy(raw)
    # No login yet: 503 login_required saying what to run, once in the log, on /readyz too.
    for _ in range(3):
        resp = await fetch(http, daemon)
        assert 503 == resp.status
        assert "login_required" == resp.headers["Tokenproxy-Error"]
        assert "run: tokenproxy login me" in problem(resp.body)["detail"]
        assert "Retry-After" not in resp.headers
    assert 1 == len(logs.events("login_required"))
    _, ready = await readyz(daemon)
    assert "login_required" == ready["providers"]["me"]["state"]
    assert "run: tokenproxy login me" == ready["providers"]["me"]["error"]
    out = io.StringIO()
    assert 0 == await device_login(idp, raw, clock, out)
    printed = out.getvalue()
    assert f"{idp.url}/device" in printed
    assert "me: logged in as demo@example.com" in printed
    # The daemon takes it within a login poll, without a reload: the API accepts the token.
    assert "demo" == (await picked_up(clock, http, daemon))["hello"]
    # Refreshed as any oauth2 provider, the refresh token rotated.
    before = idp.issuer.stats.grants.get("refresh_token", 0)
    await clock.tick(61)
    await settle()
    assert 200 == (await fetch(http, daemon)).status
    assert idp.issuer.stats.grants.get("refresh_token", 0) == before + 1
    # Revoked at the issuer: the refresh is refused, and the provider needs a login again,
    # never a loop of retries.
    idp.issuer.revoke_all()
    await clock.tick(61)
    await settle()
    resp = await fetch(http, daemon)
    assert 503 == resp.status
    assert "login_required" == resp.headers["Tokenproxy-Error"]
    calls = len(idp.calls.seen)
    for _ in range(5):
        await clock.tick(30)
        await settle()
    assert calls == len(idp.calls.seen), "the daemon kept calling the issuer"
    assert 2 == len(logs.events("login_required"))


@pytest.mark.slow
async def test_slow_down_adds_five_seconds_each_time(
    start: StartIdp, clock: JumpClock, tmp_path: Path,
) -> None:
    """RFC 8628 section 3.5: an issuer answering slow_down again and again gets polled
    5 s later each time, and the login still completes."""
    idp = await start()
    idp.issuer.slow_down_next = 3
    raw = login_config(idp, tmp_path)
    task = asyncio.ensure_future(login(raw, clock, "me"))
    await wait_for(lambda: bool(idp.issuer.pending_user_codes), "the device code shown")
    idp.issuer.approve(idp.issuer.pending_user_codes[0])

    def polls() -> int:
        return idp.calls.grants().count(DEVICE_GRANT)

    for n, wait in enumerate((INTERVAL, INTERVAL + 5, INTERVAL + 10, INTERVAL + 15), 1):
        await clock.tick(wait - 1)
        await settle()
        assert n - 1 == polls(), f"poll {n} came before {wait} s"
        await clock.tick(1)
        await wait_for(lambda n=n: polls() == n, f"poll {n} after {wait} s")   # type: ignore[misc]
    assert 0 == await asyncio.wait_for(task, 5)


@pytest.mark.parametrize(("how", "message"), [("deny", "the login was denied"),
                                              ("expire", "the code expired")])
async def test_a_denied_or_expired_device_login_fails_and_stores_nothing(
    start: StartIdp, clock: JumpClock, tmp_path: Path, how: str, message: str,
) -> None:
    idp = await start()
    raw = login_config(idp, tmp_path)
    task = asyncio.ensure_future(login(raw, clock, "me"))
    await wait_for(lambda: bool(idp.issuer.pending_user_codes), "the device code shown")
    if how == "deny":
        idp.issuer.deny(idp.issuer.pending_user_codes[0])
        for _ in range(10):   # the command may not be asleep yet when the clock first moves
            await clock.tick(INTERVAL)
            await settle()
            if task.done():
                break
    else:
        for _ in range(130):
            await clock.tick(INTERVAL)
            if task.done():
                break
    with pytest.raises(LoginFailed, match=message):
        await asyncio.wait_for(task, 5)
    assert not (tmp_path / "state" / "state.json").exists() or "demo-cli" not in (
        tmp_path / "state" / "state.json").read_text()


# -- browser login ---------------------------------------------------------------------------


async def test_browser_login_with_pkce_then_the_daemon_serves(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    idp = await start()
    idp.issuer.approve_next = "demo"
    raw = login_config(idp, tmp_path, grant="authorization_code")
    daemon = await make_proxy(raw)
    task, _out = await browser_started(idp, raw, clock)
    url = printed_url(_out)
    [query] = idp.issuer.authorize_requests or [None]
    assert query is None   # the browser has not been there yet
    status, page, location = await follow(url)
    assert 200 == status
    assert "you can close this tab" in page
    assert location is not None
    assert location.startswith("http://127.0.0.1:")
    assert 0 == await asyncio.wait_for(task, 5)
    [sent] = idp.issuer.authorize_requests
    assert ("S256", "code") == (sent["code_challenge_method"], sent["response_type"])
    assert "demo" == (await picked_up(clock, http, daemon))["hello"]


async def test_callbacks_that_are_not_the_answer_change_nothing(
    start: StartIdp, clock: JumpClock, tmp_path: Path,
) -> None:
    """Another state, no code, another path: a short page each, the login still waiting; the
    real answer then logs in; a second answer after it finds nothing listening."""
    idp = await start()
    idp.issuer.approve_next = "demo"
    raw = login_config(idp, tmp_path, grant="authorization_code")
    task, out = await browser_started(idp, raw, clock)
    url = printed_url(out)
    port = int(re.search(r"redirect_uri=http%3A%2F%2F127\.0\.0\.1%3A(\d+)", url)[1])  # type: ignore[index]
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as browser:
        for path, status in (("/callback?code=x&state=not-ours", 400),
                             ("/callback?state=", 400), ("/elsewhere?code=x", 404)):
            async with browser.get(base + path) as resp:
                assert status == resp.status, path
    assert not task.done()
    status, _, location = await follow(url)
    assert 200 == status
    assert 0 == await asyncio.wait_for(task, 5)
    assert location is not None
    with pytest.raises(aiohttp.ClientConnectionError):
        async with aiohttp.ClientSession() as browser, browser.get(location) as resp:
            pass


async def test_an_error_answer_ends_the_login(
    start: StartIdp, clock: JumpClock, tmp_path: Path,
) -> None:
    idp = await start()
    idp.issuer.deny_next = True
    raw = login_config(idp, tmp_path, grant="authorization_code")
    task, out = await browser_started(idp, raw, clock)
    _status, page, _ = await follow(printed_url(out))
    assert "did not succeed" in page
    with pytest.raises(LoginFailed, match="access_denied"):
        await asyncio.wait_for(task, 5)


async def test_an_answer_from_another_issuer_ends_the_login(
    start: StartIdp, clock: JumpClock, tmp_path: Path,
) -> None:
    """RFC 9207: the answer's iss is another issuer's (an authorization URL of another
    server): a mix-up, refused."""
    idp, other = await start(), await start()
    other.issuer.approve_next = "demo"
    raw = login_config(idp, tmp_path, grant="authorization_code",
                       authorization_url=other.url + "/oauth/authorize")
    task, out = await browser_started(idp, raw, clock)
    await follow(printed_url(out))
    with pytest.raises(LoginFailed, match="another issuer"):
        await asyncio.wait_for(task, 5)


async def test_the_loopback_listener_is_on_127_0_0_1_only(
    start: StartIdp, clock: JumpClock, tmp_path: Path,
) -> None:
    """RFC 8252 section 8.3: bound to the loopback address, so nothing from the network
    reaches it; the same port on another local address refuses."""
    idp = await start()
    raw = login_config(idp, tmp_path, grant="authorization_code")
    task, out = await browser_started(idp, raw, clock)
    port = int(re.search(r"redirect_uri=http%3A%2F%2F127\.0\.0\.1%3A(\d+)",  # type: ignore[index]
                         printed_url(out))[1])
    try:
        with socket.socket() as s, contextlib.suppress(OSError):
            s.settimeout(2)
            assert 0 != s.connect_ex(("127.0.0.2", port))
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


# -- logout and status -----------------------------------------------------------------------


@pytest.mark.slow
async def test_logout_revokes_and_the_daemon_needs_a_login_again(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    idp = await start()
    raw = login_config(idp, tmp_path)
    daemon = await make_proxy(raw)
    assert 0 == await device_login(idp, raw, clock)
    await picked_up(clock, http, daemon)
    out = io.StringIO()
    assert 0 == await login(raw, clock, "me", command="status", out=out)
    assert out.getvalue().startswith("me: logged in as demo@example.com, token expires in")
    out = io.StringIO()
    assert 0 == await login(raw, clock, "me", command="logout", out=out)
    assert "me: logged out; revoked at the issuer" in out.getvalue()
    assert 1 == idp.issuer.stats.revocations
    await clock.tick(LOGIN_POLL)
    await wait_for(lambda: daemon.source("me").describe()["state"] == "login_required",
                   "the logout noticed")
    assert 503 == (await fetch(http, daemon)).status
    out = io.StringIO()
    assert 1 == await login(raw, clock, command="status", out=out)
    assert "me: login required: run tokenproxy login me" in out.getvalue()


# -- the command line ------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("ending", ["denied", "interrupted"])
async def test_exit_status_of_a_login_that_does_not_happen(
    start: StartIdp, tmp_path: Path, ending: str,
) -> None:
    """The command itself: 1 when the login was denied, 130 after Ctrl-C; nothing stored."""
    idp = await start()
    # The command runs on the real clock: an issuer asking for one-second polls.
    idp.issuer.device_interval = 1
    raw = login_config(idp, tmp_path)
    config = write_config(tmp_path / "cfg", raw)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenproxy", "login", "-c", str(config), "--no-browser", "me",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=child_env(tmp_path), cwd=tmp_path)
    try:
        await wait_for(lambda: bool(idp.issuer.pending_user_codes), "the device code shown",
                       timeout=20)
        if ending == "denied":
            idp.issuer.deny(idp.issuer.pending_user_codes[0])
        else:
            proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
    assert (1 if ending == "denied" else 130) == proc.returncode, err
    assert (b"denied" if ending == "denied" else b"was not stored") in err
    state = tmp_path / "state" / "state.json"
    assert not state.exists() or "access_token" not in state.read_text()


async def test_token_says_to_log_in_when_nobody_has(
    start: StartIdp, tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    idp = await start()
    config = write_config(tmp_path / "cfg", login_config(idp, tmp_path))
    from tokenproxy.cli import main

    assert 1 == await asyncio.to_thread(main, ["token", "-c", str(config), "me"])
    assert "run: tokenproxy login me" in capsys.readouterr().err


@pytest.mark.slow
async def test_the_demo_offers_a_login_as_yourself_that_works(tmp_path: Path) -> None:
    """`tokenproxy demo` prints a `tokenproxy login` line for its own device-code provider
    (its issuer approves at once); run as printed, the running demo then serves /me as the
    person who logged in."""
    from tests.helpers.net import free_port

    port = free_port()
    out = tmp_path / "demo.out"
    with out.open("wb") as fh, (tmp_path / "demo.err").open("wb") as err:
        demo = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tokenproxy", "demo", "--port", str(port),
            stdin=asyncio.subprocess.DEVNULL, stdout=fh, stderr=err, env=child_env(tmp_path))
    try:
        await wait_for(lambda: "tokenproxy login -c" in out.read_text(), "the demo banner", 15)
        line = re.search(r"tokenproxy login -c (\S+) me", out.read_text())
        assert line is not None
        assert f"curl http://127.0.0.1:{port}/me/hello" in out.read_text()
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/me/hello") as resp:
                assert 503 == resp.status
            login = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "tokenproxy", "login", "-c", line[1], "--no-browser",
                "me", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                env=child_env(tmp_path), cwd=tmp_path)
            said, err_text = await asyncio.wait_for(login.communicate(), 30)
            assert 0 == login.returncode, err_text
            assert b"me: logged in as demo@example.com" in said

            async def served() -> bool:
                async with http.get(f"http://127.0.0.1:{port}/me/hello") as r:
                    return r.status == 200 and (await r.json())["hello"] == "demo"

            await wait_for(served, "the demo serving /me after the login", 10)
    finally:
        demo.terminate()
        await asyncio.wait_for(demo.wait(), 15)


# -- what else the issue asks of a login ------------------------------------------------------


async def test_the_device_flow_polls_at_the_issuers_interval_and_never_opens_a_browser(
    start: StartIdp, clock: JumpClock, tmp_path: Path,
) -> None:
    """The first poll comes `interval` seconds in, not sooner; the code is printed, and no
    browser is opened (the device flow is for where there is none at hand)."""
    idp = await start()
    idp.issuer.device_interval = 2
    opened: list[str] = []
    out = io.StringIO()
    task = asyncio.ensure_future(run_login_command(
        build_config(login_config(idp, tmp_path), {}), "login", ["me"], out=out,
        redactor=Redactor(), clock=clock, opener=lambda url: opened.append(url) or True))
    await wait_for(lambda: bool(idp.issuer.pending_user_codes) and clock.napping() > 0,
                   "the device code shown, the command waiting")
    [code] = idp.issuer.pending_user_codes
    lines = out.getvalue().splitlines()
    assert any(code in line and f"{idp.url}/device " in line + " " for line in lines), lines
    idp.issuer.approve(code)
    await clock.tick(1.9)
    await settle()
    assert 0 == idp.calls.grants().count(DEVICE_GRANT)
    await clock.tick(0.1)
    assert 0 == await asyncio.wait_for(task, 5)
    assert [] == opened


@pytest.mark.parametrize(("answers", "message"), [
    ([(200, "authorization_pending"), (200, "slow_down"), (200, "access_denied")], "denied"),
    ([(400, "expired_token")], "the code expired"),
])
async def test_errors_the_token_endpoint_gives_while_polling(
    start: StartIdp, clock: JumpClock, tmp_path: Path, answers: list[tuple[int, str]],
    message: str,
) -> None:
    """As RFC 8628 says, and as GitHub does it too: its device flow answers its errors with
    HTTP 200. expired_token ends the login before the code's own deadline."""
    idp = await start()
    for status, error in answers:
        idp.calls.queue.append(respond_json({"error": error}, status))
    idp.calls.queue.insert(0, None)   # the device authorization itself, answered by the issuer
    task = asyncio.ensure_future(login(login_config(idp, tmp_path), clock, "me"))
    for _ in range(10):
        await clock.tick(INTERVAL + 10)
        await settle()
        if task.done():
            break
    with pytest.raises(LoginFailed, match=message):
        await asyncio.wait_for(task, 5)


async def test_the_browser_is_opened_and_the_wait_ends_after_five_minutes(
    start: StartIdp, clock: JumpClock, tmp_path: Path,
) -> None:
    idp = await start()
    opened: list[str] = []
    out = io.StringIO()
    task = asyncio.ensure_future(run_login_command(
        build_config(login_config(idp, tmp_path, grant="authorization_code"), {}), "login",
        ["me"], out=out, redactor=Redactor(), clock=clock,
        opener=lambda url: opened.append(url) or True))
    await wait_for(lambda: bool(opened) and clock.napping() > 0,
                   "the browser opened, the command waiting")
    assert opened[0].startswith(f"{idp.url}/oauth/authorize?")
    assert "Your browser was opened" in out.getvalue()
    await clock.tick(299)
    await settle()
    assert not task.done()
    await clock.tick(1)
    with pytest.raises(LoginFailed, match="within 5 minutes"):
        await asyncio.wait_for(task, 5)


async def test_two_logins_use_fresh_state_and_pkce(
    start: StartIdp, clock: JumpClock, tmp_path: Path,
) -> None:
    idp = await start()
    raw = login_config(idp, tmp_path, grant="authorization_code")
    for _ in range(2):
        idp.issuer.approve_next = "demo"
        task, out = await browser_started(idp, raw, clock)
        await follow(printed_url(out))
        assert 0 == await asyncio.wait_for(task, 5)
    first, second = idp.issuer.authorize_requests
    assert first["state"] != second["state"]
    assert first["code_challenge"] != second["code_challenge"]
    assert len(first["state"]) >= 32


async def test_login_without_a_name_logs_in_where_one_is_needed_and_says_who_from_userinfo(
    start: StartIdp, clock: JumpClock, tmp_path: Path,
) -> None:
    """Two providers, one logged in: `tokenproxy login` alone logs in to the other. Without
    an ID token, who logged in comes from userinfo."""
    idp = await start()
    idp.issuer.id_tokens = False
    raw = login_config(idp, tmp_path)
    raw["providers"]["you"] = dict(raw["providers"]["me"])
    assert 0 == await device_login(idp, raw, clock)            # "me"
    out = io.StringIO()
    assert 0 == await device_login(idp, raw, clock, out, names=())
    assert "you: logged in as demo@example.com" in out.getvalue()
    assert "me: logged in" not in out.getvalue()
