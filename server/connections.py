"""The libvirt connection manager: one `qemu+tls://` connection per enabled host, kept up.

Per host, one asyncio task loops: wait until the host may be connected (enabled, checking
in, its agent says libvirtd answers), open the connection in a worker thread, check the
host can serve its role, report `online`, then wait for the connection to close (libvirt's
close callback, keepalive included) or for the admin to disable or forget the host.
Every failure becomes a `Connection("error", detail)` in words a person acts on, and the
retry waits on a capped, jittered backoff that a "libvirtd is back" check-in cuts short.

libvirt's own event loop (keepalive, close callbacks) runs in one daemon thread with the
default implementation; its callbacks hop to asyncio with `call_soon_threadsafe`.
Blocking libvirt calls run in a private thread pool so a slow host never stalls the
event loop or the other hosts.

The engine's one entry point: `connections.get(host_id)` -> open `libvirt.virConnect`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import libvirt
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from common import libvirt_events, pki
from common.backoff import Backoff
from common.files import write_atomic
from common.logs import event
from server.hosts import CONNECTING, ERROR, ONLINE, Connection
from server.store import Host

if TYPE_CHECKING:
    from server.fleet import Fleet

log = logging.getLogger(__name__)

CLIENT_CN = "virtfleet-server-libvirt-client"
CLIENT_CERT_LIFETIME = dt.timedelta(days=365)
OPEN_TIMEOUT = 15.0
KEEPALIVE_INTERVAL = 2  # seconds between probes when the link is quiet
KEEPALIVE_COUNT = 3  # unanswered probes before libvirt closes the connection
NEEDS_KVM = ("hypervisor", "mixed")


@dataclass
class Link:
    """One host's connection and what is known about it."""

    host_id: str
    task: asyncio.Task[None] | None = None
    conn: libvirt.virConnect | None = None
    state: Connection | None = None
    uri: str = ""
    connected_since: float | None = None
    remote_version: str = ""
    last_error: str = ""
    last_error_at: float | None = None
    wake: asyncio.Event | None = None
    closed: asyncio.Event | None = None
    idle: bool = False  # waiting for the host to become ready, not in a backoff


class ConnectionManager:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.links: dict[str, Link] = {}
        self.pki_dir = fleet.config.state_dir / "libvirt-client"
        self._ensure_client_certificate()
        self.publish_revocations()
        self._pool = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="libvirt")
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- the engine's API -------------------------------------------------------

    def get(self, host_id: str) -> libvirt.virConnect | None:
        """The open libvirt connection to a host, or None when it is not online."""
        link = self.links.get(host_id)
        if link is None or link.state is None or link.state.state != ONLINE:
            return None
        return link.conn

    def state_of(self, host_id: str) -> Connection | None:
        link = self.links.get(host_id)
        return link.state if link else None

    def describe(self, host_id: str) -> dict[str, Any]:
        link = self.links.get(host_id)
        if link is None:
            return {"state": "closed"}
        return {
            "state": link.state.state if link.state else "waiting",
            "uri": link.uri,
            "connected_since": link.connected_since,
            "remote_libvirt_version": link.remote_version,
            "last_error": link.last_error,
            "last_error_at": link.last_error_at,
        }

    @property
    def client_dn(self) -> str:
        return f"CN={CLIENT_CN}"

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        libvirt_events.start()
        for host in self.fleet.store.list_hosts():
            self.host_changed(host.id, host=host)

    async def stop(self) -> None:
        tasks = [link.task for link in self.links.values() if link.task]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for link in list(self.links.values()):
            await self._close(link)
        self.links.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def host_changed(self, host_id: str, libvirtd_recovered: bool = False,
                     host: Host | None = None) -> None:
        """Something about the host changed (check-in, admin action): start, stop or wake
        its connection task. `host`: its current row, when the caller holds one. Cheap when
        nothing needs doing (a check-in calls it); safe before start()."""
        if self._loop is None:
            return
        if host is None:
            host = self.fleet.store.get_host(host_id)
        if host is None or host.admin_state != "enabled":
            self._drop(host_id)
            return
        link = self.links.get(host_id)
        if link is None:
            link = self.links[host_id] = Link(host_id)
        ready = not_ready_reason(host) is None
        if link.task is None:
            # Started once the host is ready: a host that never reports a TLS endpoint
            # costs a Link, not a task and its events.
            if ready:
                link.wake, link.closed = asyncio.Event(), asyncio.Event()
                link.task = asyncio.create_task(self._run(link), name=f"libvirt-{host_id}")
        elif libvirtd_recovered or (link.idle and ready):
            # A backoff in progress is cut short only by news that libvirtd is back.
            assert link.wake is not None
            link.wake.set()

    def reconnect(self, host_id: str) -> None:
        """Open the connection afresh (after a role change, say) so every check runs again."""
        self._drop(host_id)
        self.host_changed(host_id)

    def _drop(self, host_id: str) -> None:
        link = self.links.pop(host_id, None)
        if link is not None and link.task:
            link.task.cancel()

    # -- the per-host loop --------------------------------------------------------

    async def _run(self, link: Link) -> None:
        backoff = Backoff(base=1.0, cap=60.0)
        assert link.wake is not None and link.closed is not None
        try:
            while True:
                link.wake.clear()
                if not_ready_reason(self.fleet.store.get_host(link.host_id)) is None:
                    ok = await self._connect(link)
                    if ok:
                        backoff.reset()
                        await self._wait_closed(link)
                        continue
                    await self._wait(link.wake, backoff.next_delay())
                else:
                    link.idle = True
                    await link.wake.wait()
                    link.idle = False
        except asyncio.CancelledError:
            await self._close(link)
            raise

    async def _wait(self, event_: asyncio.Event, timeout: float) -> None:
        try:
            await asyncio.wait_for(event_.wait(), timeout)
        except TimeoutError:
            pass

    async def _connect(self, link: Link) -> bool:
        host = self.fleet.store.get_host(link.host_id)
        if host is None:
            return False
        endpoint = host.report.get("libvirt_endpoint") or {}
        port = int(endpoint.get("port") or 16514)
        address = host.address
        hostpart = f"[{address}]" if ":" in address else address
        link.uri = f"qemu+tls://{hostpart}:{port}/system?pkipath={self.pki_dir}"
        self._set(link, Connection(CONNECTING, f"opening {link.uri.split('?')[0]}"))
        loop = asyncio.get_running_loop()
        try:
            conn = await asyncio.wait_for(
                loop.run_in_executor(self._pool, self._open, link.uri), OPEN_TIMEOUT)
        except TimeoutError:
            self._fail(link, f"no answer from libvirtd at {address}:{port} within "
                             f"{OPEN_TIMEOUT:g} s: is the host reachable from the server?")
            return False
        except libvirt.libvirtError as exc:
            self._fail(link, explain_open_error(exc, address, port))
            return False
        link.conn = conn
        link.closed.clear()  # type: ignore[union-attr]
        try:
            problem = await loop.run_in_executor(self._pool, self._role_problem, conn, host.role,
                                                 host.report)
            version = await loop.run_in_executor(self._pool, conn.getLibVersion)
        except libvirt.libvirtError as exc:
            await self._close(link)
            self._fail(link, f"connection lost while checking the host: {exc.get_error_message()}")
            return False
        if problem:
            await self._close(link)
            self._fail(link, problem)
            return False
        link.remote_version = _version_text(version)
        link.connected_since = time.time()
        self._set(link, Connection(ONLINE, f"libvirt connection open (libvirt "
                                           f"{link.remote_version}, role {host.role})"))
        event(log, "connection_open", "host %s: libvirt connection open at %s", host.hostname,
              link.uri.split("?")[0], host_id=link.host_id)
        return True

    def _open(self, uri: str) -> libvirt.virConnect:
        conn = libvirt.open(uri)
        try:
            conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
            conn.registerCloseCallback(self._on_close, None)
        except libvirt.libvirtError:
            conn.close()
            raise
        return conn

    def _role_problem(self, conn: libvirt.virConnect, role: str, report: dict[str, Any]) -> str:
        """Why this host cannot serve its role, or "" when it can."""
        if role not in NEEDS_KVM:
            return ""
        try:
            conn.getDomainCapabilities(None, None, None, "kvm", 0)
        except libvirt.libvirtError as exc:
            cause = _reported_kvm_problem(report) or exc.get_error_message()
            return (f"role {role} needs KVM, and KVM is not usable on this host: {cause}. "
                    "Fix KVM on the host or set its role to disk_operations.")
        return ""

    def _on_close(self, conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
        """Called in libvirt's event thread when a connection closes for any reason."""
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._closed, conn, reason)

    def _closed(self, conn: libvirt.virConnect, reason: int) -> None:
        for link in self.links.values():
            if link.conn is conn:
                link.last_error = CLOSE_REASONS.get(reason, f"closed (reason {reason})")
                link.closed.set()  # type: ignore[union-attr]

    async def _wait_closed(self, link: Link) -> None:
        assert link.closed is not None
        await link.closed.wait()
        reason = link.last_error or "closed"
        await self._close(link)
        host = self.fleet.store.get_host(link.host_id)
        name = host.hostname if host else link.host_id
        event(log, "connection_lost", "host %s: libvirt connection lost: %s", name, reason,
              level=logging.WARNING, host_id=link.host_id, reason=reason)
        self._fail(link, f"libvirt connection lost: {reason}; reconnecting")

    async def _close(self, link: Link) -> None:
        conn, link.conn = link.conn, None
        link.connected_since = None
        if conn is None:
            return
        try:
            conn.unregisterCloseCallback()
        except libvirt.libvirtError:
            pass
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._pool, conn.close)
        except (libvirt.libvirtError, RuntimeError):
            pass

    def _fail(self, link: Link, detail: str) -> None:
        link.last_error, link.last_error_at = detail, time.time()
        self._set(link, Connection(ERROR, detail))

    def _set(self, link: Link, state: Connection | None) -> None:
        link.state = state
        self.fleet.status.refresh(link.host_id)

    # -- the server's libvirt client identity ----------------------------------------

    def publish_revocations(self) -> None:
        """Write the libvirt CA's revocation list where libvirt's client reads it (pkipath's
        cacrl.pem, read at every connection open): a forgotten host's libvirtd certificate
        is then refused even if someone serves it from an address the server dials."""
        revoked = self.fleet.store.revoked_libvirt_certs(time.time())
        crl_path = self.pki_dir / "cacrl.pem"
        if not revoked:
            crl_path.unlink(missing_ok=True)
            return
        crl = self.fleet.libvirt_ca.revocation_list(revoked)
        write_atomic(crl_path, crl.public_bytes(serialization.Encoding.PEM))

    def _ensure_client_certificate(self) -> None:
        """libvirt's pkipath layout: cacert.pem, cacrl.pem, clientcert.pem, clientkey.pem."""
        ca = self.fleet.libvirt_ca
        cert_path = self.pki_dir / "clientcert.pem"
        if cert_path.exists() and (self.pki_dir / "cacert.pem").read_text() == ca.cert_pem:
            cert = pki.load_cert(cert_path.read_bytes())
            if pki.not_after(cert) - dt.datetime.now(dt.UTC) > dt.timedelta(days=30):
                return
        self.pki_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        key = pki.new_key()
        cert = ca.issue(key.public_key(), [(NameOID.COMMON_NAME, CLIENT_CN)],
                        lifetime=CLIENT_CERT_LIFETIME, client=True)
        write_atomic(self.pki_dir / "clientkey.pem", pki.key_pem(key), mode=0o600)
        write_atomic(cert_path, pki.cert_pem(cert))
        write_atomic(self.pki_dir / "cacert.pem", ca.cert_pem)


def not_ready_reason(host: Host | None) -> str | None:
    """Why the server should not try to connect to this host yet, or None."""
    if host is None or host.admin_state != "enabled":
        return "not enabled"
    if host.status == "offline":
        return "offline"
    if not (host.report.get("libvirtd") or {}).get("ok"):
        return "libvirtd down"
    if not host.report.get("libvirt_endpoint"):
        return "no TLS endpoint reported yet"
    return None


def _reported_kvm_problem(report: dict[str, Any]) -> str:
    """The agent's words for why KVM is unusable, if its report (free-form facts, so any
    shape) has them."""
    found: Any = report
    for key in ("facts", "kvm", "data", "problem"):
        found = found.get(key) if isinstance(found, dict) else None
    return found if isinstance(found, str) else ""


CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "I/O error on the connection",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "libvirtd closed the connection (stopped or restarted?)",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "no keepalive answer: the host or the network "
                                                "between stopped answering",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by the server",
}


def explain_open_error(exc: libvirt.libvirtError, address: str, port: int) -> str:
    """libvirt's error when opening, with what it means for the operator."""
    msg = exc.get_error_message() or str(exc)
    low = msg.lower()
    if "connection refused" in low:
        return (f"libvirtd is not listening for TLS at {address}:{port} (connection refused): "
                f"is libvirtd running with its TLS listener? libvirt said: {msg}")
    if any(s in low for s in ("no route to host", "network is unreachable", "timed out")):
        return f"cannot reach {address}:{port}: {msg}"
    if any(s in low for s in ("certificate", "tls", "gnutls", "x509", "distinguished name",
                              "authentication")):
        return f"TLS refused between the server and libvirtd at {address}:{port}: {msg}"
    return f"cannot open libvirt at {address}:{port}: {msg}"


def _version_text(version: int) -> str:
    return f"{version // 1_000_000}.{version // 1000 % 1000}.{version % 1000}"

