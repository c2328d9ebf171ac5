"""What storage migration decides without QEMU: which disks, by which name, how long.

`migrelay.control.storage` and the block vocabulary of `migrelay.control.qmp`, fed the
``query-block`` replies QEMU 7.2 gave for the configurations the README shows (the
end-to-end tests run the same against real QEMU).
"""

from __future__ import annotations

import pytest

from migrelay.control.qmp import BlockDevice, BlockJob, DiskProgress
from migrelay.control.storage import (
    DEFAULT_DISK_RATE_FLOOR,
    DISK_TIMEOUT_BASE_S,
    Disk,
    default_disk_timeout,
    select_disks,
)
from migrelay.errors import StorageError
from migrelay.units import GIB, MIB

#: QEMU 7.2's query-block for: -drive + virtio-blk-pci id=disk0, -blockdev qcow2 +
#: ide-hd id=disk1, a read-only ide-cd id=cdrom0, an empty CD drive, and a disk of a
#: device without an id.
QUERY_BLOCK: list[dict[str, object]] = [
    {
        "device": "drive0",
        "qdev": "/machine/peripheral/disk0/virtio-backend",
        "inserted": {"node-name": "#block156", "ro": False, "image": {"virtual-size": 32 * MIB}},
    },
    {
        "device": "cd0",
        "qdev": "cdrom0",
        "inserted": {"node-name": "#block349", "ro": True, "image": {"virtual-size": MIB}},
    },
    {
        "device": "",
        "qdev": "disk1",
        "inserted": {"node-name": "q1", "ro": False, "image": {"virtual-size": 48 * MIB}},
    },
    {"device": "cd1", "qdev": "cdrom1"},
]
ANONYMOUS_DISK: dict[str, object] = {
    "device": "drive9",
    "qdev": "/machine/peripheral-anon/device[0]/virtio-backend",
    "inserted": {"node-name": "#block9", "ro": False, "image": {"virtual-size": MIB}},
}


def devices(*extra: dict[str, object]) -> list[BlockDevice]:
    return [BlockDevice.from_reply(entry) for entry in [*QUERY_BLOCK, *extra]]


def test_block_devices_are_named_by_their_device_id_whatever_the_configuration() -> None:
    parsed = devices(ANONYMOUS_DISK)
    assert [(d.device_id, d.node_name, d.size, d.read_only, d.has_medium) for d in parsed] == [
        ("disk0", "#block156", 32 * MIB, False, True),  # virtio: the id inside a QOM path
        ("cdrom0", "#block349", MIB, True, True),
        ("disk1", "q1", 48 * MIB, False, True),
        ("cdrom1", None, None, True, False),  # an empty drive
        (None, "#block9", MIB, False, True),  # no id: nothing to match it by
    ]


def test_every_writable_disk_is_copied_and_read_only_or_empty_drives_are_left_alone() -> None:
    assert select_disks(devices(), None) == [
        Disk("disk0", "#block156", 32 * MIB),
        Disk("disk1", "q1", 48 * MIB),
    ]


def test_named_disks_are_copied_in_the_order_named() -> None:
    assert select_disks(devices(), ("disk1",)) == [Disk("disk1", "q1", 48 * MIB)]


@pytest.mark.parametrize(
    ("names", "extra", "message"),
    [
        (
            ("disk7",),
            (),
            "disk disk7: no such device (devices with an id: cdrom0, cdrom1, disk0, disk1)",
        ),
        (("cdrom0",), (), "disk cdrom0: read-only; only writable disks are copied"),
        (("cdrom1",), (), "disk cdrom1: no medium inserted"),
        (
            None,
            (ANONYMOUS_DISK,),
            "the disk of /machine/peripheral-anon/device[0]/virtio-backend has no device id:"
            " give its -device an id= (on both hosts), or name the disks to copy with"
            " --migrate-disks",
        ),
    ],
)
def test_a_disk_that_cannot_be_copied_is_named_before_anything_starts(
    names: tuple[str, ...] | None, extra: tuple[dict[str, object], ...], message: str
) -> None:
    with pytest.raises(StorageError) as info:
        select_disks(devices(*extra), names)
    assert str(info.value) == message


def test_a_vm_without_writable_disks_has_nothing_to_copy() -> None:
    only_cdrom = [BlockDevice.from_reply(QUERY_BLOCK[1])]
    with pytest.raises(StorageError, match="no writable disk to copy"):
        select_disks(only_cdrom, None)


def test_the_disk_timeout_grows_with_the_disks_and_a_lower_bandwidth() -> None:
    assert default_disk_timeout(0) == DISK_TIMEOUT_BASE_S
    assert default_disk_timeout(GIB) == DISK_TIMEOUT_BASE_S + GIB / DEFAULT_DISK_RATE_FLOOR
    assert default_disk_timeout(GIB) == 120 + 64
    assert default_disk_timeout(GIB, max_bandwidth=8 * MIB) == 120 + 128
    assert default_disk_timeout(GIB, max_bandwidth=GIB) == 120 + 64


def test_a_mirror_job_reply_is_typed() -> None:
    job = BlockJob.from_reply(
        {
            "id": "migrelay-mirror-disk0",
            "type": "mirror",
            "status": "concluded",
            "current-progress": 5,
            "total-progress": 9,
            "error": "Input/output error",
        }
    )
    assert job == BlockJob(
        "migrelay-mirror-disk0", "mirror", "concluded", 5, 9, "Input/output error"
    )


@pytest.mark.parametrize(
    ("status", "copied", "total", "rate", "ready", "eta"),
    [
        ("running", 0, 100, None, False, None),
        ("running", 25, 100, 25.0, False, 3.0),
        ("ready", 100, 100, None, True, 0.0),
        ("standby", 100, 100, None, True, 0.0),
        ("concluded", 100, 100, None, True, 0.0),
        ("concluded", 40, 100, 10.0, False, 6.0),
    ],
)
def test_disk_progress_knows_when_a_disk_is_in_sync(
    status: str, copied: int, total: int, rate: float | None, ready: bool, eta: float | None
) -> None:
    disk = DiskProgress("disk0", status, copied, total, rate)
    assert (disk.ready, disk.remaining, disk.eta_s) == (ready, total - copied, eta)
