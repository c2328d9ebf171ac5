"""`migrelay.control.compat`: what both VMs of a migration must share, and the one line
that names both sides when they differ.

The rules (`check_compatible`) as a table; the facts (`vm_facts`) and the source's
header (`source_vm_header`) against the fake QMP server, as QEMU 7.2 answers.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import pytest

from migrelay.control.compat import (
    MAX_DEVICES_NAMED,
    VmFacts,
    check_compatible,
    check_destination,
    source_vm_header,
    vm_facts,
)
from migrelay.control.qmp import QMP
from migrelay.errors import CompatibilityError, UnsupportedError
from migrelay.units import MIB
from tests.control.fake_qmp import FakeQMP, QMPFail, against
from tests.loops import AsyncRunner

SOURCE = VmFacts(
    "7.2.22",
    "pc-i440fx-7.2",
    64 * MIB,
    (("cd0", "ide-cd"), ("disk0", "virtio-blk-pci"), ("net0", "virtio-net-pci")),
)


def _but(**changes: Any) -> VmFacts:
    """`SOURCE` with some facts changed (the destination of a test)."""
    return dataclasses.replace(SOURCE, **changes)


# -- the rules ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "destination",
    [
        _but(),
        _but(qemu="7.2.23"),
        _but(qemu="8.0.0"),
        # Numbers, not text: 7.10 is newer than 7.9.
        _but(qemu="7.10.0"),
        # Devices are compared as a set: their order does not matter.
        _but(devices=tuple(reversed(SOURCE.devices or ()))),
        # Not known on one side (a source with more devices than its header lists).
        _but(devices=None),
    ],
    ids=["same", "newer-micro", "newer-major", "newer-minor-two-digits", "order", "unknown"],
)
def test_a_destination_that_can_take_the_migration_passes(destination: VmFacts) -> None:
    check_compatible(SOURCE, destination)


def test_devices_unknown_on_the_source_are_not_compared() -> None:
    check_compatible(_but(devices=None), _but(devices=()))


@pytest.mark.parametrize(
    ("destination", "line"),
    [
        (
            _but(qemu="7.2.21"),
            "qemu on the destination is older than the source: source 7.2.22, destination"
            " 7.2.21 (a migration goes to the same or a newer qemu)",
        ),
        (
            _but(qemu="7.1.99"),
            "qemu on the destination is older than the source: source 7.2.22, destination"
            " 7.1.99 (a migration goes to the same or a newer qemu)",
        ),
        (
            _but(machine="pc-q35-7.2"),
            "machine type differs: source pc-i440fx-7.2, destination pc-q35-7.2",
        ),
        (
            _but(ram_bytes=128 * MIB),
            "ram size differs: source 64 MiB, destination 128 MiB",
        ),
        (
            # Never rounded: "64.0 MiB" on both sides would say nothing.
            _but(ram_bytes=64 * MIB + 4096),
            "ram size differs: source 64 MiB, destination 67112960 bytes",
        ),
        (
            _but(devices=(("cd0", "ide-cd"), ("disk0", "virtio-blk-pci"))),
            "devices differ: only on the source: net0 (virtio-net-pci)",
        ),
        (
            _but(devices=(*(SOURCE.devices or ()), ("rng0", "virtio-rng-pci"))),
            "devices differ: only on the destination: rng0 (virtio-rng-pci)",
        ),
        (
            # The same id with another type is a difference on both sides.
            _but(devices=(("cd0", "ide-cd"), ("disk0", "ide-hd"), ("net0", "virtio-net-pci"))),
            "devices differ: only on the source: disk0 (virtio-blk-pci);"
            " only on the destination: disk0 (ide-hd)",
        ),
    ],
    ids=[
        "older-micro",
        "older-minor",
        "machine",
        "ram",
        "ram-not-rounded",
        "device-missing",
        "device-extra",
        "device-type",
    ],
)
def test_a_mismatch_is_one_line_naming_both_sides(destination: VmFacts, line: str) -> None:
    with pytest.raises(CompatibilityError) as info:
        check_compatible(SOURCE, destination)
    assert str(info.value) == line


def test_every_mismatch_is_named_in_the_one_line() -> None:
    destination = VmFacts("7.1.0", "pc-q35-7.1", 128 * MIB, (("cd0", "ide-cd"),))
    with pytest.raises(CompatibilityError) as info:
        check_compatible(SOURCE, destination)
    assert str(info.value) == (
        "qemu on the destination is older than the source: source 7.2.22, destination 7.1.0"
        " (a migration goes to the same or a newer qemu); machine type differs: source"
        " pc-i440fx-7.2, destination pc-q35-7.1; ram size differs: source 64 MiB,"
        " destination 128 MiB; devices differ: only on the source: disk0 (virtio-blk-pci),"
        " net0 (virtio-net-pci)"
    )
    assert "\n" not in str(info.value)


def test_a_long_device_list_is_counted_not_spelled_out() -> None:
    many = tuple((f"disk{n:02}", "virtio-blk-pci") for n in range(MAX_DEVICES_NAMED + 5))
    with pytest.raises(CompatibilityError) as info:
        check_compatible(_but(devices=many), _but(devices=()))
    named = ", ".join(f"disk{n:02} (virtio-blk-pci)" for n in range(MAX_DEVICES_NAMED))
    assert str(info.value) == f"devices differ: only on the source: {named} and 5 more"


def test_facts_need_a_qemu_version() -> None:
    with pytest.raises(ValueError, match=r"is not MAJOR\.MINOR\.MICRO"):
        VmFacts("of unknown version", "pc", MIB)


def test_facts_travel_in_the_header_unchanged() -> None:
    value = SOURCE.header_value()
    assert value == (
        "qemu=7.2.22; machine=pc-i440fx-7.2; ram=67108864;"
        " devices=cd0:ide-cd disk0:virtio-blk-pci net0:virtio-net-pci"
    )
    assert VmFacts.from_header(value) == SOURCE


# -- the facts, as QEMU 7.2 tells them ---------------------------------------------------------


def qemu_7_2(
    machine: str = "pc-i440fx-7.2-machine",
    ram_bytes: int = 64 * MIB,
    peripherals: tuple[tuple[str, str], ...] = (("net0", "virtio-net-pci"),),
) -> FakeQMP:
    """A fake destination or source that answers what `vm_facts` asks, as QEMU 7.2 does."""
    children = [{"name": "type", "type": "string"}] + [
        {"name": name, "type": f"child<{kind}>"} for name, kind in peripherals
    ]
    return FakeQMP(
        replies={
            "qom-get": machine,
            # A reply that is a list goes in a list (a list is a script of replies).
            "qom-list": [children],
            "query-memory-size-summary": {"base-memory": ram_bytes, "plugged-memory": 0},
        }
    )


def test_facts_are_the_resolved_machine_type_the_ram_and_the_devices_with_an_id(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    fake = qemu_7_2(peripherals=(("net0", "virtio-net-pci"), ("disk0", "virtio-blk-pci")))
    fake.replies["query-memory-size-summary"] = {
        "base-memory": 64 * MIB,
        "plugged-memory": 128 * MIB,
    }

    async def body(qmp: QMP) -> None:
        assert await vm_facts(qmp) == VmFacts(
            "7.2.22",
            "pc-i440fx-7.2",
            192 * MIB,
            (("disk0", "virtio-blk-pci"), ("net0", "virtio-net-pci")),
        )

    run_async(against(fake, sock_dir, body))
    assert fake.received == [
        ("query-version", {}),
        ("qom-get", {"path": "/machine", "property": "type"}),
        ("query-memory-size-summary", {}),
        ("qom-list", {"path": "/machine/peripheral"}),
    ]


def test_a_vm_without_a_peripheral_container_has_no_devices(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    fake = qemu_7_2()
    fake.replies["qom-list"] = QMPFail(
        "Device '/machine/peripheral' not found", error_class="DeviceNotFound"
    )
    fake.replies["query-memory-size-summary"] = {"base-memory": 64 * MIB}  # none plugged

    async def body(qmp: QMP) -> None:
        assert await vm_facts(qmp) == VmFacts("7.2.22", "pc-i440fx-7.2", 64 * MIB, ())

    run_async(against(fake, sock_dir, body))


@pytest.mark.parametrize(
    ("command", "reply", "message"),
    [
        (
            "query-memory-size-summary",
            QMPFail("The command query-memory-size-summary has not been found", "CommandNotFound"),
            "cannot tell its vm's facts: The command query-memory-size-summary has not been",
        ),
        ("qom-list", QMPFail("Permission denied", "GenericError"), "cannot tell its vm's"),
        ("query-memory-size-summary", {}, "reports no ram size"),
        ("qom-get", 7, "reports no machine type"),
        ("query-version", {"package": "odd"}, "reports no version"),
    ],
)
def test_a_qemu_that_cannot_tell_a_fact_says_which(
    command: str, reply: object, message: str, run_async: AsyncRunner, sock_dir: Path
) -> None:
    fake = qemu_7_2()
    fake.replies[command] = reply

    async def body(qmp: QMP) -> None:
        with pytest.raises(UnsupportedError, match=message):
            await vm_facts(qmp)

    run_async(against(fake, sock_dir, body))


def test_the_source_announces_its_facts(run_async: AsyncRunner, sock_dir: Path) -> None:
    fake = qemu_7_2()
    announced: list[str | None] = []

    async def body(qmp: QMP) -> None:
        announced.append(await source_vm_header(qmp))

    run_async(against(fake, sock_dir, body))
    assert announced == [
        "qemu=7.2.22; machine=pc-i440fx-7.2; ram=67108864; devices=net0:virtio-net-pci"
    ]


def test_a_source_that_cannot_tell_announces_nothing(
    run_async: AsyncRunner, sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = qemu_7_2()
    fake.replies["qom-get"] = QMPFail("The command qom-get has not been found", "CommandNotFound")
    announced: list[str | None] = []

    async def body(qmp: QMP) -> None:
        announced.append(await source_vm_header(qmp))

    with caplog.at_level(logging.DEBUG, logger="migrelay.control.compat"):
        run_async(against(fake, sock_dir, body))
    assert announced == [None]
    [record] = [r for r in caplog.records if r.name == "migrelay.control.compat"]
    assert record.levelno == logging.DEBUG
    assert "announcing no vm facts" in record.getMessage()


# -- the destination's check ---------------------------------------------------------------


def test_a_disk_the_source_copies_and_the_destination_lacks_is_left_to_the_storage_check(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    # The storage check runs next and names the source's disk size too.
    source = _but(devices=(("disk0", "virtio-blk-pci"), ("disk1", "virtio-blk-pci")))
    fake = qemu_7_2(machine="pc-i440fx-7.2-machine", peripherals=(("disk0", "virtio-blk-pci"),))

    async def body(qmp: QMP) -> None:
        await check_destination(qmp, source, copied_disks={"disk1": 1 << 30})
        # A device that is not a disk to copy is still compared.
        with pytest.raises(CompatibilityError, match="only on the source: disk1"):
            await check_destination(qmp, source, copied_disks={"disk0": 1 << 30})

    run_async(against(fake, sock_dir, body))


def test_a_destination_that_cannot_tell_is_not_compared_and_says_so(
    run_async: AsyncRunner, sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = qemu_7_2(ram_bytes=128 * MIB)
    fake.replies["qom-list"] = QMPFail(
        "The command qom-list has not been found", "CommandNotFound"
    )

    async def body(qmp: QMP) -> None:
        await check_destination(qmp, SOURCE)

    with caplog.at_level(logging.WARNING, logger="migrelay.control.compat"):
        run_async(against(fake, sock_dir, body))
    assert any("not compared with the source vm" in r.getMessage() for r in caplog.records)


def test_devices_the_source_omitted_are_not_compared_and_the_log_says_so(
    run_async: AsyncRunner, sock_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = qemu_7_2(peripherals=())

    async def body(qmp: QMP) -> None:
        await check_destination(qmp, _but(devices=None))

    with caplog.at_level(logging.INFO, logger="migrelay.control.compat"):
        run_async(against(fake, sock_dir, body))
    assert any("devices not compared" in r.getMessage() for r in caplog.records)
