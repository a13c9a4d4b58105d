"""The ``providers`` section: each named provider, read as the model class its ``type`` names."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Final

from tokenproxy.config.model import (
    CommandProvider,
    JsonCall,
    JsonProvider,
    OAuth2Provider,
    Provider,
    ProviderBase,
    StaticProvider,
    yaml_keys,
)
from tokenproxy.config.named_files import ca_file, read_secret_file, readable_file
from tokenproxy.config.section import Section
from tokenproxy.config.values import (
    Secret,
    is_header_value,
    parse_duration,
    parse_header_name,
    parse_http_url,
    parse_json_pointer,
    parse_positive_duration,
)
from tokenproxy.errors import ConfigError

_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Keys every type takes: ``type`` picks the class, whose base holds the rest.
_COMMON_KEYS: Final = ("type", *yaml_keys(ProviderBase))


def read_providers(raw: object) -> dict[str, Provider]:
    top = Section(raw, "providers")
    out: dict[str, Provider] = {}
    for name in list(top.raw):
        where = top.path(name)
        if not _NAME_RE.fullmatch(name):
            raise ConfigError(f"{where}: provider names use letters, digits, '_', '.', '-'")
        m = Section(top.raw[name], where)
        kind = m.value("type")
        if not isinstance(kind, str) or kind not in _TYPES:
            raise ConfigError(f"{m.path('type')}: expected one of {', '.join(_TYPES)}")
        schema, read = _TYPES[kind]
        m.read_as(schema, "type")
        out[name] = read(name, m)
    return out


def provider_keys() -> dict[str, tuple[str, ...]]:
    """The keys of a provider, by section: "providers.*" for every type's, "providers.<type>"
    for one type's own, "providers.json.<call>" for login and refresh."""
    keys = {"providers.*": _COMMON_KEYS}
    for kind, (schema, _) in _TYPES.items():
        keys[f"providers.{kind}"] = tuple(k for k in yaml_keys(schema) if k not in _COMMON_KEYS)
    keys["providers.json.<call>"] = yaml_keys(JsonCall)
    return keys


def _static(name: str, m: Section) -> StaticProvider:
    inline, from_file = m.has("token"), m.has("token_file")
    if inline == from_file:
        raise ConfigError(f"{m.path('token')}: give token or token_file (one of them)")
    token: Secret | None = None
    token_file: Path | None = None
    if inline:
        token = m.secret("token")
        assert token is not None
    else:
        token_file = readable_file(m.value("token_file"), m.path("token_file"))
        token = Secret(read_secret_file(token_file, m.path("token_file")))
    if not token.value or not is_header_value(token.value):
        where = m.path("token" if inline else "token_file")
        raise ConfigError(f"{where}: the token must be non-empty printable ASCII")
    return StaticProvider(name=name, refresh_margin=m.parse("refresh_margin", parse_duration),
                          token=token, token_file=token_file)


def _oauth2(name: str, m: Section) -> OAuth2Provider:
    token_url = m.optional("token_url", parse_http_url)
    issuer = m.optional("issuer", parse_http_url)
    if (token_url is None) == (issuer is None):
        raise ConfigError(f"{m.path('token_url')}: give token_url or issuer (one of them)")
    grant = m.choice("grant_type")
    auth = m.choice("client_auth")
    client_id = m.string("client_id")
    secret = m.secret("client_secret")
    if auth != "none" and (client_id is None or secret is None):
        raise ConfigError(
            f"{m.path('client_secret')}: client_auth {auth} needs client_id and client_secret"
        )
    username = m.string("username")
    password = m.secret("password")
    if grant == "password" and (username is None or password is None):
        raise ConfigError(f"{m.path('password')}: grant_type password needs username and password")
    refresh = m.secret("refresh_token")
    if grant == "refresh_token" and refresh is None:
        raise ConfigError(f"{m.path('refresh_token')}: grant_type refresh_token needs one")
    scope = m.value("scope")
    if isinstance(scope, list):
        if not all(isinstance(s, str) for s in scope):
            raise ConfigError(f"{m.path('scope')}: expected a string or a list of strings")
        scope = " ".join(scope)
    elif scope is not None and not isinstance(scope, str):
        raise ConfigError(f"{m.path('scope')}: expected a string or a list of strings")
    return OAuth2Provider(
        name=name,
        refresh_margin=m.parse("refresh_margin", parse_duration),
        token_url=token_url,
        issuer=issuer,
        grant_type=grant,
        client_id=client_id,
        client_secret=secret,
        client_auth=auth,
        scope=scope,
        params=m.parse("params", _str_pairs),
        username=username,
        password=password,
        refresh_token=refresh,
        timeout=m.parse("timeout", parse_positive_duration),
        ca_file=m.optional("ca_file", ca_file),
    )


def _json(name: str, m: Section) -> JsonProvider:
    if not m.has("login"):
        raise ConfigError(f"{m.path('login')}: required")
    login = _json_call(m.value("login"), m.path("login"))
    refresh = None
    if m.has("refresh"):
        refresh = _json_call(m.value("refresh"), m.path("refresh"), login=login)
        if "{refresh_token}" not in repr(refresh.json) and "{refresh_token}" not in repr(
            refresh.headers
        ):
            raise ConfigError(
                f"{m.path('refresh')}: the body or a header must contain {{refresh_token}}"
            )
        if login.refresh_token is None:
            raise ConfigError(f"{m.path('login.refresh_token')}: refresh needs a refresh token")
    return JsonProvider(
        name=name,
        refresh_margin=m.parse("refresh_margin", parse_duration),
        login=login,
        refresh=refresh,
        timeout=m.parse("timeout", parse_positive_duration),
        ca_file=m.optional("ca_file", ca_file),
    )


_METHODS: Final = ("GET", "POST", "PUT", "PATCH")


def _json_call(raw: object, where: str, *, login: JsonCall | None = None) -> JsonCall:
    """A login call, or (given the *login* call) a refresh one."""
    m = Section(raw, where, JsonCall)
    if not m.has("url"):
        raise ConfigError(f"{m.path('url')}: required")
    method = m.parse("method", _method)
    return JsonCall(
        url=parse_http_url(m.value("url"), m.path("url"), allow_query=True),
        method=method,
        json=m.parse("json", _json_value),
        headers=m.parse("headers", _header_pairs),
        # A refresh call's token is where the login's is, unless it says otherwise.
        access_token=(login.access_token if login is not None and not m.has("access_token")
                      else m.parse("access_token", parse_json_pointer)),
        refresh_token=m.optional("refresh_token", parse_json_pointer),
        expires_in=m.optional("expires_in", parse_json_pointer),
    )


def _method(raw: object, where: str) -> str:
    method = str(raw).upper()
    if method not in _METHODS:
        raise ConfigError(f"{where}: expected one of {', '.join(_METHODS)}")
    return method


def _command(name: str, m: Section) -> CommandProvider:
    argv = m.value("command")
    if (
        not isinstance(argv, list)
        or not argv
        or not all(isinstance(a, str | int | float) and not isinstance(a, bool) for a in argv)
    ):
        raise ConfigError(f"{m.path('command')}: expected a list of arguments, like [gcloud, auth]")
    return CommandProvider(
        name=name,
        refresh_margin=m.parse("refresh_margin", parse_duration),
        command=tuple(str(a) for a in argv),
        output=m.choice("output"),
        access_token=m.parse("access_token", parse_json_pointer),
        expires_in=m.parse("expires_in", parse_json_pointer),
        cache_for=m.parse("cache_for", parse_positive_duration),
        timeout=m.parse("timeout", parse_positive_duration),
    )


def _str_pairs(raw: object, where: str) -> tuple[tuple[str, str], ...]:
    m = Section(raw, where)
    out = []
    for key in list(m.raw):
        value = m.string(key)
        if value is None:
            raise ConfigError(f"{m.path(key)}: expected a string")
        out.append((key, value))
    return tuple(out)


def _json_value(raw: object, where: str) -> object:
    """A body to send as JSON: YAML also has dates, sets and non-string keys, which JSON
    has not (a date would fail every call, not the config)."""
    if isinstance(raw, dict):
        for key, value in raw.items():
            if not isinstance(key, str):
                raise ConfigError(f"{where}: JSON object keys must be strings")
            _json_value(value, f"{where}.{key}")
    elif isinstance(raw, list):
        for i, value in enumerate(raw):
            _json_value(value, f"{where}[{i}]")
    elif isinstance(raw, float) and not math.isfinite(raw):
        raise ConfigError(f"{where}: not a finite number (JSON has no NaN or infinity)")
    elif raw is not None and not isinstance(raw, str | int | float | bool):
        raise ConfigError(f"{where}: not a JSON value (quote a date or time to send it as "
                          "a string)")
    return raw


def _header_pairs(raw: object, where: str) -> tuple[tuple[str, str], ...]:
    """Header fields to send: valid names, and values that cannot split a header."""
    pairs = _str_pairs(raw, where)
    for name, value in pairs:
        parse_header_name(name, f"{where}.{name}")
        if not is_header_value(value):
            raise ConfigError(f"{where}.{name}: not a valid header value (visible ASCII and "
                              "inner spaces only)")
    return pairs


_Reader = Callable[[str, Section], Provider]
# By ``type``, in the order the error for an unknown one lists them.
_TYPES: Final[dict[str, tuple[type[ProviderBase], _Reader]]] = {
    schema.kind: (schema, read) for schema, read in (
        (StaticProvider, _static),
        (OAuth2Provider, _oauth2),
        (JsonProvider, _json),
        (CommandProvider, _command),
    )
}
