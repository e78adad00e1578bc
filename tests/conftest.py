"""Fixtures that start real parts: a private libvirtd, the server, agents (tests/harness.py)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.harness import Agent, Libvirtd, Postgres, Server, free_port

# Short enough that offline detection and retries happen within a test's patience.
FAST = ("--checkin-interval", "1", "--grace", "4")


@pytest.fixture
def libvirtd(tmp_path: Path) -> Iterator[Libvirtd]:
    lv = Libvirtd(tmp_path / "libvirtd", free_port())
    lv.start()
    yield lv
    lv.stop()


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    servers: list[Server] = []

    def start(*extra: str, state: Path | None = None, port: int | None = None) -> Server:
        srv = Server(state or tmp_path / "server", port or free_port(), *(extra or FAST))
        servers.append(srv)  # closed even when it fails to start
        return srv.start()

    yield start
    for srv in servers:
        srv.close()


@pytest.fixture
def server(start_server: Callable[..., Server]) -> Server:
    return start_server()


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    agents: list[Agent] = []

    def make(name: str, lv: Libvirtd | None, extra_toml: str = "",
             env: dict[str, str] | None = None) -> Agent:
        config = extra_toml + (lv.agent_config() if lv else
                               '[libvirt]\nuri = "test:///default"\nconfigure_tls = false\n')
        agent = Agent(tmp_path / name, config, hostname=name, env=env)
        agents.append(agent)
        return agent

    yield make
    for agent in agents:
        agent.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """One PostgreSQL for the whole run (initdb takes seconds); each test takes a database
    of its own (`database`)."""
    pg = Postgres(free_port()).start()
    yield pg
    pg.close()


@pytest.fixture
def database(postgres: Postgres, request: pytest.FixtureRequest) -> str:
    """The URL of a new, empty database for this test."""
    name = "t_" + hashlib.sha256(request.node.nodeid.encode()).hexdigest()[:16]
    postgres.sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return postgres.new_database(name)
