"""Fixtures for end-to-end tests with real QEMU processes (reused by the relay e2e tests).

``vm_pair``
    A `VMPairFactory`. Inside the test's own event loop::

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

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from migrelay.lab.vm import DisposableVM
from migrelay.units import MIB

from .cli_helpers import Commands, commands_in

#: RAM of a test VM: 64 MiB of random bytes migrates in well under a second here and
#: still takes several socket reads per channel.
DEFAULT_RAM_BYTES = 64 * MIB


class VMPairFactory:
    """Starts source/destination pairs of `DisposableVM` in a directory, and cleans up.

    Args:
        sock_dir: where the VMs' sockets, RAM files and logs go.
    """

    def __init__(self, sock_dir: Path) -> None:
        self.sock_dir = sock_dir
        self.vms: list[DisposableVM] = []

    @contextlib.asynccontextmanager
    async def __call__(
        self, ram_size: int = DEFAULT_RAM_BYTES, *, name: str = "vm"
    ) -> AsyncIterator[tuple[DisposableVM, DisposableVM]]:
        """Start ``NAME-src`` (random RAM) and ``NAME-dst`` (``-incoming defer``).

        Args:
            ram_size: RAM of each VM in bytes (a multiple of 1 MiB).
            name: file-name stem, distinct per pair when a test starts several.

        Yields:
            ``(source, destination)``, both started with their QMP socket present.
        """
        src = DisposableVM(self.sock_dir, f"{name}-src", ram_size)
        dst = DisposableVM(self.sock_dir, f"{name}-dst", ram_size, incoming=True)
        self.vms += [src, dst]
        try:
            await src.start()
            await dst.start()
            yield src, dst
        finally:
            await dst.terminate()
            await src.terminate()

    def kill_all(self) -> None:
        """SIGKILL and reap every VM still running (teardown safety net)."""
        for vm in self.vms:
            vm.kill()


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
