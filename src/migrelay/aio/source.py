"""The source relay as the commands run it: ``connect``, and ``migrate --to`` in-process.

`ClientSettings` holds what the operator gave (a URL, file paths, header lines, a
proxy); `ClientSettings.load` reads the files and returns the `ClientConfig` that
`SourceRelay` runs with. `run_source_relay` is ``migrelay connect``: it listens until
stopped (or, with ``once``, until the first migration ends). `run_mapped_relays` is
``connect --map NAME=PATH ...``: one relay per socket, each to the target ``/NAME`` of
the same server, as a libvirt migration needs (libvirt's RPC, QEMU's migration stream,
the NBD disk copy); with ``once`` it ends when the migration has ended, that is once a
session has ended on one of the sockets and no socket has a channel open any more.
`private_relay` is ``migrate --to``: the same relay on a socket in a fresh private
directory, for one migration, removed afterwards.

What `ClientSettings.load` refuses beyond malformed values: TLS options with a ``ws://``
URL (they would be ignored), and credentials (a token, an ``Authorization`` header)
that a ``ws://`` URL would send through an HTTP proxy: the CONNECT tunnel carries the
plain-text upgrade request, so the proxy, and the network on both of its sides, would
read the token. ``wss://`` through the same proxy runs TLS inside the tunnel: the proxy
sees the host and port only. ``ws://`` without a proxy stays allowed, token or not (the
one-host workflow on loopback; a remote ``ws://`` server is the operator's choice).
"""

from __future__ import annotations

import asyncio
import dataclasses
import shutil
import ssl
import tempfile
import urllib.parse
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from migrelay.aio import access, local, tls
from migrelay.aio.client import ClientConfig, SourceRelay, WebSocketURL
from migrelay.aio.local import SocketOwners
from migrelay.aio.proxy import ProxyURL, proxy_for
from migrelay.aio.runner import wait_first
from migrelay.aio.workers import resolve_workers
from migrelay.errors import ConfigError
from migrelay.limits import Limits

__all__ = [
    "DEFAULT_SOURCE_SOCKET",
    "EXIT_INTERRUPTED",
    "ClientSettings",
    "choose_proxy",
    "parse_header_lines",
    "parse_socket_map",
    "private_relay",
    "run_mapped_relays",
    "run_source_relay",
]

#: ``connect``'s socket and ``migrate --socket``'s default: in the private runtime
#: directory (`migrelay.aio.local.runtime_dir`), not in ``/tmp`` where another user could
#: bind it first. ``connect`` creates the directory (mode 0700) when it listens there.
DEFAULT_SOURCE_SOCKET: Final = local.runtime_dir() / "source.sock"

#: Exit status after SIGINT or SIGTERM (128 + SIGINT), as shells report an interrupt.
EXIT_INTERRUPTED: Final = 130


@dataclass(frozen=True)
class ClientSettings:
    """What ``connect`` (or ``migrate --to``) was told about reaching the server."""

    url: str
    token_file: Path | None = None
    #: ``Name: value`` lines, added to every handshake.
    header_lines: Sequence[str] = ()
    #: ``(name, value)`` pairs added after ``header_lines`` (``migrate --to``'s
    #: capability announcement).
    extra_headers: Sequence[tuple[str, str]] = ()
    ca: Path | None = None
    fingerprint: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: ``--proxy``: a URL, ``direct``, or None for the ``*_proxy`` variables.
    proxy: str | None = None
    limits: Limits = field(default_factory=Limits)
    open_retry: float = ClientConfig.open_retry
    #: ``--socket-owner``: the users whose processes may connect to the relay's socket
    #: (source QEMU); by default this user and root.
    socket_owners: SocketOwners = field(default_factory=SocketOwners.default)
    #: Event loops (threads) the channels are spread over (`migrelay.aio.workers`); 0:
    #: one per CPU this process may use, at most `~migrelay.aio.workers.DEFAULT_MAX_WORKERS`.
    workers: int = 0

    def load(self) -> ClientConfig:
        """Read the files and check the values; return the relay's configuration.

        Raises:
            ConfigError: a bad URL, header, proxy, token file or TLS file; TLS options
                with a ``ws://`` URL; a token that ``ws://`` would show a proxy.
        """
        try:
            url = WebSocketURL.parse(self.url)
            proxy = choose_proxy(self.url, self.proxy)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        try:
            workers = resolve_workers(self.workers)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        ssl_context, pin = self._tls()
        if not url.secure:
            self._refuse_tls_options()
        token = read_first_token(self.token_file)
        headers = [*parse_header_lines(self.header_lines), *self.extra_headers]
        if not url.secure and proxy is not None:
            self._refuse_credentials_through(proxy, token, headers)
        return ClientConfig(
            url=self.url,
            token=token,
            headers=headers,
            ssl_context=ssl_context,
            fingerprint=pin,
            limits=self.limits,
            proxy=proxy,
            open_retry=self.open_retry,
            socket_owners=self.socket_owners,
            workers=workers,
        )

    def _refuse_tls_options(self) -> None:
        """A ``ws://`` URL runs no TLS: a CA, a pin or a client certificate would be ignored."""
        given = [
            flag
            for flag, value in (
                ("--ca", self.ca),
                ("--fingerprint", self.fingerprint),
                ("--tls-cert", self.tls_cert),
                ("--tls-key", self.tls_key),
            )
            if value is not None
        ]
        if given:
            raise ConfigError(
                f"{given[0]} needs a wss:// URL: {self.url} is ws://, which does not use TLS"
            )

    def _refuse_credentials_through(
        self, proxy: ProxyURL, token: str | None, headers: Sequence[tuple[str, str]]
    ) -> None:
        """Refuse a token (or ``Authorization`` header) that ws:// would show ``proxy``."""
        if token is not None:
            what = "the token"
        elif any(name.lower() == "authorization" for name, _ in headers):
            what = "the Authorization header"
        else:
            return
        source = "--proxy" if self.proxy is not None else "http_proxy"
        raise ConfigError(
            f"{what} would cross proxy {proxy.address} (from {source}) in clear with a"
            f" ws:// URL: use wss:// (the proxy then sees only the host and port), or"
            f" --proxy direct if the server can be reached without it"
        )

    def _tls(self) -> tuple[ssl.SSLContext | None, bytes | None]:
        if self.ca is None and self.fingerprint is None and self.tls_cert is None:
            return None, None
        if self.ca is not None and self.fingerprint is not None:
            raise ConfigError("--ca and --fingerprint exclude each other")
        try:
            pin = tls.normalize_fingerprint(self.fingerprint) if self.fingerprint else None
            context = tls.client_context(self.ca, pin, self.tls_cert, self.tls_key)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load TLS files: {exc}") from None
        return context, pin


def read_first_token(token_file: Path | None) -> str | None:
    """The token a client sends: the first of its file.

    Raises:
        ConfigError: the file is unreadable, malformed or empty.
    """
    if token_file is None:
        return None
    return access.load_token_entries(token_file)[0].secret.decode("utf-8")


def parse_header_lines(lines: Sequence[str]) -> list[tuple[str, str]]:
    """``Name: value`` lines as pairs.

    Raises:
        ConfigError: a line is not ``Name: value``.
    """
    headers = []
    for line in lines:
        name, sep, content = line.partition(":")
        if not sep or not name.strip():
            raise ConfigError(f"header must be 'Name: value', not {line!r}")
        headers.append((name.strip(), content.strip()))
    return headers


def choose_proxy(url: str, explicit: str | None) -> ProxyURL | None:
    """The proxy for ``url`` (see `migrelay.aio.proxy.proxy_for`). Raises ValueError."""
    parsed = WebSocketURL.parse(url)
    return proxy_for(parsed.secure, parsed.host, explicit)


async def run_source_relay(
    settings: ClientSettings, listen_path: Path, stop: asyncio.Event, *, once: bool = False
) -> int:
    """``migrelay connect``: relay until ``stop`` is set (or the first migration ended).

    Returns:
        0 when every channel ended cleanly, 1 otherwise, `EXIT_INTERRUPTED` when
        ``once`` was stopped before its migration ended.

    Raises:
        ConfigError: the settings cannot be used.
        RelayError, OSError: the socket cannot be made; nothing was started.
    """
    relay = SourceRelay(settings.load(), listen_path, once=once)
    # The default socket's directory: created private, refused if another user made it.
    local.prepare_default_dir(listen_path)
    await relay.start()
    try:
        if once:
            await wait_first(stop.wait(), relay.finished.wait())
        else:
            await stop.wait()
    finally:
        await relay.close()
    if once and not relay.finished.is_set():
        return EXIT_INTERRUPTED
    return 0 if relay.all_clean else 1


def parse_socket_map(values: Sequence[str]) -> dict[str, Path]:
    """``connect --map NAME=PATH`` values (`access.parse_name_paths`): one listener per
    path, so no path twice."""
    return access.parse_name_paths(values, "--map", distinct_paths=True)


def target_url(base: str, name: str) -> str:
    """``base`` (the server's URL, maybe with a prefix) with ``/name`` appended."""
    parts = urllib.parse.urlsplit(base)
    return urllib.parse.urlunsplit(parts._replace(path=f"{parts.path.rstrip('/')}/{name}"))


async def run_mapped_relays(
    settings: ClientSettings,
    sockets: Mapping[str, Path],
    stop: asyncio.Event,
    *,
    once: bool = False,
) -> int:
    """``migrelay connect URL --map NAME=PATH ...``: listen on each PATH and carry its
    connections to ``URL/NAME``, until ``stop`` (or, with ``once``, the migration's end).

    A libvirt migration uses its sockets at overlapping times (``--p2p``: libvirt's RPC
    connection lasts from before the first byte of RAM until after the domain started
    on the destination; ``--copy-storage-all``: the NBD copy lasts until the stream
    ends), so with ``once`` the migration has ended when a session ended on one of the
    sockets and none has a channel open or opening any more.

    Returns:
        0 when every channel ended cleanly, 1 otherwise, `EXIT_INTERRUPTED` when
        ``once`` was stopped before the migration ended.

    Raises:
        ConfigError: the settings cannot be used.
        RelayError, OSError: a socket cannot be made; nothing was started.
    """
    ended = asyncio.Event()
    relays = [
        SourceRelay(
            dataclasses.replace(settings, url=target_url(settings.url, name)).load(),
            path,
            once=once,
            storage=False,
            finished=ended,
        )
        for name, path in sockets.items()
    ]
    started: list[SourceRelay] = []
    try:
        for relay in relays:
            local.prepare_default_dir(relay.listen_path)
            await relay.start()
            started.append(relay)
        finished = False
        while not finished:
            await wait_first(stop.wait(), ended.wait())
            if stop.is_set() or not once:
                break
            # Set by the relay whose session ended: the others may still carry one.
            finished = not any(relay.busy for relay in relays)
            if not finished:
                ended.clear()
    finally:
        for relay in started:
            await relay.close()
    if once and not finished:
        return EXIT_INTERRUPTED
    return 0 if all(relay.all_clean for relay in relays) else 1


@asynccontextmanager
async def private_relay(config: ClientConfig) -> AsyncIterator[SourceRelay]:
    """``migrate --to``: the source relay on a private socket, for one migration.

    Yields the started relay (``relay.listen_path`` is where QEMU migrates to);
    stops it and removes its directory on exit, whatever happened.
    """
    # mkdtemp makes the directory 0700: no other user can reach the socket inside.
    directory = Path(tempfile.mkdtemp(prefix="migrelay-"))
    relay = SourceRelay(config, directory / "source.sock", once=True)
    try:
        await relay.start()
        yield relay
    finally:
        await relay.close()
        shutil.rmtree(directory, ignore_errors=True)
