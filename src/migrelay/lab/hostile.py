"""A hostile tenant of a shared ``serve``, for the soak test and its benchmark.

It holds the three attacks of the README's threat model that cost a server the most
while staying within what one token may do, all at once and for as long as it runs:

* **idle connections**: up to ``idle_connections`` TCP connections from its own address
  that never send a byte, re-opened as the server closes them;
* **a ping flood**: a WebSocket to its own target on which it writes Pings as fast as
  the server reads them and never reads a Pong;
* **tiny frames**: a WebSocket on which it streams empty Pings (6-byte frames) and
  reads the Pongs, so that the server parses frame after frame.

Raw sockets and the sans-IO frame encoder: a well-behaved client library would not do
any of this.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import os
import socket
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from migrelay.core.frames import Opcode, encode_frame
from migrelay.core.handshake import SUBPROTOCOL

__all__ = [
    "HostileCounters",
    "HostileTenant",
    "closed_by_peer",
    "discarding_socket",
    "open_idle_connection",
]

#: Pings written per batch: ~1.3 MiB of full-size Pings, ~60 KiB of empty ones.
PINGS_PER_WRITE: Final = 10_000
#: Seconds between rounds of re-opening idle connections the server closed.
REOPEN_INTERVAL_S: Final = 0.2
#: Seconds to wait before opening a WebSocket again after the server ended one.
RECONNECT_DELAY_S: Final = 0.2


@dataclass
class HostileCounters:
    """What the tenant managed to do, for the test's and the bench's report."""

    idle_opened: int = 0
    idle_closed_by_server: int = 0
    pings_written: int = 0
    tiny_frames_written: int = 0
    websockets_opened: int = 0
    refusals: list[int] = field(default_factory=list)


class HostileTenant:
    """Runs the attacks (module docstring) against ``host:port`` while in its context.

    Args:
        host, port: the ``serve`` listener.
        path: the tenant's own target (``/NAME``).
        token: its bearer token, or None.
        idle_connections: how many idle connections it tries to hold.
        source_address: the address its idle connections come from (another "host").
        channel_address: the address its WebSockets come from. Another one: from
            ``source_address`` they would find the handshake slots of that address
            taken by the tenant's own idle connections.
    """

    def __init__(
        self,
        host: str,
        port: int,
        path: str,
        token: str | None,
        idle_connections: int = 1000,
        source_address: str = "127.0.0.2",
        channel_address: str = "127.0.0.3",
    ) -> None:
        self.host, self.port, self.path, self.token = host, port, path, token
        self.idle_connections = idle_connections
        self.source_address = source_address
        self.channel_address = channel_address
        self.counters = HostileCounters()
        #: Set once both floods have written their first batch.
        self.under_way = asyncio.Event()
        self._idle: list[socket.socket] = []
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: list[asyncio.Task[None]] = []
        mask = os.urandom(4)
        self._ping_batch = b"".join(
            bytes(encode_frame(Opcode.PING, b"p" * 125, mask)) for _ in range(PINGS_PER_WRITE)
        )
        self._tiny_batch = bytes(encode_frame(Opcode.PING, b"", mask)) * PINGS_PER_WRITE

    async def __aenter__(self) -> HostileTenant:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._hold_idle_connections()),
            loop.create_task(self._ping_flood()),
            loop.create_task(self._tiny_frames()),
        ]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        for task in self._tasks:
            task.cancel()
        results = await asyncio.gather(*self._tasks, return_exceptions=True)
        for sock in self._idle:
            sock.close()
        self._idle.clear()
        for writer in self._writers:
            writer.transport.abort()
        # The loop closes the aborted transports on its next turns.
        await asyncio.sleep(0.05)
        self._writers.clear()
        for result in results:
            if isinstance(result, Exception):
                raise result

    def _check_under_way(self) -> None:
        if self.counters.pings_written and self.counters.tiny_frames_written:
            self.under_way.set()

    # -- idle connections --------------------------------------------------------------

    async def _hold_idle_connections(self) -> None:
        while True:
            still_open = []
            for sock in self._idle:
                if closed_by_peer(sock):
                    sock.close()
                    self.counters.idle_closed_by_server += 1
                else:
                    still_open.append(sock)
            self._idle = still_open
            while len(self._idle) < self.idle_connections:
                self._idle.append(open_idle_connection(self.host, self.port, self.source_address))
                self.counters.idle_opened += 1
                if len(self._idle) % 100 == 0:
                    await asyncio.sleep(0)
            await asyncio.sleep(REOPEN_INTERVAL_S)

    # -- WebSockets ---------------------------------------------------------------------

    async def _open_websocket(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """A WebSocket to the tenant's target, or None when refused (status recorded)."""
        reader, writer = await asyncio.open_connection(
            self.host, self.port, local_addr=(self.channel_address, 0)
        )
        self._writers.add(writer)
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [
            f"GET {self.path} HTTP/1.1",
            f"Host: {self.host}:{self.port}",
            "Upgrade: websocket",
            "Connection: Upgrade",
            f"Sec-WebSocket-Key: {key}",
            "Sec-WebSocket-Version: 13",
            f"Sec-WebSocket-Protocol: {SUBPROTOCOL}",
        ]
        if self.token is not None:
            lines.append(f"Authorization: Bearer {self.token}")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split()[1])
        if status != 101:
            self.counters.refusals.append(status)
            writer.close()
            return None
        self.counters.websockets_opened += 1
        return reader, writer

    async def _ping_flood(self) -> None:
        """Pings as fast as the server reads them; never a read."""

        def written() -> None:
            self.counters.pings_written += PINGS_PER_WRITE

        await self._flood(self._ping_batch, written, read_replies=False)

    async def _tiny_frames(self) -> None:
        """Empty Pings (6-byte frames) without end; the Pongs are read and dropped."""

        def written() -> None:
            self.counters.tiny_frames_written += PINGS_PER_WRITE

        await self._flood(self._tiny_batch, written, read_replies=True)

    async def _flood(
        self, batch: bytes, written: Callable[[], None], *, read_replies: bool
    ) -> None:
        """Write ``batch`` on a WebSocket as fast as the server reads it, reading what it
        answers (``read_replies``) or never; open another when the server ends it."""
        while True:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                opened = await self._open_websocket()
                if opened is not None:
                    reader, writer = opened
                    replies = (
                        asyncio.get_running_loop().create_task(_discard(reader))
                        if read_replies
                        else None
                    )
                    try:
                        # Until the server ends the connection: drain() raises, or the
                        # reader sees the end.
                        while replies is None or not replies.done():
                            writer.write(batch)
                            written()
                            self._check_under_way()
                            await writer.drain()
                    finally:
                        if replies is not None:
                            replies.cancel()
                        writer.close()
            await asyncio.sleep(RECONNECT_DELAY_S)


def open_idle_connection(host: str, port: int, source_address: str) -> socket.socket:
    """A TCP connection from ``source_address`` that will never send a byte (non-blocking;
    it may still be connecting when this returns)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source_address, 0))
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        sock.connect((host, port))
    return sock


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server closed (or reset) ``sock``; one still connecting is not closed."""
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except BlockingIOError:
        return False
    except OSError as exc:
        return exc.errno not in (errno.ENOTCONN, errno.EAGAIN)


@contextlib.asynccontextmanager
async def discarding_socket(path: Path) -> AsyncIterator[None]:
    """A unix socket at ``path`` that accepts everything and reads and drops it: the
    attacker's own "VM"."""
    accepted: list[asyncio.BaseTransport] = []

    class Drop(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            accepted.append(transport)

        def data_received(self, data: bytes) -> None:
            pass

    server = await asyncio.get_running_loop().create_unix_server(Drop, str(path))
    try:
        yield
    finally:
        server.close()
        for transport in accepted:
            transport.close()
        await server.wait_closed()


async def _discard(reader: asyncio.StreamReader) -> None:
    while await reader.read(1 << 16):
        pass


async def _attack_until_stopped(tenant: HostileTenant) -> None:
    async with tenant:
        await tenant.under_way.wait()
        print("under way", flush=True)
        await asyncio.Event().wait()  # until the process is terminated


def main(argv: list[str] | None = None) -> None:
    """``python -m migrelay.lab.hostile HOST PORT PATH [TOKEN]``: attack until killed.

    A process of its own, so that a benchmark can run the attacker at the lowest CPU
    priority: a real attacker's CPU is on another host, not taken from the victim.
    """
    import sys

    args = sys.argv[1:] if argv is None else argv
    host, port, path = args[0], int(args[1]), args[2]
    token = args[3] if len(args) > 3 else None
    asyncio.run(_attack_until_stopped(HostileTenant(host, port, path, token)))


if __name__ == "__main__":
    main()
