"""Both relays in-process over real sockets, on asyncio and on uvloop.

source unix peer ──unix──▶ SourceRelay ══ws══▶ RelayServer ──unix──▶ destination peer

The unix peers stand in for the two QEMUs. Every test bounds its waits, so a relay that
hangs fails the test instead of stalling the suite.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import hashlib
import logging
import os
import random
import re
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
from tests import helpers
from tests.helpers import random_chunks, wait_until
from tests.processes import MigrelayProcesses

from migrelay.aio.client import ClientConfig, SourceRelay, open_websocket
from migrelay.aio.server import ANONYMOUS, RelayServer, ServerConfig
from migrelay.aio.workers import call_on
from migrelay.core.frames import Opcode, encode_frame
from migrelay.errors import HandshakeRefused
from migrelay.limits import Limits

if TYPE_CHECKING:
    from migrelay.aio.channel import Channel

Run = Callable[[Coroutine[Any, Any, None]], None]

FACTOR = helpers.FACTOR
#: How long a relay may take to pass on a close: "promptly", not a timer expiring.
PROMPT_SECONDS = 2.0 * FACTOR
#: Upper bound for a whole bulk transfer (64 MiB each way runs in ~1 s here).
TRANSFER_SECONDS = 30.0 * FACTOR
CHUNK_BYTES = 1 << 20
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


# -- helpers --------------------------------------------------------------------------


async def send_all(writer: asyncio.StreamWriter, seed: int, total: int) -> bytes:
    """Write ``total`` random bytes, then EOF; return their sha256."""
    digest = hashlib.sha256()
    for chunk in random_chunks(seed, total, CHUNK_BYTES):
        digest.update(chunk)
        writer.write(chunk)
        await writer.drain()
    writer.write_eof()
    return digest.digest()


async def receive_all(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """Read until EOF; return the byte count and sha256."""
    digest = hashlib.sha256()
    count = 0
    while chunk := await reader.read(CHUNK_BYTES):
        digest.update(chunk)
        count += len(chunk)
    return count, digest.digest()


async def read_until_closed(reader: asyncio.StreamReader) -> None:
    """Read and discard until the connection ends (EOF or reset)."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(CHUNK_BYTES):
            pass


async def write_until_closed(writer: asyncio.StreamWriter) -> None:
    """Write as fast as the relay takes it until the connection fails."""
    chunk = random.Random(7).randbytes(CHUNK_BYTES)
    with contextlib.suppress(ConnectionError):
        while True:
            writer.write(chunk)
            await writer.drain()


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@dataclass
class UnixPeerServer:
    """A unix server standing in for destination QEMU; owns its connection handlers."""

    handler: Handler
    accepted: int = 0
    _server: asyncio.AbstractServer | None = None
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    async def start(self, path: Path) -> None:
        self._server = await asyncio.start_unix_server(self._handle, str(path))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.handler(reader, writer)
        finally:
            writer.close()

    async def handlers_done(self, seconds: float) -> None:
        """Wait until every connection's handler has ended by itself.

        Call it before `close` when the handler's own results are checked: the relay may
        have finished and closed its end while bytes still wait unread in this side's
        socket, and `close` aborts the connection, dropping them.
        """
        await asyncio.wait_for(asyncio.gather(*self._tasks), seconds)

    async def close(self) -> None:
        """Stop listening, abort the connections still open, and await their handlers."""
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            if not writer.transport.is_closing():
                writer.transport.abort()
        pending = [task for task in self._tasks if task is not asyncio.current_task()]
        if pending:
            await asyncio.wait_for(asyncio.gather(*pending), PROMPT_SECONDS)
        if self._server is not None:
            # uvloop's wait_closed() also waits for the accepted connections.
            await asyncio.wait_for(self._server.wait_closed(), PROMPT_SECONDS)


@dataclass
class Relays:
    server: RelayServer
    source: SourceRelay
    src: Path
    dest: Path
    port: int
    closed: list[Channel] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    async def wait_all_closed(self, seconds: float = PROMPT_SECONDS) -> None:
        await asyncio.wait_for(self.source.finished.wait(), seconds)
        await wait_until(lambda: not self.server.channels, seconds, "server channels to close")


@contextlib.asynccontextmanager
async def relays(
    sock_dir: Path,
    *,
    limits: Limits | None = None,
    wait_target: float = 5.0,
    workers: int = helpers.WORKERS,
) -> AsyncIterator[Relays]:
    """A RelayServer for ``dest.sock`` and a SourceRelay (``once``) on ``src.sock``, each
    with ``workers`` worker loops."""
    limits = limits or Limits()
    dest, src = sock_dir / "dest.sock", sock_dir / "src.sock"
    server = RelayServer(
        ServerConfig(port=0, target=dest, wait_target=wait_target, limits=limits, workers=workers)
    )
    await server.start()
    port = server.sockets[0].getsockname()[1]
    source = SourceRelay(
        ClientConfig(url=f"ws://127.0.0.1:{port}/", limits=limits, workers=workers),
        src,
        once=True,
    )
    await source.start()
    result = Relays(server, source, src, dest, port)
    server.on_channel_closed = result.closed.append
    try:
        yield result
    finally:
        # Bounded: a relay that cannot shut down fails the test instead of hanging it.
        await asyncio.wait_for(source.close(), PROMPT_SECONDS)
        await asyncio.wait_for(server.close(), 3 * PROMPT_SECONDS)


def channel_close_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        record.getMessage()
        for record in caplog.records
        if record.name == "migrelay.aio.channel" and " closed: " in record.getMessage()
    ]


# -- data integrity and half-close ---------------------------------------------------


@pytest.mark.parametrize("workers", helpers.BOTH_WORKER_COUNTS)
def test_64_mib_each_way_at_once_arrive_intact(
    workers: int, run_async: Run, sock_dir: Path
) -> None:
    size = 64 << 20
    results: dict[str, Any] = {}

    async def destination(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        received, sent = await asyncio.gather(receive_all(reader), send_all(writer, 2, size))
        results["dest_received"], results["dest_sent"] = received, sent

    async def main() -> None:
        async with relays(sock_dir, workers=workers) as r:
            dest = UnixPeerServer(destination)
            await dest.start(r.dest)
            reader, writer = await asyncio.open_unix_connection(str(r.src))
            received, sent = await asyncio.wait_for(
                asyncio.gather(receive_all(reader), send_all(writer, 1, size)), TRANSFER_SECONDS
            )
            writer.close()
            await r.wait_all_closed()
            await dest.handlers_done(PROMPT_SECONDS)
            await dest.close()
            assert received == (size, results["dest_sent"])
            assert results["dest_received"] == (size, sent)
            assert r.source.all_clean
            assert [channel.clean for channel in r.closed] == [True]
            assert (r.closed[0].bytes_rcvd, r.closed[0].bytes_sent) == (size, size)

    run_async(main())


def test_source_eof_reaches_destination_while_reply_keeps_flowing(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    reply_bytes = 8 << 20
    events: list[str] = []

    async def destination(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # The reverse direction flows before and after the source's EOF arrives.
        writer.write(b"early ")
        await writer.drain()
        request = await reader.read()  # returns at EOF only
        events.append(f"dest got {request!r} then EOF")
        assert reader.at_eof()
        for chunk in random_chunks(3, reply_bytes, CHUNK_BYTES):
            writer.write(chunk)
            await writer.drain()
        writer.write(b" reply")
        writer.write_eof()
        await writer.drain()
        events.append("dest sent reply and EOF")

    async def main() -> None:
        async with relays(sock_dir) as r:
            dest = UnixPeerServer(destination)
            await dest.start(r.dest)
            reader, writer = await asyncio.open_unix_connection(str(r.src))
            assert await asyncio.wait_for(reader.readexactly(6), PROMPT_SECONDS) == b"early "
            writer.write(b"request")
            writer.write_eof()
            back = await asyncio.wait_for(reader.read(), TRANSFER_SECONDS)
            expected = b"".join(random_chunks(3, reply_bytes, CHUNK_BYTES)) + b" reply"
            assert back == expected
            assert reader.at_eof()
            writer.close()
            await r.wait_all_closed()
            await dest.handlers_done(PROMPT_SECONDS)
            await dest.close()
            assert events == ["dest got b'request' then EOF", "dest sent reply and EOF"]
            assert r.source.all_clean
            assert [channel.clean for channel in r.closed] == [True]
            lines = channel_close_lines(logs)
            assert len(lines) == 2, lines  # one per relay
            assert all(
                " closed: ended by the " in line and "1000 normal" in line for line in lines
            ), lines

    run_async(main())


# -- channel order ---------------------------------------------------------------------


class FirstBytesRecorder(asyncio.Protocol):
    """Destination QEMU stand-in: records what each connection sent, in accept order."""

    def __init__(self, log: list[bytearray], transports: list[asyncio.BaseTransport]) -> None:
        self.log = log
        self.transports = transports

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.data = bytearray()
        self.log.append(self.data)
        self.transports.append(transport)

    def data_received(self, data: bytes) -> None:
        self.data += data


async def open_channel(url: str, session: str, number: int) -> asyncio.Transport:
    """Open channel ``number`` of ``session`` by hand and send ``channel N`` on it."""
    transport, trailing = await open_websocket(
        ClientConfig(url=url),
        [("Migrelay-Session", session), ("Migrelay-Channel", str(number))],
    )
    assert trailing == b""
    transport.write(encode_frame(Opcode.BINARY, f"channel {number}".encode(), b"\x11\x22\x33\x44"))
    return transport


@pytest.mark.parametrize("workers", helpers.BOTH_WORKER_COUNTS)
def test_channels_reach_destination_in_channel_order_when_websockets_arrive_out_of_order(
    workers: int, run_async: Run, sock_dir: Path
) -> None:
    async def main() -> None:
        dest_path = sock_dir / "dest.sock"
        log: list[bytearray] = []
        dest_transports: list[asyncio.BaseTransport] = []
        loop = asyncio.get_running_loop()
        dest = await loop.create_unix_server(
            lambda: FirstBytesRecorder(log, dest_transports), str(dest_path)
        )
        server = RelayServer(
            ServerConfig(port=0, target=dest_path, wait_target=5.0, workers=workers)
        )
        await server.start()
        url = f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
        session = "order-test"

        def claimed() -> set[str]:
            entry = server.sessions.get((ANONYMOUS, session))
            return set() if entry is None else set(entry.claimed)

        later = [asyncio.create_task(open_channel(url, session, 1))]
        await wait_until(lambda: claimed() == {"1"}, PROMPT_SECONDS, "channel 1 to arrive")
        later.append(asyncio.create_task(open_channel(url, session, 2)))
        await wait_until(lambda: claimed() == {"1", "2"}, PROMPT_SECONDS, "channel 2 to arrive")
        # Channels 1 and 2 wait for channel 0: nothing has reached the destination.
        assert log == []
        assert not any(task.done() for task in later)
        first = await asyncio.wait_for(open_channel(url, session, 0), PROMPT_SECONDS)
        transports = [first, *await asyncio.wait_for(asyncio.gather(*later), PROMPT_SECONDS)]
        await wait_until(
            lambda: len(log) == 3 and all(len(data) == len(b"channel 0") for data in log),
            PROMPT_SECONDS,
            "the first bytes of 3 channels",
        )
        assert [bytes(data) for data in log] == [b"channel 0", b"channel 1", b"channel 2"]

        for transport in transports:
            transport.abort()
        await wait_until(lambda: not server.channels, PROMPT_SECONDS, "channels to close")
        await asyncio.wait_for(server.close(), 3 * PROMPT_SECONDS)
        for dest_transport in dest_transports:
            dest_transport.close()
        dest.close()
        await asyncio.wait_for(dest.wait_closed(), PROMPT_SECONDS)

    run_async(main())


@pytest.mark.parametrize("workers", helpers.BOTH_WORKER_COUNTS)
def test_source_relay_channels_opened_one_after_another_all_reach_destination_in_order(
    workers: int, run_async: Run, sock_dir: Path
) -> None:
    # QEMU's pattern: the main channel connects (and is relayed) first, the multifd
    # channels follow once it is up. Each later channel belongs to the same session.
    async def main() -> None:
        log: list[bytearray] = []
        dest_transports: list[asyncio.BaseTransport] = []
        async with relays(sock_dir, workers=workers) as r:
            loop = asyncio.get_running_loop()
            dest = await loop.create_unix_server(
                lambda: FirstBytesRecorder(log, dest_transports), str(r.dest)
            )
            writers = []
            try:
                for number in range(4):
                    _, writer = await asyncio.open_unix_connection(str(r.src))
                    writers.append(writer)
                    writer.write(f"channel {number}".encode())
                    await wait_until(
                        lambda n=number: len(log) == n + 1 and len(log[n]) == 9,  # type: ignore[misc]
                        PROMPT_SECONDS,
                        f"channel {number} at the destination",
                    )
                assert [bytes(data) for data in log] == [f"channel {n}".encode() for n in range(4)]
            finally:
                for writer in writers:
                    writer.close()
                for dest_transport in dest_transports:
                    dest_transport.close()
                dest.close()
                await asyncio.wait_for(dest.wait_closed(), PROMPT_SECONDS)
            await r.wait_all_closed()
            assert r.source.all_clean  # close() is EOF on both sides: a clean ending

    run_async(main())


# -- destination socket appearing late, or never ---------------------------------------


def test_destination_socket_created_after_upgrade_arrived_gets_the_data(
    run_async: Run, sock_dir: Path
) -> None:
    async def destination(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert await reader.read() == b"hello"
        writer.write(b"world")
        writer.write_eof()
        await writer.drain()

    async def main() -> None:
        async with relays(sock_dir, wait_target=10.0 * FACTOR) as r:
            reader, writer = await asyncio.open_unix_connection(str(r.src))
            writer.write(b"hello")
            writer.write_eof()

            def waiting() -> bool:
                return any(session.pending for session in r.server.sessions.values())

            await wait_until(waiting, PROMPT_SECONDS, "the upgrade to wait for the target")
            assert not r.dest.exists()
            dest = UnixPeerServer(destination)
            await dest.start(r.dest)
            assert await asyncio.wait_for(reader.read(), PROMPT_SECONDS) == b"world"
            writer.close()
            await r.wait_all_closed()
            await dest.close()
            assert r.source.all_clean

    run_async(main())


def test_destination_socket_never_created_is_503_with_retry_after_at_the_deadline(
    run_async: Run, sock_dir: Path
) -> None:
    wait = 0.5

    async def main() -> None:
        async with relays(sock_dir, wait_target=wait) as r:
            started = time.monotonic()
            with pytest.raises(HandshakeRefused) as refused:
                await open_websocket(ClientConfig(url=r.url), [])
            elapsed = time.monotonic() - started
            assert refused.value.status == 503
            assert refused.value.headers.get("retry-after", "").isdigit()
            assert wait <= elapsed < wait + PROMPT_SECONDS
            assert not r.server.sessions  # the refused session is forgotten

    run_async(main())


@pytest.mark.parametrize("workers", helpers.BOTH_WORKER_COUNTS)
def test_source_peer_is_closed_when_destination_never_appears(
    workers: int, run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    wait = 0.3

    async def main() -> None:
        async with relays(sock_dir, workers=workers, wait_target=wait) as r:
            started = time.monotonic()
            reader, writer = await asyncio.open_unix_connection(str(r.src))
            writer.write(b"x" * 1000)
            await asyncio.wait_for(read_until_closed(reader), wait + PROMPT_SECONDS)
            assert time.monotonic() - started >= wait
            writer.close()
            await asyncio.wait_for(r.source.finished.wait(), PROMPT_SECONDS)
            assert not r.source.all_clean
        errors = [rec.getMessage() for rec in logs.records if rec.levelno >= logging.ERROR]
        assert len(errors) == 1 and "503" in errors[0], errors

    run_async(main())


# -- failures: the other side sees them promptly ---------------------------------------


@pytest.mark.parametrize("workers", helpers.BOTH_WORKER_COUNTS)
def test_destination_closing_mid_stream_closes_source_peer_promptly(
    workers: int, run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    closed_at: list[float] = []

    async def destination(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4 << 20)
        writer.transport.abort()  # QEMU crashed mid-migration
        closed_at.append(time.monotonic())

    async def main() -> None:
        async with relays(sock_dir, workers=workers) as r:
            dest = UnixPeerServer(destination)
            await dest.start(r.dest)
            reader, writer = await asyncio.open_unix_connection(str(r.src))
            pump = asyncio.create_task(write_until_closed(writer))
            await asyncio.wait_for(read_until_closed(reader), TRANSFER_SECONDS)
            seen_at = time.monotonic()
            await asyncio.wait_for(pump, PROMPT_SECONDS)
            writer.close()
            await r.wait_all_closed()
            await dest.close()
            assert len(closed_at) == 1
            assert seen_at - closed_at[0] < PROMPT_SECONDS
            assert not r.source.all_clean
            lines = channel_close_lines(logs)
            assert len(lines) == 2, lines
            # Each relay names the cause: its own unix side, or the peer's close code.
            assert any("destination closed" in line for line in lines), lines
            assert any("unix side closed" in line for line in lines), lines

    run_async(main())


def test_destination_that_stopped_reading_then_closes_fails_the_channel_promptly(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    # The server's writes to QEMU are queued (QEMU stopped reading), so the server no
    # longer reads the WebSocket; then QEMU dies. The WebSocket must be read again at
    # once: the source's next data fails the channel (4000), rather than the unread
    # Pongs ending it by liveness timeout (the defaults: 30 s and more).
    stop_reading = asyncio.Event()
    closed_at: list[float] = []

    async def destination(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1 << 20)
        await stop_reading.wait()
        writer.transport.abort()  # QEMU killed, with bytes unread
        closed_at.append(time.monotonic())

    async def main() -> None:
        async with relays(sock_dir) as r:
            dest = UnixPeerServer(destination)
            await dest.start(r.dest)
            reader, writer = await asyncio.open_unix_connection(str(r.src))
            pump = asyncio.create_task(write_until_closed(writer))
            await wait_until(
                lambda: any(channel.unix_write_busy for channel in r.server.channels),
                TRANSFER_SECONDS,
                "the server's writes to the destination to back up",
            )
            stop_reading.set()
            await asyncio.wait_for(read_until_closed(reader), PROMPT_SECONDS)
            seen_at = time.monotonic()
            await asyncio.wait_for(pump, PROMPT_SECONDS)
            writer.close()
            await r.wait_all_closed()
            await dest.close()
            assert seen_at - closed_at[0] < PROMPT_SECONDS
            lines = channel_close_lines(logs)
            assert not any("liveness" in line for line in lines), lines
            assert any("4000 destination closed" in line for line in lines), lines

    run_async(main())


@pytest.mark.parametrize("workers", helpers.BOTH_WORKER_COUNTS)
def test_what_the_destination_wrote_before_crashing_reaches_the_source_then_it_closes(
    workers: int, run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    # Destination QEMU writes its last words on the return path (an error, a postcopy
    # page request) and dies at once: the source must get every byte, then the end.
    # Less than the socket's send buffer, so that all of it left the process: what a
    # crashing process had not yet handed to the kernel is lost whatever the relay does.
    last_words = random.Random(11).randbytes(100_000 + 12345)

    async def destination(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(1 << 20)
        writer.write(last_words)
        assert writer.transport.get_write_buffer_size() == 0  # all in the kernel
        writer.transport.abort()  # no shutdown, no close handshake: the process is gone

    async def main() -> None:
        async with relays(sock_dir, workers=workers) as r:
            dest = UnixPeerServer(destination)
            await dest.start(r.dest)
            reader, writer = await asyncio.open_unix_connection(str(r.src))
            pump = asyncio.create_task(write_until_closed(writer))
            received = bytearray()
            with contextlib.suppress(ConnectionError):
                while chunk := await asyncio.wait_for(reader.read(CHUNK_BYTES), PROMPT_SECONDS):
                    received += chunk
            assert bytes(received) == last_words
            await asyncio.wait_for(pump, PROMPT_SECONDS)
            writer.close()
            await r.wait_all_closed()
            await dest.close()
            assert not r.source.all_clean
            lines = channel_close_lines(logs)
            assert any("destination closed" in line for line in lines), lines

    run_async(main())


@pytest.mark.parametrize("workers", helpers.BOTH_WORKER_COUNTS)
def test_websocket_dropped_closes_both_unix_peers_promptly(
    workers: int, run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    dest_done: list[float] = []

    async def destination(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_until_closed(reader)
        dest_done.append(time.monotonic())

    async def main() -> None:
        async with relays(sock_dir, workers=workers) as r:
            dest = UnixPeerServer(destination)
            await dest.start(r.dest)
            reader, writer = await asyncio.open_unix_connection(str(r.src))
            pump = asyncio.create_task(write_until_closed(writer))
            await wait_until(
                lambda: any(ch.bytes_rcvd > 4 << 20 for ch in r.server.channels),
                TRANSFER_SECONDS,
                "4 MiB through the relay",
            )
            dropped_at = time.monotonic()
            for channel in list(r.server.channels):
                call_on(channel._loop, channel.ws_transport.abort)  # its worker's transport
            await asyncio.wait_for(read_until_closed(reader), PROMPT_SECONDS)
            assert time.monotonic() - dropped_at < PROMPT_SECONDS
            await asyncio.wait_for(pump, PROMPT_SECONDS)
            writer.close()
            await r.wait_all_closed()
            await dest.close()
            assert len(dest_done) == 1 and dest_done[0] - dropped_at < PROMPT_SECONDS
            assert not r.source.all_clean
            lines = channel_close_lines(logs)
            assert len(lines) == 2, lines
            assert all("websocket" in line for line in lines), lines

    run_async(main())


# -- liveness ---------------------------------------------------------------------------

PING_INTERVAL = 0.3
PING_TIMEOUT = 0.3
LIVENESS = Limits(ping_interval=PING_INTERVAL, ping_timeout=PING_TIMEOUT)
#: Timers fire a little early (the loop's clock resolution) or late (a busy host).
TIMER_SLACK = 0.05


@pytest.mark.parametrize("workers", helpers.BOTH_WORKER_COUNTS)
def test_peer_silent_after_handshake_is_closed_after_ping_interval_plus_timeout(
    workers: int, run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        silence = asyncio.Event()
        release = asyncio.Event()

        async def silent_server(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            match = re.search(rb"(?im)^sec-websocket-key:\s*(\S+)", head)
            assert match is not None
            accept = base64.b64encode(hashlib.sha1(match.group(1) + GUID).digest())
            writer.write(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n"
                b"Sec-WebSocket-Protocol: migrelay.v1\r\n\r\n"
            )
            await writer.drain()
            silence.set()
            await release.wait()  # alive as a TCP endpoint, but never answers a ping
            writer.close()

        server = await asyncio.start_server(silent_server, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        src = sock_dir / "src.sock"
        relay = SourceRelay(
            ClientConfig(url=f"ws://127.0.0.1:{port}/", limits=LIVENESS, workers=workers), src
        )
        await relay.start()
        try:
            reader, writer = await asyncio.open_unix_connection(str(src))
            writer.write(b"migration data")
            await asyncio.wait_for(silence.wait(), PROMPT_SECONDS)
            silent_since = time.monotonic()
            await asyncio.wait_for(read_until_closed(reader), 10 * FACTOR)
            elapsed = time.monotonic() - silent_since
            writer.close()
        finally:
            release.set()
            await relay.close()
            server.close()
            await asyncio.wait_for(server.wait_closed(), PROMPT_SECONDS)
        limit = PING_INTERVAL + PING_TIMEOUT
        assert limit - TIMER_SLACK <= elapsed < limit + PROMPT_SECONDS / 2
        lines = channel_close_lines(logs)
        assert len(lines) == 1 and "liveness timeout" in lines[0], lines

    run_async(main())


def test_stopped_serve_process_is_detected_by_liveness_and_source_peer_closed(
    run_async: Run,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    logs: pytest.LogCaptureFixture,
) -> None:
    dest_path = sock_dir / "dest.sock"

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data := await reader.read(CHUNK_BYTES):
            writer.write(data)
            await writer.drain()

    async def main() -> None:
        dest = UnixPeerServer(echo)
        await dest.start(dest_path)
        serve = await asyncio.to_thread(
            migrelay_procs.serve,
            "--target",
            str(dest_path),
            "--ping-interval",
            str(PING_INTERVAL),
            "--ping-timeout",
            str(PING_TIMEOUT),
        )
        src = sock_dir / "src.sock"
        relay = SourceRelay(ClientConfig(url=f"{serve.url}/", limits=LIVENESS), src)
        await relay.start()
        try:
            reader, writer = await asyncio.open_unix_connection(str(src))
            writer.write(b"are you there?")
            assert await asyncio.wait_for(reader.readexactly(14), PROMPT_SECONDS) == (
                b"are you there?"
            )
            os.kill(serve.pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            await asyncio.wait_for(read_until_closed(reader), 10 * FACTOR)
            elapsed = time.monotonic() - stopped_at
            writer.close()
        finally:
            await asyncio.to_thread(serve.stop)
            await relay.close()
            await dest.close()
        # The liveness timer runs every ping_interval and does not restart on traffic,
        # so silence is noticed between interval+timeout and 2*interval+timeout after
        # the last byte from the peer.
        assert elapsed >= PING_INTERVAL + PING_TIMEOUT - TIMER_SLACK
        assert elapsed < 2 * PING_INTERVAL + PING_TIMEOUT + PROMPT_SECONDS / 2
        lines = channel_close_lines(logs)
        assert len(lines) == 1 and "liveness timeout" in lines[0], lines

    run_async(main())


# -- shutting down ------------------------------------------------------------------------


async def close_source_relay_during_handshake(r: Relays) -> asyncio.StreamReader:
    """Connect a source peer, wait until serve holds its upgrade, then close the relay."""
    reader, writer = await asyncio.open_unix_connection(str(r.src))

    def waiting() -> bool:
        return any(session.pending for session in r.server.sessions.values())

    try:
        await wait_until(waiting, PROMPT_SECONDS, "the upgrade to wait for the target")
        await asyncio.wait_for(r.source.close(), PROMPT_SECONDS)
        return reader
    finally:
        writer.close()


@pytest.mark.parametrize("workers", helpers.BOTH_WORKER_COUNTS)
def test_source_relay_closed_while_a_channel_awaits_its_101_reports_no_lost_error(
    workers: int, run_async: Run, sock_dir: Path
) -> None:
    # run_async fails the test on anything the loop's exception handler receives, such
    # as "Future exception was never retrieved" for the handshake's outcome.
    async def main() -> None:
        async with relays(sock_dir, workers=workers, wait_target=30.0) as r:
            await close_source_relay_during_handshake(r)
            await asyncio.wait_for(r.server.close(), PROMPT_SECONDS)
            await wait_until(lambda: not r.server.sessions, PROMPT_SECONDS, "sessions to end")
            gc.collect()  # an unretrieved exception is reported when its future is freed

    try:
        run_async(main())
    finally:
        gc.collect()  # whatever leaked is reported here, not in a later test


@pytest.mark.parametrize("workers", helpers.BOTH_WORKER_COUNTS)
def test_source_relay_closed_while_a_channel_awaits_its_101_closes_the_source_peer(
    workers: int, run_async: Run, sock_dir: Path
) -> None:
    # QEMU must see its migration connection end when the relay stops (migrate --to runs
    # the source relay inside a process that lives on), not wait for the process to exit.
    async def main() -> None:
        async with relays(sock_dir, workers=workers, wait_target=30.0) as r:
            reader = await close_source_relay_during_handshake(r)
            await asyncio.wait_for(read_until_closed(reader), PROMPT_SECONDS)

    try:
        run_async(main())
    finally:
        gc.collect()  # whatever leaked is reported here, not in a later test
