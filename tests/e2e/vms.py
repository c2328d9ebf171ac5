"""Source/destination pairs of real QEMU VMs for the end-to-end tests.

:class:`VMPairFactory` is what the ``vm_pair`` fixture of ``tests/e2e/conftest.py``
gives a test; test modules import it (and :data:`DEFAULT_RAM_BYTES`) from here, never
from a conftest.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from migrelay.lab.vm import DisposableVM
from migrelay.units import MIB

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
