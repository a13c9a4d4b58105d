"""The demo issuer's interactive logins (tokenproxy/demo/issuer.py): the device authorization
grant (RFC 8628), the authorization code grant with PKCE on loopback redirects (RFC 6749 4.1,
RFC 7636, RFC 8252, RFC 9207), the unsigned id_token, revocation (RFC 7009) and userinfo, driven
over HTTP with the test clock moving every lifetime and polling interval."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import secrets
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiohttp
import pytest

from tests.helpers.fakes import CLIENT_SECRET, PASSWORD, JumpClock
from tests.helpers.idp import UNAVAILABLE, Idp, StartIdp
from tokenproxy.demo.issuer import DEVICE_GRANT

CLI = "demo-cli"
REDIRECT = "http://127.0.0.1:53682/callback"


async def post(http: aiohttp.ClientSession, url: str, data: dict[str, str],
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST a form; the status and the JSON answer (None when the body is not JSON)."""
    async with http.post(url, data=data, headers=headers) as r:
        body = await r.read()
        try:
            doc = json.loads(body) if body else None
        except ValueError:
            doc = None
        return r.status, doc


async def start_device(http: aiohttp.ClientSession, idp: Idp,
                       **form: str) -> dict[str, Any]:
    status, doc = await post(http, idp.url + "/oauth/device", {"client_id": CLI, **form})
    assert 200 == status, doc
    assert isinstance(doc, dict)
    return doc


async def poll(http: aiohttp.ClientSession, idp: Idp, device_code: str,
               client_id: str = CLI) -> tuple[int, Any]:
    return await post(http, idp.token_url, {"grant_type": DEVICE_GRANT,
                                            "device_code": device_code, "client_id": client_id})


def error_of(answer: tuple[int, Any]) -> tuple[int, str]:
    status, doc = answer
    return status, doc["error"]


def pkce() -> tuple[str, str]:
    """A code verifier and its S256 challenge, computed here independently of the issuer."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode()).digest()
    return verifier, base64.urlsafe_b64encode(digest).decode().rstrip("=")


async def authorize(http: aiohttp.ClientSession, idp: Idp, challenge: str,
                    **params: str) -> aiohttp.ClientResponse:
    """GET /oauth/authorize without following the redirect; *params* override the defaults
    (a value of "" drops the parameter)."""
    query = {"response_type": "code", "client_id": CLI, "redirect_uri": REDIRECT,
             "state": "st-1", "code_challenge": challenge, "code_challenge_method": "S256",
             "scope": "openid profile", **params}
    query = {k: v for k, v in query.items() if v != ""}
    async with http.get(idp.url + "/oauth/authorize", params=query,
                        allow_redirects=False) as r:
        await r.read()
        return r


def redirect_params(resp: aiohttp.ClientResponse, redirect: str = REDIRECT) -> dict[str, str]:
    assert 302 == resp.status
    location = resp.headers["Location"]
    assert location.startswith(redirect + "?")
    return {k: v for k, [v] in parse_qs(urlsplit(location).query).items()}


async def code_tokens(http: aiohttp.ClientSession, idp: Idp, code: str, verifier: str,
                      **form: str) -> tuple[int, Any]:
    return await post(http, idp.token_url, {
        "grant_type": "authorization_code", "code": code, "redirect_uri": REDIRECT,
        "code_verifier": verifier, "client_id": CLI, **form})


async def login_by_code(http: aiohttp.ClientSession, idp: Idp) -> dict[str, Any]:
    verifier, challenge = pkce()
    idp.issuer.approve_next = "demo"
    params = redirect_params(await authorize(http, idp, challenge))
    status, doc = await code_tokens(http, idp, params["code"], verifier)
    assert 200 == status, doc
    assert isinstance(doc, dict)
    return doc


def claims_of(id_token: str) -> tuple[dict[str, Any], dict[str, Any], str]:
    header, payload, signature = id_token.split(".")

    def load(part: str) -> dict[str, Any]:
        doc = json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4)))
        assert isinstance(doc, dict)
        return doc

    return load(header), load(payload), signature


async def api_status(http: aiohttp.ClientSession, idp: Idp, access: str) -> int:
    async with http.get(idp.url + "/api/x", headers={"Authorization": "Bearer " + access}) as r:
        return r.status


async def userinfo(http: aiohttp.ClientSession, idp: Idp,
                   headers: dict[str, str]) -> tuple[int, Any]:
    async with http.get(idp.url + "/oauth/userinfo", headers=headers) as r:
        return r.status, await r.json()


# -- discovery -------------------------------------------------------------------------------


async def test_discovery_names_the_login_endpoints(
    start: StartIdp, http: aiohttp.ClientSession
) -> None:
    idp = await start()
    async with http.get(idp.url + "/.well-known/openid-configuration") as r:
        doc = await r.json()
    assert idp.url == doc["issuer"]
    assert idp.url + "/oauth/token" == doc["token_endpoint"]
    assert idp.url + "/oauth/device" == doc["device_authorization_endpoint"]
    assert idp.url + "/oauth/authorize" == doc["authorization_endpoint"]
    assert idp.url + "/oauth/revoke" == doc["revocation_endpoint"]
    assert idp.url + "/oauth/userinfo" == doc["userinfo_endpoint"]
    assert ["S256"] == doc["code_challenge_methods_supported"]
    assert doc["authorization_response_iss_parameter_supported"] is True
    assert {"client_credentials", "password", "refresh_token", "authorization_code",
            DEVICE_GRANT} == set(doc["grant_types_supported"])


# -- the device authorization grant ----------------------------------------------------------


async def test_device_flow_pending_approved_then_spent(
    start: StartIdp, http: aiohttp.ClientSession, clock: JumpClock
) -> None:
    """authorization_pending until a person approves at /device; then the tokens (with an
    id_token of the approving user) once, and the device code is spent."""
    idp = await start()
    doc = await start_device(http, idp, scope="openid email")
    user_code = doc["user_code"]
    assert re.fullmatch(r"[A-Z]{4}-[A-Z]{4}", user_code)
    assert idp.url + "/device" == doc["verification_uri"]
    assert idp.url + "/device?user_code=" + user_code == doc["verification_uri_complete"]
    assert 600 == doc["expires_in"]
    assert 5 == doc["interval"]
    assert [user_code] == idp.issuer.pending_user_codes

    assert (400, "authorization_pending") == error_of(await poll(http, idp, doc["device_code"]))
    clock.advance(5)
    assert (400, "authorization_pending") == error_of(await poll(http, idp, doc["device_code"]))

    # The person enters the code as typed (lower case, no dash) and approves.
    status, _ = await post(http, idp.url + "/device",
                           {"user_code": user_code.replace("-", "").lower(),
                            "action": "approve"})
    assert 200 == status
    assert [] == idp.issuer.pending_user_codes
    clock.advance(5)
    status, tokens = await poll(http, idp, doc["device_code"])
    assert 200 == status, tokens
    assert {"access_token", "token_type", "expires_in", "refresh_token", "scope",
            "id_token"} <= set(tokens)
    assert "Bearer" == tokens["token_type"]
    assert "openid email" == tokens["scope"]
    _, claims, _ = claims_of(tokens["id_token"])
    assert ("demo", CLI, "Demo User") == (claims["sub"], claims["aud"], claims["name"])
    assert 200 == await api_status(http, idp, tokens["access_token"])

    clock.advance(5)
    assert (400, "invalid_grant") == error_of(await poll(http, idp, doc["device_code"]))


async def test_device_polled_too_soon_slows_down_by_five_seconds_each_time(
    start: StartIdp, http: aiohttp.ClientSession, clock: JumpClock
) -> None:
    """RFC 8628 3.5: a poll sooner than the interval since the last one answers slow_down, and
    the interval that code needs grows by 5 s each time."""
    idp = await start()
    code = (await start_device(http, idp))["device_code"]
    assert (400, "authorization_pending") == error_of(await poll(http, idp, code))
    clock.advance(4.9)
    assert (400, "slow_down") == error_of(await poll(http, idp, code))      # now 10 s
    clock.advance(9.9)
    assert (400, "slow_down") == error_of(await poll(http, idp, code))      # now 15 s
    clock.advance(14.9)
    assert (400, "slow_down") == error_of(await poll(http, idp, code))      # now 20 s
    clock.advance(20)
    assert (400, "authorization_pending") == error_of(await poll(http, idp, code))
    idp.issuer.approve(idp.issuer.pending_user_codes[0])
    clock.advance(20)
    assert 200 == (await poll(http, idp, code))[0]


async def test_slow_down_next_answers_slow_down_regardless_and_grows_the_interval(
    start: StartIdp, http: aiohttp.ClientSession, clock: JumpClock
) -> None:
    idp = await start(auto_approve=True)
    code = (await start_device(http, idp))["device_code"]
    idp.issuer.slow_down_next = 2
    assert (400, "slow_down") == error_of(await poll(http, idp, code))
    clock.advance(10)
    assert (400, "slow_down") == error_of(await poll(http, idp, code))
    assert 0 == idp.issuer.slow_down_next
    clock.advance(14)      # the interval is 15 s now: 5 + 2 * 5
    assert (400, "slow_down") == error_of(await poll(http, idp, code))
    clock.advance(20)
    assert 200 == (await poll(http, idp, code))[0]


async def test_auto_approve_answers_the_first_poll_with_tokens(
    start: StartIdp, http: aiohttp.ClientSession
) -> None:
    idp = await start(auto_approve=True)
    doc = await start_device(http, idp)
    assert [] == idp.issuer.pending_user_codes
    status, tokens = await poll(http, idp, doc["device_code"])
    assert 200 == status
    assert "openid profile email" == tokens["scope"]


@pytest.mark.parametrize("how", ["method", "page"])
async def test_device_denied_answers_access_denied(
    start: StartIdp, http: aiohttp.ClientSession, clock: JumpClock, how: str
) -> None:
    idp = await start()
    doc = await start_device(http, idp)
    if how == "method":
        idp.issuer.deny(doc["user_code"])
    else:
        status, _ = await post(http, idp.url + "/device",
                               {"user_code": doc["user_code"], "action": "deny"})
        assert 200 == status
    assert (400, "access_denied") == error_of(await poll(http, idp, doc["device_code"]))
    clock.advance(5)
    assert (400, "access_denied") == error_of(await poll(http, idp, doc["device_code"]))
    with pytest.raises(ValueError, match="already answered"):
        idp.issuer.approve(doc["user_code"])


async def test_device_code_expires(
    start: StartIdp, http: aiohttp.ClientSession, clock: JumpClock
) -> None:
    idp = await start(device_lifetime=30, device_interval=2)
    doc = await start_device(http, idp)
    assert (30, 2) == (doc["expires_in"], doc["interval"])
    clock.advance(30)
    assert [] == idp.issuer.pending_user_codes
    with pytest.raises(ValueError, match="expired"):
        idp.issuer.approve(doc["user_code"])
    assert (400, "expired_token") == error_of(await poll(http, idp, doc["device_code"]))


async def test_device_endpoint_clients(start: StartIdp, http: aiohttp.ClientSession) -> None:
    """An unknown client is invalid_client; the confidential client may not use the device
    grant (unauthorized_client); another client's device code is an invalid_grant."""
    idp = await start()
    status, doc = await post(http, idp.url + "/oauth/device", {"client_id": "nobody"})
    assert (401, "invalid_client") == (status, doc["error"])
    status, doc = await post(http, idp.url + "/oauth/device",
                             {"client_id": "demo-client", "client_secret": CLIENT_SECRET})
    assert (400, "unauthorized_client") == (status, doc["error"])
    code = (await start_device(http, idp))["device_code"]
    assert (401, "invalid_client") == error_of(await poll(http, idp, code, "nobody"))
    assert (400, "invalid_grant") == error_of(await poll(http, idp, "dc-unknown"))


async def test_device_page_refuses_unknown_codes_and_actions(
    start: StartIdp, http: aiohttp.ClientSession
) -> None:
    idp = await start()
    doc = await start_device(http, idp)
    async with http.get(doc["verification_uri_complete"]) as r:
        assert 200 == r.status
        assert doc["user_code"] in await r.text()
    for form in ({"user_code": "BBBB-BBBB", "action": "approve"},
                 {"user_code": doc["user_code"], "action": "maybe"},
                 {"user_code": doc["user_code"], "action": "approve", "user": "mallory"}):
        async with http.post(idp.url + "/device", data=form) as r:
            assert 400 == r.status, form
    assert [doc["user_code"]] == idp.issuer.pending_user_codes


async def test_device_approved_for_another_user(
    start: StartIdp, http: aiohttp.ClientSession
) -> None:
    idp = await start(users={"demo": PASSWORD, "ann": PASSWORD},
                      profiles={"ann": {"name": "Ann", "email": "ann@example.com"}})
    doc = await start_device(http, idp)
    status, _ = await post(http, idp.url + "/device", {"user_code": doc["user_code"],
                                                       "action": "approve", "user": "ann"})
    assert 200 == status
    _, tokens = await poll(http, idp, doc["device_code"])
    _, claims, _ = claims_of(tokens["id_token"])
    assert ("ann", "Ann", "ann@example.com") == (claims["sub"], claims["name"], claims["email"])


# -- the authorization code grant with PKCE --------------------------------------------------


async def test_authorization_code_with_pkce(
    start: StartIdp, http: aiohttp.ClientSession, clock: JumpClock
) -> None:
    idp = await start(auto_approve=True)
    verifier, challenge = pkce()
    params = redirect_params(await authorize(http, idp, challenge))
    assert {"code", "state", "iss"} == set(params)
    assert ("st-1", idp.url) == (params["state"], params["iss"])
    status, tokens = await code_tokens(http, idp, params["code"], verifier)
    assert 200 == status, tokens
    assert "openid profile" == tokens["scope"]
    header, claims, signature = claims_of(tokens["id_token"])
    assert {"alg": "none", "typ": "JWT"} == header
    assert "" == signature
    now = int(clock.time())
    assert {"iss": idp.url, "sub": "demo", "aud": CLI, "name": "Demo User",
            "email": "demo@example.com", "iat": now, "exp": now + 10} == claims
    assert 200 == await api_status(http, idp, tokens["access_token"])


async def test_authorization_code_reuse_is_refused_and_revokes_its_tokens(
    start: StartIdp, http: aiohttp.ClientSession
) -> None:
    idp = await start(auto_approve=True)
    verifier, challenge = pkce()
    params = redirect_params(await authorize(http, idp, challenge))
    status, tokens = await code_tokens(http, idp, params["code"], verifier)
    assert 200 == status
    assert (400, "invalid_grant") == error_of(
        await code_tokens(http, idp, params["code"], verifier))
    assert 1 == idp.issuer.stats.code_reuse
    assert 401 == await api_status(http, idp, tokens["access_token"])


@pytest.mark.parametrize(("change", "form"), [
    ("verifier", {"code_verifier": secrets.token_urlsafe(48)}),
    ("short verifier", {"code_verifier": "abc"}),
    ("no verifier", {"code_verifier": ""}),
    ("redirect_uri", {"redirect_uri": "http://127.0.0.1:53682/other"}),
    ("redirect port", {"redirect_uri": "http://127.0.0.1:1234/callback"}),
])
async def test_authorization_code_mismatch_is_invalid_grant_and_spends_the_code(
    start: StartIdp, http: aiohttp.ClientSession, change: str, form: dict[str, str]
) -> None:
    idp = await start(auto_approve=True)
    verifier, challenge = pkce()
    params = redirect_params(await authorize(http, idp, challenge))
    assert (400, "invalid_grant") == error_of(
        await code_tokens(http, idp, params["code"], verifier, **form))
    assert (400, "invalid_grant") == error_of(
        await code_tokens(http, idp, params["code"], verifier))


async def test_authorization_code_expires_after_a_minute(
    start: StartIdp, http: aiohttp.ClientSession, clock: JumpClock
) -> None:
    idp = await start(auto_approve=True)
    verifier, challenge = pkce()
    params = redirect_params(await authorize(http, idp, challenge))
    clock.advance(60)
    assert (400, "invalid_grant") == error_of(
        await code_tokens(http, idp, params["code"], verifier))


async def test_authorization_code_clients(start: StartIdp, http: aiohttp.ClientSession) -> None:
    idp = await start(auto_approve=True)
    verifier, challenge = pkce()
    params = redirect_params(await authorize(http, idp, challenge))
    assert (401, "invalid_client") == error_of(
        await code_tokens(http, idp, params["code"], verifier, client_id="nobody"))
    assert (400, "unauthorized_client") == error_of(await code_tokens(
        http, idp, params["code"], verifier, client_id="demo-client",
        client_secret=CLIENT_SECRET))
    # The public client may not use the confidential client's grants.
    assert (400, "unauthorized_client") == error_of(await post(http, idp.token_url, {
        "grant_type": "password", "username": "demo", "password": PASSWORD, "client_id": CLI}))


@pytest.mark.parametrize("params", [
    {"client_id": "nobody"},
    {"client_id": "demo-client"},
    {"redirect_uri": ""},
    {"redirect_uri": "http://localhost:53682/callback"},
    {"redirect_uri": "https://127.0.0.1:53682/callback"},
    {"redirect_uri": "http://127.0.0.1/callback"},
    {"redirect_uri": "http://127.0.0.1:0/callback"},
    {"redirect_uri": "http://127.0.0.1:70000/callback"},
    {"redirect_uri": "http://127.0.0.1:53682/callback#frag"},
    {"redirect_uri": "http://127.0.0.2:53682/callback"},
    {"redirect_uri": "http://evil.example@127.0.0.1:53682/callback"},
    {"redirect_uri": "http://127.0.0.1:53682.evil.example/callback"},
    {"response_type": "token"},
    {"code_challenge": ""},
    {"code_challenge_method": ""},
    {"code_challenge_method": "plain"},
    {"code_challenge": "too-short"},
], ids=lambda p: "-".join(f"{k}={v}" for k, v in p.items()))
@pytest.mark.slow
async def test_authorize_refuses_bad_requests_without_redirecting(
    start: StartIdp, http: aiohttp.ClientSession, params: dict[str, str]
) -> None:
    idp = await start(auto_approve=True)
    _, challenge = pkce()
    resp = await authorize(http, idp, challenge, **params)
    assert 400 == resp.status
    assert "Location" not in resp.headers
    assert resp.headers["Content-Type"].startswith("text/html")


@pytest.mark.parametrize("redirect", ["http://[::1]:1/cb", "http://127.0.0.1:65535",
                                      "http://127.0.0.1:8080/a/b?x=1"])
async def test_authorize_accepts_any_loopback_port_and_path(
    start: StartIdp, http: aiohttp.ClientSession, redirect: str
) -> None:
    idp = await start(auto_approve=True)
    verifier, challenge = pkce()
    resp = await authorize(http, idp, challenge, redirect_uri=redirect)
    assert 302 == resp.status
    location = resp.headers["Location"]
    assert location.startswith(redirect + ("&" if "?" in redirect else "?"))
    [code] = parse_qs(urlsplit(location).query)["code"]
    status, _ = await code_tokens(http, idp, code, verifier, redirect_uri=redirect)
    assert 200 == status


async def test_authorize_without_iss_and_without_state(
    start: StartIdp, http: aiohttp.ClientSession
) -> None:
    idp = await start(auto_approve=True, send_iss=False)
    _, challenge = pkce()
    params = redirect_params(await authorize(http, idp, challenge, state=""))
    assert {"code"} == set(params)


async def test_authorize_waits_for_a_person_then_approve_next_and_deny_next(
    start: StartIdp, http: aiohttp.ClientSession
) -> None:
    """Without approval a page says a person must approve (no redirect); approve_next and
    deny_next each answer the next request only."""
    idp = await start(users={"demo": PASSWORD, "ann": PASSWORD})
    verifier, challenge = pkce()
    resp = await authorize(http, idp, challenge)
    assert 200 == resp.status
    assert "Location" not in resp.headers

    idp.issuer.deny_next = True
    params = redirect_params(await authorize(http, idp, challenge))
    assert {"error": "access_denied", "state": "st-1", "iss": idp.url} == params
    assert 200 == (await authorize(http, idp, challenge)).status

    idp.issuer.approve_next = "ann"
    params = redirect_params(await authorize(http, idp, challenge))
    assert idp.issuer.approve_next is None
    _, tokens = await code_tokens(http, idp, params["code"], verifier)
    assert "ann" == claims_of(tokens["id_token"])[1]["sub"]
    assert 200 == (await authorize(http, idp, challenge)).status
    assert 5 == idp.issuer.stats.authorizations
    assert challenge == idp.issuer.authorize_requests[-1]["code_challenge"]


# -- refresh tokens of the public client -----------------------------------------------------


async def test_public_refresh_tokens_are_bound_to_the_public_client(
    start: StartIdp, http: aiohttp.ClientSession
) -> None:
    idp = await start()
    tokens = await login_by_code(http, idp)
    # The confidential client cannot use it (and that is no reuse: the token stays good).
    assert (400, "invalid_grant") == error_of(await post(http, idp.token_url, {
        "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"],
        "client_id": "demo-client", "client_secret": CLIENT_SECRET}))
    status, fresh = await post(http, idp.token_url, {
        "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"],
        "client_id": CLI})
    assert 200 == status, fresh
    assert {"refresh_token", "id_token", "scope"} <= set(fresh)
    assert 0 == idp.issuer.stats.reuse_detected
    # A spent one is reuse: the family goes.
    assert (400, "invalid_grant") == error_of(await post(http, idp.token_url, {
        "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"],
        "client_id": CLI}))
    assert 1 == idp.issuer.stats.reuse_detected
    assert 401 == await api_status(http, idp, fresh["access_token"])

    # The confidential client's refresh tokens are not the public client's.
    status, doc = await post(http, idp.token_url, {
        "grant_type": "password", "username": "demo", "password": PASSWORD,
        "client_id": "demo-client", "client_secret": CLIENT_SECRET})
    assert 200 == status
    assert "id_token" not in doc
    assert (400, "invalid_grant") == error_of(await post(http, idp.token_url, {
        "grant_type": "refresh_token", "refresh_token": doc["refresh_token"],
        "client_id": CLI}))


# -- revocation ------------------------------------------------------------------------------


async def test_revoking_a_refresh_token_revokes_its_family(
    start: StartIdp, http: aiohttp.ClientSession
) -> None:
    idp = await start()
    tokens = await login_by_code(http, idp)
    other = await login_by_code(http, idp)
    status, _ = await post(http, idp.url + "/oauth/revoke", {
        "token": tokens["refresh_token"], "token_type_hint": "refresh_token",
        "client_id": CLI})
    assert 200 == status
    assert (1, 1) == (idp.issuer.stats.revocations, idp.issuer.stats.revoked)
    assert 401 == await api_status(http, idp, tokens["access_token"])
    assert 401 == (await userinfo(http, idp,
                                  {"Authorization": "Bearer " + tokens["access_token"]}))[0]
    assert (400, "invalid_grant") == error_of(await post(http, idp.token_url, {
        "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"],
        "client_id": CLI}))
    # Another login's family is untouched.
    assert 200 == await api_status(http, idp, other["access_token"])


async def test_revoking_an_access_token_leaves_its_refresh_token(
    start: StartIdp, http: aiohttp.ClientSession
) -> None:
    idp = await start()
    tokens = await login_by_code(http, idp)
    status, _ = await post(http, idp.url + "/oauth/revoke",
                           {"token": tokens["access_token"], "client_id": CLI})
    assert 200 == status
    assert 401 == await api_status(http, idp, tokens["access_token"])
    status, _ = await post(http, idp.token_url, {
        "grant_type": "refresh_token", "refresh_token": tokens["refresh_token"],
        "client_id": CLI})
    assert 200 == status


async def test_revocation_answers_and_client_checks(
    start: StartIdp, http: aiohttp.ClientSession
) -> None:
    """200 for unknown tokens; 401 for an unknown client; another client's token is left
    alone (and still answered 200); the confidential client authenticates with its secret."""
    idp = await start()
    tokens = await login_by_code(http, idp)
    url = idp.url + "/oauth/revoke"
    assert 200 == (await post(http, url, {"token": "rt-unknown", "client_id": CLI}))[0]
    assert (401, "invalid_client") == error_of(
        await post(http, url, {"token": tokens["refresh_token"], "client_id": "nobody"}))
    assert (401, "invalid_client") == error_of(await post(http, url, {
        "token": tokens["refresh_token"], "client_id": "demo-client",
        "client_secret": "wrong"}))
    assert (400, "invalid_request") == error_of(await post(http, url, {"client_id": CLI}))
    assert 200 == (await post(http, url, {"token": tokens["refresh_token"],
                                          "client_id": "demo-client",
                                          "client_secret": CLIENT_SECRET}))[0]
    assert 200 == await api_status(http, idp, tokens["access_token"])
    assert (2, 0) == (idp.issuer.stats.revocations, idp.issuer.stats.revoked)


# -- userinfo --------------------------------------------------------------------------------


async def test_userinfo(start: StartIdp, http: aiohttp.ClientSession, clock: JumpClock) -> None:
    idp = await start()
    tokens = await login_by_code(http, idp)
    bearer = {"Authorization": "Bearer " + tokens["access_token"]}
    assert (200, {"sub": "demo", "name": "Demo User", "email": "demo@example.com"}) == (
        await userinfo(http, idp, bearer))
    assert 401 == (await userinfo(http, idp, {}))[0]
    assert 401 == (await userinfo(http, idp, {"Authorization": "Bearer at-unknown"}))[0]
    clock.advance(10)                                  # the access token's lifetime
    status, doc = await userinfo(http, idp, bearer)
    assert (401, "invalid_token") == (status, doc["error"])
    assert 4 == idp.issuer.stats.userinfo_calls


# -- fault hooks -----------------------------------------------------------------------------


async def test_fault_hooks_see_the_login_endpoints(
    start: StartIdp, http: aiohttp.ClientSession
) -> None:
    """The tests' fault hook is called on the new endpoints too, labelled device_authorization,
    authorize, revoke and userinfo (the token endpoint keeps the grant type as its label)."""
    idp = await start()
    idp.calls.queue.append(UNAVAILABLE)
    status, doc = await post(http, idp.url + "/oauth/device", {"client_id": CLI})
    assert (503, "temporarily_unavailable") == (status, doc["error"])
    doc = await start_device(http, idp)
    await poll(http, idp, doc["device_code"])
    _, challenge = pkce()
    await authorize(http, idp, challenge)
    await post(http, idp.url + "/oauth/revoke", {"token": "x", "client_id": CLI})
    await userinfo(http, idp, {})
    assert ["device_authorization", "device_authorization", DEVICE_GRANT, "authorize",
            "revoke", "userinfo"] == idp.calls.grants()
    assert {"client_id": CLI} == idp.calls.seen[0].form
