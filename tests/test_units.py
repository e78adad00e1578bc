"""Small pure pieces: backoff, renewal time, KVM assessment, status derivation, rate limit."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections import Counter
from pathlib import Path

import pytest

from agent.cli import build_parser as agent_parser
from agent.client import MAX_RETRY_AFTER, _refusal
from agent.collectors import kvm
from agent.collectors.host import parse_cpu_model
from agent.runner import HUNG_CHECKIN, Runner, renewal_time
from common.backoff import Backoff
from common.cli import duration
from server.app import GC_GROWTH, RateLimiter, full_collection_due
from server.cli import build_parser as server_parser
from server.cli import main as server_main
from server.connections import _reported_kvm_problem
from server.fleet import checkin_delay
from server.hosts import SWEEP_BATCH, Connection, HostStatus, derive
from server.store import COUNTS_SQL, SWEEP_SQL, Host, Store, Token


def test_backoff_grows_caps_and_resets() -> None:
    b = Backoff(base=1, cap=8, rand=lambda: 1.0)
    assert [b.next_delay() for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    b.reset()
    assert b.next_delay() == 1


def test_backoff_jitter_stays_within_half_to_full() -> None:
    low = Backoff(base=4, cap=60, rand=lambda: 0.0)
    assert low.next_delay() == 2


def test_backoff_waits_at_least_what_the_server_asked() -> None:
    b = Backoff(base=1, cap=8, rand=lambda: 1.0)
    assert [b.next_delay(at_least=5), b.next_delay(), b.next_delay(at_least=0.5)] == [5, 2, 4]


def test_retry_after_is_read_and_bounded() -> None:
    body = b'{"error": "rate_limited", "message": "slow down"}'
    assert _refusal(429, body, "7").retry_after == 7
    assert _refusal(429, body, "86400").retry_after == MAX_RETRY_AFTER
    assert _refusal(429, body, "").retry_after == 0
    assert _refusal(503, b"not json", "soon").retry_after == 0


def test_renewal_between_70_and_90_percent() -> None:
    assert renewal_time(0, 100, 0.0) == 70
    assert renewal_time(0, 100, 1.0) == pytest.approx(90)
    assert 1000 + 70 <= renewal_time(1000, 1100, 0.5) <= 1000 + 90


CPUINFO = "processor\t: 0\nmodel name\t: AMD EPYC 7302\nflags\t\t: fpu svm sse2\n"


def test_agent_watchdog_pings_only_while_loops_run_and_no_checkin_hangs() -> None:
    loop = asyncio.new_event_loop()
    try:
        runner = Runner.__new__(Runner)  # only the health predicate: no server, no libvirt
        checkin, watch = loop.create_future(), loop.create_future()
        runner._tasks, runner._checkin_since = [checkin, watch], None  # type: ignore[list-item]
        assert runner._healthy()
        runner._checkin_since = time.monotonic() - 5
        assert runner._healthy()
        runner._checkin_since = time.monotonic() - HUNG_CHECKIN - 1
        assert not runner._healthy(), "a hung check-in must stop the pings"
        runner._checkin_since = None
        watch.set_exception(RuntimeError("libvirtd watch died"))
        assert not runner._healthy(), "a dead loop must stop the pings"
        watch.exception()  # retrieved: no "never retrieved" warning
    finally:
        loop.close()


def test_cpu_parsers() -> None:
    assert parse_cpu_model(CPUINFO) == "AMD EPYC 7302"
    assert kvm.parse_cpu_flags(CPUINFO) == {"fpu", "svm", "sse2"}


def test_kvm_disabled_in_bios_is_named() -> None:
    facts = kvm.assess({"vmx"}, device_usable=False, device_exists=False, module=None, nested=None)
    assert facts["disabled_in_bios"] and "BIOS" in facts["problem"] and "kvm_intel" in facts["problem"]


def test_kvm_usable_with_nested() -> None:
    facts = kvm.assess({"svm"}, device_usable=True, device_exists=True, module="kvm_amd", nested="1")
    assert facts["usable"] and facts["nested"] and not facts["problem"]


def test_kvm_without_hardware_support() -> None:
    facts = kvm.assess(set(), device_usable=False, device_exists=False, module=None, nested=None)
    assert not facts["disabled_in_bios"] and "no hardware virtualization" in facts["problem"]


def _host(**kw: object) -> Host:
    base = dict(id="h1", hostname="hv", admin_state="enabled", configured_role="mixed",
                role_override=None, role_limit="mixed", status="online", detail="", status_since=0,
                enrolled_at=0, last_checkin=100, address="10.0.0.1", agent_version="1",
                report={"libvirtd": {"ok": True}, "libvirt_endpoint": {"host": "hv", "port": 1}})
    return Host(**(base | kw))  # type: ignore[arg-type]


def test_status_derivation_precedence() -> None:
    online = Connection("online", "open")
    assert derive(_host(admin_state="disabled"), 100, 100, 30, online)[0] == "disabled"
    assert derive(_host(admin_state="pending"), 100, 100, 30, online)[0] == "pending"
    assert derive(_host(), 200, 100, 30, online)[0] == "offline"
    down = _host(report={"libvirtd": {"ok": False, "error": "socket gone"}})
    status, detail = derive(down, 100, 100, 30, online)
    assert status == "error" and "libvirtd is down on the host: socket gone" in detail
    assert derive(_host(), 100, 100, 30, online) == ("online", "open")
    assert derive(_host(), 100, 100, 30, None)[0] == "connecting"


def test_rate_limiter_allows_bursts_then_refills() -> None:
    limiter = RateLimiter(rate=1.0)
    assert limiter.allow("a", 0) and limiter.allow("a", 0)
    assert not limiter.allow("a", 0)
    assert limiter.allow("b", 0)
    assert limiter.allow("a", 1.0)


def test_durations() -> None:
    assert duration("90") == 90 and duration("15m") == 900 and duration("1h") == 3600
    with pytest.raises(Exception, match="not a duration"):
        duration("soon")


def test_forgetting_a_host_revokes_all_its_unexpired_libvirt_certificates(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    store.add_token(Token(jti="t1", role="mixed", auto_enable=True, max_uses=5, uses=0, created_at=0,
                          expires_at=1e12, revoked_at=None, description=""))
    for host_id, serial in (("h1", "a1"), ("h2", "b1")):
        store.enroll(_host(id=host_id, token_jti="t1", cert_serial=f"id-{host_id}",
                           libvirt_cert_serial=serial, libvirt_cert_not_after=1000.0), now=10)
    store.update_host("h1", libvirt_cert_serial="a2", libvirt_cert_not_after=2000.0)  # renewed
    assert store.revoked_libvirt_certs(now=20) == []
    store.forget_host("h1", now=30)
    assert store.revoked_libvirt_certs(now=40) == [("a1", 30), ("a2", 30)]
    assert store.revoked_libvirt_certs(now=1500) == [("a2", 30)]  # expired ones drop out
    assert store.get_host("h2") is not None and store.host_by_serial("id-h1") is None


def test_shared_options_work_before_and_after_the_command() -> None:
    # The forms the operator docs and issue use: `serve --state-dir DIR`, `join J --state-dir D`.
    assert server_parser().parse_args(["serve", "--state-dir", "/s"]).state_dir == Path("/s")
    args = server_parser().parse_args(["--state-dir", "/a", "hosts", "list", "--json"])
    assert args.state_dir == Path("/a") and args.json
    args = server_parser().parse_args(["--state-dir", "/a", "--json", "hosts", "show", "x"])
    assert args.state_dir == Path("/a") and args.json  # not reset by the command's own defaults
    assert agent_parser().parse_args(["join", "J", "--state-dir", "/d"]).state_dir == Path("/d")
    assert agent_parser().parse_args(["--state-dir", "/d", "run"]).state_dir == Path("/d")


def test_reported_kvm_problem_takes_any_shape() -> None:
    problem = {"facts": {"kvm": {"ok": True, "data": {"problem": "disabled in the BIOS"}}}}
    assert _reported_kvm_problem(problem) == "disabled in the BIOS"
    for odd in ({}, {"facts": "x"}, {"facts": {"kvm": "x"}}, {"facts": {"kvm": {"data": [1]}}},
                {"facts": {"kvm": {"data": {"problem": 5}}}}):
        assert _reported_kvm_problem(odd) == ""


def test_a_check_in_finds_its_host_by_index_not_by_scanning(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    for column in ("cert_serial", "prev_cert_serial"):
        plan = store.db.execute(f"EXPLAIN QUERY PLAN SELECT * FROM hosts WHERE {column}=?",
                                ("ab",)).fetchall()
        assert all("USING INDEX" in row["detail"] for row in plan), [row["detail"] for row in plan]
    store.close()


def _store_with_hosts(tmp_path: Path, hosts: list[Host]) -> Store:
    store = Store(tmp_path / "state.db")
    store.add_token(Token(jti="t1", role="mixed", auto_enable=True, max_uses=len(hosts), uses=0,
                          created_at=0, expires_at=1e12, revoked_at=None, description=""))
    for host in hosts:
        store.enroll(host, now=host.enrolled_at)
    return store


def test_sweep_picks_only_hosts_whose_freshness_disagrees_with_their_status(tmp_path: Path) -> None:
    now = time.time()
    store = _store_with_hosts(tmp_path, [
        _host(id="fresh", cert_serial="1", token_jti="t1", last_checkin=now),
        _host(id="stale", cert_serial="2", token_jti="t1", last_checkin=now - 100),
        _host(id="off-stale", cert_serial="3", token_jti="t1", status="offline",
              last_checkin=now - 100),
        _host(id="off-back", cert_serial="4", token_jti="t1", status="offline", last_checkin=now),
        _host(id="disabled", cert_serial="5", token_jti="t1", admin_state="disabled",
              last_checkin=now - 100),
    ])
    assert sorted(store.hosts_to_sweep(now - 30, started_at=0)) == ["off-back", "stale"]
    # Within the grace period after a server start nobody is stale; the offline host that
    # checked in is still due.
    assert store.hosts_to_sweep(now - 30, started_at=now - 5) == ["off-back"]
    store.close()


def test_a_sweep_marks_thousands_offline_in_a_few_commits_and_keeps_offline_hosts_offline(
        tmp_path: Path) -> None:
    now = time.time()
    many = [_host(id=f"h{i}", cert_serial=f"s{i}", token_jti="t1", last_checkin=now - 100)
            for i in range(1200)]
    store = _store_with_hosts(tmp_path, many)
    commits: list[str] = []
    store.db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    status = HostStatus(store, grace=30, connection_of=lambda _id: None)
    status.started_at = now - 60  # a server that has run longer than the grace period
    asyncio.run(status.sweep())
    assert store.status_counts() == {"offline": 1200}
    assert len(commits) == -(-1200 // SWEEP_BATCH)  # one commit per batch, not per host
    assert [e.status for e in store.history("h7")] == ["online", "offline"]
    # After a restart a host already offline stays offline until it checks in.
    restarted = HostStatus(store, grace=30, connection_of=lambda _id: None)
    assert store.hosts_to_sweep(now - 30, restarted.started_at) == []
    host = store.get_host("h7")
    assert host is not None and restarted.refresh_host(host).status == "offline"
    store.close()


def test_the_sweep_reads_an_index_not_the_hosts_rows(tmp_path: Path) -> None:
    store = Store(tmp_path / "state.db")
    for query, args in ((COUNTS_SQL, ()), (SWEEP_SQL, (1, 1, 1))):
        plan = [row["detail"] for row in store.db.execute(f"EXPLAIN QUERY PLAN {query}", args)]
        assert any("COVERING INDEX hosts_liveness" in step for step in plan), plan
    store.close()


def test_a_full_garbage_collection_is_due_once_memory_grew_and_settled() -> None:
    assert not full_collection_due(grown=0, growing=0)  # however long it has been
    assert full_collection_due(grown=GC_GROWTH, growing=0)
    assert not full_collection_due(grown=GC_GROWTH, growing=GC_GROWTH // 2)  # a storm
    assert not full_collection_due(grown=-GC_GROWTH, growing=0)  # shrinking is no reason


def test_hosts_arriving_together_are_spread_over_the_interval_by_their_next_checkin() -> None:
    now, interval = 1_000.0, 10.0
    ids = [secrets.token_hex(6) for _ in range(2000)]
    delays = [checkin_delay(host_id, now, interval) for host_id in ids]
    assert all(interval / 2 <= d < 1.5 * interval for d in delays)
    # The next check-ins land evenly: no second of the interval gets twice its share.
    per_second = Counter(int((now + d) % interval) for d in delays)
    assert len(per_second) == 10 and max(per_second.values()) < 2 * len(ids) / 10
    # A host keeps its moment: checking in again at the time it was given, it is told a
    # whole interval.
    first = checkin_delay(ids[0], now, interval)
    assert checkin_delay(ids[0], now + first, interval) == pytest.approx(interval)


def test_serve_refuses_a_grace_period_shorter_than_two_intervals(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = server_main(["serve", "--state-dir", str(tmp_path), "--checkin-interval", "10s",
                        "--grace", "15s"])
    assert code != 0
    assert "--grace (15 s) must be at least twice --checkin-interval (10 s)" in capsys.readouterr().err
    assert not (tmp_path / "state.db").exists()  # refused before anything was made
