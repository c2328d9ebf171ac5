"""``ServerConfig.prepare_target``: the hook ``serve --qmp`` uses, over real sockets."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from tests.helpers import FACTOR
from tests.loops import AsyncRunner

from migrelay.aio.client import ClientConfig, open_websocket
from migrelay.aio.server import PrepareTarget, RelayServer, ServerConfig
from migrelay.errors import HandshakeRefused, Refusal

Call = tuple[str, Path, dict[str, str]]

#: Generous bound for anything local to happen (a close, a connect).
PROMPT_S = 5.0 * FACTOR


class _Destination(asyncio.Protocol):
    """Stands in for destination QEMU: accepts and keeps the connection."""

    def __init__(self, transports: list[asyncio.BaseTransport]) -> None:
        self.transports = transports

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transports.append(transport)


async def _with_server(
    sock_dir: Path, hook: PrepareTarget, channels: int, migration_header: str | None
) -> list[asyncio.Transport | BaseException]:
    """Serve ``sock_dir/vm.sock``; open ``channels`` channels of one session, in order."""
    dest_transports: list[asyncio.BaseTransport] = []
    loop = asyncio.get_running_loop()
    dest = await loop.create_unix_server(
        lambda: _Destination(dest_transports), str(sock_dir / "vm.sock")
    )
    server = RelayServer(
        ServerConfig(port=0, target_dir=sock_dir, wait_target=2.0, prepare_target=hook)
    )
    await server.start()
    port = server.sockets[0].getsockname()[1]
    extra = [("Migrelay-Migration", migration_header)] if migration_header else []
    config = ClientConfig(url=f"ws://127.0.0.1:{port}/vm", headers=extra)
    results: list[asyncio.Transport | BaseException] = []
    try:
        for number in range(channels):
            headers = [("Migrelay-Session", "s1"), ("Migrelay-Channel", str(number))]
            try:
                transport, _ = await open_websocket(config, headers)
            except HandshakeRefused as exc:
                results.append(exc)
            else:
                results.append(transport)
    finally:
        # uvloop's transports do not subclass asyncio.Transport: test for the error.
        for result in results:
            if not isinstance(result, BaseException):
                result.abort()
        deadline = time.monotonic() + PROMPT_S
        while server.channels and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.005)  # a poll with a deadline, as in test_relay.py
        await asyncio.wait_for(server.close(), PROMPT_S)
        for dest_transport in dest_transports:
            dest_transport.close()
        dest.close()
        await asyncio.wait_for(dest.wait_closed(), PROMPT_S)
    return results


def test_hook_runs_once_per_session_before_the_first_channel_connects(
    sock_dir: Path, run_async: AsyncRunner
) -> None:
    calls: list[Call] = []

    async def hook(name: str, target: Path, headers: Mapping[str, str]) -> None:
        calls.append((name, target, dict(headers)))

    # Channels opened one after another, each after the previous one got its 101: the
    # session must survive between them (it used to be forgotten right after a
    # channel's unix connect, so channel 1 started a new session and waited for ever).
    results = run_async(_with_server(sock_dir, hook, 3, "multifd=2,postcopy=0"))
    assert not any(isinstance(result, BaseException) for result in results), results
    assert len(calls) == 1
    name, target, headers = calls[0]
    assert (name, target) == ("vm", sock_dir / "vm.sock")
    assert headers["migrelay-migration"] == "multifd=2,postcopy=0"


@pytest.mark.parametrize(
    ("error", "status", "reason"),
    [
        (
            Refusal(409, "destination vm not ready", detail="/secret/vm.qmp"),
            409,
            "destination vm not ready",
        ),
        (RuntimeError("qmp socket /secret/vm.qmp gone"), 503, "destination not prepared"),
    ],
)
def test_a_failing_hook_refuses_the_channel_without_its_text(
    error: Exception,
    status: int,
    reason: str,
    sock_dir: Path,
    run_async: AsyncRunner,
    logs: pytest.LogCaptureFixture,
) -> None:
    async def hook(name: str, target: Path, headers: Mapping[str, str]) -> None:
        raise error

    results = run_async(_with_server(sock_dir, hook, 1, None))
    assert isinstance(results[0], HandshakeRefused), results
    assert (results[0].status, results[0].reason) == (status, reason)
    # The exception's text (a path here) is for the server's log, never for the peer.
    assert "/secret/vm.qmp" not in results[0].reason
    refusals = [r.getMessage() for r in logs.records if "refused" in r.getMessage()]
    assert len(refusals) == 1 and "/secret/vm.qmp" in refusals[0], refusals
