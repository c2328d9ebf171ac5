"""Disposable QEMU VMs for end-to-end tests, ``migrelay bench`` and the README demo.

A test VM has no guest (DESIGN §7): it is stopped from the start (``-S``), has no default
devices (``-nodefaults``), and its RAM is a shared file (``memory-backend-file``,
``share=on``). The source's file holds random bytes, the destination's starts sparse, and
after a successful migration the two files are equal byte for byte: that is the integrity
check of every end-to-end test (`first_difference`). (A guest that dirties RAM can be
booted from a floppy: `migrelay.lab.guest`.)

The source's RAM may also be text-like, which compresses as a guest's RAM full of logs
and code does (``ram_content="text"``), or mostly zero pages (``"zero"``), as a freshly
booted guest's is: what multifd compression and XBZRLE gain depends on it (`RAM_CONTENTS`).
Where the RAM file lives matters to a benchmark: on a disk file system QEMU's reads and
writes of guest RAM go through it (measured here, 1 GiB over direct TCP: 4.37 s with the
RAM files under an ext4 ``/tmp``, 3.03 s on tmpfs), so the bench puts them on tmpfs
(``ram_dir``).

A test VM may also have disks (`migrelay.lab.disks.DiskSpec`), for storage migration
(DESIGN §9): image files in the work directory, of random bytes on a source and empty on
a destination, equal after a storage migration (`migrelay.lab.disks.compare_images`).

The processes are `subprocess.Popen` objects rather than asyncio subprocesses, so a VM is
not tied to the event loop that started it (tests run one ``asyncio.run`` each, and a
fixture must still be able to kill what a failed test left behind). Waiting is a short
poll, which costs nothing at the scale of a VM's lifetime.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from migrelay.errors import VMError
from migrelay.lab.disks import (
    IDE_SLOTS,
    DiskSpec,
    create_empty_image,
    create_random_image,
    qemu_args,
)
from migrelay.units import MIB

__all__ = [
    "QEMU_BINARY",
    "RAM_CONTENTS",
    "DisposableVM",
    "first_difference",
    "write_ram_content",
]

logger = logging.getLogger(__name__)

#: The emulator the test VMs run (Debian's ``qemu-system-x86``).
QEMU_BINARY = "qemu-system-x86_64"

#: Poll period while waiting for a process to exit or a socket to appear.
_POLL_S = 0.02

#: How long `DisposableVM.terminate` waits after SIGTERM before SIGKILL. A QEMU 7.2
#: destination stuck in a multifd incoming migration ignored SIGTERM here (its main loop
#: waits on the multifd threads), so the escalation is not optional.
_TERM_GRACE_S = 5.0

#: Bytes of QEMU's stderr kept for error messages.
_STDERR_TAIL_BYTES = 2000

#: What a source VM's RAM file may hold:
#:
#: ``random``: random bytes, which nothing compresses (the bench's default, and the worst
#: case for compression and XBZRLE).
#: ``text``: text-like bytes (log lines of words and numbers from a fixed vocabulary, no
#: zero bytes), which zstd and zlib at level 1 both compress about 4x; no two
#: 4 KiB pages are equal below 4 GiB (`write_ram_content`).
#: ``zero``: mostly zero pages, as in a guest that has touched little of its RAM: a
#: sparse file where one page in 64 is random. QEMU sends a zero page as a page header.
RAM_CONTENTS = ("random", "text", "zero")
#: One page in this many is random in ``zero`` RAM.
ZERO_RAM_RANDOM_PAGE_EVERY = 64
_PAGE_BYTES = 4096


def first_difference(
    path_a: str | os.PathLike[str], path_b: str | os.PathLike[str], chunk_size: int = 4 * MIB
) -> int | None:
    """Compare two files byte for byte, reading both in chunks.

    Blocking: run it outside the event loop (or in ``asyncio.to_thread``).

    Args:
        path_a: one file (e.g. the source VM's RAM).
        path_b: the other (e.g. the destination's).
        chunk_size: bytes read from each file at a time.

    Returns:
        ``None`` if the files are equal, else the offset of the first differing byte (the
        shorter file's size if one is a prefix of the other).
    """
    offset = 0
    with open(path_a, "rb") as file_a, open(path_b, "rb") as file_b:
        while True:
            chunk_a = file_a.read(chunk_size)
            chunk_b = file_b.read(chunk_size)
            if chunk_a != chunk_b:
                for index, (byte_a, byte_b) in enumerate(zip(chunk_a, chunk_b, strict=False)):
                    if byte_a != byte_b:
                        return offset + index
                return offset + min(len(chunk_a), len(chunk_b))
            if not chunk_a:
                return None
            offset += len(chunk_a)


class DisposableVM:
    """A stopped QEMU whose RAM is a file, with disks or none, for migration tests and
    benchmarks.

    Files live in ``workdir``: ``NAME.qmp`` (QMP socket), ``NAME.ram`` (RAM),
    ``NAME.log`` (QEMU's stdout and stderr) and ``NAME-ID.FORMAT`` per disk
    (`disk_path`). ``workdir`` should have a short path: a unix socket path is limited to
    107 bytes.

    Use as an async context manager, which always terminates and reaps QEMU::

        async with DisposableVM(workdir, "src", 64 * MIB) as src:
            async with QMP("src") as qmp:
                await qmp.connect(str(src.qmp_path))

    Args:
        workdir: directory for the VM's files (must exist).
        name: the VM's name; also the file name stem.
        ram_size: guest RAM in bytes; a multiple of 2 MiB keeps QEMU's alignment happy.
        incoming: start as a migration destination (``-incoming defer``, sparse RAM file)
            instead of a source (RAM file of ``ram_content``).
        qemu_binary: the emulator to run.
        extra_args: more QEMU arguments, appended last.
        reuse_ram: a source keeps an existing RAM file of the right size and content
            instead of writing it again (benchmarks migrate the same RAM run after run).
            The content is recorded next to the file (``NAME.ram.content``); a file
            without that record is written again.
        command_prefix: run QEMU under this command (``ip netns exec NAME``).
        disks: the VM's disks, attached in this order. A source's images get random
            bytes; a destination's (``incoming``) are empty, except a CD-ROM, which gets
            random bytes of its own: a migration never copies a CD-ROM, QEMU only needs
            the device on both sides, so the two CD-ROM images differ and are never
            compared.
        reuse_disks: keep an existing image of random bytes instead of writing a new one
            (a source's disks, a destination's CD-ROM): a raw image of the right size,
            a qcow2 image that exists.
        ram_dir: where the RAM file lives (default: ``workdir``). Benchmarks want a
            tmpfs here (see the module docstring); tests do not care.
        ram_content: what a source's RAM holds: one of `RAM_CONTENTS`.

    Raises:
        ValueError: a bad RAM size or content, two disks with one id, or more IDE
            devices than the machine has slots (`migrelay.lab.disks.IDE_SLOTS`).
    """

    def __init__(
        self,
        workdir: str | os.PathLike[str],
        name: str,
        ram_size: int,
        *,
        incoming: bool = False,
        qemu_binary: str = QEMU_BINARY,
        extra_args: tuple[str, ...] = (),
        reuse_ram: bool = False,
        command_prefix: tuple[str, ...] = (),
        disks: Sequence[DiskSpec] = (),
        reuse_disks: bool = False,
        ram_dir: str | os.PathLike[str] | None = None,
        ram_content: str = "random",
    ) -> None:
        if ram_size <= 0 or ram_size % MIB:
            raise ValueError(f"ram size must be a positive multiple of 1 MiB, got {ram_size}")
        if ram_content not in RAM_CONTENTS:
            raise ValueError(
                f"unknown ram content {ram_content!r} (one of {', '.join(RAM_CONTENTS)})"
            )
        ids = [spec.id for spec in disks]
        if duplicates := sorted({id_ for id_ in ids if ids.count(id_) > 1}):
            raise ValueError(f"disk ids must be unique: {', '.join(duplicates)} repeated")
        if (ide := sum(spec.bus == "ide" for spec in disks)) > IDE_SLOTS:
            raise ValueError(f"{ide} ide disks, but the pc machine has {IDE_SLOTS} ide slots")
        self.workdir = Path(workdir)
        self.name = name
        self.ram_size = ram_size
        self.incoming = incoming
        self.qemu_binary = qemu_binary
        self.extra_args = extra_args
        self.reuse_ram = reuse_ram
        self.command_prefix = command_prefix
        self.disks = tuple(disks)
        self.reuse_disks = reuse_disks
        self.ram_content = ram_content
        self.qmp_path = self.workdir / f"{name}.qmp"
        self.ram_path = Path(ram_dir if ram_dir is not None else workdir) / f"{name}.ram"
        #: Records what a source's RAM file holds, for ``reuse_ram``.
        self.ram_content_path = self.ram_path.with_name(f"{name}.ram.content")
        self.log_path = self.workdir / f"{name}.log"
        self._process: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"DisposableVM(name={self.name!r}, pid={self.pid}, returncode={self.returncode})"

    async def __aenter__(self) -> DisposableVM:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.terminate()

    @property
    def pid(self) -> int | None:
        """QEMU's process id, once started."""
        return self._process.pid if self._process is not None else None

    @property
    def returncode(self) -> int | None:
        """QEMU's exit status (negative: killed by that signal); ``None`` while it runs."""
        return self._process.poll() if self._process is not None else None

    @property
    def running(self) -> bool:
        """Whether QEMU was started and has not exited."""
        return self._process is not None and self._process.poll() is None

    def disk_path(self, spec: DiskSpec) -> Path:
        """Return the image file of one of the VM's disks: ``workdir/NAME-ID.FORMAT``."""
        return self.workdir / f"{self.name}-{spec.id}.{spec.format}"

    @property
    def disk_paths(self) -> Mapping[str, Path]:
        """Every disk's image file, by disk id, in the order of ``disks``."""
        return {spec.id: self.disk_path(spec) for spec in self.disks}

    def command(self) -> list[str]:
        """Return the QEMU command line (DESIGN §7), for logs and for the README demo."""
        args = [
            self.qemu_binary,
            "-accel",
            "tcg",
            "-nodefaults",
            "-S",
            "-display",
            "none",
            # The RAM backend replaces -m: QEMU 7.2 takes the size from it.
            "-machine",
            "pc,memory-backend=ram0",
            "-object",
            f"memory-backend-file,id=ram0,size={self.ram_size},mem-path={self.ram_path},share=on",
            # wait=off: QEMU does not block at start-up until a client connects.
            "-qmp",
            f"unix:{self.qmp_path},server=on,wait=off",
        ]
        if self.incoming:
            args += ["-incoming", "defer"]
        ide_slots = iter(range(IDE_SLOTS))  # in order: QEMU would put them all on ide.0
        for spec in self.disks:
            ide_slot = next(ide_slots) if spec.bus == "ide" else None
            args += qemu_args(spec, self.disk_path(spec), ide_slot=ide_slot)
        return [*self.command_prefix, *args, *self.extra_args]

    async def start(self, timeout_s: float = 30.0) -> None:
        """Create the RAM file and the disk images, start QEMU and wait for its QMP socket
        to appear.

        Args:
            timeout_s: seconds to wait for the RAM file, the images and the QMP socket.

        Raises:
            VMError: the RAM file or an image could not be written (the tool's stderr is
                in the message), or QEMU exited (or created no QMP socket) in time;
                QEMU's stderr is in the message. Nothing is left running.
        """
        if self._process is not None:
            raise VMError(f"vm {self.name} was already started")
        if shutil.which(self.qemu_binary) is None:
            raise VMError(f"{self.qemu_binary} not found on PATH (install qemu-system-x86)")
        deadline = time.monotonic() + timeout_s
        if self.incoming:
            self._create_sparse_ram()
        elif not (self.reuse_ram and self._ram_file_reusable()):
            await self._fill_ram(deadline)
        for spec in self.disks:
            await self._create_disk(spec, deadline)
        process = self._spawn()
        try:
            while not self.qmp_path.exists():
                if process.poll() is not None:
                    raise VMError(
                        f"qemu {self.name} exited with status {process.returncode}"
                        " during start-up",
                        process.returncode,
                        self.stderr_tail(),
                    )
                if time.monotonic() >= deadline:
                    raise VMError(
                        f"qemu {self.name} created no qmp socket within {timeout_s:g} s",
                        None,
                        self.stderr_tail(),
                    )
                await asyncio.sleep(_POLL_S)
        except BaseException:
            await self.terminate()
            raise

    # The three helpers below block only for a file open or a fork+exec (well under a
    # millisecond each), so they stay synchronous rather than go through a thread.

    def _ram_file_reusable(self) -> bool:
        try:
            size = self.ram_path.stat().st_size
            content = self.ram_content_path.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            return False
        return size == self.ram_size and content == self.ram_content

    def _create_sparse_ram(self) -> None:
        # Sparse: the destination's pages are all written by the migration.
        with open(self.ram_path, "wb") as ram:
            ram.truncate(self.ram_size)

    def _spawn(self) -> subprocess.Popen[bytes]:
        with contextlib.suppress(FileNotFoundError):
            self.qmp_path.unlink()  # a stale socket would look like a started QEMU
        cmd = self.command()
        logger.debug("= starting %s: %s", self.name, " ".join(cmd))
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        return self._process

    def _spawn_filler(self) -> subprocess.Popen[bytes]:
        # A short-lived child writes the RAM file, never this process: a 1 GiB file
        # written by the long-lived test process made QEMU migrate it 2-3x slower
        # (DESIGN §7, measured; cause unknown). Random bytes come from head, the other
        # contents from a child interpreter running write_ram_content.
        if self.ram_content == "random":
            with open(self.ram_path, "wb") as ram:
                return subprocess.Popen(
                    ["head", "-c", str(self.ram_size), "/dev/urandom"],
                    stdin=subprocess.DEVNULL,
                    stdout=ram,
                    stderr=subprocess.DEVNULL,
                )
        return subprocess.Popen(
            [sys.executable, "-c", _FILLER_SCRIPT, str(self.ram_path), str(self.ram_size),
             self.ram_content],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip

    async def _fill_ram(self, deadline: float) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.ram_content_path.unlink()  # until the new content is complete
        filler = self._spawn_filler()
        try:
            returncode = await _wait_process(filler, deadline - time.monotonic())
        except BaseException:
            _kill_and_reap(filler)
            raise
        what = f"{self.ram_size} bytes of {self.ram_content} ram"
        if returncode is None:
            _kill_and_reap(filler)
            raise VMError(f"writing {what} to {self.ram_path} timed out")
        size = self.ram_path.stat().st_size
        if returncode != 0 or size != self.ram_size:
            raise VMError(
                f"writing {what} for {self.name} failed: the filler exited {returncode},"
                f" wrote {size} bytes",
                returncode,
            )
        self.ram_content_path.write_text(self.ram_content + "\n", encoding="ascii")

    async def _create_disk(self, spec: DiskSpec, deadline: float) -> None:
        path = self.disk_path(spec)
        timeout_s = max(deadline - time.monotonic(), 0.001)
        if self.incoming and not spec.cdrom:
            await asyncio.to_thread(create_empty_image, path, spec, timeout_s=timeout_s)
        elif not (self.reuse_disks and _has_random_image(path, spec)):
            await asyncio.to_thread(create_random_image, path, spec, timeout_s=timeout_s)

    def stderr_tail(self) -> str:
        """Return the end of QEMU's stderr (QEMU explains its failures there)."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(0, os.SEEK_END)
                log.seek(max(log.tell() - _STDERR_TAIL_BYTES, 0))
                return log.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    async def wait(self, timeout_s: float | None = None) -> int:
        """Wait for QEMU to exit (after ``quit``, say) and return its status.

        Args:
            timeout_s: seconds; ``None`` waits forever.

        Raises:
            TimeoutError: QEMU still runs after ``timeout_s``; it is left running.
            VMError: the VM was never started.
        """
        if self._process is None:
            raise VMError(f"vm {self.name} was never started")
        returncode = await _wait_process(self._process, timeout_s)
        if returncode is None:
            raise TimeoutError(f"qemu {self.name} still running after {timeout_s:g} s")
        return returncode

    async def terminate(self, grace: float = _TERM_GRACE_S) -> int | None:
        """Stop QEMU: SIGTERM, then SIGKILL after ``grace`` seconds; always reaps it.

        Safe to call more than once, and on a VM that already exited or never started.

        Returns:
            QEMU's exit status, or ``None`` if it was never started.
        """
        process = self._process
        if process is None:
            return None
        if process.poll() is None:
            process.terminate()
            returncode = await _wait_process(process, grace)
            if returncode is None:
                logger.warning("! qemu %s ignored SIGTERM for %g s; killing it", self.name, grace)
                return _kill_and_reap(process)
        return process.wait()

    def kill(self) -> int | None:
        """SIGKILL and reap QEMU synchronously: the last resort of fixture teardown."""
        if self._process is None:
            return None
        return _kill_and_reap(self._process)


#: What the filler child runs: `write_ram_content` PATH SIZE CONTENT.
_FILLER_SCRIPT = (
    "import sys; from migrelay.lab.vm import write_ram_content; "
    "write_ram_content(sys.argv[1], int(sys.argv[2]), sys.argv[3])"
)

#: Words of the text RAM: log-line vocabulary, so that the text compresses as logs do.
_VOCABULARY = (
    "the of and to in is for on with that by this from at as are be was or an it not "
    "request response handled failed retry timeout connection session worker thread "
    "queue cache hit miss read write open close flush sync commit rollback begin end "
    "user admin service client server proxy backend frontend database table index row "
    "column query insert update delete select where order group limit offset join "
    "error warning info debug trace notice critical alert started stopped ready done "
    "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
    "november oscar papa quebec romeo sierra tango uniform victor whiskey xray yankee "
    "zulu kernel memory page frame buffer socket packet stream channel header payload "
    "status code path method GET POST PUT HEAD /api/v1/items /api/v2/users /static/js "
    "/var/lib/data /usr/share/doc #include static const struct return unsigned int "
    "char void if else while for switch case break continue default goto sizeof"
)
_WORDS = tuple(_VOCABULARY.split())
_LEVELS = ("INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR")


def _text_block(size: int, seed: int = 2026) -> bytes:
    """``size`` bytes of log-like text: words and numbers, never a zero byte.

    Times go up line by line and a few processes write, as in a real log: random
    numbers everywhere would compress less than logs do.
    """
    rng = random.Random(seed)  # fixed: the same RAM, run after run and host to host
    pids = [rng.randrange(1, 32768) for _ in range(8)]
    lines: list[str] = []
    length, millis, request = 0, 0, 100_000
    while length < size:
        millis += rng.randrange(40)
        request += rng.randrange(3)
        seconds, ms = divmod(millis, 1000)
        minutes, s = divmod(seconds, 60)
        words = " ".join(rng.choices(_WORDS, k=rng.randint(3, 10)))
        line = (
            f"2026-12-01T{minutes // 60 % 24:02}:{minutes % 60:02}:{s:02}.{ms:03}Z"
            f" {rng.choice(_LEVELS)} pid={rng.choice(pids)} {words} request={request}"
            f" took={rng.randrange(200)}ms\n"
        )
        lines.append(line)
        length += len(line)
    return "".join(lines).encode("ascii")[:size]


def write_ram_content(path: str | os.PathLike[str], size: int, content: str) -> None:
    """Write a RAM file of ``size`` bytes (a multiple of 1 MiB) holding ``content``.

    Blocking, and meant for a short-lived child process (`DisposableVM` runs it so). For
    ``random`` it reads ``/dev/urandom``; `DisposableVM` uses ``head`` instead.

    ``text``: one 1 MiB block of log-like text, written once per MiB, each time rotated
    by ``i * 4099`` bytes and after a line naming the MiB; 4099 is prime to 4096, so no
    two pages are equal in the first 4 GiB (QEMU does not look for equal pages, but a
    guest's RAM has few). ``zero``: a sparse file with a random page every
    `ZERO_RAM_RANDOM_PAGE_EVERY` pages.

    Raises:
        ValueError: an unknown content, or a size that is not a multiple of 1 MiB.
    """
    if content not in RAM_CONTENTS:
        raise ValueError(f"unknown ram content {content!r} (one of {', '.join(RAM_CONTENTS)})")
    if size < 0 or size % MIB:
        raise ValueError(f"ram size must be a multiple of 1 MiB, got {size}")
    with open(path, "wb") as ram:
        if content == "zero":
            ram.truncate(size)
            step = ZERO_RAM_RANDOM_PAGE_EVERY * _PAGE_BYTES
            for offset in range(0, size, step):
                ram.seek(offset)
                ram.write(os.urandom(_PAGE_BYTES))
            return
        block = _text_block(MIB) if content == "text" else b""
        doubled = memoryview(block + block)
        for index in range(size // MIB):
            if content == "random":
                ram.write(os.urandom(MIB))
                continue
            header = f"# ram block {index}\n".encode("ascii")
            start = index * 4099 % MIB
            ram.write(header)
            ram.write(doubled[start : start + MIB - len(header)])


def _has_random_image(path: Path, spec: DiskSpec) -> bool:
    """Whether a reusable image is there: raw of the right size, or any qcow2."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return False
    return spec.format != "raw" or size == spec.size


async def _wait_process(process: subprocess.Popen[bytes], timeout_s: float | None) -> int | None:
    """Poll ``process`` until it exits; return its status, or ``None`` on timeout."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while (returncode := process.poll()) is None:
        if deadline is not None and time.monotonic() >= deadline:
            return None
        await asyncio.sleep(_POLL_S)
    return returncode


def _kill_and_reap(process: subprocess.Popen[bytes]) -> int:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGKILL)
    return process.wait()
