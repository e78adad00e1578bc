"""SQLite store: one server's default, in one file of its state directory.

WAL mode, a schema version in `PRAGMA user_version` with forward-only migrations, and
every multi-row change in one transaction, so a crash leaves the old state or the new
one. The server is the only writer (admin commands go through its socket), so the rows
it reads can be cached (RowCache).
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from server.store import StoreError, StoreUnavailable
from server.store.migrations import SQLITE_MIGRATIONS
from server.store.sql import RowCache, SqlStore

log = logging.getLogger(__name__)

# What the offline sweep reads every second (from the hosts_liveness index alone).
SWEEP_SQL = ("SELECT id FROM hosts WHERE admin_state='enabled' AND CASE WHEN status='offline' "
             "THEN COALESCE(last_checkin, enrolled_at) >= ? "
             "ELSE MAX(COALESCE(last_checkin, enrolled_at), ?) < ? END")


class SqliteStore(SqlStore):
    SWEEP_SQL = SWEEP_SQL
    TRIM_HISTORY_SQL = ("DELETE FROM host_events WHERE seq IN (SELECT seq FROM host_events "
                        "WHERE host_id=? ORDER BY seq DESC LIMIT -1 OFFSET ?)")
    db: sqlite3.Connection

    def __init__(self, path: Path) -> None:
        self.path, self.where = path, str(path)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: a commit is on disk before the caller hears "done" (a token, an enrollment,
        # an admin change must survive a crash or a disk turning read-only). Check-ins opt
        # out (checkin_transaction).
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.execute("PRAGMA busy_timeout=5000")
        self._migrate()
        super().__init__(RowCache())

    def _close_connection(self) -> None:
        self.db.close()

    def _migrate(self) -> None:
        version = self.db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(SQLITE_MIGRATIONS):
            raise StoreError(
                f"{self.path} has schema version {version}, newer than this server "
                f"knows ({len(SQLITE_MIGRATIONS)}): upgrade virtfleet-server")
        for number, script in enumerate(SQLITE_MIGRATIONS[version:], start=version + 1):
            with self.transaction():
                for statement in script.split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                self.db.execute(f"PRAGMA user_version={number}")
            log.info("store %s migrated to schema version %d", self.path, number)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:  # a COMMIT refused by a full disk leaves it open
                    self.db.execute("ROLLBACK")
                raise
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(f"the state store {self.path} cannot be written: {exc}") from exc

    @contextmanager
    def checkin_transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("PRAGMA synchronous=NORMAL")
        try:
            with self.transaction() as db:
                yield db
        finally:
            self.db.execute("PRAGMA synchronous=FULL")
