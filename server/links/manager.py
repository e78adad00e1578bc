"""The link manager: one libvirt connection per enabled host, kept up.

Per host, one asyncio task loops: wait until the host may be dialled (hosts.dial_blocker),
open the link (the opener), report `online`, then wait for it to close (libvirt's close
callback, keepalive included, or the relay ending) or for the admin to disable or forget
the host. Every failure becomes `Connection(ERROR, detail)` in words a person acts on,
and the retry waits on a capped, jittered backoff that a "libvirtd is back" check-in
cuts short.

The manager knows nothing of libvirt's calls or the network: it is handed an opener
(`Opener`), a way to read a host (`host_of`) and what to tell when a host's connection
state changes (`on_change`). Its state machine is tested with a fake opener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from common.backoff import Backoff
from common.logs import event
from server.hosts import dial_blocker
from server.links.direct import Target
from server.links.opener import Needs, OpenError, OpenLink
from server.model import AdminState, Connection, Host, LinkState, Status

log = logging.getLogger(__name__)

class Opener(Protocol):
    async def open(self, target: Target, needs: Needs) -> OpenLink: ...
    async def close(self, link: OpenLink) -> None: ...


class Ways(Protocol):
    """Which way reaches a host (links/routes.Routes)."""

    def target(self, host: Host) -> Target: ...
    def waiting(self, host: Host) -> str | None: ...
    def direct_failed(self, host: Host, reason: str) -> bool: ...
    def describe(self, host: Host) -> dict[str, Any]: ...


@dataclass
class Link:
    """One host's connection and what is known about it."""

    host_id: str
    task: asyncio.Task[None] | None = None
    opened: OpenLink | None = None
    connected_since: float | None = None
    last_error: str = ""
    last_error_at: float | None = None
    tries: int = 0  # failed opens since the last success
    wake: asyncio.Event | None = None
    idle: bool = False  # waiting for the host to become ready, not in a backoff


@dataclass
class LinkCounts:
    """Running totals, for metrics."""

    opens: int = 0
    failures: int = 0
    lost: int = 0  # open connections that closed by themselves


def may_dial(host: Host | None) -> bool:
    return host is not None and dial_blocker(
        host, "offline" if host.status == Status.OFFLINE else None) is None


def needs_of(host: Host) -> Needs:
    return Needs(role=host.role, kvm_problem=reported_kvm_problem(host.report.facts))


def reported_kvm_problem(facts: dict[str, Any]) -> str:
    """The agent's words for why KVM is unusable, if its facts (free-form, so any shape)
    have them."""
    found: Any = facts
    for key in ("kvm", "data", "problem"):
        found = found.get(key) if isinstance(found, dict) else None
    return found if isinstance(found, str) else ""


class LinkManager:
    def __init__(self, opener: Opener, ways: Ways, host_of: Callable[[str], Host | None],
                 states: dict[str, Connection], on_change: Callable[[str], object],
                 on_served: Callable[[str, str], object] = lambda _id, _serial: None,
                 owns: Callable[[str], bool] = lambda _id: True) -> None:
        """`ways`: the way to each host; `states`: where each host's connection state is
        kept for the status rule to read; `on_change(host_id)` after each change of it;
        `on_served(host_id, serial)` after a link opened with that libvirtd certificate;
        `owns(host_id)`: whether this server is the one to connect (server/replicas.py)."""
        self.opener = opener
        self.ways = ways
        self.host_of = host_of
        self.states = states
        self.on_change = on_change
        self.on_served = on_served
        self.owns = owns
        self.links: dict[str, Link] = {}
        self.counts = LinkCounts()
        self._started = False

    # -- what the rest of the server reads ------------------------------------------

    def describe(self, host_id: str) -> dict[str, Any]:
        host = self.host_of(host_id)
        transport = {"transport": self.ways.describe(host)} if host is not None else {}
        link = self.links.get(host_id)
        if link is None:
            return {"state": "closed"} | transport
        state = self.states.get(host_id)
        opened = link.opened
        return transport | {
            "state": state.state if state else "waiting",
            "uri": opened.uri if opened else "",
            "connected_since": link.connected_since,
            "remote_libvirt_version": opened.remote_version if opened else "",
            "last_error": link.last_error,
            "last_error_at": link.last_error_at,
            "tries": link.tries,
        }

    # -- lifecycle --------------------------------------------------------------

    def start(self, hosts: Iterable[Host]) -> None:
        self._started = True
        for host in hosts:
            self.host_changed(host.id, host=host)

    async def stop(self) -> None:
        tasks = [link.task for link in self.links.values() if link.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.links.clear()

    def host_changed(self, host_id: str, libvirtd_recovered: bool = False,
                     host: Host | None = None) -> None:
        """Something about the host changed (check-in, admin action): start, stop or wake
        its task. `host`: its current row, when the caller holds one. Cheap when nothing
        needs doing (every check-in calls it); nothing happens before start()."""
        if not self._started:
            return
        if not self.owns(host_id):  # decided without the host's row: the store may be gone
            self._drop(host_id)
            return
        if host is None:
            host = self.host_of(host_id)
        if host is None or host.admin_state != AdminState.ENABLED:
            self._drop(host_id)
            return
        link = self.links.get(host_id)
        if link is None:
            link = self.links[host_id] = Link(host_id)
        ready = may_dial(host)
        if link.task is None:
            # Started once the host is ready: a host that never reports a TLS endpoint
            # costs a Link, not a task.
            if ready:
                link.wake = asyncio.Event()
                link.task = asyncio.create_task(self._run(link), name=f"libvirt-{host_id}")
        elif libvirtd_recovered or (link.idle and ready):
            # A backoff in progress is cut short only by news that libvirtd is back.
            assert link.wake is not None
            link.wake.set()

    def reconnect(self, host_id: str) -> None:
        """Open the connection afresh (after a role change, say) so every check runs again."""
        self._drop(host_id)
        self.host_changed(host_id)

    def _drop(self, host_id: str) -> None:
        link = self.links.pop(host_id, None)
        if link is not None and link.task:
            link.task.cancel()
        if self.states.pop(host_id, None) is not None:
            self.on_change(host_id)

    # -- the per-host loop --------------------------------------------------------

    async def _run(self, link: Link) -> None:
        backoff = Backoff(base=1.0, cap=60.0)
        assert link.wake is not None
        try:
            while True:
                link.wake.clear()
                host = self.host_of(link.host_id)
                if not may_dial(host):
                    link.idle = True
                    await link.wake.wait()
                    link.idle = False
                    continue
                assert host is not None
                waiting = self.ways.waiting(host)
                if waiting is not None:
                    # An error once something failed (a tunnel lost, say); a new host's
                    # first wait for its tunnel is only connecting.
                    self._set(link, Connection(LinkState.ERROR if link.last_error
                                               else LinkState.CONNECTING, waiting))
                    link.idle = True
                    await link.wake.wait()  # a tunnel opening wakes it
                    link.idle = False
                    continue
                if await self._open(link, host):
                    backoff.reset()
                    await self._wait_closed(link, host)
                    continue
                await _wait(link.wake, backoff.next_delay())
        finally:
            if link.opened is not None:
                opened, link.opened = link.opened, None
                await asyncio.shield(self.opener.close(opened))

    async def _open(self, link: Link, host: Host) -> bool:
        target = self.ways.target(host)
        self._set(link, Connection(LinkState.CONNECTING, f"opening {target.uri}"))
        try:
            opened = await self.opener.open(target, needs_of(host))
        except OpenError as exc:
            if exc.dial_failed and not target.tunnel and self.ways.direct_failed(host, str(exc)):
                self._set(link, Connection(LinkState.CONNECTING, f"{exc}; asking the host's "
                                                                 "agent to open a tunnel instead"))
                return False
            link.tries += 1
            self.counts.failures += 1
            self._fail(link, str(exc))
            return False
        self.counts.opens += 1
        link.opened, link.connected_since, link.tries = opened, time.time(), 0
        self._set(link, Connection(LinkState.ONLINE, f"libvirt connection open (libvirt "
                                                     f"{opened.remote_version}, role {host.role})"))
        event(log, "connection_open", "host %s: libvirt connection open at %s", host.hostname,
              opened.uri, host_id=link.host_id)
        if opened.serial:
            self.on_served(link.host_id, opened.serial)
        return True

    async def _wait_closed(self, link: Link, host: Host) -> None:
        assert link.opened is not None
        await link.opened.closed.wait()
        opened, link.opened, link.connected_since = link.opened, None, None
        self.counts.lost += 1
        reason = opened.close_reason or "closed"
        await self.opener.close(opened)
        event(log, "connection_lost", "host %s: libvirt connection lost: %s", host.hostname, reason,
              level=logging.WARNING, host_id=link.host_id, reason=reason)
        self._fail(link, f"libvirt connection lost: {reason}; reconnecting")

    def _fail(self, link: Link, detail: str) -> None:
        link.last_error, link.last_error_at = detail, time.time()
        self._set(link, Connection(LinkState.ERROR, detail))

    def _set(self, link: Link, state: Connection) -> None:
        if self.links.get(link.host_id) is not link:
            return  # dropped (disabled, forgotten) while this task wound down
        self.states[link.host_id] = state
        self.on_change(link.host_id)


async def _wait(event_: asyncio.Event, timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event_.wait(), timeout)
