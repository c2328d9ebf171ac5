"""Exceptions raised by migrelay.

::

    RelayError
     ├─ ProtocolError
     │   ├─ LocalProtocolError          we misused the protocol (a bug here)  (sans-IO)
     │   └─ RemoteProtocolError         the peer misbehaved; carries a close code (sans-IO)
     ├─ HandshakeRefused                the server answered the upgrade with an HTTP error
     ├─ StateError                      an operation needs another state (e.g. a VM runstate)
     ├─ ConnectError                    could not reach a peer; wraps the root cause
     ├─ VMError                         a disposable test/benchmark VM failed to start or stop
     └─ MigrationError                  QEMU refused a command or a migration failed;
                                        keeps QEMU's text whole
"""

from __future__ import annotations

from collections.abc import Mapping


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
