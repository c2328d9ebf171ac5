"""The unix socket of ``migrelay connect --listen-unix PATH``, where source QEMU migrates to.

* The socket file is mode 0600 whatever the umask, and is removed when ``connect`` stops.
* A stale socket file (bound once, nobody listening) is replaced.
* A socket where something listens is refused in one line, and that listener keeps its
  socket file and its connections.
* Anything else at the path (a regular file, a symlink) is refused in one line and left
  as it was.

``connect`` runs as a real subprocess; the other listeners are the test's own sockets.
"""

from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from tests import helpers
from tests.processes import MigrelayProcesses

from migrelay.aio.client import prepare_unix_listener

FACTOR = helpers.FACTOR
#: Seconds a socket operation or a refusing command gets.
PROMPT_S = 5.0 * FACTOR
EXIT_S = 15.0 * FACTOR
#: ``connect`` opens its WebSocket only when QEMU connects: no server is needed.
URL = "ws://127.0.0.1:9/vm"
#: Runs the command under umask 000, where a socket file would be created 0777.
OPEN_UMASK = ("sh", "-c", 'umask 000 && exec "$@"', "sh")


def run_connect(path: Path) -> subprocess.CompletedProcess[str]:
    """``migrelay connect URL --listen-unix PATH``, expected to exit on its own."""
    return subprocess.run(
        [sys.executable, "-m", "migrelay", "connect", URL, "--listen-unix", str(path)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=EXIT_S,
        check=False,
    )


def assert_refused_in_one_line(result: subprocess.CompletedProcess[str], line: str) -> None:
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert result.stderr.splitlines() == [line]


def stale_socket(path: Path) -> None:
    """Leave a socket file at ``path`` that nothing listens on (as after a crash)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))


def test_socket_file_is_mode_0600_under_any_umask_and_removed_on_stop(
    migrelay_procs: MigrelayProcesses, sock_dir: Path
) -> None:
    path = sock_dir / "src.sock"
    connect = migrelay_procs.connect(URL, path, prefix=OPEN_UMASK)
    info = path.lstat()
    assert stat.S_ISSOCK(info.st_mode)
    assert stat.S_IMODE(info.st_mode) == 0o600, oct(info.st_mode)
    assert info.st_uid == os.getuid()
    assert connect.stop() == 0
    assert not path.exists()


def test_stale_socket_file_is_replaced_by_a_listening_one(
    migrelay_procs: MigrelayProcesses, sock_dir: Path
) -> None:
    path = sock_dir / "src.sock"
    stale_socket(path)
    os.chmod(path, 0o666)
    # A second name keeps the stale inode alive, so a new socket cannot reuse its number.
    os.link(path, sock_dir / "stale-link")
    stale = path.lstat()
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe,
        pytest.raises(ConnectionRefusedError),
    ):
        probe.connect(str(path))  # stale indeed: nobody listens

    connect = migrelay_procs.connect(URL, path)
    fresh = path.lstat()
    assert stat.S_ISSOCK(fresh.st_mode)
    assert fresh.st_ino != stale.st_ino
    assert stat.S_IMODE(fresh.st_mode) == 0o600
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as qemu:
        qemu.settimeout(PROMPT_S)
        qemu.connect(str(path))  # accepted: connect listens there now
    connect.wait_for_log(r"session \w+ ended", timeout=PROMPT_S)
    assert "is in use" not in connect.log()


def test_socket_where_something_listens_is_refused_and_its_listener_keeps_working(
    sock_dir: Path,
) -> None:
    path = sock_dir / "src.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen(8)
        other.settimeout(PROMPT_S)
        before = path.lstat()

        result = run_connect(path)
        assert_refused_in_one_line(
            result, f"migrelay: error: {path} is in use by another listener"
        )

        after = path.lstat()
        assert (after.st_ino, after.st_mode) == (before.st_ino, before.st_mode)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(PROMPT_S)
            client.connect(str(path))
            client.sendall(b"still mine")
            # Connections that connect's probe left behind come first; they are empty.
            data = b""
            for _ in range(8):
                accepted, _ = other.accept()
                with accepted:
                    accepted.settimeout(PROMPT_S)
                    data = accepted.recv(64)
                if data:
                    break
            assert data == b"still mine"


def test_socket_of_a_hung_listener_is_refused_at_once(sock_dir: Path) -> None:
    # A listener that stopped accepting (a hung or SIGSTOPped process): its backlog is
    # full, and a blocking connect() to it would never return.
    path = sock_dir / "src.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as hung:
        hung.bind(str(path))
        hung.listen(0)
        queued = []
        for _ in range(4):  # fill the backlog: further connects would block
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.setblocking(False)
            try:
                client.connect(str(path))
            except BlockingIOError:
                client.close()
                break
            queued.append(client)
        try:
            result = run_connect(path)  # times out (EXIT_S) if the probe blocks
            assert_refused_in_one_line(
                result,
                f"migrelay: error: {path} is in use by another listener (not accepting)",
            )
            assert stat.S_ISSOCK(path.lstat().st_mode)
        finally:
            for client in queued:
                client.close()


def _regular_file(path: Path) -> None:
    path.write_bytes(b"precious, not a socket\n")
    os.chmod(path, 0o640)


def _symlink_to_stale_socket(path: Path) -> None:
    target = path.with_name("elsewhere.sock")
    stale_socket(target)
    path.symlink_to(target)


NOT_SOCKETS = {
    "regular-file": _regular_file,
    "symlink-to-a-stale-socket": _symlink_to_stale_socket,
}


@pytest.mark.parametrize("kind", list(NOT_SOCKETS))
def test_path_that_is_not_a_socket_is_refused_and_left_intact(kind: str, sock_dir: Path) -> None:
    path = sock_dir / "src.sock"
    NOT_SOCKETS[kind](path)
    before = path.lstat()
    content = os.readlink(path) if path.is_symlink() else path.read_bytes()
    others = sorted(sock_dir.iterdir())

    result = run_connect(path)
    assert_refused_in_one_line(
        result, f"migrelay: error: {path} exists and is not a socket; not replacing it"
    )

    after = path.lstat()
    assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (
        before.st_ino,
        before.st_mode,
        before.st_mtime_ns,
    )
    assert (os.readlink(path) if path.is_symlink() else path.read_bytes()) == content
    assert sorted(sock_dir.iterdir()) == others


def test_the_socket_file_appears_only_once_it_listens(
    sock_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whoever sees the file can connect: it is bound and listening under a temporary
    name, then renamed into place (a connect between bind() and listen() is refused)."""
    path = sock_dir / "src.sock"
    seen_at_listen: list[bool] = []
    listen = socket.socket.listen

    def listen_and_look(sock: socket.socket, backlog: int = 0) -> None:
        seen_at_listen.append(path.exists())
        listen(sock, backlog)

    monkeypatch.setattr(socket.socket, "listen", listen_and_look)
    sock = prepare_unix_listener(path)
    try:
        assert seen_at_listen == [False]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert sorted(p.name for p in sock_dir.iterdir()) == ["src.sock"]  # no leftover
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))
    finally:
        sock.close()

    # A path too long for the temporary name is bound in place, and still works.
    long_dir = sock_dir / ("d" * (106 - len(str(sock_dir)) - 2 - len("s.sock")))
    long_dir.mkdir()
    long_path = long_dir / "s.sock"
    assert len(os.fsencode(long_path)) == 106  # the longest path Linux binds is 107
    sock = prepare_unix_listener(long_path)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(long_path))
    finally:
        sock.close()
