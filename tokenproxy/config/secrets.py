"""Which values of a config are secrets, and whether its file gives them away."""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tokenproxy.config.model import Config, JsonProvider
from tokenproxy.config.values import SECRET_NAME, expand_env, written_text


def config_secrets(cfg: Config) -> list[str]:
    """Every secret in the config, so the log redactor masks them wherever they appear."""
    out: list[str] = []
    if cfg.security.client_key:
        out.append(cfg.security.client_key.value)
    for p in cfg.providers.values():
        for name in ("token", "client_secret", "password", "refresh_token"):
            secret = getattr(p, name, None)
            if secret is not None:
                out.append(secret.value)
        if isinstance(p, JsonProvider):
            for call in (p.login, p.refresh):
                if call is not None:
                    out.extend(_secret_leaves(call.json))
                    out.extend(v for k, v in call.headers if SECRET_NAME.search(k))
    if cfg.shared_state is not None:
        password = urlsplit(cfg.shared_state.redis_url.value).password
        if password:
            out.append(password)
    return out


def _secret_leaves(node: Any, key: str = "") -> list[str]:
    """String values under secret-sounding keys of a JSON login body (passwords, API keys)."""
    if isinstance(node, dict):
        return [v for k, item in node.items() for v in _secret_leaves(item, str(k))]
    if isinstance(node, list):
        return [v for item in node for v in _secret_leaves(item, key)]
    if isinstance(node, str) and SECRET_NAME.search(key) and "{refresh_token}" not in node:
        return [node]
    return []


def _written_values(node: Any, env: Mapping[str, str], out: set[str]) -> set[str]:
    """The expanded value of every string of the YAML document with text of the file's own."""
    if isinstance(node, str):
        if written_text(node, env):
            out.add(expand_env(node, env, "config"))
    elif isinstance(node, dict):
        for item in node.values():
            _written_values(item, env, out)
    elif isinstance(node, list):
        for item in node:
            _written_values(item, env, out)
    return out


def holds_inline_secrets(raw: object, env: Mapping[str, str], cfg: Config) -> bool:
    """Whether a secret of *cfg* is written in the document *raw* itself, rather than coming
    only from ${NAME} references or *_file files."""
    written = _written_values(raw, env, set())
    return any(secret in written for secret in config_secrets(cfg))


def exposed_mode(cfg: Config) -> int | None:
    """The config file's mode when it holds a secret written in it and group or others can
    read it; None when it does not (or cannot be looked at)."""
    if not cfg.inline_secrets or cfg.source is None:
        return None
    try:
        mode = stat.S_IMODE(os.stat(cfg.source).st_mode)
    except OSError:
        return None
    return mode if mode & 0o044 else None


def exposed_warning(cfg: Config) -> str | None:
    """check-config's line for a config file that gives its secrets away, if it does."""
    mode = exposed_mode(cfg)
    if mode is None:
        return None
    return (f"warning: {cfg.source} is readable by group or others (mode {oct(mode)}) and "
            f"holds secrets written in it: chmod 600 {cfg.source}, or move them to a *_file "
            "or ${VARIABLE}")


def private_key_files(cfg: Config) -> list[tuple[str, Path]]:
    """Every private key file the config names, with its key path: assertion signing keys
    and TLS client keys."""
    out: list[tuple[str, Path]] = []
    for name, p in cfg.providers.items():
        for key in ("private_key_file", "tls_client_key_file"):
            path = getattr(p, key, None)
            if path is not None:
                out.append((f"providers.{name}.{key}", path))
    for i, r in enumerate(cfg.routes):
        if r.tls_client_key_file is not None:
            out.append((f"routes[{i}].tls_client_key_file", r.tls_client_key_file))
    if cfg.forward_proxy is not None:
        for i, e in enumerate(cfg.forward_proxy.intercept):
            if e.tls_client_key_file is not None:
                out.append((f"forward_proxy.intercept[{i}].tls_client_key_file",
                            e.tls_client_key_file))
    return out


def readable_keys(cfg: Config) -> list[tuple[str, Path, int]]:
    """The private key files group or others can read: (key path, file, mode)."""
    out: list[tuple[str, Path, int]] = []
    for where, path in private_key_files(cfg):
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            continue
        if mode & 0o044:
            out.append((where, path, mode))
    return out


def readable_key_warnings(cfg: Config) -> list[str]:
    """check-config's lines for private keys others can read."""
    return [f"warning: {where}: {path} is readable by group or others (mode {oct(mode)}): "
            f"chmod 600 {path}" for where, path, mode in readable_keys(cfg)]
