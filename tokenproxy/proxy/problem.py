"""RFC 9457 problem+json answers for errors tokenproxy itself produces."""

from __future__ import annotations

import json
import math
from typing import Final

from aiohttp import web

# A URN the project controls (RFC 9457 allows any URI); docs/errors.md lists every name.
PROBLEM_BASE: Final = "urn:tokenproxy:problem:"
_TITLES: Final = {
    "bad_request": "Bad request",
    "forbidden_host": "Host not allowed",
    "cross_site": "Cross-site request refused",
    "forwarded": "Relayed request refused",
    "client_key": "Missing or wrong Tokenproxy-Key",
    "require_header": "Required request header missing",
    "not_found": "No route for this path",
    "header_too_large": "Request header fields too large",
    "request_timeout": "Request body not received in time",
    "expectation_failed": "Expectation not supported",
    "upstream_unreachable": "Upstream unreachable",
    "upstream_timeout": "Upstream timed out",
    "token_unavailable": "No access token available",
    "unauthenticated": "Credentials rejected by the token endpoint",
    "provider_misconfigured": "Token provider misconfigured",
    "internal": "Internal error",
}


def problem_body(status: int, cause: str, detail: str) -> bytes:
    doc = {
        "type": PROBLEM_BASE + cause,
        "title": _TITLES.get(cause, cause),
        "status": status,
        "detail": detail,
    }
    return json.dumps(doc).encode()


class ProblemResponse(web.Response):
    """An answer of ours without aiohttp's ``Server: Python/... aiohttp/...`` (it names
    versions, and the fast path's answers carry no Server either)."""

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall("Server", None)


def problem_response(
    status: int, cause: str, detail: str, *, retry_after: float | None = None,
    close: bool = False,
) -> ProblemResponse:
    """The answer for an error of ours: problem+json and ``Tokenproxy-Error: <cause>``."""
    headers = {"Tokenproxy-Error": cause, "Cache-Control": "no-store"}
    if retry_after is not None:
        headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
    resp = ProblemResponse(
        status=status,
        body=problem_body(status, cause, detail),
        content_type="application/problem+json",
        headers=headers,
    )
    if close:
        resp.force_close()
    return resp
