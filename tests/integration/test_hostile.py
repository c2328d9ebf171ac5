"""Hostile input against a real ``migrelay serve`` process with a real unix target.

Each case opens a raw TCP connection and sends something malformed: a bad request head
(refused with an HTTP status before anything on the host is touched), or, after a valid
upgrade, bad frames (closed with the RFC 6455 close code the peer broke). For every case
the test checks the documented answer, that the log has no traceback and names the
refusal, and that the same server still serves a normal session right afterwards.

One ``serve`` runs for the whole module: a server that survives every case in a row is
the point. Its target is a unix server in a thread that reads until EOF, answers
``ok <count> <sha256>`` and closes.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import inspect
import math
import re
import secrets
import socket
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from tests.helpers import FACTOR, short_temp_dir
from tests.processes import MigrelayProcess, MigrelayProcesses

from migrelay.core.events import CloseReceived, EndOfStream, FrameEvent, Payload
from migrelay.core.frames import FrameParser, Opcode, encode_close, encode_frame

#: Longest any single answer may take (a refusal is immediate; this is a safety net).
ANSWER_SECONDS = 10.0 * FACTOR
#: The one-byte-frame case: it must finish (or be refused) within this.
MILLION_FRAMES_SECONDS = 120.0 * FACTOR
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
MASK = b"\x1f\x2e\x3d\x4c"
#: DESIGN.md §3 / Limits.max_message_bytes: the largest message serve accepts.
MAX_MESSAGE_BYTES = 1 << 20
#: Limits.max_head_bytes (h11's default): a longer request head is refused with 431.
MAX_HEAD_BYTES = 16 * 1024


# -- the target: a unix peer standing in for destination QEMU -------------------------------


@dataclass
class SinkTarget:
    """Accepts unix connections; reads each to EOF, answers ``ok N SHA256``, closes."""

    path: Path
    received: list[bytes] = field(default_factory=list)
    _sock: socket.socket | None = None
    _threads: list[threading.Thread] = field(default_factory=list)
    _stopping: bool = False

    def start(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(self.path))
        sock.listen(16)
        sock.settimeout(0.2)
        self._sock = sock
        thread = threading.Thread(target=self._accept_loop, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _accept_loop(self) -> None:
        assert self._sock is not None
        while not self._stopping:
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            thread.start()
            self._threads.append(thread)

    def _serve(self, conn: socket.socket) -> None:
        conn.settimeout(MILLION_FRAMES_SECONDS)
        data = bytearray()
        with contextlib.suppress(OSError), conn:
            while chunk := conn.recv(1 << 20):
                data += chunk
            conn.sendall(f"ok {len(data)} {hashlib.sha256(data).hexdigest()}".encode())
            conn.shutdown(socket.SHUT_WR)
        self.received.append(bytes(data))

    def stop(self) -> None:
        self._stopping = True
        if self._sock is not None:
            self._sock.close()
        for thread in self._threads:
            thread.join(2)


# -- the server process ---------------------------------------------------------------------


@dataclass
class Serve:
    process: MigrelayProcess
    port: int
    target: SinkTarget

    def log(self) -> str:
        return self.process.log()

    def wait_for_log(self, pattern: str, after: int = 0) -> str:
        """Wait until ``pattern`` appears in the log past offset ``after``; return it."""
        deadline = time.monotonic() + ANSWER_SECONDS
        while True:
            match = re.search(pattern, self.log()[after:])
            if match:
                return match.group(0)
            assert self.process.popen.poll() is None, f"serve exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"no {pattern!r} in serve's log:\n{self.log()}"
            time.sleep(0.01)


@pytest.fixture(scope="module")
def serve() -> Iterator[Serve]:
    """One ``migrelay serve --target`` for the whole module, and its sink target."""
    with short_temp_dir() as workdir:
        yield from _serve(workdir)


def _serve(workdir: Path) -> Iterator[Serve]:
    target = SinkTarget(workdir / "dest.sock")
    target.start()
    procs = MigrelayProcesses(workdir)
    try:
        process = procs.serve("--target", str(target.path), "--wait-target", "2")
        assert process.port is not None
        yield Serve(process, process.port, target)
        assert process.popen.poll() is None, "serve died during the hostile cases"
        assert process.stop() == 0
        log = process.log()
        assert "Traceback" not in log, log
    finally:
        procs.stop_all()
        for process in procs.processes:
            print(f"----- serve log:\n{process.log()}")
        target.stop()


# -- a raw client -----------------------------------------------------------------------


def upgrade_request(
    key: str | None = None,
    *,
    version: str = "13",
    http: str = "HTTP/1.1",
    protocol: str | None = "migrelay.v1",
    extra: str = "",
) -> bytes:
    key = key if key is not None else base64.b64encode(secrets.token_bytes(16)).decode()
    lines = [
        f"GET / {http}",
        "Host: 127.0.0.1",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}" if key else "",
        f"Sec-WebSocket-Version: {version}",
        f"Sec-WebSocket-Protocol: {protocol}" if protocol else "",
    ]
    head = "\r\n".join(line for line in lines if line) + "\r\n" + extra
    return (head + "\r\n").encode("latin-1")


def connect(serve: Serve) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", serve.port), timeout=ANSWER_SECONDS)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def read_to_eof(sock: socket.socket, initial: bytes = b"") -> bytes:
    data = bytearray(initial)
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(1 << 20):
            data += chunk
    return bytes(data)


def refusal_status(serve: Serve, payload: bytes, shut_write: bool = False) -> int | None:
    """Send ``payload`` as the request; return the HTTP status, None if closed unanswered."""
    with connect(serve) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(payload)
            if shut_write:
                sock.shutdown(socket.SHUT_WR)
        response = read_to_eof(sock)
    if not response:
        return None
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", response)
    assert match, response[:200]
    return int(match.group(1))


def open_websocket(serve: Serve) -> tuple[socket.socket, bytes]:
    """Complete a valid upgrade; return the socket and bytes read past the 101 head."""
    key = base64.b64encode(secrets.token_bytes(16))
    sock = connect(serve)
    sock.sendall(upgrade_request(key.decode()))
    response = b""
    while b"\r\n\r\n" not in response:
        chunk = sock.recv(4096)
        assert chunk, f"closed during the handshake: {response!r}"
        response += chunk
    head, _, rest = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101 "), head
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    assert b"sec-websocket-accept: " + accept in head.lower().replace(accept.lower(), accept)
    return sock, rest


def server_events(sock: socket.socket, initial: bytes) -> list[FrameEvent]:
    """Read to EOF and parse what the server sent (unmasked frames)."""
    parser = FrameParser(expect_masked=False, max_message_bytes=1 << 30)
    return parser.receive(memoryview(bytearray(read_to_eof(sock, initial))))


def close_code(events: list[FrameEvent]) -> int | None:
    codes = [event.code for event in events if isinstance(event, CloseReceived)]
    return codes[0] if codes else None


def masked(opcode: int, payload: bytes, fin: bool = True, rsv: int = 0) -> bytes:
    """A client frame built by hand, so that any field can be wrong."""
    first = (0x80 if fin else 0) | rsv | opcode
    if len(payload) < 126:
        header = struct.pack("!BB", first, 0x80 | len(payload))
    elif len(payload) < 1 << 16:
        header = struct.pack("!BBH", first, 0x80 | 126, len(payload))
    else:
        header = struct.pack("!BBQ", first, 0x80 | 127, len(payload))
    body = bytes(b ^ MASK[i % 4] for i, b in enumerate(payload))
    return header + MASK + body


def normal_session_works(serve: Serve) -> None:
    """A well-behaved client still gets its bytes through and a clean close."""
    sock, rest = open_websocket(serve)
    payload = secrets.token_bytes(100_000)
    with sock:
        sock.sendall(bytes(encode_frame(Opcode.BINARY, payload, MASK)))
        sock.sendall(bytes(encode_frame(Opcode.BINARY, b"", MASK)))  # end of stream
        parser = FrameParser(expect_masked=False)
        events: list[FrameEvent] = []
        buffered = bytearray(rest)
        # Read until the server's Close, answer it, then expect EOF.
        while not any(isinstance(e, CloseReceived) for e in events):
            if buffered:
                events += parser.receive(memoryview(buffered))
                buffered = bytearray()
                continue
            chunk = sock.recv(65536)
            assert chunk, f"server closed before its Close frame: {events!r}"
            buffered = bytearray(chunk)
        sock.sendall(bytes(encode_close(1000, "", MASK)))
        read_to_eof(sock)
    reply = b"".join(bytes(e.data) for e in events if isinstance(e, Payload))
    assert reply == f"ok {len(payload)} {hashlib.sha256(payload).hexdigest()}".encode()
    assert any(isinstance(e, EndOfStream) for e in events)
    assert close_code(events) == 1000


# -- the cases ------------------------------------------------------------------------------

#: (case, request bytes, HTTP status; None = closed without an answer).
HANDSHAKE_CASES: list[tuple[str, bytes, int | None]] = [
    ("binary-garbage", bytes(range(256)) * 4 + b"\r\n\r\n", 400),
    (
        "tls-client-hello",
        bytes.fromhex("160301020001000200000303") + b"\x00" * 100 + b"\r\n\r\n",
        400,
    ),
    ("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 426),
    ("request-line-without-host", b"GET / HTTP/1.1\r\n\r\n", 400),
    ("plain-get", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 426),
    ("no-request-line", b"\r\n\r\n", 400),
    ("header-without-colon", upgrade_request(extra="Bogus header line\r\n"), 400),
    ("oversized-head", upgrade_request(extra="X-Pad: " + "a" * MAX_HEAD_BYTES + "\r\n"), 431),
    ("oversized-head-no-blank-line", b"GET / HTTP/1.1\r\nX: " + b"a" * (MAX_HEAD_BYTES + 10), 431),
    ("http-1.0", upgrade_request(http="HTTP/1.0"), 400),
    ("http-0.9-style", b"GET /\r\n\r\n", 400),
    ("websocket-version-8", upgrade_request(version="8"), 426),
    ("websocket-version-garbage", upgrade_request(version="13, x"), 426),
    ("key-missing", upgrade_request(key=""), 400),
    ("key-not-base64", upgrade_request(key="not base64 at all!!"), 400),
    ("key-15-bytes", upgrade_request(key=base64.b64encode(b"x" * 15).decode()), 400),
    ("key-17-bytes", upgrade_request(key=base64.b64encode(b"x" * 17).decode()), 400),
    ("no-subprotocol", upgrade_request(protocol=None), 400),
    ("other-subprotocol", upgrade_request(protocol="migrelay.v2"), 400),
    (
        "non-ascii-connection-header",
        upgrade_request().replace(b"Connection: Upgrade", b"Connection: Upgr\xe9de"),
        400,
    ),
    ("non-ascii-host", upgrade_request().replace(b"Host: 127.0.0.1", b"Host: \xff\xfe"), 400),
    ("nul-in-header", upgrade_request(extra="X-A: a\x00b\r\n"), 400),
    (
        "bad-migrelay-channel",
        upgrade_request(extra="Migrelay-Session: s\r\nMigrelay-Channel: -1\r\n"),
        400,
    ),
    ("bad-migrelay-session", upgrade_request(extra="Migrelay-Session: ../../x\r\n"), 400),
    ("path-traversal", upgrade_request().replace(b"GET / ", b"GET /../../etc/passwd "), 404),
]


@pytest.mark.parametrize(
    ("payload", "status"),
    [pytest.param(payload, status, id=case) for case, payload, status in HANDSHAKE_CASES],
)
def test_malformed_request_head_is_refused_with_its_status_and_server_keeps_serving(
    serve: Serve, payload: bytes, status: int
) -> None:
    mark = len(serve.log())
    assert refusal_status(serve, payload) == status
    # One log line names the refusal; no traceback.
    line = serve.wait_for_log(rf"refused \S+ from [^\n]*: {status} [^\n]*", after=mark)
    assert "Traceback" not in serve.log()[mark:], line
    normal_session_works(serve)


def test_truncated_request_head_then_eof_is_closed_without_answer(serve: Serve) -> None:
    mark = len(serve.log())
    assert refusal_status(serve, upgrade_request()[:40], shut_write=True) is None
    assert "Traceback" not in serve.log()[mark:]
    normal_session_works(serve)


def test_truncated_request_head_cut_mid_header_is_closed_without_answer(serve: Serve) -> None:
    request = upgrade_request()
    with connect(serve) as sock:
        sock.sendall(request[: len(request) // 2])
        sock.shutdown(socket.SHUT_WR)
        assert read_to_eof(sock) == b""
    normal_session_works(serve)


#: (case, frames sent after a valid upgrade, expected close code from the server).
FRAME_CASES: list[tuple[str, bytes, int]] = [
    ("unmasked-binary", bytes(encode_frame(Opcode.BINARY, b"data", None)), 1002),
    ("rsv1", masked(Opcode.BINARY, b"data", rsv=0x40), 1002),
    ("rsv2", masked(Opcode.BINARY, b"data", rsv=0x20), 1002),
    ("rsv3", masked(Opcode.BINARY, b"data", rsv=0x10), 1002),
    ("opcode-3", masked(0x3, b"data"), 1002),
    ("opcode-7", masked(0x7, b"data"), 1002),
    ("opcode-0xb", masked(0xB, b""), 1002),
    ("opcode-0xf", masked(0xF, b"x"), 1002),
    ("continuation-first", masked(Opcode.CONTINUATION, b"data"), 1002),
    (
        "new-message-mid-message",
        masked(Opcode.BINARY, b"a", fin=False) + masked(Opcode.BINARY, b"b"),
        1002,
    ),
    ("ping-126-bytes", masked(Opcode.PING, b"p" * 126), 1002),
    ("close-126-bytes", masked(Opcode.CLOSE, struct.pack("!H", 1000) + b"r" * 124), 1002),
    ("fragmented-ping", masked(Opcode.PING, b"p", fin=False), 1002),
    ("fragmented-close", masked(Opcode.CLOSE, struct.pack("!H", 1000), fin=False), 1002),
    ("close-1-byte", masked(Opcode.CLOSE, b"\x03"), 1002),
    ("close-code-999", masked(Opcode.CLOSE, struct.pack("!H", 999)), 1002),
    ("close-code-1004", masked(Opcode.CLOSE, struct.pack("!H", 1004)), 1002),
    ("close-code-1005", masked(Opcode.CLOSE, struct.pack("!H", 1005)), 1002),
    ("close-code-1006", masked(Opcode.CLOSE, struct.pack("!H", 1006)), 1002),
    ("close-code-1015", masked(Opcode.CLOSE, struct.pack("!H", 1015)), 1002),
    ("close-code-2999", masked(Opcode.CLOSE, struct.pack("!H", 2999)), 1002),
    ("close-code-5000", masked(Opcode.CLOSE, struct.pack("!H", 5000)), 1002),
    ("close-reason-not-utf8", masked(Opcode.CLOSE, struct.pack("!H", 1000) + b"\xff\xfe"), 1007),
    ("length-top-bit", b"\x82\xff" + struct.pack("!Q", 1 << 63) + MASK, 1002),
    ("length-all-ones", b"\x82\xff" + b"\xff" * 8 + MASK, 1002),
    ("length-2-62", b"\x82\xff" + struct.pack("!Q", 1 << 62) + MASK, 1009),
    (
        "message-limit-plus-one",
        b"\x82\xff" + struct.pack("!Q", MAX_MESSAGE_BYTES + 1) + MASK,
        1009,
    ),
    (
        "fragments-over-limit",
        masked(Opcode.BINARY, b"a" * 60000, fin=False)
        + masked(Opcode.CONTINUATION, b"a" * 60000, fin=False) * 16
        + masked(Opcode.CONTINUATION, b"a" * 60000),
        1009,
    ),
    ("text-frame", masked(Opcode.TEXT, b"hello"), 1003),
    (
        "text-continued",
        masked(Opcode.TEXT, b"he", fin=False) + masked(Opcode.CONTINUATION, b"llo"),
        1003,
    ),
    (
        "data-after-end-of-stream",
        masked(Opcode.BINARY, b"") + masked(Opcode.BINARY, b"late"),
        1008,  # valid RFC 6455, against migrelay.v1's half-close: policy
    ),
]


@pytest.mark.parametrize(
    ("frames", "code"),
    [pytest.param(frames, code, id=case) for case, frames, code in FRAME_CASES],
)
def test_bad_frame_is_closed_with_its_close_code_and_server_keeps_serving(
    serve: Serve, frames: bytes, code: int
) -> None:
    mark = len(serve.log())
    sock, rest = open_websocket(serve)
    with sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(frames)
        events = server_events(sock, rest)
    assert close_code(events) == code, events
    line = serve.wait_for_log(r"channel \S+ closed: [^\n]*", after=mark)
    assert "peer broke the protocol" in line, line
    assert f"close code {code}" in line, line
    assert "Traceback" not in serve.log()[mark:]
    normal_session_works(serve)


def test_valid_close_with_private_code_is_echoed(serve: Serve) -> None:
    # The counterpart of the invalid codes: 4999 is a valid private code.
    sock, rest = open_websocket(serve)
    with sock:
        sock.sendall(masked(Opcode.CLOSE, struct.pack("!H", 4999)))
        assert close_code(server_events(sock, rest)) == 4999


def test_million_one_byte_continuation_frames_pass_through_intact(serve: Serve) -> None:
    # 1,000,000 bytes is under the 1 MiB message limit, so the message is legal and
    # must arrive whole; each frame costs the relay one parse and one unix write.
    count = 1_000_000
    payload = secrets.token_bytes(count)
    frames = bytearray()
    for index, byte in enumerate(payload):
        opcode = Opcode.BINARY if index == 0 else Opcode.CONTINUATION
        fin = 0x80 if index == count - 1 else 0
        frames += bytes((fin | opcode, 0x81)) + MASK + bytes((byte ^ MASK[0],))
    frames += masked(Opcode.BINARY, b"")  # end of stream
    assert len(frames) == 7 * count + 6
    received_before = len(serve.target.received)
    started = time.monotonic()
    sock, rest = open_websocket(serve)
    with sock:
        sock.settimeout(MILLION_FRAMES_SECONDS)
        sock.sendall(frames)
        events = server_events(sock, rest)
    elapsed = time.monotonic() - started
    print(f"\n1,000,000 one-byte continuation frames ({len(frames)} bytes): {elapsed:.2f} s")
    assert close_code(events) == 1000, events
    assert len(serve.target.received) == received_before + 1
    assert serve.target.received[-1] == payload
    reply = b"".join(bytes(e.data) for e in events if isinstance(e, Payload))
    assert reply == f"ok {count} {hashlib.sha256(payload).hexdigest()}".encode()
    assert elapsed < MILLION_FRAMES_SECONDS
    normal_session_works(serve)


#: The README's account of this module (section "Reliability").
README_CASES = re.compile(
    r"\*\*Hostile input\*\* \(`tests/integration/test_hostile\.py`\): (\d+) cases against one"
    r" `serve`\s+\((\d+) malformed request heads, truncated heads, (\d+) bad frames"
)


def cases_against_serve() -> int:
    """The cases this module runs against its one ``serve``, counted from the tests.

    Every test that takes the ``serve`` fixture is one case, a parametrized one as many
    as its parameter sets (the case tables).
    """
    count = 0
    for name, function in globals().items():
        if not name.startswith("test_") or not callable(function):
            continue
        if "serve" not in inspect.signature(function).parameters:
            continue
        marks = getattr(function, "pytestmark", [])
        parametrized = [mark for mark in marks if mark.name == "parametrize"]
        count += math.prod(len(mark.args[1]) for mark in parametrized)
    return count


def test_hostile_case_count_is_what_the_readme_reports() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    match = README_CASES.search(readme)
    assert match is not None, "the README no longer describes the hostile cases"
    total, heads, frames = (int(group) for group in match.groups())
    assert (heads, frames) == (len(HANDSHAKE_CASES), len(FRAME_CASES))
    assert total == cases_against_serve()
