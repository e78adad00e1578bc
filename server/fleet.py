"""What the server does with a host: enroll, check in, renew, and the admin's intent.

No HTTP, no libvirt, no SQL here: `Fleet` is handed the store, the CAs, the token
signer, the status keeper and the link controls it needs. The doors (doors/agent_api.py
for agents, doors/admin_api.py for operators) only parse, call one method here and
render the answer.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from cryptography import x509
from cryptography.x509.oid import NameOID

from common import pki, wire
from common.logs import event
from server import ca as ca_mod
from server.audit import Audit
from server.ca import CertificateAuthority, libvirt_names
from server.config import ServerConfig
from server.hosts import HostStatus
from server.model import AdminState, Connection, Host, LinkState, Status, Token, Transport
from server.pace import MIN_WINDOW
from server.ratelimit import RateLimiter
from server.store import Store, StoreError
from server.tokens import TokenClaims, TokenError, TokenSigner

log = logging.getLogger(__name__)

HOST_ORG = "virtfleet-host"
# Per host: a healthy agent checks in every few seconds (sooner after an event) and
# renews once a month or when it moves; anything far beyond is a loop or an attack.
CHECKIN_RATE, CHECKIN_BURST = 2.0, 20.0
RENEW_RATE, RENEW_BURST = 1 / 600, 3.0


class Refused(Exception):
    """A request the server understood and will not carry out: (HTTP status, code, reason),
    with any headers the refusal needs (Retry-After)."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


def rate_limited(limiter: RateLimiter, key: str, what: str) -> Refused:
    wait = limiter.retry_after(key)
    return Refused(429, "rate_limited", f"too many {what}; retry in {wait} s",
                   headers={"Retry-After": str(wait)})


class LinkControl(Protocol):
    """What the domain tells the link manager."""

    def host_changed(self, host_id: str, libvirtd_recovered: bool = False,
                     host: Host | None = None) -> None: ...
    def heard_from(self, host: Host) -> None: ...  # a heartbeat, nothing else new
    def reconnect(self, host_id: str) -> None: ...


@dataclass
class CreatedToken:
    token: str
    join: str
    record: Token


class Fleet:
    def __init__(self, config: ServerConfig, store: Store, identity_ca: CertificateAuthority,
                 libvirt_ca: CertificateAuthority, signer: TokenSigner, status: HostStatus,
                 links: LinkControl, link_states: Mapping[str, Connection],
                 libvirt_client_dn: str, audit: Audit,
                 tunnel_wanted: Callable[[Host], bool] = lambda _host: False,
                 other_replicas: Callable[[], list[str]] = list) -> None:
        """`tunnel_wanted(host)`: whether the host's libvirt is reached through a tunnel
        its agent opens (links/routes.Routes.via_tunnel); `other_replicas()`: the URLs of
        the other live replicas, which an agent moves to when this one stops answering."""
        self.config = config
        self.store = store
        self.identity_ca = identity_ca
        self.libvirt_ca = libvirt_ca
        self.signer = signer
        self.status = status
        self.links = links
        self.link_states = link_states
        self.libvirt_client_dn = libvirt_client_dn
        self.audit = audit
        self.tunnel_wanted = tunnel_wanted
        self.other_replicas = other_replicas
        self.reconnect_window = MIN_WINDOW  # server/pace.py: set by the sweep loop
        self._checkins = RateLimiter(CHECKIN_RATE, CHECKIN_BURST)
        self._renewals = RateLimiter(RENEW_RATE, RENEW_BURST)

    # -- tokens --------------------------------------------------------------

    def create_token(self, role: str, ttl: float, uses: int, auto_enable: bool,
                     description: str, transport: str = Transport.AUTO) -> CreatedToken:
        check_transport(transport)
        token, claims = self.signer.create(role, dt.timedelta(seconds=ttl), auto_enable, transport)
        record = Token(jti=claims.jti, role=role, auto_enable=auto_enable, max_uses=uses, uses=0,
                       created_at=time.time(), expires_at=claims.expires_at, revoked_at=None,
                       description=description, transport=transport)
        self.store.add_token(record)
        join = wire.JoinString(url=self.config.url, ca_pin=self.identity_ca.pin, token=token,
                               more_urls=self.other_replicas())
        log.info("created join token %s (role %s, %d use(s), expires %s)", claims.jti, role, uses,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(claims.expires_at)))
        return CreatedToken(token=token, join=join.encode(), record=record)

    # -- enrollment ----------------------------------------------------------

    def enroll(self, req: wire.EnrollRequest, address: str,
               replaces: Host | None = None) -> wire.EnrollResponse:
        """Enroll a host, and say so in the audit log either way. `replaces`: the host
        whose (still valid) identity the request came with, when an enrolled host joins
        again: it keeps its id and history and takes the new identity in place, so one
        machine never shows twice."""
        actor = f"agent at {address}"
        try:
            claims = self.signer.verify(req.token)
        except TokenError as exc:
            self.audit.record(actor, "enroll", "a token that does not verify", "refused", str(exc),
                              address=address)
            raise Refused(403, "token_refused", str(exc)) from None
        try:
            response = self._enroll(req, address, replaces, claims)
        except Refused as exc:
            self.audit.record(actor, "enroll", f"token {claims.jti}", "refused", exc.message,
                              host_id=replaces.id if replaces else "", address=address)
            raise
        self.audit.record(actor, "enroll", f"host {response.host_id} ({req.report.hostname})", "ok",
                          f"token {claims.jti}, role {req.report.role}"
                          + (", joined again" if replaces else ""),
                          host_id=response.host_id, address=address)
        return response

    def _enroll(self, req: wire.EnrollRequest, address: str, replaces: Host | None,
                claims: TokenClaims) -> wire.EnrollResponse:
        role = req.report.role
        if not wire.role_within(role, claims.role):
            raise Refused(403, "role_refused",
                          f"role {role!r} is beyond what this join token allows ({claims.role!r})")
        csr = self._csr(req.csr, "csr")
        libvirt_csr = self._csr(req.libvirt_csr, "libvirt_csr") if req.libvirt_csr else None
        host_id = replaces.id if replaces else secrets.token_hex(6)
        identity, cert = self._issue(host_id, csr, libvirt_csr, address)
        now = time.time()
        host = self._enrolled_host(host_id, req.report, claims.jti, claims.role, claims.auto_enable,
                                   address, now, replaces)
        host.transport = Transport(claims.transport)
        host.cert_serial, host.cert_not_after = f"{cert.serial_number:x}", pki.not_after(cert).timestamp()
        if identity.libvirt_certificate:
            lv = pki.load_cert(identity.libvirt_certificate)
            host.libvirt_cert_serial = f"{lv.serial_number:x}"
            host.libvirt_cert_not_after = pki.not_after(lv).timestamp()
            host.libvirt_cert_address = address
        try:
            self.store.enroll(host, now)
        except StoreError as exc:
            raise Refused(403, "token_refused", str(exc)) from None
        if replaces is not None:
            self.store.revoke_libvirt_certs(host_id, host.libvirt_serials, now)
            self.links.reconnect(host_id)
        event(log, "enrolled", "host %s %s as %s from %s (role %s, token %s)", req.report.hostname,
              "joined again" if replaces else "enrolled", host_id, address, role, claims.jti,
              host_id=host_id)
        self.status.refresh(host_id)
        self.links.host_changed(host_id)
        return wire.EnrollResponse(host_id=host_id, identity=identity,
                                   checkin_interval=self.config.checkin_interval)

    @staticmethod
    def _enrolled_host(host_id: str, report: wire.Report, jti: str, role_limit: str,
                       auto_enable: bool, address: str, now: float, replaces: Host | None) -> Host:
        admin_state = AdminState.ENABLED if auto_enable else AdminState.PENDING
        if replaces is not None and replaces.admin_state != AdminState.PENDING:
            admin_state = replaces.admin_state  # a re-join keeps what the admin decided
        status = Status.PENDING if admin_state == AdminState.PENDING else Status.CONNECTING
        what = "joined again (new identity, same host)" if replaces else "enrolled"
        host = Host(
            id=host_id, hostname=report.hostname, admin_state=admin_state,
            configured_role=report.role, role_override=replaces.role_override if replaces else None,
            role_limit=role_limit, status=status,
            detail=f"{what} with join token {jti} from {address}",
            status_since=now, enrolled_at=replaces.enrolled_at if replaces else now,
            last_checkin=now, address=address, agent_version=report.agent_version, token_jti=jti)
        host.take_report(report)
        return host

    def _csr(self, pem: str, what: str) -> x509.CertificateSigningRequest:
        try:
            return ca_mod.parse_csr(pem, what)
        except ca_mod.CSRError as exc:
            raise Refused(400, "bad_csr", str(exc)) from None

    def _issue(self, host_id: str, csr: x509.CertificateSigningRequest,
               libvirt_csr: x509.CertificateSigningRequest | None,
               address: str) -> tuple[wire.Identity, x509.Certificate]:
        subject = [(NameOID.ORGANIZATION_NAME, HOST_ORG), (NameOID.COMMON_NAME, host_id)]
        cert = self.identity_ca.issue(csr.public_key(), subject,
                                      lifetime=self.config.identity_cert_lifetime, client=True)
        identity = wire.Identity(certificate=pki.cert_pem(cert),
                                 ca_certificate=self.identity_ca.cert_pem)
        if libvirt_csr is not None:
            lv = self.libvirt_ca.issue(libvirt_csr.public_key(), subject,
                                       lifetime=self.config.libvirt_cert_lifetime, server=True,
                                       names=libvirt_names(host_id, address))
            identity.libvirt_certificate = pki.cert_pem(lv)
            identity.libvirt_ca_certificate = self.libvirt_ca.cert_pem
            identity.libvirt_client_dn = self.libvirt_client_dn
        return identity, cert

    # -- check-in and renewal -------------------------------------------------

    def host_for_certificate(self, serial: str | None) -> Host:
        """The host a verified client certificate speaks for; never from the body."""
        return identify(self.store, serial)

    def checkin(self, host: Host, req: wire.CheckinRequest, address: str) -> wire.CheckinResponse:
        """A check-in: a heartbeat (`req.report_digest`) or a full report."""
        if not self._checkins.allow(host.id):
            raise rate_limited(self._checkins, host.id, "check-ins from this host")
        if req.report is None:
            return self._heartbeat(host, req.report_digest or "", address)
        return self._full_checkin(host, req.report, address)

    def _heartbeat(self, host: Host, digest: str, address: str) -> wire.CheckinResponse:
        """The host is alive and says its report is the one we hold: only its liveness is
        written and nothing is re-derived, unless the check-in itself is news (the host
        was silent past the grace period, or comes from another address)."""
        now = time.time()
        silent = now - self.status.last_seen(host) > self.status.grace
        moved = address != host.address
        self.store.record_checkin(host, address, now)
        if silent or moved:
            self.status.refresh_host(host)
            self.links.host_changed(host.id, host=host)
        else:
            self.links.heard_from(host)
        return self._answer(host, now, address, send_report=digest != host.report_digest)

    def _full_checkin(self, host: Host, report: wire.Report, address: str) -> wire.CheckinResponse:
        was_ok, old_name, old_role = host.libvirtd_ok, host.hostname, host.configured_role
        host.take_report(report)
        role_allowed = wire.role_within(report.role, host.role_limit)
        if not role_allowed:
            host.configured_role = old_role  # the report says what it asked for (status shows it)
        now = time.time()
        self.store.record_checkin(host, address, now)
        self.store.record_report(host)
        if report.hostname != old_name:
            self.store.note(host.id, now, host.status, f"renamed from {old_name!r} to "
                                                       f"{report.hostname!r} by its agent")
        if report.libvirtd.ok != was_ok:
            name = "libvirtd_up" if report.libvirtd.ok else "libvirtd_down"
            event(log, name, "host %s: agent reports libvirtd %s%s", host.hostname,
                  "up" if report.libvirtd.ok else "down",
                  "" if report.libvirtd.ok else f": {report.libvirtd.error}",
                  host_id=host.id, reason=report.libvirtd.error)
        # `host` is current (the check-in was carried into it): no re-reads.
        self.status.refresh_host(host)
        self.links.host_changed(host.id, libvirtd_recovered=report.libvirtd.ok and not was_ok,
                                host=host)
        if not role_allowed:
            raise Refused(403, "role_refused",
                          f"role {report.role!r} is beyond what this host's join token allows "
                          f"({host.role_limit!r}): set role = {host.role_limit!r} (or narrower) "
                          "in /etc/virtfleet/agent.toml, or remove the setting")
        return self._answer(host, now, address)

    def _answer(self, host: Host, now: float, address: str,
                send_report: bool = False) -> wire.CheckinResponse:
        return wire.CheckinResponse(
            host_id=host.id, status=host.status, detail=self.public_detail(host),
            enabled=host.admin_state == AdminState.ENABLED, role=host.role,
            checkin_interval=checkin_delay(host.id, now, self.config.checkin_interval),
            # The host moved: its libvirtd certificate no longer names the address we dial.
            renew=host.libvirt_cert_address not in (None, address),
            server_urls=[self.config.url, *self.other_replicas()], report_digest=host.report_digest,
            send_report=send_report, reconnect_window=self.reconnect_window,
            tunnel=self.tunnel_wanted(host))

    def public_detail(self, host: Host) -> str:
        """The status detail as the host itself may read it. Why the server cannot open
        libvirt on it (refused, not TLS, another CA, no answer) would tell a hostile host
        what listens on its address's ports: the operator reads that in `hosts show`."""
        conn = self.link_states.get(host.id)
        if conn is None or conn.state == LinkState.ONLINE or host.detail != conn.detail:
            return host.detail
        if conn.state == LinkState.CONNECTING:  # (an auto host's failed direct dial, say)
            return (f"the server is opening its libvirt connection to this host; the operator "
                    f"sees how it goes in `virtfleet-server hosts show {host.id}`")
        return (f"the server cannot open libvirt on this host; the operator sees why in "
                f"`virtfleet-server hosts show {host.id}`")

    def renew(self, host: Host, req: wire.RenewRequest, address: str) -> wire.Identity:
        if not self._renewals.allow(host.id):
            raise rate_limited(self._renewals, host.id, "renewals from this host")
        csr = self._csr(req.csr, "csr")
        libvirt_csr = self._csr(req.libvirt_csr, "libvirt_csr") if req.libvirt_csr else None
        identity, cert = self._issue(host.id, csr, libvirt_csr, address)
        columns: dict[str, Any] = {
            "cert_serial": f"{cert.serial_number:x}",
            "cert_not_after": pki.not_after(cert).timestamp(),
            "prev_cert_serial": host.cert_serial,
        }
        if identity.libvirt_certificate:
            lv = pki.load_cert(identity.libvirt_certificate)
            columns["libvirt_cert_serial"] = f"{lv.serial_number:x}"
            columns["libvirt_cert_not_after"] = pki.not_after(lv).timestamp()
            columns["libvirt_cert_address"] = address
            columns["prev_libvirt_cert_serial"] = host.libvirt_cert_serial
        self.store.update_host(host.id, **columns)
        if identity.libvirt_certificate:
            keep = tuple(s for s in (columns["libvirt_cert_serial"], host.libvirt_cert_serial) if s)
            self.store.revoke_libvirt_certs(host.id, keep, time.time())
        event(log, "certificate_renewed", "host %s: certificates renewed (identity until %s)",
              host.hostname, pki.not_after(cert).isoformat(timespec="seconds"), host_id=host.id)
        return identity

    # -- admin ----------------------------------------------------------------

    def set_admin_state(self, host: Host, admin_state: AdminState) -> None:
        self.store.update_host(host.id, admin_state=admin_state)
        log.info("host %s (%s) %s by an administrator", host.hostname, host.id, admin_state)
        self.links.host_changed(host.id)
        self.status.refresh(host.id)

    def set_role(self, host: Host, role: str) -> None:
        if role not in wire.ROLES:
            raise Refused(400, "bad_request", f"role {role!r} is not one of {', '.join(wire.ROLES)}")
        self.store.update_host(host.id, role_override=role)
        log.info("host %s (%s): role set to %s by an administrator", host.hostname, host.id, role)
        self.links.reconnect(host.id)
        self.status.refresh(host.id)

    def set_transport(self, host: Host, transport: str) -> None:
        check_transport(transport)
        self.store.update_host(host.id, transport=transport)
        log.info("host %s (%s): transport set to %s by an administrator", host.hostname, host.id,
                 transport)
        self.links.reconnect(host.id)
        self.status.refresh(host.id)

    def forget(self, host: Host) -> None:
        """Remove the host: its identity certificates are refused from now on (no host has
        them), its libvirtd certificates revoked, its connection closed."""
        self.store.forget_host(host.id, time.time())
        self.links.host_changed(host.id)
        log.warning("host %s (%s) forgotten by an administrator", host.hostname, host.id)


def check_transport(transport: str) -> None:
    if transport not in wire.TRANSPORTS:
        raise Refused(400, "bad_request", f"transport {transport!r} is not one of "
                                          f"{', '.join(wire.TRANSPORTS)}")


def identify(store: Store, serial: str | None) -> Host:
    """The host a verified client certificate (its serial) speaks for: a check-in's, a
    renewal's, a tunnel's."""
    if serial is None:
        raise Refused(401, "no_client_certificate",
                      "this call needs the host's client certificate (mTLS)")
    host = store.host_by_serial(serial)
    if host is None:
        event(log, "checkin_refused", "refused a client certificate (serial %s): no host has it "
              "(forgotten, or replaced by a renewal)", serial, level=logging.WARNING)
        raise Refused(403, "unknown_host",
                      "this host is not enrolled here (it was forgotten or its certificate "
                      "was replaced): join again with a new token")
    if host.prev_cert_serial == serial:
        return host
    if host.prev_cert_serial:
        # The renewed certificate is in use: the old one is retired for good.
        store.update_host(host.id, prev_cert_serial=None)
        host.prev_cert_serial = None
    return host


def retire_previous_libvirt_cert(store: Store, host_id: str, serial: str) -> None:
    """A link opened with this libvirtd certificate: once the renewed one is served, the
    one before it is accepted no more."""
    host = store.get_host(host_id)
    if host is None or not host.prev_libvirt_cert_serial or serial != host.libvirt_cert_serial:
        return
    store.update_host(host_id, prev_libvirt_cert_serial=None)
    store.revoke_libvirt_certs(host_id, (serial,), time.time())


def checkin_delay(host_id: str, now: float, interval: float) -> float:
    """How long a host waits before its next check-in: until its own moment in the interval
    (a fixed offset from its id), at least half an interval away, so at most 1.5
    intervals. Agents that arrived together (after a restart, a network outage) are
    spread evenly over the interval by their next check-in, instead of coming back
    together every interval: the restart storm of 10,000 hosts settled into waves that
    kept the server's p99 at hundreds of ms at a quarter of its CPU (bench/README.md)."""
    slot = zlib.crc32(host_id.encode()) / 2**32 * interval
    earliest = now + interval / 2
    return interval / 2 + (slot - earliest) % interval


def serial_of(peercert: dict[str, Any] | None) -> str | None:
    """Serial (lowercase hex) of a verified client certificate, as the store keeps it."""
    if not peercert or "serialNumber" not in peercert:
        return None
    return f"{int(peercert['serialNumber'], 16):x}"
