"""The server's state disk fills up: a clear error, the server keeps answering what it
can (reads, check-ins it can record later), and nothing stored is lost or corrupted."""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import Agent, Server, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "virtfleet-test", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def fill(path: Path) -> None:
    with open(path, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass


def test_full_state_disk_is_a_clear_error_and_nothing_is_lost(
        small_disk: Path, start_server: Callable[..., Server],
        make_agent: Callable[..., Agent]) -> None:
    server = start_server(state=small_disk / "server")
    agent = make_agent("hv-disk", None)
    assert agent.join(server.token()).returncode == 0
    agent.start()
    host_id = agent.host_id()
    wait_for(lambda: server.host(host_id)["last_checkin"], 10, "a check-in")
    tokens = {t["id"] for t in server.admin_json("token", "list")}
    fill(small_disk / "filler")

    failures = []
    for _ in range(200):
        result = server.admin("token", "create", check=False)
        if result.returncode != 0:
            failures.append(result.stderr)
            break
        tokens.add(server.admin_json("token", "list")[-1]["id"])
    assert failures, "the full disk never made a write fail"
    assert "cannot write its state" in failures[0] and "full" in failures[0]
    assert "Traceback" not in failures[0]
    # Reads still work, and the agent is told why its check-ins fail.
    assert server.host(host_id)["hostname"] == "hv-disk"
    wait_for(lambda: "cannot write its state" in agent.run_cmd("status").stdout, 15,
             "the agent to report the server's state error")
    assert server.proc.alive()

    (small_disk / "filler").unlink()
    created = server.admin_json("token", "create")["token"]["id"]
    after = {t["id"] for t in server.admin_json("token", "list")}
    assert tokens | {created} == after
    wait_for(lambda: agent.run_cmd("status").stdout.count("FAILED") == 0, 20,
             "check-ins to work again")
    with sqlite3.connect(small_disk / "server" / "state.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
