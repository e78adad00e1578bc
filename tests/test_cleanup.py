"""`make demo KEEP=1` and bench/run stopped by SIGTERM (`timeout`, `kill`, a CI runner)
leave nothing behind (issue 15, item 10): no server, agent, libvirtd or sshd still
running, no network namespace, none of their files (the demo's hold CA private keys)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.util import kill_processes_using, remove_network_namespaces
from tests.harness import ROOT, VENV_BIN, pid_alive, wait_for


def running_from(path: Path) -> list[int]:
    """Processes whose command line names `path` (pgrep: not the code under test)."""
    out = subprocess.run(["pgrep", "-f", str(path)], capture_output=True, text=True).stdout
    return [int(pid) for pid in out.split()]


def network_namespaces() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def start(argv: list[str], log: Path, **env: str) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                start_new_session=True,
                                env=os.environ | {"PYTHONUNBUFFERED": "1"} | env)


@pytest.fixture
def leftovers(tmp_path: Path) -> Iterator[None]:
    """Whatever a failing test leaves running under tmp_path is stopped all the same."""
    yield
    kill_processes_using(str(tmp_path))


def test_sigterm_to_demo_keep_stops_everything_and_removes_what_it_made(
        tmp_path: Path, leftovers: None) -> None:
    work = tmp_path / "demo"
    work.mkdir()
    (work / "mine.txt").write_text("the caller's: the demo must keep it\n")
    namespaces = network_namespaces()
    log = tmp_path / "demo.log"
    demo = start([str(VENV_BIN / "python"), "scripts/demo.py", "--keep", "--dir", str(work)], log)
    try:
        wait_for(lambda: "still running" in log.read_text() or demo.poll() is not None, 120,
                 "the demo to be up and running")
        assert demo.poll() is None, log.read_text()
        started = [pid for pid in running_from(work) if pid != demo.pid]
        assert len(started) >= 3, f"server, agent and libvirtd: {started}"
        assert (work / "server").is_dir() and (work / "agent").is_dir()

        demo.send_signal(signal.SIGTERM)
        assert demo.wait(60) == 0, log.read_text()
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    assert [pid for pid in started if pid_alive(pid)] == [], log.read_text()
    assert running_from(work) == []
    assert sorted(p.name for p in work.iterdir()) == ["mine.txt"], log.read_text()
    assert network_namespaces() <= namespaces


def test_sigterm_to_the_make_running_the_demo_stops_it_too(tmp_path: Path,
                                                           leftovers: None) -> None:
    """`make demo KEEP=1` SIGTERMed: make exits without passing the signal on to the demo
    it runs. A shell waiting for the demo plays make's part here (it does the same)."""
    work = tmp_path / "demo"
    work.mkdir()
    log = tmp_path / "demo.log"
    parent = start(["sh", "-c", '"$0" scripts/demo.py --keep --dir "$1"; echo "demo exited"',
                    str(VENV_BIN / "python"), str(work)], log)
    try:
        wait_for(lambda: "still running" in log.read_text() or parent.poll() is not None, 120,
                 "the demo to be up and running")
        assert parent.poll() is None, log.read_text()
        started = running_from(work)
        assert len(started) >= 4, f"the demo, server, agent and libvirtd: {started}"
        parent.send_signal(signal.SIGTERM)
        assert parent.wait(10) == -signal.SIGTERM
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
    wait_for(lambda: not any(pid_alive(pid) for pid in started), 60,
             f"the orphaned demo and what it started to stop ({log.read_text()[-2000:]})")
    assert list(work.iterdir()) == [], log.read_text()


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temp dir with a short path: the server's admin socket, deep under it, must stay
    within a unix socket's 108 bytes (pytest's tmp_path is too long for that)."""
    path = Path(tempfile.mkdtemp(prefix="vfc-", dir="/tmp"))
    yield path
    kill_processes_using(str(path))
    shutil.rmtree(path, ignore_errors=True)


def test_sigterm_to_bench_run_stops_its_hosts_and_namespaces(tmp_path: Path,
                                                             short_tmp: Path) -> None:
    """bench/run's quickest benchmark (join), stopped once its first host's libvirtd runs
    in its network namespace. (`python -m bench` is what bench/run execs after setup.)"""
    log = tmp_path / "bench.log"
    bench = start([str(VENV_BIN / "python"), "-m", "bench", "--quick", "join"], log,
                  TMPDIR=str(short_tmp))
    tag = f"vfj{bench.pid % 10000}-"
    try:
        def host_running() -> bool:
            return any(name.startswith(tag + "h") for name in network_namespaces()) and any(
                "libvirtd" in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
                for pid in running_from(short_tmp))
        wait_for(lambda: bench.poll() is not None or host_running(), 120,
                 "the benchmark's first host (a libvirtd in its namespace)")
        assert bench.poll() is None, log.read_text()
        started = running_from(short_tmp)

        bench.send_signal(signal.SIGTERM)
        assert bench.wait(60) == 130, log.read_text()
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
    try:
        assert [pid for pid in started if pid_alive(pid)] == [], log.read_text()
        assert running_from(short_tmp) == []
        assert [n for n in network_namespaces() if n.startswith(tag)] == []
        assert not list(short_tmp.glob("vfb-run-*")), "bench/run left its work dir"
    finally:  # a failing run's namespaces must not outlive the test either
        kill_processes_using(str(short_tmp))
        remove_network_namespaces(rf"{tag}(srv|h[0-9]+)")
