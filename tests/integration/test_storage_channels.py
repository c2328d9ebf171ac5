"""Storage channels (DESIGN.md §9) through both relays in-process, over real sockets.

source NBD client ──unix──▶ SourceRelay (SOCK.nbd) ══ws══▶ RelayServer ──unix──▶ TARGET.nbd

The unix peers stand in for the QEMUs: what source QEMU's NBD client writes must reach
the destination's NBD server beside the migration socket (never the migration socket),
without waiting for the migration channels, in the same session as them; and the
server's ``finish_target`` hook runs once a prepared session has ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

from tests.helpers import wait_until
from tests.integration.test_relay import (
    PROMPT_SECONDS,
    Run,
    UnixPeerServer,
    open_channel,
    read_until_closed,
    relays,
)

from migrelay.aio.client import ClientConfig, open_websocket
from migrelay.aio.local import storage_socket
from migrelay.aio.server import FinishTarget, PrepareTarget, RelayServer, ServerConfig
from migrelay.core.frames import Opcode, encode_frame
from migrelay.errors import HandshakeRefused

MASK = b"\x01\x02\x03\x04"


@contextlib.asynccontextmanager
async def hooked_server(
    sock_dir: Path, prepare: PrepareTarget, finish: FinishTarget
) -> AsyncIterator[tuple[RelayServer, str]]:
    """A server of one target (a peer that reads until closed) with both hooks; its URL."""
    dest = sock_dir / "dest.sock"
    qemu = UnixPeerServer(read_until_closed_handler)
    await qemu.start(dest)
    server = RelayServer(
        ServerConfig(
            port=0, target=dest, wait_target=1.0, prepare_target=prepare, finish_target=finish
        )
    )
    await server.start()
    try:
        yield server, f"ws://127.0.0.1:{server.port}/"
    finally:
        await asyncio.wait_for(server.close(), 3 * PROMPT_SECONDS)
        await qemu.close()


def test_storage_socket_is_the_migration_socket_plus_nbd() -> None:
    assert storage_socket(Path("/run/migrelay/vm1.sock")) == Path("/run/migrelay/vm1.sock.nbd")


def test_an_nbd_connection_reaches_the_storage_socket_and_not_the_migration_socket(
    run_async: Run, sock_dir: Path
) -> None:
    storage_bytes: list[bytes] = []
    migration_accepts: list[int] = []

    async def nbd_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readexactly(8)
        storage_bytes.append(request)
        writer.write(b"reply:" + request)
        await writer.drain()
        await read_until_closed(reader)

    async def migration_target(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        migration_accepts.append(1)
        await read_until_closed(reader)

    async def main() -> None:
        async with relays(sock_dir) as r:
            assert r.source.storage_path == storage_socket(r.src)
            nbd = UnixPeerServer(nbd_server)
            await nbd.start(storage_socket(r.dest))
            qemu = UnixPeerServer(migration_target)
            await qemu.start(r.dest)
            # Storage first, as --copy-storage does: no migration channel exists yet,
            # and the storage channel must not wait for one.
            reader, writer = await asyncio.open_unix_connection(str(r.source.storage_path))
            writer.write(b"NBDMAGIC")
            reply = await asyncio.wait_for(reader.readexactly(14), PROMPT_SECONDS)
            assert reply == b"reply:NBDMAGIC"
            assert storage_bytes == [b"NBDMAGIC"]
            # Then RAM, in the same session.
            _, ram_writer = await asyncio.open_unix_connection(str(r.src))
            ram_writer.write(b"QEVM")
            await wait_until(lambda: len(r.server.channels) == 2, PROMPT_SECONDS, "2 channels")
            (session,) = r.server.sessions.values()
            assert session.claimed == {"storage-0", "0"}
            # The migration socket got the migration channel only (its handler runs
            # a loop iteration after the server's connect).
            await wait_until(lambda: migration_accepts == [1], PROMPT_SECONDS, "QEMU's accept")
            writer.close()
            ram_writer.close()
            await r.wait_all_closed()
            await nbd.close()
            await qemu.close()

    run_async(main())


def test_storage_channels_are_numbered_apart_and_a_repeated_one_is_refused(
    run_async: Run, sock_dir: Path
) -> None:
    async def main() -> None:
        dest = sock_dir / "dest.sock"
        nbd = UnixPeerServer(read_until_closed_handler)
        await nbd.start(storage_socket(dest))
        server = RelayServer(ServerConfig(port=0, target=dest, wait_target=1.0))
        await server.start()
        url = f"ws://127.0.0.1:{server.port}/"
        try:
            headers = [("Migrelay-Session", "s1"), ("Migrelay-Channel", "storage-1")]
            transport, _ = await open_websocket(ClientConfig(url=url), headers)
            try:
                await open_websocket(ClientConfig(url=url), headers)
            except HandshakeRefused as exc:
                assert (exc.status, exc.reason) == (
                    409,
                    "channel storage-1 of session s1 repeated",
                )
            else:
                raise AssertionError("a repeated storage channel was accepted")
            # storage-1 did not wait for storage-0, nor for migration channel 0.
            await wait_until(lambda: nbd.accepted == 1, PROMPT_SECONDS, "the NBD connection")
            transport.write(encode_frame(Opcode.BINARY, b"", MASK))
            transport.abort()
        finally:
            await asyncio.wait_for(server.close(), 3 * PROMPT_SECONDS)
            await nbd.close()

    run_async(main())


def preparation_started(server: RelayServer, session_id: str) -> bool:
    """Whether the `ServerConfig.prepare_target` task of ``session_id`` has run a step.

    A task's first step runs on a later loop iteration than its creation: until then
    it has not reached any await, so nothing it does first has happened yet.
    """
    for session in server.sessions.values():
        if session.id == session_id and isinstance(session.prepared, asyncio.Task):
            coro = session.prepared.get_coro()
            return inspect.iscoroutine(coro) and (
                inspect.getcoroutinestate(coro) != inspect.CORO_CREATED
            )
    return False


async def read_until_closed_handler(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    await read_until_closed(reader)


def test_finish_hook_runs_once_after_the_last_channel_and_before_the_next_prepare(
    run_async: Run, sock_dir: Path
) -> None:
    events: list[str] = []
    finish_started = asyncio.Event()
    release_finish = asyncio.Event()

    async def prepare(name: str, target: Path, headers: Mapping[str, str]) -> None:
        events.append(f"prepare {headers['migrelay-session']}")

    async def finish(name: str, target: Path, headers: Mapping[str, str]) -> None:
        events.append(f"finish {headers['migrelay-session']} start")
        finish_started.set()
        await release_finish.wait()
        events.append(f"finish {headers['migrelay-session']} end")

    async def main() -> None:
        async with hooked_server(sock_dir, prepare, finish) as (server, url):
            try:
                first = await open_channel(url, "a", 0)
                second = await open_channel(url, "a", 1)
                await wait_until(lambda: len(server.channels) == 2, PROMPT_SECONDS, "2 channels")
                first.abort()
                await wait_until(lambda: len(server.channels) == 1, PROMPT_SECONDS, "1 channel")
                assert events == ["prepare a"]  # the session still has a channel
                second.abort()
                await asyncio.wait_for(finish_started.wait(), PROMPT_SECONDS)
                # A new session to the same target waits for the clean-up of the last.
                third_task = asyncio.ensure_future(open_channel(url, "b", 0))
                # b's preparation has begun and is parked: at the wait for a's clean-up,
                # or it would have called the hook, which records "prepare b" at once.
                await wait_until(
                    lambda: preparation_started(server, "b"), PROMPT_SECONDS, "b's preparation"
                )
                assert events == ["prepare a", "finish a start"]
                release_finish.set()
                third = await asyncio.wait_for(third_task, PROMPT_SECONDS)
                assert events == ["prepare a", "finish a start", "finish a end", "prepare b"]
                third.abort()
                await wait_until(lambda: len(events) == 6, PROMPT_SECONDS, "the second finish")
            finally:
                # Unblocks the hook before the server closes, which would wait on it.
                release_finish.set()

    run_async(main())


def test_finish_hook_waits_while_another_session_to_the_target_runs(
    run_async: Run, sock_dir: Path
) -> None:
    finished: list[str] = []

    async def prepare(name: str, target: Path, headers: Mapping[str, str]) -> None:
        return None

    async def finish(name: str, target: Path, headers: Mapping[str, str]) -> None:
        finished.append(headers["migrelay-session"])

    async def main() -> None:
        async with hooked_server(sock_dir, prepare, finish) as (server, url):
            old = await open_channel(url, "old", 0)
            retry = await open_channel(url, "retry", 0)
            await wait_until(lambda: len(server.channels) == 2, PROMPT_SECONDS, "2 channels")
            old.abort()
            # The server decides on the clean-up in the call that forgets the session:
            # once it is gone, any clean-up task has been created (and may have run).
            await wait_until(lambda: len(server.sessions) == 1, PROMPT_SECONDS, "old gone")
            # The retry's set-up is the target's state now: not the old session's to undo.
            assert not server._finishing, server._finishing
            assert finished == []
            retry.abort()
            await wait_until(lambda: finished == ["retry"], PROMPT_SECONDS, "the finish")

    run_async(main())
