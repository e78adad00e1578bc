"""The operator's API: a JSON API on a unix socket only root (the server's user) can open.

No TCP port, no agent certificate and no anonymous client reaches it: the socket is
created mode 0600 inside the 0700 state directory. `virtfleet-server token ...` and
`virtfleet-server hosts ...` are its client.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from common import wire
from server.audit import host_target, peer_actor
from server.config import unreachable_url_problem
from server.doors.http import FLEET, errors_middleware, fleet_of
from server.fleet import Fleet, Refused
from server.model import AdminState, Host, Token

MAX_TTL = 7 * 24 * 3600
MAX_USES = 100_000


LINKS = "virtfleet.links"
GATEWAY = "virtfleet.gateway"
AUDIT_LIMIT = 10_000  # entries one answer carries at most (the newest)
MIN_PREFIX = 2  # characters of an id that may stand for it


class LinkView(Protocol):
    def describe(self, host_id: str) -> dict[str, Any]: ...


class GatewayView(Protocol):
    def uri(self, host_id: str) -> str: ...
    def describe(self, host_id: str) -> dict[str, int]: ...


def create_admin_app(fleet: Fleet, links: LinkView, gateway: GatewayView) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=64 * 1024)
    app[FLEET] = fleet
    app[LINKS] = links
    app[GATEWAY] = gateway
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/tokens", list_tokens)
    app.router.add_post("/v1/tokens", create_token)
    app.router.add_post("/v1/tokens/{jti}/revoke", revoke_token)
    app.router.add_get("/v1/hosts", list_hosts)
    app.router.add_get("/v1/hosts/{ref}", show_host)
    app.router.add_post("/v1/hosts/{ref}/{action:enable|disable|forget|set-role}", host_action)
    app.router.add_get("/v1/audit", list_audit)
    return app


def actor_of(request: web.Request) -> str:
    return peer_actor(request.transport.get_extra_info("socket") if request.transport else None)


async def start_socket(runner: web.AppRunner, path: Path) -> None:
    if path.exists() or path.is_symlink():
        path.unlink()
    old = os.umask(0o177)  # the socket is born 0600: no window where others can connect
    try:
        await web.UnixSite(runner, str(path)).start()
    finally:
        os.umask(old)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise Refused(400, "bad_request", "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise Refused(400, "bad_request", "body must be a JSON object")
    return body


def _field(body: dict[str, Any], name: str, kind: type, default: Any) -> Any:
    value = body.get(name, default)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise Refused(400, "bad_request", f"{name}: expected {kind.__name__}")
    return value


async def get_status(request: web.Request) -> web.Response:
    fleet = fleet_of(request)
    counts = fleet.store.status_counts()  # from an index: cheap with 10,000 hosts
    return web.json_response({
        "url": fleet.config.url,
        "ca_pin": fleet.identity_ca.pin,
        "hosts": sum(counts.values()),
        "by_status": counts,
        "checkin_interval": fleet.config.checkin_interval,
        "grace": fleet.config.grace,
    })


async def create_token(request: web.Request) -> web.Response:
    body = await _body(request)
    role = _field(body, "role", str, "mixed")
    if role not in wire.ROLES:
        raise Refused(400, "bad_request", f"role {role!r} is not one of {', '.join(wire.ROLES)}")
    ttl = _field(body, "ttl", float, 3600.0)
    if not 1 <= ttl <= MAX_TTL:
        raise Refused(400, "bad_request", f"ttl must be between 1 s and {MAX_TTL} s (7 days)")
    uses = _field(body, "uses", int, 1)
    if not 1 <= uses <= MAX_USES:
        raise Refused(400, "bad_request", f"uses must be between 1 and {MAX_USES}")
    auto_enable = _field(body, "auto_enable", bool, True)
    description = _field(body, "description", str, "")[:200]
    fleet = fleet_of(request)
    created = fleet.create_token(role, ttl, uses, auto_enable, description)
    fleet.audit.record(actor_of(request), "token_create", f"token {created.record.jti}", "ok",
                       f"role {role}, {uses} use(s), valid {ttl:g} s"
                       + ("" if auto_enable else ", hosts wait for enable"))
    return web.json_response({
        "join": created.join,
        "command": "virtfleet-agent join -",
        "token": token_view(created.record, []),
        "warning": unreachable_url_problem(fleet_of(request).config),
    })


async def list_tokens(request: web.Request) -> web.Response:
    store = fleet_of(request).store
    used_by = store.token_hosts()
    return web.json_response([token_view(t, used_by.get(t.jti, [])) for t in store.list_tokens()])


async def revoke_token(request: web.Request) -> web.Response:
    store = fleet_of(request).store
    ref = request.match_info["jti"]
    jti = unique_match(ref, [t.jti for t in store.list_tokens()], "token",
                       "virtfleet-server token list")
    token = store.revoke_token(jti, time.time())
    assert token is not None
    fleet_of(request).audit.record(actor_of(request), "token_revoke", f"token {jti}", "ok")
    return web.json_response(token_view(token, store.token_hosts().get(jti, [])))


def unique_match(ref: str, ids: list[str], what: str, listing: str) -> str:
    """The one id that `ref` is, or starts with (at least MIN_PREFIX characters)."""
    if ref in ids:
        return ref
    matches = [i for i in ids if len(ref) >= MIN_PREFIX and i.startswith(ref)]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise Refused(409, "ambiguous", f"{ref!r} is the start of several {what} ids "
                                        f"({', '.join(matches[:10])}): give more of it")
    raise Refused(404, "not_found", f"no {what} {ref!r} (see `{listing}`)")


def token_view(token: Token, hosts: list[str]) -> dict[str, Any]:
    return {
        "id": token.jti, "role": token.role, "auto_enable": token.auto_enable,
        "uses": token.uses, "max_uses": token.max_uses, "created_at": token.created_at,
        "expires_at": token.expires_at, "revoked_at": token.revoked_at,
        "state": token.state(time.time()), "description": token.description,
        "hosts": hosts,
    }


def resolve_host(fleet: Fleet, ref: str) -> Host:
    """A host by id or unique id prefix first, then by unique hostname: a host cannot name
    itself after another's id and be the one acted on."""
    hosts = fleet.store.list_hosts()
    by_id = [h for h in hosts if h.id == ref] or [
        h for h in hosts if len(ref) >= MIN_PREFIX and h.id.startswith(ref)]
    matches = by_id or [h for h in hosts if h.hostname == ref]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise Refused(404, "not_found", f"no host {ref!r}: give an id, a unique id prefix "
                                        f"({MIN_PREFIX}+ characters) or a hostname "
                                        "(see `virtfleet-server hosts list`)")
    ids = ", ".join(h.id for h in matches[:10])
    kind = "the start of several host ids" if by_id else "the hostname of several hosts"
    raise Refused(409, "ambiguous", f"{ref!r} is {kind} ({ids}): use the id")


async def list_hosts(request: web.Request) -> web.Response:
    return web.json_response([host_summary(h) for h in fleet_of(request).store.list_hosts()])


async def show_host(request: web.Request) -> web.Response:
    fleet = fleet_of(request)
    host = resolve_host(fleet, request.match_info["ref"])
    return web.json_response(host_detail(request, host))


async def host_action(request: web.Request) -> web.Response:
    fleet = fleet_of(request)
    host = resolve_host(fleet, request.match_info["ref"])
    action = request.match_info["action"]
    audited = functools.partial(fleet.audit.record, actor_of(request),
                                "host_" + action.replace("-", "_"), host_target(host),
                                host_id=host.id)
    try:
        detail = await _act(request, fleet, host, action)
    except Refused as exc:
        audited("refused", exc.message)
        raise
    audited("ok", detail)
    if action == "forget":
        return web.json_response({"id": host.id, "forgotten": True})
    fresh = fleet.store.get_host(host.id)
    assert fresh is not None
    return web.json_response(host_detail(request, fresh))


async def _act(request: web.Request, fleet: Fleet, host: Host, action: str) -> str:
    """Do it; what changed, in words, for the audit log."""
    if action == "forget":
        fleet.forget(host)
        return ""
    if action == "set-role":
        role = _field(await _body(request), "role", str, "")
        fleet.set_role(host, role)
        return f"role {host.role} -> {role}"
    fleet.set_admin_state(host, AdminState.ENABLED if action == "enable" else AdminState.DISABLED)
    return f"was {host.admin_state}"


def _audited_host(fleet: Fleet, ref: str) -> str:
    """A known host as anywhere else; a forgotten one by its whole id."""
    try:
        return resolve_host(fleet, ref).id
    except Refused as exc:
        if exc.status == 404 and fleet.store.audit(0.0, ref, 1):
            return ref
        raise


async def list_audit(request: web.Request) -> web.Response:
    fleet = fleet_of(request)
    try:
        since = float(request.query.get("since", "0"))
    except ValueError:
        raise Refused(400, "bad_request", "since: expected a Unix time in seconds") from None
    ref = request.query.get("host", "")
    host_id = _audited_host(fleet, ref) if ref else ""
    entries = fleet.store.audit(since, host_id, AUDIT_LIMIT)
    return web.json_response([dataclasses.asdict(e) for e in entries])


def host_summary(host: Host) -> dict[str, Any]:
    return {
        "id": host.id, "hostname": host.hostname, "role": host.role, "status": host.status,
        "detail": host.detail, "last_checkin": host.last_checkin, "address": host.address,
    }


def host_detail(request: web.Request, host: Host) -> dict[str, Any]:
    fleet = fleet_of(request)
    links: LinkView = request.app[LINKS]
    gateway: GatewayView = request.app[GATEWAY]
    return host_summary(host) | {
        "admin_state": host.admin_state,
        "role_source": host.role_source,
        "configured_role": host.configured_role,
        "role_override": host.role_override,
        "role_limit": host.role_limit,
        "capabilities": sorted(wire.ROLE_CAPABILITIES[host.role]),
        "status_since": host.status_since,
        "enrolled_at": host.enrolled_at,
        "agent_version": host.agent_version,
        "certificate_expires": host.cert_not_after,
        "libvirt_certificate_expires": host.libvirt_cert_not_after,
        "report": wire.to_json(host.report),
        "connection": links.describe(host.id),
        "gateway_uri": gateway.uri(host.id),
        "gateway": gateway.describe(host.id),
        "history": [
            {"at": e.at, "status": e.status, "detail": e.detail, "tries": e.tries,
             "last_at": e.last_at}
            for e in fleet.store.history(host.id)
        ],
    }
