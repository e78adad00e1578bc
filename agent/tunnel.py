"""The agent's end of a tunnel: one outbound connection to the server that carries the
server's libvirt connections to this host (common/tunnel.py).

Kept open while the server's check-in answers ask for it (`tunnel: true`), re-dialled
with a jittered backoff when it drops. It is TLS to the server's agent port with the
host's identity certificate, asking for the tunnel by ALPN; the server checks the
certificate as it checks a check-in's.

Every stream the server opens is bridged to libvirtd's unix socket (`[libvirt] socket`)
and to nothing else: the one path served is fixed here, and no request can name another
destination. A request for anything else is refused.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import tunnel
from common.backoff import Backoff
from common.logs import event
from common.relay import Relay

log = logging.getLogger(__name__)

# The tunnel is the agent's one asyncio TLS connection. OpenSSL hands over one record at a
# time, at most 16 KiB of plaintext: a bigger read buffer (asyncio's is 256 KiB, resident)
# would never fill.
TLS_READ_BUFFER = 16 * 1024

CONNECT_TIMEOUT = 10.0  # TCP and TLS to the server
STEADY = 30.0  # a tunnel that stayed up this long resets the backoff


class TunnelKeeper:
    """`context()`: a TLS context presenting the host's current identity (a fresh one
    per dial, so a renewed certificate is used from the next tunnel on)."""

    def __init__(self, url: str, context: Callable[[], ssl.SSLContext], libvirt_socket: Path,
                 host_id: str) -> None:
        self.url, self.context, self.socket, self.host_id = url, context, libvirt_socket, host_id
        self.link: tunnel.H2Link | None = None
        self.last_error = ""
        self.streams_served = 0
        self._task: asyncio.Task[None] | None = None
        self._bridges: set[asyncio.Task[None]] = set()

    def want(self, yes: bool) -> None:
        """Open (and keep) the tunnel, or close it."""
        if yes and self._task is None:
            self._task = asyncio.create_task(self._keep(), name="tunnel")
        elif not yes and self._task is not None:
            self._task.cancel()
            self._task = None
            self._close("the server no longer asks for a tunnel")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        self._close("the agent is stopping")
        for bridge in list(self._bridges):
            bridge.cancel()
        await asyncio.gather(*self._bridges, return_exceptions=True)

    def move(self, url: str) -> None:
        """The agent moved to another server URL: the next tunnel goes there."""
        self.url = url
        self._close(f"moving to {url}")

    def _close(self, reason: str) -> None:
        if self.link is not None:
            self.link.close(reason)
            self.link = None

    def describe(self) -> dict[str, Any] | None:
        """For status.json: the open tunnel, or why there is none; None when not wanted."""
        if self._task is None:
            return None
        if self.link is None or self.link.closed.is_set():
            return {"open": False, "error": self.last_error}
        return {"open": True, **self.link.describe(), "streams_served": self.streams_served}

    async def _keep(self) -> None:
        backoff = Backoff(base=1.0, cap=30.0)
        while True:
            started = time.monotonic()
            try:
                await self._run_once()
            except (OSError, ssl.SSLError, TimeoutError) as exc:
                self.last_error = f"cannot open a tunnel to {self.url}: {exc}"
                log.warning("%s", self.last_error)
            if time.monotonic() - started > STEADY:
                backoff.reset()
            await asyncio.sleep(backoff.next_delay())

    async def _run_once(self) -> None:
        link = await tunnel.connect(self.url, self.context(), tunnel.ALPN,
                                    lambda: tunnel.H2Link(client_side=False, on_stream=self._serve),
                                    CONNECT_TIMEOUT)
        self.link = link
        event(log, "tunnel_open", "tunnel open to %s", self.url, host_id=self.host_id)
        await link.closed.wait()
        self.last_error = f"the tunnel closed: {link.close_reason}"
        event(log, "tunnel_closed", "tunnel to %s closed: %s", self.url, link.close_reason,
              level=logging.WARNING, host_id=self.host_id, reason=link.close_reason)

    def _serve(self, link: tunnel.H2Link, stream: tunnel.StreamTransport,
               headers: tunnel.Headers) -> None:
        if headers.get(":method") != "POST" or headers.get(":path") != tunnel.LIBVIRT_PATH:
            link.refuse(stream, 404, "this tunnel reaches libvirtd only")
            return
        bridge = asyncio.get_running_loop().create_task(self._bridge(link, stream))
        self._bridges.add(bridge)
        bridge.add_done_callback(self._bridges.discard)

    async def _bridge(self, link: tunnel.H2Link, stream: tunnel.StreamTransport) -> None:
        try:
            local = await asyncio.open_unix_connection(self.socket)
        except OSError as exc:
            link.refuse(stream, 503, f"libvirtd's socket {self.socket}: {exc.strerror or exc}")
            return
        self.streams_served += 1
        await Relay(client=link.accept(stream), upstream=local).run()
