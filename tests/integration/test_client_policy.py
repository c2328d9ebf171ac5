"""Hosts shared with other users: whom the source side trusts, and what it sends where.

* The default sockets live in the private runtime directory, created mode 0700 by the
  command that needs it; one that is a symlink or another user's is refused.
* The source relay closes a connection from a user other than the socket's owners
  (``SO_PEERCRED``) before it opens a WebSocket for it.
* ``migrate --socket PATH`` checks who bound PATH before QEMU is told to connect there:
  guest RAM must not go to a socket another user bound first.
* TLS options with a ``ws://`` URL, and a token that ``ws://`` would show an HTTP proxy,
  are refused when the settings are loaded.

"Another user" is a child process that drops to ``nobody`` (the tests run as root).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from tests import helpers
from tests.loops import AsyncRunner
from tests.pki import PKI, make_pki

from migrelay.aio import local
from migrelay.aio.client import ClientConfig, SourceRelay, open_websocket
from migrelay.aio.local import PeerRefused
from migrelay.aio.source import DEFAULT_SOURCE_SOCKET, ClientSettings, run_source_relay
from migrelay.control import commands
from migrelay.control.commands import MigrateRequest
from migrelay.control.migration import MigrationOptions
from migrelay.errors import ConfigError, ConnectError

PROMPT_S = 5.0 * helpers.FACTOR
NOBODY = helpers.NOBODY_UID
PROXY_VARIABLES = [f"{scheme}_proxy" for scheme in ("http", "https", "no")]


# -- another user ------------------------------------------------------------------------


def as_nobody(action: Callable[[], int]) -> int:
    """Run ``action`` in a child process as ``nobody``; its result is the exit status."""
    return helpers.as_user(NOBODY, action)


async def exit_status(pid: int) -> int:
    """Wait for the child ``pid`` (in a thread: the loop runs on); its exit status."""
    _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    return os.waitstatus_to_exitcode(status)


@contextlib.contextmanager
def shared_dir(mode: int = 0o1777) -> Iterator[Path]:
    """A directory like ``/tmp``: anyone may create a socket in it."""
    with helpers.short_temp_dir() as directory:
        directory.chmod(mode)
        yield directory


def bound_by_nobody(path: Path) -> contextlib.AbstractContextManager[int]:
    """A socket at ``path`` that ``nobody`` bound and listens on, until the block ends."""
    return helpers.listening_as(NOBODY, path)


# -- the source relay's socket -------------------------------------------------------------


def connect_and_wait_for_close(path: Path) -> int:
    """An impostor QEMU: connect, write, then 0 if the relay closed the connection."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(PROMPT_S)
        sock.connect(str(path))
        with contextlib.suppress(OSError):
            sock.sendall(b"QEVM" + bytes(4096))
        try:
            return 0 if sock.recv(64) == b"" else 3
        except ConnectionResetError:
            return 0
        except TimeoutError:
            return 2


def test_source_relay_closes_a_connection_from_another_user_before_any_websocket(
    run_async: AsyncRunner, logs: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        dials: list[int] = []

        async def record(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            dials.append(1)
            writer.close()

        server = await asyncio.start_server(record, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with helpers.short_temp_dir() as directory:
            directory.chmod(0o755)
            path = directory / "src.sock"
            # Mode 0666: the file's mode alone would let nobody in; the owner check not.
            relay = SourceRelay(ClientConfig(url=f"ws://127.0.0.1:{port}/vm"), path, mode=0o666)
            await relay.start()
            try:
                pid = as_nobody(lambda: connect_and_wait_for_close(path))
                assert await exit_status(pid) == 0, "the relay kept nobody's connection"
                assert dials == [], "nobody's connection reached the server"
                refusals = [r for r in logs.records if "refused a connection" in r.getMessage()]
                assert len(refusals) == 1, logs.text
                assert refusals[0].levelno == logging.WARNING
                line = refusals[0].getMessage()
                assert f"on {path} from nobody (uid {NOBODY}, pid {pid})" in line, line
                assert "not an expected socket owner" in line and "\n" not in line

                # The owner's own connection still becomes a channel.
                _reader, writer = await asyncio.open_unix_connection(str(path))
                await helpers.wait_until(lambda: bool(dials), PROMPT_S, "the owner's channel")
                writer.close()
            finally:
                await relay.close()
                server.close()
                await server.wait_closed()

    run_async(main())


# -- migrate --socket: who bound it --------------------------------------------------------


def test_migrate_refuses_a_socket_bound_by_another_user_before_qemu_is_contacted(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    # No QEMU: had migrate talked to QMP first, it would fail on that instead.
    request_qmp = dead_qmp(sock_dir)
    with shared_dir() as directory:
        path = directory / "qemu_migration_source.sock"
        with bound_by_nobody(path):
            request = MigrateRequest(qmp_path=request_qmp, socket=path)
            with pytest.raises(PeerRefused) as caught:
                run_async(commands.run_migration(request))
    message = str(caught.value)
    assert message.startswith(f"{path} was bound by nobody (uid {NOBODY}), not by an expected")
    assert "\n" not in message


def test_migrate_cli_says_who_bound_the_socket_in_one_line(sock_dir: Path) -> None:
    qmp = dead_qmp(sock_dir)
    with shared_dir() as directory:
        path = directory / "qemu_migration_source.sock"
        where = ("--socket", str(path))
        with bound_by_nobody(path):
            result = subprocess.run(
                [sys.executable, "-m", "migrelay", "migrate", *("--qmp", str(qmp)), *where],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=15 * helpers.FACTOR,
                check=False,
            )
    assert result.returncode == 1, result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"migrelay: error: {path} was bound by nobody (uid {NOBODY})")


def dead_qmp(directory: Path) -> Path:
    """A QMP socket file nobody listens on: QMP fails at once (a missing one is waited for)."""
    path = directory / "dead.qmp"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))
    return path


def own_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.listen(8)
    return sock


@pytest.mark.parametrize(
    ("case", "error"),
    [
        ("missing in a shared directory", "nothing listens on .*other users may bind it"),
        ("in a directory without the sticky bit", "writable by others without the sticky bit"),
        ("in another user's directory", f"belongs to uid {NOBODY}, who could replace"),
        ("a symlink to our socket", "is a symlink: refusing to connect"),
    ],
)
def test_migrate_refuses_a_socket_another_user_could_swap_before_qemu_connects(
    case: str, error: str, sock_dir: Path
) -> None:
    mode = 0o777 if "sticky" in case else 0o1777
    with shared_dir(mode) as directory, contextlib.ExitStack() as stack:
        path = directory / "src.sock"
        if "another user's" in case:
            os.chown(directory, NOBODY, NOBODY)
            directory.chmod(0o755)
        if "symlink" in case:
            stack.enter_context(own_socket(sock_dir / "real.sock"))
            path.symlink_to(sock_dir / "real.sock")
        elif "missing" not in case:
            stack.enter_context(own_socket(path))
        with pytest.raises(PeerRefused, match=error):
            local.check_relay_socket(path, local.SocketOwners.default())


def test_migrate_accepts_its_own_socket_and_leaves_a_missing_private_one_to_qemu(
    run_async: AsyncRunner, sock_dir: Path
) -> None:
    owners = local.SocketOwners.default()
    with shared_dir() as directory, own_socket(directory / "src.sock"):
        local.check_relay_socket(directory / "src.sock", owners)  # /tmp-like, but ours
    missing = sock_dir / "nobody-here.sock"  # a private directory: nobody can bind it
    local.check_relay_socket(missing, owners)
    request = MigrateRequest(qmp_path=dead_qmp(sock_dir), socket=missing)
    with pytest.raises(ConnectError, match="cannot connect to qmp socket"):
        run_async(commands.run_migration(request))


# -- the default sockets' private directory ------------------------------------------------


@pytest.fixture
def runtime(sock_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The runtime directory, moved into the test's directory (root's and a user's)."""
    monkeypatch.setattr(local, "SYSTEM_RUNTIME_DIR", sock_dir / "run-migrelay")
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(sock_dir / "xdg"))
    return local.runtime_dir()


def test_default_source_socket_is_in_the_runtime_directory_not_tmp() -> None:
    assert local.runtime_dir() / "source.sock" == DEFAULT_SOURCE_SOCKET
    assert DEFAULT_SOURCE_SOCKET.parent != Path("/tmp")


def test_connect_creates_the_default_directory_private_and_listens_in_it(
    run_async: AsyncRunner, runtime: Path
) -> None:
    path = runtime / "source.sock"

    async def main() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(
            run_source_relay(ClientSettings(url="ws://127.0.0.1:9/vm"), path, stop)
        )
        try:
            await helpers.wait_until(path.exists, PROMPT_S, "the relay's socket")
            info = await asyncio.to_thread(runtime.lstat)
            assert stat.S_ISDIR(info.st_mode)
            assert stat.S_IMODE(info.st_mode) == 0o700, oct(info.st_mode)
            assert info.st_uid == os.geteuid()
        finally:
            stop.set()
            assert await task == 0

    run_async(main())


def test_incoming_creates_the_default_directory_before_qemu_listens_there(
    run_async: AsyncRunner, runtime: Path, sock_dir: Path
) -> None:
    # No QEMU: the directory is made first, then QMP fails as it always did.
    with pytest.raises(ConnectError, match="cannot connect to qmp socket"):
        run_async(
            commands.incoming(
                str(dead_qmp(sock_dir)), f"unix:{runtime / 'dest.sock'}", MigrationOptions()
            )
        )
    assert stat.S_IMODE(runtime.lstat().st_mode) == 0o700


@pytest.mark.parametrize("kind", ["symlink", "nobody's"])
def test_a_default_directory_planted_by_another_user_is_refused(
    kind: str, run_async: AsyncRunner, runtime: Path, sock_dir: Path
) -> None:
    planted = sock_dir / "planted"
    planted.mkdir(mode=0o700)
    runtime.parent.mkdir(exist_ok=True)
    if kind == "symlink":
        runtime.symlink_to(planted)
        error = "is not a directory \\(a symlink\\?\\)"
    else:
        runtime.mkdir(mode=0o700)
        os.chown(runtime, NOBODY, NOBODY)
        error = f"belongs to uid {NOBODY}, not to this user"
    stop = asyncio.Event()
    settings = ClientSettings(url="ws://127.0.0.1:9/vm")
    with pytest.raises(ConfigError, match=error):
        run_async(run_source_relay(settings, runtime / "source.sock", stop))
    with pytest.raises(ConfigError, match=error):
        run_async(
            commands.incoming(
                str(dead_qmp(sock_dir)), f"unix:{runtime / 'dest.sock'}", MigrationOptions()
            )
        )
    assert list(planted.iterdir()) == [] and not (runtime / "source.sock").exists()


# -- what a client sends where ------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    return make_pki(tmp_path_factory.mktemp("policy") / "pki")


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text("the-secret-token\n")
    return path


@pytest.fixture
def no_proxy_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


@pytest.mark.parametrize("option", ["ca", "fingerprint", "tls_cert"])
def test_tls_options_with_a_ws_url_are_refused_not_ignored(option: str, pki: PKI) -> None:
    values: dict[str, dict[str, Any]] = {
        "ca": {"ca": pki.ca},
        "fingerprint": {"fingerprint": pki.fingerprint()},
        "tls_cert": {"tls_cert": pki.client_cert, "tls_key": pki.client_key},
    }
    flag = "--" + option.replace("_", "-")
    plain = ClientSettings(url="ws://dst.example:8765/vm", proxy="direct", **values[option])
    with pytest.raises(ConfigError, match=f"^{flag} needs a wss:// URL: ws://dst.example"):
        plain.load()
    secure = ClientSettings(url="wss://dst.example/vm", proxy="direct", **values[option])
    assert secure.load().ssl_context is not None


def test_a_pin_without_tls_fails_at_once_instead_of_waiting_for_the_timeout(
    run_async: AsyncRunner,
) -> None:
    async def main() -> None:
        async def silent(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Never answers: only a client that gives up by itself returns in time.
            with contextlib.suppress(ConnectionError):
                await _reader.read()
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        config = ClientConfig(url=f"ws://127.0.0.1:{port}/vm", fingerprint=bytes(32))
        try:
            async with asyncio.timeout(PROMPT_S):
                with pytest.raises(ConnectError, match="pinned fingerprint needs a wss:// URL"):
                    await open_websocket(config)
        finally:
            server.close()
            await server.wait_closed()

    run_async(main())


def test_a_token_reaches_a_proxy_only_inside_tls(
    token_file: Path, no_proxy_env: pytest.MonkeyPatch
) -> None:
    proxy = "http://127.0.0.1:3128"
    leak = "would cross proxy 127.0.0.1:3128 \\(from {}\\) in clear with a ws:// URL: use wss://"
    # ws:// through the proxy: the upgrade request, token included, is plain text in
    # the CONNECT tunnel, which the proxy relays and can read.
    with pytest.raises(ConfigError, match="^the token " + leak.format("--proxy")):
        ClientSettings(url="ws://dst.example/vm", token_file=token_file, proxy=proxy).load()
    header = ClientSettings(
        url="ws://dst.example/vm", header_lines=("Authorization: Bearer x",), proxy=proxy
    )
    with pytest.raises(ConfigError, match="^the Authorization header " + leak.format("--proxy")):
        header.load()
    no_proxy_env.setenv("http_proxy", proxy)
    with pytest.raises(ConfigError, match="^the token " + leak.format("http_proxy")):
        ClientSettings(url="ws://127.0.0.1:8765/vm", token_file=token_file).load()

    # wss:// through the same proxy: TLS runs inside the tunnel.
    no_proxy_env.setenv("https_proxy", proxy)
    secure = ClientSettings(url="wss://dst.example/vm", token_file=token_file).load()
    assert secure.proxy is not None and secure.token == "the-secret-token"
    # Without a token a ws:// URL may use the proxy; the one-host workflow stays as it was.
    assert ClientSettings(url="ws://127.0.0.1:8765/vm").load().proxy is not None
    direct = ClientSettings(url="ws://127.0.0.1:8765/vm", token_file=token_file, proxy="direct")
    assert direct.load().proxy is None
    no_proxy_env.delenv("http_proxy")
    assert ClientSettings(url="ws://127.0.0.1:8765/vm").load().proxy is None
