"""The admin listener: /healthz, /readyz and /metrics, kept apart from the proxied paths."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import prometheus_client
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDictProxy
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import MakeProxy, proxy_config, upstream_url
from tests.fakes import CLIENT_KEY, PASSWORD, REFRESH_TOKEN, SECRETS, TOKEN, TOKEN_2, FakeUpstream
from tokenproxy import __version__
from tokenproxy.app import Daemon
from tokenproxy.config import build_config

# SPEC.md section 6, with the type each must have.
SPEC_METRICS = {
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


class Answer:
    def __init__(self, status: int, headers: CIMultiDictProxy[str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode()

    def json(self) -> Any:
        return json.loads(self.body)


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
    """/metrics speaks Prometheus text 0.0.4 and exposes every SPEC.md metric with its type."""
    assert 200 == (await call("GET", daemon.port(), "/x")).status
    got = await call("GET", daemon.admin_port, "/metrics")
    assert 200 == got.status
    assert got.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    types = {f.name: f.type for f in text_string_to_metric_families(got.text)}
    for name, kind in SPEC_METRICS.items():
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
