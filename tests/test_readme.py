"""The README's commands and configs, run as a newcomer would, so the README cannot rot."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.daemon_proc import child_env, run_to_exit
from tests.helpers.net import busy_port, free_port
from tests.helpers.wait import wait_for
from tokenproxy.config import build_config, load_config, parse_yaml
from tokenproxy.proxy.rules.problem import TITLES

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def _section(title: str) -> str:
    start = README.index(f"## {title}")
    end = README.find("\n## ", start + 1)
    return README[start:end if end != -1 else None]


def test_two_commands_come_first() -> None:
    """The first command block installs and runs the demo; the second installs and tests."""
    first = _blocks("sh")[0]
    commands = [line for line in first.splitlines() if line and not line.startswith("#")]
    assert ["pip install . && tokenproxy demo", "pip install -e '.[test]' && pytest"] == commands
    ci = (ROOT / ".ci" / "run").read_text()
    assert "pip install --quiet -e '.[test]'" in ci
    assert re.search(r"^pytest\b", ci, re.M)


def test_six_line_config_loads(tmp_path: Path) -> None:
    """The first config is six lines and validates with only API_TOKEN set."""
    block = re.search(r"```yaml\n(.*?)```", _section("A first config"), re.S)
    assert block is not None
    text = block[1]
    assert 6 == len(text.strip().splitlines())
    cfg = build_config(parse_yaml(text, "README"), {"API_TOKEN": "x" * 20})
    assert "api" == cfg.routes[0].provider


def test_provider_examples_validate(tmp_path: Path) -> None:
    """Every provider type shown in the README validates (secrets filled in for the test)."""
    block = re.search(r"```yaml\n(.*?)```", _section("Providers"), re.S)
    assert block is not None
    secret = tmp_path / "client_secret"
    secret.write_text("s3cret")
    text = block[1].replace("/run/secrets/client_secret", str(secret))
    raw = parse_yaml(text, "README")
    assert isinstance(raw, dict)
    raw["routes"] = [{"prefix": "/", "upstream": "https://api.example.com/", "provider": "fixed"}]
    env = {"API_TOKEN": "t" * 20, "API_USER": "me", "API_PASSWORD": "pw", "HOME": "/home/me"}
    cfg = build_config(raw, env)
    assert {"static", "oauth2", "json", "command"} == {
        p.type_name() for p in cfg.providers.values()}


@pytest.mark.slow
def test_check_config_command(tmp_path: Path) -> None:
    """`tokenproxy check-config` on the six-line config in the current directory exits 0."""
    block = re.search(r"```yaml\n(.*?)```", _section("A first config"), re.S)
    assert block is not None
    (tmp_path / "tokenproxy.yaml").write_text(block[1])
    env = child_env(tmp_path)
    env["API_TOKEN"] = "readme-token-value"
    result = run_to_exit(["check-config"], tmp_path, env, timeout=60)
    assert 0 == result.returncode, result.stderr
    assert "readme-token-value" not in result.stdout


def test_github_example_loads() -> None:
    """examples/github.yaml, named in the README, validates with API_TOKEN set."""
    assert "examples/github.yaml" in README
    cfg = load_config(ROOT / "examples" / "github.yaml", {"API_TOKEN": "ghp_" + "x" * 20})
    assert "https://api.github.com/" == cfg.routes[0].upstream.url


@pytest.mark.slow
async def test_demo_answers_the_readme_curl_line(tmp_path: Path) -> None:
    """`tokenproxy demo` prints the curl line the README shows, and that curl line works."""
    readme_curl = re.search(r"`(curl http://127\.0\.0\.1:8080/\S+)`", _section("Two commands"))
    assert readme_curl is not None
    port = free_port()
    out = tmp_path / "demo.out"
    with out.open("wb") as fh, (tmp_path / "demo.err").open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "tokenproxy", "demo", "--port", str(port)],
                                stdin=subprocess.DEVNULL, stdout=fh, stderr=err,
                                env=child_env(tmp_path))
    try:
        await wait_for(lambda: "Try:" in out.read_text(), "the demo banner", 15)
        line = readme_curl[1].replace(":8080", f":{port}")
        assert line in out.read_text()
        await wait_for(lambda: "token_refreshed" in (tmp_path / "demo.err").read_text(),
                       "the first token", 15)
        curl = shutil.which("curl")
        assert curl is not None
        result = await asyncio.to_thread(subprocess.run, [curl, "-s", *line.split()[1:]],
                                         capture_output=True, text=True, timeout=30)
        assert "demo" == json.loads(result.stdout)["hello"]
        # Its metrics, on the admin port it picked (the README's :9100 does not apply).
        metrics = re.search(r"curl (http://127\.0\.0\.1:\d+/metrics)", out.read_text())
        assert metrics is not None
        scraped = await asyncio.to_thread(subprocess.run, [curl, "-s", metrics[1]],
                                          capture_output=True, text=True, timeout=30)
        assert "tokenproxy_token_refresh_total" in scraped.stdout
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert 0 == proc.returncode


@pytest.mark.slow
def test_demo_on_a_busy_port_says_what_to_do(tmp_path: Path) -> None:
    """`tokenproxy demo` on a port in use exits 1 with one line suggesting --port, and prints
    no curl line that would not work."""
    with busy_port() as port:
        result = run_to_exit(["demo", "--port", str(port)], tmp_path, timeout=60)
    assert 1 == result.returncode
    assert "--port" in result.stderr
    assert "Traceback" not in result.stderr
    assert "curl" not in result.stdout


def test_readme_points_to_the_reference_instead_of_copying_it() -> None:
    """The README's error and observability sections name the common cases and point to
    docs/errors.md, docs/metrics.md and docs/logging.md, which tests/test_docs.py keeps in
    step with the code; a copied table of every cause or metric would drift (it did: the
    README's lacked provider_misconfigured and the discovery grant)."""
    errors = _section("Errors")
    observability = _section("Observability")
    assert "docs/errors.md" in errors
    assert "docs/metrics.md" in observability
    assert "docs/logging.md" in observability
    assert "| `tokenproxy_" not in README, "a metric table copied into the README"
    assert "| `Tokenproxy-Error` |" not in README, "an error table copied into the README"
    named = set(re.findall(r"`([a-z_]+)` \(\d{3}", errors))
    assert named, errors
    assert named <= set(TITLES), named - set(TITLES)
