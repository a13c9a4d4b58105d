"""Who may use the proxy: Host allowlist, cross-site, relayed requests, required header, client key.

Every refused request is answered by tokenproxy itself (problem+json, ``Tokenproxy-Error``) and
never reaches the upstream; no answer carries a secret.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict

from tests.helpers.config import MakeProxy, proxy_config, upstream_url
from tests.helpers.fakes import CLIENT_KEY, TOKEN, FakeUpstream, assert_no_secret
from tests.helpers.rawhttp import RawResponse, assert_problem, exchange, first_answer, get
from tests.helpers.rawupstream import connected
from tokenproxy.daemon import Daemon


async def start(make_proxy: MakeProxy, upstream: TestServer, **overrides: Any) -> Daemon:
    """A daemon with the one-route config to *upstream*, top-level keys replaced."""
    return await make_proxy(proxy_config(upstream_url(upstream, "/"), TOKEN, **overrides))


async def send(
    daemon: Daemon,
    headers: list[tuple[str, str]] | None = None,
    method: str = "GET",
    path: str = "/status/200",
    data: Any = None,
) -> RawResponse:
    """One request through aiohttp's client; checks that the answer carries no secret."""
    hdrs: CIMultiDict[str] = CIMultiDict(headers or [])
    async with (
        aiohttp.ClientSession(auto_decompress=False) as s,
        s.request(method, f"http://127.0.0.1:{daemon.port()}{path}", headers=hdrs,
                  data=data) as resp,
    ):
        body = await resp.read()
        raw_headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in resp.raw_headers]
    text = "".join(f"{k}: {v}\r\n" for k, v in raw_headers).encode("latin-1") + body
    assert_no_secret(text)
    return RawResponse(resp.status, "HTTP/1.1", raw_headers, body, text)


class TestAllowedHosts:
    @pytest.mark.slow
    @pytest.mark.parametrize(
        "host",
        [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.1.nip.io",
            "user@localhost",
            "localhost@evil",
            "localhost:80@evil.example",
            "localhost:8080:80",
            "127.0.0.1.",
            "2130706433",
            "[::1].evil.example",
            "[::1]:8080.evil.example",
            "[::1]@evil.example",
            "",
        ],
    )
    async def test_foreign_host_refused(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        host: str,
    ) -> None:
        """A Host header naming anything but an allowed host (port ignored) gets 403."""
        daemon = await start(make_proxy, upstream)
        resp = await first_answer(daemon.port(), get("/status/200", host))
        assert_problem(resp, 403, "forbidden_host")
        assert [] == fake_upstream.seen

    async def test_missing_host_http10_refused(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """An HTTP/1.0 request without Host gets 403: the local address is not a Host."""
        daemon = await start(make_proxy, upstream)
        resp = await first_answer(daemon.port(), get("/status/200", None, version="HTTP/1.0"))
        assert_problem(resp, 403, "forbidden_host")
        assert [] == fake_upstream.seen

    async def test_http09_request_refused(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """An HTTP/0.9-style request line without a version carries no Host: 403."""
        daemon = await start(make_proxy, upstream)
        resp = await first_answer(daemon.port(), b"GET /status/200\r\n\r\n")
        assert_problem(resp, 403, "forbidden_host")
        assert [] == fake_upstream.seen

    @pytest.mark.slow
    async def test_bare_http09_line_never_forwarded(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """A lone HTTP/0.9 request line is never forwarded; header_timeout closes it."""
        daemon = await start(make_proxy, upstream, limits={"header_timeout": "300ms"})
        async with connected(daemon.port()) as conn:
            await conn.send(b"GET /status/200\r\n")
            assert await conn.wait_closed(2.0) is not None
        if conn.trailing:   # an answer, if any, is a refusal
            assert conn.trailing.startswith((b"HTTP/0.9 403", b"HTTP/1.0 403", b"HTTP/1.1 403"))
        assert_no_secret(conn.trailing)
        assert [] == fake_upstream.seen

    async def test_duplicate_host_refused(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """Two Host headers, even equal ones, get 400 and the connection is closed."""
        daemon = await start(make_proxy, upstream)
        resp, closed = await exchange(
            daemon.port(), get("/status/200", "localhost", "Host: localhost"))
        assert_problem(resp, 400, "bad_request")
        assert closed
        assert [] == fake_upstream.seen

    @pytest.mark.parametrize(
        "host",
        ["localhost", "localhost:1", "LOCALHOST:8080", "127.0.0.1", "127.0.0.1:8080",
         "[::1]:8080", "[::1]"],
    )
    async def test_allowed_host_passes(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        host: str,
    ) -> None:
        """The default allowlist is localhost, 127.0.0.1 and ::1 with any port."""
        daemon = await start(make_proxy, upstream)
        resp = await first_answer(daemon.port(), get("/status/200", host))
        assert 200 == resp.status
        assert ["/status/200"] == [s.raw_path for s in fake_upstream.seen]

    async def test_wildcard_turns_check_off(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """allowed_hosts ["*"] lets any Host through, and a request without one."""
        daemon = await start(make_proxy, upstream, security={"allowed_hosts": ["*"]})
        resp = await first_answer(daemon.port(), get("/status/200", "evil.example"))
        assert 200 == resp.status
        resp = await first_answer(daemon.port(), get("/status/200", None, version="HTTP/1.0"))
        assert 200 == resp.status
        assert 2 == len(fake_upstream.seen)

    async def test_explicit_list_replaces_defaults(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """An explicit allowed_hosts list is the whole list: localhost is then refused."""
        daemon = await start(make_proxy, upstream, security={"allowed_hosts": ["API.Internal"]})
        resp = await first_answer(daemon.port(), get("/status/200", "api.internal:8080"))
        assert 200 == resp.status
        resp = await first_answer(daemon.port(), get("/status/200", "localhost"))
        assert_problem(resp, 403, "forbidden_host")
        assert 1 == len(fake_upstream.seen)


class TestCrossSite:
    @pytest.mark.parametrize(
        ("method", "headers"),
        [
            ("POST", [("Origin", "https://evil.example"),
                      ("Content-Type", "application/x-www-form-urlencoded")]),
            ("GET", [("Origin", "https://evil.example")]),
            ("POST", [("Origin", "null")]),
            ("GET", [("Origin", "http://localhost:8080")]),
            ("GET", [("Sec-Fetch-Site", "cross-site")]),
            ("GET", [("Sec-Fetch-Site", "same-site")]),
            ("GET", [("Sec-Fetch-Site", "same-origin")]),
            ("GET", [("Sec-Fetch-Site", "Cross-Site")]),
            ("GET", [("Sec-Fetch-Site", "none"), ("Origin", "https://evil.example")]),
        ],
    )
    async def test_browser_request_refused(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        method: str, headers: list[tuple[str, str]],
    ) -> None:
        """A request with Origin, or with Sec-Fetch-Site other than none, gets 403."""
        daemon = await start(make_proxy, upstream)
        resp = await send(daemon, headers, method=method, data=b"a=1" if method == "POST" else None)
        assert_problem(resp, 403, "cross_site")
        assert [] == fake_upstream.seen

    async def test_cors_preflight_refused_without_allow_headers(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """A CORS preflight gets 403 and no Access-Control-Allow-* header at all."""
        daemon = await start(make_proxy, upstream)
        resp = await send(daemon, [
            ("Origin", "https://evil.example"),
            ("Access-Control-Request-Method", "DELETE"),
            ("Access-Control-Request-Headers", "authorization"),
        ], method="OPTIONS")
        assert_problem(resp, 403, "cross_site")
        assert [] == [k for k, _ in resp.headers if k.lower().startswith("access-control-")]
        assert [] == fake_upstream.seen

    async def test_sec_fetch_site_none_passes(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """Sec-Fetch-Site: none (typed into the address bar) is not cross-site."""
        daemon = await start(make_proxy, upstream)
        resp = await send(daemon, [("Sec-Fetch-Site", "none")])
        assert 200 == resp.status
        assert 1 == len(fake_upstream.seen)

    @pytest.mark.parametrize(
        "header", [("Origin", "https://evil.example"), ("Sec-Fetch-Site", "cross-site")]
    )
    async def test_check_can_be_turned_off(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        header: tuple[str, str],
    ) -> None:
        """reject_cross_site: false lets browser requests through."""
        daemon = await start(make_proxy, upstream, security={"reject_cross_site": False})
        resp = await send(daemon, [header])
        assert 200 == resp.status
        assert 1 == len(fake_upstream.seen)


class TestForwarded:
    @pytest.mark.parametrize(
        "header",
        [
            ("Forwarded", "for=192.0.2.1;proto=http"),
            ("X-Forwarded-For", "192.0.2.1"),
            ("x-forwarded-for", "127.0.0.1"),
            ("Via", "1.1 squid"),
            ("Forwarded", ""),
        ],
    )
    async def test_relayed_request_refused(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        header: tuple[str, str],
    ) -> None:
        """A request carrying Forwarded, X-Forwarded-For or Via gets 403."""
        daemon = await start(make_proxy, upstream)
        resp = await send(daemon, [header])
        assert_problem(resp, 403, "forwarded")
        assert [] == fake_upstream.seen

    async def test_check_can_be_turned_off(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """reject_forwarded: false lets relayed requests through."""
        daemon = await start(make_proxy, upstream, security={"reject_forwarded": False})
        resp = await send(daemon, [("X-Forwarded-For", "192.0.2.1"), ("Via", "1.1 squid")])
        assert 200 == resp.status
        assert 1 == len(fake_upstream.seen)


REQUIRE = {"require_header": "Tokenproxy-Request: 1"}


class TestRequireHeader:
    @pytest.mark.parametrize(
        "headers",
        [
            [],
            [("Tokenproxy-Request", "0")],
            [("Tokenproxy-Request", "11")],
            [("Tokenproxy-Request", "true")],
            [("Tokenproxy-Request", "")],
            [("Tokenproxy-Request", "1"), ("Tokenproxy-Request", "1")],
            [("Tokenproxy-Request", "1"), ("Tokenproxy-Request", "2")],
            [("Tokenproxy-Requests", "1")],
        ],
    )
    async def test_missing_or_wrong_header_412(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        headers: list[tuple[str, str]],
    ) -> None:
        """Without exactly one required header with the right value: 412."""
        daemon = await start(make_proxy, upstream, security=REQUIRE)
        resp = await send(daemon, headers)
        assert_problem(resp, 412, "require_header")
        assert [] == fake_upstream.seen

    @pytest.mark.parametrize("name", ["Tokenproxy-Request", "tokenproxy-request"])
    async def test_right_header_passes_and_is_not_forwarded(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        name: str,
    ) -> None:
        """The required header lets the request through and stays with the proxy."""
        daemon = await start(make_proxy, upstream, security=REQUIRE)
        resp = await send(daemon, [(name, "1")])
        assert 200 == resp.status
        [seen] = fake_upstream.seen
        assert [] == seen.header("Tokenproxy-Request")


class TestClientKey:
    @pytest.mark.parametrize(
        "headers",
        [
            [],
            [("Tokenproxy-Key", "wrong-key-0123456789abcdef")],
            [("Tokenproxy-Key", CLIENT_KEY[:-1])],
            [("Tokenproxy-Key", CLIENT_KEY + "0")],
            [("Tokenproxy-Key", CLIENT_KEY.upper())],
            [("Tokenproxy-Key", "")],
            [("Tokenproxy-Key", CLIENT_KEY), ("Tokenproxy-Key", CLIENT_KEY)],
            [("Tokenproxy-Key", CLIENT_KEY), ("Tokenproxy-Key", "wrong")],
            [("Authorization", f"Bearer {CLIENT_KEY}")],
        ],
    )
    async def test_missing_or_wrong_key_403(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        headers: list[tuple[str, str]],
    ) -> None:
        """Without exactly one Tokenproxy-Key carrying the key: 403, key never echoed."""
        daemon = await start(make_proxy, upstream, security={"client_key": CLIENT_KEY})
        resp = await send(daemon, headers)
        assert_problem(resp, 403, "client_key")
        assert [] == fake_upstream.seen

    async def test_right_key_passes_and_is_not_forwarded(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """The right key lets the request through; Tokenproxy-Key never goes upstream."""
        daemon = await start(make_proxy, upstream, security={"client_key": CLIENT_KEY})
        resp = await send(daemon, [("Tokenproxy-Key", CLIENT_KEY)])
        assert 200 == resp.status
        [seen] = fake_upstream.seen
        assert [] == seen.header("Tokenproxy-Key")
        assert all(CLIENT_KEY not in v for _, v in seen.headers)

    async def test_key_from_file(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        tmp_path: Path,
    ) -> None:
        """client_key_file is read (trailing newline dropped) and works like client_key."""
        key_file = tmp_path / "client_key"
        key_file.write_text(CLIENT_KEY + "\n")
        daemon = await start(make_proxy, upstream,
                             security={"client_key_file": str(key_file)})
        resp = await send(daemon, [("Tokenproxy-Key", CLIENT_KEY)])
        assert 200 == resp.status
        resp = await send(daemon, [("Tokenproxy-Key", "wrong-key-0123456789abcdef")])
        assert_problem(resp, 403, "client_key")
        resp = await send(daemon)
        assert_problem(resp, 403, "client_key")
        [seen] = fake_upstream.seen
        assert [] == seen.header("Tokenproxy-Key")

    async def test_key_header_dropped_when_no_key_configured(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream
    ) -> None:
        """Tokenproxy-Key is never forwarded, even when no client_key is configured."""
        daemon = await start(make_proxy, upstream)
        resp = await send(daemon, [("Tokenproxy-Key", "some-other-value-1234")])
        assert 200 == resp.status
        [seen] = fake_upstream.seen
        assert [] == seen.header("Tokenproxy-Key")


class TestNotFound:
    @pytest.mark.parametrize("path", ["/other", "/", "/apix", "/ap", "/API/x"])
    async def test_path_outside_routes_404(
        self, make_proxy: MakeProxy, upstream: TestServer, fake_upstream: FakeUpstream,
        path: str,
    ) -> None:
        """A path outside every route gets 404 problem+json; /api does not match /apix."""
        daemon = await start(make_proxy, upstream, routes=[
            {"prefix": "/api", "upstream": upstream_url(upstream, "/echo/"), "provider": "api"},
        ])
        resp = await send(daemon, path=path)
        assert_problem(resp, 404, "not_found")
        assert [] == fake_upstream.seen

class TestMetrics:
    async def test_refused_request_is_counted(
        self, make_proxy: MakeProxy, upstream: TestServer
    ) -> None:
        """Each refusal increments tokenproxy_requests_rejected_total for its cause."""
        daemon = await start(make_proxy, upstream)
        await send(daemon, [("Origin", "https://evil.example")])
        await send(daemon, [("Via", "1.1 squid")])
        name = "tokenproxy_rejected_requests_total"
        get_value = daemon.registry.get_sample_value
        assert 1 == get_value(name, {"cause": "cross_site"})
        assert 1 == get_value(name, {"cause": "forwarded"})
