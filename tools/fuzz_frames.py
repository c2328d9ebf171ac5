#!/usr/bin/env python3
"""Fuzz migrelay's frame codec, relay session and opening handshake for a fixed time.

Every input is fed to four targets, each split into chunks at points drawn from the
input itself (so a frame or a head arrives whole, byte by byte, or cut anywhere):

* ``FrameParser.receive`` (server and client side, small message limit): only events
  may come out, a ``ProtocolViolation`` is the last event ever, and payload never
  exceeds what was fed.
* ``RelaySession.receive_data`` (both roles): the same, plus the control frames it
  queues must encode and parse back.
* ``ServerHandshake.receive_data``: ``None``, an ``UpgradeRequest`` or
  ``RemoteProtocolError``; an accepted upgrade's ``accept()`` must then succeed.
* ``ClientHandshake.receive_data`` (the marker ``{ACCEPT}`` in the input is replaced by
  the right ``Sec-WebSocket-Accept`` so that mutations reach past the key check):
  ``None``, ``Accepted``, ``HandshakeRefused`` or ``RemoteProtocolError``.

Anything else (any other exception, a broken invariant) is a crash: it is counted, the
input is saved under ``--crash-dir``, and the tool exits 1 at the end. It exits 0 when
the whole run found none. Engines: ``atheris`` (coverage-guided libFuzzer, used when
installed) or ``random`` (mutations of a seed corpus, no dependency)::

    tools/fuzz_frames.py --seconds 180               # atheris if installed
    tools/fuzz_frames.py --seconds 60 --engine random --seed 1
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import random
import struct
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from migrelay.core.events import (
    CloseReceived,
    EndOfStream,
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
ACCEPT_MARKER = b"{ACCEPT}"
#: A small message limit, so inputs a few hundred bytes long reach the 1009 path.
MAX_MESSAGE_BYTES = 64
#: A small head limit, so inputs reach the 431 path.
MAX_HEAD_BYTES = 512


class Crash(Exception):
    """A broken invariant (as opposed to an unexpected exception from the target)."""


def _splits(data: bytes, selector: int) -> list[bytes]:
    """Cut ``data`` into chunks: whole, byte by byte, or at pseudo-random points."""
    if selector % 4 == 0 or not data:
        return [data]
    if selector % 4 == 1:
        return [data[i : i + 1] for i in range(len(data))]
    rng = random.Random(selector)
    chunks, position = [], 0
    while position < len(data):
        step = rng.randint(1, 32)
        chunks.append(data[position : position + step])
        position += step
    return chunks


def fuzz_parser(data: bytes, selector: int) -> None:
    for expect_masked in (True, False):
        parser = FrameParser(expect_masked=expect_masked, max_message_bytes=MAX_MESSAGE_BYTES)
        fed = payload = 0
        violated = False
        for chunk in _splits(data, selector):
            fed += len(chunk)
            events = parser.receive(memoryview(bytearray(chunk)))
            for event in events:
                if violated:
                    raise Crash(f"event after a protocol violation: {event!r}")
                if isinstance(event, ProtocolViolation):
                    violated = True
                    if not 1000 <= event.code <= 1011:
                        raise Crash(f"violation with close code {event.code}")
                elif isinstance(event, Payload):
                    payload += len(event.data)
                elif not isinstance(
                    event, EndOfStream | PingReceived | PongReceived | CloseReceived
                ):
                    raise Crash(f"unexpected event {event!r}")
        if payload > fed:
            raise Crash(f"{payload} payload bytes out of {fed} fed")
        if violated != parser.failed:
            raise Crash("parser.failed disagrees with the events")


def fuzz_session(data: bytes, selector: int) -> None:
    for role in (Role.SERVER, Role.CLIENT):
        session = RelaySession(role, max_message_bytes=MAX_MESSAGE_BYTES, mask_key=lambda: b"abcd")
        for chunk in _splits(data, selector):
            session.receive_data(memoryview(bytearray(chunk)))
            for frame in session.data_to_send():
                # What the session answers must itself be valid for the peer.
                peer = FrameParser(expect_masked=role is Role.CLIENT)
                for event in peer.receive(memoryview(bytearray(frame))):
                    if isinstance(event, ProtocolViolation):
                        raise Crash(f"session sent an invalid frame: {event!r}")
            session.close_expected()


def fuzz_server_handshake(data: bytes, selector: int) -> None:
    handshake = ServerHandshake(max_head_bytes=MAX_HEAD_BYTES)
    try:
        for chunk in _splits(data, selector):
            request = handshake.receive_data(chunk)
            if request is not None and not isinstance(request, UpgradeRequest):
                raise Crash(f"receive_data returned {request!r}")
    except RemoteProtocolError as exc:
        if not 400 <= exc.close_code <= 599:
            raise Crash(f"refusal with status {exc.close_code}") from exc
        return
    request = handshake.request
    if request is not None:
        if request.is_websocket:
            offered = "migrelay.v1" if "migrelay.v1" in request.subprotocols else None
            response = handshake.accept(offered)
            if not response.startswith(b"HTTP/1.1 101 "):
                raise Crash(f"accept() returned {response[:40]!r}")
        else:
            handshake.refuse(426, "websocket only")


def fuzz_client_handshake(data: bytes, selector: int) -> None:
    handshake = ClientHandshake("relay:8765", "/vm")
    request = handshake.request_bytes()
    key = request.split(b"Sec-WebSocket-Key: ", 1)[1].split(b"\r\n", 1)[0]
    accept = base64.b64encode(hashlib.sha1(key + GUID).digest())
    data = data.replace(ACCEPT_MARKER, accept)
    try:
        for chunk in _splits(data, selector):
            result = handshake.receive_data(chunk)
            if result is not None:
                if not isinstance(result, Accepted):
                    raise Crash(f"receive_data returned {result!r}")
                return
        handshake.receive_eof()
    except (HandshakeRefused, RemoteProtocolError):
        return


TARGETS: dict[str, Callable[[bytes, int], None]] = {
    "parser": fuzz_parser,
    "session": fuzz_session,
    "server-handshake": fuzz_server_handshake,
    "client-handshake": fuzz_client_handshake,
}


def one_input(data: bytes) -> None:
    """Run every target on ``data``; its first byte chooses how the input is split."""
    selector, body = (data[0], data[1:]) if data else (0, b"")
    for target in TARGETS.values():
        target(body, selector)


def seed_corpus() -> list[bytes]:
    """Valid frames and heads for the mutation engine (and atheris' starting points)."""
    key = b"abcd"
    frames = [
        bytes(encode_frame(Opcode.BINARY, b"x" * size, mask, fin))
        for size in (0, 1, 60, 125, 126, 200)
        for mask in (key, None)
        for fin in (True, False)
    ]
    frames += [
        bytes(encode_frame(Opcode.CONTINUATION, b"yy", key)),
        bytes(encode_frame(Opcode.PING, b"hi", key)),
        bytes(encode_frame(Opcode.PONG, b"", None)),
        bytes(encode_close(1000, "bye", key)),
        bytes(encode_close(4002, "", None)),
        b"\x82\xff" + struct.pack("!Q", 1 << 63) + key,
        b"\x82\x7f" + struct.pack("!Q", 70000) + key,
    ]
    request = (
        b"GET /vm HTTP/1.1\r\nHost: relay:8765\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: migrelay.v1\r\n"
        b"Migrelay-Session: abc\r\nMigrelay-Channel: 1\r\n\r\n"
    )
    responses = [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: {ACCEPT}\r\nSec-WebSocket-Protocol: migrelay.v1\r\n\r\n\x82\x00",
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 5\r\nRetry-After: 1\r\n\r\nbusy\n",
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n",
    ]
    singles = [*frames, request, *responses, request + b"".join(frames[:6])]
    return [bytes([selector]) + body for body in singles for selector in (0, 1, 2)]


def mutate(rng: random.Random, data: bytes, corpus: list[bytes]) -> bytes:
    """Apply 1-4 random byte-level mutations (flip, insert, delete, splice, length)."""
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(7)
        position = rng.randrange(len(buffer) + 1)
        if choice == 0 and buffer:
            buffer[position % len(buffer)] ^= 1 << rng.randrange(8)
        elif choice == 1:
            buffer[position:position] = rng.randbytes(rng.randint(1, 8))
        elif choice == 2 and buffer:
            del buffer[position : position + rng.randint(1, 16)]
        elif choice == 3:
            other = rng.choice(corpus)
            start = rng.randrange(len(other) + 1)
            buffer[position:position] = other[start : start + rng.randint(1, 64)]
        elif choice == 4 and buffer:
            buffer[position % len(buffer)] = rng.choice((0, 0x7E, 0x7F, 0x80, 0xFF))
        elif choice == 5:
            buffer[position:position] = rng.choice(
                (b"\r\n", b"\r\n\r\n", b":", b" ", b"\x00", b"HTTP/1.0", b"{ACCEPT}")
            )
        else:
            buffer = bytearray(buffer[:position])
    return bytes(buffer[:4096])


class Stats:
    def __init__(self, crash_dir: Path) -> None:
        self.runs = 0
        self.crashes = 0
        self.crash_dir = crash_dir
        self.started = time.monotonic()

    def run(self, data: bytes) -> None:
        self.runs += 1
        try:
            one_input(data)
        except Exception:
            self.crashes += 1
            self.crash_dir.mkdir(parents=True, exist_ok=True)
            name = hashlib.sha1(data).hexdigest()[:16]
            (self.crash_dir / f"crash-{name}").write_bytes(data)
            if self.crashes <= 5:
                print(f"CRASH on input {data[:80]!r}:", file=sys.stderr)
                traceback.print_exc()

    def report(self, engine: str) -> str:
        elapsed = time.monotonic() - self.started
        return (
            f"engine={engine} runs={self.runs} crashes={self.crashes} "
            f"seconds={elapsed:.0f} runs_per_s={self.runs / max(elapsed, 1e-9):.0f}"
        )


def run_random(seconds: float, seed: int, stats: Stats) -> None:
    rng = random.Random(seed)
    corpus = seed_corpus()
    deadline = time.monotonic() + seconds
    for data in corpus:
        stats.run(data)
    while time.monotonic() < deadline:
        for _ in range(200):
            base = rng.choice(corpus) if rng.random() < 0.9 else rng.randbytes(rng.randint(0, 64))
            stats.run(mutate(rng, base, corpus))


def run_atheris(seconds: float, seed: int, stats: Stats, corpus_dir: Path) -> None:
    import atheris

    corpus_dir.mkdir(parents=True, exist_ok=True)
    for index, data in enumerate(seed_corpus()):
        (corpus_dir / f"seed-{index:03d}").write_bytes(data)
    # Instrumenting every loaded function takes a while: the clock starts after it.
    stats.started = time.monotonic()
    deadline = stats.started + seconds

    def test_one_input(data: bytes) -> None:
        # libFuzzer's own -max_total_time ends with exit() from C, past Python: stop
        # here instead, so the report is printed and the exit status is ours.
        if time.monotonic() >= deadline:
            print(stats.report("atheris"))
            sys.stdout.flush()
            os._exit(1 if stats.crashes else 0)
        stats.run(data)

    argv = [sys.argv[0], f"-seed={seed}", "-max_len=4096", "-print_final_stats=0", str(corpus_dir)]
    atheris.Setup(argv, test_one_input)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="how long to fuzz")
    parser.add_argument("--engine", choices=("auto", "atheris", "random"), default="auto")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--crash-dir", type=Path, default=Path("fuzz-crashes"))
    parser.add_argument("--corpus-dir", type=Path, default=Path("/tmp/migrelay-fuzz-corpus"))
    args = parser.parse_args()
    engine = args.engine
    if engine == "auto":
        try:
            import atheris
        except ImportError:
            engine = "random"
        else:
            engine = "atheris"
    stats = Stats(args.crash_dir)
    if engine == "atheris":
        import atheris

        # Coverage feedback from every Python function loaded so far (migrelay,
        # wsproto, h11); the C mask is not instrumented.
        atheris.instrument_all()
        run_atheris(args.seconds, args.seed, stats, args.corpus_dir)
        return 2  # pragma: no cover - run_atheris exits the process
    run_random(args.seconds, args.seed, stats)
    print(stats.report(engine))
    return 1 if stats.crashes else 0


if __name__ == "__main__":
    sys.exit(main())
