"""The README's memory rule, checked on the read buffers of a real relay pair.

README, "Data path and memory": each direction reads "into one preallocated 1 MiB
buffer"; "an event loop may deliver one more read after reading was paused (uvloop
does); it goes into a spare buffer while the first drains, so a direction holds at
most two"; so "Memory bound per channel: 4 MiB of migration data in user space".

An in-process ``serve`` and source relay carry 32 MiB each way between a "QEMU" and a
destination that both read slowly, so both directions of both relays spend the run in
backpressure. Every few milliseconds the test looks at the read buffers of every
channel of both relays: each buffer is 1 MiB (plus, on the unix side, the 14 bytes of
header room in front), a direction has at most two, a channel at most 4 MiB. The figures are the
README's, written here as numbers, not read from `migrelay.limits.Limits`: a change to
the buffers that the README does not state fails here.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests import helpers

from migrelay.aio.channel import Channel, ReadBuffers
from migrelay.aio.client import ClientConfig, SourceRelay
from migrelay.aio.server import RelayServer, ServerConfig
from migrelay.core.frames import MAX_HEADER_BYTES
from migrelay.limits import Limits

Run = Callable[[Coroutine[Any, Any, None]], None]

#: README: "one preallocated 1 MiB buffer per direction".
README_BUFFER_BYTES = 1 << 20
#: README: "a direction holds at most two".
README_BUFFERS_PER_DIRECTION = 2
#: README: "Memory bound per channel: 4 MiB of migration data in user space".
README_CHANNEL_BOUND_BYTES = 4 << 20
#: Room for a frame header in front of each buffer's payload (not counted by the README).
HEADER_ROOM_BYTES = MAX_HEADER_BYTES

TOTAL_BYTES = 32 << 20
#: Both slow readers take this much at a time and pace themselves to this rate: a
#: fraction of what the relays carry, so both directions are held back.
READ_BYTES = 128 << 10
READ_RATE_BYTES_PER_SECOND = 16 << 20
SAMPLE_SECONDS = 0.002
TRANSFER_SECONDS = 60.0 * helpers.FACTOR
PROMPT_SECONDS = 5.0 * helpers.FACTOR


def test_the_limits_are_the_readmes_figures() -> None:
    limits = Limits()
    assert limits.read_bytes == README_BUFFER_BYTES
    # The bound the relays enforce is the README's 4 MiB, header room aside.
    assert limits.channel_memory_bound == README_CHANNEL_BOUND_BYTES + 4 * HEADER_ROOM_BYTES


@dataclass
class Census:
    """What the samples saw, over every channel of both relays."""

    samples: int = 0
    #: The most buffers one direction (one leg) had allocated at once.
    most_per_direction: int = 0
    #: The most bytes of read buffers one channel had allocated at once.
    most_per_channel: int = 0
    #: Every buffer size seen.
    sizes: set[int] = field(default_factory=set)
    #: Samples in which some channel had stopped reading one side (backpressure).
    paused: int = 0
    channels: set[int] = field(default_factory=set)

    def look(self, channels: list[Channel]) -> None:
        self.samples += 1
        for channel in channels:
            self.channels.add(id(channel))
            held = 0
            for buffers in legs(channel):
                views = [view for view in buffers.views if view is not None]
                self.most_per_direction = max(self.most_per_direction, len(views))
                self.sizes.update(len(view) for view in views)
                held += sum(len(view) for view in views)
            self.most_per_channel = max(self.most_per_channel, held)
            if channel._unix_reading_paused or channel._ws_pauses:
                self.paused += 1


def legs(channel: Channel) -> tuple[ReadBuffers, ReadBuffers]:
    """The read buffers of both directions: unix → WebSocket and WebSocket → unix."""
    return channel.unix.buffers, channel._ws_leg.buffers


async def slow_read(reader: asyncio.StreamReader, digest: Any) -> int:
    """Read to EOF at `READ_RATE_BYTES_PER_SECOND`; return the byte count."""
    count, started = 0, time.monotonic()
    while chunk := await reader.read(READ_BYTES):
        digest.update(chunk)
        count += len(chunk)
        ahead = count / READ_RATE_BYTES_PER_SECOND - (time.monotonic() - started)
        if ahead > 0:
            await asyncio.sleep(ahead)
    return count


async def write_random(writer: asyncio.StreamWriter, seed: int, digest: Any) -> None:
    rng, left = random.Random(seed), TOTAL_BYTES
    while left:
        chunk = rng.randbytes(min(left, 1 << 20))
        left -= len(chunk)
        digest.update(chunk)
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()


@contextlib.asynccontextmanager
async def relay_pair(
    sock_dir: Path, workers: int
) -> AsyncIterator[tuple[RelayServer, SourceRelay]]:
    """``serve`` for dest.sock and a source relay (``once``) on src.sock, with default
    limits and ``workers`` worker loops each (the bound holds on a worker too)."""
    server = RelayServer(
        ServerConfig(port=0, target=sock_dir / "dest.sock", wait_target=5.0, workers=workers)
    )
    await server.start()
    port = server.sockets[0].getsockname()[1]
    source = SourceRelay(
        ClientConfig(url=f"ws://127.0.0.1:{port}/", workers=workers),
        sock_dir / "src.sock",
        once=True,
    )
    await source.start()
    try:
        yield server, source
    finally:
        await asyncio.wait_for(source.close(), PROMPT_SECONDS)
        await asyncio.wait_for(server.close(), 3 * PROMPT_SECONDS)


@pytest.mark.parametrize("workers", helpers.BOTH_WORKER_COUNTS)
def test_each_direction_holds_at_most_two_1_mib_buffers_and_a_channel_4_mib(
    workers: int, run_async: Run, sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    census = Census()
    # Backpressure, counted where it happens (a sample may fall between a pause and its
    # resume): a transport kept bytes queued and the opposite side stopped reading.
    held_back = {"unix reading": 0, "websocket reading": 0}
    for method, what in (
        ("pause_unix_reading", "unix reading"),
        ("pause_ws_reading", "websocket reading"),
    ):
        original = getattr(Channel, method)

        def counted(channel: Channel, original: Any = original, what: str = what) -> None:
            held_back[what] += 1  # racy between workers: only > 0 matters
            original(channel)

        monkeypatch.setattr(Channel, method, counted)
    digests = {name: hashlib.sha256() for name in ("up", "up_rcvd", "down", "down_rcvd")}
    counts: dict[str, int] = {}
    finished = asyncio.Event()

    async def destination(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Destination QEMU: sends its 32 MiB while it slowly reads the source's.
        sending = asyncio.ensure_future(write_random(writer, 2, digests["down"]))
        counts["up"] = await slow_read(reader, digests["up_rcvd"])
        await sending
        writer.close()
        await writer.wait_closed()
        finished.set()

    async def main() -> None:
        unix = await asyncio.start_unix_server(destination, str(sock_dir / "dest.sock"))
        async with relay_pair(sock_dir, workers) as (server, source):
            done = asyncio.Event()

            async def sample() -> None:
                while not done.is_set():
                    census.look([*server.channels, *source._channels])
                    await asyncio.sleep(SAMPLE_SECONDS)

            async def qemu() -> None:
                # Source QEMU: sends its 32 MiB while it slowly reads what comes back.
                reader, writer = await asyncio.open_unix_connection(str(sock_dir / "src.sock"))
                sending = asyncio.ensure_future(write_random(writer, 1, digests["up"]))
                counts["down"] = await slow_read(reader, digests["down_rcvd"])
                await sending
                writer.close()
                await writer.wait_closed()

            sampler = asyncio.ensure_future(sample())
            try:
                await asyncio.wait_for(qemu(), TRANSFER_SECONDS)
                await asyncio.wait_for(finished.wait(), TRANSFER_SECONDS)
            finally:
                done.set()
                await sampler
        unix.close()
        await asyncio.wait_for(unix.wait_closed(), PROMPT_SECONDS)

    run_async(main())
    assert counts == {"up": TOTAL_BYTES, "down": TOTAL_BYTES}
    assert digests["up"].digest() == digests["up_rcvd"].digest()
    assert digests["down"].digest() == digests["down_rcvd"].digest()
    print(
        f"\nbuffers: {census.samples} samples of {len(census.channels)} channels, at most"
        f" {census.most_per_direction} per direction and {census.most_per_channel} bytes per"
        f" channel, sizes {sorted(census.sizes)}; backpressure in {census.paused} samples,"
        f" {held_back}"
    )
    # The run was what it is meant to be: two channels (one per relay), seen often,
    # mostly held back.
    assert len(census.channels) == 2 and census.samples > 50, census
    assert all(count > 0 for count in held_back.values()), held_back
    # The WebSocket leg reads without header room (it forwards payloads, not frames).
    assert census.sizes <= {README_BUFFER_BYTES, HEADER_ROOM_BYTES + README_BUFFER_BYTES}
    assert census.most_per_direction <= README_BUFFERS_PER_DIRECTION
    assert census.most_per_channel <= README_CHANNEL_BOUND_BYTES + 4 * HEADER_ROOM_BYTES
