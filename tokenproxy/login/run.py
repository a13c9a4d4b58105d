"""The command line's side of `tokenproxy login`, `logout` and `status`."""

from __future__ import annotations

import webbrowser
from collections.abc import Callable, Sequence
from typing import TextIO

from tokenproxy.clock import Clock, SystemClock
from tokenproxy.config import Config
from tokenproxy.log import Redactor
from tokenproxy.login import LoginFailed
from tokenproxy.login.commands import Session, interactive, log_in, log_out, status_lines
from tokenproxy.login.flows import Terminal
from tokenproxy.terminal import visible
from tokenproxy.tokens.state import StateLockTimeout
from tokenproxy.tokens.store import SharedStateUnavailable, StoreWriteFailed


def _open(url: str) -> bool:
    try:
        return webbrowser.open(url)
    except webbrowser.Error:
        return False


async def run_login_command(cfg: Config, command: str, names: Sequence[str], *, out: TextIO,
                            redactor: Redactor, no_browser: bool = False,
                            clock: Clock | None = None,
                            opener: Callable[[str], bool] = _open) -> int:
    """0 done; 1 a login failed, or status found one required (LoginFailed for the rest)."""
    clock = clock or SystemClock()
    try:
        return await _run(cfg, command, names, out=out, redactor=redactor,
                          opener=None if no_browser else opener, clock=clock)
    except (SharedStateUnavailable, StoreWriteFailed, StateLockTimeout) as exc:
        raise LoginFailed(f"the token store: {exc}") from None


async def _run(cfg: Config, command: str, names: Sequence[str], *, out: TextIO,
               redactor: Redactor, opener: Callable[[str], bool] | None, clock: Clock) -> int:
    async with Session(cfg, redactor, clock) as session:
        if command == "status":
            lines, needed = await status_lines(session, clock.time())
            for line in lines:
                out.write(visible(line) + "\n")
            return 1 if needed else 0
        providers = interactive(cfg, names)
        if not providers:
            raise LoginFailed("no provider here is one a person logs in to (grant_type "
                              "device_code or authorization_code)")
        if command == "logout":
            for p in providers:
                out.write(f"{p.name}: logged out; {await log_out(session, p)}\n")
            return 0
        term = Terminal(out, opener, clock)
        if not names:   # all of them that need it: no refresh token stored
            providers = [p for p in providers
                         if (stored := await session.stored(p)) is None
                         or not stored.refresh_token]
            if not providers:
                out.write("every provider a person logs in to has a login; "
                          "`tokenproxy login NAME` logs in to one again\n")
                return 0
        for p in providers:
            account = await log_in(session, p, term)
            out.write(f"{p.name}: logged in as {visible(account)}; a running daemon takes "
                      "it within a second\n")
        return 0
