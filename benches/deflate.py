"""What permessage-deflate costs a naive relay of random bytes, with ``websockets``.

Usage: ``.venv/bin/python benches/deflate.py [--size 64M] [--message 1M] [--runs 3]
[--json FILE]``

The naive relay is the one the README's wire-protocol section means: ``websockets``'
own client sending RAM-like data (random bytes, which do not compress) in binary
messages to a ``websockets`` server on loopback that reads and drops them, once with
the library's default ``compression="deflate"`` and once with ``compression=None``
(what migrelay's relays do: they never offer the extension). Each run is timed from the
first send until the server has received every byte; the runs alternate between the
two settings, and the summary gives the medians and their ratio. One process, one
event loop (asyncio), both ends: the figure is CPU per byte, not a network's speed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from typing import Literal

from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection, serve

from migrelay.units import MIB, parse_size

Compression = Literal["deflate"] | None


async def run_once(payload: bytes, message_bytes: int, compression: Compression) -> float:
    """Seconds to carry ``payload`` from a client to a server, ``compression`` both ends."""
    received = asyncio.get_running_loop().create_future()

    async def sink(connection: ServerConnection) -> None:
        total = 0
        async for message in connection:
            total += len(message)
            if total >= len(payload):
                received.set_result(total)
                return

    async with serve(
        sink, "127.0.0.1", 0, compression=compression, max_size=None, ping_interval=None
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        async with connect(
            f"ws://127.0.0.1:{port}/",
            compression=compression,
            max_size=None,
            ping_interval=None,
        ) as client:
            negotiated = client.response.headers.get("Sec-WebSocket-Extensions")
            assert (negotiated is not None) == (compression is not None), negotiated
            view = memoryview(payload)
            started = time.perf_counter()
            for offset in range(0, len(payload), message_bytes):
                await client.send(view[offset : offset + message_bytes])
            total = await received
            took = time.perf_counter() - started
    assert total == len(payload), total
    return took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="64M", help="random bytes to carry (default 64M)")
    parser.add_argument("--message", default="1M", help="bytes per message (default 1M)")
    parser.add_argument("--runs", type=int, default=3, help="runs of each setting (default 3)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    size, message_bytes = parse_size(args.size), parse_size(args.message)
    payload = os.urandom(size)
    times: dict[str, list[float]] = {"none": [], "deflate": []}
    for _ in range(args.runs):
        for label, compression in (("none", None), ("deflate", "deflate")):
            took = asyncio.run(run_once(payload, message_bytes, compression))
            times[label].append(took)
            rate = size / MIB / took
            print(f"{label:8} {took:7.3f} s  {rate:8.1f} MiB/s", flush=True)
    medians = {label: statistics.median(runs) for label, runs in times.items()}
    ratio = medians["deflate"] / medians["none"]
    print(
        f"median: none {medians['none']:.3f} s, deflate {medians['deflate']:.3f} s:"
        f" deflate is {ratio:.1f}x slower ({size // MIB} MiB random, {message_bytes} B messages)"
    )
    if args.json:
        import websockets

        record = {
            "command": " ".join([".venv/bin/python", "benches/deflate.py", *sys.argv[1:]]),
            "machine": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
            },
            "websockets": websockets.__version__,
            "size_bytes": size,
            "message_bytes": message_bytes,
            "seconds": times,
            "median_seconds": medians,
            "deflate_over_none": round(ratio, 2),
        }
        with open(args.json, "w", encoding="utf-8") as out:
            json.dump(record, out, indent=2)
            out.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
