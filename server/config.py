"""Server settings: one dataclass, filled from the command line, with the defaults."""

from __future__ import annotations

import datetime as dt
import functools
import ipaddress
import socket
import tomllib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from server.store import DEFAULT_AUDIT_RETENTION

DEFAULT_STATE_DIR = Path("/var/lib/virtfleet-server")
DEFAULT_CONFIG_FILE = Path("/etc/virtfleet/server.toml")
CONFIG_KEYS = {"database"}
DEFAULT_PORT = 8443
DEFAULT_RUN_DIR = Path("/run/virtfleet-server")
DEFAULT_METRICS_LISTEN = ("127.0.0.1", 9464)  # Prometheus's registered port for exporters
DEFAULT_WEB_LISTEN = ("127.0.0.1", 8444)
DEFAULT_WEB_SESSION_IDLE = 12 * 3600.0


@dataclass
class ServerConfig:
    state_dir: Path = DEFAULT_STATE_DIR
    database: str = ""  # a postgresql:// URL shared by replicas; "": SQLite in state_dir
    listen_host: str = "0.0.0.0"
    listen_port: int = DEFAULT_PORT
    advertise_url: str = ""  # what join strings carry; derived from listen when empty
    checkin_interval: float = 10.0
    grace: float = 30.0  # no check-in for this long: offline
    identity_cert_lifetime: dt.timedelta = dt.timedelta(days=30)
    libvirt_cert_lifetime: dt.timedelta = dt.timedelta(days=30)
    enroll_rate: float = 20.0  # enrollments per second per source address (burst 2x)
    max_connections_per_address: int = 2048
    run_dir: Path = DEFAULT_RUN_DIR  # the gateway's and the engine API's sockets
    engine_group: str = "virtfleet-engine"  # who may use them
    metrics_listen: tuple[str, int] | None = DEFAULT_METRICS_LISTEN  # None: no metrics
    audit_retention: float = DEFAULT_AUDIT_RETENTION  # seconds an audit entry is kept
    web_listen: tuple[str, int] | None = DEFAULT_WEB_LISTEN  # None: no web page
    web_cert: Path | None = None  # HTTPS for the web page, with web_key
    web_key: Path | None = None
    web_url: str = ""  # where browsers reach the page; derived from web_listen when empty
    web_session_idle: float = DEFAULT_WEB_SESSION_IDLE

    @property
    def admin_socket(self) -> Path:
        return self.state_dir / "admin.sock"

    @functools.cached_property
    def url(self) -> str:
        """The join URL. Worked out once: by default it is this machine's name, and
        `getfqdn` asks the resolver (every check-in answer names the URL)."""
        if self.advertise_url:
            return self.advertise_url.rstrip("/")
        host = self.listen_host
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        if ":" in host:
            host = f"[{host}]"
        return f"https://{host}:{self.listen_port}"

    @functools.cached_property
    def web_base_url(self) -> str:
        """Where browsers reach the web page, as login URLs name it ("" when it is off)."""
        if self.web_listen is None:
            return ""
        if self.web_url:
            return self.web_url.rstrip("/")
        host, port = self.web_listen
        if host in ("0.0.0.0", "::", ""):
            host = socket.getfqdn()
        if ":" in host:
            host = f"[{host}]"
        return f"{'https' if self.web_cert else 'http'}://{host}:{port}"


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address) only ever means this machine."""
    if host.lower() in ("localhost", "localhost.localdomain") or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def unreachable_url_problem(config: ServerConfig) -> str:
    """Why join strings would be useless from other machines, or "": the URL names this
    machine's loopback while the server listens on a network (the machine's name can
    resolve to 127.0.0.1 in /etc/hosts, and then getfqdn says localhost)."""
    host = urlsplit(config.url).hostname or ""
    if not is_loopback(host) or is_loopback(config.listen_host):
        return ""
    return (f"the join URL would be {config.url}, which names this machine's loopback: "
            "hosts elsewhere cannot reach it. Set the URL they use, e.g. "
            f"--advertise-url https://{socket.gethostname()}.example.org:{config.listen_port}")


def web_problem(config: ServerConfig) -> str:
    """Why the web page cannot start as configured, or "". Plain HTTP only on loopback:
    elsewhere its session cookie and login URLs would cross the network in clear."""
    if config.web_listen is None:
        return ""
    if (config.web_cert is None) != (config.web_key is None):
        return "--web-cert and --web-key go together: give both for HTTPS, or neither"
    host, port = config.web_listen
    if config.web_cert is None and not is_loopback(host):
        return (f"--web-listen {host}:{port} is not a loopback address, and the web page "
                "serves plain HTTP only on loopback: give --web-cert and --web-key for HTTPS, "
                f"or listen on 127.0.0.1:{port} and reach it through an SSH tunnel")
    if config.web_url and urlsplit(config.web_url).scheme not in ("http", "https"):
        return f"--web-url {config.web_url!r}: give an http:// or https:// URL"
    return ""


def database_url(given: str | None, config_file: Path | None) -> str:
    """The database URL: `--database`, else the config file's, else "" (SQLite). A
    config file named with --config must exist; the default one may not."""
    if given is not None:
        return checked_database_url(given, "--database")
    path = config_file or DEFAULT_CONFIG_FILE
    try:
        settings = tomllib.loads(path.read_text())
    except FileNotFoundError:
        if config_file is not None:
            raise ValueError(f"--config {path}: no such file") from None
        return ""
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from None
    unknown = sorted(set(settings) - CONFIG_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown setting {', '.join(map(repr, unknown))} "
                         f"(known: {', '.join(sorted(CONFIG_KEYS))})")
    url = settings.get("database", "")
    if not isinstance(url, str):
        raise ValueError(f"{path}: database must be a string (a postgresql:// URL)")
    return checked_database_url(url, f"{path}: database") if url else ""


def checked_database_url(url: str, what: str) -> str:
    from server.store.postgres import check_url, redacted

    problem = check_url(url)
    if problem:
        raise ValueError(f"{what} {redacted(url) if url.startswith('postgres') else repr(url)}: "
                         f"{problem}")
    return url
