"""libvirt's virtual networks, the ones an engine attaches desktops to.

Keys:
  networks  list, by name: {"name", "active" (bool), "bridge" (the host bridge, "" when
            libvirt has none to give, e.g. a network of another forward mode)}
"""

from __future__ import annotations

from typing import Any

from agent.collectors import Context, libvirt_connection, register

MAX_NETWORKS = 256


def network_fact(net: Any) -> dict[str, Any]:
    try:
        bridge = net.bridgeName()
    except Exception:  # libvirtError for networks without a bridge (hostdev, macvtap...)
        bridge = ""
    return {"name": net.name(), "active": bool(net.isActive()), "bridge": bridge or ""}


@register("networks")
def collect(ctx: Context) -> dict[str, Any]:
    conn = libvirt_connection(ctx)
    nets = sorted(conn.listAllNetworks(), key=lambda n: n.name())[:MAX_NETWORKS]
    return {"networks": [network_fact(n) for n in nets]}
