"""`virtfleet-server`: run the server, and the operator's commands for tokens and hosts.

The admin commands talk to the running server over its unix socket
(`STATE_DIR/admin.sock`, mode 0600), found through `--state-dir`.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from common import VERSION, logs, wire
from common.cli import Subcommands, ago, complete, duration, fail, print_json, printable, table, when
from server.config import (
    DEFAULT_CONFIG_FILE,
    DEFAULT_METRICS_LISTEN,
    DEFAULT_PORT,
    DEFAULT_RUN_DIR,
    DEFAULT_STATE_DIR,
    DEFAULT_WEB_LISTEN,
    DEFAULT_WEB_SESSION_IDLE,
    ServerConfig,
    database_url,
    unreachable_url_problem,
    web_problem,
)
from server.store import DEFAULT_AUDIT_RETENTION, StoreError
from server.views import describe_facts, describe_transport, short

EPILOG = """\
examples:
  virtfleet-server serve --listen 0.0.0.0:8443 --advertise-url https://vdi.example.org:8443
  virtfleet-server init --database postgresql://virtfleet@db.example.org/virtfleet
  virtfleet-server token create --role hypervisor --ttl 1h --uses 1
  virtfleet-server hosts list
  virtfleet-server hosts show hv-03
  virtfleet-server web-login
"""


HOST_REF = "host id, a unique id prefix (2+ characters) or a hostname; ids win over hostnames"


class AdminError(Exception):
    pass


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: Path) -> None:
        super().__init__("localhost", timeout=30)
        self.path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(str(self.path))


def admin_call(state_dir: Path, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    sock = state_dir / "admin.sock"
    conn = _UnixConnection(sock)
    try:
        conn.request(method, path, body=json.dumps(body) if body is not None else None,
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        data = json.loads(resp.read() or b"null")
    except FileNotFoundError:
        raise AdminError(f"no server socket at {sock}: is virtfleet-server running with "
                         f"--state-dir {state_dir}? (systemctl status virtfleet-server)") from None
    except PermissionError:
        raise AdminError(f"permission denied on {sock}: admin commands must run as the "
                         "server's user (root)") from None
    except ConnectionRefusedError:
        raise AdminError(f"the server is not answering on {sock} (stopped?)") from None
    except (OSError, ValueError, http.client.HTTPException) as exc:
        raise AdminError(f"talking to the server at {sock} failed: {exc}") from None
    finally:
        conn.close()
    if resp.status >= 400:
        message = data.get("message") if isinstance(data, dict) else None
        raise AdminError(message or f"server answered HTTP {resp.status}")
    return data


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(DEFAULT_PORT)
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the port must be a number") from None
    if not 0 < number < 65536:
        raise argparse.ArgumentTypeError(f"{text!r}: the port must be 1-65535")
    return host.strip("[]") or "0.0.0.0", number


def parse_metrics_listen(text: str) -> tuple[str, int] | None:
    if text.strip().lower() == "off":
        return None
    if ":" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: give HOST:PORT (e.g. 127.0.0.1:9464) or off")
    return parse_listen(text)


def parse_web_listen(text: str) -> tuple[str, int] | None:
    if text.strip().lower() != "off" and ":" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: give HOST:PORT (e.g. 127.0.0.1:8444) or off")
    return parse_metrics_listen(text)


def reference(text: str) -> str:
    """A host or token reference on the command line: never empty (an empty one would
    name the list, not an item)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty: give an id, a unique id prefix or a "
                                         "hostname")
    return text


def add_shared_options(parser: argparse.ArgumentParser, after_command: bool = False) -> None:
    """Options every command takes, before or after its name (`--state-dir DIR hosts list`
    and `hosts list --state-dir DIR` alike). After the name they have no default, so they
    override what came before only when given."""
    def default(value: object) -> object:
        return argparse.SUPPRESS if after_command else value

    state_dir = Path(os.environ.get("VIRTFLEET_SERVER_STATE_DIR", DEFAULT_STATE_DIR))
    parser.add_argument("--state-dir", type=Path, default=default(state_dir),
                        help=f"state directory: CAs, keys, database, admin socket (default {state_dir})")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="print machine-readable JSON")


def add_database_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--database", default=None, metavar="URL",
                        help="PostgreSQL database the replicas share (postgresql://USER@HOST/DB; "
                             "a password is better in ~/.pgpass or the --config file than here, "
                             "where ps shows it). Default: the config file's, else SQLite in "
                             "the state directory")
    parser.add_argument("--config", type=Path, default=None, metavar="FILE",
                        help=f"settings file (TOML: database = \"URL\") (default {DEFAULT_CONFIG_FILE}, "
                             "if it exists)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="virtfleet-server", description="Central server for virtfleet: enrolls KVM hosts "
        "with join tokens and keeps a libvirt connection to each.", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"virtfleet-server {VERSION}")
    add_shared_options(p)
    shared = argparse.ArgumentParser(add_help=False)  # the same options, also after the command
    add_shared_options(shared, after_command=True)
    sub = Subcommands(p.add_subparsers(dest="command", required=True, metavar="COMMAND"))

    i = sub.add_parser("init", help="make the fleet's CAs and keys: in the state directory, or "
                       "once in the database replicas share (--database)", parents=[shared])
    add_database_options(i)
    s = sub.add_parser("serve", help="run the server", parents=[shared])
    add_database_options(s)
    s.add_argument("--listen", type=parse_listen, default=("0.0.0.0", DEFAULT_PORT),
                   metavar="HOST:PORT", help=f"HTTPS address for agents (default 0.0.0.0:{DEFAULT_PORT})")
    s.add_argument("--advertise-url", default="", metavar="URL",
                   help="https URL agents use to reach this server, put in join strings "
                        "(default: from --listen and this machine's name)")
    s.add_argument("--checkin-interval", type=duration, default=10.0, metavar="DURATION",
                   help="how often agents check in (default 10s)")
    s.add_argument("--grace", type=duration, default=30.0, metavar="DURATION",
                   help="a host with no check-in for this long is offline (default 30s)")
    s.add_argument("--cert-lifetime", type=duration, default=30 * 86400.0, metavar="DURATION",
                   help="lifetime of host certificates; agents renew them at 70-90%% (default 30d)")
    s.add_argument("--run-dir", type=Path, default=DEFAULT_RUN_DIR, metavar="DIR",
                   help="where the gateway's sockets (DIR/hosts/HOST_ID.sock) and the engine API "
                        f"(DIR/engine.sock) live (default {DEFAULT_RUN_DIR})")
    s.add_argument("--engine-group", default="virtfleet-engine", metavar="GROUP",
                   help="the group whose members may use the gateway and the engine API "
                        "(default virtfleet-engine)")
    s.add_argument("--enroll-rate", type=float, default=20.0, metavar="PER_SECOND",
                   help="enrollments allowed per second from one address (default 20)")
    s.add_argument("--max-connections-per-address", type=int, default=2048, metavar="N",
                   help="agent connections one source address may hold at once; hosts behind "
                        "one NAT address share it (default 2048)")
    s.add_argument("--metrics-listen", type=parse_metrics_listen, default=DEFAULT_METRICS_LISTEN,
                   metavar="HOST:PORT|off",
                   help="plain-HTTP address of the Prometheus metrics (/metrics) (default "
                        f"{DEFAULT_METRICS_LISTEN[0]}:{DEFAULT_METRICS_LISTEN[1]}; off: none)")
    s.add_argument("--audit-retention", type=duration, default=DEFAULT_AUDIT_RETENTION,
                   metavar="DURATION", help="how long audit entries are kept (default 90d)")
    web_default = f"{DEFAULT_WEB_LISTEN[0]}:{DEFAULT_WEB_LISTEN[1]}"
    s.add_argument("--web-listen", type=parse_web_listen, default=DEFAULT_WEB_LISTEN,
                   metavar="HOST:PORT|off",
                   help=f"address of the operators' web page (default {web_default}; off: none); "
                        "plain HTTP only on a loopback address, elsewhere --web-cert and --web-key")
    s.add_argument("--web-cert", type=Path, default=None, metavar="PEM",
                   help="certificate (chain) for the web page's HTTPS, with --web-key")
    s.add_argument("--web-key", type=Path, default=None, metavar="PEM",
                   help="private key of --web-cert")
    s.add_argument("--web-url", default="", metavar="URL",
                   help="the web page's URL as browsers reach it, put in login URLs (default: "
                        "from --web-listen; set it for a tunnel, a proxy or a DNS name)")
    s.add_argument("--web-session-idle", type=duration, default=DEFAULT_WEB_SESSION_IDLE,
                   metavar="DURATION", help="a web session unused this long ends (default 12h; "
                                            "any session ends after 7d)")
    s.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])

    t = sub.add_parser("token", help="join tokens: create, list, revoke")
    tsub = Subcommands(t.add_subparsers(dest="token_command", required=True, metavar="ACTION"))
    tc = tsub.add_parser("create", help="create a join token and print the command for the host",
                         parents=[shared])
    tc.add_argument("--role", default="mixed", choices=wire.ROLES,
                    help="widest role a host may take with it (default mixed: any role)")
    tc.add_argument("--ttl", type=duration, default=3600.0, metavar="DURATION",
                    help="valid for this long (default 1h, at most 7d)")
    tc.add_argument("--uses", type=int, default=1, help="how many hosts may join with it (default 1)")
    tc.add_argument("--no-auto-enable", dest="auto_enable", action="store_false",
                    help="hosts joining with it wait as pending until `hosts enable`")
    tc.add_argument("--transport", default="auto", choices=wire.TRANSPORTS,
                    help="how the server reaches the hosts' libvirtd: direct (TLS to its port "
                         "16514), tunnel (through a connection the agent opens to the server: "
                         "behind NAT or a firewall, no libvirtd TLS set-up), or auto (default: "
                         "direct, and a tunnel when the direct dial fails)")
    tc.add_argument("--description", default="", help="a note for `token list`")
    tsub.add_parser("list", help="list tokens and their state", parents=[shared])
    tr = tsub.add_parser("revoke", help="revoke a token: no more hosts join with it", parents=[shared])
    tr.add_argument("id", type=reference, help="token id, or a unique prefix of it")

    h = sub.add_parser("hosts", help="hosts: list, show, uri, enable, disable, forget, set-role, "
                                     "set-transport")
    hsub = Subcommands(h.add_subparsers(dest="hosts_command", required=True, metavar="ACTION"))
    hsub.add_parser("list", help="every host with its status and last check-in", parents=[shared])
    for name, text in [("show", "everything known about a host, with its status history"),
                       ("uri", "the libvirt URI of the host's gateway socket, for virsh or an engine"),
                       ("enable", "enable a host (approve a pending one): open its connection"),
                       ("disable", "disable a host: close its connection"),
                       ("forget", "remove a host; its certificate is refused from now on")]:
        hp = hsub.add_parser(name, help=text, parents=[shared])
        hp.add_argument("id", type=reference, help=HOST_REF)
    sr = hsub.add_parser("set-role", help="override the role a host configured", parents=[shared])
    sr.add_argument("id", type=reference, help=HOST_REF)
    sr.add_argument("role", choices=wire.ROLES)
    st = hsub.add_parser("set-transport", help="how the server reaches the host's libvirtd: "
                         "direct, tunnel or auto (see token create --transport)", parents=[shared])
    st.add_argument("id", type=reference, help=HOST_REF)
    st.add_argument("transport", choices=wire.TRANSPORTS)
    sub.add_parser("web-login", help="print a one-time URL (valid 60 s) that logs a browser in "
                   "to the web page", parents=[shared])
    w = sub.add_parser("web-sessions", help="the web page's sessions: list, revoke")
    wsub = Subcommands(w.add_subparsers(dest="web_command", required=True, metavar="ACTION"))
    wsub.add_parser("list", help="every web session: who made its login URL, its browser, its "
                    "state", parents=[shared])
    wr = wsub.add_parser("revoke", help="end a web session at once", parents=[shared])
    wr.add_argument("id", type=reference, help="session id, or a unique prefix of it")
    sub.add_parser("status", help="the server's URL, CA pin and host counts", parents=[shared])
    sub.add_parser("replicas", help="the replicas sharing this server's database: health and "
                   "how many hosts each owns", parents=[shared])
    au = sub.add_parser("audit", help="who enrolled, created, revoked, enabled, disabled, forgot "
                        "or set the role of what, and how it ended", parents=[shared])
    au.add_argument("--since", type=since_time, default=None, metavar="DURATION|TIME",
                    help="entries from this long ago (1h, 2d) or this time (2026-12-01 "
                         "or '2026-12-01 10:00'); default: the last 7 days")
    au.add_argument("--host", type=reference, default=None, metavar="HOST",
                    help="only entries about this host (" + HOST_REF + ")")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    complete(parser)
    args = parser.parse_args(argv)
    if args.command in ("serve", "init"):
        try:
            args.database = database_url(args.database, args.config)
        except ValueError as exc:
            return fail(str(exc))
        return serve(args) if args.command == "serve" else init(args)
    try:
        return run_admin(args)
    except AdminError as exc:
        return fail(str(exc))


def serve(args: argparse.Namespace) -> int:
    import datetime as dt

    from server.main import serve as run_server

    logs.setup("virtfleet-server", args.log_level)
    if args.grace < 2 * args.checkin_interval:
        # Agents are told to wait up to 1.5 intervals (server/fleet.py: checkin_delay).
        return fail(f"--grace ({args.grace:g} s) must be at least twice --checkin-interval "
                    f"({args.checkin_interval:g} s): a healthy host would show as offline")
    lifetime = dt.timedelta(seconds=args.cert_lifetime)
    config = ServerConfig(
        state_dir=args.state_dir, database=args.database, listen_host=args.listen[0],
        listen_port=args.listen[1],
        advertise_url=args.advertise_url, checkin_interval=args.checkin_interval,
        grace=args.grace, identity_cert_lifetime=lifetime, libvirt_cert_lifetime=lifetime,
        enroll_rate=args.enroll_rate, max_connections_per_address=args.max_connections_per_address,
        run_dir=args.run_dir, engine_group=args.engine_group, metrics_listen=args.metrics_listen,
        audit_retention=args.audit_retention, web_listen=args.web_listen, web_cert=args.web_cert,
        web_key=args.web_key, web_url=args.web_url, web_session_idle=args.web_session_idle)
    if web_problem(config):
        return fail(web_problem(config))
    problem = unreachable_url_problem(config)
    if problem and not args.advertise_url:
        return fail(problem)  # a guess that is certainly wrong: refuse it
    if problem:
        logging.getLogger("server").warning("%s (kept: it was given with --advertise-url)", problem)
    try:
        return asyncio.run(run_server(config))
    except (OSError, StoreError) as exc:
        return fail(f"cannot start: {exc}")


def init(args: argparse.Namespace) -> int:
    """The fleet's keys made (or found) where `serve` will look for them."""
    from server.keys import initialize_state

    logs.setup("virtfleet-server", "WARNING")
    try:
        where, keys, made = initialize_state(args.state_dir, args.database)
    except (OSError, StoreError) as exc:
        return fail(f"cannot initialize: {exc}")
    print(f"{where}: {'fleet keys made' if made else 'fleet keys were there already, kept'}")
    print(f"ca pin: {keys.identity_ca.pin}")
    if args.database:
        print("now start `virtfleet-server serve` with the same --database on each replica")
    return 0


def print_listing(as_json: bool, items: Any, headers: list[str], rows: list[Any]) -> None:
    """A listing as JSON (what the server sent) or as a table for people."""
    if as_json:
        print_json(items)
    else:
        print(table(headers, rows))


def run_admin(args: argparse.Namespace) -> int:
    state = args.state_dir
    if args.command == "status":
        data = admin_call(state, "GET", "/v1/status")
        if args.json:
            print_json(data)
        else:
            counts = ", ".join(f"{n} {s}" for s, n in sorted(data["by_status"].items())) or "none"
            print(f"url:      {data['url']}\nca pin:   {data['ca_pin']}")
            print(f"hosts:    {data['hosts']} ({counts})")
        return 0
    if args.command == "token":
        return token_command(args, state)
    if args.command == "audit":
        return audit_command(args, state)
    if args.command in ("web-login", "web-sessions"):
        return web_command(args, state)
    if args.command == "replicas":
        return replicas_command(args, state)
    return hosts_command(args, state)


def replicas_command(args: argparse.Namespace, state: Path) -> int:
    replicas = admin_call(state, "GET", "/v1/replicas")
    if not replicas and not args.json:
        print("this server runs alone (no --database): it owns every host")
        return 0
    print_listing(args.json, replicas, ["replica", "url", "health", "hosts", "started", "last seen"], [
        (r["id"] + (" (this one)" if r["me"] else ""), r["url"],
         "alive" if r["alive"] else "gone", r["hosts"], when(r["started_at"]), ago(r["seen_at"]))
        for r in replicas])
    return 0


AUDIT_DEFAULT_SPAN = 7 * 86400.0


def since_time(text: str) -> float:
    """A duration back from now ('2d') or a local time ('2026-12-01', '2026-12-01 10:00')."""
    for form in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%d"):
        try:
            return time.mktime(time.strptime(text.strip(), form))
        except ValueError:
            continue
    try:
        return time.time() - duration(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a duration (30m, 2d) nor a time (2026-12-01 10:00)") from None


def audit_command(args: argparse.Namespace, state: Path) -> int:
    since = args.since if args.since is not None else time.time() - AUDIT_DEFAULT_SPAN
    query = f"since={since:.3f}" + (f"&host={quote(args.host, safe='')}" if args.host else "")
    entries = admin_call(state, "GET", f"/v1/audit?{query}")
    print_listing(args.json, entries, ["time", "actor", "action", "target", "outcome", "detail"], [
        (when(e["at"]), e["actor"], e["action"], e["target"], e["outcome"], e["detail"])
        for e in entries])
    return 0


def web_command(args: argparse.Namespace, state: Path) -> int:
    if args.command == "web-login":
        data = admin_call(state, "POST", "/v1/web/logins")
        print_json(data) if args.json else print(data["url"])
        if not args.json:
            print(f"# open it in a browser before {when(data['expires_at'])}: it works once",
                  file=sys.stderr)
        return 0
    if args.web_command == "list":
        sessions = admin_call(state, "GET", "/v1/web/sessions")
        headers = ["id", "made by", "started", "last used", "from", "state", "browser"]
        print_listing(args.json, sessions, headers, [
            (s["id"], s["created_by"], when(s["created_at"]), ago(s["last_seen"]), s["address"],
             s["state"], short(s["user_agent"], 40)) for s in sessions])
        return 0
    session = admin_call(state, "POST", f"/v1/web/sessions/{quote(args.id, safe='')}/revoke")
    print_json(session) if args.json else print(f"web session {session['id']} revoked")
    return 0


def token_command(args: argparse.Namespace, state: Path) -> int:
    if args.token_command == "create":
        data = admin_call(state, "POST", "/v1/tokens", {
            "role": args.role, "ttl": args.ttl, "uses": args.uses,
            "auto_enable": args.auto_enable, "description": args.description,
            "transport": args.transport})
        if args.json:
            print_json(data)
            return 0
        tok = data["token"]
        print(data["join"])
        print(f"\n# token {tok['id']}: role {tok['role']}, transport {tok['transport']}, "
              f"{tok['max_uses']} use(s), "
              f"expires {when(tok['expires_at'])}"
              + ("" if tok["auto_enable"] else ", hosts wait for `hosts enable`"),
              file=sys.stderr)
        print(f"# on the host, as root (it reads the join string from stdin: paste it, then "
              f"Enter; so no other user sees it in the process list):\n{data['command']}\n"
              f"# or, with the string as an argument: virtfleet-agent join '{data['join']}'",
              file=sys.stderr)
        if data.get("warning"):
            print(f"# WARNING: {data['warning']}", file=sys.stderr)
        return 0
    if args.token_command == "list":
        tokens = admin_call(state, "GET", "/v1/tokens")
        print_listing(args.json, tokens, ["id", "role", "uses", "state", "expires", "hosts", "description"], [
            (t["id"], t["role"], f"{t['uses']}/{t['max_uses']}", t["state"], when(t["expires_at"]),
             ", ".join(t["hosts"]) or "-", t["description"]) for t in tokens])
        return 0
    tok = admin_call(state, "POST", f"/v1/tokens/{quote(args.id, safe='')}/revoke")
    print_json(tok) if args.json else print(f"token {tok['id']} revoked")
    return 0


def hosts_command(args: argparse.Namespace, state: Path) -> int:
    action = args.hosts_command
    if action == "list":
        hosts = admin_call(state, "GET", "/v1/hosts")
        print_listing(args.json, hosts, ["id", "hostname", "role", "status", "last check-in", "detail"], [
            (h["id"], h["hostname"], h["role"], h["status"], ago(h["last_checkin"]),
             short(h["detail"])) for h in hosts])
        return 0
    ref = quote(args.id, safe="")
    if action == "uri":
        data = admin_call(state, "GET", f"/v1/hosts/{ref}")
        print_json({"id": data["id"], "gateway_uri": data["gateway_uri"]}) if args.json \
            else print(data["gateway_uri"])
        return 0
    if action == "show":
        data = admin_call(state, "GET", f"/v1/hosts/{ref}")
    elif action == "set-role":
        data = admin_call(state, "POST", f"/v1/hosts/{ref}/set-role", {"role": args.role})
    elif action == "set-transport":
        data = admin_call(state, "POST", f"/v1/hosts/{ref}/set-transport",
                          {"transport": args.transport})
    else:
        data = admin_call(state, "POST", f"/v1/hosts/{ref}/{action}")
        if action == "forget":
            print_json(data) if args.json else print(f"host {data['id']} forgotten")
            return 0
    print_json(data) if args.json else print(render_host(data))
    return 0


REPORT_FRESH = 30.0  # seconds: a report older than this says how old it is


def render_host(h: dict[str, Any]) -> str:
    report = h.get("report") or {}
    facts = report.get("facts") or {}
    conn = h.get("connection") or {}
    libvirtd = report.get("libvirtd") or {}
    age = ago(h["last_checkin"])
    stale = f" (as reported {age})" if _older_than(h["last_checkin"], REPORT_FRESH) else ""
    lines = [
        f"host {h['id']}  ({h['hostname']})",
        f"  status:        {h['status']} since {when(h['status_since'])}",
        f"  detail:        {h['detail']}",
        f"  admin:         {h['admin_state']}",
        f"  role:          {h['role']} ({h['role_source']}; configured {h['configured_role']}, "
        f"token allows {h['role_limit']})",
        f"  capabilities:  {', '.join(h['capabilities'])}",
        f"  address:       {h['address']}",
        f"  last check-in: {when(h['last_checkin'])} ({age})",
        f"  enrolled:      {when(h['enrolled_at'])}",
        f"  agent:         {h['agent_version']}",
        f"  certificate:   expires {when(h['certificate_expires'])}",
        "  libvirtd:      " + ("answers" if libvirtd.get("ok") else f"DOWN ({libvirtd.get('error')})")
        + stale,
        "  connection:    " + conn.get("state", "closed")
        + (f" to {conn['uri']}" if conn.get("uri") else "")
        + (f", libvirt {conn['remote_libvirt_version']}" if conn.get("remote_libvirt_version") else "")
        + (f", since {when(conn['connected_since'])}" if conn.get("connected_since") else ""),
    ]
    lines.append(f"  transport:     {describe_transport(conn.get('transport') or {})}")
    if h.get("owner"):
        lines.append(f"  owner:         replica {h['owner']} (holds its libvirt connection)")
    gateway = h.get("gateway") or {}
    lines.append(f"  gateway:       {h.get('gateway_uri')} ({gateway.get('open', 0)} open, "
                 f"{gateway.get('accepted', 0)} relayed, {gateway.get('refused', 0)} refused)")
    if conn.get("last_error"):
        tries = f", {conn['tries']} tries" if conn.get("tries", 0) > 1 else ""
        lines.append(f"  last error:    {conn['last_error']} ({ago(conn.get('last_error_at'))}{tries})")
    for name, result in sorted(facts.items()):
        if isinstance(result, dict):
            lines.append(f"  {name + ':':<14} {describe_facts(name, result)}{stale}")
    lines.append("  history:")
    for e in h.get("history", []):
        repeats = (f" ({e['tries']} tries until {when(e['last_at'])})"
                   if e.get("tries", 1) > 1 and e.get("last_at") else "")
        lines.append(f"    {when(e['at'])}  {e['status']:<10} {e['detail']}{repeats}")
    return "\n".join(printable(line) for line in lines)


def _older_than(ts: float | None, seconds: float) -> bool:
    return not ts or time.time() - ts > seconds


if __name__ == "__main__":
    sys.exit(main())

