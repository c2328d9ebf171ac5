"""The ``migrelay`` commands: each parses its flags, calls one function below, reports.

| command    | calls                                              | layer          |
|------------|----------------------------------------------------|----------------|
| serve      | `migrelay.aio.service.serve`                       | I/O            |
| connect    | `migrelay.aio.source.run_source_relay` / `run_mapped_relays` | I/O  |
| incoming   | `migrelay.control.commands.incoming`               | control (QMP)  |
| migrate    | `migrelay.control.commands.run_migration`          | control (QMP)  |
| status     | `migrelay.control.commands.query` / `watch`        | control (QMP)  |
| cancel     | `migrelay.control.commands.cancel_migration`       | control (QMP)  |
| bench      | `migrelay.lab.bench.run_bench`                     | lab            |

Signals, errors and exit statuses are `migrelay.cli.running.run_command`'s; the options
several commands share are in `migrelay.cli.options`. Policy (who may listen without
authentication, what a refusal says) belongs to the layers, not here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import shlex
import shutil
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from migrelay import __version__
from migrelay.aio import local, runner, service
from migrelay.aio.client import ClientConfig
from migrelay.aio.local import SocketOwners
from migrelay.aio.service import DEFAULT_DEST_SOCKET, ServeSettings
from migrelay.aio.source import (
    DEFAULT_SOURCE_SOCKET,
    ClientSettings,
    parse_socket_map,
    run_mapped_relays,
    run_source_relay,
)
from migrelay.cli.options import (
    CaOpt,
    ClientCertOpt,
    CompressLevelOpt,
    CompressOpt,
    ConfigOpt,
    CopyStorageOpt,
    FingerprintOpt,
    HeaderOpt,
    JsonOpt,
    KeepPausedOpt,
    LogFormatOpt,
    MaxMessageOpt,
    MigrateDisksOpt,
    MultifdOpt,
    PingIntervalOpt,
    PingTimeoutOpt,
    PostcopyOpt,
    ProxyOpt,
    QmpOpt,
    SocketOwnerOpt,
    TlsKeyOpt,
    TokenFileOpt,
    VerboseOpt,
    WorkersOpt,
)
from migrelay.cli.running import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    configure_logging,
    exit_with,
    report_error,
    run_command,
)
from migrelay.control import commands, destination
from migrelay.control.convergence import (
    DEFAULT_MAX_DOWNTIME_MS,
    ConvergencePolicy,
    DowntimeSteps,
    OnTimeout,
)
from migrelay.control.migration import (
    DEFAULT_DOWNTIME_LIMIT_MS,
    DEFAULT_RECOVER_TIMEOUT_S,
    DEFAULT_STALL_TIMEOUT_S,
    MigrationOptions,
)
from migrelay.control.progress import (
    ProgressRenderer,
    TerminalProgress,
    progress_line,
    renderer_for,
    snapshot_document,
)
from migrelay.control.qmp import MigrationStatus
from migrelay.control.storage import StorageOptions
from migrelay.core.headers import DISK_ID_RE
from migrelay.core.mask import MASK_IMPLEMENTATION
from migrelay.errors import ConfigError, MigrationFailed
from migrelay.limits import Limits
from migrelay.units import parse_size

__all__ = ["app", "main"]

#: ``--max-message``'s default, as a flag spells it (`Limits.max_message_bytes`).
DEFAULT_MAX_MESSAGE = f"{Limits.max_message_bytes >> 20}M"

app = typer.Typer(
    name="migrelay",
    help="Live-migrate QEMU virtual machines between hosts over WebSocket.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Help texts are plain text: rich markup took "[serve]" and "[default: ...]" for
    # tags and printed nothing in their place.
    rich_markup_mode=None,
)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(
            f"migrelay {__version__} (masking: {MASK_IMPLEMENTATION}, "
            f"loop: {runner.loop_name()}, python {sys.version.split()[0]})"
        )
        raise typer.Exit()


@app.callback()
def main_callback(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="Show the version, the masking implementation and the loop.",
        ),
    ] = False,
) -> None:
    """Live-migrate QEMU virtual machines between hosts over WebSocket."""


def _socket_owners(names: list[str] | None) -> SocketOwners:
    if not names:
        return SocketOwners.default()
    try:
        return SocketOwners.parse(names)
    except ConfigError as exc:
        exit_with(str(exc))


def _limits(max_message: str, **changes: object) -> Limits:
    try:
        return Limits().with_max_message(max_message, **changes)
    except ConfigError as exc:
        exit_with(str(exc))


# -- the relays: serve, connect -----------------------------------------------------------


@app.command()
def serve(
    listen: Annotated[
        str, typer.Option(help="HOST:PORT to listen on.", envvar="MIGRELAY_LISTEN")
    ] = ServeSettings.listen,
    target: Annotated[
        Path | None,
        typer.Option(
            help=f"Unix socket of destination QEMU, for the path / [default: {DEFAULT_DEST_SOCKET}"
            " unless --target-dir].",
            envvar="MIGRELAY_TARGET",
        ),
    ] = None,
    target_dir: Annotated[
        Path | None,
        typer.Option(
            help="Directory of NAME.sock sockets, for the paths /NAME.",
            envvar="MIGRELAY_TARGET_DIR",
        ),
    ] = None,
    target_map: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME=PATH",
            help="The path /NAME reaches the unix socket PATH (no symlink); repeatable;"
            " wins over --target-dir's NAME.sock. libvirt's read-write socket"
            " (libvirt-sock, virtqemud-sock...) is a privileged target.",
            envvar="MIGRELAY_TARGET_MAP",
        ),
    ] = None,
    privileged_target: Annotated[
        list[str] | None,
        typer.Option(
            metavar="NAME",
            help="Only a token that lists NAME may open /NAME (an any-target token gets"
            " 403); repeatable.",
            envvar="MIGRELAY_PRIVILEGED_TARGET",
        ),
    ] = None,
    token_file: Annotated[
        Path | None,
        typer.Option(
            help="File of accepted bearer tokens, one a line.", envvar="MIGRELAY_TOKEN_FILE"
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(help="Certificate chain (PEM) to serve wss://.", envvar="MIGRELAY_TLS_CERT"),
    ] = None,
    tls_key: TlsKeyOpt = None,
    client_ca: Annotated[
        Path | None,
        typer.Option(
            help="Require client certificates signed by this CA (mTLS).",
            envvar="MIGRELAY_CLIENT_CA",
        ),
    ] = None,
    qmp: Annotated[
        Path | None,
        typer.Option(
            help="QMP socket of destination QEMU for the path /: issue migrate-incoming"
            " there when a migration arrives (migrate-recover if its postcopy is paused).",
            envvar="MIGRELAY_QMP",
        ),
    ] = None,
    qmp_dir: Annotated[
        Path | None,
        typer.Option(
            help="Directory of NAME.qmp sockets: issue migrate-incoming on NAME.qmp when a"
            " migration arrives for /NAME (migrate-recover if its postcopy is paused).",
            envvar="MIGRELAY_QMP_DIR",
        ),
    ] = None,
    wait_target: Annotated[
        float,
        typer.Option(
            help="Seconds to wait for the destination socket to appear.",
            envvar="MIGRELAY_WAIT_TARGET",
        ),
    ] = ServeSettings.wait_target,
    max_sessions: Annotated[
        int, typer.Option(help="Most migrations at once.", envvar="MIGRELAY_MAX_SESSIONS")
    ] = ServeSettings.max_sessions,
    max_sessions_per_token: Annotated[
        int,
        typer.Option(
            min=1,
            help="Most migrations at once for one token (without tokens: for everyone).",
            envvar="MIGRELAY_MAX_SESSIONS_PER_TOKEN",
        ),
    ] = ServeSettings.max_sessions_per_token,
    max_sessions_per_target: Annotated[
        int,
        typer.Option(
            min=1,
            help="Most migrations at once to one target.",
            envvar="MIGRELAY_MAX_SESSIONS_PER_TARGET",
        ),
    ] = ServeSettings.max_sessions_per_target,
    max_handshakes: Annotated[
        int,
        typer.Option(
            min=1,
            help="Most connections still in their TLS or HTTP handshake; more are closed at once.",
            envvar="MIGRELAY_MAX_HANDSHAKES",
        ),
    ] = ServeSettings.max_handshakes,
    max_handshakes_per_address: Annotated[
        int,
        typer.Option(
            min=1,
            help="Most connections in handshake from one client address.",
            envvar="MIGRELAY_MAX_HANDSHAKES_PER_ADDRESS",
        ),
    ] = ServeSettings.max_handshakes_per_address,
    socket_owner: Annotated[
        list[str] | None,
        typer.Option(
            help="User (name or uid) that may listen at destination sockets; the relay"
            " refuses a socket bound by anyone else (repeatable) [default: this user and"
            " root].",
            envvar="MIGRELAY_SOCKET_OWNER",
        ),
    ] = None,
    ping_interval: PingIntervalOpt = Limits.ping_interval,
    ping_timeout: PingTimeoutOpt = Limits.ping_timeout,
    insecure: Annotated[
        bool,
        typer.Option(
            help="Allow listening beyond loopback without authentication.",
            envvar="MIGRELAY_INSECURE",
        ),
    ] = ServeSettings.insecure,
    config_file: ConfigOpt = None,
    allow_origin: Annotated[
        list[str] | None,
        typer.Option(
            help="Accept browser clients from this Origin (repeatable) [default: none"
            " without tokens, any with tokens].",
            envvar="MIGRELAY_ALLOW_ORIGIN",
        ),
    ] = None,
    allow_host: Annotated[
        list[str] | None,
        typer.Option(
            help="Without tokens, accept this NAME or NAME:PORT in Host besides the"
            " listener's own address (repeatable; e.g. the name a reverse proxy forwards).",
            envvar="MIGRELAY_ALLOW_HOST",
        ),
    ] = None,
    trusted_proxy: Annotated[
        list[str] | None,
        typer.Option(
            help="Address or network of a reverse proxy whose X-Forwarded-For is believed"
            " (repeatable).",
            envvar="MIGRELAY_TRUSTED_PROXY",
        ),
    ] = None,
    path_prefix: Annotated[
        str,
        typer.Option(
            help="Path prefix a reverse proxy forwards under, e.g. /migrelay.",
            envvar="MIGRELAY_PATH_PREFIX",
        ),
    ] = ServeSettings.path_prefix,
    max_channels: Annotated[
        int,
        typer.Option(
            min=1, help="Most channels in one migration session.", envvar="MIGRELAY_MAX_CHANNELS"
        ),
    ] = ServeSettings.max_channels,
    max_message: MaxMessageOpt = DEFAULT_MAX_MESSAGE,
    idle_timeout: Annotated[
        float,
        typer.Option(
            min=0,
            help="Close a channel that carried no data for this many seconds (4002); 0: never.",
            envvar="MIGRELAY_IDLE_TIMEOUT",
        ),
    ] = ServeSettings.idle_timeout,
    handshake_timeout: Annotated[
        float,
        typer.Option(
            min=0.1,
            help="Seconds a client has to send its upgrade request (408).",
            envvar="MIGRELAY_HANDSHAKE_TIMEOUT",
        ),
    ] = Limits.handshake_timeout,
    max_header_bytes: Annotated[
        int,
        typer.Option(
            min=1024,
            help="Largest request head accepted (431).",
            envvar="MIGRELAY_MAX_HEADER_BYTES",
        ),
    ] = Limits.max_head_bytes,
    shutdown_timeout: Annotated[
        float,
        typer.Option(
            min=0,
            help="On SIGTERM, seconds running migrations get to finish before their"
            " channels are closed (4004).",
            envvar="MIGRELAY_SHUTDOWN_TIMEOUT",
        ),
    ] = ServeSettings.shutdown_timeout,
    workers: WorkersOpt = ServeSettings.workers,
    metrics_token_file: Annotated[
        Path | None,
        typer.Option(
            help="Bearer tokens (one a line) that may read /metrics [default: /metrics is"
            " open to whoever reaches the port].",
            envvar="MIGRELAY_METRICS_TOKEN_FILE",
        ),
    ] = None,
    verbose: VerboseOpt = 0,
    log_format: LogFormatOpt = "text",
) -> None:
    """Destination relay: accept WebSockets and hand each to destination QEMU's socket."""
    configure_logging(verbose, log_format)
    settings = ServeSettings(
        listen=listen,
        target=target,
        target_dir=target_dir,
        target_map=tuple(target_map or ()),
        privileged_target=tuple(privileged_target or ()),
        token_file=token_file,
        tls_cert=tls_cert,
        tls_key=tls_key,
        client_ca=client_ca,
        metrics_token_file=metrics_token_file,
        insecure=insecure,
        allow_origin=tuple(allow_origin or ()),
        allow_host=tuple(allow_host or ()),
        trusted_proxy=tuple(trusted_proxy or ()),
        path_prefix=path_prefix,
        socket_owner=tuple(socket_owner or ()),
        wait_target=wait_target,
        max_sessions=max_sessions,
        max_sessions_per_token=max_sessions_per_token,
        max_sessions_per_target=max_sessions_per_target,
        max_handshakes=max_handshakes,
        max_handshakes_per_address=max_handshakes_per_address,
        max_channels=max_channels,
        idle_timeout=idle_timeout,
        shutdown_timeout=shutdown_timeout,
        workers=workers,
        limits=_limits(
            max_message,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            handshake_timeout=handshake_timeout,
            max_head_bytes=max_header_bytes,
        ),
    )
    prepare = destination.prepare_hook(qmp, qmp_dir)
    finish = destination.finish_hook(qmp, qmp_dir)
    run_command(lambda stop: service.serve(settings, stop, prepare, finish))


@app.command()
def connect(
    url: Annotated[
        str,
        typer.Argument(
            help="ws:// or wss:// URL of migrelay serve (with --map: without the /NAME).",
            envvar="MIGRELAY_URL",
        ),
    ],
    listen_unix: Annotated[
        Path | None,
        typer.Option(
            help=f"Unix socket that source QEMU migrates to [default: {DEFAULT_SOURCE_SOCKET}"
            " unless --map].",
            envvar="MIGRELAY_LISTEN_UNIX",
        ),
    ] = None,
    map: Annotated[
        list[str] | None,
        typer.Option(
            "--map",
            metavar="NAME=PATH",
            help="Listen on PATH and carry its connections to URL/NAME; repeatable: one"
            " process for every socket of a libvirt migration (libvirt's RPC, migration,"
            " NBD). With --once: exit when the migration has ended (no socket has a"
            " channel open after one session ended).",
            envvar="MIGRELAY_MAP",
        ),
    ] = None,
    token_file: TokenFileOpt = None,
    header: HeaderOpt = None,
    ca: CaOpt = None,
    fingerprint: FingerprintOpt = None,
    tls_cert: ClientCertOpt = None,
    tls_key: TlsKeyOpt = None,
    once: Annotated[
        bool, typer.Option(help="Exit after the first migration ends.", envvar="MIGRELAY_ONCE")
    ] = False,
    ping_interval: PingIntervalOpt = Limits.ping_interval,
    ping_timeout: PingTimeoutOpt = Limits.ping_timeout,
    retry_open: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds to hold QEMU's connection and retry when the server cannot be"
            " reached, instead of failing it; lets migrate --postcopy resume after a"
            " failed link [0: fail at once].",
            envvar="MIGRELAY_RETRY_OPEN",
        ),
    ] = ClientConfig.open_retry,
    config_file: ConfigOpt = None,
    proxy: ProxyOpt = None,
    socket_owner: SocketOwnerOpt = None,
    max_message: MaxMessageOpt = DEFAULT_MAX_MESSAGE,
    workers: WorkersOpt = ClientSettings.workers,
    verbose: VerboseOpt = 0,
    log_format: LogFormatOpt = "text",
) -> None:
    """Source relay: listen for source QEMU and carry each connection over a WebSocket."""
    configure_logging(verbose, log_format)
    settings = ClientSettings(
        socket_owners=_socket_owners(socket_owner),
        url=url,
        token_file=token_file,
        header_lines=tuple(header or ()),
        ca=ca,
        fingerprint=fingerprint,
        tls_cert=tls_cert,
        tls_key=tls_key,
        proxy=proxy,
        limits=_limits(max_message, ping_interval=ping_interval, ping_timeout=ping_timeout),
        open_retry=retry_open,
        workers=workers,
    )
    if map:
        if listen_unix is not None:
            exit_with("--listen-unix and --map exclude each other: give the socket as --map")
        try:
            sockets = parse_socket_map(map)
        except ConfigError as exc:
            exit_with(str(exc))
        run_command(lambda stop: run_mapped_relays(settings, sockets, stop, once=once))
    socket = DEFAULT_SOURCE_SOCKET if listen_unix is None else listen_unix
    run_command(lambda stop: run_source_relay(settings, socket, stop, once=once))


# -- QMP control: incoming, migrate, status, cancel ---------------------------------------


def _options(
    multifd: int | None,
    postcopy: bool,
    max_bandwidth: str | None = None,
    downtime_limit: int | None = None,
    *,
    compress: str | None = None,
    compress_level: int | None = None,
    xbzrle_cache: str | None = None,
    auto_converge: bool = False,
    return_path: bool = False,
) -> MigrationOptions:
    try:
        return MigrationOptions(
            multifd_channels=multifd,
            postcopy=postcopy,
            max_bandwidth=parse_size(max_bandwidth) if max_bandwidth is not None else None,
            downtime_limit_ms=downtime_limit,
            compress=compress,
            compress_level=compress_level,
            xbzrle_cache=parse_size(xbzrle_cache) if xbzrle_cache is not None else None,
            auto_converge=auto_converge,
            return_path=return_path,
        )
    except ValueError as exc:
        exit_with(str(exc))


def _convergence(
    options: MigrationOptions,
    timeout: float | None,
    on_timeout: str,
    max_downtime: int,
) -> ConvergencePolicy:
    """The deadline (None: derived from the VM's sizes once known) and the policy."""
    try:
        action = OnTimeout(on_timeout)
    except ValueError:
        exit_with(f"--on-timeout must be cancel, pause or postcopy, not {on_timeout}")
    if action is OnTimeout.POSTCOPY and not options.postcopy:
        exit_with("--on-timeout postcopy needs --postcopy (set on both sides)")
    try:
        return ConvergencePolicy(
            timeout_s=timeout,
            downtime=DowntimeSteps(
                start_ms=(
                    options.downtime_limit_ms
                    if options.downtime_limit_ms is not None
                    else DEFAULT_DOWNTIME_LIMIT_MS
                ),
                ceiling_ms=max_downtime,
            ),
            postcopy=options.postcopy,
            on_timeout=action,
        )
    except ValueError as exc:
        exit_with(str(exc))


def _aftermath(quit_source: bool, keep_paused: bool | None) -> str:
    """Who does what after a completed migration, for the summary (README: "After a
    migration, who does what"); ``keep_paused`` None: the destination's side is
    ``incoming``'s to say (the four-step form)."""
    source = "source quit" if quit_source else "source stopped (postmigrate)"
    if keep_paused is None:
        return source
    destination = "keeps the guest paused" if keep_paused else "resumes the guest if it ran here"
    return f"{source}, destination {destination}"


def _storage_options(
    copy_storage: bool,
    migrate_disks: str | None,
    write_blocking: bool = False,
    timeout_s: float | None = None,
) -> StorageOptions | None:
    """``--copy-storage`` / ``--migrate-disks``; None when neither was given."""
    if not copy_storage and migrate_disks is None:
        return None
    disks = None
    if migrate_disks is not None:
        disks = tuple(name.strip() for name in migrate_disks.split(",") if name.strip())
        if not disks:
            exit_with("--migrate-disks names no disk")
        bad = [name for name in disks if DISK_ID_RE.fullmatch(name) is None]
        if bad:
            exit_with(f"--migrate-disks: {bad[0]!r} is not a device id")
    return StorageOptions(disks=disks, write_blocking=write_blocking, timeout_s=timeout_s)


def _renderer(json_output: bool) -> ProgressRenderer:
    return renderer_for(
        sys.stdout, json_output=json_output, columns=shutil.get_terminal_size().columns
    )


def _poll_interval(renderer: ProgressRenderer) -> float:
    # A bar redraws four times a second; a line a second is printed from polls every
    # half second, so that no second goes without one.
    return 0.25 if isinstance(renderer, TerminalProgress) else 0.5


def _report_failure(renderer: ProgressRenderer, error: str, message: str) -> None:
    """Finish the progress output with ``error`` and say ``message`` on stderr."""
    if renderer.last is not None or not isinstance(renderer, TerminalProgress):
        renderer.finish(error)
    report_error(message)


@app.command()
def incoming(
    qmp: QmpOpt,
    socket: Annotated[
        Path,
        typer.Option(
            "--socket", help="Unix socket destination QEMU listens on.", envvar="MIGRELAY_SOCKET"
        ),
    ] = DEFAULT_DEST_SOCKET,
    multifd: MultifdOpt = None,
    postcopy: PostcopyOpt = False,
    compress: CompressOpt = None,
    keep_paused: KeepPausedOpt = False,
    recover: Annotated[
        bool,
        typer.Option(
            "--recover",
            help="The link failed during postcopy: listen again (migrate-recover) so that"
            " migrate --postcopy can resume.",
        ),
    ] = False,
    copy_storage: Annotated[
        bool,
        typer.Option(
            "--copy-storage",
            help="Export the VM's writable disks on SOCKET.nbd for migrate --copy-storage;"
            " stay until the migration ends, then remove the exports.",
        ),
    ] = False,
    migrate_disks: MigrateDisksOpt = None,
    export_timeout: Annotated[
        float,
        typer.Option(
            "--export-timeout",
            min=1,
            help="With --copy-storage: remove the exports after this many seconds even if"
            " the migration has not ended.",
        ),
    ] = commands.DEFAULT_EXPORT_TIMEOUT_S,
    verbose: VerboseOpt = 0,
    log_format: LogFormatOpt = "text",
) -> None:
    """Destination: make QEMU (started with -incoming defer) listen for the migration."""
    configure_logging(verbose, log_format, quiet=True)
    options = _options(multifd, postcopy, compress=compress)
    storage = _storage_options(copy_storage, migrate_disks)
    if storage is not None and recover:
        exit_with("--copy-storage and --recover exclude each other: the disks were copied")

    async def main(stop: asyncio.Event) -> int:
        info = await commands.incoming(
            str(qmp),
            f"unix:{socket}",
            options,
            recover=recover,
            storage=storage,
            # Postcopy sends no runstate to apply: this form cannot know the source's,
            # so the destination's own -S decides (README: who does what).
            resume=None if recover or (postcopy and not keep_paused) else not keep_paused,
        )
        where = ", ".join(info.socket_addresses) or f"unix:{socket}"
        what = "the paused postcopy migration to resume" if recover else "an incoming migration"
        typer.echo(f"{qmp.stem}: listening for {what} on {where}")
        if storage is None:
            return EXIT_OK
        nbd = local.storage_socket(socket)
        typer.echo(f"{qmp.stem}: exporting its disks on {nbd} until the migration ends")
        last = await commands.export_until_done(str(qmp), export_timeout, stop=stop)
        if last is None:
            typer.echo(f"{qmp.stem}: qemu has exited")
            return EXIT_FAILURE
        typer.echo(f"{qmp.stem}: migration {last.status}; disk exports removed")
        if last.status is MigrationStatus.COMPLETED:
            return EXIT_OK
        if stop.is_set():
            return EXIT_INTERRUPTED
        if last.status.is_terminal:
            report_error(f"migration {last.status}; disk exports removed")
        else:
            report_error(
                f"no migration ended within --export-timeout {export_timeout:g} s"
                f" (migration {last.status}); disk exports removed"
            )
        return EXIT_FAILURE

    run_command(main)


@app.command()
def migrate(
    ctx: typer.Context,
    qmp: QmpOpt,
    socket: Annotated[
        Path | None,
        typer.Option(
            "--socket",
            help=f"Unix socket of migrelay connect [default: {DEFAULT_SOURCE_SOCKET}].",
            envvar="MIGRELAY_SOCKET",
        ),
    ] = None,
    to: Annotated[
        str | None,
        typer.Option(
            "--to", help="ws:// or wss:// URL of migrelay serve; runs the relay in-process."
        ),
    ] = None,
    wait_socket: Annotated[
        float,
        typer.Option(
            "--wait-socket",
            min=0,
            help="With --socket: seconds to wait for migrelay connect's socket to appear,"
            " so that migrate may start first; 0: do not wait.",
            envvar="MIGRELAY_WAIT_SOCKET",
        ),
    ] = commands.DEFAULT_WAIT_SOCKET_S,
    multifd: MultifdOpt = None,
    postcopy: PostcopyOpt = False,
    max_bandwidth: Annotated[
        str | None,
        typer.Option(
            "--max-bandwidth",
            help="Limit in bytes/s (64M, 1G, ...) [default: unlimited, not QEMU's 128 MiB/s].",
        ),
    ] = None,
    downtime_limit: Annotated[
        int | None,
        typer.Option(
            "--downtime-limit",
            min=0,
            help=f"Longest pause in ms [default: {DEFAULT_DOWNTIME_LIMIT_MS}, QEMU's; raised"
            " in steps up to --max-downtime while precopy does not converge].",
        ),
    ] = None,
    postcopy_after: Annotated[
        int | None,
        typer.Option(
            "--postcopy-after",
            min=1,
            help="With --postcopy: switch to postcopy in this pass over RAM (1: at once);"
            " default: once precopy is found not converging, or at the deadline.",
        ),
    ] = None,
    timeout: Annotated[
        float | None,
        typer.Option(
            "--timeout",
            min=1,
            help="Seconds precopy may take, disk copy included, before --on-timeout"
            " (default: 60 s + 128 s per GiB of RAM and disks; more under"
            " --max-bandwidth below 16 MiB/s).",
        ),
    ] = None,
    on_timeout: Annotated[
        str,
        typer.Option(
            "--on-timeout",
            help="At the deadline: cancel (the source runs on), pause (stop the guest"
            " and send the rest), or postcopy (with --postcopy, which also switches"
            " as soon as precopy stalls).",
        ),
    ] = "cancel",
    max_downtime: Annotated[
        int,
        typer.Option(
            "--max-downtime",
            min=0,
            help="Ceiling in ms up to which the downtime limit is raised, in steps,"
            " while precopy does not converge.",
        ),
    ] = DEFAULT_MAX_DOWNTIME_MS,
    auto_converge: Annotated[
        bool,
        typer.Option(
            "--auto-converge",
            help="Let QEMU throttle the guest's vCPUs while it dirties memory faster"
            " than the link carries it (the throttle is shown).",
        ),
    ] = False,
    compress: CompressOpt = None,
    compress_level: CompressLevelOpt = None,
    xbzrle_cache: Annotated[
        str | None,
        typer.Option(
            "--xbzrle-cache",
            help="Send pages dirtied again as differences (XBZRLE), with a cache of this"
            " size (64M, 1G); not with --multifd, whose pages skip it in QEMU 7.2.",
        ),
    ] = None,
    keep_paused: KeepPausedOpt = False,
    quit_source: Annotated[
        bool,
        typer.Option(
            "--quit-source",
            help="Quit the source QEMU once the destination acknowledged the whole"
            " stream (default: it stays, stopped, in postmigrate).",
        ),
    ] = False,
    recover_timeout: Annotated[
        float,
        typer.Option(
            "--recover-timeout",
            min=0,
            help="With --postcopy: seconds to wait for a link that failed during postcopy"
            " to return, then resume.",
        ),
    ] = DEFAULT_RECOVER_TIMEOUT_S,
    stall_timeout: Annotated[
        float,
        typer.Option(
            "--stall-timeout",
            min=0,
            help="Seconds without any data moving after which the stuck stream is shut"
            " down (yank) and the migration fails; 0: wait for ever.",
        ),
    ] = DEFAULT_STALL_TIMEOUT_S,
    no_wait: Annotated[
        bool, typer.Option("--no-wait", help="Return once the migration has started.")
    ] = False,
    copy_storage: CopyStorageOpt = False,
    migrate_disks: MigrateDisksOpt = None,
    disk_copy_mode: Annotated[
        str,
        typer.Option(
            "--disk-copy-mode",
            help="background: the guest writes at full speed and the copy follows;"
            " write-blocking: each guest write waits until it is on both hosts (a guest"
            " that writes faster than the link then still gets in sync).",
        ),
    ] = "background",
    disk_timeout: Annotated[
        float | None,
        typer.Option(
            "--disk-timeout",
            min=1,
            help="Seconds the disks may take to get in sync before the migration is"
            " abandoned (default: 120 s + 64 s per GiB of disk; more under --max-bandwidth).",
        ),
    ] = None,
    json_output: JsonOpt = False,
    token_file: TokenFileOpt = None,
    header: HeaderOpt = None,
    ca: CaOpt = None,
    fingerprint: FingerprintOpt = None,
    tls_cert: ClientCertOpt = None,
    tls_key: TlsKeyOpt = None,
    proxy: ProxyOpt = None,
    socket_owner: SocketOwnerOpt = None,
    ping_interval: PingIntervalOpt = Limits.ping_interval,
    ping_timeout: PingTimeoutOpt = Limits.ping_timeout,
    config_file: ConfigOpt = None,
    verbose: VerboseOpt = 0,
    log_format: LogFormatOpt = "text",
) -> None:
    """Source: migrate the VM and follow it; exit 0 once it has completed.

    Ctrl-C cancels the migration; the source VM stays as it was.
    """
    configure_logging(verbose, log_format, quiet=True)
    owners = _socket_owners(socket_owner)
    if socket is not None and to is not None:
        exit_with("--socket and --to exclude each other")
    if to is not None and no_wait:
        exit_with("--no-wait cannot be used with --to: the relay runs inside this command")
    if disk_copy_mode not in ("background", "write-blocking"):
        exit_with(f"--disk-copy-mode must be background or write-blocking, not {disk_copy_mode}")
    storage = _storage_options(
        copy_storage, migrate_disks, disk_copy_mode == "write-blocking", disk_timeout
    )
    if storage is not None and no_wait:
        exit_with(
            "--no-wait cannot be used with --copy-storage: this command ends the disk copies"
        )
    # MIGRELAY_PROXY may be set for `connect` on this host; only the flag is a mistake.
    proxy_source = ctx.get_parameter_source("proxy")
    if to is None and proxy_source is not None and proxy_source.name == "COMMANDLINE":
        exit_with("--proxy needs --to: with --socket, migrelay connect reaches the server")
    wait_source = ctx.get_parameter_source("wait_socket")
    if to is not None and wait_source is not None and wait_source.name == "COMMANDLINE":
        exit_with("--wait-socket needs --socket: with --to the relay runs in this command")
    relay = None
    if to is not None:
        relay = ClientSettings(
            socket_owners=owners,
            url=to,
            token_file=token_file,
            header_lines=tuple(header or ()),
            ca=ca,
            fingerprint=fingerprint,
            tls_cert=tls_cert,
            tls_key=tls_key,
            proxy=proxy,
            limits=dataclasses.replace(
                Limits(), ping_interval=ping_interval, ping_timeout=ping_timeout
            ),
        )
        if verbose == 0:
            # The in-process relay's failures reach the operator through this command's
            # own error line; its log would say the same thing a second time.
            logging.getLogger("migrelay.aio").setLevel(logging.CRITICAL)
    if keep_paused and to is None:
        exit_with(
            "--keep-paused needs --to; in the four-step form give it to incoming,"
            " on the destination"
        )
    options = _options(
        multifd,
        postcopy,
        max_bandwidth,
        downtime_limit,
        compress=compress,
        compress_level=compress_level,
        xbzrle_cache=xbzrle_cache,
        auto_converge=auto_converge,
        return_path=quit_source,
    )
    if postcopy_after is not None and not options.postcopy:
        exit_with("--postcopy-after needs --postcopy")
    if quit_source and no_wait:
        exit_with("--quit-source cannot be used with --no-wait: this command quits it")
    if no_wait and (timeout is not None or on_timeout != OnTimeout.CANCEL):
        # Nothing would watch the migration: the deadline is this command's to keep.
        exit_with(
            "--timeout and --on-timeout need the command to follow the migration, not --no-wait"
        )
    request = commands.MigrateRequest(
        socket_owners=owners,
        qmp_path=qmp,
        options=options,
        socket=socket,
        relay=relay,
        wait=not no_wait,
        recover_timeout=recover_timeout,
        postcopy_after_passes=postcopy_after,
        stall_timeout=stall_timeout,
        storage=storage,
        convergence=_convergence(options, timeout, on_timeout, max_downtime),
        keep_paused=keep_paused,
        quit_source=quit_source,
        wait_socket=wait_socket,
    )
    renderer = _renderer(json_output)
    renderer.aftermath = _aftermath(quit_source, keep_paused if to is not None else None)

    async def main(stop: asyncio.Event) -> int:
        try:
            result = await commands.run_migration(
                request,
                on_progress=renderer.update,
                interval=_poll_interval(renderer),
                stop=stop,
            )
        except MigrationFailed as failure:
            _report_failure(renderer, failure.error, str(failure))
            return EXIT_INTERRUPTED if failure.interrupted else EXIT_FAILURE
        if result is None:
            where = f"unix:{socket or DEFAULT_SOURCE_SOCKET}"
            typer.echo(f"{qmp.stem}: migration to {where} started")
            return EXIT_OK
        renderer.finish()
        return EXIT_OK

    run_command(main, on_error=renderer.finish if json_output else None)


@app.command()
def status(
    qmp: QmpOpt,
    json_output: JsonOpt = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="Follow the migration until it ends.")
    ] = False,
    verbose: VerboseOpt = 0,
    log_format: LogFormatOpt = "text",
) -> None:
    """Show the VM's runstate and its migration (exit 1 if the migration failed)."""
    configure_logging(verbose, log_format, quiet=True)

    async def once(stop: asyncio.Event) -> int:
        runstate, info = await commands.query(str(qmp))
        if json_output:
            typer.echo(json.dumps(snapshot_document(info, str(runstate))))
        else:
            typer.echo(f"{qmp.stem}: {runstate}, migration {progress_line(info)}")
            if info.error_desc:
                typer.echo(f"{qmp.stem}: error: {info.error_desc}")
        return EXIT_FAILURE if info.status is MigrationStatus.FAILED else EXIT_OK

    async def follow(stop: asyncio.Event) -> int:
        renderer = _renderer(json_output)
        info = await commands.watch(str(qmp), renderer.update, _poll_interval(renderer), stop=stop)
        if info.status in (MigrationStatus.COMPLETED, MigrationStatus.NONE):
            renderer.finish()
            return EXIT_OK
        if stop.is_set() and not info.status.is_terminal:
            renderer.finish("interrupted; the migration goes on")
            return EXIT_INTERRUPTED
        error = info.error_desc or f"migration {info.status}"
        _report_failure(renderer, error, f"migration failed: {error}")
        return EXIT_FAILURE

    run_command(follow if watch else once)


@app.command()
def cancel(
    qmp: QmpOpt,
    verbose: VerboseOpt = 0,
    log_format: LogFormatOpt = "text",
) -> None:
    """Cancel the VM's outgoing migration; the VM keeps running where it is."""
    configure_logging(verbose, log_format, quiet=True)

    async def main(stop: asyncio.Event) -> int:
        info, runstate = await commands.cancel_migration(str(qmp))
        if info.status is MigrationStatus.NONE:
            typer.echo(f"{qmp.stem}: no migration to cancel; vm is {runstate}")
        else:
            typer.echo(f"{qmp.stem}: migration {info.status}; vm is {runstate}")
        return EXIT_OK

    run_command(main)


# -- the lab: bench ------------------------------------------------------------------------


@app.command()
def bench(
    ctx: typer.Context,
    ram: Annotated[
        str, typer.Option(help="Guest RAM of each test VM (on tmpfs: /dev/shm).")
    ] = "1G",
    runs: Annotated[int, typer.Option(min=1, help="Interleaved rounds of every mode.")] = 3,
    modes: Annotated[
        str,
        typer.Option(
            help="Comma-separated: tcp, unix, ws, wss, socat, each with options:"
            " -multifdN (ws-multifd4), then -zstd or -zlib (ws-multifd2-zstd); -xbzrle"
            " (not with multifd); -ac (auto-converge)."
        ),
    ] = "tcp,ws,wss,tcp-multifd4,ws-multifd4,socat",
    workload: Annotated[
        str,
        typer.Option(
            help="What the source VM does: idle (paused), or dirty:SIZE(@RATE), a guest"
            " rewriting SIZE of its RAM at RATE per second (dirty:64M@20M; no @RATE: as"
            " fast as it can)."
        ),
    ] = "idle",
    content: Annotated[
        str,
        typer.Option(
            help="What the source's RAM holds: random, text (compresses ~4x) or zero"
            " (mostly zero pages)."
        ),
    ] = "random",
    timeout: Annotated[
        float | None,
        typer.Option(
            min=1,
            help="Seconds a run may take; a dirtying guest's run still going then is"
            " cancelled and reported as not converged (default: 600; 120 with dirty:).",
        ),
    ] = None,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write the full report (JSON) here.")
    ] = None,
    plot: Annotated[
        Path | None, typer.Option(help="Draw throughput per mode into this PNG (matplotlib).")
    ] = None,
    link: Annotated[
        str | None,
        typer.Option(
            help="Put the two sides in network namespaces joined by a veth shaped to this "
            "rate (10gbit, 800mbit; 'none' for unshaped). Needs root."
        ),
    ] = None,
    src_qmp: Annotated[
        Path | None,
        typer.Option(help="Migrate your own source VM (QMP socket) instead of a test VM."),
    ] = None,
    dst_qmp: Annotated[
        Path | None,
        typer.Option(help="Your destination VM (QMP socket; started with -incoming defer)."),
    ] = None,
    disk: Annotated[
        str | None,
        typer.Option(
            help="Give each test VM a disk of this size (random bytes), copied before RAM "
            "as migrate --copy-storage does; direct TCP mirrors to an NBD export on TCP."
        ),
    ] = None,
    relay_only: Annotated[
        bool,
        typer.Option(
            help="Measure the relays alone, without QEMU: a random file on /dev/shm pushed"
            " through connect and serve into a sink (benches/README.md). Takes --runs"
            " (default 5 here), --modes (direct, socat, splice, ws, wss; default all but"
            " splice), --json"
            " and the options below."
        ),
    ] = False,
    size: Annotated[
        str, typer.Option(help="With --relay-only: bytes pushed per run (on /dev/shm).")
    ] = "4G",
    channels: Annotated[
        str,
        typer.Option(help="With --relay-only: comma-separated channel counts (connections)."),
    ] = "1,2,4",
    cores: Annotated[
        str,
        typer.Option(
            help="With --relay-only: comma-separated core counts to pin both relays to"
            " (1: taskset -c 0, 2: taskset -c 0,1); all: unpinned."
        ),
    ] = "all",
    relay_args: Annotated[
        str,
        typer.Option(
            help="Extra arguments for both migrelay relays of this checkout, quoted"
            " (--relay-args '--max-message 4M')."
        ),
    ] = "",
    baseline: Annotated[
        Path | None,
        typer.Option(
            help="Another checkout of migrelay: every mode through migrelay's relays (ws,"
            " wss, with any options) also runs with its relays (DIR/.venv/bin/python -m"
            " migrelay), labelled base:ws-multifd4 etc., right after it in every round;"
            " under the table, each pair's per-round time difference (CPU with"
            " --relay-only), for before/after figures."
        ),
    ] = None,
    baseline_relay_args: Annotated[
        str,
        typer.Option(
            help="With --baseline: extra arguments for its relays (it may not know this"
            " checkout's new flags)."
        ),
    ] = "",
) -> None:
    """Benchmark migrations: the tunnel against a direct TCP migration, same VMs.

    With --src-qmp and --dst-qmp it migrates your own two VMs once, in one mode, and
    leaves them as QEMU does (their RAM is not compared; the rate is of their RAM size,
    as the source QEMU reports it). With --relay-only it measures the relays alone,
    against socat, without QEMU.
    """
    # Named on the command line (not defaulted): which bench the options belong to.
    named = {name for name in ctx.params if _named(ctx, name)}
    relay_options = {"size", "channels", "cores"}
    both_benches = {"runs", "modes", "json_file", "relay_args", "baseline", "baseline_relay_args"}
    if relay_only:
        qemu_options = named - relay_options - both_benches - {"relay_only"}
        if qemu_options:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(qemu_options))
            exit_with(f"{flags}: not with --relay-only, which runs no QEMU")
        _bench_relays(
            runs if "runs" in named else None,
            modes if "modes" in named else None,
            json_file,
            size=size,
            channels=channels,
            cores=cores,
            relay_args=relay_args,
            baseline=baseline,
            baseline_relay_args=baseline_relay_args,
        )
    if named & relay_options:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in sorted(named & relay_options))
        exit_with(f"{flags}: only with --relay-only")
    # The lab is imported only here: the relay commands never load it.
    from migrelay.lab import bench as lab_bench
    from migrelay.lab.vm import RAM_CONTENTS
    from migrelay.units import format_bytes

    try:
        mode_list = lab_bench.available_modes(
            [m.strip() for m in modes.split(",") if m], baseline=baseline is not None
        )
        extra, baseline_extra = _relay_arguments(relay_args, baseline, baseline_relay_args)
        work = lab_bench.Workload.parse(workload)
        if content not in RAM_CONTENTS:
            raise ValueError(f"unknown --content {content!r} (one of {', '.join(RAM_CONTENTS)})")
        ram_bytes = parse_size(ram)
        work.check_ram(ram_bytes)
        disk_bytes = parse_size(disk) if disk is not None else None
        if disk_bytes is not None:
            lab_bench.check_disk_size(disk_bytes)
    except ValueError as exc:
        exit_with(str(exc))
    if link is not None and any(m.transport == "unix" for m in mode_list):
        exit_with("mode unix needs both QEMUs on one host; drop it with --link")
    if (src_qmp is None) != (dst_qmp is None):
        exit_with("--src-qmp and --dst-qmp go together")
    given = (src_qmp, dst_qmp) if src_qmp is not None and dst_qmp is not None else None
    if given is not None and baseline is not None:
        exit_with("--baseline is for test VMs: your own VMs can be migrated once")
    if given is not None and (len(mode_list) != 1 or runs != 1 or link is not None):
        exit_with("your own VMs can be migrated once: give one --modes, --runs 1, no --link")
    if given is not None and disk_bytes is not None:
        exit_with("--disk is for test VMs; your own VMs keep their disks")
    if given is not None and "ram" in named:
        exit_with("--ram is for test VMs; your own VMs' RAM size is read from QEMU")
    if given is not None and (work.dirties or content != "random"):
        exit_with("--workload and --content are for test VMs; your own VMs run as they are")
    if plot is not None:
        lab_bench.require_matplotlib()
    total = runs * len(mode_list)
    done = 0

    def on_start(mode: lab_bench.Mode, run: int) -> None:
        typer.echo(f"[{done + 1}/{total}] run {run}: {mode.name} ...", err=True)

    def on_result(result: lab_bench.RunResult) -> None:
        nonlocal done
        done += 1
        took = f"{result.seconds:.2f} s" if result.seconds else result.outcome
        ram_ok = {True: "RAM identical", False: "RAM MISMATCH", None: "RAM not compared"}[
            result.ram_matched
        ]
        if result.wire_bytes is not None:
            # QEMU counts multifd pages before compressing them; wire bytes are real.
            took += (
                f", {format_bytes(result.wire_bytes)} on the wire ({result.wire_source})"
                f" for {format_bytes(result.transferred_bytes)} by QEMU's count"
            )
        if result.passes is not None:
            took += f", {result.passes} passes"
        if result.max_throttle_percent:
            took += f", throttle up to {result.max_throttle_percent} %"
        if result.downtime_limit_ms is not None:
            took += f", downtime limit {result.downtime_limit_ms} ms"
        if result.policy_verdict and result.outcome != "completed":
            took += f" ({result.policy_verdict})"
        error = f" ({result.error})" if result.error else ""
        disk_ok = ""
        if result.disk_matched is not None:
            disk_ok = ", disk identical" if result.disk_matched else ", disk MISMATCH"
            if result.disk_seconds is not None and result.ram_seconds is not None:
                took += f" (disk {result.disk_seconds:.2f} s + RAM {result.ram_seconds:.2f} s)"
        typer.echo(f"    {result.mode}: {took}, {ram_ok}{disk_ok}{error}", err=True)

    async def main(stop: asyncio.Event) -> int:
        running = asyncio.ensure_future(
            lab_bench.run_bench(
                mode_list,
                ram_bytes,
                runs,
                on_result=on_result,
                on_start=on_start,
                link_rate=link,
                given_qmp=given,
                disk_size=disk_bytes,
                workload=work,
                ram_content=content,
                run_timeout=timeout,
                baseline=baseline,
                relay_args=extra,
                baseline_relay_args=baseline_extra,
            )
        )
        if running not in await runner.wait_first(running, stop.wait()):
            # Ctrl-C: the bench's VMs, relays and namespaces were torn down on the way out.
            return EXIT_INTERRUPTED
        report = running.result()
        typer.echo(lab_bench.format_table(report))
        typer.echo(lab_bench.WIRE_LEGEND, err=True)
        if json_file is not None:
            lab_bench.write_json(report, json_file)
        if plot is not None:
            lab_bench.plot_report(report, plot)
        return EXIT_FAILURE if lab_bench.any_failed(report) else EXIT_OK

    # asyncio: the bench measures the relays as subprocesses; its own loop is not timed.
    run_command(main, loop="asyncio")


def _named(ctx: typer.Context, name: str) -> bool:
    """Whether parameter ``name`` was given rather than defaulted (click's
    ``ParameterSource``, compared by name: typer vendors click in recent versions)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name != "DEFAULT"


def _relay_arguments(
    relay_args: str, baseline: Path | None, baseline_relay_args: str
) -> tuple[list[str], list[str]]:
    """Both benches' ``--relay-args`` and ``--baseline-relay-args``, split as a shell
    would; a ``--baseline`` checkout is checked for its interpreter first.

    Raises:
        ValueError: the baseline has no ``.venv``, or a quote is not closed.
    """
    from migrelay.lab.bench import baseline_command

    if baseline is not None:
        baseline_command(baseline)
    return shlex.split(relay_args), shlex.split(baseline_relay_args)


def _bench_relays(
    runs: int | None,
    modes: str | None,
    json_file: Path | None,
    *,
    size: str,
    channels: str,
    cores: str,
    relay_args: str,
    baseline: Path | None,
    baseline_relay_args: str,
) -> NoReturn:
    """``bench --relay-only``: `migrelay.lab.relaybench.run_relay_bench`; ``runs`` and
    ``modes`` None: the relay bench's own defaults, not the migration bench's."""
    from migrelay.lab import relaybench
    from migrelay.lab.bench import write_json

    try:
        size_bytes = parse_size(size)
        mode_names = modes.split(",") if modes is not None else relaybench.DEFAULT_MODES
        mode_list = relaybench.relay_modes(
            [m.strip() for m in mode_names if m.strip()], baseline=baseline is not None
        )
        channel_counts = relaybench.parse_channels(channels)
        core_counts = relaybench.parse_cores(cores)
        relaybench.check_size(size_bytes, channel_counts)
        extra, baseline_extra = _relay_arguments(relay_args, baseline, baseline_relay_args)
    except ValueError as exc:
        exit_with(str(exc))
    rounds = runs if runs is not None else relaybench.DEFAULT_RUNS
    total = rounds * len(mode_list) * len(channel_counts) * len(core_counts)
    done = 0

    def on_start(combination: relaybench.Combination, run: int) -> None:
        typer.echo(
            f"[{done + 1}/{total}] run {run}: {combination.mode.name}"
            f" x{combination.channels} cores {relaybench.cores_label(combination.cores)} ...",
            err=True,
        )

    def on_result(result: relaybench.RelayRun) -> None:
        nonlocal done
        done += 1
        typer.echo(relaybench.describe_run(result, size_bytes), err=True)

    async def main(stop: asyncio.Event) -> int:
        running = asyncio.ensure_future(
            relaybench.run_relay_bench(
                mode_list,
                channel_counts,
                core_counts,
                size_bytes,
                rounds,
                baseline=baseline,
                relay_args=extra,
                baseline_relay_args=baseline_extra,
                on_start=on_start,
                on_result=on_result,
            )
        )
        if running not in await runner.wait_first(running, stop.wait()):
            # Ctrl-C: the relays, the sink and the file on /dev/shm went on the way out.
            return EXIT_INTERRUPTED
        report = running.result()
        typer.echo(relaybench.format_table(report))
        typer.echo(relaybench.LEGEND, err=True)
        if json_file is not None:
            write_json(report, json_file)
        return EXIT_FAILURE if relaybench.any_failed(report) else EXIT_OK

    # asyncio: the relays run as subprocesses; the bench's own loop is not timed.
    run_command(main, loop="asyncio")


def main() -> None:
    """Console-script entry point."""
    app()
