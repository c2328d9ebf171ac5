"""Hostile ``Migrelay-Channel`` / ``Migrelay-Session`` values on the wire: 400, never 500.

The request is written byte for byte on a raw socket: a header value is whatever bytes
the peer sent, decoded as latin-1, so ``Migrelay-Channel: \\xb2`` reaches the server as
"²", which ``str.isdigit()`` accepts and ``int()`` refuses (it used to be a 500 with a
traceback in the log).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
from pathlib import Path

import pytest
from tests import helpers
from tests.loops import AsyncRunner

from migrelay.aio.server import RelayServer, ServerConfig

PROMPT_SECONDS = 2.0 * helpers.FACTOR


def upgrade_request(extra_headers: bytes) -> bytes:
    key = base64.b64encode(os.urandom(16))
    return (
        b"GET / HTTP/1.1\r\n"
        b"Host: 127.0.0.1\r\n"
        b"Upgrade: websocket\r\n"
        b"Connection: Upgrade\r\n"
        b"Sec-WebSocket-Key: " + key + b"\r\n"
        b"Sec-WebSocket-Version: 13\r\n"
        b"Sec-WebSocket-Protocol: migrelay.v1\r\n" + extra_headers + b"\r\n"
    )


async def answer_of(port: int, request: bytes) -> bytes:
    """Send ``request``; return the whole answer (read until the server closes)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        return await asyncio.wait_for(reader.read(), PROMPT_SECONDS)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def status_of(port: int, request: bytes) -> int:
    """Send ``request``; return the status of the answer."""
    raw = await answer_of(port, request)
    status_line = raw.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 "), raw
    return int(status_line.split()[1])


HOSTILE_CHANNELS: dict[str, bytes] = {
    "superscript_two_latin1": b"\xb2",
    "superscript_two_utf8": "\u00b2".encode(),
    "arabic_indic_three_utf8": "\u0663".encode(),
    "fullwidth_one_utf8": "\uff11".encode(),
    "leading_zero": b"01",
    "plus_sign": b"+1",
    "inner_space": b"1 2",
    "underscore": b"1_0",
    "max_channel": b"256",
    "huge": b"9" * 5000,
}


@pytest.mark.parametrize("value", list(HOSTILE_CHANNELS.values()), ids=list(HOSTILE_CHANNELS))
def test_hostile_channel_number_is_400_without_a_traceback(
    run_async: AsyncRunner,
    sock_dir: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    value: bytes,
) -> None:
    monkeypatch.setattr(logging.getLogger("migrelay"), "propagate", True)
    caplog.set_level(logging.DEBUG, logger="migrelay")
    # The no-traceback check holds for the whole request, not only until the answer.
    request = upgrade_request(b"Migrelay-Session: s1\r\nMigrelay-Channel: " + value + b"\r\n")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        target = sock_dir / "dest.sock"
        connected: list[asyncio.BaseTransport] = []

        class Destination(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                connected.append(transport)

        listener = await loop.create_unix_server(Destination, str(target))
        server = RelayServer(ServerConfig(port=0, target=target))
        await server.start()
        try:
            port = server.sockets[0].getsockname()[1]
            assert await status_of(port, request) == 400
            assert connected == [], "a refused channel reached the destination"
            # The same session and channel, well formed, is still accepted.
            good = upgrade_request(b"Migrelay-Session: s1\r\nMigrelay-Channel: 0\r\n")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(good)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), PROMPT_SECONDS)
            assert head.startswith(b"HTTP/1.1 101 "), head
            writer.transport.abort()
        finally:
            await asyncio.wait_for(server.close(), 3 * PROMPT_SECONDS)
            for transport in connected:
                transport.close()
            listener.close()
            await asyncio.wait_for(listener.wait_closed(), PROMPT_SECONDS)

    run_async(main())
    records = [r for r in caplog.records if r.name.startswith("migrelay")]
    assert not [r for r in records if r.exc_info or r.levelno >= logging.ERROR], [
        r.getMessage() for r in records
    ]
    assert "Traceback" not in caplog.text
    refusals = [r.getMessage() for r in records if ": 400 " in r.getMessage()]
    assert len(refusals) == 1 and "invalid Migrelay-Channel" in refusals[0], refusals


def test_a_malformed_upgrade_gets_fixed_text_and_its_cause_goes_to_the_log(
    run_async: AsyncRunner,
    sock_dir: Path,
    logs: pytest.LogCaptureFixture,
) -> None:
    # wsproto refuses version 12 with its own message; that message names nothing
    # secret, but it is an exception's text: the peer gets migrelay's fixed reason.
    request = upgrade_request(b"").replace(
        b"Sec-WebSocket-Version: 13", b"Sec-WebSocket-Version: 12"
    )

    async def main() -> bytes:
        server = RelayServer(ServerConfig(port=0, target=sock_dir / "dest.sock"))
        await server.start()
        try:
            return await answer_of(server.sockets[0].getsockname()[1], request)
        finally:
            await asyncio.wait_for(server.close(), 3 * PROMPT_SECONDS)

    head, _, body = run_async(main()).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 426 "), head
    assert b"\r\nsec-websocket-version: 13" in head.lower(), head  # RFC 6455 §4.4
    assert body.strip() == b"invalid upgrade request", body
    refusals = [r.getMessage() for r in logs.records if "refused" in r.getMessage()]
    assert len(refusals) == 1, refusals
    assert "426 invalid upgrade request (RemoteProtocolError: " in refusals[0], refusals
