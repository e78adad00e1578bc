"""What the server knows about hosts and tokens: plain data, shared by every part.

States are enums (`StrEnum`: they are stored, compared and sent as their plain names).
A host's report is kept as the JSON text the agent sent and parsed into the typed
`wire.Report` only when something reads it: a check-in carries a fresh typed report,
and the hot path never re-parses the stored one. A row the store keeps in memory leaves
even the text in the database until something reads it (`Host.report_text` None).
"""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from common import wire

log = logging.getLogger(__name__)


class Status(enum.StrEnum):
    PENDING = "pending"
    CONNECTING = "connecting"
    ONLINE = "online"
    ERROR = "error"
    OFFLINE = "offline"
    DISABLED = "disabled"


class AdminState(enum.StrEnum):
    PENDING = "pending"
    ENABLED = "enabled"
    DISABLED = "disabled"


class Transport(enum.StrEnum):
    """How the server reaches a host's libvirtd (wire.TRANSPORTS; links/routes.py)."""

    DIRECT = "direct"
    TUNNEL = "tunnel"
    AUTO = "auto"


class LinkState(enum.StrEnum):
    CONNECTING = "connecting"
    ONLINE = "online"
    ERROR = "error"


@dataclass(frozen=True)
class Connection:
    """What the link manager knows about one host's libvirt connection."""

    state: LinkState
    detail: str


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
    transport: str = "direct"  # wire.TRANSPORTS: what the hosts it enrolls start with

    def state(self, now: float) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at <= now:
            return "expired"
        if self.uses >= self.max_uses:
            return "used"
        return "valid"


def parse_report(text: str) -> wire.Report:
    """A stored report (validated when it arrived) as typed data. One that no longer
    parses (written by another version) reads as "libvirtd unknown": the next check-in
    replaces it."""
    try:
        return wire.parse(wire.Report, json.loads(text), stored=True)
    except (ValueError, wire.WireError) as exc:
        log.warning("a stored host report cannot be read (%s): treated as empty", exc)
        return wire.Report(hostname="", role="mixed", agent_version="",
                           libvirtd=wire.LibvirtdHealth(ok=False, error="no report yet"))


@dataclass
class Host:
    id: str
    hostname: str
    admin_state: AdminState
    configured_role: str
    role_override: str | None
    role_limit: str
    status: Status
    detail: str
    status_since: float
    enrolled_at: float
    last_checkin: float | None
    address: str
    agent_version: str
    # The agent's last report as JSON text; None: still in the store (read it through
    # `report` or `stored_report_text`).
    report_text: str | None = "{}"
    report_digest: str = ""  # wire.report_digest(report_text): what its heartbeats carry
    token_jti: str = ""
    cert_serial: str = ""
    cert_not_after: float = 0.0
    prev_cert_serial: str | None = None
    libvirt_cert_serial: str | None = None
    libvirt_cert_not_after: float | None = None
    libvirt_cert_address: str | None = None
    # The libvirtd certificate before the last renewal: accepted until the host's
    # libvirtd is first seen serving the new one.
    prev_libvirt_cert_serial: str | None = None
    libvirtd_ok: bool = False  # what the last report said, kept apart to skip parsing it
    transport: Transport = Transport.DIRECT  # how the server reaches its libvirtd
    _report: wire.Report | None = field(default=None, repr=False, compare=False)
    # Where a report text left in the store is read from (by host id; None: the host is
    # gone): a cached row's (store/sql.RowCache).
    _read_report: Callable[[str], str | None] | None = field(default=None, repr=False,
                                                             compare=False)

    def __post_init__(self) -> None:
        self.admin_state = AdminState(self.admin_state)
        self.status = Status(self.status)
        self.libvirtd_ok = bool(self.libvirtd_ok)
        self.transport = Transport(self.transport)

    @property
    def report(self) -> wire.Report:
        if self._report is None:
            self._report = parse_report(self.stored_report_text())
        return self._report

    def stored_report_text(self) -> str:
        if self.report_text is None:
            assert self._read_report is not None, "a row without its report and nowhere to read it"
            self.report_text = self._read_report(self.id) or "{}"
        return self.report_text

    def take_report(self, report: wire.Report) -> None:
        """A check-in's (or an enrollment's) report: typed, and as the text to store."""
        self._report, self.report_text = report, json.dumps(wire.to_json(report))
        self.report_digest = wire.report_digest(self.report_text)
        self.libvirtd_ok = report.libvirtd.ok
        self.hostname, self.configured_role = report.hostname, report.role
        self.agent_version = report.agent_version

    @property
    def role(self) -> str:
        return self.role_override or self.configured_role

    @property
    def role_source(self) -> str:
        return "admin override" if self.role_override else "host configuration"

    @property
    def libvirt_serials(self) -> tuple[str, ...]:
        """The libvirtd certificates the server accepts from this host right now."""
        return tuple(s for s in (self.libvirt_cert_serial, self.prev_libvirt_cert_serial) if s)


@dataclass(frozen=True)
class HostSummary:
    """What a list of every host needs (metrics, the web page's table): no report, no
    certificates."""

    id: str
    hostname: str
    status: str
    role: str
    last_checkin: float | None
    admin_state: str
    detail: str


@dataclass(frozen=True)
class AuditEntry:
    at: float
    actor: str  # "root (uid 0)" on the admin socket; the source address for an enrollment
    action: str  # audit.ACTIONS
    target: str  # "host ID (NAME)", "token ID"
    outcome: str  # "ok" | "refused"
    detail: str = ""
    host_id: str = ""  # the host it concerns, if any (for `audit --host`)
    address: str = ""  # where the request came from, for enrollments


@dataclass
class HistoryEntry:
    at: float
    status: str
    detail: str
    tries: int = 1  # the same status and reason seen again (a retry loop) counts here
    last_at: float | None = None


@dataclass(frozen=True)
class WebLogin:
    """A one-time login URL for the web page; only its secret's digest is kept."""

    digest: str
    created_by: str  # the admin socket's peer who asked for it: "root (uid 0)"
    created_at: float
    expires_at: float
    used_at: float | None = None


@dataclass(frozen=True)
class WebSession:
    """A browser logged in to the web page; only its cookie's digest is kept."""

    id: str  # public: named in lists, the audit log and `web-sessions revoke`
    digest: str
    created_by: str  # who made the login URL it came from
    created_at: float
    last_seen: float
    address: str  # the browser's, at login
    user_agent: str
    revoked_at: float | None = None
