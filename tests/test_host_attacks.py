"""One hostile host against the server: it must not fill the disk or the log, nor use the
server to learn what listens on its own address."""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from common import wire
from server.store.sql import HISTORY_BURST
from tests.harness import Agent, Server, free_port, wait_for

pytestmark = pytest.mark.slow
MakeAgent = Callable[..., Agent]


class HostClient:
    """A kept-alive mTLS connection speaking for an enrolled host, as a hostile agent would."""

    def __init__(self, server: Server, agent: Agent) -> None:
        ctx = ssl.create_default_context(cafile=str(server.state / "identity" / "ca.crt"))
        ctx.load_cert_chain(agent.state / "identity.pem")
        self.conn = http.client.HTTPSConnection(server.address, server.port, context=ctx, timeout=10)
        self.transport = "direct"  # what its join token said

    def checkin(self, error: str | None = None, port: int | None = None) -> tuple[int, Any]:
        report: dict[str, Any] = {"hostname": "hostile", "role": "disk_operations",
                                  "agent_version": "x", "libvirtd": {"ok": error is None, "error": error}}
        if port is not None:
            report["libvirt_endpoint"] = {"host": "x", "port": port}
        self.conn.request("POST", wire.CHECKIN_PATH, json.dumps({"report": report}),
                          {"Content-Type": "application/json"})
        resp = self.conn.getresponse()
        return resp.status, json.loads(resp.read())

    def close(self) -> None:
        self.conn.close()


@pytest.fixture(params=["direct", "auto"])
def hostile(server: Server, make_agent: MakeAgent, request: pytest.FixtureRequest) -> Iterator[HostClient]:
    """A host joined with a `direct` token, or an `auto` one (whose answer's `tunnel` flag
    must tell it no more than the words do)."""
    agent = make_agent("hostile", None)
    assert agent.join(server.token("--transport", request.param)).returncode == 0
    client = HostClient(server, agent)
    client.transport = request.param
    yield client
    client.close()


def test_a_check_in_flood_with_new_errors_cannot_fill_the_disk_or_the_log(
        server: Server, hostile: HostClient) -> None:
    db = server.state / "state.db"
    log_before = len(server.proc.log())
    statuses = [hostile.checkin(error=f"made-up failure {i} " + "x" * 1500)[0] for i in range(400)]
    assert statuses.count(429) > 300, statuses.count(429)  # rate-limited per host
    assert set(statuses) <= {200, 429}
    host = server.hosts()[0]
    history = server.host(host["id"])["history"]
    assert len(history) <= HISTORY_BURST + 2, len(history)
    grown = db.stat().st_size + (db.with_name("state.db-wal").stat().st_size
                                 if db.with_name("state.db-wal").exists() else 0)
    assert grown < 2 * 2**20, grown
    lines = [x for x in server.proc.log()[log_before:].splitlines() if "made-up failure" in x]
    assert len(lines) <= HISTORY_BURST + 2, len(lines)


def test_the_host_cannot_tell_a_closed_port_from_another_service(
        server: Server, hostile: HostClient) -> None:
    closed = free_port()
    with socket.socket() as plain:  # a service that is not libvirtd's TLS
        plain.bind(("127.0.0.1", 0))
        plain.listen()
        stop = threading.Event()

        def answer() -> None:
            plain.settimeout(0.2)
            while not stop.is_set():
                try:
                    peer, _ = plain.accept()
                except TimeoutError:
                    continue
                peer.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
                peer.close()

        answering = threading.Thread(target=answer, daemon=True)
        answering.start()
        seen = {}
        host_id = server.hosts()[0]["id"]
        try:
            for name, port in (("closed", closed), ("ssh", plain.getsockname()[1])):
                assert hostile.checkin(port=port)[0] == 200
                # An auto host keeps its turn to the tunnel: afresh for each port.
                server.admin("hosts", "set-transport", host_id, hostile.transport)
                # A direct host's error, or an auto host's turn to its tunnel: each says
                # what the direct dial met.
                operator = wait_for(lambda p=port: str(p) in (h := server.host(host_id))["detail"]
                                    and h["detail"], 20, f"the {name} port's error")
                _, answer_ = hostile.checkin(port=port)
                seen[name] = (operator, answer_["detail"], answer_["tunnel"])
        finally:
            stop.set()
            answering.join(5)
    assert seen["closed"][0] != seen["ssh"][0]  # the operator reads the difference
    assert seen["closed"][1:] == seen["ssh"][1:]  # the host reads none
    assert "hosts show" in seen["closed"][1]
