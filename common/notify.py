"""sd_notify for Type=notify units: READY, STATUS lines a person understands, WATCHDOG.

Outside systemd (no NOTIFY_SOCKET) every call is a cheap no-op.
"""

from __future__ import annotations

import os
import socket


def _send(state: str) -> None:
    """sd_notify(3)'s protocol, which systemd keeps stable for programs to speak themselves:
    one datagram to $NOTIFY_SOCKET ("@" for the abstract namespace). python3-systemd's
    `daemon.notify` would load libsystemd and its libraries: 0.7 MB of every process."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.sendto(state.encode(), address)


def ready(status: str) -> None:
    _send(f"READY=1\nSTATUS={status}")


def status(text: str) -> None:
    _send(f"STATUS={text}")


def watchdog() -> None:
    _send("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """How often to ping (half the unit's WatchdogSec=), or None when no watchdog is
    set for this process (as sd_watchdog_enabled reads WATCHDOG_USEC and WATCHDOG_PID)."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


def stopping() -> None:
    _send("STOPPING=1\nSTATUS=shutting down")
