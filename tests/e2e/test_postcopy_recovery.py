"""A link that fails during postcopy: ``migrate --postcopy`` waits, resumes, RAM intact.

::

    source namespace                                       destination namespace
    QEMU src ──unix──▶ migrelay connect ══veth (cut)══▶ migrelay serve --qmp-dir ──▶ QEMU vm
      ▲
      └── migrelay migrate --postcopy --postcopy-after 1 --recover-timeout …

The link is shaped (``tc tbf``) so that postcopy, which ignores ``max-bandwidth``, takes
~13 s for 64 MiB; it is cut mid-postcopy for longer than the relays' liveness timeout,
so both relays close their channels and both QEMUs go ``postcopy-paused``. Once the link
is back, ``migrate`` resumes (``migrate`` with ``resume`` to the same socket), ``serve``
sees a new session for a paused destination and issues ``migrate-recover`` itself, and
the migration completes with the destination's RAM equal to the source's.

The VMs' files live on tmpfs (``/dev/shm``): the destination of a postcopy migration
registers its RAM with userfaultfd, which supports anonymous and shmem memory but not
an ext4 file (QEMU 7.2: "ram_block_enable_notify userfault register: Invalid argument").
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from migrelay.control.migrate import MigrationOptions, wait_destination_completed
from migrelay.control.netns import LinkedNamespaces
from migrelay.control.operations import MIGRATION_HEADER, announcement
from migrelay.control.qmp import QMP, MigrationStatus
from migrelay.control.vm import MIB, DisposableVM, first_difference

from ..conftest import MigrelayProcess, MigrelayProcesses

pytestmark = pytest.mark.e2e

FACTOR = float(os.environ.get("MIGRELAY_TEST_TIMEOUT_FACTOR", "1"))
RAM_BYTES = 64 * MIB
#: 40 Mbit/s: 64 MiB of postcopy take ~13 s, so the cut always lands mid-way.
LINK_RATE = "40mbit"
#: The link is cut once the destination holds this much RAM (postcopy under way).
CUT_AFTER_BYTES = 16 * MIB
PING_INTERVAL_S = 1.0
PING_TIMEOUT_S = 2.0
LIVENESS_S = PING_INTERVAL_S + PING_TIMEOUT_S
LIVENESS_ARGS = ("--ping-interval", str(PING_INTERVAL_S), "--ping-timeout", str(PING_TIMEOUT_S))
#: How long the link stays down: well past both relays' liveness timeout.
CUT_S = LIVENESS_S + 4.0
#: The bound on noticing the cut: liveness plus 2 s for scheduling on a busy host.
PAUSE_BOUND_S = (LIVENESS_S + 2.0) * FACTOR
MIGRATION_TIMEOUT_S = 90.0 * FACTOR
PORT = 8765
NAME = "vm"
OPTIONS = MigrationOptions(postcopy=True)


def allocated_bytes(path: Path) -> int:
    """Bytes of a sparse tmpfs file that hold data: the pages postcopy has placed."""
    return os.stat(path).st_blocks * 512


def log_lines(process: MigrelayProcess, pattern: str) -> list[str]:
    return [line for line in process.log().splitlines() if re.search(pattern, line)]


@pytest.fixture
def shm_workdir() -> Iterator[Path]:
    """A fresh directory on tmpfs (see the module docstring), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix="mr-pc-", dir="/dev/shm"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_link_cut_during_postcopy_is_waited_out_resumed_and_ram_intact(
    shm_workdir: Path, migrelay_procs: MigrelayProcesses
) -> None:
    token = shm_workdir / "token"
    token.write_text("postcopy-recovery-token\n")
    dest_dir = shm_workdir / "dst"
    dest_dir.mkdir()
    source_sock = shm_workdir / "source.sock"
    with LinkedNamespaces(rate=LINK_RATE) as ns:
        src = DisposableVM(shm_workdir, "src", RAM_BYTES, command_prefix=ns.prefix(ns.source_ns))
        dst = DisposableVM(
            dest_dir, NAME, RAM_BYTES, incoming=True, command_prefix=ns.prefix(ns.dest_ns)
        )
        try:
            asyncio.run(_start(src, dst))
            serve = migrelay_procs.serve(
                "--target-dir", str(dest_dir), "--qmp-dir", str(dest_dir),
                "--token-file", str(token), "--wait-target", "10", *LIVENESS_ARGS,
                listen=f"{ns.dest_addr}:{PORT}", prefix=ns.prefix(ns.dest_ns),
            )  # fmt: skip
            # A plain connect announces no capabilities (serve would prepare the
            # destination without postcopy); migrate --to sends this header itself.
            # --retry-open: hold QEMU's resume connection until the link is back.
            client = migrelay_procs.connect(
                f"ws://{ns.dest_addr}:{PORT}/{NAME}", source_sock,
                "--token-file", str(token), *LIVENESS_ARGS,
                "--header", f"{MIGRATION_HEADER}: {announcement(OPTIONS)}",
                "--retry-open", "60",
                prefix=ns.prefix(ns.source_ns),
            )  # fmt: skip
            migrate = migrelay_procs.start(
                "migrate", "--qmp", str(src.qmp_path), "--socket", str(source_sock),
                "--postcopy", "--postcopy-after", "1", "--recover-timeout", "60",
                prefix=ns.prefix(ns.source_ns), name="migrate",
            )  # fmt: skip

            migrate.wait_for_log(r"postcopy-active", timeout=30 * FACTOR)
            deadline = time.monotonic() + 30 * FACTOR
            while allocated_bytes(dst.ram_path) < CUT_AFTER_BYTES:
                assert time.monotonic() < deadline, "postcopy did not get under way"
                assert migrate.popen.poll() is None, migrate.log()
                time.sleep(0.02)

            ns.set_link(False)
            cut_at = time.monotonic()
            migrate.wait_for_log(
                r"postcopy paused: the link to the destination failed", timeout=PAUSE_BOUND_S
            )
            paused_after = time.monotonic() - cut_at
            serve.wait_for_log(r"channel \S+ closed: [^\n]*liveness timeout", timeout=10)
            client.wait_for_log(r"channel \S+ closed: [^\n]*liveness timeout", timeout=10)
            time.sleep(max(cut_at + CUT_S - time.monotonic(), 0))
            # Still mid-way: the rest can only come over the restored link.
            held = allocated_bytes(dst.ram_path)
            assert held < RAM_BYTES - 8 * MIB, f"postcopy nearly done before the cut: {held}"
            ns.set_link(True)
            restored_at = time.monotonic()

            serve.wait_for_log(r"listening again on unix:\S+ to resume", timeout=30 * FACTOR)
            resumed_after = time.monotonic() - restored_at
            status = migrate.wait(MIGRATION_TIMEOUT_S)
            completed_after = time.monotonic() - restored_at
            assert status == 0, migrate.log()

            asyncio.run(_finish(src, dst))
            assert first_difference(src.ram_path, dst.ram_path) is None

            # The operator was told once that the link failed and that it waits.
            paused = log_lines(migrate, r"postcopy paused")
            assert len(paused) == 1, migrate.log()
            assert "waiting up to 60 s for it to return" in paused[0]
            assert re.search(r"^completed", migrate.log(), re.MULTILINE), migrate.log()
            print(
                f"\nPOSTCOPY RECOVERY: link cut after {held // MIB} MiB held by the"
                f" destination; source paused {paused_after:.2f} s after the cut (bound"
                f" {PAUSE_BOUND_S:g} s); link down {restored_at - cut_at:.1f} s; serve"
                f" recovered {resumed_after:.2f} s and the migration completed"
                f" {completed_after:.2f} s after the link returned; RAM identical"
            )
        finally:
            migrelay_procs.stop_all()
            for vm in (src, dst):
                vm.kill()
                print(f"----- qemu {vm.name}:\n{vm.stderr_tail()}")


async def _start(src: DisposableVM, dst: DisposableVM) -> None:
    await src.start()
    await dst.start()


async def _finish(src: DisposableVM, dst: DisposableVM) -> None:
    """Both sides completed by their own account; both QEMUs quit cleanly."""
    async with QMP(NAME) as dq:
        await dq.connect(str(dst.qmp_path))
        final = await wait_destination_completed(dq, 30 * FACTOR)
        assert final.status is MigrationStatus.COMPLETED
        await dq.quit()
    async with QMP("src") as sq:
        await sq.connect(str(src.qmp_path))
        assert (await sq.query_migrate()).status is MigrationStatus.COMPLETED
        await sq.quit()
    assert await src.wait(30) == 0
    assert await dst.wait(30) == 0
