"""The command line: --version, check-config (and its --online check against live issuers),
exit codes, no secrets."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from pytest_aiohttp import AiohttpServer

from tests.helpers.config import proxy_config, write_config
from tests.helpers.daemon_proc import child_env
from tests.helpers.fakes import (
    CLIENT_KEY,
    CLIENT_SECRET,
    PASSWORD,
    REFRESH_TOKEN,
    SECRETS,
    TOKEN,
    TOKEN_2,
    assert_no_secret,
)
from tests.helpers.idp import (
    PASSWORD_GRANT,
    StartIdp,
    gate,
    issuer_config,
    oauth2,
    oauth2_config,
    password_grant,
    start_metadata,
)
from tokenproxy import __version__
from tokenproxy.cli import http_stack_problem, llhttp_parser_loaded, main, summary
from tokenproxy.config import build_config, load_config
from tokenproxy.daemon import switch_setting

ROUTES = [
    {"prefix": "/", "upstream": "https://api.example.com/v1/", "provider": "fixed"},
    {"prefix": "/other", "upstream": "https://other.example.com/", "provider": "filed",
     "header": "X-Api-Key", "value": "{token}", "retry_on": [401, 403]},
    {"prefix": "/corp", "upstream": "https://corp.example.com/", "provider": "corp"},
    {"prefix": "/rt", "upstream": "https://rt.example.com/", "provider": "rt"},
    {"prefix": "/legacy", "upstream": "https://legacy.example.com/", "provider": "legacy"},
]


def secret_config(tmp_path: Path, mode: str) -> tuple[Path, dict[str, str]]:
    """A config carrying every secret of tests/helpers/fakes.py, each inline, in a *_file or
    in ${ENV}.

    Returns the file and the environment it needs.
    """
    env: dict[str, str] = {}

    def put(key: str, var: str, value: str) -> dict[str, str]:
        if mode == "inline":
            return {key: value}
        if mode == "env":
            env[var] = value
            return {key: f"${{{var}}}"}
        path = tmp_path / var.lower()
        path.write_text(value + "\n", encoding="utf-8")
        return {f"{key}_file": str(path)}

    token_2 = tmp_path / "token_2"
    token_2.write_text(TOKEN_2 + "\n", encoding="utf-8")
    env["TP_LOGIN_PASSWORD"] = PASSWORD
    raw: dict[str, Any] = {
        "listen": ["127.0.0.1:8080", "[::1]:8081", "0.0.0.0:8082"],
        "security": put("client_key", "TP_CLIENT_KEY", CLIENT_KEY),
        "providers": {
            "fixed": {"type": "static", **put("token", "TP_TOKEN", TOKEN)},
            "filed": {"type": "static", "token_file": str(token_2)},
            "corp": {
                "type": "oauth2",
                "token_url": "https://auth.example.com/oauth2/token",
                "grant_type": "password",
                "client_id": "my-app",
                **put("client_secret", "TP_CLIENT_SECRET", CLIENT_SECRET),
                "username": "alice",
                **put("password", "TP_PASSWORD", PASSWORD),
            },
            "rt": {
                "type": "oauth2",
                "issuer": "https://auth.example.com",
                "grant_type": "refresh_token",
                "client_auth": "none",
                **put("refresh_token", "TP_REFRESH_TOKEN", REFRESH_TOKEN),
            },
            "legacy": {
                "type": "json",
                "login": {
                    "url": "https://legacy.example.com/auth/login",
                    "json": {"username": "bob", "password": "${TP_LOGIN_PASSWORD}"},
                    "headers": {"X-Client-Secret": CLIENT_SECRET},
                    "refresh_token": "/refreshToken",
                },
                "refresh": {
                    "url": "https://legacy.example.com/auth/refresh",
                    "json": {"refreshToken": "{refresh_token}"},
                },
            },
        },
        "routes": ROUTES,
    }
    path = tmp_path / "tokenproxy.yaml"
    path.write_text(yaml.safe_dump(raw), encoding="utf-8")
    return path, env


SIX_LINES = """\
providers:
  api: {type: static, token: "${API_TOKEN}"}
routes:
  - prefix: /
    upstream: https://api.example.com/
    provider: api
"""


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No config is found by accident: no $TOKENPROXY_CONFIG, an empty cwd and XDG dir."""
    monkeypatch.delenv("TOKENPROXY_CONFIG", raising=False)
    monkeypatch.delenv("API_TOKEN", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("XDG_CONFIG_HOME", str(empty))
    monkeypatch.setenv("STATE_DIRECTORY", str(tmp_path / "state"))
    monkeypatch.chdir(empty)


# ---------------------------------------------------------------- in-process


def test_version_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """--version prints the package version and exits 0."""
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert 0 == info.value.code
    assert f"tokenproxy {__version__}\n" == capsys.readouterr().out


@pytest.mark.parametrize("mode", ["inline", "file", "env"])
def test_check_config_prints_summary_without_secrets(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    mode: str,
) -> None:
    """check-config prints listeners, providers, routes and ok, exits 0, and shows no secret."""
    path, env = secret_config(tmp_path, mode)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert 0 == main(["check-config", "-c", str(path)])
    out, err = capsys.readouterr()
    assert_no_secret(out, err)
    assert "" == err
    lines = out.splitlines()
    assert f"config: {path}" == lines[0]
    assert "listen: 127.0.0.1:8080, [::1]:8081, 0.0.0.0:8082" in lines
    assert "admin_listen: 127.0.0.1:9100" in lines
    assert "providers (5):" in lines
    assert "routes (5):" in lines
    for name, kind in [("fixed", "static"), ("filed", "static"), ("corp", "oauth2"),
                       ("rt", "oauth2"), ("legacy", "json")]:
        assert any(line.startswith(f"  {name}: {kind}") for line in lines), name
    assert ("  /other -> https://other.example.com/ (provider filed, header X-Api-Key, "
            "retry_on [401, 403])") in lines
    assert any("client_key=set" in line for line in lines)
    assert "ok" == lines[-1]


def test_summary_lists_structure() -> None:
    """summary() names every listener, provider and route; admin null shows disabled."""
    path = Path(__file__).resolve().parent.parent / "config.example.yaml"
    cfg = load_config(path, {"STATE_DIRECTORY": "/var/lib/tp"})
    lines = summary(cfg)
    assert [f"config: {path}", "listen: 127.0.0.1:8080", "admin_listen: 127.0.0.1:9100"] == (
        lines[:3])
    assert "state_path: /var/lib/tp/state.json" in lines
    assert ("  corp: oauth2 endpoint=https://auth.example.com/oauth2/token client_id=my-app "
            "grant_type=client_credentials client_auth=basic") in lines
    assert ("  / -> https://api.example.com/v1/ (provider fixed, header Authorization, "
            "retry_on [401])") in lines
    assert ("  /corp -> https://corp-api.example.com/ (provider corp, header Authorization, "
            "retry_on [401])") in lines


def test_summary_shows_disabled_admin(tmp_path: Path) -> None:
    """admin_listen: null is reported as disabled."""
    path = tmp_path / "tp.yaml"
    path.write_text("admin_listen: null\n" + SIX_LINES, encoding="utf-8")
    assert "admin_listen: disabled" in summary(load_config(path, {"API_TOKEN": TOKEN}))


def test_check_config_finds_file_from_env(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without -c, check-config uses $TOKENPROXY_CONFIG."""
    path = tmp_path / "from-env.yaml"
    path.write_text(SIX_LINES, encoding="utf-8")
    monkeypatch.setenv("TOKENPROXY_CONFIG", str(path))
    monkeypatch.setenv("API_TOKEN", TOKEN)
    assert 0 == main(["check-config"])
    out = capsys.readouterr().out
    assert f"config: {path}" == out.splitlines()[0]
    assert TOKEN not in out


def test_check_config_finds_file_in_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without -c or $TOKENPROXY_CONFIG, check-config uses ./tokenproxy.yaml."""
    (tmp_path / "empty" / "tokenproxy.yaml").write_text(SIX_LINES, encoding="utf-8")
    monkeypatch.setenv("API_TOKEN", TOKEN)
    assert 0 == main(["check-config"])
    assert "config: tokenproxy.yaml" == capsys.readouterr().out.splitlines()[0]


def test_check_config_finds_file_in_xdg(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Failing all else, check-config uses $XDG_CONFIG_HOME/tokenproxy/config.yaml."""
    path = tmp_path / "xdg" / "tokenproxy" / "config.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(SIX_LINES, encoding="utf-8")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("API_TOKEN", TOKEN)
    assert 0 == main(["check-config"])
    assert f"config: {path}" == capsys.readouterr().out.splitlines()[0]


def bad_cases(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Config problems: the -c arguments and the message that must follow 'tokenproxy: '."""
    def write(name: str, text: str) -> str:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        return str(path)

    def swap(text: str, old: str, new: str) -> str:
        # A replacement that silently did nothing would leave a valid config, and `run` on a
        # valid config serves forever.
        assert old in text
        return text.replace(old, new)

    six = swap(SIX_LINES, '"${API_TOKEN}"', TOKEN)
    return {
        "bad-upstream": (
            ["-c", write("up.yaml", six + "  - {prefix: /b, upstream: ftp://x/, provider: api}\n")],
            "routes[1].upstream: not an absolute http(s) URL",
        ),
        "unknown-key": (
            ["-c", write("typo.yaml", swap(six, "upstream:", "upstrem:"))],
            "routes[0].upstrem: unknown key",
        ),
        "missing-env": (
            ["-c", write("env.yaml", SIX_LINES)],
            "providers.api.token: environment variable API_TOKEN is not set",
        ),
        "unreadable-secret-file": (
            ["-c", write("file.yaml", swap(six, f"token: {TOKEN}",
                                            f"token_file: {tmp_path}/nope"))],
            f"providers.api.token_file: cannot read {tmp_path}/nope: No such file or directory",
        ),
        "missing-config": (
            ["-c", f"{tmp_path}/missing.yaml"],
            f"config: cannot read {tmp_path}/missing.yaml: No such file or directory",
        ),
        "yaml-syntax": (
            ["-c", write("syntax.yaml", swap(six, f"token: {TOKEN}}}",
                                              f"token: {TOKEN}, password: *{PASSWORD}"))],
            f"{tmp_path}/syntax.yaml: line 2: invalid YAML (",
        ),
        "not-found": (
            [],
            "config: no file found (tried -c, $TOKENPROXY_CONFIG, tokenproxy.yaml, ",
        ),
    }


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("case", ["bad-upstream", "unknown-key", "missing-env",
                                  "unreadable-secret-file", "missing-config", "yaml-syntax",
                                  "not-found"])
def test_config_problem_exits_2_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, case: str
) -> None:
    """A config problem exits 2 with one stderr line naming the key path, no traceback."""
    args, message = bad_cases(tmp_path)[case]
    assert 2 == main([command, *args])
    out, err = capsys.readouterr()
    assert "" == out
    assert 1 == len(err.splitlines())
    assert err.startswith(f"tokenproxy: {message}")
    assert "Traceback" not in err
    assert_no_secret(out, err)


def test_no_subcommand_exits_2_with_usage(capsys: pytest.CaptureFixture[str]) -> None:
    """tokenproxy without a command prints usage on stderr and exits 2."""
    assert 2 == main([])
    out, err = capsys.readouterr()
    assert "" == out
    assert err.startswith("usage: tokenproxy")
    assert "check-config" in err


@pytest.mark.parametrize("argv", [["frobnicate"], ["check-config", "--bogus"],
                                  ["check-config", "-c"]])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """Unknown commands and options are usage errors: exit 2."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert 2 == info.value.code
    assert "usage: tokenproxy" in capsys.readouterr().err


def test_check_config_hides_query_strings(tmp_path: Path) -> None:
    """A json provider's login URL with a query prints without the query."""
    raw = proxy_config("https://h.example/", TOKEN, state_path=str(tmp_path / "state.json"))
    raw["providers"] = {"legacy": {"type": "json", "login": {
        "url": "https://h.example/login?api_key=QUERYSECRET123", "json": {"u": "me"}}}}
    raw["routes"][0]["provider"] = "legacy"
    text = "\n".join(summary(build_config(raw, {})))
    assert "QUERYSECRET123" not in text
    assert "https://h.example/login" in text


# ---------------------------------------------------------------- real processes


def cli_env(extra: dict[str, str], cwd: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOKENPROXY_", "TP_"))}
    env.update(XDG_CONFIG_HOME=str(cwd), STATE_DIRECTORY=str(cwd / "state"), **extra)
    env.pop("API_TOKEN", None)
    return env


def run_cli(argv: list[str], cwd: Path, extra: dict[str, str] | None = None,
            script: bool = False) -> subprocess.CompletedProcess[str]:
    """Run tokenproxy as `python -m tokenproxy` or as the installed console script."""
    exe = [str(Path(sys.executable).parent / "tokenproxy")] if script else [
        sys.executable, "-m", "tokenproxy"]
    return subprocess.run([*exe, *argv], cwd=cwd, env=cli_env(extra or {}, cwd),
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.slow
def test_module_version_subprocess(tmp_path: Path) -> None:
    """python -m tokenproxy --version prints the version and exits 0."""
    proc = run_cli(["--version"], tmp_path)
    assert (0, f"tokenproxy {__version__}\n") == (proc.returncode, proc.stdout)


@pytest.mark.slow
def test_module_bad_config_subprocess(tmp_path: Path) -> None:
    """python -m tokenproxy check-config on a bad file exits 2 with one line, no traceback."""
    args, message = bad_cases(tmp_path)["bad-upstream"]
    proc = run_cli(["check-config", *args], tmp_path)
    assert 2 == proc.returncode
    assert [f"tokenproxy: {message}"] == proc.stderr.splitlines()
    assert "" == proc.stdout


@pytest.mark.slow
def test_module_without_command_subprocess(tmp_path: Path) -> None:
    """python -m tokenproxy alone exits 2 with usage on stderr."""
    proc = run_cli([], tmp_path)
    assert 2 == proc.returncode
    assert proc.stderr.startswith("usage: tokenproxy")


@pytest.mark.slow
def test_script_check_config_subprocess(tmp_path: Path) -> None:
    """The tokenproxy script's check-config exits 0 and no secret reaches stdout or stderr."""
    path, env = secret_config(tmp_path, "env")
    proc = run_cli(["check-config", "-c", str(path)], tmp_path, env, script=True)
    assert (0, "") == (proc.returncode, proc.stderr)
    assert "ok" == proc.stdout.splitlines()[-1]
    assert_no_secret(proc.stdout, proc.stderr)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing-env", "unreadable-secret-file", "yaml-syntax"])
def test_script_run_bad_config_subprocess(tmp_path: Path, case: str) -> None:
    """tokenproxy run with a bad config exits 2 with one line naming the problem."""
    args, message = bad_cases(tmp_path)[case]
    proc = run_cli(["run", *args], tmp_path, script=True)
    assert 2 == proc.returncode
    assert 1 == len(proc.stderr.splitlines())
    assert proc.stderr.startswith(f"tokenproxy: {message}")
    assert "Traceback" not in proc.stderr
    assert_no_secret(proc.stdout, proc.stderr)


class TestHttpStackCheck:
    """Start-up refuses an aiohttp with known parser advisories or without its C parser."""

    @pytest.mark.parametrize(("version", "c_parser", "refused"), [
        ("3.14.5", True, False),
        ("3.14.4", True, False),
        ("4.0.0a1", True, False),
        ("3.14.3", True, True),
        ("3.9.1", True, True),
        ("3.14.5", False, True),
    ])
    def test_http_stack_problem(self, version: str, c_parser: bool, refused: bool) -> None:
        """Versions below 3.14.4, or the pure-Python parser, are named as a problem."""
        assert refused == (http_stack_problem(version, c_parser) is not None)

    def test_the_installed_stack_passes(self) -> None:
        """The aiohttp this suite runs on has its C parser and no known advisory."""
        assert http_stack_problem(aiohttp.__version__, llhttp_parser_loaded()) is None

    @pytest.mark.slow
    def test_run_refuses_the_pure_python_parser(self, tmp_path: Path) -> None:
        """With AIOHTTP_NO_EXTENSIONS=1 `run` exits 1 naming the parser, unless allowed."""
        cfg = tmp_path / "c.yaml"
        cfg.write_text("providers: {api: {type: static, token: abcdefgh}}\n"
                       "routes: [{prefix: /, upstream: 'http://127.0.0.1:9/', provider: api}]\n"
                       "listen: 127.0.0.1:0\nadmin_listen: null\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENPROXY")}
        env["AIOHTTP_NO_EXTENSIONS"] = "1"
        result = subprocess.run([sys.executable, "-m", "tokenproxy", "run", "-c", str(cfg)],
                                capture_output=True, text=True, timeout=60, env=env,
                                check=False)
        assert 1 == result.returncode
        assert "C HTTP parser" in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize(("value", "expected"), [
    (None, True), ("1", True), ("on", True), ("TRUE", True), ("yes", True),
    ("0", False), ("off", False), ("False", False), (" no ", False),
])
@pytest.mark.parametrize("name", ["TOKENPROXY_FAST_PATH", "TOKENPROXY_SPLICE"])
def test_switch_setting(name: str, value: str | None, expected: bool) -> None:
    env = {} if value is None else {name: value}
    assert expected is switch_setting(env, name)


@pytest.mark.parametrize("name", ["TOKENPROXY_FAST_PATH", "TOKENPROXY_SPLICE"])
def test_unknown_switch_value_exits_2_before_starting(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
    name: str,
) -> None:
    """A typo ("disable") must not leave an operator believing the switch is off."""
    path = tmp_path / "tokenproxy.yaml"
    path.write_text("admin_listen: null\n" + SIX_LINES, encoding="utf-8")
    monkeypatch.setenv("API_TOKEN", TOKEN)
    monkeypatch.setenv(name, "disable")
    assert 2 == main(["run", "-c", str(path)])
    _, err = capsys.readouterr()
    assert 1 == len(err.splitlines())
    assert err.startswith(f"tokenproxy: {name}: expected 1/0")


# ---------------------------------------------------------------- options and --online


def _minimal(tmp_path: Path) -> Path:
    path = tmp_path / "tp.yaml"
    path.write_text(yaml.safe_dump({
        "providers": {"api": {"type": "static", "token": "${API_TOKEN:-x}"}},
        "routes": [{"prefix": "/", "upstream": "https://api.example.com/", "provider": "api"}],
    }))
    path.chmod(0o600)
    return path


@pytest.mark.parametrize("where", ["before", "after"])
def test_config_option_before_or_after_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    path = str(_minimal(tmp_path))
    argv = ["-c", path, "check-config"] if where == "before" else ["check-config", "-c", path]
    assert 0 == main(argv)
    assert f"config: {path}" == capsys.readouterr().out.splitlines()[0]


def test_help_names_config_discovery_and_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    text = capsys.readouterr().out
    for needed in ("TOKENPROXY_CONFIG", "./tokenproxy.yaml", "/etc/tokenproxy/config.yaml",
                   "exit codes", "2 bad configuration"):
        assert needed in text


def test_summary_names_an_issuer_as_such(tmp_path: Path) -> None:
    path = tmp_path / "tp.yaml"
    path.write_text(yaml.safe_dump({
        "state_path": str(tmp_path / "s.json"),
        "providers": {"corp": {"type": "oauth2", "issuer": "https://login.example.com/o",
                               "client_id": "c", "client_secret": "${S:-x}"}},
        "routes": [{"prefix": "/", "upstream": "https://api.example.com/", "provider": "corp"}],
    }))
    [line] = [x for x in summary(load_config(path, {})) if x.startswith("  corp:")]
    assert "issuer=https://login.example.com/o" in line
    assert "endpoint=" not in line


@pytest.mark.slow
async def test_check_config_online_contacts_each_provider_once(
    tmp_path: Path, start: StartIdp
) -> None:
    """--online: discovery and one token request per provider, the token never printed; a
    rotating refresh token is never spent; exit 1 when any provider fails."""
    idp = await start()
    good = {"type": "oauth2", "issuer": idp.url, "client_id": idp.issuer.client_id,
            "client_secret": CLIENT_SECRET}
    raw: dict[str, Any] = {
        "state_path": str(tmp_path / "state.json"),
        "providers": {
            "good": good,
            "wrong": {**good, "client_secret": "not-the-secret-7"},
            "rt": {"type": "oauth2", "token_url": idp.token_url, "grant_type": "refresh_token",
                   "client_id": "c", "client_auth": "none", "refresh_token": REFRESH_TOKEN},
            "fixed": {"type": "static", "token": TOKEN},
        },
        "routes": [{"prefix": "/", "upstream": "https://api.example.com/", "provider": "good"}],
    }
    path = tmp_path / "tp.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    path.chmod(0o600)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenproxy", "check-config", "--online", "-c", str(path),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=cli_env({}, tmp_path))
    out_b, err_b = await asyncio.wait_for(proc.communicate(), 60)
    out, err = out_b.decode(), err_b.decode()
    assert 1 == proc.returncode, (out, err)
    lines = out.splitlines()
    online = lines[lines.index("online:") + 1:]
    assert [
        f"  good: ok (expires in 10 s); token endpoint {idp.token_url} (discovered)",
        "  wrong: failed: client_credentials grant: status 401 (invalid_client); token "
        f"endpoint {idp.token_url} (discovered)",
        "  rt: not exchanged (it would rotate the refresh token the daemon holds); "
        "`tokenproxy token` uses it",
        "  fixed: ok (static token)",
        "failed: wrong",
    ] == online
    assert ["client_credentials", "client_credentials"] == idp.calls.grants()
    for issued in [*idp.issuer._access, REFRESH_TOKEN, TOKEN, CLIENT_SECRET]:
        assert issued not in out + err
    assert not (tmp_path / "state.json").exists()


# ---------------------------------------------------------------- --online against live issuers


async def check_online(directory: Path, config: Path,
                       timeout: float = 20.0) -> tuple[int, str, float]:
    """``python -m tokenproxy check-config --online -c CONFIG`` in a child process (so this
    loop keeps serving the issuer): exit code, stdout+stderr, seconds taken."""
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tokenproxy", "check-config", "--online", "-c", str(config),
        cwd=directory, env=child_env(directory), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"check-config --online hung for {timeout}s") from None
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace"), time.monotonic() - started


@pytest.mark.slow
async def test_online_check_prints_no_secret_spends_no_refresh_token_writes_nothing(
    start: StartIdp, tmp_path: Path,
) -> None:
    """check-config --online with a discovered password-grant provider and a
    refresh-token-only provider prints neither the issued tokens nor any credential, does
    not exchange the refresh token (the issuer's family keeps it live and unspent), creates
    no state file and exits 0."""
    idp = await start()
    login = await password_grant(idp)
    family = idp.issuer._refresh[login["refresh_token"]]
    directory = tmp_path / "cfg"
    raw = issuer_config(idp, idp.url, directory, **PASSWORD_GRANT)
    raw["providers"]["rt"] = oauth2(idp, grant_type="refresh_token",
                                    refresh_token=login["refresh_token"])
    path = write_config(directory, raw)
    before = len(idp.calls.seen)
    code, out, _ = await check_online(directory, path)
    assert 0 == code, out
    assert "idp: ok (expires in" in out
    assert f"token endpoint {idp.token_url} (discovered)" in out
    issued = [*idp.issuer._access, *idp.issuer._refresh]
    assert [] == [s for s in (*SECRETS, *issued) if s in out]
    assert ["password"] == idp.calls.grants()[before:]
    assert (False, login["refresh_token"], set()) == (
        family.revoked, family.live_refresh, family.spent)
    assert not (directory / "state.json").exists()


@pytest.mark.slow
async def test_online_check_of_a_hanging_token_endpoint_ends_and_fails(
    start: StartIdp, tmp_path: Path,
) -> None:
    """A token endpoint that never answers costs the provider's timeout, then exit 1
    naming the host and the wait."""
    idp = await start()
    idp.calls.default = gate(asyncio.Event())   # held until the test ends
    directory = tmp_path / "cfg"
    path = write_config(directory, oauth2_config(idp, directory, timeout="1s"))
    code, out, took = await check_online(directory, path)
    assert 1 == code, out
    assert f"failed: {idp.url}: no answer within 1s" in out
    assert took < 8


@pytest.mark.slow
async def test_online_check_leaves_a_state_file_it_cannot_read_in_place(
    start: StartIdp, tmp_path: Path,
) -> None:
    """``check-config --online`` writes nothing to the state file: one it cannot read (an
    unknown schema version, as a newer tokenproxy may write) stays where it is, and the
    running daemon keeps its tokens."""
    idp = await start()
    directory = tmp_path / "cfg"
    path = write_config(directory, oauth2_config(idp, directory))
    state = directory / "state.json"
    newer = json.dumps({"version": 2, "providers": {}, "future": True})
    state.write_text(newer, encoding="utf-8")
    state.chmod(0o600)
    code, out, _ = await check_online(directory, path)
    assert 0 == code, out
    assert state.exists(), f"moved aside: {sorted(p.name for p in directory.iterdir())}"
    assert newer == state.read_text(encoding="utf-8")


@pytest.mark.slow
async def test_online_check_escapes_control_characters_from_the_metadata(
    start: StartIdp, tmp_path: Path, aiohttp_server: AiohttpServer,
) -> None:
    """The discovered token endpoint is printed with control characters escaped: an
    issuer's document must not clear or retitle the terminal of the operator checking it."""
    idp = await start()
    meta = await start_metadata(aiohttp_server)
    meta.doc("/.well-known/openid-configuration",
             {"issuer": meta.url, "token_endpoint": meta.url + "/t\x1b[2J\x1b]0;ok\x07"})
    directory = tmp_path / "cfg"
    path = write_config(directory, issuer_config(idp, meta.url, directory))
    code, out, _ = await check_online(directory, path)
    assert 1 == code, out
    assert "\x1b" not in out, repr(out)
    assert "\x07" not in out, repr(out)


@pytest.mark.slow
async def test_online_check_of_a_header_that_would_split_is_a_config_error(
    tmp_path: Path, aiohttp_server: AiohttpServer,
) -> None:
    """A json provider whose login header value holds a line break (it would inject a
    header into every login call) is refused when the config loads: check-config --online
    exits 2 naming the key, before contacting anything, with no traceback."""
    meta = await start_metadata(aiohttp_server)
    directory = tmp_path / "cfg"
    raw = {"state_path": str(directory / "state.json"),
           "providers": {"j": {"type": "json", "login": {
               "url": meta.url + "/login", "headers": {"X-Key": "abc\nX-Injected: 1"}}},
                         "s": {"type": "static", "token": "static-token-0123456789"}},
           "routes": [{"prefix": "/", "upstream": meta.url + "/", "provider": "j"}]}
    path = write_config(directory, raw)
    code, out, _ = await check_online(directory, path)
    assert 2 == code, out
    assert "Traceback" not in out
    assert "providers.j.login.headers.X-Key: not a valid header value" in out
    assert [] == meta.seen
