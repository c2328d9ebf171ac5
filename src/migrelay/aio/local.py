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
  symlink (:func:`connect_socket`), and then check who listens there (``SO_PEERCRED``):
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
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from migrelay.errors import ConfigError, PeerRefused

__all__ = [
    "PeerCredentials",
    "PeerRefused",
    "SocketOwners",
    "check_directory",
    "check_listener_owner",
    "check_relay_socket",
    "connect_socket",
    "describe_user",
    "ensure_private_dir",
    "peer_credentials",
    "runtime_dir",
]

#: The default runtime directory of root (systemd's RuntimeDirectory=migrelay).
SYSTEM_RUNTIME_DIR: Final = Path("/run/migrelay")

_PEERCRED: Final = struct.Struct("3i")


def runtime_dir() -> Path:
    """The directory of the default sockets (module docstring); not created here."""
    if os.geteuid() == 0:
        return SYSTEM_RUNTIME_DIR
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and Path(xdg).is_absolute():
        return Path(xdg) / "migrelay"
    return Path(f"/tmp/migrelay-{os.geteuid()}")


#: Appended to a migration socket's path to name the storage (NBD) socket beside it.
STORAGE_SOCKET_SUFFIX = ".nbd"


def storage_socket(migration_socket: Path) -> Path:
    """The storage (NBD) socket that goes with a migration socket: its path + ``.nbd``.

    One rule on both hosts: ``connect`` listens for source QEMU's NBD connections
    there, destination QEMU's NBD server listens there, and ``serve`` connects a
    session's storage channels to it (``/tmp/x/vm.sock`` -> ``/tmp/x/vm.sock.nbd``).
    A target name never ends in ``.sock.nbd``, so no target's socket is another's.
    """
    return migration_socket.with_name(migration_socket.name + STORAGE_SOCKET_SUFFIX)


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


#: Mode bits that let users other than the owner create and remove entries.
_WRITABLE_BY_OTHERS: Final = 0o022


def _replaceable_by_others(directory_mode: int) -> bool:
    """Whether users other than its owner may replace entries of such a directory:
    they may write to it, and no sticky bit (like ``/tmp``'s) stops them."""
    return bool(directory_mode & _WRITABLE_BY_OTHERS) and not directory_mode & stat.S_ISVTX


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
    if _replaceable_by_others(info.st_mode):
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

    def describe(self) -> str:
        """``nobody (uid 65534, pid 1234)``, for log lines and errors."""
        name = _login(self.uid)
        if name is None:
            return f"uid {self.uid} (pid {self.pid})"
        return f"{name} (uid {self.uid}, pid {self.pid})"


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The credentials of the process that listened (or connected) at the other end."""
    pid, uid, gid = _PEERCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    )
    return PeerCredentials(pid, uid, gid)


def _login(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def describe_user(uid: int) -> str:
    """``nobody (uid 65534)``, or ``uid 65534`` for a uid without a name."""
    name = _login(uid)
    return f"uid {uid}" if name is None else f"{name} (uid {uid})"


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
        return ", ".join(describe_user(uid) for uid in sorted(self.uids))

    def check(self, credentials: PeerCredentials, path: Path | str) -> None:
        """Raises PeerRefused unless the peer runs as one of the owners."""
        if credentials.uid not in self.uids:
            raise PeerRefused(
                f"{path} is served by {credentials.describe()}, "
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


async def connect_socket(path: Path, owners: SocketOwners) -> socket.socket:
    """Connect the unix socket at ``path`` (no symlinks) and check who listens there.

    Returns:
        The connected socket (non-blocking), not yet wrapped in a transport: `serve`
        connects on its main loop and relays on a worker loop (`migrelay.aio.workers`).

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
    return sock


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
            f"{path} was bound by {describe_user(uid)}, not by an expected socket owner "
            f"({owners.describe()}): another user may be waiting for the migration there"
        )


def check_relay_socket(path: Path, owners: SocketOwners) -> None:
    """Before QEMU is told to migrate to ``path``: may the relay listening there get it?

    The socket must be bound by one of ``owners`` (the check follows no symlink), in a
    directory that belongs to them, this user or root, and in which nobody else may
    replace it (not writable by others, or sticky like ``/tmp``). A socket that is
    missing is left to QEMU to report, unless others may write to its directory: one
    of them could bind it between this check and QEMU's connect.

    Raises:
        PeerRefused: any of that does not hold.
    """
    directory = path.parent
    try:
        info = directory.stat()
    except OSError:
        return  # QEMU says what is missing, as without this check
    shared = bool(info.st_mode & _WRITABLE_BY_OTHERS)
    try:
        check_listener_owner(path, owners)
    except FileNotFoundError:
        if shared:
            raise PeerRefused(
                f"nothing listens on {path}, and other users may bind it there before"
                f" qemu connects ({directory} is mode {stat.S_IMODE(info.st_mode):o}):"
                " start migrelay connect first, or use a private directory"
            ) from None
        return
    except OSError as exc:
        raise PeerRefused(f"cannot check who bound {path}: {exc.strerror or exc}") from None
    trusted = owners.uids | {0, os.geteuid()}
    if info.st_uid not in trusted:
        raise PeerRefused(
            f"{directory} belongs to uid {info.st_uid}, who could replace {path.name} in"
            f" it before qemu connects: use a directory of {owners.describe()}"
        )
    if _replaceable_by_others(info.st_mode):
        raise PeerRefused(
            f"{directory} is writable by others without the sticky bit (mode"
            f" {stat.S_IMODE(info.st_mode):o}): anyone could replace {path.name} before"
            f" qemu connects; chmod +t {directory} or use a private directory"
        )
