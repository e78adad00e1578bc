"""The server's parts on their own: the status rule, the store, history, the link
manager's state machine (with a fake opener) and the opener's bounds, the supervisor."""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from common import wire
from common.relay import Relay
from server import main as server_main_mod
from server import memory, replicas
from server.cli import build_parser as server_parser
from server.cli import main as server_main
from server.config import ServerConfig, unreachable_url_problem
from server.doors.guard import ConnectionGuard
from server.fleet import checkin_delay
from server.hosts import derive
from server.links.direct import DialError, Target, dial
from server.links.manager import LinkManager, reported_kvm_problem
from server.links.opener import LibvirtOpener, Needs, OpenError, OpenLink
from server.links.routes import Routes
from server.links.tunnels import Tunnels
from server.memory import GC_GROWTH, full_collection_due
from server.model import Connection, Host, LinkState, Status
from server.ratelimit import RateLimiter
from server.replicas import assign
from server.store import StoreUnavailable
from tests.harness import until


def report(ok: bool = True, endpoint: bool = True, role: str = "mixed",
           facts: dict[str, Any] | None = None) -> wire.Report:
    return wire.Report(hostname="hv", role=role, agent_version="1",
                       libvirtd=wire.LibvirtdHealth(ok=ok, error=None if ok else "socket gone"),
                       libvirt_endpoint=wire.LibvirtEndpoint(host="hv", port=1) if endpoint else None,
                       facts=facts or {})


def make_host(rep: wire.Report | None = None, **kw: Any) -> Host:
    base: dict[str, Any] = dict(
        id="h1", hostname="hv", admin_state="enabled", configured_role="mixed",
        role_override=None, role_limit="mixed", status="online", detail="", status_since=0,
        enrolled_at=0, last_checkin=100, address="10.0.0.1", agent_version="1", token_jti="t1")
    host = Host(**(base | kw))
    rep = rep or report(role=host.configured_role)
    host.take_report(rep)
    return host


ONLINE = Connection(LinkState.ONLINE, "open")


def test_status_derivation_precedence() -> None:
    assert derive(make_host(admin_state="disabled"), 100, 100, 30, ONLINE)[0] == Status.DISABLED
    assert derive(make_host(admin_state="pending"), 100, 100, 30, ONLINE)[0] == Status.PENDING
    assert derive(make_host(), 200, 100, 30, None)[0] == Status.OFFLINE
    status, detail = derive(make_host(report(ok=False)), 100, 100, 30, ONLINE)
    assert status == Status.ERROR and "libvirtd is down on the host: socket gone" in detail
    assert derive(make_host(report(endpoint=False)), 100, 100, 30, None)[0] == Status.CONNECTING
    assert derive(make_host(), 100, 100, 30, ONLINE) == (Status.ONLINE, "open")
    assert derive(make_host(), 100, 100, 30, None)[0] == Status.CONNECTING


def test_a_silent_agent_with_its_connection_still_open_is_online_with_a_warning() -> None:
    status, detail = derive(make_host(), 200, 100, 30, ONLINE)
    assert status == Status.ONLINE and "warning: the agent has not checked in since" in detail
    lost = Connection(LinkState.ERROR, "libvirt connection lost")
    assert derive(make_host(), 200, 100, 30, lost)[0] == Status.OFFLINE


def test_a_role_beyond_the_token_is_an_error_that_says_what_to_change() -> None:
    host = make_host(report(role="mixed"), configured_role="hypervisor", role_limit="hypervisor")
    status, detail = derive(host, 100, 100, 30, ONLINE)
    assert status == Status.ERROR and "role mixed, beyond what its join token allows" in detail
    assert "agent.toml" in detail


def test_reported_kvm_problem_takes_any_shape() -> None:
    problem = {"kvm": {"ok": True, "data": {"problem": "disabled in the BIOS"}}}
    assert reported_kvm_problem(problem) == "disabled in the BIOS"
    for odd in ({}, {"kvm": "x"}, {"kvm": {"data": [1]}}, {"kvm": {"data": {"problem": 5}}}):
        assert reported_kvm_problem(odd) == ""


def test_rate_limiter_allows_bursts_then_refills() -> None:
    limiter = RateLimiter(rate=1.0)
    assert limiter.allow("a", 0) and limiter.allow("a", 0)
    assert not limiter.allow("a", 0)
    assert limiter.allow("b", 0)
    assert limiter.allow("a", 1.0)
    assert limiter.retry_after("a") == 1


def test_shared_options_work_before_and_after_the_command() -> None:
    assert server_parser().parse_args(["serve", "--state-dir", "/s"]).state_dir == Path("/s")
    args = server_parser().parse_args(["--state-dir", "/a", "hosts", "list", "--json"])
    assert args.state_dir == Path("/a") and args.json
    args = server_parser().parse_args(["--state-dir", "/a", "--json", "hosts", "show", "x"])
    assert args.state_dir == Path("/a") and args.json  # not reset by the command's own defaults


# -- the store ----------------------------------------------------------------


def test_a_full_garbage_collection_is_due_once_memory_grew_and_settled() -> None:
    assert not full_collection_due(grown=0, growing=0)  # however long it has been
    assert full_collection_due(grown=GC_GROWTH, growing=0)
    assert not full_collection_due(grown=GC_GROWTH, growing=GC_GROWTH // 2)  # a storm
    assert not full_collection_due(grown=-GC_GROWTH, growing=0)  # shrinking is no reason


class FakeTransport:
    def __init__(self, address: str) -> None:
        self.address, self.aborted = address, False

    def get_extra_info(self, name: str) -> Any:
        return (self.address, 4000) if name == "peername" else None

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.aborted


def test_the_connection_guard_forgets_every_connection_it_released() -> None:
    async def run() -> ConnectionGuard:
        guard = ConnectionGuard(max_per_address=2, first_request_timeout=60)
        a, b, c, d = (FakeTransport(ip) for ip in ("10.0.0.1", "10.0.0.1", "10.0.0.1", "10.0.0.2"))
        admitted = [guard.admit(t) for t in (a, b, c, d)]  # type: ignore[arg-type]
        assert admitted == [True, True, False, True] and c.aborted  # the third was past the cap
        guard.served(b)  # type: ignore[arg-type]
        for t in (a, b, c, d):
            guard.release(t)  # type: ignore[arg-type]
        assert guard.admit(FakeTransport("10.0.0.1"))  # type: ignore[arg-type]  # room again
        return guard

    guard = asyncio.run(run())
    assert dict(guard.per_address) == {"10.0.0.1": 1} and len(guard._address) == 1
    assert not guard._served


def test_hosts_arriving_together_are_spread_over_the_interval_by_their_next_checkin() -> None:
    now, interval = 1_000.0, 10.0
    ids = [secrets.token_hex(6) for _ in range(2000)]
    delays = [checkin_delay(host_id, now, interval) for host_id in ids]
    assert all(interval / 2 <= d < 1.5 * interval for d in delays)
    # The next check-ins land evenly: no second of the interval gets twice its share.
    per_second = Counter(int((now + d) % interval) for d in delays)
    assert len(per_second) == 10 and max(per_second.values()) < 2 * len(ids) / 10
    # A host keeps its moment: checking in again at the time it was given, it is told a
    # whole interval.
    first = checkin_delay(ids[0], now, interval)
    assert checkin_delay(ids[0], now + first, interval) == pytest.approx(interval)


def test_serve_refuses_a_grace_period_shorter_than_two_intervals(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = server_main(["serve", "--state-dir", str(tmp_path), "--checkin-interval", "10s",
                        "--grace", "15s"])
    assert code != 0
    assert "--grace (15 s) must be at least twice --checkin-interval (10 s)" in capsys.readouterr().err
    assert not (tmp_path / "state.db").exists()  # refused before anything was made


# -- the link manager, with a fake opener ------------------------------------------


class FakeConn:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True

    def unregisterCloseCallback(self) -> None:  # noqa: N802 (libvirt's name)
        pass


class FakeOpener:
    """Opens as told: `plan` is a list of "fail", "unreachable" (nothing answers at the
    TLS port), "hang" or "ok", one per attempt; `targets` are the ones it was asked for."""

    def __init__(self, plan: list[str]) -> None:
        self.plan = plan
        self.attempts = 0
        self.opened: list[OpenLink] = []
        self.closed: list[OpenLink] = []
        self.targets: list[Target] = []

    async def open(self, target: Target, needs: Needs) -> OpenLink:
        step = self.plan[min(self.attempts, len(self.plan) - 1)]
        self.attempts += 1
        self.targets.append(target)
        if step == "fail":
            raise OpenError(f"connection refused at {target.where}")
        if step == "unreachable":
            raise OpenError(f"no answer from libvirtd at {target.where}", dial_failed=True)
        if step == "hang":
            await asyncio.Event().wait()
        link = OpenLink(conn=FakeConn(), relay=None, uri=f"qemu+tls://{target.where}/system",  # type: ignore[arg-type]
                        remote_version="9.0.0", serial="a1")
        self.opened.append(link)
        return link

    async def close(self, link: OpenLink) -> None:
        link.conn.close()
        self.closed.append(link)


def run_manager(plan: list[str], scenario: Any,
                host: Host | None = None) -> tuple[FakeOpener, list[Connection]]:
    """Run `scenario(manager, states, host)` against a manager with a fake opener (and the
    real routes, over tunnels that a test fakes by what it puts in `tunnels.links`)."""
    opener = FakeOpener(plan)
    host = host or make_host(libvirt_cert_serial="a1")
    seen: list[Connection] = []
    states: dict[str, Connection] = {}

    async def main() -> None:
        routes = Routes(Tunnels(lambda _serial: host, on_change=lambda _id: None))
        manager = LinkManager(opener, routes, lambda _id: host, states,
                              on_change=lambda hid: seen.append(states[hid]) if hid in states else None)
        manager.start([host])
        try:
            await scenario(manager, states, host)
        finally:
            await manager.stop()

    asyncio.run(asyncio.wait_for(main(), 10))
    return opener, seen


def online_conn(manager: LinkManager, states: dict[str, Connection], host_id: str) -> Any:
    """The host's open connection while its link is online, else None."""
    link, state = manager.links.get(host_id), states.get(host_id)
    if link is None or link.opened is None or state is None or state.state != LinkState.ONLINE:
        return None
    return link.opened.conn


def test_a_failed_open_is_an_error_and_libvirtd_back_retries_at_once() -> None:
    async def scenario(manager: LinkManager, states: dict[str, Connection], host: Host) -> None:
        await until(lambda: states.get("h1", ONLINE).state == LinkState.ERROR, "the error")
        assert "connection refused" in states["h1"].detail
        manager.host_changed("h1", libvirtd_recovered=True, host=host)  # cuts the 1 s backoff
        await until(lambda: states["h1"].state == LinkState.ONLINE, "online", timeout=0.5)

    opener, seen = run_manager(["fail", "ok"], scenario)
    assert [s.state for s in seen] == [LinkState.CONNECTING, LinkState.ERROR,
                                       LinkState.CONNECTING, LinkState.ONLINE]
    assert opener.closed == opener.opened  # stop() closed the open link


def test_a_closed_link_is_reported_lost_and_reopened() -> None:
    async def scenario(manager: LinkManager, states: dict[str, Connection], host: Host) -> None:
        await until(lambda: online_conn(manager, states, "h1") is not None, "online")
        first = manager.links["h1"].opened
        assert first is not None
        first.close_reason = "no keepalive answer"
        first.closed.set()
        await until(lambda: online_conn(manager, states, "h1") not in (None, first.conn), "reopened")

    opener, seen = run_manager(["ok"], scenario)
    assert len(opener.opened) == 2 and opener.closed[0] is opener.opened[0]
    lost = [s for s in seen if s.state == LinkState.ERROR]
    assert len(lost) == 1 and "libvirt connection lost: no keepalive answer" in lost[0].detail


def tunnel_up(manager: LinkManager, host: Host) -> None:
    """As if the host's agent opened its tunnel (links/tunnels.py), and the server was told."""
    routes = manager.ways
    assert isinstance(routes, Routes)
    routes.tunnels.links[host.id] = object()  # type: ignore[assignment]
    manager.host_changed(host.id, libvirtd_recovered=True, host=host)


def test_a_tunnel_host_waits_for_its_tunnel_then_opens_through_it() -> None:
    async def scenario(manager: LinkManager, states: dict[str, Connection], host: Host) -> None:
        await until(lambda: "h1" in states, "a state")
        assert states["h1"].state == LinkState.CONNECTING
        assert "waiting for the host's agent to open its tunnel" in states["h1"].detail
        tunnel_up(manager, host)
        await until(lambda: online_conn(manager, states, "h1") is not None, "online")

    host = make_host(report(endpoint=False), transport="tunnel")
    opener, _ = run_manager(["ok"], scenario, host)
    assert [t.tunnel for t in opener.targets] == [True]  # never dialled directly


def test_an_auto_host_whose_tls_port_does_not_answer_turns_to_its_tunnel() -> None:
    async def scenario(manager: LinkManager, states: dict[str, Connection], host: Host) -> None:
        await until(lambda: "h1" in states and "waiting" in states["h1"].detail, "the wait")
        assert states["h1"].state == LinkState.CONNECTING  # not an error: it is on its way
        assert "direct was tried: no answer from libvirtd" in states["h1"].detail
        tunnel_up(manager, host)
        await until(lambda: online_conn(manager, states, "h1") is not None, "online")

    host = make_host(libvirt_cert_serial="a1", transport="auto")
    opener, _ = run_manager(["unreachable", "ok"], scenario, host)
    assert [t.tunnel for t in opener.targets] == [False, True]


def test_an_auto_host_whose_libvirt_fails_once_reached_stays_direct_and_shows_the_error() -> None:
    async def scenario(manager: LinkManager, states: dict[str, Connection], host: Host) -> None:
        await until(lambda: states.get("h1", ONLINE).state == LinkState.ERROR, "the error")
        assert "connection refused" in states["h1"].detail

    host = make_host(libvirt_cert_serial="a1", transport="auto")
    opener, _ = run_manager(["fail"], scenario, host)
    assert {t.tunnel for t in opener.targets} == {False}


def test_an_auto_host_once_reached_directly_shows_its_failures_and_stays_direct() -> None:
    async def scenario(manager: LinkManager, states: dict[str, Connection], host: Host) -> None:
        routes = manager.ways
        assert isinstance(routes, Routes)
        routes.direct_worked.add(host.id)  # as a direct dial that worked does (Routes.dial)
        await until(lambda: states.get("h1", ONLINE).state == LinkState.ERROR, "the error")
        assert "no answer from libvirtd" in states["h1"].detail
        assert not routes.via_tunnel(host)

    host = make_host(libvirt_cert_serial="a1", transport="auto")
    opener, _ = run_manager(["unreachable"], scenario, host)
    assert {t.tunnel for t in opener.targets} == {False}


def test_a_lost_tunnel_is_an_error_until_the_agent_opens_it_again() -> None:
    async def scenario(manager: LinkManager, states: dict[str, Connection], host: Host) -> None:
        tunnel_up(manager, host)
        await until(lambda: online_conn(manager, states, "h1") is not None, "online")
        routes = manager.ways
        assert isinstance(routes, Routes)
        del routes.tunnels.links["h1"]
        routes.tunnels.last_closed["h1"] = "no answer from the peer for 7 s"
        first = manager.links["h1"].opened
        assert first is not None
        first.close_reason = "no keepalive answer"
        first.closed.set()
        await until(lambda: "tunnel closed" in states["h1"].detail, "the tunnel's loss shown")
        assert states["h1"].state == LinkState.ERROR
        assert "no answer from the peer for 7 s" in states["h1"].detail
        tunnel_up(manager, host)
        await until(lambda: online_conn(manager, states, "h1") not in (None, first.conn), "back")

    host = make_host(report(endpoint=False), transport="tunnel")
    opener, _ = run_manager(["ok"], scenario, host)
    assert len(opener.opened) == 2


def test_disabling_a_host_while_its_open_hangs_stops_at_once() -> None:
    async def scenario(manager: LinkManager, states: dict[str, Connection], host: Host) -> None:
        await until(lambda: states.get("h1") is not None, "connecting")
        hung = manager.links["h1"].task
        assert hung is not None
        host.admin_state = "disabled"  # type: ignore[assignment]
        manager.host_changed("h1", host=host)
        assert not manager.links and "h1" not in states  # dropped: nothing shows it connecting
        # The hung open's task ends at once: cancelled, not waiting for its open.
        await asyncio.wait_for(asyncio.gather(hung, return_exceptions=True), 0.1)
        assert hung.cancelled()

    opener, _ = run_manager(["hang"], scenario)
    assert opener.attempts == 1 and opener.opened == []


def test_a_host_that_is_not_ready_costs_no_task() -> None:
    async def scenario(manager: LinkManager, states: dict[str, Connection], host: Host) -> None:
        manager.host_changed("h2", host=make_host(report(endpoint=False), id="h2"))
        assert manager.links["h2"].task is None and "h2" not in states
        await until(lambda: online_conn(manager, states, "h1") is not None, "h1 online")

    run_manager(["ok"], scenario)


# -- the opener's bounds, with a fake dial and a fake libvirt open ---------------------


async def socket_stream() -> tuple[Any, socket.socket]:
    """A stream to a peer that never says anything (the other end is returned)."""
    ours, theirs = socket.socketpair()
    return await asyncio.open_connection(sock=ours), theirs


class SilentDial:
    """A dial whose host never says anything; `close()` hangs up every such host."""

    def __init__(self) -> None:
        self.peers: list[socket.socket] = []

    async def __call__(self, target: Target, ctx: Any) -> Any:
        stream, peer = await socket_stream()
        self.peers.append(peer)
        return stream, "a1"

    def close(self) -> None:
        for peer in self.peers:
            peer.close()


def test_an_open_that_succeeds_after_its_deadline_is_closed_and_the_slot_comes_back(
        tmp_path: Path) -> None:
    release = threading.Event()
    late = FakeConn()
    dial = SilentDial()

    def slow_open(uri: str) -> Any:
        path = uri.split("socket=", 1)[1]
        with socket.socket(socket.AF_UNIX) as client:  # libvirt would connect, then block
            client.connect(path)
            release.wait(5)
        return late


    async def main() -> None:
        opener = LibvirtOpener(None, tmp_path / "links", max_opens=1,  # type: ignore[arg-type]
                               open_timeout=0.2, dial=dial,
                               libvirt_open=slow_open)
        target = Target("h1", "10.0.0.1", 1, ("a1",))
        try:
            with pytest.raises(OpenError, match="did not complete opening"):
                await opener.open(target, Needs("disk_operations"))
            with pytest.raises(OpenError, match="has not returned yet"):
                await opener.open(target, Needs("disk_operations"))  # one in flight per host
            release.set()
            await until(lambda: late.closed, "the late connection to be closed")
            assert opener._slots._value == 1  # the slot is back
        finally:
            opener.stop()

    asyncio.run(main())
    dial.close()


def test_opens_in_flight_are_bounded_over_all_hosts(tmp_path: Path) -> None:
    running, most = 0, 0
    lock = threading.Lock()
    gate = threading.Event()

    def counting_open(uri: str) -> Any:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        gate.wait(5)
        with lock:
            running -= 1
        raise __import__("libvirt").libvirtError("refused by the fake")

    dial = SilentDial()

    async def main() -> None:
        opener = LibvirtOpener(None, tmp_path / "links", max_opens=3,  # type: ignore[arg-type]
                               open_timeout=5, dial=dial,
                               libvirt_open=counting_open)
        try:
            attempts = [asyncio.create_task(opener.open(Target(f"h{i}", "10.0.0.1", 1, ("a1",)),
                                                        Needs("disk_operations")))
                        for i in range(10)]
            await until(lambda: most == 3, "three opens running")
            # The other seven wait for a slot, not for a thread: every slot is taken and
            # none of them has finished.
            assert opener._slots.locked() and not any(a.done() for a in attempts)
            assert most == 3
            gate.set()
            results = await asyncio.gather(*attempts, return_exceptions=True)
            assert all(isinstance(r, OpenError) for r in results)
        finally:
            opener.stop()

    asyncio.run(main())
    dial.close()


def test_a_port_that_accepts_and_never_answers_costs_a_timer_not_a_thread() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        started = time.monotonic()
        with pytest.raises(DialError, match="no answer from libvirtd at 127.0.0.1:.* within 0.3 s"):
            asyncio.run(dial(Target("h1", "127.0.0.1", port, ("a1",)), __import__("ssl")
                             .create_default_context(), timeout=0.3))
        assert time.monotonic() - started < 2
        assert threading.active_count() < 10


async def writable(sock: socket.socket, timeout: float) -> bool:
    """Whether `sock` can take more bytes within `timeout` seconds."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_writer(sock, lambda: ready.done() or ready.set_result(None))
    try:
        await asyncio.wait_for(ready, timeout)
        return True
    except TimeoutError:
        return False
    finally:
        loop.remove_writer(sock)


def test_the_relay_holds_back_a_fast_writer_for_a_slow_reader() -> None:
    async def main() -> int:
        client, client_peer = await socket_stream()
        upstream, upstream_peer = await socket_stream()
        relay = Relay(client=client, upstream=upstream)
        task = asyncio.create_task(relay.run())
        upstream_peer.setblocking(False)
        chunk = b"x" * 65536
        sent = 0
        for _ in range(400):  # the host sends up to 25 MiB; the client never reads
            try:
                sent += upstream_peer.send(chunk)
            except BlockingIOError:
                if not await writable(upstream_peer, 0.5):
                    break  # held back: the relay stopped taking the host's bytes
        relayed = relay.received
        relay.close()
        await task
        client_peer.close()
        upstream_peer.close()
        assert sent < 25 * 2**20, "the host's writes were never held back"
        return relayed

    assert asyncio.run(main()) < 8 * 2**20  # what the relay took in: bounded by buffers


# -- the process -------------------------------------------------------------------


def test_the_server_exits_non_zero_naming_a_background_task_that_died(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    async def broken() -> None:
        raise RuntimeError("collector broke")

    monkeypatch.setattr(memory, "collect_garbage_forever", broken)
    monkeypatch.setattr(memory, "tune_garbage_collector", lambda: None)
    config = ServerConfig(state_dir=tmp_path / "s", listen_host="127.0.0.1", listen_port=0,
                          run_dir=tmp_path / "run", metrics_listen=None)
    code = asyncio.run(asyncio.wait_for(server_main_mod.serve(config), 20))
    assert code == 1
    assert "background task garbage-collector stopped: RuntimeError('collector broke')" in caplog.text


def test_a_join_url_only_this_machine_can_reach_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("socket.getfqdn", lambda: "localhost")  # /etc/hosts: name -> 127.0.0.1
    code = server_main(["serve", "--state-dir", str(tmp_path), "--listen", "0.0.0.0:8443"])
    err = capsys.readouterr().err
    assert code == 1 and "https://localhost:8443, which names this machine's loopback" in err
    assert "--advertise-url" in err and not (tmp_path / "state.db").exists()
    # Listening on loopback only, a loopback URL is right.
    assert unreachable_url_problem(ServerConfig(listen_host="127.0.0.1")) == ""
    assert unreachable_url_problem(ServerConfig(listen_host="0.0.0.0",
                                                advertise_url="https://vdi.example.org:8443")) == ""


def test_replicas_share_hosts_evenly_and_a_replica_joining_moves_few() -> None:
    hosts = [f"host-{i:03d}" for i in range(100)]
    two = assign(hosts, ["a", "b"], {}, {})
    assert Counter(two.values()) == {"a": 50, "b": 50}
    assert assign(hosts, ["b", "a"], {}, {}) == two  # the same answer at every replica
    three = assign(hosts, ["a", "b", "c"], {}, two)
    assert sorted(Counter(three.values()).values()) == [33, 33, 34]
    moved = [h for h in hosts if two[h] != three[h]]
    assert all(three[h] == "c" for h in moved) and len(moved) == Counter(three.values())["c"]
    back = assign(hosts, ["a", "b"], {}, three)  # c left: only its hosts move
    assert Counter(back.values()) == {"a": 50, "b": 50}
    assert all(back[h] == three[h] for h in hosts if three[h] != "c")
    pinned = assign(hosts, ["a", "b"], {"host-007": "b", "host-008": "gone"}, {})
    assert pinned["host-007"] == "b" and pinned["host-008"] in ("a", "b")
    assert assign(hosts, [], {}, {}) == {}
    few = assign(hosts[:4], ["a", "b", "c"], {}, {"host-000": "a", "host-001": "a",
                                                  "host-002": "b", "host-003": "b"})
    assert sorted(Counter(few.values()).values()) == [1, 1, 2]  # a newcomer gets its share


def test_a_replica_whose_lease_rounds_fail_gives_its_hosts_up_before_the_leases_run_out(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A database that refuses at once (not only one that hangs): the hosts go before
    another replica could take them, not at the next regular round."""
    # The real ones (2 s, 6 s, 1.5 s) divided by 5: rounds at 0, 0.4, 0.8, 1.2 s; the
    # leases run out at 1.2 s.
    monkeypatch.setattr(replicas, "RENEW_EVERY", 0.4)
    monkeypatch.setattr(replicas, "LEASE_TTL", 1.2)
    monkeypatch.setattr(replicas, "MARGIN", 0.3)
    given_up: list[tuple[float, list[str]]] = []
    store = SimpleNamespace(db=SimpleNamespace(url="postgresql://nowhere/none"))
    leases = replicas.Leases(store, "r1", "https://r1:8443", set,  # type: ignore[arg-type]
                             server_main_mod.nothing_yet,
                             lambda ids: given_up.append((time.monotonic(), ids)))

    def refused(_sent: float, _tunnels: set[str]) -> replicas.Tick:
        raise StoreUnavailable("the database refuses")

    leases._tick = refused  # type: ignore[method-assign]

    async def run() -> None:
        leases.owned, leases.renewed_at = {"h1": 1}, time.monotonic()
        task = asyncio.create_task(leases.run_forever())
        await until(lambda: given_up, "the hosts given up", timeout=3)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    started = time.monotonic()
    asyncio.run(run())
    assert [ids for _at, ids in given_up] == [["h1"]] and not leases.owned
    assert given_up[0][0] - started < 1.2
