"""Tunable limits, as frozen dataclasses; each default says where it comes from."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Final

from migrelay.core.frames import (
    DEFAULT_MAX_MESSAGE_BYTES,
    MAX_CONTROL_PAYLOAD_BYTES,
    MAX_HEADER_BYTES,
)
from migrelay.core.handshake import DEFAULT_MAX_HEAD_BYTES
from migrelay.errors import ConfigError
from migrelay.units import parse_size

#: The smallest ``--max-message`` accepted: a frame header is 14 bytes, and messages
#: much smaller than QEMU's writes would cost a frame per few bytes.
MIN_MAX_MESSAGE_BYTES: Final = 1024


@dataclass(frozen=True)
class Limits:
    """Per-channel limits shared by both relays.

    Memory per channel is bounded (`channel_memory_bound`): each direction reads into
    at most two buffers (``read_bytes`` plus 14 bytes of header room each), used in turn
    and never reallocated (`migrelay.aio.channel.ReadBuffers`). A buffer handed to
    ``transport.write()`` is not refilled until that transport has drained it, and
    while it is busy the opposite leg does not read; an event loop may still deliver
    one read after ``pause_reading()`` (uvloop was seen to), which goes into the other
    buffer. So a channel holds at most ``4 × read_bytes`` of migration data in user
    space (4 MiB by default; usually half of that, since the second buffer of a
    direction is allocated only when first needed), plus the kernel's socket buffers,
    whatever the speed of either peer. Control frames queued towards the peer are
    bounded apart (`control_queue_bound`: ~130 KiB by default).
    """

    #: Bytes per read, and so the largest data message sent. 1 MiB reads used ~36 %
    #: less relay CPU than 256 KiB (DESIGN.md §4); QEMU hands ~220 KiB per read anyway.
    read_bytes: int = 1 << 20
    #: Largest message accepted from the peer (DESIGN.md §3: default 1 MiB).
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    #: Largest HTTP head accepted (h11's default).
    max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES
    #: Seconds a client has to complete its upgrade request (slowloris defence; nginx's
    #: client_header_timeout defaults to 60 s, but a relay peer sends ~400 bytes at once).
    handshake_timeout: float = 10.0
    #: Seconds without traffic from the peer before a Ping (DESIGN.md §3: 15 s).
    ping_interval: float = 15.0
    #: Seconds after a Ping without any sign of life before the channel is closed.
    #: The check is a timer, not a per-read reset (nothing on the hot path): a peer
    #: that dies is noticed between ``ping_interval + ping_timeout`` and
    #: ``2 × ping_interval + ping_timeout`` after its last byte (30-45 s by default).
    ping_timeout: float = 15.0
    #: Seconds to wait for the peer's side of the close handshake (websockets: 10 s).
    close_timeout: float = 5.0
    #: Most frames parsed from the WebSocket in one event-loop callback; the rest of the
    #: read waits for the next loop iteration, and the WebSocket is not read meanwhile.
    #: A frame of 6 bytes costs ~3.5-5 µs of Python (measured: one 1 MiB read of empty
    #: frames took 0.6 s, of pings 0.9 s), so 256 frames hold the loop for ~1-2 ms;
    #: migration data comes in frames of up to ``read_bytes``, one or two per read,
    #: and never meets the budget.
    frames_per_callback: int = 256
    #: Most bytes of control frames (Pongs above all: a peer chooses how many Pings
    #: it sends) that may sit in the WebSocket transport's queue before the channel
    #: stops reading that WebSocket until the queue has drained: a peer that does not
    #: read stops being read. 64 KiB is ~500 Pongs with full payloads.
    control_backlog_bytes: int = 64 << 10

    @property
    def channel_memory_bound(self) -> int:
        """The most migration data one channel holds in user space, in bytes."""
        directions, buffers_each = 2, 2
        return directions * buffers_each * (MAX_HEADER_BYTES + self.read_bytes)

    @property
    def control_queue_bound(self) -> int:
        """The most control-frame bytes one channel queues towards its peer.

        The channel stops reading once more than `control_backlog_bytes` are queued;
        the callback that crossed the bound, and one read an event loop may still
        deliver after ``pause_reading()``, each parsed at most `frames_per_callback`
        frames, each answered with at most one frame of at most
        ``6 + MAX_CONTROL_PAYLOAD_BYTES`` bytes (header with mask key); then come our
        own Ping and Close.
        """
        largest_frame = 6 + MAX_CONTROL_PAYLOAD_BYTES
        callbacks, own_frames = 2, 2
        answers = callbacks * self.frames_per_callback + own_frames
        return self.control_backlog_bytes + answers * largest_frame

    def with_max_message(self, max_message: str, **changes: Any) -> Limits:
        """A copy with ``--max-message`` (``1M``, ``256K``) and other ``changes`` applied.

        A relay never sends a message larger than it would accept, so ``read_bytes``
        shrinks with the limit.

        Raises:
            ConfigError: not a size, or below `MIN_MAX_MESSAGE_BYTES`.
        """
        try:
            size = parse_size(max_message)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if size < MIN_MAX_MESSAGE_BYTES:
            raise ConfigError(
                f"--max-message of {size} bytes is below the minimum of {MIN_MAX_MESSAGE_BYTES}"
            )
        return replace(
            self, max_message_bytes=size, read_bytes=min(self.read_bytes, size), **changes
        )
