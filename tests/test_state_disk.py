"""The server's state disk fills up or turns read-only: a clear error, the server keeps
answering what it can (reads), the agent is told why, and nothing stored is lost or
corrupted."""

from __future__ import annotations

import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import Agent, Server, wait_for

pytestmark = pytest.mark.slow


class FullDisk:
    """A 3 MB tmpfs, filled up with a file; mended by deleting the file."""

    words = "full"  # what sqlite's error says

    def __init__(self, base: Path) -> None:
        self.mount = base / "small"
        self.mount.mkdir()
        run("mount", "-t", "tmpfs", "-o", "size=3m", "virtfleet-test", str(self.mount))

    def break_(self) -> None:
        with open(self.mount / "filler", "wb") as f:
            try:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
            except OSError:
                pass

    def mend(self, server: Server) -> None:
        (self.mount / "filler").unlink()

    def close(self) -> None:
        run("umount", "-l", str(self.mount), check=False)


class ReadOnlyDisk:
    """A loop-mounted ext4 with errors=remount-ro, switched to read-only the way the kernel
    does on an I/O error. As in real life, mending means stopping the server, checking
    the filesystem and mounting it again."""

    words = "disk I/O error"  # what sqlite says when the filesystem went read-only under it

    def __init__(self, base: Path) -> None:
        self.image, self.mount = base / "disk.img", base / "ext4"
        self.mount.mkdir()
        run("truncate", "-s", "32M", str(self.image))
        run("mkfs.ext4", "-q", str(self.image))
        self._mount()

    def _mount(self) -> None:
        run("mount", "-o", "loop,errors=remount-ro", str(self.image), str(self.mount))

    def break_(self) -> None:
        device = subprocess.run(["findmnt", "-n", "-o", "SOURCE", str(self.mount)], check=True,
                                capture_output=True, text=True).stdout.strip()
        Path(f"/sys/fs/ext4/{Path(device).name}/trigger_fs_error").write_text("1")

    def mend(self, server: Server) -> None:
        server.proc.stop()
        run("umount", str(self.mount))
        run("e2fsck", "-fy", str(self.image), check=False)  # 1: errors fixed, which is fine
        self._mount()
        server.start()

    def close(self) -> None:
        run("umount", "-l", str(self.mount), check=False)


def run(*argv: str, check: bool = True) -> None:
    subprocess.run(argv, check=check, capture_output=True)


@pytest.fixture(params=[FullDisk, ReadOnlyDisk], ids=["full", "read-only"])
def disk(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[FullDisk | ReadOnlyDisk]:
    made = request.param(tmp_path)
    yield made
    made.close()


def test_broken_state_disk_is_a_clear_error_and_nothing_is_lost(
        disk: FullDisk | ReadOnlyDisk, start_server: Callable[..., Server],
        make_agent: Callable[..., Agent]) -> None:
    server = start_server(state=disk.mount / "server")
    agent = make_agent("hv-disk", None)
    assert agent.join(server.token()).returncode == 0
    agent.start()
    host_id = agent.host_id()
    wait_for(lambda: server.host(host_id)["last_checkin"], 10, "a check-in")
    tokens = {t["id"] for t in server.admin_json("token", "list")}
    disk.break_()

    failures = []
    for _ in range(200):
        result = server.admin("token", "create", check=False)
        if result.returncode != 0:
            failures.append(result.stderr)
            break
        tokens.add(server.admin_json("token", "list")[-1]["id"])
    assert failures, "the broken disk never made a write fail"
    assert "cannot write its state" in failures[0] and disk.words in failures[0], failures[0]
    assert "Traceback" not in failures[0]
    # Reads still work, and the agent is told why its check-ins fail.
    assert server.host(host_id)["hostname"] == "hv-disk"
    wait_for(lambda: "cannot write its state" in agent.run_cmd("status").stdout, 15,
             "the agent to report the server's state error")
    assert server.proc.alive()

    disk.mend(server)
    created = server.admin_json("token", "create")["token"]["id"]
    after = {t["id"] for t in server.admin_json("token", "list")}
    assert tokens | {created} == after
    assert server.host(host_id)["hostname"] == "hv-disk"
    wait_for(lambda: agent.run_cmd("status").stdout.count("FAILED") == 0, 20,
             "check-ins to work again")
    with sqlite3.connect(disk.mount / "server" / "state.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
