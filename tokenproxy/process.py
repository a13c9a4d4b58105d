"""What the command line sets on its own process, beyond the allocator (memory.py)."""

from __future__ import annotations

import ctypes
import sys
from typing import Final

PR_SET_DUMPABLE: Final = 4


def make_undumpable() -> bool:
    """Keep other processes of the same user out of this one: no ptrace, no core dump, and
    /proc/<pid>/environ, mem and maps owned by root. A tool run by ``tokenproxy exec`` runs
    as the same user; without this it could read the secrets in tokenproxy's environment and
    the tokens in its memory. False where the kernel has no prctl (not Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return False
    return bool(prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) == 0)
