"""Local files tokenproxy trusts: the state file, its lock files, its default location and the
config file. Someone who can write the state file (or its directory) chooses the token the
upstream receives, so such a file is refused like ssh refuses a loose ``authorized_keys``."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry

from tests.helpers.client import fetch, status_of
from tests.helpers.config import (
    MakeProxy,
    command_provider,
    proxy_config,
    upstream_url,
    write_config,
)
from tests.helpers.daemon_proc import run_to_exit
from tests.helpers.fakes import (
    CLIENT_KEY,
    CLIENT_SECRET,
    PASSWORD,
    REFRESH_TOKEN,
    SECRETS,
    TOKEN,
    FakeClock,
    JumpClock,
)
from tests.helpers.idp import PASSWORD_GRANT, Idp, StartIdp, oauth2_config
from tests.helpers.logs import CapturedLogs
from tests.helpers.metrics import refreshes
from tests.helpers.wait import wait_for, wait_ready
from tokenproxy.cli import main
from tokenproxy.config import build_config, load_config
from tokenproxy.daemon import Daemon
from tokenproxy.errors import ConfigError
from tokenproxy.log import Redactor
from tokenproxy.metrics import Metrics
from tokenproxy.tokens.factory import SourceFactory
from tokenproxy.tokens.http import make_token_session
from tokenproxy.tokens.manager import TokenManager
from tokenproxy.tokens.state import StateFileError, StateStore, StoredTokens, identity_key
from tokenproxy.tokens.store import FileStore

OTHER_UID = 65534   # "nobody": any uid other than ours will do
# Nothing listens on port 9: a token endpoint there fails at once instead of hanging a test.
DEAD_TOKEN_URL = "http://127.0.0.1:9/oauth/token"
WATCHDOG = 5.0   # real seconds before a blocked FIFO open is released by the test itself

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="giving a file to another uid (chown) needs root")


@pytest.fixture(name="idp")
async def _idp(start: StartIdp) -> Idp:
    return await start()


def dead_oauth2(state: Path) -> dict[str, Any]:
    """A config whose oauth2 provider ``idp`` persists tokens at *state* and cannot get any."""
    return {
        "listen": "127.0.0.1:0",
        "admin_listen": None,
        "state_path": str(state),
        "providers": {"idp": {"type": "oauth2", "token_url": DEAD_TOKEN_URL,
                              "client_id": "demo-client", "client_secret": CLIENT_SECRET}},
        "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:9/", "provider": "idp"}],
    }


def plant(path: Path, raw: dict[str, Any], wall: float) -> None:
    """Write TOKEN into the state file as provider ``idp``'s current access token, newer than
    anything the daemon holds: what someone able to write the file would do."""
    provider = build_config(raw, {}).providers["idp"]
    key = identity_key("idp", provider.identity())
    entry = StoredTokens(TOKEN, wall + 3600, None, wall)
    path.write_text(json.dumps({"version": 1, "providers": {key: entry.to_json()}}))


@contextlib.contextmanager
def fifo_watchdog(fifo: Path) -> Iterator[None]:
    """Releases a reader blocked opening *fifo* after WATCHDOG seconds (by opening its write
    end), so a regression fails the test instead of hanging the suite."""
    def release() -> None:
        with contextlib.suppress(OSError):   # ENXIO: nobody was blocked on it
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    timer = threading.Timer(WATCHDOG, release)
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


# -- an unsafe state file is refused at start ------------------------------------------------


def _chown_file(path: Path, folder: Path) -> str:
    os.chown(path, OTHER_UID, OTHER_UID)
    return f"is owned by uid {OTHER_UID}"


def _group_writable_file(path: Path, folder: Path) -> str:
    path.chmod(0o620)
    return "is writable by group or others (mode 0o620)"


def _world_writable_file(path: Path, folder: Path) -> str:
    path.chmod(0o666)
    return "is writable by group or others (mode 0o666)"


def _symlink(path: Path, folder: Path) -> str:
    real = folder.parent / "real-state.json"
    path.rename(real)
    path.symlink_to(real)
    return "is a symbolic link"


def _directory(path: Path, folder: Path) -> str:
    path.unlink()
    path.mkdir()
    return "is a directory"


def _chown_directory(path: Path, folder: Path) -> str:
    os.chown(folder, OTHER_UID, OTHER_UID)
    return f"its directory {folder} is owned by uid {OTHER_UID}"


def _world_writable_directory(path: Path, folder: Path) -> str:
    folder.chmod(0o777)
    return f"its directory {folder} is writable by group or others (mode 0o777)"


def _sticky_directory(path: Path, folder: Path) -> str:
    folder.chmod(0o1777)   # like /tmp: others cannot replace our file, but can plant one first
    return f"its directory {folder} is writable by group or others (mode 0o1777)"


UNSAFE: dict[str, Callable[[Path, Path], str]] = {
    "file-other-owner": _chown_file,
    "file-group-writable": _group_writable_file,
    "file-world-writable": _world_writable_file,
    "symlink": _symlink,
    "directory": _directory,
    "dir-other-owner": _chown_directory,
    "dir-world-writable": _world_writable_directory,
    "dir-sticky": _sticky_directory,
}
ROOT_ONLY = ("file-other-owner", "dir-other-owner")


def unsafe_cases() -> list[Any]:
    return [pytest.param(name, marks=[needs_root] if name in ROOT_ONLY else [])
            for name in UNSAFE]


def unsafe_state(tmp_path: Path, case: str, raw_for: Callable[[Path], dict[str, Any]],
                 wall: float) -> tuple[Path, dict[str, Any], str]:
    """A private folder with a state file holding a planted TOKEN, made unsafe by *case*.
    Returns the state path, the config and what the refusal must say."""
    folder = tmp_path / "state"
    folder.mkdir(mode=0o700)
    path = folder / "state.json"
    raw = raw_for(path)
    plant(path, raw, wall)
    path.chmod(0o600)
    return path, raw, UNSAFE[case](path, folder)


@pytest.mark.parametrize("case", unsafe_cases())
async def test_unsafe_state_file_refused_at_start(
    make_proxy: MakeProxy, tmp_path: Path, clock: JumpClock, case: str,
) -> None:
    """A state file (or directory) that another user owns or that group or others can write,
    or that is not a regular file, stops the daemon with one line naming the path, the
    problem and the fix; its tokens are never used."""
    path, raw, problem = unsafe_state(tmp_path, case, dead_oauth2, clock.time())
    with pytest.raises(ConfigError) as info:
        await make_proxy(raw)
    message = str(info.value)
    assert message.startswith(f"state_path: {path}: {problem}")
    assert "\n" not in message
    assert ": " in message.removeprefix(f"state_path: {path}: {problem}")   # then the fix


@pytest.mark.parametrize("mode", [0o600, 0o640, 0o644])
async def test_readable_state_file_is_used_with_a_warning(
    make_proxy: MakeProxy, tmp_path: Path, clock: JumpClock, logs: CapturedLogs, mode: int,
) -> None:
    """A private or merely readable state file of ours is trusted; a readable one is warned
    about (every write replaces it with a 0600 file anyway)."""
    path = tmp_path / "state.json"
    raw = dead_oauth2(path)
    plant(path, raw, clock.time())
    path.chmod(mode)
    daemon = await make_proxy(raw)
    token = daemon.source("idp").valid_now()
    assert token is not None
    assert TOKEN == token.value
    warned = [ev["mode"] for ev in logs.events("state_file_permissions")]
    assert ([] if mode == 0o600 else [oct(mode)]) == warned


@pytest.mark.parametrize("case", [
    pytest.param("file-other-owner", marks=needs_root), "file-world-writable", "symlink",
    pytest.param("dir-other-owner", marks=needs_root), "dir-world-writable",
])
def test_token_command_refuses_an_unsafe_state_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str,
) -> None:
    """`tokenproxy token` exits 2 with one line instead of printing a planted token."""
    path, raw, problem = unsafe_state(tmp_path, case, dead_oauth2, time.time())
    config = write_config(tmp_path, raw)
    assert 2 == main(["token", "-c", str(config), "idp"])
    out, err = capsys.readouterr()
    assert "" == out
    [line] = err.splitlines()
    assert line.startswith(f"tokenproxy: state_path: {path}: {problem}")


def test_check_config_refuses_an_unsafe_state_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """check-config says what `run` would: exit 2, one line."""
    path, raw, problem = unsafe_state(tmp_path, "file-world-writable", dead_oauth2,
                                      time.time())
    config = write_config(tmp_path, raw)
    assert 2 == main(["check-config", "-c", str(config)])
    out, err = capsys.readouterr()
    assert ("", [f"tokenproxy: state_path: {path}: {problem}"]) == (
        out, [line[:len(f"tokenproxy: state_path: {path}: {problem}")] for line in
              err.splitlines()])


@pytest.mark.slow
def test_run_refuses_an_unsafe_state_file(tmp_path: Path) -> None:
    """`tokenproxy run` exits 2 with one stderr line saying what is wrong and how to fix it."""
    path, raw, _ = unsafe_state(tmp_path, "file-world-writable", dead_oauth2, time.time())
    config = write_config(tmp_path, raw)
    proc = run_to_exit(["run", "-c", str(config)], tmp_path)
    assert 2 == proc.returncode
    assert [f"tokenproxy: state_path: {path}: is writable by group or others (mode 0o666): "
            f"chmod go-w {path}"] == proc.stderr.splitlines()


@pytest.mark.parametrize("change", ["new-path", "first-token-provider"])
async def test_reload_refuses_an_unsafe_state_file(
    make_proxy: MakeProxy, tmp_path: Path, clock: JumpClock, change: str,
    http: aiohttp.ClientSession,
) -> None:
    """A reload onto a state file that is not safe to trust fails before anything changes:
    whether the path changed or the file is about to be trusted by a provider for the first
    time."""
    path, new_raw, problem = unsafe_state(tmp_path, "file-world-writable", dead_oauth2,
                                          clock.time())
    old_raw = proxy_config("http://127.0.0.1:9/", TOKEN, admin_listen=None)
    if change == "first-token-provider":
        old_raw["state_path"] = str(path)
    daemon = await make_proxy(old_raw)
    with pytest.raises(ConfigError) as info:
        await daemon.reload(build_config(new_raw, {}))
    assert str(info.value).startswith(f"state_path: {path}: {problem}")
    assert ["api"] == list(daemon.config.providers)
    assert 200 != await status_of(http, daemon, "/x")   # still the old route: port 9 refuses, 502


async def test_world_writable_volume_with_a_private_state_directory_inside(
    make_proxy: MakeProxy, idp: Idp, tmp_path: Path,
    http: aiohttp.ClientSession,
) -> None:
    """A world-writable volume (a Kubernetes emptyDir is 0777) holds the state safely in a
    directory of its own, which tokenproxy creates 0700."""
    volume = tmp_path / "volume"
    volume.mkdir()
    volume.chmod(0o2777)
    path = volume / "private" / "state.json"
    daemon = await make_proxy(oauth2_config(idp, tmp_path, top={"state_path": str(path)}))
    await wait_ready(daemon)
    assert 200 == await status_of(http, daemon, "/x")
    assert 0o700 == path.parent.stat().st_mode & 0o777   # setgid is inherited, harmlessly
    assert 0o600 == stat.S_IMODE(path.stat().st_mode)


# -- a state file made unsafe while running is not trusted -----------------------------------


@pytest.mark.parametrize("case", [pytest.param("file-other-owner", marks=needs_root),
                                  "file-world-writable", "symlink"])
async def test_state_file_made_unsafe_while_running_is_not_trusted(
    make_proxy: MakeProxy, idp: Idp, tmp_path: Path, clock: JumpClock, logs: CapturedLogs,
    case: str,
    http: aiohttp.ClientSession,
) -> None:
    """Re-read under the lock before a refresh, a file that became unsafe holds nothing: the
    upstream gets a token from the token endpoint, never the planted one, and an error event
    names the file and the problem (not its contents). The write then replaces the file."""
    folder = tmp_path / "state"
    folder.mkdir(mode=0o700)
    path = folder / "state.json"
    raw = oauth2_config(idp, tmp_path, refresh_margin=0, top={"state_path": str(path)},
                        **PASSWORD_GRANT)
    daemon = await make_proxy(raw)
    await wait_ready(daemon)
    assert 200 == await status_of(http, daemon, "/x")
    plant(path, raw, clock.time() + 1)
    problem = UNSAFE[case](path, folder)
    clock.advance(11)   # expired: the next request refreshes
    assert 200 == await status_of(http, daemon, "/x")
    assert TOKEN not in idp.tap.bearers()
    assert ["password", "refresh_token"] == idp.calls.grants()
    events = logs.events("state_file_unsafe")
    assert events
    for ev in events:
        assert ("error", str(path)) == (ev["level"], ev["path"])
        assert problem in ev["reason"]
    assert path.is_file()
    assert not path.is_symlink()
    assert 0o600 == stat.S_IMODE(path.stat().st_mode)
    assert os.geteuid() == path.stat().st_uid
    assert TOKEN not in path.read_text()


@pytest.mark.parametrize("case", [pytest.param("dir-other-owner", marks=needs_root),
                                  "dir-world-writable"])
async def test_unsafe_state_directory_while_running_keeps_tokens_in_memory(
    make_proxy: MakeProxy, idp: Idp, tmp_path: Path, clock: JumpClock, logs: CapturedLogs,
    case: str,
    http: aiohttp.ClientSession,
) -> None:
    """A state directory that became unsafe is neither read nor written: the planted token is
    ignored, the rotated refresh token lives on in memory, and requests keep working."""
    folder = tmp_path / "state"
    folder.mkdir(mode=0o700)
    path = folder / "state.json"
    raw = oauth2_config(idp, tmp_path, refresh_margin=0, top={"state_path": str(path)},
                        **PASSWORD_GRANT)
    daemon = await make_proxy(raw)
    await wait_ready(daemon)
    plant(path, raw, clock.time() + 1)
    UNSAFE[case](path, folder)
    planted = path.read_bytes()
    for _ in range(2):
        clock.advance(11)
        assert 200 == await status_of(http, daemon, "/x")
    assert TOKEN not in idp.tap.bearers()
    assert ["password", "refresh_token", "refresh_token"] == idp.calls.grants()
    assert 0 == idp.issuer.stats.reuse_detected
    assert planted == path.read_bytes()
    assert 2 == len(logs.events("state_write_failed"))
    assert logs.events("state_file_unsafe")


# -- a FIFO never hangs start-up -------------------------------------------------------------


def test_state_read_never_blocks_on_a_fifo(tmp_path: Path, logs: CapturedLogs) -> None:
    """Reading a FIFO at the state path returns at once with nothing and an error event."""
    path = tmp_path / "state.json"
    os.mkfifo(path)
    started = time.monotonic()
    with fifo_watchdog(path):
        assert {} == StateStore(path).read_all()
    assert time.monotonic() - started < WATCHDOG
    [ev] = logs.events("state_file_unsafe")
    assert "is a FIFO" in ev["reason"]
    assert stat.S_ISFIFO(path.lstat().st_mode)   # left alone: not a corrupt state file


async def test_daemon_with_a_fifo_state_file_refuses_promptly(
    make_proxy: MakeProxy, tmp_path: Path,
) -> None:
    """Daemon.start with a FIFO at the state path refuses at once, naming it."""
    path = tmp_path / "state.json"
    os.mkfifo(path)
    started = time.monotonic()
    with fifo_watchdog(path), pytest.raises(ConfigError) as info:
        await make_proxy(dead_oauth2(path))
    assert time.monotonic() - started < WATCHDOG
    assert str(info.value).startswith(f"state_path: {path}: is a FIFO, not a regular file")


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "token"])
def test_cli_with_a_fifo_state_file_exits_2(tmp_path: Path, command: str) -> None:
    """`tokenproxy run` and `tokenproxy token` refuse a FIFO state file: exit 2, no hang."""
    path = tmp_path / "state.json"
    os.mkfifo(path)
    config = write_config(tmp_path, dead_oauth2(path))
    proc = run_to_exit([command, "-c", str(config)], tmp_path)
    assert 2 == proc.returncode
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"tokenproxy: state_path: {path}: is a FIFO, not a regular file")


class GatedStore(StateStore):
    """A state file on a disk that answers only once the event loop has moved on: a read made
    on the event loop itself waits out the gate, and says so."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.gate = threading.Event()
        self.loop_was_blocked = False

    def read_all(self) -> dict[str, StoredTokens]:
        if not self.gate.wait(WATCHDOG):
            self.loop_was_blocked = True
        return super().read_all()


async def test_provider_start_reads_the_state_file_off_the_event_loop(
    tmp_path: Path, clock: JumpClock,
) -> None:
    """A slow state-file read at start does not stall the event loop, and its token is used."""
    path = tmp_path / "state.json"
    raw = dead_oauth2(path)
    plant(path, raw, clock.time())
    path.chmod(0o600)
    store = GatedStore(path)
    async with make_token_session() as session:
        factory = SourceFactory(clock=clock, metrics=Metrics(CollectorRegistry(), "test"),
                                redactor=Redactor(), session=session, store=FileStore(store))
        source = factory.build(build_config(raw, {}).providers["idp"], {})
        assert isinstance(source, TokenManager)
        starting = asyncio.create_task(source.start())
        await asyncio.sleep(0.05)
        store.gate.set()
        await asyncio.wait_for(starting, 2 * WATCHDOG)
        try:
            assert not store.loop_was_blocked
            token = source.valid_now()
            assert token is not None
            assert TOKEN == token.value
        finally:
            await source.close()


# -- lock files ------------------------------------------------------------------------------


async def test_symlinked_lock_files_never_create_their_target(
    tmp_path: Path, logs: CapturedLogs,
) -> None:
    """A symlink at ``<state>.lock`` or ``<state>.<key>.lock`` is not followed: its target is
    never created. The refresh goes on unlocked (logged); the write is refused, saying why."""
    path = tmp_path / "state.json"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    targets = {"state.json.lock": elsewhere / "made-by-write",
               "state.json.a-1.lock": elsewhere / "made-by-lock"}
    for name, target in targets.items():
        (tmp_path / name).symlink_to(target)
    store = StateStore(path)
    async with store.locked("a:1", 5):
        pass
    with pytest.raises(StateFileError) as info:
        store.write("a:1", StoredTokens("x", None, None, 1.0))
    assert str(info.value).startswith(f"{tmp_path / 'state.json.lock'}: is a symbolic link")
    assert [] == sorted(p.name for p in elsewhere.iterdir())
    assert not path.exists()
    [ev] = logs.events("state_file_unsafe")
    assert (str(tmp_path / "state.json.a-1.lock"), "is a symbolic link") == (
        ev["path"], ev["reason"])


async def test_fifo_lock_file_is_not_used(tmp_path: Path, logs: CapturedLogs) -> None:
    """A lock path that is not a regular file is refused without blocking."""
    path = tmp_path / "state.json"
    os.mkfifo(tmp_path / "state.json.a-1.lock")
    async with asyncio.timeout(WATCHDOG), StateStore(path).locked("a:1", 5):
        pass
    [ev] = logs.events("state_file_unsafe")
    assert "is a FIFO" in ev["reason"]


class _SlowDirStore(StateStore):
    """A state directory on a slow filesystem (NFS, a busy disk): creating and opening a
    lock file takes 0.3 s (GatedStore above does the same to reads)."""

    def _open_lock(self, path: Path) -> int:
        time.sleep(0.3)
        return super()._open_lock(path)


@pytest.mark.slow
async def test_the_refresh_lock_is_not_opened_on_the_event_loop(tmp_path: Path) -> None:
    """StateStore.locked() is taken around every refresh; opening the lock file (mkdir, open
    of the directory, fstat, open, fstat) happens in a thread, or a slow state directory
    would stall every request of the daemon."""
    store = _SlowDirStore(tmp_path / "state.json")
    loop = asyncio.get_running_loop()
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = loop.time()
        while not stop.is_set():
            await asyncio.sleep(0.01)
            now = loop.time()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    async with store.locked("idp:0123", 5):
        pass
    stop.set()
    await ticking
    assert max(gaps) < 0.2, f"the event loop stalled {max(gaps):.2f} s opening a lock file"


def _fds_on(path: Path) -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                count += 1
    return count


@pytest.mark.slow
async def test_a_refresh_cancelled_while_its_lock_opens_leaks_no_descriptor(
    tmp_path: Path,
) -> None:
    """The lock file is opened in a thread: a refresh cancelled meanwhile (reload, shutdown,
    the provider closed) never receives the descriptor the thread goes on to return. Unless
    the open is shielded and its result closed on cancellation, nobody closes it: one
    descriptor per such cancellation, for the life of the process."""
    store = _SlowDirStore(tmp_path / "state.json")
    lock = tmp_path / "state.json.idp-0123.lock"

    async def refresh() -> None:
        async with store.locked("idp:0123", 5):
            await asyncio.sleep(1)

    task = asyncio.create_task(refresh())
    await asyncio.sleep(0.05)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.5)   # the slow open (0.3 s) is over either way
    assert 0 == _fds_on(lock)


@needs_root
def test_a_symlinked_state_directory_swapped_to_a_foreign_one_is_not_trusted(
    tmp_path: Path, logs: CapturedLogs
) -> None:
    """state_path's directory is a symlink (allowed: systemd's StateDirectory is one)
    in a place another user can change (simulated here by root). Swapped mid-run for a
    directory of theirs holding a planted state file: nothing is read from it, nothing is
    written into it, and it is logged."""
    public = tmp_path / "public"
    public.mkdir()
    public.chmod(0o1777)
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    foreign = tmp_path / "foreign"
    foreign.mkdir(mode=0o755)
    (foreign / "state.json").write_text(json.dumps({"version": 1, "providers": {
        "idp:1": StoredTokens(TOKEN, None, None, 1.0).to_json()}}))
    for p in (foreign, foreign / "state.json"):
        os.chown(p, 65534, 65534)
    link = public / "tp"
    link.symlink_to(private)
    store = StateStore(link / "state.json")
    store.check()
    store.write("idp:1", StoredTokens("mine", None, None, 1.0))
    assert "mine" == (store.read("idp:1") or StoredTokens()).access_token
    tmp = public / "tp.new"
    tmp.symlink_to(foreign)
    os.replace(tmp, link)   # the swap another user can do in a sticky dir they own the link in
    assert store.read("idp:1") is None
    with pytest.raises(StateFileError):
        store.write("idp:1", StoredTokens("mine-2", None, None, 2.0))
    assert TOKEN in (foreign / "state.json").read_text()
    assert [] == [p.name for p in foreign.iterdir() if p.name != "state.json"]
    assert logs.events("state_file_unsafe")


@pytest.mark.slow
async def test_lock_held_elsewhere_gives_503_not_a_hang(
    make_proxy: MakeProxy, upstream: TestServer, tmp_path: Path, clock: FakeClock,
    http: aiohttp.ClientSession,
) -> None:
    """While another process holds this provider's state lock, a request waits at most the
    route timeout and gets 503 + Retry-After; the refresh fails into backoff."""
    state = tmp_path / "s.json"
    provider = command_provider("print('locked-token-cccccccc')", timeout="0.3s")
    raw = proxy_config(upstream_url(upstream, "/"), TOKEN, state_path=str(state))
    raw["providers"] = {"api": provider}
    raw["routes"][0]["timeout"] = "0.5s"
    cfg = build_config(raw, {})
    other = StateStore(state)   # a second process's store, holding the lock
    key = identity_key("api", cfg.providers["api"].identity())
    async with other.locked(key, 5):
        started = time.monotonic()
        daemon = await make_proxy(raw)
        resp = await fetch(http, daemon, "/echo/x")
        assert 503 == resp.status
        assert "Retry-After" in resp.headers
        assert time.monotonic() - started < 2.0
        await wait_for(lambda: refreshes(daemon, "initial", "error", provider="api",
                                         grant="state_file"), "the failed refresh", 3.0)
        assert 1.0 == refreshes(daemon, "initial", "error", provider="api", grant="state_file")
    # Once the lock is free the daemon recovers by itself (backoff, then a new attempt).
    await clock.tick(1.3)

    async def served() -> bool:
        return 200 == await status_of(http, daemon, "/echo/x")

    await wait_for(served, "a 200 once the lock is free", 8.0, every=0.02)


# -- the default location --------------------------------------------------------------------


PERSISTING: dict[str, dict[str, Any]] = {
    "oauth2": {"type": "oauth2", "token_url": "https://auth.example.com/token",
               "client_id": "a", "client_secret": "b"},
    "json": {"type": "json", "login": {"url": "https://auth.example.com/login"}},
    "command": {"type": "command", "command": ["print-token"]},
}
NO_STATE_HOME: list[dict[str, str]] = [
    {}, {"HOME": ""}, {"HOME": "relative"}, {"XDG_STATE_HOME": "relative/state"},
    {"STATE_DIRECTORY": "relative"},
]


@pytest.mark.parametrize("env", NO_STATE_HOME)
@pytest.mark.parametrize("kind", list(PERSISTING))
def test_no_state_location_refused_when_tokens_persist(kind: str, env: dict[str, str]) -> None:
    """Without $STATE_DIRECTORY, $XDG_STATE_HOME or $HOME (absolute), a provider that
    persists tokens needs state_path: no shared fallback such as /tmp."""
    raw = proxy_config("https://api.example.com/", TOKEN)
    raw["providers"]["api"] = PERSISTING[kind]
    with pytest.raises(ConfigError) as info:
        build_config(raw, env)
    assert str(info.value).startswith("state_path: ")
    assert "/tmp" not in str(info.value)


@pytest.mark.parametrize("env", NO_STATE_HOME)
async def test_static_providers_need_no_state_file(
    make_proxy: MakeProxy, env: dict[str, str],
) -> None:
    """Static providers persist nothing: without a state location there is no state file."""
    raw = proxy_config("http://127.0.0.1:9/", TOKEN)
    assert None is build_config(raw, env).state_path
    daemon = await make_proxy(raw, env)
    assert TOKEN == (await daemon.source("api").current()).value


# -- the config file -------------------------------------------------------------------------


def static_with(token: Any) -> dict[str, Any]:
    return {"api": {"type": "static", "token": token}}


def oauth2_with(**secrets: Any) -> dict[str, Any]:
    prov = {"type": "oauth2", "token_url": "https://auth.example.com/token", "client_id": "a"}
    if "client_secret_file" not in secrets:
        prov["client_secret"] = "${TP_CLIENT_SECRET}"
    prov.update(secrets)
    return {"api": prov}


def json_with(password: str) -> dict[str, Any]:
    return {"api": {"type": "json", "login": {"url": "https://auth.example.com/login",
                                              "json": {"user": "bob", "password": password}}}}


ENV = {"TP_TOKEN": TOKEN, "TP_CLIENT_SECRET": CLIENT_SECRET, "TP_PASSWORD": PASSWORD,
       "TP_CLIENT_KEY": CLIENT_KEY}

# Each config holds exactly one secret written in the file itself.
INLINE: dict[str, dict[str, Any]] = {
    "static-token": {"providers": static_with(TOKEN)},
    "client-secret": {"providers": oauth2_with(client_secret=CLIENT_SECRET)},
    "password": {"providers": oauth2_with(grant_type="password", username="u",
                                          password=PASSWORD)},
    "refresh-token": {"providers": oauth2_with(grant_type="refresh_token",
                                               refresh_token=REFRESH_TOKEN)},
    "client-key": {"providers": static_with("${TP_TOKEN}"),
                   "security": {"client_key": CLIENT_KEY}},
    "json-login-body": {"providers": json_with(PASSWORD)},
    "env-default": {"providers": static_with("${TP_UNSET:-" + TOKEN + "}")},
}


def not_inline(tmp_path: Path) -> dict[str, dict[str, Any]]:
    """Configs whose secrets all come from the environment or from *_file."""
    secret = tmp_path / "secret"
    secret.write_text(PASSWORD + "\n")
    return {
        "env": {"providers": {**static_with("${TP_TOKEN}"),
                              **{"idp": oauth2_with(grant_type="password", username="u",
                                                    password="${TP_PASSWORD}")["api"]}},
                "security": {"client_key": "${TP_CLIENT_KEY}"}},
        "file": {"providers": oauth2_with(client_secret_file=str(secret),
                                          grant_type="password", username="u",
                                          password_file=str(secret))},
        "json-login-body-env": {"providers": json_with("${TP_PASSWORD}")},
    }


def config_file(tmp_path: Path, top: dict[str, Any], mode: int) -> Path:
    raw: dict[str, Any] = {
        "listen": "127.0.0.1:0", "admin_listen": None,
        "state_path": str(tmp_path / "state.json"),
        "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:9/", "provider": "api"}],
        **top,
    }
    path = write_config(tmp_path, raw)
    path.chmod(mode)
    return path


def check_config(path: Path, monkeypatch: pytest.MonkeyPatch,
                 capsys: pytest.CaptureFixture[str]) -> list[str]:
    """check-config's output lines; it must succeed and show no secret."""
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TP_UNSET", raising=False)
    assert 0 == main(["check-config", "-c", str(path)])
    out, err = capsys.readouterr()
    assert [] == [s for s in SECRETS if s in out + err]
    assert "" == err
    lines = out.splitlines()
    assert "ok" == lines[-1]
    return lines


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604], ids=oct)
@pytest.mark.parametrize("case", list(INLINE))
def test_check_config_warns_about_a_readable_file_with_inline_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    case: str, mode: int,
) -> None:
    """A secret written in a config file that group or others can read is a warning line."""
    path = config_file(tmp_path, INLINE[case], mode)
    warnings = [line for line in check_config(path, monkeypatch, capsys)
                if line.startswith("warning: ")]
    assert [f"warning: {path} is readable by group or others (mode {oct(mode)}) and holds "
            f"secrets written in it: chmod 600 {path}, or move them to a *_file or "
            "${VARIABLE}"] == warnings


@pytest.mark.parametrize("case", list(INLINE))
def test_check_config_quiet_about_a_private_file_with_inline_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    case: str,
) -> None:
    """A 0600 config file may hold secrets."""
    path = config_file(tmp_path, INLINE[case], 0o600)
    assert not any("warning" in line for line in check_config(path, monkeypatch, capsys))


@pytest.mark.parametrize("case", ["env", "file", "json-login-body-env"])
def test_check_config_quiet_about_secrets_from_env_or_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    case: str,
) -> None:
    """Secrets from ${VAR} or a *_file are not in the file: a readable file is fine."""
    path = config_file(tmp_path, not_inline(tmp_path)[case], 0o644)
    assert not any("warning" in line for line in check_config(path, monkeypatch, capsys))


@pytest.mark.parametrize(("mode", "warned"), [(0o644, True), (0o600, False)],
                         ids=["0o644", "0o600"])
async def test_start_warns_about_a_readable_config_file_with_inline_secrets(
    tmp_path: Path, logs: CapturedLogs, mode: int, warned: bool,
) -> None:
    """At start a readable config file holding a secret is a config_file_permissions warning
    with its path and mode (never the secret)."""
    path = config_file(tmp_path, INLINE["static-token"], mode)
    daemon = Daemon(load_config(path, {}), registry=CollectorRegistry(), redactor=Redactor())
    await daemon.start()
    try:
        events = [(ev["level"], ev["path"], ev["mode"])
                  for ev in logs.events("config_file_permissions")]
        assert ([("warning", str(path), oct(mode))] if warned else []) == events
    finally:
        await daemon.stop(grace=0)
