"""The ``Migrelay-*`` handshake headers (`migrelay.core.headers`): good, bad and hostile values."""

from __future__ import annotations

import pytest

from migrelay.core.headers import (
    CHANNEL_HEADER,
    MAX_CHANNEL,
    MAX_DISKS,
    MAX_VM_DEVICES,
    MAX_VM_HEADER_CHARS,
    MIGRATION_HEADER,
    SESSION_HEADER,
    STORAGE_HEADER,
    VM_HEADER,
    ChannelLabel,
    MigrationAnnouncement,
    VmAnnouncement,
    channel_headers,
    format_migration_header,
    format_storage_header,
    format_vm_header,
    parse_channel,
    parse_channel_label,
    parse_migration_header,
    parse_session_id,
    parse_storage_header,
    parse_vm_header,
)


def test_header_names_are_spelled_once_here() -> None:
    assert (SESSION_HEADER, CHANNEL_HEADER, MIGRATION_HEADER) == (
        "Migrelay-Session",
        "Migrelay-Channel",
        "Migrelay-Migration",
    )


# -- Migrelay-Channel -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "number"),
    [("0", 0), ("1", 1), ("9", 9), ("10", 10), ("255", 255), (str(MAX_CHANNEL - 1), 255)],
)
def test_channel_numbers_in_range_are_accepted(value: str, number: int) -> None:
    assert parse_channel(value) == number


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("", id="empty"),
        pytest.param("256", id="max_channel"),
        pytest.param("1000", id="four_digits"),
        pytest.param("9" * 5000, id="huge"),
        pytest.param("-1", id="negative"),
        pytest.param("+1", id="plus_sign"),
        pytest.param("-0", id="negative_zero"),
        pytest.param("01", id="leading_zero"),
        pytest.param("00", id="double_zero"),
        pytest.param(" 1", id="leading_space"),
        pytest.param("1 ", id="trailing_space"),
        pytest.param("1 2", id="inner_space"),
        pytest.param("1\t", id="tab"),
        pytest.param("1_0", id="underscore"),
        pytest.param("0x1", id="hex"),
        pytest.param("1.0", id="decimal_point"),
        pytest.param("x", id="letter"),
        # str.isdigit() accepts these; int() refuses the first and reads the others.
        pytest.param("\xb2", id="superscript_two_latin1"),
        pytest.param("\u0663", id="arabic_indic_three"),
        pytest.param("\uff11", id="fullwidth_one"),
        pytest.param("1\x00", id="nul"),
        pytest.param("1\r\n", id="crlf"),
    ],
)
def test_channel_values_other_than_plain_ascii_numbers_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match=f"^invalid {CHANNEL_HEADER}$"):
        parse_channel(value)


# -- Migrelay-Session --------------------------------------------------------------------


@pytest.mark.parametrize("value", ["s1", "3f2a9c0d1e4b5a67", "a-b_C", "x" * 64])
def test_session_ids_are_accepted(value: str) -> None:
    assert parse_session_id(value) == value


@pytest.mark.parametrize(
    "value", ["", "x" * 65, "../x", "a b", "a/b", "a.b", "\xe9", "\u0661", "s1\n"]
)
def test_bad_session_ids_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match=f"^invalid {SESSION_HEADER}$"):
        parse_session_id(value)


def test_channel_headers_round_trip_through_the_parsers() -> None:
    headers = dict(channel_headers("3f2a9c0d1e4b5a67", 7))
    assert headers == {SESSION_HEADER: "3f2a9c0d1e4b5a67", CHANNEL_HEADER: "7"}
    assert parse_session_id(headers[SESSION_HEADER]) == "3f2a9c0d1e4b5a67"
    assert parse_channel(headers[CHANNEL_HEADER]) == 7


# -- Migrelay-Migration ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("multifd", "postcopy", "text"),
    [
        (None, False, "multifd=0,postcopy=0"),
        (0, False, "multifd=0,postcopy=0"),
        (4, False, "multifd=4,postcopy=0"),
        (None, True, "multifd=0,postcopy=1"),
        (255, True, "multifd=255,postcopy=1"),
    ],
)
def test_migration_header_spells_both_keys_and_round_trips(
    multifd: int | None, postcopy: bool, text: str
) -> None:
    assert format_migration_header(multifd, postcopy) == text
    assert parse_migration_header(text) == MigrationAnnouncement(multifd or None, postcopy)


def test_no_migration_header_means_the_defaults() -> None:
    assert parse_migration_header(None) == MigrationAnnouncement(None, False)


def test_spaces_around_items_are_accepted() -> None:
    assert parse_migration_header(" multifd = 2 , postcopy=1 ") == MigrationAnnouncement(2, True)


def test_a_repeated_key_takes_the_last_value() -> None:
    # As the control plane's parser always did: keys are applied in order.
    assert parse_migration_header("multifd=2,multifd=0") == MigrationAnnouncement(None, False)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "'' is not key=number"),
        ("multifd", "'multifd' is not key=number"),
        ("multifd=", "'multifd=' is not key=number"),
        ("multifd=four", "'multifd=four' is not key=number"),
        ("multifd=-1", "'multifd=-1' is not key=number"),
        ("multifd=+1", r"'multifd=\+1' is not key=number"),
        ("multifd=\xb2", "'multifd=\xb2' is not key=number"),
        ("multifd=\u0663", "'multifd=\u0663' is not key=number"),
        ("multifd=4,", "'' is not key=number"),
        ("multifd=4,compress=1", "unknown compression '1'"),
        ("multifd=4,compress=lz4", "unknown compression 'lz4'"),
        ("multifd=4,compress", "'compress' is not key=number"),
        ("multifd=4,xbzrle=1", "unknown capability 'xbzrle'"),
        ("resume=2", "resume must be 0 or 1, not 2"),
        ("MULTIFD=4", "unknown capability 'MULTIFD'"),
        ("postcopy=2", "postcopy must be 0 or 1, not 2"),
        ("multifd=256", "multifd channels must be 1..255, got 256"),
        ("multifd=1," * 40, "longer than 200 characters"),
    ],
)
def test_a_bad_migration_header_is_refused_with_the_reason(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_migration_header(value)


@pytest.mark.parametrize(
    ("compress", "resume", "value"),
    [
        (None, None, "multifd=2,postcopy=0"),
        ("zstd", None, "multifd=2,postcopy=0,compress=zstd"),
        ("zlib", True, "multifd=2,postcopy=0,compress=zlib,resume=1"),
        (None, False, "multifd=2,postcopy=0,resume=0"),
    ],
)
def test_compression_and_resume_are_announced_only_when_set(
    compress: str | None, resume: bool | None, value: str
) -> None:
    # Only when set: a source that uses neither must still be understood by a server
    # from before they existed.
    assert format_migration_header(2, False, compress=compress, resume=resume) == value
    assert parse_migration_header(value) == MigrationAnnouncement(2, False, compress, resume)
    assert parse_migration_header(" compress = zstd , multifd=3 ") == MigrationAnnouncement(
        3, False, "zstd"
    )


@pytest.mark.parametrize("multifd", [-1, 256])
def test_formatting_an_impossible_channel_count_is_refused(multifd: int) -> None:
    with pytest.raises(ValueError, match=f"multifd channels must be 1..255, got {multifd}"):
        format_migration_header(multifd, False)


# -- storage: Migrelay-Channel: storage-N and Migrelay-Storage ---------------------------


def test_a_storage_channel_label_is_not_a_channel_number() -> None:
    # A server from before storage refuses it (400) instead of sending NBD to QEMU's
    # migration socket: the label must fail the old, strict number parser.
    assert STORAGE_HEADER == "Migrelay-Storage"
    headers = dict(channel_headers("s1", ChannelLabel(3, storage=True)))
    assert headers == {SESSION_HEADER: "s1", CHANNEL_HEADER: "storage-3"}
    with pytest.raises(ValueError):
        parse_channel(headers[CHANNEL_HEADER])
    assert parse_channel_label("storage-3") == ChannelLabel(3, storage=True)
    assert str(ChannelLabel(3, storage=True)) == "storage-3"
    assert parse_channel_label("3") == ChannelLabel(3)
    assert str(ChannelLabel(3)) == "3"


@pytest.mark.parametrize(
    "value",
    [
        "storage-",
        "storage-01",
        f"storage-{MAX_DISKS}",
        "storage--1",
        "Storage-0",
        "storage-٣",
        "nbd-0",
    ],
)
def test_bad_storage_channel_labels_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="invalid Migrelay-Channel"):
        parse_channel_label(value)


def test_storage_header_round_trips_in_order() -> None:
    disks = {"disk1": 64 << 20, "disk0": 1 << 30, "vd-a.b_c": 0}
    value = format_storage_header(disks)
    assert value == "disk1=67108864,disk0=1073741824,vd-a.b_c=0"
    parsed = parse_storage_header(value)
    assert parsed == disks
    assert list(parsed) == ["disk1", "disk0", "vd-a.b_c"]
    assert parse_storage_header(" disk0 = 5 , disk1=6 ") == {"disk0": 5, "disk1": 6}


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "is not disk=bytes"),
        ("disk0", "is not disk=bytes"),
        ("disk0=", "is not disk=bytes"),
        ("disk0=-1", "is not disk=bytes"),
        ("disk0=1e9", "is not disk=bytes"),
        ("disk0=²", "is not disk=bytes"),
        ("0disk=5", "is not disk=bytes"),
        ("/machine/peripheral/disk0=5", "is not disk=bytes"),
        ("disk0=" + "9" * 20, "is not disk=bytes"),
        ("disk0=1,disk0=2", "names disk disk0 twice"),
        (",".join(f"d{n}=1" for n in range(MAX_DISKS + 1)), f"more than {MAX_DISKS} disks"),
        ("d=1," * 5000, "too long"),
    ],
)
def test_a_bad_storage_header_is_refused_with_the_reason(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_storage_header(value)
    assert len(str(info.value)) < 200  # never the whole hostile value


@pytest.mark.parametrize(
    "disks",
    [
        {},
        {"0disk": 1},
        {"disk0": -1},
        {"disk0": 1 << 63},
        {f"d{n}": 1 for n in range(MAX_DISKS + 1)},
    ],
)
def test_formatting_an_impossible_storage_header_is_refused(disks: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        format_storage_header(disks)


# -- Migrelay-Vm: what the destination VM must match --------------------------------------

#: A VM as QEMU 7.2 describes it: -machine pc, 64 MiB, a disk and a CD-ROM with ids.
VM_DEVICES = (("disk0", "virtio-blk-pci"), ("cd0", "ide-cd"))
VM_VALUE = (
    "qemu=7.2.22; machine=pc-i440fx-7.2; ram=67108864; devices=cd0:ide-cd disk0:virtio-blk-pci"
)


def test_vm_header_lists_devices_sorted_and_round_trips() -> None:
    assert VM_HEADER == "Migrelay-Vm"
    value = format_vm_header("7.2.22", "pc-i440fx-7.2", 64 << 20, VM_DEVICES)
    assert value == VM_VALUE
    assert parse_vm_header(value) == VmAnnouncement(
        "7.2.22", "pc-i440fx-7.2", 64 << 20, (("cd0", "ide-cd"), ("disk0", "virtio-blk-pci"))
    )
    # No device with an id: an empty list, which is not "omitted".
    empty = format_vm_header("8.1.0", "pc-q35-8.1", 1 << 30, ())
    assert empty == "qemu=8.1.0; machine=pc-q35-8.1; ram=1073741824; devices="
    assert parse_vm_header(empty).devices == ()
    # Spaces around items, keys and values; keys in any order.
    spaced = " devices = cd0:ide-cd ;ram=5 ; machine = pc ; qemu=7.2.0 "
    assert parse_vm_header(spaced) == VmAnnouncement("7.2.0", "pc", 5, (("cd0", "ide-cd"),))


@pytest.mark.parametrize(
    "devices",
    [
        None,
        [(f"d{n}", "virtio-blk-pci") for n in range(MAX_VM_DEVICES + 1)],
        # Names the header cannot carry: all are left out, never some of them.
        [("disk0", "virtio-blk-pci"), ("0bad", "ide-cd")],
        [("disk0", "virtio blk")],
        [("disk0", "a:b")],
        [("disk0", "ide-cd"), ("disk0", "ide-hd")],
        # Within the count, but past the length bound.
        [(f"d{n}" + "x" * 60, "t" * 64) for n in range(MAX_VM_DEVICES)],
    ],
    ids=["unknown", "too-many", "bad-id", "space-in-type", "colon-in-type", "twice", "too-long"],
)
def test_devices_the_header_cannot_carry_are_all_omitted(
    devices: list[tuple[str, str]] | None,
) -> None:
    value = format_vm_header("7.2.22", "pc-i440fx-7.2", 64 << 20, devices)
    assert value.endswith("; devices=omitted")
    assert len(value) <= MAX_VM_HEADER_CHARS
    assert parse_vm_header(value).devices is None


def test_the_most_devices_that_fit_are_all_listed() -> None:
    devices = [(f"d{n:02}", "virtio-blk-pci") for n in range(MAX_VM_DEVICES)]
    parsed = parse_vm_header(format_vm_header("7.2.22", "pc", 1 << 20, devices))
    assert parsed.devices == tuple(devices)


@pytest.mark.parametrize(
    ("qemu", "machine", "ram"),
    [
        ("7.2", "pc", 1),
        ("7.2.22-rc1", "pc", 1),
        ("7.2.22", "", 1),
        ("7.2.22", "pc q35", 1),
        ("7.2.22", "pc;ram=1", 1),
        ("7.2.22", "m" * 65, 1),
        ("7.2.22", "pc", 0),
        ("7.2.22", "pc", 1 << 63),
    ],
)
def test_formatting_an_impossible_vm_header_is_refused(qemu: str, machine: str, ram: int) -> None:
    with pytest.raises(ValueError):
        format_vm_header(qemu, machine, ram, ())


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("", "'' is not key=value"),
        (VM_VALUE + ";", "'' is not key=value"),
        (VM_VALUE.replace("ram=", "ram"), "'ram67108864' is not key=value"),
        (VM_VALUE + "; cpu=host", "unknown key 'cpu'"),
        (VM_VALUE.replace("qemu=", "QEMU="), "unknown key 'QEMU'"),
        (VM_VALUE + "; ram=1", "names ram twice"),
        ("qemu=7.2.22; machine=pc; ram=1", "lacks devices"),
        ("devices=", "lacks qemu, machine, ram"),
        (VM_VALUE.replace("7.2.22", "7.2"), "qemu '7.2' is not MAJOR.MINOR.MICRO"),
        (VM_VALUE.replace("7.2.22", "7.\u0662.22"), "is not MAJOR.MINOR.MICRO"),
        (VM_VALUE.replace("7.2.22", "1234567.2.22"), "is not MAJOR.MINOR.MICRO"),
        (VM_VALUE.replace("pc-i440fx-7.2", "pc/i440fx"), "machine 'pc/i440fx' is not a type"),
        (VM_VALUE.replace("67108864", "64M"), "ram '64M' is not a number of bytes"),
        (VM_VALUE.replace("67108864", "-1"), "ram '-1' is not a number of bytes"),
        (VM_VALUE.replace("67108864", "\xb2"), "is not a number of bytes"),
        (VM_VALUE.replace("67108864", "9" * 20), "is not a number of bytes"),
        (VM_VALUE.replace("67108864", "0"), "ram 0 out of range"),
        (VM_VALUE.replace("67108864", str(1 << 63)), "out of range"),
        (VM_VALUE.replace("cd0:ide-cd ", "cd0:ide-cd  "), "device '' is not id:type"),
        (VM_VALUE.replace("cd0:ide-cd", "cd0"), "device 'cd0' is not id:type"),
        (VM_VALUE.replace("cd0:ide-cd", "cd0:"), "device 'cd0:' is not id:type"),
        (VM_VALUE.replace("cd0:ide-cd", "0cd:ide-cd"), "device '0cd:ide-cd' is not id:type"),
        (VM_VALUE.replace("cd0:ide-cd", "/machine/cd0:ide-cd"), "is not id:type"),
        (VM_VALUE.replace("cd0:ide-cd", "cd0:ide<cd>"), "is not id:type"),
        (VM_VALUE.replace("cd0:ide-cd", "cd0:\u0435de-cd"), "is not id:type"),
        (VM_VALUE.replace("cd0:ide-cd", "disk0:ide-cd"), "names device disk0 twice"),
        (
            VM_VALUE.replace("devices=", "devices=" + "d:t " * MAX_VM_DEVICES),
            f"more than {MAX_VM_DEVICES} devices",
        ),
        ("x" * (MAX_VM_HEADER_CHARS + 1), f"longer than {MAX_VM_HEADER_CHARS} characters"),
    ],
)
def test_a_bad_vm_header_is_refused_with_the_reason(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        parse_vm_header(value)
    assert str(info.value).startswith(VM_HEADER)  # how serve names the header it refuses
    assert len(str(info.value)) < 200  # never the whole hostile value
