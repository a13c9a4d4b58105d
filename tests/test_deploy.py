"""Deployment artefacts: the systemd unit, the Dockerfile, the Kubernetes and Compose examples."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from tokenproxy.config import build_config, parse_yaml

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "systemd" / "tokenproxy.service"
# The exposure score `systemd-analyze security` gives the unit (README quotes it); 0 is best.
MAX_EXPOSURE = 1.5


def _unit_with_real_binary(tmp_path: Path) -> Path:
    binary = shutil.which("tokenproxy") or str(Path(sys.executable).parent / "tokenproxy")
    unit = tmp_path / "tokenproxy.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/tokenproxy", binary))
    return unit


def _unit_settings() -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """systemd-analyze verify finds nothing to complain about in the unit."""
    result = subprocess.run(["systemd-analyze", "verify", str(_unit_with_real_binary(tmp_path))],
                            capture_output=True, text=True, timeout=60, check=False)
    assert 0 == result.returncode, result.stderr
    assert "" == result.stderr.strip()


def test_unit_exposure_score(tmp_path: Path) -> None:
    """systemd-analyze security rates the unit's exposure at or below the README's figure."""
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(_unit_with_real_binary(tmp_path))],
        capture_output=True, text=True, timeout=60, check=False)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout)
    assert m is not None, result.stdout + result.stderr
    assert float(m[1]) <= MAX_EXPOSURE
    assert f"{float(m[1]):.1f}" in (ROOT / "README.md").read_text()


def test_unit_has_the_required_hardening() -> None:
    """The unit carries every setting the deployment issue names."""
    s = _unit_settings()
    for key, value in [
        ("Type", "notify"), ("DynamicUser", "yes"), ("StateDirectory", "tokenproxy"),
        ("ConfigurationDirectory", "tokenproxy"), ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"), ("PrivateTmp", "yes"), ("NoNewPrivileges", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"), ("CapabilityBoundingSet", ""),
        ("MemoryDenyWriteExecute", "yes"), ("SystemCallFilter", "@system-service"),
        ("ExecReload", "/bin/kill -HUP $MAINPID"), ("RestartPreventExitStatus", "2"),
    ]:
        assert value in s.get(key, []), key
    assert any(v.startswith("client_secret:") for v in s["LoadCredential"])


def test_dockerfile_passes_hadolint() -> None:
    """hadolint (from PyPI) finds no issue in the Dockerfile."""
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True,
                            text=True, timeout=60, check=False)
    assert 0 == result.returncode, result.stdout + result.stderr


def test_dockerfile_is_non_root_with_healthcheck_and_state_volume() -> None:
    """The final stage runs as a numeric non-root user, checks /healthz, stops on SIGTERM."""
    text = (ROOT / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM "):]
    assert re.search(r"^USER 65532:65532$", final, re.M)
    assert "/healthz" in final
    assert "HEALTHCHECK" in final
    assert re.search(r"^STOPSIGNAL SIGTERM$", final, re.M)
    assert 'VOLUME ["/var/lib/tokenproxy"]' in final
    assert "STATE_DIRECTORY=/var/lib/tokenproxy" in final
    assert "/etc/tokenproxy/config.yaml" in final
    assert "gcc" not in final
    assert "build-essential" not in final


def _with_secret_file(raw: Any, secret_path: Path) -> Any:
    provider = raw["providers"]["api"]
    provider["client_secret_file"] = str(secret_path)
    return raw


def test_kubernetes_example_is_valid(tmp_path: Path) -> None:
    """The sidecar example parses, its embedded config validates, and it follows the pod
    security rules: no proxy port published, readiness on /readyz, state on an emptyDir."""
    docs = list(yaml.safe_load_all((ROOT / "examples/kubernetes/tokenproxy-sidecar.yaml")
                                   .read_text()))
    kinds = {d["kind"]: d for d in docs}
    secret = tmp_path / "client_secret"
    secret.write_text("x")
    raw = parse_yaml(kinds["ConfigMap"]["data"]["config.yaml"], "configmap")
    cfg = build_config(_with_secret_file(raw, secret), {"POD_IP": "10.1.2.3"})
    pod = kinds["Deployment"]["spec"]["template"]
    [sidecar] = pod["spec"]["initContainers"]
    # Probes and Prometheus reach the admin port as http://<pod IP>:9100: that Host is allowed
    # there (from the downward API), while the proxy port keeps its loopback-only allowlist.
    assert [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}] == (
        sidecar["env"])
    assert "10.1.2.3" in (cfg.security.admin_hosts or ())
    assert "10.1.2.3" not in (cfg.security.allowed_hosts or ())
    # An emptyDir is world-writable, which a state file's directory must not be.
    [mount] = [m["mountPath"] for m in sidecar["volumeMounts"] if m["name"] == "state"]
    assert cfg.state_path is not None
    assert Path(mount) in cfg.state_path.parents
    assert Path(mount) != cfg.state_path.parent
    assert "Always" == sidecar["restartPolicy"]
    assert "/readyz" == sidecar["readinessProbe"]["httpGet"]["path"]
    assert "ports" not in sidecar
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"emptyDir": {}} == {k: v for k, v in next(
        v for v in pod["spec"]["volumes"] if v["name"] == "state").items() if k != "name"}
    assert "true" == pod["metadata"]["annotations"]["prometheus.io/scrape"]


def test_compose_example_is_valid(tmp_path: Path) -> None:
    """The Compose example shares the app's network namespace, publishes nothing, runs
    read-only, and its config validates."""
    doc = yaml.safe_load((ROOT / "examples/docker-compose.yaml").read_text())
    service = doc["services"]["tokenproxy"]
    assert "service:app" == service["network_mode"]
    assert "ports" not in service
    assert service["read_only"] is True
    secret = tmp_path / "client_secret"
    secret.write_text("x")
    raw = parse_yaml((ROOT / "examples/compose-config.yaml").read_text(), "compose-config")
    # The image sets STATE_DIRECTORY: the file names no state_path of its own.
    build_config(_with_secret_file(raw, secret), {"STATE_DIRECTORY": "/var/lib/tokenproxy"})
