"""Memory and hugepages (IsardVDI's hypervisor memory stats and `hugepages_info`).

Keys:
  total      int   MemTotal, bytes
  free       int   MemAvailable, bytes (what a new guest can get without swapping)
  hugepages  list  one entry per page size the kernel offers, smallest first:
                   {"size_kib": 2048, "total": nr_hugepages, "free": free_hugepages}

`free` and hugepages' `free` move all the time; the rest changes only when an operator
changes the host.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from agent.collectors import Context, register
from agent.collectors.host import parse_meminfo

_PAGE_DIR = re.compile(r"hugepages-(\d+)kB")


def parse_hugepages(pools: dict[str, dict[str, str]]) -> list[dict[str, int]]:
    """Pure: {"hugepages-2048kB": {"nr_hugepages": "4", "free_hugepages": "2"}, ...} →
    [{"size_kib": 2048, "total": 4, "free": 2}], sorted by page size."""
    pages = []
    for name, files in pools.items():
        match = _PAGE_DIR.fullmatch(name)
        if match:
            pages.append({"size_kib": int(match[1]),
                          "total": int(files.get("nr_hugepages", "0").strip() or 0),
                          "free": int(files.get("free_hugepages", "0").strip() or 0)})
    return sorted(pages, key=lambda p: p["size_kib"])


def read_hugepages(directory: Path) -> list[dict[str, int]]:
    """A hugepages directory: /sys/kernel/mm/hugepages, or a NUMA node's hugepages/."""
    pools = {}
    for pool in directory.glob("hugepages-*kB"):
        pools[pool.name] = {name: (pool / name).read_text()
                            for name in ("nr_hugepages", "free_hugepages")
                            if (pool / name).exists()}
    return parse_hugepages(pools)


@register("memory")
def collect(ctx: Context) -> dict[str, Any]:
    meminfo = parse_meminfo((ctx.proc / "meminfo").read_text())
    # No hugepages directory: a kernel without hugetlbfs, which offers none.
    hugepages = ctx.sys / "kernel" / "mm" / "hugepages"
    return {"total": meminfo["MemTotal"], "free": meminfo["MemAvailable"],
            "hugepages": read_hugepages(hugepages) if hugepages.is_dir() else []}
