"""Small helpers every benchmark shares: percentiles, process CPU/RSS, tables."""

from __future__ import annotations

import os
import statistics
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

TICK = os.sysconf("SC_CLK_TCK")


def pct(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank; nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


def spread(values: Sequence[float], unit: str = "s", digits: int = 2) -> str:
    """min / median / max of repeated runs, as one cell."""
    if not values:
        return "-"
    return (f"{min(values):.{digits}f} / {statistics.median(values):.{digits}f} / "
            f"{max(values):.{digits}f} {unit} (n={len(values)})")


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def private_mb(pid: int) -> float:
    """Memory only this process uses (USS: private pages), without the shared libraries
    and files RSS also counts."""
    kb = 0
    for line in open(f"/proc/{pid}/smaps_rollup"):
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            kb += int(line.split()[1])
    return kb / 1024


@dataclass
class Sample:
    at: float
    cpu: float  # seconds of CPU used so far
    rss: float  # MB


@dataclass
class Sampler:
    """CPU and RSS of some processes, twice a second, in a thread."""

    pids: dict[str, int]
    samples: dict[str, list[Sample]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for name, pid in list(self.pids.items()):
                try:
                    self.samples.setdefault(name, []).append(Sample(time.time(), cpu_seconds(pid),
                                                                    rss_mb(pid)))
                except (FileNotFoundError, ProcessLookupError):
                    pass
            self._stop.wait(0.5)

    def watch(self, name: str, pid: int) -> None:
        """Follow a new process under `name` (a restarted server): its CPU starts at 0."""
        self.pids[name] = pid

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def window(self, name: str, start: float, end: float) -> tuple[float, float]:
        """(CPU in % of one core, peak RSS MB) of `name` between two wall-clock times."""
        inside = [s for s in self.samples.get(name, []) if start <= s.at <= end]
        if len(inside) < 2:
            return float("nan"), max((s.rss for s in inside), default=float("nan"))
        used = sum(max(0.0, b.cpu - a.cpu) for a, b in zip(inside, inside[1:], strict=False))
        return 100 * used / (inside[-1].at - inside[0].at), max(s.rss for s in inside)


def table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, so the README can keep it as printed."""
    cells = [[str(c) for c in header]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |"
             for r in cells]
    lines.insert(1, "| " + " | ".join("-" * w for w in widths) + " |")
    return f"\n### {title}\n\n" + "\n".join(lines) + "\n"
