"""Replica to replica: another replica's gateway clients, relayed to a tunnel host.

A host's tunnel ends at one replica, its owner (server/replicas.py), so only that one
can open a libvirt connection to the host. Another replica's gateway reaches it through
the owner: it connects to the owner's agent port offering ALPN `virtfleet-relay/1`, with
its replica certificate (issued by the identity CA with the organisation REPLICA_ORG,
which no host certificate carries: hosts' subjects are chosen by the server), and opens
an HTTP/2 stream `POST /v1/relay/HOST_ID`; the owner answers it with a stream through the
host's tunnel and relays the bytes. One such connection per owner, kept while it works.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from common import tunnel
from common.relay import Relay
from server.links.direct import DialError, Stream

log = logging.getLogger(__name__)

ALPN = "virtfleet-relay/1"
REPLICA_ORG = "virtfleet replicas"
PATH = re.compile(r"/v1/relay/([0-9a-f]{6,64})")
CONNECT_TIMEOUT = 10.0


def relay_path(host_id: str) -> str:
    return f"/v1/relay/{host_id}"


class RelayDoor:
    """The owner's side: streams other replicas open to the tunnel hosts it owns.
    `open_tunnel_stream(host_id)`: a stream through the host's tunnel (DialError when
    there is none); `owns(host_id)`: whether this replica owns the host."""

    def __init__(self, open_tunnel_stream: Callable[[str], Awaitable[Stream]],
                 owns: Callable[[str], bool]) -> None:
        self.open_tunnel_stream, self.owns = open_tunnel_stream, owns
        self.refused = 0
        self._relays: set[asyncio.Task[None]] = set()

    def accept(self, transport: asyncio.Transport) -> tunnel.H2Link | None:
        """The relay protocol for a connection whose certificate is a replica's, else
        None (aborted)."""
        ssl_object: ssl.SSLObject | None = transport.get_extra_info("ssl_object")
        if not is_replica(ssl_object.getpeercert() if ssl_object else None):
            self.refused += 1
            peer = transport.get_extra_info("peername")
            log.warning("refused a relay connection from %s: not a replica's certificate",
                        peer[0] if peer else "?")
            transport.abort()
            return None
        return tunnel.H2Link(client_side=False, on_stream=self._serve)

    def _serve(self, link: tunnel.H2Link, stream: tunnel.StreamTransport,
               headers: tunnel.Headers) -> None:
        match = PATH.fullmatch(headers.get(":path", ""))
        if headers.get(":method") != "POST" or match is None:
            link.refuse(stream, 404, "only /v1/relay/HOST_ID")
            return
        host_id = match.group(1)
        if not self.owns(host_id):
            link.refuse(stream, 421, f"this replica does not own host {host_id}")
            return
        task = asyncio.get_running_loop().create_task(self._relay(link, stream, host_id))
        self._relays.add(task)
        task.add_done_callback(self._relays.discard)

    async def _relay(self, link: tunnel.H2Link, stream: tunnel.StreamTransport, host_id: str) -> None:
        try:
            upstream = await self.open_tunnel_stream(host_id)
        except DialError as exc:
            link.refuse(stream, 502, str(exc))
            return
        await Relay(client=link.accept(stream), upstream=upstream).run()

    async def stop(self) -> None:
        for task in list(self._relays):
            task.cancel()
        await asyncio.gather(*self._relays, return_exceptions=True)


def is_replica(peercert: dict[str, Any] | None) -> bool:
    """Whether a verified certificate is a replica's (its subject's organisation)."""
    subject = peercert.get("subject", ()) if peercert else ()
    return any(name == "organizationName" and value == REPLICA_ORG
               for rdn in subject for name, value in rdn)


class OwnerLinks:
    """A non-owner's side: one relay connection to each owner replica, by its URL,
    opened when first needed and again after it closed. `context()`: TLS with this
    replica's certificate, trusting the identity CA."""

    def __init__(self, context: Callable[[], ssl.SSLContext]) -> None:
        self.context = context
        self.links: dict[str, tunnel.H2Link] = {}
        self._opening: dict[str, asyncio.Future[tunnel.H2Link]] = {}

    async def open_stream(self, owner_url: str, host_id: str) -> Stream:
        link = await self._link(owner_url)
        try:
            return await link.open_stream(relay_path(host_id))
        except tunnel.TunnelError as exc:
            raise DialError(f"through the replica that owns it ({owner_url}): {exc}") from None

    async def _link(self, url: str) -> tunnel.H2Link:
        link = self.links.get(url)
        if link is not None and not link.closed.is_set():
            return link
        opening = self._opening.get(url)
        if opening is None:
            opening = self._opening[url] = asyncio.ensure_future(self._connect(url))
            opening.add_done_callback(lambda _f: self._opening.pop(url, None))
        return await asyncio.shield(opening)

    async def _connect(self, url: str) -> tunnel.H2Link:
        try:
            link = await tunnel.connect(url, self.context(), ALPN, lambda: tunnel.H2Link(client_side=True),
                                        CONNECT_TIMEOUT)
        except (OSError, ssl.SSLError, TimeoutError) as exc:
            raise DialError(f"cannot reach the replica that owns it ({url}): {exc}") from None
        self.links[url] = link
        return link

    def stop(self) -> None:
        for link in self.links.values():
            link.close("the server is stopping")
        self.links.clear()


def replica_context(key: Path, cert: Path, ca_pem: str) -> Callable[[], ssl.SSLContext]:
    """TLS to another replica's agent port: this replica's certificate, the identity CA."""
    def make() -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca_pem)
        ctx.load_cert_chain(cert, key)
        return ctx

    return make
