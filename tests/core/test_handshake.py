"""The opening handshake, both roles, against wsproto/h11 peers (sans-IO)."""

from __future__ import annotations

import h11
import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request

from migrelay.core.handshake import (
    SUBPROTOCOL,
    Accepted,
    ClientHandshake,
    ServerHandshake,
    UpgradeRequest,
)
from migrelay.errors import HandshakeRefused, LocalProtocolError, RemoteProtocolError

KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def _request(headers: str = "", version: str = "13", key: str = KEY, target: str = "/vm") -> bytes:
    return (
        f"GET {target} HTTP/1.1\r\nHost: relay:8765\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: {version}\r\nSec-WebSocket-Protocol: {SUBPROTOCOL}\r\n"
        f"{headers}\r\n"
    ).encode()


def _feed_bytewise(handshake: ServerHandshake, data: bytes) -> UpgradeRequest | None:
    result = None
    for index in range(len(data)):
        result = handshake.receive_data(data[index : index + 1])
    return result


@pytest.mark.parametrize("bytewise", [False, True])
def test_server_parses_upgrade_and_hands_over_trailing_bytes(bytewise: bool) -> None:
    handshake = ServerHandshake()
    data = _request("Migrelay-Session: s1\r\nMigrelay-Channel: 2\r\n") + b"\x82\x80tail"
    request = _feed_bytewise(handshake, data) if bytewise else handshake.receive_data(data)
    assert request is not None
    assert request.path == "/vm"
    assert request.subprotocols == (SUBPROTOCOL,)
    assert request.headers["migrelay-session"] == "s1"
    assert request.headers["migrelay-channel"] == "2"
    assert handshake.trailing_data == b"\x82\x80tail"


def test_server_accepts_with_subprotocol_and_a_wsproto_client_opens() -> None:
    client = WSConnection(ConnectionType.CLIENT)
    data = client.send(Request(host="relay", target="/", subprotocols=[SUBPROTOCOL]))
    handshake = ServerHandshake()
    request = handshake.receive_data(data)
    assert request is not None and request.is_websocket
    response = handshake.accept(SUBPROTOCOL)
    client.receive_data(response)
    events = list(client.events())
    assert isinstance(events[0], AcceptConnection)
    assert events[0].subprotocol == SUBPROTOCOL
    assert events[0].extensions == []


def test_server_never_accepts_offered_compression() -> None:
    handshake = ServerHandshake()
    request = handshake.receive_data(
        _request("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n")
    )
    assert request is not None
    assert request.extensions
    assert b"permessage-deflate" not in handshake.accept(SUBPROTOCOL).lower()


def test_plain_get_is_reported_as_not_websocket() -> None:
    handshake = ServerHandshake()
    request = handshake.receive_data(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert request is not None and not request.is_websocket
    response = handshake.respond(200, b"ok\n")
    assert response.startswith(b"HTTP/1.1 200 ")
    assert response.endswith(b"\r\n\r\nok\n")


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (_request(version="8"), 426),
        (_request(key="short"), 400),
        (_request().replace(b"HTTP/1.1", b"HTTP/1.0", 1), 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n", 400),
    ],
)
def test_server_maps_bad_requests_to_http_statuses(data: bytes, status: int) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        ServerHandshake().receive_data(data)
    assert info.value.close_code == status


def test_server_refuses_a_head_over_the_limit_before_it_ends() -> None:
    handshake = ServerHandshake(max_head_bytes=1024)
    handshake.receive_data(b"GET / HTTP/1.1\r\n")
    with pytest.raises(RemoteProtocolError) as info:
        handshake.receive_data(b"X-Filler: " + b"a" * 2000 + b"\r\n")
    assert info.value.close_code == 431


def test_server_refusal_is_one_line_body_and_answers_once() -> None:
    handshake = ServerHandshake()
    handshake.receive_data(_request())
    response = handshake.refuse(503, "destination not there", (("Retry-After", "1"),))
    parser = h11.Connection(h11.CLIENT)
    parser.send(h11.Request(method="GET", target="/", headers=[("Host", "x")]))
    parser.receive_data(response)
    head = parser.next_event()
    assert isinstance(head, h11.Response)
    assert head.status_code == 503
    assert (b"retry-after", b"1") in head.headers
    body = parser.next_event()
    assert isinstance(body, h11.Data) and body.data == b"destination not there\n"
    with pytest.raises(LocalProtocolError, match="already answered"):
        handshake.accept(SUBPROTOCOL)


def _server_answer(request_bytes: bytes) -> WSConnection:
    server = WSConnection(ConnectionType.SERVER)
    server.receive_data(request_bytes)
    return server


def test_client_opens_against_a_wsproto_server_and_keeps_trailing_frames() -> None:
    client = ClientHandshake("relay:8765", "/vm", headers=[("Migrelay-Session", "abc")])
    server = _server_answer(client.request_bytes())
    request = next(e for e in server.events() if isinstance(e, Request))
    assert request.subprotocols == [SUBPROTOCOL]
    assert (b"migrelay-session", b"abc") in request.extra_headers
    response = server.send(AcceptConnection(subprotocol=SUBPROTOCOL))
    accepted = None
    data = response + b"\x82\x01x"
    for index in range(len(data)):
        accepted = accepted or client.receive_data(data[index : index + 1])
    assert accepted == Accepted(SUBPROTOCOL, {})
    # Bytes after the 101 that arrived in the same read as its end stay for the codec.
    client2 = ClientHandshake("relay", "/")
    server2 = _server_answer(client2.request_bytes())
    list(server2.events())
    assert client2.receive_data(server2.send(AcceptConnection(subprotocol=SUBPROTOCOL)) + b"\x82")
    assert client2.trailing_data == b"\x82"


def test_client_reports_refusal_with_status_reason_and_headers() -> None:
    client = ClientHandshake("relay", "/")
    server = _server_answer(client.request_bytes())
    list(server.events())
    data = server.send(
        RejectConnection(
            status_code=401,
            headers=[(b"www-authenticate", b"Bearer"), (b"content-length", b"12")],
            has_body=True,
        )
    )
    data += server.send(RejectData(data=b"bad token\nx\n"))
    with pytest.raises(HandshakeRefused) as info:
        client.receive_data(data)
    assert info.value.status == 401
    assert info.value.reason == "bad token"
    assert info.value.headers["www-authenticate"] == "Bearer"
    assert "401" in str(info.value)


def test_client_rejects_a_101_with_a_wrong_accept_key() -> None:
    client = ClientHandshake("relay", "/")
    client.request_bytes()
    bad = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: AAAAAAAAAAAAAAAAAAAAAAAAAAA=\r\n\r\n"
    )
    with pytest.raises(RemoteProtocolError, match="accept"):
        client.receive_data(bad)


def test_client_eof_before_answer_is_a_protocol_error() -> None:
    client = ClientHandshake("relay", "/")
    client.request_bytes()
    with pytest.raises(RemoteProtocolError, match="closed the connection"):
        client.receive_eof()
