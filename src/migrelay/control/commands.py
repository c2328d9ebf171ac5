"""What the ``incoming``, ``migrate``, ``status`` and ``cancel`` commands do, over QMP.

Each function opens its own QMP connection to one VM, does one job and closes it again:
a QEMU monitor serves one client at a time, so a command that kept it open would lock
out the next one (``status`` while ``migrate --no-wait`` runs, the test's own checks).

``migrate --to`` announces its capabilities in the WebSocket handshake
(``Migrelay-Migration``, `migrelay.core.headers`), so that ``serve --qmp-dir`` prepares
the destination to match without an ``incoming`` step (`migrelay.control.destination`);
with ``--copy-storage`` also the disks it copies and their sizes (``Migrelay-Storage``),
which the destination exports for it (`migrelay.control.storage`).

Local sockets: ``incoming`` creates the private runtime directory (mode 0700) when QEMU
is to listen in it (the default socket); ``migrate --socket`` checks who bound the relay's
socket before QEMU is told to connect there (`local.check_relay_socket`), so that guest RAM
never goes to a socket another user bound first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from migrelay.aio import local
from migrelay.aio.client import SourceRelay
from migrelay.aio.local import SocketOwners
from migrelay.aio.source import DEFAULT_SOURCE_SOCKET, ClientSettings, private_relay
from migrelay.control.compat import source_vm_header
from migrelay.control.convergence import ConvergencePolicy, ConvergenceWatch
from migrelay.control.migration import (
    DEFAULT_POLL_INTERVAL_S,
    DEFAULT_RECOVER_TIMEOUT_S,
    DEFAULT_STALL_TIMEOUT_S,
    MigrationOptions,
    MigrationResult,
    cancel_outgoing,
    check_can_start,
    check_incoming,
    follow_migration,
    prepare_incoming,
    sleep_or_stop,
    start_migration,
)
from migrelay.control.qmp import QMP, MigrationInfo, MigrationStatus, RunState
from migrelay.control.storage import (
    Disk,
    SourceMirrors,
    StorageOptions,
    default_disk_timeout,
    export_disks,
    select_disks,
    unexport_disks,
)
from migrelay.core.headers import (
    MIGRATION_HEADER,
    STORAGE_HEADER,
    VM_HEADER,
    format_migration_header,
    format_storage_header,
    parse_migration_header,
)
from migrelay.errors import (
    ConnectError,
    HandshakeRefused,
    MigrationCancelledError,
    MigrationError,
    MigrationFailed,
    NotConvergingError,
    PostcopyPausedError,
    StateError,
    StreamStalledError,
)

__all__ = [
    "DEFAULT_EXPORT_TIMEOUT_S",
    "DEFAULT_WAIT_SOCKET_S",
    "MIGRATION_HEADER",
    "POSTCOPY_AFTER_PASSES",
    "RELAY_DRAIN_TIMEOUT_S",
    "MigrateRequest",
    "announcement",
    "cancel_migration",
    "export_until_done",
    "incoming",
    "migrate",
    "parse_announcement",
    "query",
    "recover_incoming",
    "run_migration",
    "vm_name",
    "wait_for_sockets",
    "watch",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: With ``--postcopy``, switch to postcopy once this many passes over RAM have not
#: converged: pass 1 sends all of RAM, and a guest that still needs a fourth pass dirties
#: memory about as fast as the link carries it, so precopy may never end.
POSTCOPY_AFTER_PASSES = 4


def announcement(options: MigrationOptions, resume: bool | None = None) -> str:
    """The `MIGRATION_HEADER` value that announces ``options``: ``multifd=4,postcopy=0``.

    ``resume`` adds ``resume=0|1`` (`resume_announcement` says when it is needed); a
    server from before ``resume`` refuses it, as it could not honour it.
    """
    return format_migration_header(
        options.multifd_channels, options.postcopy, compress=options.compress, resume=resume
    )


def resume_announcement(
    options: MigrationOptions, source_running: bool, keep_paused: bool
) -> bool | None:
    """Whether the destination must be told to resume the guest (``resume=``), or None.

    Precopy needs nothing but ``--keep-paused``: with autostart on, the destination
    applies the runstate the source sends at the end. Postcopy does not send one: a
    destination with autostart on runs the guest from the switch, so it must be told
    whether the source was running.
    """
    if keep_paused:
        return False
    if options.postcopy:
        return source_running
    return None


def parse_announcement(value: str | None) -> MigrationOptions:
    """The capabilities a `MIGRATION_HEADER` value announces; None gives the defaults.

    Raises:
        ValueError: the value is malformed or names what this version does not know.
    """
    announced = parse_migration_header(value)
    return MigrationOptions(
        multifd_channels=announced.multifd_channels,
        postcopy=announced.postcopy,
        compress=announced.compress,
    )


async def incoming(
    qmp_path: str,
    uri: str,
    options: MigrationOptions,
    *,
    recover: bool = False,
    storage: StorageOptions | None = None,
    resume: bool | None = None,
) -> MigrationInfo:
    """Prepare a destination QEMU (``-incoming defer``) to receive on ``uri``.

    Args:
        qmp_path: the destination's QMP socket.
        uri: where QEMU should listen (``unix:PATH``).
        options: the capabilities the source will use.
        recover: instead, let a ``postcopy-paused`` incoming migration listen again on
            ``uri`` (``migrate-recover``), for the source to resume.
        storage: also export the disks (every writable one, or ``storage.disks``) on
            the storage socket beside ``uri`` (``PATH.nbd``), for ``migrate
            --copy-storage``; remove them with `export_until_done`.
        resume: ``True``: the guest resumes here once it has arrived, if it was running
            on the source (even if this QEMU was started with ``-S``); ``False``: it
            stays paused (`set_autostart`); ``None``: as this QEMU's command line says.

    Returns:
        The destination's ``query-migrate`` once it listens.

    Raises:
        ConnectError: the QMP socket cannot be reached.
        StateError: the VM is not waiting for an incoming migration, or already listens;
            with ``recover``: its migration is not ``postcopy-paused``.
        MigrationError: QEMU refused a capability, a parameter or the URI.
        ConfigError: ``uri`` is in the default runtime directory, and that directory is
            unsafe (a symlink, another user's); QEMU was not contacted.
    """
    if uri.startswith("unix:"):
        # QEMU creates its socket there: the default directory must exist, private.
        local.prepare_default_dir(Path(uri.removeprefix("unix:")))
    async with QMP(vm_name(qmp_path)) as qmp:
        await qmp.connect(qmp_path)
        if recover:
            return await recover_incoming(qmp, uri)
        if storage is not None:
            await check_incoming(qmp)
            wanted = None if storage.disks is None else dict.fromkeys(storage.disks)
            socket = local.storage_socket(Path(uri.removeprefix("unix:")))
            await export_disks(qmp, f"unix:{socket}", wanted)
        try:
            info = await prepare_incoming(qmp, uri, options)
            await set_autostart(qmp, resume)
            return info
        except BaseException:
            if storage is not None:
                await unexport_disks(qmp)
            raise


async def set_autostart(qmp: QMP, resume: bool | None) -> None:
    """Decide whether an incoming VM resumes the guest once the migration completes.

    QEMU resumes it only if it ran on the source and this QEMU's ``autostart`` is on
    (off under ``-S``); ``cont`` and ``stop`` on an ``inmigrate`` VM set that flag
    without running anything. So the destination resumes if the source was running, and
    never runs while the source does.
    """
    if resume is None:
        return
    if resume:
        await qmp.cont()
    else:
        await qmp.stop()
    logger.info(
        "%s: the guest %s once the migration completes",
        qmp.name,
        "resumes here (if it ran on the source)" if resume else "stays paused here",
    )


#: How long ``incoming --copy-storage`` keeps the disks exported at most: an hour covers
#: a copy of 200 GiB at 60 MiB/s; a longer one needs ``--export-timeout``.
DEFAULT_EXPORT_TIMEOUT_S = 3600.0


async def export_until_done(
    qmp_path: str,
    timeout_s: float,
    interval: float = DEFAULT_POLL_INTERVAL_S,
    stop: asyncio.Event | None = None,
) -> MigrationInfo | None:
    """``incoming --copy-storage``: once the migration has ended, remove the disk exports.

    Follows the destination's ``query-migrate`` until the migration completes or fails,
    QEMU exits, ``timeout_s`` passes or ``stop`` is set, and removes the exports in
    every case but the exit (then nothing is left to remove).

    Returns:
        The last snapshot, or None when QEMU has gone.
    """
    deadline = time.monotonic() + timeout_s
    async with QMP(vm_name(qmp_path), share_monitor=True) as qmp:
        try:
            await qmp.connect(qmp_path)
            while True:
                info = await qmp.query_migrate()
                if info.status.is_terminal or time.monotonic() >= deadline:
                    break
                if stop is not None and stop.is_set():
                    break
                await qmp.release()
                await sleep_or_stop(min(interval, max(deadline - time.monotonic(), 0)), stop)
                await qmp.reconnect()
        except ConnectError:
            logger.info("%s: qemu has gone; its exports with it", vm_name(qmp_path))
            return None
        await unexport_disks(qmp)
        return info


async def recover_incoming(qmp: QMP, uri: str) -> MigrationInfo:
    """``migrate-recover`` on a destination whose postcopy migration is paused."""
    current = await qmp.query_migrate()
    if current.status is not MigrationStatus.POSTCOPY_PAUSED:
        raise StateError(
            f"migration {current.status}",
            f"migration {MigrationStatus.POSTCOPY_PAUSED}",
            "only a postcopy migration whose link failed can be recovered",
        )
    await qmp.migrate_recover(uri)
    logger.info("%s: postcopy paused; listening again on %s to resume", qmp.name, uri)
    return await qmp.query_migrate()


async def migrate(
    qmp_path: str,
    uri: str,
    options: MigrationOptions,
    *,
    on_progress: Callable[[MigrationInfo], object] | None = None,
    interval: float = DEFAULT_POLL_INTERVAL_S,
    stop: asyncio.Event | None = None,
    wait: bool = True,
    recover_timeout: float = DEFAULT_RECOVER_TIMEOUT_S,
    postcopy_after_passes: int | None = POSTCOPY_AFTER_PASSES,
    stall_timeout: float | None = DEFAULT_STALL_TIMEOUT_S,
    storage: StorageOptions | None = None,
    storage_socket: Path | None = None,
    disks: Sequence[Disk] | None = None,
    convergence: ConvergencePolicy | None = None,
    quit_source: bool = False,
    before_start: Callable[[], Awaitable[None]] | None = None,
) -> MigrationResult | None:
    """Start migrating the VM behind ``qmp_path`` to ``uri`` and follow it to the end.

    With ``options.postcopy``, the migration switches to postcopy after
    ``postcopy_after_passes`` passes that did not converge; if the link then fails
    (``postcopy-paused``), it is resumed to ``uri`` once the link is back, waiting up to
    ``recover_timeout`` seconds. A source found ``postcopy-paused`` (an earlier run gave
    up waiting) is resumed rather than started.

    Args:
        qmp_path: the source's QMP socket.
        uri: the destination (``unix:PATH`` of a relay socket).
        options: must match the destination's.
        on_progress: called with every ``query-migrate`` snapshot, the final one included.
        interval: seconds between snapshots.
        stop: set it (on Ctrl-C) to cancel the migration; the source keeps running in
            the state it had.
        wait: ``False`` returns ``None`` as soon as QEMU has accepted ``migrate``.
        recover_timeout: seconds to wait for a failed link during postcopy.
        postcopy_after_passes: with ``options.postcopy``, switch in this pass (1: at once)
            whatever ``convergence`` says; ``None``: only when ``convergence`` does.
        stall_timeout: seconds without progress before a stuck stream is shut down
            (`follow_migration`); ``None``: never. It bounds the disk copy's stalls too.
        storage: copy the disks first (``--copy-storage``): each is mirrored to its
            export on the destination through ``storage_socket`` until all are in sync,
            then RAM migrates, and the mirrors end in sync at switchover
            (`migrelay.control.storage`). Needs ``wait``. Whatever happens, the jobs and
            nodes it added are gone when this returns.
        storage_socket: the relay's storage socket (``SOCKET.nbd``).
        disks: the disks to copy, if already chosen (``migrate --to`` announced them).
        convergence: the deadline and what to do when precopy does not converge
            (`migrelay.control.convergence`); the deadline counts from now, disk copy
            included. ``None``: no deadline, no downtime steps.
        quit_source: once the migration completed (with ``options.return_path``, so
            the destination acknowledged it), quit the source QEMU.
        before_start: awaited once QEMU answered and the VM was found able to be a
            source, before anything is changed (``migrate --socket`` waits for the
            relay's socket there: a dead QMP socket or a VM that cannot migrate is told
            at once, not after the wait).

    Returns:
        The result of the completed migration, or ``None`` when not waiting.

    Raises:
        ConnectError: the QMP socket cannot be reached, or QEMU went away.
        StateError: the VM cannot be a source, or a migration already runs; nothing
            was changed.
        MigrationError: QEMU refused to start, or the migration failed (QEMU's own
            text) or was cancelled, or stayed postcopy-paused.
    """
    # Following a migration takes minutes: let go of the monitor between polls, so that
    # `status` and `cancel` work from another terminal meanwhile. Not with disks: the
    # guest is paused in pre-switchover until this command ends the mirrors, and a
    # released monitor would hear of it only at the next poll, adding to the downtime.
    started = time.monotonic()
    watch: ConvergenceWatch | None = None
    async with QMP(vm_name(qmp_path), share_monitor=storage is None) as qmp:
        await qmp.connect(qmp_path)
        paused = options.postcopy and (
            (await qmp.query_migrate()).status is MigrationStatus.POSTCOPY_PAUSED
        )
        mirrors: SourceMirrors | None = None
        if before_start is not None:
            if not paused:
                await check_can_start(qmp)
            # QEMU's monitor serves one client at a time: let `status` and the others
            # use it while this waits.
            await qmp.release()
            await before_start()
            await qmp.reconnect()
        if paused:
            # follow_migration resumes it: the same path as a link that fails now (the
            # disks, if any, were in sync before postcopy began).
            logger.info("%s: postcopy migration is paused; resuming it to %s", qmp.name, uri)
            if not wait:
                await qmp.migrate(uri, resume=True)  # one attempt; `status` tells the rest
                return None
        elif storage is not None:
            if not wait or storage_socket is None:
                raise ValueError("copying disks needs wait=True and a storage socket")
            await check_can_start(qmp)
            chosen = disks if disks is not None else await _choose_disks(qmp, storage)
            mirrors = SourceMirrors(
                chosen,
                f"unix:{storage_socket}",
                write_blocking=storage.write_blocking,
                speed=options.max_bandwidth,
            )
        if convergence is not None:
            policy = convergence
            if policy.timeout_s is None:
                policy = policy.with_default_timeout(
                    await qmp.query_memory_size() or 0,
                    mirrors.total_bytes if mirrors is not None else 0,
                    options.max_bandwidth,
                )
            logger.info("%s: precopy deadline %g s (--timeout)", qmp.name, policy.deadline_s)
            watch = ConvergenceWatch(policy, started)
        try:
            if mirrors is not None:
                assert storage is not None
                await mirrors.clear_leftovers(qmp)
                await mirrors.start(qmp)
                timeout = storage.timeout_s or default_disk_timeout(
                    mirrors.total_bytes, options.max_bandwidth
                )
                if watch is not None:
                    # The deadline bounds the whole precopy, the disks' copy included.
                    timeout = max(min(timeout, watch.deadline - time.monotonic()), 1.0)
                await mirrors.wait_ready(
                    qmp,
                    timeout_s=timeout,
                    stall_timeout_s=stall_timeout,
                    interval=interval,
                    on_progress=on_progress,
                    stop=stop,
                )
            if not paused:
                await start_migration(
                    qmp, uri, options, pause_before_switchover=mirrors is not None
                )
            if not wait:
                return None
            result = await follow_migration(
                qmp,
                on_progress,
                interval,
                postcopy_after_passes=postcopy_after_passes if options.postcopy else None,
                convergence=watch,
                stop=stop,
                resume_uri=uri if options.postcopy else None,
                recover_timeout=recover_timeout,
                stall_timeout=stall_timeout,
                storage=mirrors,
            )
        except BaseException:
            if mirrors is not None:
                await _abandon_storage(qmp, mirrors)
            raise
        if mirrors is not None:
            await mirrors.remove(qmp)
        if quit_source:
            logger.info("%s: the destination has the vm; quitting the source qemu", qmp.name)
            await qmp.quit()
        return result


async def _choose_disks(qmp: QMP, storage: StorageOptions) -> list[Disk]:
    return select_disks(await qmp.query_block(), storage.disks)


async def _abandon_storage(qmp: QMP, mirrors: SourceMirrors) -> None:
    """After a failure: cancel a migration still under way, remove the mirrors' traces.

    Never raises: the failure being handled is what the operator must read; what could
    not be cleaned up is logged.
    """
    try:
        if (await qmp.query_migrate()).status.is_active:
            await cancel_outgoing(qmp)
        await mirrors.remove(qmp)
    except (MigrationError, ConnectError, TimeoutError) as exc:
        logger.warning("%s: could not remove the disk copies: %s", qmp.name, exc)


#: Seconds ``migrate --to`` waits, after QEMU reports ``completed``, for the in-process
#: relay to deliver the last bytes and close its channels before tearing it down.
RELAY_DRAIN_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class MigrateRequest:
    """What ``migrelay migrate`` was asked to do.

    Exactly one of ``socket`` (``--socket``: a separate ``connect`` relays) and
    ``relay`` (``--to URL``: the relay runs in this process) is set.
    """

    qmp_path: Path
    options: MigrationOptions = field(default_factory=MigrationOptions)
    socket: Path | None = None
    relay: ClientSettings | None = None
    wait: bool = True
    recover_timeout: float = DEFAULT_RECOVER_TIMEOUT_S
    #: None: only the convergence policy switches to postcopy.
    postcopy_after_passes: int | None = POSTCOPY_AFTER_PASSES
    #: None (or 0): never.
    stall_timeout: float | None = DEFAULT_STALL_TIMEOUT_S
    #: ``--socket-owner``: who may have bound ``socket`` (`local.check_relay_socket`).
    socket_owners: SocketOwners = field(default_factory=SocketOwners.default)
    #: ``--copy-storage``: copy the VM's disks too.
    storage: StorageOptions | None = None
    #: The deadline and the policy for a precopy that does not converge.
    convergence: ConvergencePolicy | None = None
    #: ``--keep-paused``: the destination does not resume the guest (``--to`` only: in
    #: the four-step form ``incoming --keep-paused`` says it).
    keep_paused: bool = False
    #: ``--quit-source``: quit the source QEMU once the destination acknowledged.
    quit_source: bool = False
    #: ``--wait-socket``: seconds to wait for ``socket`` to appear (``connect`` started
    #: after ``migrate``), as ``serve --wait-target`` waits for the destination's; 0:
    #: do not wait, a missing socket is QEMU's to report.
    wait_socket: float = 0.0


async def run_migration(
    request: MigrateRequest,
    *,
    on_progress: Callable[[MigrationInfo], object] | None = None,
    interval: float = DEFAULT_POLL_INTERVAL_S,
    stop: asyncio.Event | None = None,
) -> MigrationResult | None:
    """``migrelay migrate``: migrate through a relay and follow the migration to its end.

    With ``request.relay`` the source relay runs in-process on a private socket and
    announces the capabilities in its handshake, so ``serve --qmp-dir`` prepares the
    destination to match; it is stopped before this returns.

    Returns:
        The completed migration's result, or None when not waiting.

    Raises:
        MigrationFailed: the migration failed or was cancelled; the source VM runs on
            as it was (a paused postcopy migration stays paused, to be resumed). Also
            when ``stop`` is set while waiting for ``request.socket``: QEMU was not
            changed.
        ConnectError: ``request.socket`` did not appear within ``request.wait_socket``
            seconds (waited for once QEMU answered and the VM can migrate); QEMU was not
            changed.
        ConfigError: the relay's settings cannot be used; nothing was changed.
        PeerRefused: ``request.socket`` was bound by another user, or could be
            (`local.check_relay_socket`); QEMU was not changed.
        ConnectError, StateError, UnsupportedError, TimeoutError: as `migrate`.
    """
    if request.relay is None:
        socket = request.socket or DEFAULT_SOURCE_SOCKET
        sockets = [socket]
        if request.storage is not None:
            sockets.append(local.storage_socket(socket))

        async def relay_socket_ready() -> None:
            if request.wait_socket > 0:
                await wait_for_sockets(sockets, request.wait_socket, stop)
            for path in sockets:
                local.check_relay_socket(path, request.socket_owners)

        if all(path.is_socket() for path in sockets) or request.wait_socket <= 0:
            # Nothing to wait for: who bound the sockets is checked before QEMU is
            # contacted at all.
            await relay_socket_ready()
            ready = None
        else:
            # Waited for once QEMU answered and the VM can migrate, so that a dead QMP
            # socket or a VM that cannot be a source is told at once, not after the wait.
            ready = relay_socket_ready
        return await _migrate_reporting(
            request, f"unix:{socket}", None, on_progress, interval, stop, before_start=ready
        )
    options = request.options
    headers, disks = await _reporting(_announce_source(request))
    settings = dataclasses.replace(
        request.relay,
        extra_headers=[*request.relay.extra_headers, *headers],
        # A postcopy resume must not be dropped once QEMU connected (ClientConfig).
        open_retry=request.recover_timeout if options.postcopy else 0.0,
    )
    async with private_relay(settings.load()) as relay:
        result = await _migrate_reporting(
            request, f"unix:{relay.listen_path}", relay, on_progress, interval, stop, disks
        )
        if result is not None and not await _relay_finished(relay, RELAY_DRAIN_TIMEOUT_S):
            logger.warning(
                "relay channels still open %g s after completion", RELAY_DRAIN_TIMEOUT_S
            )
        return result


#: ``migrate --wait-socket``'s default: as long as ``serve --wait-target`` waits for the
#: destination's socket, so that the four steps may start in any order within it.
DEFAULT_WAIT_SOCKET_S = 30.0
#: How often a missing relay socket is looked for: a person starting ``connect`` in
#: another terminal does not notice 50 ms.
SOCKET_POLL_INTERVAL_S = 0.05


async def wait_for_sockets(
    paths: Sequence[Path], timeout_s: float, stop: asyncio.Event | None = None
) -> None:
    """Wait up to ``timeout_s`` seconds for every unix socket of ``paths`` to exist.

    Only their existence: connecting to see whether anyone listens would be a
    connection the relay takes for QEMU's first channel. Who bound them is
    `local.check_relay_socket`'s to check afterwards.

    Raises:
        ConnectError: one is still missing after ``timeout_s`` seconds.
        MigrationFailed: ``stop`` was set meanwhile (``interrupted``).
    """
    deadline = time.monotonic() + timeout_s
    logged = False
    while missing := [path for path in paths if not path.is_socket()]:
        if stop is not None and stop.is_set():
            text = f"interrupted while waiting for {missing[0]}; nothing was changed"
            raise MigrationFailed(text, text, interrupted=True)
        left = deadline - time.monotonic()
        if left <= 0:
            raise ConnectError(
                f"no relay socket at {missing[0]} after {timeout_s:g} s (--wait-socket):"
                " start migrelay connect with that --listen-unix, or give migrate its"
                " --socket"
            )
        if not logged:
            logged = True
            logger.info("waiting up to %g s for %s (migrelay connect)", timeout_s, missing[0])
        await sleep_or_stop(min(SOCKET_POLL_INTERVAL_S, left), stop)


async def _announce_source(
    request: MigrateRequest,
) -> tuple[list[tuple[str, str]], list[Disk] | None]:
    """``migrate --to``'s handshake headers, and the disks it will copy, if any.

    One QMP connection asks the source everything the server must know before a byte
    moves: the capabilities (and, for postcopy, whether the guest runs: `resume_announcement`),
    what the destination VM must match (`migrelay.control.compat`), the disks to copy.

    Raises:
        StorageError: a disk named does not exist or cannot be copied; none to copy.
        ConnectError: the QMP socket cannot be reached.
    """
    qmp_path = str(request.qmp_path)
    async with QMP(vm_name(qmp_path)) as qmp:
        await qmp.connect(qmp_path)
        running = False
        if request.options.postcopy and not request.keep_paused:
            running = await qmp.query_status() is RunState.RUNNING
        resume = resume_announcement(request.options, running, request.keep_paused)
        headers = [(MIGRATION_HEADER, announcement(request.options, resume))]
        if (vm := await source_vm_header(qmp)) is not None:
            headers.append((VM_HEADER, vm))
        if request.storage is None:
            return headers, None
        disks = await _choose_disks(qmp, request.storage)
        sizes = {disk.id: disk.size for disk in disks}
        headers.append((STORAGE_HEADER, format_storage_header(sizes)))
        return headers, disks


async def _migrate_reporting(
    request: MigrateRequest,
    uri: str,
    relay: SourceRelay | None,
    on_progress: Callable[[MigrationInfo], object] | None,
    interval: float,
    stop: asyncio.Event | None,
    disks: Sequence[Disk] | None = None,
    before_start: Callable[[], Awaitable[None]] | None = None,
) -> MigrationResult | None:
    """`migrate`, with its failure told in the operator's words (`MigrationFailed`)."""
    storage_socket = None
    if request.storage is not None:
        storage_socket = local.storage_socket(Path(uri.removeprefix("unix:")))
    report = on_progress
    if relay is not None and on_progress is not None:
        # The bytes that really left the host: QEMU counts multifd pages uncompressed.
        def report(info: MigrationInfo) -> None:
            on_progress(dataclasses.replace(info, wire_bytes=relay.bytes_sent))

    try:
        return await migrate(
            str(request.qmp_path),
            uri,
            request.options,
            on_progress=report,
            interval=interval,
            stop=stop,
            wait=request.wait,
            recover_timeout=request.recover_timeout,
            postcopy_after_passes=request.postcopy_after_passes,
            stall_timeout=request.stall_timeout or None,
            storage=request.storage,
            storage_socket=storage_socket,
            disks=disks,
            convergence=request.convergence,
            quit_source=request.quit_source,
            before_start=before_start,
        )
    except NotConvergingError as exc:
        text = f"migration cancelled: {exc}"
        raise MigrationFailed(text, str(exc)) from exc
    except MigrationFailed:
        raise  # told in the operator's words already (before_start)
    except MigrationError as exc:
        stopped = stop is not None and stop.is_set()
        # A paused postcopy migration was not cancelled: its own text says so.
        if stopped and not isinstance(exc, PostcopyPausedError):
            text = "migration cancelled on interrupt; the source vm was left as it was"
            raise MigrationFailed(text, text, interrupted=True) from exc
        error = message = str(exc)
        if relay is not None and relay.first_error is not None:
            url = relay.config.url
            error = message = f"cannot open websocket to {url}: {relay.first_error}"
            if not isinstance(relay.first_error, HandshakeRefused):
                # A refusal says why; QEMU's side of it (a channel it could not open,
                # which may be another disk's than the one refused) would only confuse.
                error = message = f"{message} (qemu: {exc})"
        elif isinstance(exc, MigrationCancelledError) and not stopped:
            message = (
                "migration cancelled by another qmp client (migrelay cancel?);"
                " the source vm was left as it was"
            )
        elif not stopped:
            message = f"migration failed: {error}"
            if relay is not None:
                await _relay_finished(relay, RELAY_SETTLE_TIMEOUT_S)
            if relay is not None and relay.first_failure is not None:
                # QEMU says what broke on its side ("Broken pipe", "Input/output
                # error"); the relay knows why (liveness timeout, destination closed).
                error = f"{error} (relay: {relay.first_failure})"
                message = f"migration failed: {error}"
            elif (
                relay is None
                and _stream_dropped(error)
                and not isinstance(exc, StreamStalledError)
            ):
                # The four-step form: the relay is another process (connect), whose
                # log has the cause; QEMU only saw its end of the socket close. Not
                # when migrate shut the stream down itself (--stall-timeout): then
                # QEMU's "Broken pipe" is that shutdown, and the line already says so.
                message = f"{message} ({_RELAY_DROPPED_HINT.format(uri.removeprefix('unix:'))})"
        raise MigrationFailed(message, error) from exc


#: What QEMU says when the peer of its migration socket closed or reset it. In the
#: four-step form that peer is always ``migrelay connect``. Seen with serve down: QEMU
#: 7.2 said "Unable to write to socket: Broken pipe" and nothing more.
_DROPPED_STREAM_TEXTS = ("Broken pipe", "Connection reset by peer", "Input/output error")
#: Appended to such a failure's line in the four-step form: the likely cause, and where
#: the actual one is.
_RELAY_DROPPED_HINT = (
    "migrelay connect on {} closed qemu's stream; its log says why: serve unreachable"
    " or refusing, or the destination gone"
)


def _stream_dropped(error: str) -> bool:
    return any(text in error for text in _DROPPED_STREAM_TEXTS)


#: How long a failed ``migrate --to`` waits for its relay's channels to end, so that
#: the error line can say how they ended (QEMU may notice a failure first).
RELAY_SETTLE_TIMEOUT_S = 2.0


async def _relay_finished(relay: SourceRelay, timeout_s: float) -> bool:
    """Wait up to ``timeout_s`` for the relay's channels to end; whether they did."""
    try:
        async with asyncio.timeout(timeout_s):
            await relay.finished.wait()
    except TimeoutError:
        return False
    return True


async def _reporting(step: Awaitable[T]) -> T:
    """Run a step before the migration; its `MigrationError` becomes `MigrationFailed`."""
    try:
        return await step
    except MigrationError as exc:
        raise MigrationFailed(f"migration failed: {exc}", str(exc)) from exc


async def query(qmp_path: str) -> tuple[RunState, MigrationInfo]:
    """The VM's runstate and its current (or last) migration's snapshot."""
    async with QMP(vm_name(qmp_path)) as qmp:
        await qmp.connect(qmp_path)
        return await qmp.query_status(), await qmp.query_migrate()


async def watch(
    qmp_path: str,
    on_progress: Callable[[MigrationInfo], object],
    interval: float = DEFAULT_POLL_INTERVAL_S,
    stop: asyncio.Event | None = None,
) -> MigrationInfo:
    """Report snapshots until the migration ends (or ``stop`` is set); never changes it.

    Returns:
        The last snapshot: a final status, ``none`` (no migration), or whatever it was
        when ``stop`` was set.
    """
    # The monitor is let go between polls, so that `cancel` (or `migrate`'s own polls)
    # get through while this watches.
    async with QMP(vm_name(qmp_path), share_monitor=True) as qmp:
        await qmp.connect(qmp_path)
        while True:
            info = await qmp.query_migrate()
            on_progress(info)
            if info.status.is_terminal or info.status is MigrationStatus.NONE:
                return info
            if stop is not None and stop.is_set():
                return info
            await qmp.release()
            await sleep_or_stop(interval, stop)
            if stop is not None and stop.is_set():
                return info
            await qmp.reconnect()


async def cancel_migration(qmp_path: str) -> tuple[MigrationInfo, RunState]:
    """Cancel the outgoing migration; return how it ended and the VM's runstate.

    Raises:
        MigrationError: the migration had completed before the cancel arrived.
        ConnectError, MigrationError: from QMP.
        TimeoutError: QEMU was still cancelling 10 s later.
    """
    async with QMP(vm_name(qmp_path)) as qmp:
        await qmp.connect(qmp_path)
        if (await qmp.query_status()) is RunState.INMIGRATE:
            raise StateError(
                RunState.INMIGRATE,
                "a source vm",
                "migrate_cancel cancels outgoing migrations; stop the destination qemu"
                " to abandon an incoming one",
            )
        info = await cancel_outgoing(qmp)
        runstate = await qmp.query_status()
        if info.status is MigrationStatus.COMPLETED:
            raise MigrationError(
                f"the migration had already completed; {qmp.name} is {runstate} and"
                " now runs on the destination"
            )
        return info, runstate


def vm_name(qmp_path: str) -> str:
    # The socket's file name stem names the VM in messages: "vm.qmp" -> "vm".
    return Path(qmp_path).stem or qmp_path
