"""One relay channel: a unix connection to QEMU coupled to one WebSocket.

The data path (DESIGN.md §4):

* Each leg reads with ``asyncio.BufferedProtocol`` straight into one preallocated
  buffer. The unix leg reads at offset :data:`HEADROOM`, so the frame header is written
  in front of the payload and a frame is one contiguous ``write()``.
* OWNERSHIP: ``transport.write(memoryview)`` may keep the view and send it later
  (uvloop queues it). Both transports therefore get a write high-water mark of 0:
  as soon as anything stays queued, ``pause_writing`` fires and the *opposite* leg stops
  reading, so the buffer that was handed over is not refilled; ``resume_writing`` fires
  when the queue is empty, and reading resumes into the same buffer. That is also the
  end-to-end backpressure: the kernel's socket buffers absorb bursts, and the relay
  holds at most one buffer per direction (see :class:`~migrelay.limits.Limits`).
* Masking and unmasking run in place (C speedup).

Endings: each direction ends with a zero-length message (half-close); when either side
fails, what was already written is flushed and the other side is closed, so both QEMUs
see the failure at once. One INFO line per channel tells how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Final, cast

from ..core.events import (
    CloseReceived,
    EndOfStream,
    Payload,
    PongReceived,
    ProtocolViolation,
)
from ..core.frames import MAX_HEADER_BYTES, CloseCode
from ..core.session import RelaySession, Role, SessionState
from ..limits import Limits
from ..units import format_bytes

logger = logging.getLogger(__name__)

#: Room reserved in front of each unix read for the frame header.
HEADROOM: Final = MAX_HEADER_BYTES
#: SO_SNDBUF asked for on unix legs (Linux doubles it, capped by net.core.wmem_max).
UNIX_SNDBUF_BYTES: Final = 2 << 20

_CLOSE_REASONS: Final[dict[int, str]] = {
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


def describe_close(code: int) -> str:
    """Return ``"1000 normal"`` style text for a close code."""
    name = _CLOSE_REASONS.get(code)
    return f"{code} {name}" if name else str(code)


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


class UnixLeg(asyncio.BufferedProtocol):
    """The QEMU side of a channel: reads into the buffer after the header room."""

    def __init__(self, read_bytes: int) -> None:
        self.buffer = bytearray(HEADROOM + read_bytes)
        self._view = memoryview(self.buffer)
        self._read_view = self._view[HEADROOM:]
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
        channel = self.channel
        if channel is not None and channel.ws_write_busy:
            # OWNERSHIP: the buffer is still queued in the WebSocket transport. Only a
            # loop that reads after pause_reading() gets here; give it a spare buffer.
            spare = memoryview(bytearray(HEADROOM + len(self._read_view)))
            self._view, self._read_view = spare, spare[HEADROOM:]
            self.buffer = spare.obj  # type: ignore[assignment]
        return self._read_view

    def buffer_updated(self, nbytes: int) -> None:
        if self.channel is None:
            self.early_data += self._read_view[:nbytes]
            assert self.transport is not None
            self.transport.pause_reading()
            return
        self.channel.unix_data(self._view, nbytes)

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
        self._view = memoryview(bytearray(read_bytes))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # pragma: no cover
        # The transport is handed over with set_protocol(); this is never called.
        raise AssertionError("WebSocketLeg is attached with set_protocol()")

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.channel.unix_write_busy:
            # OWNERSHIP: payload views of this buffer are still queued in the unix
            # transport (see UnixLeg.get_buffer).
            self._view = memoryview(bytearray(len(self._view)))
        return self._view

    def buffer_updated(self, nbytes: int) -> None:
        self.channel.ws_data(self._view[:nbytes])

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
        self.ws_write_busy = False
        self.unix_write_busy = False
        self._unix_reading_paused = False
        self._ws_reading_paused = False
        self._unix_closed = False
        self._unix_error: Exception | None = None
        self._ws_closed = False
        self._finished = False
        self.end_reason: str | None = None
        self.closed = asyncio.Event()
        self._ws_rcvd_total = 0
        self._liveness_mark = 0
        self._ping_outstanding = False
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
            # OWNERSHIP: a fresh buffer per chunk, never reused.
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
        if session.local_ended or session.close_sent is not None or self._ws_closed:
            return  # the WebSocket is closing; QEMU's late bytes have nowhere to go
        start = session.frame_data(view, HEADROOM, nbytes)
        self.bytes_sent += nbytes
        self.ws_transport.write(view[start : HEADROOM + nbytes])

    def unix_eof(self) -> None:
        if self.debug:
            self.log.debug("x %s: unix side sent EOF", self.name)
        self.session.send_end_of_stream()
        self._flush_control()

    def unix_lost(self, exc: Exception | None) -> None:
        self._unix_closed = True
        self._unix_error = exc
        session = self.session
        if session.state is SessionState.OPEN and not (
            session.local_ended and session.remote_ended
        ):
            if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
                # QEMU closed its socket, perhaps with bytes still unread: QEMU 7.2's
                # destination does that to multifd channels at the end of a migration
                # that completed. Like EOF, this ends QEMU's direction; whatever the
                # peer sends after it cannot be delivered and fails the channel (see
                # _undeliverable), which is what QEMU over direct TCP would see.
                if self.debug:
                    self.log.debug("x %s: unix side closed: %s", self.name, exc)
                self.session.send_end_of_stream()
                self._flush_control()
            else:
                # QEMU went away before the channel finished: tell the peer, which
                # closes its own unix side, so both QEMUs see it.
                self._set_reason(f"unix side closed ({exc or 'QEMU'})")
                session.send_close(self._unix_close_code(), "")
                self._flush_control()
        self._maybe_finish()

    def _unix_close_code(self) -> CloseCode:
        if self.session.role is Role.SERVER:
            return CloseCode.DESTINATION_CLOSED
        return CloseCode.SOURCE_CLOSED

    def pause_unix_reading(self) -> None:
        self.ws_write_busy = True
        if not self._unix_reading_paused and not self._unix_closed:
            self._unix_reading_paused = True
            assert self.unix.transport is not None
            self.unix.transport.pause_reading()

    def resume_unix_reading(self) -> None:
        self.ws_write_busy = False
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
                    self._undeliverable()
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
            elif isinstance(event, PongReceived):
                self._ping_outstanding = False
            elif isinstance(event, CloseReceived):
                if event.code != CloseCode.NORMAL or not session.local_ended:
                    self._set_reason(f"peer closed with {describe_close(event.code)}")
                self._close_unix()
            elif isinstance(event, ProtocolViolation):
                self._set_reason(f"peer broke the protocol: {event.reason}")
                self._close_unix()
        self._flush_control()

    def _undeliverable(self) -> None:
        why = f" ({self._unix_error})" if self._unix_error else ""
        self._set_reason(f"unix side closed{why} while data was still arriving")
        self.session.send_close(self._unix_close_code(), "")

    def ws_eof(self) -> None:
        if self.debug:
            self.log.debug("x %s: websocket EOF", self.name)

    def ws_lost(self, exc: Exception | None) -> None:
        self._ws_closed = True
        session = self.session
        if session.state is not SessionState.CLOSED:
            self._set_reason(
                f"websocket connection lost ({exc})"
                if exc
                else "websocket closed without a close frame"
            )
        session.receive_eof()
        self._close_unix()
        self._maybe_finish()

    def pause_ws_reading(self) -> None:
        self.unix_write_busy = True
        if not self._ws_reading_paused and not self._ws_closed:
            self._ws_reading_paused = True
            self.ws_transport.pause_reading()

    def resume_ws_reading(self) -> None:
        self.unix_write_busy = False
        if self._ws_reading_paused:
            self._ws_reading_paused = False
            if not self._ws_closed:
                self.ws_transport.resume_reading()

    # -- closing -------------------------------------------------------------------------

    def close(self, code: int, reason: str) -> None:
        """Close the channel from this side (shutdown, liveness timeout, errors).

        ``reason`` goes to the log; the peer receives only the code.
        """
        self._set_reason(reason)
        self.session.send_close(code, "")
        self._flush_control()
        self._close_unix()

    def abort(self, reason: str) -> None:
        """Drop both connections now, without a close handshake."""
        self._set_reason(reason)
        if not self._ws_closed:
            self.ws_transport.abort()
        if not self._unix_closed and self.unix.transport is not None:
            self.unix.transport.abort()

    def _set_reason(self, reason: str) -> None:
        if self.end_reason is None:
            self.end_reason = reason

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
        if session.state is SessionState.CLOSED or session.close_sent is not None:
            self._close_unix_after_peer()
        if session.close_expected() and not self._ws_closed:
            self.ws_transport.close()
        elif session.close_sent is not None and self._close_timer is None and not self._ws_closed:
            # RFC 6455 §7.1.1: wait for the peer to close TCP, but not forever.
            self._close_timer = self._loop.call_later(
                self.limits.close_timeout, self._close_timed_out
            )

    def _close_unix_after_peer(self) -> None:
        session = self.session
        if session.close_rcvd is not None or session.failed:
            self._close_unix()
        elif session.close_sent is not None and session.close_sent[0] != CloseCode.NORMAL:
            # We are failing the channel: stop QEMU's side now.
            self._close_unix()

    def _close_timed_out(self) -> None:
        if not self._ws_closed:
            self._set_reason(
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
        session = self.session
        duration = (self.ended or time.monotonic()) - self.started
        rate = (self.bytes_sent + self.bytes_rcvd) / duration if duration > 0 else 0.0
        code = session.close_rcvd[0] if session.close_rcvd else None
        if code is None and session.close_sent is not None:
            code = session.close_sent[0]
        clean = (
            session.local_ended
            and session.remote_ended
            and code == CloseCode.NORMAL
            and self.end_reason is None
        )
        how = "completed" if clean else (self.end_reason or "closed")
        self.log.info(
            "channel %s closed: %s; sent %s, received %s in %.2f s (%s/s); close code %s",
            self.name,
            how,
            format_bytes(self.bytes_sent),
            format_bytes(self.bytes_rcvd),
            duration,
            format_bytes(int(rate)),
            describe_close(code) if code is not None else "none",
        )

    @property
    def clean(self) -> bool:
        """Whether the channel ended with both directions complete and a normal close."""
        session = self.session
        return (
            session.local_ended
            and session.remote_ended
            and self.end_reason is None
            and session.close_rcvd is not None
            and session.close_rcvd[0] == CloseCode.NORMAL
        )

    # -- liveness ------------------------------------------------------------------------

    def _arm_liveness(self, delay: float) -> None:
        if delay > 0:
            self._timer = self._loop.call_later(delay, self._liveness_tick)

    def _liveness_tick(self) -> None:
        if self._ws_closed or self.session.state is not SessionState.OPEN:
            return
        # Only bytes from the peer prove it alive: our own bytes draining into the
        # kernel's send buffer say nothing about a peer that froze or vanished.
        mark = self._ws_rcvd_total
        if mark != self._liveness_mark:
            self._liveness_mark = mark
            self._ping_outstanding = False
            self._arm_liveness(self.limits.ping_interval)
            return
        if self._ping_outstanding:
            self.close(
                CloseCode.IDLE_TIMEOUT,
                f"peer silent for {self.limits.ping_interval + self.limits.ping_timeout:g} s "
                "(liveness timeout)",
            )
            # A dead peer will not answer the Close either.
            self.abort(self.end_reason or "liveness timeout")
            return
        if self.debug:
            self.log.debug("%% %s: ping", self.name)
        self._ping_outstanding = True
        self.session.send_ping(b"migrelay")
        self._flush_control()
        self._arm_liveness(self.limits.ping_timeout)
