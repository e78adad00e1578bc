"""The agent's run loop (after Tailscale's controlclient): one runner owns the tasks.

- check-in: collect, call, then wait the interval the server returned, or less when
  something changed (a coalescing `early` event), or a jittered backoff after a failure;
- libvirtd watch: while the local libvirtd is down, probe it every second so its return
  is reported at once, not at the next tick;
- certificate renewal at a jittered 70-90 % of the identity certificate's lifetime;
- systemd's watchdog: pinged while the check-in loop is alive and no check-in hangs.

`start()` and `shutdown()` are the whole interface; shutdown cancels and awaits all.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import time
from typing import Any

from agent.client import ServerClient, ServerError
from agent.config import AgentConfig
from agent.libvirt_tls import TLSSetupError
from agent.local_libvirt import LocalLibvirt
from agent.report import build_report
from agent.state import Enrollment, State
from common import notify, wire
from common.backoff import Backoff
from common.logs import event

log = logging.getLogger(__name__)

REFUSED_WAIT = 300.0  # identity refused: retrying is noise, but do notice a re-enable
LIBVIRTD_PROBE = 1.0
# A check-in (with a renewal and a libvirtd restart) running longer than this hangs:
# the watchdog pings stop and systemd restarts the agent.
HUNG_CHECKIN = 180.0


def renewal_time(issued: float, not_after: float, jitter: float) -> float:
    """When to renew: at 70-90 % of the lifetime (jitter in [0, 1]), as client-go does."""
    return issued + (not_after - issued) * (0.7 + 0.2 * jitter)


def _clock(when: float | None) -> str:
    """A time of day for STATUS= lines: unlike "N s ago" it stays true until replaced."""
    return time.strftime("%H:%M:%S", time.localtime(when)) if when else "never"


class Runner:
    def __init__(self, config: AgentConfig, state: State, enrollment: Enrollment) -> None:
        self.config = config
        self.state = state
        self.enrollment = enrollment
        self.client = ServerClient(enrollment.server_url, state.client_context())
        self.early = asyncio.Event()
        self.local = LocalLibvirt(config.libvirt.uri, on_change=self._libvirt_changed)
        self.backoff = Backoff(base=1.0, cap=60.0)
        self._jitter = random.random()
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._checkin_since: float | None = None  # monotonic start of the running check-in
        self.reported_libvirtd_ok: bool | None = None  # what the server last heard
        self._reported_down = asyncio.Event()
        self._libvirtd_up: bool | None = None  # as last seen, for the up/down events
        self.last: dict[str, Any] = state.load_status()

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._tasks = [asyncio.create_task(self._checkin_loop(), name="checkin"),
                       asyncio.create_task(self._libvirtd_watch(), name="libvirtd-watch")]
        interval = notify.watchdog_interval()
        if interval is not None:
            self._tasks.append(asyncio.create_task(self._watchdog(interval), name="watchdog"))

    async def shutdown(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.client.close()
        await asyncio.to_thread(self.local.close)

    async def wait(self) -> None:
        """Until a task dies (a bug): its exception propagates."""
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()

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
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.early.wait(), delay)

    async def checkin_once(self) -> float:
        """One check-in; returns how long to wait before the next."""
        report = await build_report(self.config, self.local)
        self._saw_libvirtd(report.libvirtd.ok)
        try:
            answer = await self.client.checkin(report)
        except ServerError as exc:
            return self._failed(exc)
        self.backoff.reset()
        self.reported_libvirtd_ok = report.libvirtd.ok
        if not report.libvirtd.ok:
            self._reported_down.set()
        self._record(report, ok=True, status=answer.status, detail=answer.detail)
        detail = "" if answer.status == "online" else f": {answer.detail}"
        notify.status(f"{answer.status} as {report.hostname} (host {answer.host_id}){detail}; "
                      f"last check-in {_clock(time.time())}")
        if answer.renew or time.time() >= self._renew_at():
            await self.renew()
        return answer.checkin_interval

    def _failed(self, exc: ServerError) -> float:
        expired = self._expired_since()
        if expired is not None:
            exc = ServerError(f"this host's certificate expired at {expired} (the host was off "
                              "longer than its lifetime): the server no longer accepts it", 401)
        if exc.identity_refused:
            event(log, "checkin_refused", "the server refuses this host's identity: %s", exc,
                  level=logging.ERROR, host_id=self.enrollment.host_id, reason=str(exc))
            self._record(None, ok=False, error=f"{exc} (re-join with a new token: "
                                                 "virtfleet-agent join --force '<JOIN>')")
            notify.status(f"refused by the server: {exc}; join again with a new token: "
                          "virtfleet-agent join --force '<JOIN>'")
            return REFUSED_WAIT
        delay = self.backoff.next_delay(exc.retry_after)
        log.warning("check-in failed (%s); retrying in %.1f s", exc, delay)
        self._record(None, ok=False, error=str(exc))
        notify.status(f"cannot check in with {self.enrollment.server_url}: {exc}; next try at "
                      f"{_clock(time.time() + delay)}, last success {_clock(self.last.get('last_success'))}")
        return delay

    def _record(self, report: wire.Report | None, ok: bool, **fields: Any) -> None:
        now = time.time()
        self.last = self.last | {"at": now, "ok": ok, **fields}
        if ok:
            self.last["last_success"] = now
            self.last.pop("error", None)
        if report is not None:
            self.last["libvirtd"] = wire.to_json(report.libvirtd)
        try:
            self.state.save_status(self.last)
        except OSError as exc:
            log.warning("cannot save status: %s", exc)

    def _expired_since(self) -> str | None:
        not_after = self.state.identity_expiry()
        if not_after > time.time():
            return None
        return dt.datetime.fromtimestamp(not_after, dt.timezone.utc).isoformat(timespec="seconds")

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
            if told is not None and up != told and self.last.get("ok"):
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

    # -- renewal -----------------------------------------------------------------

    def _renew_at(self) -> float:
        # The lifetime counts from when this host received the certificate (by its own
        # clock), not from notBefore: the server backdates that to forgive clock skew.
        issued = self.state.identity.stat().st_mtime
        return renewal_time(issued, self.state.identity_expiry(), self._jitter)

    async def renew(self) -> None:
        # Imported only to renew (or join): cryptography is 4 MB of the agent's memory that
        # a check-in does not need.
        from agent.enroll import install_libvirt_tls
        from common import pki

        key = pki.new_key()
        libvirt_key = pki.new_key() if self.config.libvirt.configure_tls else None
        try:
            identity = await self.client.renew(
                pki.make_csr(key, self.config.hostname),
                pki.make_csr(libvirt_key, self.config.hostname) if libvirt_key else None)
        except ServerError as exc:
            log.warning("certificate renewal failed: %s (will retry)", exc)
            return
        self.state.save_identity(pki.key_pem(key), identity.certificate)
        self.client.use_context(self.state.client_context())
        if libvirt_key is not None:
            try:
                await asyncio.to_thread(install_libvirt_tls, self.config, self.state,
                                        libvirt_key, identity, True)
            except TLSSetupError as exc:
                log.error("libvirtd TLS renewal not installed: %s", exc)
        expires = dt.datetime.fromtimestamp(self.state.identity_expiry(), dt.timezone.utc)
        event(log, "certificate_renewed", "certificates renewed; identity valid until %s",
              expires.isoformat(timespec="seconds"),
              host_id=self.enrollment.host_id)
        self._jitter = random.random()
