"""The two logins a person does at the terminal (`tokenproxy login`): the device
authorization grant (RFC 8628) and the authorization code grant with PKCE (RFC 7636) through a
browser and a loopback redirect (RFC 8252). Each ends with a Grant; storing it is commands.py's.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TextIO
from urllib.parse import urlencode

from tokenproxy.clock import Clock
from tokenproxy.config import OAuth2Provider
from tokenproxy.login import LoginFailed
from tokenproxy.login.callback import LoopbackCallback
from tokenproxy.terminal import visible
from tokenproxy.tokens.grant import Grant, GrantFailed, GrantRejected
from tokenproxy.tokens.http import raise_for_answer
from tokenproxy.tokens.oauth2 import OAuth2Grantor

DEVICE_GRANT: Final = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_INTERVAL: Final = 5.0     # RFC 8628 section 3.2
SLOW_DOWN_STEP: Final = 5.0       # RFC 8628 section 3.5
MAX_DEVICE_WAIT: Final = 1800.0   # whatever expires_in says
MAX_INTERVAL: Final = 60.0        # an interval beyond (meant in milliseconds?) is taken as this
BROWSER_WAIT: Final = 300.0       # five minutes for the person at the browser


@dataclass(frozen=True, slots=True)
class Terminal:
    """How a login talks to the person: where it writes, how it opens a browser (None:
    --no-browser, the URL is printed only), and the clock it waits on."""

    out: TextIO
    open_browser: Callable[[str], bool] | None
    clock: Clock

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()


async def device_login(grantor: OAuth2Grantor, cfg: OAuth2Provider, term: Terminal) -> Grant:
    """RFC 8628: show the code and where to enter it, then poll at the server's pace."""
    url = await grantor.login_endpoint("device_authorization")
    if url is None:
        raise LoginFailed("the issuer publishes no device_authorization_endpoint: set "
                          "device_authorization_url")
    answer = await grantor.post(url, {"scope": cfg.scope} if cfg.scope else {},
                                "device authorization")
    try:
        raise_for_answer(answer, "device authorization", oauth=True)
    except GrantRejected as exc:
        raise LoginFailed(exc.reason) from None
    started = DeviceStart.parse(answer.json())
    term.say(f"To log in to {cfg.name}, open {visible(started.verification_uri)} and enter "
             f"the code {visible(started.user_code)}")
    if started.verification_uri_complete:
        term.say(f"(or open {visible(started.verification_uri_complete)}, which has the code "
                 "in it)")
    # Printed, not opened: the device flow is for where there is no browser at hand (an
    # SSH session, whose "browser" would be a console one taking over the terminal).
    return await _poll(grantor, started, term)


async def _poll(grantor: OAuth2Grantor, started: DeviceStart, term: Terminal) -> Grant:
    clock = term.clock
    deadline = clock.monotonic() + started.expires_in
    interval = started.interval
    while True:
        left = deadline - clock.monotonic()
        if left <= 0:
            raise LoginFailed("the code expired before the login was completed")
        await clock.sleep(min(interval, left))
        if clock.monotonic() >= deadline:
            raise LoginFailed("the code expired before the login was completed")
        try:
            return await grantor.redeem({"grant_type": DEVICE_GRANT,
                                         "device_code": started.device_code},
                                        "device code grant")
        except GrantRejected as exc:
            if exc.error == "authorization_pending":
                continue
            if exc.error == "slow_down":
                interval = min(interval + SLOW_DOWN_STEP, MAX_INTERVAL)
                continue
            if exc.error == "access_denied":
                raise LoginFailed("the login was denied") from None
            if exc.error == "expired_token":
                raise LoginFailed("the code expired before the login was completed") from None
            raise LoginFailed(exc.reason) from None
        except GrantFailed as exc:
            # An outage while the person is at the browser: keep asking until the code dies.
            term.say(f"(the token endpoint failed: {visible(exc.reason)}; asking again)")


@dataclass(frozen=True, slots=True)
class DeviceStart:
    device_code: str
    user_code: str
    verification_uri: str
    verification_uri_complete: str | None
    expires_in: float
    interval: float

    @classmethod
    def parse(cls, doc: Any) -> DeviceStart:
        """RFC 8628 section 3.2; ``verification_url`` taken too (Google's spelling)."""
        if not isinstance(doc, dict):
            raise LoginFailed("the device authorization answer is not a JSON object")
        device = _text(doc.get("device_code"))
        user = _text(doc.get("user_code"))
        uri = _text(doc.get("verification_uri", doc.get("verification_url")))
        if device is None or user is None or uri is None:
            raise LoginFailed("the device authorization answer lacks device_code, user_code "
                              "or verification_uri")
        complete = doc.get("verification_uri_complete")
        return cls(device, user, uri,
                   complete if isinstance(complete, str) and len(complete) <= 4096 else None,
                   min(_seconds(doc.get("expires_in"), 600.0), MAX_DEVICE_WAIT),
                   min(max(_seconds(doc.get("interval"), DEFAULT_INTERVAL), 1.0),
                       MAX_INTERVAL))


def _openable(url: str, issuer_endpoint: str) -> bool:
    """Only a web page is handed to the browser: https, or http where the issuer itself is
    (a file:// or another scheme's handler is no place an issuer sends a person)."""
    scheme = url.split(":", 1)[0].lower()
    return scheme == "https" or (scheme == "http" and issuer_endpoint.startswith("http:"))


def _text(value: object) -> str | None:
    return value if isinstance(value, str) and 0 < len(value) <= 4096 else None


def _seconds(value: object, default: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    number = float(value)
    return number if math.isfinite(number) and number > 0 else default


def pkce_pair() -> tuple[str, str]:
    """(code_verifier, S256 code_challenge), RFC 7636 section 4.1 and 4.2."""
    verifier = secrets.token_urlsafe(64)   # 86 characters of the unreserved set
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


async def browser_login(grantor: OAuth2Grantor, cfg: OAuth2Provider, term: Terminal) -> Grant:
    """RFC 6749 section 4.1 with PKCE, the code coming back to a one-shot loopback listener
    (RFC 8252 section 7.3) that takes only the answer whose ``state`` is ours."""
    url = await grantor.login_endpoint("authorization")
    if url is None:
        raise LoginFailed("the issuer publishes no authorization_endpoint: set "
                          "authorization_url")
    verifier, challenge = pkce_pair()
    state = secrets.token_urlsafe(24)
    issuer = cfg.issuer.url if cfg.issuer is not None else None
    require_iss = grantor.metadata is not None and grantor.metadata.iss_parameter_supported
    async with LoopbackCallback(cfg.redirect_port, cfg.redirect_path, state, issuer,
                                require_iss) as back:
        redirect_uri = back.redirect_uri
        assert cfg.client_id is not None
        query = {"response_type": "code", "client_id": cfg.client_id,
                 "redirect_uri": redirect_uri, "state": state, "code_challenge": challenge,
                 "code_challenge_method": "S256"} | ({"scope": cfg.scope} if cfg.scope else {})
        target = url + ("&" if "?" in url else "?") + urlencode(query)
        opener = term.open_browser
        # In a thread: a browser that takes a while to start must not stall the listener.
        opened = opener is not None and _openable(target, url) and await asyncio.to_thread(
            opener, target)
        term.say(("Your browser was opened to log in to " if opened else
                  "To log in to ") + f"{cfg.name}" + (", or" if opened else ",") +
                 f" open:\n  {visible(target)}")
        code = await back.wait(BROWSER_WAIT, term.clock)
    return await grantor.redeem({"grant_type": "authorization_code", "code": code,
                                 "redirect_uri": redirect_uri, "code_verifier": verifier},
                                "authorization code grant")
