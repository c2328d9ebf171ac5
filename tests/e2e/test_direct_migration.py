"""Direct QEMU-to-QEMU migrations (no relay) driven by migrelay's control plane.

These are the baseline the relay tests compare against, and the proof that
`migrelay.control` drives both sides correctly: the destination's RAM file must equal the
source's byte for byte once the destination itself reports ``completed``.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from migrelay.control.migration import (
    MigrationOptions,
    MigrationResult,
    Progress,
    follow_migration,
    prepare_incoming,
    start_migration,
    wait_destination_completed,
)
from migrelay.control.qmp import QMP, UNLIMITED_BANDWIDTH, MigrationStatus, RunState
from migrelay.lab.vm import DisposableVM, first_difference
from tests.e2e.vms import VMPairFactory
from tests.helpers import FACTOR
from tests.loops import AsyncRunner

pytestmark = pytest.mark.e2e

#: Generous for 64 MiB (~0.5 s here), so a loaded 2-core host does not make it flaky.
MIGRATION_TIMEOUT_S = 120.0 * FACTOR


async def migrate_direct(
    src: DisposableVM, dst: DisposableVM, listen_uri: str, options: MigrationOptions
) -> tuple[MigrationResult, list[Progress]]:
    """Migrate ``src`` to ``dst`` listening on ``listen_uri``; quit both; check their exit."""
    progress: list[Progress] = []
    async with QMP(src.name) as src_qmp, QMP(dst.name) as dst_qmp:
        await src_qmp.connect(str(src.qmp_path))
        await dst_qmp.connect(str(dst.qmp_path))
        incoming = await prepare_incoming(dst_qmp, listen_uri, options)
        assert incoming.socket_addresses, incoming
        await start_migration(src_qmp, incoming.socket_addresses[0], options)

        params = await src_qmp.query_parameters()
        assert params.max_bandwidth == UNLIMITED_BANDWIDTH
        if options.multifd_channels is not None:
            assert params.multifd_channels == options.multifd_channels
            for qmp in (src_qmp, dst_qmp):
                assert (await qmp.query_capabilities())["multifd"] is True

        async with asyncio.timeout(MIGRATION_TIMEOUT_S):
            result = await follow_migration(src_qmp, progress.append, interval=0.2)
        final = await wait_destination_completed(dst_qmp, MIGRATION_TIMEOUT_S)
        assert final.status is MigrationStatus.COMPLETED
        assert await src_qmp.query_status() is RunState.POSTMIGRATE
        await src_qmp.quit()
        await dst_qmp.quit()
    assert await src.wait(30 * FACTOR) == 0
    assert await dst.wait(30 * FACTOR) == 0
    return result, progress


def check_result(
    src: DisposableVM, dst: DisposableVM, result: MigrationResult, progress: list[Progress]
) -> None:
    assert result.status is MigrationStatus.COMPLETED
    assert result.transferred is not None and result.transferred >= src.ram_size
    assert result.total_time_ms is not None and result.total_time_ms > 0
    assert result.downtime_ms is not None
    assert progress[-1].status is MigrationStatus.COMPLETED
    assert progress[-1].total is not None and progress[-1].total >= src.ram_size
    assert first_difference(src.ram_path, dst.ram_path) is None


def test_direct_migration_over_unix_socket_copies_ram_exactly(
    run_e2e: AsyncRunner, vm_pair: VMPairFactory, sock_dir: Path
) -> None:
    async def main() -> None:
        async with vm_pair() as (src, dst):
            options = MigrationOptions()
            result, progress = await migrate_direct(
                src, dst, f"unix:{sock_dir / 'migration.sock'}", options
            )
            check_result(src, dst, result, progress)

    run_e2e(main())


def test_direct_migration_over_tcp_copies_ram_exactly(
    run_e2e: AsyncRunner, vm_pair: VMPairFactory
) -> None:
    async def main() -> None:
        async with vm_pair() as (src, dst):
            # Port 0: QEMU binds a free port and reports it in socket-address, so there is
            # no window in which another process could take a port picked beforehand.
            result, progress = await migrate_direct(
                src, dst, "tcp:127.0.0.1:0", MigrationOptions()
            )
            check_result(src, dst, result, progress)

    run_e2e(main())


def test_direct_multifd_migration_over_tcp_copies_ram_exactly(
    run_e2e: AsyncRunner, vm_pair: VMPairFactory
) -> None:
    async def main() -> None:
        async with vm_pair() as (src, dst):
            options = MigrationOptions(multifd_channels=4)
            result, progress = await migrate_direct(src, dst, "tcp:127.0.0.1:0", options)
            check_result(src, dst, result, progress)

    run_e2e(main())
