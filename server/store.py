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
]


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

    def close(self) -> None:
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
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

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
        row = self.db.execute("SELECT * FROM hosts WHERE id=?", (host_id,)).fetchone()
        return _host(row) if row else None

    def host_by_serial(self, serial: str) -> Host | None:
        # Two indexed lookups: SQLite would scan the table for the OR of both columns.
        row = (self.db.execute("SELECT * FROM hosts WHERE cert_serial=?", (serial,)).fetchone()
               or self.db.execute("SELECT * FROM hosts WHERE prev_cert_serial=?",
                                  (serial,)).fetchone())
        return _host(row) if row else None

    def list_hosts(self) -> list[Host]:
        rows = self.db.execute("SELECT * FROM hosts ORDER BY hostname, id").fetchall()
        return [_host(r) for r in rows]

    def liveness(self) -> list[tuple[str, str, str, float]]:
        """(id, admin_state, status, last check-in or enrollment) of every host: what the
        offline sweeper needs, without loading reports."""
        rows = self.db.execute(
            "SELECT id, admin_state, status, COALESCE(last_checkin, enrolled_at) FROM hosts"
        ).fetchall()
        return [tuple(r) for r in rows]  # type: ignore[misc]

    def record_checkin(self, host_id: str, report: dict[str, Any], address: str,
                       now: float) -> None:
        # The next check-in rewrites all of this, so losing the last one in a crash costs
        # nothing, while an fsync per check-in would cap the server's rate: no fsync here.
        self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            self.db.execute(
                "UPDATE hosts SET last_checkin=?, report=?, hostname=?, configured_role=?, "
                "agent_version=?, address=? WHERE id=?",
                (now, json.dumps(report), report["hostname"], report["role"],
                 report["agent_version"], address, host_id),
            )
        finally:
            self.db.execute("PRAGMA synchronous=FULL")

    def set_status(self, host_id: str, status: str, detail: str, since: float,
                   record: bool = True) -> None:
        """Set the current status; with `record`, also append it to the history."""
        with self.transaction() as db:
            db.execute("UPDATE hosts SET status=?, detail=?, status_since=? WHERE id=?",
                       (status, detail, since, host_id))
            if record:
                db.execute("INSERT INTO host_events(host_id, at, status, detail) VALUES (?,?,?,?)",
                           (host_id, since, status, detail))

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
        rows = self.db.execute(
            "SELECT at, status, detail FROM host_events WHERE host_id=? "
            "ORDER BY seq DESC LIMIT ?",
            (host_id, limit),
        ).fetchall()
        return [Event(r["at"], r["status"], r["detail"]) for r in reversed(rows)]


def _token(row: sqlite3.Row) -> Token:
    return Token(**{k: row[k] for k in row.keys()} | {"auto_enable": bool(row["auto_enable"])})


def _host(row: sqlite3.Row) -> Host:
    values = {k: row[k] for k in row.keys()}
    values["report"] = json.loads(values["report"])
    return Host(**values)

