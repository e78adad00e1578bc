"""The host's CPU, and the CPU models libvirt offers KVM guests on it.

Keys (IsardVDI's hypervisor `cpu_model`, cores/threads and the guest CPU choices):
  model         str        /proc/cpuinfo's model name ("" when it names none)
  sockets       int        distinct physical packages
  cores         int        physical cores (CPUs listing the same core siblings count once)
  threads       int        logical CPUs
  guest_models  list[str]  the custom-mode models libvirt marks usable='yes' for KVM
  host_model    str        the model host-model mode stands for ("" if not supported)
  guest_modes   list[str]  the CPU modes libvirt supports for KVM guests
                           (host-passthrough, host-model, custom, maximum)
  models_error  str|None   why the libvirt part is missing (libvirtd down, no KVM domain
                           capabilities); the /proc and /sys part is reported anyway

model, cores and threads are also in the `host` collector (cpu_model, cpu_cores,
cpu_threads): readers of those keep working.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from agent.collectors import Context, error_text, libvirt_connection, register
from agent.collectors.host import parse_cpu_model, read_core_count

MAX_MODELS = 256  # libvirt 9 knows ~70 x86 models; the bound keeps the report small anyway


def parse_domain_cpu_models(xml: str) -> dict[str, Any]:
    """Pure: the guest CPU facts in `virConnectGetDomainCapabilities` XML."""
    import xml.etree.ElementTree as ET  # here, not at the top: only this parser needs it

    cpu = ET.fromstring(xml).find("cpu")
    modes = [] if cpu is None else [m for m in cpu.findall("mode") if m.get("supported") == "yes"]
    by_name = {m.get("name", ""): m for m in modes}
    custom = by_name.get("custom")
    host_model = by_name.get("host-model")
    models = [] if custom is None else [
        (m.text or "").strip() for m in custom.findall("model") if m.get("usable") == "yes"]
    host_name = host_model.findtext("model") if host_model is not None else None
    return {"guest_models": [m for m in models if m][:MAX_MODELS],
            "host_model": (host_name or "").strip(),
            "guest_modes": sorted(by_name)}


def read_socket_count(sys_root: Path) -> int:
    cpus = sys_root / "devices" / "system" / "cpu"
    return len({p.read_text().strip()
                for p in cpus.glob("cpu[0-9]*/topology/physical_package_id")})


def read_domain_cpu_models(ctx: Context) -> dict[str, Any]:
    conn = libvirt_connection(ctx)
    # (emulator, arch, machine, virttype, flags): libvirt picks the defaults for KVM.
    return parse_domain_cpu_models(conn.getDomainCapabilities(None, None, None, "kvm", 0))


@register("cpu")
def collect(ctx: Context) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "model": parse_cpu_model((ctx.proc / "cpuinfo").read_text()),
        "sockets": read_socket_count(ctx.sys),
        "cores": read_core_count(ctx.sys),
        "threads": os.cpu_count() or 0,
    }
    # The host's own CPU is worth reporting when libvirt cannot say what guests get.
    try:
        facts |= read_domain_cpu_models(ctx) | {"models_error": None}
    except Exception as exc:
        facts |= {"guest_models": [], "host_model": "", "guest_modes": [],
                  "models_error": error_text(exc)}
    return facts
