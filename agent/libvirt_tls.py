"""libvirtd's TLS listener on the host, set up with the certificates the server signed.

Writes the libvirt CA, the host's libvirtd certificate and key where libvirtd reads
them, and a marked block in libvirtd.conf that names those files, turns the TLS
listener on, and lets in only the server's libvirt client identity
(`tls_allowed_dn_list`). A file this agent did not write is never overwritten: the set-up
stops and says which file and how to proceed. Then libvirtd is made to pick it up:
`libvirtd-tls.socket` where systemd runs libvirtd, the configured restart command
otherwise.

What was set up is kept in a ledger in the state dir, in lines plain shell can read,
so `apt purge virtfleet-agent` undoes it (debian/virtfleet-agent.postrm) after the
agent's code is gone:
    file SHA256 PATH    a file we wrote, as we wrote it (a changed file is not ours)
    conf PATH           the libvirtd.conf holding our block
    unit NAME           a systemd unit we enabled
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import LibvirtConfig
from common.files import write_atomic

log = logging.getLogger(__name__)

BEGIN = "# BEGIN virtfleet (managed by virtfleet-agent: do not edit this block)"
END = "# END virtfleet"
MANAGED_KEYS = ("listen_tls", "tls_port", "key_file", "cert_file", "ca_file", "tls_allowed_dn_list")


class TLSSetupError(Exception):
    pass


@dataclass
class Ledger:
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256 as written
    conf: str | None = None
    units: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Ledger:
        ledger = cls()
        for line in text.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "file":
                digest, _, path = rest.partition(" ")
                ledger.files[path] = digest
            elif kind == "conf":
                ledger.conf = rest
            elif kind == "unit" and rest not in ledger.units:
                ledger.units.append(rest)
        return ledger

    def render(self) -> str:
        lines = ["# What virtfleet-agent set up for libvirtd's TLS listener; purging the",
                 "# virtfleet-agent package undoes it. Written by the agent: do not edit."]
        lines += [f"file {digest} {path}" for path, digest in self.files.items()]
        lines += [f"conf {self.conf}"] if self.conf else []
        lines += [f"unit {unit}" for unit in self.units]
        return "\n".join(lines) + "\n"


class LibvirtTLS:
    def __init__(self, config: LibvirtConfig, state_dir: Path | None = None) -> None:
        self.config = config
        # sha256 of every file we wrote, to tell ours from the admin's
        self._ledger = (state_dir or Path("/nonexistent")) / "libvirt-tls.ledger"

    def configured(self) -> bool:
        """Whether libvirtd's TLS listener is set up by us (so the server can dial it)."""
        c = self.config
        try:
            return (c.configure_tls and BEGIN in c.conf.read_text()
                    and c.cert_file.exists() and c.key_file.exists())
        except OSError:
            return False

    def preflight(self) -> None:
        """Refuse before enrolling (and spending the token) if the set-up cannot succeed."""
        ledger = self._load_ledger()
        for path in (self.config.key_file, self.config.cert_file, self.config.ca_file):
            if path.exists() and ledger.files.get(str(path)) != _digest(path.read_bytes()):
                raise TLSSetupError(self._not_ours(path))
        self._conf_without_block()

    def install(self, key_pem: bytes, cert_pem: str, ca_pem: str, client_dn: str) -> bool:
        """Write files and config; True when anything changed (libvirtd must reload)."""
        c = self.config
        changed = self._write(c.key_file, key_pem, 0o600)
        changed |= self._write(c.cert_file, cert_pem.encode(), 0o644)
        changed |= self._write(c.ca_file, ca_pem.encode(), 0o644)
        changed |= self._write_conf(client_dn)
        return changed

    def _write(self, path: Path, data: bytes, mode: int) -> bool:
        ledger = self._load_ledger()
        if path.exists():
            current = path.read_bytes()
            if current == data:
                return False
            if ledger.files.get(str(path)) != _digest(current):
                raise TLSSetupError(self._not_ours(path))
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data, mode=mode)
        ledger.files[str(path)] = _digest(data)
        self._save_ledger(ledger)
        return True

    def _not_ours(self, path: Path) -> str:
        return (f"{path} exists and was not written by virtfleet-agent: refusing to overwrite "
                f"it. Move it aside, or point libvirt.{_setting_for(self.config, path)} in "
                "/etc/virtfleet/agent.toml at another path.")

    def _conf_without_block(self) -> tuple[str, str]:
        """libvirtd.conf as it is, and without our block; refuses if it sets our keys."""
        c = self.config
        text = c.conf.read_text() if c.conf.exists() else ""
        outside = _strip_block(text)
        clash = [k for k in MANAGED_KEYS if re.search(rf"^\s*{k}\s*=", outside, re.M)]
        if clash:
            raise TLSSetupError(
                f"{c.conf} already sets {', '.join(clash)} outside virtfleet's block: comment "
                "those lines out so virtfleet can manage libvirtd's TLS listener.")
        return text, outside

    def _write_conf(self, client_dn: str) -> bool:
        c = self.config
        text, outside = self._conf_without_block()
        block = "\n".join([
            BEGIN,
            "listen_tls = 1",
            f"tls_port = \"{c.tls_port}\"",
            f"key_file = \"{c.key_file}\"",
            f"cert_file = \"{c.cert_file}\"",
            f"ca_file = \"{c.ca_file}\"",
            f"tls_allowed_dn_list = [\"{client_dn}\"]",
            END,
        ])
        new = outside.rstrip("\n") + ("\n\n" if outside.strip() else "") + block + "\n"
        if new == text:
            return False
        ledger = self._load_ledger()
        if ledger.conf != str(c.conf):
            ledger.conf = str(c.conf)
            self._save_ledger(ledger)
        write_atomic(c.conf, new, mode=0o644)
        return True

    def apply(self) -> str:
        """Make libvirtd serve TLS with the new files; returns what was done."""
        if Path("/run/systemd/system").is_dir() and not self.config.restart_command:
            ledger = self._load_ledger()
            if "libvirtd-tls.socket" not in ledger.units:
                ledger.units.append("libvirtd-tls.socket")
                self._save_ledger(ledger)
            for cmd in (["systemctl", "enable", "--now", "libvirtd-tls.socket"],
                        ["systemctl", "try-restart", "libvirtd.service"]):
                _run(cmd)
            return "enabled libvirtd-tls.socket and restarted libvirtd"
        if self.config.restart_command:
            _run(shlex.split(self.config.restart_command))
            return f"ran {self.config.restart_command!r}"
        return ("libvirtd was not restarted (no systemd and no libvirt.restart_command): "
                "restart it with --listen to open the TLS port")

    def reload(self) -> str:
        """Renewed files: libvirtd re-reads them without a restart, connections stay up.

        libvirt 9.0's `server-update-tls` rereads only its default paths (/etc/pki/...),
        whatever libvirtd.conf names; with other paths it fails, and a restart it is."""
        try:
            _run(["virt-admin", "-c", self.config.admin_uri, "server-update-tls", "libvirtd"])
        except TLSSetupError as exc:
            log.warning("reloading libvirtd's TLS files in place failed (%s); restarting it", exc)
            return self.apply()
        return "libvirtd reloaded its TLS files (virt-admin server-update-tls)"

    def _load_ledger(self) -> Ledger:
        try:
            return Ledger.parse(self._ledger.read_text())
        except FileNotFoundError:
            return Ledger()

    def _save_ledger(self, ledger: Ledger) -> None:
        write_atomic(self._ledger, ledger.render(), mode=0o600)


def _strip_block(text: str) -> str:
    pattern = re.compile(rf"\n*{re.escape(BEGIN)}.*?{re.escape(END)}\n?", re.S)
    return pattern.sub("\n", text) if BEGIN in text else text


def _digest(data: bytes) -> str:
    import hashlib  # only when writing files: hashlib's import is 0.7 MB of a check-in's memory

    return hashlib.sha256(data).hexdigest()


def _setting_for(config: LibvirtConfig, path: Path) -> str:
    for name in ("key_file", "cert_file", "ca_file"):
        if getattr(config, name) == path:
            return name
    return "conf"


def _run(cmd: list[str]) -> None:
    # Output goes to a file, not a pipe: a daemon the command starts may keep the pipe
    # open for its whole life, and we would wait for it.
    with tempfile.TemporaryFile() as out:
        try:
            subprocess.run(cmd, check=True, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                           timeout=60, env=os.environ | {"LC_ALL": "C"})
        except subprocess.CalledProcessError as exc:
            out.seek(0)
            err = out.read().decode(errors="replace").strip()[-2000:]
            raise TLSSetupError(f"`{shlex.join(cmd)}` failed ({exc.returncode}): {err}") from None
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TLSSetupError(f"`{shlex.join(cmd)}` failed: {exc}") from None
