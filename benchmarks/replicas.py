"""Pieces of the benchmark's replica storm (benchmarks/run.py runs it, docs/replicas.md).

Three tokenproxy replicas share their tokens through one real redis-server; a refresh storm
spread evenly across them meets an expired token. What it costs: token-endpoint calls per
expiry (one, when the replicas coordinate), and the storm's latency against the same storm on
one replica alone. This module holds what needs nothing of run.py's: the Redis process, the
storm that times every request, the token server's call count and the summary.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import socket
import statistics
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

REDIS_MISSING = ("redis-server is not installed (Debian package redis-server): the replica "
                 "storm needs a real Redis")


def redis_server() -> str | None:
    """The redis-server binary on PATH, or None."""
    return shutil.which("redis-server")


def redis_argv(binary: str, port: int, workdir: Path) -> list[str]:
    """A throwaway Redis on 127.0.0.1:*port*: no persistence, its files in *workdir*."""
    workdir.mkdir(parents=True, exist_ok=True)
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--protected-mode", "yes",
            "--save", "", "--appendonly", "no",
            "--dir", str(workdir), "--logfile", str(workdir / "redis.log"),
            "--daemonize", "no", "--loglevel", "warning"]


def wait_redis(port: int, timeout: float = 5.0) -> None:
    """Until the server at 127.0.0.1:*port* answers PING (a bounded poll)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), \
                socket.create_connection(("127.0.0.1", port), 0.2) as sock:
            sock.settimeout(0.5)
            sock.sendall(b"PING\r\n")
            if sock.recv(64).startswith(b"+PONG"):
                return
        time.sleep(0.02)
    raise RuntimeError(f"redis-server on 127.0.0.1:{port} did not answer PING within "
                       f"{timeout:g} s")


def token_calls(port: int) -> int:
    """How many token-endpoint calls the benchmark's token server (servers.py) has answered."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/bench/stats", timeout=5) as resp:
        return int(json.load(resp)["calls"])


def wait_ready(admin_ports: list[int], timeout: float = 15.0) -> None:
    """Until every daemon's /readyz answers 200: each holds a valid token."""
    deadline = time.monotonic() + timeout
    for admin in admin_ports:
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(
                    f"http://127.0.0.1:{admin}/readyz", timeout=1) as resp:
                if resp.status == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the daemon with admin port {admin} was not ready within "
                                   f"{timeout:g} s")
            time.sleep(0.05)


EXPIRY = re.compile(r'^tokenproxy_token_expiry_timestamp_seconds\{provider="api"\} (\S+)$',
                    re.M)


def wait_expired(admin_ports: list[int], lifetime: float) -> None:
    """Until the token every daemon holds has expired: the latest expiry their /metrics give
    (Unix time), or *lifetime* from now when one does not say."""
    latest = 0.0
    for admin in admin_ports:
        with urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics", timeout=5) as resp:
            m = EXPIRY.search(resp.read().decode())
        expiry = float(m[1]) if m else 0.0
        latest = max(latest, expiry if expiry > 0 else time.time() + lifetime)
    time.sleep(max(0.0, latest - time.time()) + 0.2)


@dataclass
class Storm:
    """One storm: every request's latency (s), how many failed, and how long it all took."""

    latencies: list[float]
    failed: int
    elapsed: float

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def storm(urls: list[str], n: int) -> Storm:
    """*n* requests at once, request i to urls[i % len(urls)], each on its own connection
    (as the single daemon's storm in run.py). A failure is counted, not raised."""
    conn = aiohttp.TCPConnector(limit=0, force_close=True)
    bounded = aiohttp.ClientTimeout(total=60)   # a stuck replica fails the storm, not hangs it
    async with aiohttp.ClientSession(connector=conn, timeout=bounded) as session:
        async def one(url: str) -> tuple[float, bool]:
            t0 = time.perf_counter()
            try:
                async with session.get(url) as resp:
                    await resp.read()
                    ok = resp.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            return time.perf_counter() - t0, ok

        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(urls[i % len(urls)]) for i in range(n)))
        elapsed = time.perf_counter() - t0
    return Storm([s for s, _ in done], sum(1 for _, ok in done if not ok), elapsed)


def summary(spread: list[Storm], solo: list[Storm], spread_calls: list[int],
            solo_calls: list[int], replicas: int, n: int) -> dict[str, Any]:
    """Medians over the expiries of each storm's p50 / p99 / max, in ms, and their ratios."""
    out: dict[str, Any] = {
        "replicas": replicas, "requests": n, "expiries": len(spread),
        "calls_per_expiry": spread_calls, "solo_calls_per_expiry": solo_calls,
        "errors": sum(s.failed for s in spread + solo),
    }
    for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0)):
        mine = statistics.median(s.pct(q) for s in spread) * 1000
        one = statistics.median(s.pct(q) for s in solo) * 1000
        out[f"{name}_ms"], out[f"solo_{name}_ms"] = mine, one
        out[f"ratio_{name}"] = mine / one if one else None
    out["elapsed_ms"] = statistics.median(s.elapsed for s in spread) * 1000
    out["solo_elapsed_ms"] = statistics.median(s.elapsed for s in solo) * 1000
    return out


def describe(r: dict[str, Any]) -> str:
    """The report's line (run.py prints it)."""
    if "skipped" in r:
        return f"replica storm: skipped: {r['skipped']}"
    if "error" in r:
        return f"replica storm: failed: {r['error']}"

    def ratio(name: str) -> str:
        value = r[f"ratio_{name}"]
        return "-" if value is None else f"{value:.2f}"

    line = (f"replica storm: {r['replicas']} replicas sharing one Redis, {r['requests']} "
            f"concurrent requests spread evenly, {r['expiries']} expiry(ies): token-endpoint "
            f"calls per expiry {', '.join(map(str, r['calls_per_expiry']))} (one replica "
            f"alone: {', '.join(map(str, r['solo_calls_per_expiry']))}); latency p50 "
            f"{r['p50_ms']:.0f} ms / p99 {r['p99_ms']:.0f} ms / max {r['max_ms']:.0f} ms vs "
            f"one replica's {r['solo_p50_ms']:.0f} / {r['solo_p99_ms']:.0f} / "
            f"{r['solo_max_ms']:.0f} ms (ratio {ratio('p50')} / {ratio('p99')} / "
            f"{ratio('max')}; medians over the expiries)")
    if r["errors"]:
        line += f"; {r['errors']} requests failed"
    return line
