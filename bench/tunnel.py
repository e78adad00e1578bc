"""Tunnel hosts, measured (issue 18), each figure next to a direct host's in the same run:
join → online (a tunnel host sets no libvirtd TLS up: no libvirtd restart), one libvirt
RPC through the gateway, and what tunnels cost the server, at 1,000 simulated hosts.

Hosts are in their own network namespaces (tests/harness.py: Network), the tunnel hosts
behind a masquerading router; the simulated hosts (bench/tunnelgen.py) run the agent's
own tunnel code against a server on loopback. Target: a tunnel host online < 0.3 s
after it enrolled.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import libvirt

from bench.gateway import median_us
from bench.join import online_at
from bench.report import simulated_report
from bench.seed import seed_hosts
from bench.util import cpu_seconds, rss_mb, spread, table
from common import libvirt_events
from tests.harness import VENV_BIN, Fleet, Server, free_port, wait_for


def join_online(fleet: Fleet, name: str, tunnel: bool,
                unattended: bool = False) -> tuple[float, float]:
    """(join started → online, enrolled → online) for a new host, in seconds. `unattended`:
    the join string in agent.toml and `run` started (it enrolls), instead of `join` then
    `run`."""
    _ns, _lv, agent = fleet.add_host(name, join=False, natted=tunnel)
    token = fleet.server.token("--transport", "tunnel" if tunnel else "direct")
    started = time.time()
    if unattended:
        agent.config.write_text(f"join = {json.dumps(token)}\n" + agent.config.read_text())
    else:
        assert agent.join(token).returncode == 0
    agent.start()
    host_id = wait_for(lambda: agent.host_id(), 30, f"{name} to enroll")
    fleet.server.wait_status(host_id, "online", 30)
    history = fleet.server.host(host_id)["history"]
    online = online_at(history)
    return online - started, online - float(history[0]["at"])


def rpc_medians(uri: str, calls: int) -> tuple[float, float]:
    conn = libvirt.open(uri)
    try:
        return median_us(conn.getLibVersion, calls), median_us(lambda: conn.listAllDomains(0), calls)
    finally:
        conn.close()


def hosts_part(quick: bool) -> str:
    runs, calls = (1, 300) if quick else (5, 3000)
    base = Path(tempfile.mkdtemp(prefix="vfb-tunnel-"))
    fleet = Fleet.in_namespaces(base, f"vft{os.getpid() % 10000}")
    server = fleet.server
    try:
        server.start()
        fleet.add_host("warm-up", join=False)  # fills the shared QEMU capabilities cache
        direct = [join_online(fleet, f"direct-{i}", tunnel=False) for i in range(runs)]
        tunnel = [join_online(fleet, f"tunnel-{i}", tunnel=True) for i in range(runs)]
        unattended = [join_online(fleet, f"unattended-{i}", tunnel=True, unattended=True)
                      for i in range(runs)]
        libvirt_events.start()
        ids = {a.base.name: a.host_id() for _n, _l, a in fleet.hosts if a.base.name != "warm-up"}
        rpc = {kind: rpc_medians(server.gateway_uri(ids[f"{kind}-0"]), calls)
               for kind in ("direct", "tunnel")}
    finally:
        fleet.close()
    rows = [[what] + [spread([r[i] for r in runs_]) for runs_ in (direct, tunnel, unattended)] + [""]
            for i, what in enumerate(["join started → online", "enrolled → online"])]
    for i, call in enumerate(["getLibVersion", "listAllDomains"]):
        rows.append([f"{call} through the gateway, median of {calls}", f"{rpc['direct'][i]:.0f} µs",
                     f"{rpc['tunnel'][i]:.0f} µs", "", f"{rpc['tunnel'][i] / rpc['direct'][i]:.2f}×"])
    return table("A direct host and a NATed tunnel host (min / median / max)",
                 ["", "direct (qemu+tls)", "tunnel (join, then run)",
                  "tunnel (join string in agent.toml)", "tunnel / direct"], rows)


def scale_part(quick: bool) -> str:
    count, window = (200, 5.0) if quick else (1000, 20.0)
    work = Path(tempfile.mkdtemp(prefix="vfb-tunnels-"))
    state, identities = work / "server", work / "identities"
    # Pending hosts: their tunnels open, and the server opens no libvirt connection through
    # them (the simulated hosts have no libvirtd), so what is measured is the tunnels.
    seed_hosts(state, identities, count, simulated_report(), transport="tunnel", enable=False)
    server = Server(state, free_port(), "--log-level", "WARNING").start()
    assert server.proc.proc is not None
    pid = server.proc.proc.pid
    gen: subprocess.Popen[str] | None = None
    try:
        before = rss_mb(pid)
        gen = subprocess.Popen([str(VENV_BIN / "python"), "-m", "bench.tunnelgen", server.url,
                                str(identities), str(count)], stdout=subprocess.PIPE, text=True,
                               cwd=Path(__file__).resolve().parent.parent)
        assert gen.stdout is not None
        opened = time.monotonic()
        ready = json.loads(gen.stdout.readline())
        took = time.monotonic() - opened
        wait_for(lambda: server.api("GET", "/v1/status") is not None, 10, "the server")
        time.sleep(window / 4)  # let buffers settle before reading RSS
        after = rss_mb(pid)
        cpu_start, t0 = cpu_seconds(pid), time.monotonic()
        time.sleep(window)
        cpu = (cpu_seconds(pid) - cpu_start) / (time.monotonic() - t0)
        still = json.loads(gen.stdout.readline())
    finally:
        if gen is not None:
            gen.send_signal(signal.SIGTERM)
            gen.wait(30)
        server.close()
    return table(f"{count} simulated tunnel hosts on one server (pings every 2 s each way)", [
        "what", "value"], [
        ("tunnels open (at the end)", f"{ready['ready']} ({still['open']})"),
        ("time to open them all (50 handshakes at once)", f"{took:.1f} s"),
        ("server RSS, no tunnel → all open", f"{before:.0f} → {after:.0f} MB"),
        ("server RSS per tunnel", f"{(after - before) * 1024 / count:.0f} KB"),
        (f"server CPU with them open ({window:.0f} s)", f"{cpu * 100:.1f} % of a core"),
    ])


def run(quick: bool) -> str:
    return hosts_part(quick) + scale_part(quick)


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
