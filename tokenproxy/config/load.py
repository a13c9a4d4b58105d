"""YAML file -> validated Config. Every error is one ConfigError naming the key path."""

from __future__ import annotations

import difflib
import os
import re
import ssl
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Final, TypeVar

import yaml

from tokenproxy.config.model import (
    CommandProvider,
    Config,
    JsonCall,
    JsonProvider,
    LimitsConfig,
    LogConfig,
    OAuth2Provider,
    Provider,
    Route,
    SecurityConfig,
    StaticProvider,
)
from tokenproxy.config.secrets import holds_inline_secrets
from tokenproxy.config.values import (
    Listener,
    Secret,
    expand_env,
    is_header_value,
    parse_duration,
    parse_header_name,
    parse_http_url,
    parse_json_pointer,
    parse_listener,
    parse_size,
)
from tokenproxy.errors import ConfigError

T = TypeVar("T")
_MISSING: Final = object()
_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: the later one would silently win."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    # Only the mapping's own keys: one that overrides a key merged in with "<<" is not a duplicate.
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node)
        try:
            duplicate = key in seen
        except TypeError:   # unhashable; construct_mapping reports it with its line
            continue
        if duplicate:
            raise ConfigError(f"line {key_node.start_mark.line + 1}: duplicate key {key!r}")
        seen.add(key)
    loader.flatten_mapping(node)
    return loader.construct_mapping(node)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_mapping,
)


class _Map:
    """A YAML mapping read key by key; whatever is left over is an unknown key."""

    def __init__(self, raw: object, where: str) -> None:
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{where or 'config'}: expected a mapping")
        for key in raw:
            if not isinstance(key, str):
                raise ConfigError(f"{where or 'config'}: keys must be strings, got {key!r}")
        self.raw: dict[str, Any] = raw
        self.where = where
        self._used: set[str] = set()

    def path(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        return key in self.raw and self.raw[key] is not None

    def get(self, key: str, default: Any = None) -> Any:
        self._used.add(key)
        value = self.raw.get(key)
        return default if value is None else value

    def parse(self, key: str, parser: Callable[[object, str], T], default: T) -> T:
        self._used.add(key)
        if self.raw.get(key) is None:
            return default
        return parser(self.raw[key], self.path(key))

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ConfigError(f"{self.path(key)}: expected a string")
        return str(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self.get(key, default)
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"   # "${FLAG:-false}" arrives as a string
        if not isinstance(value, bool):
            raise ConfigError(f"{self.path(key)}: expected true or false")
        return value

    def choice(self, key: str, choices: tuple[str, ...], default: str) -> Any:
        value = self.get(key, default)
        if value not in choices:
            raise ConfigError(f"{self.path(key)}: expected one of {', '.join(choices)}")
        return value

    def secret(self, key: str) -> Secret | None:
        """``key`` inline, or ``key_file`` read now (and again on reload); not both."""
        file_key = f"{key}_file"
        inline, from_file = self.has(key), self.has(file_key)
        self._used.update((key, file_key))
        if inline and from_file:
            raise ConfigError(f"{self.path(key)}: give {key} or {file_key}, not both")
        if inline:
            if not isinstance(self.raw[key], str):
                # YAML reads `token: 0123` as 83 and `12:30` as 750: refuse, do not guess.
                raise ConfigError(f"{self.path(key)}: quote the value (YAML read it as a "
                                  f"{type(self.raw[key]).__name__}, not text)")
            return Secret(self.raw[key])
        if from_file:
            path = self.string(file_key)
            assert path is not None
            return Secret(_read_secret_file(Path(path), self.path(file_key)))
        return None

    def reject_unknown(self, known: tuple[str, ...]) -> None:
        """Report a typo first, before the "required" error it would otherwise cause."""
        for key in self.raw:
            if key not in known:
                raise ConfigError(f"{self.path(key)}: unknown key{_did_you_mean(key, known)}")

    def done(self) -> None:
        for key in self.raw:
            if key not in self._used:
                raise ConfigError(f"{self.path(key)}: unknown key"
                                  f"{_did_you_mean(key, tuple(self._used))}")


def _did_you_mean(key: str, known: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _read_secret_file(path: Path, where: str) -> str:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{where}: cannot read {path}: {reason}") from None
    secret = text.rstrip("\r\n")
    if not secret.strip():
        # An empty secret is a mistake (a volume not mounted yet), never a credential.
        raise ConfigError(f"{where}: {path} is empty")
    return secret


def _expand_tree(node: Any, env: Mapping[str, str], where: str) -> Any:
    if isinstance(node, str):
        return expand_env(node, env, where or "config")
    if isinstance(node, dict):
        return {
            k: _expand_tree(v, env, f"{where}.{k}" if where else str(k)) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_expand_tree(v, env, f"{where}[{i}]") for i, v in enumerate(node)]
    return node


def _readable_file(raw: object, where: str) -> Path:
    if not isinstance(raw, str) or not raw:
        raise ConfigError(f"{where}: expected a file path")
    path = Path(raw)
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path}: {exc.strerror}") from None
    return path


def _ca_file(raw: object, where: str) -> Path:
    """A readable PEM CA bundle: loaded now, so a bad one is a config error, not a crash."""
    path = _readable_file(raw, where)
    try:
        ssl.create_default_context().load_verify_locations(cafile=str(path))
    except (ssl.SSLError, ValueError, OSError):
        raise ConfigError(f"{where}: {path} holds no usable PEM certificate") from None
    return path


def _listeners(raw: object, where: str) -> tuple[Listener, ...]:
    items = raw if isinstance(raw, list) else [raw]
    if not items:
        raise ConfigError(f"{where}: needs at least one address")
    out = tuple(parse_listener(item, f"{where}[{i}]" if isinstance(raw, list) else where)
                for i, item in enumerate(items))
    if len(set(out)) != len(out):
        raise ConfigError(f"{where}: the same address is listed twice")
    return out


_LOG_KEYS: Final = ("level", "format")
_SECURITY_KEYS: Final = (
    "allowed_hosts", "admin_allowed_hosts", "reject_cross_site", "reject_forwarded",
    "require_header", "client_key", "client_key_file",
)
_LIMITS_KEYS: Final = (
    "max_replay_body", "max_replay_total", "max_header_size", "header_timeout",
    "keepalive_timeout", "send_timeout", "max_connections",
)


def _log(raw: object) -> LogConfig:
    m = _Map(raw, "log")
    m.reject_unknown(_LOG_KEYS)
    cfg = LogConfig(
        level=m.choice("level", ("debug", "info", "warning", "error"), "info"),
        format=m.choice("format", ("json", "console"), "json"),
    )
    m.done()
    return cfg


def _host_list(m: _Map, key: str) -> frozenset[str] | None:
    """A Host allowlist: names lower-cased without IPv6 brackets; "*" (None) allows any."""
    value = m.get(key)
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(h, str) and h.strip() for h in items):
        raise ConfigError(f"{m.path(key)}: expected a list of host names")
    names = {h.strip().lower().removeprefix("[").removesuffix("]") for h in items}
    return None if "*" in names else frozenset(names)


def _security(raw: object) -> SecurityConfig:
    m = _Map(raw, "security")
    m.reject_unknown(_SECURITY_KEYS)
    explicit = m.has("allowed_hosts")
    hosts = _host_list(m, "allowed_hosts") if explicit else SecurityConfig().allowed_hosts
    admin_explicit = m.has("admin_allowed_hosts")
    admin_hosts = _host_list(m, "admin_allowed_hosts") if admin_explicit else None
    m.get("allowed_hosts")         # null stands for the default
    m.get("admin_allowed_hosts")
    require: tuple[str, str] | None = None
    m.get("require_header")
    if m.has("require_header"):
        text = m.string("require_header") or ""
        name, sep, value = text.partition(":")
        where = m.path("require_header")
        if not sep or not value.strip():
            raise ConfigError(f'{where}: expected "Name: value"')
        require = (parse_header_name(name.strip(), where), value.strip())
        if not is_header_value(require[1]):
            raise ConfigError(f"{where}: the value must be printable ASCII")
    key = m.secret("client_key")
    if key is not None and (len(key.value) < 16 or not is_header_value(key.value)):
        raise ConfigError(f"{m.path('client_key')}: needs at least 16 printable ASCII characters")
    cfg = SecurityConfig(
        allowed_hosts=hosts,
        allowed_hosts_explicit=explicit,
        admin_allowed_hosts=admin_hosts,
        admin_allowed_hosts_explicit=admin_explicit,
        reject_cross_site=m.boolean("reject_cross_site", True),
        reject_forwarded=m.boolean("reject_forwarded", True),
        require_header=require,
        client_key=key,
    )
    m.done()
    return cfg


def _positive_int(raw: object, where: str) -> int:
    if isinstance(raw, str) and raw.strip().isdigit() and len(raw.strip()) < 10:
        raw = int(raw.strip())   # "${MAX:-1024}" arrives as a string
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise ConfigError(f"{where}: expected a positive whole number")
    return raw


def _limits(raw: object) -> LimitsConfig:
    m = _Map(raw, "limits")
    m.reject_unknown(_LIMITS_KEYS)
    d = LimitsConfig()
    cfg = LimitsConfig(
        max_replay_body=m.parse("max_replay_body", parse_size, d.max_replay_body),
        max_replay_total=m.parse("max_replay_total", parse_size, d.max_replay_total),
        max_header_size=m.parse("max_header_size", parse_size, d.max_header_size),
        header_timeout=m.parse(
            "header_timeout", lambda r, w: parse_duration(r, w, allow_zero=False), d.header_timeout
        ),
        keepalive_timeout=m.parse(
            "keepalive_timeout",
            lambda r, w: parse_duration(r, w, allow_zero=False),
            d.keepalive_timeout,
        ),
        send_timeout=m.parse(
            "send_timeout", lambda r, w: parse_duration(r, w, allow_zero=False),
            d.send_timeout),
        max_connections=m.parse("max_connections", _positive_int, d.max_connections),
    )
    if cfg.max_header_size < 1024:
        raise ConfigError("limits.max_header_size: must be at least 1KiB")
    if cfg.max_replay_total < cfg.max_replay_body:
        raise ConfigError("limits.max_replay_total: must be at least limits.max_replay_body")
    m.done()
    return cfg


def _str_pairs(raw: object, where: str) -> tuple[tuple[str, str], ...]:
    m = _Map(raw, where)
    out = []
    for key in list(m.raw):
        value = m.string(key)
        assert value is not None
        out.append((key, value))
    return tuple(out)


def _margin(m: _Map) -> float:
    return m.parse("refresh_margin", parse_duration, 60.0)


def _timeout(m: _Map, default: float) -> float:
    return m.parse("timeout", lambda r, w: parse_duration(r, w, allow_zero=False), default)


def _static(name: str, m: _Map) -> StaticProvider:
    inline, from_file = m.has("token"), m.has("token_file")
    m.get("token")
    m.get("token_file")
    if inline == from_file:
        raise ConfigError(f"{m.path('token')}: give token or token_file (one of them)")
    token: Secret | None = None
    token_file: Path | None = None
    if inline:
        token = m.secret("token")
        assert token is not None
    else:
        token_file = _readable_file(m.get("token_file"), m.path("token_file"))
        token = Secret(_read_secret_file(token_file, m.path("token_file")))
    if not token.value or not is_header_value(token.value):
        where = m.path("token" if inline else "token_file")
        raise ConfigError(f"{where}: the token must be non-empty printable ASCII")
    return StaticProvider(name=name, refresh_margin=_margin(m), token=token, token_file=token_file)


def _oauth2(name: str, m: _Map) -> OAuth2Provider:
    token_url = m.parse("token_url", parse_http_url, None)
    issuer = m.parse("issuer", parse_http_url, None)
    if (token_url is None) == (issuer is None):
        raise ConfigError(f"{m.path('token_url')}: give token_url or issuer (one of them)")
    grant = m.choice("grant_type", ("client_credentials", "password", "refresh_token"),
                     "client_credentials")
    auth = m.choice("client_auth", ("basic", "post", "none"), "basic")
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
    scope = m.get("scope")
    if isinstance(scope, list):
        if not all(isinstance(s, str) for s in scope):
            raise ConfigError(f"{m.path('scope')}: expected a string or a list of strings")
        scope = " ".join(scope)
    elif scope is not None and not isinstance(scope, str):
        raise ConfigError(f"{m.path('scope')}: expected a string or a list of strings")
    return OAuth2Provider(
        name=name,
        refresh_margin=_margin(m),
        token_url=token_url,
        issuer=issuer,
        grant_type=grant,
        client_id=client_id,
        client_secret=secret,
        client_auth=auth,
        scope=scope,
        params=_str_pairs(m.get("params"), m.path("params")),
        username=username,
        password=password,
        refresh_token=refresh,
        timeout=_timeout(m, 10.0),
        ca_file=m.parse("ca_file", _ca_file, None),
    )


_METHODS: Final = ("GET", "POST", "PUT", "PATCH")


_JSON_CALL_KEYS: Final = (
    "url", "method", "json", "headers", "access_token", "refresh_token", "expires_in",
)


def _json_call(raw: object, where: str, *, default_access: str) -> JsonCall:
    m = _Map(raw, where)
    m.reject_unknown(_JSON_CALL_KEYS)
    if not m.has("url"):
        raise ConfigError(f"{m.path('url')}: required")
    method = str(m.get("method", "POST")).upper()
    if method not in _METHODS:
        raise ConfigError(f"{m.path('method')}: expected one of {', '.join(_METHODS)}")
    call = JsonCall(
        url=parse_http_url(m.get("url"), m.path("url"), allow_query=True),
        method=method,
        json=m.get("json"),
        headers=_str_pairs(m.get("headers"), m.path("headers")),
        access_token=m.parse("access_token", parse_json_pointer, default_access),
        refresh_token=m.parse("refresh_token", parse_json_pointer, None),
        expires_in=m.parse("expires_in", parse_json_pointer, None),
    )
    m.done()
    return call


def _json(name: str, m: _Map) -> JsonProvider:
    if not m.has("login"):
        raise ConfigError(f"{m.path('login')}: required")
    login = _json_call(m.get("login"), m.path("login"), default_access="/access_token")
    refresh = None
    if m.has("refresh"):
        refresh = _json_call(m.get("refresh"), m.path("refresh"), default_access=login.access_token)
        if "{refresh_token}" not in repr(refresh.json) and "{refresh_token}" not in repr(
            refresh.headers
        ):
            raise ConfigError(
                f"{m.path('refresh')}: the body or a header must contain {{refresh_token}}"
            )
        if login.refresh_token is None:
            raise ConfigError(f"{m.path('login.refresh_token')}: refresh needs a refresh token")
    else:
        m.get("refresh")
    return JsonProvider(
        name=name,
        refresh_margin=_margin(m),
        login=login,
        refresh=refresh,
        timeout=_timeout(m, 10.0),
        ca_file=m.parse("ca_file", _ca_file, None),
    )


def _command(name: str, m: _Map) -> CommandProvider:
    argv = m.get("command")
    if (
        not isinstance(argv, list)
        or not argv
        or not all(isinstance(a, str | int | float) and not isinstance(a, bool) for a in argv)
    ):
        raise ConfigError(f"{m.path('command')}: expected a list of arguments, like [gcloud, auth]")
    return CommandProvider(
        name=name,
        refresh_margin=_margin(m),
        command=tuple(str(a) for a in argv),
        output=m.choice("output", ("text", "json"), "text"),
        access_token=m.parse("access_token", parse_json_pointer, "/access_token"),
        expires_in=m.parse("expires_in", parse_json_pointer, "/expires_in"),
        cache_for=m.parse(
            "cache_for", lambda r, w: parse_duration(r, w, allow_zero=False), 300.0
        ),
        timeout=_timeout(m, 30.0),
    )


_PROVIDER_TYPES: Final[dict[str, Callable[[str, _Map], Provider]]] = {
    "static": _static,
    "oauth2": _oauth2,
    "json": _json,
    "command": _command,
}


_COMMON_KEYS: Final = ("type", "refresh_margin")
# The keys each provider type reads besides those; see reject_unknown.
_PROVIDER_KEYS: Final = {
    "static": ("token", "token_file"),
    "oauth2": (
        "token_url", "issuer", "grant_type", "client_id", "client_secret", "client_secret_file",
        "client_auth", "scope", "params", "username", "password", "password_file",
        "refresh_token", "refresh_token_file", "timeout", "ca_file",
    ),
    "json": ("login", "refresh", "timeout", "ca_file"),
    "command": ("command", "output", "access_token", "expires_in", "cache_for", "timeout"),
}


def _providers(raw: object) -> dict[str, Provider]:
    top = _Map(raw, "providers")
    out: dict[str, Provider] = {}
    for name in list(top.raw):
        top.get(name)
        where = top.path(name)
        if not _NAME_RE.fullmatch(name):
            raise ConfigError(f"{where}: provider names use letters, digits, '_', '.', '-'")
        m = _Map(top.raw[name], where)
        kind = m.get("type")
        if kind not in _PROVIDER_TYPES:
            raise ConfigError(f"{m.path('type')}: expected one of {', '.join(_PROVIDER_TYPES)}")
        m.reject_unknown((*_COMMON_KEYS, *_PROVIDER_KEYS[kind]))
        out[name] = _PROVIDER_TYPES[kind](name, m)
        m.done()
    return out


def _prefix(raw: object, where: str) -> str:
    if not isinstance(raw, str) or not raw.startswith("/") or raw.startswith("//"):
        raise ConfigError(f"{where}: must start with a single /")
    if any(c in raw for c in "?#%\\ ") or any(seg in (".", "..") for seg in raw.split("/")):
        raise ConfigError(f"{where}: use a plain path (no ?, #, %, \\, spaces or dot segments)")
    return raw


def _status_list(raw: object, where: str) -> frozenset[int]:
    items = raw if isinstance(raw, list) else [raw]
    for item in items:
        if isinstance(item, bool) or not isinstance(item, int) or not 400 <= item <= 599:
            raise ConfigError(f"{where}: expected HTTP status codes from 400 to 599")
    return frozenset(items)


_ROUTE_KEYS: Final = (
    "prefix", "upstream", "provider", "header", "value", "retry_on", "client_authorization",
    "preserve_host", "timeout", "ca_file",
)


def _routes(raw: object, providers: Mapping[str, Provider]) -> tuple[Route, ...]:
    if not isinstance(raw, list) or not raw:
        raise ConfigError("routes: at least one route is needed")
    out: list[Route] = []
    seen: dict[str, int] = {}
    for i, item in enumerate(raw):
        m = _Map(item, f"routes[{i}]")
        m.reject_unknown(_ROUTE_KEYS)
        if not m.has("prefix"):
            raise ConfigError(f"{m.path('prefix')}: required")
        if not m.has("upstream"):
            raise ConfigError(f"{m.path('upstream')}: required")
        prefix = _prefix(m.get("prefix"), m.path("prefix"))
        match = prefix.rstrip("/")
        if match in seen:
            raise ConfigError(f"{m.path('prefix')}: the same prefix as routes[{seen[match]}]")
        seen[match] = i
        provider = m.string("provider")
        if provider is None:
            raise ConfigError(f"{m.path('provider')}: required (a name under providers)")
        if provider not in providers:
            raise ConfigError(f"{m.path('provider')}: no provider named {provider!r}")
        value = m.string("value", "Bearer {token}") or ""
        if "{token}" not in value or not is_header_value(value.replace("{token}", "x")):
            raise ConfigError(f"{m.path('value')}: must contain {{token}} and be printable ASCII")
        out.append(
            Route(
                prefix=prefix,
                match=match,
                upstream=parse_http_url(m.get("upstream"), m.path("upstream")),
                provider=provider,
                header=m.parse("header", parse_header_name, "Authorization"),
                value=value,
                retry_on=m.parse("retry_on", _status_list, frozenset({401})),
                client_authorization=m.choice("client_authorization", ("replace", "keep"),
                                              "replace"),
                preserve_host=m.boolean("preserve_host", False),
                timeout=_timeout(m, 60.0),
                ca_file=m.parse("ca_file", _ca_file, None),
            )
        )
        m.done()
    return tuple(out)


def _state_path(explicit: str | None, env: Mapping[str, str]) -> Path | None:
    return Path(explicit) if explicit else _default_state_path(env)


def _default_state_path(env: Mapping[str, str]) -> Path | None:
    """$STATE_DIRECTORY/state.json, else under $XDG_STATE_HOME or $HOME/.local/state. None
    without any of them: a shared fallback such as /tmp would let another user plant the file
    first, and a relative one would depend on the working directory (so it does not count)."""
    # systemd may pass several directories separated by ':'; the first is ours.
    directory = env.get("STATE_DIRECTORY", "").split(":")[0]
    if os.path.isabs(directory):
        return Path(directory) / "state.json"
    xdg, home = env.get("XDG_STATE_HOME", ""), env.get("HOME", "")
    if os.path.isabs(xdg):
        return Path(xdg) / "tokenproxy" / "state.json"
    if os.path.isabs(home):
        return Path(home) / ".local" / "state" / "tokenproxy" / "state.json"
    return None


_TOP_KEYS: Final = (
    "listen", "admin_listen", "socket_group", "log", "state_path", "shutdown_grace", "security",
    "limits", "providers", "routes",
)


def accepted_keys() -> dict[str, tuple[str, ...]]:
    """Every key the loader accepts, by section: "providers.*" for every provider's,
    "providers.<type>" for one type's own, "providers.json.<call>" for login and refresh.
    The test of config.example.yaml checks that the example names each one."""
    keys = {"": _TOP_KEYS, "log": _LOG_KEYS, "security": _SECURITY_KEYS,
            "limits": _LIMITS_KEYS, "routes[]": _ROUTE_KEYS, "providers.*": _COMMON_KEYS,
            "providers.json.<call>": _JSON_CALL_KEYS}
    for kind, own in _PROVIDER_KEYS.items():
        keys[f"providers.{kind}"] = own
    return keys


def build_config(raw: object, env: Mapping[str, str], source: Path | None = None) -> Config:
    """Validate an already parsed YAML document."""
    tree = _expand_tree(raw, env, "")
    top = _Map(tree, "")
    top.reject_unknown(_TOP_KEYS)
    listen = top.parse("listen", _listeners, Config().listen)
    admin = top.parse("admin_listen", parse_listener, None) if "admin_listen" in top.raw else (
        Config().admin_listen
    )
    top.get("admin_listen")
    security = _security(top.get("security"))
    providers = _providers(top.get("providers"))
    if not providers:
        raise ConfigError("providers: at least one provider is needed")
    cfg = Config(
        listen=listen,
        admin_listen=admin,
        socket_group=top.string("socket_group"),
        log=_log(top.get("log")),
        state_path=_state_path(top.string("state_path"), env),
        shutdown_grace=top.parse("shutdown_grace", parse_duration, 10.0),
        security=security,
        limits=_limits(top.get("limits")),
        providers=providers,
        routes=_routes(top.get("routes"), providers),
        source=source,
    )
    top.done()
    if cfg.state_path is None and cfg.persists_tokens:
        raise ConfigError("state_path: set it: oauth2, json and command providers keep "
                          "tokens in a state file, and none of $STATE_DIRECTORY, "
                          "$XDG_STATE_HOME or $HOME names an absolute directory for it")
    exposed = [str(li) for li in listen if not li.is_loopback]
    if exposed and security.client_key is None and not security.allowed_hosts_explicit:
        raise ConfigError(
            f"listen: {exposed[0]} is reachable from other hosts; set security.client_key "
            "or list security.allowed_hosts explicitly"
        )
    _check_admin_exposure(admin, security)
    return replace(cfg, inline_secrets=holds_inline_secrets(raw, env, cfg))


def _check_admin_exposure(admin: Listener | None, security: SecurityConfig) -> None:
    """/readyz and /metrics take no key: an admin listener other hosts can reach needs its own
    explicit Host allowlist, so that opening it to a scraper never widens allowed_hosts."""
    if admin is None or admin.is_loopback or security.admin_allowed_hosts_explicit:
        return
    raise ConfigError(
        f"admin_listen: {admin} is reachable from other hosts; list the Host names its "
        "clients send in security.admin_allowed_hosts (Kubernetes probes and Prometheus send "
        'the pod IP: ["${POD_IP}"] with POD_IP from status.podIP), or "*" for any'
    )


def parse_yaml(text: str, where: str) -> object:
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    except yaml.MarkedYAMLError as exc:
        # Only the position and the problem: the snippet could show a secret, and so could a
        # quoted name in the problem (an unquoted password "*x" is an undefined alias 'x').
        line = exc.problem_mark.line + 1 if exc.problem_mark else 0
        problem = _QUOTED.sub(_mask_quoted, exc.problem or "syntax error")
        raise ConfigError(f"{where}: line {line}: invalid YAML ({problem})") from None
    except yaml.YAMLError:
        raise ConfigError(f"{where}: invalid YAML") from None
    except ValueError:   # an impossible date or time such as 2024-13-45
        raise ConfigError(f"{where}: invalid YAML (a date or time that does not exist)") from None


_QUOTED: Final = re.compile(r"'([^']*)'")


def _mask_quoted(m: re.Match[str]) -> str:
    """Keep YAML's token names ('<scalar>') and single, maybe escaped, characters; mask the rest."""
    text = m[1]
    keep = (text.startswith("<") and text.endswith(">")) or len(text) <= 1 or (
        len(text) == 2 and text.startswith("\\"))
    return m[0] if keep else "'...'"


def find_config_file(explicit: str | None, env: Mapping[str, str]) -> Path:
    """-c, then $TOKENPROXY_CONFIG, ./tokenproxy.yaml, the XDG config dir, /etc/tokenproxy."""
    if explicit:
        return Path(explicit)
    candidates: list[Path] = []
    if env.get("TOKENPROXY_CONFIG"):
        return Path(env["TOKENPROXY_CONFIG"])
    candidates.append(Path("tokenproxy.yaml"))
    xdg = env.get("XDG_CONFIG_HOME") or str(Path(env.get("HOME", "/")) / ".config")
    candidates.append(Path(xdg) / "tokenproxy" / "config.yaml")
    candidates.append(Path("/etc/tokenproxy/config.yaml"))
    for path in candidates:
        if path.is_file():
            return path
    raise ConfigError(
        "config: no file found (tried -c, $TOKENPROXY_CONFIG, "
        + ", ".join(str(p) for p in candidates)
        + ")"
    )


def load_config(path: Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate the file at *path*; the environment defaults to os.environ."""
    env = os.environ if env is None else env
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"config: cannot read {path}: {reason}") from None
    return build_config(parse_yaml(text, str(path)), env, source=path)
