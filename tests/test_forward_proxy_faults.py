"""The forward proxy's reload, eviction, tunnel and shutdown behaviour under attack. Each test
was written against a fault an adversarial pass found and failed until it was fixed; a
docstring's account of the fault describes the code as it was then.

Everything listens on 127.0.0.1; every wait is bounded; no part of tokenproxy is mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import ipaddress
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers.config import MakeProxy
from tests.helpers.fakes import TOKEN, TOKEN_2
from tests.helpers.forward import Upstream, ca_context, forward_config, fport
from tests.helpers.metrics import count
from tests.helpers.wait import wait_for
from tokenproxy.config import build_config
from tokenproxy.daemon import Daemon
from tokenproxy.forward.service import MAX_HOSTS

TIMEOUT = 5.0


def open_clients(daemon: Daemon) -> float:
    return count(daemon, "tokenproxy_client_connections")


async def connect(daemon: Daemon, authority: str,
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", fport(daemon))
    writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 200"), head
    return reader, writer


async def get(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str,
              host: str) -> bytes:
    """One keep-alive GET on an (intercepted, TLS) stream; the answer's head and body."""
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    body = await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
    return head + body


@contextlib.asynccontextmanager
async def raw_server(handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], object],
                     ) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)   # type: ignore[arg-type]
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 1)


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """A tunnel host: what comes in goes back."""
    with contextlib.suppress(Exception):
        while data := await r.read(1024):
            w.write(data)
            await w.drain()
    w.close()


# -- reloads ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_a_connect_read_after_a_reload_does_not_pin_the_old_token_for_every_later_client(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """A connection accepted before a reload, whose CONNECT head arrives after it, is decided
    by the old Forward (daemon._forward_factory captures it at accept). If that is the host's
    first use, Forward.service() adds the host to the shared Hosts with a Proxy of the OLD
    config -- and every later connection, under the new config, finds that service and is
    served with the old provider's token until some further reload happens."""
    raw = forward_config(tmp_path, tls_upstream)
    daemon = await make_proxy(raw)
    authority = tls_upstream.authority
    early_reader, early_writer = await asyncio.open_connection("127.0.0.1", fport(daemon))
    try:
        await wait_for(lambda: open_clients(daemon) == 1, "the early connection accepted")
        renewed = copy.deepcopy(raw)
        renewed["providers"]["api"]["token"] = TOKEN_2
        await daemon.reload(build_config(renewed, {}))
        # Only now does the early client say where it goes.
        early_writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n"
                           .encode())
        head = await asyncio.wait_for(early_reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        assert head.startswith(b"HTTP/1.1 200"), head
        await asyncio.wait_for(early_writer.start_tls(ca_context(tmp_path),
                                                      server_hostname="localhost"), TIMEOUT)
        await get(early_reader, early_writer, "/echo", authority)
        early = tls_upstream.fake.last.header("Authorization")
        # A brand-new client, well after the reload.
        reader, writer = await connect(daemon, authority)
        try:
            await asyncio.wait_for(writer.start_tls(ca_context(tmp_path),
                                                    server_hostname="localhost"), TIMEOUT)
            await get(reader, writer, "/echo", authority)
        finally:
            writer.close()
        later = tls_upstream.fake.last.header("Authorization")
    finally:
        early_writer.close()
    assert [f"Bearer {TOKEN_2}"] == later, \
        f"a client after the reload got the replaced token (early connection got {early})"
    assert [f"Bearer {TOKEN_2}"] == early
    assert TOKEN not in str(later)


def more_hosts(raw: dict[str, Any], upstream: Upstream) -> list[int]:
    """MAX_HOSTS more intercepted ports on localhost, added to *raw*: never contacted (a
    CONNECT alone makes a host's service), and none of them the upstream's own, an ephemeral
    port that may fall in their range (a host listed twice is refused)."""
    ports = [p for p in range(40000, 40000 + MAX_HOSTS + 1) if p != upstream.port][:MAX_HOSTS]
    raw["forward_proxy"]["intercept"] += [
        {"host": "localhost", "port": port, "provider": "api"} for port in ports]
    return ports


@pytest.mark.slow
async def test_max_hosts_eviction_does_not_cut_a_busy_hosts_open_connection(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """Hosts evicts in insertion order (next(iter(services))), not by use: the first host
    made, however busy, is the first drained when MAX_HOSTS others are asked for (a wildcard
    entry makes one per name a client invents), and its open keep-alive connection is cut."""
    raw = forward_config(tmp_path, tls_upstream, limits={"max_connections": 4096})
    ports = more_hosts(raw, tls_upstream)
    daemon = await make_proxy(raw)
    authority = tls_upstream.authority
    reader, writer = await connect(daemon, authority)
    try:
        await asyncio.wait_for(writer.start_tls(ca_context(tmp_path),
                                                server_hostname="localhost"), TIMEOUT)
        assert b" 200 " in (await get(reader, writer, "/echo", authority))[:20]
        for i, port in enumerate(ports):
            _r, w = await connect(daemon, f"localhost:{port}")
            w.close()
            if i == MAX_HOSTS // 2:   # the host is in use all along
                assert b" 200 " in (await get(reader, writer, "/echo", authority))[:20]
        answer = b""
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            answer = await get(reader, writer, "/echo", authority)
    finally:
        writer.close()
    assert b" 200 " in answer[:20], \
        "the busiest host's open connection was drained by MAX_HOSTS eviction"


# -- tunnels ---------------------------------------------------------------------------------


@pytest.mark.slow
async def test_an_idle_tunnel_whose_client_stopped_reading_gives_its_slot_back(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """The idle timer closes the client's transport with close(), which first flushes the
    write buffer: a client that stopped reading (its window full, tokenproxy's buffer full, the
    upstream paused) never lets that flush finish, so connection_lost never comes and the
    max_connections slot is held for as long as the client likes -- a slot-exhaustion DoS."""
    stop = asyncio.Event()

    async def firehose(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        chunk = b"x" * 65536
        with contextlib.suppress(Exception):
            while not stop.is_set():
                w.write(chunk)
                await w.drain()
        w.close()

    async with raw_server(firehose) as port:
        raw = forward_config(tmp_path, tls_upstream, limits={"keepalive_timeout": "0.5s"})
        raw["forward_proxy"]["tunnel"] = [f"localhost:{port}"]
        daemon = await make_proxy(raw)
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            await loop.sock_connect(sock, ("127.0.0.1", fport(daemon)))
            await loop.sock_sendall(sock, f"CONNECT localhost:{port} HTTP/1.1\r\n\r\n".encode())
            first = await asyncio.wait_for(loop.sock_recv(sock, 64), TIMEOUT)
            assert first.startswith(b"HTTP/1.1 200"), first
            # ... and the client reads nothing more.
            await asyncio.sleep(3.0)   # six keepalive_timeouts
            held = open_clients(daemon)
        finally:
            stop.set()
            sock.close()
    assert 0 == held, "a tunnel idle for 6x keepalive_timeout still holds its client slot"


async def test_a_tunnel_closed_both_ways_gives_its_slot_back_at_once(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """Pipe.eof_received returns True on both ends (half-close passed on): once the client
    and the upstream have both sent EOF and gone, neither transport is read any more, so
    neither notices, and the slot is held until the idle timer (keepalive_timeout, 75 s by
    default) rather than given back when the tunnel is over."""

    async def answer_then_close(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        data = await r.read()   # until the client's EOF
        w.write(b"got " + data)
        await w.drain()
        w.close()

    async with raw_server(answer_then_close) as port:
        raw = forward_config(tmp_path, tls_upstream, limits={"keepalive_timeout": "20s"})
        raw["forward_proxy"]["tunnel"] = [f"localhost:{port}"]
        daemon = await make_proxy(raw)
        reader, writer = await connect(daemon, f"localhost:{port}")
        writer.write(b"hello")
        writer.write_eof()
        assert b"got hello" == await asyncio.wait_for(reader.read(), TIMEOUT)
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
        await wait_for(lambda: open_clients(daemon) == 0,
                       "the finished tunnel's slot given back", timeout=3.0)


@pytest.mark.slow
async def test_stop_closes_open_tunnels(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """Daemon.stop() drains the listeners' and the intercepted hosts' connections, but nothing
    holds the tunnels: after stop() returns they still relay bytes (and hold their slots)."""

    async with raw_server(echo) as port:
        raw = forward_config(tmp_path, tls_upstream)
        raw["forward_proxy"]["tunnel"] = [f"localhost:{port}"]
        daemon = await make_proxy(raw)
        reader, writer = await connect(daemon, f"localhost:{port}")
        try:
            writer.write(b"ping")
            assert b"ping" == await asyncio.wait_for(reader.readexactly(4), TIMEOUT)
            await asyncio.wait_for(daemon.stop(grace=0.2), TIMEOUT)
            writer.write(b"after-stop")
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            late = b""
            with contextlib.suppress(ConnectionError, asyncio.TimeoutError):
                late = await asyncio.wait_for(reader.read(64), 1.0)
        finally:
            writer.close()
    assert b"after-stop" != late, "a tunnel still relayed bytes after Daemon.stop() returned"


@pytest.mark.slow
async def test_stop_closes_intercepted_connections_of_hosts_evicted_or_swapped(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """Held: intercepted keep-alive connections opened before and after reloads are all
    closed by stop() within its grace."""
    raw = forward_config(tmp_path, tls_upstream)
    daemon = await make_proxy(raw)
    authority = tls_upstream.authority
    conns = []
    for n in range(3):
        reader, writer = await connect(daemon, authority)
        await asyncio.wait_for(writer.start_tls(ca_context(tmp_path),
                                                server_hostname="localhost"), TIMEOUT)
        assert b" 200 " in (await get(reader, writer, "/echo", authority))[:20]
        conns.append((reader, writer))
        renewed = copy.deepcopy(raw)
        renewed["providers"]["api"]["token"] = TOKEN_2 if n % 2 == 0 else TOKEN
        await daemon.reload(build_config(renewed, {}))
    await asyncio.wait_for(daemon.stop(grace=0.5), TIMEOUT)
    for reader, writer in conns:
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            assert b"" == await asyncio.wait_for(reader.read(), 2.0)
        writer.close()
    assert 0 == open_clients(daemon)


@pytest.mark.parametrize("field", ["Forwarded: for=1.2.3.4", "forwarded:for=1.2.3.4",
                                   "X-Forwarded-For: 1.2.3.4", "VIA: 1.0 x"])
async def test_relayed_connect_variants_are_refused(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path, field: str,
) -> None:
    """Held: spellings of the forwarding headers on a CONNECT."""
    daemon = await make_proxy(forward_config(tmp_path, tls_upstream))
    reader, writer = await asyncio.open_connection("127.0.0.1", fport(daemon))
    try:
        writer.write(f"CONNECT {tls_upstream.authority} HTTP/1.1\r\n{field}\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), TIMEOUT)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 403 "), answer[:80]
    await wait_for(lambda: open_clients(daemon) == 0, "slot given back")


async def test_a_host_removed_by_a_reload_gets_no_token_on_a_connection_accepted_before_it(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """The same stale Forward, for a host the reload removes: a client connected before the
    reload (head not yet sent; header_timeout is 10 s by default) CONNECTs afterwards and is
    served with the token, to a host the running config no longer lists."""
    raw = forward_config(tmp_path, tls_upstream)
    daemon = await make_proxy(raw)
    authority = tls_upstream.authority
    reader, writer = await asyncio.open_connection("127.0.0.1", fport(daemon))
    try:
        await wait_for(lambda: open_clients(daemon) == 1, "the early connection accepted")
        trusted = ca_context(tmp_path)   # the client's trust store, loaded before the reload
        gone = copy.deepcopy(raw)
        gone["forward_proxy"]["intercept"] = gone["forward_proxy"]["intercept"][1:]
        await daemon.reload(build_config(gone, {}))
        seen = len(tls_upstream.fake.seen)
        writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        if head.startswith(b"HTTP/1.1 200"):
            await asyncio.wait_for(writer.start_tls(trusted, server_hostname="localhost"),
                                   TIMEOUT)
            with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
                await get(reader, writer, "/echo", authority)
    finally:
        writer.close()
    assert seen == len(tls_upstream.fake.seen), \
        f"a de-listed host got {tls_upstream.fake.last.header('Authorization')}"


# -- a second adversarial pass ---------------------------------------------------------------


@pytest.mark.slow
async def test_a_host_in_its_clients_tls_handshake_is_not_evicted(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """A host's service was looked up before the client's TLS handshake but counted as in
    use only once the stream was handed over: MAX_HOSTS other hosts asked for during the
    handshake evicted it, and the client, served by the evicted service ever after, kept its
    token through a reload that removed the host."""
    raw = forward_config(tmp_path, tls_upstream,
                         limits={"max_connections": 4096, "header_timeout": "60s"})
    ports = more_hosts(raw, tls_upstream)
    daemon = await make_proxy(raw)
    authority = tls_upstream.authority
    reader, writer = await connect(daemon, authority)   # 200; its handshake not begun
    try:
        for port in ports:
            _r, w = await connect(daemon, f"localhost:{port}")
            w.close()
        await asyncio.wait_for(writer.start_tls(ca_context(tmp_path),
                                                server_hostname="localhost"), TIMEOUT)
        assert b" 200 " in (await get(reader, writer, "/echo", authority))[:20]
        gone = copy.deepcopy(raw)
        gone["forward_proxy"]["intercept"] = gone["forward_proxy"]["intercept"][1:]
        await daemon.reload(build_config(gone, {}))
        seen = len(tls_upstream.fake.seen)
        answer = await get(reader, writer, "/echo", authority)
    finally:
        writer.close()
    assert seen == len(tls_upstream.fake.seen), "a de-listed host still got the token"
    assert b" 404 " in answer[:20]


async def test_removing_the_forward_proxy_section_reaches_open_connections(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """A reload without the forward_proxy section built no Forward, so nothing re-pointed the
    hosts' services: open connections kept the old config, token and all."""
    raw = forward_config(tmp_path, tls_upstream)
    daemon = await make_proxy(raw)
    authority = tls_upstream.authority
    reader, writer = await connect(daemon, authority)
    try:
        await asyncio.wait_for(writer.start_tls(ca_context(tmp_path),
                                                server_hostname="localhost"), TIMEOUT)
        assert b" 200 " in (await get(reader, writer, "/echo", authority))[:20]
        gone = copy.deepcopy(raw)
        del gone["forward_proxy"]
        gone["providers"]["api"]["token"] = TOKEN_2
        await daemon.reload(build_config(gone, {}))
        seen = len(tls_upstream.fake.seen)
        answer = b""
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            answer = await get(reader, writer, "/echo", authority)
    finally:
        writer.close()
    assert seen == len(tls_upstream.fake.seen), "the upstream was reached after the removal"
    assert answer == b"" or b" 404 " in answer[:20]


@pytest.mark.slow
async def test_evicting_a_host_keeps_the_daemons_pooled_upstream_connections(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """Each host's fast-path environment shares the daemon's upstream pool, and draining one
    (an eviction) closed that pool: one CONNECT to a new wildcard name cut every idle
    keep-alive upstream connection of the daemon, the main listener's included."""
    raw = forward_config(tmp_path, tls_upstream)
    raw["forward_proxy"]["intercept"].append({"host": "*.example.com", "provider": "api"})
    daemon = await make_proxy(raw)
    hosts = daemon._serving.forward_hosts if daemon._serving else None
    assert hosts is not None
    main = f"http://127.0.0.1:{daemon.port()}/echo"
    async with aiohttp.ClientSession() as s:
        async with s.get(main) as r:
            assert 200 == r.status
        before = tls_upstream.fake.ports[-1]
        for i in range(MAX_HOSTS + 1):   # hosts made as CONNECTs make them; the last evicts
            _r, w = await connect(daemon, f"n{i}.example.com:443")
            w.close()
        await asyncio.sleep(0.1)
        async with s.get(main) as r:
            assert 200 == r.status
    assert before == tls_upstream.fake.ports[-1], "the pooled upstream connection was cut"


@pytest.mark.slow
async def test_a_tunnel_whose_upstream_reset_gives_the_slot_of_a_client_not_reading_back(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """When one end of a tunnel was lost, the other was close()d and the idle timer
    cancelled: a client that stopped reading never let that close flush, and held its slot
    (and the pair escaped shutdown) for ever."""
    async def firehose_then_reset(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                              struct.pack("ii", 1, 0))
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                while True:
                    w.write(b"x" * 65536)
                    await w.drain()
        w.transport.abort()   # RST

    async with raw_server(firehose_then_reset) as port:
        raw = forward_config(tmp_path, tls_upstream, limits={"keepalive_timeout": "0.5s"})
        raw["forward_proxy"]["tunnel"] = [f"localhost:{port}"]
        daemon = await make_proxy(raw)
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, ("127.0.0.1", fport(daemon)))
            await loop.sock_sendall(sock, f"CONNECT localhost:{port} HTTP/1.1\r\n\r\n".encode())
            first = await asyncio.wait_for(loop.sock_recv(sock, 64), TIMEOUT)
            assert first.startswith(b"HTTP/1.1 200"), first
            for _ in range(6):   # the tunnel busy one way until the upstream's reset
                await loop.sock_sendall(sock, b"ping")
                await asyncio.sleep(0.2)
            await wait_for(lambda: open_clients(daemon) == 0,
                           "the slot given back though the client reads nothing", 5.0)
        finally:
            sock.close()


async def test_a_connect_after_stop_gets_no_tunnel(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """A connection accepted before stop() whose CONNECT came after it was still decided: a
    tunnel opened, and relayed, after the daemon had stopped."""
    async with raw_server(echo) as port:
        raw = forward_config(tmp_path, tls_upstream)
        raw["forward_proxy"]["tunnel"] = [f"localhost:{port}"]
        daemon = await make_proxy(raw)
        reader, writer = await asyncio.open_connection("127.0.0.1", fport(daemon))
        await wait_for(lambda: open_clients(daemon) == 1, "the connection accepted")
        await asyncio.wait_for(daemon.stop(grace=0.2), TIMEOUT)
        writer.write(f"CONNECT localhost:{port} HTTP/1.1\r\n\r\n".encode())
        head = b""
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            head = await asyncio.wait_for(reader.read(), TIMEOUT)
        writer.close()
    assert not head.startswith(b"HTTP/1.1 200"), head


def _loopback_hostname() -> str | None:
    """This machine's name when it resolves to loopback only (as /etc/hosts commonly has it),
    and is not 'localhost' itself: a listed name that leads back here."""
    name = socket.gethostname().lower()
    try:
        infos = socket.getaddrinfo(name, 443, type=socket.SOCK_STREAM)
    except OSError:
        return None
    local = all(ipaddress.ip_address(str(i[4][0])).is_loopback for i in infos)
    return name if local and name not in ("localhost", "localhost.") else None


LOOPBACK_NAME = _loopback_hostname()


@pytest.mark.skipif(LOOPBACK_NAME is None, reason="this machine's name does not resolve to "
                    "loopback alone")
async def test_a_tunnel_name_that_resolves_to_this_machine_is_refused(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path,
) -> None:
    """A listed tunnel name (a wildcard's subdomain, which whoever owns the domain points
    anywhere) that resolves to loopback opened a tunnel to this machine's own services;
    'localhost' listed as such still does."""
    assert LOOPBACK_NAME is not None

    async with raw_server(echo) as port:
        raw = forward_config(tmp_path, tls_upstream)
        raw["forward_proxy"]["tunnel"] = [f"{LOOPBACK_NAME}:{port}", f"localhost:{port}"]
        daemon = await make_proxy(raw)
        reader, writer = await asyncio.open_connection("127.0.0.1", fport(daemon))
        writer.write(f"CONNECT {LOOPBACK_NAME}:{port} HTTP/1.1\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
        writer.close()
        assert head.startswith(b"HTTP/1.1 403"), head
        _r, w = await connect(daemon, f"localhost:{port}")   # asserts the 200
        w.close()


@pytest.mark.slow
@pytest.mark.parametrize("readd", [False, True], ids=["removed", "removed-and-back"])
async def test_a_handshake_across_the_sections_removal_reaches_no_retired_service(
    make_proxy: MakeProxy, tls_upstream: Upstream, tmp_path: Path, readd: bool,
) -> None:
    """A client in its TLS handshake while a reload removed forward_proxy was handed, after
    the handshake, to the retired (drained) service: served 404s by something no reload or
    shutdown reached, even after stop(). It is now cut once its handshake ends."""
    raw = forward_config(tmp_path, tls_upstream)
    daemon = await make_proxy(raw)
    authority = tls_upstream.authority
    reader, writer = await connect(daemon, authority)   # 200; its handshake not begun
    gone = copy.deepcopy(raw)
    del gone["forward_proxy"]
    await daemon.reload(build_config(gone, {}))
    if readd:
        await daemon.reload(build_config(raw, {}))
    answer = b""
    with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ssl.SSLError,
                             TimeoutError):
        await asyncio.wait_for(writer.start_tls(ca_context(tmp_path),
                                                server_hostname="localhost"), TIMEOUT)
        answer = await get(reader, writer, "/echo", authority)
    writer.close()
    assert b"" == answer
    assert [] == tls_upstream.fake.seen
