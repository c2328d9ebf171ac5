"""``virsh migrate`` between two namespaced libvirt daemons through migrelay.

As issue 16 tried by hand, with today's features: ``migrelay serve --target-dir`` in the
destination host's namespace serves its socket directory, and one ``migrelay connect
ws://…/NAME --listen-unix`` per socket runs in the source host's, at the paths libvirt
names: the destination daemon (``--p2p``: libvirt's RPC), QEMU's migration stream
(``--migrateuri``, with its multifd channels under ``--parallel``) and the NBD disk copy
(``--disks-uri``). Only loopback carries the WebSockets.

The destination daemon's own socket is not in the target directory: ``serve`` follows
no symlink, so the test bind-mounts the socket at ``libvirt.sock`` there, inside the
destination's namespace (until ``serve`` maps a target name to any socket).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.libvirt.harness import (
    CASES,
    DAEMON_SOCKET,
    LIBVIRT_SOCKET,
    MIGRATION_SOCKET,
    NBD_SOCKET,
    SOCKET_DIR,
    TIMINGS,
    LibvirtHost,
    MigrationCase,
    run_case,
)
from tests.processes import MigrelayProcesses

pytestmark = pytest.mark.e2e

#: serve's line for each channel it connected to a target.
_OPENED = re.compile(r"channel (\w+)/(\d+) opened: .* \(target ([\w.-]+)\)")


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


@pytest.fixture(scope="module")
def libvirt_target(
    libvirt_hosts: tuple[LibvirtHost, LibvirtHost],
) -> Iterator[tuple[LibvirtHost, LibvirtHost]]:
    """The hosts, with the destination daemon's socket at `LIBVIRT_SOCKET` inside the
    destination (a bind mount, removed afterwards)."""
    src, dst = libvirt_hosts
    dst.bind_socket(DAEMON_SOCKET, LIBVIRT_SOCKET)
    try:
        yield src, dst
    finally:
        dst.unbind_socket(LIBVIRT_SOCKET)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_virsh_migrate_through_migrelay_moves_ram_and_disk(
    case: MigrationCase,
    libvirt_target: tuple[LibvirtHost, LibvirtHost],
    migrelay_procs: MigrelayProcesses,
) -> None:
    src, dst = libvirt_target
    serve = migrelay_procs.serve("--target-dir", SOCKET_DIR, prefix=dst.nsenter())
    relays = [
        migrelay_procs.start(
            "connect",
            f"{serve.url}/{Path(socket).stem}",
            "--listen-unix",
            socket,
            prefix=src.nsenter(),
        )
        for socket in (LIBVIRT_SOCKET, MIGRATION_SOCKET, NBD_SOCKET)
    ]
    for relay, socket in zip(relays, (LIBVIRT_SOCKET, MIGRATION_SOCKET, NBD_SOCKET), strict=True):
        relay.wait_for_log(f"listening on {re.escape(socket)}")
    elapsed = run_case(src, dst, case, f"relay-{case.name}", seed=16)
    TIMINGS.append(("migrelay", case.name, elapsed))
    # Everything went through serve: each target's channels, and nothing else.
    carried: dict[str, int] = {}
    for _session, _channel, target in _OPENED.findall(serve.log()):
        carried[target] = carried.get(target, 0) + 1
    assert carried == expected_channels(case), serve.log()
