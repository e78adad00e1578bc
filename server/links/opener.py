"""Open a libvirt connection to a host through a relay the server controls.

libvirt's client has no deadline for its TLS handshake or its first RPCs: a port that
accepts and never answers held a thread for minutes, and enough of them filled the
pool every host shared. So libvirt never dials a host here. The server dials (in
asyncio, with deadlines, checking the host's certificate itself: direct.py), then hands
libvirt a private unix socket relayed to that TLS stream. When a deadline passes the
relay is cut, the blocked libvirt call sees end-of-file and its thread comes back.

Bounds: one open in flight per host; at most `max_opens` opens at once, each holding its
slot until its thread returns; closes and checks run in a pool of their own, so they
never wait behind opens; an open that succeeds after its caller gave up is closed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import shutil
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from common import libvirt_events
from common.relay import Relay
from common.versions import version_text
from server.links.direct import DialError, Stream, Target, dial

log = logging.getLogger(__name__)

OPEN_TIMEOUT = 15.0  # libvirt's open and the role check, once the TLS stream is up
CLOSE_TIMEOUT = 5.0
KEEPALIVE_INTERVAL = 2  # seconds between probes when the link is quiet
KEEPALIVE_COUNT = 3  # unanswered probes before libvirt closes the connection
MAX_OPENS = 8  # libvirt opens in flight at once, over all hosts
NEEDS_KVM = ("hypervisor", "mixed")

CLOSE_REASONS = {
    libvirt.VIR_CONNECT_CLOSE_REASON_ERROR: "I/O error on the connection",
    libvirt.VIR_CONNECT_CLOSE_REASON_EOF: "libvirtd closed the connection (stopped or restarted?)",
    libvirt.VIR_CONNECT_CLOSE_REASON_KEEPALIVE: "no keepalive answer: the host or the network "
                                                "between stopped answering",
    libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT: "closed by the server",
}


class OpenError(Exception):
    """The link could not be opened; the message says why, for the operator.
    `dial_failed`: libvirtd could not be reached at all (DialError), as opposed to
    libvirt failing once it was."""

    def __init__(self, message: str, dial_failed: bool = False) -> None:
        super().__init__(message)
        self.dial_failed = dial_failed


@dataclass
class OpenLink:
    """An open libvirt connection to a host, through its relay."""

    conn: libvirt.virConnect
    relay: Relay
    uri: str
    remote_version: str
    serial: str  # of the libvirtd certificate the host served
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    close_reason: str = ""


@dataclass(frozen=True)
class Needs:
    """What the host must offer: its role, and the agent's words if KVM is unusable."""

    role: str
    kvm_problem: str = ""


Dial = Callable[[Target, ssl.SSLContext], Awaitable[tuple[Stream, str]]]


class LibvirtOpener:
    """`dial` reaches the host's libvirtd (direct.dial: TLS to ADDR:PORT); `libvirt_open`
    is the blocking open of a libvirt URI (libvirt.open with keepalive). Both are
    parameters so the bounds can be tested without a host."""

    def __init__(self, ctx: ssl.SSLContext, socket_dir: Path, max_opens: int = MAX_OPENS,
                 open_timeout: float = OPEN_TIMEOUT, dial: Dial = dial,
                 libvirt_open: Callable[[str], libvirt.virConnect] | None = None) -> None:
        self._ctx = ctx
        self._dial = dial
        self._libvirt_open = libvirt_open or _open_blocking
        self._open_timeout = open_timeout
        self._slots = asyncio.Semaphore(max_opens)
        self._open_pool = concurrent.futures.ThreadPoolExecutor(max_opens, "libvirt-open")
        self._call_pool = concurrent.futures.ThreadPoolExecutor(4, "libvirt-call")
        self._in_flight: dict[str, asyncio.Future[libvirt.virConnect]] = {}
        # Where libvirt is handed each relay's private socket: in the run dir, so that
        # systemd (RuntimeDirectory) and the next start clear what a killed server left.
        self._dir = socket_dir
        self._names = itertools.count()

    def stop(self) -> None:
        self._open_pool.shutdown(wait=False, cancel_futures=True)
        self._call_pool.shutdown(wait=False, cancel_futures=True)
        shutil.rmtree(self._dir, ignore_errors=True)

    async def open(self, target: Target, needs: Needs) -> OpenLink:
        hung = self._in_flight.get(target.host_id)
        if hung is not None and not hung.done():
            raise OpenError("the previous attempt to open this host's libvirt connection has "
                            "not returned yet; retrying once it has")
        try:
            stream, serial = await self._dial(target, self._ctx)
        except DialError as exc:
            raise OpenError(str(exc), dial_failed=True) from None
        link = await self._open_relayed(target, stream, serial)
        try:
            problem = await self._call(link, self._role_problem, link.conn, needs)
        except libvirt.libvirtError as exc:
            await self.close(link)
            raise OpenError(f"connection lost while checking the host: "
                            f"{exc.get_error_message()}") from None
        if problem:
            await self.close(link)
            raise OpenError(problem)
        return link

    async def _open_relayed(self, target: Target,
                            stream: Stream, serial: str) -> OpenLink:
        self._dir.mkdir(mode=0o700, exist_ok=True)  # 0700: these reach a host as the server
        self._dir.chmod(0o700)
        path = self._dir / f"{next(self._names)}.sock"
        accepted: asyncio.Future[Relay] = asyncio.get_running_loop().create_future()
        tasks: list[asyncio.Task[None]] = []

        def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            if accepted.done():  # one client per socket: the libvirt call we started
                writer.transport.abort()
                return
            relay = Relay(client=(reader, writer), upstream=stream)
            tasks.append(asyncio.create_task(relay.run(), name=f"relay-{target.host_id}"))
            accepted.set_result(relay)

        listener = await asyncio.start_unix_server(accept, path)
        try:
            conn = await self._open_in_thread(target.host_id, f"qemu+unix:///system?socket={path}",
                                            accepted, stream)
        finally:
            listener.close()
            path.unlink(missing_ok=True)
        relay = accepted.result()
        link = OpenLink(conn=conn, relay=relay, uri=target.uri,
                        remote_version="", serial=serial)
        try:
            await self._watch(link, tasks[0])
            link.remote_version = version_text(await self._call(link, conn.getLibVersion))
        except libvirt.libvirtError as exc:
            await self.close(link)
            raise OpenError(f"connection lost while checking the host: "
                            f"{exc.get_error_message()}") from None
        return link

    async def _open_in_thread(self, host_id: str, uri: str, accepted: asyncio.Future[Relay],
                              stream: Stream) -> libvirt.virConnect:
        libvirt_events.start()
        await self._slots.acquire()
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._open_pool, self._libvirt_open, uri)
        self._in_flight[host_id] = future
        gave_up = False

        def finished(done: asyncio.Future[libvirt.virConnect]) -> None:
            self._slots.release()
            if self._in_flight.get(host_id) is done:
                del self._in_flight[host_id]
            if gave_up and not done.cancelled() and done.exception() is None:
                self._call_pool.submit(_close_quietly, done.result())  # succeeded too late

        future.add_done_callback(finished)
        try:
            return await asyncio.wait_for(asyncio.shield(future), self._open_timeout)
        except BaseException as exc:
            gave_up = True
            # Cut the relay: the blocked call reads end-of-file and returns.
            if accepted.done():
                accepted.result().close()
            else:
                stream[1].transport.abort()
            if isinstance(exc, TimeoutError):
                raise OpenError(f"libvirtd did not complete opening the connection within "
                                f"{self._open_timeout:g} s (is it hung?)") from None
            if isinstance(exc, libvirt.libvirtError):
                raise OpenError(f"cannot open libvirt: {exc.get_error_message() or exc}") from None
            raise

    async def _watch(self, link: OpenLink, relay_task: asyncio.Task[None]) -> None:
        """`link.closed` is set when libvirt reports the close (keepalive included) or
        the relay ends, whichever comes first. (No libvirt call runs on the event loop,
        not even a local one: it may wait for a lock held by a thread that waits for the
        relay, which runs on the event loop.)"""
        loop = asyncio.get_running_loop()

        def on_close(_conn: libvirt.virConnect, reason: int, _opaque: object) -> None:
            loop.call_soon_threadsafe(self._mark_closed, link,
                                      CLOSE_REASONS.get(reason, f"closed (reason {reason})"))

        relay_task.add_done_callback(lambda _t: self._mark_closed(
            link, "the connection to the host's libvirtd ended (libvirtd stopped, or the network "
                  "between broke)"))
        await self._call(link, link.conn.registerCloseCallback, on_close, None)

    @staticmethod
    def _mark_closed(link: OpenLink, reason: str) -> None:
        if not link.closed.is_set():
            link.close_reason = reason
            link.closed.set()

    async def _call(self, link: OpenLink, fn: Callable[..., Any], *args: object) -> Any:
        """A libvirt call in the check pool, with a deadline that cuts the relay."""
        future = asyncio.get_running_loop().run_in_executor(self._call_pool, fn, *args)
        try:
            return await asyncio.wait_for(future, self._open_timeout)
        except TimeoutError:
            link.relay.close()
            raise OpenError(f"libvirtd did not answer within {self._open_timeout:g} s") from None

    async def close(self, link: OpenLink) -> None:
        """Cut the relay first, so closing the libvirt connection never waits on the host."""
        link.relay.close()
        self._mark_closed(link, CLOSE_REASONS[libvirt.VIR_CONNECT_CLOSE_REASON_CLIENT])
        future = asyncio.get_running_loop().run_in_executor(self._call_pool, _close_quietly,
                                                            link.conn)
        with contextlib.suppress(TimeoutError, RuntimeError):
            await asyncio.wait_for(future, CLOSE_TIMEOUT)

    @staticmethod
    def _role_problem(conn: libvirt.virConnect, needs: Needs) -> str:
        """Why this host cannot serve its role, or "" when it can."""
        if needs.role not in NEEDS_KVM:
            return ""
        try:
            conn.getDomainCapabilities(None, None, None, "kvm", 0)
        except libvirt.libvirtError as exc:
            cause = needs.kvm_problem or exc.get_error_message()
            return (f"role {needs.role} needs KVM, and KVM is not usable on this host: {cause}. "
                    "Fix KVM on the host or set its role to disk_operations.")
        return ""


def _open_blocking(uri: str) -> libvirt.virConnect:
    conn = libvirt.open(uri)
    try:
        conn.setKeepAlive(KEEPALIVE_INTERVAL, KEEPALIVE_COUNT)
    except libvirt.libvirtError:
        conn.close()
        raise
    return conn


def _close_quietly(conn: libvirt.virConnect) -> None:
    with contextlib.suppress(libvirt.libvirtError):
        conn.unregisterCloseCallback()
    with contextlib.suppress(libvirt.libvirtError):
        conn.close()
