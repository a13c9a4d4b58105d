"""Reading an in-process daemon's metrics (its own CollectorRegistry)."""

from __future__ import annotations

from tokenproxy.daemon import Daemon


def metric(daemon: Daemon, name: str, **labels: str) -> float | None:
    """A sample's value; None for a series never touched."""
    return daemon.registry.get_sample_value(name, labels)


def count(daemon: Daemon, name: str, **labels: str) -> float:
    """A counter's (or gauge's) value; a series never touched counts 0."""
    return metric(daemon, name, **labels) or 0.0


def refreshes(daemon: Daemon, trigger: str, result: str = "success",
              provider: str = "idp", grant: str | None = None) -> float:
    """Token-endpoint calls of one trigger, over every grant unless one is named; result
    "failure" counts both kinds of failure (rejected and error)."""
    results = {"rejected", "error"} if result == "failure" else {result}
    return sum(
        s.value for family in daemon.registry.collect()
        if family.name == "tokenproxy_token_refresh"
        for s in family.samples
        if s.name.endswith("_total") and s.labels["provider"] == provider
        and s.labels["trigger"] == trigger and s.labels["result"] in results
        and (grant is None or s.labels["grant"] == grant))
