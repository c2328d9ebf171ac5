"""``virsh migrate`` between two namespaced libvirt daemons through migrelay, with the
README's commands (issue 16).

The section "libvirt: ``virsh migrate`` through migrelay" is run as printed, each
substitution here with its reason:

* ``dst$ migrelay serve ...`` runs in the destination host's namespace and ``src$
  migrelay connect ... --once`` in the source's (`LibvirtHost.nsenter`): one machine
  plays both hosts. The ``mkdir`` is left out: the harness mounts
  ``/run/migrelay-libvirt`` of each host (`SOCKET_DIR`).
* ``--listen 0.0.0.0:8765`` becomes ``127.0.0.1:PORT`` (a free port), and
  ``wss://dst.example:8765`` ``wss://127.0.0.1:PORT`` (the test certificate's name).
* ``/etc/migrelay/{libvirt-tokens,cert.pem,key.pem,ca.pem}`` and
  ``~/.migrelay-libvirt-token`` become files of the test: the README's token line as
  printed (plus a second, any-target token, for the refusal case), a CA and a server
  certificate (`tests.pki`), the client's token.
* ``migrelay`` is this interpreter's ``python -m migrelay``.
* Each ``src$ virsh migrate`` line must be the harness's command of its case
  (`migrate_command`, in `CASES` order) for the domain ``vm1``; the test runs it with
  its own domain name and, without ``--p2p``, with the source's ``libvirt.sock`` as the
  test's namespace sees it (virsh runs there).

Besides each case: a token for any target refused for ``/libvirt`` (the migration
fails, the domain stays on the source), and ``serve`` killed mid-migration: ``virsh
migrate`` fails, the source domain is still there, and a retry through restarted relays
moves it.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.docs.test_readme_examples import README, code_blocks, commands_starting
from tests.helpers import FACTOR
from tests.libvirt.harness import (
    CASES,
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
    rpc_socket_for,
    run_case,
)
from tests.pki import make_pki
from tests.processes import MigrelayProcess, MigrelayProcesses

pytestmark = pytest.mark.e2e

#: How the README's serve line of the libvirt section begins (not the walkthrough's).
SERVE_FLAGS = "--listen 0.0.0.0:8765 --token-file /etc/migrelay/libvirt-tokens"
#: The README's token line starts with this (its secret).
README_TOKEN = "7f3c9a1e5b2d4f6a8c0e1b3d5f7a9c2e"
#: A token for any target, which must not open ``/libvirt``.
ANY_TARGET_TOKEN = "0d2f4b6a8c1e3a5c7e9b0d2f4a6c8e1b"
#: Until ``connect --once`` has exited after the migration ended.
ONCE_EXIT_S = 10.0 * FACTOR
#: Until the destination daemon has dropped the domain of a failed incoming migration.
CLEANUP_S = 30.0 * FACTOR
#: ``virsh migrate --bandwidth`` (MiB/s) of the migration the fault interrupts: 64 MiB
#: take 8 s, time enough to kill serve in the middle.
SLOW_MIB_S = 8

#: serve's line for each channel it connected to a target.
_OPENED = re.compile(r"channel (\w+)/(\d+) opened: .* \(target ([\w.-]+)(?:, token [^)]+)?\)")


def readme_commands(start: str) -> list[list[str]]:
    """The README's commands that start with ``start``, split as the shell would, without
    the ``src$ `` or ``dst$ `` prompt."""
    blocks = code_blocks(README.read_text(encoding="utf-8"))
    return [shlex.split(command)[1:] for command in commands_starting(blocks, start)]


def readme_token_line() -> str:
    """The token line of serve's token file, as the README prints it."""
    blocks = code_blocks(README.read_text(encoding="utf-8"))
    found = [b.text for b in blocks if b.lines and b.lines[0].startswith(README_TOKEN)]
    assert len(found) == 1, f"README blocks with the libvirt token line: {len(found)}"
    return found[0]


@pytest.fixture
def token_files(sock_dir: Path) -> Path:
    """A directory (seen alike by both hosts) with ``serve-tokens`` (the README's line
    and an any-target one), ``token`` (the client's) and ``any-token``."""
    serve_tokens = readme_token_line() + f"{ANY_TARGET_TOKEN} name=any-target\n"
    (sock_dir / "serve-tokens").write_text(serve_tokens, encoding="ascii")
    (sock_dir / "token").write_text(f"{README_TOKEN}\n", encoding="ascii")
    (sock_dir / "any-token").write_text(f"{ANY_TARGET_TOKEN}\n", encoding="ascii")
    for path in sock_dir.iterdir():
        path.chmod(0o600)
    return sock_dir


@dataclass
class Relays:
    serve: MigrelayProcess
    connect: MigrelayProcess


def start_relays(
    procs: MigrelayProcesses,
    src: LibvirtHost,
    dst: LibvirtHost,
    tokens: Path,
    *,
    token: str = "token",
) -> Relays:
    """The README's serve in ``dst``'s namespace and its ``connect --once`` in ``src``'s,
    listening (substitutions: the module docstring)."""
    pki = make_pki(tokens / f"pki-{len(procs.processes)}")
    files = {
        "/etc/migrelay/libvirt-tokens": str(tokens / "serve-tokens"),
        "/etc/migrelay/cert.pem": str(pki.cert),
        "/etc/migrelay/key.pem": str(pki.key),
        "/etc/migrelay/ca.pem": str(pki.ca),
        "~/.migrelay-libvirt-token": str(tokens / token),
    }
    [serve_command] = readme_commands(
        "dst$ migrelay serve --listen 0.0.0.0:8765 --token-file /etc/migrelay/libvirt-"
    )
    assert serve_command[:4] == ["migrelay", "serve", "--listen", "0.0.0.0:8765"], serve_command
    serve = procs.serve(*[files.get(arg, arg) for arg in serve_command[4:]], prefix=dst.nsenter())
    [connect_command] = readme_commands("src$ migrelay connect wss://dst.example:8765 ")
    assert connect_command[:3] == ["migrelay", "connect", "wss://dst.example:8765"]
    url = f"wss://127.0.0.1:{serve.port}"
    connect_args = [files.get(arg, arg) for arg in connect_command[3:]]
    connect = procs.start("connect", url, *connect_args, prefix=src.nsenter())
    for socket in (LIBVIRT_SOCKET, MIGRATION_SOCKET, NBD_SOCKET):
        connect.wait_for_log(f"listening on {re.escape(socket)}")
    return Relays(serve, connect)


def expected_channels(case: MigrationCase) -> dict[str, int]:
    """The channels each target carries in ``case``: libvirt's RPC (one connection, of
    the source daemon with ``--p2p``, else of virsh), the disk's NBD connection, QEMU's
    main channel and one per ``--parallel-connections``."""
    channels = {"libvirt": 1, "migrate": 1}
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


def readme_virsh_command(case: MigrationCase) -> list[str]:
    """The README's ``virsh migrate`` line of ``case`` (they are printed in `CASES` order)."""
    commands = readme_commands("src$ virsh migrate")
    assert len(commands) == len(CASES), commands
    return commands[CASES.index(case)]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_virsh_migrate_through_migrelay_moves_ram_and_disk(
    case: MigrationCase,
    libvirt_hosts: tuple[LibvirtHost, LibvirtHost],
    migrelay_procs: MigrelayProcesses,
    token_files: Path,
) -> None:
    # The README's line is the command the test runs (for another domain name).
    assert readme_virsh_command(case) == ["virsh", *migrate_command(case, "vm1", LIBVIRT_SOCKET)]
    src, dst = libvirt_hosts
    relays = start_relays(migrelay_procs, src, dst, token_files)
    assert "listening on wss://" in relays.serve.log()
    TIMINGS.append(("migrelay", case.name, migrate_through(relays, src, dst, case)))
    assert "token src-example" in relays.serve.log()


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
    command = migrate_command(case, domain, rpc_socket_for(case, src))
    result = src.virsh(*command, check=False)
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
    slow = [
        *migrate_command(case, domain, rpc_socket_for(case, src)),
        "--bandwidth",
        str(SLOW_MIB_S),
    ]
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
    src.virsh(
        *migrate_command(case, domain, rpc_socket_for(case, src)), timeout=MIGRATION_TIMEOUT_S
    )
    check_arrived(src, dst, case, domain, expected_ram)
    assert retry.connect.wait(ONCE_EXIT_S) == 0, retry.connect.log()
    assert carried(retry.serve) == expected_channels(case), retry.serve.log()
