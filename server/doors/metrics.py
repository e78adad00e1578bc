"""Prometheus metrics on their own listener (`--metrics-listen`, default 127.0.0.1:9464).

Two kinds, by where the number lives:
- what only a request sees (check-ins, enrollments, refusals) is counted as it happens,
  in `Instruments`, with prometheus_client's counters and histograms;
- what the server already knows (hosts and their status, libvirt links, gateway
  sockets, watchers) is read at scrape time (`StateCollector`), so a forgotten host's
  series are gone with it and nothing is counted twice.

Per-host series carry the host id and hostname only: addresses and error texts come from
hosts and would make the label set unbounded.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.doors.gateway import GatewayCounts
from server.links.manager import LinkCounts
from server.model import HostSummary, LinkState, Status

log = logging.getLogger(__name__)

INSTRUMENTS = "virtfleet.instruments"  # app key on the agent app
# A check-in is served in about a millisecond; a slow one (a full report, a store
# flush) in tens.
CHECKIN_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
ENROLL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Instruments:
    """What the agent port counts as requests come."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.checkins = Counter("virtfleet_checkins", "Check-ins served, by what they carried "
                                "(a heartbeat or a full report)", ["kind"], registry=registry)
        self.checkin_seconds = Histogram("virtfleet_checkin_duration_seconds",
                                         "Time to serve a check-in: its host, its body, the answer",
                                         buckets=CHECKIN_BUCKETS, registry=registry)
        self.enrollments = Counter("virtfleet_enrollments", "Enrollments, by outcome",
                                   ["outcome"], registry=registry)
        self.enroll_seconds = Histogram("virtfleet_enrollment_duration_seconds",
                                        "Time to serve an enrollment (both outcomes)",
                                        buckets=ENROLL_BUCKETS, registry=registry)
        self.refused = Counter("virtfleet_requests_refused", "Agent-port requests answered "
                               "with a 4xx or 5xx, by the error code in the answer",
                               ["reason"], registry=registry)
        # Bound once: a check-in pays no label lookup.
        self.heartbeat = self.checkins.labels("heartbeat")
        self.report = self.checkins.labels("report")

    def checked_in(self, heartbeat: bool, seconds: float) -> None:
        (self.heartbeat if heartbeat else self.report).inc()
        self.checkin_seconds.observe(seconds)

    def enrolled(self, accepted: bool, seconds: float) -> None:
        self.enrollments.labels("accepted" if accepted else "refused").inc()
        self.enroll_seconds.observe(seconds)

    def refusal(self, code: str) -> None:
        self.refused.labels(code).inc()


class HostsView(Protocol):
    def host_summaries(self) -> list[HostSummary]: ...


@dataclass
class State:
    """Where the scrape-time numbers are read."""

    hosts: HostsView
    link_states: Callable[[], Iterable[LinkState]]
    link_counts: LinkCounts
    gateway_counts: Callable[[], GatewayCounts]
    watchers: Callable[[], int]
    refused_connections: Callable[[], dict[str, int]]
    tunnels: Callable[[], tuple[int, int]] = lambda: (0, 0)  # (open, refused so far)


class StateCollector:
    def __init__(self, state: State) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        yield from self._hosts()
        yield from self._links()
        yield from self._gateway()
        watchers = GaugeMetricFamily("virtfleet_engine_watchers",
                                     "Engine API watch streams open")
        watchers.add_metric([], self.state.watchers())
        yield watchers
        refused = CounterMetricFamily("virtfleet_connections_refused", "Agent-port connections "
                                      "closed before a request: over the per-address cap, or "
                                      "no request before the deadline", labels=["reason"])
        for reason, count in self.state.refused_connections().items():
            refused.add_metric([reason], count)
        yield refused
        open_tunnels, refused_tunnels = self.state.tunnels()
        tunnels = GaugeMetricFamily("virtfleet_tunnels_open", "Tunnels hosts keep open to the "
                                    "server (their libvirt connections go through them)")
        tunnels.add_metric([], open_tunnels)
        yield tunnels
        refusals = CounterMetricFamily("virtfleet_tunnels_refused", "Tunnels refused: no "
                                       "certificate, or one no enrolled host has")
        refusals.add_metric([], refused_tunnels)
        yield refusals

    def _hosts(self) -> Iterator[Metric]:
        summaries = self.state.hosts.host_summaries()
        by_group: dict[tuple[str, str], int] = {}
        up = GaugeMetricFamily("virtfleet_host_up", "1 if the host is online (enabled, "
                               "checking in, libvirt connection open)", labels=["host_id", "hostname"])
        status = GaugeMetricFamily("virtfleet_host_status", "The host's status: one series, "
                                   "value 1, labelled with the current one",
                                   labels=["host_id", "hostname", "status"])
        checkin = GaugeMetricFamily("virtfleet_host_last_checkin_timestamp_seconds",
                                    "When the host last checked in (Unix time)",
                                    labels=["host_id", "hostname"])
        for host in summaries:
            by_group[(host.status, host.role)] = by_group.get((host.status, host.role), 0) + 1
            up.add_metric([host.id, host.hostname], 1 if host.status == Status.ONLINE else 0)
            status.add_metric([host.id, host.hostname, host.status], 1)
            if host.last_checkin:
                checkin.add_metric([host.id, host.hostname], host.last_checkin)
        hosts = GaugeMetricFamily("virtfleet_hosts", "Hosts by status and role",
                                  labels=["status", "role"])
        for (status_name, role), count in sorted(by_group.items()):
            hosts.add_metric([status_name, role], count)
        yield from (hosts, up, status, checkin)

    def _links(self) -> Iterator[Metric]:
        counts = self.state.link_counts
        links = GaugeMetricFamily("virtfleet_libvirt_connections", "The server's own libvirt "
                                  "connections, by state", labels=["state"])
        by_state = {str(s): 0 for s in LinkState}
        for state in self.state.link_states():
            by_state[str(state)] += 1
        for state_name, count in by_state.items():
            links.add_metric([state_name], count)
        yield links
        for name, text, value in [
                ("virtfleet_libvirt_opens", "libvirt connections opened", counts.opens),
                ("virtfleet_libvirt_open_failures", "libvirt connection opens that failed",
                 counts.failures),
                ("virtfleet_libvirt_connections_lost", "Open libvirt connections that closed "
                 "and are being reconnected", counts.lost)]:
            yield _counter(name, text, value)

    def _gateway(self) -> Iterator[Metric]:
        counts = self.state.gateway_counts()
        relayed = GaugeMetricFamily("virtfleet_gateway_connections_open",
                                    "Engine connections relayed right now")
        relayed.add_metric([], counts.open)
        yield relayed
        yield _counter("virtfleet_gateway_connections", "Engine connections relayed to a "
                       "host", counts.accepted)
        yield _counter("virtfleet_gateway_connections_refused", "Engine connections closed "
                       "at once (host unreachable, dial failed, too many)", counts.refused)
        moved = CounterMetricFamily("virtfleet_gateway_bytes", "Bytes relayed between "
                                    "engines and hosts", labels=["direction"])
        moved.add_metric(["to_host"], counts.bytes_to_hosts)
        moved.add_metric(["from_host"], counts.bytes_from_hosts)
        yield moved


def _counter(name: str, text: str, value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, text)
    family.add_metric([], value)
    return family


def registry_with_process() -> CollectorRegistry:
    """A registry of the server's own (not the module-global one, so that parts built
    twice in one process, as tests do, do not clash), with the process's CPU, memory,
    file descriptors and garbage collections."""
    registry = CollectorRegistry(auto_describe=True)
    for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


def create_metrics_app(registry: CollectorRegistry, state: State) -> web.Application:
    app = web.Application()

    async def metrics(_request: web.Request) -> web.Response:
        # The state is read here, on the event loop that owns it; only the text is made
        # in a thread (tens of milliseconds at 10,000 hosts).
        families = list(StateCollector(state).collect())
        body = await asyncio.get_running_loop().run_in_executor(None, _render, registry, families)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", metrics)
    return app


def _render(registry: CollectorRegistry, families: list[Metric]) -> bytes:
    snapshot = CollectorRegistry(auto_describe=False)
    snapshot.register(_Fixed(families))
    return generate_latest(registry) + generate_latest(snapshot)


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families

