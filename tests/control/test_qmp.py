"""`migrelay.control.qmp` against a fake QMP server on a real unix socket."""

from __future__ import annotations

import asyncio
import socket
import warnings
from pathlib import Path

import pytest

from migrelay.control.qmp import QMP, MigrationInfo, MigrationStatus, RunState
from migrelay.errors import ConnectError, MigrationError
from tests.control.fake_qmp import HANG, HANGUP, FakeQMP, QMPFail, serve
from tests.helpers import FACTOR
from tests.loops import AsyncRunner

#: Seconds a connect gets to reach a socket that is there, or appears.
CONNECT_S = 5.0 * FACTOR
#: The connect timeout of a socket that never appears (the test waits it out).
ABSENT_S = 0.1 * FACTOR
QEMU_TEXT = "Failed to connect to '/nowhere/x.sock': No such file or directory"


def test_connect_to_missing_socket_says_so_in_one_sentence(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    path = sock_dir / "absent.qmp"

    async def main() -> None:
        async with QMP("dst") as qmp:
            with pytest.raises(ConnectError) as info:
                await qmp.connect(str(path), timeout_s=ABSENT_S)
        assert str(info.value) == (
            f"qmp socket {path} of dst did not appear within {ABSENT_S:g} s"
        )

    run_async(main())


def test_connect_to_dead_socket_names_the_socket_and_the_cause(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    path = sock_dir / "dead.qmp"
    # A socket file nobody listens on: what a crashed QEMU leaves behind.
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))

    async def main() -> None:
        async with QMP("src") as qmp:
            with pytest.raises(ConnectError) as info:
                await qmp.connect(str(path), timeout_s=CONNECT_S)
        assert str(info.value) == (
            f"cannot connect to qmp socket {path} of src: [Errno 111] Connection refused"
        )
        assert isinstance(info.value.exc, ConnectionRefusedError)

    run_async(main())


def test_a_socket_that_is_not_qmp_is_named_in_one_line(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    # The wrong path: something listens there, but it is not a QEMU monitor.
    path = sock_dir / "not-qmp.sock"

    async def banner(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"SSH-2.0-OpenSSH_9.2\r\n")
        await writer.drain()
        await reader.read()  # until the client gives up
        writer.close()

    async def main() -> None:
        server = await asyncio.start_unix_server(banner, str(path))
        async with server, QMP("src") as qmp:
            # qemu.qmp puts the raw bytes into its message with str(), which `python -bb`
            # (how the suite runs) turns into an error of its own; that is not ours.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", BytesWarning)
                with pytest.raises(ConnectError) as info:
                    await qmp.connect(str(path), timeout_s=CONNECT_S)
                message = str(info.value)
            assert "\n" not in message
            assert message.startswith(f"cannot connect to qmp socket {path} of src: ")
            assert "Did not understand Greeting" in message and "SSH-2.0" in message

    run_async(main())


def test_connect_retries_a_socket_bound_but_not_yet_listening(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    # QEMU binds its QMP socket (the file appears) before it calls listen(): a client
    # that connects in between is refused, which is no reason to give up.
    path = sock_dir / "starting.qmp"
    fake = FakeQMP(replies={"query-status": {"status": "running", "running": True}})
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))

    async def main() -> None:
        done = asyncio.Event()

        async def listen_late() -> None:
            await asyncio.sleep(0.3)
            sock.listen()
            server = await asyncio.start_unix_server(fake.handle, sock=sock)
            async with server:
                await done.wait()  # until the client is done, however long it took

        listener = asyncio.create_task(listen_late())
        try:
            async with QMP("src") as qmp:
                await qmp.connect(str(path), timeout_s=CONNECT_S)
                assert await qmp.query_status() is RunState.RUNNING
        finally:
            done.set()
        await listener

    run_async(main())


def test_connect_waits_for_the_socket_to_appear(run_async: AsyncRunner, sock_dir: Path) -> None:
    fake = FakeQMP(replies={"query-status": {"status": "running", "running": True}})

    async def main() -> None:
        done = asyncio.Event()

        async def late_server() -> None:
            await asyncio.sleep(0.2)
            async with serve(fake, sock_dir / "late.qmp"):
                await done.wait()  # until the client is done, however long it took

        server = asyncio.create_task(late_server())
        try:
            async with QMP("src") as qmp:
                await qmp.connect(str(sock_dir / "late.qmp"), timeout_s=CONNECT_S)
                assert await qmp.query_status() is RunState.RUNNING
        finally:
            done.set()
        await server

    run_async(main())


def test_qemu_error_text_is_passed_through_whole(run_async: AsyncRunner, sock_dir: Path) -> None:
    fake = FakeQMP(replies={"migrate": QMPFail(QEMU_TEXT)})

    async def main() -> None:
        async with serve(fake, sock_dir / "q.qmp") as path, QMP("src") as qmp:
            await qmp.connect(path)
            with pytest.raises(MigrationError) as info:
                await qmp.migrate("unix:/nowhere/x.sock")
        assert str(info.value) == QEMU_TEXT
        assert info.value.command == "migrate"
        assert info.value.error_class == "GenericError"
        assert fake.received == [("migrate", {"uri": "unix:/nowhere/x.sock"})]

    run_async(main())


def test_lost_connection_during_a_command_is_a_connect_error(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    fake = FakeQMP(replies={"query-migrate": HANGUP})

    async def main() -> None:
        async with serve(fake, sock_dir / "q.qmp") as path, QMP("src") as qmp:
            await qmp.connect(path)
            with pytest.raises(ConnectError, match=r"^qmp connection to src was lost during"):
                await qmp.query_migrate()

    run_async(main())


def test_cancelling_a_command_raises_cancelled_error_unwrapped(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    fake = FakeQMP(replies={"query-migrate": HANG})

    async def main() -> None:
        async with serve(fake, sock_dir / "q.qmp") as path, QMP("src") as qmp:
            await qmp.connect(path)
            task = asyncio.create_task(qmp.query_migrate())
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    run_async(main())


def test_quit_tolerates_qemu_closing_before_its_reply(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    fake = FakeQMP(replies={"quit": HANGUP})

    async def main() -> None:
        async with serve(fake, sock_dir / "q.qmp") as path:
            qmp = QMP("src")
            await qmp.connect(path)
            await qmp.quit()
            await qmp.close()  # idempotent
        assert fake.commands == ["quit"]

    run_async(main())


def test_set_parameters_sends_only_what_is_given(run_async: AsyncRunner, sock_dir: Path) -> None:
    fake = FakeQMP()

    async def main() -> None:
        async with serve(fake, sock_dir / "q.qmp") as path, QMP("src") as qmp:
            await qmp.connect(path)
            await qmp.set_parameters()
            await qmp.set_parameters(max_bandwidth=10, downtime_limit_ms=50)
        assert fake.received == [
            ("migrate-set-parameters", {"max-bandwidth": 10, "downtime-limit": 50})
        ]

    run_async(main())


def test_migration_events_are_heard_when_they_come_with_the_reply(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    fake = FakeQMP(events={"migrate": [{"status": "setup"}, {"status": "active"}]})

    async def main() -> None:
        async with serve(fake, sock_dir / "q.qmp") as path, QMP("src") as qmp:
            await qmp.connect(path)
            await qmp.migrate("tcp:127.0.0.1:1")
            assert await qmp.next_migration_event(1) is MigrationStatus.SETUP
            assert await qmp.next_migration_event(1) is MigrationStatus.ACTIVE
            assert await qmp.next_migration_event(0.05) is None

    run_async(main())


def test_migration_info_parses_query_migrate() -> None:
    info = MigrationInfo.from_reply(
        {
            "status": "active",
            "expected-downtime": 300,
            "setup-time": 1,
            "total-time": 353,
            "ram": {
                "total": 67641344,
                "remaining": 1000,
                "transferred": 67441867,
                "mbps": 8.0,
                "dirty-pages-rate": 12,
                "dirty-sync-count": 3,
                "page-size": 4096,
            },
        }
    )
    assert info.status is MigrationStatus.ACTIVE
    assert (info.total, info.remaining, info.transferred) == (67641344, 1000, 67441867)
    assert info.rate_bytes_per_s == 1_000_000.0  # 8 megabits/s, decimal
    assert (info.dirty_pages_rate, info.dirty_sync_count, info.page_size) == (12, 3, 4096)
    assert (info.expected_downtime_ms, info.setup_time_ms, info.total_time_ms) == (300, 1, 353)
    assert info.downtime_ms is None


def test_migration_info_without_status_is_none_and_lists_listen_addresses() -> None:
    info = MigrationInfo.from_reply(
        {
            "socket-address": [
                {"port": "44395", "ipv4": True, "host": "127.0.0.1", "type": "inet"},
                {"port": "5", "host": "::1", "type": "inet"},
                {"path": "/tmp/m.sock", "type": "unix"},
            ]
        }
    )
    assert info.status is MigrationStatus.NONE
    assert info.socket_addresses == ("tcp:127.0.0.1:44395", "tcp:[::1]:5", "unix:/tmp/m.sock")


def test_unknown_status_from_a_newer_qemu_does_not_crash() -> None:
    info = MigrationInfo.from_reply({"status": "postcopy-recover-setup"})
    assert info.status is MigrationStatus.UNKNOWN
    assert info.raw["status"] == "postcopy-recover-setup"
