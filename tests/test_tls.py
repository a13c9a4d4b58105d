"""TLS to upstreams is always verified; ca_file adds a CA for one route."""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from tests.helpers.config import MakeProxy, proxy_config
from tests.helpers.fakes import TOKEN
from tokenproxy.config import build_config
from tokenproxy.errors import ConfigError


async def _tls_upstream(aiohttp_server: AiohttpServer, cert: tuple[Path, Path]) -> int:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="secure " + str(request.headers.get("Authorization") is not None))

    app = web.Application()
    app.router.add_get("/hello", hello)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert[1]), str(cert[0]))
    server = await aiohttp_server(app, ssl=ctx)
    return server.port


@pytest.mark.slow
async def test_unknown_ca_is_refused_as_tls_error(
    aiohttp_server: AiohttpServer, make_proxy: MakeProxy, cert: tuple[Path, Path]
) -> None:
    """Without ca_file a self-signed upstream fails verification: 502 and kind=tls."""
    port = await _tls_upstream(aiohttp_server, cert)
    daemon = await make_proxy(proxy_config(f"https://127.0.0.1:{port}/", TOKEN))
    async with aiohttp.ClientSession() as s, s.get(
        f"http://127.0.0.1:{daemon.port()}/hello"
    ) as resp:
        assert 502 == resp.status
        assert "upstream_unreachable" == resp.headers["Tokenproxy-Error"]
    assert 1.0 == daemon.registry.get_sample_value(
        "tokenproxy_upstream_errors_total", {"route": "/", "kind": "tls"})


@pytest.mark.slow
async def test_ca_file_trusts_the_upstream(
    aiohttp_server: AiohttpServer, make_proxy: MakeProxy, cert: tuple[Path, Path]
) -> None:
    """With the certificate as the route's ca_file the request goes through with the token."""
    port = await _tls_upstream(aiohttp_server, cert)
    raw = proxy_config(f"https://127.0.0.1:{port}/", TOKEN)
    raw["routes"][0]["ca_file"] = str(cert[1])
    daemon = await make_proxy(raw)
    async with aiohttp.ClientSession() as s, s.get(
        f"http://127.0.0.1:{daemon.port()}/hello"
    ) as resp:
        assert 200 == resp.status
        assert "secure True" == await resp.text()


def test_bad_ca_file_is_a_config_error(tmp_path: Path) -> None:
    """A ca_file that is not a PEM bundle is refused at load, naming the key."""
    bad = tmp_path / "ca.pem"
    bad.write_text("not a certificate")
    raw = proxy_config("https://h.example/", TOKEN)
    raw["routes"][0]["ca_file"] = str(bad)
    with pytest.raises(ConfigError, match=r"routes\[0\]\.ca_file: .* no usable PEM"):
        build_config(raw, {})
