"""Replicas sharing their tokens through Redis (shared_state): their config, encryption key
files, the answers a test reads from an in-process replica, and the shared state's store and
key names as a daemon derives them. (/readyz is tests/helpers/wait.py's readyz.)"""

from __future__ import annotations

import asyncio
import base64
import os
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from tests.helpers.idp import PASSWORD_GRANT, Idp, gate, oauth2_config
from tests.helpers.redis_server import RedisServer
from tests.helpers.wait import wait_for
from tokenproxy.config import build_config
from tokenproxy.daemon import Daemon
from tokenproxy.demo.issuer import Issuer
from tokenproxy.metrics import Metrics
from tokenproxy.tokens.shared.redis_store import RedisStore

# The issuer's password grant, demand-only: a login is possible, the refresh tokens rotate,
# and a token is renewed only when a request needs one (the test moves the clock).
REPLICA_GRANT: dict[str, Any] = {**PASSWORD_GRANT, "refresh_margin": 0}


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
    """A replica: the issuer's API behind provider ``idp`` (REPLICA_GRANT unless *provider*
    says else), its tokens in *redis* (or at *url*), no state file."""
    raw = oauth2_config(idp, tmp_path, **{**REPLICA_GRANT, **provider})
    del raw["state_path"]
    raw["shared_state"] = {"redis_url": url or redis.url, "timeout": timeout,
                           "lock_ttl": lock_ttl}
    if key is not None:
        raw["shared_state"]["encryption_key_file"] = str(key)
    return raw


def static_config(shared_state: dict[str, Any]) -> dict[str, Any]:
    """The least config with *shared_state*: one static provider ``s``, one route (nowhere)."""
    return {"providers": {"s": {"type": "static", "token": "x"}}, "shared_state": shared_state,
            "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:1", "provider": "s"}]}


def refresh_token_config(redis: RedisServer, *, key: Path | None = None,
                         url: str | None = None) -> dict[str, Any]:
    """A config for the command line: provider ``rt`` holds a configured refresh token (it
    cannot log in) at a token endpoint nobody serves, its tokens in *redis* (or at *url*)."""
    shared: dict[str, Any] = {"redis_url": url or redis.url, "timeout": "0.5s"}
    if key is not None:
        shared["encryption_key_file"] = str(key)
    return {"shared_state": shared,
            "providers": {"rt": {"type": "oauth2", "grant_type": "refresh_token",
                                 "token_url": "http://127.0.0.1:9/token", "client_auth": "none",
                                 "client_id": "c", "refresh_token": "rt-secret-0123456789"}},
            "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:9", "provider": "rt"}]}


def redis_store(redis: RedisServer, **shared_state: Any) -> RedisStore:
    """A RedisStore on *redis* with these shared_state keys (timeouts, lock_ttl...), as a
    daemon builds it; the caller closes it."""
    cfg = build_config(static_config({"redis_url": redis.url, **shared_state}), {})
    assert cfg.shared_state is not None
    return RedisStore(cfg.shared_state, Metrics(CollectorRegistry(), "test"))


def tokens_key_of(raw: dict[str, Any], provider: str) -> str:
    """The Redis key of *provider*'s tokens under the config *raw*, as its daemon derives it
    (key_prefix, then tokens:, then the fingerprint of the grant's identity)."""
    cfg = build_config(raw, {})
    assert cfg.shared_state is not None
    store = RedisStore(cfg.shared_state, Metrics(CollectorRegistry(), "test"))
    key = store.key_for(provider, cfg.providers[provider].identity())
    return f"{cfg.shared_state.key_prefix}tokens:{key}"


async def status(daemon: Daemon, path: str = "/api/x") -> tuple[int, dict[str, Any]]:
    """A GET through an in-process replica: its status, and the problem cause, Retry-After
    and body of an answer of tokenproxy's own."""
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{daemon.port()}{path}") as resp:
        body = await resp.read()
        return resp.status, {"cause": resp.headers.get("Tokenproxy-Error"),
                             "retry_after": resp.headers.get("Retry-After"),
                             "body": body.decode()}


async def token_call_held(idp: Idp, daemon: Daemon
                          ) -> tuple[asyncio.Event, asyncio.Task[tuple[int, dict[str, Any]]]]:
    """A request through *daemon* whose token-endpoint call the issuer holds until the
    returned event is set; returns once that call has reached the issuer (the replica then
    holds the refresh lock), with the request still waiting."""
    released = asyncio.Event()
    idp.calls.queue.append(gate(released))
    before = len(idp.calls.seen)
    request = asyncio.create_task(status(daemon))
    await wait_for(lambda: len(idp.calls.seen) == before + 1, "the token call at the issuer")
    return released, request
