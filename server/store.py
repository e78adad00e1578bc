"""SQLite store: tokens, hosts, and each host's status history.

WAL mode, a schema version in `PRAGMA user_version` with forward-only migrations, and
every multi-row change in one transaction, so a crash leaves the old state or the new
one. The server is the only writer; admin commands go through its socket.
"""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MIGRATIONS = [
    # 1: tokens, hosts, history
    """
    CREATE TABLE tokens (
        jti TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        auto_enable INTEGER NOT NULL,
        max_uses INTEGER NOT NULL,
        uses INTEGER NOT NULL DEFAULT 0,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        revoked_at REAL,
        description TEXT NOT NULL DEFAULT ''
    );
    CREATE TABLE hosts (
        id TEXT PRIMARY KEY,
        hostname TEXT NOT NULL,
        admin_state TEXT NOT NULL,          -- pending | enabled | disabled
        configured_role TEXT NOT NULL,      -- what the agent reports
        role_override TEXT,                 -- set by an admin, wins when present
        role_limit TEXT NOT NULL,           -- the widest role its join token allowed
        status TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT '',
        status_since REAL NOT NULL,
        enrolled_at REAL NOT NULL,
        last_checkin REAL,
        address TEXT NOT NULL DEFAULT '',
        agent_version TEXT NOT NULL DEFAULT '',
        report TEXT NOT NULL DEFAULT '{}',
        token_jti TEXT NOT NULL,
        cert_serial TEXT NOT NULL,
        cert_not_after REAL NOT NULL,
        prev_cert_serial TEXT,              -- accepted until the renewed one is first used
        libvirt_cert_serial TEXT,
        libvirt_cert_not_after REAL,
        libvirt_cert_address TEXT          -- the address its libvirtd certificate names
    );
    CREATE UNIQUE INDEX hosts_cert_serial ON hosts(cert_serial);
    CREATE TABLE host_events (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        host_id TEXT NOT NULL REFERENCES hosts(id) ON DELETE CASCADE,
        at REAL NOT NULL,
        status TEXT NOT NULL,
        detail TEXT NOT NULL
    );
    CREATE INDEX host_events_host ON host_events(host_id, seq);
    """,
    # 2: every libvirtd certificate issued, so that forgetting a host can revoke all of
    # them (a renewed host still holds its older, unexpired ones).
    """
    CREATE TABLE libvirt_certs (
        serial TEXT PRIMARY KEY,
        host_id TEXT NOT NULL,
        not_after REAL NOT NULL,
        revoked_at REAL
    );
    INSERT INTO libvirt_certs(serial, host_id, not_after)
        SELECT libvirt_cert_serial, id, libvirt_cert_not_after FROM hosts
        WHERE libvirt_cert_serial IS NOT NULL;
    """,
    # 3: every check-in looks its host up by certificate serial, the current or the
    # previous one: without this index that was a scan of all hosts (profiled: 40 % of
    # the server's time with 3,000 hosts).
    """
    CREATE INDEX hosts_prev_cert_serial ON hosts(prev_cert_serial);
    """,
    # 4: the offline sweep and the status counts, every second, read only this covering
    # index instead of every host's row with its report (22 ms -> 6 ms at 10,000 hosts).
    """
    CREATE INDEX hosts_liveness ON hosts(admin_state, status, last_checkin, enrolled_at, id);
    """,
]


# What the offline sweep reads every second (from the hosts_liveness index alone).
SWEEP_SQL = ("SELECT id FROM hosts WHERE admin_state='enabled' AND CASE WHEN status='offline' "
             "THEN COALESCE(last_checkin, enrolled_at) >= ? "
             "ELSE MAX(COALESCE(last_checkin, enrolled_at), ?) < ? END")
COUNTS_SQL = "SELECT status, COUNT(*) FROM hosts GROUP BY status"

CHECKIN_FLUSH = 0.1  # seconds between writes of queued check-ins (the server's loop)
CHECKIN_BATCH = 2000  # queued check-ins that are written at once, whatever the time


class StoreError(Exception):
    """The store cannot do what was asked; the message says why in operator terms."""


@dataclass
class Token:
    jti: str
    role: str
    auto_enable: bool
    max_uses: int
    uses: int
    created_at: float
    expires_at: float
    revoked_at: float | None
    description: str

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at <= now:
            return "expired"
        if self.uses >= self.max_uses:
            return "used"
        return "valid"


@dataclass
class Host:
    id: str
    hostname: str
    admin_state: str
    configured_role: str
    role_override: str | None
    role_limit: str
    status: str
    detail: str
    status_since: float
    enrolled_at: float
    last_checkin: float | None
    address: str
    agent_version: str
    report: dict[str, Any] = field(default_factory=dict)
    token_jti: str = ""
    cert_serial: str = ""
    cert_not_after: float = 0.0
    prev_cert_serial: str | None = None
    libvirt_cert_serial: str | None = None
    libvirt_cert_not_after: float | None = None
    libvirt_cert_address: str | None = None

    @property
    def role(self) -> str:
        return self.role_override or self.configured_role

    @property
    def role_source(self) -> str:
        return "admin override" if self.role_override else "host configuration"


@dataclass
class Event:
    at: float
    status: str
    detail: str


class Store:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the caller hears "done" (a token, an enrollment,
        # an admin change must survive a crash or a disk turning read-only). Check-ins opt
        # out (record_checkin).
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=5000")
        self._migrate()
        # Check-ins written behind (record_checkin): host id -> its UPDATE's values.
        self._checkins: dict[str, tuple[float, str, str, str, str, str]] = {}
        self._write_error: sqlite3.Error | None = None

    def close(self) -> None:
        try:
            self.flush_checkins()
        except sqlite3.Error as exc:
            log.error("the last check-ins could not be written: %s", exc)
        self.db.close()

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this server "
                f"knows ({len(MIGRATIONS)}): upgrade virtfleet-server"
            )
        for number, script in enumerate(MIGRATIONS[version:], start=version + 1):
            with self.transaction():
                for statement in script.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version={number}")
            log.info("store %s migrated to schema version %d", self.path, number)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException:
            if self.db.in_transaction:  # a COMMIT refused by a full disk leaves it open
                self.db.execute("ROLLBACK")
            raise

    # -- tokens ------------------------------------------------------------

    def add_token(self, token: Token) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO tokens VALUES (?,?,?,?,?,?,?,?,?)",
                (token.jti, token.role, token.auto_enable, token.max_uses, token.uses,
                 token.created_at, token.expires_at, token.revoked_at, token.description),
            )

    def get_token(self, jti: str) -> Token | None:
        row = self.db.execute("SELECT * FROM tokens WHERE jti=?", (jti,)).fetchone()
        return _token(row) if row else None

    def list_tokens(self) -> list[Token]:
        rows = self.db.execute("SELECT * FROM tokens ORDER BY created_at").fetchall()
        return [_token(r) for r in rows]

    def revoke_token(self, jti: str, now: float) -> Token | None:
        with self.transaction() as db:
            db.execute("UPDATE tokens SET revoked_at=? WHERE jti=? AND revoked_at IS NULL",
                       (now, jti))
        return self.get_token(jti)

    # -- hosts -------------------------------------------------------------

    def enroll(self, host: Host, now: float) -> None:
        """Use the host's token once and add the host, in one transaction.

        The conditional UPDATE is what makes a single-use token single-use: of two
        concurrent enrollments only one finds `uses < max_uses` still true.
        """
        with self.transaction() as db:
            used = db.execute(
                "UPDATE tokens SET uses = uses + 1 WHERE jti=? AND revoked_at IS NULL "
                "AND uses < max_uses AND expires_at > ?",
                (host.token_jti, now),
            ).rowcount
            if not used:
                raise StoreError(self._token_refusal(host.token_jti, now))
            db.execute(
                "INSERT INTO hosts VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (host.id, host.hostname, host.admin_state, host.configured_role,
                 host.role_override, host.role_limit, host.status, host.detail,
                 host.status_since, host.enrolled_at, host.last_checkin, host.address,
                 host.agent_version, json.dumps(host.report), host.token_jti,
                 host.cert_serial, host.cert_not_after, host.prev_cert_serial,
                 host.libvirt_cert_serial, host.libvirt_cert_not_after,
                 host.libvirt_cert_address),
            )
            db.execute("INSERT INTO host_events(host_id, at, status, detail) VALUES (?,?,?,?)",
                       (host.id, now, host.status, host.detail))
            if host.libvirt_cert_serial:
                self._record_libvirt_cert(host.id, host.libvirt_cert_serial,
                                          host.libvirt_cert_not_after or now)

    def _record_libvirt_cert(self, host_id: str, serial: str, not_after: float) -> None:
        self.db.execute("INSERT INTO libvirt_certs(serial, host_id, not_after) VALUES (?,?,?)",
                        (serial, host_id, not_after))

    def _token_refusal(self, jti: str, now: float) -> str:
        token = self.get_token(jti)
        if token is None:
            return "join token is unknown to this server (was its state reset?)"
        return {
            "revoked": "join token was revoked",
            "expired": "join token has expired",
            "used": f"join token was already used ({token.uses} of {token.max_uses} uses)",
        }.get(token.state(now), "join token cannot be used")

    def get_host(self, host_id: str) -> Host | None:
        self._flush_for_read()
        row = self.db.execute("SELECT * FROM hosts WHERE id=?", (host_id,)).fetchone()
        return _host(row) if row else None

    def host_by_serial(self, serial: str) -> Host | None:
        # Two indexed lookups: SQLite would scan the table for the OR of both columns.
        row = (self.db.execute("SELECT * FROM hosts WHERE cert_serial=?", (serial,)).fetchone()
               or self.db.execute("SELECT * FROM hosts WHERE prev_cert_serial=?",
                                  (serial,)).fetchone())
        if row is None:
            return None
        host = _host(row)
        queued = self._checkins.get(host.id)
        if queued is not None:  # the hot path: no flush, the queued check-in laid over
            _apply_checkin(host, queued[0], json.loads(queued[1]), queued[5])
        return host

    def list_hosts(self) -> list[Host]:
        self._flush_for_read()
        rows = self.db.execute("SELECT * FROM hosts ORDER BY hostname, id").fetchall()
        return [_host(r) for r in rows]

    def hosts_to_sweep(self, cutoff: float, started_at: float) -> list[str]:
        """Enabled hosts whose status disagrees with their freshness: not offline but no
        check-in since `cutoff` (a server start counts as one), or offline but checked in
        since. The scan runs in SQLite: no row of the others reaches Python."""
        self._flush_for_read()
        rows = self.db.execute(SWEEP_SQL, (cutoff, started_at, cutoff)).fetchall()
        return [r[0] for r in rows]

    def status_counts(self) -> dict[str, int]:
        self._flush_for_read()
        rows = self.db.execute(COUNTS_SQL).fetchall()
        return {r[0]: r[1] for r in rows}

    def record_checkin(self, host: Host, report: dict[str, Any], address: str,
                       now: float) -> None:
        """Carry a check-in into `host` (the caller's row stays current) and queue its write.

        Check-ins are written behind, many to a transaction (`flush_checkins`, which the
        server runs every CHECKIN_FLUSH seconds): a transaction each was a third of a
        check-in's cost. They skip the fsync too. A crash loses the last fraction of a
        second of them, which the next check-ins rewrite. Reads see them all: every read
        flushes first, and the check-in's own lookup (`host_by_serial`) lays the queued
        one over the row. While writes fail, a check-in fails too, so agents are told."""
        _apply_checkin(host, now, report, address)
        # Kept as JSON text: queued dicts would be what the garbage collector walks.
        self._checkins[host.id] = (now, json.dumps(report), report["hostname"], report["role"],
                                   report["agent_version"], address)
        if self._write_error is not None or len(self._checkins) >= CHECKIN_BATCH:
            self.flush_checkins()

    def flush_checkins(self) -> None:
        """Write the queued check-ins in one transaction; raises (and keeps them) if the
        store cannot write."""
        if not self._checkins:
            return
        rows = [(*queued, host_id) for host_id, queued in self._checkins.items()]
        self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            with self.transaction() as db:
                db.executemany(
                    "UPDATE hosts SET last_checkin=?, report=?, hostname=?, configured_role=?, "
                    "agent_version=?, address=? WHERE id=?", rows)
        except sqlite3.Error as exc:
            self._write_error = exc
            raise
        finally:
            self.db.execute("PRAGMA synchronous=FULL")
        self._write_error = None
        self._checkins.clear()

    def _flush_for_read(self) -> None:
        """Before a read: queued check-ins in. A store that cannot write still reads."""
        try:
            self.flush_checkins()
        except sqlite3.Error as exc:
            log.debug("reading without the queued check-ins: %s", exc)

    def set_status(self, host_id: str, status: str, detail: str, since: float,
                   record: bool = True) -> None:
        """Set the current status; with `record`, also append it to the history."""
        self.set_statuses([(host_id, status, detail, since, record)])

    def set_statuses(self, changes: list[tuple[str, str, str, float, bool]]) -> None:
        """Several hosts' (id, status, detail, since, record) in one transaction."""
        if not changes:
            return
        with self.transaction() as db:
            db.executemany("UPDATE hosts SET status=?, detail=?, status_since=? WHERE id=?",
                           [(status, detail, since, host_id)
                            for host_id, status, detail, since, _ in changes])
            db.executemany("INSERT INTO host_events(host_id, at, status, detail) VALUES (?,?,?,?)",
                           [(host_id, since, status, detail)
                            for host_id, status, detail, since, record in changes if record])

    def update_host(self, host_id: str, **columns: Any) -> None:
        """Set admin-owned columns (admin_state, role_override, certificate fields)."""
        allowed = {"admin_state", "role_override", "cert_serial", "cert_not_after",
                   "prev_cert_serial", "libvirt_cert_serial", "libvirt_cert_not_after",
                   "libvirt_cert_address"}
        if not columns or set(columns) - allowed:
            raise ValueError(f"update_host: bad columns {sorted(columns)}")
        assignments = ", ".join(f"{c}=?" for c in columns)
        with self.transaction() as db:
            db.execute(f"UPDATE hosts SET {assignments} WHERE id=?", (*columns.values(), host_id))
            if columns.get("libvirt_cert_serial"):
                self._record_libvirt_cert(host_id, columns["libvirt_cert_serial"],
                                          columns["libvirt_cert_not_after"])

    def forget_host(self, host_id: str, now: float) -> None:
        """Delete the host and revoke every libvirtd certificate it was given."""
        with self.transaction() as db:
            db.execute("DELETE FROM hosts WHERE id=?", (host_id,))
            db.execute("UPDATE libvirt_certs SET revoked_at=? WHERE host_id=? AND revoked_at IS NULL",
                       (now, host_id))

    def revoked_libvirt_certs(self, now: float) -> list[tuple[str, float]]:
        """(serial, revoked_at) of revoked libvirtd certificates not yet expired."""
        rows = self.db.execute("SELECT serial, revoked_at FROM libvirt_certs "
                               "WHERE revoked_at IS NOT NULL AND not_after > ? ORDER BY serial",
                               (now,)).fetchall()
        return [(r["serial"], r["revoked_at"]) for r in rows]

    def history(self, host_id: str, limit: int = 50) -> list[Event]:
        self._flush_for_read()
        rows = self.db.execute(
            "SELECT at, status, detail FROM host_events WHERE host_id=? "
            "ORDER BY seq DESC LIMIT ?",
            (host_id, limit),
        ).fetchall()
        return [Event(r["at"], r["status"], r["detail"]) for r in reversed(rows)]


def _apply_checkin(host: Host, now: float, report: dict[str, Any], address: str) -> None:
    host.last_checkin, host.report, host.address = now, report, address
    host.hostname, host.configured_role = report["hostname"], report["role"]
    host.agent_version = report["agent_version"]


def _token(row: sqlite3.Row) -> Token:
    return Token(**{k: row[k] for k in row.keys()} | {"auto_enable": bool(row["auto_enable"])})


def _host(row: sqlite3.Row) -> Host:
    values = {k: row[k] for k in row.keys()}
    values["report"] = json.loads(values["report"])
    return Host(**values)

