"""Storage migration (DESIGN.md §9): a VM's local disks cross the tunnel as NBD.

The destination QEMU exports its disks, empty and of the same sizes, with its own NBD
server (`export_disks`, on the storage socket beside its migration socket); the source
QEMU mirrors each disk into one of them (`SourceMirrors`): an NBD node that connects
to the source relay's storage socket, and a ``blockdev-mirror`` job, ``sync: full``.
migrelay carries each NBD connection as a storage channel of the migration's session.

The order is libvirt's (``--copy-storage-all``), which leaves the destination with every
write the guest made and never moves the source off its own disks:

1. every mirror copies its disk and becomes ``ready`` (in sync; it then copies each
   new write), within a bounded wait;
2. RAM migrates with ``pause-before-switchover``: QEMU stops the guest and waits in
   ``pre-switchover``;
3. the ready mirrors are cancelled (`SourceMirrors.cancel_in_sync`): a ready mirror
   cancelled without ``force`` copies what is in flight and ends, the target in sync,
   the source still on its own disk (never ``block-job-complete``, which would move
   the source onto the remote disk);
4. ``migrate-continue``; the migration completes; the NBD nodes are removed.

Any failure before the end removes every job and node this module added
(`SourceMirrors.remove`); the source VM runs on its own disks as before.

Disks are matched between the sides by their device's ``id`` (``-device ...,id=disk0``),
not by node names (``-drive`` makes those up): it is the NBD export's name.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from migrelay.control.migration import sleep_or_stop
from migrelay.control.qmp import (
    QMP,
    BlockDevice,
    BlockJob,
    DiskProgress,
    MigrationInfo,
    MigrationStatus,
)
from migrelay.errors import MigrationCancelledError, MigrationError, StorageError
from migrelay.units import MIB, format_bytes, format_duration

__all__ = [
    "DEFAULT_DISK_RATE_FLOOR",
    "DISK_TIMEOUT_BASE_S",
    "EXPORT_ID_PREFIX",
    "MIRROR_JOB_PREFIX",
    "NBD_NODE_PREFIX",
    "Disk",
    "SourceMirrors",
    "StorageOptions",
    "default_disk_timeout",
    "export_disks",
    "select_disks",
    "unexport_disks",
]

logger = logging.getLogger(__name__)

#: Ids of the mirror jobs this module starts on the source: the prefix and the disk id.
MIRROR_JOB_PREFIX: Final = "migrelay-mirror-"
#: Names of the NBD nodes it adds on the source: the prefix and a number (a node name
#: has at most 31 characters, too few for a disk id).
NBD_NODE_PREFIX: Final = "migrelay-nbd-"
#: Ids of the exports it adds on the destination: the prefix and the disk id.
EXPORT_ID_PREFIX: Final = "migrelay-"

#: `default_disk_timeout`: a fixed part, plus the disks' size at this rate.
DISK_TIMEOUT_BASE_S: Final = 120.0
DEFAULT_DISK_RATE_FLOOR: Final = 16 * MIB

#: How long cancelling the ready mirrors at switchover may take (the guest is paused
#: meanwhile); past it the migration is cancelled and the guest runs on at the source.
SWITCHOVER_CANCEL_TIMEOUT_S: Final = 30.0
#: How long a forced cancel of a mirror may take, and export removal on the destination.
CLEANUP_TIMEOUT_S: Final = 10.0
_JOB_POLL_S: Final = 0.05

#: Job statuses of a job that has ended or is ending (``query-jobs``): its copy is over.
_ENDED_JOB_STATUSES: Final = frozenset({"concluded", "null", "aborting"})
#: Of those, the ones a job rests in once it has ended (``aborting`` still works).
_FINAL_JOB_STATUSES: Final = frozenset({"concluded", "null"})


def default_disk_timeout(total_bytes: int, max_bandwidth: int | None = None) -> float:
    """How long the disks may take to be in sync, by default.

    `DISK_TIMEOUT_BASE_S` plus the disks' size at `DEFAULT_DISK_RATE_FLOOR` (16 MiB/s),
    or at ``max_bandwidth`` when that is lower: 120 s + 64 s per GiB.
    """
    rate = DEFAULT_DISK_RATE_FLOOR
    if max_bandwidth is not None:
        rate = min(rate, max_bandwidth)
    return DISK_TIMEOUT_BASE_S + total_bytes / rate


@dataclass(frozen=True, slots=True)
class StorageOptions:
    """What ``migrate --copy-storage`` was asked to do with the disks.

    Attributes:
        disks: the device ids of the disks to copy (``--migrate-disks``); ``None``:
            every writable disk.
        write_blocking: mirror in ``write-blocking`` mode (``--disk-copy-mode``).
        timeout_s: how long the disks may take to get in sync (``--disk-timeout``);
            ``None``: `default_disk_timeout`.
    """

    disks: tuple[str, ...] | None = None
    write_blocking: bool = False
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class Disk:
    """A disk to copy (source) or to receive (destination).

    Attributes:
        id: its device's id, which both sides share.
        node_name: its top node on this side.
        size: its virtual size in bytes.
    """

    id: str
    node_name: str
    size: int


def _describe_size(size: int) -> str:
    return f"{format_bytes(size)} ({size} bytes)"


def select_disks(devices: Sequence[BlockDevice], names: Sequence[str] | None) -> list[Disk]:
    """The disks to copy: every writable disk with a medium, or those named.

    Read-only devices (a CD-ROM) and empty drives are left alone: the destination has
    its own, and nothing writes to them.

    Raises:
        StorageError: a named disk does not exist, is read-only or has no medium; a
            writable disk to copy belongs to a device without an id (nothing to match
            it by on the destination); no writable disk at all.
    """
    by_id = {device.device_id: device for device in devices if device.device_id is not None}
    if names is not None:
        chosen = []
        for name in names:
            device = by_id.get(name)
            if device is None:
                known = ", ".join(sorted(by_id)) or "none"
                raise StorageError(f"disk {name}: no such device (devices with an id: {known})")
            if not device.has_medium:
                raise StorageError(f"disk {name}: no medium inserted")
            if device.read_only:
                raise StorageError(f"disk {name}: read-only; only writable disks are copied")
            chosen.append(device)
    else:
        chosen = [device for device in devices if device.has_medium and not device.read_only]
        for device in chosen:
            if device.device_id is None:
                raise StorageError(
                    f"the disk of {device.qdev or 'a drive with no device'} has no device id:"
                    " give its -device an id= (on both hosts), or name the disks to copy"
                    " with --migrate-disks"
                )
        if not chosen:
            raise StorageError("--copy-storage: the vm has no writable disk to copy")
    disks = []
    for device in chosen:
        assert device.device_id is not None
        if device.node_name is None or device.size is None:
            raise StorageError(f"disk {device.device_id}: qemu reports no node or size")
        disks.append(Disk(device.device_id, device.node_name, device.size))
    return disks


# -- destination ------------------------------------------------------------------------


async def export_disks(
    qmp: QMP, address: str, wanted: Mapping[str, int | None] | None
) -> list[Disk]:
    """Export the destination's disks, writable, on a new NBD server at ``address``.

    Args:
        qmp: connected to the destination (started with ``-incoming defer``).
        address: where the NBD server listens: ``unix:PATH`` of the storage socket
            (``tcp:HOST:PORT`` for the benchmark's direct path).
        wanted: disk id -> size the source announced (``None`` for a size not known
            here); ``None``: every writable disk (``incoming --copy-storage``, where
            the source announces nothing: it then compares the sizes itself).

    Returns:
        The disks exported.

    Raises:
        StorageError: a wanted disk is missing, read-only, or of another size (its
            message names the disk and both sizes); nothing was exported.
        MigrationError: QEMU refused to start the server or an export.
        ConnectError: the connection is gone.
    """
    devices = await qmp.query_block()
    if wanted is None:
        disks = select_disks(devices, None)
    else:
        disks = []
        by_id = {device.device_id: device for device in devices if device.device_id}
        for disk_id, size in wanted.items():
            device = by_id.get(disk_id)
            if device is None or not device.has_medium:
                source = f" (the source's is {_describe_size(size)})" if size is not None else ""
                raise StorageError(f"disk {disk_id}: the destination vm has no such disk{source}")
            if device.read_only:
                raise StorageError(f"disk {disk_id}: read-only on the destination")
            if device.node_name is None or device.size is None:
                raise StorageError(f"disk {disk_id}: qemu reports no node or size")
            if size is not None and device.size != size:
                raise StorageError(
                    f"disk {disk_id}: {_describe_size(device.size)} on the destination,"
                    f" {_describe_size(size)} on the source"
                )
            disks.append(Disk(disk_id, device.node_name, device.size))
    # A server or exports left by an earlier attempt (its relay killed) go first.
    await unexport_disks(qmp)
    await qmp.start_nbd_server(address)
    try:
        for disk in disks:
            await qmp.export_node(EXPORT_ID_PREFIX + disk.id, disk.node_name, disk.id)
    except BaseException:
        await unexport_disks(qmp)
        raise
    logger.info(
        "%s: exporting %s on %s",
        qmp.name,
        ", ".join(f"{disk.id} ({format_bytes(disk.size)})" for disk in disks),
        address,
    )
    return disks


async def unexport_disks(qmp: QMP) -> list[str]:
    """Remove the exports `export_disks` added, and the NBD server if nothing else uses it.

    Returns:
        The ids of the exports removed.

    Raises:
        MigrationError: QEMU refused to remove an export.
        ConnectError: the connection is gone.
    """
    ours = [
        export for export in await qmp.query_export_ids() if export.startswith(EXPORT_ID_PREFIX)
    ]
    for export in ours:
        await qmp.delete_export(export)
    # block-export-del returns before the export is gone (its clients are closed first).
    deadline = time.monotonic() + CLEANUP_TIMEOUT_S
    while True:
        remaining = await qmp.query_export_ids()
        if not any(export in ours for export in remaining) or time.monotonic() > deadline:
            break
        await asyncio.sleep(_JOB_POLL_S)
    if not remaining:
        try:
            await qmp.stop_nbd_server()
        except MigrationError:
            pass  # none was running
    if ours:
        logger.info("%s: removed exports %s", qmp.name, ", ".join(ours))
    return ours


# -- source -----------------------------------------------------------------------------


class SourceMirrors:
    """The source's side of a storage migration: NBD nodes and mirror jobs, one per disk.

    Args:
        disks: the disks to copy (`select_disks`).
        server: the destination's NBD server as source QEMU reaches it: ``unix:PATH``
            of the source relay's storage socket (``tcp:HOST:PORT`` directly).
        write_blocking: mirror in ``write-blocking`` mode (`QMP.mirror`).
        speed: bytes/s each mirror's background copy may use; ``None``: unlimited.
        clock: monotonic seconds (rates, timeouts).
    """

    def __init__(
        self,
        disks: Sequence[Disk],
        server: str,
        *,
        write_blocking: bool = False,
        speed: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.disks = list(disks)
        self.server = server
        self.write_blocking = write_blocking
        self.speed = speed
        self.clock = clock
        #: Disk id -> node added / job started (what `remove` takes away again).
        self.nodes: dict[str, str] = {}
        self.jobs: dict[str, str] = {}
        #: Set once the mirrors were cancelled in sync at switchover.
        self.switched_over = False
        self._last: dict[str, DiskProgress] = {}
        self._samples: dict[str, tuple[int, float]] = {}

    @property
    def total_bytes(self) -> int:
        """The disks' size in all."""
        return sum(disk.size for disk in self.disks)

    def snapshot(self) -> tuple[DiskProgress, ...]:
        """The disks as last seen (for the final progress)."""
        return tuple(self._last[disk.id] for disk in self.disks if disk.id in self._last)

    async def clear_leftovers(self, qmp: QMP) -> None:
        """Remove jobs and nodes an earlier migrelay left (it was killed mid-copy)."""
        stale_jobs = [
            job.job_id
            for job in await qmp.query_jobs()
            if job.job_id.startswith(MIRROR_JOB_PREFIX)
        ]
        stale_nodes = [
            name for name in await qmp.query_node_names() if name.startswith(NBD_NODE_PREFIX)
        ]
        if stale_jobs or stale_nodes:
            logger.warning(
                "%s: removing what an earlier migration left: %s",
                qmp.name,
                ", ".join([*stale_jobs, *stale_nodes]),
            )
        await self._cancel_jobs(qmp, stale_jobs, force=True, timeout_s=CLEANUP_TIMEOUT_S)
        for node in stale_nodes:
            await qmp.delete_node(node)

    async def start(self, qmp: QMP) -> None:
        """Connect an NBD node to each disk's export and start its mirror.

        Raises:
            StorageError: an export cannot be reached (the relay's refusal is the
                caller's to report), or is of another size than the source's disk.
            MigrationError, ConnectError: from QMP.
        """
        for number, disk in enumerate(self.disks):
            node = f"{NBD_NODE_PREFIX}{number}"
            try:
                await qmp.add_nbd_node(node, self.server, disk.id)
            except MigrationError as exc:
                raise StorageError(
                    f"disk {disk.id}: cannot reach its export on the destination: {exc}"
                ) from exc
            self.nodes[disk.id] = node
        sizes = await qmp.query_node_names()
        for disk in self.disks:
            there = sizes.get(self.nodes[disk.id])
            if there != disk.size:
                shown = _describe_size(there) if there is not None else "no size"
                raise StorageError(
                    f"disk {disk.id}: {_describe_size(disk.size)} on the source,"
                    f" {shown} on the destination"
                )
        for disk in self.disks:
            job = MIRROR_JOB_PREFIX + disk.id
            await qmp.mirror(
                job,
                disk.node_name,
                self.nodes[disk.id],
                write_blocking=self.write_blocking,
                speed=self.speed,
            )
            self.jobs[disk.id] = job
        logger.info(
            "%s: copying %s to the destination",
            qmp.name,
            ", ".join(f"{disk.id} ({format_bytes(disk.size)})" for disk in self.disks),
        )

    async def progress(self, qmp: QMP) -> tuple[DiskProgress, ...]:
        """Each disk's copy now.

        Raises:
            StorageError: a mirror failed (QEMU's reason, e.g. the link to the
                destination was lost) or is gone.
            MigrationError, ConnectError: from QMP.
        """
        if self.switched_over:
            return self.snapshot()
        jobs = {job.job_id: job for job in await qmp.query_jobs()}
        now = self.clock()
        disks = []
        for disk in self.disks:
            job_id = self.jobs.get(disk.id)
            job = jobs.get(job_id) if job_id is not None else None
            if job is None:
                raise StorageError(f"disk {disk.id}: its copy job {job_id} is gone")
            if job.error is not None or (job.status in _ENDED_JOB_STATUSES):
                raise StorageError(
                    f"disk {disk.id}: copy failed after {format_bytes(job.current)}:"
                    f" {job.error or 'the job ended'}"
                )
            disks.append(self._progress_of(disk, job, now))
        return tuple(disks)

    def _progress_of(self, disk: Disk, job: BlockJob, now: float) -> DiskProgress:
        rate = None
        previous = self._samples.get(disk.id)
        if previous is not None and now > previous[1]:
            rate = max(job.current - previous[0], 0) / (now - previous[1])
            if rate == 0 and job.status == "ready":
                rate = None  # in sync: nothing to copy is not a rate of zero
        elif (last := self._last.get(disk.id)) is not None:
            rate = last.rate_bytes_per_s
        if previous is None or now - previous[1] >= 0.5:
            self._samples[disk.id] = (job.current, now)
        progress = DiskProgress(disk.id, job.status, job.current, job.total, rate)
        self._last[disk.id] = progress
        return progress

    async def wait_ready(
        self,
        qmp: QMP,
        *,
        timeout_s: float,
        stall_timeout_s: float | None,
        interval: float,
        on_progress: Callable[[MigrationInfo], object] | None = None,
        stop: asyncio.Event | None = None,
    ) -> None:
        """Wait until every mirror is ``ready``, reporting progress.

        Raises:
            StorageError: a mirror failed; or not every disk was in sync within
                ``timeout_s`` (the guest writes faster than the link carries:
                ``write-blocking`` is the remedy); or no byte was copied for
                ``stall_timeout_s``.
            MigrationCancelledError: ``stop`` was set.
            MigrationError, ConnectError: from QMP.
        """
        started = self.clock()
        last_copied, last_moved = -1, started
        while True:
            disks = await self.progress(qmp)
            if on_progress is not None:
                on_progress(MigrationInfo(status=MigrationStatus.NONE, disks=disks))
            if all(disk.ready for disk in disks):
                logger.info(
                    "%s: disks in sync after %s",
                    qmp.name,
                    format_duration(self.clock() - started),
                )
                return
            now = self.clock()
            copied = sum(disk.copied for disk in disks)
            if copied != last_copied:
                last_copied, last_moved = copied, now
            elif stall_timeout_s is not None and now - last_moved >= stall_timeout_s:
                raise StorageError(
                    f"no disk data moved for {stall_timeout_s:g} s"
                    f" ({format_bytes(copied)} copied); the link or a relay is stuck"
                )
            if now - started >= timeout_s:
                behind = ", ".join(
                    f"{disk.disk} {format_bytes(disk.remaining)} behind"
                    for disk in disks
                    if not disk.ready
                )
                raise StorageError(
                    f"disks not in sync after {timeout_s:g} s ({behind}): the guest writes"
                    " faster than the link carries; try --disk-copy-mode write-blocking"
                    " or a longer --disk-timeout"
                )
            if stop is not None and stop.is_set():
                raise MigrationCancelledError("cancelled while copying the disks")
            await sleep_or_stop(interval, stop)

    async def cancel_in_sync(
        self, qmp: QMP, timeout_s: float = SWITCHOVER_CANCEL_TIMEOUT_S
    ) -> None:
        """At switchover (guest paused): end every ready mirror with its target in sync.

        Raises:
            StorageError: a mirror was not in sync, failed, or did not end in time;
                the caller cancels the migration (the guest then runs on at the source).
            MigrationError, ConnectError: from QMP.
        """
        disks = await self.progress(qmp)
        behind = [disk.disk for disk in disks if disk.status != "ready"]
        if behind:
            raise StorageError(f"disk {behind[0]} not in sync at switchover")
        try:
            ended = await self._cancel_jobs(
                qmp, list(self.jobs.values()), force=False, timeout_s=timeout_s
            )
        except TimeoutError:
            raise StorageError(
                f"disk copies did not end within {timeout_s:g} s at switchover"
            ) from None
        self.jobs.clear()  # dismissed
        failed = [job for job in ended if job.error is not None]
        if failed:
            raise StorageError(
                f"copy job {failed[0].job_id} failed at switchover: {failed[0].error}"
            )
        for disk in self.disks:
            last = self._last.get(disk.id)
            if last is not None:
                self._last[disk.id] = DiskProgress(
                    disk.id,
                    "concluded",
                    max(last.copied, last.total),
                    last.total,
                    last.rate_bytes_per_s,
                )
        self.switched_over = True

    async def remove(self, qmp: QMP) -> list[str]:
        """End every job and remove every node this object added; safe in any state.

        Returns:
            What could not be removed (empty when all is clean); each is logged.
        """
        problems: list[str] = []
        try:
            await self._cancel_jobs(
                qmp, list(self.jobs.values()), force=True, timeout_s=CLEANUP_TIMEOUT_S
            )
            self.jobs.clear()
        except (MigrationError, TimeoutError) as exc:
            problems.append(f"copy jobs: {exc}")
        for disk_id, node in list(self.nodes.items()):
            try:
                await qmp.delete_node(node)
                del self.nodes[disk_id]
            except MigrationError as exc:
                problems.append(f"node {node}: {exc}")
        for problem in problems:
            logger.warning("%s: could not clean up %s", qmp.name, problem)
        return problems

    async def _cancel_jobs(
        self, qmp: QMP, job_ids: Sequence[str], *, force: bool, timeout_s: float
    ) -> list[BlockJob]:
        """Cancel these jobs (`QMP.cancel_job`), wait until each has ended, dismiss them.

        Returns:
            The jobs as they ended (``error`` set for one that failed); a job QEMU no
            longer lists is left out.

        Raises:
            TimeoutError: one had not ended within ``timeout_s``; nothing was dismissed.
            MigrationError, ConnectError: from QMP.
        """
        if not job_ids:
            return []
        jobs = {job.job_id: job for job in await qmp.query_jobs()}
        for job_id in job_ids:
            job = jobs.get(job_id)
            if job is not None and job.status not in _ENDED_JOB_STATUSES:
                try:
                    await qmp.cancel_job(job_id, force=force)
                except MigrationError:
                    pass  # it ended meanwhile: how, the wait below reads
        deadline = self.clock() + timeout_s
        while True:
            jobs = {job.job_id: job for job in await qmp.query_jobs()}
            left = [jobs[job_id] for job_id in job_ids if job_id in jobs]
            if all(job.status in _FINAL_JOB_STATUSES for job in left):
                break
            if self.clock() >= deadline:
                raise TimeoutError(
                    f"copy jobs {', '.join(job.job_id for job in left)} still running"
                    f" {timeout_s:g} s after cancel"
                )
            await asyncio.sleep(_JOB_POLL_S)
        for job in left:
            if job.status == "concluded":
                await qmp.dismiss_job(job.job_id)
        return left
