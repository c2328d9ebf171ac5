"""A measurement prototype, not a relay: WebSocket frames that need no mask, spliced.

Why it exists (issue: the data plane's ceiling): a relay that masks must copy every
byte through user space, as socat does, and XOR it on top. Frames a *server* sends are
not masked (RFC 6455 §5.1), so a deployment where the source host serves could move
QEMU's bytes from its unix socket to TCP with ``splice`` (through a pipe, no copy into
user space), only the frame headers written by the process; the receiving side reads
each header and splices the payload on to its unix socket. This module is that data
path alone, for `migrelay.lab.relaybench` (mode ``splice``): no HTTP handshake, no
control frames, no TLS (TLS needs the bytes in user space, or kernel TLS). It measures
what the copies cost when they stay in the kernel.

Usage, one process per side, forking per connection as socat does::

    python -m migrelay.lab.splicerelay source SRC.sock 127.0.0.1:PORT
    python -m migrelay.lab.splicerelay destination 127.0.0.1:PORT DST.sock
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import sys
from typing import Final

#: Bytes per frame, and the pipe's size (F_SETPIPE_SZ): the relays' 1 MiB reads.
FRAME_BYTES: Final = 1 << 20
_F_SETPIPE_SZ: Final = 1031
_BINARY_FIN: Final = 0x82


def _pipe() -> tuple[int, int]:
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, _F_SETPIPE_SZ, FRAME_BYTES)
    return read_end, write_end


def frame_header(size: int) -> bytes:
    """An unmasked binary frame's header (a server's frame)."""
    if size < 126:
        return bytes([_BINARY_FIN, size])
    if size < 1 << 16:
        return struct.pack("!BBH", _BINARY_FIN, 126, size)
    return struct.pack("!BBQ", _BINARY_FIN, 127, size)


def _move(source: int, destination: int, size: int, pipe: tuple[int, int]) -> None:
    """Splice ``size`` bytes from ``source`` through ``pipe`` into ``destination``."""
    read_end, write_end = pipe
    while size:
        moved = os.splice(source, write_end, size, flags=os.SPLICE_F_MOVE)
        if not moved:
            raise EOFError("the peer closed inside a frame")
        size -= moved
        while moved:
            moved -= os.splice(read_end, destination, moved, flags=os.SPLICE_F_MOVE)


def send_stream(unix: socket.socket, tcp: socket.socket) -> None:
    """QEMU's stream as unmasked frames: headers written, payloads spliced."""
    read_end, write_end = _pipe()
    while True:
        size = os.splice(unix.fileno(), write_end, FRAME_BYTES, flags=os.SPLICE_F_MOVE)
        if not size:
            break
        tcp.sendall(frame_header(size), socket.MSG_MORE)
        while size:
            size -= os.splice(read_end, tcp.fileno(), size, flags=os.SPLICE_F_MOVE)
    tcp.sendall(frame_header(0))  # end of stream (DESIGN.md §3)
    tcp.shutdown(socket.SHUT_WR)


def _exact(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise EOFError("the peer closed inside a header")
        data += chunk
    return data


def receive_stream(tcp: socket.socket, unix: socket.socket) -> None:
    """Unmasked binary frames to the unix socket, payloads spliced, until end of stream."""
    pipe = _pipe()
    while True:
        first, second = _exact(tcp, 2)
        if first & 0x7F not in (0x00, 0x02) or second & 0x80:
            raise ValueError(f"not an unmasked data frame: {first:#x} {second:#x}")
        size = second & 0x7F
        if size == 126:
            (size,) = struct.unpack("!H", _exact(tcp, 2))
        elif size == 127:
            (size,) = struct.unpack("!Q", _exact(tcp, 8))
        if not size:
            break
        _move(tcp.fileno(), unix.fileno(), size, pipe)
    unix.shutdown(socket.SHUT_WR)


def _serve_forking(listener: socket.socket, handle: object) -> None:
    while True:
        conn, _ = listener.accept()
        if os.fork() == 0:
            listener.close()
            try:
                handle(conn)  # type: ignore[operator]
            finally:
                os._exit(0)
        conn.close()
        while True:  # reap what has ended
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if not pid:
                break


def main(argv: list[str]) -> None:
    role, first, second = argv
    if role == "source":
        host, port = second.rsplit(":", 1)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(first)
        listener.listen(16)

        def forward(unix: socket.socket) -> None:
            send_stream(unix, socket.create_connection((host, int(port))))

        _serve_forking(listener, forward)
    elif role == "destination":
        host, port = first.rsplit(":", 1)
        listener = socket.create_server((host, int(port)), reuse_port=False)

        def deliver(tcp: socket.socket) -> None:
            unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            unix.connect(second)
            receive_stream(tcp, unix)

        _serve_forking(listener, deliver)
    else:
        raise SystemExit(f"unknown role {role!r} (source, destination)")


if __name__ == "__main__":
    main(sys.argv[1:])
