"""The ``limits`` section: sizes and timeouts that bound what a client can hold."""

from __future__ import annotations

from tokenproxy.config.model import LimitsConfig
from tokenproxy.config.section import Section
from tokenproxy.config.values import parse_positive_duration, parse_size
from tokenproxy.errors import ConfigError


def read_limits(raw: object) -> LimitsConfig:
    m = Section(raw, "limits", LimitsConfig)
    cfg = LimitsConfig(
        max_replay_body=m.parse("max_replay_body", parse_size),
        max_replay_total=m.parse("max_replay_total", parse_size),
        max_header_size=m.parse("max_header_size", parse_size),
        header_timeout=m.parse("header_timeout", parse_positive_duration),
        keepalive_timeout=m.parse("keepalive_timeout", parse_positive_duration),
        send_timeout=m.parse("send_timeout", parse_positive_duration),
        max_connections=m.parse("max_connections", _positive_int),
    )
    if cfg.max_header_size < 1024:
        raise ConfigError("limits.max_header_size: must be at least 1KiB")
    if cfg.max_replay_total < cfg.max_replay_body:
        raise ConfigError("limits.max_replay_total: must be at least limits.max_replay_body")
    return cfg


def _positive_int(raw: object, where: str) -> int:
    if isinstance(raw, str) and raw.strip().isdigit() and len(raw.strip()) < 10:
        raw = int(raw.strip())   # "${MAX:-1024}" arrives as a string
    if isinstance(raw, bool) or not isinstance(raw, int) or raw < 1:
        raise ConfigError(f"{where}: expected a positive whole number")
    return raw
