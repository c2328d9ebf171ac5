"""Before a byte moves: do both VMs share what a migration needs? (``migrate --to``, ``serve``)

A migration carries a VM's state, not its configuration: the destination QEMU must be
started with the same machine type, the same RAM size and the same devices, and be able
to read the source's stream (the same QEMU version or a newer one). QEMU itself notices
a difference only once the stream reaches it, and then the destination QEMU exits. Seen
with QEMU 7.2 (64 MiB to 128 MiB; ``pc`` to ``q35``): the destination QEMU exited with
"Size mismatch: ram0: 0x4000000 != 0x8000000" / "Machine type received is
'pc-i440fx-7.2' and local is 'pc-q35-7.2'" on its stderr, and the source's migration
failed with only "Unable to write to socket: Broken pipe".

So ``migrate --to`` gathers the source's facts (`vm_facts`) and announces them in the
handshake (``Migrelay-Vm``, `migrelay.core.headers.VM_HEADER`); ``serve --qmp-dir``
gathers the destination's and compares them (`check_destination`) before it exports a
disk or issues ``migrate-incoming``, and refuses a mismatch with one line that names
both sides (`CompatibilityError`).

Only what QMP can tell is compared: the devices are those given an id
(``-device ...,id=ID``), the ones a migration matches by name; a device without an id
is left to QEMU's own checks.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Final

from migrelay.control.qmp import QMP
from migrelay.core.headers import (
    QEMU_VERSION_RE,
    format_vm_header,
    parse_vm_header,
)
from migrelay.errors import CompatibilityError, MigrationError, UnsupportedError
from migrelay.units import MIB

__all__ = [
    "VmFacts",
    "check_compatible",
    "check_destination",
    "source_vm_header",
    "vm_facts",
]

logger = logging.getLogger(__name__)

#: The machine's QOM object; its ``type`` property is the machine type QEMU resolved
#: ``-machine pc`` to, with a suffix: ``pc-i440fx-7.2-machine``.
MACHINE_PATH: Final = "/machine"
MACHINE_TYPE_PROPERTY: Final = "type"
#: The suffix QOM gives every machine type's name (``MACHINE_TYPE_SUFFIX`` in QEMU's
#: ``include/hw/boards.h``); ``-machine`` and ``query-machines`` spell types without it.
MACHINE_TYPE_SUFFIX: Final = "-machine"
#: The QOM container of the devices given an id (``-device ...,id=ID``): each is a child
#: ``ID`` of type ``child<TYPE>``.
PERIPHERAL_PATH: Final = "/machine/peripheral"
_CHILD_TYPE_RE: Final = re.compile(r"child<(.+)>")
#: Most devices of each side a mismatch line names; the rest are counted. The line goes
#: to the client whole (a refusal body of at most 4096 bytes is kept) and to the log.
MAX_DEVICES_NAMED: Final = 8


@dataclass(frozen=True, slots=True)
class VmFacts:
    """What both QEMUs of a migration must share, as QMP tells it.

    Attributes:
        qemu: QEMU's version, ``MAJOR.MINOR.MICRO`` (``7.2.22``).
        machine: the machine type QEMU resolved, without QOM's suffix
            (``pc-i440fx-7.2`` for ``-machine pc`` on QEMU 7.2).
        ram_bytes: the guest's RAM: base memory plus hot-plugged memory.
        devices: ``(id, type)`` of each device given an id, sorted; ``None`` when not
            known (a source with more devices than its header lists).

    Raises:
        ValueError: ``qemu`` is not ``MAJOR.MINOR.MICRO``.
    """

    qemu: str
    machine: str
    ram_bytes: int
    devices: tuple[tuple[str, str], ...] | None = ()

    def __post_init__(self) -> None:
        if QEMU_VERSION_RE.fullmatch(self.qemu) is None:
            raise ValueError(f"qemu version {self.qemu[:40]!r} is not MAJOR.MINOR.MICRO")

    @classmethod
    def from_header(cls, value: str) -> VmFacts:
        """The source's facts, from its ``Migrelay-Vm`` header value.

        Raises:
            ValueError: the value is malformed (`migrelay.core.headers.parse_vm_header`).
        """
        announced = parse_vm_header(value)
        return cls(announced.qemu, announced.machine, announced.ram_bytes, announced.devices)

    def header_value(self) -> str:
        """The ``Migrelay-Vm`` header value that announces these facts.

        Raises:
            ValueError: a fact the header cannot carry (devices it cannot carry are
                left out instead: ``devices=omitted``).
        """
        return format_vm_header(self.qemu, self.machine, self.ram_bytes, self.devices)


async def vm_facts(qmp: QMP) -> VmFacts:
    """Gather a VM's `VmFacts` over QMP (four queries; nothing is changed).

    Raises:
        UnsupportedError: this QEMU cannot tell one of the facts (a command it lacks, a
            reply without the value); its text says which.
        ConnectError: the connection is gone.
    """
    try:
        version = await qmp.query_version()
        machine = await qmp.qom_get(MACHINE_PATH, MACHINE_TYPE_PROPERTY)
        ram_bytes = await qmp.query_memory_size()
        devices = await _peripherals(qmp)
    except MigrationError as exc:
        raise UnsupportedError(f"qemu of {qmp.name} cannot tell its vm's facts: {exc}") from exc
    if QEMU_VERSION_RE.fullmatch(version) is None:
        raise UnsupportedError(f"qemu of {qmp.name} reports no version")
    if not isinstance(machine, str) or not machine:
        raise UnsupportedError(f"qemu of {qmp.name} reports no machine type")
    if ram_bytes is None:
        raise UnsupportedError(f"qemu of {qmp.name} reports no ram size")
    return VmFacts(version, machine.removesuffix(MACHINE_TYPE_SUFFIX), ram_bytes, devices)


async def _peripherals(qmp: QMP) -> tuple[tuple[str, str], ...]:
    """``(id, type)`` of every device given an id, sorted."""
    try:
        children = await qmp.qom_list(PERIPHERAL_PATH)
    except MigrationError as exc:
        # QEMU makes the container on first use; one that never made it has no device
        # with an id. (QEMU 7.2 makes it at start-up: seen on -nodefaults with no device.)
        if exc.error_class != "DeviceNotFound":
            raise
        return ()
    devices = []
    for name, kind in children:
        if match := _CHILD_TYPE_RE.fullmatch(kind):
            devices.append((name, match.group(1)))
    return tuple(sorted(devices))


def check_compatible(source: VmFacts, destination: VmFacts) -> None:
    """Refuse a destination that cannot take the source's migration.

    The rules: the destination's QEMU is the same version or newer (QEMU supports
    migrating forward; an older one may not read the stream); the machine type and the
    RAM size are equal; the same devices (id and type) on both sides. Devices are not
    compared when either side's are not known.

    Raises:
        CompatibilityError: one line naming every difference and both sides' values,
            differences joined with ``"; "``.
    """
    differences = []
    if _version(destination.qemu) < _version(source.qemu):
        differences.append(
            "qemu on the destination is older than the source: source"
            f" {source.qemu}, destination {destination.qemu} (a migration goes to the same"
            " or a newer qemu)"
        )
    if source.machine != destination.machine:
        differences.append(
            f"machine type differs: source {source.machine}, destination {destination.machine}"
        )
    if source.ram_bytes != destination.ram_bytes:
        differences.append(
            f"ram size differs: source {_describe_ram(source.ram_bytes)},"
            f" destination {_describe_ram(destination.ram_bytes)}"
        )
    if source.devices is not None and destination.devices is not None:
        only_source = sorted(set(source.devices) - set(destination.devices))
        only_destination = sorted(set(destination.devices) - set(source.devices))
        sides = [
            f"only on the {side}: {_name_devices(devices)}"
            for side, devices in (("source", only_source), ("destination", only_destination))
            if devices
        ]
        if sides:
            differences.append(f"devices differ: {'; '.join(sides)}")
    if differences:
        raise CompatibilityError("; ".join(differences))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def _describe_ram(size: int) -> str:
    # Exact, never rounded: 64 MiB and 64 MiB + 4 KiB must not read alike.
    return f"{size // MIB} MiB" if size % MIB == 0 else f"{size} bytes"


def _name_devices(devices: Sequence[tuple[str, str]]) -> str:
    named = ", ".join(f"{device} ({kind})" for device, kind in devices[:MAX_DEVICES_NAMED])
    more = len(devices) - MAX_DEVICES_NAMED
    return f"{named} and {more} more" if more > 0 else named


async def check_destination(qmp: QMP, source: VmFacts, copied_disks: Collection[str] = ()) -> None:
    """``serve``: check the destination VM against the facts the source announced.

    A destination QEMU that cannot tell its facts is not compared (logged as a
    warning): QEMU's own checks of the stream remain. Nothing is changed either way.

    Args:
        qmp: connected to the destination.
        source: what the source announced (`VmFacts.from_header`).
        copied_disks: the disks the source announced it copies (``Migrelay-Storage``).
            One of them that the destination lacks is left to the storage check, which
            runs next and names the source's disk size too.

    Raises:
        CompatibilityError: the destination differs (`check_compatible`).
        ConnectError: the connection is gone.
    """
    try:
        destination = await vm_facts(qmp)
    except UnsupportedError as exc:
        logger.warning("%s: not compared with the source vm: %s", qmp.name, exc)
        return
    if source.devices is None:
        logger.info("%s: devices not compared: the source vm has more than it announces", qmp.name)
    elif copied_disks and destination.devices is not None:
        present = {device for device, _ in destination.devices}
        kept = tuple(d for d in source.devices if d[0] in present or d[0] not in copied_disks)
        source = dataclasses.replace(source, devices=kept)
    check_compatible(source, destination)
    logger.debug("= %s: matches the source vm: %s", qmp.name, destination)


async def source_vm_header(qmp: QMP) -> str | None:
    """``migrate --to``: the ``Migrelay-Vm`` value announcing the source VM behind ``qmp``.

    Returns:
        The header value; ``None`` when the source's QEMU cannot tell its facts (logged
        at debug level): the destination then compares nothing.

    Raises:
        MigrationError, ConnectError: from QMP.
    """
    try:
        return (await vm_facts(qmp)).header_value()
    except (UnsupportedError, ValueError) as exc:
        logger.debug("%s: announcing no vm facts, none compared: %s", qmp.name, exc)
        return None
