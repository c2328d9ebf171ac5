"""End-to-end backpressure: a slow destination must not make either relay buffer.

``migrelay connect`` and ``migrelay serve`` run as real processes (on uvloop, their
default loop) between a source that writes as fast as it can and a destination that
reads at a fixed, slow rate. While the data flows, both relays' resident memory is
sampled from ``/proc/PID/status``. The README ("Data path and memory") states the bound:
a channel holds at most 4 MiB of migration data in user space, whatever the speed of
either peer; the kernel's socket buffers absorb the rest. The test holds each relay to
that figure, written here as a number (not read from `migrelay.limits.Limits`, which
would move with the code it checks), plus a measured allowance for the interpreter. An
unbounded queue anywhere would grow by tens of MiB here, since the source can outrun the
destination by ~10×.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from tests.helpers import FACTOR
from tests.processes import MigrelayProcesses

Run = Callable[[Coroutine[Any, Any, None]], None]

TOTAL_BYTES = 256 << 20
#: The destination reads 256 KiB at a time, at most this fast: about a tenth of what
#: the relays carry on this kind of host, so they spend the run in backpressure.
DEST_READ_BYTES = 256 << 10
DEST_RATE_BYTES_PER_SECOND = 48 << 20
#: README, "Data path and memory": "Memory bound per channel: 4 MiB of migration data in
#: user space" (the 14 bytes of header room in front of each of the four 1 MiB buffers
#: are below a page, and rounded away).
README_CHANNEL_BOUND_BYTES = 4 << 20
#: Per relay process: interpreter, allocator and loop noise on top of the channel's
#: buffers. Measured (2026-12-01, uvloop): a relay grew by 2.2-3.2 MiB in all, buffers
#: included (a channel usually holds one 1 MiB buffer per direction). This catches a
#: queue that grows; the exact buffers (1 MiB each, at most two per direction, 4 MiB a
#: channel) are checked in process by ``tests/integration/test_channel_memory.py``,
#: since RSS cannot tell a doubled bound that is rarely reached from noise.
INTERPRETER_ALLOWANCE_BYTES = 2 << 20
SAMPLE_SECONDS = 0.01


def test_slow_destination_keeps_both_relays_memory_within_the_channel_bound(
    run_async: Run, sock_dir: Path, migrelay_procs: MigrelayProcesses
) -> None:
    dest_path, src_path = sock_dir / "dest.sock", sock_dir / "src.sock"
    bound = README_CHANNEL_BOUND_BYTES + INTERPRETER_ALLOWANCE_BYTES
    result: dict[str, Any] = {}

    async def destination(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest, count = hashlib.sha256(), 0
        started = time.monotonic()
        while chunk := await reader.read(DEST_READ_BYTES):
            digest.update(chunk)
            count += len(chunk)
            # Pace the reads: hold the rate at DEST_RATE_BYTES_PER_SECOND.
            ahead = count / DEST_RATE_BYTES_PER_SECOND - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)
        result["received"] = (count, digest.digest())
        writer.close()
        await writer.wait_closed()

    async def main() -> None:
        unix = await asyncio.start_unix_server(destination, str(dest_path))
        serve = await asyncio.to_thread(migrelay_procs.serve, "--target", str(dest_path))
        connect = await asyncio.to_thread(
            migrelay_procs.connect, f"{serve.url}/", src_path, "--once"
        )
        relays = {"serve": serve, "connect": connect}
        baseline = {name: proc.rss_bytes() for name, proc in relays.items()}
        peak = dict(baseline)
        done = asyncio.Event()

        async def sample() -> None:
            while not done.is_set():
                for name, proc in relays.items():
                    peak[name] = max(peak[name], proc.rss_bytes())
                await asyncio.sleep(SAMPLE_SECONDS)

        async def source() -> bytes:
            reader, writer = await asyncio.open_unix_connection(str(src_path))
            rng, digest, left = random.Random(11), hashlib.sha256(), TOTAL_BYTES
            while left:
                chunk = rng.randbytes(min(left, 1 << 20))
                left -= len(chunk)
                digest.update(chunk)
                writer.write(chunk)
                await writer.drain()
            writer.write_eof()
            assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()
            return digest.digest()

        sampler = asyncio.create_task(sample())
        try:
            sent = await asyncio.wait_for(source(), 60 * FACTOR)
        finally:
            done.set()
            await sampler
        assert await asyncio.to_thread(connect.wait) == 0, connect.log()
        unix.close()
        await asyncio.wait_for(unix.wait_closed(), 5 * FACTOR)
        result["sent"] = sent
        result["growth"] = {name: peak[name] - baseline[name] for name in relays}

    run_async(main())
    assert result["received"] == (TOTAL_BYTES, result["sent"])
    growth = result["growth"]
    print(f"RSS growth over idle: {growth} (bound {bound} bytes per relay)")
    for name, grown in growth.items():
        assert grown < bound, f"{name} grew by {grown / 2**20:.1f} MiB"
