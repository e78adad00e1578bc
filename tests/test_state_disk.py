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
    the filesystem and mounting it again.

    The loop device is attached by hand and kept until the end: checked through a
    second device (or a reused one) on the image file, the mount saw the loop device's
    stale cache of the damaged superblock and came back read-only, now and then."""

    words = "disk I/O error"  # what sqlite says when the filesystem went read-only under it

    def __init__(self, base: Path) -> None:
        self.image, self.mount = base / "disk.img", base / "ext4"
        self.mount.mkdir()
        run("truncate", "-s", "32M", str(self.image))
        run("mkfs.ext4", "-q", str(self.image))
        self.device = subprocess.run(["losetup", "--find", "--show", str(self.image)], check=True,
                                     capture_output=True, text=True).stdout.strip()
        self._mount()

    def _mount(self) -> None:
        run("mount", "-o", "errors=remount-ro", self.device, str(self.mount))

    def break_(self) -> None:
        Path(f"/sys/fs/ext4/{Path(self.device).name}/trigger_fs_error").write_text("1")

    def mend(self, server: Server) -> None:
        server.proc.stop()
        run("umount", str(self.mount))
        # e2fsck: 0 or 1 (errors fixed) is fine; 8 while the kernel still lets go of the
        # device after the umount, so try again.
        wait_for(lambda: subprocess.run(["e2fsck", "-fy", self.device],
                                        capture_output=True).returncode < 4, 10,
                 "e2fsck to check the filesystem")
        self._mount()
        server.start()

    def close(self) -> None:
        run("umount", "-l", str(self.mount), check=False)
        run("losetup", "-d", self.device, check=False)


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
