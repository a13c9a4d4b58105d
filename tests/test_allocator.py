"""The C allocator's tuning (tokenproxy/memory.py): a chunk-sized block freed and taken again
costs no fresh pages, where glibc's defaults gave the heap back to the kernel after every one;
and `tokenproxy run` applies it."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.config import proxy_config
from tests.helpers.daemon_proc import running_daemon
from tests.helpers.fakes import TOKEN

# A fresh 256 KiB bytes object per cycle, as each socket read makes one; the minor page faults
# of 2,000 cycles, after 50 to settle.
CYCLES = """
import resource, sys
if sys.argv[1] == "tuned":
    from tokenproxy.memory import tune_allocator
    assert tune_allocator()
def cycle():
    chunk = bytes(bytearray(262144))
    del chunk
for _ in range(50):
    cycle()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(2000):
    cycle()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", CYCLES, mode], capture_output=True, text=True,
                          timeout=60, check=True)
    return int(done.stdout)


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_a_freed_chunk_is_reused_without_new_pages() -> None:
    plain, tuned = _faults("plain"), _faults("tuned")
    assert plain > 2000, "glibc's defaults no longer fault per chunk: this test measures nothing"
    assert tuned < plain / 100, (plain, tuned)


@pytest.mark.slow
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
async def test_tokenproxy_run_applies_the_tuning(tmp_path: Path) -> None:
    """`tokenproxy run` tunes the allocator before it serves, and its listening event says
    so (a run without the tuning would download at half speed from a fresh start)."""
    raw = proxy_config("http://127.0.0.1:9/", TOKEN)
    async with running_daemon(raw, tmp_path) as daemon:
        [event] = daemon.events("listening")
    assert event["allocator_tuned"] is True
