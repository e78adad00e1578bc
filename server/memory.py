"""The server's memory: Python's garbage collector tuned for thousands of connections,
and full collections only when they can find something.

Full passes walk every long-lived object (dozens per kept-alive agent connection) and
stall every check-in meanwhile (0.1-0.3 s at 2,000 hosts, 0.5-0.6 s at 10,000).
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import os
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

# Full garbage collections: once memory grew by GC_GROWTH bytes since the last one and
# stopped growing; checked every GC_CHECK seconds.
GC_GROWTH = 100 * 2**20
GC_CHECK = 10.0
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def tune_garbage_collector() -> None:
    """What start-up made is frozen out of every pass; young passes run every 20,000
    allocations instead of 700; full passes run only from `collect_garbage_forever`
    (bench/README.md)."""
    gc.freeze()
    gc.set_threshold(20_000, 10, 1_000_000_000)


async def collect_garbage_forever() -> None:
    trim = _malloc_trim()
    last_rss = previous = resident_bytes()
    while True:
        await asyncio.sleep(GC_CHECK)
        rss = resident_bytes()
        due = full_collection_due(rss - last_rss, rss - previous)
        previous = rss
        if not due:
            continue
        started = time.perf_counter()
        found = gc.collect()
        if trim is not None:
            # A reconnect storm leaves hundreds of MB freed but kept by the C heap (1.2 GB
            # -> 0.67 GB RSS at 10,000 hosts when handed back).
            trim(0)
        last_rss = previous = resident_bytes()
        log.info("memory grew to %d MB: a full garbage collection freed %d objects in %.0f ms, "
                 "%d MB resident now", rss // 2**20, found, (time.perf_counter() - started) * 1000,
                 last_rss // 2**20)


def full_collection_due(grown: int, growing: int) -> bool:
    """Once memory grew by GC_GROWTH bytes since the last pass and stopped growing: a
    reconnect storm leaves cyclic garbage that young passes missed and freed heap the C
    library keeps, and a pass (0.6 s at 10,000 hosts) in the middle of the storm would
    only make more agents time out. Never on a timer: with memory flat there is nothing
    to find (at 10,000 hosts checking in steadily a pass freed nothing), and every
    check-in waits meanwhile."""
    return grown >= GC_GROWTH and growing < GC_GROWTH // 10


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, which returns freed heap memory to the kernel; None elsewhere."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None
