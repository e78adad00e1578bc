"""The libvirt gateway: one unix socket per enabled host, relayed to its libvirtd.

Any libvirt client (an engine, `virsh`, virt-manager through an SSH forward of the
socket) opens `qemu+unix:///system?socket=RUNDIR/hosts/HOST_ID.sock`, as many
connections as it likes, read-write or read-only; each is relayed, byte for byte, to a
fresh TLS connection to the host's libvirtd made with the server's libvirt client
identity and checked exactly as the link manager checks its own (links/direct.py).
The sockets are mode 0660, group `virtfleet-engine`: file permissions decide who may
use a host. Disabling or forgetting a host closes every relayed connection at once
and removes its socket; while a host cannot be reached, a new connection is closed
right after it is accepted (the engine API says why).
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from common.relay import Relay
from server.links.direct import DialError, Stream

log = logging.getLogger(__name__)

ENGINE_GROUP = "virtfleet-engine"
MAX_PER_HOST = 256  # relayed connections one host's socket serves at once

# host id -> a TLS stream to that host's libvirtd, or DialError / LookupError saying why not.
DialHost = Callable[[str], Awaitable[Stream]]


def socket_uri(path: Path) -> str:
    return f"qemu+unix:///system?socket={path}"


@dataclass
class GatewayCounts:
    """Totals over every socket, for metrics (relays that ended and forgotten hosts'
    sockets included)."""

    open: int = 0
    accepted: int = 0
    refused: int = 0
    bytes_to_hosts: int = 0
    bytes_from_hosts: int = 0


@dataclass
class HostSocket:
    path: Path
    listener: asyncio.Server
    relays: set[Relay] = field(default_factory=set)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    accepted: int = 0  # connections relayed since the socket opened
    refused: int = 0  # connections closed because the host could not be reached


class Gateway:
    def __init__(self, run_dir: Path, dial_host: DialHost,
                 reachable: Callable[[str], bool], group: str = ENGINE_GROUP) -> None:
        self.dir = run_dir / "hosts"
        self.dial_host = dial_host
        self.reachable = reachable
        self.group, self.gid = group, _group_id(group)
        self.sockets: dict[str, HostSocket] = {}
        self._pending: set[str] = set()
        self._live: set[Relay] = set()  # every socket's, for the totals
        self._ended = GatewayCounts()  # what relays that ended moved, and refusals
        self._started = False  # sockets are opened only while the server serves

    def prepare(self) -> None:
        """RUNDIR and RUNDIR/hosts: 0750, the engine group's, so its members reach the
        sockets and nobody else does."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for directory in (self.dir.parent, self.dir):
            os.chmod(directory, 0o750)
            if self.gid is not None:
                try:
                    os.chown(directory, -1, self.gid)
                except PermissionError:
                    raise PermissionError(
                        f"cannot give {directory} to group {self.group!r}: the server's user "
                        f"is not a member of it (the package makes _virtfleet one; else "
                        f"`usermod -aG {self.group} USER`, or --engine-group GROUP)") from None
        for stale in self.dir.glob("*.sock"):  # a previous run's, killed before it cleaned up
            stale.unlink(missing_ok=True)
        self._started = True

    def remove_run_dir(self) -> None:
        """At exit: the engine socket and the (now empty) directories, where they are ours."""
        (self.dir.parent / "engine.sock").unlink(missing_ok=True)
        for directory in (self.dir, self.dir.parent):
            with contextlib.suppress(OSError):  # not empty, or not ours to remove
                directory.rmdir()

    def uri(self, host_id: str) -> str:
        return socket_uri(self.dir / f"{host_id}.sock")

    def describe(self, host_id: str) -> dict[str, int]:
        sock = self.sockets.get(host_id)
        if sock is None:
            return {"open": 0, "accepted": 0, "refused": 0}
        return {"open": len(sock.relays), "accepted": sock.accepted, "refused": sock.refused}

    def counts(self) -> GatewayCounts:
        live, ended = self._live, self._ended
        return GatewayCounts(
            open=len(live), accepted=ended.accepted + sum(s.accepted for s in self.sockets.values()),
            refused=ended.refused + sum(s.refused for s in self.sockets.values()),
            bytes_to_hosts=ended.bytes_to_hosts + sum(r.sent for r in live),
            bytes_from_hosts=ended.bytes_from_hosts + sum(r.received for r in live))

    def sync(self, host_id: str, enabled: bool) -> None:
        """The host's socket exists exactly while the host is enabled (and the server
        serves: tools that build the server's parts to seed a store open none)."""
        if not self._started:
            return
        if enabled and host_id not in self.sockets and host_id not in self._pending:
            self._pending.add(host_id)
            asyncio.get_running_loop().create_task(self._open(host_id), name=f"gateway-{host_id}")
        elif not enabled and host_id in self.sockets:
            self.close(host_id)

    async def _open(self, host_id: str) -> None:
        path = self.dir / f"{host_id}.sock"
        try:
            path.unlink(missing_ok=True)
            old = os.umask(0o117)  # born 0660: no moment where others may connect
            try:
                listener = await asyncio.start_unix_server(
                    lambda r, w: self._accept(host_id, r, w), path)
            finally:
                os.umask(old)
            if self.gid is not None:
                os.chown(path, -1, self.gid)
        except OSError as exc:
            log.error("gateway socket for host %s not opened at %s: %s", host_id, path, exc)
            return
        finally:
            self._pending.discard(host_id)
        self.sockets[host_id] = HostSocket(path, listener)

    def _accept(self, host_id: str, reader: asyncio.StreamReader,
                writer: asyncio.StreamWriter) -> None:
        sock = self.sockets.get(host_id)
        if sock is None or not self.reachable(host_id) or len(sock.relays) >= MAX_PER_HOST:
            if sock is not None:
                sock.refused += 1
            writer.transport.abort()
            return
        task = asyncio.get_running_loop().create_task(self._relay(sock, host_id, (reader, writer)))
        sock.tasks.add(task)
        task.add_done_callback(sock.tasks.discard)

    async def _relay(self, sock: HostSocket, host_id: str, client: Stream) -> None:
        try:
            upstream = await self.dial_host(host_id)
        except (DialError, LookupError) as exc:
            sock.refused += 1
            log.info("gateway: a connection to host %s refused: %s", host_id, exc)
            client[1].transport.abort()
            return
        relay = Relay(client=client, upstream=upstream)
        sock.relays.add(relay)
        self._live.add(relay)
        sock.accepted += 1
        try:
            await relay.run()
        finally:
            sock.relays.discard(relay)
            self._live.discard(relay)
            relay.close()
            self._ended.bytes_to_hosts += relay.sent
            self._ended.bytes_from_hosts += relay.received

    def close(self, host_id: str) -> None:
        """Remove the host's socket and cut every connection relayed through it."""
        sock = self.sockets.pop(host_id, None)
        if sock is None:
            return
        self._ended.accepted += sock.accepted
        self._ended.refused += sock.refused
        sock.listener.close()
        sock.path.unlink(missing_ok=True)
        for relay in list(sock.relays):
            relay.close()
        for task in list(sock.tasks):
            task.cancel()

    async def stop(self) -> None:
        tasks = [t for s in self.sockets.values() for t in s.tasks]
        for host_id in list(self.sockets):
            self.close(host_id)
        with contextlib.suppress(Exception):
            await asyncio.gather(*tasks, return_exceptions=True)


def _group_id(name: str) -> int | None:
    """The engine group's id; None (sockets keep the server's own group) when there is no
    such group, as when the server runs from a checkout rather than its package."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        log.warning("no group %r: gateway and engine sockets keep the server's group (the "
                    "virtfleet-server package creates it; --engine-group names another)", name)
        return None
