"""The ``oauth2`` provider: client_credentials, password, refresh_token (RFC 6749), token
exchange (RFC 8693) and jwt-bearer (RFC 7523) grants; clients authenticated by secret, by
assertion (RFC 7523 section 3) or by certificate (RFC 8705)."""

from __future__ import annotations

import ssl
from dataclasses import replace
from typing import TYPE_CHECKING
from urllib.parse import quote

import aiohttp

from tokenproxy.clock import Clock
from tokenproxy.config import OAuth2Provider
from tokenproxy.config.model import ACCESS_TOKEN_TYPE, JWT_TOKEN_TYPE
from tokenproxy.log import Redactor
from tokenproxy.tokens.credential_files import CredentialFile
from tokenproxy.tokens.discovery import ServerMetadata, discover
from tokenproxy.tokens.grant import Grant, GrantFailed, GrantRejected, LoginNeeded, grant_from
from tokenproxy.tokens.http import Answer, call, raise_for_answer
from tokenproxy.tokens.subject import Subject

if TYPE_CHECKING:
    from tokenproxy.tokens.assertions import Signer

CLIENT_ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
TOKEN_EXCHANGE_GRANT = "urn:ietf:params:oauth:grant-type:token-exchange"
JWT_BEARER_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"


class OAuth2Grantor:
    """Talks to one token endpoint; knows how to log in and how to refresh."""

    def __init__(
        self, cfg: OAuth2Provider, session: aiohttp.ClientSession,
        ssl_context: ssl.SSLContext | bool = True, *, clock: Clock, redactor: Redactor,
        subject: Subject | None = None,
    ) -> None:
        self._cfg = cfg
        self._session = session
        self._ssl = ssl_context
        self._clock = clock
        self._token_url: str | None = cfg.token_url.url if cfg.token_url else None
        self.metadata: ServerMetadata | None = None   # from discovery, once it succeeded
        self.subject = subject
        self._signer: Signer | None = None
        if cfg.private_key_file is not None or cfg.client_auth == "client_secret_jwt":
            # Here, not at the top: PyJWT and cryptography, for the providers that sign.
            from tokenproxy.tokens.assertions import Signer

            if cfg.private_key_file is not None:
                self._signer = Signer.from_file(cfg.private_key_file, cfg.signing_alg,
                                                cfg.key_id, cfg.assertion_certificate_file)
            elif cfg.client_secret is not None:
                self._signer = Signer.hmac(cfg.client_secret.value, cfg.key_id)

        def file(key: str) -> CredentialFile | None:
            path = getattr(cfg, key)
            return None if path is None else CredentialFile(path, key, cfg.name, redactor,
                                                            cfg.timeout)

        self._client_assertion = file("client_assertion_file")
        self._subject_file = file("subject_token_file")
        self._actor_file = file("actor_token_file")
        self._assertion_file = file("assertion_file")
        # Inputs made elsewhere, which change: their refusal today may be their success
        # after the next rotation, so a refusal is a failure to retry, not a dead end.
        self._inputs_change = subject is not None or any(
            f is not None for f in (self._client_assertion, self._subject_file,
                                    self._actor_file, self._assertion_file))

    @property
    def can_refresh(self) -> bool:
        """The asserted grants are done again at each renewal: their inputs may have moved."""
        return not self._cfg.asserted

    @property
    def interactive(self) -> bool:
        """Device code and browser login: a person logs in (`tokenproxy login`, login/)."""
        return self._cfg.interactive

    refresh_grant = "refresh_token"

    @property
    def login_grant(self) -> str:
        return self._cfg.grant_type

    @property
    def can_login(self) -> bool:
        """A fresh login needs credentials; a refresh_token grant has only its refresh token,
        and an interactive one needs a person."""
        return self._cfg.grant_type != "refresh_token" and not self._cfg.interactive

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

    async def _client_auth(self, form: dict[str, str], headers: dict[str, str],
                           url: str) -> None:
        """The client's credentials, as its client_auth method puts them on the request."""
        cfg = self._cfg
        auth = cfg.client_auth
        if auth == "basic" and cfg.client_id and cfg.client_secret:
            # RFC 6749 section 2.3.1: form-urlencode the id and secret before Basic encoding.
            headers["Authorization"] = aiohttp.encode_basic_auth(
                quote(cfg.client_id, safe=""), quote(cfg.client_secret.value, safe=""))
            return
        if cfg.client_id:
            form["client_id"] = cfg.client_id
        if auth == "post" and cfg.client_secret:
            form["client_secret"] = cfg.client_secret.value
        elif auth in ("client_secret_jwt", "private_key_jwt"):
            assert self._signer is not None
            assert cfg.client_id is not None
            form["client_assertion_type"] = CLIENT_ASSERTION_TYPE
            form["client_assertion"] = self._signer.assertion(
                issuer=cfg.client_id, subject=cfg.client_id,
                audience=cfg.assertion_audience or url, now=self._clock.time())
        elif auth == "client_assertion":
            assert self._client_assertion is not None
            form["client_assertion_type"] = CLIENT_ASSERTION_TYPE
            form["client_assertion"] = await self._client_assertion.read(self._clock.time())
        # tls_client_auth: the certificate in the TLS handshake is the credential (RFC 8705).

    async def _request(self, form: dict[str, str], what: str) -> Grant:
        cfg = self._cfg
        form = dict(form)
        headers = {"Accept": "application/json"}
        url = await self.endpoint()
        await self._client_auth(form, headers, url)
        if cfg.scope:
            form.setdefault("scope", cfg.scope)
        for key, value in cfg.params:
            form.setdefault(key, value)
        answer = await call(self._session, "POST", url, within=cfg.timeout,
                            ssl_context=self._ssl, data=form, headers=headers)
        try:
            raise_for_answer(answer, what, oauth=True)
        except GrantRejected as exc:
            if self.interactive and exc.error is None:
                # A person's refresh refused without an OAuth error (a WAF's 403 page, a
                # proxy's 401): not the issuer ending the login, so retried, not logged out.
                failed = GrantFailed(exc.reason)
                failed.refused = True
                raise failed from None
            if not self._inputs_change:
                raise
            failed = GrantFailed(exc.reason)
            failed.refused = True
            raise failed from None
        grant = grant_from(answer.json())
        # A refresh token would renew from inputs that may have moved since: never kept.
        return replace(grant, refresh_token=None) if cfg.asserted else grant

    async def login(self) -> Grant:
        cfg = self._cfg
        if cfg.interactive:
            raise LoginNeeded(f"{cfg.grant_type}: a person logs in with `tokenproxy login`")
        if cfg.grant_type == "password":
            assert cfg.username is not None
            assert cfg.password is not None
            return await self._request(
                {"grant_type": "password", "username": cfg.username,
                 "password": cfg.password.value}, "password grant")
        if cfg.grant_type == "token_exchange":
            return await self._request(await self._exchange_form(), "token exchange")
        if cfg.grant_type == "jwt_bearer":
            return await self._request(
                {"grant_type": JWT_BEARER_GRANT, "assertion": await self._bearer_assertion()},
                "jwt_bearer grant")
        return await self._request({"grant_type": "client_credentials"},
                                   "client_credentials grant")

    # -- for the interactive logins (login/) ----------------------------------------------

    async def login_endpoint(self, kind: str) -> str | None:
        """``device_authorization``, ``authorization`` or ``revocation``: configured, or from
        the issuer's metadata (discovered with the token endpoint); None when unknown."""
        configured = {"device_authorization": self._cfg.device_authorization_url,
                      "authorization": self._cfg.authorization_url,
                      "revocation": self._cfg.revocation_url}.get(kind)
        if configured is not None:
            return configured.url
        await self.endpoint()
        if self.metadata is None:
            return None
        found: str | None = getattr(self.metadata, f"{kind}_endpoint")
        return found

    async def post(self, url: str, form: dict[str, str], what: str) -> Answer:
        """A form POST to one of the issuer's endpoints, the client authenticated as for the
        token endpoint (device authorization, revocation)."""
        form = dict(form)
        headers = {"Accept": "application/json"}
        await self._client_auth(form, headers, url)
        return await call(self._session, "POST", url, within=self._cfg.timeout,
                          ssl_context=self._ssl, data=form, headers=headers)

    async def userinfo(self, url: str, access_token: str) -> object:
        """The OpenID Connect userinfo document for *access_token*; None when it fails (it
        only says who logged in)."""
        try:
            answer = await call(self._session, "GET", url, within=self._cfg.timeout,
                                ssl_context=self._ssl,
                                headers={"Accept": "application/json",
                                         "Authorization": f"Bearer {access_token}"})
            return answer.json() if answer.status == 200 else None
        except GrantFailed:
            return None

    async def redeem(self, form: dict[str, str], what: str) -> Grant:
        """A token request of a login flow (device code polling, code redemption)."""
        return await self._request(form, what)

    async def refresh(self, refresh_token: str) -> Grant:
        return await self._request(
            {"grant_type": "refresh_token", "refresh_token": refresh_token}, "refresh grant")

    async def _exchange_form(self) -> dict[str, str]:
        """RFC 8693 section 2.1: the subject (a file's content or another provider's token),
        the actor if any, and what is asked for."""
        cfg = self._cfg
        now = self._clock.time()
        if self.subject is not None:
            subject, default_type = await self.subject.token(), ACCESS_TOKEN_TYPE
        else:
            assert self._subject_file is not None
            subject, default_type = await self._subject_file.read(now), JWT_TOKEN_TYPE
        form = {"grant_type": TOKEN_EXCHANGE_GRANT, "subject_token": subject,
                "subject_token_type": cfg.subject_token_type or default_type}
        if self._actor_file is not None:
            form["actor_token"] = await self._actor_file.read(now)
            form["actor_token_type"] = cfg.actor_token_type
        for key in ("audience", "resource", "requested_token_type"):
            value = getattr(cfg, key)
            if value is not None:
                form[key] = value
        return form

    async def _bearer_assertion(self) -> str:
        """RFC 7523 section 2.1: the assertion from its file, or signed here."""
        cfg = self._cfg
        if self._assertion_file is not None:
            return await self._assertion_file.read(self._clock.time())
        assert self._signer is not None
        issuer = cfg.issuer_claim or cfg.client_id
        subject = cfg.subject_claim or cfg.client_id
        assert issuer is not None
        assert subject is not None
        return self._signer.assertion(issuer=issuer, subject=subject,
                                      audience=cfg.assertion_audience or await self.endpoint(),
                                      now=self._clock.time())
