"""Many byte streams over one connection: HTTP/2 streams, framed by `h2`.

The agent dials out and the server opens streams back through that connection, so on
the one TLS connection the server plays HTTP/2's client (it opens streams) and the
agent HTTP/2's server (it answers them). h2 does the framing, the per-stream and
per-connection flow control, the pings and the protocol's checks; this module is the
asyncio glue: each stream is an asyncio transport under a StreamReader/StreamWriter
pair, so libvirt's bytes go through `common.relay.Relay` exactly as over a socket.

Flow control end to end: a stream's received bytes are acknowledged to the peer (which
reopens its send window) only while its reader takes them, so a slow reader holds back
its sender instead of growing memory; what a writer sends waits for the peer's window
and the TLS transport's room, and its `drain()` waits once HIGH_WATER bytes are queued.

Liveness: each side pings every PING_EVERY seconds, and one that has heard nothing
(a whole frame of any kind) for DEAD_AFTER seconds closes the connection: a cut cable,
a frozen peer or one that never completes its preface is noticed within 10 s on both
sides (a check every PING_EVERY: at most DEAD_AFTER + PING_EVERY).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import urlsplit

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings

from common.cli import printable

log = logging.getLogger(__name__)

ALPN = "virtfleet-tunnel/1"  # what the agent offers in its TLS handshake to open a tunnel
LIBVIRT_PATH = "/v1/tunnel/libvirt"  # the one thing a tunnel reaches: libvirtd's socket
PING_EVERY = 2.0
DEAD_AFTER = 6.0
STREAM_WINDOW = 256 * 1024  # bytes a peer may send on one stream before we take them
CONNECTION_WINDOW = 16 * 1024 * 1024  # over all streams
HIGH_WATER = 256 * 1024  # bytes queued to send on a stream before its writer waits
MAX_STREAMS = 300  # streams the agent serves at once (the gateway allows 256 per host)
OPEN_TIMEOUT = 10.0  # for the agent's answer to a new stream
MAX_REASON = 200  # characters of a peer's refusal kept (it is shown to operators)
READ_LIMIT = 64 * 1024

Headers = dict[str, str]


class TunnelError(ConnectionError):
    """A stream could not be opened, or the tunnel is gone; the message says why."""


class StreamTransport(asyncio.Transport):
    """One HTTP/2 stream as an asyncio transport (for asyncio's stream reader and writer)."""

    def __init__(self, link: H2Link, stream_id: int) -> None:
        super().__init__()
        self._link, self.stream_id = link, stream_id
        self.reader = asyncio.StreamReader(limit=READ_LIMIT)
        self._protocol: asyncio.Protocol = asyncio.StreamReaderProtocol(self.reader)
        self.out = bytearray()  # queued to send, waiting for window or room
        self.end_pending = False  # end the stream once `out` is sent
        self.local_ended = self.remote_ended = self.finished = False
        self.reading, self.unacked = True, 0
        self._write_paused = False
        self.sent = self.received = 0

    # -- asyncio.Transport --------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._link.transport.get_extra_info(name, default) if self._link.transport \
            else default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol  # type: ignore[assignment]

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._protocol

    def is_closing(self) -> bool:
        return self.finished or self.end_pending or self.local_ended

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.is_closing() or not data:
            return
        self.out += data
        self._link.pump(self)

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        if not self.is_closing():
            self.end_pending = True
            self._link.pump(self)

    def close(self) -> None:
        """Send what is queued, then end our side; the stream is done once the peer ends
        its side too (or resets it)."""
        self.write_eof()

    def abort(self) -> None:
        if not self.finished:
            self._link.reset(self)

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        if not self.reading:
            self.reading = True
            self._link.acknowledge(self)

    def is_reading(self) -> bool:
        return self.reading

    def get_write_buffer_size(self) -> int:
        return len(self.out)

    def pair(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The stream's reader and writer."""
        protocol = self._protocol
        assert isinstance(protocol, asyncio.StreamReaderProtocol)
        return self.reader, asyncio.StreamWriter(self, protocol, self.reader,
                                                 asyncio.get_running_loop())

    # -- from the link ----------------------------------------------------------------

    def deliver(self, data: bytes, flow_controlled: int) -> None:
        self.received += len(data)
        self.unacked += flow_controlled
        if not self.finished:
            self._protocol.data_received(data)
        if self.reading:
            self._link.acknowledge(self)

    def queued_changed(self) -> None:
        if not self._write_paused and len(self.out) > HIGH_WATER:
            self._write_paused = True
            self._protocol.pause_writing()
        elif self._write_paused and len(self.out) <= HIGH_WATER // 4:
            self._write_paused = False
            self._protocol.resume_writing()

    def end(self, exc: Exception | None) -> None:
        """Both sides are done, or the stream was reset (None: its reader still gets what
        arrived before, then end-of-file, as after a socket's close) or its tunnel lost."""
        if self.finished:
            return
        self.finished = True
        self._protocol.connection_lost(exc)


OnStream = Callable[["H2Link", StreamTransport, Headers], None]


class H2Link(asyncio.Protocol):
    """HTTP/2 over one connection. The side that opens streams (`client_side`: the
    server) calls `open_stream`; the other (the agent) is handed each new stream by
    `on_stream(link, stream, headers)`, answers it with `accept` or `refuse`, and
    gets its reader and writer from `stream_pair`."""

    def __init__(self, client_side: bool, on_stream: OnStream | None = None,
                 on_closed: Callable[[H2Link, str], None] | None = None) -> None:
        self.client_side = client_side
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=client_side, header_encoding="utf-8"))
        self.on_stream, self.on_closed = on_stream, on_closed
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, StreamTransport] = {}
        self._answers: dict[int, asyncio.Future[Headers]] = {}
        self._room = True  # the TLS transport takes writes (not paused)
        self.since = time.time()
        self.last_heard = time.monotonic()
        self.bytes_in = self.bytes_out = 0
        self.close_reason = ""
        self.closed = asyncio.Event()
        self._keepalive: asyncio.Task[None] | None = None

    # -- asyncio.Protocol ---------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conn.local_settings = h2.settings.Settings(
            client=self.client_side,
            initial_values={h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS:
                            0 if self.client_side else MAX_STREAMS,
                            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 8192,
                            h2.settings.SettingCodes.ENABLE_PUSH: 0})
        self.conn.decoder.max_header_list_size = 8192
        self.conn.initiate_connection()
        self.conn.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._flush()
        self._keepalive = asyncio.get_running_loop().create_task(self._ping_forever(),
                                                                  name="tunnel-keepalive")

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self._flush()  # h2's GOAWAY, saying why
            self.abort(f"the peer broke the HTTP/2 protocol: {printable(str(exc)[:MAX_REASON])}")
            return
        if events:  # whole frames: bytes dribbled into one that never ends prove nothing
            self.last_heard = time.monotonic()
        for ev in events:
            self._handle(ev)
        self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(self.close_reason or (f"connection lost: {exc}" if exc
                                           else "the peer closed the tunnel"))

    def pause_writing(self) -> None:
        self._room = False

    def resume_writing(self) -> None:
        self._room = True
        for stream in list(self.streams.values()):
            self.pump(stream)

    # -- events ---------------------------------------------------------------------

    def _handle(self, ev: h2.events.Event) -> None:
        sid = getattr(ev, "stream_id", None)
        stream = self.streams.get(sid) if sid else None
        if isinstance(ev, h2.events.RequestReceived):
            self._requested(ev)
        elif isinstance(ev, h2.events.ResponseReceived):
            answer = self._answers.pop(ev.stream_id, None)
            if answer is not None and not answer.done():
                answer.set_result(dict(ev.headers))  # type: ignore[arg-type]
        elif isinstance(ev, h2.events.DataReceived):
            if stream is None:  # reset by us, data still in flight: give the window back
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            else:
                stream.deliver(ev.data, ev.flow_controlled_length)
        elif isinstance(ev, h2.events.StreamEnded):
            self._remote_ended(ev.stream_id)
        elif isinstance(ev, h2.events.StreamReset):
            self._reset_by_peer(ev.stream_id)
        elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            targets = ([stream] if stream else []) if sid else list(self.streams.values())
            for target in targets:
                self.pump(target)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            said = printable((ev.additional_data or b"").decode(errors="replace")[:MAX_REASON])
            self.abort(f"the peer ended the tunnel: {said or f'HTTP/2 GOAWAY, code {ev.error_code}'}")

    def _requested(self, ev: h2.events.RequestReceived) -> None:
        headers: Headers = dict(ev.headers)  # type: ignore[arg-type]
        if self.on_stream is None:  # the server's side never serves a stream
            self.conn.reset_stream(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        self.on_stream(self, self._add(ev.stream_id), headers)

    def _remote_ended(self, stream_id: int) -> None:
        answer = self._answers.pop(stream_id, None)
        if answer is not None and not answer.done():
            answer.set_exception(TunnelError("the agent ended the stream without answering"))
        stream = self.streams.get(stream_id)
        if stream is None:
            return
        stream.remote_ended = True
        protocol = stream.get_protocol()
        if isinstance(protocol, asyncio.Protocol):
            protocol.eof_received()
        if stream.local_ended:
            self._drop(stream, None)

    def _reset_by_peer(self, stream_id: int) -> None:
        answer = self._answers.pop(stream_id, None)
        if answer is not None and not answer.done():
            answer.set_exception(TunnelError("the agent refused the stream"))
        stream = self.streams.get(stream_id)
        if stream is not None:
            # The peer's relay ends a stream this way once its side closed: what it sent
            # before stays readable.
            self._drop(stream, None)

    # -- streams --------------------------------------------------------------------

    def _add(self, stream_id: int) -> StreamTransport:
        stream = StreamTransport(self, stream_id)
        self.streams[stream_id] = stream
        stream.get_protocol().connection_made(stream)  # type: ignore[attr-defined]
        return stream

    async def open_stream(self, path: str, timeout: float = OPEN_TIMEOUT) -> \
            tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new stream to `path` on the peer, once the peer said yes (status 200)."""
        if self.closed.is_set():
            raise TunnelError(f"the tunnel is closed: {self.close_reason}")
        try:
            stream_id = self.conn.get_next_available_stream_id()
            self.conn.send_headers(stream_id, [(":method", "POST"), (":scheme", "https"),
                                               (":authority", "virtfleet-agent"), (":path", path)])
        except (h2.exceptions.TooManyStreamsError, h2.exceptions.NoAvailableStreamIDError):
            raise TunnelError("the agent serves no more streams at once") from None
        stream = self._add(stream_id)
        answer = asyncio.get_running_loop().create_future()
        self._answers[stream_id] = answer
        self._flush()
        try:
            async with asyncio.timeout(timeout):
                headers = await answer
        except BaseException as exc:
            self._answers.pop(stream_id, None)
            self.reset(stream)
            if isinstance(exc, TimeoutError):
                raise TunnelError(f"the agent did not answer within {timeout:g} s") from None
            raise
        if headers.get(":status") != "200":
            self.reset(stream)
            raise TunnelError(f"the agent refused: {printable(headers.get('reason', '')[:MAX_REASON])} "
                              f"(status {printable(headers.get(':status', '?')[:8])})")
        return stream.pair()

    def accept(self, stream: StreamTransport) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Say yes to a stream the peer opened; its reader and writer."""
        self.conn.send_headers(stream.stream_id, [(":status", "200")])
        self._flush()
        return stream.pair()

    def refuse(self, stream: StreamTransport, status: int, reason: str) -> None:
        """Say no to a stream the peer opened, and why."""
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.send_headers(stream.stream_id, [(":status", str(status)),
                                                      ("reason", printable(reason[:MAX_REASON]))],
                                   end_stream=True)
        self.reset(stream)

    def pump(self, stream: StreamTransport) -> None:
        """Send what the stream has queued, as far as the windows and the TLS transport allow."""
        if stream.finished:
            return
        try:
            while stream.out and self._room:
                window = min(self.conn.local_flow_control_window(stream.stream_id),
                             self.conn.max_outbound_frame_size)
                if window <= 0:
                    break
                chunk = bytes(stream.out[:window])
                del stream.out[:window]
                self.conn.send_data(stream.stream_id, chunk)
                stream.sent += len(chunk)
            if stream.end_pending and not stream.out and not stream.local_ended:
                self.conn.end_stream(stream.stream_id)
                stream.local_ended = True
        except h2.exceptions.StreamClosedError:
            self._drop(stream, ConnectionResetError("the tunnel stream was closed by the peer"))
            return
        self._flush()
        stream.queued_changed()
        if stream.local_ended and stream.remote_ended:
            self._drop(stream, None)

    def acknowledge(self, stream: StreamTransport) -> None:
        if stream.unacked:
            self.conn.acknowledge_received_data(stream.unacked, stream.stream_id)
            stream.unacked = 0
            self._flush()

    def reset(self, stream: StreamTransport) -> None:
        if not (stream.local_ended and stream.remote_ended):
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.reset_stream(stream.stream_id, h2.errors.ErrorCodes.CANCEL)
            self._flush()
        self._drop(stream, None)

    def _drop(self, stream: StreamTransport, exc: Exception | None) -> None:
        if self.streams.get(stream.stream_id) is stream:
            del self.streams[stream.stream_id]
            if stream.unacked:  # what it never read still counts against the connection
                self.conn.acknowledge_received_data(stream.unacked, stream.stream_id)
                stream.unacked = 0
        stream.end(exc)

    # -- the connection -------------------------------------------------------------

    def _flush(self) -> None:
        data = self.conn.data_to_send()
        if data and self.transport is not None and not self.transport.is_closing():
            self.bytes_out += len(data)
            self.transport.write(data)

    async def _ping_forever(self) -> None:
        while True:
            await asyncio.sleep(PING_EVERY)
            silent = time.monotonic() - self.last_heard
            if silent > DEAD_AFTER:
                self.abort(f"no answer from the peer for {silent:.0f} s (network cut, or the "
                           "peer hangs)")
                return
            with contextlib.suppress(h2.exceptions.ProtocolError):
                self.conn.ping(os.urandom(8))
            self._flush()

    def close(self, reason: str) -> None:
        """End the tunnel, telling the peer (GOAWAY) first."""
        with contextlib.suppress(h2.exceptions.ProtocolError):
            self.conn.close_connection(additional_data=reason.encode()[:MAX_REASON])
        self._flush()
        self.abort(reason)

    def abort(self, reason: str) -> None:
        if not self.close_reason:
            self.close_reason = reason
        if self.transport is not None:
            # Give what was written (a GOAWAY) a moment to leave, then cut.
            transport = self.transport
            transport.close()
            asyncio.get_running_loop().call_later(1.0, transport.abort)
        self._finish(reason)

    def _finish(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = self.close_reason or reason
        self.closed.set()
        if self._keepalive is not None:
            self._keepalive.cancel()
        for answer in self._answers.values():
            if not answer.done():
                answer.set_exception(TunnelError(f"the tunnel closed: {self.close_reason}"))
        self._answers.clear()
        for stream in list(self.streams.values()):
            self._drop(stream, ConnectionResetError(f"the tunnel closed: {self.close_reason}"))
        if self.on_closed is not None:
            self.on_closed(self, self.close_reason)

    def describe(self) -> dict[str, Any]:
        return {"since": self.since, "streams": len(self.streams), "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out}


async def connect(url: str, ctx: ssl.SSLContext, alpn: str, make_link: Callable[[], H2Link],
                  timeout: float) -> H2Link:
    """An HTTP/2 link over TLS to `url` whose peer chose `alpn` (set on `ctx` here).
    OSError, ssl.SSLError or TimeoutError when it cannot be reached; NotSpoken when the
    peer does not speak `alpn` (an older version)."""
    parts = urlsplit(url)
    ctx.set_alpn_protocols([alpn])
    async with asyncio.timeout(timeout):
        transport, link = await asyncio.get_running_loop().create_connection(
            make_link, parts.hostname or "", parts.port or 443, ssl=ctx,
            ssl_handshake_timeout=timeout)
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None or ssl_object.selected_alpn_protocol() != alpn:
        transport.abort()
        raise NotSpoken(f"{url} does not speak {alpn} (an older version?)")
    return link


class NotSpoken(ConnectionError):
    """The peer answered TLS but not with the protocol asked for."""
