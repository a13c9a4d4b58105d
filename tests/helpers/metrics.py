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
    "failure" counts both kinds of failure (rejected and error), "any" every call."""
    results = {"failure": {"rejected", "error"},
               "any": {"success", "rejected", "error"}}.get(result, {result})
    return sum(
        s.value for family in daemon.registry.collect()
        if family.name == "tokenproxy_token_refresh"
        for s in family.samples
        if s.name.endswith("_total") and s.labels["provider"] == provider
        and s.labels["trigger"] == trigger and s.labels["result"] in results
        and (grant is None or s.labels["grant"] == grant))


# The outcomes of tokenproxy_auth_retries_total (docs/metrics.md).
RETRY_OUTCOMES = ("success", "failure", "upstream_error", "abandoned", "skipped", "no_new_token")


def retry_counts(daemon: Daemon, route: str = "/") -> dict[str, float]:
    """tokenproxy_auth_retries_total of *route*, by outcome (every outcome, 0 if untouched)."""
    return {o: count(daemon, "tokenproxy_auth_retries_total", route=route, outcome=o)
            for o in RETRY_OUTCOMES}
