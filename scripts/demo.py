"""`make demo`: a server, a real libvirtd and an agent that joins it, ending online.

Everything runs on this machine from a temp directory: a private libvirtd (own config,
sockets and TLS port, in a private mount namespace), `virtfleet-server serve`, then
`virtfleet-agent join` + `run`. It prints each step, the hosts table and the host's
details, and exits 0 once the host is online over qemu+tls (1 otherwise).
`--keep` leaves everything running until Ctrl-C, to try the admin commands.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
    parser.add_argument("--keep", action="store_true", help="leave it running until Ctrl-C")
    parser.add_argument("--dir", type=Path, help="work directory (default: a new temp dir)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("make demo runs libvirtd in a private mount namespace: run it as root", file=sys.stderr)
        return 1
    work = args.dir or Path(tempfile.mkdtemp(prefix="virtfleet-demo-"))
    work.mkdir(parents=True, exist_ok=True)
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
        step(f"virtfleet-server token create --role {role} --ttl 1h --uses 1")
        join = server.token("--role", role, "--ttl", "1h", "--uses", "1")
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
        step(f"online over qemu+tls, {elapsed:.2f} s after `join` started")
        print(server.admin("hosts", "list").stdout)
        print(server.admin("hosts", "show", host_id).stdout)
        if args.keep:
            state = f"--state-dir {server.state}"
            print(f"\nstill running. Try:\n  .venv/bin/virtfleet-server {state} hosts list\n"
                  f"  .venv/bin/virtfleet-server {state} hosts disable {host_id}\n"
                  f"  .venv/bin/virtfleet-agent --state-dir {agent.state} status\n"
                  "Ctrl-C stops everything.")
            signal.sigwait({signal.SIGINT, signal.SIGTERM})
        return 0
    finally:
        agent.stop()
        server.proc.stop()
        libvirtd.stop()
        wait_for(lambda: libvirtd.pid() is None, 10, "libvirtd to stop")


if __name__ == "__main__":
    sys.exit(main())
