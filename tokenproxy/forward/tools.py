"""What ``tokenproxy ca`` and ``tokenproxy exec`` do (docs/forward-proxy.md): the CA a client
must trust, the one-file bundle of the system roots and that CA, and a command run with its
proxy and CA variables pointing at a forward listener.

The command's environment holds the proxy URL and the bundle's path, never a token: tokens are
attached on the far side of the proxy. Variables it would inherit that hold a secret of the
config (a ``${NAME}`` the config reads) are not passed on. With ``client_key`` set, the key is
the password of the proxy URL, as proxy clients send it; it is never printed.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib
import os
import shutil
import signal
import socket
import ssl
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Final, TextIO
from urllib.parse import quote

from cryptography import x509

from tokenproxy.clock import SystemClock
from tokenproxy.config import Config, Listener
from tokenproxy.config.model import ForwardProxyConfig
from tokenproxy.config.secrets import config_secrets
from tokenproxy.daemon import Daemon
from tokenproxy.errors import ConfigError, TokenProxyError
from tokenproxy.forward.ca import LocalCA
from tokenproxy.forward.service import open_ca
from tokenproxy.log import Redactor

LOOPBACK_NAMES: Final = ("localhost", "127.0.0.1", "::1")
PROXY_VARIABLES: Final = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")
NO_PROXY_VARIABLES: Final = ("NO_PROXY", "no_proxy")
# OpenSSL (curl's default, Python's ssl, Ruby, git), requests, curl, and Node (added to its
# own roots).
CA_VARIABLES: Final = ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
                       "NODE_EXTRA_CA_CERTS")
# Where distributions keep their bundle when Python's ssl does not say: Debian and Ubuntu,
# Fedora and RHEL, openSUSE, Alpine (and macOS).
SYSTEM_BUNDLES: Final = ("/etc/ssl/certs/ca-certificates.crt",
                         "/etc/pki/tls/certs/ca-bundle.crt",
                         "/etc/pki/ca-trust/extracted/pem/tls-ca-bundle.pem",
                         "/etc/ssl/ca-bundle.pem",
                         "/etc/ssl/cert.pem")
PROXY_USER: Final = "tokenproxy"
BUNDLE_NAME: Final = "ca-bundle.pem"
# Secrets shorter than this are not looked for in inherited variables (as in the log
# redactor): a two-character one would take half the environment away.
MIN_SECRET: Final = 4
PROBE_TIMEOUT: Final = 2.0
# A shell's codes for a command it could not run.
NOT_EXECUTABLE: Final = 126
NOT_FOUND: Final = 127


class ToolError(TokenProxyError):
    """``ca`` or ``exec`` cannot do what was asked (exit 1); the message says why."""


# -- configuration ---------------------------------------------------------------------------


def forward_settings(cfg: Config, command: str) -> ForwardProxyConfig:
    """The config's forward_proxy section; ConfigError (exit 2) naming the key without it."""
    if cfg.forward_proxy is None:
        where = f" ({cfg.source})" if cfg.source else ""
        raise ConfigError(f"forward_proxy: the config{where} has no forward_proxy section; "
                          f"`tokenproxy {command}` needs one (docs/forward-proxy.md)")
    return cfg.forward_proxy


async def load_ca(cfg: Config) -> LocalCA:
    """The CA as the daemon loads it: made in the state directory when it is not there yet
    (or must be made again), an operator's own loaded as it is."""
    # The system's clock, as the daemon's: clients check the certificates by theirs.
    return await open_ca(forward_settings(cfg, "ca"), SystemClock())


def read_ca_cert(path: Path) -> bytes:
    """The CA certificate a running daemon uses, read and never written: making it again
    here (names changed since the daemon started) would leave clients trusting a CA the
    daemon does not sign with."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ToolError(f"{path}: no CA certificate yet; the daemon makes it at its start "
                        "(tokenproxy run), or use exec --standalone") from None
    except OSError as exc:
        raise ToolError(f"{path}: cannot be read: {exc.strerror}") from None
    try:
        x509.load_pem_x509_certificate(data)
    except ValueError:
        raise ToolError(f"{path}: not a PEM certificate") from None
    return data


def standalone_config(cfg: Config) -> Config:
    """*cfg* with every listener moved to a free loopback port: a private daemon beside a
    running one collides with nothing."""
    forward = forward_settings(cfg, "exec")
    free = Listener(kind="tcp", host="127.0.0.1", port=0)
    return dataclasses.replace(
        cfg, listen=(free,), admin_listen=None if cfg.admin_listen is None else free,
        forward_proxy=dataclasses.replace(forward, listen=free))


# -- the bundle ------------------------------------------------------------------------------


def _certifi_bundle() -> str | None:
    try:
        certifi = importlib.import_module("certifi")
    except ImportError:
        return None
    where = certifi.where()
    return where if isinstance(where, str) else None


def system_bundle(environ: Mapping[str, str]) -> Path | None:
    """The file of system roots a tool would trust without us: SSL_CERT_FILE when the
    environment already names one (the user's choice, corporate roots and all), then
    certifi's when it is installed, then the OS file (Python's ssl, then the usual paths)."""
    paths = ssl.get_default_verify_paths()
    for candidate in (environ.get("SSL_CERT_FILE"), _certifi_bundle(), paths.cafile,
                      paths.openssl_cafile, *SYSTEM_BUNDLES):
        if candidate and os.path.isfile(candidate):
            return Path(candidate)
    return None


def compose_bundle(system: bytes | None, ca_pem: bytes, ca_path: Path) -> bytes:
    """The system roots, then the CA after a comment line naming its file (PEM readers skip
    text between certificates)."""
    head = b"" if system is None else system.rstrip(b"\n") + b"\n\n"
    note = f"# tokenproxy forward proxy CA: {ca_path}\n".encode("utf-8", "replace")
    return head + note + ca_pem.rstrip(b"\n") + b"\n"


def ca_output(ca: LocalCA, *, bundle: bool,
              environ: Mapping[str, str]) -> tuple[bytes, list[str]]:
    """What ``tokenproxy ca`` prints on stdout, and the notes for stderr (the paths)."""
    notes = [f"CA certificate: {ca.path}"]
    if ca.created is not None:
        notes.append(f"made a new CA: {ca.created}")
    if not bundle:
        return ca.cert_pem, notes
    system = system_bundle(environ)
    if system is None:
        raise ToolError("no system CA bundle found (SSL_CERT_FILE, certifi, "
                        + ", ".join(SYSTEM_BUNDLES) + "): install ca-certificates or certifi")
    notes.append(f"system roots: {system}")
    return compose_bundle(_read_bundle(system), ca.cert_pem, ca.path), notes


def _read_bundle(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ToolError(f"{path}: cannot be read: {exc.strerror}") from None


def bundle_for(ca_pem: bytes, ca_path: Path,
               environ: Mapping[str, str]) -> tuple[bytes, str | None]:
    """The bundle a command is given, and a warning when there are no system roots to put in
    it (intercepted hosts still verify; tunnelled and direct ones will not)."""
    system = system_bundle(environ)
    if system is None:
        return compose_bundle(None, ca_pem, ca_path), (
            "no system CA bundle found: the command trusts only tokenproxy's CA, so tunnelled "
            "and direct HTTPS will fail verification")
    return compose_bundle(_read_bundle(system), ca_pem, ca_path), None


@contextlib.contextmanager
def private_bundle(data: bytes) -> Iterator[Path]:
    """*data* in a file (0600) of a fresh directory (0700), both removed when the block
    ends."""
    folder = tempfile.mkdtemp(prefix="tokenproxy-exec-")
    try:
        path = Path(folder) / BUNDLE_NAME
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        yield path
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# -- the environment -------------------------------------------------------------------------


def proxy_address(listener: Listener, port: int | None = None) -> tuple[str, int]:
    """Where a client on this machine reaches *listener* (a wildcard bind through
    loopback); ConfigError for a unix socket, which HTTPS_PROXY cannot name."""
    if listener.kind != "tcp":
        raise ConfigError(f"forward_proxy.listen: exec needs a TCP listener (host:port), not "
                          f"{listener}: HTTPS_PROXY cannot name a unix socket "
                          "(or use exec --standalone)")
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(listener.host, listener.host)
    return host, listener.port if port is None else port


def proxy_url(host: str, port: int, client_key: str | None) -> str:
    """``http://host:port``, with the client key as the password when there is one (the
    forward listener reads ``Proxy-Authorization: Basic``, any user name)."""
    netloc = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    if client_key is not None:
        netloc = f"{PROXY_USER}:{quote(client_key, safe='')}@{netloc}"
    return f"http://{netloc}"


def child_environment(base: Mapping[str, str], proxy: str, bundle: Path,
                      secrets: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """*base* with the proxy and CA variables set, NO_PROXY the loopback names, and every
    variable holding one of *secrets* left out; also the names left out."""
    needles = [s for s in secrets if len(s) >= MIN_SECRET]
    env: dict[str, str] = {}
    dropped: list[str] = []
    for name, value in base.items():
        if any(s in value for s in needles):
            dropped.append(name)
        else:
            env[name] = value
    env.update(dict.fromkeys(PROXY_VARIABLES, proxy))
    env.update(dict.fromkeys(NO_PROXY_VARIABLES, ",".join(LOOPBACK_NAMES)))
    env.update(dict.fromkeys(CA_VARIABLES, str(bundle)))
    return env, sorted(dropped)


def exit_status(returncode: int) -> int:
    """A shell's status for a child: its code, or 128+N when signal N ended it."""
    return 128 - returncode if returncode < 0 else returncode


# -- running the command ---------------------------------------------------------------------


# SIGINT is not passed on: a terminal sends it to the command too (same process group), and
# a second one makes many tools quit without cleaning up. SIGINT is still caught, so that
# tokenproxy waits for the command (and then stops its daemon) instead of dying first.
FORWARDED: Final = (signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
                    signal.SIGUSR2)


async def run_command(command: Sequence[str], env: Mapping[str, str], err: TextIO) -> int:
    """Run *command* with stdin, stdout and stderr inherited; its exit status."""
    loop = asyncio.get_running_loop()
    proc: asyncio.subprocess.Process | None = None
    early: list[signal.Signals] = []   # came while the command was being started

    def forward(sig: signal.Signals) -> None:
        if proc is None:
            early.append(sig)
        elif proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(sig)

    # Installed before the command starts: a signal in between must not end tokenproxy
    # and leave the command running without its proxy.
    installed: list[signal.Signals] = []
    try:
        loop.add_signal_handler(signal.SIGINT, lambda: None)
        installed.append(signal.SIGINT)
        for sig in FORWARDED:
            loop.add_signal_handler(sig, forward, sig)
            installed.append(sig)
        try:
            proc = await asyncio.create_subprocess_exec(*command, env=dict(env))
        except FileNotFoundError:
            err.write(f"tokenproxy: {command[0]}: command not found\n")
            return NOT_FOUND
        except PermissionError:
            err.write(f"tokenproxy: {command[0]}: permission denied\n")
            return NOT_EXECUTABLE
        except OSError as exc:
            err.write(f"tokenproxy: {command[0]}: {exc.strerror}\n")
            return NOT_EXECUTABLE
        for sig in early:
            forward(sig)
        return exit_status(await proc.wait())
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        if proc is not None and proc.returncode is None:   # cancelled: it must not outlive us
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


def probe(host: str, port: int) -> None:
    """ToolError unless something accepts connections at host:port."""
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT):
            pass
    except OSError as exc:
        where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        raise ToolError(f"no forward proxy is listening at {where} ({exc.strerror or exc}): "
                        "start the daemon (tokenproxy run), or use exec --standalone") from None


async def exec_with_daemon(cfg: Config, command: Sequence[str], *,
                           environ: Mapping[str, str], err: TextIO) -> int:
    """Run *command* against the forward listener of the daemon running with *cfg*."""
    forward = forward_settings(cfg, "exec")
    host, port = proxy_address(forward.listen)
    await asyncio.to_thread(probe, host, port)
    assert forward.ca.cert_file is not None
    ca_pem = await asyncio.to_thread(read_ca_cert, forward.ca.cert_file)
    return await _run_with(cfg, command, host, port, ca_pem, forward.ca.cert_file,
                           environ=environ, err=err)


async def exec_standalone(cfg: Config, command: Sequence[str], *, environ: Mapping[str, str],
                          err: TextIO, redactor: Redactor) -> int:
    """Run *command* against a private daemon started for its lifetime on free ports."""
    private = standalone_config(cfg)
    daemon = Daemon(private, redactor=redactor)
    await daemon.start()
    try:
        forward = private.forward_proxy
        assert forward is not None
        assert forward.ca.cert_file is not None
        host, port = proxy_address(forward.listen, daemon.forward_listeners[0].port)
        # The file the daemon has just loaded or made.
        ca_pem = await asyncio.to_thread(read_ca_cert, forward.ca.cert_file)
        return await _run_with(cfg, command, host, port, ca_pem, forward.ca.cert_file,
                               environ=environ, err=err)
    finally:
        await daemon.stop()


async def _run_with(cfg: Config, command: Sequence[str], host: str, port: int, ca_pem: bytes,
                    ca_path: Path, *, environ: Mapping[str, str], err: TextIO) -> int:
    data, warning = await asyncio.to_thread(bundle_for, ca_pem, ca_path, environ)
    if warning is not None:
        err.write(f"tokenproxy: warning: {warning}\n")
    key = cfg.security.client_key
    url = proxy_url(host, port, None if key is None else key.value)
    with private_bundle(data) as bundle:
        env, dropped = child_environment(environ, url, bundle, config_secrets(cfg))
        if dropped:
            err.write("tokenproxy: not passed to the command, they hold a secret of the "
                      f"config: {', '.join(dropped)}\n")
        return await run_command(command, env, err)
