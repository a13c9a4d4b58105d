"""The calls to a provider's token endpoint (or command): which grant to use, and each call
counted by grant and result (``tokenproxy_token_refresh_total``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import structlog

from tokenproxy import log
from tokenproxy.metrics import Metrics
from tokenproxy.tokens.discovery import DiscoveryFailed
from tokenproxy.tokens.grant import Grant, GrantFailed, GrantRejected
from tokenproxy.tokens.source import Trigger


class Grantor(Protocol):
    @property
    def can_login(self) -> bool: ...

    @property
    def login_grant(self) -> str: ...

    @property
    def refresh_grant(self) -> str: ...

    @property
    def can_refresh(self) -> bool: ...

    @property
    def initial_refresh_token(self) -> str | None: ...

    @property
    def interactive(self) -> bool:
        """A person logs in (`tokenproxy login`); the daemon only refreshes."""

    async def login(self) -> Grant: ...

    async def refresh(self, refresh_token: str) -> Grant: ...


class TokenCalls:
    """One provider's token-endpoint calls, for its TokenManager."""

    def __init__(self, name: str, grantor: Grantor, metrics: Metrics,
                 logger: structlog.typing.FilteringBoundLogger) -> None:
        self._name = name
        self.grantor = grantor
        self._metrics = metrics
        self._log = logger

    async def exchange(self, trigger: Trigger, refresh_token: str | None,
                       forget_refresh: Callable[[], None]) -> tuple[Grant, str | None, str]:
        """The refresh grant when there is a refresh token; on its rejection (after
        *forget_refresh*, so a failed login does not spend the dead token again) a fresh
        login if the provider can. Returns the answer, the refresh token used (None after a
        login) and the grant that succeeded."""
        grantor = self.grantor
        if refresh_token and grantor.can_refresh:
            try:
                return (await self.call(trigger, grantor.refresh_grant,
                                        grantor.refresh(refresh_token)),
                        refresh_token, grantor.refresh_grant)
            except GrantRejected as exc:
                if not grantor.can_login or isinstance(exc, DiscoveryFailed):
                    raise
                self._log.warning(log.TOKEN_REFRESH_FAILED, grant=exc.grant, error=exc.reason,
                                  next_step="login")
                forget_refresh()
        return (await self.call(trigger, grantor.login_grant, grantor.login()), None,
                grantor.login_grant)

    async def call(self, trigger: Trigger, grant: str, answer: Awaitable[Grant]) -> Grant:
        """One token-endpoint call, counted by its grant and result."""
        try:
            got = await answer
        except (GrantRejected, GrantFailed) as exc:
            exc.grant = exc.grant or grant   # discovery names itself
            refused = isinstance(exc, GrantRejected) or exc.refused
            self.count(trigger, exc.grant, "rejected" if refused else "error")
            raise
        except Exception:
            self.count(trigger, grant, "error")   # a provider bug: the manager logs it
            raise
        self.count(trigger, grant, "success")
        return got

    def count(self, trigger: Trigger, grant: str, result: str) -> None:
        self._metrics.token_refresh.labels(self._name, trigger, grant, result).inc()
