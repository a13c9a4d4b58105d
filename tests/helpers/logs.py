"""The log lines a test produced: the autouse ``logs`` fixture (tests/conftest.py) captures
them and fails any test whose logs show a secret of tests/helpers/fakes.py; and what the token
events among them say."""

from __future__ import annotations

import io
import json
from typing import Any

from tokenproxy import log


class CapturedLogs:
    """Every log line the test produced, as text and as parsed JSON events."""

    def __init__(self) -> None:
        self.stream = io.StringIO()
        self.redactor = log.Redactor()

    @property
    def text(self) -> str:
        log.flush()   # lines are batched per event-loop turn (log.BatchedWriter)
        return self.stream.getvalue()

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        for line in self.text.splitlines():
            if line.strip():
                ev = json.loads(line)
                if name is None or ev.get("event") == name:
                    out.append(ev)
        return out


def installed(logs: CapturedLogs, trigger: str) -> int:
    """New tokens of one trigger in use: token_refreshed is logged once the token is installed.
    The refresh metric counts the token endpoint's answer earlier, before the state file is
    written and the token installed: a request right after it may still carry the old one."""
    return sum(1 for ev in logs.events("token_refreshed") if ev.get("trigger") == trigger)


def failures(logs: CapturedLogs) -> list[str]:
    """The error of every token_refresh_failed event."""
    return [str(ev["error"]) for ev in logs.events("token_refresh_failed")]
