"""The ``websockets`` library as a foreign peer of both relays (DESIGN.md §3, §7).

* a websockets client through ``serve``: binary messages arrive at the destination
  socket intact, the zero-length message is EOF, the destination's bytes come back as
  binary messages, and permessage-deflate is never negotiated;
* a websockets server behind ``connect``: it gets what QEMU wrote, the zero-length
  message at QEMU's EOF, and its replies reach QEMU.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests import helpers
from tests.helpers import random_chunks
from websockets.asyncio.client import connect as ws_connect
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from migrelay.aio.client import ClientConfig, SourceRelay
from migrelay.aio.server import RelayServer, ServerConfig

Run = Callable[[Coroutine[Any, Any, None]], None]

FACTOR = helpers.FACTOR
PROMPT_SECONDS = 2.0 * FACTOR
TRANSFER_SECONDS = 30.0 * FACTOR
MESSAGE_LIMIT = 1 << 20  # DESIGN.md §3: the default largest message
SUBPROTOCOL = Subprotocol("migrelay.v1")


def digest_of(seed: int, total: int) -> bytes:
    return hashlib.sha256(b"".join(random_chunks(seed, total, MESSAGE_LIMIT))).digest()


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    await helpers.wait_until(predicate, PROMPT_SECONDS, what)


@dataclass
class Destination:
    """Destination QEMU stand-in: hashes what arrives until EOF, then replies and closes."""

    reply_seed: int
    reply_bytes: int
    received: list[tuple[int, bytes]] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        digest, count = hashlib.sha256(), 0
        while chunk := await reader.read(MESSAGE_LIMIT):
            digest.update(chunk)
            count += len(chunk)
        self.received.append((count, digest.digest()))
        # The reply goes out only after EOF: the WebSocket must still be open for it.
        for chunk in random_chunks(self.reply_seed, self.reply_bytes, MESSAGE_LIMIT):
            writer.write(chunk)
            await writer.drain()
        writer.close()
        await writer.wait_closed()
        self.done.set()


@contextlib.asynccontextmanager
async def serve_relay(sock_dir: Path, destination: Destination) -> AsyncIterator[str]:
    """``serve`` in-process with the destination socket; yields its ws:// URL."""
    dest = sock_dir / "dest.sock"
    unix = await asyncio.start_unix_server(destination.handle, str(dest))
    server = RelayServer(ServerConfig(port=0, target=dest, wait_target=5.0))
    await server.start()
    try:
        yield f"ws://127.0.0.1:{server.sockets[0].getsockname()[1]}/"
        await wait_until(lambda: not server.channels, "serve's channels to close")
    finally:
        await asyncio.wait_for(server.close(), 3 * PROMPT_SECONDS)
        unix.close()
        await asyncio.wait_for(unix.wait_closed(), PROMPT_SECONDS)


async def receive_until_empty_message(ws: Any) -> tuple[int, bytes, int]:
    """Receive binary messages up to the zero-length one; return count, sha256, messages."""
    digest, count, messages = hashlib.sha256(), 0, 0
    while True:
        message = await ws.recv()
        assert isinstance(message, bytes), f"text message {message!r}"
        if not message:
            return count, digest.digest(), messages
        assert len(message) <= MESSAGE_LIMIT
        digest.update(message)
        count += len(message)
        messages += 1


# -- websockets client -> serve ---------------------------------------------------------


def test_websockets_client_binary_messages_reach_destination_and_replies_come_back(
    run_async: Run, sock_dir: Path
) -> None:
    sent_bytes, reply_bytes = 16 << 20, 8 << 20

    async def main() -> None:
        destination = Destination(reply_seed=2, reply_bytes=reply_bytes)
        async with serve_relay(sock_dir, destination) as url:
            async with ws_connect(url, subprotocols=[SUBPROTOCOL], compression=None) as ws:
                assert ws.subprotocol == "migrelay.v1"
                for chunk in random_chunks(1, sent_bytes, MESSAGE_LIMIT):
                    await ws.send(chunk)
                await ws.send(b"")  # end of this direction
                count, digest, messages = await asyncio.wait_for(
                    receive_until_empty_message(ws), TRANSFER_SECONDS
                )
                # The server closes (1000) once both directions ended.
                await asyncio.wait_for(ws.wait_closed(), PROMPT_SECONDS)
                assert ws.close_code == 1000
            await asyncio.wait_for(destination.done.wait(), PROMPT_SECONDS)
        assert destination.received == [(sent_bytes, digest_of(1, sent_bytes))]
        assert (count, digest) == (reply_bytes, digest_of(2, reply_bytes))
        assert messages >= reply_bytes // MESSAGE_LIMIT

    run_async(main())


def test_websockets_client_offering_deflate_gets_no_compression(
    run_async: Run, sock_dir: Path
) -> None:
    async def main() -> None:
        destination = Destination(reply_seed=3, reply_bytes=1 << 20)
        async with serve_relay(sock_dir, destination) as url:
            # compression="deflate" is the default: the client offers permessage-deflate.
            async with ws_connect(url, subprotocols=[SUBPROTOCOL]) as ws:
                assert ws.request is not None and ws.response is not None
                assert "permessage-deflate" in ws.request.headers["Sec-WebSocket-Extensions"]
                assert "Sec-WebSocket-Extensions" not in ws.response.headers
                assert ws.protocol.extensions == []
                payload = bytes(MESSAGE_LIMIT)  # compresses ~1000:1, were it compressed
                await ws.send(payload)
                await ws.send(b"")
                count, digest, _ = await asyncio.wait_for(
                    receive_until_empty_message(ws), TRANSFER_SECONDS
                )
                await asyncio.wait_for(ws.wait_closed(), PROMPT_SECONDS)
            await asyncio.wait_for(destination.done.wait(), PROMPT_SECONDS)
        assert destination.received == [(len(payload), hashlib.sha256(payload).digest())]
        assert (count, digest) == (1 << 20, digest_of(3, 1 << 20))

    run_async(main())


@pytest.mark.parametrize(
    ("message", "code"),
    [("a text message", 1003), (bytes(MESSAGE_LIMIT + 1), 1009)],
    ids=["text_message_is_1003", "message_over_limit_is_1009"],
)
def test_websockets_client_breaking_the_rules_is_closed_with_its_code(
    run_async: Run, sock_dir: Path, message: str | bytes, code: int
) -> None:
    async def main() -> None:
        destination = Destination(reply_seed=4, reply_bytes=0)
        async with serve_relay(sock_dir, destination) as url:
            async with ws_connect(
                url, subprotocols=[SUBPROTOCOL], compression=None, max_size=None
            ) as ws:
                await ws.send(message)
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), PROMPT_SECONDS)
                assert ws.close_code == code
            # The destination is closed too, without receiving the offending message.
            await asyncio.wait_for(destination.done.wait(), PROMPT_SECONDS)
        assert destination.received == [(0, hashlib.sha256().digest())]

    run_async(main())


# -- connect -> websockets server -------------------------------------------------------


def test_websockets_server_behind_connect_gets_source_bytes_and_its_replies_arrive(
    run_async: Run, sock_dir: Path
) -> None:
    sent_bytes, reply_bytes = 16 << 20, 8 << 20
    seen: dict[str, Any] = {}

    async def handler(ws: Any) -> None:
        seen["subprotocol"] = ws.subprotocol
        seen["session"] = ws.request.headers.get("Migrelay-Session")
        seen["channel"] = ws.request.headers.get("Migrelay-Channel")
        seen["extensions"] = ws.request.headers.get("Sec-WebSocket-Extensions")
        seen["received"] = await receive_until_empty_message(ws)
        for chunk in random_chunks(6, reply_bytes, MESSAGE_LIMIT):
            await ws.send(chunk)
        await ws.send(b"")
        # migrelay closes (1000) once both directions ended.
        await ws.wait_closed()
        seen["close_code"] = ws.close_code

    async def main() -> None:
        # Default websockets settings, subprotocol aside: it would offer deflate if asked.
        server = await ws_serve(handler, "127.0.0.1", 0, subprotocols=[SUBPROTOCOL])
        port = server.sockets[0].getsockname()[1]
        src = sock_dir / "src.sock"
        relay = SourceRelay(ClientConfig(url=f"ws://127.0.0.1:{port}/"), src, once=True)
        await relay.start()
        try:
            reader, writer = await asyncio.open_unix_connection(str(src))

            async def send() -> None:
                for chunk in random_chunks(5, sent_bytes, MESSAGE_LIMIT):
                    writer.write(chunk)
                    await writer.drain()
                writer.write_eof()

            _, reply = await asyncio.wait_for(
                asyncio.gather(send(), reader.read()), TRANSFER_SECONDS
            )
            writer.close()
            await asyncio.wait_for(relay.finished.wait(), PROMPT_SECONDS)
            await wait_until(lambda: "close_code" in seen, "the websockets handler to end")
        finally:
            await relay.close()
            server.close()
            await asyncio.wait_for(server.wait_closed(), PROMPT_SECONDS)
        assert hashlib.sha256(reply).digest() == digest_of(6, reply_bytes)
        assert len(reply) == reply_bytes
        count, digest, messages = seen["received"]
        assert (count, digest) == (sent_bytes, digest_of(5, sent_bytes))
        assert messages >= sent_bytes // MESSAGE_LIMIT
        assert seen["subprotocol"] == "migrelay.v1"
        assert seen["channel"] == "0" and seen["session"]
        assert seen["extensions"] is None  # migrelay never offers compression
        assert seen["close_code"] == 1000
        assert relay.all_clean

    run_async(main())
