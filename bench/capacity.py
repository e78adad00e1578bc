"""Check-in capacity: N simulated hosts against the real server, then a restart storm,
then the highest sustained rate, next to a bare aiohttp mTLS handler measured the same way.

Hosts are seeded through the server's own modules (bench/seed.py); the load generators
(bench/loadgen.py, separate processes) are the agent's own client and loop.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.report import simulated_report
from bench.seed import seed_hosts
from bench.util import Sampler, pct, table
from tests.harness import ROOT, VENV_BIN, Server, free_port, wait_for

P99_LIMIT_MS = 100.0


@dataclass
class Scale:
    hosts: int
    interval: float  # the server's check-in interval
    settle: float  # after every host's first check-in, before the measured window
    hold: float
    rates: list[float]  # check-ins per second tried in the rate search
    step: float  # seconds per rate step; the last `step - settle` are measured
    procs: int  # load generator processes


QUICK = Scale(hosts=200, interval=1, settle=1.5, hold=2, rates=[200, 400], step=3, procs=1)
FULL = Scale(hosts=10_000, interval=10, settle=20, hold=120,
             rates=[800, 1000, 1200, 1500, 2000, 2500, 3000], step=50, procs=2)
# Every host connecting at once (a cold start, a restart) may take minutes on 2 cores.
STORM_PATIENCE = 900


class LoadGen:
    """Load generator processes over a slice of the hosts each; their lines, as they come."""

    def __init__(self, urls: list[str], identities: Path, scale: Scale,
                 schedule: list[tuple[float, float]], log: Path) -> None:
        """Process p checks in at urls[p % len(urls)] (replicas: a share each)."""
        hosts, procs = scale.hosts, scale.procs
        spec = ",".join(f"{i}:{s}" for i, s in schedule)
        share = hosts // procs
        self.procs = []
        self.lines: list[list[dict[str, Any]]] = []
        for p in range(procs):
            count = share if p < procs - 1 else hosts - share * (procs - 1)
            proc = subprocess.Popen(
                [str(VENV_BIN / "python"), "-m", "bench.loadgen", urls[p % len(urls)], str(identities),
                 str(p * share), str(count), f"{scale.interval:g}", spec], cwd=ROOT, stdout=subprocess.PIPE,
                stderr=open(log, "ab"), text=True, start_new_session=True)
            self.procs.append(proc)
            self.lines.append([])
            threading.Thread(target=self._read, args=(proc, self.lines[-1]), daemon=True).start()

    @staticmethod
    def _read(proc: subprocess.Popen[str], into: list[dict[str, Any]]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            into.append(json.loads(line))

    def wait_ready(self) -> float:
        def ready() -> bool:
            dead = [p.args for p in self.procs if p.poll() is not None]
            assert not dead, f"a load generator exited: {dead} (see loadgen.log)"
            return all(lines and "ready" in lines[0] for lines in self.lines)

        wait_for(ready, 300, "the load generators to create their clients", interval=0.2)
        return time.time()

    def mark(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGUSR1)

    def next_step(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGUSR2)

    def recovered(self, since: float = 0.0) -> int:
        """Hosts whose last check-in worked, by the newest lines printed after `since` (a
        mark's time: older lines still count from the mark before)."""
        return sum(lines[-1].get("recovered", 0) for lines in self.lines
                   if len(lines) > 1 and lines[-1]["t"] > since + 0.5)

    def window(self, start: float, end: float) -> dict[str, Any]:
        """Check-ins, errors and latencies of the seconds in [start, end)."""
        seconds = [ln for lines in self.lines for ln in lines if "t" in ln and start < ln["t"] <= end]
        latencies = [x for ln in seconds for x in ln["lat"]]
        errors: dict[str, int] = {}
        for ln in seconds:
            for kind, n in ln["errors"].items():
                errors[kind] = errors.get(kind, 0) + n
        # Each line covers the second before its time: count the seconds there are lines for
        # (the last second of a run may have none yet).
        covered = len({round(ln["t"]) for ln in seconds})
        return {"ok": len(latencies), "rate": len(latencies) / max(covered, 1),
                "p50": pct(latencies, 50), "p99": pct(latencies, 99), "max": max(latencies, default=0),
                "errors": sum(errors.values()), "kinds": errors}

    def stop(self) -> None:
        for proc in self.procs:
            proc.kill()
            proc.wait()


def run(quick: bool, profile: Path | None = None) -> str:
    scale = QUICK if quick else FULL
    work = Path(tempfile.mkdtemp(prefix="vfb-capacity-"))
    state, identities = work / "server", work / "identities"
    started = time.monotonic()
    seed_hosts(state, identities, scale.hosts, simulated_report())
    seeded = time.monotonic() - started
    out = [hold_and_storm(scale, work, state, identities, seeded, profile)]
    out.append(rate_search(scale, work, state, identities))
    for parent in (work, work.parent):  # its user reaches the state dir through them
        parent.chmod(parent.stat().st_mode | 0o111)
    subprocess.run(["chown", "-R", f"{UNIT_USER}:{UNIT_GROUP}", str(state)], check=True)
    out.append(hold_and_storm(scale, work, state, identities, seeded, None, as_unit()))
    return "".join(out)


# The packaged unit (systemd/virtfleet-server.service) runs the server as its own user,
# with NoNewPrivileges, no capabilities and LimitNOFILE=524288 (here capped at this
# machine's hard limit): the same, without systemd (its filters and mount namespaces
# cost nothing per check-in).
UNIT_NOFILE = 524288
UNIT_USER, UNIT_GROUP = "nobody", "nogroup"


def as_unit() -> list[str]:
    import resource

    nofile = min(UNIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    return ["prlimit", f"--nofile={nofile}:{nofile}", "setpriv", f"--reuid={UNIT_USER}",
            f"--regid={UNIT_GROUP}", "--clear-groups", "--no-new-privs", "--bounding-set=-all",
            "--inh-caps=-all"]


def start_server_argv(state: Path, port: int, scale: Scale, wrap: list[str]) -> list[str]:
    return [*wrap, *Server(state, port, *server_args(scale, wrap)).proc.argv]


def server_args(scale: Scale, wrap: list[str]) -> tuple[str, ...]:
    # The unit's user is a member of the engine group the package makes; here, its own.
    group = ("--engine-group", UNIT_GROUP) if wrap else ()
    return ("--checkin-interval", f"{scale.interval:g}", "--log-level", "WARNING", *group)


def start_server(state: Path, port: int, scale: Scale, profile: Path | None,
                 wrap: list[str] = []) -> Server:  # noqa: B006 (never changed)
    server = Server(state, port, *server_args(scale, wrap))
    server.proc.argv = [*wrap, *server.proc.argv]
    if wrap:  # the unit's RuntimeDirectory, made by systemd for its user
        server.run_dir.mkdir(mode=0o750, exist_ok=True)
        shutil.chown(server.run_dir, UNIT_USER, UNIT_GROUP)
    if profile is not None:
        # pyinstrument samples the whole server run and writes its report when it exits.
        server.proc.argv = [str(VENV_BIN / "pyinstrument"), "-r", "text", "--show-all", "-o", str(profile),
                            "-m", "server.cli", *server.proc.argv[1:]]
    return server.start()


def server_pid(server: Server) -> int:
    assert server.proc.proc is not None
    return server.proc.proc.pid


def hold_and_storm(scale: Scale, work: Path, state: Path, identities: Path, seeded: float,
                   profile: Path | None, wrap: list[str] = []) -> str:  # noqa: B006
    """`wrap`: a command the server runs under (as_unit)."""
    port = free_port()
    server = start_server(state, port, scale, profile, wrap)
    plain_argv = start_server_argv(state, port, scale, wrap)
    # Interval 0: each host waits what the server tells it, as the agent does.
    load = LoadGen([server.url], identities, scale, [(0, 7200)], work / "loadgen.log")
    sampler = Sampler({"server": server_pid(server)})
    try:
        t0 = load.wait_ready()
        for i, proc in enumerate(load.procs):
            sampler.watch(f"loadgen{i}", proc.pid)
        # A cold start: every host makes its first TLS handshake within one interval.
        wait_for(lambda: load.recovered() >= scale.hosts, STORM_PATIENCE, "every host's first check-in", 0.5)
        t_cold = time.time()
        cold = load.window(t0, t_cold)
        cold_rss = sampler.window("server", t0, t_cold)[1]
        time.sleep(scale.settle + scale.hold)
        a, b = t_cold + scale.settle, t_cold + scale.settle + scale.hold
        hold = load.window(a, b)
        cpu, rss = sampler.window("server", a, b)
        gen_cpu = sum(sampler.window(f"loadgen{i}", a, b)[0] for i in range(scale.procs))
        # A restart with every host checking in: the agents notice on their next
        # check-in and come back with their own backoff.
        t_stop = time.time()
        server.proc.stop()
        t_mark = time.time()
        load.mark()  # once it is down: "recovered" counts check-ins after the restart
        server.proc.argv = plain_argv  # the restart is not profiled
        server.start()
        t_ready = time.time()
        sampler.watch("server", server_pid(server))
        wait_for(lambda: load.recovered(t_mark) >= scale.hosts, STORM_PATIENCE,
                 "every host to check in again", 0.5)
        t_all = time.time()
        time.sleep(1.5)  # the last second's line
        storm = load.window(t_stop, t_all + 1)
        after_ready = load.window(t_ready + 1, t_all + 1)
        storm_cpu, storm_rss = sampler.window("server", t_ready, t_all + 1)
    finally:
        sampler.stop()
        load.stop()
        server.proc.stop()
    rows = [
        ["hosts (each its own identity and certificate)", f"{scale.hosts:,}", f"seeded in {seeded:.0f} s"],
        ["check-in interval", f"{scale.interval:g} s", f"target {scale.hosts / scale.interval:,.0f}/s"],
        ["cold start: every host checked in after", f"{t_cold - t0:.0f} s",
         f"{cold['errors']:,} failed tries ({fmt_kinds(cold['kinds'])}); server peak RSS "
         f"{cold_rss:.0f} MB"],
        ["steady: check-ins/s (measured window)", f"{hold['rate']:,.0f}/s",
         f"{scale.hold:g} s window, {scale.settle:g} s after the cold start"],
        ["steady: errors", f"{hold['errors']}", fmt_kinds(hold["kinds"])],
        ["steady: latency p50 / p99 / max", ms3(hold), "target p99 < 100 ms"],
        ["steady: server CPU / RSS", f"{cpu:.0f} % of a core / {rss:.0f} MB", "target RSS < 500 MB"],
        ["steady: load generator CPU", f"{gen_cpu:.0f} % of a core", f"{scale.procs} process(es)"],
        ["restart storm: server back (listening) after", f"{t_ready - t_stop:.1f} s", "SIGTERM, start again"],
        ["restart storm: all hosts checked in again after", f"{t_all - t_stop:.1f} s",
         f"{t_all - t_ready:.1f} s after it listened"],
        ["restart storm: failed check-ins while it was down", f"{storm['errors'] - after_ready['errors']:,}",
         "connection refused: retried with backoff"],
        ["restart storm: failed tries once it listened", f"{after_ready['errors']:,}",
         fmt_kinds(after_ready["kinds"])],
        ["restart storm: latency p50 / p99 / max", ms3(after_ready), "successful check-ins"],
        ["restart storm: server CPU / peak RSS", f"{storm_cpu:.0f} % / {storm_rss:.0f} MB", ""],
    ]
    how = " under the packaged unit's limits (" + " ".join(wrap) + ")" if wrap else ""
    return table(f"Check-in capacity ({scale.hosts:,} hosts){how}", ["measure", "value", "note"], rows)


def rate_search(scale: Scale, work: Path, state: Path, identities: Path) -> str:
    """Raise the rate step by step (shorter intervals), virtfleet-server then bare aiohttp."""
    port = free_port()
    server = start_server(state, port, scale, None)
    try:
        ours = steps(scale, [server.url], identities, work, [server_pid(server)])
    finally:
        server.proc.stop()
    bare_port = free_port()
    bare = subprocess.Popen([str(VENV_BIN / "python"), "-m", "bench.bare_server", str(state),
                             str(bare_port), f"{scale.interval:g}"], cwd=ROOT,
                            stderr=open(work / "bare.log", "ab"), start_new_session=True)
    try:
        wait_for(lambda: subprocess.run(["ss", "-Hltn", f"sport = :{bare_port}"], capture_output=True,
                                        text=True).stdout.strip(), 20, "the bare server")
        theirs = steps(scale, [f"https://127.0.0.1:{bare_port}"], identities, work, [bare.pid])
    finally:
        bare.kill()
        bare.wait()
    rows = []
    for rate, (a, b) in zip(scale.rates, zip(ours, theirs, strict=True), strict=True):
        rows.append([f"{rate:,.0f}/s", *cells(a), *cells(b)])
    best_ours, best_bare = best(ours), best(theirs)
    rows.append(["highest sustained", f"{best_ours:,.0f}/s", "", "", "", f"{best_bare:,.0f}/s", "", "", ""])
    header = ["target", "virtfleet: achieved", "p50 / p99 ms", "errors", "server CPU",
              "bare aiohttp: achieved", "p50 / p99 ms", "errors", "server CPU"]
    return table(f"Highest sustained check-in rate ({scale.hosts:,} hosts, p99 < {P99_LIMIT_MS:g} ms, "
                 "0 errors)", header, rows)


def steps(scale: Scale, urls: list[str], identities: Path, work: Path,
          pids: list[int]) -> list[dict[str, Any]]:
    """Each rate for `scale.step` seconds, after a first step that lasts until every host has
    checked in once (its cold start is not measured). `cpu`: of every process in `pids`
    (the servers, and a database)."""
    schedule = [(0.0, STORM_PATIENCE)]  # the server's intervals spread the hosts out
    schedule += [(scale.hosts / rate, scale.step) for rate in scale.rates]
    load = LoadGen(urls, identities, scale, schedule, work / "loadgen.log")
    sampler = Sampler({f"server{i}": pid for i, pid in enumerate(pids)})
    try:
        load.wait_ready()
        wait_for(lambda: load.recovered() >= scale.hosts, STORM_PATIENCE, "every host's first check-in", 0.5)
        t0 = time.time()
        load.next_step()
        wait_for(lambda: all(p.poll() is not None for p in load.procs),
                 scale.step * len(scale.rates) + 60, "the rate steps", 0.5)
        results = []
        for n in range(len(scale.rates)):
            # Hosts finish the sleep of the previous step first (up to 1.5 of its
            # intervals): measure after that.
            settle = 1.5 * (schedule[n][0] or scale.interval)
            a, b = t0 + n * scale.step + settle, t0 + (n + 1) * scale.step
            result = load.window(a, b)
            cpus = [sampler.window(f"server{i}", a, b)[0] for i in range(len(pids))]
            # A process that ended (a database's autovacuum worker) has no samples: nan.
            result["cpu"] = sum(c for c in cpus if not math.isnan(c))
            results.append(result)
        return results
    finally:
        sampler.stop()
        load.stop()


def cells(r: dict[str, Any]) -> list[str]:
    return [f"{r['rate']:,.0f}/s", f"{r['p50']:.1f} / {r['p99']:.1f}", str(r["errors"]), f"{r['cpu']:.0f} %"]


def best(results: list[dict[str, Any]]) -> float:
    good = [r["rate"] for r in results if r["p99"] < P99_LIMIT_MS and r["errors"] == 0 and r["ok"]]
    return max(good, default=0.0)


def ms3(r: dict[str, Any]) -> str:
    if not r["ok"]:
        return "-"
    return f"{r['p50']:.1f} / {r['p99']:.1f} / {r['max']:.0f} ms"


def fmt_kinds(kinds: dict[str, int]) -> str:
    return ", ".join(f"{k}: {n}" for k, n in kinds.items())


if __name__ == "__main__":
    print(run("--quick" in sys.argv, Path(os.environ["PROFILE"]) if os.environ.get("PROFILE") else None))
