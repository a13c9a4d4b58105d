"""``tokenproxy ca`` and ``tokenproxy exec`` (docs/forward-proxy.md): the CA and the bundle a
client trusts, and a command run with HTTPS_PROXY and the CA variables pointing at a forward
listener, its exit status its own, and no token in its environment.

The exec tests run the real command line (``python -m tokenproxy exec ...``) and real curl,
which takes the proxy and the CA bundle from the environment only (no -x, no --cacert). The
upstream is a TLS server of the test's own CA on 127.0.0.2, a loopback address that is not
in the NO_PROXY exec sets (localhost, 127.0.0.1, ::1): curl therefore sends the request through
the proxy as it would for a remote API, and tokenproxy connects to 127.0.0.2 itself (an IP
literal needs no resolver, so no hosts entry and no resolver hook). Where 127.0.0.2 cannot be
bound (not Linux), those tests are skipped."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pytest_aiohttp import AiohttpServer

from tests.helpers.config import MakeProxy, write_config
from tests.helpers.daemon_proc import (
    child_env,
    run_command_async,
    run_to_exit,
    run_to_exit_async,
)
from tests.helpers.fakes import CLIENT_KEY, TOKEN, FakeUpstream, assert_no_secret
from tests.helpers.forward import Upstream, forward_config, start_upstream
from tests.helpers.metrics import count
from tests.helpers.net import busy_port, closed_port, free_port
from tests.helpers.tls import ServerCert, upstream_tls
from tokenproxy.cli import exec_command, main
from tokenproxy.config import Listener
from tokenproxy.forward import tools

ALIAS = "127.0.0.2"
TOKEN_VAR = "TP_FORWARD_TOOLS_TOKEN"
ENV_PROBE = "import json, os; print(json.dumps(dict(os.environ)))"


def _alias_bindable() -> bool:
    try:
        with socket.socket() as s:
            s.bind((ALIAS, 0))
    except OSError:
        return False
    return True


needs_alias = pytest.mark.skipif(not _alias_bindable(), reason=f"{ALIAS} cannot be bound")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
API_HOST = "api.example.com"


def _private_hosts_argv() -> list[str] | None:
    """How to run a command with an /etc/hosts of its own: a private mount namespace (as
    root, or as any user in a user namespace of its own where the kernel allows one)."""
    if shutil.which("unshare") is None or shutil.which("mount") is None:
        return None
    for argv in (["unshare", "--mount"], ["unshare", "--user", "--map-root-user", "--mount"]):
        probe = subprocess.run([*argv, "mount", "--bind", "/etc/hosts", "/etc/hosts"],
                               capture_output=True, timeout=30, check=False)
        if probe.returncode == 0:
            return argv
    return None


PRIVATE_HOSTS = _private_hosts_argv()
needs_private_hosts = pytest.mark.skipif(
    PRIVATE_HOSTS is None, reason="no private mount namespace (unshare) for a hosts entry")


@pytest.fixture(name="alias_upstream")
async def _alias_upstream(aiohttp_server: AiohttpServer, tmp_path: Path) -> Upstream:
    """The FakeUpstream app over TLS on 127.0.0.2, its certificate (IP SAN) from a test CA."""
    tls = upstream_tls(tmp_path / "upstream-tls", names=("upstream.test",), ips=(ALIAS,))
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app(), host=ALIAS, ssl=tls.server_context())
    assert server.port is not None
    return Upstream(fake, tls, server.port, plain_port=0)   # no plain-HTTP side here


def raw_config(tmp_path: Path, *, forward_listen: str = "127.0.0.1:0",
               upstream: Upstream | None = None, **extra: Any) -> dict[str, Any]:
    port = 443 if upstream is None else upstream.port
    intercept: dict[str, Any] = {"host": ALIAS, "port": port, "provider": "api"}
    if upstream is not None:
        intercept["ca_file"] = str(upstream.tls.ca)
    return {
        "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
        "state_path": str(tmp_path / "state" / "state.json"),
        "providers": {"api": {"type": "static", "token": f"${{{TOKEN_VAR}}}"}},
        "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:9/", "provider": "api"}],
        "forward_proxy": {"listen": forward_listen, "intercept": [intercept]},
        **extra,
    }


def exec_env(tmp_path: Path) -> dict[str, str]:
    """The environment tokenproxy exec runs in: the test's, and the token in the variable the
    config reads it from (so exec must keep it from the command)."""
    env = child_env(tmp_path)
    env[TOKEN_VAR] = TOKEN
    return env


async def tokenproxy(*argv: str, env: dict[str, str], cwd: Path,
                     timeout: float = 30) -> tuple[int, str, str]:
    return await run_to_exit_async(list(argv), cwd, env, timeout)


def curl_command(up: Upstream, path: str = "/echo") -> list[str]:
    # No -x, no --cacert, no --noproxy: everything from the environment exec sets.
    return ["curl", "--silent", "--show-error", "--max-time", "10",
            f"https://{ALIAS}:{up.port}{path}"]


# -- tokenproxy ca ---------------------------------------------------------------------------


@pytest.mark.slow
def test_ca_prints_the_pem_and_names_its_path(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Made in the state directory at the first call, the same certificate at the next; the
    PEM on stdout alone (openssl reads it), the path on stderr."""
    monkeypatch.setenv(TOKEN_VAR, TOKEN)
    config = write_config(tmp_path, raw_config(tmp_path))
    assert 0 == main(["ca", "-c", str(config)])
    first = capsysbinary.readouterr()
    path = tmp_path / "state" / "forward-ca.pem"
    assert path.read_bytes() == first.out
    assert f"CA certificate: {path}".encode() in first.err
    assert b"made a new CA" in first.err
    subject = subprocess.run(["openssl", "x509", "-noout", "-subject"], input=first.out,
                             capture_output=True, check=True, timeout=30)
    assert b"tokenproxy" in subject.stdout
    assert 0 == main(["ca", "-c", str(config)])
    again = capsysbinary.readouterr()
    assert first.out == again.out
    assert b"made a new CA" not in again.err
    assert_no_secret(first.out, first.err, again.err)


def test_ca_bundle_is_the_system_roots_then_the_ca(
    tmp_path: Path, capsysbinary: pytest.CaptureFixture[bytes],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(TOKEN_VAR, TOKEN)
    config = write_config(tmp_path, raw_config(tmp_path))
    assert 0 == main(["ca", "-c", str(config), "--bundle"])
    out, err = capsysbinary.readouterr()
    system = tools.system_bundle(os.environ)
    assert system is not None, "no system bundle on this machine"
    ca_pem = (tmp_path / "state" / "forward-ca.pem").read_bytes()
    assert out.startswith(system.read_bytes().rstrip(b"\n"))
    assert out.endswith(ca_pem)
    assert f"system roots: {system}".encode() in err
    # One file a verifier loads whole: every system root and the CA.
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(out)
    roots = ssl.create_default_context(cafile=str(system)).cert_store_stats()["x509_ca"]
    both = ssl.create_default_context(cafile=str(bundle)).cert_store_stats()["x509_ca"]
    assert roots + 1 == both


def test_the_system_bundle_is_ssl_cert_file_then_certifi_then_the_os_file(
    tmp_path: Path,
) -> None:
    own = tmp_path / "own.pem"
    own.write_bytes(b"")
    assert own == tools.system_bundle({"SSL_CERT_FILE": str(own)})
    # A variable naming no file is passed over.
    found = tools.system_bundle({"SSL_CERT_FILE": str(tmp_path / "missing.pem")})
    try:
        import certifi
    except ImportError:
        assert found is not None
        assert found.is_file()
    else:
        assert Path(certifi.where()) == found


@pytest.mark.parametrize("argv", [["ca"], ["exec", "--", "true"],
                                  ["exec", "--standalone", "--", "true"]])
def test_without_a_forward_proxy_section_the_message_names_the_key(
    argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    raw = raw_config(tmp_path)
    del raw["forward_proxy"]
    raw["providers"]["api"]["token"] = "x" * 8
    config = write_config(tmp_path, raw)
    assert 2 == main([argv[0], "-c", str(config), *argv[1:]])
    err = capsys.readouterr().err
    assert err.startswith("tokenproxy: forward_proxy: ")
    assert "no forward_proxy section" in err
    assert 1 == err.count("\n")


# -- tokenproxy exec: its arguments ----------------------------------------------------------


@pytest.mark.parametrize("argv", [
    ["exec"], ["exec", "--"], ["exec", "--standalone"], ["exec", "--standalone", "--"],
    ["exec", "true"], ["exec", "true", "--", "x"],
])
def test_exec_needs_a_command_after_a_double_dash(
    argv: list[str], capsys: pytest.CaptureFixture[str],
) -> None:
    assert 2 == main(argv)
    err = capsys.readouterr().err
    assert "usage: tokenproxy exec" in err
    assert "name the command after --" in err


def test_what_follows_the_double_dash_is_the_command_whatever_it_looks_like() -> None:
    argv = ["-c", "f.yaml", "exec", "--standalone", "--", "curl", "-c", "--", "--standalone"]
    assert ["curl", "-c", "--", "--standalone"] == exec_command(argv[4:], argv)
    # Whether or not argparse keeps the "--" in what it leaves.
    assert ["curl", "-c", "--", "--standalone"] == exec_command(argv[5:], argv)


def test_exec_against_a_unix_listener_says_it_needs_tcp(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(TOKEN_VAR, TOKEN)
    config = write_config(tmp_path, raw_config(
        tmp_path, forward_listen=f"unix:{tmp_path / 'forward.sock'}"))
    assert 2 == main(["exec", "-c", str(config), "--", "true"])
    err = capsys.readouterr().err
    assert "forward_proxy.listen: exec needs a TCP listener" in err


def test_exec_without_a_running_daemon_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(TOKEN_VAR, TOKEN)
    port = closed_port()
    config = write_config(tmp_path, raw_config(tmp_path, forward_listen=f"127.0.0.1:{port}"))
    assert 1 == main(["exec", "-c", str(config), "--", "true"])
    err = capsys.readouterr().err
    assert f"no forward proxy is listening at 127.0.0.1:{port}" in err
    assert "--standalone" in err


# -- tokenproxy exec: the environment, unit by unit ------------------------------------------


def test_the_child_environment_has_the_proxy_and_ca_and_no_secret() -> None:
    base = {"PATH": "/bin", "HOME": "/home/u", "TP_TOKEN": TOKEN,
            "WRAPPED": f"Bearer {TOKEN}", "HTTPS_PROXY": "http://elsewhere:1",
            "NO_PROXY": "api.example.com", "SHORT": "abc"}
    env, dropped = tools.child_environment(base, "http://127.0.0.1:3128",
                                           Path("/tmp/b/ca-bundle.pem"), [TOKEN, "abc"])
    assert ["TP_TOKEN", "WRAPPED"] == dropped
    assert not any(TOKEN in v for v in env.values())
    assert "abc" == env["SHORT"]   # too short a secret to look for
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        assert "http://127.0.0.1:3128" == env[name]
    for name in ("NO_PROXY", "no_proxy"):
        assert "localhost,127.0.0.1,::1" == env[name]
    for name in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
                 "NODE_EXTRA_CA_CERTS"):
        assert "/tmp/b/ca-bundle.pem" == env[name]
    assert "/bin" == env["PATH"]


def test_the_proxy_url_carries_the_client_key_as_its_password() -> None:
    assert "http://127.0.0.1:3128" == tools.proxy_url("127.0.0.1", 3128, None)
    assert "http://[::1]:3128" == tools.proxy_url("::1", 3128, None)
    assert ("http://tokenproxy:k%40y%3A%2F%25@127.0.0.1:3128"
            == tools.proxy_url("127.0.0.1", 3128, "k@y:/%"))
    wildcard = Listener(kind="tcp", host="0.0.0.0", port=3128)
    assert ("127.0.0.1", 3128) == tools.proxy_address(wildcard)
    assert ("::1", 5) == tools.proxy_address(Listener(kind="tcp", host="::", port=0), 5)


def test_exit_status_of_a_signal_is_128_plus_its_number() -> None:
    assert 0 == tools.exit_status(0)
    assert 7 == tools.exit_status(7)
    assert 128 + signal.SIGTERM == tools.exit_status(-signal.SIGTERM)


def test_the_bundle_file_is_private_and_gone_afterwards() -> None:
    with tools.private_bundle(b"pem") as path:
        assert b"pem" == path.read_bytes()
        assert 0o600 == stat.S_IMODE(path.stat().st_mode)
        assert 0o700 == stat.S_IMODE(path.parent.stat().st_mode)
    assert not path.parent.exists()


def test_the_standalone_config_moves_every_listener_to_a_free_loopback_port(
    tmp_path: Path,
) -> None:
    from tokenproxy.config import build_config
    raw = raw_config(tmp_path, forward_listen="unix:/run/forward.sock",
                     security={"client_key": CLIENT_KEY})
    raw["listen"] = ["0.0.0.0:8080", "unix:/run/main.sock"]
    cfg = tools.standalone_config(build_config(raw, {TOKEN_VAR: TOKEN}))
    free = Listener(kind="tcp", host="127.0.0.1", port=0)
    assert (free,) == cfg.listen
    assert free == cfg.admin_listen
    assert cfg.forward_proxy is not None
    assert free == cfg.forward_proxy.listen


# -- tokenproxy exec: real commands ----------------------------------------------------------


@pytest.mark.slow
@needs_alias
@needs_curl
async def test_exec_standalone_curl_gets_the_token_attached(
    alias_upstream: Upstream, tmp_path: Path,
) -> None:
    """curl with nothing but the environment exec gives it, through a private daemon whose
    listeners all sit on a port another socket holds (so they must have been moved), with a
    client key the proxy URL carries."""
    with busy_port() as taken:
        raw = raw_config(tmp_path, upstream=alias_upstream,
                         forward_listen=f"127.0.0.1:{taken}",
                         security={"client_key": CLIENT_KEY})
        raw["listen"] = raw["admin_listen"] = f"127.0.0.1:{taken}"
        config = write_config(tmp_path, raw)
        code, out, err = await tokenproxy(
            "exec", "-c", str(config), "--standalone", "--", *curl_command(alias_upstream),
            env=exec_env(tmp_path), cwd=tmp_path)
    assert 0 == code, err
    assert [f"Bearer {TOKEN}"] == alias_upstream.fake.last.header("Authorization")
    answer = json.loads(out)
    assert "/echo" == answer["raw_path"]
    assert ["Authorization", f"Bearer {TOKEN}"] in answer["headers"]
    assert f"not passed to the command, they hold a secret of the config: {TOKEN_VAR}" in err
    assert_no_secret(err)   # neither the token nor the client key


@pytest.mark.slow
@needs_alias
@needs_curl
async def test_exec_uses_the_running_daemons_forward_listener(
    alias_upstream: Upstream, make_proxy: MakeProxy, tmp_path: Path,
) -> None:
    """Without --standalone: the daemon of the same config (here in this process) serves
    the command, with the CA it made; exec starts nothing of its own."""
    raw = raw_config(tmp_path, upstream=alias_upstream,
                     forward_listen=f"127.0.0.1:{free_port()}")
    config = write_config(tmp_path, raw)
    daemon = await make_proxy(raw, {TOKEN_VAR: TOKEN})
    code, out, err = await tokenproxy(
        "exec", "-c", str(config), "--", *curl_command(alias_upstream, "/echo?q=1"),
        env=exec_env(tmp_path), cwd=tmp_path)
    assert 0 == code, err
    assert "/echo?q=1" == json.loads(out)["raw_path"]
    assert [f"Bearer {TOKEN}"] == alias_upstream.fake.last.header("Authorization")
    assert 1 == count(daemon, "tokenproxy_forward_connects_total", outcome="intercepted")


@pytest.mark.slow
@needs_alias
async def test_the_commands_environment_holds_the_proxy_and_ca_but_no_token(
    tmp_path: Path,
) -> None:
    config = write_config(tmp_path, raw_config(tmp_path))
    env = exec_env(tmp_path)
    env["TP_WRAPPED"] = f"token={TOKEN}"
    code, out, err = await tokenproxy(
        "exec", "-c", str(config), "--standalone", "--", sys.executable, "-c", ENV_PROBE,
        env=env, cwd=tmp_path)
    assert 0 == code, err
    child = json.loads(out)
    assert not [k for k, v in child.items() if TOKEN in v or TOKEN in k]
    assert_no_secret(out, err)
    proxy = child["HTTPS_PROXY"]
    assert proxy.startswith("http://127.0.0.1:")
    assert all(proxy == child[k] for k in ("https_proxy", "HTTP_PROXY", "http_proxy"))
    assert "localhost,127.0.0.1,::1" == child["NO_PROXY"] == child["no_proxy"]
    bundle = child["SSL_CERT_FILE"]
    assert all(bundle == child[k] for k in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
                                            "NODE_EXTRA_CA_CERTS"))
    # Private while the command ran, removed with its directory after.
    assert not Path(bundle).parent.exists()
    assert "/bin" in child["PATH"]
    assert "TP_WRAPPED" not in child


@pytest.mark.slow
async def test_the_commands_exit_status_is_execs(tmp_path: Path) -> None:
    config = write_config(tmp_path, raw_config(tmp_path))
    env = exec_env(tmp_path)
    code, _, err = await tokenproxy(
        "exec", "-c", str(config), "--standalone", "--", sys.executable, "-c",
        "raise SystemExit(7)", env=env, cwd=tmp_path)
    assert 7 == code, err
    code, _, err = await tokenproxy(
        "exec", "-c", str(config), "--standalone", "--", sys.executable, "-c",
        "import os, signal; os.kill(os.getpid(), signal.SIGTERM)", env=env, cwd=tmp_path)
    assert 128 + signal.SIGTERM == code, err
    code, _, err = await tokenproxy(
        "exec", "-c", str(config), "--standalone", "--", str(tmp_path / "no-such-command"),
        env=env, cwd=tmp_path)
    assert 127 == code
    assert "no-such-command: command not found" in err


@pytest.mark.slow
async def test_a_sigterm_to_exec_reaches_the_command_and_its_status_comes_back(
    tmp_path: Path,
) -> None:
    """SIGTERM is passed on (SIGINT is not: a terminal sends it to the command itself); exec
    waits for the command, stops its daemon, and exits with the command's status."""
    config = write_config(tmp_path, raw_config(tmp_path))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenproxy", "exec", "-c", str(config), "--standalone", "--",
        sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(30)",
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=exec_env(tmp_path), cwd=tmp_path)
    try:
        assert proc.stdout is not None
        assert b"ready\n" == await asyncio.wait_for(proc.stdout.readline(), 20)
        proc.send_signal(signal.SIGTERM)
        assert 128 + signal.SIGTERM == await asyncio.wait_for(proc.wait(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.slow
def test_exec_help_shows_the_double_dash(tmp_path: Path) -> None:
    done = run_to_exit(["exec", "--help"], tmp_path)
    assert 0 == done.returncode
    assert "-- COMMAND [ARGS...]" in done.stdout


@pytest.mark.slow
def test_the_process_is_made_undumpable() -> None:
    """make_undumpable (called by run and exec) leaves the process non-dumpable: a tool of the
    same user cannot read its environment or memory through /proc or ptrace. (The suite runs
    as root, which may read them anyway; the kernel's flag is what is checked.)"""
    code = ("import ctypes; from tokenproxy.process import make_undumpable; "
            "assert make_undumpable(); print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=30, check=True).stdout
    assert "0" == out.strip()


@pytest.mark.slow
@needs_curl
async def test_exec_reaches_a_host_by_its_name(
    aiohttp_server: AiohttpServer, upstream_cert: ServerCert, tmp_path: Path,
) -> None:
    """The upstream named, not numbered: curl asks for https://localhost:PORT/ (``--noproxy
    ''`` keeps it on the proxy despite exec's NO_PROXY, which lists localhost), tokenproxy
    resolves the name, verifies the upstream's certificate for it and attaches the token."""
    up = await start_upstream(aiohttp_server, upstream_cert)
    config = write_config(tmp_path, forward_config(tmp_path, up))
    code, out, err = await tokenproxy(
        "exec", "-c", str(config), "--standalone", "--", "curl", "--silent", "--show-error",
        "--max-time", "10", "--noproxy", "", f"https://localhost:{up.port}/echo",
        env=exec_env(tmp_path), cwd=tmp_path)
    assert 0 == code, err
    assert [f"Bearer {TOKEN}"] == up.fake.last.header("Authorization")
    assert "/echo" == json.loads(out)["raw_path"]


@pytest.mark.slow
@needs_curl
@needs_private_hosts
async def test_exec_curl_https_api_example_com_through_a_hosts_entry(
    aiohttp_server: AiohttpServer, tmp_path: Path,
) -> None:
    """The issue's own command: ``tokenproxy exec -- curl https://api.example.com/...``, the
    name resolved to 127.0.0.1 by a hosts entry the test gives the whole process tree (a
    bind mount over /etc/hosts in a private mount namespace). curl takes everything from the
    environment; the daemon resolves the name itself, verifies the upstream's certificate
    for it and attaches the token; the command's environment never holds the token."""
    assert PRIVATE_HOSTS is not None
    tls = upstream_tls(tmp_path / "upstream-tls", names=(API_HOST,), ips=())
    fake = FakeUpstream()
    server = await aiohttp_server(fake.app(), host="127.0.0.1", ssl=tls.server_context())
    assert server.port is not None
    raw = raw_config(tmp_path)
    raw["forward_proxy"]["intercept"] = [{"host": API_HOST, "port": server.port,
                                          "provider": "api", "ca_file": str(tls.ca)}]
    config = write_config(tmp_path, raw)
    hosts = tmp_path / "hosts"
    hosts.write_text(f"127.0.0.1 localhost\n127.0.0.1 {API_HOST}\n")
    seen_env = tmp_path / "command-env"
    script = (f'mount --bind "$1" /etc/hosts && exec "$2" -m tokenproxy exec -c "$3" '
              f'--standalone -- sh -c \'env > "$0"; exec curl --silent --show-error '
              f'--max-time 10 "$1"\' "$4" "https://{API_HOST}:{server.port}/v1/items?q=1"')
    code, out, err = await run_command_async(
        [*PRIVATE_HOSTS, "sh", "-c", script, "sh", str(hosts), sys.executable, str(config),
         str(seen_env)], tmp_path, exec_env(tmp_path))
    assert 0 == code, err
    assert [f"Bearer {TOKEN}"] == fake.last.header("Authorization")
    assert [f"{API_HOST}:{server.port}"] == fake.last.header("Host")
    assert "/v1/items?q=1" == json.loads(out)["raw_path"]
    environment = seen_env.read_text()
    assert "HTTPS_PROXY=http://127.0.0.1:" in environment
    assert TOKEN not in environment
