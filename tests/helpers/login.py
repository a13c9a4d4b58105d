"""Logging in as yourself under test (tests/test_login*.py): the config of a provider a
person logs in to at the demo issuer, `tokenproxy login` run in-process on the test's clock,
the person approving a device code or playing the browser, and the daemon picking it up."""

from __future__ import annotations

import asyncio
import io
import json
import re
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers.client import fetch
from tests.helpers.fakes import JumpClock
from tests.helpers.idp import Idp
from tests.helpers.wait import settle, wait_for
from tokenproxy.config import build_config
from tokenproxy.daemon import Daemon
from tokenproxy.log import Redactor
from tokenproxy.login.run import run_login_command

LOGIN_POLL = 1.0
INTERVAL = 5


def me(idp: Idp, grant: str = "device_code", **extra: Any) -> dict[str, Any]:
    return {"type": "oauth2", "issuer": idp.url, "client_id": "demo-cli", "grant_type": grant,
            "scope": "openid offline_access", **extra}


def login_config(idp: Idp, tmp_path: Path, **provider: Any) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
        "state_path": str(tmp_path / "state" / "state.json"),
        "providers": {"me": me(idp, **provider)},
        "routes": [{"prefix": "/", "upstream": idp.url + "/api/", "provider": "me"}],
    }


async def login(raw: dict[str, Any], clock: JumpClock, *names: str, command: str = "login",
                out: io.StringIO | None = None) -> int:
    return await run_login_command(build_config(raw, {}), command, list(names),
                                   out=out or io.StringIO(), redactor=Redactor(),
                                   no_browser=True, clock=clock)


async def device_login(idp: Idp, raw: dict[str, Any], clock: JumpClock,
                       out: io.StringIO | None = None, names: tuple[str, ...] = ("me",)) -> int:
    """`tokenproxy login me` (or *names*), the person approving the code at the issuer."""
    out = out or io.StringIO()
    task = asyncio.ensure_future(login(raw, clock, *names, out=out))
    def shown() -> bool:
        codes = idp.issuer.pending_user_codes
        return task.done() or (len(codes) == 1 and codes[0] in out.getvalue())

    await wait_for(shown, "the device code shown")
    if task.done():
        return await task
    [code] = idp.issuer.pending_user_codes
    idp.issuer.approve(code)
    for _ in range(20):
        if task.done():
            break
        await clock.tick(INTERVAL)
        await settle()
    return await asyncio.wait_for(task, 5)


async def picked_up(clock: JumpClock, http: aiohttp.ClientSession, daemon: Daemon,
                    path: str = "/hello") -> dict[str, Any]:
    """Move the clock a login poll on; the daemon then serves: the API's answer."""
    for _ in range(5):
        await clock.tick(LOGIN_POLL)
        await settle()
        resp = await fetch(http, daemon, path)
        if resp.status == 200:
            answer: dict[str, Any] = json.loads(resp.body)
            return answer
    raise AssertionError(f"the login was not picked up: {resp.status} {resp.text}")


def printed_url(out: io.StringIO) -> str:
    found = re.search(r"(http://127\.0\.0\.1:\d+/oauth/authorize\?\S+)", out.getvalue())
    assert found is not None, out.getvalue()
    return found[1]


async def browser_started(idp: Idp, raw: dict[str, Any], clock: JumpClock
                          ) -> tuple[asyncio.Future[int], io.StringIO]:
    out = io.StringIO()
    task = asyncio.ensure_future(login(raw, clock, "me", out=out))
    await wait_for(lambda: "/oauth/authorize?" in out.getvalue() or task.done(),
                   "the authorization URL printed")
    return task, out


async def follow(url: str) -> tuple[int, str, str | None]:
    """What a browser does: the authorization URL, then the redirect it answers with."""
    async with aiohttp.ClientSession() as browser:
        async with browser.get(url, allow_redirects=False) as resp:
            location = resp.headers.get("Location")
        if location is None:
            return resp.status, "", None
        async with browser.get(location, allow_redirects=False) as back:
            return back.status, await back.text(), location


