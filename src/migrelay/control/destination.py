"""``serve --qmp/--qmp-dir``: prepare destination QEMU when a migration arrives.

`prepare_hook` gives `migrelay.aio.server` the hook it awaits before a session's first
channel connects: it maps the session's name to a QMP socket and runs `prepare_target`,
which issues ``migrate-incoming`` with the capabilities the source announced in the
handshake (or ``migrate-recover`` for a paused postcopy migration). When the source
announces disks (``Migrelay-Storage``, ``migrate --copy-storage``), it first checks them
against the destination's (same device ids, same sizes) and exports them on the storage
socket (`migrelay.control.storage.export_disks`); `finish_hook` removes the exports once
the session has ended, whichever way. Before either, when the source announces its VM
(``Migrelay-Vm``), the destination VM is checked against it (same machine type, RAM size
and devices, a QEMU as new: `migrelay.control.compat`), so a mismatch is refused before a
byte moves.

A failure becomes a `Refusal` with a fixed reason for the peer (an authenticated client
of one target must not learn paths, versions or QEMU's messages from the host); the
underlying error goes to the server's log as the refusal's detail.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from migrelay.aio.local import storage_socket
from migrelay.aio.server import FinishTarget, PrepareTarget
from migrelay.control.commands import (
    MIGRATION_HEADER,
    parse_announcement,
    recover_incoming,
    set_autostart,
    vm_name,
)
from migrelay.control.compat import VmFacts, check_destination
from migrelay.control.migration import check_prepared_for, prepare_incoming
from migrelay.control.qmp import QMP, MigrationInfo, MigrationStatus
from migrelay.control.storage import export_disks, unexport_disks
from migrelay.core.headers import (
    STORAGE_HEADER,
    VM_HEADER,
    MigrationAnnouncement,
    parse_migration_header,
    parse_storage_header,
)
from migrelay.errors import (
    CapabilityMismatchError,
    CompatibilityError,
    ConnectError,
    MigrationError,
    Refusal,
    StateError,
    StorageError,
    UnsupportedError,
)

__all__ = [
    "destination_resumes",
    "finish_hook",
    "finish_target",
    "prepare_hook",
    "prepare_target",
    "refusal_for",
]

logger = logging.getLogger(__name__)

#: Seconds a client is told to wait before it retries a destination that could not be
#: prepared (QEMU still starting, its monitor busy with another client).
PREPARE_RETRY_AFTER_S = "5"


async def prepare_target(qmp_path: str, target: Path, headers: Mapping[str, str]) -> MigrationInfo:
    """``serve --qmp``: make the destination listen on ``target`` as the source announced.

    A destination already listening on exactly ``unix:TARGET`` is left as it is (an
    operator who also ran ``incoming``); one whose postcopy migration is paused (the
    link failed) gets ``migrate-recover`` instead, since this session is the source
    resuming; anything else already set up is an error.

    A destination not yet prepared is first checked against the VM the source announced
    (`VM_HEADER`, `check_destination`); a mismatch changes nothing on it.

    Args:
        qmp_path: the destination's QMP socket.
        target: the unix socket the server will connect the channels to.
        headers: the handshake's request headers, names in lower case.

    Raises:
        ValueError: the `MIGRATION_HEADER`, `STORAGE_HEADER` or `VM_HEADER` is malformed.
        CompatibilityError: the destination VM does not match the source's.
        ConnectError, StateError, MigrationError: as `incoming`.
    """
    announced = headers.get(MIGRATION_HEADER.lower())
    options = parse_announcement(announced)
    storage = headers.get(STORAGE_HEADER.lower())
    disks = parse_storage_header(storage) if storage is not None else None
    vm = headers.get(VM_HEADER.lower())
    source_vm = VmFacts.from_header(vm) if vm is not None else None
    uri = f"unix:{target}"
    async with QMP(vm_name(qmp_path)) as qmp:
        await qmp.connect(qmp_path)
        current = await qmp.query_migrate()
        fresh = current.status is MigrationStatus.NONE and uri not in current.socket_addresses
        if source_vm is not None and fresh:
            # Not for a postcopy resume (compared when it started) nor a destination
            # already listening (an operator's `incoming`: check_prepared_for).
            await check_destination(qmp, source_vm, disks or ())
        if disks is not None and current.status is MigrationStatus.NONE:
            # Before the migration starts only: a resumed postcopy migration (which
            # announces its disks again) copied them long ago.
            await export_disks(qmp, f"unix:{storage_socket(target)}", disks)
        if uri in current.socket_addresses and current.status is MigrationStatus.NONE:
            if announced is not None:  # a plain `connect` announces nothing to compare
                await check_prepared_for(qmp, options)
            logger.info("%s: already listening on %s", qmp.name, uri)
            return current
        if current.status is MigrationStatus.POSTCOPY_PAUSED:
            return await recover_incoming(qmp, uri)
        if current.status in (MigrationStatus.POSTCOPY_ACTIVE, MigrationStatus.POSTCOPY_RECOVER):
            # The source resumes before this side noticed the old link die (its own
            # liveness timeout): refuse now, the source retries (RESUME_RETRY_S).
            raise MigrationError(
                f"incoming migration still {current.status}; not yet paused to recover"
            )
        info = await prepare_incoming(qmp, uri, options)
        await set_autostart(qmp, destination_resumes(parse_migration_header(announced)))
        return info


def destination_resumes(announced: MigrationAnnouncement) -> bool | None:
    """Whether the destination's autostart goes on (True), off (False), or stays as its
    command line set it (None), from what the source announced.

    ``resume=`` decides when given. Without it, precopy turns autostart on: QEMU then
    applies the runstate the source sends, so the guest resumes here only if it ran
    there, whatever ``-S`` says. Postcopy sends no runstate (a destination with
    autostart runs the guest from the switch), so without ``resume=`` (a plain
    ``connect``) this QEMU's own ``-S`` decides.
    """
    if announced.resume is not None:
        return announced.resume
    return None if announced.postcopy else True


def refusal_for(error: Exception) -> Refusal:
    """The refusal a client gets when its destination cannot be prepared.

    The reason is fixed text per kind of failure; ``str(error)`` goes only to the log.
    """
    detail = str(error) or type(error).__name__
    if isinstance(error, CompatibilityError):
        # Like a disk's: the source announced its side itself, so naming both sides'
        # versions, machine types, sizes and device ids tells it nothing else of the host.
        return Refusal(409, f"destination vm does not match the source: {error}")
    if isinstance(error, StorageError):
        # The client announced these disks itself: naming them and both sizes tells
        # it nothing about the host it did not know, and is what the operator needs.
        return Refusal(409, f"destination vm not ready: {error}")
    if isinstance(error, ValueError):
        # The parsers' messages start with the header's name.
        header = VM_HEADER if detail.startswith(VM_HEADER) else MIGRATION_HEADER
        return Refusal(400, f"invalid {header} header", detail=detail)
    if isinstance(error, CapabilityMismatchError):
        return Refusal(
            409,
            "destination vm not ready: it was prepared with other capabilities than the"
            " source announced; prepare it with the same --multifd, --compress and --postcopy"
            " as migrate",
            detail=detail,
        )
    if isinstance(error, StateError):
        return Refusal(
            409,
            "destination vm not ready: it is not waiting for this migration (start it with"
            " -incoming defer, and prepare it once)",
            detail=detail,
        )
    if isinstance(error, UnsupportedError):
        return Refusal(
            409,
            "destination qemu cannot: it lacks a capability the source announced",
            detail=detail,
        )
    return Refusal(
        503,
        "destination qemu not prepared",
        (("Retry-After", PREPARE_RETRY_AFTER_S),),
        detail=detail,
    )


def prepare_hook(qmp: Path | None, qmp_dir: Path | None) -> PrepareTarget | None:
    """The server's hook for ``serve --qmp PATH`` (path ``/``) and ``--qmp-dir DIR``.

    ``/NAME`` maps to ``DIR/NAME.qmp``; a path without a QMP socket is left to the
    operator's own ``incoming``. None when neither option is given.
    """
    if qmp is None and qmp_dir is None:
        return None

    async def prepare(name: str, target: Path, headers: Mapping[str, str]) -> None:
        path = _qmp_path(name, qmp, qmp_dir)
        if path is None:
            return  # this path has no QMP socket: the operator runs `incoming` there
        try:
            await prepare_target(str(path), target, headers)
        except (
            ValueError,
            StateError,
            UnsupportedError,
            ConnectError,
            MigrationError,
            TimeoutError,
        ) as exc:
            raise refusal_for(exc) from None

    return prepare


def _qmp_path(name: str, qmp: Path | None, qmp_dir: Path | None) -> Path | None:
    if name == "/":
        return qmp
    return qmp_dir / f"{name}.qmp" if qmp_dir is not None else None


#: How long `finish_target` waits for the destination's monitor.
FINISH_CONNECT_TIMEOUT_S = 5.0


async def finish_target(qmp_path: str) -> list[str]:
    """Remove the disk exports `prepare_target` added (the session has ended).

    Returns:
        The exports removed; none when QEMU has exited (nothing left to remove).
    """
    async with QMP(vm_name(qmp_path)) as qmp:
        try:
            await qmp.connect(qmp_path, FINISH_CONNECT_TIMEOUT_S)
        except ConnectError as exc:
            logger.debug("%s: not removing exports: %s", qmp.name, exc)
            return []
        return await unexport_disks(qmp)


def finish_hook(qmp: Path | None, qmp_dir: Path | None) -> FinishTarget | None:
    """The server's hook that undoes `prepare_hook`'s disk exports once a session ended."""
    if qmp is None and qmp_dir is None:
        return None

    async def finish(name: str, target: Path, headers: Mapping[str, str]) -> None:
        path = _qmp_path(name, qmp, qmp_dir)
        if path is not None and STORAGE_HEADER.lower() in headers:
            await finish_target(str(path))

    return finish
