"""libvirt's default event loop in one daemon thread, shared by whoever needs it.

Keepalives, close callbacks and domain events are delivered on this thread; callers
hop back to asyncio with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import threading

import libvirt

_lock = threading.Lock()
_thread: threading.Thread | None = None


def _quiet(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; callers report them instead."""


def start() -> None:
    global _thread
    with _lock:
        if _thread is not None:
            return
        libvirt.registerErrorHandler(_quiet, None)
        libvirt.virEventRegisterDefaultImpl()

        def run() -> None:
            while True:
                libvirt.virEventRunDefaultImpl()

        _thread = threading.Thread(target=run, name="libvirt-events", daemon=True)
        _thread.start()
