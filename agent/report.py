"""Build the report an agent sends: who it is, libvirtd's health, and the host facts."""

from __future__ import annotations

import asyncio

from agent import collectors
from agent.config import AgentConfig
from agent.libvirt_tls import LibvirtTLS
from agent.local_libvirt import LocalLibvirt
from common import VERSION, wire


def _collect(config: AgentConfig, local: LocalLibvirt) -> wire.Report:
    health = local.health()
    facts = collectors.run_all(collectors.Context(libvirt=local,
                                                  storage_paths=config.facts.storage_paths))
    return wire.Report(
        hostname=config.hostname,
        # No role given nor joined with (bench/report.py's simulated hosts): the widest.
        role=config.role or "mixed",
        agent_version=VERSION,
        libvirtd=health,
        facts=facts,
        libvirt_endpoint=(wire.LibvirtEndpoint(host=config.hostname, port=config.libvirt.tls_port)
                          if LibvirtTLS(config.libvirt).configured() else None),
    )


async def build_report(config: AgentConfig, local: LocalLibvirt) -> wire.Report:
    """Collectors block (files, libvirt calls): run them off the event loop."""
    return await asyncio.to_thread(_collect, config, local)
