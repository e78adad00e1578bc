"""The web page's logins and sessions.

`virtfleet-server web-login` (over the admin socket, so only the operator can) asks for
a one-time login URL: a random secret, valid LOGIN_TTL (60 s), spent by its first use.
Opening it starts a session, whose own random secret is the browser's cookie. The store
keeps only each secret's SHA-256 (a copy of the database, or of its backups, logs nobody
in), the session's public id, who made its login URL, and when it was last used: a
session idle for `idle` (12 h by default) or older than MAX_AGE has ended, as has a
revoked one.

A state-changing request from the page carries the session's CSRF token: an HMAC of the
session's secret, so nothing more is stored and no other page can know it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from typing import Any

from server.admin import unique_match
from server.audit import Audit
from server.fleet import Refused
from server.model import WebLogin, WebSession
from server.store import Store

LOGIN_TTL = 60.0
DEFAULT_IDLE = 12 * 3600.0
MAX_AGE = 7 * 86400.0  # however busy, a session ends after this: the operator logs in anew
TOUCH_EVERY = 60.0  # a session's last use is written at most this often (a fsync each)


class LoginRefused(Exception):
    """A login URL that opens nothing; the message says why, for the person at the browser."""


@dataclasses.dataclass(frozen=True)
class Started:
    session: WebSession
    secret: str  # the cookie's value: the browser's alone, never stored


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def csrf_token(secret: str) -> str:
    return hmac.new(secret.encode(), b"virtfleet csrf", hashlib.sha256).hexdigest()


def session_actor(session: WebSession) -> str:
    """Who acted, for the audit log: "web session 3f9a1c2b7d4e of root (uid 0)"."""
    return f"web session {session.id} of {session.created_by}"


class WebSessions:
    def __init__(self, store: Store, audit: Audit, base_url: str, idle: float = DEFAULT_IDLE,
                 clock: Callable[[], float] = time.time) -> None:
        """`base_url`: where browsers reach the page ("" when it is off)."""
        self.store, self.audit, self.base_url = store, audit, base_url
        self.idle, self.clock = idle, clock

    def create_login(self, actor: str) -> tuple[str, float]:
        """A one-time login URL and when it expires."""
        if not self.base_url:
            raise Refused(409, "web_off", "the web page is off (serve --web-listen off)")
        secret, now = secrets.token_urlsafe(32), self.clock()
        self.store.add_web_login(WebLogin(digest(secret), actor, now, now + LOGIN_TTL))
        self.audit.record(actor, "web_login_url", "a web login URL", "ok",
                          f"valid {LOGIN_TTL:g} s, once")
        return f"{self.base_url}/login?token={secret}", now + LOGIN_TTL

    def login(self, secret: str, address: str, user_agent: str) -> Started:
        """Spend a login URL's secret for a new session. A spent or expired one is an audit
        entry (a login URL opened twice may have leaked); a secret never issued is not: it
        is anyone's guess, and would let anyone fill the log."""
        login = self.store.get_web_login(digest(secret))
        if login is None:
            raise LoginRefused("this login URL is not one this server made")
        now, cookie = self.clock(), secrets.token_urlsafe(32)
        session = WebSession(id=secrets.token_hex(6), digest=digest(cookie),
                             created_by=login.created_by, created_at=now, last_seen=now,
                             address=address, user_agent=user_agent[:200])
        if not self.store.start_web_session(login.digest, session, now):
            now_known = self.store.get_web_login(login.digest)  # as the attempt left it
            reason = ("this login URL was used already" if now_known and now_known.used_at
                      else "this login URL has expired")
            self.audit.record(f"browser at {address}", "web_login",
                              f"a login URL of {login.created_by}", "refused", reason,
                              address=address)
            raise LoginRefused(reason)
        self.audit.record(session_actor(session), "web_login", f"web session {session.id}", "ok",
                          f"from {address}", address=address)
        return Started(session, cookie)

    def session(self, secret: str, touch: bool = True) -> WebSession | None:
        """The live session whose cookie this is; a use now (`touch`) keeps it from idling."""
        session = self.store.web_session(digest(secret))
        now = self.clock()
        if session is None or self.ended(session, now):
            return None
        if touch and now - session.last_seen >= TOUCH_EVERY:
            self.store.touch_web_session(session.id, now)
            session = dataclasses.replace(session, last_seen=now)
        return session

    def ended(self, session: WebSession, now: float) -> str:
        """Why the session is over, or "" while it lasts."""
        if session.revoked_at is not None:
            return "revoked"
        if now - session.last_seen > self.idle:
            return "expired (idle)"
        if now - session.created_at > MAX_AGE:
            return "expired"
        return ""

    def list(self) -> list[WebSession]:
        return self.store.web_sessions()

    def revoke(self, ref: str, actor: str, detail: str = "") -> WebSession:
        """End a session (by id or unique id prefix) at once: its next request is refused."""
        session_id = unique_match(ref, [s.id for s in self.list()], "web session",
                                  "virtfleet-server web-sessions list")
        session = self.store.revoke_web_session(session_id, self.clock())
        assert session is not None
        self.audit.record(actor, "web_session_revoke",
                          f"web session {session.id} of {session.created_by}", "ok", detail)
        return session

    def view(self, session: WebSession) -> dict[str, Any]:
        ended = self.ended(session, self.clock())
        return {"id": session.id, "created_by": session.created_by,
                "created_at": session.created_at, "last_seen": session.last_seen,
                "address": session.address, "user_agent": session.user_agent,
                "revoked_at": session.revoked_at, "state": ended or "active"}
