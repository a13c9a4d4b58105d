"""The ``oauth2`` provider: client_credentials, password and refresh_token grants (RFC 6749)."""

from __future__ import annotations

import ssl
from urllib.parse import quote

import aiohttp

from tokenproxy.config import OAuth2Provider
from tokenproxy.tokens.discovery import ServerMetadata, discover
from tokenproxy.tokens.grant import Grant, grant_from
from tokenproxy.tokens.http import call, raise_for_answer


class OAuth2Grantor:
    """Talks to one token endpoint; knows how to log in and how to refresh."""

    def __init__(
        self, cfg: OAuth2Provider, session: aiohttp.ClientSession,
        ssl_context: ssl.SSLContext | bool = True,
    ) -> None:
        self._cfg = cfg
        self._session = session
        self._ssl = ssl_context
        self._token_url: str | None = cfg.token_url.url if cfg.token_url else None
        self.metadata: ServerMetadata | None = None   # from discovery, once it succeeded

    can_refresh = True
    refresh_grant = "refresh_token"

    @property
    def login_grant(self) -> str:
        return self._cfg.grant_type

    @property
    def can_login(self) -> bool:
        """A fresh login needs credentials; a refresh_token grant has only its refresh token."""
        return self._cfg.grant_type != "refresh_token"

    @property
    def initial_refresh_token(self) -> str | None:
        return self._cfg.refresh_token.value if self._cfg.refresh_token else None

    async def endpoint(self) -> str:
        """The token endpoint: configured, or discovered from the issuer (once)."""
        if self._token_url is not None:
            return self._token_url
        assert self._cfg.issuer is not None
        self.metadata = await discover(self._session, self._cfg.issuer,
                                       within=self._cfg.timeout, ssl_context=self._ssl)
        self._token_url = self.metadata.token_endpoint
        return self._token_url

    async def _request(self, form: dict[str, str], what: str) -> Grant:
        cfg = self._cfg
        form = dict(form)
        headers = {"Accept": "application/json"}
        if cfg.client_auth == "basic" and cfg.client_id and cfg.client_secret:
            # RFC 6749 section 2.3.1: form-urlencode the id and secret before Basic encoding.
            headers["Authorization"] = aiohttp.encode_basic_auth(
                quote(cfg.client_id, safe=""), quote(cfg.client_secret.value, safe=""))
        elif cfg.client_auth == "post" and cfg.client_id and cfg.client_secret:
            form["client_id"] = cfg.client_id
            form["client_secret"] = cfg.client_secret.value
        elif cfg.client_id:
            form["client_id"] = cfg.client_id
        if cfg.scope:
            form.setdefault("scope", cfg.scope)
        for key, value in cfg.params:
            form.setdefault(key, value)
        url = await self.endpoint()
        answer = await call(self._session, "POST", url, within=cfg.timeout,
                            ssl_context=self._ssl, data=form, headers=headers)
        raise_for_answer(answer, what)
        return grant_from(answer.json())

    async def login(self) -> Grant:
        cfg = self._cfg
        if cfg.grant_type == "password":
            assert cfg.username is not None
            assert cfg.password is not None
            return await self._request(
                {"grant_type": "password", "username": cfg.username,
                 "password": cfg.password.value}, "password grant")
        return await self._request({"grant_type": "client_credentials"},
                                   "client_credentials grant")

    async def refresh(self, refresh_token: str) -> Grant:
        return await self._request(
            {"grant_type": "refresh_token", "refresh_token": refresh_token}, "refresh grant")
