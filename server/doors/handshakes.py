"""TLS handshakes on the agent port, a bounded number at a time, oldest first.

asyncio starts a connection's TLS handshake the moment it accepts it. After a restart
every agent reconnects within an interval: thousands of handshakes then progress
together, each slower the more there are, and those that reach their client's connect
timeout (the agent's is 10 s) are abandoned half done, the CPU they took wasted, and
tried again (23,188 such tries in a 10,000-host cold start, bench/README.md).

Here a connection is accepted plainly and costs a socket, no TLS state, until its
ClientHello arrives (a client that sends nothing holds no slot, and is closed after
the handshake deadline). Then it waits its turn: at most `slots` handshakes run at once,
at most `per_address` of one source address wait or run (a client stalling its
handshakes cannot take the slots of the others). Once the oldest waiting connection
has waited `max_wait`, the server cannot shake hands with new ones soon: they are
turned away at once, closed before any TLS, and their agents come back at a random
moment of the reconnect window every check-in answer names
(`wire.CheckinResponse.reconnect_window`, agent/checkin.py's `retry_delay`), instead of
waiting to time out.
"""

from __future__ import annotations

import asyncio
import asyncio.sslproto
import collections
import logging
import math
import ssl
import time
from collections.abc import Callable

log = logging.getLogger(__name__)

SLOTS = 64  # handshakes running at once
PER_ADDRESS = 8  # connections of one source address waiting for a slot or using one
# Seconds the oldest may have waited before new connections are turned away: well within
# the agent's 10 s connect timeout, which its handshake shares.
MAX_WAIT = 4.0


class HandshakeGate:
    def __init__(self, ctx: ssl.SSLContext, app_protocol: Callable[[], asyncio.Protocol],
                 timeout: float, *, slots: int = SLOTS, per_address: int = PER_ADDRESS,
                 max_wait: float = MAX_WAIT) -> None:
        """`app_protocol`: makes the protocol a connection has once its TLS is up (the
        aiohttp server); `timeout`: from accept to the end of the handshake."""
        self.ctx, self.app_protocol, self.timeout = ctx, app_protocol, timeout
        self.slots, self.max_per_address, self.max_wait = slots, per_address, max_wait
        self.waiting: collections.deque[Waiting] = collections.deque()
        self.running = 0
        self.per_address: collections.Counter[str] = collections.Counter()
        self.turned_away = 0  # connections closed before TLS: busy, or too many from one address

    def protocol(self) -> Waiting:
        """The listener's protocol factory."""
        return Waiting(self)

    def hello(self, conn: Waiting) -> None:
        """`conn` sent its first bytes: queue it for a handshake, or turn it away."""
        if self.per_address[conn.address] >= self.max_per_address or self._behind():
            self.turned_away += 1
            conn.close()
            return
        self.per_address[conn.address] += 1
        conn.counted = True
        self.waiting.append(conn)
        self._admit()

    def _behind(self) -> bool:
        return bool(self.waiting) and time.monotonic() - self.waiting[0].since > self.max_wait

    def _admit(self) -> None:
        while self.running < self.slots and self.waiting:
            conn = self.waiting.popleft()
            if conn.closed:
                continue
            self.running += 1
            conn.start_tls()

    def left(self, conn: Waiting) -> None:
        """`conn` is gone (closed while it waited, or its handshake ended either way)."""
        if conn.counted:
            conn.counted = False
            self.per_address[conn.address] -= 1
            if self.per_address[conn.address] <= 0:
                del self.per_address[conn.address]

    def finished(self, conn: Waiting) -> None:
        self.running -= 1
        self.left(conn)
        self._admit()


class Waiting(asyncio.Protocol):
    """A connection before its TLS: holds its first bytes until a handshake slot is free."""

    def __init__(self, gate: HandshakeGate) -> None:
        self.gate = gate
        self.transport: asyncio.Transport | None = None
        self.address = ""
        self.since = time.monotonic()
        self.early = bytearray()
        self.counted = False  # in gate.per_address
        self.closed = False
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.address = str(peer[0]) if peer else ""
        self._deadline = asyncio.get_running_loop().call_later(self.gate.timeout, self.close)

    def data_received(self, data: bytes) -> None:
        first = not self.early
        self.early += data
        if first and self.transport is not None:
            self.transport.pause_reading()  # the rest waits in the kernel
            self.since = time.monotonic()
            self.gate.hello(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._cancel_deadline()
        self.gate.left(self)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.abort()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def start_tls(self) -> None:
        """Hand the connection to asyncio's TLS protocol, as its TLS server would have at
        accept, with the bytes that came already."""
        assert self.transport is not None
        self._cancel_deadline()
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        left = max(math.ceil(self.gate.timeout - (time.monotonic() - self.since)), 1)
        tls = asyncio.sslproto.SSLProtocol(loop, self.gate.app_protocol(), self.gate.ctx, done,
                                           server_side=True, ssl_handshake_timeout=left)
        self.transport.set_protocol(tls)
        tls.connection_made(self.transport)
        early = memoryview(self.early)
        while early:
            buffer = tls.get_buffer(len(early))
            n = min(len(buffer), len(early))
            buffer[:n] = early[:n]
            tls.buffer_updated(n)
            early = early[n:]
        self.early = bytearray()
        self.transport.resume_reading()
        done.add_done_callback(self._handshake_ended)

    def _handshake_ended(self, done: asyncio.Future[None]) -> None:
        if not done.cancelled():
            done.exception()  # a failed handshake is the client's affair: retrieved, not logged
        self.gate.finished(self)
