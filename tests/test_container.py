"""The sidecar image, built from this checkout's Dockerfile and run for real with podman
(tests/helpers/podman.py): as uid 65532 on a read-only root, beside an app container in its
network namespace, against the suite's fake upstream and the demo issuer (rotating refresh
tokens) listening on the host's 127.0.0.1.

The first run on a machine makes the Debian base image (about 20 s) and every change to the
checkout rebuilds the image (about 12 s); both are kept in the cache directory
(tests/helpers/podman.py: cache_dir) for the runs after it. The containers themselves take about
15 s.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestServer

from tests.helpers.fakes import CLIENT_SECRET, PASSWORD, FakeUpstream, assert_no_secret
from tests.helpers.idp import UNAVAILABLE, Idp, StartIdp
from tests.helpers.podman import (
    BASE,
    HOST,
    ROOT,
    Container,
    Podman,
    Timings,
    cache_dir,
    podman_binary,
    tokenproxy_image,
    volume_path,
)
from tests.helpers.wait import wait_for

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("podman") is None,
                       reason="podman is not installed (apt-get install podman; .ci/run does)"),
    # The first test of a fresh machine makes the base image and builds the image.
    pytest.mark.timeout(300),
]

UID = 65532
STATE = "/var/lib/tokenproxy"
GRACE = 5            # shutdown_grace of the containers' config, in seconds
DELAY = 2            # the slow request's, in seconds
# The app beside tokenproxy: one GET, its status and body as JSON on stdout.
APP = """\
import json, sys, urllib.error, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=float(sys.argv[2])) as r:
        print(json.dumps({"status": r.status, "body": r.read().decode()}))
except urllib.error.HTTPError as e:
    print(json.dumps({"status": e.code, "body": e.read().decode()}))
"""


@pytest.fixture(name="podman", scope="session")
def _podman() -> Podman:
    podman_binary()
    podman = Podman(cache_dir() / "podman")
    podman.sweep()
    return podman


@pytest.fixture(name="image", scope="session")
def _image(podman: Podman) -> str:
    """The image of this checkout (built once per content, the base once per release)."""
    timings = Timings()
    image = tokenproxy_image(podman, timings)
    (podman.home / "timings.json").write_text(json.dumps(vars(timings)))
    return image


async def listening(tp: Container) -> None:
    """Until the daemon in *tp* logs that it listens; fails at once if it exits."""
    async def up() -> bool:
        if not await asyncio.to_thread(lambda: tp.running):
            raise AssertionError(f"tokenproxy exited {tp.exit_code}:\n{tp.logs()}")
        return bool(await asyncio.to_thread(tp.events, "listening"))

    await wait_for(up, "tokenproxy to listen in its container", 20, every=0.2)


def on_host(url: str) -> str:
    """*url* of a server on the host's 127.0.0.1 as a container reaches it."""
    return url.replace("127.0.0.1", HOST)


def sidecar_config(idp: Idp, upstream: str, **provider: Any) -> dict[str, Any]:
    """The Compose example's config, pointed at the test's issuer and upstream."""
    return {
        "listen": "127.0.0.1:8080",
        "admin_listen": "127.0.0.1:9100",
        "shutdown_grace": f"{GRACE}s",
        "providers": {"idp": {"type": "oauth2", "token_url": on_host(idp.token_url),
                              "client_id": idp.issuer.client_id,
                              "client_secret": CLIENT_SECRET, **provider}},
        "routes": [{"prefix": "/", "upstream": on_host(upstream), "provider": "idp"}],
    }


class Sidecar:
    """tokenproxy containers of one test, each with its config and the state volume, and
    app containers in their network namespace; all removed at the end."""

    def __init__(self, podman: Podman, image: str, tmp_path: Path) -> None:
        self.podman, self.image, self.tmp_path = podman, image, tmp_path
        self.tag = uuid.uuid4().hex[:8]
        self.volume = f"tp-state-{self.tag}"
        self.containers: list[Container] = []

    async def start(self, raw: dict[str, Any], *, read_only: bool = True) -> Container:
        """A tokenproxy container as the README runs it (read-only root, the state volume,
        the config mounted read-only), once it listens."""
        config = self.tmp_path / f"config-{len(self.containers)}.yaml"
        config.write_text(yaml.safe_dump(raw))
        os.chown(config, UID, UID)       # holds secrets: readable by the daemon alone
        config.chmod(0o600)
        tp = Container(self.podman, f"tp-{self.tag}-{len(self.containers)}")
        self.containers.append(tp)
        if len(self.containers) == 1:
            await self.podman.arun("volume", "create", "--label", self.podman.run_label,
                                   self.volume)
        # Read-only as Docker and Kubernetes make it: podman's --read-only alone would add
        # writable tmpfs on /tmp, /var/tmp and /run. Without it (read_only=False), the test
        # can see what the daemon writes (podman diff). --passwd=false: podman would add uid
        # 65532 to /etc/passwd and /etc/group, which Docker does not.
        root = ["--read-only", "--read-only-tmpfs=false"] if read_only else []
        await self.podman.arun(
            "run", "--detach", "--name", tp.name, "--label", self.podman.run_label, *root,
            "--passwd=false",
            "--cap-drop", "ALL", "--security-opt", "no-new-privileges",
            # The HEALTHCHECK is run by the test (podman healthcheck run), not by a timer.
            "--health-interval", "disable",
            "--volume", f"{self.volume}:{STATE}",
            "--volume", f"{config}:/etc/tokenproxy/config.yaml:ro", self.image)
        await listening(tp)
        return tp

    async def app(self, tp: Container, url: str, timeout: float = 10
                  ) -> tuple[int, str]:
        """An app container in *tp*'s network namespace GETs *url*: (status, body)."""
        result = await self.podman.arun(
            "run", "--rm", "--label", self.podman.run_label, "--network",
            f"container:{tp.name}", "--no-healthcheck",
            "--entrypoint", "python", self.image, "-c", APP, url, str(timeout),
            timeout=timeout + 30)
        doc = json.loads(result.stdout)
        return int(doc["status"]), str(doc["body"])

    async def ready(self, tp: Container, timeout: float = 20) -> None:
        """Until /readyz answers 200 (the first token is in)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (await self.app(tp, "http://127.0.0.1:9100/readyz"))[0] != 200:
            if loop.time() > deadline:
                raise AssertionError(f"not ready after {timeout} s:\n{tp.logs()}")
            await asyncio.sleep(0.2)

    def close(self, extra: tuple[str, ...]) -> None:
        logs = "".join(c.logs() for c in self.containers)
        for c in self.containers:
            c.remove()
        self.podman.run("volume", "rm", "--force", self.volume, check=False)
        assert_no_secret(logs, extra=extra)


@pytest.fixture(name="sidecar")
async def _sidecar(podman: Podman, image: str, tmp_path: Path
                   ) -> AsyncIterator[Callable[[Idp], Sidecar]]:
    """Sidecar containers for the test; removed at its end, their logs swept for the suite's
    secrets and the issuer's tokens."""
    made: list[tuple[Sidecar, Idp]] = []

    def make(idp: Idp) -> Sidecar:
        made.append((Sidecar(podman, image, tmp_path), idp))
        return made[-1][0]

    yield make
    for s, idp in made:
        await asyncio.to_thread(s.close, (*idp.issuer._access, *idp.issuer._refresh))


def test_image_runs_version(podman: Podman, image: str) -> None:
    """IMAGE --version: the entrypoint is tokenproxy, of this checkout's version; the state
    directory is the image's volume."""
    out = podman.run("run", "--rm", "--no-healthcheck", image, "--version").stdout
    assert f"tokenproxy {version('tokenproxy')}" == out.strip()
    # The state directory is a declared volume: a run without -v still keeps it off the root.
    volumes = json.loads(podman.run("image", "inspect", "--format", "{{json .Config.Volumes}}",
                                    image).stdout) or {}
    assert [STATE] == list(volumes), "the image declares no state volume"


async def test_sidecar_adds_the_token_read_only_as_65532(
        sidecar: Callable[[Idp], Sidecar], start: StartIdp, upstream: TestServer,
        fake_upstream: FakeUpstream) -> None:
    """An app container in tokenproxy's network namespace calls 127.0.0.1:8080 and the
    upstream gets the issuer's token; the daemon runs as 65532 with no capabilities and
    cannot write its root filesystem, /tmp included (as with Docker's --read-only)."""
    idp = await start()
    s = sidecar(idp)
    tp = await s.start(sidecar_config(idp, fake_upstream.url("/")))
    status, body = await s.app(tp, "http://127.0.0.1:8080/echo/users/me")
    assert 200 == status, body
    [token] = fake_upstream.last.header("Authorization")
    assert token.removeprefix("Bearer ") in idp.issuer._access, "not the issuer's token"
    assert "/echo/users/me" == json.loads(body)["raw_path"]

    status_lines = Path(f"/proc/{tp.pid}/status").read_text().splitlines()
    ids = {k: v.split() for k, _, v in (line.partition(":") for line in status_lines)}
    assert [str(UID)] * 4 == ids["Uid"]
    assert [str(UID)] * 4 == ids["Gid"]
    assert "0000000000000000" == ids["CapEff"][0]

    for path in ("/etc/tokenproxy/x", "/tmp/x"):      # no tmpfs either, as under Docker
        write = await s.podman.arun("exec", tp.name, "python", "-c", f"open('{path}', 'w')",
                                    check=False)
        assert "Read-only file system" in write.stderr, (path, write.stderr)
    # The state file is on the volume, 0600 in a 0700 directory, both the daemon's.
    state = volume_path(s.podman, s.volume)
    assert (UID, 0o700) == (state.stat().st_uid, state.stat().st_mode & 0o777)
    state_file = state / "state.json"
    assert (UID, 0o600) == (state_file.stat().st_uid, state_file.stat().st_mode & 0o777)


def assert_writes_only_state_and_tmp(changed: list[str], mounts: list[Path]) -> None:
    """podman diff of a container run without --read-only: nothing outside the state volume
    and /tmp, but the mount points podman itself creates (with the directories above them)."""
    assert [] == [p for p in changed if not p.startswith((STATE, "/tmp"))
                  and not any(Path(p) == m or Path(p) in m.parents for m in mounts)], changed
    assert "/etc/tokenproxy/config.yaml" in changed     # the diff does show the mount point


async def test_healthcheck_fails_until_ready_and_while_the_daemon_does_not_answer(
        sidecar: Callable[[Idp], Sidecar], start: StartIdp, upstream: TestServer,
        fake_upstream: FakeUpstream) -> None:
    """The Dockerfile's HEALTHCHECK (podman healthcheck run) fails while the daemon serves but
    is not ready (its token endpoint answers 503: no token yet), passes once the token is in,
    fails while the daemon does not answer at all (SIGSTOP), and passes again after SIGCONT."""
    idp = await start()
    idp.calls.default = UNAVAILABLE
    s = sidecar(idp)
    tp = await s.start(sidecar_config(idp, fake_upstream.url("/")))
    await wait_for(lambda: len(idp.calls.seen) >= 1, "the first token call", 20, every=0.1)
    check = await tp.healthcheck()
    assert (1, "unhealthy") == (check.returncode, check.stdout.strip()), check.stderr
    idp.calls.default = None          # the token endpoint is back

    async def healthy() -> bool:
        return (await tp.healthcheck()).returncode == 0

    await wait_for(healthy, "the HEALTHCHECK to pass once the token is in", 30, every=0.2)
    await s.podman.arun("kill", "--signal", "STOP", tp.name)
    try:
        check = await tp.healthcheck()
        assert (1, "unhealthy") == (check.returncode, check.stdout.strip()), check.stderr
    finally:
        await s.podman.arun("kill", "--signal", "CONT", tp.name)
    check = await tp.healthcheck()
    assert 0 == check.returncode, check.stdout + check.stderr
    assert ("healthy", "0") == (tp.inspect("{{.State.Health.Status}}"),
                                tp.inspect("{{.State.Health.FailingStreak}}"))


async def test_sigterm_drains_an_in_flight_request(
        sidecar: Callable[[Idp], Sidecar], start: StartIdp, upstream: TestServer,
        fake_upstream: FakeUpstream) -> None:
    """podman stop (SIGTERM) while a slow request is in flight: the app still gets its answer,
    and the container exits 0 within shutdown_grace."""
    idp = await start()
    s = sidecar(idp)
    tp = await s.start(sidecar_config(idp, fake_upstream.url("/")))
    await s.ready(tp)
    slow = asyncio.create_task(s.app(tp, f"http://127.0.0.1:8080/slow?delay={DELAY}"))
    loop = asyncio.get_running_loop()
    try:
        await wait_for(lambda: any(r.raw_path.startswith("/slow") for r in fake_upstream.seen),
                       "the slow request at the upstream", 15, every=0.05)
        answered = loop.time() + DELAY      # the upstream answers by then (or a poll earlier)
        took = await tp.stop(timeout=GRACE + 5)
        stopped = loop.time()
        assert (200, "slow") == await asyncio.wait_for(slow, 15)
    finally:
        slow.cancel()
    assert 0 == tp.exit_code, tp.logs()
    assert took < GRACE, tp.logs()
    # Exited as soon as the answer went out, not at the end of the grace period.
    assert stopped - answered < 1.5, (stopped - answered, tp.logs())
    [shutdown] = tp.events("shutdown")
    assert ("SIGTERM", GRACE) == (shutdown["signal"], shutdown["grace_s"])


async def test_restart_reuses_the_rotated_refresh_token_on_the_volume(
        sidecar: Callable[[Idp], Sidecar], start: StartIdp) -> None:
    """The daemon logs in once (password grant), refreshes (the issuer rotates the refresh
    token), is stopped, having written nothing outside the state volume and /tmp (podman
    diff; run without --read-only for that); a new container on the same state volume goes
    on with the rotated refresh token: no new login, and the issuer's API accepts what it
    then gets (a spent refresh token would have revoked the whole family)."""
    idp = await start(lifetime=3.0)
    s = sidecar(idp)
    raw = sidecar_config(idp, idp.url + "/api/", grant_type="password", username="demo",
                         password=PASSWORD, refresh_margin="1s")
    tp = await s.start(raw, read_only=False)
    await wait_for(lambda: "refresh_token" in idp.calls.grants(),
                   "a refresh (rotating the refresh token)", 20, every=0.1)
    await tp.stop(timeout=GRACE + 5)
    assert 0 == tp.exit_code, tp.logs()
    # A login, a refresh, a state file written twice and a shutdown: written where allowed.
    mounts = [Path(m["Destination"]) for m in json.loads(tp.inspect("{{json .Mounts}}"))]
    assert_writes_only_state_and_tmp(await tp.diff(), mounts)
    assert "password" == idp.calls.grants()[0]
    [family] = {id(f): f for f in idp.issuer._refresh.values()}.values()
    rotated = family.live_refresh
    assert rotated is not None
    assert rotated in (volume_path(s.podman, s.volume) / "state.json").read_text(), \
        "the rotated refresh token is not in the state file on the volume"
    before = len(idp.calls.seen)

    again = await s.start(raw)
    await wait_for(lambda: len(idp.calls.seen) > before, "the restarted daemon's refresh", 20,
                   every=0.1)
    after = idp.calls.seen[before:]
    assert "password" not in [c.grant for c in after]
    assert ("refresh_token", rotated) == (after[0].grant, after[0].form["refresh_token"])
    status, body = await s.app(again, "http://127.0.0.1:8080/whoami")
    assert 200 == status, body
    assert not family.revoked


def test_image_size(podman: Podman, image: str) -> None:
    """What tokenproxy adds to its base (README: Container and sidecar) stays small."""
    added = podman.size(image) - podman.size(BASE)
    assert 0 < added < 80_000_000, added


# -- the Compose example -------------------------------------------------------------------


def test_compose_example_config(tmp_path: Path) -> None:
    """podman-compose reads the Compose example, its secret file in place, and keeps what
    makes it a sidecar."""
    compose = compose_binary()
    shutil.copy(ROOT / "Dockerfile", tmp_path)
    work = Path(shutil.copytree(ROOT / "examples", tmp_path / "examples"))
    (work / "client_secret").write_text("x")
    result = subprocess.run([compose, "-f", "docker-compose.yaml", "config"], cwd=work,
                            capture_output=True, text=True, timeout=60, check=False,
                            env=Podman(tmp_path / "podman").env)
    assert 0 == result.returncode, result.stdout + result.stderr
    doc = yaml.safe_load(result.stdout)
    service = doc["services"]["tokenproxy"]
    assert "service:app" == service["network_mode"]
    assert str(tmp_path) == service["build"]["context"]      # the checkout's Dockerfile
    assert (True, ["ALL"]) == (service["read_only"], service["cap_drop"])
    assert "tokenproxy-state:/var/lib/tokenproxy" in service["volumes"]
    assert "ports" not in service


async def test_compose_example_runs(podman: Podman, image: str, start: StartIdp,
                                    upstream: TestServer, fake_upstream: FakeUpstream,
                                    tmp_path: Path) -> None:
    """The Compose example brought up with podman-compose, as written but for what cannot be
    had here: the app is the test's base image (no registry for curlimages/curl) in a network
    namespace that reaches the host's loopback, tokenproxy the image built from this checkout,
    and the config points at the test's issuer and upstream. tokenproxy reads its secret from
    the Compose secret file, shares the app's network namespace (network_mode: service:app),
    and the app's call to 127.0.0.1:8080 reaches the upstream with the token."""
    idp = await start()
    work = Path(shutil.copytree(ROOT / "examples", tmp_path / "examples"))
    doc = yaml.safe_load((work / "docker-compose.yaml").read_text())
    app, tokenproxy = doc["services"]["app"], doc["services"]["tokenproxy"]
    app.update(image=BASE, command=["sleep", "300"],
               network_mode="slirp4netns:allow_host_loopback=true")
    del tokenproxy["build"]
    tokenproxy["image"] = image
    label = dict([podman.run_label.split("=", 1)])     # for the sweep, if this run dies
    for service in (app, tokenproxy):
        service["labels"] = label
    doc["volumes"]["tokenproxy-state"] = {"labels": label}
    (work / "docker-compose.yaml").write_text(yaml.safe_dump(doc))
    config = yaml.safe_load((work / "compose-config.yaml").read_text())
    provider = config["providers"]["api"]
    provider.update(token_url=on_host(idp.token_url), client_id=idp.issuer.client_id)
    config["routes"][0]["upstream"] = on_host(fake_upstream.url("/"))
    (work / "compose-config.yaml").write_text(yaml.safe_dump(config))
    (work / "client_secret").write_text(CLIENT_SECRET)
    for name in ("compose-config.yaml", "client_secret"):    # the daemon's alone
        os.chown(work / name, UID, UID)
        (work / name).chmod(0o600)
    project = f"tpc{uuid.uuid4().hex[:8]}"

    async def compose(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run, [compose_binary(), "-p", project, "--in-pod", "false",
                             "--podman-args", " ".join(podman.storage),
                             "-f", "docker-compose.yaml", *args],
            cwd=work, capture_output=True, text=True, timeout=120, check=False,
            env=podman.env)

    tp = Container(podman, f"{project}_tokenproxy_1")
    try:
        up = await compose("up", "--detach")
        assert 0 == up.returncode, up.stdout + up.stderr
        await listening(tp)
        call = await podman.arun("exec", f"{project}_app_1", "python", "-c", APP,
                                 "http://127.0.0.1:8080/echo/users/me", "10")
        answer = json.loads(call.stdout)
        assert 200 == answer["status"], answer
        [token] = fake_upstream.last.header("Authorization")
        assert token.removeprefix("Bearer ") in idp.issuer._access, "not the issuer's token"
        assert "container:" in tp.inspect("{{.HostConfig.NetworkMode}}")
        assert "true" == tp.inspect("{{.HostConfig.ReadonlyRootfs}}")
    finally:
        logs = tp.logs()
        down = await compose("down", "--volumes", "--timeout", "5")
        assert 0 == down.returncode, down.stdout + down.stderr
        assert_no_secret(logs, extra=(*idp.issuer._access, *idp.issuer._refresh))


def compose_binary() -> str:
    """podman-compose from the test extra (Debian bookworm's 1.0.3 has no ``config``)."""
    compose = shutil.which("podman-compose", path=str(Path(sys.executable).parent))
    assert compose is not None, "podman-compose is installed with the test extra"
    return compose

