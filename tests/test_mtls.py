"""Mutual TLS (RFC 8705): the daemon's client certificate to a token endpoint
(tls_client_auth, and alongside private_key_jwt) and to an upstream (a route's
tls_client_cert_file / tls_client_key_file, on both request paths). The servers are real
aiohttp servers whose ssl contexts require a client certificate (CERT_REQUIRED): without
one the handshake fails. The certificates are the tests' own (tests/helpers/tls.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from pytest_aiohttp import AiohttpServer

from tests.helpers.assertion_issuer import (
    Client,
    StartIssuer,
    bearer,
    provider_at,
    through,
)
from tests.helpers.client import fetch
from tests.helpers.config import MakeProxy, proxy_config, write_config
from tests.helpers.fakes import TOKEN, FakeUpstream, assert_no_secret
from tests.helpers.forward import Upstream, ca_context, forward_config, proxy_url
from tests.helpers.idp import config
from tests.helpers.keys import Pki, make_key, pki
from tests.helpers.logs import CapturedLogs, failures
from tests.helpers.tls import ClientCert, mtls_context, peer_cn
from tests.helpers.wait import wait_for, wait_ready
from tokenproxy.cli import main

CLIENT_ID = "demo-client"
KID = "2026-key-1"


@pytest.fixture(name="tls", scope="session")
def _tls(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return pki(tmp_path_factory.mktemp("mtls"))


def client_cert(cert: ClientCert) -> dict[str, str]:
    return {"tls_client_cert_file": str(cert.cert), "tls_client_key_file": str(cert.key)}


# -- to the token endpoint -------------------------------------------------------------------


@pytest.mark.slow
async def test_tls_client_auth_end_to_end(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    tmp_path: Path, http: aiohttp.ClientSession, tls: Pki,
) -> None:
    """tls_client_auth: the daemon presents its certificate to the token endpoint (which
    requires one) and sends client_id with no secret; the endpoint matched the
    certificate's CN to the client, and the upstream gets the token."""
    issuer = await issuers(tls=mtls_context(tls.server, tls.proxy.ca))
    issuer.register(Client(CLIENT_ID, "tls_client_auth", cert_cn=tls.proxy.cn))
    daemon = await make_proxy(config(provider_at(
        issuer, tls.server.ca, client_id=CLIENT_ID, client_auth="tls_client_auth",
        **client_cert(tls.proxy)), fake_upstream.url("/"), tmp_path))
    await wait_ready(daemon)
    await through(http, daemon, fake_upstream, issuer)
    [call] = issuer.calls
    assert ("tls_client_auth", tls.proxy.cn) == (call.method, call.peer_cn)
    assert {"grant_type": "client_credentials", "client_id": CLIENT_ID} == call.form
    assert "authorization" not in call.headers


@pytest.mark.slow
async def test_mtls_alongside_private_key_jwt(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    tmp_path: Path, http: aiohttp.ClientSession, tls: Pki,
) -> None:
    """A token endpoint that wants mTLS and private_key_jwt both: the certificate is
    presented and the assertion (aud the https token URL) verified on the same call."""
    issuer = await issuers(tls=mtls_context(tls.server, tls.proxy.ca))
    key = make_key(tmp_path / "keys", "rsa")
    issuer.register(Client(CLIENT_ID, "private_key_jwt", keys={KID: key.public},
                           cert_cn=tls.proxy.cn))
    daemon = await make_proxy(config(provider_at(
        issuer, tls.server.ca, client_id=CLIENT_ID, client_auth="private_key_jwt",
        private_key_file=str(key.path), key_id=KID, **client_cert(tls.proxy)),
        fake_upstream.url("/"), tmp_path))
    await wait_ready(daemon)
    await through(http, daemon, fake_upstream, issuer)
    [call] = issuer.calls
    assert ("private_key_jwt", tls.proxy.cn) == (call.method, call.peer_cn)
    assert call.assertion_claims is not None
    assert issuer.token_url.startswith("https://")
    assert issuer.token_url == call.assertion_claims["aud"]


@pytest.mark.slow
async def test_token_endpoint_requiring_a_certificate_refuses_a_daemon_without_one(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    tmp_path: Path, http: aiohttp.ClientSession, logs: CapturedLogs, tls: Pki,
) -> None:
    """The CERT_REQUIRED listener is real: a provider without tls_client_cert_file fails the
    handshake (a token_refresh_failed, nothing reaches the endpoint's handler) and the route
    answers 503."""
    issuer = await issuers(tls=mtls_context(tls.server, tls.proxy.ca))
    key = make_key(tmp_path / "keys", "p256")
    issuer.register(Client(CLIENT_ID, "private_key_jwt", keys={KID: key.public}))
    daemon = await make_proxy(config(provider_at(
        issuer, tls.server.ca, client_id=CLIENT_ID, client_auth="private_key_jwt",
        private_key_file=str(key.path), key_id=KID), fake_upstream.url("/"), tmp_path))
    await wait_for(lambda: bool(failures(logs)), "token_refresh_failed")
    assert [] == issuer.calls
    assert 503 == (await fetch(http, daemon)).status


@pytest.mark.slow
async def test_tls_client_auth_with_a_certificate_of_another_client_is_refused(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    tmp_path: Path, http: aiohttp.ClientSession, logs: CapturedLogs, tls: Pki,
) -> None:
    """A certificate the CA signed for someone else: the handshake succeeds but the
    endpoint refuses the client (401 invalid_client); the daemon does not serve."""
    issuer = await issuers(tls=mtls_context(tls.server, tls.proxy.ca))
    issuer.register(Client(CLIENT_ID, "tls_client_auth", cert_cn=tls.proxy.cn))
    daemon = await make_proxy(config(provider_at(
        issuer, tls.server.ca, client_id=CLIENT_ID, client_auth="tls_client_auth",
        **client_cert(tls.other)), fake_upstream.url("/"), tmp_path))
    await wait_for(lambda: bool(failures(logs)), "token_refresh_failed")
    [call] = issuer.calls
    assert (tls.other.cn, "invalid_client") == (call.peer_cn, call.error)
    assert (await fetch(http, daemon)).status in (502, 503)


# -- to an upstream --------------------------------------------------------------------------


async def mtls_upstream(aiohttp_server: AiohttpServer, fake: FakeUpstream, tls: Pki
                        ) -> tuple[TestServer, list[str | None]]:
    """The fake upstream over TLS requiring a client certificate of the client CA; and the
    CN of the certificate each request came with."""
    peers: list[str | None] = []

    @web.middleware
    async def peer(request: web.Request, handler: Any) -> web.StreamResponse:
        assert request.transport is not None
        peers.append(peer_cn(request.transport.get_extra_info("peercert")))
        resp: web.StreamResponse = await handler(request)
        return resp

    app = fake.app()
    app.middlewares.append(peer)
    fake.server = await aiohttp_server(app, ssl=mtls_context(tls.server, tls.proxy.ca))
    return fake.server, peers


def mtls_route(server: TestServer, tls: Pki, cert: ClientCert | None) -> dict[str, Any]:
    raw = proxy_config(f"https://127.0.0.1:{server.port}/", TOKEN)
    raw["routes"][0]["ca_file"] = str(tls.server.ca)
    if cert is not None:
        raw["routes"][0].update(client_cert(cert))
    return raw


@pytest.mark.slow
@pytest.mark.both_paths
async def test_route_presents_its_client_certificate_to_the_upstream(
    aiohttp_server: AiohttpServer, make_proxy: MakeProxy, fake_upstream: FakeUpstream,
    http: aiohttp.ClientSession, tls: Pki,
) -> None:
    """A route with tls_client_cert_file / tls_client_key_file: the upstream (requiring a
    client certificate) sees the daemon's and gets the token, over several requests (the
    connection reused or not)."""
    server, peers = await mtls_upstream(aiohttp_server, fake_upstream, tls)
    daemon = await make_proxy(mtls_route(server, tls, tls.proxy))
    for _ in range(3):
        resp = await fetch(http, daemon, "/echo")
        assert 200 == resp.status, resp.text
        assert f"Bearer {TOKEN}" == bearer(fake_upstream.last)
    assert [tls.proxy.cn] * 3 == peers


@pytest.mark.slow
@pytest.mark.both_paths
async def test_route_without_client_certificate_gets_502_from_an_mtls_upstream(
    aiohttp_server: AiohttpServer, make_proxy: MakeProxy, fake_upstream: FakeUpstream,
    http: aiohttp.ClientSession, tls: Pki, logs: CapturedLogs,
) -> None:
    """The same upstream, a route without a client certificate: the handshake fails, the
    daemon answers 502 (a problem body without the token), nothing reached the upstream."""
    server, peers = await mtls_upstream(aiohttp_server, fake_upstream, tls)
    daemon = await make_proxy(mtls_route(server, tls, None))
    resp = await fetch(http, daemon, "/echo")
    assert 502 == resp.status
    assert [] == fake_upstream.seen
    assert [] == peers
    assert_no_secret(resp.body, logs.text)


# -- key files and config --------------------------------------------------------------------


@pytest.mark.slow
async def test_readable_tls_client_key_files_are_warned_about(
    make_proxy: MakeProxy, tmp_path: Path, tls: Pki, logs: CapturedLogs,
) -> None:
    """tls_client_key_file readable by group or others, of a provider and of a route: a
    key_file_readable warning naming each config key; the key's PEM never in the log."""
    readable = tmp_path / "client-key.pem"
    readable.write_bytes(tls.proxy.key.read_bytes())
    readable.chmod(0o644)
    raw = proxy_config("https://api.example.com/", TOKEN, state_path=str(tmp_path / "s.json"))
    raw["providers"]["corp"] = {
        "type": "oauth2", "token_url": "https://127.0.0.1:9/token", "client_id": CLIENT_ID,
        "client_auth": "tls_client_auth", "tls_client_cert_file": str(tls.proxy.cert),
        "tls_client_key_file": str(readable)}
    raw["routes"][0].update({"tls_client_cert_file": str(tls.proxy.cert),
                             "tls_client_key_file": str(readable)})
    raw["routes"].append({"prefix": "/corp", "upstream": "https://corp.example.com/",
                          "provider": "corp"})
    await make_proxy(raw)
    await wait_for(lambda: len(logs.events("key_file_readable")) >= 2, "two warnings")
    keys = sorted(ev["key"] for ev in logs.events("key_file_readable"))
    assert ["providers.corp.tls_client_key_file", "routes[0].tls_client_key_file"] == keys
    pem = "".join(line for line in readable.read_text().splitlines()
                  if not line.startswith("-----"))
    assert_no_secret(logs.text, extra=[pem])


@pytest.mark.parametrize(("route", "key"), [
    ({"tls_client_cert_file": "{cert}"}, "routes[0].tls_client_key_file"),
    ({"tls_client_key_file": "{key}"}, "routes[0].tls_client_cert_file"),
    ({"tls_client_cert_file": "{nope}", "tls_client_key_file": "{key}"},
     "routes[0].tls_client_cert_file"),
    ({"tls_client_cert_file": "{cert}", "tls_client_key_file": "{nope}"},
     "routes[0].tls_client_key_file"),
    ({"tls_client_cert_file": "{key}", "tls_client_key_file": "{key}"},
     "routes[0].tls_client_cert_file"),
])
def test_route_client_certificate_problems_exit_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tls: Pki, route: dict[str, str],
    key: str,
) -> None:
    """A route's certificate without its key (or the other way), a missing file, or a
    file that is not a certificate: exit 2 with one line naming the key (first, or for a
    half-given pair, alongside its partner), no key content."""
    names = {"cert": str(tls.proxy.cert), "key": str(tls.proxy.key),
             "nope": str(tmp_path / "nope.pem")}
    raw = proxy_config("https://api.example.com/", TOKEN, state_path=str(tmp_path / "s.json"))
    raw["routes"][0].update({k: v.format(**names) for k, v in route.items()})
    assert 2 == main(["check-config", "-c", str(write_config(tmp_path / "cfg", raw))])
    out, err = capsys.readouterr()
    assert "" == out
    # The key path first; for a pair given half, either of the two, naming the other.
    assert err.startswith("tokenproxy: routes[0].tls_client_"), err
    assert key.split(".")[-1] in err, err
    assert 1 == len(err.splitlines())
    pem = "".join(line for line in tls.proxy.key.read_text().splitlines()
                  if not line.startswith("-----"))
    assert_no_secret(out, err, extra=[pem])


# -- certificate-bound tokens, end to end -----------------------------------------------------


@pytest.mark.slow
async def test_a_certificate_bound_token_is_presented_with_the_certificate_it_is_bound_to(
    aiohttp_server: AiohttpServer, issuers: StartIssuer, make_proxy: MakeProxy,
    fake_upstream: FakeUpstream, tmp_path: Path, http: aiohttp.ClientSession, tls: Pki,
) -> None:
    """RFC 8705 end to end: the token endpoint issues the token to the certificate of the
    tls_client_auth handshake; the upstream requires a client certificate and accepts the
    token only with the one it was issued to -- which the route presents."""
    issuer = await issuers(tls=mtls_context(tls.server, tls.proxy.ca))
    issuer.register(Client(CLIENT_ID, "tls_client_auth", cert_cn=tls.proxy.cn))
    server, peers = await mtls_upstream(aiohttp_server, fake_upstream, tls)
    raw = config(provider_at(issuer, tls.server.ca, client_id=CLIENT_ID,
                             client_auth="tls_client_auth", **client_cert(tls.proxy)),
                 f"https://127.0.0.1:{server.port}/", tmp_path)
    raw["routes"][0].update(ca_file=str(tls.server.ca), **client_cert(tls.proxy))
    daemon = await make_proxy(raw)
    await wait_ready(daemon)
    resp = await fetch(http, daemon, "/echo")
    assert 200 == resp.status, resp.text
    issued = issuer.check_bearer(bearer(fake_upstream.last))
    # The binding: the certificate the token was issued to is the one it came with.
    assert issued.call.peer_cn == peers[-1] == tls.proxy.cn


@pytest.mark.slow
async def test_an_intercepted_host_presents_its_client_certificate_to_the_upstream(
    aiohttp_server: AiohttpServer, make_proxy: MakeProxy, fake_upstream: FakeUpstream,
    tmp_path: Path, tls: Pki,
) -> None:
    """The forward proxy's intercept entries take the route keys: tls_client_cert_file and
    tls_client_key_file make the intercepted host's upstream connection mTLS; without them
    the upstream refuses the handshake (502)."""
    server, peers = await mtls_upstream(aiohttp_server, fake_upstream, tls)
    entry: dict[str, Any] = {"host": "127.0.0.1", "port": server.port, "provider": "api",
                             "ca_file": str(tls.server.ca)}
    answers = []
    for cert in (None, tls.proxy):
        raw = forward_config(tmp_path, Upstream(fake_upstream, tls.server, server.port, 0))
        raw["forward_proxy"]["intercept"] = [{**entry, **({} if cert is None
                                                          else client_cert(cert))}]
        daemon = await make_proxy(raw)
        ctx = ca_context(tmp_path)
        async with aiohttp.ClientSession() as s, s.get(
                f"https://127.0.0.1:{server.port}/echo", proxy=proxy_url(daemon),
                ssl=ctx) as resp:
            answers.append(resp.status)
        await daemon.stop()
    assert [502, 200] == answers
    assert [tls.proxy.cn] == peers
    assert [f"Bearer {TOKEN}"] == fake_upstream.last.header("Authorization")
