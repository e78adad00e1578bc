"""Load generator: simulated hosts checking in exactly as the agent does.

Each simulated host is the agent's own `ServerClient` (one keep-alive aiohttp session,
its own client certificate, the wire messages of common/wire.py) driven by the loop of
agent/runner.py: check in, then wait the interval; after a failure wait the runner's
jittered backoff (1 s doubling to 60 s), 300 s when the identity is refused. What it
skips is the agent's collectors: the report is built once (bench/report.py).

Usage: loadgen.py URL IDENTITIES FIRST COUNT SCHEDULE
  SCHEDULE: "INTERVAL:SECONDS,INTERVAL:SECONDS,…" (an interval of 0 means "as the server
  says"). Prints one JSON line per second: step, ok, errors (by kind), latencies (ms),
  and `recovered`: hosts with a successful check-in since the last SIGUSR1 (the mark).
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import ssl
import sys
import time
from collections import Counter
from pathlib import Path

from agent.client import ServerClient, ServerError
from agent.runner import REFUSED_WAIT
from bench.report import simulated_report
from common import wire
from common.backoff import Backoff


class Stats:
    """What happened in the current second; flushed as one JSON line."""

    def __init__(self) -> None:
        self.step = 0
        self.mark = time.time()
        self.last_ok: dict[int, float] = {}
        self.reset()

    def reset(self) -> None:
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()

    def line(self) -> str:
        recovered = sum(1 for t in self.last_ok.values() if t >= self.mark)
        text = json.dumps({"t": time.time(), "step": self.step, "ok": len(self.latencies),
                           "errors": dict(self.errors), "recovered": recovered,
                           "lat": [round(x, 2) for x in self.latencies]})
        self.reset()
        return text


def error_kind(exc: ServerError) -> str:
    """Group errors by what went wrong, not by their exact text."""
    if exc.status is not None:
        return f"HTTP {exc.status}"
    text = str(exc)
    for kind in ("Connection refused", "Timeout", "reset", "TLS", "Server disconnected"):
        if kind.lower() in text.lower():
            return kind
    return text[:60]


async def host_loop(i: int, client: ServerClient, report: wire.Report, stats: Stats,
                    interval: list[float]) -> None:
    """agent/runner.py's check-in loop, minus collectors and status files."""
    backoff = Backoff(base=1.0, cap=60.0)
    await asyncio.sleep(random.random() * (interval[0] or 10.0))  # hosts start at random times
    while True:
        started = time.perf_counter()
        try:
            answer = await client.checkin(report)
        except ServerError as exc:
            stats.errors[error_kind(exc)] += 1
            delay = REFUSED_WAIT if exc.identity_refused else backoff.next_delay()
        else:
            stats.latencies.append((time.perf_counter() - started) * 1000)
            stats.last_ok[i] = time.time()
            backoff.reset()
            delay = interval[0] or answer.checkin_interval
        await asyncio.sleep(delay)


def client_for(url: str, identities: Path, i: int) -> ServerClient:
    """The agent's State.client_context(), from the seeded identity files."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(identities / "ca.crt"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(identities / f"{i}.pem")
    return ServerClient(url, ctx)


async def run(url: str, identities: Path, first: int, count: int,
              schedule: list[tuple[float, float]], base: wire.Report) -> None:
    stats = Stats()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: setattr(stats, "mark", time.time()))
    interval = [schedule[0][0]]
    tasks = []
    for i in range(first, first + count):
        report = wire.Report(**{**vars(base), "hostname": f"sim-{i:05d}"})
        tasks.append(asyncio.create_task(host_loop(i, client_for(url, identities, i), report,
                                                   stats, interval)))
    print(json.dumps({"ready": count}), flush=True)
    for step, (step_interval, seconds) in enumerate(schedule):
        stats.step, interval[0] = step, step_interval
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await asyncio.sleep(1.0 - time.time() % 1.0)  # lines on whole seconds
            print(stats.line(), flush=True)
    for task in tasks:
        task.cancel()


def main() -> int:
    url, identities, first, count, schedule = sys.argv[1:6]
    steps = [(float(a), float(b)) for a, b in (s.split(":") for s in schedule.split(","))]
    base = simulated_report()  # before our loop: it runs the collectors in one of its own
    asyncio.run(run(url, Path(identities), int(first), int(count), steps, base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
