"""systemd's readiness protocol: datagrams to $NOTIFY_SOCKET; nothing when it is unset."""

from __future__ import annotations

import os
import socket
import time


def notify(*states: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    message = "\n".join(states).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message)
    except OSError:
        return False
    return True


def ready() -> bool:
    return notify("READY=1")


def reloading() -> bool:
    # systemd 257 and later wait forever for a reload that carries no MONOTONIC_USEC.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog_period() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when not watched."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        period = int(usec) / 2e6
    except ValueError:
        return None
    return period if period > 0 else None


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def status(text: str) -> bool:
    """STATUS=: one line that `systemctl status` shows (see `state.summary`)."""
    return notify(f"STATUS={' '.join(text.split())}")
