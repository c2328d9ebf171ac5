"""RelaySession: half-close, the close handshake, pings, violations (sans-IO)."""

from __future__ import annotations

import pytest

from migrelay.core.events import (
    CloseReceived,
    EndOfStream,
    Payload,
    PingReceived,
    ProtocolViolation,
)
from migrelay.core.frames import MAX_HEADER_BYTES, CloseCode, FrameParser, Opcode, encode_frame
from migrelay.core.session import RelaySession, Role, SessionState
from migrelay.errors import LocalProtocolError

KEY = b"\x01\x02\x03\x04"


def _pair() -> tuple[RelaySession, RelaySession]:
    return RelaySession(Role.CLIENT, mask_key=lambda: KEY), RelaySession(Role.SERVER)


def _deliver(sender: RelaySession, receiver: RelaySession) -> list[object]:
    events: list[object] = []
    for chunk in sender.data_to_send():
        events += receiver.receive_data(memoryview(bytearray(chunk)))
    return events


def _frame(session: RelaySession, payload: bytes) -> bytearray:
    buffer = bytearray(MAX_HEADER_BYTES) + payload
    start = session.frame_data(buffer, MAX_HEADER_BYTES, len(payload))
    return buffer[start:]


def test_client_data_frame_is_masked_and_server_parses_it() -> None:
    client, server = _pair()
    frame = _frame(client, b"hello")
    assert frame[1] & 0x80  # mask bit
    assert b"hello" not in bytes(frame)
    events = server.receive_data(memoryview(frame))
    assert len(events) == 1
    assert isinstance(events[0], Payload)
    assert bytes(events[0].data) == b"hello"


def test_server_data_frame_is_unmasked_and_client_parses_it() -> None:
    client, server = _pair()
    frame = _frame(server, b"world")
    assert not frame[1] & 0x80
    events = client.receive_data(memoryview(frame))
    assert [bytes(e.data) for e in events if isinstance(e, Payload)] == [b"world"]


def test_end_of_stream_both_ways_closes_normally_and_server_closes_tcp() -> None:
    client, server = _pair()
    client.send_end_of_stream()
    assert client.local_ended
    assert _deliver(client, server) == [EndOfStream()]
    assert server.remote_ended and server.state is SessionState.OPEN
    server.send_end_of_stream()
    # Both directions ended on the server: it sends Close right after its end marker.
    assert server.close_sent == (CloseCode.NORMAL, "")
    events = _deliver(server, client)
    assert events == [EndOfStream(), CloseReceived(CloseCode.NORMAL, "")]
    # The client answered the Close; its own close_if_done saw close_sent already set.
    assert client.state.value == "closed"
    assert not client.close_expected()  # the client waits for the server to close TCP
    _deliver(client, server)
    assert server.state.value == "closed"
    assert server.close_expected()


def test_ping_is_answered_with_pong_of_same_payload() -> None:
    client, server = _pair()
    client.send_ping(b"abc")
    assert _deliver(client, server) == [PingReceived(b"abc")]
    pong = server.data_to_send()
    parser = FrameParser(expect_masked=False)
    events = parser.receive(memoryview(bytearray(pong[0])))
    assert [type(e).__name__ for e in events] == ["PongReceived"]


def test_violation_queues_close_with_its_code_and_ignores_further_input() -> None:
    _, server = _pair()
    text = encode_frame(Opcode.TEXT, b"hi", KEY)
    events = server.receive_data(memoryview(text))
    assert events == [ProtocolViolation(CloseCode.UNSUPPORTED_DATA, "text message")]
    assert server.close_sent is not None and server.close_sent[0] == CloseCode.UNSUPPORTED_DATA
    assert server.close_expected()
    assert server.receive_data(memoryview(encode_frame(Opcode.BINARY, b"x", KEY))) == []


def test_data_after_end_of_stream_is_a_protocol_error() -> None:
    client, server = _pair()
    client.send_end_of_stream()
    _deliver(client, server)
    late = encode_frame(Opcode.BINARY, b"late", KEY)
    events = server.receive_data(memoryview(late))
    assert events == [ProtocolViolation(CloseCode.PROTOCOL_ERROR, "data after end of stream")]


def test_peer_close_is_echoed_and_frames_after_it_are_dropped() -> None:
    _, server = _pair()
    stream = encode_frame(Opcode.CLOSE, b"\x0f\xa0", KEY) + encode_frame(Opcode.BINARY, b"x", KEY)
    events = server.receive_data(memoryview(stream))
    assert events == [CloseReceived(4000, "")]
    assert server.close_sent == (4000, "")
    assert server.state is SessionState.CLOSED


def test_close_without_status_is_answered_with_1000() -> None:
    _, server = _pair()
    server.receive_data(memoryview(encode_frame(Opcode.CLOSE, b"", KEY)))
    assert server.close_sent == (CloseCode.NORMAL, "")


def test_sending_data_after_end_of_stream_is_a_local_error() -> None:
    client, _ = _pair()
    client.send_end_of_stream()
    with pytest.raises(LocalProtocolError, match="cannot send data"):
        _frame(client, b"x")


def test_default_mask_keys_differ_between_frames() -> None:
    client = RelaySession(Role.CLIENT)
    keys = {bytes(_frame(client, b"abcd")[2:6]) for _ in range(64)}
    assert len(keys) > 60
