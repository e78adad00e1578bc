"""The operators' web page, on its own listener (`--web-listen`, default 127.0.0.1:8444;
HTTPS with --web-cert/--web-key, plain HTTP only on loopback).

Server-rendered with jinja2, autoescaped: hostnames, error texts and facts come from
hosts, which may be hostile. One small static script keeps the hosts table live from the
change log the engine API's watch reads (GET /events, Server-Sent Events).

Every path but /login needs a session (server/websessions.py): `virtfleet-server
web-login` prints a one-time URL; opening it sets the session cookie (HttpOnly,
SameSite=Strict, Secure under HTTPS) and redirects to a URL without the secret. Every
POST needs the session's CSRF token and an Origin header naming this page. What a page
changes goes through server/admin.py, as on the admin socket, audited with the session
as the actor.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import ssl
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp_jinja2
import jinja2
from aiohttp import web

from common import VERSION, wire
from common.cli import ago, duration, when
from server import admin
from server.admin import GatewayView, LinkView, OwnershipView
from server.changes import Change, ChangeLog, Gone
from server.config import ServerConfig, unreachable_url_problem
from server.doors.guard import ConnectionGuard
from server.doors.http import CHANGES, FLEET, GATEWAY, LINKS, OWNERSHIP, SESSIONS, answer, fleet_of
from server.fleet import Fleet, Refused
from server.model import Status, WebSession
from server.views import describe_facts, describe_transport
from server.websessions import LoginRefused, WebSessions, csrf_token, session_actor

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
SESSION, SECRET = "virtfleet.session", "virtfleet.session_secret"  # on a request
HANDSHAKE_TIMEOUT = 10.0
MAX_PER_ADDRESS = 64  # connections one address may hold: a browser opens a handful
HEARTBEAT = 5.0  # an idle event stream says it is alive this often
SESSION_CHECK = 1.0  # an event stream looks its session up again at most this often
_BEAT = object()  # no change came within HEARTBEAT
AUDIT_SPAN = 7 * 86400.0
AUDIT_LIMIT = 1000
ROW_FIELDS = ("id", "hostname", "status", "detail", "role", "admin_state")
NOT_LOGGED_IN = ("not logged in (or the session ended): run `virtfleet-server web-login` on the "
                 "server and open the URL it prints")

# The page may load only its own script and style sheet, be framed by no one, and post
# forms only to itself. Referrer-Policy: same-origin, so no URL of the page is sent
# elsewhere; not no-referrer, under which browsers send `Origin: null` with the page's own
# form posts and the Origin check could not tell them from a forged one. The login URL,
# the one that carries a secret, is answered with no-referrer and a redirect.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                               "img-src 'self'; connect-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def create_web_app(fleet: Fleet, links: LinkView, gateway: GatewayView, changes: ChangeLog,
                   sessions: WebSessions, ownership: OwnershipView) -> web.Application:
    app = web.Application(middlewares=[errors_middleware, session_middleware],
                          client_max_size=64 * 1024)
    app[FLEET], app[LINKS], app[GATEWAY] = fleet, links, gateway
    app[CHANGES], app[SESSIONS], app[OWNERSHIP] = changes, sessions, ownership
    env = aiohttp_jinja2.setup(app, loader=jinja2.FileSystemLoader(HERE / "templates"),
                               autoescape=True, undefined=jinja2.StrictUndefined)
    env.filters.update(when=when, ago=ago, facts=describe_facts, transport=describe_transport)
    app.on_response_prepare.append(_secure)
    # Not HEAD: a link previewer's HEAD would spend the login URL.
    app.router.add_get("/login", login, allow_head=False)
    app.router.add_post("/logout", logout)
    app.router.add_get("/", home)
    app.router.add_get("/hosts", hosts_page)
    app.router.add_get("/hosts/{ref}", host_page)
    app.router.add_get("/hosts/{ref}/forget", forget_page)
    app.router.add_post("/hosts/{ref}/{action:enable|disable|forget|set-role}", host_action)
    app.router.add_get("/tokens", tokens_page)
    app.router.add_post("/tokens", create_token)
    app.router.add_post("/tokens/{jti}/revoke", revoke_token)
    app.router.add_get("/audit", audit_page)
    app.router.add_get("/sessions", sessions_page)
    app.router.add_post("/sessions/{id}/revoke", revoke_session)
    app.router.add_get("/events", events)
    app.router.add_static("/static", HERE / "static", append_version=False)
    return app


class WebDoor:
    """The page's listener: not aiohttp's TCPSite, which sets no deadline for a TLS
    handshake; each connection is bounded as the agent port's are (doors/guard.py)."""

    def __init__(self, config: ServerConfig, app: web.Application) -> None:
        self.config = config
        self.runner = web.AppRunner(app, access_log=None)
        self.listener: asyncio.Server | None = None

    async def start(self) -> None:
        if self.config.web_listen is None:
            return
        await self.runner.setup()
        assert self.runner.server is not None
        ConnectionGuard(MAX_PER_ADDRESS).install(self.runner.server)
        ctx = tls_context(self.config)
        host, port = self.config.web_listen
        self.listener = await asyncio.get_running_loop().create_server(
            self.runner.server, host, port, ssl=ctx, reuse_address=True,
            ssl_handshake_timeout=HANDSHAKE_TIMEOUT if ctx else None)
        log.info("web page at %s (log in with `virtfleet-server web-login`)",
                 self.config.web_base_url)

    async def stop(self) -> None:
        if self.listener is not None:
            self.listener.close()
        if self.runner.server is None:
            return  # never started
        await self.runner.server.shutdown(1.0)  # ends open event streams
        await self.runner.cleanup()


def tls_context(config: ServerConfig) -> ssl.SSLContext | None:
    if config.web_cert is None or config.web_key is None:
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.web_cert, config.web_key)
    return ctx


# -- every request --------------------------------------------------------------------

async def _secure(_request: web.Request, response: web.StreamResponse) -> None:
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


@web.middleware
async def errors_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every failure as a page that says what went wrong, in the JSON doors' words."""
    return await answer(request, handler,
                        lambda status, _code, message, _headers: error_page(request, status, message))


@web.middleware
async def session_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    if request.path == "/login":
        return await handler(request)  # type: ignore[no-any-return]
    secret = request.cookies.get(cookie_name(request), "")
    session = request.app[SESSIONS].session(secret) if secret else None
    if session is None:
        raise Refused(401, "no_session", NOT_LOGGED_IN)
    request[SESSION], request[SECRET] = session, secret
    if request.method not in ("GET", "HEAD"):
        await _check_forgery(request, secret)
    return await handler(request)  # type: ignore[no-any-return]


async def _check_forgery(request: web.Request, secret: str) -> None:
    """A state-changing request must come from this page: its Origin names this site (the
    address the browser used, or --web-url), and its form carries the session's CSRF
    token. Either alone is refused: the SameSite=Strict cookie comes along from any page
    of the same site (another port of this machine), so it proves nothing by itself."""
    origin = request.headers.get("Origin", "")
    if origin.lower() not in _own_origins(request):
        raise Refused(403, "forbidden", f"this request did not come from this page (its Origin "
                                        f"is {origin or 'missing'}): refused")
    token = (await request.post()).get("csrf")
    if not isinstance(token, str) or not hmac.compare_digest(token, csrf_token(secret)):
        raise Refused(403, "forbidden", "the form's CSRF token is missing or wrong: reload the "
                                        "page and try again")


def _own_origins(request: web.Request) -> set[str]:
    base = urlsplit(fleet_of(request).config.web_base_url)
    return {f"{request.scheme}://{request.host}".lower(), f"{base.scheme}://{base.netloc}".lower()}


def cookie_name(request: web.Request) -> str:
    # __Host-: a browser takes it only from HTTPS, for this host alone and path /, so no
    # other site under the same domain can plant or shadow it.
    return "__Host-virtfleet-session" if request.secure else "virtfleet-session"


def page(request: web.Request, template: str, status: int = 200, **context: Any) -> web.Response:
    session: WebSession | None = request.get(SESSION)
    base = {"session": session, "csrf": csrf_token(request[SECRET]) if session else "",
            "version": VERSION, "path": request.path}
    return aiohttp_jinja2.render_template(template, request, base | context, status=status)


def error_page(request: web.Request, status: int, message: str) -> web.Response:
    return page(request, "error.html", status, message=message, status_code=status)


def _redirect(location: str) -> web.Response:
    # 303: the browser follows a form's POST with a GET of the page it should see.
    return web.Response(status=303, headers={"Location": location})


def actor(request: web.Request) -> str:
    return session_actor(request[SESSION])


# -- logging in and out ---------------------------------------------------------------

async def login(request: web.Request) -> web.Response:
    sessions: WebSessions = request.app[SESSIONS]
    try:
        started = sessions.login(request.query.get("token", ""), request.remote or "",
                                 request.headers.get("User-Agent", ""))
    except LoginRefused as exc:
        raise Refused(403, "login_refused", f"{exc}: run `virtfleet-server web-login` on the server "
                                            "for a new one (each works once, for 60 s)") from None
    response = _redirect("/hosts")  # drops the secret from the address bar
    response.headers["Referrer-Policy"] = "no-referrer"
    response.set_cookie(cookie_name(request), started.secret, httponly=True, samesite="Strict",
                        secure=request.secure, path="/")
    return response


async def logout(request: web.Request) -> web.Response:
    request.app[SESSIONS].revoke(request[SESSION].id, actor(request), "logged out")
    response = page(request, "error.html", 200, message="logged out", status_code=200)
    response.del_cookie(cookie_name(request), path="/")
    return response


# -- hosts ----------------------------------------------------------------------------

async def home(_request: web.Request) -> web.Response:
    return _redirect("/hosts")


async def hosts_page(request: web.Request) -> web.Response:
    status, role = request.query.get("status", ""), request.query.get("role", "")
    fleet = fleet_of(request)
    # Read together, with no await between: the table is the state as of this revision,
    # and the page's event stream resumes from it.
    rows = [h for h in fleet.store.host_summaries()
            if status in ("", h.status) and role in ("", h.role)]
    revision = request.app[CHANGES].revision
    return page(request, "hosts.html", hosts=rows, revision=revision, status_filter=status,
                role_filter=role, statuses=[str(s) for s in Status], roles=wire.ROLES)


async def host_page(request: web.Request) -> web.Response:
    fleet = fleet_of(request)
    host = admin.resolve_host(fleet, request.match_info["ref"])
    detail = admin.host_detail(fleet, request.app[LINKS], request.app[GATEWAY],
                               request.app[OWNERSHIP], host)
    facts = {name: result for name, result in sorted(detail["report"].get("facts", {}).items())
             if isinstance(result, dict)}
    return page(request, "host.html", host=detail, facts=facts, roles=wire.ROLES,
                facts_json=json.dumps(detail["report"], indent=2, sort_keys=True))


async def forget_page(request: web.Request) -> web.Response:
    host = admin.resolve_host(fleet_of(request), request.match_info["ref"])
    return page(request, "forget.html", host=host)


async def host_action(request: web.Request) -> web.Response:
    fleet = fleet_of(request)
    host = admin.resolve_host(fleet, request.match_info["ref"])
    action = request.match_info["action"]
    form = await request.post()
    if action == "forget" and form.get("confirm") != "yes":
        raise Refused(400, "bad_request", "forgetting a host needs its confirmation: use "
                                          "Forget… on the host's page")
    admin.act_on_host(fleet, actor(request), host, action, str(form.get("role", "")))
    return _redirect("/hosts" if action == "forget" else f"/hosts/{host.id}")


# -- tokens -----------------------------------------------------------------------------

async def tokens_page(request: web.Request) -> web.Response:
    return page(request, "tokens.html", tokens=admin.tokens_view(fleet_of(request)), created=None,
                warning="", roles=wire.ROLES)


async def create_token(request: web.Request) -> web.Response:
    form = await request.post()
    fleet = fleet_of(request)
    created = admin.create_token(fleet, actor(request), str(form.get("role", "mixed")),
                                 _ttl(str(form.get("ttl", "1h"))), _uses(str(form.get("uses", "1"))),
                                 form.get("auto_enable") == "on", str(form.get("description", "")))
    return page(request, "tokens.html", tokens=admin.tokens_view(fleet), created=created,
                warning=unreachable_url_problem(fleet.config), roles=wire.ROLES)


def _ttl(text: str) -> float:
    try:
        return duration(text)
    except argparse.ArgumentTypeError as exc:
        raise Refused(400, "bad_request", f"valid for: {exc}") from None


def _uses(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise Refused(400, "bad_request", f"uses: {text[:20]!r} is not a whole number") from None


async def revoke_token(request: web.Request) -> web.Response:
    admin.revoke_token(fleet_of(request), actor(request), request.match_info["jti"])
    return _redirect("/tokens")


# -- the audit log and the sessions -------------------------------------------------------

async def audit_page(request: web.Request) -> web.Response:
    fleet = fleet_of(request)
    ref = request.query.get("host", "").strip()
    host_id = admin.audited_host(fleet, ref) if ref else ""
    entries = fleet.store.audit(time.time() - AUDIT_SPAN, host_id, AUDIT_LIMIT)
    return page(request, "audit.html", entries=list(reversed(entries)), host=ref)


async def sessions_page(request: web.Request) -> web.Response:
    sessions: WebSessions = request.app[SESSIONS]
    return page(request, "sessions.html", sessions=[sessions.view(s) for s in reversed(sessions.list())])


async def revoke_session(request: web.Request) -> web.Response:
    request.app[SESSIONS].revoke(request.match_info["id"], actor(request))
    return _redirect("/sessions")


# -- the live table -------------------------------------------------------------------------

async def events(request: web.Request) -> web.StreamResponse:
    """The hosts' changes after a revision, as Server-Sent Events: `host` (a row's fields),
    `reload` (that revision is no longer kept: the page lists again) and `ended` (the
    session is over). The browser resumes a dropped stream from the last event's id."""
    changes: ChangeLog = request.app[CHANGES]
    try:
        since = int(request.headers.get("Last-Event-ID") or request.query.get("since", ""))
    except ValueError:
        raise Refused(400, "bad_request", "events need since=REVISION (from the hosts page)") from None
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    try:
        backlog, queue = changes.watch(since)
    except Gone:
        await response.write(b"event: reload\ndata: {}\n\n")
        return response
    try:
        for change in backlog:
            await response.write(_event(changes, change))
        await _stream(request, response, changes, queue)
    except ConnectionResetError:
        pass  # the page was closed
    finally:
        changes.unwatch(queue)
    return response


async def _stream(request: web.Request, response: web.StreamResponse, changes: ChangeLog,
                  queue: asyncio.Queue[Change | None]) -> None:
    """Changes as they come, a comment line when none came for HEARTBEAT seconds, until
    the session ends (checked at most every SESSION_CHECK seconds: a revoked session sees
    nothing more) or the watcher falls too far behind."""
    sessions: WebSessions = request.app[SESSIONS]
    checked = time.monotonic()
    while True:
        try:
            change: Change | None | object = await asyncio.wait_for(queue.get(), HEARTBEAT)
        except TimeoutError:
            change = _BEAT
        if time.monotonic() - checked >= SESSION_CHECK:
            if sessions.session(request[SECRET], touch=False) is None:
                await response.write(b"event: ended\ndata: {}\n\n")
                return
            checked = time.monotonic()
        if change is None:
            await response.write(b"event: reload\ndata: {}\n\n")
            return
        await response.write(_event(changes, change) if isinstance(change, Change) else b": alive\n\n")


def _event(changes: ChangeLog, change: Change) -> bytes:
    host = json.loads(changes.line(change))["host"]
    data = {"type": change.type, "host": {k: host.get(k) for k in ROW_FIELDS}}
    return f"id: {change.revision}\nevent: host\ndata: {json.dumps(data)}\n\n".encode()
