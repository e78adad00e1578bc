"""`virtfleet-agent`: join a server, run the check-in loop, show status."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

from agent import config as config_mod
from agent.checkin import MAX_INTERVAL, Outcome, check_in_once
from agent.config import AgentConfig, ConfigError
from agent.libvirt_tls import TLSSetupError
from agent.state import Enrollment, State
from common import VERSION, logs, notify, wire
from common.cli import Subcommands, ago, complete, fail, print_json, when
from common.tls import limit_tls_buffers

log = logging.getLogger("agent")

# Exit codes (also in --help). 2 and 4 are the unit's RestartPreventExitStatus: restarting
# will not help.
EXIT_FAILED = 1  # a command failed; `status`: the host is not healthy, or agent.toml is broken
EXIT_NOT_ENROLLED = 2
EXIT_NOT_RUNNING = 3  # `status`: no `virtfleet-agent run` acts for this state dir
EXIT_REFUSED = 4  # `run`: the server refuses this host's identity: only a new join helps

MAX_JOIN_TEXT = 16 * 1024  # a join string is ~1 KiB; a file or pipe of more is not one
LIBVIRTD_PROBE_TIMEOUT = 5.0
# `status` calls a check-in overdue this long after it was due: a check-in may take its
# call's 20 s, and a backoff is recorded as the next due time.
OVERDUE_SLACK = 60.0

EPILOG = f"""\
examples:
  virtfleet-agent join -                       # enroll; paste the join string (or pipe it) on stdin
  virtfleet-agent join --join-file FILE        # enroll with the join string in FILE
  virtfleet-agent join 'vfjoin1.…'            # the same, but the string shows in `ps` while it runs
  virtfleet-agent run                          # check in forever (what the systemd unit runs)
  virtfleet-agent status                       # is this host healthy? (a monitoring check)
  virtfleet-agent set-server https://new:8443  # the same server at another URL (the CA pin is checked)

exit codes:
  0  done; `status`: healthy
  {EXIT_FAILED}  failed; `status`: not healthy (the last check-in failed or is overdue, the
     server says `error`, libvirtd does not answer now, the certificate expired), or
     agent.toml has an error
  {EXIT_NOT_ENROLLED}  this host is not enrolled: `virtfleet-agent join`
  {EXIT_NOT_RUNNING}  `status`: the agent is not running (`systemctl start virtfleet-agent`)
  {EXIT_REFUSED}  `run`: the server refuses this host's identity (forgotten, or its certificate
     expired): join again with a new token, `virtfleet-agent join --force -`
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
    p.add_argument("--version", action="version", version=f"virtfleet-agent {VERSION}")
    add_shared_options(p)
    shared = argparse.ArgumentParser(add_help=False)  # the same options, also after the command
    add_shared_options(shared, after_command=True)
    sub = Subcommands(p.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    j = sub.add_parser("join", help="enroll this host with a server, using a join string",
                       parents=[shared])
    j.add_argument("join", nargs="?",
                   help="the join string printed by `virtfleet-server token create`, or - to "
                        "read it from stdin (so it never shows in the process list)")
    j.add_argument("--join-file", type=Path, metavar="PATH",
                   help="read the join string from PATH instead")
    j.add_argument("--role", choices=wire.ROLES,
                   help="this host's role (default: agent.toml's, else the one this host joined "
                        "with, else the token's)")
    j.add_argument("--hostname", help="name to report, kept for later check-ins (default: "
                                      "agent.toml's, else the one joined with, else this "
                                      "machine's hostname)")
    j.add_argument("--force", action="store_true", help="join again even if already enrolled")
    r = sub.add_parser("run", help="check in with the server until stopped (SIGTERM)", parents=[shared])
    r.add_argument("--once", action="store_true", help="check in once and exit (0 if it worked)")
    s = sub.add_parser("status", help="is this host healthy: agent, last check-in, libvirtd now",
                       parents=[shared])
    s.add_argument("--json", action="store_true", help="print JSON")
    m = sub.add_parser("set-server", parents=[shared],
                       help="reach this host's server at another URL (a new port or DNS name)",
                       description="Check that URL serves the CA this host joined (its pin) and "
                                   "knows this host (a check-in), then use it from now on. Stop "
                                   "the agent first; start it again after.")
    m.add_argument("url", help="https://HOST[:PORT] of the same server")
    return p


def load_config(args: argparse.Namespace, strict: bool = True) -> tuple[AgentConfig, str]:
    """The settings, and the config file's error ("" if none). Not `strict` (`status`, which
    only reads): a broken file gives the defaults and its error instead of stopping."""
    error = ""
    try:
        config = config_mod.load(args.config)
    except ConfigError as exc:
        if strict:
            raise
        config, error = AgentConfig(), str(exc)
    state_dir = args.state_dir or config_mod.env_state_dir()
    if state_dir:
        config.state_dir = state_dir
    if getattr(args, "role", None):
        config.role = args.role
    if getattr(args, "hostname", None):
        config.hostname, config.hostname_given = args.hostname, True
    if args.log_level:
        config.log_level = args.log_level
    config.validate()
    return config, error


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    complete(parser)
    args = parser.parse_args(argv)
    try:
        config, config_error = load_config(args, strict=args.command != "status")
    except ConfigError as exc:
        return fail(f"configuration: {exc}")
    logs.setup("virtfleet-agent", config.log_level)
    state = State(config.state_dir)
    if args.command == "join":
        try:
            text = read_join(args)
        except ValueError as exc:
            return fail(str(exc))
        return cmd_join(text, config, state, args.force)
    if args.command == "status":
        return cmd_status(config, state, args.json, config_error)
    if args.command == "set-server":
        return cmd_set_server(args.url, config, state)
    return asyncio.run(cmd_run(config, state, args.config, once=args.once))


def read_join(args: argparse.Namespace) -> str:
    """The join string from the command line, stdin (`-`) or --join-file."""
    if args.join_file is not None and args.join is not None:
        raise ValueError("give the join string once: as an argument, - for stdin, or --join-file")
    if args.join_file is not None:
        try:
            with open(args.join_file, "rb") as f:
                raw = f.read(MAX_JOIN_TEXT + 1)
        except OSError as exc:
            raise ValueError(f"--join-file {args.join_file}: {exc.strerror or exc}") from None
        return _join_text(raw, f"--join-file {args.join_file}")
    if args.join == "-":
        if sys.stdin.isatty():
            print("paste the join string, then Enter:", file=sys.stderr)
        return _join_text(sys.stdin.buffer.readline(MAX_JOIN_TEXT + 1), "stdin")
    if args.join is None:
        raise ValueError("join needs the join string: `virtfleet-agent join -` reads it from "
                         "stdin, `--join-file PATH` from a file")
    return str(args.join)


def _join_text(raw: bytes, source: str) -> str:
    if len(raw) > MAX_JOIN_TEXT:
        raise ValueError(f"{source} holds more than {MAX_JOIN_TEXT} bytes: not a join string")
    text = raw.decode(errors="replace").strip()
    if not text:
        raise ValueError(f"{source} is empty: expected the join string "
                         "printed by `virtfleet-server token create`")
    return text


def _lock_or_say_why(state: State, doing: str | None, failed: str) -> Any:
    """Take the state dir's lock (the returned object), or return an exit code after saying
    who holds it and what to do (`failed`: how an error starts)."""
    try:
        state.prepare()
        lock = state.lock()
        taken = lock.acquire()
    except OSError as exc:
        return fail(f"{failed}: {exc} (run as root)")
    if taken:
        return lock
    pid = lock.holder()
    if not _is_run(pid):
        return fail(f"another virtfleet-agent (pid {pid}) is acting for {state.dir}: wait for it "
                    "to finish, then try again")
    if doing:
        return fail(f"virtfleet-agent run is running for {state.dir} (pid {pid}): {doing} now "
                    "would change this host's identity under it. Stop it first (systemctl stop "
                    f"virtfleet-agent, or kill {pid}), try again, then start it again (systemctl "
                    "start virtfleet-agent)")
    return fail(f"virtfleet-agent run is already running for {state.dir} (pid {pid}): one "
                "agent per host (its state: virtfleet-agent status)")


def _is_run(pid: int | None) -> bool:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"run" in argv


def cmd_join(text: str, config: AgentConfig, state: State, force: bool) -> int:
    # Imported here, as in the certificate manager: `run` does not load cryptography (4 MB)
    # unless it must.
    from agent.enroll import JoinError, join

    lock = _lock_or_say_why(state, "joining", "join failed")
    if isinstance(lock, int):
        return lock
    try:
        try:
            enrollment = asyncio.run(join(text, config, state, force=force))
        except (JoinError, TLSSetupError) as exc:
            return fail(f"join failed: {exc}")
        except PermissionError as exc:
            return fail(f"join failed: {exc} (run as root)")
        print(f"enrolled as host {enrollment.host_id} with {enrollment.server_url} "
              f"(role {enrollment.role}, hostname {enrollment.hostname})")
        # Check in now: the server opens its libvirt connection while the operator starts
        # the service, instead of after.
        outcome = asyncio.run(check_in_once(config, state, enrollment))
    finally:
        lock.release()
    if outcome.answer is not None:
        print(f"checked in: the server says {outcome.answer.status}")
    else:
        print(f"the first check-in failed ({outcome.message}); the agent retries when it runs")
    print(f"next: start the agent (systemctl enable --now virtfleet-agent, or "
          f"virtfleet-agent --state-dir {state.dir} run)")
    return 0


def cmd_set_server(url: str, config: AgentConfig, state: State) -> int:
    """Re-point the host at another URL of the same server: trusted only if it serves the CA
    the host joined (the pin in agent.json) and accepts this host's identity."""
    from agent.enroll import JoinError, check_server  # cryptography, for the pin

    url = url.rstrip("/")
    enrollment = state.enrolled()
    if enrollment is None:
        return fail(f"not enrolled (no identity in {state.dir}): run `virtfleet-agent join -`",
                    EXIT_NOT_ENROLLED)
    lock = _lock_or_say_why(state, "moving it to another server URL", "set-server failed")
    if isinstance(lock, int):
        return lock
    try:
        try:
            asyncio.run(check_server(url, enrollment.ca_pin))
        except JoinError as exc:
            return fail(f"set-server: {exc}")
        use_enrollment(config, state, enrollment)
        moved = Enrollment(**(vars(enrollment) | {"server_url": url, "server_url_by_hand": True}))
        outcome = asyncio.run(check_in_once(config, state, moved))
        if outcome.answer is None:
            return fail(f"set-server: {url} serves this host's CA, but the check-in failed: "
                        f"{outcome.message}; still using {enrollment.server_url}")
        state.update_enrollment(moved)
    finally:
        lock.release()
    print(f"host {enrollment.host_id} now uses {url} (was {enrollment.server_url}); the server "
          f"says {outcome.answer.status}. Start the agent again: systemctl start virtfleet-agent")
    return 0


def use_enrollment(config: AgentConfig, state: State, enrollment: Enrollment) -> None:
    """The role and hostname to report: agent.toml's when it sets them (a new hostname is
    remembered), else those the host joined with."""
    if not config.role_from_file:
        config.role = enrollment.role
    if config.hostname_given and config.hostname != enrollment.hostname:
        log.info("hostname %r from %s replaces %r", config.hostname, config.path,
                 enrollment.hostname or "(the machine's)")
        enrollment.hostname = config.hostname
        try:
            state.update_enrollment(enrollment)
        except OSError as exc:
            log.warning("cannot save the new hostname: %s", exc)
    elif enrollment.hostname:
        config.hostname = enrollment.hostname


async def cmd_run(config: AgentConfig, state: State, config_path: Path,
                  once: bool = False) -> int:
    lock = _lock_or_say_why(state, None, f"cannot use the state dir {state.dir}")
    if isinstance(lock, int):
        return lock
    try:
        return await _run(config, state, config_path, once)
    finally:
        lock.release()


async def _run(config: AgentConfig, state: State, config_path: Path, once: bool) -> int:
    enrollment = await _enrolled(config, state, config_path)
    if isinstance(enrollment, int):
        return enrollment
    use_enrollment(config, state, enrollment)
    if once:
        return 0 if (await check_in_once(config, state, enrollment)).ok else EXIT_FAILED
    from agent.runner import Runner  # not for `join` or `status`
    from agent.tunnel import TLS_READ_BUFFER

    limit_tls_buffers(TLS_READ_BUFFER)
    runner = Runner(config, state, enrollment)
    await runner.start()
    notify.ready(f"checking in with {enrollment.server_url} as {config.hostname}")
    log.info("agent running: host %s, server %s, role %s, hostname %s", enrollment.host_id,
             enrollment.server_url, config.role, config.hostname)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.create_task(stop.wait())
    ended = asyncio.create_task(runner.wait())
    await asyncio.wait([stopper, ended], return_when=asyncio.FIRST_COMPLETED)
    notify.stopping()
    # Read before shutdown: shutdown cancels the loops, and `ended` with them.
    failure = ended.exception() if ended.done() else None
    refused: Outcome | None = ended.result() if ended.done() and not failure else None
    stopper.cancel()
    ended.cancel()
    await runner.shutdown()
    if failure:
        log.error("agent loop failed: %r", failure)
        return EXIT_FAILED
    if refused is not None:
        log.error("stopped: %s", refused.message)
        return EXIT_REFUSED
    return 0


async def _enrolled(config: AgentConfig, state: State, config_path: Path) -> Enrollment | int:
    """The host's enrollment, joining first with agent.toml's join string if there is one."""
    enrollment = state.enrolled()
    if enrollment is None and config.join:
        from agent.enroll import JoinError, join  # as in cmd_join

        log.info("not enrolled yet: joining with the join string from %s", config_path)
        try:
            enrollment = await join(config.join, config, state)
        except (JoinError, TLSSetupError) as exc:
            log.error("unattended join failed: %s", exc)
            return EXIT_FAILED
    if enrollment is not None and config.join:
        try:
            if config_mod.forget_join(config_path):
                log.info("removed the spent join string from %s", config_path)
        except OSError as exc:
            log.warning("could not remove the join string from %s: %s", config_path, exc)
    if enrollment is None:
        log.error("this host is not enrolled: run `virtfleet-agent join -` (and paste the join "
                  "string) first, or put it in %s", config_mod.DEFAULT_CONFIG)
        return EXIT_NOT_ENROLLED
    return enrollment


# -- status ---------------------------------------------------------------------


def cmd_status(config: AgentConfig, state: State, as_json: bool, config_error: str = "") -> int:
    """What this host's agent knows, checked now: exit 0 only when it is healthy."""
    if config_error:
        print(f"warning: configuration: {config_error} (the agent will not start with it; "
              f"shown with default settings and {state.dir})", file=sys.stderr)
    try:
        enrollment = state.enrolled()
    except (OSError, ValueError, TypeError) as exc:
        return fail(f"cannot read this host's enrollment in {state.dir}: {exc}")
    if enrollment is None:
        return fail(f"not enrolled (no identity in {state.dir}): run `virtfleet-agent join -`",
                    EXIT_FAILED if config_error else EXIT_NOT_ENROLLED)
    from agent.local_libvirt import probe

    data = _status_data(config, state, enrollment, probe(config.libvirt.uri, LIBVIRTD_PROBE_TIMEOUT))
    if config_error:
        data["problems"].insert(0, f"agent.toml has an error: {config_error}")
    if as_json:
        print_json(data)
    else:
        _print_status(data)
    if config_error:
        return EXIT_FAILED
    if data["agent_pid"] is None:
        return EXIT_NOT_RUNNING
    return EXIT_FAILED if data["problems"] else 0


def _status_data(config: AgentConfig, state: State, enrollment: Enrollment,
                 libvirtd_now: str | None) -> dict[str, Any]:
    now = time.time()
    status = state.load_status()
    expires = state.identity_expiry()
    pid = state.lock().holder()
    problems = []
    if pid is None:
        problems.append(f"the agent is not running (no `virtfleet-agent run` holds "
                        f"{state.dir}/agent.lock)")
    if expires <= now:
        problems.append(f"the certificate expired {ago(expires, now)}")
    if not status:
        problems.append("no check-in yet")
    elif not status.get("ok"):
        problems.append(f"the last check-in failed: {status.get('error')}")
    else:
        due = status.get("next_at") or status.get("at", 0) + MAX_INTERVAL
        if pid is not None and now > due + OVERDUE_SLACK:
            problems.append(f"the next check-in was due {ago(due, now)} and has not happened")
        if status.get("status") == "error":
            problems.append(f"the server says error: {status.get('detail')}")
    if libvirtd_now is not None:
        problems.append(f"libvirtd does not answer now: {libvirtd_now}")
    tunnel = status.get("tunnel") if status else None
    if tunnel and not tunnel.get("open") and tunnel.get("error") and pid is not None:
        problems.append(f"the server asks for a tunnel and none is open: {tunnel['error']}")
    return {
        "host_id": enrollment.host_id, "server": enrollment.server_url, "role": enrollment.role,
        "hostname": enrollment.hostname or config.hostname, "enrolled_at": enrollment.enrolled_at,
        "certificate_expires": expires, "last_checkin": status, "agent_pid": pid,
        "libvirtd_now": {"uri": config.libvirt.uri, "ok": libvirtd_now is None,
                         "error": libvirtd_now},
        "healthy": not problems, "problems": problems, "checked_at": now,
    }


def _print_status(data: dict[str, Any]) -> None:
    status, pid = data["last_checkin"], data["agent_pid"]
    print(f"host id:      {data['host_id']}")
    print(f"hostname:     {data['hostname']}")
    print(f"server:       {data['server']}")
    print(f"role:         {data['role']}")
    print(f"enrolled:     {when(data['enrolled_at'])}")
    print(f"certificate:  expires {when(data['certificate_expires'])} "
          f"({ago(data['certificate_expires'])})")
    print("agent:        " + (f"running (pid {pid})" if pid is not None else "NOT RUNNING"))
    if not status:
        print("last check-in: none yet")
    else:
        result = "ok" if status.get("ok") else f"FAILED: {status.get('error')}"
        if status.get("ok") and status.get("sent") == "heartbeat":
            result += f" (a heartbeat; the full report went {ago(status.get('report_at'))})"
        print(f"last check-in: {when(status.get('at'))} ({ago(status.get('at'))}): {result}")
        if status.get("next_at") and pid is not None:
            print(f"next check-in: due {when(status['next_at'])} ({ago(status['next_at'])})")
        if status.get("status"):
            print(f"server says:  {status['status']}: {status.get('detail', '')} "
                  f"(as of {ago(status.get('last_success'))})")
        if status.get("last_success") and not status.get("ok"):
            print(f"last success: {when(status['last_success'])} ({ago(status['last_success'])})")
    tunnel = status.get("tunnel") if status else None
    if tunnel:
        print("tunnel:       " + (
            f"open since {when(tunnel['since'])}, {tunnel['streams']} stream(s) open, "
            f"{tunnel['streams_served']} served, {tunnel['bytes_in']} B in, "
            f"{tunnel['bytes_out']} B out" if tunnel.get("open")
            else f"NOT OPEN: {tunnel.get('error') or 'opening'}")
            + f" (as of {ago(status.get('at'))})")
    now = data["libvirtd_now"]
    print("libvirtd:     " + ("answers now" if now["ok"] else f"DOWN now: {now['error']}")
          + f" ({now['uri']})")
    libvirtd = status.get("libvirtd") if status else None
    if libvirtd:
        seen = "answered" if libvirtd.get("ok") else f"was down: {libvirtd.get('error')}"
        print(f"              at the last check-in ({ago(status.get('libvirtd_at') or status.get('at'))}): "
              f"{seen}")
    print("health:       " + ("ok" if data["healthy"] else "UNHEALTHY: " + "; ".join(data["problems"])))


if __name__ == "__main__":
    sys.exit(main())
