"""Real parts for end-to-end tests and the demo: a private libvirtd, the server, an agent.

Every process is the real program. A libvirtd runs in a private mount namespace with
its own /etc/libvirt, /run/libvirt, /var/lib/libvirt and /var/log/libvirt (temp dirs),
its own unix socket dir and TLS port, so several can run side by side and none touches
the machine's own libvirt.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = ROOT / ".venv" / "bin"
T = TypeVar("T")
SHARED_CACHE = Path("/var/tmp/virtfleet-test-libvirt-cache")


def wait_for(condition: Callable[[], T], timeout: float = 10.0, what: str = "condition",
             interval: float = 0.05) -> T:
    """Poll until `condition()` is truthy; fail naming `what` at the deadline."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = condition()
        except Exception as exc:  # a condition may fail while things start up
            last = exc
        else:
            if last:
                return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} (last: {last!r})")
        time.sleep(interval)


async def until(condition: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    """wait_for inside an event loop: polls with the loop running meanwhile (it may be what
    makes `condition()` true)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


def observed(what: str, since: float) -> float:
    """Print how long something took (seconds since the monotonic `since`): the figures
    docs/reliability.md quotes come from these lines (`pytest -s`)."""
    seconds = time.monotonic() - since
    print(f"observed: {what}: {seconds:.2f} s")
    return seconds


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port nothing listens on now that this process has not handed out before: the
    kernel may give the same free port twice in a row, and a server's agent, metrics and
    web ports (asked for one after the other, bound later) then collide."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"


def same_mount_namespace(pid: int) -> list[int]:
    """Other processes in `pid`'s mount namespace (a test libvirtd's private one)."""
    try:
        mine = os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return []
    if mine == os.readlink("/proc/self/ns/mnt"):
        return []  # not a private namespace: nothing to sweep
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != pid:
            with contextlib.suppress(OSError):
                if os.readlink(entry / "ns" / "mnt") == mine:
                    found.append(int(entry.name))
    return found


class Libvirtd:
    """A private libvirtd. `start()` runs it (with --listen once TLS is configured),
    `stop()` kills it; `restart_script` is what the agent runs after its TLS set-up."""

    def __init__(self, base: Path, tls_port: int, listen_addr: str = "127.0.0.1",
                 netns: str | None = None, hide_kvm: bool = False) -> None:
        self.base = base
        self.tls_port = tls_port
        self.listen_addr = listen_addr
        self.netns = netns
        self.hide_kvm = hide_kvm
        self.sock_dir = base / "sock"
        self.conf = base / "etc" / "libvirtd.conf"
        self.pidfile = base / "libvirtd.pid"
        self.pki = base / "pki"
        self.start_script = base / "start-libvirtd"
        self.restart_script = base / "restart-libvirtd"
        self.uri = f"qemu:///system?socket={self.sock_dir}/libvirt-sock"
        for sub in ("sock", "etc", "run", "lib", "log", "cache", "pki/private", "pki-ca"):
            (base / sub).mkdir(parents=True, exist_ok=True)
        if not self.conf.exists():
            self.conf.write_text(textwrap.dedent(f"""\
                # private libvirtd for a virtfleet test
                unix_sock_dir = "{self.sock_dir}"
                listen_tcp = 0
                listen_addr = "{listen_addr}"
                auth_unix_rw = "none"
                log_outputs = "3:file:{base}/log/libvirtd.log"
                """))
        qemu_conf = base / "etc" / "qemu.conf"
        if not qemu_conf.exists():
            # Guests log to files libvirtd writes itself: no virtlogd in this namespace.
            qemu_conf.write_text('stdio_handler = "file"\n')
        self._write_scripts()

    def _write_scripts(self) -> None:
        """`start-libvirtd` runs libvirtd in a private mount namespace (with --listen once the
        agent has set TLS up); `restart-libvirtd`, the agent's restart_command, kills it and
        starts it again. Plain shell: no interpreter to start, as quick as systemd's restart."""
        # QEMU's capabilities take libvirtd seconds to probe: share the cache between
        # test libvirtds (those without KVM see other capabilities: their own cache).
        cache = self.base / "cache" if self.hide_kvm else SHARED_CACHE
        mounts = [(self.base / "etc", "/etc/libvirt"), (self.base / "run", "/run/libvirt"),
                  (self.base / "lib", "/var/lib/libvirt"), (self.base / "log", "/var/log/libvirt"),
                  (cache, "/var/cache/libvirt"),
                  # libvirt's default TLS paths too: `virt-admin server-update-tls` rereads
                  # only those, whatever libvirtd.conf says.
                  (self.base / "pki", "/etc/pki/libvirt"), (self.base / "pki-ca", "/etc/pki/CA")]
        start = "#!/bin/sh\nset -e\n"
        for source, target in mounts:
            start += f"mkdir -p {source} {target} && mount --bind {source} {target}\n"
        if self.hide_kvm:
            start += "mount --bind /dev/null /dev/kvm\n"
        # Pinned to one CPU: libvirt keys its QEMU capability cache on the host CPUID, which
        # differs between the cores of this VM, and a cache miss costs ~8 s of probing.
        # `libvirtd -d` returns once it listens.
        start += textwrap.dedent(f"""\
            listen=""
            if grep -q "BEGIN virtfleet" {self.conf}; then listen=--listen; fi
            rm -f {self.pidfile}
            exec taskset -c 0 libvirtd -d -f {self.conf} -p {self.pidfile} $listen \\
                </dev/null >>{self.base}/log/stdio.log 2>&1
            """)
        self.start_script.write_text(start)
        self.restart_script.write_text(textwrap.dedent(f"""\
            #!/bin/sh
            # Restart this test's libvirtd: kill it, wait until it is gone (it holds its
            # pidfile lock and its ports), start it again.
            pid=$(cat {self.pidfile} 2>/dev/null)
            if [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; then
                while [ "$(cut -d' ' -f3 /proc/$pid/stat 2>/dev/null || echo Z)" != Z ]; do
                    sleep 0.01
                done
            fi
            rm -f {self.sock_dir}/libvirt-sock
            exec unshare -m --propagation private sh {self.start_script}
            """))
        self.restart_script.chmod(0o755)

    def agent_config(self, **extra: Any) -> str:
        """The [libvirt] part of an agent.toml pointing at this libvirtd."""
        lines = [
            "[libvirt]",
            f'uri = "{self.uri}"',
            f'admin_uri = "libvirtd:///system?socket={self.sock_dir}/libvirt-admin-sock"',
            f"tls_port = {self.tls_port}",
            f'conf = "{self.conf}"',
            f'ca_file = "{self.base}/pki-ca/cacert.pem"',
            f'cert_file = "{self.pki}/servercert.pem"',
            f'key_file = "{self.pki}/private/serverkey.pem"',
            f'restart_command = "{self.restart_script}"',
            f'socket = "{self.sock_dir}/libvirt-sock"',
        ]
        lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
        return "\n".join(lines) + "\n"

    @property
    def tls_configured(self) -> bool:
        return "BEGIN virtfleet" in self.conf.read_text()

    def pid(self) -> int | None:
        try:
            pid = int(self.pidfile.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    def start(self) -> None:
        cmd = ["unshare", "-m", "--propagation", "private", "sh", str(self.start_script)]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns] + cmd
        subprocess.run(cmd, check=True, timeout=30)
        wait_for(lambda: self.pid() and (self.sock_dir / "libvirt-sock").exists(), 30,
                 "libvirtd to start")
        if self.tls_configured:
            wait_for(lambda: self._tls_listening(), 30, "libvirtd's TLS port")

    def _tls_listening(self) -> bool:
        cmd = ["ss", "-Hltn", f"sport = :{self.tls_port}"]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns] + cmd
        return bool(subprocess.run(cmd, capture_output=True, text=True).stdout.strip())

    def stop(self) -> None:
        pid = self.pid()
        if pid is None:
            return
        # Its QEMU processes (guests, capability probes) share its private mount
        # namespace: killed with it, or they would outlive it as orphans.
        family = same_mount_namespace(pid)
        for member in [pid, *family]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(member, signal.SIGKILL)
        wait_for(lambda: not any(pid_alive(p) for p in [pid, *family]), 10, "libvirtd to exit")
        (self.sock_dir / "libvirt-sock").unlink(missing_ok=True)


class Proc:
    """A real virtfleet program as a child process, its output in a log file."""

    def __init__(self, argv: list[str], log: Path, netns: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.argv, self.log_path, self.netns = argv, log, netns
        self.env = os.environ | {"PYTHONUNBUFFERED": "1"} | (env or {})
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        cmd = self.argv if not self.netns else ["ip", "netns", "exec", self.netns] + self.argv
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class Server:
    """`virtfleet-server serve` plus its admin commands."""

    def __init__(self, state: Path, port: int, *extra: str, host: str = "127.0.0.1",
                 netns: str | None = None) -> None:
        self.state, self.port, self.address, self.netns = state, port, host, netns
        self.url = f"https://{host}:{port}"
        # Short: a unix socket's path has room for 107 bytes, and pytest's dirs are long.
        digest = hashlib.sha256(str(state.resolve()).encode()).hexdigest()[:10]
        self.run_dir = Path(tempfile.gettempdir()) / f"vfr-{digest}"
        # Its own metrics port: servers of tests run side by side.
        self.metrics_url = f"http://127.0.0.1:{free_port()}/metrics"
        metrics = () if "--metrics-listen" in extra else (
            "--metrics-listen", self.metrics_url.split("/")[2])
        # And its own web page port (or the one the test chose).
        web = () if "--web-listen" in extra else ("--web-listen", f"127.0.0.1:{free_port()}")
        self.proc = Proc([str(VENV_BIN / "virtfleet-server"), "--state-dir", str(state), "serve",
                          "--listen", f"{host}:{port}", "--run-dir", str(self.run_dir), *metrics,
                          *web, *extra],
                         state.parent / f"{state.name}.log", netns=netns)

    def start(self) -> Server:
        self.proc.start()
        wait_for(lambda: (self.state / "admin.sock").exists() and self.api("GET", "/v1/status"),
                 20, "the server to answer on its admin socket")
        return self

    def admin(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([str(VENV_BIN / "virtfleet-server"), "--state-dir", str(self.state),
                                 *args], capture_output=True, text=True, timeout=30)
        if check and result.returncode != 0:
            raise AssertionError(f"virtfleet-server {' '.join(args)} failed: {result.stderr}")
        return result

    def admin_json(self, *args: str) -> Any:
        return json.loads(self.admin("--json", *args).stdout)

    def token(self, *args: str) -> str:
        return str(self.admin_json("token", "create", *args)["join"])

    def close(self) -> None:
        """Stop it and remove its run dir (a server killed with SIGKILL leaves it behind)."""
        self.proc.stop()
        shutil.rmtree(self.run_dir, ignore_errors=True)

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """The admin API called from this process: polls cost no process each (the
        command line is tested with `admin`)."""
        from server.cli import admin_call

        return admin_call(self.state, method, path, body)

    def hosts(self) -> list[dict[str, Any]]:
        return list(self.api("GET", "/v1/hosts"))

    def host(self, ref: str) -> dict[str, Any]:
        return dict(self.api("GET", f"/v1/hosts/{ref}"))

    def gateway_uri(self, ref: str) -> str:
        return str(self.host(ref)["gateway_uri"])

    def status_of(self, ref: str) -> str:
        return str(self.host(ref)["status"])

    def wait_status(self, ref: str, status: str, timeout: float = 15) -> dict[str, Any]:
        return wait_for(lambda: (h := self.host(ref))["status"] == status and h, timeout,
                        f"host {ref} to be {status}")


class Postgres:
    """A real PostgreSQL 15 of the test's own: its cluster (initdb) in a temp dir owned by
    the postgres user, as PostgreSQL refuses to run as root; its own port on `listen`
    and its own unix socket dir; trust authentication (nothing but the test reaches it)."""

    BIN = Path("/usr/lib/postgresql/15/bin")

    def __init__(self, port: int, listen: str = "127.0.0.1", netns: str | None = None) -> None:
        self.port, self.listen = port, listen
        # In /tmp itself: pytest's and bench/run's temp dirs are root's alone (0700), and
        # postgres must reach it. close() removes it.
        self.base = Path(tempfile.mkdtemp(prefix="vfpg-", dir="/tmp"))
        self.base.chmod(0o755)
        shutil.chown(self.base, "postgres", "postgres")
        self.data = self.base / "data"
        self.proc = Proc(self.as_postgres("postgres", "-D", str(self.data), "-p", str(port),
                                          "-k", str(self.base), "-c", f"listen_addresses={listen}",
                                          "-c", "max_connections=200"),
                         self.base / "postgres.log", netns=netns)

    @staticmethod
    def as_postgres(program: str, *args: str) -> list[str]:
        """`program` run as the postgres user (setpriv execs it: signals reach it)."""
        return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups",
                str(Postgres.BIN / program), *args]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@{self.listen}:{self.port}/{database}"

    def start(self) -> Postgres:
        if not self.data.exists():
            subprocess.run(self.as_postgres("initdb", "-D", str(self.data), "-U", "postgres",
                                            "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"),
                           check=True, capture_output=True, timeout=120)
            with open(self.data / "pg_hba.conf", "a") as hba:  # replicas in other namespaces
                hba.write("host all all 0.0.0.0/0 trust\n")
        self.proc.start()
        wait_for(self.ready, 30, "PostgreSQL to accept connections")
        return self

    def ready(self) -> bool:
        if not self.proc.alive():
            raise AssertionError(f"PostgreSQL exited:\n{self.proc.log()}")
        return subprocess.run([str(self.BIN / "pg_isready"), "-q", "-h", str(self.base),
                               "-p", str(self.port)]).returncode == 0

    def sql(self, statement: str, database: str = "postgres") -> str:
        result = subprocess.run(["psql", "-X", "-qAt", "-h", str(self.base), "-p", str(self.port),
                                 "-U", "postgres", "-d", database, "-v", "ON_ERROR_STOP=1",
                                 "-c", statement], capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            raise AssertionError(f"psql {statement!r}: {result.stderr}")
        return result.stdout.strip()

    def new_database(self, name: str) -> str:
        """A fresh database `name`; its URL."""
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        self.proc.stop(signal.SIGINT)  # "fast" shutdown: clients are cut off, data kept

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


class Agent:
    """`virtfleet-agent` with its own state dir and config file."""

    def __init__(self, base: Path, config_text: str, netns: str | None = None,
                 hostname: str = "", env: dict[str, str] | None = None) -> None:
        self.base, self.netns, self.env = base, netns, env or {}
        base.mkdir(parents=True, exist_ok=True)
        self.state = base / "state"
        self.config = base / "agent.toml"
        head = f'hostname = "{hostname}"\n' if hostname else ""
        self.config.write_text(head + config_text)
        self.proc: Proc | None = None

    def argv(self, *args: str) -> list[str]:
        return [str(VENV_BIN / "virtfleet-agent"), "--config", str(self.config),
                "--state-dir", str(self.state), *args]

    def run_cmd(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = self.argv(*args)
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns] + cmd
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              env=os.environ | self.env)

    def join(self, join: str, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run_cmd("join", join, *args)

    def start(self) -> Agent:
        self.proc = Proc(self.argv("run"), self.base / "agent.log", netns=self.netns,
                         env=self.env).start()
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc:
            self.proc.stop(sig)

    def host_id(self) -> str:
        return str(json.loads((self.state / "agent.json").read_text())["host_id"])




def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


NAT_RULES = """\
table ip nat {
    chain postrouting {
        type nat hook postrouting priority srcnat;
        oifname "wan" masquerade
    }
}
"""


class Network:
    """Test hosts in network namespaces: one for the server, holding a bridge, and one per
    host, joined to it by a veth pair. Addresses are made up inside 198.18.0.0/24 (the
    benchmarking range) and exist only in these namespaces.

    A NATed host (`add_natted_host`) sits on a private network, 10.99.0.0/24, behind a
    router namespace that masquerades (nftables) what leaves through its side on the
    server's bridge: the host reaches the server, and the server, which has no route to
    the private network, sees only the router's address and cannot reach the host."""

    SUBNET = "198.18.0"
    PRIVATE = "10.99.0"

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.server_ns = f"{tag}-srv"
        self.server_address = f"{self.SUBNET}.1"
        self.router_ns: str | None = None
        self.router_address = f"{self.SUBNET}.2"
        self.hosts: dict[str, str] = {}  # namespace -> address
        ip("netns", "add", self.server_ns)
        ip("-n", self.server_ns, "link", "set", "lo", "up")
        ip("-n", self.server_ns, "link", "add", "br0", "type", "bridge")
        ip("-n", self.server_ns, "addr", "add", f"{self.server_address}/24", "dev", "br0")
        ip("-n", self.server_ns, "link", "set", "br0", "up")

    def add_host(self) -> tuple[str, str]:
        index = len(self.hosts) + 1
        ns, address = f"{self.tag}-h{index}", f"{self.SUBNET}.{10 + index}"
        ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", "name", "eth0", "netns", ns, "type", "veth", "peer", "name", f"h{index}",
           "netns", self.server_ns)
        ip("-n", self.server_ns, "link", "set", f"h{index}", "master", "br0", "up")
        ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        self.hosts[ns] = address
        return ns, address

    def _router(self) -> str:
        if self.router_ns is None:
            ns = f"{self.tag}-nat"
            ip("netns", "add", ns)
            self.router_ns = ns
            ip("-n", ns, "link", "set", "lo", "up")
            ip("link", "add", "name", "wan", "netns", ns, "type", "veth", "peer", "name", "nat",
               "netns", self.server_ns)
            ip("-n", self.server_ns, "link", "set", "nat", "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{self.router_address}/24", "dev", "wan")
            ip("-n", ns, "link", "set", "wan", "up")
            ip("-n", ns, "link", "add", "lan", "type", "bridge")
            ip("-n", ns, "addr", "add", f"{self.PRIVATE}.1/24", "dev", "lan")
            ip("-n", ns, "link", "set", "lan", "up")
            in_ns = ["ip", "netns", "exec", ns]
            subprocess.run([*in_ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"], check=True,
                           timeout=10)
            subprocess.run([*in_ns, "nft", "-f", "-"], check=True, timeout=10, text=True,
                           input=NAT_RULES)
        return self.router_ns

    def add_natted_host(self) -> tuple[str, str]:
        router = self._router()
        index = len(self.hosts) + 1
        ns, address = f"{self.tag}-h{index}", f"{self.PRIVATE}.{10 + index}"
        ip("netns", "add", ns)
        ip("-n", ns, "link", "set", "lo", "up")
        ip("link", "add", "name", "eth0", "netns", ns, "type", "veth", "peer", "name", f"h{index}",
           "netns", router)
        ip("-n", router, "link", "set", f"h{index}", "master", "lan", "up")
        ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "route", "add", "default", "via", f"{self.PRIVATE}.1")
        self.hosts[ns] = address
        return ns, address

    def link(self, ns: str, up: bool) -> None:
        ip("-n", ns, "link", "set", "eth0", "up" if up else "down")
        if up and self.hosts[ns].startswith(f"{self.PRIVATE}."):  # down lost its routes
            ip("-n", ns, "route", "replace", "default", "via", f"{self.PRIVATE}.1")

    def close(self) -> None:
        for ns in [*self.hosts, *([self.router_ns] if self.router_ns else []), self.server_ns]:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@dataclass
class Fleet:
    """A server in its own network namespace and hosts each in theirs (libvirtd + agent)."""

    net: Network
    server: Server
    base: Path
    hosts: list[tuple[str, Libvirtd, Agent]] = field(default_factory=list)  # (ns, libvirtd, agent)

    @classmethod
    def in_namespaces(cls, base: Path, tag: str, *server_args: str) -> Fleet:
        """A new network (namespaces tagged `tag`) with a server, not started yet, in its
        server namespace."""
        net = Network(tag)
        server = Server(base / "server", free_port(), *server_args, host=net.server_address,
                        netns=net.server_ns)
        return cls(net, server, base)

    def add_host(self, name: str, join: bool = True, natted: bool = False,
                 token_args: tuple[str, ...] = ()) -> tuple[str, Libvirtd, Agent]:
        ns, address = self.net.add_natted_host() if natted else self.net.add_host()
        lv = Libvirtd(self.base / name / "libvirtd", free_port(), listen_addr=address, netns=ns)
        lv.start()
        agent = Agent(self.base / name, lv.agent_config(), netns=ns, hostname=name)
        if join:
            result = agent.join(self.server.token(*token_args))
            assert result.returncode == 0, result.stderr
            agent.start()
        entry = (ns, lv, agent)
        self.hosts.append(entry)
        return entry

    def statuses(self) -> dict[str, str]:
        return {h["hostname"]: h["status"] for h in self.server.hosts()}

    def close(self) -> None:
        for _ns, lv, agent in self.hosts:
            agent.stop()
            lv.stop()
        self.server.close()
        self.net.close()
