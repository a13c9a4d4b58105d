"""aiohttp responses built from the shared rules: problem answers, and header pairs as
aiohttp's str multidict."""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web
from multidict import CIMultiDict

from tokenproxy.proxy.rules.headers import Header
from tokenproxy.proxy.rules.problem import Problem


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


def as_multidict(headers: Iterable[Header]) -> CIMultiDict[str]:
    """Byte pairs as the str multidict aiohttp takes, decoded as aiohttp decodes what it
    reads (UTF-8, surrogateescape: any byte survives the round trip). One spelling per name:
    aiohttp's client keeps "X-Foo" and "x-foo" apart in a case-sensitive set and lets the
    second replace the first."""
    out: CIMultiDict[str] = CIMultiDict()
    spelling: dict[bytes, str] = {}
    for name, value in headers:
        shown = spelling.get(name.lower())
        if shown is None:
            shown = spelling[name.lower()] = name.decode("utf-8", "surrogateescape")
        out.add(shown, value.decode("utf-8", "surrogateescape"))
    return out
