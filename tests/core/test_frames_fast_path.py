"""The C fast path for data frames (``scan_data_frames``) against the Python parser.

The Python parser is the reference: both parse the same streams, cut at the same
points, with the same per-call frame budgets, and must give the same events (payload
bytes included), the same bytes used per call and the same final state. The streams
mix what the fast path takes (binary and continuation frames of every length class,
masked as the side expects) with everything it must leave to Python: control frames,
empty frames and end of stream, text, reserved bits and opcodes, wrong masking,
lengths not in their shortest form or with the top bit set, messages over the limit.
"""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from migrelay.core.events import FrameEvent, Payload
from migrelay.core.frames import FrameParser, Opcode, encode_frame
from migrelay.core.mask import scan_data_frames

MAX_MESSAGE = 300_000


def _parser(expect_masked: bool, fast: bool) -> FrameParser:
    parser = FrameParser(expect_masked=expect_masked, max_message_bytes=MAX_MESSAGE)
    if not fast:
        parser._scan = None
    return parser


def _header(first: int, second: int, extended: bytes = b"") -> bytes:
    return bytes([first, second]) + extended


def _odd_frame(kind: int, masked: bool, rng: random.Random) -> bytes:
    """A frame the fast path must not take (or an edge it must take exactly)."""
    mask_bit = 0x80 if masked else 0
    key = rng.randbytes(4) if masked else b""
    if kind == 0:  # a length of 5 in the 16-bit form: not its shortest form
        return _header(0x82, mask_bit | 126, struct.pack("!H", 5)) + key + b"x" * 5
    if kind == 1:  # a length with the top bit set
        return _header(0x82, mask_bit | 127, struct.pack("!Q", 1 << 63)) + key
    if kind == 2:  # reserved bit
        return _header(0xC2, mask_bit | 3) + key + b"abc"
    if kind == 3:  # reserved opcode
        return _header(0x83, mask_bit | 1) + key + b"z"
    if kind == 4:  # the other side's masking
        return _header(0x82, (0x80 - mask_bit) | 2) + (b"" if masked else b"kkkk") + b"zz"
    if kind == 5:  # text
        return bytes(encode_frame(Opcode.TEXT, b"hi", key or None))
    if kind == 6:  # a message over the limit, in one frame
        size = MAX_MESSAGE + 1
        return _header(0x82, mask_bit | 127, struct.pack("!Q", size)) + key
    if kind == 7:  # a continuation with no message begun, or a binary inside one
        return bytes(encode_frame(Opcode.CONTINUATION, b"abc", key or None))
    if kind == 8:  # a 16-bit length at its smallest
        return bytes(encode_frame(Opcode.BINARY, rng.randbytes(126), key or None))
    raise AssertionError(kind)


@st.composite
def streams(draw: st.DrawFn) -> tuple[bool, bytes, list[int], list[int]]:
    """A stream of frames, the points to cut it at, and a frame budget per call."""
    masked = draw(st.booleans())
    rng = random.Random(draw(st.integers(0, 2**32)))
    out = bytearray()
    for _ in range(draw(st.integers(1, 12))):
        key = rng.randbytes(4) if masked else None
        choice = draw(st.integers(0, 9))
        if choice <= 3:  # a whole message, maybe fragmented, of any length class
            size = draw(st.sampled_from([1, 125, 126, 4000, 65535, 65536, 70000]))
            parts = draw(st.integers(1, 3))
            payload = rng.randbytes(size)
            cut = sorted(rng.sample(range(1, size), min(parts - 1, size - 1))) if size > 1 else []
            pieces = [payload[a:b] for a, b in zip([0, *cut], [*cut, size], strict=True)]
            for index, piece in enumerate(pieces):
                opcode = Opcode.BINARY if index == 0 else Opcode.CONTINUATION
                out += encode_frame(opcode, piece, key, fin=index == len(pieces) - 1)
        elif choice == 4:
            out += encode_frame(Opcode.PING, rng.randbytes(draw(st.integers(0, 125))), key)
        elif choice == 5:
            out += encode_frame(Opcode.PONG, b"p", key)
        elif choice == 6:  # end of stream, or an empty fragment inside a message
            out += encode_frame(Opcode.BINARY, b"", key, fin=draw(st.booleans()))
        elif choice == 7:  # a message interrupted by a control frame
            out += encode_frame(Opcode.BINARY, b"abc", key, fin=False)
            out += encode_frame(Opcode.PING, b"", key)
            out += encode_frame(Opcode.CONTINUATION, b"def", key)
        elif choice == 8:
            out += _odd_frame(draw(st.integers(0, 8)), masked, rng)
        else:
            out += encode_frame(Opcode.CLOSE, struct.pack("!H", 1000), key)
    cuts = sorted(set(draw(st.lists(st.integers(0, len(out)), max_size=8))))
    budgets = draw(st.lists(st.integers(1, 4), min_size=1, max_size=4))
    return masked, bytes(out), cuts, budgets


def _run(
    parser: FrameParser, stream: bytes, cuts: list[int], budgets: list[int]
) -> tuple[list[object], list[int]]:
    """Feed ``stream`` in pieces, each through as many budgeted calls as it takes."""
    events: list[object] = []
    used_per_call: list[int] = []
    calls = 0
    for start, stop in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        piece = memoryview(bytearray(stream[start:stop]))
        while True:
            found, used = parser.receive_frames(piece, budgets[calls % len(budgets)])
            calls += 1
            used_per_call.append(used)
            events.extend(_plain(event) for event in found)
            if used == len(piece):
                break
            piece = piece[used:]
    return events, used_per_call


def _plain(event: FrameEvent) -> object:
    # Payload holds a view into the caller's buffer: compare its bytes.
    return ("payload", bytes(event.data)) if isinstance(event, Payload) else event


def _state(parser: FrameParser) -> tuple[object, ...]:
    return (
        parser.failed,
        parser.mid_message,
        parser._state,
        parser._remaining,
        parser._mask_key,
        parser._mask_phase,
        parser._message_bytes,
        bytes(parser._header),
    )


def _join_payloads(events: list[object]) -> list[object]:
    """Adjacent payload events merged: a byte stream, however it was sliced."""
    joined: list[object] = []
    for event in events:
        if isinstance(event, tuple) and joined and isinstance(joined[-1], tuple):
            joined[-1] = ("payload", joined[-1][1] + event[1])
        else:
            joined.append(event)
    return joined


def test_the_fast_path_is_built() -> None:
    assert scan_data_frames is not None  # the set-up builds the C extension


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams())
def test_fast_path_parses_every_stream_as_the_python_parser(
    case: tuple[bool, bytes, list[int], list[int]],
) -> None:
    masked, stream, cuts, budgets = case
    fast, slow = _parser(masked, fast=True), _parser(masked, fast=False)
    fast_events, _ = _run(fast, stream, cuts, budgets)
    slow_events, _ = _run(slow, stream, cuts, budgets)
    # Bytes used per call may differ: Python takes a header cut short into its own
    # buffer (and counts it against the budget), C leaves it to Python.
    assert _join_payloads(fast_events) == _join_payloads(slow_events)
    assert _state(fast)[:3] == _state(slow)[:3]
    if not slow.failed:
        assert _state(fast) == _state(slow)


@pytest.mark.parametrize("masked", [True, False])
def test_fast_path_unmasks_a_long_frame_cut_anywhere(masked: bool) -> None:
    rng = random.Random(7)
    payload = rng.randbytes(200_000)
    stream = bytes(encode_frame(Opcode.BINARY, payload, rng.randbytes(4) if masked else None))
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(stream)), 5))
        events, _ = _run(_parser(masked, fast=True), stream, cuts, [256])
        assert _join_payloads(events) == [("payload", payload)]


@pytest.mark.parametrize("masked", [True, False])
def test_fast_path_keeps_the_frame_budget(masked: bool) -> None:
    one = encode_frame(Opcode.BINARY, b"abcdefgh", b"\x01\x02\x03\x04" if masked else None)
    stream = memoryview(bytearray(one * 10))
    events, used = _parser(masked, fast=True).receive_frames(stream, 3)
    assert used == 3 * len(one)
    payloads = [bytes(event.data) for event in events if isinstance(event, Payload)]
    assert payloads == [b"abcdefgh"] * 3


def test_fast_path_refuses_bad_arguments() -> None:
    assert scan_data_frames is not None
    buffer = bytearray(8)
    with pytest.raises(ValueError, match="position"):
        scan_data_frames(buffer, 9, 0, None, 0, True, -1, False, 10, 1)
    with pytest.raises(ValueError, match="4 bytes"):
        scan_data_frames(buffer, 0, 1, b"abc", 0, True, 1, True, 10, 1)
    with pytest.raises(ValueError, match="phase"):
        scan_data_frames(buffer, 0, 1, b"abcd", 4, True, 1, True, 10, 1)
    with pytest.raises(BufferError):  # read-only: payloads are unmasked in place
        scan_data_frames(bytes(8), 0, 0, None, 0, True, -1, False, 10, 1)  # type: ignore[arg-type]
