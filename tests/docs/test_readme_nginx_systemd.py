"""The README's nginx site and systemd unit, run as printed where a test machine can.

**nginx** ("Behind nginx"): the ``nginx`` block of the README is the site file of a
destination host. The test takes it literally and changes only what must differ on a
test machine, each replacement required to match exactly once (so that a README edit
that drops or renames one fails here):

* ``listen 443 ssl`` -> ``listen 127.0.0.1:PORT ssl``: port 443 needs root and may be
  taken; a free loopback port instead.
* ``ssl_certificate`` / ``ssl_certificate_key``: the test PKI's server certificate
  (``localhost``, ``127.0.0.1``) in place of ``dst1.example``'s.
* ``proxy_pass http://127.0.0.1:8765`` -> the port the test's ``serve`` got.

The site is included in an ``http {}`` block, as Debian's ``/etc/nginx/nginx.conf``
includes ``sites-enabled/*``; around it, what a non-root nginx in the foreground needs
(pid, logs and temp paths in the test's directory). The ``serve`` and ``connect`` lines
of the block after it run as printed too, with their host paths (``--target-dir``,
``--token-file``), ``--listen``'s port and the URL's host replaced, and ``--ca`` added
to ``connect`` (the test CA is not in the system store that ``dst1.example``'s
certificate would be checked against). A relay session then crosses nginx both ways.

**systemd** ("The systemd unit"): ``tools/migrelay-serve.service`` is installed byte for
byte into a scratch root as the README installs it (``/etc/systemd/system/``), beside
the host's unit files, ``kill`` and the command ``tools/setup`` made in this checkout
at the place the unit runs it from (``/opt/migrelay`` in the README), and
``systemd-analyze verify --root`` must report nothing at all. No systemd runs the unit
here, so what its sandbox relies on is checked on its own: ``/run/migrelay`` as the
README's tmpfiles line makes it, and a socket root makes there with the README's umask,
let a user of the group ``migrelay`` (a stand-in uid and gid, through ``setpriv``)
connect but not bind, and the usual umask 022 would lock that user out. Where QEMU runs
as another user, ``/run/migrelay/vms`` as the README makes it lets that user (a stand-in,
in the group) create its sockets there, the unit's user connect to them, and ``serve``
take the directory as its ``--target-dir``.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import FACTOR
from tests.pki import PKI, make_pki
from tests.processes import MigrelayProcesses

CHECKOUT = Path(__file__).resolve().parents[2]
README = CHECKOUT / "README.md"
UNIT = CHECKOUT / "tools" / "migrelay-serve.service"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
#: Where the README puts the checkout whose ``.venv/bin/migrelay`` the unit runs.
HOST_CHECKOUT = "/opt/migrelay"
#: Bounds on the test's own steps (a session of a few MiB takes well under a second).
STEP_TIMEOUT_S = 30.0 * FACTOR
PAYLOAD_BYTES = 4 << 20
TOKEN = "readme-nginx-test-token"


# -- the README's blocks ------------------------------------------------------------------


def fenced_blocks(after: str, language: str) -> list[str]:
    """The fenced ``language`` blocks of README.md from the paragraph starting with
    ``after`` up to the next bold paragraph title (``**Name.**``)."""
    text = README.read_text(encoding="utf-8")
    start = text.index(after)
    following = re.search(r"^\*\*[^*\n]+\.\*\*", text[start + len(after) :], re.MULTILINE)
    section = text[start : start + len(after) + following.start()] if following else text
    return re.findall(rf"^```{language}\n(.*?)^```$", section, re.MULTILINE | re.DOTALL)


def replace_once(text: str, old: str, new: str) -> str:
    assert text.count(old) == 1, f"{old!r} is not once in the README's block:\n{text}"
    return text.replace(old, new)


def command_lines(block: str) -> dict[str, list[str]]:
    """The ``migrelay COMMAND ...`` lines of a shell block (continuations joined), split
    as the shell would, by command."""
    joined = block.replace("\\\n", " ")
    commands = {}
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words[:1] == ["migrelay"]:
            commands[words[1]] = words[2:]
    return commands


def option(args: list[str], name: str, value: str) -> str:
    """Replace the value of ``name`` in ``args`` by ``value``; return the old one."""
    index = args.index(name) + 1
    old, args[index] = args[index], value
    return old


# -- nginx ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def nginx_runs(sock_dir: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    """nginx processes a test starts; killed and reaped at teardown."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            process.kill()
            process.wait()


def start_nginx(
    site: str, directory: Path, port: int, started: list[subprocess.Popen[bytes]]
) -> None:
    """Run nginx in the foreground with ``site`` included in its ``http {}``."""
    directory.mkdir()
    (directory / "migrelay.conf").write_text(site)
    config = directory / "nginx.conf"
    config.write_text(f"""
daemon off;
master_process off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log info;
events {{ worker_connections 64; }}
http {{
    access_log {directory}/access.log;
    client_body_temp_path {directory}/body;
    proxy_temp_path {directory}/proxy;
    fastcgi_temp_path {directory}/fastcgi;
    uwsgi_temp_path {directory}/uwsgi;
    scgi_temp_path {directory}/scgi;
    include {directory}/migrelay.conf;
}}
""")
    check = subprocess.run(
        [NGINX, "-t", "-p", str(directory), "-c", str(config), "-e", str(directory / "error.log")],
        capture_output=True, text=True, timeout=STEP_TIMEOUT_S, check=False,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    process = subprocess.Popen(
        [NGINX, "-p", str(directory), "-c", str(config), "-e", str(directory / "error.log")],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    started.append(process)
    deadline = time.monotonic() + STEP_TIMEOUT_S
    while True:
        assert process.poll() is None, (directory / "error.log").read_text(errors="replace")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nginx did not listen on {port}"
            time.sleep(0.05)


class Echo:
    """A destination socket that sends back every byte it gets, then half-closes."""

    def __init__(self, path: Path) -> None:
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(str(path))
        self.listener.listen()
        self.listener.settimeout(STEP_TIMEOUT_S)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            connection, _ = self.listener.accept()
            with connection:
                connection.settimeout(STEP_TIMEOUT_S)
                while data := connection.recv(1 << 16):
                    connection.sendall(data)
                connection.shutdown(socket.SHUT_WR)
        except BaseException as exc:  # reported by join()
            self.error = exc

    def join(self) -> None:
        self.thread.join(STEP_TIMEOUT_S)
        assert not self.thread.is_alive(), "the destination did not see the end of the stream"
        self.listener.close()
        if self.error is not None:
            raise self.error


def relay_session(source: Path, payload: bytes) -> bytes:
    """Like QEMU: connect to ``connect``'s socket, send, half-close, read to the end.

    A first small message must come back before anything else is sent: nothing on the
    way (nginx included) may hold data back until more arrives.
    """
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(STEP_TIMEOUT_S)
        sock.connect(str(source))
        sock.sendall(b"hello")
        echoed = b""
        while len(echoed) < 5:
            chunk = sock.recv(5 - len(echoed))
            assert chunk, "the session ended before the first message came back"
            echoed += chunk
        assert echoed == b"hello"

        def send() -> None:
            sock.sendall(payload)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send, daemon=True)
        sender.start()
        received = bytearray()
        while chunk := sock.recv(1 << 16):
            received += chunk
        sender.join(STEP_TIMEOUT_S)
        return bytes(received)


def test_readme_nginx_site_carries_a_relay_session_to_serve_and_back(
    sock_dir: Path, migrelay_procs: MigrelayProcesses, nginx_runs: list[subprocess.Popen[bytes]]
) -> None:
    (site,) = fenced_blocks("**Behind nginx.**", "nginx")
    (commands,) = fenced_blocks("**Behind nginx.**", "sh")
    lines = command_lines(commands)
    pki: PKI = make_pki(sock_dir / "pki")
    tokens = sock_dir / "tokens"
    tokens.write_text(f"{TOKEN}\n")
    targets = sock_dir / "vms"
    targets.mkdir(mode=0o700)
    echo = Echo(targets / "vm1.sock")

    serve_args = list(lines["serve"])
    listen = serve_args.pop(serve_args.index("--listen") + 1)
    serve_args.remove("--listen")
    assert listen == "127.0.0.1:8765", "serve listens on loopback only, behind nginx"
    option(serve_args, "--target-dir", str(targets))
    option(serve_args, "--token-file", str(tokens))
    server = migrelay_procs.serve(*serve_args, listen="127.0.0.1:0")

    port = free_port()
    site = replace_once(site, "listen 443 ssl;", f"listen 127.0.0.1:{port} ssl;")
    site = re.sub(r"(ssl_certificate\s+)\S+;", rf"\g<1>{pki.cert};", site, count=1)
    site = re.sub(r"(ssl_certificate_key\s+)\S+;", rf"\g<1>{pki.key};", site, count=1)
    assert str(pki.cert) in site and str(pki.key) in site, site
    site = replace_once(site, "http://127.0.0.1:8765;", f"http://127.0.0.1:{server.port};")
    start_nginx(site, sock_dir / "nginx", port, nginx_runs)

    connect_args = list(lines["connect"])
    url = connect_args.pop(0)
    assert url == "wss://dst1.example/migrelay/vm1", url
    option(connect_args, "--token-file", str(tokens))
    source = sock_dir / "source.sock"
    client = migrelay_procs.connect(
        f"wss://localhost:{port}/migrelay/vm1", source, *connect_args, "--ca", str(pki.ca)
    )

    payload = subprocess.run(
        ["head", "-c", str(PAYLOAD_BYTES), "/dev/urandom"], capture_output=True, check=True
    ).stdout
    assert relay_session(source, payload) == payload
    echo.join()
    for relay in (server, client):
        relay.wait_for_log(r"channel \S+ closed: ended by the ", timeout=STEP_TIMEOUT_S)
    opened = [line for line in server.log().splitlines() if " opened: " in line]
    # nginx's X-Forwarded-For, believed from the --trusted-proxy, names the client.
    assert len(opened) == 1 and " via 127.0.0.1:" in opened[0], server.log()
    # The same site serves /healthz under the prefix (the Metrics paragraph).
    context = ssl.create_default_context(cafile=str(pki.ca))
    with urllib.request.urlopen(
        f"https://localhost:{port}/migrelay/healthz", context=context, timeout=STEP_TIMEOUT_S
    ) as answer:
        assert answer.status == 200 and answer.read().strip() == b"ok"


# -- systemd --------------------------------------------------------------------------------


def unit_directives(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.splitlines() if line.startswith(f"{key}=")]


def test_systemd_unit_verifies_clean_where_the_readme_installs_it(tmp_path: Path) -> None:
    text = UNIT.read_text(encoding="utf-8")
    (exec_start,) = unit_directives(text, "ExecStart")
    command = shlex.split(exec_start)[0]
    # The command is the one tools/setup installs (.venv/bin/migrelay of the checkout),
    # in the checkout where the README puts it.
    assert command.startswith(f"{HOST_CHECKOUT}/"), command
    installed = CHECKOUT / command.removeprefix(f"{HOST_CHECKOUT}/")
    assert installed == CHECKOUT / ".venv" / "bin" / "migrelay", command
    assert installed.is_file(), f"tools/setup did not install {installed}"
    # The README's steps say the same.
    readme = README.read_text(encoding="utf-8")
    assert f'git clone "$PWD" {HOST_CHECKOUT} && {HOST_CHECKOUT}/tools/setup' in readme
    assert f"cp {HOST_CHECKOUT}/tools/migrelay-serve.service /etc/systemd/system/" in readme
    # The unit sees the directory of the walkthrough's and serve.toml's sockets.
    assert unit_directives(text, "ReadWritePaths") == ["-/run/migrelay"]
    assert 'target-dir = "/run/migrelay"' in readme

    root = tmp_path / "root"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "lib" / "systemd").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")  # merged /usr, as on Debian
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    shutil.copy2(Path("/bin/kill").resolve(), root / "usr/bin/kill")
    placed = root / command.lstrip("/")
    placed.parent.mkdir(parents=True)
    shutil.copy2(installed, placed)
    unit_dir = root / "etc" / "systemd" / "system"
    unit_dir.mkdir(parents=True)
    shutil.copyfile(UNIT, unit_dir / UNIT.name)
    assert (unit_dir / UNIT.name).read_bytes() == UNIT.read_bytes()

    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", f"--root={root}", "--man=no", str(unit_dir / UNIT.name)],
        capture_output=True, text=True, timeout=STEP_TIMEOUT_S, check=False, cwd=root,
    )  # fmt: skip
    assert (result.returncode, result.stdout + result.stderr) == (0, "")
    # The check can fail: the same root without the command is refused.
    placed.unlink()
    missing = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", f"--root={root}", "--man=no", str(unit_dir / UNIT.name)],
        capture_output=True, text=True, timeout=STEP_TIMEOUT_S, check=False, cwd=root,
    )  # fmt: skip
    assert missing.returncode != 0 and "is not executable" in missing.stderr, missing.stderr


#: A user and a group that stand for the unit's dynamic user and the group ``migrelay``
#: (numbers outside the system's and the dynamic users' ranges; nothing is created).
UNIT_UID, MIGRELAY_GID = 47_123, 47_124


def connects_as_unit_user(path: Path) -> subprocess.CompletedProcess[str]:
    """Connect to ``path`` as a user whose only other group is ``MIGRELAY_GID``."""
    return subprocess.run(
        ["setpriv", f"--reuid={UNIT_UID}", f"--regid={UNIT_UID}", f"--groups={MIGRELAY_GID}",
         "socat", "-u", "OPEN:/dev/null", f"UNIX-CONNECT:{path}"],
        capture_output=True, text=True, timeout=STEP_TIMEOUT_S, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(("umask", "reachable"), [("007", True), ("022", False)])
def test_unit_group_reaches_sockets_root_qemu_makes_as_the_readme_says(
    sock_dir: Path, umask: str, reachable: bool
) -> None:
    (steps,) = fenced_blocks("**The systemd unit.**", "sh")
    match = re.search(r"echo '(d /run/migrelay \S+ \S+ \S+ -)' > /etc/tmpfiles\.d/", steps)
    assert match is not None, steps
    kind, path, mode, user, group, _ = match.group(1).split()
    assert (kind, path, user, group) == ("d", "/run/migrelay", "root", "migrelay")
    assert "`(umask 007; qemu-system-x86_64 ... -qmp" in README.read_text(encoding="utf-8")
    # /run/migrelay as tmpfiles makes it, with a stand-in for the group migrelay.
    run_dir = sock_dir / "run-migrelay"
    run_dir.mkdir()
    os.chown(run_dir, 0, MIGRELAY_GID)
    run_dir.chmod(int(mode, 8))
    sock_dir.chmod(0o755)  # the way to it is open, as /run is
    qmp = run_dir / "vm1.qmp"
    # Root QEMU's socket, made with the umask the README gives (or the usual 022).
    listener = subprocess.Popen(
        ["sh", "-c", f'umask {umask}; exec socat -u "UNIX-LISTEN:{qmp}" OPEN:/dev/null'],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while not qmp.exists():
            assert listener.poll() is None and time.monotonic() < deadline, "no socket"
            time.sleep(0.01)
        assert qmp.stat().st_gid == MIGRELAY_GID  # the directory's setgid bit
        result = connects_as_unit_user(qmp)
        assert (result.returncode == 0) is reachable, result.stderr
        if not reachable:
            assert "Permission denied" in result.stderr, result.stderr
        # Nobody but root may put a socket there, the group included.
        planted = subprocess.run(
            ["setpriv", f"--reuid={UNIT_UID}", f"--regid={UNIT_UID}",
             f"--groups={MIGRELAY_GID}", "socat", "-u",
             f"UNIX-LISTEN:{run_dir / 'vm2.qmp'}", "OPEN:/dev/null"],
            capture_output=True, text=True, timeout=STEP_TIMEOUT_S, check=False,
        )  # fmt: skip
        assert planted.returncode != 0 and "Permission denied" in planted.stderr
    finally:
        listener.kill()
        listener.wait()


#: A stand-in for a destination QEMU that runs as another user (``libvirt-qemu``).
QEMU_UID = 47_125


def test_another_users_qemu_makes_sockets_the_unit_reaches_in_the_readmes_vms_directory(
    sock_dir: Path, migrelay_procs: MigrelayProcesses
) -> None:
    # "Only where destination QEMU runs as another user ...": /run/migrelay as the
    # tmpfiles line makes it, /run/migrelay/vms inside it as the README's second line
    # makes it; that user, in the group, creates its socket there with umask 007, the
    # unit's user (also in the group) connects to it, and serve takes the directory as
    # its target-dir (sticky, so a shared directory is allowed).
    readme = README.read_text(encoding="utf-8")
    (line,) = re.findall(r"add the line `(d /run/migrelay/vms \S+ \S+ \S+ -)` to\s+`", readme)
    kind, path, mode, user, group, _ = line.split()
    assert (kind, path, user, group) == ("d", "/run/migrelay/vms", "root", "migrelay")
    assert "usermod -aG migrelay libvirt-qemu" in readme
    assert 'socket-owner = ["libvirt-qemu"]' in readme
    (steps,) = fenced_blocks("**The systemd unit.**", "sh")
    outer = re.search(r"echo '(d /run/migrelay \S+ \S+ \S+ -)' > /etc/tmpfiles\.d/", steps)
    assert outer is not None, steps
    run_dir, vms = sock_dir / "run-migrelay", sock_dir / "run-migrelay" / "vms"
    for directory, directory_mode in ((run_dir, outer.group(1).split()[2]), (vms, mode)):
        directory.mkdir()
        os.chown(directory, 0, MIGRELAY_GID)
        directory.chmod(int(directory_mode, 8))
    sock_dir.chmod(0o755)
    qmp = vms / "vm1.qmp"
    listener = subprocess.Popen(
        ["setpriv", f"--reuid={QEMU_UID}", f"--regid={QEMU_UID}", f"--groups={MIGRELAY_GID}",
         "sh", "-c", f'umask 007; exec socat -u "UNIX-LISTEN:{qmp}" OPEN:/dev/null'],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + STEP_TIMEOUT_S
        while not qmp.exists():
            assert listener.poll() is None, "that user could not create its socket there"
            assert time.monotonic() < deadline, "no socket"
            time.sleep(0.01)
        assert (qmp.stat().st_uid, qmp.stat().st_gid) == (QEMU_UID, MIGRELAY_GID)
        result = connects_as_unit_user(qmp)
        assert result.returncode == 0, result.stderr
    finally:
        listener.kill()
        listener.wait()
    # serve takes the directory (a group-writable one without the sticky bit it refuses).
    migrelay_procs.serve("--target-dir", str(vms), "--qmp-dir", str(vms))
