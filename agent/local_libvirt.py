"""The agent's own connection to the local libvirtd: health, facts, and events.

One connection is kept open; its close callback and domain lifecycle events ask the
runner for an early check-in (through `on_change`, called from libvirt's event thread).
All methods here block: the runner calls them in a worker thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import libvirt

from common import libvirt_events, wire

log = logging.getLogger(__name__)


class LocalLibvirt:
    def __init__(self, uri: str, on_change: Callable[[], None]) -> None:
        self.uri = uri
        self.on_change = on_change
        self.conn: libvirt.virConnect | None = None
        self.error: str | None = "not checked yet"
        self._lock = threading.Lock()

    def connection(self) -> libvirt.virConnect | None:
        """The open connection, reopening it if it died; None (and `error` set) if down."""
        with self._lock:
            if self.conn is not None:
                try:
                    if self.conn.isAlive():
                        return self.conn
                except libvirt.libvirtError:
                    pass
                self._drop()
            libvirt_events.start()  # before opening: libvirt binds a connection to the loop then
            try:
                conn = libvirt.open(self.uri)
            except libvirt.libvirtError as exc:
                self.error = exc.get_error_message() or str(exc)
                return None
            try:
                conn.registerCloseCallback(self._closed, None)
                conn.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE,
                                            self._domain_event, None)
            except libvirt.libvirtError as exc:
                log.warning("libvirt events unavailable on %s: %s", self.uri, exc)
            self.conn, self.error = conn, None
            return conn

    def health(self) -> wire.LibvirtdHealth:
        conn = self.connection()
        if conn is not None:
            try:
                conn.getLibVersion()  # a round trip: the daemon answers, not just the socket
            except libvirt.libvirtError as exc:
                self.error = exc.get_error_message() or str(exc)
                with self._lock:
                    self._drop()
        return wire.LibvirtdHealth(ok=self.error is None, error=self.error, uri=self.uri)

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        conn, self.conn = self.conn, None
        if conn is None:
            return
        try:
            conn.unregisterCloseCallback()
        except libvirt.libvirtError:
            pass
        try:
            conn.close()
        except libvirt.libvirtError:
            pass

    def _closed(self, _conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        log.info("local libvirt connection closed (reason %d)", reason)
        self.on_change()

    def _domain_event(self, *_args: object) -> None:
        self.on_change()


def probe(uri: str, timeout: float) -> str | None:
    """Ask libvirtd now, for `status`: None if it answers within `timeout`, else why not.
    libvirt.open has no timeout of its own (a daemon hung on NFS holds it for minutes), so
    it runs in a daemon thread that is left behind if it does not finish."""
    result: list[str | None] = []

    def ask() -> None:
        local = LocalLibvirt(uri, on_change=lambda: None)
        try:
            result.append(local.health().error)
        finally:
            local.close()

    thread = threading.Thread(target=ask, name="libvirtd-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return result[0] if result else f"no answer within {timeout:g} s"
