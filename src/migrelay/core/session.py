"""RelaySession: the state of one open WebSocket channel, sans-IO.

This is the only place that decides what a channel does next. The I/O layer feeds it
what the WebSocket delivered and what the unix side did, and sends what it returns.

Each direction ends on its own (DESIGN.md §3 "half-close"): a zero-length binary
message means "no more data this way". The close handshake (RFC 6455 §5.5.1) follows
once both directions have ended, or at once on a failure::

    OPEN ──(both directions ended / failure / peer's Close)──▶ CLOSING ──▶ CLOSED
           send Close                 receive Close                 TCP closed

RFC 6455 §7.1.1: "the underlying TCP connection, in most normal cases, SHOULD be closed
first by the server"; :meth:`close_expected` tells the I/O layer when to close.

The other side of a relay channel is the *local* side, QEMU's unix connection. The I/O
layer reports what it did (:meth:`RelaySession.local_eof`, :meth:`local_lost`,
:meth:`local_undeliverable`) and asks what to do (:attr:`accepts_local_data`,
:meth:`local_should_close`, :meth:`check_liveness`); :meth:`outcome` is the one
definition of a channel that ended cleanly, for the log line and the exit status alike.
The session keeps no clock: timers stay in the I/O layer and call in.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Final

from migrelay._types import BytesLike, WritableBuffer
from migrelay.core.events import (
    CloseReceived,
    EndOfStream,
    FrameEvent,
    PingReceived,
    PongReceived,
    ProtocolViolation,
)
from migrelay.core.frames import (
    DEFAULT_MAX_MESSAGE_BYTES,
    UNLIMITED_FRAMES,
    CloseCode,
    FrameParser,
    Opcode,
    encode_close,
    encode_frame,
    mask_payload,
    write_header,
)
from migrelay.errors import LocalProtocolError


class Role(Enum):
    """Which end of the WebSocket this session is."""

    #: The source relay: opens the WebSocket, masks what it sends.
    CLIENT = "client"
    #: The destination relay: accepts the WebSocket, sends unmasked frames.
    SERVER = "server"


class SessionState(Enum):
    """Where the channel's close handshake stands."""

    OPEN = "open"
    CLOSING = "closing"
    CLOSED = "closed"


class LocalLoss(Enum):
    """What :meth:`RelaySession.local_lost` made of the local side going away."""

    #: The channel was over, or already closing: nothing to do.
    NOTHING = "nothing"
    #: Treated like EOF: our direction ended (an end-of-stream message is queued).
    END_OF_STREAM = "end of stream"
    #: The channel failed: a Close with the role's code is queued.
    FAILURE = "failure"


class Liveness(Enum):
    """What :meth:`RelaySession.check_liveness` decided."""

    #: The channel is closing or closed: stop the liveness timer.
    STOP = "stop"
    #: The peer sent bytes since the last check: wait ``ping_interval`` again.
    ALIVE = "alive"
    #: The peer was silent: a Ping is queued; check again after ``ping_timeout``.
    PING_SENT = "ping sent"
    #: The Ping went unanswered: a Close 4002 is queued; the peer will not answer it.
    DEAD = "dead"


_CLOSE_NAMES: Final[dict[int, str]] = {
    CloseCode.NORMAL: "normal",
    CloseCode.GOING_AWAY: "going away",
    CloseCode.PROTOCOL_ERROR: "protocol error",
    CloseCode.UNSUPPORTED_DATA: "text message",
    CloseCode.NO_STATUS_RCVD: "no status",
    CloseCode.INVALID_DATA: "invalid data",
    CloseCode.POLICY_VIOLATION: "policy violation",
    CloseCode.MESSAGE_TOO_BIG: "message too big",
    CloseCode.INTERNAL_ERROR: "internal error",
    CloseCode.DESTINATION_CLOSED: "destination closed",
    CloseCode.DESTINATION_UNREACHABLE: "destination unreachable",
    CloseCode.IDLE_TIMEOUT: "liveness timeout",
    CloseCode.SOURCE_CLOSED: "source closed",
    CloseCode.SHUTDOWN: "relay shut down",
}

#: The Ping payload of a liveness check.
LIVENESS_PING: Final = b"migrelay"


def describe_close(code: int) -> str:
    """Return ``"1000 normal"`` style text for a close code."""
    name = _CLOSE_NAMES.get(code)
    return f"{code} {name}" if name else str(code)


@dataclass(frozen=True, slots=True)
class ChannelOutcome:
    """How a channel ended (:meth:`RelaySession.outcome`).

    Attributes:
        clean: both directions ended, Close frames went both ways with 1000, and no
            failure was recorded.
        close_code: the code to report: the peer's Close, else ours, else None.
        description: when clean, which QEMU ended its stream first (``"ended by the
            source, then by the destination"``), else the first failure recorded, else
            ``"closed"``. Never ``"completed"``: a relay cannot tell a completed
            migration from one cancelled at the source (``migrate_cancel`` shuts the
            source's socket down, and both QEMUs then end their streams as after a
            completed one); QEMU knows, and ``migrate`` and ``status`` say it.
    """

    clean: bool
    close_code: int | None
    description: str


class _KeyPool:
    """Masking keys from ``os.urandom``, 1024 at a time.

    RFC 6455 §5.3: the key "MUST be derived from a strong source of entropy". One
    getrandom() per 1024 frames instead of one per frame (6000 calls per GiB).
    """

    def __init__(self, keys_per_refill: int = 1024) -> None:
        self._refill_bytes = 4 * keys_per_refill
        self._pool = b""
        self._offset = 0

    def __call__(self) -> bytes:
        if self._offset >= len(self._pool):
            self._pool = os.urandom(self._refill_bytes)
            self._offset = 0
        offset = self._offset
        self._offset = offset + 4
        return self._pool[offset : offset + 4]


class RelaySession:
    """One WebSocket channel of a relay.

    Args:
        role: client (source relay) or server (destination relay).
        max_message_bytes: the largest message accepted from the peer.
        mask_key: source of 4-byte masking keys (client only; default: os.urandom,
            in batches); injectable for tests.
    """

    def __init__(
        self,
        role: Role,
        *,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        mask_key: Callable[[], bytes] | None = None,
    ) -> None:
        self.role = role
        self.state = SessionState.OPEN
        if role is Role.CLIENT:
            self._mask_key: Callable[[], bytes] | None = mask_key or _KeyPool()
        else:
            self._mask_key = None
        self._parser = FrameParser(
            expect_masked=role is Role.SERVER, max_message_bytes=max_message_bytes
        )
        self._to_send: list[BytesLike] = []
        #: Whether we sent our end-of-stream message (no more data from us).
        self.local_ended = False
        #: Whether the peer sent its end-of-stream message.
        self.remote_ended = False
        #: Whether our direction ended before the peer's (for :meth:`outcome`).
        self._local_ended_first = False
        self.close_sent: tuple[int, str] | None = None
        self.close_rcvd: tuple[int, str] | None = None
        #: Whether the peer broke the protocol (the close code says how).
        self.failed = False
        #: The first thing that went wrong, for the log (never sent to the peer).
        self.failure: str | None = None
        #: The error the local (unix) side went away with, if any.
        self.local_error: BaseException | None = None
        self._liveness_mark = 0
        self._ping_outstanding = False

    # -- what the peer sent ------------------------------------------------------------

    def receive_data(self, data: memoryview) -> list[FrameEvent]:
        """Parse bytes from the WebSocket and return the events for the I/O layer.

        Pings are answered and Close frames acknowledged here (see :meth:`data_to_send`);
        the events still report them. After a :class:`ProtocolViolation` a Close with
        its code is queued and the session ignores further input. Payload events are
        views of ``data``: write them out before reusing the buffer. Data that arrives
        after the peer's end-of-stream or Close is reported as a violation.
        """
        return self.receive_frames(data, UNLIMITED_FRAMES)[0]

    def receive_frames(self, data: memoryview, max_frames: int) -> tuple[list[FrameEvent], int]:
        """:meth:`receive_data` for at most ``max_frames`` frames; also return bytes used.

        The I/O layer passes ``data[used:]`` again later (it bounds the work one read
        does per event-loop callback, :attr:`~migrelay.limits.Limits.frames_per_callback`).
        Once the session ignores input (the peer's Close, a violation) all of ``data``
        counts as used.
        """
        if self._ignores_input():
            return [], len(data)
        events, used = self._parser.receive_frames(data, max_frames)
        for index, event in enumerate(events):
            if isinstance(event, PingReceived):
                if self.close_sent is None:
                    self._to_send.append(self._encode(Opcode.PONG, event.payload))
            elif isinstance(event, EndOfStream):
                self.remote_ended = True
                self._close_if_done()
            elif isinstance(event, CloseReceived):
                self._receive_close(event)
                # RFC 6455 §5.5.1: "the endpoint MUST NOT send any more data frames"
                # after Close; whatever follows in this chunk is ignored.
                del events[index + 1 :]
                break
            elif isinstance(event, ProtocolViolation):
                self._violated(event)
            elif isinstance(event, PongReceived):
                self._ping_outstanding = False
            elif self.remote_ended:
                # A payload after end-of-stream: valid RFC 6455, but it breaks
                # migrelay.v1's half-close (DESIGN.md §3), so 1008, not 1002: "a message
                # that violates its policy" (RFC 6455 §7.4.1).
                violation = ProtocolViolation(
                    CloseCode.POLICY_VIOLATION, "data after end of stream"
                )
                events[index:] = [violation]
                self._violated(violation)
                break
        # What follows a Close or a violation is ignored: all of it counts as used.
        return events, len(data) if self._ignores_input() else used

    def _ignores_input(self) -> bool:
        return self.close_rcvd is not None or self.failed

    def _violated(self, violation: ProtocolViolation) -> None:
        self.failed = True
        self.record_failure(f"peer broke the protocol: {violation.reason}")
        self.send_close(violation.code, violation.reason)

    def _receive_close(self, event: CloseReceived) -> None:
        self.close_rcvd = (event.code, event.reason)
        if event.code != CloseCode.NORMAL or not self.local_ended:
            # A normal close before we sent all our data also loses data: QEMU's.
            self.record_failure(f"peer closed with {describe_close(event.code)}")
        if self.close_sent is None:
            # RFC 6455 §5.5.1: "it MUST send a Close frame in response ... typically
            # echoing the status code it received". 1005 means none was sent.
            code = CloseCode.NORMAL if event.code == CloseCode.NO_STATUS_RCVD else event.code
            self.send_close(code, "")
        else:
            self.state = SessionState.CLOSED

    def receive_eof(self, error: BaseException | None = None) -> None:
        """The WebSocket's transport closed (``error`` if it failed): the session is over.

        Before the close handshake finished that is a failure (RFC 6455 §7.1.5: "If
        _The WebSocket Connection is Closed_ and no Close control frame was received by
        the endpoint ... _The WebSocket Connection Close Code_ is considered to be 1006").
        The I/O layer closes the local side next (see :meth:`local_should_close`).
        """
        if self.state is not SessionState.CLOSED:
            self.record_failure(
                f"websocket connection lost ({error})"
                if error
                else "websocket closed without a close frame"
            )
        self.state = SessionState.CLOSED

    # -- what the local (unix) side did ------------------------------------------------

    @property
    def local_close_code(self) -> CloseCode:
        """The code that tells the peer our QEMU went away (4000 / 4003)."""
        if self.role is Role.SERVER:
            return CloseCode.DESTINATION_CLOSED
        return CloseCode.SOURCE_CLOSED

    def local_eof(self) -> None:
        """QEMU shut down its writing side: end our direction (half-close, DESIGN.md §3).

        Then send :meth:`data_to_send`.
        """
        self.send_end_of_stream()

    def local_lost(self, error: BaseException | None) -> LocalLoss:
        """The local connection closed (``error`` if it failed); then :meth:`data_to_send`.

        A reset or broken pipe ends our direction like EOF: QEMU closed its socket,
        perhaps with bytes still unread, which QEMU 7.2's destination does to multifd
        channels at the end of a migration that completed. Whatever the peer sends
        after that cannot be delivered and fails the channel
        (:meth:`local_undeliverable`), which is what QEMU over direct TCP would see.
        Anything else before both directions ended fails the channel with
        :attr:`local_close_code`, so the peer closes its QEMU too and both see it.
        """
        self.local_error = error
        if self.state is not SessionState.OPEN or (self.local_ended and self.remote_ended):
            return LocalLoss.NOTHING
        if isinstance(error, (ConnectionResetError, BrokenPipeError)):
            self.send_end_of_stream()
            return LocalLoss.END_OF_STREAM
        self.record_failure(f"unix side closed ({error or 'QEMU'})")
        self.send_close(self.local_close_code, "")
        return LocalLoss.FAILURE

    def local_undeliverable(self) -> None:
        """A payload arrived and the local side cannot take it: fail the channel.

        Then send :meth:`data_to_send` and drop the payload.
        """
        why = f" ({self.local_error})" if self.local_error else ""
        self.record_failure(f"unix side closed{why} while data was still arriving")
        self.send_close(self.local_close_code, "")

    @property
    def accepts_local_data(self) -> bool:
        """Whether data read from the local side may still be framed and sent.

        False after our end-of-stream (DESIGN.md §3), after our Close (RFC 6455 §5.5.1:
        "The application MUST NOT send any more data frames after sending a Close
        frame") and once the WebSocket is gone: QEMU's late bytes have nowhere to go,
        and the I/O layer drops them. :meth:`frame_data` refuses them by the same rule.
        """
        return (
            not self.local_ended and self.close_sent is None and (self.state is SessionState.OPEN)
        )

    def local_should_close(self) -> bool:
        """Whether the I/O layer should now close the local side (after flushing it).

        Yes once the peer's Close arrived (nothing more will come to deliver), once the
        peer broke the protocol, or once we are failing the channel (a Close other than
        1000 sent): both QEMUs must see the failure at once.
        """
        if self.close_rcvd is not None or self.failed:
            return True
        return self.close_sent is not None and self.close_sent[0] != CloseCode.NORMAL

    # -- liveness ----------------------------------------------------------------------

    def check_liveness(self, bytes_received: int, *, silent_seconds: float) -> Liveness:
        """Decide on a liveness tick; ``bytes_received`` counts every byte from the peer.

        Only bytes from the peer prove it alive: our own bytes draining into the
        kernel's send buffer say nothing about a peer that froze or vanished. Any byte
        (a Pong, a data frame) since the last tick is enough. After a Ping that went
        unanswered until the next tick, a Close with 4002 is queued and the failure
        recorded as "peer silent for ``silent_seconds`` s" (the I/O layer's timers
        know that number; the session has no clock). Send :meth:`data_to_send` after
        PING_SENT and DEAD.
        """
        if self.state is not SessionState.OPEN:
            return Liveness.STOP
        if bytes_received != self._liveness_mark:
            self._liveness_mark = bytes_received
            self._ping_outstanding = False
            return Liveness.ALIVE
        if self._ping_outstanding:
            self.record_failure(f"peer silent for {silent_seconds:g} s (liveness timeout)")
            self.send_close(CloseCode.IDLE_TIMEOUT, "")
            return Liveness.DEAD
        self._ping_outstanding = True
        self.send_ping(LIVENESS_PING)
        return Liveness.PING_SENT

    # -- how it ended ------------------------------------------------------------------

    def record_failure(self, reason: str) -> None:
        """Record why the channel failed, for the log; only the first reason is kept."""
        if self.failure is None:
            self.failure = reason

    def outcome(self) -> ChannelOutcome:
        """How the channel ended: the one definition of clean, for logs and exit codes.

        Clean means nothing was lost: both directions ended with their end-of-stream
        message, Close frames went both ways with 1000 (RFC 6455 §7.4.1: "1000
        indicates a normal closure, meaning that the purpose for which the connection
        was established has been fulfilled"), and nothing recorded a failure.
        """
        sent = self.close_sent[0] if self.close_sent is not None else None
        rcvd = self.close_rcvd[0] if self.close_rcvd is not None else None
        clean = (
            self.local_ended
            and self.remote_ended
            and sent == CloseCode.NORMAL
            and rcvd == CloseCode.NORMAL
            and self.failure is None
        )
        if clean:
            # What the relay saw, no more: which QEMU ended its stream first.
            source, destination = "the source", "the destination"
            local, remote = (
                (destination, source) if self.role is Role.SERVER else (source, destination)
            )
            first, then = (local, remote) if self._local_ended_first else (remote, local)
            description = f"ended by {first}, then by {then}"
        else:
            description = self.failure or "closed"
        return ChannelOutcome(clean, rcvd if rcvd is not None else sent, description)

    # -- what we send --------------------------------------------------------------------

    def frame_data(self, buffer: WritableBuffer, payload_start: int, payload_bytes: int) -> int:
        """Frame ``buffer[payload_start:payload_start + payload_bytes]`` in place.

        Writes the header into the room in front of the payload (at least 14 bytes)
        and masks the payload when this is the client.

        Returns:
            The frame's first offset: send ``buffer[start:payload_start + payload_bytes]``.

        Raises:
            LocalProtocolError: :attr:`accepts_local_data` is False (our end-of-stream
                or a Close was already sent, or the WebSocket is gone).
        """
        if not self.accepts_local_data:
            raise LocalProtocolError(
                f"cannot send data: session is {self.state.value}, local end sent: "
                f"{self.local_ended}"
            )
        key = self._mask_key() if self._mask_key is not None else None
        start = write_header(buffer, payload_start, Opcode.BINARY, payload_bytes, key)
        if key is not None:
            mask_payload(buffer, payload_start, payload_start + payload_bytes, key)
        return start

    def send_end_of_stream(self) -> None:
        """Queue the zero-length message that ends our direction (idempotent)."""
        if self.local_ended or self.close_sent is not None:
            return
        self.local_ended = True
        self._local_ended_first = not self.remote_ended
        self._to_send.append(self._encode(Opcode.BINARY, b""))
        self._close_if_done()

    def send_ping(self, payload: bytes = b"") -> None:
        """Queue a Ping (liveness); ignored once closing."""
        if self.state is SessionState.OPEN:
            self._to_send.append(self._encode(Opcode.PING, payload))

    def send_close(self, code: int, reason: str = "") -> None:
        """Queue a Close frame (idempotent: only the first one is sent).

        ``reason`` must never carry exception text (it goes to the peer).
        """
        if self.close_sent is not None:
            return
        self.close_sent = (code, reason)
        self._to_send.append(encode_close(code, reason, self._key_or_none()))
        self.state = SessionState.CLOSED if self.close_rcvd is not None else SessionState.CLOSING

    def data_to_send(self) -> list[BytesLike]:
        """Return and forget the control frames queued since the last call.

        The I/O layer writes them to the WebSocket in order, after any data frame it
        has already written.
        """
        out, self._to_send = self._to_send, []
        return out

    def close_expected(self) -> bool:
        """Whether the I/O layer should now close the WebSocket's TCP connection.

        True for the server once Close frames went both ways; a client waits for the
        server to close (RFC 6455 §7.1.1) and closes on its own only after a timeout.
        True for either side after a protocol violation was answered.
        """
        if self.state is SessionState.CLOSED:
            return self.role is Role.SERVER or self.failed
        return self.failed and self.close_sent is not None

    # -- internals -----------------------------------------------------------------------

    def _close_if_done(self) -> None:
        if self.local_ended and self.remote_ended and self.close_sent is None:
            self.send_close(CloseCode.NORMAL, "")

    def _key_or_none(self) -> bytes | None:
        return self._mask_key() if self._mask_key is not None else None

    def _encode(self, opcode: Opcode, payload: bytes) -> bytearray:
        return encode_frame(opcode, payload, self._key_or_none())
