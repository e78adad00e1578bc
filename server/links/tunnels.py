"""Tunnels hosts open to the server, on the agent port, and the streams opened back
through them.

An agent that offers the ALPN protocol `virtfleet-tunnel/1` in its TLS handshake opens a
tunnel instead of speaking HTTP/1.1; the agent port's dispatcher (`AgentPort`) hands the
connection here or to aiohttp. A tunnel is authenticated by the host's identity
certificate, verified in the handshake against the identity CA (so no libvirt
certificate, another CA's, or none passes), and looked up as a check-in's is: a
forgotten or replaced identity is refused. It speaks for that host alone: streams
opened through it reach that host's libvirtd, and a new tunnel from the same host
replaces the old one.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable
from typing import Any, Protocol

from common import tunnel
from common.logs import event
from server.fleet import Refused, serial_of
from server.links.direct import DialError, Stream
from server.links.relays import ALPN as RELAY_ALPN
from server.links.relays import RelayDoor
from server.model import Host

log = logging.getLogger(__name__)

HostForCertificate = Callable[[str | None], Host]  # fleet.identify, given the store


class Admission(Protocol):
    """The agent port's per-address bound (doors/guard.ConnectionGuard)."""

    def admit(self, transport: asyncio.Transport) -> bool: ...
    def served(self, transport: asyncio.Transport) -> None: ...
    def release(self, transport: asyncio.Transport) -> None: ...


class Tunnels:
    """`host_for_certificate`: the host a verified client certificate's serial speaks
    for (Fleet's, raising Refused); `on_change(host_id)`: a tunnel opened or closed;
    `admission`: the bound every connection on the agent port is counted against."""

    def __init__(self, host_for_certificate: HostForCertificate,
                 on_change: Callable[[str], object]) -> None:
        self.host_for_certificate = host_for_certificate
        self.on_change = on_change
        self.admission: Admission | None = None  # set when the agent port opens
        self.links: dict[str, tunnel.H2Link] = {}
        self.last_closed: dict[str, str] = {}  # host id -> why its last tunnel closed
        self.refused = 0

    def accept(self, transport: asyncio.Transport) -> tunnel.H2Link | None:
        """The tunnel protocol for a new connection, or None (aborted) when its certificate
        does not speak for an enrolled host."""
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        peer = transport.get_extra_info("peername")
        address = str(peer[0]) if peer else "?"
        if self.admission is not None and not self.admission.admit(transport):
            return None
        try:
            host = self.host_for_certificate(serial_of(ssl_object.getpeercert() if ssl_object
                                                       else None))
        except Refused as exc:
            self.refused += 1
            log.warning("refused a tunnel from %s: %s", address, exc.message)
            transport.abort()
            self._release(transport)
            return None
        if self.admission is not None:
            self.admission.served(transport)
        link = tunnel.H2Link(client_side=True,
                             on_closed=lambda closed, reason: self._closed(host.id, closed, reason))
        old = self.links.get(host.id)
        self.links[host.id] = link
        if old is not None:
            old.close("replaced by a new tunnel from the same host")
        event(log, "tunnel_open", "host %s: tunnel open from %s", host.hostname, address,
              host_id=host.id)
        asyncio.get_running_loop().call_soon(self.on_change, host.id)
        return link

    def _release(self, transport: asyncio.Transport | None) -> None:
        if self.admission is not None and transport is not None:
            self.admission.release(transport)

    def _closed(self, host_id: str, link: tunnel.H2Link, reason: str) -> None:
        self._release(link.transport)
        if self.links.get(host_id) is not link:
            return  # replaced
        del self.links[host_id]
        self.last_closed[host_id] = reason
        event(log, "tunnel_closed", "host %s: tunnel closed: %s", host_id, reason,
              level=logging.WARNING, host_id=host_id, reason=reason)
        self.on_change(host_id)

    def up(self, host_id: str) -> bool:
        return host_id in self.links

    async def open_stream(self, host_id: str) -> Stream:
        """A stream to the host's libvirtd, through its tunnel."""
        link = self.links.get(host_id)
        if link is None:
            why = self.last_closed.get(host_id)
            raise DialError("the host has no tunnel open to the server" +
                            (f" (the last one closed: {why})" if why else ""))
        try:
            return await link.open_stream(tunnel.LIBVIRT_PATH)
        except tunnel.TunnelError as exc:
            raise DialError(f"through the host's tunnel: {exc}") from None

    def close(self, host_id: str, reason: str) -> None:
        link = self.links.pop(host_id, None)
        self.last_closed.pop(host_id, None)
        if link is not None:
            link.close(reason)
            event(log, "tunnel_closed", "host %s: tunnel closed: %s", host_id, reason,
                  host_id=host_id, reason=reason)

    def describe(self, host_id: str) -> dict[str, Any] | None:
        link = self.links.get(host_id)
        return link.describe() if link is not None else None

    def stop(self) -> None:
        for host_id in list(self.links):
            self.close(host_id, "the server is stopping")


class AgentPort(asyncio.Protocol):
    """One connection on the agent port, until its TLS handshake is done: then it is
    handed to the tunnel (its ALPN says so) or to aiohttp's HTTP handler."""

    def __init__(self, http: Callable[[], asyncio.Protocol], tunnels: Tunnels,
                 relays: RelayDoor | None = None) -> None:
        """`relays`: other replicas' relays to this one's tunnel hosts (none: refused)."""
        self.http, self.tunnels, self.relays = http, tunnels, relays

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        ssl_object = transport.get_extra_info("ssl_object")
        chosen = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        inner: asyncio.Protocol | None
        if chosen == tunnel.ALPN:
            inner = self.tunnels.accept(transport)
        elif chosen == RELAY_ALPN and self.relays is not None:
            inner = self.relays.accept(transport)
        elif chosen == RELAY_ALPN:
            transport.abort()  # one server: no replica relays to it
            inner = None
        else:
            inner = self.http()
        if inner is None:
            return
        transport.set_protocol(inner)
        inner.connection_made(transport)
