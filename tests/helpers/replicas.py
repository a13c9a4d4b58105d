"""Replicas sharing their tokens through Redis (shared_state): their config, encryption key
files, and the answers a test reads from an in-process replica."""

from __future__ import annotations

import base64
import os
from pathlib import Path
from typing import Any

import aiohttp

from tests.helpers.fakes import PASSWORD
from tests.helpers.idp import Idp, oauth2_config
from tests.helpers.redis_server import RedisServer
from tokenproxy.daemon import Daemon
from tokenproxy.demo.issuer import Issuer

# A password grant: a login is possible, and the refresh tokens rotate.
PASSWORD_GRANT: dict[str, Any] = {"grant_type": "password", "username": "demo",
                                  "password": PASSWORD, "refresh_margin": 0}


def key_file(tmp_path: Path, name: str = "state.key", *keys: bytes) -> Path:
    """An encryption_key_file (0600) holding *keys*, first line first; one random key by
    default."""
    path = tmp_path / name
    lines = [base64.b64encode(k).decode() for k in (keys or (os.urandom(32),))]
    path.write_text("\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def replica_config(idp: Idp | Issuer, tmp_path: Path, redis: RedisServer, *,
                   url: str | None = None, key: Path | None = None, timeout: str = "0.5s",
                   lock_ttl: str = "3s", **provider: Any) -> dict[str, Any]:
    """A replica: the issuer's API behind provider ``idp`` (PASSWORD_GRANT unless *provider*
    says else), its tokens in *redis* (or at *url*), no state file."""
    raw = oauth2_config(idp, tmp_path, **{**PASSWORD_GRANT, **provider})
    del raw["state_path"]
    raw["shared_state"] = {"redis_url": url or redis.url, "timeout": timeout,
                           "lock_ttl": lock_ttl}
    if key is not None:
        raw["shared_state"]["encryption_key_file"] = str(key)
    return raw


async def status(daemon: Daemon, path: str = "/api/x") -> tuple[int, dict[str, Any]]:
    """A GET through an in-process replica: its status, and the problem cause, Retry-After
    and body of an answer of tokenproxy's own."""
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{daemon.port()}{path}") as resp:
        body = await resp.read()
        return resp.status, {"cause": resp.headers.get("Tokenproxy-Error"),
                             "retry_after": resp.headers.get("Retry-After"),
                             "body": body.decode()}


async def readyz(daemon: Daemon) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{daemon.admin_port}/readyz") as resp:
        return resp.status, await resp.json()
