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


def stopping() -> None:
    _send("STOPPING=1\nSTATUS=shutting down")
