"""Exceptions raised by migrelay.

::

    RelayError
     ├─ ProtocolError
     │   ├─ LocalProtocolError          we misused the protocol (a bug here)  (sans-IO)
     │   └─ RemoteProtocolError         the peer misbehaved; carries a close code (sans-IO)
     ├─ HandshakeRefused                the server answered the upgrade with an HTTP error
     ├─ Refusal                         the server refuses an upgrade: a status, a fixed
     │                                  reason for the peer, the detail for its own log
     ├─ ConfigError                     a setting, a flag or a file cannot be used
     ├─ StateError                      an operation needs another state (e.g. a VM runstate)
     │   └─ CapabilityMismatchError     a prepared destination differs from the source
     ├─ UnsupportedError                the QEMU in use lacks a requested feature
     ├─ ConnectError                    could not reach a peer; wraps the root cause
     ├─ PeerRefused                     a unix socket is not one a relay may use (wrong
     │                                  owner, a symlink, a directory others can write)
     ├─ VMError                         a disposable lab VM failed to start or stop
     └─ MigrationError                  QEMU refused a command or a migration failed;
         │                              keeps QEMU's text whole
         ├─ StorageError                a disk cannot be copied, or its copy failed
         ├─ MigrationCancelledError     cancelled here or by another QMP client
         ├─ PostcopyPausedError         stayed postcopy-paused: resume, do not cancel
         ├─ NotConvergingError          precopy cancelled at its deadline; names the cause
         ├─ StreamStalledError          no data moved for --stall-timeout: migrate shut
         │                              the stream down itself; QEMU's text follows
         ├─ MigrationFailed             ``migrate`` did not complete: the operator's line
         └─ CompatibilityError          the destination vm differs from the source in
                                        what both must share (qemu, machine, ram, devices)
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final


class RelayError(Exception):
    """Base class of every error that migrelay raises on purpose."""


class ProtocolError(RelayError):
    """A WebSocket or HTTP protocol rule was broken."""


class LocalProtocolError(ProtocolError):
    """This side tried something the protocol forbids in its state (sans-IO)."""


class RemoteProtocolError(ProtocolError):
    """The peer broke the protocol (sans-IO).

    Attributes:
        close_code: the status the connection should be closed with, or the HTTP
            status to refuse a handshake with.
        headers: response headers that refusal must carry (426 names the version).
    """

    def __init__(
        self, message: str, close_code: int, headers: tuple[tuple[str, str], ...] = ()
    ) -> None:
        super().__init__(message)
        self.close_code = close_code
        self.headers = headers


class HandshakeRefused(RelayError):
    """The server refused the WebSocket upgrade.

    Attributes:
        status: the HTTP status code.
        reason: the server's one-line explanation (its body or reason phrase).
    """

    def __init__(self, status: int, reason: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(f"server refused the upgrade with {status}: {reason}")
        self.status = status
        self.reason = reason
        self.headers: Mapping[str, str] = dict(headers or {})


#: The ``reason`` label of ``migrelay_refusals_total`` when a refusal names none.
REFUSAL_KINDS: Final = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    408: "handshake_timeout",
    409: "conflict",
    426: "not_websocket",
    429: "too_many_channels",
    431: "header_too_large",
    500: "internal_error",
    503: "unavailable",
}


class Refusal(RelayError):
    """The server refuses a WebSocket upgrade with an HTTP status.

    Attributes:
        status: the HTTP status.
        reason: one line for the peer: fixed text chosen by migrelay, never an
            exception's text (which may name paths, versions or other tenants).
        headers: response headers the refusal carries (``Retry-After``, ...).
        kind: a fixed word for the metrics (``migrelay_refusals_total{reason=}``); by
            default it follows from the status.
        detail: what only the server's log may say (the underlying error).
    """

    def __init__(
        self,
        status: int,
        reason: str,
        headers: tuple[tuple[str, str], ...] = (),
        kind: str | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers
        self.kind = kind or REFUSAL_KINDS.get(status, "other")
        self.detail = detail


class ConfigError(RelayError):
    """A setting cannot be used: a bad flag value, an unreadable or malformed file."""


class StateError(RelayError):
    """An operation was attempted in a state that does not allow it.

    Attributes:
        state: the state that was found.
        required: the state (or a description of the states) that would have allowed it.
        hint: what the operator can do about it, if known.
    """

    def __init__(self, state: object, required: object, hint: str | None = None) -> None:
        message = f"state is {state}, but {required} is required"
        if hint:
            message = f"{message}: {hint}"
        super().__init__(message)
        self.state = state
        self.required = required
        self.hint = hint


class CapabilityMismatchError(StateError):
    """A destination already listening was prepared with other capabilities.

    QEMU 7.2 does not fail cleanly on a mismatch (a destination without multifd exits on
    the extra channels, one with it waits for channels that never come), so it is
    refused before a byte moves.
    """


class ConnectError(RelayError):
    """Could not connect to a peer (relay, proxy, QMP socket).

    ``str()`` is ``"message: cause"``, on one line (qemu.qmp's causes can span two).
    """

    def __init__(self, message: str, exc: BaseException | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.exc = exc

    def __str__(self) -> str:
        if self.exc is None:
            return self.message
        cause = " ".join(str(self.exc).split()) or type(self.exc).__name__
        return f"{self.message}: {cause}"


class PeerRefused(RelayError):
    """A unix socket is not what a relay may talk to (wrong owner, a symlink, …)."""


class VMError(RelayError):
    """A disposable test or benchmark VM (`migrelay.lab.vm`) could not be started.

    Attributes:
        returncode: QEMU's exit status, if it exited.
        stderr: the tail of what QEMU wrote to stderr (its own explanation).
    """

    def __init__(self, message: str, returncode: int | None = None, stderr: str = "") -> None:
        detail = f": {stderr.strip()}" if stderr.strip() else ""
        super().__init__(f"{message}{detail}")
        self.returncode = returncode
        self.stderr = stderr


class UnsupportedError(RelayError):
    """The QEMU in use lacks a feature that was asked for (too old, or built without it)."""


class MigrationError(RelayError):
    """QEMU refused a command or reported a failed migration; the text is QEMU's own.

    ``str()`` is QEMU's ``desc`` / ``error-desc`` text, unchanged.

    Attributes:
        command: the QMP command that failed, if a command failed (``None`` when a
            running migration failed).
        error_class: QEMU's error class (usually ``GenericError``), if known.
    """

    def __init__(
        self, message: str, command: str | None = None, error_class: str | None = None
    ) -> None:
        super().__init__(message)
        self.command = command
        self.error_class = error_class


class StorageError(MigrationError):
    """Copying a disk cannot start or failed (``migrate --copy-storage``).

    ``str()`` names the disk and what went wrong: a disk missing or of another size on
    the destination (both sizes), a mirror that failed (QEMU's reason) or did not get
    in sync in time. The source VM runs on its own disks.
    """


class MigrationCancelledError(MigrationError):
    """The migration was cancelled (here, or by another QMP client): the source VM runs on."""


class PostcopyPausedError(MigrationError):
    """A postcopy migration stayed ``postcopy-paused``: not failed, and not cancellable.

    The VM's state is split between both hosts; resuming (``migrate --postcopy`` again)
    is the way out, so callers must not report it as a cancelled or failed migration.
    """


class NotConvergingError(MigrationError):
    """Precopy did not complete by its deadline and was cancelled; the source runs on.

    ``str()`` names the cause (the guest's dirty rate against the link's rate).
    """


class StreamStalledError(MigrationError):
    """No data moved for ``--stall-timeout``, so ``migrate`` shut the stuck stream down.

    ``str()`` says so, then QEMU's own text: its "Broken pipe" is the shutdown's doing,
    not a sign that the relay dropped the stream.
    """


class MigrationFailed(MigrationError):
    """``migrate`` ended without completing; ``str()`` is the operator's one line.

    Attributes:
        error: the text the JSON document and the progress output keep (QEMU's own,
            or the relay's reason when a channel could not open).
        interrupted: the operator stopped it (SIGINT/SIGTERM) and it was cancelled.
    """

    def __init__(self, message: str, error: str, *, interrupted: bool = False) -> None:
        super().__init__(message)
        self.error = error
        self.interrupted = interrupted


class CompatibilityError(MigrationError):
    """The destination VM does not match the source in what both QEMUs must share.

    ``str()`` is one line naming every difference and both sides' values: ``machine type
    differs: source pc-i440fx-7.2, destination pc-q35-7.2; ram size differs: source
    64 MiB, destination 128 MiB``. The source announced its own side, so the line tells
    its client nothing of the host it did not know. Raised before a byte moves: QEMU's
    own error for these comes only once the stream reaches the device that differs.
    """
