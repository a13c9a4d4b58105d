"""``tokenproxy demo``: an issuer with 10-second tokens, a protected API, and the proxy in front."""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import TextIO

from aiohttp import web

from tokenproxy.config import build_config
from tokenproxy.daemon import Daemon
from tokenproxy.demo.issuer import Issuer
from tokenproxy.listeners import ListenError
from tokenproxy.log import Redactor
from tokenproxy.run import serve

DEMO_LIFETIME = 10.0


def demo_config(issuer_url: str, port: int, state_dir: Path) -> dict[str, object]:
    return {
        "listen": f"127.0.0.1:{port}",
        "admin_listen": "127.0.0.1:0",
        "log": {"level": "info", "format": "console"},
        "state_path": str(state_dir / "state.json"),
        "shutdown_grace": "2s",
        "providers": {
            "demo": {
                "type": "oauth2",
                "token_url": f"{issuer_url}/oauth/token",
                "grant_type": "password",
                "client_id": "demo-client",
                "client_secret": "demo-secret",
                "username": "demo",
                "password": "demo-password",
                "refresh_margin": "4s",
            },
            # Logging in as yourself: `tokenproxy login -c <this config> me`; the demo's
            # issuer approves the device code at once.
            "me": {
                "type": "oauth2",
                "issuer": issuer_url,
                "client_id": "demo-cli",
                "grant_type": "device_code",
                "scope": "openid offline_access",
                "refresh_margin": "4s",
            },
        },
        "routes": [{"prefix": "/me", "upstream": f"{issuer_url}/api/me/", "provider": "me"},
                   {"prefix": "/", "upstream": f"{issuer_url}/api/", "provider": "demo"}],
    }


async def run_demo(port: int, redactor: Redactor, out: TextIO = sys.stdout, *,
                   allocator_tuned: bool = False) -> int:
    issuer = Issuer(lifetime=DEMO_LIFETIME, auto_approve=True, device_interval=1)
    runner = web.AppRunner(issuer.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    issuer.base_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        with tempfile.TemporaryDirectory(prefix="tokenproxy-demo-") as state_dir:
            raw = demo_config(issuer.base_url, port, Path(state_dir))
            config_file = Path(state_dir) / "demo.json"   # JSON is YAML: `login -c` reads it
            config_file.write_text(json.dumps(raw))
            config_file.chmod(0o600)
            cfg = build_config(raw, {}, source=config_file)

            def banner(daemon: Daemon) -> None:
                # Printed once the proxy listens, so the curl line works when it appears.
                out.write(
                    "tokenproxy demo: a built-in issuer hands out 10-second access tokens and\n"
                    "rotating refresh tokens; the proxy refreshes them before they expire\n"
                    "(see the log below).\n\n"
                    f"  Try:     curl http://127.0.0.1:{daemon.port()}/hello\n"
                    f"  Metrics: curl http://127.0.0.1:{daemon.admin_port}/metrics   "
                    "(also /healthz, /readyz)\n"
                    f"  Issuer:  {issuer.base_url}  (the API behind the proxy answers 401 "
                    "without a token)\n\n"
                    "Logging in as yourself works too (a device code the demo's issuer "
                    "approves at once):\n"
                    f"  tokenproxy login -c {config_file} me\n"
                    f"  curl http://127.0.0.1:{daemon.port()}/me/hello\n\n"
                    "Stop with Ctrl-C.\n\n"
                )
                out.flush()

            try:
                return await serve(cfg, redactor=redactor, on_started=banner,
                                   allocator_tuned=allocator_tuned)
            except ListenError as exc:
                raise ListenError(f"{exc} (pick another port with --port)") from None
    finally:
        await runner.cleanup()
