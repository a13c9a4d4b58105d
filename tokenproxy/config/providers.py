"""The ``providers`` section: each named provider, read as the model class its ``type`` names."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, Final, cast

from tokenproxy.config.model import (
    ASSERTED_GRANTS,
    GRANT_URNS,
    INTERACTIVE_GRANTS,
    JWT_TOKEN_TYPE,
    CommandProvider,
    GrantType,
    JsonCall,
    JsonProvider,
    OAuth2Provider,
    Provider,
    ProviderBase,
    StaticProvider,
    yaml_keys,
)
from tokenproxy.config.named_files import (
    ca_file,
    client_certificate,
    files_digest,
    read_secret_file,
    readable_file,
)
from tokenproxy.config.section import Section
from tokenproxy.config.values import (
    HttpUrl,
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
    check_chains(out)
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
    grant = _grant_type(m)
    client_id = m.string("client_id")
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
    endpoint = token_url or issuer
    assert endpoint is not None
    provider = OAuth2Provider(
        name=name,
        refresh_margin=m.parse("refresh_margin", parse_duration),
        token_url=token_url,
        issuer=issuer,
        grant_type=grant,
        client_id=client_id,
        client_secret=m.secret("client_secret"),
        client_auth=(m.choice("client_auth") if m.has("client_auth") or grant not in
                     ASSERTED_GRANTS | INTERACTIVE_GRANTS else "none"),
        scope=scope,
        params=m.parse("params", _str_pairs),
        username=username,
        password=password,
        refresh_token=refresh,
        timeout=m.parse("timeout", parse_positive_duration),
        ca_file=m.optional("ca_file", ca_file),
        private_key_file=m.optional("private_key_file", readable_file),
        key_id=_printable(m, "key_id"),
        assertion_certificate_file=m.optional("assertion_certificate_file", readable_file),
        signing_alg=None,
        assertion_audience=_printable(m, "assertion_audience"),
        client_assertion_file=m.optional("client_assertion_file", _path),
        tls_client_cert_file=m.optional("tls_client_cert_file", readable_file),
        tls_client_key_file=m.optional("tls_client_key_file", readable_file),
        subject_token_file=m.optional("subject_token_file", _path),
        subject_token_provider=m.string("subject_token_provider"),
        subject_token_type=_printable(m, "subject_token_type"),
        actor_token_file=m.optional("actor_token_file", _path),
        actor_token_type=_printable(m, "actor_token_type") or JWT_TOKEN_TYPE,
        audience=_printable(m, "audience"),
        resource=_printable(m, "resource"),
        requested_token_type=_printable(m, "requested_token_type"),
        assertion_file=m.optional("assertion_file", _path),
        issuer_claim=_printable(m, "issuer_claim"),
        subject_claim=_printable(m, "subject_claim"),
        device_authorization_url=m.optional("device_authorization_url", parse_http_url),
        authorization_url=m.optional("authorization_url", _authorization_url),
        revocation_url=m.optional("revocation_url", parse_http_url),
        redirect_port=m.parse("redirect_port", _redirect_port),
        redirect_path=m.parse("redirect_path", _redirect_path),
    )
    _client_auth(provider, m)
    _mutual_tls(provider, m, endpoint)
    provider = _signing(provider, m)
    _grant_inputs(provider, m)
    return replace(provider, files_digest=files_digest(
        (provider.ca_file, provider.private_key_file, provider.assertion_certificate_file,
         provider.tls_client_cert_file, provider.tls_client_key_file)))


def _grant_type(m: Section) -> GrantType:
    raw = m.value("grant_type")
    if isinstance(raw, str) and raw.strip() in GRANT_URNS:
        return cast("GrantType", GRANT_URNS[raw.strip()])
    return cast("GrantType", m.choice("grant_type"))


def _client_auth(p: OAuth2Provider, m: Section) -> None:
    """What each client_auth method needs (docs/without-secrets.md)."""
    auth, where = p.client_auth, m.path("client_auth")
    if auth in ("basic", "post", "client_secret_jwt") and (
            p.client_id is None or p.client_secret is None):
        raise ConfigError(f"{m.path('client_secret')}: client_auth {auth} needs client_id and "
                          "client_secret")
    if auth == "private_key_jwt" and (p.client_id is None or p.private_key_file is None):
        raise ConfigError(f"{m.path('private_key_file')}: client_auth private_key_jwt needs "
                          "client_id and private_key_file")
    if auth == "client_assertion" and p.client_assertion_file is None:
        raise ConfigError(f"{m.path('client_assertion_file')}: client_auth client_assertion "
                          "needs client_assertion_file")
    if auth == "tls_client_auth" and (p.client_id is None or p.tls_client_cert_file is None):
        raise ConfigError(f"{m.path('tls_client_cert_file')}: client_auth tls_client_auth "
                          "needs client_id, tls_client_cert_file and tls_client_key_file")
    if p.client_assertion_file is not None and auth != "client_assertion":
        raise ConfigError(f"{m.path('client_assertion_file')}: used only with client_auth "
                          f"client_assertion (not {auth}); set {where} or remove it")


def _mutual_tls(p: OAuth2Provider, m: Section, endpoint: HttpUrl) -> None:
    cert, key = p.tls_client_cert_file, p.tls_client_key_file
    if (cert is None) != (key is None):
        raise ConfigError(f"{m.path('tls_client_cert_file')}: give tls_client_cert_file and "
                          "tls_client_key_file together")
    if cert is None or key is None:
        return
    if not endpoint.url.startswith("https://"):
        raise ConfigError(f"{m.path('tls_client_cert_file')}: the token endpoint is not "
                          "https: there is no TLS to present a certificate in")
    client_certificate(cert, key, m.path("tls_client_cert_file"))


def _signing(p: OAuth2Provider, m: Section) -> OAuth2Provider:
    """The key and algorithm assertions made here are signed with; the key is loaded now,
    so a bad one is a config error, and the algorithm defaults to the key's own."""
    alg = _printable(m, "signing_alg")
    signs_here = p.client_auth == "private_key_jwt" or (
        p.grant_type == "jwt_bearer" and p.assertion_file is None)
    if p.private_key_file is None:
        if alg is not None and p.client_auth != "client_secret_jwt":
            raise ConfigError(f"{m.path('signing_alg')}: there is no private_key_file to "
                              "sign with")
        if p.assertion_certificate_file is not None:
            raise ConfigError(f"{m.path('assertion_certificate_file')}: there is no "
                              "private_key_file it would be the certificate of")
        if alg not in (None, "HS256"):
            raise ConfigError(f"{m.path('signing_alg')}: client_secret_jwt signs with HS256")
        return p
    if not signs_here:
        raise ConfigError(f"{m.path('private_key_file')}: used by client_auth private_key_jwt "
                          "or grant_type jwt_bearer (without assertion_file) only")
    from tokenproxy.config.keys import certificate_of, signing_key  # cryptography: on use

    key, algs = signing_key(p.private_key_file, m.path("private_key_file"))
    if p.assertion_certificate_file is not None:
        certificate_of(key, p.assertion_certificate_file, m.path("assertion_certificate_file"))
    if alg is None:
        alg = algs[0]
    elif alg not in algs:
        raise ConfigError(f"{m.path('signing_alg')}: this key signs with "
                          f"{' or '.join(algs)}, not {alg}")
    return replace(p, signing_alg=cast("Any", alg))


def _grant_inputs(p: OAuth2Provider, m: Section) -> None:
    if p.grant_type == "token_exchange":
        if (p.subject_token_file is None) == (p.subject_token_provider is None):
            raise ConfigError(f"{m.path('subject_token_file')}: grant_type token_exchange "
                              "needs subject_token_file or subject_token_provider (one of them)")
    elif p.grant_type == "jwt_bearer":
        if p.assertion_file is None and p.private_key_file is None:
            raise ConfigError(f"{m.path('assertion_file')}: grant_type jwt_bearer needs "
                              "assertion_file, or private_key_file to sign one here")
        if (p.assertion_file is None and p.client_id is None
                and (p.issuer_claim is None or p.subject_claim is None)):
            raise ConfigError(f"{m.path('issuer_claim')}: an assertion signed here needs "
                              "client_id, or issuer_claim and subject_claim")
    keys = {"token_exchange": ("subject_token_file", "subject_token_provider",
                               "subject_token_type", "actor_token_file", "actor_token_type",
                               "audience", "resource", "requested_token_type"),
            "jwt_bearer": ("assertion_file", "issuer_claim", "subject_claim")}
    for grant, own in keys.items():
        if p.grant_type != grant:
            for key in own:
                if m.has(key):
                    raise ConfigError(f"{m.path(key)}: used only with grant_type {grant}")
    logins = {"device_code": ("device_authorization_url",),
              "authorization_code": ("authorization_url", "redirect_port", "redirect_path")}
    for grant, own in logins.items():
        if p.grant_type != grant:
            for key in own:
                if m.has(key):
                    raise ConfigError(f"{m.path(key)}: used only with grant_type {grant}")
    if p.interactive:
        if p.client_id is None:
            raise ConfigError(f"{m.path('client_id')}: grant_type {p.grant_type} needs the "
                              "client_id registered for tokenproxy")
        needed = ("device_authorization_url" if p.grant_type == "device_code"
                  else "authorization_url")
        if p.issuer is None and getattr(p, needed) is None:
            raise ConfigError(f"{m.path(needed)}: grant_type {p.grant_type} needs issuer "
                              f"(discovery) or {needed}")
    if p.asserted and p.refresh_token is not None:
        raise ConfigError(f"{m.path('refresh_token')}: grant_type {p.grant_type} is done "
                          "again at each renewal and takes no refresh token")
    if p.interactive and p.refresh_token is not None:
        raise ConfigError(f"{m.path('refresh_token')}: grant_type {p.grant_type} gets its "
                          "refresh token from `tokenproxy login`, not from the config")


def check_chains(providers: Mapping[str, Provider]) -> None:
    """subject_token_provider names another provider, and following it never comes back."""
    for name, p in providers.items():
        where = f"providers.{name}.subject_token_provider"
        seen = [name]
        while isinstance(p, OAuth2Provider) and p.subject_token_provider is not None:
            nxt = p.subject_token_provider
            if nxt not in providers:
                raise ConfigError(f"{where}: no provider named {nxt!r}")
            if nxt in seen:
                raise ConfigError(f"{where}: a cycle: {' -> '.join([*seen, nxt])}")
            seen.append(nxt)
            p = providers[nxt]


def subject_chain(providers: Mapping[str, Provider], name: str) -> list[str]:
    """*name* and the providers whose tokens it is exchanged from, in order (check_chains
    has refused cycles)."""
    out = [name]
    p = providers[name]
    while isinstance(p, OAuth2Provider) and p.subject_token_provider is not None:
        out.append(p.subject_token_provider)
        p = providers[p.subject_token_provider]
    return out


def _authorization_url(raw: object, where: str) -> HttpUrl:
    # RFC 6749 section 3.1: it may carry a query (a tenant, say), which is kept.
    return parse_http_url(raw, where, allow_query=True)


def _redirect_port(raw: object, where: str) -> int:
    if isinstance(raw, bool) or not isinstance(raw, int) or not 0 <= raw <= 65535:
        raise ConfigError(f"{where}: expected a port from 0 (any free one) to 65535")
    return raw


def _redirect_path(raw: object, where: str) -> str:
    if (not isinstance(raw, str) or not raw.startswith("/") or len(raw) > 256
            or any(c in raw for c in "?#% ") or not is_header_value(raw)):
        raise ConfigError(f"{where}: expected a plain path starting with /")
    return raw


def _printable(m: Section, key: str) -> str | None:
    value = m.string(key)
    if value is not None and (not value or not is_header_value(value)):
        raise ConfigError(f"{m.path(key)}: expected printable ASCII without line breaks")
    return value


def _path(raw: object, where: str) -> Path:
    """A file read at each token request: it must be there now (a mount not yet populated
    is a mistake better found at start); its content may change at any time."""
    return readable_file(raw, where)


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
    ca = m.optional("ca_file", ca_file)
    return JsonProvider(
        name=name,
        refresh_margin=m.parse("refresh_margin", parse_duration),
        login=login,
        refresh=refresh,
        timeout=m.parse("timeout", parse_positive_duration),
        ca_file=ca,
        files_digest=files_digest((ca,)),
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
