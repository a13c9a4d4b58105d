"""docs/ says what the code does: every config key, metric, log event and problem cause the
code has is documented, and the repository points at nothing outside itself."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from tokenproxy import log
from tokenproxy.config.load import accepted_keys
from tokenproxy.metrics import Metrics
from tokenproxy.proxy.rules.problem import TITLES

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def _backticked(path: Path) -> set[str]:
    return set(re.findall(r"`([^`]+)`", path.read_text(encoding="utf-8")))


def test_every_config_key_is_in_the_reference() -> None:
    documented = _backticked(DOCS / "configuration.md")
    # "a / b" and "a, b" cells name two keys at once.
    names = {part.strip() for item in documented for part in re.split(r"[/,]", item)}
    missing = sorted({k for keys in accepted_keys().values() for k in keys} - names)
    assert [] == missing


def test_every_metric_is_in_the_reference() -> None:
    registry = CollectorRegistry()
    Metrics(registry, "test").shared_state()
    names = {m.name + ("_total" if m.type == "counter" else "") for m in registry.collect()}
    assert [] == sorted(names - _backticked(DOCS / "metrics.md"))


def _logged_events() -> set[str]:
    constants = {name: value for name, value in vars(log).items()
                 if name.isupper() and isinstance(value, str)}
    events: set[str] = set()
    for path in (ROOT / "tokenproxy").rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        calls = re.findall(r"\.(?:debug|info|warning|error)\(\s*([^,)]+)", text)
        for arg in calls:
            events.update(re.findall(r'"([a-z_]+)"', arg))
            events.update(constants[c] for c in re.findall(r"log\.([A-Z_]+)", arg))
    return events


def test_every_log_event_is_in_the_reference() -> None:
    events = _logged_events()
    assert len(events) > 20, "the scan found too few events: it is broken"
    assert [] == sorted(events - _backticked(DOCS / "logging.md"))


def test_every_problem_cause_is_in_the_reference() -> None:
    assert [] == sorted(set(TITLES) - _backticked(DOCS / "errors.md"))


@pytest.mark.slow
def test_nothing_points_outside_the_repository() -> None:
    """Code, tests, docs and the project file speak for themselves: no pointer at a spec or
    notes a user of tokenproxy does not have, nor at issue numbers."""
    pattern = re.compile(r"SPEC\.md|§|shared/notes|notes/security|security notes|"
                         r"\bissue [0-9]+\b|\bcommit [0-9a-f]{7,40}\b")
    files = [*ROOT.glob("tokenproxy/**/*.py"), *ROOT.glob("tests/**/*.py"),
             *ROOT.glob("docs/*.md"), ROOT / "README.md", ROOT / "CHANGELOG.md",
             ROOT / "pyproject.toml", *ROOT.glob("benchmarks/*.py")]
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in files
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if pattern.search(line) and p.name != "test_docs.py"]
    assert [] == hits
