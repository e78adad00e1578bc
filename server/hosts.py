"""Host status: one pure rule that derives it, one place that records its changes.

Status is never set directly by the HTTP handlers, the sweeper or the connection
manager. Each tells `HostStatus` what it observed; `derive()` combines the admin's
intent, check-in freshness, the agent's libvirtd report and the libvirt connection
into (status, detail), and a change of either lands in the history with its time.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass

from common.logs import event
from server.store import Host, Store

log = logging.getLogger(__name__)

PENDING, CONNECTING, ONLINE, ERROR, OFFLINE, DISABLED = (
    "pending", "connecting", "online", "error", "offline", "disabled")


@dataclass(frozen=True)
class Connection:
    """What the connection manager knows about one host's libvirt connection."""

    state: str  # connecting | online | error
    detail: str


def derive(host: Host, now: float, last_seen: float, grace: float,
           conn: Connection | None) -> tuple[str, str]:
    """The status a host should show, and why, in words a person acts on."""
    if host.admin_state == "disabled":
        return DISABLED, "disabled by an administrator; its libvirt connection is closed"
    if host.admin_state == "pending":
        return PENDING, f"enrolled; waiting for approval: virtfleet-server hosts enable {host.id}"
    if now - last_seen > grace:
        return OFFLINE, (f"no check-in since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(last_seen))}"
                         f" (grace period {grace:g} s): is the agent running and can it "
                         "reach the server?")
    libvirtd = host.report.get("libvirtd") or {}
    if not libvirtd.get("ok", False):
        reason = libvirtd.get("error") or "no answer"
        return ERROR, f"libvirtd is down on the host: {reason}"
    if not host.report.get("libvirt_endpoint"):
        return CONNECTING, "waiting for the agent to report libvirtd's TLS endpoint"
    if conn is None:
        return CONNECTING, "opening the libvirt connection"
    return conn.state, conn.detail


class HostStatus:
    def __init__(self, store: Store, grace: float,
                 connection_of: Callable[[str], Connection | None]) -> None:
        self.store = store
        self.grace = grace
        self.connection_of = connection_of
        # A restart is not the hosts' fault: they get a full grace period from it.
        self.started_at = time.time()

    def last_seen(self, host: Host) -> float:
        return max(host.last_checkin or host.enrolled_at, self.started_at)

    def refresh(self, host_id: str) -> Host | None:
        """Re-derive one host's status; record it if it changed. Returns the fresh row."""
        host = self.store.get_host(host_id)
        if host is None:
            return None
        now = time.time()
        status, detail = derive(host, now, self.last_seen(host), self.grace,
                                self.connection_of(host_id))
        if (status, detail) == (host.status, host.detail):
            return host
        # A new status, or a new reason for an error, is history; a progress note is not.
        transition = status != host.status or status == ERROR
        try:
            self.store.set_status(host_id, status, detail, now if transition else host.status_since,
                                  record=transition)
        except sqlite3.Error as exc:
            # The store is full or read-only: the change is kept in no history, but the
            # callers (check-in, connection manager) must carry on; it is re-derived later.
            log.error("cannot record status %s for host %s: %s", status, host_id, exc)
            return host
        if transition:
            level = logging.WARNING if status in (ERROR, OFFLINE) else logging.INFO
            event(log, "status_changed", "host %s (%s): %s -> %s: %s", host.hostname, host_id,
                  host.status, status, detail, level=level, host_id=host_id, status=status,
                  reason=detail)
            host.status_since = now
        host.status, host.detail = status, detail
        return host

    def sweep(self) -> list[tuple[str, str, str, float]]:
        """Mark hosts whose check-ins stopped as offline (and nothing else); returns the
        liveness rows it read."""
        now = time.time()
        liveness = self.store.liveness()
        for host_id, admin_state, status, seen in liveness:
            stale = now - max(seen, self.started_at) > self.grace
            if admin_state == "enabled" and stale != (status == OFFLINE):
                self.refresh(host_id)
        return liveness
