"""The engine's doors, measured: one libvirt RPC through the gateway vs direct qemu+tls vs
the host's own unix socket (same run, same libvirtd); RPCs per second through one host's
gateway; the server's memory per relayed connection; a status change to a watcher.
Targets (issue 14): the gateway adds < 0.2 ms to a round trip, < 100 KB a connection; a
watcher hears a change within 50 ms."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt

from bench.util import rss_mb, table
from common import libvirt_events
from tests.harness import Agent, Libvirtd, Server, free_port


def median_us(call: Callable[[], Any], count: int) -> float:
    call()  # warm: the first call of a kind may load something
    times = []
    for _ in range(count):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def rate(uri: str, threads: int, seconds: float) -> float:
    """getLibVersion calls per second through `threads` connections at once."""
    counts = [0] * threads
    stop = time.monotonic() + seconds

    def hammer(i: int) -> None:
        conn = libvirt.open(uri)
        try:
            while time.monotonic() < stop:
                conn.getLibVersion()
                counts[i] += 1
        finally:
            conn.close()

    workers = [threading.Thread(target=hammer, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return sum(counts) / seconds


def per_connection_kb(server: Server, uri: str, count: int) -> float:
    assert server.proc.proc is not None
    pid = server.proc.proc.pid
    before = rss_mb(pid)
    conns = [libvirt.open(uri) for _ in range(count)]
    time.sleep(1.0)  # let the server settle its buffers before reading its RSS
    after = rss_mb(pid)
    for conn in conns:
        conn.close()
    return (after - before) * 1024 / count


def watch_latency_ms(server: Server, host_id: str, rounds: int) -> list[float]:
    """Admin disable/enable -> the change on an engine watch, in ms."""
    path = str(server.run_dir / "engine.sock")
    conn = http.client.HTTPConnection("localhost", timeout=30)
    conn.sock = socket.socket(socket.AF_UNIX)
    conn.sock.connect(path)
    listed = json.loads(_get(path, "/v1/hosts"))
    conn.request("GET", f"/v1/hosts?watch=1&since={listed['revision']}")
    resp = conn.getresponse()
    seen: list[tuple[float, str]] = []
    done = threading.Event()

    def follow() -> None:
        with contextlib.suppress(OSError, AttributeError, ValueError):  # closed at the end
            while not done.is_set() and (line := resp.readline()):
                event = json.loads(line)
                if event["type"] != "heartbeat":
                    seen.append((time.perf_counter(), event["host"]["admin_state"]))

    follower = threading.Thread(target=follow, daemon=True)
    follower.start()
    latencies = []
    for i in range(rounds):
        want = "disabled" if i % 2 == 0 else "enabled"
        started = time.perf_counter()
        server.api("POST", f"/v1/hosts/{host_id}/{'disable' if want == 'disabled' else 'enable'}")
        deadline = time.monotonic() + 5
        while not any(state == want and at >= started for at, state in seen):
            if time.monotonic() > deadline:
                raise AssertionError(f"no {want} event within 5 s")
            time.sleep(0.0005)
        at = next(at for at, state in seen if state == want and at >= started)
        latencies.append((at - started) * 1000)
    done.set()
    conn.close()
    follower.join(5)
    return latencies


def _get(path: str, url: str) -> bytes:
    conn = http.client.HTTPConnection("localhost", timeout=10)
    conn.sock = socket.socket(socket.AF_UNIX)
    conn.sock.connect(path)
    conn.request("GET", url)
    body = conn.getresponse().read()
    conn.close()
    return body


def run(quick: bool) -> str:
    calls, seconds, conns, rounds = (300, 2.0, 30, 10) if quick else (3000, 10.0, 200, 40)
    base = Path(tempfile.mkdtemp(prefix="vfb-gateway-"))
    libvirtd = Libvirtd(base / "libvirtd", free_port())
    server = Server(base / "server", free_port(), "--checkin-interval", "2", "--grace", "10")
    agent = Agent(base / "agent", libvirtd.agent_config(), hostname="bench-gw")
    try:
        libvirtd.start()
        server.start()
        assert agent.join(server.token()).returncode == 0
        agent.start()
        host_id = agent.host_id()
        server.wait_status(host_id, "online", 30)
        libvirt_events.start()
        uris = {
            "local unix socket": libvirtd.uri,
            "direct qemu+tls": f"qemu+tls://127.0.0.1:{libvirtd.tls_port}/system"
                               f"?pkipath={server.state / 'libvirt-client'}",
            "gateway": server.gateway_uri(host_id),
        }
        rows, medians = [], {}
        for name, uri in uris.items():
            conn = libvirt.open(uri)
            try:
                medians[name] = (median_us(conn.getLibVersion, calls),
                                 median_us(lambda c=conn: c.listAllDomains(0), calls),
                                 median_us(conn.getCapabilities, max(30, calls // 10)))
            finally:
                conn.close()
        direct = medians["direct qemu+tls"]
        for name, (version, domains, caps) in medians.items():
            rows.append((name, f"{version:.0f}", f"{domains:.0f}", f"{caps:.0f}",
                         f"{version / direct[0]:.2f}×", f"{version - direct[0]:+.0f}"))
        out = table(f"One RPC, median µs ({calls} calls each; same libvirtd)",
                    ["path", "getLibVersion", "listAllDomains", "getCapabilities (~50 KB)",
                     "vs direct", "added µs"], rows)
        one, four = rate(uris["gateway"], 1, seconds), rate(uris["gateway"], 4, seconds)
        kb = per_connection_kb(server, uris["gateway"], conns)
        latency = watch_latency_ms(server, host_id, rounds)
        out += table("Through one host's gateway", ["what", "value"], [
            ("getLibVersion/s, 1 connection", f"{one:.0f}"),
            ("getLibVersion/s, 4 connections", f"{four:.0f}"),
            (f"server RSS per relayed connection ({conns} open)", f"{kb:.0f} KB"),
            (f"status change -> watcher, median / max of {rounds}",
             f"{statistics.median(latency):.1f} / {max(latency):.1f} ms"),
        ])
        return out
    finally:
        agent.stop()
        server.proc.stop()
        libvirtd.stop()
