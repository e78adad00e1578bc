"""Small pure pieces of the agent and of both sides: backoff, renewal time, KVM assessment."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from agent.cli import build_parser as agent_parser
from agent.client import MAX_RETRY_AFTER, _refusal
from agent.collectors import kvm
from agent.collectors.host import parse_cpu_model
from agent.runner import HUNG_CHECKIN, Runner, renewal_time
from common.backoff import Backoff
from common.cli import duration


def test_backoff_grows_caps_and_resets() -> None:
    b = Backoff(base=1, cap=8, rand=lambda: 1.0)
    assert [b.next_delay() for _ in range(6)] == [1, 2, 4, 8, 8, 8]
    b.reset()
    assert b.next_delay() == 1


def test_backoff_jitter_stays_within_half_to_full() -> None:
    assert Backoff(base=4, cap=60, rand=lambda: 0.0).next_delay() == 2
    assert Backoff(base=4, cap=60, rand=lambda: 1.0).next_delay() == 4
    assert all(2 <= Backoff(base=4, cap=60, rand=lambda r=r: r / 10).next_delay() <= 4
               for r in range(11))


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


def test_durations() -> None:
    assert duration("90") == 90 and duration("15m") == 900 and duration("1h") == 3600
    with pytest.raises(Exception, match="not a duration"):
        duration("soon")


def test_agent_options_work_before_and_after_the_command() -> None:
    assert agent_parser().parse_args(["join", "J", "--state-dir", "/d"]).state_dir == Path("/d")
    assert agent_parser().parse_args(["--state-dir", "/d", "run"]).state_dir == Path("/d")


