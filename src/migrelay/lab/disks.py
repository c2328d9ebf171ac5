"""Disks of the disposable test VMs: specs, QEMU arguments, image files (DESIGN §7, §9).

A `DiskSpec` says what a disk is; `qemu_args` turns it into QEMU's arguments in either
style QEMU 7.2 accepts (``-drive``, or ``-blockdev`` nodes); the image functions create
and compare the files with ``qemu-img`` (Debian's ``qemu-utils``). A source disk holds
random bytes, a destination disk starts empty, and after a storage migration the two are
equal (`compare_images`). A CD-ROM is read-only and never copied by a migration.

Everything here blocks (for a child process at most): call it from
``asyncio.to_thread``. `migrelay.lab.vm.DisposableVM` creates its disks this way.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from migrelay.errors import VMError
from migrelay.units import MIB

__all__ = [
    "IDE_SLOTS",
    "DiskSpec",
    "compare_images",
    "create_empty_image",
    "create_random_image",
    "qemu_args",
    "qemu_io_command",
]

#: Devices the ``pc`` machine's IDE controller takes (buses ``ide.0`` and ``ide.1``, units
#: 0 and 1 on each); ``-nodefaults`` keeps the controller. virtio-blk-pci disks need no
#: controller.
IDE_SLOTS = 4

#: A disk id: a QEMU id (letter first) short enough that ``fmt-ID`` fits a node name
#: (at most 31 characters in QEMU 7.2), and safe in a file name and an HMP command.
_ID_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,25}")

_QEMU_IMG = "qemu-img"


@dataclass(frozen=True)
class DiskSpec:
    """One disk of a test VM.

    Attributes:
        id: the ``-device`` id (``disk0``); the drive is ``drive-ID`` (style ``drive``),
            the nodes ``file-ID`` and ``fmt-ID`` (style ``blockdev``).
        size: virtual size in bytes, a positive multiple of 1 MiB.
        format: the image format.
        style: ``drive`` (``-drive if=none``, a BlockBackend named ``drive-ID``) or
            ``blockdev`` (two named nodes, as libvirt does it).
        bus: ``virtio`` (virtio-blk-pci) or ``ide`` (ide-hd; the ``pc`` machine has
            `IDE_SLOTS` of them).
        cdrom: a read-only ``ide-cd`` with a raw image (``bus="ide"``,
            ``format="raw"``), which a migration never copies.
    """

    id: str
    size: int
    format: Literal["raw", "qcow2"] = "raw"
    style: Literal["drive", "blockdev"] = "drive"
    bus: Literal["virtio", "ide"] = "virtio"
    cdrom: bool = False

    def __post_init__(self) -> None:
        if not _ID_RE.fullmatch(self.id):
            raise ValueError(
                f"disk id {self.id!r} must be a letter then up to 25 letters, digits, '-' or '_'"
            )
        if self.size <= 0 or self.size % MIB:
            raise ValueError(
                f"disk {self.id}: size must be a positive multiple of 1 MiB, got {self.size}"
            )
        if self.format not in ("raw", "qcow2"):
            raise ValueError(f"disk {self.id}: format must be raw or qcow2, not {self.format!r}")
        if self.style not in ("drive", "blockdev"):
            raise ValueError(
                f"disk {self.id}: style must be drive or blockdev, not {self.style!r}"
            )
        if self.bus not in ("virtio", "ide"):
            raise ValueError(f"disk {self.id}: bus must be virtio or ide, not {self.bus!r}")
        if self.cdrom and (self.bus != "ide" or self.format != "raw"):
            raise ValueError(
                f"disk {self.id}: a cdrom must be bus='ide' and format='raw'"
                f" (got bus={self.bus!r}, format={self.format!r})"
            )

    @property
    def read_only(self) -> bool:
        """Whether QEMU opens the disk read-only (a CD-ROM)."""
        return self.cdrom

    @property
    def qdev_path(self) -> str:
        """The device that holds the disk, as ``query-block`` reports it (its ``qdev``)
        and as HMP ``qemu-io -d`` takes it: the id of an IDE device; for virtio-blk-pci,
        a PCI proxy, the QOM path of its ``virtio-backend`` child, which holds the disk.
        """
        if self.bus == "virtio":
            return f"/machine/peripheral/{self.id}/virtio-backend"
        return self.id


def _option_value(value: str) -> str:
    # QEMU's option syntax: a comma inside a value is written twice.
    return value.replace(",", ",,")


def qemu_args(
    spec: DiskSpec, path: str | os.PathLike[str], *, ide_slot: int | None = None
) -> list[str]:
    """Return the QEMU arguments that attach ``spec`` with its image at ``path``.

    Cache and AIO options stay QEMU's defaults.

    Args:
        spec: the disk.
        path: its image file.
        ide_slot: for an IDE disk, its place on the controller, 0 to `IDE_SLOTS` - 1
            (bus ``ide.SLOT//2``, unit ``SLOT%2``). Give it whenever a VM has more than
            two IDE devices: QEMU 7.2 puts every IDE device without a bus on ``ide.0``,
            and the third fails with "IDE unit 1 is in use". ``None``: QEMU's choice.

    Raises:
        ValueError: ``ide_slot`` out of range, or given for a virtio disk.
    """
    filename = _option_value(os.fspath(path))
    if spec.style == "drive":
        backend = f"drive-{spec.id}"
        drive = f"if=none,id={backend},file={filename},format={spec.format}"
        if spec.cdrom:
            drive += ",media=cdrom,readonly=on"
        args = ["-drive", drive]
    else:
        backend = f"fmt-{spec.id}"
        # Both nodes read-only for a CD-ROM: a read-write file node would still ask for
        # the file opened for writing.
        read_only = ",read-only=on" if spec.read_only else ""
        args = [
            "-blockdev",
            f"driver=file,filename={filename},node-name=file-{spec.id}{read_only}",
            "-blockdev",
            f"driver={spec.format},file=file-{spec.id},node-name={backend}{read_only}",
        ]
    if spec.cdrom:
        device = "ide-cd"
    elif spec.bus == "ide":
        device = "ide-hd"
    else:
        device = "virtio-blk-pci"
    placement = ""
    if ide_slot is not None:
        if spec.bus != "ide" or not 0 <= ide_slot < IDE_SLOTS:
            raise ValueError(
                f"disk {spec.id}: ide_slot {ide_slot} needs bus='ide' and 0 <= slot < {IDE_SLOTS}"
            )
        placement = f",bus=ide.{ide_slot // 2},unit={ide_slot % 2}"
    return [*args, "-device", f"{device},drive={backend},id={spec.id}{placement}"]


def qemu_io_command(spec: DiskSpec, io_command: str) -> str:
    """Return the HMP command line that runs qemu-io's ``io_command`` on ``spec``'s disk.

    Send it with ``QMP.human_monitor_command`` to a running or paused VM, e.g.
    ``qemu_io_command(spec, "write -P 0x5a 0 64k")``. In QEMU 7.2 the HMP syntax is
    ``qemu-io [-d] [device] "[command]"``, where ``device`` is a drive id or a node name,
    or with ``-d`` a qdev id or QOM path. What works for each style (tried on 7.2):

    * ``drive``: ``qemu-io drive-ID "write …"`` (the drive id). ``-d ID`` fails for
      virtio-blk-pci ("Device does not have a block device backend": the backend hangs
      off its ``virtio-backend`` child).
    * ``blockdev``: ``qemu-io -d ID "write …"`` (ide) or
      ``qemu-io -d /machine/peripheral/ID/virtio-backend "write …"`` (virtio), that is
      `DiskSpec.qdev_path`. The node name (``fmt-ID``) fails for a write: "Permission
      conflict on node 'fmt-ID': permissions 'write' are both required by an unnamed
      block device … and unshared by block device 'ID'" (qemu-io would open a second
      BlockBackend on the node, and the device's does not share writes).

    The monitor's reply is empty on success, and is the error text when the device is
    not found, the permissions conflict or the node is read-only ("Block node is
    read-only", a CD-ROM). qemu-io's own output, including its failures ("write failed:
    Input/output error" past the end of the disk, an unknown command), goes to QEMU's
    stdout (the VM's log), not to the reply: check the image, not just the reply.

    Raises:
        ValueError: ``io_command`` holds a double quote or a backslash (HMP would read
            them as the end of the string or an escape).
    """
    if '"' in io_command or "\\" in io_command:
        raise ValueError(f"qemu-io command must not contain '\"' or '\\\\': {io_command!r}")
    if spec.style == "drive":
        return f'qemu-io drive-{spec.id} "{io_command}"'
    return f'qemu-io -d {spec.qdev_path} "{io_command}"'


def _run_qemu_img(args: list[str], timeout_s: float | None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            [_QEMU_IMG, *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            errors="replace",
            timeout=timeout_s,
            check=False,
        )
    except FileNotFoundError:
        raise VMError(f"{_QEMU_IMG} not found on PATH (install qemu-utils)") from None
    except subprocess.TimeoutExpired:
        raise VMError(f"{_QEMU_IMG} {args[0]} timed out after {timeout_s:g} s") from None


def _check(result: subprocess.CompletedProcess[str], what: str) -> None:
    if result.returncode != 0:
        raise VMError(
            f"{what} failed: {_QEMU_IMG} exited {result.returncode}",
            result.returncode,
            result.stderr or result.stdout,
        )


def _write_random(path: Path, size: int, timeout_s: float | None) -> None:
    # A short-lived child writes the random bytes, never this process (DESIGN §7: a
    # file written by the long-lived test process made QEMU migrate it 2-3x slower).
    with open(path, "wb") as image:
        try:
            result = subprocess.run(
                ["head", "-c", str(size), "/dev/urandom"],
                stdin=subprocess.DEVNULL,
                stdout=image,
                stderr=subprocess.PIPE,
                text=True,
                errors="replace",
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise VMError(f"writing {size} random bytes to {path} timed out") from None
    written = path.stat().st_size
    if result.returncode != 0 or written != size:
        raise VMError(
            f"writing {size} random bytes to {path} failed: head exited {result.returncode},"
            f" wrote {written} bytes",
            result.returncode,
            result.stderr,
        )


def create_random_image(
    path: str | os.PathLike[str], spec: DiskSpec, *, timeout_s: float | None = None
) -> None:
    """Create (or overwrite) a ``spec.format`` image of ``spec.size`` random bytes.

    raw: written by ``head -c SIZE /dev/urandom``; qcow2: a raw temporary file next to
    ``path``, converted with ``qemu-img convert`` and removed.

    Raises:
        VMError: a tool failed (its stderr in the message), is missing, or timed out.
    """
    path = Path(path)
    if spec.format == "raw":
        _write_random(path, spec.size, timeout_s)
        return
    temporary = path.with_name(f"{path.name}.raw.tmp")
    try:
        _write_random(temporary, spec.size, timeout_s)
        result = _run_qemu_img(
            ["convert", "-q", "-f", "raw", "-O", spec.format, str(temporary), str(path)],
            timeout_s,
        )
        _check(result, f"converting random bytes to {spec.format} image {path}")
    finally:
        with contextlib.suppress(FileNotFoundError):
            temporary.unlink()


def create_empty_image(
    path: str | os.PathLike[str], spec: DiskSpec, *, timeout_s: float | None = None
) -> None:
    """Create (or overwrite) an empty ``spec.format`` image of ``spec.size`` bytes
    (``qemu-img create``), as a destination disk starts.

    Raises:
        VMError: ``qemu-img`` failed (its stderr in the message), is missing, or timed out.
    """
    result = _run_qemu_img(
        ["create", "-q", "-f", spec.format, os.fspath(path), str(spec.size)], timeout_s
    )
    _check(result, f"creating empty {spec.format} image {os.fspath(path)}")


def compare_images(
    path_a: str | os.PathLike[str],
    path_b: str | os.PathLike[str],
    *,
    timeout_s: float | None = None,
) -> str | None:
    """Compare two images' contents with ``qemu-img compare -U`` (force share: it works
    while a QEMU holds them; formats are probed).

    Returns:
        ``None`` if the guest sees the same bytes in both, else qemu-img's explanation
        ("Content mismatch at offset 65536!").

    Raises:
        VMError: ``qemu-img`` failed (status 2: could not open or read an image), is
            missing, or timed out.
    """
    result = _run_qemu_img(["compare", "-U", os.fspath(path_a), os.fspath(path_b)], timeout_s)
    if result.returncode == 0:
        return None
    output = (result.stdout + result.stderr).strip()
    if result.returncode == 1:
        return output
    raise VMError(
        f"comparing {os.fspath(path_a)} with {os.fspath(path_b)} failed:"
        f" {_QEMU_IMG} exited {result.returncode}",
        result.returncode,
        output,
    )
