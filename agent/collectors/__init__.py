"""Host facts, one small module per source (after node_exporter's collectors).

Each collector is a function `collect(ctx) -> dict` registered by name. `run_all` runs
them, times them and catches their failures, so a broken collector shows up as
`{"ok": false, "error": ...}` in the report instead of breaking the check-in.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass
class Context:
    """What collectors read from: configurable roots so tests can point them elsewhere."""

    proc: Path = Path("/proc")
    sys: Path = Path("/sys")
    dev: Path = Path("/dev")
    libvirt: Any = None  # agent.local_libvirt.LocalLibvirt, when there is one
    # `[facts] storage_paths` in agent.toml: filesystems whose size/free the storage
    # collector reports (what IsardVDI runs `df` for, e.g. /isard).
    storage_paths: list[Path] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)


Collector = Callable[[Context], dict[str, Any]]
REGISTRY: dict[str, Collector] = {}


def register(name: str) -> Callable[[Collector], Collector]:
    def add(fn: Collector) -> Collector:
        REGISTRY[name] = fn
        return fn

    return add


def libvirt_connection(ctx: Context) -> Any:
    """The local libvirt connection, or an exception saying why there is none (the
    collector that needs it fails; the others go on)."""
    conn = ctx.libvirt.connection() if ctx.libvirt else None
    if conn is None:
        raise RuntimeError(f"libvirtd does not answer: {ctx.libvirt.error if ctx.libvirt else 'no uri'}")
    return conn


def error_text(exc: BaseException) -> str:
    """An error as the report shows it, for a part of a collector that failed alone."""
    message = exc.get_error_message() if hasattr(exc, "get_error_message") else None  # libvirtError
    return f"{type(exc).__name__}: {message or exc}"


def run_all(ctx: Context, names: tuple[str, ...] | None = None) -> dict[str, dict[str, Any]]:
    """Every collector (or those `names`), each timed, each failing alone."""
    results: dict[str, dict[str, Any]] = {}
    for name, collect in REGISTRY.items():
        if names is not None and name not in names:
            continue
        start = time.monotonic()
        try:
            results[name] = {"ok": True, "error": None, "data": collect(ctx)}
        except Exception as exc:  # one broken source must not break the check-in
            log.debug("collector %s failed", name, exc_info=True)
            results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "data": {}}
        results[name]["seconds"] = round(time.monotonic() - start, 4)
    return results


# Importing registers them.
from agent.collectors import (  # noqa: E402,F401
    cpu,
    host,
    kvm,
    libvirtd,
    memory,
    networks,
    numa,
    pci,
    storage,
)
