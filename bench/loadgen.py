"""Load generator: simulated hosts checking in the way the agent does, cheaply.

What the server sees is what an agent sends: each simulated host has its own identity
(key and certificate), keeps one mTLS connection alive between check-ins, and POSTs the
agent's check-in body every interval the server answers: the full report (common/wire.py's
CheckinRequest around a report built once by the agent's real collectors,
bench/report.py) first, every REPORT_REFRESH seconds and whenever the server asks for it,
a heartbeat with the server's digest of it otherwise; after a failure it waits the
agent's jittered backoff (1 s doubling to 60 s, at least what a Retry-After says), 300 s
when its identity is refused, with the agent's timeouts, and after a connection that
got no answer at a random moment of the server's reconnect window. `--full-reports`: every
check-in carries the report, as agents of protocol 2 and older do.

What it skips is the agent's HTTP client machinery: the request bytes are built once per
host and the answer is read by a small asyncio protocol. An aiohttp client per host cost
as much CPU per check-in as the server itself, and this machine's two cores are shared:
the load generator must not be what is measured.

Usage: loadgen.py URL IDENTITIES FIRST COUNT START SCHEDULE [--full-reports]
  START: the hosts start at random moments within this many seconds.
  SCHEDULE: "INTERVAL:SECONDS,INTERVAL:SECONDS,…": each host comes back when the server
  tells it (interval 0), or when the server would tell it with that interval (each host
  at its own moment of it: a fixed delay would keep hosts that one stall bunched
  together in a wave that comes back every interval); SIGUSR2 ends the current step early.
  Prints one JSON line per second: step, ok, errors (by kind), latencies (ms), and
  `recovered`: hosts with a successful check-in since the last SIGUSR1 (the mark).
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
import signal
import ssl
import sys
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlsplit

from agent.checkin import REPORT_REFRESH, retry_delay
from agent.client import ServerError
from agent.state import client_context
from bench.report import simulated_report
from common import wire
from common.backoff import Backoff
from common.tls import limit_tls_buffers
from server.fleet import checkin_delay
from server.tls import TLS_READ_BUFFER

CONNECT_TIMEOUT = 10.0  # the agent's (agent/client.py)
TOTAL_TIMEOUT = 20.0
REFUSED_WAIT = 300.0  # the agent's wait when the server refuses its identity
MAX_RETRY_AFTER = 300.0


class Stats:
    """What happened in the current second; flushed as one JSON line."""

    def __init__(self) -> None:
        self.step = 0
        self.mark = time.time()
        self.last_ok: dict[int, float] = {}
        self.reset()

    def reset(self) -> None:
        self.latencies: list[float] = []
        self.errors: Counter[str] = Counter()

    def line(self) -> str:
        recovered = sum(1 for t in self.last_ok.values() if t >= self.mark)
        text = json.dumps({"t": time.time(), "step": self.step, "ok": len(self.latencies),
                           "errors": dict(self.errors), "recovered": recovered,
                           "lat": [round(x, 2) for x in self.latencies]})
        self.reset()
        return text


class Answer(Exception):
    """A complete HTTP answer that is not a 200."""

    def __init__(self, status: int, retry_after: float) -> None:
        super().__init__(f"HTTP {status}")
        self.status, self.retry_after = status, retry_after


class Connection(asyncio.Protocol):
    """One host's kept-alive TLS connection: write a request, wait for its whole answer."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.answer: asyncio.Future[bytes] | None = None
        self.open = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.open = True

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(ConnectionError("Server disconnected"))

    def eof_received(self) -> None:
        """The server ended the connection (as it does when it shuts down). The agent's
        client sees that before its next call and opens a new connection: so does this.
        (Ignored, the next request waited for an answer until its 20 s timeout.)"""
        self.connection_lost(None)
        if self.transport is not None:
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.answer is None or self.answer.done():
            return
        head = bytes(self.buffer[:end]).decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in head[1:])}
        length = int(headers.get("content-length", "0"))
        if len(self.buffer) < end + 4 + length:
            return
        body = bytes(self.buffer[end + 4:end + 4 + length])
        del self.buffer[:end + 4 + length]
        status = int(head[0].split()[1])
        if status == 200:
            self.answer.set_result(body)
        else:
            wait = headers.get("retry-after", "")
            self.answer.set_exception(
                Answer(status, min(float(wait), MAX_RETRY_AFTER) if wait.isdigit() else 0.0))

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.open = False

    async def request(self, data: bytes) -> bytes:
        assert self.transport is not None
        self.answer = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self.answer


def request_bytes(url: str, body: dict[str, object]) -> bytes:
    """The agent's check-in POST, as it goes on the wire (http.client's headers)."""
    data = json.dumps(body).encode()
    host = urlsplit(url).netloc
    return (f"POST {wire.CHECKIN_PATH} HTTP/1.1\r\nHost: {host}\r\n"
            "Accept-Encoding: identity\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


def report_request(url: str, report: wire.Report) -> bytes:
    return request_bytes(url, wire.to_json(wire.CheckinRequest(report=report)))


def heartbeat_request(url: str, digest: str) -> bytes:
    return request_bytes(url, {"report_digest": digest, "protocol": wire.PROTOCOL_VERSION})


def error_kind(exc: BaseException) -> str:
    """Group errors by what went wrong, not by their exact text."""
    if isinstance(exc, Answer):
        return str(exc)
    if isinstance(exc, TimeoutError):
        return "Timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "Connection refused"
    if isinstance(exc, ssl.SSLError):
        return "TLS"
    return type(exc).__name__


class Host:
    """One simulated host: its TLS identity, its request, its connection."""

    def __init__(self, i: int, url: str, ctx: ssl.SSLContext, report: bytes,
                 heartbeats: bool) -> None:
        self.i, self.url, self.ctx, self.report, self.heartbeats = i, url, ctx, report, heartbeats
        self.heartbeat: bytes | None = None  # with the digest of the last report acknowledged
        self.reported_at = 0.0
        self.window = 0.0  # the server's reconnect window, from its last answer
        self.key = f"sim-{i}"  # its moment in an interval, as the server's for a host id
        parts = urlsplit(url)
        self.address, self.port = parts.hostname or "", parts.port or 443
        # Each host from its own loopback address, as real hosts come from their own: the
        # server caps connections per source address.
        self.source = (f"127.3.{i // 250 % 256}.{i % 250 + 1}", 0)
        self.conn: Connection | None = None

    async def checkin(self) -> float:
        """One check-in within the agent's timeouts (and the full report at once when the
        server asks for it); returns the interval it was told."""
        fresh = time.monotonic() - self.reported_at < REPORT_REFRESH
        answer = await self.call(self.heartbeat if self.heartbeat and fresh else self.report)
        if answer.get("send_report"):
            answer = await self.call(self.report)
        return float(answer["checkin_interval"])

    async def call(self, data: bytes) -> dict[str, object]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + TOTAL_TIMEOUT
        if self.conn is None or not self.conn.open:
            _, self.conn = await asyncio.wait_for(
                loop.create_connection(Connection, self.address, self.port, ssl=self.ctx,
                                       local_addr=self.source),
                CONNECT_TIMEOUT)
        try:
            body = await asyncio.wait_for(self.conn.request(data), deadline - loop.time())
        except BaseException:
            self.conn.close()  # the agent's client, too, drops a connection that failed
            raise
        answer: dict[str, object] = json.loads(body)
        self.window = float(answer.get("reconnect_window") or 0)  # type: ignore[arg-type]
        if data is self.report and self.heartbeats and answer.get("report_digest"):
            self.heartbeat = heartbeat_request(self.url, str(answer["report_digest"]))
            self.reported_at = time.monotonic()
        return answer

    async def loop(self, stats: Stats, interval: list[float], start: float) -> None:
        """agent/runner.py's check-in loop, minus collectors and status files."""
        backoff = Backoff(base=1.0, cap=60.0)
        await asyncio.sleep(random.random() * start)  # hosts start at random times
        while True:
            started = time.perf_counter()
            try:
                told = await self.checkin()
            except Answer as exc:
                stats.errors[error_kind(exc)] += 1
                delay = REFUSED_WAIT if exc.status in (401, 403) else backoff.next_delay(exc.retry_after)
            except (TimeoutError, OSError, ValueError, KeyError) as exc:
                stats.errors[error_kind(exc)] += 1
                delay = retry_delay(backoff, ServerError(str(exc)), self.window)
            else:
                stats.latencies.append((time.perf_counter() - started) * 1000)
                stats.last_ok[self.i] = time.time()
                backoff.reset()
                delay = checkin_delay(self.key, time.time(), interval[0]) if interval[0] else told
            await asyncio.sleep(delay)


async def run(url: str, identities: Path, first: int, count: int, start: float,
              schedule: list[tuple[float, float]], base: wire.Report, heartbeats: bool) -> None:
    stats = Stats()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, lambda: setattr(stats, "mark", time.time()))
    interval = [schedule[0][0]]
    tasks = []
    for i in range(first, first + count):
        report = wire.Report(**{**vars(base), "hostname": f"sim-{i:05d}"})
        ctx = client_context(identities / "ca.crt", identities / f"{i}.pem")  # the agent's own
        host = Host(i, url, ctx, report_request(url, report), heartbeats)
        tasks.append(asyncio.create_task(host.loop(stats, interval, start)))
    # The collector's pauses would count as the server's latency: the hosts made above
    # live for the whole run, so keep the collector off them and rare.
    gc.freeze()
    gc.set_threshold(100_000, 50, 1000)
    advance = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR2, advance.set)
    print(json.dumps({"ready": count}), flush=True)
    for step, (step_interval, seconds) in enumerate(schedule):
        stats.step, interval[0] = step, step_interval
        advance.clear()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and not advance.is_set():
            await asyncio.sleep(1.0 - time.time() % 1.0)  # lines on whole seconds
            print(stats.line(), flush=True)
    for task in tasks:
        task.cancel()


def main() -> int:
    url, identities, first, count, start, schedule = sys.argv[1:7]
    heartbeats = "--full-reports" not in sys.argv[7:]
    steps = [(float(a), float(b)) for a, b in (s.split(":") for s in schedule.split(","))]
    limit_tls_buffers(TLS_READ_BUFFER)  # 256 KiB per connection otherwise: 5,000 hosts held 1.2 GB
    base = simulated_report()  # before our loop: it runs the collectors in one of its own
    asyncio.run(run(url, Path(identities), int(first), int(count), float(start), steps, base,
                    heartbeats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
