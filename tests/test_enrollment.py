"""Joining and checking in, with the real server and agent processes and real TLS.

These hosts use libvirt's test:///default driver and no TLS listener: enrollment,
tokens, identity and check-in are the point here (test_libvirt.py covers the rest).
"""

from __future__ import annotations

import base64
import concurrent.futures
import datetime as dt
import http.client
import json
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common import wire
from tests.harness import Agent, Server, wait_for

pytestmark = pytest.mark.slow
MakeAgent = Callable[..., Agent]


def post(server: Server, path: str, body: bytes, cert: Path | None = None,
         headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """A raw HTTPS call to the agent API, trusting the server's CA, optionally with a client
    certificate (a PEM holding key and certificate)."""
    ctx = ssl.create_default_context(cafile=str(server.state / "identity" / "ca.crt"))
    if cert:
        ctx.load_cert_chain(cert)
    conn = http.client.HTTPSConnection(server.address, server.port, context=ctx, timeout=10)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"}
                     | (headers or {}))
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    return resp.status, json.loads(raw) if raw else None


def token_of(join: str) -> str:
    return wire.JoinString.decode(join).token


def with_token(join: str, token: str) -> str:
    j = wire.JoinString.decode(join)
    return wire.JoinString(url=j.url, ca_pin=j.ca_pin, token=token).encode()


def signing_key(server: Server) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(
        (server.state / "token-signing.key").read_bytes(), password=None)
    assert isinstance(key, Ed25519PrivateKey)
    return key


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": "virtfleet-server", "aud": "virtfleet-enroll", "jti": "forged0000000000",
            "iat": now, "exp": now + 600, "role": "mixed", "auto_enable": True} | overrides


def test_join_lists_the_host_with_its_facts(server: Server, make_agent: MakeAgent) -> None:
    agent = make_agent("hv-01", None)
    result = agent.join(server.token("--role", "mixed"))
    assert result.returncode == 0, result.stderr
    assert "enrolled as host" in result.stdout
    # `join` checks in once itself: the host is listed before the service even runs.
    [host] = server.hosts()
    assert host["last_checkin"]
    agent.start()
    assert host["hostname"] == "hv-01" and host["role"] == "mixed"
    detail = server.host(host["id"])
    facts = detail["report"]["facts"]
    assert facts["host"]["ok"] and facts["host"]["data"]["cpu_threads"] >= 1
    assert facts["host"]["data"]["memory_total"] > 0
    assert len(facts["host"]["data"]["load"]) == 3
    assert detail["report"]["libvirtd"]["ok"] is True
    assert detail["agent_version"] and detail["history"][0]["detail"].startswith("enrolled")
    # The identity key never left the host, and nobody else can read it.
    assert (agent.state / "identity.pem").stat().st_mode & 0o777 == 0o600
    assert agent.state.stat().st_mode & 0o777 == 0o700
    # The server's private keys are 0600 too.
    for key in ("identity/ca.key", "libvirt/ca.key", "token-signing.key", "tls/server.key"):
        assert (server.state / key).stat().st_mode & 0o777 == 0o600, key
    # `status` on the host tells the same story.
    status = wait_for(lambda: (r := agent.run_cmd("status")).returncode == 0
                      and "ok" in r.stdout and r.stdout, 10, "agent status")
    assert host["id"] in status and server.url in status


def test_a_checking_in_agent_loads_only_what_it_needs(server: Server, make_agent: MakeAgent) -> None:
    """Its memory budget (bench/footprint.py): no aiohttp or psutil, no cryptography until
    it renews, no libsystemd when it logs to stderr."""
    agent = make_agent("hv-lean", None)
    assert agent.join(server.token()).returncode == 0
    host_id = agent.host_id()
    joined = server.host(host_id)["last_checkin"]
    agent.start()
    wait_for(lambda: server.host(host_id)["last_checkin"] > joined, 10, "the service's check-in")
    assert agent.proc and agent.proc.proc
    maps = Path(f"/proc/{agent.proc.proc.pid}/maps").read_text()
    assert "libvirt" in maps  # what it does need
    for library in ("aiohttp", "psutil", "cryptography", "libsystemd"):
        assert library not in maps, library


def test_server_restart_keeps_hosts_and_tokens(start_server: Callable[..., Server],
                                               make_agent: MakeAgent) -> None:
    server = start_server()
    agent = make_agent("hv-keep", None)
    assert agent.join(server.token()).returncode == 0
    spare = server.admin_json("token", "create", "--uses", "3")["token"]["id"]
    agent.start()
    host_id = agent.host_id()
    first = wait_for(lambda: server.host(host_id)["last_checkin"], 10, "first check-in")
    server.proc.stop()
    restarted = start_server(state=server.state, port=server.port)
    tokens = {t["id"]: t for t in restarted.admin_json("token", "list")}
    assert tokens[spare]["max_uses"] == 3 and tokens[spare]["state"] == "valid"
    assert [h["id"] for h in restarted.hosts()] == [host_id]
    # The agent carries on by itself: its next check-ins land on the new process.
    wait_for(lambda: restarted.host(host_id)["last_checkin"] > first + 0.5, 20,
             "a check-in after the restart")
    assert agent.proc and agent.proc.alive()


def test_single_use_token_used_twice_in_parallel_enrolls_one_host(
        server: Server, make_agent: MakeAgent) -> None:
    join = server.token("--uses", "1")
    agents = [make_agent(f"race-{i}", None) for i in range(4)]
    with concurrent.futures.ThreadPoolExecutor(len(agents)) as pool:
        results = list(pool.map(lambda a: a.join(join), agents))
    ok = [r for r in results if r.returncode == 0]
    refused = [r for r in results if r.returncode != 0]
    assert len(ok) == 1, [r.stderr for r in results]
    assert all("already used" in r.stderr for r in refused), [r.stderr for r in refused]
    assert len(server.hosts()) == 1


def test_reused_single_use_token_is_refused(server: Server, make_agent: MakeAgent) -> None:
    join = server.token()
    assert make_agent("first", None).join(join).returncode == 0
    second = make_agent("second", None).join(join)
    assert second.returncode != 0 and "already used (1 of 1 uses)" in second.stderr
    assert [h["hostname"] for h in server.hosts()] == ["first"]


def test_revoked_token_is_refused(server: Server, make_agent: MakeAgent) -> None:
    created = server.admin_json("token", "create", "--uses", "5")
    server.admin("token", "revoke", created["token"]["id"])
    result = make_agent("late", None).join(created["join"])
    assert result.returncode != 0 and "revoked" in result.stderr
    assert server.hosts() == []


@pytest.mark.parametrize("forge, words", [
    ("expired", "expired"),
    ("tampered", "signature is not valid"),
    ("alg-none", "not signed with EdDSA"),
    ("foreign-key", "signature is not valid"),
    ("wrong-audience", "wrong audience"),
    ("garbage", "not valid"),
])
def test_forged_tokens_are_refused(server: Server, make_agent: MakeAgent, forge: str,
                                   words: str) -> None:
    join = server.token("--uses", "10")
    real = token_of(join)
    if forge == "expired":
        token = jwt.encode(claims(exp=int(time.time()) - 60), signing_key(server), "EdDSA")
    elif forge == "tampered":
        head, payload, sig = real.split(".")
        body = json.loads(base64.urlsafe_b64decode(payload + "=="))
        body["role"] = "mixed"
        body["uses"] = 1000
        forged = base64.urlsafe_b64encode(json.dumps(body).encode()).decode().rstrip("=")
        token = f"{head}.{forged}.{sig}"
    elif forge == "alg-none":
        token = jwt.encode(claims(), key=None, algorithm="none")  # type: ignore[arg-type]
    elif forge == "foreign-key":
        token = jwt.encode(claims(), Ed25519PrivateKey.generate(), "EdDSA")
    elif forge == "wrong-audience":
        token = jwt.encode(claims(aud="somebody-else"), signing_key(server), "EdDSA")
    else:
        token = "not-a-jwt"
    result = make_agent(f"forged-{forge}", None).join(with_token(join, token))
    assert result.returncode != 0
    assert "refused to enroll" in result.stderr and words in result.stderr, result.stderr
    assert server.hosts() == []


def test_role_beyond_the_token_is_refused(server: Server, make_agent: MakeAgent) -> None:
    agent = make_agent("greedy", None)
    result = agent.join(server.token("--role", "disk_operations"), "--role", "hypervisor")
    assert result.returncode != 0 and "beyond what this join token allows" in result.stderr
    assert server.hosts() == []


def test_wrong_ca_pin_is_refused_before_enrolling(server: Server, make_agent: MakeAgent) -> None:
    j = wire.JoinString.decode(server.token())
    wrong = wire.JoinString(url=j.url, ca_pin="sha256:" + "0" * 64, token=j.token).encode()
    agent = make_agent("mitm", None)
    result = agent.join(wrong)
    assert result.returncode != 0
    assert "refusing to trust it" in result.stderr and "Nothing was enrolled" in result.stderr
    assert server.hosts() == [] and not (agent.state / "agent.json").exists()
    # The token was not spent: the right pin still works.
    assert agent.join(wire.JoinString(url=j.url, ca_pin=j.ca_pin, token=j.token).encode()).returncode == 0


def test_garbage_join_string_is_a_clear_error(make_agent: MakeAgent) -> None:
    result = make_agent("typo", None).join("paste-went-wrong")
    assert result.returncode != 0
    assert "not a virtfleet join string" in result.stderr and "Traceback" not in result.stderr


def test_a_host_certificate_speaks_only_for_its_host(server: Server, make_agent: MakeAgent) -> None:
    a, b = make_agent("host-a", None), make_agent("host-b", None)
    assert a.join(server.token()).returncode == 0
    assert b.join(server.token()).returncode == 0
    a_id, b_id = a.host_id(), b.host_id()
    before_b = server.host(b_id)
    report = {"hostname": "host-b", "role": "mixed", "agent_version": "x",
              "libvirtd": {"ok": False, "error": "spoofed"}}
    # Naming B in the body is refused outright ...
    status, body = post(server, wire.CHECKIN_PATH,
                        json.dumps({"report": report, "host_id": b_id}).encode(),
                        cert=a.state / "identity.pem")
    assert status == 400 and "unknown field" in body["message"]
    # ... and a valid body with A's certificate changes A only.
    status, body = post(server, wire.CHECKIN_PATH, json.dumps({"report": report}).encode(),
                        cert=a.state / "identity.pem")
    assert status == 200 and body["host_id"] == a_id
    after_b = server.host(b_id)
    assert after_b["report"] == before_b["report"] and after_b["hostname"] == "host-b"
    assert server.host(a_id)["report"]["libvirtd"]["error"] == "spoofed"
    # Without a certificate there is no check-in at all.
    status, body = post(server, wire.CHECKIN_PATH, json.dumps({"report": report}).encode())
    assert status == 401 and "client certificate" in body["message"]


@pytest.mark.parametrize("body, status, words", [
    (b"{not json", 400, "not valid JSON"),
    (b"[]", 400, "expected a JSON object"),
    (json.dumps({"report": {"hostname": 1}}).encode(), 400, "report.hostname"),
    (b"{}" + b" " * (wire.MAX_BODY_BYTES + 10), 413, "larger than"),
    (json.dumps({"report": {"hostname": "h", "role": "mixed", "agent_version": "1",
                            "libvirtd": {"ok": True}, "facts": {"x": "y" * 300_000}}}).encode(),
     413, "larger than"),
])
def test_malformed_or_oversized_checkins_get_a_4xx(server: Server, make_agent: MakeAgent,
                                                   body: bytes, status: int, words: str) -> None:
    agent = make_agent("probe", None)
    assert agent.join(server.token()).returncode == 0
    before = server.host(agent.host_id())
    got, answer = post(server, wire.CHECKIN_PATH, body, cert=agent.state / "identity.pem")
    assert got == status and words in answer["message"], answer
    assert "Traceback" not in json.dumps(answer)
    assert server.host(agent.host_id())["report"] == before["report"]
    # The server keeps serving.
    assert server.admin("status").returncode == 0
    got, _ = post(server, wire.ENROLL_PATH, b"{}")
    assert got == 400


def test_bad_enrollments_get_a_4xx_and_change_nothing(server: Server) -> None:
    for body in (b"", b"null", b'{"token": 5}', json.dumps({"token": "x", "csr": "nope",
                 "report": {"hostname": "h", "role": "mixed", "agent_version": "1",
                            "libvirtd": {"ok": True}}}).encode()):
        status, answer = post(server, wire.ENROLL_PATH, body)
        assert 400 <= status < 500 and answer["message"], (body, answer)
    assert server.hosts() == []


def test_forgotten_host_is_refused_and_told_to_rejoin(server: Server, make_agent: MakeAgent) -> None:
    agent = make_agent("gone", None)
    assert agent.join(server.token()).returncode == 0
    server.admin("hosts", "forget", agent.host_id())
    result = agent.run_cmd("run", "--once")
    assert result.returncode == 1
    status = agent.run_cmd("status").stdout
    assert "not enrolled here" in status and "join" in status


def test_pending_until_enabled(server: Server, make_agent: MakeAgent) -> None:
    agent = make_agent("careful", None)
    assert agent.join(server.token("--no-auto-enable")).returncode == 0
    host = server.host(agent.host_id())
    assert host["status"] == "pending" and "hosts enable" in host["detail"]
    shown = server.admin("hosts", "enable", "careful").stdout
    assert "admin:         enabled" in shown
    history = [e["status"] for e in server.host(agent.host_id())["history"]]
    assert history[0] == "pending" and history[-1] != "pending"


def test_offline_after_grace_then_back(server: Server, make_agent: MakeAgent) -> None:
    agent = make_agent("flaky", None)
    assert agent.join(server.token()).returncode == 0
    agent.start()
    host_id = agent.host_id()
    wait_for(lambda: server.host(host_id)["last_checkin"], 10, "a check-in")
    agent.stop()
    host = server.wait_status(host_id, "offline", 15)
    assert "no check-in since" in host["detail"]
    # The grace period (4 s) was honoured, counted from the host's last check-in; the
    # sweep runs every second.
    assert 4 <= host["status_since"] - host["last_checkin"] < 6
    agent.start()
    wait_for(lambda: server.status_of(host_id) != "offline", 10, "the host back from offline")
    statuses = [e["status"] for e in server.host(host_id)["history"]]
    assert "offline" in statuses and statuses[-1] != "offline"


def test_admin_socket_is_for_root_only(server: Server) -> None:
    sock = server.state / "admin.sock"
    assert sock.stat().st_mode & 0o777 == 0o600
    assert server.state.stat().st_mode & 0o777 == 0o700


def test_admin_commands_without_a_server_say_so(tmp_path: Path) -> None:
    result = Server(tmp_path / "nothing", 1).admin("hosts", "list", check=False)
    assert result.returncode == 1 and "is virtfleet-server running" in result.stderr


def test_token_create_prints_the_command_to_paste(server: Server) -> None:
    result = server.admin("token", "create", "--role", "hypervisor", "--ttl", "15m")
    join = result.stdout.strip()
    assert join.startswith("vfjoin1.")
    assert "\nvirtfleet-agent join -\n" in result.stderr and "role hypervisor" in result.stderr
    assert f"virtfleet-agent join '{join}'" in result.stderr
    decoded = wire.JoinString.decode(join)
    assert decoded.url == server.url
    payload = jwt.decode(decoded.token, options={"verify_signature": False})
    assert payload["exp"] - payload["iat"] == pytest.approx(dt.timedelta(minutes=15).seconds, abs=2)


def test_unattended_join_from_the_config_then_the_token_is_forgotten(
        server: Server, make_agent: MakeAgent) -> None:
    join = server.token()
    agent = make_agent("auto", None, extra_toml=f'join = "{join}"\n')
    agent.start()
    wait_for(lambda: (agent.state / "agent.json").exists(), 15, "the unattended join")
    wait_for(lambda: "vfjoin1." not in agent.config.read_text(), 10, "the token to be removed")
    assert "# join = (used to enroll this host" in agent.config.read_text()
    host = wait_for(lambda: (hs := server.hosts()) and hs[0]["last_checkin"] and hs[0], 10,
                    "the host checking in")
    assert host["hostname"] == "auto"
    assert agent.proc is not None
    assert join not in agent.proc.log()  # the token never reaches a log


def test_checkin_with_a_role_beyond_the_token_is_refused(server: Server,
                                                         make_agent: MakeAgent) -> None:
    agent = make_agent("creep", None)
    assert agent.join(server.token("--role", "disk_operations"), "--role",
                      "disk_operations").returncode == 0
    agent.config.write_text('role = "mixed"\n' + agent.config.read_text())
    result = agent.run_cmd("run", "--once")
    assert result.returncode == 1
    assert "beyond what this host's join token allows" in agent.run_cmd("status").stdout
    host = server.host(agent.host_id())
    assert host["role"] == "disk_operations"  # what the token allows, not what was asked
    # The server says why too (not "offline: is the agent running?").
    assert host["status"] == "error" and "asks for role mixed, beyond what its join token" \
        in host["detail"], host["detail"]


def test_check_in_answers_name_the_server_urls_to_agents_that_know_them(
        server: Server, make_agent: MakeAgent) -> None:
    agent = make_agent("urls", None)
    assert agent.join(server.token()).returncode == 0
    report = {"hostname": "urls", "role": "mixed", "agent_version": "old", "libvirtd": {"ok": True}}
    cert = agent.state / "identity.pem"
    status, new = post(server, wire.CHECKIN_PATH, json.dumps({"report": report}).encode(), cert=cert)
    assert status == 200 and new["server_urls"] == [server.url]
    # An agent of protocol 1 refuses fields it does not know: it gets none.
    status, old = post(server, wire.CHECKIN_PATH,
                       json.dumps({"report": report, "protocol": 1}).encode(), cert=cert)
    assert status == 200 and "server_urls" not in old


def test_joining_the_same_server_again_keeps_one_host(server: Server, make_agent: MakeAgent) -> None:
    agent = make_agent("again", None)
    assert agent.join(server.token()).returncode == 0
    first = agent.host_id()
    result = agent.join(server.token("--role", "disk_operations"), "--force")
    assert result.returncode == 0, result.stderr
    assert agent.host_id() == first  # the same host, with a new identity
    hosts = server.hosts()
    assert [h["id"] for h in hosts] == [first], hosts
    host = server.host(first)
    assert host["role_limit"] == "disk_operations"
    assert "joined again" in " ".join(e["detail"] for e in host["history"])
    # The new identity checks in; the old one is retired.
    assert agent.run_cmd("run", "--once").returncode == 0
