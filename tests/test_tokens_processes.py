"""Separate OS processes sharing one state file never spend a rotating refresh token twice."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pytest_aiohttp import AiohttpServer

from tests.helpers.config import write_config
from tests.helpers.daemon_proc import child_env, running_daemon
from tests.helpers.fakes import CLIENT_SECRET, PASSWORD
from tests.helpers.idp import password_grant_config
from tokenproxy.demo.issuer import Issuer

LIFETIME = 1.0   # real seconds: tokens expire several times during the test


def _config(issuer: Issuer, state: Path) -> dict[str, Any]:
    return password_grant_config(issuer, state, "0.4s")


@pytest.mark.slow
async def test_daemon_and_token_commands_share_rotation_safely(
    aiohttp_server: AiohttpServer, tmp_path: Path
) -> None:
    """A daemon refreshing in the background and `tokenproxy token` runs in other processes,
    all on one state file, go through several rotations with no refresh-token reuse, and the
    daemon keeps answering."""
    issuer = Issuer(lifetime=LIFETIME, client_secret=CLIENT_SECRET,
                    users={"demo": PASSWORD})
    server = await aiohttp_server(issuer.app())
    issuer.base_url = f"http://127.0.0.1:{server.port}"
    state = tmp_path / "state.json"
    raw = _config(issuer, state)
    cfg_path = write_config(tmp_path, raw, "token-cmd.yaml")

    async def token_command() -> int:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tokenproxy", "token", "-c", str(cfg_path), "idp",
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=child_env(tmp_path))
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
        assert out.strip()
        return proc.returncode or 0

    async with running_daemon(raw, tmp_path) as daemon:
        statuses: list[int] = []
        async with aiohttp.ClientSession() as s:
            loop = asyncio.get_running_loop()
            end = loop.time() + 4 * LIFETIME
            while loop.time() < end:
                codes = await asyncio.gather(token_command(), token_command())
                assert [0, 0] == codes
                async with s.get(daemon.url("/x")) as resp:
                    statuses.append(resp.status)
    assert 0 == issuer.stats.reuse_detected
    assert issuer.stats.grants.get("refresh_token", 0) >= 3   # rotations really happened
    assert [200] * len(statuses) == statuses
    assert 0o600 == state.stat().st_mode & 0o777
