"""Small helpers every benchmark shares: percentiles, process CPU/RSS, tables, and the
clean-up bench/run and `make demo` share (SIGTERM as Ctrl-C, then nothing left behind)."""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

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


# -- clean-up ---------------------------------------------------------------------------


def interrupt_on_sigterm() -> None:
    """SIGTERM (`timeout`, `kill`, a CI runner) ends the program as Ctrl-C does: a
    KeyboardInterrupt in the main thread, so every `finally` runs its clean-up. Once one
    arrived, further SIGTERMs and Ctrl-Cs are noted, not raised: they must not cut that
    clean-up short (SIGKILL still works)."""
    def cleaning_up(signum: int, _frame: FrameType | None) -> None:
        print(f"(signal {signum}: still cleaning up)", file=sys.stderr, flush=True)

    def interrupt(signum: int, _frame: FrameType | None) -> None:
        # A handler, not SIG_IGN: an ignored signal would stay ignored in every program
        # started during the clean-up.
        signal.signal(signal.SIGTERM, cleaning_up)
        signal.signal(signal.SIGINT, cleaning_up)
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)


def _ancestors() -> set[int]:
    pids, pid = set(), os.getpid()
    while pid > 1:
        pids.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            break
    return pids


def processes_using(path: str) -> list[int]:
    """Processes (other than this one and its ancestors) whose command line names
    something under `path`: the servers, agents, libvirtds and sshds a run started there,
    wherever they went (own sessions, daemonized, network namespaces)."""
    mine, found = _ancestors(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) in mine:
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if any(arg == path or arg.startswith(path + "/") or f"{path}/" in arg
               for arg in argv.split("\0")):
            found.append(int(entry))
    return found


def kill_processes_using(path: str, timeout: float = 15.0) -> list[int]:
    """SIGKILL every process `processes_using(path)` finds, until none is left (one may
    start another while dying: a libvirtd restart script); returns those killed."""
    killed: list[int] = []
    deadline = time.monotonic() + timeout
    while (pids := [p for p in processes_using(path) if _running(p)]) and \
            time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        killed += [p for p in pids if p not in killed]
        time.sleep(0.05)
    return killed


def _running(pid: int) -> bool:
    """Alive and not a zombie (a zombie child of ours is gone but for its exit status)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def remove_network_namespaces(pattern: str) -> list[str]:
    """Delete the network namespaces whose name matches `pattern` (a regex): those a
    run made and, interrupted, did not get to delete."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         timeout=10).stdout
    names = [line.split()[0] for line in out.splitlines()
             if line.split() and re.fullmatch(pattern, line.split()[0])]
    for name in names:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)
    return names
