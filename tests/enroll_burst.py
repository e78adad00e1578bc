"""Enroll COUNT hosts at once with one join string, as `virtfleet-agent join` does.

Usage: python tests/enroll_burst.py JOIN COUNT [IDS_FILE] -> prints "<enrolled> <seconds>"
(and writes the enrolled hosts' ids to IDS_FILE, one a line: a burst cut short by a
server that died tells which enrollments it was answered).
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


async def enroll_many(join: wire.JoinString, count: int) -> list[str | BaseException]:
    # The agent's HTTP calls block in a worker thread: one thread per host, all at once.
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(count))
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=await fetch_ca(join.url))

    async def one(i: int) -> str:
        report = wire.Report(hostname=f"burst-{i}", role="mixed", agent_version="burst",
                             libvirtd=wire.LibvirtdHealth(ok=True))
        request = wire.EnrollRequest(token=join.token, csr=pki.make_csr(pki.new_key(), f"burst-{i}"),
                                     report=report)
        return (await enroll_request(join.url, request, ctx)).host_id

    return await asyncio.gather(*(one(i) for i in range(count)), return_exceptions=True)


def main() -> int:
    join, count = wire.JoinString.decode(sys.argv[1]), int(sys.argv[2])
    started = time.monotonic()
    ids = {i for i in asyncio.run(enroll_many(join, count)) if isinstance(i, str)}
    print(len(ids), round(time.monotonic() - started, 2))
    if len(sys.argv) > 3:
        Path(sys.argv[3]).write_text("".join(f"{i}\n" for i in sorted(ids)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
