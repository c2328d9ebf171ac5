"""Events that the sans-IO core reports to the I/O layer (frozen dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Payload:
    """Message payload bytes, unmasked, as a slice of the caller's receive buffer.

    The slice is only valid until the caller reuses that buffer: write it out first.
    """

    data: memoryview


@dataclass(frozen=True, slots=True)
class EndOfStream:
    """A zero-length binary message: the peer sends no more data in this direction."""


@dataclass(frozen=True, slots=True)
class PingReceived:
    """A Ping frame; the session answers it with a Pong of the same payload."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class PongReceived:
    """A Pong frame: the peer is alive."""

    payload: bytes


@dataclass(frozen=True, slots=True)
class CloseReceived:
    """A Close frame, with its status code (1005 when it carried none) and reason."""

    code: int
    reason: str


@dataclass(frozen=True, slots=True)
class ProtocolViolation:
    """The peer broke RFC 6455 or migrelay's rules; close with ``code``.

    ``reason`` is for the local log; it is safe to send because it never carries
    exception text, only a fixed description with numbers.
    """

    code: int
    reason: str


FrameEvent = (
    Payload | EndOfStream | PingReceived | PongReceived | CloseReceived | ProtocolViolation
)
