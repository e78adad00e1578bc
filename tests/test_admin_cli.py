"""The operator's command line against a real server: what it names, refuses and prints."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from common import VERSION, wire
from tests.harness import Agent, Server
from tests.test_enrollment import post

pytestmark = pytest.mark.slow
MakeAgent = Callable[..., Agent]


def checkin_as(server: Server, agent: Agent, hostname: str, error: str | None = None) -> None:
    report = {"hostname": hostname, "role": "mixed", "agent_version": "x",
              "libvirtd": {"ok": error is None, "error": error}}
    status, body = post(server, wire.CHECKIN_PATH, json.dumps({"report": report}).encode(),
                        cert=agent.state / "identity.pem")
    assert status == 200, body


def joined(server: Server, make_agent: MakeAgent, name: str, *token_args: str) -> Agent:
    agent = make_agent(name, None)
    result = agent.join(server.token(*token_args))
    assert result.returncode == 0, result.stderr
    return agent


def test_ids_and_id_prefixes_win_over_hostnames(server: Server, make_agent: MakeAgent) -> None:
    pending = joined(server, make_agent, "pending", "--no-auto-enable")
    impostor = joined(server, make_agent, "impostor")
    prefix = pending.host_id()[:6]
    checkin_as(server, impostor, prefix)  # names itself after the other's id
    shown = server.admin("hosts", "enable", prefix).stdout
    assert shown.startswith(f"host {pending.host_id()}")  # the acted-on host's id, first line
    assert server.host(pending.host_id())["admin_state"] == "enabled"
    # A short unique prefix works too; an ambiguous one is refused naming the ids.
    assert server.admin("hosts", "show", pending.host_id()[:3]).returncode == 0
    hosts = [h["id"] for h in server.hosts()]
    common = next((a[:2] for a in hosts for b in hosts if a != b and a[:2] == b[:2]), None)
    if common:
        refused = server.admin("hosts", "show", common, check=False)
        assert refused.returncode == 1 and "several host ids" in refused.stderr


def test_hostile_text_from_a_host_is_shown_escaped(server: Server, make_agent: MakeAgent) -> None:
    agent = joined(server, make_agent, "plain")
    # The wire refuses control characters in a hostname outright...
    report = {"hostname": "a\x1b[2Kb", "role": "mixed", "agent_version": "x", "libvirtd": {"ok": True}}
    status, body = post(server, wire.CHECKIN_PATH, json.dumps({"report": report}).encode(),
                        cert=agent.state / "identity.pem")
    assert status == 400 and "hostname: contains control characters" in body["message"]
    # ...and any other text from the host (a libvirtd error) is printed escaped.
    checkin_as(server, agent, "plain", error="gone\x1b]52;c;ZXZpbA==\x07\x1b[1A\u202e")
    for args in (("hosts", "list"), ("hosts", "show", agent.host_id())):
        out = server.admin(*args).stdout
        assert "\x1b" not in out and "\x07" not in out and "\u202e" not in out, out
        assert "\\x1b]52;c;ZXZpbA==\\x07" in out


def test_references_and_help(server: Server) -> None:
    empty = server.admin("hosts", "show", "", check=False)
    assert empty.returncode == 2 and "must not be empty" in empty.stderr
    missing = server.admin("hosts", "show", "zz", check=False)
    assert missing.returncode == 1 and "no host 'zz'" in missing.stderr and "prefix" in missing.stderr
    version = server.admin("--version")
    assert version.stdout.strip() == f"virtfleet-server {VERSION}"
    shown = server.admin("hosts", "set-role", "--help").stdout
    assert "override the role a host configured" in shown  # a description, not just usage
    # Tokens: revoked by a prefix; the list says which hosts used each.
    token_id = server.admin_json("token", "create")["token"]["id"]
    assert server.admin("token", "revoke", token_id[:5]).returncode == 0
    listed = {t["id"]: t for t in server.admin_json("token", "list")}
    assert listed[token_id]["state"] == "revoked" and listed[token_id]["hosts"] == []


def test_token_list_names_the_hosts_that_used_each(server: Server, make_agent: MakeAgent) -> None:
    agent = joined(server, make_agent, "user")
    [token] = [t for t in server.admin_json("token", "list") if t["uses"]]
    assert token["hosts"] == [agent.host_id()]
    assert agent.host_id() in server.admin("token", "list").stdout
