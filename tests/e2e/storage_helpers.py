"""Helpers of the storage migration e2e tests (``test_storage_migration.py``).

What a test needs around `migrelay.lab.disks` and `DisposableVM(disks=…)`: a second QMP
monitor on the source (``migrate --copy-storage`` holds the first one for the whole
migration), writes through it with HMP ``qemu-io``, the checks that nothing of
migrelay's is left on either side (block jobs, NBD nodes, exports), and the checks of
the images once both QEMUs have exited.
"""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from migrelay.control.qmp import QMP, RunState
from migrelay.control.storage import NBD_NODE_PREFIX
from migrelay.lab.disks import DiskSpec, compare_images, create_empty_image, qemu_io_command
from migrelay.lab.vm import DisposableVM
from tests.e2e.cli_helpers import Command
from tests.helpers import FACTOR

T = TypeVar("T")

#: Bytes of each HMP qemu-io write.
WRITE_BYTES = 64 * 1024
#: Bounded waits for what follows at once (an export removed after the session ended).
SETTLE_TIMEOUT_S = 30.0 * FACTOR
_POLL_S = 0.02


def second_monitor(path: Path) -> tuple[str, ...]:
    """QEMU arguments for one more QMP monitor at ``path`` (QEMU takes several ``-qmp``)."""
    return ("-qmp", f"unix:{path},server=on,wait=off")


async def poll(
    probe: Callable[[], Awaitable[T]],
    done: Callable[[T], bool],
    what: str,
    timeout_s: float = SETTLE_TIMEOUT_S,
    *,
    while_running: Command | None = None,
) -> T:
    """Call ``probe`` until ``done`` says yes of its result; fail after ``timeout_s``, or
    as soon as the command ``while_running`` has exited."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if done(value):
            return value
        if while_running is not None and while_running.popen.poll() is not None:
            raise AssertionError(
                f"no {what} before the command ended (last: {value!r}): {while_running.describe()}"
            )
        if time.monotonic() >= deadline:
            raise AssertionError(f"no {what} within {timeout_s:g} s (last: {value!r})")
        await asyncio.sleep(_POLL_S)


@dataclass(frozen=True)
class Write:
    """One qemu-io write to a disk of the source, to be found on the destination."""

    spec: DiskSpec
    offset: int
    pattern: int
    #: When it was made (``disk phase``, ``ram phase``), for messages.
    when: str


async def write(qmp: QMP, spec: DiskSpec, offset: int, pattern: int, when: str) -> Write:
    """Write ``WRITE_BYTES`` of ``pattern`` at ``offset`` of the disk through HMP qemu-io."""
    command = qemu_io_command(spec, f"write -P 0x{pattern:02x} {offset} {WRITE_BYTES}")
    reply = await qmp.human_monitor_command(command)
    assert reply == "", f"{command}: {reply}"
    return Write(spec, offset, pattern, when)


def check_written(log: str, writes: Sequence[Write]) -> None:
    """qemu-io says in the VM's log (its stdout) that each write happened."""
    for done in writes:
        line = f"wrote {WRITE_BYTES}/{WRITE_BYTES} bytes at offset {done.offset}"
        assert line in log, f"{done}: no {line!r} in the source's log:\n{log[-2000:]}"


def read_pattern(image: Path, spec: DiskSpec, offset: int, pattern: int) -> str:
    """What ``qemu-io read -P`` says of ``image`` at ``offset`` (blocking: a thread)."""
    result = subprocess.run(
        [
            "qemu-io",
            *("-r", "-U", "-f", spec.format),
            "-c",
            f"read -P 0x{pattern:02x} {offset} {WRITE_BYTES}",
            str(image),
        ],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=SETTLE_TIMEOUT_S,
        check=False,
    )
    return (result.stdout + result.stderr).strip()


async def check_writes_arrived(dst: DisposableVM, writes: Sequence[Write]) -> None:
    """Each write's pattern is on the destination's image, where it was written."""
    for done in writes:
        output = await asyncio.to_thread(
            read_pattern, dst.disk_path(done.spec), done.spec, done.offset, done.pattern
        )
        expected = f"read {WRITE_BYTES}/{WRITE_BYTES} bytes at offset {done.offset}"
        assert output.startswith(expected), f"{done}: {output}"


async def compare_disks(
    src: DisposableVM, dst: DisposableVM, specs: Sequence[DiskSpec]
) -> dict[str, str | None]:
    """``qemu-img compare`` of each disk: disk id -> None (equal) or the mismatch."""
    return {
        spec.id: await asyncio.to_thread(compare_images, src.disk_path(spec), dst.disk_path(spec))
        for spec in specs
    }


async def still_empty(vm: DisposableVM, spec: DiskSpec) -> str | None:
    """Compare a disk of ``vm`` with a fresh empty image of its spec (None: empty)."""
    empty = vm.workdir / f"empty-{vm.name}-{spec.id}.{spec.format}"
    await asyncio.to_thread(create_empty_image, empty, spec)
    return await asyncio.to_thread(compare_images, vm.disk_path(spec), empty)


@dataclass(frozen=True)
class Leftovers:
    """What a VM has that a storage migration may have added."""

    runstate: RunState
    block_jobs: list[str]
    jobs: list[str]
    nbd_nodes: list[str]
    #: Sorted.
    exports: list[str]

    @property
    def clean(self) -> bool:
        """Nothing of migrelay's: no job, no NBD node, no export."""
        return not (self.block_jobs or self.jobs or self.nbd_nodes or self.exports)


async def leftovers(vm: DisposableVM, qmp_path: Path | None = None) -> Leftovers:
    """Read them through a connection of its own (``qmp_path``: another monitor)."""
    async with QMP(vm.name) as qmp:
        await qmp.connect(str(qmp_path or vm.qmp_path))
        nodes = await qmp.query_node_names()
        return Leftovers(
            runstate=await qmp.query_status(),
            block_jobs=await qmp.query_block_job_ids(),
            jobs=[job.job_id for job in await qmp.query_jobs()],
            nbd_nodes=[name for name in nodes if name.startswith(NBD_NODE_PREFIX)],
            exports=sorted(await qmp.query_export_ids()),
        )


async def wait_clean(vm: DisposableVM, qmp_path: Path | None = None) -> Leftovers:
    """Wait (bounded) until ``vm`` has nothing of migrelay's left.

    Each look is a connection of its own, so that another client (``serve``'s finish
    hook, ``incoming``) gets the monitor in between.
    """
    return await poll(lambda: leftovers(vm, qmp_path), lambda found: found.clean, "clean vm")


def storage_channels(log: str) -> list[str]:
    """The storage channels serve opened, by label (``storage-0``, ...)."""
    return re.findall(r"channel \S+/(storage-\d+) opened", log)
