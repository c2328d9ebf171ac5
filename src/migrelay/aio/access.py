"""Who may use ``migrelay serve``: tokens and their targets, origins, hosts, proxies, prefixes.

Pure functions over what a request carries; :mod:`migrelay.aio.server` calls them. The
only I/O here is reading a token file. Everything that comes from the network is parsed
strictly: what does not match the grammar is refused, never guessed at.

Token file, one token a line: ``serve --token-file`` and ``--metrics-token-file``, and
the ``--token-file`` of ``connect`` and ``migrate --to``, which send the first token of
theirs (`load_token_entries` reads them all)::

    # comments and blank lines are skipped
    9f0c2e...                                 # any target
    71ab33...  vm1,vm2                        # only /vm1 and /vm2
    c4d8e1...  /         name=default-only    # only the default target (the path /)
    5be0a7...  name=backup                    # any target, named "backup" in logs

Grammar (fields are separated by spaces or tabs)::

    line    = [ SECRET [ TARGETS ] [ "name=" NAME ] ] [ COMMENT ]
    COMMENT = "#" any characters to the end of the line      ; only where a field begins
    SECRET  = visible ASCII (! to ~) but "#", not starting with "name="
    TARGETS = TARGET *( "," TARGET )                          ; no spaces, no empty names
    TARGET  = "/" | NAME                                      ; "/" is the default target
    NAME    = [A-Za-z0-9][A-Za-z0-9_.-]{0,63}                 ; `TARGET_NAME_RE`

A ``#`` at the start of a field (the start of the line, or after a space or tab) begins
a comment; anywhere else it is an error (`HASH_INSIDE_A_FIELD`), so a line never means
something else for want of a space: ``SECRET#note`` is neither the secret ``SECRET#note``
nor the secret ``SECRET`` with a comment, and ``SECRET vm1,#note`` names no target
``#note``. Tokens are hex or base64url in practice and contain no ``#``. A secret is
what a client sends in ``Authorization: Bearer``, so it must be visible ASCII; anything
else could never be sent in that header and is refused.

Each token has a name for logs, metrics and quotas, never the secret itself:
``name=NAME``, or by default ``sha256:`` and the first 8 hex digits of the SHA-256 of
the secret (`derived_token_name`). Those 32 bits identify a token among a file's
few, and say nothing useful about a random secret of 128 bits or more (a short,
guessable secret could be confirmed against them, as against anything derived from it).

A privileged target (``serve --privileged-target NAME``, or a ``--target-map`` to
libvirt's read-write socket: `privileged_targets`) is opened only with a token that
lists it: an any-target token (the first line above) is refused there with 403.

The same secret twice, or the same name twice, is an error. Errors name the file and
the line number, never the line's content: it holds a secret. The file is read again on
SIGHUP.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from migrelay.errors import ConfigError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: A target name: the path ``/NAME`` reaches ``NAME.sock``; also the syntax of token
#: names. Use with ``fullmatch``.
TARGET_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

#: The grammar of a token file line, for error messages (no content of the line).
TOKEN_LINE_SYNTAX: Final = "expected 'SECRET [TARGET,...] [name=NAME]'"
#: The error for a ``#`` that does not begin a field (see the module docstring).
HASH_INSIDE_A_FIELD: Final = (
    "'#' inside a field: a comment begins with '#' at the start of the line or after a space"
    " or tab"
)

_FIELD_SEPARATOR: Final = re.compile(r"[ \t]+")
_SECRET_RE: Final = re.compile(r"[!-~]+")
_NAME_PREFIX: Final = "name="


# -- tokens --------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenEntry:
    """One line of a token file: the secret, the targets it may reach (None: all), its name.

    ``name`` is what logs, metrics and quotas show; the secret never appears in ``repr``.
    """

    secret: bytes
    targets: frozenset[str] | None = None
    #: Empty: `derived_token_name` of the secret (set on construction).
    name: str = ""
    #: SHA-256 of the secret, compared by `match_token` (fixed length: no length leak).
    digest: bytes = field(default=b"", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", derived_token_name(self.secret))
        object.__setattr__(self, "digest", hashlib.sha256(self.secret).digest())

    def __repr__(self) -> str:
        # Never show the secret, not even in a traceback.
        return (
            f"TokenEntry(name={self.name!r}, secret=<{len(self.secret)} bytes>, "
            f"targets={self.targets!r})"
        )


#: The file names of libvirt's read-write and admin sockets (the monolithic daemon's and
#: the modular ones': ``libvirt-sock``, ``libvirt-admin-sock``, ``virtqemud-sock``,
#: ``virtproxyd-admin-sock``...), not the read-only ``*-sock-ro``. A client of one can
#: define and start domains as the daemon's user (root): a mapped target at such a path
#: is privileged without ``--privileged-target`` (`parse_target_map`).
LIBVIRT_RW_SOCKET_RE: Final = re.compile(r"(libvirt|virt[a-z]+d)(-admin)?-sock")


def parse_name_paths(
    values: Iterable[str], option: str, *, absolute: bool = False, distinct_paths: bool = False
) -> dict[str, Path]:
    """``NAME=PATH`` option values (``serve --target-map``, ``connect --map``) as target
    name -> socket path.

    Args:
        option: the option's name, for the errors.
        absolute: refuse a relative PATH.
        distinct_paths: refuse a PATH given twice (under two names).

    Raises:
        ConfigError: not ``NAME=PATH``, an invalid or repeated name, a relative or
            repeated path (as asked).
    """
    mapped: dict[str, Path] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not path:
            raise ConfigError(f"{option} wants NAME=PATH, not {value!r}")
        if not TARGET_NAME_RE.fullmatch(name):
            raise ConfigError(
                f"{option}: invalid target name {name!r} (1 to 64 of A-Z a-z 0-9 _ . -)"
            )
        socket_path = Path(path)
        if name in mapped:
            raise ConfigError(f"{option}: target {name!r} mapped twice")
        if distinct_paths and socket_path in mapped.values():
            raise ConfigError(f"{option}: {path!r} mapped twice")
        if absolute and not socket_path.is_absolute():
            raise ConfigError(f"{option}: {path!r} is not an absolute path")
        mapped[name] = socket_path
    return mapped


def parse_target_map(values: Iterable[str]) -> dict[str, Path]:
    """``serve --target-map NAME=PATH`` values (`parse_name_paths`; absolute paths)."""
    return parse_name_paths(values, "--target-map", absolute=True)


def privileged_targets(explicit: Iterable[str], mapped: Mapping[str, Path]) -> frozenset[str]:
    """The privileged targets: the ``--privileged-target`` names, and every mapped target
    whose socket is libvirt's read-write or admin socket by its file name
    (`LIBVIRT_RW_SOCKET_RE`).

    Raises:
        ConfigError: an explicit name is not a valid target name.
    """
    names = set()
    for name in explicit:
        if not TARGET_NAME_RE.fullmatch(name):
            raise ConfigError(f"--privileged-target: invalid target name {name!r}")
        names.add(name)
    names.update(
        name for name, path in mapped.items() if LIBVIRT_RW_SOCKET_RE.fullmatch(path.name)
    )
    return frozenset(names)


def derived_token_name(secret: bytes) -> str:
    """The default name of a token: ``sha256:`` + 8 hex digits of the secret's SHA-256."""
    return "sha256:" + hashlib.sha256(secret).hexdigest()[:8]


def valid_target(name: str) -> bool:
    """Whether ``name`` may stand in a token's target list: ``/`` or `TARGET_NAME_RE`."""
    return name == "/" or TARGET_NAME_RE.fullmatch(name) is not None


def _line_fields(line: str) -> list[str]:
    """The fields of a line before its comment (a ``#`` at the start of a field)."""
    fields = []
    for item in _FIELD_SEPARATOR.split(line.strip(" \t\r\n")):
        if item.startswith("#"):
            break
        if item:
            fields.append(item)
    return fields


def _parse_token_line(fields: list[str], where: str) -> TokenEntry:
    if any("#" in item for item in fields):
        # Checked first, so that "vm1,#x" or "name=a#b" gets this error, not the
        # name syntax's.
        raise ConfigError(f"{where}: {HASH_INSIDE_A_FIELD}")
    secret, rest = fields[0], fields[1:]
    if not _SECRET_RE.fullmatch(secret):
        raise ConfigError(f"{where}: a token is visible ASCII characters only")
    if secret.startswith(_NAME_PREFIX):
        raise ConfigError(f"{where}: the token is missing (the line starts with name=)")
    name = ""
    if rest and rest[-1].startswith(_NAME_PREFIX):
        name = rest.pop()[len(_NAME_PREFIX) :]
        if not TARGET_NAME_RE.fullmatch(name):
            raise ConfigError(
                f"{where}: invalid token name (1 to 64 of A-Z a-z 0-9 _ . -, "
                "starting with a letter or digit)"
            )
    if len(rest) > 1 or any(item.startswith(_NAME_PREFIX) for item in rest):
        raise ConfigError(f"{where}: {TOKEN_LINE_SYNTAX}")
    targets: frozenset[str] | None = None
    if rest:
        names = rest[0].split(",")
        if not all(names):
            raise ConfigError(f"{where}: empty target name")
        if not all(valid_target(target) for target in names):
            raise ConfigError(
                f"{where}: invalid target name (a target is / or 1 to 64 of "
                "A-Z a-z 0-9 _ . -, starting with a letter or digit, without a leading /)"
            )
        targets = frozenset(names)
    return TokenEntry(secret.encode("ascii"), targets, name)


def parse_token_lines(lines: Iterable[str], source: str = "token file") -> list[TokenEntry]:
    """Parse token-file lines (see the module docstring for the grammar).

    Raises:
        ConfigError: a line breaks the grammar (a field too many, an invalid secret,
            target or name, a ``#`` inside a field), or repeats an earlier line's secret
            or name. The message gives the line number, never the line.
    """
    entries: list[TokenEntry] = []
    secrets: dict[bytes, int] = {}
    names: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        fields = _line_fields(line)
        if not fields:
            continue
        where = f"{source} line {number}"
        entry = _parse_token_line(fields, where)
        if entry.secret in secrets:
            raise ConfigError(f"{where}: the same token as line {secrets[entry.secret]}")
        if entry.name in names:
            raise ConfigError(f"{where}: the same token name as line {names[entry.name]}")
        secrets[entry.secret] = names[entry.name] = number
        entries.append(entry)
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
    except UnicodeDecodeError:
        raise ConfigError(f"{token_file} is not UTF-8 text") from None
    if not entries:
        raise ConfigError(f"{token_file} holds no token")
    return entries


def match_token(given: bytes, entries: Sequence[TokenEntry]) -> TokenEntry | None:
    """The entry whose secret is ``given``, found in constant time over all entries.

    Compares the SHA-256 of ``given`` with that of every entry, without stopping at a
    match: the time taken says nothing about which entry (if any) matched, nor, since
    digests have one length, about the length of any secret.

    Returns:
        The matching entry, or None.
    """
    digest = hashlib.sha256(given).digest()
    matched: TokenEntry | None = None
    for entry in entries:
        if hmac.compare_digest(digest, entry.digest):
            matched = entry
    return matched


# -- origins -------------------------------------------------------------------------------


_SCHEME_RE: Final = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*")
_DEFAULT_PORTS: Final = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def parse_origin(origin: str) -> str:
    """Check an ``Origin`` value and return its RFC 6454 serialization.

    ``scheme://host[:port]`` (host as in `parse_host`; the scheme's default port
    dropped, everything lower case) or ``null``. Surrounding spaces and tabs are ignored;
    a path, query, fragment or userinfo is not an origin.

    Raises:
        ValueError: ``origin`` is not an origin.
    """
    value = origin.strip(" \t")
    if value == "null":
        return value
    scheme, sep, authority = value.partition("://")
    if not sep or not _SCHEME_RE.fullmatch(scheme):
        raise ValueError("not an origin")
    scheme = scheme.lower()
    host, port = parse_host(authority)
    shown = host if ":" not in host else f"[{host}]"
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{shown}"
    return f"{scheme}://{shown}:{port}"


def parse_allowed_origins(values: Iterable[str]) -> frozenset[str]:
    """Parse ``--allow-origin`` values (a trailing ``/`` is tolerated): `parse_origin` forms.

    Raises:
        ValueError: a value is not an origin (the message quotes it: it is configuration).
    """
    origins = set()
    for value in values:
        stripped = value.strip()
        try:
            origins.add(parse_origin(stripped[:-1] if stripped.endswith("/") else stripped))
        except ValueError:
            raise ValueError(f"not an origin (scheme://host[:port]): {value!r}") from None
    return frozenset(origins)


def browser_origin_allowed(
    origin: str | None, allowed: frozenset[str], tokens_required: bool
) -> bool:
    """Whether a request's ``Origin`` passes the policy.

    No ``Origin``: not a browser, allowed (judged by its token or other checks). A
    malformed ``Origin``: refused. Otherwise the origin must be in ``allowed``, compared
    in `parse_origin` form (entries are normalized here too; invalid entries match
    nothing), except that with ``tokens_required`` an empty ``allowed`` accepts any
    origin: a browser cannot send an ``Authorization`` header on a WebSocket, so a page
    cannot use a token it does not hold. Without tokens, any web page the operator's
    browser visits could reach the relay, so an origin must be listed explicitly.
    """
    if origin is None:
        return True
    try:
        parsed = parse_origin(origin)
    except ValueError:
        return False
    if not allowed:
        return tokens_required
    for entry in allowed:
        try:
            if parse_origin(entry.rstrip("/")) == parsed:
                return True
        except ValueError:
            continue
    return False


# -- Host ----------------------------------------------------------------------------------

_PORT_RE: Final = re.compile(r"[1-9][0-9]{0,4}")
_LABEL_RE: Final = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)")
_NUMERIC_LABEL_RE: Final = re.compile(r"[0-9]+|0x[0-9a-f]*")
_IPV4_RE: Final = re.compile(r"[0-9]{1,3}(?:\.[0-9]{1,3}){3}")
_IPV6_RE: Final = re.compile(r"[0-9A-Fa-f:.]{2,45}")
_LOOPBACK_NAME: Final = "localhost"


def _parse_port(text: str) -> int:
    if not _PORT_RE.fullmatch(text) or int(text) > 65535:
        raise ValueError("invalid port")
    return int(text)


def _unmapped(ip: IPAddress) -> IPAddress:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _parse_name(text: str) -> str:
    """A DNS name (or an IPv4 literal) in lower case; non-ASCII names IDNA-encoded."""
    if not text.isascii():
        try:
            text = text.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError("invalid host name") from None
    name = text.lower()
    labels = name.split(".")
    if _NUMERIC_LABEL_RE.fullmatch(labels[-1]):
        # Browsers read a name whose last label is numeric as an IPv4 address (127.1,
        # 0x7f.0.0.1, 2130706433). Accept only the dotted-quad form they would send.
        if not _IPV4_RE.fullmatch(name):
            raise ValueError("invalid IPv4 address")
        return str(ipaddress.IPv4Address(name))
    if len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in labels):
        raise ValueError("invalid host name")
    return name


def parse_host(value: str) -> tuple[str, int | None]:
    """Parse a ``Host`` header (or an origin's authority): ``(host, port)``.

    Forms: ``name``, ``name:port``, ``a.b.c.d[:port]``, ``[v6]``, ``[v6]:port``. The
    host comes back in lower case, names IDNA-encoded, addresses in `ipaddress` form
    (an IPv6 address without its brackets). A port is 1 to 65535 in ASCII digits
    without leading zeros. Not accepted: empty ports (``name:``), IPv6 zone ids,
    userinfo, a trailing dot, numeric forms of IPv4 other than the dotted quad.

    Raises:
        ValueError: ``value`` is none of these forms.
    """
    if value.startswith("["):
        inside, sep, rest = value[1:].partition("]")
        if not sep or not _IPV6_RE.fullmatch(inside):
            raise ValueError("invalid IPv6 address")
        host = str(ipaddress.IPv6Address(inside))
        if not rest:
            return host, None
        if not rest.startswith(":"):
            raise ValueError("invalid host")
        return host, _parse_port(rest[1:])
    name, sep, port = value.partition(":")
    if not name:
        raise ValueError("empty host")
    return _parse_name(name), (_parse_port(port) if sep else None)


def _address(host: str) -> IPAddress | None:
    try:
        return _unmapped(ipaddress.ip_address(host))
    except ValueError:
        return None


def _is_loopback_host(host: str) -> bool:
    if host == _LOOPBACK_NAME:
        return True
    ip = _address(host)
    return ip is not None and ip.is_loopback


def host_allowed(
    host_header: str | None,
    listen_host: str,
    listen_port: int,
    allowed_hosts: frozenset[str],
) -> bool:
    """Whether a request's ``Host`` names this server (against DNS rebinding).

    A browser page on ``evil.example`` whose name an attacker re-points at this server's
    address sends ``Host: evil.example:8765``; without tokens nothing else would stop
    it. Accepted, after a strict `parse_host` (missing or malformed: refused):

    * a host in ``allowed_hosts``: an entry ``name`` accepts any port (or none), an entry
      ``name:port`` only that port (entries are parsed like ``Host``; invalid entries
      match nothing: check them at start with `parse_allowed_hosts`);
    * the listener's own address (``listen_host``, brackets optional), with the port
      absent or equal to ``listen_port``;
    * when the listener is a loopback address or ``localhost``: any loopback literal
      (127.0.0.0/8, ``::1``, IPv4-mapped forms) or ``localhost``, same port rule;
    * when the listener is a wildcard (``0.0.0.0``, ``::``, empty): its own addresses
      cannot be known from here, so only ``allowed_hosts`` and the loopback forms above.
      (Passing the connection's local address, the socket's ``sockname``, as
      ``listen_host`` instead lets a client use the address literal it connected to.)

    A listener given by name (``dst1.example``) accepts that name, same port rule.
    """
    if host_header is None:
        return False
    try:
        host, port = parse_host(host_header.strip(" \t"))
    except ValueError:
        return False
    for entry in allowed_hosts:
        try:
            allowed_host, allowed_port = parse_host(entry.strip())
        except ValueError:
            continue
        if allowed_host == host and allowed_port in (None, port):
            return True
    if port is not None and port != listen_port:
        return False
    listener = listen_host.strip().strip("[]").lower()
    listen_ip = _address(listener)
    wildcard = not listener or (listen_ip is not None and listen_ip.is_unspecified)
    if (wildcard or _is_loopback_host(listener)) and _is_loopback_host(host):
        return True
    if wildcard:
        return False
    if listen_ip is None:
        return host == listener
    return _address(host) == listen_ip


def parse_allowed_hosts(values: Iterable[str]) -> frozenset[str]:
    """Check ``name`` / ``name:port`` allow-list entries; their normalized forms.

    Raises:
        ValueError: a value is not a valid ``Host`` (the message quotes it).
    """
    hosts = set()
    for value in values:
        try:
            host, port = parse_host(value.strip())
        except ValueError:
            raise ValueError(f"not a host or host:port: {value!r}") from None
        shown = host if ":" not in host else f"[{host}]"
        hosts.add(shown if port is None else f"{shown}:{port}")
    return frozenset(hosts)


# -- proxies -------------------------------------------------------------------------------

#: The most hops an ``X-Forwarded-For`` may list; a longer one is refused.
MAX_FORWARDED_HOPS: Final = 32


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


def _in_networks(ip: IPAddress, trusted: Sequence[IPNetwork]) -> bool:
    return any(ip in network for network in trusted)


def _trusted(address: str, trusted: Sequence[IPNetwork]) -> bool:
    """Whether the socket peer ``address`` (our own kernel's word) is a trusted proxy."""
    try:
        ip = _unmapped(ipaddress.ip_address(address.strip().strip("[]")))
    except ValueError:
        return False
    return _in_networks(ip, trusted)


def parse_forwarded_hop(hop: str) -> IPAddress:
    """One hop of ``X-Forwarded-For``: an IPv4 or IPv6 address, IPv6 optionally in brackets.

    Spaces and tabs around the hop are ignored. Nothing else is: no port, no name, no
    ``unknown``, no zone id, no non-ASCII digits. An IPv4-mapped IPv6 address comes
    back as its IPv4 address (one client, one form, for logs and quotas).

    Raises:
        ValueError: the hop is not an address (the message does not quote it).
    """
    text = hop.strip(" \t")
    if text.startswith("[") and text.endswith("]"):
        inside = text[1:-1]
        if _IPV6_RE.fullmatch(inside):
            try:
                return _unmapped(ipaddress.IPv6Address(inside))
            except ValueError:
                pass
    elif _IPV4_RE.fullmatch(text):
        try:
            return ipaddress.IPv4Address(text)
        except ValueError:
            pass
    elif _IPV6_RE.fullmatch(text) and ":" in text:
        try:
            return _unmapped(ipaddress.IPv6Address(text))
        except ValueError:
            pass
    raise ValueError("not an IP address")


def forwarded_client(
    peer_ip: str | None, forwarded_for: str | None, trusted: Sequence[IPNetwork]
) -> str | None:
    """The client address that ``X-Forwarded-For`` names, if it may be believed.

    Only a peer in ``trusted`` may speak for a client; from any other peer the header
    is ignored, not even parsed. Walking the list from the right (each proxy appends
    the address it received from), the first address that is not itself a trusted proxy
    is the client; what lies left of it could be forged and is not looked at. Each hop
    walked must be an address (`parse_forwarded_hop`).

    When every hop is trusted, the answer is the rightmost hop, the address that our
    directly connected proxy saw and vouches for, not the leftmost: a client inside a
    trusted network can put any trusted-looking address at the left of the header
    itself, and nothing but the proxies' own additions on the right can be believed.

    Returns:
        That address in `ipaddress` form (IPv4-mapped IPv6 as IPv4), or None when the
        header is absent or empty or the peer is not trusted.

    Raises:
        ValueError: the peer is trusted and the header lists
            more than `MAX_FORWARDED_HOPS` hops or a walked hop is not an address.
    """
    if peer_ip is None or not forwarded_for or not _trusted(peer_ip, trusted):
        return None
    if forwarded_for.count(",") >= MAX_FORWARDED_HOPS:
        raise ValueError(f"more than {MAX_FORWARDED_HOPS} hops")
    hops = forwarded_for.split(",")
    rightmost: IPAddress | None = None
    for place, hop in enumerate(reversed(hops), start=1):
        try:
            ip = parse_forwarded_hop(hop)
        except ValueError:
            # Which hop, not what it says: the text is the client's.
            raise ValueError(
                f"hop {place} from the right of {len(hops)} is not an IP address"
            ) from None
        if rightmost is None:
            rightmost = ip
        if not _in_networks(ip, trusted):
            return str(ip)
    return str(rightmost)


# -- path prefixes -------------------------------------------------------------------------


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
