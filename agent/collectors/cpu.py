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
    # expat streamed, imported here: ElementTree would build a tree of the whole 10 KB
    # document at every check-in, and costs the agent ~0.5 MB more resident memory.
    from xml.parsers import expat

    supported: list[str] = []
    models: list[str] = []
    host_model: list[str] = []
    path: list[tuple[str, dict[str, str]]] = []
    text: list[str] = []

    def start(tag: str, attrs: dict[str, str]) -> None:
        path.append((tag, attrs))
        text.clear()
        if [t for t, _ in path] == ["domainCapabilities", "cpu", "mode"] and \
                attrs.get("supported") == "yes":
            supported.append(attrs.get("name", ""))

    def end(_tag: str) -> None:
        tags = [t for t, _ in path]
        if tags == ["domainCapabilities", "cpu", "mode", "model"]:
            mode, name = path[2][1].get("name"), "".join(text).strip()
            if mode not in supported or not name:
                pass  # a mode libvirt does not support offers no model
            elif mode == "custom" and path[3][1].get("usable") == "yes":
                models.append(name)
            elif mode == "host-model":
                host_model.append(name)
        path.pop()

    parser = expat.ParserCreate()
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = text.append
    parser.Parse(xml, True)
    return {"guest_models": models[:MAX_MODELS], "host_model": host_model[0] if host_model else "",
            "guest_modes": sorted(supported)}


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
