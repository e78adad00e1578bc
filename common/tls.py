"""asyncio's per-connection TLS read buffer, sized for the process that owns it."""

from __future__ import annotations

import asyncio.sslproto


def limit_tls_buffers(size: int) -> None:
    """Make asyncio's per-connection TLS read buffer `size` bytes instead of 256 KiB
    (zero-filled when a connection starts, so resident from then on).

    Process-wide (a class attribute read when each connection starts): the process calls
    it once at start-up. A larger read is taken in several `recv_into` calls."""
    asyncio.sslproto.SSLProtocol.max_size = size
