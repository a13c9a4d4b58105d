"""YAML file -> validated Config. Every error is one ConfigError naming the key path.

The top level is read here; each section has its module (security, limits, providers,
routes), reading a Section against its model dataclass, which holds its keys and defaults.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from tokenproxy.config.forward_proxy import read_forward_proxy
from tokenproxy.config.limits import read_limits
from tokenproxy.config.model import (
    Config,
    ForwardCA,
    ForwardProxyConfig,
    InterceptHost,
    LimitsConfig,
    LogConfig,
    Route,
    SecurityConfig,
    SharedStateConfig,
    yaml_keys,
)
from tokenproxy.config.providers import provider_keys, read_providers
from tokenproxy.config.routes import read_routes
from tokenproxy.config.secrets import holds_inline_secrets
from tokenproxy.config.section import Section
from tokenproxy.config.security import read_security
from tokenproxy.config.shared_state import read_shared_state
from tokenproxy.config.source import parse_yaml
from tokenproxy.config.values import Listener, expand_env, parse_duration, parse_listener
from tokenproxy.errors import ConfigError


def accepted_keys() -> dict[str, tuple[str, ...]]:
    """Every key the loader accepts, by section: "providers.*" for every provider's,
    "providers.<type>" for one type's own, "providers.json.<call>" for login and refresh.
    The test of config.example.yaml checks that the example names each one."""
    return {"": yaml_keys(Config), "log": yaml_keys(LogConfig),
            "security": yaml_keys(SecurityConfig), "limits": yaml_keys(LimitsConfig),
            "shared_state": yaml_keys(SharedStateConfig),
            "forward_proxy": yaml_keys(ForwardProxyConfig),
            "forward_proxy.ca": yaml_keys(ForwardCA),
            "forward_proxy.intercept[]": yaml_keys(InterceptHost),
            "routes[]": yaml_keys(Route), **provider_keys()}


def build_config(raw: object, env: Mapping[str, str], source: Path | None = None) -> Config:
    """Validate an already parsed YAML document."""
    tree = _expand_tree(raw, env, "")
    top = Section(tree, "", Config)
    listen = top.parse("listen", _listeners)
    admin = _admin_listen(top)
    security = read_security(top.value("security"))
    providers = read_providers(top.value("providers"))
    if not providers:
        raise ConfigError("providers: at least one provider is needed")
    state_path = _state_path(top.string("state_path"), env)
    cfg = Config(
        listen=listen,
        admin_listen=admin,
        socket_group=top.string("socket_group"),
        log=_log(top.value("log")),
        state_path=state_path,
        shared_state=read_shared_state(top.value("shared_state")),
        forward_proxy=read_forward_proxy(top.value("forward_proxy"), providers,
                                         None if state_path is None else state_path.parent),
        shutdown_grace=top.parse("shutdown_grace", parse_duration),
        security=security,
        limits=read_limits(top.value("limits")),
        providers=providers,
        routes=read_routes(top.value("routes"), providers),
        source=source,
    )
    if cfg.state_path is None and cfg.persists_tokens and cfg.shared_state is None:
        raise ConfigError("state_path: set it: oauth2, json and command providers keep "
                          "tokens in a state file, and none of $STATE_DIRECTORY, "
                          "$XDG_STATE_HOME or $HOME names an absolute directory for it "
                          "(or set shared_state)")
    exposed = [str(li) for li in listen if not li.is_loopback]
    if exposed and security.client_key is None and not security.allowed_hosts_explicit:
        raise ConfigError(
            f"listen: {exposed[0]} is reachable from other hosts; set security.client_key "
            "or list security.allowed_hosts explicitly"
        )
    _check_admin_exposure(admin, security)
    forward = cfg.forward_proxy
    if forward is not None and not forward.listen.is_loopback and security.client_key is None:
        raise ConfigError(f"forward_proxy.listen: {forward.listen} is reachable from other "
                          "hosts; set security.client_key (clients send it as "
                          "Proxy-Authorization)")
    return replace(cfg, inline_secrets=holds_inline_secrets(raw, env, cfg))


def load_config(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the file at *path*; the environment defaults to os.environ."""
    env = os.environ if env is None else env
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"config: cannot read {path}: {reason}") from None
    return build_config(parse_yaml(text, str(path)), env, source=path)


def _expand_tree(node: Any, env: Mapping[str, str], where: str) -> Any:
    if isinstance(node, str):
        return expand_env(node, env, where or "config")
    if isinstance(node, dict):
        return {
            k: _expand_tree(v, env, f"{where}.{k}" if where else str(k)) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_expand_tree(v, env, f"{where}[{i}]") for i, v in enumerate(node)]
    return node


def _listeners(raw: object, where: str) -> tuple[Listener, ...]:
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise ConfigError(f"{where}: needs at least one address")
    out = tuple(parse_listener(item, f"{where}[{i}]" if isinstance(raw, list) else where)
                for i, item in enumerate(items))
    if len(set(out)) != len(out):
        raise ConfigError(f"{where}: the same address is listed twice")
    return out


def _admin_listen(top: Section) -> Listener | None:
    """The default admin listener when the key is left out; null turns it off."""
    if "admin_listen" not in top.raw:
        default: Listener | None = top.default("admin_listen")
        return default
    value = top.value("admin_listen")
    return None if value is None else parse_listener(value, top.path("admin_listen"))


def _log(raw: object) -> LogConfig:
    m = Section(raw, "log", LogConfig)
    return LogConfig(level=m.choice("level"), format=m.choice("format"))


def _state_path(explicit: str | None, env: Mapping[str, str]) -> Path | None:
    return Path(explicit) if explicit else _default_state_path(env)


def _default_state_path(env: Mapping[str, str]) -> Path | None:
    """$STATE_DIRECTORY/state.json, else under $XDG_STATE_HOME or $HOME/.local/state. None
    without any of them: a shared fallback such as /tmp would let another user plant the file
    first, and a relative one would depend on the working directory (so it does not count)."""
    # systemd may pass several directories separated by ':'; the first is ours.
    directory = env.get("STATE_DIRECTORY", "").split(":")[0]
    if os.path.isabs(directory):
        return Path(directory) / "state.json"
    xdg, home = env.get("XDG_STATE_HOME", ""), env.get("HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "tokenproxy" / "state.json"
    if os.path.isabs(home):
        return Path(home) / ".local" / "state" / "tokenproxy" / "state.json"
    return None


def _check_admin_exposure(admin: Listener | None, security: SecurityConfig) -> None:
    """/readyz and /metrics take no key: an admin listener other hosts can reach needs its own
    explicit Host allowlist, so that opening it to a scraper never widens allowed_hosts."""
    if admin is None or admin.is_loopback or security.admin_allowed_hosts_explicit:
        return
    raise ConfigError(
        f"admin_listen: {admin} is reachable from other hosts; list the Host names its "
        "clients send in security.admin_allowed_hosts (Kubernetes probes and Prometheus send "
        'the pod IP: ["${POD_IP}"] with POD_IP from status.podIP), or "*" for any'
    )

