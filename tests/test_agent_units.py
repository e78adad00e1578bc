"""The agent's parts on their own: its HTTP client against a real TLS server in a thread,
the certificate expiry it reads without cryptography, the host facts it reads from /proc."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import http.server
import io
import ipaddress
import json
import os
import select
import ssl
import subprocess
import sys
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
from agent import config as config_mod
from agent.certs import SCHEDULED_GAP_MIN, CertManager, renewal_time, requested_gap
from agent.checkin import MAX_INTERVAL, MIN_INTERVAL, Verdict, clamp_interval, judge
from agent.cli import build_parser as agent_parser
from agent.cli import read_join
from agent.collectors import host
from agent.config import AgentConfig, ConfigError
from agent.enroll import choose_role, token_role
from agent.runner import Runner
from agent.state import Enrollment, State, cert_not_after, client_context
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
    # The model this machine's /proc/cpuinfo names (parse_cpu_model returns "" when none
    # does, so "is not None" could not fail).
    model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text()
                 .splitlines() if line.startswith("model name"))
    assert model and data["cpu_model"] == model
    assert host.parse_cpu_model("processor\t: 0\n") == ""


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


# -- what the server sends is bounded ------------------------------------------------


def _stream(size: int, declared: bool) -> Callable[[Handler], tuple[int, dict[str, str], bytes]]:
    """An answer of `size` bytes (claimed in Content-Length, or streamed chunked)."""
    def answer(handler: Handler) -> tuple[int, dict[str, str], bytes]:
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length" if declared else "Transfer-Encoding",
                            str(size) if declared else "chunked")
        handler.end_headers()
        with contextlib.suppress(OSError):
            chunk = b" " * 65536
            for _ in range(size // len(chunk)):
                handler.wfile.write(chunk if declared else b"%x\r\n%s\r\n" % (len(chunk), chunk))
        handler.close_connection = True
        return 0, {}, b""
    return answer


class StreamHandler(Handler):
    def do_GET(self) -> None:  # noqa: N802
        self.server.answer(self)

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self.server.answer(self)


@pytest.mark.parametrize("declared", [True, False])
def test_a_huge_ca_answer_is_refused_without_reading_it(tmp_path: Path, declared: bool) -> None:
    """The /v1/ca answer comes before the pin check, from whoever answers at the URL."""
    server = Server(tmp_path, _stream(64 * 2**20, declared))
    server.RequestHandlerClass = StreamHandler
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(client.ServerError, match="longer than 65536|of 67108864 bytes"):
            asyncio.run(client.fetch_ca(server.url))
    finally:
        server.shutdown()
        server.server_close()


def test_an_answer_longer_than_the_protocol_allows_is_an_error(tmp_path: Path) -> None:
    server = Server(tmp_path, _stream(wire.MAX_BODY_BYTES + 65536 * 4, False))
    server.RequestHandlerClass = StreamHandler
    threading.Thread(target=server.serve_forever, daemon=True).start()
    agent = server.client()
    try:
        with pytest.raises(client.ServerError, match=f"longer than {wire.MAX_BODY_BYTES}"):
            asyncio.run(agent.checkin(REPORT))
    finally:
        agent.close()
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("status, body, words", [
    (403, b"[" * 100_000 + b"]" * 100_000, "HTTP 403"),  # RecursionError in json
    (403, b'{"error": "x", "message": ' + b"[" * 5000 + b"]" * 5000 + b"}", "HTTP 403"),
    (500, b'{"error": 5, "message": "m"}', "HTTP 500"),
    (403, b'{"error": "unknown_host", "message": "\\u001b]52;c;aGk=\\u0007gone"}',
     r"\x1b]52;c;aGk=\x07gone"),
    (200, b'{"host_id": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    (200, b'{"host_id": "h", "status": 5}', "status: expected a string"),
    (200, b"\xff\xfe", "not valid JSON"),
])
def test_any_answer_is_a_clear_server_error(serve: Callable[..., Server], status: int,
                                            body: bytes, words: str) -> None:
    agent = serve(lambda _h: (status, {}, body)).client()
    with pytest.raises(client.ServerError) as caught:
        asyncio.run(agent.checkin(REPORT))
    agent.close()
    assert words in str(caught.value)
    assert "\x1b" not in str(caught.value) and "\x07" not in str(caught.value)


def test_fields_a_newer_server_adds_are_ignored(serve: Callable[..., Server]) -> None:
    agent = serve(lambda _h: (200, {}, json.dumps(ANSWER | {"added_later": ["x"]}).encode())).client()
    assert asyncio.run(agent.checkin(REPORT)).host_id == "h1"
    agent.close()


# -- the certificate manager -------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _identity(tmp_path: Path, lifetime: float) -> State:
    """A state dir holding an identity issued now for `lifetime` seconds."""
    key, cert = self_signed(dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
                            + dt.timedelta(seconds=lifetime))
    state = State(tmp_path / "state")
    state.prepare()
    state.save_identity(key, pki.cert_pem(cert))
    (state.dir / "ca.crt").write_text(pki.cert_pem(cert))
    return state


def test_renewal_between_70_and_90_percent_of_the_lifetime() -> None:
    assert renewal_time(0, 100, 0.0) == 70
    assert renewal_time(0, 100, 1.0) == pytest.approx(90)
    assert renewal_time(1000, 1100, 0.5) == pytest.approx(1080)


def test_asked_for_renewals_come_at_most_once_per_gap(tmp_path: Path) -> None:
    """A server saying renew: true on every answer gets one renewal per requested_gap."""
    lifetime = 30 * 86400.0
    state = _identity(tmp_path, lifetime)
    clock = Clock(state.identity.stat().st_mtime + 86400)  # a day after the identity came
    certs = CertManager(AgentConfig(), state, "https://x", "h1", clock=clock, rand=lambda: 0.5)
    renewed: list[float] = []

    async def fake_renew() -> None:
        renewed.append(clock.now)

    certs._renew = fake_renew  # type: ignore[method-assign]
    assert requested_gap(lifetime) == pytest.approx(0.01 * lifetime)  # 7.2 h, over the 60 s floor
    assert requested_gap(600) == 60
    assert not certs.due()  # 70-90 % is weeks away
    for _ in range(200):  # 200 answers, 1 s apart, each asking
        certs.request()
        asyncio.run(certs.renew_if_due())
        clock.now += 1
    assert len(renewed) == 1
    clock.now = renewed[0] + requested_gap(lifetime) - 1
    certs.request()
    assert not certs.due()
    clock.now += 2
    assert certs.due() and asyncio.run(certs.renew_if_due()) and len(renewed) == 2


def test_scheduled_renewal_is_due_at_its_time_and_never_in_a_burst(tmp_path: Path) -> None:
    state = _identity(tmp_path, 1000)
    issued = state.identity.stat().st_mtime
    clock = Clock(issued)
    certs = CertManager(AgentConfig(), state, "https://x", "h1", clock=clock, rand=lambda: 0.0)
    assert certs.due_at() == pytest.approx(renewal_time(issued, certs.not_after, 0.0))
    clock.now = certs.due_at() - 1
    assert not certs.due()
    clock.now += 1
    assert certs.due()
    # A server handing out a lifetime of a second: never more than one try per SCHEDULED_GAP_MIN.
    certs.not_after = issued + 1
    certs._last_attempt = clock.now = issued + 100
    assert certs.due_at() == issued + 100 + SCHEDULED_GAP_MIN


def test_a_renewal_that_hangs_is_abandoned_at_its_own_deadline(tmp_path: Path) -> None:
    certs = CertManager(AgentConfig(), _identity(tmp_path, 1000), "https://x", "h1", timeout=0.2)

    async def hang() -> None:
        await asyncio.Event().wait()  # never set: a renewal that never returns

    certs._renew = hang  # type: ignore[method-assign]
    started = time.monotonic()
    assert asyncio.run(certs.renew()) is False
    assert time.monotonic() - started < 5 and certs.renewals == 0


# -- one check-in: what a failure means -----------------------------------------------------


@pytest.mark.parametrize("seconds, expected", [(-1, MIN_INTERVAL), (0, MIN_INTERVAL),
                                               (7.5, 7.5), (1e300, MAX_INTERVAL)])
def test_the_servers_interval_is_clamped(seconds: float, expected: float) -> None:
    assert clamp_interval(seconds) == expected


@pytest.mark.parametrize("status, code, verdict, words", [
    (403, "unknown_host", Verdict.IDENTITY_GONE, "join --force"),
    (403, "role_refused", Verdict.ROLE_REFUSED, "role = 'mixed' in /etc/a.toml"),
    (401, "no_client_certificate", Verdict.REFUSED, "m"),
    (403, "", Verdict.REFUSED, "m"),
    (503, "busy", Verdict.RETRY, "m"),
    (None, "", Verdict.RETRY, "m"),
])
def test_a_failed_check_in_is_judged_by_what_it_means(
        tmp_path: Path, status: int | None, code: str, verdict: Verdict, words: str) -> None:
    state = _identity(tmp_path, 1000)
    config = AgentConfig(role="mixed", role_from_file=True, path=Path("/etc/a.toml"))
    got, message = judge(client.ServerError("m", status, code), state, config)
    assert got is verdict and words in message
    if verdict is Verdict.ROLE_REFUSED:
        assert "join --force" not in message and "no new join needed" in message


def test_an_expired_certificate_is_identity_gone_whatever_the_server_said(tmp_path: Path) -> None:
    state = _identity(tmp_path, -10)
    got, message = judge(client.ServerError("busy", 503), state, AgentConfig())
    assert got is Verdict.IDENTITY_GONE and "certificate expired" in message and "re-join" in message


# -- joining: the role, the hostname, the join string ---------------------------------------


def _token(claims: dict[str, Any]) -> str:
    def part(obj: Any) -> str:
        return base64.urlsafe_b64encode(json.dumps(obj).encode()).decode().rstrip("=")
    return f"{part({'alg': 'EdDSA'})}.{part(claims)}.c2ln"


def test_the_tokens_role_is_read_without_verifying() -> None:
    assert token_role(_token({"role": "hypervisor"})) == "hypervisor"
    for odd in ("", "x", "a.!!!.c", _token({"role": "root"}), _token({"role": 5}),
                _token(["role"]), "a." + "W" * 3 + ".c", "a." + base64.urlsafe_b64encode(
                    b"[" * 100_000).decode() + ".c"):
        assert token_role(odd) is None, odd


def test_the_role_given_else_joined_with_else_the_tokens() -> None:
    assert choose_role("disk_operations", "mixed", "hypervisor") == "disk_operations"
    assert choose_role("", "mixed", "hypervisor") == "hypervisor"  # join --force keeps it
    assert choose_role("", "hypervisor", None) == "hypervisor"  # the README's example
    assert choose_role("", None, None) == "mixed"
    # A token narrower than the role held: the token's (said in a warning), not a refusal.
    assert choose_role("", "disk_operations", "mixed") == "disk_operations"


def test_no_role_is_the_default_and_a_bad_one_is_named(tmp_path: Path) -> None:
    assert AgentConfig().role == ""
    (tmp_path / "a.toml").write_text('role = "hypervsior"\n')
    with pytest.raises(ConfigError, match="role 'hypervsior' is not one of"):
        config_mod.load(tmp_path / "a.toml")
    (tmp_path / "a.toml").write_text('hostname = "hv-9"\n')
    loaded = config_mod.load(tmp_path / "a.toml")
    assert loaded.hostname == "hv-9" and loaded.hostname_given and not loaded.role_from_file


def test_agent_json_from_an_older_or_newer_agent_still_reads(tmp_path: Path) -> None:
    old = {"host_id": "h", "server_url": "https://s", "ca_pin": "p", "role": "mixed",
           "enrolled_at": 1.0}
    assert Enrollment.from_json(old).hostname == ""
    assert Enrollment.from_json(old | {"hostname": "n", "later": 1}).hostname == "n"


@pytest.mark.parametrize("argv, stdin, words", [
    (["-"], b"  vfjoin1.abc\n", "vfjoin1.abc"),
    (["--join-file", "{file}"], None, "vfjoin1.fromfile"),
    (["vfjoin1.arg"], None, "vfjoin1.arg"),
    (["-"], b"\n", "stdin is empty"),
    (["-"], b"x" * 20000, "more than 16384 bytes"),
    ([], None, "join -` reads it from stdin"),
    (["x", "--join-file", "{file}"], None, "give the join string once"),
    (["--join-file", "/nonexistent/j"], None, "No such file"),
])
def test_the_join_string_from_an_argument_stdin_or_a_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str], stdin: bytes | None,
        words: str) -> None:
    (tmp_path / "j").write_text("vfjoin1.fromfile\n")
    args = agent_parser().parse_args(["join", *(a.replace("{file}", str(tmp_path / "j"))
                                                for a in argv)])
    if stdin is not None:
        monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(stdin)))
    try:
        got = read_join(args)
    except ValueError as exc:
        got = str(exc)
    assert words in got


def test_the_lock_is_held_by_one_process_and_dies_with_it(tmp_path: Path) -> None:
    state = State(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, pathlib; from agent.state import State; "
         f"lock = State(pathlib.Path({str(tmp_path)!r})).lock(); assert lock.acquire(); "
         "print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=Path(__file__).parent.parent)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        assert state.lock().holder() == holder.pid
        assert not state.lock().acquire(patience=0.1)
    finally:
        holder.kill()
        holder.communicate()
    assert state.lock().holder() is None  # killed: the kernel dropped its lock
    mine = state.lock()
    assert mine.acquire() and state.lock().holder() == os.getpid()
    mine.release()
    assert State(tmp_path / "none").lock().holder() is None  # no file: nobody, nothing made
    assert not (tmp_path / "none").exists()


def test_a_check_in_asked_to_renew_neither_waits_for_the_renewal_nor_comes_back_at_once(
        tmp_path: Path) -> None:
    """The renewal runs in the certificate manager's task, with its own deadline: a slow one
    does not hold the check-in (nor its hung-check-in watchdog), and a negative interval
    from the server is clamped."""
    state = _identity(tmp_path, 30 * 86400)
    config = AgentConfig(role="mixed", hostname="hv", state_dir=state.dir)
    config.libvirt.uri, config.libvirt.configure_tls = "test:///default", False
    enrollment = Enrollment(host_id="h1", server_url="https://127.0.0.1:1", ca_pin="p",
                            role="mixed", enrolled_at=0)
    day_ago = time.time() - 86400
    os.utime(state.identity, (day_ago, day_ago))
    answer = wire.CheckinResponse(host_id="h1", status="online", detail="", role="mixed",
                                  checkin_interval=-1, renew=True)

    async def scenario() -> tuple[float | None, float, bool]:
        runner = Runner(config, state, enrollment)
        renewing = asyncio.Event()

        async def checkin(_report: wire.Report) -> wire.CheckinResponse:
            return answer

        async def slow_renewal() -> None:
            renewing.set()
            await asyncio.Event().wait()  # never set: a renewal that never returns

        runner.client.checkin = checkin  # type: ignore[method-assign]
        runner.certs._renew = slow_renewal  # type: ignore[method-assign]
        runner.certs.start()
        try:
            started = time.monotonic()
            delay = await runner.checkin_once()
            took = time.monotonic() - started
            await asyncio.wait_for(renewing.wait(), 5)  # asked for, and under way elsewhere
            return delay, took, runner._healthy()
        finally:
            await runner.certs.stop()
            runner.client.close()
            await asyncio.to_thread(runner.local.close)

    delay, took, healthy = asyncio.run(scenario())
    assert delay == MIN_INTERVAL and took < 5 and healthy
    assert json.loads((state.dir / "status.json").read_text())["status"] == "online"


def test_a_change_in_the_sysfs_facts_asks_for_an_early_check_in() -> None:
    from agent import runner as runner_mod

    async def probe(changed: bool) -> bool:
        runner = runner_mod.Runner.__new__(runner_mod.Runner)  # only the facts watch
        runner.early = asyncio.Event()
        seen = runner_mod.read_sysfs_facts()
        runner.sent_facts = seen if not changed else {**seen, "memory": {"hugepages": [1]}}
        await runner.probe_facts()
        return runner.early.is_set()

    assert asyncio.run(probe(changed=True))
    assert not asyncio.run(probe(changed=False))  # this machine's own facts, read twice


def test_usage_figures_are_no_change_of_the_facts() -> None:
    from agent.runner import sysfs_facts

    def facts(free: int, total: int) -> dict[str, object]:
        return {"memory": {"ok": True, "seconds": free / 1e9, "data": {
            "total": 8 << 30, "free": free, "hugepages": [{"size_kib": 2048, "total": total,
                                                           "free": free % 7}]}}}

    assert sysfs_facts(facts(1 << 30, 0)) == sysfs_facts(facts(3 << 30, 0))
    assert sysfs_facts(facts(1 << 30, 0)) != sysfs_facts(facts(1 << 30, 512))
