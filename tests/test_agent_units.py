"""The agent's parts on their own: its HTTP client against a real TLS server in a thread,
the certificate expiry it reads without cryptography, the host facts it reads from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import http.server
import ipaddress
import json
import select
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from agent import client, collectors
from agent.collectors import host
from agent.state import cert_not_after, client_context
from common import pki, wire
from tests.harness import free_port, wait_for

ANSWER = wire.to_json(wire.CheckinResponse(host_id="h1", status="online", detail="", role="mixed"))
REPORT = wire.Report(hostname="hv", role="mixed", agent_version="1",
                     libvirtd=wire.LibvirtdHealth(ok=True))


def self_signed(not_after: dt.datetime, ip: str = "127.0.0.1") -> tuple[bytes, x509.Certificate]:
    key = pki.new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(dt.datetime(2020, 1, 1)).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    return pki.key_pem(key), cert


class Server(http.server.ThreadingHTTPServer):
    """An HTTPS server answering with `answer(handler)` -> (status, headers, body); it
    records the client port of each request and each connection it closed."""

    daemon_threads = True

    def __init__(self, tmp: Path, answer: Callable[[Any], tuple[int, dict[str, str], bytes]]) -> None:
        key, cert = self_signed(dt.datetime(2100, 1, 1))
        (tmp / "server.pem").write_bytes(key + pki.cert_pem(cert).encode())
        self.ca = pki.cert_pem(cert)
        self.answer = answer
        self.ports: list[int] = []
        self.closed = 0
        super().__init__(("127.0.0.1", free_port()), Handler)
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(tmp / "server.pem")
        self.socket = ctx.wrap_socket(self.socket, server_side=True)
        self.url = f"https://127.0.0.1:{self.server_address[1]}"

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Clients hanging up mid-answer is what some of these tests do."""

    def client(self) -> client.ServerClient:
        return client.ServerClient(self.url, ssl.create_default_context(cadata=self.ca))


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive
    server: Server

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.ports.append(self.client_address[1])
        status, headers, body = self.server.answer(self)
        self.send_response(status)
        for name, value in (headers | {"Content-Length": str(len(body))}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def finish(self) -> None:
        super().finish()
        self.server.closed += 1

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(answer: Callable[[Any], tuple[int, dict[str, str], bytes]]) -> Server:
        server = Server(tmp_path, answer)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def test_one_kept_alive_connection_and_a_new_one_when_the_server_closed_it(
        serve: Callable[..., Server]) -> None:
    def answer(handler: Handler) -> tuple[int, dict[str, str], bytes]:
        handler.close_connection = len(handler.server.ports) == 2  # as an idle timeout would
        return 200, {"Content-Type": "application/json"}, json.dumps(ANSWER).encode()

    server = serve(answer)
    agent = server.client()

    async def calls() -> None:
        for _ in range(2):
            assert (await agent.checkin(REPORT)).status == "online"
        # The server has closed it between two calls: the agent sees that and reconnects.
        sock = agent._conn._http.sock
        wait_for(lambda: server.closed == 1 and select.select([sock], [], [], 0)[0], 5,
                 "the server to close the connection")
        assert (await agent.checkin(REPORT)).status == "online"

    asyncio.run(calls())
    agent.close()
    first, second, third = server.ports
    assert first == second != third


@pytest.mark.parametrize("status, headers, body, retryable, refused, retry_after", [
    (429, {"Retry-After": "7"}, b'{"error": "rate_limited", "message": "slow down"}', True, False, 7),
    (503, {}, b"busy", True, False, 0),
    (403, {}, b'{"error": "forgotten", "message": "this host was forgotten"}', False, True, 0),
    (200, {}, b'{"status": 1}', True, False, 0),  # not the protocol: a 502 of ours
])
def test_refusals_say_whether_to_retry(serve: Callable[..., Server], status: int,
                                       headers: dict[str, str], body: bytes, retryable: bool,
                                       refused: bool, retry_after: float) -> None:
    agent = serve(lambda _h: (status, headers, body)).client()
    with pytest.raises(client.ServerError) as caught:
        asyncio.run(agent.checkin(REPORT))
    agent.close()
    error = caught.value
    assert (error.retryable, error.identity_refused, error.retry_after) == (retryable, refused,
                                                                            retry_after)
    if body.startswith(b'{"error"'):
        assert str(error) == json.loads(body)["message"]


def test_an_unreachable_server_is_worth_retrying() -> None:
    agent = client.ServerClient(f"https://127.0.0.1:{free_port()}", ssl.create_default_context())
    with pytest.raises(client.ServerError, match="cannot reach") as caught:
        asyncio.run(agent.checkin(REPORT))
    assert caught.value.retryable and caught.value.status is None


def test_a_server_that_never_answers_times_out(serve: Callable[..., Server],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()

    def hang(_handler: Handler) -> tuple[int, dict[str, str], bytes]:
        release.wait(30)
        return 200, {}, b"{}"

    server = serve(hang)
    monkeypatch.setattr(client, "TOTAL_TIMEOUT", 0.5)
    agent = server.client()
    started = time.monotonic()
    with pytest.raises(client.ServerError, match="timed out"):
        asyncio.run(agent.checkin(REPORT))
    assert time.monotonic() - started < 5
    release.set()
    agent.close()


def test_closing_fails_a_call_in_flight_at_once(serve: Callable[..., Server]) -> None:
    """What shutdown relies on: the blocked worker thread does not hold the exit for 20 s."""
    asked, release = threading.Event(), threading.Event()

    def hang(_handler: Handler) -> tuple[int, dict[str, str], bytes]:
        asked.set()
        release.wait(30)
        return 200, {}, b"{}"

    server = serve(hang)
    agent = server.client()

    async def close_while_waiting() -> float:
        call = asyncio.create_task(agent.checkin(REPORT))
        await asyncio.to_thread(asked.wait, 10)
        started = time.monotonic()
        agent.close()
        with pytest.raises(client.ServerError):
            await call
        return time.monotonic() - started

    assert asyncio.run(close_while_waiting()) < 2
    release.set()


@pytest.mark.parametrize("expires", [dt.datetime(2030, 5, 6, 7, 8, 9),  # UTCTime
                                     dt.datetime(2051, 1, 2, 3, 4, 5)])  # GeneralizedTime
def test_certificate_expiry_read_without_cryptography(expires: dt.datetime) -> None:
    key, cert = self_signed(expires)
    identity = key + pki.cert_pem(cert).encode()  # as identity.pem: the key first
    assert cert_not_after(identity) == pki.not_after(cert).timestamp()


def test_host_facts_read_from_proc_as_psutil_reads_them() -> None:
    data = collectors.run_all(collectors.Context())["host"]["data"]
    assert data["cpu_cores"] == psutil.cpu_count(logical=False)
    assert data["cpu_threads"] == psutil.cpu_count(logical=True)
    assert data["memory_total"] == psutil.virtual_memory().total
    assert data["boot_time"] == psutil.boot_time()


def test_host_fact_parsers(tmp_path: Path) -> None:
    meminfo = "MemTotal:       16384 kB\nMemAvailable:    8192 kB\nHugePages_Total:       0\n"
    assert host.parse_meminfo(meminfo) == {"MemTotal": 16 << 20, "MemAvailable": 8 << 20,
                                           "HugePages_Total": 0}
    assert host.parse_boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n") == 1700000000
    with pytest.raises(ValueError):
        host.parse_boot_time("cpu  1 2 3\n")
    # Two cores with two threads each: four CPUs, two distinct sibling lists.
    for cpu, siblings in enumerate(["0,2", "1,3", "0,2", "1,3"]):
        topology = tmp_path / "devices" / "system" / "cpu" / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        (topology / "core_cpus_list").write_text(siblings + "\n")
    assert host.read_core_count(tmp_path) == 2


def _issue(name: str, key: Any, issuer: tuple[x509.Certificate, Any] | None = None,
           ca: bool = False) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer or (None, key)
    builder = (x509.CertificateBuilder().subject_name(subject)
               .issuer_name(issuer_cert.subject if issuer_cert else subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(dt.datetime(2020, 1, 1)).not_valid_after(dt.datetime(2100, 1, 1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _handshake(client_ctx: ssl.SSLContext, server_ctx: ssl.SSLContext, server_name: str) -> None:
    """A real TLS handshake between two contexts, in memory; raises the server's SSLError."""
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    client_out, server_out = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls_client = client_ctx.wrap_bio(to_client, client_out, server_hostname=server_name)
    tls_server = server_ctx.wrap_bio(to_server, server_out, server_side=True)
    for _ in range(10):
        with contextlib.suppress(ssl.SSLWantReadError):
            tls_client.do_handshake()
        to_server.write(client_out.read())
        try:
            tls_server.do_handshake()
            return
        except ssl.SSLWantReadError:
            to_client.write(server_out.read())
    raise AssertionError("the handshake did not finish")


def test_the_agent_sends_its_certificate_without_its_ca(tmp_path: Path) -> None:
    """The server already has the CA: a copy sent at every handshake would only be parsed
    and kept for the connection's life. Seen from a server that trusts only a root above
    the agent's CA: it can build a chain only if the agent sends the CA along."""
    root_key, ca_key, host_key, server_key = (pki.new_key() for _ in range(4))
    root = _issue("root", root_key, ca=True)
    ca = _issue("identity CA", ca_key, (root, root_key), ca=True)
    (tmp_path / "ca.crt").write_text(pki.cert_pem(ca))
    (tmp_path / "identity.pem").write_bytes(
        pki.key_pem(host_key) + pki.cert_pem(_issue("host", host_key, (ca, ca_key))).encode())
    (tmp_path / "server.pem").write_bytes(
        pki.key_pem(server_key) + pki.cert_pem(_issue("server", server_key, (ca, ca_key))).encode())
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cadata=pki.cert_pem(root))
    server_ctx.load_cert_chain(tmp_path / "server.pem")
    server_ctx.verify_mode = ssl.CERT_REQUIRED

    # OpenSSL's default, what the agent would do without send_own_certificate_only:
    with_chain = ssl.create_default_context(cafile=tmp_path / "ca.crt")
    with_chain.load_cert_chain(tmp_path / "identity.pem")
    agents = client_context(tmp_path / "ca.crt", tmp_path / "identity.pem")
    for ctx in (with_chain, agents):  # they trust the CA they have, root or not
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    _handshake(with_chain, server_ctx, "server")
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        _handshake(agents, server_ctx, "server")
