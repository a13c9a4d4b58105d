"""Replicas sharing their tokens through a real Redis (docs/replicas.md): in-process daemons on
the test clock, each with its own Redis client, in front of the rotating, reuse-detecting
issuer. The processes-and-load proof is tests/test_replicas.py."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.helpers.config import MakeProxy, command_provider, upstream_url, write_config
from tests.helpers.fakes import PASSWORD, FakeClock, FakeUpstream, JumpClock
from tests.helpers.idp import StartIdp, TokenCall, advance, oauth2_config
from tests.helpers.logs import CapturedLogs
from tests.helpers.metrics import count, metric, refreshes
from tests.helpers.redis_server import RedisServer
from tests.helpers.replicas import (
    REPLICA_GRANT,
    key_file,
    redis_store,
    refresh_token_config,
    replica_config,
    static_config,
    status,
    token_call_held,
    tokens_key_of,
)
from tests.helpers.wait import readyz, wait_for
from tokenproxy.cli import main
from tokenproxy.config import build_config
from tokenproxy.daemon import Daemon
from tokenproxy.errors import ConfigError
from tokenproxy.log import Redactor
from tokenproxy.tokens.factory import obtain_token
from tokenproxy.tokens.state import StateLockTimeout, StoredTokens

LIFETIME = 10.0


async def start_replicas(make_proxy: MakeProxy, raw: dict[str, Any],
                         n: int = 2) -> list[Daemon]:
    """*n* in-process replicas of *raw*, started one after the other (not yet asked)."""
    return [await make_proxy(raw) for _ in range(n)]


# -- one refresh across replicas ---------------------------------------------------------


async def test_a_second_replica_adopts_the_first_ones_token(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: FakeClock,
) -> None:
    """One login for two replicas started together: whichever takes the lock first logs in;
    the other finds its token in Redis, at its start or under the lock (then counted as
    adopted), and calls nobody."""
    idp = await start(lifetime=LIFETIME)
    a, b = await start_replicas(make_proxy, replica_config(idp, tmp_path, redis_server))
    assert 200 == (await status(a))[0]
    assert 200 == (await status(b))[0]
    assert {"password": 1} == idp.issuer.stats.grants
    assert sum(refreshes(d, "initial", grant="shared") for d in (a, b)) <= 1
    assert idp.tap.bearers()[0] == idp.tap.bearers()[1]


async def test_concurrent_expiries_on_two_replicas_make_one_call(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: FakeClock,
) -> None:
    """Both replicas' tokens expire at once and both get requests: one refresh-token call,
    the other replica adopts it; no refresh token is spent twice."""
    idp = await start(lifetime=LIFETIME)
    a, b = await start_replicas(make_proxy, replica_config(idp, tmp_path, redis_server))
    assert [200, 200] == [(await status(d))[0] for d in (a, b)]
    for _ in range(3):
        await clock.tick(LIFETIME + 1)
        answers = await asyncio.gather(*(status(d) for d in (a, b, a, b)))
        assert [200] * 4 == [code for code, _ in answers]
    assert {"password": 1, "refresh_token": 3} == idp.issuer.stats.grants
    assert 0 == idp.issuer.stats.reuse_detected
    adopted = sum(refreshes(d, "expiry", grant="shared") for d in (a, b))
    assert 3 == adopted
    waits = sum(count(d, "tokenproxy_shared_state_lock_wait_seconds_count") for d in (a, b))
    assert waits >= 6


async def test_replicas_with_other_credentials_never_share(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
) -> None:
    """The key derives from the grant's identity: another client id (or user) is another
    entry; the provider's name is not part of it."""
    idp = await start(lifetime=LIFETIME)
    raw = replica_config(idp, tmp_path, redis_server)
    renamed = replica_config(idp, tmp_path, redis_server)
    renamed["providers"] = {"other": renamed["providers"]["idp"]}
    renamed["routes"][0]["provider"] = "other"
    scoped = replica_config(idp, tmp_path, redis_server, scope="read")
    a, b, c = [await make_proxy(r) for r in (raw, renamed, scoped)]
    for d in (a, b, c):
        assert 200 == (await status(d))[0]
    assert {"password": 2} == idp.issuer.stats.grants   # renamed shared, scoped did not
    assert 2 == len(redis_server.keys("tokenproxy:tokens:*"))


@pytest.mark.parametrize("credential", ["client_id", "username"])
async def test_another_client_id_or_user_is_another_entry_with_its_own_login(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    credential: str,
) -> None:
    """Same token endpoint, same grant, another client id (the issuer knows the client by
    that id now) or another user of the issuer: its own key in Redis and its own login, never
    the first replica's token."""
    idp = await start(lifetime=LIFETIME, users={"demo": PASSWORD, "other-user": PASSWORD})
    raw = replica_config(idp, tmp_path, redis_server)
    a = await make_proxy(raw)
    assert 200 == (await status(a))[0]
    if credential == "client_id":
        idp.issuer.client_id = "other-client"   # the issuer knows the client by this id now
        other = replica_config(idp, tmp_path, redis_server, client_id="other-client")
        second_login = ("other-client", "demo")
    else:
        other = replica_config(idp, tmp_path, redis_server, username="other-user")
        second_login = ("demo-client", "other-user")
    b = await make_proxy(other)
    assert 200 == (await status(b))[0]
    assert {"password": 2} == idp.issuer.stats.grants

    def login(call: TokenCall) -> tuple[str, str]:
        client = base64.b64decode(call.headers["authorization"][6:]).decode().split(":")[0]
        return client, call.form["username"]

    assert [("demo-client", "demo"), second_login] == [login(c) for c in idp.calls.seen]
    keys = sorted([tokens_key_of(raw, "idp"), tokens_key_of(other, "idp")])
    assert keys == redis_server.keys("tokenproxy:tokens:*")
    first, second = idp.tap.bearers()
    assert first != second


@pytest.mark.slow
async def test_proactive_timers_of_three_replicas_make_one_call(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: JumpClock,
) -> None:
    """Every replica's background refresh comes due at about the same time: the first to
    take the lock refreshes, the others find its token and adopt it. No request waits."""
    idp = await start(lifetime=LIFETIME)
    raw = replica_config(idp, tmp_path, redis_server, refresh_margin="3s")
    daemons = await start_replicas(make_proxy, raw, 3)
    for d in daemons:
        assert 200 == (await status(d))[0]
    for expiry in range(1, 4):
        await advance(clock, LIFETIME - 2, napping=3)
        await wait_for(lambda n=expiry: sum(
            refreshes(d, "expiry", grant=g) for d in daemons
            for g in ("refresh_token", "shared")) == 3 * n, "every replica renewed")
    assert {"password": 1, "refresh_token": 3} == idp.issuer.stats.grants
    assert 0 == idp.issuer.stats.reuse_detected


@pytest.mark.slow
async def test_the_token_command_takes_the_replicas_token(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
) -> None:
    """``tokenproxy token`` reads the shared state: the replicas' token, no call of its own."""
    idp = await start(lifetime=LIFETIME)
    raw = replica_config(idp, tmp_path, redis_server)
    (a,) = await start_replicas(make_proxy, raw, 1)
    assert 200 == (await status(a))[0]
    token = await obtain_token(build_config(raw, {}), "idp", redactor=Redactor())
    assert [token] == idp.tap.bearers()
    assert {"password": 1} == idp.issuer.stats.grants


async def test_the_token_command_stores_its_token_for_the_replicas(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: JumpClock,
) -> None:
    """``tokenproxy token`` writes the shared state too: with Redis empty it logs in and
    stores the entry; a replica started after it takes that token, no call of its own."""
    clock.set_wall(time.time())   # the command stamps its entry with the system's wall clock
    idp = await start(lifetime=LIFETIME)
    raw = replica_config(idp, tmp_path, redis_server)
    assert [] == redis_server.keys()
    token = await obtain_token(build_config(raw, {}), "idp", redactor=Redactor())
    assert {"password": 1} == idp.issuer.stats.grants
    assert [tokens_key_of(raw, "idp")] == redis_server.keys("tokenproxy:tokens:*")
    (a,) = await start_replicas(make_proxy, raw, 1)
    assert 200 == (await status(a))[0]
    assert [token] == idp.tap.bearers()
    assert {"password": 1} == idp.issuer.stats.grants


# -- fencing and refresh tokens in doubt ----------------------------------------------------


async def test_a_late_writer_adopts_the_newer_token_and_spends_nothing_twice(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: FakeClock, logs: CapturedLogs,
) -> None:
    """Replica A's refresh call hangs past its lease (the lock is gone: as if A was paused);
    B takes over. B does not spend the refresh token A had begun spending (A marked it): it
    logs in. A's answer then arrives; its write is refused (fenced) and A adopts B's token.
    The stored token is B's throughout, and no refresh token was presented twice."""
    idp = await start(lifetime=LIFETIME)
    a, b = await start_replicas(make_proxy, replica_config(idp, tmp_path, redis_server))
    assert [200, 200] == [(await status(d))[0] for d in (a, b)]
    await clock.tick(LIFETIME + 1)
    before = len(idp.calls.grants())
    held, slow = await token_call_held(idp, a)
    assert ["refresh_token"] == idp.calls.grants()[before:]
    assert 1 == len(redis_server.keys("tokenproxy:lock:*"))
    redis_server.client().delete(*redis_server.keys("tokenproxy:lock:*"))   # A's lease ran out
    code, _ = await status(b)
    assert 200 == code
    assert ["refresh_token", "password"] == idp.calls.grants()[before:]
    stored_after_b = redis_server.get_all("tokenproxy:tokens:*")
    held.set()
    assert 200 == (await slow)[0]
    assert 0 == idp.issuer.stats.reuse_detected
    assert 1 == len(logs.events("shared_state_write_fenced"))
    assert ["another replica began spending it and did not finish"] == [
        e["reason"] for e in logs.events("refresh_token_in_doubt")]
    assert stored_after_b == redis_server.get_all("tokenproxy:tokens:*")
    bearers = idp.tap.bearers()
    assert bearers[-1] == bearers[-2]   # A's retry-free request carried B's token


@pytest.mark.slow
async def test_the_lease_is_renewed_while_a_refresh_call_runs(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: FakeClock,
) -> None:
    """lock_ttl 1 s, and A's refresh call takes 2.5 s (real time) at the token endpoint: A
    renews its lease meanwhile, so the lock stays A's throughout (the same owner value, its
    TTL never run out) and B, needing a token meanwhile, waits. Afterwards: one
    refresh-token call, and B adopted A's token."""
    idp = await start(lifetime=LIFETIME)
    raw = replica_config(idp, tmp_path, redis_server, lock_ttl="1s", timeout="0.2s")
    a = await make_proxy(raw)
    assert 200 == (await status(a))[0]
    b = await make_proxy(raw)
    assert 200 == (await status(b))[0]
    await clock.tick(LIFETIME + 1)
    held, slow = await token_call_held(idp, a)
    assert ["password", "refresh_token"] == idp.calls.grants()
    [lock] = redis_server.keys("tokenproxy:lock:*")
    loop = asyncio.get_running_loop()
    seen: list[tuple[Any, int]] = []
    async with redis_server.aclient() as r:
        owner = await r.get(lock)
        waiting = asyncio.create_task(status(b))
        until = loop.time() + 2.5
        while loop.time() < until:
            seen.append((await r.get(lock), await r.pttl(lock)))
            await asyncio.sleep(0.05)
        assert not waiting.done(), "B did not wait for A's refresh"
    held.set()
    assert 200 == (await slow)[0]
    assert 200 == (await waiting)[0]
    assert owner is not None
    assert {owner} == {o for o, _ in seen}, "the lock changed hands"
    assert min(ttl for _, ttl in seen) > 0
    assert len(seen) > 20
    assert {"password": 1, "refresh_token": 1} == idp.issuer.stats.grants
    assert 0 == idp.issuer.stats.reuse_detected
    assert 1 == refreshes(b, "expiry", grant="shared")
    assert idp.tap.bearers()[-1] == idp.tap.bearers()[-2]


async def test_after_redis_lost_its_data_a_new_entry_is_not_taken_for_an_old_one(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: FakeClock,
) -> None:
    """A replica tells its own entry from another's by the version it last read or wrote.
    B rotates three times and remembers the version it wrote; Redis loses its data
    (FLUSHALL); A logs in afresh and rotates three times too. A new entry starts at a random
    version (not at 1, where A's fourth entry would carry the very version B remembers), so
    B takes A's entry for another's and adopts it: no call of its own, nothing spent twice."""
    idp = await start(lifetime=LIFETIME)
    raw = replica_config(idp, tmp_path, redis_server)
    a = await make_proxy(raw)
    assert 200 == (await status(a))[0]       # A logs in
    b = await make_proxy(raw)
    assert 200 == (await status(b))[0]       # B took A's entry at its start
    for _ in range(3):
        await clock.tick(LIFETIME + 1)
        assert 200 == (await status(b))[0]   # B rotates; A is asked nothing
    client = redis_server.client()
    name = tokens_key_of(raw, "idp")
    client.flushall()
    versions: list[int] = []
    for _ in range(4):
        await clock.tick(LIFETIME + 1)
        assert 200 == (await status(a))[0]   # a login (the entry is lost), then rotations
        versions.append(int(client.hget(name, "ver") or 0))
    assert versions[0] > 1000, versions
    assert [versions[0] + n for n in range(4)] == versions
    calls = idp.calls.grants()
    adopted = refreshes(b, "expiry", grant="shared")
    assert 200 == (await status(b))[0]
    assert calls == idp.calls.grants(), "B spent its own refresh token"
    assert adopted + 1 == refreshes(b, "expiry", grant="shared")
    assert {"password": 2, "refresh_token": 6} == idp.issuer.stats.grants
    assert 0 == idp.issuer.stats.reuse_detected
    assert idp.tap.bearers()[-1] == idp.tap.bearers()[-2]


# -- Redis away ----------------------------------------------------------------------------


@pytest.mark.slow
async def test_redis_down_valid_tokens_go_on_refresh_tokens_wait_then_heal(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: FakeClock, logs: CapturedLogs,
) -> None:
    """Killed Redis: a valid token is still used; once it expires, a provider holding a
    refresh token answers 503 shared_state_unavailable (not spending it unlocked) and
    /readyz says why. Redis back (empty: no persistence): it heals without a restart, and
    since the entry is gone it logs in rather than spend a refresh token that may be stale."""
    idp = await start(lifetime=LIFETIME)
    (a,) = await start_replicas(make_proxy, replica_config(idp, tmp_path, redis_server), 1)
    assert 200 == (await status(a))[0]
    assert 1 == metric(a, "tokenproxy_shared_state_up")
    redis_server.kill()
    assert 200 == (await status(a))[0]
    await clock.tick(LIFETIME + 1)
    code, doc = await status(a)
    assert (503, "shared_state_unavailable", "1") == (code, doc["cause"], doc["retry_after"])
    ready, body = await readyz(a)
    assert 503 == ready
    assert "shared_state_unavailable" == body["providers"]["idp"]["state"]
    assert "redis://127.0.0.1:" in body["providers"]["idp"]["error"]
    assert 0 == metric(a, "tokenproxy_shared_state_up")
    assert count(a, "tokenproxy_shared_state_errors_total", operation="lock") >= 1
    assert 0 == metric(a, "tokenproxy_shared_state_up")
    redis_server.restart()
    await wait_for(lambda: metric(a, "tokenproxy_shared_state_up") == 1, "Redis back")
    await clock.tick(1.5)
    assert 200 == (await status(a))[0]
    assert {"password": 2} == idp.issuer.stats.grants
    assert 0 == idp.issuer.stats.reuse_detected
    assert 1 == len(logs.events("shared_state_unavailable"))
    assert 1 == len(logs.events("shared_state_restored"))
    assert ["the shared state lost this provider's entry"] == [
        e["reason"] for e in logs.events("refresh_token_in_doubt")]


@pytest.mark.parametrize("grant", ["client_credentials", "json_login"])
async def test_a_provider_without_refresh_token_refreshes_locally_while_redis_is_down(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: FakeClock, grant: str,
) -> None:
    """Nothing to spend twice: with Redis killed, an oauth2 client_credentials provider and
    a json provider that logs in without a refresh call get their next token alone."""
    idp = await start(lifetime=LIFETIME)
    raw = replica_config(idp, tmp_path, redis_server, grant_type="client_credentials",
                         username=None, password=None)
    if grant == "json_login":
        raw["providers"]["idp"] = {
            "type": "json", "refresh_margin": 0,
            "login": {"url": idp.url + "/auth/login",
                      "json": {"username": "demo", "password": PASSWORD},
                      "access_token": "/accessToken", "expires_in": "/expiresIn"}}
    (a,) = await start_replicas(make_proxy, raw, 1)
    assert 200 == (await status(a))[0]
    assert 1 == len(redis_server.keys("tokenproxy:tokens:*"))   # it did use Redis
    redis_server.kill()
    await clock.tick(LIFETIME + 1)
    assert 200 == (await status(a))[0]
    assert {grant: 2} == idp.issuer.stats.grants
    assert 2 == len(set(idp.tap.bearers()))


@pytest.mark.slow
async def test_a_command_provider_runs_its_command_while_redis_is_down(
    make_proxy: MakeProxy, redis_server: RedisServer, upstream: TestServer,
    fake_upstream: FakeUpstream, tmp_path: Path, clock: FakeClock,
) -> None:
    """A command provider holds no refresh token: with Redis killed, once its token's
    cache_for has passed, it runs the command again and serves the new token."""
    runs = tmp_path / "runs"
    script = (f"import pathlib; p = pathlib.Path({str(runs)!r}); "
              "n = int(p.read_text()) + 1 if p.exists() else 1; p.write_text(str(n)); "
              "print('cmd-token-%d' % n)")
    raw: dict[str, Any] = {
        "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
        "providers": {"cmd": command_provider(script, cache_for="30s", refresh_margin=0)},
        "routes": [{"prefix": "/", "upstream": upstream_url(upstream), "provider": "cmd"}],
        "shared_state": {"redis_url": redis_server.url, "timeout": "0.5s"}}
    (a,) = await start_replicas(make_proxy, raw, 1)
    assert 200 == (await status(a, "/x"))[0]
    assert [tokens_key_of(raw, "cmd")] == redis_server.keys("tokenproxy:tokens:*")
    redis_server.kill()
    await clock.tick(31)
    assert 200 == (await status(a, "/x"))[0]
    sent = [seen.header("Authorization") for seen in fake_upstream.seen]
    assert [["Bearer cmd-token-1"], ["Bearer cmd-token-2"]] == sent
    assert "2" == runs.read_text()


@pytest.mark.slow
async def test_a_hung_redis_costs_a_refresh_its_timeout_and_never_the_event_loop(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: FakeClock,
) -> None:
    """Redis stopped (SIGSTOP): connections open, nothing answers. A request needing a new
    token gets its 503 within about the operation timeout, and the admin listener answers
    meanwhile."""
    idp = await start(lifetime=LIFETIME)
    (a,) = await start_replicas(make_proxy, replica_config(idp, tmp_path, redis_server,
                                                           timeout="0.5s"), 1)
    assert 200 == (await status(a))[0]
    await clock.tick(LIFETIME + 1)
    redis_server.pause()
    try:
        started = time.monotonic()
        waiting = asyncio.create_task(status(a))
        probe_started = time.monotonic()
        await readyz(a)   # 200 or 503: what matters is that it answers now
        probe = time.monotonic() - probe_started
        code, doc = await waiting
        took = time.monotonic() - started
    finally:
        redis_server.resume()
    assert (503, "shared_state_unavailable") == (code, doc["cause"])
    assert took < 2.0
    assert probe < 0.5


async def test_without_shared_state_no_shared_state_series_is_exported(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
) -> None:
    """tokenproxy_shared_state_* exist only in a daemon with a Redis store: one without
    shared_state exports no tokenproxy_shared_state_up 0 for an alert to fire on."""
    idp = await start(lifetime=LIFETIME)
    alone = await make_proxy(oauth2_config(idp, tmp_path, **REPLICA_GRANT))
    shared = await make_proxy(replica_config(idp, tmp_path, redis_server))
    assert [200, 200] == [(await status(d))[0] for d in (alone, shared)]

    def families(daemon: Daemon) -> list[str]:
        return sorted(f.name for f in daemon.registry.collect()
                      if f.name.startswith("tokenproxy_shared_state"))

    assert metric(alone, "tokenproxy_shared_state_up") is None
    assert [] == families(alone)
    assert "tokenproxy_shared_state" not in await _metrics_text(alone)
    assert 1 == metric(shared, "tokenproxy_shared_state_up")
    assert ["tokenproxy_shared_state_errors", "tokenproxy_shared_state_lock_wait_seconds",
            "tokenproxy_shared_state_up"] == families(shared)


# -- encryption ------------------------------------------------------------------------------


async def test_with_a_key_redis_holds_no_token_in_clear(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
) -> None:
    idp = await start(lifetime=LIFETIME)
    (a,) = await start_replicas(make_proxy, replica_config(idp, tmp_path, redis_server,
                                                           key=key_file(tmp_path)), 1)
    assert 200 == (await status(a))[0]
    issued = [*idp.issuer._access, *idp.issuer._refresh]
    dump = redis_server.raw_dump()
    assert len(issued) == 2
    assert [] == [t for t in issued if t.encode() in dump]


async def test_without_a_key_tokens_are_stored_in_clear(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
) -> None:
    """The counterpart of the test above: what it looks for is there without a key."""
    idp = await start(lifetime=LIFETIME)
    (a,) = await start_replicas(make_proxy, replica_config(idp, tmp_path, redis_server), 1)
    assert 200 == (await status(a))[0]
    dump = redis_server.raw_dump()
    assert all(t.encode() in dump for t in [*idp.issuer._access, *idp.issuer._refresh])


async def test_a_wrong_key_is_a_clear_error_not_a_crash(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    logs: CapturedLogs,
) -> None:
    """A replica with another key neither crashes nor overwrites the entry, nor goes on
    alone: 503 naming the key id, /readyz saying it, the entry left as it was."""
    idp = await start(lifetime=LIFETIME)
    a = await make_proxy(replica_config(idp, tmp_path, redis_server,
                                        key=key_file(tmp_path, "a.key")))
    assert 200 == (await status(a))[0]
    stored = redis_server.get_all("tokenproxy:tokens:*")
    b = await make_proxy(replica_config(idp, tmp_path, redis_server,
                                        key=key_file(tmp_path, "b.key")))
    code, doc = await status(b)
    assert (503, "shared_state_unavailable") == (code, doc["cause"])
    assert "which encryption_key_file does not hold" in doc["body"]
    assert "shared_state_unavailable" == (await readyz(b))[1]["providers"]["idp"]["state"]
    assert logs.events("shared_state_unreadable")
    assert stored == redis_server.get_all("tokenproxy:tokens:*")
    assert {"password": 1} == idp.issuer.stats.grants


async def test_with_a_key_an_entry_in_clear_is_refused(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
) -> None:
    """Whoever can write Redis must not choose the token: with a key, a clear entry (one a
    keyless replica wrote, or anyone) is not used."""
    idp = await start(lifetime=LIFETIME)
    a = await make_proxy(replica_config(idp, tmp_path, redis_server))
    assert 200 == (await status(a))[0]
    b = await make_proxy(replica_config(idp, tmp_path, redis_server, key=key_file(tmp_path)))
    code, doc = await status(b)
    assert (503, "shared_state_unavailable") == (code, doc["cause"])
    assert "stored in clear text" in doc["body"]


# -- the store itself ----------------------------------------------------------------------


async def test_writes_are_fenced_by_the_version_read(redis_server: RedisServer) -> None:
    """A write applies only if the entry's version is still the one its writer read; each
    applied write moves the version on by one from where the first one put it."""
    store = redis_store(redis_server)
    try:
        first = StoredTokens("access-1", None, "refresh-1", 1.0, None, version=0)
        base = await store.write("k", first)
        assert base
        read = await store.read("k")
        assert read is not None
        assert (base, "access-1") == (read.version, read.access_token)
        newer = StoredTokens("access-2", None, "refresh-2", 2.0, None, version=base)
        assert base + 1 == await store.write("k", newer)
        stale = StoredTokens("access-old", None, "refresh-old", 3.0, None, version=base)
        assert await store.write("k", stale) is None
        again = StoredTokens("access-new", None, "refresh-new", 3.0, None, version=0)
        assert await store.write("k", again) is None   # "no entry yet" is stale too
        now = await store.read("k")
        assert now is not None
        assert (base + 1, "access-2") == (now.version, now.access_token)
    finally:
        await store.close()


@pytest.mark.slow
async def test_the_lock_is_a_lease_released_only_by_its_owner(
    redis_server: RedisServer,
) -> None:
    """Two stores of one process (same host, same pid). A holds the lock; B waits for it in
    vain. A's lease runs out (the key is gone) and B takes the lock; A then leaves its block:
    its unlock must not delete B's lock (the owner value's random part tells them apart);
    B's own unlock does."""
    a = redis_store(redis_server, lock_ttl="1s", timeout="0.2s")
    b = redis_store(redis_server, lock_ttl="1s", timeout="0.2s")
    client = redis_server.client()
    lock = "tokenproxy:lock:k"
    try:
        async with contextlib.AsyncExitStack() as holding_b:
            async with a.locked("k", 5):
                owner_a = client.get(lock)
                assert isinstance(owner_a, bytes)
                with pytest.raises(StateLockTimeout):
                    async with b.locked("k", 0.3):
                        pass
                client.delete(lock)                          # A's lease ran out
                await holding_b.enter_async_context(b.locked("k", 1))
                owner_b = client.get(lock)
                assert isinstance(owner_b, bytes)
                host_pid = f"{socket.gethostname()}:{os.getpid()}:".encode()
                assert owner_a.startswith(host_pid)
                assert owner_b.startswith(host_pid)
                assert owner_a != owner_b
            assert owner_b == client.get(lock), "A's unlock released B's lock"
        assert client.get(lock) is None
    finally:
        await a.close()
        await b.close()


@pytest.mark.parametrize(("shared", "error"), [
    ({"redis_url": "http://127.0.0.1:6379"}, "shared_state.redis_url: expected a redis://"),
    ({"redis_url": "redis://h:6379/0?ssl_cert_reqs=none"}, "shared_state.redis_url: query"),
    ({"redis_url": "redis://h:99999"}, "shared_state.redis_url: not a valid URL"),
    ({"redis_url": "redis://h", "lock_ttl": "1s", "timeout": "1s"},
     "shared_state.lock_ttl: must be at least twice"),
    ({}, "shared_state.redis_url: set it"),
    ({"redis_url": "redis://h", "lok_ttl": "1s"}, "shared_state.lok_ttl: unknown key"),
])
def test_bad_shared_state_settings_name_the_key(shared: dict[str, Any], error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(static_config(shared), {})
    assert str(caught.value).startswith(error)


@pytest.mark.slow
@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "unix:///run/redis.sock"])
def test_a_ca_file_without_tls_is_a_config_error(url: str, cert: tuple[Path, Path]) -> None:
    """redis-py would refuse ssl_ca_certs for a plain connection at start, with a traceback:
    the config says so first, naming the key."""
    with pytest.raises(ConfigError) as caught:
        build_config(static_config({"redis_url": url, "ca_file": str(cert[1])}), {})
    assert str(caught.value).startswith("shared_state.ca_file: applies to rediss://")


@pytest.mark.parametrize(("text", "error"), [
    ("", "is empty"),
    ("not base64 at all!\n", "line 1 of"),
    (base64.b64encode(b"short").decode(), "holds 5 bytes, not 32"),
    ("# only a comment\n\n", "holds no key"),
])
def test_a_bad_key_file_names_the_key_and_the_line(tmp_path: Path, text: str,
                                                   error: str) -> None:
    path = tmp_path / "k"
    path.write_text(text)
    raw = static_config({"redis_url": "redis://h", "encryption_key_file": str(path)})
    with pytest.raises(ConfigError) as caught:
        build_config(raw, {})
    assert str(caught.value).startswith("shared_state.encryption_key_file:")
    assert error in str(caught.value)


def test_with_shared_state_no_state_path_is_needed(tmp_path: Path) -> None:
    raw = {"providers": {"idp": {"type": "oauth2", "token_url": "http://127.0.0.1:1/t",
                                 "client_id": "c", "client_secret": "s"}},
           "shared_state": {"redis_url": "redis://127.0.0.1:1/0"},
           "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:1", "provider": "idp"}]}
    assert build_config(raw, {}).state_path is None
    del raw["shared_state"]
    with pytest.raises(ConfigError):
        build_config(raw, {})



# -- the command line and reload -------------------------------------------------------------


def _cli_config(tmp_path: Path, redis: RedisServer, *, key: Path | None = None,
                url: str | None = None) -> Path:
    return write_config(tmp_path, refresh_token_config(redis, key=key, url=url), "shared.yaml")


def test_check_config_shows_the_url_without_password_and_warns_without_a_key(
    tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str],
) -> None:
    url = f"redis://:pw-9f8e7d6c5b4a@127.0.0.1:{redis_server.port}/0"
    assert 0 == main(["check-config", "-c", str(_cli_config(tmp_path, redis_server, url=url))])
    out = capsys.readouterr().out
    assert "pw-9f8e7d6c5b4a" not in out
    assert (f"shared_state: redis://127.0.0.1:{redis_server.port}/0 key_prefix=tokenproxy: "
            "encryption=off lock_ttl=15s timeout=0.5s") in out.splitlines()
    assert "warning: shared_state has no encryption_key_file" in out
    keyed = _cli_config(tmp_path, redis_server, key=key_file(tmp_path))
    assert 0 == main(["check-config", "-c", str(keyed)])
    out = capsys.readouterr().out
    assert "encryption=on" in out
    assert "warning" not in out


def test_check_config_online_asks_redis_and_reads_without_writing(
    tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str],
) -> None:
    path = _cli_config(tmp_path, redis_server)
    assert 0 == main(["check-config", "--online", "-c", str(path)])
    out = capsys.readouterr().out
    assert (f"  shared_state: ok (redis://127.0.0.1:{redis_server.port}/0 answers; 0 of the "
            "providers' entries stored)") in out.splitlines()
    assert [] == redis_server.keys()
    redis_server.kill()
    assert 1 == main(["check-config", "--online", "-c", str(path)])
    out = capsys.readouterr().out
    assert "  shared_state: failed: shared state redis://127.0.0.1:" in out
    assert out.endswith("failed: shared_state\n")


async def test_a_reload_moves_the_tokens_into_the_shared_state(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: FakeClock,
) -> None:
    """From the state file to Redis by a reload: the provider's identity did not change, so
    its token is kept; its next refresh is stored in Redis and the state file is left."""
    idp = await start(lifetime=LIFETIME)
    file_raw = oauth2_config(idp, tmp_path, **REPLICA_GRANT)
    daemon = await make_proxy(file_raw)
    assert 200 == (await status(daemon))[0]
    changed = await daemon.reload(build_config(replica_config(idp, tmp_path, redis_server), {}))
    assert ["idp"] == changed["providers_changed"]
    assert 200 == (await status(daemon))[0]
    assert {"password": 1} == idp.issuer.stats.grants, redis_server.get_all()   # kept
    await clock.tick(LIFETIME + 1)
    assert 200 == (await status(daemon))[0]
    assert 1 == len(redis_server.keys("tokenproxy:tokens:*"))
    assert {"password": 1, "refresh_token": 1} == idp.issuer.stats.grants


# -- TLS and passwords -----------------------------------------------------------------------


@pytest.mark.slow
async def test_rediss_with_a_ca_file_and_a_password_that_never_shows(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, clock: FakeClock,
    cert: tuple[Path, Path], logs: CapturedLogs,
) -> None:
    """A TLS Redis (certificate generated by the test) with a password: tokens shared over
    it; then Redis gone: neither the 503's body, /readyz, the metrics nor any log line
    carries the password."""
    password = "redis-pw-5e4d3c2b1a"
    server = RedisServer(tmp_path / "redis-tls", password=password, tls=cert).start()
    try:
        idp = await start(lifetime=LIFETIME)
        raw = replica_config(idp, tmp_path, server)
        raw["shared_state"]["ca_file"] = str(cert[1])
        assert raw["shared_state"]["redis_url"].startswith(f"rediss://:{password}@")
        a, b = await start_replicas(make_proxy, raw)
        assert [200, 200] == [(await status(d))[0] for d in (a, b)]
        assert {"password": 1} == idp.issuer.stats.grants
        server.kill()
        await clock.tick(LIFETIME + 1)
        code, doc = await status(a)
        assert (503, "shared_state_unavailable") == (code, doc["cause"])
        seen = [doc["body"], str(await readyz(a)), logs.text,
                (await _metrics_text(a))]
        assert [] == [text for text in seen if password in text]
        assert f"rediss://127.0.0.1:{server.port}/0" in doc["body"]
    finally:
        server.stop()


async def test_a_wrong_redis_password_is_a_clear_error(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, clock: FakeClock,
    logs: CapturedLogs,
) -> None:
    server = RedisServer(tmp_path / "redis-pw", password="the-right-one-77").start()
    try:
        idp = await start(lifetime=LIFETIME)
        raw = replica_config(idp, tmp_path, server)
        raw["shared_state"]["redis_url"] = raw["shared_state"]["redis_url"].replace(
            "the-right-one-77", "a-wrong-one-88")
        (a,) = await start_replicas(make_proxy, raw, 1)
        assert 200 == (await status(a))[0]   # no refresh token yet: a local login
        await clock.tick(LIFETIME + 1)
        code, doc = await status(a)
        assert (503, "shared_state_unavailable") == (code, doc["cause"])
        assert "authentication failed" in doc["body"]
        assert "a-wrong-one-88" not in logs.text + doc["body"]
    finally:
        server.stop()


async def _metrics_text(daemon: Daemon) -> str:
    async with aiohttp.ClientSession() as s, s.get(
            f"http://127.0.0.1:{daemon.admin_port}/metrics") as resp:
        return await resp.text()
