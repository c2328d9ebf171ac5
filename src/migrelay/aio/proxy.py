"""HTTP CONNECT proxies for the source relay (``connect --proxy``, ``https_proxy``).

The source relay opens a TCP connection to the proxy, asks it to ``CONNECT`` to the
server, and once the proxy answers 2xx runs TLS (for ``wss://``) and the WebSocket
handshake through that tunnel as if it were a direct connection. With ``wss://`` the
proxy sees only the host and port (and the TLS server name). With ``ws://`` the tunnel
carries plain text that the proxy relays and can read: the upgrade request with its
``Authorization`` header, then the migration (client frames are masked with a key sent
beside them, which hides nothing). So `migrelay.aio.source.ClientSettings.load` refuses
a token with ``ws://`` through a proxy.

Which proxy, the way curl, pip and websockets choose it:

* ``--proxy URL`` when given (``--proxy ''`` or ``direct`` turns proxies off);
* otherwise ``https_proxy`` for ``wss://`` and ``http_proxy`` for ``ws://`` (either
  case), unless the server's host matches ``no_proxy`` (comma-separated host names,
  domain suffixes, ``*``).
"""

from __future__ import annotations

import asyncio
import base64
import socket
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from migrelay.errors import ConnectError

#: Largest CONNECT response head accepted (a proxy's answer is a few hundred bytes).
MAX_PROXY_HEAD_BYTES: Final = 16 * 1024
DEFAULT_PROXY_PORT: Final = 8080
#: ``--proxy`` values that mean "no proxy, not even from the environment".
DIRECT: Final = frozenset({"", "direct", "none"})


@dataclass(frozen=True)
class ProxyURL:
    """A parsed ``http://[USER:PASSWORD@]HOST[:PORT]`` proxy URL."""

    host: str
    port: int
    #: ``Proxy-Authorization`` value from the URL's credentials; never logged.
    authorization: str | None = field(default=None, repr=False)

    @classmethod
    def parse(cls, url: str) -> ProxyURL:
        """Parse a proxy URL; a bare ``HOST:PORT`` means ``http://HOST:PORT``.

        Raises:
            ValueError: not an http:// proxy URL (the message omits any credentials).
        """
        text = url.strip()
        if "://" not in text:
            text = "http://" + text
        parts = urllib.parse.urlsplit(text)
        where = parts.hostname or "?"
        if parts.scheme != "http":
            raise ValueError(f"only http:// proxies are supported, not {parts.scheme}://{where}")
        if not parts.hostname:
            raise ValueError("proxy URL has no host")
        try:
            port = parts.port or DEFAULT_PROXY_PORT
        except ValueError:
            raise ValueError(f"invalid port in proxy URL for {where}") from None
        authorization = None
        if parts.username is not None:
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            credentials = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
            authorization = f"Basic {credentials}"
        return cls(parts.hostname, port, authorization)

    @property
    def address(self) -> str:
        """``HOST:PORT`` for messages (no credentials)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def proxy_for(
    secure: bool, host: str, explicit: str | None, environ: Mapping[str, str] | None = None
) -> ProxyURL | None:
    """Choose the proxy for a ``ws(s)://HOST`` URL (see the module docstring).

    Args:
        secure: ``wss://`` (``https_proxy``) or ``ws://`` (``http_proxy``).
        host: the server's host name or address, matched against ``no_proxy``.
        explicit: the ``--proxy`` value, or None to consult the environment.
        environ: the environment (default: ``os.environ``).

    Raises:
        ValueError: the chosen proxy URL is invalid.
    """
    if explicit is not None:
        return None if explicit.strip().lower() in DIRECT else ProxyURL.parse(explicit)
    if environ is None:
        proxies = urllib.request.getproxies_environment()
    else:
        # The same rules as urllib's: lower-case names win over upper-case ones.
        proxies = {}
        for name, value in environ.items():
            if value and name.lower().endswith("_proxy"):
                key = name[:-6].lower()
                if name.islower() or key not in proxies:
                    proxies[key] = value
    url = proxies.get("https" if secure else "http")
    if not url or bypassed(host, proxies.get("no", "")):
        return None
    return ProxyURL.parse(url)


def bypassed(host: str, no_proxy: str) -> bool:
    """Whether ``no_proxy`` (``*``, or names and ``.domain`` suffixes) covers ``host``."""
    name = host.strip("[]").lower().rstrip(".")
    for entry in no_proxy.split(","):
        item = entry.strip().lower()
        if item == "*":
            return True
        if item.startswith("[") and "]" in item:
            item = item[1 : item.index("]")]  # [::1]:8765
        elif item.count(":") == 1:
            item = item.split(":", 1)[0]  # host:port: the port is not compared
        item = item.lstrip(".").rstrip(".")
        if item and (name == item or name.endswith("." + item)):
            return True
    return False


async def open_tunnel(proxy: ProxyURL, host: str, port: int) -> socket.socket:
    """Connect to ``proxy`` and have it open a tunnel to ``host:port``.

    Returns:
        A connected non-blocking socket, at the first byte of the tunnel.

    Raises:
        ConnectError: the proxy cannot be reached, refused, or answered garbage.
    """
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise ConnectError(f"cannot resolve proxy {proxy.address}", exc) from exc
    sock: socket.socket | None = None
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        candidate = socket.socket(family, kind, proto)
        candidate.setblocking(False)
        try:
            await loop.sock_connect(candidate, address)
        except OSError as exc:
            candidate.close()
            error = exc
            continue
        except BaseException:
            candidate.close()
            raise
        sock = candidate
        break
    if sock is None:
        raise ConnectError(f"cannot connect to proxy {proxy.address}", error)
    try:
        await _connect_request(loop, sock, proxy, host, port)
    except BaseException:
        sock.close()
        raise
    return sock


async def _connect_request(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, proxy: ProxyURL, host: str, port: int
) -> None:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.authorization:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
    # After the answer's blank line the tunnel's bytes belong to TLS or the WebSocket
    # handshake. Neither lets the server speak first, so nothing may follow the head.
    head = bytearray()
    while b"\r\n\r\n" not in head:
        chunk = await loop.sock_recv(sock, 4096)
        if not chunk:
            raise ConnectError(f"proxy {proxy.address} closed the connection during CONNECT")
        head += chunk
        if len(head) > MAX_PROXY_HEAD_BYTES:
            raise ConnectError(f"proxy {proxy.address} sent an oversized answer to CONNECT")
    status_line = head.split(b"\r\n", 1)[0].decode("latin-1", "replace")
    fields = status_line.split(" ", 2)
    if len(fields) < 2 or not fields[0].startswith("HTTP/") or not fields[1].isdigit():
        raise ConnectError(f"proxy {proxy.address} answered CONNECT with {status_line[:80]!r}")
    if not 200 <= int(fields[1]) < 300:
        raise ConnectError(
            f"proxy {proxy.address} refused CONNECT to {authority}: {status_line[:80]}"
        )
    if not head.endswith(b"\r\n\r\n"):
        raise ConnectError(f"proxy {proxy.address} sent data before the tunnel was used")
