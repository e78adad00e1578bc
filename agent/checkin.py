"""One check-in, apart from any loop: collect the report, make the call, judge the outcome.

The runner's loop calls `check_in` every interval; `join` and `run --once` call
`check_in_once`, which also renews the certificate when due (through the certificate
manager, after the check-in, never inside it). What a failure means - try again, change
agent.toml, or join again - is decided here once (`judge`), in the words `status` shows.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from agent.certs import CertManager
from agent.client import ServerClient, ServerError
from agent.config import AgentConfig
from agent.local_libvirt import LocalLibvirt
from agent.report import build_report
from agent.state import Enrollment, State
from common import wire
from common.backoff import Backoff

log = logging.getLogger(__name__)

# The server says when to come back; a hostile or broken one could say 0 or -1 (942
# check-ins in 10 s) or a year. Bounds: half a second is the shortest the server itself
# hands out (`--checkin-interval 1` spreads hosts from 0.5 to 1.5 s); 300 s is the
# longest any refusal's Retry-After is obeyed, and longer would let the grace period
# (30 s by default) mark the host offline for nothing.
MIN_INTERVAL = 0.5
MAX_INTERVAL = 300.0
# Between changes a check-in is a heartbeat; the full report still goes this often, so
# the usage figures in it (free memory, load, free space) are never older than this.
REPORT_REFRESH = 300.0
JOIN_AGAIN = "virtfleet-agent join --force '<JOIN>'"
UNKNOWN_HOST = "unknown_host"  # server/fleet.py: no host holds this certificate


def clamp_interval(seconds: float) -> float:
    return min(max(seconds, MIN_INTERVAL), MAX_INTERVAL)


def retry_delay(backoff: Backoff, error: ServerError, window: float,
                rand: Callable[[], float] = random.random) -> float:
    """How long to wait after a failed check-in. One that got no answer at all (nothing
    listening, a restart, a timeout) comes again at a random moment of the server's
    reconnect window (from its last answer), so a crowd of agents cut off together comes
    back spread at the pace the server can take. An answer (429, 5xx): the jittered
    backoff, at least what its Retry-After said."""
    if error.status is None and window > 0:
        backoff.failures += 1  # a later answer's backoff starts where this left off
        return rand() * min(window, MAX_INTERVAL)
    return backoff.next_delay(error.retry_after)


class Verdict(enum.Enum):
    OK = "ok"
    RETRY = "retry"  # network, 429, 5xx, an answer that does not parse: back off, try again
    REFUSED = "refused"  # some other 401/403: retrying soon is noise
    ROLE_REFUSED = "role_refused"  # the server knows the host, not its role: change agent.toml
    IDENTITY_GONE = "identity_gone"  # forgotten, or expired: only a new join helps


@dataclass(frozen=True)
class Acked:
    """The report the server last acknowledged: its digest (what heartbeats carry), what
    of it counts as a change (`wire.steady`), and when it was sent (monotonic)."""

    digest: str
    steady: Any
    at: float

    def still_current(self, report: wire.Report, now: float) -> bool:
        """Whether a heartbeat may stand for `report`: nothing but usage changed, and the
        last full report is recent."""
        return now - self.at < REPORT_REFRESH and steady_part(report) == self.steady


def steady_part(report: wire.Report) -> Any:
    return wire.steady(wire.to_json(report))


@dataclass
class Outcome:
    report: wire.Report
    answer: wire.CheckinResponse | None = None
    error: ServerError | None = None
    verdict: Verdict = Verdict.OK
    message: str = ""  # why it failed and what to do, for the operator
    acked: Acked | None = None  # after a success: what the next heartbeat stands for
    heartbeat: bool = False  # the successful call carried the digest, not the report

    @property
    def ok(self) -> bool:
        return self.answer is not None


def judge(exc: ServerError, state: State, config: AgentConfig) -> tuple[Verdict, str]:
    """What a failed check-in means, and the words for it."""
    expired = expired_since(state)
    if expired is not None:
        return Verdict.IDENTITY_GONE, (
            f"this host's certificate expired at {expired} (the host was off longer than its "
            f"lifetime): the server no longer accepts it; re-join with a new token: {JOIN_AGAIN}")
    if exc.role_refused:
        where = (f"role = {config.role!r} in {config.path}" if config.role_from_file and config.path
                 else f"role {config.role!r}")
        return Verdict.ROLE_REFUSED, (
            f"{exc} (this host asks for {where}: no new join needed; set a role the token "
            "allows, or remove the setting to keep the role the host joined with, then "
            "restart the agent)")
    if exc.code == UNKNOWN_HOST:
        return Verdict.IDENTITY_GONE, f"{exc} (re-join with a new token: {JOIN_AGAIN})"
    if exc.identity_refused:
        return Verdict.REFUSED, str(exc)
    return Verdict.RETRY, str(exc)


def expired_since(state: State) -> str | None:
    not_after = state.identity_expiry()
    if not_after > time.time():
        return None
    return dt.datetime.fromtimestamp(not_after, dt.timezone.utc).isoformat(timespec="seconds")


async def check_in(client: ServerClient, config: AgentConfig, state: State,
                   local: LocalLibvirt, acked: Acked | None = None) -> Outcome:
    """Collect the report and make the call; no waiting, no renewing, no recording.
    `acked`: the report the server last acknowledged: when the new one differs from it
    only in usage, the call is a heartbeat carrying its digest (the full report follows
    at once if the server asks for it)."""
    report = await build_report(config, local)
    try:
        if acked is not None and acked.still_current(report, time.monotonic()):
            answer = await client.heartbeat(acked.digest)
            if not answer.send_report:
                return Outcome(report, answer=answer, acked=acked, heartbeat=True)
        answer = await client.checkin(report)
    except ServerError as exc:
        verdict, message = judge(exc, state, config)
        return Outcome(report, error=exc, verdict=verdict, message=message)
    # A server of protocol 2 or older names no digest: it gets the full report each time.
    sent = Acked(answer.report_digest, steady_part(report), time.monotonic()) \
        if answer.report_digest else None
    return Outcome(report, answer=answer, acked=sent)


async def follow_server(answer: wire.CheckinResponse, enrollment: Enrollment, state: State,
                        config: AgentConfig, local: LocalLibvirt,
                        certs: CertManager) -> ServerClient | None:
    """The server names the URLs it answers at (`server_urls`, best first); one that does
    not name this host's URL is moving. The host follows to the first, once a check-in
    there worked (the same pinned CA verifies it: no new trust), and keeps it in
    agent.json. A client for the new URL if it moved, else None."""
    urls = answer.server_urls
    if not urls or enrollment.server_url in urls or enrollment.server_url_by_hand:
        return None
    trial = ServerClient(urls[0], certs.current)
    outcome = await check_in(trial, config, state, local)
    if outcome.answer is None:
        trial.close()
        log.warning("the server names %s as its URL, but this host cannot check in there (%s): "
                    "it stays with %s", urls[0], outcome.message, enrollment.server_url)
        return None
    log.info("the server moved: this host now checks in with %s (was %s)", urls[0],
             enrollment.server_url)
    enrollment.server_url = certs.url = urls[0]
    try:
        state.update_enrollment(enrollment)
    except OSError as exc:
        log.warning("cannot save the server's new URL: %s", exc)
    return trial


class StatusBook:
    """status.json: the last check-in, its result and when each fact was seen, for
    `virtfleet-agent status` (which reads it from another process)."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.last: dict[str, Any] = state.load_status()

    def record(self, outcome: Outcome, next_in: float | None = None,
               tunnel: dict[str, Any] | None = None) -> None:
        """`tunnel`: the agent's tunnel as it is now, if the server asks for one."""
        now = time.time()
        fields: dict[str, Any] = {"at": now, "ok": outcome.ok, "verdict": outcome.verdict.value,
                                  "hostname": outcome.report.hostname,
                                  "libvirtd": wire.to_json(outcome.report.libvirtd),
                                  "libvirtd_at": now,
                                  "next_at": None if next_in is None else now + next_in,
                                  "tunnel": tunnel}
        if outcome.answer is not None:
            fields |= {"status": outcome.answer.status, "detail": outcome.answer.detail,
                       "last_success": now, "sent": "heartbeat" if outcome.heartbeat else "report",
                       "interval": clamp_interval(outcome.answer.checkin_interval),
                       "tunnel_wanted": outcome.answer.tunnel}
            if not outcome.heartbeat:
                fields["report_at"] = now
        self.last = self.last | fields
        if outcome.ok:
            self.last.pop("error", None)
        else:
            self.last["error"] = outcome.message
        try:
            self.state.save_status(self.last)
        except OSError as exc:
            log.warning("cannot save status: %s", exc)


async def check_in_once(config: AgentConfig, state: State, enrollment: Enrollment) -> Outcome:
    """One check-in, recorded, then a renewal if one is due or the server asked for one."""
    certs = CertManager(config, state, enrollment.server_url, enrollment.host_id)
    client = ServerClient(enrollment.server_url, certs.current)
    local = LocalLibvirt(config.libvirt.uri, on_change=lambda: None)
    try:
        outcome = await check_in(client, config, state, local)
        StatusBook(state).record(outcome)
        if outcome.answer is not None:
            if outcome.answer.renew:
                certs.request()
            await certs.renew_if_due()
    finally:
        client.close()
        await asyncio.to_thread(local.close)
    return outcome
