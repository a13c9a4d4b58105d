"""Running the daemon as a service: signals (TERM and INT drain, HUP reloads the file) and
what systemd is told."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Callable

from tokenproxy import log, systemd
from tokenproxy.config import Config, load_config
from tokenproxy.daemon import Daemon
from tokenproxy.errors import ConfigError, TokenProxyError
from tokenproxy.log import Redactor


async def reload_file(daemon: Daemon, redactor: Redactor) -> None:
    """SIGHUP: re-read the file; a bad one is logged and the running config kept."""
    logger = log.get_logger()
    systemd.reloading()
    try:
        source = daemon.config.source
        if source is None:
            raise ConfigError("config: this daemon was not started from a file")
        # Off the loop: a config names files, and one may block (a FIFO, a slow mount).
        new = await asyncio.to_thread(load_config, source)
        old_log = daemon.config.log
        changes = await daemon.reload(new)
        if new.log != old_log:
            log.configure(new.log.level, new.log.format, redactor=redactor)
        logger.info(log.CONFIG_RELOADED, path=str(source), **changes)
    except TokenProxyError as exc:
        logger.error(log.CONFIG_RELOAD_FAILED, error=str(exc))
    except Exception as exc:   # whatever went wrong, the running config keeps serving
        logger.error(log.CONFIG_RELOAD_FAILED, error=type(exc).__name__)
    finally:
        systemd.ready()


async def serve(
    cfg: Config, *, redactor: Redactor, on_started: Callable[[Daemon], None] | None = None,
    allocator_tuned: bool = False,
) -> int:
    """Run until SIGTERM or SIGINT, then drain within shutdown_grace; a second signal cuts the
    drain short. SIGHUP reloads the config file. systemd is told READY, RELOADING, STOPPING."""
    loop = asyncio.get_running_loop()
    daemon = Daemon(cfg, redactor=redactor, allocator_tuned=allocator_tuned)
    await daemon.start()
    if on_started is not None:
        on_started(daemon)
    systemd.ready()
    stop = asyncio.Event()
    signals = 0
    reloads: set[asyncio.Task[None]] = set()

    def on_signal(signum: int) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            systemd.stopping()
        log.get_logger().info("shutdown", signal=signal.Signals(signum).name,
                              grace_s=daemon.config.shutdown_grace if signals == 1 else 0)
        stop.set()
        if signals > 1 and drain is not None:
            drain.cancel()

    def on_hup() -> None:
        if stop.is_set():
            return
        task = asyncio.create_task(reload_file(daemon, redactor))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    drain: asyncio.Task[None] | None = None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    try:
        await stop.wait()
        for task in list(reloads):
            with contextlib.suppress(Exception):
                await task
        drain = asyncio.create_task(daemon.stop())
        try:
            await drain
        except asyncio.CancelledError:
            await daemon.stop(grace=0)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
    log.get_logger().info("stopped")
    return 0
