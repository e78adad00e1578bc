"""The server's state store: one interface, with SQLite behind it (sqlite.py).

Every part of the server that keeps state goes through `Store`; a PostgreSQL
implementation for several replicas takes the same interface. The semantics each
implementation owes:
- `enroll` spends one use of the token and adds the host in one transaction: of two
  concurrent uses of a single-use token exactly one succeeds;
- every write but a check-in is durable when the call returns;
- check-ins are written behind (`record_checkin` queues, `flush_checkins` writes many in
  one transaction), yet every read sees them;
- history rows repeat neither a status nor a reason: the same (status, reason) again
  counts as one more try on the row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from server.model import HistoryEntry, Host, Token

CHECKIN_FLUSH = 0.1  # seconds between writes of queued check-ins (the server's loop)

# One status change: (host id, status, detail, since, record in the history).
StatusChange = tuple[str, str, str, float, bool]


class StoreError(Exception):
    """The store cannot do what was asked; the message says why in operator terms."""


class StoreUnavailable(StoreError):
    """The store cannot be read or written right now (disk full or read-only, database
    gone): the request may succeed later."""


class Store(Protocol):
    def close(self) -> None: ...

    # tokens
    def add_token(self, token: Token) -> None: ...
    def get_token(self, jti: str) -> Token | None: ...
    def list_tokens(self) -> list[Token]: ...
    def revoke_token(self, jti: str, now: float) -> Token | None: ...
    def token_hosts(self) -> dict[str, list[str]]: ...

    # hosts
    def enroll(self, host: Host, now: float) -> None: ...
    def get_host(self, host_id: str) -> Host | None: ...
    def host_by_serial(self, serial: str) -> Host | None: ...
    def list_hosts(self) -> list[Host]: ...
    def hosts_to_sweep(self, cutoff: float, started_at: float) -> list[str]: ...
    def status_counts(self) -> dict[str, int]: ...
    def record_checkin(self, host: Host, address: str, now: float) -> None: ...
    def flush_checkins(self) -> None: ...
    def set_statuses(self, changes: list[StatusChange]) -> None: ...
    def note(self, host_id: str, at: float, status: str, detail: str) -> None: ...
    def update_host(self, host_id: str, **columns: Any) -> None: ...
    def forget_host(self, host_id: str, now: float) -> None: ...
    def revoke_libvirt_certs(self, host_id: str, keep: tuple[str, ...], now: float) -> None: ...
    def history(self, host_id: str, limit: int = 50) -> list[HistoryEntry]: ...


def open_store(state_dir: Path) -> Store:
    from server.store.sqlite import SqliteStore

    return SqliteStore(state_dir / "state.db")
