"""Server settings: one dataclass, filled from the command line, with the defaults."""

from __future__ import annotations

import datetime as dt
import socket
from dataclasses import dataclass
from pathlib import Path

DEFAULT_STATE_DIR = Path("/var/lib/virtfleet-server")
DEFAULT_PORT = 8443


@dataclass
class ServerConfig:
    state_dir: Path = DEFAULT_STATE_DIR
    listen_host: str = "0.0.0.0"
    listen_port: int = DEFAULT_PORT
    advertise_url: str = ""  # what join strings carry; derived from listen when empty
    checkin_interval: float = 10.0
    grace: float = 30.0  # no check-in for this long: offline
    identity_cert_lifetime: dt.timedelta = dt.timedelta(days=30)
    libvirt_cert_lifetime: dt.timedelta = dt.timedelta(days=30)
    enroll_rate: float = 20.0  # enrollments per second per source address (burst 2x)

    @property
    def admin_socket(self) -> Path:
        return self.state_dir / "admin.sock"

    @property
    def url(self) -> str:
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = self.listen_host
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        if ":" in host:
            host = f"[{host}]"
        return f"https://{host}:{self.listen_port}"
