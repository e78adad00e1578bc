"""Dial a host's libvirtd over TLS, and make sure the one answering is that host.

libvirt's own TLS client would accept any certificate of the libvirt CA that names the
dialled address, so a host checking in from another's address (NAT, a reused DHCP
lease, a spoofed neighbour) could be handed the other's libvirtd. Here the server
checks the certificate itself: it must carry the host's own name
(`HOSTID.hosts.virtfleet`, which only that host's certificates have) and be one the
server currently accepts for it (the current one, or the previous one until the
renewed one is first served). Every step has a deadline: a port that accepts and never
answers costs a timer, not a thread.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass

from cryptography import x509

from server.ca import host_dns_name

DEFAULT_TLS_PORT = 16514
HANDSHAKE_TIMEOUT = 10.0  # TCP connect, TLS handshake and libvirtd's verdict on us
READ_LIMIT = 256 * 1024  # bytes a relayed direction buffers before it stops reading


class DialError(Exception):
    """The host's libvirtd cannot be reached; the message says why, for the operator."""


@dataclass(frozen=True)
class Target:
    """Where a host's libvirtd is and what it must prove."""

    host_id: str
    address: str
    port: int
    serials: tuple[str, ...]  # libvirtd certificates the server accepts from it
    tunnel: bool = False  # reached through the tunnel the host's agent keeps open

    @property
    def where(self) -> str:
        if self.tunnel:
            return "the host's tunnel"
        return f"[{self.address}]:{self.port}" if ":" in self.address else f"{self.address}:{self.port}"

    @property
    def uri(self) -> str:
        """What the operator is shown as the connection's address."""
        return "qemu+unix:///system through the host's tunnel" if self.tunnel \
            else f"qemu+tls://{self.where}/system"


Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


async def dial(target: Target, ctx: ssl.SSLContext,
               timeout: float = HANDSHAKE_TIMEOUT) -> tuple[Stream, str]:
    """An open TLS stream to the host's libvirtd, past libvirtd's check of our
    certificate, and the serial of the certificate it served."""
    try:
        return await asyncio.wait_for(_dial(target, ctx), timeout)
    except TimeoutError:
        raise DialError(f"no answer from libvirtd at {target.where} within {timeout:g} s: "
                        "is the host reachable from the server?") from None


async def _dial(target: Target, ctx: ssl.SSLContext) -> tuple[Stream, str]:
    try:
        reader, writer = await asyncio.open_connection(target.address, target.port, ssl=ctx,
                                                       server_hostname=None, limit=READ_LIMIT)
    except ConnectionRefusedError:
        raise DialError(f"libvirtd is not listening for TLS at {target.where} (connection "
                        "refused): is libvirtd running with its TLS listener?") from None
    except ssl.SSLError as exc:
        raise DialError(f"TLS refused between the server and libvirtd at {target.where}: "
                        f"{exc.reason or exc}") from None
    except OSError as exc:
        raise DialError(f"cannot reach {target.where}: {exc.strerror or exc}") from None
    try:
        serial = check_peer(writer.get_extra_info("ssl_object"), target)
        verdict = await reader.read(1)
    except BaseException:
        writer.close()
        raise
    if verdict != b"\x01":
        writer.close()
        raise DialError(f"TLS refused between the server and libvirtd at {target.where}: libvirtd "
                        "did not accept the server's client certificate (tls_allowed_dn_list, "
                        "or its CA file, changed on the host?)")
    return (reader, writer), serial


def check_peer(ssl_object: ssl.SSLObject | None, target: Target) -> str:
    """The serial of the host's certificate, if it is one the server accepts from this host."""
    der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
    if not der:
        raise DialError(f"TLS refused between the server and libvirtd at {target.where}: "
                        "it presented no certificate")
    cert = x509.load_der_x509_certificate(der)
    serial = f"{cert.serial_number:x}"
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = names.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    if host_dns_name(target.host_id) not in dns:
        raise DialError(f"TLS refused between the server and libvirtd at {target.where}: it "
                        f"presented another host's libvirtd certificate (names {', '.join(dns) or 'none'}):"
                        " another machine answers at this host's address")
    if serial not in target.serials:
        raise DialError(f"TLS refused between the server and libvirtd at {target.where}: it "
                        f"presented a retired libvirtd certificate of this host (serial {serial}); "
                        "the agent installs its current one at its next check-in")
    return serial
