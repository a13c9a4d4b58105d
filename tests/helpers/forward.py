"""The forward proxy (tokenproxy/forward) under test: an upstream named ``localhost`` over TLS
(a certificate of the tests' own CA) and over plain HTTP, a config intercepting both, and the
ways a client reaches the forward listener."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from pytest_aiohttp import AiohttpServer

from tests.helpers.fakes import TOKEN, FakeUpstream
from tests.helpers.tls import ServerCert
from tokenproxy.daemon import Daemon


@dataclass
class Upstream:
    """The FakeUpstream app over TLS on ``port`` and plain HTTP on ``plain_port``."""

    fake: FakeUpstream
    tls: ServerCert
    port: int
    plain_port: int

    @property
    def authority(self) -> str:
        return f"localhost:{self.port}"


async def start_upstream(aiohttp_server: AiohttpServer, tls: ServerCert) -> Upstream:
    """*tls*: the session's upstream certificate (the ``upstream_cert`` fixture)."""
    fake = FakeUpstream()
    secure = await aiohttp_server(fake.app(), ssl=tls.server_context(), host="127.0.0.1")
    plain = await aiohttp_server(fake.app(), host="127.0.0.1")
    assert secure.port is not None
    assert plain.port is not None
    return Upstream(fake, tls, secure.port, plain.port)


def forward_config(tmp_path: Path, up: Upstream, *, limits: dict[str, Any] | None = None,
                   security: dict[str, Any] | None = None, **forward: Any) -> dict[str, Any]:
    """A daemon with a static provider ``api`` whose forward proxy intercepts *up*:
    ``localhost:port`` over TLS and ``localhost:plain_port`` as ``scheme: http``."""
    raw: dict[str, Any] = {
        "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
        "state_path": str(tmp_path / "state" / "state.json"),
        "providers": {"api": {"type": "static", "token": TOKEN}},
        "routes": [{"prefix": "/", "upstream": f"http://127.0.0.1:{up.plain_port}/",
                    "provider": "api"}],
        "forward_proxy": {"listen": "127.0.0.1:0",
                          "intercept": [{"host": "localhost", "port": up.port,
                                         "provider": "api", "ca_file": str(up.tls.ca)},
                                        {"host": "localhost", "port": up.plain_port,
                                         "scheme": "http", "provider": "api"}],
                          **forward},
    }
    if limits is not None:
        raw["limits"] = limits
    if security is not None:
        raw["security"] = security
    return raw


def fport(daemon: Daemon) -> int:
    return daemon.forward_listeners[0].port


def proxy_url(daemon: Daemon, key: str | None = None) -> str:
    auth = f"tokenproxy:{key}@" if key is not None else ""
    return f"http://{auth}127.0.0.1:{fport(daemon)}"


def ca_file(tmp_path: Path) -> Path:
    """Where the daemon of forward_config generates its CA."""
    return tmp_path / "state" / "forward-ca.pem"


def ca_context(tmp_path: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_file(tmp_path)))


async def get_via(daemon: Daemon, tmp_path: Path, url: str) -> tuple[int, str]:
    """GET *url* through the forward proxy, trusting its CA (aiohttp's CONNECT): the status
    and the body."""
    async with aiohttp.ClientSession() as s, s.get(url, proxy=proxy_url(daemon),
                                                   ssl=ca_context(tmp_path)) as resp:
        return resp.status, await resp.text()
