"""aiohttp responses built from the shared rules: problem answers, and header pairs as
aiohttp's str multidict."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from tokenproxy.proxy.rules.headers import Header, response_headers
from tokenproxy.proxy.rules.problem import Problem

if TYPE_CHECKING:
    from tokenproxy.proxy.rules.target import CompiledRoute
    from tokenproxy.proxy.runtime import Proxy


class ProblemResponse(web.Response):
    """An answer of ours without aiohttp's ``Server: Python/... aiohttp/...`` (it names
    versions, and the fast path's answers carry no Server either)."""

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall("Server", None)


def problem_response(problem: Problem, *, close: bool | None = None) -> ProblemResponse:
    """*problem* (rules/problem.py) as an aiohttp response; closes the connection after it
    when the problem says so, or as *close* says."""
    resp = ProblemResponse(status=problem.status, body=problem.body(),
                           headers=as_multidict(problem.headers()))
    if problem.closes if close is None else close:
        resp.force_close()
    return resp


def as_multidict(headers: Iterable[Header], on_drop: Callable[[int], None] | None = None
                 ) -> CIMultiDict[str]:
    """Byte pairs as the str multidict aiohttp takes. aiohttp writes header text as UTF-8
    and silently drops what is not (a surrogate standing for a stray byte): a field that is
    not valid UTF-8 would reach the other side altered -- a token split by one such byte
    would be joined again, past the echo check -- so it is dropped whole (*on_drop* is told
    how many). The fast path passes such bytes through unchanged.

    One spelling per name: aiohttp's client keeps "X-Foo" and "x-foo" apart in a
    case-sensitive set and lets the second replace the first."""
    out: CIMultiDict[str] = CIMultiDict()
    spelling: dict[bytes, str] = {}
    dropped = 0
    for name, value in headers:
        try:
            text = value.decode("utf-8")
            shown = spelling.get(name.lower()) or name.decode("utf-8")
        except UnicodeDecodeError:
            dropped += 1
            continue
        spelling[name.lower()] = shown
        out.add(shown, text)
    if dropped and on_drop is not None:
        on_drop(dropped)
    return out


class RelayedResponse(web.StreamResponse):
    """A StreamResponse that sends the upstream's headers as they were.

    aiohttp invents ``Content-Type: application/octet-stream`` for a body without one; a
    proxy must not add what the upstream did not say (browsers would stop sniffing, and a
    client could not tell). Nor its ``Server`` (which names versions); its Date stays, as on
    the fast path.
    """

    async def _prepare_headers(self) -> None:
        had_type = "Content-Type" in self.headers
        had_server = "Server" in self.headers
        request = self._req
        if (request is not None and request.version < aiohttp.HttpVersion11
                and "Content-Length" not in self.headers):
            # An HTTP/1.0 client can only see the end of an unframed body as the close:
            # decided before aiohttp renders the head, or it keeps the connection open.
            self.force_close()
        await super()._prepare_headers()
        if not had_type:
            self.headers.popall("Content-Type", None)
        if not had_server:
            self.headers.popall("Server", None)   # aiohttp's, naming its version


def relayed_headers(proxy: Proxy, compiled: CompiledRoute, raw: Iterable[Header],
                    token: bytes) -> CIMultiDict[str]:
    """The upstream's fields for the client (rules/headers.py), framing left to aiohttp."""
    return as_multidict(response_headers(
        raw, token=token,
        rewrite_location=lambda loc: proxy.table.rewrite_location(loc, compiled)))
