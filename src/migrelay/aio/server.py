"""``migrelay serve``: the destination relay.

Accepts WebSocket upgrades, checks them (path, subprotocol, token, session order),
connects the destination unix socket, and only then answers 101 (DESIGN.md §3), so a
client that got 101 knows its bytes reach QEMU. Every refusal is an HTTP status with a
one-line body and one log line; a refused or failed connection never disturbs another.

With ``workers`` > 1 (`migrelay.aio.workers`) the main loop accepts, admits and decides
(sessions, quotas, order, the destination's connect, metrics) and a worker loop runs
each connection: its TLS and HTTP handshakes, then its channel. `_HandshakeProtocol`
and `RelayServer._attach` run on the connection's worker; every other method of
`RelayServer` on the main loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, cast

from migrelay.aio import access
from migrelay.aio.channel import Channel, UnixLeg
from migrelay.aio.listener import (
    SPARE_DESCRIPTORS,
    Admission,
    DescriptorReserve,
    accept_forever,
    open_listeners,
    raise_descriptor_limit,
)
from migrelay.aio.local import PeerRefused, SocketOwners, connect_socket, storage_socket
from migrelay.aio.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE, RelayMetrics
from migrelay.aio.ratelimit import LogLimiter, clip
from migrelay.aio.runner import RunOnce
from migrelay.aio.workers import (
    DESCRIPTORS_PER_WORKER,
    SocketHandoff,
    Worker,
    WorkerPool,
    abort_channel,
    call_on,
    close_channel,
    run_on,
)
from migrelay.core.frames import CloseCode
from migrelay.core.handshake import SUBPROTOCOL, ServerHandshake, UpgradeRequest
from migrelay.core.headers import (
    CHANNEL_HEADER,
    SESSION_HEADER,
    ChannelLabel,
    parse_channel_label,
    parse_session_id,
)
from migrelay.core.session import RelaySession, Role
from migrelay.errors import Refusal, RemoteProtocolError
from migrelay.limits import Limits

logger = logging.getLogger(__name__)

#: DESIGN.md §3: a session name; anything else is 404 before the host is touched.
TARGET_NAME_RE: Final = access.TARGET_NAME_RE
#: The principal of requests without a token (a server without ``--token-file``).
ANONYMOUS: Final = "-"
#: Longest request path quoted in a log line; the rest is cut (logs are not for rent).
LOGGED_PATH_CHARS: Final = 64
#: Refusal log lines: a burst of this many, then `REFUSAL_LOG_RATE` a second.
REFUSAL_LOG_BURST: Final = 100
REFUSAL_LOG_RATE: Final = 10.0
#: Seconds between attempts to connect a destination socket that is not there yet.
TARGET_RETRY_SECONDS: Final = 0.05
#: The Content-Type of ``/healthz``.
PLAIN_TEXT: Final = "text/plain; charset=utf-8"


#: ``prepare_target(name, target, request_headers)``: see `ServerConfig.prepare_target`.
PrepareTarget = Callable[[str, Path, Mapping[str, str]], Awaitable[object]]
#: ``finish_target(name, target, request_headers)``: see `ServerConfig.finish_target`.
FinishTarget = Callable[[str, Path, Mapping[str, str]], Awaitable[object]]
#: Seconds `RelayServer.close` waits for `ServerConfig.finish_target` calls under way.
FINISH_TIMEOUT_S: Final = 10.0


@dataclass
class ServerConfig:
    """What ``migrelay serve`` was told (flags, environment, config file)."""

    host: str = "127.0.0.1"
    port: int = 8765
    target: Path | None = None
    target_dir: Path | None = None
    #: ``--target-map NAME=PATH``: the path ``/NAME`` reaches PATH, any unix socket
    #: (opened without following a symlink, its listener's owner checked as any
    #: target's). A mapped name wins over ``target_dir``'s ``NAME.sock``.
    target_map: Mapping[str, Path] = field(default_factory=dict)
    #: Targets only a token that lists them may open (`access.privileged_targets`): an
    #: any-target token, or no token at all, is refused with 403.
    privileged_targets: frozenset[str] = frozenset()
    #: ``--token-file``: each secret with its name and the targets it may reach.
    tokens: Sequence[access.TokenEntry] = ()
    ssl_context: ssl.SSLContext | None = None
    #: Seconds to wait for the destination socket to appear (and for earlier channels).
    wait_target: float = 30.0
    max_sessions: int = 64
    #: Most sessions one token (or, without tokens, everyone) may hold at once.
    max_sessions_per_token: int = 16
    #: Most sessions to one target at once: a VM is one migration at a time; a few
    #: more let a retry start while the failed attempt's channels wind down.
    max_sessions_per_target: int = 4
    #: Most connections still in their handshake (TCP accepted, TLS and HTTP request
    #: not yet complete), in all and from one client address (see `listener.Admission`).
    max_handshakes: int = 512
    max_handshakes_per_address: int = 32
    #: Who may listen at a destination socket (``SO_PEERCRED``; `local.SocketOwners`).
    socket_owners: SocketOwners = field(default_factory=SocketOwners.default)
    limits: Limits = field(default_factory=Limits)
    #: Awaited once per session, before its first channel connects the destination
    #: socket, with the session's name (``/`` or ``NAME``), that socket's path and the
    #: first request's headers (names in lower case). ``serve --qmp`` issues
    #: ``migrate-incoming`` here. It may raise `Refusal` to choose the answer; any other
    #: exception refuses every channel of the session with 503.
    prepare_target: PrepareTarget | None = None
    #: Awaited once a prepared session has ended (its last channel closed), unless
    #: another session to the same target is under way, with the same arguments as
    #: `prepare_target`: ``serve --qmp`` removes the disk exports it added there. A
    #: later session's `prepare_target` for that target waits for it. Errors are logged.
    finish_target: FinishTarget | None = None
    #: Accepted ``Origin`` values (normalized, see `access.parse_origin`). Without
    #: tokens, a request with an Origin (a browser) is refused unless it is listed;
    #: with tokens, an empty list accepts any (a browser cannot send the token).
    allowed_origins: frozenset[str] = frozenset()
    #: Without tokens, ``Host`` must name the listener or one of these (DNS rebinding).
    allowed_hosts: frozenset[str] = frozenset()
    #: Peers whose ``X-Forwarded-For`` names the client in log lines (reverse proxies).
    trusted_proxies: tuple[access.IPNetwork, ...] = ()
    #: Path prefix a reverse proxy forwards under (``/migrelay``), or "".
    path_prefix: str = ""
    #: Most channels of one session (QEMU: 1 main + multifd channels + 1 preempt).
    max_channels: int = 64
    #: Seconds without a byte in either direction before a channel is closed with
    #: 4002; 0 turns the idle timeout off.
    idle_timeout: float = 0.0
    #: Bearer tokens that may read ``/metrics``; empty: ``/metrics`` is open to anyone
    #: who reaches the port (``/healthz`` always is: load balancers probe it).
    metrics_tokens: Sequence[access.TokenEntry] = ()
    #: Event loops the connections run on (`migrelay.aio.workers`): 1 runs everything
    #: on the caller's loop; more start that many worker threads.
    workers: int = 1


def check_bearer(
    request: UpgradeRequest, tokens: Sequence[access.TokenEntry]
) -> access.TokenEntry | None:
    """Check the bearer token against ``tokens`` (`access.match_token`: constant time).

    Returns:
        The token that matched (None when ``tokens`` is empty: nothing to check).

    Raises:
        Refusal: 401 without a bearer token, 403 (``invalid_token``) with a wrong one.
    """
    if not tokens:
        return None
    header = request.headers.get("authorization", "")
    scheme, _, credential = header.partition(" ")
    if scheme.lower() != "bearer" or not credential:
        raise Refusal(401, "authentication required", (("WWW-Authenticate", "Bearer"),))
    matched = access.match_token(credential.strip().encode("utf-8"), tokens)
    if matched is None:
        raise Refusal(
            403 if header else 401,
            "invalid token",
            (("WWW-Authenticate", "Bearer"),),
            kind="invalid_token",
        )
    return matched


@dataclass
class _MigrationSession:
    """The channels of one migration, connected to the destination in order."""

    id: str
    target: Path
    #: The token's name (or `ANONYMOUS`) that opened it: only it may add channels.
    principal: str
    #: The target's name (``/`` or NAME), for quotas.
    target_name: str
    #: Its key in `RelayServer.sessions`.
    key: tuple[str, str]
    connected: list[asyncio.Future[None]] = field(default_factory=list)
    #: The channel labels (``0``, ``storage-0`` …) already taken.
    claimed: set[str] = field(default_factory=set)
    channels: set[Channel] = field(default_factory=set)
    pending: int = 0
    #: The `ServerConfig.prepare_target` call, shared by all channels of the session.
    prepared: asyncio.Future[None] | None = None
    #: The first request's headers, for `ServerConfig.finish_target`.
    headers: Mapping[str, str] = field(default_factory=dict)

    def slot(self, number: int) -> asyncio.Future[None]:
        loop = asyncio.get_running_loop()
        while len(self.connected) <= number:
            self.connected.append(loop.create_future())
        return self.connected[number]


@dataclass(frozen=True)
class _Opened:
    """A channel about to open: what the main loop registers it under."""

    session: _MigrationSession
    #: ``session/label``.
    name: str
    target_name: str


class RelayServer:
    """The destination relay's listener and its sessions."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        #: Keyed by (principal, session id): a session id names a session only for the
        #: token that opened it, so no tenant can join, claim or even see another's.
        self.sessions: dict[tuple[str, str], _MigrationSession] = {}
        self.channels: set[Channel] = set()
        self._listeners: list[socket.socket] = []
        self._accept_tasks: list[asyncio.Task[None]] = []
        #: The loops connections and channels run on (the main loop alone for 1).
        self._pool = WorkerPool(config.workers)
        #: Connections until their TLS handshake is done (main loop tasks).
        self._opening: set[asyncio.Task[None]] = set()
        #: Connections in their handshake, per worker (each set is its worker's own).
        self._connections: dict[Worker, set[_HandshakeProtocol]] = {}
        #: Upgrade requests being checked, routed and connected (main loop tasks).
        self._upgrading: dict[_HandshakeProtocol, asyncio.Task[None]] = {}
        self._closing = False
        self._close_once = RunOnce(self._close)
        self.admission = Admission(config.max_handshakes, config.max_handshakes_per_address)
        self._reserve: DescriptorReserve | None = None
        #: Refusals and dropped connections are logged at most this often: a burst of
        #: `REFUSAL_LOG_BURST` lines, then `REFUSAL_LOG_RATE` a second; each line that
        #: follows a gap says how many were not logged (the metrics count them all).
        self.refusal_log = LogLimiter(rate_per_s=REFUSAL_LOG_RATE, burst=REFUSAL_LOG_BURST)
        #: Called with each channel when it closes (used by tests and metrics).
        self.on_channel_closed: Callable[[Channel], None] | None = None
        self.metrics = RelayMetrics(self.sessions, self.channels)
        #: Set by :meth:`shutdown`: new sessions are refused with 503.
        self.draining = False
        #: Set once draining and the last session has ended.
        self._drained = asyncio.Event()
        #: Set while no channel is open (channels end on their own loops).
        self._no_channels = asyncio.Event()
        self._no_channels.set()
        self._idle_task: asyncio.Task[None] | None = None
        #: `ServerConfig.finish_target` calls under way, by target name.
        self._finishing: dict[str, asyncio.Task[None]] = {}

    @property
    def sockets(self) -> list[socket.socket]:
        """The listening sockets (to learn the port when 0 was asked for)."""
        return list(self._listeners)

    async def start(self) -> None:
        """Start listening. Raises OSError when the address is unavailable."""
        loop = asyncio.get_running_loop()
        self._check_descriptor_budget(raise_descriptor_limit())
        self._listeners = open_listeners(self.config.host, self.config.port, backlog=128)
        try:
            self._pool.start()
        except BaseException:
            self._stop_listening()
            raise
        self._connections = {worker: set() for worker in self._pool.workers}
        self._reserve = DescriptorReserve()
        for sock in self._listeners:
            self._accept_tasks.append(
                loop.create_task(
                    accept_forever(sock, self._accepted, self._reserve, self._out_of_descriptors)
                )
            )
            logger.info(
                "listening on %s://%s",
                "wss" if self.config.ssl_context else "ws",
                _format_address(sock.getsockname()),
            )
        if self.config.idle_timeout > 0:
            self._idle_task = loop.create_task(self._watch_idle(self.config.idle_timeout))

    def _check_descriptor_budget(self, limit: int) -> None:
        """Shrink the handshake cap when RLIMIT_NOFILE could not hold it with every channel.

        A channel takes two descriptors (WebSocket and unix); sessions, channels and
        handshakes at their caps, plus `SPARE_DESCRIPTORS`, must fit in the limit, or
        idle connections could leave a migration's unix connect without a descriptor.
        """
        config = self.config
        channels = config.max_sessions * config.max_channels * 2
        loops = DESCRIPTORS_PER_WORKER * self._pool.count if self._pool.threaded else 0
        room = limit - channels - SPARE_DESCRIPTORS - loops
        if room < self.admission.max_total:
            cap = max(room, 16)
            logger.warning(
                "RLIMIT_NOFILE is %d: handshake cap lowered from %d to %d so that %d sessions "
                "of %d channels keep their descriptors",
                limit,
                self.admission.max_total,
                cap,
                config.max_sessions,
                config.max_channels,
            )
            self.admission.max_total = cap
            self.admission.max_per_address = min(self.admission.max_per_address, cap)

    def _accepted(self, conn: socket.socket, address: object) -> None:
        client = str(address[0]) if isinstance(address, tuple) and address else "?"
        why_not = self.admission.admit(client)
        if why_not is not None:
            # Closed without reading a byte: an idle flood costs one accept per socket.
            conn.close()
            self.metrics.refused(503, "handshake_limit")
            self._log_refusal("dropped connection from %s: %s", client, why_not)
            return
        if conn.family in (socket.AF_INET, socket.AF_INET6):
            # The return path and postcopy page requests are small and latency-bound.
            with contextlib.suppress(OSError):
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        worker = self._pool.pick()
        worker.load += 1
        handoff = SocketHandoff(conn)
        task = asyncio.get_running_loop().create_task(
            run_on(worker.loop, self._open_connection, worker, handoff, client)
        )
        self._opening.add(task)
        task.add_done_callback(self._opening.discard)
        task.add_done_callback(lambda _: self._not_opened(worker, handoff, client))

    def _not_opened(self, worker: Worker, handoff: SocketHandoff, client: str) -> None:
        """A connection whose worker never took it (the relay stopped first)."""
        if handoff.close():
            self.admission.release(client)
            self._unload(worker)

    def _unload(self, worker: Worker) -> None:
        """A connection assigned to ``worker`` ended before it became a channel."""
        worker.load -= 1

    async def _open_connection(self, worker: Worker, handoff: SocketHandoff, client: str) -> None:
        """Run the TLS handshake (if any) within the handshake timeout, then the HTTP one.

        On the connection's worker.
        """
        conn = handoff.take()
        loop = asyncio.get_running_loop()
        timeout = self.config.limits.handshake_timeout
        deadline = loop.time() + timeout
        context = self.config.ssl_context  # the newest: SIGHUP replaces it whole
        protocol = _HandshakeProtocol(self, worker, client, deadline)
        try:
            await loop.connect_accepted_socket(
                lambda: protocol,
                conn,
                ssl=context,
                ssl_handshake_timeout=None if context is None else timeout,
            )
        except (OSError, ssl.SSLError, TimeoutError, asyncio.CancelledError) as exc:
            conn.close()
            protocol._release_admission()
            protocol._unload()
            if isinstance(exc, asyncio.CancelledError):
                raise
            call_on(self._pool.main_loop, self._tls_failed, client, exc)

    def _tls_failed(self, client: str, exc: BaseException) -> None:
        """A TLS handshake failed or timed out: one refusal line, counted as 400.

        With ``--client-ca`` this is where a client without a valid certificate is
        refused: the server's side of the handshake fails, TLS 1.3 included (the client
        believes it done and learns of the refusal on its first read).
        """
        self.metrics.refused(400, "tls_handshake")
        self._log_refusal(
            "TLS handshake with %s failed: %s", client, clip(describe_tls_failure(exc), 200)
        )

    def _count_refusal(
        self, peer: str, what: str, refusal: Refusal, handshake_seconds: float
    ) -> None:
        """Log (rate-limited) and count a refusal of the connection from ``peer``."""
        detail = f" ({clip(refusal.detail, 200)})" if refusal.detail else ""
        self._log_refusal(
            "refused %s from %s: %d %s%s", what, peer, refusal.status, refusal.reason, detail
        )
        self.metrics.refused(refusal.status, refusal.kind)
        self.metrics.handshake_seconds.observe(handshake_seconds)

    def _out_of_descriptors(self, exc: OSError) -> None:
        self.metrics.refused(503, "out_of_descriptors")
        self._log_refusal("accept failed: %s; shedding the oldest waiting connection", exc)

    def _log_refusal(self, message: str, *args: object) -> None:
        """Log one refusal line, at most `LogLimiter`'s rate; say how many were not."""
        limiter = self.refusal_log
        if not limiter.allow():
            return
        suppressed = limiter.take_suppressed()
        if suppressed:
            message += " (%d more refusals not logged)"
            args = (*args, suppressed)
        logger.info(message, *args)

    async def close(self) -> None:
        """Stop listening, close every connection and channel, stop the workers.

        Once begun, closing goes on to its end even if the caller is cancelled (a
        second stop signal while draining): a later call waits for the same end.
        """
        await self._close_once()

    async def _close(self) -> None:
        self._closing = True
        self._stop_listening()
        try:
            for task in list(self._opening):
                task.cancel()
            if self._opening:
                await asyncio.gather(*self._opening, return_exceptions=True)
            upgrading = list(self._upgrading.values())
            for task in upgrading:
                task.cancel()
            if upgrading:
                await asyncio.gather(*upgrading, return_exceptions=True)
            if self._idle_task is not None:
                self._idle_task.cancel()
                await asyncio.gather(self._idle_task, return_exceptions=True)
                self._idle_task = None
            for worker in self._pool.workers if self._pool.active else ():
                await run_on(worker.loop, self._abort_connections, worker)
            for channel in list(self.channels):
                abort_channel(channel, "relay stopped")
            if self.channels:
                await asyncio.wait_for(self._no_channels.wait(), timeout=5)
            if self._finishing:
                await asyncio.wait(list(self._finishing.values()), timeout=FINISH_TIMEOUT_S)
        finally:
            if self._reserve is not None:
                self._reserve.close()
                self._reserve = None
            await self._pool.stop(self.config.limits.close_timeout)

    async def _abort_connections(self, worker: Worker) -> None:
        """Drop the connections still in their handshake on ``worker`` (on it)."""
        for connection in list(self._connections.get(worker, ())):
            connection.abort()

    def _stop_listening(self) -> None:
        for task in self._accept_tasks:
            task.cancel()
        self._accept_tasks.clear()
        for sock in self._listeners:
            sock.close()

    # -- routing -------------------------------------------------------------------------

    def resolve_target(self, request: UpgradeRequest) -> tuple[str, Path]:
        """Map the request path to a destination socket (DESIGN.md §3 "Path")."""
        config = self.config
        path = access.strip_prefix(request.path, config.path_prefix)
        if path is None:
            raise Refusal(404, "unknown target")
        if path == "/":
            if config.target is None:
                raise Refusal(404, "no default target: use /NAME")
            return "/", config.target
        name = path[1:]
        if not TARGET_NAME_RE.fullmatch(name):
            raise Refusal(404, "unknown target")
        mapped = config.target_map.get(name)
        if mapped is not None:
            return name, mapped
        if config.target_dir is None:
            raise Refusal(404, "unknown target")
        return name, config.target_dir / f"{name}.sock"

    def authenticate(self, request: UpgradeRequest) -> access.TokenEntry | None:
        """Check the request's bearer token against ``--token-file`` (`check_bearer`)."""
        return check_bearer(request, self.config.tokens)

    def authorize(self, token: access.TokenEntry | None, name: str) -> None:
        """Refuse with 403 when ``token`` is restricted to targets other than ``name``, or
        ``name`` is privileged and ``token`` does not list it."""
        if name in self.config.privileged_targets and (
            token is None or token.targets is None or name not in token.targets
        ):
            # A token for libvirt's read-write socket is a key to the hypervisor (README
            # "Threat model"): it is never granted by a token for any target.
            who = "no token" if token is None else f"token {token.name}"
            raise Refusal(
                403,
                "target needs a token that names it",
                kind="privileged_target",
                detail=f"/{name} is privileged and {who} does not name it",
            )
        if token is None:
            return
        allowed = token.targets
        if allowed is not None and name not in allowed:
            shown = "/" if name == "/" else f"/{name}"
            raise Refusal(403, f"token not valid for target {shown}", kind="target_not_allowed")

    def _upgrade_requested(self, connection: _HandshakeProtocol, request: UpgradeRequest) -> None:
        """A connection's request is complete: check and route it (`handle_upgrade`)."""
        if self._closing:
            call_on(connection.worker.loop, connection.abort)
            return
        task = asyncio.get_running_loop().create_task(self._upgrade(connection, request))
        self._upgrading[connection] = task
        task.add_done_callback(lambda _: self._upgrading.pop(connection, None))

    def _upgrade_abandoned(self, connection: _HandshakeProtocol) -> None:
        """The client left before its upgrade was answered: stop working on it."""
        task = self._upgrading.get(connection)
        if task is not None:
            task.cancel()

    async def _upgrade(self, connection: _HandshakeProtocol, request: UpgradeRequest) -> None:
        try:
            await self.handle_upgrade(connection, request)
        except Refusal as refusal:
            self._refuse(connection, refusal, request)
        except Exception:
            logger.exception(
                "internal error while handling %s from %s", request.path, connection.peer
            )
            self._refuse(connection, Refusal(500, "internal error"), request)

    def _refuse(
        self, connection: _HandshakeProtocol, refusal: Refusal, request: UpgradeRequest
    ) -> None:
        """Count and log a refusal decided here, and have the connection's loop send it."""
        what = clip(request.path, LOGGED_PATH_CHARS)
        self._count_refusal(connection.peer, what, refusal, connection.age())
        call_on(connection.worker.loop, connection.send_refusal, refusal)

    def plain_response(self, request: UpgradeRequest) -> tuple[int, bytes, str]:
        """The answer to a request that is not an upgrade (health checks, metrics).

        Raises:
            Refusal: 401/403 for ``/metrics`` without its token; 426 for anything else.
        """
        path = request.path
        prefixed = access.strip_prefix(path, self.config.path_prefix)
        if prefixed is not None:
            path = prefixed  # the same answers directly and through the reverse proxy
        if path == "/healthz":
            return 200, b"ok\n", PLAIN_TEXT
        if path == "/metrics":
            check_bearer(request, self.config.metrics_tokens)
            return 200, self.metrics.exposition(), METRICS_CONTENT_TYPE
        raise Refusal(426, "this is a migrelay websocket endpoint", (("Upgrade", "websocket"),))

    async def handle_upgrade(
        self, connection: _HandshakeProtocol, request: UpgradeRequest
    ) -> None:
        """Check and route one upgrade; answer 101 once the unix side is connected."""
        peer = connection.peer
        if not request.is_websocket:
            status, body, content_type = self.plain_response(request)
            call_on(connection.worker.loop, connection.send_response, status, body, content_type)
            return
        if SUBPROTOCOL not in request.subprotocols:
            raise Refusal(400, f"subprotocol {SUBPROTOCOL} required")
        config = self.config
        with_tokens = bool(config.tokens)
        if not access.browser_origin_allowed(
            request.headers.get("origin"), config.allowed_origins, with_tokens
        ):
            raise Refusal(403, "origin not allowed", kind="origin")
        if not with_tokens and not access.host_allowed(
            request.headers.get("host"), config.host, self.port, config.allowed_hosts
        ):
            # DNS rebinding: a web page's own name resolving to this host.
            raise Refusal(403, "host not allowed", kind="host")
        token = self.authenticate(request)
        principal = ANONYMOUS if token is None else token.name
        name, target = self.resolve_target(request)
        self.authorize(token, name)
        session_id = request.headers.get(SESSION_HEADER.lower())
        label_text = request.headers.get(CHANNEL_HEADER.lower(), "0")
        if session_id is None:
            # A standard client: a session of one channel (DESIGN.md §3). Its id is
            # the server's, unpredictable, and in a key no client can send (it holds
            # a character Migrelay-Session does not allow), so nobody can join it.
            if CHANNEL_HEADER.lower() in request.headers:
                raise Refusal(400, f"{CHANNEL_HEADER} without {SESSION_HEADER}")
            session_id = f"anon-{secrets.token_hex(8)}"
            key = (principal, f"{session_id}/")
        else:
            try:
                parse_session_id(session_id)
            except ValueError as exc:
                raise Refusal(400, str(exc)) from None
            key = (principal, session_id)
        try:
            label = parse_channel_label(label_text)
        except ValueError as exc:
            # "invalid Migrelay-Channel": the message never echoes the value.
            raise Refusal(400, str(exc)) from None
        if not label.storage and label.number >= self.config.max_channels:
            raise Refusal(
                429, f"too many channels in one session (limit {self.config.max_channels})"
            )

        session = self.sessions.get(key)
        if session is None:
            self._check_quotas(principal, name)
            session = _MigrationSession(
                session_id, target, principal, name, key, headers=dict(request.headers)
            )
            self.sessions[key] = session
            self.metrics.session_started(principal)
        if session.target != target:
            # Only the token that opened the session can get here: nothing is revealed.
            raise Refusal(409, f"session {session_id} belongs to another target")
        if str(label) in session.claimed:
            raise Refusal(409, f"channel {label} of session {session_id} repeated")
        session.claimed.add(str(label))
        session.pending += 1
        try:
            await self._prepare_target(session, name, target, request)
            handoff = SocketHandoff(await self._connect_channel(session, label, target))
            opened = _Opened(session, f"{session_id}/{label}", name)
            # Logged here, on the main loop, as the destination's connect: in channel
            # order (the lines of channels on different workers would not be).
            logger.info(
                "channel %s opened: %s -> %s (%s%s)",
                opened.name,
                peer,
                storage_socket(target) if label.storage else target,
                "target /" if name == "/" else f"target {name}",
                "" if principal == ANONYMOUS else f", token {principal}",
            )
            try:
                await run_on(connection.worker.loop, self._attach, connection, handoff, opened)
            finally:
                handoff.close()  # unless the worker took it
        finally:
            # Only now, once the channel belongs to the session (or failed): forgetting
            # the session between the unix connect and the registration made a channel
            # N arriving in that window start a new session and wait for its channel 0.
            session.pending -= 1
            self._forget_if_idle(session)

    @property
    def port(self) -> int:
        """The port listened on (the configured one, or the one chosen for 0)."""
        if self._listeners:
            return int(self._listeners[0].getsockname()[1])
        return self.config.port

    def _check_quotas(self, principal: str, name: str) -> None:
        """Refuse a new session over a server-wide, per-token or per-target cap (503/429)."""
        config = self.config
        if self.draining:
            raise Refusal(503, "shutting down", (("Retry-After", "5"),), kind="shutting_down")
        if len(self.sessions) >= config.max_sessions:
            raise Refusal(
                503,
                f"too many sessions (limit {config.max_sessions})",
                (("Retry-After", "5"),),
                kind="max_sessions",
            )
        sessions = self.sessions.values()
        held = sum(1 for session in sessions if session.principal == principal)
        if held >= config.max_sessions_per_token:
            raise Refusal(
                429,
                f"too many sessions for this token (limit {config.max_sessions_per_token})",
                (("Retry-After", "5"),),
                kind="token_quota",
            )
        to_target = sum(1 for session in sessions if session.target_name == name)
        if to_target >= config.max_sessions_per_target:
            shown = "/" if name == "/" else f"/{name}"
            raise Refusal(
                429,
                f"too many sessions to target {shown} (limit {config.max_sessions_per_target})",
                (("Retry-After", "5"),),
                kind="target_quota",
            )

    async def _prepare_target(
        self, session: _MigrationSession, name: str, target: Path, request: UpgradeRequest
    ) -> None:
        hook = self.config.prepare_target
        if hook is None:
            return
        if session.prepared is None:
            session.prepared = asyncio.ensure_future(
                self._run_prepare(hook, name, target, dict(request.headers))
            )
            # Every channel awaits it, but all of them may be gone (clients left): mark
            # the outcome as retrieved so that asyncio does not report it as lost.
            session.prepared.add_done_callback(
                lambda future: None if future.cancelled() else future.exception()
            )
        # shield: a client that leaves must not cancel the preparation that the other
        # channels of its session wait for.
        await asyncio.shield(session.prepared)

    async def _run_prepare(
        self, hook: PrepareTarget, name: str, target: Path, headers: Mapping[str, str]
    ) -> None:
        finishing = self._finishing.get(name)
        if finishing is not None:
            # The last session's clean-up first: it must not undo this one's set-up.
            await asyncio.wait([finishing], timeout=FINISH_TIMEOUT_S)
        try:
            await hook(name, target, headers)
        except Refusal:
            raise
        except Exception as exc:
            # Never the exception's text to the peer: it may name paths or versions.
            raise Refusal(
                503,
                "destination not prepared",
                (("Retry-After", "5"),),
                detail=f"{type(exc).__name__}: {exc}",
            ) from exc

    async def _attach(
        self, connection: _HandshakeProtocol, handoff: SocketHandoff, opened: _Opened
    ) -> None:
        """On the connection's worker: wrap the destination socket, answer 101, and
        relay.

        The main loop learns of the channel (`_channel_opened`) before the client can
        see the 101, and before anything the channel does can tell it that it closed.
        """
        read_bytes = self.config.limits.read_bytes
        _, unix = await asyncio.get_running_loop().create_unix_connection(
            lambda: UnixLeg(read_bytes), sock=handoff.take()
        )
        transport = connection.transport
        if transport is None or transport.is_closing():
            # The client left while we waited; let QEMU see a closed connection.
            assert unix.transport is not None
            unix.transport.close()
            logger.info("channel %s abandoned by %s before 101", opened.name, connection.peer)
            return
        main, worker, session = self._pool.main_loop, connection.worker, opened.session
        channel = Channel(
            RelaySession(Role.SERVER, max_message_bytes=self.config.limits.max_message_bytes),
            unix,
            transport,
            self.config.limits,
            opened.name,
            on_closed=lambda ch: call_on(main, self._channel_closed, session, ch, worker),
        )
        connection.hand_over()
        call_on(main, self._channel_opened, opened, channel, worker, connection.age())
        # The channel's backpressure covers the 101 too: QEMU is not read until it left.
        transport.write(connection.handshake.accept(SUBPROTOCOL))
        channel.start(connection.handshake.trailing_data)

    def _channel_opened(
        self, opened: _Opened, channel: Channel, worker: Worker, handshake_seconds: float
    ) -> None:
        self.channels.add(channel)
        self._no_channels.clear()
        opened.session.channels.add(channel)
        worker.channels += 1
        self.metrics.channel_opened(channel, opened.target_name)
        self.metrics.handshake_seconds.observe(handshake_seconds)

    async def _connect_channel(
        self, session: _MigrationSession, label: ChannelLabel, target: Path
    ) -> socket.socket:
        """Connect a channel: a migration channel in order, a storage one at once.

        A storage channel is one NBD connection of source QEMU to the destination's
        NBD server, which listens beside the migration socket (`storage_socket`).
        NBD connections name their export themselves: their order does not matter.
        """
        if label.storage:
            return await self._connect_target(storage_socket(target), self.config.wait_target)
        return await self._connect_in_order(session, label.number, target)

    async def _connect_in_order(
        self, session: _MigrationSession, number: int, target: Path
    ) -> socket.socket:
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

    async def _connect_target(self, target: Path, wait: float) -> socket.socket:
        deadline = time.monotonic() + wait
        while True:
            try:
                return await connect_socket(target, self.config.socket_owners)
            except PeerRefused as exc:
                # A symlink or another user's listener where QEMU's socket should be:
                # never send it guest RAM. The client learns only that it is refused.
                logger.warning("refusing destination socket: %s", exc)
                raise Refusal(
                    503, "destination socket not trusted", detail=str(exc), kind="untrusted_socket"
                ) from None
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

    def _channel_closed(
        self, session: _MigrationSession, channel: Channel, worker: Worker
    ) -> None:
        self.channels.discard(channel)
        if not self.channels:
            self._no_channels.set()
        session.channels.discard(channel)
        worker.channels -= 1
        worker.load -= 1
        close = channel.session.close_rcvd or channel.session.close_sent
        self.metrics.channel_closed(channel, close[0] if close else None)
        self._forget_if_idle(session)
        if self.on_channel_closed is not None:
            self.on_channel_closed(channel)

    def _forget_if_idle(self, session: _MigrationSession) -> None:
        if not session.channels and not session.pending:
            if self.sessions.get(session.key) is session:
                del self.sessions[session.key]
                self._finish(session)
            if self.draining and not self.sessions:
                self._drained.set()

    def _finish(self, session: _MigrationSession) -> None:
        """Run `ServerConfig.finish_target` for a prepared session that has ended."""
        hook = self.config.finish_target
        if hook is None or session.prepared is None or not session.prepared.done():
            return
        name = session.target_name
        if any(other.target_name == name for other in self.sessions.values()):
            return  # another session to this target is under way: the state is its own
        task = asyncio.get_running_loop().create_task(
            self._run_finish(hook, name, session.target, session.headers)
        )
        self._finishing[name] = task
        task.add_done_callback(
            lambda done: (
                self._finishing.pop(name, None) if self._finishing.get(name) is done else None
            )
        )

    async def _run_finish(
        self, hook: FinishTarget, name: str, target: Path, headers: Mapping[str, str]
    ) -> None:
        try:
            async with asyncio.timeout(FINISH_TIMEOUT_S):
                await hook(name, target, headers)
        except Exception as exc:
            logger.warning(
                "cleaning up target %s after its session failed: %s: %s",
                name,
                type(exc).__name__,
                exc,
            )

    # -- service operation ---------------------------------------------------------------

    async def shutdown(self, deadline_s: float) -> None:
        """Graceful stop (SIGTERM): let running migrations finish, for up to ``deadline_s``.

        Stops listening at once and refuses new sessions; channels still open at the
        deadline are closed with 4004 (relay shut down), then everything is closed as by
        :meth:`close`. Channels of sessions already under way may still join them.
        """
        self.draining = True
        self._stop_listening()
        if self.sessions:
            logger.info(
                "shutting down: waiting up to %g s for %d session(s), %d channel(s)",
                deadline_s,
                len(self.sessions),
                len(self.channels),
            )
            try:
                async with asyncio.timeout(deadline_s):
                    await self._drained.wait()
            except TimeoutError:
                pass
        if self.channels:
            logger.info(
                "shutdown deadline of %g s passed: closing %d channel(s) with 4004",
                deadline_s,
                len(self.channels),
            )
            for channel in list(self.channels):
                close_channel(
                    channel, CloseCode.SHUTDOWN, f"relay shut down after {deadline_s:g} s"
                )
            if self.channels:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        self._no_channels.wait(), timeout=self.config.limits.close_timeout + 1
                    )
        await self.close()

    async def _watch_idle(self, idle_s: float) -> None:
        """Close channels that moved no byte either way for ``idle_s`` (code 4002).

        Reads the channels' own counters a few times per timeout, so the data path is
        not touched. The liveness ping is a different matter: it catches a dead peer;
        this catches a live one that holds a channel open without migrating anything.
        """
        loop = asyncio.get_running_loop()
        seen: dict[Channel, tuple[int, float]] = {}
        while True:
            await asyncio.sleep(min(1.0, idle_s / 4))
            now = loop.time()
            for channel in list(self.channels):
                total = channel.bytes_sent + channel.bytes_rcvd
                last = seen.get(channel)
                if last is None or last[0] != total:
                    seen[channel] = (total, now)
                elif now - last[1] >= idle_s:
                    close_channel(
                        channel, CloseCode.IDLE_TIMEOUT, f"idle for {idle_s:g} s (idle timeout)"
                    )
                    seen[channel] = (total, float("inf"))
            for channel in [channel for channel in seen if channel not in self.channels]:
                del seen[channel]


#: OpenSSL's reason for a client that sent no certificate to a server that requires one.
_NO_CLIENT_CERTIFICATE: Final = "PEER_DID_NOT_RETURN_A_CERTIFICATE"


def describe_tls_failure(exc: BaseException) -> str:
    """What a failed server-side TLS handshake means, for its log line.

    The operator's two cases are named (no client certificate; one ``--client-ca`` does
    not vouch for); otherwise OpenSSL's text without its ``[SSL: ...]`` prefix and
    ``(_ssl.c:NNN)`` source location.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate not accepted: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason == _NO_CLIENT_CERTIFICATE:
        return "no client certificate (--client-ca requires one)"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ssl.SSLError):
        text = text.split("] ", 1)[-1]
        text = text.split(" (_ssl.c:", 1)[0]
    return text


def _format_address(address: object) -> str:
    if isinstance(address, tuple) and len(address) >= 2:
        host, port = address[0], address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(address)


class _HandshakeProtocol(asyncio.Protocol):
    """A connection until its upgrade is accepted (then the channel takes over).

    It lives on its worker's loop; what it tells the server goes to the main loop.
    """

    def __init__(self, server: RelayServer, worker: Worker, client: str, deadline: float) -> None:
        self.server = server
        #: The loop this connection, and its channel if any, runs on.
        self.worker = worker
        self._main = server._pool.main_loop
        self.handshake = ServerHandshake(server.config.limits.max_head_bytes)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.handed_over = False
        #: Whether its request is complete (and with the server).
        self._requested = False
        self._timer: asyncio.TimerHandle | None = None
        self._started = time.monotonic()
        #: The client's address (its IP), which `RelayServer.admission` counts this
        #: connection under until its request is complete.
        self.address = client
        self._admitted = True
        #: Whether it counts in its worker's load as a connection (a channel counts
        #: from its hand-over on).
        self._loaded = True
        #: Loop time by which the request must be complete (the TLS handshake, if
        #: any, spent part of it already).
        self._deadline = deadline

    def age(self) -> float:
        """Seconds since the connection was accepted."""
        return time.monotonic() - self._started

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        peername = transport.get_extra_info("peername")
        self.peer = _format_address(peername)
        self.server._connections[self.worker].add(self)
        loop = asyncio.get_running_loop()
        self._timer = loop.call_at(self._deadline, self._handshake_timed_out)

    def _release_admission(self) -> None:
        if self._admitted:
            self._admitted = False
            call_on(self._main, self.server.admission.release, self.address)

    def _unload(self) -> None:
        if self._loaded:
            self._loaded = False
            call_on(self._main, self.server._unload, self.worker)

    def hand_over(self) -> None:
        """Its transport now belongs to a channel (which carries the worker's load)."""
        self.handed_over = True
        self._loaded = False
        self.server._connections[self.worker].discard(self)

    def data_received(self, data: bytes) -> None:
        if self._requested:
            self.handshake.receive_data(data)  # trailing bytes, kept for the channel
            return
        try:
            request = self.handshake.receive_data(data)
        except RemoteProtocolError as exc:
            cause = exc.__cause__
            detail = f"{type(cause).__name__}: {cause}" if cause is not None else None
            self._refuse(Refusal(exc.close_code, str(exc), exc.headers, detail=detail))
            return
        if request is None:
            return
        if self._timer is not None:
            self._timer.cancel()
        # The handshake is over: from here on, sessions' quotas bound what it holds.
        self._release_admission()
        assert self.transport is not None
        self.transport.pause_reading()
        try:
            client = access.forwarded_client(
                self.address,
                request.headers.get("x-forwarded-for"),
                self.server.config.trusted_proxies,
            )
        except ValueError as exc:
            self._refuse(Refusal(400, "invalid X-Forwarded-For", detail=str(exc)), request)
            return
        if client is not None:
            # Log lines name the client a trusted reverse proxy speaks for.
            self.peer = f"{client} via {self.peer}"
        self._requested = True
        call_on(self._main, self.server._upgrade_requested, self, request)

    def send_response(self, status: int, body: bytes, content_type: str) -> None:
        """Answer a request that is not an upgrade, and close."""
        self._send_and_close(self.handshake.respond(status, body, content_type))

    def send_refusal(self, refusal: Refusal) -> None:
        """Send ``refusal`` (counted and logged already), and close."""
        try:
            response = self.handshake.refuse(refusal.status, refusal.reason, refusal.headers)
        except Exception:  # already answered
            response = b""
        self._send_and_close(response)

    def _refuse(self, refusal: Refusal, request: UpgradeRequest | None = None) -> None:
        """Refuse on this loop's own account (a malformed request, a timeout)."""
        what = clip(request.path, LOGGED_PATH_CHARS) if request is not None else "request"
        call_on(self._main, self.server._count_refusal, self.peer, what, refusal, self.age())
        self.send_refusal(refusal)

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
        self.server._connections[self.worker].discard(self)
        self._release_admission()
        if self._timer is not None:
            self._timer.cancel()
        if self.handed_over:
            return
        if self._requested:
            call_on(self._main, self.server._upgrade_abandoned, self)
        self._unload()
