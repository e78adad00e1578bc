"""`make demo`: a server, a real libvirtd and an agent that joins it, ending with a
desktop started on the host through the engine's door (the libvirt gateway).

Everything runs on this machine from a temp directory: a private libvirtd (own config,
sockets and TLS port, in a private mount namespace), `virtfleet-server serve`, then
`virtfleet-agent join` + `run`. It prints each step, the hosts table and the host's
details, then starts a tiny transient guest on the host with `virsh` through the gateway,
shows it running on the host's own libvirtd and destroys it; exits 0 if all of that
worked (1 otherwise).
`--keep` leaves everything running until Ctrl-C or SIGTERM, to try the admin commands.

On exit, whatever ends it (done, an error, Ctrl-C, SIGTERM), the demo stops every process
it started and removes every file it made: its temp dir holds CA private keys. With
`--dir DIR` it removes what it created inside DIR (and DIR itself if it created DIR),
never anything that was there before. If the process that started it goes away (`make
demo`'s make, killed by SIGTERM: make does not pass SIGTERM on), it ends the same way.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.util import interrupt_on_sigterm, kill_processes_using  # noqa: E402
from tests.harness import Agent, Libvirtd, Server, free_port, wait_for  # noqa: E402


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def pick_role() -> str:
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "mixed"
    return "disk_operations"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true",
                        help="leave it running until Ctrl-C or SIGTERM, then clean up")
    parser.add_argument("--transport", choices=("direct", "tunnel", "auto"), default="auto",
                        help="the join token's transport (default auto, which picks direct "
                             "here): tunnel carries libvirt through a connection the agent "
                             "opens, and libvirtd listens on no TCP port")
    parser.add_argument("--dir", type=Path,
                        help="work directory (default: a new temp dir); what the demo "
                             "creates in it is removed on exit, what was there stays")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("make demo runs libvirtd in a private mount namespace: run it as root", file=sys.stderr)
        return 1
    interrupt_on_sigterm()
    end_with_parent()
    made: list[Path] = []  # what to remove at the end: filled before anything is made
    try:
        work = workdir(args.dir, made)
        return demo(work, args.keep, args.transport)
    except KeyboardInterrupt:
        print("\ninterrupted: stopping everything", file=sys.stderr, flush=True)
        return 130
    finally:
        clean_up(made)


def end_with_parent() -> None:
    """SIGTERM us when our parent dies. `make demo KEEP=1` runs us under make, and make,
    SIGTERMed, exits without passing the signal on: we would keep running, orphaned,
    with everything we started."""
    parent = os.getppid()
    PR_SET_PDEATHSIG = 1
    if ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM) != 0:
        return  # not fatal: only a SIGTERM to make itself would then leave us running
    if os.getppid() != parent:  # it died before the prctl took hold
        os.kill(os.getpid(), signal.SIGTERM)


def workdir(given: Path | None, made: list[Path]) -> Path:
    """The work dir; `made` gets what the demo will have created, to remove at the end:
    the whole dir if it made it, else (a dir the caller owns) the entries new in it."""
    if given is None:
        work = Path(tempfile.mkdtemp(prefix="virtfleet-demo-"))
        made.append(work)
        return work
    work = given.resolve()
    if not work.exists():
        made.append(work)  # before mkdir: an interrupt between the two still removes it
        work.mkdir(parents=True)
        return work
    made += [work / name for name in DEMO_ENTRIES if not (work / name).exists()]
    return work


# What the demo writes into its work dir (tests/harness.py's layout).
DEMO_ENTRIES = ("libvirtd", "server", "server.log", "agent")


def clean_up(made: list[Path]) -> None:
    """Stop any process still running from what the demo made (a libvirtd the agent
    restarted, anything an interrupt left mid-start), then remove it all."""
    for path in made:
        kill_processes_using(str(path))
    for path in made:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def demo(work: Path, keep: bool, transport: str) -> int:
    role = pick_role()
    print(f"virtfleet demo in {work}")
    print(f"role: {role} ("
          + ("/dev/kvm is usable here, so this host can run desktops and disk work)"
             if role == "mixed" else "no usable /dev/kvm here, so disk work only)"))

    libvirtd = Libvirtd(work / "libvirtd", free_port())
    server = Server(work / "server", free_port(), "--checkin-interval", "2", "--grace", "10")
    agent = Agent(work / "agent", f'role = "{role}"\n' + libvirtd.agent_config(),
                  hostname="demo-hv-01")
    try:
        step(f"starting a private libvirtd (socket dir {libvirtd.sock_dir}, TLS port "
             f"{libvirtd.tls_port})")
        libvirtd.start()
        step(f"starting virtfleet-server on {server.url} (state in {server.state})")
        server.start()
        step(f"virtfleet-server token create --role {role} --ttl 1h --uses 1 "
             f"--transport {transport}")
        join = server.token("--role", role, "--ttl", "1h", "--uses", "1", "--transport", transport)
        print(f"virtfleet-agent join '{join[:40]}…'")
        started = time.monotonic()
        step("on the host: virtfleet-agent join (keys made locally, CA checked against the pin)")
        result = agent.join(join)
        print((result.stdout + result.stderr).strip())
        if result.returncode != 0:
            return 1
        step("on the host: virtfleet-agent run")
        agent.start()
        host_id = agent.host_id()
        try:
            server.wait_status(host_id, "online", 60)
        except AssertionError:
            print(server.admin("hosts", "show", host_id).stdout)
            print(f"the host did not come online; logs: {server.proc.log_path}, "
                  f"{agent.proc.log_path if agent.proc else ''}", file=sys.stderr)
            return 1
        elapsed = time.monotonic() - started
        way = server.host(host_id)["connection"]["transport"]["in_use"]
        step(f"online over {'the tunnel the agent opened' if way == 'tunnel' else 'qemu+tls'}, "
             f"{elapsed:.2f} s after `join` started")
        if way == "tunnel":
            listening = subprocess.run(["ss", "-Hltn", f"sport = :{libvirtd.tls_port}"],
                                       capture_output=True, text=True, timeout=10).stdout.strip()
            print(f"libvirtd's TLS port {libvirtd.tls_port}: "
                  + ("listening?!" if listening else "not listening (libvirtd has no TCP port)"))
        print(server.admin("hosts", "list").stdout)
        print(server.admin("hosts", "show", host_id).stdout, flush=True)
        if not start_desktop(work, server, libvirtd, host_id, role):
            return 1
        if keep:
            wait_until_stopped(server, agent, host_id)
        return 0
    finally:
        agent.stop()
        server.proc.stop()
        libvirtd.stop()
        wait_for(lambda: libvirtd.pid() is None, 10, "libvirtd to stop")


TINY_DESKTOP = """<domain type='{virt}'><name>demo-desktop</name>
<memory unit='MiB'>32</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices></domain>"""


def start_desktop(work: Path, server: Server, libvirtd: Libvirtd, host_id: str, role: str) -> bool:
    """What an engine does next: a (tiny, diskless, transient) desktop started on the host
    through the engine's door, the gateway, seen running on the host's own libvirtd."""
    uri = server.admin("hosts", "uri", host_id).stdout.strip()
    xml = work / "agent" / "demo-desktop.xml"
    xml.write_text(TINY_DESKTOP.format(virt="kvm" if role == "mixed" else "qemu"))
    step(f'virsh -c "$(virtfleet-server hosts uri {host_id})" create {xml.name}'
         f"\n    ({uri})")
    commands = [("create", str(xml)), ("list",)]
    for args in commands:
        result = subprocess.run(["virsh", "-c", uri, *args], capture_output=True, text=True,
                                timeout=60)
        print((result.stdout + result.stderr).strip())
        if result.returncode != 0:
            return False
    step("on the host's own libvirtd (its unix socket, not through virtfleet):")
    print(subprocess.run(["virsh", "-c", libvirtd.uri, "list"], capture_output=True, text=True,
                         timeout=30).stdout.strip())
    running = "demo-desktop" in subprocess.run(
        ["virsh", "-c", libvirtd.uri, "list", "--name"], capture_output=True, text=True,
        timeout=30).stdout
    step("virsh destroy demo-desktop (through the gateway)")
    result = subprocess.run(["virsh", "-c", uri, "destroy", "demo-desktop"], capture_output=True,
                            text=True, timeout=60)
    print((result.stdout + result.stderr).strip())
    if running and result.returncode == 0:
        print("a desktop ran on the host, started through the gateway: no SSH, no root password",
              flush=True)
    return running and result.returncode == 0


def wait_until_stopped(server: Server, agent: Agent, host_id: str) -> None:
    state = f"--state-dir {server.state}"
    print(f"\nstill running. Try:\n  .venv/bin/virtfleet-server {state} hosts list\n"
          f"  .venv/bin/virtfleet-server {state} hosts disable {host_id}\n"
          f"  .venv/bin/virtfleet-agent --state-dir {agent.state} status\n"
          "Ctrl-C (or SIGTERM) stops everything and removes what the demo made.", flush=True)
    try:
        while True:
            signal.pause()  # interrupt_on_sigterm's handler raises KeyboardInterrupt here
    except KeyboardInterrupt:
        print("stopping everything", flush=True)


if __name__ == "__main__":
    sys.exit(main())
