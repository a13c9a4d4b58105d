"""Replicas as separate processes sharing their tokens through a real Redis: the process-level
proof of docs/replicas.md.

Three ``tokenproxy run`` daemons with one config, the demo Issuer (rotating refresh tokens,
reuse detection) served in-process on the real clock, load on all three; Redis killed and
restarted empty mid-run; the refresh lock's holder paused (SIGSTOP) past its lease; tokens
encrypted at rest as an operator's redis-cli sees them. The in-process tests of the same
behaviour, on the test clock, are in tests/test_shared_state.py.

The issuer's token endpoint is watched by a middleware (every call's grant, start, end and
answer, and how many are in flight at once); its protected API by another, which notes the
bearer each replica sent (each replica's clients use their own path, /rN/). Time is
``loop.time()``, which is the system's monotonic clock, the one the issuer stamps its tokens'
expiry with and the daemons time their tokens by.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from tests.helpers.config import write_config
from tests.helpers.daemon_proc import STARTUP_TIMEOUT, DaemonProcess, child_env, spawn
from tests.helpers.fakes import CLIENT_SECRET, PASSWORD
from tests.helpers.redis_server import RedisServer
from tests.helpers.replicas import key_file, replica_config
from tests.helpers.wait import wait_for
from tokenproxy.demo.issuer import Issuer

pytestmark = pytest.mark.slow

LOCK_TTL = 2.0
REDIS_TIMEOUT = 0.5
MARGIN = 1.0
# Every token-endpoint call is held this long before the issuer answers, so that two calls
# at once would overlap (and be counted) rather than slip past each other.
CALL_DELAY = 0.1
# How much earlier than the issuer a daemon may hold a token expired: it times the lifetime
# from when it asked (CALL_DELAY and the trip before the issuer stamps it), never later.
EARLY = CALL_DELAY + 0.1
LOST = "the shared state lost this provider's entry"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# -- the issuer, watched ---------------------------------------------------------------------


@dataclass
class Call:
    """One token-endpoint call as the issuer saw it."""

    grant: str
    start: float
    end: float | None = None
    status: int | None = None
    access: str | None = None   # the access token it answered with


@dataclass
class Used:
    """A request of the protected API: when, from which replica, with which bearer."""

    at: float
    replica: int
    bearer: str


@dataclass
class WatchedIssuer:
    issuer: Issuer
    hold: dict[str, float]             # seconds each grant is held before the issuer answers
    calls: list[Call] = field(default_factory=list)
    used: list[Used] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0

    @web.middleware
    async def watch(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        now = asyncio.get_running_loop().time
        if request.path == "/oauth/token":
            form = await request.post()   # kept by aiohttp for the issuer's own read
            call = Call(str(form.get("grant_type", "")), now())
            self.calls.append(call)
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            try:
                resp = await handler(request)
            finally:
                self.in_flight -= 1
                call.end = now()
            call.status = resp.status
            if resp.status == 200 and isinstance(resp, web.Response) and resp.body:
                assert isinstance(resp.body, bytes)
                call.access = json.loads(resp.body)["access_token"]
            return resp
        if request.path.startswith("/api/r"):
            auth = request.headers.get("Authorization", "")
            replica = int(request.path.split("/")[2][1:])
            self.used.append(Used(now(), replica, auth.removeprefix("Bearer ")))
        return await handler(request)

    async def fault(self, request: web.Request, grant: str) -> web.StreamResponse | None:
        """The Issuer's fault hook: hold the call, then let the issuer answer."""
        await asyncio.sleep(self.hold.get(grant, CALL_DELAY))
        return None

    def done(self, grant: str | None = None) -> list[Call]:
        return [c for c in self.calls if c.end is not None and grant in (None, c.grant)]

    def expiry(self, access: str) -> float:
        """When the issuer stops accepting *access* (its monotonic clock, loop.time())."""
        return self.issuer._access[access][1]

    def newest_used(self, replica: int, before: float) -> str | None:
        """The newest token (latest expiry) *replica* sent before *before*."""
        seen = [u.bearer for u in self.used if u.replica == replica and u.at <= before]
        return max(seen, key=self.expiry, default=None)

    def last_used(self, replica: int) -> str | None:
        return next((u.bearer for u in reversed(self.used) if u.replica == replica), None)

    def issued(self) -> list[str]:
        return [*self.issuer._access, *self.issuer._refresh]


async def serve_issuer(aiohttp_server: AiohttpServer, lifetime: float,
                       hold: dict[str, float] | None = None) -> WatchedIssuer:
    """The demo Issuer on 127.0.0.1 with the real clock, rotating refresh tokens and reuse
    detection, every call held CALL_DELAY (or *hold*'s seconds for a grant)."""
    issuer = Issuer(lifetime=lifetime, client_secret=CLIENT_SECRET, users={"demo": PASSWORD},
                    rotate=True)
    watched = WatchedIssuer(issuer, hold or {})
    issuer.fault = watched.fault
    app = issuer.app()
    app.middlewares.append(watched.watch)
    server = await aiohttp_server(app)
    issuer.base_url = f"http://127.0.0.1:{server.port}"
    return watched


# -- the replicas ----------------------------------------------------------------------------


def process_config(issuer: Issuer, tmp_path: Path, redis: RedisServer, *,
                   key: Path | None = None) -> dict[str, Any]:
    """What every replica process runs: refreshing MARGIN before expiry."""
    return replica_config(issuer, tmp_path, redis, key=key, timeout=f"{REDIS_TIMEOUT:g}s",
                          lock_ttl=f"{LOCK_TTL:g}s", refresh_margin=f"{MARGIN:g}s")


@contextlib.asynccontextmanager
async def replicas(raw: dict[str, Any], tmp_path: Path, n: int,
                   name: str = "replica") -> AsyncIterator[list[DaemonProcess]]:
    """*n* daemon processes running *raw*, each in a directory of its own (its config file and
    stderr), started together; all killed at the end, their output swept for secrets."""
    started: list[DaemonProcess] = []
    try:
        for i in range(n):
            directory = tmp_path / f"{name}{i}"
            started.append(spawn(write_config(directory, raw), directory))
        await asyncio.gather(*(d.wait_for_event("listening", STARTUP_TIMEOUT) for d in started))
        yield started
    finally:
        for d in started:
            with contextlib.suppress(ProcessLookupError):
                d.proc.send_signal(signal.SIGCONT)   # never leave one stopped
            d.kill()
    for d in started:
        d.assert_no_secrets()


@dataclass
class Answer:
    replica: int
    start: float
    end: float
    status: int      # 0: no answer (connection error, or the client's timeout)
    cause: str | None


async def load(daemons: list[DaemonProcess], stop: asyncio.Event, answers: list[Answer], *,
               clients: int, pace: float, timeout: float, limit: int = 2000) -> None:
    """*clients* clients per replica, each sending GET /rN/x one after another (*pace* apart,
    at most *limit* requests) until *stop* is set; every answer noted."""
    loop = asyncio.get_running_loop()
    session_timeout = aiohttp.ClientTimeout(total=timeout)

    async def client(s: aiohttp.ClientSession, replica: int, daemon: DaemonProcess) -> None:
        url = daemon.url(f"/r{replica}/x")
        for _ in range(limit):
            if stop.is_set():
                return
            start = loop.time()
            try:
                async with s.get(url) as resp:
                    await resp.read()
                    status, cause = resp.status, resp.headers.get("Tokenproxy-Error")
            except (aiohttp.ClientError, TimeoutError) as exc:
                status, cause = 0, type(exc).__name__
            answers.append(Answer(replica, start, loop.time(), status, cause))
            await asyncio.sleep(pace)

    async with aiohttp.ClientSession(timeout=session_timeout,
                                     connector=aiohttp.TCPConnector(limit=0)) as s:
        await asyncio.gather(*(client(s, i, d) for i, d in enumerate(daemons)
                               for _ in range(clients)))


async def get(daemon: DaemonProcess, replica: int) -> int:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s, s.get(
            daemon.url(f"/r{replica}/x")) as resp:
        await resp.read()
        return resp.status


def shared_state_events(daemon: DaemonProcess) -> list[str]:
    names = ("shared_state_unavailable", "shared_state_restored")
    return [str(e["event"]) for e in daemon.events() if e.get("event") in names]


# -- one refresh per expiry, and a Redis outage -----------------------------------------------

LIFETIME = 2.0
REFRESH_EVERY = LIFETIME - min(MARGIN, LIFETIME / 2)   # tokenproxy.tokens.expiry.refresh_delay
OUTAGE = 5.0
HEAL = 3.0    # the watcher pings each second, a provider retries each second: healed within
# The load runs ten lifetimes outside the outage (before the kill, and after the healing).
UNFAULTED = 10 * LIFETIME + 0.5


async def test_three_replicas_share_one_refresh_per_expiry_and_survive_a_redis_restart(
    aiohttp_server: AiohttpServer, redis_server: RedisServer, tmp_path: Path,
) -> None:
    """Three daemons, 2 s tokens, load on all three; after a few rotations Redis is killed
    while a refresh call is at the issuer (its caller cannot store the answer: it alone holds
    the new token), and restarted empty 5 s later; the load goes on until it has run ten
    lifetimes outside the outage window (from the kill to the healing after the restart).

    - one token-endpoint call at a time, and no two calls closer than a refresh period: one
      per expiry, not one per replica; a login at the start and one after the restart (the
      refresh token held in memory is in doubt once Redis lost the entry), nothing else;
    - no refresh token spent twice, the issuer never refused a token the proxy sent;
    - every request answered 200 outside the outage window, across at least ten lifetimes
      and ten expiries of the tokens in use;
    - within it, 200 too, but for 503 shared_state_unavailable between the expiry of the
      token each replica held and its healing after the restart: never while it held a
      valid token (the replica with the newer token kept answering 200 meanwhile);
    - the daemons heal on their own (each logs shared_state_unavailable, then
      shared_state_restored), and answer 200 after."""
    idp = await serve_issuer(aiohttp_server, LIFETIME)
    raw = process_config(idp.issuer, tmp_path, redis_server)
    loop = asyncio.get_running_loop()
    answers: list[Answer] = []
    async with replicas(raw, tmp_path, 3) as daemons:
        stop = asyncio.Event()
        began = loop.time()
        traffic = asyncio.create_task(
            load(daemons, stop, answers, clients=3, pace=0.02, timeout=5.0))
        try:
            await wait_for(lambda: len(idp.done("refresh_token")) >= 3, "three rotations",
                           timeout=4 * LIFETIME)
            seen = len(idp.calls)
            await wait_for(lambda: len(idp.calls) > seen, "the next rotation to begin",
                           2 * LIFETIME, every=0.002)
            [cut] = idp.calls[seen:]
            shared = idp.done()[-1].access     # what every replica holds at the kill
            redis_server.kill()                # SIGKILL and reap: a few milliseconds
            killed = loop.time()
            assert cut.end is None, "the kill came after the refresh call was answered"
            await asyncio.sleep(OUTAGE)
            # Taken before: a daemon may reach the new Redis (and log in) before the thread
            # that started it is back.
            restarted = loop.time()
            await asyncio.to_thread(redis_server.restart)
            end = restarted + HEAL + UNFAULTED - (killed - began)
            await asyncio.sleep(max(0.0, end - loop.time()))
        finally:
            stop.set()
            await asyncio.wait_for(traffic, 10)
        assert [None, None, None] == [d.proc.poll() for d in daemons]   # none restarted
        assert [200, 200, 200] == [await get(d, i) for i, d in enumerate(daemons)]

    issuer = idp.issuer
    calls = idp.calls
    # -- the token endpoint: one call per expiry, one at a time, nothing spent twice
    assert 0 == issuer.stats.reuse_detected
    assert 0 == issuer.stats.api_unauthorized
    assert 1 == idp.max_in_flight
    assert [200] * len(calls) == [c.status for c in calls]
    in_doubt = [e for d in daemons for e in d.events("refresh_token_in_doubt")]
    assert [(LOST, "login")] == [(e["reason"], e["next_step"]) for e in in_doubt]
    logins = [c for c in calls if c.grant == "password"]
    assert 2 == len(logins)
    assert calls[0] is logins[0]                 # the first replica up logs in, once
    assert restarted < logins[1].start < restarted + HEAL   # the login in doubt, explained
    # -- outside the outage window: ten lifetimes, ten expiries, ten rotations, all 200
    window = (killed, restarted + HEAL)

    def outside(at: float) -> bool:
        return began <= at < window[0] or window[1] <= at <= stopped

    stopped = max(a.end for a in answers)
    assert (window[0] - began) + (stopped - window[1]) >= 10 * LIFETIME
    unfaulted = [a for a in answers if outside(a.start)]
    assert [200] * len(unfaulted) == [a.status for a in unfaulted]
    expired = [c.access for c in calls if c.access and outside(idp.expiry(c.access))]
    assert len(expired) >= 10, f"{len(expired)} expiries outside the outage"
    rotations = [c for c in calls if c.grant == "refresh_token" and outside(c.start)]
    assert len(rotations) >= 10, f"{len(rotations)} rotations outside the outage"
    starts = [c.start for c in calls]
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    # Two calls for one expiry would put two calls within one refresh period: any three
    # calls in a row then span less than two periods. (A single gap is no measure: a call
    # that reaches the busy test process late shortens the gap after it by as much.)
    spans = [a + b for a, b in itertools.pairwise(gaps)]
    assert min(spans) > 2 * 0.85 * REFRESH_EVERY, f"two calls for one expiry: gaps {gaps}"
    # -- the cut call's caller could not store its answer; it alone used that token
    assert shared is not None
    assert cut.access is not None
    [holder] = [i for i, d in enumerate(daemons) if d.events("state_write_failed")]
    assert {holder} == {u.replica for u in idp.used if u.bearer == cut.access}
    # -- what the load saw: a bounded number of answers, each one 200 or an allowed 503
    assert 300 < len(answers) < 9 * 2000
    failed = [a for a in answers if a.status != 200]
    assert {(503, "shared_state_unavailable")} >= {(a.status, a.cause) for a in failed}
    assert {0, 1, 2} == {a.replica for a in failed}, "the outage outlived every token"
    # None before the token all held at the kill had expired ...
    assert all(a.end >= idp.expiry(shared) - EARLY for a in failed)
    # ... nor before the newest token the failing replica had used had expired ...
    for a in failed:
        held = idp.newest_used(a.replica, a.start)
        assert held is not None
        assert a.end >= idp.expiry(held) - EARLY, (
            f"replica {a.replica} failed a request {idp.expiry(held) - a.end:.2f}s before "
            "the token it held expired")
        # ... and only between the kill and the healing after the restart.
        assert killed < a.start < restarted + HEAL
    # The holder of the newer token answered 200 while the others' had expired.
    between = [a for a in answers if a.replica == holder
               and idp.expiry(shared) < a.start < idp.expiry(cut.access) - EARLY]
    assert len(between) > 10
    assert [200] * len(between) == [a.status for a in between]
    healed = [a for a in answers if a.start >= restarted + HEAL]
    assert [200] * len(healed) == [a.status for a in healed]
    assert {0, 1, 2} == {a.replica for a in healed}
    for d in daemons:
        events = shared_state_events(d)
        assert "shared_state_unavailable" in events, d.stderr
        assert "shared_state_restored" == events[-1], events
    leaked = [t for t in idp.issued() for d in daemons if t in d.stderr]
    assert [] == leaked


# -- fencing: a paused lock holder ------------------------------------------------------------

PAUSED_LIFETIME = 3.0   # long enough that the paused holder finds the newer token still good
PAUSE = LOCK_TTL + 1.0
SLOW_REFRESH = 1.0


@dataclass
class Stored:
    """The shared entry at one moment."""

    at: float
    ver: int
    access: str | None
    obtained_at: float
    spending: bool


async def watch_entry(r: redis.asyncio.Redis, name: str, stop: asyncio.Event,
                      seen: list[Stored]) -> None:
    """Read the shared entry every 10 ms until *stop* is set (bounded: 2000 reads)."""
    loop = asyncio.get_running_loop()
    for _ in range(2000):
        if stop.is_set():
            return
        entry = await r.hgetall(name)
        if entry:
            doc = json.loads(entry[b"data"])["clear"]
            seen.append(Stored(loop.time(), int(entry[b"ver"]), doc["access_token"],
                               float(doc["obtained_at"]), b"spending" in entry))
        await asyncio.sleep(0.01)


async def test_a_paused_lock_holder_never_replaces_a_newer_token(
    aiohttp_server: AiohttpServer, redis_server: RedisServer, tmp_path: Path,
) -> None:
    """The replica holding the refresh lock is stopped (SIGSTOP) while its refresh call is at
    the issuer (which takes 1 s to answer), for longer than lock_ttl; resumed after.

    Another replica takes the lock once the lease runs out; it does not spend the refresh
    token the paused one had begun spending (marked in Redis), it logs in. The paused one's
    late answer then arrives: its write is fenced, and it adopts the newer token. The stored
    entry's version only grows, its token is never replaced by an older one (nor by the late
    one), no refresh token was spent twice, every request was answered 200."""
    idp = await serve_issuer(aiohttp_server, PAUSED_LIFETIME, {"refresh_token": SLOW_REFRESH})
    raw = process_config(idp.issuer, tmp_path, redis_server)
    loop = asyncio.get_running_loop()
    answers: list[Answer] = []
    entries: list[Stored] = []
    async with replicas(raw, tmp_path, 3) as daemons, redis_server.aclient() as r:
        stop = asyncio.Event()
        traffic = asyncio.create_task(
            load(daemons, stop, answers, clients=1, pace=0.05, timeout=10.0))
        watcher: asyncio.Task[None] | None = None
        try:
            async def stored() -> bool:
                return bool(await r.keys("tokenproxy:tokens:*"))

            await wait_for(stored, "the first login stored", 5.0)
            [name] = redis_server.keys("tokenproxy:tokens:*")
            watcher = asyncio.create_task(watch_entry(r, name, stop, entries))
            # The refresh call is at the issuer: its caller holds the lock.
            await wait_for(lambda: any(c.grant == "refresh_token" for c in idp.calls),
                           "a refresh call", PAUSED_LIFETIME + 2)
            [late] = idp.calls[1:]
            owner = await r.get(name.replace(":tokens:", ":lock:"))
            assert owner is not None, "the lock is not held during the refresh call"
            host_pid_random = owner.decode() if isinstance(owner, bytes) else str(owner)
            pid = int(host_pid_random.split(":")[1])
            [holder] = [d for d in daemons if d.pid == pid]
            others = [d for d in daemons if d is not holder]
            holder.send_signal(signal.SIGSTOP)
            try:
                await asyncio.sleep(PAUSE)
            finally:
                holder.send_signal(signal.SIGCONT)
            resumed = loop.time()
            try:
                fenced = await holder.wait_for_event("shared_state_write_fenced", 5.0)
            except AssertionError:
                raise AssertionError(
                    f"the paused holder's late write was not fenced; issuer {idp.issuer.stats}"
                    f", calls {[c.grant for c in idp.calls]}, holder logged "
                    f"{[e['event'] for e in holder.events() if e['event'] != 'request']}",
                ) from None
            mine = daemons.index(holder)
            await wait_for(lambda: any(u.replica == mine and u.at > resumed for u in idp.used),
                           "the resumed holder to send a request", 5.0)
            await asyncio.sleep(0.3)
            assert [200] * 3 == [await get(d, i) for i, d in enumerate(daemons)]
        finally:
            stop.set()
            await asyncio.wait_for(traffic, 15)
            if watcher is not None:
                await asyncio.wait_for(watcher, 5)

    assert "shared" == fenced["grant"]
    assert 0 == idp.issuer.stats.reuse_detected
    assert 1 == idp.max_in_flight
    # The paused holder's call was answered while it was stopped; the next call is the other
    # replica's login (the marked refresh token is in doubt), then rotations from there.
    assert late.end is not None
    assert late.end < resumed
    assert ["password", "refresh_token", "password"] == [c.grant for c in idp.calls[:3]]
    takeover = idp.calls[2]
    assert late.end < takeover.start < resumed
    in_doubt = [e for d in others for e in d.events("refresh_token_in_doubt")]
    assert ["another replica began spending it and did not finish"] == [
        e["reason"] for e in in_doubt]
    assert [] == holder.events("refresh_token_in_doubt")
    assert holder.events("shared_state_lease_lost")
    # The stored entry: the version only grows, a token is never replaced by an older one,
    # the late token never stored.
    assert entries, "the shared entry was never read"
    versions = [e.ver for e in entries]
    assert versions == sorted(versions)
    obtained = [e.obtained_at for e in entries]
    assert obtained == sorted(obtained)
    tokens = [e.access for e in entries]
    changes = [t for i, t in enumerate(tokens) if i == 0 or t != tokens[i - 1]]
    assert len(changes) == len(set(changes)), "an older token came back"
    assert late.access is not None
    assert late.access not in tokens
    assert late.access not in {u.bearer for u in idp.used}   # the holder adopted the newer one
    assert takeover.access in tokens
    assert any(e.spending for e in entries), "the refresh token was never marked as spent"
    assert [200] * len(answers) == [a.status for a in answers]
    assert {0, 1, 2} == {a.replica for a in answers if a.start > resumed}
    leaked = [t for t in idp.issued() for d in daemons if t in d.stderr]
    assert [] == leaked


# -- encryption at rest, and the token command -------------------------------------------------


async def test_encrypted_values_hold_no_token_and_token_command_shares(
    aiohttp_server: AiohttpServer, redis_server: RedisServer, tmp_path: Path,
) -> None:
    """With encryption_key_file, what redis-cli finds in Redis holds no issued token in clear;
    `tokenproxy token` prints the token the daemons share, without calling the issuer; a
    replica with another key answers 503 naming the key id and keeps running."""
    idp = await serve_issuer(aiohttp_server, 60.0)
    raw = process_config(idp.issuer, tmp_path, redis_server, key=key_file(tmp_path))
    async with replicas(raw, tmp_path, 2) as daemons:
        assert [200, 200] == [await get(d, i) for i, d in enumerate(daemons)]
        shared = idp.last_used(0)
        assert shared is not None
        assert shared == idp.last_used(1)
        assert ["password"] == [c.grant for c in idp.calls]

        keys = redis_server.cli("--scan").split()
        [key] = keys
        assert key.startswith("tokenproxy:tokens:")
        value = redis_server.cli("HGETALL", key)
        issued = idp.issued()
        assert 2 == len(issued)
        assert [] == [t for t in issued if t in value]
        assert [] == [t for t in issued if t.encode() in redis_server.raw_dump()]
        assert '"kid"' in value
        assert '"ct"' in value

        cli_dir = tmp_path / "cli"
        config = write_config(cli_dir, raw)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tokenproxy", "token", "-c", str(config), "idp",
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            env=child_env(cli_dir), cwd=cli_dir)
        try:
            out, err = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert 0 == proc.returncode, err.decode()
        assert shared == out.decode().strip()
        assert 1 == idp.issuer.stats.calls

        wrong = process_config(idp.issuer, tmp_path, redis_server,
                               key=key_file(tmp_path, "other.key"))
        async with replicas(wrong, tmp_path, 1, name="wrong-key") as [other]:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as s, \
                    s.get(other.url("/r9/x")) as resp:
                body = await resp.text()
                assert (503, "shared_state_unavailable") == (
                    resp.status, resp.headers.get("Tokenproxy-Error"))
            assert "which encryption_key_file does not hold" in body
            assert other.events("shared_state_unreadable")
            assert other.proc.poll() is None
        assert 1 == idp.issuer.stats.calls
        assert [200, 200] == [await get(d, i) for i, d in enumerate(daemons)]


# -- replicas whose clocks differ --------------------------------------------------------------

SKEW = 5.0
# A child interpreter whose wall clock (time.time) runs SKEW seconds ahead, as on a machine
# whose clock is off (or was stepped): imported at startup from PYTHONPATH.
SITECUSTOMIZE = """\
import os
import time

_skew = float(os.environ.get("TOKENPROXY_TEST_CLOCK_SKEW") or 0)
if _skew:
    _time = time.time
    time.time = lambda: _time() + _skew
"""


async def test_a_replica_whose_clock_is_ahead_never_spends_a_rotated_refresh_token(
    aiohttp_server: AiohttpServer, redis_server: RedisServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two replicas on machines whose wall clocks differ by SKEW seconds. The issuer revokes
    the access tokens; the replica behind refreshes first (on its 401) and rotates the refresh
    token; then the replica ahead gets its 401. Under the lock it must take the rotated refresh
    token from Redis: the stored entry is the newest (its version says so, whatever the
    clocks say). Spending the one it holds, already rotated, makes the issuer revoke the whole
    family."""
    idp = await serve_issuer(aiohttp_server, 60.0)
    raw = process_config(idp.issuer, tmp_path, redis_server)
    skewed = tmp_path / "skewed-python"
    skewed.mkdir()
    (skewed / "sitecustomize.py").write_text(SITECUSTOMIZE)
    before = time.time()
    async with contextlib.AsyncExitStack() as stack:
        with monkeypatch.context() as env:
            path = os.environ.get("PYTHONPATH")
            env.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(skewed), path])))
            env.setenv("TOKENPROXY_TEST_CLOCK_SKEW", f"{SKEW:g}")
            [ahead] = await stack.enter_async_context(replicas(raw, tmp_path, 1, "ahead"))
        [behind] = await stack.enter_async_context(replicas(raw, tmp_path, 1, "behind"))
        assert 200 == await get(ahead, 0)           # has logged in
        after = time.time()
        [entry] = redis_server.get_all("tokenproxy:tokens:*").values()
        obtained_at = json.loads(entry[b"data"])["clear"]["obtained_at"]
        assert before + SKEW <= obtained_at <= after + SKEW   # the skew is real
        assert 200 == await get(behind, 1)          # adopts
        assert ["password"] == [c.grant for c in idp.calls]
        idp.issuer.revoke_access()
        assert 200 == await get(behind, 1)          # 401, refreshes (rotates), retries
        assert ["password", "refresh_token"] == [c.grant for c in idp.calls]
        assert 200 == await get(ahead, 0)           # 401: must adopt, not spend
        assert 0 == idp.issuer.stats.reuse_detected, (
            f"the replica ahead spent a rotated refresh token: calls "
            f"{[c.grant for c in idp.calls]}; it logged "
            f"{[e['event'] for e in ahead.events() if e['event'] != 'request']}")
        assert ["password", "refresh_token"] == [c.grant for c in idp.calls]
