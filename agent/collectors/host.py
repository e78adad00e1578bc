"""CPU, memory, load and boot time, read from /proc and /sys (as psutil reads them on
Linux, without its 1 MB of imports in the agent)."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

from agent.collectors import Context, register


def parse_cpu_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model"):
            return value.strip()
    return ""


def parse_meminfo(meminfo: str) -> dict[str, int]:
    """/proc/meminfo's fields, in bytes."""
    fields = {}
    for line in meminfo.splitlines():
        key, _, value = line.partition(":")
        number, _, unit = value.strip().partition(" ")
        if number.isdigit():
            fields[key] = int(number) * (1024 if unit == "kB" else 1)
    return fields


def parse_boot_time(stat: str) -> float:
    """The boot time from /proc/stat's `btime` line (Unix time)."""
    for line in stat.splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise ValueError("no btime line in /proc/stat")


def read_core_count(sys_root: Path) -> int:
    """Physical cores: CPUs that share a core list the same siblings."""
    cpus = sys_root / "devices" / "system" / "cpu"
    siblings = {p.read_text().strip() for p in cpus.glob("cpu[0-9]*/topology/core_cpus_list")}
    return len(siblings)


@register("host")
def collect(ctx: Context) -> dict[str, Any]:
    memory = parse_meminfo((ctx.proc / "meminfo").read_text())
    load1, load5, load15 = os.getloadavg()
    return {
        "cpu_model": parse_cpu_model((ctx.proc / "cpuinfo").read_text()),
        "cpu_cores": read_core_count(ctx.sys),
        "cpu_threads": os.cpu_count() or 0,
        "memory_total": memory["MemTotal"],
        "memory_available": memory["MemAvailable"],
        "load": [round(load1, 2), round(load5, 2), round(load15, 2)],
        "arch": platform.machine(),
        "kernel": platform.release(),
        "boot_time": parse_boot_time((ctx.proc / "stat").read_text()),
    }
