"""Enroll COUNT hosts at once with one join string, as `virtfleet-agent join` does.

Usage: python tests/enroll_burst.py JOIN COUNT  -> prints "<enrolled> <seconds>".
Run by test_faults.py inside a host's network namespace (so all come from one address).
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.client import fetch_ca  # noqa: E402
from agent.enroll import enroll_request  # noqa: E402
from common import pki, wire  # noqa: E402


async def enroll_many(join: wire.JoinString, count: int) -> list[str]:
    # The agent's HTTP calls block in a worker thread: one thread per host, all at once.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(count))
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=await fetch_ca(join.url))

    async def one(i: int) -> str:
        report = wire.Report(hostname=f"burst-{i}", role="mixed", agent_version="burst",
                             libvirtd=wire.LibvirtdHealth(ok=True))
        request = wire.EnrollRequest(token=join.token, csr=pki.make_csr(pki.new_key(), f"burst-{i}"),
                                     report=report)
        return (await enroll_request(join.url, request, ctx)).host_id

    return await asyncio.gather(*(one(i) for i in range(count)))


def main() -> int:
    join, count = wire.JoinString.decode(sys.argv[1]), int(sys.argv[2])
    started = time.monotonic()
    ids = asyncio.run(enroll_many(join, count))
    print(len(set(ids)), round(time.monotonic() - started, 2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
