"""Source and destination orchestration of one live migration, over `QMP`.

The destination is prepared first (`prepare_incoming`), then the source starts
(`start_migration`) and is followed to the end (`follow_migration`); the destination's own
view is awaited last (`wait_destination_completed`), because the source reports
``completed`` before the destination has loaded the final state.

Both sides get the same capabilities (``events``, ``multifd`` with ``multifd-channels``,
``postcopy-ram``): QEMU requires them to match, and a mismatch shows up only as a hang or an
opaque stream error mid-migration.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from migrelay.aio.runner import wait_first
from migrelay.control.convergence import (
    Action,
    Cancel,
    ConvergenceWatch,
    SetDowntime,
    StartPostcopy,
)
from migrelay.control.qmp import (
    QMP,
    UNLIMITED_BANDWIDTH,
    Capability,
    MigrationInfo,
    MigrationStatus,
    RunState,
)
from migrelay.errors import (
    CapabilityMismatchError,
    MigrationCancelledError,
    MigrationError,
    NotConvergingError,
    PostcopyPausedError,
    StateError,
    StorageError,
    StreamStalledError,
    UnsupportedError,
)

if TYPE_CHECKING:
    from migrelay.control.storage import SourceMirrors

__all__ = [
    "DEFAULT_POLL_INTERVAL_S",
    "DEFAULT_RECOVER_TIMEOUT_S",
    "DEFAULT_STALL_TIMEOUT_S",
    "RESUME_RETRY_S",
    "MigrationCancelledError",
    "MigrationOptions",
    "MigrationResult",
    "PostcopyPausedError",
    "Progress",
    "RunState",
    "cancel_outgoing",
    "check_can_start",
    "check_incoming",
    "check_prepared_for",
    "follow_migration",
    "prepare_incoming",
    "require",
    "sleep_or_stop",
    "start_migration",
    "wait_destination_completed",
]

logger = logging.getLogger(__name__)

#: QEMU's own default downtime limit. migrelay sets it explicitly when none is given:
#: the convergence policy raises it during a migration, and a VM reused afterwards must
#: not keep the raised value.
DEFAULT_DOWNTIME_LIMIT_MS = 300

#: How often `follow_migration` polls ``query-migrate``; once a second is what an operator
#: reads, and a status change wakes the loop early through the ``MIGRATION`` event.
DEFAULT_POLL_INTERVAL_S = 1.0

#: How long `follow_migration` waits, by default, for the link of a ``postcopy-paused``
#: migration to return. In postcopy the VM's state is split between the hosts and cannot
#: go back to the source, so waiting is the only way out; 5 min covers a relay restart or
#: a short network outage without holding an operator's terminal for long.
DEFAULT_RECOVER_TIMEOUT_S = 300.0

#: How long `migrelay migrate` lets a migration move no data before it shuts the stuck
#: stream down: past the relays' own liveness timeout (15 + 15 s, up to 45 s), so a dead
#: link is theirs to report; what is left is a peer that is alive but does not read
#: (a frozen relay on the source host), which nothing else would ever end.
DEFAULT_STALL_TIMEOUT_S = 60.0

#: Seconds between two ``migrate resume`` attempts while the link is down. Each attempt
#: makes the relay open a WebSocket, which fails fast while the link is down and logs a
#: line: 3 s resumes soon after the link returns without flooding the relays' logs.
RESUME_RETRY_S = 3.0

#: How long `follow_migration` waits for QEMU to fill in a completed migration's
#: totals, and how often it looks (see `_settled`).
_SETTLE_TIMEOUT_S = 1.0
_SETTLE_POLL_S = 0.01


#: A typed ``query-migrate`` snapshot, as handed to ``on_progress``.
Progress = MigrationInfo

#: Runstates a source may migrate from. ``prelaunch`` is a VM started with ``-S`` (the test
#: VMs); ``postmigrate`` may migrate again (QEMU allows it, e.g. after a cancelled target).
_SOURCE_STATES = frozenset(
    {RunState.RUNNING, RunState.PAUSED, RunState.PRELAUNCH, RunState.POSTMIGRATE}
)


#: The multifd compression methods QEMU offers (``multifd-compression``), with the
#: range of each one's level (QEMU's ``multifd-zlib-level``, ``multifd-zstd-level``).
COMPRESSION_LEVELS: dict[str, range] = {"zlib": range(0, 10), "zstd": range(0, 21)}


@dataclass(frozen=True, slots=True)
class MigrationOptions:
    """What both sides of a migration agree on, and the source's limits.

    Attributes:
        multifd_channels: use multifd with this many channels; ``None`` for one channel.
        postcopy: enable ``postcopy-ram`` on both sides (switch with
            ``migrate-start-postcopy`` later).
        max_bandwidth: source rate limit in bytes/s; ``None`` lifts QEMU's 128 MiB/s
            default to unlimited.
        downtime_limit_ms: the longest pause QEMU aims for; ``None`` keeps its 300 ms.
        compress: multifd compression (``zstd``, ``zlib``), set on both sides; needs
            ``multifd_channels``. ``None``: none.
        compress_level: its level (QEMU's default: 1); source only.
        xbzrle_cache: source only: send pages dirtied again as differences, with a cache
            of this many bytes. Refused with multifd: QEMU 7.2 sends multifd pages
            without XBZRLE, so the cache would cost memory and do nothing.
        auto_converge: source only: let QEMU throttle the guest's vCPUs while it dirties
            memory faster than the link carries it.
        return_path: source only: open QEMU's return path, on which the destination
            acknowledges the end of the stream: ``completed`` then means the destination
            read it all (``migrate --quit-source`` relies on it). Postcopy opens it anyway.
    """

    multifd_channels: int | None = None
    postcopy: bool = False
    max_bandwidth: int | None = None
    downtime_limit_ms: int | None = None
    compress: str | None = None
    compress_level: int | None = None
    xbzrle_cache: int | None = None
    auto_converge: bool = False
    return_path: bool = False

    def __post_init__(self) -> None:
        # Checked here, not only by QEMU, so that the operator hears it before either VM
        # is touched. The ranges are QEMU's (migration.c, migrate_params_check).
        if self.multifd_channels is not None and not 1 <= self.multifd_channels <= 255:
            raise ValueError(f"multifd channels must be 1..255, got {self.multifd_channels}")
        if self.max_bandwidth is not None and self.max_bandwidth <= 0:
            raise ValueError(f"max bandwidth must be positive, got {self.max_bandwidth}")
        if self.downtime_limit_ms is not None and self.downtime_limit_ms < 0:
            raise ValueError(f"downtime limit must be >= 0, got {self.downtime_limit_ms}")
        if self.compress is not None:
            levels = COMPRESSION_LEVELS.get(self.compress)
            if levels is None:
                known = ", ".join(COMPRESSION_LEVELS)
                raise ValueError(f"compression must be one of {known}, got {self.compress!r}")
            if self.multifd_channels is None:
                raise ValueError("compression needs multifd (QEMU compresses multifd pages)")
            if self.compress_level is not None and self.compress_level not in levels:
                raise ValueError(
                    f"{self.compress} level must be {levels.start}..{levels.stop - 1},"
                    f" got {self.compress_level}"
                )
        elif self.compress_level is not None:
            raise ValueError("a compression level needs a compression method")
        if self.xbzrle_cache is not None:
            if self.xbzrle_cache <= 0:
                raise ValueError(f"xbzrle cache must be positive, got {self.xbzrle_cache}")
            if self.multifd_channels is not None:
                raise ValueError(
                    "xbzrle does nothing with multifd: qemu 7.2 sends multifd pages"
                    " without it; use compression with multifd, or xbzrle without"
                )

    def capabilities(self) -> dict[Capability | str, bool]:
        """Return the capabilities both sides must set, every one explicitly on or off.

        Explicit ``False`` matters: a VM reused after an earlier migration keeps its
        capabilities, and one side with multifd and the other without hangs.
        """
        return {
            Capability.EVENTS: True,
            Capability.MULTIFD: self.multifd_channels is not None,
            Capability.POSTCOPY_RAM: self.postcopy,
        }

    def source_capabilities(self) -> dict[Capability | str, bool]:
        """`capabilities` and those only the source uses (XBZRLE, auto-converge)."""
        return {
            **self.capabilities(),
            Capability.XBZRLE: self.xbzrle_cache is not None,
            Capability.AUTO_CONVERGE: self.auto_converge,
            Capability.RETURN_PATH: self.return_path,
        }

    def describe(self) -> str:
        """``multifd 4 channels, postcopy`` / ``no multifd, no postcopy``: for messages."""
        multifd = (
            f"multifd {self.multifd_channels} channels"
            if self.multifd_channels is not None
            else "no multifd"
        )
        if self.compress is not None:
            multifd += f" with {self.compress}"
        return f"{multifd}, {'postcopy' if self.postcopy else 'no postcopy'}"


#: The first QEMU release with each capability migrelay may turn on, for the message
#: that says a QEMU is too old for what was asked.
_FIRST_RELEASE: dict[str, str] = {
    Capability.EVENTS: "2.4",
    Capability.MULTIFD: "4.0",
    Capability.POSTCOPY_RAM: "2.5",
    Capability.PAUSE_BEFORE_SWITCHOVER: "2.11",
    Capability.XBZRLE: "1.6",
    Capability.AUTO_CONVERGE: "2.0",
    Capability.RETURN_PATH: "2.5",
}

#: The first QEMU release with multifd compression (``multifd-compression``).
_FIRST_COMPRESSION_RELEASE = "5.0"


async def _set_capabilities(
    qmp: QMP,
    options: MigrationOptions,
    *,
    pause_before_switchover: bool | None = None,
    source: bool = False,
) -> None:
    """Set ``options.capabilities()`` (``source_capabilities()`` on the source) after
    checking that this QEMU has them all.

    Raises:
        UnsupportedError: a capability to turn on is unknown to this QEMU; its version
            and the first release that has the capability are named. Nothing was changed.
        MigrationError, ConnectError: from QMP.
    """
    supported = await qmp.query_capabilities()
    wanted = options.source_capabilities() if source else options.capabilities()
    if pause_before_switchover is not None:
        # Explicitly off without disks: a VM that kept it from an earlier storage
        # migration would otherwise wait in pre-switchover for a migrate-continue.
        wanted[Capability.PAUSE_BEFORE_SWITCHOVER] = pause_before_switchover
    missing = [str(name) for name, on in wanted.items() if on and str(name) not in supported]
    if missing:
        version = await qmp.query_version()
        needs = ", ".join(
            f"{name} (qemu {_FIRST_RELEASE.get(name, '?')} or later)" for name in missing
        )
        raise UnsupportedError(f"qemu {version} of {qmp.name} cannot migrate with {needs}")
    # A capability this QEMU does not know is off in it already: leave it out.
    await qmp.set_capabilities({name: on for name, on in wanted.items() if str(name) in supported})


async def _set_compression(qmp: QMP, options: MigrationOptions) -> None:
    """Set ``multifd-compression`` to ``options.compress``, explicitly ``none`` without it.

    Raises:
        UnsupportedError: compression was asked of a QEMU that cannot do it (too old, or
            built without that method); its version is named. Nothing was changed.
        MigrationError, ConnectError: from QMP.
    """
    if options.multifd_channels is None:
        return
    parameters = await qmp.query_parameters()
    if parameters.multifd_compression is None:
        if options.compress is None:
            return  # a QEMU before 5.0 compresses nothing: "none" is all it does
        version = await qmp.query_version()
        raise UnsupportedError(
            f"qemu {version} of {qmp.name} cannot compress multifd pages"
            f" (qemu {_FIRST_COMPRESSION_RELEASE} or later)"
        )
    try:
        await qmp.set_parameters(
            multifd_compression=options.compress or "none",
            compress_level=options.compress_level,
        )
    except MigrationError as exc:
        if options.compress is None:
            raise
        # A QEMU built without the library knows the method's name only in its schema.
        version = await qmp.query_version()
        raise UnsupportedError(
            f"qemu {version} of {qmp.name} cannot compress with {options.compress}: {exc}"
        ) from exc


async def check_prepared_for(qmp: QMP, options: MigrationOptions) -> None:
    """Check that a destination that already listens was prepared with ``options``.

    One side with multifd and the other without does not fail cleanly in QEMU 7.2: a
    destination without it takes the extra channels as a stream error and exits, one
    with it waits for channels that never come. So a mismatch is refused before the
    source sends a byte.

    Raises:
        CapabilityMismatchError: the capabilities or the multifd channel count differ.
        MigrationError, ConnectError: from QMP.
    """
    capabilities = await qmp.query_capabilities()
    channels = None
    compress = None
    if capabilities.get(Capability.MULTIFD):
        parameters = await qmp.query_parameters()
        channels = parameters.multifd_channels
        if parameters.multifd_compression not in (None, "none"):
            compress = parameters.multifd_compression
    prepared = MigrationOptions(
        multifd_channels=channels,
        postcopy=capabilities.get(Capability.POSTCOPY_RAM, False),
        compress=compress,
    )
    if (prepared.multifd_channels, prepared.postcopy, prepared.compress) != (
        options.multifd_channels,
        options.postcopy,
        options.compress,
    ):
        raise CapabilityMismatchError(
            f"listening with {prepared.describe()}",
            f"{options.describe()} (as the source announced)",
            "prepare the destination with the same --multifd, --compress and --postcopy"
            " as migrate",
        )


@dataclass(frozen=True, slots=True)
class MigrationResult:
    """How a finished migration went, from the source's final ``query-migrate``.

    Attributes:
        status: always `MigrationStatus.COMPLETED` (other endings raise).
        total_time_ms: from ``migrate`` to completion, QEMU's count.
        downtime_ms: how long the VM was stopped.
        setup_time_ms: time in ``setup``.
        transferred: RAM bytes sent.
        rate_bytes_per_s: ``transferred`` over ``total_time_ms`` (QEMU's own final
            ``mbps`` covers only the last pass).
        passes: dirty-bitmap syncs (``dirty-sync-count``).
        info: the final snapshot as QEMU reported it.
    """

    status: MigrationStatus
    total_time_ms: int | None
    downtime_ms: int | None
    setup_time_ms: int | None
    transferred: int | None
    rate_bytes_per_s: float | None
    passes: int | None
    info: MigrationInfo

    @classmethod
    def from_info(cls, info: MigrationInfo) -> MigrationResult:
        """Build the result from the final snapshot."""
        rate = None
        if info.transferred is not None and info.total_time_ms:
            rate = info.transferred / (info.total_time_ms / 1000)
        return cls(
            status=info.status,
            total_time_ms=info.total_time_ms,
            downtime_ms=info.downtime_ms,
            setup_time_ms=info.setup_time_ms,
            transferred=info.transferred,
            rate_bytes_per_s=rate,
            passes=info.dirty_sync_count,
            info=info,
        )


async def require(
    qmp: QMP, allowed: RunState | Collection[RunState], hint: str | None = None
) -> RunState:
    """Check that the VM behind ``qmp`` is in one of the ``allowed`` runstates.

    Args:
        qmp: a connected client.
        allowed: the runstate, or runstates, the next operation needs.
        hint: what to do otherwise, for the error message.

    Returns:
        The runstate found.

    Raises:
        StateError: the VM is in another runstate; ``state`` and ``required`` name both.
        MigrationError, ConnectError: from ``query-status``.
    """
    wanted = frozenset({allowed} if isinstance(allowed, RunState) else allowed)
    state = await qmp.query_status()
    if state not in wanted:
        required = " or ".join(sorted(str(s) for s in wanted))
        raise StateError(state, required, hint)
    return state


async def check_incoming(qmp: QMP) -> None:
    """Check that the VM waits for an incoming migration and does not listen yet.

    Raises:
        StateError: it was not started with ``-incoming defer``, or already listens.
        MigrationError, ConnectError: from QMP.
    """
    await require(
        qmp,
        RunState.INMIGRATE,
        "start the destination qemu with -incoming defer to receive a migration",
    )
    before = await qmp.query_migrate()
    if before.socket_addresses or before.status is not MigrationStatus.NONE:
        where = ", ".join(before.socket_addresses) or f"status {before.status}"
        raise StateError(
            f"inmigrate, already listening on {where}",
            "inmigrate with no listener",
            "start the destination qemu with -incoming defer, not -incoming URI,"
            " and prepare it once",
        )


async def prepare_incoming(qmp: QMP, uri: str, options: MigrationOptions) -> MigrationInfo:
    """Prepare the destination: same capabilities as the source, then listen on ``uri``.

    Args:
        qmp: connected to the destination QEMU, started with ``-incoming defer``.
        uri: where to listen (``unix:PATH``, ``tcp:HOST:PORT``; port 0 picks one).
        options: must equal the source's.

    Returns:
        The destination's ``query-migrate`` after ``migrate-incoming``; its
        ``socket_addresses`` say where QEMU really listens.

    Raises:
        StateError: the VM is not waiting for an incoming migration (not started with
            ``-incoming``), or already listens (started with ``-incoming URI`` rather than
            ``defer``, or prepared before). Nothing was changed.
        MigrationError: QEMU refused a capability, parameter or the URI; capabilities
            may already have been set.
        ConnectError: the connection is gone.
    """
    await check_incoming(qmp)
    await _set_capabilities(qmp, options)
    if options.multifd_channels is not None:
        await qmp.set_parameters(multifd_channels=options.multifd_channels)
    await _set_compression(qmp, options)
    await qmp.migrate_incoming(uri)
    info = await qmp.query_migrate()
    logger.info("%s: listening for an incoming migration on %s", qmp.name, _where(info, uri))
    return info


async def check_can_start(qmp: QMP) -> None:
    """Check that the VM can be a migration's source now (its runstate, no migration).

    Raises:
        StateError: it cannot (an incoming VM, shut down, …), or a migration is
            under way.
        MigrationError, ConnectError: from QMP.
    """
    await require(
        qmp,
        _SOURCE_STATES,
        "only a running, paused or not yet started vm can be migrated",
    )
    current = await qmp.query_migrate()
    if current.status.is_active:
        raise StateError(
            f"migration {current.status}",
            "no migration in progress",
            "wait for it to end or cancel it",
        )


async def start_migration(
    qmp: QMP, uri: str, options: MigrationOptions, *, pause_before_switchover: bool = False
) -> None:
    """Set up the source and start migrating it to ``uri``.

    Sets the same capabilities as `prepare_incoming`, the multifd channel count, the
    downtime limit, and ``max-bandwidth`` (raised from QEMU's 128 MiB/s to unlimited unless
    ``options.max_bandwidth`` says otherwise). Returns once QEMU has accepted ``migrate``;
    follow it with `follow_migration`.

    Args:
        qmp: connected to the source QEMU.
        uri: the destination (``unix:PATH`` of a relay socket, ``tcp:HOST:PORT``).
        options: must equal the destination's.
        pause_before_switchover: stop in ``pre-switchover`` (guest paused) until
            `follow_migration` lets it continue: the disk mirrors end there.

    Raises:
        StateError: the VM cannot be a source (it is itself an incoming VM, shut down, …),
            or a migration is already under way. Nothing was changed.
        MigrationError: QEMU refused a capability, a parameter or ``migrate``; no
            migration is running, but capabilities/parameters may have been set.
        ConnectError: the connection is gone.
    """
    await check_can_start(qmp)
    await _set_capabilities(
        qmp, options, pause_before_switchover=pause_before_switchover, source=True
    )
    await qmp.set_parameters(
        multifd_channels=options.multifd_channels,
        max_bandwidth=(
            options.max_bandwidth if options.max_bandwidth is not None else UNLIMITED_BANDWIDTH
        ),
        downtime_limit_ms=(
            options.downtime_limit_ms
            if options.downtime_limit_ms is not None
            else DEFAULT_DOWNTIME_LIMIT_MS
        ),
        xbzrle_cache_size=options.xbzrle_cache,
    )
    await _set_compression(qmp, options)
    await qmp.migrate(uri)
    logger.info("%s: migration to %s started", qmp.name, uri)


async def follow_migration(
    qmp: QMP,
    on_progress: Callable[[Progress], object] | None = None,
    interval: float = DEFAULT_POLL_INTERVAL_S,
    *,
    postcopy_after_passes: int | None = None,
    stop: asyncio.Event | None = None,
    resume_uri: str | None = None,
    recover_timeout: float = DEFAULT_RECOVER_TIMEOUT_S,
    stall_timeout: float | None = None,
    storage: SourceMirrors | None = None,
    convergence: ConvergenceWatch | None = None,
) -> MigrationResult:
    """Poll the source's ``query-migrate`` until the migration ends.

    A ``MIGRATION`` event wakes the loop before ``interval`` is up, so the end is seen
    at once rather than up to ``interval`` later.

    Setting ``stop`` (from a signal handler, say) cancels the migration with `cancel`
    between two polls, never in the middle of a QMP command: a command abandoned midway
    leaves its reply unrouted in ``qemu.qmp``, which logs a warning for it.

    Args:
        qmp: connected to the source, after `start_migration`.
        on_progress: called with every snapshot, the final one included.
        interval: seconds between polls.
        postcopy_after_passes: switch to postcopy (``migrate-start-postcopy``) once this
            many dirty-sync passes have run; needs ``postcopy`` in the options.
        stop: when set, cancel the migration (``migrate_cancel``) and report how it
            ended; a migration that completed before the cancel arrived still returns.
            While ``postcopy-paused`` it ends the wait without cancelling (see below).
        resume_uri: where to resume a ``postcopy-paused`` migration (the link failed
            during postcopy): ``migrate`` with ``resume`` to this URI every
            `RESUME_RETRY_S` until it is ``postcopy-active`` again. The destination must
            be told ``migrate-recover`` by its side (``serve --qmp``, ``incoming
            --recover``). ``None``: a paused migration raises at once.
        recover_timeout: seconds a paused migration may stay paused.
        stall_timeout: seconds without a byte of progress (``ram.transferred``) while
            ``active`` or ``postcopy-active`` after which the stream counts as stuck and
            is shut down (`QMP.yank_migration`): QEMU waits on a peer that stopped
            reading for ever, and only this side can tell. ``None``: never.
        storage: the disk mirrors of a storage migration (started with
            ``pause_before_switchover``): their progress joins each snapshot, a failed
            mirror cancels the migration, and in ``pre-switchover`` they are ended in
            sync before ``migrate-continue`` (`SourceMirrors.cancel_in_sync`).
        convergence: the policy for a precopy that does not converge
            (`migrelay.control.convergence`): it sees every snapshot, raises the
            downtime limit, switches to postcopy or cancels at the deadline; its verdict
            joins each snapshot (``MigrationInfo.convergence``).

    Returns:
        The result of a ``completed`` migration.

    Raises:
        MigrationError: the migration ``failed`` (``str()`` is QEMU's ``error-desc``) or was
            ``cancelled``; the source VM keeps its state and stays where it was. Or it
            is ``postcopy-paused`` and was not resumed (no ``resume_uri``, timeout,
            ``stop``): it stays paused and may still be resumed later.
        StorageError: a disk mirror failed or could not end in sync; the migration
            was cancelled (the mirrors are the caller's to remove).
        NotConvergingError: ``convergence`` cancelled the migration at its deadline;
            the source runs on.
        ConnectError: the connection is gone (the source QEMU died).
        TimeoutError: ``stop`` was set and QEMU was still cancelling 10 s later.
    """
    postcopy_requested = False
    continued = False
    stall = _StallWatch(stall_timeout)
    while True:
        if stop is not None and stop.is_set():
            info = await cancel_outgoing(qmp)
            if storage is not None:
                info = replace(info, disks=storage.snapshot())
            if on_progress is not None:
                on_progress(info)
            if info.status is MigrationStatus.COMPLETED:
                return MigrationResult.from_info(info)
            _raise_if_ended(info)
            raise MigrationCancelledError("migration was cancelled")
        info = await qmp.query_migrate()
        if info.status is MigrationStatus.COMPLETED:
            info = await _settled(qmp, info)
        if storage is not None:
            info = await _with_disks(qmp, info, storage)
        if convergence is not None:
            for action in convergence.observe(info, time.monotonic()):
                await _carry_out(qmp, action, on_progress, info)
            info = replace(
                info,
                convergence=convergence.describe(),
                downtime_limit_ms=convergence.downtime_limit_ms if convergence.raised else None,
            )
        if on_progress is not None:
            on_progress(info)
        if info.status is MigrationStatus.PRE_SWITCHOVER:
            if not continued:
                await _switch_over(qmp, storage)
                continued = True
            else:
                # QEMU leaves pre-switchover only when its migration thread wakes: a
                # second migrate-continue would be refused (or land on a later state).
                await _next_event_or_stop(qmp, min(interval, _SETTLE_POLL_S * 5), stop)
            continue
        if info.status is MigrationStatus.COMPLETED:
            result = MigrationResult.from_info(info)
            logger.info(
                "%s: migration completed: %s bytes in %s ms, downtime %s ms",
                qmp.name,
                result.transferred,
                result.total_time_ms,
                result.downtime_ms,
            )
            return result
        stall.raise_if_ended(info)
        _raise_if_ended(info)
        if info.status is MigrationStatus.NONE:
            raise StateError("no migration", "a started migration", "call start_migration first")
        if stall.is_stuck(info):
            logger.warning(
                "%s: no data moved for %g s; the stream is stuck (a frozen relay or"
                " peer?): shutting it down",
                qmp.name,
                stall.timeout,
            )
            await qmp.yank_migration()
            continue
        if info.status is MigrationStatus.POSTCOPY_PAUSED:
            # Without this the loop would poll a paused migration forever: QEMU waits
            # for a command, not for the link.
            await _resume_postcopy(qmp, resume_uri, recover_timeout, on_progress, interval, stop)
            continue
        if (
            postcopy_after_passes is not None
            and not postcopy_requested
            and info.status is MigrationStatus.ACTIVE
            and (info.dirty_sync_count or 0) >= postcopy_after_passes
        ):
            await qmp.migrate_start_postcopy()
            postcopy_requested = True
        await _next_event_or_stop(qmp, interval, stop)


async def _carry_out(
    qmp: QMP,
    action: Action,
    on_progress: Callable[[Progress], object] | None,
    info: MigrationInfo,
) -> None:
    """Do what the convergence policy decided (`follow_migration`).

    Logged at info level: the progress shows each step as it happens, and a cancel
    becomes the command's one error line.

    Raises:
        NotConvergingError: the action was to cancel, and the migration ended cancelled.
    """
    if isinstance(action, SetDowntime):
        logger.info("%s: %s; downtime limit now %d ms", qmp.name, action.reason, action.limit_ms)
        await qmp.set_parameters(downtime_limit_ms=action.limit_ms)
    elif isinstance(action, StartPostcopy):
        # Shown even without -v: from here the migration cannot go back to the source.
        logger.warning(
            "%s: switching to postcopy (%s): from now on it can only complete, or pause"
            " for recovery if the link fails; the deadline no longer applies",
            qmp.name,
            action.reason,
        )
        await qmp.migrate_start_postcopy()
    elif isinstance(action, Cancel):
        logger.info("%s: %s", qmp.name, action.reason)
        final = await cancel_outgoing(qmp)
        if final.status is MigrationStatus.COMPLETED:
            return  # it completed before the cancel arrived: the next poll sees it
        if on_progress is not None:
            on_progress(replace(final, convergence=action.verdict, disks=info.disks))
        raise NotConvergingError(action.reason)


async def _with_disks(qmp: QMP, info: MigrationInfo, storage: SourceMirrors) -> MigrationInfo:
    """``info`` with the mirrors' progress; a failed mirror cancels the migration.

    A mirror that fails during the RAM phase would leave the destination's disk behind
    the guest's writes: the migration must not reach switchover.
    """
    try:
        disks = await storage.progress(qmp)
    except StorageError:
        if info.status in (MigrationStatus.FAILED, MigrationStatus.CANCELLED):
            # The migration's own ending is the cause to report: its mirrors failed
            # with it (the same link or destination went away).
            return replace(info, disks=storage.snapshot())
        if info.status.is_active:
            await cancel_outgoing(qmp)
        raise
    return replace(info, disks=disks)


async def _switch_over(qmp: QMP, storage: SourceMirrors | None) -> None:
    """In ``pre-switchover`` (guest paused): end the mirrors in sync, then continue.

    Raises:
        StorageError: a mirror could not end in sync; the migration was cancelled and
            the guest runs on at the source.
    """
    if storage is not None and not storage.switched_over:
        try:
            await storage.cancel_in_sync(qmp)
        except (StorageError, MigrationError):
            await cancel_outgoing(qmp)
            raise
        logger.info("%s: disks in sync at switchover; continuing", qmp.name)
    await qmp.migrate_continue()


class _StallWatch:
    """Tells when a migration moved no data for ``timeout`` seconds (`follow_migration`)."""

    _WATCHED = (MigrationStatus.ACTIVE, MigrationStatus.POSTCOPY_ACTIVE)

    def __init__(self, timeout: float | None) -> None:
        self.timeout = timeout
        self.yanked = False
        self._last: tuple[MigrationStatus, int | None] | None = None
        self._since = time.monotonic()

    def is_stuck(self, info: MigrationInfo) -> bool:
        now = time.monotonic()
        marker = (info.status, info.transferred)
        if marker != self._last or info.status not in self._WATCHED:
            self._last, self._since = marker, now
            return False
        if self.timeout is None or now - self._since < self.timeout:
            return False
        self.yanked = True
        self._last, self._since = None, now  # postcopy resumes: watch it afresh
        return True

    def raise_if_ended(self, info: MigrationInfo) -> None:
        """Say why a migration that this watch shut down failed."""
        if self.yanked and info.status is MigrationStatus.FAILED:
            raise StreamStalledError(
                f"no data moved for {self.timeout:g} s, so the stuck stream was shut down"
                f" (a frozen relay or peer?); qemu: {info.error_desc or 'failed'}"
            )


async def _resume_postcopy(
    qmp: QMP,
    uri: str | None,
    timeout_s: float,
    on_progress: Callable[[Progress], object] | None,
    interval: float,
    stop: asyncio.Event | None,
) -> None:
    """Resume a ``postcopy-paused`` migration once the link is back; see `follow_migration`.

    Returns once the source is ``postcopy-active`` (or beyond) again.

    QEMU 7.2 (seen here): the source goes ``postcopy-paused`` when its stream fails and
    stays there, with no ``error-desc``. ``migrate`` with ``resume`` makes it
    ``postcopy-recover`` and connect; a connection that fails (link still down, relay
    refused) brings it back to ``postcopy-paused``, so retrying is safe. Unlike precopy,
    the migration cannot be cancelled back to the source: the destination already runs
    on pages the source no longer has.
    """
    paused_at = time.monotonic()
    deadline = paused_at + timeout_s
    hint = "the vm's state is split between both hosts; resume with migrate --postcopy"
    if uri is None:
        raise PostcopyPausedError(f"postcopy paused: the link to the destination failed; {hint}")
    # The one line the operator sees (besides the progress) until it resumes or gives up.
    logger.warning(
        "%s: postcopy paused: the link to the destination failed;"
        " waiting up to %g s for it to return, then resuming",
        qmp.name,
        timeout_s,
    )
    last_attempt: float | None = None
    while True:
        info = await qmp.query_migrate()
        if on_progress is not None:
            on_progress(info)
        _raise_if_ended(info)
        now = time.monotonic()
        if info.status in (MigrationStatus.POSTCOPY_ACTIVE, MigrationStatus.COMPLETED):
            logger.info("%s: postcopy resumed after %.1f s", qmp.name, now - paused_at)
            return
        if stop is not None and stop.is_set():
            # Not migrate_cancel: it would lose the pages only the destination has.
            raise PostcopyPausedError(f"interrupted while postcopy was paused; {hint}")
        if now >= deadline:
            # Also in postcopy-recover: an attempt that never completes must not hang us.
            raise PostcopyPausedError(
                f"postcopy {info.status}: the link to the destination did not return"
                f" within {timeout_s:g} s; {hint}"
            )
        # postcopy-recover: an attempt is connecting; its outcome arrives as an event.
        due = last_attempt is None or now - last_attempt >= RESUME_RETRY_S
        if info.status is MigrationStatus.POSTCOPY_PAUSED and due:
            last_attempt = now
            try:
                await qmp.migrate(uri, resume=True)
            except MigrationError as exc:
                # QEMU still tearing down the last attempt; the next one will do.
                logger.debug("%s: resume not accepted yet: %s", qmp.name, exc)
        wait = interval
        if last_attempt is not None:
            wait = min(wait, max(last_attempt + RESUME_RETRY_S - now, 0.05))
        await _next_event_or_stop(qmp, wait, stop)


async def wait_destination_completed(qmp: QMP, timeout_s: float) -> MigrationInfo:
    """Wait until the destination's own ``query-migrate`` says ``completed``.

    The source completes first; the destination is done only when it has loaded the
    final device state, which is what this waits for.

    Args:
        qmp: connected to the destination, after `prepare_incoming`.
        timeout_s: seconds to wait in all.

    Returns:
        The destination's final snapshot.

    Raises:
        MigrationError: the incoming migration failed or was cancelled, with QEMU's text.
        TimeoutError: not completed within ``timeout_s``; the destination is left as is.
        ConnectError: the connection is gone (the destination QEMU exited or died).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        info = await qmp.query_migrate()
        if info.status is MigrationStatus.COMPLETED:
            return info
        _raise_if_ended(info)
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"incoming migration on {qmp.name} not completed within {timeout_s:g} s"
                f" (status {info.status})"
            )
        # The destination emits MIGRATION events too; poll as well, because an event
        # can be consumed by an earlier wait and the status be final already.
        await qmp.next_migration_event(min(remaining, 0.2))


async def cancel_outgoing(qmp: QMP, timeout_s: float = 10.0) -> MigrationInfo:
    """Cancel the outgoing migration and wait until QEMU says it has ended.

    Args:
        qmp: connected to the source.
        timeout_s: seconds to wait for ``cancelled`` (or another final status: the
            migration may have completed or failed before the cancel arrived).

    Returns:
        The final snapshot (status ``cancelled``, ``completed``, ``failed`` or ``none``).

    Raises:
        TimeoutError: QEMU was still cancelling after ``timeout_s``.
        MigrationError, ConnectError: from QMP.
    """
    await qmp.migrate_cancel()
    deadline = time.monotonic() + timeout_s
    while True:
        info = await qmp.query_migrate()
        if info.status.is_terminal or info.status is MigrationStatus.NONE:
            logger.info("%s: migration cancel ended in %s", qmp.name, info.status)
            return info
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(
                f"migration on {qmp.name} still {info.status} {timeout_s:g} s after cancel"
            )
        await qmp.next_migration_event(min(remaining, 0.2))


async def _settled(qmp: QMP, info: MigrationInfo) -> MigrationInfo:
    """Re-read a ``completed`` snapshot until QEMU has filled in its totals.

    QEMU 7.2 sets ``completed`` in ``migration_completion()`` but computes the total time
    and downtime a moment later (``migration_calculate_complete()``, same thread), so a
    ``query-migrate`` in between reports ``total-time: 0`` (seen here in about one run in
    five with 64 MiB). The window is microseconds; a bounded poll closes it.
    """
    deadline = time.monotonic() + _SETTLE_TIMEOUT_S
    while not info.total_time_ms and time.monotonic() < deadline:
        await asyncio.sleep(_SETTLE_POLL_S)
        info = await qmp.query_migrate()
    return info


async def _next_event_or_stop(qmp: QMP, interval: float, stop: asyncio.Event | None) -> None:
    """Wait for a ``MIGRATION`` event, ``interval`` seconds, or ``stop``, whichever is first.

    A `QMP` that shares the monitor is released for the wait instead (no events then):
    another client's ``status`` or ``cancel`` gets its turn.
    """
    if qmp.share_monitor:
        await qmp.release()
        await sleep_or_stop(interval, stop)
        await qmp.reconnect()
        return
    if stop is None:
        await qmp.next_migration_event(interval)
        return
    # Cancelling these waits is safe: neither is a QMP command in flight, only a wait
    # on the event queue and on the flag.
    await wait_first(qmp.next_migration_event(interval), stop.wait())


async def sleep_or_stop(seconds: float, stop: asyncio.Event | None) -> None:
    """Wait ``seconds``, or less if ``stop`` is set meanwhile."""
    if stop is None:
        await asyncio.sleep(seconds)
        return
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await stop.wait()


def _raise_if_ended(info: MigrationInfo) -> None:
    if info.status is MigrationStatus.FAILED:
        # QEMU's own text, whole; the fallback only for a QEMU that gave none.
        raise MigrationError(info.error_desc or "migration failed (qemu gave no reason)")
    if info.status is MigrationStatus.CANCELLED:
        raise MigrationCancelledError("migration was cancelled")


def _where(info: MigrationInfo, uri: str) -> str:
    return ", ".join(info.socket_addresses) or uri
