"""The ``migrelay`` command line (typer): parse, configure logging, call the layers.

No business logic lives here: each command builds a config object and runs one
coroutine from :mod:`migrelay.aio` or :mod:`migrelay.control`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import signal
import ssl
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any

import typer

from . import __version__
from .aio import runner, tls
from .aio.client import ClientConfig, SourceRelay
from .aio.server import RelayServer, ServerConfig, load_tokens
from .config import Limits
from .core.mask import MASK_IMPLEMENTATION, mask_implementation_warning
from .errors import RelayError

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
    """Print one line to stderr and return the Exit to raise."""
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


def _run_until_signal(coro: Coroutine[Any, Any, int]) -> int:
    try:
        return runner.run(coro)
    except KeyboardInterrupt:
        return 130


async def _serve(config: ServerConfig, reload: Callable[[ServerConfig], None]) -> int:
    server = RelayServer(config)
    try:
        await server.start()
    except OSError as exc:
        raise RelayError(f"cannot listen on {config.host}:{config.port}: {exc.strerror}") from exc
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)

    def on_hangup() -> None:
        try:
            reload(config)
        except (OSError, ssl.SSLError, RelayError) as exc:
            logger.error("reload failed, keeping the old settings: %s", exc)
        else:
            logger.info("reloaded tokens and certificates")

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    await stop.wait()
    logger.info("shutting down")
    await server.close()
    return 0


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
    tls_key: Annotated[
        Path | None,
        typer.Option(help="Private key (PEM) of --tls-cert.", envvar="MIGRELAY_TLS_KEY"),
    ] = None,
    client_ca: Annotated[
        Path | None,
        typer.Option(
            help="Require client certificates signed by this CA (mTLS).",
            envvar="MIGRELAY_CLIENT_CA",
        ),
    ] = None,
    wait_target: Annotated[
        float, typer.Option(help="Seconds to wait for the destination socket to appear.")
    ] = 30.0,
    max_sessions: Annotated[int, typer.Option(help="Most migrations at once.")] = 64,
    ping_interval: Annotated[float, typer.Option(help="Seconds of silence before a ping.")] = 15.0,
    ping_timeout: Annotated[float, typer.Option(help="Seconds to wait for the pong.")] = 15.0,
    insecure: Annotated[
        bool, typer.Option(help="Allow listening beyond loopback without authentication.")
    ] = False,
    verbose: VerboseOpt = 0,
    log_format: LogFormatOpt = "text",
) -> None:
    """Destination relay: accept WebSockets and hand each to destination QEMU's socket."""
    configure_logging(verbose, log_format)
    host, port = _parse_listen(listen)
    if target is None and target_dir is None:
        target = DEFAULT_DEST_SOCKET
    tokens = load_tokens(token_file) if token_file else []
    if token_file and not tokens:
        raise fail(f"{token_file} holds no token")
    if (tls_cert is None) != (tls_key is None):
        raise fail("--tls-cert and --tls-key go together")
    if client_ca is not None and tls_cert is None:
        raise fail("--client-ca needs --tls-cert and --tls-key")
    try:
        ssl_context = (
            tls.server_context(tls_cert, tls_key, client_ca) if tls_cert and tls_key else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise fail(f"cannot load the TLS certificate: {exc}") from None
    if not tokens and client_ca is None and not _is_loopback(host) and not insecure:
        raise fail(
            f"refusing to listen on {host} without authentication: "
            "give --token-file (or --insecure on a trusted network)"
        )
    limits = Limits(ping_interval=ping_interval, ping_timeout=ping_timeout)
    config = ServerConfig(
        host=host,
        port=port,
        target=target,
        target_dir=target_dir,
        tokens=tokens,
        ssl_context=ssl_context,
        wait_target=wait_target,
        max_sessions=max_sessions,
        limits=limits,
    )

    def reload(config: ServerConfig) -> None:
        new_tokens = load_tokens(token_file) if token_file else []
        if token_file and not new_tokens:
            raise RelayError(f"{token_file} holds no token")
        if config.ssl_context is not None and tls_cert and tls_key:
            tls.reload_server_context(config.ssl_context, tls_cert, tls_key, client_ca)
        config.tokens = new_tokens

    try:
        raise typer.Exit(_run_until_signal(_serve(config, reload)))
    except RelayError as exc:
        raise fail(str(exc)) from None


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
    tokens = load_tokens(token_file)
    if not tokens:
        raise fail(f"{token_file} holds no token")
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
    token_file: Annotated[
        Path | None,
        typer.Option(
            help="File whose first token is sent as a bearer token.", envvar="MIGRELAY_TOKEN_FILE"
        ),
    ] = None,
    header: Annotated[
        list[str] | None, typer.Option(help="Extra handshake header 'Name: value' (repeatable).")
    ] = None,
    ca: Annotated[
        Path | None,
        typer.Option(
            help="CA file to verify the server's certificate (default: system trust).",
            envvar="MIGRELAY_CA",
        ),
    ] = None,
    fingerprint: Annotated[
        str | None,
        typer.Option(
            help="Accept only the server certificate with this SHA-256 fingerprint.",
            envvar="MIGRELAY_FINGERPRINT",
        ),
    ] = None,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            help="Client certificate (PEM) for servers that require one.",
            envvar="MIGRELAY_TLS_CERT",
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(help="Private key (PEM) of --tls-cert.", envvar="MIGRELAY_TLS_KEY"),
    ] = None,
    once: Annotated[bool, typer.Option(help="Exit after the first migration ends.")] = False,
    ping_interval: Annotated[float, typer.Option(help="Seconds of silence before a ping.")] = 15.0,
    ping_timeout: Annotated[float, typer.Option(help="Seconds to wait for the pong.")] = 15.0,
    verbose: VerboseOpt = 0,
    log_format: LogFormatOpt = "text",
) -> None:
    """Source relay: listen for source QEMU and carry each connection over a WebSocket."""
    configure_logging(verbose, log_format)
    limits = Limits(ping_interval=ping_interval, ping_timeout=ping_timeout)
    config = ClientConfig(
        url=url,
        token=_read_token(token_file),
        headers=_parse_headers(header or []),
        limits=limits,
        **_client_tls(ca, fingerprint, tls_cert, tls_key),
    )
    relay = SourceRelay(config, listen_unix, once=once)
    try:
        raise typer.Exit(_run_until_signal(_connect(relay)))
    except (RelayError, ValueError, OSError) as exc:
        raise fail(str(exc)) from None


def main() -> None:
    """Console-script entry point."""
    app()
