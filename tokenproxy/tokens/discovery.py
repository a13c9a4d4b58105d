"""Finding an authorization server's endpoints from its issuer URL.

Servers publish their metadata in one of three places, tried in this order:

1. ``<issuer>/.well-known/openid-configuration`` (OpenID Connect Discovery 1.0, section 4);
2. ``<origin>/.well-known/oauth-authorization-server<issuer path>`` (RFC 8414 section 3.1:
   the well-known segment inserted between the host and the issuer's path);
3. ``<issuer>/.well-known/oauth-authorization-server`` (appended to the path, as several
   servers publish it instead; django-oauth-toolkit does).

The document's ``issuer`` must be the configured one (RFC 8414 section 3.3), or a document
served for another issuer could send the client credentials elsewhere. A network failure or a
5xx is an outage (retried with backoff); when every location answered and none holds a usable
document, the issuer is misconfigured, and the error names every URL tried.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp

from tokenproxy.config.values import HttpUrl, parse_http_url
from tokenproxy.errors import ConfigError
from tokenproxy.tokens.grant import GrantFailed, GrantRejected
from tokenproxy.tokens.http import AnswerTooLarge, call

OPENID: Final = "/.well-known/openid-configuration"
RFC8414: Final = "/.well-known/oauth-authorization-server"
DISCOVERY: Final = "discovery"   # the grant label of these calls in metrics and logs


class DiscoveryFailed(GrantRejected):
    """Every metadata location answered, and none with a usable document for this issuer:
    a configuration problem, not an outage (retrying would not help)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.grant = DISCOVERY


@dataclass(frozen=True, slots=True)
class ServerMetadata:
    """The endpoints tokenproxy uses, from an authorization server's metadata document."""

    issuer: str
    token_endpoint: str
    authorization_endpoint: str | None = None
    device_authorization_endpoint: str | None = None
    revocation_endpoint: str | None = None
    userinfo_endpoint: str | None = None
    # RFC 9207: the issuer puts iss in its authorization answers.
    iss_parameter_supported: bool = False


def discovery_urls(issuer: str) -> list[str]:
    """The metadata locations for *issuer*, in the order they are tried (module docstring)."""
    base = issuer.rstrip("/")
    parts = urlsplit(base)
    origin = f"{parts.scheme}://{parts.netloc}"
    urls = [base + OPENID, origin + RFC8414 + parts.path, base + RFC8414]
    return list(dict.fromkeys(urls))   # without a path, the last two are the same


def _same_issuer(found: object, configured: str) -> bool:
    # RFC 8414 wants them identical; a trailing "/" is forgiven, as it names the same issuer.
    return isinstance(found, str) and found.rstrip("/") == configured.rstrip("/")


def _endpoint(doc: dict[str, Any], name: str, issuer: HttpUrl) -> str | None:
    value = doc.get(name)
    if value is None:
        return None
    try:
        url = parse_http_url(value, name)
    except ConfigError:
        raise ValueError(f"its {name} is not an http(s) URL without a query") from None
    if issuer.scheme == "https" and url.scheme != "https":
        raise ValueError(f"its {name} is not https")
    return url.url


def _optional_endpoint(doc: dict[str, Any], name: str, issuer: HttpUrl) -> str | None:
    """An endpoint not used yet: one tokenproxy could not use (a query, as RFC 6749 section
    3.1 allows for the authorization endpoint) is left out, not held against the document."""
    try:
        return _endpoint(doc, name, issuer)
    except ValueError:
        return None


def parse_metadata(doc: object, issuer: HttpUrl) -> ServerMetadata:
    """The metadata *doc* as ServerMetadata; ValueError says what is wrong with it."""
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    if not _same_issuer(doc.get("issuer"), issuer.url):
        raise ValueError("its issuer is not the configured one")
    token = _endpoint(doc, "token_endpoint", issuer)
    if token is None:
        raise ValueError("it has no token_endpoint")
    return ServerMetadata(
        issuer=issuer.url, token_endpoint=token,
        authorization_endpoint=_optional_endpoint(doc, "authorization_endpoint", issuer),
        device_authorization_endpoint=_optional_endpoint(
            doc, "device_authorization_endpoint", issuer),
        revocation_endpoint=_optional_endpoint(doc, "revocation_endpoint", issuer),
        userinfo_endpoint=_optional_endpoint(doc, "userinfo_endpoint", issuer),
        iss_parameter_supported=doc.get("authorization_response_iss_parameter_supported")
        is True,
    )


async def discover(session: aiohttp.ClientSession, issuer: HttpUrl, *, within: float,
                   ssl_context: ssl.SSLContext | bool = True) -> ServerMetadata:
    """Fetch and check the issuer's metadata (GrantFailed: outage; DiscoveryFailed: none)."""
    tried: list[str] = []
    outage = False
    for url in discovery_urls(issuer.url):
        try:
            answer = await call(session, "GET", url, within=within, ssl_context=ssl_context,
                                headers={"Accept": "application/json"}, redirects_fail=False)
        except GrantFailed as exc:
            tried.append(f"{url} ({exc.reason})")
            # An answer too large to be metadata (a web app's catch-all page) is an answer.
            outage = outage or not isinstance(exc, AnswerTooLarge)
            continue
        if answer.status != 200:
            tried.append(f"{url} (status {answer.status})")
            outage = outage or answer.status >= 500 or answer.status == 429
            continue
        try:
            return parse_metadata(answer.json(), issuer)
        except (ValueError, GrantFailed) as exc:
            reason = exc.reason if isinstance(exc, GrantFailed) else str(exc)
            tried.append(f"{url} ({reason})")
    message = "discovery found no usable metadata; tried " + ", ".join(tried)
    if outage:
        failed = GrantFailed(message)
        failed.grant = DISCOVERY
        raise failed
    raise DiscoveryFailed(message + ": check the provider's issuer")
