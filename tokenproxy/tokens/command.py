"""The ``command`` provider: run a program that prints a token (gcloud, az, vault, a script)."""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Final

from tokenproxy.config import CommandProvider
from tokenproxy.log import Redactor, get_logger
from tokenproxy.tokens.grant import Grant, GrantFailed, grant_from, strict_json
from tokenproxy.tokens.source import is_usable_token

MAX_OUTPUT: Final = 64 * 1024
MAX_STDERR_LOGGED: Final = 2048
REAP_TIMEOUT: Final = 5.0


async def _read_capped(stream: asyncio.StreamReader, cap: int) -> bytes:
    """Read to EOF or to *cap* + 1 bytes, whichever comes first."""
    chunks: list[bytes] = []
    size = 0
    while size <= cap:
        chunk = await stream.read(min(65536, cap + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


async def _read_head(stream: asyncio.StreamReader, cap: int) -> bytes:
    """Read to EOF keeping the first *cap* bytes, so a chatty stderr never blocks the command."""
    kept = bytearray()
    while chunk := await stream.read(65536):
        if len(kept) < cap:
            kept += chunk[:cap - len(kept)]
    return bytes(kept)


async def _reap(proc: asyncio.subprocess.Process) -> None:
    """Drain both pipes to EOF, then wait, within REAP_TIMEOUT. asyncio's wait() returns only
    once every pipe has closed, and a pipe left unread past its buffer (output over the cap)
    is paused and never seen closing: waiting without draining hangs forever."""
    async def drain(stream: asyncio.StreamReader | None) -> None:
        if stream is not None:
            while await stream.read(65536):
                pass

    with contextlib.suppress(Exception):
        async with asyncio.timeout(REAP_TIMEOUT):
            await asyncio.gather(drain(proc.stdout), drain(proc.stderr))
            await proc.wait()


class CommandGrantor:
    """Each login runs the command once: no shell, no stdin, a timeout and an output cap."""

    can_refresh = False
    can_login = True
    interactive = False
    initial_refresh_token: str | None = None
    login_grant = refresh_grant = "command"

    def __init__(self, cfg: CommandProvider, redactor: Redactor) -> None:
        self._cfg = cfg
        self._redactor = redactor
        self._log = get_logger(provider=cfg.name)

    async def refresh(self, refresh_token: str) -> Grant:  # pragma: no cover - never called
        raise GrantFailed("command providers do not refresh")

    async def login(self) -> Grant:
        cfg = self._cfg
        try:
            proc = await asyncio.create_subprocess_exec(
                *cfg.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,   # a timeout kills the whole process group
            )
        except OSError as exc:
            raise GrantFailed(f"cannot run {cfg.command[0]}: {exc.strerror or exc}") from None
        assert proc.stdout is not None
        assert proc.stderr is not None
        out_task = asyncio.ensure_future(_read_capped(proc.stdout, MAX_OUTPUT))
        err_task = asyncio.ensure_future(_read_head(proc.stderr, MAX_OUTPUT))
        try:
            async with asyncio.timeout(cfg.timeout):
                out = await out_task
                if len(out) > MAX_OUTPUT:   # fail at the cap, not at the timeout
                    raise GrantFailed(f"the command printed more than {MAX_OUTPUT} bytes")
                err = await err_task
                code = await proc.wait()
        except TimeoutError:
            raise GrantFailed(f"the command did not finish within {cfg.timeout:g}s") from None
        finally:
            for task in (out_task, err_task):
                task.cancel()
            await asyncio.gather(out_task, err_task, return_exceptions=True)
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, 9)
            await _reap(proc)
        grant = self._parse(out) if code == 0 else None
        if err.strip():
            text = err[:MAX_STDERR_LOGGED].decode("utf-8", "replace")
            if grant is not None:
                text = text.replace(grant.access_token, "***")
            self._log.info("command_stderr", stderr=self._redactor.scrub(text))
        if code != 0:
            raise GrantFailed(f"the command exited with status {code}")
        assert grant is not None
        return grant

    def _parse(self, out: bytes) -> Grant:
        cfg = self._cfg
        if cfg.output == "json":
            return grant_from(strict_json(out), access_pointer=cfg.access_token,
                              refresh_pointer=None, expires_pointer=cfg.expires_in)
        try:
            token = out.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise GrantFailed("the command's output is not text") from None
        if not is_usable_token(token):
            raise GrantFailed("the command printed no usable token")
        return Grant(token, None, None)
