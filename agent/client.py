"""One call to the server per function: no sleeping, no looping (the runner does that).

Errors say whether to retry: a network failure, 429 or 5xx is worth retrying; a 401 or
403 means the server refuses this identity and retrying is noise.

HTTP is the standard library's: the agent makes one call at a time, so one kept-alive
`http.client` connection, used in a worker thread, does all it needs. (aiohttp's import
alone was 8 of the agent's 50 MB.)
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import select
import socket
import ssl
import time
from typing import Any, TypeVar
from urllib.parse import urlsplit

from common import wire

T = TypeVar("T")
CONNECT_TIMEOUT = 10.0  # TCP connect and TLS handshake
TOTAL_TIMEOUT = 20.0  # a whole call: each wait gets what is left of it
MAX_RETRY_AFTER = 300.0  # a server asking for more is treated as asking for this


class ServerError(Exception):
    def __init__(self, message: str, status: int | None = None, code: str = "",
                 retry_after: float = 0.0) -> None:
        super().__init__(message)
        self.status, self.code = status, code
        self.retry_after = retry_after  # seconds the server asked us to wait (Retry-After)

    @property
    def retryable(self) -> bool:
        return self.status is None or self.status == 429 or self.status >= 500

    @property
    def identity_refused(self) -> bool:
        return self.status in (401, 403)


class Connection:
    """One kept-alive HTTPS connection to the server. `exchange` blocks: callers run it in
    a worker thread, one call at a time."""

    def __init__(self, url: str, ssl_ctx: ssl.SSLContext, source: str | None = None) -> None:
        parts = urlsplit(url)
        self.url = url
        self._http = http.client.HTTPSConnection(
            parts.hostname or "", parts.port or 443, timeout=CONNECT_TIMEOUT, context=ssl_ctx,
            source_address=(source, 0) if source else None)
        self._closed = False

    def exchange(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes, str]:
        """(status, body, Retry-After) of one request; raises OSError or HTTPException."""
        deadline = time.monotonic() + TOTAL_TIMEOUT
        conn = self._http
        if conn.sock is not None and _dropped(conn.sock):
            conn.close()
        try:
            if conn.sock is None:
                conn.connect()
            if self._closed:  # closed while connecting: nobody waits for this call any more
                raise ConnectionAbortedError("connection closed")
            conn.sock.settimeout(max(deadline - time.monotonic(), 0.1))
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body, headers)
            resp = conn.getresponse()
            return resp.status, resp.read(), resp.getheader("Retry-After", "")
        except BaseException:
            conn.close()
            raise

    def close(self) -> None:
        """Also from another thread: a call blocked on the socket fails at once."""
        self._closed = True
        sock = self._http.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._http.close()


def _dropped(sock: socket.socket) -> bool:
    """An idle kept-alive connection the server has closed reads as ready (its EOF or TLS
    close_notify): a call on it would fail, a new connection will not."""
    return bool(select.select([sock], [], [], 0)[0])


async def call(conn: Connection, path: str, body: Any, answer: type[T]) -> T:
    """POST a message, parse the answer as `answer`, or raise ServerError saying why."""
    url = conn.url + path
    try:
        status, raw, retry_after = await asyncio.to_thread(
            conn.exchange, "POST", path, json.dumps(body).encode())
    except ssl.SSLError as exc:
        raise ServerError(f"TLS with {url} failed: {exc}") from None
    except (http.client.HTTPException, OSError) as exc:
        raise ServerError(f"cannot reach {url}: {exc or type(exc).__name__}") from None
    if status >= 400:
        raise _refusal(status, raw, retry_after)
    try:
        return wire.decode_body(answer, raw)
    except wire.WireError as exc:
        raise ServerError(f"the server's answer does not follow the protocol: {exc}", 502) from None


def _refusal(status: int, raw: bytes, retry_after: str) -> ServerError:
    wait = min(float(retry_after), MAX_RETRY_AFTER) if retry_after.isdigit() else 0.0
    try:
        body = json.loads(raw)
        return ServerError(str(body["message"]), status, str(body.get("error", "")), wait)
    except (ValueError, KeyError, TypeError):
        return ServerError(f"HTTP {status}", status, retry_after=wait)


def _untrusting_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the caller checks what it gets against the join pin
    return ctx


async def fetch_ca(url: str) -> str:
    """The server's CA, fetched *without* trusting anything: the caller checks the pin."""
    conn = Connection(url, _untrusting_context())
    try:
        status, raw, _ = await asyncio.to_thread(conn.exchange, "GET", wire.CA_PATH)
    except (http.client.HTTPException, OSError) as exc:
        raise ServerError(f"cannot reach the server at {url}: {exc or type(exc).__name__}") from None
    finally:
        conn.close()
    if status != 200:
        raise ServerError(f"{url} answered HTTP {status} for its CA", status)
    try:
        body = json.loads(raw)
    except ValueError:
        raise ServerError(f"{url} is not a virtfleet server (its CA answer is not JSON)") from None
    if not isinstance(body, dict) or not isinstance(body.get("ca_certificate"), str):
        raise ServerError(f"{url} is not a virtfleet server (no CA in its answer)")
    return str(body["ca_certificate"])


class ServerClient:
    """The enrolled host's calls, over one kept-alive mTLS connection."""

    def __init__(self, url: str, ssl_ctx: ssl.SSLContext) -> None:
        self.url = url
        self._conn = Connection(url, ssl_ctx)

    def use_context(self, ssl_ctx: ssl.SSLContext) -> None:
        """After a renewal: the kept-alive connection still carries the old certificate,
        so drop it; the next call presents the new one."""
        self.close()
        self._conn = Connection(self.url, ssl_ctx)

    async def checkin(self, report: wire.Report) -> wire.CheckinResponse:
        body = wire.to_json(wire.CheckinRequest(report=report))
        return await call(self._conn, wire.CHECKIN_PATH, body, wire.CheckinResponse)

    async def renew(self, csr: str, libvirt_csr: str | None) -> wire.Identity:
        body = wire.to_json(wire.RenewRequest(csr=csr, libvirt_csr=libvirt_csr))
        return await call(self._conn, wire.RENEW_PATH, body, wire.Identity)

    def close(self) -> None:
        self._conn.close()
