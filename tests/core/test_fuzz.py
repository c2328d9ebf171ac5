"""Property tests over everything that parses peer bytes: only documented outcomes.

* ``FrameParser.receive`` and ``RelaySession.receive_data`` turn any bytes, split
  anywhere, into events; a ``ProtocolViolation`` is the last event and carries a close
  code from RFC 6455 §7.4.1. They never raise.
* ``ServerHandshake.receive_data`` returns ``None`` or an ``UpgradeRequest``, or raises
  ``RemoteProtocolError`` whose ``close_code`` is an HTTP 4xx status.
* ``ClientHandshake.receive_data`` returns ``None`` or ``Accepted``, or raises
  ``HandshakeRefused`` or ``RemoteProtocolError``.

``tools/fuzz_frames.py`` runs the same properties for minutes (coverage-guided with
atheris); what it found is pinned here as explicit examples.
"""

from __future__ import annotations

import base64
import hashlib
import struct

from hypothesis import example, given, settings, strategies as st

from migrelay.core.events import (
    CloseReceived,
    EndOfStream,
    FrameEvent,
    Payload,
    PingReceived,
    PongReceived,
    ProtocolViolation,
)
from migrelay.core.frames import FrameParser, Opcode, encode_close, encode_frame
from migrelay.core.handshake import Accepted, ClientHandshake, ServerHandshake, UpgradeRequest
from migrelay.core.session import RelaySession, Role
from migrelay.errors import HandshakeRefused, RemoteProtocolError

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
KEY = b"abcd"
#: Small limits so that short inputs reach the "too big" paths.
MAX_MESSAGE_BYTES = 64
MAX_HEAD_BYTES = 512

VALID_REQUEST = (
    b"GET /vm HTTP/1.1\r\nHost: relay:8765\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: migrelay.v1\r\n"
    b"Migrelay-Session: abc\r\nMigrelay-Channel: 0\r\n\r\n"
)
#: ``{ACCEPT}`` is replaced by the Sec-WebSocket-Accept matching the client's key.
VALID_RESPONSE = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: {ACCEPT}\r\nSec-WebSocket-Protocol: migrelay.v1\r\n\r\n"
)
REFUSAL = b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\nRetry-After: 1\r\n\r\nbusy\n"


# -- strategies ---------------------------------------------------------------------------


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets (taken modulo its length, sorted)."""
    points = sorted({cut % (len(data) + 1) for cut in cuts})
    chunks, start = [], 0
    for point in [*points, len(data)]:
        chunks.append(data[start:point])
        start = point
    return [chunk for chunk in chunks if chunk] or [data]


cuts = st.lists(st.integers(min_value=0, max_value=10_000), max_size=12)


@st.composite
def valid_frames(draw: st.DrawFn, masked: bool) -> bytes:
    """One to four valid frames as a client (masked) or server would send them."""
    frames = b""
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["data", "ping", "pong", "close"]))
        key = KEY if masked else None
        if kind == "data":
            payload = draw(st.binary(max_size=300))
            frames += encode_frame(Opcode.BINARY, payload, key, draw(st.booleans()))
        elif kind == "close":
            frames += encode_close(draw(st.sampled_from([1000, 1002, 4000, 4002])), "x", key)
        else:
            opcode = Opcode.PING if kind == "ping" else Opcode.PONG
            frames += encode_frame(opcode, draw(st.binary(max_size=125)), key)
    return frames


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[bytes]) -> bytes:
    """``base`` with bit flips, byte overwrites, insertions, deletions or a truncation."""
    data = bytearray(draw(base))
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        position = draw(st.integers(0, len(data) - 1))
        operation = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate"]))
        if operation == "flip":
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif operation == "set":
            data[position] = draw(st.sampled_from([0x00, 0x7E, 0x7F, 0x80, 0xC0, 0xFF]))
        elif operation == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif operation == "delete":
            del data[position : position + draw(st.integers(1, 16))]
        else:
            del data[position:]
    return bytes(data)


# -- the properties -----------------------------------------------------------------------


def check_frame_events(events: list[FrameEvent], fed: int) -> None:
    payload = 0
    for index, event in enumerate(events):
        assert isinstance(
            event,
            Payload
            | EndOfStream
            | PingReceived
            | PongReceived
            | CloseReceived
            | ProtocolViolation,
        )
        if isinstance(event, ProtocolViolation):
            assert index == len(events) - 1, "an event followed a protocol violation"
            assert event.code in (1002, 1003, 1007, 1009)
        if isinstance(event, Payload):
            payload += len(event.data)
    assert payload <= fed


def parse_all(data: bytes, chunk_cuts: list[int], expect_masked: bool) -> list[FrameEvent]:
    parser = FrameParser(expect_masked=expect_masked, max_message_bytes=MAX_MESSAGE_BYTES)
    events: list[FrameEvent] = []
    for chunk in split_at(data, chunk_cuts):
        events += parser.receive(memoryview(bytearray(chunk)))
    assert parser.failed == any(isinstance(e, ProtocolViolation) for e in events)
    return events


@given(data=st.binary(max_size=600), chunk_cuts=cuts, expect_masked=st.booleans())
@example(data=b"\x82\xff" + struct.pack("!Q", 1 << 63) + KEY, chunk_cuts=[], expect_masked=True)
@example(data=b"\x89\xfe\x00\x7e" + KEY + b"x" * 126, chunk_cuts=[3], expect_masked=True)
def test_frame_parser_turns_random_bytes_into_events_only(
    data: bytes, chunk_cuts: list[int], expect_masked: bool
) -> None:
    check_frame_events(parse_all(data, chunk_cuts, expect_masked), len(data))


@given(data=st.data(), chunk_cuts=cuts, expect_masked=st.booleans())
def test_frame_parser_turns_mutated_valid_frames_into_events_only(
    data: st.DataObject, chunk_cuts: list[int], expect_masked: bool
) -> None:
    frames = data.draw(mutated(valid_frames(expect_masked)))
    check_frame_events(parse_all(frames, chunk_cuts, expect_masked), len(frames))


@given(data=st.data(), chunk_cuts=cuts, role=st.sampled_from(Role))
def test_relay_session_answers_any_input_with_valid_frames_only(
    data: st.DataObject, chunk_cuts: list[int], role: Role
) -> None:
    raw = data.draw(st.one_of(st.binary(max_size=400), mutated(valid_frames(role is Role.SERVER))))
    session = RelaySession(role, max_message_bytes=MAX_MESSAGE_BYTES, mask_key=lambda: KEY)
    for chunk in split_at(raw, chunk_cuts):
        events = session.receive_data(memoryview(bytearray(chunk)))
        check_frame_events(events, len(raw))
        for frame in session.data_to_send():
            # The Pongs and Closes it queues must be valid for the peer.
            peer = FrameParser(expect_masked=role is Role.CLIENT)
            replies = peer.receive(memoryview(bytearray(frame)))
            assert not any(isinstance(e, ProtocolViolation) for e in replies), replies


def feed_server(data: bytes, chunk_cuts: list[int]) -> UpgradeRequest | None:
    handshake = ServerHandshake(max_head_bytes=MAX_HEAD_BYTES)
    result = None
    try:
        for chunk in split_at(data, chunk_cuts):
            result = handshake.receive_data(chunk)
            assert result is None or isinstance(result, UpgradeRequest)
    except RemoteProtocolError as exc:
        assert 400 <= exc.close_code <= 499, exc.close_code
        return None
    if result is not None and result.is_websocket:
        # A request the parser let through can be answered.
        offered = "migrelay.v1" if "migrelay.v1" in result.subprotocols else None
        assert handshake.accept(offered).startswith(b"HTTP/1.1 101 ")
    return result


@given(data=st.binary(max_size=700), chunk_cuts=cuts)
def test_server_handshake_returns_request_none_or_refusal_for_random_bytes(
    data: bytes, chunk_cuts: list[int]
) -> None:
    feed_server(data, chunk_cuts)


@given(data=mutated(st.just(VALID_REQUEST)), chunk_cuts=cuts)
# Found by tools/fuzz_frames.py: wsproto raised UnicodeDecodeError on these.
@example(
    data=VALID_REQUEST.replace(b"Connection: Upgrade", b"Connection: Upgr\xe9de"), chunk_cuts=[]
)
@example(data=VALID_REQUEST.replace(b"Host: relay", b"Host: r\xd9lay"), chunk_cuts=[])
@example(data=VALID_REQUEST.replace(b"relay:8765", b"x" * 70 + b".a"), chunk_cuts=[])
def test_server_handshake_returns_request_none_or_refusal_for_mutated_requests(
    data: bytes, chunk_cuts: list[int]
) -> None:
    feed_server(data, chunk_cuts)


def test_server_handshake_refuses_non_ascii_header_with_400() -> None:
    handshake = ServerHandshake()
    try:
        handshake.receive_data(VALID_REQUEST.replace(b"Connection: Upgrade", b"Connection: \xe9"))
    except RemoteProtocolError as exc:
        assert exc.close_code == 400
    else:
        raise AssertionError("a non-ASCII Connection header was accepted")


def feed_client(data: bytes, chunk_cuts: list[int]) -> Accepted | None:
    handshake = ClientHandshake("relay:8765", "/vm")
    request = handshake.request_bytes()
    key = request.split(b"Sec-WebSocket-Key: ", 1)[1].split(b"\r\n", 1)[0]
    data = data.replace(b"{ACCEPT}", base64.b64encode(hashlib.sha1(key + GUID).digest()))
    try:
        for chunk in split_at(data, chunk_cuts):
            result = handshake.receive_data(chunk)
            if result is not None:
                assert isinstance(result, Accepted)
                return result
        handshake.receive_eof()
    except (HandshakeRefused, RemoteProtocolError):
        pass
    return None


@given(data=st.binary(max_size=500), chunk_cuts=cuts)
def test_client_handshake_returns_accepted_none_or_documented_errors_for_random_bytes(
    data: bytes, chunk_cuts: list[int]
) -> None:
    feed_client(data, chunk_cuts)


@given(data=mutated(st.sampled_from([VALID_RESPONSE, REFUSAL])), chunk_cuts=cuts)
@example(
    data=VALID_RESPONSE.replace(b"Connection: Upgrade", b"Connection: Upgr\xe9de"), chunk_cuts=[]
)
@settings(max_examples=200)
def test_client_handshake_returns_accepted_none_or_documented_errors_for_mutated_responses(
    data: bytes, chunk_cuts: list[int]
) -> None:
    feed_client(data, chunk_cuts)


def test_client_handshake_accepts_the_unmutated_response() -> None:
    # The mutation tests start from a response that really is accepted.
    assert isinstance(feed_client(VALID_RESPONSE, []), Accepted)
    assert isinstance(feed_client(VALID_RESPONSE, [1, 7, 50]), Accepted)
    request = feed_server(VALID_REQUEST, [5])
    assert request is not None and request.path == "/vm"


def test_client_handshake_keeps_refusal_reason_when_body_arrives_after_the_head() -> None:
    # Found by tools/fuzz_frames.py: the empty rest of a head that arrived alone was fed
    # to h11 as end of connection, which lost the body (or raised RuntimeError after it).
    handshake = ClientHandshake("relay:8765", "/vm")
    handshake.request_bytes()
    head, _, body = REFUSAL.partition(b"\r\n\r\n")
    assert handshake.receive_data(head + b"\r\n\r\n") is None
    try:
        handshake.receive_data(body)
    except HandshakeRefused as exc:
        assert (exc.status, exc.reason) == (503, "busy")
    else:
        raise AssertionError("a complete 503 was not reported as refused")
