"""NUMA nodes (IsardVDI's `numa_topology`), from /sys/devices/system/node.

Keys:
  nodes  list, by id: {"id": 0, "cpus": [0, 1, 2, 3], "memory_total": bytes,
                       "memory_free": bytes, "hugepages": [as the memory collector's]}

A machine without NUMA support in its kernel has no node directories: `nodes` is empty.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from agent.collectors import Context, register
from agent.collectors.memory import read_hugepages

_NODE_DIR = re.compile(r"node(\d+)")
_NODE_MEMINFO = re.compile(r"Node\s+\d+\s+(\w+):\s+(\d+)(?:\s+kB)?")


def parse_cpulist(text: str) -> list[int]:
    """Pure: the kernel's cpulist format, "0-3,8-11" or "0,2" or "" → a list of CPU ids."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        first, _, last = part.partition("-")
        cpus.extend(range(int(first), int(last or first) + 1))
    return cpus


def parse_node_meminfo(text: str) -> dict[str, int]:
    """Pure: a node's meminfo ("Node 0 MemTotal:  6645496 kB") → {"MemTotal": bytes, ...}.
    The HugePages_* lines are counts, not kB: they keep their value."""
    fields = {}
    for line in text.splitlines():
        match = _NODE_MEMINFO.fullmatch(line.strip())
        if match:
            fields[match[1]] = int(match[2]) * (1024 if line.rstrip().endswith("kB") else 1)
    return fields


def read_node(node: Path) -> dict[str, Any]:
    meminfo = parse_node_meminfo((node / "meminfo").read_text())
    hugepages = node / "hugepages"
    return {"id": int(node.name[4:]),
            "cpus": parse_cpulist((node / "cpulist").read_text()),
            "memory_total": meminfo.get("MemTotal", 0),
            "memory_free": meminfo.get("MemFree", 0),
            "hugepages": read_hugepages(hugepages) if hugepages.is_dir() else []}


@register("numa")
def collect(ctx: Context) -> dict[str, Any]:
    root = ctx.sys / "devices" / "system" / "node"
    nodes = [read_node(p) for p in root.glob("node*") if _NODE_DIR.fullmatch(p.name)]
    return {"nodes": sorted(nodes, key=lambda n: n["id"])}
