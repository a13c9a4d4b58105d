"""Pieces of the benchmark's intercepted-HTTPS measurement (benchmarks/run.py runs it).

A client that cannot change its URL reaches ``https://localhost:PORT`` through tokenproxy's
forward proxy (docs/forward-proxy.md): ``CONNECT``, TLS ended by tokenproxy with a leaf of its
local CA, the token attached, TLS again to the upstream. Measured against the same upstream
(nginx over TLS, a certificate of a test CA made here with openssl) reached by the same client
directly over TLS, and through nginx as a TLS-terminating reverse proxy adding the token (the
nearest thing nginx does: it cannot end the TLS inside a CONNECT). Both of tokenproxy's request
paths are measured, the fast path and the aiohttp path (TOKENPROXY_FAST_PATH=0).

The load client is this file run as a script: Python on uvloop, a raw HTTP/1.1 client (wrk
cannot send CONNECT; a client of its own keeps what it costs small and the same for every
variant, as it shares a core with the upstream). In each phase the connections are set up
first (CONNECT and the TLS handshake), warmed with one request each, then send requests one
after another on their connection (keep-alive, many requests per CONNECT) for the given time;
then --fresh new connections one at a time, one request each:

    python benchmarks/intercept.py --port P [--proxy PORT] --ca FILE [--token T] [--pid PID] \
        --phase 64:5 --phase 1:2.5 --fresh 50    # prints {"phases": [...], "fresh": {...}}

--pid: the proxy's process, whose CPU time is read at the start and the end of each phase's
timed window. A response other than 200 (the upstream answers 401 to a request without a
token) or a connection lost counts as an error. This module also holds what run.py needs that
needs nothing of run.py's: the TLS material, the nginx configs, the daemon's metrics that say
which path served, the summary and the report.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import ssl
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# -- TLS material -----------------------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    ca: Path      # what a client trusts (the test CA)
    cert: Path    # the upstream's certificate for localhost / 127.0.0.1
    key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=30)


def make_tls(directory: Path) -> TlsFiles:
    """A test CA and a server certificate it signed for localhost, made with openssl. The
    files are world-readable: nginx's workers run as an unprivileged user."""
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o755)
    ca_key, ca = directory / "ca-key.pem", directory / "ca.pem"
    key, csr, cert = directory / "key.pem", directory / "server.csr", directory / "cert.pem"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
             "-subj", "/CN=tokenproxy benchmark upstream CA")
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    ext = directory / "server.ext"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                   "extendedKeyUsage=serverAuth\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(cert), "-days", "1", "-extfile", str(ext))
    for path in (ca, cert, key):
        path.chmod(0o644)
    return TlsFiles(ca, cert, key)


# The benchmark's upstream (run.py's NGINX_UPSTREAM: /small, a token required) over TLS.
NGINX_TLS_UPSTREAM = """
worker_processes 1;
daemon off;
pid {dir}/tls-up.pid;
error_log {dir}/tls-up.err;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    keepalive_requests 10000000;
    if ($http_authorization !~ "^Bearer .") {{ return 401; }}
    location = /small {{ default_type application/json; return 200 '{{"ok":true,"n":12345}}'; }}
  }}
}}
"""

# nginx ending the client's TLS, adding the token, and opening TLS to the upstream (verified,
# sessions reused, connections kept): what tokenproxy's interception does, without CONNECT.
NGINX_TLS_PROXY = """
worker_processes 1;
daemon off;
pid {dir}/tls-proxy.pid;
error_log {dir}/tls-proxy.err;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  upstream up {{ server 127.0.0.1:{up}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port} ssl;
    ssl_certificate {cert};
    ssl_certificate_key {key};
    keepalive_requests 10000000;
    location / {{
      proxy_pass https://up;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "Bearer {token}";
      proxy_ssl_server_name on;
      proxy_ssl_name localhost;
      proxy_ssl_verify on;
      proxy_ssl_trusted_certificate {ca};
      proxy_ssl_session_reuse on;
      proxy_buffering off;
    }}
  }}
}}
"""


def forward_section(forward_port: int, tls_port: int, tls: TlsFiles) -> dict[str, Any]:
    """tokenproxy's forward_proxy config: intercept localhost:*tls_port* with the provider
    ``api``, the upstream verified against the test CA; tokenproxy's own CA is generated
    into the state directory (forward-ca.pem)."""
    return {"listen": f"127.0.0.1:{forward_port}",
            "intercept": [{"host": "localhost", "port": tls_port, "provider": "api",
                           "ca_file": str(tls.ca)}]}


# -- which of tokenproxy's paths served -------------------------------------------------------


def _metric_sum(text: str, name: str, labels: str = "") -> float:
    total = 0.0
    for m in re.finditer(rf"^{name}\{{([^}}]*)\}} (\S+)$", text, re.M):
        if labels in m[1]:
            total += float(m[2])
    return total


def served_by(admin_port: int) -> dict[str, float]:
    """From the daemon's /metrics: intercepted CONNECTs, requests answered on the intercepted
    host's route, and connections the fast path handed to the aiohttp server (0 while the
    fast path serves every request itself)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return {
        "connects": _metric_sum(text, "tokenproxy_forward_connects_total",
                                'outcome="intercepted"'),
        "connects_failed": _metric_sum(text, "tokenproxy_forward_connects_total",
                                       'outcome="failed"'),
        "requests": _metric_sum(text, "tokenproxy_requests_total", 'route="localhost"'),
        "handovers": _metric_sum(text, "tokenproxy_fast_path_handovers_total"),
    }


def fast_path_logged(log_file: Path) -> bool | None:
    """The daemon's own word (its ``listening`` event) on whether the fast path is on."""
    for line in log_file.read_text(errors="replace").splitlines():
        if '"event": "listening"' in line:
            return bool(json.loads(line).get("fast_path"))
    return None


# -- the results ------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    rps: list[float] = field(default_factory=list)
    p50_us: list[float] = field(default_factory=list)
    p99_us: list[float] = field(default_factory=list)
    p50_1c_us: list[float] = field(default_factory=list)
    # The 64 connections' set-up (all at once, so mostly queueing), p50
    setup_ms: list[float] = field(default_factory=list)
    # New connections one at a time: set-up (CONNECT + TLS handshake), and that plus the
    # first answer, p50
    fresh_setup_ms: list[float] = field(default_factory=list)
    fresh_first_ms: list[float] = field(default_factory=list)
    cpu_us_per_req: list[float] = field(default_factory=list)
    errors: int = 0
    peak_rss_mb: float | None = None
    fast_path: bool | None = None                    # tokenproxy: its listening event
    counters: dict[str, float] = field(default_factory=dict)   # tokenproxy: served_by()

    def median(self, name: str) -> float | None:
        values = [v for v in getattr(self, name) if v == v]
        return statistics.median(values) if values else None

    def add(self, run: dict[str, Any]) -> None:
        """One client run: the first phase at many connections, the optional second at one,
        then the optional new connections."""
        fresh = run.get("fresh")
        if fresh:
            self.errors += fresh["errors"]
            self.fresh_setup_ms.append(fresh["setup_p50_ms"])
            self.fresh_first_ms.append(fresh["first_p50_ms"])
        for i, phase in enumerate(run["phases"]):
            self.errors += phase["errors"]
            if i == 0:
                self.rps.append(phase["rps"])
                self.p50_us.append(phase["p50_us"])
                self.p99_us.append(phase["p99_us"])
                self.setup_ms.append(phase["setup_p50_ms"])
                if phase.get("cpu_us_per_req") is not None:
                    self.cpu_us_per_req.append(phase["cpu_us_per_req"])
            else:
                self.p50_1c_us.append(phase["p50_us"])


DIRECT = "direct TLS"
NGINX = "nginx TLS proxy"
FAST = "tokenproxy intercept, fast path"
SLOW = "tokenproxy intercept, aiohttp path"


def summary(variants: list[Variant], conns: int, seconds: float) -> dict[str, Any]:
    """What --json holds: every variant's medians, and the ratios the report line gives."""
    by = {v.name: v for v in variants}
    out: dict[str, Any] = {"connections": conns, "seconds": seconds, "variants": {}}
    for v in variants:
        rps, cpu = v.median("rps"), v.median("cpu_us_per_req")
        out["variants"][v.name] = {
            "rps": rps, "p50_us": v.median("p50_us"), "p99_us": v.median("p99_us"),
            "p50_1c_us": v.median("p50_1c_us"), "setup_ms": v.median("setup_ms"),
            "fresh_setup_ms": v.median("fresh_setup_ms"),
            "fresh_first_ms": v.median("fresh_first_ms"),
            "cpu_us_per_req": cpu,
            # The share of its core the proxy used under load: near 1, the proxy set the
            # pace; well below, the client did (it shares a core with the upstream).
            "proxy_busy": None if rps is None or cpu is None else rps * cpu / 1e6,
            "peak_rss_mb": v.peak_rss_mb, "errors": v.errors,
            "runs": {"rps": v.rps, "cpu_us_per_req": v.cpu_us_per_req},
            **({"fast_path": v.fast_path, "counters": v.counters}
               if v.name in (FAST, SLOW) else {}),
        }

    def ratio(a: str, b: str, attr: str) -> float | None:
        x = by[a].median(attr) if a in by else None
        y = by[b].median(attr) if b in by else None
        return None if x is None or not y else x / y

    out["ratios"] = {
        "fast_rps_vs_direct": ratio(FAST, DIRECT, "rps"),
        "fast_rps_vs_nginx": ratio(FAST, NGINX, "rps"),
        "fast_cpu_vs_nginx": ratio(FAST, NGINX, "cpu_us_per_req"),
        "fast_rps_vs_aiohttp": ratio(FAST, SLOW, "rps"),
        "aiohttp_cpu_vs_fast": ratio(SLOW, FAST, "cpu_us_per_req"),
        "aiohttp_rps_vs_direct": ratio(SLOW, DIRECT, "rps"),
    }
    fast = by.get(FAST)
    if fast is not None:
        c = fast.counters
        # Measured: the daemon said its fast path was on, it answered the requests on the
        # intercepted route, and not one connection was handed to the aiohttp server.
        out["fast_path_serves_intercepted"] = bool(
            fast.fast_path and c.get("requests", 0) > 0 and c.get("handovers", 1) == 0)
    out["errors"] = sum(v.errors for v in variants)
    return out


def _f(value: float | None, spec: str, unit: str = "") -> str:
    return "-" if value is None or value != value else format(value, spec) + unit


def describe(s: dict[str, Any]) -> str:
    """The report's table and lines (run.py prints them)."""
    if "skipped" in s:
        return f"intercepted HTTPS: skipped: {s['skipped']}"
    if "error" in s:
        return f"intercepted HTTPS: failed: {s['error']}"
    vs = s["variants"]
    direct, nginx = vs.get(DIRECT, {}), vs.get(NGINX, {})

    def ratio(v: dict[str, Any], ref: dict[str, Any], attr: str) -> str:
        x, y = v.get(attr), ref.get(attr)
        return "-" if x is None or not y else f"{x / y:.2f}"

    lines = [f"intercepted HTTPS: the same client (Python on uvloop, on the upstream's core) "
             f"straight to the upstream over TLS, through nginx ending TLS, and through "
             f"tokenproxy's forward proxy (CONNECT, TLS ended with its CA's leaf); "
             f"{s['connections']} keep-alive connections for req/s, p50, p99 and CPU, one for "
             f"p50 @1; new conn: a new connection (CONNECT and TLS handshakes) and its first "
             f"answer, one at a time", ""]
    head = ("| variant | req/s @64 | × direct TLS | × nginx TLS | p50 @64 | p99 @64 | p50 @1 | "
            "added p50 @1 | new conn p50 | CPU µs/req | × nginx TLS | proxy core busy | "
            "peak RSS MB | errors |")
    lines += [head, "|" + "---|" * (head.count("|") - 1)]
    base_p50 = direct.get("p50_1c_us")
    for name, v in vs.items():
        p50_1 = v.get("p50_1c_us")
        added = (None if p50_1 is None or base_p50 is None or name == DIRECT
                 else p50_1 - base_p50)
        busy = v.get("proxy_busy")
        lines.append(
            f"| {name} | {_f(v['rps'], ',.0f')} | {ratio(v, direct, 'rps')} | "
            f"{ratio(v, nginx, 'rps')} | {_f(v['p50_us'], '.0f', ' µs')} | "
            f"{_f(v['p99_us'], '.0f', ' µs')} | {_f(p50_1, '.0f', ' µs')} | "
            f"{_f(added, '+.0f', ' µs')} | {_f(v['fresh_first_ms'], '.1f', ' ms')} | "
            f"{_f(v['cpu_us_per_req'], '.1f')} | {ratio(v, nginx, 'cpu_us_per_req')} | "
            f"{_f(None if busy is None else busy * 100, '.0f', ' %')} | "
            f"{_f(v['peak_rss_mb'], '.0f')} | {v['errors']} |")
    fast, slow, r = vs.get(FAST), vs.get(SLOW), s["ratios"]
    if fast is not None:
        def x(value: float | None) -> str:
            return "-" if value is None else f"{value:.2f}×"

        line = (f"\nintercepted HTTPS: {_f(fast['rps'], ',.0f')} req/s "
                f"({x(r['fast_rps_vs_direct'])} direct TLS")
        if nginx:
            line += f", {x(r['fast_rps_vs_nginx'])} nginx TLS proxy"
        line += f"), CPU/request {_f(fast['cpu_us_per_req'], '.1f', ' µs')}"
        if nginx:
            line += f" ({x(r['fast_cpu_vs_nginx'])} nginx's)"
        if slow is not None:
            line += (f"; fast path vs aiohttp path (TOKENPROXY_FAST_PATH=0: "
                     f"{_f(slow['rps'], ',.0f')} req/s, "
                     f"{_f(slow['cpu_us_per_req'], '.1f', ' µs')}/request): "
                     f"{x(r['fast_rps_vs_aiohttp'])} the req/s, the aiohttp path "
                     f"{x(r['aiohttp_cpu_vs_fast'])} the CPU per request")
        c = fast["counters"]
        verdict = ("the fast path serves intercepted requests" if
                   s.get("fast_path_serves_intercepted") else
                   "the fast path did NOT serve every intercepted request")
        line += (f"\n  {verdict}: fast_path={fast['fast_path']} in the daemon's listening "
                 f"event, {c.get('requests', 0):.0f} requests on the intercepted route over "
                 f"{c.get('connects', 0):.0f} CONNECTs, {c.get('handovers', 0):.0f} "
                 f"connections handed to the aiohttp server")
        if slow is not None:
            c = slow["counters"]
            line += (f"; with TOKENPROXY_FAST_PATH=0: fast_path={slow['fast_path']}, "
                     f"{c.get('requests', 0):.0f} requests over {c.get('connects', 0):.0f} "
                     f"CONNECTs, all served by aiohttp")
        lines.append(line)
    return "\n".join(lines)


# -- the load client (this file as a script) --------------------------------------------------

_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.I)


class Conn(asyncio.Protocol):
    """One keep-alive connection: the CONNECT answer first (through a proxy), then HTTP/1.1
    responses with Content-Length, one request at a time."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.transport: Any = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[bytes] | None = None   # the CONNECT answer's head
        self.connecting = False
        self.need = -1            # body bytes still to come; -1: reading a head
        self.status = b""
        self.sent = 0.0
        self.end = 0.0            # the timed window's end
        self.latencies: list[float] | None = None
        self.errors = 0
        self.done: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        for fut in (self.waiter, self.done):
            if fut is not None and not fut.done():
                fut.set_exception(ConnectionError(f"connection lost: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.connecting:
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0 and self.waiter is not None and not self.waiter.done():
                head = bytes(self.buf[:end])
                del self.buf[:end + 4]
                self.connecting = False
                self.waiter.set_result(head)
            return
        while True:
            if self.need < 0:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                m = _LENGTH.search(self.buf, 0, end + 2)
                if m is None:   # the load sends nothing that is answered otherwise
                    self._finish(ConnectionError("a response without Content-Length"))
                    self.transport.close()
                    return
                self.need = int(m[1])
                self.status = bytes(self.buf[9:12])
                del self.buf[:end + 4]
            if len(self.buf) < self.need:
                return
            del self.buf[:self.need]
            self.need = -1
            self._answered()

    def start(self, end: float, latencies: list[float], done: asyncio.Future[None]) -> None:
        self.end, self.latencies, self.done = end, latencies, done
        self._send()

    def _send(self) -> None:
        self.sent = time.perf_counter()
        self.transport.write(self.request)

    def _answered(self) -> None:
        now = time.perf_counter()
        assert self.latencies is not None
        self.latencies.append(now - self.sent)
        if self.status != b"200":
            self.errors += 1
        if now < self.end:
            self._send()
        else:
            self._finish(None)

    def _finish(self, exc: Exception | None) -> None:
        if self.done is not None and not self.done.done():
            if exc is None:
                self.done.set_result(None)
            else:
                self.done.set_exception(exc)


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _open(args: argparse.Namespace, ctx: ssl.SSLContext) -> tuple[Conn, float]:
    """One connection set up, and how long that took (s)."""
    loop = asyncio.get_running_loop()
    authority = f"localhost:{args.port}"
    request = (f"GET /small HTTP/1.1\r\nHost: {authority}\r\n"
               + (f"Authorization: Bearer {args.token}\r\n" if args.token else "")
               + "\r\n").encode()
    t0 = time.perf_counter()
    if args.proxy is None:
        _, conn = await loop.create_connection(lambda: Conn(request), "127.0.0.1", args.port,
                                               ssl=ctx, server_hostname="localhost")
        return conn, time.perf_counter() - t0
    transport, conn = await loop.create_connection(lambda: Conn(request), "127.0.0.1",
                                                   args.proxy)
    conn.waiter = loop.create_future()
    conn.connecting = True
    transport.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = await conn.waiter
    if not head.startswith(b"HTTP/1.1 200"):
        transport.close()
        raise ConnectionError(f"CONNECT answered {head[:40]!r}")
    tls = await loop.start_tls(transport, conn, ctx, server_hostname="localhost")
    conn.transport = tls
    return conn, time.perf_counter() - t0


async def _phase(args: argparse.Namespace, ctx: ssl.SSLContext, conns: int,
                 seconds: float) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    opened = await asyncio.gather(*(_open(args, ctx) for _ in range(conns)),
                                  return_exceptions=True)
    ready = [c for c in opened if not isinstance(c, BaseException)]
    failed = [c for c in opened if isinstance(c, BaseException)]
    if failed:
        print(f"{len(failed)} of {conns} connections failed: {failed[0]!r}", file=sys.stderr)
    # A warm-up: one request on every connection at once, so that a proxy has opened its
    # connections to the upstream (TLS handshakes too) before the timed window.
    warm = []
    for conn, _ in ready:
        done: asyncio.Future[None] = loop.create_future()
        conn.start(0.0, [], done)
        warm.append(done)
    warmed = await asyncio.wait_for(asyncio.gather(*warm, return_exceptions=True), 30)
    cold = [r for r in warmed if isinstance(r, BaseException)]
    if cold:
        print(f"{len(cold)} of {len(ready)} connections failed in the warm-up: {cold[0]!r}",
              file=sys.stderr)
        ready = [c for c, r in zip(ready, warmed, strict=True)
                 if not isinstance(r, BaseException)]
    latencies: list[float] = []
    cpu0 = _cpu_seconds(args.pid) if args.pid else 0.0
    t0 = time.perf_counter()
    end = t0 + seconds
    dones = []
    for conn, _ in ready:
        done = loop.create_future()
        conn.start(end, latencies, done)
        dones.append(done)
    # Bounded: a proxy that stops answering fails the phase, not hangs the benchmark.
    results = await asyncio.wait_for(asyncio.gather(*dones, return_exceptions=True),
                                     seconds + 30)
    elapsed = time.perf_counter() - t0
    cpu = _cpu_seconds(args.pid) - cpu0 if args.pid else None
    for conn, _ in ready:
        conn.transport.close()
    lost = sum(1 for r in results if isinstance(r, BaseException))
    if lost:
        first = next(r for r in results if isinstance(r, BaseException))
        print(f"{lost} of {len(ready)} connections failed under load: {first!r}",
              file=sys.stderr)
    latencies.sort()
    n = len(latencies)
    setups = sorted(s for _, s in ready)
    return {
        "connections": conns, "seconds": seconds, "requests": n, "rps": n / elapsed,
        "p50_us": latencies[n // 2] * 1e6 if n else float("nan"),
        "p99_us": latencies[int(n * 0.99)] * 1e6 if n else float("nan"),
        "setup_p50_ms": setups[len(setups) // 2] * 1e3 if setups else float("nan"),
        "cpu_us_per_req": cpu * 1e6 / n if cpu is not None and n else None,
        "errors": len(failed) + len(cold) + lost + sum(c.errors for c, _ in ready),
    }


async def _fresh(args: argparse.Namespace, ctx: ssl.SSLContext, n: int) -> dict[str, Any]:
    """*n* new connections one after another, one request on each: what a tool that opens a
    connection per run (curl) waits for, set-up (CONNECT and TLS handshake) and first answer."""
    loop = asyncio.get_running_loop()
    setups: list[float] = []
    firsts: list[float] = []
    errors = 0
    for _ in range(n):
        try:
            conn, setup = await asyncio.wait_for(_open(args, ctx), 30)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            print(f"a new connection failed: {exc!r}", file=sys.stderr)
            errors += 1
            continue
        latencies: list[float] = []
        done: asyncio.Future[None] = loop.create_future()
        conn.start(0.0, latencies, done)   # a window already over: one request
        try:
            await asyncio.wait_for(done, 30)
        except (OSError, TimeoutError) as exc:
            print(f"a first request failed: {exc!r}", file=sys.stderr)
            errors += 1
        conn.transport.close()
        errors += conn.errors
        setups.append(setup)
        if latencies:
            firsts.append(setup + latencies[0])
    return {"connections": n, "errors": errors,
            "setup_p50_ms": statistics.median(setups) * 1e3 if setups else float("nan"),
            "first_p50_ms": statistics.median(firsts) * 1e3 if firsts else float("nan")}


async def _client(args: argparse.Namespace) -> dict[str, Any]:
    ctx = ssl.create_default_context(cafile=str(args.ca))
    phases = []
    for spec in args.phase:
        conns, _, seconds = spec.partition(":")
        phases.append(await _phase(args, ctx, int(conns), float(seconds)))
    fresh = await _fresh(args, ctx, args.fresh) if args.fresh else None
    return {"phases": phases, "fresh": fresh}


def client_main() -> int:
    ap = argparse.ArgumentParser(description="HTTPS load, directly or through CONNECT")
    ap.add_argument("--port", type=int, required=True, help="the HTTPS server: localhost:PORT")
    ap.add_argument("--proxy", type=int, help="CONNECT through 127.0.0.1:PROXY")
    ap.add_argument("--ca", type=Path, required=True, help="the CA the client trusts")
    ap.add_argument("--token", help="send Authorization: Bearer TOKEN itself")
    ap.add_argument("--pid", type=int, help="the proxy's process: its CPU time per request")
    ap.add_argument("--phase", action="append", required=True, metavar="CONNS:SECONDS",
                    help="CONNS keep-alive connections sending requests for SECONDS")
    ap.add_argument("--fresh", type=int, default=0, metavar="N",
                    help="then N new connections in turn, one request each")
    args = ap.parse_args()
    import uvloop

    print(json.dumps(uvloop.run(_client(args))))
    return 0


def run_client(argv: list[str], seconds: float) -> dict[str, Any]:
    """Run the client (argv: its arguments, with taskset in front if wanted); its phases and
    fresh connections."""
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 120,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the load client failed ({done.returncode}): "
                           f"{done.stderr.strip()[-500:]}")
    if done.stderr.strip():
        print(done.stderr.strip(), file=sys.stderr)
    out: dict[str, Any] = json.loads(done.stdout)
    return out


if __name__ == "__main__":
    raise SystemExit(client_main())
