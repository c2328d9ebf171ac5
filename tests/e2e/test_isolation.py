"""One session failing, or a hostile client, never disturbs another migration on ``serve``.

Two slow migrations (64 MiB at 8 MiB/s, about 8 s each) run at the same time through
one ``migrelay serve --target-dir``:

* the destination QEMU of migration A is killed (SIGKILL) while both carry data: A
  fails (its source reaches ``failed`` and stays where it was, RAM untouched), B
  completes with RAM identical, and ``serve`` stays up, logs one closing line for A's
  channel naming the cause, and takes A again right after;
* during migration B, hostile clients try ``serve``: bytes that are not HTTP, a stalled
  request head, B's own session id on a channel already taken and on another target,
  and a WebSocket of its own whose first frame breaks RFC 6455 (unmasked). Each gets its
  own refusal or close code, and B goes on and completes with RAM identical.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import re
import secrets
import signal
import time
from pathlib import Path

import pytest

from migrelay.control.qmp import MigrationStatus, RunState
from migrelay.core.events import CloseReceived, FrameEvent, Payload
from migrelay.core.frames import FrameParser, Opcode, encode_close, encode_frame
from migrelay.lab.vm import DisposableVM
from migrelay.units import MIB
from tests.e2e.cli_helpers import (
    QUICK_TIMEOUT_S,
    SLOW_BANDWIDTH,
    Command,
    Commands,
    check_migrated,
    migrate_slowly,
    serve_qmp_dir,
    source_state,
)
from tests.e2e.vms import DEFAULT_RAM_BYTES, VMPairFactory
from tests.helpers import FACTOR, wait_until
from tests.loops import AsyncRunner
from tests.processes import MigrelayProcess, MigrelayProcesses

pytestmark = pytest.mark.e2e

#: The longest a refusal or a close may take to arrive (they are immediate).
ANSWER_TIMEOUT_S = 10.0 * FACTOR
#: serve's --handshake-timeout here: the stalled client is refused with 408 after it.
HANDSHAKE_TIMEOUT_S = 1.0
#: Both migrations have sent this much (of 64 MiB) when A's destination is killed.
MIDWAY_BYTES = 4 * MIB
MASK = b"\x1f\x2e\x3d\x4c"
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _session_of(serve: MigrelayProcess, target: str) -> str:
    """The session id serve gave the channel it opened to ``target``."""
    match = serve.wait_for_log(rf"channel (\S+)/0 opened: .*\(target {re.escape(target)}\)")
    return match.group(1)


def _closed_lines(serve: MigrelayProcess, session: str) -> list[str]:
    prefix = f"channel {session}/"
    return [
        line.split(" INFO ", 1)[-1]
        for line in serve.log().splitlines()
        if prefix in line and " closed: " in line
    ]


_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


async def _sent_at_least(migrate: Command, nbytes: int) -> None:
    """Wait until ``migrate``'s progress lines show ``nbytes`` sent (it must still run)."""
    deadline = time.monotonic() + QUICK_TIMEOUT_S
    while True:
        sent = [
            float(number) * _UNITS[unit]
            for number, unit in re.findall(
                r"(?m)^active .*?transferred ([0-9.]+) (B|KiB|MiB|GiB)", migrate.stdout()
            )
        ]
        if sent and sent[-1] >= nbytes:
            return
        assert migrate.popen.poll() is None, f"ended before {nbytes} B: {migrate.describe()}"
        assert time.monotonic() < deadline, f"not {nbytes} B sent: {migrate.describe()}"
        await asyncio.sleep(0.05)


# -- a raw client for serve ----------------------------------------------------------------


async def _read_to_eof(reader: asyncio.StreamReader) -> bytes:
    data = bytearray()
    async with asyncio.timeout(ANSWER_TIMEOUT_S):
        with contextlib.suppress(ConnectionResetError):
            while chunk := await reader.read(65536):
                data += chunk
    return bytes(data)


async def _exchange(serve: MigrelayProcess, request: bytes) -> bytes:
    """Send ``request`` (b"" sends nothing) and return everything serve answers."""
    assert serve.port is not None
    reader, writer = await asyncio.open_connection("127.0.0.1", serve.port)
    try:
        if request:
            writer.write(request)
            await writer.drain()
        return await _read_to_eof(reader)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def _upgrade(path: str, key: bytes, extra: dict[str, str] | None = None) -> bytes:
    lines = [
        f"GET {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key.decode()}",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: migrelay.v1",
        *(f"{name}: {value}" for name, value in (extra or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _status(response: bytes) -> int:
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    assert match, response[:200]
    return int(match.group(1))


async def _protocol_violation(serve: MigrelayProcess, target: str) -> list[FrameEvent]:
    """Open a WebSocket to ``/target``, send an unmasked frame, return serve's frames."""
    assert serve.port is not None
    key = base64.b64encode(secrets.token_bytes(16))
    reader, writer = await asyncio.open_connection("127.0.0.1", serve.port)
    try:
        writer.write(_upgrade(f"/{target}", key))
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101 "), head
        accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
        assert accept in head, head
        # RFC 6455 §5.1: a client MUST mask what it sends; this frame is not masked.
        writer.write(bytes(encode_frame(Opcode.BINARY, b"not masked", None)))
        await writer.drain()
        events: list[FrameEvent] = []
        parser = FrameParser(expect_masked=False)
        async with asyncio.timeout(ANSWER_TIMEOUT_S):
            while not any(isinstance(event, CloseReceived) for event in events):
                chunk = await reader.read(65536)
                assert chunk, f"closed without a Close frame: {events!r}"
                events += parser.receive(memoryview(bytearray(chunk)))
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            writer.write(bytes(encode_close(1000, "", MASK)))
        await _read_to_eof(reader)
        return events
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def _healthz(serve: MigrelayProcess) -> bytes:
    return await _exchange(serve, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")


# -- the tests ------------------------------------------------------------------------------


def test_destination_qemu_killed_in_one_session_fails_it_alone_and_the_other_completes(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    async def main() -> None:
        async with (
            vm_pair(DEFAULT_RAM_BYTES, name="a") as (src_a, dst_a),
            vm_pair(DEFAULT_RAM_BYTES, name="b") as (src_b, dst_b),
        ):
            ram_a = _sha256(src_a.ram_path)
            serve = serve_qmp_dir(migrelay_procs, sock_dir)
            migrations = {
                name: migrate_slowly(commands, serve, src, dst)
                for name, src, dst in (("a", src_a, dst_a), ("b", src_b, dst_b))
            }
            session_a = await asyncio.to_thread(_session_of, serve, dst_a.name)
            session_b = await asyncio.to_thread(_session_of, serve, dst_b.name)
            assert session_a != session_b
            for migrate in migrations.values():
                await _sent_at_least(migrate, MIDWAY_BYTES)

            assert dst_a.pid is not None
            os.kill(dst_a.pid, signal.SIGKILL)
            migrate_a, migrate_b = migrations["a"], migrations["b"]
            assert await migrate_a.wait() == 1, migrate_a.describe()
            # A failed while B was still under way: B outlived the failure, not raced it.
            assert migrate_b.popen.poll() is None, migrate_b.describe()
            assert not _closed_lines(serve, session_b), serve.log()

            stderr = migrate_a.stderr()
            assert "Traceback" not in stderr
            runstate, info = await source_state(src_a)
            assert info.status is MigrationStatus.FAILED
            assert info.error_desc
            # QEMU's text, and what the in-process relay saw end the channel, if it
            # ended before QEMU did ("peer closed with 4000 destination closed").
            assert re.fullmatch(
                rf"migrelay: error: migration failed: {re.escape(info.error_desc)}"
                r"( \(relay: channel \w+/0: .+\))?\n",
                stderr,
            ), stderr
            assert runstate is RunState.PRELAUNCH
            assert _sha256(src_a.ram_path) == ram_a

            assert await migrate_b.wait() == 0, migrate_b.describe()
            assert migrate_b.stderr() == ""
            await check_migrated(src_b, dst_b)

            # serve: up, one line for A's channel with the cause, B's closed cleanly.
            assert serve.popen.poll() is None, serve.log()
            await asyncio.to_thread(
                serve.wait_for_log, rf"channel {session_b}/0 closed: ", ANSWER_TIMEOUT_S
            )
            lines_a = _closed_lines(serve, session_a)
            assert len(lines_a) == 1, lines_a
            assert re.match(
                rf"channel {session_a}/0 closed: unix side closed\b.*; close code 4000"
                " destination closed$",
                lines_a[0],
            ), lines_a[0]
            lines_b = _closed_lines(serve, session_b)
            assert len(lines_b) == 1 and "closed: ended by the " in lines_b[0], lines_b
            assert "Traceback" not in serve.log()
            assert (await _healthz(serve)).endswith(b"\r\n\r\nok\n")

            # A's source is usable again, through the same serve.
            again = DisposableVM(sock_dir, "a-again", DEFAULT_RAM_BYTES, incoming=True)
            async with again:
                retry = commands.migrate(src_a, "--to", f"{serve.url}/{again.name}")
                assert await retry.wait() == 0, retry.describe()
                await check_migrated(src_a, again)

    run_e2e(main())


def test_hostile_clients_during_a_migration_are_refused_and_it_completes_intact(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    source_sock = sock_dir / "source.sock"
    # A target of the hostile client's own: a unix peer that records what reaches it.
    received: list[bytes] = []

    async def sink(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionResetError):
            received.append(await reader.read())
        writer.close()

    async def main() -> None:
        junk = await asyncio.start_unix_server(sink, str(sock_dir / "junk.sock"))
        async with junk, vm_pair(DEFAULT_RAM_BYTES, name="b") as (src, dst):
            # The original four commands this time: serve has no migrate-incoming hook,
            # so a hostile client can reach a target socket of its own.
            serve = migrelay_procs.serve(
                "--target-dir",
                str(sock_dir),
                "--handshake-timeout",
                str(HANDSHAKE_TIMEOUT_S),
            )
            migrelay_procs.connect(f"{serve.url}/{dst.name}", source_sock)
            incoming = await commands.run(
                "incoming",
                "--qmp",
                str(dst.qmp_path),
                "--socket",
                str(sock_dir / f"{dst.name}.sock"),
            )
            assert incoming.popen.returncode == 0, incoming.describe()
            migrate = commands.migrate(
                src,
                "--socket",
                str(source_sock),
                "--max-bandwidth",
                SLOW_BANDWIDTH,
            )
            session = await asyncio.to_thread(_session_of, serve, dst.name)
            await _sent_at_least(migrate, 1)

            # Bytes that are not HTTP at all.
            garbage = bytes(range(256)) * 4 + b"\r\n\r\n"
            assert _status(await _exchange(serve, garbage)) == 400
            # A head that never ends (held open): refused after --handshake-timeout.
            stalled = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            assert _status(await _exchange(serve, stalled)) == 408
            # B's session id, learnt somehow: its channel 0 again, and on another target.
            hijack = {"Migrelay-Session": session, "Migrelay-Channel": "0"}
            key = base64.b64encode(secrets.token_bytes(16))
            repeated = await _exchange(serve, _upgrade(f"/{dst.name}", key, hijack))
            assert _status(repeated) == 409, repeated
            assert repeated.endswith(f"channel 0 of session {session} repeated\n".encode())
            elsewhere = await _exchange(serve, _upgrade("/junk", key, hijack))
            assert _status(elsewhere) == 409, elsewhere
            assert b"belongs to another target" in elsewhere
            # A WebSocket of its own whose first frame breaks the protocol.
            events = await _protocol_violation(serve, "junk")
            closes = [event for event in events if isinstance(event, CloseReceived)]
            assert [close.code for close in closes] == [1002], events
            assert not any(isinstance(event, Payload) for event in events)
            line = await asyncio.to_thread(
                serve.wait_for_log,
                r"channel anon-[0-9a-f]{16}/0 closed: peer broke the protocol: [^\n]*",
                ANSWER_TIMEOUT_S,
            )
            assert "close code 1002 protocol error" in line.group(0), line.group(0)
            # Its target was connected and then closed, and got none of its bytes.
            await wait_until(lambda: bool(received), ANSWER_TIMEOUT_S, "the sink's EOF")
            assert received == [b""]

            # All of that happened while B was under way, and B did not notice.
            assert migrate.popen.poll() is None, migrate.describe()
            assert not _closed_lines(serve, session), serve.log()
            assert await migrate.wait() == 0, migrate.describe()
            assert migrate.stderr() == ""
            await check_migrated(src, dst)
            await asyncio.to_thread(
                serve.wait_for_log, rf"channel {session}/0 closed: ", ANSWER_TIMEOUT_S
            )
            lines = _closed_lines(serve, session)
            assert len(lines) == 1 and "closed: ended by the " in lines[0], lines
            log = serve.log()
            assert serve.popen.poll() is None, log
            assert "Traceback" not in log
            for status in (400, 408, 409):
                assert re.search(rf"refused \S+ from \S+: {status} ", log), log
            assert (await _healthz(serve)).endswith(b"\r\n\r\nok\n")

    run_e2e(main())
