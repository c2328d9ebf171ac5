"""The relays on worker threads (``--workers``): channels spread over event loops, and
everything they share still right. Real sockets, on asyncio and on uvloop.

source peers ──unix──▶ SourceRelay (2 workers) ══ws(s)══▶ RelayServer (2 workers) ──unix──▶ sink

The pool itself: one worker is the main loop and no thread; more are threads running
loops of the main loop's kind, chosen least loaded, stopped and joined with nothing
left behind. The relays: a multifd-like session of 4 channels lands on both workers of
each relay (two threads, neither the main one), in order, with every byte intact (ws
and wss); refusals (on the main loop and on the worker itself: 408, TLS), the idle
close, draining and metrics work for channels on workers; the real commands take
``--workers`` and ``workers =`` in their config file and drain on SIGTERM.
``test_relay.py`` runs its key tests (bulk data, channel order, failures, liveness,
stopping during a handshake) with 1 and 2 workers, and ``MIGRELAY_TEST_WORKERS=2``
runs every in-process relay of the integration tests on two.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import signal
import socket
import ssl
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from tests import helpers
from tests.integration.served import PROMPT_S, TOKEN, VM1_TOKEN, Served, refused, serving
from tests.pki import PKI, make_pki
from tests.processes import MigrelayProcesses
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from migrelay.aio import tls
from migrelay.aio.channel import Channel
from migrelay.aio.client import ClientConfig, SourceRelay
from migrelay.aio.server import RelayServer, ServerConfig
from migrelay.aio.service import ServeSettings, load_server_config
from migrelay.aio.source import ClientSettings
from migrelay.aio.workers import (
    DEFAULT_MAX_WORKERS,
    SWITCH_INTERVAL_S,
    WorkerPool,
    call_on,
    default_workers,
    resolve_workers,
    run_on,
)
from migrelay.errors import ConfigError
from migrelay.limits import Limits

Run = Callable[[Coroutine[Any, Any, None]], None]
FACTOR = helpers.FACTOR
#: Bytes each channel carries each way: small, but several reads and frames.
CHANNEL_BYTES = 3 << 20
CHUNK_BYTES = 256 << 10
CHANNELS = 4


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("tls") / "pki")


def thread_names() -> set[str]:
    return {thread.name for thread in threading.enumerate()}


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


async def descriptors_at_rest(sock_dir: Path) -> int:
    """The descriptors open now, once the test's loop has listened once: libuv keeps one
    (``/dev/null``, for its EMFILE trick) from a loop's first listen to its close."""
    server = await asyncio.start_unix_server(lambda r, w: None, str(sock_dir / "warm-up"))
    server.close()
    await server.wait_closed()
    return open_descriptors()


async def current_thread() -> int:
    return threading.get_ident()


# -- the pool ----------------------------------------------------------------------------


def test_workers_default_to_the_usable_cpus_at_most_four() -> None:
    cpus = len(os.sched_getaffinity(0))
    assert default_workers() == max(1, min(cpus, DEFAULT_MAX_WORKERS))
    assert resolve_workers(0) == default_workers()
    assert resolve_workers(1) == 1 and resolve_workers(6) == 6
    with pytest.raises(ValueError, match="-1"):
        resolve_workers(-1)


def test_the_settings_resolve_0_to_the_default_and_refuse_a_negative_count(
    sock_dir: Path,
) -> None:
    config, _ = load_server_config(ServeSettings(target=sock_dir / "dest.sock"))
    assert config.workers == default_workers()
    config, _ = load_server_config(ServeSettings(target=sock_dir / "dest.sock", workers=3))
    assert config.workers == 3
    assert ClientSettings(url="ws://127.0.0.1:1/").load().workers == default_workers()
    assert ClientSettings(url="ws://127.0.0.1:1/", workers=1).load().workers == 1
    assert ServerConfig().workers == 1 and ClientConfig(url="ws://h/").workers == 1
    with pytest.raises(ConfigError, match="workers"):
        ClientSettings(url="ws://127.0.0.1:1/", workers=-2).load()


def test_one_worker_is_the_main_loop_and_starts_no_thread(run_async: Run) -> None:
    async def main() -> None:
        before = thread_names()
        pool = WorkerPool(1)
        pool.start()
        assert not pool.threaded
        assert [worker.loop for worker in pool.workers] == [asyncio.get_running_loop()]
        assert await run_on(pool.workers[0].loop, current_thread) == threading.get_ident()
        assert thread_names() == before
        await pool.stop(PROMPT_S)

    run_async(main())


def test_worker_loops_are_threads_of_the_main_loops_kind_and_stop_leaving_nothing(
    run_async: Run,
) -> None:
    async def main() -> None:
        threads, descriptors = thread_names(), open_descriptors()
        pool = WorkerPool(3)
        pool.start()
        main_loop = asyncio.get_running_loop()
        assert all(type(worker.loop) is type(main_loop) for worker in pool.workers)
        idents = {await run_on(worker.loop, current_thread) for worker in pool.workers}
        assert len(idents) == 3 and threading.get_ident() not in idents
        assert len(thread_names() - threads) == 3
        await pool.stop(PROMPT_S)
        assert all(worker.loop.is_closed() for worker in pool.workers)
        assert not any(worker.thread and worker.thread.is_alive() for worker in pool.workers)
        assert thread_names() == threads
        assert open_descriptors() == descriptors

    run_async(main())


def test_worker_threads_run_with_a_short_switch_interval_restored_after_the_last(
    run_async: Run,
) -> None:
    async def main() -> None:
        before = sys.getswitchinterval()
        first, second = WorkerPool(2), WorkerPool(2)
        first.start()
        second.start()
        try:
            assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)
            await first.stop(PROMPT_S)
            assert sys.getswitchinterval() == pytest.approx(SWITCH_INTERVAL_S)
        finally:
            await first.stop(PROMPT_S)
            await second.stop(PROMPT_S)
        assert sys.getswitchinterval() == before

    run_async(main())


def test_the_least_loaded_worker_is_picked_and_ties_take_turns(run_async: Run) -> None:
    async def main() -> None:
        pool = WorkerPool(3)
        pool.start()
        try:
            picked = []
            for _ in range(3):
                worker = pool.pick()
                worker.load += 1
                picked.append(worker.index)
            assert picked == [0, 1, 2]
            pool.workers[1].load = 0
            assert pool.pick().index == 1
            pool.workers[1].load = 5
            assert [pool.pick().index for _ in range(3)] == [2, 0, 2]
        finally:
            await pool.stop(PROMPT_S)

    run_async(main())


def test_a_cancelled_caller_waits_until_the_task_on_the_worker_has_ended(
    run_async: Run,
) -> None:
    # What run_on promises the relays: once the caller is back, everything the task told
    # the caller's loop before it ended has been done.
    async def main() -> None:
        pool = WorkerPool(2)
        pool.start()
        main_loop = asyncio.get_running_loop()
        told: list[str] = []
        started = asyncio.Event()

        async def on_worker() -> None:
            call_on(main_loop, started.set)
            try:
                await asyncio.sleep(3600)
            finally:
                await asyncio.sleep(0.05)  # ends some time after its cancellation
                call_on(main_loop, told.append, "cleaned up")

        caller = asyncio.ensure_future(run_on(pool.workers[0].loop, on_worker))
        try:
            await asyncio.wait_for(started.wait(), PROMPT_S)
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
            assert told == ["cleaned up"]
        finally:
            await pool.stop(PROMPT_S)

    run_async(main())


# -- a multifd session through both relays -----------------------------------------------


@dataclass
class Destination:
    """Destination QEMU's stand-in: per connection, in accept order, the channel number it
    announced, the digest of what followed, and an answer of its own."""

    order: list[int] = field(default_factory=list)
    digests: dict[int, bytes] = field(default_factory=dict)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            # A connection the relays end early has no digest: the tests that relay
            # everything check the digests.
            await self._relay(reader, writer)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = int((await reader.readexactly(len(b"channel 0"))).split()[1])
        self.order.append(number)
        digest = hashlib.sha256()
        while chunk := await reader.read(CHUNK_BYTES):
            digest.update(chunk)
        self.digests[number] = digest.digest()
        for chunk in helpers.random_chunks(100 + number, CHANNEL_BYTES, CHUNK_BYTES):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
        writer.close()

    async def close(self) -> None:
        for writer in self.writers:
            if not writer.transport.is_closing():
                writer.transport.abort()
        pending = [task for task in self.tasks if not task.done()]
        if pending:
            await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), PROMPT_S)


def expected_digest(seed: int) -> bytes:
    return hashlib.sha256(
        b"".join(helpers.random_chunks(seed, CHANNEL_BYTES, CHUNK_BYTES))
    ).digest()


async def source_channel(path: Path, number: int, opened: asyncio.Event) -> bytes:
    """Source QEMU's stand-in for channel ``number``: announce it, wait until every channel
    is open, send its bytes and EOF, and return the digest of the answer."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(f"channel {number}".encode())
        await opened.wait()
        for chunk in helpers.random_chunks(number, CHANNEL_BYTES, CHUNK_BYTES):
            writer.write(chunk)
            await writer.drain()
        writer.write_eof()
        digest = hashlib.sha256()
        while chunk := await reader.read(CHUNK_BYTES):
            digest.update(chunk)
        return digest.digest()
    finally:
        writer.close()


async def hold_channel(path: Path, number: int) -> None:
    """Source QEMU's stand-in for a channel that stays open: announce it, then wait until
    the relay ends the connection."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    try:
        writer.write(f"channel {number}".encode())
        with contextlib.suppress(ConnectionError):
            while await reader.read(CHUNK_BYTES):
                pass
    finally:
        writer.close()


def loops_of(channels: set[Channel]) -> set[asyncio.AbstractEventLoop]:
    return {channel._loop for channel in channels}


@contextlib.asynccontextmanager
async def relay_pair(
    sock_dir: Path, pki: PKI | None, workers: int = 2
) -> AsyncIterator[tuple[RelayServer, SourceRelay, Destination]]:
    destination = Destination()
    dest_path, src_path = sock_dir / "dest.sock", sock_dir / "src.sock"
    sink = await asyncio.start_unix_server(destination.handle, str(dest_path))
    server_tls = None if pki is None else tls.server_context(pki.cert, pki.key)
    client_tls = None if pki is None else ssl.create_default_context(cafile=str(pki.ca))
    server = RelayServer(
        ServerConfig(port=0, target=dest_path, ssl_context=server_tls, workers=workers)
    )
    await server.start()
    scheme = "ws" if pki is None else "wss"
    source = SourceRelay(
        ClientConfig(
            url=f"{scheme}://127.0.0.1:{server.port}/", ssl_context=client_tls, workers=workers
        ),
        src_path,
        once=True,
    )
    await source.start()
    try:
        yield server, source, destination
    finally:
        await asyncio.wait_for(source.close(), PROMPT_S)
        await asyncio.wait_for(server.close(), PROMPT_S)
        await destination.close()
        sink.close()
        await asyncio.wait_for(sink.wait_closed(), PROMPT_S)


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_a_session_of_four_channels_spreads_over_the_workers_in_order_with_every_byte(
    scheme: str, run_async: Run, sock_dir: Path, pki: PKI
) -> None:
    async def main() -> None:
        threads, descriptors = thread_names(), await descriptors_at_rest(sock_dir)
        async with relay_pair(sock_dir, pki if scheme == "wss" else None) as (
            server,
            source,
            destination,
        ):
            opened = asyncio.Event()
            peers = []
            for number in range(CHANNELS):
                # QEMU's pattern: each channel connects once the one before is up.
                peers.append(
                    asyncio.create_task(source_channel(source.listen_path, number, opened))
                )
                await helpers.wait_until(
                    lambda n=number: len(destination.order) == n + 1,  # type: ignore[misc]
                    PROMPT_S,
                    f"channel {number} at the destination",
                )
            assert destination.order == list(range(CHANNELS))
            await helpers.wait_until(
                lambda: len(server.channels) == CHANNELS, PROMPT_S, "the server's channels"
            )
            main_loop = asyncio.get_running_loop()
            for relay_channels, pool in (
                (server.channels, server._pool),
                (source._channels, source._pool),
            ):
                worker_loops = {worker.loop for worker in pool.workers}
                assert loops_of(relay_channels) == worker_loops
                assert main_loop not in worker_loops
                assert [worker.channels for worker in pool.workers] == [2, 2]
                idents = {await run_on(loop, current_thread) for loop in worker_loops}
                assert len(idents) == 2 and threading.get_ident() not in idents
            opened.set()
            answers = await asyncio.wait_for(asyncio.gather(*peers), 30 * FACTOR)
            await asyncio.wait_for(source.finished.wait(), PROMPT_S)
            await helpers.wait_until(lambda: not server.channels, PROMPT_S, "channels to close")
            assert answers == [expected_digest(100 + n) for n in range(CHANNELS)]
            assert destination.digests == {n: expected_digest(n) for n in range(CHANNELS)}
            assert source.all_clean
            assert source.bytes_sent == CHANNELS * (len(b"channel 0") + CHANNEL_BYTES)
            assert all(worker.load == 0 for worker in server._pool.workers)
        assert thread_names() == threads
        assert open_descriptors() == descriptors

    run_async(main())


def test_stopping_the_relays_with_channels_open_on_workers_ends_them_and_the_threads(
    run_async: Run, sock_dir: Path
) -> None:
    async def main() -> None:
        threads, descriptors = thread_names(), await descriptors_at_rest(sock_dir)
        async with relay_pair(sock_dir, None) as (server, source, destination):
            peers = [
                asyncio.create_task(hold_channel(source.listen_path, number))
                for number in range(2)
            ]
            await helpers.wait_until(
                lambda: len(destination.order) == 2, PROMPT_S, "2 channels at the destination"
            )
            await asyncio.wait_for(source.close(), PROMPT_S)
            await asyncio.wait_for(server.close(), PROMPT_S)
            assert not server.channels and not source._channels
            assert thread_names() == threads
            await asyncio.wait_for(asyncio.gather(*peers), PROMPT_S)  # QEMU saw the end
        assert open_descriptors() == descriptors

    run_async(main())


# -- serve's service features with channels on workers -----------------------------------


def foreign_client(url: str) -> ws_connect:
    return ws_connect(
        url,
        subprotocols=[Subprotocol("migrelay.v1")],
        additional_headers={"Authorization": f"Bearer {TOKEN}"},
        compression=None,
    )


async def http_get(port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    raw = await asyncio.wait_for(reader.read(), PROMPT_S)
    writer.close()
    await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def metrics(served: Served) -> str:
    status, body = await http_get(served.port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    return body.decode()


def refusal_lines(served: Served) -> list[str]:
    return [line for line in served.lines() if line.startswith("refused ")]


def test_refusals_on_workers_are_answered_logged_once_and_counted(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(sock_dir, logs, workers=2, limits=Limits(handshake_timeout=0.3)) as (
            served
        ):
            assert (await refused(served, token=None)).status == 401
            assert (await refused(served, path="/vm2", token=VM1_TOKEN)).status == 403
            assert (await refused(served, path="/no/such/target")).status == 404
            # Decided on the worker itself: a head that never ends.
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            writer.write(b"GET /vm1 HTTP/1.1\r\n")
            answer = await asyncio.wait_for(reader.read(), PROMPT_S)
            writer.close()
            assert answer.startswith(b"HTTP/1.1 408 ")
            assert (await http_get(served.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))[0] == 426
            lines = refusal_lines(served)
            assert len(lines) == 5, lines
            assert [line.split(": ")[1].split()[0] for line in lines] == [
                "401",
                "403",
                "404",
                "408",
                "426",
            ]
            text = await metrics(served)
            for status in ("401", "403", "404", "408", "426"):
                counted = rf'migrelay_refusals_total{{reason="\w+",status="{status}"}} 1\.0'
                assert re.search(counted, text), (status, text)
            assert "migrelay_handshake_seconds_count 5.0" in text
            assert served.server.admission.total == 0
            await helpers.wait_until(
                lambda: all(w.load == 0 for w in served.server._pool.workers),
                PROMPT_S,
                "the workers' load to drop",
            )

    run_async(main())


def test_a_failed_tls_handshake_on_a_worker_is_counted(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture, pki: PKI
) -> None:
    async def main() -> None:
        context = tls.server_context(pki.cert, pki.key)
        async with serving(sock_dir, logs, workers=2, ssl_context=context) as served:
            reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not a TLS hello
            with contextlib.suppress(ConnectionError):
                await asyncio.wait_for(reader.read(), PROMPT_S)
            writer.close()
            await helpers.wait_until(
                lambda: any("TLS handshake with" in line for line in served.lines()),
                PROMPT_S,
                "the TLS failure's log line",
            )
            client = ssl.create_default_context(cafile=str(pki.ca))
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", served.port, ssl=client, server_hostname="127.0.0.1"
            )
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            body = (await asyncio.wait_for(reader.read(), PROMPT_S)).decode()
            writer.close()
            assert 'migrelay_refusals_total{reason="tls_handshake",status="400"} 1.0' in body

    run_async(main())


def test_metrics_count_the_bytes_of_channels_on_workers_while_open_and_after_close(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(sock_dir, logs, workers=2) as served:
            async with (
                foreign_client(served.url("/vm1")) as one,
                foreign_client(served.url("/vm2")) as two,
            ):
                await one.send(b"x" * 100_000)
                await two.send(b"y" * 50_000)
                await helpers.wait_until(
                    lambda: served.sink.received == 150_000, PROMPT_S, "the bytes"
                )
                assert len(loops_of(served.server.channels)) == 2
                text = await metrics(served)
                assert (
                    'migrelay_bytes_total{direction="to_destination",target="vm1"} 100000.0'
                    in text
                )
                assert (
                    'migrelay_bytes_total{direction="to_destination",target="vm2"} 50000.0' in text
                )
                assert "migrelay_channels_open 2.0" in text
            await helpers.wait_until(
                lambda: not served.server.channels, PROMPT_S, "the channels to close"
            )
            text = await metrics(served)
            assert 'migrelay_bytes_total{direction="to_destination",target="vm1"} 100000.0' in text
            assert "migrelay_channels_open 0.0" in text
            assert "migrelay_handshake_seconds_count 2.0" in text
            assert 'migrelay_channels_closed_total{code="1000",target="vm2"} 1.0' in text

    run_async(main())


def test_the_idle_timeout_closes_a_channel_on_a_worker_with_4002(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with serving(sock_dir, logs, workers=2, idle_timeout=0.4) as served:
            async with foreign_client(served.url()) as ws:
                await ws.send(b"some data")
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(ws.recv(), PROMPT_S)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 4002
            await helpers.wait_until(
                lambda: not served.server.channels, PROMPT_S, "the channel to close"
            )
            closing = [line for line in served.lines() if " closed: " in line]
            assert len(closing) == 1 and "idle timeout" in closing[0], served.lines()

    run_async(main())


def test_draining_waits_for_channels_on_workers_then_closes_the_rest_with_4004(
    run_async: Run, sock_dir: Path, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        threads = thread_names()
        async with serving(sock_dir, logs, workers=2) as served:
            async with (
                foreign_client(served.url("/vm1")) as finishing,
                foreign_client(served.url("/vm2")) as lingering,
            ):
                await helpers.wait_until(
                    lambda: len(served.server.channels) == 2, PROMPT_S, "2 channels"
                )
                assert len(loops_of(served.server.channels)) == 2
                started = time.monotonic()
                shutdown = asyncio.ensure_future(served.server.shutdown(0.5))
                await finishing.close()  # this migration ends in time
                await helpers.wait_until(
                    lambda: len(served.server.channels) == 1, PROMPT_S, "1 channel"
                )
                assert not shutdown.done()
                with pytest.raises(ConnectionClosed) as closed:
                    await asyncio.wait_for(lingering.recv(), PROMPT_S)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 4004
                assert time.monotonic() - started >= 0.45
                await asyncio.wait_for(shutdown, PROMPT_S)
            assert not served.server.channels
            assert thread_names() == threads  # the workers stopped with the server

    run_async(main())


# -- the commands ------------------------------------------------------------------------


def threads_of(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def test_serve_and_connect_take_workers_relay_on_them_and_drain_on_sigterm(
    migrelay_procs: MigrelayProcesses, sock_dir: Path
) -> None:
    config = sock_dir / "serve.toml"
    config.write_text("[serve]\nworkers = 3\nshutdown-timeout = 0.5\n", encoding="utf-8")
    dest_path, src_path = sock_dir / "dest.sock", sock_dir / "src.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(dest_path))
        listener.listen(4)
        listener.settimeout(PROMPT_S)
        serve = migrelay_procs.serve("--target", str(dest_path), "--config", str(config), "-v")
        serve.wait_for_log("3 worker threads run the channels")
        connect = migrelay_procs.connect(f"{serve.url}/", src_path, "--workers", "2", "-v")
        connect.wait_for_log("2 worker threads run the channels")
        assert threads_of(connect.pid) == 3
        single = migrelay_procs.connect(
            f"{serve.url}/", sock_dir / "other.sock", "--workers", "1", "-v"
        )
        assert threads_of(single.pid) == 1  # --workers 1: the main loop alone
        assert "worker threads" not in single.log()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as qemu:
            qemu.settimeout(PROMPT_S)
            qemu.connect(str(src_path))
            qemu.sendall(b"guest RAM")
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(PROMPT_S)
                assert conn.recv(64) == b"guest RAM"
                conn.sendall(b"ack")
                assert qemu.recv(64) == b"ack"
                serve.popen.send_signal(signal.SIGTERM)  # the channel outlives the drain
                assert serve.wait() == 0
                with contextlib.suppress(ConnectionResetError):
                    assert qemu.recv(64) == b""  # the source relay closed QEMU's side
        assert "closing 1 channel(s) with 4004" in serve.log()
        connect.wait_for_log(r"channel \w+/0 closed: .*4004", timeout=PROMPT_S)
        assert connect.stop() == 1  # its migration did not end cleanly
        assert single.stop() == 0


def test_the_workers_option_is_refused_below_0(
    migrelay_procs: MigrelayProcesses, sock_dir: Path
) -> None:
    process = migrelay_procs.start(
        "serve", "--target", str(sock_dir / "d.sock"), "--workers", "-1"
    )
    assert process.wait() == 2
    assert "--workers" in process.log()
