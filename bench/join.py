"""Join → online, next to the way of ../shared/hypervisors-seed.txt, on the same machine.

Each run adds a host in its own network namespace (its own libvirtd), the server in
another (tests/harness.py: Fleet). virtfleet: from `virtfleet-agent join` starting to the
server's history saying `online` (libvirt connection open; `join` checks in itself, so
that is usually before `run` starts). The old way (bench/oldway.sh):
sshd on the host, key copied with the root password, libvirtd checked over ssh, first
`virsh -c qemu+ssh://` connection. Then one connection open each way, timed alone.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.util import spread, table
from tests.harness import Fleet

HERE = Path(__file__).resolve().parent
OPEN_TLS = """import libvirt, sys, time
t = time.perf_counter(); c = libvirt.open(sys.argv[1]); print(time.perf_counter() - t)"""


def online_at(history: list[dict[str, Any]]) -> float:
    """When a host's history first says `online` (the server's own clock)."""
    return float(next(e["at"] for e in history if e["status"] == "online"))


def ours(fleet: Fleet, name: str) -> tuple[float, float, str]:
    """(join → online, one qemu+tls connection open, what the history says on the way)
    for a new host."""
    ns, lv, agent = fleet.add_host(name, join=False)
    token = fleet.server.token()
    started = time.time()
    result = agent.join(token)
    assert result.returncode == 0, result.stderr
    agent.start()
    host_id = agent.host_id()
    fleet.server.wait_status(host_id, "online", 30)
    host = fleet.server.host(host_id)
    took = online_at(host["history"]) - started
    path = "; ".join(f"+{float(e['at']) - started:.2f} s {e['status']}"
                     + (f" ({e['detail']})" if e["detail"] else "")
                     for e in host["history"])
    uri = host["connection"]["uri"]
    pki = fleet.server.state / "libvirt-client"
    uri += ("&" if "?" in uri else "?") + f"pkipath={pki}"
    out = subprocess.run(["ip", "netns", "exec", fleet.net.server_ns, "/usr/bin/python3", "-c",
                          OPEN_TLS, uri], capture_output=True, text=True, check=True).stdout
    return took, float(out), path


def old_way(fleet: Fleet, name: str) -> tuple[float, float]:
    """(added the manual's way, one qemu+ssh connection open) for a new host."""
    ns, lv, _agent = fleet.add_host(name, join=False)
    address = fleet.net.hosts[ns]
    with tempfile.TemporaryDirectory(prefix="vfb-ssh-") as work:
        out = subprocess.run(["unshare", "-m", "--propagation", "private", "sh",
                              str(HERE / "oldway.sh"), fleet.net.server_ns, ns, address,
                              str(lv.sock_dir / "libvirt-sock"), work],
                             capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    steps = dict(line.split() for line in out.stdout.splitlines())
    return float(steps["added"]), float(steps["open"])


def run(quick: bool) -> str:
    runs = 1 if quick else 5
    base = Path(tempfile.mkdtemp(prefix="vfb-join-"))
    fleet = Fleet.in_namespaces(base, f"vfj{os.getpid() % 10000}")
    server = fleet.server
    try:
        server.start()
        # libvirtd probes QEMU's capabilities into a cache the test libvirtds share: a
        # first libvirtd fills it outside the clock.
        fleet.add_host("warm-up", join=False)
        mine = [ours(fleet, f"tls-{i}") for i in range(runs)]
        theirs = [old_way(fleet, f"ssh-{i}") for i in range(runs)]
    finally:
        fleet.close()
    join_s, tls_open = [m[0] for m in mine], [m[1] * 1000 for m in mine]
    ssh_s, ssh_open = [t[0] for t in theirs], [t[1] * 1000 for t in theirs]
    ratio = sorted(ssh_s)[len(ssh_s) // 2] / sorted(join_s)[len(join_s) // 2]
    rows = [
        ["host added → usable connection", spread(join_s), spread(ssh_s), f"{ratio:.1f}× (medians)"],
        ["one connection open", spread(tls_open, "ms", 0), spread(ssh_open, "ms", 0), ""],
    ]
    slowest = max(mine)
    return table("Join → online (min / median / max), host in its own network namespace",
                 ["", "virtfleet (join → online, qemu+tls)", "the old way (ssh-copy-id, qemu+ssh)",
                  "old / new"], rows) + (
        f"\nThe slowest join ({slowest[0]:.2f} s), as the host's history tells it: {slowest[2]}\n")


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
