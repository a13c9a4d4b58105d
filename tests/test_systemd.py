"""systemd integration: READY/RELOADING/STOPPING over NOTIFY_SOCKET, and SIGHUP reloads."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from tests.helpers.config import proxy_config, upstream_url, write_config
from tests.helpers.daemon_proc import DaemonProcess, child_env, daemon_command
from tests.helpers.fakes import TOKEN, TOKEN_2
from tests.helpers.wait import wait_for
from tokenproxy import systemd


class NotifyListener:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                return self.messages

    async def expect(self, prefix: str, timeout: float = 10.0) -> str:
        def seen() -> bool:
            return any(m.startswith(prefix) for m in self.drain())

        await wait_for(seen, f"{prefix!r} on the notify socket", timeout)
        match = next(m for m in self.messages if m.startswith(prefix))
        self.messages.remove(match)
        return match


def test_notify_without_socket_is_a_no_op() -> None:
    """Outside systemd (no NOTIFY_SOCKET) nothing is sent and nothing fails."""
    assert systemd.notify("READY=1", {}) is False
    assert systemd.notify("READY=1", {"NOTIFY_SOCKET": "relative"}) is False


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_reaches_path_and_abstract_sockets(tmp_path: Path, abstract: bool) -> None:
    """A path socket and an abstract one (leading @) both receive the datagram."""
    if abstract:
        name = f"tokenproxy-test-{os.getpid()}-{time.monotonic_ns()}"
        listener, env_value = NotifyListener("\0" + name), "@" + name
    else:
        path = str(tmp_path / "notify.sock")
        listener, env_value = NotifyListener(path), path
    try:
        assert systemd.notify("READY=1", {"NOTIFY_SOCKET": env_value}) is True
        assert ["READY=1"] == listener.drain()
    finally:
        listener.sock.close()


@pytest.mark.slow
async def test_daemon_notifies_and_reloads_on_sighup(
    upstream: TestServer, tmp_path: Path
) -> None:
    """The daemon sends READY=1 once listening, RELOADING=1 then READY=1 around a SIGHUP
    reload (which applies the new token), keeps serving after an invalid file, and sends
    STOPPING=1 on SIGTERM before exiting 0."""
    notify = NotifyListener(str(tmp_path / "notify.sock"))
    raw = proxy_config(upstream_url(upstream, "/"), TOKEN)
    config = write_config(tmp_path, raw)
    env = child_env(tmp_path)
    env["NOTIFY_SOCKET"] = str(tmp_path / "notify.sock")
    err = (tmp_path / "daemon.stderr").open("wb")
    proc = subprocess.Popen(daemon_command(config), stdin=subprocess.DEVNULL, stdout=err,
                            stderr=err, env=env, cwd=tmp_path)
    daemon = DaemonProcess(proc, tmp_path / "daemon.stderr")
    try:
        assert "READY=1" == await notify.expect("READY=1")
        await daemon.wait_for_event("listening")
        url = daemon.url("/echo/x")

        async def auth() -> str:
            async with aiohttp.ClientSession() as s, s.get(url) as resp:
                assert 200 == resp.status
                doc = await resp.json()
            return next(v for k, v in doc["headers"] if k == "Authorization")

        assert f"Bearer {TOKEN}" == await auth()
        write_config(tmp_path, proxy_config(upstream_url(upstream, "/"), TOKEN_2))
        daemon.send_signal(signal.SIGHUP)
        reloading = await notify.expect("RELOADING=1")
        assert "MONOTONIC_USEC=" in reloading
        await notify.expect("READY=1")
        await daemon.wait_for_event("config_reloaded")
        assert f"Bearer {TOKEN_2}" == await auth()

        config.write_text("routes: [oops", encoding="utf-8")
        daemon.send_signal(signal.SIGHUP)
        await notify.expect("RELOADING=1")
        await notify.expect("READY=1")
        failed = await daemon.wait_for_event("config_reload_failed")
        assert "line" in failed["error"]
        assert f"Bearer {TOKEN_2}" == await auth()

        daemon.send_signal(signal.SIGTERM)
        await notify.expect("STOPPING=1")
        assert 0 == await daemon.wait(10)
    finally:
        daemon.kill()
        err.close()
        notify.sock.close()
    daemon.assert_no_secrets()
