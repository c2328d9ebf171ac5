"""The ``migrelay`` command line (typer): parse, configure logging, call the layers.

No business logic lives here: each command builds a config object and runs one
coroutine from :mod:`migrelay.aio` or :mod:`migrelay.control`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import logging
import shutil
import signal
import ssl
import sys
import tempfile
from collections.abc import AsyncIterator, Coroutine, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__, hosting
from .aio import runner, tls
from .aio.client import ClientConfig, SourceRelay
from .aio.proxy import ProxyURL
from .aio.server import PrepareTarget, Refusal, ServerConfig
from .control import operations
from .control.migrate import (
    DEFAULT_RECOVER_TIMEOUT_S,
    DEFAULT_STALL_TIMEOUT_S,
    MigrationCancelledError,
    MigrationOptions,
    PostcopyPausedError,
)
from .control.progress import (
    ProgressRenderer,
    TerminalProgress,
    progress_line,
    renderer_for,
    snapshot_document,
)
from .control.qmp import MigrationStatus
from .core.mask import MASK_IMPLEMENTATION, mask_implementation_warning
from .errors import ConnectError, MigrationError, RelayError, StateError, UnsupportedError
from .limits import Limits
from .units import parse_size

logger = logging.getLogger("migrelay")

DEFAULT_PORT = 8765
DEFAULT_SOURCE_SOCKET = Path("/tmp/qemu_migration_source.sock")
DEFAULT_DEST_SOCKET = Path("/tmp/qemu_migration_dest.sock")

app = typer.Typer(
    name="migrelay",
    help="Live-migrate QEMU virtual machines between hosts over WebSocket.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        document = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return json.dumps(document)


def configure_logging(verbose: int, log_format: str) -> None:
    """Send migrelay's log to stderr: INFO by default, DEBUG with ``-v``."""
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root = logging.getLogger("migrelay")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    warning = mask_implementation_warning()
    if warning:
        root.warning("%s", warning)


def fail(message: str, code: int = 1) -> typer.Exit:
    """Print one line to stderr and return the Exit to raise.

    Under ``--log-format json`` the line is a JSON record like the log's, so that a
    service's refusal to start reaches the same log pipeline in the same form.
    """
    root = logging.getLogger("migrelay")
    if any(isinstance(handler.formatter, _JsonFormatter) for handler in root.handlers):
        root.error("%s", message)  # through the log's own formatter
    else:
        typer.echo(f"migrelay: error: {message}", err=True)
    return typer.Exit(code)


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


VerboseOpt = Annotated[int, typer.Option("-v", "--verbose", count=True, help="More detail.")]
LogFormatOpt = Annotated[
    str, typer.Option("--log-format", help="text or json", envvar="MIGRELAY_LOG_FORMAT")
]

# Options the source side shares (connect, and migrate --to, which runs the same relay).
TokenFileOpt = Annotated[
    Path | None,
    typer.Option(
        help="File whose first token is sent as a bearer token.", envvar="MIGRELAY_TOKEN_FILE"
    ),
]
HeaderOpt = Annotated[
    list[str] | None, typer.Option(help="Extra handshake header 'Name: value' (repeatable).")
]
CaOpt = Annotated[
    Path | None,
    typer.Option(
        help="CA file to verify the server's certificate (default: system trust).",
        envvar="MIGRELAY_CA",
    ),
]
FingerprintOpt = Annotated[
    str | None,
    typer.Option(
        help="Accept only the server certificate with this SHA-256 fingerprint.",
        envvar="MIGRELAY_FINGERPRINT",
    ),
]
ClientCertOpt = Annotated[
    Path | None,
    typer.Option(
        help="Client certificate (PEM) for servers that require one.",
        envvar="MIGRELAY_TLS_CERT",
    ),
]
# The key of --tls-cert on either side: serve's certificate, or a client's.
TlsKeyOpt = Annotated[
    Path | None,
    typer.Option(help="Private key (PEM) of --tls-cert.", envvar="MIGRELAY_TLS_KEY"),
]
# Liveness, shared by serve, connect and migrate --to (DESIGN.md §3).
PingIntervalOpt = Annotated[
    float,
    typer.Option(
        min=0.01, help="Seconds of silence before a ping.", envvar="MIGRELAY_PING_INTERVAL"
    ),
]
PingTimeoutOpt = Annotated[
    float,
    typer.Option(min=0.01, help="Seconds to wait for the pong.", envvar="MIGRELAY_PING_TIMEOUT"),
]
ProxyOpt = Annotated[
    str | None,
    typer.Option(
        help="HTTP CONNECT proxy http://[USER:PASS@]HOST:PORT ('direct': none)"
        " [default: https_proxy/http_proxy unless no_proxy].",
        envvar="MIGRELAY_PROXY",
    ),
]


def _parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep:
        host, port = value, str(DEFAULT_PORT)
    host = host.strip("[]") or "0.0.0.0"
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise typer.BadParameter(f"invalid port in {value!r}")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML file setting any of this command's flags (table [serve] or [connect]).",
        envvar="MIGRELAY_CONFIG",
        is_eager=True,
        callback=hosting.config_callback,
    ),
]
MaxMessageOpt = Annotated[
    str,
    typer.Option(
        help="Largest message accepted, and sent (1M, 256K, ...); a bigger one closes 1009.",
        envvar="MIGRELAY_MAX_MESSAGE",
    ),
]


def _message_limits(
    max_message: str,
    ping_interval: float,
    ping_timeout: float,
    handshake_timeout: float = Limits.handshake_timeout,
) -> Limits:
    try:
        size = parse_size(max_message)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if size < 1024:
        raise fail(f"--max-message of {size} bytes is below the minimum of 1024")
    # A relay never sends a message larger than it would accept.
    return Limits(
        max_message_bytes=size,
        read_bytes=min(Limits.read_bytes, size),
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        handshake_timeout=handshake_timeout,
    )


def _run_until_signal(coro: Coroutine[Any, Any, int]) -> int:
    try:
        return runner.run(coro)
    except KeyboardInterrupt:
        return 130


@app.command()
def serve(
    listen: Annotated[
        str, typer.Option(help="HOST:PORT to listen on.", envvar="MIGRELAY_LISTEN")
    ] = f"127.0.0.1:{DEFAULT_PORT}",
    target: Annotated[
        Path | None,
        typer.Option(
            help="Unix socket of destination QEMU, for the path /.", envvar="MIGRELAY_TARGET"
        ),
    ] = None,
    target_dir: Annotated[
        Path | None,
        typer.Option(
            help="Directory of NAME.sock sockets, for the paths /NAME.",
            envvar="MIGRELAY_TARGET_DIR",
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
    ] = 30.0,
    max_sessions: Annotated[
        int, typer.Option(help="Most migrations at once.", envvar="MIGRELAY_MAX_SESSIONS")
    ] = 64,
    ping_interval: PingIntervalOpt = 15.0,
    ping_timeout: PingTimeoutOpt = 15.0,
    insecure: Annotated[
        bool,
        typer.Option(
            help="Allow listening beyond loopback without authentication.",
            envvar="MIGRELAY_INSECURE",
        ),
    ] = False,
    config_file: ConfigOpt = None,
    allow_origin: Annotated[
        list[str] | None,
        typer.Option(
            help="Accept browser clients only from this Origin (repeatable).",
            envvar="MIGRELAY_ALLOW_ORIGIN",
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
    ] = "",
    max_channels: Annotated[
        int,
        typer.Option(
            min=1, help="Most channels in one migration session.", envvar="MIGRELAY_MAX_CHANNELS"
        ),
    ] = 64,
    max_message: MaxMessageOpt = "1M",
    idle_timeout: Annotated[
        float,
        typer.Option(
            min=0,
            help="Close a channel that carried no data for this many seconds (4002); 0: never.",
            envvar="MIGRELAY_IDLE_TIMEOUT",
        ),
    ] = 0.0,
    handshake_timeout: Annotated[
        float,
        typer.Option(
            min=0.1,
            help="Seconds a client has to send its upgrade request (408).",
            envvar="MIGRELAY_HANDSHAKE_TIMEOUT",
        ),
    ] = 10.0,
    max_header_bytes: Annotated[
        int,
        typer.Option(
            min=1024,
            help="Largest request head accepted (431).",
            envvar="MIGRELAY_MAX_HEADER_BYTES",
        ),
    ] = 16384,
    shutdown_timeout: Annotated[
        float,
        typer.Option(
            min=0,
            help="On SIGTERM, seconds running migrations get to finish before their"
            " channels are closed (4004).",
            envvar="MIGRELAY_SHUTDOWN_TIMEOUT",
        ),
    ] = 120.0,
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
    host, port = _parse_listen(listen)
    if target is None and target_dir is None:
        target = DEFAULT_DEST_SOCKET
    try:
        access_fields = hosting.access_settings(
            token_file, allow_origin or [], trusted_proxy or [], path_prefix
        )
    except (RelayError, ValueError) as exc:
        raise fail(str(exc)) from None
    tokens = access_fields["tokens"]
    try:
        metrics_tokens = hosting.load_tokens(metrics_token_file)
    except RelayError as exc:
        raise fail(str(exc)) from None
    if (tls_cert is None) != (tls_key is None):
        raise fail("--tls-cert and --tls-key go together")
    if client_ca is not None and tls_cert is None:
        raise fail("--client-ca needs --tls-cert and --tls-key")
    try:
        credentials = (
            tls.ReloadableServerContext(tls_cert, tls_key, client_ca)
            if tls_cert and tls_key
            else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise fail(f"cannot load the TLS certificate: {exc}") from None
    if not tokens and client_ca is None and not _is_loopback(host) and not insecure:
        raise fail(
            f"refusing to listen on {host} without authentication: "
            "give --token-file (or --insecure on a trusted network)"
        )
    limits = _message_limits(
        max_message,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        handshake_timeout=handshake_timeout,
    )
    limits = dataclasses.replace(limits, max_head_bytes=max_header_bytes)
    config = ServerConfig(
        host=host,
        port=port,
        target=target,
        target_dir=target_dir,
        ssl_context=credentials.listening if credentials is not None else None,
        wait_target=wait_target,
        max_sessions=max_sessions,
        limits=limits,
        prepare_target=_prepare_target_hook(qmp, qmp_dir),
        max_channels=max_channels,
        idle_timeout=idle_timeout,
        metrics_tokens=metrics_tokens,
        **access_fields,
    )

    def reload(config: ServerConfig) -> None:
        # Read every file before changing anything: a reload is all or nothing.
        entries = hosting.load_token_entries(token_file)
        new_metrics_tokens = hosting.load_tokens(metrics_token_file)
        if credentials is not None:
            credentials.reload()  # atomic in itself: a new context or none
        hosting.apply_tokens(config, entries)
        config.metrics_tokens = new_metrics_tokens

    try:
        raise typer.Exit(
            _run_until_signal(hosting.serve_until_stopped(config, reload, shutdown_timeout))
        )
    except RelayError as exc:
        raise fail(str(exc)) from None


def _prepare_target_hook(qmp: Path | None, qmp_dir: Path | None) -> PrepareTarget | None:
    """``serve --qmp/--qmp-dir``: the server's hook that runs ``migrate-incoming``."""
    if qmp is None and qmp_dir is None:
        return None

    async def prepare(name: str, target: Path, headers: Mapping[str, str]) -> None:
        path = qmp if name == "/" else None
        if name != "/" and qmp_dir is not None:
            path = qmp_dir / f"{name}.qmp"
        if path is None:
            return  # this path has no QMP socket: the operator runs `incoming` there
        try:
            await operations.prepare_target(str(path), target, headers)
        except ValueError as exc:
            raise Refusal(400, str(exc)) from None
        except StateError as exc:
            raise Refusal(409, f"destination vm not ready: {exc}") from None
        except UnsupportedError as exc:
            raise Refusal(409, f"destination qemu cannot: {exc}") from None
        except (ConnectError, MigrationError, TimeoutError) as exc:
            raise Refusal(
                503, f"destination qemu not prepared: {exc}", (("Retry-After", "5"),)
            ) from None

    return prepare


async def _connect(relay: SourceRelay) -> int:
    await relay.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    waits = [asyncio.ensure_future(stop.wait())]
    if relay.once:
        waits.append(asyncio.ensure_future(relay.finished.wait()))
    await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    for wait in waits:
        wait.cancel()
    await relay.close()
    if relay.once and not relay.finished.is_set():
        return 130
    return 0 if relay.all_clean else 1


def _read_token(token_file: Path | None) -> str | None:
    if token_file is None:
        return None
    try:
        tokens = hosting.load_tokens(token_file)
    except RelayError as exc:  # unreadable, malformed or empty: one line
        raise fail(str(exc)) from None
    return tokens[0].decode("utf-8")


def _client_tls(
    ca: Path | None, fingerprint: str | None, cert: Path | None, key: Path | None
) -> dict[str, Any]:
    if ca is None and fingerprint is None and cert is None:
        return {}
    if ca is not None and fingerprint is not None:
        raise fail("--ca and --fingerprint exclude each other")
    try:
        pin = tls.normalize_fingerprint(fingerprint) if fingerprint else None
        context = tls.client_context(ca, pin, cert, key)
    except ValueError as exc:
        raise fail(str(exc)) from None
    except (OSError, ssl.SSLError) as exc:
        raise fail(f"cannot load TLS files: {exc}") from None
    return {"ssl_context": context, "fingerprint": pin}


def _parse_headers(values: list[str]) -> list[tuple[str, str]]:
    headers = []
    for value in values:
        name, sep, content = value.partition(":")
        if not sep or not name.strip():
            raise typer.BadParameter(f"header must be 'Name: value', not {value!r}")
        headers.append((name.strip(), content.strip()))
    return headers


@app.command()
def connect(
    url: Annotated[
        str, typer.Argument(help="ws:// or wss:// URL of migrelay serve.", envvar="MIGRELAY_URL")
    ],
    listen_unix: Annotated[
        Path,
        typer.Option(
            help="Unix socket that source QEMU migrates to.", envvar="MIGRELAY_LISTEN_UNIX"
        ),
    ] = DEFAULT_SOURCE_SOCKET,
    token_file: TokenFileOpt = None,
    header: HeaderOpt = None,
    ca: CaOpt = None,
    fingerprint: FingerprintOpt = None,
    tls_cert: ClientCertOpt = None,
    tls_key: TlsKeyOpt = None,
    once: Annotated[
        bool, typer.Option(help="Exit after the first migration ends.", envvar="MIGRELAY_ONCE")
    ] = False,
    ping_interval: PingIntervalOpt = 15.0,
    ping_timeout: PingTimeoutOpt = 15.0,
    retry_open: Annotated[
        float,
        typer.Option(
            min=0,
            help="Seconds to hold QEMU's connection and retry when the server cannot be"
            " reached, instead of failing it; lets migrate --postcopy resume after a"
            " failed link [default: 0, fail at once].",
            envvar="MIGRELAY_RETRY_OPEN",
        ),
    ] = 0.0,
    config_file: ConfigOpt = None,
    proxy: ProxyOpt = None,
    max_message: MaxMessageOpt = "1M",
    verbose: VerboseOpt = 0,
    log_format: LogFormatOpt = "text",
) -> None:
    """Source relay: listen for source QEMU and carry each connection over a WebSocket."""
    configure_logging(verbose, log_format)
    limits = _message_limits(max_message, ping_interval=ping_interval, ping_timeout=ping_timeout)
    try:
        proxy_url = hosting.choose_proxy(url, proxy)
    except ValueError as exc:
        raise fail(str(exc)) from None
    config = ClientConfig(
        url=url,
        token=_read_token(token_file),
        headers=_parse_headers(header or []),
        limits=limits,
        proxy=proxy_url,
        open_retry=retry_open,
        **_client_tls(ca, fingerprint, tls_cert, tls_key),
    )
    relay = SourceRelay(config, listen_unix, once=once)
    try:
        raise typer.Exit(_run_until_signal(_connect(relay)))
    except (RelayError, ValueError, OSError) as exc:
        raise fail(str(exc)) from None


# -- QMP control: incoming, migrate, status, cancel ---------------------------------------

#: Seconds ``migrate --to`` waits, after QEMU reports ``completed``, for the in-process
#: relay to deliver the last bytes and close its channels before tearing it down.
RELAY_DRAIN_TIMEOUT_S = 30.0

#: Exit status after Ctrl-C (128 + SIGINT), as shells report it.
EXIT_INTERRUPTED = 130

QmpOpt = Annotated[
    Path, typer.Option("--qmp", help="QMP unix socket of the VM.", envvar="MIGRELAY_QMP")
]
MultifdOpt = Annotated[
    int | None,
    typer.Option(
        "--multifd",
        min=1,
        max=255,
        help="Use multifd with N channels (set the same on both sides).",
    ),
]
PostcopyOpt = Annotated[
    bool, typer.Option("--postcopy", help="Enable postcopy-ram (set the same on both sides).")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document at the end.")]


def _configure_command_logging(verbose: int, log_format: str) -> None:
    # The QMP commands print their own results; their log says only what went wrong,
    # unless asked: -v for the steps, -vv for every QMP message.
    configure_logging(max(verbose - 1, 0), log_format)
    if verbose == 0:
        logging.getLogger("migrelay").setLevel(logging.WARNING)


def _options(
    multifd: int | None,
    postcopy: bool,
    max_bandwidth: str | None = None,
    downtime_limit: int | None = None,
) -> MigrationOptions:
    try:
        return MigrationOptions(
            multifd_channels=multifd,
            postcopy=postcopy,
            max_bandwidth=parse_size(max_bandwidth) if max_bandwidth is not None else None,
            downtime_limit_ms=downtime_limit,
        )
    except ValueError as exc:
        raise fail(str(exc)) from None


def _run_control(coro: Coroutine[Any, Any, int]) -> int:
    """Run a control coroutine; every expected failure becomes one line and exit 1."""
    try:
        return runner.run(coro)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except (RelayError, TimeoutError, OSError) as exc:
        raise fail(str(exc) or type(exc).__name__) from None


def _stop_on_signals() -> asyncio.Event:
    """An event set by SIGINT and SIGTERM (instead of KeyboardInterrupt mid-QMP)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    return stop


def _renderer(json_output: bool) -> ProgressRenderer:
    return renderer_for(
        sys.stdout, json_output=json_output, columns=shutil.get_terminal_size().columns
    )


def _poll_interval(renderer: ProgressRenderer) -> float:
    # A bar redraws four times a second; a line a second is printed from polls every
    # half second, so that no second goes without one.
    return 0.25 if isinstance(renderer, TerminalProgress) else 0.5


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
    recover: Annotated[
        bool,
        typer.Option(
            "--recover",
            help="The link failed during postcopy: listen again (migrate-recover) so that"
            " migrate --postcopy can resume.",
        ),
    ] = False,
    verbose: VerboseOpt = 0,
    log_format: LogFormatOpt = "text",
) -> None:
    """Destination: make QEMU (started with -incoming defer) listen for the migration."""
    _configure_command_logging(verbose, log_format)
    options = _options(multifd, postcopy)

    async def main() -> int:
        info = await operations.incoming(str(qmp), f"unix:{socket}", options, recover=recover)
        where = ", ".join(info.socket_addresses) or f"unix:{socket}"
        what = "the paused postcopy migration to resume" if recover else "an incoming migration"
        typer.echo(f"{qmp.stem}: listening for {what} on {where}")
        return 0

    raise typer.Exit(_run_control(main()))


@asynccontextmanager
async def _in_process_relay(
    url: str,
    options: MigrationOptions,
    token_file: Path | None,
    headers: list[str],
    ca: Path | None,
    fingerprint: str | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    proxy: ProxyURL | None,
    limits: Limits,
    open_retry: float = 0.0,
) -> AsyncIterator[SourceRelay]:
    """``migrate --to``: the source relay on a private socket, for one migration."""
    config = ClientConfig(
        url=url,
        token=_read_token(token_file),
        headers=[
            *_parse_headers(headers),
            (operations.MIGRATION_HEADER, operations.announcement(options)),
        ],
        proxy=proxy,
        limits=limits,
        open_retry=open_retry,
        **_client_tls(ca, fingerprint, tls_cert, tls_key),
    )
    # mkdtemp makes the directory 0700: no other user can reach the socket inside.
    directory = Path(tempfile.mkdtemp(prefix="migrelay-"))
    relay = SourceRelay(config, directory / "source.sock", once=True)
    try:
        await relay.start()
        yield relay
    finally:
        await relay.close()
        shutil.rmtree(directory, ignore_errors=True)


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
        typer.Option("--downtime-limit", min=0, help="Longest pause in ms [QEMU: 300]."),
    ] = None,
    postcopy_after: Annotated[
        int,
        typer.Option(
            "--postcopy-after",
            min=1,
            help="With --postcopy: switch to postcopy in this pass over RAM (1: at once).",
        ),
    ] = operations.POSTCOPY_AFTER_PASSES,
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
    json_output: JsonOpt = False,
    token_file: TokenFileOpt = None,
    header: HeaderOpt = None,
    ca: CaOpt = None,
    fingerprint: FingerprintOpt = None,
    tls_cert: ClientCertOpt = None,
    tls_key: TlsKeyOpt = None,
    proxy: ProxyOpt = None,
    ping_interval: PingIntervalOpt = 15.0,
    ping_timeout: PingTimeoutOpt = 15.0,
    verbose: VerboseOpt = 0,
    log_format: LogFormatOpt = "text",
) -> None:
    """Source: migrate the VM and follow it; exit 0 once it has completed.

    Ctrl-C cancels the migration; the source VM stays as it was.
    """
    _configure_command_logging(verbose, log_format)
    if socket is not None and to is not None:
        raise fail("--socket and --to exclude each other")
    if to is not None and no_wait:
        raise fail("--no-wait cannot be used with --to: the relay runs inside this command")
    # MIGRELAY_PROXY may be set for `connect` on this host; only the flag is a mistake.
    proxy_source = ctx.get_parameter_source("proxy")
    if to is None and proxy_source is not None and proxy_source.name == "COMMANDLINE":
        raise fail("--proxy needs --to: with --socket, migrelay connect reaches the server")
    options = _options(multifd, postcopy, max_bandwidth, downtime_limit)
    try:
        proxy_url = hosting.choose_proxy(to, proxy) if to is not None else None
    except ValueError as exc:
        raise fail(str(exc)) from None
    if to is None:
        uri = f"unix:{socket or DEFAULT_SOURCE_SOCKET}"
    elif verbose == 0:
        # The in-process relay's failures reach the operator through this command's
        # own error line; its log would say the same thing a second time.
        logging.getLogger("migrelay.aio").setLevel(logging.CRITICAL)
    renderer = _renderer(json_output)

    async def main() -> int:
        stop = _stop_on_signals()
        if to is None:
            return await _migrate_and_report(uri, None, stop)
        async with _in_process_relay(
            to,
            options,
            token_file,
            header or [],
            ca,
            fingerprint,
            tls_cert,
            tls_key,
            proxy_url,
            dataclasses.replace(Limits(), ping_interval=ping_interval, ping_timeout=ping_timeout),
            # A postcopy resume must not be dropped once QEMU connected (ClientConfig).
            open_retry=recover_timeout if postcopy else 0.0,
        ) as relay:
            return await _migrate_and_report(f"unix:{relay.listen_path}", relay, stop)

    async def _migrate_and_report(
        target: str, relay: SourceRelay | None, stop: asyncio.Event
    ) -> int:
        try:
            result = await operations.migrate(
                str(qmp),
                target,
                options,
                on_progress=renderer.update,
                interval=_poll_interval(renderer),
                stop=stop,
                wait=not no_wait,
                recover_timeout=recover_timeout,
                postcopy_after_passes=postcopy_after,
                stall_timeout=stall_timeout or None,
            )
        except MigrationError as exc:
            # The document keeps QEMU's text whole; stderr says what failed, too.
            error = message = str(exc)
            if relay is not None and relay.first_error is not None:
                error = message = (
                    f"cannot open websocket to {to}: {relay.first_error} (qemu: {error})"
                )
            elif isinstance(exc, MigrationCancelledError) and not stop.is_set():
                message = (
                    "migration cancelled by another qmp client (migrelay cancel?);"
                    " the source vm was left as it was"
                )
            elif not stop.is_set():
                message = f"migration failed: {error}"
            # A paused postcopy migration was not cancelled: its own text says so.
            interrupted = stop.is_set() and not isinstance(exc, PostcopyPausedError)
            return _report_failure(renderer, error, message, interrupted=interrupted)
        except (RelayError, TimeoutError) as exc:
            if json_output:
                renderer.finish(str(exc))
            raise
        if result is None:
            typer.echo(f"{qmp.stem}: migration to {target} started")
            return 0
        if relay is not None:
            try:
                async with asyncio.timeout(RELAY_DRAIN_TIMEOUT_S):
                    await relay.finished.wait()
            except TimeoutError:
                logger.warning(
                    "relay channels still open %g s after completion", RELAY_DRAIN_TIMEOUT_S
                )
        renderer.finish()
        return 0

    raise typer.Exit(_run_control(main()))


def _report_failure(
    renderer: ProgressRenderer, error: str, message: str, *, interrupted: bool
) -> int:
    """Finish the progress output with ``error``; say ``message`` on stderr."""
    if interrupted:
        error = message = "migration cancelled on interrupt; the source vm was left as it was"
    if renderer.last is not None or not isinstance(renderer, TerminalProgress):
        renderer.finish(error)
    typer.echo(f"migrelay: error: {message}", err=True)
    return EXIT_INTERRUPTED if interrupted else 1


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
    _configure_command_logging(verbose, log_format)

    async def once() -> int:
        runstate, info = await operations.query(str(qmp))
        if json_output:
            typer.echo(json.dumps(snapshot_document(info, str(runstate))))
        else:
            typer.echo(f"{qmp.stem}: {runstate}, migration {progress_line(info)}")
            if info.error_desc:
                typer.echo(f"{qmp.stem}: error: {info.error_desc}")
        return 1 if info.status is MigrationStatus.FAILED else 0

    async def follow() -> int:
        renderer = _renderer(json_output)
        stop = _stop_on_signals()
        info = await operations.watch(
            str(qmp), renderer.update, _poll_interval(renderer), stop=stop
        )
        if info.status is MigrationStatus.COMPLETED:
            renderer.finish()
            return 0
        if info.status is MigrationStatus.NONE:
            renderer.finish()
            return 0
        if stop.is_set() and not info.status.is_terminal:
            renderer.finish("interrupted; the migration goes on")
            return EXIT_INTERRUPTED
        error = info.error_desc or f"migration {info.status}"
        return _report_failure(renderer, error, f"migration failed: {error}", interrupted=False)

    raise typer.Exit(_run_control(follow() if watch else once()))


@app.command()
def cancel(
    qmp: QmpOpt,
    verbose: VerboseOpt = 0,
    log_format: LogFormatOpt = "text",
) -> None:
    """Cancel the VM's outgoing migration; the VM keeps running where it is."""
    _configure_command_logging(verbose, log_format)

    async def main() -> int:
        info, runstate = await operations.cancel_migration(str(qmp))
        if info.status is MigrationStatus.COMPLETED:
            raise MigrationError(
                f"the migration had already completed; {qmp.stem} is {runstate} and"
                " now runs on the destination"
            )
        if info.status is MigrationStatus.NONE:
            typer.echo(f"{qmp.stem}: no migration to cancel; vm is {runstate}")
        else:
            typer.echo(f"{qmp.stem}: migration {info.status}; vm is {runstate}")
        return 0

    raise typer.Exit(_run_control(main()))


@app.command()
def bench(
    ram: Annotated[str, typer.Option(help="Guest RAM of each test VM (random bytes).")] = "1G",
    runs: Annotated[int, typer.Option(min=1, help="Interleaved rounds of every mode.")] = 3,
    modes: Annotated[
        str,
        typer.Option(
            help="Comma-separated: tcp, unix, ws, wss, socat, and X-multifdN (ws-multifd4)."
        ),
    ] = "tcp,ws,wss,tcp-multifd4,ws-multifd4,socat",
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
) -> None:
    """Benchmark migrations: the tunnel against a direct TCP migration, same VMs.

    With --src-qmp and --dst-qmp it migrates your own two VMs once, in one mode, and
    leaves them as QEMU does (their RAM is not compared).
    """
    from .lab import bench as bench_module

    try:
        mode_list = bench_module.available_modes([m.strip() for m in modes.split(",") if m])
        ram_bytes = parse_size(ram)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if link is not None and any(m.transport == "unix" for m in mode_list):
        raise fail("mode unix needs both QEMUs on one host; drop it with --link")
    if (src_qmp is None) != (dst_qmp is None):
        raise fail("--src-qmp and --dst-qmp go together")
    given = (src_qmp, dst_qmp) if src_qmp is not None and dst_qmp is not None else None
    if given is not None and (len(mode_list) != 1 or runs != 1 or link is not None):
        raise fail("your own VMs can be migrated once: give one --modes, --runs 1, no --link")
    if plot is not None:
        bench_module.require_matplotlib()
    total = runs * len(mode_list)
    done = 0

    def on_start(mode: bench_module.Mode, run: int) -> None:
        typer.echo(f"[{done + 1}/{total}] run {run}: {mode.name} ...", err=True)

    def on_result(result: bench_module.RunResult) -> None:
        nonlocal done
        done += 1
        took = f"{result.seconds:.2f} s" if result.seconds else "failed"
        ram_ok = {True: "RAM identical", False: "RAM MISMATCH", None: "RAM not compared"}[
            result.ram_matched
        ]
        error = f" ({result.error})" if result.error else ""
        typer.echo(f"    {result.mode}: {took}, {ram_ok}{error}", err=True)

    report = runner.run(
        bench_module.run_bench(
            mode_list,
            ram_bytes,
            runs,
            on_result=on_result,
            on_start=on_start,
            link_rate=link,
            given_qmp=given,
        ),
        "asyncio",
    )
    typer.echo(bench_module.format_table(report))
    if json_file is not None:
        bench_module.write_json(report, json_file)
    if plot is not None:
        bench_module.plot_report(report, plot)
    summary = report["summary"]
    assert isinstance(summary, list)
    failed = any(row["failures"] or not row["all_ram_matched"] for row in summary)
    raise typer.Exit(1 if failed else 0)


def main() -> None:
    """Console-script entry point."""
    app()
