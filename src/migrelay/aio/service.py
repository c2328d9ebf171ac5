"""``migrelay serve`` as a service: settings in, a running server out, until a signal.

The command line (or an embedding program) fills in `ServeSettings` with what the
operator gave: paths and values, nothing read yet. `load_server_config` reads the files
and applies the policy that holds whoever starts a server:

* without tokens or a client CA, listen on loopback only unless ``insecure`` (anyone who
  reaches the port could otherwise feed destination QEMU);
* ``tls_cert`` and ``tls_key`` go together, and a client CA needs both.

`serve` runs it: SIGHUP reloads tokens and certificates (all or nothing), the first
stop (SIGTERM/SIGINT, delivered as the ``stop`` event) drains running migrations for
``shutdown_timeout`` seconds, a second one stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import signal
import ssl
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from migrelay.aio import access, local, tls
from migrelay.aio.runner import wait_first
from migrelay.aio.server import FinishTarget, PrepareTarget, RelayServer, ServerConfig
from migrelay.aio.workers import resolve_workers
from migrelay.errors import ConfigError, RelayError
from migrelay.limits import Limits

__all__ = [
    "DEFAULT_DEST_SOCKET",
    "DEFAULT_PORT",
    "ServeSettings",
    "load_server_config",
    "parse_listen",
    "serve",
]

logger = logging.getLogger(__name__)

#: DESIGN.md §1: the original scripts' port.
DEFAULT_PORT: Final = 8765
#: The default target of ``/``: in the private runtime directory, not in ``/tmp``
#: where any local user could bind it first (`migrelay.aio.local`). The original
#: scripts' ``/tmp/qemu_migration_dest.sock`` still works when given explicitly.
DEFAULT_DEST_SOCKET: Final = local.runtime_dir() / "dest.sock"


@dataclass(frozen=True)
class ServeSettings:
    """What ``serve`` was told: flags, ``MIGRELAY_*`` variables or the config file.

    Every default of the command line is read from here, from `ServerConfig` or from
    `Limits`, never written twice.
    """

    #: ``HOST:PORT`` (``[::1]:8765``; a bare host takes `DEFAULT_PORT`).
    listen: str = f"127.0.0.1:{DEFAULT_PORT}"
    #: Destination socket of the path ``/``; `DEFAULT_DEST_SOCKET` when none of
    #: ``target``, ``target_dir`` and ``target_map`` is given.
    target: Path | None = None
    target_dir: Path | None = None
    #: ``--target-map NAME=PATH`` values: ``/NAME`` reaches PATH (before ``target_dir``).
    target_map: Sequence[str] = ()
    #: ``--privileged-target NAME``: a token must list NAME to open it.
    privileged_target: Sequence[str] = ()
    token_file: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    metrics_token_file: Path | None = None
    #: Listen beyond loopback without tokens or a client CA.
    insecure: bool = False
    allow_origin: Sequence[str] = ()
    #: Names (``NAME`` or ``NAME:PORT``) accepted in ``Host`` without tokens, besides
    #: the listener's own address.
    allow_host: Sequence[str] = ()
    trusted_proxy: Sequence[str] = ()
    path_prefix: str = ""
    #: Users (names or uids) that may listen at destination sockets; empty: this
    #: user and root.
    socket_owner: Sequence[str] = ()
    wait_target: float = ServerConfig.wait_target
    max_sessions: int = ServerConfig.max_sessions
    max_sessions_per_token: int = ServerConfig.max_sessions_per_token
    max_sessions_per_target: int = ServerConfig.max_sessions_per_target
    max_handshakes: int = ServerConfig.max_handshakes
    max_handshakes_per_address: int = ServerConfig.max_handshakes_per_address
    max_channels: int = ServerConfig.max_channels
    idle_timeout: float = ServerConfig.idle_timeout
    #: On a stop, seconds running migrations get before their channels close with 4004.
    #: 120 s lets a migration of a few dozen GiB finish on a 1 GiB/s link; systemd's
    #: unit waits 150 s (TimeoutStopSec) so that this comes first.
    shutdown_timeout: float = 120.0
    #: Event loops (threads) the channels are spread over (`migrelay.aio.workers`); 0:
    #: one per CPU this process may use, at most `~migrelay.aio.workers.DEFAULT_MAX_WORKERS`.
    workers: int = 0
    limits: Limits = field(default_factory=Limits)


def parse_listen(value: str) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[v6]:PORT``; no port: `DEFAULT_PORT`; no host: all).

    Raises:
        ConfigError: the port is not a number from 0 to 65535.
    """
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = value, str(DEFAULT_PORT)
    host = host.strip("[]") or "0.0.0.0"
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"invalid port in {value!r}")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names a loopback address (``localhost``, 127/8, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_server_config(
    settings: ServeSettings,
    prepare_target: PrepareTarget | None = None,
    finish_target: FinishTarget | None = None,
) -> tuple[ServerConfig, tls.ReloadableServerContext | None]:
    """Read the files ``settings`` names and build the server's configuration.

    Args:
        settings: what the operator gave.
        prepare_target: the hook run before a session's first channel connects
            (``serve --qmp``: see `migrelay.control.destination`).
        finish_target: the hook run once a prepared session has ended.

    Returns:
        The configuration, and the certificate holder that SIGHUP reloads (or None).

    Raises:
        ConfigError: a file cannot be read or used, or the settings break the policy
            in the module docstring.
    """
    host, port = parse_listen(settings.listen)
    target = settings.target
    if target is None and settings.target_dir is None and not settings.target_map:
        target = DEFAULT_DEST_SOCKET
    entries = access.load_token_entries(settings.token_file)
    metrics_tokens = access.load_token_entries(settings.metrics_token_file)
    if (settings.tls_cert is None) != (settings.tls_key is None):
        raise ConfigError("--tls-cert and --tls-key go together")
    if settings.client_ca is not None and settings.tls_cert is None:
        raise ConfigError("--client-ca needs --tls-cert and --tls-key")
    credentials = None
    if settings.tls_cert is not None and settings.tls_key is not None:
        try:
            credentials = tls.ReloadableServerContext(
                settings.tls_cert, settings.tls_key, settings.client_ca
            )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS certificate: {exc}") from None
    authenticated = bool(entries) or settings.client_ca is not None
    if not authenticated and not is_loopback(host) and not settings.insecure:
        raise ConfigError(
            f"refusing to listen on {host} without authentication: "
            "give --token-file or --client-ca (mTLS), or --insecure on a trusted network"
        )
    try:
        allowed_origins = access.parse_allowed_origins(settings.allow_origin)
        allowed_hosts = access.parse_allowed_hosts(settings.allow_host)
        trusted_proxies = access.parse_networks(settings.trusted_proxy)
        path_prefix = access.normalize_prefix(settings.path_prefix)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    owners = (
        local.SocketOwners.parse(settings.socket_owner)
        if settings.socket_owner
        else local.SocketOwners.default()
    )
    target_dir = settings.target_dir
    if target_dir is not None:
        local.check_directory(target_dir, "--target-dir")
        # Resolved once: a symlink swapped in for the directory later changes nothing.
        target_dir = target_dir.resolve()
    if target is not None:
        local.prepare_default_dir(target)
    target_map = access.parse_target_map(settings.target_map)
    privileged = access.privileged_targets(settings.privileged_target, target_map)
    if privileged and not entries:
        # Without tokens anyone who reaches the port (any local user, on loopback) would
        # reach libvirt's socket with serve's rights.
        raise ConfigError(
            f"privileged target {sorted(privileged)[0]} needs --token-file, with a token"
            " that names it"
        )
    try:
        workers = resolve_workers(settings.workers)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    config = ServerConfig(
        host=host,
        port=port,
        target=target,
        target_dir=target_dir,
        target_map=target_map,
        privileged_targets=privileged,
        tokens=entries,
        ssl_context=credentials.current if credentials is not None else None,
        wait_target=settings.wait_target,
        max_sessions=settings.max_sessions,
        max_sessions_per_token=settings.max_sessions_per_token,
        max_sessions_per_target=settings.max_sessions_per_target,
        max_handshakes=settings.max_handshakes,
        max_handshakes_per_address=settings.max_handshakes_per_address,
        socket_owners=owners,
        allowed_hosts=allowed_hosts,
        limits=settings.limits,
        prepare_target=prepare_target,
        finish_target=finish_target,
        allowed_origins=allowed_origins,
        trusted_proxies=trusted_proxies,
        path_prefix=path_prefix,
        max_channels=settings.max_channels,
        idle_timeout=settings.idle_timeout,
        metrics_tokens=metrics_tokens,
        workers=workers,
    )
    return config, credentials


def reload_files(
    settings: ServeSettings,
    config: ServerConfig,
    credentials: tls.ReloadableServerContext | None,
) -> None:
    """SIGHUP: read the token files and certificates again; all or nothing.

    Raises:
        ConfigError, OSError, ssl.SSLError: a file cannot be read or used; nothing changed.
    """
    # Read every file before changing anything.
    entries = access.load_token_entries(settings.token_file)
    metrics_tokens = access.load_token_entries(settings.metrics_token_file)
    if credentials is not None:
        # Atomic in itself (a new context or none); the next handshake uses it.
        config.ssl_context = credentials.reload()
    config.tokens = entries
    config.metrics_tokens = metrics_tokens


async def serve(
    settings: ServeSettings,
    stop: asyncio.Event,
    prepare_target: PrepareTarget | None = None,
    finish_target: FinishTarget | None = None,
) -> int:
    """Run ``migrelay serve`` until ``stop`` is set, then drain; a second stop ends it.

    Args:
        settings: what the operator gave.
        stop: set on SIGTERM/SIGINT (by the caller); this function clears it after
            the first one to notice the second.
        prepare_target, finish_target: see `load_server_config`.

    Returns:
        0 once stopped.

    Raises:
        ConfigError: the settings cannot be used (nothing was started).
        RelayError: the address cannot be listened on.
    """
    config, credentials = load_server_config(settings, prepare_target, finish_target)
    server = RelayServer(config)
    try:
        await server.start()
    except OSError as exc:
        raise RelayError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from exc

    def on_hangup() -> None:
        try:
            reload_files(settings, config, credentials)
        except (OSError, ssl.SSLError, RelayError) as exc:
            logger.error("reload failed, keeping the old settings: %s", exc)
        else:
            logger.info("reloaded tokens and certificates")

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        await stop.wait()
        stop.clear()
        timeout = settings.shutdown_timeout
        logger.info("shutting down: no new sessions; running ones get %g s", timeout)
        drain = asyncio.ensure_future(server.shutdown(timeout))
        if drain in await wait_first(drain, stop.wait()):
            drain.result()  # an error while draining is the command's error
        else:
            logger.info("second signal: stopping now")
            await server.close()
    finally:
        with contextlib.suppress(RuntimeError):  # the loop may be closing
            loop.remove_signal_handler(signal.SIGHUP)
    return 0
