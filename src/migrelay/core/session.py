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
"""

from __future__ import annotations

import os
from collections.abc import Callable
from enum import Enum

from .._types import BytesLike, WritableBuffer
from ..errors import LocalProtocolError
from .events import (
    CloseReceived,
    EndOfStream,
    FrameEvent,
    PingReceived,
    PongReceived,
    ProtocolViolation,
)
from .frames import (
    DEFAULT_MAX_MESSAGE_BYTES,
    CloseCode,
    FrameParser,
    Opcode,
    encode_close,
    encode_frame,
    mask_payload,
    write_header,
)


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
        self.close_sent: tuple[int, str] | None = None
        self.close_rcvd: tuple[int, str] | None = None
        #: Whether the peer broke the protocol (the close code says how).
        self.failed = False

    # -- what the peer sent ------------------------------------------------------------

    def receive_data(self, data: memoryview) -> list[FrameEvent]:
        """Parse bytes from the WebSocket and return the events for the I/O layer.

        Pings are answered and Close frames acknowledged here (see :meth:`data_to_send`);
        the events still report them. After a :class:`ProtocolViolation` a Close with
        its code is queued and the session ignores further input. Payload events are
        views of ``data``: write them out before reusing the buffer. Data that arrives
        after the peer's end-of-stream or Close is reported as a violation.
        """
        if self.close_rcvd is not None or self.failed:
            return []
        events = self._parser.receive(data)
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
                self.failed = True
                self.send_close(event.code, event.reason)
            elif self.remote_ended and not isinstance(event, PongReceived):
                # A payload after end-of-stream: the peer broke DESIGN.md §3.
                self.failed = True
                violation = ProtocolViolation(CloseCode.PROTOCOL_ERROR, "data after end of stream")
                events[index:] = [violation]
                self.send_close(violation.code, violation.reason)
                break
        return events

    def _receive_close(self, event: CloseReceived) -> None:
        self.close_rcvd = (event.code, event.reason)
        if self.close_sent is None:
            # RFC 6455 §5.5.1: "it MUST send a Close frame in response ... typically
            # echoing the status code it received". 1005 means none was sent.
            code = CloseCode.NORMAL if event.code == CloseCode.NO_STATUS_RCVD else event.code
            self.send_close(code, "")
        else:
            self.state = SessionState.CLOSED

    def receive_eof(self) -> None:
        """The WebSocket's transport closed: the session is over."""
        self.state = SessionState.CLOSED

    # -- what we send --------------------------------------------------------------------

    def frame_data(self, buffer: WritableBuffer, payload_start: int, payload_bytes: int) -> int:
        """Frame ``buffer[payload_start:payload_start + payload_bytes]`` in place.

        Writes the header into the room in front of the payload (at least 14 bytes)
        and masks the payload when this is the client.

        Returns:
            The frame's first offset: send ``buffer[start:payload_start + payload_bytes]``.

        Raises:
            LocalProtocolError: our end-of-stream or a Close was already sent.
        """
        if self.local_ended or self.close_sent is not None:
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
