"""Who may use ``migrelay serve``: tokens and their targets, origins, proxies, prefixes.

Pure functions over what a request carries; :mod:`migrelay.aio.server` calls them.

Token file (``--token-file``), one token a line::

    # comments and blank lines are skipped
    9f0c2e…                  any target
    71ab33…  vm1,vm2         only /vm1 and /vm2
    c4d8e1…  /               only the default target (the path /)

A token is the first whitespace-separated field; the optional second field restricts
it to a comma-separated list of target names. The file is read again on SIGHUP.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from migrelay.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class TokenEntry:
    """One line of a token file: the secret and the targets it may reach (None: all)."""

    secret: bytes
    targets: frozenset[str] | None = None

    def __repr__(self) -> str:
        # Never show the secret, not even in a traceback.
        return f"TokenEntry(secret=<{len(self.secret)} bytes>, targets={self.targets!r})"


def parse_token_lines(lines: Iterable[str], source: str = "token file") -> list[TokenEntry]:
    """Parse token-file lines (see the module docstring).

    Raises:
        ConfigError: a line has more than two fields or an empty target list; the
            message gives the line number, never the line.
    """
    entries = []
    for number, line in enumerate(lines, start=1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        fields = text.split()
        if len(fields) > 2:
            raise ConfigError(f"{source} line {number}: expected 'TOKEN [TARGET,...]'")
        targets: frozenset[str] | None = None
        if len(fields) == 2:
            names = [name.strip() for name in fields[1].split(",")]
            if not all(names):
                raise ConfigError(f"{source} line {number}: empty target name")
            targets = frozenset(names)
        entries.append(TokenEntry(fields[0].encode("utf-8"), targets))
    return entries


def load_token_file(path: Path) -> list[TokenEntry]:
    """Read a token file (see the module docstring). Raises OSError, ConfigError."""
    return parse_token_lines(path.read_text(encoding="utf-8").splitlines(), str(path))


def load_token_entries(token_file: Path | None) -> list[TokenEntry]:
    """Read ``--token-file``; an absent option means no tokens.

    Raises:
        ConfigError: the file is unreadable, malformed or holds no token.
    """
    if token_file is None:
        return []
    try:
        entries = load_token_file(token_file)
    except OSError as exc:
        raise ConfigError(f"cannot read {token_file}: {exc.strerror or exc}") from None
    if not entries:
        raise ConfigError(f"{token_file} holds no token")
    return entries


def load_tokens(token_file: Path | None) -> list[bytes]:
    """The secrets of a token file, target restrictions aside (``--metrics-token-file``).

    Raises:
        ConfigError: the file is unreadable, malformed or holds no token.
    """
    return [entry.secret for entry in load_token_entries(token_file)]


def token_targets(entries: Iterable[TokenEntry]) -> dict[bytes, frozenset[str]]:
    """The restricted tokens of ``entries``, mapped to the targets each may reach."""
    return {entry.secret: entry.targets for entry in entries if entry.targets is not None}


def normalize_origin(origin: str) -> str:
    """``https://Console.Example:443/`` → ``https://console.example:443`` (RFC 6454 form)."""
    return origin.strip().rstrip("/").lower()


def origin_allowed(origin: str | None, allowed: frozenset[str]) -> bool:
    """Whether a request's ``Origin`` passes the allow-list.

    Browsers always send ``Origin`` on a WebSocket handshake; other clients (the source
    relay, websockets, curl) do not. With an allow-list, a request *with* an Origin must
    match it; a request without one is not a browser and is judged by its token alone.
    An empty allow-list accepts any origin.
    """
    if not allowed or origin is None:
        return True
    return normalize_origin(origin) in allowed


def parse_networks(values: Sequence[str]) -> tuple[IPNetwork, ...]:
    """Parse ``--trusted-proxy`` values: addresses or CIDR networks.

    Raises:
        ValueError: a value is neither.
    """
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"not an ip address or network: {value}") from None
    return tuple(networks)


def _trusted(address: str, trusted: Sequence[IPNetwork]) -> bool:
    try:
        ip = ipaddress.ip_address(address.strip().strip("[]"))
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in trusted)


def forwarded_client(
    peer_ip: str | None, forwarded_for: str | None, trusted: Sequence[IPNetwork]
) -> str | None:
    """The client address that ``X-Forwarded-For`` names, if it may be believed.

    Only a peer in ``trusted`` may speak for a client. Walking the list from the right
    (each proxy appends the address it received from), the first address that is not
    itself a trusted proxy is the client; anything left of it could be forged.

    Returns:
        That address, or None when the header is absent or may not be trusted.
    """
    if peer_ip is None or not forwarded_for or not _trusted(peer_ip, trusted):
        return None
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, trusted):
            return hop[:64]  # an address, not an essay, goes into the log
    return hops[0][:64] if hops else None


def normalize_prefix(prefix: str) -> str:
    """``migrelay/`` → ``/migrelay``; ``""`` and ``/`` → ``""`` (no prefix).

    Raises:
        ValueError: the prefix has a query or fragment.
    """
    value = prefix.strip()
    if any(char in value for char in "?#"):
        raise ValueError(f"a path prefix is a path, not {prefix!r}")
    value = "/" + value.strip("/")
    return "" if value == "/" else value


def strip_prefix(path: str, prefix: str) -> str | None:
    """``/migrelay/vm`` → ``/vm`` under ``/migrelay``; None when ``path`` is outside it."""
    if not prefix:
        return path
    if path == prefix:
        return "/"
    if path.startswith(prefix + "/"):
        return path[len(prefix) :]
    return None
