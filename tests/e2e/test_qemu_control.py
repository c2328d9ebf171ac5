"""The control plane's error paths and VM helpers against real QEMU 7.2 processes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from migrelay.control.migration import (
    MigrationOptions,
    cancel_outgoing,
    follow_migration,
    prepare_incoming,
    start_migration,
)
from migrelay.control.qmp import QMP, MigrationStatus, RunState
from migrelay.errors import MigrationError, StateError, VMError
from migrelay.lab.vm import DisposableVM, first_difference
from migrelay.units import MIB, parse_size
from tests.e2e.vms import VMPairFactory
from tests.loops import AsyncRunner

pytestmark = pytest.mark.e2e


def test_prepare_incoming_on_a_vm_without_incoming_defer_says_what_to_do(
    run_async: AsyncRunner,
    vm_pair: VMPairFactory,
) -> None:
    async def main() -> None:
        async with vm_pair(32 * MIB) as (src, _dst), QMP(src.name) as qmp:
            await qmp.connect(str(src.qmp_path))
            with pytest.raises(StateError, match="-incoming defer") as info:
                await prepare_incoming(qmp, "tcp:127.0.0.1:0", MigrationOptions())
            assert info.value.state is RunState.PRELAUNCH

    run_async(main())


def test_qemu_refusal_text_reaches_the_caller_whole(
    run_async: AsyncRunner, vm_pair: VMPairFactory
) -> None:
    async def main() -> None:
        async with vm_pair(32 * MIB) as (src, _dst), QMP(src.name) as qmp:
            await qmp.connect(str(src.qmp_path))
            with pytest.raises(MigrationError) as info:
                await qmp.set_parameters(multifd_channels=0)
            assert str(info.value) == (
                "Parameter 'multifd_channels' expects a value between 1 and 255"
            )

    run_async(main())


def test_migration_to_a_missing_socket_fails_with_qemus_text(
    run_async: AsyncRunner, vm_pair: VMPairFactory, sock_dir: Path
) -> None:
    target = sock_dir / "nobody.sock"

    async def main() -> None:
        async with vm_pair(32 * MIB) as (src, _dst), QMP(src.name) as qmp:
            await qmp.connect(str(src.qmp_path))
            await start_migration(qmp, f"unix:{target}", MigrationOptions())
            with pytest.raises(MigrationError) as info:
                await follow_migration(qmp, interval=0.1)
            assert str(info.value) == (
                f"Failed to connect to '{target}': No such file or directory"
            )
            assert await qmp.query_status() is RunState.PRELAUNCH

    run_async(main())


def test_cancel_stops_a_slow_migration_and_the_source_keeps_its_state(
    run_async: AsyncRunner,
    vm_pair: VMPairFactory,
) -> None:
    # 1 MiB/s for 32 MiB: the migration is certainly still running when cancelled.
    options = MigrationOptions(max_bandwidth=1 * MIB)

    async def main() -> None:
        async with (
            vm_pair(32 * MIB) as (src, dst),
            QMP(src.name) as src_qmp,
            QMP(dst.name) as dst_qmp,
        ):
            await src_qmp.connect(str(src.qmp_path))
            await dst_qmp.connect(str(dst.qmp_path))
            incoming = await prepare_incoming(dst_qmp, "tcp:127.0.0.1:0", options)
            await start_migration(src_qmp, incoming.socket_addresses[0], options)
            await asyncio.sleep(0.3)
            info = await cancel_outgoing(src_qmp)
            assert info.status is MigrationStatus.CANCELLED
            assert await src_qmp.query_status() is RunState.PRELAUNCH

    run_async(main())


def test_vm_that_qemu_refuses_to_start_reports_qemus_stderr(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    async def main() -> None:
        vm = DisposableVM(sock_dir, "bad", 32 * MIB, extra_args=("-no-such-option",))
        with pytest.raises(VMError, match="-no-such-option") as info:
            await vm.start()
        assert info.value.returncode == 1
        assert not vm.running

    run_async(main())


def test_terminate_reaps_a_running_vm(run_async: AsyncRunner, sock_dir: Path) -> None:
    async def main() -> None:
        vm = DisposableVM(sock_dir, "solo", 32 * MIB)
        await vm.start()
        assert vm.running
        assert vm.ram_path.stat().st_size == 32 * MIB
        assert await vm.terminate() is not None
        assert vm.returncode is not None
        assert await vm.terminate() == vm.returncode  # idempotent

    run_async(main())


def test_first_difference_finds_the_first_differing_byte(sock_dir: Path) -> None:
    a, b = sock_dir / "a", sock_dir / "b"
    a.write_bytes(bytes(10_000))
    b.write_bytes(bytes(10_000))
    assert first_difference(a, b, chunk_size=4096) is None
    b.write_bytes(bytes(5000) + b"\x01" + bytes(4999))
    assert first_difference(a, b, chunk_size=4096) == 5000
    b.write_bytes(bytes(9000))
    assert first_difference(a, b, chunk_size=4096) == 9000


@pytest.mark.parametrize(
    ("text", "size"),
    [("64M", 64 * MIB), ("1G", 1024 * MIB), ("512MiB", 512 * MIB), ("4096", 4096)],
)
def test_parse_size_accepts_binary_suffixes(text: str, size: int) -> None:
    assert parse_size(text) == size
