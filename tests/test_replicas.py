"""Several `virtfleet-server serve --database` replicas on one real PostgreSQL: what
they share (keys, tokens, hosts) and how a replica refuses a database it cannot use."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from common import wire
from tests.conftest import FAST
from tests.harness import VENV_BIN, Agent, Postgres, Server, free_port

MakeAgent = Callable[..., Agent]


def server_cli(*args: str, state: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(VENV_BIN / "virtfleet-server"), "--state-dir", str(state), *args],
                          capture_output=True, text=True, timeout=60)


def replica(tmp_path: Path, name: str, database: str) -> Server:
    return Server(tmp_path / name, free_port(), *FAST, "--database", database)


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
    first, second = replica(tmp_path, "a", database), replica(tmp_path, "b", database)
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
