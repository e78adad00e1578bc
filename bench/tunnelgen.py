"""Simulated agents that each keep a tunnel open to the server (bench/tunnel.py): host
i's identity from IDENTITIES/i.pem, the agent's own TLS context and tunnel protocol
(common/tunnel.py), so the server sees exactly what real agents' tunnels cost it. A
stream the server opens is refused (no libvirtd here). Prints {"ready": N} once every
tunnel is open, then {"open": N} every second, until SIGTERM.

    python -m bench.tunnelgen URL IDENTITIES COUNT
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from urllib.parse import urlsplit

from agent.state import client_context
from common import tunnel
from common.tls import limit_tls_buffers
from server.tls import TLS_READ_BUFFER

OPENING = 50  # handshakes in flight at once


def refuse(link: tunnel.H2Link, stream: tunnel.StreamTransport, _headers: tunnel.Headers) -> None:
    link.refuse(stream, 503, "a simulated host has no libvirtd")


async def open_tunnel(host: str, port: int, ctx_path: tuple[Path, Path],
                      slots: asyncio.Semaphore) -> tunnel.H2Link:
    ctx = client_context(*ctx_path)
    ctx.set_alpn_protocols([tunnel.ALPN])
    async with slots:
        _, link = await asyncio.get_running_loop().create_connection(
            lambda: tunnel.H2Link(client_side=False, on_stream=refuse), host, port, ssl=ctx)
    return link


async def run(url: str, identities: Path, count: int) -> None:
    parts = urlsplit(url)
    slots = asyncio.Semaphore(OPENING)
    links = await asyncio.gather(*(
        open_tunnel(parts.hostname or "", parts.port or 443,
                    (identities / "ca.crt", identities / f"{i}.pem"), slots)
        for i in range(count)))
    print(json.dumps({"ready": len(links)}), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            print(json.dumps({"open": sum(not link.closed.is_set() for link in links)}),
                  flush=True)
    for link in links:
        link.close("the benchmark is over")


def main() -> int:
    url, identities, count = sys.argv[1:4]
    limit_tls_buffers(TLS_READ_BUFFER)
    asyncio.run(run(url, Path(identities), int(count)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
