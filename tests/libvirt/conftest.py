"""Fixtures of the libvirt tests (fixtures only: the harness is ``tests/libvirt/harness.py``).

``libvirt_hosts``
    A source and a destination `tests.libvirt.harness.LibvirtHost`, started once per
    module and stopped (with every process left in their namespaces) after it. Each test
    leaves them without domains (``libvirt_domains_cleared``, automatic).

``forwarders``
    A `tests.libvirt.harness.Forwarders` (socat) whose processes stop after the test.

At the end of the run, the wall time of each migration is printed, per case, direct
and through migrelay (`tests.libvirt.harness.TIMINGS`).
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import short_temp_dir
from tests.libvirt.harness import (
    LIBVIRTD,
    REQUIRED_PROGRAMS,
    TIMINGS,
    Forwarders,
    LibvirtHost,
    host_pair,
)


@pytest.fixture(scope="module")
def libvirt_hosts() -> Iterator[tuple[LibvirtHost, LibvirtHost]]:
    """Two running libvirt hosts, (source, destination), for one test module."""
    # Never skipped: tools/setup installs these.
    missing = [name for name in REQUIRED_PROGRAMS if shutil.which(name) is None]
    assert not missing, f"missing {', '.join(missing)}: run tools/setup"
    assert Path(LIBVIRTD).exists(), f"missing {LIBVIRTD}: run tools/setup"
    # On tmpfs: the RAM files are then shared memory, which postcopy's userfaultfd
    # supports (not a file on ext4).
    with short_temp_dir("/dev/shm") as root, host_pair(root) as hosts:
        yield hosts


@pytest.fixture(autouse=True)
def libvirt_domains_cleared(
    request: pytest.FixtureRequest,
) -> Iterator[None]:
    """After each test that uses the hosts, no domain is left on either."""
    yield
    if "libvirt_hosts" in request.fixturenames:
        hosts: tuple[LibvirtHost, LibvirtHost] = request.getfixturevalue("libvirt_hosts")
        for host in hosts:
            host.destroy_all()


@pytest.fixture
def forwarders(sock_dir: Path) -> Iterator[Forwarders]:
    """socat forwarders for one test, stopped afterwards."""
    started = Forwarders(sock_dir)
    try:
        yield started
    finally:
        started.stop_all()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print each migration's wall time, direct and through migrelay, per case."""
    if not TIMINGS:
        return
    terminalreporter.section("virsh migrate wall times (64 MiB RAM, 64 MiB disk)")
    for path, case, seconds in TIMINGS:
        terminalreporter.write_line(f"{case:<18} {path:<9} {seconds:6.2f} s")
