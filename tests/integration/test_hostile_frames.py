"""Hostile frame streams against an in-process RelayServer, on asyncio and on uvloop.

A peer past the opening handshake holds a token (or, without tokens, is any local
user); what it sends must not cost the relay memory without bound or hold its event
loop. Each test opens a raw WebSocket (`migrelay.aio.client.open_websocket`: the
transport comes back with reading paused) and writes frames by hand:

* Pings while never reading the Pongs: the control frames the server queues stay under
  `Limits.control_queue_bound`, and the channel ends promptly when the client goes away,
  or by the liveness check when it stays connected.
* A stream of tiny frames: no event-loop callback parses more than
  `Limits.frames_per_callback` of them, and another channel through the same server
  completes while the stream is still being parsed.

The checks count (bytes queued, frames per callback); the waits are bounded only so
that a relay that hangs fails the test.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests.helpers import FACTOR, wait_until

from migrelay.aio.channel import Channel
from migrelay.aio.client import ClientConfig, SourceRelay, open_websocket
from migrelay.aio.server import RelayServer, ServerConfig
from migrelay.core.events import FrameEvent, PingReceived
from migrelay.core.frames import MAX_CONTROL_PAYLOAD_BYTES, Opcode, encode_frame
from migrelay.core.session import RelaySession
from migrelay.limits import Limits

Run = Callable[[Coroutine[Any, Any, None]], None]

#: How long the relay may take to notice a peer that went away: "promptly", far below
#: the liveness timeout (`Limits.ping_interval` + `Limits.ping_timeout`, 30 s).
PROMPT_SECONDS = 2.0 * FACTOR
#: Upper bound for a flood to reach its steady state or be parsed through.
FLOOD_SECONDS = 60.0 * FACTOR
MASK_KEY = b"\x1f\x2e\x3d\x4c"
#: The flood of the Pong test: Pings with the largest payload, so the Pongs outgrow the
#: kernel's socket buffers (26 MB of them) if the relay keeps reading.
PINGS = 200_000
PINGS_PER_WRITE = 1000
#: The flood of the frames-per-callback test: 2 MiB of the smallest client frame there
#: is (a masked Ping without payload: 6 bytes).
TINY_FRAMES = (2 << 20) // 6
#: What the other channel sends through the same server meanwhile.
OTHER_BYTES = 256 << 10


# -- a destination that reads to EOF and answers -------------------------------------


@dataclass
class Destination:
    """Destination QEMU's stand-in: reads each connection to EOF, answers, closes."""

    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.writers.append(writer)
        count = 0
        with contextlib.suppress(ConnectionError):
            while chunk := await reader.read(1 << 20):
                count += len(chunk)
            writer.write(f"ok {count}".encode())
            writer.write_eof()
            await writer.drain()
        writer.close()

    async def close(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        if self.tasks:
            await asyncio.wait_for(asyncio.gather(*self.tasks), PROMPT_SECONDS)


@dataclass
class Rig:
    server: RelayServer
    url: str
    src: Path
    limits: Limits

    def only_channel(self) -> Channel:
        (channel,) = self.server.channels
        return channel


@contextlib.asynccontextmanager
async def serve(sock_dir: Path, limits: Limits) -> AsyncIterator[Rig]:
    """A RelayServer to a destination unix server, and a SourceRelay to that server."""
    dest_path, src = sock_dir / "dest.sock", sock_dir / "src.sock"
    destination = Destination()
    dest_server = await asyncio.start_unix_server(destination.handle, str(dest_path))
    server = RelayServer(ServerConfig(port=0, target=dest_path, wait_target=5.0, limits=limits))
    await server.start()
    url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
    source = SourceRelay(ClientConfig(url=url, limits=limits), src, once=True)
    await source.start()
    try:
        yield Rig(server, url, src, limits)
    finally:
        await asyncio.wait_for(source.close(), PROMPT_SECONDS)
        await asyncio.wait_for(server.close(), 3 * PROMPT_SECONDS)
        dest_server.close()
        await destination.close()
        await asyncio.wait_for(dest_server.wait_closed(), PROMPT_SECONDS)


def ping_flood(payload: bytes, pings_per_write: int) -> bytes:
    return bytes(encode_frame(Opcode.PING, payload, MASK_KEY)) * pings_per_write


async def flood_without_reading(rig: Rig) -> tuple[asyncio.Transport, Channel]:
    """Open a WebSocket, send `PINGS` full-size Pings, never read; return when the
    server stopped taking them (the client's own queue stops shrinking)."""
    transport, _ = await open_websocket(ClientConfig(url=rig.url))
    await wait_until(lambda: len(rig.server.channels) == 1, PROMPT_SECONDS, "the channel")
    channel = rig.only_channel()
    chunk = ping_flood(b"p" * MAX_CONTROL_PAYLOAD_BYTES, PINGS_PER_WRITE)
    for _ in range(PINGS // PINGS_PER_WRITE):
        transport.write(chunk)
    bound = rig.limits.control_queue_bound
    largest = 0
    unchanged = 0
    last = -1
    loop = asyncio.get_running_loop()
    deadline = loop.time() + FLOOD_SECONDS
    # The server's queue towards the client is sampled every few ms until the client's
    # own queue has not moved for 100 samples (the server stopped reading).
    while unchanged < 100:
        assert loop.time() < deadline, "the server kept reading a peer that does not read"
        await asyncio.sleep(0.002)
        largest = max(largest, channel.ws_transport.get_write_buffer_size())
        assert largest <= bound, f"{largest} bytes queued for a peer that does not read"
        left = transport.get_write_buffer_size()
        assert left > 0, "the server took every Ping of a peer that never read a Pong"
        unchanged = unchanged + 1 if left == last else 0
        last = left
    return transport, channel


# -- Pongs for a peer that does not read ---------------------------------------------


def test_pongs_for_a_peer_that_never_reads_stay_bounded_and_its_close_frees_the_channel(
    run_async: Run, sock_dir: Path
) -> None:
    async def main() -> None:
        async with serve(sock_dir, Limits()) as rig:
            transport, channel = await flood_without_reading(rig)
            assert not channel.ws_transport.is_reading()
            assert channel.ws_transport.get_write_buffer_size() <= rig.limits.control_queue_bound
            # The client goes away with Pongs unread (a reset): not a liveness timeout.
            transport.abort()
            await asyncio.wait_for(channel.closed.wait(), PROMPT_SECONDS)
            assert not rig.server.channels
            assert channel.end_reason is not None and "websocket" in channel.end_reason

    run_async(main())


LIVENESS = Limits(ping_interval=0.3, ping_timeout=0.3)


def test_peer_flooding_pings_and_never_reading_is_ended_by_the_liveness_check(
    run_async: Run, sock_dir: Path
) -> None:
    async def main() -> None:
        async with serve(sock_dir, LIVENESS) as rig:
            transport, channel = await flood_without_reading(rig)
            # Its bytes are no longer read, so nothing proves it alive: a Ping, then
            # the end, at most 2 × ping_interval + ping_timeout after its last byte read.
            latest = 2 * LIVENESS.ping_interval + LIVENESS.ping_timeout
            await asyncio.wait_for(channel.closed.wait(), latest + PROMPT_SECONDS)
            assert channel.end_reason is not None and "liveness" in channel.end_reason
            transport.abort()

    run_async(main())


# -- tiny frames: a budget per callback, and no starving of other channels -------------


@dataclass
class FramesPerCall:
    """Counts the events of each call into a RelaySession: one per loop callback."""

    counts: list[int] = field(default_factory=list)
    pings: int = 0
    _depth: int = 0

    def wrap(self, method: Callable[..., Any]) -> Callable[..., Any]:
        def counted(session: RelaySession, *args: Any) -> Any:
            self._depth += 1
            try:
                result = method(session, *args)
            finally:
                self._depth -= 1
            if self._depth == 0:
                events: list[FrameEvent] = result[0] if isinstance(result, tuple) else result
                self.counts.append(len(events))
                self.pings += sum(isinstance(event, PingReceived) for event in events)
            return result

        return counted


class Discard(asyncio.Protocol):
    def data_received(self, data: bytes) -> None:
        pass


async def other_channel(rig: Rig) -> bytes:
    """Send `OTHER_BYTES` through the SourceRelay and the server; return the answer."""
    reader, writer = await asyncio.open_unix_connection(str(rig.src))
    writer.write(b"x" * OTHER_BYTES)
    writer.write_eof()
    answer = await reader.read()
    writer.close()
    return answer


def test_tiny_frames_are_parsed_a_budget_per_callback_while_another_channel_completes(
    run_async: Run, sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = FramesPerCall()
    monkeypatch.setattr(RelaySession, "receive_data", calls.wrap(RelaySession.receive_data))
    frames_method = getattr(RelaySession, "receive_frames", None)
    if frames_method is not None:
        monkeypatch.setattr(RelaySession, "receive_frames", calls.wrap(frames_method))

    async def main() -> None:
        limits = Limits()
        async with serve(sock_dir, limits) as rig:
            transport, _ = await open_websocket(ClientConfig(url=rig.url))
            transport.set_protocol(Discard())  # reads and drops the Pongs
            transport.resume_reading()
            flood = ping_flood(b"", 1 << 14)
            for _ in range(TINY_FRAMES // (1 << 14)):
                transport.write(flood)
            total = TINY_FRAMES // (1 << 14) * (1 << 14)
            await wait_until(lambda: calls.pings > 0, PROMPT_SECONDS, "the flood to arrive")
            answer = await asyncio.wait_for(other_channel(rig), FLOOD_SECONDS)
            pings_when_other_done = calls.pings
            assert answer == f"ok {OTHER_BYTES}".encode()
            await wait_until(lambda: calls.pings == total, FLOOD_SECONDS, "the whole flood")
            transport.abort()
            # The other channel did not wait for the flood to be parsed through...
            assert pings_when_other_done < total
            # ...because no callback parsed more than its budget of the flood's frames.
            assert max(calls.counts) <= limits.frames_per_callback, max(calls.counts)

    run_async(main())
