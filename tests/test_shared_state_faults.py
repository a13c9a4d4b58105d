"""The shared state under attack and faults (docs/replicas.md): a hostile or broken Redis,
skewed clocks, stalled holders, tampered entries, reloads at bad moments. Each test of the
first sections failed once, against a hole since closed (its docstring says which, after
"Once:"); the last section holds the attacks the design withstood from the start.

Real Redis (the ``redis_server`` fixture), the real rotating, reuse-detecting Issuer, real
daemons on the test clock; nothing of tokenproxy is mocked. The only test-owned machinery is a
TCP relay in front of Redis for one replica (a stalled network path, or a replica paused at a
chosen command) and a clock wrapper that shifts one replica's wall time (clock skew)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from tests.helpers.config import MakeProxy, write_config
from tests.helpers.fakes import PASSWORD, JumpClock
from tests.helpers.idp import StartIdp, oauth2_config
from tests.helpers.logs import CapturedLogs
from tests.helpers.metrics import metric
from tests.helpers.redis_server import RedisServer
from tests.helpers.replicas import (
    key_file,
    refresh_token_config,
    replica_config,
    static_config,
    status,
    token_call_held,
    tokens_key_of,
)
from tests.helpers.wait import readyz, wait_for
from tokenproxy import log
from tokenproxy.cli import main
from tokenproxy.config import build_config
from tokenproxy.daemon import Daemon
from tokenproxy.errors import ConfigError
from tokenproxy.tokens.shared.redis_store import _MARK

LIFETIME = 10.0


# -- helpers ---------------------------------------------------------------------------------


def tokens_key(redis: RedisServer) -> str:
    """The one tokens key in *redis*."""
    [name] = redis.keys("tokenproxy:tokens:*")
    return name


class SkewedClock:
    """The test clock as seen by a replica whose wall time is *skew* seconds off (another
    machine); monotonic time and sleeps are the shared clock's."""

    def __init__(self, base: JumpClock, skew: float) -> None:
        self.base, self.skew = base, skew

    def monotonic(self) -> float:
        return self.base.monotonic()

    def time(self) -> float:
        return self.base.time() + self.skew

    async def sleep(self, seconds: float) -> None:
        await self.base.sleep(seconds)


@contextlib.asynccontextmanager
async def daemon_on(raw: dict[str, Any], clock: Any) -> AsyncIterator[Daemon]:
    """A daemon like make_proxy's, on a clock of the test's choosing."""
    daemon = Daemon(build_config(raw, {}), registry=CollectorRegistry(), clock=clock,
                    redactor=log.Redactor(), fast_path=True)
    await daemon.start()
    try:
        yield daemon
    finally:
        await daemon.stop(grace=1)


class Relay:
    """A loopback TCP relay in front of Redis for one replica. ``hold_next(pattern)``: the
    next chunk that replica sends containing *pattern* is held back until ``release`` is set
    (the replica stalled right before that command reached Redis)."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.port = 0
        self._pattern: bytes | None = None
        self.held = asyncio.Event()
        self.release = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def hold_next(self, pattern: bytes) -> None:
        self._pattern = pattern
        self.held.clear()
        self.release.clear()

    async def start(self) -> Relay:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        try:
            sr, sw = await asyncio.open_connection("127.0.0.1", self.target)
        except OSError:
            cw.close()
            return
        pumps = [asyncio.ensure_future(self._pump(cr, sw, True)),
                 asyncio.ensure_future(self._pump(sr, cw, False))]
        self._tasks.update(pumps)
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for p in pumps:
            p.cancel()
        sw.close()
        cw.close()

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter,
                    upstream: bool) -> None:
        with contextlib.suppress(ConnectionError, TimeoutError, OSError):
            while data := await r.read(1 << 16):
                if upstream and self._pattern is not None and self._pattern in data:
                    self._pattern = None
                    self.held.set()
                    await asyncio.wait_for(self.release.wait(), 10)
                w.write(data)
                await w.drain()

    async def close(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


# == refresh tokens spent twice ================================================================


async def test_a_wall_clock_step_back_never_spends_a_refresh_token_twice(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: JumpClock,
) -> None:
    """The hosts' wall clock steps back 120 s (NTP correcting a clock that ran ahead, a VM
    resumed). A refreshes and stores R2 stamped with the earlier wall time; B then needs a
    token and takes R2, calling nobody: the entry's version says it is newer, whatever its
    stamp. One refresh-token call, no reuse. Once: B compared wall stamps, found the entry
    'older' than its own tokens and spent R1 again."""
    idp = await start(lifetime=LIFETIME)
    raw = replica_config(idp, tmp_path, redis_server)
    a, b = await make_proxy(raw), await make_proxy(raw)
    assert [200, 200] == [(await status(d))[0] for d in (a, b)]
    clock.jump_wall(-120)
    await clock.tick(LIFETIME + 1)
    assert 200 == (await status(a))[0]   # one refresh-token call: R1 -> R2, stored
    await status(b)                      # must adopt R2, call nobody
    assert 0 == idp.issuer.stats.reuse_detected, "a refresh token was spent twice"
    assert {"password": 1, "refresh_token": 1} == idp.issuer.stats.grants


async def test_clock_skew_between_replicas_never_spends_a_refresh_token_twice(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: JumpClock,
) -> None:
    """Replica A's wall clock runs 5 s ahead of B's (other machines); tokens live 5 minutes.
    A logs in, B adopts; a second later the issuer revokes the access tokens, so each
    replica's next request gets a 401. B refreshes first (R1 -> R2, stamped with B's wall
    time: 4 s 'before' A's login); A then adopts R2 rather than spend R1: one refresh-token
    call, no reuse. Once: A judged the entry by its wall stamp, kept R1 and spent it again."""
    idp = await start(lifetime=300.0)
    raw = replica_config(idp, tmp_path, redis_server)
    async with daemon_on(raw, SkewedClock(clock, +5.0)) as a:
        b = await make_proxy(raw)
        assert 200 == (await status(a))[0]   # A logs in
        assert 200 == (await status(b))[0]   # B adopts
        await clock.tick(1)
        idp.issuer.revoke_access()           # every replica's next request gets a 401
        assert 200 == (await status(b))[0]   # B: 401, refresh R1 -> R2, stored
        await status(a)                      # A: 401; must adopt R2
        assert 0 == idp.issuer.stats.reuse_detected, "a refresh token was spent twice"
        assert {"password": 1, "refresh_token": 1} == idp.issuer.stats.grants


async def test_a_holder_stalled_between_read_and_mark_never_spends_twice(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: JumpClock,
) -> None:
    """A takes the lock and reads the entry, then stalls (paused) before its mark_spending
    reaches Redis, past its lease; B takes the lock, marks, spends R1 and stores R2. A's
    mark then lands: it must be refused (the lock is no longer A's, the version moved on), so
    A does not spend R1 again."""
    idp = await start(lifetime=LIFETIME)
    relay = await Relay(redis_server.port).start()
    try:
        a = await make_proxy(replica_config(idp, tmp_path, redis_server, url=relay.url,
                                           timeout="2s", lock_ttl="4s"))
        b = await make_proxy(replica_config(idp, tmp_path, redis_server, timeout="2s",
                                           lock_ttl="4s"))
        assert [200, 200] == [(await status(d))[0] for d in (a, b)]
        await clock.tick(LIFETIME + 1)
        mark = hashlib.sha1(_MARK.encode()).hexdigest()  # noqa: S324 - how Redis names a script
        relay.hold_next(mark.encode())   # A's mark_spending
        slow = asyncio.create_task(status(a))
        await asyncio.wait_for(relay.held.wait(), 5)
        # A holds the lock and has read the entry; its lease runs out while it is stalled.
        redis_server.client().delete(*redis_server.keys("tokenproxy:lock:*"))
        assert 200 == (await status(b))[0]           # B: lock, read, mark, R1 -> R2, store
        relay.release.set()                          # A's mark lands; A goes on
        await asyncio.wait_for(slow, 10)
    finally:
        await relay.close()
    assert 0 == idp.issuer.stats.reuse_detected, "a refresh token was spent twice"
    assert 1 == idp.issuer.stats.grants.get("refresh_token")


@pytest.mark.parametrize("reload", [False, True], ids=["no_reload", "after_reload"])
async def test_after_a_reload_lost_shared_state_still_casts_doubt(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: JumpClock, reload: bool,
) -> None:
    """docs/replicas.md: a replica that had tokens in the shared state and then finds its
    provider's entry gone treats the refresh token in its memory as possibly outdated and
    logs in afresh. A reload that changes shared_state (a new timeout, a rotated key) rebuilds
    the provider, which keeps that memory: after Redis loses its data, A (still holding R1,
    which B has rotated since) does not spend R1, with the reload as without it (the
    control). Once: the rebuilt provider forgot it had seen the entry and spent R1: reuse."""
    idp = await start(lifetime=LIFETIME)
    raw = replica_config(idp, tmp_path, redis_server)
    a, b = await make_proxy(raw), await make_proxy(raw)
    assert [200, 200] == [(await status(d))[0] for d in (a, b)]   # A logs in, B adopts
    await clock.tick(LIFETIME + 1)
    assert 200 == (await status(b))[0]       # B: R1 -> R2; A still holds R1 (demand-only)
    if reload:
        changed = replica_config(idp, tmp_path, redis_server, timeout="0.6s")
        assert ["idp"] == (await a.reload(build_config(changed, {})))["providers_changed"]
    redis_server.restart()                   # no persistence: the entry is gone
    code, _ = await status(a)
    if code == 503:                          # the pooled connection died with the server
        await wait_for(lambda: metric(a, "tokenproxy_shared_state_up") == 1, "the condition")
        await clock.tick(1.5)
        code, _ = await status(a)
    assert 0 == idp.issuer.stats.reuse_detected, "a stale refresh token was spent"


# == tokens shared across identities ===========================================================


@pytest.mark.parametrize("where", ["state_file", "shared_state"])
async def test_providers_that_differ_only_in_params_never_share_a_token(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    where: str,
) -> None:
    """Two providers of one config, one client, two audiences (`params: {audience: ...}`, the
    example docs/configuration.md gives): with the state file and with shared_state alike,
    each provider asks for a token of its own audience, and API B never receives a token
    that API A received. Once: the shared_state key left `params` out of the identity, so
    the second provider adopted the first one's token."""
    idp = await start(lifetime=LIFETIME)
    raw = oauth2_config(idp, tmp_path, grant_type="client_credentials",
                        params={"audience": "https://a.example"})
    other = {**raw["providers"]["idp"], "params": {"audience": "https://b.example"}}
    raw["providers"]["other"] = other
    raw["routes"] = [{"prefix": "/a/", "upstream": idp.url + "/api/a/", "provider": "idp"},
                     {"prefix": "/b/", "upstream": idp.url + "/api/b/", "provider": "other"}]
    if where == "shared_state":
        del raw["state_path"]
        raw["shared_state"] = {"redis_url": redis_server.url, "timeout": "0.5s"}
    d = await make_proxy(raw)
    assert 200 == (await status(d, "/a/x"))[0]
    assert 200 == (await status(d, "/b/x"))[0]
    audiences = sorted(c.form.get("audience", "") for c in idp.calls.seen)
    assert ["https://a.example", "https://b.example"] == audiences
    assert set(idp.tap.bearers("/api/a/x")).isdisjoint(idp.tap.bearers("/api/b/x"))


async def test_json_providers_for_other_tenants_never_share_a_token(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
) -> None:
    """A json provider's identity holds its whole login body but for secrets: two logins that
    differ only in another field (a tenant, an account, a realm) are two entries, each with
    a login of its own. Once: only the first of username/user/email/login/client_id in the
    body counted, and logins for other tenants shared one entry."""
    idp = await start(lifetime=LIFETIME)

    def provider(tenant: str) -> dict[str, Any]:
        return {"type": "json", "refresh_margin": 0,
                "login": {"url": idp.url + "/auth/login",
                          "json": {"username": "demo", "password": PASSWORD, "tenant": tenant},
                          "access_token": "/accessToken", "expires_in": "/expiresIn"}}

    raw: dict[str, Any] = {
        "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
        "providers": {"ta": provider("tenant-a"), "tb": provider("tenant-b")},
        "routes": [{"prefix": "/a/", "upstream": idp.url + "/api/a/", "provider": "ta"},
                   {"prefix": "/b/", "upstream": idp.url + "/api/b/", "provider": "tb"}],
        "shared_state": {"redis_url": redis_server.url, "timeout": "0.5s"}}
    d = await make_proxy(raw)
    assert 200 == (await status(d, "/a/x"))[0]
    assert 200 == (await status(d, "/b/x"))[0]
    tenants = sorted(c.json["tenant"] for c in idp.calls.seen if c.grant == "json_login")
    assert ["tenant-a", "tenant-b"] == tenants


# == replicas that heal ========================================================================


@pytest.mark.slow
async def test_a_demand_only_replica_is_ready_again_once_redis_returns(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: JumpClock,
) -> None:
    """refresh_margin 0 (demand-only). While Redis was away a request needed a token (503);
    once Redis is back (the metric 1 again), /readyz answers 200 within the test's twenty
    ticks without any request, as an expired demand-only token is 'ready' without
    shared_state (it can get one). Once: /readyz stayed 503 'shared_state_unavailable' for
    ever: only a refresh cleared the problem, only a request started one, and a
    readiness-gated replica receives none."""
    idp = await start(lifetime=LIFETIME)
    a = await make_proxy(replica_config(idp, tmp_path, redis_server))
    assert 200 == (await status(a))[0]
    redis_server.kill()
    await clock.tick(LIFETIME + 1)
    assert 503 == (await status(a))[0]
    redis_server.restart()
    await wait_for(lambda: metric(a, "tokenproxy_shared_state_up") == 1, "shared state up")
    ready = 0
    for _ in range(20):                    # ~2 s of real time and 20 s of the test clock
        await clock.tick(1)
        ready, body = await readyz(a)
        if ready == 200:
            break
        await asyncio.sleep(0.1)
    assert 200 == ready, body


async def test_an_entry_that_lost_its_data_field_heals_at_the_next_refresh(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: JumpClock,
) -> None:
    """Another writer removed the entry's `data` field but left `ver`. At the next expiry the
    first replica to refresh logs in (there are no tokens to adopt, nor a refresh token to
    trust) and stores its tokens again under that version; the other adopts them: both
    answer 200, `data` is back, two logins in all. Once: read() dropped the version, every
    write went with version 0 and was fenced for ever, and each replica logged in alone at
    each expiry until the entry's 30-day TTL."""
    idp = await start(lifetime=LIFETIME)
    raw = replica_config(idp, tmp_path, redis_server)
    a, b = await make_proxy(raw), await make_proxy(raw)
    assert [200, 200] == [(await status(d))[0] for d in (a, b)]
    name = tokens_key(redis_server)
    redis_server.client().hdel(name, "data")
    await clock.tick(LIFETIME + 1)
    assert 200 == (await status(a))[0]
    assert 200 == (await status(b))[0]
    assert b"data" in redis_server.get_all(name)[name], "nothing was stored again"
    assert {"password": 2} == idp.issuer.stats.grants


# == hostile values =============================================================================


@pytest.mark.parametrize(("field", "value", "keyed"), [
    ("ver", b"garbage", False),
    ("data", b"[" * 100_000, True),
], ids=["ver_not_a_number", "data_deeply_nested"])
async def test_a_garbage_entry_does_not_stop_a_replica_from_starting(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    field: str, value: bytes, keyed: bool,
) -> None:
    """An entry whose `ver` is not a number, or whose sealed `data` is a deeply nested JSON
    value: a replica starting against it starts, and answers 503 shared_state_unavailable
    (an unreadable entry is a problem to fix; the replica does not go on alone). Once:
    read() let ValueError (int(ver)) and RecursionError (json.loads, before any decryption)
    escape, and the replica failed to start."""
    idp = await start(lifetime=LIFETIME)
    raw = replica_config(idp, tmp_path, redis_server,
                        key=key_file(tmp_path) if keyed else None)
    assert 200 == (await status(await make_proxy(raw)))[0]
    redis_server.client().hset(tokens_key(redis_server), field, value)
    try:
        b = await make_proxy(raw)
    except Exception as exc:   # the point of the test
        pytest.fail(f"a replica does not start: {exc!r}"[:300])
    code, doc = await status(b)
    assert (503, "shared_state_unavailable") == (code, doc["cause"]), doc
    assert "unreadable" in doc["body"]


@pytest.mark.parametrize("command", [["check-config", "--online"], ["token", "rt"]],
                         ids=["check_config_online", "token"])
def test_the_command_line_reports_a_garbage_entry(
    tmp_path: Path, redis_server: RedisServer, capsys: pytest.CaptureFixture[str],
    command: list[str],
) -> None:
    """`check-config --online` and `tokenproxy token` with a tampered entry (`ver` not a
    number): exit code 1 and a message, no traceback. Once: ValueError from read() escaped."""
    raw = refresh_token_config(redis_server)
    path = write_config(tmp_path, raw, "shared.yaml")
    redis_server.client().hset(tokens_key_of(raw, "rt"), mapping={"ver": "x", "data": "{}"})
    try:
        code = main([*command, "-c", str(path)])
    except Exception as exc:   # the point of the test
        pytest.fail(f"{command[0]} crashed: {exc!r}")
    assert 1 == code


@pytest.mark.slow
async def test_an_oversized_entry_does_not_block_the_event_loop(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: JumpClock,
) -> None:
    """A 100 MB value under the provider's key (anyone who can write Redis): the request
    needing a token gets 503, and the event loop never stands still for 0.1 s meanwhile:
    the entry's size is checked in Redis, and the value is neither fetched nor parsed. Once:
    read() fetched it whole and parsed it on the event loop, stalling every request, with no
    size bound (unlike the token endpoint's answers, 64 KiB)."""
    idp = await start(lifetime=LIFETIME)
    a = await make_proxy(replica_config(idp, tmp_path, redis_server, key=key_file(tmp_path),
                                       timeout="5s", lock_ttl="10s"))
    assert 200 == (await status(a))[0]
    blob = json.dumps({"v": 1, "kid": "00000000", "nonce": "AAAA",
                       "ct": "A" * 100_000_000}).encode()
    redis_server.client(socket_timeout=20).hset(tokens_key(redis_server), "data", blob)
    del blob
    await clock.tick(LIFETIME + 1)
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0.002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    probe = asyncio.create_task(ticker())
    code, _ = await status(a)
    done.set()
    await probe
    assert 503 == code
    assert max(gaps) < 0.1, f"the event loop stood still for {max(gaps):.3f}s"


async def test_a_hostile_key_id_is_not_echoed_into_answers_and_logs(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: JumpClock, logs: CapturedLogs,
) -> None:
    """The envelope's `kid` is whatever the stored value says. With a 1 MB kid, the 503's
    problem body, /readyz and every log line stay under 4 KiB. Once: Sealer.open put the kid
    verbatim into its message, which became the shared_state_unreadable log line, the 503
    detail of every request needing a token and /readyz (log flooding, answer
    amplification, attacker text in the operator's logs)."""
    idp = await start(lifetime=LIFETIME)
    a = await make_proxy(replica_config(idp, tmp_path, redis_server, key=key_file(tmp_path)))
    assert 200 == (await status(a))[0]
    hostile = json.dumps({"v": 1, "kid": "k" * 1_000_000, "nonce": "AAAA", "ct": "AAAA"})
    redis_server.client().hset(tokens_key(redis_server), "data", hostile)
    await clock.tick(LIFETIME + 1)
    code, doc = await status(a)
    assert 503 == code
    ready = json.dumps((await readyz(a))[1])
    longest_log = max(len(json.dumps(e)) for e in logs.events())
    sizes = {"problem body": len(doc["body"]), "/readyz": len(ready), "log line": longest_log}
    assert max(sizes.values()) < 4096, sizes


# == configuration and documented procedures ====================================================


async def test_rotating_the_key_as_documented_keeps_a_rolling_update_serving(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: JumpClock,
) -> None:
    """docs/replicas.md: first add the new key below the old one on every replica, then
    move it to the top. A rolling update of each step, one replica at a time, with refreshes
    in between: every replica answers 200 throughout."""
    idp = await start(lifetime=LIFETIME)
    old, new = os.urandom(32), os.urandom(32)
    files = [key_file(tmp_path, "old.key", old), key_file(tmp_path, "step1.key", old, new),
             key_file(tmp_path, "step2.key", new, old)]
    daemons = [await make_proxy(replica_config(idp, tmp_path, redis_server, key=files[0]))
               for _ in range(2)]
    assert [200, 200] == [(await status(d))[0] for d in daemons]
    for keys in files[1:]:
        for d in daemons:
            await d.reload(build_config(replica_config(idp, tmp_path, redis_server, key=keys),
                                        {}))
            await clock.tick(LIFETIME + 1)
            answers = [await status(x) for x in daemons]
            assert [200, 200] == [code for code, _ in answers], answers


async def test_a_client_credentials_provider_with_an_unreadable_entry_waits_too(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
) -> None:
    """docs/replicas.md: an entry this replica cannot open is a configuration problem; no
    provider goes on alone meanwhile (the replicas would drift apart unseen), a
    client_credentials one included: 503 shared_state_unavailable."""
    idp = await start(lifetime=LIFETIME)
    cc: dict[str, Any] = {"grant_type": "client_credentials", "username": None,
                          "password": None}
    a = await make_proxy(replica_config(idp, tmp_path, redis_server,
                                       key=key_file(tmp_path, "a.key"), **cc))
    assert 200 == (await status(a))[0]
    b = await make_proxy(replica_config(idp, tmp_path, redis_server,
                                       key=key_file(tmp_path, "b.key"), **cc))
    code, doc = await status(b)
    assert (503, "shared_state_unavailable") == (code, doc["cause"]), doc


@pytest.mark.slow
async def test_a_vanished_holders_lease_is_waited_out_not_reported_as_endpoint_failure(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: JumpClock, logs: CapturedLogs,
) -> None:
    """A replica took the lock and died (a pod killed mid-refresh); its lease (lock_ttl 3 s)
    runs on. The waiter's patience is at least lock_ttl + timeout, more than the provider's
    timeout + 1 s (2 s here): it waits the lease out, then refreshes: 200, one refresh-token
    call, no token_refresh_failed. Once: it gave up while the lease was live and answered
    503 token_unavailable, logging 'another replica holds the refresh lock too long' with a
    backoff, though the token endpoint was never called."""
    idp = await start(lifetime=LIFETIME)
    raw = replica_config(idp, tmp_path, redis_server, timeout="0.5s", lock_ttl="3s")
    raw["providers"]["idp"]["timeout"] = "1s"
    a = await make_proxy(raw)
    assert 200 == (await status(a))[0]
    lock = tokens_key(redis_server).replace(":tokens:", ":lock:")
    redis_server.client().set(lock, b"gone-host:1:deadbeef", px=3000)
    await clock.tick(LIFETIME + 1)
    code, doc = await status(a)
    assert 200 == code, doc
    assert {"password": 1, "refresh_token": 1} == idp.issuer.stats.grants
    assert [] == logs.events("token_refresh_failed")


@pytest.mark.parametrize("path", ["/tokens", "/99999"])
def test_a_redis_url_path_that_is_no_database_number_is_refused(path: str) -> None:
    """redis://host:6379/tokens is refused by the config (redis-py would silently take it for
    database 0), and so is /99999 (no such database: every operation would fail). Once: both
    passed check-config."""
    with pytest.raises(ConfigError):
        build_config(static_config({"redis_url": f"redis://127.0.0.1:6379{path}"}), {})


async def test_one_bad_key_does_not_flap_the_whole_shared_state(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: JumpClock, logs: CapturedLogs,
) -> None:
    """The provider's key holds a string (WRONGTYPE for the read) while Redis answers every
    other command: each attempt answers 503, but the shared state as a whole is not reported
    down: shared_state_unavailable logged at most once, shared_state_restored never,
    tokenproxy_shared_state_up 1. Once: each attempt flipped the metric to 0 and back, a pair
    of error lines per provider per second, and an 'up' metric that lied."""
    idp = await start(lifetime=LIFETIME)
    a = await make_proxy(replica_config(idp, tmp_path, redis_server))
    assert 200 == (await status(a))[0]
    name = tokens_key(redis_server)
    client = redis_server.client()
    client.delete(name)
    client.set(name, b"not a hash")
    await clock.tick(LIFETIME + 1)
    for _ in range(4):
        assert 503 == (await status(a))[0]
        await clock.tick(1.5)
    assert len(logs.events("shared_state_unavailable")) <= 1
    assert len(logs.events("shared_state_restored")) == 0
    assert 1 == metric(a, "tokenproxy_shared_state_up")


@pytest.mark.slow
async def test_shutdown_while_waiting_for_the_lock_keeps_to_the_grace(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: JumpClock,
) -> None:
    """Another replica holds the lock; a request here waits for it. stop() with a grace of
    0.2 s returns within 1.5 s: the refresh still waiting for the lock (it has called nobody)
    is cancelled. Once: stop() awaited it while it polled the lock for the provider's whole
    timeout + 1 s (4 s here, 11 s by default), and had it got the lock it would have called
    the token endpoint during shutdown."""
    idp = await start(lifetime=LIFETIME)
    raw = replica_config(idp, tmp_path, redis_server)
    raw["providers"]["idp"]["timeout"] = "3s"
    a = await make_proxy(raw)
    assert 200 == (await status(a))[0]
    lock = tokens_key(redis_server).replace(":tokens:", ":lock:")
    redis_server.client().set(lock, b"other-host:1:busy", px=30_000)
    await clock.tick(LIFETIME + 1)
    waiting = asyncio.create_task(status(a))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await a.stop(grace=0.2)
    took = time.monotonic() - started
    with contextlib.suppress(Exception):
        await waiting
    assert took < 1.5, f"stop(grace=0.2) took {took:.1f}s"


async def test_a_replayed_sealed_entry_does_not_make_a_replica_spend_an_old_refresh_token(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: JumpClock,
) -> None:
    """With encryption_key_file, whoever can write Redis but has no key can still put back an
    older sealed value of the same entry. A replica starting then does not spend the refresh
    token in it (rotated since): a value is sealed for its key name and version, so the
    replayed one no longer opens, and nothing is spent twice. Once: the associated data was
    the key name only, the replayed value opened, and its refresh token was spent: reuse,
    the family revoked."""
    idp = await start(lifetime=LIFETIME)
    raw = replica_config(idp, tmp_path, redis_server, key=key_file(tmp_path))
    a = await make_proxy(raw)
    assert 200 == (await status(a))[0]               # login: R1, sealed
    name = tokens_key(redis_server)
    client = redis_server.client()
    old = client.hget(name, "data")
    await clock.tick(LIFETIME + 1)
    assert 200 == (await status(a))[0]               # R1 -> R2, sealed
    client.hset(name, "data", old)                   # the attacker replays the R1 value
    b = await make_proxy(raw)                        # a replica starts (or restarts)
    await status(b)
    assert 0 == idp.issuer.stats.reuse_detected, "a replayed refresh token was spent"


# == attacks that held ==========================================================================


async def test_held_no_redis_password_in_logs_metrics_answers_or_check_config(
    start: StartIdp, make_proxy: MakeProxy, tmp_path: Path, clock: JumpClock,
    logs: CapturedLogs, capsys: pytest.CaptureFixture[str],
) -> None:
    """A password-protected Redis; a replica with the right password, one with a wrong one;
    then Redis killed. The password appears in no log line, metric, problem body, /readyz,
    check-config (offline and --online) output."""
    secret, wrong = "redis-pw-5e6f7a8b9c", "wrong-pw-0a1b2c3d4e"
    server = RedisServer(tmp_path / "redis-auth", password=secret).start()
    try:
        idp = await start(lifetime=LIFETIME)
        good = replica_config(idp, tmp_path, server, url=server.url)
        bad = replica_config(idp, tmp_path, server,
                            url=server.url.replace(secret, wrong))
        a, b = await make_proxy(good), await make_proxy(bad)
        seen: list[str] = []
        for d in (a, b):
            seen.append((await status(d))[1]["body"])
            seen.append(json.dumps((await readyz(d))[1]))
        assert 200 == (await status(a))[0]
        server.kill()
        await clock.tick(LIFETIME + 1)
        for d in (a, b):
            seen.append((await status(d))[1]["body"])
            seen.append(json.dumps((await readyz(d))[1]))
            seen.append(generate_latest(d.registry).decode())
        for raw in (good, bad):
            path = write_config(tmp_path / "cc", raw)
            await asyncio.to_thread(main, ["check-config", "-c", str(path)])
            await asyncio.to_thread(main, ["check-config", "--online", "-c", str(path)])
        captured = capsys.readouterr()
        seen.append(captured.out + captured.err)
        assert "shared_state: failed" in captured.out   # --online did reach Redis (gone)
        seen.append(logs.text)
        text = "\n".join(seen)
        assert "authentication failed" in text     # the wrong password was exercised
        assert secret not in text
        assert wrong not in text
    finally:
        server.stop()


@pytest.mark.slow
async def test_held_reload_while_a_refresh_holds_the_lock(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: JumpClock,
) -> None:
    """A reload that changes shared_state (new store) while A's refresh holds the lock and
    its call hangs; B waits for the lock meanwhile. One refresh-token call, no reuse, both
    serve afterwards."""
    idp = await start(lifetime=LIFETIME)
    raw = replica_config(idp, tmp_path, redis_server)
    a, b = await make_proxy(raw), await make_proxy(raw)
    assert [200, 200] == [(await status(d))[0] for d in (a, b)]
    await clock.tick(LIFETIME + 1)
    released, slow_a = await token_call_held(idp, a)
    slow_b = asyncio.create_task(status(b))
    reloading = asyncio.create_task(
        a.reload(build_config(replica_config(idp, tmp_path, redis_server, timeout="0.6s"), {})))
    await asyncio.sleep(0.2)
    released.set()
    await asyncio.wait_for(reloading, 10)
    assert [200, 200] == [(await t)[0] for t in (slow_a, slow_b)]
    assert [200, 200] == [(await status(d))[0] for d in (a, b)]
    assert {"password": 1, "refresh_token": 1} == idp.issuer.stats.grants
    assert 0 == idp.issuer.stats.reuse_detected


@pytest.mark.slow
async def test_held_a_waiter_that_hangs_up_costs_nothing(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: JumpClock,
) -> None:
    """B's request waits for the lock A holds, and its client hangs up; B's refresh goes on,
    adopts A's token; nothing is spent twice, B's next request calls nobody."""
    idp = await start(lifetime=LIFETIME)
    raw = replica_config(idp, tmp_path, redis_server)
    a, b = await make_proxy(raw), await make_proxy(raw)
    assert [200, 200] == [(await status(d))[0] for d in (a, b)]
    await clock.tick(LIFETIME + 1)
    released, slow_a = await token_call_held(idp, a)
    waiting = asyncio.create_task(status(b))
    await asyncio.sleep(0.1)
    waiting.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiting
    released.set()
    assert 200 == (await slow_a)[0]
    assert 200 == (await status(b))[0]
    assert {"password": 1, "refresh_token": 1} == idp.issuer.stats.grants


async def test_held_redis_restarted_between_mark_and_write(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: JumpClock, logs: CapturedLogs,
) -> None:
    """Redis restarts (empty) while A's refresh-token call is in flight: A's write is fenced
    (version gone), A keeps its new tokens in memory; B, finding the entry gone, logs in
    rather than spend R1. No reuse; both serve."""
    idp = await start(lifetime=LIFETIME)
    raw = replica_config(idp, tmp_path, redis_server)
    a, b = await make_proxy(raw), await make_proxy(raw)
    assert [200, 200] == [(await status(d))[0] for d in (a, b)]
    await clock.tick(LIFETIME + 1)
    released, slow_a = await token_call_held(idp, a)
    redis_server.restart()
    released.set()
    assert 200 == (await slow_a)[0]
    code, _ = await status(b)
    if code == 503:
        await wait_for(lambda: metric(b, "tokenproxy_shared_state_up") == 1, "the condition")
        await clock.tick(1.5)
        code, _ = await status(b)
    assert 200 == code
    assert 0 == idp.issuer.stats.reuse_detected


@pytest.mark.slow
async def test_held_many_providers_one_login_each_across_replicas(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: JumpClock,
) -> None:
    """Twelve providers (other scopes) on three replicas, all expiring at once, requests on
    every replica: one call per provider per expiry, no reuse."""
    idp = await start(lifetime=LIFETIME)
    raw = replica_config(idp, tmp_path, redis_server)
    base = raw["providers"].pop("idp")
    raw["routes"] = []
    for i in range(12):
        raw["providers"][f"p{i}"] = {**base, "scope": f"s{i}"}
        raw["routes"].append({"prefix": f"/p{i}/", "upstream": idp.url + "/api/",
                              "provider": f"p{i}"})
    ds = [await make_proxy(raw) for _ in range(3)]
    for _ in range(2):
        answers = await asyncio.gather(*(status(d, f"/p{i}/x") for d in ds for i in range(12)))
        assert {200} == {c for c, _ in answers}
        await clock.tick(LIFETIME + 1)
    assert {"password": 12, "refresh_token": 12} == idp.issuer.stats.grants
    assert 0 == idp.issuer.stats.reuse_detected


@pytest.mark.slow
async def test_held_a_redis_paused_mid_lock_heals_without_crossed_answers(
    start: StartIdp, make_proxy: MakeProxy, redis_server: RedisServer, tmp_path: Path,
    clock: JumpClock,
) -> None:
    """Redis paused while the lock's SET is in flight: the operation times out (503), the
    client's connection is dropped (no answer is read by a later command); after SIGCONT the
    SET runs anyway and leaves a lock nobody owns for lock_ttl, which the next refresh waits
    out: 200, one refresh-token call, no reuse."""
    idp = await start(lifetime=LIFETIME)
    a = await make_proxy(replica_config(idp, tmp_path, redis_server))
    assert 200 == (await status(a))[0]
    await clock.tick(LIFETIME + 1)
    redis_server.pause()
    try:
        code, doc = await status(a)
    finally:
        redis_server.resume()
    assert (503, "shared_state_unavailable") == (code, doc["cause"])
    await wait_for(lambda: redis_server.keys("tokenproxy:lock:*") != [], "orphan lock")
    await wait_for(lambda: metric(a, "tokenproxy_shared_state_up") == 1, "the condition")
    await clock.tick(1.5)
    assert 200 == (await status(a))[0]
    assert {"password": 1, "refresh_token": 1} == idp.issuer.stats.grants
    assert 0 == idp.issuer.stats.reuse_detected
