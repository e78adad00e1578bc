"""The agent-facing HTTPS API (aiohttp) and the server's run loop.

Routes: GET /v1/ca (public), POST /v1/enroll (join token), POST /v1/checkin and
POST /v1/renew (mTLS: the host is whoever its client certificate says). Every refusal
is JSON `{"error": code, "message": reason}` with a 4xx; an unexpected failure is a 500
with no detail, its traceback in the server log only.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import math
import os
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from aiohttp import web

from common import notify, wire
from server import admin, openapi
from server.config import ServerConfig
from server.fleet import Fleet, Refused, serial_of
from server.http import FLEET, errors_middleware, fleet_of
from server.store import CHECKIN_FLUSH
from server.tls import ensure_server_cert, limit_tls_buffers, server_context, server_names

log = logging.getLogger(__name__)

T = TypeVar("T")


async def read_message(request: web.Request, cls: type[T]) -> T:
    return wire.decode_body(cls, await read_body(request))


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
    return web.json_response(wire.to_json(message), dumps=_compact)


def _compact(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"))


class RateLimiter:
    """A token bucket per source address: `rate` per second, bursts of twice that."""

    def __init__(self, rate: float) -> None:
        self.rate, self.burst = rate, max(1.0, 2 * rate)
        self.buckets: dict[str, tuple[float, float]] = {}

    def allow(self, key: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        tokens, last = self.buckets.get(key, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if len(self.buckets) > 100_000:  # bounded memory under a spray of addresses
            self.buckets.clear()
        if tokens < 1:
            self.buckets[key] = (tokens, now)
            return False
        self.buckets[key] = (tokens - 1, now)
        return True

    def retry_after(self, key: str) -> int:
        """Whole seconds until `key` may try again, for a refusal's Retry-After."""
        if self.rate <= 0:  # `--enroll-rate 0`: the bucket never refills
            return 3600
        tokens, _ = self.buckets.get(key, (self.burst, 0.0))
        return max(1, math.ceil((1 - tokens) / self.rate))


async def get_ca(request: web.Request) -> web.Response:
    return json_message(wire.CaResponse(ca_certificate=fleet_of(request).identity_ca.cert_pem))


async def post_enroll(request: web.Request) -> web.Response:
    address = peer_address(request)
    limiter: RateLimiter = request.app[RATE]
    if not limiter.allow(address):
        wait = limiter.retry_after(address)
        raise Refused(429, "rate_limited", f"too many enrollments from this address; retry in {wait} s",
                      headers={"Retry-After": str(wait)})
    req = await read_message(request, wire.EnrollRequest)
    if req.protocol != wire.PROTOCOL_VERSION:
        raise Refused(400, "protocol", f"protocol {req.protocol} is not supported "
                                       f"(this server speaks {wire.PROTOCOL_VERSION})")
    return json_message(fleet_of(request).enroll(req, address))


async def post_checkin(request: web.Request) -> web.Response:
    fleet = fleet_of(request)
    host = fleet.host_for_certificate(peer_serial(request))
    req = await read_message(request, wire.CheckinRequest)
    return json_message(fleet.checkin(host, req, peer_address(request)))


async def post_renew(request: web.Request) -> web.Response:
    fleet = fleet_of(request)
    host = fleet.host_for_certificate(peer_serial(request))
    req = await read_message(request, wire.RenewRequest)
    return json_message(fleet.renew(host, req, peer_address(request)))


RATE = "virtfleet.enroll_rate"
# Full garbage collections (tune_garbage_collector): once memory grew by GC_GROWTH bytes
# since the last one and stopped growing; checked every GC_CHECK seconds.
GC_GROWTH = 100 * 2**20
GC_CHECK = 10.0
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def create_app(fleet: Fleet) -> web.Application:
    app = web.Application(middlewares=[errors_middleware], client_max_size=wire.MAX_BODY_BYTES)
    app[FLEET] = fleet
    app[RATE] = RateLimiter(fleet.config.enroll_rate)
    app.router.add_get(wire.CA_PATH, get_ca)
    app.router.add_post(wire.ENROLL_PATH, post_enroll)
    app.router.add_post(wire.CHECKIN_PATH, post_checkin)
    app.router.add_post(wire.RENEW_PATH, post_renew)
    app.router.add_get(wire.OPENAPI_PATH, openapi.get_openapi)
    app.cleanup_ctx.append(_background)
    return app


async def _background(app: web.Application) -> AsyncIterator[None]:
    """The offline sweeper and the connection manager live exactly as long as the app."""
    fleet: Fleet = app[FLEET]
    await fleet.connections.start()
    tasks = [asyncio.create_task(_sweep_forever(fleet), name="offline-sweeper"),
             asyncio.create_task(_write_checkins_forever(fleet), name="checkin-writer"),
             asyncio.create_task(_collect_garbage_forever(), name="garbage-collector")]
    yield
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await fleet.connections.stop()


async def _sweep_forever(fleet: Fleet) -> None:
    """Also systemd's watchdog: pinged while sweeps work and the event loop answers."""
    interval = min(1.0, fleet.config.grace / 4)
    shown = ""
    while True:
        try:
            await fleet.status.sweep()
            notify.watchdog()
            summary = _summary(fleet.config.url, fleet.store.status_counts())
            if summary != shown:
                notify.status(summary)
                shown = summary
        except sqlite3.Error as exc:
            log.error("offline sweep failed: %s", exc)
        await asyncio.sleep(interval)


async def _write_checkins_forever(fleet: Fleet) -> None:
    """Queued check-ins to disk (Store.record_checkin); a failure is logged once, not
    ten times a second, and retried."""
    failing = False
    while True:
        await asyncio.sleep(CHECKIN_FLUSH)
        try:
            fleet.store.flush_checkins()
        except sqlite3.Error as exc:
            if not failing:
                log.error("cannot write check-ins: %s (retrying)", exc)
            failing = True
        else:
            if failing:
                log.info("check-ins are written again")
            failing = False


def tune_garbage_collector() -> None:
    """Python's collector, tuned for a server that holds thousands of connections.

    Its full passes walk every long-lived object (dozens per kept-alive agent connection)
    and took 100-300 ms at 2,000 hosts: every check-in waiting meanwhile became a p99
    outlier. So: what start-up made is frozen out of every pass; young passes run every
    20,000 allocations instead of 700; full passes run only from
    `_collect_garbage_forever` (bench/README.md)."""
    gc.freeze()
    gc.set_threshold(20_000, 10, 1_000_000_000)


async def _collect_garbage_forever() -> None:
    trim = _malloc_trim()
    last_rss = previous = _resident_bytes()
    while True:
        await asyncio.sleep(GC_CHECK)
        rss = _resident_bytes()
        due = full_collection_due(rss - last_rss, rss - previous)
        previous = rss
        if not due:
            continue
        started = time.perf_counter()
        found = gc.collect()
        if trim is not None:
            # A reconnect storm leaves hundreds of MB freed but kept by the C heap (1.2 GB
            # -> 0.67 GB RSS at 10,000 hosts when handed back).
            trim(0)
        last_rss = previous = _resident_bytes()
        log.info("memory grew to %d MB: a full garbage collection freed %d objects in %.0f ms, "
                 "%d MB resident now", rss // 2**20, found, (time.perf_counter() - started) * 1000,
                 last_rss // 2**20)


def full_collection_due(grown: int, growing: int) -> bool:
    """Once memory grew by GC_GROWTH bytes since the last pass and stopped growing: a
    reconnect storm leaves cyclic garbage that young passes missed and freed heap the C
    library keeps, and a pass (0.6 s at 10,000 hosts) in the middle of the storm would
    only make more agents time out. Never on a timer: with memory flat there is nothing
    to find (at 10,000 hosts checking in steadily a pass freed nothing), and every
    check-in waits meanwhile."""
    return grown >= GC_GROWTH and growing < GC_GROWTH // 10


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE_SIZE


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, which returns freed heap memory to the kernel; None elsewhere."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim  # type: ignore[no-any-return]
    except (OSError, AttributeError):
        return None


def _summary(url: str, counts: dict[str, int]) -> str:
    """The STATUS= line: e.g. "serving https://vdi:8443; 3 hosts: 2 online, 1 error"."""
    hosts = sum(counts.values())
    by_status = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return f"serving {url}; {hosts} host{'' if hosts == 1 else 's'}" + (f": {by_status}" if hosts else "")


async def serve(config: ServerConfig) -> None:
    """Start, serve until SIGTERM or SIGINT, then shut down cleanly."""
    limit_tls_buffers()
    fleet = Fleet(config)
    tune_garbage_collector()
    key, cert = ensure_server_cert(fleet.identity_ca, config.state_dir / "tls",
                                   server_names(config.url, config.listen_host))
    agent_runner = web.AppRunner(create_app(fleet), access_log=None)
    admin_runner = web.AppRunner(admin.create_admin_app(fleet), access_log=None)
    await agent_runner.setup()
    await admin_runner.setup()
    try:
        await web.TCPSite(agent_runner, config.listen_host, config.listen_port,
                          ssl_context=server_context(key, cert, fleet.identity_ca),
                          backlog=1024).start()
        await admin.start_socket(admin_runner, config.admin_socket)
        log.info("virtfleet-server listening on %s:%d (join URL %s), admin socket %s",
                 config.listen_host, config.listen_port, config.url, config.admin_socket)
        notify.ready(f"serving {config.url}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        log.info("shutting down")
        notify.stopping()
    finally:
        await admin_runner.cleanup()
        await agent_runner.cleanup()
        fleet.close()
