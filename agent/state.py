"""What the agent keeps on disk, in its state directory (0700):

    identity.pem    the host's private key and its certificate, in one file (0600) so a
                    renewal replaces both at once; the key is made here and never sent
    ca.crt          the server's identity CA (trusted because it matched the join pin)
    agent.json      host id, server URL, CA pin, role, hostname, enrollment time
    status.json     the last check-in and its result, for `virtfleet-agent status`
    agent.lock      held (flock) by the process acting for the host: `run`, or a `join`

Every file is written atomically: a crash leaves the old identity or the new one.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import fcntl
import json
import os
import ssl
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from common.files import write_atomic

BEGIN_CERT, END_CERT = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"


@dataclass
class Enrollment:
    host_id: str
    server_url: str
    ca_pin: str
    role: str
    enrolled_at: float
    # The name given at join (or set in agent.toml since), reported on every check-in.
    # "" in an agent.json from before it was kept: the machine's hostname.
    hostname: str = ""
    # server_url was chosen with `set-server`: the URLs the server names in its answers
    # do not move it (a new join clears it).
    server_url_by_hand: bool = False
    # Every URL the server's replicas answer at, as their last answer named them: where
    # the host checks in when its server stops answering.
    replica_urls: list[str] = field(default_factory=list)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Enrollment:
        """Fields this version does not know (a newer agent's, after a downgrade) are left
        out rather than refused."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


class State:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.identity = directory / "identity.pem"
        self.ca = directory / "ca.crt"
        self._agent = directory / "agent.json"
        self._status = directory / "status.json"

    def prepare(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.dir.chmod(0o700)

    def enrolled(self) -> Enrollment | None:
        if not (self._agent.exists() and self.identity.exists()):
            return None
        return Enrollment.from_json(json.loads(self._agent.read_text()))

    def save_enrollment(self, enrollment: Enrollment, key_pem: bytes, cert_pem: str,
                        ca_pem: str) -> None:
        """Identity and CA first, agent.json last: it is what marks the host enrolled."""
        self.save_identity(key_pem, cert_pem)
        write_atomic(self.ca, ca_pem)
        self.update_enrollment(enrollment)

    def update_enrollment(self, enrollment: Enrollment) -> None:
        write_atomic(self._agent, json.dumps(asdict(enrollment), indent=2) + "\n")

    def lock(self) -> AgentLock:
        return AgentLock(self.dir / "agent.lock")

    def save_identity(self, key_pem: bytes, cert_pem: str) -> None:
        write_atomic(self.identity, key_pem + cert_pem.encode(), mode=0o600)

    def identity_expiry(self) -> float:
        """When the identity certificate expires (Unix time)."""
        return cert_not_after(self.identity.read_bytes())

    def save_status(self, status: dict[str, Any]) -> None:
        write_atomic(self._status, json.dumps(status, indent=2) + "\n")

    def load_status(self) -> dict[str, Any]:
        try:
            return json.loads(self._status.read_text())  # type: ignore[no-any-return]
        except (FileNotFoundError, ValueError):
            return {}

    def client_context(self) -> ssl.SSLContext:
        return client_context(self.ca, self.identity)


class AgentLock:
    """STATE/agent.lock: one process at a time acts for the host (`run`, or a `join`), so a
    `join --force` cannot replace the identity under a running agent. An flock, which the
    kernel drops when its process dies however it dies: a stale file holds nothing. The
    file holds the holder's pid, for the messages."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, patience: float = 1.0) -> bool:
        """Take it (the state dir must exist); False if another process holds it. A
        moment's patience: `status` probing it holds it for a few microseconds."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + patience
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    return False
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None

    def holder(self) -> int | None:
        """The pid holding it, if any process does (0 if it has not written it yet).
        Read-only: it creates nothing."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.read(fd, 32).decode(errors="replace").strip()
                return int(text) if text.isdigit() else 0
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)


def client_context(ca: Path, identity: Path) -> ssl.SSLContext:
    """TLS to the server: trust only its CA, present the host's certificate (alone)."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(identity)
    send_own_certificate_only(ctx)
    return ctx


SSL_CTRL_MODE = 33
SSL_MODE_NO_AUTO_CHAIN = 0x8


def send_own_certificate_only(ctx: ssl.SSLContext) -> None:
    """Make OpenSSL send the host's certificate without the CA's.

    By default OpenSSL's client appends to its certificate every issuer it finds in its
    own trust store: here the identity CA, trusted to know the server. The server has
    that CA already, yet keeps a parsed copy of whatever a client sends for as long as the
    connection lives: 5.5 KB per kept-alive agent, 55 MB at 10,000 hosts
    (bench/README.md). SSL_MODE_NO_AUTO_CHAIN turns that off; Python's ssl module has no
    call for it, so it is set on the context's SSL_CTX, which a PySSLContext holds right
    after its object header, through the libssl the ssl module itself uses. Where that
    library cannot be reached the context stays as it is: it works, only heavier on the
    server.
    """
    try:
        ssl_ctx_ctrl = ctypes.CDLL(ssl._ssl.__file__).SSL_CTX_ctrl  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        return
    ssl_ctx_ctrl.restype = ctypes.c_long
    ssl_ctx_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
    ssl_ctx = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    ssl_ctx_ctrl(ssl_ctx, SSL_CTRL_MODE, SSL_MODE_NO_AUTO_CHAIN, None)


def cert_not_after(pem: bytes) -> float:
    """notAfter of the first certificate in `pem`, as a Unix time.

    Read from the DER by hand rather than with cryptography, whose import would be 4 MB of
    the agent's memory on every check-in. It only decides when to renew: whether a
    certificate is trusted is OpenSSL's call at every handshake.
    """
    start = pem.index(BEGIN_CERT)
    der = ssl.PEM_cert_to_DER_cert(pem[start:pem.index(END_CERT, start) + len(END_CERT)].decode())
    [(_tag, certificate)] = _der_items(der)
    (_tag, tbs), *_ = _der_items(certificate)
    fields = _der_items(tbs)
    if fields[0][0] == 0xA0:  # [0] version: present in v2 and v3 certificates
        fields = fields[1:]
    # TBSCertificate: serialNumber, signature, issuer, validity {notBefore, notAfter}, ...
    _not_before, (tag, when) = _der_items(fields[3][1])
    layout = "%y%m%d%H%M%SZ" if tag == 0x17 else "%Y%m%d%H%M%SZ"  # UTCTime, GeneralizedTime
    return dt.datetime.strptime(when.decode(), layout).replace(tzinfo=dt.UTC).timestamp()


def _der_items(data: bytes) -> list[tuple[int, bytes]]:
    """(tag, contents) of each DER element in `data`."""
    items, pos = [], 0
    while pos < len(data):
        tag, size, pos = data[pos], data[pos + 1], pos + 2
        if size & 0x80:  # long form: the next (size & 0x7f) bytes hold the length
            count = size & 0x7F
            size, pos = int.from_bytes(data[pos:pos + count], "big"), pos + count
        items.append((tag, data[pos:pos + size]))
        pos += size
    return items
