"""PCI display and 3D devices (GPUs for desktops) and their mediated-device types, from
/sys/bus/pci/devices (IsardVDI's `pci_devices` and the vGPU profiles it offers).

Keys:
  devices  list, by address, of PCI class 0x03xx devices:
    address      str  "0000:01:00.0"
    class        str  "0x030000" (VGA), "0x030200" (3D controller), ...
    vendor_id    str  "0x10de", as sysfs and libvirt's node devices write it
    device_id    str  "0x1eb8"
    vendor       str  the vendor's name, from pci.ids when installed (pciutils or
                      hwdata), else for a few GPU vendors; "" when unknown
    model        str  the device's name from pci.ids; "" without it
    driver       str  the bound driver ("nvidia", "vfio-pci", "i915", ...), "" if none
    mdev_types   list {"name", "type_id", "available_instances", "device_api"}, one per
                      mdev_supported_types/TYPE_ID/ (vGPU profiles); empty when none
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from agent.collectors import Context, register

PCI_IDS = (Path("/usr/share/misc/pci.ids"), Path("/usr/share/hwdata/pci.ids"))
MAX_DEVICES = 64
MAX_MDEV_TYPES = 64
# Without pci.ids (not installed on minimal hosts) the vendors an engine schedules GPUs by.
KNOWN_VENDORS = {"0x10de": "NVIDIA Corporation", "0x1002": "Advanced Micro Devices, Inc. [AMD/ATI]",
                 "0x8086": "Intel Corporation", "0x1af4": "Red Hat, Inc.", "0x1234": "QEMU",
                 "0x1a03": "ASPEED Technology, Inc.", "0x102b": "Matrox Electronics Systems Ltd.",
                 "0x15ad": "VMware"}

Names = tuple[dict[str, str], dict[tuple[str, str], str]]
_names_cache: dict[tuple[Path, float, frozenset[tuple[str, str]]], Names] = {}


def parse_pci_ids(lines: Iterable[str], wanted: set[tuple[str, str]]) -> Names:
    """Pure: the vendor and device names of `wanted` (vendor_id, device_id) pairs
    ("0x10de" form) in pci.ids' lines, reading only as far as needed: the file lists
    vendors first ("10de  NVIDIA Corporation"), each followed by its devices
    ("\\t1eb8  TU104GL [Tesla T4]"), then device classes ("C 00  ...")."""
    want_vendors = {v for v, _ in wanted}
    vendors: dict[str, str] = {}
    devices: dict[tuple[str, str], str] = {}
    vendor = ""
    for line in lines:
        if line.startswith("C "):
            break  # the class section: no vendors past here
        if not line.strip() or line.startswith("#") or line.startswith("\t\t"):
            continue
        key, _, name = line.strip().partition("  ")
        if not line.startswith("\t"):
            vendor = "0x" + key.lower()
            if vendor in want_vendors:
                vendors[vendor] = name.strip()
        elif vendor in want_vendors and (vendor, "0x" + key.lower()) in wanted:
            devices[(vendor, "0x" + key.lower())] = name.strip()
        if len(devices) == len(wanted) and not want_vendors - vendors.keys():
            break
    return vendors, devices


def read_names(wanted: set[tuple[str, str]], files: Iterable[Path] | None = None) -> Names:
    """The names from the first readable pci.ids, remembered until the file changes (the
    file is 1.3 MB: it is read once, not at every check-in)."""
    for path in PCI_IDS if files is None else files:
        try:
            key = (path, path.stat().st_mtime, frozenset(wanted))
            if key not in _names_cache:
                with path.open(encoding="utf-8", errors="replace") as lines:
                    _names_cache.clear()  # only the current file's answer is worth keeping
                    _names_cache[key] = parse_pci_ids(lines, wanted)
            return _names_cache[key]
        except OSError:
            continue
    return {}, {}


def parse_mdev_type(type_id: str, files: dict[str, str]) -> dict[str, Any]:
    """Pure: one mdev_supported_types/TYPE_ID/ directory's files (name is optional)."""
    available = files.get("available_instances", "").strip()
    return {"name": files.get("name", "").strip() or type_id, "type_id": type_id,
            "available_instances": int(available) if available.isdigit() else 0,
            "device_api": files.get("device_api", "").strip()}


def device_fact(address: str, files: dict[str, str], driver: str,
                mdev_types: list[dict[str, Any]], names: Names) -> dict[str, Any]:
    """Pure: one device's fact from its sysfs files (class, vendor, device)."""
    vendor_id, device_id = files["vendor"].strip().lower(), files["device"].strip().lower()
    vendors, devices = names
    return {"address": address, "class": files["class"].strip().lower(),
            "vendor_id": vendor_id, "device_id": device_id,
            "vendor": vendors.get(vendor_id) or KNOWN_VENDORS.get(vendor_id, ""),
            "model": devices.get((vendor_id, device_id), ""),
            "driver": driver, "mdev_types": mdev_types}


def _read(directory: Path, names: Iterable[str]) -> dict[str, str]:
    return {name: (directory / name).read_text() for name in names if (directory / name).is_file()}


def read_mdev_types(device: Path) -> list[dict[str, Any]]:
    types = sorted((device / "mdev_supported_types").glob("*/"))[:MAX_MDEV_TYPES]
    return [parse_mdev_type(t.name, _read(t, ("name", "available_instances", "device_api")))
            for t in types]


def read_display_devices(sys_root: Path) -> list[tuple[str, dict[str, str], str, list[dict[str, Any]]]]:
    """(address, files, driver, mdev types) of every class 0x03 device, by address."""
    found: list[tuple[str, dict[str, str], str, list[dict[str, Any]]]] = []
    root = sys_root / "bus" / "pci" / "devices"
    if not root.is_dir():
        return found  # no PCI bus (some containers, some ARM boards): no devices
    for device in sorted(root.iterdir()):
        files = _read(device, ("class", "vendor", "device"))
        if not files.get("class", "").startswith("0x03") or len(files) < 3:
            continue
        driver = device / "driver"
        found.append((device.name, files,
                      os.path.basename(os.readlink(driver)) if driver.is_symlink() else "",
                      read_mdev_types(device)))
        if len(found) == MAX_DEVICES:
            break
    return found


@register("pci")
def collect(ctx: Context) -> dict[str, Any]:
    raw = read_display_devices(ctx.sys)
    wanted = {(f["vendor"].strip().lower(), f["device"].strip().lower()) for _, f, _, _ in raw}
    names = read_names(wanted) if wanted else ({}, {})
    return {"devices": [device_fact(a, f, d, m, names) for a, f, d, m in raw]}
