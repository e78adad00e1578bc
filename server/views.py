"""How a host's facts read to people, for the command line and the web page alike (a
light module: every command imports it)."""

from __future__ import annotations

import json
from typing import Any

from common.cli import when


def describe_facts(name: str, result: dict[str, Any]) -> str:
    """One line per collector, in words; a failed collector shows its error. Facts are
    whatever the host sent: a shape this code does not expect is shown as such, and never
    stops the view."""
    try:
        return _describe_facts(name, result)
    except (AttributeError, KeyError, TypeError, ValueError):
        return short(f"(facts in an unexpected shape) {json.dumps(result)}", 100)


def _describe_facts(name: str, result: dict[str, Any]) -> str:
    if not result.get("ok"):
        return f"FAILED: {result.get('error')}"
    d = result.get("data") or {}
    if name == "host":
        gib = 1024**3
        return (f"{d.get('cpu_model') or 'unknown CPU'}, {d.get('cpu_cores')} cores / "
                f"{d.get('cpu_threads')} threads, {d.get('memory_total', 0) / gib:.1f} GiB "
                f"({d.get('memory_available', 0) / gib:.1f} available), load "
                f"{' '.join(str(x) for x in d.get('load', []))}, {d.get('arch')}")
    if name == "kvm":
        if not d.get("usable"):
            return f"NOT USABLE: {d.get('problem')}"
        module = d.get("module") or "built in"
        return f"usable ({module}, nested {'on' if d.get('nested') else 'off'})"
    if name == "libvirtd":
        pools = ", ".join(f"{p['name']} {p['available'] / 1024**3:.0f}/{p['capacity'] / 1024**3:.0f} GiB free"
                          for p in d.get("storage_pools", [])) or "none"
        return (f"libvirt {d.get('libvirt_version')}, QEMU {d.get('hypervisor_version')}, "
                f"{d.get('arch')}, {d.get('running_domains')} running domain(s); pools: {pools}")
    return short(", ".join(f"{k}={v}" for k, v in sorted(d.items())), 100)


def short(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def describe_transport(t: dict[str, Any]) -> str:
    """E.g. "auto, using tunnel (the direct dial failed: ...); tunnel open
    since 10:02:03, 2 streams, 1.2 MB in, 0.3 MB out"."""
    text = f"{t.get('mode', '?')}, using {t.get('in_use', '?')}"
    if t.get("why_tunnel"):
        text += f" ({t['why_tunnel']})"
    tunnel = t.get("tunnel")
    if tunnel:
        text += (f"; tunnel open since {when(tunnel['since'])}, {tunnel['streams']} stream(s), "
                 f"{tunnel['bytes_in']} B in, {tunnel['bytes_out']} B out")
    elif t.get("in_use") == "tunnel":
        text += "; no tunnel open" + (f" (last closed: {t['tunnel_closed']})"
                                      if t.get("tunnel_closed") else "")
    return text
