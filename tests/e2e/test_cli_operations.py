"""Operating a migration with the ``migrelay`` commands, each its own process, real QEMU.

What an operator does besides starting a migration: ``cancel`` it from another
terminal, Ctrl-C a ``migrate`` whose source VM really runs (``cont``, not the test VMs'
``prelaunch``), use the single-VM form of the server (``serve --target PATH --qmp
QMP`` on ``/``, no ``incoming`` step), and point ``migrate --to`` at a destination VM
that is not ready (the server's ``migrate-incoming`` hook refuses with 409 and leaves
both VMs as they were). Every completed migration is checked byte for byte once the
destination itself says ``completed`` (`check_migrated`).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from pathlib import Path

import pytest

from migrelay.control.qmp import QMP, MigrationStatus, RunState
from migrelay.lab.vm import DisposableVM
from migrelay.units import MIB
from tests.e2e.cli_helpers import (
    SLOW_BANDWIDTH,
    Commands,
    assert_one_line_error,
    check_migrated,
    migrate_under_way,
    serve_qmp_dir,
    source_state,
    summary_line,
)
from tests.e2e.vms import DEFAULT_RAM_BYTES, VMPairFactory
from tests.loops import AsyncRunner
from tests.processes import MigrelayProcess, MigrelayProcesses

pytestmark = pytest.mark.e2e

#: The refusal tests move almost nothing: the smallest VMs that QEMU starts quickly.
SMALL_RAM_BYTES = 32 * MIB


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def _start_guest(vm: DisposableVM) -> None:
    """``cont`` a test VM (started with ``-S``): its firmware then runs for real."""
    async with QMP(vm.name) as qmp:
        await qmp.connect(str(vm.qmp_path))
        assert await qmp.query_status() is RunState.PRELAUNCH
        await qmp.execute("cont")
        assert await qmp.query_status() is RunState.RUNNING


async def _migrate_again(
    commands: Commands, serve: MigrelayProcess, sock_dir: Path, src: DisposableVM, name: str
) -> None:
    """Migrate ``src`` once more, to a fresh destination VM, and check its RAM.

    ``--keep-paused``: a guest that ran on the source would resume on the destination
    and change its RAM before the comparison.
    """
    again = DisposableVM(sock_dir, name, src.ram_size, incoming=True)
    async with again:
        second = commands.migrate(src, "--to", f"{serve.url}/{again.name}", "--keep-paused")
        assert await second.wait() == 0, second.describe()
        await check_migrated(src, again)


# -- cancel from another terminal --------------------------------------------------------


def test_cancel_stops_a_migration_started_with_no_wait_and_the_vm_migrates_again(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    source_sock = sock_dir / "source.sock"

    async def main() -> None:
        async with vm_pair(DEFAULT_RAM_BYTES) as (src, dst):
            ram_before = _sha256(src.ram_path)
            serve = serve_qmp_dir(migrelay_procs, sock_dir)
            # Plain connect announces nothing: serve prepares the defaults, as migrate has.
            migrelay_procs.connect(f"{serve.url}/{dst.name}", source_sock)
            started = await commands.run(
                "migrate",
                "--qmp",
                str(src.qmp_path),
                "--socket",
                str(source_sock),
                "--no-wait",
                "--max-bandwidth",
                SLOW_BANDWIDTH,
            )
            assert started.popen.returncode == 0, started.describe()
            await asyncio.to_thread(serve.wait_for_log, rf"channel \S+/0 opened: .*{dst.name}")
            while True:  # under way end to end, and far from done
                _runstate, info = await source_state(src)
                assert info.status in (MigrationStatus.SETUP, MigrationStatus.ACTIVE), info
                if (info.transferred or 0) >= 4 * MIB:
                    break
                await asyncio.sleep(0.05)

            cancel = await commands.run("cancel", "--qmp", str(src.qmp_path))
            assert cancel.popen.returncode == 0, cancel.describe()
            assert cancel.stdout() == f"{src.name}: migration cancelled; vm is prelaunch\n"
            assert cancel.stderr() == ""
            runstate, info = await source_state(src)
            assert runstate is RunState.PRELAUNCH
            assert info.status is MigrationStatus.CANCELLED
            assert (info.transferred or 0) < DEFAULT_RAM_BYTES  # it really stopped midway
            status = await commands.run("status", "--qmp", str(src.qmp_path))
            assert status.popen.returncode == 0, status.describe()
            assert status.stdout().startswith(f"{src.name}: prelaunch, migration cancelled")
            # Nothing of the VM itself changed.
            assert _sha256(src.ram_path) == ram_before
            # serve closed the cancelled migration's channel, in one line.
            await asyncio.to_thread(serve.wait_for_log, r"channel \S+/0 closed: ")
            assert serve.log().count(" closed: ") == 1, serve.log()

            await _migrate_again(commands, serve, sock_dir, src, "again")

    run_e2e(main())


def test_cancel_from_another_terminal_stops_a_waiting_migrate_and_the_vm_migrates_again(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    async def main() -> None:
        async with vm_pair(DEFAULT_RAM_BYTES) as (src, dst):
            serve = serve_qmp_dir(migrelay_procs, sock_dir)
            migrate = await migrate_under_way(commands, serve, src, dst)
            # migrate lets go of the monitor between its polls: status gets through.
            status = await commands.run("status", "--qmp", str(src.qmp_path), "--json")
            assert status.popen.returncode == 0, status.describe()
            assert json.loads(status.stdout())["status"] == "active"
            cancel = await commands.run("cancel", "--qmp", str(src.qmp_path))
            assert cancel.popen.returncode == 0, cancel.describe()
            assert cancel.stdout() == f"{src.name}: migration cancelled; vm is prelaunch\n"
            assert await migrate.wait() == 1, migrate.describe()
            stderr = migrate.stderr()
            assert stderr.startswith("migrelay: error: ") and stderr.count("\n") == 1, stderr
            assert stderr == (
                "migrelay: error: migration cancelled by another qmp client (migrelay cancel?);"
                " the source vm was left as it was\n"
            )
            runstate, info = await source_state(src)
            assert runstate is RunState.PRELAUNCH
            assert info.status is MigrationStatus.CANCELLED
            await _migrate_again(commands, serve, sock_dir, src, "again")

    run_e2e(main())


# -- Ctrl-C with a running guest ---------------------------------------------------------


def test_ctrl_c_leaves_a_running_source_running_and_it_then_migrates_again(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    async def main() -> None:
        async with vm_pair(DEFAULT_RAM_BYTES) as (src, dst):
            await _start_guest(src)
            serve = serve_qmp_dir(migrelay_procs, sock_dir)
            migrate = await migrate_under_way(commands, serve, src, dst)
            migrate.interrupt()
            assert await migrate.wait() == 130, migrate.describe()
            assert migrate.stderr() == (
                "migrelay: error: migration cancelled on interrupt;"
                " the source vm was left as it was\n"
            )
            assert summary_line(migrate.stdout()).startswith("cancelled in ")
            runstate, info = await source_state(src)
            assert info.status is MigrationStatus.CANCELLED
            # Not stopped, not paused: the guest goes on where it was.
            assert runstate is RunState.RUNNING
            # The running guest migrates again (check_migrated: source postmigrate).
            await _migrate_again(commands, serve, sock_dir, src, "again")

    run_e2e(main())


# -- serve --target --qmp: the single-VM form ----------------------------------------------


def test_serve_target_and_qmp_on_slash_prepare_the_destination_without_incoming(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    dest_sock = sock_dir / "dest.sock"

    async def main() -> None:
        async with vm_pair(DEFAULT_RAM_BYTES) as (src, dst):
            # A short --wait-target: without the hook nobody would make dst listen, and
            # the migration would fail after it instead of completing.
            serve = migrelay_procs.serve(
                "--target", str(dest_sock), "--qmp", str(dst.qmp_path), "--wait-target", "10"
            )
            migrate = commands.migrate(src, "--to", f"{serve.url}/")
            assert await migrate.wait() == 0, migrate.describe()
            assert migrate.stderr() == ""
            assert summary_line(migrate.stdout()).startswith("completed in ")
            log = serve.log()
            assert f"{dst.name}: listening for an incoming migration on unix:{dest_sock}" in log
            assert re.search(
                rf"channel \S+/0 opened: .* -> {re.escape(str(dest_sock))} \(target /\)", log
            ), log
            await check_migrated(src, dst)

    run_e2e(main())


# -- a destination that is not ready ---------------------------------------------------------


@pytest.mark.parametrize(
    "wrong",
    ["not-started-with-incoming-defer", "already-listening-elsewhere"],
)
def test_a_destination_vm_not_ready_is_refused_in_one_line_and_nothing_changes(
    run_e2e: AsyncRunner,
    wrong: str,
    vm_pair: VMPairFactory,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    elsewhere = sock_dir / "elsewhere.sock"
    if wrong == "not-started-with-incoming-defer":
        # A normal VM (-S, no -incoming): what a destination started by mistake looks like.
        bad = DisposableVM(sock_dir, "plain", SMALL_RAM_BYTES)
        why = (
            "state is prelaunch, but inmigrate is required: start the destination qemu"
            " with -incoming defer"
        )
    else:
        # Already prepared for another migration (an operator's `incoming` elsewhere).
        bad = DisposableVM(sock_dir, "busy", SMALL_RAM_BYTES, incoming=True)
        why = f"state is inmigrate, already listening on unix:{elsewhere}"

    async def main() -> None:
        async with vm_pair(SMALL_RAM_BYTES) as (src, dst), bad:
            if wrong == "already-listening-elsewhere":
                incoming = await commands.run(
                    "incoming", "--qmp", str(bad.qmp_path), "--socket", str(elsewhere)
                )
                assert incoming.popen.returncode == 0, incoming.describe()
            ram_before = _sha256(src.ram_path)
            serve = serve_qmp_dir(migrelay_procs, sock_dir)
            url = f"{serve.url}/{bad.name}"
            refused = commands.migrate(src, "--to", url)
            await refused.wait()
            stderr = assert_one_line_error(refused)
            # The client gets a fixed reason; what QEMU's state was (paths included) is
            # for serve's log only.
            assert stderr.startswith(
                f"migrelay: error: cannot open websocket to {url}: server refused the upgrade"
                " with 409: destination vm not ready: it is not waiting for this migration"
                " (start it with -incoming defer, and prepare it once)"
            ), stderr
            assert why not in stderr and str(sock_dir) not in stderr.split("(qemu:")[0], stderr
            assert re.search(
                rf"refused /{bad.name} from \S+: 409 destination vm not ready: .*"
                rf"\({re.escape(why)}",
                serve.log(),
            ), serve.log()

            # The source: where it was, RAM untouched; only its last migration failed.
            runstate, info = await source_state(src)
            assert runstate is RunState.PRELAUNCH
            assert info.status is MigrationStatus.FAILED
            assert _sha256(src.ram_path) == ram_before
            # The wrong destination: exactly as it was, the hook changed nothing there.
            async with QMP(bad.name) as qmp:
                await qmp.connect(str(bad.qmp_path))
                bad_info = await qmp.query_migrate()
                if wrong == "not-started-with-incoming-defer":
                    assert await qmp.query_status() is RunState.PRELAUNCH
                    assert bad_info.status is MigrationStatus.NONE
                else:
                    assert await qmp.query_status() is RunState.INMIGRATE
                    assert bad_info.socket_addresses == (f"unix:{elsewhere}",)
                    assert not (sock_dir / f"{bad.name}.sock").exists()

            # The same source then migrates to a destination that is ready.
            migrate = commands.migrate(src, "--to", f"{serve.url}/{dst.name}")
            assert await migrate.wait() == 0, migrate.describe()
            await check_migrated(src, dst)

    run_e2e(main())
