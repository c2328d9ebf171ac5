"""``virsh migrate`` between two namespaced libvirt daemons over plain unix sockets.

The sockets libvirt names (the destination daemon for ``--p2p``, ``--migrateuri``,
``--disks-uri``) are forwarded from the source host's socket directory to the
destination's by socat, as libvirt's own tests do: this proves the harness, and gives
the times migrelay's path is compared with (``test_libvirt_migrelay.py``).
"""

from __future__ import annotations

import pytest

from tests.libvirt.harness import (
    CASES,
    DAEMON_SOCKET,
    LIBVIRT_SOCKET,
    MIGRATION_SOCKET,
    NBD_SOCKET,
    TIMINGS,
    Forwarders,
    LibvirtHost,
    MigrationCase,
    run_case,
)

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_virsh_migrate_over_forwarded_unix_sockets_moves_ram_and_disk(
    case: MigrationCase,
    libvirt_hosts: tuple[LibvirtHost, LibvirtHost],
    forwarders: Forwarders,
) -> None:
    src, dst = libvirt_hosts
    forwarders.start(src.outside(LIBVIRT_SOCKET), dst.outside(DAEMON_SOCKET))
    forwarders.start(src.outside(MIGRATION_SOCKET), dst.outside(MIGRATION_SOCKET))
    forwarders.start(src.outside(NBD_SOCKET), dst.outside(NBD_SOCKET))
    elapsed = run_case(src, dst, case, f"direct-{case.name}", seed=16)
    TIMINGS.append(("direct", case.name, elapsed))
