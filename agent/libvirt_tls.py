"""libvirtd's TLS listener on the host, set up with the certificates the server signed.

Writes the libvirt CA, the host's libvirtd certificate and key where libvirtd reads
them, and a marked block in libvirtd.conf that names those files, turns the TLS
listener on, and lets in only the server's libvirt client identity
(`tls_allowed_dn_list`). A file this agent did not write is never overwritten: the set-up
stops and says which file and how to proceed. Then libvirtd is made to pick it up:
`libvirtd-tls.socket` where systemd runs libvirtd, the configured restart command
otherwise.

What the server sends (the client DN, the certificates) is checked against a strict
grammar before anything is written: a hostile server, or anyone answering for it at
enrollment, must not be able to write its own lines into libvirtd.conf. The block is
found by BEGIN/END lines carrying a random per-host nonce kept in the ledger, matched as
whole lines: no value, and no line an admin or an old version left, can forge them.

What was set up is kept in a ledger in the state dir, in lines plain shell can read,
so `apt purge virtfleet-agent` undoes it (debian/virtfleet-agent.postrm) after the
agent's code is gone:
    file SHA256 PATH    a file we wrote, as we wrote it (a changed file is not ours)
    dir PATH            a directory we created for those files
    conf PATH           the libvirtd.conf holding our block
    marker NONCE        the nonce on our block's BEGIN/END lines (no line: the old
                        un-nonced markers, LEGACY_BEGIN/LEGACY_END)
    port N              the TLS port the block opens (for purge's advice)
    unit NAME           a systemd unit we enabled
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shlex
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from agent.config import LibvirtConfig
from common.files import write_atomic

log = logging.getLogger(__name__)

# The markers versions before the nonce wrote; still recognised (as exact whole lines)
# so an upgraded agent, and purge, replace or remove that block.
LEGACY_BEGIN = "# BEGIN virtfleet (managed by virtfleet-agent: do not edit this block)"
LEGACY_END = "# END virtfleet"
MANAGED_KEYS = ("listen_tls", "tls_port", "key_file", "cert_file", "ca_file", "tls_allowed_dn_list")
# A line of our block, as we write it: the only lines a block of ours may hold.
_BLOCK_LINE = re.compile(rf'(?:{"|".join(MANAGED_KEYS)}) = (?:1|"[^"]*"|\["[^"]*"\])')
# libvirt's client DN as the server names it (`CN=virtfleet-server-libvirt-client`):
# KEY=VALUE parts, comma-separated, in a conservative character set.
_DN = re.compile(r"[A-Za-z][A-Za-z0-9.]{0,31}=[A-Za-z0-9 ._-]{1,128}"
                 r"(?:,[A-Za-z][A-Za-z0-9.]{0,31}=[A-Za-z0-9 ._-]{1,128})*")
MAX_DN = 256
_PEM_CERT = re.compile(r"-----BEGIN CERTIFICATE-----\n(?:[A-Za-z0-9+/]{1,76}\n)*"
                       r"[A-Za-z0-9+/]{0,76}={0,2}\n-----END CERTIFICATE-----\n?")
_NONCE = re.compile(r"[0-9a-f]{32}")


class TLSSetupError(Exception):
    pass


def begin_marker(nonce: str | None) -> str:
    if nonce is None:
        return LEGACY_BEGIN
    return f"# BEGIN virtfleet {nonce} (managed by virtfleet-agent: do not edit this block)"


def end_marker(nonce: str | None) -> str:
    return LEGACY_END if nonce is None else f"# END virtfleet {nonce}"


def check_client_dn(dn: str) -> str:
    """The server's libvirt client DN, refused unless it is a plain DN (no quotes, no
    newlines, nothing libvirtd.conf would read as more than one string)."""
    if not 0 < len(dn) <= MAX_DN:
        raise TLSSetupError(f"the server sent a libvirt client DN of {len(dn)} characters "
                            f"(1-{MAX_DN} allowed): refusing to write it into libvirtd.conf")
    if not _DN.fullmatch(dn):
        raise TLSSetupError(f"the server sent a libvirt client DN {dn[:80]!r} that is not a "
                            "plain DN (KEY=VALUE parts of letters, digits, spaces and . _ - "
                            "separated by commas): refusing to write it into libvirtd.conf")
    return dn


def check_certificate(pem: str, what: str) -> str:
    """`pem` if it is exactly one well-formed PEM certificate and nothing else."""
    if not _PEM_CERT.fullmatch(pem):
        raise TLSSetupError(f"the server sent a {what} that is not a single PEM certificate "
                            "with nothing around it: refusing to write it")
    from cryptography import x509  # only at join and renewal, never at a check-in

    try:
        x509.load_pem_x509_certificate(pem.encode())
    except ValueError as exc:
        raise TLSSetupError(f"the server sent a {what} that does not parse as an X.509 "
                            f"certificate ({exc}): refusing to write it") from None
    return pem


def conf_string(value: str, what: str) -> str:
    """`value` as a libvirtd.conf string. libvirt's parser has no escapes: a double quote
    ends the string, a newline is an error. So such values are refused, not escaped."""
    if any(c == '"' or not c.isprintable() for c in value):
        raise TLSSetupError(f"{what} {value!r} holds a double quote or a control character, "
                            "which libvirtd.conf cannot hold in a string")
    return f'"{value}"'


@dataclass
class Ledger:
    files: dict[str, str] = field(default_factory=dict)  # path -> sha256 as written
    dirs: list[str] = field(default_factory=list)
    conf: str | None = None
    marker: str | None = None
    port: int | None = None
    units: list[str] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> Ledger:
        ledger = cls()
        for line in text.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "file":
                digest, _, path = rest.partition(" ")
                ledger.files[path] = digest
            elif kind == "dir" and rest not in ledger.dirs:
                ledger.dirs.append(rest)
            elif kind == "conf":
                ledger.conf = rest
            elif kind == "marker" and _NONCE.fullmatch(rest):
                ledger.marker = rest
            elif kind == "port" and rest.isdigit():
                ledger.port = int(rest)
            elif kind == "unit" and rest not in ledger.units:
                ledger.units.append(rest)
        return ledger

    def render(self) -> str:
        lines = ["# What virtfleet-agent set up for libvirtd's TLS listener; purging the",
                 "# virtfleet-agent package undoes it. Written by the agent: do not edit."]
        lines += [f"file {digest} {path}" for path, digest in self.files.items()]
        lines += [f"dir {path}" for path in self.dirs]
        lines += [f"conf {self.conf}"] if self.conf else []
        lines += [f"marker {self.marker}"] if self.marker else []
        lines += [f"port {self.port}"] if self.port else []
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
            if not (c.configure_tls and c.cert_file.exists() and c.key_file.exists()):
                return False
            text = c.conf.read_text()
        except OSError:
            return False
        ledger = self._load_ledger()
        if ledger.marker:
            return begin_marker(ledger.marker) in text.splitlines()
        # No ledger at hand (a check-in's report): any block line of ours will do.
        return any(line.startswith("# BEGIN virtfleet ") for line in text.splitlines())

    def preflight(self) -> None:
        """Refuse before enrolling (and spending the token) if the set-up cannot succeed."""
        ledger = self._load_ledger()
        for path in (self.config.key_file, self.config.cert_file, self.config.ca_file):
            if path.exists() and ledger.files.get(str(path)) != _digest(path.read_bytes()):
                raise TLSSetupError(self._not_ours(path))
        self._conf_without_block(ledger)
        self._block(ledger.marker or "0" * 32, "CN=preflight")  # the local paths are writable

    def install(self, key_pem: bytes, cert_pem: str, ca_pem: str, client_dn: str) -> bool:
        """Write files and config; True when anything changed (libvirtd must reload).
        Everything the server sent is checked before the first byte is written."""
        c = self.config
        check_certificate(cert_pem, "libvirtd certificate")
        check_certificate(ca_pem, "libvirt CA certificate")
        check_client_dn(client_dn)
        self._block("0" * 32, client_dn)  # refuses a path libvirtd.conf cannot hold
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
        self._make_parents(path, ledger, 0o700 if mode == 0o600 else 0o755)
        write_atomic(path, data, mode=mode)
        ledger.files[str(path)] = _digest(data)
        self._save_ledger(ledger)
        return True

    def _make_parents(self, path: Path, ledger: Ledger, mode: int) -> None:
        """Create missing parent directories, each recorded so purge removes exactly them
        (a directory that was there is never chmod-ed: it is not ours)."""
        missing = [p for p in reversed(path.parents) if not p.exists()]
        for directory in missing:
            directory.mkdir(mode=mode)
            ledger.dirs.append(str(directory))
            self._save_ledger(ledger)

    def _not_ours(self, path: Path) -> str:
        return (f"{path} exists and was not written by virtfleet-agent: refusing to overwrite "
                f"it. Move it aside, or point libvirt.{_setting_for(self.config, path)} in "
                "/etc/virtfleet/agent.toml at another path.")

    def _conf_without_block(self, ledger: Ledger) -> tuple[str, str]:
        """libvirtd.conf as it is, and without our block; refuses if it sets our keys."""
        c = self.config
        text = c.conf.read_text() if c.conf.exists() else ""
        outside = self._strip_block(text, ledger)
        clash = [k for k in MANAGED_KEYS if re.search(rf"^\s*{k}\s*=", outside, re.M)]
        if clash:
            raise TLSSetupError(
                f"{c.conf} already sets {', '.join(clash)} outside virtfleet's block: comment "
                "those lines out so virtfleet can manage libvirtd's TLS listener.")
        return text, outside

    def _strip_block(self, text: str, ledger: Ledger) -> str:
        """`text` without our block. Only a conf we recorded can hold one; without a
        nonce on record it is the old un-nonced block."""
        if ledger.conf != str(self.config.conf):
            return text
        try:
            return strip_block(text, ledger.marker)
        except ValueError as exc:
            raise TLSSetupError(f"{self.config.conf}: {exc}: fix or remove that block by "
                                "hand, then run this again") from None

    def _block(self, nonce: str, client_dn: str) -> str:
        c = self.config
        if not 0 < c.tls_port < 65536:
            raise TLSSetupError(f"libvirt.tls_port {c.tls_port} is not a port number")
        return "\n".join([
            begin_marker(nonce),
            "listen_tls = 1",
            f"tls_port = {conf_string(str(c.tls_port), 'libvirt.tls_port')}",
            f"key_file = {conf_string(str(c.key_file), 'libvirt.key_file')}",
            f"cert_file = {conf_string(str(c.cert_file), 'libvirt.cert_file')}",
            f"ca_file = {conf_string(str(c.ca_file), 'libvirt.ca_file')}",
            f"tls_allowed_dn_list = [{conf_string(check_client_dn(client_dn), 'client DN')}]",
            end_marker(nonce),
        ])

    def _write_conf(self, client_dn: str) -> bool:
        c = self.config
        ledger = self._load_ledger()
        text, outside = self._conf_without_block(ledger)
        if ledger.conf != str(c.conf) or not ledger.marker:
            # Recorded before the block is written: purge must know of it even if we die
            # between the two writes.
            ledger.conf, ledger.marker = str(c.conf), secrets.token_hex(16)
        ledger.port = c.tls_port
        self._save_ledger(ledger)
        block = self._block(ledger.marker, client_dn)
        new = outside.rstrip("\n") + ("\n\n" if outside.strip() else "") + block + "\n"
        if new == text:
            return False
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


def strip_block(text: str, nonce: str | None) -> str:
    """`text` without the block between the exact whole lines begin_marker(nonce) and
    end_marker(nonce); ValueError if such a block is there but not one we wrote."""
    begin, end = begin_marker(nonce), end_marker(nonce)
    lines = text.splitlines(keepends=True)
    bare = [line.rstrip("\n") for line in lines]
    starts = [i for i, line in enumerate(bare) if line == begin]
    ends = [i for i, line in enumerate(bare) if line == end]
    if not starts:
        return text
    if len(starts) > 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ValueError("virtfleet's block is damaged (its BEGIN/END lines do not pair up)")
    inner = bare[starts[0] + 1:ends[0]]
    foreign = [line for line in inner if not _BLOCK_LINE.fullmatch(line)]
    if foreign:
        raise ValueError(f"virtfleet's block holds a line virtfleet did not write: {foreign[0]!r}")
    before = "".join(lines[:starts[0]]).rstrip("\n")
    after = "".join(lines[ends[0] + 1:])
    return before + "\n" + after if before else after


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
