"""The server's libvirt client identity: the one certificate every host's libvirtd lets
in (`tls_allowed_dn_list`), and the TLS context that dials hosts with it."""

from __future__ import annotations

import datetime as dt
import ssl
from pathlib import Path

from cryptography.x509.oid import NameOID

from common import pki
from common.files import write_atomic
from server.ca import CertificateAuthority

CLIENT_CN = "virtfleet-server-libvirt-client"
CLIENT_DN = f"CN={CLIENT_CN}"
CLIENT_CERT_LIFETIME = dt.timedelta(days=365)
RENEW_BEFORE = dt.timedelta(days=30)


def ensure_client_identity(ca: CertificateAuthority, directory: Path) -> tuple[Path, Path]:
    """(key, certificate) files of the server's libvirt client identity, issued (again)
    when missing, from another CA, or a month from expiry."""
    key_path, cert_path = directory / "clientkey.pem", directory / "clientcert.pem"
    ca_path = directory / "cacert.pem"
    if cert_path.exists() and key_path.exists() and ca_path.exists() \
            and ca_path.read_text() == ca.cert_pem:
        cert = pki.load_cert(cert_path.read_bytes())
        if pki.not_after(cert) - dt.datetime.now(dt.UTC) > RENEW_BEFORE:
            return key_path, cert_path
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = pki.new_key()
    cert = ca.issue(key.public_key(), [(NameOID.COMMON_NAME, CLIENT_CN)],
                    lifetime=CLIENT_CERT_LIFETIME, client=True)
    write_atomic(key_path, pki.key_pem(key), mode=0o600)
    write_atomic(cert_path, pki.cert_pem(cert))
    write_atomic(ca_path, ca.cert_pem)
    return key_path, cert_path


def dial_context(ca: CertificateAuthority, key_path: Path, cert_path: Path) -> ssl.SSLContext:
    """TLS to hosts' libvirtd: present the client identity, trust only the libvirt CA.
    Host names are not checked by OpenSSL: the server checks that the certificate is the
    dialled host's own (direct.check_peer), which an address never proves."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cadata=ca.cert_pem)
    ctx.check_hostname = False
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_path, key_path)
    return ctx
