"""The log lines a test produced: the autouse ``logs`` fixture (tests/conftest.py) captures
them and fails any test whose logs show a secret of tests/helpers/fakes.py."""

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
