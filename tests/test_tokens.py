"""The token lifecycle end to end: real daemons against the real Issuer, with the fake clock
driving every token lifetime (real waits only for network round trips and command timeouts)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from tests.helpers.client import Answer, fetch, status_of
from tests.helpers.config import MakeProxy, command_provider, proxy_config, upstream_url
from tests.helpers.fakes import CLIENT_SECRET, PASSWORD, TOKEN, JumpClock
from tests.helpers.idp import (
    PASSWORD_GRANT,
    UNAVAILABLE,
    Idp,
    StartIdp,
    advance,
    config,
    gate,
    jwt,
    minted,
    oauth2_config,
    passthrough,
    password_grant,
    respond,
    respond_json,
    state_entry,
)
from tests.helpers.logs import CapturedLogs, failures, installed
from tests.helpers.metrics import count, metric, refreshes
from tests.helpers.net import closed_port
from tests.helpers.wait import readyz, settle, wait_for, wait_ready
from tokenproxy.config import build_config
from tokenproxy.log import Redactor
from tokenproxy.tokens.factory import obtain_token


def echoed_auth(resp: Answer) -> str:
    """The Authorization header the fake upstream's /echo saw."""
    [value] = [v for k, v in resp.json()["headers"] if k.lower() == "authorization"]
    assert isinstance(value, str)
    return value


def problem_type(resp: Answer) -> str:
    assert "application/problem+json" == resp.headers["Content-Type"]
    value = resp.json()["type"]
    assert isinstance(value, str)
    return value


# -- providers: oauth2 -----------------------------------------------------------------------


BASIC = "Basic " + base64.b64encode(f"demo-client:{CLIENT_SECRET}".encode()).decode()


@pytest.mark.parametrize(("auth", "headers", "form"), [
    ("basic", {"authorization": BASIC}, {"grant_type": "client_credentials"}),
    ("post", {}, {"grant_type": "client_credentials", "client_id": "demo-client",
                  "client_secret": CLIENT_SECRET}),
    ("none", {}, {"grant_type": "client_credentials", "client_id": "demo-client"}),
])
async def test_client_credentials_client_auth(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    auth: str, headers: dict[str, str], form: dict[str, str],
) -> None:
    """client_auth basic, post and none send the client credentials where each belongs."""
    # A public client (none) is one the issuer knows without a secret.
    idp = await start(**({"client_secret": ""} if auth == "none" else {}))
    daemon = await make_proxy(oauth2_config(idp, tmp_path, client_auth=auth))
    await wait_ready(daemon)
    resp = await fetch(http, daemon, "/hello")
    assert 200 == resp.status
    assert {"hello": "demo-client", "path": "/api/hello"} == resp.json()
    [call] = idp.calls.seen
    assert "client_credentials" == call.grant
    assert headers.get("authorization") == call.headers.get("authorization")
    assert form == call.form


async def test_basic_auth_form_encodes_id_and_secret(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    """RFC 6749 2.3.1: client id and secret are form-urlencoded before the Basic encoding."""
    idp = await start()
    idp.calls.default = minted(idp.issuer, json.dumps)
    daemon = await make_proxy(oauth2_config(idp, tmp_path, client_id="my:app",
                                            client_secret=CLIENT_SECRET + "&/%"))
    await wait_ready(daemon)
    [call] = idp.calls.seen
    expected = base64.b64encode(f"my%3Aapp:{CLIENT_SECRET}%26%2F%25".encode()).decode()
    assert "Basic " + expected == call.headers["authorization"]


async def test_scope_and_params_are_sent(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    """scope (a list is joined with spaces) and every params entry go into the token form."""
    idp = await start()
    daemon = await make_proxy(oauth2_config(
        idp, tmp_path, client_auth="post", scope=["read", "write"],
        params={"audience": "https://api.example.com", "resource": "urn:r1"}))
    await wait_ready(daemon)
    [call] = idp.calls.seen
    assert {"grant_type": "client_credentials", "client_id": "demo-client",
            "client_secret": CLIENT_SECRET, "scope": "read write",
            "audience": "https://api.example.com", "resource": "urn:r1"} == call.form


async def test_password_grant_then_rotating_refresh_grants(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """One password login, then refresh grants each with the latest rotated token."""
    idp = await start()
    daemon = await make_proxy(oauth2_config(idp, tmp_path, refresh_margin=0, **PASSWORD_GRANT))
    await wait_ready(daemon)
    assert PASSWORD_GRANT == {k: v for k, v in idp.calls.seen[0].form.items()
                              if k != "client_id"}
    used: list[str] = []
    for _ in range(3):
        used.append(state_entry(tmp_path / "state.json")["refresh_token"])
        clock.advance(11)
        assert 200 == (await fetch(http, daemon)).status
    assert ["password", "refresh_token", "refresh_token", "refresh_token"] == idp.calls.grants()
    assert used == [c.form["refresh_token"] for c in idp.calls.seen[1:]]
    assert 3 == len(set(used))
    assert 0 == idp.issuer.stats.reuse_detected


async def test_refresh_token_grant_follows_rotation(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """grant_type refresh_token starts from the configured token, then follows rotation."""
    idp = await start()
    first = (await password_grant(idp))["refresh_token"]
    daemon = await make_proxy(oauth2_config(idp, tmp_path, grant_type="refresh_token",
                                            refresh_token=first, refresh_margin=0))
    await wait_ready(daemon)
    assert 200 == (await fetch(http, daemon)).status
    clock.advance(11)
    assert 200 == (await fetch(http, daemon)).status
    assert ["password", "refresh_token", "refresh_token"] == idp.calls.grants()
    assert first == idp.calls.seen[1].form["refresh_token"]
    assert first != idp.calls.seen[2].form["refresh_token"]
    assert 0 == idp.issuer.stats.reuse_detected


async def test_invalid_client_from_the_issuer_is_named_and_unauthenticates(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    logs: CapturedLogs,
) -> None:
    """A wrong client secret: 401 invalid_client is logged by name, no retry, 502."""
    idp = await start()
    wrong = "wrong-client-secret-4c1d"
    daemon = await make_proxy(oauth2_config(idp, tmp_path, client_secret=wrong))
    await wait_for(lambda: bool(logs.events("provider_unauthenticated")), "unauthenticated")
    assert "client_credentials grant: status 401 (invalid_client)" in failures(logs)
    assert 502 == (await fetch(http, daemon)).status
    assert wrong not in logs.text
    assert 1 == len(idp.calls.seen)


@pytest.mark.parametrize(("status", "code"), [(400, "invalid_grant"), (401, "invalid_client"),
                                              (400, "invalid_scope")])
async def test_rfc6749_error_body_named_but_never_echoed(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, logs: CapturedLogs,
    status: int, code: str,
) -> None:
    """An RFC 6749 error is logged as status and code; its body never reaches a log."""
    idp = await start()
    idp.calls.default = respond_json({
        "error": code,
        "error_description": f"client secret {CLIENT_SECRET} / password {PASSWORD} refused",
        "error_uri": "https://idp.example/errors?hint=echo-marker-77",
    }, status)
    daemon = await make_proxy(oauth2_config(idp, tmp_path, **PASSWORD_GRANT))
    await wait_for(lambda: bool(logs.events("provider_unauthenticated")), "unauthenticated")
    assert f"password grant: status {status} ({code})" in failures(logs)
    assert "echo-marker-77" not in logs.text
    assert "refused" not in logs.text
    status_, doc = await readyz(daemon)
    assert 503 == status_
    assert CLIENT_SECRET not in json.dumps(doc)


@pytest.mark.slow
async def test_token_answer_split_over_several_reads(
    aiohttp_server: AiohttpServer, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    """A token answer that arrives in pieces (a 6 KB JSON in three writes) is read whole."""
    async def token(request: web.Request) -> web.StreamResponse:
        body = ('{"access_token": "split-answer-token-1234", "expires_in": 300, "pad": "'
                + "x" * 6000 + '"}').encode()
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        await resp.prepare(request)
        for part in (body[:10], body[10:3000], body[3000:]):
            await resp.write(part)
            await asyncio.sleep(0.05)
        await resp.write_eof()
        return resp

    async def api(request: web.Request) -> web.Response:
        return web.Response(text=request.headers.get("Authorization", ""))

    app = web.Application()
    app.router.add_post("/token", token)
    app.router.add_get("/api/x", api)
    server = await aiohttp_server(app)
    base = f"http://127.0.0.1:{server.port}"
    raw = proxy_config(base + "/api/", TOKEN, state_path=str(tmp_path / "s.json"))
    raw["providers"] = {"api": {"type": "oauth2", "token_url": base + "/token",
                                "client_id": "c", "client_secret": CLIENT_SECRET}}
    daemon = await make_proxy(raw)
    async with aiohttp.ClientSession() as s, s.get(
        f"http://127.0.0.1:{daemon.port()}/x"
    ) as resp:
        assert 200 == resp.status
        assert "Bearer split-answer-token-1234" == await resp.text()


# -- providers: json -------------------------------------------------------------------------


def json_provider(idp: Idp, *, refresh: bool = True, **kw: Any) -> dict[str, Any]:
    prov: dict[str, Any] = {
        "type": "json",
        "refresh_margin": 0,
        "login": {"url": idp.url + "/auth/login",
                  "json": {"username": "demo", "password": PASSWORD},
                  "access_token": "/accessToken", "refresh_token": "/refreshToken",
                  "expires_in": "/expiresIn"},
    }
    if refresh:
        prov["refresh"] = {"url": idp.url + "/auth/refresh",
                           "json": {"refreshToken": "{refresh_token}"},
                           "access_token": "/data/accessToken",
                           "refresh_token": "/data/refreshToken"}
    prov.update(kw)
    return prov


async def test_json_login_then_refresh_with_rotation(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """json provider: login, refresh with {refresh_token}, pointers and rotation."""
    idp = await start()
    state = tmp_path / "state.json"
    daemon = await make_proxy(config(json_provider(idp), idp.url + "/api/", tmp_path))
    await wait_ready(daemon)
    assert {"username": "demo", "password": PASSWORD} == idp.calls.seen[0].json
    assert 200 == (await fetch(http, daemon)).status
    assert clock.time() + 10 == metric(daemon, "tokenproxy_token_expiry_timestamp_seconds",
                                       provider="idp")
    rt1 = state_entry(state)["refresh_token"]
    clock.advance(11)
    assert 200 == (await fetch(http, daemon)).status
    assert {"refreshToken": rt1} == idp.calls.seen[1].json
    assert 0 == metric(daemon, "tokenproxy_token_expiry_timestamp_seconds", provider="idp")
    rt2 = state_entry(state)["refresh_token"]
    assert rt1 != rt2
    clock.advance(11)
    assert 200 == (await fetch(http, daemon)).status
    assert {"refreshToken": rt2} == idp.calls.seen[2].json
    assert ["json_login", "json_refresh", "json_refresh"] == idp.calls.grants()
    assert (1, 1, 1) == (refreshes(daemon, "initial"), refreshes(daemon, "expiry"),
                         refreshes(daemon, "unauthorized"))
    assert 0 == idp.issuer.stats.reuse_detected


async def test_json_without_refresh_logs_in_again(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """Without a refresh call, a new token is a fresh login."""
    idp = await start()
    daemon = await make_proxy(config(json_provider(idp, refresh=False), idp.url + "/api/",
                                     tmp_path))
    await wait_ready(daemon)
    clock.advance(11)
    assert 200 == (await fetch(http, daemon)).status
    assert ["json_login", "json_login"] == idp.calls.grants()


async def test_json_refresh_rejected_falls_back_to_login(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """A json refresh answered 401 (its token family revoked) is followed by a fresh login."""
    idp = await start()
    daemon = await make_proxy(config(json_provider(idp), idp.url + "/api/", tmp_path))
    await wait_ready(daemon)
    idp.issuer.revoke_all()
    clock.advance(11)
    assert 200 == (await fetch(http, daemon)).status
    assert ["json_login", "json_refresh", "json_login"] == idp.calls.grants()
    assert 1 == metric(daemon, "tokenproxy_provider_authenticated", provider="idp")


async def test_json_login_rejected_is_unauthenticated(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    logs: CapturedLogs,
) -> None:
    """A login answered 401 means the credentials are wrong: unauthenticated, 502."""
    idp = await start(users={"demo": "another-password"})
    daemon = await make_proxy(config(json_provider(idp), idp.url + "/api/", tmp_path))
    await wait_for(lambda: bool(logs.events("provider_unauthenticated")), "unauthenticated")
    assert "login: status 401" in failures(logs)
    resp = await fetch(http, daemon)
    assert 502 == resp.status
    assert "urn:tokenproxy:problem:unauthenticated" == problem_type(resp)


# -- providers: command ----------------------------------------------------------------------


def script(tmp_path: Path, name: str, body: str) -> list[str]:
    """A tiny python program run as [sys.executable, path]."""
    path = tmp_path / f"cmd_{name}.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path)]


def counting(tmp_path: Path) -> str:
    """Python lines that leave the run number in ``n``."""
    counter = tmp_path / "runs"
    return textwrap.dedent(f"""\
        import json, pathlib, sys, time
        p = pathlib.Path({str(counter)!r})
        n = int(p.read_text()) + 1 if p.exists() else 1
        p.write_text(str(n))
    """)


def command_config(argv: list[str], upstream: TestServer, tmp_path: Path,
                   **kw: Any) -> dict[str, Any]:
    prov: dict[str, Any] = {"type": "command", "command": argv, "refresh_margin": 0}
    prov.update(kw)
    return config(prov, upstream_url(upstream, "/echo/"), tmp_path)


@pytest.mark.slow
async def test_command_text_output_cached_for_cache_for(
    make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path, upstream: TestServer,
    http: aiohttp.ClientSession,
) -> None:
    """A bare token printed by a command is used for cache_for, then the command reruns."""
    argv = script(tmp_path, "text", counting(tmp_path) + 'print("cmd-token-%d" % n)\n')
    daemon = await make_proxy(command_config(argv, upstream, tmp_path, cache_for="30s"))
    await wait_ready(daemon)
    assert clock.time() + 30 == metric(daemon, "tokenproxy_token_expiry_timestamp_seconds",
                                       provider="idp")
    assert "Bearer cmd-token-1" == echoed_auth(await fetch(http, daemon))
    clock.advance(29)
    assert "Bearer cmd-token-1" == echoed_auth(await fetch(http, daemon))
    clock.advance(2)
    assert "Bearer cmd-token-2" == echoed_auth(await fetch(http, daemon))
    assert "2" == (tmp_path / "runs").read_text()


@pytest.mark.slow
async def test_command_json_output_with_expires_in(
    make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path, upstream: TestServer,
    http: aiohttp.ClientSession,
) -> None:
    """output json: the token and its expires_in come from the printed JSON."""
    argv = script(tmp_path, "json", counting(tmp_path) + textwrap.dedent("""\
        print(json.dumps({"access_token": "cmd-json-%d" % n, "expires_in": 10}))
    """))
    daemon = await make_proxy(command_config(argv, upstream, tmp_path, output="json",
                                             cache_for="5m"))
    await wait_ready(daemon)
    assert clock.time() + 10 == metric(daemon, "tokenproxy_token_expiry_timestamp_seconds",
                                       provider="idp")
    assert "Bearer cmd-json-1" == echoed_auth(await fetch(http, daemon))
    clock.advance(11)
    assert "Bearer cmd-json-2" == echoed_auth(await fetch(http, daemon))


@pytest.mark.slow
async def test_command_timeout_kills_it_and_fails(
    make_proxy: MakeProxy, tmp_path: Path, upstream: TestServer, http: aiohttp.ClientSession,
    logs: CapturedLogs,
) -> None:
    """A command running past its timeout is killed and counts as a failed call (503)."""
    pid_file = tmp_path / "pid"
    argv = script(tmp_path, "hang", f"""\
        import os, pathlib, time
        pathlib.Path({str(pid_file)!r}).write_text(str(os.getpid()))
        time.sleep(5)
        print("late-token")
    """)
    daemon = await make_proxy(command_config(argv, upstream, tmp_path, timeout="0.5s"))
    await wait_for(lambda: refreshes(daemon, "initial", "failure") == 1, "the timeout")
    assert ["the command did not finish within 0.5s"] == failures(logs)
    pid = int(pid_file.read_text())

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    await wait_for(gone, "the command to be killed", timeout=2)
    resp = await fetch(http, daemon)
    assert 503 == resp.status
    assert "Retry-After" in resp.headers


@pytest.mark.parametrize("size", [70_000, 10 * 1024 * 1024])
async def test_command_output_over_64k_fails(
    make_proxy: MakeProxy, tmp_path: Path, upstream: TestServer, logs: CapturedLogs, size: int
) -> None:
    """Output over 64 KiB is a failure, found at the cap (not at the timeout)."""
    argv = script(tmp_path, "chatty", f"""\
        import sys
        sys.stdout.write("x" * {size})
    """)
    daemon = await make_proxy(command_config(argv, upstream, tmp_path, timeout="5s"))
    started = time.monotonic()
    await wait_for(lambda: refreshes(daemon, "initial", "failure") == 1, "the failure", 8)
    assert ["the command printed more than 65536 bytes"] == failures(logs)
    assert time.monotonic() - started < 3


@pytest.fixture(name="idle_stdin")
def _idle_stdin() -> Iterator[None]:
    """Make this process's stdin a pipe that stays open and silent, so a command that
    inherited it would block reading."""
    saved = os.dup(0)
    read_end, write_end = os.pipe()
    os.dup2(read_end, 0)
    os.close(read_end)
    try:
        yield
    finally:
        os.dup2(saved, 0)
        os.close(saved)
        os.close(write_end)


@pytest.mark.usefixtures("idle_stdin")
async def test_command_stdin_is_closed(
    make_proxy: MakeProxy, tmp_path: Path, upstream: TestServer, http: aiohttp.ClientSession
) -> None:
    """A command reading stdin gets end-of-file at once, not the daemon's stdin."""
    argv = script(tmp_path, "stdin", """\
        import sys
        data = sys.stdin.read()
        print("stdin-eof-token" if data == "" else "stdin-had-data")
    """)
    daemon = await make_proxy(command_config(argv, upstream, tmp_path, timeout="2s"))
    await wait_ready(daemon)
    assert "Bearer stdin-eof-token" == echoed_auth(await fetch(http, daemon))


async def test_command_stderr_logged_without_the_token(
    make_proxy: MakeProxy, tmp_path: Path, upstream: TestServer, http: aiohttp.ClientSession,
    logs: CapturedLogs,
) -> None:
    """The command's stderr is logged, with the token it printed masked."""
    argv = script(tmp_path, "stderr", f"""\
        import sys
        print({TOKEN!r})
        print("debug: fetched {TOKEN} for you", file=sys.stderr)
        print("warning: cache is cold", file=sys.stderr)
    """)
    daemon = await make_proxy(command_config(argv, upstream, tmp_path))
    await wait_ready(daemon)
    assert f"Bearer {TOKEN}" == echoed_auth(await fetch(http, daemon))
    [ev] = logs.events("command_stderr")
    assert "warning: cache is cold" in ev["stderr"]
    assert "debug: fetched *** for you" in ev["stderr"]


@pytest.mark.parametrize(("body", "error"), [
    ("import sys\nprint('tok', file=sys.stderr)\nsys.exit(3)\n",
     "the command exited with status 3"),
    ("print('')\n", "the command printed no usable token"),
    ("print('two words')\n", "the command printed no usable token"),
])
async def test_command_failures(
    make_proxy: MakeProxy, tmp_path: Path, upstream: TestServer, logs: CapturedLogs,
    http: aiohttp.ClientSession, body: str, error: str,
) -> None:
    """A failing command or one printing no usable token is a failed call, not a crash."""
    daemon = await make_proxy(command_config(script(tmp_path, "bad", body), upstream,
                                             tmp_path))
    await wait_for(lambda: refreshes(daemon, "initial", "failure") == 1, "the failure")
    assert [error] == failures(logs)
    assert 503 == (await fetch(http, daemon)).status


@pytest.mark.slow
async def test_a_slow_provider_does_not_hold_up_another(
    make_proxy: MakeProxy, upstream: TestServer, tmp_path: Path
) -> None:
    """Providers refresh under their own locks: a command taking 2 s does not delay another
    provider's first token (they share the state file)."""
    raw = proxy_config(upstream_url(upstream, "/"), TOKEN, state_path=str(tmp_path / "s.json"))
    raw["providers"] = {
        "slow": command_provider("import time; time.sleep(2); print('slow-token-aaaaaaaa')"),
        "fast": command_provider("print('fast-token-bbbbbbbb')"),
    }
    raw["routes"] = [{"prefix": "/", "upstream": upstream_url(upstream, "/"),
                      "provider": "fast"}]
    started = time.monotonic()
    daemon = await make_proxy(raw)
    async with aiohttp.ClientSession() as s, s.get(
        f"http://127.0.0.1:{daemon.port()}/echo/x"
    ) as resp:
        assert 200 == resp.status
    assert time.monotonic() - started < 1.5


# -- expiry ----------------------------------------------------------------------------------


EXPIRY = "tokenproxy_token_expiry_timestamp_seconds"


async def test_expiry_from_expires_in(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path
) -> None:
    """expires_in sets the expiry gauge (wall time + lifetime) and /readyz expires_in."""
    idp = await start()
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    assert clock.time() + 10 == metric(daemon, EXPIRY, provider="idp")
    assert 1 == metric(daemon, "tokenproxy_provider_authenticated", provider="idp")
    status, doc = await readyz(daemon)
    assert (200, {"type": "oauth2", "state": "valid", "expires_in": 10.0}) == (
        status, doc["providers"]["idp"])


async def test_expiry_from_jwt_exp(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    upstream: TestServer, http: aiohttp.ClientSession,
) -> None:
    """Without expires_in the JWT exp claim gives the expiry."""
    idp = await start()
    token = jwt({"sub": "svc", "exp": clock.time() + 30})
    idp.calls.default = respond_json({"access_token": token, "token_type": "Bearer"})
    daemon = await make_proxy(oauth2_config(idp, tmp_path, refresh_margin=0,
                                            upstream=upstream_url(upstream, "/echo/")))
    await wait_ready(daemon)
    assert clock.time() + 30 == metric(daemon, EXPIRY, provider="idp")
    clock.advance(29)
    assert f"Bearer {token}" == echoed_auth(await fetch(http, daemon))
    assert 1 == len(idp.calls.seen)
    clock.advance(2)
    assert 200 == (await fetch(http, daemon)).status
    assert 2 == len(idp.calls.seen)


@pytest.mark.slow
async def test_jwt_exp_used_when_expires_in_is_unusable(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    upstream: TestServer, logs: CapturedLogs,
) -> None:
    """An unusable expires_in falls back to the JWT exp claim."""
    idp = await start()
    token = jwt({"exp": clock.time() + 30})
    idp.calls.default = respond_json({"access_token": token, "expires_in": "NaN"})
    daemon = await make_proxy(oauth2_config(idp, tmp_path,
                                            upstream=upstream_url(upstream, "/echo/")))
    await wait_ready(daemon)
    assert clock.time() + 30 == metric(daemon, EXPIRY, provider="idp")
    assert 1 == len(logs.events("expires_in_ignored"))


async def test_unknown_expiry_refreshed_only_by_a_401(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """Without expires_in or a JWT the token is used until a 401 refreshes it."""
    idp = await start()
    idp.calls.default = minted(idp.issuer, lambda d: json.dumps(
        {k: v for k, v in d.items() if k != "expires_in"}))
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    assert 0 == metric(daemon, EXPIRY, provider="idp")
    assert None is (await readyz(daemon))[1]["providers"]["idp"]["expires_in"]
    clock.advance(9.9)
    assert 200 == (await fetch(http, daemon)).status
    await settle()
    assert 1 == len(idp.calls.seen)
    clock.advance(0.2)   # the issuer's 10 s are over: its API answers 401
    assert 200 == (await fetch(http, daemon)).status
    assert 2 == len(idp.calls.seen)
    assert 1 == refreshes(daemon, "unauthorized")
    assert 1 == count(daemon, "tokenproxy_auth_retries_total", route="/", outcome="success")


@pytest.mark.parametrize("raw", [
    "true", '"NaN"', "0", "-5", "1e999", '"Infinity"', '"\\u00b2"', "1" + "0" * 400, "[10]",
], ids=["true", "NaN-string", "zero", "negative", "1e999", "Infinity-string", "superscript-2",
        "int-beyond-float", "list"])
async def test_unusable_expires_in_ignored_with_a_warning(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    logs: CapturedLogs, raw: str,
) -> None:
    """An unusable expires_in is ignored with a warning; the expiry stays unknown."""
    idp = await start()
    idp.calls.default = minted(idp.issuer, lambda d: json.dumps(
        {**d, "expires_in": "@@"}).replace('"@@"', raw))
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    assert 200 == (await fetch(http, daemon)).status
    [ev] = logs.events("expires_in_ignored")
    assert "warning" == ev["level"]
    assert 0 == metric(daemon, EXPIRY, provider="idp")
    assert [] == failures(logs)


async def test_lifetime_capped_at_one_day(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path
) -> None:
    """An expires_in of a million seconds counts as one day."""
    idp = await start()
    idp.calls.default = minted(idp.issuer, lambda d: json.dumps({**d, "expires_in": 10**6}))
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    assert clock.time() + 86400 == metric(daemon, EXPIRY, provider="idp")
    assert 86400.0 == (await readyz(daemon))[1]["providers"]["idp"]["expires_in"]


async def test_wall_clock_jumps_do_not_move_deadlines(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """Wall-clock jumps of 2 h neither expire the token nor keep it alive."""
    idp = await start()
    daemon = await make_proxy(oauth2_config(idp, tmp_path, refresh_margin=0))
    await wait_ready(daemon)
    clock.jump_wall(7200)
    assert 200 == (await fetch(http, daemon)).status
    clock.jump_wall(-14400)
    assert 200 == (await fetch(http, daemon)).status
    assert 1 == len(idp.calls.seen)
    clock.advance(10)
    assert 200 == (await fetch(http, daemon)).status
    assert 2 == len(idp.calls.seen)


async def test_command_stderr_flood_does_not_block_it(
    make_proxy: MakeProxy, tmp_path: Path, upstream: TestServer, http: aiohttp.ClientSession,
    logs: CapturedLogs,
) -> None:
    """Megabytes on a command's stderr do not stall it; a bounded excerpt is logged."""
    argv = script(tmp_path, "noisy", """\
        import sys
        sys.stderr.write("e" * (4 * 1024 * 1024))
        sys.stderr.flush()
        print("noisy-token")
    """)
    daemon = await make_proxy(command_config(argv, upstream, tmp_path, timeout="5s"))
    await wait_ready(daemon)
    assert "Bearer noisy-token" == echoed_auth(await fetch(http, daemon))
    [ev] = logs.events("command_stderr")
    assert 2048 == len(ev["stderr"])


# -- proactive refresh -----------------------------------------------------------------------


@pytest.mark.slow
async def test_proactive_refresh_capped_at_half_the_lifetime(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """Tokens of 10 s with refresh_margin 60 s are refreshed in the background at 5 s."""
    idp = await start()
    daemon = await make_proxy(oauth2_config(idp, tmp_path, refresh_margin="60s"))
    await wait_ready(daemon)
    await advance(clock, 4.9)
    await settle()
    assert 1 == len(idp.calls.seen)
    await advance(clock, 0.2)
    await wait_for(lambda: refreshes(daemon, "expiry") == 1, "the background refresh")
    await advance(clock, 4.9)
    await settle()
    assert 2 == len(idp.calls.seen)
    await advance(clock, 0.2)
    await wait_for(lambda: refreshes(daemon, "expiry") == 2, "the second background refresh")
    assert 200 == (await fetch(http, daemon)).status
    assert 3 == len(idp.calls.seen)


async def test_old_token_used_while_the_refresh_is_in_flight(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession, logs: CapturedLogs,
) -> None:
    """Requests use the valid old token during a slow refresh, the new one after it."""
    idp = await start()
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    release = asyncio.Event()
    idp.calls.queue.append(gate(release))
    await advance(clock, 5.1)
    await wait_for(lambda: 2 == len(idp.calls.seen), "the refresh to start")
    for _ in range(3):
        assert 200 == (await fetch(http, daemon, timeout=2)).status
    old = idp.tap.bearers()
    assert 3 == len(old)
    assert 1 == len(set(old))
    status, doc = await readyz(daemon)
    assert (200, "valid") == (status, doc["providers"]["idp"]["state"])
    release.set()
    await wait_for(lambda: refreshes(daemon, "expiry") == 1, "the refresh to finish")
    await wait_for(lambda: installed(logs, "expiry") == 1, "the new token in use")
    assert 200 == (await fetch(http, daemon)).status
    assert old[0] != idp.tap.bearers()[-1]


@pytest.mark.slow
async def test_margin_zero_no_background_refresh_and_the_request_waits(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """refresh_margin 0: no background refresh; a request finding it expired waits."""
    idp = await start()
    daemon = await make_proxy(oauth2_config(idp, tmp_path, refresh_margin=0))
    await wait_ready(daemon)
    clock.advance(60)
    await settle(0.1)
    assert 1 == len(idp.calls.seen)
    assert 0 == clock.napping()
    status, doc = await readyz(daemon)
    assert (200, "expired") == (status, doc["providers"]["idp"]["state"])   # can get one
    release = asyncio.Event()
    idp.calls.queue.append(gate(release))
    request = asyncio.create_task(fetch(http, daemon))
    await wait_for(lambda: 2 == len(idp.calls.seen), "the refresh to start")
    await settle(0.1)
    assert not request.done()
    release.set()
    assert 200 == (await asyncio.wait_for(request, 5)).status
    assert 1 == refreshes(daemon, "expiry")
    assert 1 == len(idp.tap.seen)


async def test_proactive_refresh_before_expiry(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path
) -> None:
    """Inside refresh_margin the token is refreshed in the background (trigger expiry)."""
    issuer = (await start()).issuer
    daemon = await make_proxy(oauth2_config(issuer, tmp_path, refresh_margin="4s"))
    await wait_ready(daemon, timeout=2.0)
    await clock.tick(6.5)
    labels = {"provider": "idp", "trigger": "expiry", "grant": "client_credentials",
              "result": "success"}
    # The metric counts once the answer is in, not when the call starts.
    await wait_for(lambda: metric(daemon, "tokenproxy_token_refresh_total", **labels),
                   "the refresh counted", 3.0)
    assert 1.0 == metric(daemon, "tokenproxy_token_refresh_total", **labels)
    assert 2 == issuer.stats.calls


# -- single flight ---------------------------------------------------------------------------


@pytest.mark.slow
async def test_concurrent_401s_for_one_token_make_one_refresh(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """100 concurrent 401s on one token make one refresh; each request retried once."""
    idp = await start()
    daemon = await make_proxy(oauth2_config(idp, tmp_path, refresh_margin=0))
    await wait_ready(daemon)
    assert 200 == (await fetch(http, daemon)).status
    [old] = idp.tap.bearers()
    idp.issuer.revoke_all()
    statuses = await asyncio.gather(*(fetch(http, daemon, f"/r{i}") for i in range(100)))
    assert [200] * 100 == [r.status for r in statuses]
    assert ["client_credentials"] * 2 == idp.calls.grants()
    assert 1 == refreshes(daemon, "unauthorized")
    seen = idp.tap.seen[1:]
    with_old = [s.path for s in seen if s.bearer == old]
    with_new = [s.path for s in seen if s.bearer != old]
    assert sorted(f"/api/r{i}" for i in range(100)) == sorted(with_new)   # once each
    assert len(with_old) == count(daemon, "tokenproxy_auth_retries_total", route="/",
                                  outcome="success")


async def test_401_for_an_already_replaced_token_just_retries(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A 401 for a token already replaced is retried without another token call."""
    idp = await start()
    daemon = await make_proxy(oauth2_config(idp, tmp_path, refresh_margin=0))
    await wait_ready(daemon)
    hold = idp.tap.hold["/api/slow"] = asyncio.Event()
    slow = asyncio.create_task(fetch(http, daemon, "/slow"))
    await asyncio.wait_for(idp.tap.held.wait(), 5)
    idp.issuer.revoke_all()
    assert 200 == (await fetch(http, daemon, "/other")).status
    assert 2 == len(idp.calls.seen)
    hold.set()
    assert 200 == (await asyncio.wait_for(slow, 5)).status
    assert 2 == len(idp.calls.seen)
    assert 1 == refreshes(daemon, "unauthorized")
    old, new = idp.tap.bearers("/api/slow")
    assert [old, new] == idp.tap.bearers("/api/other")
    assert 2 == count(daemon, "tokenproxy_auth_retries_total", route="/", outcome="success")


async def test_clients_hanging_up_do_not_cancel_the_refresh(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """Waiting clients that hang up do not cancel the refresh the others still get."""
    idp = await start()
    daemon = await make_proxy(oauth2_config(idp, tmp_path, refresh_margin=0))
    await wait_ready(daemon)
    release = asyncio.Event()
    idp.calls.queue.append(gate(release))
    clock.advance(11)
    first = asyncio.create_task(fetch(http, daemon, "/r0"))
    await wait_for(lambda: 2 == len(idp.calls.seen), "the refresh to start")
    others = [asyncio.create_task(fetch(http, daemon, f"/r{i}")) for i in range(1, 10)]
    await wait_for(lambda: 9 == count(daemon, "tokenproxy_token_refresh_coalesced_total",
                                      provider="idp"), "the waiters")
    gone = [first, *others[:4]]
    for task in gone:
        task.cancel()
    await wait_for(lambda: 5 == count(daemon, "tokenproxy_requests_total", route="/",
                                      method="GET", code="499"), "the server to see them go")
    release.set()
    answers = await asyncio.wait_for(asyncio.gather(*others[4:]), 5)
    assert [200] * 5 == [r.status for r in answers]
    assert 2 == len(idp.calls.seen)
    assert (1, 0) == (refreshes(daemon, "expiry"), refreshes(daemon, "expiry", "failure"))


@pytest.mark.slow
async def test_concurrent_requests_after_expiry_make_one_token_call(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """500 requests arriving after expiry share one token-endpoint call and all succeed."""
    issuer = (await start()).issuer
    daemon = await make_proxy(oauth2_config(issuer, tmp_path, refresh_margin=0))
    await wait_ready(daemon, timeout=2.0)
    assert 1 == issuer.stats.calls
    clock.advance(11)
    statuses = await asyncio.gather(*(status_of(http, daemon, "/x") for _ in range(500)))
    assert [200] * 500 == statuses
    assert 2 == issuer.stats.calls
    coalesced = daemon.registry.get_sample_value(
        "tokenproxy_token_refresh_coalesced_total", {"provider": "idp"})
    assert coalesced is not None
    assert coalesced >= 1


# -- token-endpoint calls: counted and named ------------------------------------------------


async def test_every_token_endpoint_call_is_counted_by_grant_and_result(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    logs: CapturedLogs,
) -> None:
    """A rejected refresh token (what reuse detection or a revocation looks like) followed by
    a fresh login is two calls: refresh_token rejected, password success; the log lines name
    the grant of each."""
    idp = await start()
    daemon = await make_proxy(oauth2_config(idp, tmp_path, **PASSWORD_GRANT))
    await wait_ready(daemon)
    idp.issuer.revoke_all()
    assert 200 == (await fetch(http, daemon)).status
    assert ["password", "refresh_token", "password"] == idp.calls.grants()

    def calls(trigger: str, grant: str, result: str) -> float:
        return count(daemon, "tokenproxy_token_refresh_total", provider="idp",
                     trigger=trigger, grant=grant, result=result)

    assert (1, 1, 1) == (calls("initial", "password", "success"),
                         calls("unauthorized", "refresh_token", "rejected"),
                         calls("unauthorized", "password", "success"))
    assert 3 == sum(refreshes(daemon, t, r) for t in ("initial", "unauthorized")
                    for r in ("success", "failure"))
    assert ["refresh_token"] == [e["grant"] for e in logs.events("token_refresh_failed")]
    assert ["password", "password"] == [e["grant"] for e in logs.events("token_refreshed")]


async def test_a_failing_call_is_counted_as_an_error(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, logs: CapturedLogs
) -> None:
    """A 503 from the token endpoint is an error (it may work later), not a rejection."""
    idp = await start()
    idp.calls.default = respond(503, '{"error": "temporarily_unavailable"}')
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_for(lambda: refreshes(daemon, "initial", "error") == 1, "the failure")
    assert 0 == refreshes(daemon, "initial", "rejected")
    assert ["client_credentials"] == [e["grant"] for e in logs.events("token_refresh_failed")]


@pytest.mark.parametrize("status", [404, 405])
async def test_a_4xx_from_the_token_endpoint_is_counted_rejected(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, status: int,
) -> None:
    """A token endpoint answering 404 or 405 (a wrong token_url path, a GET-only route)
    is the endpoint saying no: counted ``rejected``, so the alert docs/metrics.md recommends
    fires; it is still retried with backoff (the route may come back)."""
    idp = await start()
    idp.calls.default = respond(status, "")
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_for(lambda: bool(idp.calls.seen), "the token call")
    await wait_for(lambda: refreshes(daemon, "initial", "failure") == 1, "it is counted")
    assert 1 == refreshes(daemon, "initial", "rejected"), "counted as error"


@pytest.mark.slow
async def test_a_refused_connection_to_the_token_endpoint_is_named_so(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, logs: CapturedLogs,
) -> None:
    """A token-endpoint failure names the host and the reason in the OS's words
    ("connection refused"), not asyncio's sentence."""
    idp = await start()
    port = closed_port()
    daemon = await make_proxy(oauth2_config(idp, tmp_path,
                                            token_url=f"http://127.0.0.1:{port}/token"))
    await wait_for(lambda: bool(logs.events("token_refresh_failed")), "a failed call")
    [failed] = logs.events("token_refresh_failed")
    assert f"http://127.0.0.1:{port}" in failed["error"]
    _, ready = await readyz(daemon)
    assert "connection refused" in failed["error"], failed["error"]
    assert "connection refused" in ready["providers"]["idp"]["error"]


@pytest.mark.slow
async def test_token_metric_labels_stay_bounded_whatever_the_issuer_answers(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    clock: JumpClock,
) -> None:
    """An issuer answering with invented error codes, 4xx and 5xx statuses, garbage and
    finally a token puts nothing of its answers into the token_refresh labels: grant, trigger
    and result keep to the documented values."""
    idp = await start()
    idp.calls.queue.extend([
        respond_json({"error": "x_evil_label_" + "a" * 40}, 400),
        respond_json({"error": "grant=evil,result=owned"}, 418),
        respond(500, "<html>"), respond(200, '{"access_token": 7}'),
    ])
    daemon = await make_proxy(oauth2_config(idp, tmp_path, **PASSWORD_GRANT))
    await wait_for(lambda: bool(idp.calls.seen), "the first call")
    await daemon.reload(daemon.config)   # the rejection made it unauthenticated: try again
    for _ in range(4):
        await clock.tick(120)
        await asyncio.sleep(0.05)
    samples = [s.labels for family in daemon.registry.collect()
               if family.name == "tokenproxy_token_refresh" for s in family.samples
               if s.name.endswith("_total")]
    assert samples
    assert 5 == len(idp.calls.seen)   # rejected, then (after the reload) 3 errors, a success
    for labels in samples:
        assert labels["grant"] in {"client_credentials", "password", "refresh_token",
                                   "json_login", "json_refresh", "command", "token_file",
                                   "discovery", "state_file"}, labels
        assert labels["trigger"] in {"initial", "expiry", "unauthorized", "manual"}, labels
        assert labels["result"] in {"success", "rejected", "error"}, labels


# -- fallback --------------------------------------------------------------------------------


async def test_invalid_grant_on_refresh_falls_back_to_login(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession, logs: CapturedLogs,
) -> None:
    """A refresh answered invalid_grant is followed by a fresh password login."""
    idp = await start()
    daemon = await make_proxy(oauth2_config(idp, tmp_path, refresh_margin=0, **PASSWORD_GRANT))
    await wait_ready(daemon)
    idp.issuer.revoke_all()
    clock.advance(11)
    assert 200 == (await fetch(http, daemon)).status
    assert ["password", "refresh_token", "password"] == idp.calls.grants()
    [ev] = logs.events("token_refresh_failed")
    assert ("refresh grant: status 400 (invalid_grant)", "login") == (ev["error"],
                                                                        ev["next_step"])
    assert [] == logs.events("provider_unauthenticated")
    assert 1 == metric(daemon, "tokenproxy_provider_authenticated", provider="idp")


async def test_rejected_refresh_without_credentials_is_unauthenticated(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession, logs: CapturedLogs,
) -> None:
    """A rejected refresh token without credentials: unauthenticated, 502, no retry loop."""
    idp = await start()
    first = (await password_grant(idp))["refresh_token"]
    daemon = await make_proxy(oauth2_config(idp, tmp_path, grant_type="refresh_token",
                                            refresh_token=first))
    await wait_ready(daemon)
    idp.issuer.revoke_all()
    await advance(clock, 5.1)
    await wait_for(lambda: bool(logs.events("provider_unauthenticated")), "unauthenticated")
    resp = await fetch(http, daemon)
    assert 502 == resp.status
    assert "urn:tokenproxy:problem:unauthenticated" == problem_type(resp)
    assert "unauthenticated" == resp.headers["Tokenproxy-Error"]
    status, doc = await readyz(daemon)
    assert 503 == status
    assert "unauthenticated" == doc["providers"]["idp"]["state"]
    assert "invalid_grant" in doc["providers"]["idp"]["error"]
    assert 0 == metric(daemon, "tokenproxy_provider_authenticated", provider="idp")
    assert "refresh grant: status 400 (invalid_grant)" in failures(logs)
    calls = len(idp.calls.seen)
    for _ in range(5):
        clock.advance(120)
        assert 502 == (await fetch(http, daemon)).status
    await settle()
    assert calls == len(idp.calls.seen)
    assert first not in json.dumps(doc)


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
    idp.calls.queue = [passthrough, UNAVAILABLE]
    assert 503 == await status_of(http, daemon, "/ok")   # refresh rejected, login failed
    assert ["password", "refresh_token", "password"] == idp.calls.grants()
    await clock.tick(6)   # past the backoff and the storm guard's window
    assert 200 == await status_of(http, daemon, "/ok")
    assert ["password", "refresh_token", "password", "password"] == idp.calls.grants(), (
        "the rejected refresh token was presented again")


# -- backoff ---------------------------------------------------------------------------------


async def test_token_endpoint_503_backs_off_and_recovers(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """A 503 token endpoint: 503 + Retry-After, no call before the backoff, recovery."""
    idp = await start()
    idp.calls.default = UNAVAILABLE
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    source = daemon.source("idp")
    await wait_for(lambda: refreshes(daemon, "initial", "failure") == 1, "the first failure")
    state = source.describe()
    assert "backoff" == state["state"]
    assert 1.0 <= state["retry_in"] <= 1.25   # never sooner than 1 s; jittered up to +25 %
    resp = await fetch(http, daemon)
    assert 503 == resp.status
    assert resp.headers["Retry-After"] in ("1", "2")
    assert "urn:tokenproxy:problem:token_unavailable" == problem_type(resp)
    status, doc = await readyz(daemon)
    assert (503, "backoff") == (status, doc["providers"]["idp"]["state"])
    await advance(clock, 0.99)
    assert 503 == (await fetch(http, daemon)).status
    await settle()
    assert 1 == len(idp.calls.seen)
    await advance(clock, state["retry_in"] - 0.99 + 0.06)
    await wait_for(lambda: 2 == len(idp.calls.seen), "the second attempt")
    await wait_for(lambda: refreshes(daemon, "initial", "failure") == 2, "the second failure")
    state = source.describe()
    assert 2.0 <= state["retry_in"] <= 2.5
    idp.calls.default = None
    await advance(clock, state["retry_in"] + 0.06)
    await wait_ready(daemon)
    assert 200 == (await fetch(http, daemon)).status
    assert 3 == len(idp.calls.seen)


async def test_outage_during_proactive_refresh_keeps_the_valid_token_in_use(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession, logs: CapturedLogs,
) -> None:
    """A failing background refresh leaves the valid token in use and is retried."""
    idp = await start()
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    idp.calls.default = UNAVAILABLE
    await advance(clock, 5.1)
    await wait_for(lambda: refreshes(daemon, "expiry", "failure") == 1, "the failure")
    assert 200 == (await fetch(http, daemon)).status
    status, doc = await readyz(daemon)
    assert (200, "valid", 1) == (status, doc["providers"]["idp"]["state"],
                                 doc["providers"]["idp"]["failures"])
    idp.calls.default = None
    await advance(clock, 1.26)   # past the longest first backoff (1 s + 25 % jitter)
    await wait_for(lambda: bool(logs.events("token_refreshed")[1:]), "the retried refresh")
    assert 200 == (await fetch(http, daemon)).status
    assert 3 == len(idp.calls.seen)
    assert "failures" not in (await readyz(daemon))[1]["providers"]["idp"]


@pytest.mark.slow
async def test_backoff_doubles_up_to_a_minute(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path
) -> None:
    """Backoff after each failure: 1, 2, 4 ... s, jittered up at most 25 %, at most 60."""
    idp = await start()
    idp.calls.default = UNAVAILABLE
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    source = daemon.source("idp")

    async def reach(get: Callable[[], float], target: float, what: str) -> None:
        await wait_for(lambda: target == get(), what)

    for n in range(1, 10):
        await reach(lambda: refreshes(daemon, "initial", "failure"), n, "a failure")
        ceiling = min(60.0, 2.0 ** (n - 1))
        retry_in = source.describe()["retry_in"]
        top = min(60.0, 1.25 * ceiling)
        assert ceiling - 0.05 <= retry_in <= top + 0.05, (n, retry_in)
        await advance(clock, retry_in + 0.06)
        await reach(lambda: len(idp.calls.seen), n + 1, "the next attempt")
    await settle()
    assert 10 == len(idp.calls.seen)


async def test_retry_after_from_the_token_endpoint_is_respected(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """A 429 with Retry-After: 30 backs off at least 30 s, and clients are told so."""
    idp = await start()
    idp.calls.default = respond(429, '{"error": "slow_down"}', headers={"Retry-After": "30"})
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_for(lambda: refreshes(daemon, "initial", "failure") == 1, "the failure")
    assert 30.0 == daemon.source("idp").describe()["retry_in"]
    resp = await fetch(http, daemon)
    assert (503, "30") == (resp.status, resp.headers["Retry-After"])


async def test_outage_with_many_requests_makes_few_token_calls(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """200 requests during an outage get 503 and cause only a few token calls."""
    idp = await start()
    idp.calls.default = UNAVAILABLE
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_for(lambda: refreshes(daemon, "initial", "failure") == 1, "the first failure")
    answers: list[Answer] = []
    for _ in range(20):
        answers += await asyncio.gather(*(fetch(http, daemon) for _ in range(10)))
        await clock.tick(0.5)
    assert [503] * 200 == [a.status for a in answers]
    assert all("Retry-After" in a.headers for a in answers)
    assert 2 <= len(idp.calls.seen) <= 5


async def _too_slow(request: web.Request, grant: str) -> None:
    await asyncio.sleep(0.6)


@pytest.mark.parametrize(("fault", "timeout", "error"), [
    pytest.param(_too_slow, "0.3s", "{where}: no answer within 0.3s", marks=pytest.mark.slow),
    (respond(200, "<html><body>Sign in to the Wi-Fi</body></html>", content_type="text/html"),
     "10s", "the answer is not valid JSON"),
    (respond(502, "<html>Bad gateway</html>", content_type="text/html"), "10s",
     "client_credentials grant: status 502"),
    (respond(500, '{"error": "server_error"}'), "10s",
     "client_credentials grant: status 500 (server_error)"),
    (respond(200, '{"access_token": "abc", "expires_in": 60'), "10s",
     "the answer is not valid JSON"),
    (respond(200, '{"access_token": "abc", "expires_in": NaN}'), "10s",
     "the answer is not valid JSON"),
    (respond(200, '{"access_token": "abc", "expires_in": Infinity}'), "10s",
     "the answer is not valid JSON"),
    (respond(200, '{"access_token": "abc", "access_token": "def"}'), "10s",
     "the answer is not valid JSON"),
    (respond_json({"token_type": "Bearer", "expires_in": 10}), "10s",
     "the answer carries no access token"),
    (respond_json({"access_token": "abc\r\nX-Injected: 1"}), "10s",
     "the access token contains characters a header cannot carry"),
    (respond(200, b'{"access_token": "' + b"a" * 70_000 + b'"}'), "10s",
     "the answer is larger than 65536 bytes"),
    (respond(302, "", headers={"Location": "/oauth/token"}), "10s",
     "{where}: redirected (status 302); not followed"),
], ids=["timeout", "html-200", "html-502", "json-500", "truncated", "nan-literal",
        "infinity-literal", "duplicate-keys", "no-access-token", "crlf-token", "oversize",
        "redirect"])
async def test_bad_token_answers_fail_with_backoff_and_recover(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession, logs: CapturedLogs, fault: Any, timeout: str, error: str,
) -> None:
    """A slow, garbled or redirecting answer is a failure with backoff, never a crash."""
    idp = await start()
    idp.calls.default = fault
    daemon = await make_proxy(oauth2_config(idp, tmp_path, timeout=timeout))
    await wait_for(lambda: refreshes(daemon, "initial", "failure") == 1, "the failure")
    assert [error.format(where=idp.url)] == failures(logs)   # a failed call names the host
    assert 1 == len(idp.calls.seen)   # a redirect is not followed
    resp = await fetch(http, daemon)
    assert 503 == resp.status
    assert "Retry-After" in resp.headers
    status, doc = await readyz(daemon)
    assert (503, "backoff") == (status, doc["providers"]["idp"]["state"])
    assert not (tmp_path / "state.json").exists()
    idp.calls.default = None
    await advance(clock, 1.26)   # past the longest first backoff (1 s + 25 % jitter)
    await wait_ready(daemon)
    assert 200 == (await fetch(http, daemon)).status


# -- persistence -----------------------------------------------------------------------------


@pytest.mark.parametrize("grant", ["password", "refresh_token"])
async def test_rotated_refresh_token_survives_a_restart(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession, grant: str,
) -> None:
    """After a restart the next refresh uses the stored rotated token, not a login."""
    idp = await start()
    if grant == "password":
        cfg = oauth2_config(idp, tmp_path, refresh_margin=0, **PASSWORD_GRANT)
    else:
        # The configured token is spent after the first start: presenting it again would
        # make the issuer revoke the whole family.
        first = (await password_grant(idp))["refresh_token"]
        cfg = oauth2_config(idp, tmp_path, refresh_margin=0, grant_type="refresh_token",
                            refresh_token=first)
    one = await make_proxy(cfg)
    await wait_ready(one)
    clock.advance(11)
    assert 200 == (await fetch(http, one)).status
    await one.stop()
    calls = len(idp.calls.seen)
    stored = state_entry(tmp_path / "state.json")
    two = await make_proxy(cfg)
    await wait_ready(two)
    assert 200 == (await fetch(http, two)).status
    assert calls == len(idp.calls.seen)   # the stored access token is still valid
    assert stored["access_token"] == idp.tap.bearers()[-1]
    clock.advance(11)
    assert 200 == (await fetch(http, two)).status
    last = idp.calls.seen[-1]
    assert ("refresh_token", stored["refresh_token"]) == (last.grant,
                                                          last.form["refresh_token"])
    assert 1 == idp.calls.grants().count("password")
    assert 0 == idp.issuer.stats.reuse_detected


async def test_new_refresh_token_in_the_config_beats_the_state_file(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """A refresh token newly put in the config wins over the stored one."""
    idp = await start()
    first = (await password_grant(idp))["refresh_token"]
    one = await make_proxy(oauth2_config(idp, tmp_path, grant_type="refresh_token",
                                         refresh_token=first))
    await wait_ready(one)
    await one.stop()
    second = (await password_grant(idp))["refresh_token"]
    two = await make_proxy(oauth2_config(idp, tmp_path, grant_type="refresh_token",
                                         refresh_token=second))
    await wait_ready(two)
    assert 200 == (await fetch(http, two)).status
    assert second == idp.calls.seen[-1].form["refresh_token"]
    assert 0 == idp.issuer.stats.reuse_detected


async def test_stray_temp_file_from_a_crash_is_ignored_and_cleaned(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """A stray temp file from a crash is ignored at start and removed at the next write."""
    idp = await start()
    cfg = oauth2_config(idp, tmp_path, refresh_margin=0, **PASSWORD_GRANT)
    one = await make_proxy(cfg)
    await wait_ready(one)
    await one.stop()
    stray = tmp_path / ".state.json.99999.12345.tmp"
    stray.write_text('{"version": 1, "providers": {"idp:')
    past = time.time() - 3600
    os.utime(stray, (past, past))
    two = await make_proxy(cfg)
    await wait_ready(two)
    assert 200 == (await fetch(http, two)).status
    assert ["password"] == idp.calls.grants()
    clock.advance(11)
    assert 200 == (await fetch(http, two)).status
    assert ["password", "refresh_token"] == idp.calls.grants()
    assert not stray.exists()
    assert idp.calls.seen[-1].form["refresh_token"] != state_entry(
        tmp_path / "state.json")["refresh_token"]


async def test_unwritable_state_keeps_tokens_in_memory(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession, logs: CapturedLogs,
) -> None:
    """An unwritable state file is logged; the rotated token lives on in memory."""
    idp = await start()
    folder = tmp_path / "state"
    daemon = await make_proxy(oauth2_config(idp, tmp_path, refresh_margin=0, **PASSWORD_GRANT,
                                            top={"state_path": str(folder / "state.json")}))
    await wait_ready(daemon)
    for entry in folder.iterdir():
        entry.unlink()
    folder.rmdir()
    folder.write_text("now a file: no directory can be made here")
    for _ in range(2):
        clock.advance(11)
        assert 200 == (await fetch(http, daemon)).status
    assert ["password", "refresh_token", "refresh_token"] == idp.calls.grants()
    assert 0 == idp.issuer.stats.reuse_detected
    assert 2 == len(logs.events("state_write_failed"))


@pytest.mark.parametrize("content", [
    b"", b'{"version": 1, "providers": {"idp:', b"}{ not json", b'{"version": 7}',
    b'["version", 1]',
], ids=["empty", "truncated", "bad-json", "wrong-version", "wrong-schema"])
async def test_corrupt_state_file_set_aside_never_fatal(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession,
    logs: CapturedLogs, content: bytes,
) -> None:
    """A corrupt state file is set aside unchanged with a warning; never fatal."""
    idp = await start()
    path = tmp_path / "state.json"
    path.write_bytes(content)
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_ready(daemon)
    assert 200 == (await fetch(http, daemon)).status
    [aside] = list(tmp_path.glob("state.json.corrupt-*"))
    assert content == aside.read_bytes()
    assert 1 == len(logs.events("state_file_corrupt"))
    assert idp.tap.bearers()[-1] == state_entry(path)["access_token"]


async def test_state_file_mode_0600(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    """The state file is created 0600 (and a directory it needs 0700)."""
    idp = await start()
    path = tmp_path / "private" / "state.json"
    daemon = await make_proxy(oauth2_config(idp, tmp_path, top={"state_path": str(path)}))
    await wait_ready(daemon)
    assert 0o600 == stat.S_IMODE(path.stat().st_mode)
    assert 0o700 == stat.S_IMODE(path.parent.stat().st_mode)


async def test_refresh_token_on_disk_before_the_new_access_token_is_used(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession, logs: CapturedLogs,
) -> None:
    """The refresh token is in the state file before its access token is first used."""
    idp = await start()
    path = tmp_path / "state.json"
    checks: list[tuple[bool, bool]] = []

    def on_new_bearer(bearer: str) -> None:
        entry = state_entry(path)
        family = idp.issuer._access[bearer][0]
        checks.append((bearer == entry["access_token"],
                       family.live_refresh == entry["refresh_token"]))

    idp.tap.on_new_bearer = on_new_bearer
    presented: list[bool] = []

    async def check_presented(request: web.Request, grant: str) -> None:
        if grant == "refresh_token":
            presented.append(idp.calls.seen[-1].form["refresh_token"]
                             == state_entry(path)["refresh_token"])

    idp.calls.default = check_presented
    daemon = await make_proxy(oauth2_config(idp, tmp_path, **PASSWORD_GRANT))
    await wait_ready(daemon)
    assert 200 == (await fetch(http, daemon)).status          # initial
    await advance(clock, 5.1)                                  # background refresh
    # Installed, not only answered (the metric counts the call when its answer is in): a
    # token obtained before the revocation below would be revoked with it.
    await wait_for(lambda: [e["trigger"] for e in logs.events("token_refreshed")][-1:]
                   == ["expiry"], "the refresh")
    assert 200 == (await fetch(http, daemon)).status
    idp.issuer.revoke_all()                                    # 401 -> refresh -> login
    assert 200 == (await fetch(http, daemon)).status
    assert [(True, True)] * 3 == checks
    assert [True, True] == presented
    assert ["password", "refresh_token", "refresh_token", "password"] == idp.calls.grants()


@pytest.mark.slow
async def test_shutdown_lets_a_token_call_finish_and_persist(
    aiohttp_server: AiohttpServer, make_proxy: MakeProxy, tmp_path: Path
) -> None:
    """Stopping while a token call is in flight waits for it and writes its result."""
    async def token(request: web.Request) -> web.Response:
        await asyncio.sleep(0.4)
        return web.json_response({"access_token": "slow-call-token-5678", "expires_in": 300,
                                  "refresh_token": "slow-call-refresh-9012"})

    app = web.Application()
    app.router.add_post("/token", token)
    server = await aiohttp_server(app)
    state = tmp_path / "s.json"
    raw = proxy_config("http://127.0.0.1:9/", TOKEN, state_path=str(state))
    raw["providers"] = {"api": {"type": "oauth2",
                                "token_url": f"http://127.0.0.1:{server.port}/token",
                                "client_id": "c", "client_secret": CLIENT_SECRET}}
    daemon = await make_proxy(raw)
    await asyncio.sleep(0.1)                 # the initial call is in flight
    await daemon.stop(grace=1)
    assert "slow-call-refresh-9012" in state.read_text()


# -- two daemons on one state file -----------------------------------------------------------


@pytest.mark.slow
async def test_two_daemons_sharing_a_state_file_never_reuse_a_refresh_token(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """Two daemons sharing a state file never present a spent refresh token."""
    idp = await start()
    cfg = oauth2_config(idp, tmp_path, **PASSWORD_GRANT)
    one = await make_proxy(cfg)
    two = await make_proxy(cfg)
    await wait_ready(one)
    await wait_ready(two)
    for _ in range(4):
        answers = await asyncio.gather(*(fetch(http, d, f"/r{i}") for d in (one, two)
                                         for i in range(10)))
        assert [200] * 20 == [a.status for a in answers]
        await advance(clock, 11, napping=2)
    answers = await asyncio.gather(*(fetch(http, d) for d in (one, two) for _ in range(10)))
    assert [200] * 20 == [a.status for a in answers]
    assert 0 == idp.issuer.stats.reuse_detected
    assert 1 == idp.calls.grants().count("password")
    assert 4 <= idp.calls.grants().count("refresh_token")
    assert 0 == idp.issuer.stats.api_unauthorized


async def test_token_command_reuses_the_daemons_valid_token(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """obtain_token returns the daemon's valid token from the state file, no call."""
    clock.set_wall(time.time())   # obtain_token runs on the system clock
    idp = await start()
    raw = oauth2_config(idp, tmp_path, **PASSWORD_GRANT)
    daemon = await make_proxy(raw)
    await wait_ready(daemon)
    assert 200 == (await fetch(http, daemon)).status
    value = await obtain_token(build_config(raw, {}), "idp", redactor=Redactor())
    assert idp.tap.bearers()[-1] == value
    assert ["password"] == idp.calls.grants()


async def test_token_command_and_daemon_share_rotation(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """obtain_token and a daemon hand the rotated refresh token on via the state file."""
    clock.set_wall(time.time() - 8)   # to the system clock, the daemon's token has 2 s left
    idp = await start()
    raw = oauth2_config(idp, tmp_path, **PASSWORD_GRANT)
    daemon = await make_proxy(raw)
    await wait_ready(daemon)
    value = await obtain_token(build_config(raw, {}), "idp", redactor=Redactor())
    assert ["password", "refresh_token"] == idp.calls.grants()
    assert value == state_entry(tmp_path / "state.json")["access_token"]
    await advance(clock, 5.1)   # the daemon's background refresh finds the newer token
    await wait_for(lambda: refreshes(daemon, "expiry") == 1, "the daemon's refresh")
    assert 200 == (await fetch(http, daemon)).status
    assert value == idp.tap.bearers()[-1]
    assert ["password", "refresh_token"] == idp.calls.grants()
    clock.advance(20)
    assert 200 == (await fetch(http, daemon)).status
    assert ["password", "refresh_token", "refresh_token"] == idp.calls.grants()
    assert 0 == idp.issuer.stats.reuse_detected


# -- readiness, metrics and logs -------------------------------------------------------------


async def test_readyz_503_until_the_first_token(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    """/readyz is 503 (fetching) until the first token, which waiting requests get."""
    idp = await start()
    release = asyncio.Event()
    idp.calls.queue.append(gate(release))
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_for(lambda: 1 == len(idp.calls.seen), "the first call")
    status, doc = await readyz(daemon)
    assert (503, "not ready") == (status, doc["status"])
    assert {"type": "oauth2", "state": "fetching", "expires_in": None} == doc["providers"]["idp"]
    request = asyncio.create_task(fetch(http, daemon))
    await wait_for(lambda: 1 == count(daemon, "tokenproxy_token_refresh_coalesced_total",
                                      provider="idp"), "the request to wait")
    release.set()
    assert 200 == (await asyncio.wait_for(request, 5)).status
    status, doc = await readyz(daemon)
    assert (200, "ready", "valid") == (status, doc["status"], doc["providers"]["idp"]["state"])
    assert 1 == len(idp.calls.seen)


async def test_metrics_and_log_events_over_a_token_lifetime(
    start: StartIdp, make_proxy: MakeProxy, clock: JumpClock, tmp_path: Path,
    http: aiohttp.ClientSession, logs: CapturedLogs,
) -> None:
    """Refreshes are counted by trigger, timed, logged; the expiry gauge follows."""
    idp = await start()
    daemon = await make_proxy(oauth2_config(idp, tmp_path, refresh_margin=0))
    await wait_ready(daemon)
    assert clock.time() + 10 == metric(daemon, EXPIRY, provider="idp")
    clock.advance(11)
    assert 200 == (await fetch(http, daemon)).status
    assert clock.time() + 10 == metric(daemon, EXPIRY, provider="idp")
    idp.issuer.revoke_all()
    assert 200 == (await fetch(http, daemon)).status
    assert (1, 1, 1) == (refreshes(daemon, "initial"), refreshes(daemon, "expiry"),
                         refreshes(daemon, "unauthorized"))
    assert 0 == sum(refreshes(daemon, t, "failure") for t in ("initial", "expiry",
                                                              "unauthorized"))
    assert 3 == metric(daemon, "tokenproxy_token_refresh_duration_seconds_count",
                       provider="idp")
    assert 1 == metric(daemon, "tokenproxy_provider_authenticated", provider="idp")
    events = [(e["provider"], e["trigger"], e["expires_in"], e["level"])
              for e in logs.events("token_refreshed")]
    assert [("idp", t, 10.0, "info") for t in ("initial", "expiry", "unauthorized")] == events
    async with http.get(f"http://127.0.0.1:{daemon.admin_port}/metrics") as r:
        text = await r.text()
    for name in ("tokenproxy_token_refresh_total{", "tokenproxy_token_refresh_duration_seconds",
                 "tokenproxy_token_refresh_coalesced_total", EXPIRY,
                 "tokenproxy_provider_authenticated{"):
        assert name in text


async def test_failure_events_name_provider_and_error(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, logs: CapturedLogs
) -> None:
    """token_refresh_failed and provider_unauthenticated carry the provider and the error."""
    idp = await start()
    idp.calls.default = respond_json({"error": "invalid_client"}, 401)
    daemon = await make_proxy(oauth2_config(idp, tmp_path))
    await wait_for(lambda: bool(logs.events("provider_unauthenticated")), "unauthenticated")
    [failed] = logs.events("token_refresh_failed")
    [unauth] = logs.events("provider_unauthenticated")
    error = "client_credentials grant: status 401 (invalid_client)"
    assert ("idp", error, "warning") == (failed["provider"], failed["error"], failed["level"])
    assert ("idp", error, "error") == (unauth["provider"], unauth["error"], unauth["level"])
    assert 1 == refreshes(daemon, "initial", "failure")
