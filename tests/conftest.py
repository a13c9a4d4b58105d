"""The fixtures every test module shares: the log sweep, the fake clock, the upstreams, the
issuers, a client session, a self-signed certificate, and real tokenproxy daemons in-process.
The helpers behind them are in tests/helpers/."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import uvloop
from aiohttp.test_utils import TestServer
from prometheus_client import CollectorRegistry
from pytest_aiohttp import AiohttpServer

from tests.helpers.assertion_issuer import StartIssuer
from tests.helpers.assertion_issuer import issuers as assertion_issuers
from tests.helpers.config import MakeProxy
from tests.helpers.fakes import SECRETS, FakeClock, FakeUpstream, JumpClock
from tests.helpers.forward import Upstream, start_upstream
from tests.helpers.idp import Idp, StartIdp, start_idp
from tests.helpers.logs import CapturedLogs
from tests.helpers.rawupstream import MakeRaw, RawUpstream, Script
from tests.helpers.redis_server import RedisServer, redis_server_fixture
from tests.helpers.tls import ServerCert, upstream_tls
from tokenproxy import log
from tokenproxy.config import build_config
from tokenproxy.daemon import Daemon

# pytest keeps each test module with its asserts rewritten as bytecode, unless bytecode is not
# written (PYTHONDONTWRITEBYTECODE): then every run rewrites all of them again, seconds of
# each worker's start. The suite's own bytecode is worth keeping either way.
sys.dont_write_bytecode = False


@pytest.fixture(autouse=True, name="logs")
def _logs() -> Iterator[CapturedLogs]:
    """Capture all logs; fail the test if any secret of tests/helpers/fakes.py shows up."""
    captured = CapturedLogs()
    log.configure("debug", "json", redactor=captured.redactor, stream=captured.stream)
    yield captured
    leaked = [s for s in SECRETS if s in captured.text]
    assert not leaked, f"secrets leaked into logs: {leaked}"


@pytest.fixture(name="clock")
def _clock() -> JumpClock:
    """The clock the daemons (make_proxy takes it by name) and the issuers share; the token
    lifetimes, backoffs and storm-guard windows pass only when a test moves it."""
    return JumpClock()


@pytest.fixture(name="http")
async def _http() -> AsyncIterator[aiohttp.ClientSession]:
    """A client session without a limit on its connections (for bursts of requests)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        yield s


@pytest.fixture(name="issuers")
async def _issuers(aiohttp_server: AiohttpServer, clock: JumpClock, logs: CapturedLogs
                   ) -> AsyncIterator[StartIssuer]:
    """Start token endpoints that verify assertions (tests/helpers/assertion_issuer.py) on
    the test's clock; afterwards nothing they issued or received may be in a log line."""
    async with assertion_issuers(aiohttp_server, clock, logs) as start:
        yield start


@pytest.fixture(name="start")
async def _start(
    aiohttp_server: AiohttpServer, clock: JumpClock, logs: CapturedLogs
) -> AsyncIterator[StartIdp]:
    """Start issuers (tests/helpers/idp.py) on the test's clock; afterwards no token any of
    them issued may appear in a log line."""
    idps: list[Idp] = []

    async def start(**kw: Any) -> Idp:
        idp = await start_idp(aiohttp_server, clock, **kw)
        idps.append(idp)
        return idp

    yield start
    for idp in idps:
        issued = [*idp.issuer._access, *idp.issuer._refresh]
        leaked = [t for t in issued if t in logs.text]
        assert [] == leaked, "issued tokens leaked into logs"


@pytest.fixture(name="fake_upstream")
def _fake_upstream() -> FakeUpstream:
    return FakeUpstream()


@pytest.fixture(name="upstream")
async def _upstream(aiohttp_server: AiohttpServer, fake_upstream: FakeUpstream) -> TestServer:
    """The fake upstream on 127.0.0.1, started."""
    fake_upstream.server = await aiohttp_server(fake_upstream.app(), auto_decompress=False)
    return fake_upstream.server


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item
                                   ) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """Tests marked ``both_loops`` run on asyncio's loop and on uvloop (the daemon's, with
    `tokenproxy run`); the others on asyncio's."""
    if item.get_closest_marker("both_loops") is not None:
        return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests marked ``both_paths`` run against the fast path and against the aiohttp path."""
    if ("make_proxy" in metafunc.fixturenames
            and metafunc.definition.get_closest_marker("both_paths") is not None):
        metafunc.parametrize("serving_path", ["fast", "aiohttp"], indirect=True)


@pytest.fixture(name="serving_path")
def _serving_path(request: pytest.FixtureRequest) -> str:
    """Which request path the daemons of this test serve with (tokenproxy/proxy/fast_path or
    tokenproxy/proxy/aiohttp_path); "fast" unless the test is parametrized."""
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
async def _raw_upstream() -> AsyncIterator[MakeRaw]:
    """Start raw upstreams (tests/helpers/rawupstream.py) that run a script per connection;
    each is stopped, its open connections cut, when the test ends."""
    started: list[RawUpstream] = []

    async def make(script: Script, limit: int = 2**16) -> RawUpstream:
        up = await RawUpstream(script).start(limit)
        started.append(up)
        return up

    yield make
    for up in started:
        await up.stop()


@pytest.fixture(name="cert", scope="session")
def _cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 (key, certificate), made with the openssl
    command once per test process: tests only read it."""
    folder = tmp_path_factory.mktemp("cert")
    key, crt = folder / "key.pem", folder / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(crt), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=30,
    )
    return key, crt


@pytest.fixture(name="closing")
def _closing() -> Iterator[list[socket.socket]]:
    """Sockets the test opened, closed when it ends."""
    socks: list[socket.socket] = []
    yield socks
    for sock in socks:
        sock.close()


@pytest.fixture(name="redis_server")
def _redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free loopback port, persistence off; always stopped."""
    yield from redis_server_fixture(tmp_path)


@pytest.fixture(name="upstream_cert", scope="session")
def _upstream_cert(tmp_path_factory: pytest.TempPathFactory) -> ServerCert:
    """A CA of the tests' own and a certificate it signed for localhost and 127.0.0.1, made
    once per test process (tests/helpers/tls.py)."""
    return upstream_tls(tmp_path_factory.mktemp("upstream-tls"))


@pytest.fixture(name="tls_upstream")
async def _tls_upstream(aiohttp_server: AiohttpServer, upstream_cert: ServerCert) -> Upstream:
    """The recording upstream as ``localhost`` over TLS and over plain HTTP, for the forward
    proxy (tests/helpers/forward.py)."""
    return await start_upstream(aiohttp_server, upstream_cert)
