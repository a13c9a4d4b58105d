"""A Proxy (tokenproxy/proxy/runtime.py) built from a config dict, with static token sources
and a registry of its own: what the request paths' pure parts need, without a daemon."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry

from tests.helpers.fakes import FakeClock
from tokenproxy import __version__, log
from tokenproxy.config import StaticProvider, build_config
from tokenproxy.metrics import Metrics
from tokenproxy.proxy.rules.budget import ReplayBudget
from tokenproxy.proxy.runtime import Proxy
from tokenproxy.tokens.source import TokenSource
from tokenproxy.tokens.static import StaticSource


def proxy_for(raw: dict[str, Any], registry: CollectorRegistry | None = None) -> Proxy:
    """The Proxy of *raw* (static providers only), as a daemon would build it; its metrics
    go to *registry* (a new one unless given)."""
    cfg = build_config(raw, {})
    metrics = Metrics(registry if registry is not None else CollectorRegistry(), __version__)
    sources: dict[str, TokenSource] = {}
    for name, provider in cfg.providers.items():
        assert isinstance(provider, StaticProvider), "proxy_for takes static providers"
        sources[name] = StaticSource(provider, clock=FakeClock(), metrics=metrics,
                                     redactor=log.Redactor())
    return Proxy(cfg, sources=sources, metrics=metrics,
                 budget=ReplayBudget(cfg.limits.max_replay_total, metrics))
