"""Faults in the middle of a storage migration (``migrate --copy-storage``, DESIGN.md §8, §9).

::

    source namespace                                   destination namespace
    QEMU src ─unix─▶ migrelay migrate --to ══veth══▶ migrelay serve --qmp-dir ─unix─▶ QEMU vm
      (+ a second QMP monitor for the test)            (+ a second QMP monitor for the test)

Each fault (link cut, ``serve`` killed, destination QEMU killed, Ctrl-C to ``migrate``)
hits either phase of the migration, detected through the source's second monitor
(``migrate`` holds the first for the whole migration):

* the disk phase: a ``migrelay-mirror-*`` job copies, slowly (``--max-bandwidth``
  limits each mirror's speed too: 32 MiB at 4 MiB/s take ~8 s, in bursts of up to
  16 MiB, QEMU's mirror buffer, with pauses in between);
* the RAM phase: ``query-migrate`` says ``active``, the mirrors ``ready`` (64 MiB of
  RAM at 4 MiB/s take ~16 s; the disks are small).

Both relays use a 1 s ping interval and a 2 s ping timeout. After the fault:

* ``migrate`` exits 1 (130 for Ctrl-C) with one ``migrelay: error:`` line;
* the source VM still runs (it was started with ``cont``), ``query-jobs`` and
  ``query-block-jobs`` are empty and no ``migrelay-nbd-*`` node is left;
* a destination QEMU still alive has no export left (once ``serve``, if it lives, has
  seen the session end; a killed ``serve`` leaves them, and the retry's ``serve``
  replaces them). A destination whose incoming RAM migration broke exits on its own
  (QEMU 7.2, status 1);
* a retry, at full speed, after restarting what was killed (and with a fresh destination
  VM where the old one is gone), completes, and the disks and RAM are equal.

Run with ``-s`` to see what each fault did (time to exit, the error line, the
destination's fate).
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from migrelay.control.migration import wait_destination_completed
from migrelay.control.qmp import QMP, MigrationStatus, RunState
from migrelay.control.storage import EXPORT_ID_PREFIX, MIRROR_JOB_PREFIX, NBD_NODE_PREFIX
from migrelay.lab.disks import DiskSpec, compare_images
from migrelay.lab.netns import LinkedNamespaces
from migrelay.lab.vm import DisposableVM, first_difference
from migrelay.units import MIB
from tests.e2e.cli_helpers import Command, NetnsCommand, assert_one_line_error
from tests.helpers import FACTOR
from tests.loops import AsyncRunner
from tests.processes import STOP_TIMEOUT_SECONDS, MigrelayProcess, MigrelayProcesses

pytestmark = pytest.mark.e2e

PORT = 8766
PING_INTERVAL_S = 1.0
PING_TIMEOUT_S = 2.0
LIVENESS_ARGS = ("--ping-interval", str(PING_INTERVAL_S), "--ping-timeout", str(PING_TIMEOUT_S))
#: ``migrate --stall-timeout`` while the fault hits: a stuck copy ends soon.
STALL_TIMEOUT_S = 4.0
#: The rate limit while the fault hits (RAM and each mirror).
SLOW_BANDWIDTH = "4M"
#: The fault is injected once this much has moved (so the phase is under way end to end).
FAULT_AFTER_BYTES = 1 * MIB
#: ``migrate`` exits this soon after the fault: liveness (3 s) or the stall timeout (4 s),
#: a poll interval (1 s), the clean-up, and margin for a busy 2-core host.
EXIT_BOUND_S = 15.0 * FACTOR
#: Seconds a QEMU gets to exit after ``quit`` (or after it was killed).
QUIT_TIMEOUT_S = 30.0 * FACTOR
#: What is left of migrelay's on either side is gone this soon after ``migrate`` exited
#: (the source's: at once, ``migrate`` removes it before it exits; the destination's
#: exports: once ``serve`` has seen the session end, by liveness for a cut link).
CLEANUP_BOUND_S = 6.0 * FACTOR
#: A destination whose incoming RAM migration failed exits this soon (QEMU 7.2 exits).
DEST_EXIT_BOUND_S = 6.0 * FACTOR
PHASE_TIMEOUT_S = 30.0 * FACTOR
MIGRATION_TIMEOUT_S = 90.0 * FACTOR
POLL_S = 0.05


@dataclass(frozen=True)
class Phase:
    """Where the fault hits: the VMs' sizes that make the phase last seconds."""

    name: str
    ram_bytes: int
    disks: tuple[DiskSpec, ...]


#: Two disks of both kinds (raw on a -drive, qcow2 on -blockdev nodes), so that two
#: mirrors and two NBD nodes must go.
DISK_PHASE = Phase(
    "disk",
    16 * MIB,
    (DiskSpec("disk0", 32 * MIB), DiskSpec("disk1", 16 * MIB, format="qcow2", style="blockdev")),
)
RAM_PHASE = Phase(
    "ram",
    64 * MIB,
    (DiskSpec("disk0", 4 * MIB), DiskSpec("disk1", 2 * MIB, format="qcow2", style="blockdev")),
)


@dataclass
class Hosts:
    """Two namespaces, ``serve`` and the VMs in them; everything is cleaned up."""

    ns: LinkedNamespaces
    sock_dir: Path
    procs: MigrelayProcesses
    run: AsyncRunner
    vms: list[DisposableVM] = field(default_factory=list)
    commands: list[NetnsCommand] = field(default_factory=list)

    @property
    def token_file(self) -> Path:
        return self.sock_dir / "token"

    def serve(self) -> MigrelayProcess:
        return self.procs.serve(
            "--target-dir", str(self.sock_dir), "--qmp-dir", str(self.sock_dir),
            "--token-file", str(self.token_file), "--wait-target", "10", *LIVENESS_ARGS,
            listen=f"{self.ns.dest_addr}:{PORT}", prefix=self.ns.prefix(self.ns.dest_ns),
        )  # fmt: skip

    def migrate(self, src: DisposableVM, *args: str) -> NetnsCommand:
        command = NetnsCommand(
            self.sock_dir,
            f"migrate-{len(self.commands)}",
            ("migrate", "--qmp", str(src.qmp_path), "--to", f"ws://{self.ns.dest_addr}:{PORT}/vm",
             "--copy-storage", "--token-file", str(self.token_file), *LIVENESS_ARGS,
             # The guest runs here: kept paused there, both RAM files are final.
             "--keep-paused", *args),
            self.ns.prefix(self.ns.source_ns),
        )  # fmt: skip
        self.commands.append(command)
        return command

    def vm(self, name: str, phase: Phase, *, incoming: bool) -> DisposableVM:
        namespace = self.ns.dest_ns if incoming else self.ns.source_ns
        vm = DisposableVM(
            self.sock_dir,
            name,
            phase.ram_bytes,
            incoming=incoming,
            disks=phase.disks,
            extra_args=("-qmp", f"unix:{monitor_path(self.sock_dir, name)},server=on,wait=off"),
            command_prefix=self.ns.prefix(namespace),
        )
        self.vms.append(vm)
        return vm


def monitor_path(directory: Path, name: str) -> Path:
    """The VM's second QMP monitor (not ``NAME.qmp``: ``serve --qmp-dir`` owns those)."""
    return directory / f"{name}.mon"


@pytest.fixture
def hosts(
    sock_dir: Path, migrelay_procs: MigrelayProcesses, run_e2e: AsyncRunner
) -> Iterator[Hosts]:
    """Linked namespaces with a token file in ``sock_dir``; all torn down afterwards."""
    (sock_dir / "token").write_text("storage-fault-token\n")
    with LinkedNamespaces() as ns:
        hosts = Hosts(ns, sock_dir, migrelay_procs, run_e2e)
        try:
            yield hosts
        finally:
            for command in hosts.commands:
                command.stop()
            migrelay_procs.stop_all()
            for vm in hosts.vms:
                vm.kill()


# -- watching the source --------------------------------------------------------------------


async def wait_for_phase(sq: QMP, phase: Phase, migrate: Command) -> None:
    """Poll the source (second monitor) until ``phase`` is under way end to end."""
    deadline = time.monotonic() + PHASE_TIMEOUT_S
    while True:
        assert migrate.popen.poll() is None, f"migrate ended early: {migrate.describe()}"
        jobs = [job for job in await sq.query_jobs() if job.job_id.startswith(MIRROR_JOB_PREFIX)]
        if phase is DISK_PHASE:
            # Under way: every mirror started, data moved, not all in sync yet (QEMU
            # copies in bursts of up to 16 MiB, then waits out the rate limit).
            if (
                len(jobs) == len(phase.disks)
                and sum(job.current for job in jobs) >= FAULT_AFTER_BYTES
                and any(job.status == "running" for job in jobs)
            ):
                assert (await sq.query_migrate()).status is MigrationStatus.NONE
                return
        else:
            info = await sq.query_migrate()
            if info.status is MigrationStatus.ACTIVE and (info.transferred or 0) >= (
                FAULT_AFTER_BYTES
            ):
                assert [job.status for job in jobs] == ["ready"] * len(phase.disks), jobs
                return
        assert time.monotonic() < deadline, (
            f"{phase.name} phase not under way within {PHASE_TIMEOUT_S:g} s: {migrate.describe()}"
        )
        await asyncio.sleep(POLL_S)


async def wait_source_clean(sq: QMP) -> float:
    """Wait (bounded) until no job and no NBD node of migrelay's is left on the source.

    Returns:
        How long it took.
    """
    started = time.monotonic()
    while True:
        jobs = await sq.query_block_job_ids()
        all_jobs = [job.job_id for job in await sq.query_jobs()]
        nodes = [name for name in await sq.query_node_names() if name.startswith(NBD_NODE_PREFIX)]
        if not jobs and not all_jobs and not nodes:
            return time.monotonic() - started
        assert time.monotonic() - started < CLEANUP_BOUND_S, (
            f"left on the source {CLEANUP_BOUND_S:g} s after migrate exited: block jobs {jobs},"
            f" jobs {all_jobs}, nodes {nodes}"
        )
        await asyncio.sleep(POLL_S)


async def wait_dest_exit(dst: DisposableVM) -> int | None:
    """The destination's exit status if it exits within `DEST_EXIT_BOUND_S`, else None."""
    try:
        return await dst.wait(DEST_EXIT_BOUND_S)
    except TimeoutError:
        return None


async def wait_no_exports(dq: QMP) -> float:
    """Wait (bounded) until the live destination has no export of migrelay's left.

    Returns:
        How long it took.
    """
    started = time.monotonic()
    while True:
        exports = [e for e in await dq.query_export_ids() if e.startswith(EXPORT_ID_PREFIX)]
        if not exports:
            return time.monotonic() - started
        assert time.monotonic() - started < CLEANUP_BOUND_S, (
            f"exports left on the destination {CLEANUP_BOUND_S:g} s after the session"
            f" ended: {exports}"
        )
        await asyncio.sleep(POLL_S)


async def dest_exports_gone(dst: DisposableVM) -> float:
    """`wait_no_exports` through the destination's second monitor."""
    async with QMP(f"{dst.name}-mon") as dq:
        await dq.connect(str(monitor_path(dst.workdir, dst.name)))
        return await wait_no_exports(dq)


async def check_own_disks(sq: QMP, src: DisposableVM, pristine: dict[str, Path]) -> None:
    """The source still runs on its own images, and their contents are untouched."""
    reply = await sq.execute("query-block")
    assert isinstance(reply, list)
    files = {entry["qdev"]: entry["inserted"]["file"] for entry in reply if "inserted" in entry}
    for spec in src.disks:
        assert files.get(spec.qdev_path) == str(src.disk_path(spec)), (spec.id, files)
        difference = await asyncio.to_thread(
            compare_images, src.disk_path(spec), pristine[spec.id]
        )
        assert difference is None, f"source {spec.id} changed: {difference}"


async def export_ids(dst: DisposableVM) -> list[str]:
    async with QMP(f"{dst.name}-mon") as dq:
        await dq.connect(str(monitor_path(dst.workdir, dst.name)))
        return await dq.query_export_ids()


# -- the retry ------------------------------------------------------------------------------


async def migrate_again(hosts: Hosts, src: DisposableVM, sq: QMP, dst: DisposableVM) -> None:
    """Migrate once more at full speed; the destination ends with the same disks and RAM."""
    migrate = hosts.migrate(src)
    returncode = await migrate.wait(MIGRATION_TIMEOUT_S)
    assert returncode == 0, migrate.describe()
    async with QMP(f"{dst.name}-mon") as dq:
        await dq.connect(str(monitor_path(dst.workdir, dst.name)))
        final = await wait_destination_completed(dq, MIGRATION_TIMEOUT_S)
        assert final.status is MigrationStatus.COMPLETED
        await wait_no_exports(dq)  # serve removes them once the session has ended
        await dq.quit()
    assert await sq.query_status() is RunState.POSTMIGRATE
    await sq.quit()
    assert await dst.wait(QUIT_TIMEOUT_S) == 0
    assert await src.wait(QUIT_TIMEOUT_S) == 0
    for spec in src.disks:
        difference = await asyncio.to_thread(
            compare_images, src.disk_path(spec), dst.disk_path(spec)
        )
        assert difference is None, f"{spec.id}: {difference}"
    assert await asyncio.to_thread(first_difference, src.ram_path, dst.ram_path) is None


# -- the scenario ---------------------------------------------------------------------------


FAULTS = ("link-cut", "serve-killed", "dest-qemu-killed", "ctrl-c")
RESULTS: list[str] = []


@dataclass
class Fault:
    """What a fault does, and what it leaves alive."""

    name: str
    inject: Callable[[], None]
    serve_survives: bool = True
    dest_survives: bool = True
    interrupted: bool = False
    #: What the error line must say about the cause (the in-process relay's view), a regex.
    cause: str = ""


def make_fault(
    name: str, hosts: Hosts, serve: MigrelayProcess, dst: DisposableVM, migrate: Command
) -> Fault:
    if name == "link-cut":
        return Fault(name, lambda: hosts.ns.set_link(False), cause=r"\(liveness timeout\)")
    if name == "serve-killed":
        return Fault(
            name,
            lambda: os.kill(serve.pid, signal.SIGKILL),
            serve_survives=False,
            # A reset or a FIN, as the kill lands: either way the WebSocket just ended.
            cause="websocket (closed without a close frame|connection lost)",
        )
    if name == "dest-qemu-killed":

        def kill_dest() -> None:
            assert dst.pid is not None
            os.kill(dst.pid, signal.SIGKILL)

        return Fault(name, kill_dest, dest_survives=False, cause="4000 destination closed")
    assert name == "ctrl-c"
    return Fault(name, migrate.interrupt, interrupted=True)


def run_fault(hosts: Hosts, fault_name: str, phase: Phase) -> str:
    async def scenario() -> str:
        src = hosts.vm("src", phase, incoming=False)
        dst = hosts.vm("vm", phase, incoming=True)
        await src.start()
        await dst.start()
        pristine = {}
        for spec in src.disks:  # nothing writes to them yet: the VM is in prelaunch
            pristine[spec.id] = hosts.sock_dir / f"pristine-{spec.id}"
            await asyncio.to_thread(shutil.copyfile, src.disk_path(spec), pristine[spec.id])
        serve = hosts.serve()
        async with QMP("src-mon") as sq:
            await sq.connect(str(monitor_path(hosts.sock_dir, "src")))
            await sq.execute("cont")
            assert await sq.query_status() is RunState.RUNNING
            migrate = hosts.migrate(
                src, "--max-bandwidth", SLOW_BANDWIDTH, "--stall-timeout", f"{STALL_TIMEOUT_S:g}"
            )
            fault = make_fault(fault_name, hosts, serve, dst, migrate)
            await wait_for_phase(sq, phase, migrate)
            fault_at = time.monotonic()
            fault.inject()
            returncode = await migrate.wait(EXIT_BOUND_S)
            exit_s = time.monotonic() - fault_at
            if fault.interrupted:
                line = assert_one_line_error(migrate, "migration cancelled on interrupt", code=130)
            else:
                # In the disk phase, the line names the disk copy that failed.
                fragment = "disk" if phase is DISK_PHASE else ""
                line = assert_one_line_error(migrate, "migration failed: ", fragment)
                # ... and why, as the relay saw its channel end.
                assert re.search(rf"\(relay: channel \w+/\S+: .*{fault.cause}", line), line

            # The source: running as before, nothing of migrelay's left.
            assert await sq.query_status() is RunState.RUNNING
            source_clean_s = await wait_source_clean(sq)
            assert await sq.query_status() is RunState.RUNNING
            await check_own_disks(sq, src, pristine)
            source_migration = (await sq.query_migrate()).status

            # The destination.
            if not fault.dest_survives:
                await dst.wait(QUIT_TIMEOUT_S)
                dest_fate = "killed"
            else:
                exited = await wait_dest_exit(dst) if phase is RAM_PHASE else None
                if exited is not None:
                    dest_fate = f"exited {exited} on its own"
                elif fault.serve_survives:
                    dest_fate = f"alive, exports gone after {await dest_exports_gone(dst):.2f} s"
                else:
                    dest_fate = f"alive, exports left: {await export_ids(dst)}"

            # Recover and retry.
            if fault_name == "link-cut":
                hosts.ns.set_link(True)
            if not fault.serve_survives:
                serve.popen.wait(STOP_TIMEOUT_SECONDS)
                hosts.serve()
            retry_dst = dst
            if not dst.running:
                retry_dst = hosts.vm("vm", phase, incoming=True)
                await retry_dst.start()
            elif phase is RAM_PHASE:
                # Alive after its incoming RAM migration broke: not to be reused.
                await dst.terminate()
                retry_dst = hosts.vm("vm", phase, incoming=True)
                await retry_dst.start()
            await migrate_again(hosts, src, sq, retry_dst)
        result = (
            f"STORAGE FAULT {fault_name} in the {phase.name} phase: migrate exited {returncode}"
            f" after {exit_s:.2f} s: {line.strip()!r}; source running, clean after"
            f" {source_clean_s:.2f} s, its migration {source_migration}; destination"
            f" {dest_fate}; retry completed, disks and RAM equal"
        )
        RESULTS.append(result)
        print("\n" + result)
        return result

    return hosts.run(scenario())


@pytest.mark.parametrize("phase", [DISK_PHASE, RAM_PHASE], ids=lambda phase: phase.name)
@pytest.mark.parametrize("fault", FAULTS)
def test_a_fault_leaves_the_source_running_and_clean_and_a_retry_completes(
    hosts: Hosts, fault: str, phase: Phase
) -> None:
    run_fault(hosts, fault, phase)
