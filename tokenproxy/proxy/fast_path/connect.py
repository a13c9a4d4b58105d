"""Opening an upstream connection for the fast path: names resolved at most every DNS_TTL
seconds, and happy eyeballs (RFC 8305) where a name has several addresses."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import time
from collections.abc import Callable
from typing import Any, Final, TypeVar

import aiohappyeyeballs

from tokenproxy.proxy.rules.upstream import CONNECT_TIMEOUT, DNS_TTL

HAPPY_EYEBALLS_DELAY: Final = 0.25
AddrInfo = tuple[int, int, int, str, Any]
P = TypeVar("P", bound=asyncio.BaseProtocol)


class Resolver:
    """Where to connect: IP literals as they are, names resolved at most every DNS_TTL s.

    A resolution per connection would run getaddrinfo in the loop's thread pool each time
    (uvloop: libuv's), whose threads each grow a malloc arena of their own.
    """

    def __init__(self) -> None:
        self._cache: dict[tuple[str, int], tuple[float, list[AddrInfo]]] = {}

    async def addresses(self, host: str, port: int) -> list[AddrInfo]:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            pass
        else:
            family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
            return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (host, port))]
        now = time.monotonic()
        cached = self._cache.get((host, port))
        if cached is not None and cached[0] > now:
            return cached[1]
        infos: list[AddrInfo] = list(await asyncio.get_running_loop().getaddrinfo(
            host, port, type=socket.SOCK_STREAM))
        self._cache[(host, port)] = (now + DNS_TTL, infos)
        return infos


async def open_connection(
    addresses: list[AddrInfo], host: str, tls: ssl.SSLContext | None, protocol: Callable[[], P],
) -> P:
    """A new connection to one of *addresses*. Raises OSError or ssl errors (TimeoutError
    after CONNECT_TIMEOUT).

    Happy eyeballs as on the aiohttp path: the next address is tried 0.25 s into the last, so
    an address family that drops packets costs a quarter second, not the route's timeout.
    """
    loop = asyncio.get_running_loop()
    server_hostname = host if tls is not None else None
    if len(addresses) == 1:
        # One address (an IP literal, the common upstream): the loop's own connect, done in C
        # by uvloop, without the Python-level race (a storm opens hundreds at once).
        address = addresses[0][4]
        async with asyncio.timeout(CONNECT_TIMEOUT):
            _, conn = await loop.create_connection(protocol, address[0], address[1], ssl=tls,
                                                   server_hostname=server_hostname)
        return conn
    async with asyncio.timeout(CONNECT_TIMEOUT):
        sock = await aiohappyeyeballs.start_connection(
            addresses, happy_eyeballs_delay=HAPPY_EYEBALLS_DELAY, interleave=1)
    try:
        _, conn = await loop.create_connection(protocol, sock=sock, ssl=tls,
                                               server_hostname=server_hostname)
    except BaseException:
        sock.close()
        raise
    return conn
