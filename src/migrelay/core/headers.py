"""The ``Migrelay-*`` handshake headers (DESIGN.md §3): names, formats and parsers, sans-IO.

One vocabulary for the source relay that sends them, the server that checks them and
the control plane that announces a migration::

    Migrelay-Session: 3f2a9c0d1e4b5a67      (opaque id, chosen by the source relay)
    Migrelay-Channel: 2                      (0, 1, 2 … in the order QEMU connected)
    Migrelay-Channel: storage-0              (a disk's NBD connection: no order)
    Migrelay-Migration: multifd=4,postcopy=0
    Migrelay-Storage: disk0=1073741824,disk1=68719476736   (disks to copy, by device id)
    Migrelay-Vm: qemu=7.2.22; machine=pc-i440fx-7.2; ram=67108864; devices=disk0:virtio-blk-pci
                                             (what the destination VM must match)

A storage channel's label is not a number on purpose: a server that predates storage
refuses it (400 invalid Migrelay-Channel) instead of connecting disk traffic to QEMU's
migration socket.

Every parser is strict and raises :class:`ValueError` with a message that is safe to
log; header values come from the network, so they are checked character by character
(``str.isdigit()`` accepts "²", which ``int()`` then refuses with a traceback).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

#: The migration this channel belongs to (the source relay's id for it).
SESSION_HEADER: Final = "Migrelay-Session"
#: The channel's place in QEMU's accept order; the server connects channel N to the
#: destination only after channels 0..N-1 (QEMU tells channels apart by that order).
CHANNEL_HEADER: Final = "Migrelay-Channel"
#: The source's migration capabilities, for a server that prepares the destination.
MIGRATION_HEADER: Final = "Migrelay-Migration"

#: The disks a migration copies and their sizes, for a server that prepares the destination.
STORAGE_HEADER: Final = "Migrelay-Storage"
#: A storage channel's `CHANNEL_HEADER` value is this prefix and its number.
STORAGE_CHANNEL_PREFIX: Final = "storage-"
#: Most disks one migration may copy (and storage channels it may open).
MAX_DISKS: Final = 64
#: A disk's name: a QEMU device id (letters, digits, ``-``, ``.``, ``_``; a letter
#: first), at most 64 characters.
DISK_ID_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,63}")
#: A disk's size: up to 2^63 - 1 bytes (QEMU's limit), so at most 19 digits.
_MAX_SIZE_DIGITS: Final = 19

#: Migrelay-Session values: opaque ids chosen by the source relay.
SESSION_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Channel numbers run from 0 to MAX_CHANNEL - 1 (QEMU's multifd allows up to 255
#: channels, plus the main channel).
MAX_CHANNEL: Final = 256
#: The most multifd channels QEMU accepts (migration.c, migrate_params_check).
MAX_MULTIFD_CHANNELS: Final = 255
#: The longest Migrelay-Migration value accepted; the real one is about 20 bytes.
MAX_MIGRATION_HEADER_CHARS: Final = 200

# Character classes spelled out: in a str pattern, \d also matches "²" and "٣".
_CHANNEL_RE: Final = re.compile(r"0|[1-9][0-9]*")
_ASCII_DIGITS_RE: Final = re.compile(r"[0-9]+")


def channel_headers(session_id: str, channel: int | ChannelLabel) -> list[tuple[str, str]]:
    """The headers the source relay sends to open channel ``channel`` of a session.

    ``channel`` is a migration channel's number or a `ChannelLabel` (``storage-N``).

    Not checked here: a channel number the server does not accept (``MAX_CHANNEL`` and
    above, or above its ``--max-channels``) is its refusal to give, as a 400 or 429 the
    source relay logs like any other refusal.
    """
    return [(SESSION_HEADER, session_id), (CHANNEL_HEADER, str(channel))]


@dataclass(frozen=True, slots=True)
class ChannelLabel:
    """A parsed `CHANNEL_HEADER`: a migration channel (ordered) or a storage channel."""

    number: int
    storage: bool = False

    def __str__(self) -> str:
        return f"{STORAGE_CHANNEL_PREFIX}{self.number}" if self.storage else str(self.number)


def parse_channel_label(value: str) -> ChannelLabel:
    """Parse a `CHANNEL_HEADER` value: ``N`` (`parse_channel`) or ``storage-N``.

    A storage channel's number is below `MAX_DISKS`: one per disk.

    Raises:
        ValueError: anything else.
    """
    if value.startswith(STORAGE_CHANNEL_PREFIX):
        number = parse_channel(value[len(STORAGE_CHANNEL_PREFIX) :])
        if number >= MAX_DISKS:
            raise ValueError(f"invalid {CHANNEL_HEADER}")
        return ChannelLabel(number, storage=True)
    return ChannelLabel(parse_channel(value))


def format_storage_header(disks: dict[str, int]) -> str:
    """The `STORAGE_HEADER` value: ``disk0=1073741824,disk1=536870912`` (id=bytes).

    Raises:
        ValueError: no disk, too many, an id that is not a device id, a negative size.
    """
    if not disks or len(disks) > MAX_DISKS:
        raise ValueError(f"{STORAGE_HEADER} names 1..{MAX_DISKS} disks, not {len(disks)}")
    for disk, size in disks.items():
        if DISK_ID_RE.fullmatch(disk) is None:
            raise ValueError(f"disk id {disk!r} is not a device id")
        if not 0 <= size < 2**63:
            raise ValueError(f"disk {disk} size {size} out of range")
    return ",".join(f"{disk}={size}" for disk, size in disks.items())


def parse_storage_header(value: str) -> dict[str, int]:
    """Parse a `STORAGE_HEADER` value into disk id -> size in bytes, in order.

    Raises:
        ValueError: malformed, a repeated disk, or more than `MAX_DISKS`; the message
            never repeats more than a short piece of the value.
    """
    if len(value) > MAX_DISKS * (64 + 1 + _MAX_SIZE_DIGITS + 1):
        raise ValueError(f"{STORAGE_HEADER} too long")
    disks: dict[str, int] = {}
    for item in value.split(","):
        disk, sep, text = (part.strip() for part in item.partition("="))
        if (
            not sep
            or DISK_ID_RE.fullmatch(disk) is None
            or len(text) > _MAX_SIZE_DIGITS
            or _ASCII_DIGITS_RE.fullmatch(text) is None
        ):
            raise ValueError(f"{STORAGE_HEADER} item {item.strip()[:80]!r} is not disk=bytes")
        if disk in disks:
            raise ValueError(f"{STORAGE_HEADER} names disk {disk} twice")
        disks[disk] = int(text)
        if len(disks) > MAX_DISKS:
            raise ValueError(f"{STORAGE_HEADER} names more than {MAX_DISKS} disks")
    return disks


def parse_session_id(value: str) -> str:
    """Check a ``Migrelay-Session`` value (1-64 of ``A-Z a-z 0-9 _ -``); return it.

    Raises:
        ValueError: anything else.
    """
    if SESSION_ID_RE.fullmatch(value) is None:
        raise ValueError(f"invalid {SESSION_HEADER}")
    return value


def parse_channel(value: str) -> int:
    """Parse a ``Migrelay-Channel`` value: a channel number, 0 to ``MAX_CHANNEL - 1``.

    Strict: ASCII digits only, no sign, no spaces, no leading zeros (one number has one
    spelling), so a value the server accepts is exactly what :func:`channel_headers`
    sends.

    Raises:
        ValueError: anything else.
    """
    # The length check comes first: int() of a 10 000-digit string is slow, then refused.
    if len(value) > len(str(MAX_CHANNEL)) or _CHANNEL_RE.fullmatch(value) is None:
        raise ValueError(f"invalid {CHANNEL_HEADER}")
    number = int(value)
    if number >= MAX_CHANNEL:
        raise ValueError(f"invalid {CHANNEL_HEADER}")
    return number


#: The multifd compression methods a `MIGRATION_HEADER` may name.
COMPRESSION_METHODS: Final = ("zlib", "zstd")


@dataclass(frozen=True, slots=True)
class MigrationAnnouncement:
    """What a ``Migrelay-Migration`` header announces.

    Attributes:
        multifd_channels: multifd with this many channels; ``None`` when multifd is off
            (``multifd=0``).
        postcopy: whether the source may switch to postcopy.
        compress: the multifd compression both sides set (``compress=zstd``); ``None``
            when the key is absent (no compression).
        resume: ``False`` (``resume=0``): the destination keeps the guest paused after
            the migration; ``None`` (absent) or ``True``: it resumes the guest if it ran
            on the source.
    """

    multifd_channels: int | None = None
    postcopy: bool = False
    compress: str | None = None
    resume: bool | None = None

    def __post_init__(self) -> None:
        # The range is QEMU's: a header outside it would only fail once QEMU is asked.
        channels = self.multifd_channels
        if channels is not None and not 1 <= channels <= MAX_MULTIFD_CHANNELS:
            raise ValueError(f"multifd channels must be 1..{MAX_MULTIFD_CHANNELS}, got {channels}")
        if self.compress is not None and self.compress not in COMPRESSION_METHODS:
            raise ValueError(f"unknown compression {self.compress!r}")


def format_migration_header(
    multifd_channels: int | None,
    postcopy: bool,
    *,
    compress: str | None = None,
    resume: bool | None = None,
) -> str:
    """The ``Migrelay-Migration`` value: ``multifd=4,postcopy=0``, then the optional keys.

    ``multifd_channels`` None or 0 means multifd off (``multifd=0``). ``compress`` and
    ``resume`` are sent only when set, so that a source that uses neither is understood
    by a server that predates them; one that does use them is refused by such a server
    (unknown key), which is what should happen.

    Raises:
        ValueError: ``multifd_channels`` is outside 0..255, or ``compress`` is unknown.
    """
    announced = MigrationAnnouncement(multifd_channels or None, postcopy, compress, resume)
    value = f"multifd={announced.multifd_channels or 0},postcopy={int(announced.postcopy)}"
    if announced.compress is not None:
        value += f",compress={announced.compress}"
    if announced.resume is not None:
        value += f",resume={int(announced.resume)}"
    return value


def parse_migration_header(value: str | None) -> MigrationAnnouncement:
    """Parse a ``Migrelay-Migration`` value; ``None`` (no header) gives the defaults.

    Spaces around items, keys and values are accepted (``" multifd = 2 , postcopy=1 "``);
    numbers are ASCII digits, ``compress`` is one of `COMPRESSION_METHODS`. An unknown
    key is refused rather than ignored: a capability the destination did not set makes
    QEMU hang or fail mid-migration, long after the handshake.

    Raises:
        ValueError: the value is malformed, or names a key or value this version does
            not know; the message says which.
    """
    if value is None:
        return MigrationAnnouncement()
    if len(value) > MAX_MIGRATION_HEADER_CHARS:
        raise ValueError(f"{MIGRATION_HEADER} longer than {MAX_MIGRATION_HEADER_CHARS} characters")
    multifd: int | None = None
    flags: dict[str, bool] = {}
    compress: str | None = None
    for item in value.split(","):
        key, sep, text = (part.strip() for part in item.partition("="))
        if key == "compress" and sep:
            if text not in COMPRESSION_METHODS:
                raise ValueError(f"{MIGRATION_HEADER} names unknown compression {text!r}")
            compress = text
            continue
        if not sep or _ASCII_DIGITS_RE.fullmatch(text) is None:
            raise ValueError(f"{MIGRATION_HEADER} item {item.strip()!r} is not key=number")
        number = int(text)
        if key == "multifd":
            multifd = number or None
        elif key in ("postcopy", "resume") and number in (0, 1):
            flags[key] = bool(number)
        elif key in ("postcopy", "resume"):
            raise ValueError(f"{MIGRATION_HEADER} {key} must be 0 or 1, not {number}")
        else:
            raise ValueError(f"{MIGRATION_HEADER} names unknown capability {key!r}")
    return MigrationAnnouncement(
        multifd_channels=multifd,
        postcopy=flags.get("postcopy", False),
        compress=compress,
        resume=flags.get("resume"),
    )


# -- Migrelay-Vm: what the destination VM must match -------------------------------------

#: What the source VM is (QEMU version, machine type, RAM size, devices), for a server
#: that checks the destination VM against it before a byte moves.
VM_HEADER: Final = "Migrelay-Vm"
#: The longest `VM_HEADER` value accepted. Far below the handshake's 16 KiB head limit;
#: a VM with a dozen devices announces about 400 characters. A source whose device list
#: would not fit sends none of it (`VM_DEVICES_OMITTED`).
MAX_VM_HEADER_CHARS: Final = 4096
#: Most devices a `VM_HEADER` value lists.
MAX_VM_DEVICES: Final = 64
#: The ``devices`` value of a source that lists none of its devices (more than
#: `MAX_VM_DEVICES`, a longer value than `MAX_VM_HEADER_CHARS`, a name the header cannot
#: carry): the destination then does not compare devices. It has no ``:``, so no device
#: item can be mistaken for it.
VM_DEVICES_OMITTED: Final = "omitted"
#: A device's id: QEMU's own rule for ids (``id_wellformed``: a letter, then letters,
#: digits, ``-``, ``.``, ``_``), at most 64 characters here.
DEVICE_ID_RE: Final = DISK_ID_RE
#: A QOM type name, a machine's (``pc-i440fx-7.2``) or a device's (``virtio-net-pci``):
#: the characters QEMU's type names use, at most 64 of them.
TYPE_NAME_RE: Final = re.compile(r"[A-Za-z0-9_.,+-]{1,64}")
#: QEMU's version as ``query-version`` gives it: ``MAJOR.MINOR.MICRO``.
QEMU_VERSION_RE: Final = re.compile(r"[0-9]{1,6}\.[0-9]{1,6}\.[0-9]{1,6}")
#: The keys of a `VM_HEADER` value, each exactly once, in the order the source sends them.
_VM_KEYS: Final = ("qemu", "machine", "ram", "devices")


@dataclass(frozen=True, slots=True)
class VmAnnouncement:
    """What a `VM_HEADER` announces: the facts of the source VM the destination must share.

    Attributes:
        qemu: QEMU's version, ``MAJOR.MINOR.MICRO``.
        machine: the machine type QEMU resolved (``pc-i440fx-7.2`` for ``-machine pc``).
        ram_bytes: the guest's RAM in bytes.
        devices: ``(id, type)`` of every device given an id, sorted; ``None`` when the
            source omitted them (`VM_DEVICES_OMITTED`).
    """

    qemu: str
    machine: str
    ram_bytes: int
    devices: tuple[tuple[str, str], ...] | None


def format_vm_header(
    qemu: str, machine: str, ram_bytes: int, devices: Iterable[tuple[str, str]] | None
) -> str:
    """The `VM_HEADER` value: ``qemu=7.2.22; machine=pc-i440fx-7.2; ram=67108864;
    devices=disk0:virtio-blk-pci net0:virtio-net-pci`` (all four keys always).

    ``;`` and spaces separate, as neither occurs in a version, a type name or a device
    id. Devices that cannot all be listed (more than `MAX_VM_DEVICES`, a name outside
    `DEVICE_ID_RE` / `TYPE_NAME_RE`, a value longer than `MAX_VM_HEADER_CHARS`) are all
    left out: ``devices=omitted``. A partial list would make the destination refuse a
    VM that matches.

    Raises:
        ValueError: the version, the machine type or the RAM size cannot be sent.
    """
    if QEMU_VERSION_RE.fullmatch(qemu) is None:
        raise ValueError(f"qemu version {qemu[:40]!r} is not MAJOR.MINOR.MICRO")
    if TYPE_NAME_RE.fullmatch(machine) is None:
        raise ValueError(f"machine type {machine[:80]!r} is not a type name")
    if not 0 < ram_bytes < 2**63:
        raise ValueError(f"ram size {ram_bytes} out of range")
    head = f"qemu={qemu}; machine={machine}; ram={ram_bytes}; devices="
    listed = _format_devices(devices)
    if listed is None or len(head) + len(listed) > MAX_VM_HEADER_CHARS:
        listed = VM_DEVICES_OMITTED
    return head + listed


def _format_devices(devices: Iterable[tuple[str, str]] | None) -> str | None:
    """``id:type id:type …`` sorted, or None when they cannot all be listed."""
    if devices is None:
        return None
    items = sorted(devices)
    if len(items) > MAX_VM_DEVICES or len({device for device, _ in items}) != len(items):
        return None
    for device, kind in items:
        if DEVICE_ID_RE.fullmatch(device) is None or TYPE_NAME_RE.fullmatch(kind) is None:
            return None
    return " ".join(f"{device}:{kind}" for device, kind in items)


def parse_vm_header(value: str) -> VmAnnouncement:
    """Parse a `VM_HEADER` value (`format_vm_header`'s form).

    Spaces around items, keys and values are accepted; between devices exactly one
    space. An unknown key is refused rather than ignored, as in `parse_migration_header`:
    a fact this version cannot compare must not pass for one it compared.

    Raises:
        ValueError: malformed, a key unknown, missing or repeated, a device repeated or
            more than `MAX_VM_DEVICES`; the message never repeats more than a short
            piece of the value.
    """
    if len(value) > MAX_VM_HEADER_CHARS:
        raise ValueError(f"{VM_HEADER} longer than {MAX_VM_HEADER_CHARS} characters")
    fields: dict[str, str] = {}
    for item in value.split(";"):
        key, sep, text = (part.strip() for part in item.partition("="))
        if not sep:
            raise ValueError(f"{VM_HEADER} item {item.strip()[:80]!r} is not key=value")
        if key not in _VM_KEYS:
            raise ValueError(f"{VM_HEADER} names unknown key {key[:40]!r}")
        if key in fields:
            raise ValueError(f"{VM_HEADER} names {key} twice")
        fields[key] = text
    if missing := [key for key in _VM_KEYS if key not in fields]:
        raise ValueError(f"{VM_HEADER} lacks {', '.join(missing)}")
    qemu, machine, ram = fields["qemu"], fields["machine"], fields["ram"]
    if QEMU_VERSION_RE.fullmatch(qemu) is None:
        raise ValueError(f"{VM_HEADER} qemu {qemu[:40]!r} is not MAJOR.MINOR.MICRO")
    if TYPE_NAME_RE.fullmatch(machine) is None:
        raise ValueError(f"{VM_HEADER} machine {machine[:80]!r} is not a type name")
    # The length check comes first: int() of a 10 000-digit string is slow, then refused.
    if len(ram) > _MAX_SIZE_DIGITS or _ASCII_DIGITS_RE.fullmatch(ram) is None:
        raise ValueError(f"{VM_HEADER} ram {ram[:40]!r} is not a number of bytes")
    ram_bytes = int(ram)
    if not 0 < ram_bytes < 2**63:
        raise ValueError(f"{VM_HEADER} ram {ram_bytes} out of range")
    return VmAnnouncement(qemu, machine, ram_bytes, _parse_devices(fields["devices"]))


def _parse_devices(text: str) -> tuple[tuple[str, str], ...] | None:
    if text == VM_DEVICES_OMITTED:
        return None
    if not text:
        return ()
    items = text.split(" ")
    if len(items) > MAX_VM_DEVICES:
        raise ValueError(f"{VM_HEADER} names more than {MAX_VM_DEVICES} devices")
    devices: dict[str, str] = {}
    for item in items:
        device, sep, kind = item.partition(":")
        if (
            not sep
            or DEVICE_ID_RE.fullmatch(device) is None
            or TYPE_NAME_RE.fullmatch(kind) is None
        ):
            raise ValueError(f"{VM_HEADER} device {item[:80]!r} is not id:type")
        if device in devices:
            raise ValueError(f"{VM_HEADER} names device {device} twice")
        devices[device] = kind
    return tuple(sorted(devices.items()))
