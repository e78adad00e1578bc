"""Which way reaches each host's libvirtd, and the one dial every libvirt connection to a
host goes through: the link manager's and each gateway client's alike.

A host's transport (wire.TRANSPORTS) is chosen by its join token and changed with
`hosts set-transport`:
- `direct`: TLS to the port its agent reported (links/direct.py);
- `tunnel`: a stream through the tunnel its agent keeps open (links/tunnels.py);
- `auto`: direct, unless the direct dial fails before it ever worked (NAT, a firewall:
  nothing answers; or something else answers at the TLS port); then the check-in answer
  asks the agent for a tunnel, and the host stays on it while this server runs (`hosts
  show` says what the direct dial met). Once a direct dial to it has worked, its
  failures are errors to show, as a direct host's: a libvirtd restart or a network
  outage does not move a reachable host onto a tunnel. Like a direct host, it is
  dialled once its agent reports libvirtd's TLS port (one with `configure_tls = false`
  never does: give it a `tunnel` token). A tunnel already open (the agent was asked
  before a restart) is used at once.

Any failure of the direct dial turns an auto host to its tunnel, not only "nothing
answers": the answer's `tunnel` is all a host learns, and were it given for some
failures and not others, a hostile host could point the server at ports of its own
address and read, from that one flag, which of them listen (as `fleet.public_detail`
keeps the failure's words from it); and since the turn is kept, it learns that one bit
once. The tunnel is as trusted as the direct dial: the host's identity certificate
opens it.
"""

from __future__ import annotations

import ssl
from typing import Any

from server.links.direct import DEFAULT_TLS_PORT, Stream, Target, dial
from server.links.tunnels import Tunnels
from server.model import Host, Transport


class Routes:
    def __init__(self, tunnels: Tunnels) -> None:
        self.tunnels = tunnels
        self.direct_failures: dict[str, str] = {}  # auto hosts whose direct dial failed: why
        self.direct_worked: set[str] = set()  # hosts a direct dial reached

    def via_tunnel(self, host: Host) -> bool:
        """(Every check-in's answer asks: no look at the stored report here.)"""
        if host.transport == Transport.TUNNEL:
            return True
        if host.transport == Transport.AUTO:
            return host.id in self.direct_failures or self.tunnels.up(host.id)
        return False

    def can_route(self, host: Host) -> bool:
        """Whether the server knows a way to the host at all (only a tunnel host need not
        have said where its libvirtd listens)."""
        return host.transport == Transport.TUNNEL or host.report.libvirt_endpoint is not None

    def target(self, host: Host) -> Target:
        endpoint = host.report.libvirt_endpoint
        return Target(host_id=host.id, address=host.address,
                      port=endpoint.port if endpoint else DEFAULT_TLS_PORT,
                      serials=host.libvirt_serials, tunnel=self.via_tunnel(host))

    def waiting(self, host: Host) -> str | None:
        """Why the host cannot be dialled yet because its tunnel is not open, or None."""
        if not self.via_tunnel(host) or self.tunnels.up(host.id):
            return None
        closed = self.tunnels.last_closed.get(host.id)
        if closed:
            return f"the host's tunnel closed ({closed}); waiting for its agent to open it again"
        because = self.direct_failures.get(host.id)
        return ("waiting for the host's agent to open its tunnel (asked at its next check-in)"
                + (f"; direct was tried: {because}" if because else ""))

    def direct_failed(self, host: Host, reason: str) -> bool:
        """The direct dial failed: an auto host it never reached turns to its tunnel (True)."""
        if host.transport != Transport.AUTO or host.id in self.direct_worked:
            return False
        self.direct_failures[host.id] = reason
        return True

    def forget(self, host_id: str) -> None:
        self.direct_failures.pop(host_id, None)
        self.direct_worked.discard(host_id)

    async def dial(self, target: Target, ctx: ssl.SSLContext) -> tuple[Stream, str]:
        """A stream to the host's libvirtd, and the serial of the libvirtd certificate it
        served ("" through a tunnel: the tunnel's own certificate proved the host)."""
        if target.tunnel:
            return await self.tunnels.open_stream(target.host_id), ""
        stream = await dial(target, ctx)
        self.direct_worked.add(target.host_id)
        return stream

    def describe(self, host: Host) -> dict[str, Any]:
        """The host's transport, for `hosts show`."""
        tunnel = self.tunnels.describe(host.id)
        shown: dict[str, Any] = {"mode": host.transport,
                                 "in_use": "tunnel" if self.via_tunnel(host) else "direct",
                                 "tunnel": tunnel}
        if host.id in self.direct_failures:
            shown["why_tunnel"] = f"the direct dial failed: {self.direct_failures[host.id]}"
        if tunnel is None and host.id in self.tunnels.last_closed:
            shown["tunnel_closed"] = self.tunnels.last_closed[host.id]
        return shown
