"""Podman for the container tests: the real Dockerfile built from this checkout and run as
root without a Docker engine, a registry or systemd.

- ``Podman`` runs the ``podman`` command with a containers.conf of the tests' own (pointed to
  by CONTAINERS_CONF, never the system's: cgroupfs, runc, no default ulimits, slirp4netns with
  access to the host's loopback as the default network) and a storage of its own under the
  cache directory, so the machine's images and containers are never touched.
- ``base_image`` makes a Debian base with Python from Debian's packages (mmdebstrap, then
  ``podman import``; a venv first on PATH so that ``python`` and ``pip`` behave as in the
  official slim images), once per Debian release: it stays in the cache. The packages are
  unpacked, not installed (``--variant=extract``: no apt, no maintainer scripts), which takes
  half the time and CPU of a minbase install; the few things their scripts would have made
  and the image needs (``/etc/passwd``, ``/etc/group``, the CA bundle, the standard library
  byte-compiled) are made by ``SETUP``.
- ``tokenproxy_image`` builds the Dockerfile on that base (``PYTHON_IMAGE``), its ``wheels``
  stage replaced by wheels built on the host (pip inside a build cannot verify the package
  index's TLS on these machines), once per content of the checkout.
- ``Container`` is one running container: its logs, exit code, diff, healthcheck, stop.

Containers reach the test's servers on the host's 127.0.0.1 as ``HOST`` (slirp4netns's
``allow_host_loopback``: the container has a loopback of its own, as in a pod, and nothing
listens anywhere but on 127.0.0.1). Every command has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
PODMAN = "podman"
RELEASE = "bookworm"                       # the Debian release of the base image
BASE_PYTHON = "3.11"                       # its Python
BASE_NAME = "localhost/tokenproxy-test-base"
IMAGE = "localhost/tokenproxy-test"
HOST = "10.0.2.2"      # the host's 127.0.0.1 as a container sees it (slirp4netns)
MISSING = ("podman is not installed: the container tests build and run the image with "
           "Debian's podman (.ci/run installs it when missing: apt-get install podman runc "
           "slirp4netns mmdebstrap)")
CONTAINERS_CONF = """\
# The container tests' own settings (CONTAINERS_CONF), as root without systemd.
[containers]
default_ulimits = []
netns = "slirp4netns"
[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
network_cmd_options = ["allow_host_loopback=true"]
"""
# The base's packages: a shell and coreutils for the Dockerfile's RUN, Python with venv.
PACKAGES = ("dash", "coreutils", "base-files", "base-passwd", "python3", "python3-venv",
            "ca-certificates")
# Run on the unpacked tree ($1): the venv of the image, and what the packages' maintainer
# scripts would have made that the image needs.
SETUP = ('chroot "$1" python3 -m venv /opt/venv',
         # Debian's postinst byte-compiles the standard library (the root is read-only later)
         'chroot "$1" python3 -c "import compileall, sysconfig;'
         ' compileall.compile_dir(sysconfig.get_path(\'stdlib\'), quiet=1)"',
         'cp "$1/usr/share/base-passwd/passwd.master" "$1/etc/passwd"',
         'cp "$1/usr/share/base-passwd/group.master" "$1/etc/group"',
         'mkdir -p "$1/etc/ssl/certs"',
         'cat "$1"/usr/share/ca-certificates/mozilla/*.crt'
         ' > "$1/etc/ssl/certs/ca-certificates.crt"')
# A mirror that does not answer fails the download in about a minute, not five.
APT_OPTIONS = ('Acquire::http::Timeout "20"', 'Acquire::https::Timeout "20"',
               'Acquire::Retries "1"')
# The venv first on PATH, as Python is in the official slim images.
PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# One base per release and recipe: a change to the recipe makes a new one.
BASE = f"{BASE_NAME}:{RELEASE}-" + hashlib.sha256(
    repr((PACKAGES, SETUP, PATH)).encode()).hexdigest()[:12]
# What the Dockerfile's wheels stage copies (tests/test_deploy.py holds the two together).
WHEEL_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "tokenproxy")
# What the image is built from; a change to any of it builds a new image.
INPUTS = ("Dockerfile", *WHEEL_INPUTS)
# Every container and volume the tests make carries LABEL=<run>: a later run removes what an
# interrupted one left (sweep), and never what a run still going has made.
LABEL = "tokenproxy-test-run"
LEFTOVER_AGE = 900.0    # seconds: older than any test's containers
LOCK_TIMEOUT = 240.0    # another test process building the same image (within the test's 300)
COMMAND_TIMEOUT = 60.0


def cache_dir() -> Path:
    """Where the base image and the built images are kept between runs:
    $TOKENPROXY_TEST_CACHE, else $XDG_CACHE_HOME/tokenproxy-tests, else ~/.cache/..."""
    if os.environ.get("TOKENPROXY_TEST_CACHE"):
        return Path(os.environ["TOKENPROXY_TEST_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "tokenproxy-tests"


def podman_binary() -> str:
    """The podman on PATH; skips the test (the one reason to) when there is none."""
    binary = shutil.which(PODMAN)
    if binary is None:
        pytest.skip(MISSING)
    return binary


def required(tool: str, package: str) -> str:
    """A tool the tests need besides podman; fails (never skips) when it is missing."""
    binary = shutil.which(tool)
    if binary is None:
        pytest.fail(f"{tool} is not installed: apt-get install {package} (.ci/run does)",
                    pytrace=False)
    return binary


class Podman:
    """The podman command with the tests' containers.conf and storage."""

    def __init__(self, home: Path) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        conf = home / "containers.conf"
        if not conf.is_file() or conf.read_text() != CONTAINERS_CONF:
            # Replaced whole: another test process's podman may be reading it.
            tmp = home / f"containers.conf.{os.getpid()}"
            tmp.write_text(CONTAINERS_CONF)
            tmp.replace(conf)
        self.env = dict(os.environ, CONTAINERS_CONF=str(conf))
        self.binary = podman_binary()

    @property
    def storage(self) -> list[str]:
        """The global options that keep podman on the tests' storage."""
        return ["--root", str(self.home / "storage"), "--runroot", str(self.home / "run"),
                "--storage-driver", "overlay"]

    def argv(self, *args: str) -> list[str]:
        return [self.binary, *self.storage, *args]

    def run(self, *args: str, timeout: float = COMMAND_TIMEOUT, check: bool = True,
            stdin: Any = subprocess.DEVNULL) -> subprocess.CompletedProcess[str]:
        """``podman ARGS``: its output; fails the test on a non-zero exit (with *check*) or
        when it takes longer than *timeout* seconds."""
        try:
            result = subprocess.run(self.argv(*args), env=self.env, stdin=stdin,
                                    capture_output=True, text=True, timeout=timeout,
                                    check=False)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"podman {' '.join(args)} took over {timeout} s") from None
        if check and result.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {result.returncode}:\n"
                                 f"{result.stdout}\n{result.stderr}")
        return result

    async def arun(self, *args: str, timeout: float = COMMAND_TIMEOUT,
                   check: bool = True) -> subprocess.CompletedProcess[str]:
        """run() off the event loop, so that the test's servers keep answering meanwhile."""
        return await asyncio.to_thread(self.run, *args, timeout=timeout, check=check)

    @property
    def run_label(self) -> str:
        """``LABEL=<this test run>`` (the xdist workers of one run share it)."""
        return f"{LABEL}={os.environ.get('PYTEST_XDIST_TESTRUNUID') or os.getpid()}"

    def sweep(self) -> None:
        """Removes the containers and volumes that other, interrupted runs left behind (made
        more than LEFTOVER_AGE seconds ago by another run)."""
        now = time.time()
        mine = self.run_label.partition("=")[2]
        ps = self.run("ps", "--all", "--filter", f"label={LABEL}", "--format", "json")
        for c in json.loads(ps.stdout or "[]"):
            old = now - c.get("Created", now) > LEFTOVER_AGE
            if old and c.get("Labels", {}).get(LABEL) != mine:
                self.run("rm", "--force", "--depend", "--time", "0", c["Id"], check=False)
        vols = self.run("volume", "ls", "--filter", f"label={LABEL}", "--format", "json")
        for v in json.loads(vols.stdout or "[]"):
            if v.get("Labels", {}).get(LABEL) != mine:
                self.run("volume", "rm", v["Name"], check=False)   # refused while in use

    def exists(self, image: str) -> bool:
        return self.run("image", "exists", image, check=False).returncode == 0

    def size(self, image: str) -> int:
        """The image's size in bytes, as ``podman images`` shows it."""
        return int(self.run("image", "inspect", "--format", "{{.Size}}", image).stdout)


@contextlib.contextmanager
def locked(path: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    """An exclusive lock on *path* across processes (the two xdist workers), waited for at
    most *timeout* seconds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # flock has no timeout of its own: polled, so that a stuck holder fails the
                # test with the lock's name rather than hanging it.
                if time.monotonic() > deadline:
                    raise AssertionError(f"{path} stayed locked for {timeout} s") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def debian_mirror(release: str = RELEASE) -> str | None:
    """The Debian mirror this machine's apt uses for *release* (deb822 .sources or one-line
    sources.list), or None for mmdebstrap's default."""
    texts = [p.read_text() for p in [Path("/etc/apt/sources.list"),
                                     *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
             if p.is_file() and p.suffix in (".list", ".sources")]
    for text in texts:
        for stanza in re.split(r"\n\s*\n", text):
            fields = dict(re.findall(r"^(\w[\w-]*):\s*(.*)$", stanza, re.M))
            if release in fields.get("Suites", "").split() and "URIs" in fields:
                return str(fields["URIs"].split()[0])
        for m in re.finditer(r"^deb\s+(?:\[[^]]*\]\s+)?(\S+)\s+(\S+)", text, re.M):
            if m[2] == release:
                return m[1]
    return None


@dataclass
class Timings:
    """Seconds each step took in this process (0 when the cache had the result)."""

    bootstrap: float = 0.0
    base: float = 0.0
    wheels: float = 0.0
    build: float = 0.0


def base_image(podman: Podman, timings: Timings) -> str:
    """The Debian base with Python (BASE), made once per release and recipe and kept in the
    cache (older bases are removed)."""
    with locked(podman.home / "base.lock"):
        if podman.exists(BASE):
            return BASE
        # Another test process of this run failed to make it just now: the same answer, at
        # once, rather than every process waiting out a dead mirror in turn.
        failed = podman.home / "base.failed"
        if failed.is_file() and time.time() - failed.stat().st_mtime < LEFTOVER_AGE:
            raise AssertionError(f"(another test process, just now) {failed.read_text()}")
        mmdebstrap = required("mmdebstrap", "mmdebstrap")
        with tempfile.TemporaryDirectory(dir=podman.home) as tmp:
            tar = Path(tmp) / "rootfs.tar"
            mirror = debian_mirror()
            started = time.monotonic()
            try:
                checked([mmdebstrap, "--quiet", "--variant=extract",
                         f"--include={','.join(PACKAGES)}",
                         *(f"--aptopt={option}" for option in APT_OPTIONS),
                         *(f"--extract-hook={command}" for command in SETUP),
                         RELEASE, str(tar), *([mirror] if mirror else [])], "mmdebstrap", 180)
            except AssertionError as exc:
                failed.write_text(str(exc))
                raise
            failed.unlink(missing_ok=True)
            timings.bootstrap = time.monotonic() - started
            started = time.monotonic()
            podman.run("import", "--change", f"ENV PATH={PATH}", str(tar), BASE,
                       timeout=120)
            timings.base = time.monotonic() - started
        remove_others(podman, BASE_NAME, BASE)
    return BASE


def inputs_digest(root: Path = ROOT, base: str = "") -> str:
    """A digest of everything the image is built from: the checkout's files and the base."""
    digest = hashlib.sha256(base.encode() + b"\0")
    for name in INPUTS:
        path = root / name
        files = sorted(p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                       ) if path.is_dir() else [path]
        for f in files:
            digest.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def tokenproxy_image(podman: Podman, timings: Timings) -> str:
    """The Dockerfile built from this checkout on the base, once per content of the checkout
    (older builds are removed)."""
    base = base_image(podman, timings)
    # Tagged per checkout too: another checkout sharing the cache keeps its own image.
    image = f"{IMAGE}:{checkout_tag()}-{inputs_digest(base=base)}"
    with locked(podman.home / "image.lock"):
        if podman.exists(image):
            return image
        with tempfile.TemporaryDirectory(dir=podman.home) as ctx:
            started = time.monotonic()
            wheels(Path(ctx) / "wheels")
            timings.wheels = time.monotonic() - started
            started = time.monotonic()
            podman.run("build", "--isolation=chroot", "--format", "docker",
                       "--build-arg", f"PYTHON_IMAGE={base}", "--build-context",
                       f"wheels={ctx}", "-t", image, str(ROOT), timeout=180)
            timings.build = time.monotonic() - started
        remove_others(podman, IMAGE, image, prefix=f"{IMAGE}:{checkout_tag()}-")
    return image


def checkout_tag() -> str:
    return hashlib.sha256(str(ROOT).encode()).hexdigest()[:8]


def wheels(into: Path) -> None:
    """tokenproxy's wheel and its dependencies', built by the host's pip for the base's Python
    (BASE_PYTHON): the host's must be the same version, or the compiled ones would not install
    (cross-platform downloads need every dependency as a wheel on the index, which the package
    mirrors of these machines do not all have)."""
    host = f"{sys.version_info.major}.{sys.version_info.minor}"
    if host != BASE_PYTHON:
        pytest.fail(f"the container tests build wheels for the image's Python {BASE_PYTHON} on "
                    f"the host, whose Python is {host}: run them with Python {BASE_PYTHON}",
                    pytrace=False)
    # Built from a copy of what the Dockerfile's stage copies: a build/ left in the checkout
    # would put files in the wheel that the checkout no longer has.
    with tempfile.TemporaryDirectory() as src:
        for name in WHEEL_INPUTS:
            if (ROOT / name).is_dir():
                shutil.copytree(ROOT / name, Path(src) / name,
                                ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy2(ROOT / name, Path(src) / name)
        # Debian's 3.11.2: redis wants async-timeout below 3.11.3, which the host's newer 3.11
        # leaves out.
        checked([sys.executable, "-m", "pip", "--disable-pip-version-check", "wheel", "--quiet",
                 "--wheel-dir", str(into), src, "async-timeout>=4.0.3"], "pip wheel", 300)


def checked(argv: list[str], what: str, timeout: float) -> None:
    """Runs *argv*; fails the test with the end of its output when it fails or takes longer
    than *timeout* seconds."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"{what} took over {timeout} s") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-15:])
        raise AssertionError(f"{what} exited {done.returncode}:\n{tail}")


def remove_others(podman: Podman, name: str, keep: str, prefix: str = "") -> None:
    """Removes the images named *name* (and tagged *prefix*...) but for *keep*: older builds
    in the cache."""
    for line in podman.run("images", "--format", "{{.Repository}}:{{.Tag}}",
                           name).stdout.split():
        if line != keep and line.startswith(prefix):
            podman.run("rmi", line, check=False)


# -- containers --------------------------------------------------------------------------


@dataclass
class Container:
    """One container, by name."""

    podman: Podman
    name: str

    def inspect(self, template: str) -> str:
        return self.podman.run("inspect", "--format", template, self.name).stdout.strip()

    @property
    def running(self) -> bool:
        return self.inspect("{{.State.Running}}") == "true"

    @property
    def exit_code(self) -> int:
        return int(self.inspect("{{.State.ExitCode}}"))

    @property
    def pid(self) -> int:
        return int(self.inspect("{{.State.Pid}}"))

    def logs(self) -> str:
        result = self.podman.run("logs", self.name, check=False)
        return result.stdout + result.stderr

    def events(self, name: str) -> list[dict[str, Any]]:
        """The daemon's JSON log lines named *name*."""
        out = []
        for line in self.logs().splitlines():
            with contextlib.suppress(ValueError):
                ev = json.loads(line)
                if isinstance(ev, dict) and ev.get("event") == name:
                    out.append(ev)
        return out

    async def healthcheck(self) -> subprocess.CompletedProcess[str]:
        """``podman healthcheck run``: the image's HEALTHCHECK run once (exit 0: healthy)."""
        return await self.podman.arun("healthcheck", "run", self.name, check=False, timeout=20)

    async def diff(self) -> list[str]:
        """``podman diff``: the paths changed in the container's filesystem."""
        result = await self.podman.arun("diff", "--format", "json", self.name)
        doc = json.loads(result.stdout or "{}")
        return sorted({p for kind in ("changed", "added", "deleted") for p in doc.get(kind) or []})

    async def stop(self, timeout: int) -> float:
        """``podman stop -t TIMEOUT`` (SIGTERM, SIGKILL after *timeout* s): seconds taken."""
        started = time.monotonic()
        await self.podman.arun("stop", "-t", str(timeout), self.name, timeout=timeout + 30)
        return time.monotonic() - started

    def remove(self) -> None:
        """Removes the container and any sharing its network namespace (--depend)."""
        self.podman.run("rm", "--force", "--depend", "--time", "0", self.name, check=False)


def volume_path(podman: Podman, volume: str) -> Path:
    """Where a named volume's files are on the host."""
    return Path(podman.run("volume", "inspect", "--format", "{{.Mountpoint}}",
                           volume).stdout.strip())
