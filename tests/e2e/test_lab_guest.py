"""The lab's boot-sector guests (`migrelay.lab.guest`) and RAM contents
(`migrelay.lab.vm.RAM_CONTENTS`), on real QEMU with small RAM.

The guests are the bench's workloads: what they must do is dirty the pages asked, at
about the rate asked. The RAM contents are its compression cases: text must compress as
text does, and contain no zero page (QEMU sends those as headers, whatever the codec).
"""

from __future__ import annotations

import asyncio
import shutil
import struct
import subprocess
import time
import zlib
from pathlib import Path

import pytest

from migrelay.control.qmp import QMP
from migrelay.lab.guest import (
    BOOT_CODE,
    COUNTER_ADDRESS,
    FLOPPY_BYTES,
    IMMEDIATE_OFFSETS,
    PAGE_BYTES,
    PIT_TICKS_PER_S,
    boot_code,
    dirty_rate_pages_per_tick,
    dirtying_guest,
    floppy_args,
    guest_counter,
    reset_guest_counter,
)
from migrelay.lab.vm import ZERO_RAM_RANDOM_PAGE_EVERY, DisposableVM
from migrelay.units import MIB
from tests.helpers import FACTOR
from tests.loops import AsyncRunner

#: Booting through SeaBIOS under TCG takes a moment on a busy machine.
BOOT_TIMEOUT_S = 30.0 * FACTOR


def _immediate(code: bytes, name: str) -> int:
    value: int = struct.unpack_from("<I", code, IMMEDIATE_OFFSETS[name])[0]
    return value


def test_immediate_offsets_hold_the_default_parameters() -> None:
    # The offsets name the bytes the assembly listing's defaults were assembled into.
    assert _immediate(BOOT_CODE, "start") == 0x100000
    assert _immediate(BOOT_CODE, "end") == 0x500000
    assert _immediate(BOOT_CODE, "pages_per_tick") == 0
    assert boot_code() == BOOT_CODE


def test_boot_code_patches_only_the_immediates() -> None:
    code = boot_code(start=16 * MIB, size=64 * MIB, pages_per_tick=300)
    assert _immediate(code, "start") == 16 * MIB
    assert _immediate(code, "end") == 80 * MIB
    assert _immediate(code, "pages_per_tick") == 300
    patched = {i for offset in IMMEDIATE_OFFSETS.values() for i in range(offset, offset + 4)}
    assert all(code[i] == BOOT_CODE[i] for i in range(len(BOOT_CODE)) if i not in patched)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"start": 0x7000}, "start"),
        ({"start": MIB + 1}, "start"),
        ({"size": 0}, "size"),
        ({"size": 5000}, "size"),
        ({"start": 3 << 30, "size": 1 << 30}, "4 GiB"),
        ({"pages_per_tick": 0}, "pages per tick"),
    ],
)
def test_boot_code_refuses_parameters_out_of_range(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        boot_code(**kwargs)


def test_dirtying_guest_writes_a_bootable_floppy(tmp_path: Path) -> None:
    data = dirtying_guest(tmp_path / "g.img", size=8 * MIB, pages_per_tick=5).read_bytes()
    assert len(data) == FLOPPY_BYTES
    assert data[510:512] == b"\x55\xaa"
    assert data[: len(BOOT_CODE)] == boot_code(size=8 * MIB, pages_per_tick=5)


def test_dirty_rate_pages_per_tick_inverts_the_tick_rate() -> None:
    rate = 20 * MIB
    pages = dirty_rate_pages_per_tick(rate)
    assert pages * PAGE_BYTES * PIT_TICKS_PER_S == pytest.approx(rate, rel=0.01)
    assert dirty_rate_pages_per_tick(1) == 1
    with pytest.raises(ValueError, match="positive"):
        dirty_rate_pages_per_tick(0)


def test_reset_guest_counter_zeroes_only_the_counter(tmp_path: Path) -> None:
    ram = tmp_path / "src.ram"
    ram.write_bytes(b"\xff" * (2 * PAGE_BYTES))
    reset_guest_counter(ram)
    assert guest_counter(ram) == 0
    data = ram.read_bytes()
    assert len(data) == 2 * PAGE_BYTES
    assert data.count(0) == 4 and data[COUNTER_ADDRESS : COUNTER_ADDRESS + 4] == bytes(4)


async def _running_guest(vm: DisposableVM) -> tuple[QMP, int]:
    """Start the guest and wait until its counter climbs; return QMP and a counter read."""
    qmp = QMP(vm.name)
    await qmp.connect(str(vm.qmp_path))
    await qmp.execute("cont")
    deadline = time.monotonic() + BOOT_TIMEOUT_S
    # Random bytes until the guest's first pass: wait for a small value that then grows.
    while not 1 <= (first := guest_counter(vm.ram_path)) < 1 << 16:
        assert time.monotonic() < deadline, "the guest did not start its loop"
        await asyncio.sleep(0.05)
    while (counter := guest_counter(vm.ram_path)) <= first:
        assert time.monotonic() < deadline, "the guest's counter stopped"
        await asyncio.sleep(0.01)
    return qmp, counter


@pytest.mark.e2e
def test_dirtying_guest_writes_its_counter_into_every_page_of_its_range(
    run_e2e: AsyncRunner, sock_dir: Path
) -> None:
    start, size = 2 * MIB, 3 * MIB
    image = dirtying_guest(sock_dir / "g.img", start=start, size=size)
    vm = DisposableVM(sock_dir, "guest", 8 * MIB, extra_args=floppy_args(image))

    async def scenario() -> None:
        async with vm:
            qmp, _ = await _running_guest(vm)
            await qmp.execute("stop")
            counter = guest_counter(vm.ram_path)
            await qmp.close()
            ram = vm.ram_path.read_bytes()
        values = [
            struct.unpack_from("<I", ram, offset)[0]
            for offset in range(start, start + size, PAGE_BYTES)
        ]
        # Stopped mid-pass: pages hold this pass's counter or the one before.
        assert set(values) <= {counter, counter - 1}, sorted(set(values))[:5]
        # Outside the range the random RAM is untouched (the BIOS writes below 1 MiB).
        outside = ram[start + size : start + size + MIB]
        assert len(set(outside[i : i + 4] for i in range(0, MIB, PAGE_BYTES))) > 200
        assert struct.unpack_from("<I", ram, COUNTER_ADDRESS)[0] == counter

    run_e2e(scenario())


#: Requested: 32 pages per tick, about 2.4 MB/s; 256 pages make a pass of 8 ticks, so
#: about 2.3 passes a second and 7 in the 3 s measured.
RATE_PAGES_PER_TICK = 32
RATE_SIZE_BYTES = 1 * MIB
RATE_MEASURE_S = 3.0


@pytest.mark.e2e
def test_rate_limited_guest_dirties_about_the_requested_rate(
    run_e2e: AsyncRunner, sock_dir: Path
) -> None:
    image = dirtying_guest(
        sock_dir / "g.img", size=RATE_SIZE_BYTES, pages_per_tick=RATE_PAGES_PER_TICK
    )
    vm = DisposableVM(sock_dir, "guest", 4 * MIB, extra_args=floppy_args(image))
    requested = RATE_PAGES_PER_TICK * PAGE_BYTES * PIT_TICKS_PER_S

    async def scenario() -> float:
        async with vm:
            qmp, first = await _running_guest(vm)
            began = time.monotonic()
            await asyncio.sleep(RATE_MEASURE_S)
            last = guest_counter(vm.ram_path)
            elapsed = time.monotonic() - began
            await qmp.close()
        return (last - first) * RATE_SIZE_BYTES / elapsed

    measured = run_e2e(scenario())
    print(f"\nDIRTY RATE: requested {requested / MIB:.2f} MiB/s, measured {measured / MIB:.2f}")
    # Loose: a pass is 1/7 of the window, and a loaded host may make TCG miss ticks.
    assert requested / 2 < measured < requested * 1.5


@pytest.mark.e2e
def test_text_ram_compresses_and_has_no_zero_or_repeated_pages(
    run_e2e: AsyncRunner, sock_dir: Path
) -> None:
    vm = DisposableVM(sock_dir, "text", 16 * MIB, ram_content="text")

    async def scenario() -> None:
        async with vm:
            pass

    run_e2e(scenario())
    ram = vm.ram_path.read_bytes()
    assert len(ram) == 16 * MIB
    pages = [ram[i : i + PAGE_BYTES] for i in range(0, len(ram), PAGE_BYTES)]
    assert b"\x00" not in ram
    assert len(set(pages)) == len(pages)
    # zlib (stdlib) at level 1, as QEMU's multifd-zlib-level default is 1.
    zlib_ratio = len(ram) / len(zlib.compress(ram, 1))
    assert zlib_ratio >= 2.5, zlib_ratio
    if shutil.which("zstd"):  # installed here; QEMU's multifd-zstd-level default is 1
        compressed = subprocess.run(
            ["zstd", "-1", "-c"], input=ram, capture_output=True, check=True
        ).stdout
        assert 3 <= len(ram) / len(compressed) <= 5


@pytest.mark.e2e
def test_zero_ram_is_sparse_with_one_random_page_in_64(
    run_e2e: AsyncRunner, sock_dir: Path
) -> None:
    vm = DisposableVM(sock_dir, "zero", 8 * MIB, ram_content="zero")

    async def scenario() -> None:
        async with vm:
            pass

    run_e2e(scenario())
    ram = vm.ram_path.read_bytes()
    pages = [ram[i : i + PAGE_BYTES] for i in range(0, len(ram), PAGE_BYTES)]
    nonzero = [i for i, page in enumerate(pages) if page.count(0) != PAGE_BYTES]
    # QEMU's BIOS set-up writes nothing into a stopped (-S) VM's RAM.
    assert nonzero == list(range(0, len(pages), ZERO_RAM_RANDOM_PAGE_EVERY))
    assert vm.ram_path.stat().st_blocks * 512 < len(ram) // 4


@pytest.mark.e2e
def test_reused_ram_file_is_rewritten_when_the_content_differs(
    run_e2e: AsyncRunner, sock_dir: Path, tmp_path: Path
) -> None:
    def vm(content: str) -> DisposableVM:
        return DisposableVM(
            sock_dir, "src", 4 * MIB, reuse_ram=True, ram_content=content, ram_dir=tmp_path
        )

    async def start_and_stop(machine: DisposableVM) -> None:
        async with machine:
            pass

    first = vm("text")
    assert first.ram_path == tmp_path / "src.ram"
    run_e2e(start_and_stop(first))
    text_mtime = first.ram_path.stat().st_mtime_ns
    run_e2e(start_and_stop(vm("text")))  # same content: kept
    assert first.ram_path.stat().st_mtime_ns == text_mtime
    run_e2e(start_and_stop(vm("random")))  # another: written again
    assert b"ram block" not in first.ram_path.read_bytes()[:64]
    assert first.ram_content_path.read_text() == "random\n"
