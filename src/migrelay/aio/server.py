"""``migrelay serve``: the destination relay.

Accepts WebSocket upgrades, checks them (path, subprotocol, token, session order),
connects the destination unix socket, and only then answers 101 (DESIGN.md §3), so a
client that got 101 knows its bytes reach QEMU. Every refusal is an HTTP status with a
one-line body and one log line; a refused or failed connection never disturbs another.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, cast

from ..config import Limits
from ..core.handshake import SUBPROTOCOL, ServerHandshake, UpgradeRequest
from ..core.session import RelaySession, Role
from ..errors import RemoteProtocolError
from .channel import Channel, UnixLeg

logger = logging.getLogger(__name__)

#: DESIGN.md §3: a session name; anything else is 404 before the host is touched.
TARGET_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: Migrelay-Session values: opaque ids chosen by the source relay.
SESSION_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
#: Highest channel number accepted (QEMU's multifd allows up to 255 channels).
MAX_CHANNEL: Final = 256
#: Seconds between attempts to connect a destination socket that is not there yet.
TARGET_RETRY_SECONDS: Final = 0.05


class Refusal(Exception):
    """Refuse the upgrade with an HTTP status; ``reason`` is sent and logged."""

    def __init__(self, status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers


def load_tokens(path: Path) -> list[bytes]:
    """Read bearer tokens, one a line; blank lines and ``#`` comments are skipped."""
    tokens = []
    for line in path.read_text(encoding="utf-8").splitlines():
        token = line.strip()
        if token and not token.startswith("#"):
            tokens.append(token.encode("utf-8"))
    return tokens


@dataclass
class ServerConfig:
    """What ``migrelay serve`` was told (flags, environment, config file)."""

    host: str = "127.0.0.1"
    port: int = 8765
    target: Path | None = None
    target_dir: Path | None = None
    tokens: list[bytes] = field(default_factory=list)
    ssl_context: ssl.SSLContext | None = None
    #: Seconds to wait for the destination socket to appear (and for earlier channels).
    wait_target: float = 30.0
    max_sessions: int = 64
    limits: Limits = field(default_factory=Limits)


@dataclass
class _MigrationSession:
    """The channels of one migration, connected to the destination in order."""

    id: str
    target: Path
    connected: list[asyncio.Future[None]] = field(default_factory=list)
    claimed: set[int] = field(default_factory=set)
    channels: set[Channel] = field(default_factory=set)
    pending: int = 0

    def slot(self, number: int) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        while len(self.connected) <= number:
            self.connected.append(loop.create_future())
        return self.connected[number]


class RelayServer:
    """The destination relay's listener and its sessions."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.sessions: dict[str, _MigrationSession] = {}
        self.channels: set[Channel] = set()
        self._server: asyncio.Server | None = None
        self._connections: set[_HandshakeProtocol] = set()
        self._anonymous = 0
        #: Called with each channel when it closes (used by tests and metrics).
        self.on_channel_closed: Callable[[Channel], None] | None = None

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets (to learn the port when 0 was asked for)."""
        assert self._server is not None
        return list(self._server.sockets)

    async def start(self) -> None:
        """Start listening. Raises OSError when the address is unavailable."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _HandshakeProtocol(self),
            self.config.host,
            self.config.port,
            ssl=self.config.ssl_context,
            reuse_address=True,
            backlog=128,
        )
        for sock in self._server.sockets:
            logger.info(
                "listening on %s://%s",
                "wss" if self.config.ssl_context else "ws",
                _format_address(sock.getsockname()),
            )

    async def serve_forever(self) -> None:
        """Serve until cancelled."""
        assert self._server is not None
        await self._server.serve_forever()

    async def close(self) -> None:
        """Stop listening and close every connection and channel."""
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.abort()
        for channel in list(self.channels):
            channel.abort("relay stopped")
        waits = [channel.closed.wait() for channel in self.channels]
        if waits:
            await asyncio.wait_for(asyncio.gather(*waits), timeout=5)
        if self._server is not None:
            await self._server.wait_closed()

    # -- routing -------------------------------------------------------------------------

    def resolve_target(self, request: UpgradeRequest) -> tuple[str, Path]:
        """Map the request path to a destination socket (DESIGN.md §3 "Path")."""
        path = request.path
        config = self.config
        if path == "/":
            if config.target is None:
                raise Refusal(404, "no default target: use /NAME")
            return "/", config.target
        name = path[1:]
        if not TARGET_NAME_RE.fullmatch(name):
            raise Refusal(404, "unknown target")
        if config.target_dir is None:
            raise Refusal(404, "unknown target")
        return name, config.target_dir / f"{name}.sock"

    def authenticate(self, request: UpgradeRequest) -> None:
        """Check the bearer token in constant time against every configured token."""
        tokens = self.config.tokens
        if not tokens:
            return
        header = request.headers.get("authorization", "")
        scheme, _, credential = header.partition(" ")
        if scheme.lower() != "bearer" or not credential:
            raise Refusal(401, "authentication required", (("WWW-Authenticate", "Bearer"),))
        given = credential.strip().encode("utf-8")
        # Compare with every token, without stopping at a match, so the time taken
        # says nothing about which token (if any) matched.
        matched = False
        for token in tokens:
            matched |= hmac.compare_digest(given, token)
        if not matched:
            raise Refusal(
                403 if header else 401, "invalid token", (("WWW-Authenticate", "Bearer"),)
            )

    async def handle_upgrade(
        self, connection: _HandshakeProtocol, request: UpgradeRequest
    ) -> None:
        """Check and route one upgrade; answer 101 once the unix side is connected."""
        peer = connection.peer
        if not request.is_websocket:
            connection.respond_plain(request)
            return
        if SUBPROTOCOL not in request.subprotocols:
            raise Refusal(400, f"subprotocol {SUBPROTOCOL} required")
        self.authenticate(request)
        name, target = self.resolve_target(request)
        session_id = request.headers.get("migrelay-session")
        channel_text = request.headers.get("migrelay-channel", "0")
        if session_id is None:
            # A standard client: a session of one channel (DESIGN.md §3).
            self._anonymous += 1
            session_id = f"anon-{self._anonymous}"
            if "migrelay-channel" in request.headers:
                raise Refusal(400, "Migrelay-Channel without Migrelay-Session")
        elif not SESSION_ID_RE.fullmatch(session_id):
            raise Refusal(400, "invalid Migrelay-Session")
        if not channel_text.isdigit() or int(channel_text) >= MAX_CHANNEL:
            raise Refusal(400, "invalid Migrelay-Channel")
        number = int(channel_text)

        session = self.sessions.get(session_id)
        if session is None:
            if len(self.sessions) >= self.config.max_sessions:
                raise Refusal(
                    503,
                    f"too many sessions (limit {self.config.max_sessions})",
                    (("Retry-After", "5"),),
                )
            session = _MigrationSession(session_id, target)
            self.sessions[session_id] = session
        if session.target != target:
            raise Refusal(409, f"session {session_id} belongs to another target")
        if number in session.claimed:
            raise Refusal(409, f"channel {number} of session {session_id} repeated")
        session.claimed.add(number)
        session.pending += 1
        try:
            unix = await self._connect_in_order(session, number, target)
        finally:
            session.pending -= 1
            self._forget_if_idle(session)
        channel_name = f"{session_id}/{number}"
        transport = connection.transport
        if transport is None or transport.is_closing():
            # The client left while we waited; let QEMU see a closed connection.
            assert unix.transport is not None
            unix.transport.close()
            logger.info("channel %s abandoned by %s before 101", channel_name, peer)
            return
        transport.write(connection.handshake.accept(SUBPROTOCOL))
        channel = Channel(
            RelaySession(Role.SERVER, max_message_bytes=self.config.limits.max_message_bytes),
            unix,
            transport,
            self.config.limits,
            channel_name,
            on_closed=lambda ch: self._channel_closed(session, ch),
        )
        connection.handed_over = True
        self._connections.discard(connection)
        self.channels.add(channel)
        session.channels.add(channel)
        logger.info(
            "channel %s opened: %s -> %s (%s)",
            channel_name,
            peer,
            target,
            "target /" if name == "/" else f"target {name}",
        )
        channel.start(connection.handshake.trailing_data)
        transport.resume_reading()

    async def _connect_in_order(
        self, session: _MigrationSession, number: int, target: Path
    ) -> UnixLeg:
        wait = self.config.wait_target
        if number > 0:
            # QEMU tells channels apart by the order they connect: channel N goes to
            # the destination only after channels 0..N-1 did.
            previous = session.slot(number - 1)
            try:
                await asyncio.wait_for(asyncio.shield(previous), timeout=wait)
            except TimeoutError:
                raise Refusal(
                    409,
                    f"channel {number} arrived but channel {number - 1} did not within {wait:g} s",
                ) from None
            except Exception:
                raise Refusal(409, f"channel {number - 1} of this session failed") from None
        slot = session.slot(number)
        try:
            unix = await self._connect_target(target, wait)
        except BaseException as exc:
            # Later channels of this session wait on this slot: fail them too.
            if not slot.done():
                slot.set_exception(RuntimeError(f"channel {number} failed: {exc!r}"))
                slot.exception()  # retrieved: later channels may never ask
            raise
        if not slot.done():
            slot.set_result(None)
        return unix

    async def _connect_target(self, target: Path, wait: float) -> UnixLeg:
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + wait
        read_bytes = self.config.limits.read_bytes
        while True:
            try:
                _, leg = await loop.create_unix_connection(
                    lambda: UnixLeg(read_bytes), str(target)
                )
                return leg
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                # The original workflow starts the relay before QEMU listens.
                if time.monotonic() >= deadline:
                    reason = "does not exist" if isinstance(exc, FileNotFoundError) else "refused"
                    raise Refusal(
                        503,
                        f"destination socket {reason} after {wait:g} s",
                        (("Retry-After", "1"),),
                    ) from None
                await asyncio.sleep(TARGET_RETRY_SECONDS)
            except OSError as exc:
                logger.warning("cannot connect %s: %s", target, exc)
                raise Refusal(
                    503, "destination socket unreachable", (("Retry-After", "1"),)
                ) from None

    def _channel_closed(self, session: _MigrationSession, channel: Channel) -> None:
        self.channels.discard(channel)
        session.channels.discard(channel)
        self._forget_if_idle(session)
        if self.on_channel_closed is not None:
            self.on_channel_closed(channel)

    def _forget_if_idle(self, session: _MigrationSession) -> None:
        if not session.channels and not session.pending:
            self.sessions.pop(session.id, None)


def _format_address(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


class _HandshakeProtocol(asyncio.Protocol):
    """A connection until its upgrade is accepted (then the channel takes over)."""

    def __init__(self, server: RelayServer) -> None:
        self.server = server
        self.handshake = ServerHandshake(server.config.limits.max_head_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.handed_over = False
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.peer = _format_address(transport.get_extra_info("peername"))
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # The return path and postcopy page requests are small and latency-bound.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server._connections.add(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(
            self.server.config.limits.handshake_timeout, self._handshake_timed_out
        )

    def data_received(self, data: bytes) -> None:
        if self._task is not None:
            self.handshake.receive_data(data)  # trailing bytes, kept for the channel
            return
        try:
            request = self.handshake.receive_data(data)
        except RemoteProtocolError as exc:
            self._refuse(Refusal(exc.close_code, str(exc)))
            return
        if request is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        assert self.transport is not None
        self.transport.pause_reading()
        self._task = asyncio.get_running_loop().create_task(self._handle(request))

    async def _handle(self, request: UpgradeRequest) -> None:
        try:
            await self.server.handle_upgrade(self, request)
        except Refusal as refusal:
            self._refuse(refusal, request)
        except Exception:
            logger.exception("internal error while handling %s from %s", request.path, self.peer)
            self._refuse(Refusal(500, "internal error"), request)

    def respond_plain(self, request: UpgradeRequest) -> None:
        """Answer a request that is not an upgrade (health checks)."""
        if request.path == "/healthz":
            self._send_and_close(self.handshake.respond(200, b"ok\n"))
            return
        raise Refusal(426, "this is a migrelay websocket endpoint", (("Upgrade", "websocket"),))

    def _refuse(self, refusal: Refusal, request: UpgradeRequest | None = None) -> None:
        what = f"{request.path}" if request is not None else "request"
        logger.info("refused %s from %s: %d %s", what, self.peer, refusal.status, refusal.reason)
        try:
            response = self.handshake.refuse(refusal.status, refusal.reason, refusal.headers)
        except Exception:  # already answered
            response = b""
        self._send_and_close(response)

    def _send_and_close(self, response: bytes) -> None:
        transport = self.transport
        if transport is not None and not transport.is_closing():
            if response:
                transport.write(response)
            transport.close()

    def _handshake_timed_out(self) -> None:
        limit = self.server.config.limits.handshake_timeout
        self._refuse(Refusal(408, f"no complete request within {limit:g} s"))

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server._connections.discard(self)
        if self._timer is not None:
            self._timer.cancel()
        if self._task is not None and not self._task.done() and not self.handed_over:
            self._task.cancel()
