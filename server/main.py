"""The server process: builds its parts, starts and supervises every background task,
serves until SIGTERM or SIGINT, then shuts down cleanly.

A background task that dies unexpectedly ends the process with a non-zero status (and
the task's name and error in the log), so systemd restarts it: a server whose offline
sweep or check-in writer is gone would go on answering while its state rots.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import ssl
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from common import notify
from common.tls import limit_tls_buffers
from server import memory
from server.audit import Audit
from server.ca import CertificateAuthority
from server.changes import ChangeLog
from server.config import ServerConfig
from server.doors import admin_api, agent_api, engine_api, metrics
from server.doors.engine_api import host_record
from server.doors.gateway import Gateway
from server.doors.guard import HANDSHAKE_TIMEOUT, ConnectionGuard, OncePer, raise_file_limit
from server.doors.web import WebDoor, create_web_app
from server.fleet import Fleet, identify, retire_previous_libvirt_cert
from server.hosts import HostStatus
from server.keys import open_state
from server.links.direct import Stream
from server.links.manager import LinkManager
from server.links.opener import LibvirtOpener
from server.links.pki import CLIENT_DN, dial_context, ensure_client_identity
from server.links.relays import OwnerLinks, RelayDoor, replica_context
from server.links.routes import Routes
from server.links.tunnels import AgentPort, Tunnels
from server.model import AdminState, Connection, Host, LinkState, Status
from server.pace import ReconnectPace
from server.replicas import Leases, SoleOwner, replica_id
from server.store import CHECKIN_FLUSH, Store, StoreError
from server.tls import (
    TLS_READ_BUFFER,
    ensure_replica_cert,
    ensure_server_cert,
    server_context,
    server_names,
)
from server.websessions import WebSessions

log = logging.getLogger(__name__)

# The watchdog is pinged only while the sweep keeps finishing: a stalled loop or a hung
# store stops the pings and systemd restarts the server.
SWEEP_STALE = 30.0
PRUNE_EVERY = 3600.0


@dataclass
class Parts:
    config: ServerConfig
    store: Store
    fleet: Fleet
    status: HostStatus
    links: LinkManager
    opener: LibvirtOpener
    routes: Routes
    gateway: Gateway
    changes: ChangeLog
    events: HostEvents
    registry: CollectorRegistry
    instruments: metrics.Instruments
    sessions: WebSessions
    ownership: SoleOwner | Leases
    relays: RelayDoor | None  # other replicas' gateway clients, to this one's tunnel hosts
    owner_links: OwnerLinks | None  # this one's gateway clients, to other replicas' tunnels

    def close(self) -> None:
        self.opener.stop()
        self.store.close()


class EngineFeed:
    """Each host's record for engines, into the change log."""

    def __init__(self, changes: ChangeLog, gateway_uri: Callable[[str], str],
                 states: Mapping[str, Connection],
                 owns: Callable[[str], bool] = lambda _id: True) -> None:
        """`owns(host_id)`: whether this server holds the host's connection; another
        replica's is shown as `replica` (its state is that replica's)."""
        self.changes, self.gateway_uri, self.states = changes, gateway_uri, states
        self.owns = owns
        # What each host's record was built from (its hash; the report by its digest): a
        # check-in that changed nothing of it costs a comparison, not a rebuild.
        self._built_from: dict[str, int] = {}

    def publish(self, host: Host) -> None:
        state = self.states.get(host.id)
        link = str(state.state) if state else "closed" if self.owns(host.id) else "replica"
        source = hash((host.report_digest, host.status, host.detail, host.role, host.admin_state,
                       link))
        self.checked_in(host)
        if self._built_from.get(host.id) == source:
            return
        self._built_from[host.id] = source
        self.changes.update(host.id, host_record(host, self.gateway_uri(host.id), {"state": link}))

    def checked_in(self, host: Host) -> None:
        self.changes.checked_in(host.id, host.last_checkin)

    def remove(self, host_id: str) -> None:
        self._built_from.pop(host_id, None)
        self.changes.remove(host_id)


class HostEvents:
    """Where the domain's news of a host goes: the link manager, the gateway, the engine
    feed (fleet.LinkControl)."""

    def __init__(self, store: Store, links: LinkManager, gateway: Gateway, feed: EngineFeed,
                 routes: Routes, tunnel_elsewhere: Callable[[str], str] = lambda _id: "") -> None:
        """`tunnel_elsewhere(host_id)`: the URL of another replica the host's tunnel
        reached (its gateway socket here relays through that one), or ""."""
        self.store, self.links, self.gateway, self.feed = store, links, gateway, feed
        self.routes, self.tunnel_elsewhere = routes, tunnel_elsewhere

    def host_changed(self, host_id: str, libvirtd_recovered: bool = False,
                     host: Host | None = None) -> None:
        if host is None:
            host = self.store.get_host(host_id)
        self.links.host_changed(host_id, libvirtd_recovered, host)
        # A socket for each enabled host the server has a way to: a direct one that never
        # said where its libvirtd is cannot be reached at all, and 10,000 sockets for none
        # would cost 10,000 files.
        self.gateway.sync(host_id, host is not None and host.admin_state == AdminState.ENABLED
                          and (self.routes.can_route(host) or bool(self.tunnel_elsewhere(host_id))))
        if host is None:
            self.feed.remove(host_id)
            self.routes.forget(host_id)
            self.routes.tunnels.close(host_id, "the host was forgotten")
        else:
            self.feed.publish(host)

    def tunnel_changed(self, host_id: str) -> None:
        """A tunnel opened or closed: the host's link tries again at once."""
        self.host_changed(host_id, libvirtd_recovered=True)

    def heard_from(self, host: Host) -> None:
        self.feed.checked_in(host)

    def reconnect(self, host_id: str) -> None:
        """Afresh, every check again: an auto host tries direct first again too."""
        self.routes.forget(host_id)
        self.links.reconnect(host_id)


def build(config: ServerConfig) -> Parts:
    """Every part, each handed what it needs; nothing holds the whole."""
    state = config.state_dir
    state.mkdir(mode=0o700, parents=True, exist_ok=True)
    state.chmod(0o700)
    store, keys = open_state(state, config.database)
    identity_ca, libvirt_ca, signer = keys.identity_ca, keys.libvirt_ca, keys.signer
    key, cert = ensure_client_identity(libvirt_ca, state / "libvirt-client")
    (state / "libvirt-client" / "cacrl.pem").unlink(missing_ok=True)  # older servers' CRL
    states: dict[str, Connection] = {}
    ctx = dial_context(libvirt_ca, key, cert)
    tunnels = Tunnels(functools.partial(identify, store), on_change=lambda _host_id: None)
    routes = Routes(tunnels)
    ownership = owners(config, store, tunnels)
    relays, owner_links = replica_relays(config, ownership, identity_ca, tunnels)
    gateway = Gateway(config.run_dir,
                      functools.partial(dial_host, store, routes, ctx, ownership, owner_links),
                      functools.partial(gateway_reachable, states, ownership, store),
                      config.engine_group)
    changes = ChangeLog()
    feed = EngineFeed(changes, gateway.uri, states, owns=ownership.owns)
    status = HostStatus(store, config.grace, states, on_change=feed.publish, owns=ownership.owns)
    opener = LibvirtOpener(ctx, config.run_dir / "links", dial=routes.dial)
    links = LinkManager(opener, routes, store.get_host, states, on_change=status.refresh,
                        on_served=functools.partial(retire_previous_libvirt_cert, store),
                        owns=ownership.owns)
    events = HostEvents(store, links, gateway, feed, routes, ownership.tunnel_elsewhere)
    tunnels.on_change = events.tunnel_changed
    if isinstance(ownership, Leases):
        ownership.on_change = functools.partial(ownership_changed, events, status)
        ownership.on_lost = functools.partial(hosts_lost, links)
    fleet = Fleet(config, store, identity_ca, libvirt_ca, signer, status, events, states, CLIENT_DN,
                  Audit(store), tunnel_wanted=routes.via_tunnel,
                  other_replicas=ownership.other_urls)
    registry = metrics.registry_with_process()
    sessions = WebSessions(store, fleet.audit, config.web_base_url, config.web_session_idle)
    return Parts(config, store, fleet, status, links, opener, routes, gateway, changes, events,
                 registry, metrics.Instruments(registry), sessions, ownership, relays, owner_links)


def replica_relays(config: ServerConfig, ownership: SoleOwner | Leases, identity_ca: CertificateAuthority,
                   tunnels: Tunnels) -> tuple[RelayDoor | None, OwnerLinks | None]:
    """With replicas: the door other replicas' gateways come through to this one's tunnel
    hosts, and the way this one's gateway goes to theirs."""
    if not isinstance(ownership, Leases):
        return None, None
    key, cert = ensure_replica_cert(identity_ca, config.state_dir / "tls", ownership.replica_id)
    return (RelayDoor(tunnels.open_stream, ownership.owns),
            OwnerLinks(replica_context(key, cert, identity_ca.cert_pem)))


OWNERSHIP_BATCH = 100  # hosts whose ownership changed, handled between two yields


def owners(config: ServerConfig, store: Store, tunnels: Tunnels) -> SoleOwner | Leases:
    """Who owns each host's connection: this server, or the replicas' leases."""
    if not config.database:
        return SoleOwner()
    from server.store.postgres import PostgresStore

    assert isinstance(store, PostgresStore)
    leases = Leases(store, replica_id(config.state_dir), config.url,
                    tunnel_hosts=lambda: set(tunnels.links), on_change=nothing_yet,
                    on_lost=lambda _ids: None)
    store.fence = leases.fence
    return leases


def gateway_reachable(states: Mapping[str, Connection], ownership: SoleOwner | Leases,
                      store: Store, host_id: str) -> bool:
    """Whether a gateway client may go to the host now: this server's link to it is
    online, or another replica owns the host and says it is online (this one then dials
    it too, or relays through the replica its tunnel reached)."""
    link = states.get(host_id)
    if link is not None and link.state == LinkState.ONLINE:
        return True
    if ownership.owns(host_id):
        return False
    try:
        host = store.get_host(host_id)
    except StoreError:
        return False
    return host is not None and host.status == Status.ONLINE


async def ownership_changed(events: HostEvents, status: HostStatus, host_ids: list[str]) -> None:
    """Hosts taken, given back, or changed at another replica: their links, gateway
    sockets and engine records follow. In batches, the event loop serving check-ins in
    between: a replica starting with 10,000 hosts hears of them all at once."""
    for start in range(0, len(host_ids), OWNERSHIP_BATCH):
        for host_id in host_ids[start:start + OWNERSHIP_BATCH]:
            try:
                events.host_changed(host_id)
            except StoreError as exc:
                events.links.host_changed(host_id)  # a host given back is dropped all the same
                log.warning("host %s: its new owner's view is not complete: %s", host_id, exc)
            status.refresh(host_id)
        await asyncio.sleep(0)


def hosts_lost(links: LinkManager, host_ids: list[str]) -> None:
    """Hosts given up at once (the database is gone): their connections close now; the
    link manager decides by ownership alone, without reading the store."""
    for host_id in host_ids:
        links.host_changed(host_id)


async def nothing_yet(_host_ids: list[str]) -> None:
    """Until build() hands the lease loop its real callbacks."""


def metrics_state(parts: Parts, guard: ConnectionGuard) -> metrics.State:
    return metrics.State(
        hosts=parts.store, link_states=lambda: (c.state for c in parts.links.states.values()),
        link_counts=parts.links.counts, gateway_counts=parts.gateway.counts,
        watchers=lambda: parts.changes.watchers, refused_connections=lambda: dict(guard.refused),
        tunnels=lambda: (len(parts.routes.tunnels.links), parts.routes.tunnels.refused))


def metrics_url(config: ServerConfig) -> str:
    if config.metrics_listen is None:
        return "off"
    host, port = config.metrics_listen
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"


async def dial_host(store: Store, routes: Routes, ctx: ssl.SSLContext,
                    ownership: SoleOwner | Leases, owner_links: OwnerLinks | None,
                    host_id: str) -> Stream:
    """A stream to the host's libvirtd, for a gateway client: the way the link manager's
    own connection takes, checked the same way; or, when the host's tunnel reached
    another replica, relayed through that one."""
    elsewhere = ownership.tunnel_elsewhere(host_id)
    if owner_links is not None and elsewhere:
        return await owner_links.open_stream(elsewhere, host_id)
    host = store.get_host(host_id)
    if host is None or not routes.can_route(host):
        raise LookupError(f"host {host_id} has no libvirt endpoint")
    stream, _serial = await routes.dial(routes.target(host), ctx)
    return stream


class Supervisor:
    """Owns the background tasks: `failed` is set when one ends by itself."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[None]] = []
        self.failed = asyncio.Event()

    def start(self, name: str, work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        task: asyncio.Task[None] = asyncio.create_task(work(), name=name)
        task.add_done_callback(self._ended)
        self.tasks.append(task)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        log.critical("background task %s stopped: %s; exiting so the service restarts",
                     task.get_name(), repr(error) if error else "it returned",
                     exc_info=error)
        self.failed.set()

    def healthy(self) -> bool:
        return not self.failed.is_set() and all(not t.done() for t in self.tasks)

    async def stop(self) -> None:
        for task in self.tasks:
            task.remove_done_callback(self._ended)
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class Loops:
    """The server's own background work, each loop small and apart."""

    def __init__(self, parts: Parts, supervisor: Supervisor, pace: ReconnectPace) -> None:
        self.parts = parts
        self.supervisor = supervisor
        self.pace = pace
        self.swept_at = time.monotonic()

    async def sweep_forever(self) -> None:
        interval = min(1.0, self.parts.config.grace / 4)
        shown = ""
        while True:
            try:
                await self.parts.status.sweep()
                self.swept_at = time.monotonic()
                counts = self.parts.store.status_counts()
                # What the hosts would need to reconnect if this server restarted now.
                self.pace.sample()
                self.parts.fleet.reconnect_window = self.pace.window(sum(counts.values()))
                summary = status_line(self.parts.config.url, counts)
                if summary != shown:
                    notify.status(summary)
                    shown = summary
            except StoreError as exc:
                log.error("offline sweep failed: %s", exc)
            await asyncio.sleep(interval)

    async def write_checkins_forever(self) -> None:
        """Queued check-ins to disk (Store.record_checkin); a failure is logged once, not
        ten times a second, and retried."""
        failing = False
        while True:
            await asyncio.sleep(CHECKIN_FLUSH)
            try:
                self.parts.store.flush_checkins()
            except StoreError as exc:
                if not failing:
                    log.error("cannot write check-ins: %s (retrying)", exc)
                failing = True
            else:
                if failing:
                    log.info("check-ins are written again")
                failing = False

    async def prune_forever(self) -> None:
        while True:
            try:
                gone = self.parts.store.prune(time.time(), self.parts.config.audit_retention)
            except StoreError as exc:
                log.error("pruning the store failed: %s", exc)
            else:
                if gone:
                    log.info("pruned %d expired certificate, token and audit records", gone)
            await asyncio.sleep(PRUNE_EVERY)

    async def watchdog_forever(self) -> None:
        interval = notify.watchdog_interval() or 5.0
        while True:
            if self.supervisor.healthy() and time.monotonic() - self.swept_at < SWEEP_STALE:
                notify.watchdog()
            await asyncio.sleep(interval)


def status_line(url: str, counts: dict[str, int]) -> str:
    """The STATUS= line: e.g. "serving https://vdi:8443; 3 hosts: 2 online, 1 error"."""
    hosts = sum(counts.values())
    by_status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return f"serving {url}; {hosts} host{'' if hosts == 1 else 's'}" + (f": {by_status}" if hosts else "")


async def serve(config: ServerConfig) -> int:
    """Run until SIGTERM or SIGINT (0), or until a background task dies (1)."""
    limit_tls_buffers(TLS_READ_BUFFER)
    files = raise_file_limit()
    logging.getLogger("asyncio").addFilter(OncePer(10.0, "socket.accept() out of system resource"))
    parts = build(config)
    if isinstance(parts.ownership, Leases):
        parts.ownership.store.watch_changes(asyncio.get_running_loop())
    memory.tune_garbage_collector()
    key, cert = ensure_server_cert(parts.fleet.identity_ca, config.state_dir / "tls",
                                   server_names(config.url, config.listen_host))
    guard = ConnectionGuard(config.max_connections_per_address)
    agent_runner = web.AppRunner(agent_api.create_app(parts.fleet, parts.instruments),
                                 access_log=None)
    admin_runner = web.AppRunner(admin_api.create_admin_app(parts.fleet, parts.links,
                                                            parts.gateway, parts.sessions,
                                                            parts.ownership),
                                 access_log=None)
    engine_runner = web.AppRunner(engine_api.create_engine_app(parts.changes), access_log=None)
    metrics_runner = web.AppRunner(metrics.create_metrics_app(parts.registry, metrics_state(
        parts, guard)), access_log=None)
    web_door = WebDoor(config, create_web_app(parts.fleet, parts.links, parts.gateway,
                                              parts.changes, parts.sessions, parts.ownership))
    supervisor = Supervisor()
    loops = Loops(parts, supervisor, ReconnectPace(lambda: (guard.connections, guard.requests)))
    await agent_runner.setup()
    await admin_runner.setup()
    await engine_runner.setup()
    await metrics_runner.setup()
    assert agent_runner.server is not None
    guard.install(agent_runner.server)
    parts.routes.tunnels.admission = guard
    http = agent_runner.server
    listener: asyncio.Server | None = None
    try:
        parts.gateway.prepare()
        parts.links.start(())
        for host in parts.store.list_hosts():
            parts.events.host_changed(host.id, host=host)
        supervisor.start("offline-sweeper", loops.sweep_forever)
        supervisor.start("checkin-writer", loops.write_checkins_forever)
        supervisor.start("garbage-collector", memory.collect_garbage_forever)
        supervisor.start("watchdog", loops.watchdog_forever)
        supervisor.start("store-pruner", loops.prune_forever)
        if isinstance(parts.ownership, Leases):
            supervisor.start("leases", parts.ownership.run_forever)
        # Not aiohttp's TCPSite: it sets no deadline for the TLS handshake.
        listener = await asyncio.get_running_loop().create_server(
            lambda: AgentPort(http, parts.routes.tunnels, parts.relays), config.listen_host,
            config.listen_port,
            backlog=1024, ssl=server_context(key, cert, parts.fleet.identity_ca),
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT, reuse_address=True)
        await admin_api.start_socket(admin_runner, config.admin_socket)
        await engine_api.start_socket(engine_runner, config.run_dir / "engine.sock",
                                      parts.gateway.gid)
        if config.metrics_listen is not None:
            await web.TCPSite(metrics_runner, *config.metrics_listen).start()
        await web_door.start()
        log.info("virtfleet-server listening on %s:%d (join URL %s), admin socket %s, metrics %s; "
                 "up to %d open files", config.listen_host, config.listen_port, config.url,
                 config.admin_socket, metrics_url(config), files)
        notify.ready(f"serving {config.url}")
        failed = await _until_stopped(supervisor)
        log.info("shutting down")
        notify.stopping()
    finally:
        await supervisor.stop()
        if listener is not None:
            listener.close()
        parts.routes.tunnels.stop()
        if parts.owner_links is not None:
            parts.owner_links.stop()
        if parts.relays is not None:
            await parts.relays.stop()
        await parts.gateway.stop()
        await web_door.stop()
        await metrics_runner.cleanup()
        await engine_runner.cleanup()
        await admin_runner.cleanup()
        await agent_runner.cleanup()
        await parts.links.stop()
        await parts.ownership.close()
        parts.close()
        parts.gateway.remove_run_dir()  # emptied by the parts above
    return 1 if failed else 0


async def _until_stopped(supervisor: Supervisor) -> bool:
    """Wait for SIGTERM/SIGINT (False) or a dead background task (True)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(supervisor.failed.wait())]
    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    for waiter in waiters:
        waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*waiters, return_exceptions=True)
    return supervisor.failed.is_set()
