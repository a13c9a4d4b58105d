"""tokenproxy's benchmark: one command, every variant measured in the same run.

    python benchmarks/run.py            # about 3.5 minutes on 2 cores (2 with --no-intercept)
    python benchmarks/run.py --levers   # plus static with one lever off at a time (+1 minute)
    python benchmarks/run.py --quick    # a smoke run (CI): seconds, figures meaningless
    python benchmarks/run.py --baseline /tmp/old   # also a checkout of another commit, same run

Variants, each against the same upstream (nginx when installed, else a small aiohttp server):
  direct      the load generator talks to the upstream itself
  nginx       nginx proxy_pass adding the Authorization header (1 worker), when nginx is installed
  static      tokenproxy with a static token
  oauth2      tokenproxy with an oauth2 provider whose tokens expire every few seconds
Then two refresh storms (--storm requests at once at an expired token, a slow token endpoint):
one daemon; and three replicas sharing one redis-server (shared_state), the storm spread evenly
across them, reported as token-endpoint calls per expiry and latency against the same storm on
one replica alone (skipped when redis-server is not installed).
For each: req/s and p50/p99 at 64 connections, p50 at 1 connection, download and upload MB/s of
a large body (uploads go to a sink that reads every byte before answering) -- the first ones of
the freshly started process apart, since a heap that earlier load grew flatters later ones --,
CPU per request, CPU per large transfer and peak RSS of the proxy, how busy the load's core was
during the transfers; medians of --repeat runs; ratios to direct and to nginx. --baseline DIR
measures the static variant of another checkout (its tokenproxy package first on PYTHONPATH)
right after this one's, for before/after figures from one run. The upstream and the load
generator share one core, the proxy gets the other (when there are two); with that core 100 %
busy a transfer measures curl and the upstream, whatever the proxy: --shared-cores pins
nothing, so that a proxy's CPU per byte shows in its transfer rate.
Last, intercepted HTTPS (benchmarks/intercept.py; about a minute and a half, a few seconds
with --quick, skipped with --no-intercept): a client behind HTTPS_PROXY reaching the same
upstream over TLS through tokenproxy's forward proxy (CONNECT, TLS ended with a leaf of
tokenproxy's CA, token attached, TLS again to the upstream), on the fast path and on the aiohttp
path (TOKENPROXY_FAST_PATH=0), against the same client straight to the upstream over TLS and
through nginx as a TLS-terminating proxy (when installed): req/s and latency at 64 keep-alive
connections, p50 at one, a new connection's first answer, the proxy's CPU per request and how
busy its core was, and from each daemon's metrics which of its paths served the requests.
Installs nothing; says what is missing. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import intercept  # benchmarks/intercept.py, as replicas.py
import replicas  # benchmarks/replicas.py: this script's directory is first on sys.path

HERE = Path(__file__).resolve().parent
TOKEN = "bench-static-token-0123456789"
SMALL_PATH = "/small"


# tokenproxy's CLI on asyncio's own event loop instead of uvloop, for --levers.
PLAIN_LOOP = ("import sys, tokenproxy.cli as cli; cli._loop_factory = lambda: None; "
              "sys.argv[0] = 'tokenproxy'; raise SystemExit(cli.main())")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def pin(pid: int, core: int | None) -> None:
    if core is not None:
        with contextlib.suppress(OSError):
            os.sched_setaffinity(pid, {core})


def pin_threads(pid: int, core: int | None) -> None:
    """Pin every thread of a running process (pin() and taskset pin new ones only)."""
    if core is not None:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                os.sched_setaffinity(int(tid), {core})


def cpu_ms(pid: int) -> float:
    """CPU time of all of *pid*'s threads in ms, to the nanosecond (schedstat): a transfer
    takes tens of ms, the clock ticks of /proc/PID/stat are 10 ms."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e6


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def nginx_worker(master: int) -> int:
    """nginx's single worker (the master only supervises): where its CPU and memory go."""
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.05)
    return master


class Procs:
    """Child processes, all stopped at the end whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], core: int | None, **kw: Any) -> subprocess.Popen[bytes]:
        if core is not None and shutil.which("taskset"):
            argv = ["taskset", "-c", str(core), *argv]   # pinned before it forks workers
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=kw.pop("stderr", subprocess.DEVNULL), **kw)
        self.procs.append(proc)
        pin(proc.pid, core)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop one process (a measured variant must not run on during the next one)."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop_all(self, procs: list[subprocess.Popen[bytes]] | None = None) -> None:
        """Stop *procs* (every one by default) together: SIGTERM to each, then wait."""
        procs = self.procs if procs is None else procs
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            self.stop(proc)


# -- load ------------------------------------------------------------------------------------


@dataclass
class Load:
    rps: float
    p50_us: float
    p99_us: float
    requests: int
    errors: int


_UNITS = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def _latency(text: str, pct: str) -> float:
    m = re.search(rf"^\s*{pct}%\s+([0-9.]+)(us|ms|s)\s*$", text, re.M)
    return float(m[1]) * _UNITS[m[2]] if m else float("nan")


def wrk(url: str, conns: int, seconds: float, core: int | None,
        headers: dict[str, str]) -> Load:
    # wrk takes whole seconds only
    argv = ["wrk", "-t1", f"-c{conns}", f"-d{max(1, round(seconds))}s", "--latency", url]
    for name, value in headers.items():
        argv[1:1] = ["-H", f"{name}: {value}"]
    if core is not None and shutil.which("taskset"):
        argv = ["taskset", "-c", str(core), *argv]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30,
                         check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([0-9.]+)", out)[1])  # type: ignore[index]
    total = int(re.search(r"(\d+) requests in", out)[1])  # type: ignore[index]
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m[1])
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    return Load(rps, _latency(out, "50"), _latency(out, "99"), total, errors)


async def _py_load(url: str, conns: int, seconds: float, headers: dict[str, str]) -> Load:
    """A Python load generator for machines without wrk (much slower than wrk)."""
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            async with session.get(url) as resp:
                await resp.read()
                if resp.status != 200:
                    errors += 1
            latencies.append((time.perf_counter() - t0) * 1e6)

    conn = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(connector=conn, headers=headers) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(conns)))
        elapsed = time.perf_counter() - t0
    latencies.sort()
    return Load(len(latencies) / elapsed, latencies[len(latencies) // 2],
                latencies[int(len(latencies) * 0.99)], len(latencies), errors)


def load(url: str, conns: int, seconds: float, core: int | None,
         headers: dict[str, str]) -> Load:
    if shutil.which("wrk"):
        return wrk(url, conns, seconds, core, headers)
    return asyncio.run(_py_load(url, conns, seconds, headers))


def transfer_args(url: str, direction: str, args: argparse.Namespace,
                  upload_url: str | None = None) -> list[str]:
    """curl's arguments for one large download of *url*/big, or upload of the big file to
    *upload_url* (default *url*/upload)."""
    if direction == "download":
        return [url + "/big"]
    return ["-X", "POST", "-T", str(args.bigfile), "-H", "Expect:", upload_url or url + "/upload"]


def curl_speed(args: list[str], core: int | None, size: int, direction: str) -> float | None:
    """MB/s (10^6 bytes) of one curl transfer; None (an error) unless it moved *size* bytes
    and got a 2xx."""
    argv = ["curl", "-s", "--fail", "--max-time", "120", "-o", "/dev/null",
            "-w", f"%{{speed_{direction}}} %{{size_{direction}}}", *args]
    if core is not None and shutil.which("taskset"):
        argv = ["taskset", "-c", str(core), *argv]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=150, check=False)
    speed, _, moved = done.stdout.partition(" ")
    if done.returncode != 0 or not moved.strip().isdigit() or int(moved) != size:
        return None
    return float(speed) / 1e6


# -- the variants ----------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    rps: list[float] = field(default_factory=list)
    p50_us: list[float] = field(default_factory=list)
    p99_us: list[float] = field(default_factory=list)
    p50_1c_us: list[float] = field(default_factory=list)
    p99_1c_us: list[float] = field(default_factory=list)
    down_mbs: list[float] = field(default_factory=list)
    up_mbs: list[float] = field(default_factory=list)
    first_down_mbs: list[float] = field(default_factory=list)   # of the fresh process
    first_up_mbs: list[float] = field(default_factory=list)
    cpu_us_per_req: list[float] = field(default_factory=list)
    # The proxy's CPU per large transfer, and how busy the load's core was meanwhile (with
    # pinning: at 100 % the transfer measures that core, not the proxy).
    down_cpu_ms: list[float] = field(default_factory=list)
    up_cpu_ms: list[float] = field(default_factory=list)
    load_core_busy: list[float] = field(default_factory=list)
    errors: int = 0
    peak_rss_mb: float | None = None

    def median(self, name: str) -> float | None:
        values = [v for v in getattr(self, name) if v == v]
        return statistics.median(values) if values else None


NGINX_UPSTREAM = """
worker_processes 1;
daemon off;
pid {dir}/up.pid;
error_log {dir}/up.err;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/up-body;
  server {{
    listen 127.0.0.1:{port};
    keepalive_requests 10000000;
    client_max_body_size 0;
    # A request without a token is refused: a proxy that forgot it scores errors, not speed.
    if ($http_authorization !~ "^Bearer .") {{ return 401; }}
    location = /small {{ default_type application/json; return 200 '{{"ok":true,"n":12345}}'; }}
    location = /big {{ root {dir}; try_files /big.bin =404; }}
  }}
}}
"""

NGINX_PROXY = """
worker_processes 1;
daemon off;
pid {dir}/proxy.pid;
error_log {dir}/proxy.err;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/proxy-body;
  proxy_temp_path {dir}/proxy-temp;
  upstream up {{ server 127.0.0.1:{up}; keepalive 128; }}
  upstream sink {{ server 127.0.0.1:{sink}; keepalive 16; }}
  # Buffers as large as tokenproxy's reads: nginx's defaults (4 KiB for an unbuffered answer,
  # 16 KiB for an unbuffered body) would halve its streaming rate and flatter the comparison.
  proxy_buffer_size 64k;
  proxy_buffers 4 64k;
  proxy_busy_buffers_size 128k;
  client_body_buffer_size 64k;
  server {{
    listen 127.0.0.1:{port};
    keepalive_requests 10000000;
    client_max_body_size 0;
    location = /upload {{
      proxy_pass http://sink;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {token}";
      proxy_request_buffering off;
    }}
    location / {{
      proxy_pass http://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {token}";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
"""


def tokenproxy_config(port: int, admin: int, upstream: int, sink: int, state: Path,
                      token_port: int | None) -> dict[str, Any]:
    if token_port is None:
        provider: dict[str, Any] = {"type": "static", "token": TOKEN}
    else:
        provider = {"type": "oauth2", "token_url": f"http://127.0.0.1:{token_port}/oauth/token",
                    "client_id": "demo-client", "client_secret": "bench-secret",
                    "refresh_margin": "1s"}
    return {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": f"127.0.0.1:{admin}",
        "log": {"level": "info", "format": "json"},   # the access log stays on
        "state_path": str(state),
        "limits": {"max_connections": 4096},
        "providers": {"api": provider},
        "routes": [{"prefix": "/", "upstream": f"http://127.0.0.1:{upstream}/",
                    "provider": "api"},
                   {"prefix": "/upload", "upstream": f"http://127.0.0.1:{sink}/upload",
                    "provider": "api"}],
    }


@contextlib.contextmanager
def workdir() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="tokenproxy-bench-") as d:
        yield Path(d)


def measure(res: Result, url: str, pid: int | None, args: argparse.Namespace,
            load_core: int | None, big: bool, upload_url: str | None = None,
            headers: dict[str, str] | None = None) -> None:
    """*headers*: what the load sends itself (the upstream refuses a request without a token,
    so a proxy that forgot to add it counts as errors)."""
    headers = headers or {}
    curl_headers = [item for name, value in headers.items() for item in ("-H", f"{name}: {value}")]
    if big and shutil.which("curl"):
        # Before any other load: what a process that just started does.
        transfers(res, url, pid, args, load_core, curl_headers, upload_url, first=True)
    for _ in range(args.repeat):
        cpu0 = cpu_ms(pid) if pid else 0.0
        heavy = load(url + SMALL_PATH, 64, args.seconds, load_core, headers)
        if pid:
            res.cpu_us_per_req.append((cpu_ms(pid) - cpu0) * 1e3 / max(1, heavy.requests))
        res.rps.append(heavy.rps)
        res.p50_us.append(heavy.p50_us)
        res.p99_us.append(heavy.p99_us)
        res.errors += heavy.errors
        one = load(url + SMALL_PATH, 1, max(1.0, args.seconds / 2), load_core, headers)
        res.p50_1c_us.append(one.p50_us)
        res.p99_1c_us.append(one.p99_us)
        res.errors += one.errors
        if big and shutil.which("curl"):
            transfers(res, url, pid, args, load_core, curl_headers, upload_url, first=False)
    if pid:
        res.peak_rss_mb = peak_rss_mb(pid)


def core_times(core: int) -> tuple[int, int]:
    """(total, idle) jiffies of one core, from /proc/stat."""
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(f"cpu{core} "):
            f = [int(x) for x in line.split()[1:]]
            return sum(f), f[3] + f[4]
    return 0, 0


def transfers(res: Result, url: str, pid: int | None, args: argparse.Namespace,
              load_core: int | None, curl_headers: list[str], upload_url: str | None, *,
              first: bool) -> None:
    """One large download and one large upload, each checked for size and status; the
    proxy's CPU for each (*pid*) and how busy the load's core was."""
    size = args.big_mib * 1024 * 1024
    prefix = "first_" if first else ""
    for attr, direction in (("down", "download"), ("up", "upload")):
        cpu0 = cpu_ms(pid) if pid else 0.0
        core0 = core_times(load_core) if load_core is not None else (0, 0)
        extra = transfer_args(url, direction, args, upload_url)
        mbs = curl_speed([*curl_headers, *extra], load_core, size, direction)
        if mbs is None:
            res.errors += 1
            continue
        getattr(res, f"{prefix}{attr}_mbs").append(mbs)
        if pid:
            getattr(res, f"{attr}_cpu_ms").append(cpu_ms(pid) - cpu0)
        if load_core is not None:
            total, idle = (b - a for a, b in zip(core0, core_times(load_core), strict=True))
            if total:
                res.load_core_busy.append(100 * (1 - idle / total))


async def _storm(url: str, n: int, headers: dict[str, str] | None = None) -> float:
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    bounded = aiohttp.ClientTimeout(total=60)   # a stuck proxy fails the run, not hangs it
    async with aiohttp.ClientSession(connector=conn, headers=headers,
                                     timeout=bounded) as session:
        async def one() -> int:
            async with session.get(url) as resp:
                await resp.read()
                return resp.status

        t0 = time.perf_counter()
        statuses = await asyncio.gather(*(one() for _ in range(n)))
        elapsed = time.perf_counter() - t0
    bad = [s for s in statuses if s != 200]
    if bad:
        raise RuntimeError(f"storm: {len(bad)} of {n} requests failed ({bad[:3]})")
    return elapsed


def interleaved_transfers(procs: Procs, d: Path, args: argparse.Namespace, up: int, sink: int,
                          proxy_core: int | None, load_core: int | None) -> dict[str, Any]:
    """Large transfers through nginx and through tokenproxy (static) in turns, so that both
    meet the same machine: each of --transfer-rounds rounds starts both afresh, takes each
    one's first download and upload (of a process that has served nothing), then two more of
    each, alternating which goes first; ratios are taken within a round. Never raises."""
    if not shutil.which("nginx") or not shutil.which("curl"):
        return {"skipped": "nginx and curl are needed"}
    size = args.big_mib * 1024 * 1024
    kinds = ("first_down", "first_up", "down", "up")
    out: dict[str, Any] = {"rounds": [], "errors": 0}
    try:
        for r in range(args.transfer_rounds):
            nport, port, admin = free_port(), free_port(), free_port()
            (d / f"x{r}.conf").write_text(NGINX_PROXY.format(dir=d, port=nport, up=up,
                                                             sink=sink, token=TOKEN))
            nginx = procs.start(["nginx", "-c", str(d / f"x{r}.conf"), "-p", str(d)],
                                proxy_core)
            (d / f"x{r}.json").write_text(json.dumps(tokenproxy_config(
                port, admin, up, sink, d / f"x{r}.state", None)))
            with (d / f"x{r}.log").open("wb") as log_file:
                tp = procs.start([sys.executable, "-m", "tokenproxy", "run", "-c",
                                  str(d / f"x{r}.json")], proxy_core, stderr=log_file)
            wait_port(nport)
            wait_port(port)
            wait_port(admin)
            time.sleep(0.5)
            pids = {"nginx": nginx_worker(nginx.pid), "tokenproxy": tp.pid}
            urls = {"nginx": f"http://127.0.0.1:{nport}", "tokenproxy": f"http://127.0.0.1:{port}"}
            got: dict[str, dict[str, list[float]]] = {
                who: {k: [] for k in (*kinds, "cpu_ms")} for who in urls}
            order = ["tokenproxy", "nginx"] if r % 2 else ["nginx", "tokenproxy"]
            for kind in ("first_down", "first_up", "down", "up", "down", "up"):
                for who in order:
                    direction = "download" if kind.endswith("down") else "upload"
                    cpu0 = cpu_ms(pids[who])
                    mbs = curl_speed(transfer_args(urls[who], direction, args), load_core,
                                     size, direction)
                    if mbs is None:
                        out["errors"] += 1
                        continue
                    got[who][kind].append(mbs)
                    got[who]["cpu_ms"].append(cpu_ms(pids[who]) - cpu0)
                order.reverse()
            out["rounds"].append(got)
            procs.stop_all([tp, nginx])
    except Exception as exc:   # reported: the other figures stand
        out["error"] = repr(exc)
    ratios: dict[str, list[float]] = {k: [] for k in (*kinds, "cpu_ms")}
    for got in out["rounds"]:
        for k in ratios:
            mine, theirs = got["tokenproxy"][k], got["nginx"][k]
            if mine and theirs:
                ratios[k].append(statistics.median(mine) / statistics.median(theirs))
    out["ratios"] = ratios
    return out


def describe_transfers(x: dict[str, Any], args: argparse.Namespace) -> str:
    if "skipped" in x:
        return f"interleaved transfers: skipped ({x['skipped']})"
    names = {"first_down": "first download", "first_up": "first upload",
             "down": "download", "up": "upload", "cpu_ms": "CPU per transfer"}
    parts = [f"{names[k]} {statistics.median(v):.2f} (lowest {min(v):.2f})"
             for k, v in x["ratios"].items() if v]
    return (f"interleaved transfers, tokenproxy (static) against nginx, {len(x['rounds'])} "
            f"rounds of fresh processes, {args.big_mib} MiB, median ratio of the rounds: "
            + "; ".join(parts) + f"; errors {x['errors']}" + (f"; {x['error']}" if "error" in x
                                                               else ""))


def replica_storm(procs: Procs, d: Path, args: argparse.Namespace, up: int, sink: int,
                  token_port: int, lifetime: float, core: int | None,
                  redis_core: int | None) -> dict[str, Any]:
    """The refresh storm across three replicas sharing one Redis (shared_state, no state
    file), against the same storm on one replica alone: a fourth replica, same config but its
    own key_prefix, so its tokens expire with the others' and one wait serves both storms.
    All four run on the proxy's core, as the single daemon does: the same CPU, so what
    differs is the coordination (the lock in Redis, the waiting replicas' polling). They
    start on every core (four imports in a row on one core would cost seconds) and are
    pinned once ready.
    Each of --repeat rounds waits until every token has expired, then runs both storms, in
    alternating order; the token server's call count around each storm is that expiry's
    calls. Never raises: the other figures are reported whatever happens here."""
    binary = replicas.redis_server()
    if binary is None:
        print(f"note: replica storm skipped: {replicas.REDIS_MISSING}", file=sys.stderr)
        return {"skipped": replicas.REDIS_MISSING}
    redis: subprocess.Popen[bytes] | None = None
    started: list[subprocess.Popen[bytes]] = []
    try:
        redis_port = free_port()
        redis = procs.start(replicas.redis_argv(binary, redis_port, d / "redis"), redis_core)
        replicas.wait_redis(redis_port)
        key = d / "state.key"
        key.write_text(base64.b64encode(os.urandom(32)).decode() + "\n")
        key.chmod(0o600)
        listen: list[tuple[int, int]] = []
        for i, prefix in enumerate(["tokenproxy:"] * 3 + ["tokenproxy-solo:"]):
            port, admin = free_port(), free_port()
            doc = tokenproxy_config(port, admin, up, sink, d / "unused.state", token_port)
            del doc["state_path"]
            doc["providers"]["api"]["refresh_margin"] = 0   # no background refresh
            doc["shared_state"] = {"redis_url": f"redis://127.0.0.1:{redis_port}/0",
                                   "key_prefix": prefix, "encryption_key_file": str(key)}
            (d / f"replica{i}.json").write_text(json.dumps(doc))
            with (d / f"replica{i}.log").open("wb") as log_file:
                started.append(procs.start([sys.executable, "-m", "tokenproxy", "run", "-c",
                                            str(d / f"replica{i}.json")], None,
                                           stderr=log_file))
            listen.append((port, admin))
        for port, admin in listen:
            wait_port(port)
            wait_port(admin)
        admins = [admin for _, admin in listen]
        replicas.wait_ready(admins)   # each holds its first token
        for proc in started:
            pin_threads(proc.pid, core)
        urls = [f"http://127.0.0.1:{port}{SMALL_PATH}" for port, _ in listen]
        spread: list[replicas.Storm] = []
        solo: list[replicas.Storm] = []
        spread_calls: list[int] = []
        solo_calls: list[int] = []
        for round_ in range(args.repeat):
            replicas.wait_expired(admins, lifetime)   # every replica's token has expired
            order = [(urls[:3], spread, spread_calls), (urls[3:], solo, solo_calls)]
            for targets, storms, calls in order[::-1] if round_ % 2 else order:
                before = replicas.token_calls(token_port)
                storms.append(asyncio.run(replicas.storm(targets, args.storm)))
                calls.append(replicas.token_calls(token_port) - before)
        return replicas.summary(spread, solo, spread_calls, solo_calls, 3, args.storm)
    except Exception as exc:
        print(f"replica storm failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        procs.stop_all(started)   # the replicas first, Redis last
        if redis is not None:
            procs.stop(redis)


def intercept_bench(procs: Procs, d: Path, args: argparse.Namespace, up: int, sink: int,
                    proxy_core: int | None, load_core: int | None) -> dict[str, Any]:
    """Intercepted HTTPS (benchmarks/intercept.py): the upstream over TLS (a test CA made with
    openssl), and the same load client straight to it, through nginx ending TLS, and through
    two tokenproxy daemons' forward proxies, one on the fast path and one on the aiohttp path.
    Everything is started first (the daemons together, on every core, pinned once ready), then
    each of --repeat rounds measures every variant once, in an order rotated each round; the
    daemons and nginx wait idle, on the proxy's core, while another is measured. Never
    raises: the other figures are reported whatever happens here."""
    if not shutil.which("openssl"):
        note = "openssl is not installed (Debian package openssl): it makes the test CA"
        print(f"note: intercepted HTTPS skipped: {note}", file=sys.stderr)
        return {"skipped": note}
    started: list[subprocess.Popen[bytes]] = []
    try:
        tls = intercept.make_tls(d / "intercept-tls")
        tls_up = free_port()
        if shutil.which("nginx"):
            (d / "tls-up.conf").write_text(intercept.NGINX_TLS_UPSTREAM.format(
                dir=d, port=tls_up, cert=tls.cert, key=tls.key))
            started.append(procs.start(["nginx", "-c", str(d / "tls-up.conf"), "-p", str(d)],
                                       load_core))
        else:
            started.append(procs.start([sys.executable, str(HERE / "servers.py"), "upstream",
                                        str(tls_up), "0", str(tls.cert), str(tls.key)],
                                       load_core))
        # (variant, port the client reaches, CONNECT through, CA it trusts, token it sends,
        #  the proxy's process)
        plan: list[tuple[intercept.Variant, int, int | None, Path, str | None, int | None]] = [
            (intercept.Variant(intercept.DIRECT), tls_up, None, tls.ca, TOKEN, None)]
        if shutil.which("nginx"):
            port = free_port()
            (d / "tls-proxy.conf").write_text(intercept.NGINX_TLS_PROXY.format(
                dir=d, port=port, up=tls_up, cert=tls.cert, key=tls.key, ca=tls.ca,
                token=TOKEN))
            proc = procs.start(["nginx", "-c", str(d / "tls-proxy.conf"), "-p", str(d)],
                               proxy_core)
            started.append(proc)
            wait_port(port)
            plan.append((intercept.Variant(intercept.NGINX), port, None, tls.ca, None,
                         nginx_worker(proc.pid)))
        daemons: list[tuple[intercept.Variant, subprocess.Popen[bytes], int, Path]] = []
        for name, env in ((intercept.FAST, {"TOKENPROXY_FAST_PATH": "1"}),
                          (intercept.SLOW, {"TOKENPROXY_FAST_PATH": "0"})):
            port, admin, forward = free_port(), free_port(), free_port()
            where = d / f"intercept-{len(daemons)}"
            where.mkdir()
            doc = tokenproxy_config(port, admin, up, sink, where / "state.json", None)
            doc["forward_proxy"] = intercept.forward_section(forward, tls_up, tls)
            (where / "config.json").write_text(json.dumps(doc))
            with (where / "daemon.log").open("wb") as log_file:
                proc = procs.start([sys.executable, "-m", "tokenproxy", "run", "-c",
                                    str(where / "config.json")], None,
                                   env={**os.environ, **env}, stderr=log_file)
            started.append(proc)
            daemons.append((intercept.Variant(name), proc, admin, where))
            # Its CA (generated at its start into the state directory) is what the client
            # trusts, as a tool run by `tokenproxy exec` would.
            plan.append((daemons[-1][0], tls_up, forward, where / "forward-ca.pem", None,
                         proc.pid))
        wait_port(tls_up)
        for _, _, admin, _ in daemons:
            wait_port(admin)
        for _, _, through, _, _, _ in plan:
            if through is not None:
                wait_port(through)
        for _, proc, _, _ in daemons:
            pin_threads(proc.pid, proxy_core)
        # As the table above: 64 connections, then the latency one connection sees; then
        # new connections one at a time (a tool that connects anew for each request). --quick
        # keeps it to a few seconds.
        seconds = 0.3 if args.quick else args.seconds
        phases = ["--phase", f"64:{seconds:g}",
                  "--phase", f"1:{0.1 if args.quick else max(1.0, seconds / 2):g}",
                  "--fresh", "3" if args.quick else "50"]
        taskset = ["taskset", "-c", str(load_core)] \
            if load_core is not None and shutil.which("taskset") else []
        for round_ in range(args.repeat):
            turn = round_ % len(plan)
            for variant, port, through, ca, token, pid in plan[turn:] + plan[:turn]:
                argv = [*taskset, sys.executable, str(HERE / "intercept.py"), "--port", str(port),
                        "--ca", str(ca), *phases]
                if through is not None:
                    argv += ["--proxy", str(through)]
                if token is not None:
                    argv += ["--token", token]
                if pid is not None:
                    argv += ["--pid", str(pid)]
                variant.add(intercept.run_client(argv, 2 * seconds))
        for variant, _, _, _, _, pid in plan:
            if pid is not None:
                variant.peak_rss_mb = peak_rss_mb(pid)
        for variant, _, admin, where in daemons:
            variant.counters = intercept.served_by(admin)
            variant.fast_path = intercept.fast_path_logged(where / "daemon.log")
        return intercept.summary([v for v, *_ in plan], 64, seconds)
    except Exception as exc:
        print(f"intercepted HTTPS failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        procs.stop_all(started)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 s loads, 1 repeat")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--storm", type=int, default=1000)
    ap.add_argument("--token-delay-ms", type=float, default=300.0)
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--baseline", type=Path, metavar="DIR",
                    help="also measure the static variant of the tokenproxy checkout in DIR")
    ap.add_argument("--levers", action="store_true",
                    help="also measure static with one lever off at a time: the aiohttp path "
                         "instead of the fast path, large bodies copied instead of spliced, no "
                         "access log, asyncio's loop instead of uvloop (adds about a minute)")
    ap.add_argument("--transfer-rounds", type=int, default=4,
                    help="rounds of the interleaved transfer comparison (fresh nginx and "
                         "tokenproxy each round)")
    ap.add_argument("--shared-cores", action="store_true",
                    help="pin nothing: the proxy, the upstream and the load share every core "
                         "(by default the proxy has a core of its own, and a large transfer is "
                         "limited by the other one, which curl and the upstream share)")
    ap.add_argument("--no-intercept", action="store_true",
                    help="skip the intercepted-HTTPS measurement (about a minute and a half)")
    args = ap.parse_args()
    if args.quick:
        args.seconds, args.repeat, args.big_mib, args.storm = 1.0, 1, 16, 200
        args.transfer_rounds = 1
    missing = [tool for tool in ("wrk", "nginx", "curl", "taskset") if not shutil.which(tool)]
    if missing:
        print(f"note: not installed: {', '.join(missing)} (Debian packages wrk, nginx-light, "
              "curl, util-linux); falling back where possible", file=sys.stderr)
    cores = sorted(os.sched_getaffinity(0))
    up_core, proxy_core = (cores[0], cores[1]) if len(cores) >= 2 else (None, None)
    if args.shared_cores:
        up_core = proxy_core = None
    procs = Procs()
    results: list[Result] = []
    storm: dict[str, float] = {}
    replica: dict[str, Any] = {}
    intercepted: dict[str, Any] = {}
    transfers_x: dict[str, Any] = {"skipped": "not reached", "rounds": [], "ratios": {}}
    started = time.monotonic()
    with workdir() as d:
        d.chmod(0o755)   # nginx workers run as an unprivileged user and must read big.bin
        args.bigfile = d / "big.bin"
        with args.bigfile.open("wb") as fh:
            fh.truncate(args.big_mib * 1024 * 1024)
        args.bigfile.chmod(0o644)
        try:
            up = free_port()
            if shutil.which("nginx"):
                (d / "up.conf").write_text(NGINX_UPSTREAM.format(dir=d, port=up))
                procs.start(["nginx", "-c", str(d / "up.conf"), "-p", str(d)], up_core)
            else:
                procs.start([sys.executable, str(HERE / "servers.py"), "upstream", str(up),
                             str(args.big_mib * 1024 * 1024)], up_core)
            wait_port(up)
            sink = free_port()
            procs.start([sys.executable, str(HERE / "servers.py"), "sink", str(sink)], up_core)
            wait_port(sink)

            direct = Result("direct")
            measure(direct, f"http://127.0.0.1:{up}", None, args, up_core, True,
                    upload_url=f"http://127.0.0.1:{sink}/upload",
                    headers={"Authorization": f"Bearer {TOKEN}"})
            results.append(direct)

            if shutil.which("nginx"):
                port = free_port()
                (d / "proxy.conf").write_text(NGINX_PROXY.format(dir=d, port=port, up=up,
                                                                 sink=sink, token=TOKEN))
                proc = procs.start(["nginx", "-c", str(d / "proxy.conf"), "-p", str(d)],
                                   proxy_core)
                wait_port(port)
                res = Result("nginx")
                measure(res, f"http://127.0.0.1:{port}", nginx_worker(proc.pid), args, up_core,
                        True)
                results.append(res)
                procs.stop(proc)

            token_port = free_port()
            procs.start([sys.executable, str(HERE / "servers.py"), "token", str(token_port),
                         "3", "0"], up_core)
            wait_port(token_port)
            variants: list[tuple[str, int | None, dict[str, str], str, bool]] = [
                ("static", None, {}, "info", False)]
            if args.baseline:
                # Right after "static", so both see the same machine; its own package first.
                # PYTHONSAFEPATH: `python -m` would otherwise put the working directory (this
                # checkout, when run from its root) ahead of PYTHONPATH, and the "baseline"
                # would silently be this code again.
                where = str(args.baseline.resolve())
                env = {"PYTHONPATH": where, "PYTHONSAFEPATH": "1"}
                found = subprocess.run(
                    [sys.executable, "-c", "import tokenproxy; print(tokenproxy.__file__)"],
                    env={**os.environ, **env}, capture_output=True, text=True, check=True,
                    timeout=30).stdout.strip()
                if not found.startswith(where):
                    sys.exit(f"--baseline: {where} does not provide the tokenproxy package "
                             f"(it came from {found})")
                variants.append((f"static, baseline {args.baseline.name}", None, env, "info",
                                 False))
            variants.append(("oauth2", token_port, {}, "info", False))
            if args.levers:
                # One lever off at a time, against the static variant above.
                variants += [
                    ("static, aiohttp path", None, {"TOKENPROXY_FAST_PATH": "0"}, "info", False),
                    ("static, no splice", None, {"TOKENPROXY_SPLICE": "0"}, "info", False),
                    ("static, no access log", None, {}, "warning", False),
                    ("static, asyncio loop", None, {}, "info", True),
                ]
            for name, tport, env, level, plain_loop in variants:
                port, admin = free_port(), free_port()
                cfg = d / f"{len(results)}.json"
                doc = tokenproxy_config(port, admin, up, sink, d / f"{len(results)}.state", tport)
                doc["log"]["level"] = level
                cfg.write_text(json.dumps(doc))
                argv = [sys.executable, "-m", "tokenproxy", "run", "-c", str(cfg)]
                if plain_loop:
                    argv = [sys.executable, "-c", PLAIN_LOOP, "run", "-c", str(cfg)]
                # The log goes to a file, as to journald in production: writing it is part of
                # the cost measured, not only rendering it.
                with (d / f"{len(results)}.log").open("wb") as log_file:
                    proc = procs.start(argv, proxy_core, env={**os.environ, **env},
                                       stderr=log_file)
                wait_port(port)
                wait_port(admin)
                time.sleep(0.5)
                res = Result(name)
                measure(res, f"http://127.0.0.1:{port}", proc.pid, args, up_core, True)
                results.append(res)
                procs.stop(proc)

            # The storm: n requests arrive at once at an expired token; the token endpoint
            # takes token_delay_ms. Ideal: token latency + upstream latency.
            lifetime = 2.0
            slow_token = free_port()
            procs.start([sys.executable, str(HERE / "servers.py"), "token", str(slow_token),
                         str(lifetime), str(args.token_delay_ms)], up_core)
            wait_port(slow_token)
            port, admin = free_port(), free_port()
            cfg_doc = tokenproxy_config(port, admin, up, sink, d / "storm.state", slow_token)
            cfg_doc["providers"]["api"]["refresh_margin"] = 0   # no background refresh
            (d / "storm.json").write_text(json.dumps(cfg_doc))
            with (d / "storm.log").open("wb") as log_file:
                proc = procs.start([sys.executable, "-m", "tokenproxy", "run", "-c",
                                    str(d / "storm.json")], proxy_core, stderr=log_file)
            wait_port(port)
            # The upstream's own latency for the same storm (n new connections at once) is
            # the baseline: what the client and upstream cost without any token in the way.
            upstream_s = statistics.median(
                asyncio.run(_storm(f"http://127.0.0.1:{up}{SMALL_PATH}", args.storm,
                                   {"Authorization": f"Bearer {TOKEN}"}))
                for _ in range(3))
            runs = []
            for _ in range(args.repeat):
                asyncio.run(_storm(f"http://127.0.0.1:{port}{SMALL_PATH}", 1))   # a token in
                time.sleep(lifetime + 0.2)                                       # ...expired
                runs.append(asyncio.run(_storm(f"http://127.0.0.1:{port}{SMALL_PATH}",
                                               args.storm)))
            elapsed = statistics.median(runs)
            ideal = args.token_delay_ms / 1000 + upstream_s
            storm = {"requests": args.storm, "elapsed_s": elapsed, "ideal_s": ideal,
                     "ratio": elapsed / ideal}
            procs.stop(proc)

            # Large transfers again, nginx and tokenproxy in turns (both meet the same machine).
            transfers_x = interleaved_transfers(procs, d, args, up, sink, proxy_core, up_core)

            # The same storm across three replicas sharing one Redis; the same token server.
            replica = replica_storm(procs, d, args, up, sink, slow_token, lifetime,
                                    proxy_core, up_core)

            # A client behind HTTPS_PROXY: the same upstream over TLS, through the forward
            # proxy; the proxy's core for the proxies, the upstream's for the client.
            if not args.no_intercept:
                intercepted = intercept_bench(procs, d, args, up, sink, proxy_core, up_core)
        finally:
            procs.stop_all()
    report(results, storm, replica, intercepted, args, time.monotonic() - started)
    print(f"\n{describe_transfers(transfers_x, args)}")
    if args.json:
        args.json.write_text(json.dumps({"results": [asdict(r) for r in results],
                                         "storm": storm, "replica_storm": replica,
                                         "intercepted_https": intercepted,
                                         "interleaved_transfers": transfers_x}, indent=1))
    errors = (sum(r.errors for r in results) + int(replica.get("errors", 0))
              + int(transfers_x.get("errors", 0))
              + int(intercepted.get("errors", 0)))
    if errors:
        print(f"\n{errors} failed requests or transfers: the figures above are not valid",
              file=sys.stderr)
    if "error" in replica:
        print("\nthe replica storm failed (above)", file=sys.stderr)
    if "error" in intercepted:
        print("\nthe intercepted-HTTPS measurement failed (above)", file=sys.stderr)
    return 1 if errors or "error" in replica or "error" in intercepted else 0


def cpu_model() -> str:
    """The CPU's model name (platform.processor() is empty on most Linux systems)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def report(results: list[Result], storm: dict[str, float], replica: dict[str, Any],
           intercepted: dict[str, Any], args: argparse.Namespace, elapsed: float) -> None:
    by = {r.name: r for r in results}
    direct, nginx = by.get("direct"), by.get("nginx")
    base_p50 = direct.median("p50_1c_us") if direct else None
    cpu = cpu_model()
    layout = ("nothing pinned (--shared-cores)" if args.shared_cores else
              "the proxy on a core of its own, curl and the upstream on the other")
    print(f"\ntokenproxy benchmark — {os.cpu_count()} cores ({cpu}), Python "
          f"{platform.python_version()}, {args.repeat} repeat(s) of {args.seconds:g} s, "
          f"{args.big_mib} MiB bodies, {layout}; medians; took {elapsed:.0f} s\n")
    head = ("| variant | req/s @64 | × direct | × nginx | p50 @64 | p99 @64 | p50 @1 | p99 @1 | "
            "added p50 @1 | "
            "download MB/s | × nginx | upload MB/s | × nginx | first down / up MB/s | × nginx | "
            "CPU µs/req | × nginx | CPU ms per transfer down / up | × nginx | load core busy | "
            "peak RSS MB | errors |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in results:
        rps, p50_1 = r.median("rps"), r.median("p50_1c_us")
        down, upl, cpu_req = r.median("down_mbs"), r.median("up_mbs"), r.median("cpu_us_per_req")
        first_down, first_up = r.median("first_down_mbs"), r.median("first_up_mbs")

        def ratio(value: float | None, attr: str, ref: Result | None) -> str:
            other = ref.median(attr) if ref else None
            return "-" if value is None or not other else f"{value / other:.2f}"

        added = None if p50_1 is None or base_p50 is None or r is direct else p50_1 - base_p50
        print(f"| {r.name} | {_fmt(rps, ',.0f')} | {ratio(rps, 'rps', direct)} | "
              f"{ratio(rps, 'rps', nginx)} | {_fmt(r.median('p50_us'), '.0f')} µs | "
              f"{_fmt(r.median('p99_us'), '.0f')} µs | {_fmt(p50_1, '.0f')} µs | "
              f"{_fmt(r.median('p99_1c_us'), '.0f')} µs | "
              f"{'-' if added is None else f'+{added:.0f} µs'} | {_fmt(down, ',.0f')} | "
              f"{ratio(down, 'down_mbs', nginx)} | {_fmt(upl, ',.0f')} | "
              f"{ratio(upl, 'up_mbs', nginx)} | {_fmt(first_down, ',.0f')} / "
              f"{_fmt(first_up, ',.0f')} | {ratio(first_down, 'first_down_mbs', nginx)} / "
              f"{ratio(first_up, 'first_up_mbs', nginx)} | {_fmt(cpu_req, '.1f')} | "
              f"{ratio(cpu_req, 'cpu_us_per_req', nginx)} | "
              f"{_fmt(r.median('down_cpu_ms'), '.0f')} / {_fmt(r.median('up_cpu_ms'), '.0f')} | "
              f"{ratio(r.median('down_cpu_ms'), 'down_cpu_ms', nginx)} / "
              f"{ratio(r.median('up_cpu_ms'), 'up_cpu_ms', nginx)} | "
              f"{_fmt(r.median('load_core_busy'), '.0f')} % | {_fmt(r.peak_rss_mb, '.0f')} | "
              f"{r.errors} |")
    baseline = next((r for r in results if r.name.startswith("static, baseline")), None)
    static = by.get("static")
    if baseline is not None and static is not None:
        def change(attr: str) -> str:
            new, old = static.median(attr), baseline.median(attr)
            return "-" if not new or not old else f"{(new / old - 1) * 100:+.1f} %"

        print(f"\nstatic against {baseline.name}: req/s {change('rps')}, CPU per request "
              f"{change('cpu_us_per_req')}, added p50 @1 {change('p50_1c_us')}")
    if storm:
        print(f"\nstorm: {storm['requests']} concurrent requests at an expired token: "
              f"{storm['elapsed_s'] * 1000:.0f} ms (median of {args.repeat}); ideal = the token "
              f"endpoint's {args.token_delay_ms:.0f} ms + the same storm sent straight to the "
              f"upstream = {storm['ideal_s'] * 1000:.0f} ms; ratio {storm['ratio']:.2f}")
    if replica:
        print(f"\n{replicas.describe(replica)}")
    if intercepted:
        print(f"\n{intercept.describe(intercepted)}")


if __name__ == "__main__":
    raise SystemExit(main())
