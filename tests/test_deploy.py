"""Deployment artefacts: the systemd unit, the Dockerfile, the Kubernetes and Compose examples."""

from __future__ import annotations

import base64
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.helpers.podman import WHEEL_INPUTS
from tokenproxy.config import OAuth2Provider, build_config, parse_yaml

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
    """The final stage runs as a numeric non-root user, reports healthy once ready (/readyz),
    stops on SIGTERM and declares the state volume (tests/test_container.py runs it)."""
    text = (ROOT / "Dockerfile").read_text()
    final = text[text.rindex("\nFROM "):]
    assert re.search(r"^USER 65532:65532$", final, re.M)
    assert "/readyz" in final
    assert "HEALTHCHECK" in final
    assert re.search(r"^STOPSIGNAL SIGTERM$", final, re.M)
    assert 'VOLUME ["/var/lib/tokenproxy"]' in final
    assert "STATE_DIRECTORY=/var/lib/tokenproxy" in final
    assert "/etc/tokenproxy/config.yaml" in final
    assert "gcc" not in final
    assert "build-essential" not in final


def test_dockerfile_wheels_stage_copies_what_the_container_tests_build_from() -> None:
    """The container tests replace the wheels stage with wheels built on the host from
    WHEEL_INPUTS (pip cannot reach the index from a build here): the stage must copy exactly
    those and make its wheels in /wheels, or the image they test is not the one users build."""
    text = (ROOT / "Dockerfile").read_text()
    stage = text[text.index(" AS wheels\n"):text.index("\nFROM ", text.index(" AS wheels"))]
    copied = {name.rstrip("/") for line in re.findall(r"^COPY (.+)$", stage, re.M)
              for name in line.split()[:-1]}
    assert set(WHEEL_INPUTS) == copied
    assert re.search(r"^RUN pip wheel .*--wheel-dir /wheels \.$", stage, re.M)


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


def test_kubernetes_projected_token_example_is_valid(tmp_path: Path) -> None:
    """The variant without a stored secret: its config validates (the token file where the
    manifest mounts it, moved under tmp_path), only the sidecar mounts the projected token,
    and the token's audience is the token endpoint's host."""
    docs = list(yaml.safe_load_all(
        (ROOT / "examples/kubernetes/tokenproxy-sidecar-projected-token.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    raw = parse_yaml(kinds["ConfigMap"]["data"]["config.yaml"], "configmap")
    provider = raw["providers"]["api"]
    pod = kinds["Deployment"]["spec"]["template"]
    [sidecar] = pod["spec"]["initContainers"]
    [mount] = [m for m in sidecar["volumeMounts"] if m["name"] == "sts-token"]
    [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == "sts-token"]
    [source] = volume["projected"]["sources"]
    assert Path(provider["subject_token_file"]) == (
        Path(mount["mountPath"]) / source["serviceAccountToken"]["path"])
    assert provider["token_url"].startswith(source["serviceAccountToken"]["audience"])
    token = tmp_path / "sts-token"
    token.write_text("header.payload.signature")
    provider["subject_token_file"] = str(token)
    cfg = build_config(raw, {"POD_IP": "10.1.2.3"})
    api = cfg.providers["api"]
    assert isinstance(api, OAuth2Provider)
    assert ("token_exchange", "none") == (api.grant_type, api.client_auth)
    assert all(m["name"] != "sts-token" for c in pod["spec"]["containers"]
               for m in c.get("volumeMounts", []))


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


KUBERNETES = sorted((ROOT / "examples/kubernetes").glob("*.yaml"))
# Native sidecars (an init container with restartPolicy: Always) need Kubernetes 1.29.
KUBERNETES_VERSIONS = ("1.29", kubernetes_validate.latest_version())


@pytest.mark.parametrize("manifest", KUBERNETES, ids=lambda p: p.name)
def test_kubernetes_examples_match_the_api_schemas(manifest: Path) -> None:
    """Every object of every Kubernetes example is valid against the API's schemas (shipped
    by kubernetes-validate; strict: an unknown field fails) from 1.29 to the latest."""
    docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
    assert docs
    for version in KUBERNETES_VERSIONS:
        for doc in docs:
            kubernetes_validate.validate(doc, version, strict=True)


def test_kubernetes_validation_catches_a_misspelt_field() -> None:
    """The check above can fail: a misspelt field of the sidecar is refused."""
    docs = list(yaml.safe_load_all((ROOT / "examples/kubernetes/tokenproxy-sidecar.yaml")
                                   .read_text()))
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    [sidecar] = deployment["spec"]["template"]["spec"]["initContainers"]
    sidecar["restartPolicyy"] = sidecar.pop("restartPolicy")
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicyy"):
        kubernetes_validate.validate(deployment, "1.29", strict=True)


# -- replicas sharing one Redis (shared_state) ----------------------------------------------

REPLICAS_K8S = ROOT / "examples/kubernetes/tokenproxy-replicas.yaml"
REPLICAS_COMPOSE = ROOT / "examples/compose-replicas.yaml"
REPLICAS_CONFIG = ROOT / "examples/compose-replicas-config.yaml"
STATE_KEY = base64.b64encode(bytes(range(32))).decode()     # the shape of openssl rand -base64 32


def _with_shared_state_files(raw: Any, tmp_path: Path) -> tuple[Any, dict[str, str]]:
    """*raw* with the provider's secret and shared_state's two files replaced by files in
    *tmp_path* (they are read when the config is built); and the paths the example named."""
    _with_secret_file(raw, tmp_path / "client_secret")
    (tmp_path / "client_secret").write_text("x")
    shared = raw["shared_state"]
    named = {"redis_url_file": shared["redis_url_file"],
             "encryption_key_file": shared["encryption_key_file"]}
    url, key = tmp_path / "redis-url", tmp_path / "state-key"
    url.write_text("redis://tokenproxy:pw@redis:6379/0")
    key.write_text(STATE_KEY + "\n")
    shared["redis_url_file"], shared["encryption_key_file"] = str(url), str(key)
    return raw, named


def _acl_lines(text: str) -> list[str]:
    """The Redis ACL rules the example's comments tell the operator to write."""
    return re.findall(r"user \w+ on [^'\"]*", text)


def test_kubernetes_replicas_example_is_valid(tmp_path: Path) -> None:
    """Three app replicas, each with a tokenproxy sidecar, share one Redis: the embedded config
    validates without any state file, the secrets are mounted where it reads them, and the
    sidecar keeps the single-pod example's rules (no proxy port, probes, read-only root)."""
    text = REPLICAS_K8S.read_text()
    docs = list(yaml.safe_load_all(text))
    objs = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    raw = parse_yaml(objs["ConfigMap", "tokenproxy-config"]["data"]["config.yaml"], "configmap")
    raw, named = _with_shared_state_files(raw, tmp_path)
    cfg = build_config(raw, {"POD_IP": "10.1.2.3"})
    assert cfg.shared_state is not None
    assert cfg.state_path is None            # no state file, no state volume: Redis keeps them
    assert "10.1.2.3" in (cfg.security.admin_hosts or ())

    app = objs["Deployment", "my-app"]
    assert 3 == app["spec"]["replicas"]
    pod = app["spec"]["template"]
    [sidecar] = pod["spec"]["initContainers"]
    assert "Always" == sidecar["restartPolicy"]
    assert "ports" not in sidecar
    assert "/readyz" == sidecar["readinessProbe"]["httpGet"]["path"]
    assert "/healthz" == sidecar["livenessProbe"]["httpGet"]["path"]
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    assert not [v for v in pod["spec"]["volumes"] if "emptyDir" in v]
    # The Secret with the Redis URL and the key is mounted where the config reads both files,
    # under the key names the header's kubectl line gives them.
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    [mount] = [m for m in sidecar["volumeMounts"]
               if volumes[m["name"]].get("secret", {}).get("secretName")
               == "tokenproxy-shared-state"]
    assert mount["readOnly"] is True
    for path in named.values():
        assert Path(mount["mountPath"]) == Path(path).parent
        assert f"--from-literal={Path(path).name}=" in text

    # The URL of the header's kubectl line names the Redis Service and its port.
    m = re.search(r"redis://tokenproxy:\$PASS@([\w-]+):(\d+)/0", text)
    assert m is not None
    service = objs["Service", m[1]]
    assert [int(m[2])] == [p["port"] for p in service["spec"]["ports"]]
    redis_pod = objs["Deployment", m[1]]["spec"]["template"]
    assert service["spec"]["selector"] == redis_pod["metadata"]["labels"]
    # Redis persists (losing its data costs a fresh login) on a claim, with one writer.
    assert 1 == objs["Deployment", m[1]]["spec"]["replicas"]
    assert "Recreate" == objs["Deployment", m[1]]["spec"]["strategy"]["type"]
    [redis] = redis_pod["spec"]["containers"]
    args = redis["args"]
    assert "yes" == args[args.index("--appendonly") + 1]
    redis_volumes = {v["name"]: v for v in redis_pod["spec"]["volumes"]}
    [data] = [m for m in redis["volumeMounts"] if m["mountPath"] == args[args.index("--dir") + 1]]
    claim = redis_volumes[data["name"]]["persistentVolumeClaim"]["claimName"]
    assert ("PersistentVolumeClaim", claim) in objs
    assert redis["securityContext"]["readOnlyRootFilesystem"] is True
    assert redis_pod["spec"]["securityContext"]["runAsNonRoot"] is True
    # Only the app's pods reach Redis; the ACL confines tokenproxy to its key_prefix.
    policy = objs["NetworkPolicy", m[1]]["spec"]
    assert policy["podSelector"]["matchLabels"] == redis_pod["metadata"]["labels"]
    assert [{"podSelector": {"matchLabels": pod["metadata"]["labels"]}}] == (
        policy["ingress"][0]["from"])
    prefix = cfg.shared_state.key_prefix
    [default, user] = _acl_lines(text)
    assert "nopass" in default
    assert "+ping" in default
    assert "+@all" not in default
    assert f"~{prefix}*" in user
    assert f"&{prefix}*" in user


def test_compose_replicas_example_is_valid(tmp_path: Path) -> None:
    """Three tokenproxy services, each in its own app's network namespace, share one Redis:
    nothing is published, everything runs read-only, the secrets land where the config reads
    them, Redis persists, and the config validates without a state file."""
    text = REPLICAS_COMPOSE.read_text()
    doc = yaml.safe_load(text)
    services = doc["services"]
    proxies = sorted(name for name in services if name.startswith("tokenproxy"))
    assert ["tokenproxy-1", "tokenproxy-2", "tokenproxy-3"] == proxies
    assert [] == [name for name, s in services.items() if "ports" in s]
    raw = parse_yaml(REPLICAS_CONFIG.read_text(), "compose-replicas-config")
    raw, named = _with_shared_state_files(raw, tmp_path)
    # The image sets STATE_DIRECTORY; with shared_state the file names no state_path.
    cfg = build_config(raw, {"STATE_DIRECTORY": "/var/lib/tokenproxy"})
    assert cfg.shared_state is not None
    apps = set()
    for name in proxies:
        service = services[name]
        assert service["network_mode"].startswith("service:")
        apps.add(service["network_mode"].removeprefix("service:"))
        assert service["read_only"] is True
        assert ["ALL"] == service["cap_drop"]
        assert "redis" in service["depends_on"]
        for path in named.values():
            assert Path(path).parent == Path("/run/secrets")
            assert Path(path).name in service["secrets"]
            assert Path(path).name in doc["secrets"]
    assert 3 == len(apps)                    # one app per replica: each has its own loopback
    assert apps <= set(services)
    redis = services["redis"]
    command = redis["command"]
    assert "yes" == command[command.index("--appendonly") + 1]
    data_dir = command[command.index("--dir") + 1]
    [volume] = [v.partition(":")[0] for v in redis["volumes"] if v.endswith(f":{data_dir}")]
    assert volume in doc["volumes"]          # a named volume: the data outlives the container
    assert redis["read_only"] is True
    # The URL of the header's line names this service; the ACL confines tokenproxy's user.
    assert "@redis:6379/0" in text
    prefix = cfg.shared_state.key_prefix
    [default, user] = _acl_lines(text)
    assert "+ping" in default
    assert f"~{prefix}*" in user
