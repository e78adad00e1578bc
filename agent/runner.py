"""The agent's run loop (after Tailscale's controlclient): one runner owns the tasks.

- check-in: one `checkin.check_in` call, then wait the interval the server returned
  (clamped), or less when something changed (a coalescing `early` event), or a jittered
  backoff after a failure; it ends, and the agent with it, when the server refuses this
  host's identity (forgotten, or its certificate expired): only a new join helps;
- certificates: the certificate manager's own task (agent/certs.py), told when the
  server asks for a renewal;
- libvirtd watch: while the local libvirtd is down, probe it every second so its return
  is reported at once, not at the next tick;
- systemd's watchdog: pinged while every loop is alive and no check-in hangs.

`start()` and `shutdown()` are the whole interface (and `wait()` for the end); shutdown
cancels and awaits all.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING, Any

from agent import collectors
from agent.certs import CertManager, renewal_time
from agent.checkin import (
    Acked,
    Outcome,
    StatusBook,
    Verdict,
    check_in,
    clamp_interval,
    follow_server,
    retry_delay,
)
from agent.client import ServerClient
from agent.config import AgentConfig
from agent.local_libvirt import LocalLibvirt
from agent.state import Enrollment, State
from common import notify, wire
from common.backoff import Backoff
from common.logs import event

if TYPE_CHECKING:
    from agent.tunnel import TunnelKeeper

__all__ = ["HUNG_CHECKIN", "Runner", "renewal_time"]

log = logging.getLogger(__name__)

REFUSED_WAIT = 300.0  # refused (not for its identity): retrying is noise, but do notice a fix
# Refused for its role, the host still checks in at the pace it had (the server records
# those check-ins, and shows the host in error saying what to change rather than offline).
ROLE_REFUSED_PACE = 10.0  # before the server ever said an interval: its default
LIBVIRTD_PROBE = 1.0
# The server named a URL this host could not check in at: try it again this much later.
MOVE_RETRY = 600.0
# A check-in (collecting facts and one call) running longer than this hangs: the watchdog
# pings stop and systemd restarts the agent. Renewals have their own deadline.
HUNG_CHECKIN = 180.0


FACTS_PROBE = 15.0
SYSFS_FACTS = ("kvm", "memory", "numa", "pci")  # collectors that read only /proc and /sys


def sysfs_facts(facts: dict[str, Any]) -> Any:
    """The /proc and /sys facts of a report, without their usage figures."""
    return wire.steady({name: (facts.get(name) or {}).get("data") for name in SYSFS_FACTS})


def read_sysfs_facts() -> Any:
    return sysfs_facts(collectors.run_all(collectors.Context(), SYSFS_FACTS))


def _clock(when: float | None) -> str:
    """A time of day for STATUS= lines: unlike "N s ago" it stays true until replaced."""
    return time.strftime("%H:%M:%S", time.localtime(when)) if when else "never"


class Runner:
    def __init__(self, config: AgentConfig, state: State, enrollment: Enrollment) -> None:
        self.config = config
        self.state = state
        self.enrollment = enrollment
        self.certs = CertManager(config, state, enrollment.server_url, enrollment.host_id)
        self.client = ServerClient(enrollment.server_url, self.certs.current)
        self.early = asyncio.Event()
        self.local = LocalLibvirt(config.libvirt.uri, on_change=self._libvirt_changed)
        self.backoff = Backoff(base=1.0, cap=60.0)
        self.book = StatusBook(state)
        self.refused: Outcome | None = None  # the refusal that ended the check-in loop
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._checkin_since: float | None = None  # monotonic start of the running check-in
        self.reported_libvirtd_ok: bool | None = None  # what the server last heard
        self._reported_down = asyncio.Event()
        self._libvirtd_up: bool | None = None  # as last seen, for the up/down events
        self._move_tried = -MOVE_RETRY  # monotonic time of the last try at a new server URL
        self.sent_facts: Any = None  # the /sys facts, as the server last heard them
        self.acked: Acked | None = None  # the report the server last acknowledged
        self.reconnect_window = 0.0  # the server's, from its last answer
        self.tunnel: TunnelKeeper | None = None  # made once the server first asks for one
        # The last interval the server gave (clamped), by this process or an earlier one.
        interval = self.book.last.get("interval")
        self._interval = clamp_interval(interval) if isinstance(interval, (int, float)) \
            else ROLE_REFUSED_PACE

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.book.last.get("tunnel_wanted"):
            # The server asked for one last time (or at `join`): open it alongside the first
            # check-in rather than after it (a restart, a join: the host is online sooner).
            self._want_tunnel(True)
        self.certs.start()
        assert self.certs.task is not None
        self._tasks = [asyncio.create_task(self._checkin_loop(), name="checkin"),
                       asyncio.create_task(self._libvirtd_watch(), name="libvirtd-watch"),
                       asyncio.create_task(self._facts_watch(), name="facts-watch"),
                       self.certs.task]
        interval = notify.watchdog_interval()
        if interval is not None:
            self._tasks.append(asyncio.create_task(self._watchdog(interval), name="watchdog"))

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.tunnel is not None:
            await self.tunnel.stop()
        self.client.close()
        await asyncio.to_thread(self.local.close)

    async def wait(self) -> Outcome | None:
        """Until a loop ends: the check-in loop when the server refused this host's identity
        (that refusal is returned); any other end is a bug, and its exception propagates."""
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
        return self.refused

    def _libvirt_changed(self) -> None:
        """From libvirt's event thread: ask for an early check-in."""
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self.early.set)

    # -- check-in -------------------------------------------------------------

    async def _checkin_loop(self) -> None:
        while True:
            self.early.clear()
            self._checkin_since = time.monotonic()
            delay = await self.checkin_once()
            self._checkin_since = None
            if delay is None:
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.early.wait(), delay)

    async def checkin_once(self) -> float | None:
        """One check-in; how long to wait before the next, or None to stop."""
        outcome = await check_in(self.client, self.config, self.state, self.local, self.acked)
        self._saw_libvirtd(outcome.report.libvirtd.ok)
        delay = self._succeeded(outcome) if outcome.ok else self._failed(outcome)
        if outcome.answer is not None:
            self._keep_replicas(outcome.answer)
        self.book.record(outcome, delay, self.tunnel.describe() if self.tunnel else None)
        if outcome.answer is not None and time.monotonic() - self._move_tried >= MOVE_RETRY:
            await self._follow(outcome.answer)
        return delay

    async def _follow(self, answer: wire.CheckinResponse) -> None:
        """Move to the URL the server names, if it names another."""
        moved = await follow_server(answer, self.enrollment, self.state, self.config,
                                    self.local, self.certs)
        if moved is None:
            if answer.server_urls and self.enrollment.server_url not in answer.server_urls:
                self._move_tried = time.monotonic()  # failed, or set by hand: not every tick
            return
        self.client.close()
        self.client = moved
        if self.tunnel is not None:
            self.tunnel.move(self.enrollment.server_url)

    def _keep_replicas(self, answer: wire.CheckinResponse) -> None:
        """The check-in went to a replica other than the enrolled URL (that one stopped
        answering): this one is the server now. And the replicas' URLs are kept for the
        next time one stops answering."""
        moved = self.client.url != self.enrollment.server_url
        if moved:
            event(log, "server_moved", "checking in with %s now (%s did not answer)", self.client.url,
                  self.enrollment.server_url, host_id=self.enrollment.host_id)
            self.enrollment.server_url = self.certs.url = self.client.url
            if self.tunnel is not None:
                self.tunnel.move(self.client.url)
        if moved or (answer.server_urls and answer.server_urls != self.enrollment.replica_urls):
            self.enrollment.replica_urls = list(answer.server_urls)
            try:
                self.state.update_enrollment(self.enrollment)
            except OSError as exc:
                log.warning("cannot save the server's replicas: %s", exc)

    def _next_replica(self) -> None:
        """The server did not answer, or answered that it cannot serve (5xx): the next
        check-in goes to the next replica it named (after the same jittered wait, so the
        hosts of a replica that died do not all arrive at another at once)."""
        ring = self.enrollment.replica_urls
        if len(ring) < 2 or self.enrollment.server_url_by_hand:
            return
        current = self.client.url
        after = ring[(ring.index(current) + 1) % len(ring)] if current in ring else ring[0]
        if after == current:
            return
        log.warning("%s does not serve this host now: the next check-in goes to %s", current, after)
        self.client.close()
        self.client = ServerClient(after, self.certs.current)

    def _succeeded(self, outcome: Outcome) -> float:
        answer = outcome.answer
        assert answer is not None
        self.backoff.reset()
        self.acked = outcome.acked
        self.sent_facts = sysfs_facts(outcome.report.facts)
        self.reported_libvirtd_ok = outcome.report.libvirtd.ok
        if not outcome.report.libvirtd.ok:
            self._reported_down.set()
        detail = "" if answer.status == "online" else f": {answer.detail}"
        notify.status(f"{answer.status} as {outcome.report.hostname} (host {answer.host_id})"
                      f"{detail}; last check-in {_clock(time.time())}")
        if answer.renew:
            self.certs.request()  # in its own task: this check-in is done
        self._interval = clamp_interval(answer.checkin_interval)
        self.reconnect_window = answer.reconnect_window
        self._want_tunnel(answer.tunnel)
        return self._interval

    def _want_tunnel(self, wanted: bool) -> None:
        if wanted and self.tunnel is None:
            from agent.tunnel import TunnelKeeper  # h2: loaded only where a tunnel is used

            self.tunnel = TunnelKeeper(self.enrollment.server_url, self.state.client_context,
                                       self.config.libvirt.socket, self.enrollment.host_id)
        if self.tunnel is not None:
            self.tunnel.want(wanted)

    def _failed(self, outcome: Outcome) -> float | None:
        host_id = self.enrollment.host_id
        if outcome.verdict is Verdict.IDENTITY_GONE:
            event(log, "checkin_refused", "the server refuses this host's identity: %s; the "
                  "agent stops", outcome.message, level=logging.ERROR, host_id=host_id,
                  reason=outcome.message)
            notify.status(f"refused by the server: {outcome.message}")
            self.refused = outcome
            return None
        if outcome.verdict in (Verdict.ROLE_REFUSED, Verdict.REFUSED):
            if self.book.last.get("error") != outcome.message:  # said once, not every tick
                event(log, "checkin_refused", "the server refuses this check-in: %s",
                      outcome.message, level=logging.ERROR, host_id=host_id,
                      reason=outcome.message)
            notify.status(f"refused by the server: {outcome.message}")
            return self._interval if outcome.verdict is Verdict.ROLE_REFUSED else REFUSED_WAIT
        assert outcome.error is not None
        delay = retry_delay(self.backoff, outcome.error, self.reconnect_window)
        if outcome.error.status is None or outcome.error.status >= 500:
            self._next_replica()
        log.warning("check-in failed (%s); retrying in %.1f s", outcome.message, delay)
        notify.status(f"cannot check in with {self.enrollment.server_url}: {outcome.message}; "
                      f"next try at {_clock(time.time() + delay)}, last success "
                      f"{_clock(self.book.last.get('last_success'))}")
        return delay

    # -- systemd's watchdog --------------------------------------------------------

    def _healthy(self) -> bool:
        """Every loop runs and no check-in hangs. A server that is down or refuses this
        host is not the agent's illness: a restart would not cure it."""
        since = self._checkin_since
        return (all(not task.done() for task in self._tasks)
                and (since is None or time.monotonic() - since < HUNG_CHECKIN))

    async def _watchdog(self, interval: float) -> None:
        while True:
            if self._healthy():
                notify.watchdog()
            await asyncio.sleep(interval)

    # -- facts watch ----------------------------------------------------------------

    async def _facts_watch(self) -> None:
        """What an engine schedules on and only an operator changes (hugepages reserved, a
        GPU given to another driver, KVM loaded): read from /proc and /sys every
        FACTS_PROBE seconds, no libvirt call, and reported at once when it differs from what
        the server last heard, not a whole interval later."""
        while True:
            await asyncio.sleep(FACTS_PROBE)
            await self.probe_facts()

    async def probe_facts(self) -> None:
        seen = await asyncio.to_thread(read_sysfs_facts)
        if self.sent_facts is not None and seen != self.sent_facts:
            self.early.set()

    # -- libvirtd watch -------------------------------------------------------------

    async def _libvirtd_watch(self) -> None:
        """Probe libvirtd; check in early when the server was last told otherwise. While
        the last report said "down" it probes every second: libvirtd killed and restarted
        between two probes was seen down only by the check-in its close callback set off,
        and its return then waited for the next regular check-in (10 s, bench/detect.py)."""
        while True:
            up = (await asyncio.to_thread(self.local.connection)) is not None
            self._saw_libvirtd(up)
            told = self.reported_libvirtd_ok
            if told is not None and up != told and self.book.last.get("ok"):
                self.early.set()  # (not while check-ins fail: their backoff stands)
            steady = up and told is not False
            self._reported_down.clear()
            with contextlib.suppress(asyncio.TimeoutError):  # a "down" report ends a long sleep
                await asyncio.wait_for(self._reported_down.wait(),
                                       5 * LIBVIRTD_PROBE if steady else LIBVIRTD_PROBE)

    def _saw_libvirtd(self, up: bool) -> None:
        """One look at libvirtd (a probe or a check-in's report): log when it changed."""
        if self._libvirtd_up is not None and up != self._libvirtd_up:
            name = "libvirtd_up" if up else "libvirtd_down"
            event(log, name, "local libvirtd is %s%s", "up" if up else "down",
                  "" if up else f": {self.local.error}", level=logging.INFO if up else logging.WARNING,
                  host_id=self.enrollment.host_id, reason=self.local.error)
        self._libvirtd_up = up
