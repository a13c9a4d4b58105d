"""An upstream built on the standard library's http.server, the realistic body-ignoring server.

http.server with HTTP/1.1 answers a GET without reading a Content-Length body, as several
frameworks' GET handlers and static file handlers do; the unread body is then parsed as the
next request on that connection. That is what lets a client smuggle a request through a proxy
that forwards such a body and reuses the connection. Routes:

- ``GET|HEAD|DELETE|OPTIONS /status``: ``200 ok``, the body (if any) left unread;
- ``POST /ignore``: ``200 ignored``, the body left unread (an endpoint that ignores POST bodies);
- ``GET /echo-headers``: the request's header lines as the body (what a smuggled request
  swallowed is reflected here);
- ``POST /echo``: the body it read (Content-Length), echoed;
- ``/late``: like /echo-headers, answered ``late`` seconds after the request.

It runs in threads (one per connection), listens on 127.0.0.1 and records every request line.
"""

from __future__ import annotations

import http.server
import threading
import time
from typing import Any


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        pass   # quiet: the tests read ``requests`` instead

    def _record(self) -> None:
        with self.server.lock:
            self.server.requests.append(self.requestline)

    def _answer(self, body: bytes, status: int = 200) -> None:
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Type", "text/plain")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _dispatch(self) -> None:
        self._record()
        path = self.path.split("?", 1)[0]
        if path == "/echo-headers":
            self._answer(self.headers.as_bytes())
        elif path == "/late":
            time.sleep(self.server.late)
            self._answer(self.headers.as_bytes())
        elif path == "/echo" and self.command == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            self._answer(self.rfile.read(length))
        elif path == "/ignore":
            self._answer(b"ignored")
        else:
            self._answer(b"ok")

    do_GET = do_HEAD = do_DELETE = do_OPTIONS = do_POST = do_PUT = _dispatch


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, late: float) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self.late = late


class StdlibUpstream:
    """Start with ``with StdlibUpstream() as up:``; ``up.url()`` is its base URL."""

    def __init__(self, late: float = 0.05) -> None:
        self._server = _Server(late)
        # shutdown() waits for serve_forever to look at its flag again: every 20 ms, not the
        # default 0.5 s, so a test does not pay half a second to stop it.
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.02}, daemon=True)

    def __enter__(self) -> StdlibUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    @property
    def requests(self) -> list[str]:
        with self._server.lock:
            return list(self._server.requests)
