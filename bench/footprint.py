"""Agent footprint: RSS, CPU time per hour at the default check-in interval, and bytes
per check-in on the wire (TLS bytes of the agent's connection to the server, from the
kernel's TCP counters: headers of TCP/IP not included).

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
from tests.harness import Agent, Fleet, Network, Server, free_port, wait_for


def tcp_bytes(ns: str, port: int) -> tuple[int, int]:
    """(sent, received) so far on the host's connections to the server's port."""
    out = subprocess.run(["ip", "netns", "exec", ns, "ss", "-tinH", "state", "established",
                          f"dport = :{port}"], capture_output=True, text=True, check=True).stdout
    sent = sum(int(n) for n in re.findall(r"bytes_sent:(\d+)", out))
    received = sum(int(n) for n in re.findall(r"bytes_received:(\d+)", out))
    return sent, received


def last_checkin(agent: Agent) -> float | None:
    """When the agent last checked in, from its status file."""
    try:
        return json.loads((agent.state / "status.json").read_text()).get("at")
    except (FileNotFoundError, ValueError):
        return None


def checkins_seen(agent: Agent, seconds: float) -> int:
    """Watch the agent's status file for `seconds`: how many check-ins it recorded."""
    seen, last = 0, None
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        at = last_checkin(agent)
        if at is not None and at != last:
            seen += last is not None
            last = at
        time.sleep(0.1)
    return seen


def run(quick: bool) -> str:
    seconds, args = (5.0, ("--checkin-interval", "1")) if quick else (300.0, ())
    base = Path(tempfile.mkdtemp(prefix="vfb-footprint-"))
    net = Network(f"vff{os.getpid() % 10000}")
    server = Server(base / "server", free_port(), *args, host=net.server_address,
                    netns=net.server_ns)
    fleet = Fleet(net, server, base)
    try:
        server.start()
        ns, _lv, agent = fleet.add_host("hv-1")
        server.wait_status(agent.host_id(), "online", 30)
        assert agent.proc is not None and agent.proc.proc is not None
        pid = agent.proc.proc.pid
        # `join` checked in already: measure from the service's own first check-in, on
        # the connection it keeps.
        born = psutil.Process(pid).create_time()
        wait_for(lambda: (last_checkin(agent) or 0) > born, 30, "the agent's first check-in")
        sampler = Sampler({"agent": pid})
        start, before = time.time(), tcp_bytes(ns, server.port)
        count = checkins_seen(agent, seconds)
        end, after = time.time(), tcp_bytes(ns, server.port)
        private = private_mb(pid)
        sampler.stop()
        cpu, rss = sampler.window("agent", start, end)
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
    ]
    return table(f"Agent footprint (check-in interval {interval} s)", ["measure", "value", "note"],
                 rows)


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
