"""The OpenAPI description of the agent API: valid, complete, and in step with the wire contract.

In process and fast; test_hostile.py runs schemathesis from it against the live server.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate

from common import wire
from server.config import ServerConfig
from server.doors import openapi
from server.doors.agent_api import create_app
from server.main import build

URL = "https://vdi.example:8443"
BODIES = {wire.ENROLL_PATH: wire.EnrollRequest, wire.CHECKIN_PATH: wire.CheckinRequest,
          wire.RENEW_PATH: wire.RenewRequest}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return openapi.document(URL)


def test_the_document_is_valid_openapi(document: dict[str, Any]) -> None:
    validate(document)  # raises, naming the part that is wrong
    assert document["openapi"].startswith("3.1") and document["servers"] == [{"url": URL}]


def test_every_route_the_app_serves_is_described(tmp_path: Path, document: dict[str, Any]) -> None:
    parts = build(ServerConfig(state_dir=tmp_path / "server"))
    try:
        app = create_app(parts.fleet, parts.instruments)
    finally:
        parts.close()
    served = {(r.method.lower(), r.resource.canonical) for r in app.router.routes() if r.resource}
    described = {(m, p) for p, ops in document["paths"].items() for m in ops}
    # aiohttp answers HEAD wherever it answers GET: HTTP's own rule, not an operation of ours.
    assert served - {("head", p) for _, p in described} == described


def test_schemas_carry_the_wire_bounds(document: dict[str, Any]) -> None:
    schemas = document["components"]["schemas"]
    report = schemas["Report"]
    assert report["additionalProperties"] is False
    assert set(report["required"]) == {"hostname", "role", "agent_version", "libvirtd"}
    assert report["properties"]["role"] == {"type": "string", "maxLength": wire.MAX_TEXT,
                                            "enum": list(wire.ROLES)}
    assert schemas["EnrollRequest"]["properties"]["csr"]["maxLength"] == wire.MAX_PEM
    assert schemas["EnrollRequest"]["properties"]["protocol"]["default"] == wire.PROTOCOL_VERSION
    assert schemas["LibvirtdHealth"]["properties"]["error"]["anyOf"][1] == {"type": "null"}
    checkin = document["paths"][wire.CHECKIN_PATH]["post"]
    assert checkin["security"] == [{openapi.MTLS: []}]
    assert checkin["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CheckinRequest"}
    enroll = document["paths"][wire.ENROLL_PATH]["post"]
    assert enroll["responses"]["429"]["headers"]["Retry-After"]["required"] is True


@pytest.mark.parametrize("path", sorted(BODIES))
@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE,
                                  schemathesis.GenerationMode.NEGATIVE])
def test_the_document_and_the_parser_agree(document: dict[str, Any], path: str,
                                           mode: schemathesis.GenerationMode) -> None:
    """Bodies valid by the document are accepted by `wire.decode_body`; invalid ones refused."""
    operation = schemathesis.openapi.from_dict(document)[path]["POST"]

    @settings(max_examples=150, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: schemathesis.Case) -> None:
        raw = case.body if isinstance(case.body, bytes) else json.dumps(case.body).encode()
        if mode is schemathesis.GenerationMode.POSITIVE:
            wire.decode_body(BODIES[path], raw)
        else:
            with pytest.raises(wire.WireError):
                wire.decode_body(BODIES[path], raw)

    check()

