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
from migrelay.core.session import (
    ChannelOutcome,
    Liveness,
    LocalLoss,
    RelaySession,
    Role,
    SessionState,
)
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


def test_data_after_end_of_stream_is_a_policy_violation() -> None:
    client, server = _pair()
    client.send_end_of_stream()
    _deliver(client, server)
    late = encode_frame(Opcode.BINARY, b"late", KEY)
    events = server.receive_data(memoryview(late))
    assert events == [ProtocolViolation(CloseCode.POLICY_VIOLATION, "data after end of stream")]
    assert server.close_sent == (CloseCode.POLICY_VIOLATION, "data after end of stream")


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


# -- closing rules: how a channel ends -------------------------------------------------


def _closed_cleanly() -> tuple[RelaySession, RelaySession]:
    client, server = _pair()
    client.send_end_of_stream()
    _deliver(client, server)
    server.send_end_of_stream()
    _deliver(server, client)
    _deliver(client, server)
    return client, server


def test_both_ends_and_both_closes_with_1000_is_the_one_clean_outcome() -> None:
    # The source (the client) ended first. Never "completed": a migration cancelled at
    # the source ends its streams just like this (ChannelOutcome).
    client, server = _closed_cleanly()
    ended = "ended by the source, then by the destination"
    assert client.outcome() == ChannelOutcome(True, CloseCode.NORMAL, ended)
    assert server.outcome() == ChannelOutcome(True, CloseCode.NORMAL, ended)


def test_a_clean_outcome_names_the_side_that_ended_first() -> None:
    client, server = _pair()
    server.send_end_of_stream()  # the destination first
    _deliver(server, client)
    client.send_end_of_stream()
    _deliver(client, server)
    _deliver(server, client)
    ended = "ended by the destination, then by the source"
    assert client.outcome() == ChannelOutcome(True, CloseCode.NORMAL, ended)
    assert server.outcome() == ChannelOutcome(True, CloseCode.NORMAL, ended)


def test_close_sent_with_1000_but_none_received_is_not_clean() -> None:
    # Regression: the log line counted a Close *sent* with 1000 as clean while
    # Channel.clean (the source relay's exit code) wanted one *received*.
    client, server = _pair()
    client.send_end_of_stream()
    _deliver(client, server)
    server.send_end_of_stream()
    _deliver(server, client)  # the client got EndOfStream and Close and echoed it
    assert server.close_sent == (CloseCode.NORMAL, "") and server.close_rcvd is None
    outcome = server.outcome()
    assert not outcome.clean and outcome.description == "closed"
    assert outcome.close_code == CloseCode.NORMAL
    server.receive_eof()  # the client's Close never came: TCP closed instead
    assert server.outcome() == ChannelOutcome(
        False, CloseCode.NORMAL, "websocket closed without a close frame"
    )


def test_peer_close_with_1000_before_our_end_is_a_failure() -> None:
    client, server = _pair()
    client.send_close(CloseCode.NORMAL)
    _deliver(client, server)
    outcome = server.outcome()
    assert not outcome.clean
    assert outcome.description == "peer closed with 1000 normal"
    assert server.local_should_close()


def test_a_recorded_failure_makes_a_normal_close_unclean_and_the_first_reason_wins() -> None:
    _, server = _closed_cleanly()
    server.record_failure("first")
    server.record_failure("second")
    assert server.outcome() == ChannelOutcome(False, CloseCode.NORMAL, "first")


def test_violation_is_recorded_with_its_reason() -> None:
    _, server = _pair()
    server.receive_data(memoryview(encode_frame(Opcode.TEXT, b"hi", KEY)))
    assert server.failure == "peer broke the protocol: text message"
    assert server.local_should_close()


@pytest.mark.parametrize(
    ("role", "code"),
    [(Role.SERVER, CloseCode.DESTINATION_CLOSED), (Role.CLIENT, CloseCode.SOURCE_CLOSED)],
)
def test_local_side_lost_with_an_error_fails_with_the_roles_code(
    role: Role, code: CloseCode
) -> None:
    session = RelaySession(role, mask_key=lambda: KEY)
    assert session.local_lost(OSError("EIO")) is LocalLoss.FAILURE
    assert session.close_sent == (code, "")
    assert session.failure == "unix side closed (EIO)"
    assert session.local_should_close()
    assert not session.accepts_local_data


def test_local_side_closed_without_error_before_the_end_is_a_failure() -> None:
    session = RelaySession(Role.SERVER)
    assert session.local_lost(None) is LocalLoss.FAILURE
    assert session.failure == "unix side closed (QEMU)"


@pytest.mark.parametrize("error", [ConnectionResetError(), BrokenPipeError()])
def test_local_reset_ends_our_direction_like_eof(error: Exception) -> None:
    client, server = _pair()
    assert server.local_lost(error) is LocalLoss.END_OF_STREAM
    assert (server.local_ended, server.close_sent, server.failure) == (True, None, None)
    assert _deliver(server, client) == [EndOfStream()]
    # What the peer sends now cannot be delivered: the channel fails with 4000.
    server.local_undeliverable()
    assert server.close_sent == (CloseCode.DESTINATION_CLOSED, "")
    assert server.failure is not None and "while data was still arriving" in server.failure


def test_local_side_lost_after_both_ends_changes_nothing() -> None:
    _, server = _closed_cleanly()
    assert server.local_lost(OSError("late")) is LocalLoss.NOTHING
    assert server.outcome().clean


def test_local_eof_ends_our_direction() -> None:
    client, server = _pair()
    server.local_eof()
    assert _deliver(server, client) == [EndOfStream()]


def _accepts_local_data(session: RelaySession) -> bool:
    # A call, not the property: mypy would narrow the property to True after the
    # first assert and call the second one unreachable.
    return session.accepts_local_data


def test_late_local_data_is_refused_by_one_rule() -> None:
    for end in ("end_of_stream", "close", "websocket_gone"):
        session = RelaySession(Role.CLIENT, mask_key=lambda: KEY)
        assert _accepts_local_data(session)
        if end == "end_of_stream":
            session.local_eof()
        elif end == "close":
            session.send_close(CloseCode.SHUTDOWN)
        else:
            session.receive_eof()
        assert not _accepts_local_data(session), end
        with pytest.raises(LocalProtocolError, match="cannot send data"):
            _frame(session, b"late")


def test_local_side_stays_open_while_only_our_normal_close_is_out() -> None:
    client, _ = _pair()
    assert not client.local_should_close()
    client.local_eof()
    client.send_close(CloseCode.NORMAL)
    assert not client.local_should_close()  # the peer may still send its last data
    other, _ = _pair()
    other.send_close(CloseCode.SHUTDOWN)
    assert other.local_should_close()  # failing: stop QEMU's side now


def test_liveness_pings_a_silent_peer_then_closes_with_4002() -> None:
    client, server = _pair()
    assert server.check_liveness(0, silent_seconds=30) is Liveness.PING_SENT
    assert _deliver(server, client) == [PingReceived(b"migrelay")]
    assert server.check_liveness(0, silent_seconds=30) is Liveness.DEAD
    assert server.close_sent == (CloseCode.IDLE_TIMEOUT, "")
    assert server.failure == "peer silent for 30 s (liveness timeout)"
    assert server.check_liveness(0, silent_seconds=30) is Liveness.STOP


def test_liveness_any_byte_from_the_peer_proves_it_alive() -> None:
    client, server = _pair()
    assert server.check_liveness(0, silent_seconds=30) is Liveness.PING_SENT
    _deliver(server, client)
    pong = client.data_to_send()
    received = sum(len(chunk) for chunk in pong)
    for chunk in pong:
        server.receive_data(memoryview(bytearray(chunk)))
    assert server.check_liveness(received, silent_seconds=30) is Liveness.ALIVE
    assert server.check_liveness(received + 10, silent_seconds=30) is Liveness.ALIVE
    assert server.check_liveness(received + 10, silent_seconds=30) is Liveness.PING_SENT
    assert server.failure is None


# -- a budget of frames per call -----------------------------------------------------------


def test_receive_frames_stops_at_the_budget_and_the_rest_parses_the_same() -> None:
    client, server = _pair()
    stream = bytearray(encode_frame(Opcode.PING, b"p", KEY) * 5 + _frame(client, b"data"))
    view = memoryview(stream)
    events, used = server.receive_frames(view, 2)
    assert [type(event) for event in events] == [PingReceived, PingReceived]
    assert used == 2 * 7  # two whole Pings (6 bytes of header, 1 of payload), nothing more
    seen = list(events)
    while used < len(view):
        view = view[used:]
        events, used = server.receive_frames(view, 2)
        assert len(events) <= 2
        seen += events
    assert [type(event) for event in seen] == [PingReceived] * 5 + [Payload]
    assert isinstance(seen[-1], Payload) and bytes(seen[-1].data) == b"data"
    assert len(server.data_to_send()) == 5  # one Pong per Ping


def test_receive_frames_takes_a_large_frame_whole_within_the_budget() -> None:
    client, server = _pair()
    payload = bytes(range(256)) * 256
    stream = bytearray(_frame(client, payload) + encode_frame(Opcode.PING, b"", KEY))
    events, used = server.receive_frames(memoryview(stream), 1)
    assert used == len(stream) - 6  # the frame begun is finished, the next one waits
    assert b"".join(bytes(e.data) for e in events if isinstance(e, Payload)) == payload


def test_receive_frames_counts_everything_after_a_close_as_used() -> None:
    _, server = _pair()
    close = encode_frame(Opcode.CLOSE, b"\x03\xe8", KEY)
    stream = bytearray(close + encode_frame(Opcode.PING, b"", KEY) * 10)
    events, used = server.receive_frames(memoryview(stream), 100)
    assert [type(event) for event in events] == [CloseReceived]
    assert used == len(stream)
    assert server.receive_frames(memoryview(bytearray(b"\x89\x80" + KEY)), 1) == ([], 6)
