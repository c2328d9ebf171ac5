"""One relay channel: a unix connection to QEMU coupled to one WebSocket.

The data path (DESIGN.md §4):

* Each leg reads with ``asyncio.BufferedProtocol`` straight into preallocated buffers
  (:class:`ReadBuffers`: two per leg, allocated once). The unix leg reads at offset
  :data:`HEADROOM`, so the frame header is written in front of the payload and a frame
  is one contiguous ``write()``.
* OWNERSHIP: ``transport.write(memoryview)`` may keep the view and send it later
  (uvloop queues it). Both transports therefore get a write high-water mark of 0:
  as soon as anything stays queued, ``pause_writing`` fires and the *opposite* leg stops
  reading, so the buffer that was handed over is not refilled; ``resume_writing`` fires
  when the queue is empty, and reading resumes into the same buffer. An event loop may
  still deliver one read after ``pause_reading()`` (uvloop was seen to): that read goes
  into the leg's second buffer. That is also the end-to-end backpressure: the kernel's
  socket buffers absorb bursts, and the relay holds at most two buffers per direction
  (see :class:`~migrelay.limits.Limits`).
* Masking and unmasking run in place (C speedup).

The channel only moves bytes. What a channel does when either side ends, fails or goes
quiet, and whether it ended cleanly, is decided by its sans-IO
:class:`~migrelay.core.session.RelaySession`; the channel tells it what happened and
does what it answers. One INFO line per channel tells how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Final, cast

from migrelay.core.events import EndOfStream, Payload
from migrelay.core.frames import MAX_HEADER_BYTES
from migrelay.core.session import Liveness, LocalLoss, RelaySession, describe_close
from migrelay.limits import Limits
from migrelay.units import format_bytes

__all__ = [
    "HEADROOM",
    "UNIX_SNDBUF_BYTES",
    "Channel",
    "ReadBuffers",
    "UnixLeg",
    "WebSocketLeg",
    "describe_close",
    "pause_on_any_queued_byte",
]

logger = logging.getLogger(__name__)

#: Room reserved in front of each unix read for the frame header.
HEADROOM: Final = MAX_HEADER_BYTES
#: SO_SNDBUF asked for on unix legs (Linux doubles it, capped by net.core.wmem_max).
UNIX_SNDBUF_BYTES: Final = 2 << 20


def pause_on_any_queued_byte(transport: asyncio.WriteTransport) -> None:
    """Make ``transport`` call pause_writing() as soon as anything stays queued.

    OWNERSHIP: this is what lets a relay reuse its read buffer (module docstring). The
    plain transports pause when the queue is *above* the high-water mark, so 0 is
    right for them; the TLS transports (asyncio's sslproto, and uvloop's port of it)
    pause when it is *at or above* it, so 0 would pause them for good after the first
    write (seen: a wss:// relay stalled after 1 MiB). Their queue holds encrypted
    copies, never the caller's buffer, so 1 is exact for them.
    """
    high = 1 if transport.get_extra_info("ssl_object") is not None else 0
    transport.set_write_buffer_limits(high=high, low=0)


class ReadBuffers:
    """The two read buffers of one leg, each allocated at most once and used in turn.

    OWNERSHIP: a buffer whose bytes were handed to the opposite transport's
    ``write()`` while that transport kept something queued is *held* until the
    transport has drained (``resume_writing``, then :meth:`release`). Reads go into the
    current buffer while it is free (warm in the cache), into the other one while it
    is held. Both held means the loop read twice after ``pause_reading()``; refilling
    either would corrupt the stream, and a third buffer would break the memory bound
    of :class:`~migrelay.limits.Limits`, so that read fails the connection instead.

    The second buffer is allocated the first time it is needed and kept from then on:
    most channels never need it (measured: 16 channels of a load test took +32 MiB of
    RSS with one buffer per leg allocated up front, +64 MiB with two), and a buffer is
    filled with zeroes, so it is resident from the start.

    Args:
        headroom: bytes kept free in front of each read (room for a frame header).
        read_bytes: bytes per read.
    """

    __slots__ = ("_held", "_read_views", "_size", "current", "headroom", "view", "views")

    def __init__(self, headroom: int, read_bytes: int) -> None:
        self.headroom = headroom
        self._size = headroom + read_bytes
        first = memoryview(bytearray(self._size))
        #: The whole buffers, header room included; the second is None until needed.
        self.views: list[memoryview | None] = [first, None]
        #: The part of each buffer a read fills, sliced once (not per read).
        self._read_views: list[memoryview | None] = [first[headroom:], None]
        #: Index of the buffer the last read went into, and that whole buffer (header
        #: room included).
        self.current = 0
        self.view = first
        self._held = [False, False]

    def next_read(self) -> memoryview:
        """Return where the next read goes: the current buffer unless it is held.

        Raises:
            RuntimeError: both buffers are held (see the class docstring).
        """
        index = self.current
        if self._held[index]:
            index ^= 1
            if self._held[index]:
                raise RuntimeError("read after pause_reading() with both buffers in use")
            view = self.views[index]
            if view is None:
                view = self.views[index] = memoryview(bytearray(self._size))
                self._read_views[index] = view[self.headroom :]
            self.current, self.view = index, view
        read_view = self._read_views[index]
        assert read_view is not None  # made with its buffer
        return read_view

    def hold_current(self) -> None:
        """The current buffer's bytes are queued in the opposite transport."""
        self._held[self.current] = True

    def release(self) -> None:
        """The opposite transport's queue is empty: both buffers are free again."""
        self._held[0] = self._held[1] = False


class UnixLeg(asyncio.BufferedProtocol):
    """The QEMU side of a channel: reads into its buffers after the header room."""

    def __init__(self, read_bytes: int) -> None:
        self.buffers = ReadBuffers(HEADROOM, read_bytes)
        self.transport: asyncio.Transport | None = None
        self.channel: Channel | None = None
        #: What happened before a channel was attached (source relay: QEMU may connect
        #: and even close before the WebSocket is up).
        self.early_eof = False
        self.early_lost: tuple[Exception | None] | None = None
        #: Bytes read before a channel was attached. uvloop starts reading a newly
        #: accepted connection after connection_made() even when it paused reading
        #: (seen: 4 reads of 214 KiB), so those bytes are kept here, not lost.
        self.early_data = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = stream = cast(asyncio.Transport, transport)
        pause_on_any_queued_byte(stream)
        sock = stream.get_extra_info("socket")
        if sock is not None:
            # QEMU reads a unix socket ~220 KiB at a time; with the default 208 KiB send
            # buffer the destination relay wrote each 1 MiB read in ~5 pieces, each a
            # wake-up. 4 MiB measured ~20 % less relay CPU. The kernel caps it at
            # net.core.wmem_max; it is kernel memory, not the relay's buffers.
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, UNIX_SNDBUF_BYTES)
        if self.channel is None:
            # Nothing to relay to yet: let QEMU's writes wait in the kernel.
            stream.pause_reading()

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffers.next_read()

    def buffer_updated(self, nbytes: int) -> None:
        buffers = self.buffers
        channel = self.channel
        if channel is None:
            # Copied: a pre-channel read is kept until start() replays it.
            self.early_data += buffers.view[buffers.headroom : buffers.headroom + nbytes]
            assert self.transport is not None
            self.transport.pause_reading()
            return
        channel.unix_data(buffers.view, nbytes)
        if channel.ws_write_busy:
            # OWNERSHIP: the frame is (or may be) queued in the WebSocket transport.
            buffers.hold_current()

    def eof_received(self) -> bool:
        if self.channel is None:
            self.early_eof = True
        else:
            self.channel.unix_eof()
        # Keep the transport open: the other direction may still carry data.
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.channel is None:
            self.early_lost = (exc,)
        else:
            self.channel.unix_lost(exc)

    def pause_writing(self) -> None:
        if self.channel is not None:
            self.channel.pause_ws_reading()

    def resume_writing(self) -> None:
        if self.channel is not None:
            self.channel.resume_ws_reading()


class WebSocketLeg(asyncio.BufferedProtocol):
    """The WebSocket side of a channel, once the opening handshake is done."""

    def __init__(self, channel: Channel, read_bytes: int) -> None:
        self.channel = channel
        self.buffers = ReadBuffers(0, read_bytes)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover
        # The transport is handed over with set_protocol(); this is never called.
        raise AssertionError("WebSocketLeg is attached with set_protocol()")

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.buffers.next_read()

    def buffer_updated(self, nbytes: int) -> None:
        buffers = self.buffers
        channel = self.channel
        channel.ws_data(buffers.view[:nbytes])
        if channel.unix_write_busy:
            # OWNERSHIP: payload views of this buffer are (or may be) queued in the
            # unix transport.
            buffers.hold_current()

    def eof_received(self) -> bool:
        self.channel.ws_eof()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.channel.ws_lost(exc)

    def pause_writing(self) -> None:
        self.channel.pause_unix_reading()

    def resume_writing(self) -> None:
        self.channel.resume_unix_reading()


class Channel:
    """Couples a :class:`UnixLeg` and a WebSocket transport through a RelaySession.

    Args:
        session: the sans-IO session (its role says which relay this is).
        unix: the unix leg, already connected.
        ws_transport: the WebSocket's transport after the handshake; the channel
            installs its own protocol on it.
        limits: buffer sizes and timers.
        name: ``session/channel`` for log lines.
        on_closed: called once when both transports are closed.
    """

    def __init__(
        self,
        session: RelaySession,
        unix: UnixLeg,
        ws_transport: asyncio.Transport,
        limits: Limits,
        name: str,
        on_closed: Callable[[Channel], None] | None = None,
        log: logging.Logger | logging.LoggerAdapter[logging.Logger] = logger,
    ) -> None:
        self.session = session
        self.unix = unix
        self.ws_transport = ws_transport
        self.limits = limits
        self.name = name
        self.log = log
        self._on_closed = on_closed
        self._loop = asyncio.get_running_loop()
        self.started = time.monotonic()
        self.ended: float | None = None
        #: Payload bytes relayed unix → WebSocket and WebSocket → unix.
        self.bytes_sent = 0
        self.bytes_rcvd = 0
        #: Whether the WebSocket / unix transport keeps written bytes queued (OWNERSHIP).
        self.ws_write_busy = False
        self.unix_write_busy = False
        self._unix_reading_paused = False
        self._ws_reading_paused = False
        self._unix_closed = False
        self._ws_closed = False
        self._finished = False
        self.closed = asyncio.Event()
        #: Every byte the WebSocket delivered: the liveness check's evidence.
        self._ws_rcvd_total = 0
        self._timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self.debug = self.log.isEnabledFor(logging.DEBUG)

        self._ws_leg = WebSocketLeg(self, limits.read_bytes)
        pause_on_any_queued_byte(ws_transport)
        ws_transport.set_protocol(self._ws_leg)
        unix.channel = self
        self._arm_liveness(limits.ping_interval)

    # -- start-up ------------------------------------------------------------------------

    def start(self, trailing_data: bytes = b"") -> None:
        """Start relaying: replay what happened on either side before the hand-over."""
        if trailing_data:
            self.ws_data(memoryview(bytearray(trailing_data)))
        unix = self.unix
        early = unix.early_data
        for offset in range(0, len(early), self.limits.read_bytes):
            chunk = early[offset : offset + self.limits.read_bytes]
            # OWNERSHIP: a fresh buffer per chunk, never reused (once, not per read).
            buffer = memoryview(bytearray(HEADROOM) + chunk)
            self.unix_data(buffer, len(chunk))
        early.clear()
        if unix.early_eof:
            self.unix_eof()
        if unix.early_lost is not None:
            self.unix_lost(unix.early_lost[0])
            return
        if unix.transport is not None and not self._unix_closed and not self._unix_reading_paused:
            unix.transport.resume_reading()

    # -- unix → WebSocket --------------------------------------------------------------

    def unix_data(self, view: memoryview, nbytes: int) -> None:
        session = self.session
        if not session.accepts_local_data:
            return  # QEMU's late bytes after our end: nowhere to go (accepts_local_data)
        start = session.frame_data(view, HEADROOM, nbytes)
        self.bytes_sent += nbytes
        self.ws_transport.write(view[start : HEADROOM + nbytes])

    def unix_eof(self) -> None:
        if self.debug:
            self.log.debug("x %s: unix side sent EOF", self.name)
        self.session.local_eof()
        self._flush_control()

    def unix_lost(self, exc: Exception | None) -> None:
        self._unix_closed = True
        loss = self.session.local_lost(exc)
        if loss is LocalLoss.END_OF_STREAM and self.debug:
            self.log.debug("x %s: unix side closed: %s", self.name, exc)
        if loss is not LocalLoss.NOTHING:
            self._flush_control()
        self._maybe_finish()

    def pause_unix_reading(self) -> None:
        self.ws_write_busy = True
        if not self._unix_reading_paused and not self._unix_closed:
            self._unix_reading_paused = True
            assert self.unix.transport is not None
            self.unix.transport.pause_reading()

    def resume_unix_reading(self) -> None:
        self.ws_write_busy = False
        self.unix.buffers.release()
        if self._unix_reading_paused:
            self._unix_reading_paused = False
            if not self._unix_closed and self.unix.transport is not None:
                self.unix.transport.resume_reading()

    # -- WebSocket → unix --------------------------------------------------------------

    def ws_data(self, view: memoryview) -> None:
        self._ws_rcvd_total += len(view)
        session = self.session
        unix_transport = self.unix.transport
        for event in session.receive_data(view):
            if isinstance(event, Payload):
                if self._unix_closed or unix_transport is None or unix_transport.is_closing():
                    session.local_undeliverable()
                    break
                self.bytes_rcvd += len(event.data)
                unix_transport.write(event.data)
            elif isinstance(event, EndOfStream):
                if self.debug:
                    self.log.debug("< %s: end of stream", self.name)
                if (
                    unix_transport is not None
                    and not self._unix_closed
                    and unix_transport.can_write_eof()
                ):
                    unix_transport.write_eof()
            # Pongs, Closes and violations: the session took note and queued the answer;
            # _flush_control sends it and closes the unix side if the session says so.
        self._flush_control()

    def ws_eof(self) -> None:
        if self.debug:
            self.log.debug("x %s: websocket EOF", self.name)

    def ws_lost(self, exc: Exception | None) -> None:
        self._ws_closed = True
        self.session.receive_eof(exc)
        self._close_unix()
        self._maybe_finish()

    def pause_ws_reading(self) -> None:
        self.unix_write_busy = True
        if not self._ws_reading_paused and not self._ws_closed:
            self._ws_reading_paused = True
            self.ws_transport.pause_reading()

    def resume_ws_reading(self) -> None:
        self.unix_write_busy = False
        self._ws_leg.buffers.release()
        if self._ws_reading_paused:
            self._ws_reading_paused = False
            if not self._ws_closed:
                self.ws_transport.resume_reading()

    # -- closing -------------------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Close the channel from this side (shutdown, liveness timeout, errors).

        ``reason`` goes to the log; the peer receives only the code.
        """
        self.session.record_failure(reason)
        self.session.send_close(code, "")
        self._flush_control()
        self._close_unix()

    def abort(self, reason: str) -> None:
        """Drop both connections now, without a close handshake."""
        self.session.record_failure(reason)
        if not self._ws_closed:
            self.ws_transport.abort()
        if not self._unix_closed and self.unix.transport is not None:
            self.unix.transport.abort()

    @property
    def end_reason(self) -> str | None:
        """The first failure recorded (the session's), or None."""
        return self.session.failure

    @property
    def clean(self) -> bool:
        """Whether the channel ended cleanly: the same definition as its log line."""
        return self.session.outcome().clean

    def _close_unix(self) -> None:
        transport = self.unix.transport
        if transport is not None and not transport.is_closing():
            # close() flushes what is queued first: nothing QEMU's peer wrote is lost.
            transport.close()

    def _flush_control(self) -> None:
        session = self.session
        frames = session.data_to_send()
        if frames and not self._ws_closed:
            self.ws_transport.writelines(frames)
        if session.local_should_close():
            self._close_unix()
        if session.close_expected() and not self._ws_closed:
            self.ws_transport.close()
        elif session.close_sent is not None and self._close_timer is None and not self._ws_closed:
            # RFC 6455 §7.1.1: wait for the peer to close TCP, but not forever.
            self._close_timer = self._loop.call_later(
                self.limits.close_timeout, self._close_timed_out
            )

    def _close_timed_out(self) -> None:
        if not self._ws_closed:
            self.session.record_failure(
                f"peer did not finish the close handshake in {self.limits.close_timeout:g} s"
            )
            self.ws_transport.abort()

    def _maybe_finish(self) -> None:
        if self._finished or not (self._ws_closed and self._unix_closed):
            if self._ws_closed and not self._unix_closed:
                self._close_unix()
            return
        self._finished = True
        self.ended = time.monotonic()
        for timer in (self._timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._log_end()
        self.closed.set()
        if self._on_closed is not None:
            self._on_closed(self)

    def _log_end(self) -> None:
        outcome = self.session.outcome()
        duration = (self.ended or time.monotonic()) - self.started
        rate = (self.bytes_sent + self.bytes_rcvd) / duration if duration > 0 else 0.0
        code = outcome.close_code
        self.log.info(
            "channel %s closed: %s; sent %s, received %s in %.2f s (%s/s); close code %s",
            self.name,
            outcome.description,
            format_bytes(self.bytes_sent),
            format_bytes(self.bytes_rcvd),
            duration,
            format_bytes(int(rate)),
            describe_close(code) if code is not None else "none",
        )

    # -- liveness ------------------------------------------------------------------------

    def _arm_liveness(self, delay: float) -> None:
        if delay > 0:
            self._timer = self._loop.call_later(delay, self._liveness_tick)

    def _liveness_tick(self) -> None:
        if self._ws_closed:
            return
        limits = self.limits
        verdict = self.session.check_liveness(
            self._ws_rcvd_total, silent_seconds=limits.ping_interval + limits.ping_timeout
        )
        if verdict is Liveness.ALIVE:
            self._arm_liveness(limits.ping_interval)
        elif verdict is Liveness.PING_SENT:
            if self.debug:
                self.log.debug("%% %s: ping", self.name)
            self._flush_control()
            self._arm_liveness(limits.ping_timeout)
        elif verdict is Liveness.DEAD:
            self._flush_control()
            self._close_unix()
            # A dead peer will not answer the Close either.
            self.abort(self.end_reason or "liveness timeout")
