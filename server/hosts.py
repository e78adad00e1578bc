"""Host status: one pure rule that derives it, one place that records its changes.

Status is never set directly by the HTTP handlers, the sweeper or the connection
manager. Each tells `HostStatus` what it observed; `derive()` combines the admin's
intent, check-in freshness, the agent's libvirtd report and the libvirt connection
into (status, detail), and a change of either lands in the history with its time.
"""

from __future__ import annotations

import asyncio
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


SWEEP_BATCH = 500  # status changes per transaction; the event loop runs between batches


@dataclass(frozen=True)
class Change:
    """A host's new status, and whether it goes into the history."""

    status: str
    detail: str
    since: float
    record: bool


class HostStatus:
    def __init__(self, store: Store, grace: float,
                 connection_of: Callable[[str], Connection | None]) -> None:
        self.store = store
        self.grace = grace
        self.connection_of = connection_of
        # A restart is not the hosts' fault: they get a full grace period from it.
        self.started_at = time.time()

    def last_seen(self, host: Host) -> float:
        seen = host.last_checkin or host.enrolled_at
        # A host already offline before a restart stays offline until it checks in.
        return seen if host.status == OFFLINE else max(seen, self.started_at)

    def refresh(self, host_id: str) -> Host | None:
        """Re-derive one host's status from the store; returns the fresh row."""
        host = self.store.get_host(host_id)
        return None if host is None else self.refresh_host(host)

    def refresh_host(self, host: Host) -> Host:
        """Re-derive the status of `host`, a row the caller holds up to date (a check-in
        just wrote it: no second read); record it if it changed."""
        change = self._change(host, time.time())
        if change is None:
            return host
        try:
            self.store.set_status(host.id, change.status, change.detail, change.since,
                                  record=change.record)
        except sqlite3.Error as exc:
            # The store is full or read-only: the change is kept in no history, but the
            # callers (check-in, connection manager) must carry on; it is re-derived later.
            log.error("cannot record status %s for host %s: %s", change.status, host.id, exc)
            return host
        self._announce(host, change)
        return host

    def _change(self, host: Host, now: float) -> Change | None:
        status, detail = derive(host, now, self.last_seen(host), self.grace,
                                self.connection_of(host.id))
        if (status, detail) == (host.status, host.detail):
            return None
        # A new status, or a new reason for an error, is history; a progress note is not.
        transition = status != host.status or status == ERROR
        return Change(status, detail, now if transition else host.status_since, transition)

    def _announce(self, host: Host, change: Change) -> None:
        """Log a recorded change and carry it into the row the caller holds."""
        if change.record:
            level = logging.WARNING if change.status in (ERROR, OFFLINE) else logging.INFO
            event(log, "status_changed", "host %s (%s): %s -> %s: %s", host.hostname, host.id,
                  host.status, change.status, change.detail, level=level, host_id=host.id,
                  status=change.status, reason=change.detail)
        host.status, host.detail, host.status_since = change.status, change.detail, change.since

    async def sweep(self) -> None:
        """Mark hosts whose check-ins stopped as offline (and offline hosts that checked in
        as not). SQLite picks the few hosts whose freshness disagrees with their status;
        their changes are written in batches, one transaction (one fsync) each, and the
        event loop serves check-ins between batches: after an outage thousands of hosts
        may change at once, and a commit each would stall the server for seconds."""
        now = time.time()
        due = self.store.hosts_to_sweep(now - self.grace, self.started_at)
        for start in range(0, len(due), SWEEP_BATCH):
            batch = [h for h in map(self.store.get_host, due[start:start + SWEEP_BATCH]) if h]
            changes = [(h, c) for h in batch if (c := self._change(h, now)) is not None]
            self.store.set_statuses([(h.id, c.status, c.detail, c.since, c.record)
                                     for h, c in changes])
            for host, change in changes:
                self._announce(host, change)
            await asyncio.sleep(0)
