"""The operator's API: a JSON API on a unix socket only root (the server's user) can open.

No TCP port, no agent certificate and no anonymous client reaches it: the socket is
created mode 0600 inside the 0700 state directory. `virtfleet-server token ...`,
`hosts ...` and `web-login` are its client. What each call does (its checks, its audit
entry) is server/admin.py's, shared with the web page.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from aiohttp import web

from server import admin
from server.admin import GatewayView, LinkView
from server.audit import peer_actor
from server.config import unreachable_url_problem
from server.doors.http import FLEET, GATEWAY, LINKS, OWNERSHIP, SESSIONS, errors_middleware, fleet_of
from server.fleet import Fleet, Refused
from server.model import Transport
from server.websessions import WebSessions

AUDIT_LIMIT = 10_000  # entries one answer carries at most (the newest)


def create_admin_app(fleet: Fleet, links: LinkView, gateway: GatewayView,
                     sessions: WebSessions, ownership: admin.OwnershipView) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=64 * 1024)
    app[FLEET] = fleet
    app[OWNERSHIP] = ownership
    app[LINKS] = links
    app[GATEWAY] = gateway
    app[SESSIONS] = sessions
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/replicas", list_replicas)
    app.router.add_get("/v1/tokens", list_tokens)
    app.router.add_post("/v1/tokens", create_token)
    app.router.add_post("/v1/tokens/{jti}/revoke", revoke_token)
    app.router.add_get("/v1/hosts", list_hosts)
    app.router.add_get("/v1/hosts/{ref}", show_host)
    app.router.add_post("/v1/hosts/{ref}/{action:enable|disable|forget|set-role|set-transport}", host_action)
    app.router.add_get("/v1/audit", list_audit)
    app.router.add_post("/v1/web/logins", create_web_login)
    app.router.add_get("/v1/web/sessions", list_web_sessions)
    app.router.add_post("/v1/web/sessions/{id}/revoke", revoke_web_session)
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


async def list_replicas(request: web.Request) -> web.Response:
    return web.json_response([dataclasses.asdict(r) for r in request.app[OWNERSHIP].replicas()])


async def create_token(request: web.Request) -> web.Response:
    body = await _body(request)
    fleet = fleet_of(request)
    created = admin.create_token(
        fleet, actor_of(request), _field(body, "role", str, "mixed"),
        _field(body, "ttl", float, 3600.0), _field(body, "uses", int, 1),
        _field(body, "auto_enable", bool, True), _field(body, "description", str, ""),
        _field(body, "transport", str, Transport.AUTO))
    return web.json_response({
        "join": created.join,
        "command": "virtfleet-agent join -",
        "token": admin.token_view(created.record, []),
        "warning": unreachable_url_problem(fleet.config),
    })


async def list_tokens(request: web.Request) -> web.Response:
    return web.json_response(admin.tokens_view(fleet_of(request)))


async def revoke_token(request: web.Request) -> web.Response:
    fleet = fleet_of(request)
    token = admin.revoke_token(fleet, actor_of(request), request.match_info["jti"])
    return web.json_response(admin.token_view(token, fleet.store.token_hosts().get(token.jti, [])))


async def list_hosts(request: web.Request) -> web.Response:
    return web.json_response([admin.host_summary(h) for h in fleet_of(request).store.list_hosts()])


async def show_host(request: web.Request) -> web.Response:
    host = admin.resolve_host(fleet_of(request), request.match_info["ref"])
    return web.json_response(host_detail(request, host.id))


async def host_action(request: web.Request) -> web.Response:
    fleet = fleet_of(request)
    host = admin.resolve_host(fleet, request.match_info["ref"])
    action = request.match_info["action"]
    # set-role and set-transport say what to: {"role": ...}, {"transport": ...}
    field = {"set-role": "role", "set-transport": "transport"}.get(action)
    value = _field(await _body(request), field, str, "") if field else ""
    admin.act_on_host(fleet, actor_of(request), host, action, value)
    if action == "forget":
        return web.json_response({"id": host.id, "forgotten": True})
    return web.json_response(host_detail(request, host.id))


def host_detail(request: web.Request, host_id: str) -> dict[str, Any]:
    fleet = fleet_of(request)
    host = fleet.store.get_host(host_id)
    if host is None:
        raise Refused(404, "not_found", f"host {host_id} is gone")
    return admin.host_detail(fleet, request.app[LINKS], request.app[GATEWAY],
                             request.app[OWNERSHIP], host)


async def list_audit(request: web.Request) -> web.Response:
    fleet = fleet_of(request)
    try:
        since = float(request.query.get("since", "0"))
    except ValueError:
        raise Refused(400, "bad_request", "since: expected a Unix time in seconds") from None
    ref = request.query.get("host", "")
    host_id = admin.audited_host(fleet, ref) if ref else ""
    entries = fleet.store.audit(since, host_id, AUDIT_LIMIT)
    return web.json_response([dataclasses.asdict(e) for e in entries])


# -- the web page's sessions --------------------------------------------------------

async def create_web_login(request: web.Request) -> web.Response:
    """A one-time login URL for the web page, made for whoever is on the socket."""
    sessions: WebSessions = request.app[SESSIONS]
    url, expires_at = sessions.create_login(actor_of(request))
    return web.json_response({"url": url, "expires_at": expires_at})


async def list_web_sessions(request: web.Request) -> web.Response:
    sessions: WebSessions = request.app[SESSIONS]
    return web.json_response([sessions.view(s) for s in sessions.list()])


async def revoke_web_session(request: web.Request) -> web.Response:
    sessions: WebSessions = request.app[SESSIONS]
    session = sessions.revoke(request.match_info["id"], actor_of(request))
    return web.json_response(sessions.view(session))
