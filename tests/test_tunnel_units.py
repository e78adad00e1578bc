"""The tunnel's HTTP/2 glue (common/tunnel.py) and the agent's end of it (agent/tunnel.py),
in one process over a socket pair: streams, flow control, liveness, hostile peers, and
what the agent agrees to reach. (tests/test_tunnel.py runs the real thing behind NAT.)"""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from agent.tunnel import TunnelKeeper
from common import tunnel
from tests.harness import until

Scenario = Callable[[tunnel.H2Link, tunnel.H2Link], Awaitable[None]]


def echo_on_agent_side(link: tunnel.H2Link, stream: tunnel.StreamTransport,
                       headers: tunnel.Headers) -> None:
    reader, writer = link.accept(stream)

    async def echo() -> None:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.close()

    asyncio.get_running_loop().create_task(echo())


async def pair(on_stream: tunnel.OnStream | None = echo_on_agent_side) -> \
        tuple[tunnel.H2Link, tunnel.H2Link]:
    """(the server's end, the agent's end) of one tunnel over a socket pair."""
    a, b = socket.socketpair()
    loop = asyncio.get_running_loop()
    _, agent = await loop.create_connection(lambda: tunnel.H2Link(False, on_stream), sock=a)
    _, server = await loop.create_connection(lambda: tunnel.H2Link(True), sock=b)
    return server, agent


def run(scenario: Scenario, on_stream: tunnel.OnStream | None = echo_on_agent_side) -> None:
    async def main() -> None:
        server, agent = await pair(on_stream)
        try:
            await scenario(server, agent)
        finally:
            server.close("test over")
            agent.close("test over")

    asyncio.run(asyncio.wait_for(main(), 30))


def test_streams_carry_bytes_both_ways_intact_and_end_cleanly() -> None:
    async def scenario(server: tunnel.H2Link, agent: tunnel.H2Link) -> None:
        payload = os.urandom(3 * 1024 * 1024)  # many windows' worth
        reader, writer = await server.open_stream(tunnel.LIBVIRT_PATH)
        writer.write(payload)
        writer.write_eof()
        assert await reader.read(-1) == payload
        many = await asyncio.gather(*(server.open_stream(tunnel.LIBVIRT_PATH) for _ in range(40)))
        for i, (_r, w) in enumerate(many):
            w.write(b"stream %d" % i)
        for i, (r, _w) in enumerate(many):
            assert await r.readexactly(len(b"stream %d" % i)) == b"stream %d" % i
        for _r, w in many:
            w.transport.abort()
        await until(lambda: not server.streams and not agent.streams, "every stream gone")

    run(scenario)


def test_a_reader_that_does_not_read_holds_its_sender_back() -> None:
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    def hold(link: tunnel.H2Link, stream: tunnel.StreamTransport, _h: tunnel.Headers) -> None:
        held.append(link.accept(stream))  # and never read

    async def scenario(server: tunnel.H2Link, agent: tunnel.H2Link) -> None:
        reader, writer = await server.open_stream(tunnel.LIBVIRT_PATH)
        payload = os.urandom(8 * 1024 * 1024)
        writer.write(payload)
        with pytest.raises(TimeoutError):  # the writer waits: nobody takes the bytes
            await asyncio.wait_for(writer.drain(), 0.5)
        # What crossed is bounded by the stream's window and what the reader buffers before
        # it pauses (twice its limit), not the 8 MiB offered.
        assert server.bytes_out < tunnel.STREAM_WINDOW + 2 * tunnel.READ_LIMIT + 16 * 1024
        taken, _ = held[0]
        got = bytearray()
        while len(got) < len(payload):
            got += await taken.read(1 << 20)
        assert bytes(got) == payload
        await asyncio.wait_for(writer.drain(), 5)

    run(scenario, hold)


def test_a_silent_peer_is_noticed_and_the_tunnel_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tunnel, "PING_EVERY", 0.05)
    monkeypatch.setattr(tunnel, "DEAD_AFTER", 0.3)

    async def main() -> None:
        mine, theirs = socket.socketpair()  # `theirs` reads nothing and answers nothing
        loop = asyncio.get_running_loop()
        _, link = await loop.create_connection(lambda: tunnel.H2Link(True), sock=mine)
        await asyncio.wait_for(link.closed.wait(), 3)
        assert "no answer from the peer" in link.close_reason
        theirs.close()

    asyncio.run(main())


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x00\x00\x04\x08\x00\x00\x00\x00\x00" * 50,  # WINDOW_UPDATEs of 0 on the connection
    os.urandom(4096),
    # A peer acting as the side that opens streams: a client preface and a HEADERS flood
    # at the server's end, which never serves a stream.
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
    + b"".join(b"\x00\x00\x01\x01\x05" + (2 * i + 1).to_bytes(4, "big") + b"\x82"
               for i in range(1000)),
])
def test_garbage_from_the_peer_closes_that_tunnel_saying_why(
        garbage: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tunnel, "PING_EVERY", 0.05)  # a frame that never ends: by silence
    monkeypatch.setattr(tunnel, "DEAD_AFTER", 0.3)

    async def main() -> None:
        mine, theirs = socket.socketpair()
        loop = asyncio.get_running_loop()
        _, link = await loop.create_connection(lambda: tunnel.H2Link(True), sock=mine)
        theirs.sendall(garbage)
        await asyncio.wait_for(link.closed.wait(), 3)
        assert any(why in link.close_reason for why in (
            "broke the HTTP/2 protocol", "ended the tunnel", "no answer from the peer")), \
            link.close_reason
        assert link.streams == {}
        theirs.close()

    asyncio.run(main())


def test_the_agent_reaches_libvirtds_socket_and_nothing_else(tmp_path: Path) -> None:
    libvirt_sock = tmp_path / "libvirt-sock"
    reached: list[bytes] = []

    async def fake_libvirtd(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        data = await reader.readexactly(5)
        reached.append(data)
        writer.write(b"hello " + data)
        await writer.drain()
        writer.close()

    async def main() -> None:
        keeper = TunnelKeeper("https://server.invalid:8443", lambda: None,  # type: ignore[arg-type,return-value]
                              libvirt_sock, "h1")
        server, agent = await pair(keeper._serve)
        try:
            with pytest.raises(tunnel.TunnelError, match="socket .*libvirt-sock"):
                await server.open_stream(tunnel.LIBVIRT_PATH)  # libvirtd is not there yet
            listener = await asyncio.start_unix_server(fake_libvirtd, libvirt_sock)
            for path in ["/etc/passwd", "/v1/tunnel/libvirt/../../../run/docker.sock",
                         "/v1/tunnel/ssh", "/"]:
                with pytest.raises(tunnel.TunnelError, match="reaches libvirtd only"):
                    await server.open_stream(path)
            reader, writer = await server.open_stream(tunnel.LIBVIRT_PATH)
            writer.write(b"ping!")
            assert await reader.read(-1) == b"hello ping!"
            assert reached == [b"ping!"] and keeper.streams_served == 1
            listener.close()
        finally:
            server.close("test over")
            agent.close("test over")
            await keeper.stop()

    asyncio.run(asyncio.wait_for(main(), 30))


def test_closing_a_tunnel_tells_the_peer_why() -> None:
    async def scenario(server: tunnel.H2Link, agent: tunnel.H2Link) -> None:
        reader, _writer = await server.open_stream(tunnel.LIBVIRT_PATH)
        server.close("the host was forgotten")
        await asyncio.wait_for(agent.closed.wait(), 3)
        assert agent.close_reason == "the peer ended the tunnel: the host was forgotten"
        with pytest.raises(ConnectionResetError):
            await reader.read(-1)

    run(scenario)
