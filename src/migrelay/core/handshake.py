"""The HTTP/1.1 opening handshake (RFC 6455 §4), sans-IO, through wsproto and h11.

wsproto validates the upgrade and builds the 101; h11 parses the request line and
headers and writes refusals. migrelay finds the end of the head itself (the blank line)
before handing anything to either, for two reasons:

* a size limit that holds before any parsing (h11 enforces its own 16 KiB limit only
  per event, and wsproto keeps reading), and
* the bytes that follow the head belong to the frame codec: they are handed over
  as :attr:`trailing_data` instead of disappearing into wsproto's own frame layer.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

import h11
from wsproto import ConnectionType
from wsproto.events import AcceptConnection, RejectConnection, RejectData, Request
from wsproto.handshake import H11Handshake
from wsproto.utilities import RemoteProtocolError as WsprotoRemoteProtocolError

from migrelay.errors import HandshakeRefused, LocalProtocolError, RemoteProtocolError

#: The subprotocol of DESIGN.md §3. A future incompatible wire format is ``migrelay.v2``.
SUBPROTOCOL: Final = "migrelay.v1"
#: Largest request or response head accepted, request line and headers included. Same as
#: h11's DEFAULT_MAX_INCOMPLETE_EVENT_SIZE; nginx's default large_client_header_buffers
#: (4 × 8 KiB) is of the same order. A migrelay handshake is about 400 bytes.
DEFAULT_MAX_HEAD_BYTES: Final = 16 * 1024
#: Largest refusal body a client keeps (the server sends one line).
MAX_REFUSAL_BODY_BYTES: Final = 4096

_HEAD_END: Final = b"\r\n\r\n"

Headers = Sequence[tuple[str, str]]


@dataclass(frozen=True)
class UpgradeRequest:
    """A request head the server has parsed.

    Attributes:
        target: the request target, path and query as sent.
        headers: header values by lower-case name (repeated headers joined by ", ").
        subprotocols: the offered ``Sec-WebSocket-Protocol`` values, in order.
        extensions: the offered ``Sec-WebSocket-Extensions``; migrelay accepts none.
        is_websocket: False for a plain HTTP request (``/healthz``, ``/metrics``).
    """

    target: str
    headers: Mapping[str, str]
    subprotocols: tuple[str, ...] = ()
    extensions: tuple[str, ...] = ()
    is_websocket: bool = True

    @property
    def path(self) -> str:
        """The target without its query string."""
        return self.target.split("?", 1)[0]


@dataclass(frozen=True)
class Accepted:
    """The server answered 101: the WebSocket is open."""

    subprotocol: str | None
    headers: Mapping[str, str] = field(default_factory=dict)


def _split_head(buffer: bytearray, max_head_bytes: int, what: str) -> int | None:
    """Return the length of the head in ``buffer`` (blank line included), or None."""
    end = buffer.find(_HEAD_END, 0, max_head_bytes + len(_HEAD_END))
    if end >= 0:
        return end + len(_HEAD_END)
    if len(buffer) > max_head_bytes:
        raise RemoteProtocolError(
            f"{what} head exceeds limit of {max_head_bytes} bytes", close_code=431
        )
    return None


def _header_map(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    result: dict[str, str] = {}
    for raw_name, raw_value in headers:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        result[name] = f"{result[name]}, {value}" if name in result else value
    return result


def _valid_key(key: str) -> bool:
    # RFC 6455 §4.1: "a randomly selected 16-byte value that has been base64-encoded".
    try:
        return len(base64.b64decode(key.encode("ascii"), validate=True)) == 16
    except (binascii.Error, UnicodeEncodeError):
        return False


class ServerHandshake:
    """The server side: parse one request head, then accept or refuse it.

    Use: :meth:`receive_data` until it returns a request; then exactly one of
    :meth:`accept`, :meth:`refuse` or :meth:`respond`, and send the bytes it returns.
    After :meth:`accept`, :attr:`trailing_data` holds the first frame bytes, if any.
    """

    def __init__(self, max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES) -> None:
        self.max_head_bytes = max_head_bytes
        self._buffer = bytearray()
        self._request: UpgradeRequest | None = None
        self._wsproto = H11Handshake(ConnectionType.SERVER)
        self._answered = False
        #: Bytes received after the request head.
        self.trailing_data = b""

    @property
    def request(self) -> UpgradeRequest | None:
        """The parsed request, once its head is complete."""
        return self._request

    def receive_data(self, data: bytes) -> UpgradeRequest | None:
        """Take bytes from the client; return the request once its head is complete.

        Raises:
            RemoteProtocolError: the head is malformed, too large, or an invalid
                upgrade. ``close_code`` is the HTTP status to refuse it with; the caller
                sends :meth:`refuse` with that status and closes.
        """
        if self._request is not None:
            self.trailing_data += data
            return self._request
        self._buffer += data
        head_bytes = _split_head(self._buffer, self.max_head_bytes, "request")
        if head_bytes is None:
            return None
        head = bytes(self._buffer[:head_bytes])
        self.trailing_data = bytes(self._buffer[head_bytes:])
        self._buffer.clear()
        self._request = self._parse(head)
        return self._request

    def _parse(self, head: bytes) -> UpgradeRequest:
        parser = h11.Connection(h11.SERVER, max_incomplete_event_size=self.max_head_bytes)
        parser.receive_data(head)
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError as exc:
            raise RemoteProtocolError("malformed HTTP request", close_code=400) from exc
        if not isinstance(event, h11.Request):  # pragma: no cover - h11 returns a Request
            raise RemoteProtocolError("malformed HTTP request", close_code=400)
        target = event.target.decode("ascii", "replace")
        headers = _header_map(event.headers)
        if headers.get("upgrade", "").lower() != "websocket":
            return UpgradeRequest(target=target, headers=headers, is_websocket=False)
        if event.http_version != b"1.1":
            raise RemoteProtocolError("websocket upgrade needs HTTP/1.1", close_code=400)
        try:
            self._wsproto.receive_data(head)
            request = next(ev for ev in self._wsproto.events() if isinstance(ev, Request))
        except WsprotoRemoteProtocolError as exc:
            hint = exc.event_hint
            status = 400
            refusal_headers: tuple[tuple[str, str], ...] = ()
            if isinstance(hint, RejectConnection):
                # RFC 6455 §4.2.2: a 426 names the versions the server speaks.
                status = hint.status_code
                refusal_headers = tuple(
                    (k.decode("latin-1"), v.decode("latin-1")) for k, v in hint.headers
                )
            # wsproto's own text stays in the chain, for the server's log: a peer gets
            # fixed text only.
            raise RemoteProtocolError("invalid upgrade request", status, refusal_headers) from exc
        except UnicodeError as exc:
            # wsproto decodes Connection/Upgrade as ASCII and Host as IDNA without
            # catching the error (found by tools/fuzz_frames.py): a header byte >= 0x80.
            raise RemoteProtocolError("invalid upgrade: undecodable header", 400) from exc
        if not _valid_key(headers.get("sec-websocket-key", "")):
            raise RemoteProtocolError("invalid Sec-WebSocket-Key", close_code=400)
        return UpgradeRequest(
            target=target,
            headers=headers,
            subprotocols=tuple(request.subprotocols),
            extensions=tuple(str(ext) for ext in request.extensions),
        )

    def _require_unanswered(self, what: str) -> None:
        if self._answered:
            raise LocalProtocolError(f"cannot {what}: the request was already answered")
        self._answered = True

    def accept(self, subprotocol: str | None, headers: Headers = ()) -> bytes:
        """Return the 101 response. Extensions are never accepted (no compression).

        Raises:
            LocalProtocolError: no WebSocket request yet, or already answered.
        """
        if self._request is None or not self._request.is_websocket:
            raise LocalProtocolError("cannot accept: no websocket upgrade request")
        self._require_unanswered("accept")
        extra = [(name.encode("latin-1"), value.encode("latin-1")) for name, value in headers]
        return self._wsproto.send(AcceptConnection(subprotocol=subprotocol, extra_headers=extra))

    def refuse(self, status: int, reason: str, headers: Headers = ()) -> bytes:
        """Return an HTTP error response whose body is ``reason`` on one line.

        The response says ``Connection: close``: the caller closes after sending it.
        """
        return self.respond(status, (reason + "\n").encode("utf-8"), headers=headers)

    def respond(
        self,
        status: int,
        body: bytes,
        content_type: str = "text/plain; charset=utf-8",
        headers: Headers = (),
    ) -> bytes:
        """Return a complete plain HTTP response (refusals, health checks, metrics)."""
        self._require_unanswered("respond")
        all_headers = [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Connection", "close"),
            ("Cache-Control", "no-store"),
            *headers,
        ]
        writer = h11.Connection(h11.SERVER)
        # h11 answers only a request it has seen; give it a minimal one.
        writer.receive_data(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        writer.next_event()
        encoded = [(k.encode("latin-1"), v.encode("latin-1")) for k, v in all_headers]
        out = writer.send(h11.Response(status_code=status, headers=encoded)) or b""
        out += writer.send(h11.Data(data=body)) or b""
        out += writer.send(h11.EndOfMessage()) or b""
        return out


class ClientHandshake:
    """The client side: build the upgrade request, then read the server's answer.

    Use: send :meth:`request_bytes`; feed :meth:`receive_data` until it returns
    :class:`Accepted` (then :attr:`trailing_data` holds the first frame bytes) or raises
    :class:`HandshakeRefused`. Call :meth:`receive_eof` if the server closes first.
    """

    def __init__(
        self,
        host: str,
        target: str = "/",
        subprotocols: Sequence[str] = (SUBPROTOCOL,),
        headers: Headers = (),
        max_head_bytes: int = DEFAULT_MAX_HEAD_BYTES,
    ) -> None:
        self.max_head_bytes = max_head_bytes
        self._wsproto = H11Handshake(ConnectionType.CLIENT)
        self._request = Request(
            host=host,
            target=target,
            subprotocols=list(subprotocols),
            extra_headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
        )
        self._buffer = bytearray()
        self._refusal: RejectConnection | None = None
        self._body = bytearray()
        #: Bytes received after the 101 response head.
        self.trailing_data = b""

    def request_bytes(self) -> bytes:
        """Return the upgrade request to send."""
        return self._wsproto.send(self._request)

    def receive_data(self, data: bytes) -> Accepted | None:
        """Take bytes from the server; return :class:`Accepted` once the 101 is in.

        Raises:
            HandshakeRefused: the server answered with another status.
            RemoteProtocolError: the response is malformed, too large, or its 101 is
                invalid (wrong accept key, a subprotocol or extension not offered).
        """
        if self._refusal is not None:
            self._receive_refusal_body(data)
            return None
        self._buffer += data
        head_bytes = _split_head(self._buffer, self.max_head_bytes, "response")
        if head_bytes is None:
            return None
        head = bytes(self._buffer[:head_bytes])
        rest = bytes(self._buffer[head_bytes:])
        self._buffer.clear()
        try:
            self._wsproto.receive_data(head)
            events = list(self._wsproto.events())
        except WsprotoRemoteProtocolError as exc:
            raise RemoteProtocolError(f"invalid handshake response: {exc}", 1002) from exc
        except UnicodeError as exc:
            # As in ServerHandshake._parse: wsproto decodes headers without catching.
            raise RemoteProtocolError(
                "invalid handshake response: undecodable header", 1002
            ) from exc
        except h11.RemoteProtocolError as exc:  # pragma: no cover - wsproto wraps these
            raise RemoteProtocolError("malformed HTTP response", 1002) from exc
        for event in events:
            if isinstance(event, AcceptConnection):
                if event.extensions:
                    raise RemoteProtocolError("server accepted an extension not offered", 1002)
                self.trailing_data = rest
                return Accepted(event.subprotocol, _header_map(event.extra_headers))
            if isinstance(event, RejectConnection):
                self._refusal = event
                if not event.has_body:
                    raise self._refused()
                self._receive_refusal_body(rest)
                return None
        if not events:
            # A 1xx other than 101 (such as 100 Continue) carries no decision.
            return None
        raise RemoteProtocolError("unexpected handshake response", 1002)  # pragma: no cover

    def _receive_refusal_body(self, data: bytes) -> None:
        if not data:
            # wsproto (h11) takes b"" as the end of the connection: fed the empty rest
            # of a head that arrived alone, it dropped the body that followed (its
            # one-line reason) or raised RuntimeError on it (found by fuzz_frames.py).
            return
        try:
            self._wsproto.receive_data(data)
            events = list(self._wsproto.events())
        except WsprotoRemoteProtocolError as exc:
            raise self._refused() from exc
        for event in events:
            if isinstance(event, RejectData):
                room = MAX_REFUSAL_BODY_BYTES - len(self._body)
                self._body += event.data[:room]
                if event.body_finished:
                    raise self._refused()
        if len(self._body) >= MAX_REFUSAL_BODY_BYTES:
            raise self._refused()
        return None

    def receive_eof(self) -> None:
        """The server closed the connection before the handshake completed.

        Raises:
            HandshakeRefused: the server had started a refusal.
            RemoteProtocolError: it had not even answered.
        """
        if self._refusal is not None:
            raise self._refused()
        raise RemoteProtocolError("server closed the connection during the handshake", 1006)

    def _refused(self) -> HandshakeRefused:
        assert self._refusal is not None
        text = self._body.decode("utf-8", "replace").strip().splitlines()
        reason = text[0] if text else ""
        if not reason:
            reason = h11_reason(self._refusal.status_code)
        return HandshakeRefused(
            self._refusal.status_code, reason, _header_map(self._refusal.headers)
        )


def h11_reason(status: int) -> str:
    """Return the standard reason phrase for an HTTP status, or ``"status N"``."""
    from http import HTTPStatus

    try:
        return HTTPStatus(status).phrase.lower()
    except ValueError:
        return f"status {status}"
