"""Tunable limits, as frozen dataclasses; each default says where it comes from."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Final

from migrelay.core.frames import DEFAULT_MAX_MESSAGE_BYTES, MAX_HEADER_BYTES
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
    whatever the speed of either peer.
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

    @property
    def channel_memory_bound(self) -> int:
        """The most migration data one channel holds in user space, in bytes."""
        directions, buffers_each = 2, 2
        return directions * buffers_each * (MAX_HEADER_BYTES + self.read_bytes)

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
