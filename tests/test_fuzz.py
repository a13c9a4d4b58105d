"""Property tests: whatever the input, the config loader, the target and header logic and the
token-answer parser either accept it or refuse it cleanly, and never let the origin change."""

from __future__ import annotations

import contextlib
import json
import math
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenproxy.config import build_config, parse_yaml
from tokenproxy.config.model import Route
from tokenproxy.config.values import parse_http_url
from tokenproxy.errors import ConfigError, RequestRejected
from tokenproxy.proxy.rules.headers import HOP_BY_HOP, request_headers
from tokenproxy.proxy.rules.target import RouteTable, split_target
from tokenproxy.tokens.grant import (
    MAX_LIFETIME,
    GrantFailed,
    grant_from,
    parse_expires_in,
    strict_json,
)
from tokenproxy.tokens.source import is_usable_token

FUZZ = settings(max_examples=300, deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

# The schema's own words, so generated documents get past the first unknown key often.
KEYS = ["listen", "admin_listen", "log", "level", "format", "state_path", "shutdown_grace",
        "security", "allowed_hosts", "reject_cross_site", "client_key", "limits",
        "max_replay_body", "header_timeout", "providers", "api", "type", "static", "token",
        "token_file", "oauth2", "token_url", "client_id", "client_secret", "routes", "prefix",
        "upstream", "provider", "timeout", "retry_on", "json", "login", "url", "command"]
SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(-10**30, 10**30), st.floats(allow_nan=True),
    st.text(max_size=20), st.sampled_from(["/", "https://h.example/", "127.0.0.1:0", "static",
                                           "oauth2", "api", "10s", "1MiB", "${X}", "${X:-1}"]),
)
DOCS = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), inner,
                        max_size=5),
    ),
    max_leaves=25,
)


@pytest.mark.slow   # hundreds of generated examples
@FUZZ
@given(DOCS)
def test_any_document_is_a_config_or_a_config_error(doc: Any) -> None:
    """Any YAML document: a valid Config or one ConfigError, never another exception."""
    try:
        text = yaml.safe_dump(doc)
    except (yaml.YAMLError, ValueError):
        return
    error: ConfigError | None = None
    try:
        build_config(parse_yaml(text, "fuzz"), {"X": "1"})
    except ConfigError as exc:
        error = exc
    assert error is None or str(error)


@FUZZ
@given(st.text(max_size=200))
@pytest.mark.slow
def test_any_text_is_a_config_or_a_config_error(text: str) -> None:
    """Arbitrary text as a config file: a Config or a ConfigError."""
    with contextlib.suppress(ConfigError):
        build_config(parse_yaml(text, "fuzz"), {})


ROUTES = [
    Route(prefix="/", match="", upstream=parse_http_url("https://up.example/base/", "u"),
          provider="p"),
    Route(prefix="/api", match="/api", upstream=parse_http_url("http://api.example:8080/v1", "u"),
          provider="p"),
]
TABLE = RouteTable(ROUTES)
PATH_CHARS = st.sampled_from([*"/.%2eEfF5c\\;@:?#&=+ aZ0", "%2f", "%2e", "%2F", "..", "//",
                              "%25", "%00", "\u00e9"])


@pytest.mark.slow
@FUZZ
@given(st.sampled_from(["GET", "POST", "CONNECT", "TRACE", "OPTIONS"]),
       st.lists(PATH_CHARS, max_size=30).map("".join),
       st.sampled_from(["", "/", "/api", "/api/", "http://evil.example", "//evil.example"]))
def test_upstream_origin_never_changes(method: str, tail: str, head: str) -> None:
    """Whatever the request target, it is refused or lands on the route's own origin, under
    the route's upstream path."""
    target = head + tail
    try:
        path, query = split_target(method, target)
    except RequestRejected as exc:
        refused = exc.status
    else:
        refused = 0
    if refused:
        assert 400 == refused
        return
    compiled = TABLE.match(path)
    if compiled is None:
        return
    try:
        url = compiled.upstream_url(path, query)
    except (RequestRejected, ValueError):
        return
    assert compiled.origin_url == url.origin()
    assert url.raw_path.startswith(compiled.base_path)
    assert ".." not in url.raw_path.split("/")


HEADER_NAMES = st.sampled_from(["Connection", "Keep-Alive", "TE", "Trailer", "Upgrade",
                                "Transfer-Encoding", "Proxy-Authorization", "Proxy-Foo",
                                "Tokenproxy-Key", "Authorization", "Host", "Expect", "X-A",
                                "x-b", "Cookie", "Accept"])
HEADER_VALUES = st.one_of(st.sampled_from(["close", "keep-alive, X-A", "Authorization",
                                           "x-b,  ,Cookie", "upgrade"]),
                          st.text(alphabet="abcXYZ-, ", max_size=12))


@pytest.mark.slow
@FUZZ
@given(st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=12), st.booleans())
def test_forwarded_headers_never_carry_hop_by_hop_or_the_key(
    pairs: list[tuple[str, str]], keep: bool
) -> None:
    """No hop-by-hop field, Connection-listed name, Proxy-* or Tokenproxy-Key goes upstream."""
    headers = [(k.encode(), v.encode()) for k, v in pairs]
    listed = {n.strip().lower().encode() for k, v in pairs if k.lower() == "connection"
              for n in v.split(",") if n.strip()}
    out, _, _ = request_headers(headers, drop=frozenset({b"tokenproxy-key"}),
                                auth_header=b"authorization", keep_client_auth=keep,
                                preserve_host=False)
    for name, _ in out:
        low = name.lower()
        assert low not in HOP_BY_HOP
        assert low not in listed
        assert not low.startswith(b"proxy-")
        assert low not in (b"tokenproxy-key", b"host", b"expect")


JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False),
              st.text(max_size=30)),
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(
                                ["access_token", "expires_in", "refresh_token", "x"]),
                                inner, max_size=4)),
    max_leaves=12,
)


@pytest.mark.slow   # hundreds of generated examples
@FUZZ
@given(st.one_of(st.binary(max_size=200), JSON_VALUES.map(lambda v: json.dumps(v).encode())))
def test_token_answers_parse_or_fail_cleanly(body: bytes) -> None:
    """Any token-endpoint body: a Grant with a header-safe token, or GrantFailed."""
    try:
        grant = grant_from(strict_json(body))
    except GrantFailed:
        return
    assert is_usable_token(grant.access_token)
    if grant.expires_in is not None:
        assert 0 < grant.expires_in <= MAX_LIFETIME


@FUZZ
@given(st.one_of(st.none(), st.booleans(), st.integers(-10**400, 10**400), st.floats(),
                 st.text(max_size=20), st.lists(st.integers(), max_size=2)))
@pytest.mark.slow
def test_expires_in_is_finite_positive_or_none(value: Any) -> None:
    """parse_expires_in never raises and never returns an unusable lifetime."""
    result = parse_expires_in(value)
    assert result is None or (math.isfinite(result) and 0 < result <= MAX_LIFETIME)
