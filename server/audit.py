"""The audit log: who did what to which host or token, when, and how it ended.

Every enrollment that reached the token check (accepted or refused, with the token id
and the source address), every token created or revoked, every host enabled, disabled,
forgotten or given a role, every web login URL made, opened (or refused: spent,
expired) and every web session revoked. Each entry is stored (kept `--audit-retention`,
default 90 days) and sent to the journal with VIRTFLEET_EVENT=audit_<action>, so
`journalctl VIRTFLEET_EVENT=audit_host_forget` finds it as well as `virtfleet-server audit`.

Secrets never reach it: a token appears by its id, never as the signed string; a web
session by its public id, never by its cookie or login URL.
"""

from __future__ import annotations

import logging
import pwd
import socket
import struct
import time
from collections.abc import Callable
from typing import Protocol

from common.logs import event
from server.model import AuditEntry, Host
from server.store import StoreError

log = logging.getLogger(__name__)

ACTIONS = ("enroll", "token_create", "token_revoke", "host_enable", "host_disable",
           "host_forget", "host_set_role", "host_set_transport", "web_login_url", "web_login",
           "web_session_revoke")


class AuditStore(Protocol):
    def add_audit(self, entry: AuditEntry) -> None: ...


class Audit:
    def __init__(self, store: AuditStore, clock: Callable[[], float] = time.time) -> None:
        self.store, self.clock = store, clock

    def record(self, actor: str, action: str, target: str, outcome: str, detail: str = "",
               host_id: str = "", address: str = "") -> AuditEntry:
        """`outcome`: "ok" or "refused"; `detail`: the reason of a refusal, or what changed."""
        assert action in ACTIONS, action
        entry = AuditEntry(at=self.clock(), actor=actor, action=action, target=target,
                           outcome=outcome, detail=detail, host_id=host_id, address=address)
        try:
            self.store.add_audit(entry)
        except StoreError as exc:  # the action stands; the journal still has the entry
            log.error("audit entry not stored: %s", exc)
        event(log, f"audit_{action}", "audit: %s %s %s: %s%s", actor, action, target, outcome,
              f" ({detail})" if detail else "", level=logging.INFO if outcome == "ok" else
              logging.WARNING, actor=actor, target=target, outcome=outcome,
              host_id=host_id or None, address=address or None)
        return entry


def peer_actor(sock: socket.socket | None) -> str:
    """Who is on the other end of the admin socket, by the kernel's word (SO_PEERCRED):
    "root (uid 0)"; the uid alone when it has no name."""
    if sock is None:
        return "unknown"
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
    return f"{name} (uid {uid})"


def host_target(host: Host) -> str:
    return f"host {host.id} ({host.hostname})"
