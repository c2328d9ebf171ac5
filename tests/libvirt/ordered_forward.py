"""A unix-socket forwarder that keeps the order of connections: ``python
ordered_forward.py LISTEN TARGET``.

The direct (no migrelay) libvirt migrations forward the destination's sockets to the
source's side. ``socat UNIX-LISTEN:…,fork`` connects each forked child to the target on
its own, so two connections made one after the other may reach the target in the other
order; QEMU 7.2 takes the first connection of a multifd (``--parallel``) migration as
its main channel, and such a run hung until its timeout. Here each accepted connection
is connected to the target before the next one is accepted (what migrelay's relays do
too), then both directions are copied by threads, each passing on its end of stream.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading

CHUNK_BYTES = 1 << 20


def _pump(source: socket.socket, sink: socket.socket, done: threading.Barrier) -> None:
    try:
        while data := source.recv(CHUNK_BYTES):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            sink.shutdown(socket.SHUT_WR)
        if done.wait() == 0:  # the last of the two directions closes both
            source.close()
            sink.close()


def main(listen: str, target: str) -> None:
    temporary = f"{listen}.{os.getpid()}~"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(temporary)
    server.listen(64)
    os.rename(temporary, listen)  # the file appears once it listens
    while True:
        conn, _ = server.accept()
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            peer.connect(target)  # in accept order, before the next accept
        except OSError:
            peer.close()
            conn.close()
            continue
        done = threading.Barrier(2)
        for source, sink in ((conn, peer), (peer, conn)):
            threading.Thread(target=_pump, args=(source, sink, done), daemon=True).start()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
