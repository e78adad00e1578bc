"""What the local libvirtd says: versions, arch, running domains, storage pools."""

from __future__ import annotations

from typing import Any

import libvirt

from agent.collectors import Context, register
from common.versions import version_text


@register("libvirtd")
def collect(ctx: Context) -> dict[str, Any]:
    conn = ctx.libvirt.connection() if ctx.libvirt else None
    if conn is None:
        raise RuntimeError(f"libvirtd does not answer: {ctx.libvirt.error if ctx.libvirt else 'no uri'}")
    info = conn.getInfo()
    domains = conn.listAllDomains(libvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE)
    return {
        "libvirt_version": version_text(conn.getLibVersion()),
        "hypervisor_version": version_text(conn.getVersion()),
        "arch": info[0],
        "running_domains": len(domains),
        "domains": sorted(d.name() for d in domains)[:200],
        "storage_pools": list_pools(conn),
    }


def list_pools(conn: libvirt.virConnect) -> list[dict[str, Any]]:
    pools = []
    for pool in conn.listAllStoragePools():
        active = bool(pool.isActive())
        _state, capacity, allocation, available = pool.info() if active else (0, 0, 0, 0)
        pools.append({"name": pool.name(), "active": active, "capacity": capacity,
                      "allocation": allocation, "available": available})
    return pools
