"""A `Channel` built from real socketpairs, on asyncio and on uvloop.

QEMU's side is a unix socketpair; the WebSocket after its handshake is another unix
socketpair, whose far end the test drives with a `RelaySession` of the opposite role
(the peer relay, without its own sockets). Each test says which closing rule or data
path rule it checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from typing import Any, cast

import pytest
from tests.helpers import FACTOR, wait_until

from migrelay.aio.channel import (
    HEADROOM,
    UNIX_SNDBUF_BYTES,
    Channel,
    ReadBuffers,
    UnixLeg,
    WsPause,
    direct_fd,
    send_direct,
    send_nogil,
)
from migrelay.core.events import (
    CloseReceived,
    EndOfStream,
    FrameEvent,
    Payload,
    PingReceived,
    PongReceived,
)
from migrelay.core.frames import MAX_HEADER_BYTES, CloseCode, Opcode, encode_frame
from migrelay.core.session import RelaySession, Role
from migrelay.limits import Limits

Run = Callable[[Coroutine[Any, Any, None]], None]

PROMPT_SECONDS = 5.0 * FACTOR
#: Small reads, so a few MiB make many of them.
LIMITS = Limits(read_bytes=64 << 10, ping_interval=0, close_timeout=2.0 * FACTOR)
KEY = b"\x0a\x0b\x0c\x0d"


class CountingUnixLeg(UnixLeg):
    """A UnixLeg that remembers every buffer it handed to the event loop."""

    def __init__(self, read_bytes: int) -> None:
        super().__init__(read_bytes)
        self.handed_out: set[int] = set()
        self.reads = 0

    def get_buffer(self, sizehint: int) -> memoryview:
        view = super().get_buffer(sizehint)
        self.handed_out.add(id(view.obj))
        self.reads += 1
        return view


@dataclass
class Peer:
    """The far end of the WebSocket: a RelaySession of the other role over raw bytes."""

    session: RelaySession
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    received: bytearray = field(default_factory=bytearray)
    events: list[FrameEvent] = field(default_factory=list)
    raw_total: int = 0

    def send(self, payload: bytes) -> None:
        buffer = bytearray(MAX_HEADER_BYTES) + payload
        start = self.session.frame_data(buffer, MAX_HEADER_BYTES, len(payload))
        self.writer.write(bytes(buffer[start:]))

    def flush(self) -> None:
        for chunk in self.session.data_to_send():
            self.writer.write(bytes(chunk))

    async def read_until(self, predicate: Callable[[], bool], what: str) -> None:
        """Read frames (answering pings and closes) until ``predicate`` holds."""

        async def loop() -> None:
            while not predicate():
                chunk = await self.reader.read(256 << 10)
                if not chunk:
                    break
                self.raw_total += len(chunk)
                for event in self.session.receive_data(memoryview(bytearray(chunk))):
                    self.events.append(event)
                    if isinstance(event, Payload):
                        self.received += event.data
                self.flush()
            assert predicate(), f"peer: {what} never happened; events {self.events[-5:]}"

        await asyncio.wait_for(loop(), PROMPT_SECONDS)

    def got(self, kind: type) -> bool:
        return any(isinstance(event, kind) for event in self.events)


def has_received(peer: Peer, nbytes: int) -> bool:
    return len(peer.received) >= nbytes


@dataclass
class Rig:
    channel: Channel
    unix_leg: CountingUnixLeg
    qemu_reader: asyncio.StreamReader
    qemu_writer: asyncio.StreamWriter
    peer: Peer
    ended: list[Channel]

    async def finished(self) -> None:
        await asyncio.wait_for(self.channel.closed.wait(), PROMPT_SECONDS)

    def close_all(self) -> None:
        self.qemu_writer.transport.abort()
        self.peer.writer.transport.abort()
        if not self.channel.closed.is_set():
            self.channel.abort("test over")


async def make_rig(role: Role, limits: Limits = LIMITS, trailing: bytes = b"") -> Rig:
    """A channel of ``role``, started, with QEMU's end and the peer's end as streams.

    ``trailing``: bytes that came with the handshake, which the channel parses first.
    """
    loop = asyncio.get_running_loop()
    qemu_sock, relay_unix_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    peer_sock, relay_ws_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for sock in (qemu_sock, relay_unix_sock, peer_sock, relay_ws_sock):
        sock.setblocking(False)
    _, unix_leg = await loop.connect_accepted_socket(
        lambda: CountingUnixLeg(limits.read_bytes), relay_unix_sock
    )
    # The handshake's protocol, replaced by the channel's own (set_protocol), as in
    # the relays.
    ws_transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, relay_ws_sock)
    qemu_reader, qemu_writer = await asyncio.open_connection(sock=qemu_sock)
    peer_reader, peer_writer = await asyncio.open_connection(sock=peer_sock)
    peer_role = Role.CLIENT if role is Role.SERVER else Role.SERVER
    peer = Peer(RelaySession(peer_role, mask_key=lambda: KEY), peer_reader, peer_writer)
    ended: list[Channel] = []
    ws_transport.pause_reading()  # handed over paused, as the relays do
    channel = Channel(
        RelaySession(role),
        unix_leg,
        ws_transport,
        limits,
        f"test/{role.value}",
        on_closed=ended.append,
    )
    channel.start(trailing)
    return Rig(channel, unix_leg, qemu_reader, qemu_writer, peer, ended)


@pytest.fixture
def channel_logs(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setattr(logging.getLogger("migrelay"), "propagate", True)
    caplog.set_level(logging.INFO, logger="migrelay.aio.channel")
    return caplog


def closed_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if " closed: " in r.getMessage()]


ROLES = [Role.SERVER, Role.CLIENT]


# -- data and half-close -----------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES, ids=lambda r: r.value)
def test_data_both_ways_intact_then_half_closes_then_a_clean_close(
    run_async: Run, role: Role, channel_logs: pytest.LogCaptureFixture
) -> None:
    to_peer, to_qemu = os.urandom(3 << 20), os.urandom(3 << 20)

    async def main() -> None:
        rig = await make_rig(role)
        try:
            peer = rig.peer
            rig.qemu_writer.write(to_peer)
            for offset in range(0, len(to_qemu), 200_000):
                peer.send(to_qemu[offset : offset + 200_000])
            got_by_qemu = rig.qemu_reader.readexactly(len(to_qemu))
            _, from_peer = await asyncio.gather(
                peer.read_until(lambda: len(peer.received) >= len(to_peer), "all data"),
                asyncio.wait_for(got_by_qemu, PROMPT_SECONDS),
            )
            assert bytes(peer.received) == to_peer
            assert from_peer == to_qemu

            # QEMU ends its direction first: the peer hears it, the other way stays open.
            rig.qemu_writer.write_eof()
            await peer.read_until(lambda: peer.got(EndOfStream), "end of stream")
            assert not rig.channel.closed.is_set()
            peer.send(b"still flowing the other way")
            late = await asyncio.wait_for(rig.qemu_reader.readexactly(27), PROMPT_SECONDS)
            assert late == b"still flowing the other way"

            # The peer ends its direction: QEMU reads EOF, and the close handshake runs.
            peer.session.send_end_of_stream()
            peer.flush()
            assert await asyncio.wait_for(rig.qemu_reader.read(), PROMPT_SECONDS) == b""
            await peer.read_until(lambda: peer.got(CloseReceived), "the Close")
            if role is Role.CLIENT:
                peer.writer.close()  # the server closes TCP first (RFC 6455 §7.1.1)
            await rig.finished()
            assert rig.channel.clean
            assert rig.channel.bytes_sent == len(to_peer)
            assert rig.channel.bytes_rcvd == len(to_qemu) + 27
        finally:
            rig.close_all()

    run_async(main())
    assert_closed_line(channel_logs, expected_clean=True)


def assert_closed_line(caplog: pytest.LogCaptureFixture, expected_clean: bool) -> None:
    """The one definition of clean: the log line says who ended first ("ended by ...",
    never "completed") exactly when the test saw ``Channel.clean == expected_clean``
    (the source relay's exit status)."""
    lines = closed_lines(caplog)
    assert len(lines) == 1, lines
    assert (" closed: ended by the " in lines[0]) is expected_clean, lines
    assert " completed" not in lines[0], lines
    assert lines[0].endswith("close code 1000 normal") or not expected_clean, lines


# -- the peer closes, the unix side goes away --------------------------------------------


def test_peer_close_closes_the_unix_side_and_is_not_clean(
    run_async: Run, channel_logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        rig = await make_rig(Role.SERVER)
        try:
            rig.peer.send(b"last words")
            rig.peer.session.send_close(CloseCode.NORMAL)
            rig.peer.flush()
            # Everything sent before the Close is delivered, then QEMU reads EOF.
            data = await asyncio.wait_for(rig.qemu_reader.read(), PROMPT_SECONDS)
            assert data == b"last words"
            await rig.finished()
            assert not rig.channel.clean
            assert rig.channel.end_reason == "peer closed with 1000 normal"
        finally:
            rig.close_all()

    run_async(main())
    assert_closed_line(channel_logs, expected_clean=False)


def test_unix_reset_ends_our_direction_like_eof(run_async: Run) -> None:
    async def main() -> None:
        rig = await make_rig(Role.SERVER)
        try:
            peer = rig.peer
            # The bytes stay in QEMU's socket, unread.
            cast(asyncio.Transport, rig.qemu_writer.transport).pause_reading()
            # QEMU closes with bytes unread (QEMU 7.2's destination does, at the end of
            # a migration): the relay's next read on the unix side is a reset.
            peer.send(b"never read by QEMU")
            await wait_until(lambda: rig.channel.bytes_rcvd == 18, PROMPT_SECONDS, "delivery")
            rig.qemu_writer.transport.abort()
            await peer.read_until(lambda: peer.got(EndOfStream), "end of stream")
            assert isinstance(rig.channel.session.local_error, ConnectionResetError)
            assert rig.channel.session.outcome().description == "closed"  # no failure (yet)
            assert not peer.got(CloseReceived)
            # The peer's data now cannot be delivered: the channel fails with 4000.
            peer.send(b"too late")
            await peer.read_until(lambda: peer.got(CloseReceived), "the Close")
            close = [e for e in peer.events if isinstance(e, CloseReceived)]
            assert close[0].code == CloseCode.DESTINATION_CLOSED
            await rig.finished()
            assert rig.channel.end_reason is not None
            assert "while data was still arriving" in rig.channel.end_reason
        finally:
            rig.close_all()

    run_async(main())


def test_late_bytes_after_our_close_are_dropped_not_raised(run_async: Run) -> None:
    async def main() -> None:
        rig = await make_rig(Role.CLIENT)
        try:
            channel, leg = rig.channel, rig.unix_leg
            channel.close(CloseCode.SHUTDOWN, "test shut down")
            sent = channel.bytes_sent
            # The loop may still deliver a read that was under way: it must be dropped.
            view = leg.get_buffer(-1)
            view[:4] = b"late"
            leg.buffer_updated(4)
            assert channel.bytes_sent == sent
            await rig.peer.read_until(lambda: rig.peer.got(CloseReceived), "the Close")
            assert not rig.peer.got(Payload)
            rig.peer.writer.close()
            await rig.finished()
            assert channel.end_reason == "test shut down"
        finally:
            rig.close_all()

    run_async(main())


# -- liveness ------------------------------------------------------------------------------


def test_unanswered_ping_closes_with_4002(
    run_async: Run, channel_logs: pytest.LogCaptureFixture
) -> None:
    limits = Limits(read_bytes=LIMITS.read_bytes, ping_interval=0.05, ping_timeout=0.05)

    async def main() -> None:
        rig = await make_rig(Role.SERVER, limits)
        try:
            await rig.finished()  # the peer never reads, so never answers
            raw = await asyncio.wait_for(rig.peer.reader.read(), PROMPT_SECONDS)
            events = RelaySession(Role.CLIENT).receive_data(memoryview(bytearray(raw)))
            assert events[0] == PingReceived(b"migrelay")
            assert CloseReceived(CloseCode.IDLE_TIMEOUT, "") in events
            assert rig.channel.end_reason == "peer silent for 0.1 s (liveness timeout)"
            assert not rig.channel.clean
        finally:
            rig.close_all()

    run_async(main())
    assert_closed_line(channel_logs, expected_clean=False)
    lines = closed_lines(channel_logs)
    assert "liveness timeout" in lines[0] and lines[0].endswith("4002 liveness timeout")


def test_a_peer_that_answers_pings_stays_connected(run_async: Run) -> None:
    limits = Limits(read_bytes=LIMITS.read_bytes, ping_interval=0.02, ping_timeout=0.02)

    async def main() -> None:
        rig = await make_rig(Role.SERVER, limits)
        try:
            peer = rig.peer

            def four_pings() -> bool:
                return sum(isinstance(e, PingReceived) for e in peer.events) >= 4

            await peer.read_until(four_pings, "four pings")
            assert not rig.channel.closed.is_set()
            assert rig.channel.end_reason is None
        finally:
            rig.close_all()

    run_async(main())


# -- two read buffers per direction ------------------------------------------------------


def test_read_buffers_alternate_and_refuse_a_third() -> None:
    buffers = ReadBuffers(HEADROOM, 1024)
    first = buffers.next_read()
    assert buffers.next_read().obj is first.obj  # free: the same (warm) buffer again
    buffers.hold_current()
    second = buffers.next_read()
    assert second.obj is not first.obj and len(second) == 1024
    buffers.hold_current()
    with pytest.raises(RuntimeError, match="both buffers in use"):
        buffers.next_read()
    buffers.release()
    assert buffers.next_read().obj is second.obj


def test_reads_after_pause_use_the_second_buffer_never_a_third(run_async: Run) -> None:
    async def main() -> None:
        rig = await make_rig(Role.CLIENT)
        try:
            channel, leg = rig.channel, rig.unix_leg
            # As if the WebSocket transport kept a frame queued, and the loop read again
            # after pause_reading() (uvloop was seen to).
            channel.pause_unix_reading()
            seen = set()
            for payload in (b"one", b"two"):
                view = leg.get_buffer(-1)
                view[: len(payload)] = payload
                seen.add(id(view.obj))
                leg.buffer_updated(len(payload))
            assert len(seen) == 2
            with pytest.raises(RuntimeError):
                leg.get_buffer(-1)
            channel.resume_unix_reading()
            assert id(leg.get_buffer(-1).obj) in seen
            await rig.peer.read_until(lambda: rig.peer.received == b"onetwo", "both reads")
        finally:
            rig.close_all()

    run_async(main())


def test_each_direction_holds_at_most_two_buffers_under_backpressure(run_async: Run) -> None:
    to_peer, to_qemu = os.urandom(8 << 20), os.urandom(8 << 20)

    async def main() -> None:
        rig = await make_rig(Role.CLIENT)
        try:
            peer, channel, leg = rig.peer, rig.channel, rig.unix_leg
            ws_buffers = channel._ws_leg.buffers
            ws_first = id(ws_buffers.view.obj)
            rig.qemu_writer.write(to_peer)
            for offset in range(0, len(to_qemu), 1 << 20):
                peer.send(to_qemu[offset : offset + (1 << 20)])

            async def slow_qemu() -> bytes:
                data = bytearray()
                while len(data) < len(to_qemu):
                    data += await rig.qemu_reader.read(32 << 10)
                    await asyncio.sleep(0)  # let the unix transport's queue build up
                return bytes(data)

            async def slow_peer() -> None:
                while len(peer.received) < len(to_peer):
                    target = min(len(to_peer), len(peer.received) + (256 << 10))
                    await peer.read_until(partial(has_received, peer, target), "more data")
                    await asyncio.sleep(0)  # let the WebSocket's queue build up

            from_peer, _ = await asyncio.gather(
                asyncio.wait_for(slow_qemu(), PROMPT_SECONDS),
                asyncio.wait_for(slow_peer(), PROMPT_SECONDS),
            )
            assert from_peer == to_qemu
            assert bytes(peer.received) == to_peer
            assert leg.reads > 100
            assert len(leg.handed_out) <= 2, leg.handed_out
            # Each leg allocated at most its two buffers, and kept the first.
            ws_ids = {id(view.obj) for view in ws_buffers.views if view is not None}
            assert ws_first in ws_ids and len(ws_ids) <= 2, ws_ids
            views = (*leg.buffers.views, *ws_buffers.views)
            held = sum(len(view) for view in views if view is not None)
            assert held <= LIMITS.channel_memory_bound
        finally:
            rig.close_all()

    run_async(main())


def test_read_buffers_alternate_allocate_the_second_once_and_never_a_third() -> None:
    buffers = ReadBuffers(HEADROOM, 4096)

    def allocated() -> int:
        return sum(view is not None for view in buffers.views)

    first = buffers.next_read()
    assert allocated() == 1  # nothing held yet: one buffer is all it has
    assert len(first) == 4096 and buffers.next_read().obj is first.obj  # reused while free
    buffers.hold_current()  # its bytes are queued in the opposite transport
    second = buffers.next_read()
    assert second.obj is not first.obj and allocated() == 2
    buffers.hold_current()
    with pytest.raises(RuntimeError, match="both buffers in use"):
        buffers.next_read()  # refilling either would corrupt the stream
    buffers.release()
    assert buffers.next_read().obj is second.obj  # the current one, still warm
    buffers.hold_current()
    assert buffers.next_read().obj is first.obj  # the same two, never a new one
    assert {id(v.obj) for v in buffers.views if v is not None} == {id(first.obj), id(second.obj)}


def test_read_buffers_keep_an_unparsed_buffer_held_after_the_transport_drained() -> None:
    buffers = ReadBuffers(0, 4096)
    first = buffers.next_read()
    index = buffers.keep_unparsed()  # part of it waits for a later loop iteration
    buffers.hold_current()
    buffers.release()  # the opposite transport drained: not enough to refill it
    assert buffers.next_read().obj is not first.obj
    buffers.parsed(index)
    buffers.hold_current()  # the second one's bytes are queued now
    assert buffers.next_read().obj is first.obj


# -- what a peer may cost per callback and in queued replies ----------------------------


def test_pings_in_one_read_are_parsed_a_budget_per_callback_and_all_answered_in_order(
    run_async: Run,
) -> None:
    limits = Limits(read_bytes=64 << 10, ping_interval=0, frames_per_callback=4)
    pings = 100

    async def main() -> None:
        rig = await make_rig(Role.SERVER, limits)
        try:
            channel, peer = rig.channel, rig.peer
            per_call: list[int] = []
            receive_frames = channel.session.receive_frames

            def counted(data: memoryview, max_frames: int) -> tuple[list[FrameEvent], int]:
                events, used = receive_frames(data, max_frames)
                per_call.append(len(events))
                return events, used

            channel.session.receive_frames = counted  # type: ignore[method-assign]
            peer.writer.write(
                b"".join(encode_frame(Opcode.PING, str(n).encode(), KEY) for n in range(pings))
            )

            def all_pongs() -> bool:
                return sum(isinstance(event, PongReceived) for event in peer.events) == pings

            await peer.read_until(all_pongs, "every Pong")
            pongs = [event for event in peer.events if isinstance(event, PongReceived)]
            assert [pong.payload for pong in pongs] == [str(n).encode() for n in range(pings)]
            assert max(per_call) == limits.frames_per_callback
            assert sum(per_call) == pings
            await wait_until(channel.ws_transport.is_reading, PROMPT_SECONDS, "reading again")
        finally:
            rig.close_all()

    run_async(main())


def test_websocket_reading_resumes_only_when_no_pause_reason_holds(run_async: Run) -> None:
    async def main() -> None:
        rig = await make_rig(Role.SERVER)
        try:
            channel = rig.channel
            transport = channel.ws_transport
            channel.pause_ws_reading()  # the unix transport keeps payload queued
            channel._pause_ws(WsPause.CONTROL_BACKLOG)  # and Pongs pile up for the peer
            assert not transport.is_reading()
            channel.resume_ws_reading()  # the unix side drained; the Pongs did not
            assert not transport.is_reading()
            channel.resume_unix_reading()  # the WebSocket's queue drained too
            assert transport.is_reading()
        finally:
            rig.close_all()

    run_async(main())


def test_frames_beyond_the_budget_in_the_handshake_leftovers_keep_the_websocket_paused(
    run_async: Run,
) -> None:
    # Bytes that arrived with the upgrade request are parsed by start(): beyond the
    # budget, the WebSocket must stay unread until they are (start() resumes reading
    # only when nothing holds it).
    limits = Limits(read_bytes=64 << 10, ping_interval=0, frames_per_callback=4)
    pings = 50
    trailing = b"".join(encode_frame(Opcode.PING, str(n).encode(), KEY) for n in range(pings))

    async def main() -> None:
        rig = await make_rig(Role.SERVER, limits, trailing)
        try:
            channel, peer = rig.channel, rig.peer
            assert not channel.ws_transport.is_reading()

            def all_pongs() -> bool:
                return sum(isinstance(event, PongReceived) for event in peer.events) == pings

            await peer.read_until(all_pongs, "every Pong")
            pongs = [event for event in peer.events if isinstance(event, PongReceived)]
            assert [pong.payload for pong in pongs] == [str(n).encode() for n in range(pings)]
            await wait_until(channel.ws_transport.is_reading, PROMPT_SECONDS, "reading again")
        finally:
            rig.close_all()

    run_async(main())


# -- writes without the GIL (send_direct) -----------------------------------------------


class _Sink(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.WriteTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.WriteTransport, transport)
        self.transport.set_write_buffer_limits(high=0)


def test_send_direct_keeps_the_order_behind_what_the_transport_queued(run_async: Run) -> None:
    """A full socket: the rest goes through the transport, and nothing overtakes it."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        transport, _ = await loop.create_unix_connection(_Sink, sock=ours)
        fd = direct_fd(transport)
        assert fd == ours.fileno() and send_nogil is not None
        chunks = [os.urandom(size) for size in (3 << 20, 100, 1 << 20, 7)]
        for chunk in chunks:
            send_direct(transport, fd, memoryview(chunk))
        # The socket took only part of the first chunk: the transport queued the rest,
        # and the later chunks went behind it, not straight to the socket.
        assert transport.get_write_buffer_size() > 0
        theirs.setblocking(False)
        received = bytearray()
        expected = b"".join(chunks)
        deadline = loop.time() + PROMPT_SECONDS
        while len(received) < len(expected) and loop.time() < deadline:
            try:
                received += theirs.recv(1 << 20)
            except BlockingIOError:
                await asyncio.sleep(0.001)
        assert bytes(received) == expected
        transport.close()
        theirs.close()

    run_async(main())


def test_send_direct_leaves_errors_and_closing_transports_to_the_transport(
    run_async: Run,
) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        transport, _ = await loop.create_unix_connection(_Sink, sock=ours)
        fd = direct_fd(transport)
        transport.close()
        # Closing, its descriptor still open until the loop runs: nothing goes straight
        # to it (the transport itself drops writes once closing).
        send_direct(transport, fd, memoryview(b"late"))
        theirs.setblocking(False)
        assert await asyncio.wait_for(loop.sock_recv(theirs, 100), PROMPT_SECONDS) == b""
        theirs.close()

        ours, theirs = socket.socketpair()
        transport, _ = await loop.create_unix_connection(_Sink, sock=ours)
        fd = direct_fd(transport)
        theirs.close()
        # The peer is gone: the direct send fails, and the transport reports it its way
        # (asyncio and uvloop both drop the write and close the transport).
        send_direct(transport, fd, memoryview(b"lost"))
        await wait_until(transport.is_closing, PROMPT_SECONDS, "the transport to close")
        await asyncio.sleep(0)  # connection_lost
        ours.close()  # uvloop works on a duplicate of the descriptor

    run_async(main())


def test_send_direct_lets_the_caller_read_what_a_vanished_peer_wrote_before_the_error(
    run_async: Run,
) -> None:
    """A peer that wrote, then died: the failed send calls ``before_error`` while the
    descriptor is still open, and what the peer wrote can still be read there."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        transport, _ = await loop.create_unix_connection(_Sink, sock=ours)
        fd = direct_fd(transport)
        last_words = os.urandom(100_000)
        theirs.sendall(last_words)  # unread by the relay when the peer dies
        theirs.close()
        salvaged = bytearray()

        def salvage() -> None:
            with contextlib.suppress(BlockingIOError):
                while chunk := os.read(fd, 1 << 16):
                    salvaged.extend(chunk)

        send_direct(transport, fd, memoryview(b"to a dead peer"), salvage)
        assert bytes(salvaged) == last_words
        await wait_until(transport.is_closing, PROMPT_SECONDS, "the transport to close")
        await asyncio.sleep(0)  # connection_lost

        # A write the socket takes: before_error is not called.
        ours, theirs = socket.socketpair()
        transport, _ = await loop.create_unix_connection(_Sink, sock=ours)
        called: list[bool] = []
        send_direct(
            transport, direct_fd(transport), memoryview(b"fine"), lambda: called.append(True)
        )
        assert called == [] and theirs.recv(10) == b"fine"
        transport.close()
        theirs.close()

    run_async(main())


def test_a_unix_leg_asks_for_a_4_mib_send_buffer(run_async: Run) -> None:
    """README (Data path and memory): "the unix legs ask for 4 MiB of send buffer, capped
    by net.core.wmem_max" (Linux doubles what is asked, for its bookkeeping)."""

    with open("/proc/sys/net/core/wmem_max") as limit:
        wmem_max = int(limit.read())

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        default = ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        transport, _ = await loop.create_unix_connection(lambda: UnixLeg(1 << 20), sock=ours)
        asked = ours.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert UNIX_SNDBUF_BYTES == 2 << 20
        assert asked == 2 * min(UNIX_SNDBUF_BYTES, wmem_max) != default
        transport.close()
        theirs.close()

    run_async(main())
