"""Relay-only benchmark: what the two relays cost per byte, without QEMU.

Why without QEMU: in a migration (`migrelay.lab.bench`) QEMU's own CPU (TCG, the
destination writing pages) shares the machine with the relays and sets the pace, so the
relays' throughput and CPU figures move with QEMU's. Here a file of random bytes on
tmpfs is pushed with ``sendfile`` through the source relay (``migrelay connect``) and
the destination relay (``migrelay serve``) into a sink that only drains and counts:
what is left to measure is the relays.

One run is one mode, one channel count N and one core count:

- the source file (`SourceFile`, random bytes on ``/dev/shm``, made once per bench) is
  cut into N slices; N pushers (threads of this process) each connect to the source
  relay's unix socket, in order, so that the relay makes them channels 0..N-1 of one
  session, as it does with QEMU's multifd connections (`migrelay.aio.client`);
- the destination relay connects each channel, in the same order, to the sink's unix
  socket, where a thread per connection drains it into one reused buffer;
- once the sink has accepted all N (every channel open end to end), the pushers are let
  go; the run is timed from then until the last connection reached end of file, and
  each relay's process tree's CPU seconds (`migrelay.lab.bench._Process`) are read
  right before and right after, so that start-up and teardown are not counted.

Modes (`TRANSPORTS`): ``direct`` (no relay: the pushers write into the sink's socket,
the harness's own ceiling, which shows it is not what limits the relays), ``socat``
(two socat processes with 1 MiB buffers, unix to TCP to unix: the same copies through
user space as the relays, without WebSocket; the anchor the ``ws`` rows are compared
with), ``splice`` (`migrelay.lab.splicerelay`: a prototype of the data path alone for
frames that need no mask, spliced from socket to socket with no copy into user space;
not a relay, compared with socat too), ``ws`` and ``wss`` (the relays, plain and over
TLS). With a baseline checkout
(``baseline``) every ``ws``/``wss`` mode runs again with that checkout's interpreter,
labelled ``base:ws``, in the same rounds, for before/after figures.

The TLS floor: a relay over TLS cannot cost less than socat's copies plus encrypting
at the source and decrypting at the destination. So each ``wss`` row is compared with
socat's CPU s/GiB (same channels, same cores) plus twice what the negotiated cipher
costs per GiB in ``openssl speed`` (`CipherCost`; one core's user time). The cipher is
the one the relays' own TLS contexts agree on (`negotiated_cipher`): TLS 1.3 prefers
AES-256-GCM, not AES-128-GCM.

Integrity (`Sampling`): every run checks that each connection delivered as many bytes
as its slice and a blake2b digest equal to the slice's, computed beforehand, outside
any timed window. By default the sink hashes 64 KiB in every 4 MiB of a connection
(1/64 of the bytes, a few ms of CPU per GiB), because hashing everything would cost
the sink about a CPU second per GiB on the cores the relays use; ``full_hash`` hashes
every byte (the test does). Digests are matched as a set: socat connects its channels
to the sink in any order. Whether the order was kept is reported as well
(``in_order``).

Rounds are interleaved (every mode, channel count and core count once per round), as in
`migrelay.lab.bench`, so that drift in the machine's load hits every combination alike;
the summary gives medians, and min/max of the throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import resource
import shlex
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from migrelay.aio import tls
from migrelay.errors import RelayError
from migrelay.lab.bench import (
    # Shared with the migration bench, and kept importable from here.
    BASELINE_PREFIX as BASELINE_PREFIX,
    TMPFS_DIR,
    TMPFS_MARGIN_BYTES,
    Paired,
    _free_port,
    _on_tmpfs,
    _port_open,
    _Process,
    _wait_listening,
    baseline_command as baseline_command,
    format_paired,
    machine_info,
    make_certificate,
    relay_command,
)
from migrelay.units import GIB, MIB

#: How bytes travel from the pushers to the sink (see the module docstring).
TRANSPORTS = ("direct", "socat", "splice", "ws", "wss")
#: Defaults of `migrelay bench --relay-only` and ``benches/relay.py``.
DEFAULT_MODES = ("direct", "socat", "ws", "wss")
DEFAULT_CHANNELS = (1, 2, 4)
DEFAULT_SIZE = 4 * GIB
DEFAULT_RUNS = 5
#: Seconds one run may take, from releasing the pushers to the sink's last end of file.
RUN_TIMEOUT_S = 600.0
#: Seconds the channels may take to open end to end (relays started, handshakes done).
OPEN_TIMEOUT_S = 30.0
#: Slices start on page boundaries (``sendfile`` from tmpfs reads whole pages).
SLICE_ALIGN = 4096
#: The sink's read buffer, as large as the relays' (`migrelay.limits.Limits.read_bytes`).
SINK_READ_BYTES = MIB
#: socat's buffer (``-b``): the relays read 1 MiB at a time too.
SOCAT_BUFFER_BYTES = MIB
#: How often the bench looks whether the sink has drained (its end time is the sink's
#: own, not this poll's).
POLL_S = 0.01
#: Seconds ``openssl speed`` runs the cipher.
CIPHER_SECONDS = 1
#: ``openssl speed``'s block: a full TLS record.
CIPHER_BLOCK_BYTES = 16384
#: TLS cipher suites (as `ssl.SSLSocket.cipher` names them) by their bulk cipher, as
#: ``openssl speed -evp`` names it.
_EVP_BY_SUITE = (
    ("AES_256_GCM", "aes-256-gcm"),
    ("AES256-GCM", "aes-256-gcm"),
    ("AES_128_GCM", "aes-128-gcm"),
    ("AES128-GCM", "aes-128-gcm"),
    ("CHACHA20_POLY1305", "chacha20-poly1305"),
    ("CHACHA20-POLY1305", "chacha20-poly1305"),
)
#: What the columns of `format_table` mean; printed under the table.
LEGEND = (
    "GiB/s: size over the median time from the pushers' first byte to the sink's last"
    " end of file (min-max of the runs). CPU s/GiB: medians over the timed window of the"
    " source relay's process tree (src), the destination relay's (dst), both, and this"
    " process's pushers and sink (harness). x socat: median GiB/s over socat's. CPU x:"
    " both relays' CPU over socat's (ws), over the TLS floor (wss: socat's + 2 x the"
    " cipher's cost), same channels and cores."
)


@dataclass(frozen=True)
class RelayMode:
    """One way to relay: a transport, and whether the baseline checkout runs it."""

    name: str
    transport: str
    baseline: bool = False

    @classmethod
    def parse(cls, text: str) -> RelayMode:
        """Parse ``direct``, ``socat``, ``splice``, ``ws``, ``wss``, ``base:ws`` or ``base:wss``.

        Raises:
            ValueError: anything else.
        """
        transport = text.removeprefix(BASELINE_PREFIX)
        baseline = transport != text
        if transport not in TRANSPORTS or (baseline and not transport.startswith("ws")):
            raise ValueError(
                f"unknown relay mode {text!r} ({', '.join(TRANSPORTS)}; base:ws, base:wss)"
            )
        return cls(text, transport, baseline)

    @property
    def migrelay(self) -> bool:
        """Whether migrelay's relays carry it (ws, wss), not socat or nothing."""
        return self.transport in ("ws", "wss")


def relay_modes(names: Sequence[str], *, baseline: bool = False) -> list[RelayMode]:
    """Parse mode names; with ``baseline``, ``base:MODE`` right after each ws/wss mode.

    socat is dropped when it is not installed (said on stderr): the ws rows then have
    no anchor, but the rest still measures.

    Raises:
        ValueError: an unknown or repeated mode, a ``base:`` mode without ``baseline``.
    """
    modes: list[RelayMode] = []
    for name in names:
        mode = RelayMode.parse(name)
        if mode.baseline and not baseline:
            raise ValueError(f"{name}: base: modes need a baseline checkout (--baseline DIR)")
        if mode.transport == "socat" and shutil.which("socat") is None:
            print("bench: socat is not installed; skipping the socat mode", file=sys.stderr)
            continue
        wanted = [mode]
        if baseline and mode.migrelay and not mode.baseline:
            wanted.append(RelayMode.parse(BASELINE_PREFIX + name))
        for each in wanted:
            if any(each.name == known.name for known in modes):
                raise ValueError(f"relay mode {each.name} given twice")
            modes.append(each)
    return modes


def parse_channels(text: str) -> list[int]:
    """``1,2,4`` as ``[1, 2, 4]``.

    Raises:
        ValueError: not positive whole numbers, or one repeated.
    """
    counts = []
    for part in (part.strip() for part in text.split(",")):
        if not (part.isdigit() and int(part) >= 1):
            raise ValueError(f"--channels takes positive whole numbers: {text!r}")
        counts.append(int(part))
    if len(set(counts)) != len(counts):
        raise ValueError(f"a channel count is given twice: {text!r}")
    return counts


def parse_cores(text: str) -> list[int | None]:
    """``all,1,2`` as ``[None, 1, 2]``: ``all`` runs the relays unpinned.

    Raises:
        ValueError: not ``all`` or positive whole numbers, one repeated, more cores
            than this process may use (`os.sched_getaffinity`), or no ``taskset``.
    """
    counts: list[int | None] = []
    for part in (part.strip() for part in text.split(",")):
        if part != "all" and not (part.isdigit() and int(part) >= 1):
            raise ValueError(f"--cores takes 'all' or positive whole numbers: {text!r}")
        counts.append(None if part == "all" else int(part))
    if len(set(counts)) != len(counts):
        raise ValueError(f"a core count is given twice: {text!r}")
    pinned = [count for count in counts if count is not None]
    usable = len(os.sched_getaffinity(0))
    if pinned and max(pinned) > usable:
        raise ValueError(f"--cores {text}: this process may use {usable} cores")
    if pinned and shutil.which("taskset") is None:
        raise ValueError("--cores needs taskset (util-linux)")
    return counts


def cores_label(cores: int | None) -> str:
    """``all`` (unpinned) or the CPU list the relays are pinned to (``0,1``)."""
    return "all" if cores is None else ",".join(str(cpu) for cpu in _cpus(cores))


def _cpus(cores: int) -> list[int]:
    """The first ``cores`` CPUs this process may run on (0, 1 on a plain machine)."""
    return sorted(os.sched_getaffinity(0))[:cores]


@dataclass(frozen=True)
class Combination:
    """What one run measures: a mode, its channel count, the relays' cores."""

    mode: RelayMode
    channels: int
    #: None: not pinned.
    cores: int | None


@dataclass(frozen=True)
class Sampling:
    """Which bytes of each connection the sink hashes: ``sample_bytes`` at the start of
    every ``stride_bytes`` (all of them when the two are equal)."""

    sample_bytes: int = 64 * 1024
    stride_bytes: int = 4 * MIB

    @classmethod
    def full(cls) -> Sampling:
        return cls(MIB, MIB)

    @property
    def everything(self) -> bool:
        return self.sample_bytes >= self.stride_bytes

    def describe(self) -> str:
        if self.everything:
            return "blake2b of every byte of each connection, against its slice's"
        return (
            f"blake2b of {self.sample_bytes // 1024} KiB in every"
            f" {self.stride_bytes // MIB} MiB of each connection, against its slice's;"
            " byte counts exact"
        )


class StreamDigest:
    """The `Sampling` digest of one byte stream, fed in chunks of any size."""

    def __init__(self, sampling: Sampling) -> None:
        self.sampling = sampling
        self.position = 0
        self._hash = hashlib.blake2b(digest_size=16)

    def update(self, chunk: memoryview) -> None:
        start, end = self.position, self.position + len(chunk)
        self.position = end
        sample, stride = self.sampling.sample_bytes, self.sampling.stride_bytes
        if self.sampling.everything:
            self._hash.update(chunk)
            return
        window = start - start % stride
        while window < end:
            low, high = max(start, window), min(end, window + sample)
            if low < high:
                self._hash.update(chunk[low - start : high - start])
            window += stride

    def skip_to(self, position: int) -> None:
        """Go on at ``position`` of the stream, as if what lies before had been fed
        (only right for bytes outside the sampled windows)."""
        self.position = position

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


@dataclass(frozen=True)
class SourceFile:
    """The bytes every run pushes: random, on tmpfs, made once per bench."""

    path: Path
    size: int

    @classmethod
    def create(cls, size: int, directory: Path) -> SourceFile:
        """Write ``size`` random bytes to ``directory/source.bin``.

        The bytes are an AES-CTR keystream under a random key (``openssl enc``): as
        random as ``os.urandom`` to anything that would compress or deduplicate them,
        and 3-4 times faster to make here (4 GiB in seconds, not half a minute).

        Raises:
            RelayError: ``openssl`` ended before ``size`` bytes.
        """
        path = directory / "source.bin"
        argv = ["openssl", "enc", "-aes-128-ctr", "-K", os.urandom(16).hex(),
                "-iv", os.urandom(16).hex(), "-in", "/dev/zero"]  # fmt: skip
        with (
            subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL) as keys,
            open(path, "wb") as out,
        ):
            assert keys.stdout is not None
            left = size
            try:
                while left:
                    chunk = keys.stdout.read(min(left, 4 * MIB))
                    if not chunk:
                        raise RelayError(f"openssl enc ended {left} bytes short of {size}")
                    out.write(chunk)
                    left -= len(chunk)
            finally:
                keys.kill()
        return cls(path, size)

    def slices(self, count: int) -> list[tuple[int, int]]:
        """``(offset, length)`` of each of ``count`` slices, page-aligned; the last
        takes the rest."""
        step = self.size // count // SLICE_ALIGN * SLICE_ALIGN
        offsets = [index * step for index in range(count)]
        return [
            (offset, (offsets[i + 1] if i + 1 < count else self.size) - offset)
            for i, offset in enumerate(offsets)
        ]

    def digest(self, offset: int, length: int, sampling: Sampling) -> str:
        """What a `StreamDigest` says of the slice, read from the file."""
        digest = StreamDigest(sampling)
        with open(self.path, "rb", buffering=0) as source:
            if sampling.everything:
                for start in range(0, length, 16 * MIB):
                    take = min(16 * MIB, length - start)
                    digest.update(memoryview(os.pread(source.fileno(), take, offset + start)))
                return digest.hexdigest()
            for window in range(0, length, sampling.stride_bytes):
                # Only the windows are read; the digest skips what lies between.
                take = min(sampling.sample_bytes, length - window)
                digest.skip_to(window)
                digest.update(memoryview(os.pread(source.fileno(), take, offset + window)))
        return digest.hexdigest()


def tmpfs_source_dir(size: int, base: Path = TMPFS_DIR) -> Path:
    """A fresh directory on the tmpfs ``base`` with room for ``size`` bytes (and a margin).

    The file must come from memory: pushed from a disk, the disk's speed (or the page
    cache's mood) would be measured, not the relays.

    Raises:
        RelayError: ``base`` is not a tmpfs, or too small.
    """
    if not base.is_dir() or not _on_tmpfs(base):
        raise RelayError(
            f"{base} is not a tmpfs: the relay bench pushes its bytes from memory; mount"
            f" one there (mount -t tmpfs tmpfs {base})"
        )
    stat = os.statvfs(base)
    free = stat.f_bavail * stat.f_frsize
    if free < size + TMPFS_MARGIN_BYTES:
        raise RelayError(
            f"{base} has {free // MIB} MiB free; the relay bench needs {size // MIB} MiB"
            f" there (and {TMPFS_MARGIN_BYTES // MIB} MiB to spare): use less --size"
        )
    return Path(tempfile.mkdtemp(prefix="migrelay-relaybench-", dir=base))


@dataclass(frozen=True)
class CipherCost:
    """What the relays' TLS cipher costs one core, from ``openssl speed``."""

    #: The suite the relays negotiate (``TLS_AES_256_GCM_SHA384``).
    suite: str
    #: Its bulk cipher as ``openssl speed -evp`` names it (``aes-256-gcm``).
    evp: str
    command: str
    openssl: str
    #: Bytes encrypted per second of user CPU time (``openssl speed``'s divisor).
    bytes_per_cpu_second: float

    @property
    def cpu_s_per_gib(self) -> float:
        return GIB / self.bytes_per_cpu_second


def negotiated_cipher(cert: Path, key: Path) -> str:
    """The cipher suite migrelay's TLS contexts agree on, from a handshake in memory.

    Asked of the contexts the relays build (`migrelay.aio.tls`) rather than assumed:
    OpenSSL's TLS 1.3 prefers AES-256-GCM, whose cost differs from AES-128-GCM's.

    Raises:
        RelayError: the handshake did not complete.
    """
    to_server, to_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    from_server, from_client = ssl.MemoryBIO(), ssl.MemoryBIO()
    server = tls.server_context(cert, key).wrap_bio(to_server, from_server, server_side=True)
    client = tls.client_context(ca=cert).wrap_bio(
        to_client, from_client, server_hostname="127.0.0.1"
    )
    finished: set[ssl.SSLObject] = set()
    for _ in range(10):  # TLS 1.3 needs two round trips here, 1.2 three
        for side in (client, server):
            try:
                side.do_handshake()
                finished.add(side)
            except ssl.SSLWantReadError:
                pass
        to_server.write(from_client.read())
        to_client.write(from_server.read())
        cipher = client.cipher()
        if len(finished) == 2 and cipher is not None:
            return cipher[0]
    raise RelayError("the TLS handshake in memory did not complete")


def measure_cipher(suite: str) -> CipherCost:
    """Run ``openssl speed`` on the bulk cipher of ``suite`` (one core, user time).

    Raises:
        RelayError: an unknown suite, or ``openssl speed`` printed no figure for it.
    """
    evp = next((name for part, name in _EVP_BY_SUITE if part in suite), None)
    if evp is None:
        raise RelayError(f"no openssl speed cipher known for the TLS suite {suite}")
    argv = ["openssl", "speed", "-evp", evp, "-bytes", str(CIPHER_BLOCK_BYTES),
            "-seconds", str(CIPHER_SECONDS)]  # fmt: skip
    output = subprocess.run(argv, capture_output=True, text=True, check=False).stdout
    version = subprocess.run(
        ["openssl", "version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    # The last line: "AES-256-GCM    1992394.71k", in 1000s of bytes per second.
    match = re.search(rf"^{re.escape(evp)}\s+([\d.]+)k\s*$", output, re.IGNORECASE | re.MULTILINE)
    if match is None:
        raise RelayError(f"no figure in {shlex.join(argv)}'s output: {output[-300:]!r}")
    return CipherCost(suite, evp, shlex.join(argv), version, float(match.group(1)) * 1000)


@dataclass
class RelayRun:
    """One run: a `Combination`, timed and checked."""

    mode: str
    channels: int
    #: ``all`` (unpinned) or the relays' CPU list.
    cores: str
    run: int
    seconds: float | None = None
    gib_per_s: float | None = None
    #: CPU seconds over the timed window of each relay's process tree; None: no relay.
    source_cpu_seconds: float | None = None
    destination_cpu_seconds: float | None = None
    #: This process's (pushers, sink, the bench's loop) over the same window.
    harness_cpu_seconds: float | None = None
    #: CPU seconds over the timed window of each thread of each relay process, by thread
    #: name (``main``, ``migrelay-w0``...; `_Process.thread_cpu_seconds`).
    source_threads: dict[str, float] = field(default_factory=dict)
    destination_threads: dict[str, float] = field(default_factory=dict)
    #: What each connection delivered to the sink, in the order it was accepted.
    bytes_received: list[int] = field(default_factory=list)
    #: Every connection matched a slice: its byte count and digest.
    intact: bool = False
    #: The sink accepted the connections in slice order (channel 0 first).
    in_order: bool | None = None
    error: str | None = None

    def cpu_s_per_gib(self, size: int) -> dict[str, float]:
        """CPU seconds per GiB pushed: ``source``, ``destination``, ``both``, ``harness``."""
        gib = size / GIB
        figures: dict[str, float] = {}
        if self.source_cpu_seconds is not None and self.destination_cpu_seconds is not None:
            figures["source"] = self.source_cpu_seconds / gib
            figures["destination"] = self.destination_cpu_seconds / gib
            figures["both"] = figures["source"] + figures["destination"]
        if self.harness_cpu_seconds is not None:
            figures["harness"] = self.harness_cpu_seconds / gib
        return figures


def _thread_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Each thread's CPU seconds between two readings (a thread started meanwhile: all)."""
    return {name: seconds - before.get(name, 0.0) for name, seconds in sorted(after.items())}


class _Received:
    """One connection the sink accepted, and what came through it."""

    def __init__(self, conn: socket.socket, sampling: Sampling) -> None:
        self.conn = conn
        self.digest = StreamDigest(sampling)
        self.bytes = 0
        #: ``time.monotonic()`` at its end of file; None while it runs.
        self.ended: float | None = None
        self.error: str | None = None


class _Sink:
    """The destination's stand-in: accepts ``connections`` on a unix socket and drains
    each in a thread of its own into a buffer it reuses, counting and hashing
    (`Sampling`).

    Threads rather than the event loop: ``recv_into`` releases the GIL, a thread per
    connection reads as fast as the kernel hands the bytes over, and the bench's loop
    stays out of the timed path.
    """

    def __init__(self, path: Path, connections: int, sampling: Sampling) -> None:
        self.connections = connections
        self.sampling = sampling
        self.received: list[_Received] = []
        self._closing = False
        self._threads: list[threading.Thread] = []
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._listener.bind(str(path))
            self._listener.listen(connections + 8)
        except OSError:
            self._listener.close()
            raise
        # Woken now and then to see whether the bench gave up.
        self._listener.settimeout(0.1)
        self._start(self._accept)

    def _start(self, target: Callable[..., None], *args: object) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self._threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while len(self.received) < self.connections and not self._closing:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            received = _Received(conn, self.sampling)
            self.received.append(received)
            self._start(self._drain, received)

    def _drain(self, received: _Received) -> None:
        buffer = bytearray(SINK_READ_BYTES)
        view = memoryview(buffer)
        try:
            while count := received.conn.recv_into(buffer):
                received.bytes += count
                received.digest.update(view[:count])
        except OSError as exc:
            received.error = f"{type(exc).__name__}: {exc}"
        received.ended = time.monotonic()

    @property
    def all_accepted(self) -> bool:
        return len(self.received) == self.connections

    @property
    def drained(self) -> bool:
        return self.all_accepted and all(r.ended is not None for r in self.received)

    def last_end(self) -> float:
        return max(r.ended for r in self.received if r.ended is not None)

    def close(self) -> None:
        """Stop accepting, end every drain (shutdown wakes a blocked ``recv_into``)."""
        self._closing = True
        for received in self.received:
            with contextlib.suppress(OSError):
                received.conn.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)
        for received in self.received:
            received.conn.close()
        self._listener.close()


class _Pushers:
    """The source's stand-in: one connection per slice, made in slice order (so the
    relay numbers them as its channels 0..N-1), each ``sendfile``-ing its slice once
    `release` lets them go, then closing as QEMU does at the end of a migration."""

    def __init__(self, path: Path, source: SourceFile, slices: Sequence[tuple[int, int]]) -> None:
        self._go = threading.Event()
        self._closing = False
        self.errors: list[str] = []
        self.sent = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._threads: list[threading.Thread] = []
        try:
            for offset, length in slices:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._socks.append(sock)
                sock.connect(str(path))
                thread = threading.Thread(
                    target=self._push, args=(sock, source.path, offset, length), daemon=True
                )
                self._threads.append(thread)
                thread.start()
        except BaseException:
            self.close()
            raise

    def release(self) -> float:
        """Let every pusher send; returns the moment they were let go."""
        started = time.monotonic()
        self._go.set()
        return started

    def _push(self, sock: socket.socket, path: Path, offset: int, length: int) -> None:
        try:
            with open(path, "rb", buffering=0) as source:
                self._go.wait()
                sent = 0
                while sent < length and not self._closing:
                    left = length - sent
                    count = os.sendfile(sock.fileno(), source.fileno(), offset + sent, left)
                    if not count:
                        raise RelayError(f"sendfile sent nothing at {sent} of {length} bytes")
                    sent += count
            with self._lock:
                self.sent += sent
        except (OSError, RelayError) as exc:
            if not self._closing:
                with self._lock:
                    self.errors.append(f"pusher: {type(exc).__name__}: {exc}")
        finally:
            sock.close()

    def close(self) -> None:
        self._closing = True
        self._go.set()
        for sock in self._socks:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in self._threads:
            thread.join(5)
        for sock in self._socks:
            sock.close()


def _exit_status(process: _Process) -> int | None:
    """The process's exit status if it has exited, None while it runs.

    Without reaping it (``WNOWAIT``): a reaped process's ``/proc`` entry is gone, and
    with it the CPU seconds the run still has to read (``connect --once`` may exit
    before the sink has seen its last byte). A zombie keeps them.
    """
    if process.popen.returncode is not None:
        return process.popen.returncode
    try:
        status = os.waitid(os.P_PID, process.popen.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return process.popen.poll()
    if status is None:
        return None
    return status.si_status if status.si_code == os.CLD_EXITED else -status.si_status


def _harness_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class RelayBench:
    """Runs the `Combination`s of one bench over one `SourceFile`.

    Args:
        source: the bytes to push.
        workdir: sockets, certificate and relay logs (a short path: ``sun_path``).
        migrelay: the command that runs this checkout's migrelay (default: this
            interpreter's module).
        baseline: the command of the baseline checkout's migrelay, for ``base:`` modes.
        relay_args, baseline_relay_args: extra arguments for both relays of this
            checkout, of the baseline (``--max-message 4M``).
        sampling: what the sink hashes (`Sampling`).
        run_timeout: seconds a run may take once the pushers are let go.
    """

    def __init__(
        self,
        source: SourceFile,
        workdir: Path,
        *,
        migrelay: Sequence[str] | None = None,
        baseline: Sequence[str] | None = None,
        relay_args: Sequence[str] = (),
        baseline_relay_args: Sequence[str] = (),
        sampling: Sampling | None = None,
        run_timeout: float = RUN_TIMEOUT_S,
    ) -> None:
        self.source = source
        self.workdir = workdir
        self.migrelay = list(migrelay or [sys.executable, "-m", "migrelay"])
        self.baseline = list(baseline) if baseline is not None else None
        self.relay_args = list(relay_args)
        self.baseline_relay_args = list(baseline_relay_args)
        self.sampling = sampling or Sampling()
        self.run_timeout = run_timeout
        #: Each channel count's slices and their digests, computed once, before any run.
        self._expected: dict[int, list[tuple[int, str]]] = {}

    def expected(self, channels: int) -> list[tuple[int, str]]:
        """``(length, digest)`` of each slice for ``channels`` (computed on first ask)."""
        if channels not in self._expected:
            self._expected[channels] = [
                (length, self.source.digest(offset, length, self.sampling))
                for offset, length in self.source.slices(channels)
            ]
        return self._expected[channels]

    async def run(self, combination: Combination, run: int) -> RelayRun:
        """One run; a failure is reported in the result, not raised."""
        mode, channels = combination.mode, combination.channels
        result = RelayRun(mode.name, channels, cores_label(combination.cores), run)
        expected = await asyncio.to_thread(self.expected, channels)
        source_sock, sink_sock = self.workdir / "source.sock", self.workdir / "sink.sock"
        for path in (source_sock, Path(f"{source_sock}.nbd"), sink_sock):
            path.unlink(missing_ok=True)
        relays: list[_Process] = []
        sink: _Sink | None = None
        pushers: _Pushers | None = None
        try:
            sink = _Sink(sink_sock, channels, self.sampling)
            entry = await self._start_relays(combination, source_sock, sink_sock, relays)
            pushers = _Pushers(entry, self.source, self.source.slices(channels))
            await self._wait(lambda: sink.all_accepted, OPEN_TIMEOUT_S, relays, pushers,
                             f"the sink did not accept {channels} channels")  # fmt: skip
            before = [relay.cpu_seconds() for relay in relays]
            threads_before = [relay.thread_cpu_seconds() for relay in relays]
            harness_before = _harness_cpu_seconds()
            started = pushers.release()
            await self._wait(lambda: sink.drained, self.run_timeout, relays, pushers,
                             "the sink did not drain")  # fmt: skip
            after = [relay.cpu_seconds() for relay in relays]
            threads_after = [relay.thread_cpu_seconds() for relay in relays]
            result.harness_cpu_seconds = _harness_cpu_seconds() - harness_before
            if relays:
                result.source_cpu_seconds = after[0] - before[0]
                result.destination_cpu_seconds = after[1] - before[1]
                result.source_threads, result.destination_threads = (
                    _thread_delta(threads_before[index], threads_after[index]) for index in (0, 1)
                )
            result.seconds = sink.last_end() - started
            result.gib_per_s = self.source.size / GIB / result.seconds
            self._check(result, sink, pushers, expected, relays)
        except (RelayError, OSError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        finally:
            for relay in relays:
                relay.stop()
            if pushers is not None:
                pushers.close()
            if sink is not None:
                sink.close()
        return result

    async def _wait(
        self,
        done: Callable[[], bool],
        seconds: float,
        relays: Sequence[_Process],
        pushers: _Pushers,
        what: str,
    ) -> None:
        """Poll ``done`` for up to ``seconds``; fail at once if a pusher failed or a relay died
        (``connect --once`` exits by itself after its session: not a death)."""
        deadline = time.monotonic() + seconds
        while not done():
            if pushers.errors:
                raise RelayError(pushers.errors[0])
            for relay in relays:
                if _exit_status(relay) not in (None, 0):
                    raise RelayError(f"{relay.name} exited: {relay.log.read_text()[-500:]}")
            if time.monotonic() > deadline:
                raise RelayError(f"{what} within {seconds:g} s")
            await asyncio.sleep(POLL_S)

    def _check(
        self,
        result: RelayRun,
        sink: _Sink,
        pushers: _Pushers,
        expected: list[tuple[int, str]],
        relays: Sequence[_Process],
    ) -> None:
        """Fill ``bytes_received``, ``intact``, ``in_order``; an error says what is wrong."""
        got = [(r.bytes, r.digest.hexdigest()) for r in sink.received]
        result.bytes_received = [count for count, _ in got]
        result.intact = sorted(got) == sorted(expected) and not pushers.errors
        result.in_order = got == expected
        problems = [*pushers.errors, *(r.error for r in sink.received if r.error)]
        if pushers.sent != self.source.size:
            problems.append(f"pushed {pushers.sent} of {self.source.size} bytes")
        if not result.intact:
            total = sum(result.bytes_received)
            problems.append(
                f"the sink got {total} of {self.source.size} bytes; per connection"
                f" {result.bytes_received}, digests"
                f" {'differ' if total == self.source.size else 'not compared'}"
            )
            logs = [f"{r.name}: {r.log.read_text()[-300:]}" for r in relays]
            problems.extend(logs)
        if problems:
            result.error = "; ".join(problems)

    async def _start_relays(
        self, combination: Combination, source_sock: Path, sink_sock: Path, relays: list[_Process]
    ) -> Path:
        """Start the mode's relays (source first in ``relays``, then destination).

        Returns:
            The unix socket the pushers connect to.
        """
        mode = combination.mode
        if mode.transport == "direct":
            return sink_sock
        pin = (
            ["taskset", "-c", cores_label(combination.cores)]
            if combination.cores is not None
            else []
        )
        port = _free_port()
        tag = f"{mode.name.replace(':', '-')}-{combination.channels}"
        if mode.transport == "splice":
            prototype = [sys.executable, "-m", "migrelay.lab.splicerelay"]
            destination = _Process("destination", [*pin, *prototype, "destination",
                                   f"127.0.0.1:{port}", str(sink_sock)],
                                   self.workdir / f"{tag}-destination.log")  # fmt: skip
            source_argv = [*pin, *prototype, "source", str(source_sock), f"127.0.0.1:{port}"]
        elif mode.transport == "socat":
            destination = _Process("destination", [*pin, "socat", "-b", str(SOCAT_BUFFER_BYTES),
                                   f"TCP-LISTEN:{port},reuseaddr,fork,bind=127.0.0.1",
                                   f"UNIX-CONNECT:{sink_sock}"],
                                   self.workdir / f"{tag}-destination.log")  # fmt: skip
            source_argv = [*pin, "socat", "-b", str(SOCAT_BUFFER_BYTES),
                           f"UNIX-LISTEN:{source_sock},fork", f"TCP:127.0.0.1:{port}"]  # fmt: skip
        else:
            command, extra = relay_command(
                mode.name, mode.baseline, self.migrelay, self.relay_args,
                self.baseline, self.baseline_relay_args,
            )  # fmt: skip
            serve_tls: list[str] = []
            connect_tls: list[str] = []
            if mode.transport == "wss":
                cert, key = make_certificate(self.workdir)
                serve_tls = ["--tls-cert", str(cert), "--tls-key", str(key)]
                connect_tls = ["--ca", str(cert)]
            destination = _Process("destination", [*pin, *command, "serve", "--listen",
                                   f"127.0.0.1:{port}", "--target", str(sink_sock),
                                   *serve_tls, *extra],
                                   self.workdir / f"{tag}-destination.log")  # fmt: skip
            url = f"{mode.transport}://127.0.0.1:{port}/"
            source_argv = [*pin, *command, "connect", url, "--listen-unix", str(source_sock),
                           "--once", *connect_tls, *extra]  # fmt: skip
        # Destination first in start order, source first in ``relays``.
        relays.append(destination)
        await _wait_listening(lambda: _port_open(port, destination), destination)
        source = _Process("source", source_argv, self.workdir / f"{tag}-source.log")
        relays.insert(0, source)
        await _wait_listening(source_sock.exists, source)
        return source_sock


@dataclass
class RelaySummary:
    """Medians over the runs of one `Combination`."""

    mode: str
    channels: int
    cores: str
    runs: int
    failures: int
    median_seconds: float | None
    median_gib_per_s: float | None
    min_gib_per_s: float | None
    max_gib_per_s: float | None
    #: Median GiB/s over socat's (same channels, cores).
    speed_vs_socat: float | None
    #: Medians of each run's CPU s/GiB: ``source``, ``destination``, ``both`` (the
    #: median of the per-run sums), ``harness``.
    cpu_s_per_gib: dict[str, float]
    #: What ``cpu_ratio`` compares ``both`` with: ``socat`` (ws rows), ``tls floor``
    #: (wss rows); None for direct and socat.
    reference: str | None
    reference_cpu_s_per_gib: float | None
    cpu_ratio: float | None
    #: wss rows: socat's ``both`` + 2 x the cipher's CPU s/GiB.
    tls_floor_cpu_s_per_gib: float | None
    all_intact: bool
    all_in_order: bool
    #: ws/wss rows with a baseline (``base:`` row, same channels and cores): ``both``
    #: over the baseline's, and the per-round differences of ``both`` (this minus the
    #: baseline, rounds where both runs succeeded): their mean, its standard error, how
    #: many rounds this checkout was cheaper in. Paired by round, the differences
    #: cancel most of the drift a shared machine adds to both.
    baseline_cpu_ratio: float | None = None
    paired_cpu_diff_s_per_gib: float | None = None
    paired_cpu_diff_stderr: float | None = None
    paired_rounds: int = 0
    rounds_cheaper_than_baseline: int = 0
    #: Medians of each relay thread's CPU s/GiB, ``source`` and ``destination``, by thread
    #: name (``main``, ``migrelay-w0``...): how the work spreads over ``--workers``.
    thread_cpu_s_per_gib: dict[str, dict[str, float]] = field(default_factory=dict)


def summarize(
    results: Sequence[RelayRun], size: int, cipher: CipherCost | None
) -> list[RelaySummary]:
    """One row per mode, channel count and cores, in the order they first ran."""
    groups: dict[tuple[str, int, str], list[RelayRun]] = {}
    for result in results:
        groups.setdefault((result.mode, result.channels, result.cores), []).append(result)

    def medians(runs: Sequence[RelayRun]) -> dict[str, float]:
        good = [run.cpu_s_per_gib(size) for run in runs if run.error is None]
        keys = {key for figures in good for key in figures}
        return {key: statistics.median(f[key] for f in good if key in f) for key in sorted(keys)}

    def speeds(runs: Sequence[RelayRun]) -> list[float]:
        return [r.gib_per_s for r in runs if r.error is None and r.gib_per_s is not None]

    rows = []
    for (mode_name, channels, cores), runs in groups.items():
        mode = RelayMode.parse(mode_name)
        cpu = medians(runs)
        rates = speeds(runs)
        socat_runs = groups.get(("socat", channels, cores), [])
        socat_rates = speeds(socat_runs)
        socat_both = medians(socat_runs).get("both")
        reference = floor = reference_cpu = None
        if mode.transport in ("ws", "splice") and socat_both is not None:
            reference, reference_cpu = "socat", socat_both
        elif mode.transport == "wss" and socat_both is not None and cipher is not None:
            floor = socat_both + 2 * cipher.cpu_s_per_gib
            reference, reference_cpu = "tls floor", floor
        times = [r.seconds for r in runs if r.error is None and r.seconds is not None]
        median_rate = statistics.median(rates) if rates else None
        rows.append(
            row := RelaySummary(
                mode=mode_name,
                channels=channels,
                cores=cores,
                runs=len(runs),
                failures=sum(r.error is not None for r in runs),
                median_seconds=statistics.median(times) if times else None,
                median_gib_per_s=median_rate,
                min_gib_per_s=min(rates) if rates else None,
                max_gib_per_s=max(rates) if rates else None,
                speed_vs_socat=(
                    median_rate / statistics.median(socat_rates)
                    if median_rate and socat_rates and mode.transport != "socat"
                    else None
                ),
                cpu_s_per_gib=cpu,
                reference=reference,
                reference_cpu_s_per_gib=reference_cpu,
                cpu_ratio=(
                    cpu["both"] / reference_cpu if reference_cpu and "both" in cpu else None
                ),
                tls_floor_cpu_s_per_gib=floor,
                all_intact=all(r.intact for r in runs),
                all_in_order=all(r.in_order for r in runs),
            )
        )
        if mode.migrelay:
            row.thread_cpu_s_per_gib = _thread_medians(runs, size)
        base_runs = groups.get((BASELINE_PREFIX + mode_name, channels, cores))
        if mode.migrelay and not mode.baseline and base_runs:
            _compare_with_baseline(row, runs, base_runs, size)
    return rows


def _thread_medians(runs: Sequence[RelayRun], size: int) -> dict[str, dict[str, float]]:
    """`RelaySummary.thread_cpu_s_per_gib` of ``runs`` (the ones that succeeded)."""
    gib = size / GIB
    good = [run for run in runs if run.error is None]
    figures: dict[str, dict[str, float]] = {}
    for relay in ("source", "destination"):
        per_run = [getattr(run, f"{relay}_threads") for run in good]
        names = sorted({name for threads in per_run for name in threads})
        figures[relay] = {
            name: statistics.median(t.get(name, 0.0) for t in per_run) / gib for name in names
        }
    return figures


def _compare_with_baseline(
    row: RelaySummary, runs: Sequence[RelayRun], base_runs: Sequence[RelayRun], size: int
) -> None:
    """Fill ``row``'s baseline fields (see `RelaySummary`)."""
    both = {r.run: r.cpu_s_per_gib(size).get("both") for r in runs if r.error is None}
    base = {r.run: r.cpu_s_per_gib(size).get("both") for r in base_runs if r.error is None}
    base_values = [value for value in base.values() if value is not None]
    if "both" in row.cpu_s_per_gib and base_values:
        row.baseline_cpu_ratio = row.cpu_s_per_gib["both"] / statistics.median(base_values)
    paired = Paired.by_round(both, base)
    row.paired_rounds, row.rounds_cheaper_than_baseline = paired.rounds, paired.lower
    row.paired_cpu_diff_s_per_gib, row.paired_cpu_diff_stderr = paired.mean, paired.stderr


def check_size(size: int, channels: Sequence[int]) -> None:
    """Raise ValueError unless ``size`` is a multiple of 4 KiB with a page per channel."""
    if size <= 0 or size % SLICE_ALIGN:
        raise ValueError(f"--size must be a positive multiple of 4 KiB, got {size} bytes")
    if size < max(channels) * SLICE_ALIGN:
        raise ValueError(f"--size {size} is less than a page per channel")


async def run_relay_bench(
    modes: Sequence[RelayMode],
    channels: Sequence[int],
    cores: Sequence[int | None],
    size: int,
    runs: int,
    *,
    baseline: Path | None = None,
    relay_args: Sequence[str] = (),
    baseline_relay_args: Sequence[str] = (),
    sampling: Sampling | None = None,
    tmpfs: Path = TMPFS_DIR,
    run_timeout: float = RUN_TIMEOUT_S,
    on_start: Callable[[Combination, int], None] | None = None,
    on_result: Callable[[RelayRun], None] | None = None,
) -> dict[str, object]:
    """Run ``runs`` interleaved rounds of every combination; return the JSON-ready report.

    The source file is made on ``tmpfs`` (`tmpfs_source_dir`) and removed at the end;
    the slices' digests are computed before the first run of each channel count. With
    a ``wss`` mode the cipher's cost is measured once, first (`measure_cipher`).

    Raises:
        ValueError: a bad size for the channels, a baseline without its ``.venv``.
        RelayError: no tmpfs with room for the file, ``openssl`` failing.
    """
    check_size(size, channels)
    if any(mode.baseline for mode in modes) and baseline is None:
        raise ValueError("base: modes need a baseline checkout (--baseline DIR)")
    baseline_argv = baseline_command(baseline) if baseline is not None else None
    sampling = sampling or Sampling()
    combinations = [
        Combination(mode, count, core) for core in cores for count in channels for mode in modes
    ]
    source_dir = tmpfs_source_dir(size, tmpfs)
    work = Path(tempfile.mkdtemp(prefix="migrelay-relaybench-"))
    results: list[RelayRun] = []
    cipher = None
    try:
        if any(mode.transport == "wss" for mode in modes):
            cert, key = make_certificate(work)
            suite = negotiated_cipher(cert, key)
            cipher = await asyncio.to_thread(measure_cipher, suite)
        source = await asyncio.to_thread(SourceFile.create, size, source_dir)
        bench = RelayBench(
            source,
            work,
            baseline=baseline_argv,
            relay_args=relay_args,
            baseline_relay_args=baseline_relay_args,
            sampling=sampling,
            run_timeout=run_timeout,
        )
        for run in range(1, runs + 1):
            for combination in combinations:
                if on_start is not None:
                    on_start(combination, run)
                result = await bench.run(combination, run)
                results.append(result)
                if on_result is not None:
                    on_result(result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(source_dir, ignore_errors=True)
    return {
        "command": shlex.join(sys.argv),
        "machine": machine_info(),
        "size_bytes": size,
        "source": "random bytes (AES-CTR keystream, openssl enc) in a file on tmpfs",
        "runs": runs,
        "modes": [mode.name for mode in modes],
        "channels": list(channels),
        "cores": [cores_label(core) for core in cores],
        "relay_args": list(relay_args),
        "baseline": str(baseline) if baseline is not None else None,
        "baseline_relay_args": list(baseline_relay_args),
        "integrity": sampling.describe(),
        "cipher": (asdict(cipher) | {"cpu_s_per_gib": cipher.cpu_s_per_gib}) if cipher else None,
        "results": [asdict(result) for result in results],
        "summary": [asdict(row) for row in summarize(results, size, cipher)],
    }


def describe_run(result: RelayRun, size: int) -> str:
    """One progress line for a finished run."""
    if result.error is not None and result.gib_per_s is None:
        return (
            f"    {result.mode} x{result.channels} cores {result.cores}: failed ({result.error})"
        )
    cpu = result.cpu_s_per_gib(size)
    relays = f", CPU s/GiB {cpu['source']:.2f} + {cpu['destination']:.2f}" if "both" in cpu else ""
    intact = "intact" if result.intact else "NOT INTACT"
    error = f" ({result.error})" if result.error else ""
    return (
        f"    {result.mode} x{result.channels} cores {result.cores}:"
        f" {result.gib_per_s:.2f} GiB/s{relays}, {intact}{error}"
    )


def format_table(report: dict[str, object]) -> str:
    """The summary as a plain-text table (see `LEGEND` for the columns)."""
    summary = report["summary"]
    assert isinstance(summary, list)
    width = max([8, *(len(row["mode"]) + 2 for row in summary)])
    cores_width = max([7, *(len(row["cores"]) + 2 for row in summary)])
    lines = [
        f"{'mode':<{width}}{'ch':>3}{'cores':>{cores_width}}{'GiB/s':>8}  {'min-max':<11}"
        f"{'src':>6}{'dst':>6}{'both':>6}{'harness':>8}{'x socat':>9}{'CPU x':>7}"
        f"  {'vs':<10}intact"
    ]

    def number(value: float | None, width: int) -> str:
        return f"{format(value, '.2f') if value is not None else '-':>{width}}"

    for row in summary:
        cpu = row["cpu_s_per_gib"]
        low, high = row["min_gib_per_s"], row["max_gib_per_s"]
        spread = f"{low:.2f}-{high:.2f}" if low is not None and high is not None else "-"
        intact = "ok" if row["all_intact"] else "NO"
        if row["all_intact"] and not row["all_in_order"]:
            intact += " (reordered)"
        if row["failures"]:
            intact += f" ({row['failures']} failed)"
        lines.append(
            f"{row['mode']:<{width}}{row['channels']:>3}{row['cores']:>{cores_width}}"
            f"{number(row['median_gib_per_s'], 8)}  {spread:<11}"
            f"{number(cpu.get('source'), 6)}{number(cpu.get('destination'), 6)}"
            f"{number(cpu.get('both'), 6)}{number(cpu.get('harness'), 8)}"
            f"{number(row['speed_vs_socat'], 9)}{number(row['cpu_ratio'], 7)}"
            f"  {row['reference'] or '-':<10}{intact}"
        )
    for row in summary:
        threads = row.get("thread_cpu_s_per_gib") or {}
        if any(len(named) > 1 for named in threads.values()):
            spread = "; ".join(
                f"{relay} " + ", ".join(f"{name} {value:.2f}" for name, value in named.items())
                for relay, named in threads.items()
            )
            lines.append(
                f"{row['mode']} x{row['channels']} cores {row['cores']}"
                f" CPU s/GiB by thread: {spread}"
            )
    for row in summary:
        if row["baseline_cpu_ratio"] is None:
            continue
        paired = format_paired(row["paired_cpu_diff_s_per_gib"], row["paired_cpu_diff_stderr"])
        lines.append(
            f"{row['mode']} x{row['channels']} cores {row['cores']} against"
            f" {BASELINE_PREFIX}{row['mode']}: CPU {row['baseline_cpu_ratio']:.2f}x, paired"
            f" difference {paired} s/GiB, cheaper in {row['rounds_cheaper_than_baseline']}"
            f" of {row['paired_rounds']} rounds"
        )
    cipher = report.get("cipher")
    if isinstance(cipher, dict):
        lines.append(
            f"TLS floor: socat's CPU s/GiB + 2 x {cipher['cpu_s_per_gib']:.2f}"
            f" ({cipher['evp']}, {cipher['suite']}: {cipher['command']})"
        )
    return "\n".join(lines)


def any_failed(report: dict[str, object]) -> bool:
    """Whether a run of ``report`` failed or delivered other bytes than it pushed."""
    summary = report["summary"]
    assert isinstance(summary, list)
    return any(row["failures"] or not row["all_intact"] for row in summary)
