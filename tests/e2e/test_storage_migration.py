"""Storage migration end to end (DESIGN.md §9): disks and RAM through the tunnel.

Real QEMU on both sides, the real commands in subprocesses. Each happy path ends with
the destination's RAM equal to the source's byte for byte and each copied disk equal to
the source's (``qemu-img compare``, once both QEMUs have exited); each refusal with the
source running on its own disks, nothing of migrelay's left on either side (no block
job, no NBD node, no export) and the destination's disks untouched.

The configurations between them: ``-drive`` and ``-blockdev`` disks, raw and qcow2,
virtio and ide, two writable disks of different sizes in each VM, and a CD-ROM that is
left alone (not exported, not copied, the migration succeeds with it).

Writes while a disk is mirrored: ``migrate --copy-storage`` holds the source's monitor
for the whole migration, so the test writes through a second monitor of the source
(``-qmp`` twice) with HMP ``qemu-io``. ``--max-bandwidth 8M`` also limits each mirror's
background copy, so the disk phase lasts a few seconds, and RAM (32 MiB) about four:
the writes land while the copies run and again once RAM migrates, and the test checks
the state before (the mirror still running; RAM ``active``) and after (still
``active``: the mirrors are only ended at switchover), never a duration.
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
from pathlib import Path

import pytest

from migrelay.aio.local import storage_socket
from migrelay.control.qmp import QMP, MigrationStatus, RunState
from migrelay.control.storage import EXPORT_ID_PREFIX, MIRROR_JOB_PREFIX, NBD_NODE_PREFIX
from migrelay.lab.disks import DiskSpec, compare_images
from migrelay.lab.vm import DisposableVM
from migrelay.units import MIB
from tests.e2e.cli_helpers import (
    MIGRATION_TIMEOUT_S,
    SLOW_BANDWIDTH,
    Command,
    Commands,
    assert_one_line_error,
    check_migrated,
    serve_qmp_dir,
    summary_line,
)
from tests.e2e.storage_helpers import (
    WRITE_BYTES,
    Write,
    check_writes_arrived,
    check_written,
    compare_disks,
    leftovers,
    poll,
    second_monitor,
    still_empty,
    storage_channels,
    wait_clean,
    write,
)
from tests.loops import AsyncRunner
from tests.pki import make_pki
from tests.processes import MigrelayProcesses

pytestmark = pytest.mark.e2e

RAM_BYTES = 32 * MIB

#: Mixed styles: a -drive raw virtio disk, a -blockdev qcow2 ide disk, a -drive CD-ROM.
#: Both larger than the 16 MiB a QEMU 7.2 mirror copies at once before its speed limit
#: applies, so that each disk's copy runs a while under ``--max-bandwidth``.
MIXED_DISKS = (
    DiskSpec("disk0", 24 * MIB),
    DiskSpec("disk1", 32 * MIB, format="qcow2", style="blockdev", bus="ide"),
    DiskSpec("cd0", 1 * MIB, bus="ide", cdrom=True),
)
#: -drive only: qcow2 on virtio, raw on ide, a CD-ROM.
DRIVE_DISKS = (
    DiskSpec("disk0", 8 * MIB, format="qcow2"),
    DiskSpec("disk1", 12 * MIB, bus="ide"),
    DiskSpec("cd0", 1 * MIB, bus="ide", cdrom=True),
)
#: -blockdev only: raw and qcow2 on virtio, a CD-ROM.
BLOCKDEV_DISKS = (
    DiskSpec("disk0", 8 * MIB, style="blockdev"),
    DiskSpec("disk1", 12 * MIB, format="qcow2", style="blockdev"),
    DiskSpec("cd0", 1 * MIB, style="blockdev", bus="ide", cdrom=True),
)
#: The refusals' source, and a destination disk1 of another size.
REFUSAL_DISKS = (
    DiskSpec("disk0", 8 * MIB),
    DiskSpec("disk1", 16 * MIB, format="qcow2", style="blockdev"),
)
SMALLER_DISK1 = DiskSpec("disk1", 12 * MIB, format="qcow2", style="blockdev")
SOURCE_DISK1_SIZE = "16.0 MiB (16777216 bytes)"
SMALLER_DISK1_SIZE = "12.0 MiB (12582912 bytes)"


def _writable(disks: tuple[DiskSpec, ...]) -> tuple[DiskSpec, ...]:
    return tuple(spec for spec in disks if not spec.read_only)


def _cdrom(disks: tuple[DiskSpec, ...]) -> DiskSpec:
    return next(spec for spec in disks if spec.cdrom)


def _exports(disks: tuple[DiskSpec, ...]) -> list[str]:
    return sorted(EXPORT_ID_PREFIX + spec.id for spec in disks)


async def _keep_copy(vm: DisposableVM, spec: DiskSpec) -> Path:
    """A copy of one of ``vm``'s images as it is now."""
    path = vm.disk_path(spec)
    copy = path.with_name(f"before-{path.name}")
    await asyncio.to_thread(shutil.copyfile, path, copy)
    return copy


def _disks_document(command: Command) -> dict[str, dict[str, object]]:
    """``migrate --json``'s ``disks``, by disk id."""
    document = json.loads(command.stdout())
    assert document["status"] == "completed", document
    return {entry["disk"]: entry for entry in document["disks"]}


def _check_copied_in_full(
    disks: dict[str, dict[str, object]], specs: tuple[DiskSpec, ...]
) -> None:
    assert sorted(disks) == sorted(spec.id for spec in specs), disks
    for spec in specs:
        entry = disks[spec.id]
        copied, total = entry["copied_bytes"], entry["total_bytes"]
        assert isinstance(copied, int) and isinstance(total, int), entry
        assert copied >= total >= spec.size, entry


async def _check_disks_equal(
    src: DisposableVM, dst: DisposableVM, disks: tuple[DiskSpec, ...], dst_cdrom: Path
) -> None:
    """After both QEMUs exited: the writable disks are equal, the CD-ROMs untouched."""
    assert await compare_disks(src, dst, _writable(disks)) == {
        spec.id: None for spec in _writable(disks)
    }
    cdrom = _cdrom(disks)
    assert await asyncio.to_thread(compare_images, dst.disk_path(cdrom), dst_cdrom) is None
    # Each side has a random CD-ROM of its own: it was not copied.
    assert await asyncio.to_thread(compare_images, src.disk_path(cdrom), dst.disk_path(cdrom))


# -- happy paths ---------------------------------------------------------------------------


async def _write_during_disk_phase(
    io: QMP, migrate: Command, rng: random.Random, used: dict[str, set[int]]
) -> list[Write]:
    """Once both mirrors run, write to each disk where the copy has been and has not."""
    writable = _writable(MIXED_DISKS)
    mirrors = {MIRROR_JOB_PREFIX + spec.id for spec in writable}
    jobs = await poll(
        io.query_jobs,
        lambda jobs: {job.job_id for job in jobs if job.status == "running"} == mirrors,
        "mirror jobs running",
        MIGRATION_TIMEOUT_S,
        while_running=migrate,
    )
    assert {job.job_id for job in jobs} == mirrors, jobs  # nothing for the CD-ROM
    nodes = sorted(name for name in await io.query_node_names() if name.startswith("migrelay"))
    assert nodes == [f"{NBD_NODE_PREFIX}0", f"{NBD_NODE_PREFIX}1"]
    writes = []
    for spec in writable:
        # Still copying this disk: the writes land while its mirror runs.
        job = {job.job_id: job for job in await io.query_jobs()}[MIRROR_JOB_PREFIX + spec.id]
        assert job.status == "running" and job.current < job.total, job
        slots = spec.size // WRITE_BYTES
        for low, high in ((0, slots // 4), (3 * slots // 4, slots)):
            slot = rng.randrange(low, high)
            used[spec.id].add(slot)
            pattern = rng.randrange(1, 256)
            writes.append(await write(io, spec, slot * WRITE_BYTES, pattern, "disk phase"))
    return writes


async def _write_during_ram_phase(
    io: QMP, migrate: Command, rng: random.Random, used: dict[str, set[int]]
) -> list[Write]:
    """Once RAM migrates (the mirrors ready and following), write to each disk again."""
    info = await poll(
        io.query_migrate,
        lambda info: info.status is MigrationStatus.ACTIVE or info.status.is_terminal,
        "ram phase",
        MIGRATION_TIMEOUT_S,
        while_running=migrate,
    )
    assert info.status is MigrationStatus.ACTIVE, info
    # RAM starts only once every disk is in sync (libvirt's order).
    assert {job.job_id: job.status for job in await io.query_jobs()} == {
        MIRROR_JOB_PREFIX + spec.id: "ready" for spec in _writable(MIXED_DISKS)
    }
    writes = []
    for spec in _writable(MIXED_DISKS):
        slot = rng.choice([n for n in range(spec.size // WRITE_BYTES) if n not in used[spec.id]])
        used[spec.id].add(slot)
        pattern = rng.randrange(1, 256)
        writes.append(await write(io, spec, slot * WRITE_BYTES, pattern, "ram phase"))
    # Still before the switchover, where the mirrors end: the writes were mirrored.
    after = await io.query_migrate()
    assert after.status is MigrationStatus.ACTIVE, after
    return writes


@pytest.mark.parametrize("scheme", ["ws", "wss"])
def test_disks_written_while_mirrored_arrive_whole_with_the_ram(
    scheme: str,
    run_e2e: AsyncRunner,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    tls: tuple[str, ...] = ()
    trust: tuple[str, ...] = ()
    if scheme == "wss":
        pki = make_pki(sock_dir / "pki")
        tls = ("--tls-cert", str(pki.cert), "--tls-key", str(pki.key))
        trust = ("--ca", str(pki.ca))
    serve = serve_qmp_dir(migrelay_procs, sock_dir, *tls)
    url = f"{scheme}://localhost:{serve.port}/dst"
    io_path = sock_dir / "src-io.qmp"
    seed = random.randrange(1 << 32)
    print(f"random seed of the writes: {seed}")
    rng = random.Random(seed)
    writable = _writable(MIXED_DISKS)

    async def main() -> None:
        src = DisposableVM(
            sock_dir, "src", RAM_BYTES, disks=MIXED_DISKS, extra_args=second_monitor(io_path)
        )
        dst = DisposableVM(sock_dir, "dst", RAM_BYTES, disks=MIXED_DISKS, incoming=True)
        async with src, dst:
            dst_cdrom = await _keep_copy(dst, _cdrom(MIXED_DISKS))
            async with QMP("src-io") as io:
                await io.connect(str(io_path))
                await io.execute("cont")  # a live guest (the BIOS finds nothing to boot)
                assert await io.query_status() is RunState.RUNNING
                migrate = commands.migrate(
                    src,
                    # Kept paused (the guest ran here and would resume there): both
                    # RAM files must be final to be compared.
                    *("--to", url, *trust, "--copy-storage", "--json", "--keep-paused"),
                    *("--max-bandwidth", SLOW_BANDWIDTH),
                )
                used: dict[str, set[int]] = {spec.id: set() for spec in writable}
                writes = await _write_during_disk_phase(io, migrate, rng, used)
                # Only the writable disks are exported; serve has released the monitor.
                assert (await leftovers(dst)).exports == _exports(writable)
                writes += await _write_during_ram_phase(io, migrate, rng, used)
                assert await migrate.wait() == 0, migrate.describe()
            assert migrate.stderr() == ""
            _check_copied_in_full(_disks_document(migrate), writable)
            # Each disk crossed the tunnel as a storage channel of the session.
            assert sorted(storage_channels(serve.log())) == ["storage-0", "storage-1"]
            # serve removes the exports once the session has ended.
            assert (await wait_clean(dst)).runstate is RunState.PAUSED
            source = await leftovers(src)
            assert source.clean, source
            assert source.runstate is RunState.POSTMIGRATE
            await check_migrated(src, dst)
        check_written(src.log_path.read_text(errors="replace"), writes)
        await check_writes_arrived(dst, writes)
        await _check_disks_equal(src, dst, MIXED_DISKS, dst_cdrom)

    run_e2e(main())


def test_four_commands_copy_drive_style_disks_and_incoming_removes_its_exports(
    run_e2e: AsyncRunner,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    source_sock, dest_sock = sock_dir / "source.sock", sock_dir / "dest.sock"
    serve = migrelay_procs.serve("--target", str(dest_sock))
    migrelay_procs.connect(f"{serve.url}/", source_sock)
    # connect listens for source QEMU's NBD connections beside its migration socket.
    assert storage_socket(source_sock).is_socket()
    writable = _writable(DRIVE_DISKS)

    async def main() -> None:
        src = DisposableVM(sock_dir, "src", RAM_BYTES, disks=DRIVE_DISKS)
        dst = DisposableVM(sock_dir, "dst", RAM_BYTES, disks=DRIVE_DISKS, incoming=True)
        async with src, dst:
            dst_cdrom = await _keep_copy(dst, _cdrom(DRIVE_DISKS))
            incoming = commands.start(
                *("incoming", "--qmp", str(dst.qmp_path), "--socket", str(dest_sock)),
                "--copy-storage",
            )
            await incoming.wait_for_stdout(
                f"dst: exporting its disks on {storage_socket(dest_sock)} until the migration ends"
            )
            assert (await leftovers(dst)).exports == _exports(writable)
            migrate = commands.migrate(src, "--socket", str(source_sock), "--copy-storage")
            assert await migrate.wait() == 0, migrate.describe()
            assert summary_line(migrate.stdout()).endswith(
                "; disks: disk0 8.0 MiB, disk1 12.0 MiB copied; source stopped (postmigrate)"
            ), migrate.describe()
            # incoming stays until the migration has ended, then removes the exports.
            assert await incoming.wait() == 0, incoming.describe()
            assert incoming.stdout().endswith(
                "dst: migration completed; disk exports removed\n"
            ), incoming.describe()
            assert (await leftovers(dst)).clean
            assert sorted(storage_channels(serve.log())) == ["storage-0", "storage-1"]
            source = await leftovers(src)
            assert source.clean, source
            await check_migrated(src, dst)
        await _check_disks_equal(src, dst, DRIVE_DISKS, dst_cdrom)

    run_e2e(main())


def test_migrate_disks_copies_only_the_disks_named(
    run_e2e: AsyncRunner,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    serve = serve_qmp_dir(migrelay_procs, sock_dir)
    disk0, disk1, _ = BLOCKDEV_DISKS

    async def main() -> None:
        src = DisposableVM(sock_dir, "src", RAM_BYTES, disks=BLOCKDEV_DISKS)
        dst = DisposableVM(sock_dir, "dst", RAM_BYTES, disks=BLOCKDEV_DISKS, incoming=True)
        async with src, dst:
            migrate = commands.migrate(
                src,
                *("--to", f"{serve.url}/{dst.name}", "--json"),
                *("--copy-storage", "--migrate-disks", "disk1"),
            )
            assert await migrate.wait() == 0, migrate.describe()
            _check_copied_in_full(_disks_document(migrate), (disk1,))
            assert storage_channels(serve.log()) == ["storage-0"]
            await wait_clean(dst)
            source = await leftovers(src)
            assert source.clean, source
            await check_migrated(src, dst)
        assert await compare_disks(src, dst, (disk0, disk1)) == {
            "disk0": "Content mismatch at offset 0!",
            "disk1": None,
        }
        assert await still_empty(dst, disk0) is None

    run_e2e(main())


# -- refusals before a byte moves ------------------------------------------------------------


async def _check_nothing_moved(
    src: DisposableVM, dst: DisposableVM, dst_disks: tuple[DiskSpec, ...]
) -> None:
    """The source runs on, both sides are clean, the destination's disks still empty."""
    source = await leftovers(src)
    assert source.clean, source
    assert source.runstate is RunState.RUNNING
    destination = await leftovers(dst)
    assert destination.clean, destination
    for spec in dst_disks:
        assert await still_empty(dst, spec) is None, spec


@pytest.mark.parametrize(
    ("dst_disks", "reason"),
    [
        (
            (REFUSAL_DISKS[0], SMALLER_DISK1),
            f"disk disk1: {SMALLER_DISK1_SIZE} on the destination, {SOURCE_DISK1_SIZE} on the"
            " source",
        ),
        (
            REFUSAL_DISKS[:1],
            f"disk disk1: the destination vm has no such disk (the source's is"
            f" {SOURCE_DISK1_SIZE})",
        ),
    ],
    ids=["other-size", "missing"],
)
def test_serve_refuses_a_destination_whose_disks_do_not_match(
    dst_disks: tuple[DiskSpec, ...],
    reason: str,
    run_e2e: AsyncRunner,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    serve = serve_qmp_dir(migrelay_procs, sock_dir)
    url = f"{serve.url}/dst"

    async def main() -> None:
        src = DisposableVM(sock_dir, "src", RAM_BYTES, disks=REFUSAL_DISKS)
        dst = DisposableVM(sock_dir, "dst", RAM_BYTES, disks=dst_disks, incoming=True)
        async with src, dst:
            async with QMP("src") as qmp:
                await qmp.connect(str(src.qmp_path))
                await qmp.execute("cont")
            migrate = commands.migrate(src, "--to", url, "--copy-storage")
            await migrate.wait()
            stderr = assert_one_line_error(migrate)
            assert stderr.startswith(
                f"migrelay: error: cannot open websocket to {url}: server refused the upgrade"
                f" with 409: destination vm not ready: {reason}"
            ), stderr
            await _check_nothing_moved(src, dst, dst_disks)
            async with QMP("dst") as qmp:
                await qmp.connect(str(dst.qmp_path))
                # Refused before the destination was prepared: it still waits.
                assert (await qmp.query_migrate()).status is MigrationStatus.NONE
                assert await qmp.query_status() is RunState.INMIGRATE

    run_e2e(main())


def test_four_commands_source_refuses_a_destination_disk_of_another_size(
    run_e2e: AsyncRunner,
    sock_dir: Path,
    migrelay_procs: MigrelayProcesses,
    commands: Commands,
) -> None:
    # incoming --copy-storage exports every writable disk without knowing the source's:
    # the source compares the sizes of the NBD exports with its disks before copying.
    source_sock, dest_sock = sock_dir / "source.sock", sock_dir / "dest.sock"
    serve = migrelay_procs.serve("--target", str(dest_sock))
    migrelay_procs.connect(f"{serve.url}/", source_sock)
    dst_disks = (REFUSAL_DISKS[0], SMALLER_DISK1)

    async def main() -> None:
        src = DisposableVM(sock_dir, "src", RAM_BYTES, disks=REFUSAL_DISKS)
        dst = DisposableVM(sock_dir, "dst", RAM_BYTES, disks=dst_disks, incoming=True)
        async with src, dst:
            async with QMP("src") as qmp:
                await qmp.connect(str(src.qmp_path))
                await qmp.execute("cont")
            incoming = commands.start(
                *("incoming", "--qmp", str(dst.qmp_path), "--socket", str(dest_sock)),
                "--copy-storage",
            )
            await incoming.wait_for_stdout("until the migration ends")
            migrate = commands.migrate(src, "--socket", str(source_sock), "--copy-storage")
            await migrate.wait()
            assert_one_line_error(
                migrate,
                f"disk disk1: {SOURCE_DISK1_SIZE} on the source, {SMALLER_DISK1_SIZE} on the"
                " destination",
            )
            source = await leftovers(src)
            assert source.clean, source
            assert source.runstate is RunState.RUNNING
            for spec in dst_disks:
                assert await still_empty(dst, spec) is None, spec
            # incoming waits for a migration that never began, its exports up, until
            # told to stop; then it removes them.
            assert incoming.popen.poll() is None, incoming.describe()
            assert (await leftovers(dst)).exports == _exports(dst_disks)
            incoming.interrupt()
            assert await incoming.wait() == 130, incoming.describe()
            assert "disk exports removed" in incoming.stdout(), incoming.describe()
            await _check_nothing_moved(src, dst, dst_disks)

    run_e2e(main())
