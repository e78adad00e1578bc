"""Agent settings: /etc/virtfleet/agent.toml, overridden by command-line flags.

Unknown keys and bad values are refused with the key named: a typo in a config file
should stop the agent loudly, not be ignored.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from common import wire
from common.files import write_atomic

DEFAULT_CONFIG = Path("/etc/virtfleet/agent.toml")
DEFAULT_STATE_DIR = Path("/var/lib/virtfleet-agent")


class ConfigError(ValueError):
    pass


@dataclass
class LibvirtConfig:
    uri: str = "qemu:///system"
    admin_uri: str = "libvirtd:///system"  # for reloading renewed TLS files (virt-admin)
    # The TLS listener the server connects to, and where libvirtd reads its TLS files.
    configure_tls: bool = True
    tls_port: int = 16514
    conf: Path = Path("/etc/libvirt/libvirtd.conf")
    ca_file: Path = Path("/etc/pki/CA/cacert.pem")
    cert_file: Path = Path("/etc/pki/libvirt/servercert.pem")
    key_file: Path = Path("/etc/pki/libvirt/private/serverkey.pem")
    # Run after the TLS set-up changed, where systemd does not run libvirtd.
    restart_command: str = ""
    # libvirtd's read-write socket: what a tunnel's streams are bridged to, and nothing else.
    socket: Path = Path("/run/libvirt/libvirt-sock")


@dataclass
class FactsConfig:
    # Filesystems whose size and free space the agent reports (what an engine places
    # disks on, e.g. /isard): the storage collector's `paths`.
    storage_paths: list[Path] = field(default_factory=list)


@dataclass
class AgentConfig:
    state_dir: Path = DEFAULT_STATE_DIR
    # "" is "none given": `join` takes the token's role, later runs the role joined with.
    role: str = ""
    hostname: str = field(default_factory=socket.gethostname)
    join: str = ""  # for unattended installs: enroll with this on first start
    log_level: str = "INFO"
    libvirt: LibvirtConfig = field(default_factory=LibvirtConfig)
    facts: FactsConfig = field(default_factory=FactsConfig)
    # Not settings: where the file was, and what it (or a flag) set on purpose. A role or
    # hostname given wins over the one the host joined with; one not given does not.
    role_from_file: bool = False
    hostname_given: bool = False
    path: Path | None = None

    def validate(self) -> None:
        if self.role and self.role not in wire.ROLES:
            raise ConfigError(f"role {self.role!r} is not one of {', '.join(wire.ROLES)}")
        if not 0 < self.libvirt.tls_port < 65536:
            raise ConfigError(f"libvirt.tls_port {self.libvirt.tls_port} is not a port number")
        if not self.hostname or len(self.hostname) > wire.MAX_TEXT:
            raise ConfigError("hostname must be 1-256 characters")


def load(path: Path | None) -> AgentConfig:
    """Read the config file (a missing default file is fine: defaults apply)."""
    config = AgentConfig()
    if path is None:
        return config
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        if path == DEFAULT_CONFIG:
            return config
        raise ConfigError(f"{path}: no such file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except PermissionError:
        raise ConfigError(f"{path}: permission denied") from None
    libvirt = data.pop("libvirt", {})
    facts = data.pop("facts", {})
    _apply(config, data, path, "")
    if not isinstance(libvirt, dict):
        raise ConfigError(f"{path}: [libvirt] must be a table")
    _apply(config.libvirt, libvirt, path, "libvirt.")
    if not isinstance(facts, dict):
        raise ConfigError(f"{path}: [facts] must be a table")
    _apply(config.facts, facts, path, "facts.")
    config.role_from_file = bool(config.role)  # role = "" is none given, as no line
    config.hostname_given = "hostname" in data
    config.path = path
    config.validate()
    return config


def _apply(target: Any, data: dict[str, Any], path: Path, prefix: str) -> None:
    known = {f.name: f for f in fields(target)
             if f.name not in ("libvirt", "facts", "role_from_file", "hostname_given", "path")}
    for key, value in data.items():
        if key not in known:
            raise ConfigError(f"{path}: unknown setting {prefix}{key!r} "
                              f"(known: {', '.join(sorted(known))})")
        current = getattr(target, key)
        if isinstance(current, Path):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{path}: {prefix}{key} must be a path")
            value = Path(value)
        elif isinstance(current, list):  # only lists of paths so far
            if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"{path}: {prefix}{key} must be a list of paths")
            value = [Path(v) for v in value]
        elif type(value) is not type(current):
            raise ConfigError(f"{path}: {prefix}{key} must be a {type(current).__name__}")
        setattr(target, key, value)


def forget_join(path: Path) -> bool:
    """After an unattended join, take the join string out of the config file: a spent
    token has no business lying around. Returns whether the file changed."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return False
    new = re.sub(r"^(\s*)join\s*=.*$", r"\1# join = (used to enroll this host; removed by virtfleet-agent)",
                 text, flags=re.M)
    if new == text:
        return False
    write_atomic(path, new, mode=path.stat().st_mode & 0o777)
    return True


def env_state_dir() -> Path | None:
    value = os.environ.get("VIRTFLEET_AGENT_STATE_DIR")
    return Path(value) if value else None
