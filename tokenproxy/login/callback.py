"""The one-shot loopback listener a browser login's redirect comes back to (RFC 8252 section
7.3): on 127.0.0.1 only, it takes exactly one answer whose ``state`` is ours (and whose ``iss``,
when the server sends one, is our issuer: RFC 9207), tells the browser it may close the tab,
and closes. Anything else gets a short page and changes nothing."""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import Final

from aiohttp import web

from tokenproxy.clock import Clock
from tokenproxy.login import LoginFailed
from tokenproxy.terminal import visible

PAGE: Final = ("<!doctype html><meta charset=utf-8><title>tokenproxy</title>"
               "<p>{}</p>")
MAX_QUERY: Final = 8192


class LoopbackCallback:
    """``async with LoopbackCallback(port, path, state, issuer) as back``: ``back.redirect_uri``
    to send, ``await back.wait(seconds)`` for the code. Raises LoginFailed (flows.py) for an
    error answer, a mixed-up issuer, or no answer in time."""

    def __init__(self, port: int, path: str, state: str, issuer: str | None,
                 require_iss: bool = False) -> None:
        self._port = port
        # RFC 9207 section 2.4: an issuer that says it sends iss must have sent it.
        self._require_iss = require_iss and issuer is not None
        self._path = path
        self._state = state
        self._issuer = issuer
        self._answer: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._runner: web.ServerRunner | None = None
        self.port = 0

    @property
    def redirect_uri(self) -> str:
        return f"http://127.0.0.1:{self.port}{self._path}"

    async def __aenter__(self) -> LoopbackCallback:
        server = web.Server(self._handle)
        self._runner = web.ServerRunner(server, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self._port, reuse_address=False)
        try:
            await site.start()
        except OSError as exc:
            await self._runner.cleanup()
            self._runner = None
            raise LoginFailed(f"cannot listen on 127.0.0.1:{self._port} for the browser's "
                              f"answer ({exc.strerror}): set redirect_port to a free port, "
                              "or 0") from None
        sockets = self._runner.addresses
        self.port = int(sockets[0][1])
        return self

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def wait(self, seconds: float, clock: Clock) -> str:
        """The code, once the answer came; LoginFailed after *seconds* of *clock*."""
        timer = asyncio.ensure_future(clock.sleep(seconds))

        def expire(done: asyncio.Future[None]) -> None:
            if not done.cancelled() and not self._answer.done():
                self._answer.set_exception(LoginFailed(
                    f"no answer from the browser within {seconds / 60:g} minutes"))

        timer.add_done_callback(expire)
        try:
            return await asyncio.shield(self._answer)
        finally:
            timer.cancel()

    def _page(self, status: int, text: str) -> web.Response:
        return web.Response(status=status, text=PAGE.format(text), content_type="text/html",
                            headers={"Cache-Control": "no-store", "Connection": "close"})

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # Bound to 127.0.0.1 alone (__aenter__): nothing from another machine gets here.
        if request.method != "GET" or request.path != self._path:
            return self._page(404, "Nothing here.")
        if self._answer.done():
            return self._page(409, "This login is over; you can close this tab.")
        if len(request.query_string) > MAX_QUERY:
            return self._page(400, "That is not an answer to this login.")
        query = request.query
        if query.get("state") != self._state:
            # Not the login we started (another tab, an old link, someone else's page):
            # refused, and the real answer still awaited.
            return self._page(400, "That is not an answer to the login tokenproxy started.")
        iss = query.get("iss")
        if iss is None and self._require_iss:
            self._answer.set_exception(LoginFailed(
                "the answer does not say which issuer sent it, though the issuer publishes "
                "that it does (RFC 9207): refused"))
            return self._page(400, "The answer did not name its issuer; the login failed.")
        if iss is not None and self._issuer is not None and (
                iss.rstrip("/") != self._issuer.rstrip("/")):
            self._answer.set_exception(LoginFailed(
                f"the answer came from another issuer ({visible(iss)[:200]}): refused"))
            return self._page(400, "The answer came from another issuer; the login failed.")
        error = query.get("error")
        if error is not None:
            self._answer.set_exception(LoginFailed(f"the issuer answered {visible(error)[:100]}"
                                                   + _description(query.get(
                                                       "error_description"))))
            return self._page(200, "The login did not succeed; see the terminal.")
        code = query.get("code")
        if not code:
            return self._page(400, "That answer carries no code.")
        self._answer.set_result(code)
        return self._page(200, "tokenproxy has the answer; you can close this tab. The "
                          "terminal says whether the login succeeded.")


def _description(text: str | None) -> str:
    return "" if not text else f": {visible(text)[:200]}"
