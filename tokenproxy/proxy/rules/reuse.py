"""When an upstream connection may carry another request: one rule for both request paths.

Many servers answer a request without reading its body: GET handlers, static files, errors
answered early. The body's bytes then stay in the connection, and the server parses them as
requests of its own. A client could put the start of a request there, and the next request
tokenproxy sends on that connection -- its token line included -- would become that request's
headers or body, reflected back by any endpoint that echoes. So:

- a body on a method that usually has none (GET, HEAD, DELETE, OPTIONS) is sent with
  ``Connection: close``, and the connection is never used again;
- so is every HEAD request: its answer has no body, but servers that answer HEAD with their
  GET handler send one anyway, and its bytes could arrive once the connection carried the
  next client's request, as that client's answer;
- any other request body taints its connection: it is reused only for later requests of the
  same client connection (whose own bytes it carries), never for another client;
- bytes that arrive on an idle connection condemn it.

What is left: an upstream endpoint that ignores the body of a POST, PUT or PATCH lets a client
that can already use the token through the proxy learn it, from its own next request. Only
closing after every body would prevent that; docs/reliability.md says why that is not done.
"""

from __future__ import annotations

from typing import Final

BODILESS_METHODS: Final = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})


def last_request(method: str, has_body: bool) -> bool:
    """Whether the upstream connection must close after this request (see the module doc)."""
    return method == "HEAD" or (has_body and method in BODILESS_METHODS)
