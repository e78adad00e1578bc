"""The server's certificate authorities.

Two CAs, each in its own folder under the state dir:
- `identity`: signs the server's HTTPS certificate and every agent's identity (mTLS
  client) certificate. Its public-key pin is what a join string carries.
- `libvirt`: signs each host's libvirtd server certificate and the server's own libvirt
  client certificate. libvirtd trusts only this CA, so no agent identity certificate
  can open any libvirtd.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InternalError, InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common import pki, wire
from common.files import write_atomic

log = logging.getLogger(__name__)

CA_LIFETIME = dt.timedelta(days=3650)
ORGANIZATION = "virtfleet"


class CSRError(ValueError):
    """A certificate request the server will not sign; the message says why."""


# The NIST curves every TLS stack speaks; OpenSSL also parses weak and exotic ones.
EC_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)


def parse_csr(pem: str, what: str = "csr") -> x509.CertificateSigningRequest:
    try:
        csr = x509.load_pem_x509_csr(pem.encode())
    except (ValueError, x509.InvalidVersion):  # InvalidVersion is no ValueError
        raise CSRError(f"{what}: not a PEM certificate signing request") from None
    try:
        key = csr.public_key()
    except (UnsupportedAlgorithm, ValueError):  # SM2, secp112r1, explicit curve parameters ...
        raise CSRError(f"{what}: its key type or curve is not accepted (use ECDSA P-256)") from None
    if isinstance(key, rsa.RSAPublicKey) and key.key_size < 2048:
        raise CSRError(f"{what}: RSA keys must have at least 2048 bits")
    if isinstance(key, ec.EllipticCurvePublicKey) and not isinstance(key.curve, EC_CURVES):
        raise CSRError(f"{what}: elliptic curve {key.curve.name} is not accepted (use P-256)")
    if not isinstance(key, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey, rsa.RSAPublicKey)):
        raise CSRError(f"{what}: key type {type(key).__name__} is not accepted")
    try:
        valid = csr.is_signature_valid
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, InternalError):
        valid = False  # InternalError: OpenSSL re-parses the request and refuses what Rust took
    if not valid:
        raise CSRError(f"{what}: its signature does not match its public key")
    return csr


@dataclass(frozen=True)
class Names:
    """The names a certificate is valid for (subjectAltName)."""

    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()

    def extension(self) -> x509.SubjectAlternativeName:
        general: list[x509.GeneralName] = [x509.DNSName(d) for d in self.dns]
        general += [x509.IPAddress(ipaddress.ip_address(i)) for i in self.ips]
        return x509.SubjectAlternativeName(general)


def host_dns_name(host_id: str) -> str:
    """The name only this host's libvirtd certificates carry: the server checks it on
    every connection (links/direct.py)."""
    return f"{host_id}.hosts.virtfleet"


def libvirt_names(host_id: str, address: str) -> Names:
    """Names a host's libvirtd certificate is valid for: the host's own name and the
    address the server sees the host at. Never a name the host asks for."""
    return Names(dns=(host_dns_name(host_id),), ips=(address,) if address else ())


class CertificateAuthority:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert
        self.cert_pem = pki.cert_pem(cert)

    @classmethod
    def load_or_create(cls, directory: Path, common_name: str) -> CertificateAuthority:
        """The CA kept in `directory` (ca.key, ca.crt), made there first if need be."""
        key_path, cert_path = directory / "ca.key", directory / "ca.crt"
        if key_path.exists() and cert_path.exists():
            return cls(pki.load_key(key_path.read_bytes()), pki.load_cert(cert_path.read_bytes()))
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca = cls.new(common_name)
        write_atomic(key_path, pki.key_pem(ca.key), mode=0o600)
        write_atomic(cert_path, ca.cert_pem)
        log.info("created certificate authority %r in %s", common_name, directory)
        return ca

    @classmethod
    def new(cls, common_name: str) -> CertificateAuthority:
        key = pki.new_key()
        name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ])
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
            .sign(key, hashes.SHA256())
        )
        return cls(key, cert)

    @classmethod
    def from_pem(cls, pem: bytes) -> CertificateAuthority:
        """From `to_pem`'s key and certificate (the database keeps them so)."""
        return cls(pki.load_key(pem), pki.load_cert(pem))

    def to_pem(self) -> bytes:
        return pki.key_pem(self.key) + self.cert_pem.encode()

    @property
    def pin(self) -> str:
        return wire.ca_pin(self.cert.public_key())

    def issue(
        self,
        public_key: object,
        subject: Iterable[tuple[x509.ObjectIdentifier, str]],
        *,
        lifetime: dt.timedelta,
        client: bool = False,
        server: bool = False,
        names: Names = Names(),
    ) -> x509.Certificate:
        """Sign a leaf certificate. Backdated a few minutes so a host whose clock runs a
        little behind still accepts it."""
        now = dt.datetime.now(dt.UTC)
        usages = ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else []) + (
            [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        )
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(oid, v) for oid, v in subject]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(int.from_bytes(secrets.token_bytes(16), "big") >> 1)
            .not_valid_before(now - dt.timedelta(minutes=10))
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, True, False, False, False, False, False, False),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), False
            )
        )
        if names.dns or names.ips:
            builder = builder.add_extension(names.extension(), critical=False)
        return builder.sign(self.key, hashes.SHA256())
