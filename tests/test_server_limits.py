"""What a connection may cost the agent port before it proves anything: deadlines for the
handshake and the first request, a cap per source address, the file limit raised."""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from server.doors.guard import FIRST_REQUEST_TIMEOUT, HANDSHAKE_TIMEOUT
from tests.harness import Server, wait_for
from tests.test_enrollment import post

pytestmark = pytest.mark.slow


def tls_connection(server: Server, source: str = "127.0.0.1") -> ssl.SSLSocket:
    ctx = ssl.create_default_context(cafile=str(server.state / "identity" / "ca.crt"))
    raw = socket.create_connection((server.address, server.port), timeout=5,
                                   source_address=(source, 0))
    return ctx.wrap_socket(raw, server_hostname=server.address)


def closed_by_server(sock: socket.socket) -> bool:
    sock.settimeout(0.05)
    try:
        return sock.recv(1) == b""
    except (TimeoutError, BlockingIOError, ssl.SSLWantReadError):
        return False
    except (ConnectionError, ssl.SSLError, OSError):
        return True


def test_connections_that_send_nothing_are_closed_and_others_still_get_in(
        start_server: Callable[..., Server]) -> None:
    server = start_server()
    idle_tls = [tls_connection(server) for _ in range(30)]
    no_handshake = [socket.create_connection((server.address, server.port)) for _ in range(5)]
    half_headers = tls_connection(server)
    half_headers.sendall(b"POST /v1/checkin HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    opened = time.monotonic()
    # Meanwhile the port serves everyone else.
    status, _ = post(server, "/v1/enroll", b"{}")
    assert status == 400
    everyone = [*idle_tls, half_headers, *no_handshake]
    wait_for(lambda: all(closed_by_server(s) for s in everyone),
             max(FIRST_REQUEST_TIMEOUT, HANDSHAKE_TIMEOUT) + 5, "the idle connections to be closed")
    assert time.monotonic() - opened >= min(FIRST_REQUEST_TIMEOUT, HANDSHAKE_TIMEOUT) - 1
    for s in everyone:
        s.close()


def test_one_address_cannot_hold_more_than_its_share(start_server: Callable[..., Server]) -> None:
    server = start_server("--checkin-interval", "1", "--grace", "4",
                          "--max-connections-per-address", "20")
    held = [tls_connection(server) for _ in range(20)]
    extra = tls_connection(server)
    wait_for(lambda: closed_by_server(extra), 5, "the connection past the cap to be closed")
    assert not any(closed_by_server(s) for s in held)  # those within it stay
    # Another address is not affected.
    other = tls_connection(server, source="127.0.0.2")
    other.sendall(b"GET /v1/ca HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    other.settimeout(5)
    assert other.recv(12).startswith(b"HTTP/1.1 200")
    for s in [*held, extra, other]:
        s.close()



def test_the_server_raises_its_open_file_limit(server: Server) -> None:
    assert server.proc.proc is not None
    limits = Path(f"/proc/{server.proc.proc.pid}/limits").read_text()
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    soft, hard = line.split()[3:5]
    assert soft == hard, line
    assert f"up to {hard} open files" in server.proc.log()
