"""`virtfleet-agent`: join a server, run the check-in loop, show status."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from agent import config as config_mod
from agent.config import AgentConfig, ConfigError
from agent.libvirt_tls import TLSSetupError
from agent.runner import Runner
from agent.state import Enrollment, State
from common import logs, notify, wire
from common.cli import ago, fail, print_json, when

log = logging.getLogger("agent")

EXIT_NOT_ENROLLED = 2  # the unit's RestartPreventExitStatus: restarting will not help

EPILOG = """\
examples:
  virtfleet-agent join 'vfjoin1.…'            # enroll (as printed by `virtfleet-server token create`)
  virtfleet-agent run                          # check in forever (what the systemd unit runs)
  virtfleet-agent status                       # identity, server, last check-in
"""


def add_shared_options(parser: argparse.ArgumentParser, after_command: bool = False) -> None:
    """Options every command takes, before or after its name (`--state-dir DIR status` and
    `status --state-dir DIR` alike). After the name they have no default, so they
    override what came before only when given."""
    def default(value: object) -> object:
        return argparse.SUPPRESS if after_command else value

    parser.add_argument("--config", type=Path, default=default(config_mod.DEFAULT_CONFIG),
                        help=f"config file (default {config_mod.DEFAULT_CONFIG}; missing is fine)")
    parser.add_argument("--state-dir", type=Path, default=default(None),
                        help=f"identity and status (default {config_mod.DEFAULT_STATE_DIR})")
    parser.add_argument("--log-level", default=default(None),
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="virtfleet-agent", epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="virtfleet host agent: enrolls this KVM host with a join token, sets up "
                    "libvirtd's TLS listener for the server, and checks in on its own.")
    add_shared_options(p)
    shared = argparse.ArgumentParser(add_help=False)  # the same options, also after the command
    add_shared_options(shared, after_command=True)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    j = sub.add_parser("join", help="enroll this host with a server, using a join string",
                       parents=[shared])
    j.add_argument("join", help="the join string printed by `virtfleet-server token create`")
    j.add_argument("--role", choices=wire.ROLES, help="this host's role (default: config, else mixed)")
    j.add_argument("--hostname", help="name to report (default: this machine's hostname)")
    j.add_argument("--force", action="store_true", help="join again even if already enrolled")
    r = sub.add_parser("run", help="check in with the server until stopped (SIGTERM)", parents=[shared])
    r.add_argument("--once", action="store_true", help="check in once and exit (0 if it worked)")
    s = sub.add_parser("status", help="identity, server, and the last check-in", parents=[shared])
    s.add_argument("--json", action="store_true", help="print JSON")
    return p


def load_config(args: argparse.Namespace) -> AgentConfig:
    config = config_mod.load(args.config)
    state_dir = args.state_dir or config_mod.env_state_dir()
    if state_dir:
        config.state_dir = state_dir
    if getattr(args, "role", None):
        config.role = args.role
    if getattr(args, "hostname", None):
        config.hostname = args.hostname
    if args.log_level:
        config.log_level = args.log_level
    config.validate()
    return config


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load_config(args)
    except ConfigError as exc:
        return fail(f"configuration: {exc}")
    logs.setup("virtfleet-agent", config.log_level)
    state = State(config.state_dir)
    if args.command == "join":
        return cmd_join(args.join, config, state, args.force)
    if args.command == "status":
        return cmd_status(state, args.json)
    return asyncio.run(cmd_run(config, state, args.config, once=args.once))


def cmd_join(text: str, config: AgentConfig, state: State, force: bool) -> int:
    # Imported here, as in the runner: `run` does not load cryptography (4 MB) unless it must.
    from agent.enroll import JoinError, join

    try:
        enrollment = asyncio.run(join(text, config, state, force=force))
    except (JoinError, TLSSetupError) as exc:
        return fail(f"join failed: {exc}")
    except PermissionError as exc:
        return fail(f"join failed: {exc} (run as root)")
    print(f"enrolled as host {enrollment.host_id} with {enrollment.server_url} "
          f"(role {enrollment.role})")
    # Check in now: the server opens its libvirt connection while the operator starts the
    # service, instead of after.
    last = asyncio.run(check_in_once(config, state, enrollment))
    if last.get("ok"):
        print(f"checked in: the server says {last.get('status')}")
    else:
        print(f"the first check-in failed ({last.get('error')}); the agent retries when it runs")
    print(f"next: start the agent (systemctl enable --now virtfleet-agent, or "
          f"virtfleet-agent --state-dir {state.dir} run)")
    return 0


async def check_in_once(config: AgentConfig, state: State, enrollment: Enrollment) -> dict[str, Any]:
    """One check-in; returns what it recorded (status.json)."""
    runner = Runner(config, state, enrollment)
    try:
        await runner.checkin_once()
    finally:
        await runner.shutdown()
    return runner.last


async def cmd_run(config: AgentConfig, state: State, config_path: Path,
                  once: bool = False) -> int:
    enrollment = state.enrolled()
    if enrollment is None and config.join:
        from agent.enroll import JoinError, join  # as in cmd_join

        log.info("not enrolled yet: joining with the join string from %s", config_path)
        try:
            enrollment = await join(config.join, config, state)
        except (JoinError, TLSSetupError) as exc:
            log.error("unattended join failed: %s", exc)
            return 1
    if enrollment is not None and config.join:
        try:
            if config_mod.forget_join(config_path):
                log.info("removed the spent join string from %s", config_path)
        except OSError as exc:
            log.warning("could not remove the join string from %s: %s", config_path, exc)
    if enrollment is None:
        log.error("this host is not enrolled: run `virtfleet-agent join '<JOIN>'` first, "
                  "or put the join string in %s", config_mod.DEFAULT_CONFIG)
        return EXIT_NOT_ENROLLED
    if not config.role_from_file:
        config.role = enrollment.role
    if once:
        return 0 if (await check_in_once(config, state, enrollment)).get("ok") else 1
    runner = Runner(config, state, enrollment)
    await runner.start()
    notify.ready(f"checking in with {enrollment.server_url} as {config.hostname}")
    log.info("agent running: host %s, server %s, role %s", enrollment.host_id,
             enrollment.server_url, config.role)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.create_task(stop.wait())
    crashed = asyncio.create_task(runner.wait())
    await asyncio.wait([stopper, crashed], return_when=asyncio.FIRST_COMPLETED)
    notify.stopping()
    # Read before shutdown: shutdown cancels the loops, and `crashed` with them.
    failure = crashed.exception() if crashed.done() else None
    stopper.cancel()
    crashed.cancel()
    await runner.shutdown()
    if failure:
        log.error("agent loop failed: %r", failure)
        return 1
    return 0


def cmd_status(state: State, as_json: bool) -> int:
    enrollment = state.enrolled()
    if enrollment is None:
        return fail(f"not enrolled (no identity in {state.dir}): run `virtfleet-agent join '<JOIN>'`",
                    EXIT_NOT_ENROLLED)
    status = state.load_status()
    data: dict[str, Any] = {
        "host_id": enrollment.host_id, "server": enrollment.server_url, "role": enrollment.role,
        "enrolled_at": enrollment.enrolled_at,
        "certificate_expires": state.identity_expiry(), "last_checkin": status,
    }
    if as_json:
        print_json(data)
        return 0
    print(f"host id:      {enrollment.host_id}")
    print(f"server:       {enrollment.server_url}")
    print(f"role:         {enrollment.role}")
    print(f"enrolled:     {when(enrollment.enrolled_at)}")
    print(f"certificate:  expires {when(data['certificate_expires'])}")
    if not status:
        print("last check-in: none yet")
        return 0
    result = "ok" if status.get("ok") else f"FAILED: {status.get('error')}"
    print(f"last check-in: {when(status.get('at'))} ({ago(status.get('at'))}): {result}")
    if status.get("status"):
        print(f"server says:  {status['status']}: {status.get('detail', '')}")
    if status.get("last_success") and not status.get("ok"):
        print(f"last success: {when(status['last_success'])} ({ago(status['last_success'])})")
    libvirtd = status.get("libvirtd") or {}
    if libvirtd:
        print("libvirtd:     " + ("answers" if libvirtd.get("ok") else f"DOWN: {libvirtd.get('error')}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
