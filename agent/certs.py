"""The host's identity over time (after client-go's `certificate_manager.go`).

One small manager owns the certificate the agent presents: `current()` is the TLS
context to use now, `start()` runs the renewal task, `stop()` ends it, and one-shot
callers (`join`, `run --once`) call `renew_if_due()` after their check-in.

- when: at a jittered 70-90 % of the lifetime (`renewal_time`), or earlier when the
  server asks (`request()`, the check-in answer's `renew: true`), but a server that asks
  on every answer gets one renewal per `requested_gap(lifetime)`, not one per answer;
- how: new keys made here, one call on a connection of its own (a renewal never waits
  behind a check-in, and never holds one up), then libvirtd's TLS files reloaded;
- each attempt has its own deadline (`RENEW_TIMEOUT`), and failures their own backoff:
  the check-in loop and its hung-check-in watchdog know nothing of renewals.

cryptography is imported only inside a renewal: it is 4 MB of the agent's memory that
checking in does not need.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import random
import ssl
import time
from collections.abc import Callable

from agent.client import ServerClient, ServerError
from agent.config import AgentConfig
from agent.libvirt_tls import LibvirtTLS, TLSSetupError
from agent.state import State
from common.backoff import Backoff
from common.logs import event

log = logging.getLogger(__name__)

# One renewal: two keys, one call (itself bounded by the client's 20 s), and libvirtd's
# TLS reload (virt-admin, or a restart command). Longer than this, it is abandoned and
# retried with backoff.
RENEW_TIMEOUT = 120.0
# A server asking for a renewal on every answer (a bug, or hostile) must not make the
# host mint keys and rewrite its identity on every check-in. Asked-for renewals come at
# most once a minute, or once per 1 % of the lifetime when that is longer (7 h of the
# default 30 days): the server's one reason to ask, a host that moved, is not urgent to
# the minute, and nothing else needs more.
REQUESTED_GAP_MIN = 60.0
REQUESTED_GAP_SHARE = 0.01
# Scheduled renewals are spaced by 70 % of the lifetime, so a server handing out
# lifetimes of a second would be renewed every 0.7 s: never closer than this.
SCHEDULED_GAP_MIN = 5.0


def renewal_time(issued: float, not_after: float, jitter: float) -> float:
    """When to renew: at 70-90 % of the lifetime (jitter in [0, 1]), as client-go does."""
    return issued + (not_after - issued) * (0.7 + 0.2 * jitter)


def requested_gap(lifetime: float) -> float:
    """The shortest time between two renewals the server asked for."""
    return max(REQUESTED_GAP_MIN, REQUESTED_GAP_SHARE * lifetime)


class CertManager:
    def __init__(self, config: AgentConfig, state: State, url: str, host_id: str, *,
                 clock: Callable[[], float] = time.time,
                 rand: Callable[[], float] = random.random,
                 timeout: float = RENEW_TIMEOUT) -> None:
        self.config, self.state, self.url, self.host_id = config, state, url, host_id
        self._clock, self._rand, self.timeout = clock, rand, timeout
        self._jitter = rand()
        self._requested = False
        self._last_attempt = 0.0  # when this process last tried (by `clock`)
        self._wake = asyncio.Event()
        self.backoff = Backoff(base=5.0, cap=300.0, rand=rand)
        self.renewals = 0  # successful ones, by this process
        self._task: asyncio.Task[None] | None = None
        self._load()

    def _load(self) -> None:
        self._ctx = self.state.client_context()
        # The lifetime counts from when this host received the certificate (by its own
        # clock), not from notBefore: the server backdates that to forgive clock skew.
        self.issued = self.state.identity.stat().st_mtime
        self.not_after = self.state.identity_expiry()

    def current(self) -> ssl.SSLContext:
        """The TLS context presenting the current identity (ServerClient takes this)."""
        return self._ctx

    @property
    def lifetime(self) -> float:
        return max(self.not_after - self.issued, 0.0)

    def due_at(self) -> float:
        """When the next renewal is due, asked for or not."""
        scheduled = max(renewal_time(self.issued, self.not_after, self._jitter),
                        self._last_renewal() + SCHEDULED_GAP_MIN)
        if not self._requested:
            return scheduled
        return min(scheduled, self._last_renewal() + requested_gap(self.lifetime))

    def _last_renewal(self) -> float:
        # The identity file's time too: a restarted agent (or a crash loop) does not
        # start with a clean slate.
        return max(self.issued, self._last_attempt)

    def due(self) -> bool:
        return self._clock() >= self.due_at()

    def request(self) -> None:
        """The server asked for a renewal: due at once, unless one was made lately."""
        if not self._requested:
            self._requested = True
            if not self.due():
                log.info("the server asks for a certificate renewal; the last was %.0f s ago: "
                         "renewing at %s", self._clock() - self._last_renewal(),
                         _iso(self.due_at()))
        self._wake.set()

    # -- the task ----------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="certificates")

    @property
    def task(self) -> asyncio.Task[None] | None:
        return self._task

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            wait = self.due_at() - self._clock()
            if wait > 0:
                with contextlib.suppress(asyncio.TimeoutError):  # a request() wakes it early
                    await asyncio.wait_for(self._wake.wait(), wait)
                continue
            if await self.renew():
                self.backoff.reset()
            else:
                await asyncio.sleep(self.backoff.next_delay())

    async def renew_if_due(self) -> bool:
        """For one-shot callers: renew now if due; whether a renewal was made."""
        return self.due() and await self.renew()

    async def renew(self) -> bool:
        """One renewal attempt within its deadline; whether it worked (failures logged)."""
        self._last_attempt = self._clock()
        try:
            await asyncio.wait_for(self._renew(), self.timeout)
        except ServerError as exc:
            log.warning("certificate renewal failed: %s (will retry)", exc)
            return False
        except TimeoutError:
            log.warning("certificate renewal took longer than %.0f s: abandoned (will retry)",
                        self.timeout)
            return False
        except OSError as exc:  # a full or read-only disk: the old identity is still whole
            log.error("cannot save the renewed identity: %s (will retry)", exc)
            return False
        self._requested = False
        self._jitter = self._rand()
        self.renewals += 1
        return True

    async def _renew(self) -> None:
        from agent.enroll import install_libvirt_tls  # imports cryptography
        from common import pki

        key = pki.new_key()
        # Renewed where libvirtd's TLS was set up (not on a host reached only by tunnel).
        libvirt_key = pki.new_key() if LibvirtTLS(self.config.libvirt).configured() else None
        client = ServerClient(self.url, self._ctx)  # closed below, also when abandoned
        try:
            identity = await client.renew(
                pki.make_csr(key, self.config.hostname),
                pki.make_csr(libvirt_key, self.config.hostname) if libvirt_key else None)
        finally:
            client.close()
        self.state.save_identity(pki.key_pem(key), identity.certificate)
        self._load()
        if libvirt_key is not None:
            try:
                await asyncio.to_thread(install_libvirt_tls, self.config, self.state,
                                        libvirt_key, identity, True)
            except TLSSetupError as exc:
                log.error("libvirtd TLS renewal not installed: %s", exc)
        event(log, "certificate_renewed", "certificates renewed; identity valid until %s",
              _iso(self.not_after), host_id=self.host_id)


def _iso(when: float) -> str:
    return dt.datetime.fromtimestamp(when, dt.timezone.utc).isoformat(timespec="seconds")
