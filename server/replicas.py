"""Which replica owns each enabled host's libvirt connection.

One server owns every host (`SoleOwner`). Replicas on PostgreSQL share the hosts through
leases (`Leases`), one row per enabled host in the `leases` table:
- every RENEW_EVERY seconds each replica says it is alive (`replicas`), renews the
  leases it holds and takes or gives back hosts as `assign` shares them out (evenly; a
  host with a tunnel to the replica that holds the tunnel);
- a lease runs LEASE_TTL seconds past its last renewal, by the database's clock; another
  replica takes it only once it ran out, with the epoch one higher;
- status writes carry the writer's epoch and the database refuses a deposed owner's
  (server/store/postgres.py: fenced);
- a replica that has not renewed for LEASE_TTL - MARGIN seconds (its own clock, counted
  from before the renewal was sent) gives up every host at once, so it has closed their
  connections before any other replica can take them.

The lease calls run in a thread of their own on their own database connection: a
database that stops answering must not stop the replica from noticing it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.files import write_atomic
from common.logs import event

if TYPE_CHECKING:
    from server.store.postgres import PostgresStore

log = logging.getLogger(__name__)

RENEW_EVERY = 2.0
LEASE_TTL = 6.0
MARGIN = 1.5  # a replica gives its hosts up this long before its leases run out

NOW_SQL = "extract(epoch from clock_timestamp())"  # the database's clock: one for all replicas


@dataclass(frozen=True)
class ReplicaInfo:
    id: str
    url: str
    started_at: float
    seen_at: float
    alive: bool
    hosts: int
    me: bool = False


class SoleOwner:
    """One server: it owns every host."""

    def owns(self, host_id: str) -> bool:
        return True

    async def close(self) -> None:
        pass

    def other_urls(self) -> list[str]:
        return []

    def tunnel_elsewhere(self, host_id: str) -> str:
        return ""

    def owner_of(self, host_id: str) -> str:
        return ""

    def replicas(self) -> list[ReplicaInfo]:
        return []


def replica_id(state: Path) -> str:
    """This replica's id: kept in its state directory, so a restart is the same replica."""
    path = state / "replica-id"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        made = f"{socket.gethostname()[:40]}-{secrets.token_hex(3)}"
        write_atomic(path, made + "\n")
        return made


def assign(hosts: Iterable[str], live: list[str], pinned: dict[str, str],
           current: dict[str, str]) -> dict[str, str]:
    """Host id -> the live replica to own it, the same answer at every replica from the
    same rows. Even: each replica gets hosts // replicas, and the remainder one more
    each. A host with a tunnel goes where the tunnel is (`pinned`); a host stays with its
    `current` owner while that one is live and has room (so a replica joining takes the
    others' surplus and few hosts move); the rest go by rendezvous hashing, to the first
    replica of their own ranking (a hash of host and replica) that has room."""
    if not live:
        return {}
    ordered = sorted(hosts)
    even, extra = divmod(len(ordered), len(live))
    load = dict.fromkeys(live, 0)
    owner: dict[str, str] = {}

    def room(replica: str | None) -> bool:
        return replica in load and (load[replica] < even or (load[replica] == even and extra > 0))

    def give(host_id: str, replica: str) -> None:
        nonlocal extra
        if load[replica] >= even:
            extra -= 1  # one of the remainder's places
        owner[host_id] = replica
        load[replica] += 1

    for host_id in ordered:
        if pinned.get(host_id) in load:
            give(host_id, pinned[host_id])
    for host_id in ordered:  # first each current owner's even part, then the remainder
        if host_id not in owner and load.get(current.get(host_id, ""), even) < even:
            give(host_id, current[host_id])
    for host_id in ordered:
        if host_id not in owner and room(current.get(host_id)):
            give(host_id, current[host_id])
    for host_id in ordered:
        if host_id not in owner:
            ranked = sorted(live, key=lambda r: _rank(host_id, r), reverse=True)
            give(host_id, next((r for r in ranked if room(r)), min(live, key=load.__getitem__)))
    return owner


def _rank(host_id: str, replica: str) -> bytes:
    return hashlib.blake2b(f"{host_id}/{replica}".encode(), digest_size=8).digest()


@dataclass
class Tick:
    """One round's outcome, from the database."""

    owned: dict[str, int]  # host id -> epoch
    changed: list[str]  # hosts whose row changed (or that are new to this replica, or gone)
    at: float  # this replica's monotonic clock when the round was sent
    others: list[str]  # the other live replicas' URLs
    tunnels_elsewhere: dict[str, str]  # host id -> URL of the other replica its tunnel reached


class Leases:
    """The lease loop of one replica (see the module's words). `on_change(host_ids)`
    (awaited): after hosts were taken, given back or changed elsewhere; `on_lost(host_ids)`:
    hosts given up at once, whose connections must close now without the store."""

    def __init__(self, store: PostgresStore, me: str, advertise_url: str,
                 tunnel_hosts: Callable[[], set[str]],
                 on_change: Callable[[list[str]], Awaitable[object]],
                 on_lost: Callable[[list[str]], object]) -> None:
        """`store`: the replica's store, for reads on the event loop; the lease rounds
        have a connection of their own to the same database."""
        from server.store.postgres import PgConnection

        self.store = store
        self.db = PgConnection(store.db.url)
        self.replica_id, self.url = me, advertise_url
        self.tunnel_hosts, self.on_change, self.on_lost = tunnel_hosts, on_change, on_lost
        self.owned: dict[str, int] = {}
        self.renewed_at = 0.0  # monotonic, when the last round that worked was sent
        self.started_at = time.time()
        self.problem = ""  # why the last round failed
        self.others: list[str] = []  # the other live replicas' URLs, as the last round saw
        self.tunnels_elsewhere: dict[str, str] = {}  # as the last round saw
        self._seen: dict[str, tuple[Any, ...]] = {}  # enabled hosts' rows at the last round
        self._round_task: asyncio.Future[Tick] | None = None  # its thread runs on if cancelled
        self._handing_over: set[str] = set()  # closed here last round; their leases go next

    # -- what the rest of the server reads ------------------------------------------

    def owns(self, host_id: str) -> bool:
        return host_id in self.owned

    def fence(self, host_id: str) -> tuple[str, int]:
        """(this replica, its epoch) for a status write: the store refuses it unless the
        lease is still this replica's with that epoch. -1: not ours at all."""
        return self.replica_id, self.owned.get(host_id, -1)

    def other_urls(self) -> list[str]:
        return self.others

    def tunnel_elsewhere(self, host_id: str) -> str:
        """The URL of the other replica the host's tunnel reached, or ""."""
        return self.tunnels_elsewhere.get(host_id, "")

    def owner_of(self, host_id: str) -> str:
        return self.store.lease_owner(host_id)

    def replicas(self) -> list[ReplicaInfo]:
        return [ReplicaInfo(*row, me=row[0] == self.replica_id)
                for row in self.store.replica_rows(LEASE_TTL)]

    # -- the loop --------------------------------------------------------------------

    async def run_forever(self) -> None:
        while True:
            await self._round()
            await asyncio.sleep(self._next_round_in())

    def _deadline(self) -> float:
        """When this replica must have given its hosts up, unless a round works first."""
        return self.renewed_at + LEASE_TTL - MARGIN

    def _next_round_in(self) -> float:
        """RENEW_EVERY; but while rounds fail and hosts are held, not past the deadline
        (the round then gives them up)."""
        if self.problem and self.owned:
            return min(RENEW_EVERY, max(0.0, self._deadline() - time.monotonic()))
        return RENEW_EVERY

    async def close(self) -> None:
        """At a clean stop, once this replica's connections are closed: its leases given
        back, so the others take its hosts at their next round, not a TTL later."""
        if self._round_task is not None:
            await asyncio.wait([self._round_task], timeout=LEASE_TTL)
        await asyncio.to_thread(self._give_all_back)

    async def _round(self) -> None:
        sent = time.monotonic()
        task = asyncio.ensure_future(asyncio.to_thread(self._tick, sent, self.tunnel_hosts()))
        self._round_task = task
        deadline = self._deadline() if self.owned else None
        try:
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            tick = await asyncio.wait_for(asyncio.shield(task), timeout)
        except TimeoutError:
            self._give_up("no lease renewal reached the database in time")
            await asyncio.gather(task, return_exceptions=True)
            return
        except Exception as exc:  # noqa: BLE001 - a StoreError, or the database's own
            self.problem = str(exc)
            if self.owned and time.monotonic() >= self._deadline() - 0.05:  # (sleeps wake early)
                self._give_up(self.problem)
            return
        if self.problem:
            log.info("replica %s: the database answers again", self.replica_id)
        self.problem = ""
        self.renewed_at, self.others = tick.at, tick.others
        self.tunnels_elsewhere = tick.tunnels_elsewhere
        moved = [h for h in self.owned.keys() ^ tick.owned.keys()]  # taken or given back
        self.owned = tick.owned
        if moved or tick.changed:
            await self.on_change(sorted(set(moved + tick.changed)))

    def _give_up(self, why: str) -> None:
        """Every host given up here, before its lease can run out elsewhere."""
        self.problem = why
        gone, self.owned = list(self.owned), {}
        event(log, "leases_dropped", "replica %s gives up its %d hosts: %s", self.replica_id,
              len(gone), why, level=logging.ERROR, replica=self.replica_id)
        self.on_lost(gone)

    # -- in the lease thread ---------------------------------------------------------

    def _tick(self, sent: float, tunnels: set[str]) -> Tick:
        with self.db.transaction() as db:
            db.execute(f"INSERT INTO replicas (id, url, started_at, seen_at) VALUES (?, ?, ?, {NOW_SQL}) "
                       f"ON CONFLICT (id) DO UPDATE SET url=excluded.url, seen_at={NOW_SQL}",
                       (self.replica_id, self.url, self.started_at))
            replicas = db.execute(f"SELECT id, url FROM replicas WHERE seen_at > {NOW_SQL} - ? "
                                  "ORDER BY id", (LEASE_TTL,)).fetchall()
            live = [r[0] for r in replicas]
            held = {r[0]: r[1] for r in db.execute(
                f"UPDATE leases SET expires_at = {NOW_SQL} + ? WHERE owner=? RETURNING host_id, epoch",
                (LEASE_TTL, self.replica_id)).fetchall()}
            tunnel_at = {r[0]: r[1] for r in db.execute(
                "SELECT host_id, replica FROM replica_tunnels").fetchall()}
            self._publish_tunnels(db, tunnels, tunnel_at)
            hosts = db.execute("SELECT id, transport, role_override, report_digest, "
                               "libvirt_cert_serial, status, detail FROM hosts "
                               "WHERE admin_state='enabled'").fetchall()
            current = {r[0]: r[1] for r in db.execute(
                f"SELECT host_id, owner FROM leases WHERE expires_at > {NOW_SQL}").fetchall()}
            pinned = tunnel_at | dict.fromkeys(tunnels, self.replica_id)
            shares = assign((row[0] for row in hosts), live, pinned, current)
            self._give_back(db, held, shares)
            self._take(db, held, {h for h, r in shares.items() if r == self.replica_id})
        # Every enabled host whose row changed, or that is no longer enabled: whichever
        # replica changed it, this one's gateway socket and engine feed follow.
        rows = {row[0]: tuple(row) for row in hosts}
        changed = [h for h, row in rows.items() if self._seen.get(h) != row]
        changed += [h for h in self._seen if h not in rows]
        self._seen = rows
        urls = {r[0]: r[1] for r in replicas if r[0] != self.replica_id}
        others = [url for url in urls.values() if url != self.url]
        elsewhere = {h: urls[r] for h, r in tunnel_at.items() if r in urls}
        return Tick(held, changed, sent, others, elsewhere)

    def _give_back(self, db: Any, held: dict[str, int], shares: dict[str, str]) -> None:
        """The hosts held here that `shares` gives to others, in two rounds: first the
        connection is closed here (the host leaves `held`, so `owned`) while the lease
        still keeps the others off, then the lease goes. Never two replicas connected to
        one host."""
        give_back = [h for h in held if shares.get(h) != self.replica_id]
        closed = [h for h in give_back if h in self._handing_over]
        if closed:
            db.executemany("DELETE FROM leases WHERE host_id=? AND owner=?",
                           [(h, self.replica_id) for h in closed])
        closing = [h for h in give_back if h not in self._handing_over]
        if closing:
            db.executemany(
                "UPDATE hosts SET status='connecting', detail=? WHERE id=? AND admin_state='enabled'",
                [(f"moving to replica {shares[h]}", h) for h in closing if h in shares])
        self._handing_over = set(closing)
        for host_id in give_back:
            del held[host_id]

    def _take(self, db: Any, held: dict[str, int], wanted: set[str]) -> None:
        """Leases on the `wanted` hosts not held yet, where they ran out (epoch + 1)."""
        for host_id in wanted - held.keys():
            row = db.execute(
                "INSERT INTO leases (host_id, owner, epoch, expires_at) "
                f"VALUES (?, ?, 1, {NOW_SQL} + ?) ON CONFLICT (host_id) DO UPDATE "
                "SET owner=excluded.owner, epoch=leases.epoch + 1, expires_at=excluded.expires_at "
                f"WHERE leases.expires_at <= {NOW_SQL} RETURNING epoch",
                (host_id, self.replica_id, LEASE_TTL)).fetchone()
            if row is not None:
                held[host_id] = row[0]

    def _publish_tunnels(self, db: Any, tunnels: set[str], tunnel_at: dict[str, str]) -> None:
        """Where each tunnel is: the host's lease follows it."""
        mine = {h for h, r in tunnel_at.items() if r == self.replica_id}
        gone = mine - tunnels
        if gone:
            db.executemany("DELETE FROM replica_tunnels WHERE host_id=? AND replica=?",
                           [(h, self.replica_id) for h in gone])
            for host_id in gone:
                del tunnel_at[host_id]
        new = tunnels - mine
        if new:
            db.executemany("INSERT INTO replica_tunnels (host_id, replica) VALUES (?, ?) "
                           "ON CONFLICT (host_id) DO UPDATE SET replica=excluded.replica",
                           [(h, self.replica_id) for h in new])
            tunnel_at.update((h, self.replica_id) for h in new)

    def _give_all_back(self) -> None:
        try:
            with self.db.transaction() as db:
                db.execute("DELETE FROM leases WHERE owner=?", (self.replica_id,))
                db.execute("DELETE FROM replica_tunnels WHERE replica=?", (self.replica_id,))
                db.execute("UPDATE replicas SET seen_at=0 WHERE id=?", (self.replica_id,))
        except Exception as exc:  # noqa: BLE001 - stopping anyway: the leases run out
            log.warning("replica %s: its leases could not be given back (%s); they run out "
                        "in %g s", self.replica_id, exc, LEASE_TTL)
        finally:
            self.db.close()
