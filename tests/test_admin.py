"""The admin listener: /healthz, /readyz and /metrics, kept apart from the proxied paths."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import prometheus_client
import pytest
import yaml
from aiohttp.test_utils import TestServer
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.client import Answer
from tests.helpers.config import MakeProxy, proxy_config, upstream_url, write_config
from tests.helpers.daemon_proc import run_to_exit, running_daemon
from tests.helpers.fakes import (
    CLIENT_KEY,
    PASSWORD,
    REFRESH_TOKEN,
    SECRETS,
    TOKEN,
    TOKEN_2,
    FakeUpstream,
)
from tests.helpers.logs import CapturedLogs
from tests.helpers.net import stall
from tests.helpers.rawhttp import RawConnection, assert_problem, exchange, first_answer, get
from tests.helpers.rawupstream import connected
from tokenproxy import __version__
from tokenproxy.cli import summary
from tokenproxy.config import build_config
from tokenproxy.daemon import ADMIN_MAX_CONNECTIONS, Daemon
from tokenproxy.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent

# The documented metrics (docs/metrics.md), with the type each must have.
DOCUMENTED_METRICS = {
    "tokenproxy_requests_total": "counter",
    "tokenproxy_request_duration_seconds": "histogram",
    "tokenproxy_upstream_errors_total": "counter",
    "tokenproxy_auth_retries_total": "counter",
    "tokenproxy_token_refresh_total": "counter",
    "tokenproxy_token_refresh_duration_seconds": "histogram",
    "tokenproxy_token_refresh_coalesced_total": "counter",
    "tokenproxy_token_expiry_timestamp_seconds": "gauge",
    "tokenproxy_provider_authenticated": "gauge",
    "tokenproxy_inflight_requests": "gauge",
    "tokenproxy_build_info": "gauge",
}
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


async def call(method: str, port: int, path: str, headers: dict[str, str] | None = None
               ) -> Answer:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, f"http://127.0.0.1:{port}{path}", headers=headers) as resp,
    ):
        return Answer(resp.status, resp.headers, await resp.read())


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a Prometheus text exposition, keyed by name and label set."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


@pytest.fixture(name="daemon")
async def _daemon(make_proxy: MakeProxy, upstream: TestServer) -> Daemon:
    """A daemon whose single route "/" leads to the fake upstream's /echo/ tree."""
    return await make_proxy(proxy_config(upstream_url(upstream, "/echo/"), TOKEN))


async def test_healthz_is_200(daemon: Daemon) -> None:
    """GET and HEAD /healthz answer 200 while the daemon serves."""
    got = await call("GET", daemon.admin_port, "/healthz")
    head = await call("HEAD", daemon.admin_port, "/healthz")
    assert 200 == got.status
    assert {"status": "ok"} == got.json()
    assert "no-store" == got.headers["Cache-Control"]
    assert (200, b"") == (head.status, head.body)


async def test_readyz_reports_each_provider(daemon: Daemon) -> None:
    """/readyz is 200 with a JSON state per provider once a static provider has its token."""
    got = await call("GET", daemon.admin_port, "/readyz")
    assert 200 == got.status
    assert "application/json" == got.headers["Content-Type"].split(";")[0]
    doc = got.json()
    assert "ready" == doc["status"]
    assert ["api"] == list(doc["providers"])
    assert {"type": "static", "state": "valid"} == {
        k: doc["providers"]["api"][k] for k in ("type", "state")}
    assert TOKEN not in got.text


async def test_metrics_text_format_has_every_spec_metric(daemon: Daemon) -> None:
    """/metrics speaks Prometheus text 0.0.4 and exposes every documented metric with its type."""
    assert 200 == (await call("GET", daemon.port(), "/x")).status
    got = await call("GET", daemon.admin_port, "/metrics")
    assert 200 == got.status
    assert got.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    types = {f.name: f.type for f in text_string_to_metric_families(got.text)}
    for name, kind in DOCUMENTED_METRICS.items():
        family = name.removesuffix("_total") if kind == "counter" else name
        assert kind == types.get(family), name
        assert f"# TYPE {name} {kind}\n" in got.text
    text = got.text
    assert 1.0 == value(text, "tokenproxy_build_info", version=__version__)
    assert 1.0 == value(text, "tokenproxy_provider_authenticated", provider="api")
    assert 1.0 == value(text, "tokenproxy_requests_total", route="/", method="GET", code="200")
    assert 1.0 == value(text, "tokenproxy_request_duration_seconds_count", route="/")
    assert 0.0 == value(text, "tokenproxy_inflight_requests")


async def test_metrics_openmetrics_when_asked(daemon: Daemon) -> None:
    """An OpenMetrics Accept header gets the OpenMetrics format, ending in # EOF."""
    got = await call("GET", daemon.admin_port, "/metrics",
                     headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert 200 == got.status
    assert got.headers["Content-Type"].startswith(OPENMETRICS)
    assert got.text.endswith("# EOF\n")
    names = {f.name for f in openmetrics_families(got.text)}  # type: ignore[no-untyped-call]
    assert {"tokenproxy_requests", "tokenproxy_build_info"} <= names


@pytest.mark.parametrize("path", ["/", "/nope", "/metrics/x", "/healthz/", "/echo/x"])
async def test_unknown_admin_path_is_404(
    daemon: Daemon, fake_upstream: FakeUpstream, path: str
) -> None:
    """Any other admin path is 404, and the admin port never forwards to an upstream."""
    got = await call("GET", daemon.admin_port, path)
    assert 404 == got.status
    assert [] == fake_upstream.seen


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
@pytest.mark.parametrize("path", ["/metrics", "/healthz", "/readyz"])
async def test_other_methods_are_405(daemon: Daemon, method: str, path: str) -> None:
    """Admin paths take GET and HEAD only: other methods get 405 with an Allow header."""
    got = await call(method, daemon.admin_port, path)
    assert 405 == got.status
    assert "GET, HEAD" == got.headers.get("Allow")


async def test_proxy_port_proxies_metrics_path(daemon: Daemon, fake_upstream: FakeUpstream
                                                ) -> None:
    """/metrics on the proxy port is an ordinary proxied path, not tokenproxy's metrics."""
    got = await call("GET", daemon.port(), "/metrics")
    assert 200 == got.status
    assert "/echo/metrics" == got.json()["raw_path"]
    assert "tokenproxy_" not in got.text
    assert ["/echo/metrics"] == [s.raw_path for s in fake_upstream.seen]


async def test_two_daemons_have_their_own_registries(
    make_proxy: MakeProxy, upstream: TestServer
) -> None:
    """Daemons in one process count separately, and none registers on the global registry."""
    raw = proxy_config(upstream_url(upstream, "/echo/"), TOKEN)
    first = await make_proxy(raw)
    # The default (no registry passed), twice: a global registry would raise
    # DuplicateTimeseries here.
    others = [Daemon(build_config(raw, {})), Daemon(build_config(raw, {}))]
    try:
        for other in others:
            await other.start()
        for n, d in enumerate([first, *others], start=1):
            for _ in range(n):
                assert 200 == (await call("GET", d.port(), "/a")).status
        counts = []
        for d in [first, *others]:
            text = (await call("GET", d.admin_port, "/metrics")).text
            counts.append(value(text, "tokenproxy_requests_total", route="/", method="GET",
                                code="200"))
    finally:
        for other in others:
            await other.stop(grace=1)
    assert [1.0, 2.0, 3.0] == counts
    assert prometheus_client.REGISTRY.get_sample_value(
        "tokenproxy_build_info", {"version": __version__}) is None


async def test_no_secret_or_query_in_metric_labels(
    make_proxy: MakeProxy, upstream: TestServer
) -> None:
    """After requests with secrets in queries and headers, no label carries them, nor a path."""
    daemon = await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN,
                                           security={"client_key": CLIENT_KEY}))
    key = {"Tokenproxy-Key": CLIENT_KEY}
    requests = [
        ("GET", f"/echo/a?token={TOKEN_2}", key),
        ("POST", f"/echo/d?refresh_token={REFRESH_TOKEN}&access_token={TOKEN_2}", key),
        ("PROPFIND", f"/echo/b?password={PASSWORD}", key),
        ("GET", f"/status/401?token={TOKEN_2}", key),
        ("GET", f"/echo/c?token={TOKEN_2}", {"Tokenproxy-Key": "wrong-key-value"}),
    ]
    statuses = [(await call(m, daemon.port(), p, headers=h)).status for m, p, h in requests]
    assert [200, 200, 200, 401, 403] == statuses
    text = (await call("GET", daemon.admin_port, "/metrics")).text
    om = (await call("GET", daemon.admin_port, "/metrics",
                     headers={"Accept": "application/openmetrics-text"})).text
    for exposition in (text, om):
        assert [] == [s for s in (*SECRETS, "wrong-key-value") if s in exposition]
        assert "token=" not in exposition
        assert "/echo" not in exposition
    labels = {(k, v) for (_, ls) in samples(text) for k, v in ls}
    assert [] == [(k, v) for k, v in labels if "?" in v or "=" in v]
    assert {"/", "-"} >= {v for k, v in labels if k == "route"}
    assert {"GET", "POST", "OTHER"} == {v for k, v in labels if k == "method"}


# ---------------------------------------------------------------- Host allowlist


def admin_only_config(upstream: TestServer, **security: Any) -> dict[str, Any]:
    raw = proxy_config(upstream_url(upstream, "/echo/"), TOKEN)
    if security:
        raw["security"] = security
    return raw


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics", "/nope"])
@pytest.mark.parametrize("host", ["evil.example", "evil.example:9100", "localhost.evil.example",
                                  "[::1].evil.example", "127.0.0.1.nip.io:9100"])
async def test_foreign_host_is_403_forbidden_host(daemon: Daemon, path: str, host: str) -> None:
    """A DNS-rebinding page (Host: its own name) reads nothing: 403 forbidden_host, as the
    proxy listener answers, with no provider name, error text or metric in the body."""
    resp = await first_answer(daemon.admin_port, get(path, host))
    assert_problem(resp, 403, "forbidden_host")
    assert "no-store" == resp.get("Cache-Control")
    assert b"api" not in resp.body
    assert b"tokenproxy_" not in resp.body
    assert resp.get("Server") is None


async def test_foreign_host_is_refused_before_the_method(daemon: Daemon) -> None:
    """The Host check comes first: a refused Host learns nothing about paths or methods."""
    resp = await first_answer(daemon.admin_port, get("/metrics", "evil.example", method="POST"))
    assert_problem(resp, 403, "forbidden_host")


@pytest.mark.parametrize(
    "head",
    [get("/readyz", None, version="HTTP/1.0"), b"GET /readyz\r\n\r\n", get("/readyz", "")],
    ids=["missing-1.0", "http-0.9", "empty"],
)
async def test_missing_host_is_403(daemon: Daemon, head: bytes) -> None:
    """As on the proxy listener: no Host (HTTP/1.0 and 0.9 may omit it) is no allowed host."""
    resp = await first_answer(daemon.admin_port, head)
    assert_problem(resp, 403, "forbidden_host")


@pytest.mark.parametrize(
    "head",
    [get("/readyz", "localhost", "Host: localhost"),
     get("/readyz", "localhost", "Host: evil.example"),
     get("/readyz", "evil.example", "Host: localhost"),
     get("/readyz", None)],
    ids=["repeated-same", "repeated-allowed-first", "repeated-allowed-last", "missing-1.1"],
)
async def test_repeated_host_or_none_in_http11_is_400(daemon: Daemon, head: bytes) -> None:
    """As on the proxy listener: two Host headers, or none in HTTP/1.1, are malformed (400,
    connection closed), whichever of them is allowed."""
    resp, closed = await exchange(daemon.admin_port, head)
    assert_problem(resp, 400, "bad_request")
    assert closed
    assert b"api" not in resp.body


@pytest.mark.parametrize("host", ["localhost", "localhost:9100", "LocalHost:9100", "127.0.0.1",
                                  "127.0.0.1:9100", "[::1]:9100", "[::1]"])
async def test_loopback_hosts_are_served(daemon: Daemon, host: str) -> None:
    """The default allowlist (localhost, 127.0.0.1, ::1, any port) reaches every path."""
    for path in ("/healthz", "/readyz", "/metrics"):
        resp = await first_answer(daemon.admin_port, get(path, host))
        assert 200 == resp.status, path


async def test_admin_allowed_hosts_apply_to_the_admin_listener_only(
    make_proxy: MakeProxy, upstream: TestServer
) -> None:
    """security.admin_allowed_hosts opens the admin listener to a scraper's Host (a pod IP)
    without widening the proxy listener's own allowed_hosts."""
    daemon = await make_proxy(admin_only_config(upstream, admin_allowed_hosts=["10.1.2.3"]))
    admin, proxy = daemon.admin_port, daemon.port()
    assert 200 == (await first_answer(admin, get("/metrics", "10.1.2.3:9100"))).status
    assert_problem((await first_answer(admin, get("/metrics", "localhost"))), 403,
                   "forbidden_host")
    assert_problem((await first_answer(proxy, get("/x", "10.1.2.3"))), 403, "forbidden_host")
    assert 200 == (await call("GET", proxy, "/x")).status


async def test_admin_hosts_default_to_allowed_hosts(
    make_proxy: MakeProxy, upstream: TestServer
) -> None:
    """Without admin_allowed_hosts the admin listener follows security.allowed_hosts."""
    daemon = await make_proxy(admin_only_config(upstream, allowed_hosts=["api.internal"]))
    assert 200 == (await first_answer(daemon.admin_port, get("/healthz", "api.internal"))).status
    assert_problem((await first_answer(daemon.admin_port, get("/healthz", "localhost"))), 403,
                   "forbidden_host")


async def test_admin_allowed_hosts_star_turns_the_check_off(
    make_proxy: MakeProxy, upstream: TestServer
) -> None:
    """admin_allowed_hosts "*": any Host, or none, reaches the admin paths; the proxy listener
    keeps its default allowlist."""
    daemon = await make_proxy(admin_only_config(upstream, admin_allowed_hosts="*"))
    for head in (get("/healthz", "10.9.8.7:9100"), get("/healthz", None, version="HTTP/1.0")):
        assert 200 == (await first_answer(daemon.admin_port, head)).status
    assert_problem((await first_answer(daemon.port(), get("/x", "evil.example"))), 403,
                   "forbidden_host")


async def test_reload_applies_admin_allowed_hosts(
    make_proxy: MakeProxy, upstream: TestServer
) -> None:
    """A reload changes the admin allowlist for connections already open and new ones."""
    daemon = await make_proxy(admin_only_config(upstream))
    async with connected(daemon.admin_port) as conn:
        await conn.send(get("/healthz", "10.1.2.3"))
        assert_problem(await conn.response(), 403, "forbidden_host")
        await daemon.reload(build_config(
            admin_only_config(upstream, admin_allowed_hosts=["10.1.2.3"]), {}))
        await conn.send(get("/healthz", "10.1.2.3"))
        assert 200 == (await conn.response()).status
        await conn.send(get("/healthz", "localhost"))
        assert_problem(await conn.response(), 403, "forbidden_host")
    resp = await first_answer(daemon.admin_port, get("/healthz", "10.1.2.3"))
    assert 200 == resp.status


@pytest.mark.slow
@pytest.mark.parametrize(("host", "status"), [
    ("localhost", 200), ("LOCALHOST:9100", 200), ("[::1]:9100", 200), ("127.0.0.1", 200),
    ("localhost.", 403), ("127.0.0.1.", 403), ("[::ffff:127.0.0.1]", 403), ("127.1", 403),
    ("localhost:9100:80", 403), ("[::1].evil.example", 403), ("evil.example, localhost", 403),
    ("localhost@evil.example", 403), ("evil.example#localhost", 403), ("0x7f.0.0.1", 403),
])
async def test_admin_host_spellings(make_proxy: MakeProxy, upstream: TestServer, host: str,
                                    status: int) -> None:
    """Only exact loopback spellings reach the admin paths; trailing dots, mapped and
    short IPv4 forms, extra ports and userinfo are refused."""
    daemon = await make_proxy(proxy_config(upstream_url(upstream, "/echo/"), TOKEN))
    resp = await first_answer(daemon.admin_port, get("/metrics", host))
    assert status == resp.status


@pytest.mark.parametrize("head", [
    b"GET http://localhost/metrics HTTP/1.1\r\nHost: evil.example\r\n\r\n",
    b"GET http://evil.example/metrics HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /metrics HTTP/1.0\r\n\r\n",
    b"GET //localhost/metrics HTTP/1.1\r\nHost: evil.example\r\n\r\n",
])
async def test_admin_absolute_form_and_missing_host_reveal_nothing(
    make_proxy: MakeProxy, upstream: TestServer, head: bytes
) -> None:
    """An absolute-form target neither replaces a foreign Host nor reaches a path
    under an allowed one; HTTP/1.0 without Host is refused."""
    daemon = await make_proxy(proxy_config(upstream_url(upstream, "/echo/"), TOKEN))
    resp = await first_answer(daemon.admin_port, head)
    assert resp.status in (400, 403, 404)
    assert b"tokenproxy_requests_total" not in resp.body


# ---------------------------------------------------------------- exposed admin listener


def config_base(**top: Any) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "providers": {"api": {"type": "static", "token": TOKEN}},
        "routes": [{"prefix": "/", "upstream": "https://api.example.com/", "provider": "api"}],
    }
    raw.update(top)
    return raw


def config_error(raw: dict[str, Any], env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(raw, env or {})
    return str(info.value)


@pytest.mark.parametrize("admin", ["0.0.0.0:9100", "[::]:9100", "192.0.2.1:9100",
                                   "pod.example:9100"])
@pytest.mark.parametrize(
    "security",
    [None, {"allowed_hosts": ["proxy.internal"]}, {"allowed_hosts": "*"},
     {"client_key": CLIENT_KEY}],
    ids=["defaults", "allowed_hosts", "allowed_hosts-star", "client_key"],
)
def test_exposed_admin_listen_needs_admin_allowed_hosts(
    admin: str, security: dict[str, Any] | None
) -> None:
    """A non-loopback admin_listen is refused unless security.admin_allowed_hosts is set: the
    proxy listener's settings (even "*" or a client key, which the admin paths do not check)
    do not count. The one-line message names the key and says how to allow probes."""
    raw = config_base(admin_listen=admin)
    if security is not None:
        raw["security"] = security
    msg = config_error(raw)
    assert msg.startswith(f"admin_listen: {admin} ")
    assert "security.admin_allowed_hosts" in msg
    assert '"*"' in msg
    assert "pod IP" in msg
    assert 1 == len(msg.splitlines())
    assert CLIENT_KEY not in msg


@pytest.mark.parametrize("hosts", [["10.1.2.3"], "*", ["*"], ["${POD_IP}", "localhost"]])
def test_exposed_admin_listen_accepted_with_admin_allowed_hosts(hosts: object) -> None:
    """An explicit admin_allowed_hosts (names, "*", or the pod IP from the environment) makes a
    non-loopback admin listener acceptable, and leaves allowed_hosts as it was."""
    cfg = build_config(config_base(admin_listen="0.0.0.0:9100",
                                   security={"admin_allowed_hosts": hosts}),
                       {"POD_IP": "10.1.2.3"})
    assert "0.0.0.0:9100" == str(cfg.admin_listen)
    assert frozenset({"localhost", "127.0.0.1", "::1"}) == cfg.security.allowed_hosts
    admin_hosts = cfg.security.admin_hosts
    assert admin_hosts is None if "*" in hosts else "10.1.2.3" in (admin_hosts or ())


@pytest.mark.parametrize("admin", ["127.0.0.1:9100", "localhost:9100", "[::1]:9100",
                                   "127.0.0.2:9100", "unix:/run/tp-admin.sock", None])
def test_loopback_admin_listen_needs_nothing(admin: str | None) -> None:
    """Loopback, unix-socket and disabled admin listeners need no admin_allowed_hosts."""
    cfg = build_config(config_base(admin_listen=admin), {})
    assert cfg.security.admin_hosts == cfg.security.allowed_hosts


def test_admin_allowed_hosts_normalised_like_allowed_hosts() -> None:
    """admin_allowed_hosts are lower-cased without brackets, like allowed_hosts."""
    cfg = build_config(config_base(security={"admin_allowed_hosts": ["Pod.Internal", "[FD00::1]"]}),
                       {})
    assert frozenset({"pod.internal", "fd00::1"}) == cfg.security.admin_hosts


@pytest.mark.parametrize("hosts", [[], [""], ["  "], [5], {"a": 1}])
def test_bad_admin_allowed_hosts_named(hosts: object) -> None:
    """A bad admin_allowed_hosts names its key."""
    msg = config_error(config_base(security={"admin_allowed_hosts": hosts}))
    assert msg.startswith("security.admin_allowed_hosts: expected a list of host names")


def test_unknown_security_key_still_refused() -> None:
    """A typo of the new key is an unknown key, not silently ignored."""
    msg = config_error(config_base(admin_listen="0.0.0.0:9100",
                                   security={"admin_allowed_host": ["10.1.2.3"]}))
    assert ("security.admin_allowed_host: unknown key (did you mean "
            "'admin_allowed_hosts'?)") == msg


@pytest.mark.slow
@pytest.mark.parametrize("command", ["check-config", "run"])
def test_exposed_admin_listen_exits_2_with_one_line(tmp_path: Path, command: str) -> None:
    """check-config and run refuse 0.0.0.0:9100 with exit 2 and one stderr line."""
    path = write_config(tmp_path, config_base(admin_listen="0.0.0.0:9100"))
    # A child process: a `run` that wrongly accepted the file would serve until killed.
    result = run_to_exit([command, "-c", str(path)], tmp_path)
    assert (2, "") == (result.returncode, result.stdout)
    assert 1 == len(result.stderr.splitlines())
    assert result.stderr.startswith("tokenproxy: admin_listen: 0.0.0.0:9100 ")
    assert "security.admin_allowed_hosts" in result.stderr


def test_check_config_summary_shows_admin_allowed_hosts(tmp_path: Path) -> None:
    """check-config's security line shows the admin allowlist in force."""
    exposed = build_config(config_base(admin_listen="0.0.0.0:9100",
                                       security={"admin_allowed_hosts": ["10.1.2.3", "b"]}), {})
    star = build_config(config_base(security={"admin_allowed_hosts": "*"}), {})
    default = build_config(config_base(security={"allowed_hosts": ["x.internal"]}), {})
    [line] = [li for li in summary(exposed) if li.startswith("security: ")]
    assert " admin_allowed_hosts=10.1.2.3,b " in line
    assert " admin_allowed_hosts=* " in next(li for li in summary(star) if "security" in li)
    assert " admin_allowed_hosts=x.internal " in next(
        li for li in summary(default) if "security" in li)


def test_config_example_lists_admin_allowed_hosts() -> None:
    """config.example.yaml lists the key with its default (null: the same as allowed_hosts)."""
    raw = yaml.safe_load((REPO / "config.example.yaml").read_text(encoding="utf-8"))
    assert "admin_allowed_hosts" in raw["security"]
    assert raw["security"]["admin_allowed_hosts"] is None


# ---------------------------------------------------------------- probes under a full cap

PROBE_BOUND = 1.0
HALF_HEAD = b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n"


async def probe_healthz(port: int) -> None:
    """A liveness probe: GET /healthz on a new connection, answered 200 within PROBE_BOUND."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    resp = await first_answer(port, get("/healthz", "127.0.0.1:9100"), timeout=PROBE_BOUND)
    assert 200 == resp.status
    assert loop.time() - started < PROBE_BOUND


async def open_idle(port: int, keepalive: int, half_head: int, silent: int
                    ) -> list[RawConnection]:
    """Connections that hold a slot without a request in progress: keep-alive ones after a
    request, ones that sent half a head, and ones that sent nothing."""
    conns: list[RawConnection] = []
    for _ in range(keepalive):
        conns.append(conn := await RawConnection.open(port))
        await conn.send(get("/healthz"))
        assert 200 == (await conn.response()).status
    for _ in range(half_head):
        conns.append(conn := await RawConnection.open(port))
        await conn.send(HALF_HEAD)
    for _ in range(silent):
        conns.append(await RawConnection.open(port))
    return conns


async def close_all(conns: list[RawConnection]) -> None:
    await asyncio.gather(*(conn.close() for conn in conns))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("keepalive", "half_head", "silent"),
    [(ADMIN_MAX_CONNECTIONS, 0, 0), (0, ADMIN_MAX_CONNECTIONS, 0),
     (0, 0, ADMIN_MAX_CONNECTIONS), (ADMIN_MAX_CONNECTIONS, 68, 68)],
    ids=["64-keepalive", "64-half-head", "64-silent", "200-mixed"],
)
async def test_healthz_answers_while_idle_clients_hold_every_slot(
    daemon: Daemon, keepalive: int, half_head: int, silent: int
) -> None:
    """Idle clients holding every admin connection slot (and more waiting) cannot starve the
    liveness probe: each /healthz is answered within a second, again and again."""
    conns = await open_idle(daemon.admin_port, keepalive, half_head, silent)
    try:
        for _ in range(5):
            await probe_healthz(daemon.admin_port)
    finally:
        await close_all(conns)


@pytest.mark.slow
async def test_connection_idle_longest_makes_room(daemon: Daemon, logs: CapturedLogs) -> None:
    """When the cap is full and a client waits, the connection idle longest is closed, only
    that one, and only then: a connection that just finished a request is idle since then."""
    conns = await open_idle(daemon.admin_port, ADMIN_MAX_CONNECTIONS, 0, 0)
    try:
        await conns[0].send(get("/healthz"))
        assert 200 == (await conns[0].response()).status
        # Nobody waits: every idle connection stays.
        assert [None] * len(conns) == await asyncio.gather(
            *(conn.wait_closed(0.2) for conn in conns))
        await probe_healthz(daemon.admin_port)
        closed = await asyncio.gather(*(conn.wait_closed(0.2) for conn in conns))
        assert [1] == [i for i, at in enumerate(closed) if at is not None]
        assert b"" == conns[1].trailing
    finally:
        await close_all(conns)
    [event] = logs.events("idle_connection_closed")
    assert ("warning", ADMIN_MAX_CONNECTIONS) == (event["level"], event["limit"])


@pytest.mark.slow
async def test_a_request_whose_body_never_comes_frees_its_connection(daemon: Daemon) -> None:
    """The admin listener does not wait for a body nobody needs (aiohttp would read it for
    10 s after the answer, holding a slot): that connection closes after its answer, and a
    probe then takes its slot without any other connection being closed."""
    conns = await open_idle(daemon.admin_port, 0, 0, ADMIN_MAX_CONNECTIONS)
    try:
        await conns[0].send(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n"
                            b"Content-Length: 5\r\n\r\n")
        assert 200 == (await conns[0].response()).status
        assert await conns[0].wait_closed(1.0) is not None
        await probe_healthz(daemon.admin_port)
        closed = await asyncio.gather(*(conn.wait_closed(0.2) for conn in conns[1:]))
        assert [] == [i for i, at in enumerate(closed) if at is not None]
    finally:
        await close_all(conns)


# Short timers: the admin gate must make room for a probe before any send timeout does.
HEAD_TIMERS = {"header_timeout": "0.3s", "keepalive_timeout": "0.3s"}


@pytest.mark.slow
async def test_admin_probe_answered_while_clients_that_never_read_hold_every_slot(
    make_proxy: MakeProxy, upstream: TestServer, closing: list[socket.socket]
) -> None:
    """64 connections each pipeline /metrics requests and never read. Every answer after the
    first few kilobytes waits for the client to drain it (GuardedRequestHandler.finish_response,
    proxy/aiohttp_path/protocol.py), so each connection has "a request to handle":
    header_timeout and keepalive_timeout do not apply, and were such a connection never idle
    to ConnectionGate, /healthz would wait in the backlog indefinitely (a liveness probe
    fails, the container is restarted). A connection whose answer waits on the client counts
    as idle, and send_timeout ends it."""
    daemon = await make_proxy(proxy_config(upstream_url(upstream, "/echo/"), TOKEN,
                                           limits=HEAD_TIMERS))
    port = daemon.admin_port
    for _ in range(ADMIN_MAX_CONNECTIONS):
        closing.append(await stall(port, get("/metrics"), 300))
    await asyncio.sleep(1.0)   # > header_timeout and keepalive_timeout: no timer frees a slot
    assert daemon._serving is not None
    busy = [h for h in daemon._serving.admin_server.connections if h.idle_since() is None]
    started = time.monotonic()
    try:
        resp = await first_answer(port, get("/healthz", "127.0.0.1:9100"), timeout=2.0)
        status: int | None = resp.status
    except TimeoutError:
        status = None
    assert (200, True) == (status, time.monotonic() - started < 2.0), (
        f"/healthz unanswered: {len(busy)} of {ADMIN_MAX_CONNECTIONS} admin connections "
        "are stuck draining answers to clients that do not read")


LINGERING = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\n"


async def test_admin_probe_does_not_wait_behind_requests_whose_body_never_comes(
    make_proxy: MakeProxy, upstream: TestServer
) -> None:
    """A request whose body never comes would make its connection busy (aiohttp's lingering
    read, 10 s) and so never chosen by the gate: 64 of them, each a single head, would keep
    /healthz waiting beyond a probe's 1 s timeout, and re-queued connections (the backlog is
    first-in first-out) keep it up. The admin listener closes such a connection after its
    answer instead. Meanwhile the gate does not spin."""
    daemon = await make_proxy(proxy_config(upstream_url(upstream, "/echo/"), TOKEN))
    port = daemon.admin_port
    conns = [await RawConnection.open(port) for _ in range(ADMIN_MAX_CONNECTIONS)]
    try:
        for conn in conns:
            await conn.send(LINGERING)
        for conn in conns:
            assert 200 == (await conn.response()).status
        cpu = time.process_time()
        try:
            resp = await first_answer(port, get("/healthz", "127.0.0.1:9100"), timeout=1.0)
            status: int | None = resp.status
        except TimeoutError:
            status = None
        spent = time.process_time() - cpu
    finally:
        await asyncio.gather(*(conn.close() for conn in conns))
    assert spent < 0.3, f"the full gate burnt {spent:.2f} s of CPU in 1 s"
    assert 200 == status, "/healthz unanswered behind 64 one-line requests"


@pytest.mark.slow
async def test_probes_answered_under_uvloop_daemon(tmp_path: Path) -> None:
    """The same in a real `tokenproxy run` process (uvloop): 200 idle clients, probes served."""
    raw = proxy_config("http://127.0.0.1:1/", TOKEN)
    async with running_daemon(raw, tmp_path) as proc:
        conns = await open_idle(proc.admin_port, ADMIN_MAX_CONNECTIONS, 68, 68)
        try:
            for _ in range(5):
                await probe_healthz(proc.admin_port)
        finally:
            await close_all(conns)


@pytest.mark.slow
@pytest.mark.both_paths
async def test_proxy_listener_cap_still_keeps_idle_connections(
    make_proxy: MakeProxy, upstream: TestServer
) -> None:
    """Only the admin listener makes room: at the proxy's max_connections an idle keep-alive
    client keeps its connection and a new client waits in the backlog, on either path."""
    daemon = await make_proxy(proxy_config(upstream_url(upstream, "/status/"), TOKEN,
                                           limits={"max_connections": 2}))
    idle = [await RawConnection.open(daemon.port()) for _ in range(2)]
    waiting = await RawConnection.open(daemon.port())
    try:
        for conn in idle:
            await conn.send(get("/200"))
            assert 200 == (await conn.response()).status
        await waiting.send(get("/201"))
        with pytest.raises(TimeoutError):
            await waiting.response(timeout=0.5)
        assert [None, None] == [await conn.wait_closed(0.05) for conn in idle]
        await idle[0].close()
        assert 201 == (await waiting.response()).status
    finally:
        await close_all([*idle, waiting])
