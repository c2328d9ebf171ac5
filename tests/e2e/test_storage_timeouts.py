"""The two bounds of the README's Disks section that end a wait, with real QEMU.

* At the switchover, ending the mirrors in sync (`SourceMirrors.cancel_in_sync`, the
  guest paused meanwhile) is bounded: 30 s by default (``SWITCHOVER_CANCEL_TIMEOUT_S``,
  what ``migrate --copy-storage`` uses), past which it raises `StorageError` (and the
  migration is cancelled by its caller). The test lowers the bound through the
  method's own ``timeout_s`` parameter and makes a mirror unable to end: its NBD link to
  the destination's export goes through a proxy that the test freezes (it keeps the
  connection open and forwards nothing), then the source disk is written to, so the
  ready mirror has data in flight that never arrives.
* ``incoming --copy-storage`` waits at most ``--export-timeout`` for a migration that
  never comes, then removes its exports and exits 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from migrelay.control.migration import _switch_over
from migrelay.control.qmp import QMP, MigrationStatus, RunState
from migrelay.control.storage import (
    NBD_NODE_PREFIX,
    SWITCHOVER_CANCEL_TIMEOUT_S,
    SourceMirrors,
    export_disks,
    select_disks,
)
from migrelay.errors import StorageError
from migrelay.lab.disks import DiskSpec
from migrelay.lab.vm import DisposableVM
from migrelay.units import MIB
from tests.e2e.storage_helpers import leftovers, write
from tests.helpers import FACTOR
from tests.loops import AsyncRunner

pytestmark = pytest.mark.e2e

RAM_BYTES = 16 * MIB
DISK = DiskSpec("disk0", 8 * MIB)
#: The lowered switchover bound (the default is 30 s).
SWITCHOVER_BOUND_S = 2.0
#: What the test allows past a bound: QMP round trips, one poll, python start-up.
SLACK_S = 10.0 * FACTOR
#: 8 MiB copied over loopback: well under a second here.
READY_TIMEOUT_S = 60.0 * FACTOR
#: ``incoming --export-timeout`` (its minimum is 1 s).
EXPORT_TIMEOUT_S = 2


class FreezableProxy:
    """A unix-socket proxy to ``upstream`` that forwards nothing while frozen.

    Frozen, it keeps every connection open and reads what arrives, but passes nothing
    on in either direction: to both peers the link is alive and silent.
    """

    def __init__(self, listen: Path, upstream: Path) -> None:
        self.listen = listen
        self.upstream = upstream
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.forwarded = 0
        #: Every pump, kept (not only the running ones) so that each ending is awaited.
        self._tasks: list[asyncio.Task[None]] = []
        self._writers: list[asyncio.StreamWriter] = []

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A peer that went away ends the pump (uvloop: RuntimeError on a closed handle).
        with contextlib.suppress(ConnectionError, RuntimeError):
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                self.forwarded += len(data)
                await writer.drain()
        with contextlib.suppress(OSError, RuntimeError):
            writer.write_eof()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_unix_connection(str(self.upstream))
        self._writers += [writer, up_writer]
        for task in (
            asyncio.create_task(self._pump(reader, up_writer)),
            asyncio.create_task(self._pump(up_reader, writer)),
        ):
            self._tasks.append(task)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[FreezableProxy]:
        server = await asyncio.start_unix_server(self._accept, str(self.listen))
        try:
            yield self
        finally:
            server.close()
            for task in self._tasks:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            for writer in self._writers:
                writer.close()
            await server.wait_closed()


def test_the_switchover_bound_migrate_uses_is_the_readmes_30_s() -> None:
    default = inspect.signature(SourceMirrors.cancel_in_sync).parameters["timeout_s"].default
    assert default == SWITCHOVER_CANCEL_TIMEOUT_S == 30.0


def test_mirrors_that_cannot_end_at_switchover_fail_within_the_bound(
    run_e2e: AsyncRunner, sock_dir: Path
) -> None:
    src = DisposableVM(sock_dir, "src", RAM_BYTES, disks=[DISK])
    dst = DisposableVM(sock_dir, "dst", RAM_BYTES, incoming=True, disks=[DISK])
    export_sock, proxy_sock = sock_dir / "dest.sock.nbd", sock_dir / "source.sock.nbd"
    proxy = FreezableProxy(proxy_sock, export_sock)

    async def main() -> None:
        async with src, dst, QMP("dst") as dq, QMP("src") as sq:
            await dq.connect(str(dst.qmp_path))
            await sq.connect(str(src.qmp_path))
            await export_disks(dq, f"unix:{export_sock}", None)
            async with proxy.running():
                mirrors = SourceMirrors(
                    select_disks(await sq.query_block(), None), f"unix:{proxy_sock}"
                )
                await mirrors.start(sq)
                try:
                    await mirrors.wait_ready(
                        sq, timeout_s=READY_TIMEOUT_S, stall_timeout_s=None, interval=0.05
                    )
                    assert proxy.forwarded >= DISK.size
                    # The source is paused (-S), as at switchover; its disk is written
                    # while the link forwards nothing: the mirror stays ready, with data
                    # in flight that cannot arrive.
                    proxy.freeze()
                    await write(sq, DISK, 0, 0x5A, "frozen")
                    started = time.monotonic()
                    with pytest.raises(StorageError) as raised:
                        await mirrors.cancel_in_sync(sq, timeout_s=SWITCHOVER_BOUND_S)
                    took = time.monotonic() - started
                    assert str(raised.value) == (
                        f"disk copies did not end within {SWITCHOVER_BOUND_S:g} s at switchover"
                    )
                    # Not before the bound; after it, no more than a few QMP round trips.
                    assert SWITCHOVER_BOUND_S <= took <= SWITCHOVER_BOUND_S + SLACK_S, took
                    assert not mirrors.switched_over
                finally:
                    proxy.thaw()
                    problems = await mirrors.remove(sq)
                assert problems == []
                # Nothing of the mirrors is left on the source.
                assert await sq.query_jobs() == []
                assert not [
                    n for n in await sq.query_node_names() if n.startswith(NBD_NODE_PREFIX)
                ]

    run_e2e(main())


class LoweredBoundMirrors(SourceMirrors):
    """`SourceMirrors` whose switchover bound is `SWITCHOVER_BOUND_S` (its only change)."""

    async def cancel_in_sync(self, qmp: QMP, timeout_s: float = SWITCHOVER_BOUND_S) -> None:
        await super().cancel_in_sync(qmp, timeout_s)


def test_at_switchover_mirrors_past_the_bound_cancel_the_migration_and_the_source_stays(
    run_e2e: AsyncRunner, sock_dir: Path
) -> None:
    src = DisposableVM(sock_dir, "src", RAM_BYTES, disks=[DISK])
    dst = DisposableVM(sock_dir, "dst", RAM_BYTES, incoming=True, disks=[DISK])
    export_sock, proxy_sock = sock_dir / "dest.sock.nbd", sock_dir / "source.sock.nbd"
    migration_sock = sock_dir / "dest.sock"
    proxy = FreezableProxy(proxy_sock, export_sock)

    async def main() -> None:
        async with src, dst, QMP("dst") as dq, QMP("src") as sq:
            await dq.connect(str(dst.qmp_path))
            await sq.connect(str(src.qmp_path))
            # A running guest (its firmware, finding nothing to boot): the one that runs on.
            await sq.cont()
            await export_disks(dq, f"unix:{export_sock}", None)
            async with proxy.running():
                disks = select_disks(await sq.query_block(), None)
                mirrors = LoweredBoundMirrors(disks, f"unix:{proxy_sock}")
                await mirrors.start(sq)
                try:
                    await mirrors.wait_ready(
                        sq, timeout_s=READY_TIMEOUT_S, stall_timeout_s=None, interval=0.05
                    )
                    # RAM goes straight to the destination; the source stops before the
                    # switchover, as migrate --copy-storage has it.
                    await sq.set_capabilities({"pause-before-switchover": True})
                    await dq.migrate_incoming(f"unix:{migration_sock}")
                    await sq.migrate(f"unix:{migration_sock}")
                    await wait_for_status(sq, MigrationStatus.PRE_SWITCHOVER)
                    # Now the disk link forwards nothing and the disk is written to.
                    proxy.freeze()
                    await write(sq, DISK, 0, 0x5A, "at switchover")
                    started = time.monotonic()
                    with pytest.raises(StorageError) as raised:
                        await _switch_over(sq, mirrors)
                    took = time.monotonic() - started
                    assert str(raised.value) == (
                        f"disk copies did not end within {SWITCHOVER_BOUND_S:g} s at switchover"
                    )
                    # The bound, then the migration's cancel: a few QMP round trips.
                    assert SWITCHOVER_BOUND_S <= took <= SWITCHOVER_BOUND_S + SLACK_S, took
                    # The migration was cancelled; the guest runs on at the source.
                    assert (await sq.query_migrate()).status is MigrationStatus.CANCELLED
                    assert await sq.query_status() is RunState.RUNNING
                finally:
                    proxy.thaw()
                    problems = await mirrors.remove(sq)
                assert problems == []
                assert await sq.query_jobs() == []

    run_e2e(main())


async def wait_for_status(qmp: QMP, status: MigrationStatus) -> None:
    """Poll ``query-migrate`` until ``status`` (bounded)."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    while (info := await qmp.query_migrate()).status is not status:
        assert time.monotonic() < deadline, f"no {status} within {READY_TIMEOUT_S:g} s: {info}"
        await asyncio.sleep(0.05)


def test_incoming_copy_storage_gives_up_after_export_timeout_and_removes_its_exports(
    run_e2e: AsyncRunner, sock_dir: Path
) -> None:
    dst = DisposableVM(sock_dir, "dst", RAM_BYTES, incoming=True, disks=[DISK])
    dest_sock = sock_dir / "dest.sock"

    async def main() -> None:
        async with dst:
            # No source ever comes.
            started = time.monotonic()
            argv = [
                *(sys.executable, "-m", "migrelay", "incoming", "--qmp", str(dst.qmp_path)),
                *("--socket", str(dest_sock), "--copy-storage"),
                *("--export-timeout", str(EXPORT_TIMEOUT_S)),
            ]
            result = await asyncio.to_thread(
                subprocess.run,
                argv,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=EXPORT_TIMEOUT_S + 4 * SLACK_S,
                check=False,
            )
            took = time.monotonic() - started
            told = f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
            assert result.returncode == 1, told
            # Not before the bound; after it, python start-up and QMP round trips.
            assert EXPORT_TIMEOUT_S <= took <= EXPORT_TIMEOUT_S + SLACK_S, (took, told)
            assert result.stdout.splitlines() == [
                f"dst: listening for an incoming migration on unix:{dest_sock}",
                f"dst: exporting its disks on {dest_sock}.nbd until the migration ends",
                "dst: migration none; disk exports removed",
            ], told
            # What happened, in one line.
            assert result.stderr.splitlines() == [
                f"migrelay: error: no migration ended within --export-timeout"
                f" {EXPORT_TIMEOUT_S:g} s (migration none); disk exports removed"
            ], told
            left = await leftovers(dst)
            assert left.exports == [], left
            # QEMU itself is untouched: still waiting for a migration.
            assert dst.running

    run_e2e(main())
