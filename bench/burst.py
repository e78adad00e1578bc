"""Enrollment burst: N hosts joining at the same moment, each from its own address.

Each simulated host does what `virtfleet-agent join` does on the wire (fresh key, CSR,
POST /v1/enroll, the agent's own retry on 429/5xx) through agent/enroll.py, bound to
its own loopback source address (127.1.x.y: all of 127/8 is loopback on Linux), so the
server's per-address enrollment limit sees N hosts, not one. The clients run in a
separate process from the server (this one), on the same 2 cores.
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from agent.client import fetch_ca
from agent.enroll import enroll_request
from bench.util import table
from common import pki, wire
from tests.harness import Server, free_port


async def enroll_all(join: wire.JoinString, count: int) -> tuple[list[str], list[str]]:
    """(host ids, errors) of `count` simultaneous enrollments."""
    # The agent's HTTP calls block in a worker thread: one thread per host, all at once.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(count))
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=await fetch_ca(join.url))

    async def one(i: int) -> str:
        report = wire.Report(hostname=f"burst-{i}", role="mixed", agent_version="bench",
                             libvirtd=wire.LibvirtdHealth(ok=True))
        request = wire.EnrollRequest(token=join.token, csr=pki.make_csr(pki.new_key(), f"burst-{i}"),
                                     report=report)
        source = f"127.1.{i // 250}.{i % 250 + 1}"
        return (await enroll_request(join.url, request, ctx, source=source)).host_id

    results = await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)
    ids = [r for r in results if isinstance(r, str)]
    errors = [str(r) for r in results if not isinstance(r, str)]
    return ids, errors


def run(quick: bool) -> str:
    count = 100 if quick else 1000
    base = Path(tempfile.mkdtemp(prefix="vfb-burst-"))
    server = Server(base / "server", free_port(), "--log-level", "WARNING").start()
    try:
        join = wire.JoinString.decode(server.token("--uses", str(count)))
        started = time.monotonic()
        ids, errors = asyncio.run(enroll_all(join, count))
        took = time.monotonic() - started
        listed = len(server.hosts())
    finally:
        server.proc.stop()
    kinds = sorted({e[:80] for e in errors})
    rows = [
        ["hosts joining at once", f"{count:,}", "each from its own address"],
        ["all enrolled after", f"{took:.1f} s", f"{count / took:,.0f} enrollments/s"],
        ["enrolled / listed by the server", f"{len(set(ids)):,} / {listed:,}", ""],
        ["errors", str(len(errors)), "; ".join(kinds) or "target 0"],
    ]
    return table(f"Enrollment burst ({count:,} hosts)", ["measure", "value", "note"], rows)


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
