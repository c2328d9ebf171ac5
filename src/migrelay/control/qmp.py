"""Typed wrappers over ``qemu.qmp.QMPClient``: ALL of migrelay's QMP vocabulary lives here.

The rest of migrelay never spells a QMP command, argument or reply key; it calls a method of
`QMP` and receives dataclasses and enums. ``qemu.qmp`` supplies the protocol (greeting,
negotiation, ids, events); this module supplies the vocabulary of live migration as QEMU 7.2
speaks it (``qapi/migration.json``).

Errors: a command that QEMU refuses raises `MigrationError` whose ``str()`` is QEMU's ``desc``
whole; a socket that cannot be reached, or a connection lost in the middle of a command,
raises `ConnectError`. ``asyncio.CancelledError`` is never wrapped.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import TracebackType

from qemu.qmp import (
    ConnectError as QMPConnectError,
    EventListener,
    ExecInterruptedError,
    ExecuteError,
    QMPClient,
    QMPError,
)

from migrelay.errors import ConnectError, MigrationError

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT_S",
    "QMP",
    "UNLIMITED_BANDWIDTH",
    "BlockDevice",
    "BlockJob",
    "Capability",
    "DiskProgress",
    "MigrationInfo",
    "MigrationParameters",
    "MigrationStatus",
    "RunState",
]

logger = logging.getLogger(__name__)

#: How long `QMP.connect` waits for the socket file to appear and for the greeting.
#: QEMU creates its QMP socket within ~50 ms of starting here; 10 s leaves room for a
#: loaded 2-core host and for a VM that is still being started by another tool.
DEFAULT_CONNECT_TIMEOUT_S = 10.0

#: Poll period while waiting for the QMP socket file to appear.
_SOCKET_POLL_S = 0.02

#: How long a socket file that exists but refuses connections is retried. QEMU binds
#: the socket (the file appears) before it calls listen(); on a loaded host the gap
#: between the two lasts long enough to be hit (CI saw it with 16 QEMUs starting at
#: once). A socket that still refuses after this is stale: its QEMU is gone, and the
#: operator should hear so at once rather than after the whole connect timeout.
_REFUSED_GRACE_S = 2.0

#: ``max-bandwidth`` that means "no limit". QEMU 7.2 checks only ``<= SIZE_MAX`` and its
#: default is 128 MiB/s (``MAX_THROTTLE``); libvirt uses the same INT64_MAX ceiling for
#: "unlimited". 0 is not used: its meaning has changed between QEMU versions.
UNLIMITED_BANDWIDTH = 2**63 - 1

#: The QMP event QEMU emits on every migration status change (only while the
#: ``events`` capability is on).
_MIGRATION_EVENT = "MIGRATION"


class RunState(enum.StrEnum):
    """A VM's runstate as ``query-status`` reports it (QAPI ``RunState``)."""

    DEBUG = "debug"
    #: Started with ``-incoming``: waiting for (or receiving) an incoming migration.
    INMIGRATE = "inmigrate"
    INTERNAL_ERROR = "internal-error"
    IO_ERROR = "io-error"
    PAUSED = "paused"
    #: The source after a completed migration: stopped, its state now lives elsewhere.
    POSTMIGRATE = "postmigrate"
    #: Started with ``-S`` and never continued.
    PRELAUNCH = "prelaunch"
    FINISH_MIGRATE = "finish-migrate"
    RESTORE_VM = "restore-vm"
    RUNNING = "running"
    SAVE_VM = "save-vm"
    SHUTDOWN = "shutdown"
    SUSPENDED = "suspended"
    WATCHDOG = "watchdog"
    GUEST_PANICKED = "guest-panicked"
    COLO = "colo"
    #: A value this version of migrelay does not know (a newer QEMU).
    UNKNOWN = "unknown"


class MigrationStatus(enum.StrEnum):
    """A migration's status (QAPI ``MigrationStatus``)."""

    #: No migration yet. QEMU reports it by leaving ``status`` out of ``query-migrate``.
    NONE = "none"
    SETUP = "setup"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    ACTIVE = "active"
    POSTCOPY_ACTIVE = "postcopy-active"
    POSTCOPY_PAUSED = "postcopy-paused"
    POSTCOPY_RECOVER = "postcopy-recover"
    COMPLETED = "completed"
    FAILED = "failed"
    COLO = "colo"
    PRE_SWITCHOVER = "pre-switchover"
    DEVICE = "device"
    WAIT_UNPLUG = "wait-unplug"
    #: A value this version of migrelay does not know (a newer QEMU).
    UNKNOWN = "unknown"

    @property
    def is_terminal(self) -> bool:
        """Whether the migration has ended (nothing more will happen without a command)."""
        return self in _TERMINAL_STATUSES

    @property
    def is_active(self) -> bool:
        """Whether a migration is under way, so another one cannot start."""
        return self not in _TERMINAL_STATUSES and self is not MigrationStatus.NONE


_TERMINAL_STATUSES = frozenset(
    {MigrationStatus.COMPLETED, MigrationStatus.FAILED, MigrationStatus.CANCELLED}
)


class Capability(enum.StrEnum):
    """The migration capabilities migrelay sets (QAPI ``MigrationCapability``)."""

    #: Emit ``MIGRATION`` events. Off by default in QEMU: without it no event ever comes.
    EVENTS = "events"
    MULTIFD = "multifd"
    POSTCOPY_RAM = "postcopy-ram"
    POSTCOPY_PREEMPT = "postcopy-preempt"
    RETURN_PATH = "return-path"
    #: Source only: stop in ``pre-switchover`` (guest paused) until ``migrate-continue``,
    #: so that the disk mirrors can be cancelled in sync before the destination runs.
    PAUSE_BEFORE_SWITCHOVER = "pause-before-switchover"
    #: Source only: send a page dirtied again as its difference to the copy sent before
    #: (a cache of ``xbzrle-cache-size`` bytes). QEMU 7.2's multifd pages skip it.
    XBZRLE = "xbzrle"
    #: Source only: throttle the guest's vCPUs while it dirties memory faster than
    #: the migration sends it (``cpu-throttle-percentage`` in ``query-migrate``).
    AUTO_CONVERGE = "auto-converge"


#: Prefix of the QOM path of a device given an ``id`` (``-device ...,id=ID``).
_PERIPHERAL_PATH = "/machine/peripheral/"


@dataclass(frozen=True, slots=True)
class BlockDevice:
    """One block device of a VM (an entry of ``query-block``), as storage migration sees it.

    Attributes:
        device_id: the guest device's ``id`` (``-device ...,id=disk0``), the name both
            sides share whatever their command lines call the nodes; ``None`` for a
            device without an id (or a drive attached to no device).
        qdev: what QEMU reports: the device id, or its QOM path (a virtio-blk-pci's
            backend is ``/machine/peripheral/ID/virtio-backend``).
        node_name: the top node the device reads (``-drive`` makes these names up).
        size: the virtual size in bytes; ``None`` without a medium.
        read_only: read-only (a CD-ROM, ``readonly=on``).
        has_medium: a medium is inserted (an empty CD-ROM drive has none).
    """

    device_id: str | None
    qdev: str
    node_name: str | None
    size: int | None
    read_only: bool
    has_medium: bool

    @classmethod
    def from_reply(cls, entry: Mapping[str, object]) -> BlockDevice:
        """Parse one ``query-block`` entry."""
        qdev = _str(entry.get("qdev")) or ""
        inserted = entry.get("inserted")
        inserted = inserted if isinstance(inserted, Mapping) else None
        image = inserted.get("image") if inserted is not None else None
        image = image if isinstance(image, Mapping) else {}
        return cls(
            device_id=_device_id(qdev),
            qdev=qdev,
            node_name=_str(inserted.get("node-name")) if inserted is not None else None,
            size=_int(image.get("virtual-size")),
            read_only=bool(inserted.get("ro")) if inserted is not None else True,
            has_medium=inserted is not None,
        )


def _device_id(qdev: str) -> str | None:
    """The ``id`` in a ``query-block`` ``qdev``: the id itself or a peripheral's QOM path."""
    if not qdev:
        return None
    if qdev.startswith(_PERIPHERAL_PATH):
        return qdev[len(_PERIPHERAL_PATH) :].split("/", 1)[0] or None
    if qdev.startswith("/"):
        return None  # an anonymous device (``/machine/peripheral-anon/...``)
    return qdev


@dataclass(frozen=True, slots=True)
class BlockJob:
    """One job of ``query-jobs`` (migrelay's mirrors are block jobs).

    Attributes:
        job_id: the job's id.
        kind: ``mirror``, ``stream`` …
        status: ``created``, ``running``, ``ready``, ``standby``, ``waiting``,
            ``pending``, ``aborting``, ``concluded``, ``null`` …
        current: bytes done (``current-progress``).
        total: bytes to do, which grows as a mirrored guest writes (``total-progress``).
        error: why the job failed, once it has (``concluded`` with an error).
    """

    job_id: str
    kind: str
    status: str
    current: int
    total: int
    error: str | None = None

    @classmethod
    def from_reply(cls, entry: Mapping[str, object]) -> BlockJob:
        """Parse one ``query-jobs`` entry."""
        return cls(
            job_id=_str(entry.get("id")) or "",
            kind=_str(entry.get("type")) or "",
            status=_str(entry.get("status")) or "",
            current=_int(entry.get("current-progress")) or 0,
            total=_int(entry.get("total-progress")) or 0,
            error=_str(entry.get("error")),
        )


@dataclass(frozen=True, slots=True)
class DiskProgress:
    """One disk's copy to the destination (a ``blockdev-mirror`` job), for progress.

    Attributes:
        disk: the disk's device id (the ``-device ... id=``), as both sides name it.
        status: the mirror job's status (``running``, ``ready``, ``concluded`` …);
            ``ready`` means the destination holds every byte and follows each new write.
        copied: bytes copied so far (the job's ``current-progress``).
        total: bytes to copy; grows while the guest writes (``total-progress``).
        rate_bytes_per_s: copy rate over the last interval, ``None`` until known.
    """

    disk: str
    status: str
    copied: int
    total: int
    rate_bytes_per_s: float | None = None

    @property
    def ready(self) -> bool:
        """Whether the mirror is in sync (it then only follows the guest's writes)."""
        return self.status in ("ready", "standby") or (
            self.status == "concluded" and self.copied >= self.total
        )

    @property
    def remaining(self) -> int:
        """Bytes still to copy."""
        return max(self.total - self.copied, 0)

    @property
    def eta_s(self) -> float | None:
        """Seconds until copied at the current rate; 0 once ready, ``None`` if unknown."""
        if self.ready:
            return 0.0
        if not self.rate_bytes_per_s:
            return None
        return self.remaining / self.rate_bytes_per_s


@dataclass(frozen=True, slots=True)
class MigrationInfo:
    """One ``query-migrate`` reply, typed.

    Byte counts are bytes; times are milliseconds, as QEMU reports them. A field QEMU did
    not report (it reports fewer while in ``setup`` and on the destination) is ``None``.

    Attributes:
        status: the migration status.
        transferred: RAM bytes sent so far (``ram.transferred``).
        remaining: RAM bytes still to send in this pass (``ram.remaining``).
        total: guest RAM size in bytes (``ram.total``).
        rate_bytes_per_s: current throughput; QEMU's ``ram.mbps`` (10^6 bits/s) in bytes/s.
        dirty_pages_rate: pages dirtied per second (``ram.dirty-pages-rate``).
        dirty_sync_count: how many dirty-bitmap syncs (passes over RAM) ran.
        page_size: the target page size in bytes.
        expected_downtime_ms: QEMU's estimate of the stop-and-copy downtime.
        total_time_ms: time since the migration started (or the final total).
        downtime_ms: the real downtime, once completed.
        setup_time_ms: time spent in ``setup``.
        error_desc: QEMU's own text on failure.
        throttle_percent: how much ``auto-converge`` slows the guest's vCPUs (0..99);
            QEMU reports it only once it throttles.
        xbzrle_cache_miss_rate: share of pages XBZRLE found no earlier copy of, with
            ``xbzrle``.
        socket_addresses: where the destination listens after ``migrate-incoming``, as
            migration URIs (``tcp:HOST:PORT``, ``unix:PATH``); QEMU resolves port 0 here.
        raw: the reply as QEMU sent it.
    """

    status: MigrationStatus
    transferred: int | None = None
    remaining: int | None = None
    total: int | None = None
    rate_bytes_per_s: float | None = None
    dirty_pages_rate: int | None = None
    dirty_sync_count: int | None = None
    page_size: int | None = None
    expected_downtime_ms: int | None = None
    total_time_ms: int | None = None
    downtime_ms: int | None = None
    setup_time_ms: int | None = None
    error_desc: str | None = None
    throttle_percent: int | None = None
    xbzrle_cache_miss_rate: float | None = None
    socket_addresses: tuple[str, ...] = ()
    raw: Mapping[str, object] = field(default_factory=dict, repr=False, compare=False)
    #: The disks ``migrate --copy-storage`` copies, as the source's mirror jobs report
    #: them (filled in by `migrelay.control.storage`, never by ``query-migrate``).
    disks: tuple[DiskProgress, ...] = ()
    #: Bytes the source relay has sent on the wire so far, when the relay runs in this
    #: process (``migrate --to``): with multifd compression QEMU counts its bytes before
    #: compressing, the relay counts what really leaves the host.
    wire_bytes: int | None = None
    #: What the convergence watch makes of the migration (`migrelay.control.convergence`):
    #: ``None`` while it has no verdict, else a short phrase (``not converging: …``).
    convergence: str | None = None
    #: The downtime limit in force, when migrelay changed it during the migration.
    downtime_limit_ms: int | None = None

    @classmethod
    def from_reply(cls, reply: Mapping[str, object]) -> MigrationInfo:
        """Parse a ``query-migrate`` reply.

        Args:
            reply: the ``return`` value of ``query-migrate``.

        Returns:
            The typed snapshot; unknown keys are kept only in ``raw``.
        """
        ram = reply.get("ram")
        ram = ram if isinstance(ram, Mapping) else {}
        xbzrle = reply.get("xbzrle-cache")
        xbzrle = xbzrle if isinstance(xbzrle, Mapping) else {}
        miss_rate = xbzrle.get("cache-miss-rate")
        mbps = ram.get("mbps")
        return cls(
            status=_parse_migration_status(reply.get("status")),
            transferred=_int(ram.get("transferred")),
            remaining=_int(ram.get("remaining")),
            total=_int(ram.get("total")),
            # "mbps" is megabits per second in decimal units: 10^6 bits, not 2^20
            # (migration.c: bandwidth * 8 / 1000 per ms, i.e. bits/us).
            rate_bytes_per_s=(
                float(mbps) * 1_000_000 / 8
                if isinstance(mbps, int | float) and not isinstance(mbps, bool)
                else None
            ),
            dirty_pages_rate=_int(ram.get("dirty-pages-rate")),
            dirty_sync_count=_int(ram.get("dirty-sync-count")),
            page_size=_int(ram.get("page-size")),
            expected_downtime_ms=_int(reply.get("expected-downtime")),
            total_time_ms=_int(reply.get("total-time")),
            downtime_ms=_int(reply.get("downtime")),
            setup_time_ms=_int(reply.get("setup-time")),
            error_desc=_str(reply.get("error-desc")),
            throttle_percent=_int(reply.get("cpu-throttle-percentage")),
            xbzrle_cache_miss_rate=(
                float(miss_rate)
                if isinstance(miss_rate, int | float) and not isinstance(miss_rate, bool)
                else None
            ),
            socket_addresses=_parse_socket_addresses(reply.get("socket-address")),
            raw=dict(reply),
        )


@dataclass(frozen=True, slots=True)
class MigrationParameters:
    """The ``query-migrate-parameters`` values migrelay cares about.

    Attributes:
        multifd_channels: number of multifd channels (used only with ``multifd``).
        max_bandwidth: source rate limit in bytes/s (QEMU's default is 128 MiB/s).
        downtime_limit_ms: the longest stop-and-copy phase QEMU aims for.
        multifd_compression: ``none``, ``zlib`` or ``zstd``; ``None`` from a QEMU
            without multifd compression (before 5.0).
        raw: the reply as QEMU sent it.
    """

    multifd_channels: int | None
    max_bandwidth: int | None
    downtime_limit_ms: int | None
    multifd_compression: str | None = None
    raw: Mapping[str, object] = field(default_factory=dict, repr=False, compare=False)


def _int(value: object) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    # QEMU sends some numbers as strings (socket-address ports); accept digits only.
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _exists(path: str) -> bool:
    # A stat of a local path: microseconds, so not worth a thread.
    return os.path.exists(path)


def _parse_migration_status(value: object) -> MigrationStatus:
    if value is None:
        return MigrationStatus.NONE
    try:
        return MigrationStatus(str(value))
    except ValueError:
        logger.warning("! unknown migration status %r", value)
        return MigrationStatus.UNKNOWN


def _socket_address(uri: str) -> dict[str, str]:
    """A QAPI ``SocketAddress`` from ``unix:PATH`` or ``tcp:HOST:PORT``.

    Raises:
        ValueError: any other form.
    """
    kind, _, rest = uri.partition(":")
    if kind == "unix" and rest:
        return {"type": "unix", "path": rest}
    host, _, port = rest.rpartition(":")
    if kind == "tcp" and host and port.isdigit():
        return {"type": "inet", "host": host.strip("[]"), "port": port}
    raise ValueError(f"not unix:PATH or tcp:HOST:PORT: {uri}")


def _parse_socket_addresses(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    uris: list[str] = []
    for address in value:
        if not isinstance(address, Mapping):
            continue
        kind = address.get("type")
        if kind == "inet":
            host = str(address.get("host", ""))
            # An IPv6 literal needs brackets in a migration URI, as in a URL.
            if ":" in host and not host.startswith("["):
                host = f"[{host}]"
            uris.append(f"tcp:{host}:{address.get('port', '')}")
        elif kind == "unix":
            uris.append(f"unix:{address.get('path', '')}")
        else:
            uris.append(f"{kind}:{address}")
    return tuple(uris)


class QMP:
    """One QMP connection to one VM; the only object that speaks QMP in migrelay.

    Use as an async context manager (``async with QMP("src") as qmp: await
    qmp.connect(path)``) or call `close` yourself.

    A listener for ``MIGRATION`` events is registered in `connect`, before any command can
    be sent, so no status change after ``migrate`` / ``migrate-incoming`` is lost (STYLE
    §4). It holds at most one event per status change, a handful per migration, and is
    emptied whenever a new migration is started.

    QEMU's monitor serves one client at a time; a second one waits, unanswered, until the
    first disconnects. A long-running follower (``migrate``, ``status --watch``) therefore
    passes ``share_monitor=True`` and lets go of the monitor between polls (`release`,
    `reconnect`), so that ``status`` and ``cancel`` from another terminal get through.

    Args:
        name: the VM's name, used in messages and in the ``qemu.qmp.protocol.<name>``
            logger.
        share_monitor: the caller releases the monitor while it waits (read by
            `migrelay.control.migration`).
    """

    def __init__(self, name: str, *, share_monitor: bool = False) -> None:
        self.name = name
        self.share_monitor = share_monitor
        self.address: str | None = None
        self._client = QMPClient(name=name)
        self._migration_events = EventListener(_MIGRATION_EVENT)
        self._listening = False

    def __repr__(self) -> str:
        return f"QMP(name={self.name!r}, address={self.address!r})"

    async def __aenter__(self) -> QMP:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- connection --------------------------------------------------------------------

    async def connect(self, path: str, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
        """Connect to a QMP unix socket, waiting (bounded) for the socket file to appear.

        The wait lets a caller start QEMU and connect right away, in either order.

        Args:
            path: the QMP socket path (``-qmp unix:PATH,server=on,wait=off``).
            timeout_s: seconds to wait for the socket file and for QEMU's greeting.

        Raises:
            ConnectError: the socket did not appear, refused the connection, or QEMU sent
                no greeting in time (another client may hold the monitor). The client is
                left disconnected.
        """
        self.address = path
        deadline = time.monotonic() + timeout_s
        while not _exists(path):
            if time.monotonic() >= deadline:
                raise ConnectError(
                    f"qmp socket {path} of {self.name} did not appear within {timeout_s:g} s"
                )
            await asyncio.sleep(_SOCKET_POLL_S)
        if not self._listening:
            self._client.register_listener(self._migration_events)
            self._listening = True
        refused_until = min(time.monotonic() + _REFUSED_GRACE_S, deadline)
        while True:
            remaining = max(deadline - time.monotonic(), 0.1)
            try:
                async with asyncio.timeout(remaining):
                    await self._client.connect(path)
                break
            except QMPConnectError as exc:
                # qemu.qmp is back to IDLE after a failed connect, so it can try again.
                refused = isinstance(exc.exc, ConnectionRefusedError)
                if refused and time.monotonic() < refused_until:
                    await asyncio.sleep(_SOCKET_POLL_S)
                    continue
                raise ConnectError(
                    f"cannot connect to qmp socket {path} of {self.name}", exc.exc
                ) from exc
            except TimeoutError as exc:
                # qemu.qmp rolled itself back to IDLE when the timeout cancelled it.
                raise ConnectError(
                    f"no qmp greeting from {path} of {self.name} within {timeout_s:g} s"
                    " (is another client connected to this monitor?)"
                ) from exc
        logger.debug("= %s: qmp connected to %s", self.name, path)

    async def release(self) -> None:
        """Disconnect, keeping the address and the event listener, until `reconnect`.

        ``MIGRATION`` events that QEMU sends in between are not seen; a poll after
        `reconnect` is.
        """
        try:
            await self._client.disconnect()
        except (EOFError, OSError, QMPError) as exc:
            logger.debug("x %s: qmp connection ended: %r", self.name, exc)

    async def reconnect(self, timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S) -> None:
        """Connect again to the address of the last `connect`, after `release`.

        Raises:
            ConnectError: as `connect` (QEMU exited, or another client held the monitor
                for ``timeout_s``).
        """
        if self.address is None:
            raise ConnectError(f"qmp connection of {self.name} was never made")
        await self.connect(self.address, timeout_s)

    async def close(self) -> None:
        """Disconnect; safe to call more than once and after QEMU has exited.

        Errors of a connection that is already gone (QEMU quit or died) are logged at
        DEBUG, not raised: there is nothing left to clean up.
        """
        try:
            await self._client.disconnect()
        except (EOFError, OSError, QMPError) as exc:
            logger.debug("x %s: qmp connection ended: %r", self.name, exc)
        if self._listening:
            self._client.remove_listener(self._migration_events)
            self._listening = False

    async def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> object:
        """Run one QMP command (the single gateway every wrapper goes through).

        Args:
            command: the QMP command name.
            arguments: its arguments, if any.

        Returns:
            The ``return`` value of the reply.

        Raises:
            MigrationError: QEMU refused the command; ``str()`` is QEMU's text whole.
            ConnectError: not connected, or the connection was lost before the reply (QEMU
                exited or crashed); whether the command took effect is then unknown.
        """
        logger.debug("> %s: %s %s", self.name, command, arguments or "")
        try:
            reply = await self._client.execute(command, arguments)
        except ExecuteError as exc:
            raise MigrationError(str(exc), command=command, error_class=exc.error_class) from exc
        except ExecInterruptedError as exc:
            raise ConnectError(
                f"qmp connection to {self.name} was lost during {command}", exc
            ) from exc
        except QMPError as exc:
            # qemu.qmp's StateError: execute() before connect() or after the peer left.
            raise ConnectError(f"cannot run {command} on {self.name}", exc) from exc
        logger.debug("< %s: %s", self.name, reply)
        return reply

    # -- VM ----------------------------------------------------------------------------

    async def _execute_list(
        self, command: str, arguments: Mapping[str, object] | None = None
    ) -> list[Mapping[str, object]]:
        """`execute` a command whose reply is a list of objects; return those objects.

        Anything else in the reply (not a list, an entry that is not an object) is left
        out: the callers read fields of each entry and treat a missing one as unknown.
        """
        reply = await self.execute(command, arguments)
        if not isinstance(reply, list):
            return []
        return [entry for entry in reply if isinstance(entry, Mapping)]

    async def query_status(self) -> RunState:
        """Return the VM's runstate (``query-status``).

        Raises:
            MigrationError: QEMU refused the command.
            ConnectError: the connection is gone.
        """
        reply = await self.execute("query-status")
        status = reply.get("status") if isinstance(reply, Mapping) else None
        try:
            return RunState(str(status))
        except ValueError:
            logger.warning("! %s: unknown runstate %r", self.name, status)
            return RunState.UNKNOWN

    async def stop(self) -> None:
        """``stop``: pause the guest; on a VM still waiting for an incoming migration,
        have it stay paused once the migration completes (QEMU's ``autostart`` off).

        Raises:
            MigrationError: QEMU refused the command.
            ConnectError: the connection is gone.
        """
        await self.execute("stop")

    async def cont(self) -> None:
        """``cont``: resume the guest; on a VM still waiting for an incoming migration,
        have it resume once the migration completes, if the source was running (QEMU's
        ``autostart`` on, even under ``-S``).

        Raises:
            MigrationError: QEMU refused the command.
            ConnectError: the connection is gone.
        """
        await self.execute("cont")

    async def quit(self) -> None:
        """Ask QEMU to exit (``quit``) and disconnect.

        QEMU may close the socket before or after its reply reaches us; both count as
        success here.

        Raises:
            MigrationError: QEMU refused the command.
        """
        # ConnectError (connection lost before the reply) is what a successful quit looks
        # like when QEMU is faster than its own reply.
        with contextlib.suppress(ConnectError):
            await self.execute("quit")
        await self.close()

    async def human_monitor_command(self, command_line: str) -> str:
        """Run one HMP command (``human-monitor-command``) and return its output text.

        For what only HMP offers: ``qemu-io DEVICE "write ..."`` writes to a disk of a
        running or paused VM (tests of a disk written while it is copied).

        Raises:
            MigrationError: QEMU refused the command.
            ConnectError: the connection is gone.
        """
        reply = await self.execute("human-monitor-command", {"command-line": command_line})
        return reply if isinstance(reply, str) else ""

    # -- VM: what both sides of a migration must share (`migrelay.control.compat`) ------

    async def qom_get(self, path: str, prop: str) -> object:
        """Return a QOM property's value as QEMU sends it (``qom-get``).

        ``qom_get("/machine", "type")`` is the machine type QEMU resolved
        (``pc-i440fx-7.2-machine`` for ``-machine pc``).

        Raises:
            MigrationError: QEMU refused (no such object or property).
            ConnectError: the connection is gone.
        """
        return await self.execute("qom-get", {"path": path, "property": prop})

    async def qom_list(self, path: str) -> list[tuple[str, str]]:
        """Return a QOM object's properties as ``(name, type)`` pairs (``qom-list``).

        A child object's type is ``child<TYPE>``: ``qom_list("/machine/peripheral")``
        gives ``("net0", "child<virtio-net-pci>")`` for ``-device virtio-net-pci,id=net0``.

        Raises:
            MigrationError: QEMU refused (no such object: ``DeviceNotFound``).
            ConnectError: the connection is gone.
        """
        entries = await self._execute_list("qom-list", {"path": path})
        return [(str(entry.get("name")), str(entry.get("type"))) for entry in entries]

    async def query_memory_size(self) -> int | None:
        """Return the guest's RAM in bytes (``query-memory-size-summary``).

        The base memory plus any hot-plugged (``plugged-memory``, absent without it);
        ``None`` when QEMU reports no base memory.

        Raises:
            MigrationError: QEMU refused the command.
            ConnectError: the connection is gone.
        """
        reply = await self.execute("query-memory-size-summary")
        summary = reply if isinstance(reply, Mapping) else {}
        base = _int(summary.get("base-memory"))
        if base is None:
            return None
        return base + (_int(summary.get("plugged-memory")) or 0)

    # -- migration: capabilities and parameters ----------------------------------------

    async def query_version(self) -> str:
        """Return QEMU's version as ``MAJOR.MINOR.MICRO`` (``query-version``).

        Raises:
            MigrationError: QEMU refused the command.
            ConnectError: the connection is gone.
        """
        reply = await self.execute("query-version")
        qemu = reply.get("qemu") if isinstance(reply, Mapping) else None
        if not isinstance(qemu, Mapping):
            return "of unknown version"
        return ".".join(str(qemu.get(part, "?")) for part in ("major", "minor", "micro"))

    async def query_capabilities(self) -> dict[str, bool]:
        """Return every migration capability and whether it is on.

        Raises:
            MigrationError: QEMU refused the command.
            ConnectError: the connection is gone.
        """
        entries = await self._execute_list("query-migrate-capabilities")
        return {str(entry.get("capability")): bool(entry.get("state")) for entry in entries}

    async def set_capabilities(self, capabilities: Mapping[Capability | str, bool]) -> None:
        """Turn migration capabilities on or off (``migrate-set-capabilities``).

        QEMU refuses this while a migration is in progress.

        Args:
            capabilities: capability name to wanted state.

        Raises:
            MigrationError: QEMU refused (unknown capability, incompatible set, migration
                in progress); nothing was changed.
            ConnectError: the connection is gone.
        """
        await self.execute(
            "migrate-set-capabilities",
            {
                "capabilities": [
                    {"capability": str(name), "state": state}
                    for name, state in capabilities.items()
                ]
            },
        )

    async def query_parameters(self) -> MigrationParameters:
        """Return the migration parameters migrelay sets (``query-migrate-parameters``).

        Raises:
            MigrationError: QEMU refused the command.
            ConnectError: the connection is gone.
        """
        reply = await self.execute("query-migrate-parameters")
        params: Mapping[str, object] = reply if isinstance(reply, Mapping) else {}
        return MigrationParameters(
            multifd_channels=_int(params.get("multifd-channels")),
            max_bandwidth=_int(params.get("max-bandwidth")),
            downtime_limit_ms=_int(params.get("downtime-limit")),
            multifd_compression=_str(params.get("multifd-compression")),
            raw=dict(params),
        )

    async def set_parameters(
        self,
        *,
        multifd_channels: int | None = None,
        max_bandwidth: int | None = None,
        downtime_limit_ms: int | None = None,
        multifd_compression: str | None = None,
        compress_level: int | None = None,
        xbzrle_cache_size: int | None = None,
    ) -> None:
        """Set migration parameters (``migrate-set-parameters``); ``None`` leaves one as is.

        ``max-bandwidth`` and ``downtime-limit`` may also be changed during a migration.

        Args:
            multifd_channels: 1..255 (QEMU's default is 2).
            max_bandwidth: bytes/s; `UNLIMITED_BANDWIDTH` for no limit.
            downtime_limit_ms: 0..2000000 ms (QEMU's default is 300).
            multifd_compression: ``none``, ``zlib`` or ``zstd`` (both sides must agree).
            compress_level: the level of ``multifd_compression`` (zlib 0..9, zstd 0..20);
                ignored with ``none``.
            xbzrle_cache_size: bytes of XBZRLE cache.

        Raises:
            MigrationError: QEMU refused a value (its text names the range).
            ConnectError: the connection is gone.
        """
        arguments: dict[str, object] = {}
        if multifd_channels is not None:
            arguments["multifd-channels"] = multifd_channels
        if max_bandwidth is not None:
            arguments["max-bandwidth"] = max_bandwidth
        if downtime_limit_ms is not None:
            arguments["downtime-limit"] = downtime_limit_ms
        if multifd_compression is not None:
            arguments["multifd-compression"] = multifd_compression
            if compress_level is not None and multifd_compression != "none":
                arguments[f"multifd-{multifd_compression}-level"] = compress_level
        if xbzrle_cache_size is not None:
            arguments["xbzrle-cache-size"] = xbzrle_cache_size
        if arguments:
            await self.execute("migrate-set-parameters", arguments)

    # -- migration: commands -----------------------------------------------------------

    async def query_migrate(self) -> MigrationInfo:
        """Return the current (or last) migration's status and statistics.

        Raises:
            MigrationError: QEMU refused the command.
            ConnectError: the connection is gone.
        """
        reply = await self.execute("query-migrate")
        return MigrationInfo.from_reply(reply if isinstance(reply, Mapping) else {})

    async def migrate(self, uri: str, *, resume: bool = False) -> None:
        """Start migrating to ``uri`` (``migrate``); returns once QEMU has started.

        Stale ``MIGRATION`` events are dropped first, so events seen afterwards belong to
        this migration. A failure to reach ``uri`` is not an error here: QEMU reports it
        as status ``failed`` with ``error-desc`` (see `query_migrate`).

        Args:
            uri: ``unix:PATH``, ``tcp:HOST:PORT``, ``fd:NAME`` or ``exec:CMD``.
            resume: resume a paused postcopy migration instead of starting one.

        Raises:
            MigrationError: QEMU refused (migration in progress, bad URI, nothing to
                resume); no migration was started.
            ConnectError: the connection is gone.
        """
        self._migration_events.clear()
        arguments: dict[str, object] = {"uri": uri}
        if resume:
            arguments["resume"] = True
        await self.execute("migrate", arguments)

    async def migrate_incoming(self, uri: str) -> None:
        """Make a VM started with ``-incoming defer`` listen on ``uri`` (``migrate-incoming``).

        Args:
            uri: ``unix:PATH`` or ``tcp:HOST:PORT`` (port 0: QEMU picks a free port, shown
                in `MigrationInfo.socket_addresses`).

        Raises:
            MigrationError: QEMU refused (not started with ``-incoming``, already
                listening, address in use).
            ConnectError: the connection is gone.
        """
        self._migration_events.clear()
        await self.execute("migrate-incoming", {"uri": uri})

    async def migrate_cancel(self) -> None:
        """Cancel the outgoing migration (``migrate_cancel``); the source keeps its state.

        QEMU accepts this when no migration runs, and then does nothing.

        Raises:
            MigrationError: QEMU refused the command.
            ConnectError: the connection is gone.
        """
        await self.execute("migrate_cancel")

    async def yank_migration(self) -> None:
        """Shut down the migration's sockets at once (``yank``, QEMU 6.0 and later).

        For a stream that is stuck rather than broken (a peer that stopped reading):
        precopy then ends ``failed`` with the source VM as it was, postcopy goes
        ``postcopy-paused`` and can be resumed.

        Raises:
            MigrationError: QEMU refused (no migration running, or too old for yank).
            ConnectError: the connection is gone.
        """
        await self.execute("yank", {"instances": [{"type": "migration"}]})

    async def migrate_start_postcopy(self) -> None:
        """Switch a running precopy migration to postcopy (``migrate-start-postcopy``).

        Raises:
            MigrationError: QEMU refused (postcopy-ram not enabled before the migration).
            ConnectError: the connection is gone.
        """
        await self.execute("migrate-start-postcopy")

    async def migrate_recover(self, uri: str) -> None:
        """Let a destination in ``postcopy-paused`` listen again on ``uri``.

        Args:
            uri: the new incoming URI; the source then calls `migrate` with ``resume``.

        Raises:
            MigrationError: QEMU refused (the migration is not paused).
            ConnectError: the connection is gone.
        """
        await self.execute("migrate-recover", {"uri": uri})

    async def migrate_continue(self) -> None:
        """Let a migration stopped in ``pre-switchover`` go on (``migrate-continue``).

        Raises:
            MigrationError: QEMU refused (the migration is not in ``pre-switchover``).
            ConnectError: the connection is gone.
        """
        await self.execute("migrate-continue", {"state": str(MigrationStatus.PRE_SWITCHOVER)})

    # -- storage: the source's mirrors ---------------------------------------------------

    async def query_block(self) -> list[BlockDevice]:
        """Return the VM's block devices (``query-block``).

        Raises:
            MigrationError: QEMU refused the command.
            ConnectError: the connection is gone.
        """
        return [BlockDevice.from_reply(entry) for entry in await self._execute_list("query-block")]

    async def query_node_names(self) -> dict[str, int | None]:
        """Return every named block node and its virtual size (``query-named-block-nodes``).

        Raises:
            MigrationError: QEMU refused the command.
            ConnectError: the connection is gone.
        """
        nodes: dict[str, int | None] = {}
        for entry in await self._execute_list("query-named-block-nodes", {"flat": True}):
            image = entry.get("image")
            size = _int(image.get("virtual-size")) if isinstance(image, Mapping) else None
            nodes[str(entry.get("node-name"))] = size
        return nodes

    async def add_nbd_node(self, node_name: str, server: str, export: str) -> None:
        """Add a node that reads and writes ``export`` of an NBD server (``blockdev-add``).

        QEMU connects, and negotiates the export, before it answers.

        Args:
            node_name: the new node's name (at most 31 characters).
            server: the NBD server's address: ``unix:PATH`` or ``tcp:HOST:PORT``.
            export: the export's name on that server.

        Raises:
            MigrationError: QEMU could not connect or the server has no such export (its
                text says which).
            ConnectError: the connection is gone.
        """
        await self.execute(
            "blockdev-add",
            {
                "driver": "nbd",
                "node-name": node_name,
                "server": _socket_address(server),
                "export": export,
            },
        )

    async def delete_node(self, node_name: str) -> None:
        """Remove a node that `add_nbd_node` added (``blockdev-del``).

        Raises:
            MigrationError: QEMU refused (the node is in use, or does not exist).
            ConnectError: the connection is gone.
        """
        await self.execute("blockdev-del", {"node-name": node_name})

    async def mirror(
        self,
        job_id: str,
        source_node: str,
        target_node: str,
        *,
        write_blocking: bool = False,
        speed: int | None = None,
    ) -> None:
        """Copy ``source_node`` to ``target_node`` and keep it in sync (``blockdev-mirror``).

        The job copies the whole disk (``sync: full``), reports ``ready`` once both hold
        the same bytes, and then copies every new write until it is cancelled. It stays
        until `dismiss_job` (``auto-dismiss`` off), so that its error can be read.

        Args:
            job_id: the job's id.
            source_node: the disk's top node.
            target_node: where to copy to (an NBD node).
            write_blocking: ``copy-mode: write-blocking``: a guest write completes only
                once it is on both sides, so a guest that writes faster than the link
                cannot keep the mirror from converging (it is slowed down instead).
            speed: bytes/s the background copy may use; ``None``: unlimited.

        Raises:
            MigrationError: QEMU refused (the job id is taken, a node is missing or busy).
            ConnectError: the connection is gone.
        """
        arguments: dict[str, object] = {
            "job-id": job_id,
            "device": source_node,
            "target": target_node,
            "sync": "full",
            "auto-dismiss": False,
            "copy-mode": "write-blocking" if write_blocking else "background",
        }
        if speed is not None:
            arguments["speed"] = speed
        await self.execute("blockdev-mirror", arguments)

    async def query_jobs(self) -> list[BlockJob]:
        """Return every job and its progress (``query-jobs``).

        Raises:
            MigrationError: QEMU refused the command.
            ConnectError: the connection is gone.
        """
        return [BlockJob.from_reply(entry) for entry in await self._execute_list("query-jobs")]

    async def query_block_job_ids(self) -> list[str]:
        """Return the ids of the block jobs QEMU lists (``query-block-jobs``).

        Raises:
            MigrationError: QEMU refused the command.
            ConnectError: the connection is gone.
        """
        return [str(entry.get("device")) for entry in await self._execute_list("query-block-jobs")]

    async def cancel_job(self, job_id: str, *, force: bool = False) -> None:
        """Cancel a block job (``block-job-cancel``).

        A ``ready`` mirror cancelled without ``force`` first copies what is in flight,
        then ends: its target holds exactly what the source held, and the source keeps
        its own disk (nothing pivots). ``force`` ends it at once, in any state.

        Raises:
            MigrationError: QEMU refused (no such job, or it has already ended).
            ConnectError: the connection is gone.
        """
        await self.execute("block-job-cancel", {"device": job_id, "force": force})

    async def dismiss_job(self, job_id: str) -> None:
        """Remove a ``concluded`` job (``job-dismiss``).

        Raises:
            MigrationError: QEMU refused (no such job, or it has not concluded).
            ConnectError: the connection is gone.
        """
        await self.execute("job-dismiss", {"id": job_id})

    # -- storage: the destination's exports ----------------------------------------------

    async def start_nbd_server(self, address: str) -> None:
        """Start QEMU's NBD server (``nbd-server-start``).

        Args:
            address: ``unix:PATH`` or ``tcp:HOST:PORT`` (the benchmark's direct path).

        Raises:
            MigrationError: QEMU refused (a server already runs; the path is unusable).
            ConnectError: the connection is gone.
        """
        # nbd-server-start still takes the legacy form: {"type": ..., "data": {...}}.
        flat = dict(_socket_address(address))
        kind = flat.pop("type")
        await self.execute("nbd-server-start", {"addr": {"type": kind, "data": flat}})

    async def stop_nbd_server(self) -> None:
        """Stop QEMU's NBD server and every export on it (``nbd-server-stop``).

        Raises:
            MigrationError: QEMU refused (no server runs).
            ConnectError: the connection is gone.
        """
        await self.execute("nbd-server-stop")

    async def export_node(self, export_id: str, node_name: str, name: str) -> None:
        """Export a node, writable, on the NBD server (``block-export-add``).

        Exporting a node of a VM waiting for an incoming migration activates it (QEMU
        takes the image's write lock), as storage migration needs.

        Raises:
            MigrationError: QEMU refused (no server, a duplicate id or name).
            ConnectError: the connection is gone.
        """
        await self.execute(
            "block-export-add",
            {
                "type": "nbd",
                "id": export_id,
                "node-name": node_name,
                "name": name,
                "writable": True,
            },
        )

    async def query_export_ids(self) -> list[str]:
        """Return the ids of the block exports (``query-block-exports``).

        Raises:
            MigrationError: QEMU refused the command.
            ConnectError: the connection is gone.
        """
        entries = await self._execute_list("query-block-exports")
        return [str(entry.get("id")) for entry in entries]

    async def delete_export(self, export_id: str) -> None:
        """Remove an export, closing its clients' connections (``block-export-del``, hard).

        Raises:
            MigrationError: QEMU refused (no such export).
            ConnectError: the connection is gone.
        """
        await self.execute("block-export-del", {"id": export_id, "mode": "hard"})

    # -- events ------------------------------------------------------------------------

    async def next_migration_event(self, timeout_s: float | None) -> MigrationStatus | None:
        """Wait for the next ``MIGRATION`` event.

        QEMU sends these only while capability ``events`` is on.

        Args:
            timeout_s: seconds to wait; ``None`` waits forever.

        Returns:
            The status the event announces, or ``None`` if none came in time.
        """
        try:
            async with asyncio.timeout(timeout_s):
                event = await self._migration_events.get()
        except TimeoutError:
            return None
        data = event.get("data")
        status = data.get("status") if isinstance(data, Mapping) else None
        logger.debug("< %s: MIGRATION %s", self.name, status)
        return _parse_migration_status(status)
