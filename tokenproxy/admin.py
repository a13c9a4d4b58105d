"""The admin listener: /healthz, /readyz and /metrics, apart from every proxied path."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from tokenproxy.errors import RequestRejected
from tokenproxy.proxy.aiohttp_path.responses import problem_response
from tokenproxy.proxy.rules.problem import Problem
from tokenproxy.proxy.rules.security import check_host
from tokenproxy.tokens.source import TokenSource


def _json(status: int, doc: object, **headers: str) -> web.Response:
    return web.Response(status=status, body=json.dumps(doc).encode(),
                        content_type="application/json",
                        headers={"Cache-Control": "no-store", **headers})


class AdminHandler:
    """A low-level handler: three fixed paths, GET and HEAD only, for allowed Hosts only."""

    def __init__(
        self,
        registry: CollectorRegistry,
        sources: Callable[[], Mapping[str, TokenSource]],
        allowed_hosts: Callable[[], frozenset[str] | None],
    ) -> None:
        self._registry = registry
        self._sources = sources
        self._allowed_hosts = allowed_hosts

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        # First: a DNS-rebinding page must not learn even which paths or methods exist.
        try:
            check_host(request.raw_headers, self._allowed_hosts())
        except RequestRejected as exc:
            return problem_response(Problem.of(exc))
        if request.method not in ("GET", "HEAD"):
            return _json(405, {"error": "method not allowed"}, Allow="GET, HEAD")
        path = request.raw_path.split("?", 1)[0]
        if path == "/healthz":
            return _json(200, {"status": "ok"})
        if path == "/readyz":
            sources = self._sources()
            states = {name: src.describe() for name, src in sources.items()}
            ready = all(src.ready() for src in sources.values())
            return _json(200 if ready else 503,
                         {"status": "ready" if ready else "not ready", "providers": states})
        if path == "/metrics":
            encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
            return web.Response(body=encoder(self._registry),
                                headers={"Content-Type": content_type})
        return _json(404, {"error": "not found", "paths": ["/healthz", "/readyz", "/metrics"]})
