"""The listening side of ``serve``: sockets, the accept loop, and what it admits.

``asyncio``'s ``create_server`` hides three things a server on a shared host must
control, so ``serve`` accepts connections itself:

* **Who is still in their handshake.** A connection counts from ``accept()`` until its
  HTTP request is complete, the TLS handshake included (with ``create_server(ssl=…)``
  the protocol sees a connection only once TLS is done, so a flood of half-open TLS
  connections would be invisible). :class:`Admission` caps them globally and per
  client address, as OpenSSH's ``MaxStartups`` and HAProxy's ``maxconn`` do; one over
  the cap is closed at once, without a byte read.
* **Which TLS context a connection gets.** Each accepted socket is wrapped with the
  server's *current* context (``connect_accepted_socket``), so a SIGHUP that removes a
  client CA replaces the whole context, its session cache and ticket keys included: a
  client certificate cannot come back through TLS session resumption.
* **Running out of descriptors.** :class:`DescriptorReserve` keeps one spare descriptor
  (nginx's trick) so that, at ``EMFILE``, the loop can still accept and close the
  connection at the head of the queue instead of spinning on it; the admission caps
  are sized from ``RLIMIT_NOFILE`` (:func:`raise_descriptor_limit`) so that channels'
  unix connects always find a descriptor.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

logger = logging.getLogger(__name__)

__all__ = [
    "Admission",
    "DescriptorReserve",
    "accept_forever",
    "open_listeners",
    "raise_descriptor_limit",
]

#: Seconds the accept loop waits after ENFILE/ENOBUFS (the system, not us, is out).
ACCEPT_BACKOFF_SECONDS: Final = 0.1
#: Descriptors ``serve`` keeps free beyond its caps: logs, the metrics scrape, QMP.
SPARE_DESCRIPTORS: Final = 64


@dataclass
class Admission:
    """Connections still in their handshake, counted globally and per client address.

    Args:
        max_total: most connections in handshake at once (``--max-handshakes``).
        max_per_address: most of them from one client address
            (``--max-handshakes-per-address``); a proxy in front of the relay is one
            address, so give it ``--trusted-proxy`` and a larger figure.
    """

    max_total: int
    max_per_address: int
    total: int = 0
    by_address: dict[str, int] = field(default_factory=dict)

    def admit(self, address: str) -> str | None:
        """Count a new connection from ``address``; return why not when it is over a cap."""
        if self.total >= self.max_total:
            return f"{self.total} connections in handshake (limit {self.max_total})"
        count = self.by_address.get(address, 0)
        if count >= self.max_per_address:
            return f"{count} connections in handshake from it (limit {self.max_per_address})"
        self.total += 1
        self.by_address[address] = count + 1
        return None

    def release(self, address: str) -> None:
        """The connection from ``address`` finished its handshake or went away."""
        self.total -= 1
        count = self.by_address.get(address, 0) - 1
        if count > 0:
            self.by_address[address] = count
        else:
            self.by_address.pop(address, None)


def raise_descriptor_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one; return the soft limit now.

    Python keeps the shell's soft limit (often 1,024), far below what the system
    allows: 1,000 idle sockets would then leave no descriptor for a channel.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        target = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    return soft


class DescriptorReserve:
    """One descriptor held back for the moment ``accept()`` fails with EMFILE.

    The listening socket stays readable while a connection waits in its queue; without
    a free descriptor the loop could neither accept it nor make it go away. Freeing the
    spare lets the loop accept that connection and close it at once.
    """

    def __init__(self) -> None:
        self._fd: int | None = None
        self.acquire()

    def acquire(self) -> None:
        if self._fd is None:
            with contextlib.suppress(OSError):
                self._fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)

    def shed_one(self, listener: socket.socket) -> None:
        """Out of descriptors: accept and drop the first waiting connection."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            conn.close()
        self.acquire()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def open_listeners(host: str, port: int, backlog: int) -> list[socket.socket]:
    """Bind and listen on every address ``host`` resolves to (non-blocking sockets).

    Raises:
        OSError: an address cannot be bound (the sockets bound so far are closed).
    """
    infos = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    seen: set[tuple[object, ...]] = set()
    try:
        for family, kind, proto, _, address in infos:
            if (family, address) in seen:
                continue
            seen.add((family, address))
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                # One socket per family, as asyncio's create_server does.
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(backlog)
            sock.setblocking(False)
            if port == 0:
                # Every family on the same port, as create_server does.
                port = sock.getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


async def accept_forever(
    listener: socket.socket,
    on_accept: Callable[[socket.socket, object], None],
    reserve: DescriptorReserve,
    on_exhausted: Callable[[OSError], None],
) -> None:
    """Accept connections on ``listener`` until cancelled; hand each to ``on_accept``."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            conn, address = await loop.sock_accept(listener)
        except OSError as exc:
            if exc.errno == errno.EMFILE:
                on_exhausted(exc)
                reserve.shed_one(listener)
            elif exc.errno in (errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                on_exhausted(exc)
                await asyncio.sleep(ACCEPT_BACKOFF_SECONDS)
            elif exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                continue  # the client left before we accepted it
            else:
                raise
            continue
        conn.setblocking(False)
        on_accept(conn, address)
