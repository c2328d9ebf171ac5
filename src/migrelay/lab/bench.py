"""Migration benchmark: the tunnel against a direct TCP migration, same VMs, same run.

One question: how long does migrating N bytes of random RAM take through migrelay,
compared with QEMU's own TCP migration on the same machine? Modes are interleaved
(tcp, ws, tcp, ws, …) so that drift in the machine's load hits every mode alike, and
each is timed from ``migrate`` until the *destination's* ``query-migrate`` says
``completed``. Each run also reports the relays' CPU seconds per GiB and peak RSS
(from ``/proc``) and checks that the destination RAM equals the source's.

With a disk (``Bench(disk_size=...)``, ``migrelay bench --disk SIZE``) each test VM also
has one raw virtio disk, random bytes on the source and empty on the destination, and
every mode copies disk and RAM as ``migrate --copy-storage`` does (DESIGN §9): the
source mirrors the disk into the destination's NBD export until it is in sync, then RAM
migrates and the mirror ends in sync at switchover. Direct TCP mirrors to an export on
a TCP port; the tunnel modes carry the NBD connection as a storage channel of the
session (``SOCKET.nbd`` on both sides). Each run then reports the disk phase and the
RAM phase apart, and checks the destination's disk against the source's
(`migrelay.lab.disks.compare_images`).

The relays run as real ``migrelay serve`` / ``migrelay connect`` processes (and socat,
for the reference a WebSocket-free relay reaches).

Where the test VMs' RAM lives: on tmpfs (``/dev/shm``), always. With the RAM files under
an ext4 ``/tmp`` a direct TCP migration of 1 GiB took 4.37 s here, against 3.03 s on
tmpfs: QEMU reads and writes guest RAM through the file, both sides were slowed, and the
tunnel's overhead looked smaller than it is. Nobody migrates guest RAM that lives on
ext4. Without a usable ``/dev/shm`` the bench refuses to run (`tmpfs_ram_dir`).

What is migrated (`Workload`, `RAM_CONTENTS`): the RAM holds random bytes, text-like
bytes or mostly zero pages, and the source VM either stays paused (``idle``) or boots a
guest that rewrites N MiB, optionally at a set rate (``dirty:64M@20M``,
`migrelay.lab.guest`). A busy guest may never converge: each run is bounded
(``run_timeout``) and a run that did not complete in time is cancelled and reported as
``not converged``, with its passes and the CPU throttle QEMU applied.

Modes may add QEMU's multifd compression (``ws-multifd2-zstd``, ``tcp-multifd2-zlib``),
XBZRLE (``ws-xbzrle``), auto-converge (``…-ac``) or migrelay's convergence policy with
the run's timeout as its deadline (``…-steps``, ``…-pause``), see `Mode`. Then QEMU's own
``transferred`` says little: QEMU 7.2 counts multifd pages *before* compression (and
applies ``max-bandwidth`` to them; measured here: 128 MiB of text-like RAM, multifd 2,
20 MiB/s limit: 6.3 s and "transferred 128 MiB" both with and without zstd). So each
run also counts the bytes on the wire, where they can be seen: with ``--link``, the
source veth's ``tx_bytes`` (every mode alike, direct TCP included, with TCP/IP, TLS and
WebSocket overheads); without, the destination relay's payload count from its
``/metrics`` (tunnel modes), or else QEMU's ``transferred`` (direct modes, socat),
marked as such (`WIRE_SOURCES`).

Before and after (``run_bench(baseline=...)``, ``migrelay bench --baseline DIR``): every
mode migrelay's relays carry (``ws``, ``wss``, with any options) runs a second time in
each round, right after the first, with another checkout's relays (`baseline_command`),
labelled ``base:ws-multifd4`` (`BASELINE_PREFIX`); direct TCP, unix and socat run once.
Each pair is then compared round by round (`Paired`): the two runs of a round share
the machine's load of the moment, so their difference cancels most of the drift that
separate benches, run one after the other, would both carry. `migrelay.lab.relaybench`
does the same for the relays alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import platform
import re
import shlex
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from migrelay.aio.local import storage_socket
from migrelay.control.convergence import ConvergencePolicy, ConvergenceWatch, OnTimeout
from migrelay.control.migration import (
    DEFAULT_STALL_TIMEOUT_S,
    MigrationOptions,
    cancel_outgoing,
    follow_migration,
    prepare_incoming,
    start_migration,
    wait_destination_completed,
)
from migrelay.control.qmp import QMP, MigrationInfo
from migrelay.control.storage import SourceMirrors, export_disks, select_disks, unexport_disks
from migrelay.errors import NotConvergingError, RelayError
from migrelay.lab.disks import DiskSpec, compare_images
from migrelay.lab.guest import (
    MIN_START as GUEST_DIRTY_START,
    dirty_rate_pages_per_tick,
    dirtying_guest,
    floppy_args,
    guest_counter,
    reset_guest_counter,
)
from migrelay.lab.netns import LinkedNamespaces
from migrelay.lab.vm import RAM_CONTENTS, DisposableVM, first_difference
from migrelay.units import GIB, MIB, parse_size

#: Seconds one migration may take before the run counts as failed (idle workload).
RUN_TIMEOUT_S = 600.0
#: With a dirtying guest: a run not completed by then is cancelled as not converging.
#: A 256 MiB guest on a 100 Mbit link needs about 25 s for its first pass.
DIRTY_RUN_TIMEOUT_S = 120.0
#: How often the source's ``query-migrate`` is sampled during a run (passes, throttle).
SOURCE_POLL_S = 0.2
#: Seconds a dirtying guest may take to boot (SeaBIOS under TCG) and start its loop.
GUEST_BOOT_TIMEOUT_S = 60.0
#: Where the test VMs' RAM files go: tmpfs (see the module docstring).
TMPFS_DIR = Path("/dev/shm")
#: Free space kept on the tmpfs beyond the two RAM files (and disks, when there).
TMPFS_MARGIN_BYTES = 256 * MIB
#: XBZRLE cache when the workload does not ask more: QEMU's own default (64 MiB).
XBZRLE_CACHE_MIN_BYTES = 64 * MIB
#: How ``wire_bytes`` was counted: at the source veth (``--link``), by the destination
#: relay (its ``/metrics``: WebSocket payload, what QEMU wrote), or taken from QEMU's
#: ``transferred`` (direct modes without ``--link``: nothing else sees their bytes).
WIRE_SOURCES = ("link", "relay", "qemu")
#: Seconds to wait for a relay to listen.
RELAY_START_TIMEOUT_S = 20.0
#: How often the disk phase polls the mirror: its end is timed to this.
DISK_POLL_S = 0.05
#: Seconds ``qemu-img compare`` may take over the two disks after a run.
DISK_COMPARE_TIMEOUT_S = 300.0
_CLK_TCK = os.sysconf("SC_CLK_TCK")


#: The transports a mode name starts with.
TRANSPORTS = ("tcp", "unix", "ws", "wss", "socat")
#: QEMU's multifd compression methods (``multifd-compression``).
COMPRESSIONS = ("zstd", "zlib")
#: migrelay's convergence policies (`migrelay.control.convergence`), by mode suffix:
#: ``steps`` is ``migrate``'s default (raise the downtime limit while precopy does not
#: converge, cancel at the deadline), ``pause`` the same but at the deadline QEMU
#: pauses the guest and sends the rest (``--on-timeout pause``).
POLICIES = ("steps", "pause")
#: Seconds the bench waits beyond a policy's deadline before it cancels the run itself.
POLICY_GRACE_S = 60.0
#: The label of a mode run with the baseline checkout's relays: ``base:ws-multifd4``
#: (here and in `migrelay.lab.relaybench`).
BASELINE_PREFIX = "base:"


@dataclass(frozen=True)
class Mode:
    """One way to migrate: a transport and QEMU's options.

    Names are ``TRANSPORT[-multifdN[-zstd|-zlib]][-xbzrle][-ac][-steps|-pause]``:
    ``tcp``, ``ws``, ``ws-multifd4``, ``ws-multifd2-zstd`` (multifd with zstd, QEMU's
    level 1), ``tcp-xbzrle`` (pages dirtied again sent as XBZRLE differences; not with
    multifd), ``ws-ac`` (auto-converge: QEMU throttles a guest that dirties faster than
    the link), ``ws-steps`` and ``ws-pause`` (migrelay's convergence policy, `POLICIES`,
    with the run's timeout as its deadline). Without a policy a run is QEMU's precopy
    alone, cancelled by the bench at the timeout. ``base:`` before a ws or wss mode
    (``base:ws-multifd4``): the same, through the baseline checkout's relays.
    """

    name: str
    transport: str
    multifd: int | None = None
    compress: str | None = None
    xbzrle: bool = False
    auto_converge: bool = False
    policy: str | None = None
    #: Run with the baseline checkout's relays (`BASELINE_PREFIX`).
    baseline: bool = False

    @classmethod
    def parse(cls, text: str) -> Mode:
        """Parse a mode name (see the class docstring).

        Raises:
            ValueError: an unknown transport or option, options QEMU refuses
                together (compression without multifd, XBZRLE with multifd), ``base:``
                before a mode migrelay's relays do not carry.
        """
        bare = text.removeprefix(BASELINE_PREFIX)
        baseline = bare != text
        transport, *options = bare.split("-")
        if transport not in TRANSPORTS:
            raise ValueError(
                f"unknown mode {text!r} ({', '.join(TRANSPORTS)}, then -multifdN, -zstd,"
                " -zlib, -xbzrle, -ac, -steps, -pause)"
            )
        if baseline and transport not in ("ws", "wss"):
            raise ValueError(f"{text}: only ws and wss modes run with the baseline's relays")
        multifd = None
        compress = None
        policy = None
        flags: set[str] = set()
        for option in options:
            if option.startswith("multifd") and multifd is None:
                count = option.removeprefix("multifd")
                if not count.isdigit() or not 1 <= int(count) <= 255:
                    raise ValueError(f"bad channel count in mode {text!r}")
                multifd = int(count)
            elif option in COMPRESSIONS and compress is None:
                compress = option
            elif option in ("xbzrle", "ac") and option not in flags:
                flags.add(option)
            elif option in POLICIES and policy is None:
                policy = option
            else:
                raise ValueError(f"unknown or repeated option {option!r} in mode {text!r}")
        mode = cls(
            text, transport, multifd, compress, "xbzrle" in flags, "ac" in flags, policy, baseline
        )
        mode.options()  # QEMU's rules on what goes together, said now
        return mode

    def options(self, xbzrle_cache: int = XBZRLE_CACHE_MIN_BYTES) -> MigrationOptions:
        """The migration options of this mode.

        Args:
            xbzrle_cache: the XBZRLE cache in bytes, for an ``-xbzrle`` mode.

        Raises:
            ValueError: options that do not go together (`MigrationOptions`).
        """
        return MigrationOptions(
            multifd_channels=self.multifd,
            compress=self.compress,
            xbzrle_cache=xbzrle_cache if self.xbzrle else None,
            auto_converge=self.auto_converge,
        )

    def convergence(self, deadline_s: float) -> ConvergencePolicy | None:
        """The mode's convergence policy with this deadline; None: QEMU alone."""
        if self.policy is None:
            return None
        on_timeout = OnTimeout.PAUSE if self.policy == "pause" else OnTimeout.CANCEL
        return ConvergencePolicy(timeout_s=deadline_s, on_timeout=on_timeout)

    @property
    def direct(self) -> bool:
        """Whether QEMU migrates without migrelay's relays (tcp, unix, socat)."""
        return self.transport not in ("ws", "wss")


@dataclass(frozen=True)
class Workload:
    """What the source VM does while it migrates.

    ``idle``: nothing (paused from the start, as every test VM was before).
    ``dirty:SIZE[@RATE]``: it boots `migrelay.lab.guest`'s guest, which rewrites SIZE
    bytes of its RAM (from 1 MiB up) over and over, at RATE bytes a second if given
    (``dirty:64M@20M``), else as fast as TCG runs it.
    """

    name: str
    dirty_bytes: int = 0
    rate_bytes_per_s: int | None = None

    @classmethod
    def parse(cls, text: str) -> Workload:
        """Parse ``idle`` or ``dirty:SIZE[@RATE]`` (sizes as ``--ram``'s, rate per second).

        Raises:
            ValueError: anything else, a size that is not a multiple of 4 KiB.
        """
        if text == "idle":
            return cls("idle")
        kind, _, spec = text.partition(":")
        if kind != "dirty" or not spec:
            raise ValueError(f"unknown workload {text!r} (idle, dirty:SIZE[@RATE])")
        size_text, _, rate_text = spec.partition("@")
        size = parse_size(size_text)
        if size <= 0 or size % 4096:
            raise ValueError(f"dirty size must be a positive multiple of 4 KiB, got {size}")
        rate = parse_size(rate_text) if rate_text else None
        if rate is not None and rate <= 0:
            raise ValueError(f"dirty rate must be positive, got {rate_text!r}")
        return cls(text, size, rate)

    @property
    def dirties(self) -> bool:
        """Whether a guest runs and dirties RAM."""
        return self.dirty_bytes > 0

    @property
    def pages_per_tick(self) -> int | None:
        """The guest's rate limit (`migrelay.lab.guest.dirtying_guest`); None: none."""
        if self.rate_bytes_per_s is None:
            return None
        return dirty_rate_pages_per_tick(self.rate_bytes_per_s)

    def check_ram(self, ram_size: int) -> None:
        """Raise ValueError unless the guest's range fits in ``ram_size`` bytes of RAM."""
        if self.dirties and GUEST_DIRTY_START + self.dirty_bytes > ram_size:
            raise ValueError(
                f"workload {self.name} dirties up to {GUEST_DIRTY_START + self.dirty_bytes}"
                f" bytes (from 1 MiB), more than the {ram_size} bytes of RAM"
            )


def available_modes(names: Sequence[str], *, baseline: bool = False) -> list[Mode]:
    """Parse mode names, dropping socat when it is not installed (said on stderr).

    With ``baseline``, ``base:MODE`` right after each mode migrelay's relays carry (ws,
    wss, with any options): the two run back to back in every round.

    Raises:
        ValueError: an unknown mode, a ``base:`` mode without ``baseline``, with
            ``baseline`` a mode given twice (its runs are paired by round).
    """
    modes = [Mode.parse(name) for name in names]
    if shutil.which("socat") is None and any(m.transport == "socat" for m in modes):
        print("bench: socat is not installed; skipping the socat mode", file=sys.stderr)
        modes = [m for m in modes if m.transport != "socat"]
    if not baseline:
        for mode in modes:
            if mode.baseline:
                raise ValueError(
                    f"{mode.name}: base: modes need a baseline checkout (--baseline DIR)"
                )
        return modes
    paired: list[Mode] = []
    for mode in modes:
        wanted = [mode]
        if not mode.direct and not mode.baseline:
            wanted.append(Mode.parse(BASELINE_PREFIX + mode.name))
        for each in wanted:
            if any(each.name == known.name for known in paired):
                raise ValueError(f"mode {each.name} given twice")
            paired.append(each)
    return paired


@dataclass
class RunResult:
    """One migration."""

    mode: str
    run: int
    #: The guest RAM of the VMs migrated: the test VMs' ``--ram``, or what the user's
    #: source VM reports (``query-memory-size-summary``). Rates and CPU per GiB are of it.
    ram_bytes: int | None = None
    #: ``completed``, ``not converged`` (still running at the run's timeout: cancelled),
    #: or ``failed`` (see ``error``).
    outcome: str = "failed"
    #: From the start of the copy (the disk's, else RAM's) until the destination says
    #: ``completed``.
    seconds: float | None = None
    #: With a disk: the disk phase (mirror started until in sync) and the RAM phase
    #: (``migrate`` until the destination completed, the switchover included).
    disk_seconds: float | None = None
    ram_seconds: float | None = None
    source_total_time_ms: int | None = None
    downtime_ms: int | None = None
    throughput_bytes_per_s: float | None = None
    relay_cpu_seconds: dict[str, float] = field(default_factory=dict)
    relay_peak_rss_bytes: dict[str, int] = field(default_factory=dict)
    #: Bytes on the wire from source to destination, counted as ``wire_source`` says
    #: (one of `WIRE_SOURCES`).
    wire_bytes: int | None = None
    wire_source: str | None = None
    #: QEMU's ``ram.transferred`` at the end (multifd: counted before compression).
    transferred_bytes: int | None = None
    #: Dirty-bitmap syncs (``dirty-sync-count``): 2-3 for a paused VM.
    passes: int | None = None
    #: The largest ``cpu-throttle-percentage`` seen (auto-converge); 0: none.
    max_throttle_percent: int = 0
    #: With a convergence policy: the downtime limit it ended with (ms), and its
    #: verdict when it cancelled (``not converging: …``).
    downtime_limit_ms: int | None = None
    policy_verdict: str | None = None
    #: None when not checked (the user's own VMs, a run that did not converge).
    ram_matched: bool | None = False
    #: Whether the destination's disk equals the source's; None: no disk.
    disk_matched: bool | None = None
    error: str | None = None


@dataclass
class ModeSummary:
    """Medians over the runs of one mode."""

    mode: str
    runs: int
    failures: int
    #: The whole copy: disk and RAM.
    median_seconds: float | None
    #: With a disk, its phases (None without).
    median_disk_seconds: float | None
    median_ram_seconds: float | None
    #: RAM and disk bytes over the median time.
    median_throughput_bytes_per_s: float | None
    median_downtime_ms: float | None
    #: Median time over direct TCP's with the same options (else the same multifd
    #: channel count, else plain TCP's).
    ratio_to_tcp: float | None
    relay_cpu_seconds_per_gib: dict[str, float]
    relay_peak_rss_bytes: dict[str, int]
    #: False: a run's destination RAM differed; True: compared, and equal; None: not
    #: compared in any run (the user's own VMs, runs that did not complete).
    all_ram_matched: bool | None
    #: None: no disk.
    all_disks_matched: bool | None
    #: Runs cancelled at their timeout (a guest dirtying faster than the link).
    not_converged: int = 0
    #: Medians over the completed runs; how the wire bytes were counted.
    median_wire_bytes: float | None = None
    wire_source: str | None = None
    median_transferred_bytes: float | None = None
    median_passes: float | None = None
    #: Over every run, the non-converged included.
    max_throttle_percent: int = 0
    #: ws/wss rows with a baseline (the ``base:`` row of the same mode): the median
    #: time over the baseline's, and the per-round differences of ``seconds`` (this
    #: checkout's minus the baseline's, rounds where both completed, `Paired`): their
    #: mean, its standard error, how many rounds this checkout was faster in.
    baseline_time_ratio: float | None = None
    paired_seconds_diff: float | None = None
    paired_seconds_diff_stderr: float | None = None
    paired_rounds: int = 0
    rounds_faster_than_baseline: int = 0


@dataclass(frozen=True)
class Paired:
    """A figure of this checkout against the baseline's, paired by round.

    The differences (this checkout's minus the baseline's, rounds where both have the
    figure): two runs of one round share the machine's load of the moment, so their
    difference cancels most of the drift a shared machine adds to both.
    """

    rounds: int
    #: Rounds where this checkout's figure was the lower.
    lower: int
    mean: float | None
    #: The standard error of ``mean`` (from two rounds on).
    stderr: float | None

    @classmethod
    def by_round(
        cls, mine: Mapping[int, float | None], baseline: Mapping[int, float | None]
    ) -> Paired:
        """Pair the two checkouts' figures, each by its round number."""
        diffs = [
            value - theirs
            for run, value in mine.items()
            if value is not None and (theirs := baseline.get(run)) is not None
        ]
        return cls(
            rounds=len(diffs),
            lower=sum(diff < 0 for diff in diffs),
            mean=statistics.mean(diffs) if diffs else None,
            stderr=statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else None,
        )


def format_paired(mean: float | None, stderr: float | None) -> str:
    """A `Paired` mean as the tables print it: ``+0.123 ± 0.045``, ``-`` without one."""
    text = f"{mean:+.3f}" if mean is not None else "-"
    return text + (f" ± {stderr:.3f}" if stderr is not None else "")


def baseline_command(checkout: Path) -> list[str]:
    """How to run another checkout's migrelay: its own ``.venv``'s interpreter.

    Raises:
        ValueError: ``checkout`` has no ``.venv/bin/python``.
    """
    python = checkout / ".venv" / "bin" / "python"
    if not python.exists():
        raise ValueError(f"baseline {checkout} has no .venv/bin/python (run its tools/setup)")
    return [str(python), "-m", "migrelay"]


def relay_command(
    mode_name: str,
    baseline_mode: bool,
    migrelay: Sequence[str],
    relay_args: Sequence[str],
    baseline: Sequence[str] | None,
    baseline_relay_args: Sequence[str],
) -> tuple[Sequence[str], Sequence[str]]:
    """The command that runs a mode's relays, and the extra arguments that follow their
    own: this checkout's, or for a ``base:`` mode the baseline checkout's (both benches).

    Raises:
        RelayError: a ``base:`` mode without a baseline checkout.
    """
    if not baseline_mode:
        return migrelay, relay_args
    if baseline is None:
        raise RelayError(f"mode {mode_name} needs a baseline checkout")
    return baseline, baseline_relay_args


class _Process:
    """A relay process whose CPU time and peak RSS are read before it is stopped.

    Both cover the process's whole tree: socat copies in a child it forks per connection,
    so its parent alone would show next to nothing.
    """

    def __init__(self, name: str, argv: list[str], log: Path) -> None:
        self.name = name
        with open(log, "wb") as out:
            self.popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out)
        self.log = log
        self._peak_tree_rss = 0

    def cpu_seconds(self) -> float:
        """CPU seconds of the tree: each live process's own and its reaped children's."""
        return sum(_cpu_seconds(pid) for pid in _process_tree(self.popen.pid))

    def thread_cpu_seconds(self) -> dict[str, float]:
        """CPU seconds of each thread of the process itself, by its kernel name (``comm``;
        the relay's worker threads are ``migrelay-wN``); the main thread is ``main``."""
        pid = self.popen.pid
        threads: dict[str, float] = {}
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                try:
                    name = "main" if task.name == str(pid) else (task / "comm").read_text().strip()
                    fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue  # ended meanwhile
                # utime, stime: fields 14-15 of proc(5); [0] here is field 3.
                seconds = (int(fields[11]) + int(fields[12])) / _CLK_TCK
                threads[name] = threads.get(name, 0.0) + seconds
        return threads

    def sample_rss(self) -> None:
        """Note the tree's summed resident memory (call it while the relay works)."""
        total = sum(_status_kib(pid, "VmRSS:") for pid in _process_tree(self.popen.pid))
        self._peak_tree_rss = max(self._peak_tree_rss, total * 1024)

    def peak_rss(self) -> int:
        """The largest of the parent's own peak and the tree's sampled sums."""
        return max(_status_kib(self.popen.pid, "VmHWM:") * 1024, self._peak_tree_rss)

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(5)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (``/proc/PID/task/TID/children``)."""
    tree, index = [pid], 0
    while index < len(tree):
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{tree[index]}/task").iterdir():
                with contextlib.suppress(OSError):
                    tree += [int(child) for child in (task / "children").read_text().split()]
        index += 1
    return tree


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0  # gone meanwhile: its parent's cutime/cstime holds it once reaped
    # utime, stime, cutime, cstime are fields 14-17 of proc(5); [0] here is field 3.
    return sum(int(value) for value in fields[11:15]) / _CLK_TCK


def _status_kib(pid: int, key: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    return 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _wait_listening(check: Callable[[], bool], process: _Process) -> None:
    deadline = time.monotonic() + RELAY_START_TIMEOUT_S
    while not check():
        if process.popen.poll() is not None:
            raise RelayError(f"{process.name} exited: {process.log.read_text()[-500:]}")
        if time.monotonic() > deadline:
            raise RelayError(f"{process.name} did not start listening")
        await asyncio.sleep(0.02)


def _port_open(port: int, process: _Process) -> bool:
    """Whether something listens on TCP ``port`` in ``process``'s network namespace.

    Checked in /proc rather than by connecting: a test connection would be a session
    of its own, handed on to destination QEMU as an empty migration stream.
    """
    for table in (f"/proc/{process.popen.pid}/net/tcp", f"/proc/{process.popen.pid}/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                # local_address is HEX_IP:HEX_PORT; state 0A is LISTEN.
                if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                    return True
    return False


def make_certificate(workdir: Path) -> tuple[Path, Path]:
    """Write a self-signed certificate for localhost (openssl) and return (cert, key)."""
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    if not cert.exists():
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
             "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", str(key), "-out", str(cert),
             "-days", "2", "-subj", "/CN=localhost",
             "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
            check=True, capture_output=True,
        )  # fmt: skip
    return cert, key


def check_disk_size(size: int) -> None:
    """Raise ValueError unless ``size`` suits a test VM's disk: a positive multiple of 1 MiB."""
    if size <= 0 or size % MIB:
        raise ValueError(f"disk size must be a positive multiple of 1 MiB, got {size} bytes")


def tmpfs_ram_dir(needed_bytes: int, base: Path = TMPFS_DIR) -> Path:
    """Check that ``base`` is a tmpfs with room for ``needed_bytes`` (and a margin).

    Returns:
        ``base``.

    Raises:
        RelayError: ``base`` is missing, not a tmpfs, or too small; the bench never falls
            back to a disk, whose figures would mislead (see the module docstring).
    """
    if not base.is_dir() or not _on_tmpfs(base):
        raise RelayError(
            f"{base} is not a tmpfs: the bench keeps test-VM RAM on tmpfs (a disk slows"
            " QEMU's RAM reads and writes); mount one there (mount -t tmpfs tmpfs /dev/shm)"
        )
    stat = os.statvfs(base)
    free = stat.f_bavail * stat.f_frsize
    if free < needed_bytes + TMPFS_MARGIN_BYTES:
        raise RelayError(
            f"{base} has {free // MIB} MiB free; the test VMs need {needed_bytes // MIB} MiB"
            f" there (and {TMPFS_MARGIN_BYTES // MIB} MiB to spare): use less --ram, or"
            f" grow it (mount -o remount,size=…  {base})"
        )
    return base


class Bench:
    """Runs migrations of one RAM size (and disk size) in the chosen modes.

    Args:
        ram_size: guest RAM in bytes (written once and reused by every run).
        workdir: where VMs, sockets and logs live.
        migrelay: the command that runs migrelay (default: this interpreter's module).
        disk_size: give each test VM a disk of this many bytes (random on the source,
            written once and reused; empty on the destination, new every run), copied
            before RAM; ``None``: no disk.
        workload: what the source does while it migrates (default: idle).
        ram_content: what its RAM holds (`migrelay.lab.vm.RAM_CONTENTS`).
        ram_dir: where the RAM files go (`run_bench` passes a tmpfs); default: workdir.
        run_timeout: seconds a migration may take; past it, a dirtying guest's run is
            cancelled as not converged, any other run fails. Default: `RUN_TIMEOUT_S`,
            `DIRTY_RUN_TIMEOUT_S` with a dirtying workload.
        baseline: the command of the baseline checkout's migrelay (`baseline_command`),
            for ``base:`` modes.
        relay_args, baseline_relay_args: extra arguments for both relays of this
            checkout, of the baseline (``--max-message 4M``).

    Raises:
        ValueError: a workload that does not fit in the RAM, an unknown RAM content.
    """

    def __init__(
        self,
        ram_size: int,
        workdir: Path,
        migrelay: Sequence[str] | None = None,
        link: LinkedNamespaces | None = None,
        disk_size: int | None = None,
        *,
        workload: Workload | None = None,
        ram_content: str = "random",
        ram_dir: Path | None = None,
        run_timeout: float | None = None,
        baseline: Sequence[str] | None = None,
        relay_args: Sequence[str] = (),
        baseline_relay_args: Sequence[str] = (),
    ) -> None:
        self.workload = workload or Workload("idle")
        self.workload.check_ram(ram_size)
        if ram_content not in RAM_CONTENTS:
            raise ValueError(f"unknown ram content {ram_content!r} ({', '.join(RAM_CONTENTS)})")
        self.ram_content = ram_content
        self.ram_dir = ram_dir
        if run_timeout is None:
            run_timeout = DIRTY_RUN_TIMEOUT_S if self.workload.dirties else RUN_TIMEOUT_S
        self.run_timeout = run_timeout
        self.ram_size = ram_size
        self.disk = DiskSpec("disk0", disk_size) if disk_size else None
        self.workdir = workdir
        self.migrelay = list(migrelay or [sys.executable, "-m", "migrelay"])
        self.baseline = list(baseline) if baseline is not None else None
        self.relay_args = list(relay_args)
        self.baseline_relay_args = list(baseline_relay_args)
        self.link = link
        #: Source-side and destination-side command prefixes, and the address the
        #: destination host listens on.
        self.src_prefix: tuple[str, ...] = link.prefix(link.source_ns) if link else ()
        self.dst_prefix: tuple[str, ...] = link.prefix(link.dest_ns) if link else ()
        self.dest_host = link.dest_addr if link else "127.0.0.1"

    def _guest_args(self) -> tuple[str, ...]:
        """QEMU arguments of the workload: the dirtying guest's floppy, or none."""
        workload = self.workload
        if not workload.dirties:
            return ()
        image = self.workdir / "guest.img"
        if not image.exists():
            dirtying_guest(
                image, size=workload.dirty_bytes, pages_per_tick=workload.pages_per_tick
            )
        return floppy_args(image)

    async def run(self, mode: Mode, run: int) -> RunResult:
        """Migrate once in ``mode``; failures are reported in the result, not raised."""
        result = RunResult(mode.name, run, ram_bytes=self.ram_size)
        disks = [self.disk] if self.disk is not None else []
        if self.disk is not None:
            result.disk_matched = False  # until compared
        guest = self._guest_args()
        src = DisposableVM(
            self.workdir,
            "src",
            self.ram_size,
            reuse_ram=True,
            command_prefix=self.src_prefix,
            disks=disks,
            reuse_disks=True,
            ram_dir=self.ram_dir,
            ram_content=self.ram_content,
            extra_args=guest,
        )
        dst = DisposableVM(
            self.workdir,
            "dst",
            self.ram_size,
            incoming=True,
            command_prefix=self.dst_prefix,
            disks=disks,
            ram_dir=self.ram_dir,
            extra_args=guest,
        )
        relays: list[_Process] = []
        keep = os.environ.get("MIGRELAY_BENCH_KEEP")
        try:
            await src.start(timeout_s=120)
            await dst.start()
            async with QMP("bench-src") as src_qmp, QMP("bench-dst") as dst_qmp:
                await src_qmp.connect(str(src.qmp_path))
                await dst_qmp.connect(str(dst.qmp_path))
                if self.workload.dirties:
                    await _start_guest(src_qmp, src)
                await self._migrate(mode, src_qmp, dst_qmp, relays, result)
                if result.outcome != "completed":
                    # Cancelled: the source runs on, the destination has ended its
                    # incoming migration (QEMU exits then); nothing to compare.
                    result.ram_matched = None
                    if self.disk is not None:
                        result.disk_matched = None
                    return result
                await src_qmp.quit()
                await dst_qmp.quit()
            await src.wait(30)
            await dst.wait(30)
            result.ram_matched = first_difference(src.ram_path, dst.ram_path) is None
            problems = [] if result.ram_matched else ["destination RAM differs from the source"]
            if self.disk is not None:
                difference = await asyncio.to_thread(
                    compare_images,
                    src.disk_path(self.disk),
                    dst.disk_path(self.disk),
                    timeout_s=DISK_COMPARE_TIMEOUT_S,
                )
                result.disk_matched = difference is None
                if difference is not None:
                    problems.append(f"destination disk differs from the source: {difference}")
            if problems:
                result.error = "; ".join(problems)
        except Exception as exc:  # a failed run is a result, not the end of the bench
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            for relay in relays:
                relay.stop()
            if keep and result.error:
                print(f"bench: kept {self.workdir} for inspection", file=sys.stderr)
            await src.terminate()
            await dst.terminate()
            for path in (dst.ram_path, *dst.disk_paths.values()):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        return result

    async def run_given(self, mode: Mode, src_qmp_path: Path, dst_qmp_path: Path) -> RunResult:
        """Migrate the user's own two VMs once (destination started ``-incoming defer``).

        They are left as QEMU leaves them (source ``postmigrate``, destination
        running); their RAM is not compared (``ram_matched`` stays None) since where
        it lives is not known here. Their RAM size is the source's own
        (``query-memory-size-summary``), not ``ram_size``: the rate is of what moved.
        """
        if self.disk is not None:
            raise ValueError("a disk is for test VMs; the user's own VMs keep theirs")
        result = RunResult(mode.name, 1, ram_matched=None)
        relays: list[_Process] = []
        try:
            async with QMP("bench-src") as src_qmp, QMP("bench-dst") as dst_qmp:
                await src_qmp.connect(str(src_qmp_path))
                await dst_qmp.connect(str(dst_qmp_path))
                result.ram_bytes = await src_qmp.query_memory_size()
                await self._migrate(mode, src_qmp, dst_qmp, relays, result)
        except Exception as exc:  # a failed run is a result, not the end of the bench
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            for relay in relays:
                relay.stop()
        return result

    async def _migrate(
        self,
        mode: Mode,
        src_qmp: QMP,
        dst_qmp: QMP,
        relays: list[_Process],
        result: RunResult,
    ) -> None:
        """Plumb, migrate, and time until the destination says completed.

        A migration still running at ``run_timeout`` is cancelled; with a dirtying
        guest that is a result (``not converged``), else the run fails.
        """
        options = mode.options(self._xbzrle_cache())
        out_uri, nbd_server, metrics = await self._plumb(mode, dst_qmp, options, relays)
        mirrors = None
        if nbd_server is not None:
            mirrors = SourceMirrors(select_disks(await src_qmp.query_block(), None), nbd_server)
            await mirrors.clear_leftovers(src_qmp)
        # Start-up CPU (the interpreter, imports) is not the migration's.
        idle_cpu = {relay.name: relay.cpu_seconds() for relay in relays}
        wire_before = await self._link_tx_bytes()
        sampler = asyncio.ensure_future(_sample_rss(relays))
        watcher = asyncio.ensure_future(_watch_source(src_qmp, result))
        policy = mode.convergence(self.run_timeout)
        started = time.monotonic()
        try:
            # With a policy its deadline ends the run; the bench's own is a safety net.
            async with asyncio.timeout(self.run_timeout + (POLICY_GRACE_S if policy else 0)):
                if mirrors is None:
                    await start_migration(src_qmp, out_uri, options)
                    if policy is not None:
                        watch = ConvergenceWatch(policy, started)
                        try:
                            await follow_migration(
                                src_qmp, interval=SOURCE_POLL_S, convergence=watch
                            )
                        finally:
                            result.downtime_limit_ms = watch.downtime_limit_ms
                            result.policy_verdict = watch.stall
                else:
                    await self._copy_disks(src_qmp, mirrors)
                    result.disk_seconds = time.monotonic() - started
                    await self._migrate_ram_after_disks(src_qmp, out_uri, options, mirrors)
                await wait_destination_completed(
                    dst_qmp, self.run_timeout + (POLICY_GRACE_S if policy else 0)
                )
            result.seconds = time.monotonic() - started
            if result.disk_seconds is not None:
                result.ram_seconds = result.seconds - result.disk_seconds
        except NotConvergingError as exc:  # the policy cancelled it at its deadline
            _note_source(result, await src_qmp.query_migrate())
            result.outcome = "not converged"
            result.policy_verdict = str(exc)
            return
        except TimeoutError:
            final = await _cancel_quietly(src_qmp)
            if final is not None:
                _note_source(result, final)
            if not self.workload.dirties:
                raise
            result.outcome = "not converged"
            result.error = None
            return
        finally:
            for task in (sampler, watcher):
                task.cancel()
            await asyncio.gather(sampler, watcher, return_exceptions=True)
        result.outcome = "completed"
        if mirrors is not None:
            if left := await mirrors.remove(src_qmp):
                raise RelayError(f"the disk copy left behind: {'; '.join(left)}")
            await unexport_disks(dst_qmp)
        # socat's per-connection children exit once QEMU closed its end: let them be
        # reaped, so that their CPU time shows in the parent's cutime.
        await _children_reaped(relays)
        info = await src_qmp.query_migrate()
        _note_source(result, info)
        result.source_total_time_ms = info.total_time_ms
        result.downtime_ms = info.downtime_ms
        await self._count_wire_bytes(mode, result, wire_before, metrics)
        disk_bytes = self.disk.size if self.disk is not None else 0
        # The RAM of the VMs migrated (seen: the user's 256 MiB VMs rated as the 1 GiB
        # of --ram's default, 2771 MiB/s for ~700); QEMU's ram.total if QEMU did not say.
        ram_bytes = result.ram_bytes or info.total or self.ram_size
        result.throughput_bytes_per_s = (ram_bytes + disk_bytes) / result.seconds
        for relay in relays:
            used = relay.cpu_seconds() - idle_cpu[relay.name]
            result.relay_cpu_seconds[relay.name] = used
            result.relay_peak_rss_bytes[relay.name] = relay.peak_rss()

    def _xbzrle_cache(self) -> int:
        """The XBZRLE cache: QEMU's 64 MiB, or the guest's dirty range (a power of 2:
        QEMU 7.2 rounds the cache down to one), at most the RAM."""
        wanted = 1 << max(self.workload.dirty_bytes - 1, 0).bit_length()
        return min(max(XBZRLE_CACHE_MIN_BYTES, wanted), self.ram_size)

    async def _link_tx_bytes(self) -> int | None:
        """The source veth's ``tx_bytes`` (with ``--link``), else None."""
        if self.link is None:
            return None
        return await asyncio.to_thread(_tx_bytes, self.link.source_ns, self.link.source_dev)

    async def _count_wire_bytes(
        self, mode: Mode, result: RunResult, wire_before: int | None, metrics: _Metrics | None
    ) -> None:
        """Fill ``wire_bytes`` after a completed run, from the best source there is."""
        wire_after = await self._link_tx_bytes()
        if wire_before is not None and wire_after is not None:
            result.wire_bytes, result.wire_source = wire_after - wire_before, "link"
        elif metrics is not None:
            result.wire_bytes = await asyncio.to_thread(metrics.bytes_to_destination)
            result.wire_source = "relay"
        else:
            result.wire_bytes, result.wire_source = result.transferred_bytes, "qemu"

    async def _copy_disks(self, src_qmp: QMP, mirrors: SourceMirrors) -> None:
        """The disk phase, as ``migrate --copy-storage`` runs it: mirror until in sync."""
        await mirrors.start(src_qmp)
        await mirrors.wait_ready(
            src_qmp,
            timeout_s=RUN_TIMEOUT_S,
            stall_timeout_s=DEFAULT_STALL_TIMEOUT_S,
            interval=DISK_POLL_S,
        )

    async def _migrate_ram_after_disks(
        self, src_qmp: QMP, uri: str, options: MigrationOptions, mirrors: SourceMirrors
    ) -> None:
        """RAM with the mirrors in sync: they end at switchover (`follow_migration`)."""
        await start_migration(src_qmp, uri, options, pause_before_switchover=True)
        try:
            async with asyncio.timeout(self.run_timeout):
                await follow_migration(
                    src_qmp, storage=mirrors, stall_timeout=DEFAULT_STALL_TIMEOUT_S
                )
        except BaseException:
            # As `migrate` does: leave no migration waiting in pre-switchover.
            with contextlib.suppress(Exception):
                if (await src_qmp.query_migrate()).status.is_active:
                    await cancel_outgoing(src_qmp)
            raise

    async def _plumb(
        self, mode: Mode, dst_qmp: QMP, options: MigrationOptions, relays: list[_Process]
    ) -> tuple[str, str | None, _Metrics | None]:
        """Start the destination listening (and the relays).

        Returns:
            The source's migration URI; with a disk the address source QEMU reaches
            the destination's NBD export at (``None`` without); and where the
            destination relay's ``/metrics`` can be read from here (``None``: no
            migrelay relay, or it runs in a namespace).
        """
        work = self.workdir
        if mode.transport == "tcp":
            nbd_server = None
            if self.disk is not None:
                nbd_server = f"tcp:{self.dest_host}:{_free_port()}"
                await export_disks(dst_qmp, nbd_server, None)
            info = await prepare_incoming(dst_qmp, f"tcp:{self.dest_host}:0", options)
            return info.socket_addresses[0], nbd_server, None
        dest_sock, source_sock = work / "dest.sock", work / "source.sock"
        dest_nbd, source_nbd = storage_socket(dest_sock), storage_socket(source_sock)
        for path in (dest_sock, source_sock, dest_nbd, source_nbd):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        if self.disk is not None:
            await export_disks(dst_qmp, f"unix:{dest_nbd}", None)
        await prepare_incoming(dst_qmp, f"unix:{dest_sock}", options)
        # Where source QEMU mirrors to: the relay's storage socket, like `migrate`.
        nbd_server = f"unix:{source_nbd}" if self.disk is not None else None
        if mode.transport == "unix":
            if self.link is not None:
                raise RelayError("mode unix needs both QEMUs on one host; drop it with --link")
            nbd = f"unix:{dest_nbd}" if self.disk is not None else None
            return f"unix:{dest_sock}", nbd, None
        if mode.transport == "socat":
            # The WebSocket-free reference: two plain copying relays (a pair more for
            # the disk's NBD connection).
            pairs = [("socat", dest_sock, source_sock)]
            if self.disk is not None:
                pairs.append(("socat-nbd", dest_nbd, source_nbd))
            for name, dest_path, source_path in pairs:
                await self._start_socat_pair(name, dest_path, source_path, relays)
            return f"unix:{source_sock}", nbd_server, None
        port = _free_port()
        serve_tls: list[str] = []
        connect_tls: list[str] = []
        scheme = "ws"
        if mode.transport == "wss":
            cert, key = make_certificate(work)
            serve_tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
            connect_tls = ["--ca", str(cert)]
            scheme = "wss"
        # The certificate names localhost and 127.0.0.1; across namespaces the pin is
        # what lets the client trust it.
        host = self.dest_host if self.link else "localhost"
        if self.link and scheme == "wss":
            pem = (work / "cert.pem").read_text(encoding="ascii")
            pin = hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()
            connect_tls = ["--fingerprint", pin]
        command, extra = relay_command(
            mode.name, mode.baseline, self.migrelay, self.relay_args,
            self.baseline, self.baseline_relay_args,
        )  # fmt: skip
        server = _Process("serve", [*self.dst_prefix, *command, "serve", "--listen",
                          f"{self.dest_host}:{port}", "--target", str(dest_sock), "--insecure",
                          *serve_tls, *extra], work / "serve.log")  # fmt: skip
        relays.append(server)
        await _wait_listening(lambda: _port_open(port, server), server)
        client = _Process("connect", [*self.src_prefix, *command, "connect",
                          f"{scheme}://{host}:{port}/", "--listen-unix", str(source_sock),
                          *connect_tls, *extra], work / "connect.log")  # fmt: skip
        relays.append(client)
        await _wait_listening(lambda: source_sock.exists() and source_nbd.exists(), client)
        metrics = None
        if self.link is None:  # else the veth counts the bytes
            metrics = _Metrics(
                f"{'https' if scheme == 'wss' else 'http'}://localhost:{port}/metrics",
                work / "cert.pem" if scheme == "wss" else None,
            )
        return f"unix:{source_sock}", nbd_server, metrics

    async def _start_socat_pair(
        self, name: str, dest_path: Path, source_path: Path, relays: list[_Process]
    ) -> None:
        """socat relays from ``source_path`` (source host) over TCP to ``dest_path``."""
        work = self.workdir
        port = _free_port()
        server = _Process(
            f"{name}-server",
            [
                *self.dst_prefix,
                "socat",
                "-b",
                "1048576",
                f"TCP-LISTEN:{port},reuseaddr,fork,bind={self.dest_host}",
                f"UNIX-CONNECT:{dest_path}",
            ],
            work / f"{name}-server.log",
        )
        relays.append(server)
        await _wait_listening(lambda: _port_open(port, server), server)
        client = _Process(f"{name}-client", [*self.src_prefix, "socat", "-b", "1048576",
                          f"UNIX-LISTEN:{source_path},fork", f"TCP:{self.dest_host}:{port}"],
                          work / f"{name}-client.log")  # fmt: skip
        relays.append(client)
        await _wait_listening(source_path.exists, client)


async def _start_guest(qmp: QMP, vm: DisposableVM) -> None:
    """Run the source's dirtying guest and wait until its pass counter climbs.

    Raises:
        RelayError: the guest did not start its loop within `GUEST_BOOT_TIMEOUT_S`.
    """
    # Zeroed first: a reused RAM file holds the counter of the last run's guest.
    reset_guest_counter(vm.ram_path)
    await qmp.execute("cont")
    deadline = time.monotonic() + GUEST_BOOT_TIMEOUT_S
    # Its first pass writes 1 (a slow guest's pass may take longer than booting).
    while guest_counter(vm.ram_path) == 0:
        if time.monotonic() > deadline:
            raise RelayError(f"the dirtying guest did not start within {GUEST_BOOT_TIMEOUT_S} s")
        await asyncio.sleep(0.05)


def _note_source(result: RunResult, info: MigrationInfo) -> None:
    """Keep the source's passes, transferred and the largest throttle seen so far."""
    if info.dirty_sync_count is not None:
        result.passes = info.dirty_sync_count
    if info.transferred is not None:
        result.transferred_bytes = info.transferred
    result.max_throttle_percent = max(result.max_throttle_percent, info.throttle_percent or 0)


async def _watch_source(qmp: QMP, result: RunResult) -> None:
    """Sample the source's ``query-migrate`` until cancelled (throttle comes and goes)."""
    while True:
        with contextlib.suppress(RelayError):  # a poll that failed: the next may not
            _note_source(result, await qmp.query_migrate())
        await asyncio.sleep(SOURCE_POLL_S)


async def _cancel_quietly(qmp: QMP) -> MigrationInfo | None:
    """Cancel the source's migration; return its final snapshot, None if that failed."""
    try:
        return await cancel_outgoing(qmp)
    except (RelayError, TimeoutError) as exc:
        print(f"bench: cancelling the migration failed: {exc}", file=sys.stderr)
        return None


def _tx_bytes(namespace: str, device: str) -> int:
    """``tx_bytes`` of ``device`` in ``namespace`` (``ip -s -j link``, iproute2)."""
    output = subprocess.run(
        ["ip", "-n", namespace, "-s", "-j", "link", "show", "dev", device],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    count: int = json.loads(output)[0]["stats64"]["tx"]["bytes"]
    return count


#: ``migrelay_bytes_total{...direction="to_destination"...} VALUE`` in the exposition.
_BYTES_TO_DESTINATION = re.compile(
    r'^migrelay_bytes_total\{[^}]*direction="to_destination"[^}]*\}\s+(\S+)$', re.MULTILINE
)


@dataclass(frozen=True)
class _Metrics:
    """The destination relay's ``/metrics`` (`migrelay.aio.metrics`), read from here."""

    url: str
    #: The certificate to trust for ``https``.
    cafile: Path | None

    def bytes_to_destination(self) -> int:
        """Payload bytes the relay carried towards destination QEMU, every channel."""
        context = ssl.create_default_context(cafile=self.cafile) if self.cafile else None
        with urllib.request.urlopen(self.url, timeout=10, context=context) as response:
            text = response.read().decode()
        return round(sum(float(value) for value in _BYTES_TO_DESTINATION.findall(text)))


#: How often the relays' memory is sampled during a run.
_RSS_SAMPLE_S = 0.05
#: How long to wait for a relay's finished children to be reaped.
_REAP_TIMEOUT_S = 2.0


async def _sample_rss(relays: Sequence[_Process]) -> None:
    while True:
        for relay in relays:
            relay.sample_rss()
        await asyncio.sleep(_RSS_SAMPLE_S)


async def _children_reaped(relays: Sequence[_Process]) -> None:
    deadline = time.monotonic() + _REAP_TIMEOUT_S
    while any(len(_process_tree(relay.popen.pid)) > 1 for relay in relays):
        if time.monotonic() >= deadline:
            return  # still running: what they did so far is counted as theirs
        await asyncio.sleep(0.02)


def summarize(
    results: Sequence[RunResult], ram_size: int, disk_size: int | None = None
) -> list[ModeSummary]:
    """Medians per mode, and each mode's median time over direct TCP's; each mode
    with a ``base:`` twin, compared with it round by round (`Paired`).

    With ``disk_size`` the times, rates and CPU per GiB are of disk and RAM together.
    The RAM is each run's own (`RunResult.ram_bytes`: the user's VMs' size, not
    ``ram_size``), ``ram_size`` only for a run that does not know it.
    """
    by_mode: dict[str, list[RunResult]] = {}
    for result in results:
        by_mode.setdefault(result.mode, []).append(result)

    def tcp_median_for(mode: str) -> float | None:
        # Compare like with like: against direct TCP with the same options when that
        # was measured (ws-multifd2-zstd: tcp-multifd2-zstd), else with as many multifd
        # channels, else against plain direct TCP.
        parsed = Mode.parse(mode)
        candidates = ["tcp" + mode.removeprefix(BASELINE_PREFIX)[len(parsed.transport) :]]
        if parsed.multifd:
            candidates.append(f"tcp-multifd{parsed.multifd}")
        reference = next((name for name in candidates if name in by_mode), "tcp")
        times = [r.seconds for r in by_mode.get(reference, []) if r.seconds and not r.error]
        return statistics.median(times) if times else None

    def median_of(values: Sequence[float | None]) -> float | None:
        known = [value for value in values if value is not None]
        return statistics.median(known) if known else None

    def seconds_by_round(mode: str) -> dict[int, float | None]:
        return {
            r.run: r.seconds for r in by_mode[mode] if r.error is None and r.outcome == "completed"
        }

    summaries = []
    for mode, runs in by_mode.items():
        tcp_median = tcp_median_for(mode)
        good = [
            r
            for r in runs
            if r.error is None and r.seconds is not None and r.outcome == "completed"
        ]
        not_converged = sum(r.outcome == "not converged" for r in runs)
        sizes = [r.ram_bytes if r.ram_bytes is not None else ram_size for r in good or runs]
        copied = statistics.median(sizes) + (disk_size or 0)
        compared = [r.ram_matched for r in runs if r.ram_matched is not None]
        wire_sources = {r.wire_source for r in good if r.wire_source is not None}
        times = [r.seconds for r in good if r.seconds is not None]
        median = statistics.median(times) if times else None
        disk_times = [r.disk_seconds for r in good if r.disk_seconds is not None]
        ram_times = [r.ram_seconds for r in good if r.ram_seconds is not None]
        cpu: dict[str, float] = {}
        rss: dict[str, int] = {}
        for name in {name for r in good for name in r.relay_cpu_seconds}:
            cpu[name] = statistics.median(r.relay_cpu_seconds[name] for r in good) / (copied / GIB)
            rss[name] = max(r.relay_peak_rss_bytes[name] for r in good)
        downtimes = [r.downtime_ms for r in good if r.downtime_ms is not None]
        summaries.append(
            ModeSummary(
                mode=mode,
                runs=len(runs),
                failures=len(runs) - len(good) - not_converged,
                median_seconds=median,
                median_disk_seconds=statistics.median(disk_times) if disk_times else None,
                median_ram_seconds=statistics.median(ram_times) if ram_times else None,
                median_throughput_bytes_per_s=copied / median if median else None,
                median_downtime_ms=statistics.median(downtimes) if downtimes else None,
                ratio_to_tcp=median / tcp_median if median and tcp_median else None,
                relay_cpu_seconds_per_gib=cpu,
                relay_peak_rss_bytes=rss,
                all_ram_matched=all(compared) if compared else None,
                all_disks_matched=(
                    all(r.disk_matched is not False for r in runs) if disk_size else None
                ),
                not_converged=not_converged,
                median_wire_bytes=median_of([r.wire_bytes for r in good]),
                wire_source="+".join(sorted(wire_sources)) or None,
                median_transferred_bytes=median_of([r.transferred_bytes for r in good]),
                median_passes=median_of([r.passes for r in good]),
                max_throttle_percent=max((r.max_throttle_percent for r in runs), default=0),
            )
        )
    by_name = {row.mode: row for row in summaries}
    for row in summaries:
        base = by_name.get(BASELINE_PREFIX + row.mode)
        if base is None:
            continue
        if row.median_seconds and base.median_seconds:
            row.baseline_time_ratio = row.median_seconds / base.median_seconds
        paired = Paired.by_round(seconds_by_round(row.mode), seconds_by_round(base.mode))
        row.paired_seconds_diff, row.paired_seconds_diff_stderr = paired.mean, paired.stderr
        row.paired_rounds, row.rounds_faster_than_baseline = paired.rounds, paired.lower
    return summaries


def machine_info() -> dict[str, object]:
    """Where the figures come from."""
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    qemu = subprocess.run(
        ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "qemu": qemu[0] if qemu else "unknown",
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
    }


async def run_bench(
    modes: Sequence[Mode],
    ram_size: int,
    runs: int,
    workdir: Path | None = None,
    on_result: Callable[[RunResult], None] | None = None,
    link_rate: str | None = None,
    on_start: Callable[[Mode, int], None] | None = None,
    given_qmp: tuple[Path, Path] | None = None,
    disk_size: int | None = None,
    *,
    workload: Workload | None = None,
    ram_content: str = "random",
    run_timeout: float | None = None,
    baseline: Path | None = None,
    relay_args: Sequence[str] = (),
    baseline_relay_args: Sequence[str] = (),
) -> dict[str, object]:
    """Run ``runs`` interleaved rounds of every mode; return the JSON-ready report.

    The test VMs' RAM files live on tmpfs (`tmpfs_ram_dir`, in a directory made and
    removed here). With ``link_rate`` the two sides run in network namespaces joined by
    a veth pair shaped to that rate (``"none"``: unshaped). With ``given_qmp`` (source,
    destination QMP sockets) the user's own VMs are migrated once, in the one mode
    given, and the report's RAM size is theirs (`Bench.run_given`), not ``ram_size``.
    With ``disk_size`` each test VM has a disk of that size, copied before RAM
    (`Bench`); the work directory made here is then on tmpfs (``/dev/shm`` when
    ``/tmp`` is not): test disks live there (DESIGN §7), so that the destination's
    writes are not timed against the host's own disk. ``workload``, ``ram_content``
    and ``run_timeout`` are `Bench`'s. ``baseline``, another checkout, runs the
    ``base:`` modes (`available_modes`) with its relays (`baseline_command`);
    ``relay_args`` and ``baseline_relay_args`` go to this checkout's relays and to
    the baseline's.

    Raises:
        ValueError: ``given_qmp`` with more than one mode or run, or with ``link_rate``,
            ``disk_size``, a workload or a RAM content; a workload that does not fit
            in the RAM; ``base:`` modes without a baseline, a baseline without its
            ``.venv``.
        RelayError: no tmpfs with room for the RAM files (`tmpfs_ram_dir`).
    """
    if given_qmp is not None and (len(modes) != 1 or runs != 1 or link_rate is not None):
        raise ValueError(
            "given QMP sockets allow exactly one migration: one mode, --runs 1, no --link"
        )
    if given_qmp is not None and disk_size:
        raise ValueError("a disk is for test VMs; the user's own VMs keep theirs")
    workload = workload or Workload("idle")
    if given_qmp is not None and (workload.dirties or ram_content != "random"):
        raise ValueError("a workload and a RAM content are for test VMs")
    workload.check_ram(ram_size)
    if any(mode.baseline for mode in modes) and baseline is None:
        raise ValueError("base: modes need a baseline checkout (--baseline DIR)")
    baseline_argv = baseline_command(baseline) if baseline is not None else None
    ram_dir = None
    if given_qmp is None:
        # Both RAM files, and with a disk both images too (they go there as well when
        # /tmp is no tmpfs; see below).
        needed = 2 * (ram_size + (disk_size or 0))
        ram_dir = Path(tempfile.mkdtemp(prefix="migrelay-bench-ram-", dir=tmpfs_ram_dir(needed)))
    own_dir = workdir is None
    base = "/tmp"
    if disk_size and not _on_tmpfs(Path(base)) and _on_tmpfs(TMPFS_DIR):
        base = str(TMPFS_DIR)
    work = Path(tempfile.mkdtemp(prefix="migrelay-bench-", dir=base)) if own_dir else workdir
    assert work is not None
    link = None
    results: list[RunResult] = []
    try:
        if link_rate is not None:
            link = LinkedNamespaces(None if link_rate == "none" else link_rate)
            link.create()
        bench = Bench(
            ram_size,
            work,
            link=link,
            disk_size=disk_size,
            workload=workload,
            ram_content=ram_content,
            ram_dir=ram_dir,
            run_timeout=run_timeout,
            baseline=baseline_argv,
            relay_args=relay_args,
            baseline_relay_args=baseline_relay_args,
        )
        for run in range(1, runs + 1):
            for mode in modes:
                if on_start is not None:
                    on_start(mode, run)
                if given_qmp is not None:
                    result = await bench.run_given(mode, *given_qmp)
                else:
                    result = await bench.run(mode, run)
                results.append(result)
                if on_result is not None:
                    on_result(result)
    finally:
        if link is not None:
            link.destroy()
        if own_dir:
            shutil.rmtree(work, ignore_errors=True)
        if ram_dir is not None:
            shutil.rmtree(ram_dir, ignore_errors=True)
    if given_qmp is not None:
        # The user's VMs: their own size, when the source told it (not --ram's default).
        ram_size = next((r.ram_bytes for r in results if r.ram_bytes is not None), ram_size)
    return {
        "machine": machine_info(),
        "command": shlex.join(sys.argv),
        "link": link_rate or "loopback",
        "ram_bytes": ram_size,
        "ram_content": ram_content,
        "ram_on": "tmpfs" if ram_dir is not None else "the user's VMs",
        "workload": workload.name,
        "run_timeout_s": bench.run_timeout,
        "disk_bytes": disk_size or None,
        "runs": runs,
        "modes": [m.name for m in modes],
        "relay_args": list(relay_args),
        "baseline": str(baseline) if baseline is not None else None,
        "baseline_relay_args": list(baseline_relay_args),
        "results": [asdict(r) for r in results],
        "summary": [asdict(s) for s in summarize(results, ram_size, disk_size)],
    }


def _on_tmpfs(path: Path) -> bool:
    """Whether ``path`` is on a tmpfs (its mount: the longest mount point above it)."""
    path = path.resolve()
    mount_point, fstype = "", ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            # ID PARENT DEV ROOT MOUNT-POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE ...
            left, _, right = line.partition(" - ")
            point = left.split()[4]
            above = path == Path(point) or Path(point) in path.parents
            if above and len(point) >= len(mount_point):  # the last of equals wins
                mount_point, fstype = point, right.split()[0]
    return fstype == "tmpfs"


#: What the ``by`` column of `format_table` means; printed under the table.
WIRE_LEGEND = (
    "wire MiB: bytes sent towards the destination, medians, counted by: link = the source"
    " veth's tx_bytes (TCP/IP, TLS and WebSocket overheads included); relay = the"
    " destination relay's payload bytes (what QEMU wrote, after its compression); qemu ="
    " QEMU's own transferred (direct modes without --link; multifd counts pages before"
    " compressing them). qemu MiB: QEMU's transferred. passes: dirty-sync-count. thr%:"
    " the largest auto-converge CPU throttle seen."
)


#: The ``ram`` column of `format_table`, by `ModeSummary.all_ram_matched`.
RAM_VERDICTS: Mapping[bool | None, str] = {
    True: "ok",
    False: "MISMATCH",
    None: "not compared",
}


def format_table(report: dict[str, object]) -> str:
    """The summary as a plain-text table (see `WIRE_LEGEND` for the columns).

    With a disk, ``median s`` is disk and RAM together, ``disk s`` and ``ram s`` its
    phases (medians of each), and ``x tcp`` the ratio of the totals. Under the table,
    each mode run with the baseline too (``base:`` rows) against it, round by round.
    """
    with_disk = bool(report.get("disk_bytes"))
    summary = report["summary"]
    assert isinstance(summary, list)
    width = max([14, *(len(row["mode"]) + 2 for row in summary)])
    phases = f"{'disk s':>8}{'ram s':>8}" if with_disk else ""
    lines = [
        f"{'mode':<{width}}{'median s':>10}{phases}{'MiB/s':>9}{'x tcp':>8}{'downtime':>10}"
        f"{'wire MiB':>10} {'by':<6}{'qemu MiB':>9}{'passes':>8}{'thr%':>6}"
        f"  {'relay CPU s/GiB':<38}{'peak RSS MiB':<14}ram" + ("   disk" if with_disk else ""),
    ]

    def number(value: float | None, spec: str, width: int, scale: float = 1) -> str:
        return f"{format(value / scale, spec) if value is not None else '-':>{width}}"

    for row in summary:
        if with_disk:
            phases = number(row["median_disk_seconds"], ".2f", 8) + number(
                row["median_ram_seconds"], ".2f", 8
            )
            disk_ok = "   " + ("ok" if row["all_disks_matched"] is not False else "MISMATCH")
        else:
            disk_ok = ""
        secs = row["median_seconds"]
        rate = row["median_throughput_bytes_per_s"]
        ratio = row["ratio_to_tcp"]
        down = row["median_downtime_ms"]
        cpu = " ".join(f"{k}={v:.2f}" for k, v in sorted(row["relay_cpu_seconds_per_gib"].items()))
        rss = " ".join(f"{v / MIB:.0f}" for _, v in sorted(row["relay_peak_rss_bytes"].items()))
        took = "no conv." if row.get("not_converged") else "failed"
        took = f"{secs:.2f}" if secs else took
        notes = [f"{row['failures']} failed"] if row["failures"] else []
        if row.get("not_converged"):
            notes.append(f"{row['not_converged']} not converged")
        lines.append(
            f"{row['mode']:<{width}}"
            f"{took:>10}"
            f"{phases}"
            f"{f'{rate / MIB:.0f}' if rate else '-':>9}"
            f"{f'{ratio:.2f}' if ratio else '-':>8}"
            f"{f'{down:.0f} ms' if down is not None else '-':>10}"
            f"{number(row.get('median_wire_bytes'), '.1f', 10, MIB)} "
            f"{row.get('wire_source') or '-':<6}"
            f"{number(row.get('median_transferred_bytes'), '.1f', 9, MIB)}"
            f"{number(row.get('median_passes'), '.0f', 8)}"
            f"{row.get('max_throttle_percent', 0):>6}"
            f"  {cpu or '-':<38}{rss or '-':<14}"
            f"{RAM_VERDICTS[row['all_ram_matched']]}{disk_ok}"
            + (f" ({', '.join(notes)})" if notes else "")
        )
    names = {row["mode"] for row in summary}
    for row in summary:
        if BASELINE_PREFIX + row["mode"] not in names:
            continue
        ratio = row["baseline_time_ratio"]
        paired = format_paired(row["paired_seconds_diff"], row["paired_seconds_diff_stderr"])
        lines.append(
            f"{row['mode']} against {BASELINE_PREFIX}{row['mode']}: time"
            f" {f'{ratio:.2f}x' if ratio else '-'}, paired difference {paired} s, faster in"
            f" {row['rounds_faster_than_baseline']} of {row['paired_rounds']} rounds"
        )
    return "\n".join(lines)


def any_failed(report: dict[str, object]) -> bool:
    """Whether a run of ``report`` failed or migrated RAM or a disk that differs."""
    summary = report["summary"]
    assert isinstance(summary, list)
    return any(
        row["failures"] or row["all_ram_matched"] is False or row.get("all_disks_matched") is False
        for row in summary
    )


def require_matplotlib() -> None:
    """Raise RelayError with the install hint when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise RelayError("--plot needs matplotlib: pip install 'migrelay[plot]'") from None


def plot_report(report: dict[str, object], path: Path) -> None:
    """Draw median throughput per mode (MiB/s), with direct TCP marked, into a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    assert isinstance(summary, list)
    names = [row["mode"] for row in summary]
    rates = [(row["median_throughput_bytes_per_s"] or 0) / MIB for row in summary]
    colors = ["tab:gray" if n.startswith("tcp") else "tab:blue" for n in names]
    figure, axes = plt.subplots(figsize=(8, 4.5))
    bars = axes.bar(names, rates, color=colors)
    for bar, row in zip(bars, summary, strict=True):
        ratio = row["ratio_to_tcp"]
        label = f"{ratio:.2f}x" if ratio else "failed"
        axes.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                      ha="center", va="bottom")  # fmt: skip
    ram = report["ram_bytes"]
    assert isinstance(ram, int)
    disk = report.get("disk_bytes")
    what = f"{ram // MIB} MiB" + (
        f" RAM + {disk // MIB} MiB disk" if isinstance(disk, int) and disk else ""
    )
    axes.set_ylabel("median throughput (MiB/s)")
    axes.set_title(
        f"migration of {what}, {report['runs']} runs, link {report['link']} "
        "(label: time vs direct TCP)"
    )
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_json(report: dict[str, object], path: Path) -> None:
    """Write the report as indented JSON."""
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
