"""Client authentication without a shared secret, end to end: client_secret_jwt,
private_key_jwt (RSA, PS256, EC P-256 and P-384, Ed25519; PKCS#8 and traditional PEM; kid)
and a JWT made elsewhere as client_assertion (re-read on every token request), each through
a real daemon to an upstream that gets a token the fake endpoint issued. The endpoint
(tests/helpers/assertion_issuer.py) verifies every assertion with joserfc, not with the PyJWT
that tokenproxy signs with. Also: files that break and mend, key files others can read, the
config errors of the new keys (exit 2 naming the key), and the sweep that no key, secret,
assertion or token shows in logs, metrics, problem bodies or check-config output."""

from __future__ import annotations

import base64
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.helpers.assertion_issuer import (
    BREAKAGES,
    CLIENT_ASSERTION_TYPE,
    AssertionIssuer,
    Call,
    Client,
    StartIssuer,
    expire,
    file_fails_then_heals,
    provider_at,
    through,
)
from tests.helpers.client import fetch
from tests.helpers.config import MakeProxy, write_config
from tests.helpers.fakes import (
    CLIENT_SECRET,
    TOKEN,
    FakeUpstream,
    JumpClock,
    assert_no_secret,
)
from tests.helpers.idp import config
from tests.helpers.keys import (
    K8S_ISSUER,
    K8S_SUBJECT,
    KeyPair,
    external_jwt,
    make_key,
    write_file,
)
from tests.helpers.logs import CapturedLogs, failures
from tests.helpers.tls import client_tls
from tests.helpers.wait import readyz, wait_for, wait_ready
from tokenproxy.cli import main
from tokenproxy.config import build_config
from tokenproxy.tokens.credential_files import jwt_expiry

CLIENT_ID = "demo-client"
KID = "2026-key-1"
# The audience Entra ID's workload identity federation wants in a projected token.
FEDERATION_AUD = "api://AzureADTokenExchange"


def assert_client_assertion(call: Call, clock: JumpClock, *, aud: str, alg: str,
                            kid: str | None) -> None:
    """RFC 7523 section 3 as the daemon must send it (the endpoint verified the signature,
    the times and the jti already): the form, the header, and claims made on the daemon's
    clock, iat now and exp five minutes later (the most RFC 7523 issuers commonly take)."""
    assert {"grant_type": "client_credentials", "client_id": CLIENT_ID,
            "client_assertion_type": CLIENT_ASSERTION_TYPE} == {
        k: v for k, v in call.form.items() if k != "client_assertion"}
    assert "authorization" not in call.headers
    header, claims = call.assertion_header, call.assertion_claims
    assert header is not None
    assert claims is not None
    assert (alg, kid) == (header["alg"], header.get("kid"))
    assert (CLIENT_ID, CLIENT_ID, aud) == (claims["iss"], claims["sub"], claims["aud"])
    assert abs(claims["iat"] - clock.time()) < 1
    assert 300 == claims["exp"] - claims["iat"]
    assert isinstance(claims["jti"], str)
    assert claims["jti"]


def key_client(issuer: AssertionIssuer, key: KeyPair, kid: str | None = KID) -> None:
    issuer.register(Client(CLIENT_ID, "private_key_jwt", keys={kid: key.public}))


# -- client_secret_jwt -----------------------------------------------------------------------


async def test_client_secret_jwt_end_to_end(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    clock: JumpClock, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    """client_secret_jwt: an HS256 assertion made with the client secret, which itself never
    goes on the wire; the upstream gets the token issued for it."""
    issuer = await issuers()
    issuer.register(Client(CLIENT_ID, "client_secret_jwt", secret=CLIENT_SECRET))
    daemon = await make_proxy(config(provider_at(
        issuer, client_id=CLIENT_ID, client_secret=CLIENT_SECRET,
        client_auth="client_secret_jwt"), fake_upstream.url("/"), tmp_path))
    await wait_ready(daemon)
    issued = await through(http, daemon, fake_upstream, issuer)
    [call] = issuer.calls
    assert (call, "client_secret_jwt") == (issued.call, call.method)
    assert_client_assertion(call, clock, aud=issuer.token_url, alg="HS256", kid=None)
    assert CLIENT_SECRET not in json.dumps(call.form)


# -- private_key_jwt -------------------------------------------------------------------------


@pytest.mark.parametrize(("kind", "signing_alg", "traditional", "alg"), [
    pytest.param("rsa", None, False, "RS256", id="rsa-rs256", marks=pytest.mark.slow),
    pytest.param("rsa", "PS256", False, "PS256", id="rsa-ps256", marks=pytest.mark.slow),
    pytest.param("p256", None, False, "ES256", id="ec-p256"),
    pytest.param("p384", None, False, "ES384", id="ec-p384"),
    pytest.param("ed25519", None, False, "EdDSA", id="ed25519"),
    pytest.param("rsa", None, True, "RS256", id="rsa-traditional-pem",
                 marks=pytest.mark.slow),
    pytest.param("p256", None, True, "ES256", id="ec-traditional-pem"),
])
async def test_private_key_jwt_each_key_type_end_to_end(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    clock: JumpClock, tmp_path: Path, http: aiohttp.ClientSession, logs: CapturedLogs,
    kind: str, signing_alg: str | None, traditional: bool, alg: str,
) -> None:
    """private_key_jwt with each key type: the alg derived from the key (or PS256 when
    asked), the kid when key_id is set; a renewal signs a new assertion (new jti, iat on the
    moved clock) that the endpoint accepts too."""
    issuer = await issuers()
    key = make_key(tmp_path / "keys", kind, traditional=traditional)
    key_client(issuer, key)
    extra = {"signing_alg": signing_alg} if signing_alg else {}
    daemon = await make_proxy(config(provider_at(
        issuer, client_id=CLIENT_ID, client_auth="private_key_jwt",
        private_key_file=str(key.path), key_id=KID, **extra), fake_upstream.url("/"), tmp_path))
    await wait_ready(daemon)
    await through(http, daemon, fake_upstream, issuer)
    assert_client_assertion(issuer.calls[0], clock, aud=issuer.token_url, alg=alg, kid=KID)
    expire(clock)
    issued = await through(http, daemon, fake_upstream, issuer)
    second = issued.call
    assert_client_assertion(second, clock, aud=issuer.token_url, alg=alg, kid=KID)
    assert [200, 200] == [c.status for c in issuer.calls]
    first_claims, second_claims = issuer.calls[0].assertion_claims, second.assertion_claims
    assert first_claims is not None
    assert second_claims is not None
    assert first_claims["jti"] != second_claims["jti"]
    assert 301 <= second_claims["iat"] - first_claims["iat"] <= 302
    assert not logs.events("key_file_readable")


async def test_private_key_jwt_without_key_id_sends_no_kid(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    clock: JumpClock, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    """Without key_id the header has no kid (the endpoint tries the client's keys)."""
    issuer = await issuers()
    key = make_key(tmp_path / "keys", "p256")
    key_client(issuer, key, kid=None)
    daemon = await make_proxy(config(provider_at(
        issuer, client_id=CLIENT_ID, client_auth="private_key_jwt",
        private_key_file=str(key.path)), fake_upstream.url("/"), tmp_path))
    await wait_ready(daemon)
    await through(http, daemon, fake_upstream, issuer)
    assert_client_assertion(issuer.calls[0], clock, aud=issuer.token_url, alg="ES256", kid=None)


@pytest.mark.slow
async def test_assertion_audience_replaces_the_token_url(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    clock: JumpClock, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    """assertion_audience: an issuer that wants its issuer identifier as aud gets it (a
    string), and one wanting the token URL would refuse it."""
    audience = "https://login.example.com/tenant-1/v2.0"
    issuer = await issuers(audience=audience)
    key = make_key(tmp_path / "keys", "rsa")
    key_client(issuer, key)
    daemon = await make_proxy(config(provider_at(
        issuer, client_id=CLIENT_ID, client_auth="private_key_jwt", key_id=KID,
        private_key_file=str(key.path), assertion_audience=audience),
        fake_upstream.url("/"), tmp_path))
    await wait_ready(daemon)
    await through(http, daemon, fake_upstream, issuer)
    assert_client_assertion(issuer.calls[0], clock, aud=audience, alg="RS256", kid=KID)


@pytest.mark.slow
async def test_a_key_the_endpoint_does_not_know_is_refused(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    tmp_path: Path, http: aiohttp.ClientSession, logs: CapturedLogs,
) -> None:
    """The endpoint is no rubber stamp: signed with another key than the registered one,
    the assertion is refused (401 invalid_client); the daemon says so by name, answers 502,
    and no assertion or key reaches the log."""
    issuer = await issuers()
    registered = make_key(tmp_path / "keys", "rsa", slot=0)
    other = make_key(tmp_path / "keys", "rsa", slot=1)
    key_client(issuer, registered)
    daemon = await make_proxy(config(provider_at(
        issuer, client_id=CLIENT_ID, client_auth="private_key_jwt", key_id=KID,
        private_key_file=str(other.path)), fake_upstream.url("/"), tmp_path))
    await wait_for(lambda: bool(logs.events("provider_unauthenticated")), "unauthenticated")
    [call] = issuer.calls
    assert ("invalid_client", "signature not verified") == (call.error, call.description)
    assert any("invalid_client" in f for f in failures(logs))
    resp = await fetch(http, daemon)
    assert 502 == resp.status
    assert [] == fake_upstream.seen
    assert_no_secret(logs.text, resp.body, extra=[other.secret_text, call.form["client_assertion"]])


# -- client_assertion: a JWT made elsewhere ---------------------------------------------------


def federated(issuer: AssertionIssuer, k8s: KeyPair) -> None:
    """The endpoint trusts the cluster's tokens for aud FEDERATION_AUD and takes the
    service account's as client demo-client (workload identity federation)."""
    issuer.trust(K8S_ISSUER, k8s.public, kid="k8s-key", audience=FEDERATION_AUD)
    issuer.register(Client(CLIENT_ID, "client_assertion", federated=(K8S_ISSUER, K8S_SUBJECT)))


@pytest.mark.parametrize("how", ["replaced", "rewritten-in-place"])
async def test_client_assertion_file_is_read_again_for_each_token_request(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    clock: JumpClock, tmp_path: Path, http: aiohttp.ClientSession, logs: CapturedLogs,
    how: str,
) -> None:
    """client_assertion: the projected token in the file is the client assertion as it is
    (with client_id, no secret); rotated between two refreshes -- a new inode as the kubelet
    does, or rewritten in place -- the second call carries the new file's content."""
    issuer = await issuers()
    k8s = make_key(tmp_path / "keys", "p256", slot=1)
    federated(issuer, k8s)
    first = external_jwt(k8s, clock.time(), aud=FEDERATION_AUD)
    path = write_file(tmp_path / "tokens" / "idp-token", first + "\n")
    daemon = await make_proxy(config(provider_at(
        issuer, client_id=CLIENT_ID, client_auth="client_assertion",
        client_assertion_file=str(path)), fake_upstream.url("/"), tmp_path))
    await wait_ready(daemon)
    await through(http, daemon, fake_upstream, issuer)
    [call] = issuer.calls
    assert ("client_assertion", {"grant_type": "client_credentials", "client_id": CLIENT_ID,
                                 "client_assertion_type": CLIENT_ASSERTION_TYPE,
                                 "client_assertion": first}) == (call.method, call.form)
    second = external_jwt(k8s, clock.time(), aud=FEDERATION_AUD)
    assert len(first) == len(second)   # same size: only the content tells them apart
    if how == "replaced":
        write_file(path, second + "\n")
    else:
        with path.open("r+") as f:
            f.write(second + "\n")
    expire(clock)
    await through(http, daemon, fake_upstream, issuer)
    assert [first, second] == [c.form["client_assertion"] for c in issuer.calls]


@pytest.mark.parametrize("how", BREAKAGES)
async def test_unusable_client_assertion_file_fails_the_call_then_heals(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    clock: JumpClock, tmp_path: Path, http: aiohttp.ClientSession, logs: CapturedLogs,
    how: str,
) -> None:
    """A client_assertion_file gone, empty, unreadable or holding an expired JWT: the token
    call fails without presenting it (token_refresh_failed naming the path; an expired JWT
    logs assertion_expired), the route answers 503 + Retry-After, and once the file is good
    again the next attempt succeeds with its content."""
    issuer = await issuers()
    k8s = make_key(tmp_path / "keys", "p256", slot=1)
    federated(issuer, k8s)
    path = write_file(tmp_path / "tokens" / "idp-token",
                      external_jwt(k8s, clock.time(), aud=FEDERATION_AUD) + "\n")
    daemon = await make_proxy(config(provider_at(
        issuer, client_id=CLIENT_ID, client_auth="client_assertion",
        client_assertion_file=str(path)), fake_upstream.url("/"), tmp_path))
    await file_fails_then_heals(
        daemon=daemon, http=http, clock=clock, logs=logs, issuer=issuer,
        upstream=fake_upstream, path=path, how=how, key="client_assertion",
        fresh=lambda: external_jwt(k8s, clock.time(), aud=FEDERATION_AUD),
        expired=lambda now: external_jwt(k8s, now - 3000, lifetime=3100, aud=FEDERATION_AUD))


# -- key files others can read ---------------------------------------------------------------


KEY_MODES = [(0o644, True), (0o640, True), (0o604, True), (0o600, False), (0o400, False)]


@pytest.mark.parametrize(("mode", "warned"), KEY_MODES)
async def test_private_key_file_readable_by_others_is_warned_about_at_start(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    tmp_path: Path, http: aiohttp.ClientSession, logs: CapturedLogs, mode: int, warned: bool,
) -> None:
    """A private key file group or world can read: a key_file_readable warning at start
    naming the config key; the daemon still serves; the log never shows the key."""
    issuer = await issuers()
    key = make_key(tmp_path / "keys", "p256", mode=mode)
    key_client(issuer, key)
    daemon = await make_proxy(config(provider_at(
        issuer, client_id=CLIENT_ID, client_auth="private_key_jwt", key_id=KID,
        private_key_file=str(key.path)), fake_upstream.url("/"), tmp_path))
    await wait_ready(daemon)
    await through(http, daemon, fake_upstream, issuer)
    events = logs.events("key_file_readable")
    if warned:
        [event] = events
        assert ("warning", "providers.idp.private_key_file") == (event["level"], event["key"])
    else:
        assert [] == events
    assert_no_secret(logs.text, extra=[key.secret_text])


@pytest.mark.parametrize(("mode", "warned"), KEY_MODES)
def test_check_config_warns_of_a_readable_private_key_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int, warned: bool,
) -> None:
    """check-config prints a warning line naming the key file (or its config key) when
    group or others can read it, and still exits 0 without showing the key."""
    key = make_key(tmp_path / "keys", "p256", mode=mode)
    raw = corp_config(tmp_path, client_auth="private_key_jwt", private_key_file=str(key.path))
    assert 0 == main(["check-config", "-c", str(write_config(tmp_path / "cfg", raw))])
    out, err = capsys.readouterr()
    warnings = [line for line in out.splitlines() if line.startswith("warning:")]
    if warned:
        [line] = warnings
        assert str(key.path) in line or "providers.corp.private_key_file" in line, line
    else:
        assert [] == warnings
    assert_no_secret(out, err, extra=[key.secret_text])


# -- config errors ---------------------------------------------------------------------------


def corp_config(tmp_path: Path, *others: tuple[str, dict[str, Any]], **corp: Any
                ) -> dict[str, Any]:
    """A config whose provider ``corp`` (oauth2 at a made-up endpoint) has the keys
    *corp* (None removes one), and *others* more providers; a route per provider."""
    prov: dict[str, Any] = {"type": "oauth2", "token_url": "https://login.example.com/token",
                            "client_id": CLIENT_ID}
    prov.update(corp)
    providers = {"corp": {k: v for k, v in prov.items() if v is not None}, **dict(others)}
    return {
        "listen": "127.0.0.1:0", "admin_listen": "127.0.0.1:0",
        "state_path": str(tmp_path / "state.json"),
        "providers": providers,
        "routes": [{"prefix": f"/{name}", "upstream": "https://api.example.com/",
                    "provider": name} for name in providers],
    }


def exchange(subject: str) -> dict[str, Any]:
    return {"type": "oauth2", "token_url": "https://sts.example.com/token",
            "grant_type": "token_exchange", "subject_token_provider": subject}


def config_error_cases(tmp_path: Path) -> dict[str, tuple[dict[str, Any], str]]:
    """Config problems of the new keys: the config, and the key path its message must
    start with (after "tokenproxy: ")."""
    key = make_key(tmp_path / "keys", "p256")
    good = write_file(tmp_path / "tokens" / "token", "a.b.c\n")
    nope = str(tmp_path / "nope")
    notakey = write_file(tmp_path / "keys" / "not-a-key.pem", "-----BEGIN PRIVATE KEY-----\n"
                         "bm90IGEga2V5\n-----END PRIVATE KEY-----\n")
    c = corp_config
    pk = {"client_auth": "private_key_jwt"}
    te = {"grant_type": "token_exchange"}
    jb = {"grant_type": "jwt_bearer"}
    return {
        "client_secret_jwt-without-secret": (
            c(tmp_path, client_auth="client_secret_jwt"), "providers.corp.client_secret"),
        "private_key_jwt-without-key": (c(tmp_path, **pk), "providers.corp.private_key_file"),
        "private_key_jwt-missing-key-file": (
            c(tmp_path, **pk, private_key_file=nope), "providers.corp.private_key_file"),
        "private_key_jwt-not-a-key": (
            c(tmp_path, **pk, private_key_file=str(notakey)), "providers.corp.private_key_file"),
        "ps256-with-an-ec-key": (
            c(tmp_path, **pk, private_key_file=str(key.path), signing_alg="PS256"),
            "providers.corp.signing_alg"),
        "hs256-as-signing-alg": (
            c(tmp_path, **pk, private_key_file=str(key.path), signing_alg="HS256"),
            "providers.corp.signing_alg"),
        "client_assertion-without-file": (
            c(tmp_path, client_auth="client_assertion"), "providers.corp.client_assertion_file"),
        "client_assertion-missing-file": (
            c(tmp_path, client_auth="client_assertion", client_assertion_file=nope),
            "providers.corp.client_assertion_file"),
        "tls_client_auth-without-cert": (
            c(tmp_path, client_auth="tls_client_auth"), "providers.corp.tls_client_cert_file"),
        "tls_client_cert-missing-file": (
            c(tmp_path, client_auth="tls_client_auth", tls_client_cert_file=nope,
              tls_client_key_file=str(key.path)), "providers.corp.tls_client_cert_file"),
        "jwt_bearer-without-assertion-source": (
            c(tmp_path, **jb), "providers.corp.assertion_file"),
        "jwt_bearer-missing-assertion-file": (
            c(tmp_path, **jb, assertion_file=nope), "providers.corp.assertion_file"),
        "token_exchange-without-subject": (c(tmp_path, **te), "providers.corp.subject_token_"),
        "token_exchange-two-subjects": (
            c(tmp_path, ("sa", {"type": "static", "token": TOKEN}), **te,
              subject_token_file=str(good), subject_token_provider="sa"),
            "providers.corp.subject_token_"),
        "token_exchange-missing-subject-file": (
            c(tmp_path, **te, subject_token_file=nope), "providers.corp.subject_token_file"),
        "token_exchange-missing-actor-file": (
            c(tmp_path, **te, subject_token_file=str(good), actor_token_file=nope),
            "providers.corp.actor_token_file"),
        "token_exchange-unknown-subject-provider": (
            c(tmp_path, **te, subject_token_provider="ghost"),
            "providers.corp.subject_token_provider"),
        "token_exchange-subject-is-itself": (
            c(tmp_path, **te, subject_token_provider="corp"),
            "providers.corp.subject_token_provider"),
        "token_exchange-cycle-of-two": (
            c(tmp_path, ("b", exchange("corp")), **te, subject_token_provider="b"),
            "providers."),   # either member of the cycle; the key is checked below
        "token_exchange-cycle-of-three": (
            c(tmp_path, ("b", exchange("c")), ("c", exchange("corp")), **te,
              subject_token_provider="b"), "providers."),
        "unknown-grant": (c(tmp_path, grant_type="saml2_bearer"), "providers.corp.grant_type"),
        "unknown-client_auth": (c(tmp_path, client_auth="jwt"), "providers.corp.client_auth"),
    }


CONFIG_ERRORS = [
    "client_secret_jwt-without-secret", "private_key_jwt-without-key",
    "private_key_jwt-missing-key-file", "private_key_jwt-not-a-key", "ps256-with-an-ec-key",
    "hs256-as-signing-alg", "client_assertion-without-file", "client_assertion-missing-file",
    "tls_client_auth-without-cert", "tls_client_cert-missing-file",
    "jwt_bearer-without-assertion-source", "jwt_bearer-missing-assertion-file",
    "token_exchange-without-subject", "token_exchange-two-subjects",
    "token_exchange-missing-subject-file", "token_exchange-missing-actor-file",
    "token_exchange-unknown-subject-provider", "token_exchange-subject-is-itself",
    "token_exchange-cycle-of-two", "token_exchange-cycle-of-three", "unknown-grant",
    "unknown-client_auth",
]


@pytest.mark.parametrize("command", ["check-config", "run"])
@pytest.mark.parametrize("case", CONFIG_ERRORS)
def test_config_problem_of_the_new_keys_exits_2_naming_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, case: str,
) -> None:
    """Each problem exits 2 with one stderr line that starts with the key path (a cycle
    names subject_token_provider of a provider in it), no traceback, no secret."""
    raw, key = config_error_cases(tmp_path)[case]
    path = write_config(tmp_path / "cfg", raw)
    assert 2 == main([command, "-c", str(path)])
    out, err = capsys.readouterr()
    assert "" == out
    assert 1 == len(err.splitlines()), err
    assert err.startswith(f"tokenproxy: {key}"), err
    if "cycle" in case or "itself" in case:
        assert ".subject_token_provider" in err.split(":")[1], err
    assert "Traceback" not in err
    assert_no_secret(out, err, extra=[make_key(tmp_path / "keys", "p256").secret_text])


@pytest.mark.slow
def test_the_grant_urns_and_new_methods_are_accepted(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """Valid configs of every new method and grant (the URN spellings too) pass
    check-config; its output names each provider and shows no key, secret or file content."""
    key = make_key(tmp_path / "keys", "rsa")
    subject = write_file(tmp_path / "tokens" / "sa-token", "subject.jwt.content-4f1e\n")
    assertion = write_file(tmp_path / "tokens" / "idp-token", "assertion.jwt.content-77ab\n")
    raw = corp_config(
        tmp_path,
        ("hs", {"type": "oauth2", "token_url": "https://a.example.com/token",
                "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET,
                "client_auth": "client_secret_jwt"}),
        ("fed", {"type": "oauth2", "token_url": "https://a.example.com/token",
                 "client_id": CLIENT_ID, "client_auth": "client_assertion",
                 "client_assertion_file": str(assertion)}),
        ("sts", {"type": "oauth2", "token_url": "https://sts.example.com/token",
                 "grant_type": "urn:ietf:params:oauth:grant-type:token-exchange",
                 "subject_token_file": str(subject), "audience": "https://api.example.com"}),
        ("chained", {"type": "oauth2", "token_url": "https://sts.example.com/token",
                     "grant_type": "token_exchange", "subject_token_provider": "sts"}),
        ("jb", {"type": "oauth2", "token_url": "https://jb.example.com/token",
                "grant_type": "urn:ietf:params:oauth:grant-type:jwt-bearer",
                "assertion_file": str(subject)}),
        ("jbsigned", {"type": "oauth2", "token_url": "https://jb.example.com/token",
                      "grant_type": "jwt_bearer", "client_id": CLIENT_ID,
                      "private_key_file": str(key.path), "issuer_claim": "svc-1"}),
        client_auth="private_key_jwt", private_key_file=str(key.path), key_id=KID,
    )
    assert 0 == main(["check-config", "-c", str(write_config(tmp_path / "cfg", raw))])
    out, err = capsys.readouterr()
    assert "" == err
    assert "ok" == out.splitlines()[-1]
    for name in ("corp", "hs", "fed", "sts", "chained", "jb", "jbsigned"):
        assert any(line.startswith(f"  {name}: oauth2") for line in out.splitlines()), name
    [chained] = [line for line in out.splitlines() if line.startswith("  chained: ")]
    assert chained.endswith(" chain=chained <- sts"), chained
    assert_no_secret(out, err, extra=[key.secret_text, "subject.jwt.content-4f1e",
                                      "assertion.jwt.content-77ab"])


# -- the sweep -------------------------------------------------------------------------------


async def test_no_key_secret_assertion_or_token_in_logs_metrics_or_problems(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    clock: JumpClock, tmp_path: Path, http: aiohttp.ClientSession, logs: CapturedLogs,
) -> None:
    """Three providers without shared secrets on the wire (private_key_jwt, client_secret_jwt,
    client_assertion) serve, renew and then fail (the endpoint down, the assertion file
    gone): no key PEM, client secret, assertion or issued token is in the logs, the
    metrics, /readyz or the problem bodies."""
    issuer = await issuers()
    key = make_key(tmp_path / "keys", "ed25519")
    k8s = make_key(tmp_path / "keys", "p256", slot=1)
    issuer.register(Client("pk", "private_key_jwt", keys={KID: key.public}))
    issuer.register(Client("hs", "client_secret_jwt", secret=CLIENT_SECRET))
    issuer.trust(K8S_ISSUER, k8s.public, kid="k8s-key", audience=FEDERATION_AUD)
    issuer.register(Client("fed", "client_assertion", federated=(K8S_ISSUER, K8S_SUBJECT)))
    assertion = external_jwt(k8s, clock.time(), aud=FEDERATION_AUD)
    path = write_file(tmp_path / "tokens" / "idp-token", assertion + "\n")
    up = fake_upstream.url("/")
    raw = config(provider_at(issuer, client_id="pk", client_auth="private_key_jwt",
                             key_id=KID, private_key_file=str(key.path)), up, tmp_path)
    raw["providers"]["hs"] = provider_at(issuer, client_id="hs", client_secret=CLIENT_SECRET,
                                         client_auth="client_secret_jwt")
    raw["providers"]["fed"] = provider_at(issuer, client_id="fed", client_auth="client_assertion",
                                          client_assertion_file=str(path))
    raw["routes"] += [{"prefix": "/hs", "upstream": up, "provider": "hs"},
                      {"prefix": "/fed", "upstream": up, "provider": "fed"}]
    daemon = await make_proxy(raw)
    await wait_ready(daemon)
    for route in ("/x", "/hs/x", "/fed/x"):
        await through(http, daemon, fake_upstream, issuer, route)
    expire(clock)   # each renews: new assertions, new tokens
    for route in ("/x", "/hs/x", "/fed/x"):
        await through(http, daemon, fake_upstream, issuer, route)
    path.unlink()
    issuer.faults = [(503, {"error": "temporarily_unavailable"})] * 10
    expire(clock)
    bodies = [(await fetch(http, daemon, route)).body for route in ("/x", "/hs/x", "/fed/x")]
    async with http.get(f"http://127.0.0.1:{daemon.admin_port}/metrics") as r:
        metrics = await r.text()
    _, ready = await readyz(daemon)
    secrets_ = [key.secret_text, k8s.secret_text, CLIENT_SECRET, assertion, *issuer.tokens(),
                *[c.form.get("client_assertion", "") for c in issuer.calls]]
    assert_no_secret(logs.text, metrics, json.dumps(ready), *bodies, extra=secrets_)
    assert os.fspath(path) in " ".join(failures(logs))


# -- hostile files where the config names one -------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("case", ["pem-as-path", "jwt-as-path", "fifo", "device",
                                  "encrypted-tls-key"])
def test_a_hostile_named_file_is_a_config_error_that_quotes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str,
) -> None:
    """A key or token given where its file's path belongs was quoted in the error (and the
    reload failure's log line) as a path; a FIFO there hung start, check-config and, on the
    event loop, a reload; /dev/zero as a key was read until memory ran out; an encrypted TLS
    key made OpenSSL ask for its passphrase on the terminal. Each is now exit 2, one line,
    naming the key and quoting no credential, at once."""
    key = make_key(tmp_path / "keys", "p256")
    pem = key.path.read_text()   # the whole file, as ${VAR} holding it would give
    jwt_text = external_jwt(make_key(tmp_path / "k8s", "rsa", slot=2), 1_800_000_000.0,
                            aud="sts")
    where = "providers.corp.private_key_file"
    extra: dict[str, Any] = {"client_auth": "private_key_jwt"}
    if case == "pem-as-path":
        extra["private_key_file"] = pem
    elif case == "jwt-as-path":
        extra = {"grant_type": "token_exchange", "subject_token_file": jwt_text}
        where = "providers.corp.subject_token_file"
    elif case == "fifo":
        fifo = tmp_path / "fifo"
        os.mkfifo(fifo)
        extra = {"grant_type": "token_exchange", "subject_token_file": str(fifo)}
        where = "providers.corp.subject_token_file"
    elif case == "device":
        extra["private_key_file"] = "/dev/zero"
    else:
        cert = client_tls(tmp_path / "pki", "svc")
        encrypted = tmp_path / "encrypted-key.pem"
        subprocess.run(["openssl", "pkey", "-in", str(cert.key), "-aes256", "-passout",
                        "pass:secret", "-out", str(encrypted)], check=True, timeout=30)
        extra = {"client_auth": "tls_client_auth", "tls_client_cert_file": str(cert.cert),
                 "tls_client_key_file": str(encrypted),
                 "token_url": "https://login.example.com/token"}
        where = "providers.corp.tls_client_cert_file"
    path = write_config(tmp_path / "cfg", corp_config(tmp_path, **extra))
    assert 2 == main(["check-config", "-c", str(path)])
    out, err = capsys.readouterr()
    assert 1 == len(err.splitlines()), err
    assert err.startswith(f"tokenproxy: {where}"), err
    assert "BEGIN" not in err
    assert jwt_text[:20] not in err
    assert "pass phrase" not in (out + err).lower()
    assert_no_secret(out, err, extra=[key.secret_text])


def test_a_jwt_whose_exp_is_beyond_any_float_has_no_expiry() -> None:
    """A 400-digit exp raised OverflowError out of the expiry check: the file was never
    presented, and the failure read 'internal error'."""
    header = base64.urlsafe_b64encode(b'{"alg":"none"}').rstrip(b"=").decode()
    payload = base64.urlsafe_b64encode(
        ('{"exp":' + "9" * 400 + "}").encode()).rstrip(b"=").decode()
    assert jwt_expiry(f"{header}.{payload}.sig") is None


@pytest.mark.slow
async def test_a_key_rotated_in_place_is_used_after_a_reload(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    clock: JumpClock, tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    """The key replaced where the config names it, then SIGHUP with the same config: the
    provider compared equal (the config holds paths) and kept signing with the old key, which
    the issuer no longer knew: 502 until a restart."""
    issuer = await issuers()
    old = make_key(tmp_path / "keys", "p256", slot=0)
    issuer.register(Client(CLIENT_ID, "private_key_jwt", keys={KID: old.public}))
    raw = config(provider_at(issuer, client_id=CLIENT_ID, client_auth="private_key_jwt",
                             private_key_file=str(old.path), key_id=KID),
                 fake_upstream.url("/"), tmp_path)
    daemon = await make_proxy(raw)
    await wait_ready(daemon)
    await through(http, daemon, fake_upstream, issuer)
    new = make_key(tmp_path / "keys2", "p256", slot=1)
    os.replace(new.path, old.path)
    issuer.clients[CLIENT_ID].keys = {KID: new.public}   # the issuer knows only the new key
    await daemon.reload(build_config(raw, {}))
    expire(clock)
    await through(http, daemon, fake_upstream, issuer)
    assert issuer.calls[-1].error is None


async def test_a_readable_key_file_is_warned_about_at_reload_too(
    make_proxy: MakeProxy, tmp_path: Path, logs: CapturedLogs,
) -> None:
    """A key made readable by others while the daemon runs is named at the next reload."""
    key = make_key(tmp_path / "keys", "p256")
    raw = corp_config(tmp_path, client_auth="private_key_jwt", private_key_file=str(key.path))
    daemon = await make_proxy(raw)
    assert [] == logs.events("key_file_readable")
    key.path.chmod(0o644)
    await daemon.reload(build_config(raw, {}))
    assert ["providers.corp.private_key_file"] == [
        e["key"] for e in logs.events("key_file_readable")]
