"""Footprint of a host: the agent's RSS and CPU time per hour at the default check-in
interval, bytes per check-in on the wire (TLS bytes of the agent's connection to the
server, from the kernel's TCP counters: headers of TCP/IP not included), and what the
host's libvirt connection costs the server (bench/libvirt_memory.py).

One host in its own network namespace (its own libvirtd, the server's libvirt connection
open), the server in another.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.util import Sampler, private_mb, table
from tests.harness import ROOT, VENV_BIN, Agent, Fleet, wait_for


def tcp_bytes(ns: str, port: int) -> tuple[int, int]:
    """(sent, received) so far on the host's connections to the server's port."""
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-tinH", "state", "established",
                          f"dport = :{port}"], capture_output=True, text=True, check=True).stdout
    sent = sum(int(n) for n in re.findall(r"bytes_sent:(\d+)", out))
    received = sum(int(n) for n in re.findall(r"bytes_received:(\d+)", out))
    return sent, received


def last_checkin(agent: Agent) -> tuple[float | None, str]:
    """When the agent last checked in, and what it sent (heartbeat or report)."""
    try:
        status = json.loads((agent.state / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return None, ""
    return status.get("at"), str(status.get("sent", ""))


def checkins_seen(agent: Agent, ns: str, port: int, seconds: float) -> dict[str, list[int]]:
    """Watch the agent's status file for `seconds`: each check-in's bytes sent, by what it
    sent (the TCP counters read as each one is recorded; check-ins are seconds apart)."""
    sent: dict[str, list[int]] = {"heartbeat": [], "report": []}
    last, before = None, tcp_bytes(ns, port)[0]
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        at, kind = last_checkin(agent)
        if at is not None and at != last:
            now = tcp_bytes(ns, port)[0]
            if last is not None and kind in sent:
                sent[kind].append(now - before)
            last, before = at, now
        time.sleep(0.05)
    return sent


def run(quick: bool) -> str:
    seconds, args = (5.0, ("--checkin-interval", "1")) if quick else (300.0, ())
    base = Path(tempfile.mkdtemp(prefix="vfb-footprint-"))
    fleet = Fleet.in_namespaces(base, f"vff{os.getpid() % 10000}", *args)
    server = fleet.server
    try:
        server.start()
        ns, libvirtd, agent = fleet.add_host("hv-1")
        server.wait_status(agent.host_id(), "online", 30)
        assert agent.proc is not None and agent.proc.proc is not None
        pid = agent.proc.proc.pid
        # `join` checked in already: measure from the service's own first check-in, on
        # the connection it keeps.
        born = psutil.Process(pid).create_time()
        wait_for(lambda: (last_checkin(agent)[0] or 0) > born, 30, "the agent's first check-in")
        sampler = Sampler({"agent": pid})
        start, before = time.time(), tcp_bytes(ns, server.port)
        kinds = checkins_seen(agent, ns, server.port, seconds)
        count = sum(map(len, kinds.values()))
        end, after = time.time(), tcp_bytes(ns, server.port)
        private = private_mb(pid)
        sampler.stop()
        cpu, rss = sampler.window("agent", start, end)
        uri = (f"qemu+tls://{fleet.net.hosts[ns]}:{libvirtd.tls_port}/system"
               f"?pkipath={server.state}/libvirt-client")
        libvirt_kb = libvirt_connection_kb(fleet.net.server_ns, uri, 100 if quick else 300)
    finally:
        fleet.close()
    interval = args[1] if args else "10"
    sent, received = after[0] - before[0], after[1] - before[1]
    rows = [
        ["RSS (peak while measured)", f"{rss:.1f} MB", "target < 40 MB"],
        ["of which its own (USS, private pages)", f"{private:.1f} MB",
         "the rest: shared libraries (libvirt, OpenSSL, Python)"],
        ["CPU time per hour", f"{cpu / 100 * 3600:.1f} s/h",
         f"interval {interval} s, {count} check-ins in {seconds:.0f} s"],
        ["bytes per check-in, sent / received", f"{sent / max(count, 1):,.0f} / "
         f"{received / max(count, 1):,.0f} B", "TLS records on a kept-alive connection"],
        ["bytes sent per heartbeat / per full report", f"{mean(kinds['heartbeat'])} / "
         f"{mean(kinds['report'])} B", f"{len(kinds['heartbeat'])} heartbeats, "
         f"{len(kinds['report'])} reports (at least every 5 min, or when it changed)"],
        ["on the server: the host's libvirt connection", f"{libvirt_kb:.0f} KB",
         "resident memory per `qemu+tls` connection (GnuTLS, libvirt's client)"],
    ]
    return table(f"Footprint of a host (check-in interval {interval} s)",
                 ["measure", "value", "note"], rows)


def mean(values: list[int]) -> str:
    return f"{sum(values) / len(values):,.0f}" if values else "-"


def libvirt_connection_kb(server_ns: str, uri: str, count: int) -> float:
    """bench/libvirt_memory.py where the server runs: KB per libvirt connection."""
    out = subprocess.run(["ip", "netns", "exec", server_ns, str(VENV_BIN / "python"), "-m",
                          "bench.libvirt_memory", uri, str(count)], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=120).stdout
    return float(json.loads(out)["kb_each"])


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
