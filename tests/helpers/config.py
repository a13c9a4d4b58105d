"""Daemon configs as the tests write them: dicts on ephemeral loopback ports, and files."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestServer

from tests.helpers.fakes import TOKEN, TOKEN_2
from tokenproxy.daemon import Daemon

# Short connection timers, so that "for ever" can be told from "until a timer fires" within a
# test.
SHORT_TIMERS = {"header_timeout": "0.3s", "keepalive_timeout": "0.3s", "send_timeout": "0.3s"}

# The make_proxy fixture (tests/conftest.py): starts an in-process daemon from a config dict
# (and an environment), stopped when the test ends.
MakeProxy = Callable[..., Awaitable[Daemon]]


def upstream_url(server: TestServer, path: str = "/") -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def proxy_config(upstream: str, token: str, **overrides: Any) -> dict[str, Any]:
    """A one-route config on ephemeral loopback ports; overrides replace top-level keys."""
    raw: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "admin_listen": "127.0.0.1:0",
        "providers": {"api": {"type": "static", "token": token}},
        "routes": [{"prefix": "/", "upstream": upstream, "provider": "api"}],
    }
    raw.update(overrides)
    return raw


def command_provider(script: str, **extra: Any) -> dict[str, Any]:
    """A command provider running *script* with this Python (it prints the token)."""
    return {"type": "command", "command": [sys.executable, "-c", script], **extra}


def token_file_config(upstream: str, path: Path, **top: Any) -> dict[str, Any]:
    """proxy_config with the static token read from *path*, which now holds TOKEN."""
    path.write_text(TOKEN + "\n")
    return proxy_config(upstream, TOKEN, providers={
        "api": {"type": "static", "token_file": str(path)}}, **top)


def rotate_token(path: Path) -> None:
    """Put TOKEN_2 in the token file (a new inode: the change is seen on the next renew)."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(TOKEN_2 + "\n")
    os.replace(tmp, path)


def write_config(directory: Path, raw: dict[str, Any], name: str = "tokenproxy.yaml") -> Path:
    """Write *raw* as a config file (JSON is valid YAML), private as one holding secrets
    should be (a readable one is warned about at start); *directory* is made, private, if it
    is not there."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / name
    path.write_text(json.dumps(raw, indent=2), encoding="utf-8")
    path.chmod(0o600)
    return path
