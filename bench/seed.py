"""Seed N enrolled hosts into a server's state dir, through the server's own code.

Enrolling 10,000 hosts over HTTP would take minutes; this calls the same
`Fleet.enroll()` the HTTP handler calls (token check, CSR check, certificate issue,
store transaction), in-process, before the server starts. Each simulated host gets its
own key and identity certificate, written as one PEM (key + certificate) per host,
exactly like the agent's `identity.pem`.

The simulated hosts run the agent with `configure_tls = false` (no libvirtd TLS
endpoint): the server keeps one idle connection task per host and does not try to
dial 10,000 libvirtds that do not exist.
"""

from __future__ import annotations

import logging
from pathlib import Path

from common import pki, wire
from server.config import ServerConfig
from server.main import build

ADDRESS = "127.0.0.1"  # where the load generator checks in from


def seed_hosts(state_dir: Path, identities: Path, count: int, report: wire.Report,
               transport: str = "auto", enable: bool = True, database: str = "") -> None:
    """Enroll `count` hosts; write identities/ca.crt and identities/N.pem for each.
    `database`: a PostgreSQL URL (`init` made its keys) instead of SQLite in state_dir."""
    logging.getLogger("server").setLevel(logging.WARNING)  # 10,000 "enrolled" lines is noise
    identities.mkdir(parents=True, exist_ok=True)
    parts = build(ServerConfig(state_dir=state_dir, database=database))
    fleet = parts.fleet
    try:
        token = fleet.create_token("mixed", ttl=3600, uses=count, auto_enable=enable,
                                   description="bench seed", transport=transport).token
        (identities / "ca.crt").write_text(fleet.identity_ca.cert_pem)
        for i in range(count):
            key = pki.new_key()
            host_report = wire.Report(**{**vars(report), "hostname": f"sim-{i:05d}"})
            answer = fleet.enroll(wire.EnrollRequest(token=token, csr=pki.make_csr(key, f"sim-{i}"),
                                                     report=host_report), ADDRESS)
            (identities / f"{i}.pem").write_bytes(pki.key_pem(key) + answer.identity.certificate.encode())
    finally:
        parts.close()
