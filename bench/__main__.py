"""bench/run [--quick] [--profile FILE] [NAME ...]: the benchmarks, one Markdown table each,
under a header saying when, on what machine and at which commit (what bench/README.md
keeps). NAME: capacity, join, detect, footprint, burst, gateway, tunnel, replicas (default: all,
in that order).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from bench.util import interrupt_on_sigterm, kill_processes_using, remove_network_namespaces

NAMES = ("capacity", "join", "detect", "footprint", "burst", "gateway", "tunnel", "replicas")


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), "?")
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    return (f"{dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC · {os.cpu_count()} cores "
            f"({cpu}) · {psutil.virtual_memory().total / 2**30:.1f} GiB memory · "
            f"Python {sys.version.split()[0]} · commit {commit}")


def main() -> int:
    parser = argparse.ArgumentParser(prog="bench/run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small numbers, under a minute")
    parser.add_argument("--profile", type=Path, metavar="FILE",
                        help="capacity: write a pyinstrument profile of the server under load")
    parser.add_argument("names", nargs="*", choices=[[], *NAMES], metavar="NAME",
                        help=f"which ({', '.join(NAMES)}; default all)")
    args = parser.parse_args()
    print(f"## {'Quick' if args.quick else 'Full'} run: {machine()}", flush=True)
    interrupt_on_sigterm()
    # Every benchmark's state (servers' databases, 10,000 hosts' keys: 56 MB for capacity)
    # goes under one directory that is removed at the end, whatever happened.
    with tempfile.TemporaryDirectory(prefix="vfb-run-", ignore_cleanup_errors=True) as work:
        tempfile.tempdir = work
        try:
            run_all(args.names or NAMES, args.quick, args.profile)
        except KeyboardInterrupt as exc:
            print(f"bench/run: interrupted ({exc or 'Ctrl-C'}): stopped what it started",
                  file=sys.stderr, flush=True)
            return 130
        finally:
            leftovers(work)
    return 0


def run_all(names: list[str] | tuple[str, ...], quick: bool, profile: Path | None) -> None:
    for name in names:
        started = time.monotonic()
        module = importlib.import_module(f"bench.{name}")
        kwargs = {"profile": profile} if name == "capacity" else {}
        print(module.run(quick, **kwargs), flush=True)
        print(f"({name}: {time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)


def leftovers(work: str) -> None:
    """What the benchmarks' own `finally` blocks did not stop (an interrupt in the middle
    of one: sshd started by oldway.sh, a libvirtd mid-restart): every process running
    from the work dir, and the network namespaces named after this process
    (tests/harness.py's Network, tagged vf?PID by each benchmark)."""
    killed = kill_processes_using(work)
    spaces = remove_network_namespaces(rf"vf[a-z]{os.getpid() % 10000}-(srv|nat|h[0-9]+)")
    if killed or spaces:
        print(f"bench/run: stopped {len(killed)} leftover processes, removed network "
              f"namespaces {spaces}", file=sys.stderr, flush=True)

if __name__ == "__main__":
    sys.exit(main())
