"""The server's libvirt connection to each host, against a real libvirtd over real TLS."""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import libvirt
import pytest
from cryptography.x509.oid import NameOID

from common import libvirt_events, pki, wire
from common.files import write_atomic
from server.ca import CertificateAuthority
from tests.harness import Agent, Libvirtd, Server, free_port, observed, wait_for
from tests.test_enrollment import post

pytestmark = pytest.mark.slow
MakeAgent = Callable[..., Agent]


def online_host(server: Server, agent: Agent, lv: Libvirtd, *join_args: str) -> str:
    result = agent.join(server.token(*join_args))
    assert result.returncode == 0, result.stderr
    agent.start()
    host_id = agent.host_id()
    server.wait_status(host_id, "online", 20)
    return host_id


def tls_clients(lv: Libvirtd) -> int:
    """Established TCP connections on libvirtd's TLS port, seen from the host's side."""
    out = subprocess.run(["ss", "-Htn", "state", "established", f"( sport = :{lv.tls_port} )"],
                         capture_output=True, text=True, check=True).stdout
    return len([line for line in out.splitlines() if line.strip()])


def test_join_brings_the_host_online_over_tls(server: Server, libvirtd: Libvirtd,
                                             make_agent: MakeAgent) -> None:
    agent = make_agent("hv-tls", libvirtd)
    host_id = online_host(server, agent, libvirtd)
    host = server.host(host_id)
    conn = host["connection"]
    assert conn["state"] == "online"
    assert conn["uri"].startswith(f"qemu+tls://127.0.0.1:{libvirtd.tls_port}/system")
    assert conn["remote_libvirt_version"].count(".") == 2 and conn["connected_since"]
    assert host["capabilities"] == ["disk_operations", "hypervisor"]
    facts = host["report"]["facts"]
    assert facts["libvirtd"]["data"]["libvirt_version"] and facts["libvirtd"]["data"]["arch"]
    assert "usable" in facts["kvm"]["data"] and "nested" in facts["kvm"]["data"]
    assert host["report"]["libvirt_endpoint"]["port"] == libvirtd.tls_port
    assert tls_clients(libvirtd) == 1
    # libvirtd lets in only the server's client identity.
    conf = libvirtd.conf.read_text()
    assert 'tls_allowed_dn_list = ["CN=virtfleet-server-libvirt-client"]' in conf
    assert (libvirtd.pki / "private" / "serverkey.pem").stat().st_mode & 0o777 == 0o600
    shown = server.admin("hosts", "show", host_id).stdout
    assert "connection:    online to qemu+tls://" in shown and "libvirt 9." in shown


def test_join_checks_in_so_the_host_is_online_before_the_service_runs(
        server: Server, libvirtd: Libvirtd, make_agent: MakeAgent) -> None:
    agent = make_agent("hv-early", libvirtd)
    result = agent.join(server.token())
    assert result.returncode == 0, result.stderr
    assert "checked in: the server says" in result.stdout
    server.wait_status(agent.host_id(), "online", 20)
    assert agent.proc is None  # no `virtfleet-agent run` yet
    status = agent.run_cmd("status").stdout
    assert "last check-in" in status and ": ok" in status, status


def test_libvirtd_down_then_back(server: Server, libvirtd: Libvirtd, make_agent: MakeAgent) -> None:
    agent = make_agent("hv-bounce", libvirtd)
    host_id = online_host(server, agent, libvirtd)
    libvirtd.stop()
    host = wait_for(lambda: (h := server.host(host_id))["status"] == "error"
                    and "libvirtd is down on the host" in h["detail"] and h, 10,
                    "error: libvirtd is down")
    assert "connect" in host["detail"].lower()  # libvirt's own words ride along
    agent_pid = agent.proc.proc.pid if agent.proc and agent.proc.proc else None
    libvirtd.start()
    server.wait_status(host_id, "online", 15)
    assert agent.proc and agent.proc.proc and agent.proc.proc.pid == agent_pid  # nothing restarted
    statuses = [(e["status"], e["detail"]) for e in server.host(host_id)["history"]]
    downs = [d for s, d in statuses if s == "error"]
    assert any("libvirtd is down" in d or "connection lost" in d for d in downs), statuses
    assert statuses[-1][0] == "online"


def test_libvirtd_restarted_at_once_is_back_online_before_the_next_regular_checkin(
        start_server: Callable[..., Server], libvirtd: Libvirtd, make_agent: MakeAgent) -> None:
    # The default interval (10 s): the return must come from the agent's watch, not the
    # next regular check-in, even when libvirtd came back before any probe saw it down.
    server = start_server("--checkin-interval", "10", "--grace", "30")
    agent = make_agent("hv-blink", libvirtd)
    host_id = online_host(server, agent, libvirtd)
    first = server.host(host_id)["connection"]["connected_since"]
    libvirtd.stop()
    libvirtd.start()
    back = time.monotonic()  # libvirtd listens again
    wait_for(lambda: (h := server.host(host_id))["status"] == "online"
             and h["connection"]["connected_since"] != first, 15, "online on a new connection")
    took = observed("libvirtd restarted -> online (interval 10 s)", back)
    assert took < 3, took
    assert any(e["status"] == "error" for e in server.host(host_id)["history"])


def test_server_restart_reopens_connections(start_server: Callable[..., Server],
                                            libvirtd: Libvirtd, make_agent: MakeAgent) -> None:
    server = start_server()
    agent = make_agent("hv-restart", libvirtd)
    host_id = online_host(server, agent, libvirtd)
    server.proc.stop()
    wait_for(lambda: tls_clients(libvirtd) == 0, 10, "the old connection to close")
    restarted = start_server(state=server.state, port=server.port)
    restarted.wait_status(host_id, "online", 20)
    assert tls_clients(libvirtd) == 1


def test_disable_closes_and_enable_reopens(server: Server, libvirtd: Libvirtd,
                                           make_agent: MakeAgent) -> None:
    agent = make_agent("hv-toggle", libvirtd)
    host_id = online_host(server, agent, libvirtd)
    server.admin("hosts", "disable", host_id)
    host = server.wait_status(host_id, "disabled", 5)
    assert host["connection"]["state"] == "closed"
    wait_for(lambda: tls_clients(libvirtd) == 0, 10, "libvirtd to see the connection closed")
    server.admin("hosts", "enable", host_id)
    server.wait_status(host_id, "online", 15)
    assert tls_clients(libvirtd) == 1
    history = [e["status"] for e in server.host(host_id)["history"]]
    assert history[-3:] == ["disabled", "connecting", "online"]
    for event in server.host(host_id)["history"]:
        assert event["detail"] and event["at"]


def test_forget_closes_the_connection(server: Server, libvirtd: Libvirtd,
                                      make_agent: MakeAgent) -> None:
    agent = make_agent("hv-forget", libvirtd)
    host_id = online_host(server, agent, libvirtd)
    forgotten_at = time.monotonic()
    server.admin("hosts", "forget", host_id)
    wait_for(lambda: tls_clients(libvirtd) == 0, 10, "the connection to close")
    observed("forget -> libvirt connection closed", forgotten_at)
    assert server.hosts() == []


def test_forgotten_host_identity_is_refused(server: Server, libvirtd: Libvirtd,
                                            make_agent: MakeAgent) -> None:
    agent = make_agent("hv-revoked", libvirtd)
    host_id = online_host(server, agent, libvirtd)
    server.admin("hosts", "forget", host_id)
    agent.stop()
    # Its identity certificate can neither check in nor renew.
    for path in (wire.CHECKIN_PATH, wire.RENEW_PATH):
        status, body = post(server, path, b"{}", cert=agent.state / "identity.pem")
        assert status == 403 and "not enrolled here" in body["message"], (path, body)


@pytest.mark.parametrize("transport", ["direct", "auto"])
def test_a_host_pointing_the_server_at_another_hosts_libvirtd_gets_no_connection(
        server: Server, libvirtd: Libvirtd, make_agent: MakeAgent, transport: str) -> None:
    victim = make_agent("hv-victim", libvirtd)
    online_host(server, victim, libvirtd)
    # The attacker: enrolled with no libvirtd of its own, checking in from the same
    # address (NAT) and naming the victim's TLS port as its own.
    attacker = make_agent("hv-attacker", None)
    assert attacker.join(server.token("--transport", transport)).returncode == 0
    report = {"hostname": "hv-attacker", "role": "disk_operations", "agent_version": "x",
              "libvirtd": {"ok": True}, "libvirt_endpoint": {"host": "x", "port": libvirtd.tls_port}}
    status, _ = post(server, wire.CHECKIN_PATH, json.dumps({"report": report}).encode(),
                     cert=attacker.state / "identity.pem")
    assert status == 200
    if transport == "direct":
        host = wait_for(lambda: (h := server.host(attacker.host_id()))["status"] == "error" and h,
                        15, "the attacker's host to be refused")
        assert "another host's libvirtd certificate" in host["detail"], host["detail"]
        assert host["connection"]["state"] == "error"
    else:  # turned to its own tunnel, which reaches only its own libvirtd; the operator sees why
        host = wait_for(lambda: "why_tunnel" in (h := server.host(attacker.host_id()))
                        ["connection"]["transport"] and h, 15, "the attacker's host to be refused")
        assert "another host's libvirtd certificate" in host["connection"]["transport"]["why_tunnel"]
        assert host["status"] != "online"
    assert tls_clients(libvirtd) == 1  # only the victim's own connection


def _pkipath(directory: Path, ca_pem: str, cert_pem: str, key_pem: bytes) -> str:
    write_atomic(directory / "cacert.pem", ca_pem)
    write_atomic(directory / "clientcert.pem", cert_pem)
    write_atomic(directory / "clientkey.pem", key_pem, mode=0o600)
    return str(directory)


def test_libvirtd_refuses_other_identities(server: Server, libvirtd: Libvirtd,
                                           make_agent: MakeAgent, tmp_path: Path) -> None:
    agent = make_agent("hv-guard", libvirtd)
    online_host(server, agent, libvirtd)
    libvirt_ca = (server.state / "libvirt" / "ca.crt").read_text()
    uri = f"qemu+tls://127.0.0.1:{libvirtd.tls_port}/system?pkipath="
    libvirt_events.start()

    def opens(pkipath: str) -> bool:
        try:
            libvirt.open(uri + pkipath).close()
        except libvirt.libvirtError:
            return False
        return True

    # Control: the server's own client identity opens it.
    assert opens(str(server.state / "libvirt-client"))
    # A certificate from another CA, with the very DN libvirtd allows.
    other = CertificateAuthority.load_or_create(tmp_path / "other-ca", "someone else")
    key = pki.new_key()
    cert = other.issue(key.public_key(), [(NameOID.COMMON_NAME, "virtfleet-server-libvirt-client")],
                       lifetime=dt.timedelta(days=1), client=True)
    assert not opens(_pkipath(tmp_path / "foreign", libvirt_ca, pki.cert_pem(cert), pki.key_pem(key)))
    # The agent's own identity certificate (identity CA, not libvirt's).
    identity = (agent.state / "identity.pem").read_bytes()
    assert not opens(_pkipath(tmp_path / "agent-id", libvirt_ca, pki.cert_pem(pki.load_cert(identity)),
                              identity.split(b"-----BEGIN CERTIFICATE-----")[0]))
    # A certificate the libvirt CA did sign, but for a host, not for the server.
    host_key = (libvirtd.pki / "private" / "serverkey.pem").read_bytes()
    host_cert = (libvirtd.pki / "servercert.pem").read_text()
    assert not opens(_pkipath(tmp_path / "host-cert", libvirt_ca, host_cert, host_key))


def test_hypervisor_without_kvm_is_an_error_naming_kvm(server: Server, tmp_path: Path,
                                                       make_agent: MakeAgent) -> None:
    lv = Libvirtd(tmp_path / "no-kvm", free_port(), hide_kvm=True)
    lv.start()
    try:
        agent = make_agent("hv-nokvm", lv, extra_toml='role = "hypervisor"\n')
        assert agent.join(server.token("--role", "hypervisor")).returncode == 0
        agent.start()
        host = wait_for(lambda: (h := server.host(agent.host_id()))["status"] == "error"
                        and "KVM" in h["detail"] and h, 60, "error naming KVM")
        assert "role hypervisor needs KVM" in host["detail"]
        # The same host can do disk work: an admin override makes it usable.
        server.admin("hosts", "set-role", agent.host_id(), "disk_operations")
        host = server.wait_status(agent.host_id(), "online", 30)
        assert host["role"] == "disk_operations" and host["role_source"] == "admin override"
        assert host["capabilities"] == ["disk_operations"]
    finally:
        lv.stop()


def test_role_from_the_host_config_is_reported(server: Server, libvirtd: Libvirtd,
                                               make_agent: MakeAgent) -> None:
    agent = make_agent("hv-disk", libvirtd, extra_toml='role = "disk_operations"\n')
    host_id = online_host(server, agent, libvirtd, "--role", "mixed")
    host = server.host(host_id)
    assert host["role"] == "disk_operations" and host["role_source"] == "host configuration"
    assert host["role_limit"] == "mixed"


def test_bad_role_in_config_is_a_clear_error(make_agent: MakeAgent) -> None:
    agent = make_agent("hv-typo", None, extra_toml='role = "hypervsior"\n')
    result = agent.run_cmd("status")
    assert result.returncode == 1 and "role 'hypervsior' is not one of" in result.stderr


def test_tls_files_not_written_by_the_agent_are_not_overwritten(
        server: Server, libvirtd: Libvirtd, make_agent: MakeAgent) -> None:
    theirs = libvirtd.pki / "servercert.pem"
    theirs.write_text("an admin's own certificate\n")
    result = make_agent("hv-careful", libvirtd).join(server.token())
    assert result.returncode != 0
    assert f"{theirs} exists and was not written by virtfleet-agent" in result.stderr
    assert theirs.read_text() == "an admin's own certificate\n"
    assert server.hosts() == []  # refused before the token was spent


def test_a_dead_agent_leaves_the_host_online_with_a_warning(server: Server, libvirtd: Libvirtd,
                                                            make_agent: MakeAgent) -> None:
    agent = make_agent("hv-agent-crash", libvirtd)
    host_id = online_host(server, agent, libvirtd)
    agent.stop(signal.SIGKILL)
    # Past the grace (4 s): libvirt still answers on the open connection, so desktops run
    # and engines can use the host; only the agent is silent, and the detail says so.
    host = wait_for(lambda: "the agent has not checked in since" in (h := server.host(host_id))["detail"]
                    and h, 15, "the warning about the agent")
    assert host["status"] == "online" and host["connection"]["state"] == "online"
    assert "offline" not in [e["status"] for e in host["history"]]
    libvirtd.stop()  # now the host itself is gone: offline
    server.wait_status(host_id, "offline", 15)
