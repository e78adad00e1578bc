"""Failure detection: how long until the server shows what happened, over repeated runs.

One host in its own network namespace, the server in another, with the server's default
check-in interval and grace period (10 s, 30 s; --quick: 1 s, 4 s). Times come from the
server's own status history, from the moment the fault was made (or mended). A dead
agent whose host's libvirt still answers leaves the host online with a warning: that
warning's delay is measured from the agent's last check-in.
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench.util import spread, table
from tests.harness import Fleet

QUICK_ARGS = ("--checkin-interval", "1", "--grace", "3")
WARNING = "warning: the agent has not checked in"


def changed_at(fleet: Fleet, host_id: str, statuses: set[str], since: float,
               timeout: float) -> float:
    """Seconds from `since` to the first history entry in `statuses` after it."""
    def entry() -> float | None:
        for e in fleet.server.host(host_id)["history"]:
            if e["status"] in statuses and e["at"] >= since:
                return float(e["at"])
        return None

    deadline = time.monotonic() + timeout
    while (at := entry()) is None:
        assert time.monotonic() < deadline, f"no {statuses} within {timeout} s"
        time.sleep(0.05)
    return at - since


def one_round(fleet: Fleet, grace: float) -> dict[str, float]:
    ns, lv, agent = fleet.hosts[0]
    host_id = agent.host_id()
    took = {}
    t = time.time()
    lv.stop()
    took["libvirtd killed → error"] = changed_at(fleet, host_id, {"error"}, t, 30)
    lv.start()  # returns once libvirtd listens: measured from there
    t = time.time()
    took["libvirtd back → online"] = changed_at(fleet, host_id, {"online"}, t, 30)
    t = time.time()
    fleet.net.link(ns, up=False)
    took["link down → error/offline"] = changed_at(fleet, host_id, {"error", "offline"}, t, grace + 30)
    fleet.net.link(ns, up=True)
    t = time.time()
    took["link up → online"] = changed_at(fleet, host_id, {"online"}, t, 90)
    agent.stop(signal.SIGKILL)
    # libvirt still answers: the host stays online, and its detail names the silent agent.
    deadline = time.monotonic() + grace + 30
    while WARNING not in (host := fleet.server.host(host_id))["detail"]:
        assert time.monotonic() < deadline, "no warning about the silent agent"
        time.sleep(0.05)
    took["agent gone → warned (after its last check-in)"] = time.time() - host["last_checkin"]
    agent.start()
    fleet.server.wait_status(host_id, "online", 30)
    return took


def run(quick: bool) -> str:
    runs, args, grace = (1, QUICK_ARGS, 3.0) if quick else (5, (), 30.0)
    base = Path(tempfile.mkdtemp(prefix="vfb-detect-"))
    fleet = Fleet.in_namespaces(base, f"vfd{os.getpid() % 10000}", *args)
    server = fleet.server
    results: dict[str, list[float]] = {}
    try:
        server.start()
        _, _, agent = fleet.add_host("hv-1")
        server.wait_status(agent.host_id(), "online", 30)
        for _ in range(runs):
            for what, seconds in one_round(fleet, grace).items():
                results.setdefault(what, []).append(seconds)
    finally:
        fleet.close()
    targets = {"libvirtd killed → error": "< 1 s", "libvirtd back → online": "< 2 s",
               "link down → error/offline": "< 10 s", "link up → online": "",
               "agent gone → warned (after its last check-in)": f"grace ({grace:g} s) + < 1 s"}
    rows = [[what, spread(values, "s", 3), targets[what]] for what, values in results.items()]
    return table(f"Failure detection (min / median / max; interval {args[1] if args else 10} s, "
                 f"grace {grace:g} s)", ["fault", "server shows it after", "target"], rows)


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
