"""Test VMs with disks (`migrelay.lab.disks`, `DisposableVM(disks=…)`) against real QEMU 7.2
and qemu-img: what QEMU sees, what the images hold, and writing to a disk through HMP."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from migrelay.control.qmp import QMP
from migrelay.errors import VMError
from migrelay.lab.disks import (
    DiskSpec,
    compare_images,
    create_empty_image,
    qemu_args,
    qemu_io_command,
)
from migrelay.lab.vm import DisposableVM
from migrelay.units import MIB
from tests.loops import AsyncRunner

pytestmark = pytest.mark.e2e

RAM_BYTES = 16 * MIB

#: One of each kind: drive/raw/virtio, blockdev/qcow2/ide, blockdev/raw/virtio of another
#: size, a drive-style CD-ROM.
FOUR_DISKS = (
    DiskSpec("disk0", 2 * MIB),
    DiskSpec("disk1", 4 * MIB, format="qcow2", style="blockdev", bus="ide"),
    DiskSpec("disk2", 3 * MIB, style="blockdev"),
    DiskSpec("cd0", 1 * MIB, bus="ide", cdrom=True),
)


def _block_by_qdev(reply: object) -> dict[str, Mapping[str, Any]]:
    assert isinstance(reply, list)
    return {entry["qdev"]: entry for entry in reply}


async def _empty_like(path: Path, spec: DiskSpec) -> Path:
    empty = path.with_name(f"empty-{path.name}")
    await asyncio.to_thread(create_empty_image, empty, spec)
    return empty


def test_a_source_vm_shows_its_four_disks_and_their_images_are_random_the_destinations_empty(
    run_e2e: AsyncRunner, sock_dir: Path
) -> None:
    async def main() -> None:
        src = DisposableVM(sock_dir, "src", RAM_BYTES, disks=FOUR_DISKS)
        dst = DisposableVM(sock_dir, "dst", RAM_BYTES, disks=FOUR_DISKS, incoming=True)
        assert src.disk_paths == {
            spec.id: sock_dir / f"src-{spec.id}.{spec.format}" for spec in FOUR_DISKS
        }
        async with src, dst:
            for vm in (src, dst):
                async with QMP(vm.name) as qmp:
                    await qmp.connect(str(vm.qmp_path))
                    blocks = _block_by_qdev(await qmp.execute("query-block"))
                assert sorted(blocks) == sorted(spec.qdev_path for spec in FOUR_DISKS)
                for spec in FOUR_DISKS:
                    inserted = blocks[spec.qdev_path]["inserted"]
                    assert inserted["image"]["virtual-size"] == spec.size, spec
                    assert inserted["ro"] is spec.cdrom, spec
                    assert inserted["drv"] == spec.format, spec
                    assert inserted["file"] == str(vm.disk_path(spec)), spec
                    if spec.style == "blockdev":
                        assert inserted["node-name"] == f"fmt-{spec.id}"
                    else:
                        assert blocks[spec.qdev_path]["device"] == f"drive-{spec.id}"

            for spec in FOUR_DISKS:
                source = src.disk_path(spec)
                empty = await _empty_like(source, spec)
                # Random: differs from an empty image at once.
                assert await asyncio.to_thread(compare_images, source, empty) == (
                    "Content mismatch at offset 0!"
                )
                assert await asyncio.to_thread(compare_images, source, source) is None
                if not spec.cdrom:  # the destination's CD-ROM is random too, never compared
                    assert (
                        await asyncio.to_thread(compare_images, dst.disk_path(spec), empty) is None
                    )

    run_e2e(main())


def test_hmp_qemu_io_writes_to_a_disk_of_either_style_paused_or_running(
    run_e2e: AsyncRunner, sock_dir: Path
) -> None:
    disks = (
        DiskSpec("disk0", 2 * MIB),
        DiskSpec("disk1", 2 * MIB, format="qcow2", style="blockdev"),
        DiskSpec("disk2", 2 * MIB, style="blockdev", bus="ide"),
        DiskSpec("disk3", 2 * MIB, format="qcow2", bus="ide"),
        DiskSpec("disk4", 2 * MIB, format="qcow2", style="blockdev", bus="ide"),
        DiskSpec("cd0", 1 * MIB, bus="ide", cdrom=True),  # the fourth ide device
    )
    writable = disks[:-1]

    async def write_and_check(qmp: QMP, vm: DisposableVM, offset: str) -> None:
        for spec in writable:
            path = vm.disk_path(spec)
            before = path.with_name(f"before-{offset}-{path.name}")
            await asyncio.to_thread(shutil.copyfile, path, before)
            assert await asyncio.to_thread(compare_images, path, before) is None
            command = qemu_io_command(spec, f"write -P 0x5a {offset} 64k")
            assert await qmp.human_monitor_command(command) == "", command
            difference = await asyncio.to_thread(compare_images, path, before)
            assert difference is not None, command
            assert difference.startswith("Content mismatch at offset "), difference

    async def main() -> None:
        async with DisposableVM(sock_dir, "src", RAM_BYTES, disks=disks) as vm, QMP("src") as qmp:
            await qmp.connect(str(vm.qmp_path))
            await write_and_check(qmp, vm, "0")  # prelaunch (-S): paused
            await qmp.execute("cont")
            await write_and_check(qmp, vm, "1M")  # running (the BIOS finds nothing to boot)
            # A monitor-level refusal comes back as the reply's text.
            reply = await qmp.human_monitor_command(
                qemu_io_command(disks[-1], "write -P 0x5a 0 64k")
            )
            assert reply.strip() == "Block node is read-only"
            # The node name of a -blockdev disk cannot be written: its device does not
            # share writes with the BlockBackend qemu-io would add.
            reply = await qmp.human_monitor_command('qemu-io fmt-disk1 "write 0 64k"')
            assert reply.startswith("Permission conflict on node 'fmt-disk1'"), reply
        # qemu-io's own output goes to QEMU's stdout, the VM's log, not to the reply.
        assert "wrote 65536/65536 bytes at offset 1048576" in vm.stderr_tail()

    run_e2e(main())


def test_reuse_disks_keeps_a_sources_images_and_without_it_they_are_new(
    run_e2e: AsyncRunner, sock_dir: Path
) -> None:
    disks = (DiskSpec("disk0", 1 * MIB), DiskSpec("disk1", 1 * MIB, format="qcow2"))

    async def main() -> None:
        async with DisposableVM(sock_dir, "src", RAM_BYTES, disks=disks) as vm:
            pass
        kept = {}
        for spec in disks:
            kept[spec.id] = sock_dir / f"kept-{spec.id}"
            await asyncio.to_thread(shutil.copyfile, vm.disk_path(spec), kept[spec.id])
        vm = DisposableVM(sock_dir, "src", RAM_BYTES, disks=disks, reuse_disks=True)
        async with vm:
            pass
        for spec in disks:
            assert (
                await asyncio.to_thread(compare_images, vm.disk_path(spec), kept[spec.id]) is None
            )
        async with DisposableVM(sock_dir, "src", RAM_BYTES, disks=disks) as vm:
            pass
        for spec in disks:
            assert await asyncio.to_thread(compare_images, vm.disk_path(spec), kept[spec.id])

    run_e2e(main())


def test_compare_images_raises_when_qemu_img_cannot_open_an_image(sock_dir: Path) -> None:
    spec = DiskSpec("disk0", 1 * MIB)
    create_empty_image(sock_dir / "a.raw", spec)
    with pytest.raises(VMError, match="Could not open") as info:
        compare_images(sock_dir / "a.raw", sock_dir / "missing.raw")
    assert info.value.returncode == 2


def test_qemu_args_of_each_style() -> None:
    assert qemu_args(DiskSpec("disk0", MIB), "/d/a,b.raw") == [
        "-drive",
        "if=none,id=drive-disk0,file=/d/a,,b.raw,format=raw",
        "-device",
        "virtio-blk-pci,drive=drive-disk0,id=disk0",
    ]
    cdrom = DiskSpec("cd0", MIB, style="blockdev", bus="ide", cdrom=True)
    assert qemu_args(cdrom, "/d/c", ide_slot=3) == [
        "-blockdev",
        "driver=file,filename=/d/c,node-name=file-cd0,read-only=on",
        "-blockdev",
        "driver=raw,file=file-cd0,node-name=fmt-cd0,read-only=on",
        "-device",
        "ide-cd,drive=fmt-cd0,id=cd0,bus=ide.1,unit=1",
    ]
    with pytest.raises(ValueError, match="ide_slot 4 needs"):
        qemu_args(cdrom, "/d/c", ide_slot=4)
    with pytest.raises(ValueError, match="ide_slot 0 needs bus='ide'"):
        qemu_args(DiskSpec("disk0", MIB), "/d/a", ide_slot=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"id": "0disk"}, "disk id '0disk' must be a letter"),
        ({"id": "disk/0"}, "must be a letter"),
        ({"id": "d" * 27}, "up to 25"),
        ({"size": 0}, "positive multiple of 1 MiB"),
        ({"size": MIB + 512}, "positive multiple of 1 MiB"),
        ({"format": "vmdk"}, "format must be raw or qcow2"),
        ({"style": "netdev"}, "style must be drive or blockdev"),
        ({"bus": "scsi"}, "bus must be virtio or ide"),
        ({"cdrom": True}, "a cdrom must be bus='ide' and format='raw'"),
        ({"cdrom": True, "bus": "ide", "format": "qcow2"}, "a cdrom must be"),
    ],
)
def test_disk_spec_refuses_what_qemu_or_the_harness_cannot_take(
    kwargs: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {"id": "disk0", "size": MIB, **kwargs}
    with pytest.raises(ValueError, match=message):
        DiskSpec(**arguments)


def test_disposable_vm_refuses_repeated_ids_and_too_many_ide_disks(sock_dir: Path) -> None:
    with pytest.raises(ValueError, match="disk ids must be unique: disk0 repeated"):
        DisposableVM(sock_dir, "vm", RAM_BYTES, disks=[DiskSpec("disk0", MIB)] * 2)
    ide = [DiskSpec(f"disk{n}", MIB, bus="ide") for n in range(5)]
    with pytest.raises(ValueError, match="5 ide disks, but the pc machine has 4 ide slots"):
        DisposableVM(sock_dir, "vm", RAM_BYTES, disks=ide)


def test_qemu_io_command_refuses_quotes() -> None:
    with pytest.raises(ValueError, match="must not contain"):
        qemu_io_command(DiskSpec("disk0", MIB), 'write "0" 64k')
