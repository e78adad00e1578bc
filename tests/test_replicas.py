"""Several `virtfleet-server serve --database` replicas on one real PostgreSQL: what
they share (keys, tokens, hosts), who owns each host's libvirt connection (libvirtd's own
client list, watched all along, says never two at once), failover when one is killed,
stopped or cut off from the database, a database restart, relays to tunnel hosts, and
how a replica refuses a database it cannot use."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common import wire
from tests.conftest import FAST
from tests.harness import VENV_BIN, Agent, Libvirtd, Network, Postgres, Server, free_port, wait_for
from tests.test_gateway import Engine
from tests.test_web import Client, web_login

MakeAgent = Callable[..., Agent]


def server_cli(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "virtfleet-server"), "--state-dir", str(state), *args],
                          capture_output=True, text=True, timeout=60)


def replica(tmp_path: Path, name: str, database: str, *extra: str) -> Server:
    return Server(tmp_path / name, free_port(), *FAST, "--database", database, *extra)


def at_url(join: str, url: str) -> str:
    """The join string as if made by the replica at `url` (they share token and CA)."""
    decoded = wire.JoinString.decode(join)
    return wire.JoinString(url=url, ca_pin=decoded.ca_pin, token=decoded.token).encode()


def test_replicas_share_the_fleet_keys_tokens_and_hosts(
        database: str, tmp_path: Path, make_agent: MakeAgent) -> None:
    made = server_cli("init", "--database", database, state=tmp_path / "init")
    assert made.returncode == 0 and "fleet keys made" in made.stdout, made.stderr
    again = server_cli("init", "--database", database, state=tmp_path / "init")
    assert "were there already, kept" in again.stdout
    pin = made.stdout.split("ca pin: ")[1].split()[0]
    assert again.stdout.split("ca pin: ")[1].split()[0] == pin
    web_port = free_port()
    first = replica(tmp_path, "a", database)
    second = replica(tmp_path, "b", database, "--web-listen", f"127.0.0.1:{web_port}")
    try:
        first.start(), second.start()
        assert first.api("GET", "/v1/status")["ca_pin"] == pin == second.api("GET", "/v1/status")["ca_pin"]
        # One single-use token used at both replicas at once: one host.
        join = first.token("--uses", "1")
        agents = [make_agent("hv-a", None), make_agent("hv-b", None)]
        joins = [join, at_url(join, second.url)]
        results: list[subprocess.CompletedProcess[str]] = [None, None]  # type: ignore[list-item]

        def run(i: int) -> None:
            results[i] = agents[i].join(joins[i])

        threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        codes = sorted(r.returncode for r in results)
        assert codes[0] == 0 and codes[1] != 0, [r.stderr for r in results]
        refused = next(r for r in results if r.returncode != 0)
        assert "already used (1 of 1 uses)" in refused.stderr
        winner = agents[[r.returncode for r in results].index(0)]
        host_id = winner.host_id()
        # Each replica knows the host, whichever enrolled it; an admin change made at one
        # is what the other shows.
        assert [h["id"] for h in first.hosts()] == [h["id"] for h in second.hosts()] == [host_id]
        second.admin("hosts", "disable", host_id)
        assert first.host(host_id)["admin_state"] == "disabled"
        tokens = first.admin_json("token", "list")
        assert [(t["uses"], t["max_uses"]) for t in tokens] == [(1, 1)]
        # A join string names every live replica: with the one that made it down, a host
        # joins at another.
        later = wait_for(lambda: (j := first.token()) and wire.JoinString.decode(j).more_urls
                         == [second.url] and j, 10, "a join string naming the other replica")
        first.close()
        late = make_agent("hv-late", None)
        assert late.join(later).returncode == 0
        joined = json.loads((late.state / "agent.json").read_text())
        assert joined["server_url"] == second.url
        assert joined["replica_urls"] == [second.url, first.url]
        # The web page names the replica that holds a host, as `hosts show` does.
        late_id = late.host_id()
        owner = wait_for(lambda: second.host(late_id)["owner"], 20, "the late host's owner")
        browser = Client(f"http://127.0.0.1:{web_port}")
        browser.login(web_login(second))
        shown = browser.get(f"/hosts/{late_id}")
        assert shown.status == 200 and f'<dd id="owner">replica {owner} ' in shown.text, shown.text
    finally:
        first.close()
        second.close()


def test_a_replica_refuses_a_database_without_fleet_keys_or_a_url_that_is_none(
        postgres: Postgres, database: str, tmp_path: Path) -> None:
    lone = replica(tmp_path, "lone", database)
    lone.proc.start()
    assert lone.proc.proc is not None and lone.proc.proc.wait(60) != 0
    assert "holds no virtfleet keys: run `virtfleet-server init --database URL` once" in lone.proc.log()
    for url, words in (("mysql://db/x", "give a postgresql:// URL"),
                       ("postgresql://db/x?nosuch=1", 'libpq cannot read it: invalid URI query '
                                                      'parameter: "nosuch"'),
                       ("postgresql://u:pw-s3cret@[::1/x", "libpq cannot read it: end of string")):
        result = server_cli("serve", "--database", url, state=tmp_path / "bad")
        assert result.returncode == 1 and words in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and "pw-s3cret" not in result.stderr


def test_a_database_password_appears_in_no_output_or_log(
        postgres: Postgres, database: str, tmp_path: Path) -> None:
    # Trust authentication ignores the password: it is only there to be hidden.
    url = database.replace("postgres@", "postgres:pw-s3cret@")
    made = server_cli("init", "--database", url, state=tmp_path / "init")
    assert made.returncode == 0, made.stderr
    config = tmp_path / "server.toml"
    config.write_text(f'database = "{url}"\n')
    server = Server(tmp_path / "a", free_port(), *FAST, "--config", str(config))
    try:
        server.start()
        stopped = server_cli("serve", "--listen", f"127.0.0.1:{free_port()}", "--metrics-listen", "off",
                             "--web-listen", "off", "--database",
                             url.replace(f":{postgres.port}/", ":1/"), state=tmp_path / "b")
        assert stopped.returncode != 0 and "cannot start" in stopped.stderr
    finally:
        server.close()
    shown = made.stdout + made.stderr + server.proc.log() + stopped.stdout + stopped.stderr
    assert "pw-s3cret" not in shown and "postgresql://postgres@127.0.0.1:1/" in stopped.stderr


def tls_clients(lv: Libvirtd) -> int:
    """The libvirtd's clients on its TLS port, as virt-admin lists them."""
    out = subprocess.run(["virt-admin", "-c", f"libvirtd:///system?socket={lv.sock_dir}/libvirt-admin-sock",
                          "srv-clients-list", "libvirtd"], capture_output=True, text=True, timeout=10,
                         check=True).stdout
    return sum(1 for line in out.splitlines() if " tls " in f" {line} ")


class ConnectionWatch:
    """Counts each libvirtd's TLS clients in a thread, all along: `most` is the highest
    any host had at once (the replicas must never hold two connections to one host)."""

    def __init__(self, daemons: list[Libvirtd]) -> None:
        self.daemons, self.most = daemons, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> ConnectionWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _watch(self) -> None:
        while not self._stop.is_set():
            for lv in self.daemons:
                with contextlib.suppress(subprocess.SubprocessError):
                    self.most = max(self.most, tls_clients(lv))


def replica_ids(*servers: Server) -> list[str]:
    """Each server's replica id, once its first lease round put it in the list."""
    return [wait_for(lambda s=s: next((r["id"] for r in s.api("GET", "/v1/replicas") if r["me"]), ""),
                     10, "the replica to list itself") for s in servers]


def owners(server: Server, host_ids: list[str]) -> dict[str, str]:
    return {h: server.host(h)["owner"] for h in host_ids}


def initialized(database: str, tmp_path: Path) -> None:
    made = server_cli("init", "--database", database, state=tmp_path / "init")
    assert made.returncode == 0, made.stderr


def hosts_joined(tmp_path: Path, server: Server, make_agent: MakeAgent,
                 count: int) -> tuple[list[str], list[Libvirtd]]:
    daemons = [Libvirtd(tmp_path / f"lv{i}", free_port()) for i in range(count)]
    token = server.token("--uses", str(count))
    ids = []
    for i, lv in enumerate(daemons):
        lv.start()
        agent = make_agent(f"hv-{i}", lv)
        assert agent.join(token).returncode == 0
        agent.start()
        ids.append(agent.host_id())
    return ids, daemons


def engine_view(server: Server) -> dict[str, tuple[str, str]]:
    """Each host's status and connection state, as the server's engine API lists them."""
    status, listed = Engine(server).get("/v1/hosts")
    assert status == 200
    return {r["id"]: (r["status"], r["connection"]["state"]) for r in listed["hosts"]}


def agents_know_both_replicas(tmp_path: Path, count: int) -> None:
    """Until each of hosts_joined's agents has both replicas' URLs (from its check-ins'
    answers): where it goes when its replica stops answering."""
    def known(i: int) -> int:
        agent_json = json.loads((tmp_path / f"hv-{i}" / "state" / "agent.json").read_text())
        return len(agent_json.get("replica_urls", []))

    wait_for(lambda: all(known(i) == 2 for i in range(count)), 10, "the agents to know both replicas")


def test_each_host_has_one_owner_and_moves_within_seconds_when_its_owner_is_killed(
        database: str, tmp_path: Path, make_agent: MakeAgent) -> None:
    initialized(database, tmp_path)
    first, second = replica(tmp_path, "a", database), replica(tmp_path, "b", database)
    daemons: list[Libvirtd] = []
    try:
        first.start(), second.start()
        ids, daemons = hosts_joined(tmp_path, first, make_agent, 4)
        a, b = replica_ids(first, second)
        wait_for(lambda: all(second.host(h)["status"] == "online" for h in ids)
                 and sorted(owners(second, ids).values()) == sorted([a, a, b, b]), 30,
                 "every host online, two owned by each replica")
        agents_know_both_replicas(tmp_path, 4)
        assert [tls_clients(lv) for lv in daemons] == [1, 1, 1, 1]
        # Each replica's engine API lists every host, whichever replica holds it (another's
        # host's record follows within a lease round).
        for server, me in ((first, a), (second, b)):
            expected = {h: ("online", "online" if o == me else "replica")
                        for h, o in owners(server, ids).items()}
            wait_for(lambda s=server, e=expected: engine_view(s) == e, 10,
                     "every host in the engine API")
        # Each replica's gateway serves every host, the other's too (reached directly).
        for host_id, owner in owners(second, ids).items():
            for server in (first, second):
                listed = subprocess.run(["virsh", "-c", server.gateway_uri(host_id), "list", "--all"],
                                        capture_output=True, text=True, timeout=30)
                assert listed.returncode == 0, (owner, listed.stderr)
        wait_for(lambda: [tls_clients(lv) for lv in daemons] == [1, 1, 1, 1], 10,
                 "the gateway clients gone")
        seen: set[str] = set()

        def all_back_at_b() -> bool:
            hosts = [second.host(h) for h in ids]
            seen.update(h["status"] for h in hosts)
            return all(h["owner"] == b and h["status"] == "online" for h in hosts)

        # A storm of enrollments at the replica about to die, and the hosts' check-ins.
        burst_join = first.token("--uses", "60", "--no-auto-enable")
        answered = tmp_path / "enrolled-ids"
        burst = subprocess.Popen([str(VENV_BIN / "python"), str(Path(__file__).with_name("enroll_burst.py")),
                                  burst_join, "60", str(answered)], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        wait_for(lambda: len(second.hosts()) > len(ids) + 5, 30, "enrollments under way")
        with ConnectionWatch(daemons) as watch:
            first.proc.stop(signal.SIGKILL)
            killed = time.monotonic()
            wait_for(all_back_at_b, 15, "the killed replica's hosts owned and online at the other",
                     interval=0.1)
            took = time.monotonic() - killed
            wait_for(lambda: [tls_clients(lv) for lv in daemons] == [1, 1, 1, 1], 5,
                     "one connection to each host")
        assert took < 10 and "offline" not in seen and watch.most == 1, (took, seen, watch.most)
        print(f"observed: the killed replica's hosts owned and online at the other {took:.1f} s "
              "after the kill")
        burst.communicate(timeout=60)
        enrolled = set(answered.read_text().split())
        pending = {h["id"] for h in second.hosts() if h["id"] not in ids}
        assert enrolled and enrolled <= pending  # every enrollment answered is kept
        token = next(t for t in second.admin_json("token", "list") if t["max_uses"] == 60)
        assert token["uses"] == len(pending)  # and no use spent without its host
        listed = {r["id"]: r for r in second.api("GET", "/v1/replicas")}
        assert not listed[a]["alive"] and listed[b]["alive"] and listed[b]["hosts"] == 4
        shown = second.admin("replicas").stdout
        assert f"{b} (this one)" in shown and "gone" in shown
    finally:
        first.close()
        second.close()
        for lv in daemons:
            lv.stop()


def test_a_replica_joining_takes_its_share_and_a_database_restart_loses_nothing(
        postgres: Postgres, database: str, tmp_path: Path, make_agent: MakeAgent) -> None:
    initialized(database, tmp_path)
    first, second = replica(tmp_path, "a", database), replica(tmp_path, "b", database)
    third = replica(tmp_path, "c", database)
    daemons: list[Libvirtd] = []
    try:
        first.start(), second.start()
        ids, daemons = hosts_joined(tmp_path, first, make_agent, 4)
        wait_for(lambda: all(first.host(h)["status"] == "online" for h in ids)
                 and sorted(Counter(owners(first, ids).values()).values()) == [2, 2], 30,
                 "four hosts online, two at each replica")
        with ConnectionWatch(daemons) as watch:
            third.start()
            c = replica_ids(third)[0]
            wait_for(lambda: sorted(Counter(owners(first, ids).values()).values()) == [1, 1, 2]
                     and c in owners(first, ids).values()
                     and all(first.host(h)["status"] == "online" for h in ids)
                     and [tls_clients(lv) for lv in daemons] == [1, 1, 1, 1], 20,
                     "the new replica owning its share, every host online on one connection")
            third.close()  # a clean stop gives its host back at once
            wait_for(lambda: c not in owners(first, ids).values()
                     and all(first.host(h)["status"] == "online" for h in ids)
                     and [tls_clients(lv) for lv in daemons] == [1, 1, 1, 1], 10,
                     "the stopped replica's host taken by another")
        assert watch.most == 1
        before = {h: first.host(h)["enrolled_at"] for h in ids}
        postgres.stop()
        postgres.start()
        wait_for(lambda: [tls_clients(lv) for lv in daemons] == [1, 1, 1, 1]
                 and all(first.host(h)["status"] == "online" for h in ids)
                 and all(r["alive"] for r in first.api("GET", "/v1/replicas") if r["id"] != c), 30,
                 "both replicas back on the restarted database, every host online")
        assert {h: first.host(h)["enrolled_at"] for h in ids} == before
        # The other writes again too, once its store connected again (in the background,
        # every second: until then it refuses, naming the database).
        wait_for(lambda: second.admin("token", "create", check=False).returncode == 0, 10,
                 "the other replica to write again")
    finally:
        first.close()
        second.close()
        third.close()
        for lv in daemons:
            lv.stop()


CUT_RULES = """\
table inet cut {{
    chain out {{ type filter hook output priority 0; ip daddr {address} drop; }}
    chain in {{ type filter hook input priority 0; ip saddr {address} drop; }}
}}
"""


def nft(ns: str, rules: str) -> None:
    subprocess.run(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=rules, text=True,
                   check=True, timeout=10)


@dataclass
class NamespacedReplicas:
    """Two replicas, each in a network namespace of its own, on a PostgreSQL in another;
    hosts (libvirtd + agent) in more, reaching them over the namespaces' bridge (or, NATed,
    through a masquerading router)."""

    net: Network
    pg: Postgres
    db_address: str
    replicas: list[Server]
    namespaces: list[str]  # the replicas'
    hosts: list[tuple[Libvirtd, Agent]] = field(default_factory=list)

    def add_host(self, base: Path, name: str, join: str, natted: bool = False) -> Agent:
        ns, address = self.net.add_natted_host() if natted else self.net.add_host()
        lv = Libvirtd(base / f"{name}-libvirtd", free_port(), listen_addr=address, netns=ns)
        lv.start()
        agent = Agent(base / name, lv.agent_config(), netns=ns, hostname=name)
        self.hosts.append((lv, agent))
        assert agent.join(join).returncode == 0
        agent.start()
        return agent


@contextlib.contextmanager
def namespaced_replicas(tmp_path: Path, tag: str) -> Iterator[NamespacedReplicas]:
    net = Network(f"{tag}{os.getpid() % 1000}")
    pg: Postgres | None = None
    replicas: list[Server] = []
    namespaces: list[str] = []
    fleet: NamespacedReplicas | None = None
    try:
        db_ns, db_address = net.add_host()
        pg = Postgres(free_port(), listen=db_address, netns=db_ns).start()
        url = pg.new_database("replicas")
        for name in ("a", "b"):
            ns, address = net.add_host()
            if not replicas:
                made = subprocess.run(["ip", "netns", "exec", ns, str(VENV_BIN / "virtfleet-server"),
                                       "--state-dir", str(tmp_path / "init"), "init", "--database", url],
                                      capture_output=True, text=True, timeout=60)
                assert made.returncode == 0, made.stderr
            replicas.append(Server(tmp_path / name, free_port(), *FAST, "--database", url,
                                   host=address, netns=ns).start())
            namespaces.append(ns)
        fleet = NamespacedReplicas(net, pg, db_address, replicas, namespaces)
        yield fleet
    finally:
        for lv, agent in fleet.hosts if fleet else []:
            agent.stop()
            lv.stop()
        for server in replicas:
            server.close()
        if pg is not None:
            pg.close()
        net.close()


def test_a_replica_cut_off_from_the_database_gives_its_hosts_up_before_another_takes_them(
        tmp_path: Path) -> None:
    with namespaced_replicas(tmp_path, "vfp") as fleet:
        first, second = fleet.replicas
        token = first.token("--uses", "4")
        agents = [fleet.add_host(tmp_path, f"hv-{i}", token) for i in range(4)]
        ids = [agent.host_id() for agent in agents]
        daemons = [lv for lv, _agent in fleet.hosts]
        a, b = replica_ids(first, second)
        wait_for(lambda: sorted(owners(second, ids).values()) == sorted([a, a, b, b])
                 and all(second.host(h)["status"] == "online" for h in ids), 30,
                 "every host online, two owned by each replica")
        agents_know_both_replicas(tmp_path, len(agents))
        with ConnectionWatch(daemons) as watch:
            nft(fleet.namespaces[0], CUT_RULES.format(address=fleet.db_address))
            cut = time.monotonic()
            wait_for(lambda: all(second.host(h)["owner"] == b and second.host(h)["status"] == "online"
                                 for h in ids)
                     and [tls_clients(lv) for lv in daemons] == [1, 1, 1, 1], 20,
                     "the cut-off replica's hosts owned and online at the other", interval=0.1)
            took = time.monotonic() - cut
            refused = first.admin("hosts", "list", check=False)
            assert refused.returncode != 0 and "cannot be used" in refused.stderr, refused.stderr
            assert "gives up its 2 hosts" in first.proc.log()
            nft(fleet.namespaces[0], "delete table inet cut\n")
            wait_for(lambda: sorted(owners(second, ids).values()) == sorted([a, a, b, b])
                     and all(second.host(h)["status"] == "online" for h in ids)
                     and [tls_clients(lv) for lv in daemons] == [1, 1, 1, 1], 30,
                     "the replica back, owning its share again")
        assert took < 12 and watch.most == 1, (took, watch.most)
        print(f"observed: the cut-off replica's hosts owned and online at the other {took:.1f} s "
              "after the cut")


def test_a_tunnel_host_is_reached_through_every_replicas_gateway(tmp_path: Path) -> None:
    """Its tunnel ends at one replica: another's gateway relays through that one, with its
    replica certificate; a host's certificate opens no relay."""
    with namespaced_replicas(tmp_path, "vfq") as fleet:
        first, second = fleet.replicas
        agent = fleet.add_host(tmp_path, "hv-nat", first.token("--transport", "tunnel"), natted=True)
        host_id = agent.host_id()
        a, _b = replica_ids(first, second)
        wait_for(lambda: (h := second.host(host_id))["status"] == "online" and h["owner"] == a, 30,
                 "the tunnel host online, owned by the replica its tunnel reached")
        for server in (first, second):
            wait_for(lambda s=server: Path(s.gateway_uri(host_id).split("socket=")[1]).exists(), 10,
                     "the host's gateway socket")
            listed = subprocess.run(["virsh", "-c", server.gateway_uri(host_id), "list", "--all"],
                                    capture_output=True, text=True, timeout=30)
            assert listed.returncode == 0, listed.stderr
        probe = subprocess.run(
            ["ip", "netns", "exec", fleet.namespaces[1], str(VENV_BIN / "python"), "-c",
             RELAY_PROBE, first.url, str(agent.state / "ca.crt"), str(agent.state / "identity.pem")],
            capture_output=True, text=True, timeout=30)
        assert probe.stdout.strip() == "closed", probe.stdout + probe.stderr
        assert "refused a relay connection" in first.proc.log()


# A host's own certificate at a replica's relay door: the connection is cut at once.
RELAY_PROBE = r"""
import socket, ssl, sys
from urllib.parse import urlsplit
url, ca, identity = sys.argv[1:]
ctx = ssl.create_default_context(cafile=ca)
ctx.load_cert_chain(identity)
ctx.set_alpn_protocols(["virtfleet-relay/1"])
parts = urlsplit(url)
with socket.create_connection((parts.hostname, parts.port), timeout=10) as raw:
    with ctx.wrap_socket(raw, server_hostname=parts.hostname) as tls:
        tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        try:
            print("closed" if tls.recv(1024) == b"" else "answered")
        except (ConnectionError, ssl.SSLError):
            print("closed")
"""


def test_a_host_moved_to_another_replica_renews_its_certificates_there(
        database: str, tmp_path: Path, make_agent: MakeAgent) -> None:
    initialized(database, tmp_path)
    lifetime = ("--cert-lifetime", "14s")
    first = Server(tmp_path / "a", free_port(), *FAST, *lifetime, "--database", database)
    second = Server(tmp_path / "b", free_port(), *FAST, *lifetime, "--database", database)
    daemons: list[Libvirtd] = []
    try:
        first.start(), second.start()
        replica_ids(first, second)
        ids, daemons = hosts_joined(tmp_path, first, make_agent, 1)
        host_id = ids[0]
        wait_for(lambda: second.host(host_id)["status"] == "online", 30, "the host online")
        agents_know_both_replicas(tmp_path, 1)
        first.close()  # its agent moves to the other replica
        joined = second.host(host_id)
        wait_for(lambda: time.time() > joined["certificate_expires"] + 1, 25,
                 "the first certificate's expiry to pass")
        now = second.host(host_id)
        assert now["status"] == "online"
        assert now["certificate_expires"] > joined["certificate_expires"]
        assert now["libvirt_certificate_expires"] > joined["libvirt_certificate_expires"]
        assert json.loads((tmp_path / "hv-0" / "state" / "agent.json").read_text())[
            "server_url"] == second.url
    finally:
        first.close()
        second.close()
        for lv in daemons:
            lv.stop()
