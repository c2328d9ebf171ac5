"""A running guest that keeps dirtying its RAM, migrated through the relays.

The guest is `migrelay.lab.guest`'s boot sector with its defaults (no download, no
toolchain): it enables A20, switches to 32-bit protected mode with a flat GDT, and then
loops forever writing its pass counter into every 4 KiB page from 1 MiB to 5 MiB (1024
pages per pass, as fast as TCG goes), and the counter itself at guest-physical 0x500.
Precopy therefore has to send those pages again and again until the dirty set fits the
downtime: more than the RAM's size is sent.

The source runs (``cont``); the destination starts paused (``-S -incoming defer``) and
stays paused, and the source is ``postmigrate`` after completion, so both RAM files are
final and must be equal byte for byte.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from migrelay.control.migration import (
    MigrationOptions,
    follow_migration,
    prepare_incoming,
    start_migration,
    wait_destination_completed,
)
from migrelay.control.qmp import QMP, MigrationStatus, RunState
from migrelay.lab.guest import BOOT_CODE, FLOPPY_BYTES, floppy_args, floppy_image, guest_counter
from migrelay.lab.vm import DisposableVM, first_difference
from migrelay.units import MIB
from tests.helpers import FACTOR
from tests.loops import AsyncRunner
from tests.processes import MigrelayProcesses

pytestmark = pytest.mark.e2e

RAM_BYTES = 64 * MIB
MIGRATION_TIMEOUT_S = 120.0 * FACTOR
#: A quarter of what the guest writes on each of its passes (1024 pages, 1 to 5 MiB):
#: far above what a VM that writes nothing sends beyond its RAM size (~130 KiB here).
RESENT_AT_LEAST_BYTES = 1 * MIB


def test_boot_sector_builds_a_bootable_floppy(sock_dir: Path) -> None:
    image = floppy_image(sock_dir / "guest.img")
    data = image.read_bytes()
    assert len(data) == FLOPPY_BYTES
    assert data[510:512] == b"\x55\xaa"
    assert data[: len(BOOT_CODE)] == BOOT_CODE and len(BOOT_CODE) <= 510


def test_running_guest_dirtying_ram_migrates_through_relays_with_identical_ram(
    run_e2e: AsyncRunner, migrelay_procs: MigrelayProcesses, sock_dir: Path
) -> None:
    server = migrelay_procs.serve("--target", str(sock_dir / "dest.sock"))
    migrelay_procs.connect(f"{server.url}/", sock_dir / "source.sock")
    image = floppy_image(sock_dir / "guest.img")
    drive = floppy_args(image)
    src = DisposableVM(sock_dir, "guest-src", RAM_BYTES, extra_args=drive)
    dst = DisposableVM(sock_dir, "guest-dst", RAM_BYTES, incoming=True, extra_args=drive)
    options = MigrationOptions()

    async def scenario() -> None:
        async with src, dst, QMP("src") as sq, QMP("dst") as dq:
            await sq.connect(str(src.qmp_path))
            await dq.connect(str(dst.qmp_path))
            await sq.execute("cont")
            # The guest runs: its counter (random bytes until the guest's first pass)
            # climbs from 1. Booting through the BIOS under TCG takes a moment.
            deadline = time.monotonic() + 30 * FACTOR
            first = 0
            while not 3 <= (first := guest_counter(src.ram_path)) < 1 << 20:
                assert time.monotonic() < deadline, "the guest did not start its loop"
                await asyncio.sleep(0.05)
            while guest_counter(src.ram_path) <= first:
                assert time.monotonic() < deadline, "the guest's counter stopped"
                await asyncio.sleep(0.01)
            assert await sq.query_status() is RunState.RUNNING
            await prepare_incoming(dq, f"unix:{sock_dir / 'dest.sock'}", options)
            await start_migration(sq, f"unix:{sock_dir / 'source.sock'}", options)
            result = await follow_migration(sq, interval=0.2)
            final = await wait_destination_completed(dq, MIGRATION_TIMEOUT_S)
            assert final.status is MigrationStatus.COMPLETED
            # Both stopped: the source after completion, the destination by -S.
            assert await sq.query_status() is RunState.POSTMIGRATE
            assert await dq.query_status() is RunState.PAUSED
            # Even a paused VM ends after 3 dirty syncs, so the pass count proves little;
            # pages sent again do. A VM that writes nothing sends its RAM (ram.total) and
            # page headers, 0.2 % more; this guest, slowed by TCG, rewrites a few hundred
            # of its 1024 pages between two syncs.
            resent = (result.transferred or 0) - (result.info.total or RAM_BYTES)
            assert resent >= RESENT_AT_LEAST_BYTES, result.info
            counter = guest_counter(dst.ram_path)
            assert counter == guest_counter(src.ram_path) > first
            assert first_difference(src.ram_path, dst.ram_path) is None
            print(
                f"\nRUNNING GUEST: {result.passes} dirty syncs, {resent / MIB:.1f} MiB re-sent, "
                f"{(result.transferred or 0) / MIB:.1f} MiB sent for {RAM_BYTES / MIB:.0f} MiB"
                f" of RAM, downtime {result.downtime_ms} ms; guest pass counter {counter}"
            )
            await sq.quit()
            await dq.quit()

    run_e2e(scenario())
