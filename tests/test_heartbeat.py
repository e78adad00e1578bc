"""Heartbeats and reports apart: a check-in carries the full report only when it changed.

In-process against the server's real parts (SQLite, the engine feed), then the real
agent and server as processes: the agent's heartbeats, the report it sends at once when
libvirtd goes down, and the report the server asks for when its digest is not the
agent's (a write lost in a crash).
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.checkin import retry_delay
from agent.client import ServerError
from bench.report import simulated_report
from common import pki, wire
from common.backoff import Backoff
from server.config import ServerConfig
from server.fleet import Fleet
from server.main import Parts, build
from server.model import Host, Status
from server.pace import BUSY, CPU_SHARE, DEFAULT_RATE, MAX_RATE, MIN_WINDOW, ReconnectPace
from tests.harness import Agent, Libvirtd, Server, wait_for

ADDRESS = "10.0.0.7"


@pytest.fixture
def parts(tmp_path: Path) -> Iterator[Parts]:
    built = build(ServerConfig(state_dir=tmp_path / "server"))
    yield built
    built.close()


def enrolled(fleet: Fleet) -> tuple[str, wire.Report]:
    """A host enrolled through the domain; its certificate serial and report."""
    token = fleet.create_token("mixed", ttl=60, uses=1, auto_enable=True, description="").token
    report = simulated_report("hv1")
    answer = fleet.enroll(wire.EnrollRequest(token=token, csr=pki.make_csr(pki.new_key(), "hv1"),
                                             report=report), ADDRESS)
    serial = pki.load_cert(answer.identity.certificate.encode()).serial_number
    return f"{serial:x}", report


def lookup(parts: Parts, serial: str) -> Host:
    host = parts.fleet.host_for_certificate(serial)
    assert host is not None
    return host


def statements_of_a_flush(parts: Parts) -> list[str]:
    db: sqlite3.Connection = parts.store.db  # type: ignore[attr-defined]
    seen: list[str] = []
    db.set_trace_callback(seen.append)
    try:
        parts.store.flush_checkins()
    finally:
        db.set_trace_callback(None)
    return [s for s in seen if s.startswith("UPDATE")]


def test_a_heartbeat_writes_liveness_alone_and_reads_no_report(parts: Parts) -> None:
    serial, report = enrolled(parts.fleet)
    full = parts.fleet.checkin(lookup(parts, serial), wire.CheckinRequest(report=report), ADDRESS)
    assert full.report_digest and not full.send_report
    assert any("report=" in s for s in statements_of_a_flush(parts))
    revision = parts.changes.revision

    host = lookup(parts, serial)
    before = host.last_checkin
    answer = parts.fleet.checkin(host, wire.CheckinRequest(report_digest=full.report_digest),
                                 ADDRESS)
    assert not answer.send_report and answer.report_digest == full.report_digest
    assert answer.status == full.status and answer.host_id == full.host_id
    assert host.report_text is None and host._report is None  # not even read
    assert parts.changes.revision == revision  # no change for engines: nothing changed
    record = json.loads(parts.changes.get(host.id) or b"{}")
    assert before is not None and record["last_checkin"] > before  # but it is fresh
    written = statements_of_a_flush(parts)
    assert len(written) == 1 and written[0].startswith("UPDATE hosts SET last_checkin="), written


def test_a_heartbeat_whose_digest_is_not_the_servers_asks_for_the_report(parts: Parts) -> None:
    serial, report = enrolled(parts.fleet)
    parts.fleet.checkin(lookup(parts, serial), wire.CheckinRequest(report=report), ADDRESS)
    answer = parts.fleet.checkin(lookup(parts, serial),
                                 wire.CheckinRequest(report_digest="0" * wire.DIGEST_LENGTH), ADDRESS)
    assert answer.send_report
    host = lookup(parts, serial)
    assert host.last_checkin is not None and time.time() - host.last_checkin < 5  # alive all the same


def test_a_heartbeat_after_silence_brings_the_host_back_from_offline(parts: Parts) -> None:
    serial, report = enrolled(parts.fleet)
    full = parts.fleet.checkin(lookup(parts, serial), wire.CheckinRequest(report=report), ADDRESS)
    host = lookup(parts, serial)
    long_ago = time.time() - 3600
    parts.store.set_statuses([(host.id, Status.OFFLINE, "no check-in", long_ago, True)])
    parts.store.record_checkin(host, ADDRESS, long_ago)
    parts.store.flush_checkins()
    answer = parts.fleet.checkin(lookup(parts, serial),
                                 wire.CheckinRequest(report_digest=full.report_digest), ADDRESS)
    assert answer.status != Status.OFFLINE
    assert parts.store.get_host(host.id).status != Status.OFFLINE  # type: ignore[union-attr]


@pytest.mark.parametrize("protocol, fields", [
    (1, set()), (2, {"server_urls"}),
    (3, {"server_urls", "report_digest", "send_report"}),
    (4, {"server_urls", "report_digest", "send_report", "reconnect_window"})])
def test_an_agent_is_answered_only_in_fields_its_protocol_knows(parts: Parts, protocol: int,
                                                                fields: set[str]) -> None:
    serial, report = enrolled(parts.fleet)
    answer = wire.to_json(parts.fleet.checkin(lookup(parts, serial),
                                              wire.CheckinRequest(report=report), ADDRESS))
    sent = set(wire.answer_for(protocol, answer))
    assert sent & set(wire.ADDED_IN) == fields
    assert {"host_id", "status", "detail", "checkin_interval"} <= sent


def test_a_check_in_answer_carries_the_reconnect_window(parts: Parts) -> None:
    serial, report = enrolled(parts.fleet)
    parts.fleet.reconnect_window = 12.5
    answer = parts.fleet.checkin(lookup(parts, serial), wire.CheckinRequest(report=report), ADDRESS)
    assert answer.reconnect_window == 12.5


def test_the_reconnect_window_is_every_hosts_reconnect_at_the_pace_measured_in_storms() -> None:
    counts, cpu = [0, 0], [0.0]  # connections made, requests served; CPU seconds
    pace = ReconnectPace(lambda: (counts[0], counts[1]), lambda: cpu[0])
    assert pace.window(1) == MIN_WINDOW
    assert pace.window(10_000) == 10_000 / DEFAULT_RATE

    def then(connections: int, requests: int, cpu_seconds: float) -> float:
        counts[:] = [counts[0] + connections, counts[1] + requests]
        cpu[0] += cpu_seconds
        pace.sample()
        return pace.rate

    # A storm: 1,000 new connections, each with its first check-in, took 1.25 CPU s.
    assert then(1000, 1000, 1.25) == CPU_SHARE * 1000 / 1.25
    assert pace.window(10_000) == 10_000 / (CPU_SHARE * 800)
    # Steady check-ins on kept connections say nothing of what a reconnect costs, nor do
    # a few new connections.
    assert then(150, 5000, 2.0) == CPU_SHARE * 800
    assert then(BUSY - 1, BUSY - 1, 0.01) == CPU_SHARE * 800
    # The next storm was cheaper: the rate moves halfway to it.
    assert then(1000, 1000, 0.8) == pytest.approx((CPU_SHARE * 800 + CPU_SHARE * 1250) / 2)
    # A sample claiming a rate no machine has measured something else: it counts as the most.
    fresh = ReconnectPace(lambda: (counts[0], counts[1]), lambda: cpu[0])
    counts[:] = [counts[0] + 1000, counts[1] + 1000]
    cpu[0] += 0.001
    fresh.sample()
    assert fresh.rate == MAX_RATE


def test_a_check_in_with_no_answer_retries_within_the_window_and_an_answer_backs_off() -> None:
    backoff = Backoff(base=1.0, cap=60.0, rand=lambda: 1.0)
    no_answer = ServerError("connection refused")
    assert retry_delay(backoff, no_answer, 25.0, rand=lambda: 0.5) == 12.5
    assert retry_delay(backoff, no_answer, 25.0, rand=lambda: 0.99) == pytest.approx(24.75)
    assert retry_delay(backoff, no_answer, 10_000.0, rand=lambda: 1.0) == 300.0  # clamped
    # An answer is no crowd to spread: the backoff, grown by the failures before it.
    assert retry_delay(backoff, ServerError("busy", status=503), 25.0) == 8.0
    assert retry_delay(backoff, ServerError("slow down", status=429, retry_after=30), 25.0) == 30
    # A server that never said (older, or not yet answered): the backoff.
    assert retry_delay(Backoff(rand=lambda: 1.0), no_answer, 0.0) == 1.0


# -- the real agent and server ------------------------------------------------------


def agent_status(agent: Agent) -> dict:
    path = agent.state / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


def test_the_agent_sends_heartbeats_and_its_report_when_it_changes_or_is_asked(
        server: Server, libvirtd: Libvirtd, make_agent) -> None:
    agent = make_agent("hb", libvirtd)
    assert agent.join(server.token()).returncode == 0
    agent.start()
    host_id = agent.host_id()
    server.wait_status(host_id, "online", timeout=30)
    wait_for(lambda: agent_status(agent).get("sent") == "heartbeat", 30, "a heartbeat")
    shown = agent.run_cmd("status")
    assert "a heartbeat; the full report went" in shown.stdout, shown.stdout

    # libvirtd going down changes the report: it goes at once, not as a heartbeat.
    libvirtd.stop()
    detail = server.wait_status(host_id, "error", timeout=15)["detail"]
    assert "libvirtd is down on the host" in detail
    libvirtd.start()
    server.wait_status(host_id, "online", timeout=30)
    wait_for(lambda: agent_status(agent).get("sent") == "heartbeat", 30, "heartbeats again")

    # A server that lost the last report (here: its digest) asks for it; the agent sends it.
    server.proc.stop()
    db = sqlite3.connect(server.state / "state.db")
    with db:
        db.execute("UPDATE hosts SET report_digest='lost' WHERE id=?", (host_id,))
    db.close()
    sent_before = agent_status(agent).get("report_at", 0)
    server.start()
    wait_for(lambda: agent_status(agent).get("report_at", 0) > sent_before, 40,
             "the full report the server asked for")

    def stored_digest() -> str:
        db = sqlite3.connect(server.state / "state.db")
        try:
            return str(db.execute("SELECT report_digest FROM hosts WHERE id=?",
                                  (host_id,)).fetchone()[0])
        finally:
            db.close()

    wait_for(lambda: stored_digest() not in ("lost", ""), 10, "the report's digest stored again")
    wait_for(lambda: agent_status(agent).get("sent") == "heartbeat", 30, "heartbeats after it")
