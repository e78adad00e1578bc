"""The engine API: HTTP over a unix socket (RUNDIR/engine.sock, 0660, group
virtfleet-engine), read-only. What a VDI engine needs to schedule desktops on hosts:

    GET /v1/hosts                   {"revision": N, "hosts": [record, ...]}
    GET /v1/hosts/ID                record
    GET /v1/hosts?watch=1&since=N   newline-delimited JSON, one change a line, in order:
                                    {"type": "added"|"modified"|"removed", "revision", "host"}
                                    and {"type": "heartbeat", "revision"} at least every
                                    HEARTBEAT seconds while nothing changes; 410 when N is not
                                    known (older than what is kept): list again
    GET /v1/openapi.json            this API, described
"""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

from aiohttp import web

from common import VERSION
from server.changes import ChangeLog, Gone
from server.doors.http import CHANGES, error_response

HEARTBEAT = 5.0


def create_engine_app(changes: ChangeLog) -> web.Application:
    app = web.Application()
    app[CHANGES] = changes
    app.router.add_get("/v1/hosts", list_or_watch)
    app.router.add_get("/v1/hosts/{id}", get_host)
    app.router.add_get("/v1/openapi.json", get_openapi)
    return app


async def start_socket(runner: web.AppRunner, path: Path, gid: int | None) -> None:
    path.unlink(missing_ok=True)
    old = os.umask(0o117)  # born 0660
    try:
        await web.UnixSite(runner, str(path)).start()
    finally:
        os.umask(old)
    if gid is not None:
        os.chown(path, -1, gid)


async def get_host(request: web.Request) -> web.Response:
    record = request.app[CHANGES].get(request.match_info["id"])
    if record is None:
        return error_response(404, "not_found", f"no host {request.match_info['id']!r}")
    return web.Response(body=record, content_type="application/json")


async def list_or_watch(request: web.Request) -> web.StreamResponse:
    changes: ChangeLog = request.app[CHANGES]
    if request.query.get("watch") not in ("1", "true"):
        return web.Response(body=changes.listing(), content_type="application/json")
    try:
        since = int(request.query.get("since", ""))
    except ValueError:
        return error_response(400, "bad_request", "watch needs since=REVISION (from a list)")
    try:
        backlog, queue = changes.watch(since)
    except Gone as exc:
        return error_response(410, "gone", str(exc))
    try:
        return await _stream(request, changes, backlog, queue)
    finally:
        changes.unwatch(queue)


async def _stream(request: web.Request, changes: ChangeLog, backlog: list[Any],
                  queue: asyncio.Queue[Any]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await response.prepare(request)
    for change in backlog:
        await response.write(changes.line(change))
    while True:
        try:
            change = await asyncio.wait_for(queue.get(), HEARTBEAT)
        except TimeoutError:
            beat = {"type": "heartbeat", "revision": changes.revision}
            await response.write(json.dumps(beat).encode() + b"\n")
            continue
        if change is None:  # fell too far behind: the client lists again
            break
        await response.write(changes.line(change))
    return response


async def get_openapi(request: web.Request) -> web.Response:
    return web.json_response(DOCUMENT)


_RECORD = {
    "type": "object",
    "required": ["id", "hostname", "status", "detail", "role", "capabilities", "admin_state",
                 "gateway_uri", "last_checkin", "facts"],
    "properties": {
        "id": {"type": "string"}, "hostname": {"type": "string"},
        "status": {"enum": ["pending", "connecting", "online", "error", "offline", "disabled"]},
        "detail": {"type": "string", "description": "why, in words a person acts on"},
        "role": {"enum": ["hypervisor", "disk_operations", "mixed"]},
        "capabilities": {"type": "array", "items": {"enum": ["hypervisor", "disk_operations"]}},
        "admin_state": {"enum": ["pending", "enabled", "disabled"]},
        "gateway_uri": {"type": "string", "description": "libvirt URI of the host's gateway socket"},
        "last_checkin": {"type": ["number", "null"]},
        "address": {"type": "string"},
        "libvirtd": {"type": "object"},
        "connection": {"type": "object", "description": "the server's own link: state, since"},
        "facts": {"type": "object", "description": "the agent's collectors, by name: their data, "
                                                   "or {\"error\": ...} (docs/engines.md)"},
    },
}
DOCUMENT = {
    "openapi": "3.1.0",
    "info": {"title": "virtfleet engine API", "version": VERSION,
             "description": "Read-only; list + watch as Kubernetes does (docs/engines.md)."},
    "paths": {
        "/v1/hosts": {"get": {
            "summary": "Every host with a revision; with watch=1&since=N, the changes after N",
            "parameters": [
                {"name": "watch", "in": "query", "schema": {"enum": ["1", "true"]}},
                {"name": "since", "in": "query", "schema": {"type": "integer"}}],
            "responses": {
                "200": {"description": "the hosts, or a stream of changes (application/x-ndjson)",
                        "content": {"application/json": {"schema": {
                            "type": "object", "properties": {
                                "revision": {"type": "integer"},
                                "hosts": {"type": "array", "items": _RECORD}}}}}},
                "400": {"description": "watch without since"},
                "410": {"description": "that revision is no longer kept: list again"}}}},
        "/v1/hosts/{id}": {"get": {
            "summary": "One host",
            "parameters": [{"name": "id", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the host", "content": {
                              "application/json": {"schema": _RECORD}}},
                          "404": {"description": "no such host"}}}},
    },
}


def host_record(host: Any, gateway_uri: str, connection: dict[str, Any]) -> dict[str, Any]:
    """What an engine knows of a host (`host`: a model.Host), but for its last check-in
    (changes.ChangeLog keeps that apart)."""
    from common import wire

    report = host.report
    facts = {name: (result.get("data") if result.get("ok") else {"error": result.get("error")})
             for name, result in report.facts.items() if isinstance(result, dict)}
    return {
        "id": host.id, "hostname": host.hostname, "status": str(host.status),
        "detail": host.detail, "role": host.role,
        "capabilities": sorted(wire.ROLE_CAPABILITIES[host.role]),
        "admin_state": str(host.admin_state), "gateway_uri": gateway_uri,
        "address": host.address,
        "libvirtd": {"ok": report.libvirtd.ok, "error": report.libvirtd.error},
        "connection": connection, "facts": facts,
    }
