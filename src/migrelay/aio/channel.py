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
* GIL: the copies are most of a relay's per-byte cost. The kernel's copies on reads
  happen inside the event loop's own poll (uvloop runs it without the GIL); masking
  releases it; and a write to a plain socket whose transport has nothing queued goes
  straight to the socket through ``send_nogil`` (:func:`send_direct`), what the
  transport does itself but without the GIL, so that channels on other worker threads
  (``--workers``) run meanwhile. Whatever the socket does not take at once goes
  through the transport, as before, and the transport reports errors.
* A peer's cost is bounded per event-loop callback and in queued replies. One callback
  parses at most :attr:`~migrelay.limits.Limits.frames_per_callback` frames; the rest of
  the read stays in its buffer (held, like a buffer queued in a transport) and is parsed
  in later loop iterations, with the WebSocket not read meanwhile. Control frames the
  session answers with (Pongs) are counted while the WebSocket transport keeps bytes
  queued; past :attr:`~migrelay.limits.Limits.control_backlog_bytes` the WebSocket is
  not read until that queue has drained: a peer that does not read stops being read, so
  the liveness check, which counts the bytes read, ends it. Reading of the WebSocket is
  paused for a set of reasons (:class:`WsPause`) and resumes when none holds.

The channel only moves bytes. What a channel does when either side ends, fails or goes
quiet, and whether it ended cleanly, is decided by its sans-IO
:class:`~migrelay.core.session.RelaySession`; the channel tells it what happened and
does what it answers. One INFO line per channel tells how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections import deque
from collections.abc import Callable
from enum import Enum
from typing import Final, Protocol, cast

from migrelay.core.events import EndOfStream, Payload
from migrelay.core.frames import MAX_HEADER_BYTES, CloseCode
from migrelay.core.mask import NATIVE
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
    "WsPause",
    "describe_close",
    "direct_fd",
    "pause_on_any_queued_byte",
    "send_direct",
    "send_nogil",
]

logger = logging.getLogger(__name__)

#: Room reserved in front of each unix read for the frame header.
HEADROOM: Final = MAX_HEADER_BYTES
#: The most a channel reads from QEMU's socket after a write to it failed
#: (`Channel._salvage_unix`): more than a QEMU's unix send buffer holds (Linux's default
#: 208 KiB, at most net.core.wmem_max).
SALVAGE_BYTES: Final = 4 << 20
#: SO_SNDBUF asked for on unix legs (Linux doubles it, capped by net.core.wmem_max).
UNIX_SNDBUF_BYTES: Final = 2 << 20


class _SendFunction(Protocol):
    def __call__(self, fd: int, data: memoryview, /) -> int: ...


#: ``migrelay._speedups.send_nogil``, None without the C extension.
send_nogil: Final[_SendFunction | None] = None if NATIVE is None else NATIVE.send_nogil


def direct_fd(transport: asyncio.BaseTransport) -> int:
    """The socket :func:`send_direct` may write to for ``transport``, or -1.

    -1 for TLS transports (what they send is not what they are given) and without the
    C extension.
    """
    if send_nogil is None or transport.get_extra_info("ssl_object") is not None:
        return -1
    sock = transport.get_extra_info("socket")
    return -1 if sock is None else int(sock.fileno())


def send_direct(
    transport: asyncio.WriteTransport,
    fd: int,
    data: memoryview,
    before_error: Callable[[], None] | None = None,
) -> None:
    """``transport.write(data)``, the part the socket takes at once sent without the GIL.

    Only while the transport has nothing queued (else the bytes would overtake it) and
    is not closing (its descriptor may be gone, or soon reused). When the socket refuses
    with an error (its peer is gone), ``before_error`` runs first, while the descriptor
    is still open; then the transport's write reports the error and closes it.
    """
    if fd >= 0 and not transport.get_write_buffer_size() and not transport.is_closing():
        assert send_nogil is not None  # direct_fd gives -1 without it
        sent = send_nogil(fd, data)
        if sent == len(data):
            return
        if sent > 0:
            data = data[sent:]
        elif sent < 0 and before_error is not None:
            before_error()
    transport.write(data)


#: Why a read buffer may not be refilled (bits of ReadBuffers._held): its bytes are
#: queued in the opposite transport, or some of them wait to be parsed.
_QUEUED: Final = 1
_UNPARSED: Final = 2


class WsPause(Enum):
    """Why a channel does not read its WebSocket; it reads again when no reason holds."""

    #: The unix transport keeps written payload queued (OWNERSHIP backpressure).
    UNIX_BUSY = "unix write busy"
    #: Too many control-frame bytes wait in the WebSocket transport's queue.
    CONTROL_BACKLOG = "control backlog"
    #: Bytes already read wait to be parsed (``Limits.frames_per_callback``).
    UNPARSED = "unparsed bytes"


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
    transport has drained (``resume_writing``, then :meth:`release`); a buffer part of
    which waits to be parsed (``Limits.frames_per_callback``) is held until it has been
    (:meth:`keep_unparsed`, :meth:`parsed`). Reads go into the
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
        #: Per buffer, the reasons it is held (_QUEUED | _UNPARSED), 0 when free.
        self._held = [0, 0]

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
        self._held[self.current] |= _QUEUED

    def hold(self, index: int) -> None:
        """Buffer ``index``'s bytes are queued in the opposite transport."""
        self._held[index] |= _QUEUED

    def release(self) -> None:
        """The opposite transport's queue is empty: no buffer is held for it any more."""
        held = self._held
        held[0] &= _UNPARSED
        held[1] &= _UNPARSED

    def keep_unparsed(self) -> int:
        """Part of the current buffer waits to be parsed; return the buffer's index."""
        index = self.current
        self._held[index] |= _UNPARSED
        return index

    def parsed(self, index: int) -> None:
        """Buffer ``index`` has been parsed to its end."""
        self._held[index] &= _QUEUED


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
        try:
            channel.unix_data(buffers.view, nbytes)
        except Exception as exc:
            channel.internal_error("relaying from the unix side", exc)
            return
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
        try:
            channel.ws_data(buffers.view[:nbytes])
        except Exception as exc:
            channel.internal_error("relaying from the websocket", exc)
            return
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
        #: Why the WebSocket is not read; empty while it is.
        self._ws_pauses: set[WsPause] = set()
        #: Bytes read from the WebSocket and not parsed yet, oldest first, each with the
        #: index of the read buffer it lies in (None: not one of them).
        self._unparsed: deque[tuple[memoryview, int | None]] = deque()
        self._parse_handle: asyncio.Handle | None = None
        #: Control-frame bytes written since the WebSocket transport's queue was last
        #: empty: at least what of them is still queued.
        self._control_queued = 0
        self._unix_closed = False
        self._ws_closed = False
        self._finished = False
        self.closed = asyncio.Event()
        #: Every byte the WebSocket delivered: the liveness check's evidence.
        self._ws_rcvd_total = 0
        self._timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self.debug = self.log.isEnabledFor(logging.DEBUG)

        #: Where send_direct may write for each leg (-1: through its transport only).
        self._ws_fd = direct_fd(ws_transport)
        self._unix_fd = -1 if unix.transport is None else direct_fd(unix.transport)
        self._ws_leg = WebSocketLeg(self, limits.read_bytes)
        pause_on_any_queued_byte(ws_transport)
        ws_transport.set_protocol(self._ws_leg)
        unix.channel = self
        self._arm_liveness(limits.ping_interval)

    # -- start-up ------------------------------------------------------------------------

    def start(self, trailing_data: bytes = b"") -> None:
        """Start relaying: replay what happened on either side before the hand-over,
        then read the WebSocket (the caller hands it over with reading paused) unless
        the replay left a reason not to (`WsPause`)."""
        try:
            self._start(trailing_data)
        except Exception as exc:
            # The replay relays bytes as the legs' reads do: the same 1011.
            self.internal_error("starting to relay", exc)

    def _start(self, trailing_data: bytes) -> None:
        if trailing_data:
            self.ws_data(memoryview(bytearray(trailing_data)), in_read_buffer=False)
        if not self._ws_pauses and not self._ws_closed:
            self.ws_transport.resume_reading()
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
        send_direct(self.ws_transport, self._ws_fd, view[start : HEADROOM + nbytes])

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
        if self.unix_write_busy:
            # What waited for QEMU will never drain now: read the WebSocket again, so
            # that the peer's next data fails the channel at once (4000, undeliverable)
            # and its Pongs are seen, instead of a liveness timeout seconds later.
            self.resume_ws_reading()
        self._maybe_finish()

    def pause_unix_reading(self) -> None:
        self.ws_write_busy = True
        if not self._unix_reading_paused and not self._unix_closed:
            self._unix_reading_paused = True
            assert self.unix.transport is not None
            self.unix.transport.pause_reading()

    def resume_unix_reading(self) -> None:
        self.ws_write_busy = False
        self._control_queued = 0
        if WsPause.CONTROL_BACKLOG in self._ws_pauses:
            self._resume_ws(WsPause.CONTROL_BACKLOG)
        self.unix.buffers.release()
        if self._unix_reading_paused:
            self._unix_reading_paused = False
            if not self._unix_closed and self.unix.transport is not None:
                self.unix.transport.resume_reading()

    def _salvage_unix(self) -> None:
        """QEMU's socket refused a write (it died or shut its reading side): relay what it
        wrote before that, still unread in the kernel, ahead of the error.

        Its last words (an error, a postcopy page request) must not depend on whether the
        loop polled the socket for reading before the next write failed. At most
        `SALVAGE_BYTES`: QEMU's send buffer bounds what can wait there.
        """
        fd = self._unix_fd
        budget = SALVAGE_BYTES
        while budget > 0 and not self._unix_closed and self.session.accepts_local_data:
            try:
                chunk = os.read(fd, min(self.limits.read_bytes, budget))
            except OSError:  # BlockingIOError: nothing more; ECONNRESET: that was all
                return
            if not chunk:
                return
            budget -= len(chunk)
            # OWNERSHIP: a fresh buffer, never reused, as start() does for early data.
            self.unix_data(memoryview(bytearray(HEADROOM) + chunk), len(chunk))

    # -- WebSocket → unix --------------------------------------------------------------

    def ws_data(self, view: memoryview, in_read_buffer: bool = True) -> None:
        """Relay what the WebSocket delivered; ``view`` lies in the leg's current buffer
        unless ``in_read_buffer`` is False."""
        self._ws_rcvd_total += len(view)
        if self._unparsed:
            # A read the loop delivered after pause_reading(): it comes after the bytes
            # that wait already.
            self._keep_unparsed(view, in_read_buffer)
            return
        used = self._parse_ws(view)
        if used < len(view):
            self._keep_unparsed(view[used:], in_read_buffer)
            self._pause_ws(WsPause.UNPARSED)
            self._schedule_parse()

    def _keep_unparsed(self, view: memoryview, in_read_buffer: bool) -> None:
        index = self._ws_leg.buffers.keep_unparsed() if in_read_buffer else None
        self._unparsed.append((view, index))

    def _schedule_parse(self) -> None:
        # Only while nothing else keeps the WebSocket from being read: a peer whose
        # Pongs pile up, or whose data the unix side does not take, waits for that.
        if self._parse_handle is None and len(self._ws_pauses) == 1:
            self._parse_handle = self._loop.call_soon(self._parse_unparsed)

    def _parse_unparsed(self) -> None:
        """Parse the next ``frames_per_callback`` frames of what waits (a loop callback)."""
        self._parse_handle = None
        unparsed = self._unparsed
        if self._ws_closed or not unparsed or len(self._ws_pauses) != 1:
            return
        view, index = unparsed[0]
        used = self._parse_ws(view)
        if used < len(view):
            unparsed[0] = (view[used:], index)
        else:
            unparsed.popleft()
        if index is not None:
            buffers = self._ws_leg.buffers
            if used == len(view):
                buffers.parsed(index)
            if self.unix_write_busy:
                # OWNERSHIP: as WebSocketLeg.buffer_updated does for a read.
                buffers.hold(index)
        if unparsed:
            self._schedule_parse()
        else:
            self._resume_ws(WsPause.UNPARSED)

    def _parse_ws(self, view: memoryview) -> int:
        """Relay up to ``frames_per_callback`` frames of ``view``; return the bytes used."""
        session = self.session
        unix_transport = self.unix.transport
        events, used = session.receive_frames(view, self.limits.frames_per_callback)
        for event in events:
            if isinstance(event, Payload):
                if self._unix_closed or unix_transport is None or unix_transport.is_closing():
                    session.local_undeliverable()
                    break
                self.bytes_rcvd += len(event.data)
                send_direct(unix_transport, self._unix_fd, event.data, self._salvage_unix)
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
        return used

    def ws_eof(self) -> None:
        if self.debug:
            self.log.debug("x %s: websocket EOF", self.name)

    def ws_lost(self, exc: Exception | None) -> None:
        self._ws_closed = True
        self._unparsed.clear()
        if self._parse_handle is not None:
            self._parse_handle.cancel()
            self._parse_handle = None
        self.session.receive_eof(exc)
        self._close_unix()
        self._maybe_finish()

    def pause_ws_reading(self) -> None:
        self.unix_write_busy = True
        self._pause_ws(WsPause.UNIX_BUSY)

    def resume_ws_reading(self) -> None:
        self.unix_write_busy = False
        self._ws_leg.buffers.release()
        self._resume_ws(WsPause.UNIX_BUSY)

    def _pause_ws(self, reason: WsPause) -> None:
        pauses = self._ws_pauses
        if not pauses and not self._ws_closed:
            self.ws_transport.pause_reading()
        pauses.add(reason)

    def _resume_ws(self, reason: WsPause) -> None:
        pauses = self._ws_pauses
        if reason not in pauses:
            return
        pauses.discard(reason)
        if self._ws_closed:
            return
        if not pauses:
            self.ws_transport.resume_reading()
        elif self._unparsed:
            self._schedule_parse()

    # -- closing -------------------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Close the channel from this side (shutdown, liveness timeout, errors).

        ``reason`` goes to the log; the peer receives only the code.
        """
        self.session.record_failure(reason)
        self.session.send_close(code, "")
        self._flush_control()
        self._close_unix()

    def internal_error(self, where: str, exc: Exception) -> None:
        """A bug of the relay's while ``where``: fail the channel with 1011.

        The traceback goes to the log, the peer gets only the code (STYLE §6; RFC 6455
        §7.4.1: "1011 indicates that a server is terminating the connection because it
        encountered an unexpected condition"), and both QEMUs see the channel end at
        once instead of a transport left half-way. A second error while the 1011
        handshake runs drops both connections.
        """
        if self.session.close_sent is not None and (
            self.session.close_sent[0] == CloseCode.INTERNAL_ERROR
        ):
            self.abort(f"internal error while {where}")
            return
        self.log.error("channel %s: internal error while %s", self.name, where, exc_info=exc)
        self.close(CloseCode.INTERNAL_ERROR, f"internal error while {where} ({exc!r})")

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
            if self.ws_write_busy:
                # Queued behind what the peer has not read yet: count it (pause_writing
                # fired on the first byte queued, OWNERSHIP; resume_unix_reading resets).
                self._control_queued += sum(map(len, frames))
                if self._control_queued > self.limits.control_backlog_bytes:
                    self._pause_ws(WsPause.CONTROL_BACKLOG)
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
