"""The ``static`` provider: a fixed token, or one read from a file and re-read when it changes."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Final

from tokenproxy.clock import Clock
from tokenproxy.config import StaticProvider
from tokenproxy.log import Redactor, get_logger
from tokenproxy.metrics import Metrics
from tokenproxy.tokens.source import Target, Token, Trigger, is_usable_token

# How often a token_file is checked for changes on the request path: a stat() per second at most.
STAT_INTERVAL: Final = 1.0


class StaticSource:
    """Serves one token that never expires; with token_file, follows the file's changes."""

    def __init__(
        self, cfg: StaticProvider, *, clock: Clock, metrics: Metrics, redactor: Redactor
    ) -> None:
        self.name = cfg.name
        self._path: Path | None = cfg.token_file
        self._clock = clock
        self._metrics = metrics
        self._redactor = redactor
        self._log = get_logger(provider=cfg.name)
        assert cfg.token is not None
        self._token = Token(cfg.token.value, None, 1)
        redactor.add(cfg.token.value)
        self._stamp = self._file_stamp()
        self._next_check = clock.monotonic() + STAT_INTERVAL

    def _file_stamp(self) -> tuple[int, int, int] | None:
        if self._path is None:
            return None
        try:
            st = os.stat(self._path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _check_file(self, *, force: bool = False) -> None:
        if self._path is None:
            return
        now = self._clock.monotonic()
        if not force and now < self._next_check:
            return
        self._next_check = now + STAT_INTERVAL
        stamp = self._file_stamp()
        if stamp is None or stamp == self._stamp:
            return
        try:
            value = self._path.read_text(encoding="utf-8").rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            self._log.warning("token_file_unreadable", path=str(self._path),
                              error=type(exc).__name__)
            return
        self._stamp = stamp
        if not is_usable_token(value):
            # Half-written files and editors' temp states must not take the proxy down.
            self._log.warning("token_file_invalid", path=str(self._path))
            return
        if value != self._token.value:
            self._redactor.track(self.name, value)
            self._token = Token(value, None, self._token.generation + 1)
            self._metrics.token_refresh.labels(self.name, "manual", "token_file",
                                               "success").inc()
            self._log.info("token_refreshed", trigger="manual", grant="token_file",
                           expires_in=None)

    async def start(self) -> None:
        self._metrics.provider_authenticated.labels(self.name).set(1)
        self._metrics.token_expiry.labels(self.name).set(0)

    async def close(self) -> None:
        return None

    def valid_now(self) -> Token | None:
        self._check_file()
        return self._token

    async def current(self) -> Token:
        return self.valid_now() or self._token

    async def renew(self, stale: Token, trigger: Trigger, target: Target) -> Token | None:
        self._check_file(force=True)
        if self._token.generation != stale.generation:
            return self._token
        return None

    def accepted(self, target: Target) -> None:
        pass   # a fixed token has nothing to learn from it

    def refused(self, target: Target) -> None:
        pass

    def ready(self) -> bool:
        return True

    def describe(self) -> dict[str, Any]:
        return {"type": "static", "state": "valid", "expires_in": None}

