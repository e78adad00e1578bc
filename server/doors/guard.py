"""What the agent port spends on a connection before it has proved anything.

A TLS connection costs the server a file descriptor and tens of KB before it sends a
byte, and aiohttp waits forever for a first request: a thousand idle connections (no
certificate needed) used to lock every agent out. So each connection gets deadlines —
the TLS handshake, then the first request's headers — and one source address may hold
only so many connections at once. What remains of an attack is bounded by address
count × cap × deadline.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from collections import Counter
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0
FIRST_REQUEST_TIMEOUT = 10.0  # from the handshake's end to the first request's headers
BODY_TIMEOUT = 30.0  # a request's whole body (a check-in is ~1.4 KB)
MAX_PER_ADDRESS = 2048  # connections one source address may hold at once


class ConnectionGuard:
    """Installed on an aiohttp low-level server (`runner.server`)."""

    def __init__(self, max_per_address: int = MAX_PER_ADDRESS,
                 first_request_timeout: float = FIRST_REQUEST_TIMEOUT) -> None:
        self.max_per_address = max_per_address
        self.first_request_timeout = first_request_timeout
        self.per_address: Counter[str] = Counter()
        # Each admitted connection's address, and those that proved themselves: until its
        # release (every admitted connection is released when it closes).
        self._address: dict[asyncio.Transport, str] = {}
        self._served: set[asyncio.Transport] = set()
        self.refused: Counter[str] = Counter()  # connections closed, by why
        self.connections = self.requests = 0  # admitted and served so far (server/pace.py)

    def install(self, server: web.Server) -> None:
        made, lost, make_request = server.connection_made, server.connection_lost, \
            server.request_factory

        def connection_made(handler: web.RequestHandler, transport: asyncio.Transport) -> None:
            made(handler, transport)
            self.admit(transport)

        def connection_lost(handler: web.RequestHandler, exc: BaseException | None) -> None:
            if handler.transport is not None:
                self.release(handler.transport)
            lost(handler, exc)

        def request_factory(message: Any, payload: Any, handler: web.RequestHandler,
                            writer: Any, task: Any) -> web.BaseRequest:
            self.requests += 1
            if handler.transport is not None:
                self._served.add(handler.transport)  # its first request came in time
            return make_request(message, payload, handler, writer, task)

        # aiohttp's request handlers report to their server through these two methods, and
        # make each request with its factory (read when a connection starts): hooks that
        # cost a check-in less than a middleware's wrapping of every request.
        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign,assignment]
        server.request_factory = request_factory  # type: ignore[assignment]

    def admit(self, transport: asyncio.Transport) -> bool:
        """Count a new connection against its address, or abort it (False) when the
        address holds its share already; it must make its first request in time."""
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if peer else ""
        if self.per_address[address] >= self.max_per_address:
            self.refused["per_address_cap"] += 1
            transport.abort()
            return False
        self.per_address[address] += 1
        self.connections += 1
        self._address[transport] = address
        asyncio.get_running_loop().call_later(self.first_request_timeout, self._deadline, transport)
        return True

    def served(self, transport: asyncio.Transport) -> None:
        """The connection proved itself (a tunnel, by its certificate): no deadline."""
        self._served.add(transport)

    def release(self, transport: asyncio.Transport) -> None:
        self._served.discard(transport)
        address = self._address.pop(transport, None)
        if address is None:
            return
        self.per_address[address] -= 1
        if self.per_address[address] <= 0:
            del self.per_address[address]

    def _deadline(self, transport: asyncio.Transport) -> None:
        if transport not in self._served and not transport.is_closing():
            self.refused["no_request_in_time"] += 1
            transport.abort()


def raise_file_limit() -> int:
    """Soft limit on open files up to the hard one (each agent holds a connection; the
    default soft limit of 1024 is reached long before the CPU is): returns the limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class OncePer(logging.Filter):
    """Lets a kind of message through once per `seconds`, with how many were dropped:
    asyncio logs every failed accept() while the process is out of file descriptors."""

    def __init__(self, seconds: float, match: str) -> None:
        super().__init__()
        self.seconds, self.match = seconds, match
        self._last = 0.0
        self._dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if self.match not in record.getMessage():
            return True
        now = time.monotonic()
        if now - self._last < self.seconds:
            self._dropped += 1
            return False
        if self._dropped:
            record.msg = f"{record.msg} ({self._dropped} more like it in the last {self.seconds:g} s)"
        self._last, self._dropped = now, 0
        return True
