"""tokenproxy's bounded soak: mixed traffic, short-lived tokens and injected faults.

    python benchmarks/soak.py                 # 60 s (CI)
    python benchmarks/soak.py --seconds 600   # the 10-minute soak

One tokenproxy daemon (a subprocess) sits in front of an upstream that checks every bearer
token against a real issuer (tokenproxy.demo.issuer, rotating refresh tokens, reuse detection);
both run in this process on 127.0.0.1. Access tokens live LIFETIME s and the provider refreshes
MARGIN s early, so a proactive refresh comes every GAP = LIFETIME - min(MARGIN, LIFETIME/2) s.
CLIENTS concurrent clients send a mix: small GETs, POSTs below and above max_replay_body, a
streaming download, and downloads the client abandons half-way (a disconnect).

Faults, on a fixed schedule (one every FAULT_EVERY/2 s, alternating):
  outage  the token endpoint answers 503 for OUTAGE s;
  storm   ``Issuer.revoke_all()``: every access *and* refresh token dies, the upstream answers
          401 to everything in flight, the proxy's refresh is rejected and it logs in again.

Expected failures, and nothing else is allowed:
  - 503 from the proxy that starts inside an outage or within OUTAGE_GRACE s after it. An outage
    of 2 s sees at most two failed calls (at t0 and <= t0 + 1.25 s, the first backoff step
    with jitter); the next attempt comes <= 2.5 s later, i.e. <= 1.75 s after the outage ends.
  - 401 for a POST above max_replay_body (the proxy cannot replay it) sent within STORM_GRACE s
    of a storm, or inside an outage (+ OUTAGE_GRACE): there the refresh failed, the proxy uses
    its token to the last millisecond, and the upstream may see it a few ms after it expired.
    Every replayable request must come back 200 (or an outage's 503) through the proxy's retry.
  - a client-side abort of a download the client itself abandoned (not counted as a request).

Token calls (the issuer's own counters), against the schedule:
  logins            exactly 1 + storms              (each storm revokes the refresh token)
  rejected refresh  exactly storms                  (the revoked family's refresh token)
  reuse detected    exactly 0
  503 answers       1..3 per outage                 (see above)
  good refreshes    within [lo, hi]: every successful grant starts a token epoch that ends at
                    the next proactive refresh (GAP s), at a storm (early), or at the end; so
                    grants <= T/GAP + storms + 1 and >= (T - outages * (OUTAGE + 2)) / (GAP
                    + 0.1) - 1, where T is the time from the first login to the end.

Resources of the daemon, sampled every second after WARMUP s: the median VmRSS of the last
quarter within max(20 %, 15 MB) of the first quarter's, the median open fd count within
max(20 %, 8) of it. Exits 1 on any violation; prints a summary line.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tokenproxy.demo.issuer import Issuer

LIFETIME = 3.0
MARGIN = 1.0
GAP = LIFETIME - min(MARGIN, LIFETIME / 2)       # 2 s between proactive refreshes
CLIENTS = 16
MAX_REPLAY = 64 * 1024
SMALL_POST = 4 * 1024
LARGE_POST = 256 * 1024
STREAM_BYTES = 2 * 1024 * 1024
STREAM_CHUNK = 64 * 1024
FAULT_EVERY = 20.0        # one outage and one storm per this many seconds
FIRST_FAULT = 8.0
OUTAGE = 2.0
OUTAGE_GRACE = 3.0
STORM_GRACE = 2.0
WARMUP = 5.0
REQUEST_TIMEOUT = 15.0
CLIENT_SECRET = "soak-client-secret-7f3e"
PASSWORD = "soak-password-9a1c"   # a throwaway credential of this run
SEED = 11


# -- the upstream: checks each bearer token with the issuer ----------------------------------

def upstream_app(issuer: Issuer, cut: list[int]) -> web.Application:
    """*cut* counts downloads the proxy broke off (the client hung up)."""
    chunk = b"s" * STREAM_CHUNK

    def authorized(request: web.Request) -> bool:
        auth = request.headers.get("Authorization", "")
        return auth.startswith("Bearer ") and issuer.valid(auth[7:]) is not None

    def denied() -> web.Response:
        return web.json_response({"error": "invalid_token"}, status=401,
                                 headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})

    async def small(request: web.Request) -> web.StreamResponse:
        return web.json_response({"ok": True}) if authorized(request) else denied()

    async def echo(request: web.Request) -> web.StreamResponse:
        ok = authorized(request)
        body = await request.read()
        if not ok:
            return denied()
        return web.json_response({"size": len(body), "sha": hashlib.sha256(body).hexdigest()})

    async def stream(request: web.Request) -> web.StreamResponse:
        if not authorized(request):
            return denied()
        resp = web.StreamResponse()
        resp.content_length = STREAM_BYTES
        await resp.prepare(request)
        try:
            for _ in range(STREAM_BYTES // STREAM_CHUNK):
                await resp.write(chunk)
                await asyncio.sleep(0)
            await resp.write_eof()
        except ConnectionResetError:
            cut[0] += 1   # the proxy passed on a client's hang-up: expected for abandoned ones
        return resp

    app = web.Application(client_max_size=LARGE_POST * 2)
    app.router.add_get("/small", small)
    app.router.add_post("/echo", echo)
    app.router.add_get("/stream", stream)
    return app


# -- the fault schedule ------------------------------------------------------------------------

@dataclass
class Schedule:
    start: float
    outages: list[tuple[float, float]] = field(default_factory=list)   # (begin, end), loop time
    storms: list[float] = field(default_factory=list)

    def in_outage(self, now: float) -> bool:
        return any(b <= now < e for b, e in self.outages)

    def expected_503(self, t0: float) -> bool:
        return any(b <= t0 < e + OUTAGE_GRACE for b, e in self.outages)

    def near_storm(self, t0: float) -> bool:
        return any(s - 0.2 <= t0 < s + STORM_GRACE for s in self.storms)


@dataclass
class Tally:
    requests: int = 0
    ok: int = 0
    expected: dict[str, int] = field(default_factory=dict)
    unexpected: list[str] = field(default_factory=list)   # the first 50, for the report
    unexpected_count: int = 0
    upstream_cut: list[int] = field(default_factory=lambda: [0])
    aborted: int = 0
    token_answers: dict[str, int] = field(default_factory=dict)   # "grant:status"
    first_login: float | None = None

    def expect(self, what: str) -> None:
        self.expected[what] = self.expected.get(what, 0) + 1

    def fail(self, what: str) -> None:
        if len(self.unexpected) < 50:
            self.unexpected.append(what)
        self.unexpected_count += 1


# -- the daemon --------------------------------------------------------------------------------

def daemon_config(issuer_url: str, upstream_url: str, state: Path) -> dict[str, Any]:
    return {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "state_path": str(state),
        "limits": {"max_replay_body": MAX_REPLAY},
        "providers": {"idp": {
            "type": "oauth2", "token_url": issuer_url + "/oauth/token",
            "grant_type": "password", "client_id": "demo-client",
            "client_secret": CLIENT_SECRET, "username": "demo", "password": PASSWORD,
            "refresh_margin": f"{MARGIN}s",
        }},
        "routes": [{"prefix": "/", "upstream": upstream_url + "/", "provider": "idp"}],
    }


def start_daemon(workdir: Path, cfg: dict[str, Any]) -> tuple[subprocess.Popen[bytes], Path]:
    path = workdir / "soak.yaml"
    path.write_text(json.dumps(cfg, indent=1), encoding="utf-8")
    log = workdir / "daemon.log"
    env = dict(os.environ)
    for name in ("TOKENPROXY_CONFIG", "NOTIFY_SOCKET", "STATE_DIRECTORY"):
        env.pop(name, None)
    env["XDG_STATE_HOME"] = str(workdir)
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tokenproxy", "run", "-c", str(path)],
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, env=env,
                                cwd=workdir)
    return proc, log


async def listening_port(proc: subprocess.Popen[bytes], log: Path) -> int:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("daemon exited:\n" + log.read_text(errors="replace"))  # noqa: ASYNC240
        for line in log.read_text(errors="replace").splitlines():  # noqa: ASYNC240 - a small local file
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if isinstance(ev, dict) and ev.get("event") == "listening":
                    return int(ev["listen"][0].rsplit(":", 1)[1])
        await asyncio.sleep(0.05)
    raise RuntimeError("daemon did not start listening within 20 s")


def sample(pid: int) -> tuple[float, float, int]:
    """VmRSS MB, VmHWM MB, open fds."""
    rss = hwm = float("nan")
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) / 1024
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return rss, hwm, len(os.listdir(f"/proc/{pid}/fd"))


# -- traffic -----------------------------------------------------------------------------------

async def one_request(session: aiohttp.ClientSession, base: str, rng: random.Random,
                      sched: Schedule, tally: Tally) -> None:
    loop = asyncio.get_running_loop()
    roll = rng.random()
    t0 = loop.time()
    kind = ("get" if roll < 0.45 else "post-small" if roll < 0.65 else
            "post-large" if roll < 0.8 else "stream" if roll < 0.93 else "abandon")
    try:
        async with asyncio.timeout(REQUEST_TIMEOUT):
            if kind == "get":
                async with session.get(base + "/small") as resp:
                    body = await resp.read()
                    good = resp.status == 200 and json.loads(body) == {"ok": True}
                    status = resp.status
            elif kind in ("post-small", "post-large"):
                data = rng.randbytes(SMALL_POST if kind == "post-small" else LARGE_POST)
                async with session.post(base + "/echo", data=data) as resp:
                    body = await resp.read()
                    status = resp.status
                    good = status == 200 and json.loads(body) == {
                        "size": len(data), "sha": hashlib.sha256(data).hexdigest()}
            elif kind == "stream":
                async with session.get(base + "/stream") as resp:
                    status, got = resp.status, 0
                    async for piece in resp.content.iter_chunked(STREAM_CHUNK):
                        got += len(piece)
                    good = status == 200 and got == STREAM_BYTES
            else:
                async with session.get(base + "/stream") as resp:
                    status = resp.status
                    if status == 200:
                        await resp.content.read(STREAM_CHUNK)
                        resp.close()   # the client hangs up mid-download
                        tally.aborted += 1
                        return
                    await resp.read()
                    good = False
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        tally.requests += 1
        tally.fail(f"{kind} at +{t0 - sched.start:.1f}s: {type(exc).__name__}: {exc}")
        return
    tally.requests += 1
    if good:
        tally.ok += 1
    elif status == 503 and sched.expected_503(t0):
        tally.expect("503 in outage")
    elif status == 401 and kind == "post-large" and sched.near_storm(t0):
        tally.expect("401 unreplayable in storm")
    elif status == 401 and kind == "post-large" and sched.expected_503(t0):
        tally.expect("401 unreplayable, token expired in flight during outage")
    else:
        tally.fail(f"{kind} at +{t0 - sched.start:.1f}s: status {status}")


async def client(base: str, seed: int, end: float, sched: Schedule, tally: Tally) -> None:
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    conn = aiohttp.TCPConnector(limit=2)
    async with aiohttp.ClientSession(connector=conn, auto_decompress=False) as session:
        while loop.time() < end:
            await one_request(session, base, rng, sched, tally)
            await asyncio.sleep(rng.uniform(0, 0.02))


async def fault_driver(issuer: Issuer, sched: Schedule, end: float, tally: Tally) -> int:
    loop = asyncio.get_running_loop()
    faults = 0
    k = 0
    while True:
        at = sched.start + FIRST_FAULT + k * FAULT_EVERY / 2
        if at + (OUTAGE + OUTAGE_GRACE if k % 2 == 0 else STORM_GRACE) > end - 1:
            return faults
        await asyncio.sleep(max(0.0, at - loop.time()))
        if k % 2 == 0:
            sched.outages.append((loop.time(), loop.time() + OUTAGE))
            await asyncio.sleep(OUTAGE)
        else:
            sched.storms.append(loop.time())
            issuer.revoke_all()
        faults += 1
        k += 1


# -- the run -----------------------------------------------------------------------------------

async def soak(seconds: float) -> int:
    loop = asyncio.get_running_loop()
    issuer = Issuer(lifetime=LIFETIME, client_secret=CLIENT_SECRET, users={"demo": PASSWORD})
    sched = Schedule(start=loop.time())
    tally = Tally()
    stop_counting = [float("inf")]

    async def token_fault(request: web.Request, grant: str) -> web.StreamResponse | None:
        now = loop.time()
        if now < stop_counting[0] and grant == "password" and tally.first_login is None:
            tally.first_login = now
        if sched.in_outage(now):
            return web.json_response({"error": "temporarily_unavailable"}, status=503)
        return None

    @web.middleware
    async def count_answers(request: web.Request, handler: Any) -> web.StreamResponse:
        resp = await handler(request)
        if request.path == "/oauth/token" and loop.time() < stop_counting[0]:
            grant = str((await request.post()).get("grant_type", ""))
            key = f"{grant}:{resp.status}"
            tally.token_answers[key] = tally.token_answers.get(key, 0) + 1
        return resp

    issuer.fault = token_fault
    iapp = issuer.app()
    iapp.middlewares.append(count_answers)
    runners = [web.AppRunner(iapp, access_log=None),
               web.AppRunner(upstream_app(issuer, tally.upstream_cut), access_log=None)]
    ports = []
    proc: subprocess.Popen[bytes] | None = None
    samples: list[tuple[float, float, float, int]] = []
    with tempfile.TemporaryDirectory(prefix="tokenproxy-soak-") as tmp:
        workdir = Path(tmp)
        try:
            for runner in runners:
                await runner.setup()
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                ports.append(runner.addresses[0][1])
            issuer.base_url = f"http://127.0.0.1:{ports[0]}"
            proc, log = start_daemon(workdir, daemon_config(
                issuer.base_url, f"http://127.0.0.1:{ports[1]}", workdir / "state.json"))
            port = await listening_port(proc, log)
            base = f"http://127.0.0.1:{port}"
            sched.start = loop.time()
            end = sched.start + seconds

            async def sampler() -> None:
                while loop.time() < end:
                    assert proc is not None
                    samples.append((loop.time() - sched.start, *sample(proc.pid)))
                    await asyncio.sleep(1.0)

            tasks = [asyncio.create_task(client(base, SEED * 1000 + i, end, sched, tally))
                     for i in range(CLIENTS)]
            faults_task = asyncio.create_task(fault_driver(issuer, sched, end, tally))
            sample_task = asyncio.create_task(sampler())
            await asyncio.wait_for(asyncio.gather(*tasks, sample_task),
                                   seconds + REQUEST_TIMEOUT + 10)
            faults = await faults_task
            stop_counting[0] = loop.time()
            if proc.poll() is not None:
                tally.fail(f"daemon exited with {proc.returncode}")
        finally:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
            for runner in runners:
                await runner.cleanup()

    return report(seconds, sched, tally, faults, samples, issuer, stop_counting[0])


def report(seconds: float, sched: Schedule, tally: Tally, faults: int,
           samples: list[tuple[float, float, float, int]], issuer: Issuer,
           stopped: float) -> int:
    problems: list[str] = []
    unexpected = tally.unexpected_count
    if unexpected:
        problems.append(f"{unexpected} unexpected failures, e.g. {tally.unexpected[:5]}")
    if tally.requests < seconds * 10:
        problems.append(f"only {tally.requests} requests in {seconds:.0f} s")

    # resources
    warm = [s for s in samples if s[0] >= WARMUP]
    q = max(1, len(warm) // 4)
    first, last = warm[:q], warm[-q:]
    rss_a = statistics.median(s[1] for s in first)
    rss_b = statistics.median(s[1] for s in last)
    fd_a = statistics.median(s[3] for s in first)
    fd_b = statistics.median(s[3] for s in last)
    hwm = max(s[2] for s in samples)
    if rss_b - rss_a > max(0.2 * rss_a, 15.0):
        problems.append(f"RSS grew {rss_a:.1f} -> {rss_b:.1f} MB")
    if fd_b - fd_a > max(0.2 * fd_a, 8):
        problems.append(f"open fds grew {fd_a:.0f} -> {fd_b:.0f}")

    # token calls
    ans = tally.token_answers
    outages, storms = len(sched.outages), len(sched.storms)
    logins = ans.get("password:200", 0)
    rejected = ans.get("refresh_token:400", 0)
    good = ans.get("refresh_token:200", 0)
    unavailable = sum(v for k, v in ans.items() if k.endswith(":503"))
    other = {k: v for k, v in ans.items()
             if k not in ("password:200", "refresh_token:400", "refresh_token:200")
             and not k.endswith(":503")}
    span = stopped - (tally.first_login or sched.start)
    hi = int(span / GAP) + storms + 1
    lo = max(0, int((span - outages * (OUTAGE + 2.0)) / (GAP + 0.1)) - 1)
    grants = logins + good
    if logins != 1 + storms:
        problems.append(f"{logins} logins, expected {1 + storms}")
    if rejected != storms:
        problems.append(f"{rejected} rejected refreshes, expected {storms}")
    if issuer.stats.reuse_detected:
        problems.append(f"refresh-token reuse detected {issuer.stats.reuse_detected} times")
    if not outages <= unavailable <= 3 * outages:
        problems.append(f"{unavailable} token calls answered 503, expected {outages}.."
                        f"{3 * outages}")
    if not lo <= grants <= hi:
        problems.append(f"{grants} successful grants, expected {lo}..{hi}")
    if other:
        problems.append(f"unexpected token answers {other}")
    total = sum(ans.values())
    e_lo = lo + storms + outages
    e_hi = hi + storms + 3 * outages

    print(f"  duration {seconds:.0f} s, {CLIENTS} clients, token lifetime {LIFETIME:.0f} s, "
          f"refresh every {GAP:.0f} s, span since first login {span:.1f} s")
    print(f"  requests {tally.requests}: ok {tally.ok}, expected failures {tally.expected}, "
          f"abandoned downloads {tally.aborted} (upstream saw {tally.upstream_cut[0]} cut)")
    print(f"  faults: {outages} token outages of {OUTAGE:.0f} s, {storms} 401 storms")
    print(f"  token answers {dict(sorted(ans.items()))}; successful grants {grants} "
          f"(expected {lo}..{hi}), reuse detected {issuer.stats.reuse_detected}")
    print(f"  daemon VmRSS median {rss_a:.1f} -> {rss_b:.1f} MB (VmHWM {hwm:.1f} MB), "
          f"fds {fd_a:.0f} -> {fd_b:.0f}, {len(samples)} samples")
    for p in problems:
        print(f"  VIOLATION: {p}")
    print(f"soak: {tally.requests} requests, {faults} faults injected, {unexpected} failures, "
          f"rss {rss_a:.1f}\u2192{rss_b:.1f} MB, fds {fd_a:.0f}\u2192{fd_b:.0f}, "
          f"token calls {total} (expected {e_lo}..{e_hi})")
    return 1 if problems else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    args = ap.parse_args()
    if not 20 <= args.seconds <= 3600:
        ap.error("--seconds must be between 20 and 3600")
    return asyncio.run(soak(args.seconds))


if __name__ == "__main__":
    sys.exit(main())
