"""The close codes the README lists that no other test shows sent: 1008, 1011 and 4003.

Each is sent on the wire (read by the other relay, or by the ``websockets`` library as a
foreign peer) and logged by both ends in their one closing line. Both relays run
in-process over real sockets; the unix peers stand in for the two QEMUs.

(1002, 1003, 1007, 1009: ``test_hostile.py`` and ``test_interop.py``; 4000, 4002 and
4004: ``test_relay.py`` and ``test_hosting.py``. 4001 is listed nowhere: ``serve``
answers 101 only once the destination is connected, so an unreachable destination is
503, never a close.)
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
from tests import helpers
from tests.integration.test_relay import (
    PROMPT_SECONDS,
    TRANSFER_SECONDS,
    UnixPeerServer,
    channel_close_lines,
    read_until_closed,
    relays,
)
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from migrelay.core.session import RelaySession, Role

Run = Callable[[Coroutine[Any, Any, None]], None]

SUBPROTOCOL = Subprotocol("migrelay.v1")
#: What each side writes: enough for several reads, less than the socket buffers.
CHUNK = random.Random(3).randbytes(64 << 10)
#: The closing line's tail: "...; close code 1011 internal error".
CLOSE_CODE = re.compile(r"; close code (\d+) [a-z ]+$")


def close_code_of(line: str) -> int:
    match = CLOSE_CODE.search(line)
    assert match is not None, line
    return int(match.group(1))


async def write_then_drain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A QEMU that writes, then reads until its connection ends."""
    writer.write(CHUNK)
    await writer.drain()
    await read_until_closed(reader)


# -- 1011 internal error ----------------------------------------------------------------


class Bug(Exception):
    """Stands in for a bug in the relay's own code."""


@pytest.mark.parametrize(
    ("role", "method"),
    [
        (Role.SERVER, "receive_frames"),
        (Role.SERVER, "frame_data"),
        (Role.CLIENT, "receive_frames"),
        (Role.CLIENT, "frame_data"),
    ],
    ids=["serve-websocket-read", "serve-unix-read", "connect-websocket-read", "connect-unix-read"],
)
def test_an_internal_error_in_a_channel_is_1011_to_the_peer_and_a_traceback_in_the_log(
    role: Role,
    method: str,
    run_async: Run,
    sock_dir: Path,
    logs: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A bug while relaying either way, on either relay: the peer learns only the code,
    # the log gets the traceback, both QEMUs see their connection end at once.
    original = getattr(RelaySession, method)

    def buggy(self: RelaySession, *args: Any) -> Any:
        if self.role is role:
            raise Bug("the relay's own mistake")
        return original(self, *args)

    monkeypatch.setattr(RelaySession, method, buggy)

    async def main() -> None:
        async with relays(sock_dir) as r:
            dest = UnixPeerServer(write_then_drain)
            await dest.start(r.dest)
            reader, writer = await asyncio.open_unix_connection(str(r.src))
            writer.write(CHUNK)
            await asyncio.wait_for(read_until_closed(reader), TRANSFER_SECONDS)
            writer.close()
            await r.wait_all_closed()
            await dest.handlers_done(PROMPT_SECONDS)
            await dest.close()
            assert not r.source.all_clean
        lines = channel_close_lines(logs)
        assert len(lines) == 2, lines
        # (uvloop may read source QEMU's first bytes before the channel is attached: the
        # error is then "while starting to relay", when the channel replays them.)
        failing = [line for line in lines if " closed: internal error while " in line]
        other = [line for line in lines if "peer closed with 1011 internal error" in line]
        assert len(failing) == 1 and len(other) == 1, lines
        assert [close_code_of(line) for line in lines] == [1011, 1011], lines
        errors = [r for r in logs.records if r.levelno == logging.ERROR]
        assert len(errors) == 1, errors
        assert "internal error while " in errors[0].getMessage()
        assert errors[0].exc_info is not None and errors[0].exc_info[0] is Bug

    run_async(main())


def test_a_websockets_client_gets_1011_when_serve_fails_inside(
    run_async: Run,
    sock_dir: Path,
    logs: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def buggy(self: RelaySession, *args: Any) -> Any:
        raise Bug("the relay's own mistake")

    monkeypatch.setattr(RelaySession, "receive_frames", buggy)

    async def main() -> None:
        async with relays(sock_dir) as r:
            dest = UnixPeerServer(read_until_closed_handler)
            await dest.start(r.dest)
            async with ws_connect(r.url, subprotocols=[SUBPROTOCOL], compression=None) as ws:
                await ws.send(CHUNK)
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), PROMPT_SECONDS)
                assert ws.close_code == 1011
                assert ws.close_reason == ""  # the exception's text stays in the log
            await helpers.wait_until(
                lambda: not r.server.channels, PROMPT_SECONDS, "serve's channel to close"
            )
            await dest.handlers_done(PROMPT_SECONDS)
            await dest.close()
        [line] = channel_close_lines(logs)
        assert "internal error while relaying from the websocket" in line, line
        assert close_code_of(line) == 1011

    run_async(main())


async def read_until_closed_handler(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await read_until_closed(reader)


# -- 1008 policy violation --------------------------------------------------------------


def test_data_after_end_of_stream_is_1008_policy_violation(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    # Valid RFC 6455 (so not 1002), against migrelay.v1's half-close: a foreign client
    # that ends its direction with the zero-length message, then sends more.
    async def main() -> None:
        async with relays(sock_dir) as r:
            dest = UnixPeerServer(read_until_closed_handler)
            await dest.start(r.dest)
            async with ws_connect(r.url, subprotocols=[SUBPROTOCOL], compression=None) as ws:
                await ws.send(CHUNK)
                await ws.send(b"")  # end of stream
                await ws.send(b"late")
                with pytest.raises(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), PROMPT_SECONDS)
                assert ws.close_code == 1008
            await helpers.wait_until(
                lambda: not r.server.channels, PROMPT_SECONDS, "serve's channel to close"
            )
            await dest.handlers_done(PROMPT_SECONDS)
            await dest.close()
        [line] = channel_close_lines(logs)
        assert "peer broke the protocol: data after end of stream" in line, line
        assert close_code_of(line) == 1008

    run_async(main())


# -- 4003 source closed -----------------------------------------------------------------


def test_source_gone_while_the_destination_still_writes_is_4003_on_both_relays(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    # Source QEMU closed its socket; destination QEMU keeps writing on the return path.
    # What it writes can no longer be delivered: the source relay fails the channel
    # with 4003 and serve closes destination QEMU's connection.
    stop = asyncio.Event()

    async def destination(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(len(CHUNK))
        while not stop.is_set():
            writer.write(CHUNK)
            try:
                await writer.drain()
            except ConnectionError:
                return
            await asyncio.sleep(0.01)

    async def main() -> None:
        async with relays(sock_dir) as r:
            dest = UnixPeerServer(destination)
            await dest.start(r.dest)
            reader, writer = await asyncio.open_unix_connection(str(r.src))
            writer.write(CHUNK)
            await reader.readexactly(1)  # the return path is flowing
            writer.transport.abort()  # source QEMU gone, bytes unread
            try:
                await r.wait_all_closed(TRANSFER_SECONDS)
            finally:
                stop.set()
            await dest.handlers_done(PROMPT_SECONDS)
            await dest.close()
            assert not r.source.all_clean
        lines = channel_close_lines(logs)
        assert len(lines) == 2, lines
        assert [close_code_of(line) for line in lines] == [4003, 4003], lines
        assert any("while data was still arriving" in line for line in lines), lines
        assert any("peer closed with 4003 source closed" in line for line in lines), lines

    run_async(main())
