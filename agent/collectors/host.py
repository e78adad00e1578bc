"""CPU, memory and load, from psutil and /proc/cpuinfo."""

from __future__ import annotations

import os
import platform
from typing import Any

import psutil

from agent.collectors import Context, register


def parse_cpu_model(cpuinfo: str) -> str:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "cpu model"):
            return value.strip()
    return ""


@register("host")
def collect(ctx: Context) -> dict[str, Any]:
    memory = psutil.virtual_memory()
    load1, load5, load15 = os.getloadavg()
    return {
        "cpu_model": parse_cpu_model((ctx.proc / "cpuinfo").read_text()),
        "cpu_cores": psutil.cpu_count(logical=False) or 0,
        "cpu_threads": psutil.cpu_count(logical=True) or 0,
        "memory_total": memory.total,
        "memory_available": memory.available,
        "load": [round(load1, 2), round(load5, 2), round(load15, 2)],
        "arch": platform.machine(),
        "kernel": platform.release(),
        "boot_time": psutil.boot_time(),
    }
