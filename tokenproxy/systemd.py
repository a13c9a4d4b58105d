"""sd_notify(3) without a dependency: one datagram to $NOTIFY_SOCKET per state change."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping


def notify(message: str, env: Mapping[str, str] | None = None) -> bool:
    """Send *message* (e.g. ``READY=1``) to systemd; False when not under systemd or it failed.

    A leading ``@`` in NOTIFY_SOCKET names an abstract socket (a NUL byte on the wire).
    """
    env = os.environ if env is None else env
    address = env.get("NOTIFY_SOCKET", "")
    if not address or address[0] not in "@/":
        return False
    if address[0] == "@":
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
    except OSError:
        return False
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def reloading() -> bool:
    # MONOTONIC_USEC lets systemd (>= 253, Type=notify-reload) match the reload to this signal.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def stopping() -> bool:
    return notify("STOPPING=1")
