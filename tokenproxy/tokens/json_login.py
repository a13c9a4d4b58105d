"""The ``json`` provider: an app's own login and refresh JSON endpoints, read with JSON Pointers."""

from __future__ import annotations

import ssl
from typing import Any

import aiohttp

from tokenproxy.config import JsonCall, JsonProvider
from tokenproxy.tokens.grant import Grant, grant_from
from tokenproxy.tokens.http import call, raise_for_answer


def fill(template: Any, refresh_token: str) -> Any:
    """Replace ``{refresh_token}`` in every string of a JSON template."""
    if isinstance(template, str):
        return template.replace("{refresh_token}", refresh_token)
    if isinstance(template, dict):
        return {k: fill(v, refresh_token) for k, v in template.items()}
    if isinstance(template, list):
        return [fill(v, refresh_token) for v in template]
    return template


class JsonGrantor:
    """Logs in with the configured body; refreshes with the refresh call when there is one."""

    def __init__(
        self, cfg: JsonProvider, session: aiohttp.ClientSession,
        ssl_context: ssl.SSLContext | bool = True,
    ) -> None:
        self._cfg = cfg
        self._session = session
        self._ssl = ssl_context

    can_login = True
    interactive = False
    initial_refresh_token: str | None = None
    login_grant = "json_login"
    refresh_grant = "json_refresh"

    @property
    def can_refresh(self) -> bool:
        return self._cfg.refresh is not None

    async def _call(self, spec: JsonCall, refresh_token: str, what: str) -> Grant:
        headers = {"Accept": "application/json"}
        headers.update({k: fill(v, refresh_token) for k, v in spec.headers})
        kwargs: dict[str, Any] = {"headers": headers}
        if spec.json is not None:
            kwargs["json"] = fill(spec.json, refresh_token)
        answer = await call(self._session, spec.method, spec.url.url, within=self._cfg.timeout,
                            ssl_context=self._ssl, **kwargs)
        raise_for_answer(answer, what)
        return grant_from(answer.json(), access_pointer=spec.access_token,
                          refresh_pointer=spec.refresh_token, expires_pointer=spec.expires_in)

    async def login(self) -> Grant:
        return await self._call(self._cfg.login, "", "login")

    async def refresh(self, refresh_token: str) -> Grant:
        assert self._cfg.refresh is not None
        return await self._call(self._cfg.refresh, refresh_token, "refresh")
