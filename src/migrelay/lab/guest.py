"""Boot-sector guests that dirty their RAM at a chosen place and rate.

A test VM has no guest (DESIGN §7), so its RAM never changes while it migrates. To
measure what a busy guest costs (pages sent again, passes, throttling), a VM boots from
a floppy whose 512-byte boot sector is one of these guests: it enables A20, enters 32-bit
protected mode with a flat GDT and then loops forever, writing its pass counter into one
dword of every 4 KiB page of ``[start, start + size)`` and the counter itself at
guest-physical `COUNTER_ADDRESS`. Nothing is downloaded or compiled at run time: the
machine code is stored below as bytes, and the parameters are patched into its 32-bit
immediates (`IMMEDIATE_OFFSETS`).

Rate limit: with ``pages_per_tick`` the guest writes at most that many pages per tick
of the PC's interval timer (8254 channel 0), so it dirties about
``pages_per_tick * 4096 * PIT_TICKS_PER_S`` bytes a second whatever the speed of TCG.
The guest programs channel 0 itself (mode 2, count 65536: one tick is 65536 / 1193182 s,
about 54.9 ms). SeaBIOS leaves it in mode 3, where QEMU's counter steps by 2 and wraps
twice per period (``hw/timer/i8254_common.c``), which would double the rate. Interrupts
stay disabled: the guest polls the counter (latch with ``out 0x43``, read port 0x40
twice) and takes its going *up* for a wrap, one tick.

Use::

    image = dirtying_guest(workdir / "guest.img", size=64 * MIB, pages_per_tick=100)
    vm = DisposableVM(workdir, "src", 128 * MIB, extra_args=floppy_args(image))

The guest RAM must reach ``start + size``: the guest writes there, and QEMU would give
it nothing at those addresses (writes to unassigned memory are dropped silently).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Final

from migrelay.units import MIB

__all__ = [
    "BOOT_CODE",
    "COUNTER_ADDRESS",
    "FLOPPY_BYTES",
    "IMMEDIATE_OFFSETS",
    "PAGE_BYTES",
    "PIT_TICKS_PER_S",
    "boot_code",
    "dirty_rate_pages_per_tick",
    "dirtying_guest",
    "floppy_args",
    "floppy_image",
    "guest_counter",
    "reset_guest_counter",
]

#: Guest-physical address of the pass counter (free low memory after the BIOS data area).
COUNTER_ADDRESS: Final = 0x500
#: The page the guest dirties, one dword each (x86's base page).
PAGE_BYTES: Final = 4096
#: Size of the floppy image: a 1.44 MB disk, which SeaBIOS boots without a partition table.
FLOPPY_BYTES: Final = 1_474_560
#: The 8254's input clock (Hz) and the ticks per second of a count of 65536 (about 18.2).
PIT_HZ: Final = 1_193_182
PIT_TICKS_PER_S: Final = PIT_HZ / 65536
#: Lowest address the guest may dirty: below 1 MiB are its own code (0x7c00), the BIOS
#: data area, the counter and the BIOS.
MIN_START: Final = 1 * MIB

#: The boot sector's code with the default parameters (1 MiB to 5 MiB, no rate limit),
#: 174 bytes assembled with GNU as (``as --32``; ``ld -m elf_i386 -Ttext=0x7c00 --oformat
#: binary``) from::
#:
#:     .code16
#:         cli; xor %ax,%ax; mov %ax,%ds; mov %ax,%ss; mov $0x7c00,%sp
#:         in $0x92,%al; or $2,%al; out %al,$0x92        # fast A20
#:         lgdtl gdtr
#:         mov %cr0,%eax; or $1,%eax; mov %eax,%cr0       # protected mode
#:         ljmpl $0x08,$pm
#:     .code32
#:     pm: mov $0x10,%ax; mov %ax,%ds; mov %ax,%es; mov %ax,%ss; mov $0x7c00,%esp
#:         mov $0x34,%al; out %al,$0x43                   # PIT ch0: lo/hi byte, mode 2
#:         xor %al,%al; out %al,$0x40; out %al,$0x40      # count 0 = 65536
#:         xor %ecx,%ecx                                  # pass counter
#:         mov $1,%ebx                                    # budget: wait a tick first
#:     outer: inc %ecx; mov %ecx,0x500
#:     start_imm: mov $0x100000,%edi                      # START
#:     inner: mov %ecx,(%edi); add $4096,%edi
#:         dec %ebx; jnz next                             # budget left in this tick
#:         call pit; mov %eax,%esi
#:     wait: call pit; cmp %esi,%eax; mov %eax,%esi; jbe wait   # until it wraps
#:     budget_imm: mov $0,%ebx                            # PAGES_PER_TICK (0: 2**32)
#:     next:
#:     end_imm: cmp $0x500000,%edi; jb inner              # START + SIZE
#:         jmp outer
#:     pit: xor %al,%al; out %al,$0x43                    # latch channel 0
#:         in $0x40,%al; mov %al,%ah; in $0x40,%al; xchg %al,%ah
#:         movzwl %ax,%eax; ret
#:     .p2align 3
#:     gdt: .quad 0, 0x00cf9a000000ffff, 0x00cf92000000ffff   # null, code, data (flat 4 GiB)
#:     gdtr: .word 23; .long gdt
#:
#: A budget of 0 is no limit: ``dec`` takes it to 2**32 - 1, so the guest waits for one
#: tick (at most 55 ms) every 2**32 pages.
BOOT_CODE: Final = bytes.fromhex(
    "fa31c08ed88ed0bc007ce4920c02e692660f0116a87c0f20c06683c8010f22c066ea287c00000800"
    "66b810008ed88ec08ed0bc007c0000b034e64330c0e640e64031c9bb0100000041890d00050000bf"
    "00001000890f81c7001000004b7517e81c00000089c6e81500000039f089c676f5bb0000000081ff"
    "0000500072d6ebc830c0e643e44088c4e44086c40fb7c0c30000000000000000ffff0000009acf00"
    "ffff00000092cf001700907c0000"
)

#: Where in `BOOT_CODE` each parameter's little-endian 32-bit immediate sits (the byte
#: after the opcode at ``start_imm``, ``budget_imm``, and after ``81 ff`` at ``end_imm``).
IMMEDIATE_OFFSETS: Final = {"start": 0x50, "pages_per_tick": 0x72, "end": 0x78}


def boot_code(
    *, start: int = MIN_START, size: int = 4 * MIB, pages_per_tick: int | None = None
) -> bytes:
    """Return the guest's machine code with these parameters patched in.

    Args:
        start: first guest-physical byte dirtied; a multiple of 4 KiB, at least 1 MiB.
        size: bytes dirtied from ``start``; a positive multiple of 4 KiB, ending below
            4 GiB (the guest has 32-bit addresses).
        pages_per_tick: write at most this many pages per timer tick (1/18.2 s);
            ``None``: as fast as the CPU (TCG) goes.

    Raises:
        ValueError: a parameter out of range.
    """
    if start % PAGE_BYTES or start < MIN_START:
        raise ValueError(f"start must be a multiple of 4096 and at least 1 MiB, got {start}")
    if size <= 0 or size % PAGE_BYTES or start + size >= 1 << 32:
        raise ValueError(
            f"size must be a positive multiple of 4096 ending below 4 GiB, got {size}"
        )
    if pages_per_tick is not None and not 1 <= pages_per_tick < 1 << 32:
        raise ValueError(f"pages per tick must be at least 1, got {pages_per_tick}")
    code = bytearray(BOOT_CODE)
    for name, value in (
        ("start", start),
        ("end", start + size),
        ("pages_per_tick", pages_per_tick or 0),
    ):
        struct.pack_into("<I", code, IMMEDIATE_OFFSETS[name], value)
    return bytes(code)


def dirtying_guest(
    path: Path,
    *,
    start: int = MIN_START,
    size: int = 4 * MIB,
    pages_per_tick: int | None = None,
) -> Path:
    """Write a 1.44 MB floppy image whose boot sector dirties ``[start, start + size)``.

    Arguments as `boot_code`'s. Attach it with `floppy_args`; the VM's RAM must be at
    least ``start + size``.

    Returns:
        ``path``.

    Raises:
        ValueError: a parameter out of range.
    """
    sector = boot_code(start=start, size=size, pages_per_tick=pages_per_tick)
    sector = sector.ljust(510, b"\x00") + b"\x55\xaa"
    path.write_bytes(sector.ljust(FLOPPY_BYTES, b"\x00"))
    return path


def floppy_image(path: Path) -> Path:
    """Write the default guest (1 MiB to 5 MiB, no rate limit): `BOOT_CODE` as is."""
    return dirtying_guest(path)


def floppy_args(image: Path) -> tuple[str, ...]:
    """QEMU arguments that attach ``image`` as the floppy the BIOS boots from.

    Read-only: a source and a destination may share one image, and the guest never
    writes to it.
    """
    return ("-drive", f"file={image},if=floppy,format=raw,readonly=on")


def dirty_rate_pages_per_tick(rate_bytes_per_s: float) -> int:
    """The ``pages_per_tick`` that dirties about ``rate_bytes_per_s`` (at least 1).

    Raises:
        ValueError: a rate that is not positive.
    """
    if rate_bytes_per_s <= 0:
        raise ValueError(f"dirty rate must be positive, got {rate_bytes_per_s}")
    return max(1, round(rate_bytes_per_s / (PAGE_BYTES * PIT_TICKS_PER_S)))


def guest_counter(ram_path: Path) -> int:
    """Read the guest's pass counter from its RAM file (random bytes before it starts)."""
    with ram_path.open("rb") as file:
        file.seek(COUNTER_ADDRESS)
        value: int = struct.unpack("<I", file.read(4))[0]
        return value


def reset_guest_counter(ram_path: Path) -> None:
    """Zero the pass counter in a RAM file, before the guest runs.

    A reused RAM file holds the counter of the guest's last run: zeroed, the counter's
    first small value is this run's (QEMU maps the file shared, so the write reaches a
    paused guest's RAM).
    """
    with ram_path.open("r+b") as file:
        file.seek(COUNTER_ADDRESS)
        file.write(bytes(4))
