"""``migrelay connect``: the source relay, and the WebSocket client it uses.

Source QEMU migrates to a local unix socket; every connection it opens there (the main
channel, then multifd or postcopy-preempt channels) becomes its own WebSocket, opened
when QEMU connects. The handshake names the migration (``Migrelay-Session``) and the
channel's accept order (``Migrelay-Channel``) so the server can connect the channels to
destination QEMU in the same order (DESIGN.md §3).

Only the socket's owners (`ClientConfig.socket_owners`: this user and root by default)
may open a channel: the relay reads the peer's credentials (``SO_PEERCRED``) of every
connection and closes one from any other user at once, before a WebSocket is opened.

With ``workers`` > 1 (`migrelay.aio.workers`) the main loop accepts QEMU's connections,
checks them and numbers them in their session; a worker loop wraps each one, opens its
WebSocket (TLS, proxy) and runs its channel. `SourceRelay._open_channel` runs on the
worker; every other method of `SourceRelay` on the main loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import secrets
import socket
import ssl
import stat
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, cast

from migrelay.aio.channel import Channel, UnixLeg
from migrelay.aio.listener import DescriptorReserve, accept_forever
from migrelay.aio.local import SocketOwners, peer_credentials, storage_socket
from migrelay.aio.proxy import ProxyURL, open_tunnel
from migrelay.aio.runner import RunOnce
from migrelay.aio.tls import check_peer_fingerprint
from migrelay.aio.workers import SocketHandoff, Worker, WorkerPool, abort_channel, call_on, run_on
from migrelay.core.handshake import Accepted, ClientHandshake
from migrelay.core.headers import ChannelLabel, channel_headers
from migrelay.core.session import RelaySession, Role
from migrelay.errors import ConnectError, HandshakeRefused, RelayError, RemoteProtocolError
from migrelay.limits import Limits

logger = logging.getLogger(__name__)

DEFAULT_PORT = {"ws": 80, "wss": 443}


@dataclass(frozen=True)
class WebSocketURL:
    """A parsed ``ws://`` or ``wss://`` URL."""

    secure: bool
    host: str
    port: int
    target: str

    @classmethod
    def parse(cls, url: str) -> WebSocketURL:
        """Parse ``url``; raise ValueError with a one-line reason when it is not one."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("ws", "wss"):
            raise ValueError(f"not a ws:// or wss:// URL: {url}")
        if not parts.hostname:
            raise ValueError(f"URL has no host: {url}")
        target = parts.path or "/"
        if parts.query:
            target += "?" + parts.query
        return cls(
            secure=parts.scheme == "wss",
            host=parts.hostname,
            port=parts.port or DEFAULT_PORT[parts.scheme],
            target=target,
        )

    @property
    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = DEFAULT_PORT["wss" if self.secure else "ws"]
        return host if self.port == default else f"{host}:{self.port}"


@dataclass
class ClientConfig:
    """How the source relay reaches the server."""

    url: str
    token: str | None = None
    headers: Sequence[tuple[str, str]] = ()
    ssl_context: ssl.SSLContext | None = None
    #: SHA-256 of the server certificate to require (with a context from
    #: :func:`migrelay.aio.tls.client_context` that was given the same pin).
    fingerprint: bytes | None = None
    connect_timeout: float = 10.0
    limits: Limits = field(default_factory=Limits)
    #: HTTP CONNECT proxy to reach the server through (:mod:`migrelay.aio.proxy`).
    proxy: ProxyURL | None = None
    #: Seconds a channel keeps QEMU's connection and retries opening its WebSocket
    #: after a transient failure (unreachable, timed out, 502/503/504) before giving up;
    #: 0 gives up at once. Resuming a paused postcopy migration needs it: QEMU 7.2's
    #: source hangs in postcopy-recover for good if a resume connection it made is
    #: dropped, so the relay must wait for the link rather than fail the connection.
    open_retry: float = 0.0
    #: The users whose processes may connect to the relay's unix socket (source QEMU);
    #: a connection from anyone else is closed unread, no WebSocket opened.
    socket_owners: SocketOwners = field(default_factory=SocketOwners.default)
    #: Event loops the channels run on (`migrelay.aio.workers`): 1 runs everything on
    #: the caller's loop; more start that many worker threads.
    workers: int = 1


#: Seconds between two attempts to open a channel's WebSocket (`ClientConfig.open_retry`).
OPEN_RETRY_INTERVAL_S = 1.0


def _transient(exc: BaseException) -> bool:
    """Whether opening a WebSocket may succeed later (the link or the server is down)."""
    if isinstance(exc, HandshakeRefused):
        return exc.status in (502, 503, 504)
    return isinstance(exc, ConnectError | OSError)


class _ClientHandshakeProtocol(asyncio.Protocol):
    def __init__(
        self,
        handshake: ClientHandshake,
        done: asyncio.Future[Accepted],
        fingerprint: bytes | None = None,
    ) -> None:
        self.handshake = handshake
        self.done = done
        self.fingerprint = fingerprint
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = stream = cast(asyncio.Transport, transport)
        if self.fingerprint is not None:
            # The TLS handshake is complete here; check the pin before sending the
            # request, so a token never goes to an impostor.
            try:
                ssl_object = stream.get_extra_info("ssl_object")
                if ssl_object is None:
                    raise ConnectError("a pinned fingerprint needs a wss:// URL")
                check_peer_fingerprint(ssl_object, self.fingerprint)
            except ConnectError as exc:
                self.done.set_exception(exc)
                stream.abort()
                return
        stream.write(self.handshake.request_bytes())

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            # More bytes after the 101 before the channel took over: keep them.
            self.handshake.trailing_data += data
            return
        try:
            accepted = self.handshake.receive_data(data)
        except (HandshakeRefused, RemoteProtocolError) as exc:
            self.done.set_exception(exc)
            assert self.transport is not None
            self.transport.close()
            return
        if accepted is not None:
            assert self.transport is not None
            self.transport.pause_reading()
            self.done.set_result(accepted)

    def eof_received(self) -> bool:
        if not self.done.done():
            try:
                self.handshake.receive_eof()
            except RelayError as exc:
                self.done.set_exception(exc)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            error = ConnectError("connection closed during the handshake", exc)
            self.done.set_exception(error)


async def open_websocket(
    config: ClientConfig, extra_headers: Sequence[tuple[str, str]] = ()
) -> tuple[asyncio.Transport, bytes]:
    """Connect and complete the opening handshake.

    Returns:
        The transport (reading paused) and any bytes received after the 101.

    Raises:
        ConnectError: the server could not be reached or closed early.
        HandshakeRefused: the server answered with an HTTP error.
        RemoteProtocolError: the server's answer was not a valid upgrade.
    """
    url = WebSocketURL.parse(config.url)
    headers = list(config.headers)
    if config.token:
        headers.append(("Authorization", f"Bearer {config.token}"))
    headers.extend(extra_headers)
    handshake = ClientHandshake(
        url.host_header, url.target, headers=headers, max_head_bytes=config.limits.max_head_bytes
    )
    loop = asyncio.get_running_loop()
    done: asyncio.Future[Accepted] = loop.create_future()
    ssl_context = config.ssl_context
    if url.secure and ssl_context is None:
        ssl_context = ssl.create_default_context()
    try:
        transport, _ = await asyncio.wait_for(
            _create_connection(
                config,
                url,
                lambda: _ClientHandshakeProtocol(handshake, done, config.fingerprint),
                ssl_context if url.secure else None,
            ),
            timeout=config.connect_timeout,
        )
    except TimeoutError as exc:
        raise ConnectError(
            f"cannot connect to {url.host_header}",
            TimeoutError(f"timed out after {config.connect_timeout:g} s"),
        ) from exc
    except ssl.SSLError as exc:
        raise ConnectError(f"TLS handshake with {url.host_header} failed", exc) from exc
    except OSError as exc:
        raise ConnectError(f"cannot connect to {url.host_header}", exc) from exc
    sock = transport.get_extra_info("socket")
    # Closing already: connection_made() refused the server (a pin); ``done`` says why.
    closing = transport.is_closing()
    if sock is not None and not closing and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        accepted = await asyncio.wait_for(asyncio.shield(done), timeout=config.connect_timeout)
    except BaseException as exc:
        # Nobody will read ``done`` now: settle it before connection_lost() would set
        # an exception on it that is never retrieved.
        done.cancel()
        transport.abort()
        if isinstance(exc, TimeoutError):
            raise ConnectError(
                f"no handshake answer from {url.host_header}",
                TimeoutError(f"timed out after {config.connect_timeout:g} s"),
            ) from exc
        raise
    if accepted.subprotocol is None:
        transport.abort()
        raise RemoteProtocolError("server did not select subprotocol migrelay.v1", 1002)
    return transport, handshake.trailing_data


async def _create_connection(
    config: ClientConfig,
    url: WebSocketURL,
    factory: Callable[[], asyncio.Protocol],
    ssl_context: ssl.SSLContext | None,
) -> tuple[asyncio.Transport, asyncio.BaseProtocol]:
    """Connect directly, or through ``config.proxy``'s CONNECT tunnel (then TLS in it)."""
    loop = asyncio.get_running_loop()
    hostname = url.host if ssl_context is not None else None
    if config.proxy is None:
        transport, protocol = await loop.create_connection(
            factory, url.host, url.port, ssl=ssl_context, server_hostname=hostname
        )
    else:
        sock = await open_tunnel(config.proxy, url.host, url.port)
        try:
            transport, protocol = await loop.create_connection(
                factory, sock=sock, ssl=ssl_context, server_hostname=hostname
            )
        except BaseException:
            sock.close()
            raise
    return transport, protocol


def prepare_unix_listener(path: Path, mode: int = 0o600) -> socket.socket:
    """Bind a listening unix socket at ``path`` with ``mode``, replacing a stale one.

    A socket file that still has a listener is in use: refuse rather than steal it.
    Anything that is not a socket is never removed.

    Raises:
        RelayError: the path is in use or is not a socket.
    """
    try:
        info = path.lstat()
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(info.st_mode):
            raise RelayError(f"{path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # Non-blocking: a listener with a full backlog (a hung process) would block a
        # plain connect() for good; for a unix socket it fails at once with EAGAIN.
        probe.setblocking(False)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            path.unlink(missing_ok=True)  # stale: nobody listens there
        except BlockingIOError:
            raise RelayError(f"{path} is in use by another listener (not accepting)") from None
        else:
            raise RelayError(f"{path} is in use by another listener")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Bound and listening under a temporary name, then renamed into place: whoever sees
    # the file can connect (a connect between bind() and listen() is refused; seen in
    # the relay bench, whose pushers start when the file appears). A path too long for
    # the temporary name is bound in place.
    temporary = path.with_name(f"{path.name}.{os.getpid()}~")
    bound = temporary if len(os.fsencode(temporary)) < _SUN_PATH_BYTES else path
    # Bind under a umask so the file is never, even briefly, more open than ``mode``.
    old_umask = os.umask(0o777 & ~mode)
    try:
        bound.unlink(missing_ok=True)  # our own leftover: the name holds our pid
        sock.bind(str(bound))
        os.chmod(bound, mode)
        sock.listen(64)
        if bound != path:
            os.rename(bound, path)
    except OSError:
        sock.close()
        if bound != path:
            bound.unlink(missing_ok=True)
        raise
    finally:
        os.umask(old_umask)
    sock.setblocking(False)
    return sock


#: sun_path's size on Linux: a unix socket's path must be shorter.
_SUN_PATH_BYTES: Final = 108


@dataclass
class _SourceSession:
    id: str
    next_channel: int = 0
    next_storage_channel: int = 0
    open_channels: int = 0
    channels: list[Channel] = field(default_factory=list)
    failed: bool = False


class SourceRelay:
    """Listens on a unix socket for source QEMU; one WebSocket per connection.

    Beside it, on `storage_path` (the same path + ``.nbd``), it listens for source
    QEMU's NBD connections (``migrate --copy-storage``): each becomes a storage channel
    of the same session (DESIGN.md §9), numbered apart from the migration channels.

    Args:
        config: how to reach the server.
        listen_path: the unix socket QEMU migrates to.
        once: stop after the first migration session ends.
        mode: the socket file's permissions.
        storage: listen on `storage_path` too (not for ``connect --map``, whose
            sockets are each named by the user: libvirt names its NBD socket itself).
        finished: the `finished` event, shared by the relays of ``connect --map``.
    """

    def __init__(
        self,
        config: ClientConfig,
        listen_path: Path,
        *,
        once: bool = False,
        mode: int = 0o600,
        storage: bool = True,
        finished: asyncio.Event | None = None,
    ) -> None:
        self.config = config
        self.listen_path = listen_path
        self.once = once
        self.mode = mode
        #: Where source QEMU's NBD client connects to copy disks.
        self.storage_path = storage_socket(listen_path)
        self._paths = (listen_path, self.storage_path) if storage else (listen_path,)
        #: Set when ``once`` and the latest session ended; cleared when another begins
        #: (a postcopy migration resumed after a failed link opens a new session).
        self.finished = asyncio.Event() if finished is None else finished
        #: Whether every channel of every finished session ended cleanly.
        self.all_clean = True
        #: The error that kept a channel from opening (a refusal, an unreachable
        #: server), if that was the first problem, for a caller that reports why
        #: QEMU's migration failed.
        self.first_error: RelayError | OSError | None = None
        #: How the first channel that ended badly ended (``channel ID/0: peer silent
        #: for 3 s (liveness timeout)``), for a caller that says why a migration failed.
        self.first_failure: str | None = None
        self._session: _SourceSession | None = None
        self._listeners: list[socket.socket] = []
        self._accept_tasks: list[asyncio.Task[None]] = []
        self._reserve: DescriptorReserve | None = None
        #: The loops the channels run on (the main loop alone for 1).
        self._pool = WorkerPool(config.workers)
        self._tasks: set[asyncio.Task[None]] = set()
        self._channels: set[Channel] = set()
        #: Set while no channel is open (channels end on their own loops).
        self._no_channels = asyncio.Event()
        self._no_channels.set()
        #: What the channels that have ended sent (see `bytes_sent`).
        self._ended_bytes_sent = 0
        self._close_once = RunOnce(self._close)

    @property
    def bytes_sent(self) -> int:
        """Payload bytes sent towards the server by every channel so far, disks included.

        What really leaves the host (plus a few bytes of framing per message): QEMU 7.2
        counts multifd pages before it compresses them.
        """
        return self._ended_bytes_sent + sum(channel.bytes_sent for channel in self._channels)

    @property
    def busy(self) -> bool:
        """Whether a session has a channel open (or opening)."""
        return self._session is not None and self._session.open_channels > 0

    async def start(self) -> None:
        """Start listening. Raises RelayError/OSError when the socket cannot be made."""
        WebSocketURL.parse(self.config.url)  # fail early on a bad URL
        loop = asyncio.get_running_loop()
        try:
            for path in self._paths:
                self._listeners.append(prepare_unix_listener(path, self.mode))
            self._pool.start()
        except BaseException:
            await self._stop_listening()
            raise
        self._reserve = reserve = DescriptorReserve()
        for sock, storage in zip(self._listeners, (False, True)[: len(self._paths)], strict=True):
            self._accept_tasks.append(
                loop.create_task(
                    accept_forever(
                        sock,
                        functools.partial(self._accepted, storage),
                        reserve,
                        self._out_of_descriptors,
                    )
                )
            )
        logger.info("listening on %s, relaying to %s", self.listen_path, self.config.url)
        if len(self._paths) > 1:
            logger.debug("listening for disk copies (NBD) on %s", self.storage_path)

    def _out_of_descriptors(self, exc: OSError) -> None:
        logger.warning(
            "accept on %s failed: %s; dropped the oldest connection", self.listen_path, exc
        )

    async def _stop_listening(self) -> None:
        tasks, self._accept_tasks = self._accept_tasks, []
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        listeners, self._listeners = self._listeners, []
        for sock in listeners:
            sock.close()
        if self._reserve is not None:
            self._reserve.close()
            self._reserve = None
        if not listeners:
            return
        for path in self._paths:
            try:
                if stat.S_ISSOCK(path.lstat().st_mode):
                    path.unlink()
            except FileNotFoundError:
                pass

    async def close(self) -> None:
        """Stop listening, abort open channels, remove the socket files, stop the workers.

        Once begun, closing goes on to its end even if the caller is cancelled: a later
        call waits for the same end.
        """
        await self._close_once()

    async def _close(self) -> None:
        try:
            await self._stop_listening()
            for task in list(self._tasks):
                task.cancel()
            for channel in list(self._channels):
                abort_channel(channel, "relay stopped")
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            if self._pool.threaded:
                # A channel ends on its worker: it must have before the worker stops.
                for channel in list(self._channels):
                    abort_channel(channel, "relay stopped")  # opened meanwhile
                if self._channels:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(
                            self._no_channels.wait(), self.config.limits.close_timeout
                        )
        finally:
            await self._pool.stop(self.config.limits.close_timeout)

    def _refusal(self, sock: socket.socket) -> str | None:
        """Why the process that connected may not open a channel; None if it may."""
        try:
            credentials = peer_credentials(sock)
        except OSError as exc:
            return f"refused a connection on {self.listen_path}: its peer is unknown ({exc})"
        owners = self.config.socket_owners
        if credentials.uid in owners.uids:
            return None
        return (
            f"refused a connection on {self.listen_path} from {credentials.describe()}:"
            f" not an expected socket owner ({owners.describe()}); nothing was relayed"
        )

    def _accepted(self, storage: bool, conn: socket.socket, address: object) -> None:
        """QEMU connected (to the storage socket if ``storage``): number its channel."""
        refusal = self._refusal(conn)
        if refusal is not None:
            # Closed unread, before anything else happens.
            logger.warning("%s", refusal)
            conn.close()
            return
        session = self._session
        if session is None or session.open_channels == 0:
            # A new migration: earlier channels of the last one have all ended.
            session = self._session = _SourceSession(secrets.token_hex(8))
            logger.debug("= new session %s", session.id)
            # Waiting on `finished` means waiting for this session now, not a failed one.
            self.finished.clear()
        if storage:
            label = ChannelLabel(session.next_storage_channel, storage=True)
            session.next_storage_channel += 1
        else:
            label = ChannelLabel(session.next_channel)
            session.next_channel += 1
        session.open_channels += 1
        worker = self._pool.pick()
        worker.load += 1
        handoff = SocketHandoff(conn)
        task = asyncio.get_running_loop().create_task(
            run_on(worker.loop, self._open_channel, handoff, session, label, worker)
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(lambda _: self._not_opened(handoff, session, worker))

    def _not_opened(self, handoff: SocketHandoff, session: _SourceSession, worker: Worker) -> None:
        """A connection whose worker never took it (the relay stopped first)."""
        if handoff.close():
            self._channel_ended(session, None, worker)

    async def _open_channel(
        self, handoff: SocketHandoff, session: _SourceSession, label: ChannelLabel, worker: Worker
    ) -> None:
        """On the channel's worker: wrap QEMU's connection, open the WebSocket, relay."""
        main = self._pool.main_loop
        name = f"{session.id}/{label}"
        headers = channel_headers(session.id, label)
        deadline = time.monotonic() + self.config.open_retry
        retrying = False
        leg: UnixLeg | None = None
        read_bytes = self.config.limits.read_bytes
        try:
            # Reading paused (no channel yet): QEMU's bytes wait in the kernel.
            _, leg = await asyncio.get_running_loop().create_unix_connection(
                lambda: UnixLeg(read_bytes), sock=handoff.take()
            )
            while True:
                try:
                    transport, trailing = await open_websocket(self.config, headers)
                    break
                except (RelayError, OSError) as exc:
                    if not _transient(exc) or leg.early_lost is not None:
                        raise
                    if time.monotonic() + OPEN_RETRY_INTERVAL_S > deadline:
                        raise
                    if not retrying:
                        retrying = True
                        logger.warning(
                            "channel %s: cannot open websocket to %s: %s; retrying for up to %g s",
                            name,
                            self.config.url,
                            exc,
                            self.config.open_retry,
                        )
                    await asyncio.sleep(OPEN_RETRY_INTERVAL_S)
        except asyncio.CancelledError:
            # The relay is closing: QEMU's connection must not outlive it.
            if leg is not None and leg.transport is not None:
                leg.transport.abort()
            call_on(main, self._channel_ended, session, None, worker)
            raise
        except (RelayError, OSError) as exc:
            logger.error("channel %s: cannot open websocket to %s: %s", name, self.config.url, exc)
            if leg is not None and leg.transport is not None:
                # QEMU must see the failure now, not wait on a socket nobody reads.
                leg.transport.abort()
            call_on(main, self._open_failed, session, exc, worker)
            return
        channel = Channel(
            RelaySession(Role.CLIENT, max_message_bytes=self.config.limits.max_message_bytes),
            leg,
            transport,
            self.config.limits,
            name,
            on_closed=lambda ch: call_on(main, self._channel_ended, session, ch, worker),
        )
        # Told before anything the channel does can tell the main loop it closed.
        call_on(main, self._channel_opened, session, channel, worker)
        where = self.storage_path if label.storage else self.listen_path
        logger.info("channel %s opened: %s -> %s", name, where, self.config.url)
        channel.start(trailing)

    def _channel_opened(self, session: _SourceSession, channel: Channel, worker: Worker) -> None:
        self._channels.add(channel)
        self._no_channels.clear()
        session.channels.append(channel)
        worker.channels += 1

    def _open_failed(
        self, session: _SourceSession, exc: RelayError | OSError, worker: Worker
    ) -> None:
        self._note_failing_channels()
        if self.first_error is None and self.first_failure is None:
            # Only as the first problem: after a channel failed, QEMU's NBD client
            # reconnects once (QEMU 7.2), and that attempt failing too is no cause.
            self.first_error = exc
        session.failed = True
        self._channel_ended(session, None, worker)

    def _note_failing_channels(self) -> None:
        """Record, as `first_failure`, a channel that failed but has not ended yet.

        A channel ends only after its close handshake, seconds after it failed (a dead
        peer never answers): what QEMU does meanwhile must not pass for the cause.
        """
        if self.first_failure is not None:
            return
        for channel in self._channels:
            if channel.end_reason is not None:
                self.first_failure = f"channel {channel.name}: {channel.end_reason}"
                return

    def _channel_ended(
        self, session: _SourceSession, channel: Channel | None, worker: Worker
    ) -> None:
        worker.load -= 1
        if channel is not None:
            worker.channels -= 1
            self._channels.discard(channel)
            if not self._channels:
                self._no_channels.set()
            self._ended_bytes_sent += channel.bytes_sent
            if not channel.clean:
                session.failed = True
                if self.first_failure is None:
                    self.first_failure = (
                        f"channel {channel.name}: {channel.session.outcome().description}"
                    )
        session.open_channels -= 1
        if session.open_channels == 0:
            if session.failed:
                self.all_clean = False
            logger.info(
                "session %s ended: %d channel(s), %s",
                session.id,
                session.next_channel + session.next_storage_channel,
                # Not "completed": the relay cannot tell (ChannelOutcome).
                "failed" if session.failed else "closed cleanly",
            )
            if self.once:
                self.finished.set()
