"""How upstream connections are made and kept, by both clients (the fast path's own and
aiohttp's): the same numbers, stated once."""

from __future__ import annotations

from typing import Final

# An idle upstream connection is kept this long: below common upstream idle timeouts (nginx
# 75 s, AWS ALB 60 s), so the upstream rarely closes one just as it is reused.
KEEPALIVE: Final = 15.0
# A host name is resolved again after this many seconds.
DNS_TTL: Final = 10.0
# A connect (TCP and TLS) gives up after this many seconds; the route's timeout, when
# shorter, ends the wait first.
CONNECT_TIMEOUT: Final = 30.0
