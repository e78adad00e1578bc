"""Host status: one pure rule that derives it, one place that records its changes.

Status is never set directly by the HTTP handlers, the sweeper or the link manager.
Each tells `HostStatus` what it observed; `derive()` combines the admin's intent,
check-in freshness, the agent's libvirtd report and the libvirt connection into
(status, detail), and a change of either lands in the history with its time.
`dial_blocker()` is the one readiness rule: why the server may not open the host's
libvirt connection now (derive shows the same reason as the status).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from common import wire
from common.logs import event
from server.model import AdminState, Connection, Host, LinkState, Status, Transport
from server.ratelimit import RateLimiter
from server.store import Store, StoreError

log = logging.getLogger(__name__)

SWEEP_BATCH = 500  # status changes per transaction; the event loop runs between batches
LOG_RATE, LOG_BURST = 0.1, 6.0  # status lines per second per host, and the burst allowed


def _clock(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def dial_blocker(host: Host, silent: str | None) -> tuple[Status, str] | None:
    """Why the server may not open (or keep trying to open) the host's libvirt connection,
    as the status to show; None when it may. `silent`: the words for "no check-in within
    the grace period", or None while the host checks in."""
    if host.admin_state == AdminState.DISABLED:
        return Status.DISABLED, "disabled by an administrator; its libvirt connection is closed"
    if host.admin_state == AdminState.PENDING:
        return Status.PENDING, f"enrolled; waiting for approval: virtfleet-server hosts enable {host.id}"
    if silent is not None:
        return Status.OFFLINE, silent
    asked = host.report.role
    if not wire.role_within(asked, host.role_limit):
        return Status.ERROR, (f"the agent asks for role {asked}, beyond what its "
                              f"join token allows ({host.role_limit}); its check-ins are refused "
                              f"until `role` in the host's agent.toml is within it")
    libvirtd = host.report.libvirtd
    if not libvirtd.ok:
        return Status.ERROR, f"libvirtd is down on the host: {libvirtd.error or 'no answer'}"
    if host.report.libvirt_endpoint is None and host.transport != Transport.TUNNEL:
        return Status.CONNECTING, ("waiting for the agent to report libvirtd's TLS endpoint (an "
                                   "agent with configure_tls = false is reached only through a "
                                   "tunnel: hosts set-transport ID tunnel)")
    return None


def derive(host: Host, now: float, last_seen: float, grace: float,
           conn: Connection | None) -> tuple[Status, str]:
    """The status a host should show, and why, in words a person acts on."""
    silent = None
    if now - last_seen > grace:
        silent = (f"no check-in since {_clock(last_seen)} (grace period {grace:g} s): is the "
                  "agent running and can it reach the server?")
        if conn is not None and conn.state == LinkState.ONLINE and host.admin_state == AdminState.ENABLED:
            # libvirt still answers (keepalive): desktops run and the engine can use the
            # host; only the agent is silent.
            return Status.ONLINE, (f"{conn.detail}; warning: the agent has not checked in since "
                                   f"{_clock(last_seen)} (is virtfleet-agent running?)")
    blocked = dial_blocker(host, silent)
    if blocked is not None:
        return blocked
    if conn is None:
        return Status.CONNECTING, "opening the libvirt connection"
    return Status(conn.state), conn.detail


@dataclass(frozen=True)
class Change:
    """A host's new status, and whether it goes into the history."""

    status: Status
    detail: str
    since: float
    record: bool


class HostStatus:
    """Re-derives and records hosts' status. `links`: each host's connection state, as the
    link manager keeps it (read here, written there)."""

    def __init__(self, store: Store, grace: float, links: Mapping[str, Connection],
                 on_change: Callable[[Host], object] = lambda _host: None,
                 owns: Callable[[str], bool] = lambda _id: True) -> None:
        """`on_change(host)`: after each change of a host's status or detail; `owns(id)`:
        whether this server owns the enabled host (server/replicas.py): only its owner,
        which holds its connection, derives its status."""
        self.store = store
        self.owns = owns
        self.on_change = on_change
        self.grace = grace
        self.links = links
        # A restart is not the hosts' fault: they get a full grace period from it.
        self.started_at = time.time()
        # What was last logged per host: a retry loop failing the same way is one line,
        # and a host whose status churns gets a few lines a minute, not one per change.
        self._logged: dict[str, tuple[str, str]] = {}
        self._log_budget = RateLimiter(LOG_RATE, LOG_BURST)
        self._unlogged: dict[str, int] = {}

    def last_seen(self, host: Host) -> float:
        seen = host.last_checkin or host.enrolled_at
        # A host already offline before a restart stays offline until it checks in.
        return seen if host.status == Status.OFFLINE else max(seen, self.started_at)

    def refresh(self, host_id: str) -> Host | None:
        """Re-derive one host's status from the store; returns the fresh row (None when
        the host is gone, or the store cannot be read now: it is re-derived later)."""
        try:
            host = self.store.get_host(host_id)
        except StoreError as exc:
            log.debug("host %s: status not re-derived now: %s", host_id, exc)
            return None
        return None if host is None else self.refresh_host(host)

    def refresh_host(self, host: Host) -> Host:
        """Re-derive the status of `host`, a row the caller holds up to date (a check-in
        just wrote it: no second read); record it if it changed."""
        if host.admin_state == AdminState.ENABLED and not self.owns(host.id):
            return host
        change = self._change(host, time.time())
        if change is None:
            return host
        try:
            self.store.set_statuses([(host.id, change.status, change.detail, change.since,
                                      change.record)])
        except StoreError as exc:
            # The store is full or read-only: the change is kept in no history, but the
            # callers (check-in, link manager) must carry on; it is re-derived later.
            log.error("cannot record status %s for host %s: %s", change.status, host.id, exc)
            return host
        self._announce(host, change)
        return host

    def _change(self, host: Host, now: float) -> Change | None:
        status, detail = derive(host, now, self.last_seen(host), self.grace,
                                self.links.get(host.id))
        if (status, detail) == (host.status, host.detail):
            return None
        # A new status, or a new reason for an error, is history; a progress note is not,
        # and neither is a retry's "connecting" after an error (the retry counts on the
        # error's row when it fails the same way again).
        retry = host.status == Status.ERROR and status == Status.CONNECTING
        transition = (status != host.status or status == Status.ERROR) and not retry
        return Change(status, detail, now if status != host.status else host.status_since,
                      transition)

    def _announce(self, host: Host, change: Change) -> None:
        """Log a recorded change and carry it into the row the caller holds."""
        said = (change.status, change.detail)
        if change.record and self._logged.get(host.id) != said:
            self._logged[host.id] = said
            self._log_change(host, change)
        host.status, host.detail, host.status_since = change.status, change.detail, change.since
        self.on_change(host)

    def _log_change(self, host: Host, change: Change) -> None:
        if not self._log_budget.allow(host.id):
            self._unlogged[host.id] = self._unlogged.get(host.id, 0) + 1
            return
        skipped = self._unlogged.pop(host.id, 0)
        more = f" ({skipped} earlier changes not logged: see hosts show)" if skipped else ""
        level = logging.WARNING if change.status in (Status.ERROR, Status.OFFLINE) else logging.INFO
        event(log, "status_changed", "host %s (%s): %s -> %s: %s%s", host.hostname, host.id,
              host.status, change.status, change.detail, more, level=level, host_id=host.id,
              status=change.status, reason=change.detail)

    async def sweep(self) -> None:
        """Mark hosts whose check-ins stopped as offline (and offline hosts that checked in
        as not). SQLite picks the few hosts whose freshness disagrees with their status;
        their changes are written in batches, one transaction (one fsync) each, and the
        event loop serves check-ins between batches: after an outage thousands of hosts
        may change at once, and a commit each would stall the server for seconds."""
        now = time.time()
        due = [h for h in self.store.hosts_to_sweep(now - self.grace, self.started_at)
               if self.owns(h)]
        for start in range(0, len(due), SWEEP_BATCH):
            batch = [h for h in map(self.store.get_host, due[start:start + SWEEP_BATCH]) if h]
            changes = [(h, c) for h in batch if (c := self._change(h, now)) is not None]
            self.store.set_statuses([(h.id, c.status, c.detail, c.since, c.record)
                                     for h, c in changes])
            for host, change in changes:
                self._announce(host, change)
            await asyncio.sleep(0)
