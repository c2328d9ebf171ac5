"""What QEMU 7.2 itself does with two VMs that do not match, in the four-step form.

``incoming`` + ``migrate --socket`` compares nothing (no command sees both QEMUs; only
``serve --qmp-dir`` with ``migrate --to`` checks before a byte moves:
``test_compat.py``), so QEMU's own errors are what the operator gets. The README
quotes them; these tests are where the quotes come from:

* RAM of 64 MiB against 128 MiB: the destination QEMU exits with ``Size mismatch:
  ram0: 0x4000000 != 0x8000000``, and the source reads only ``Unable to write to
  socket: Broken pipe`` (or ``Connection reset by peer``, as the timing falls).
* ``--multifd 2`` on the source only: the destination ignores the extra channels
  ("Extra incoming migration connection; ignoring"), cannot read the main one and
  exits; the source reads "Broken pipe" (or "Connection reset by peer").
* ``--multifd 2`` on the destination only: the destination waits for channels that
  never come (runstate ``inmigrate``, its migration ``none``), and is still waiting
  after the source has given up (here by ``--stall-timeout``: nothing else ends it).
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import pytest

from migrelay.control.qmp import QMP, MigrationStatus, RunState
from migrelay.lab.vm import DisposableVM
from migrelay.units import MIB
from tests.e2e.cli_helpers import (
    MIGRATION_TIMEOUT_S,
    Command,
    Commands,
    assert_one_line_error,
    source_state,
)
from tests.helpers import FACTOR
from tests.loops import AsyncRunner
from tests.processes import MigrelayProcesses

pytestmark = pytest.mark.e2e

SOURCE_RAM_BYTES = 64 * MIB
#: Long enough for the destination to read the stream's head and exit (well under 1 s).
DEST_EXIT_TIMEOUT_S = 30.0 * FACTOR
#: migrate's --stall-timeout where nothing else would end a source that waits for ever.
STALL_TIMEOUT_S = 3
#: What QEMU 7.2's source says when the destination has gone: which of the two depends
#: on whether the destination's end was closed or reset when the source wrote.
SOCKET_ERROR = re.compile(r"Unable to write to socket: (Broken pipe|Connection reset by peer) ")
#: How long after the source gave up the destination is seen still waiting.
STILL_WAITING_S = 2.0


async def four_steps(
    procs: MigrelayProcesses,
    commands: Commands,
    sock_dir: Path,
    src: DisposableVM,
    dst: DisposableVM,
    *,
    incoming_args: tuple[str, ...] = (),
    migrate_args: tuple[str, ...] = (),
) -> Command:
    """serve, connect, incoming, migrate --socket, as the README prints them; return
    ``migrate`` once it has exited."""
    source_sock, dest_sock = sock_dir / "source.sock", sock_dir / "dest.sock"
    serve = procs.serve("--target", str(dest_sock))
    procs.connect(f"{serve.url}/", source_sock)
    incoming = await commands.run(
        "incoming", "--qmp", str(dst.qmp_path), "--socket", str(dest_sock), *incoming_args
    )
    assert incoming.popen.returncode == 0, incoming.describe()
    migrate = commands.migrate(src, "--socket", str(source_sock), *migrate_args)
    await migrate.wait(MIGRATION_TIMEOUT_S)
    return migrate


async def destination_exits(dst: DisposableVM) -> str:
    """Wait (bounded) for the destination QEMU to exit on its own; return its log."""
    status = await dst.wait(DEST_EXIT_TIMEOUT_S)
    log = dst.log_path.read_text(errors="replace")
    assert status != 0, log
    return log


def assert_source_read_only_a_socket_error(migrate: Command) -> None:
    """migrate's one line holds QEMU's only clue: its write failed (the README's quote)."""
    line = assert_one_line_error(migrate, "migration failed: Unable to write to socket: ")
    assert SOCKET_ERROR.search(line), line


async def source_failed(src: DisposableVM) -> None:
    """The source's migration failed and the VM is where it was (paused, ``-S``)."""
    runstate, info = await source_state(src)
    assert info.status is MigrationStatus.FAILED, info
    assert runstate is RunState.PRELAUNCH, runstate


def test_ram_size_mismatch_destination_exits_with_size_mismatch_source_reads_broken_pipe(
    run_e2e: AsyncRunner, sock_dir: Path, migrelay_procs: MigrelayProcesses, commands: Commands
) -> None:
    src = DisposableVM(sock_dir, "src", SOURCE_RAM_BYTES)
    dst = DisposableVM(sock_dir, "dst", 2 * SOURCE_RAM_BYTES, incoming=True)

    async def main() -> None:
        async with src, dst:
            migrate = await four_steps(migrelay_procs, commands, sock_dir, src, dst)
            log = await destination_exits(dst)
            # The README's quote: 64 MiB in the stream, 128 MiB here.
            assert "Size mismatch: ram0: 0x4000000 != 0x8000000" in log, log
            assert_source_read_only_a_socket_error(migrate)
            await source_failed(src)

    run_e2e(main())


def test_multifd_on_the_source_only_destination_exits_on_the_extra_channels(
    run_e2e: AsyncRunner, sock_dir: Path, migrelay_procs: MigrelayProcesses, commands: Commands
) -> None:
    src = DisposableVM(sock_dir, "src", SOURCE_RAM_BYTES)
    dst = DisposableVM(sock_dir, "dst", SOURCE_RAM_BYTES, incoming=True)

    async def main() -> None:
        async with src, dst:
            migrate = await four_steps(
                migrelay_procs, commands, sock_dir, src, dst, migrate_args=("--multifd", "2")
            )
            log = await destination_exits(dst)
            assert log.count("Extra incoming migration connection; ignoring") == 2, log
            assert "load of migration failed" in log, log
            assert_source_read_only_a_socket_error(migrate)
            await source_failed(src)

    run_e2e(main())


def test_multifd_on_the_destination_only_destination_waits_for_channels_that_never_come(
    run_e2e: AsyncRunner, sock_dir: Path, migrelay_procs: MigrelayProcesses, commands: Commands
) -> None:
    src = DisposableVM(sock_dir, "src", SOURCE_RAM_BYTES)
    dst = DisposableVM(sock_dir, "dst", SOURCE_RAM_BYTES, incoming=True)

    async def main() -> None:
        async with src, dst:
            started = time.monotonic()
            migrate = await four_steps(
                migrelay_procs,
                commands,
                sock_dir,
                src,
                dst,
                incoming_args=("--multifd", "2"),
                migrate_args=("--stall-timeout", str(STALL_TIMEOUT_S)),
            )
            # Only the stall timeout ended the source: the destination read no RAM.
            assert time.monotonic() - started >= STALL_TIMEOUT_S
            # The warning as the stall timeout shuts the stream down, then the error line.
            assert migrate.popen.returncode == 1, migrate.describe()
            last = migrate.stderr().splitlines()[-1]
            assert last.startswith(
                f"migrelay: error: migration failed: no data moved for {STALL_TIMEOUT_S} s"
            ), migrate.describe()
            await source_failed(src)
            # The source has given up; the destination still waits, a while later too.
            await asyncio.sleep(STILL_WAITING_S)
            assert dst.running, dst.log_path.read_text(errors="replace")
            async with QMP("dst") as qmp:
                await qmp.connect(str(dst.qmp_path))
                assert await qmp.query_status() is RunState.INMIGRATE
                assert (await qmp.query_migrate()).status is MigrationStatus.NONE
            # Cleaning up is the operator's: the block's exit terminates both QEMUs.

    run_e2e(main())
