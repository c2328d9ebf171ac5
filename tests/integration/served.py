"""An in-process ``serve`` for the integration tests of its hosting features and of its
hostile tenants: a ``--target-dir`` holding vm1.sock and vm2.sock (sinks that count the
bytes), two tokens, and clients that upgrade or are refused."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests import helpers

from migrelay.aio.access import parse_token_lines
from migrelay.aio.client import ClientConfig, open_websocket
from migrelay.aio.server import RelayServer, ServerConfig
from migrelay.errors import HandshakeRefused

Run = Callable[[Coroutine[Any, Any, None]], None]

PROMPT_S = 3.0 * helpers.FACTOR
TOKEN = "all-targets-token"
VM1_TOKEN = "vm1-only-token"


@dataclass
class Sink:
    """A destination socket that keeps every connection and counts the bytes."""

    received: int = 0
    transports: list[asyncio.BaseTransport] = field(default_factory=list)

    def protocol(self) -> asyncio.Protocol:
        sink = self

        class _Protocol(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                sink.transports.append(transport)

            def data_received(self, data: bytes) -> None:
                sink.received += len(data)

            def eof_received(self) -> bool:
                return False

        return _Protocol()


@dataclass
class Served:
    server: RelayServer
    port: int
    sink: Sink
    logs: pytest.LogCaptureFixture

    def url(self, path: str = "/vm1") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def lines(self) -> list[str]:
        return [r.getMessage() for r in self.logs.records if r.name.startswith("migrelay")]


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    await helpers.wait_until(predicate, PROMPT_S, what)


@contextlib.asynccontextmanager
async def serving(
    sock_dir: Path, logs: pytest.LogCaptureFixture, **config: Any
) -> AsyncIterator[Served]:
    """``serve --target-dir`` holding vm1.sock and vm2.sock, with two tokens (and
    `helpers.WORKERS` worker loops unless ``config`` says)."""
    loop = asyncio.get_running_loop()
    sink = Sink()
    listeners = [
        await loop.create_unix_server(sink.protocol, str(sock_dir / f"{name}.sock"))
        for name in ("vm1", "vm2")
    ]
    entries = parse_token_lines([TOKEN, f"{VM1_TOKEN} vm1"])
    settings: dict[str, Any] = {
        "port": 0,
        "target_dir": sock_dir,
        "tokens": entries,
        "wait_target": 0.5,
        "workers": helpers.WORKERS,
    }
    settings.update(config)
    server = RelayServer(ServerConfig(**settings))
    await server.start()
    served = Served(server, server.sockets[0].getsockname()[1], sink, logs)
    try:
        yield served
    finally:
        await asyncio.wait_for(server.close(), PROMPT_S)
        for transport in sink.transports:
            transport.close()
        for listener in listeners:
            listener.close()
            await listener.wait_closed()


async def upgrade(
    served: Served,
    path: str = "/vm1",
    token: str | None = TOKEN,
    headers: list[tuple[str, str]] | None = None,
) -> asyncio.Transport:
    config = ClientConfig(url=served.url(path), token=token, connect_timeout=PROMPT_S)
    transport, _ = await open_websocket(config, headers or [])
    return transport


async def refused(served: Served, **kwargs: Any) -> HandshakeRefused:
    with pytest.raises(HandshakeRefused) as caught:
        await upgrade(served, **kwargs)
    return caught.value
