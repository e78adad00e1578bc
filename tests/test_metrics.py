"""Prometheus metrics: a real server with a real agent and libvirtd, scraped over HTTP,
its values checked against `hosts list` and its text against Prometheus's own promtool."""

from __future__ import annotations

import argparse
import subprocess
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server.cli import parse_metrics_listen
from tests.harness import ROOT, Agent, Libvirtd, Server, wait_for
from tests.test_gateway import Engine, virsh

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(server: Server) -> tuple[str, Samples]:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = resp.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in samples if n == name]


@pytest.mark.slow
def test_metrics_agree_with_hosts_list_and_pass_promtool(
        start_server: Callable[..., Server], libvirtd: Libvirtd,
        make_agent: Callable[..., Agent], tmp_path: Path) -> None:
    server = start_server("--checkin-interval", "1", "--grace", "4", "--engine-group", "libvirt-qemu")
    online = make_agent("hv-metrics", libvirtd)
    assert online.join(server.token()).returncode == 0
    online.start()
    online_id = online.host_id()
    server.wait_status(online_id, "online", 20)
    waiting = make_agent("hv-waiting", None)
    assert waiting.join(server.token("--no-auto-enable")).returncode == 0
    waiting_id = waiting.host_id()
    revoked = server.admin_json("token", "create")
    server.admin("token", "revoke", revoked["token"]["id"])
    assert make_agent("hv-refused", None).join(revoked["join"]).returncode != 0

    # Through the gateway, and a watcher on the engine API.
    assert virsh(server.gateway_uri(online_id), "list").returncode == 0
    engine = Engine(server)
    watch = engine.watch(engine.get("/v1/hosts")[1]["revision"], timeout=30)
    watcher = threading.Thread(target=lambda: next(watch, None), daemon=True)
    watcher.start()

    text, samples = wait_for(lambda: (got := scrape(server))
                             and value(got[1], "virtfleet_engine_watchers") == 1
                             and (value(got[1], "virtfleet_checkins_total", kind="heartbeat") or 0) > 0
                             and got, 20, "the watcher and heartbeats to show in the metrics")
    hosts = {h["id"]: h for h in server.hosts()}
    assert value(samples, "virtfleet_hosts", status="online", role=hosts[online_id]["role"]) == 1
    assert value(samples, "virtfleet_hosts", status="pending", role=hosts[waiting_id]["role"]) == 1
    assert value(samples, "virtfleet_host_up", host_id=online_id, hostname="hv-metrics") == 1
    assert value(samples, "virtfleet_host_up", host_id=waiting_id, hostname="hv-waiting") == 0
    assert value(samples, "virtfleet_host_status", host_id=waiting_id, hostname="hv-waiting",
                 status="pending") == 1
    last = value(samples, "virtfleet_host_last_checkin_timestamp_seconds", host_id=online_id,
                 hostname="hv-metrics")
    assert last is not None and abs(last - hosts[online_id]["last_checkin"]) < 5
    assert value(samples, "virtfleet_enrollments_total", outcome="accepted") == 2
    assert value(samples, "virtfleet_enrollments_total", outcome="refused") == 1
    assert value(samples, "virtfleet_requests_refused_total", reason="token_refused") == 1
    assert (value(samples, "virtfleet_checkins_total", kind="report") or 0) >= 1
    assert (value(samples, "virtfleet_checkin_duration_seconds_count") or 0) >= 2
    assert value(samples, "virtfleet_libvirt_connections", state="online") == 1
    assert (value(samples, "virtfleet_libvirt_opens_total") or 0) >= 1
    assert (value(samples, "virtfleet_gateway_connections_total") or 0) >= 1
    # virsh list: a few RPCs each way (its handshake, auth, connect, list, close).
    assert (value(samples, "virtfleet_gateway_bytes_total", direction="from_host") or 0) > 100
    assert (value(samples, "virtfleet_gateway_bytes_total", direction="to_host") or 0) > 100
    assert (value(samples, "process_resident_memory_bytes") or 0) > 10e6

    lint = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=30)
    assert lint.returncode == 0, lint.stdout + lint.stderr

    # A forgotten host's series go with it.
    server.admin("hosts", "forget", waiting_id)
    _, samples = scrape(server)
    assert all(s.get("host_id") != waiting_id for s in series(samples, "virtfleet_host_up"))
    assert value(samples, "virtfleet_hosts", status="pending", role=hosts[waiting_id]["role"]) is None
    # The online host's connection closes when it is disabled; the counters say so.
    server.admin("hosts", "disable", online_id)
    _, samples = wait_for(lambda: (got := scrape(server))
                          and value(got[1], "virtfleet_libvirt_connections", state="online") == 0
                          and got, 10, "the disabled host's connection to leave the metrics")
    assert value(samples, "virtfleet_host_up", host_id=online_id, hostname="hv-metrics") == 0


def test_the_readmes_alert_rule_is_a_valid_prometheus_rule(tmp_path: Path) -> None:
    readme = (ROOT / "README.md").read_text()
    rule = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert "virtfleet_host_status" in rule
    (tmp_path / "rules.yml").write_text(rule)
    check = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yml")],
                           capture_output=True, text=True, timeout=30)
    assert check.returncode == 0 and "SUCCESS: 1 rules found" in check.stdout, check.stdout + check.stderr


def test_metrics_listen_takes_host_port_or_off() -> None:
    assert parse_metrics_listen("off") is None
    assert parse_metrics_listen("127.0.0.1:9100") == ("127.0.0.1", 9100)
    assert parse_metrics_listen("[::1]:9100") == ("::1", 9100)
    for bad in ("9100", "127.0.0.1:x", "127.0.0.1:70000"):
        with pytest.raises(argparse.ArgumentTypeError, match="9464|port"):
            parse_metrics_listen(bad)
