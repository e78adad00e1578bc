"""One call to the server per function: no sleeping, no looping (the runner does that).

Errors say whether to retry: a network failure, 429 or 5xx is worth retrying; a 401 or
403 means the server refuses this identity and retrying is noise.
"""

from __future__ import annotations

import json
import ssl
from typing import Any, TypeVar

import aiohttp

from common import wire

T = TypeVar("T")
TIMEOUT = aiohttp.ClientTimeout(total=20, connect=10)
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


async def call(session: aiohttp.ClientSession, url: str, body: Any, answer: type[T],
               ssl_ctx: ssl.SSLContext | bool) -> T:
    """POST a message, parse the answer as `answer`, or raise ServerError saying why."""
    try:
        async with session.post(url, json=body, ssl=ssl_ctx) as resp:
            raw = await resp.read()
            if resp.status >= 400:
                raise _refusal(resp.status, raw, resp.headers.get("Retry-After", ""))
    except aiohttp.ClientSSLError as exc:
        raise ServerError(f"TLS with {url} failed: {exc}") from None
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        raise ServerError(f"cannot reach {url}: {exc or type(exc).__name__}") from None
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


async def fetch_ca(url: str) -> str:
    """The server's CA, fetched *without* trusting anything: the caller checks the pin."""
    async with aiohttp.ClientSession(timeout=TIMEOUT) as session:
        try:
            async with session.get(url + wire.CA_PATH, ssl=False) as resp:
                if resp.status != 200:
                    raise ServerError(f"{url} answered HTTP {resp.status} for its CA", resp.status)
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ServerError(f"cannot reach the server at {url}: {exc or type(exc).__name__}") from None
        except ValueError:
            raise ServerError(f"{url} is not a virtfleet server (its CA answer is not JSON)") from None
    if not isinstance(body, dict) or not isinstance(body.get("ca_certificate"), str):
        raise ServerError(f"{url} is not a virtfleet server (no CA in its answer)")
    return str(body["ca_certificate"])


class ServerClient:
    """The enrolled host's calls, over one keep-alive mTLS session."""

    def __init__(self, url: str, ssl_ctx: ssl.SSLContext) -> None:
        self.url = url
        self.ssl_ctx = ssl_ctx
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=TIMEOUT)
        return self._session

    async def use_context(self, ssl_ctx: ssl.SSLContext) -> None:
        """After a renewal: keep-alive connections still carry the old certificate, so
        drop them; the next call presents the new one."""
        self.ssl_ctx = ssl_ctx
        await self.close()
        self._session = None

    async def checkin(self, report: wire.Report) -> wire.CheckinResponse:
        body = wire.to_json(wire.CheckinRequest(report=report))
        return await call(self._http(), self.url + wire.CHECKIN_PATH, body,
                          wire.CheckinResponse, self.ssl_ctx)

    async def renew(self, csr: str, libvirt_csr: str | None) -> wire.Identity:
        body = wire.to_json(wire.RenewRequest(csr=csr, libvirt_csr=libvirt_csr))
        return await call(self._http(), self.url + wire.RENEW_PATH, body, wire.Identity,
                          self.ssl_ctx)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
