"""Log redaction and the logging pipeline: secrets, credentials and query strings never print."""

from __future__ import annotations

import io
import json
import logging
from typing import Any

import pytest
import structlog
import yarl

from tests.helpers.fakes import SECRETS, TOKEN
from tests.helpers.logs import CapturedLogs
from tokenproxy import log
from tokenproxy.log import MASK, Redactor

SENSITIVE = ["authorization", "proxy-authorization", "cookie", "set-cookie", "tokenproxy-key",
             "access_token", "refresh_token", "id_token", "client_secret", "password", "token"]
REGISTERED = "reg-secret-5b1e0c"   # registered with the Redactor in these tests
UNREGISTERED = "unregistered-secret-4242"


def redact(event: dict[str, Any], *secrets: str) -> dict[str, Any]:
    """Run one event through a Redactor, as structlog would."""
    return dict(Redactor(secrets)(None, "info", event))


def use_stream(level: str = "debug", fmt: str = "json", *secrets: str) -> io.StringIO:
    """Point the whole logging pipeline at a fresh buffer (the autouse fixture resets it)."""
    buf = io.StringIO()
    log.configure(level, fmt, redactor=Redactor(secrets), stream=buf)
    return buf


def lines(buf: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def fail_with_local_secret() -> None:
    secret_local = UNREGISTERED   # a local variable that a locals-showing traceback would print
    raise ValueError("boom " + secret_local[:3])


class TestRedactor:
    @pytest.mark.parametrize("key", [k for name in SENSITIVE
                                     for k in (name, name.upper(), name.title())])
    def test_sensitive_keys_masked_at_any_depth_and_case(self, key: str) -> None:
        """A value under a sensitive key is masked at the top, in dicts and in lists of dicts."""
        event = {key: "plain-1", "outer": {key: "plain-2", "list": [{"deep": {key: "plain-3"}}]}}
        assert {key: MASK, "outer": {key: MASK, "list": [{"deep": {key: MASK}}]}} == redact(event)

    def test_sensitive_key_masks_whole_structures(self) -> None:
        """A sensitive key masks whatever it holds: a dict, a list, a number."""
        event = {"cookie": {"sid": "abc"}, "password": ["a", "b", "c"], "token": 12345}
        assert {"cookie": MASK, "password": MASK, "token": MASK} == redact(event)

    def test_header_pairs_are_masked_by_their_name(self) -> None:
        """Header lists of (name, value) pairs mask the values of sensitive names."""
        headers = [("Authorization", "Basic dXNlcjpwdw=="), ("Accept", "*/*"),
                   ["Set-Cookie", "sid=1"], ("TokenProxy-Key", "k-123")]
        assert {"headers": [["Authorization", MASK], ["Accept", "*/*"], ["Set-Cookie", MASK],
                            ["TokenProxy-Key", MASK]]} == redact({"headers": headers})

    @pytest.mark.parametrize(("text", "expected"), [
        ("Bearer abc.def-ghi_jkl", "Bearer ***"),
        ("got Authorization: Bearer eyJhbGciOi.eyJzdWIi.c2ln from client",
         "got Authorization: Bearer *** from client"),
        ("bearer lower", "bearer ***"),
        ("BEARER upper", "BEARER ***"),
        ("header Basic dXNlcjpwYXNz=", "header Basic ***"),
        ("a bearer of good news", "a bearer *** good news"),   # prose pays for safety
        ("no credentials here", "no credentials here"),
    ])
    def test_bearer_credentials_inside_strings(self, text: str, expected: str) -> None:
        """Bearer/Basic credentials are masked inside any string, including the event text."""
        assert {"event": expected, "note": expected, "nested": [{"x": expected}]} == redact(
            {"event": text, "note": text, "nested": [{"x": text}]})

    def test_registered_secrets_masked_anywhere(self) -> None:
        """A registered secret is masked inside longer strings, lists, tuples and nested dicts."""
        s = REGISTERED
        event = {
            "event": f"failed with {s}",
            "note": f"prefix-{s}-suffix",
            "pair": [s, "second"],
            "list": [s, "x", f"y{s}"],
            "tuple": ("a", s, "c"),
            "nested": {"a": {"b": [{"c": f"({s})"}]}},
            "keyed": {s: "value"},
            "error": ValueError(f"bad {s}"),
        }
        assert {
            "event": "failed with ***",
            "note": "prefix-***-suffix",
            "pair": ["***", "second"],
            "list": ["***", "x", "y***"],
            "tuple": ["a", "***", "c"],
            "nested": {"a": {"b": [{"c": "(***)"}]}},
            "keyed": {"***": "value"},
            "error": "bad ***",
        } == redact(event, s)

    def test_secrets_added_later_are_masked(self) -> None:
        """A secret added after creation (a new token) is masked from then on."""
        redactor = Redactor()
        assert {"x": REGISTERED} == redactor(None, "info", {"x": REGISTERED})
        redactor.add(REGISTERED)
        assert {"x": MASK} == redactor(None, "info", {"x": REGISTERED})

    def test_very_short_secrets_are_not_registered(self) -> None:
        """Secrets under 4 characters are ignored: masking them would mangle ordinary text."""
        assert {"x": "abcdef"} == redact({"x": "abcdef"}, "abc")

    @pytest.mark.parametrize("key", ["path", "url", "target", "location", "PATH", "Url"])
    def test_query_strings_cut_from_paths_and_urls(self, key: str) -> None:
        """path/url fields lose their query string, at any depth and as yarl.URL objects too."""
        event = {key: "/api/x?token=abc&y=1", "up": {key: "http://h:1/p?access_token=abc"},
                 "obj": {key: yarl.URL("http://h/p?refresh_token=abc")}}
        assert {key: "/api/x", "up": {key: "http://h:1/p"}, "obj": {key: "http://h/p"}} == (
            redact(event))

    def test_question_marks_elsewhere_are_kept(self) -> None:
        """Only path-like fields are cut; free text keeps its question marks."""
        assert {"note": "why? because"} == redact({"note": "why? because"})

    def test_deep_nesting_is_bounded(self) -> None:
        """Structures nested deeper than the redactor walks are masked, not recursed forever."""
        deep: dict[str, Any] = {"v": REGISTERED}
        for _ in range(50):
            deep = {"d": deep}
        assert REGISTERED not in json.dumps(redact({"deep": deep}))

    def test_redactor_keeps_only_live_tokens(self) -> None:
        """Tracked tokens: the current and previous one per owner are masked, older ones dropped,
        so the working set stays small however many refreshes happen."""
        r = log.Redactor(["config-secret-value"])
        for n in range(100):
            r.track("idp", f"token-number-{n:04d}")
        text = r.scrub(
            "a token-number-0099 b token-number-0098 c token-number-0001 config-secret-value")
        assert "a *** b *** c token-number-0001 ***" == text


class TestPipeline:
    def test_events_render_as_one_json_object_per_line(self, logs: CapturedLogs) -> None:
        """structlog events come out as JSON lines with event, level, timestamp, redacted."""
        logger = log.get_logger(route="/")
        logger.info("request", path="/a?token=abc", headers={"Cookie": "sid=1"}, status=200)
        logger.warning("other", note="Bearer abcdef")
        first, second = logs.events()
        assert {"event": "request", "route": "/", "path": "/a", "headers": {"Cookie": MASK},
                "status": 200, "level": "info"} == {k: first[k] for k in first
                                                    if k != "timestamp"}
        assert first["timestamp"].endswith("Z")
        assert ("other", "warning", "Bearer ***") == (
            second["event"], second["level"], second["note"])

    def test_context_variables_are_redacted_too(self, logs: CapturedLogs) -> None:
        """Values bound with contextvars pass through the same redaction."""
        with structlog.contextvars.bound_contextvars(authorization="Bearer zzz", url="/p?q=1"):
            log.get_logger().info("request")
        [event] = logs.events()
        assert (MASK, "/p") == (event["authorization"], event["url"])

    def test_exception_rendered_without_locals(self, logs: CapturedLogs) -> None:
        """A logged exception keeps its type and frames but never the frames' local variables."""
        try:
            fail_with_local_secret()
        except ValueError:
            log.get_logger().exception("failed")
        [event] = logs.events()
        [exc] = event["exception"]
        assert "ValueError" == exc["exc_type"]
        assert "fail_with_local_secret" == exc["frames"][-1]["name"]
        assert UNREGISTERED not in logs.text
        assert "secret_local" not in logs.text

    def test_console_exception_rendered_without_locals(self) -> None:
        """In console format a logged exception is a plain traceback: no crash, no locals."""
        buf = use_stream("info", "console")
        try:
            fail_with_local_secret()
        except ValueError:
            log.get_logger().exception("failed")
        out = buf.getvalue()
        assert "failed" in out
        assert "ValueError: boom" in out
        assert "fail_with_local_secret" in out
        assert UNREGISTERED not in out
        assert "secret_local =" not in out

    def test_console_format_is_redacted(self) -> None:
        """The console renderer gets the same redaction as JSON."""
        buf = use_stream("info", "console", REGISTERED)
        log.get_logger().info("request", authorization="Bearer abc", note=REGISTERED,
                              path="/x?token=1")
        out = buf.getvalue()
        assert REGISTERED not in out
        assert "token=1" not in out
        assert "abc" not in out
        assert "path=/x" in out

    def test_stdlib_records_become_redacted_json(self) -> None:
        """stdlib logging (aiohttp's loggers) comes out as JSON through the same redaction."""
        buf = use_stream("info", "json", REGISTERED)
        logging.getLogger("aiohttp.server").error("x %s", REGISTERED)
        logging.getLogger("asyncio").warning("header Bearer abc.def seen")
        first, second = lines(buf)
        assert {"logger": "aiohttp.server", "event": "x ***", "level": "error"} == {
            k: first[k] for k in ("logger", "event", "level")}
        assert {"logger": "asyncio", "event": "header Bearer *** seen",
                "level": "warning"} == {
            k: second[k] for k in ("logger", "event", "level")}

    def test_stdlib_exception_gives_its_type_only(self) -> None:
        """A stdlib record with a traceback logs the exception type, not the traceback."""
        buf = use_stream("info", "json")
        try:
            fail_with_local_secret()
        except ValueError:
            logging.getLogger("aiohttp.server").exception("Error handling request")
        [event] = lines(buf)
        assert ("Error handling request", "ValueError", "error") == (
            event["event"], event["error"], event["level"])
        assert "Traceback" not in buf.getvalue()
        assert UNREGISTERED not in buf.getvalue()

    @pytest.mark.parametrize(("levelno", "name"), [
        (25, "info"), (35, "warning"), (45, "error"), (logging.CRITICAL, "critical"), (60,
                                                                                   "critical"),
    ])
    def test_stdlib_custom_levels_do_not_raise(self, levelno: int, name: str) -> None:
        """A stdlib record at a non-standard level is logged at the nearest level below it."""
        buf = use_stream("info", "json")
        logging.getLogger("lib").log(levelno, "custom")
        [event] = lines(buf)
        assert ("custom", name) == (event["event"], event["level"])

    def test_stdlib_bad_format_args_do_not_raise(self) -> None:
        """A stdlib record whose arguments do not fit its format logs the raw message."""
        buf = use_stream("info", "json")
        # Straight to tokenproxy's handler: pytest's own capture handler would raise first.
        [bridge] = [h for h in logging.getLogger().handlers
                    if type(h).__module__ == "tokenproxy.log"]
        bridge.handle(logging.getLogger("lib").makeRecord(
            "lib", logging.ERROR, __file__, 1, "%s and %s", ("one",), None))
        [event] = lines(buf)
        assert "%s and %s" == event["event"]

    def test_level_filters_structlog_and_stdlib(self) -> None:
        """At level warning, info events and stdlib info records are dropped."""
        buf = use_stream("warning", "json")
        log.get_logger().info("quiet")
        logging.getLogger("aiohttp.server").info("quiet too")
        log.get_logger().warning("loud")
        assert ["loud"] == [e["event"] for e in lines(buf)]

    def test_aiohttp_access_log_is_silenced(self) -> None:
        """aiohttp's access log is off: the proxy's own request event replaces it."""
        buf = use_stream("debug", "json")
        logging.getLogger("aiohttp.access").info('127.0.0.1 "GET /?token=abc HTTP/1.1" 200')
        assert "" == buf.getvalue()

    def test_sweep_would_catch_an_unregistered_secret(self) -> None:
        """An unregistered secret under an ordinary key prints verbatim: the suite's sweep bites."""
        buf = use_stream("debug", "json")   # a Redactor that knows no secret
        log.get_logger().info("oops", detail=f"value={TOKEN}")
        assert [TOKEN] == [s for s in SECRETS if s in buf.getvalue()]
