"""The SQL both stores share (sqlite.py, postgres.py): each supplies its connection,
its transactions and the few statements its dialect spells differently.

Statements use `?` placeholders (sqlite3's; the PostgreSQL connection translates them).
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import astuple, fields
from typing import Any, ClassVar, Protocol

from server.model import (
    AuditEntry,
    HistoryEntry,
    Host,
    HostSummary,
    Status,
    Token,
    WebLogin,
    WebSession,
)
from server.store import DEFAULT_AUDIT_RETENTION, StatusChange, StoreError

log = logging.getLogger(__name__)

COUNTS_SQL = "SELECT status, COUNT(*) FROM hosts GROUP BY status"
SUMMARY_SQL = ("SELECT id, hostname, status, COALESCE(role_override, configured_role), last_checkin, "
               "admin_state, detail FROM hosts ORDER BY hostname, id")

_AUDIT_COLUMNS = ", ".join(f.name for f in fields(AuditEntry))
_LOGIN_COLUMNS = ", ".join(f.name for f in fields(WebLogin))
_SESSION_COLUMNS = ", ".join(f.name for f in fields(WebSession))
WEB_KEEP = 30 * 86400.0  # sessions (and login URLs) are listed this long after they start
CHECKIN_BATCH = 2000  # queued check-ins that are written at once, whatever the time
HISTORY_KEEP = 200  # rows kept per host: the oldest go first
# A host whose status keeps changing (a flood of new error texts) gets at most
# HISTORY_BURST new rows per HISTORY_WINDOW seconds; past that, a change to the same
# status updates the last row (its reason, one more try) instead of adding one.
HISTORY_BURST, HISTORY_WINDOW = 6, 60.0

# Host fields and the columns that store them.
_HOST_COLUMNS = {f.name: ("report" if f.name == "report_text" else f.name)
                 for f in fields(Host) if not f.name.startswith("_")}
_UPDATABLE = {"admin_state", "role_override", "cert_serial", "cert_not_after",
              "prev_cert_serial", "libvirt_cert_serial", "libvirt_cert_not_after",
              "libvirt_cert_address", "prev_libvirt_cert_serial", "transport"}


class Row(Protocol):
    """A result row by column name or index (sqlite3.Row, postgres.Row)."""

    def __getitem__(self, key: int | str) -> Any: ...
    def keys(self) -> list[str]: ...


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    def execute(self, sql: str, args: Any = ..., /) -> Any: ...
    def executemany(self, sql: str, args: Any, /) -> Any: ...


class SqlStore(abc.ABC):
    """Everything `Store` owes, in SQL. Subclasses set `db` and `where` before calling
    `__init__`, and give `transaction()` and `checkin_transaction()` (a transaction whose
    commit need not reach the disk before it returns)."""

    # What the offline sweep reads every second (one index alone, in SQLite).
    SWEEP_SQL: ClassVar[str]
    # Deletes a host's (?) history rows past the newest ? ones.
    TRIM_HISTORY_SQL: ClassVar[str]
    db: Connection
    where: str  # the store in an operator's words: its file, or the database (no password)

    def __init__(self, rows: RowCache) -> None:
        # Check-ins written behind (record_checkin, record_report): host id -> its
        # UPDATE's values.
        self._liveness: dict[str, tuple[Any, ...]] = {}
        self._reports: dict[str, tuple[Any, ...]] = {}
        self._rows = rows
        self._write_error: StoreError | None = None

    @abc.abstractmethod
    def transaction(self) -> AbstractContextManager[Connection]:
        """Statements in one transaction; a database that cannot take them raises
        StoreUnavailable."""

    @abc.abstractmethod
    def checkin_transaction(self) -> AbstractContextManager[Connection]:
        """A transaction for queued check-ins: its commit need not be on disk when it
        returns (a crash loses a fraction of a second of them, which the next rewrite)."""

    @abc.abstractmethod
    def _close_connection(self) -> None: ...

    def close(self) -> None:
        try:
            self.flush_checkins()
        except StoreError as exc:
            log.error("the last check-ins could not be written: %s", exc)
        self._close_connection()

    # -- tokens ------------------------------------------------------------

    def add_token(self, token: Token) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO tokens VALUES (?,?,?,?,?,?,?,?,?,?)",
                       (token.jti, token.role, token.auto_enable, token.max_uses, token.uses,
                        token.created_at, token.expires_at, token.revoked_at, token.description,
                        token.transport))

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

    def token_hosts(self) -> dict[str, list[str]]:
        """Token id -> ids of the hosts (still known) that joined with it."""
        out: dict[str, list[str]] = {}
        for row in self.db.execute("SELECT token_jti, id FROM hosts ORDER BY enrolled_at"):
            out.setdefault(row[0], []).append(row[1])
        return out

    # -- hosts -------------------------------------------------------------

    def enroll(self, host: Host, now: float) -> None:
        """Use the host's token once and add the host, in one transaction. A host that
        exists already (joined again) is updated in place: its history stays.

        The conditional UPDATE is what makes a single-use token single-use: of two
        concurrent enrollments only one finds `uses < max_uses` still true."""
        columns = ", ".join(_HOST_COLUMNS.values())
        marks = ", ".join("?" * len(_HOST_COLUMNS))
        updates = ", ".join(f"{c}=excluded.{c}" for c in _HOST_COLUMNS.values() if c != "id")
        with self.transaction() as db:
            used = db.execute(
                "UPDATE tokens SET uses = uses + 1 WHERE jti=? AND revoked_at IS NULL "
                "AND uses < max_uses AND expires_at > ?", (host.token_jti, now)).rowcount
            if not used:
                raise StoreError(self._token_refusal(host.token_jti, now))
            self._liveness.pop(host.id, None)  # a queued check-in of the old identity
            self._reports.pop(host.id, None)
            self._rows.drop(host.id)
            db.execute(f"INSERT INTO hosts ({columns}) VALUES ({marks}) "
                       f"ON CONFLICT(id) DO UPDATE SET {updates}",
                       [getattr(host, name) for name in _HOST_COLUMNS])
            self._add_history(host.id, now, host.status, host.detail)
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
        cached = self._rows.by_id(host_id)
        if cached is not None:
            return cached
        row = self.db.execute("SELECT * FROM hosts WHERE id=?", (host_id,)).fetchone()
        return self._cache(_host(row)) if row else None

    def host_by_serial(self, serial: str) -> Host | None:
        """The hot path (every check-in): from the row cache, else two indexed lookups
        (SQLite would scan the table for the OR of both columns)."""
        cached = self._rows.by_serial(serial)
        if cached is not None:
            return cached
        row = (self.db.execute("SELECT * FROM hosts WHERE cert_serial=?", (serial,)).fetchone()
               or self.db.execute("SELECT * FROM hosts WHERE prev_cert_serial=?",
                                  (serial,)).fetchone())
        return self._cache(_host(row)) if row else None

    def _cache(self, host: Host) -> Host:
        return self._rows.keep(self._lay_queued_over(host), self._stored_report)

    def _stored_report(self, host_id: str) -> str | None:
        """A cached row's report text, when something reads it: the queued one, else the
        database's."""
        queued = self._reports.get(host_id)
        if queued is not None:
            return str(queued[0])
        row = self.db.execute("SELECT report FROM hosts WHERE id=?", (host_id,)).fetchone()
        return None if row is None else str(row[0])

    def list_hosts(self) -> list[Host]:
        self._flush_for_read()
        rows = self.db.execute("SELECT * FROM hosts ORDER BY hostname, id").fetchall()
        return [_host(r) for r in rows]

    def hosts_to_sweep(self, cutoff: float, started_at: float) -> list[str]:
        """Enabled hosts whose status disagrees with their freshness: not offline but no
        check-in since `cutoff` (a server start counts as one), or offline but checked in
        since. The scan runs in the database: no row of the others reaches Python."""
        self._flush_for_read()
        rows = self.db.execute(self.SWEEP_SQL, (cutoff, started_at, cutoff)).fetchall()
        return [r[0] for r in rows]

    def host_summaries(self) -> list[HostSummary]:
        self._flush_for_read()
        return [HostSummary(*r) for r in self.db.execute(SUMMARY_SQL).fetchall()]

    def status_counts(self) -> dict[str, int]:
        self._flush_for_read()
        return {r[0]: r[1] for r in self.db.execute(COUNTS_SQL).fetchall()}

    def record_checkin(self, host: Host, address: str, now: float) -> None:
        """Carry a check-in's liveness into `host` (the caller's row stays current) and
        queue its write; `record_report` does the same for a new report.

        Check-ins are written behind, many to a transaction (`flush_checkins`, which the
        server runs every CHECKIN_FLUSH seconds): a transaction each was a third of a
        check-in's cost. They skip the fsync too. A crash loses the last fraction of a
        second of them, which the next check-ins rewrite (a lost report: the heartbeat's
        digest no longer matches and the agent is asked for it). Reads see them all:
        every read flushes first, and the check-in's own lookup (`host_by_serial`) lays
        the queued ones over the row. While writes fail, a check-in fails too, so agents
        are told."""
        host.last_checkin, host.address = now, address
        self._liveness[host.id] = (now, address, host.id)
        self._rows.lay_over(host.id, last_checkin=now, address=address)
        self._flush_when_due()

    def record_report(self, host: Host) -> None:
        self._reports[host.id] = (host.report_text, host.report_digest, host.hostname,
                                  host.configured_role, host.agent_version, host.libvirtd_ok,
                                  host.id)
        self._rows.lay_over(host.id, report_digest=host.report_digest, hostname=host.hostname,
                            configured_role=host.configured_role,
                            agent_version=host.agent_version, libvirtd_ok=host.libvirtd_ok)
        self._flush_when_due()

    def _flush_when_due(self) -> None:
        if self._write_error is not None or len(self._liveness) >= CHECKIN_BATCH:
            self.flush_checkins()

    def _lay_queued_over(self, host: Host) -> Host:
        liveness = self._liveness.get(host.id)
        if liveness is not None:
            host.last_checkin, host.address, _id = liveness
        report = self._reports.get(host.id)
        if report is not None:
            (host.report_text, host.report_digest, host.hostname, host.configured_role,
             host.agent_version, host.libvirtd_ok, _id) = report
        return host

    def flush_checkins(self) -> None:
        """Write the queued check-ins in one transaction; raises (and keeps them) if the
        store cannot write."""
        if not self._liveness and not self._reports:
            return
        try:
            with self.checkin_transaction() as db:
                db.executemany("UPDATE hosts SET last_checkin=?, address=? WHERE id=?",
                               list(self._liveness.values()))
                db.executemany(
                    "UPDATE hosts SET report=?, report_digest=?, hostname=?, configured_role=?, "
                    "agent_version=?, libvirtd_ok=? WHERE id=?", list(self._reports.values()))
        except StoreError as exc:
            self._write_error = exc
            raise
        self._write_error = None
        self._liveness.clear()
        self._reports.clear()

    def _flush_for_read(self) -> None:
        """Before a read: queued check-ins in. A store that cannot write still reads."""
        try:
            self.flush_checkins()
        except StoreError as exc:
            log.debug("reading without the queued check-ins: %s", exc)

    def set_statuses(self, changes: list[StatusChange]) -> None:
        """Several hosts' (id, status, detail, since, record) in one transaction; a
        recorded change that repeats the host's last history row counts a try on it."""
        if not changes:
            return
        try:
            with self.transaction() as db:
                refused = self._write_statuses(db, changes)
                for host_id, status, detail, since, record in changes:
                    if record and host_id not in refused:
                        self._add_history(host_id, since, status, detail)
        except BaseException:
            for host_id, *_ in changes:
                self._rows.drop(host_id)
            raise
        for host_id, status, detail, since, _ in changes:
            if host_id in refused:
                self._rows.drop(host_id)
            else:
                self._rows.lay_over(host_id, status=Status(status), detail=detail,
                                    status_since=since)
        if refused:
            log.warning("status of %d hosts not written: this server no longer owns them (%s)",
                        len(refused), ", ".join(sorted(refused)[:5]))

    def _write_statuses(self, db: Connection, changes: list[StatusChange]) -> set[str]:
        """The UPDATEs of set_statuses, inside its transaction; the hosts whose row the
        store refused to change (none here: PostgreSQL fences them)."""
        db.executemany("UPDATE hosts SET status=?, detail=?, status_since=? WHERE id=?",
                       [(status, detail, since, host_id)
                        for host_id, status, detail, since, _ in changes])
        return set()

    def note(self, host_id: str, at: float, status: str, detail: str) -> None:
        """A history row that is no status change (a rename, say)."""
        with self.transaction():
            self._add_history(host_id, at, status, detail)

    def _add_history(self, host_id: str, at: float, status: str, detail: str) -> None:
        last = self.db.execute("SELECT seq, at, status, detail FROM host_events WHERE host_id=? "
                               "ORDER BY seq DESC LIMIT 1", (host_id,)).fetchone()
        if last is not None and last["status"] == status and (
                last["detail"] == detail or self._flooding(host_id, at)):
            self.db.execute("UPDATE host_events SET tries=tries+1, last_at=?, detail=? WHERE seq=?",
                            (at, detail, last["seq"]))
            return
        self.db.execute("INSERT INTO host_events(host_id, at, status, detail) VALUES (?,?,?,?)",
                        (host_id, at, status, detail))
        self.db.execute(self.TRIM_HISTORY_SQL, (host_id, HISTORY_KEEP))

    def _flooding(self, host_id: str, at: float) -> bool:
        recent = self.db.execute("SELECT COUNT(*) FROM (SELECT at FROM host_events WHERE host_id=? "
                                 "ORDER BY seq DESC LIMIT ?) AS recent WHERE at > ?",
                                 (host_id, HISTORY_BURST, at - HISTORY_WINDOW)).fetchone()[0]
        return bool(recent >= HISTORY_BURST)

    def update_host(self, host_id: str, **columns: Any) -> None:
        """Set admin-owned columns (admin_state, role_override, certificate fields)."""
        if not columns or set(columns) - _UPDATABLE:
            raise ValueError(f"update_host: bad columns {sorted(columns)}")
        assignments = ", ".join(f"{c}=?" for c in columns)
        self._rows.drop(host_id)
        with self.transaction() as db:
            db.execute(f"UPDATE hosts SET {assignments} WHERE id=?", (*columns.values(), host_id))
            if columns.get("libvirt_cert_serial"):
                self._record_libvirt_cert(host_id, columns["libvirt_cert_serial"],
                                          columns["libvirt_cert_not_after"])

    def forget_host(self, host_id: str, now: float) -> None:
        """Delete the host and revoke every libvirtd certificate it was given."""
        self._rows.drop(host_id)
        with self.transaction() as db:
            db.execute("DELETE FROM hosts WHERE id=?", (host_id,))
            db.execute("UPDATE libvirt_certs SET revoked_at=? WHERE host_id=? AND revoked_at IS NULL",
                       (now, host_id))

    def revoke_libvirt_certs(self, host_id: str, keep: tuple[str, ...], now: float) -> None:
        """Revoke the host's libvirtd certificates but `keep`."""
        marks = ",".join("?" * len(keep)) or "''"
        with self.transaction() as db:
            db.execute(f"UPDATE libvirt_certs SET revoked_at=? WHERE host_id=? AND revoked_at IS NULL "
                       f"AND serial NOT IN ({marks})", (now, host_id, *keep))

    def history(self, host_id: str, limit: int = 50) -> list[HistoryEntry]:
        self._flush_for_read()
        rows = self.db.execute(
            "SELECT at, status, detail, tries, last_at FROM host_events WHERE host_id=? "
            "ORDER BY seq DESC LIMIT ?", (host_id, limit)).fetchall()
        return [HistoryEntry(r["at"], r["status"], r["detail"], r["tries"], r["last_at"])
                for r in reversed(rows)]


    # -- audit -------------------------------------------------------------

    def add_audit(self, entry: AuditEntry) -> None:
        with self.transaction() as db:
            db.execute(f"INSERT INTO audit ({_AUDIT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       astuple(entry))

    def audit(self, since: float = 0.0, host_id: str = "", limit: int = 1000) -> list[AuditEntry]:
        """The newest `limit` entries since `since` (of one host, if given), oldest first."""
        of_host = "AND host_id = ?" if host_id else ""
        args = (since, host_id, limit) if host_id else (since, limit)
        rows = self.db.execute(f"SELECT {_AUDIT_COLUMNS} FROM audit WHERE at >= ? {of_host} "
                               "ORDER BY seq DESC LIMIT ?", args).fetchall()
        return [AuditEntry(*r) for r in reversed(rows)]

    # -- the web page ------------------------------------------------------

    def add_web_login(self, login: WebLogin) -> None:
        with self.transaction() as db:
            db.execute(f"INSERT INTO web_logins ({_LOGIN_COLUMNS}) VALUES (?, ?, ?, ?, ?)",
                       astuple(login))

    def get_web_login(self, digest: str) -> WebLogin | None:
        row = self.db.execute(f"SELECT {_LOGIN_COLUMNS} FROM web_logins WHERE digest=?",
                              (digest,)).fetchone()
        return WebLogin(*row) if row else None

    def start_web_session(self, login_digest: str, session: WebSession, now: float) -> bool:
        """Spend the login URL and add its session, in one transaction: as with a single-use
        join token, of two browsers opening the same URL at once exactly one gets in."""
        with self.transaction() as db:
            spent = db.execute("UPDATE web_logins SET used_at=? WHERE digest=? AND used_at IS NULL "
                               "AND expires_at > ?", (now, login_digest, now)).rowcount
            if spent:
                db.execute(f"INSERT INTO web_sessions ({_SESSION_COLUMNS}) VALUES "
                           "(?, ?, ?, ?, ?, ?, ?, ?)", astuple(session))
        return bool(spent)

    def web_session(self, digest: str) -> WebSession | None:
        row = self.db.execute(f"SELECT {_SESSION_COLUMNS} FROM web_sessions WHERE digest=?",
                              (digest,)).fetchone()
        return WebSession(*row) if row else None

    def web_sessions(self) -> list[WebSession]:
        rows = self.db.execute(f"SELECT {_SESSION_COLUMNS} FROM web_sessions "
                               "ORDER BY created_at").fetchall()
        return [WebSession(*r) for r in rows]

    def touch_web_session(self, session_id: str, now: float) -> None:
        with self.transaction() as db:
            db.execute("UPDATE web_sessions SET last_seen=? WHERE id=?", (now, session_id))

    def revoke_web_session(self, session_id: str, now: float) -> WebSession | None:
        with self.transaction() as db:
            db.execute("UPDATE web_sessions SET revoked_at=? WHERE id=? AND revoked_at IS NULL",
                       (now, session_id))
        row = self.db.execute(f"SELECT {_SESSION_COLUMNS} FROM web_sessions WHERE id=?",
                              (session_id,)).fetchone()
        return WebSession(*row) if row else None

    def prune(self, now: float, audit_retention: float = DEFAULT_AUDIT_RETENTION) -> int:
        """Forget what can matter no more: libvirtd certificates expired a day ago, tokens
        that expired a month ago and no known host joined with, audit entries older than
        `audit_retention` seconds, web sessions and login URLs made WEB_KEEP ago (long
        expired). Returns rows gone."""
        with self.transaction() as db:
            gone = db.execute("DELETE FROM libvirt_certs WHERE not_after < ?",
                              (now - 86400,)).rowcount
            gone += db.execute("DELETE FROM tokens WHERE expires_at < ? AND jti NOT IN "
                               "(SELECT token_jti FROM hosts)", (now - 30 * 86400,)).rowcount
            gone += db.execute("DELETE FROM audit WHERE at < ?", (now - audit_retention,)).rowcount
            for table in ("web_sessions", "web_logins"):
                gone += db.execute(f"DELETE FROM {table} WHERE created_at < ?",
                                   (now - WEB_KEEP,)).rowcount
        return int(gone)


class RowCache:
    """The hosts' rows as stored (queued check-ins laid over), by id and by certificate
    serial: a check-in's lookup was a third of a heartbeat's cost in SQLite. Every write
    to a host's row goes through the store, which lays it over here or drops the row;
    callers get copies, theirs to change. The report stays in the database (a few KB a
    host, as text; tens as Python objects): a copy reads it when something asks for it,
    which a heartbeat never does."""

    def __init__(self) -> None:
        self._hosts: dict[str, Host] = {}
        self._serials: dict[str, str] = {}

    def by_id(self, host_id: str) -> Host | None:
        host = self._hosts.get(host_id)
        return None if host is None else _copy(host)

    def by_serial(self, serial: str) -> Host | None:
        host_id = self._serials.get(serial)
        return None if host_id is None else self.by_id(host_id)

    def keep(self, host: Host, read_report: Callable[[str], str | None]) -> Host:
        """Cache a row just read (its report through `read_report` from then on); returns
        a copy for the caller, report and all."""
        self.drop(host.id)
        twin = _copy(host)
        host.report_text, host._report, host._read_report = None, None, read_report
        self._hosts[host.id] = host
        for serial in (host.cert_serial, host.prev_cert_serial):
            if serial:
                self._serials[serial] = host.id
        return twin

    def lay_over(self, host_id: str, **values: Any) -> None:
        host = self._hosts.get(host_id)
        if host is not None:
            for name, value in values.items():
                setattr(host, name, value)

    def drop(self, host_id: str) -> None:
        host = self._hosts.pop(host_id, None)
        if host is not None:
            for serial in (host.cert_serial, host.prev_cert_serial):
                if serial and self._serials.get(serial) == host_id:
                    del self._serials[serial]


class WatchedCache(RowCache):
    """Rows kept while `live`: where other servers write the same hosts (PostgreSQL), only
    while their changes are heard (postgres.ChangeWatch drops each row another server
    changed); otherwise every lookup reads the database."""

    def __init__(self) -> None:
        super().__init__()
        self.live = False

    def by_id(self, host_id: str) -> Host | None:
        return super().by_id(host_id) if self.live else None

    def keep(self, host: Host, read_report: Callable[[str], str | None]) -> Host:
        return super().keep(host, read_report) if self.live else host

    def clear(self) -> None:
        self._hosts.clear()
        self._serials.clear()


def _copy(host: Host) -> Host:
    """A shallow copy (every field is immutable but the parsed report, which nobody
    changes): copy.copy's generic path was most of a cached lookup."""
    twin = object.__new__(Host)
    twin.__dict__.update(host.__dict__)
    return twin


def _token(row: Row) -> Token:
    return Token(**{k: row[k] for k in row.keys()} | {"auto_enable": bool(row["auto_enable"])})


def _host(row: Row) -> Host:
    return Host(**{name: row[column] for name, column in _HOST_COLUMNS.items()})
