"""The agent-facing HTTPS API: routes only.

GET /v1/ca (public), POST /v1/enroll (join token), POST /v1/checkin and POST /v1/renew
(mTLS: the host is whoever its client certificate says). Every refusal is JSON
`{"error": code, "message": reason}` with a 4xx; an unexpected failure is a 500 with no
detail, its traceback in the server log only.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, TypeVar

from aiohttp import web

from common import wire
from server.doors import openapi
from server.doors.guard import BODY_TIMEOUT
from server.doors.http import FLEET, ON_REFUSED, errors_middleware, fleet_of
from server.doors.metrics import INSTRUMENTS, Instruments
from server.fleet import Fleet, Refused, rate_limited, serial_of
from server.ratelimit import RateLimiter

T = TypeVar("T")
ENROLL_LIMIT = "virtfleet.enroll_rate"


async def read_message(request: web.Request, cls: type[T]) -> T:
    try:
        if request.content.is_eof():  # all here (a check-in is one TLS record): no timer
            body = await read_body(request)
        else:
            async with asyncio.timeout(BODY_TIMEOUT):
                body = await read_body(request)
    except TimeoutError:
        raise Refused(408, "timeout", f"the body did not arrive within {BODY_TIMEOUT:g} s") from None
    return wire.decode_body(cls, body)


async def read_body(request: web.Request) -> bytes:
    """The whole body, up to wire.MAX_BODY_BYTES, read from the stream: `request.read()`
    keeps a copy on the request, and aiohttp holds a kept-alive connection's last request
    until the next one comes, so every agent's last check-in would stay in memory
    (1.4 KB each, 14 MB at 10,000 hosts)."""
    chunks, size = [], 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > wire.MAX_BODY_BYTES:
            raise web.HTTPRequestEntityTooLarge(max_size=wire.MAX_BODY_BYTES, actual_size=size)
        chunks.append(chunk)
    return b"".join(chunks)


def peer_address(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return str(peer[0]) if peer else ""


def peer_serial(request: web.Request) -> str | None:
    cert = request.transport.get_extra_info("peercert") if request.transport else None
    return serial_of(cert)


def json_message(message: Any) -> web.Response:
    return json_body(wire.to_json(message))


# One encoder for every answer: json.dumps with any option builds a new one per call.
_COMPACT = json.JSONEncoder(separators=(",", ":"))


def json_body(obj: Any) -> web.Response:
    """`obj` as compact JSON (ASCII: escapes, so the bytes need no charset)."""
    return web.Response(body=_COMPACT.encode(obj).encode(), content_type="application/json")


async def get_ca(request: web.Request) -> web.Response:
    return json_message(wire.CaResponse(ca_certificate=fleet_of(request).identity_ca.cert_pem))


async def post_enroll(request: web.Request) -> web.Response:
    instruments: Instruments = request.app[INSTRUMENTS]
    started = time.perf_counter()
    try:
        response = await enroll(request)
    except Exception:
        instruments.enrolled(False, time.perf_counter() - started)
        raise
    instruments.enrolled(True, time.perf_counter() - started)
    return response


async def enroll(request: web.Request) -> web.Response:
    address = peer_address(request)
    limiter: RateLimiter = request.app[ENROLL_LIMIT]
    if not limiter.allow(address):
        raise rate_limited(limiter, address, "enrollments from this address")
    req = await read_message(request, wire.EnrollRequest)
    if not wire.OLDEST_PROTOCOL <= req.protocol <= wire.PROTOCOL_VERSION:
        raise Refused(400, "protocol", f"protocol {req.protocol} is not supported (this server "
                                       f"speaks {wire.OLDEST_PROTOCOL} to {wire.PROTOCOL_VERSION})")
    fleet = fleet_of(request)
    # An enrolled host joining again presents its identity: it is replaced in place.
    serial = peer_serial(request)
    replaces = fleet.store.host_by_serial(serial) if serial else None
    return json_message(fleet.enroll(req, address, replaces))


async def post_checkin(request: web.Request) -> web.Response:
    started = time.perf_counter()
    fleet = fleet_of(request)
    host = fleet.host_for_certificate(peer_serial(request))
    req = await read_message(request, wire.CheckinRequest)
    answer = wire.to_json(fleet.checkin(host, req, peer_address(request)))
    response = json_body(wire.answer_for(req.protocol, answer))
    request.app[INSTRUMENTS].checked_in(req.report is None, time.perf_counter() - started)
    return response


async def post_renew(request: web.Request) -> web.Response:
    fleet = fleet_of(request)
    host = fleet.host_for_certificate(peer_serial(request))
    req = await read_message(request, wire.RenewRequest)
    return json_message(fleet.renew(host, req, peer_address(request)))


def create_app(fleet: Fleet, instruments: Instruments) -> web.Application:
    app = web.Application(middlewares=[errors_middleware],
                          client_max_size=wire.MAX_BODY_BYTES)
    app[FLEET] = fleet
    app[INSTRUMENTS] = instruments
    app[ON_REFUSED] = instruments.refusal
    app[ENROLL_LIMIT] = RateLimiter(fleet.config.enroll_rate)
    app.router.add_get(wire.CA_PATH, get_ca)
    app.router.add_post(wire.ENROLL_PATH, post_enroll)
    app.router.add_post(wire.CHECKIN_PATH, post_checkin)
    app.router.add_post(wire.RENEW_PATH, post_renew)
    app.router.add_get(wire.OPENAPI_PATH, openapi.get_openapi)
    return app
