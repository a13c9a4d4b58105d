"""What a daemon loads: the optional parts (Redis for shared_state, the cryptography package
for the forward proxy's CA, assertion keys and encrypted shared state, PyJWT for signing) are
imported only by configs that use them. Each costs megabytes of resident memory (redis-py some
8 MB, cryptography as much) that a plain sidecar does not need (docs/architecture.md)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.config import write_config

pytestmark = pytest.mark.slow

OPTIONAL = ("redis", "cryptography", "jwt")

# Starts a daemon from the config named by argv[1] in a fresh interpreter, stops it, and
# prints which optional packages got imported.
PROBE = """
import asyncio, json, sys
from pathlib import Path
from tokenproxy.config import load_config
from tokenproxy.daemon import Daemon

async def main():
    daemon = Daemon(load_config(Path(sys.argv[1]), {}))
    await daemon.start()
    await daemon.stop(grace=0)

asyncio.run(main())
print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2:]))))
"""


def loaded(tmp_path: Path, raw: dict[str, Any]) -> list[str]:
    config = write_config(tmp_path, raw)
    out = subprocess.run([sys.executable, "-c", PROBE, str(config), *OPTIONAL],
                         capture_output=True, text=True, timeout=60, check=True,
                         cwd=tmp_path).stdout
    return list(json.loads(out.splitlines()[-1]))


def plain(tmp_path: Path, **top: Any) -> dict[str, Any]:
    """A sidecar's config: a static and a client_credentials provider, a route each."""
    return {
        "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
        "state_path": str(tmp_path / "state" / "state.json"),
        "providers": {"fixed": {"type": "static", "token": "t-0123456789"},
                      "corp": {"type": "oauth2", "token_url": "http://127.0.0.1:9/token",
                               "client_id": "app", "client_secret": "s-0123456789"}},
        "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:9/", "provider": "fixed"},
                   {"prefix": "/corp", "upstream": "http://127.0.0.1:9/", "provider": "corp"}],
        **top,
    }


def test_a_plain_daemon_loads_none_of_the_optional_packages(tmp_path: Path) -> None:
    assert [] == loaded(tmp_path, plain(tmp_path))


def test_a_forward_proxy_loads_cryptography_for_its_ca(tmp_path: Path) -> None:
    """The other side of the check above: it does see a package a config needs."""
    raw = plain(tmp_path, forward_proxy={
        "listen": "127.0.0.1:0",
        "intercept": [{"host": "api.example.com", "provider": "fixed"}]})
    assert ["cryptography"] == loaded(tmp_path, raw)
