"""Footprint of a host: the agent's RSS and CPU time per hour at the default check-in
interval (a direct host and a NATed tunnel host side by side), bytes per check-in on the
wire (TLS bytes of the agent's connection to the server, from the kernel's TCP counters:
headers of TCP/IP not included), and what the host's libvirt connection costs the server
(bench/libvirt_memory.py).

Each host in its own network namespace (its own libvirtd, the server's libvirt connection
open: over TLS to the direct one, through its agent's tunnel to the other), the server in
another.
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
        # A NATed host whose libvirt the server reaches through the agent's tunnel.
        _, _, tunnel_agent = fleet.add_host("hv-2", natted=True,
                                            token_args=("--transport", "tunnel"))
        pids = {}
        for name, each in (("direct", agent), ("tunnel", tunnel_agent)):
            server.wait_status(each.host_id(), "online", 30)
            assert each.proc is not None and each.proc.proc is not None
            pids[name] = each.proc.proc.pid
            # `join` checked in already: measure from the service's own first check-in,
            # on the connection it keeps.
            born = psutil.Process(pids[name]).create_time()
            wait_for(lambda a=each, b=born: (last_checkin(a)[0] or 0) > b, 30,
                     f"the {name} agent's first check-in")
        sampler = Sampler(pids)
        start, before = time.time(), tcp_bytes(ns, server.port)
        kinds = checkins_seen(agent, ns, server.port, seconds)
        count = sum(map(len, kinds.values()))
        end, after = time.time(), tcp_bytes(ns, server.port)
        private = {name: private_mb(pid) for name, pid in pids.items()}
        sampler.stop()
        usage = {name: sampler.window(name, start, end) for name in pids}
        uri = (f"qemu+tls://{fleet.net.hosts[ns]}:{libvirtd.tls_port}/system"
               f"?pkipath={server.state}/libvirt-client")
        libvirt_kb = libvirt_connection_kb(fleet.net.server_ns, uri, 100 if quick else 300)
    finally:
        fleet.close()
    interval = args[1] if args else "10"
    sent, received = after[0] - before[0], after[1] - before[1]
    rows = [
        ["RSS (peak while measured), direct / tunnel host",
         f"{usage['direct'][1]:.1f} / {usage['tunnel'][1]:.1f} MB",
         "target < 40 MB; the tunnel host's agent carries the server's libvirt connection"],
        ["of which its own (USS, private pages)",
         f"{private['direct']:.1f} / {private['tunnel']:.1f} MB",
         "the rest: shared libraries (libvirt, OpenSSL, Python)"],
        ["CPU time per hour", f"{usage['direct'][0] / 100 * 3600:.1f} / "
         f"{usage['tunnel'][0] / 100 * 3600:.1f} s/h",
         f"interval {interval} s, {count} check-ins in {seconds:.0f} s (direct host)"],
        ["bytes per check-in, sent / received (direct host)", f"{sent / max(count, 1):,.0f} / "
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
