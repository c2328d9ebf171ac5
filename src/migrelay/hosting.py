"""What ``serve`` and ``connect`` need to run on production hosts (issue 6).

Kept out of :mod:`migrelay.cli` so that the command functions stay a list of flags:

* :func:`config_callback`: ``--config FILE`` (TOML, :mod:`migrelay.config_file`) becomes
  the command's default map, under the command line and ``MIGRELAY_*`` variables;
* :func:`access_settings`: tokens with their targets, origins, trusted proxies, prefix;
* :func:`serve_until_stopped`: SIGHUP reloads, SIGTERM/SIGINT drain gracefully
  (a second signal stops at once);
* :func:`choose_proxy`: ``--proxy`` or ``https_proxy``/``http_proxy``/``no_proxy``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import typer

from . import config_file
from .aio import access
from .aio.client import WebSocketURL
from .aio.proxy import ProxyURL, proxy_for
from .aio.server import RelayServer, ServerConfig
from .errors import RelayError

logger = logging.getLogger("migrelay")


def config_callback(ctx: typer.Context, value: Path | None) -> Path | None:
    """Eager ``--config`` callback: load the command's TOML table as its default map."""
    if value is None or ctx.resilient_parsing:
        return value
    command = ctx.info_name or ""
    params = {param.name: param for param in ctx.command.params if param.name}
    try:
        defaults = config_file.load_section(value, command, params)
    except config_file.ConfigError as exc:
        raise _config_error(str(exc)) from None
    for name, setting in list(defaults.items()):
        param = params[name]
        if param.multiple and isinstance(setting, str):
            defaults[name] = setting = [setting]  # one origin, say, written without [ ]
        # Check each value now, to name the file and the key: click would check it
        # later and blame the environment variable of the same option.
        try:
            param.process_value(ctx, setting)  # conversion only: no other option has a callback
        except typer.BadParameter as exc:
            key = name.replace("_", "-")
            where = f"{value}: setting {key!r} in [{command}]"
            raise _config_error(f"{where}: {exc.message}") from None
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    return value


def _config_error(message: str) -> typer.Exit:
    # One line, like every other refusal to start, not click's usage text and box.
    typer.echo(f"migrelay: error: {message}", err=True)
    return typer.Exit(2)


def access_settings(
    token_file: Path | None,
    allow_origin: Sequence[str],
    trusted_proxy: Sequence[str],
    path_prefix: str,
) -> dict[str, Any]:
    """The ServerConfig fields for who may connect and how they are seen.

    Raises:
        RelayError: the token file is unreadable, malformed or empty.
        ValueError: an invalid ``--trusted-proxy`` or ``--path-prefix``.
    """
    entries = load_token_entries(token_file)
    return {
        "tokens": [entry.secret for entry in entries],
        "token_targets": access.token_targets(entries),
        "allowed_origins": frozenset(access.normalize_origin(o) for o in allow_origin),
        "trusted_proxies": access.parse_networks(trusted_proxy),
        "path_prefix": access.normalize_prefix(path_prefix),
    }


def load_token_entries(token_file: Path | None) -> list[access.TokenEntry]:
    """Read ``--token-file``; an absent option means no tokens.

    Raises:
        RelayError: the file is unreadable, malformed or holds no token.
    """
    if token_file is None:
        return []
    try:
        entries = access.load_token_file(token_file)
    except OSError as exc:
        raise RelayError(f"cannot read {token_file}: {exc.strerror or exc}") from None
    if not entries:
        raise RelayError(f"{token_file} holds no token")
    return entries


def load_tokens(token_file: Path | None) -> list[bytes]:
    """The secrets of a token file, target restrictions aside (``--metrics-token-file``).

    Raises:
        RelayError: the file is unreadable, malformed or holds no token.
    """
    return [entry.secret for entry in load_token_entries(token_file)]


def apply_tokens(config: ServerConfig, entries: Sequence[access.TokenEntry]) -> None:
    """SIGHUP: use the token file's new entries (read by `load_token_entries`)."""
    config.tokens = [entry.secret for entry in entries]
    config.token_targets = access.token_targets(entries)


def choose_proxy(url: str, explicit: str | None) -> ProxyURL | None:
    """The proxy for ``url`` (see :mod:`migrelay.aio.proxy`). Raises ValueError."""
    parsed = WebSocketURL.parse(url)
    return proxy_for(parsed.secure, parsed.host, explicit)


async def serve_until_stopped(
    config: ServerConfig, reload: Callable[[ServerConfig], None], shutdown_timeout: float
) -> int:
    """Run the server until SIGTERM or SIGINT, then drain for up to ``shutdown_timeout``.

    Raises:
        RelayError: the address cannot be listened on.
    """
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
    stop.clear()
    logger.info("shutting down: no new sessions; running ones get %g s", shutdown_timeout)
    drain = asyncio.ensure_future(server.shutdown(shutdown_timeout))
    again = asyncio.ensure_future(stop.wait())
    await asyncio.wait((drain, again), return_when=asyncio.FIRST_COMPLETED)
    if not drain.done():
        logger.info("second signal: stopping now")
        drain.cancel()
        await asyncio.gather(drain, return_exceptions=True)
        await server.close()
    again.cancel()
    await asyncio.gather(again, return_exceptions=True)
    if not drain.cancelled():
        drain.result()  # an error while draining is the command's error
    return 0
