"""Real QEMU migrations through ``serve``/``connect`` set up as on production hosts.

wss:// with a CA and with a pinned fingerprint, mTLS, Debian's nginx as a TLS-terminating
reverse proxy with a path prefix, tinyproxy as the HTTP CONNECT proxy, SIGTERM during a
migration, and ``/metrics`` after one. Every completed migration ends with the
destination's RAM equal to the source's byte for byte; every refused one with the
source VM where it was.

nginx and tinyproxy are installed by ``tools/setup``; these tests never skip when they
are missing. Each runs in the foreground with its config, pid and logs in the test's
directory, and is killed at teardown.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect as ws_connect
from websockets.typing import Subprotocol

from migrelay.control.migration import (
    MigrationOptions,
    prepare_incoming,
    start_migration,
    wait_destination_completed,
)
from migrelay.control.qmp import QMP, MigrationStatus
from migrelay.lab.vm import first_difference
from tests.e2e.cli_helpers import Commands, check_migrated, serve_qmp_dir
from tests.e2e.vms import VMPairFactory
from tests.helpers import FACTOR
from tests.loops import AsyncRunner
from tests.pki import PKI, SERVER_NAMES, issue, make_pki
from tests.processes import MigrelayProcess, MigrelayProcesses

pytestmark = pytest.mark.e2e

MIGRATION_TIMEOUT_S = 120.0 * FACTOR
RAM_BYTES = 32 << 20
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
TINYPROXY = shutil.which("tinyproxy") or "/usr/bin/tinyproxy"
DAEMON_START_S = 10.0 * FACTOR


# -- certificates ------------------------------------------------------------------------


@pytest.fixture
def pki(sock_dir: Path) -> PKI:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate."""
    return make_pki(sock_dir / "pki")


# -- daemons -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_port(port: int, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + DAEMON_START_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{process.args!r} exited: {log.read_text(errors='replace')}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=FACTOR).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"{process.args!r} did not listen on {port}")


@pytest.fixture
def daemons() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Foreground daemons a test starts; killed and reaped at teardown."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        for process in started:
            process.kill()
            process.wait()


def start_nginx(
    sock_dir: Path, daemons: list[subprocess.Popen[bytes]], pki: PKI, upstream: int
) -> int:
    """nginx terminating TLS and proxying ``/migrelay/`` to ``serve`` on ``upstream``."""
    directory = sock_dir / "nginx"
    directory.mkdir()
    port = _free_port()
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
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {pki.cert};
        ssl_certificate_key {pki.key};
        location /migrelay/ {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection "upgrade";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_buffering off;
            proxy_read_timeout 1h;
            proxy_send_timeout 1h;
        }}
    }}
}}
""")
    log = directory / "stderr.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [NGINX, "-p", str(directory), "-c", str(config), "-e", str(directory / "error.log")],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    daemons.append(process)
    _wait_port(port, process, directory / "error.log")
    return port


def start_tinyproxy(sock_dir: Path, daemons: list[subprocess.Popen[bytes]], upstream: int) -> int:
    """tinyproxy allowing CONNECT from loopback to ``upstream`` only."""
    directory = sock_dir / "tinyproxy"
    directory.mkdir()
    port = _free_port()
    config = directory / "tinyproxy.conf"
    config.write_text(f"""
Port {port}
Listen 127.0.0.1
Timeout 600
MaxClients 32
Allow 127.0.0.1
ConnectPort {upstream}
LogFile "{directory}/tinyproxy.log"
PidFile "{directory}/tinyproxy.pid"
LogLevel Info
""")
    log = directory / "stderr.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [TINYPROXY, "-d", "-c", str(config)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    daemons.append(process)
    _wait_port(port, process, log)
    return port


# -- migrations ------------------------------------------------------------------------


async def migrate(
    vm_pair: VMPairFactory,
    sock_dir: Path,
    options: MigrationOptions | None = None,
    during: Callable[[QMP], Awaitable[None]] | None = None,
) -> None:
    """Migrate a fresh VM pair through ``sock_dir/source.sock``; check the RAM."""
    options = options or MigrationOptions()
    async with vm_pair(RAM_BYTES) as (src, dst), QMP("src") as sq, QMP("dst") as dq:
        await sq.connect(str(src.qmp_path))
        await dq.connect(str(dst.qmp_path))
        await prepare_incoming(dq, f"unix:{sock_dir / 'dest.sock'}", options)
        await start_migration(sq, f"unix:{sock_dir / 'source.sock'}", options)
        if during is not None:
            await during(sq)
        final = await wait_destination_completed(dq, MIGRATION_TIMEOUT_S)
        assert final.status is MigrationStatus.COMPLETED
        assert (await sq.query_migrate()).status is MigrationStatus.COMPLETED
        await sq.quit()
        await dq.quit()
        assert await src.wait(30 * FACTOR) == 0
        assert await dst.wait(30 * FACTOR) == 0
        assert first_difference(src.ram_path, dst.ram_path) is None


async def migration_fails(vm_pair: VMPairFactory, sock_dir: Path) -> None:
    """Start a migration that the relays cannot carry; the source VM stays as it was."""
    options = MigrationOptions()
    async with vm_pair(RAM_BYTES) as (src, dst), QMP("src") as sq, QMP("dst") as dq:
        await sq.connect(str(src.qmp_path))
        await dq.connect(str(dst.qmp_path))
        before = await sq.query_status()
        await prepare_incoming(dq, f"unix:{sock_dir / 'dest.sock'}", options)
        await start_migration(sq, f"unix:{sock_dir / 'source.sock'}", options)
        deadline = time.monotonic() + MIGRATION_TIMEOUT_S
        while (status := (await sq.query_migrate()).status) is not MigrationStatus.FAILED:
            assert status is not MigrationStatus.COMPLETED
            assert time.monotonic() < deadline, "the migration neither failed nor completed"
            await asyncio.sleep(0.05)
        assert await sq.query_status() == before
        assert src.running


def serve(procs: MigrelayProcesses, sock_dir: Path, *args: str) -> MigrelayProcess:
    return procs.serve("--target", str(sock_dir / "dest.sock"), *args)


def connect(
    procs: MigrelayProcesses,
    sock_dir: Path,
    url: str,
    *args: str,
    env: dict[str, str] | None = None,
) -> MigrelayProcess:
    return procs.connect(url, sock_dir / "source.sock", *args, env=env)


def assert_channels_completed(*relays: MigrelayProcess) -> None:
    for relay in relays:
        relay.wait_for_log(r"channel \S+ closed: ended by the ")
        closed = [line for line in relay.log().splitlines() if " closed: " in line]
        assert closed and all("close code 1000 normal" in line for line in closed), relay.log()


# -- TLS -------------------------------------------------------------------------------


def test_wss_with_ca_carries_a_migration_intact(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    migrelay_procs: MigrelayProcesses,
    sock_dir: Path,
    pki: PKI,
) -> None:
    server = serve(
        migrelay_procs, sock_dir, "--tls-cert", str(pki.cert), "--tls-key", str(pki.key)
    )
    assert "listening on wss://" in server.log()
    client = connect(
        migrelay_procs, sock_dir, f"wss://localhost:{server.port}/", "--ca", str(pki.ca)
    )
    run_e2e(migrate(vm_pair, sock_dir))
    assert_channels_completed(server, client)


def test_wss_with_pinned_fingerprint_carries_a_migration_intact(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    migrelay_procs: MigrelayProcesses,
    sock_dir: Path,
    pki: PKI,
) -> None:
    server = serve(
        migrelay_procs, sock_dir, "--tls-cert", str(pki.cert), "--tls-key", str(pki.key)
    )
    # No CA at all: the pin alone vouches for the server.
    client = connect(
        migrelay_procs,
        sock_dir,
        f"wss://127.0.0.1:{server.port}/",
        "--fingerprint",
        pki.fingerprint(),
    )
    run_e2e(migrate(vm_pair, sock_dir, MigrationOptions(multifd_channels=2)))
    assert_channels_completed(server, client)


def test_wrong_fingerprint_is_refused_in_one_line_and_source_vm_stays(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    migrelay_procs: MigrelayProcesses,
    sock_dir: Path,
    pki: PKI,
) -> None:
    server = serve(
        migrelay_procs, sock_dir, "--tls-cert", str(pki.cert), "--tls-key", str(pki.key)
    )
    wrong = ":".join(["AB"] * 32)
    client = connect(
        migrelay_procs, sock_dir, f"wss://127.0.0.1:{server.port}/", "--fingerprint", wrong
    )
    run_e2e(migration_fails(vm_pair, sock_dir))
    errors = [line for line in client.log().splitlines() if " ERROR " in line]
    assert len(errors) == 1, client.log()
    assert "does not match the pinned fingerprint" in errors[0]
    assert " opened: " not in server.log()


def test_mtls_refuses_a_client_without_certificate_and_carries_one_with(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    migrelay_procs: MigrelayProcesses,
    sock_dir: Path,
    pki: PKI,
) -> None:
    server = serve(
        migrelay_procs,
        sock_dir,
        *("--tls-cert", str(pki.cert), "--tls-key", str(pki.key), "--client-ca", str(pki.ca)),
    )
    url = f"wss://127.0.0.1:{server.port}/"
    anonymous = connect(migrelay_procs, sock_dir, url, "--ca", str(pki.ca), "--once")
    run_e2e(migration_fails(vm_pair, sock_dir))
    anonymous.wait()
    assert "cannot open websocket" in anonymous.log(), anonymous.log()
    assert " opened: " not in server.log()
    anonymous.stop()

    client = connect(
        migrelay_procs,
        sock_dir,
        url,
        *(
            "--ca",
            str(pki.ca),
            "--tls-cert",
            str(pki.client_cert),
            "--tls-key",
            str(pki.client_key),
        ),
    )
    run_e2e(migrate(vm_pair, sock_dir))
    assert_channels_completed(server, client)


# -- proxies -----------------------------------------------------------------------------


def test_nginx_terminating_tls_under_a_path_prefix_carries_a_migration_intact(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    migrelay_procs: MigrelayProcesses,
    sock_dir: Path,
    pki: PKI,
    daemons: list[subprocess.Popen[bytes]],
) -> None:
    server = serve(
        migrelay_procs, sock_dir, "--path-prefix", "/migrelay", "--trusted-proxy", "127.0.0.1"
    )
    assert server.port is not None
    nginx_port = start_nginx(sock_dir, daemons, pki, server.port)
    client = connect(
        migrelay_procs,
        sock_dir,
        f"wss://localhost:{nginx_port}/migrelay/",
        "--ca",
        str(pki.ca),
    )
    run_e2e(migrate(vm_pair, sock_dir, MigrationOptions(multifd_channels=2)))
    assert_channels_completed(server, client)
    opened = [line for line in server.log().splitlines() if " opened: " in line]
    # nginx's X-Forwarded-For, trusted from 127.0.0.1, names the client in the log.
    assert len(opened) == 3 and all(" via 127.0.0.1:" in line for line in opened), server.log()


def test_connect_through_tinyproxy_carries_a_migration_intact(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    migrelay_procs: MigrelayProcesses,
    sock_dir: Path,
    daemons: list[subprocess.Popen[bytes]],
    pki: PKI,
) -> None:
    token_file = sock_dir / "tokens"
    token_file.write_text("proxy-test-token /\n")
    server = serve(
        migrelay_procs,
        sock_dir,
        *("--token-file", str(token_file)),
        *("--tls-cert", str(pki.cert), "--tls-key", str(pki.key)),
    )
    assert server.port is not None
    proxy_port = start_tinyproxy(sock_dir, daemons, server.port)
    proxy = f"http://127.0.0.1:{proxy_port}"
    # With ws:// the proxy would read the token (and guest RAM): refused, in one line.
    refused = subprocess.run(
        [
            sys.executable,
            "-m",
            "migrelay",
            "connect",
            f"ws://127.0.0.1:{server.port}/",
            "--listen-unix",
            str(sock_dir / "never.sock"),
            "--token-file",
            str(token_file),
            "--proxy",
            proxy,
        ],
        capture_output=True,
        text=True,
        timeout=30 * FACTOR,
        check=False,
    )
    assert refused.returncode != 0
    assert refused.stderr.count("\n") == 1 and "use wss://" in refused.stderr, refused.stderr
    client = connect(
        migrelay_procs,
        sock_dir,
        f"wss://localhost:{server.port}/",
        *("--token-file", str(token_file), "--proxy", proxy, "--ca", str(pki.ca)),
    )
    run_e2e(migrate(vm_pair, sock_dir))
    assert_channels_completed(server, client)
    proxy_log = (sock_dir / "tinyproxy" / "tinyproxy.log").read_text(errors="replace")
    # The one channel went through the proxy: one CONNECT, to serve's port.
    assert proxy_log.count(f"CONNECT localhost:{server.port} HTTP/1.1") == 1, proxy_log
    assert "proxy-test-token" not in server.log() + client.log() + proxy_log


def test_connect_follows_https_proxy_and_trusts_the_system_store_by_default(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    migrelay_procs: MigrelayProcesses,
    sock_dir: Path,
    daemons: list[subprocess.Popen[bytes]],
    pki: PKI,
) -> None:
    # No --ca and no --proxy: what a host's environment provides. SSL_CERT_FILE stands in
    # for the system trust store (OpenSSL reads its default CA file from it).
    server = serve(
        migrelay_procs, sock_dir, "--tls-cert", str(pki.cert), "--tls-key", str(pki.key)
    )
    assert server.port is not None
    proxy_port = start_tinyproxy(sock_dir, daemons, server.port)
    environment = {"SSL_CERT_FILE": str(pki.ca), "https_proxy": f"http://127.0.0.1:{proxy_port}"}
    client = connect(migrelay_procs, sock_dir, f"wss://localhost:{server.port}/", env=environment)
    run_e2e(migrate(vm_pair, sock_dir))
    assert_channels_completed(server, client)
    proxy_log = (sock_dir / "tinyproxy" / "tinyproxy.log").read_text(errors="replace")
    assert proxy_log.count(f"CONNECT localhost:{server.port} HTTP/1.1") == 1, proxy_log
    client.stop()
    # The same without the CA in the trust store: refused before a byte of the VM moves.
    untrusting = connect(
        migrelay_procs, sock_dir, f"wss://localhost:{server.port}/",
        env={"SSL_CERT_FILE": str(pki.other_ca), "no_proxy": "localhost"},
    )  # fmt: skip
    run_e2e(migration_fails(vm_pair, sock_dir))
    assert "certificate verify failed" in untrusting.log(), untrusting.log()


def test_migrate_to_through_tinyproxy_over_wss_needs_no_other_command(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    migrelay_procs: MigrelayProcesses,
    sock_dir: Path,
    daemons: list[subprocess.Popen[bytes]],
    pki: PKI,
) -> None:
    # The two-command form from behind a corporate proxy: serve prepares the destination
    # itself (--qmp-dir), migrate --to runs the source relay in-process via --proxy.
    server = serve_qmp_dir(
        migrelay_procs, sock_dir, "--tls-cert", str(pki.cert), "--tls-key", str(pki.key)
    )
    assert server.port is not None
    proxy_port = start_tinyproxy(sock_dir, daemons, server.port)

    async def main() -> None:
        async with vm_pair(RAM_BYTES) as (src, dst):
            migrate = Commands(sock_dir).start(
                *("migrate", "--qmp", str(src.qmp_path), "--json"),
                *("--to", f"wss://localhost:{server.port}/{dst.name}", "--ca", str(pki.ca)),
                *("--proxy", f"http://127.0.0.1:{proxy_port}"),
            )
            try:
                assert await migrate.wait() == 0, migrate.describe()
            finally:
                migrate.stop()
            assert '"status": "completed"' in migrate.stdout(), migrate.describe()
            await check_migrated(src, dst)

    run_e2e(main())
    proxy_log = (sock_dir / "tinyproxy" / "tinyproxy.log").read_text(errors="replace")
    assert proxy_log.count(f"CONNECT localhost:{server.port} HTTP/1.1") == 1, proxy_log


# -- service operation -------------------------------------------------------------------


def test_sigterm_during_a_migration_lets_it_complete(
    run_e2e: AsyncRunner, vm_pair: VMPairFactory, migrelay_procs: MigrelayProcesses, sock_dir: Path
) -> None:
    server = serve(migrelay_procs, sock_dir, "--shutdown-timeout", "60")
    connect(migrelay_procs, sock_dir, f"{server.url}/")

    async def terminate_serve(source: QMP) -> None:
        # The migration is under way once serve has opened its channel.
        await asyncio.to_thread(server.wait_for_log, " opened: ")
        assert (await source.query_migrate()).status is MigrationStatus.ACTIVE
        server.popen.terminate()
        await asyncio.sleep(0.3)
        assert server.popen.poll() is None, "serve exited while the migration ran"

    # 32 MiB at 8 MiB/s: about four seconds of migration to send SIGTERM into.
    slow = MigrationOptions(max_bandwidth=8 << 20)
    run_e2e(migrate(vm_pair, sock_dir, slow, during=terminate_serve))
    assert server.wait(10 * FACTOR) == 0
    log = server.log()
    assert "shutting down" in log and "closed: ended by the " in log, log
    assert "4004" not in log


def _presented_certificate(port: int) -> bytes:
    """The DER certificate that serve presents now (verification is not the point)."""
    return ssl.PEM_cert_to_DER_cert(ssl.get_server_certificate(("127.0.0.1", port)))


def _der(cert: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.read_text())


def _upgrade_status(port: int, ca: Path, token: str) -> int:
    """Status of a WebSocket upgrade to ``/`` with ``token``, by the websockets library."""
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with ws_connect(
            f"wss://localhost:{port}/",
            ssl=context,
            subprotocols=[Subprotocol("migrelay.v1")],
            additional_headers={"Authorization": f"Bearer {token}"},
            open_timeout=10 * FACTOR,
        ):
            return 101
    except InvalidStatus as exc:
        return exc.response.status_code


def _metrics_status(port: int, ca: Path, token: str | None) -> int:
    context = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(f"https://localhost:{port}/metrics")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10 * FACTOR, context=context) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_sighup_reloads_tokens_and_certificate_without_dropping_a_migration(
    run_e2e: AsyncRunner,
    vm_pair: VMPairFactory,
    migrelay_procs: MigrelayProcesses,
    sock_dir: Path,
    pki: PKI,
) -> None:
    # serve reads its certificate, tokens and metrics tokens from files that the test
    # replaces mid-migration, as certbot or a secrets manager would, then sends SIGHUP.
    live_cert, live_key = sock_dir / "live.pem", sock_dir / "live.key"
    shutil.copy(pki.cert, live_cert)
    shutil.copy(pki.key, live_key)
    tokens, metrics_tokens = sock_dir / "tokens", sock_dir / "metrics-tokens"
    tokens.write_text("old-token\n")
    metrics_tokens.write_text("old-scraper\n")
    renewed = issue(sock_dir / "pki", "renewed", (pki.ca, pki.ca_key), SERVER_NAMES)
    server = serve(
        migrelay_procs,
        sock_dir,
        *("--tls-cert", str(live_cert), "--tls-key", str(live_key)),
        *("--token-file", str(tokens), "--metrics-token-file", str(metrics_tokens)),
    )
    assert server.port is not None
    port = server.port
    connect(
        migrelay_procs,
        sock_dir,
        f"wss://localhost:{port}/",
        *("--ca", str(pki.ca), "--token-file", str(tokens)),
    )
    assert _presented_certificate(port) == _der(pki.cert)

    async def reload_mid_migration(source: QMP) -> None:
        await asyncio.to_thread(server.wait_for_log, " opened: ")
        shutil.copy(renewed[0], live_cert)
        shutil.copy(renewed[1], live_key)
        tokens.write_text("new-token\n")
        metrics_tokens.write_text("new-scraper\n")
        server.popen.send_signal(signal.SIGHUP)
        await asyncio.to_thread(server.wait_for_log, "reloaded tokens and certificates")
        assert (await source.query_migrate()).status is MigrationStatus.ACTIVE

    # 32 MiB at 8 MiB/s: about four seconds of migration to reload into.
    slow = MigrationOptions(max_bandwidth=8 << 20)
    run_e2e(migrate(vm_pair, sock_dir, slow, during=reload_mid_migration))
    assert_channels_completed(server)

    # New connections see the new certificate and the new tokens only.
    assert _presented_certificate(port) == _der(renewed[0])
    with socket.socket(socket.AF_UNIX) as destination:  # a target for the upgrades
        destination.bind(str(sock_dir / "dest.sock"))
        destination.listen()
        assert _upgrade_status(port, pki.ca, "old-token") == 403
        assert _upgrade_status(port, pki.ca, "new-token") == 101
        assert _metrics_status(port, pki.ca, None) == 401
        assert _metrics_status(port, pki.ca, "old-scraper") == 403
        assert _metrics_status(port, pki.ca, "new-scraper") == 200

        # A reload that cannot read its files changes nothing, and says so in one line.
        tokens.write_text("# every token removed by mistake\n")
        server.popen.send_signal(signal.SIGHUP)
        server.wait_for_log("reload failed, keeping the old settings: .* holds no token")
        assert _upgrade_status(port, pki.ca, "new-token") == 101
    assert server.popen.poll() is None
    assert "new-token" not in server.log() and "scraper" not in server.log()


def test_metrics_after_a_migration_show_the_bytes_it_moved(
    run_e2e: AsyncRunner, vm_pair: VMPairFactory, migrelay_procs: MigrelayProcesses, sock_dir: Path
) -> None:
    server = serve(migrelay_procs, sock_dir)
    connect(migrelay_procs, sock_dir, f"{server.url}/")
    run_e2e(migrate(vm_pair, sock_dir))
    server.wait_for_log(r"channel \S+ closed: ended by the ")
    url = f"http://{server.host}:{server.port}/metrics"
    with urllib.request.urlopen(url, timeout=10 * FACTOR) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    moved = re.search(
        r'^migrelay_bytes_total\{direction="to_destination",target="/"\} (\S+)$', text, re.M
    )
    assert moved is not None, text
    # The RAM and QEMU's own framing of it went through, and no more than a little extra.
    assert RAM_BYTES <= float(moved.group(1)) < RAM_BYTES * 1.1, text
    assert 'migrelay_channels_total{target="/"} 1.0' in text
    assert 'migrelay_sessions_total{token="-"} 1.0' in text
    assert "migrelay_handshake_seconds_count 1.0" in text
