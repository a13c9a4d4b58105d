"""A real tokenproxy daemon in a child process, for signal, listener, stderr and memory tests;
and a tokenproxy command run to its exit.

The child runs ``python -m tokenproxy run -c FILE``; its stderr goes to a file the test reads
(a pipe nobody drains could block the daemon). Every wait is bounded, and ``running_daemon``
kills the child in a ``finally`` and sweeps its output for the suite's secrets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tests.helpers.config import write_config
from tests.helpers.fakes import SECRETS
from tests.helpers.wait import wait_for

STARTUP_TIMEOUT = 15.0


def daemon_command(config: Path) -> list[str]:
    return [sys.executable, "-m", "tokenproxy", "run", "-c", str(config)]


def child_env(state_dir: Path | None = None) -> dict[str, str]:
    """The test's environment without variables that would change how the daemon runs; any
    state file goes under *state_dir*, never the real home."""
    env = dict(os.environ)
    for name in ("TOKENPROXY_CONFIG", "NOTIFY_SOCKET", "STATE_DIRECTORY"):
        env.pop(name, None)
    if state_dir is not None:
        env["XDG_STATE_HOME"] = str(state_dir)
    return env


class DaemonProcess:
    """One child daemon: its process, its stderr file, and what it logged."""

    def __init__(self, proc: subprocess.Popen[bytes], stderr_path: Path) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.stderr_path = stderr_path

    # -- output --------------------------------------------------------------------------

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        """The JSON log lines so far (a trailing partial line is skipped)."""
        out = []
        for line in self.stderr.splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and (name is None or ev.get("event") == name):
                out.append(ev)
        return out

    async def wait_for_text(self, text: str, timeout: float = STARTUP_TIMEOUT) -> None:
        def seen() -> bool:
            if self.proc.poll() is not None and text not in self.stderr:
                raise AssertionError(
                    f"daemon exited {self.proc.returncode} before logging {text!r}:\n"
                    + self.stderr)
            return text in self.stderr

        await wait_for(seen, f"{text!r} on the daemon's stderr", timeout)

    async def wait_for_event(self, name: str, timeout: float = 5.0) -> dict[str, Any]:
        def seen() -> bool:
            if self.proc.poll() is not None and not self.events(name):
                raise AssertionError(
                    f"daemon exited {self.proc.returncode} before logging event {name!r}:\n"
                    + self.stderr)
            return bool(self.events(name))

        await wait_for(seen, f"event {name!r} on the daemon's stderr", timeout)
        return self.events(name)[0]

    # -- addresses (from the `listening` event) ------------------------------------------

    def addresses(self, key: str = "listen") -> list[str]:
        [event] = self.events("listening")
        return list(event[key])

    def port(self, index: int = 0) -> int:
        return int(self.addresses("listen")[index].rsplit(":", 1)[1])

    @property
    def admin_port(self) -> int:
        return int(self.addresses("admin")[0].rsplit(":", 1)[1])

    def url(self, path: str, index: int = 0) -> str:
        return f"http://127.0.0.1:{self.port(index)}{path}"

    # -- process -------------------------------------------------------------------------

    def send_signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float) -> int:
        """The exit code, once the child has exited; fail after *timeout* seconds."""
        await wait_for(lambda: self.proc.poll() is not None, "the daemon to exit", timeout)
        return self.proc.returncode

    def peak_rss_bytes(self) -> int:
        """VmHWM: the highest resident set size the process has had."""
        status = Path(f"/proc/{self.pid}/status").read_text(encoding="ascii")
        for line in status.splitlines():
            if line.startswith("VmHWM:"):
                value, unit = line.split()[1:3]
                assert "kB" == unit
                return int(value) * 1024
        raise AssertionError("no VmHWM in /proc/PID/status")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    def assert_no_secrets(self) -> None:
        leaked = [s for s in SECRETS if s in self.stderr]
        assert not leaked, f"secrets leaked into the daemon's stderr: {leaked}"


def run_to_exit(argv: list[str], cwd: Path, env: dict[str, str] | None = None,
                timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """``python -m tokenproxy ARGV`` in a child process in *cwd* (environment: child_env(cwd)
    unless *env* is given), expected to exit by itself: its exit code and output. A hang
    fails the test after *timeout* seconds."""
    try:
        return subprocess.run([sys.executable, "-m", "tokenproxy", *argv], cwd=cwd,
                              env=child_env(cwd) if env is None else env,
                              stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise AssertionError(
            f"tokenproxy {' '.join(argv)} did not finish within {timeout} s") from None


async def run_to_exit_async(argv: list[str], cwd: Path, env: dict[str, str] | None = None,
                            timeout: float = 30.0) -> tuple[int, str, str]:
    """run_to_exit for a test whose event loop must keep serving meanwhile (an upstream or an
    issuer in the test process): (exit code, stdout, stderr)."""
    return await run_command_async([sys.executable, "-m", "tokenproxy", *argv], cwd, env,
                                   timeout)


async def run_command_async(argv: list[str], cwd: Path, env: dict[str, str] | None = None,
                            timeout: float = 30.0) -> tuple[int, str, str]:
    """Any command (tokenproxy inside a wrapper, say), as run_to_exit_async runs tokenproxy."""
    proc = await asyncio.create_subprocess_exec(
        *argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=child_env(cwd) if env is None else env, cwd=cwd)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        raise AssertionError(f"{' '.join(argv)} did not finish within {timeout} s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def spawn(config: Path, directory: Path) -> DaemonProcess:
    stderr_path = directory / f"{config.stem}.stderr"
    with stderr_path.open("wb") as err:
        proc = subprocess.Popen(daemon_command(config), stdin=subprocess.DEVNULL,
                                stdout=err, stderr=err, env=child_env(directory), cwd=directory)
    return DaemonProcess(proc, stderr_path)


@contextlib.asynccontextmanager
async def running_daemon(
    raw: dict[str, Any], directory: Path, *, wait_text: str | None = None
) -> AsyncIterator[DaemonProcess]:
    """Start a daemon from *raw* and wait until it is listening; always kill it at the end.

    The wait is for the JSON ``listening`` event, or for *wait_text* on stderr when the log
    format is not JSON.
    """
    daemon = spawn(write_config(directory, raw), directory)
    try:
        if wait_text is None:
            await daemon.wait_for_event("listening", STARTUP_TIMEOUT)
        else:
            await daemon.wait_for_text(wait_text)
        yield daemon
    finally:
        daemon.kill()
    daemon.assert_no_secrets()
