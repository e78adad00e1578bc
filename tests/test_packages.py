"""The Debian packages, as an operator gets them: built, linted, installed with apt,
run the way their units run them, removed and purged.

There is no systemd as PID 1 here, so the test plays its part: a journald started by
hand (in a private mount namespace with its own /run, so the machine's own programs
never log into it), the units' ExecStart lines with their User=, a NOTIFY_SOCKET for
READY/STATUS/WATCHDOG, and JOURNAL_STREAM as systemd sets it for a service.
"""

from __future__ import annotations

import argparse
import grp
import json
import os
import re
import shlex
import socket
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from agent.cli import build_parser as agent_parser
from common.logs import MESSAGE_IDS
from server.cli import build_parser as server_parser
from tests.harness import ROOT, Libvirtd, Proc, free_port, wait_for
from tests.test_web import Client

PACKAGES = ("virtfleet-agent", "virtfleet-server")
UNITS = Path("/lib/systemd/system")
# What a package may touch; dpkg's and apt's own records are theirs.
WATCHED = ("/etc", "/usr", "/opt", "/var/lib")
NOT_WATCHED = ("/var/lib/dpkg", "/var/lib/apt", "/var/lib/ucf")
AGENT_STATE = Path("/var/lib/virtfleet-agent")
SERVER_STATE = Path("/var/lib/virtfleet-server")
# WatchdogSec= shortened (as a drop-in would) so pings come within the test's patience.
WATCHDOG_USEC = "2000000"


def apt_get(*args: str) -> None:
    result = subprocess.run(["apt-get", "-y", "-q", *args], capture_output=True, text=True,
                            timeout=300, env=os.environ | {"DEBIAN_FRONTEND": "noninteractive"})
    assert result.returncode == 0, f"apt-get {' '.join(args)}:\n{result.stdout}\n{result.stderr}"


def installed(package: str) -> bool:
    result = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True,
                            text=True)
    return "installed" in result.stdout or "config-files" in result.stdout


def file_listing() -> set[str]:
    paths = set()
    for top in WATCHED:
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames[:] = [d for d in dirnames
                           if os.path.join(dirpath, d) not in NOT_WATCHED]
            paths.update(os.path.join(dirpath, name) for name in dirnames + filenames)
    return paths


def exec_start(unit: str) -> list[str]:
    """The unit's ExecStart= line, from the installed unit file."""
    lines = (UNITS / unit).read_text().splitlines()
    return shlex.split(next(line for line in lines if line.startswith("ExecStart=/"))[10:])


class NotifySocket:
    """The socket systemd gives a Type=notify service; collects what the service says."""

    def __init__(self) -> None:
        self.address = f"@virtfleet-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + self.address[1:])
        self.sock.setblocking(False)
        self.messages: list[str] = []

    def said(self, text: str) -> list[str]:
        """Every message so far (read without waiting) that contains `text`."""
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except BlockingIOError:
                break
        return [m for m in self.messages if text in m]


class Journald:
    """systemd-journald started by hand in its own mount namespace: tmpfs on /run (its
    sockets) and on /var/log/journal (so it writes nothing that outlives the test)."""

    def __init__(self, log: Path) -> None:
        mounts = "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal\n"
        if Path("/var/log/journal").is_dir():
            mounts += "mount -t tmpfs tmpfs /var/log/journal\n"
        self.proc = Proc(["unshare", "--mount", "--propagation", "private", "sh", "-ec",
                          mounts + "exec /lib/systemd/systemd-journald"], log).start()
        assert self.proc.proc is not None
        self.pid = self.proc.proc.pid
        self.services: list[tuple[Proc, NotifySocket]] = []
        wait_for(lambda: Path(f"/proc/{self.pid}/root/run/systemd/journal/socket").exists(), 20,
                 "journald's socket")

    def enter(self, argv: list[str]) -> list[str]:
        """`argv` run inside journald's mount namespace: it sees the journal."""
        return ["nsenter", f"--mount=/proc/{self.pid}/ns/mnt", "--", *argv]

    def entries(self, *matches: str) -> list[dict[str, str]]:
        out = subprocess.run(self.enter(["journalctl", "--no-pager", "-o", "json", *matches]),
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def service(self, unit: str, log: Path, *extra: str) -> tuple[Proc, NotifySocket]:
        """Run `unit`'s ExecStart (plus `extra` flags, as a drop-in would add) as its
        User=, with what systemd gives a Type=notify service with a watchdog."""
        unit_text = (UNITS / unit).read_text()
        argv = exec_start(unit) + list(extra)
        user = next((line[5:] for line in unit_text.splitlines() if line.startswith("User=")), "")
        self._runtime_directory(unit_text, user or "root")
        if user:
            argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups", *argv]
        notify = NotifySocket()
        env = {"NOTIFY_SOCKET": notify.address, "WATCHDOG_USEC": WATCHDOG_USEC,
               "JOURNAL_STREAM": "0:0", "LANG": "C.UTF-8",
               "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
        proc = Proc(self.enter(argv), log)
        proc.env = env  # only what systemd would give: none of the test's own environment
        self.services.append((proc.start(), notify))
        return proc, notify

    def _runtime_directory(self, unit_text: str, user: str) -> None:
        """What systemd makes for `RuntimeDirectory=`: /run/NAME, the unit's user's, with
        `RuntimeDirectoryMode=` (in journald's namespace, whose /run is a tmpfs)."""
        settings = dict(line.split("=", 1) for line in unit_text.splitlines() if "=" in line)
        name = settings.get("RuntimeDirectory")
        if not name:
            return
        path = f"/run/{name}"
        mode = settings.get("RuntimeDirectoryMode", "0755")
        subprocess.run(self.enter(["sh", "-ec", f"mkdir -p {path} && chown {user}: {path} && "
                                                f"chmod {mode} {path}"]), check=True, timeout=10)

    def stop(self) -> None:
        for proc, notify in self.services:
            proc.stop()
            notify.sock.close()
        self.proc.stop()


# man-db keeps each page it formats here, current while the page is no newer: every build
# of one version stamps its pages with the changelog's date, so a page cached from an
# earlier build would be shown in place of the one just installed.
MAN_CACHE = Path("/var/cache/man/cat8")


@pytest.fixture
def clean_machine() -> Iterator[None]:
    """No virtfleet package (nor its cached man page) before the test, none after it,
    whatever happens between."""
    for package in PACKAGES:
        if installed(package):
            subprocess.run(["dpkg", "--purge", package], capture_output=True, check=True)
        (MAN_CACHE / f"{package}.8.gz").unlink(missing_ok=True)
    yield
    for package in PACKAGES:
        if installed(package):
            subprocess.run(["dpkg", "--purge", package], capture_output=True)
        (MAN_CACHE / f"{package}.8.gz").unlink(missing_ok=True)


def test_packages_build_install_run_remove_and_purge(tmp_path: Path, clean_machine: None) -> None:
    debs = tmp_path / "debs"
    build = subprocess.run([str(ROOT / "scripts" / "build-debs"), str(debs)], capture_output=True,
                           text=True, timeout=600)
    assert build.returncode == 0, f"build or lintian failed:\n{build.stdout}\n{build.stderr}"

    libvirtd = Libvirtd(tmp_path / "libvirtd", free_port())
    libvirtd.start()  # before the listing: the test libvirtd makes its mount points
    try:
        before = install_and_run(libvirtd, tmp_path, debs)
    finally:
        libvirtd.stop()  # also when the install or a check failed before it ran

    apt_get("remove", *PACKAGES)
    assert not Path("/usr/bin/virtfleet-agent").exists()
    assert not Path("/usr/share/virtfleet-server").exists()
    assert (AGENT_STATE / "identity.pem").exists(), "remove must keep the host's identity"
    assert (SERVER_STATE / "state.db").exists(), "remove must keep the server's database"

    apt_get("purge", *PACKAGES)
    after = file_listing()
    assert after - before == set(), "purge left files behind"
    assert before - after == set(), "install and purge removed files that were there before"
    # The agent's libvirtd TLS set-up is undone too.
    assert not libvirtd.tls_configured, libvirtd.conf.read_text()
    left = [p for p in (libvirtd.pki / "servercert.pem", libvirtd.pki / "private" / "serverkey.pem",
                        libvirtd.base / "pki-ca" / "cacert.pem") if p.exists()]
    assert not left, f"purge left libvirtd's TLS files the agent wrote: {left}"


def check_units() -> None:
    """`systemd-analyze verify` is clean, and the README quotes the units' exposure scores
    as `systemd-analyze security` gives them."""
    units = [str(UNITS / f"{package}.service") for package in PACKAGES]
    verify = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True)
    assert verify.returncode == 0 and not verify.stderr.strip(), verify.stderr
    readme = (ROOT / "README.md").read_text()
    for unit in units:
        out = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--no-pager", unit],
                             capture_output=True, text=True).stdout
        score = re.search(r"Overall exposure level for (\S+): ([\d.]+)", out)
        assert score, out
        assert f"| `{score[1]}` | {score[2]} |" in readme, f"README: {score[1]} scores {score[2]}"


# What bash does on <TAB> with the installed completion script: the function it registered
# for the program, called with the line so far ($1: the program, $2: the line).
COMPLETE = r"""
source "/usr/share/bash-completion/completions/$1"
COMP_LINE=$2 COMP_POINT=${#2}
read -ra COMP_WORDS <<<"$2"
[[ $2 == *" " ]] && COMP_WORDS+=("")
COMP_CWORD=$((${#COMP_WORDS[@]} - 1))
function=$(complete -p "$1" | sed -E 's/.* -F ([^ ]+) .*/\1/')
"$function" "$1" "${COMP_WORDS[-1]}" "${COMP_WORDS[-2]}"
printf '%s\n' "${COMPREPLY[@]}"
"""


def completions(line: str) -> set[str]:
    """What bash offers for `line` (<TAB> at its end), from the installed program."""
    result = subprocess.run(["bash", "-c", COMPLETE, "bash", line.split()[0], line],
                            capture_output=True, text=True, timeout=60,
                            env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"})
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
             ) -> Iterator[tuple[tuple[str, ...], list[str]]]:
    """Every command that does something (("hosts", "list"), not ("hosts",)) in the tree's
    parser, which the packages were built from, with its options."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from commands(sub, (*path, name))
            return
    yield path, [option for action in parser._actions for option in action.option_strings]


def check_manuals_and_completion() -> None:
    """Each program's man page, section 8, documents every command and option it has, and
    its bash completion offers them (asking the installed program)."""
    programs: list[tuple[str, Callable[[], argparse.ArgumentParser], str]] = [
        ("virtfleet-server", server_parser, "hosts"), ("virtfleet-agent", agent_parser, "join")]
    for program, build_parser, command in programs:
        assert completions(f"{program} {command[:2]}") == {command}
        page = subprocess.run(["man", "--warnings", "8", program], capture_output=True,
                              text=True, env=os.environ | {"LANG": "C.UTF-8", "MANWIDTH": "80"})
        assert page.returncode == 0 and not page.stderr, page.stderr
        manual = page.stdout
        for section in ("NAME", "SYNOPSIS", "DESCRIPTION", "OPTIONS", "COMMANDS", "SEE ALSO"):
            assert re.search(rf"^{section}$", manual, re.M), f"{program}(8) has no {section}"
        offered: dict[str, set[str]] = {}
        for path, options in commands(build_parser()):
            name = " ".join(path)
            assert re.search(rf"^   {name}$", manual, re.M), f"{program}(8) has no `{name}`"
            for option in options:
                assert re.search(rf"(^|[\s,]){option}\b", manual, re.M), \
                    f"{program}(8) does not describe `{name} {option}`"
            parent = " ".join((program, *path[:-1], ""))
            if parent not in offered:
                offered[parent] = completions(parent)
            assert path[-1] in offered[parent], f"completing `{parent}` offers {offered[parent]}"
            assert completions(f"{program} {name} --") == {o for o in options if o[:2] == "--"}


def install_and_run(libvirtd: Libvirtd, tmp_path: Path, debs: Path) -> set[str]:
    """Install the .debs and run them as their units do; the file listing before."""
    before = file_listing()
    apt_get("install", "--no-install-recommends", *sorted(str(p) for p in debs.glob("*.deb")))

    assert (Path("/etc/virtfleet/agent.toml").stat().st_mode & 0o777) == 0o600
    for state in (AGENT_STATE, SERVER_STATE):
        assert (state.stat().st_mode & 0o777) == 0o700, f"{state} is not private"
    assert SERVER_STATE.owner() == "_virtfleet"
    for module in ("agent", "server", "common"):
        assert not list(Path("/usr/lib/python3/dist-packages").glob(f"{module}/*.py")), \
            f"{module} went into the global dist-packages"

    check_units()
    check_manuals_and_completion()
    journal = Journald(tmp_path / "journald.log")
    try:
        run_installed(journal, libvirtd, tmp_path)
    finally:
        journal.stop()
    return before


def run_installed(journal: Journald, libvirtd: Libvirtd, tmp_path: Path) -> None:
    port, web_port = free_port(), free_port()
    server, server_notify = journal.service("virtfleet-server.service", tmp_path / "server.log",
                                            "--listen", f"127.0.0.1:{port}",
                                            "--web-listen", f"127.0.0.1:{web_port}",
                                            "--checkin-interval", "1")
    wait_for(lambda: server_notify.said("READY=1") or not server.alive(), 30,
             "the server's READY=1")
    assert server.alive(), server.log()

    admin = ["/usr/bin/virtfleet-server", "--json"]
    token = json.loads(subprocess.run(admin + ["token", "create", "--ttl", "10m"], check=True,
                                      capture_output=True, text=True).stdout)["join"]
    # The unattended install: the join string in the conffile, then the first start.
    config = Path("/etc/virtfleet/agent.toml")
    config.write_text(f'join = "{token}"\nhostname = "pkg-host"\n' + libvirtd.agent_config())
    agent, agent_notify = journal.service("virtfleet-agent.service", tmp_path / "agent.log")

    def host() -> dict[str, str] | None:
        out = subprocess.run(admin + ["hosts", "list"], capture_output=True, text=True).stdout
        hosts = json.loads(out) if out else []
        return hosts[0] if hosts and hosts[0]["status"] == "online" else None

    online = wait_for(host, 60, f"the host online (agent log: {agent.log()[-2000:]})")
    assert online["hostname"] == "pkg-host"
    # The engine's doors: in the unit's runtime directory, for the group the package made.
    run_dir = Path(f"/proc/{journal.pid}/root/run/virtfleet-server")
    gateway = wait_for(lambda: (s := run_dir / "hosts" / f"{online['id']}.sock").exists() and s, 10,
                       "the host's gateway socket")
    for path in (gateway, run_dir / "engine.sock"):
        assert grp.getgrgid(path.stat().st_gid).gr_name == "virtfleet-engine", path
        assert path.stat().st_mode & 0o777 == 0o660, path
    assert token not in config.read_text(), "the spent join string is still in agent.toml"
    # The web page, from the installed templates.
    page = Client(f"http://127.0.0.1:{web_port}")
    page.login(subprocess.run(["/usr/bin/virtfleet-server", "web-login"], check=True,
                              capture_output=True, text=True).stdout.strip())
    assert "pkg-host" in page.get("/hosts").text and page.get("/static/web.js").status == 200

    wait_for(lambda: agent_notify.said("READY=1"), 10, "the agent's READY=1")
    wait_for(lambda: agent_notify.said("STATUS=online as pkg-host"), 10, "the agent's STATUS")
    wait_for(lambda: server_notify.said("1 host: 1 online"), 10, "the server's STATUS")
    for notify in (agent_notify, server_notify):
        wait_for(lambda n=notify: n.said("WATCHDOG=1"), 10, "watchdog pings")

    for program in ("virtfleet-agent", "virtfleet-server"):
        entries = journal.entries("VIRTFLEET_EVENT=enrolled", f"SYSLOG_IDENTIFIER={program}")
        assert len(entries) == 1, f"{program}: {entries}"
        assert entries[0]["VIRTFLEET_HOST_ID"] == online["id"]
        assert entries[0]["MESSAGE_ID"] == MESSAGE_IDS["enrolled"].hex

    libvirtd.stop()
    wait_for(lambda: journal.entries("VIRTFLEET_EVENT=libvirtd_down",
                                     "SYSLOG_IDENTIFIER=virtfleet-agent"), 20,
             "libvirtd_down in the agent's journal")

    for proc, notify in ((agent, agent_notify), (server, server_notify)):
        assert proc.stop() == 0, proc.log()
        assert notify.said("STOPPING=1")


def run_maintainer_script(script: str, action: str, root: Path) -> subprocess.CompletedProcess[str]:
    """A maintainer script acting on `root` as `dpkg --root` would have it (DPKG_ROOT)."""
    result = subprocess.run(["sh", str(ROOT / "debian" / script), action], capture_output=True,
                            text=True, timeout=30, env=os.environ | {"DPKG_ROOT": str(root)})
    assert result.returncode == 0, result.stderr
    return result


def test_postinst_changes_no_directory_it_did_not_create_and_purge_undoes_its_own(
        tmp_path: Path) -> None:
    """An existing /etc/pki/libvirt/private keeps its mode (postinst used to chmod it 0700,
    and purge never undid it); what postinst made, purge removes, and nothing else."""
    private = tmp_path / "etc/pki/libvirt/private"
    private.mkdir(parents=True, mode=0o755)
    private.chmod(0o755)
    (tmp_path / "var/lib").mkdir(parents=True)
    run_maintainer_script("virtfleet-agent.postinst", "configure", tmp_path)
    assert (private.stat().st_mode & 0o777) == 0o755
    assert (tmp_path / "etc/pki/CA").is_dir()
    assert (tmp_path / "var/lib/virtfleet-agent/created-dirs").read_text() == "/etc/pki/CA\n"
    run_maintainer_script("virtfleet-agent.postrm", "purge", tmp_path)
    assert not (tmp_path / "etc/pki/CA").exists()
    assert not (tmp_path / "var/lib/virtfleet-agent").exists()
    assert (private.stat().st_mode & 0o777) == 0o755


def test_postinst_makes_the_key_directory_root_only_when_it_creates_it(tmp_path: Path) -> None:
    for top in ("etc", "var/lib"):
        (tmp_path / top).mkdir(parents=True)
    run_maintainer_script("virtfleet-agent.postinst", "configure", tmp_path)
    assert ((tmp_path / "etc/pki/libvirt/private").stat().st_mode & 0o777) == 0o700
    run_maintainer_script("virtfleet-agent.postrm", "purge", tmp_path)
    assert not (tmp_path / "etc/pki").exists() and (tmp_path / "etc").is_dir()
