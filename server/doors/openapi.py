"""The agent API as an OpenAPI 3.1 document, served at `wire.OPENAPI_PATH`.

The schemas are derived from the message dataclasses in common/wire.py — their fields,
types, bounds, choices and defaults — so the document says exactly what `wire.parse`
accepts and cannot drift from it. The table of operations below is the only hand-written
part; tests/test_openapi.py checks it against the routes the app really serves.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import types
import typing
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from common import VERSION, wire
from server.doors.http import fleet_of

OPENAPI_VERSION = "3.1.0"
# wire.CONTROL_CHARS, refused in names, as a JSON Schema (ECMA-262) pattern.
NAME_PATTERN = "^[^\\u0000-\\u001f\\u007f-\\u009f\\u202a-\\u202e\\u2066-\\u2069]*$"
MTLS = "agentCertificate"


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    response: type | None  # None: a free-form JSON object
    request: type | None = None
    mtls: bool = False
    refusals: tuple[int, ...] = ()


REFUSALS = {
    400: "the body breaks the contract (JSON, a field's type, bound or choice); "
         "`message` names the field",
    401: "no client certificate (mTLS) was presented",
    403: "refused: join token, role, or a certificate no host has (forgotten or replaced)",
    408: "the body did not arrive in time",
    413: f"the body is larger than {wire.MAX_BODY_BYTES} bytes",
    429: "too many requests (enrollments from this address, check-ins or renewals from this "
         "host); the Retry-After header says when to retry",
    503: "the server cannot write its state (disk full or read-only); try again later",
}
_WRITES = (400, 408, 413, 503)

OPERATIONS = (
    Operation("get", wire.CA_PATH, "The identity CA certificate, to check against the join "
              "string's pin before trusting this server", wire.CaResponse),
    Operation("post", wire.ENROLL_PATH, "Enroll a host with a join token: sign its CSRs",
              wire.EnrollResponse, wire.EnrollRequest, refusals=(*_WRITES, 403, 429)),
    Operation("post", wire.CHECKIN_PATH, "Report the host's state; the answer carries the "
              "desired state", wire.CheckinResponse, wire.CheckinRequest, mtls=True,
              refusals=(*_WRITES, 401, 403, 429)),
    Operation("post", wire.RENEW_PATH, "Renew the host's certificates", wire.Identity,
              wire.RenewRequest, mtls=True, refusals=(*_WRITES, 401, 403, 429)),
    Operation("get", wire.OPENAPI_PATH, "This description of the agent API", None),
)


async def get_openapi(request: web.Request) -> web.Response:
    return web.Response(text=document_text(fleet_of(request).config.url),
                        content_type="application/json")


@functools.lru_cache(maxsize=1)
def document_text(server_url: str) -> str:
    return json.dumps(document(server_url), separators=(",", ":"))


def document(server_url: str) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op, schemas)
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "virtfleet agent API", "version": VERSION,
                 "description": f"What agents speak to the server (protocol {wire.PROTOCOL_VERSION}). "
                                "Every refusal is an ErrorBody: a 4xx, or a 503 when "
                                "the server cannot store its state."},
        "servers": [{"url": server_url}],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.items())),
            "securitySchemes": {MTLS: {
                "type": "mutualTLS",
                "description": "The host's identity certificate, issued at enrollment; the host "
                               "is whoever the certificate says, never the body."}},
        },
    }


def _operation(op: Operation, schemas: dict[str, Any]) -> dict[str, Any]:
    ok = message_schema(op.response, schemas) if op.response else {"type": "object"}
    out: dict[str, Any] = {
        "operationId": op.path.rsplit("/", 1)[-1].replace(".", "_") + "_" + op.method,
        "summary": op.summary,
        "responses": {"200": _json("OK", ok)},
    }
    for status in sorted(op.refusals):
        refusal = _json(REFUSALS[status], message_schema(wire.ErrorBody, schemas))
        if status == 429:
            refusal["headers"] = {"Retry-After": {
                "required": True, "description": "seconds to wait",
                "schema": {"type": "integer", "minimum": 1}}}
        out["responses"][str(status)] = refusal
    if op.request:
        body = message_schema(op.request, schemas)
        out["requestBody"] = {"required": True, "content": {"application/json": {"schema": body}}}
    if op.mtls:
        out["security"] = [{MTLS: []}]
    return out


def _json(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def message_schema(cls: type, schemas: dict[str, Any]) -> dict[str, Any]:
    """A $ref to `cls`'s JSON Schema, added (with the messages it contains) to `schemas`."""
    if cls.__name__ not in schemas:
        hints = typing.get_type_hints(cls)
        properties, required = {}, []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            properties[f.name] = _field(hints[f.name], f, schemas)
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                required.append(f.name)
        schema: dict[str, Any] = {"type": "object", "properties": properties, "required": required,
                                  "additionalProperties": False}
        one_of = getattr(cls, "ONE_OF", ())
        if one_of:  # exactly one of these is present and not null (wire.parse's rule)
            schema["oneOf"] = [{"required": [name], "properties": {name: {"not": {"type": "null"}}}}
                               for name in one_of]
        doc = cls.__doc__ or ""
        if not doc.startswith(cls.__name__ + "("):  # dataclass's made-up docstring
            schema["description"] = doc
        schemas[cls.__name__] = schema
    return {"$ref": f"#/components/schemas/{cls.__name__}"}


def _field(hint: Any, f: dataclasses.Field[Any], schemas: dict[str, Any]) -> dict[str, Any]:
    schema = _type(hint, f.metadata, schemas)
    if f.default is not dataclasses.MISSING and f.default is not None:
        schema = {**schema, "default": f.default}
    elif f.default_factory is not dataclasses.MISSING:
        schema = {**schema, "default": f.default_factory()}
    return schema


def _type(hint: Any, meta: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    """The JSON Schema of one field: the same rules as `wire._value`, written as a schema."""
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        (option,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return {"anyOf": [_type(option, meta, schemas), {"type": "null"}]}
    if dataclasses.is_dataclass(hint):
        return message_schema(hint, schemas)  # type: ignore[arg-type]
    if hint is str:
        schema: dict[str, Any] = {"type": "string", "maxLength": meta.get("max_len", wire.MAX_TEXT)}
        if meta.get("choices"):
            schema["enum"] = list(meta["choices"])
        if meta.get("name"):
            schema["pattern"] = NAME_PATTERN
        return schema
    if hint is bool:
        return {"type": "boolean"}
    if hint is int:
        return {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
    if hint is float:
        return {"type": "number"}
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        schema = {"type": "array", "items": _type(item, meta, schemas),
                  "maxItems": meta.get("max_items", 0)}
        if meta.get("url"):
            schema["items"] = {**schema["items"], "pattern": "^https://"}
        return schema
    if typing.get_origin(hint) is dict:
        return {"type": "object", "description": f"free-form JSON, at most {wire.MAX_DEPTH} levels deep"}
    raise TypeError(f"openapi: no schema for {hint!r}")  # wire grew a type: describe it here
