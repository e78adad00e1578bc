"""Storage an engine places disks on: libvirt's pools, and the paths in agent.toml's
`[facts] storage_paths` with their filesystem's size and free space (what IsardVDI runs
`df` for over SSH, e.g. /isard).

Keys:
  pools        list  libvirt storage pools, as the libvirtd collector lists them:
                     {"name", "active", "capacity", "allocation", "available"} (bytes)
  pools_error  str|None  why `pools` is empty (libvirtd down); the paths are reported anyway
  paths        list  one per configured path, in the configured order:
                     {"path", "size", "free", "error"}: size and free in bytes (free is
                     what an unprivileged writer gets, df's "Avail"); a path that is
                     missing, unreadable or hung reports its error and 0, 0
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from agent.collectors import Context, error_text, libvirt_connection, register
from agent.collectors.libvirtd import list_pools

# statvfs on a hung NFS mount blocks in the kernel, without a timeout of its own: it runs
# in a daemon thread the check-in waits for this long, then leaves behind.
STATVFS_TIMEOUT = 2.0
_stuck: dict[Path, threading.Thread] = {}  # at most one left-behind thread per path


def usage(st: os.statvfs_result) -> dict[str, int]:
    """Pure: a statvfs result as df computes Size and Avail."""
    return {"size": st.f_blocks * st.f_frsize, "free": st.f_bavail * st.f_frsize}


def read_path(path: Path, timeout: float = STATVFS_TIMEOUT) -> dict[str, Any]:
    entry: dict[str, Any] = {"path": str(path), "size": 0, "free": 0, "error": None}
    previous = _stuck.get(path)
    if previous is not None and previous.is_alive():
        return entry | {"error": f"statvfs has not returned for {timeout:g}+ s (hung mount?)"}
    result: list[os.statvfs_result | OSError] = []

    def stat() -> None:
        try:
            result.append(os.statvfs(path))
        except OSError as exc:
            result.append(exc)

    thread = threading.Thread(target=stat, name=f"statvfs {path}", daemon=True)
    thread.start()
    thread.join(timeout)
    if not result:
        _stuck[path] = thread
        return entry | {"error": f"statvfs did not return within {timeout:g} s (hung mount?)"}
    _stuck.pop(path, None)
    found = result[0]
    if isinstance(found, OSError):
        return entry | {"error": found.strerror or str(found)}
    return entry | usage(found)


@register("storage")
def collect(ctx: Context) -> dict[str, Any]:
    facts: dict[str, Any] = {"pools": [], "pools_error": None}
    try:
        facts["pools"] = list_pools(libvirt_connection(ctx))
    except Exception as exc:  # libvirtd down: the paths are still worth reporting
        facts["pools_error"] = error_text(exc)
    facts["paths"] = [read_path(p) for p in ctx.storage_paths]
    return facts
