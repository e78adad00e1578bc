"""The byte relay between a libvirt client's unix socket and a host's libvirtd.

libvirt's RPC runs unchanged over it: what the client writes goes to the host, what the
host answers comes back. Each direction reads at most one chunk before waiting for the
other side to take it (`drain`), so a slow reader holds back its writer instead of
growing the server's memory. Either side closing closes both.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

CHUNK = 64 * 1024


@dataclass(eq=False)  # each relay is its own: kept in sets
class Relay:
    """One relayed connection; `close()` cuts both sides at once."""

    client: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter]
    sent: int = 0  # bytes client -> host
    received: int = 0  # bytes host -> client
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        """Relay until either side closes (or `close()`), then close both."""
        up = asyncio.create_task(self._copy(self.client[0], self.upstream[1], "sent"))
        down = asyncio.create_task(self._copy(self.upstream[0], self.client[1], "received"))
        try:
            await asyncio.wait([up, down], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (up, down):
                task.cancel()
            await asyncio.gather(up, down, return_exceptions=True)
            self.close()

    async def _copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    counter: str) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while chunk := await reader.read(CHUNK):
                writer.write(chunk)
                setattr(self, counter, getattr(self, counter) + len(chunk))
                await writer.drain()

    def close(self) -> None:
        # Aborted, not closed: a TLS close waits for the peer's close_notify, and a host
        # that stopped answering would hold the connection until TCP gives up.
        for _reader, writer in (self.client, self.upstream):
            writer.transport.abort()
        self.done.set()
