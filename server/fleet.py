"""The server's parts and what it does with a host: enroll, check in, renew, admin.

`Fleet` holds the store, the CAs, the token signer, the status keeper and the libvirt
connection manager. The HTTP layers (`app.py` for agents, `admin.py` for operators)
only parse, call one method here and render the answer.
"""

from __future__ import annotations

import datetime as dt
import logging
import secrets
import time
import zlib
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from common import pki, wire
from common.logs import event
from server import ca as ca_mod
from server.ca import CertificateAuthority, Names
from server.config import ServerConfig
from server.connections import ConnectionManager
from server.hosts import HostStatus
from server.store import Host, Store, StoreError, Token
from server.tokens import TokenError, TokenSigner, load_or_create_signing_key

log = logging.getLogger(__name__)

HOST_ORG = "virtfleet-host"
LIBVIRT_CLIENT_CN = "virtfleet-server libvirt client"


class Refused(Exception):
    """A request the server understood and will not carry out: (HTTP status, code, reason),
    with any headers the refusal needs (Retry-After)."""

    def __init__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = headers or {}


@dataclass
class CreatedToken:
    token: str
    join: str
    record: Token


class Fleet:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        state = config.state_dir
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        state.chmod(0o700)
        self.identity_ca = CertificateAuthority.load_or_create(state / "identity", "virtfleet identity CA")
        self.libvirt_ca = CertificateAuthority.load_or_create(state / "libvirt", "virtfleet libvirt CA")
        self.signer = TokenSigner(load_or_create_signing_key(state / "token-signing.key"))
        self.store = Store(state / "state.db")
        self.connections = ConnectionManager(self)
        self.status = HostStatus(self.store, config.grace, self.connections.state_of)

    def close(self) -> None:
        self.store.close()

    # -- tokens --------------------------------------------------------------

    def create_token(self, role: str, ttl: float, uses: int, auto_enable: bool,
                     description: str) -> CreatedToken:
        token, claims = self.signer.create(role, dt.timedelta(seconds=ttl), auto_enable)
        record = Token(jti=claims.jti, role=role, auto_enable=auto_enable, max_uses=uses, uses=0,
                       created_at=time.time(), expires_at=claims.expires_at, revoked_at=None,
                       description=description)
        self.store.add_token(record)
        join = wire.JoinString(url=self.config.url, ca_pin=self.identity_ca.pin, token=token)
        log.info("created join token %s (role %s, %d use(s), expires %s)", claims.jti, role, uses,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(claims.expires_at)))
        return CreatedToken(token=token, join=join.encode(), record=record)

    # -- enrollment ----------------------------------------------------------

    def enroll(self, req: wire.EnrollRequest, address: str) -> wire.EnrollResponse:
        try:
            claims = self.signer.verify(req.token)
        except TokenError as exc:
            raise Refused(403, "token_refused", str(exc)) from None
        role = req.report.role
        if not wire.role_within(role, claims.role):
            raise Refused(403, "role_refused",
                          f"role {role!r} is beyond what this join token allows ({claims.role!r})")
        csr = self._csr(req.csr, "csr")
        libvirt_csr = self._csr(req.libvirt_csr, "libvirt_csr") if req.libvirt_csr else None
        host_id = secrets.token_hex(6)
        identity, cert = self._issue(host_id, csr, libvirt_csr, address)
        now = time.time()
        admin_state = "enabled" if claims.auto_enable else "pending"
        host = Host(
            id=host_id, hostname=req.report.hostname, admin_state=admin_state,
            configured_role=role, role_override=None, role_limit=claims.role,
            status="connecting" if claims.auto_enable else "pending",
            detail=f"enrolled with join token {claims.jti} from {address}",
            status_since=now, enrolled_at=now, last_checkin=now, address=address,
            agent_version=req.report.agent_version, report=wire.to_json(req.report),
            token_jti=claims.jti, cert_serial=f"{cert.serial_number:x}",
            cert_not_after=pki.not_after(cert).timestamp(),
        )
        if identity.libvirt_certificate:
            lv = pki.load_cert(identity.libvirt_certificate)
            host.libvirt_cert_serial = f"{lv.serial_number:x}"
            host.libvirt_cert_not_after = pki.not_after(lv).timestamp()
            host.libvirt_cert_address = address
        try:
            self.store.enroll(host, now)
        except StoreError as exc:
            raise Refused(403, "token_refused", str(exc)) from None
        event(log, "enrolled", "host %s enrolled as %s from %s (role %s, token %s)",
              req.report.hostname, host_id, address, role, claims.jti, host_id=host_id)
        self.status.refresh(host_id)
        self.connections.host_changed(host_id)
        return wire.EnrollResponse(host_id=host_id, identity=identity,
                                   checkin_interval=self.config.checkin_interval)

    def _csr(self, pem: str, what: str) -> x509.CertificateSigningRequest:
        try:
            return ca_mod.parse_csr(pem, what)
        except ca_mod.CSRError as exc:
            raise Refused(400, "bad_csr", str(exc)) from None

    def _issue(self, host_id: str, csr: x509.CertificateSigningRequest,
               libvirt_csr: x509.CertificateSigningRequest | None,
               address: str) -> tuple[wire.Identity, x509.Certificate]:
        cert = self.identity_ca.issue(
            csr.public_key(), [(NameOID.ORGANIZATION_NAME, HOST_ORG), (NameOID.COMMON_NAME, host_id)],
            lifetime=self.config.identity_cert_lifetime, client=True)
        identity = wire.Identity(certificate=pki.cert_pem(cert),
                                 ca_certificate=self.identity_ca.cert_pem)
        if libvirt_csr is not None:
            lv = self.libvirt_ca.issue(
                libvirt_csr.public_key(),
                [(NameOID.ORGANIZATION_NAME, HOST_ORG), (NameOID.COMMON_NAME, host_id)],
                lifetime=self.config.libvirt_cert_lifetime, server=True,
                names=libvirt_names(host_id, address))
            identity.libvirt_certificate = pki.cert_pem(lv)
            identity.libvirt_ca_certificate = self.libvirt_ca.cert_pem
            identity.libvirt_client_dn = self.connections.client_dn
        return identity, cert

    # -- check-in and renewal -------------------------------------------------

    def host_for_certificate(self, serial: str | None) -> Host:
        """The host a verified client certificate speaks for; never from the body."""
        if serial is None:
            raise Refused(401, "no_client_certificate",
                          "this call needs the host's client certificate (mTLS)")
        host = self.store.host_by_serial(serial)
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
            self.store.update_host(host.id, prev_cert_serial=None)
            host.prev_cert_serial = None
        return host

    def checkin(self, host: Host, req: wire.CheckinRequest, address: str) -> wire.CheckinResponse:
        if not wire.role_within(req.report.role, host.role_limit):
            raise Refused(403, "role_refused",
                          f"role {req.report.role!r} is beyond what this host's join token allows "
                          f"({host.role_limit!r}): set a role within it in agent.toml")
        was_ok = bool((host.report.get("libvirtd") or {}).get("ok"))
        self.store.record_checkin(host, wire.to_json(req.report), address, time.time())
        if req.report.libvirtd.ok != was_ok:
            name = "libvirtd_up" if req.report.libvirtd.ok else "libvirtd_down"
            event(log, name, "host %s: agent reports libvirtd %s%s", host.hostname,
                  "up" if req.report.libvirtd.ok else "down",
                  "" if req.report.libvirtd.ok else f": {req.report.libvirtd.error}",
                  host_id=host.id, reason=req.report.libvirtd.error)
        # `host` is current (record_checkin carried the report into it): no re-reads.
        self.status.refresh_host(host)
        self.connections.host_changed(host.id, libvirtd_recovered=req.report.libvirtd.ok and not was_ok,
                                      host=host)
        return wire.CheckinResponse(
            host_id=host.id, status=host.status, detail=host.detail,
            enabled=host.admin_state == "enabled", role=host.role,
            checkin_interval=checkin_delay(host.id, time.time(), self.config.checkin_interval),
            # The host moved: its libvirtd certificate no longer names the address we dial.
            renew=host.libvirt_cert_address not in (None, address),
        )

    def renew(self, host: Host, req: wire.RenewRequest, address: str) -> wire.Identity:
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
        self.store.update_host(host.id, **columns)
        event(log, "certificate_renewed", "host %s: certificates renewed (identity until %s)",
              host.hostname, pki.not_after(cert).isoformat(timespec="seconds"), host_id=host.id)
        return identity

    # -- admin ----------------------------------------------------------------

    def set_admin_state(self, host: Host, admin_state: str) -> None:
        self.store.update_host(host.id, admin_state=admin_state)
        log.info("host %s (%s) %s by an administrator", host.hostname, host.id, admin_state)
        self.connections.host_changed(host.id)
        self.status.refresh(host.id)

    def set_role(self, host: Host, role: str) -> None:
        if role not in wire.ROLES:
            raise Refused(400, "bad_request", f"role {role!r} is not one of {', '.join(wire.ROLES)}")
        self.store.update_host(host.id, role_override=role)
        log.info("host %s (%s): role set to %s by an administrator", host.hostname, host.id, role)
        self.connections.reconnect(host.id)
        self.status.refresh(host.id)

    def forget(self, host: Host) -> None:
        """Remove the host: its identity certificates are refused from now on (no host has
        them), its libvirtd certificates revoked, its connection closed."""
        self.store.forget_host(host.id, time.time())
        self.connections.publish_revocations()
        self.connections.host_changed(host.id)
        log.warning("host %s (%s) forgotten by an administrator", host.hostname, host.id)


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


def libvirt_names(host_id: str, address: str) -> Names:
    """Names a host's libvirtd certificate is valid for: the address the server sees the
    host at (the one it will dial) and a name derived from the host id. Never a name the
    host asks for: a host cannot obtain a certificate for another host's address."""
    return Names(dns=(f"{host_id}.hosts.virtfleet",), ips=(address,) if address else ())


def serial_of(peercert: dict[str, Any] | None) -> str | None:
    """Serial (lowercase hex) of a verified client certificate, as the store keeps it."""
    if not peercert or "serialNumber" not in peercert:
        return None
    return f"{int(peercert['serialNumber'], 16):x}"

