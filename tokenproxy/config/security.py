"""The ``security`` section: which requests the proxy listener (and the admin one) takes."""

from __future__ import annotations

from typing import Any

from tokenproxy.config.model import SecurityConfig
from tokenproxy.config.section import Section
from tokenproxy.config.values import is_header_value, parse_header_name
from tokenproxy.errors import ConfigError


def read_security(raw: object) -> SecurityConfig:
    m = Section(raw, "security", SecurityConfig)
    hosts = m.parse("allowed_hosts", _host_list)   # null stands for the default
    admin_hosts = m.parse("admin_allowed_hosts", _host_list)
    require: tuple[str, str] | None = None
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
    return SecurityConfig(
        allowed_hosts=hosts,
        allowed_hosts_explicit=m.has("allowed_hosts"),
        admin_allowed_hosts=admin_hosts,
        admin_allowed_hosts_explicit=m.has("admin_allowed_hosts"),
        reject_cross_site=m.boolean("reject_cross_site"),
        reject_forwarded=m.boolean("reject_forwarded"),
        require_header=require,
        client_key=key,
    )


def _host_list(raw: object, where: str) -> frozenset[str] | None:
    """A Host allowlist: names lower-cased without IPv6 brackets; "*" (None) allows any."""
    items: list[Any] = raw if isinstance(raw, list) else [raw]
    if not items or not all(isinstance(h, str) and h.strip() for h in items):
        raise ConfigError(f"{where}: expected a list of host names")
    names = {h.strip().lower().removeprefix("[").removesuffix("]") for h in items}
    return None if "*" in names else frozenset(names)
