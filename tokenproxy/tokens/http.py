"""The outgoing client for token endpoints: bounded in time and size, never redirected."""

from __future__ import annotations

import asyncio
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDictProxy

from tokenproxy.tokens.grant import MAX_RESPONSE, GrantFailed, GrantRejected, strict_json

# RFC 6749 section 5.2 error codes that mean "these credentials will not work": no retry helps.
REJECTING_ERRORS: Final = frozenset({
    "invalid_grant", "invalid_client", "unauthorized_client", "unsupported_grant_type",
    "invalid_scope", "access_denied",
})


class AnswerTooLarge(GrantFailed):
    """An answer over MAX_RESPONSE: no token endpoint or metadata document is that large."""


def make_token_session() -> aiohttp.ClientSession:
    """One client for all token endpoints of a daemon: decompression on, no cookies, no proxy."""
    return aiohttp.ClientSession(
        cookie_jar=aiohttp.DummyCookieJar(),
        trust_env=False,
        timeout=aiohttp.ClientTimeout(total=None),
        connector=aiohttp.TCPConnector(limit=16, keepalive_timeout=15.0),
    )


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return strict_json(self.body)


def retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("Retry-After", "").strip()
    if value.isdigit():
        return min(float(value), 3600.0)
    return None


def where(url: str) -> str:
    """The scheme, host and port of *url*: enough to name it, never its path or query."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def failure_reason(exc: BaseException) -> str:
    """What went wrong in words ("connection refused"), not only the exception's class."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "TLS certificate not trusted"
    if isinstance(exc, aiohttp.ClientConnectorDNSError):
        return "host name not found"
    if isinstance(exc, ssl.SSLError | aiohttp.ClientSSLError):
        return "TLS failure"
    if isinstance(exc, aiohttp.ClientConnectorError):
        # The OS's words for the errno ("connection refused"); asyncio's strerror is a
        # sentence of its own ("connect call failed ('127.0.0.1', 1)").
        errno = exc.os_error.errno
        return os.strerror(errno).lower() if errno else "connection failed"
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientPayloadError):
        return "connection closed before a complete answer"
    if isinstance(exc, aiohttp.ClientResponseError):
        return "malformed answer"
    return f"request failed ({type(exc).__name__})"


async def call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    *,
    within: float,
    ssl_context: ssl.SSLContext | bool = True,
    redirects_fail: bool = True,
    **kwargs: Any,
) -> Answer:
    """One exchange within *within* seconds, never redirected: an oversize body fails it, and
    so does a redirect unless the caller takes it as an answer. Failures name the host."""
    try:
        async with asyncio.timeout(within):
            async with session.request(method, url, allow_redirects=False, ssl=ssl_context,
                                       **kwargs) as resp:
                answer = Answer(resp.status, resp.headers, await _read_capped(resp))
    except TimeoutError:
        raise GrantFailed(f"{where(url)}: no answer within {within:g}s") from None
    except (aiohttp.ClientError, ssl.SSLError) as exc:
        raise GrantFailed(f"{where(url)}: {failure_reason(exc)}") from None
    if redirects_fail and 300 <= answer.status < 400:
        raise GrantFailed(f"{where(url)}: redirected (status {answer.status}); not followed")
    return answer


async def _read_capped(resp: aiohttp.ClientResponse) -> bytes:
    """The whole body up to EOF, however many reads it takes; over MAX_RESPONSE fails."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        size += len(chunk)
        if size > MAX_RESPONSE:
            raise AnswerTooLarge(f"the answer is larger than {MAX_RESPONSE} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def error_code(answer: Answer) -> str | None:
    """The RFC 6749 ``error`` of an error answer, if it is a short plain code."""
    try:
        doc = answer.json()
    except GrantFailed:
        return None
    code = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(code, str) and code.replace("_", "").isalnum() and len(code) <= 64:
        return code
    return None


# RFC 6749 section 5.2's error code characters.
_ERROR_CODE: Final = re.compile(r"[\x20\x21\x23-\x5B\x5D-\x7E]{1,64}")
# What a 2xx carrying an OAuth error can mean as a refusal (GitHub answers its device flow and
# refresh errors with 200): RFC 6749's, RFC 8628's while polling, GitHub's own.
REFUSING_IN_2XX: Final = REJECTING_ERRORS | {
    "authorization_pending", "slow_down", "expired_token", "bad_refresh_token",
    "bad_verification_code", "incorrect_client_credentials", "incorrect_device_code"}


def _error_in_success(answer: Answer) -> str | None:
    if b'"error"' not in answer.body:
        return None
    try:
        doc = answer.json()
    except GrantFailed:
        return None
    if not isinstance(doc, dict) or "access_token" in doc:
        return None
    code = doc.get("error")
    return code if isinstance(code, str) and _ERROR_CODE.fullmatch(code) else None


def raise_for_answer(answer: Answer, what: str, *, oauth: bool = False) -> None:
    """Map a non-2xx answer: credential rejections vs. failures worth retrying later. With
    *oauth* (an OAuth token endpoint), a 2xx whose JSON is an OAuth error and no token is taken
    for the error it is: a refusal for the codes that mean one, else a failure to retry."""
    if 200 <= answer.status < 300:
        code = _error_in_success(answer) if oauth else None
        if code is None:
            return
        reason = f"{what}: status {answer.status} with error ({code})"
        if code in REFUSING_IN_2XX:
            raise GrantRejected(reason, code)
        raise GrantFailed(reason)
    code = error_code(answer)
    reason = f"{what}: status {answer.status}" + (f" ({code})" if code else "")
    if code in REJECTING_ERRORS or answer.status in (400, 401, 403):
        raise GrantRejected(reason, code)
    failed = GrantFailed(reason, retry_after(answer.headers))
    # Another 4xx (a 404 from a misrouted ingress, a 405) is the endpoint saying no, though
    # not to these credentials: retried later, but counted as refused. 408 and 429 ask us to
    # come back.
    failed.refused = 400 <= answer.status < 500 and answer.status not in (408, 429)
    raise failed
