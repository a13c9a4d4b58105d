"""Configuration: the YAML schema (docs/configuration.md), validated into frozen dataclasses."""

from tokenproxy.config.load import build_config, load_config
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
    SharedStateConfig,
    StaticProvider,
)
from tokenproxy.config.source import find_config_file, parse_yaml
from tokenproxy.config.values import HttpUrl, Listener, Secret

__all__ = [
    "CommandProvider",
    "Config",
    "HttpUrl",
    "JsonCall",
    "JsonProvider",
    "LimitsConfig",
    "Listener",
    "LogConfig",
    "OAuth2Provider",
    "Provider",
    "Route",
    "Secret",
    "SecurityConfig",
    "SharedStateConfig",
    "StaticProvider",
    "build_config",
    "find_config_file",
    "load_config",
    "parse_yaml",
]
