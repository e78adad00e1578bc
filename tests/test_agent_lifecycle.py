"""The agent's life on a host, with the real server and agent processes: joining without
the join string in the process list, one agent per state dir, stopping when the server
forgets the host, the role and hostname it keeps, and a `status` that checks what is
alive (issues 15 and 16)."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from common import wire
from tests.harness import Agent, Libvirtd, Server, wait_for

pytestmark = pytest.mark.slow
MakeAgent = Callable[..., Agent]
NO_LIBVIRTD_TLS = '[libvirt]\nuri = "test:///default"\nconfigure_tls = false\n'
EXIT_NOT_ENROLLED, EXIT_NOT_RUNNING, EXIT_REFUSED = 2, 3, 4


@pytest.fixture
def bare_agents(tmp_path: Path) -> Iterator[Callable[[str, str], Agent]]:
    """Agents whose agent.toml names no hostname (make_agent's always do)."""
    made: list[Agent] = []

    def make(name: str, toml: str = NO_LIBVIRTD_TLS) -> Agent:
        agent = Agent(tmp_path / name, toml)
        made.append(agent)
        return agent

    yield make
    for agent in made:
        agent.stop()


def checked_in_since(server: Server, host_id: str, since: float) -> bool:
    return bool(server.host(host_id)["last_checkin"] > since)


def test_join_reads_the_join_string_from_stdin_or_a_file(server: Server,
                                                         make_agent: MakeAgent) -> None:
    """While `join` runs (it may retry a busy server for 2 min), any local user can read its
    command line: the join string must not be there."""
    join = server.token("--uses", "2")
    agent = make_agent("hv-stdin", None)
    proc = subprocess.Popen(agent.argv("join", "-"), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # (Empty for a moment while the program is exec'd.)
    cmdline = wait_for(lambda: Path(f"/proc/{proc.pid}/cmdline").read_bytes(), 5,
                       "the join's command line")
    out, err = proc.communicate(join + "\n", timeout=60)
    assert proc.returncode == 0, err
    assert b"join\0-" in cmdline and wire.JoinString.decode(join).token.encode() not in cmdline
    assert "enrolled as host" in out and join not in out + err
    assert [h["hostname"] for h in server.hosts()] == ["hv-stdin"]

    other = make_agent("hv-file", None)
    secret = other.base / "join.txt"
    secret.write_text(join + "\n")
    secret.chmod(0o600)
    result = other.run_cmd("join", "--join-file", str(secret))
    assert result.returncode == 0, result.stderr
    assert sorted(h["hostname"] for h in server.hosts()) == ["hv-file", "hv-stdin"]


def test_join_force_while_the_agent_runs_is_refused_with_how_to_stop_it(
        server: Server, make_agent: MakeAgent) -> None:
    agent = make_agent("hv-busy", None)
    assert agent.join(server.token()).returncode == 0
    host_id = agent.host_id()
    joined = server.host(host_id)["last_checkin"]
    agent.start()
    wait_for(lambda: checked_in_since(server, host_id, joined), 10, "the service's check-in")
    result = agent.join(server.token(), "--force")
    assert result.returncode == 1
    assert agent.proc is not None and agent.proc.proc is not None
    assert (f"virtfleet-agent run is running for {agent.state} (pid {agent.proc.proc.pid})"
            in result.stderr and "systemctl stop virtfleet-agent" in result.stderr), result.stderr
    assert agent.host_id() == host_id and len(server.hosts()) == 1
    assert agent.proc.alive()
    # A second `run` for the same state dir is refused the same way.
    second = agent.run_cmd("run", "--once")
    assert second.returncode == 1 and "already running" in second.stderr
    # Stopped, the re-join goes through.
    agent.stop()
    result = agent.join(server.token(), "--force")
    assert result.returncode == 0, result.stderr


def test_a_forgotten_host_stops_the_agent_with_its_own_exit_status(
        server: Server, make_agent: MakeAgent) -> None:
    """Was: the refused certificate sent again every 300 s, forever."""
    agent = make_agent("hv-gone", None)
    assert agent.join(server.token()).returncode == 0
    host_id = agent.host_id()
    agent.start()
    assert agent.proc is not None
    wait_for(lambda: server.host(host_id)["last_checkin"], 10, "a check-in")
    server.admin("hosts", "forget", host_id)
    wait_for(lambda: agent.proc is not None and not agent.proc.alive(), 20,
             "the agent to stop after its next check-in")
    assert agent.proc.proc is not None and agent.proc.proc.returncode == EXIT_REFUSED
    log = agent.proc.log()
    assert "refuses this host's identity" in log and "join --force" in log, log
    status = agent.run_cmd("status")
    assert status.returncode == EXIT_NOT_RUNNING
    assert "not enrolled here" in status.stdout and "join --force" in status.stdout


def test_with_no_role_given_the_host_takes_the_tokens_and_a_rejoin_keeps_it(
        server: Server, make_agent: MakeAgent) -> None:
    """The README's example: `token create --role hypervisor`, then a plain `join`."""
    agent = make_agent("hv-role", None)
    result = agent.join(server.token("--role", "hypervisor"))
    assert result.returncode == 0, result.stderr
    assert "role hypervisor" in result.stdout
    assert server.host(agent.host_id())["role"] == "hypervisor"
    # Joined again with a wider token and no --role: still hypervisor.
    result = agent.join(server.token("--role", "mixed"), "--force")
    assert result.returncode == 0, result.stderr
    assert json.loads((agent.state / "agent.json").read_text())["role"] == "hypervisor"
    assert server.host(agent.host_id())["role"] == "hypervisor"
    # A narrower token than the role held: the token's role, and the join says so.
    result = agent.join(server.token("--role", "disk_operations"), "--force")
    assert result.returncode == 0, result.stderr
    assert "it takes the token's, 'disk_operations' (give --role to choose)" in result.stderr
    assert server.host(agent.host_id())["role"] == "disk_operations"


def test_the_hostname_given_at_join_stays_until_changed_on_purpose(
        server: Server, bare_agents: Callable[..., Agent]) -> None:
    """Was: the first check-in of `run` renamed the host to the machine's hostname."""
    agent = bare_agents("hv-named")
    assert agent.join(server.token(), "--hostname", "hv-given").returncode == 0
    host_id = agent.host_id()
    joined = server.host(host_id)["last_checkin"]
    agent.start()
    wait_for(lambda: checked_in_since(server, host_id, joined + 1), 10, "two check-ins by `run`")
    assert server.host(host_id)["hostname"] == "hv-given"
    # Set in agent.toml: that is a change on purpose, and it is remembered.
    agent.stop()
    agent.config.write_text('hostname = "hv-renamed"\n' + NO_LIBVIRTD_TLS)
    agent.start()
    wait_for(lambda: server.host(host_id)["hostname"] == "hv-renamed", 10, "the new name")
    assert json.loads((agent.state / "agent.json").read_text())["hostname"] == "hv-renamed"


def test_status_checks_what_is_alive_and_says_it_in_its_exit_status(
        server: Server, libvirtd: Libvirtd, make_agent: MakeAgent) -> None:
    """Was: agent and libvirtd killed, and `status` said `ok`, `answers`, and exited 0."""
    agent = make_agent("hv-status", libvirtd)
    assert agent.run_cmd("status").returncode == EXIT_NOT_ENROLLED
    assert agent.join(server.token()).returncode == 0
    stopped = agent.run_cmd("status")
    assert stopped.returncode == EXIT_NOT_RUNNING and "NOT RUNNING" in stopped.stdout
    agent.start()
    healthy = wait_for(lambda: (r := agent.run_cmd("status")).returncode == 0
                       and "next check-in: due" in r.stdout and r, 20,
                       "status to say healthy after the service's first check-in")
    assert "health:       ok" in healthy.stdout and "answers now" in healthy.stdout
    assert "running (pid" in healthy.stdout

    libvirtd.stop()
    down = agent.run_cmd("status")  # asked now: no waiting for a check-in
    assert down.returncode == 1 and "libvirtd does not answer now" in down.stdout, down.stdout
    libvirtd.start()
    wait_for(lambda: agent.run_cmd("status").returncode == 0, 30, "healthy again")

    agent.stop(signal.SIGKILL)
    killed = agent.run_cmd("status", "--json")
    assert killed.returncode == EXIT_NOT_RUNNING
    data = json.loads(killed.stdout)
    assert data["agent_pid"] is None and not data["healthy"]
    assert data["last_checkin"]["ok"] and time.time() - data["last_checkin"]["at"] < 30

    # A broken agent.toml: `status` still reads, warns, and says the host is not healthy.
    agent.config.write_text("bogus = 1\n" + agent.config.read_text())
    broken = agent.run_cmd("status")
    assert broken.returncode == 1
    assert "unknown setting 'bogus'" in broken.stderr and agent.host_id() in broken.stdout


def test_a_refused_role_says_what_to_change_and_not_to_join_again(
        server: Server, make_agent: MakeAgent) -> None:
    agent = make_agent("hv-creep", None)
    assert agent.join(server.token("--role", "disk_operations")).returncode == 0
    agent.config.write_text('role = "mixed"\n' + agent.config.read_text())
    agent.start()
    status = wait_for(lambda: "FAILED" in (s := agent.run_cmd("status").stdout) and s, 15,
                      "the refused check-in in status")
    assert f"role = 'mixed' in {agent.config}" in status and "no new join needed" in status
    assert "join --force" not in status
    assert agent.proc is not None and agent.proc.alive()  # a setting to fix, not an identity gone
    # It keeps checking in at its pace, so past the grace period (4 s) the server still
    # shows the reason, not "offline"; the agent says it once.
    refused_at = time.time()
    wait_for(lambda: time.time() > refused_at + 6, 10, "the grace period to pass")
    host = server.host(agent.host_id())
    assert host["status"] == "error" and "role" in host["detail"], host["detail"]
    assert agent.proc.log().count("the server refuses this check-in") == 1


def test_set_server_moves_the_host_to_another_url_of_the_same_server_only(
        start_server: Callable[..., Server], make_agent: MakeAgent, tmp_path: Path) -> None:
    server, stranger = start_server(), start_server(state=tmp_path / "stranger")
    agent = make_agent("hv-moves", None)
    assert agent.join(server.token()).returncode == 0
    host_id = agent.host_id()
    # Another server (another CA) at a new URL: refused, nothing changed.
    result = agent.run_cmd("set-server", stranger.url)
    assert result.returncode == 1 and "refusing to trust it" in result.stderr, result.stderr
    assert "Nothing was changed" in result.stderr
    assert json.loads((agent.state / "agent.json").read_text())["server_url"] == server.url
    assert agent.run_cmd("set-server", "http://x").returncode == 1
    # The same server by another name (its HTTPS certificate names localhost too).
    moved = f"https://localhost:{server.port}"
    before = server.host(host_id)["last_checkin"]
    result = agent.run_cmd("set-server", moved)
    assert result.returncode == 0, result.stderr
    assert json.loads((agent.state / "agent.json").read_text())["server_url"] == moved
    assert server.host(host_id)["last_checkin"] > before  # it checked in there first
    started = time.time()
    agent.start()
    wait_for(lambda: checked_in_since(server, host_id, started + 1), 10, "check-ins at the new URL")
    assert "server https://localhost" in (agent.proc.log() if agent.proc else "")
    # Set by hand: the URL the server names (its --advertise-url, 127.0.0.1) does not move it.
    assert json.loads((agent.state / "agent.json").read_text())["server_url"] == moved


def test_hosts_follow_a_server_given_a_new_url(start_server: Callable[..., Server],
                                              make_agent: MakeAgent) -> None:
    """The server names its URL in every check-in answer: a host still using the old one
    moves, once a check-in at the new one worked, and stays moved after a restart."""
    server = start_server()
    agent = make_agent("hv-follows", None)
    assert agent.join(server.token()).returncode == 0
    host_id = agent.host_id()
    server.proc.stop()
    new_url = f"https://localhost:{server.port}"
    start_server("--checkin-interval", "1", "--grace", "4", "--advertise-url", new_url,
                 state=server.state, port=server.port)
    agent.start()
    wait_for(lambda: json.loads((agent.state / "agent.json").read_text())["server_url"] == new_url,
             15, "the host to follow the new URL")
    assert agent.proc is not None
    assert f"the server moved: this host now checks in with {new_url}" in agent.proc.log()
    moved_at = time.time()
    wait_for(lambda: checked_in_since(server, host_id, moved_at + 1), 10, "check-ins after the move")
    assert agent.proc.alive()
