"""The grants whose input is made elsewhere, end to end: RFC 8693 token exchange
(the subject from a file, a projected service-account token, or from another provider's
current token: a chain) and RFC 7523 section 2.1 jwt-bearer (the assertion from a file, or
signed by the daemon). The fake endpoint (tests/helpers/assertion_issuer.py) verifies the
subject, actor and assertion JWTs with joserfc, records every form field, and issues tokens
the upstream gets. Both grants are done again at each renewal, the file read again each
time; a refresh_token in their answers is never used."""

from __future__ import annotations

import asyncio
import copy
import json
from pathlib import Path

import aiohttp
import pytest

from tests.helpers.assertion_issuer import (
    BREAKAGES,
    JWT_BEARER,
    TOKEN_EXCHANGE,
    TT_ACCESS,
    TT_ID,
    TT_JWT,
    AssertionIssuer,
    Client,
    StartIssuer,
    expire,
    file_fails_then_heals,
    provider_at,
    refreshed,
    through,
)
from tests.helpers.client import fetch
from tests.helpers.config import MakeProxy, write_config
from tests.helpers.fakes import CLIENT_SECRET, FakeUpstream, JumpClock, assert_no_secret
from tests.helpers.idp import advance, config
from tests.helpers.keys import (
    K8S_ISSUER,
    K8S_SUBJECT,
    KeyPair,
    external_jwt,
    make_key,
    write_file,
)
from tests.helpers.logs import CapturedLogs, failures
from tests.helpers.wait import readyz, settle, wait_for, wait_ready
from tokenproxy.cli import main
from tokenproxy.config import build_config

KID = "2026-key-1"
STS_AUD = "sts"            # the audience of the cluster's tokens meant for the STS
ACTOR_ISSUER = "https://actor.example.com"
GRANT_SPELLINGS = {"token_exchange": TOKEN_EXCHANGE, "jwt_bearer": JWT_BEARER}


@pytest.fixture(name="k8s")
def _k8s(tmp_path: Path) -> KeyPair:
    """The cluster's service-account token signing key."""
    return make_key(tmp_path / "keys", "rsa", slot=2)


def trusting(issuer: AssertionIssuer, k8s: KeyPair, audience: str | None = STS_AUD) -> None:
    issuer.trust(K8S_ISSUER, k8s.public, kid="k8s-key", audience=audience)


# -- token exchange: the subject from a file -------------------------------------------------


@pytest.mark.parametrize("spelling", ["token_exchange", "urn"])
async def test_token_exchange_from_a_subject_token_file_sends_every_field(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    clock: JumpClock, tmp_path: Path, http: aiohttp.ClientSession, k8s: KeyPair,
    spelling: str,
) -> None:
    """RFC 8693: grant_type as the URN (whichever spelling the config used), the projected
    token from the file as subject_token of type jwt (the default for a file), audience,
    resource, requested_token_type and scope as configured; client_auth none by default
    (client_id only). The endpoint verified the subject JWT; the upstream gets the token."""
    issuer = await issuers()
    trusting(issuer, k8s)
    issuer.register(Client("sts-client", "none"))
    subject = external_jwt(k8s, clock.time(), aud=STS_AUD)
    path = write_file(tmp_path / "tokens" / "sa-token", subject + "\n")
    grant = "token_exchange" if spelling == "token_exchange" else TOKEN_EXCHANGE
    daemon = await make_proxy(config(provider_at(
        issuer, client_id="sts-client", grant_type=grant, subject_token_file=str(path),
        audience="https://api.example.com", resource="urn:example:api",
        requested_token_type=TT_ACCESS, scope="read write"), fake_upstream.url("/"), tmp_path))
    await wait_ready(daemon)
    issued = await through(http, daemon, fake_upstream, issuer)
    [call] = issuer.calls
    assert issued.call is call
    assert {"grant_type": TOKEN_EXCHANGE, "subject_token": subject,
            "subject_token_type": TT_JWT, "audience": "https://api.example.com",
            "resource": "urn:example:api", "requested_token_type": TT_ACCESS,
            "scope": "read write", "client_id": "sts-client"} == call.form
    assert ("none", f"jwt:{K8S_SUBJECT}", None) == (call.method, call.subject, call.actor)
    assert "authorization" not in call.headers


async def test_token_exchange_is_done_again_with_the_rotated_subject_not_refreshed(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    clock: JumpClock, tmp_path: Path, http: aiohttp.ClientSession, k8s: KeyPair,
) -> None:
    """Anonymous exchange (no client_id): at renewal the daemon exchanges again, with the
    file's new content, and never uses the refresh_token the endpoint put in its answer."""
    issuer = await issuers(refresh_tokens=True)
    trusting(issuer, k8s)
    first = external_jwt(k8s, clock.time(), aud=STS_AUD)
    path = write_file(tmp_path / "tokens" / "sa-token", first + "\n")
    daemon = await make_proxy(config(provider_at(
        issuer, grant_type="token_exchange", subject_token_file=str(path)),
        fake_upstream.url("/"), tmp_path))
    await wait_ready(daemon)
    await through(http, daemon, fake_upstream, issuer)
    second = external_jwt(k8s, clock.time(), aud=STS_AUD)
    write_file(path, second + "\n")
    expire(clock)
    await through(http, daemon, fake_upstream, issuer)
    assert [TOKEN_EXCHANGE, TOKEN_EXCHANGE] == [c.grant for c in issuer.calls]
    assert [first, second] == [c.form["subject_token"] for c in issuer.calls]
    assert {"grant_type", "subject_token", "subject_token_type"} == set(issuer.calls[1].form)
    assert ["anonymous", "anonymous"] == [c.method for c in issuer.calls]


async def test_token_exchange_with_actor_token_and_subject_type(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    clock: JumpClock, tmp_path: Path, http: aiohttp.ClientSession, k8s: KeyPair,
) -> None:
    """actor_token_file (type jwt by default) goes with its type; subject_token_type as
    configured (an id_token here); the endpoint verified both JWTs."""
    issuer = await issuers()
    trusting(issuer, k8s)
    actor_key = make_key(tmp_path / "keys", "p384", slot=2)
    issuer.trust(ACTOR_ISSUER, actor_key.public, kid="actor", audience=STS_AUD)
    subject = external_jwt(k8s, clock.time(), aud=STS_AUD)
    actor = external_jwt(actor_key, clock.time(), iss=ACTOR_ISSUER, sub="gateway-1",
                         aud=STS_AUD, kid="actor")
    subject_path = write_file(tmp_path / "tokens" / "id-token", subject + "\n")
    actor_path = write_file(tmp_path / "tokens" / "actor-token", actor + "\n")
    daemon = await make_proxy(config(provider_at(
        issuer, grant_type="token_exchange", subject_token_file=str(subject_path),
        subject_token_type=TT_ID, actor_token_file=str(actor_path)),
        fake_upstream.url("/"), tmp_path))
    await wait_ready(daemon)
    await through(http, daemon, fake_upstream, issuer)
    [call] = issuer.calls
    assert {"grant_type": TOKEN_EXCHANGE, "subject_token": subject, "subject_token_type": TT_ID,
            "actor_token": actor, "actor_token_type": TT_JWT} == call.form
    assert (f"jwt:{K8S_SUBJECT}", "jwt:gateway-1") == (call.subject, call.actor)


async def test_token_exchange_with_private_key_jwt_client_auth(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    clock: JumpClock, tmp_path: Path, http: aiohttp.ClientSession, k8s: KeyPair,
) -> None:
    """A token exchange whose client authenticates with private_key_jwt: both the client
    assertion and the subject token are verified on the same call."""
    issuer = await issuers()
    trusting(issuer, k8s)
    key = make_key(tmp_path / "keys", "ed25519")
    issuer.register(Client("sts-client", "private_key_jwt", keys={KID: key.public}))
    path = write_file(tmp_path / "tokens" / "sa-token",
                      external_jwt(k8s, clock.time(), aud=STS_AUD) + "\n")
    daemon = await make_proxy(config(provider_at(
        issuer, client_id="sts-client", client_auth="private_key_jwt", key_id=KID,
        private_key_file=str(key.path), grant_type="token_exchange",
        subject_token_file=str(path)), fake_upstream.url("/"), tmp_path))
    await wait_ready(daemon)
    await through(http, daemon, fake_upstream, issuer)
    [call] = issuer.calls
    assert ("private_key_jwt", f"jwt:{K8S_SUBJECT}") == (call.method, call.subject)
    assert call.assertion_header is not None
    assert ("EdDSA", KID) == (call.assertion_header["alg"], call.assertion_header["kid"])


# -- token exchange: a chain of providers ----------------------------------------------------


def chain_config(issuer: AssertionIssuer, key: KeyPair, up: str, tmp_path: Path,
                 sa_margin: str | int) -> dict[str, object]:
    """Provider ``sa`` (client_credentials with private_key_jwt, 100 s tokens) on route /a,
    and ``api`` (token exchange of sa's current token, basic auth, 3600 s tokens) on /b."""
    issuer.register(Client("sa-client", "private_key_jwt", keys={KID: key.public},
                           expires_in=100))
    issuer.register(Client("api-client", "client_secret_basic", secret=CLIENT_SECRET,
                           expires_in=3600))
    raw = config(provider_at(issuer, client_id="api-client", client_secret=CLIENT_SECRET,
                             client_auth="basic", grant_type="token_exchange",
                             subject_token_provider="sa",
                             audience="https://api.example.com"), up, tmp_path)
    raw["providers"] = {"api": raw["providers"]["idp"],
                        "sa": provider_at(issuer, client_id="sa-client", key_id=KID,
                                          client_auth="private_key_jwt",
                                          private_key_file=str(key.path),
                                          refresh_margin=sa_margin)}
    raw["routes"] = [{"prefix": "/a", "upstream": up, "provider": "sa"},
                     {"prefix": "/b", "upstream": up, "provider": "api"}]
    return raw


@pytest.mark.parametrize("renewal", ["on-demand", "in-the-background"])
async def test_chain_re_exchanges_at_once_when_the_subject_token_changes(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    clock: JumpClock, tmp_path: Path, http: aiohttp.ClientSession, logs: CapturedLogs,
    renewal: str,
) -> None:
    """A chain of two providers: api's token is exchanged from sa's current token (type
    access_token, the default for a provider). When sa's token changes -- renewed for a
    request to /a, or by its background refresh -- api's token is replaced at once: the next
    request to /b carries a token exchanged from sa's new token, though api's own token had
    an hour left."""
    issuer = await issuers()
    key = make_key(tmp_path / "keys", "p256")
    background = renewal == "in-the-background"
    daemon = await make_proxy(chain_config(issuer, key, fake_upstream.url("/"), tmp_path,
                                           "60s" if background else 0))
    await wait_ready(daemon)
    first = await through(http, daemon, fake_upstream, issuer, "/b")
    [sa_first] = [t for t, i in issuer.issued.items() if i.client_id == "sa-client"]
    assert {"grant_type": TOKEN_EXCHANGE, "subject_token": sa_first,
            "subject_token_type": TT_ACCESS, "audience": "https://api.example.com"} == (
        first.call.form)
    assert ("client_secret_basic", "issued:" + sa_first) == (first.call.method,
                                                             first.call.subject)
    exchanges = len([c for c in issuer.calls if c.grant == TOKEN_EXCHANGE])
    if background:
        before = refreshed(logs, "sa")
        await advance(clock, 51)   # sa refreshes 50 s into its 100 s (margin capped at half)
        await wait_for(lambda: refreshed(logs, "sa") > before, "sa's background refresh")
        await wait_for(lambda: refreshed(logs, "api") >= 2, "api's re-exchange")
        second = await through(http, daemon, fake_upstream, issuer, "/b")
    else:
        expire(clock, 101)
        # The re-exchange is held at the endpoint a moment: a request to /b meanwhile
        # must wait for it, not get api's old token (the token is replaced "at once").
        issuer.hold[TOKEN_EXCHANGE] = gate = asyncio.Event()
        await through(http, daemon, fake_upstream, issuer, "/a")
        pending = asyncio.ensure_future(through(http, daemon, fake_upstream, issuer, "/b"))
        await settle()
        gate.set()
        second = await pending
    sa_tokens = [t for t, i in issuer.issued.items() if i.client_id == "sa-client"]
    assert 2 == len(sa_tokens)
    assert sa_tokens[1] == second.call.form["subject_token"]
    assert second.token != first.token
    assert exchanges + 1 == len([c for c in issuer.calls if c.grant == TOKEN_EXCHANGE])


# -- jwt-bearer ------------------------------------------------------------------------------


@pytest.mark.parametrize("spelling", ["jwt_bearer", "urn"])
async def test_jwt_bearer_from_an_assertion_file_read_at_each_renewal(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    clock: JumpClock, tmp_path: Path, http: aiohttp.ClientSession, k8s: KeyPair,
    spelling: str,
) -> None:
    """RFC 7523 2.1 with a projected token for the token endpoint (aud its URL): the form is
    the URN grant_type and the file's content as assertion; at renewal the rotated file's
    content goes, by the same grant (the answer's refresh_token unused)."""
    issuer = await issuers(refresh_tokens=True)
    first = external_jwt(k8s, clock.time(), aud=issuer.audience)
    trusting(issuer, k8s, audience=None)
    path = write_file(tmp_path / "tokens" / "idp-token", first + "\n")
    grant = "jwt_bearer" if spelling == "jwt_bearer" else JWT_BEARER
    daemon = await make_proxy(config(provider_at(
        issuer, grant_type=grant, assertion_file=str(path)), fake_upstream.url("/"), tmp_path))
    await wait_ready(daemon)
    await through(http, daemon, fake_upstream, issuer)
    assert {"grant_type": JWT_BEARER, "assertion": first} == issuer.calls[0].form
    second = external_jwt(k8s, clock.time(), aud=issuer.audience)
    write_file(path, second + "\n")
    expire(clock)
    await through(http, daemon, fake_upstream, issuer)
    assert [JWT_BEARER, JWT_BEARER] == [c.grant for c in issuer.calls]
    assert [first, second] == [c.form["assertion"] for c in issuer.calls]


@pytest.mark.parametrize(("issuer_claim", "subject_claim"), [
    (None, None), ("svc-issuer-1", "user-42")])
async def test_jwt_bearer_signed_here(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    clock: JumpClock, tmp_path: Path, http: aiohttp.ClientSession,
    issuer_claim: str | None, subject_claim: str | None,
) -> None:
    """jwt_bearer with private_key_file: the daemon signs the assertion -- iss issuer_claim
    (or client_id), sub subject_claim (or client_id), aud the token URL, a jti, iat now,
    exp five minutes later, kid -- the endpoint verifies it, and a renewal signs a new one (a new
    jti: the endpoint refuses a replay)."""
    issuer = await issuers()
    key = make_key(tmp_path / "keys", "p384")
    iss = issuer_claim or "jb-client"
    issuer.trust(iss, key.public, kid=KID, own=True)
    issuer.register(Client("jb-client", "none"))   # client_auth none: the default here
    extra = {k: v for k, v in (("issuer_claim", issuer_claim),
                               ("subject_claim", subject_claim)) if v is not None}
    daemon = await make_proxy(config(provider_at(
        issuer, grant_type="jwt_bearer", client_id="jb-client", private_key_file=str(key.path),
        key_id=KID, **extra), fake_upstream.url("/"), tmp_path))
    await wait_ready(daemon)
    for _ in range(2):
        issued = await through(http, daemon, fake_upstream, issuer)
        call = issued.call
        assert call.grant_header is not None
        assert call.grant_claims is not None
        claims = call.grant_claims
        assert ("ES384", KID) == (call.grant_header["alg"], call.grant_header["kid"])
        assert (iss, subject_claim or "jb-client", issuer.token_url) == (
            claims["iss"], claims["sub"], claims["aud"])
        assert abs(claims["iat"] - clock.time()) < 1
        assert 300 == claims["exp"] - claims["iat"]
        assert JWT_BEARER == call.form["grant_type"]
        expire(clock)
    assert 2 == len({c.grant_claims["jti"] for c in issuer.calls if c.grant_claims})


# -- files that break and mend ---------------------------------------------------------------


@pytest.mark.parametrize("how", BREAKAGES)
@pytest.mark.parametrize("key", ["subject_token_file", "actor_token_file", "assertion_file"])
async def test_unusable_grant_file_fails_the_call_then_heals(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    clock: JumpClock, tmp_path: Path, http: aiohttp.ClientSession, logs: CapturedLogs,
    k8s: KeyPair, key: str, how: str,
) -> None:
    """A subject, actor or assertion file gone, empty, unreadable or holding an expired JWT:
    the grant fails without presenting it (token_refresh_failed naming the path,
    assertion_expired for the expired JWT), 503 + Retry-After meanwhile, and the next
    attempt after the file is mended succeeds with its content."""
    issuer = await issuers()
    trusting(issuer, k8s, audience=None)
    aud = issuer.audience

    def jwt_now(now: float | None = None, lifetime: float = 3600) -> str:
        return external_jwt(k8s, clock.time() if now is None else now, aud=aud,
                            lifetime=lifetime)

    files = {"subject_token_file": write_file(tmp_path / "tokens" / "subject", jwt_now()),
             "actor_token_file": write_file(tmp_path / "tokens" / "actor", jwt_now()),
             "assertion_file": write_file(tmp_path / "tokens" / "assertion", jwt_now())}
    if key == "assertion_file":
        prov = provider_at(issuer, grant_type="jwt_bearer", assertion_file=str(files[key]))
    else:
        prov = provider_at(issuer, grant_type="token_exchange",
                           subject_token_file=str(files["subject_token_file"]),
                           actor_token_file=str(files["actor_token_file"]))
    daemon = await make_proxy(config(prov, fake_upstream.url("/"), tmp_path))
    field = {"subject_token_file": "subject_token", "actor_token_file": "actor_token",
             "assertion_file": "assertion"}[key]
    await file_fails_then_heals(
        daemon=daemon, http=http, clock=clock, logs=logs, issuer=issuer,
        upstream=fake_upstream, path=files[key], how=how, key=field, fresh=jwt_now,
        expired=lambda now: jwt_now(now - 3000, lifetime=3100))


@pytest.mark.slow
async def test_a_refused_jwt_bearer_grant_is_named_in_the_log(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    clock: JumpClock, tmp_path: Path, http: aiohttp.ClientSession, logs: CapturedLogs,
    k8s: KeyPair,
) -> None:
    """An assertion the endpoint refuses (signed by a key it does not trust): 400
    invalid_grant, logged as status and code -- legibly: the word "bearer" in the grant's
    name must not make the log's value masking eat the message; the route does not serve;
    the assertion never shows in the log."""
    issuer = await issuers()
    stranger = make_key(tmp_path / "keys", "rsa", slot=3)
    trusting(issuer, k8s, audience=None)
    path = write_file(tmp_path / "tokens" / "idp-token",
                      external_jwt(stranger, clock.time(), aud=issuer.audience) + "\n")
    daemon = await make_proxy(config(provider_at(
        issuer, grant_type="jwt_bearer", assertion_file=str(path)),
        fake_upstream.url("/"), tmp_path))
    await wait_for(lambda: bool(failures(logs)), "token_refresh_failed")
    [call] = issuer.calls
    assert ("invalid_grant", "signature not verified") == (call.error, call.description)
    error = failures(logs)[0]
    assert "400 (invalid_grant)" in error, error
    assert "***" not in error, error
    # Given up (502), or retried after a backoff since the file may rotate (503): either.
    assert (await fetch(http, daemon)).status in (502, 503)


# -- chains across restarts, reloads and the online check ---------------------------------

SUBJECT_A = "subject-token-a-0123456789"
SUBJECT_B = "subject-token-b-0123456789"


def static_chain(issuer: AssertionIssuer, subject: str, up: str, tmp_path: Path
                 ) -> dict[str, object]:
    """``api`` (on /) exchanges the token of ``k8s``, a static provider holding *subject*."""
    issuer.register(Client("api-client", "none", expires_in=3600))
    raw = config(provider_at(issuer, client_id="api-client", grant_type="token_exchange",
                             subject_token_provider="k8s"), up, tmp_path)
    raw["providers"] = {"api": raw["providers"]["idp"],
                        "k8s": {"type": "static", "token": subject}}
    raw["routes"] = [{"prefix": "/", "upstream": up, "provider": "api"}]
    return raw


async def test_a_restarted_daemon_does_not_serve_a_token_exchanged_from_the_old_subject(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    """The persisted token of a chained provider says nothing of the subject it came from:
    after a restart with another subject (the old one compromised, say), the daemon used to
    serve the stored token, exchanged from the old one, for the rest of its lifetime."""
    issuer = await issuers()
    issuer.known_subjects = {SUBJECT_A: ("a", TT_ACCESS), SUBJECT_B: ("b", TT_ACCESS)}
    first = await make_proxy(static_chain(issuer, SUBJECT_A, fake_upstream.url("/"), tmp_path))
    await wait_ready(first)
    assert "known:a" == (await through(http, first, fake_upstream, issuer, "/x")).call.subject
    await first.stop()
    second = await make_proxy(static_chain(issuer, SUBJECT_B, fake_upstream.url("/"),
                                           tmp_path))
    await wait_ready(second)
    assert "known:b" == (await through(http, second, fake_upstream, issuer, "/x")).call.subject


async def test_a_reload_changing_the_subjects_identity_drops_the_exchanged_token(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    tmp_path: Path, http: aiohttp.ClientSession, clock: JumpClock,
) -> None:
    """A reload that makes the subject another identity (another client id) rebuilt the
    chained provider but let it inherit the token exchanged from the old identity's token,
    which it then served while the new identity could not get one."""
    issuer = await issuers()
    key = make_key(tmp_path / "keys", "p256")
    raw = chain_config(issuer, key, fake_upstream.url("/"), tmp_path, 0)
    daemon = await make_proxy(raw)
    await wait_ready(daemon)
    await through(http, daemon, fake_upstream, issuer, "/b")
    other = copy.deepcopy(raw)
    other["providers"]["sa"]["client_id"] = "unknown-client"   # refused by the endpoint
    await daemon.reload(build_config(other, {}))
    seen = len(fake_upstream.seen)
    resp = await fetch(http, daemon, "/b")
    assert resp.status in (502, 503), resp.text
    assert seen == len(fake_upstream.seen)


@pytest.mark.parametrize("grant", ["refresh_token", "client_credentials"])
async def test_the_online_check_never_spends_a_refresh_token_through_a_chain(
    issuers: StartIssuer, tmp_path: Path, capsys: pytest.CaptureFixture[str], grant: str,
) -> None:
    """check-config --online exchanged a chained provider's subject by asking its source,
    which spends the configured refresh token first (a refresh_token provider, or any other
    that carries one) and rotated the daemon's."""
    issuer = await issuers()
    issuer.register(Client("user-client", "none"))
    raw = config(provider_at(issuer, client_id="api-client", grant_type="token_exchange",
                             subject_token_provider="user"), "http://127.0.0.1:9/", tmp_path)
    raw["providers"] = {"api": raw["providers"]["idp"],
                        "user": provider_at(issuer, client_id="user-client",
                                            grant_type=grant, client_auth="none",
                                            refresh_token="the-daemons-refresh-token")}
    raw["routes"] = [{"prefix": "/", "upstream": "http://127.0.0.1:9/", "provider": "api"}]
    path = write_config(tmp_path / "cfg", raw)
    code = await asyncio.to_thread(main, ["check-config", "--online", "-c", str(path)])
    out, err = capsys.readouterr()
    assert [] == [c for c in issuer.calls if c.form.get("grant_type") == "refresh_token"]
    assert "api: not exchanged (its subject 'user' would rotate the refresh token" in out, err
    assert 0 == code, out


async def test_no_subject_actor_assertion_or_token_in_logs_metrics_or_problems(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    clock: JumpClock, tmp_path: Path, http: aiohttp.ClientSession, logs: CapturedLogs,
) -> None:
    """The leak sweep over the asserted grants: an exchange from a file with an actor token,
    a chained exchange, jwt-bearer from a file and signed here; then the files gone and the
    endpoint refusing (invalid_grant). Neither the subject, the actor, the assertions, the
    signing key nor any issued token is in a log line, the metrics, /readyz or an answer."""
    issuer = await issuers()
    k8s = make_key(tmp_path / "keys", "p256", slot=1)
    signer = make_key(tmp_path / "keys", "ed25519", slot=2)
    issuer.trust(K8S_ISSUER, k8s.public, kid="k8s-key", audience=None)
    issuer.trust("jb", signer.public, kid=KID, own=True)
    issuer.register(Client("jb", "none"))
    subject = external_jwt(k8s, clock.time(), aud=issuer.audience)
    actor = external_jwt(k8s, clock.time(), aud=issuer.audience)
    subject_file = write_file(tmp_path / "t" / "subject", subject + "\n")
    actor_file = write_file(tmp_path / "t" / "actor", actor + "\n")
    bearer_file = write_file(tmp_path / "t" / "assertion", subject + "\n")
    up = fake_upstream.url("/")
    raw = config(provider_at(issuer, grant_type="token_exchange",
                             subject_token_file=str(subject_file),
                             actor_token_file=str(actor_file)), up, tmp_path)
    raw["providers"].update(
        chained=provider_at(issuer, grant_type="token_exchange", subject_token_provider="idp"),
        jbf=provider_at(issuer, grant_type="jwt_bearer", assertion_file=str(bearer_file)),
        jbs=provider_at(issuer, grant_type="jwt_bearer", client_id="jb",
                        private_key_file=str(signer.path), key_id=KID))
    raw["routes"] += [{"prefix": f"/{n}", "upstream": up, "provider": n}
                      for n in ("chained", "jbf", "jbs")]
    daemon = await make_proxy(raw)
    await wait_ready(daemon)
    routes = ("/x", "/chained/x", "/jbf/x", "/jbs/x")
    for route in routes:
        await through(http, daemon, fake_upstream, issuer, route)
    subject_file.unlink()
    bearer_file.unlink()
    issuer.faults = [(400, {"error": "invalid_grant", "error_description": "nope"})] * 20
    expire(clock)
    bodies = [(await fetch(http, daemon, route)).body for route in routes]
    async with http.get(f"http://127.0.0.1:{daemon.admin_port}/metrics") as r:
        metrics = await r.text()
    _, ready = await readyz(daemon)
    assert_no_secret(logs.text, metrics, json.dumps(ready), *bodies, extra=[
        subject, actor, signer.secret_text, k8s.secret_text, *issuer.tokens(),
        *[c.form.get("assertion", "") for c in issuer.calls]])



async def test_a_stored_chained_token_without_its_subjects_fingerprint_is_not_taken(
    issuers: StartIssuer, make_proxy: MakeProxy, upstream: object, fake_upstream: FakeUpstream,
    tmp_path: Path, http: aiohttp.ClientSession,
) -> None:
    """An entry without a seed (as written before entries were tied to their subject) was
    adopted when the subject had no token at hand at load, and then never re-exchanged:
    the token exchanged from the subject's old token served on after the subject got a new
    one."""
    issuer = await issuers()
    key = make_key(tmp_path / "keys", "p256")
    raw = chain_config(issuer, key, fake_upstream.url("/"), tmp_path, 0)
    first = await make_proxy(raw)
    await wait_ready(first)
    old = await through(http, first, fake_upstream, issuer, "/b")
    await first.stop()
    state = Path(str(raw["state_path"]))
    doc = json.loads(state.read_text())
    entries = doc["providers"]
    [api] = [k for k, v in entries.items() if v.get("access_token") == old.token]
    entries[api]["seed"] = None
    for k in [k for k in entries if k != api]:
        del entries[k]   # the subject's own entry gone: no token at hand when api loads
    state.write_text(json.dumps(doc))
    second = await make_proxy(raw)
    await wait_ready(second)
    new = await through(http, second, fake_upstream, issuer, "/b")
    assert new.token != old.token
    assert new.call.form["subject_token"] != old.call.form["subject_token"]
