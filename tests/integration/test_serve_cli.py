"""The real ``migrelay serve`` and ``connect`` commands as an operator starts them.

* Without ``--token-file`` (or ``--insecure``), ``serve`` refuses to listen beyond
  loopback: one line on stderr, a non-zero exit, nothing listening. With either, it
  starts there; on loopback it needs neither.
* ``--log-format json`` makes every line both commands log a JSON object with
  ``time``, ``level``, ``logger`` and ``message``.
* ``--config FILE`` (tables ``[serve]`` and ``[connect]``) and ``MIGRELAY_*``
  variables reach the running processes, the command line beating the environment
  beating the file; an unknown key is an error that starts nothing.

Every test runs the commands as subprocesses and talks to them over real sockets: raw
HTTP requests on TCP, and unix sockets standing in for QEMU on both sides.
(``test_hosting.py`` checks the same precedence on a toy typer command.)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from tests import helpers
from tests.processes import MigrelayProcess, MigrelayProcesses

FACTOR = helpers.FACTOR
#: Seconds a running process gets to answer a request or log a line.
PROMPT_S = 5.0 * FACTOR
#: Seconds a command that refuses to start gets to exit.
EXIT_S = 15.0 * FACTOR
LISTENING_WS = r"listening on ws://(\[[^\]]+\]|[^\s:\"]+):(\d+)"
TOKEN = "config-file-token"
#: The refusal that names every way out.
NO_AUTH_LINE = re.compile(
    r"migrelay: error: refusing to listen on (\S+) without authentication: "
    r"give --token-file or --client-ca \(mTLS\), or --insecure on a trusted network"
)


# -- helpers ---------------------------------------------------------------------------


def run_migrelay(
    *args: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m migrelay ARGS...`` to its end; stdout and stderr kept apart."""
    return subprocess.run(
        [sys.executable, "-m", "migrelay", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=EXIT_S,
        check=False,
    )


@contextlib.contextmanager
def held_port() -> Iterator[int]:
    """A TCP port this test listens on, for every address of both families.

    For a command that must refuse before it binds anything. Had it tried to listen on
    this port, it would have failed with "Address already in use" instead of printing
    its refusal: the refusal's exact stderr shows that it never bound. (A probe after
    the command exited could not fail: its sockets close with it.)
    """
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        # Dual-stack and without SO_REUSEADDR: any bind to this port on 0.0.0.0, [::],
        # 127.0.0.1 or [::1] fails while it listens, SO_REUSEADDR or not.
        listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        listener.bind(("::", 0))
        listener.listen(1)
        port: int = listener.getsockname()[1]
        yield port
    finally:
        listener.close()


@contextlib.contextmanager
def held_unix_socket(path: Path) -> Iterator[None]:
    """A unix listener at ``path``, for a ``connect`` that must refuse before listening.

    ``connect`` probes a socket file before it replaces one, and refuses one that has a
    listener ("in use by another listener"): had it got that far, its stderr would say
    so, and the probe's connection would wait here. On leaving, fails if one does, or
    if the file is no longer this listener's.
    """
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(1)
        listener.setblocking(False)
        inode = path.lstat().st_ino
        yield
        try:
            probe, _ = listener.accept()
        except BlockingIOError:
            pass
        else:
            probe.close()
            raise AssertionError(f"something connected to {path}: the command reached it")
        assert path.lstat().st_ino == inode, f"{path} was replaced"
    finally:
        listener.close()


def write_file(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text).lstrip(), encoding="utf-8")
    return path


def token_file(directory: Path, token: str) -> Path:
    return write_file(directory / f"{token}.tokens", f"# for the test\n{token}\n")


@contextlib.contextmanager
def destination(path: Path) -> Iterator[socket.socket]:
    """A unix socket standing in for destination QEMU (connections wait in its backlog)."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(path))
        listener.listen(16)
        listener.settimeout(PROMPT_S)
        yield listener
    finally:
        listener.close()


@dataclass
class Reply:
    """The answer to one upgrade request."""

    status: int
    head: str
    body: bytes


def upgrade(
    port: int,
    path: str = "/",
    *,
    host: str = "127.0.0.1",
    token: str | None = None,
    origin: str | None = None,
    keep: contextlib.ExitStack | None = None,
) -> Reply:
    """Send a migrelay upgrade request (its own session) and read the answer's head.

    A 101 connection stays open in ``keep`` (so its session counts); it is closed at
    once otherwise. A refusal's body is read to the end (the server closes).
    """
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
        "Sec-WebSocket-Protocol: migrelay.v1",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if origin is not None:
        lines.append(f"Origin: {origin}")
    return exchange(port, ("\r\n".join(lines) + "\r\n\r\n").encode(), host=host, keep=keep)


def exchange(
    port: int, request: bytes, *, host: str = "127.0.0.1", keep: contextlib.ExitStack | None = None
) -> Reply:
    """Send ``request``, read the answer (to the end unless it is a 101); see `upgrade`."""
    connection = socket.create_connection((host.strip("[]"), port), timeout=PROMPT_S)
    try:
        connection.sendall(request)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = connection.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed before a complete answer: {data!r}")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        if status != 101:
            while chunk := connection.recv(65536):
                body += chunk
    except BaseException:
        connection.close()
        raise
    if status == 101 and keep is not None:
        keep.callback(connection.close)
    else:
        connection.close()
    return Reply(status, head.decode("latin-1"), body)


def start_serve(
    procs: MigrelayProcesses, *args: str, env: Mapping[str, str] | None = None
) -> tuple[MigrelayProcess, str, int]:
    """Start ``serve ARGS`` (no ``--listen`` added); return it, its host and its port."""
    process = procs.start("serve", *args, ready=LISTENING_WS, env=env)
    match = re.search(LISTENING_WS, process.log())
    assert match is not None
    return process, match.group(1), int(match.group(2))


# -- listening beyond loopback -----------------------------------------------------------


@pytest.mark.parametrize("host", ["0.0.0.0", "[::]", ""], ids=["0.0.0.0", "[::]", "no-host"])
def test_serve_refuses_to_listen_beyond_loopback_without_token_file_or_insecure(
    host: str, sock_dir: Path
) -> None:
    with held_port() as port:
        result = run_migrelay(
            "serve", "--listen", f"{host}:{port}", "--target", str(sock_dir / "x")
        )
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    match = NO_AUTH_LINE.fullmatch(lines[0])
    assert match is not None, lines[0]
    assert match.group(1) == (host.strip("[]") or "0.0.0.0")


def test_the_refusal_to_start_is_a_json_record_under_log_format_json(sock_dir: Path) -> None:
    with held_port() as port:
        result = run_migrelay(
            "serve", "--listen", f"0.0.0.0:{port}", "--target", str(sock_dir / "x"),
            "--log-format", "json",
        )  # fmt: skip
    assert result.returncode == 1, result
    [line] = result.stderr.splitlines()
    record = json.loads(line)
    assert set(record) == {"time", "level", "logger", "message"}
    assert record["level"] == "error"
    assert NO_AUTH_LINE.fullmatch(f"migrelay: error: {record['message']}"), record


@pytest.mark.parametrize("listen", ["localhost:0", "127.0.0.2:0", "[::1]:0"])
def test_serve_on_loopback_starts_without_authentication(
    listen: str, migrelay_procs: MigrelayProcesses, sock_dir: Path
) -> None:
    with destination(sock_dir / "dest.sock") as dest:
        _, host, port = start_serve(
            migrelay_procs, "--listen", listen, "--target", dest.getsockname()
        )
        assert upgrade(port, host=host).status == 101


@pytest.mark.parametrize("how", ["flag", "environment", "config-file"])
def test_serve_with_insecure_listens_beyond_loopback_and_asks_no_token(
    how: str, migrelay_procs: MigrelayProcesses, sock_dir: Path
) -> None:
    args = ["--listen", "0.0.0.0:0"]
    env: dict[str, str] = {}
    if how == "flag":
        args.append("--insecure")
    elif how == "environment":
        env["MIGRELAY_INSECURE"] = "1"
    else:
        config = write_file(sock_dir / "serve.toml", "[serve]\ninsecure = true\n")
        args += ["--config", str(config)]
    with destination(sock_dir / "dest.sock") as dest:
        serve, host, port = start_serve(
            migrelay_procs, *args, "--target", dest.getsockname(), env=env
        )
        assert host == "0.0.0.0"
        assert upgrade(port).status == 101
        assert exchange(port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").body == b"ok\n"
    assert "error" not in serve.log()


def test_serve_with_token_file_listens_beyond_loopback_and_requires_the_token(
    migrelay_procs: MigrelayProcesses, sock_dir: Path
) -> None:
    tokens = token_file(sock_dir, TOKEN)
    with destination(sock_dir / "dest.sock") as dest:
        serve, host, port = start_serve(
            migrelay_procs,
            "--listen",
            "0.0.0.0:0",
            "--token-file",
            str(tokens),
            "--target",
            dest.getsockname(),
        )
        assert host == "0.0.0.0"
        assert upgrade(port).status == 401
        assert upgrade(port, token="not-" + TOKEN).status == 403
        assert upgrade(port, token=TOKEN).status == 101
    assert TOKEN not in serve.log()


# -- --log-format json -------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """One log record: its level, its logger and a regular expression for its message."""

    level: str
    logger: str
    message: str


def assert_json_lines(log: str, expected: list[Expected]) -> None:
    """Every line of ``log`` is a JSON log record; their messages match ``expected``."""
    records = []
    for line in log.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(record, dict), line
        assert set(record) == {"time", "level", "logger", "message"}, line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", record["time"]), line
        records.append(record)
    assert len(records) == len(expected), records
    for record, want in zip(records, expected, strict=True):
        assert (record["level"], record["logger"]) == (want.level, want.logger), record
        assert re.fullmatch(want.message, record["message"]), (record, want.message)


def test_json_log_format_makes_every_serve_and_connect_line_a_json_object(
    migrelay_procs: MigrelayProcesses, sock_dir: Path
) -> None:
    tokens = token_file(sock_dir, TOKEN)
    wrong = token_file(sock_dir, "wrong-token")
    source = sock_dir / "src.sock"
    with destination(sock_dir / "dest.sock") as dest:
        serve = migrelay_procs.serve(
            "--target", dest.getsockname(), "--token-file", str(tokens), "--log-format", "json"
        )
        assert serve.port is not None
        assert exchange(serve.port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").status == 426
        connect = migrelay_procs.connect(
            f"{serve.url}/", source, "--token-file", str(wrong), "--log-format", "json"
        )
        # Source QEMU connects: the relay's upgrade carries the wrong token.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as qemu:
            qemu.settimeout(PROMPT_S)
            qemu.connect(str(source))
            with contextlib.suppress(ConnectionResetError):
                assert qemu.recv(1) == b""  # the relay drops QEMU's connection
        connect.wait_for_log(r"session \w+ ended", timeout=PROMPT_S)
        serve.wait_for_log(r": 403 invalid token", timeout=PROMPT_S)
        assert connect.stop() == 1  # a migration failed while it ran
        assert serve.stop() == 0
    url = re.escape(f"{serve.url}/")
    peer = r"127\.0\.0\.1:\d+"
    assert_json_lines(
        serve.log(),
        [
            Expected(
                "info", "migrelay.aio.server", rf"listening on ws://127\.0\.0\.1:{serve.port}"
            ),
            Expected(
                "info",
                "migrelay.aio.server",
                rf"refused / from {peer}: 426 this is a migrelay websocket endpoint",
            ),
            Expected("info", "migrelay.aio.server", rf"refused / from {peer}: 403 invalid token"),
            Expected(
                "info",
                "migrelay.aio.service",
                r"shutting down: no new sessions; running ones get 120 s",
            ),
        ],
    )
    assert_json_lines(
        connect.log(),
        [
            Expected(
                "info",
                "migrelay.aio.client",
                rf"listening on {re.escape(str(source))}, relaying to {url}",
            ),
            Expected(
                "error",
                "migrelay.aio.client",
                rf"channel \w+/0: cannot open websocket to {url}: .*403.*invalid token.*",
            ),
            Expected("info", "migrelay.aio.client", r"session \w+ ended: 1 channel\(s\), failed"),
        ],
    )
    assert "wrong-token" not in serve.log() + connect.log()


# -- --config FILE and MIGRELAY_* ---------------------------------------------------------


def test_serve_config_file_sets_listen_target_tokens_origins_and_max_sessions(
    migrelay_procs: MigrelayProcesses, sock_dir: Path
) -> None:
    tokens = token_file(sock_dir, TOKEN)
    with destination(sock_dir / "dest.sock") as dest:
        config = write_file(
            sock_dir / "serve.toml",
            f"""
            [serve]
            listen = "127.0.0.2:0"
            target = "{dest.getsockname()}"
            token-file = "{tokens}"
            allow-origin = ["https://console.example"]
            max-sessions = 1
            wait_target = 2

            [connect]
            url = "ws://elsewhere.example/vm"
            """,
        )
        _, host, port = start_serve(migrelay_procs, "--config", str(config))
        assert host == "127.0.0.2"
        with contextlib.ExitStack() as open_sessions:
            assert upgrade(port, host=host).status == 401
            assert upgrade(port, host=host, token="not-" + TOKEN).status == 403
            evil = upgrade(port, host=host, token=TOKEN, origin="https://evil.example")
            assert (evil.status, evil.body) == (403, b"origin not allowed\n")
            ok = upgrade(
                port, host=host, token=TOKEN, origin="https://console.example", keep=open_sessions
            )
            assert ok.status == 101
            full = upgrade(port, host=host, token=TOKEN)
            assert (full.status, full.body) == (503, b"too many sessions (limit 1)\n")
            assert "\r\nretry-after: 5" in full.head.lower()


def test_environment_overrides_config_file_and_command_line_overrides_both(
    migrelay_procs: MigrelayProcesses, sock_dir: Path
) -> None:
    file_tokens, env_tokens, flag_tokens = (
        token_file(sock_dir, f"{level}-token") for level in ("file", "env", "flag")
    )
    with destination(sock_dir / "dest.sock") as dest:
        config = write_file(
            sock_dir / "serve.toml",
            f"""
            [serve]
            listen = "127.0.0.2:0"
            target = "{dest.getsockname()}"
            token-file = "{file_tokens}"
            allow-origin = ["https://file.example"]
            """,
        )
        env = {
            "MIGRELAY_CONFIG": str(config),  # --config itself from the environment
            "MIGRELAY_LISTEN": "127.0.0.3:0",
            "MIGRELAY_TOKEN_FILE": str(env_tokens),
            "MIGRELAY_ALLOW_ORIGIN": "https://env.example https://env2.example",
        }

        # The environment beats the file.
        serve, host, port = start_serve(migrelay_procs, env=env)
        assert host == "127.0.0.3"
        assert upgrade(port, host=host, token="env-token").status == 101
        assert upgrade(port, host=host, token="file-token").status == 403
        for origin, status in [
            ("https://env.example", 101),
            ("https://env2.example", 101),
            ("https://file.example", 403),
        ]:
            assert upgrade(port, host=host, token="env-token", origin=origin).status == status
        serve.stop()

        # The command line beats both.
        _, host, port = start_serve(
            migrelay_procs,
            "--listen",
            "127.0.0.4:0",
            "--token-file",
            str(flag_tokens),
            "--allow-origin",
            "https://flag.example",
            env=env,
        )
        assert host == "127.0.0.4"
        assert upgrade(port, host=host, token="flag-token").status == 101
        for token in ("env-token", "file-token"):
            assert upgrade(port, host=host, token=token).status == 403
        for origin, status in [("https://flag.example", 101), ("https://env.example", 403)]:
            assert upgrade(port, host=host, token="flag-token", origin=origin).status == status


def test_connect_takes_url_socket_and_token_from_config_file_and_relays(
    migrelay_procs: MigrelayProcesses, sock_dir: Path
) -> None:
    tokens = token_file(sock_dir, TOKEN)
    source = sock_dir / "src.sock"
    with destination(sock_dir / "dest.sock") as dest:
        serve = migrelay_procs.serve("--target", dest.getsockname(), "--token-file", str(tokens))
        config = write_file(
            sock_dir / "connect.toml",
            f"""
            [serve]
            target = "/nowhere.sock"

            [connect]
            url = "{serve.url}/"
            listen-unix = "{source}"
            token-file = "{tokens}"
            """,
        )
        connect = migrelay_procs.start(
            "connect", "--config", str(config), ready=f"listening on {re.escape(str(source))}"
        )
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as qemu:
            qemu.connect(str(source))
            qemu.sendall(b"QEVM migration stream")
            arrived, _ = dest.accept()
            with arrived:
                arrived.settimeout(PROMPT_S)
                received = b""
                while len(received) < len(b"QEVM migration stream"):
                    chunk = arrived.recv(4096)
                    assert chunk, received
                    received += chunk
        assert received == b"QEVM migration stream"
        connect.wait_for_log(r"channel \w+/0 opened", timeout=PROMPT_S)


def test_connect_url_and_socket_from_environment_beat_config_file_and_arguments_beat_both(
    migrelay_procs: MigrelayProcesses, sock_dir: Path
) -> None:
    config = write_file(
        sock_dir / "connect.toml",
        f"""
        [connect]
        url = "ws://127.0.0.1:9/from-file"
        listen-unix = "{sock_dir / "file.sock"}"
        """,
    )
    env = {
        "MIGRELAY_URL": "ws://127.0.0.1:9/from-env",
        "MIGRELAY_LISTEN_UNIX": str(sock_dir / "env.sock"),
    }
    from_env = migrelay_procs.start(
        "connect",
        "--config",
        str(config),
        env=env,
        ready="listening on .*, relaying to",
    )
    assert re.search(
        rf"listening on {re.escape(str(sock_dir / 'env.sock'))}, relaying to "
        r"ws://127\.0\.0\.1:9/from-env$",
        from_env.log(),
        re.MULTILINE,
    ), from_env.log()
    from_env.stop()
    from_args = migrelay_procs.start(
        "connect",
        "--config",
        str(config),
        "ws://127.0.0.1:9/from-args",
        "--listen-unix",
        str(sock_dir / "args.sock"),
        env=env,
        ready="listening on .*, relaying to",
    )
    assert re.search(
        rf"listening on {re.escape(str(sock_dir / 'args.sock'))}, relaying to "
        r"ws://127\.0\.0\.1:9/from-args$",
        from_args.log(),
        re.MULTILINE,
    ), from_args.log()
    assert not (sock_dir / "file.sock").exists()


#: command -> (the unknown key, a config whose other settings are valid).
UNKNOWN_KEYS = {
    "serve": ("listen-on", '[serve]\nlisten = "127.0.0.1:{port}"\nlisten-on = "{sock}"\n'),
    "connect": ("ur1", '[connect]\nlisten-unix = "{sock}"\nur1 = "ws://127.0.0.1:{port}/"\n'),
}


def unknown_key_config(sock_dir: Path, command: str, port: int) -> Path:
    template = UNKNOWN_KEYS[command][1]
    return write_file(sock_dir / "c.toml", template.format(port=port, sock=sock_dir / "s.sock"))


@pytest.mark.parametrize("command", list(UNKNOWN_KEYS))
def test_unknown_config_key_is_an_error_that_names_it_and_starts_nothing(
    command: str, sock_dir: Path
) -> None:
    with held_port() as port, held_unix_socket(sock_dir / "s.sock"):
        config = unknown_key_config(sock_dir, command, port)
        url = [f"ws://127.0.0.1:{port}/"] if command == "connect" else []
        result = run_migrelay(command, "--config", str(config), *url, env={"COLUMNS": "200"})
    assert result.returncode == 2, result
    assert result.stdout == ""
    key = UNKNOWN_KEYS[command][0]
    assert result.stderr.splitlines() == [
        f"migrelay: error: {config}: unknown setting '{key}' in [{command}]"
    ]
    assert "listening" not in result.stderr


def test_a_config_value_of_the_wrong_type_is_one_line_naming_the_file_and_key(
    sock_dir: Path,
) -> None:
    with held_port() as port:
        config = write_file(
            sock_dir / "c.toml", f'[serve]\nlisten = "127.0.0.1:{port}"\nmax-sessions = "eight"\n'
        )
        # The variable of the same option is set too, and must not be blamed.
        result = run_migrelay("serve", "--config", str(config), env={"MIGRELAY_MAX_SESSIONS": ""})
    assert result.returncode == 2, result
    [line] = result.stderr.splitlines()
    assert line.startswith(f"migrelay: error: {config}: setting 'max-sessions' in [serve]: "), line
    assert "MIGRELAY_MAX_SESSIONS" not in line


def test_a_list_setting_written_as_one_string_is_taken_as_a_list_of_one(
    sock_dir: Path, migrelay_procs: MigrelayProcesses
) -> None:
    config = write_file(
        sock_dir / "c.toml",
        f'[serve]\ntarget = "{sock_dir / "absent.sock"}"\nwait-target = 0.1\n'
        'allow-origin = "https://console.example"\n',
    )
    server = migrelay_procs.serve("--config", str(config))
    assert server.port is not None
    # Past the origin check, the absent target answers 503.
    assert upgrade(server.port, origin="https://console.example").status == 503
    assert upgrade(server.port, origin="https://evil.example").status == 403


@pytest.mark.parametrize("problem", ["missing", "empty"])
def test_connect_with_a_token_file_it_cannot_use_says_so_in_one_line(
    problem: str, sock_dir: Path
) -> None:
    token_file = sock_dir / "token"
    if problem == "empty":
        token_file.write_text("# no token here\n")
    with held_unix_socket(sock_dir / "s.sock"):
        result = run_migrelay(
            "connect", "ws://127.0.0.1:9/", "--listen-unix", str(sock_dir / "s.sock"),
            "--token-file", str(token_file),
        )  # fmt: skip
    assert result.returncode == 1, result
    expected = {
        "missing": f"migrelay: error: cannot read {token_file}: No such file or directory",
        "empty": f"migrelay: error: {token_file} holds no token",
    }[problem]
    assert result.stderr.splitlines() == [expected]
