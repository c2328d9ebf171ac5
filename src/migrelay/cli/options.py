"""The options more than one command takes, declared once, and ``--config FILE``.

Each option's default is given where the command declares it, read from the dataclass
that owns it (`Limits`, `ServeSettings`, `ClientSettings`, ...), never written here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, NoReturn

import typer

from migrelay import config_file
from migrelay.cli.running import EXIT_USAGE, report_error
from migrelay.errors import ConfigError

__all__ = [
    "CaOpt",
    "ClientCertOpt",
    "CompressLevelOpt",
    "CompressOpt",
    "ConfigOpt",
    "FingerprintOpt",
    "HeaderOpt",
    "JsonOpt",
    "KeepPausedOpt",
    "LogFormatOpt",
    "MaxMessageOpt",
    "MultifdOpt",
    "PingIntervalOpt",
    "PingTimeoutOpt",
    "PostcopyOpt",
    "ProxyOpt",
    "QmpOpt",
    "TlsKeyOpt",
    "TokenFileOpt",
    "VerboseOpt",
    "WorkersOpt",
    "config_callback",
]


def config_callback(ctx: typer.Context, value: Path | None) -> Path | None:
    """Eager ``--config`` callback: load the command's TOML table as its default map.

    The table's values rank under the command line and ``MIGRELAY_*`` variables. A bad
    file or value ends the command with one line and `EXIT_USAGE`, naming the file
    and the key (click would check the value later and blame the environment variable
    of the same option).
    """
    if value is None or ctx.resilient_parsing:
        return value
    command = ctx.info_name or ""
    params = {param.name: param for param in ctx.command.params if param.name}
    try:
        defaults = config_file.load_section(value, command, params)
    except ConfigError as exc:
        _usage_error(str(exc))
    for name, setting in list(defaults.items()):
        param = params[name]
        if param.multiple and isinstance(setting, str):
            defaults[name] = setting = [setting]  # one origin, say, written without [ ]
        try:
            param.process_value(ctx, setting)  # conversion only: no other option has a callback
        except typer.BadParameter as exc:
            key = name.replace("_", "-")
            _usage_error(f"{value}: setting {key!r} in [{command}]: {exc.message}")
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _usage_error(message: str) -> NoReturn:
    # One line, like every other refusal to start, not click's usage text and box.
    report_error(message)
    raise typer.Exit(EXIT_USAGE)


VerboseOpt = Annotated[int, typer.Option("-v", "--verbose", count=True, help="More detail.")]
LogFormatOpt = Annotated[
    str, typer.Option("--log-format", help="text or json", envvar="MIGRELAY_LOG_FORMAT")
]
ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        help="TOML file setting any of this command's flags, in the table named after"
        " the command: [serve], [connect] or [migrate].",
        envvar="MIGRELAY_CONFIG",
        is_eager=True,
        callback=config_callback,
    ),
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
        help="Accept only the server certificate with this SHA-256 fingerprint (as"
        " `openssl x509 -noout -fingerprint -sha256` prints it: 'sha256 Fingerprint=AB:CD:...',"
        " or its hex digits, with or without the colons).",
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
ProxyOpt = Annotated[
    str | None,
    typer.Option(
        help="HTTP CONNECT proxy http://[USER:PASS@]HOST:PORT ('direct': none)"
        " [default: https_proxy/http_proxy unless no_proxy].",
        envvar="MIGRELAY_PROXY",
    ),
]
# The relays' threads: serve and connect (migrelay.aio.workers).
WorkersOpt = Annotated[
    int,
    typer.Option(
        min=0,
        help="Event loops (threads) the channels are spread over: 1 runs everything on one"
        " loop; 0: one per CPU this process may use, at most 4.",
        envvar="MIGRELAY_WORKERS",
    ),
]
# Liveness, shared by serve, connect and migrate --to (DESIGN.md §3).
SocketOwnerOpt = Annotated[
    list[str] | None,
    typer.Option(
        help="User (name or uid) allowed at the other end of the relay's unix socket:"
        " whose source QEMU may connect to it, or (migrate --socket) who must have bound"
        " it; repeatable [default: this user and root].",
        envvar="MIGRELAY_SOCKET_OWNER",
    ),
]
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
MaxMessageOpt = Annotated[
    str,
    typer.Option(
        help="Largest message accepted, and sent (1M, 256K, ...); a bigger one closes 1009.",
        envvar="MIGRELAY_MAX_MESSAGE",
    ),
]

# The QMP commands: incoming, migrate, status, cancel.
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
CompressOpt = Annotated[
    str | None,
    typer.Option(
        "--compress",
        help="Compress multifd pages with zstd or zlib (needs --multifd; set the same on"
        " both sides). The relays count the compressed bytes; QEMU counts them before.",
    ),
]
CompressLevelOpt = Annotated[
    int | None,
    typer.Option(
        "--compress-level",
        min=0,
        max=20,
        help="Level of --compress: zlib 0-9, zstd 0-20 [default: QEMU's, 1].",
    ),
]
KeepPausedOpt = Annotated[
    bool,
    typer.Option(
        "--keep-paused",
        help="The destination keeps the guest paused once it has arrived (default: it"
        " resumes if the guest ran on the source).",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document at the end.")]
CopyStorageOpt = Annotated[
    bool,
    typer.Option(
        "--copy-storage",
        help="Copy the VM's writable disks too (NBD through the tunnel); the destination"
        " VM has the same disks (same device ids and sizes), empty.",
    ),
]
MigrateDisksOpt = Annotated[
    str | None,
    typer.Option(
        "--migrate-disks",
        help="Copy only these disks: device ids, comma-separated (implies --copy-storage).",
    ),
]
