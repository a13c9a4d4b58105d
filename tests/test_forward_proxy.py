"""The forward-proxy listener (docs/forward-proxy.md): tools that honour HTTPS_PROXY get tokens
attached without changing their URLs. Real clients (curl, requests, aiohttp) trust the local
CA tokenproxy generates; the upstream is a real TLS server on 127.0.0.1 whose certificate a
CA of the test's own signed, reached by the name ``localhost``."""

from __future__ import annotations

import asyncio
import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests

from tests.helpers.config import MakeProxy
from tests.helpers.fakes import TOKEN, TOKEN_2
from tests.helpers.forward import (
    Upstream,
    ca_context,
    ca_file,
    forward_config,
    fport,
    get_via,
    proxy_url,
)
from tests.helpers.logs import CapturedLogs
from tests.helpers.metrics import count
from tokenproxy.config import build_config
from tokenproxy.errors import ConfigError


async def curl(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        "curl", "--silent", "--show-error", "--max-time", "10", "--noproxy", "",
        *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.mark.slow
async def test_curl_through_the_proxy_gets_the_token_attached(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """curl --proxy, trusting the generated CA: the upstream sees the token, not the
    placeholder the client sent, and curl gets the upstream's answer."""
    daemon = await make_proxy(forward_config(tmp_path, tls_upstream))
    code, out, err = await curl(
        "--proxy", proxy_url(daemon), "--cacert", str(ca_file(tmp_path)),
        "-H", "Authorization: Bearer placeholder",
        f"https://localhost:{tls_upstream.port}/echo?q=1")
    assert 0 == code, err
    seen = tls_upstream.fake.last
    assert [f"Bearer {TOKEN}"] == seen.header("Authorization")
    assert "/echo?q=1" == seen.raw_path
    assert '"raw_path": "/echo?q=1"' in out


@pytest.mark.slow
async def test_an_intercepted_request_is_in_the_access_log_under_its_entry(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path, logs: CapturedLogs,
) -> None:
    """One ``request`` line per intercepted request, as for a route: the entry's host as the
    route, the path without its query, the status."""
    daemon = await make_proxy(forward_config(tmp_path, tls_upstream))
    status, _ = await get_via(daemon, tmp_path,
                              f"https://localhost:{tls_upstream.port}/echo?secret-query=1")
    assert 200 == status
    [line] = [e for e in logs.events("request") if e.get("route") == "localhost"]
    assert ("GET", "/echo", 200) == (line["method"], line["path"], line["status"])
    assert "secret-query" not in logs.text


async def test_upstream_tls_is_verified_for_intercepted_hosts(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """Without the upstream's CA (no ca_file: the system roots), its certificate does not
    verify: 502, and the upstream never sees the request or the token."""
    raw = forward_config(tmp_path, tls_upstream)
    del raw["forward_proxy"]["intercept"][0]["ca_file"]
    daemon = await make_proxy(raw)
    status, text = await get_via(daemon, tmp_path, f"https://localhost:{tls_upstream.port}/echo")
    assert 502 == status
    assert "upstream_unreachable" in text
    assert [] == tls_upstream.fake.seen


@pytest.mark.slow
async def test_an_intercepted_ip_literal_gets_the_token(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """An entry naming an IP address: CONNECT 127.0.0.1:port is intercepted (the local CA
    signs for that address alone) and the upstream, verified by its IP SAN, gets the token."""
    raw = forward_config(tmp_path, tls_upstream)
    raw["forward_proxy"]["intercept"] = [{"host": "127.0.0.1", "port": tls_upstream.port,
                                          "provider": "api", "ca_file": str(tls_upstream.tls.ca)}]
    daemon = await make_proxy(raw)
    status, _ = await get_via(daemon, tmp_path, f"https://127.0.0.1:{tls_upstream.port}/echo")
    assert 200 == status
    assert [f"Bearer {TOKEN}"] == tls_upstream.fake.last.header("Authorization")


async def test_requests_and_aiohttp_through_the_proxy(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    daemon = await make_proxy(forward_config(tmp_path, tls_upstream))
    url = f"https://localhost:{tls_upstream.port}/echo"
    proxies = {"https": proxy_url(daemon), "http": proxy_url(daemon)}
    answer = await asyncio.to_thread(
        requests.post, url, data=b"body-bytes", proxies=proxies,
        verify=str(ca_file(tmp_path)), timeout=10)
    assert 200 == answer.status_code
    assert b"body-bytes" == tls_upstream.fake.last.body
    ctx = ca_context(tmp_path)
    async with aiohttp.ClientSession() as s, s.get(url, proxy=proxy_url(daemon),
                                                   ssl=ctx) as resp:
        assert 200 == resp.status
    assert [f"Bearer {TOKEN}"] == tls_upstream.fake.last.header("Authorization")


async def test_absolute_form_http_to_an_intercepted_host(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    daemon = await make_proxy(forward_config(tmp_path, tls_upstream))
    answer = await asyncio.to_thread(
        requests.get, f"http://localhost:{tls_upstream.plain_port}/status/201",
        proxies={"http": proxy_url(daemon)}, timeout=10)
    assert 201 == answer.status_code
    assert [f"Bearer {TOKEN}"] == tls_upstream.fake.last.header("Authorization")


async def test_a_tunnel_host_is_passed_through_without_a_token(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """CONNECT to a tunnel host: the client talks TLS with the upstream itself (its own
    certificate, verified by the client), and no token is added."""
    raw = forward_config(tmp_path, tls_upstream)
    raw["forward_proxy"]["intercept"] = raw["forward_proxy"]["intercept"][1:]
    raw["forward_proxy"]["tunnel"] = [f"localhost:{tls_upstream.port}"]
    daemon = await make_proxy(raw)
    answer = await asyncio.to_thread(
        requests.get, f"https://localhost:{tls_upstream.port}/echo",
        proxies={"https": proxy_url(daemon)}, verify=str(tls_upstream.tls.ca), timeout=10)
    assert 200 == answer.status_code
    assert [] == tls_upstream.fake.last.header("Authorization")


async def test_other_destinations_get_a_403_naming_the_host(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    daemon = await make_proxy(forward_config(tmp_path, tls_upstream))
    reader, writer = await asyncio.open_connection("127.0.0.1",
                                                   daemon.forward_listeners[0].port)
    try:
        writer.write(b"CONNECT example.org:443 HTTP/1.1\r\nHost: example.org:443\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"Tokenproxy-Error: forward_refused" in answer
    assert b"example.org:443 is neither intercepted nor tunnelled" in answer



@pytest.mark.slow
async def test_a_reload_changes_what_is_intercepted_and_makes_the_ca_again(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """The intercepted names are the CA's name constraints: a reload that changes them makes
    a new CA (which clients must trust anew) and serves the new list at once; a host no
    longer listed is refused. The forward listener stays where it was."""
    raw = forward_config(tmp_path, tls_upstream)
    daemon = await make_proxy(raw)
    port = daemon.forward_listeners[0].port
    first_ca = ca_file(tmp_path).read_bytes()
    moved = copy.deepcopy(raw)
    moved["forward_proxy"]["intercept"][0]["host"] = "127.0.0.1"
    changed = await daemon.reload(build_config(moved, {}))
    assert [] == changed["listen_added"]
    assert port == daemon.forward_listeners[0].port
    assert first_ca != ca_file(tmp_path).read_bytes()
    code, _, err = await curl(
        "--proxy", proxy_url(daemon), "--cacert", str(ca_file(tmp_path)),
        f"https://127.0.0.1:{tls_upstream.port}/echo")
    assert 0 == code, err
    assert [f"Bearer {TOKEN}"] == tls_upstream.fake.last.header("Authorization")
    code, _, err = await curl(
        "--proxy", proxy_url(daemon), "--cacert", str(ca_file(tmp_path)),
        f"https://localhost:{tls_upstream.port}/echo")
    assert 0 != code
    assert "403" in err


@pytest.mark.slow
async def test_a_reload_reaches_connections_already_open(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """An intercepted connection reads its host's route per request, as the main listener's
    connections do: after a reload, the next request on it carries the new token, and once
    the host is no longer intercepted, it is not served (404 not_found)."""
    raw = forward_config(tmp_path, tls_upstream)
    daemon = await make_proxy(raw)
    url = f"https://localhost:{tls_upstream.port}/echo"
    ctx = ca_context(tmp_path)
    connector = aiohttp.TCPConnector(limit=1)   # one connection, kept alive across the reload
    async with aiohttp.ClientSession(connector=connector) as s:
        async with s.get(url, proxy=proxy_url(daemon), ssl=ctx) as resp:
            assert 200 == resp.status
        renewed = copy.deepcopy(raw)
        renewed["providers"]["api"]["token"] = TOKEN_2
        await daemon.reload(build_config(renewed, {}))
        async with s.get(url, proxy=proxy_url(daemon), ssl=ctx) as resp:
            assert 200 == resp.status
        assert [f"Bearer {TOKEN_2}"] == tls_upstream.fake.last.header("Authorization")
        assert 1 == count(daemon, "tokenproxy_forward_connects_total", outcome="intercepted")
        gone = copy.deepcopy(renewed)
        gone["forward_proxy"]["intercept"] = gone["forward_proxy"]["intercept"][1:]
        await daemon.reload(build_config(gone, {}))
        seen = len(tls_upstream.fake.seen)
        async with s.get(url, proxy=proxy_url(daemon), ssl=ctx) as resp:
            assert (404, "not_found") == (resp.status, resp.headers["Tokenproxy-Error"])
        assert seen == len(tls_upstream.fake.seen)


@pytest.mark.slow
async def test_a_wildcard_entry_is_one_route_label_whatever_names_clients_ask_for(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """Metrics' labels stay bounded by the config: CONNECTs to made-up names under one
    wildcard entry count under the entry's pattern, not under each name."""
    raw = forward_config(tmp_path, tls_upstream)
    raw["forward_proxy"]["intercept"].append(
        {"host": "*.example.test", "port": tls_upstream.port, "provider": "api"})
    daemon = await make_proxy(raw)
    for n in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", fport(daemon))
        try:
            writer.write(f"CONNECT n{n}.example.test:{tls_upstream.port} HTTP/1.1\r\n"
                         f"Host: n{n}.example.test\r\n\r\n".encode())
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"HTTP/1.1 200")
            tls_reader, tls_writer = await asyncio.wait_for(asyncio.open_connection(
                sock=writer.get_extra_info("socket").dup(),
                ssl=ca_context(tmp_path),
                server_hostname=f"n{n}.example.test"), 5)
            tls_writer.write(f"GET /x HTTP/1.1\r\nHost: n{n}.example.test\r\n"
                             "Connection: close\r\n\r\n".encode())
            await asyncio.wait_for(tls_reader.read(), 10)
            tls_writer.close()
        finally:
            writer.close()
    routes = {s.labels["route"] for family in daemon.registry.collect()
              if family.name == "tokenproxy_requests" for s in family.samples}
    assert {"*.example.test"} == routes


# -- configuration -----------------------------------------------------------------------------


def _raw(forward: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {"state_path": "/var/lib/tp/state.json",
            "providers": {"api": {"type": "static", "token": TOKEN}},
            "routes": [{"prefix": "/", "upstream": "http://127.0.0.1:1/", "provider": "api"}],
            "forward_proxy": forward, **top}


API = {"host": "api.example.com", "provider": "api"}


@pytest.mark.parametrize(("forward", "top", "error"), [
    ({"listen": "0.0.0.0:3128", "intercept": [API]}, {},
     "forward_proxy.listen: 0.0.0.0:3128 is reachable from other hosts"),
    ({"intercept": [API], "ca": {"cert_file": "/x.pem"}}, {},
     "forward_proxy.ca: give cert_file and key_file together"),
    ({"intercept": [API], "tunnel": ["api.example.com"]}, {},
     "forward_proxy.tunnel: api.example.com:443 is intercepted too"),
    ({"intercept": [{**API, "host": "*.com"}]}, {}, "forward_proxy.intercept[0].host:"),
    ({"intercept": [{**API, "port": 80, "ca_file": "/etc/hostname"}]}, {},
     "forward_proxy.intercept[0].ca_file: a scheme: http entry has no TLS"),
    ({"intercept": [API, API]}, {}, "forward_proxy.intercept[1].host: api.example.com:443 is"),
    ({}, {}, "forward_proxy.intercept: list the hosts"),
    ({"intercept": [{**API, "provider": "nope"}]}, {},
     "forward_proxy.intercept[0].provider: no provider named 'nope'"),
    ({"intercept": [{**API, "port": 0}]}, {}, "forward_proxy.intercept[0].port:"),
    ({"tunnel": ["github.com:99999"]}, {}, "forward_proxy.tunnel[0]:"),
])
def test_bad_forward_proxy_settings_name_the_key(forward: dict[str, Any], top: dict[str, Any],
                                                 error: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(_raw(forward, **top), {})
    assert str(caught.value).startswith(error), str(caught.value)


def test_tunnel_entries_take_ipv6_with_or_without_a_port() -> None:
    cfg = build_config(_raw({"tunnel": ["[::1]:8443", "::1", "github.com", "x.org:22"]}), {})
    assert cfg.forward_proxy is not None
    assert (("::1", 8443), ("::1", 443), ("github.com", 443), ("x.org", 22)) == (
        cfg.forward_proxy.tunnel)


def test_a_reachable_forward_listener_with_a_client_key_is_accepted() -> None:
    cfg = build_config(_raw({"listen": "0.0.0.0:3128", "intercept": [API]},
                            security={"client_key": "k" * 24}), {})
    assert cfg.forward_proxy is not None
    assert "https" == cfg.forward_proxy.intercept[0].scheme
    port80 = build_config(_raw({"intercept": [{**API, "port": 80}]}), {})
    assert port80.forward_proxy is not None
    assert "http" == port80.forward_proxy.intercept[0].scheme


async def test_connect_to_a_plain_http_entry_is_refused(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """A scheme: http entry takes absolute-form requests only; a CONNECT to it would have
    tokenproxy speak TLS where the entry says there is none."""
    daemon = await make_proxy(forward_config(tmp_path, tls_upstream))
    reader, writer = await asyncio.open_connection("127.0.0.1", fport(daemon))
    try:
        writer.write(f"CONNECT localhost:{tls_upstream.plain_port} HTTP/1.1\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 403 ")


@pytest.mark.slow
async def test_an_idle_tunnel_is_closed_after_the_keepalive_timeout(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """A tunnel that carries nothing either way gives its connection slot back after
    limits.keepalive_timeout; one that carries bytes stays open."""
    raw = forward_config(tmp_path, tls_upstream, limits={"keepalive_timeout": "0.5s"})
    raw["forward_proxy"]["intercept"] = raw["forward_proxy"]["intercept"][1:]
    raw["forward_proxy"]["tunnel"] = [f"localhost:{tls_upstream.port}"]
    daemon = await make_proxy(raw)
    reader, writer = await asyncio.open_connection("127.0.0.1", fport(daemon))
    try:
        writer.write(f"CONNECT localhost:{tls_upstream.port} HTTP/1.1\r\n\r\n".encode())
        assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(
            b"HTTP/1.1 200")
        started = asyncio.get_running_loop().time()
        assert b"" == await asyncio.wait_for(reader.read(), 5)   # closed by tokenproxy
        took = asyncio.get_running_loop().time() - started
    finally:
        writer.close()
    assert 0.4 < took < 2.0


async def test_an_http_1_0_request_keeps_its_version_and_relayed_connects_are_refused(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """Absolute form: an HTTP/1.0 client gets an HTTP/1.0 answer, as on the main listener.
    A CONNECT that says it was relayed (Via, Forwarded) is refused like a relayed request."""
    daemon = await make_proxy(forward_config(tmp_path, tls_upstream))
    reader, writer = await asyncio.open_connection("127.0.0.1", fport(daemon))
    try:
        writer.write(f"GET http://localhost:{tls_upstream.plain_port}/status/200 HTTP/1.0\r\n"
                     f"Host: localhost:{tls_upstream.plain_port}\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.0 200 "), answer[:60]
    assert b"Transfer-Encoding: chunked" not in answer
    reader, writer = await asyncio.open_connection("127.0.0.1", fport(daemon))
    try:
        writer.write(f"CONNECT localhost:{tls_upstream.port} HTTP/1.1\r\n"
                     "Via: 1.1 another-proxy\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 403 ")
    assert b"Tokenproxy-Error: forwarded" in answer


@pytest.mark.slow
async def test_requests_and_aiohttp_find_the_proxy_and_the_ca_in_their_environment(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """Each client as a tool would be run: requests with only HTTPS_PROXY and
    REQUESTS_CA_BUNDLE set, aiohttp with trust_env and SSL_CERT_FILE, in a child process."""
    daemon = await make_proxy(forward_config(tmp_path, tls_upstream))
    url = f"https://localhost:{tls_upstream.port}/echo"
    env = {"PATH": os.environ.get("PATH", ""), "HTTPS_PROXY": proxy_url(daemon),
           "REQUESTS_CA_BUNDLE": str(ca_file(tmp_path)), "SSL_CERT_FILE": str(ca_file(tmp_path))}
    scripts = [
        f"import requests; print(requests.get({url!r}, timeout=10).status_code)",
        "import asyncio, aiohttp\n"
        "async def main():\n"
        "    async with aiohttp.ClientSession(trust_env=True) as s:\n"
        f"        async with s.get({url!r}) as r:\n"
        "            print(r.status)\n"
        "asyncio.run(main())",
    ]
    for script in scripts:
        before = len(tls_upstream.fake.seen)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE)
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert (0, "200") == (proc.returncode, out.decode().strip()), err.decode()
        assert len(tls_upstream.fake.seen) == before + 1
        assert [f"Bearer {TOKEN}"] == tls_upstream.fake.last.header("Authorization")
