"""The server's own certificates and TLS contexts."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import socket
import ssl
from pathlib import Path
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.x509.oid import NameOID

from common import pki, tunnel
from common.files import write_atomic
from server.ca import CertificateAuthority, Names
from server.links.relays import ALPN as RELAY_ALPN
from server.links.relays import REPLICA_ORG

log = logging.getLogger(__name__)

SERVER_CERT_LIFETIME = dt.timedelta(days=365)
RENEW_BEFORE = dt.timedelta(days=30)
# asyncio's SSL transport gives every connection a read buffer of 256 KiB (zero-filled, so
# resident; common.tls.limit_tls_buffers): 10,000 agents keeping their check-in connection
# alive held 2.5 GB in them. A check-in is about 1.4 KB on the wire, read here in two
# calls (a bigger message in more); OpenSSL's input buffer for the connection grows no
# bigger than one read either. 16 -> 4 KiB saved 8 KB per connection, 4 -> 1 KiB 3 KB
# more, at no measurable CPU cost (bench/README.md).
TLS_READ_BUFFER = 1024


def server_names(url: str, listen_host: str) -> Names:
    """Names the HTTPS certificate covers: the advertised host, the listen address,
    this machine's names and loopback (so admin tools on the box work too)."""
    dns = {"localhost", socket.gethostname(), socket.getfqdn()}
    ips = {"127.0.0.1", "::1"}
    for host in (urlsplit(url).hostname or "", listen_host):
        if not host or host in ("0.0.0.0", "::"):
            continue
        try:
            ips.add(str(ipaddress.ip_address(host)))
        except ValueError:
            dns.add(host)
    return Names(dns=tuple(sorted(d for d in dns if d)), ips=tuple(sorted(ips)))


def ensure_server_cert(ca: CertificateAuthority, directory: Path, names: Names) -> tuple[Path, Path]:
    """Issue (or re-issue, when names changed or expiry nears) the HTTPS certificate."""
    key_path, cert_path = directory / "server.key", directory / "server.crt"
    if key_path.exists() and cert_path.exists():
        cert = pki.load_cert(cert_path.read_bytes())
        fresh = pki.not_after(cert) - dt.datetime.now(dt.UTC) > RENEW_BEFORE
        same_issuer = cert.issuer == ca.cert.subject
        if fresh and same_issuer and _names_of(cert) == names:
            return key_path, cert_path
    key = pki.new_key()
    cert = ca.issue(key.public_key(), [(NameOID.COMMON_NAME, "virtfleet-server")],
                    lifetime=SERVER_CERT_LIFETIME, server=True, names=names)
    write_atomic(key_path, pki.key_pem(key), mode=0o600)
    write_atomic(cert_path, pki.cert_pem(cert))
    log.info("issued HTTPS certificate for %s", ", ".join(names.dns + names.ips))
    return key_path, cert_path


def ensure_replica_cert(ca: CertificateAuthority, directory: Path, replica: str) -> tuple[Path, Path]:
    """This replica's client certificate for other replicas' relays: organisation
    REPLICA_ORG, which no host's certificate has. Re-issued when expiry nears."""
    key_path, cert_path = directory / "replica.key", directory / "replica.crt"
    subject = [(NameOID.ORGANIZATION_NAME, REPLICA_ORG), (NameOID.COMMON_NAME, replica)]
    if key_path.exists() and cert_path.exists():
        cert = pki.load_cert(cert_path.read_bytes())
        fresh = pki.not_after(cert) - dt.datetime.now(dt.UTC) > RENEW_BEFORE
        if fresh and cert.issuer == ca.cert.subject and cert.subject == x509.Name(
                [x509.NameAttribute(oid, value) for oid, value in subject]):
            return key_path, cert_path
    key = pki.new_key()
    cert = ca.issue(key.public_key(), subject, lifetime=SERVER_CERT_LIFETIME, client=True)
    write_atomic(key_path, pki.key_pem(key), mode=0o600)
    write_atomic(cert_path, pki.cert_pem(cert))
    return key_path, cert_path


def _names_of(cert: x509.Certificate) -> Names:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return Names()
    return Names(
        dns=tuple(sorted(san.get_values_for_type(x509.DNSName))),
        ips=tuple(sorted(str(i) for i in san.get_values_for_type(x509.IPAddress))),
    )


def server_context(key_path: Path, cert_path: Path, client_ca: CertificateAuthority) -> ssl.SSLContext:
    """TLS for the agent API: a client certificate is optional at the handshake (enrollment
    has none yet) and required by the check-in handler."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_path, key_path)
    ctx.load_verify_locations(cadata=client_ca.cert_pem)
    ctx.verify_mode = ssl.CERT_OPTIONAL
    # No TLS 1.3 session tickets: agents keep their connection and never resume a session,
    # and making two tickets (each sealing the client certificate) was a quarter of a
    # handshake's cost: 315 -> 376 handshakes/s at full load (bench/README.md).
    ctx.num_tickets = 0
    # An agent asks for a tunnel (common/tunnel.py) by ALPN, another replica for a relay
    # (server/links/relays.py); everything else is HTTP/1.1.
    ctx.set_alpn_protocols([tunnel.ALPN, RELAY_ALPN, "http/1.1"])
    return ctx
