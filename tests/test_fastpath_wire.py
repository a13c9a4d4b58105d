"""The bytes the fast path writes (proxy/fast_path/wire.py): request and response heads, the
framing line of a relayed answer, chunks, its own problem answers and the Date header."""

from __future__ import annotations

import types

import pytest

from tokenproxy.proxy.fast_path import wire
from tokenproxy.proxy.rules.problem import Problem

DATE = b"Sun, 06 Dec 2026 21:00:00 GMT"


def test_a_request_head_up_to_the_token_line() -> None:
    """Request line, the upstream's Host, then the client's fields in order; no final CRLF
    (the token line and the CRLF follow)."""
    assert (b"GET /v1/x?y=1 HTTP/1.1\r\nHost: upstream.test\r\nAccept: */*\r\n"
            b"X-Multi: 1\r\nx-multi: 2\r\n") == wire.render_request(
        b"GET", b"/v1/x?y=1", b"upstream.test",
        [(b"Accept", b"*/*"), (b"X-Multi", b"1"), (b"x-multi", b"2")], None)


def test_a_request_head_with_its_length_and_last_on_the_connection() -> None:
    """The Content-Length is the one the fast path counts, never the client's field; a last
    request asks the upstream to close (proxy/rules/reuse.py)."""
    assert (b"POST /u HTTP/1.1\r\nHost: h:8080\r\nContent-Length: 5\r\nConnection: close\r\n"
            b"X-A: 1\r\n") == wire.render_request(b"POST", b"/u", b"h:8080", [(b"X-A", b"1")],
                                                   5, close=True)
    assert b"POST /u HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n" == wire.render_request(
        b"POST", b"/u", b"h", [], 0)


def test_a_preserved_host_comes_with_the_clients_fields() -> None:
    assert b"GET / HTTP/1.1\r\nHost: api.local\r\n" == wire.render_request(
        b"GET", b"/", None, [(b"Host", b"api.local")], None)


def test_a_response_head() -> None:
    assert (b"HTTP/1.1 200 OK\r\nX-A: 1\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n"
            b"Date: " + DATE + b"\r\nContent-Length: 2\r\n\r\n") == wire.render_response(
        200, b"OK", [(b"X-A", b"1"), (b"Set-Cookie", b"a=1"), (b"Set-Cookie", b"b=2")],
        b"Content-Length: 2\r\n", DATE, False)


def test_a_response_head_keeps_the_upstreams_date_and_says_close() -> None:
    assert (b"HTTP/1.1 404 Not Found\r\ndate: Thu, 01 Jan 2026 00:00:00 GMT\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n") == wire.render_response(
        404, b"", [(b"date", b"Thu, 01 Jan 2026 00:00:00 GMT")],
        b"Transfer-Encoding: chunked\r\n", DATE, True)


@pytest.mark.parametrize(("status", "phrase"), [
    (200, b"OK"), (404, b"Not Found"), (502, b"Bad Gateway"), (299, b"Unknown"),
])
def test_the_standard_reason_phrase_when_the_upstreams_is_empty(status: int,
                                                                phrase: bytes) -> None:
    assert phrase == wire.reason_phrase(status)
    assert wire.render_response(status, b"", [], b"", DATE, False).startswith(
        b"HTTP/1.1 %d %s\r\n" % (status, phrase))


@pytest.mark.parametrize(("status", "length", "no_body", "framing"), [
    (200, b"5", False, (b"Content-Length: 5\r\n", False)),
    (200, None, False, (b"Transfer-Encoding: chunked\r\n", True)),    # chunked or close-delimited
    (200, b"5", True, (b"Content-Length: 5\r\n", False)),             # a HEAD's length
    (200, None, True, (b"", False)),
    (304, b"1234", True, (b"Content-Length: 1234\r\n", False)),       # the representation's
    (204, b"0", True, (b"", False)),                                  # never on a 204
])
def test_the_framing_of_a_relayed_answer(status: int, length: bytes | None, no_body: bool,
                                         framing: tuple[bytes, bool]) -> None:
    assert framing == wire.response_framing(status, length, no_body)


def test_chunks() -> None:
    assert b"5\r\nhello\r\n" == wire.chunk(b"hello")
    assert b"100\r\n" + b"x" * 256 + b"\r\n" == wire.chunk(b"x" * 256)
    assert b"0\r\n\r\n" == wire.CHUNKED_END


def test_a_problem_answer_of_its_own() -> None:
    problem = Problem(503, "token_unavailable", "no token", 2.5)
    head, body = wire.problem(problem, DATE)
    assert problem.body() == body
    assert (b"HTTP/1.1 503 Service Unavailable\r\nTokenproxy-Error: token_unavailable\r\n"
            b"Cache-Control: no-store\r\nContent-Type: application/problem+json\r\n"
            b"Retry-After: 3\r\nDate: " + DATE + b"\r\nContent-Length: %d\r\n\r\n" % len(body)
            ) == head
    closing, _ = wire.problem(Problem(400, "bad_request", "no"), DATE, close=True)
    assert closing.endswith(b"\r\nConnection: close\r\n\r\n")


def test_the_date_is_rendered_once_a_second(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    monkeypatch.setattr(wire, "time", types.SimpleNamespace(time=lambda: now[0]))
    date = wire.DateHeader()
    first = date()
    assert b"Thu, 01 Jan 1970 00:00:00 GMT" == first
    now[0] = 0.9
    assert first is date()          # the same second: not rendered again
    now[0] = 86400 * 365 + 1.2
    assert b"Fri, 01 Jan 1971 00:00:01 GMT" == date()
