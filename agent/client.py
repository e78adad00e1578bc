"""One call to the server per function: no sleeping, no looping (the runner does that).

Errors say whether to retry: a network failure, 429 or 5xx is worth retrying; a 401 or
403 means the server refuses this identity and retrying is noise.

HTTP is the standard library's: the agent makes one call at a time, so one kept-alive
`http.client` connection, used in a worker thread, does all it needs. (aiohttp's import
alone was 8 of the agent's 50 MB.)

Nothing the server sends is trusted for its size or shape: every body is read with a cap
(`http.client`'s `read()` would read whatever comes), every answer is parsed by the wire
contract, and anything that does not parse is a `ServerError` like any other.
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
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

from common import wire
from common.cli import printable  # server-sent text reaches terminals and logs

T = TypeVar("T")
CONNECT_TIMEOUT = 10.0  # TCP connect and TLS handshake
TOTAL_TIMEOUT = 20.0  # a whole call: each wait gets what is left of it
MAX_RETRY_AFTER = 300.0  # a server asking for more is treated as asking for this
# The /v1/ca answer is read before the pin is checked, from anyone at the join URL: a
# CA certificate is 1-2 KiB; 64 KiB is room for any real one and no memory worth having.
CA_MAX_BYTES = 64 * 1024
READ_CHUNK = 64 * 1024


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
    def role_refused(self) -> bool:
        """The server knows this host but not the role it asks for: a setting to change in
        agent.toml, not an identity to replace."""
        return self.code == ROLE_REFUSED

    @property
    def identity_refused(self) -> bool:
        return self.status in (401, 403) and not self.role_refused


ROLE_REFUSED = "role_refused"  # server/fleet.py's code for a role beyond the token's



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

    def exchange(self, method: str, path: str, body: bytes | None = None,
                 limit: int = wire.MAX_BODY_BYTES) -> tuple[int, bytes, str]:
        """(status, body, Retry-After) of one request; raises OSError, HTTPException, or
        ServerError for an answer longer than `limit` bytes."""
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
            sock = conn.sock  # getresponse() drops it from `conn` when the server closes
            resp = conn.getresponse()
            raw = read_capped(resp, sock, limit, deadline, self.url + path)
            return resp.status, raw, resp.getheader("Retry-After", "")
        except BaseException:
            conn.close()  # a body left unread (too long) must not be read as the next answer
            raise

    def close(self) -> None:
        """Also from another thread: a call blocked on the socket fails at once."""
        self._closed = True
        sock = self._http.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        self._http.close()


def read_capped(resp: http.client.HTTPResponse, sock: socket.socket, limit: int,
                deadline: float, url: str) -> bytes:
    """The body, read a chunk at a time: at most `limit` bytes, and by `deadline` (a server
    trickling a byte at a time does not hold the agent past its timeout)."""
    declared = resp.getheader("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ServerError(f"{url} sent an answer of {int(declared)} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("timed out reading the answer")
        with contextlib.suppress(OSError):
            sock.settimeout(left)
        chunk = resp.read1(min(READ_CHUNK, limit + 1 - size))
        if not chunk:
            if not resp.isclosed():
                resp.read()  # the end of a sized body: marks it read, the connection reusable
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise ServerError(f"{url} sent an answer longer than {limit} bytes")
        chunks.append(chunk)


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
    except ServerError:
        raise
    except ssl.SSLError as exc:
        raise ServerError(f"TLS with {url} failed: {exc}") from None
    except (http.client.HTTPException, OSError) as exc:
        raise ServerError(f"cannot reach {url}: {exc or type(exc).__name__}") from None
    if status >= 400:
        raise _refusal(status, raw, retry_after)
    try:
        # Fields this agent does not know are a newer server's: ignored, not refused.
        return wire.decode_body(answer, raw, ignore_unknown=True)
    except wire.WireError as exc:
        raise ServerError(f"the server's answer does not follow the protocol: "
                          f"{printable(str(exc))}", 502) from None


def _refusal(status: int, raw: bytes, retry_after: str) -> ServerError:
    wait = min(float(retry_after), MAX_RETRY_AFTER) if retry_after.isdigit() else 0.0
    try:
        body = wire.decode_body(wire.ErrorBody, raw, ignore_unknown=True)
    except wire.WireError:  # not JSON, nested too deep, not an error body: the status says enough
        return ServerError(f"HTTP {status}", status, retry_after=wait)
    return ServerError(printable(body.message), status, printable(body.error), wait)


def _untrusting_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the caller checks what it gets against the join pin
    return ctx


async def fetch_ca(url: str) -> str:
    """The server's CA, fetched *without* trusting anything: the caller checks the pin."""
    conn = Connection(url, _untrusting_context())
    try:
        status, raw, _ = await asyncio.to_thread(conn.exchange, "GET", wire.CA_PATH, None,
                                                 CA_MAX_BYTES)
    except (http.client.HTTPException, OSError) as exc:
        raise ServerError(f"cannot reach the server at {url}: {exc or type(exc).__name__}") from None
    finally:
        conn.close()
    if status != 200:
        raise ServerError(f"{url} answered HTTP {status} for its CA", status)
    try:
        return wire.decode_body(wire.CaResponse, raw, ignore_unknown=True).ca_certificate
    except wire.WireError as exc:
        raise ServerError(f"{url} is not a virtfleet server (its CA answer: "
                          f"{printable(str(exc))})") from None


class ServerClient:
    """The enrolled host's calls, over one kept-alive mTLS connection.

    `ssl_ctx` is a context, or a function returning the current one (the certificate
    manager's `current`): after a renewal the kept-alive connection still carries the
    old certificate, so the next call drops it and presents the new one."""

    def __init__(self, url: str, ssl_ctx: ssl.SSLContext | Callable[[], ssl.SSLContext]) -> None:
        self.url = url
        self._context = ssl_ctx if callable(ssl_ctx) else (lambda: ssl_ctx)
        self._ctx = self._context()
        self._conn = Connection(url, self._ctx)

    def use_context(self, ssl_ctx: ssl.SSLContext) -> None:
        """Present `ssl_ctx` from the next call on."""
        self._context = lambda: ssl_ctx

    def _current(self) -> Connection:
        ctx = self._context()
        if ctx is not self._ctx:
            self.close()
            self._ctx, self._conn = ctx, Connection(self.url, ctx)
        return self._conn

    async def checkin(self, report: wire.Report) -> wire.CheckinResponse:
        body = wire.to_json(wire.CheckinRequest(report=report))
        return await call(self._current(), wire.CHECKIN_PATH, body, wire.CheckinResponse)

    async def heartbeat(self, digest: str) -> wire.CheckinResponse:
        """A check-in without the report: `digest` is the server's for the last one."""
        body = {"report_digest": digest, "protocol": wire.PROTOCOL_VERSION}
        return await call(self._current(), wire.CHECKIN_PATH, body, wire.CheckinResponse)

    async def renew(self, csr: str, libvirt_csr: str | None) -> wire.Identity:
        body = wire.to_json(wire.RenewRequest(csr=csr, libvirt_csr=libvirt_csr))
        return await call(self._current(), wire.RENEW_PATH, body, wire.Identity)

    def close(self) -> None:
        self._conn.close()
