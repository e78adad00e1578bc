"""What an operator may do and see, whichever door asks: the admin socket's JSON API
(doors/admin_api.py) and the web page (doors/web.py).

Each action checks what was asked, calls the domain (fleet.py) and writes its audit entry
with the actor the door vouches for ("root (uid 0)" on the socket, "web session … of
root (uid 0)" on the page): one set of rules, so the two doors cannot drift apart. The
views are the data both show (the page renders them, the socket sends them as JSON).
"""

from __future__ import annotations

import functools
import time
from typing import Any, Protocol

from common import wire
from server.audit import host_target
from server.fleet import CreatedToken, Fleet, Refused
from server.model import AdminState, Host, Token, Transport
from server.replicas import ReplicaInfo

MAX_TTL = 7 * 24 * 3600
MAX_USES = 100_000
MIN_PREFIX = 2  # characters of an id that may stand for it
HOST_ACTIONS = ("enable", "disable", "forget", "set-role", "set-transport")


class LinkView(Protocol):
    def describe(self, host_id: str) -> dict[str, Any]: ...


class GatewayView(Protocol):
    def uri(self, host_id: str) -> str: ...
    def describe(self, host_id: str) -> dict[str, int]: ...


class OwnershipView(Protocol):
    """Which replica holds each host's libvirt connection ("" for a sole server)."""

    def owner_of(self, host_id: str) -> str: ...
    def replicas(self) -> list[ReplicaInfo]: ...


# -- references ------------------------------------------------------------------

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


def audited_host(fleet: Fleet, ref: str) -> str:
    """A known host as anywhere else; a forgotten one by its whole id."""
    try:
        return resolve_host(fleet, ref).id
    except Refused as exc:
        if exc.status == 404 and fleet.store.audit(0.0, ref, 1):
            return ref
        raise


# -- actions ----------------------------------------------------------------------

def create_token(fleet: Fleet, actor: str, role: str, ttl: float, uses: int, auto_enable: bool,
                 description: str, transport: str = Transport.AUTO) -> CreatedToken:
    if role not in wire.ROLES:
        raise Refused(400, "bad_request", f"role {role!r} is not one of {', '.join(wire.ROLES)}")
    if not 1 <= ttl <= MAX_TTL:
        raise Refused(400, "bad_request", f"ttl must be between 1 s and {MAX_TTL} s (7 days)")
    if not 1 <= uses <= MAX_USES:
        raise Refused(400, "bad_request", f"uses must be between 1 and {MAX_USES}")
    created = fleet.create_token(role, ttl, uses, auto_enable, description[:200], transport)
    fleet.audit.record(actor, "token_create", f"token {created.record.jti}", "ok",
                       f"role {role}, transport {transport}, {uses} use(s), valid {ttl:g} s"
                       + ("" if auto_enable else ", hosts wait for enable"))
    return created


def revoke_token(fleet: Fleet, actor: str, ref: str) -> Token:
    store = fleet.store
    jti = unique_match(ref, [t.jti for t in store.list_tokens()], "token",
                       "virtfleet-server token list")
    token = store.revoke_token(jti, time.time())
    assert token is not None
    fleet.audit.record(actor, "token_revoke", f"token {jti}", "ok")
    return token


def act_on_host(fleet: Fleet, actor: str, host: Host, action: str, value: str = "") -> None:
    """One of HOST_ACTIONS (`value`: set-role's role, set-transport's transport), audited
    either way."""
    audited = functools.partial(fleet.audit.record, actor, "host_" + action.replace("-", "_"),
                                host_target(host), host_id=host.id)
    try:
        detail = _act(fleet, host, action, value)
    except Refused as exc:
        audited("refused", exc.message)
        raise
    audited("ok", detail)


def _act(fleet: Fleet, host: Host, action: str, value: str) -> str:
    """Do it; what changed, in words, for the audit log."""
    if action == "forget":
        fleet.forget(host)
        return ""
    if action == "set-role":
        fleet.set_role(host, value)
        return f"role {host.role} -> {value}"
    if action == "set-transport":
        fleet.set_transport(host, value)
        return f"transport {host.transport} -> {value}"
    fleet.set_admin_state(host, {"enable": AdminState.ENABLED, "disable": AdminState.DISABLED}[action])
    return f"was {host.admin_state}"


# -- views ------------------------------------------------------------------------

def token_view(token: Token, hosts: list[str]) -> dict[str, Any]:
    return {
        "id": token.jti, "role": token.role, "auto_enable": token.auto_enable,
        "transport": token.transport,
        "uses": token.uses, "max_uses": token.max_uses, "created_at": token.created_at,
        "expires_at": token.expires_at, "revoked_at": token.revoked_at,
        "state": token.state(time.time()), "description": token.description,
        "hosts": hosts,
    }


def tokens_view(fleet: Fleet) -> list[dict[str, Any]]:
    used_by = fleet.store.token_hosts()
    return [token_view(t, used_by.get(t.jti, [])) for t in fleet.store.list_tokens()]


def host_summary(host: Host) -> dict[str, Any]:
    return {
        "id": host.id, "hostname": host.hostname, "role": host.role, "status": host.status,
        "detail": host.detail, "last_checkin": host.last_checkin, "address": host.address,
    }


def host_detail(fleet: Fleet, links: LinkView, gateway: GatewayView, ownership: OwnershipView,
                host: Host) -> dict[str, Any]:
    return host_summary(host) | {
        "owner": ownership.owner_of(host.id),
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
