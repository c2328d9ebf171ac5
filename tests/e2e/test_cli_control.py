"""``incoming``, ``migrate``, ``status`` and ``cancel`` against real QEMU: the error paths.

Each mistake an operator can make (a dead QMP socket, the wrong VM, a VM in the wrong
state) must give one sentence on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from migrelay.units import MIB
from tests.e2e.cli_helpers import Commands, assert_one_line_error, check_migrated
from tests.e2e.vms import VMPairFactory
from tests.loops import AsyncRunner

pytestmark = pytest.mark.e2e

#: These tests migrate nothing: the smallest VMs that QEMU starts quickly.
RAM_BYTES = 32 * MIB


def test_a_dead_qmp_socket_is_one_sentence(
    run_async: AsyncRunner, sock_dir: Path, commands: Commands
) -> None:
    # A socket file that nobody listens on any more: what a crashed QEMU leaves behind.
    dead = sock_dir / "dead.qmp"
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(dead))

    async def main() -> None:
        for args in (
            ("migrate", "--qmp", str(dead), "--socket", str(sock_dir / "s.sock")),
            ("incoming", "--qmp", str(dead)),
            ("status", "--qmp", str(dead)),
            ("cancel", "--qmp", str(dead)),
        ):
            command = await commands.run(*args)
            assert_one_line_error(command, f"cannot connect to qmp socket {dead}")

    run_async(main())


def test_incoming_on_a_vm_not_started_with_incoming_defer_says_so(
    run_async: AsyncRunner, vm_pair: VMPairFactory, commands: Commands
) -> None:
    async def main() -> None:
        async with vm_pair(RAM_BYTES) as (src, _dst):
            command = await commands.run("incoming", "--qmp", str(src.qmp_path))
            assert_one_line_error(
                command, "state is prelaunch, but inmigrate is required", "-incoming defer"
            )

    run_async(main())


def test_migrate_from_a_destination_vm_is_refused_before_anything_changes(
    run_async: AsyncRunner, vm_pair: VMPairFactory, sock_dir: Path, commands: Commands
) -> None:
    async def main() -> None:
        async with vm_pair(RAM_BYTES) as (_src, dst):
            command = await commands.run(
                "migrate", "--qmp", str(dst.qmp_path), "--socket", str(sock_dir / "s.sock")
            )
            assert_one_line_error(command, "state is inmigrate")
            status = await commands.run("status", "--qmp", str(dst.qmp_path), "--json")
            assert status.popen.returncode == 0, status.describe()
            document = json.loads(status.stdout())
            assert document["runstate"] == "inmigrate"
            assert document["status"] == "none"

    run_async(main())


def test_incoming_twice_says_the_vm_already_listens(
    run_async: AsyncRunner, vm_pair: VMPairFactory, sock_dir: Path, commands: Commands
) -> None:
    sock = sock_dir / "d.sock"

    async def main() -> None:
        async with vm_pair(RAM_BYTES) as (_src, dst):
            args = (
                "incoming",
                "--qmp",
                str(dst.qmp_path),
                "--socket",
                str(sock),
                "--multifd",
                "2",
            )
            first = await commands.run(*args)
            assert first.popen.returncode == 0, first.describe()
            assert (
                first.stdout()
                == f"{dst.name}: listening for an incoming migration on unix:{sock}\n"
            )
            second = await commands.run(*args)
            assert_one_line_error(second, f"already listening on unix:{sock}")
            status = await commands.run("status", "--qmp", str(dst.qmp_path), "--json")
            assert json.loads(status.stdout())["listening"] == [f"unix:{sock}"]

    run_async(main())


def test_migration_to_nowhere_exits_1_with_qemus_text(
    run_async: AsyncRunner, vm_pair: VMPairFactory, sock_dir: Path, commands: Commands
) -> None:
    nowhere = sock_dir / "nobody.sock"

    async def main() -> None:
        async with vm_pair(RAM_BYTES) as (src, _dst):
            # --wait-socket 0: no wait for the relay's socket; QEMU says it is missing.
            command = await commands.run(
                "migrate", "--qmp", str(src.qmp_path), "--socket", str(nowhere), "--json",
                "--wait-socket", "0",
            )  # fmt: skip
            qemu_text = f"Failed to connect to '{nowhere}': No such file or directory"
            assert_one_line_error(command, f"migration failed: {qemu_text}")
            document = json.loads(command.stdout())
            assert document["status"] == "failed"
            assert document["error"] == qemu_text
            status = await commands.run("status", "--qmp", str(src.qmp_path))
            assert status.popen.returncode == 1  # the last migration failed
            assert status.stdout() == (
                f"{src.name}: prelaunch, migration failed\n{src.name}: error: {qemu_text}\n"
            )
            # Under --log-format json the same one line is a JSON record, for a
            # service's log pipeline.
            logged = await commands.run(
                "migrate", "--qmp", str(src.qmp_path), "--socket", str(nowhere),
                "--log-format", "json", "--wait-socket", "0",
            )  # fmt: skip
            assert logged.popen.returncode == 1, logged.describe()
            lines = logged.stderr().splitlines()
            assert len(lines) == 1, logged.describe()
            record = json.loads(lines[0])
            assert record["level"] == "error", record
            assert record["message"] == f"migration failed: {qemu_text}", record

    run_async(main())


def test_cancel_without_a_migration_is_harmless(
    run_async: AsyncRunner, vm_pair: VMPairFactory, commands: Commands
) -> None:
    async def main() -> None:
        async with vm_pair(RAM_BYTES) as (src, dst):
            command = await commands.run("cancel", "--qmp", str(src.qmp_path))
            assert command.popen.returncode == 0, command.describe()
            assert command.stdout() == f"{src.name}: no migration to cancel; vm is prelaunch\n"
            refused = await commands.run("cancel", "--qmp", str(dst.qmp_path))
            assert_one_line_error(refused, "state is inmigrate")

    run_async(main())


def test_migrate_no_wait_returns_and_status_watch_follows_to_the_end(
    run_async: AsyncRunner, vm_pair: VMPairFactory, sock_dir: Path, commands: Commands
) -> None:
    sock = sock_dir / "d.sock"

    async def main() -> None:
        async with vm_pair(RAM_BYTES) as (src, dst):
            incoming = await commands.run(
                "incoming", "--qmp", str(dst.qmp_path), "--socket", str(sock)
            )
            assert incoming.popen.returncode == 0, incoming.describe()
            # Direct to QEMU's socket: this test is about the commands, not the relay.
            started = await commands.run(
                "migrate",
                "--qmp",
                str(src.qmp_path),
                "--socket",
                str(sock),
                "--no-wait",
                "--max-bandwidth",
                "16M",
            )
            assert started.popen.returncode == 0, started.describe()
            assert started.stdout() == f"{src.name}: migration to unix:{sock} started\n"
            watch = await commands.run("status", "--qmp", str(src.qmp_path), "--watch")
            assert watch.popen.returncode == 0, watch.describe()
            assert watch.stdout().splitlines()[-1].startswith("completed in ")
            await check_migrated(src, dst)

    run_async(main())


def test_bad_flags_are_refused_before_any_vm_is_touched(
    run_async: AsyncRunner, sock_dir: Path, commands: Commands
) -> None:
    qmp = str(sock_dir / "never.qmp")

    async def main() -> None:
        both = await commands.run("migrate", "--qmp", qmp, "--socket", "s", "--to", "ws://h/")
        assert_one_line_error(both, "--socket and --to exclude each other")
        no_wait = await commands.run("migrate", "--qmp", qmp, "--to", "ws://h/", "--no-wait")
        assert_one_line_error(no_wait, "--no-wait cannot be used with --to")
        bandwidth = await commands.run("migrate", "--qmp", qmp, "--max-bandwidth", "fast")
        assert_one_line_error(bandwidth, "not a size: 'fast'")
        multifd = await commands.run("incoming", "--qmp", qmp, "--multifd", "0")
        assert multifd.popen.returncode == 2  # typer's usage error
        assert "Traceback" not in multifd.stderr()
        # The convergence and compression options (issue: busy guests and slow links).
        for args, message in (
            (("--compress", "zstd"), "compression needs multifd"),
            (("--multifd", "2", "--compress", "lz4"), "compression must be one of zlib, zstd"),
            (("--multifd", "2", "--xbzrle-cache", "64M"), "xbzrle does nothing with multifd"),
            (("--on-timeout", "postcopy"), "--on-timeout postcopy needs --postcopy"),
            (("--on-timeout", "later"), "--on-timeout must be cancel, pause or postcopy"),
            (("--keep-paused",), "--keep-paused needs --to"),
            (("--no-wait", "--timeout", "60"), "--timeout and --on-timeout need the command"),
        ):
            refused = await commands.run("migrate", "--qmp", qmp, *args)
            assert_one_line_error(refused, message)

    run_async(main())
