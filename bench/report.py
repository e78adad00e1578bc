"""The check-in report the simulated hosts send: built once by the agent's real collectors.

The collectors run against libvirt's in-process `test:///default` driver, so the report
has the real shape and size (host, KVM and libvirtd facts) without a daemon. No TLS
endpoint: the simulated agents run with `configure_tls = false`.
"""

from __future__ import annotations

import asyncio

from agent.config import AgentConfig
from agent.local_libvirt import LocalLibvirt
from agent.report import build_report
from common import wire


def simulated_report(hostname: str = "sim") -> wire.Report:
    config = AgentConfig()
    config.hostname = hostname
    config.libvirt.uri = "test:///default"
    config.libvirt.configure_tls = False
    local = LocalLibvirt(config.libvirt.uri, on_change=lambda: None)
    try:
        report = asyncio.run(build_report(config, local))
    finally:
        local.close()
    report.libvirt_endpoint = None
    return report
