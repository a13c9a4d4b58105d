"""The validated configuration: frozen dataclasses, built only by the loader (``config.load``
and the section modules it calls).

They are also the schema of the YAML file: each section's keys are its dataclass's fields (less
the ones marked COMPUTED; a Secret field takes a ``_file`` form too), a key left out takes the
field's default, and a Literal field's choices are its arguments. ``yaml_keys``, ``default_of``
and ``choices_of`` read them for the loader, so nothing restates them.
"""

from __future__ import annotations

import functools
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import (
    TYPE_CHECKING,
    Any,
    ClassVar,
    Final,
    Literal,
    get_args,
    get_origin,
    get_type_hints,
)

from tokenproxy.config.values import (
    SECRET_NAME,
    ClientTls,
    HttpUrl,
    Listener,
    Secret,
    digest,
    without_secrets,
)

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

# A field the loader works out rather than reads: no key of the file.
COMPUTED: Final = MappingProxyType({"key": False})


@dataclass(frozen=True, slots=True, kw_only=True)
class LogConfig:
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["json", "console"] = "json"


@dataclass(frozen=True, slots=True, kw_only=True)
class SecurityConfig:
    # None means "*": the Host check is off.
    allowed_hosts: frozenset[str] | None = frozenset({"localhost", "127.0.0.1", "::1"})
    allowed_hosts_explicit: bool = field(default=False, metadata=COMPUTED)
    reject_cross_site: bool = True
    reject_forwarded: bool = True
    require_header: tuple[str, str] | None = None
    client_key: Secret | None = None
    # Unless explicit, the admin listener follows allowed_hosts; a list of its own lets a
    # scraper's Host (a pod IP) in without widening the proxy listener's allowlist.
    admin_allowed_hosts: frozenset[str] | None = None
    admin_allowed_hosts_explicit: bool = field(default=False, metadata=COMPUTED)

    @property
    def admin_hosts(self) -> frozenset[str] | None:
        """The admin listener's Host allowlist (None: any host)."""
        if self.admin_allowed_hosts_explicit:
            return self.admin_allowed_hosts
        return self.allowed_hosts


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    max_replay_body: int = 1024 * 1024
    max_replay_total: int = 64 * 1024 * 1024
    max_header_size: int = 16 * 1024
    header_timeout: float = 10.0
    keepalive_timeout: float = 75.0
    send_timeout: float = 60.0
    max_connections: int = 1024


@dataclass(frozen=True, slots=True, kw_only=True)
class SharedStateConfig:
    """Tokens shared by replicas through Redis (docs/replicas.md)."""

    redis_url: Secret                           # may carry a password: masked everywhere
    key_prefix: str = "tokenproxy:"
    encryption_key_file: Path | None = None
    lock_ttl: float = 15.0
    timeout: float = 2.0
    ca_file: Path | None = None
    # The keys read from encryption_key_file: the first encrypts, every one decrypts.
    encryption_keys: tuple[bytes, ...] = field(default=(), repr=False, metadata=COMPUTED)


@dataclass(frozen=True, slots=True, kw_only=True)
class ProviderBase:
    # The provider's ``type`` in the file.
    kind: ClassVar[str]
    name: str = field(metadata=COMPUTED)     # the key it is listed under
    refresh_margin: float = 60.0
    # The content of the key, certificate and CA files it names, digested: a file rotated
    # in place makes the provider another one to a reload (which reads them again), though
    # no key of the config changed.
    files_digest: str = field(default="", metadata=COMPUTED)

    def identity(self) -> dict[str, str]:
        """What makes a provider the same one across reloads and restarts (no secrets)."""
        return {"type": self.type_name()}

    def type_name(self) -> str:
        return self.kind


@dataclass(frozen=True, slots=True, kw_only=True)
class StaticProvider(ProviderBase):
    kind: ClassVar[str] = "static"
    token: Secret | None = None
    token_file: Path | None = None

    def identity(self) -> dict[str, str]:
        return {"type": self.kind, "token_file": str(self.token_file or "")}


GrantType = Literal["client_credentials", "password", "refresh_token", "token_exchange",
                    "jwt_bearer", "device_code", "authorization_code"]
# RFC 8693, RFC 7523 and RFC 8628 name their grants by URN; either form is taken, the short
# one kept.
GRANT_URNS: Final = MappingProxyType({
    "urn:ietf:params:oauth:grant-type:token-exchange": "token_exchange",
    "urn:ietf:params:oauth:grant-type:jwt-bearer": "jwt_bearer",
    "urn:ietf:params:oauth:grant-type:device_code": "device_code",
})
# Grants a person completes (`tokenproxy login`); the daemon only refreshes what they gave.
INTERACTIVE_GRANTS: Final = frozenset({"device_code", "authorization_code"})
# Grants whose inputs are made elsewhere and change (a rotated file, another provider's
# token): done again at each renewal, never by a refresh token.
ASSERTED_GRANTS: Final = frozenset({"token_exchange", "jwt_bearer"})
JWT_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:jwt"
ACCESS_TOKEN_TYPE: Final = "urn:ietf:params:oauth:token-type:access_token"


@dataclass(frozen=True, slots=True, kw_only=True)
class OAuth2Provider(ProviderBase):
    kind: ClassVar[str] = "oauth2"
    token_url: HttpUrl | None = None
    issuer: HttpUrl | None = None
    grant_type: GrantType = "client_credentials"
    client_id: str | None = None
    client_secret: Secret | None = None
    # The default is basic, or none for the asserted grants (the loader decides).
    client_auth: Literal["basic", "post", "none", "client_secret_jwt", "private_key_jwt",
                         "client_assertion", "tls_client_auth"] = "basic"
    scope: str | None = None
    params: tuple[tuple[str, str], ...] = ()
    username: str | None = None
    password: Secret | None = None
    refresh_token: Secret | None = None
    timeout: float = 10.0
    ca_file: Path | None = None
    # Client authentication without a shared secret (docs/without-secrets.md).
    private_key_file: Path | None = None
    key_id: str | None = None
    # The certificate of private_key_file as registered with the issuer: its thumbprints go
    # in the assertion's header (x5t, x5t#S256), as Entra ID identifies keys.
    assertion_certificate_file: Path | None = None
    signing_alg: Literal["RS256", "PS256", "ES256", "ES384", "EdDSA"] | None = None
    assertion_audience: str | None = None
    client_assertion_file: Path | None = None
    tls_client_cert_file: Path | None = None
    tls_client_key_file: Path | None = None
    # token_exchange (RFC 8693)
    subject_token_file: Path | None = None
    subject_token_provider: str | None = None
    # Default: the jwt type for a file, access_token for another provider's token.
    subject_token_type: str | None = None
    actor_token_file: Path | None = None
    actor_token_type: str = JWT_TOKEN_TYPE
    audience: str | None = None
    resource: str | None = None
    requested_token_type: str | None = None
    # jwt_bearer (RFC 7523 section 2.1)
    assertion_file: Path | None = None
    issuer_claim: str | None = None
    subject_claim: str | None = None
    # device_code (RFC 8628) and authorization_code with PKCE (docs/login.md): endpoints
    # when the issuer publishes no metadata, and the loopback redirect.
    device_authorization_url: HttpUrl | None = None
    authorization_url: HttpUrl | None = None
    revocation_url: HttpUrl | None = None
    redirect_port: int = 0
    redirect_path: str = "/callback"

    @property
    def asserted(self) -> bool:
        return self.grant_type in ASSERTED_GRANTS

    @property
    def interactive(self) -> bool:
        return self.grant_type in INTERACTIVE_GRANTS

    def identity(self) -> dict[str, str]:
        where = self.token_url or self.issuer
        grant_inputs = {
            key: str(value) for key in (
                "subject_token_file", "subject_token_provider", "subject_token_type",
                "actor_token_file", "audience", "resource", "requested_token_type",
                "assertion_file", "issuer_claim", "subject_claim")
            if (value := getattr(self, key)) is not None
        } if self.asserted else {}
        return {
            "type": self.kind,
            "endpoint": where.url if where else "",
            "client_id": self.client_id or "",
            "user": self.username or "",
            "grant_type": self.grant_type,
        } | ({"scope": self.scope} if self.scope else {}) | grant_inputs | (
            # An audience or resource parameter makes another token.
            {"params_digest": digest(without_secrets(dict(self.params)))} if self.params else {})


@dataclass(frozen=True, slots=True, kw_only=True)
class JsonCall:
    url: HttpUrl
    method: str = "POST"
    json: Any = None
    headers: tuple[tuple[str, str], ...] = ()
    access_token: str = "/access_token"
    refresh_token: str | None = None
    expires_in: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class JsonProvider(ProviderBase):
    kind: ClassVar[str] = "json"
    login: JsonCall
    refresh: JsonCall | None = None
    timeout: float = 10.0
    ca_file: Path | None = None

    def identity(self) -> dict[str, str]:
        user = ""
        if isinstance(self.login.json, dict):
            for key in ("username", "user", "email", "login", "client_id"):
                if isinstance(self.login.json.get(key), str):
                    user = self.login.json[key]
                    break
        # The rest of the login (a tenant, an audience) makes another token too; secrets are
        # left out, so a changed password keeps the identity, as for oauth2.
        login = {"method": self.login.method, "json": without_secrets(self.login.json),
                 "headers": [(k, v) for k, v in self.login.headers if not SECRET_NAME.search(k)]}
        return {"type": self.kind, "endpoint": self.login.url.url, "user": user,
                "login_digest": digest(login)}


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandProvider(ProviderBase):
    kind: ClassVar[str] = "command"
    command: tuple[str, ...]
    output: Literal["text", "json"] = "text"
    access_token: str = "/access_token"
    expires_in: str | None = "/expires_in"
    cache_for: float = 300.0
    timeout: float = 30.0

    def identity(self) -> dict[str, str]:
        return {"type": self.kind, "command": "\x00".join(self.command)}


Provider = StaticProvider | OAuth2Provider | JsonProvider | CommandProvider


@dataclass(frozen=True, slots=True, kw_only=True)
class Attachment:
    """How a provider's token goes on a request, and which answers are retried: the same keys
    (and defaults) for a route and for a host the forward proxy intercepts."""

    provider: str
    header: str = "Authorization"
    value: str = "Bearer {token}"
    retry_on: frozenset[int] = frozenset({401})
    client_authorization: Literal["replace", "keep"] = "replace"
    timeout: float = 60.0
    ca_file: Path | None = None
    # mTLS to the upstream (certificate-bound tokens, RFC 8705).
    tls_client_cert_file: Path | None = None
    tls_client_key_file: Path | None = None

    @property
    def client_tls(self) -> ClientTls:
        return ClientTls(self.ca_file, self.tls_client_cert_file, self.tls_client_key_file)


@dataclass(frozen=True, slots=True, kw_only=True)
class Route(Attachment):
    prefix: str                 # as configured, starts with "/"
    match: str = field(metadata=COMPUTED)   # prefix without a trailing "/" ("" for the root)
    upstream: HttpUrl
    preserve_host: bool = False
    # The forward proxy's routes are named by their host; configured ones by their prefix.
    name: str | None = field(default=None, metadata=COMPUTED)

    @property
    def label(self) -> str:
        """The route's name in metrics and logs, bounded by the config: its prefix, or the
        intercepted host it serves."""
        return self.prefix if self.name is None else self.name


@dataclass(frozen=True, slots=True, kw_only=True)
class InterceptHost(Attachment):
    host: str                   # a name, "*.name" (one label), or an IP literal; lower case
    port: int = 443
    # https: CONNECT, TLS ended here; http: absolute-form http:// requests (the loader makes
    # it the default on port 80). Never both: a token must not go in clear to a TLS port.
    scheme: Literal["https", "http"] = "https"


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardCA:
    cert_file: Path | None = None
    key_file: Path | None = None
    # Where the files are when not configured (the state directory), and that they are
    # tokenproxy's own, to create and renew.
    generated: bool = field(default=False, metadata=COMPUTED)


@dataclass(frozen=True, slots=True, kw_only=True)
class ForwardProxyConfig:
    """The forward-proxy listener (HTTPS_PROXY), docs/forward-proxy.md."""

    listen: Listener = Listener(kind="tcp", host="127.0.0.1", port=3128)  # noqa: RUF009
    ca: ForwardCA = field(default_factory=ForwardCA)
    intercept: tuple[InterceptHost, ...] = ()
    tunnel: tuple[tuple[str, int], ...] = ()   # (host pattern, port)


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    listen: tuple[Listener, ...] = (Listener(kind="tcp", host="127.0.0.1", port=8080),)
    admin_listen: Listener | None = Listener(kind="tcp", host="127.0.0.1", port=9100)  # noqa: RUF009
    socket_group: str | None = None
    log: LogConfig = field(default_factory=LogConfig)
    state_path: Path | None = None
    shared_state: SharedStateConfig | None = None
    forward_proxy: ForwardProxyConfig | None = None
    shutdown_grace: float = 10.0
    security: SecurityConfig = field(default_factory=SecurityConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    providers: dict[str, Provider] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()
    source: Path | None = field(default=None, metadata=COMPUTED)
    # A secret is written in the source file itself (not ${NAME} or *_file): the file's mode
    # then matters.
    inline_secrets: bool = field(default=False, metadata=COMPUTED)

    @property
    def persists_tokens(self) -> bool:
        """Whether a provider keeps tokens in the state file (static ones have nothing to)."""
        return any(not isinstance(p, StaticProvider) for p in self.providers.values())


def yaml_keys(schema: type[DataclassInstance]) -> tuple[str, ...]:
    """The keys a section read as *schema* may hold, in field order: each field not COMPUTED,
    and after a Secret one its ``_file`` form (a file holding the secret)."""
    hints = _hints(schema)
    keys: dict[str, None] = {}
    for f in fields(schema):
        if f.metadata.get("key", True):
            keys[f.name] = None
            if Secret in (hints[f.name], *get_args(hints[f.name])):
                keys[f"{f.name}_file"] = None
    return tuple(keys)


def default_of(schema: type[DataclassInstance], key: str) -> Any:
    """The default of *schema*'s field *key*; None for a required field or a key of no field."""
    f = schema.__dataclass_fields__.get(key)
    if f is not None and f.default is not MISSING:
        return f.default
    if f is not None and f.default_factory is not MISSING:
        return f.default_factory()
    return None


def choices_of(schema: type[DataclassInstance], key: str) -> tuple[str, ...]:
    """The values *schema*'s Literal field *key* may take, in the order written."""
    hint = _hints(schema)[key]
    assert get_origin(hint) is Literal, f"{schema.__name__}.{key} is not a Literal"
    return get_args(hint)


@functools.cache
def _hints(schema: type[DataclassInstance]) -> dict[str, Any]:
    return get_type_hints(schema)
