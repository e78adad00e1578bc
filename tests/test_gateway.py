"""The engine's doors against a real libvirtd: the gateway (any libvirt client, the real
virsh) and the engine API with its watch."""

from __future__ import annotations

import contextlib
import grp
import http.client
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

from common import libvirt_events
from tests.harness import Agent, Libvirtd, Server, wait_for

pytestmark = pytest.mark.slow
MakeAgent = Callable[..., Agent]
GROUP = "libvirt-qemu"  # exists wherever libvirt-daemon-system is installed
TINY = """<domain type='kvm'><name>{name}</name><memory unit='MiB'>32</memory><vcpu>1</vcpu>
<os><type arch='x86_64' machine='pc'>hvm</type></os>
<devices><emulator>/usr/bin/qemu-system-x86_64</emulator></devices></domain>"""


def virsh(uri: str, *args: str, user: int | None = None,
          groups: str = "") -> subprocess.CompletedProcess[str]:
    cmd = ["virsh", "-q", "-c", uri, *args]
    if user is not None:
        cmd = ["setpriv", f"--reuid={user}", f"--regid={user}",
               f"--groups={groups}" if groups else "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60,
                          env=os.environ | {"HOME": "/tmp"})


@pytest.fixture
def online(start_server: Callable[..., Server], libvirtd: Libvirtd,
           make_agent: MakeAgent) -> tuple[Server, str, Libvirtd]:
    server = start_server("--checkin-interval", "1", "--grace", "4", "--engine-group", GROUP)
    agent = make_agent("hv-engine", libvirtd)
    assert agent.join(server.token()).returncode == 0
    agent.start()
    host_id = agent.host_id()
    server.wait_status(host_id, "online", 20)
    return server, host_id, libvirtd


class Engine:
    """The engine API over its unix socket, from this process."""

    def __init__(self, server: Server) -> None:
        self.path = server.run_dir / "engine.sock"

    def _conn(self, timeout: float = 10) -> http.client.HTTPConnection:
        conn = http.client.HTTPConnection("localhost", timeout=timeout)
        sock = socket.socket(socket.AF_UNIX)
        sock.settimeout(timeout)
        sock.connect(str(self.path))
        conn.sock = sock
        return conn

    def get(self, path: str) -> tuple[int, Any]:
        conn = self._conn()
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, json.loads(resp.read())
        finally:
            conn.close()

    def watch(self, since: int, timeout: float = 15) -> Iterator[dict[str, Any]]:
        conn = self._conn(timeout)
        try:
            conn.request("GET", f"/v1/hosts?watch=1&since={since}")
            resp = conn.getresponse()
            assert resp.status == 200, resp.read()
            while line := resp.readline():
                yield json.loads(line)
        finally:
            conn.close()


def test_virsh_lists_reads_and_starts_a_kvm_guest_through_the_gateway(
        online: tuple[Server, str, Libvirtd], tmp_path: Path) -> None:
    server, host_id, libvirtd = online
    uri = server.admin("hosts", "uri", host_id).stdout.strip()
    assert uri == server.gateway_uri(host_id) == f"qemu+unix:///system?socket={server.run_dir}/hosts/{host_id}.sock"
    assert virsh(uri, "list").returncode == 0
    assert virsh(uri, "-r", "list").returncode == 0
    caps = virsh(uri, "domcapabilities", "--virttype", "kvm")
    assert caps.returncode == 0 and "<domain>kvm</domain>" in caps.stdout
    xml = tmp_path / "tiny.xml"
    xml.write_text(TINY.format(name="vf-gw-tiny"))
    created = virsh(uri, "create", str(xml))
    assert created.returncode == 0, created.stderr
    try:
        # The guest runs on the host's own libvirtd, not anywhere else.
        assert "vf-gw-tiny" in virsh(libvirtd.uri, "list", "--name").stdout
        assert virsh(uri, "domstate", "vf-gw-tiny").stdout.strip() == "running"
    finally:
        assert virsh(uri, "destroy", "vf-gw-tiny").returncode == 0
    assert "vf-gw-tiny" not in virsh(libvirtd.uri, "list", "--all", "--name").stdout


def test_five_connections_at_once_and_a_read_only_one_hears_lifecycle_events(
        online: tuple[Server, str, Libvirtd]) -> None:
    server, host_id, _ = online
    uri = server.gateway_uri(host_id)
    libvirt_events.start()
    writers = [libvirt.open(uri) for _ in range(4)]
    reader = libvirt.openReadOnly(uri)
    heard: list[int] = []
    got = threading.Event()

    def lifecycle(_conn: Any, dom: Any, event: int, _detail: int, _opaque: Any) -> None:
        if dom.name() == "vf-gw-events":
            heard.append(event)
            got.set()

    reader.domainEventRegisterAny(None, libvirt.VIR_DOMAIN_EVENT_ID_LIFECYCLE, lifecycle, None)
    reader.setKeepAlive(2, 3)
    try:
        assert {c.getHostname() for c in writers} == {reader.getHostname()}
        dom = writers[0].createXML(TINY.format(name="vf-gw-events"), 0)
        wait_for(got.is_set, 10, "the read-only connection to hear the start")
        dom.destroy()
        wait_for(lambda: libvirt.VIR_DOMAIN_EVENT_STOPPED in heard, 10, "the stop")
        assert libvirt.VIR_DOMAIN_EVENT_STARTED in heard
        with pytest.raises(libvirt.libvirtError):
            reader.createXML(TINY.format(name="vf-gw-refused"), 0)  # read-only stays read-only
        assert server.host(host_id)["gateway"]["open"] == 5
    finally:
        for conn in [*writers, reader]:
            conn.close()


def test_disable_cuts_every_relayed_connection_and_forget_removes_the_socket(
        online: tuple[Server, str, Libvirtd], make_agent: MakeAgent) -> None:
    server, host_id, _ = online
    uri = server.gateway_uri(host_id)
    sock = server.run_dir / "hosts" / f"{host_id}.sock"
    libvirt_events.start()
    conns = [libvirt.open(uri) for _ in range(3)]
    for conn in conns:
        conn.setKeepAlive(1, 2)
    closed: list[float] = []
    for conn in conns:
        conn.registerCloseCallback(lambda *_: closed.append(time.monotonic()), None)
    disabled_at = time.monotonic()
    server.admin("hosts", "disable", host_id)
    wait_for(lambda: len(closed) == 3, 5, "every relayed connection to close")
    assert max(closed) - disabled_at < 1.0, max(closed) - disabled_at
    assert not sock.exists()
    server.admin("hosts", "enable", host_id)
    server.wait_status(host_id, "online", 15)
    wait_for(sock.exists, 5, "the socket back")
    assert virsh(uri, "list").returncode == 0
    server.admin("hosts", "forget", host_id)
    wait_for(lambda: not sock.exists(), 5, "the socket to go")
    for conn in conns:
        conn.close()


def test_the_servers_run_dir_is_private_where_it_must_be_and_gone_when_it_stops(
        online: tuple[Server, str, Libvirtd]) -> None:
    server, host_id, _ = online
    # The sockets libvirt is handed for the server's own links reach a host as the server.
    assert (server.run_dir / "links").stat().st_mode & 0o777 == 0o700
    assert (server.run_dir / "hosts" / f"{host_id}.sock").exists()
    assert server.proc.stop() == 0
    assert not server.run_dir.exists()


def test_only_the_engine_group_may_use_the_sockets(online: tuple[Server, str, Libvirtd]) -> None:
    server, host_id, _ = online
    uri = server.gateway_uri(host_id)
    gid = grp.getgrnam(GROUP).gr_gid
    outsider = virsh(uri, "list", user=65534)
    assert outsider.returncode != 0 and "ermission denied" in outsider.stderr, outsider.stderr
    member = virsh(uri, "list", user=65534, groups=str(gid))
    assert member.returncode == 0, member.stderr
    for path in (server.run_dir / "engine.sock", server.run_dir / "hosts" / f"{host_id}.sock"):
        st = path.stat()
        assert st.st_mode & 0o777 == 0o660 and st.st_gid == gid, (path, oct(st.st_mode))


def test_the_relay_survives_garbage_and_clients_that_never_read(
        online: tuple[Server, str, Libvirtd]) -> None:
    server, host_id, _ = online
    path = str(server.run_dir / "hosts" / f"{host_id}.sock")
    garbage = socket.socket(socket.AF_UNIX)
    garbage.connect(path)
    garbage.sendall(os.urandom(64 * 1024))
    silent = [socket.socket(socket.AF_UNIX) for _ in range(20)]
    for s in silent:
        s.connect(path)
    assert virsh(server.gateway_uri(host_id), "list").returncode == 0  # others are served
    garbage.settimeout(10)
    try:
        while garbage.recv(65536):  # libvirtd answers the garbage by hanging up
            pass
    except OSError:
        pass
    for s in [garbage, *silent]:
        s.close()
    assert server.status_of(host_id) == "online"


def test_an_unreachable_host_closes_new_connections_and_the_engine_api_says_why(
        online: tuple[Server, str, Libvirtd]) -> None:
    server, host_id, libvirtd = online
    engine = Engine(server)
    libvirtd.stop()
    wait_for(lambda: engine.get(f"/v1/hosts/{host_id}")[1]["status"] == "error", 15,
             "the engine API to say the host is in error")
    record = engine.get(f"/v1/hosts/{host_id}")[1]
    # Whichever the server saw first: the agent's report, the link's loss, or a redial.
    assert any(why in record["detail"] for why in ("libvirtd is down", "connection lost",
                                                   "not listening", "cannot reach")), record["detail"]
    refused = virsh(server.gateway_uri(host_id), "list")
    assert refused.returncode != 0
    libvirtd.start()
    server.wait_status(host_id, "online", 20)


def test_watch_delivers_every_change_in_order_with_heartbeats_and_410(
        online: tuple[Server, str, Libvirtd]) -> None:
    server, host_id, _ = online
    engine = Engine(server)
    status, listed = engine.get("/v1/hosts")
    assert status == 200 and [h["id"] for h in listed["hosts"]] == [host_id]
    record = listed["hosts"][0]
    assert record["gateway_uri"] == server.gateway_uri(host_id) and record["status"] == "online"
    assert {"id", "hostname", "role", "capabilities", "admin_state", "facts"} <= record.keys()
    start = listed["revision"]
    events: list[dict[str, Any]] = []
    done = threading.Event()

    def follow() -> None:
        with contextlib.suppress(OSError):  # the socket's timeout, once done
            for event in engine.watch(start, timeout=8):
                events.append(event)
                if done.is_set():
                    return

    watching = threading.Thread(target=follow, daemon=True)
    watching.start()
    server.admin("hosts", "set-role", host_id, "disk_operations")  # role (and a reconnect)
    server.admin("hosts", "disable", host_id)  # status and admin state
    wait_for(lambda: any(e.get("host", {}).get("admin_state") == "disabled" for e in events), 10,
             "the disable to reach the watcher")
    wait_for(lambda: any(e["type"] == "heartbeat" for e in events), 10, "a heartbeat")
    changes = [e for e in events if e["type"] != "heartbeat"]
    revisions = [e["revision"] for e in changes]
    assert revisions == sorted(revisions) and revisions[0] > start
    assert any(e["host"]["role"] == "disk_operations" for e in changes)
    # A watcher that comes back with its last revision misses nothing.
    resumed = []
    for event in engine.watch(revisions[1] - 1, timeout=8):
        if event["type"] == "heartbeat":
            break
        resumed.append(event["revision"])
    assert resumed == revisions[1:len(resumed) + 1] and resumed
    assert engine.get("/v1/hosts?watch=1&since=1")[0] == 410  # older than anything kept
    assert engine.get("/v1/hosts?watch=1&since=oops")[0] == 400
    done.set()
    watching.join(10)
    assert not watching.is_alive()


def test_a_facts_change_is_an_event_and_a_usage_change_is_not(
        start_server: Callable[..., Server], make_agent: MakeAgent) -> None:
    from tests.test_enrollment import post

    server = start_server("--checkin-interval", "10", "--grace", "30")  # no offline meanwhile
    agent = make_agent("facts", None)
    assert agent.join(server.token()).returncode == 0
    engine = Engine(server)

    def checkin(hugepages: int, load: float) -> None:
        facts = {"memory": {"ok": True, "seconds": load / 100, "data": {
            "memory_available": int(load * 1e9), "hugepages": [{"size_kib": 2048, "total": hugepages}]}},
            "host": {"ok": True, "data": {"load": [load, load, load]}}}
        report = {"hostname": "facts", "role": "mixed", "agent_version": "x",
                  "libvirtd": {"ok": True}, "facts": facts}
        status, _ = post(server, "/v1/checkin", json.dumps({"report": report}).encode(),
                         cert=agent.state / "identity.pem")
        assert status == 200

    checkin(hugepages=0, load=0.1)
    revision = engine.get("/v1/hosts")[1]["revision"]
    checkin(hugepages=0, load=0.7)  # usage only: no change
    checkin(hugepages=512, load=0.7)  # a fact an engine schedules on
    seen = []
    for event in engine.watch(revision, timeout=8):
        seen.append(event)
        if event["type"] == "heartbeat":
            break
    changes = [e for e in seen if e["type"] != "heartbeat"]
    assert len(changes) == 1, changes
    assert changes[0]["host"]["facts"]["memory"]["hugepages"] == [{"size_kib": 2048, "total": 512}]
    assert changes[0]["host"]["facts"]["host"]["load"] == [0.7, 0.7, 0.7]  # current all the same
