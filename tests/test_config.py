"""The YAML schema: values, environment, secrets, validation, defaults."""

from __future__ import annotations

import copy
import datetime
import itertools
import math
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.fakes import (
    CLIENT_KEY,
    CLIENT_SECRET,
    PASSWORD,
    REFRESH_TOKEN,
    SECRETS,
    TOKEN,
    TOKEN_2,
)
from tokenproxy.config import (
    CommandProvider,
    Config,
    JsonProvider,
    LimitsConfig,
    Listener,
    LogConfig,
    OAuth2Provider,
    SecurityConfig,
    StaticProvider,
    build_config,
    find_config_file,
    load_config,
    parse_yaml,
)
from tokenproxy.config.load import accepted_keys
from tokenproxy.config.secrets import config_secrets
from tokenproxy.config.values import expand_env, parse_duration, parse_listener, parse_size
from tokenproxy.errors import ConfigError

REPO = Path(__file__).resolve().parent.parent
# Where tokens persist when no state_path is given: providers other than static need one.
HOME = {"HOME": "/home/u"}

SIX_LINES = """\
providers:
  api: {type: static, token: "${API_TOKEN}"}
routes:
  - prefix: /
    upstream: https://api.example.com/
    provider: api
"""


def base(**top: Any) -> dict[str, Any]:
    """The six-line config as a dict (token inline); keyword arguments replace top-level keys."""
    raw: dict[str, Any] = {
        "providers": {"api": {"type": "static", "token": TOKEN}},
        "routes": [{"prefix": "/", "upstream": "https://api.example.com/", "provider": "api"}],
    }
    raw.update(top)
    return raw


def with_route(**route: Any) -> dict[str, Any]:
    """base() whose single route has the given keys replaced (None removes a key)."""
    raw = base()
    raw["routes"][0].update(route)
    raw["routes"][0] = {k: v for k, v in raw["routes"][0].items() if v is not None}
    return raw


def with_provider(name: str, provider: dict[str, Any]) -> dict[str, Any]:
    """base() with one more provider, used by a second route /p."""
    raw = base()
    raw["providers"][name] = provider
    raw["routes"].append({"prefix": "/p", "upstream": "https://p.example.com/", "provider": name})
    return raw


def error_of(raw: object, env: dict[str, str] | None = None) -> str:
    """The ConfigError message build_config raises for *raw*."""
    with pytest.raises(ConfigError) as info:
        build_config(raw, env or {})
    return str(info.value)


OAUTH2: dict[str, Any] = {
    "type": "oauth2",
    "token_url": "https://auth.example.com/oauth2/token",
    "client_id": "my-app",
    "client_secret": CLIENT_SECRET,
}
JSON: dict[str, Any] = {
    "type": "json",
    "login": {
        "url": "https://api.example.com/auth/login",
        "json": {"username": "me", "password": PASSWORD},
        "access_token": "/accessToken",
        "refresh_token": "/refreshToken",
    },
    "refresh": {
        "url": "https://api.example.com/auth/refresh",
        "json": {"refreshToken": "{refresh_token}"},
    },
}


def oauth2(**keys: Any) -> dict[str, Any]:
    """The OAuth2 provider above with keys replaced (None removes a key)."""
    out = {**OAUTH2, **keys}
    return {k: v for k, v in out.items() if v is not None}


def json_provider(login: dict[str, Any] | None = None, **keys: Any) -> dict[str, Any]:
    """The JSON provider above; *login* keys are merged into its login block (None removes)."""
    out = copy.deepcopy(JSON)
    out["login"].update(login or {})
    out["login"] = {k: v for k, v in out["login"].items() if v is not None}
    out.update(keys)
    return {k: v for k, v in out.items() if v is not None}


# ---------------------------------------------------------------- durations and sizes


@pytest.mark.parametrize(
    ("raw", "seconds"),
    [
        (30, 30.0),
        (2.5, 2.5),
        ("500ms", 0.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1.5h", 5400.0),
        (0, 0.0),
        ("0s", 0.0),
        ("30", 30.0),
        (" 10s ", 10.0),
    ],
)
def test_parse_duration_accepts(raw: object, seconds: float) -> None:
    """Durations are seconds as numbers, or strings with ms/s/m/h; a bare number string is s."""
    assert seconds == parse_duration(raw, "x.timeout")


BAD_DURATIONS = [
    -1,
    -0.5,
    "5 parsecs",
    True,
    False,
    math.nan,
    math.inf,
    "1e999",
    [],
    {},
    "",
    "-5s",
    "5d",
    "s",
    10**400,
]


@pytest.mark.parametrize("raw", BAD_DURATIONS, ids=lambda v: repr(v)[:12])
def test_parse_duration_rejects_naming_the_key(raw: object) -> None:
    """A bad duration is a ConfigError that names the key path, never another exception."""
    with pytest.raises(ConfigError) as info:
        parse_duration(raw, "routes[0].timeout")
    assert str(info.value).startswith("routes[0].timeout: ")


@pytest.mark.parametrize("raw", BAD_DURATIONS, ids=lambda v: repr(v)[:12])
def test_bad_duration_in_config_names_the_key(raw: object) -> None:
    """A bad duration inside a config names its full key path."""
    assert error_of(with_route(timeout=raw)).startswith("routes[0].timeout: ")


def test_zero_is_refused_where_a_positive_duration_is_needed() -> None:
    """Timeouts that must be positive (limits.header_timeout) refuse 0."""
    msg = error_of(base(limits={"header_timeout": 0}))
    assert msg.startswith("limits.header_timeout: not a positive duration")


@pytest.mark.parametrize(
    ("raw", "size"),
    [
        (1024, 1024),
        (0, 0),
        ("64KiB", 64 * 1024),
        ("1MiB", 1024 * 1024),
        ("2GB", 2_000_000_000),
        ("1GiB", 1024**3),
        ("10kb", 10_000),
        ("1.5KiB", 1536),
        ("512", 512),
        ("512b", 512),
    ],
)
def test_parse_size_accepts(raw: object, size: int) -> None:
    """Sizes are bytes as numbers, or strings with decimal or binary units."""
    assert size == parse_size(raw, "limits.max_replay_body")


BAD_SIZES = [
    -1,
    "5 parsecs",
    True,
    math.nan,
    math.inf,
    "1e999",
    [],
    "",
    "1.5",
    "1.5b",
    "64k",
    "-1KiB",
    10**400,
]


@pytest.mark.parametrize("raw", BAD_SIZES, ids=lambda v: repr(v)[:12])
def test_parse_size_rejects_naming_the_key(raw: object) -> None:
    """A bad size is a ConfigError that names the key path, never another exception."""
    with pytest.raises(ConfigError) as info:
        parse_size(raw, "limits.max_replay_body")
    assert str(info.value).startswith("limits.max_replay_body: ")


@pytest.mark.parametrize("raw", BAD_SIZES, ids=lambda v: repr(v)[:12])
def test_bad_size_in_config_names_the_key(raw: object) -> None:
    """A bad size inside a config names its full key path."""
    assert error_of(base(limits={"max_replay_body": raw})).startswith("limits.max_replay_body: ")


def test_limits_are_parsed_with_units() -> None:
    """Every limits key takes its unit-bearing form and lands in LimitsConfig."""
    cfg = build_config(base(limits={
        "max_replay_body": "2MiB", "max_header_size": "32KiB", "header_timeout": "5s",
        "keepalive_timeout": "2m", "max_connections": 10,
    }), {})
    assert LimitsConfig(max_replay_body=2 * 1024**2, max_header_size=32 * 1024,
                        header_timeout=5.0, keepalive_timeout=120.0,
                        max_connections=10) == cfg.limits


@pytest.mark.parametrize(
    ("limits", "key"),
    [
        ({"max_connections": 0}, "limits.max_connections"),
        ({"max_connections": "many"}, "limits.max_connections"),
        ({"max_connections": True}, "limits.max_connections"),
        ({"max_header_size": 100}, "limits.max_header_size"),
        ({"keepalive_timeout": 0}, "limits.keepalive_timeout"),
    ],
)
def test_bad_limits_name_the_key(limits: dict[str, Any], key: str) -> None:
    """Out-of-range limits are refused with their key path."""
    assert error_of(base(limits=limits)).startswith(f"{key}: ")


# ---------------------------------------------------------------- environment


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A}", {"A": "x"}, "x"),
        ("pre-${A}-post", {"A": "x"}, "pre-x-post"),
        ("${A}${B}", {"A": "1", "B": "2"}, "12"),
        ("${A:-dflt}", {}, "dflt"),
        ("${A:-dflt}", {"A": "set"}, "set"),
        ("${A:-dflt}", {"A": ""}, "dflt"),
        ("${A}", {"A": ""}, ""),
        ("${A:-}", {}, ""),
        ("${URL:-https://h.example:8443/v1}", {}, "https://h.example:8443/v1"),
        ("$$", {}, "$"),
        ("a$$b", {}, "a$b"),
        ("$${A}", {"A": "x"}, "${A}"),
        ("$$$${A}", {"A": "x"}, "$${A}"),
        ("cost $5", {}, "cost $5"),
        ("$A", {"A": "x"}, "$A"),
        ("${A}", {"A": "${B}"}, "${B}"),
        ("${A}", {"A": "a$$b"}, "a$$b"),
        ("no dollar", {}, "no dollar"),
    ],
)
def test_expand_env(text: str, env: dict[str, str], expected: str) -> None:
    """${VAR}, ${VAR:-default} and $$ expand once; values are not expanded again."""
    assert expected == expand_env(text, env, "k")


def test_env_in_provider_token_route_upstream_and_nested_values() -> None:
    """${...} is replaced in any string: a token, an upstream, list items, nested maps."""
    raw = {
        "listen": ["127.0.0.1:${PORT}", "unix:${RUNTIME:-/run}/tp.sock"],
        "providers": {
            "api": {"type": "static", "token": "${API_TOKEN}"},
            "legacy": json_provider(login={"json": {"username": "${USER_NAME}",
                                                    "scopes": ["${SCOPE:-read}"]}}),
        },
        "routes": [
            {"prefix": "/", "upstream": "https://${API_HOST}/v1/", "provider": "api"},
            {"prefix": "/l", "upstream": "https://l.example.com/", "provider": "legacy"},
        ],
    }
    cfg = build_config(raw, {"PORT": "8081", "API_TOKEN": TOKEN, "API_HOST": "api.example.com",
                             "USER_NAME": "alice", **HOME})
    assert ("127.0.0.1:8081", "unix:/run/tp.sock") == tuple(str(li) for li in cfg.listen)
    api = cfg.providers["api"]
    assert isinstance(api, StaticProvider)
    assert api.token is not None
    assert TOKEN == api.token.value
    assert "https://api.example.com/v1/" == cfg.routes[0].upstream.url
    legacy = cfg.providers["legacy"]
    assert isinstance(legacy, JsonProvider)
    assert {"username": "alice", "scopes": ["read"]} == legacy.login.json


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (base(providers={"api": {"type": "static", "token": "${API_TOKEN}"}}),
         "providers.api.token: environment variable API_TOKEN is not set"),
        (with_route(upstream="https://${API_HOST}/"),
         "routes[0].upstream: environment variable API_HOST is not set"),
        (base(listen=["127.0.0.1:8080", "127.0.0.1:${PORT}"]),
         "listen[1]: environment variable PORT is not set"),
        (with_provider("legacy", json_provider(login={"json": {"password": "${PW}"}})),
         "providers.legacy.login.json.password: environment variable PW is not set"),
    ],
)
def test_missing_env_var_names_key_and_variable(raw: dict[str, Any], message: str) -> None:
    """A missing variable without a default names the key path and the variable."""
    assert message == error_of(raw)


def test_env_var_set_to_empty_string_is_used_as_is() -> None:
    """${VAR} set to "" is "", which a static token then refuses as empty."""
    raw = base(providers={"api": {"type": "static", "token": "${API_TOKEN}"}})
    assert error_of(raw, {"API_TOKEN": ""}).startswith("providers.api.token: ")


def test_dollar_dollar_keeps_a_literal_dollar_in_a_token() -> None:
    """$$ in a token is one literal $ (escape for tokens that contain ${)."""
    raw = base(providers={"api": {"type": "static", "token": "ab$${X}cd"}})
    token = build_config(raw, {}).providers["api"]
    assert isinstance(token, StaticProvider)
    assert token.token is not None
    assert "ab${X}cd" == token.token.value


def test_env_values_feed_typed_keys() -> None:
    """A duration, size or listener given as ${VAR:-default} is parsed after expansion."""
    cfg = build_config(
        base(shutdown_grace="${GRACE:-30}", limits={"max_replay_body": "${BODY:-2048}"},
             listen="${LISTEN:-127.0.0.1:8181}"),
        {},
    )
    assert 30.0 == cfg.shutdown_grace
    assert 2048 == cfg.limits.max_replay_body
    assert (Listener(kind="tcp", host="127.0.0.1", port=8181),) == cfg.listen


# ---------------------------------------------------------------- *_file secrets


def write(path: Path, text: str) -> str:
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.mark.parametrize("ending", ["\n", "\r\n", ""])
def test_token_file_is_read_and_newline_stripped(tmp_path: Path, ending: str) -> None:
    """token_file is read at load, without its trailing newline, and remembered for re-reads."""
    path = write(tmp_path / "token", TOKEN + ending)
    cfg = build_config(base(providers={"api": {"type": "static", "token_file": path}}), {})
    api = cfg.providers["api"]
    assert isinstance(api, StaticProvider)
    assert api.token is not None
    assert TOKEN == api.token.value
    assert Path(path) == api.token_file


def test_secret_files_of_every_kind_are_read(tmp_path: Path) -> None:
    """client_secret_file, password_file, refresh_token_file, client_key_file are all read."""
    raw = base(security={"client_key_file": write(tmp_path / "key", CLIENT_KEY + "\n")})
    raw["providers"]["pw"] = oauth2(
        client_secret=None, client_secret_file=write(tmp_path / "cs", CLIENT_SECRET + "\n"),
        grant_type="password", username="alice",
        password_file=write(tmp_path / "pw", PASSWORD + "\n"),
    )
    raw["providers"]["rt"] = oauth2(
        grant_type="refresh_token", client_auth="none", client_id=None, client_secret=None,
        refresh_token_file=write(tmp_path / "rt", REFRESH_TOKEN + "\n"),
    )
    cfg = build_config(raw, HOME)
    assert cfg.security.client_key is not None
    assert CLIENT_KEY == cfg.security.client_key.value
    pw, rt = cfg.providers["pw"], cfg.providers["rt"]
    assert isinstance(pw, OAuth2Provider)
    assert isinstance(rt, OAuth2Provider)
    assert pw.client_secret is not None
    assert pw.password is not None
    assert rt.refresh_token is not None
    assert (CLIENT_SECRET, PASSWORD, REFRESH_TOKEN) == (
        pw.client_secret.value, pw.password.value, rt.refresh_token.value)


def test_secret_file_path_may_come_from_env(tmp_path: Path) -> None:
    """A *_file path can itself use ${VAR}."""
    write(tmp_path / "token", TOKEN_2)
    raw = base(providers={"api": {"type": "static", "token_file": "${SECRETS}/token"}})
    api = build_config(raw, {"SECRETS": str(tmp_path)}).providers["api"]
    assert isinstance(api, StaticProvider)
    assert api.token is not None
    assert TOKEN_2 == api.token.value


def secret_file_config(key: str, path: str) -> dict[str, Any]:
    """A config whose secret at *key* (a full key path ending in _file) is read from *path*."""
    return {
        "providers.api.token_file":
            base(providers={"api": {"type": "static", "token_file": path}}),
        "providers.corp.client_secret_file":
            with_provider("corp", oauth2(client_secret=None, client_secret_file=path)),
        "providers.corp.password_file":
            with_provider("corp", oauth2(grant_type="password", username="u",
                                         password_file=path)),
        "providers.corp.refresh_token_file":
            with_provider("corp", oauth2(grant_type="refresh_token", refresh_token_file=path)),
        "security.client_key_file": base(security={"client_key_file": path}),
    }[key]


@pytest.mark.parametrize("key", ["providers.api.token_file", "providers.corp.client_secret_file",
                                 "providers.corp.password_file",
                                 "providers.corp.refresh_token_file", "security.client_key_file"])
@pytest.mark.parametrize("kind", ["missing", "directory"])
def test_unreadable_secret_file_names_the_file_key(tmp_path: Path, key: str, kind: str) -> None:
    """A missing or unreadable *_file is a ConfigError naming the ..._file key and the path."""
    path = tmp_path / "nope" if kind == "missing" else tmp_path
    reason = "No such file or directory" if kind == "missing" else "Is a directory"
    assert f"{key}: cannot read {path}: {reason}" == error_of(secret_file_config(key, str(path)))


@pytest.mark.parametrize("content", ["", "\n", "  \n\n"])
@pytest.mark.parametrize("key", ["security.client_key_file", "providers.corp.client_secret_file"])
def test_empty_secret_file_is_refused(tmp_path: Path, key: str, content: str) -> None:
    """An empty secret file (a volume not mounted yet) is refused, never taken as a secret."""
    path = write(tmp_path / "secret", content)
    assert f"{key}: {path} is empty" == error_of(secret_file_config(key, path))


def test_empty_token_file_is_refused(tmp_path: Path) -> None:
    """An empty token file gives no usable token: a ConfigError naming token_file."""
    path = write(tmp_path / "token", "\n")
    msg = error_of(base(providers={"api": {"type": "static", "token_file": path}}))
    assert msg.startswith("providers.api.token_file: ")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (base(providers={"api": {"type": "static", "token": TOKEN, "token_file": "/x"}}),
         "providers.api.token: give token or token_file (one of them)"),
        (with_provider("corp", oauth2(client_secret_file="/x")),
         "providers.corp.client_secret: give client_secret or client_secret_file, not both"),
        (with_provider("corp", oauth2(grant_type="password", username="u", password=PASSWORD,
                                      password_file="/x")),
         "providers.corp.password: give password or password_file, not both"),
        (with_provider("corp", oauth2(grant_type="refresh_token", refresh_token=REFRESH_TOKEN,
                                      refresh_token_file="/x")),
         "providers.corp.refresh_token: give refresh_token or refresh_token_file, not both"),
        (base(security={"client_key": CLIENT_KEY, "client_key_file": "/x"}),
         "security.client_key: give client_key or client_key_file, not both"),
    ],
)
def test_secret_and_its_file_together_are_refused(raw: dict[str, Any], message: str) -> None:
    """Giving both x and x_file is an error: one of them would be silently ignored."""
    assert message == error_of(raw)


def test_secrets_are_masked_in_repr() -> None:
    """The validated Config's repr shows no secret, so formatting it cannot leak."""
    raw = base(security={"client_key": CLIENT_KEY})
    raw["providers"]["corp"] = oauth2(grant_type="password", username="u", password=PASSWORD)
    raw["providers"]["rt"] = oauth2(grant_type="refresh_token", refresh_token=REFRESH_TOKEN)
    text = repr(build_config(raw, HOME))
    assert [] == [s for s in (TOKEN, CLIENT_KEY, CLIENT_SECRET, PASSWORD, REFRESH_TOKEN)
                  if s in text]


# ---------------------------------------------------------------- unknown keys, YAML


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (base(listne="127.0.0.1:8080"), "listne: unknown key (did you mean 'listen'?)"),
        ({"rotues": base()["routes"], "providers": base()["providers"]},
         "rotues: unknown key (did you mean 'routes'?)"),
        (base(security={"client_kye": CLIENT_KEY}),
         "security.client_kye: unknown key (did you mean 'client_key'?)"),
        (base(limits={"max_body": 10}),
         "limits.max_body: unknown key (did you mean 'max_replay_body'?)"),
        (base(limits={"frobnicate": 10}), "limits.frobnicate: unknown key"),
        (base(log={"levle": "debug"}), "log.levle: unknown key (did you mean 'level'?)"),
        (base(providers={"api": {"type": "static", "token": TOKEN, "refresh": 1}}),
         "providers.api.refresh: unknown key (did you mean 'refresh_margin'?)"),
        (base(providers={"api": {"type": "static", "tokne": TOKEN}}),
         "providers.api.tokne: unknown key (did you mean 'token'?)"),
        (with_provider("corp", oauth2(client_secert=CLIENT_SECRET, client_secret=None)),
         "providers.corp.client_secert: unknown key (did you mean 'client_secret'?)"),
        (with_provider("cli", {"type": "command", "comand": ["x"]}),
         "providers.cli.comand: unknown key (did you mean 'command'?)"),
        (with_route(timout="5s"), "routes[0].timout: unknown key (did you mean 'timeout'?)"),
        (with_route(upstrem="https://api.example.com/", upstream=None),
         "routes[0].upstrem: unknown key (did you mean 'upstream'?)"),
        (with_provider("legacy", json_provider(login={"ulr": "https://h/", "url": None})),
         "providers.legacy.login.ulr: unknown key (did you mean 'url'?)"),
        (with_provider("legacy", json_provider(login={"acess_token": "/t"})),
         "providers.legacy.login.acess_token: unknown key (did you mean 'access_token'?)"),
        (with_provider("legacy", json_provider(refresh={**JSON["refresh"], "methd": "PUT"})),
         "providers.legacy.refresh.methd: unknown key (did you mean 'method'?)"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_unknown_keys_are_rejected_at_every_level(raw: dict[str, Any], message: str) -> None:
    """An unknown key (a typo) is an error naming its full path, even if it hides a required
    key, and the known key it is closest to when there is one."""
    assert message == error_of(raw)


def test_duplicate_yaml_keys_are_rejected() -> None:
    """A key given twice in one mapping is an error naming the key and line, not last-one-wins."""
    text = SIX_LINES.replace("routes:", "providers: {}\nroutes:")
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, "tp.yaml")
    assert "tp.yaml: line 3: duplicate key 'providers'" == str(info.value)


def test_nested_duplicate_yaml_keys_are_rejected() -> None:
    """Duplicates are caught in nested mappings too."""
    text = "providers:\n  api:\n    type: static\n    token: a\n    token: b\n"
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, "tp.yaml")
    assert "tp.yaml: line 5: duplicate key 'token'" == str(info.value)


def test_yaml_merge_key_may_be_overridden() -> None:
    """A key that overrides one merged in with << is not a duplicate."""
    text = ("base: &b {header: X-Key, timeout: 5s}\n"
            "route:\n  <<: *b\n  timeout: 9s\n")
    assert {"base": {"header": "X-Key", "timeout": "5s"},
            "route": {"header": "X-Key", "timeout": "9s"}} == parse_yaml(text, "tp.yaml")


@pytest.mark.parametrize(
    ("text", "line"),
    [
        (f"providers:\n  api: {{type: static, token: {TOKEN}\nroutes: []\n", 3),
        (f"providers:\n  api:\n    token: {TOKEN}\n   type: static\n", 4),
        (f'providers:\n  api: {{token: "{TOKEN}\n', 3),
        (f"providers:\n  api: {{type: static, token: *{TOKEN}}}\n", 2),
        (f"providers:\n  api: {{type: static, token: !{TOKEN} x}}\n", 2),
        (f"providers:\n\tapi: {TOKEN}\n", 2),
        (f'providers:\n  api: {{token: "{TOKEN}\\q"}}\n', 2),
    ],
    ids=["unclosed-flow", "bad-indent", "unclosed-quote", "undefined-alias", "unknown-tag",
         "tab", "bad-escape"],
)
def test_yaml_syntax_error_names_line_and_hides_content(text: str, line: int) -> None:
    """A YAML error is one line with the file and line number, and no part of the file's text."""
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, "tp.yaml")
    msg = str(info.value)
    assert msg.startswith(f"tp.yaml: line {line}: invalid YAML")
    assert "\n" not in msg
    assert TOKEN not in msg
    assert "tp-test" not in msg


@pytest.mark.parametrize(
    "text",
    ["state_path: 2024-13-45\n", "token: 2023-02-30 10:00:00\n", "? [a, b]\n: 1\n"],
    ids=["bad-date", "bad-datetime", "unhashable-key"],
)
def test_yaml_values_that_cannot_be_constructed_are_config_errors(text: str) -> None:
    """Impossible dates and unhashable keys are ConfigErrors, not tracebacks."""
    with pytest.raises(ConfigError) as info:
        parse_yaml(text, "tp.yaml")
    assert str(info.value).startswith("tp.yaml: ")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", "config: expected a mapping"),
        ("", "providers: at least one provider is needed"),
        ("providers: [a]\n", "providers: expected a mapping"),
        ("providers:\n  1: {type: static, token: x}\n", "providers: keys must be strings, got 1"),
    ],
)
def test_document_shape_errors(text: str, message: str) -> None:
    """The document and its sections must be mappings with string keys."""
    assert message == error_of(parse_yaml(text, "tp.yaml"))


def test_did_you_mean_names_keys_never_values(tmp_path: Path) -> None:
    """A misspelt key holding a secret gets a suggestion naming the key only, in every
    section that now has one; an empty or blank secret file is refused naming the path, not
    its neighbour's contents; a secret followed by CRLF is kept without it."""
    def prov(**kw: Any) -> dict[str, Any]:
        return {"listen": "127.0.0.1:0", "state_path": str(tmp_path / "s.json"),
                "providers": {"p": {"type": "oauth2", "token_url": "http://h/t",
                                    "client_id": "c", **kw}},
                "routes": [{"prefix": "/", "upstream": "http://h/", "provider": "p"}]}

    attempts: list[tuple[dict[str, Any], str]] = [
        (prov(client_secrt=CLIENT_SECRET), "'client_secret'"),
        (prov(client_secret="x", pasword=PASSWORD, grant_type="password", username="u"),
         "'password'"),
        ({**prov(client_secret="x"), "security": {"client_kye": CLIENT_SECRET}},
         "'client_key'"),
        ({**prov(client_secret="x"), "limits": {"send_timout": CLIENT_SECRET}},
         "'send_timeout'"),
        ({**prov(client_secret="x"), "log": {"levl": CLIENT_SECRET}}, "'level'"),
    ]
    for raw, suggestion in attempts:
        with pytest.raises(ConfigError) as caught:
            build_config(raw, {})
        text = str(caught.value)
        assert suggestion in text
        assert [] == [s for s in SECRETS if s in text], text
    for content in ("", "\n", "\r\n", "   \n"):
        secret = tmp_path / "secret"
        secret.write_text(content)
        with pytest.raises(ConfigError, match="is empty"):
            build_config(prov(client_secret_file=str(secret)), {})
    secret.write_text(CLIENT_SECRET + "\r\n")
    cfg = build_config(prov(client_secret_file=str(secret)), {})
    provider = cfg.providers["p"]
    assert CLIENT_SECRET == provider.client_secret.value  # type: ignore[attr-defined]


# ---------------------------------------------------------------- routes


@pytest.mark.parametrize("prefix", ["api", "//api", "", 5, "/a?b", "/a#b", "/a%2f", "/a/../b"])
def test_bad_route_prefix(prefix: object) -> None:
    """A prefix must be a plain path starting with exactly one /."""
    assert error_of(with_route(prefix=prefix)).startswith("routes[0].prefix: ")


def test_prefix_must_start_with_single_slash_message() -> None:
    """The message for a prefix without a leading / says what is needed."""
    assert "routes[0].prefix: must start with a single /" == error_of(with_route(prefix="api"))


@pytest.mark.parametrize(
    "upstream",
    ["ftp://api.example.com/", "/relative", "api.example.com", "https://", "https:///x",
     "http://h.example:99999/", 42, "https://h.example/a b"],
)
def test_upstream_must_be_absolute_http_url(upstream: object) -> None:
    """A non-http(s), relative or host-less upstream is named with its route index."""
    raw = with_route()
    raw["routes"].append({"prefix": "/b", "upstream": upstream, "provider": "api"})
    assert "routes[1].upstream: not an absolute http(s) URL" == error_of(raw)


@pytest.mark.parametrize("upstream", [f"https://user:{PASSWORD}@h.example/",
                                      f"https://{TOKEN}@h.example/"])
def test_upstream_with_userinfo_is_refused_without_echoing_it(upstream: str) -> None:
    """Credentials in an upstream URL are refused, and the message does not repeat them."""
    msg = error_of(with_route(upstream=upstream))
    assert msg.startswith("routes[0].upstream: ")
    assert PASSWORD not in msg
    assert TOKEN not in msg


@pytest.mark.parametrize("upstream", ["https://h.example/?a=1", "https://h.example/#frag"])
def test_upstream_with_query_or_fragment_is_refused(upstream: str) -> None:
    """An upstream has no query string or fragment (the client's query is forwarded)."""
    assert error_of(with_route(upstream=upstream)).startswith("routes[0].upstream: ")


def test_upstream_parts_are_kept() -> None:
    """The upstream's scheme, host, port and path are split for the proxy."""
    route = build_config(with_route(upstream="http://[::1]:8443/v1/"), {}).routes[0]
    assert ("http", "::1", 8443, "/v1/", "http://[::1]:8443") == (
        route.upstream.scheme, route.upstream.host, route.upstream.port, route.upstream.path,
        route.upstream.origin)


def test_unknown_provider_in_route() -> None:
    """A route naming a provider that does not exist is refused."""
    assert "routes[0].provider: no provider named 'nope'" == error_of(with_route(provider="nope"))


@pytest.mark.parametrize("key", ["prefix", "upstream", "provider"])
def test_route_required_keys(key: str) -> None:
    """prefix, upstream and provider are required in a route."""
    assert error_of(with_route(**{key: None})).startswith(f"routes[0].{key}: required")


@pytest.mark.parametrize("routes", [None, [], "x"])
def test_at_least_one_route(routes: object) -> None:
    """A config without routes is refused."""
    raw = base()
    if routes is None:
        del raw["routes"]
    else:
        raw["routes"] = routes
    assert "routes: at least one route is needed" == error_of(raw)


@pytest.mark.parametrize(("first", "second"), [("/api", "/api/"), ("/api/", "/api"),
                                               ("/", "/"), ("/x", "/x")])
def test_duplicate_prefixes_are_refused(first: str, second: str) -> None:
    """Two routes whose prefixes match the same paths are refused, naming the earlier one."""
    raw = with_route(prefix=first)
    raw["routes"].append({"prefix": second, "upstream": "https://b.example/", "provider": "api"})
    assert "routes[1].prefix: the same prefix as routes[0]" == error_of(raw)


@pytest.mark.parametrize(
    ("retry_on", "expected"),
    [([401], {401}), ([401, 403], {401, 403}), (403, {403}), ([], set())],
)
def test_retry_on_accepts_status_codes(retry_on: object, expected: set[int]) -> None:
    """retry_on is a list (or one) of 4xx/5xx status codes."""
    assert frozenset(expected) == build_config(with_route(retry_on=retry_on), {}).routes[0].retry_on


@pytest.mark.parametrize("retry_on", [[200], [600], ["401"], [True], [401, 399], "x"])
def test_retry_on_rejects_other_values(retry_on: object) -> None:
    """retry_on refuses non-codes and codes outside 400-599."""
    msg = error_of(with_route(retry_on=retry_on))
    assert "routes[0].retry_on: expected HTTP status codes from 400 to 599" == msg


@pytest.mark.parametrize("choice", ["replace", "keep"])
def test_client_authorization_choices(choice: str) -> None:
    """client_authorization is replace or keep."""
    route = build_config(with_route(client_authorization=choice), {}).routes[0]
    assert choice == route.client_authorization


@pytest.mark.parametrize("choice", ["drop", "", True, "Keep"])
def test_client_authorization_bad_choice(choice: object) -> None:
    """Anything else for client_authorization is refused listing the choices."""
    msg = error_of(with_route(client_authorization=choice))
    assert "routes[0].client_authorization: expected one of replace, keep" == msg


@pytest.mark.parametrize(("header", "value"), [("X-Api-Key", "{token}"),
                                               ("Authorization", "token {token}"),
                                               ("PRIVATE-TOKEN", "{token}")])
def test_custom_header_and_value(header: str, value: str) -> None:
    """A route may put the token in any valid header with any template holding {token}."""
    route = build_config(with_route(header=header, value=value), {}).routes[0]
    assert (header, value) == (route.header, route.value)


@pytest.mark.parametrize("value", ["Bearer", "Bearer {tok}", "Bearer {token}\r\nX-Evil: 1",
                                   " {token}", "Bearer {token}\x00"])
def test_value_must_contain_token_and_be_printable(value: str) -> None:
    """value must hold {token} and cannot split a header."""
    msg = error_of(with_route(value=value))
    assert "routes[0].value: must contain {token} and be printable ASCII" == msg


@pytest.mark.parametrize("header", ["Bad Header", "X:y", "X-Key\r\n", "Ключ", 5])
def test_header_must_be_a_field_name(header: object) -> None:
    """header must be an RFC 9110 field name."""
    assert "routes[0].header: not a valid header name" == error_of(with_route(header=header))


@pytest.mark.parametrize(("key", "value"), [("preserve_host", "yes"), ("timeout", "forever"),
                                            ("ca_file", "/nonexistent/ca.pem")])
def test_other_route_keys_are_validated(key: str, value: object) -> None:
    """preserve_host must be a boolean, timeout a duration, ca_file a readable file."""
    assert error_of(with_route(**{key: value})).startswith(f"routes[0].{key}: ")


def test_route_defaults() -> None:
    """A route without optional keys gets the documented defaults."""
    route = build_config(base(), {}).routes[0]
    assert ("/", "", "Authorization", "Bearer {token}", frozenset({401}), "replace", False,
            60.0, None) == (route.prefix, route.match, route.header, route.value, route.retry_on,
                            route.client_authorization, route.preserve_host, route.timeout,
                            route.ca_file)


# ---------------------------------------------------------------- providers


def test_static_needs_token_or_token_file() -> None:
    """A static provider needs token or token_file."""
    msg = error_of(base(providers={"api": {"type": "static"}}))
    assert "providers.api.token: give token or token_file (one of them)" == msg


@pytest.mark.parametrize("token", ["", "tok en\n", "tök", f" {TOKEN}"])
def test_static_token_must_be_printable(token: str) -> None:
    """A static token must be non-empty printable ASCII (it goes into a header)."""
    msg = error_of(base(providers={"api": {"type": "static", "token": token}}))
    assert "providers.api.token: the token must be non-empty printable ASCII" == msg


@pytest.mark.parametrize(
    ("provider", "message"),
    [
        (oauth2(token_url=None),
         "providers.corp.token_url: give token_url or issuer (one of them)"),
        (oauth2(issuer="https://auth.example.com"),
         "providers.corp.token_url: give token_url or issuer (one of them)"),
        (oauth2(token_url="auth.example.com/token"),
         "providers.corp.token_url: not an absolute http(s) URL"),
        (oauth2(grant_type="implicit"),
         "providers.corp.grant_type: expected one of client_credentials, password, refresh_token,"
         " token_exchange, jwt_bearer, device_code, authorization_code"),
        (oauth2(grant_type="password", username="u"),
         "providers.corp.password: grant_type password needs username and password"),
        (oauth2(grant_type="password", password=PASSWORD),
         "providers.corp.password: grant_type password needs username and password"),
        (oauth2(grant_type="refresh_token"),
         "providers.corp.refresh_token: grant_type refresh_token needs one"),
        (oauth2(client_secret=None),
         "providers.corp.client_secret: client_auth basic needs client_id and client_secret"),
        (oauth2(client_id=None),
         "providers.corp.client_secret: client_auth basic needs client_id and client_secret"),
        (oauth2(client_auth="post", client_secret=None),
         "providers.corp.client_secret: client_auth post needs client_id and client_secret"),
        (oauth2(client_auth="jwt"),
         "providers.corp.client_auth: expected one of basic, post, none, client_secret_jwt,"
         " private_key_jwt, client_assertion, tls_client_auth"),
        (oauth2(scope={"a": 1}),
         "providers.corp.scope: expected a string or a list of strings"),
        (oauth2(timeout=0), "providers.corp.timeout: not a positive duration"
         " (like 500ms, 30s, 5m, 1h)"),
    ],
)
def test_oauth2_requirements(provider: dict[str, Any], message: str) -> None:
    """oauth2: token_url xor issuer, grant-specific credentials, client_auth needs a secret."""
    assert message == error_of(with_provider("corp", provider))


def test_oauth2_accepted_forms() -> None:
    """issuer instead of token_url, client_auth none, password and refresh_token grants load."""
    raw = base()
    raw["providers"].update({
        "disc": oauth2(token_url=None, issuer="https://auth.example.com", scope=["a", "b"],
                       params={"audience": "https://api.example.com"}),
        "pub": oauth2(client_auth="none", client_secret=None, client_id=None),
        "pw": oauth2(grant_type="password", username="alice", password=PASSWORD),
        "rt": oauth2(grant_type="refresh_token", refresh_token=REFRESH_TOKEN,
                     client_auth="post", refresh_margin="2m"),
    })
    cfg = build_config(raw, HOME)
    disc, pub, pw, rt = (cfg.providers[n] for n in ("disc", "pub", "pw", "rt"))
    assert isinstance(disc, OAuth2Provider)
    assert isinstance(pub, OAuth2Provider)
    assert isinstance(pw, OAuth2Provider)
    assert isinstance(rt, OAuth2Provider)
    assert disc.issuer is not None
    assert ("https://auth.example.com", None, "a b", (("audience", "https://api.example.com"),)
            ) == (disc.issuer.url, disc.token_url, disc.scope, disc.params)
    assert ("none", None) == (pub.client_auth, pub.client_secret)
    assert ("password", "alice") == (pw.grant_type, pw.username)
    assert ("refresh_token", "post", 120.0) == (rt.grant_type, rt.client_auth, rt.refresh_margin)


def test_oauth2_defaults() -> None:
    """An oauth2 provider defaults to client_credentials, basic auth, 60s margin, 10s timeout."""
    corp = build_config(with_provider("corp", oauth2()), HOME).providers["corp"]
    assert isinstance(corp, OAuth2Provider)
    assert ("client_credentials", "basic", 60.0, 10.0, None) == (
        corp.grant_type, corp.client_auth, corp.refresh_margin, corp.timeout, corp.scope)


@pytest.mark.parametrize(
    ("provider", "message"),
    [
        ({k: v for k, v in JSON.items() if k != "login"}, "providers.legacy.login: required"),
        (json_provider(login={"url": None}), "providers.legacy.login.url: required"),
        (json_provider(login={"url": "not a url"}),
         "providers.legacy.login.url: not an absolute http(s) URL"),
        (json_provider(login={"method": "DELETE"}),
         "providers.legacy.login.method: expected one of GET, POST, PUT, PATCH"),
        (json_provider(login={"access_token": "accessToken"}),
         "providers.legacy.login.access_token: not a JSON Pointer (like /access_token)"),
        (json_provider(refresh={"url": "https://api.example.com/r", "json": {"rt": "x"}}),
         "providers.legacy.refresh: the body or a header must contain {refresh_token}"),
        (json_provider(login={"refresh_token": None}),
         "providers.legacy.login.refresh_token: refresh needs a refresh token"),
    ],
)
def test_json_requirements(provider: dict[str, Any], message: str) -> None:
    """json: login.url is required; refresh must carry the {refresh_token} placeholder."""
    assert message == error_of(with_provider("legacy", provider))


def test_json_accepted_forms() -> None:
    """A json provider loads with or without refresh; the placeholder may be in a header."""
    raw = base()
    raw["providers"]["a"] = json_provider(refresh=None)
    raw["providers"]["b"] = json_provider(refresh={
        "url": "https://api.example.com/refresh", "method": "get",
        "headers": {"X-Refresh": "{refresh_token}"}})
    cfg = build_config(raw, HOME)
    a, b = cfg.providers["a"], cfg.providers["b"]
    assert isinstance(a, JsonProvider)
    assert isinstance(b, JsonProvider)
    assert None is a.refresh
    assert b.refresh is not None
    assert ("GET", (("X-Refresh", "{refresh_token}"),), "/accessToken") == (
        b.refresh.method, b.refresh.headers, b.refresh.access_token)


@pytest.mark.parametrize("command", [None, [], "gcloud auth print-access-token", [True],
                                     [["nested"]], {"a": 1}])
def test_command_needs_non_empty_list(command: object) -> None:
    """A command provider needs a non-empty argument list."""
    provider: dict[str, Any] = {"type": "command"}
    if command is not None:
        provider["command"] = command
    msg = error_of(with_provider("cli", provider))
    assert "providers.cli.command: expected a list of arguments, like [gcloud, auth]" == msg


def test_command_provider_loads() -> None:
    """A command provider keeps its argv and output settings; defaults fill the rest."""
    raw = with_provider("cli", {"type": "command", "command": ["gcloud", "auth", 2],
                                "output": "json", "cache_for": "1m"})
    cli = build_config(raw, HOME).providers["cli"]
    assert isinstance(cli, CommandProvider)
    assert (("gcloud", "auth", "2"), "json", 60.0, 30.0, "/access_token") == (
        cli.command, cli.output, cli.cache_for, cli.timeout, cli.access_token)


def test_command_output_choices() -> None:
    """output is text or json."""
    raw = with_provider("cli", {"type": "command", "command": ["x"], "output": "yaml"})
    assert "providers.cli.output: expected one of text, json" == error_of(raw)


@pytest.mark.parametrize("kind", ["vault", None, "", 1])
def test_unknown_provider_type(kind: object) -> None:
    """An unknown or missing type is refused listing the types."""
    provider: dict[str, Any] = {"token": TOKEN}
    if kind is not None:
        provider["type"] = kind
    msg = error_of(base(providers={"api": provider}))
    assert "providers.api.type: expected one of static, oauth2, json, command" == msg


@pytest.mark.parametrize("providers", [None, {}])
def test_at_least_one_provider(providers: object) -> None:
    """A config without providers is refused."""
    raw = base()
    raw["providers"] = providers
    assert "providers: at least one provider is needed" == error_of(raw)


@pytest.mark.parametrize("name", ["my api", "-x", "a/b", "x" * 65])
def test_provider_names_are_restricted(name: str) -> None:
    """Provider names are short identifiers (they label metrics and logs)."""
    raw = base(providers={name: {"type": "static", "token": TOKEN}})
    raw["routes"][0]["provider"] = name
    assert error_of(raw).startswith(f"providers.{name}: provider names use")


# ---------------------------------------------------------------- listeners


@pytest.mark.parametrize(
    ("text", "listener"),
    [
        ("127.0.0.1:8080", Listener(kind="tcp", host="127.0.0.1", port=8080)),
        ("[::1]:8080", Listener(kind="tcp", host="::1", port=8080)),
        ("localhost:0", Listener(kind="tcp", host="localhost", port=0)),
        ("unix:/run/x.sock", Listener(kind="unix", path="/run/x.sock")),
        (" 127.0.0.1:65535 ", Listener(kind="tcp", host="127.0.0.1", port=65535)),
    ],
)
def test_parse_listener(text: str, listener: Listener) -> None:
    """host:port, [v6]:port and unix:/abs/path are listen addresses; str() round-trips."""
    parsed = parse_listener(text, "listen")
    assert listener == parsed
    assert text.strip() == str(parsed)


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("8080", "not a listen address"),
        (8080, "not a listen address"),
        (":8080", "name the host to bind"),
        ("host:99999", "port 99999 is out of range"),
        ("unix:relative", "a unix socket needs an absolute path"),
        ("unix:", "a unix socket needs an absolute path"),
        ("[::1]", "not a listen address"),
        ("::1:8080", "not a listen address"),
        ("[zz::1]:80", "not a listen address"),
        ("[1.2.3.4]:80", "'1.2.3.4' is not an IPv6 address"),
        ("http://127.0.0.1:8080", "not a listen address"),
        ("", "not a listen address"),
        (None, "not a listen address"),
    ],
)
def test_parse_listener_rejects(raw: object, reason: str) -> None:
    """Bad listen addresses are refused with the key path and the reason."""
    with pytest.raises(ConfigError) as info:
        parse_listener(raw, "listen")
    assert str(info.value).startswith(f"listen: {reason}")


def test_listen_list() -> None:
    """listen may be a list; every address is kept in order."""
    cfg = build_config(base(listen=["127.0.0.1:8080", "[::1]:8080", "unix:/run/tp.sock"]), {})
    assert ["127.0.0.1:8080", "[::1]:8080", "unix:/run/tp.sock"] == [str(li) for li in cfg.listen]


@pytest.mark.parametrize(
    ("listen", "message"),
    [
        (["127.0.0.1:8080", "host:99999"], "listen[1]: port 99999 is out of range"),
        ([], "listen: needs at least one address"),
        (["127.0.0.1:1", "127.0.0.1:1"], "listen: the same address is listed twice"),
    ],
)
def test_listen_list_errors(listen: list[str], message: str) -> None:
    """Errors in a listen list name the item; empty lists and repeats are refused."""
    assert message == error_of(base(listen=listen))


def test_admin_listen_null_disables_and_bad_is_refused() -> None:
    """admin_listen: null disables the admin listener; a bad one names admin_listen."""
    assert None is build_config(base(admin_listen=None), {}).admin_listen
    assert error_of(base(admin_listen="9100")).startswith("admin_listen: ")


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "192.0.2.1:80", "[::]:8080",
                                    "myhost.example:80", ["127.0.0.1:1", "0.0.0.0:2"]])
def test_exposed_listener_refused_without_key_or_hosts(listen: object) -> None:
    """A non-loopback listener needs security.client_key or explicit allowed_hosts."""
    msg = error_of(base(listen=listen))
    assert msg.startswith("listen: ")
    assert "security.client_key" in msg
    assert "security.allowed_hosts" in msg


@pytest.mark.parametrize("listen", ["0.0.0.0:8080", "192.0.2.1:80"])
@pytest.mark.parametrize(
    "security",
    [{"client_key": CLIENT_KEY}, {"allowed_hosts": ["proxy.internal"]}, {"allowed_hosts": "*"}],
)
def test_exposed_listener_accepted_with_key_or_hosts(listen: str,
                                                     security: dict[str, Any]) -> None:
    """client_key or an explicit allowed_hosts makes a non-loopback listener acceptable."""
    cfg = build_config(base(listen=listen, security=security), {})
    assert listen == str(cfg.listen[0])


@pytest.mark.parametrize("listen", ["localhost:8080", "127.0.0.2:80", "[::1]:80",
                                    "unix:/run/x.sock"])
def test_loopback_listeners_need_nothing(listen: str) -> None:
    """localhost, 127.0.0.0/8, ::1 and unix sockets count as loopback."""
    assert build_config(base(listen=listen), {}).listen[0].is_loopback


# ---------------------------------------------------------------- security and log


def test_security_settings() -> None:
    """allowed_hosts are lower-cased without brackets; "*" turns the check off."""
    cfg = build_config(base(security={
        "allowed_hosts": ["Proxy.Internal", "[::1]"], "reject_cross_site": False,
        "reject_forwarded": False, "require_header": "Tokenproxy-Request: 1",
    }), {})
    assert SecurityConfig(allowed_hosts=frozenset({"proxy.internal", "::1"}),
                          allowed_hosts_explicit=True, reject_cross_site=False,
                          reject_forwarded=False,
                          require_header=("Tokenproxy-Request", "1")) == cfg.security
    assert None is build_config(base(security={"allowed_hosts": ["*"]}), {}).security.allowed_hosts


@pytest.mark.parametrize(
    ("security", "key"),
    [
        ({"client_key": "short"}, "security.client_key"),
        ({"client_key": CLIENT_KEY + "\n"}, "security.client_key"),
        ({"allowed_hosts": []}, "security.allowed_hosts"),
        ({"allowed_hosts": [""]}, "security.allowed_hosts"),
        ({"require_header": "no-colon"}, "security.require_header"),
        ({"require_header": "Bad Name: 1"}, "security.require_header"),
        ({"reject_forwarded": "no"}, "security.reject_forwarded"),
    ],
)
def test_bad_security_settings(security: dict[str, Any], key: str) -> None:
    """Bad security settings name their key and never echo the client key."""
    msg = error_of(base(security=security))
    assert msg.startswith(f"{key}: ")
    assert CLIENT_KEY not in msg


@pytest.mark.parametrize(("log", "key"), [({"level": "trace"}, "log.level"),
                                          ({"format": "xml"}, "log.format")])
def test_bad_log_settings(log: dict[str, Any], key: str) -> None:
    """log.level and log.format are choices."""
    assert error_of(base(log=log)).startswith(f"{key}: expected one of ")


# ---------------------------------------------------------------- defaults and files


def test_six_line_config_yields_spec_defaults(tmp_path: Path) -> None:
    """The README's six-line file loads, and every other key gets its documented default."""
    path = tmp_path / "tokenproxy.yaml"
    path.write_text(SIX_LINES, encoding="utf-8")
    cfg = load_config(path, {"API_TOKEN": TOKEN, "STATE_DIRECTORY": "/var/lib/tp"})
    assert (Listener(kind="tcp", host="127.0.0.1", port=8080),) == cfg.listen
    assert Listener(kind="tcp", host="127.0.0.1", port=9100) == cfg.admin_listen
    assert LogConfig(level="info", format="json") == cfg.log
    assert 10.0 == cfg.shutdown_grace
    assert LimitsConfig(max_replay_body=1024 * 1024, max_header_size=16 * 1024,
                        header_timeout=10.0, keepalive_timeout=75.0,
                        max_connections=1024) == cfg.limits
    assert SecurityConfig(allowed_hosts=frozenset({"localhost", "127.0.0.1", "::1"}),
                          allowed_hosts_explicit=False, reject_cross_site=True,
                          reject_forwarded=True, require_header=None,
                          client_key=None) == cfg.security
    assert Path("/var/lib/tp/state.json") == cfg.state_path
    assert path == cfg.source
    assert None is cfg.socket_group
    api = cfg.providers["api"]
    assert isinstance(api, StaticProvider)
    assert api.token is not None
    assert (TOKEN, 60.0) == (api.token.value, api.refresh_margin)
    assert 1 == len(cfg.routes)


def test_six_line_config_without_env_names_the_variable(tmp_path: Path) -> None:
    """The six-line file without API_TOKEN fails naming the key and variable."""
    path = tmp_path / "tokenproxy.yaml"
    path.write_text(SIX_LINES, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert "providers.api.token: environment variable API_TOKEN is not set" == str(info.value)


@pytest.mark.parametrize(
    ("env", "state_path"),
    [
        ({"STATE_DIRECTORY": "/var/lib/tokenproxy"}, "/var/lib/tokenproxy/state.json"),
        ({"STATE_DIRECTORY": "/var/lib/a:/var/lib/b"}, "/var/lib/a/state.json"),
        ({"STATE_DIRECTORY": "/var/lib/a", "XDG_STATE_HOME": "/x"}, "/var/lib/a/state.json"),
        ({"XDG_STATE_HOME": "/home/u/.state"}, "/home/u/.state/tokenproxy/state.json"),
        ({"HOME": "/home/u"}, "/home/u/.local/state/tokenproxy/state.json"),
        ({"STATE_DIRECTORY": "", "XDG_STATE_HOME": "/x"}, "/x/tokenproxy/state.json"),
        ({"STATE_DIRECTORY": "rel", "XDG_STATE_HOME": "/x"}, "/x/tokenproxy/state.json"),
        ({"XDG_STATE_HOME": "rel", "HOME": "/home/u"},
         "/home/u/.local/state/tokenproxy/state.json"),
        ({}, None),
        ({"HOME": ""}, None),
        ({"HOME": "rel", "XDG_STATE_HOME": "rel"}, None),
    ],
)
def test_state_path_default(env: dict[str, str], state_path: str | None) -> None:
    """state_path defaults to $STATE_DIRECTORY/state.json, else the XDG state directory; a
    relative one is ignored. With none, a config of static providers has no state file."""
    expected = None if state_path is None else Path(state_path)
    assert expected == build_config(base(), env).state_path


def test_state_path_explicit() -> None:
    """An explicit state_path wins over the environment."""
    cfg = build_config(base(state_path="/srv/tp/state.json"), {"STATE_DIRECTORY": "/var/lib/x"})
    assert Path("/srv/tp/state.json") == cfg.state_path


def test_config_example_loads_with_empty_environment() -> None:
    """config.example.yaml at the repo root loads with nothing set but $HOME (it has defaults;
    the state file goes under $HOME)."""
    cfg = load_config(REPO / "config.example.yaml", HOME)
    assert {"fixed": StaticProvider, "corp": OAuth2Provider, "user": OAuth2Provider,
            "session": OAuth2Provider, "legacy": JsonProvider,
            "cli": CommandProvider} == {n: type(p) for n, p in cfg.providers.items()}
    assert ["/", "/corp"] == [r.prefix for r in cfg.routes]
    assert Config().listen == cfg.listen
    assert Config().admin_listen == cfg.admin_listen


def _example_sections() -> dict[str, set[str]]:
    """The keys config.example.yaml names in each section: those it sets, and those its
    comments inside that section mention ("or token_file: ..."), by the loader's sections."""
    text = (REPO / "config.example.yaml").read_text()
    lines = text.splitlines()
    named: dict[str, set[str]] = {}

    def mentioned(node: yaml.Node) -> set[str]:
        span = lines[node.start_mark.line:node.end_mark.line + 1]
        return {m[1] for line in span if "#" in line
                for m in re.finditer(r"([a-z_]+):", line.split("#", 1)[1])}

    def note(section: str, node: yaml.Node) -> None:
        assert isinstance(node, yaml.MappingNode)
        keys = {k.value for k, _ in node.value}
        named.setdefault(section, set()).update(keys | mentioned(node))

    root = yaml.compose(text)
    note("", root)
    for key, value in root.value:
        if key.value in ("log", "security", "limits"):
            note(key.value, value)
        elif isinstance(value, yaml.ScalarNode) and value.value in ("", "null", "~"):
            # A section off in the example: its keys (and its parts') are in the comment
            # block under it.
            block = list(itertools.takewhile(lambda line: line.lstrip().startswith("#"),
                                             lines[key.start_mark.line + 1:]))
            keys = {m[1] for line in block for m in re.finditer(r"([a-z_]+):", line)}
            for section in accepted_keys():
                if section.split(".")[0] == key.value:
                    named[section] = keys
        elif key.value == "routes":
            for item in value.value:
                note("routes[]", item)
        elif key.value == "providers":
            for _, provider in value.value:
                kind = next(v.value for k, v in provider.value if k.value == "type")
                note(f"providers.{kind}", provider)
                note("providers.*", provider)
                for k, v in provider.value:
                    if kind == "json" and k.value in ("login", "refresh"):
                        note("providers.json.<call>", v)
    return named


def test_config_example_names_every_key_the_loader_accepts() -> None:
    """config.example.yaml says it lists every key: each one the loader accepts appears in
    its section, set or mentioned in a comment there."""
    named = _example_sections()
    missing = [f"{section}.{key}".lstrip(".") for section, keys in accepted_keys().items()
               for key in keys if key not in named.get(section, set())]
    assert [] == missing


def test_config_example_takes_env_values() -> None:
    """config.example.yaml's ${...:-default} references pick up the environment when set."""
    cfg = load_config(REPO / "config.example.yaml",
                      {"API_TOKEN": TOKEN, "CLIENT_SECRET": CLIENT_SECRET, **HOME})
    fixed, corp = cfg.providers["fixed"], cfg.providers["corp"]
    assert isinstance(fixed, StaticProvider)
    assert isinstance(corp, OAuth2Provider)
    assert fixed.token is not None
    assert corp.client_secret is not None
    assert (TOKEN, CLIENT_SECRET) == (fixed.token.value, corp.client_secret.value)


@pytest.mark.parametrize(("content", "reason"), [(None, "No such file or directory"),
                                                 (b"\xff\xfe\x00", "not UTF-8 text")])
def test_load_config_unreadable_file(tmp_path: Path, content: bytes | None, reason: str) -> None:
    """An unreadable or non-UTF-8 config file is one ConfigError naming the path."""
    path = tmp_path / "tp.yaml"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert f"config: cannot read {path}: {reason}" == str(info.value)


def test_load_config_yaml_error_names_the_file(tmp_path: Path) -> None:
    """A YAML error from load_config names the file and the line."""
    path = tmp_path / "tp.yaml"
    path.write_text(f"providers:\n  api: {{token: {TOKEN}\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    assert str(info.value).startswith(f"{path}: line 3: invalid YAML")
    assert TOKEN not in str(info.value)


# ---------------------------------------------------------------- discovery


@pytest.fixture(name="places")
def _places(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """A working directory and an XDG config dir, each holding a config, plus two other files."""
    cwd = tmp_path / "cwd"
    xdg = tmp_path / "xdg"
    (xdg / "tokenproxy").mkdir(parents=True)
    cwd.mkdir()
    places = {
        "explicit": tmp_path / "explicit.yaml",
        "env": tmp_path / "env.yaml",
        "cwd": cwd / "tokenproxy.yaml",
        "xdg": xdg / "tokenproxy" / "config.yaml",
    }
    for path in places.values():
        path.write_text(SIX_LINES, encoding="utf-8")
    monkeypatch.chdir(cwd)
    return places


def test_discovery_order(places: dict[str, Path]) -> None:
    """-c wins, then $TOKENPROXY_CONFIG, then ./tokenproxy.yaml, then $XDG_CONFIG_HOME."""
    env = {"TOKENPROXY_CONFIG": str(places["env"]),
           "XDG_CONFIG_HOME": str(places["xdg"].parent.parent)}
    assert places["explicit"] == find_config_file(str(places["explicit"]), env)
    assert places["env"] == find_config_file(None, env)
    del env["TOKENPROXY_CONFIG"]
    assert places["cwd"] == find_config_file(None, env).resolve()
    places["cwd"].unlink()
    assert places["xdg"] == find_config_file(None, env)


def test_discovery_xdg_falls_back_to_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without $XDG_CONFIG_HOME, $HOME/.config/tokenproxy/config.yaml is used."""
    monkeypatch.chdir(tmp_path)
    path = tmp_path / ".config" / "tokenproxy" / "config.yaml"
    path.parent.mkdir(parents=True)
    path.write_text(SIX_LINES, encoding="utf-8")
    assert path == find_config_file(None, {"HOME": str(tmp_path)})


def test_explicit_and_env_paths_are_not_second_guessed(tmp_path: Path) -> None:
    """A missing -c or $TOKENPROXY_CONFIG file is an error, not a fallback to other places."""
    missing = tmp_path / "missing.yaml"
    assert missing == find_config_file(str(missing), {})
    assert missing == find_config_file(None, {"TOKENPROXY_CONFIG": str(missing)})
    with pytest.raises(ConfigError) as info:
        load_config(find_config_file(None, {"TOKENPROXY_CONFIG": str(missing)}), {})
    assert str(info.value).startswith(f"config: cannot read {missing}")


@pytest.mark.skipif(Path("/etc/tokenproxy/config.yaml").exists(),
                    reason="a system config exists on this machine")
def test_nothing_found_lists_what_was_tried(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """With no file anywhere, the error lists every place that was tried."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as info:
        find_config_file(None, {"XDG_CONFIG_HOME": str(tmp_path / "xdg")})
    assert ("config: no file found (tried -c, $TOKENPROXY_CONFIG, tokenproxy.yaml, "
            f"{tmp_path}/xdg/tokenproxy/config.yaml, /etc/tokenproxy/config.yaml)"
            ) == str(info.value)


class TestScalarsFromTheEnvironment:
    """Values arrive as strings from ${VAR}; YAML's own typing must not bend secrets."""

    def test_unquoted_numeric_secret_is_refused(self) -> None:
        """`token: 0123` (YAML reads 83) is refused with a hint to quote it."""
        raw = parse_yaml("providers:\n  api: {type: static, token: 0123}\n"
                         "routes: [{prefix: /, upstream: 'https://h/', provider: api}]\n", "t")
        with pytest.raises(ConfigError, match=r"providers\.api\.token: quote the value"):
            build_config(raw, {})

    def test_whole_numbers_and_booleans_from_env(self) -> None:
        """max_connections and preserve_host accept the strings ${VAR} expands to."""
        raw = {
            "limits": {"max_connections": "${N:-512}"},
            "providers": {"api": {"type": "static", "token": "abcdefgh"}},
            "routes": [{"prefix": "/", "upstream": "https://h/", "provider": "api",
                        "preserve_host": "${P:-true}"}],
        }
        cfg = build_config(raw, {})
        assert 512 == cfg.limits.max_connections
        assert cfg.routes[0].preserve_host is True

    def test_json_login_secrets_reach_the_redactor(self) -> None:
        """Passwords inside a json provider's login body are registered as secrets."""
        raw = {
            "providers": {"legacy": {"type": "json", "login": {
                "url": "https://h/login", "json": {"username": "me", "password": PASSWORD},
                "headers": {"X-Api-Key": CLIENT_SECRET}}}},
            "routes": [{"prefix": "/", "upstream": "https://h/", "provider": "legacy"}],
        }
        secrets = config_secrets(build_config(raw, HOME))
        assert PASSWORD in secrets
        assert CLIENT_SECRET in secrets
        assert "me" not in secrets


# ---------------------------------------------------------------- values a call would send


@pytest.mark.parametrize(("provider", "message"), [
    (json_provider(login={"headers": {"X-Key": "abc\nX-Injected: 1"}}),
     "providers.api.login.headers.X-Key: not a valid header value"),
    (json_provider(login={"headers": {"X Key": "abc"}}),
     "providers.api.login.headers.X Key: not a valid header name"),
    (json_provider(login={"headers": {"X-Key": None}}),
     "providers.api.login.headers.X-Key: expected a string"),
    (oauth2(params={"audience": None}), "providers.api.params.audience: expected a string"),
    (json_provider(login={"json": {"since": datetime.date(2024, 1, 1)}}),
     "providers.api.login.json.since: not a JSON value"),
    (json_provider(login={"json": {1: "one"}}),
     "providers.api.login.json: JSON object keys must be strings"),
    (json_provider(login={"json": [float("nan")]}),
     "providers.api.login.json[0]: not a finite number"),
    ({"type": ["oauth2"]}, "providers.api.type: expected one of"),
    (oauth2(token_url="https://auth.example.com/\x1b[2Jtoken"),
     "providers.api.token_url: not an absolute http(s) URL"),
], ids=["header-line-break", "header-name", "header-null", "param-null", "json-date",
        "json-key", "json-nan", "type-list", "url-control-character"])
def test_what_a_token_call_would_send_is_checked_when_loading(
    provider: dict[str, Any], message: str
) -> None:
    """A value a call could not send -- one that would split a header, a YAML date in a JSON
    body, a control character in a URL -- is one config error naming the key, not a failure
    of every call (nor a traceback) later."""
    assert error_of(with_provider("api", provider)).startswith(message)


@pytest.mark.parametrize("value", ["ghp_0123456789abcdefghij0123456789abcd",
                                   "v1.MjAyNi0xMi0wNyBhIHJlZnJlc2ggdG9rZW4",
                                   "relative/secret.txt"])
def test_a_file_key_holding_a_secret_does_not_repeat_it(value: str) -> None:
    """client_secret_file given the secret itself: the message said 'cannot read <the
    secret>'. A file that is not there is named only by an absolute path."""
    message = error_of(with_provider("corp", oauth2(client_secret=None,
                                                    client_secret_file=value)))
    assert message.startswith("providers.corp.client_secret_file: cannot read the file named "
                              "there"), message
    assert value not in message


def _login(**keys: Any) -> dict[str, Any]:
    return {k: v for k, v in {"type": "oauth2", "issuer": "https://login.example.com",
                              "client_id": "tokenproxy-cli", "grant_type": "device_code",
                              "client_secret": None, **keys}.items() if v is not None}


@pytest.mark.parametrize(("provider", "message"), [
    (_login(client_id=None),
     "providers.corp.client_id: grant_type device_code needs the client_id registered for "
     "tokenproxy"),
    (_login(issuer=None, token_url="https://login.example.com/token"),
     "providers.corp.device_authorization_url: grant_type device_code needs issuer "
     "(discovery) or device_authorization_url"),
    (_login(grant_type="authorization_code", issuer=None,
            token_url="https://login.example.com/token"),
     "providers.corp.authorization_url: grant_type authorization_code needs issuer "
     "(discovery) or authorization_url"),
    (_login(redirect_port=8400),
     "providers.corp.redirect_port: used only with grant_type authorization_code"),
    (_login(grant_type="authorization_code", device_authorization_url="https://x/device"),
     "providers.corp.device_authorization_url: used only with grant_type device_code"),
    (_login(grant_type="authorization_code", redirect_port=70000),
     "providers.corp.redirect_port: expected a port from 0 (any free one) to 65535"),
    (_login(grant_type="authorization_code", redirect_path="callback"),
     "providers.corp.redirect_path: expected a plain path starting with /"),
    (_login(grant_type="authorization_code", redirect_path="/cb?x=1"),
     "providers.corp.redirect_path: expected a plain path starting with /"),
    (_login(refresh_token="rt-0123456789"),
     "providers.corp.refresh_token: grant_type device_code gets its refresh token from "
     "`tokenproxy login`, not from the config"),
])
def test_login_grant_requirements(provider: dict[str, Any], message: str) -> None:
    assert message == error_of(with_provider("corp", provider))


def test_login_grants_load_with_their_defaults() -> None:
    raw = base()
    raw["providers"].update(
        me=_login(grant_type="urn:ietf:params:oauth:grant-type:device_code"),
        web=_login(grant_type="authorization_code", redirect_port=8400,
                   authorization_url="https://login.example.com/authorize?tenant=x"))
    cfg = build_config(raw, HOME)
    me, web = cfg.providers["me"], cfg.providers["web"]
    assert isinstance(me, OAuth2Provider)
    assert isinstance(web, OAuth2Provider)
    assert ("device_code", "none", True) == (me.grant_type, me.client_auth, me.interactive)
    assert (8400, "/callback") == (web.redirect_port, web.redirect_path)
    assert web.authorization_url is not None
    assert web.authorization_url.url.endswith("?tenant=x")
