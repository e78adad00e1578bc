"""PostgreSQL store: what several server replicas share (`serve --database URL`).

The same SQL as SQLite's (sql.py) over one psycopg connection in autocommit mode, each
multi-row change in an explicit transaction. Commits are durable (synchronous_commit)
but for queued check-ins. Other replicas write the same rows, so the rows read are kept
only while their changes are heard (`ChangeWatch`).
Besides the fleet's state it keeps what every replica must hold alike: the CAs and the
token-signing key (`key_material`), written once by `virtfleet-server init`.

The store is called from the server's event loop, so a database that stops answering
must be noticed in seconds: connect, statement and TCP timeouts below.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import select
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import psycopg
import psycopg.conninfo

from server.replicas import NOW_SQL
from server.store import StatusChange, StoreError, StoreUnavailable
from server.store.migrations import POSTGRES_MIGRATIONS
from server.store.sql import Connection, SqlStore, WatchedCache

log = logging.getLogger(__name__)

# A database that stops answering is an error within about 2.5 s (a partition: sent data
# unacknowledged, or no answer to keepalives), well inside a lease's margin
# (server/replicas.py).
CONNECT_OPTIONS: dict[str, Any] = {
    "connect_timeout": 3,
    "keepalives": 1, "keepalives_idle": 2, "keepalives_interval": 1, "keepalives_count": 2,
    "tcp_user_timeout": 2500,
    "options": "-c statement_timeout=5000 -c lock_timeout=5000",
    "application_name": "virtfleet-server",
}
RECONNECT_EVERY = 1.0
# Held while migrating, so replicas starting together migrate one after the other.
MIGRATION_LOCK = 0x76666C74  # "vflt"


def redacted(url: str) -> str:
    """The database URL without its password, for logs and messages."""
    try:
        params = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "(a database URL that does not parse)"
    params.pop("password", None)
    host, port, name = params.get("host", ""), params.get("port", ""), params.get("dbname", "")
    return f"postgresql://{params.get('user', '')}@{host}{':' + str(port) if port else ''}/{name}"


def check_url(url: str) -> str:
    """Why `url` is no PostgreSQL URL libpq takes, or ""."""
    if not url.startswith(("postgresql://", "postgres://")):
        return "give a postgresql:// URL"
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError as exc:
        # libpq quotes the whole URI in some of its words: a password must not follow.
        words = re.sub(r'"[^"]*(?:://|@)[^"]*"', "(the URL)", str(exc).strip())
        return f"libpq cannot read it: {words}"
    return ""


class Row(tuple):  # type: ignore[type-arg]
    """A result row by index or by column name, as sqlite3.Row."""

    _index: dict[str, int]

    def __new__(cls, values: Sequence[Any], index: dict[str, int]) -> Row:
        row = super().__new__(cls, values)
        row._index = index
        return row

    def __getitem__(self, key: Any) -> Any:
        return super().__getitem__(self._index[key] if isinstance(key, str) else key)

    def keys(self) -> list[str]:
        return list(self._index)


def _rows(cursor: Any) -> Callable[[Sequence[Any]], Row]:
    index = {column.name: i for i, column in enumerate(cursor.description or ())}
    return functools.partial(Row, index=index)


@functools.lru_cache(maxsize=256)
def _dialect(sql: str) -> str:
    """sqlite3's `?` placeholders as psycopg's `%s` (no statement here holds a `%`)."""
    return sql.replace("?", "%s")


def _spoke_while_idle(conn: psycopg.Connection[Any]) -> bool:
    """Whether the server sent anything on a connection nobody is using: it only does to
    end it (a termination notice, or the socket's end)."""
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):
        return True
    return bool(readable)


class PgConnection:
    """psycopg used as the SQL store uses sqlite3: `execute`, `executemany`, rows by name.
    A psycopg error is StoreUnavailable, in words.

    Once the database failed, the connection is made again in a thread of its own
    (`in_background`, for the server's event loop) and calls fail at once meanwhile: a
    database gone must cost the event loop one timeout, not one per call. Without it the
    next call connects again itself. Never inside a transaction: that one fails."""

    def __init__(self, url: str, in_background: bool = False) -> None:
        self.url, self.where = url, redacted(url)
        self.in_background = in_background
        self._conn: psycopg.Connection[Any] | None = None
        self._pinned: psycopg.Connection[Any] | None = None  # the open transaction's
        self._failed: StoreUnavailable | None = None  # while the database cannot be reached
        self._fresh: psycopg.Connection[Any] | None = None  # made by the reconnecting thread
        self._reconnecting: threading.Thread | None = None
        self._closed = threading.Event()
        self.backend_pid = 0  # the connection's server process: its own NOTIFYs carry it

    def _connect(self) -> psycopg.Connection[Any]:
        conn = psycopg.connect(self.url, autocommit=True, row_factory=_rows, **CONNECT_OPTIONS)
        self.backend_pid = conn.info.backend_pid
        return conn

    def connection(self) -> psycopg.Connection[Any]:
        if self._pinned is not None:
            return self._pinned
        if self._conn is not None and not (self._conn.closed or self._conn.broken):
            if not _spoke_while_idle(self._conn):
                return self._conn
            # The server ended this idle connection (a restart, an administrator): a new
            # one now, not an error for the call that finds it.
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
        if self._fresh is not None:
            self._conn, self._fresh, self._failed = self._fresh, None, None
            log.info("the database %s answers again", self.where)
            return self._conn
        if self._failed is not None and self.in_background:
            raise self._failed
        try:
            self._conn = self._connect()
        except psycopg.Error as exc:
            raise self._lost(exc) from exc
        self._failed = None
        return self._conn

    def _lost(self, exc: Exception) -> StoreUnavailable:
        """The database failed: say so, and (in the background) start connecting again."""
        self._failed = StoreUnavailable(f"the database {self.where} cannot be used: "
                                        f"{str(exc).strip() or type(exc).__name__}")
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
        if self.in_background and (self._reconnecting is None or not self._reconnecting.is_alive()):
            self._reconnecting = threading.Thread(target=self._reconnect, daemon=True,
                                                  name="database-reconnect")
            self._reconnecting.start()
        return self._failed

    def _reconnect(self) -> None:
        while not self._closed.wait(RECONNECT_EVERY):
            try:
                self._fresh = self._connect()
                return
            except psycopg.Error as exc:
                log.debug("the database %s still cannot be reached: %s", self.where, exc)

    def execute(self, sql: str, args: Sequence[Any] = ()) -> psycopg.Cursor[Any]:
        conn = self.connection()
        try:
            return conn.execute(_dialect(sql), args or None)
        except psycopg.OperationalError as exc:
            raise self._lost(exc) from exc

    def executemany(self, sql: str, args: Sequence[Sequence[Any]]) -> psycopg.Cursor[Any]:
        cursor = self.connection().cursor()
        try:
            cursor.executemany(_dialect(sql), args)
            return cursor
        except psycopg.OperationalError as exc:
            raise self._lost(exc) from exc

    @contextmanager
    def transaction(self) -> Iterator[PgConnection]:
        if self._pinned is not None:  # nested: part of the open one
            yield self
            return
        conn = self.connection()
        try:
            with conn.transaction():
                self._pinned = conn
                yield self
        except psycopg.OperationalError as exc:
            raise self._lost(exc) from exc
        finally:
            self._pinned = None

    def close(self) -> None:
        self._closed.set()
        for conn in (self._conn, self._fresh):
            if conn is not None:
                conn.close()


class ChangeWatch:
    """LISTEN virtfleet_hosts (migration 3's trigger announces every change to a host's
    row) in a thread with its own connection: a row another connection changed is
    dropped from `cache`, on `loop`. This replica's own writes (its store's connection)
    keep the cache current themselves. While the watch is not listening the cache is
    off: a change it did not hear would leave a stale row."""

    def __init__(self, db: PgConnection, cache: WatchedCache, loop: asyncio.AbstractEventLoop) -> None:
        self.db, self.cache, self.loop = db, cache, loop
        self._stopping = threading.Event()
        self._conn: psycopg.Connection[Any] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="host-changes")
        self._thread.start()

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._conn = psycopg.connect(self.db.url, autocommit=True, **CONNECT_OPTIONS)
                self._conn.execute("LISTEN virtfleet_hosts")
                self.loop.call_soon_threadsafe(self._listening, True)
                for note in self._conn.notifies():
                    if self._stopping.is_set():
                        return
                    if note.payload and note.pid != self.db.backend_pid:
                        self.loop.call_soon_threadsafe(self.cache.drop, note.payload)
            except psycopg.Error as exc:
                log.debug("not hearing the hosts' changes (%s): rows are not kept", exc)
            except RuntimeError:  # the loop closed: the server is stopping
                return
            finally:
                with contextlib.suppress(RuntimeError):
                    self.loop.call_soon_threadsafe(self._listening, False)
                if self._conn is not None:
                    with contextlib.suppress(psycopg.Error):
                        self._conn.close()
            self._stopping.wait(RECONNECT_EVERY)

    def _listening(self, yes: bool) -> None:
        self.cache.clear()  # what was kept may have changed unheard
        self.cache.live = yes

    def stop(self) -> None:
        self._stopping.set()
        with contextlib.suppress(StoreUnavailable):
            self.db.execute("NOTIFY virtfleet_hosts")  # wakes the listening thread


class PostgresStore(SqlStore):
    SWEEP_SQL = ("SELECT id FROM hosts WHERE admin_state='enabled' AND CASE WHEN status='offline' "
                 "THEN COALESCE(last_checkin, enrolled_at) >= ? "
                 "ELSE GREATEST(COALESCE(last_checkin, enrolled_at), ?) < ? END")
    TRIM_HISTORY_SQL = ("DELETE FROM host_events WHERE seq IN (SELECT seq FROM host_events "
                        "WHERE host_id=? ORDER BY seq DESC OFFSET ?)")
    db: PgConnection

    def __init__(self, url: str) -> None:
        # (replica, epoch) a status write of the host is made with (server/replicas.py);
        # None: no leases (a single server on PostgreSQL, `init`).
        self.fence: Callable[[str], tuple[str, int]] | None = None
        self.db = PgConnection(url, in_background=True)
        self.where = self.db.where
        try:
            self._migrate()
        except BaseException:
            self.db.close()
            raise
        super().__init__(WatchedCache())
        self.watch: ChangeWatch | None = None

    def watch_changes(self, loop: asyncio.AbstractEventLoop) -> None:
        """Keep the hosts' rows read (the check-in's lookup: a round trip each, otherwise),
        dropping each one another replica changed, on `loop`."""
        assert isinstance(self._rows, WatchedCache)
        self.watch = ChangeWatch(self.db, self._rows, loop)

    def _close_connection(self) -> None:
        if self.watch is not None:
            self.watch.stop()
        self.db.close()

    def _migrate(self) -> None:
        with self.transaction() as db:
            db.execute("SELECT pg_advisory_xact_lock(?)", (MIGRATION_LOCK,))
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if version > len(POSTGRES_MIGRATIONS):
                raise StoreError(
                    f"the database {self.where} has schema version {version}, newer than "
                    f"this server knows ({len(POSTGRES_MIGRATIONS)}): upgrade virtfleet-server")
            for number, script in enumerate(POSTGRES_MIGRATIONS[version:], start=version + 1):
                db.execute(script)
                log.info("database %s migrated to schema version %d", self.where, number)
            if row is None:
                db.execute("INSERT INTO schema_version VALUES (?)", (len(POSTGRES_MIGRATIONS),))
            elif version < len(POSTGRES_MIGRATIONS):
                db.execute("UPDATE schema_version SET version=?", (len(POSTGRES_MIGRATIONS),))

    def transaction(self) -> Any:
        return self.db.transaction()

    @contextmanager
    def checkin_transaction(self) -> Iterator[PgConnection]:
        with self.db.transaction() as db:
            db.execute("SET LOCAL synchronous_commit = off")
            yield db

    def _write_statuses(self, db: Connection, changes: list[StatusChange]) -> set[str]:
        """Fenced: an enabled host's status is written only by the replica whose lease on
        it still has the epoch that replica holds; a deposed owner's write changes nothing."""
        if self.fence is None:
            return super()._write_statuses(db, changes)
        refused: set[str] = set()
        for host_id, status, detail, since, _record in changes:
            owner, epoch = self.fence(host_id)
            if not db.execute(
                    "UPDATE hosts SET status=?, detail=?, status_since=? WHERE id=? AND "
                    "(admin_state <> 'enabled' OR EXISTS (SELECT 1 FROM leases WHERE "
                    "host_id=? AND owner=? AND epoch=?))",
                    (status, detail, since, host_id, host_id, owner, epoch)).rowcount:
                refused.add(host_id)
        return refused

    def lease_owner(self, host_id: str) -> str:
        row = self.db.execute(f"SELECT owner FROM leases WHERE host_id=? AND expires_at > {NOW_SQL}",
                              (host_id,)).fetchone()
        return str(row[0]) if row else ""

    def replica_rows(self, ttl: float) -> list[tuple[str, str, float, float, bool, int]]:
        """Every replica that ever ran: id, URL, started, last seen, alive (seen within
        `ttl`), hosts it owns now."""
        rows = self.db.execute(
            f"SELECT r.id, r.url, r.started_at, r.seen_at, r.seen_at > {NOW_SQL} - ?, "
            f"(SELECT COUNT(*) FROM leases l WHERE l.owner = r.id AND l.expires_at > {NOW_SQL}) "
            "FROM replicas r ORDER BY r.id", (ttl,)).fetchall()
        return [(r[0], r[1], r[2], r[3], bool(r[4]), int(r[5])) for r in rows]

    # -- what every replica shares ------------------------------------------

    def key_material(self, name: str) -> bytes | None:
        row = self.db.execute("SELECT pem FROM key_material WHERE name=?", (name,)).fetchone()
        return bytes(row[0]) if row else None

    def add_key_material(self, name: str, pem: bytes) -> bytes:
        """Keep `pem` as `name` unless another replica did first; returns the one kept."""
        with self.transaction() as db:
            db.execute("INSERT INTO key_material VALUES (?, ?, ?) ON CONFLICT (name) DO NOTHING",
                       (name, pem, time.time()))
        kept = self.key_material(name)
        assert kept is not None
        return kept
