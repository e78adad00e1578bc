"""KVM on this host: /dev/kvm, the vendor module, nested virtualization, and the
"disabled in BIOS" case (the CPU has vmx/svm but KVM is not there).

Keys (IsardVDI's `kvm_module` is `vendor`, or "bios_disabled" when `disabled_in_bios`):
  usable            bool  /dev/kvm exists and opens read-write
  vendor            str   "intel" (vmx flag), "amd" (svm flag) or "" (neither)
  module            str   kvm_intel / kvm_amd when loaded, else ""
  cpu_flag          str   vmx / svm / ""
  nested            bool  the module's `nested` parameter is on
  disabled_in_bios  bool  the CPU has the flag but no module and no usable /dev/kvm
  problem           str   what to do about it, in words ("" when usable)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from agent.collectors import Context, register

VENDOR_FLAGS = {"vmx": "kvm_intel", "svm": "kvm_amd"}
VENDORS = {"vmx": "intel", "svm": "amd"}


def parse_cpu_flags(cpuinfo: str) -> set[str]:
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return set(value.split())
    return set()


def assess(flags: set[str], device_usable: bool, device_exists: bool, module: str | None,
           nested: str | None) -> dict[str, Any]:
    """Pure: what the facts mean, with `problem` in words a person acts on."""
    vendor_flag = next((f for f in VENDOR_FLAGS if f in flags), None)
    expected = VENDOR_FLAGS.get(vendor_flag or "")
    problem = ""
    if not device_usable:
        if vendor_flag and not module:
            problem = (f"the CPU supports {vendor_flag} but module {expected} is not loaded: "
                       "virtualization is probably disabled in the BIOS/UEFI "
                       f"(check `dmesg | grep -i kvm`, then `modprobe {expected}`)")
        elif vendor_flag:
            problem = ("/dev/kvm is missing or not writable although "
                       f"{module} is loaded" if not device_exists else
                       "/dev/kvm exists but cannot be opened read-write")
        else:
            problem = "the CPU has no hardware virtualization (no vmx or svm flag)"
    return {
        "usable": device_usable,
        "vendor": VENDORS.get(vendor_flag or "", ""),
        "module": module or "",
        "cpu_flag": vendor_flag or "",
        "nested": nested in ("Y", "1") if nested is not None else False,
        "disabled_in_bios": bool(vendor_flag and not module and not device_usable),
        "problem": problem,
    }


def read_module(sys_root: Path) -> tuple[str | None, str | None]:
    for module in ("kvm_intel", "kvm_amd"):
        path = sys_root / "module" / module
        if path.is_dir():
            nested = path / "parameters" / "nested"
            return module, nested.read_text().strip() if nested.exists() else None
    return None, None


@register("kvm")
def collect(ctx: Context) -> dict[str, Any]:
    device = ctx.dev / "kvm"
    module, nested = read_module(ctx.sys)
    flags = parse_cpu_flags((ctx.proc / "cpuinfo").read_text())
    usable = device.exists() and os.access(device, os.R_OK | os.W_OK)
    return assess(flags, usable, device.exists(), module, nested)
