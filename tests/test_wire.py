"""The wire contract: join strings, message validation, roles, pins."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import subprocess

import pytest
from cryptography.hazmat.primitives import serialization

from common import pki, wire

REPORT = {"hostname": "hv", "role": "mixed", "agent_version": "1", "libvirtd": {"ok": True}}


def test_join_string_round_trips() -> None:
    join = wire.JoinString(url="https://vdi.example:8443", ca_pin="sha256:" + "a" * 64, token="t.o.k")
    assert wire.JoinString.decode(join.encode()) == join
    assert wire.JoinString.decode("  " + join.encode() + "\n") == join
    # One server's join strings carry no other replicas: the same bytes every agent reads.
    assert "more_urls" not in base64.urlsafe_b64decode(join.encode()[8:] + "==").decode()
    replicas = dataclasses.replace(join, more_urls=["https://vdi-2.example:8443"])
    assert wire.JoinString.decode(replicas.encode()) == replicas


@pytest.mark.parametrize("text, words", [
    ("hello", "not a virtfleet join string"),
    ("vfjoin1.%%%", "damaged"),
    ("vfjoin1.e30", "required field is missing"),
    (wire.JoinString(url="http://x", ca_pin="sha256:" + "a" * 64, token="t").encode(), "https"),
    (wire.JoinString(url="https://x", ca_pin="md5:00", token="t").encode(), "ca_pin"),
    (wire.JoinString(url="https://x", ca_pin="sha256:" + "a" * 64, token="t",
                     more_urls=["file:///etc/passwd"]).encode(), "must be https"),
])
def test_bad_join_strings_name_the_problem(text: str, words: str) -> None:
    with pytest.raises(wire.WireError, match=words):
        wire.JoinString.decode(text)


def test_a_join_string_cut_short_is_refused() -> None:
    good = wire.JoinString(url="https://x:1", ca_pin="sha256:" + "b" * 64, token="abc").encode()
    with pytest.raises(wire.WireError):
        wire.JoinString.decode(good[: len(good) // 2])


def test_parse_accepts_a_valid_checkin() -> None:
    req = wire.parse(wire.CheckinRequest, {"report": REPORT})
    assert req.report.libvirtd.ok and req.report.role == "mixed"


@pytest.mark.parametrize("body, words", [
    ([], "expected a JSON object"),
    ({}, "body: carries either report or report_digest"),
    ({"report": REPORT, "report_digest": "ab" * 16}, "either report or report_digest"),
    ({"report_digest": "ab" * 17}, "report_digest: longer than 32"),
    ({"report": REPORT, "host_id": "other"}, "unknown field"),
    ({"report": REPORT | {"role": "admin"}}, "report.role: 'admin' is not one of"),
    ({"report": REPORT | {"hostname": 7}}, "report.hostname: expected a string"),
    ({"report": REPORT | {"hostname": "x" * 300}}, "longer than 256"),
    ({"report": REPORT | {"libvirtd": {"ok": "yes"}}}, "report.libvirtd.ok: expected true or false"),
    ({"report": REPORT, "protocol": -1}, "protocol: expected a whole number"),
])
def test_parse_refuses_bad_input_naming_the_field(body: object, words: str) -> None:
    with pytest.raises(wire.WireError, match=words):
        wire.parse(wire.CheckinRequest, body)


def test_decode_body_refuses_oversized_and_non_json() -> None:
    with pytest.raises(wire.WireError, match="limit"):
        wire.decode_body(wire.CheckinRequest, b" " * (wire.MAX_BODY_BYTES + 1))
    with pytest.raises(wire.WireError, match="not valid JSON"):
        wire.decode_body(wire.CheckinRequest, b"{nope")


def test_roles_within_a_token_limit() -> None:
    assert wire.role_within("hypervisor", "mixed")
    assert wire.role_within("mixed", "mixed")
    assert not wire.role_within("mixed", "hypervisor")
    assert not wire.role_within("disk_operations", "hypervisor")


def test_ca_pin_is_sha256_of_the_public_key() -> None:
    key = pki.new_key()
    spki = key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)
    assert wire.ca_pin(key.public_key()) == "sha256:" + hashlib.sha256(spki).hexdigest()
    # As kubeadm's discovery hash: openssl's DER of the public key, hashed.
    pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    der = subprocess.run(["openssl", "pkey", "-pubin", "-outform", "DER"], input=pem,
                         capture_output=True, check=True).stdout
    assert wire.ca_pin(key.public_key()) == "sha256:" + hashlib.sha256(der).hexdigest()
