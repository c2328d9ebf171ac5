"""Local unix sockets: where they live by default, and whom the relays trust there.

A unix socket path is only as trustworthy as the directory it is in. In ``/tmp`` any
local user can bind ``/tmp/qemu_migration_dest.sock`` before QEMU does and receive the
next migration's guest RAM, or put a symlink there. So:

* The default sockets live in a private runtime directory (:func:`runtime_dir`):
  ``/run/migrelay`` for root, ``$XDG_RUNTIME_DIR/migrelay`` for a user with a login
  session, ``/tmp/migrelay-UID`` otherwise; created mode 0700 and checked (ours, not a
  symlink, nobody else may write) before use. Paths given explicitly, ``/tmp`` ones
  included, still work.
* The relays connect to a socket only through a descriptor opened without following a
  symlink (:func:`connect_path`), and then check who listens there (``SO_PEERCRED``):
  the listener must run as one of the expected owners (:class:`SocketOwners`; by
  default the relay's own user and root).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import socket
import stat
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TypeVar

from migrelay.errors import ConfigError, PeerRefused

__all__ = [
    "PeerCredentials",
    "PeerRefused",
    "SocketOwners",
    "check_directory",
    "connect_path",
    "ensure_private_dir",
    "peer_credentials",
    "runtime_dir",
]

#: The default runtime directory of root (systemd's RuntimeDirectory=migrelay).
SYSTEM_RUNTIME_DIR: Final = Path("/run/migrelay")

_PEERCRED: Final = struct.Struct("3i")

ProtocolT = TypeVar("ProtocolT", bound=asyncio.BaseProtocol)


def runtime_dir() -> Path:
    """The directory of the default sockets (module docstring); not created here."""
    if os.geteuid() == 0:
        return SYSTEM_RUNTIME_DIR
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "migrelay"
    return Path(f"/tmp/migrelay-{os.geteuid()}")


def ensure_private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) if missing; check that it is safe to put sockets in.

    Raises:
        ConfigError: it is a symlink or not a directory, belongs to another user, or
            others may write to it.
    """
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=0o700)
    info = path.lstat()
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{path} is not a directory (a symlink?): refusing to use it")
    if info.st_uid != os.geteuid():
        raise ConfigError(
            f"{path} belongs to uid {info.st_uid}, not to this user: another user may "
            "have created it to catch migrations; remove it or pass an explicit path"
        )
    if info.st_mode & 0o022:
        raise ConfigError(f"{path} is writable by others (mode {info.st_mode & 0o7777:o})")
    return path


def prepare_default_dir(socket_path: Path) -> None:
    """Create the private runtime directory when ``socket_path`` lies in it.

    Raises:
        ConfigError: see :func:`ensure_private_dir`.
    """
    directory = runtime_dir()
    if socket_path.parent == directory:
        if directory != SYSTEM_RUNTIME_DIR and directory.parent != Path("/tmp"):
            directory.parent.mkdir(parents=True, exist_ok=True)
        ensure_private_dir(directory)


def check_directory(path: Path, what: str) -> None:
    """Refuse a socket directory in which one writer may replace another's sockets.

    A directory others may write to needs the sticky bit (like ``/tmp``): without it,
    any member of the group can rename or delete another VM's socket and bind its own.

    Raises:
        ConfigError: ``path`` is missing, not a directory, or shared-writable without
            the sticky bit.
    """
    try:
        info = path.stat()
    except OSError as exc:
        raise ConfigError(f"{what} {path}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{what} {path} is not a directory")
    if info.st_mode & 0o022 and not info.st_mode & stat.S_ISVTX:
        raise ConfigError(
            f"{what} {path} is writable by group or others without the sticky bit "
            f"(mode {info.st_mode & 0o7777:o}): any writer could replace another VM's "
            f"socket; chmod +t {path}"
        )


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """Who is at the other end of a unix connection (``SO_PEERCRED``)."""

    pid: int
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The credentials of the process that listened (or connected) at the other end."""
    pid, uid, gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return PeerCredentials(pid, uid, gid)


def _user_name(uid: int) -> str:
    try:
        return f"{pwd.getpwuid(uid).pw_name} (uid {uid})"
    except KeyError:
        return f"uid {uid}"


@dataclass(frozen=True)
class SocketOwners:
    """The users a relay accepts at the other end of its unix sockets.

    ``--socket-owner`` names them (user names or numeric uids); by default the relay's
    own user and root.
    """

    uids: frozenset[int]

    @classmethod
    def default(cls) -> SocketOwners:
        return cls(frozenset({os.geteuid(), 0}))

    @classmethod
    def parse(cls, names: Iterable[str]) -> SocketOwners:
        """``["qemu", "0", "libvirt-qemu"]`` → their uids.

        Raises:
            ConfigError: a name is neither a user nor a number.
        """
        uids = set()
        for name in names:
            text = name.strip()
            if text.isascii() and text.isdigit():
                uids.add(int(text))
                continue
            try:
                uids.add(pwd.getpwnam(text).pw_uid)
            except KeyError:
                raise ConfigError(f"socket owner {text!r}: no such user") from None
        if not uids:
            raise ConfigError("no socket owner given")
        return cls(frozenset(uids))

    def describe(self) -> str:
        return ", ".join(_user_name(uid) for uid in sorted(self.uids))

    def check(self, credentials: PeerCredentials, path: Path | str) -> None:
        """Raises PeerRefused unless the peer runs as one of the owners."""
        if credentials.uid not in self.uids:
            raise PeerRefused(
                f"{path} is served by {_user_name(credentials.uid)} (pid {credentials.pid}), "
                f"not by an expected socket owner ({self.describe()})"
            )


def open_socket_path(path: Path) -> int:
    """Open ``path`` with O_PATH, not following a symlink; check that it is a socket.

    Returns:
        The descriptor (the caller closes it): connecting to ``/proc/self/fd/N`` then
        reaches exactly the socket that was checked, whatever is renamed meanwhile.

    Raises:
        FileNotFoundError: nothing is there (yet).
        PeerRefused: a symlink or anything else that is not a socket is there.
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
    except BaseException:
        os.close(fd)
        raise
    if not stat.S_ISSOCK(mode):
        os.close(fd)
        kind = "a symlink" if stat.S_ISLNK(mode) else "not a socket"
        raise PeerRefused(f"{path} is {kind}: refusing to connect")
    return fd


async def connect_path(
    factory: Callable[[], ProtocolT], path: Path, owners: SocketOwners
) -> tuple[asyncio.Transport, ProtocolT]:
    """Connect the unix socket at ``path`` (no symlinks) and check who listens there.

    Raises:
        FileNotFoundError, ConnectionRefusedError, OSError: as a connect does.
        PeerRefused: a symlink, not a socket, or a listener of the wrong owner (the
            connection is closed before a byte is sent).
    """
    fd = open_socket_path(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, f"/proc/self/fd/{fd}")
        owners.check(peer_credentials(sock), path)
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(fd)
    transport, protocol = await loop.create_unix_connection(factory, sock=sock)
    return transport, protocol


def check_listener_owner(path: Path, owners: SocketOwners) -> None:
    """Before QEMU is told to connect to ``path``: check who bound it (its file owner).

    Raises:
        FileNotFoundError: nothing is there.
        PeerRefused: a symlink, not a socket, or bound by another user.
    """
    fd = open_socket_path(path)
    try:
        uid = os.fstat(fd).st_uid
    finally:
        os.close(fd)
    if uid not in owners.uids:
        raise PeerRefused(
            f"{path} was bound by {_user_name(uid)}, not by an expected socket owner "
            f"({owners.describe()}): another user may be waiting for the migration there"
        )
