"""A real Redis for the shared-state tests: Debian's ``redis-server`` on a free loopback port,
persistence off, no config file, its working directory and log in a directory of the test's.
Faults are the real thing: kill (SIGKILL), restart on the same port with the data gone, pause
(SIGSTOP: connections are still accepted by the kernel, commands never answered), resume.

Never a mock: what the daemons see is the server operators run. ``redis_server_fixture`` is
the body of the ``redis_server`` fixture (tests/conftest.py registers it); every wait here is
bounded, and the server is always stopped, even when the test fails.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.helpers.net import free_port

REDIS_SERVER = "redis-server"
REDIS_CLI = "redis-cli"
START_TIMEOUT = 5.0     # until the server answers PING
STOP_TIMEOUT = 5.0      # for a killed server to be reaped
MISSING = ("redis-server is not installed: the shared-state tests need Debian's redis-server "
           "package (.ci/run installs it when missing: apt-get install redis-server redis-tools)")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def redis_server_binary() -> str:
    """The redis-server on PATH; fails the test (never skips it) when there is none."""
    binary = shutil.which(REDIS_SERVER)
    if binary is None:
        pytest.fail(MISSING, pytrace=False)
    return binary


class RedisServer:
    """One redis-server child process on 127.0.0.1. The port is kept across restart(), so
    clients (and daemons) configured with ``url`` reach the new server."""

    def __init__(self, workdir: Path | None = None, password: str | None = None,
                 tls: tuple[Path, Path] | None = None) -> None:
        """*tls*: (key, certificate) to serve TLS only (``rediss://``), the certificate being
        its own CA (the ``cert`` fixture's)."""
        self.password = password
        self.tls = tls
        self._own_dir = workdir is None
        self.dir = Path(tempfile.mkdtemp(prefix="redis-")) if workdir is None else workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self._clients: list[redis.Redis] = []

    # -- addresses -----------------------------------------------------------------------

    @property
    def url(self) -> str:
        """redis://127.0.0.1:PORT/0, with the password when there is one."""
        auth = f":{self.password}@" if self.password is not None else ""
        scheme = "redis" if self.tls is None else "rediss"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    @property
    def log(self) -> str:
        """What the server logged (all its runs in this directory)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- lifecycle -----------------------------------------------------------------------

    def _command(self) -> list[str]:
        ports = ["--port", str(self.port)]
        if self.tls is not None:
            key, crt = self.tls
            ports = ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(crt),
                     "--tls-key-file", str(key), "--tls-ca-cert-file", str(crt),
                     "--tls-auth-clients", "no"]
        cmd = [redis_server_binary(), *ports,
               "--bind", "127.0.0.1", "--protected-mode", "yes",
               "--save", "", "--appendonly", "no",      # persistence off: a restart loses all
               "--dir", str(self.dir), "--logfile", str(self.log_path),
               "--daemonize", "no", "--loglevel", "notice"]
        if self.password is not None:
            cmd += ["--requirepass", self.password]
        return cmd

    def start(self, timeout: float = START_TIMEOUT) -> RedisServer:
        """Start the server and wait (bounded) until it answers PING. The first start picks a
        free port (another if that one was taken meanwhile); later starts reuse it."""
        assert not self.running, "redis-server is already running"
        fixed = self.port != 0
        for _ in range(1 if fixed else 3):
            if not fixed:
                self.port = free_port()
            offset = self.log_path.stat().st_size if self.log_path.exists() else 0
            self.proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            self.paused = False
            if self._wait_ready(timeout):
                return self
            assert self.proc.stderr is not None
            stderr = self.proc.stderr.read().decode(errors="replace")
            self._reap()
            run_log = self.log[offset:]
            if fixed or "Address already in use" not in run_log:
                why = (f"did not answer PING within {timeout}s" if self.proc.returncode == -9
                       else f"exited with code {self.proc.returncode}")
                raise AssertionError(
                    f"redis-server on 127.0.0.1:{self.port} {why}"
                    f"\n--- stderr\n{stderr}\n--- log\n{run_log}")
        raise AssertionError(f"redis-server found no free port after 3 tries:\n{self.log}")

    def _wait_ready(self, timeout: float) -> bool:
        """Until PING answers (True) or the process exits or *timeout* passes (False). A bounded
        poll: tests/helpers/wait.py's wait_for is async, and start() runs in sync fixtures."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        probe = self._new_client(socket_timeout=0.5)
        try:
            while self.proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if probe.ping():
                        return True
                time.sleep(0.01)
        finally:
            probe.close()
        if self.proc.poll() is None:     # still starting after the bound: give up on it
            self.proc.kill()
        return False

    def kill(self) -> None:
        """SIGKILL and reap: the server is gone at once, its clients' connections cut."""
        assert self.proc is not None, "redis-server was never started"
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self._reap()

    def restart(self, timeout: float = START_TIMEOUT) -> RedisServer:
        """Kill the server if it runs, then start a new one on the same port: with
        persistence off it starts empty."""
        if self.running:
            self.kill()
        return self.start(timeout)

    def pause(self) -> None:
        """SIGSTOP: the kernel still completes connections, but no command is answered."""
        assert self.proc is not None, "redis-server was never started"
        assert self.running, "redis-server is not running"
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        """SIGCONT after pause()."""
        if self.proc is not None and self.paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def stop(self) -> None:
        """Close the clients handed out, SIGKILL (persistence is off: there is nothing for a
        graceful stop to save, and it costs a tenth of a second per test), reap; remove the
        working directory if this object made it. Safe to call twice."""
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()   # a stopped (SIGSTOP) process dies of SIGKILL too
            self._reap()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _reap(self) -> None:
        assert self.proc is not None
        self.paused = False
        self.proc.wait(STOP_TIMEOUT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- clients for the test's own assertions ---------------------------------------------

    def _new_client(self, socket_timeout: float) -> redis.Redis:
        # No retries (redis-py retries 3 times by default): a test sees each failure as is.
        tls: dict[str, Any] = {}
        if self.tls is not None:
            tls = {"ssl": True, "ssl_ca_certs": str(self.tls[1])}
        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password,
                           socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
                           retry=Retry(NoBackoff(), 0), **tls)

    def client(self, socket_timeout: float = 2.0) -> redis.Redis:
        """A sync client (bytes in, bytes out, no retries); closed by stop(). Its calls block:
        in an async test with in-process daemons, keep them short or use aclient()."""
        client = self._new_client(socket_timeout)
        self._clients.append(client)
        return client

    def aclient(self, socket_timeout: float = 2.0) -> redis.asyncio.Redis:
        """An asyncio client (no retries), for ``async with server.aclient() as r:``."""
        return redis.asyncio.Redis(
            host="127.0.0.1", port=self.port, password=self.password,
            socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout,
            retry=redis.asyncio.retry.Retry(NoBackoff(), 0))

    def keys(self, pattern: str = "*") -> list[str]:
        """The keys matching *pattern* (SCAN, not KEYS), sorted."""
        with contextlib.closing(self._new_client(2.0)) as r:
            return sorted(_text(k) for k in r.scan_iter(match=pattern))

    def get_all(self, pattern: str = "*") -> dict[str, Any]:
        """Every key matching *pattern* with its value as stored: bytes for a string, a dict
        for a hash, a list for a list, a set for a set, (member, score) pairs for a zset."""
        out: dict[str, Any] = {}
        with contextlib.closing(self._new_client(2.0)) as r:
            for key in self.keys(pattern):
                kind = _text(r.type(key))
                if kind == "string":
                    out[key] = r.get(key)
                elif kind == "hash":
                    out[key] = r.hgetall(key)
                elif kind == "list":
                    out[key] = r.lrange(key, 0, -1)
                elif kind == "set":
                    out[key] = r.smembers(key)
                elif kind == "zset":
                    out[key] = r.zrange(key, 0, -1, withscores=True)
                elif kind != "none":          # gone meanwhile
                    out[key] = kind
        return out

    def raw_dump(self, pattern: str = "*") -> bytes:
        """The keys and every byte of their values, joined: search it for a token in clear."""
        parts: list[bytes] = []

        def add(value: Any) -> None:
            if isinstance(value, bytes):
                parts.append(value)
            elif isinstance(value, dict):
                for k, v in value.items():
                    add(k)
                    add(v)
            elif isinstance(value, list | set | tuple):
                for v in value:
                    add(v)
            else:
                parts.append(str(value).encode())

        for key, value in self.get_all(pattern).items():
            add(key.encode())
            add(value)
        return b"\n".join(parts)

    def cli(self, *args: str, timeout: float = 5.0) -> str:
        """Run ``redis-cli -h 127.0.0.1 -p PORT ARGS...`` (Debian's redis-tools), as an operator
        would to see what is stored (``--scan``, ``HGETALL``); its stdout. The password goes
        through REDISCLI_AUTH, never argv."""
        binary = shutil.which(REDIS_CLI)
        if binary is None:
            pytest.fail(MISSING.replace("redis-server is", "redis-cli is"), pytrace=False)
        env = dict(os.environ)
        if self.password is not None:
            env["REDISCLI_AUTH"] = self.password
        result = subprocess.run([binary, "-h", "127.0.0.1", "-p", str(self.port), *args],
                                capture_output=True, text=True, timeout=timeout, env=env,
                                check=True)
        return result.stdout


def redis_server_fixture(tmp_path: Path, password: str | None = None) -> Iterator[RedisServer]:
    """The ``redis_server`` fixture's body: a started server in tmp_path/redis, stopped when
    the test ends however it ends."""
    server = RedisServer(tmp_path / "redis", password=password)
    try:
        server.start()
        yield server
    finally:
        server.stop()
