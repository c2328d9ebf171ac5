"""The frame codec against wsproto as the reference implementation (DESIGN.md §4).

Every stream is checked in both directions: what migrelay encodes, wsproto decodes to the
same messages, and what wsproto encodes, migrelay decodes to the same bytes, for every
size class and for splits of the byte stream at every byte (small cases) or at random
(Hypothesis, large cases). Both decoders are reduced to the same normalised event list:
the data bytes between control events, EndOfStream for a zero-length message, and the
control frames themselves, because migrelay's parser reports a byte stream, not message
boundaries.

Violations are built by hand (:func:`raw_frame`), not with the codec under test, and the
close code is checked against RFC 6455 and, where it has an opinion, wsproto.
"""

from __future__ import annotations

import functools
import itertools
import random
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from wsproto.frame_protocol import (
    FrameProtocol,
    Opcode as WsOpcode,
    ParseFailed,
)

from migrelay.core import frames as frames_module
from migrelay.core.events import (
    CloseReceived,
    EndOfStream,
    Payload,
    PingReceived,
    PongReceived,
    ProtocolViolation,
)
from migrelay.core.frames import (
    MAX_HEADER_BYTES,
    CloseCode,
    FrameParser,
    Opcode,
    encode_close,
    encode_frame,
    header_size,
    is_valid_close_code,
    mask_payload,
    write_header,
)
from migrelay.core.mask import MASK_IMPLEMENTATION, apply_mask_python
from migrelay.errors import LocalProtocolError

KEY = bytes([0xA1, 0x5E, 0x00, 0x7F])


@pytest.fixture(autouse=True, scope="module", params=["c", "python"])
def mask_implementation(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run every test of this module with the C speedups and again with the fallback.

    Module-scoped (Hypothesis refuses function-scoped fixtures around ``@given``): the
    codec's module attributes (the mask, and the data-frame fast path a parser takes
    when it is made) are swapped for the whole module run and put back after.
    """
    namespace = vars(frames_module)  # the names the codec looks up
    saved = namespace["apply_mask"], namespace["scan_data_frames"]
    if request.param == "python":
        namespace["apply_mask"] = apply_mask_python
        namespace["scan_data_frames"] = None
    try:
        yield str(request.param)
    finally:
        namespace["apply_mask"], namespace["scan_data_frames"] = saved


def test_the_c_mask_is_what_the_codec_uses_by_default() -> None:
    assert MASK_IMPLEMENTATION == "c"  # the set-up builds it; the fallback is tested too


MIB = 1 << 20
#: RFC 6455 §5.2 length encodings: 7-bit (0-125), 16-bit (126-65535), 64-bit (65536+),
#: each at its boundaries, plus a message of 1 MiB and one just above it.
SIZE_CLASSES = [0, 1, 125, 126, 65535, 65536, MIB, MIB + 7]
SMALL_SIZES = [0, 1, 125, 126]
LARGE_SIZES = [65535, 65536, MIB, MIB + 7]
#: Big enough for every message these tests send.
LIMIT = 2 * MIB

HYPOTHESIS = settings(
    deadline=None,
    max_examples=40,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@functools.cache
def payload_of(size: int) -> bytes:
    """Deterministic pseudo-random payload (never all zeros, so masking shows)."""
    return random.Random(size).randbytes(size)


def reference_mask(data: bytes, key: bytes) -> bytes:
    """RFC 6455 §5.3, byte by byte; independent of migrelay.core.mask."""
    return bytes(byte ^ key[i % 4] for i, byte in enumerate(data))


# --- normalised events --------------------------------------------------------------


@dataclass(frozen=True)
class Data:
    """Data bytes received between two non-data events."""

    payload: bytes


@dataclass(frozen=True)
class Violation:
    """The decoder failed the connection with this close code."""

    code: int


Normalized = Data | EndOfStream | PingReceived | PongReceived | CloseReceived | Violation


def append_data(out: list[Normalized], payload: bytes) -> None:
    if not payload:
        return
    if out and isinstance(out[-1], Data):
        out[-1] = Data(out[-1].payload + payload)
    else:
        out.append(Data(payload))


def split(stream: bytes, cuts: Iterable[int]) -> list[bytes]:
    """Cut ``stream`` at the given offsets (in any order, repeats allowed)."""
    bounds = [0, *sorted(cuts), len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


def bytewise(stream: bytes) -> list[bytes]:
    return [stream[i : i + 1] for i in range(len(stream))]


def migrelay_decode(
    chunks: Iterable[bytes], *, expect_masked: bool, max_message_bytes: int = LIMIT
) -> list[Normalized]:
    """Decode with FrameParser, each chunk in a fresh writable buffer (as recv_into)."""
    parser = FrameParser(expect_masked=expect_masked, max_message_bytes=max_message_bytes)
    out: list[Normalized] = []
    for chunk in chunks:
        buffer = bytearray(chunk)
        for event in parser.receive(memoryview(buffer)):
            if isinstance(event, Payload):
                # Streamed, not accumulated: the payload is a slice of our own buffer.
                assert event.data.obj is buffer
                append_data(out, bytes(event.data))
            elif isinstance(event, ProtocolViolation):
                out.append(Violation(event.code))
            else:
                out.append(event)
    return out


def wsproto_decode(chunks: Iterable[bytes], *, client: bool) -> list[Normalized]:
    """Decode with wsproto's FrameProtocol, reduced to the same normalised events."""
    protocol = FrameProtocol(client=client, extensions=[])
    out: list[Normalized] = []
    message_bytes = 0
    try:
        for chunk in chunks:
            protocol.receive_bytes(chunk)
            for frame in protocol.received_frames():
                payload = frame.payload
                if frame.opcode in (WsOpcode.BINARY, WsOpcode.CONTINUATION):
                    assert isinstance(payload, bytes)
                    append_data(out, payload)
                    message_bytes += len(payload)
                    if frame.message_finished:
                        if message_bytes == 0:
                            out.append(EndOfStream())
                        message_bytes = 0
                elif frame.opcode is WsOpcode.PING:
                    assert isinstance(payload, bytes)
                    out.append(PingReceived(payload))
                elif frame.opcode is WsOpcode.PONG:
                    assert isinstance(payload, bytes)
                    out.append(PongReceived(payload))
                elif frame.opcode is WsOpcode.CLOSE:
                    assert isinstance(payload, tuple)
                    code, reason = payload
                    out.append(CloseReceived(int(code), reason))
                else:
                    raise AssertionError(f"unexpected frame {frame!r}")
    except ParseFailed as exc:
        out.append(Violation(int(exc.code)))
    return out


# --- scripted streams ---------------------------------------------------------------


@dataclass(frozen=True)
class Fragment:
    """One data frame: the first of a message is BINARY, the rest CONTINUATION."""

    payload: bytes
    first: bool
    fin: bool


@dataclass(frozen=True)
class Control:
    opcode: Opcode  # PING or PONG
    payload: bytes


@dataclass(frozen=True)
class Close:
    code: int
    reason: str


Step = Fragment | Control | Close


def message(*fragments: bytes) -> list[Step]:
    """A binary message in the given fragments."""
    last = len(fragments) - 1
    return [Fragment(p, first=i == 0, fin=i == last) for i, p in enumerate(fragments)]


def migrelay_frame(
    opcode: Opcode, payload: bytes, mask_key: bytes | None, fin: bool = True
) -> bytes:
    """Encode as the relay does: header into reserved room, then mask in place."""
    room = MAX_HEADER_BYTES
    buffer = bytearray(room + len(payload))
    buffer[room:] = payload
    start = write_header(buffer, room, opcode, len(payload), mask_key, fin)
    if mask_key is not None:
        mask_payload(buffer, room, len(buffer), mask_key)
    return bytes(buffer[start:])


def migrelay_encode(steps: Sequence[Step], *, masked: bool) -> bytes:
    key = KEY if masked else None
    out = bytearray()
    for step in steps:
        if isinstance(step, Fragment):
            opcode = Opcode.BINARY if step.first else Opcode.CONTINUATION
            out += migrelay_frame(opcode, step.payload, key, step.fin)
        elif isinstance(step, Control):
            out += encode_frame(step.opcode, step.payload, key)
        else:
            out += encode_close(step.code, step.reason, key)
    return bytes(out)


def wsproto_encode(steps: Sequence[Step], *, client: bool) -> bytes:
    protocol = FrameProtocol(client=client, extensions=[])
    out = bytearray()
    for step in steps:
        if isinstance(step, Fragment):
            out += protocol.send_data(step.payload, fin=step.fin)
        elif isinstance(step, Control):
            send = protocol.ping if step.opcode is Opcode.PING else protocol.pong
            out += send(step.payload)
        else:
            out += protocol.close(step.code, step.reason)
    return bytes(out)


def expected_events(steps: Sequence[Step]) -> list[Normalized]:
    out: list[Normalized] = []
    message_bytes = 0
    for step in steps:
        if isinstance(step, Fragment):
            append_data(out, step.payload)
            message_bytes += len(step.payload)
            if step.fin:
                if message_bytes == 0:
                    out.append(EndOfStream())
                message_bytes = 0
        elif isinstance(step, Control):
            event = PingReceived if step.opcode is Opcode.PING else PongReceived
            out.append(event(step.payload))
        else:
            out.append(CloseReceived(step.code, step.reason))
    return out


def check_both_directions(steps: Sequence[Step], chunker: Callable[[bytes], list[bytes]]) -> None:
    """Both codecs agree on ``steps`` whichever side encodes, masked and unmasked."""
    expected = expected_events(steps)
    for masked in (True, False):
        # migrelay encodes, wsproto decodes (the client sends masked frames).
        ours = migrelay_encode(steps, masked=masked)
        assert wsproto_decode(chunker(ours), client=not masked) == expected
        assert migrelay_decode(chunker(ours), expect_masked=masked) == expected
        # wsproto encodes, migrelay decodes.
        theirs = wsproto_encode(steps, client=masked)
        assert migrelay_decode(chunker(theirs), expect_masked=masked) == expected


def whole(stream: bytes) -> list[bytes]:
    return [stream]


# --- round trips --------------------------------------------------------------------


@pytest.mark.parametrize("size", SIZE_CLASSES)
def test_single_message_of_each_size_class_round_trips_whole(size: int) -> None:
    check_both_directions(message(payload_of(size)), whole)


@pytest.mark.parametrize("size", SMALL_SIZES)
def test_small_message_round_trips_split_at_every_byte(size: int) -> None:
    steps = [*message(payload_of(size)), Control(Opcode.PING, b"p"), *message(b"tail")]
    expected = expected_events(steps)
    for masked in (True, False):
        streams = [migrelay_encode(steps, masked=masked), wsproto_encode(steps, client=masked)]
        for stream in streams:
            for cut in range(len(stream) + 1):
                chunks = split(stream, [cut])
                assert migrelay_decode(chunks, expect_masked=masked) == expected, cut
                assert wsproto_decode(chunks, client=not masked) == expected, cut
            assert migrelay_decode(bytewise(stream), expect_masked=masked) == expected


@pytest.mark.parametrize("size", LARGE_SIZES)
def test_large_message_round_trips_split_inside_its_header(size: int) -> None:
    # Every cut inside the longest (14-byte) header and the first payload bytes, and
    # just before the end, so each header field is seen arriving in pieces.
    def chunker(stream: bytes) -> list[bytes]:
        return split(stream, [3, 7, 11, 13, 17, len(stream) - 1])

    check_both_directions(message(payload_of(size)), chunker)
    for cut in range(MAX_HEADER_BYTES + 2):
        check_both_directions(message(payload_of(size)), functools.partial(split, cuts=[cut]))


@HYPOTHESIS
@given(
    size=st.sampled_from(LARGE_SIZES),
    # Cuts as fractions of the stream, so that every size gets as many as the largest
    # (absolute offsets up to 1 MiB would mostly fall beyond a 64 KiB stream).
    fractions=st.lists(st.floats(min_value=0.0, max_value=1.0), max_size=12),
)
def test_large_message_round_trips_split_at_random(size: int, fractions: list[float]) -> None:
    steps = message(payload_of(size))
    check_both_directions(steps, lambda s: split(s, [round(f * len(s)) for f in fractions]))


def test_fragmented_message_arrives_as_its_concatenated_bytes() -> None:
    steps = message(b"first ", payload_of(200), b"", payload_of(70000), b" last")
    check_both_directions(steps, whole)
    check_both_directions(steps, lambda s: split(s, range(0, len(s), 997)))


def test_control_frames_interleaved_in_a_fragmented_message_are_reported_in_order() -> None:
    steps: list[Step] = [
        Fragment(b"abc", first=True, fin=False),
        Control(Opcode.PING, b"ping-1"),
        Fragment(payload_of(300), first=False, fin=False),
        Control(Opcode.PONG, b""),
        Control(Opcode.PING, payload_of(125)),
        Fragment(b"xyz", first=False, fin=True),
        *message(b"next"),
        Close(1000, "done"),
    ]
    events = expected_events(steps)
    assert events == [
        Data(b"abc"),
        PingReceived(b"ping-1"),
        Data(payload_of(300)),
        PongReceived(b""),
        PingReceived(payload_of(125)),
        Data(b"xyznext"),
        CloseReceived(1000, "done"),
    ]
    check_both_directions(steps, whole)
    check_both_directions(steps, bytewise)


def test_every_pair_of_cuts_of_a_fragmented_stream_decodes_the_same() -> None:
    steps: list[Step] = [
        Fragment(b"ab", first=True, fin=False),
        Control(Opcode.PING, b"hi"),
        Fragment(b"cd", first=False, fin=True),
        *message(b""),
    ]
    expected = expected_events(steps)
    for masked in (True, False):
        stream = migrelay_encode(steps, masked=masked)
        for first in range(len(stream) + 1):
            for second in range(first, len(stream) + 1):
                chunks = split(stream, [first, second])
                assert migrelay_decode(chunks, expect_masked=masked) == expected


def test_zero_length_binary_message_is_end_of_stream() -> None:
    for masked in (True, False):
        stream = migrelay_encode(message(b""), masked=masked)
        parser = FrameParser(expect_masked=masked)
        assert parser.receive(memoryview(bytearray(stream))) == [EndOfStream()]
    check_both_directions(message(b""), whole)


def test_fragmented_message_of_zero_bytes_is_one_end_of_stream() -> None:
    steps = message(b"", b"", b"")
    assert expected_events(steps) == [EndOfStream()]
    check_both_directions(steps, whole)


def test_message_starting_with_an_empty_fragment_is_not_end_of_stream() -> None:
    steps = message(b"", b"data")
    assert expected_events(steps) == [Data(b"data")]
    check_both_directions(steps, bytewise)


def test_masked_payload_is_unmasked_in_place_in_the_callers_buffer() -> None:
    payload = payload_of(1000)
    buffer = bytearray(migrelay_frame(Opcode.BINARY, payload, KEY))
    assert buffer[-1000:] != payload
    events = FrameParser(expect_masked=True).receive(memoryview(buffer))
    assert len(events) == 1
    assert isinstance(events[0], Payload)
    assert events[0].data.obj is buffer
    assert buffer[-1000:] == payload


def test_long_frame_is_streamed_in_slices_of_each_chunk() -> None:
    stream = migrelay_frame(Opcode.BINARY, payload_of(MIB), KEY)
    parser = FrameParser(expect_masked=True)
    received = bytearray()
    for chunk in split(stream, range(0, len(stream), 65536)):
        buffer = bytearray(chunk)
        events = parser.receive(memoryview(buffer))
        assert all(isinstance(e, Payload) and e.data.obj is buffer for e in events)
        for event in events:
            assert isinstance(event, Payload)
            received += event.data
    assert received == payload_of(MIB)
    assert not parser.mid_message


def test_mid_message_is_true_only_between_first_and_final_fragment() -> None:
    parser = FrameParser(expect_masked=False)
    seen = [parser.mid_message]
    parser.receive(memoryview(bytearray(migrelay_frame(Opcode.BINARY, b"ab", None, fin=False))))
    seen.append(parser.mid_message)
    parser.receive(memoryview(bytearray(migrelay_frame(Opcode.PING, b"", None))))
    seen.append(parser.mid_message)
    parser.receive(memoryview(bytearray(migrelay_frame(Opcode.CONTINUATION, b"cd", None))))
    seen.append(parser.mid_message)
    assert seen == [False, True, True, False]


@dataclass(frozen=True)
class _Script:
    steps: list[Step]


def _fragmented_message(fragments: list[bytes], controls: list[list[Control]]) -> list[Step]:
    steps: list[Step] = []
    for index, fragment in enumerate(message(*fragments)):
        steps.append(fragment)
        if index < len(fragments) - 1 and index < len(controls):
            steps.extend(controls[index])
    return steps


_payloads = st.one_of(
    st.binary(max_size=300),
    st.sampled_from([0, 1, 125, 126, 4000, 65535, 65536]).map(payload_of),
)
_controls = st.builds(
    Control, st.sampled_from([Opcode.PING, Opcode.PONG]), st.binary(max_size=125)
)
_messages = st.builds(
    _fragmented_message,
    st.lists(_payloads, min_size=1, max_size=4),
    st.lists(st.lists(_controls, max_size=2), max_size=3),
)
_scripts = st.builds(
    lambda messages, close: _Script(
        [step for m in messages for step in m] + ([close] if close else [])
    ),
    st.lists(_messages, min_size=1, max_size=4),
    st.none()
    | st.builds(
        Close,
        st.sampled_from([1000, 1001, 1008, 1011, 3000, 4000, 4999]),
        st.text(max_size=30),  # at most 120 bytes: never truncated,
    ),
)


@HYPOTHESIS
@given(script=_scripts, data=st.data())
def test_random_streams_round_trip_with_random_splits(
    script: _Script, data: st.DataObject
) -> None:
    def chunker(stream: bytes) -> list[bytes]:
        cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=10), label="cuts")
        return split(stream, cuts)

    check_both_directions(script.steps, chunker)


# --- encoder ------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536])
@pytest.mark.parametrize("fin", [True, False])
def test_unmasked_frame_is_byte_identical_to_wsproto(size: int, fin: bool) -> None:
    ours = migrelay_frame(Opcode.BINARY, payload_of(size), None, fin)
    theirs = FrameProtocol(client=False, extensions=[]).send_data(payload_of(size), fin=fin)
    assert ours == theirs


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536])
def test_masked_frame_is_byte_identical_to_wsproto_with_the_same_key(
    size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("wsproto.frame_protocol.os.urandom", lambda n: KEY[:n])
    ours = migrelay_frame(Opcode.BINARY, payload_of(size), KEY)
    theirs = FrameProtocol(client=True, extensions=[]).send_data(payload_of(size))
    assert ours == theirs
    assert ours == encode_frame(Opcode.BINARY, payload_of(size), KEY)


@pytest.mark.parametrize(
    ("size", "masked", "expected"),
    [
        (0, False, 2),
        (125, False, 2),
        (126, False, 4),
        (65535, False, 4),
        (65536, False, 10),
        (0, True, 6),
        (126, True, 8),
        (65536, True, 14),
    ],
)
def test_header_size_follows_the_length_encoding(size: int, masked: bool, expected: int) -> None:
    assert header_size(size, masked) == expected


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536])
@pytest.mark.parametrize("mask_key", [None, KEY])
def test_write_header_with_too_little_room_raises_and_writes_nothing(
    size: int, mask_key: bytes | None
) -> None:
    needed = header_size(size, mask_key is not None)
    buffer = bytearray(b"\xee" * needed)
    with pytest.raises(LocalProtocolError, match=f"header of {needed} bytes"):
        write_header(buffer, needed - 1, Opcode.BINARY, size, mask_key)
    assert buffer == b"\xee" * needed
    assert write_header(buffer, needed, Opcode.BINARY, size, mask_key) == 0


def test_write_header_ends_exactly_at_the_payload() -> None:
    buffer = bytearray(b"\xee" * 20 + b"payload")
    start = write_header(buffer, 20, Opcode.BINARY, 7, None)
    assert start == 18
    assert buffer[:18] == b"\xee" * 18
    assert bytes(buffer[start:]) == b"\x82\x07payload"


def test_write_header_refuses_a_length_of_2_to_the_63() -> None:
    buffer = bytearray(MAX_HEADER_BYTES)
    with pytest.raises(LocalProtocolError, match="exceeds 2"):
        write_header(buffer, MAX_HEADER_BYTES, Opcode.BINARY, 1 << 63, None)


def test_encode_frame_refuses_control_frame_over_125_bytes() -> None:
    with pytest.raises(LocalProtocolError, match="126 bytes"):
        encode_frame(Opcode.PING, bytes(126), None)
    assert len(encode_frame(Opcode.PING, bytes(125), None)) == 127


def test_encode_frame_refuses_fragmented_control_frame() -> None:
    with pytest.raises(LocalProtocolError, match="fragmented"):
        encode_frame(Opcode.PONG, b"", KEY, fin=False)


def test_encode_close_matches_wsproto_for_a_short_reason() -> None:
    ours = encode_close(1001, "going away", None)
    assert ours == FrameProtocol(client=False, extensions=[]).close(1001, "going away")


@pytest.mark.parametrize("char", ["é", "€", "😀"])
@pytest.mark.parametrize("ascii_prefix", range(4))
def test_encode_close_truncates_long_reason_without_splitting_a_character(
    char: str, ascii_prefix: int
) -> None:
    reason = "a" * ascii_prefix + char * 100
    frame = encode_close(4000, reason, None)
    assert len(frame) <= 2 + 125
    events = migrelay_decode([bytes(frame)], expect_masked=False)
    assert len(events) == 1
    received = events[0]
    assert isinstance(received, CloseReceived)
    assert received.code == 4000
    assert reason.startswith(received.reason)
    encoded = len(received.reason.encode("utf-8"))
    # The longest whole-character prefix that fits in 123 bytes, not a shorter one.
    assert 123 - len(char.encode("utf-8")) < encoded <= 123
    assert frame == FrameProtocol(client=False, extensions=[]).close(4000, reason)


# --- violations ---------------------------------------------------------------------


def raw_frame(
    first: int,
    payload: bytes = b"",
    *,
    mask_key: bytes | None = None,
    length: int | None = None,
) -> bytes:
    """Build a frame by hand: ``first`` is the FIN/RSV/opcode byte as sent."""
    size = len(payload) if length is None else length
    mask_bit = 0x80 if mask_key is not None else 0
    if size < 126:
        header = bytes([first, mask_bit | size])
    elif size < 1 << 16:
        header = bytes([first, mask_bit | 126]) + struct.pack("!H", size)
    else:
        header = bytes([first, mask_bit | 127]) + struct.pack("!Q", size)
    if mask_key is None:
        return header + payload
    return header + mask_key + reference_mask(payload, mask_key)


FIN = 0x80


def close_payload(code: int, reason: bytes = b"") -> bytes:
    return struct.pack("!H", code) + reason


@dataclass(frozen=True)
class ViolationCase:
    build: Callable[[bytes | None], bytes]
    code: int
    #: Whether wsproto fails the same stream with the same code.
    wsproto_agrees: bool = True


def one_frame(first: int, payload: bytes, code: int, wsproto_agrees: bool = True) -> ViolationCase:
    """A violation carried by a single frame."""
    return ViolationCase(lambda key: raw_frame(first, payload, mask_key=key), code, wsproto_agrees)


def frames(*parts: tuple[int, bytes], code: int) -> ViolationCase:
    """A violation that needs the frames before it (``parts`` are (first, payload))."""
    return ViolationCase(
        lambda key: b"".join(raw_frame(f, p, mask_key=key) for f, p in parts), code
    )


VIOLATIONS: dict[str, ViolationCase] = {
    **{f"rsv{bit}": one_frame(FIN | (0x80 >> bit) | 0x2, b"x", 1002) for bit in (1, 2, 3)},
    **{
        f"reserved-opcode-{op}": one_frame(FIN | op, b"x", 1002)
        for op in [3, 4, 5, 6, 7, 11, 12, 13, 14, 15]
    },
    **{
        f"{name}-over-125-bytes": one_frame(FIN | op, bytes(126), 1002)
        for name, op in [("ping", 0x9), ("pong", 0xA), ("close", 0x8)]
    },
    **{
        f"fragmented-{name}": one_frame(op, b"", 1002)
        for name, op in [("ping", 0x9), ("pong", 0xA), ("close", 0x8)]
    },
    "continuation-without-start": one_frame(FIN | 0x0, b"x", 1002),
    "continuation-after-finished-message": frames((FIN | 0x2, b"a"), (FIN | 0x0, b"b"), code=1002),
    "new-message-during-fragmented-one": frames((0x2, b"a"), (FIN | 0x2, b"b"), code=1002),
    "new-message-after-interleaved-ping": frames(
        (0x2, b"a"), (FIN | 0x9, b"p"), (0x2, b"b"), code=1002
    ),
    # Header only: the parser must fail before any payload arrives.
    "64-bit-length-with-top-bit-set": ViolationCase(
        lambda key: raw_frame(FIN | 0x2, mask_key=key, length=(1 << 63) | 70000), 1002
    ),
    "close-with-1-byte-payload": one_frame(FIN | 0x8, b"\x03", 1002),
    **{
        f"close-code-{code}": one_frame(FIN | 0x8, close_payload(code), 1002)
        for code in [0, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535]
    },
    "close-reason-not-utf8": one_frame(FIN | 0x8, close_payload(1000, b"ok\xff"), 1007),
    "close-reason-truncated-utf8": one_frame(
        FIN | 0x8, close_payload(1000, "€".encode()[:2]), 1007
    ),
    # migrelay carries binary data only (DESIGN.md §3); wsproto accepts text.
    "text-message": one_frame(FIN | 0x1, b"hello", 1003, wsproto_agrees=False),
    "fragmented-text-message": one_frame(0x1, b"he", 1003, wsproto_agrees=False),
}


def assert_fails_once(events: list[Normalized], code: int) -> None:
    """The stream ends in exactly one violation with ``code``, nothing after it."""
    violations = [e for e in events if isinstance(e, Violation)]
    assert violations == [Violation(code)]
    assert events[-1] == Violation(code)


@pytest.mark.parametrize("masked", [True, False], ids=["server-side", "client-side"])
@pytest.mark.parametrize("name", sorted(VIOLATIONS))
def test_violation_closes_with_its_code_whole_and_byte_by_byte(name: str, masked: bool) -> None:
    case = VIOLATIONS[name]
    stream = case.build(KEY if masked else None)
    for chunks in (whole(stream), bytewise(stream)):
        assert_fails_once(migrelay_decode(chunks, expect_masked=masked), case.code)
    if case.wsproto_agrees:
        assert_fails_once(wsproto_decode(whole(stream), client=not masked), case.code)


@pytest.mark.parametrize("name", sorted(VIOLATIONS))
def test_parser_ignores_all_input_after_a_violation(name: str) -> None:
    parser = FrameParser(expect_masked=True)
    events = parser.receive(memoryview(bytearray(VIOLATIONS[name].build(KEY))))
    assert isinstance(events[-1], ProtocolViolation)
    assert parser.failed
    valid = migrelay_frame(Opcode.BINARY, b"more", KEY) + encode_frame(Opcode.PING, b"", KEY)
    assert parser.receive(memoryview(bytearray(valid))) == []
    assert parser.receive(memoryview(bytearray(b"\xff" * 20))) == []
    assert parser.failed


def test_unmasked_frame_sent_to_server_is_protocol_error() -> None:
    stream = raw_frame(FIN | 0x2, b"data")
    assert migrelay_decode([stream], expect_masked=True) == [Violation(1002)]
    assert wsproto_decode([stream], client=False) == [Violation(1002)]


def test_masked_frame_sent_to_client_is_protocol_error() -> None:
    stream = raw_frame(FIN | 0x2, b"data", mask_key=KEY)
    assert migrelay_decode([stream], expect_masked=False) == [Violation(1002)]
    assert wsproto_decode([stream], client=True) == [Violation(1002)]


def test_masking_mismatch_on_a_control_frame_is_protocol_error() -> None:
    assert migrelay_decode([raw_frame(FIN | 0x9, b"p")], expect_masked=True) == [Violation(1002)]
    assert migrelay_decode([raw_frame(FIN | 0x9, b"p", mask_key=KEY)], expect_masked=False) == [
        Violation(1002)
    ]


def test_violation_reports_the_events_before_it() -> None:
    stream = (
        raw_frame(FIN | 0x9, b"p", mask_key=KEY)
        + raw_frame(0x2, b"abc", mask_key=KEY)
        + raw_frame(FIN | 0x1, b"text", mask_key=KEY)
    )
    expected = [PingReceived(b"p"), Data(b"abc"), Violation(1003)]
    assert migrelay_decode([stream], expect_masked=True) == expected
    assert migrelay_decode(bytewise(stream), expect_masked=True) == expected


@pytest.mark.parametrize(
    "code", [1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 3000, 3999, 4000]
)
def test_valid_close_code_is_accepted_like_wsproto(code: int) -> None:
    stream = raw_frame(FIN | 0x8, close_payload(code, "bye ✓".encode()), mask_key=KEY)
    expected: list[Normalized] = [CloseReceived(code, "bye ✓")]
    assert migrelay_decode([stream], expect_masked=True) == expected
    assert migrelay_decode(bytewise(stream), expect_masked=True) == expected
    assert wsproto_decode([stream], client=False) == expected


@pytest.mark.parametrize("code", [1014, 4999])
def test_close_code_unknown_to_wsproto_but_allowed_by_the_registry_is_accepted(
    code: int,
) -> None:
    # 1014 is IANA's "Bad Gateway"; 4999 is the top of the private range. wsproto
    # refuses 1014 (it only knows the codes it names) but accepts 4999.
    stream = raw_frame(FIN | 0x8, close_payload(code), mask_key=KEY)
    assert migrelay_decode([stream], expect_masked=True) == [CloseReceived(code, "")]


def test_close_without_payload_reports_1005() -> None:
    stream = raw_frame(FIN | 0x8, mask_key=KEY)
    expected: list[Normalized] = [CloseReceived(CloseCode.NO_STATUS_RCVD, "")]
    assert migrelay_decode([stream], expect_masked=True) == expected
    assert wsproto_decode([stream], client=False) == expected


def test_is_valid_close_code_agrees_with_rfc_6455_section_7_4() -> None:
    # 1000-1014 as registered with IANA, minus 1004 (reserved) and the three that
    # "MUST NOT be set" (1005, 1006, 1015); then 3000-4999 for libraries and private use.
    registered = {1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014}
    for code in range(1 << 16):
        assert is_valid_close_code(code) == (code in registered or 3000 <= code <= 4999), code


def test_message_over_the_limit_in_one_frame_is_1009() -> None:
    stream = raw_frame(FIN | 0x2, bytes(101), mask_key=KEY)
    assert migrelay_decode([stream], expect_masked=True, max_message_bytes=100) == [
        Violation(1009)
    ]


def test_message_at_the_limit_is_accepted_and_the_limit_is_per_message() -> None:
    stream = raw_frame(FIN | 0x2, bytes(100), mask_key=KEY) * 2
    events = migrelay_decode(bytewise(stream), expect_masked=True, max_message_bytes=100)
    assert events == [Data(bytes(200))]


def test_message_over_the_limit_across_fragments_is_1009() -> None:
    stream = (
        raw_frame(0x2, bytes(60), mask_key=KEY)
        + raw_frame(FIN | 0x9, b"p", mask_key=KEY)
        + raw_frame(0x0, bytes(30), mask_key=KEY)
        + raw_frame(FIN | 0x0, bytes(11), mask_key=KEY)
    )
    for chunks in (whole(stream), bytewise(stream)):
        events = migrelay_decode(chunks, expect_masked=True, max_message_bytes=100)
        assert events == [Data(bytes(60)), PingReceived(b"p"), Data(bytes(30)), Violation(1009)]


def test_fragments_summing_to_the_limit_are_accepted() -> None:
    stream = raw_frame(0x2, bytes(60), mask_key=KEY) + raw_frame(FIN, bytes(40), mask_key=KEY)
    events = migrelay_decode([stream], expect_masked=True, max_message_bytes=100)
    assert events == [Data(bytes(100))]


def test_control_frames_do_not_count_towards_the_message_limit() -> None:
    stream = (
        raw_frame(0x2, bytes(90), mask_key=KEY)
        + raw_frame(FIN | 0x9, bytes(125), mask_key=KEY)
        + raw_frame(FIN, bytes(10), mask_key=KEY)
    )
    events = migrelay_decode([stream], expect_masked=True, max_message_bytes=100)
    assert events == [Data(bytes(90)), PingReceived(bytes(125)), Data(bytes(10))]


def test_oversized_frame_fails_at_its_header_before_the_payload_arrives() -> None:
    header = raw_frame(FIN | 0x2, length=1 << 40)
    assert migrelay_decode([header], expect_masked=False) == [Violation(1009)]


def test_default_limit_is_1_mib() -> None:
    ok = raw_frame(FIN | 0x2, length=MIB)
    too_big = raw_frame(FIN | 0x2, length=MIB + 1)
    assert FrameParser(expect_masked=False).receive(memoryview(bytearray(ok))) == []
    events = FrameParser(expect_masked=False).receive(memoryview(bytearray(too_big)))
    assert events == [
        ProtocolViolation(1009, f"message with {MIB + 1} bytes exceeds limit of {MIB} bytes")
    ]


@HYPOTHESIS
@given(
    prefix=st.sampled_from([b"", raw_frame(0x2, b"abc"), raw_frame(FIN | 0x9, b"p")]),
    garbage=st.binary(max_size=200),
    masked=st.booleans(),
    data=st.data(),
)
def test_receive_never_raises_and_reports_at_most_one_violation_last(
    prefix: bytes, garbage: bytes, masked: bool, data: st.DataObject
) -> None:
    if masked and prefix:
        prefix = raw_frame(prefix[0], prefix[2:], mask_key=KEY)
    stream = prefix + garbage
    cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=8))
    parser = FrameParser(expect_masked=masked, max_message_bytes=1000)
    seen_violation = False
    for chunk in split(stream, cuts):
        events = parser.receive(memoryview(bytearray(chunk)))
        if seen_violation:
            assert events == []
        violations = [e for e in events if isinstance(e, ProtocolViolation)]
        assert len(violations) <= 1
        if violations:
            assert events[-1] is violations[0]
            seen_violation = True
    assert parser.failed == seen_violation


@pytest.mark.parametrize(
    "header",
    [
        b"\x82\x7e\x00\x05",  # 5 bytes in the 16-bit form
        b"\x82\x7f\x00\x00\x00\x00\x00\x00\x00\x05",  # 5 bytes in the 64-bit form
        b"\x82\x7f\x00\x00\x00\x00\x00\x00\xff\xff",  # 65535 bytes in the 64-bit form
    ],
)
def test_length_not_in_its_shortest_form_is_a_protocol_error(header: bytes) -> None:
    parser = FrameParser(expect_masked=False)
    events = parser.receive(memoryview(bytearray(header + b"hello")))
    assert events == [
        ProtocolViolation(CloseCode.PROTOCOL_ERROR, "length not in its shortest form")
    ]
    # The same frame fed one byte at a time fails the same way.
    bytewise = FrameParser(expect_masked=False)
    found = [e for b in header for e in bytewise.receive(memoryview(bytearray([b])))]
    assert found == events


def test_shortest_form_boundaries_are_accepted() -> None:
    parser = FrameParser(expect_masked=False, max_message_bytes=1 << 17)
    for size in (125, 126, 65535, 65536):
        frame = encode_frame(Opcode.BINARY, bytes(size), None)
        events = parser.receive(memoryview(frame))
        assert sum(len(e.data) for e in events if isinstance(e, Payload)) == size
