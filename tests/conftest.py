"""Shared fixtures: the log sweep, a fake upstream, and a real tokenproxy daemon in-process."""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from pytest_aiohttp import AiohttpServer

from tests.fakes import SECRETS, FakeClock, FakeUpstream
from tokenproxy import log
from tokenproxy.config import build_config
from tokenproxy.daemon import Daemon


class CapturedLogs:
    """Every log line the test produced, as text and as parsed JSON events."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.redactor = log.Redactor()

    @property
    def text(self) -> str:
        log.flush()   # lines are batched per event-loop turn (log.BatchedWriter)
        return self.stream.getvalue()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.text.splitlines():
            if line.strip():
                ev = json.loads(line)
                if name is None or ev.get("event") == name:
                    out.append(ev)
        return out


@pytest.fixture(autouse=True, name="logs")
def _logs() -> Iterator[CapturedLogs]:
    """Capture all logs; fail the test if any secret of tests/fakes.py shows up in them."""
    captured = CapturedLogs()
    log.configure("debug", "json", redactor=captured.redactor, stream=captured.stream)
    yield captured
    leaked = [s for s in SECRETS if s in captured.text]
    assert not leaked, f"secrets leaked into logs: {leaked}"


@pytest.fixture(name="clock")
def _clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(name="fake_upstream")
def _fake_upstream() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture(name="upstream")
async def _upstream(aiohttp_server: AiohttpServer, fake_upstream: FakeUpstream) -> TestServer:
    """The fake upstream on 127.0.0.1, started."""
    return await aiohttp_server(fake_upstream.app(), auto_decompress=False)


def upstream_url(server: TestServer, path: str = "/") -> str:
    return f"http://127.0.0.1:{server.port}{path}"


MakeProxy = Callable[..., Awaitable[Daemon]]


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


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``both_paths`` run against the fast path and against the aiohttp path."""
    if ("make_proxy" in metafunc.fixturenames
            and metafunc.definition.get_closest_marker("both_paths") is not None):
        metafunc.parametrize("serving_path", ["fast", "aiohttp"], indirect=True)


@pytest.fixture(name="serving_path")
def _serving_path(request: pytest.FixtureRequest) -> str:
    """Which request path the daemons of this test serve with (tokenproxy/proxy/fastpath.py)."""
    return str(getattr(request, "param", "fast"))


@pytest.fixture(name="make_proxy")
async def _make_proxy(clock: FakeClock, serving_path: str) -> AsyncIterator[MakeProxy]:
    """Start real daemons from config dicts; each is stopped when the test ends."""
    daemons: list[Daemon] = []

    async def make(raw: dict[str, Any], env: dict[str, str] | None = None) -> Daemon:
        cfg = build_config(raw, env or {})
        # A redactor of its own, not the logging one: the sweep must catch a token that the
        # code logs, rather than the value-masking layer hiding it.
        daemon = Daemon(cfg, registry=CollectorRegistry(), clock=clock, redactor=log.Redactor(),
                        fast_path=serving_path == "fast")
        await daemon.start()
        daemons.append(daemon)
        return daemon

    yield make
    for daemon in daemons:
        await daemon.stop(grace=1)


@pytest.fixture(name="raw_upstream")
async def _raw_upstream() -> AsyncIterator[Callable[..., Awaitable[Any]]]:
    """Start raw upstreams (tests/rawupstream.py) that run a script per connection."""
    from tests.rawupstream import RawUpstream  # it imports this module: not at the top

    started: list[RawUpstream] = []

    async def make(script: Any) -> RawUpstream:
        up = await RawUpstream(script).start()
        started.append(up)
        return up

    yield make
    for up in started:
        await up.stop()
