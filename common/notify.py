"""sd_notify for Type=notify units: READY, STATUS lines a person understands, WATCHDOG.

Outside systemd (no NOTIFY_SOCKET) every call is a cheap no-op.
"""

from __future__ import annotations

import os

from systemd import daemon  # type: ignore[attr-defined]


def _send(state: str) -> None:
    if os.environ.get("NOTIFY_SOCKET"):
        daemon.notify(state)


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
