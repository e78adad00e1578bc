"""Replicas on PostgreSQL: failover, what the database does, and check-in capacity.

Two replicas (`serve --database`) on a PostgreSQL 15 cluster of the benchmark's own, and
hosts with real libvirtds checking in every second, all on loopback. Each round kills
(SIGKILL) the replica that owns more hosts and times until every host it owned has an
open libvirt connection at the other (the survivor's link state, not the stored status,
which still says `online` from before), then starts it again and waits until the hosts
are shared out again. The database's load: its committed transactions and its
processes' CPU over a quiet window. Then the check-in capacity of two replicas on
PostgreSQL next to one server on SQLite (`capacity`).
"""

from __future__ import annotations

import re
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import psutil

from bench.capacity import Scale, best, cells, server_args, server_pid, steps
from bench.report import simulated_report
from bench.seed import seed_hosts
from bench.util import cpu_seconds, spread, table
from tests.harness import VENV_BIN, Agent, Libvirtd, Postgres, Server, free_port, wait_for

ARGS = ("--checkin-interval", "1", "--grace", "4")


def run(quick: bool) -> str:
    return failover_and_load(quick) + capacity(quick)


def failover_and_load(quick: bool) -> str:
    count, rounds, window = (4, 2, 5.0) if quick else (8, 5, 20.0)
    base = Path(tempfile.mkdtemp(prefix="vfb-replicas-"))
    pg = Postgres(free_port()).start()
    replicas: list[Server] = []
    hosts: list[tuple[Libvirtd, Agent]] = []
    try:
        url = pg.new_database("bench")
        subprocess.run([str(VENV_BIN / "virtfleet-server"), "--state-dir", str(base / "init"),
                        "init", "--database", url], check=True, capture_output=True, timeout=60)
        replicas = [Server(base / name, free_port(), *ARGS, "--database", url).start()
                    for name in ("a", "b")]
        token = replicas[0].token("--uses", str(count))
        for i in range(count):
            lv = Libvirtd(base / f"lv{i}", free_port())
            lv.start()
            agent = Agent(base / f"hv-{i}", lv.agent_config(), hostname=f"hv-{i}")
            assert agent.join(token).returncode == 0
            agent.start()
            hosts.append((lv, agent))
        ids = [agent.host_id() for _lv, agent in hosts]
        shared_out(replicas, ids)
        load = database_load(pg, replicas, window)
        times, moved = [], 0
        for _ in range(rounds):
            took, hosts_moved = failover(replicas, ids)
            times.append(took)
            moved += hosts_moved
    finally:
        for lv, agent in hosts:
            agent.stop()
            lv.stop()
        for server in replicas:
            server.close()
        pg.close()
    rows = [
        ["replica killed → each of its hosts connected at the other", spread(times),
         f"{rounds} kills, {moved} hosts moved; leases run 6 s, renewed every 2 s"],
        ["database transactions per second", f"{load['commits'] / window:.0f}",
         f"each autocommit read counts one; both replicas' loops (sweep every 1 s, check-in "
         f"writes every 0.1 s, lease rounds every 2 s) and {load['checkins'] / window:.0f} "
         "check-ins a second"],
        ["database transactions per check-in", f"{load['commits'] / load['checkins']:.1f}",
         f"{load['checkins']:.0f} check-ins in {window:.0f} s ({count} hosts, every 1 s): "
         "with few hosts the loops dominate"],
        ["database CPU", f"{load['cpu'] / window * 100:.1f} % of a core", "every PostgreSQL process"],
    ]
    return table(f"Replicas on PostgreSQL (2 replicas, {count} hosts)", ["measure", "value", "note"],
                 rows)


def owners(server: Server, ids: list[str]) -> dict[str, str]:
    return {h: server.host(h)["owner"] for h in ids}


def me(server: Server) -> str:
    return wait_for(lambda: next((r["id"] for r in server.api("GET", "/v1/replicas") if r["me"]), ""),
                    10, "the replica to list itself")


def connected_at(server: Server, host_id: str) -> bool:
    return bool(server.host(host_id)["connection"].get("state") == "online")


def shared_out(replicas: list[Server], ids: list[str]) -> None:
    """Until each replica owns half the hosts and holds each one's link."""
    half = len(ids) // 2
    names = {me(s): s for s in replicas}

    def even() -> bool:
        owned = owners(replicas[0], ids)
        return (sorted(list(owned.values()).count(n) for n in names) == [half, half]
                and all(connected_at(names[owned[h]], h) for h in ids))

    wait_for(even, 60, "the hosts shared out, every link open")


def failover(replicas: list[Server], ids: list[str]) -> tuple[float, int]:
    names = {me(s): s for s in replicas}
    owned = owners(replicas[0], ids)
    victim_name = max(names, key=lambda n: list(owned.values()).count(n))
    victim = names[victim_name]
    survivor = next(s for n, s in names.items() if n != victim_name)
    theirs = [h for h, o in owned.items() if o == victim_name]
    victim.proc.stop(signal.SIGKILL)
    killed = time.monotonic()
    wait_for(lambda: all(connected_at(survivor, h) for h in theirs), 60,
             "the killed replica's hosts connected at the other", interval=0.02)
    took = time.monotonic() - killed
    victim.close()
    victim.start()
    shared_out(replicas, ids)
    return took, len(theirs)


def checkins_served(server: Server) -> float:
    text = urllib.request.urlopen(server.metrics_url, timeout=10).read().decode()
    return sum(float(m) for m in re.findall(r"^virtfleet_checkins_total\{[^}]*\} (\S+)$", text, re.M))


def database_load(pg: Postgres, replicas: list[Server], window: float) -> dict[str, float]:
    def commits() -> float:
        return float(pg.sql("SELECT xact_commit FROM pg_stat_database WHERE datname='bench'"))

    def cpu() -> float:
        assert pg.proc.proc is not None
        root = psutil.Process(pg.proc.proc.pid)
        return sum(cpu_seconds(p.pid) for p in [root, *root.children(recursive=True)])

    before = (commits(), cpu(), sum(map(checkins_served, replicas)))
    time.sleep(window)  # the load itself: the hosts check in on their own meanwhile
    after = (commits(), cpu(), sum(map(checkins_served, replicas)))
    return {"commits": after[0] - before[0], "cpu": after[1] - before[1],
            "checkins": max(after[2] - before[2], 1.0)}



QUICK = Scale(hosts=200, interval=1, settle=1.5, hold=0, rates=[200, 400], step=4, procs=2)
FULL = Scale(hosts=2000, interval=10, settle=10, hold=0, rates=[400, 800, 1200, 1600, 2000],
             step=30, procs=2)


def capacity(quick: bool) -> str:
    """The same simulated hosts' check-ins (bench/loadgen.py, as in bench/run capacity)
    at rising rates: one server on SQLite, then two replicas on PostgreSQL, each load
    generator at one replica. CPU: the servers' and the database's together."""
    scale = QUICK if quick else FULL
    work = Path(tempfile.mkdtemp(prefix="vfb-replicas-capacity-"))
    report = simulated_report()
    seed_hosts(work / "sqlite", work / "sqlite-ids", scale.hosts, report)
    alone = Server(work / "sqlite", free_port(), *server_args(scale, [])).start()
    try:
        sqlite = steps(scale, [alone.url], work / "sqlite-ids", work, [server_pid(alone)])
    finally:
        alone.proc.stop()
    pg = Postgres(free_port()).start()
    replicas: list[Server] = []
    try:
        url = pg.new_database("capacity")
        subprocess.run([str(VENV_BIN / "virtfleet-server"), "--state-dir", str(work / "init"),
                        "init", "--database", url], check=True, capture_output=True, timeout=60)
        seed_hosts(work / "seed", work / "pg-ids", scale.hosts, report, database=url)
        replicas = [Server(work / name, free_port(), *server_args(scale, []), "--database", url).start()
                    for name in ("a", "b")]
        assert pg.proc.proc is not None
        database = [p.pid for p in psutil.Process(pg.proc.proc.pid).children(recursive=True)]
        shared = steps(scale, [r.url for r in replicas], work / "pg-ids", work,
                       [*map(server_pid, replicas), pg.proc.proc.pid, *database])
    finally:
        for server in replicas:
            server.proc.stop()
        pg.close()
    rows = [[f"{rate:,.0f}/s", *cells(a), *cells(b)]
            for rate, a, b in zip(scale.rates, sqlite, shared, strict=True)]
    rows.append(["highest sustained", f"{best(sqlite):,.0f}/s", "", "", "",
                 f"{best(shared):,.0f}/s", "", "", ""])
    header = ["target", "1 server, SQLite", "p50 / p99 ms", "errors", "CPU",
              "2 replicas, PostgreSQL", "p50 / p99 ms", "errors", "CPU (replicas + database)"]
    return table(f"Check-in capacity: one server on SQLite vs two replicas on PostgreSQL "
                 f"({scale.hosts:,} hosts, same machine)", header, rows)
