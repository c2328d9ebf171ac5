"""``virsh migrate`` between two namespaced libvirt daemons through migrelay (issue 16).

As the README's libvirt walkthrough runs it: in the destination host's namespace,
``migrelay serve --target-map`` maps ``/libvirt`` to the daemon's own socket (a
privileged target: only a token that names it opens it), ``/migrate`` and ``/nbd`` to
the sockets libvirt names in ``--migrateuri`` and ``--disks-uri``; in the source host's,
one ``migrelay connect URL --map NAME=PATH ... --once`` offers the three at the same
paths and exits once the migration has ended. Only loopback carries the WebSockets;
the client's token lists the three targets.

Besides each `CASES` form over ``ws://``: all of them at once over ``wss://``; an
any-target token refused for ``/libvirt`` (the migration fails, the domain stays on the
source); and ``serve`` killed mid-migration: ``virsh migrate`` fails, the source domain
is still there, and a retry through a restarted ``serve`` moves it.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import FACTOR
from tests.libvirt.harness import (
    CASES,
    DAEMON_SOCKET,
    LIBVIRT_SOCKET,
    MIGRATION_SOCKET,
    MIGRATION_TIMEOUT_S,
    NBD_SOCKET,
    TIMINGS,
    LibvirtHost,
    MigrationCase,
    check_arrived,
    migrate_command,
    prepare_domain,
    run_case,
)
from tests.pki import make_pki
from tests.processes import MigrelayProcess, MigrelayProcesses

pytestmark = pytest.mark.e2e

#: The client's token, limited to the three targets; and one for any target.
TOKEN = "7f3c9a1e5b2d4f6a8c0e1b3d5f7a9c2e"
ANY_TARGET_TOKEN = "0d2f4b6a8c1e3a5c7e9b0d2f4a6c8e1b"
#: serve's token file, as the README's walkthrough writes it.
SERVE_TOKENS = f"""\
{TOKEN} libvirt,migrate,nbd name=host-a
{ANY_TARGET_TOKEN} name=any-target
"""
#: serve's targets: libvirt's own socket (privileged by its name), and the two sockets
#: libvirt names, at the same paths on both hosts.
SERVE_MAP = (
    *("--target-map", f"libvirt={DAEMON_SOCKET}"),
    *("--target-map", f"migrate={MIGRATION_SOCKET}"),
    *("--target-map", f"nbd={NBD_SOCKET}"),
)
#: connect's sockets, each to its target.
CONNECT_MAP = (
    *("--map", f"libvirt={LIBVIRT_SOCKET}"),
    *("--map", f"migrate={MIGRATION_SOCKET}"),
    *("--map", f"nbd={NBD_SOCKET}"),
)
#: Until ``connect --once`` has exited after the migration ended.
ONCE_EXIT_S = 10.0 * FACTOR
#: Until the destination daemon has dropped the domain of a failed incoming migration.
CLEANUP_S = 30.0 * FACTOR
#: ``virsh migrate --bandwidth`` (MiB/s) of the migration the fault interrupts: 64 MiB
#: take 8 s, time enough to kill serve in the middle.
SLOW_MIB_S = 8

#: serve's line for each channel it connected to a target.
_OPENED = re.compile(r"channel (\w+)/(\d+) opened: .* \(target ([\w.-]+)(?:, token [^)]+)?\)")


@dataclass
class Relays:
    serve: MigrelayProcess
    connect: MigrelayProcess


@pytest.fixture
def token_files(sock_dir: Path) -> Path:
    """A directory (seen alike by both hosts) with ``serve-tokens``, ``token`` (the
    client's: `TOKEN`) and ``any-token``."""
    (sock_dir / "serve-tokens").write_text(SERVE_TOKENS, encoding="ascii")
    (sock_dir / "token").write_text(f"{TOKEN}\n", encoding="ascii")
    (sock_dir / "any-token").write_text(f"{ANY_TARGET_TOKEN}\n", encoding="ascii")
    for path in sock_dir.iterdir():
        path.chmod(0o600)
    return sock_dir


def start_relays(
    procs: MigrelayProcesses,
    src: LibvirtHost,
    dst: LibvirtHost,
    tokens: Path,
    *,
    token: str = "token",
    tls: bool = False,
) -> Relays:
    """serve in ``dst``'s namespace and one ``connect --once`` in ``src``'s, listening."""
    tls_serve: tuple[str, ...] = ()
    tls_connect: tuple[str, ...] = ()
    if tls:
        pki = make_pki(tokens / f"pki-{len(procs.processes)}")
        tls_serve = ("--tls-cert", str(pki.cert), "--tls-key", str(pki.key))
        tls_connect = ("--ca", str(pki.ca))
    serve = procs.serve(
        *SERVE_MAP,
        "--token-file",
        str(tokens / "serve-tokens"),
        *tls_serve,
        prefix=dst.nsenter(),
    )
    url = f"{'wss' if tls else 'ws'}://127.0.0.1:{serve.port}"
    connect = procs.start(
        "connect",
        url,
        *CONNECT_MAP,
        "--token-file",
        str(tokens / token),
        *tls_connect,
        "--once",
        prefix=src.nsenter(),
    )
    for socket in (LIBVIRT_SOCKET, MIGRATION_SOCKET, NBD_SOCKET):
        connect.wait_for_log(f"listening on {re.escape(socket)}")
    return Relays(serve, connect)


def expected_channels(case: MigrationCase) -> dict[str, int]:
    """The channels each target carries in ``case``: libvirt's RPC with ``--p2p`` (one
    connection of the source daemon), the disk's NBD connection, QEMU's main channel and
    one per ``--parallel-connections``."""
    channels = {"migrate": 1}
    if case.p2p:
        channels["libvirt"] = 1
    if case.disk:
        channels["nbd"] = 1
    if "--parallel" in case.flags:
        channels["migrate"] += int(case.flags[case.flags.index("--parallel-connections") + 1])
    return channels


def carried(serve: MigrelayProcess) -> dict[str, int]:
    """The channels serve connected, per target."""
    counts: dict[str, int] = {}
    for _session, _channel, target in _OPENED.findall(serve.log()):
        counts[target] = counts.get(target, 0) + 1
    return counts


def migrate_through(
    relays: Relays, src: LibvirtHost, dst: LibvirtHost, case: MigrationCase
) -> float:
    """Run ``case`` through ``relays``; check what serve carried and that connect --once
    ended with the migration; return virsh migrate's wall time."""
    elapsed = run_case(src, dst, case, f"relay-{case.name}", seed=16)
    # connect --once ends when the migration has: every socket's sessions are over.
    assert relays.connect.wait(ONCE_EXIT_S) == 0, relays.connect.log()
    # Everything went through serve: each target's channels, and nothing else.
    assert carried(relays.serve) == expected_channels(case), relays.serve.log()
    return elapsed


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_virsh_migrate_through_migrelay_moves_ram_and_disk(
    case: MigrationCase,
    libvirt_hosts: tuple[LibvirtHost, LibvirtHost],
    migrelay_procs: MigrelayProcesses,
    token_files: Path,
) -> None:
    src, dst = libvirt_hosts
    relays = start_relays(migrelay_procs, src, dst, token_files)
    TIMINGS.append(("migrelay", case.name, migrate_through(relays, src, dst, case)))


#: Every form at once, over wss://.
WSS_CASE = MigrationCase(
    "wss-all",
    p2p=True,
    flags=("--copy-storage-all", "--parallel", "--parallel-connections", "2"),
    disk=True,
)


def test_virsh_migrate_over_wss_with_a_token_limited_to_the_targets(
    libvirt_hosts: tuple[LibvirtHost, LibvirtHost],
    migrelay_procs: MigrelayProcesses,
    token_files: Path,
) -> None:
    src, dst = libvirt_hosts
    relays = start_relays(migrelay_procs, src, dst, token_files, tls=True)
    assert "listening on wss://" in relays.serve.log()
    TIMINGS.append(("wss", WSS_CASE.name, migrate_through(relays, src, dst, WSS_CASE)))
    assert "token host-a" in relays.serve.log()


def test_an_any_target_token_is_refused_for_the_libvirt_socket(
    libvirt_hosts: tuple[LibvirtHost, LibvirtHost],
    migrelay_procs: MigrelayProcesses,
    token_files: Path,
) -> None:
    src, dst = libvirt_hosts
    relays = start_relays(migrelay_procs, src, dst, token_files, token="any-token")
    case = MigrationCase("p2p", p2p=True)
    domain = "refused-p2p"
    prepare_domain(src, dst, case, domain, seed=17)
    result = src.virsh(*migrate_command(case, domain, dst), check=False)
    assert result.returncode != 0, result.stdout
    assert src.domain_state(domain) == "paused"
    assert dst.domain_state(domain) is None
    log = relays.serve.log()
    refusals = [line for line in log.splitlines() if "refused" in line]
    assert len(refusals) >= 1, log
    assert all(": 403 " in line for line in refusals), log
    assert "/libvirt is privileged and token any-target does not name it" in refusals[0], log
    assert carried(relays.serve) == {}, log


def test_serve_killed_mid_migration_fails_it_and_a_retry_moves_the_domain(
    libvirt_hosts: tuple[LibvirtHost, LibvirtHost],
    migrelay_procs: MigrelayProcesses,
    token_files: Path,
) -> None:
    src, dst = libvirt_hosts
    case = MigrationCase("p2p", p2p=True)
    domain = "fault-p2p"
    expected_ram = prepare_domain(src, dst, case, domain, seed=18)
    relays = start_relays(migrelay_procs, src, dst, token_files)
    slow = [*migrate_command(case, domain, dst), "--bandwidth", str(SLOW_MIB_S)]
    with subprocess.Popen(
        ["virsh", "-q", "-c", src.uri, *slow],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as migration:
        relays.serve.wait_for_log(r"opened: .* \(target migrate", timeout=MIGRATION_TIMEOUT_S)
        time.sleep(1.0)  # a second of the 8 s stream
        relays.serve.popen.kill()
        _, stderr = migration.communicate(timeout=MIGRATION_TIMEOUT_S)
    assert migration.returncode != 0, "virsh migrate succeeded without its relay"
    assert stderr.strip(), "virsh migrate failed without a message"
    # The source domain is still there, as it was; the destination dropped its copy.
    assert src.domain_state(domain) == "paused", src.logs()
    deadline = time.monotonic() + CLEANUP_S
    while dst.domain_state(domain) is not None:
        assert time.monotonic() < deadline, f"{domain} still on the destination\n{dst.logs()}"
        time.sleep(0.1)
    # The source relay saw its sessions fail: --once ends, with status 1.
    assert relays.connect.wait(ONCE_EXIT_S) == 1, relays.connect.log()
    # A retry through a restarted serve (and connect) moves the domain.
    retry = start_relays(migrelay_procs, src, dst, token_files)
    src.virsh(*migrate_command(case, domain, dst), timeout=MIGRATION_TIMEOUT_S)
    check_arrived(src, dst, case, domain, expected_ram)
    assert retry.connect.wait(ONCE_EXIT_S) == 0, retry.connect.log()
    assert carried(retry.serve) == expected_channels(case), retry.serve.log()
