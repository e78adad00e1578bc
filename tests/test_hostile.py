"""Hostile input: whatever arrives from the network (or is pasted), the answer is a clear
refusal naming what is wrong — a specific exception in process, a JSON 4xx over HTTP —
never a stack trace, never a 5xx, never a changed record.

Pure functions get hypothesis in process (fast). The HTTP level runs against the real
server process over real TLS: schemathesis drives it from its own /v1/openapi.json, then
targeted cases (the ones this file's fuzzing found), replays and the rate limit.
test_enrollment.py already covers forged tokens and plainly malformed bodies.
"""

from __future__ import annotations

import base64
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
import requests
import schemathesis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from common import pki, wire
from server import ca
from server.tokens import TokenError, TokenSigner
from tests.conftest import FAST
from tests.harness import Agent, Server
from tests.test_enrollment import claims

MakeAgent = Callable[..., Agent]
REPORT = {"hostname": "hostile", "role": "mixed", "agent_version": "1", "libvirtd": {"ok": True}}
DER = serialization.Encoding.DER
SPKI = serialization.PublicFormat.SubjectPublicKeyInfo
SHA256 = hashes.SHA256()

# Text with lone surrogates too: JSON's \uXXXX escapes can carry them, hypothesis' default can't.
TEXT = st.text(max_size=30) | st.text(st.sampled_from("a.\ud800\udc00\x00\n"), max_size=8)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12)

# CSRs for keys OpenSSL parses and the server must not sign (made with `openssl req`).
CSR_SECP112R1 = """-----BEGIN CERTIFICATE REQUEST-----
MHwwRwIBADAMMQowCAYDVQQDDAF4MDIwEAYHKoZIzj0CAQYFK4EEAAYDHgAEaTJD
Xxig7qkrpeA7DNhfcEpyPkimEluKshXieaAAMAoGCCqGSM49BAMCAyUAMCICDwCJ
NnuW/s0DUimiIcur2gIPAK2n8uEnNbdPP2SGnjGW
-----END CERTIFICATE REQUEST-----
"""
CSR_SM2 = """-----BEGIN CERTIFICATE REQUEST-----
MIHGMG4CAQAwDDEKMAgGA1UEAwwBeDBZMBMGByqGSM49AgEGCCqBHM9VAYItA0IA
BLlYPSqvQ9tLywQOTwzIuYe3icnG/IGLOxSBPelkgRNG9/mv4JT3OjHX5xEIZy70
9Uv7i3P2Qdro+oU6LDPSr86gADAKBggqgRzPVQGDdQNIADBFAiBrO0VFiO+8HhNO
9kVDR0HnyPtBC+kNNt7cAcQ9smEi0QIhAMGdcBGINBtDdbRKYsjHeSWpI2SvGSQf
Pgz/hOt/fBmS
-----END CERTIFICATE REQUEST-----
"""


def refused(exc_type: type[Exception], call: Callable[[], Any]) -> str:
    """The refusal's message; any other exception fails the test with its traceback."""
    with pytest.raises(exc_type) as info:
        call()
    assert str(info.value), "a refusal must say what is wrong"
    return str(info.value)


# ---------------------------------------------------------------------------
# Join strings (what the agent decodes from a paste)

JOIN = wire.JoinString(url="https://vdi.example:8443", ca_pin="sha256:" + "ab" * 32,
                       token="h.p.s").encode()


def join_of(payload: bytes) -> str:
    return wire.JOIN_PREFIX + base64.urlsafe_b64encode(payload).decode().rstrip("=")


@given(text=TEXT | st.text(alphabet="ABCDEFabcdef0123456789-_=.%"))
def test_any_text_is_a_join_string_or_a_wire_error(text: str) -> None:
    for candidate in (text, wire.JOIN_PREFIX + text):
        try:
            join = wire.JoinString.decode(candidate)
        except wire.WireError as exc:
            assert str(exc)
        else:  # what decodes is a usable join string, and encodes back to itself
            assert join.url.startswith("https://") and join.ca_pin.startswith("sha256:")
            assert wire.JoinString.decode(join.encode()) == join


@given(payload=JSON)
def test_any_json_payload_is_a_join_string_or_a_wire_error(payload: Any) -> None:
    try:
        join = wire.JoinString.decode(join_of(json.dumps(payload).encode()))
    except wire.WireError as exc:
        assert str(exc)
    else:
        assert join.url.startswith("https://")


@given(cut=st.integers(0, len(JOIN) - 1))
def test_a_join_string_cut_anywhere_is_refused(cut: int) -> None:
    refused(wire.WireError, lambda: wire.JoinString.decode(JOIN[:cut]))


@pytest.mark.parametrize("payload, words", [
    (b"[" * 100_000, "nested too deeply"),
    (b'{"url": NaN}', "not a JSON number"),
    (json.dumps({"url": "https://[::1", "ca_pin": "sha256:" + "a" * 64, "token": "t"}).encode(),
     "must be https://HOST"),
    (json.dumps({"url": "https://x:99999", "ca_pin": "sha256:" + "a" * 64, "token": "t"}).encode(),
     "must be https://HOST"),
    (json.dumps({"url": "https://x", "ca_pin": "sha256:" + "z" * 64, "token": "t"}).encode(),
     "64 hex digits"),
    (json.dumps({"url": "https://x", "ca_pin": "sha256:" + "a" * 64, "token": "\ud800"}).encode(),
     "token: not valid Unicode"),
])
def test_hostile_join_payloads_name_the_problem(payload: bytes, words: str) -> None:
    assert words in refused(wire.WireError, lambda: wire.JoinString.decode(join_of(payload)))


# ---------------------------------------------------------------------------
# Join tokens (server/tokens.py)

KEY = Ed25519PrivateKey.generate()
SIGNER = TokenSigner(KEY)


@pytest.fixture(scope="module")
def token() -> str:
    return SIGNER.create("mixed", dt.timedelta(minutes=5), True)[0]


def test_tokens_cut_anywhere_are_refused(token: str) -> None:
    assert SIGNER.verify(token).role == "mixed"
    for cut in range(len(token)):
        refused(TokenError, lambda: SIGNER.verify(token[:cut]))  # noqa: B023 (called at once)


@given(text=TEXT)
def test_any_text_is_refused_as_a_token(text: str) -> None:
    refused(TokenError, lambda: SIGNER.verify(text))


def test_oversized_tokens_are_refused(token: str) -> None:
    refused(TokenError, lambda: SIGNER.verify(token + "A" * 1_000_000))
    refused(TokenError, lambda: SIGNER.verify("e" * 1_000_000))


@settings(deadline=None)
@given(extra=st.dictionaries(st.sampled_from(["role", "exp", "iat", "nbf", "aud", "iss", "jti"]),
                             JSON, max_size=3))
def test_tokens_signed_by_another_key_are_refused(extra: dict[str, Any]) -> None:
    forged = jwt.encode(claims(**extra), Ed25519PrivateKey.generate(), "EdDSA")
    assert "signature is not valid" in refused(TokenError, lambda: SIGNER.verify(forged))


@given(altered=st.dictionaries(
    st.sampled_from(["role", "auto_enable", "exp", "iat", "nbf", "aud", "iss", "jti"]),
    JSON | st.sampled_from([float("inf"), "1", ["virtfleet-enroll"]]), min_size=1, max_size=3))
def test_altered_claims_signed_by_the_server_key_give_claims_or_a_token_error(
        altered: dict[str, Any]) -> None:
    """Even a token the server signed itself must not crash verify with odd claims."""
    token = jwt.encode(claims(**altered), KEY, "EdDSA")
    try:
        got = SIGNER.verify(token)
    except TokenError as exc:
        assert str(exc)
    else:
        assert got.role in wire.ROLES and isinstance(got.auto_enable, bool)
        assert got.expires_at > time.time()


# ---------------------------------------------------------------------------
# Certificate signing requests (server/ca.py)

def csr_pem(key: Any, algorithm: hashes.HashAlgorithm | None = SHA256) -> str:
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
           .sign(key, algorithm))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def csr_with_foreign_key() -> str:
    """A well-formed CSR whose public key was swapped for another: its signature cannot match."""
    key, other = pki.new_key(), pki.new_key()
    der = x509.load_pem_x509_csr(pki.make_csr(key, "x").encode()).public_bytes(DER)
    forged = der.replace(key.public_key().public_bytes(DER, SPKI),
                         other.public_key().public_bytes(DER, SPKI))
    return x509.load_der_x509_csr(forged).public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize("make, words", [
    (lambda: csr_pem(rsa.generate_private_key(65537, 1024)), "at least 2048 bits"),
    (lambda: csr_pem(ed448.Ed448PrivateKey.generate(), None), "Ed448PublicKey is not accepted"),
    (lambda: csr_pem(ec.generate_private_key(ec.SECP192R1())), "secp192r1 is not accepted"),
    (lambda: csr_pem(ec.generate_private_key(ec.SECT163K1())), "sect163k1 is not accepted"),
    (lambda: CSR_SECP112R1, "key type or curve is not accepted"),
    (lambda: CSR_SM2, "key type or curve is not accepted"),
    (csr_with_foreign_key, "signature does not match"),
    (lambda: "-----BEGIN CERTIFICATE REQUEST-----\n" + "QUJD" * 250_000 + "\n-----END CERTIFICATE "
     "REQUEST-----\n", "not a PEM"),
])
def test_csrs_the_server_must_not_sign_are_refused(make: Callable[[], str], words: str) -> None:
    assert words in refused(ca.CSRError, lambda: ca.parse_csr(make()))


@given(text=TEXT, blob=st.binary(max_size=300))
def test_garbage_is_not_a_csr(text: str, blob: bytes) -> None:
    armored = ("-----BEGIN CERTIFICATE REQUEST-----\n" + base64.b64encode(blob).decode()
               + "\n-----END CERTIFICATE REQUEST-----\n")
    for pem in (text, armored):
        assert "not a PEM" in refused(ca.CSRError, lambda: ca.parse_csr(pem))  # noqa: B023


GOOD_CSR = x509.load_pem_x509_csr(pki.make_csr(pki.new_key(), "x").encode()).public_bytes(DER)


@given(index=st.integers(0, len(GOOD_CSR) - 1), flip=st.integers(1, 255))
@example(index=7, flip=1)  # the version: cryptography raises InvalidVersion, not a ValueError
@example(index=19, flip=8)  # the subject's string tag: OpenSSL refuses it with an InternalError
def test_a_csr_changed_in_any_byte_is_refused(index: int, flip: int) -> None:
    damaged = bytearray(GOOD_CSR)
    damaged[index] ^= flip
    pem = ("-----BEGIN CERTIFICATE REQUEST-----\n" + base64.encodebytes(bytes(damaged)).decode()
           + "-----END CERTIFICATE REQUEST-----\n")
    refused(ca.CSRError, lambda: ca.parse_csr(pem))


# ---------------------------------------------------------------------------
# Check-in bodies, parsed in process (the live server gets the same below)

@st.composite
def checkin_bodies(draw: st.DrawFn) -> dict[str, Any]:
    """A check-in of any text, facts and values, with at most one part replaced by any JSON."""
    libvirtd = {"ok": draw(st.booleans()), "error": draw(TEXT)}
    endpoint = {"host": draw(TEXT), "port": draw(st.integers(0, 65535))}
    report = {"hostname": draw(TEXT), "role": draw(st.sampled_from(wire.ROLES)),
              "agent_version": draw(TEXT), "libvirtd": libvirtd,
              "facts": draw(st.dictionaries(TEXT, JSON, max_size=4)), "libvirt_endpoint": endpoint}
    body = {"report": report, "protocol": 1}
    part = draw(st.sampled_from([None, (body, "report"), (body, "protocol"), (libvirtd, "ok"),
                                 (libvirtd, "error"), (endpoint, "port"), *((report, k) for k in report)]))
    if part:
        part[0][part[1]] = draw(JSON)
    return body


CHECKIN_BODIES = checkin_bodies()


@given(body=CHECKIN_BODIES)
def test_checkin_bodies_are_accepted_only_when_storable(body: dict[str, Any]) -> None:
    """Accepted means the store, the logs and the admin views can take it: strict JSON, text
    that encodes. Anything else is a WireError."""
    try:
        req = wire.decode_body(wire.CheckinRequest, json.dumps(body).encode())
    except wire.WireError as exc:
        assert str(exc)
    else:
        stored = json.dumps(wire.to_json(req), allow_nan=False, ensure_ascii=False).encode()
        assert wire.decode_body(wire.CheckinRequest, stored) == req


@given(raw=st.binary(max_size=500))
def test_any_bytes_are_a_checkin_or_a_wire_error(raw: bytes) -> None:
    try:
        req = wire.decode_body(wire.CheckinRequest, raw)
    except wire.WireError as exc:
        assert str(exc)
    else:  # what is accepted survives its own round trip unchanged
        assert wire.parse(wire.CheckinRequest, wire.to_json(req)) == req


def test_a_checkin_body_cut_anywhere_is_refused() -> None:
    body = json.dumps({"report": REPORT | {"facts": {"kvm": {"ok": True}}}}).encode()
    for cut in range(len(body)):
        refused(wire.WireError, lambda: wire.decode_body(wire.CheckinRequest, body[:cut]))  # noqa: B023


def test_a_refusal_does_not_echo_a_body_back() -> None:
    body = json.dumps({"report": REPORT} | {f"field-{i:04}-" + "x" * 30: i for i in range(3000)})
    message = refused(wire.WireError, lambda: wire.decode_body(wire.CheckinRequest, body.encode()))
    assert "and 2995 more" in message and len(message) < 4096  # ErrorBody.message's bound


# ---------------------------------------------------------------------------
# The live server: real process, real TLS

def call(server: Server, path: str, body: bytes = b"", cert: Path | None = None,
         method: str = "POST", source: str = "127.0.0.1") -> tuple[int, dict[str, str], Any]:
    """One HTTPS call to the agent API from `source`, optionally with a client certificate
    (a PEM holding key and certificate): (status, headers, decoded JSON body)."""
    ctx = ssl.create_default_context(cafile=str(server.state / "identity" / "ca.crt"))
    if cert:
        ctx.load_cert_chain(cert)
    conn = http.client.HTTPSConnection(server.address, server.port, context=ctx, timeout=10,
                                       source_address=(source, 0))
    try:
        conn.request(method, path, body=body or None, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    return resp.status, dict(resp.getheaders()), json.loads(raw) if raw else None


def records(server: Server) -> dict[str, Any]:
    """The admin view of everything stored: each host in full, each token."""
    return {"hosts": [server.host(h["id"]) for h in server.hosts()],
            "tokens": server.admin_json("token", "list")}


def identity_of(host: dict[str, Any]) -> dict[str, Any]:
    """What no check-in may change: who the host is and what the admin decided."""
    keys = ("id", "admin_state", "role_override", "role_limit", "enrolled_at",
            "certificate_expires", "libvirt_certificate_expires")
    return {k: host[k] for k in keys}


def assert_no_crash(server: Server) -> None:
    assert server.proc.alive()
    assert "Traceback" not in server.proc.log() and "unexpected error" not in server.proc.log()
    status, _, body = call(server, wire.CA_PATH, method="GET")
    assert status == 200 and "BEGIN CERTIFICATE" in body["ca_certificate"]


def fuzz(server: Server, schema: Any, mode: schemathesis.GenerationMode, cert: Path | None,
         examples: int) -> dict[tuple[str, int], int]:
    """Run schemathesis' cases through every operation: no 5xx, every answer as documented.
    Returns how many answers each (operation, status) got."""
    seen: dict[tuple[str, int], int] = {}
    session = requests.Session()
    tls = {"verify": str(server.state / "identity" / "ca.crt"), "cert": str(cert) if cert else None}

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(case=schema.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        response = case.call_and_validate(session=session, **tls)
        key = (case.operation.label, response.status_code)
        seen[key] = seen.get(key, 0) + 1

    try:
        run()
    finally:
        session.close()
    return seen


def test_schemathesis_finds_no_server_error_and_changes_nothing(
        start_server: Callable[..., Server], make_agent: MakeAgent) -> None:
    # A long grace keeps statuses still, and no rate limit lets every case reach the parser.
    server = start_server("--checkin-interval", "1", "--grace", "600", "--enroll-rate", "10000")
    agent = make_agent("fuzzed", None)
    assert agent.join(server.token("--uses", "1")).returncode == 0
    spare = server.admin_json("token", "create", "--uses", "5")["token"]["id"]
    identity = agent.state / "identity.pem"
    # Every request-body rule is the checker's too, except that valid JSON is enough to be
    # accepted: a schema cannot say "a token this server signed" or "a CSR that verifies".
    # A body over the size limit is refused before it is parsed: 413 is a refusal too.
    refusals = ["400", "401", "403", "404", "405", "406", "409", "413", "415", "422", "428", "429"]
    config = schemathesis.Config.from_dict({"checks": {
        "positive_data_acceptance": {"enabled": False},
        "negative_data_rejection": {"expected-statuses": refusals}}})
    schema = schemathesis.openapi.from_url(server.url + wire.OPENAPI_PATH, config=config,
                                           verify=str(server.state / "identity" / "ca.crt"))
    before = records(server)
    anonymous = [fuzz(server, schema, mode, None, 100) for mode in schemathesis.GenerationMode]
    invalid = fuzz(server, schema, schemathesis.GenerationMode.NEGATIVE, identity, 100)
    assert all(seen[("POST /v1/checkin", 401)] for seen in anonymous)
    assert invalid[("POST /v1/checkin", 400)]
    assert records(server) == before
    # Valid check-ins with the host's own certificate may change its report, nothing more.
    valid = fuzz(server, schema, schemathesis.GenerationMode.POSITIVE, identity, 100)
    assert valid[("POST /v1/checkin", 200)]
    after = records(server)
    assert after["tokens"] == before["tokens"]
    assert [identity_of(h) for h in after["hosts"]] == [identity_of(h) for h in before["hosts"]]
    assert {t["id"]: t["uses"] for t in after["tokens"]}[spare] == 0
    assert_no_crash(server)


def enroll_body(token: str, key: ec.EllipticCurvePrivateKey, **overrides: Any) -> bytes:
    return json.dumps({"token": token, "csr": pki.make_csr(key, "x"), "report": REPORT}
                      | overrides).encode()


def checkin_body(**report: Any) -> bytes:
    return json.dumps({"report": REPORT | report}).encode()


def test_hostile_bodies_get_a_clear_4xx_and_change_nothing(server: Server,
                                                           make_agent: MakeAgent) -> None:
    agent = make_agent("target", None)
    assert agent.join(server.token()).returncode == 0
    cert = agent.state / "identity.pem"
    token = wire.JoinString.decode(server.token("--uses", "5")).token
    key = pki.new_key()
    cases = [
        (wire.ENROLL_PATH, b"[" * 100_000, None, 400, "nested too deeply"),
        (wire.ENROLL_PATH, enroll_body("\ud800", key), None, 400, "token: not valid Unicode"),
        (wire.ENROLL_PATH, enroll_body("t" * 5000, key), None, 400, "token: longer than 4096"),
        (wire.ENROLL_PATH, enroll_body(token, key, csr=CSR_SECP112R1), None, 400, "curve is not accepted"),
        (wire.ENROLL_PATH, enroll_body(token, key, csr=CSR_SM2), None, 400, "curve is not accepted"),
        (wire.ENROLL_PATH, enroll_body(token, key, csr=csr_with_foreign_key()), None, 400,
         "signature does not match"),
        (wire.ENROLL_PATH, enroll_body(token, key, protocol=float(wire.PROTOCOL_VERSION + 1)), None, 400,
             f"protocol {wire.PROTOCOL_VERSION + 1} is not supported"),
        (wire.CHECKIN_PATH, checkin_body(hostname="\ud800"), cert, 400, "report.hostname: not valid Unicode"),
        (wire.CHECKIN_PATH, checkin_body(facts={"a": json.loads("[" * 40 + "]" * 40)}), cert, 400,
         "nested deeper than 32"),
        (wire.CHECKIN_PATH, checkin_body(facts={"load": float("nan")}), cert, 400,
         "NaN is not a JSON number"),
        (wire.RENEW_PATH, json.dumps({"csr": CSR_SM2}).encode(), cert, 400, "curve is not accepted"),
        (wire.RENEW_PATH, json.dumps({"csr": "x" * 200_000}).encode(), None, 401, "client certificate"),
    ]
    before = records(server)
    for path, body, with_cert, status, words in cases:
        got, _, answer = call(server, path, body, cert=with_cert)
        assert (got, set(answer)) == (status, {"error", "message"}), (path, body[:80], answer)
        assert words in answer["message"] and "Traceback" not in answer["message"], answer
    assert records(server) == before
    assert_no_crash(server)


def test_a_refused_large_body_does_not_stall_the_connection(server: Server) -> None:
    """A refusal sent before the body was read (no client certificate) used to leave the
    keep-alive connection stuck, so the client's next call got no answer for 10 s."""
    big = json.dumps({"csr": "x" * 200_000}).encode()
    with requests.Session() as session:
        for _ in range(12):
            answer = session.post(server.url + wire.RENEW_PATH, data=big, timeout=5,
                                  verify=str(server.state / "identity" / "ca.crt"))
            assert answer.status_code == 401


def test_wrong_method_names_the_allowed_ones(server: Server) -> None:
    status, headers, answer = call(server, wire.CA_PATH, b"{}")
    assert status == 405 and headers["Allow"] == "GET,HEAD" and answer["error"] == "method_not_allowed"


def write_identity(path: Path, key: ec.EllipticCurvePrivateKey, certificate: str) -> Path:
    path.write_bytes(pki.key_pem(key) + certificate.encode())
    return path


def test_replays_are_refused_and_change_nothing(server: Server, tmp_path: Path) -> None:
    """An enrollment replayed byte for byte finds its single-use token spent. A check-in has
    no nonce: TLS stops replays of recorded traffic, and the body names no host (the client
    certificate does), so a replay needs a certificate the server still accepts — a retired
    one is refused."""
    key = pki.new_key()
    enrollment = enroll_body(wire.JoinString.decode(server.token()).token, key)
    status, _, enrolled = call(server, wire.ENROLL_PATH, enrollment)
    assert status == 200
    old = write_identity(tmp_path / "old.pem", key, enrolled["identity"]["certificate"])
    checkin = checkin_body(hostname="first")
    assert call(server, wire.CHECKIN_PATH, checkin, cert=old)[0] == 200
    # Renewed, and the new certificate used once: the old one is retired.
    new_key = pki.new_key()
    status, _, renewed = call(server, wire.RENEW_PATH,
                              json.dumps({"csr": pki.make_csr(new_key, "x")}).encode(), cert=old)
    assert status == 200
    new = write_identity(tmp_path / "new.pem", new_key, renewed["certificate"])
    assert call(server, wire.CHECKIN_PATH, checkin_body(hostname="renewed"), cert=new)[0] == 200
    before = records(server)
    replays = [(wire.ENROLL_PATH, enrollment, None, 403, "already used (1 of 1 uses)"),
               (wire.CHECKIN_PATH, checkin, old, 403, "not enrolled here"),
               (wire.CHECKIN_PATH, checkin, None, 401, "client certificate")]
    for path, body, cert, status, words in replays:
        got, _, answer = call(server, path, body, cert=cert)
        assert got == status and words in answer["message"], answer
    assert records(server) == before
    assert [h["hostname"] for h in before["hosts"]] == ["renewed"]


def test_enrollment_rate_limit_is_per_source_address(start_server: Callable[..., Server]) -> None:
    server = start_server(*FAST, "--enroll-rate", "0.1")  # a bucket of 1, refilled every 10 s
    assert call(server, wire.ENROLL_PATH, b"{}")[0] == 400
    status, headers, answer = call(server, wire.ENROLL_PATH, b"{}")
    assert status == 429 and answer["error"] == "rate_limited"
    assert 1 <= int(headers["Retry-After"]) <= 10 and headers["Retry-After"] + " s" in answer["message"]
    # Another address is still served (all of 127/8 is this machine's loopback).
    assert call(server, wire.ENROLL_PATH, b"{}", source="127.0.0.2")[0] == 400
    assert call(server, wire.ENROLL_PATH, b"{}")[0] == 429


def test_log_lines_cannot_be_forged_by_a_host(server: Server, make_agent: MakeAgent) -> None:
    agent = make_agent("liar", None)
    assert agent.join(server.token()).returncode == 0
    forged = "1999-01-01 00:00:00,000 virtfleet-server INFO host evil enrolled"
    body = json.dumps({"report": REPORT | {"libvirtd": {"ok": False, "error": "x\n" + forged}}})
    assert call(server, wire.CHECKIN_PATH, body.encode(), cert=agent.state / "identity.pem")[0] == 200
    log = server.proc.log()
    assert "x\\n1999-01-01" in log and not any(line.startswith("1999") for line in log.splitlines())


def test_facts_in_any_shape_never_break_hosts_show(server: Server, make_agent: MakeAgent) -> None:
    """Facts are free-form JSON the host sends; odd shapes are shown as such."""
    agent = make_agent("odd", None)
    assert agent.join(server.token()).returncode == 0
    odd = {"host": {"ok": True, "data": {"memory_total": "lots", "load": 3}},
           "kvm": {"ok": True, "data": "yes"}, "libvirtd": {"ok": True, "data": {"storage_pools": [1]}}}
    status, _, _ = call(server, wire.CHECKIN_PATH, checkin_body(facts=odd),
                        cert=agent.state / "identity.pem")
    assert status == 200
    shown = server.admin("hosts", "show", agent.host_id()).stdout
    assert shown.count("facts in an unexpected shape") == 3 and "history:" in shown
    assert_no_crash(server)
