"""RFC 6455 data-frame codec, sans-IO: headers into caller buffers, streaming parse.

Why not wsproto's frame layer: it allocates a fresh ``bytes`` per message and copies the
payload several times, which measured 1.5× a direct TCP migration (DESIGN.md §4). Here:

* **Encoding** writes a frame header into room the caller reserved *in front of* the
  payload, then masks the payload in place, so a frame is one contiguous slice of one
  preallocated buffer and one ``write()``.
* **Decoding** is an incremental state machine over whatever the transport delivered.
  Payload bytes are unmasked in place and handed back as slices (``memoryview``) of the
  caller's buffer, never accumulated, so memory does not grow with the frame size. Only
  control-frame payloads (at most 125 bytes) and partial headers (at most 14 bytes) are
  buffered.

Protocol violations never raise out of :meth:`FrameParser.receive`: they become a
:class:`~migrelay.core.events.ProtocolViolation` event carrying the close code to send
(RFC 6455 §7.4.1), after which the parser ignores further input.
"""

from __future__ import annotations

import struct
from enum import IntEnum
from typing import Final

from migrelay._types import BytesLike, WritableBuffer
from migrelay.core.events import (
    CloseReceived,
    EndOfStream,
    FrameEvent,
    Payload,
    PingReceived,
    PongReceived,
    ProtocolViolation,
)
from migrelay.core.mask import ScanFunction, apply_mask, scan_data_frames
from migrelay.errors import LocalProtocolError


class Opcode(IntEnum):
    """Frame opcodes (RFC 6455 §5.2)."""

    #: "%x0 denotes a continuation frame"
    CONTINUATION = 0x0
    #: "%x1 denotes a text frame"
    TEXT = 0x1
    #: "%x2 denotes a binary frame"
    BINARY = 0x2
    #: "%x8 denotes a connection close"
    CLOSE = 0x8
    #: "%x9 denotes a ping"
    PING = 0x9
    #: "%xA denotes a pong"
    PONG = 0xA


class CloseCode(IntEnum):
    """Close status codes (RFC 6455 §7.4.1) and migrelay's own (4000-4099)."""

    #: "1000 indicates a normal closure"
    NORMAL = 1000
    #: "1001 indicates that an endpoint is going away"
    GOING_AWAY = 1001
    #: "1002 indicates that an endpoint is terminating the connection due to a protocol error"
    PROTOCOL_ERROR = 1002
    #: "1003 ... received a type of data it cannot accept" (migrelay: text messages)
    UNSUPPORTED_DATA = 1003
    #: "1005 ... MUST NOT be set as a status code in a Close control frame"
    NO_STATUS_RCVD = 1005
    #: "1006 ... MUST NOT be set": the connection closed without a close frame
    ABNORMAL_CLOSURE = 1006
    #: "1007 ... data within a message that was not consistent with the type"
    INVALID_DATA = 1007
    #: "1008 ... received a message that violates its policy"
    POLICY_VIOLATION = 1008
    #: "1009 ... received a message that is too big for it to process"
    MESSAGE_TOO_BIG = 1009
    #: "1010 ... expected the server to negotiate one or more extension"
    MANDATORY_EXTENSION = 1010
    #: "1011 ... encountered an unexpected condition"
    INTERNAL_ERROR = 1011
    #: "1015 ... MUST NOT be set": TLS handshake failure
    TLS_HANDSHAKE = 1015
    #: migrelay: the destination's unix socket closed or failed
    DESTINATION_CLOSED = 4000
    #: migrelay, reserved and never sent: an unreachable destination socket is refused
    #: with 503 before the upgrade (serve answers 101 only once it is connected). Kept so
    #: that an older relay that sent it is still described by name.
    DESTINATION_UNREACHABLE = 4001
    #: migrelay: no pong within the liveness timeout
    IDLE_TIMEOUT = 4002
    #: migrelay: the source's unix side closed or failed before its end of stream
    SOURCE_CLOSED = 4003
    #: migrelay: the relay is shutting down and its deadline passed
    SHUTDOWN = 4004


#: Codes that RFC 6455 §7.4.1 says "MUST NOT be set as a status code in a Close control
#: frame by an endpoint"; receiving one is a protocol error.
_LOCAL_ONLY_CODES: Final = frozenset({1005, 1006, 1015})

#: Largest header: 2 fixed bytes, 8 bytes of extended length, 4 bytes of mask key.
MAX_HEADER_BYTES: Final = 14
#: RFC 6455 §5.5: "All control frames MUST have a payload length of 125 bytes or less".
MAX_CONTROL_PAYLOAD_BYTES: Final = 125
#: Default largest message either side accepts (DESIGN.md §3). QEMU hands the source
#: relay about 220 KiB per read, and 1 MiB reads cost 36 % less CPU than 256 KiB.
DEFAULT_MAX_MESSAGE_BYTES: Final = 1 << 20
#: A ``max_frames`` for :meth:`FrameParser.receive_frames` that never stops it.
UNLIMITED_FRAMES: Final = -1

_FIN: Final = 0x80
_RSV_MASK: Final = 0x70
_MASK_BIT: Final = 0x80


def is_valid_close_code(code: int) -> bool:
    """Return whether ``code`` may appear in a Close frame on the wire (RFC 6455 §7.4)."""
    if 1000 <= code <= 1014:
        # 1004 is reserved ("the specific meaning might be defined in the future").
        return code != 1004 and code not in _LOCAL_ONLY_CODES
    return 3000 <= code <= 4999


def header_size(payload_bytes: int, masked: bool) -> int:
    """Return the size of the header of a frame carrying ``payload_bytes``."""
    if payload_bytes < 126:
        size = 2
    elif payload_bytes < 1 << 16:
        size = 4
    else:
        size = 10
    return size + 4 if masked else size


def write_header(
    buffer: WritableBuffer,
    end: int,
    opcode: Opcode,
    payload_bytes: int,
    mask_key: bytes | None,
    fin: bool = True,
) -> int:
    """Write a frame header into ``buffer`` so that it ends exactly at ``end``.

    The caller keeps the payload at ``buffer[end:end + payload_bytes]`` and reserved at
    least :data:`MAX_HEADER_BYTES` in front of it, so header and payload form one
    contiguous slice without a copy. Masking the payload is the caller's next step
    (:func:`mask_payload`), kept apart so it can run on the payload in place.

    Args:
        buffer: the caller's buffer.
        end: offset at which the payload starts.
        opcode: the frame's opcode.
        payload_bytes: the payload's length; must be below 2**63.
        mask_key: 4 bytes for a client frame, None for a server frame.
        fin: whether this is the final fragment of its message.

    Returns:
        The offset at which the header starts: send ``buffer[start:end + payload_bytes]``.

    Raises:
        LocalProtocolError: ``end`` leaves too little room, or the length is too large.
    """
    size = header_size(payload_bytes, mask_key is not None)
    start = end - size
    if start < 0:
        raise LocalProtocolError(f"header of {size} bytes does not fit in {end} bytes of room")
    first = (_FIN if fin else 0) | opcode
    mask_bit = _MASK_BIT if mask_key is not None else 0
    if payload_bytes < 126:
        struct.pack_into("!BB", buffer, start, first, mask_bit | payload_bytes)
        offset = start + 2
    elif payload_bytes < 1 << 16:
        struct.pack_into("!BBH", buffer, start, first, mask_bit | 126, payload_bytes)
        offset = start + 4
    elif payload_bytes < 1 << 63:
        struct.pack_into("!BBQ", buffer, start, first, mask_bit | 127, payload_bytes)
        offset = start + 10
    else:
        raise LocalProtocolError(f"payload of {payload_bytes} bytes exceeds 2**63 - 1")
    if mask_key is not None:
        buffer[offset : offset + 4] = mask_key
    return start


def mask_payload(buffer: WritableBuffer, start: int, stop: int, mask_key: bytes) -> None:
    """Mask ``buffer[start:stop]`` in place with ``mask_key``, from key phase 0."""
    apply_mask(memoryview(buffer)[start:stop], mask_key, 0)


def encode_frame(
    opcode: Opcode, payload: BytesLike, mask_key: bytes | None, fin: bool = True
) -> bytearray:
    """Encode one whole frame into a new buffer (control frames and tests; not hot).

    Raises:
        LocalProtocolError: a control frame longer than 125 bytes or fragmented.
    """
    if opcode >= Opcode.CLOSE and (len(payload) > MAX_CONTROL_PAYLOAD_BYTES or not fin):
        raise LocalProtocolError(
            f"control frame with {len(payload)} bytes exceeds limit of "
            f"{MAX_CONTROL_PAYLOAD_BYTES} bytes or is fragmented"
        )
    size = header_size(len(payload), mask_key is not None)
    frame = bytearray(size + len(payload))
    frame[size:] = payload
    write_header(frame, size, opcode, len(payload), mask_key, fin)
    if mask_key is not None:
        mask_payload(frame, size, len(frame), mask_key)
    return frame


def encode_close(code: int, reason: str, mask_key: bytes | None) -> bytearray:
    """Encode a Close frame with a status code and a UTF-8 reason (≤ 123 bytes)."""
    reason_bytes = reason.encode("utf-8")[: MAX_CONTROL_PAYLOAD_BYTES - 2]
    # Truncation may have cut a multi-byte character; drop the partial tail.
    reason_bytes = reason_bytes.decode("utf-8", "ignore").encode("utf-8")
    return encode_frame(Opcode.CLOSE, struct.pack("!H", code) + reason_bytes, mask_key)


class _State(IntEnum):
    HEADER = 0
    PAYLOAD = 1
    FAILED = 2


class FrameParser:
    """Incremental frame parser for one direction of one WebSocket.

    Feed it what the transport delivered with :meth:`receive`; it returns events in
    order. Data payloads come back as :class:`Payload` slices of the caller's own buffer,
    unmasked in place: the caller must consume (write) them before it reuses the buffer.
    A zero-length binary message becomes :class:`EndOfStream` (DESIGN.md §3 half-close).
    """

    def __init__(
        self,
        *,
        expect_masked: bool,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        """Create a parser.

        Args:
            expect_masked: True on the server side (RFC 6455 §5.1: "a client MUST mask
                all frames that it sends to the server"), False on the client side
                ("a server MUST NOT mask any frames").
            max_message_bytes: the largest message accepted; larger is closed with 1009.
        """
        self.expect_masked = expect_masked
        self.max_message_bytes = max_message_bytes
        self._state = _State.HEADER
        self._header = bytearray()
        # Current frame.
        self._opcode = Opcode.CONTINUATION
        self._fin = True
        self._remaining = 0
        self._mask_key: bytes | None = None
        self._mask_phase = 0
        self._control_payload = bytearray()
        # Current (possibly fragmented) data message: its length so far, or None.
        self._message_bytes: int | None = None
        #: The C fast path for data frames (None: the Python path does everything);
        #: an attribute so that tests can compare both paths on the same input.
        self._scan: ScanFunction | None = scan_data_frames
        #: Payload spans of the last fast-path call.
        self._spans: list[tuple[int, int]] = []

    @property
    def failed(self) -> bool:
        """Whether a violation was reported; the parser then ignores all input."""
        return self._state is _State.FAILED

    @property
    def mid_message(self) -> bool:
        """Whether a data message has started and not yet ended."""
        return self._message_bytes is not None or self._state is _State.PAYLOAD

    def receive(self, data: memoryview) -> list[FrameEvent]:
        """Parse ``data`` and return the events it completes.

        ``data`` must be writable when frames are masked: payloads are unmasked in place.
        This method never raises for anything the peer sent.
        """
        return self.receive_frames(data, UNLIMITED_FRAMES)[0]

    def receive_frames(self, data: memoryview, max_frames: int) -> tuple[list[FrameEvent], int]:
        """Parse at most ``max_frames`` frame headers of ``data``; return events and bytes used.

        Parsing stops before the header of frame ``max_frames + 1``; the payload of the
        last frame begun is still taken. The caller passes ``data[used:]`` later, before
        anything that follows it. Each tiny frame costs a few microseconds of Python,
        so a budget is what stops one read of them from holding the event loop (a
        1 MiB read holds ~175,000 frames of 6 bytes). After a violation all of ``data``
        counts as used (the parser ignores further input).
        """
        events: list[FrameEvent] = []
        position = 0
        length = len(data)
        frames = 0
        scan = self._scan
        while position < length and self._state is not _State.FAILED:
            if scan is not None and not self._header and self._opcode < Opcode.CLOSE:
                # Data frames in C (scan_data_frames); it stops before anything else.
                scanned, frames = self._scan_data_frames(scan, data, position, frames, max_frames)
                if scanned != position:
                    for start, stop in self._spans:
                        events.append(Payload(data[start:stop]))
                    position = scanned
                    continue
            if self._state is _State.HEADER:
                if frames == max_frames:
                    return events, position
                frames += 1
                position = self._parse_header(data, position, events)
            else:
                position = self._parse_payload(data, position, events)
        return events, length

    def _scan_data_frames(
        self,
        scan: ScanFunction,
        data: memoryview,
        position: int,
        frames: int,
        max_frames: int,
    ) -> tuple[int, int]:
        """Run the C fast path from ``position``; return where it stopped and the frames.

        Its payload spans are left in ``self._spans``. The parser's state is carried
        in and out, so the Python path takes over exactly where C stopped.
        """
        in_payload = self._state is _State.PAYLOAD
        message = self._message_bytes
        (
            scanned,
            remaining,
            key,
            phase,
            fin,
            message_bytes,
            headers,
            self._spans,
        ) = scan(
            data,
            position,
            self._remaining if in_payload else 0,
            self._mask_key if in_payload else None,
            self._mask_phase,
            self._fin,
            -1 if message is None else message,
            self.expect_masked,
            self.max_message_bytes,
            max_frames - frames,
        )
        if scanned == position:
            return position, frames
        if headers:
            self._opcode = Opcode.BINARY  # any data opcode: what follows tells only data
        self._remaining = remaining
        self._mask_key = key
        self._mask_phase = phase
        self._fin = fin
        self._message_bytes = None if message_bytes < 0 else message_bytes
        self._state = _State.PAYLOAD if remaining else _State.HEADER
        return scanned, frames + headers

    def _fail(self, events: list[FrameEvent], code: CloseCode, reason: str) -> int:
        self._state = _State.FAILED
        events.append(ProtocolViolation(code, reason))
        return 0

    def _parse_header(self, data: memoryview, position: int, events: list[FrameEvent]) -> int:
        header = self._header
        available = len(data) - position
        if not header and available >= MAX_HEADER_BYTES:
            # Fast path: the whole header is in this chunk; no copy into self._header.
            source: BytesLike = data
            base = position
        else:
            need = self._header_bytes_needed()
            take = min(need - len(header), available)
            header += data[position : position + take]
            position += take
            if len(header) < self._header_bytes_needed():
                return position
            source = header
            base = 0
        first, second = source[base], source[base + 1]
        size_code = second & 0x7F
        offset = base + 2
        if size_code == 126:
            (payload_bytes,) = struct.unpack_from("!H", source, offset)
            offset += 2
        elif size_code == 127:
            (payload_bytes,) = struct.unpack_from("!Q", source, offset)
            offset += 8
        else:
            payload_bytes = size_code
        masked = bool(second & _MASK_BIT)
        if masked:
            mask_key: bytes | None = bytes(source[offset : offset + 4])
            offset += 4
        else:
            mask_key = None
        if offset - base != header_size(payload_bytes, masked):
            # RFC 6455 §5.2: "the minimal number of bytes MUST be used to encode the
            # length" (wsproto fails such frames too).
            return self._fail(events, CloseCode.PROTOCOL_ERROR, "length not in its shortest form")
        if source is data:
            position = offset
        else:
            header.clear()
        return self._start_frame(first, masked, payload_bytes, mask_key, events, position)

    def _header_bytes_needed(self) -> int:
        """Header bytes needed given what self._header holds so far."""
        header = self._header
        if len(header) < 2:
            return 2
        size_code = header[1] & 0x7F
        extra = 2 if size_code == 126 else 8 if size_code == 127 else 0
        return 2 + extra + (4 if header[1] & _MASK_BIT else 0)

    def _start_frame(
        self,
        first: int,
        masked: bool,
        payload_bytes: int,
        mask_key: bytes | None,
        events: list[FrameEvent],
        position: int,
    ) -> int:
        if first & _RSV_MASK:
            # RFC 6455 §5.2: "If a nonzero value is received and none of the negotiated
            # extensions defines the meaning of such a nonzero value, the receiving
            # endpoint MUST _Fail the WebSocket Connection_." migrelay negotiates none.
            return self._fail(events, CloseCode.PROTOCOL_ERROR, "reserved bits set")
        if masked != self.expect_masked:
            return self._fail(
                events,
                CloseCode.PROTOCOL_ERROR,
                "unmasked client frame" if self.expect_masked else "masked server frame",
            )
        if payload_bytes >> 63:
            # §5.2: "the most significant bit MUST be 0".
            return self._fail(events, CloseCode.PROTOCOL_ERROR, "length with top bit set")
        fin = bool(first & _FIN)
        raw_opcode = first & 0x0F
        try:
            opcode = Opcode(raw_opcode)
        except ValueError:
            return self._fail(events, CloseCode.PROTOCOL_ERROR, f"reserved opcode {raw_opcode}")
        if opcode >= Opcode.CLOSE:
            if not fin:
                return self._fail(events, CloseCode.PROTOCOL_ERROR, "fragmented control frame")
            if payload_bytes > MAX_CONTROL_PAYLOAD_BYTES:
                return self._fail(
                    events,
                    CloseCode.PROTOCOL_ERROR,
                    f"control frame with {payload_bytes} bytes exceeds limit of "
                    f"{MAX_CONTROL_PAYLOAD_BYTES} bytes",
                )
        elif opcode is Opcode.TEXT:
            return self._fail(events, CloseCode.UNSUPPORTED_DATA, "text message")
        elif opcode is Opcode.CONTINUATION:
            if self._message_bytes is None:
                return self._fail(events, CloseCode.PROTOCOL_ERROR, "unexpected continuation")
        elif self._message_bytes is not None:
            return self._fail(
                events, CloseCode.PROTOCOL_ERROR, "new message before the previous one ended"
            )
        if opcode < Opcode.CLOSE:
            so_far = (self._message_bytes or 0) + payload_bytes
            if so_far > self.max_message_bytes:
                return self._fail(
                    events,
                    CloseCode.MESSAGE_TOO_BIG,
                    f"message with {so_far} bytes exceeds limit of {self.max_message_bytes} bytes",
                )
            self._message_bytes = so_far
        self._opcode = opcode
        self._fin = fin
        self._remaining = payload_bytes
        self._mask_key = mask_key
        self._mask_phase = 0
        self._state = _State.PAYLOAD
        if payload_bytes == 0:
            self._end_frame(events)
        return position

    def _parse_payload(self, data: memoryview, position: int, events: list[FrameEvent]) -> int:
        take = min(self._remaining, len(data) - position)
        chunk = data[position : position + take]
        if self._mask_key is not None:
            self._mask_phase = apply_mask(chunk, self._mask_key, self._mask_phase)
        self._remaining -= take
        if self._opcode >= Opcode.CLOSE:
            self._control_payload += chunk
        else:
            events.append(Payload(chunk))
        if self._remaining == 0:
            self._end_frame(events)
        return position + take

    def _end_frame(self, events: list[FrameEvent]) -> None:
        self._state = _State.HEADER
        opcode = self._opcode
        if opcode < Opcode.CLOSE:
            if self._fin:
                if self._message_bytes == 0:
                    events.append(EndOfStream())
                self._message_bytes = None
            return
        payload = bytes(self._control_payload)
        self._control_payload.clear()
        if opcode is Opcode.PING:
            events.append(PingReceived(payload))
        elif opcode is Opcode.PONG:
            events.append(PongReceived(payload))
        else:
            self._end_close_frame(payload, events)

    def _end_close_frame(self, payload: bytes, events: list[FrameEvent]) -> None:
        if not payload:
            events.append(CloseReceived(CloseCode.NO_STATUS_RCVD, ""))
            return
        if len(payload) == 1:
            self._fail(events, CloseCode.PROTOCOL_ERROR, "close frame with 1 byte of payload")
            return
        (code,) = struct.unpack_from("!H", payload)
        if not is_valid_close_code(code):
            self._fail(events, CloseCode.PROTOCOL_ERROR, f"invalid close code {code}")
            return
        try:
            reason = payload[2:].decode("utf-8")
        except UnicodeDecodeError:
            self._fail(events, CloseCode.INVALID_DATA, "close reason is not valid UTF-8")
            return
        events.append(CloseReceived(code, reason))
