"""Certificate renewal with short lifetimes: identities and libvirtd's certificate renew
before they expire, with no `error` or `offline` in between and the libvirt connection
kept; a host that was off past its expiry is told to re-join."""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable

import pytest

from common import pki
from tests.harness import Agent, Libvirtd, Server, wait_for

pytestmark = pytest.mark.slow
LIFETIME = 12.0


def served_certificate_serial(lv: Libvirtd) -> int:
    pem = ssl.get_server_certificate((lv.listen_addr, lv.tls_port))
    return int(pki.load_cert(pem).serial_number)


def test_certificates_renew_without_a_blip(start_server: Callable[..., Server], libvirtd: Libvirtd,
                                           make_agent: Callable[..., Agent]) -> None:
    server = start_server("--checkin-interval", "1", "--grace", "4",
                          "--cert-lifetime", f"{LIFETIME:g}s")
    agent = make_agent("hv-renew", libvirtd)
    assert agent.join(server.token()).returncode == 0
    agent.start()
    host_id = agent.host_id()
    first = server.wait_status(host_id, "online", 20)
    connected_since = first["connection"]["connected_since"]
    libvirtd_serial = served_certificate_serial(libvirtd)
    # Past the first certificates' expiry, the host is still online on the same connection.
    wait_for(lambda: time.time() > first["certificate_expires"] + 2, LIFETIME + 5,
             "the first certificate's expiry to pass")
    now = server.host(host_id)
    assert now["status"] == "online"
    assert now["certificate_expires"] > first["certificate_expires"]
    assert now["libvirt_certificate_expires"] > first["libvirt_certificate_expires"]
    assert now["connection"]["connected_since"] == connected_since
    assert served_certificate_serial(libvirtd) != libvirtd_serial  # reloaded in place
    after_online = [e["status"] for e in now["history"] if e["at"] >= first["status_since"]]
    assert set(after_online) == {"online"}, now["history"]
    assert "certificates renewed" in (agent.proc.log() if agent.proc else "")

    # Switched off past its expiry: the host says plainly that it must join again.
    agent.stop()
    expiry = server.host(host_id)["certificate_expires"]
    wait_for(lambda: time.time() > expiry + 1, LIFETIME + 5, "the certificate to expire")
    result = agent.run_cmd("run", "--once")
    assert result.returncode == 1
    status = agent.run_cmd("status").stdout
    assert "certificate expired" in status and "re-join" in status
    # libvirt still answers on the open connection: online, with the silent agent named.
    wait_for(lambda: "the agent has not checked in since" in (h := server.host(host_id))["detail"]
             and h["status"] == "online", 10, "online with a warning about the agent")
