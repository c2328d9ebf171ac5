"""Fixtures for end-to-end tests with real QEMU processes (fixtures only: what the tests
import to annotate them is in ``tests/e2e/vms.py`` and ``tests/e2e/cli_helpers.py``).

``vm_pair``
    A `tests.e2e.vms.VMPairFactory`. Inside the test's own event loop::

        async with vm_pair(64 * MIB) as (src, dst):
            ...  # src: random RAM, started; dst: sparse RAM, -incoming defer, started

    Both QEMUs are terminated (SIGTERM, then SIGKILL) and reaped when the block exits, and
    again, synchronously, at fixture teardown if a test left one behind. The VMs' files
    go to ``sock_dir`` (``tests/conftest.py``), next to the test's sockets and logs.

``commands``
    A `tests.e2e.cli_helpers.Commands`: ``migrelay`` commands with stdout and stderr kept
    apart, in ``sock_dir``; those still running at teardown are killed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.cli_helpers import Commands, commands_in
from tests.e2e.vms import VMPairFactory


@pytest.fixture
def vm_pair(sock_dir: Path) -> Iterator[VMPairFactory]:
    """A factory of source/destination VM pairs in ``sock_dir``; see `VMPairFactory`."""
    factory = VMPairFactory(sock_dir)
    try:
        yield factory
    finally:
        factory.kill_all()


@pytest.fixture
def commands(sock_dir: Path) -> Iterator[Commands]:
    """``migrelay`` commands with stdout and stderr kept apart."""
    yield from commands_in(sock_dir)
